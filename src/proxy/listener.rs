//! Accepting clients: TCP, TLS, HTTP/1.1 or HTTP/2 (by ALPN), and graceful shutdown.
//!
//! Each connection is one task at a time (an idle HTTP/1.1 connection is handed to a
//! smaller one, see [`park`]). Past `max_connections` each accept loop holds the one
//! client it accepted until a connection ends, and the others wait in the kernel backlog
//! (never a reset), while the admin listener, which has its own runtime, keeps answering.
//! On shutdown every connection is told to finish: HTTP/1.1 ends after the response in
//! progress (with `Connection: close`), HTTP/2 gets GOAWAY.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::activity::{Activity, Expired, RequestGuard, Tracked, Watched};
use super::body::ClientBody;
use super::{Conn, front};
use crate::config::Limits;
use crate::gateway::Gateway;
use crate::tls::ACME_TLS_ALPN;

/// Plain HTTP, or TLS with a configuration that reloads may replace.
#[derive(Clone)]
pub enum Kind {
    Plain,
    Tls(Arc<ArcSwap<rustls::ServerConfig>>),
}

/// What every connection of a listener shares.
#[derive(Clone)]
pub struct Shared {
    pub gw: Arc<Gateway>,
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
    pub permits: Arc<Semaphore>,
}

/// Binds a listener with a deep accept backlog, whose connections find out when their
/// client is gone (see [`detect_dead_peers`]).
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    detect_dead_peers(&socket)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// A connection silent this long is probed ([`KEEPALIVE_PROBES`] probes,
/// [`KEEPALIVE_INTERVAL`] apart) and closed when none is answered.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
pub const KEEPALIVE_PROBES: u32 = 3;
/// Data sent to a client and not taken for this long closes its connection: a client
/// that vanished while its response streamed, or one that stopped reading it (as a
/// zero window; nginx's `send_timeout` does the same after 60 s). Linux lets this bound
/// keep-alive too (a silent connection is closed once this has passed and a probe is
/// unanswered, whatever the probe count): it is the whole probing time, so all the probes
/// go out first.
pub const UNACKED_TIMEOUT: Duration = Duration::from_secs(90);
const _: () = assert!(
    UNACKED_TIMEOUT.as_secs() >= KEEPALIVE_IDLE.as_secs() + KEEPALIVE_INTERVAL.as_secs() * KEEPALIVE_PROBES as u64
);

/// The kernel watches each client connection for a peer that is gone: TCP keep-alive
/// while it is silent, a user timeout while its data goes unacknowledged. Set on the
/// listener, as Linux gives a listener's options to every socket it accepts: no system
/// call per connection, and nothing per request (HTTP/2 keep-alive pings did this for
/// HTTP/2 alone, reading the clock and locking their state on every poll of the
/// connection; HTTP/1.1 connections had nothing). Probe spacing and the user timeout are
/// Linux's (the platform's); elsewhere keep-alive starts after the same silence and the
/// system's own probe count and retransmission limit apply.
fn detect_dead_peers(socket: &tokio::net::TcpSocket) -> std::io::Result<()> {
    let socket = socket2::SockRef::from(socket);
    let keepalive = socket2::TcpKeepalive::new().with_time(KEEPALIVE_IDLE);
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let keepalive = keepalive.with_interval(KEEPALIVE_INTERVAL).with_retries(KEEPALIVE_PROBES);
    socket.set_tcp_keepalive(&keepalive)?;
    #[cfg(any(target_os = "linux", target_os = "android"))]
    socket.set_tcp_user_timeout(Some(UNACKED_TIMEOUT))?;
    Ok(())
}

/// An HTTP/1.1 connection closed by its watchdog (`why`): a slow head is counted
/// (`swarmgate_slow_heads_total`), so that a slowloris leaves a trace.
pub(super) fn closed_by_timeout(gw: &Gateway, why: Expired) {
    tracing::debug!(?why, "HTTP/1.1 connection closed by its timeout");
    if why == Expired::SlowHead {
        gw.metrics.slow_heads.fetch_add(1, Ordering::Relaxed);
    }
}

/// Waits at the connection limit let through to the log (see `serve`).
static LIMIT_WARNINGS: crate::telemetry::Throttle = crate::telemetry::Throttle::new();

/// Whether an accept or a connect failed for want of something here (descriptors, the
/// process's or the system's; buffers; memory), not for anything its peer did. (Not
/// EADDRNOTAVAIL: out of local ports, but also an IPv6 server seen from a container
/// without IPv6, which is that server's to be ejected for.)
pub(crate) fn local_shortage(e: &std::io::Error) -> bool {
    use rustix::io::Errno;
    matches!(Errno::from_io_error(e), Some(Errno::MFILE | Errno::NFILE | Errno::NOBUFS | Errno::NOMEM))
}

/// Accept failures let through to the log (see `serve`); shared with the admin listener.
pub(crate) static ACCEPT_WARNINGS: crate::telemetry::Throttle = crate::telemetry::Throttle::new();

/// Accepts until shutdown; each connection runs in its own tracked task.
pub async fn serve(listener: TcpListener, kind: Kind, shared: Shared) {
    let local = listener.local_addr().ok();
    let shared = Arc::new(shared);
    loop {
        let (stream, peer) = tokio::select! {
            () = shared.shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning, and say so once
                    // a minute rather than at every try.
                    if ACCEPT_WARNINGS.allow(60) {
                        tracing::warn!(error = %e, "accept failed (out of file descriptors? see [limits].max_connections; more within a minute: debug)");
                    } else {
                        tracing::debug!(error = %e, "accept failed");
                    }
                    if local_shortage(&e) {
                        super::shed_idle_connections(&shared.gw);
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Taken after the accept, so that a permit given back goes to a connection that
        // is there: taken before, it could wait with another listener's (or worker's)
        // accept while this listener's clients wait in the backlog.
        let permit = match Arc::clone(&shared.permits).try_acquire_owned() {
            Ok(p) => p,
            Err(tokio::sync::TryAcquireError::Closed) => break,
            Err(tokio::sync::TryAcquireError::NoPermits) => {
                // At `max_connections` (or the open-files cap): this client waits, and
                // those behind it in the kernel's backlog.
                shared.gw.metrics.connection_limit_waits.fetch_add(1, Ordering::Relaxed);
                if LIMIT_WARNINGS.allow(60) {
                    tracing::warn!(
                        "client connections at their limit ([limits].max_connections, or the open-files limit): new clients wait (more within a minute: debug)"
                    );
                } else {
                    tracing::debug!("client connections at their limit: a new client waits");
                }
                tokio::select! {
                    () = shared.shutdown.cancelled() => break,
                    p = Arc::clone(&shared.permits).acquire_owned() => match p { Ok(p) => p, Err(_) => break },
                }
            }
        };
        // Plain and TLS connections are separate tasks, so a plain connection's task is
        // not sized for the TLS state it never has.
        let task_shared = Arc::clone(&shared);
        match &kind {
            Kind::Plain => shared.tracker.spawn(plain_connection(stream, peer, Held::new(task_shared, permit))),
            Kind::Tls(config) => {
                let config = config.load_full();
                shared.tracker.spawn(tls_connection(stream, peer, config, Held::new(task_shared, permit)))
            }
        };
    }
    tracing::debug!(listener = ?local, "listener closed");
}

/// A connection's hold on its listener, given back when the connection ends: its
/// `max_connections` permit and its count in `open_connections`. (The permit is the
/// semaphore's count itself, given back on drop: a parked connection keeps 8 bytes for
/// it, not an `OwnedSemaphorePermit`'s 16.)
struct Held {
    shared: Arc<Shared>,
}

impl Held {
    fn new(shared: Arc<Shared>, permit: OwnedSemaphorePermit) -> Self {
        permit.forget();
        let metrics = &shared.gw.metrics;
        metrics.open_connections.fetch_add(1, Ordering::Relaxed);
        metrics.connections_total.fetch_add(1, Ordering::Relaxed);
        Held { shared }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.shared.permits.add_permits(1);
        self.shared.gw.metrics.open_connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Where an HTTP/1.1 connection's [`Held`] goes when an upgrade turns it into a tunnel: the
/// tunnel keeps it, so a WebSocket counts toward `max_connections` and `open_connections`
/// for as long as it lasts. Made per hyper session and shared by the serving task, the
/// session's upgrade requests and their tunnels: the serving task leaves the hold here
/// when the session ends, and it is given back when the last of them lets go (at once,
/// when no tunnel took it).
#[derive(Clone, Default)]
pub(super) struct Handover(Arc<std::sync::Mutex<Option<Held>>>);

impl Handover {
    fn leave(self, held: Held) {
        *self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(held);
    }
}

/// A plain connection's task: set up before the task starts, so the task holds only
/// what serving needs (it lives as long as the connection).
fn plain_connection(stream: TcpStream, peer: SocketAddr, held: Held) -> impl Future<Output = ()> + Send + 'static {
    let _ = stream.set_nodelay(true);
    let conn = Arc::new(Conn::new(peer, false, None));
    serving(H1 { io: stream, conn, held }, None)
}

async fn tls_connection(stream: TcpStream, peer: SocketAddr, config: Arc<rustls::ServerConfig>, held: Held) {
    let _ = stream.set_nodelay(true);
    // A handle of its own: `held` moves on to the session once the handshake is done.
    let shared = Arc::clone(&held.shared);
    let (gw, metrics) = (&shared.gw, &shared.gw.metrics);
    let limits = gw.snapshot_guard().proxy.limits.clone();
    let handshake = async move {
        let start = tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream).await?;
        let hello = start.client_hello();
        let challenge = hello.alpn().is_some_and(|mut alpn| alpn.any(|p| p == ACME_TLS_ALPN));
        let sni = hello.server_name().map(str::to_ascii_lowercase);
        let config = match (challenge, sni) {
            (true, Some(name)) => remote_challenge(gw, &name).await.unwrap_or(config),
            _ => config,
        };
        // The rest of a full handshake is about a millisecond of key exchange and
        // signing, done at once when the stream is made. One handshake at a time per
        // worker takes that step, and only after the tasks ready now (requests of
        // established connections) have run: the others wait their turn outside the run
        // queue, so a burst of new connections delays a request by about one handshake,
        // not by every handshake queued ahead of it. The turn ends before the client's
        // answer is awaited, so a client cannot hold it. (After a HelloRetryRequest the
        // signing happens with the second ClientHello, outside the turn: rare.)
        let turn = SIGNING.with(Arc::clone).acquire_owned().await;
        tokio::task::yield_now().await;
        let accept = start.into_stream(config);
        drop(turn);
        accept.await
    };
    let tls = match tokio::time::timeout(limits.tls_handshake_timeout, handshake).await {
        Ok(Ok(tls)) => tls,
        // A client gone before the handshake ended is no failed handshake: a load
        // balancer's TCP check connects and closes, a TLS 1.3 client that only wanted
        // the handshake leaves before its session tickets are written.
        Ok(Err(e)) if is_client_gone(&e) => {
            tracing::debug!(%peer, error = %e, "client closed the connection during the TLS handshake");
            return;
        }
        Ok(Err(e)) => {
            metrics.tls_handshake_errors.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            metrics.tls_handshake_errors.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, "TLS handshake timed out");
            return;
        }
    };
    metrics.tls_handshakes.fetch_add(1, Ordering::Relaxed);
    let (_, session) = tls.get_ref();
    let h2 = match session.alpn_protocol() {
        // RFC 8737 section 3: the handshake was the answer; nothing else is served.
        Some(ACME_TLS_ALPN) => return,
        Some(b"h2") => true,
        _ => false,
    };
    let conn = Arc::new(Conn::new(peer, true, session.server_name()));
    if h2 {
        Box::pin(serve_h2(tls, conn, &limits, &shared)).await;
    } else {
        serving(H1 { io: tls, conn, held }, None).await;
    }
}

/// Whether an I/O error is the client closing or resetting the connection.
fn is_client_gone(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
    matches!(e.kind(), UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe)
}

thread_local! {
    /// A worker's turn to do a full TLS handshake's signing (see `tls_connection`).
    static SIGNING: Arc<Semaphore> = Arc::new(Semaphore::new(1));
}

/// Clustered TLS-ALPN-01: a validation for a name this replica holds no answer for (another
/// replica placed the order) is answered from the store. The lookup happens here, between
/// the ClientHello and the handshake (rustls' resolver cannot wait), and the challenge
/// certificate gets a configuration of its own for this one handshake.
async fn remote_challenge(gw: &Gateway, name: &str) -> Option<Arc<rustls::ServerConfig>> {
    // Only for names ACME certifies here: a stranger's ClientHello costs no store lookup.
    if gw.certs.has_challenge(name) || !gw.acme.wants(name) {
        return None;
    }
    let remote = gw.challenges.remote()?;
    let digest = remote.tls_alpn01(name).await?;
    let ck = match crate::acme::responder::challenge_cert(name, &digest) {
        Ok(ck) => ck,
        Err(e) => {
            tracing::warn!(name, "cannot answer a TLS-ALPN-01 validation: {e}");
            return None;
        }
    };
    tracing::info!(name, "answering a TLS-ALPN-01 validation with an answer another replica published");
    crate::tls::challenge_config(Arc::new(ck)).ok()
}

/// How long an HTTP/1.1 connection idles before it is parked (see [`park`]). A busy
/// keep-alive connection never pays for parking; a connection whose requests come further
/// apart pays a task and a read buffer per request (about a microsecond), and an idle one
/// is down to its parked size soon after its last response, even in a burst of new
/// connections.
pub(super) const PARK_AFTER: Duration = Duration::from_millis(250);

/// An HTTP/1.1 connection between requests, handed from task to task as it is parked
/// and woken.
struct H1<I> {
    io: I,
    conn: Arc<Conn>,
    held: Held,
}

/// Serves HTTP/1.1 until the connection ends, its timeouts expire (see `activity`),
/// shutdown asks it to finish (then the response in progress carries `Connection:
/// close`), or it idles for [`PARK_AFTER`]: then it is parked and this task ends.
/// `first`: the first byte of a request, read by the parked connection.
///
/// Requests without a body are served by the gateway's own reader (`front`); one it
/// leaves to hyper starts a hyper session, which serves the connection until it idles
/// and hands it back. The limits are those of the configuration in force when this
/// task starts (after the TLS handshake, or when a parked connection wakes).
///
/// (A block rather than an `async fn`, which would keep a second copy of its arguments
/// for the task's whole life.)
fn serving<I>(h: H1<I>, mut first: Option<u8>) -> impl Future<Output = ()> + Send + 'static
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let H1 { io, conn, held } = h;
    let (activity, max_head) = {
        let snapshot = held.shared.gw.snapshot_guard();
        let limits = &snapshot.proxy.limits;
        (Activity::new(Some(limits.header_read_timeout), limits.idle_timeout), limits.max_header_bytes)
    };
    let mut io = Watched::new(io, Arc::clone(&activity));
    async move {
        let watch = |park| activity.expired(park);
        let watchdog = watch(Some(PARK_AFTER));
        tokio::pin!(watchdog);
        loop {
            let ctx = front::Ctx { conn: &conn, shared: &held.shared, activity: &activity, max_head };
            match front::serve(&mut io, &ctx, watchdog.as_mut(), &watch, first.take()).await {
                front::Outcome::Closed => return,
                front::Outcome::Idle => break,
                front::Outcome::Hyper => {}
            }
            // Boxed, and over once the connection idles: a task keeps no room for a
            // session, and nothing of the session stays allocated.
            watchdog.set(watch(Some(PARK_AFTER)));
            let session = h1_session(io, &conn, max_head, &held.shared, &activity, watchdog.as_mut(), &watch);
            io = match Box::pin(session).await {
                Session::Back(io) => io,
                Session::Over(handover) => {
                    // An upgraded connection's tunnel keeps the hold until it ends.
                    handover.leave(held);
                    return;
                }
            };
            if !io.has_unread() {
                break;
            }
            // The next request began before the session ended: it is served at once
            // (its head is timed, so the watchdog does not say park).
        }
        let idle_until = activity.deadline();
        park(H1 { io: io.into_inner(), conn, held }, idle_until);
    }
}

/// Parks an idle HTTP/1.1 connection: its read buffer (or hyper's session, about 17 KiB
/// of buffers and state), its serving task (6,536 bytes with the request exchange in it,
/// 7,720 over TLS), timing state and cached peer values are let go of, and a task of its own (384
/// bytes) waits for the first byte of the next request in a one-byte stack buffer, then
/// serves it in a new serving task.
/// The connection is closed at `idle_until` (its idle timeout) or on shutdown.
fn park<I>(h: H1<I>, idle_until: Instant)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let shared = Arc::clone(&h.held.shared);
    shared.gw.metrics.connections_parked.fetch_add(1, Ordering::Relaxed);
    h.conn.peer_values.forget();
    let idle_ms = idle_until.saturating_duration_since(Instant::now()).as_millis();
    shared.tracker.spawn(parked(h, u32::try_from(idle_ms).unwrap_or(u32::MAX)));
}

/// A parked connection's task (see [`park`]), closing the connection after `idle_ms`.
///
/// Every idle connection has one, so its size is counted: tokio rounds a task up to
/// 128 bytes, and this future fits 384 with 272 bytes. Hence the milliseconds as a
/// `u32` (at most 49 days; an `Instant` is 12 bytes more), the byte read through
/// `poll_read` (tokio's `read` future is 8 bytes more), and a block rather than an
/// `async fn`, which would keep a second copy of `h`. Any of these took it to 512.
#[allow(clippy::manual_async_fn)]
fn parked<I>(mut h: H1<I>, idle_ms: u32) -> impl Future<Output = ()> + Send + 'static
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    async move {
        let mut byte = [0u8; 1];
        let read = tokio::select! {
            biased;
            read = std::future::poll_fn(|cx| {
                let mut buf = ReadBuf::new(&mut byte);
                Pin::new(&mut h.io).poll_read(cx, &mut buf).map_ok(|()| buf.filled().len())
            }) => read,
            () = h.held.shared.shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis(idle_ms.into())) => {
                tracing::debug!("HTTP/1.1 connection closed by its idle timeout");
                return;
            }
        };
        match read {
            Ok(1) => {
                let tracker = h.held.shared.tracker.clone();
                tracker.spawn(serving(h, Some(byte[0])));
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "client connection failed"),
        }
    }
}

/// How a hyper session ended.
enum Session<I> {
    /// Idle long enough to park: the socket comes back, with any bytes read past the last
    /// request.
    Back(Watched<I>),
    /// The connection is done, or an upgrade made it a tunnel, which takes its hold from
    /// here.
    Over(Handover),
}

/// One hyper session on `io`, until the connection is done or idle long enough to park.
async fn h1_session<I, W>(
    io: Watched<I>,
    conn: &Arc<Conn>,
    max_head: usize,
    shared: &Shared,
    activity: &Arc<Activity>,
    mut watchdog: Pin<&mut W>,
    watch: &impl Fn(Option<Duration>) -> W,
) -> Session<I>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    W: Future<Output = Expired>,
{
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        // Head and idle timing is ours (`activity`): hyper's one timer cannot tell a slow
        // head from an idle keep-alive connection.
        .header_read_timeout(None)
        .max_buf_size(max_head.max(8192))
        .max_header_size(max_head)
        .keep_alive(true);
    let handover = Handover::default();
    let service = tracked_service(shared, Arc::clone(conn), activity, Some(handover.clone()), None);
    let mut session = builder.serve_connection(TokioIo::new(io), service).with_upgrades();
    // Requests seen when parking began; `None` while the session serves.
    let mut parking: Option<u64> = None;
    // Shutting down: the session's grace for a next request (see `front::SHUTDOWN_GRACE`).
    let mut closing: Option<Pin<Box<tokio::time::Sleep>>> = None;
    let (requests, result) = loop {
        tokio::select! {
            res = &mut session => match parking {
                Some(requests) => break (requests, res),
                None => {
                    if let Err(e) = res {
                        session_failed(shared, &e);
                    }
                    return Session::Over(handover);
                }
            },
            () = shared.shutdown.cancelled(), if closing.is_none() && parking.is_none() => {
                // A response from now on says `Connection: close` (`tracked_service`), and
                // ends the session; an idle one ends after the grace.
                closing = Some(Box::pin(tokio::time::sleep(front::SHUTDOWN_GRACE)));
            }
            () = front::until(&mut closing) => {
                activity.set_parking(false);
                Pin::new(&mut session).graceful_shutdown();
                if let Err(e) = (&mut session).await {
                    session_failed(shared, &e);
                }
                return Session::Over(handover);
            }
            why = watchdog.as_mut() => {
                if why != Expired::Park {
                    closed_by_timeout(&shared.gw, why);
                    return Session::Over(handover); // nothing is in flight: dropping the connection closes it
                }
                if closing.is_some() {
                    // Shutting down: parked, it would be closed at once; its grace runs on.
                    watchdog.set(watch(None));
                    continue;
                }
                // Idle: hyper ends the session once its last response is flushed (at
                // once, mostly), and the shutdown it then sends is swallowed. The other
                // branches still run meanwhile: a client that stopped reading is
                // closed by the idle timeout, and shutdown is heard.
                activity.set_parking(true);
                parking = Some(activity.requests());
                Pin::new(&mut session).graceful_shutdown();
                watchdog.set(watch(None));
            }
        }
    };
    activity.set_parking(false);
    if let Err(e) = &result {
        session_failed(shared, e);
    }
    // A request that slipped in while parking was answered with `Connection: close`;
    // an upgraded session has no socket to give back.
    if result.is_err() || activity.requests() != requests {
        return Session::Over(handover);
    }
    let Some(parts) = session.into_parts() else { return Session::Over(handover) };
    let mut io = parts.io.into_inner();
    if !parts.read_buf.is_empty() {
        io.unread(&parts.read_buf);
    }
    Session::Back(io) // the rest of the session (its read buffer included) is freed here
}

/// A hyper session's end with an error. A head it could not read (one that came while
/// the session served the connection) hyper answers itself, with an empty body, before
/// its session ends with the parse error: logged and counted here as the reader's own
/// refusals are.
#[cold]
fn session_failed(shared: &Shared, e: &hyper::Error) {
    match hyper_refusal(e) {
        Some(status) => super::head_refused(&shared.gw, status, 0, e),
        None => tracing::debug!(error = %e, "client connection ended with an error"),
    }
}

/// The status hyper answered a head with, when its session ended on one it could not
/// read (hyper's `on_error`: 431 for a head over the limit, 414 for a URI over its own
/// 64 KiB, 400 for the rest); `None` for other errors, and for an HTTP/2 preface, which
/// hyper closes unanswered.
fn hyper_refusal(e: &hyper::Error) -> Option<u16> {
    if !e.is_parse() || e.is_parse_version_h2() {
        return None;
    }
    if !e.is_parse_too_large() {
        return Some(400);
    }
    // hyper's two kinds of "too large" differ only in their text.
    Some(if e.to_string() == "URI too long" { 414 } else { 431 })
}

/// The proxy service, counting each request in `activity` until its response body ends.
/// With a `handover` (HTTP/1.1), a request asking to upgrade carries it to its tunnel.
fn tracked_service(
    shared: &Shared,
    conn: Arc<Conn>,
    activity: &Arc<Activity>,
    handover: Option<Handover>,
    resets: Option<Arc<Resets>>,
) -> impl hyper::service::Service<
    hyper::Request<hyper::body::Incoming>,
    Response = hyper::Response<Tracked>,
    Error = Infallible,
    Future = impl Future<Output = Result<hyper::Response<Tracked>, Infallible>> + Send + use<>,
> + Send
+ use<> {
    let activity = Arc::clone(activity);
    // Each request's future holds both: one reference count to take per request, the
    // connection's own, rather than also the gateway's, which every worker shares.
    let held = Arc::new((Arc::clone(&shared.gw), conn, shared.tracker.clone(), resets));
    service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        let guard = RequestGuard::open(&activity);
        if let Some(handover) = &handover {
            if req.headers().contains_key(hyper::header::UPGRADE) {
                req.extensions_mut().insert(handover.clone());
            }
        } else if req.method() == hyper::Method::CONNECT {
            req.extensions_mut().insert(super::activity::TunnelStream(Arc::clone(&activity)));
        }
        if req.version() < hyper::Version::HTTP_11 || super::hop::connection_has(req.headers(), "close") {
            activity.set_closing();
        }
        let held = Arc::clone(&held);
        // HTTP/2 has no reason phrase.
        let h1 = req.version() < hyper::Version::HTTP_2;
        let head = req.method() == hyper::Method::HEAD;
        let tunnel = req.method() == hyper::Method::CONNECT;
        async move {
            let (gw, conn, tracker, resets) = &*held;
            // HTTP/2: counted as cancelled if this future is dropped (its stream reset by
            // the client) before its response.
            let cancel = resets.as_deref().map(Cancelled::watch);
            let mut resp = super::handle(gw, conn, req.map(ClientBody::Hyper), &super::h1::NO_FIELDS).await;
            if let Some(cancel) = cancel {
                cancel.answered(matches!(resp.body(), super::body::RespBody::Upstream(_)));
            }
            if head {
                // The gateway's own answers carry their text whatever the method; hyper's
                // HTTP/2 sends a body it is given even for HEAD (a protocol error for the
                // client, RFC 9110 section 9.3.2). Its length stays, as for a GET.
                if let super::body::RespBody::Local(Some(text)) = resp.body_mut() {
                    let length = hyper::header::HeaderValue::from(text.len());
                    *resp.body_mut() = super::body::RespBody::empty();
                    resp.headers_mut().insert(hyper::header::CONTENT_LENGTH, length);
                }
            }
            let shutting_down =
                || tracker.is_closed() && !tunnel && resp.status() != hyper::StatusCode::SWITCHING_PROTOCOLS;
            if h1 && (resp.body().cuts_upload() || shutting_down()) {
                // hyper ends the connection after a response whose head says so.
                resp.headers_mut().insert(hyper::header::CONNECTION, hyper::header::HeaderValue::from_static("close"));
            }
            if let Some(fields) = resp.body_mut().take_fields() {
                if let Some(reason) = fields.reason_phrase(resp.status()).filter(|_| h1) {
                    resp.extensions_mut().insert(reason);
                }
                fields.append_to(resp.headers_mut());
                // RFC 9110 section 8.6: none on a 204 (HTTP/2 clients refuse one; hyper's
                // HTTP/1.1 writer leaves it out itself).
                if resp.status() == hyper::StatusCode::NO_CONTENT {
                    resp.headers_mut().remove(hyper::header::CONTENT_LENGTH);
                }
            }
            Ok::<_, Infallible>(resp.map(|body| Tracked { body, _guard: guard }))
        }
    })
}

/// A service whose calls' futures are boxed. hyper runs each HTTP/2 stream as a task of its
/// own, and tokio moves a task's whole stage a few times over its life (the future out when
/// it completes, the output in, then out again): with the request's future (several KiB)
/// boxed, those moves copy a pointer instead.
struct BoxedCalls<S>(S);

impl<S: hyper::service::Service<R>, R> hyper::service::Service<R> for BoxedCalls<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<S::Future>>;

    fn call(&self, req: R) -> Self::Future {
        Box::pin(self.0.call(req))
    }
}

/// How long an HTTP/2 connection ended by the gateway (idle, or a reset flood) waits for its
/// client to answer the GOAWAY's PING and its open streams to end: a client that never
/// answers would otherwise hold the connection (and its descriptor) for good.
const GOAWAY_WAIT: Duration = Duration::from_secs(5);

/// Waits out an HTTP/2 connection after its graceful shutdown began: its open streams
/// get their time (a response's own timeouts, `drain_timeout` at shutdown, bound it);
/// once none is open, the client gets [`GOAWAY_WAIT`] to answer the GOAWAY, and the
/// connection is then dropped (closed).
async fn wind_down<F: Future<Output = hyper::Result<()>>>(
    mut conn: Pin<&mut F>,
    activity: &Activity,
) -> hyper::Result<()> {
    loop {
        match tokio::time::timeout(GOAWAY_WAIT, conn.as_mut()).await {
            Ok(res) => return res,
            Err(_) if !activity.is_idle() => {}
            Err(_) => {
                tracing::debug!(after = ?GOAWAY_WAIT, "HTTP/2 client did not finish after GOAWAY: closed");
                return Ok(());
            }
        }
    }
}

/// Requests an HTTP/2 client cancelled (reset their stream) before their response, per
/// connection: a client that resets stream after stream costs a server request each
/// while the stream limit never fills (CVE-2023-44487, "rapid reset"; h2 itself ends
/// only resets of streams not yet taken up).
#[derive(Debug, Default)]
struct Resets {
    cancelled: std::sync::atomic::AtomicU64,
    /// Requests a server answered: the work a client may cancel as much of. (Requests
    /// the gateway answers itself, a 404 say, cost nothing to pad a flood with.)
    forwarded: std::sync::atomic::AtomicU64,
    /// Told at each cancel: the connection's task decides.
    more: tokio::sync::Notify,
}

/// Cancels a connection may have before it is ended when there are at least as many as
/// requests its servers answered: a browser cancels some (navigation, a typeahead), and
/// a GOAWAY costs it only a new connection.
const RESET_FLOOD: u64 = 100;

static RESET_FLOOD_WARNINGS: crate::telemetry::Throttle = crate::telemetry::Throttle::new();

impl Resets {
    fn a_flood(cancelled: u64, forwarded: u64) -> bool {
        cancelled >= RESET_FLOOD && cancelled >= forwarded
    }
}

/// A request of an HTTP/2 connection until it has its response: dropped before, it is
/// counted in the connection's [`Resets`].
struct Cancelled<'a>(Option<&'a Resets>);

impl<'a> Cancelled<'a> {
    fn watch(resets: &'a Resets) -> Self {
        Cancelled(Some(resets))
    }

    /// Its response came, from a server (`forwarded`) or the gateway.
    fn answered(mut self, forwarded: bool) {
        if let Some(resets) = self.0.take() {
            if forwarded {
                resets.forwarded.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

impl Drop for Cancelled<'_> {
    fn drop(&mut self) {
        if let Some(resets) = self.0 {
            resets.cancelled.fetch_add(1, Ordering::Relaxed);
            resets.more.notify_one();
        }
    }
}

/// Serves HTTP/2 until the connection ends or shutdown sends GOAWAY.
async fn serve_h2<I>(io: I, conn: Arc<Conn>, limits: &Limits, shared: &Shared)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let stall = shared.gw.snapshot_guard().proxy.stream_stall;
    let mut builder = http2::Builder::new(super::activity::Streams { stall });
    builder
        .timer(TokioTimer::new())
        .enable_connect_protocol()
        .max_concurrent_streams(256)
        .max_header_list_size(limits.max_header_bytes as u32);
    // No keep-alive pings: the kernel finds a client that is gone (see `bind`).
    let activity = Activity::new(None, limits.idle_timeout);
    let resets = Arc::new(Resets::default());
    let service = BoxedCalls(tracked_service(shared, conn, &activity, None, Some(Arc::clone(&resets))));
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let result = loop {
        tokio::select! {
            res = conn.as_mut() => break res,
            () = shared.shutdown.cancelled() => {
                conn.as_mut().graceful_shutdown();
                break wind_down(conn.as_mut(), &activity).await;
            }
            _ = activity.expired(None) => {
                tracing::debug!(idle_timeout = ?limits.idle_timeout, "idle HTTP/2 connection closed");
                conn.as_mut().graceful_shutdown();
                break wind_down(conn.as_mut(), &activity).await;
            }
            () = resets.more.notified() => {
                let (cancelled, forwarded) = (resets.cancelled.load(Ordering::Relaxed), resets.forwarded.load(Ordering::Relaxed));
                if !Resets::a_flood(cancelled, forwarded) {
                    continue;
                }
                shared.gw.metrics.h2_reset_floods.fetch_add(1, Ordering::Relaxed);
                if RESET_FLOOD_WARNINGS.allow(60) {
                    tracing::warn!(cancelled, answered_by_servers = forwarded,
                        "HTTP/2 client cancels most of its requests (a rapid-reset flood?): connection ended with GOAWAY (more within a minute: debug)");
                } else {
                    tracing::debug!(cancelled, "HTTP/2 connection ended: most of its requests cancelled");
                }
                conn.as_mut().graceful_shutdown();
                break wind_down(conn.as_mut(), &activity).await;
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "client connection ended with an error");
    }
}

#[cfg(test)]
#[allow(clippy::expect_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_connections_watch_for_a_client_that_is_gone() {
        let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0))).expect("bind");
        let addr = listener.local_addr().expect("address");
        let _client = TcpStream::connect(addr).await.expect("connect");
        let (accepted, _) = listener.accept().await.expect("accept");
        let socket = socket2::SockRef::from(&accepted);
        assert!(socket.keepalive().expect("SO_KEEPALIVE"), "no TCP keep-alive on an accepted connection");
        assert_eq!(socket.tcp_keepalive_time().expect("TCP_KEEPIDLE"), KEEPALIVE_IDLE);
        #[cfg(any(target_os = "linux", target_os = "android"))]
        {
            assert_eq!(socket.tcp_keepalive_interval().expect("TCP_KEEPINTVL"), KEEPALIVE_INTERVAL);
            assert_eq!(socket.tcp_keepalive_retries().expect("TCP_KEEPCNT"), KEEPALIVE_PROBES);
            assert_eq!(socket.tcp_user_timeout().expect("TCP_USER_TIMEOUT"), Some(UNACKED_TIMEOUT));
        }
    }

    /// What hyper's session answers `head` with, and the status `hyper_refusal` reads
    /// from the error it ends with.
    async fn hyper_answer(head: Vec<u8>) -> (String, Option<u16>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (server, mut client) = tokio::io::duplex(256 * 1024);
        let service = service_fn(|_req| async { Ok::<_, Infallible>(hyper::Response::new(String::new())) });
        let session = http1::Builder::new().max_buf_size(256 * 1024).serve_connection(TokioIo::new(server), service);
        let talk = async {
            client.write_all(&head).await.expect("write");
            client.shutdown().await.expect("shutdown"); // a good head's session ends at its end
            let mut answer = Vec::new();
            client.read_to_end(&mut answer).await.expect("read");
            answer
        };
        let (ended, answer) = tokio::join!(session, talk);
        let status = ended.err().and_then(|e| hyper_refusal(&e));
        (String::from_utf8_lossy(&answer).into_owned(), status)
    }

    #[tokio::test]
    async fn the_status_of_hyper_s_answer_to_a_bad_head_is_known() {
        let long_uri = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "u".repeat(70 * 1024));
        let fields: String = (0..=100).map(|i| format!("X-F{i}: 1\r\n")).collect();
        let cases = [
            (b"GET /\x01 HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(), 400),
            (b"GET / HTTP/1.1\r\nBad Name: 1\r\n\r\n".to_vec(), 400),
            (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(), 0),
            (long_uri.into_bytes(), 414),
            (format!("GET / HTTP/1.1\r\n{fields}\r\n").into_bytes(), 431),
        ];
        for (head, status) in cases {
            let (answer, read) = hyper_answer(head).await;
            if status == 0 {
                assert_eq!(read, None, "no refusal for a good head: {answer}");
                continue;
            }
            assert!(answer.starts_with(&format!("HTTP/1.1 {status} ")), "{answer}");
            assert_eq!(read, Some(status), "{answer}");
        }
        // An HTTP/2 preface: closed unanswered, so nothing to log.
        let (answer, read) = hyper_answer(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec()).await;
        assert_eq!((answer.as_str(), read), ("", None));
    }
}
