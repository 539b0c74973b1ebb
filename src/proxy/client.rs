//! Upstream HTTP/1.1 connections: a small idle pool per server, connect and response
//! timeouts, and the facts a retry decision needs.
//!
//! The pool belongs to one server, so choosing a server and choosing a connection are
//! separate steps and nothing pins a client to a server. A connection goes back to its
//! pool only when its response body has ended. Sending uses hyper's `try_send_request`,
//! which hands the request back when none of it was written: that is what makes "nothing
//! of it reached the server" a fact rather than a guess.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::body::ReqBody;

/// The sending half of an upstream connection.
pub type SendRequestHandle = SendRequest<ReqBody>;

/// Idle connections kept per server.
const MAX_IDLE: usize = 512;
/// Idle connections older than this are not reused (servers commonly close at 60 s+).
const MAX_IDLE_AGE: Duration = Duration::from_secs(50);

/// Idle connections of one server, sharded per worker thread: a connection is driven by
/// the worker that opened it, and reusing it from there needs no cross-thread wake-up.
#[derive(Debug)]
pub struct Pool {
    shards: Box<[Mutex<Vec<Idle>>]>,
}

impl Default for Pool {
    fn default() -> Self {
        Pool { shards: (0..super::workers::count()).map(|_| Mutex::default()).collect() }
    }
}

#[derive(Debug)]
struct Idle {
    sender: SendRequest<ReqBody>,
    since: Instant,
}

impl Pool {
    /// This worker's shard.
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        let shard = &self.shards[super::workers::index() % self.shards.len()];
        shard.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A live idle connection, most recently used first (warm, least likely closed).
    fn take(&self) -> Option<SendRequest<ReqBody>> {
        let mut idle = self.lock();
        while let Some(conn) = idle.pop() {
            if !conn.sender.is_closed() && conn.since.elapsed() < MAX_IDLE_AGE {
                return Some(conn.sender);
            }
        }
        None
    }

    /// Returns a connection whose last response has ended.
    pub fn put(&self, sender: SendRequest<ReqBody>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.lock();
        if idle.len() < MAX_IDLE {
            idle.push(Idle { sender, since: Instant::now() });
        }
    }

    /// Closes every idle connection (dropping a sender ends its connection task).
    pub fn clear(&self) {
        for shard in &self.shards {
            shard.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clear();
        }
    }

    pub fn idle_count(&self) -> usize {
        self.shards.iter().map(|s| s.lock().unwrap_or_else(std::sync::PoisonError::into_inner).len()).sum()
    }
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
    pub sender: SendRequest<ReqBody>,
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

/// A new HTTP/1.1 connection whose task ends when `kill` fires. With `upgrades` it can be
/// handed to a tunnel after a 101 (such a connection is never pooled).
pub async fn open(
    addr: SocketAddr,
    timeout: Duration,
    kill: &CancellationToken,
    upgrades: bool,
) -> Result<SendRequest<ReqBody>, SendError> {
    let stream = connect(addr, timeout).await?;
    let (sender, conn) = http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|source| SendError::Failed { addr, source })?;
    let served = tokio::spawn(async move {
        let result = if upgrades { conn.with_upgrades().await } else { conn.await };
        if let Err(e) = result {
            tracing::debug!(server = %addr, error = %e, upgrades, "upstream connection ended");
        }
    });
    // `kill` aborts the connection from a task of its own, woken twice in the connection's
    // life: selecting on it inside the connection's task would poll it on every wake-up,
    // that is several times per request.
    let abort = served.abort_handle();
    let kill = kill.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = served => {}
            () = kill.cancelled() => abort.abort(),
        }
    });
    Ok(sender)
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
        let (mut sender, pooled) = match pool.take() {
            Some(s) => (s, true),
            // Boxed: connecting is the rare path and would otherwise size every request
            // future (kept per client connection by hyper) for it.
            None => match Box::pin(open(addr, connect_timeout, kill, false)).await {
                Ok(s) => (s, false),
                Err(error) => return Err(Failure { error, unsent: Some(req) }),
            },
        };
        match tokio::time::timeout_at(deadline, sender.ready()).await {
            Err(_) => return Err(Failure { error: timed_out(), unsent: Some(req) }),
            Ok(Err(_)) if pooled => continue,
            Ok(Err(source)) => return Err(Failure { error: SendError::Closed { addr, source }, unsent: Some(req) }),
            Ok(Ok(())) => {}
        }
        match tokio::time::timeout_at(deadline, sender.try_send_request(req)).await {
            Err(_) => return Err(Failure { error: timed_out(), unsent: None }),
            Ok(Ok(response)) => return Ok(Sent { response, sender }),
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
