//! Upstream HTTP/1.1 connections: a small idle pool per server, connect and response
//! timeouts, and the facts a retry decision needs.
//!
//! The pool belongs to one server, so choosing a server and choosing a connection are
//! separate steps and nothing pins a client to a server. A connection goes back to its
//! pool only when its response body has ended cleanly. Requests are written and
//! responses read by [`super::h1`] on the request's own task: an idle connection is a
//! bare socket, with no session, buffer or task of its own.
//!
//! "Nothing of the request reached the server" is a fact, not a guess: it holds when
//! the first write of the request's head failed. Only then may a request of any method
//! go to another server.

use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use http::Method;
use http::request::Parts;
use http_body::Body as _;
use hyper::Response;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::body::ReqBody;
use super::h1::{self, Broke, Framing, Head, RequestHead, ResponseBody, Upload};
use crate::upstream::Server;

/// Idle connections kept per server.
const MAX_IDLE: usize = 512;
/// Idle connections older than this are not reused (servers commonly close at 60 s+).
const MAX_IDLE_AGE: Duration = Duration::from_secs(50);
/// A request that may not be sent twice (see [`send`]) takes only a connection idle for
/// less than this: under the keep-alive timeouts servers use by default (5 s and more),
/// so the server does not close it just as the request goes out; less for a server seen
/// to close sooner (see [`Pool::unreplayable_idle_age`]).
const UNREPLAYABLE_IDLE_AGE: Duration = Duration::from_secs(2);
/// How often [`Pool::sweep`] should run.
pub const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// A held request body up to this size goes out in the same write as its head.
const INLINE_BODY: usize = 16 * 1024;
/// An exchange still waiting for its response after this long starts to watch its
/// server's `kill` (see [`exchange_until`]).
const WATCH_KILL_AFTER: Duration = Duration::from_secs(1);

/// Idle connections of one server, sharded per worker thread: a socket is registered
/// with the worker that opened it, and reusing it from there needs no cross-thread
/// wake-up. It lives inside its [`Server`] (no pointer of its own to follow: with many
/// servers, each request's server is cold in the cache, and every hop is a miss).
#[derive(Debug)]
pub struct Pool {
    shards: Box<[Mutex<Shard>]>,
    /// Raised by [`Pool::clear`]: connections taken before it are closed when their
    /// response ends, not kept (the server is going away).
    epoch: AtomicU64,
    /// What was learned of the server's closing, in one word so that it changes whole
    /// (see [`closing`]): the shortest idle time after which it was found to close a kept
    /// connection (its keep-alive timeout, or less; see [`Pool::closed_after`]), and when
    /// that was last seen.
    closing: AtomicU64,
    born: Instant,
}

/// The learned close time of a server never seen to close a connection soon (above the
/// ceiling [`grown`] keeps to, 4 s in microseconds).
const NEVER: u32 = (1 << 22) - 1;

/// [`Pool::closing`]'s word: the close time in microseconds (22 bits, up to [`NEVER`]),
/// and when it was last seen in milliseconds after the pool was made (the other 42 bits:
/// 139 years).
fn closing(us: u32, at: u64) -> u64 {
    (u64::from(us.min(NEVER)) << 42) | (at & SEEN)
}

/// [`closing`]'s time bits.
const SEEN: u64 = (1 << 42) - 1;

/// The close time in `word` as of `at`: held for [`HOLD`] after it was last seen, then
/// grown back by a [`RELAX`]th of the time passed, up to where it no longer matters. A
/// request's clock, read as it began, may be behind a close noted since: no time passed.
fn grown(word: u64, at: u64) -> u32 {
    let (us, seen) = ((word >> 42) as u32, word & SEEN);
    if us == NEVER {
        return NEVER;
    }
    let since_ms = at.saturating_sub(seen);
    let grown_us = since_ms.saturating_sub(HOLD.as_millis() as u64) * 1000 / RELAX;
    let ceiling = (2 * UNREPLAYABLE_IDLE_AGE).as_micros() as u64;
    u64::from(us).saturating_add(grown_us).min(ceiling) as u32
}

/// What was learned of a server's closing holds this long after the last close seen, and
/// then grows back by a [`RELAX`]th of the time passed. A server that keeps closing idle
/// connections soon is seen to at least once a second, by the pool's sweep, so what was
/// learned of it holds; the closes of a one-time event (a restart at the same address)
/// are forgotten within about two minutes.
const HOLD: Duration = Duration::from_secs(10);
const RELAX: u64 = 32;

/// Idle sockets, since when, and the room their next response's first read gets (see
/// [`h1::first_read_room`]), most recently used last.
type Shard = Vec<(TcpStream, Instant, usize)>;

impl Default for Pool {
    fn default() -> Self {
        let shards = (0..super::workers::count()).map(|_| Mutex::default()).collect();
        Pool { shards, epoch: AtomicU64::new(0), closing: AtomicU64::new(closing(NEVER, 0)), born: Instant::now() }
    }
}

/// Whether a socket idle for `idle` may still carry a request.
fn reusable(socket: &TcpStream, idle: Duration) -> bool {
    idle < MAX_IDLE_AGE && still_open(socket)
}

/// Whether the server has neither closed an idle socket nor sent anything on it. No
/// system call unless the socket's readiness says something arrived.
fn still_open(socket: &TcpStream) -> bool {
    matches!(socket.try_read(&mut [0u8; 1]), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

/// [`still_open`], asked of the kernel (a system call): tokio's readiness of the socket is
/// only as new as the worker's last look at its events, and a server's FIN may have come
/// since. The peek leaves a byte that did come where it is.
fn open_now(socket: &TcpStream) -> bool {
    let mut byte = [std::mem::MaybeUninit::<u8>::uninit()];
    matches!(socket2::SockRef::from(socket).peek(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

impl Pool {
    /// This worker's shard.
    fn lock(&self) -> MutexGuard<'_, Shard> {
        let shard = &self.shards[super::workers::index() % self.shards.len()];
        shard.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// An idle connection idle for less than `max_idle`, the most recently used first
    /// (warm, least likely closed by the server), with its read room and idle time, and
    /// the pool's epoch. Older ones stay for requests that may take them.
    fn take(&self, now: Instant, max_idle: Duration) -> (Option<(TcpStream, usize, Duration)>, u64) {
        let epoch = self.epoch.load(Relaxed);
        if max_idle.is_zero() {
            // A new connection asked for (a request sent again): the pool is left as it is.
            return (None, epoch);
        }
        let mut shard = self.lock();
        while let Some((socket, idle_since, room)) = shard.pop() {
            let idle = now.saturating_duration_since(idle_since);
            if idle >= max_idle && idle < MAX_IDLE_AGE {
                // The most recent is too old for this request (one that may not be sent
                // twice), and so are the others. It makes way for the connection the
                // request opens instead: kept, the pool would grow by one per such request
                // (hundreds of idle connections on a server seen to close soon).
                if !still_open(&socket) {
                    self.closed_after(idle, now);
                }
                break;
            }
            if reusable(&socket, idle) {
                return (Some((socket, room, idle)), epoch);
            }
            if idle < MAX_IDLE_AGE {
                self.closed_after(idle, now);
            }
        }
        (None, epoch)
    }

    /// Notes, `now`, that the server closed a connection kept idle for `idle` (or had by
    /// then): it closes idle connections that soon, or sooner. A close after 4 s or more
    /// has no bearing on the reuse age (at most 2 s), and is not noted: a server closing
    /// at its usual keep-alive timeout lets what a one-time event taught grow back.
    fn closed_after(&self, idle: Duration, now: Instant) {
        if idle >= 2 * UNREPLAYABLE_IDLE_AGE {
            return;
        }
        let us = u32::try_from(idle.as_micros()).unwrap_or(NEVER);
        let at = self.ms(now);
        let _ = self.closing.fetch_update(Relaxed, Relaxed, |word| {
            let learned = grown(word, at);
            // A close much later than what was learned (a server back from a restart with
            // a 2 s keep-alive, say) neither lowers nor holds it: it grows on towards the
            // server's own time. The sweep sees a close up to a second late.
            if learned != NEVER && u64::from(us) > u64::from(learned) + SWEEP_EVERY.as_micros() as u64 {
                return None;
            }
            let seen = (word & SEEN).max(at);
            Some(closing(learned.min(us), seen))
        });
    }

    /// The shortest idle time after which the server was seen to close a connection, in
    /// microseconds, grown back since (see [`grown`]); `None`: never seen.
    fn closes_after(&self, now: Instant) -> Option<u32> {
        Some(grown(self.closing.load(Relaxed), self.ms(now))).filter(|&us| us != NEVER)
    }

    /// `now` in milliseconds after the pool was made.
    fn ms(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.born).as_millis()).unwrap_or(u64::MAX)
    }

    /// How long a connection may have idled, `now`, and still take a request that may not
    /// be sent twice: [`UNREPLAYABLE_IDLE_AGE`], or half the time after which this server
    /// was seen to close one (see [`Pool::closes_after`]). A server whose keep-alive
    /// timeout is short (a second, say), or that closes after a response without saying
    /// so, would otherwise close connections just as such requests go out on them.
    fn unreplayable_idle_age(&self, now: Instant) -> Duration {
        match self.closes_after(now) {
            None => UNREPLAYABLE_IDLE_AGE,
            Some(us) => Duration::from_micros(u64::from(us / 2)).min(UNREPLAYABLE_IDLE_AGE),
        }
    }

    /// Keeps a connection whose last response (of `body` bytes) has ended `now`, taken
    /// at `epoch`, unless the pool was cleared since or is full.
    pub fn put(&self, socket: TcpStream, epoch: u64, body: u64, now: Instant) {
        if self.epoch.load(Relaxed) != epoch {
            return;
        }
        let mut shard = self.lock();
        if shard.len() < MAX_IDLE {
            shard.push((socket, now, h1::first_read_room(body)));
        }
    }

    /// Closes this worker's idle sockets that the server has closed or that are too old
    /// to reuse. Run on every worker, every [`SWEEP_EVERY`].
    pub fn sweep(&self) {
        let now = Instant::now();
        self.lock().retain(|(socket, since, _)| {
            let idle = now.saturating_duration_since(*since);
            let keep = reusable(socket, idle);
            if !keep && idle < MAX_IDLE_AGE {
                self.closed_after(idle, now);
            }
            keep
        });
    }

    /// Closes every idle connection; those in use are closed when their response ends.
    pub fn clear(&self) {
        self.epoch.fetch_add(1, Relaxed);
        for shard in &self.shards {
            shard.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clear();
        }
    }

    /// Idle connections.
    pub fn idle_count(&self) -> usize {
        self.shards.iter().map(|s| s.lock().unwrap_or_else(std::sync::PoisonError::into_inner).len()).sum()
    }
}

/// Why an attempt failed, with what a retry decision needs to know.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("connect to {addr} failed: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("connect to {addr} timed out after {after:?}")]
    ConnectTimeout { addr: SocketAddr, after: Duration },
    /// The connection failed before any of the request was written.
    #[error("{addr} closed the connection before the request was sent: {source}")]
    Closed { addr: SocketAddr, source: io::Error },
    /// Some of the request may have reached the server; no response head came back.
    #[error("{addr} failed before responding: {source}")]
    Failed { addr: SocketAddr, source: io::Error },
    #[error("{addr} did not respond within {after:?}")]
    ResponseTimeout { addr: SocketAddr, after: Duration },
    /// The client sent nothing more of its request body for `after`.
    #[error("the client sent none of the rest of its request body for {after:?}")]
    ClientStalled { after: Duration },
    /// The client's request body failed (bad chunking, cut short) while it streamed on.
    #[error("the client's request body failed: {0}")]
    ClientBody(hyper::Error),
}

impl SendError {
    /// The server it happened with, when it was the server's doing.
    pub fn server(&self) -> Option<SocketAddr> {
        match self {
            SendError::Connect { addr, .. }
            | SendError::ConnectTimeout { addr, .. }
            | SendError::Closed { addr, .. }
            | SendError::Failed { addr, .. }
            | SendError::ResponseTimeout { addr, .. } => Some(*addr),
            SendError::ClientStalled { .. } | SendError::ClientBody(_) => None,
        }
    }

    /// Whether no byte of the request reached the server.
    pub fn nothing_sent(&self) -> bool {
        matches!(self, SendError::Connect { .. } | SendError::ConnectTimeout { .. } | SendError::Closed { .. })
    }

    /// Whether this failed attempt counts against `retries`. A connect refused at once does
    /// not (unless retries are off): nothing was sent and nothing waited for, so the dead
    /// replicas of a service rolling out cannot use up the budget while a server not yet
    /// tried remains. Other connect failures do: an unreachable host can take seconds to
    /// say so, and a local shortage (ports, descriptors) would fail on every server alike.
    pub fn uses_a_retry(&self, retries: u32) -> bool {
        let refused =
            matches!(self, SendError::Connect { source, .. } if source.kind() == io::ErrorKind::ConnectionRefused);
        retries == 0 || !refused
    }

    /// Whether the server looks broken (counts toward passive ejection). A response
    /// timeout does: a server that accepts connections and answers nothing (hung, or
    /// overloaded past `response_timeout`) times out every request it gets (a timeout of
    /// a request sent before one it answered is not counted: see `proxy::record_failure`).
    pub fn is_server_failure(&self) -> bool {
        !matches!(self, SendError::ClientBody(_) | SendError::ClientStalled { .. }) && !self.is_local_shortage()
    }

    /// A connect that failed for want of something here, not for anything the server
    /// did: it would fail on any server alike (see `listener::local_shortage`).
    pub fn is_local_shortage(&self) -> bool {
        matches!(self, SendError::Connect { source, .. } if super::listener::local_shortage(source))
    }
}

/// A failed attempt, with the request's body handed back when none of the request was
/// written: only such a request may be sent to another server whatever its method.
#[derive(Debug)]
pub struct Failure {
    pub error: SendError,
    pub unsent: Option<ReqBody>,
}

/// A server's response, its body still on the connection, and the pool epoch the
/// connection was taken at (to return it when the body ends).
pub struct Sent {
    pub response: Response<ResponseBody>,
    pub epoch: u64,
}

/// Opens a TCP connection with `timeout`, TCP_NODELAY on.
pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, SendError> {
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(source)) => return Err(SendError::Connect { addr, source }),
        Err(_) => {
            return Err(SendError::ConnectTimeout { addr, after: timeout });
        }
    };
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// A new HTTP/1.1 connection for a request that may upgrade (WebSocket): after a 101 it
/// is handed to a tunnel, and it is never pooled. Its task ends when `kill` fires.
pub async fn open(
    addr: SocketAddr,
    timeout: Duration,
    kill: &CancellationToken,
) -> Result<SendRequest<ReqBody>, SendError> {
    let stream = connect(addr, timeout).await?;
    let (sender, conn) = http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| SendError::Failed { addr, source: io::Error::other(e) })?;
    let served = tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(server = %addr, error = %e, "upstream connection ended");
        }
    });
    abort_on_kill(served, kill);
    Ok(sender)
}

/// `kill` aborts the connection from a task of its own, woken twice in the connection's
/// life: selecting on it inside the connection's task would poll it on every wake-up,
/// that is several times per request.
fn abort_on_kill(served: tokio::task::JoinHandle<()>, kill: &CancellationToken) {
    let abort = served.abort_handle();
    let kill = kill.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = served => {}
            () = kill.cancelled() => abort.abort(),
        }
    });
}

/// RFC 9110 section 9.2.2.
pub(super) fn is_idempotent(m: &Method) -> bool {
    matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE)
}

/// Sends the request (`parts`, with the fields `added` after its own, and `body`) to
/// `server` over a pooled or new connection. The head is borrowed, so another attempt
/// needs no copy of it; on failure the body comes back in [`Failure::unsent`] exactly
/// when no byte was written.
///
/// A server may close an idle connection just as a request goes out on it (its
/// keep-alive timeout, or its shutdown): the request is written, and the connection ends
/// with no response. A request that may be sent twice (idempotent, its body empty or
/// held in the head's write) is then sent once more, on a new connection to the same
/// server; one that may not takes only a connection idle for less than
/// [`UNREPLAYABLE_IDLE_AGE`], or less for a server seen to close sooner
/// ([`Pool::unreplayable_idle_age`]).
#[allow(clippy::manual_async_fn)] // arguments kept once, not twice (see `proxy::handle`)
pub fn send(
    server: &Arc<Server>,
    request: &RequestHead<'_>,
    mut body: ReqBody,
    connect_timeout: Duration,
    response_timeout: Duration,
) -> impl Future<Output = Result<Sent, Failure>> {
    async move {
        let (addr, pool, kill) = (server.addr, &server.pool, &server.kill);
        // One reading of the clock for the first try's deadline and the pool's idle ages
        // (a later try reads it again). (tokio's clock is this one, except under
        // test-util's paused time, which no test sending uses.)
        let now = Instant::now();
        let framing = request_framing(request.parts, &body);
        // A small held body leaves in the head's write (and stays in `body` for handing back).
        let inline = matches!(
            (&body, framing),
            (ReqBody::Held { data: Some(data), trailers: None }, Framing::Length(_)) if data.len() <= INLINE_BODY
        );
        let replayable = is_idempotent(&request.parts.method) && (inline || matches!(body, ReqBody::Empty));
        let mut max_idle = if replayable { MAX_IDLE_AGE } else { pool.unreplayable_idle_age(now) };
        let mut first = true;
        loop {
            // A later try (the connection found closed) reads the clock again: one put
            // back since would seem idle for no time.
            let now = if std::mem::take(&mut first) { now } else { Instant::now() };
            let (pooled, epoch) = pool.take(now, max_idle);
            let reused = pooled.is_some();
            // How long the connection idled: a server that turns out to have closed it
            // closes idle connections that soon.
            let idle = pooled.as_ref().map_or(Duration::ZERO, |p| p.2);
            let (mut io, room) = match pooled {
                // One that may not be sent twice asks the kernel too: a server that closed
                // the connection just now would lose it (the others are sent again).
                Some((io, _, idle)) if !replayable && !open_now(&io) => {
                    pool.closed_after(idle, now);
                    drop(io);
                    continue;
                }
                Some((io, room, _)) => (io, room),
                // A server removed after its drain timeout gets nothing more: the request
                // goes back unsent (its pool was emptied when the drain began).
                None if kill.is_cancelled() => {
                    let error = SendError::Closed { addr, source: h1::removed() };
                    return Err(Failure { error, unsent: Some(body) });
                }
                // Boxed: connecting is the rare path and would otherwise size every request
                // future (kept per client connection by hyper) for it.
                // A new connection's first response may be large: full room.
                None => match Box::pin(connect(addr, connect_timeout)).await {
                    Ok(io) => (io, h1::READ_SIZE),
                    Err(error) => return Err(Failure { error, unsent: Some(body) }),
                },
            };
            let (mut wrote, mut heard) = (false, false);
            let (inlined, upload) = match &mut body {
                ReqBody::Held { data: Some(data), .. } if inline => (Some(&data[..]), None),
                other => (None, Some(other)),
            };
            let outgoing = Outgoing { head: request, framing, inlined };
            let sending = Sending::new(tokio::time::Instant::from_std(now));
            // Pinned here, where it lives, rather than moved into `exchange_until` and pinned
            // again there: a second copy (400 bytes) of it in this future and a move less.
            let result = {
                let exchange =
                    std::pin::pin!(exchange(&mut io, &outgoing, upload, room, &mut wrote, &mut heard, &sending));
                exchange_until(exchange, &sending, response_timeout, kill).await
            };
            let error = match result {
                Ok(Ok((head_in, buf, upload))) => {
                    let (status, version) = (head_in.status, head_in.version);
                    // The fields stay with the body (`h1::Fields`): the map stays empty.
                    let mut response = Response::new(ResponseBody::new(
                        io,
                        buf,
                        head_in,
                        Arc::clone(server),
                        upload,
                        response_timeout,
                    ));
                    *response.status_mut() = status;
                    *response.version_mut() = version;
                    return Ok(Sent { response, epoch });
                }
                // A pooled connection the server closed a moment ago: nothing left, try the
                // next idle (or a new) one.
                Ok(Err(Broke::Server(_))) if !wrote && reused => {
                    pool.closed_after(idle, now);
                    continue;
                }
                // Written on a reused connection the server ended without a byte of an
                // answer; the body is still whole (empty, or it went with the head). Once, on
                // a new connection (a connection's matter, not a retry: `retries` is about
                // other servers).
                Ok(Err(Broke::Server(e))) if reused && replayable && !heard => {
                    tracing::debug!(server = %addr, error = %e, "a reused connection ended unanswered; sending again on a new one");
                    pool.closed_after(idle, now);
                    max_idle = Duration::ZERO;
                    continue;
                }
                // One that may not be sent twice, written on a reused connection the server
                // ended unanswered: lost (the server may have taken it), and a sign of how
                // soon this server closes idle connections.
                Ok(Err(Broke::Server(source))) if reused && !heard => {
                    pool.closed_after(idle, now);
                    SendError::Failed { addr, source }
                }
                Ok(Err(Broke::Server(source))) if !wrote => SendError::Closed { addr, source },
                Ok(Err(Broke::Server(source))) => SendError::Failed { addr, source },
                Ok(Err(Broke::Client(e))) => SendError::ClientBody(e),
                Err(_) if sending.awaiting_client.load(Relaxed) => SendError::ClientStalled { after: response_timeout },
                Err(_) => SendError::ResponseTimeout { addr, after: response_timeout },
            };
            // Only a request none of which was written goes back.
            let unsent = (!wrote).then_some(body);
            return Err(Failure { error, unsent });
        }
    }
}

/// How an attempt's sending goes, for its response timeout: when it began, when a piece
/// of the request body last went out (nanoseconds after that), and whether the body waits
/// on the client. Atomics only so that the request's future stays `Send`: one task
/// writes and reads them.
struct Sending {
    began: tokio::time::Instant,
    body_sent_at: AtomicU64,
    awaiting_client: AtomicBool,
}

impl Sending {
    fn new(began: tokio::time::Instant) -> Sending {
        Sending { began, body_sent_at: AtomicU64::new(0), awaiting_client: AtomicBool::new(false) }
    }

    /// The upload's state after a poll that wrote `progressed` bytes.
    fn note(&self, progressed: bool, awaiting_client: bool) {
        if progressed {
            let at = tokio::time::Instant::now().saturating_duration_since(self.began);
            self.body_sent_at.store(at.as_nanos() as u64, Relaxed);
        }
        self.awaiting_client.store(awaiting_client, Relaxed);
    }

    /// When the wait for the answer began: the attempt's start, or the last piece of the
    /// body sent.
    fn since(&self) -> tokio::time::Instant {
        self.began + Duration::from_nanos(self.body_sent_at.load(Relaxed))
    }
}

/// Runs `exchange` until `response_timeout` has passed with nothing sent (from the
/// attempt's start, then from each piece of the request body sent: a long upload that
/// keeps moving is not cut, one that stops is), or until the server's `kill` fires (its
/// drain timeout ran out). Waiting on the token puts a waiter under its lock, which every
/// worker shares, and takes it out again: about 420 instructions and two trips through a
/// contended lock per request. Nearly every exchange ends well within
/// [`WATCH_KILL_AFTER`], so the wait on `kill` begins only for one still running then. A
/// draining server gets no new requests, so this matters only for a `drain_timeout` under
/// that: a stuck request is then cut no earlier than that long after it was sent.
async fn exchange_until<T>(
    mut exchange: Pin<&mut impl Future<Output = Result<T, Broke>>>,
    sending: &Sending,
    response_timeout: Duration,
    kill: &CancellationToken,
) -> Result<Result<T, Broke>, tokio::time::error::Elapsed> {
    if response_timeout > WATCH_KILL_AFTER {
        if let Ok(done) = tokio::time::timeout_at(sending.began + WATCH_KILL_AFTER, exchange.as_mut()).await {
            return Ok(done);
        }
    }
    let mut deadline = sending.began + response_timeout;
    loop {
        tokio::select! {
            biased;
            r = tokio::time::timeout_at(deadline, exchange.as_mut()) => match r {
                Err(elapsed) if sending.since() + response_timeout <= deadline => return Err(elapsed),
                Err(_) => deadline = sending.since() + response_timeout,
                done => return done,
            },
            () = kill.cancelled() => return Ok(Err(Broke::Server(h1::removed()))),
        }
    }
}

/// How the request's body is delimited towards the server: from the body as the
/// client's side decoded it, never from the client's own framing fields (a request may
/// carry both `Content-Length` and `Transfer-Encoding`; hyper decodes by the latter).
fn request_framing(parts: &Parts, body: &ReqBody) -> Framing {
    match body {
        // RFC 9110 section 8.6: a length for methods whose content means something.
        ReqBody::Empty if matches!(parts.method, Method::POST | Method::PUT | Method::PATCH) => Framing::Length(0),
        ReqBody::Empty => Framing::Empty,
        ReqBody::Held { trailers: Some(_), .. } => Framing::Chunked,
        _ => body.size_hint().exact().map_or(Framing::Chunked, Framing::Length),
    }
}

/// What goes to the server ahead of any streamed body.
struct Outgoing<'a> {
    head: &'a RequestHead<'a>,
    framing: Framing,
    /// A small held body, written with the head.
    inlined: Option<&'a [u8]>,
}

/// Writes the request (its head, then `body` framed as `framing`, unless it went with the
/// head) and reads the final response head. `wrote` turns true once any byte may have
/// reached the server, `heard` once a byte of a response has come back (after the whole
/// request is written).
///
/// The head is encoded here, for each attempt, and freed once written: kept across the
/// wait for the answer, it was a kilobyte per request in flight, which with a hundred
/// or more in flight went back and forth between the allocator's thread cache and its
/// arena.
async fn exchange(
    io: &mut TcpStream,
    out: &Outgoing<'_>,
    body: Option<&mut ReqBody>,
    first_room: usize,
    wrote: &mut bool,
    heard: &mut bool,
    sending: &Sending,
) -> Result<(Head, BytesMut, Option<Box<Upload>>), Broke> {
    let mut head = Vec::with_capacity(1024 + out.inlined.map_or(0, <[u8]>::len));
    h1::encode_head(out.head, out.framing, &mut head);
    if let Some(body) = out.inlined {
        head.extend_from_slice(body);
    }
    let first = io.write(&head).await?;
    *wrote = true;
    if first == 0 {
        return Err(io::Error::from(io::ErrorKind::WriteZero).into());
    }
    io.write_all(&head[first..]).await?;
    drop(head);
    let (framing, method) = (out.framing, &out.head.parts.method);
    let mut buf = BytesMut::new();
    let mut had_body = out.inlined.is_some_and(|b| !b.is_empty());
    if let Some(body) = body.filter(|b| !matches!(b, ReqBody::Empty)) {
        had_body = true;
        let mut upload = Upload::new(std::mem::replace(body, ReqBody::Empty), framing);
        let answered = poll_fn(|cx| {
            let before = upload.written;
            let polled = upload.poll_until_answered(io, &mut buf, method, cx);
            sending.note(upload.written != before, upload.awaiting_client && polled.is_pending());
            polled
        })
        .await?;
        if let Some(head) = answered {
            // The server answered before the whole body was sent: the rest goes on
            // while the response streams (full duplex), and the connection is not kept.
            // An error answer refuses the request (its server is not expected to read
            // the rest), and a server that stopped reading will not: either way the
            // client's connection ends with it (RFC 9112 section 9.6).
            let cuts_upload = upload.abandoned || head.status.as_u16() >= 400;
            let upload = (!upload.abandoned).then(|| Box::new(upload));
            return Ok((Head { keep_alive: false, cuts_upload, ..head }, buf, upload));
        }
    }
    let mut room = first_room;
    loop {
        if !buf.is_empty() {
            if let Some(head) = h1::final_head(&mut buf, method)? {
                // A server refusing a request may answer without reading its body, then
                // read the body as the next request on the connection (and its answer
                // would go to whoever sends next): after an error answer to a request
                // with a body the connection is not kept.
                let keep_alive = head.keep_alive && !(had_body && head.status.as_u16() >= 400);
                return Ok((Head { keep_alive, ..head }, buf, None));
            }
        }
        let read = poll_fn(|cx| h1::poll_fill_with(io, &mut buf, room, cx)).await?;
        room = h1::READ_SIZE;
        if read == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed without a response").into());
        }
        *heard = true;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::io::Write as _;

    use tokio::io::AsyncReadExt as _;

    use super::*;

    #[test]
    fn what_is_learned_of_a_servers_closing_sets_the_reuse_age_and_grows_back() {
        let pool = Pool::default();
        let t0 = Instant::now();
        let secs = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(pool.unreplayable_idle_age(t0), UNREPLAYABLE_IDLE_AGE, "nothing seen yet");
        pool.closed_after(Duration::from_millis(10), t0);
        assert_eq!(pool.unreplayable_idle_age(t0), Duration::from_millis(5));
        // A later, longer close changes nothing.
        pool.closed_after(Duration::from_millis(900), t0);
        assert_eq!(pool.unreplayable_idle_age(t0), Duration::from_millis(5));
        // Without another, it holds for 10 s, then grows back (a 32nd of the time
        // passed), up to the usual age.
        assert_eq!(pool.unreplayable_idle_age(secs(10)), Duration::from_millis(5));
        assert_eq!(pool.unreplayable_idle_age(secs(42)), Duration::from_millis(505));
        assert_eq!(pool.unreplayable_idle_age(secs(600)), UNREPLAYABLE_IDLE_AGE);
        // A request's clock behind the last close noted: no growth, not the ceiling.
        let other = Pool::default();
        other.closed_after(Duration::from_millis(10), secs(1));
        assert_eq!(other.unreplayable_idle_age(secs(1) - Duration::from_millis(20)), Duration::from_millis(5));
        // Closes far later than what was learned (a 2.5 s keep-alive after a restart
        // taught 10 ms) neither hold nor lower it: it grows on to the server's own time.
        let restarted = Pool::default();
        restarted.closed_after(Duration::from_millis(10), t0);
        for s in 5..=120 {
            restarted.closed_after(Duration::from_millis(2500), secs(s));
        }
        let age = restarted.unreplayable_idle_age(secs(120));
        assert!(age >= Duration::from_millis(700) && age <= Duration::from_millis(1300), "{age:?}");
        // A close at a usual keep-alive timeout (5 s) is not noted: it does not hold it.
        pool.closed_after(Duration::from_secs(5), secs(9));
        assert_eq!(pool.unreplayable_idle_age(secs(42)), Duration::from_millis(505));
        // A close seen again holds it: a sweep finding one idle for 300 ms, 9 s on.
        pool.closed_after(Duration::from_millis(300), secs(9));
        assert_eq!(pool.unreplayable_idle_age(secs(18)), Duration::from_millis(5));
        // A new close sets it from where it had grown to.
        pool.closed_after(Duration::from_millis(400), secs(83));
        assert_eq!(pool.unreplayable_idle_age(secs(83)), Duration::from_millis(200));
        assert_eq!(pool.unreplayable_idle_age(secs(125)), Duration::from_millis(700));
    }

    #[tokio::test]
    async fn the_kernel_knows_of_a_close_before_the_sockets_readiness_does() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let socket = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().unwrap();
        // The kernel's answer, given a moment (loopback delivers at once unless its work was
        // deferred); sleeping, not awaiting, keeps the worker from looking at the socket.
        let kernel_says_open = |socket: &TcpStream| {
            for _ in 0..100 {
                if !open_now(socket) {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            true
        };
        assert!(still_open(&socket) && open_now(&socket));
        drop(server); // its FIN
        assert!(!kernel_says_open(&socket), "the kernel has the FIN");
        assert!(still_open(&socket), "tokio's readiness lags behind it");

        // A byte a server sent unasked: not idle, and the peek leaves it for a reader.
        let mut socket = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (mut server, _) = listener.accept().unwrap();
        server.write_all(b"x").unwrap();
        assert!(!kernel_says_open(&socket));
        let mut byte = [0u8; 1];
        assert_eq!(socket.read(&mut byte).await.unwrap(), 1);
        assert_eq!(&byte, b"x");
    }
}
