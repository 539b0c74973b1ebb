//! Accepting clients: TCP, TLS, HTTP/1.1 or HTTP/2 (by ALPN), and graceful shutdown.
//!
//! Each connection is one task. The listener takes a permit from the connection limit
//! before it accepts, so past `max_connections` new clients wait in the kernel backlog
//! (never a reset) while the admin listener, which has its own runtime, keeps answering.
//! On shutdown every connection is told to finish: HTTP/1.1 ends after the response in
//! progress (with `Connection: close`), HTTP/2 gets GOAWAY.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Conn;
use crate::config::Limits;
use crate::gateway::Gateway;
use crate::metrics::OpenConnection;
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

/// Binds a listener with a deep accept backlog.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// Accepts until shutdown; each connection runs in its own tracked task.
pub async fn serve(listener: TcpListener, kind: Kind, shared: Shared) {
    let local = listener.local_addr().ok();
    loop {
        let permit = tokio::select! {
            () = shared.shutdown.cancelled() => break,
            p = Arc::clone(&shared.permits).acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let (stream, peer) = tokio::select! {
            () = shared.shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (kind, shared2) = (kind.clone(), shared.clone());
        let local = stream.local_addr().ok().or(local).unwrap_or(peer);
        shared.tracker.spawn(async move {
            let _permit = permit;
            connection(stream, peer, local, kind, shared2).await;
        });
    }
    tracing::debug!(listener = ?local, "listener closed");
}

async fn connection(stream: TcpStream, peer: SocketAddr, local: SocketAddr, kind: Kind, shared: Shared) {
    let _ = stream.set_nodelay(true);
    let metrics = &shared.gw.metrics;
    let _open = OpenConnection::new(metrics);
    let limits = shared.gw.snapshot().proxy.limits.clone();
    match kind {
        Kind::Plain => {
            let conn = Arc::new(Conn::new(peer, local, false, None));
            serve_http(stream, conn, false, &limits, &shared).await;
        }
        Kind::Tls(config) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(config.load_full());
            let tls = match tokio::time::timeout(limits.tls_handshake_timeout, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    metrics.tls_handshake_errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    metrics.tls_handshake_errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            metrics.tls_handshakes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let (_, session) = tls.get_ref();
            let alpn = session.alpn_protocol().map(<[u8]>::to_vec);
            if alpn.as_deref() == Some(ACME_TLS_ALPN) {
                // RFC 8737 section 3: the handshake was the answer; nothing else is served.
                return;
            }
            let sni = session.server_name().map(str::to_string);
            let conn = Arc::new(Conn::new(peer, local, true, sni.as_deref()));
            serve_http(tls, conn, alpn.as_deref() == Some(b"h2"), &limits, &shared).await;
        }
    }
}

/// Serves HTTP/1.1 (with upgrades) or HTTP/2 on an accepted connection until it ends or
/// shutdown asks it to finish.
async fn serve_http<I>(io: I, conn: Arc<Conn>, h2: bool, limits: &Limits, shared: &Shared)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let gw = Arc::clone(&shared.gw);
    let service = service_fn(move |req| {
        let (gw, conn) = (Arc::clone(&gw), Arc::clone(&conn));
        async move { Ok::<_, Infallible>(super::handle(gw, conn, req).await) }
    });
    let io = TokioIo::new(io);
    let shutdown = &shared.shutdown;
    let result = if h2 {
        let mut builder = http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .enable_connect_protocol()
            .max_concurrent_streams(256)
            .max_header_list_size(limits.max_header_bytes as u32)
            .keep_alive_interval(Some(limits.idle_timeout / 2))
            .keep_alive_timeout(Duration::from_secs(20));
        let conn = builder.serve_connection(io, service);
        tokio::pin!(conn);
        tokio::select! {
            res = conn.as_mut() => res,
            () = shutdown.cancelled() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        }
    } else {
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .max_buf_size(limits.max_header_bytes.max(8192))
            .max_header_size(limits.max_header_bytes)
            .keep_alive(true);
        let conn = builder.serve_connection(io, service).with_upgrades();
        tokio::pin!(conn);
        tokio::select! {
            res = conn.as_mut() => res,
            () = shutdown.cancelled() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "client connection ended with an error");
    }
}
