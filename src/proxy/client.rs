//! Upstream HTTP/1.1 connections: a small idle pool per server, connect and response
//! timeouts, and the facts a retry decision needs.
//!
//! The pool belongs to one server, so choosing a server and choosing a connection are
//! separate steps and nothing pins a client to a server. A connection goes back to its
//! pool only when its response body has ended. Sending uses hyper's `try_send_request`,
//! which hands the request back when none of it was written: that is what makes "nothing
//! of it reached the server" a fact rather than a guess.
//!
//! A connection idle in the pool for [`PARK_AFTER`] is parked: its hyper session (task,
//! buffers, request channel: about 30 KiB) ends without closing the socket, and the bare
//! socket waits in the pool. Taking it starts a new session on it. A burst of traffic
//! thus leaves open sockets behind, not buffers.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::body::ReqBody;

/// Idle connections kept per server.
const MAX_IDLE: usize = 512;
/// Idle connections older than this are not reused (servers commonly close at 60 s+).
const MAX_IDLE_AGE: Duration = Duration::from_secs(50);
/// How long a connection idles in the pool before it is parked (see the module docs);
/// also how often [`Pool::park_idle`] should run.
pub const PARK_AFTER: Duration = Duration::from_secs(1);

/// A pooled connection's sending half.
#[derive(Debug)]
pub struct Pooled {
    sender: SendRequest<ReqBody>,
    /// Set when the pool parks the connection: its session then gives the socket back.
    park: Arc<AtomicBool>,
}

/// Idle connections of one server, sharded per worker thread: a connection is driven by
/// the worker that opened it, and reusing it from there needs no cross-thread wake-up.
#[derive(Debug, Clone)]
pub struct Pool(Arc<PoolInner>);

#[derive(Debug)]
struct PoolInner {
    shards: Box<[Mutex<Shard>]>,
    /// Raised by [`Pool::clear`]: sockets of sessions started before it are closed, not
    /// parked (the server is going away).
    epoch: AtomicU64,
}

#[derive(Debug, Default)]
struct Shard {
    /// Connections with a live session, most recently used last.
    idle: Vec<Idle>,
    /// Bare sockets of parked connections, most recently used last.
    parked: Vec<(TcpStream, Instant)>,
}

impl Shard {
    /// Whether one more idle connection may be kept.
    fn has_room(&self) -> bool {
        self.idle.len() + self.parked.len() < MAX_IDLE
    }
}

/// Whether a parked socket, parked at `since`, may still carry a request.
fn reusable(socket: &TcpStream, since: Instant) -> bool {
    since.elapsed() < MAX_IDLE_AGE && still_open(socket)
}

#[derive(Debug)]
struct Idle {
    conn: Pooled,
    since: Instant,
}

/// A connection taken from the pool.
enum Taken {
    Live(Pooled),
    Parked(TcpStream),
}

impl Default for Pool {
    fn default() -> Self {
        let shards = (0..super::workers::count()).map(|_| Mutex::default()).collect();
        Pool(Arc::new(PoolInner { shards, epoch: AtomicU64::new(0) }))
    }
}

impl Pool {
    /// This worker's shard.
    fn lock(&self) -> MutexGuard<'_, Shard> {
        let shard = &self.0.shards[super::workers::index() % self.0.shards.len()];
        shard.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// An idle connection, live ones first and the most recently used first (warm, least
    /// likely closed by the server).
    fn take(&self) -> Option<Taken> {
        let mut shard = self.lock();
        while let Some(idle) = shard.idle.pop() {
            if !idle.conn.sender.is_closed() && idle.since.elapsed() < MAX_IDLE_AGE {
                return Some(Taken::Live(idle.conn));
            }
        }
        while let Some((socket, since)) = shard.parked.pop() {
            if reusable(&socket, since) {
                return Some(Taken::Parked(socket));
            }
        }
        None
    }

    /// Returns a connection whose last response has ended.
    pub fn put(&self, conn: Pooled) {
        if conn.sender.is_closed() {
            return;
        }
        let mut shard = self.lock();
        if shard.has_room() {
            shard.idle.push(Idle { conn, since: Instant::now() });
        }
    }

    /// Parks this worker's connections idle for [`PARK_AFTER`] or longer (their sessions
    /// end and give their sockets back, see [`session`]), and closes parked sockets the
    /// server has closed or that are too old to reuse. Run on every worker, periodically.
    pub fn park_idle(&self) {
        let mut shard = self.lock();
        let keep = shard.idle.iter().position(|i| i.since.elapsed() < PARK_AFTER).unwrap_or(shard.idle.len());
        for idle in shard.idle.drain(..keep) {
            idle.conn.park.store(true, Ordering::Relaxed);
        }
        shard.parked.retain(|(socket, since)| reusable(socket, *since));
    }

    /// Keeps the socket of a parked session, unless the pool was cleared since the
    /// session began, the pool is full, or the server has closed it.
    fn keep_parked(&self, socket: TcpStream, epoch: u64) {
        if self.0.epoch.load(Ordering::Relaxed) != epoch || !still_open(&socket) {
            return;
        }
        let mut shard = self.lock();
        if shard.has_room() {
            shard.parked.push((socket, Instant::now()));
        }
    }

    /// Closes every idle connection, parked ones included (dropping a sender ends its
    /// session, which then closes its socket).
    pub fn clear(&self) {
        self.0.epoch.fetch_add(1, Ordering::Relaxed);
        for shard in &self.0.shards {
            let mut shard = shard.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            shard.idle.clear();
            shard.parked.clear();
        }
    }

    /// Idle connections: (with a live session, parked).
    pub fn idle_count(&self) -> (usize, usize) {
        self.0.shards.iter().fold((0, 0), |(live, parked), s| {
            let s = s.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            (live + s.idle.len(), parked + s.parked.len())
        })
    }
}

/// Whether the server has neither closed a parked socket nor sent anything on it. No
/// system call unless the socket's readiness says something arrived.
fn still_open(socket: &TcpStream) -> bool {
    matches!(socket.try_read(&mut [0u8; 1]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// Why an attempt failed, with what a retry decision needs to know.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("connect to {addr} failed: {source}")]
    Connect { addr: SocketAddr, source: std::io::Error },
    #[error("connect to {addr} timed out after {after:?}")]
    ConnectTimeout { addr: SocketAddr, after: Duration },
    /// The connection closed before any of the request was written.
    #[error("{addr} closed the connection before the request was sent")]
    Closed { addr: SocketAddr, source: hyper::Error },
    /// Some of the request may have reached the server; no response head came back.
    #[error("{addr} failed before responding: {source}")]
    Failed { addr: SocketAddr, source: hyper::Error },
    #[error("{addr} did not respond within {after:?}")]
    ResponseTimeout { addr: SocketAddr, after: Duration },
}

impl SendError {
    /// Whether no byte of the request reached the server.
    pub fn nothing_sent(&self) -> bool {
        matches!(self, SendError::Connect { .. } | SendError::ConnectTimeout { .. } | SendError::Closed { .. })
    }

    /// Whether sending failed because the client's request body did (its stream gave a
    /// `hyper::Error`: bad chunking, the client gone), not because of the server.
    pub fn client_body_failed(&self) -> bool {
        match self {
            SendError::Failed { source, .. } => {
                source.is_user()
                    && std::error::Error::source(source)
                        .is_some_and(|cause| cause.downcast_ref::<hyper::Error>().is_some())
            }
            _ => false,
        }
    }

    /// Whether the server looks broken (counts toward passive ejection).
    pub fn is_server_failure(&self) -> bool {
        !matches!(self, SendError::ResponseTimeout { .. })
    }
}

/// A failed attempt, with the request handed back when none of it was written: only
/// such a request may be sent to another server whatever its method.
#[derive(Debug)]
pub struct Failure {
    pub error: SendError,
    pub unsent: Option<Request<ReqBody>>,
}

/// A response and the connection it came on (to return to the pool when its body ends).
pub struct Sent {
    pub response: Response<Incoming>,
    pub conn: Pooled,
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
        .map_err(|source| SendError::Failed { addr, source })?;
    let served = tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(server = %addr, error = %e, "upstream connection ended");
        }
    });
    abort_on_kill(served, kill);
    Ok(sender)
}

/// Starts a session on `stream` (new, or parked) for the pool: when the pool parks the
/// connection, the session ends and its socket goes back to the pool. Its task ends when
/// `kill` fires.
async fn session(
    stream: TcpStream,
    addr: SocketAddr,
    pool: &Pool,
    kill: &CancellationToken,
) -> Result<Pooled, SendError> {
    let (sender, conn) = http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|source| SendError::Failed { addr, source })?;
    let park = Arc::new(AtomicBool::new(false));
    let (parked, pool, epoch) = (Arc::clone(&park), pool.clone(), pool.0.epoch.load(Ordering::Relaxed));
    let served = tokio::spawn(async move {
        // Ends once the sender is gone and no request is in flight; only a connection the
        // pool parked (idle, its last response complete) gives its socket back.
        match conn.without_shutdown().await {
            Ok(parts) if parked.load(Ordering::Relaxed) && parts.read_buf.is_empty() => {
                pool.keep_parked(parts.io.into_inner(), epoch);
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(server = %addr, error = %e, "upstream connection ended"),
        }
    });
    abort_on_kill(served, kill);
    Ok(Pooled { sender, park })
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

/// Sends `req` to the server at `addr` over a pooled or new connection. On failure the
/// request comes back in [`Failure::unsent`] exactly when no byte of it was written.
pub async fn send(
    addr: SocketAddr,
    pool: &Pool,
    kill: &CancellationToken,
    mut req: Request<ReqBody>,
    connect_timeout: Duration,
    response_timeout: Duration,
) -> Result<Sent, Failure> {
    let deadline = tokio::time::Instant::now() + response_timeout;
    let timed_out = || SendError::ResponseTimeout { addr, after: response_timeout };
    // A pooled connection may have been closed by the server a moment ago; hyper then
    // hands the request back and the next idle (or a new) connection is used.
    loop {
        let (mut conn, pooled) = match pool.take() {
            Some(Taken::Live(conn)) => (conn, true),
            // Boxed: connecting and starting sessions is the rare path and would otherwise
            // size every request future (kept per client connection by hyper) for it.
            Some(Taken::Parked(socket)) => match Box::pin(session(socket, addr, pool, kill)).await {
                Ok(conn) => (conn, true),
                Err(_) => continue,
            },
            None => {
                match Box::pin(async { session(connect(addr, connect_timeout).await?, addr, pool, kill).await }).await {
                    Ok(conn) => (conn, false),
                    Err(error) => return Err(Failure { error, unsent: Some(req) }),
                }
            }
        };
        match tokio::time::timeout_at(deadline, conn.sender.ready()).await {
            Err(_) => return Err(Failure { error: timed_out(), unsent: Some(req) }),
            Ok(Err(_)) if pooled => continue,
            Ok(Err(source)) => return Err(Failure { error: SendError::Closed { addr, source }, unsent: Some(req) }),
            Ok(Ok(())) => {}
        }
        match tokio::time::timeout_at(deadline, conn.sender.try_send_request(req)).await {
            Err(_) => return Err(Failure { error: timed_out(), unsent: None }),
            Ok(Ok(response)) => return Ok(Sent { response, conn }),
            Ok(Err(mut e)) => match e.take_message() {
                Some(unsent) if pooled => req = unsent,
                Some(unsent) => {
                    return Err(Failure {
                        error: SendError::Closed { addr, source: e.into_error() },
                        unsent: Some(unsent),
                    });
                }
                None => {
                    return Err(Failure { error: SendError::Failed { addr, source: e.into_error() }, unsent: None });
                }
            },
        }
    }
}
