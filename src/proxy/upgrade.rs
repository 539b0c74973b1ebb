//! Tunnels: HTTP/1.1 `Upgrade` (WebSocket over ws and wss) and RFC 8441 extended CONNECT
//! over HTTP/2, both carried to the server as an HTTP/1.1 Upgrade on a connection of its
//! own (never pooled).
//!
//! The tunnel holds its server's in-flight guard for its whole life, so a draining
//! server waits for it, and ends when the server's `kill` token fires at drain timeout.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Version};
use hyper_util::rt::TokioIo;
use rand::Rng;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::body::{ClientBody, RefusedBody, ReqBody, RespBody};
use super::error::ProxyError;
use super::{
    AccessLog, Conn, Pending, access_log_enabled, choose, client, forwarded, hop, record_failure, record_success,
    with_rng,
};
use crate::gateway::Gateway;
use crate::route;
use crate::snapshot::{Route, Snapshot};
use crate::upstream::{InFlight, Server};

/// An HTTP/1.1 request asking to switch to WebSocket (RFC 9110 section 7.8, RFC 6455).
/// Any other `Upgrade` (h2c, say) is ignored, as RFC 9110 lets a server do: the request is
/// proxied as an ordinary one, its `Upgrade` removed with the other hop-by-hop fields. A
/// tunnel to any protocol a server would switch to would carry requests past the
/// gateway's forwarding headers (h2c smuggling).
pub fn is_h1_upgrade(req: &Request<ClientBody>) -> bool {
    // `Upgrade` first: most requests have none, and then nothing else is looked at.
    req.version() == Version::HTTP_11 && lists_websocket(req.headers()) && hop::connection_has(req.headers(), "upgrade")
}

/// Whether the `Upgrade` fields name WebSocket.
fn lists_websocket(headers: &hyper::HeaderMap) -> bool {
    headers.get_all(header::UPGRADE).iter().any(|v| hop::has_token(v.as_bytes(), "websocket"))
}

pub async fn proxy(
    gw: &Arc<Gateway>,
    snap: &Snapshot,
    conn: &Conn,
    route: &Arc<Route>,
    mut req: Request<ClientBody>,
    authority: &HeaderValue,
    start: Instant,
) -> Result<Response<RespBody>, ProxyError> {
    let extended_connect = req.method() == Method::CONNECT;
    if extended_connect {
        let p = req.extensions().get::<hyper::ext::Protocol>().map(|p| p.as_str().to_string()).unwrap_or_default();
        if !p.eq_ignore_ascii_case("websocket") {
            let err = ProxyError::BadRequest("extended CONNECT supports :protocol websocket only");
            AccessLog::write_refusal(&req, &err, start);
            return Err(err);
        }
    }
    let client_side = hyper::upgrade::on(&mut req);
    // HTTP/1.1: the connection becomes the tunnel, which keeps its hold on the listener.
    let handover = req.extensions_mut().remove::<super::listener::Handover>();
    // HTTP/2: the tunnel is one of the connection's streams, open (for its idle timeout)
    // until it closes.
    let stream = req.extensions_mut().remove::<super::activity::TunnelStream>();
    let upstream_req = match build_request(snap, conn, route, &req, authority, extended_connect) {
        Ok(upstream_req) => upstream_req,
        Err(why) => {
            let err = ProxyError::BadRequest(why);
            AccessLog::write_refusal(&req, &err, start);
            return Err(err);
        }
    };
    // The access-log line: written when the tunnel closes (its duration and the bytes the
    // client got through it), when the server answers without switching, or with the
    // gateway's own status; 499 should the client go before any of these.
    let mut log = Pending {
        log: access_log_enabled().then(|| {
            let id = upstream_req.headers().get(&forwarded::X_REQUEST_ID).cloned();
            let host = authority.to_str().unwrap_or("");
            AccessLog::new(req.method(), host, req.uri().path(), id.unwrap_or(HeaderValue::from_static("-")))
        }),
        route,
        start,
        answered: false,
    };

    let (server, guard, mut resp) = match ask(route, upstream_req).await {
        Ok(asked) => asked,
        Err(err) => return Err(log.failed(err, None).0),
    };
    gw.metrics.upgrades.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // Counted in the route's statistics once the client's answer is settled: the server's
    // status, or (through `handle`'s `local_error`) the gateway's own when it refuses it.
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        // The server said no (or answered normally): its answer is passed on as it comes,
        // however long (a page, a download, a stream).
        let (mut parts, body) = resp.into_parts();
        if hop::strip(&mut parts.headers).is_err() {
            return Err(log.failed(ProxyError::UpgradeFailed, None).0);
        }
        if !extended_connect {
            // hyper ends an HTTP/1.1 connection whose upgrade did not happen: the answer
            // says so (RFC 9112 section 9.6).
            parts.headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        route.stats.record(parts.status.as_u16(), start.elapsed());
        let body = RefusedBody::new(body, guard, log.taken(), parts.status.as_u16(), server.addr, start);
        return Ok(Response::from_parts(parts, RespBody::Refused(body)));
    }
    // RFC 9110 section 7.8: a server switches to a protocol the client asked for, here
    // WebSocket. Anything else is not tunnelled.
    if !lists_websocket(resp.headers()) {
        tracing::warn!(server = %server.addr, upgrade = ?resp.headers().get(header::UPGRADE),
            "server answered a WebSocket upgrade with 101 to another protocol (or none); not tunnelled");
        return Err(log.failed(ProxyError::UpgradeFailed, None).0);
    }
    if hop::strip(resp.headers_mut()).is_err() {
        return Err(log.failed(ProxyError::UpgradeFailed, None).0);
    }
    route.stats.record(resp.status().as_u16(), start.elapsed());
    let server_side = hyper::upgrade::on(&mut resp);
    let kill = server.kill.clone();
    let addr = server.addr;
    let log = log.taken();
    // What the client is answered: HTTP/2's extended CONNECT gets a 200.
    let status = if extended_connect { 200 } else { 101 };
    gw.tunnels.spawn(async move {
        let _in_flight = guard;
        let _hold = handover;
        let _open = stream.map(super::activity::TunnelStream::open);
        // Bytes the client got through the tunnel, and whether it ended cleanly.
        let (to_client, clean) = match tokio::join!(client_side, server_side) {
            (Ok(client_io), Ok(server_io)) => {
                let mut client_io = Counted { io: TokioIo::new(client_io), written: 0 };
                let mut server_io = TokioIo::new(server_io);
                let clean = tokio::select! {
                    res = tokio::io::copy_bidirectional(&mut client_io, &mut server_io) => match res {
                        Ok(_) => true,
                        Err(e) => {
                            tracing::debug!(server = %addr, error = %e, "tunnel ended with an error");
                            false
                        }
                    },
                    () = kill.cancelled() => {
                        tracing::info!(server = %addr, "tunnel closed: server drained");
                        false
                    }
                };
                (client_io.written, clean)
            }
            (c, s) => {
                tracing::debug!(server = %addr, client_ok = c.is_ok(), server_ok = s.is_ok(), "tunnel could not start");
                (0, false)
            }
        };
        if let Some(line) = log {
            line.write(status, Some(addr), start.elapsed(), to_client, clean);
        }
    });
    let (mut parts, _) = resp.into_parts();
    if extended_connect {
        // RFC 8441 section 5: a 2xx answers the CONNECT; the key/accept exchange is h1's.
        parts.status = StatusCode::OK;
        parts.headers.remove(header::SEC_WEBSOCKET_ACCEPT);
    } else {
        parts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    }
    Ok(Response::from_parts(parts, RespBody::empty()))
}

/// Sends the Upgrade request to a server of `route` (another one, while retries last,
/// when one refuses the connection) on a connection of its own: the server, its in-flight
/// guard and its answer's head. Outcomes count toward passive ejection as any request's
/// do, and an ejected server due for a trial may take the request.
async fn ask(
    route: &Route,
    upstream_req: Request<ReqBody>,
) -> Result<(Arc<Server>, InFlight, Response<hyper::body::Incoming>), ProxyError> {
    let upstream = &route.upstream;
    let set = &upstream.set;
    let cfg = &upstream.config;
    let mut tried = Vec::new();
    // Failed connects that count against `retries` (see `SendError::uses_a_retry`).
    let mut charged = 0u32;
    let mut failed = None;
    let (server, mut sender, guard, nth, _trial) = loop {
        let Some((server, trial)) = choose(upstream, &tried) else {
            // None left to try after a failure: that failure (502), not "no server" (503).
            return Err(failed.map_or_else(|| ProxyError::NoServer(set.name.clone()), ProxyError::Upstream));
        };
        let (guard, nth) = server.begin_nth();
        let trial = trial.then(|| set.begin_trial(&server, nth));
        match client::open(server.addr, cfg.connect_timeout, &server.kill).await {
            Ok(sender) => break (server, sender, guard, nth, trial),
            Err(e) => {
                record_failure(set, &server, &e, nth);
                if e.uses_a_retry(cfg.retries) {
                    charged += 1;
                }
                if charged > cfg.retries {
                    return Err(ProxyError::Upstream(e));
                }
                tracing::debug!(server = %server.addr, error = %e, "upgrade connect failed; trying another server");
                tried.push(server.addr);
                failed = Some(e);
            }
        }
    };
    let error = match tokio::time::timeout(cfg.response_timeout, sender.send_request(upstream_req)).await {
        Ok(Ok(resp)) => {
            record_success(set, &server, nth);
            return Ok((server, guard, resp));
        }
        Ok(Err(source)) => client::SendError::Failed { addr: server.addr, source: std::io::Error::other(source) },
        Err(_) => client::SendError::ResponseTimeout { addr: server.addr, after: cfg.response_timeout },
    };
    record_failure(set, &server, &error, nth);
    Err(error.into())
}

/// A tunnel's client side, counting the bytes written to it (for the access log, however
/// the tunnel ends: `copy_bidirectional` tells only when both sides closed cleanly).
struct Counted<T> {
    io: T,
    written: u64,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let written = ready!(Pin::new(&mut this.io).poll_write(cx, buf))?;
        this.written += written as u64;
        Poll::Ready(Ok(written))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The HTTP/1.1 Upgrade request the server gets, or why the client's is bad.
fn build_request(
    snap: &Snapshot,
    conn: &Conn,
    route: &Route,
    req: &Request<ClientBody>,
    authority: &HeaderValue,
    extended_connect: bool,
) -> Result<Request<ReqBody>, &'static str> {
    let mut headers = req.headers().clone();
    hop::strip(&mut headers)?;
    if req.version() == Version::HTTP_2 {
        super::join_cookies(&mut headers);
    }
    let authority_str = authority.to_str().unwrap_or("");
    let facts = forwarded::Facts {
        peer: &conn.peer_values,
        trusted: snap.proxy.is_trusted(conn.peer.ip()),
        proto: conn.proto(),
        host: authority,
        port: route::authority_port(authority_str).unwrap_or(if conn.tls { 443 } else { 80 }),
        prefix: route.prefix_header.as_ref(),
    };
    forwarded::apply(&mut headers, &facts);
    headers.insert(header::HOST, authority.clone());
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if extended_connect && !headers.contains_key(header::SEC_WEBSOCKET_KEY) {
        headers.insert(header::SEC_WEBSOCKET_KEY, websocket_key());
    }
    let path = req.uri().path();
    let path = if route.strip_path { route::strip_prefix(path, route.prefix()) } else { path.into() };
    let target = match req.uri().query() {
        Some(q) => format!("{path}?{q}"),
        None => path.into_owned(),
    };
    let mut out = Request::new(ReqBody::Empty);
    *out.method_mut() = if extended_connect { Method::GET } else { req.method().clone() };
    *out.uri_mut() = target.parse().unwrap_or_else(|_| hyper::Uri::from_static("/"));
    *out.version_mut() = Version::HTTP_11;
    *out.headers_mut() = headers;
    Ok(out)
}

/// A fresh `Sec-WebSocket-Key`: 16 random bytes, base64 (RFC 6455 section 4.1).
fn websocket_key() -> HeaderValue {
    let bytes: [u8; 16] = with_rng(|r| r.random());
    HeaderValue::from_str(&base64(&bytes)).unwrap_or(HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="))
}

fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_matches_rfc4648_vectors() {
        assert_eq!(super::base64(b""), "");
        assert_eq!(super::base64(b"f"), "Zg==");
        assert_eq!(super::base64(b"fo"), "Zm8=");
        assert_eq!(super::base64(b"foo"), "Zm9v");
        assert_eq!(super::base64(b"foobar"), "Zm9vYmFy");
    }
}
