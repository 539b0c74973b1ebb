//! The hot path. [`handle`] reads top to bottom in the order of the SPEC:
//!
//! 1. the target host (Host, or the URI authority), malformed requests refused (400/414);
//! 2. ACME HTTP-01 answers on plain HTTP, before anything else may redirect or route;
//! 3. 421 when TLS SNI and Host disagree; 308 to https when `redirect_https` is on;
//! 4. route lookup (404), upgrades to the tunnel path;
//! 5. header rewrite in place (hop-by-hop, X-Forwarded-*, Forwarded, X-Request-Id), path
//!    stripping, HTTP/1.1 towards the server;
//! 6. server choice and the attempt loop with safe retries (503 when none is eligible);
//! 7. the response streamed back through a body that releases the server and logs.

pub(crate) mod activity;
pub mod body;
pub mod client;
pub mod error;
pub mod forwarded;
pub mod front;
pub mod h1;
pub mod hop;
pub mod listener;
pub mod upgrade;
pub mod workers;

use std::cell::RefCell;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use rand::SeedableRng;
use rand::rngs::SmallRng;

use crate::gateway::Gateway;
use crate::metrics::RouteStats;
use crate::route;
use crate::snapshot::{Route, Snapshot};
use crate::telemetry::Throttle;
use crate::upstream::{InFlight, Server, ServerSet, Upstream, balance};
use body::{ClientBody, Prefetched, ReqBody, RespBody, UpstreamBody};
use client::SendError;
use error::ProxyError;
use forwarded::PeerValues;

thread_local! {
    static RNG: RefCell<SmallRng> = RefCell::new(SmallRng::from_rng(&mut rand::rng()));
}

/// Runs `f` with this thread's fast RNG (seeded from the OS once per thread).
pub fn with_rng<T>(f: impl FnOnce(&mut SmallRng) -> T) -> T {
    RNG.with(|r| f(&mut r.borrow_mut()))
}

/// What is known about a client connection.
#[derive(Debug)]
pub struct Conn {
    pub peer: SocketAddr,
    /// Whether it arrived over TLS.
    pub tls: bool,
    /// The TLS server name the client sent (lower case).
    pub sni: Option<Box<str>>,
    pub peer_values: PeerValues,
}

impl Conn {
    pub fn new(peer: SocketAddr, tls: bool, sni: Option<&str>) -> Self {
        Conn { peer, tls, sni: sni.map(|s| s.to_ascii_lowercase().into()), peer_values: PeerValues::new(peer.ip()) }
    }

    fn proto(&self) -> &'static str {
        if self.tls { "https" } else { "http" }
    }
}

/// Serves one request; never fails (errors become the gateway's own responses).
/// Borrowed handles: the connection's own reader calls this per request without
/// touching the shared reference counts.
///
/// `fields`: the request's fields that its map does not hold, as the client wrote them
/// (those the gateway does not read, from its own HTTP/1.1 reader; [`h1::NO_FIELDS`]
/// for a head hyper read). Borrowed rather than in the request, which each future it
/// goes through makes a copy of: 32 bytes more per copy.
///
/// This and the functions a request goes through on its way to a server return an `async
/// move` block rather than being `async fn`s: an `async fn` moves each argument into a
/// local of its own when first polled, and keeps room for both in its future. That was a
/// copy of the request (264 bytes) and of its body per level, and the HTTP/2 stream's
/// future 672 bytes larger (it is boxed: copied whole once per request).
#[allow(clippy::manual_async_fn)] // arguments kept once, not twice (see above)
pub fn handle(
    gw: &Arc<Gateway>,
    conn: &Arc<Conn>,
    mut req: Request<ClientBody>,
    fields: &h1::Fields,
) -> impl Future<Output = Response<RespBody>> {
    async move {
        let start = Instant::now();
        // A guard, not a clone: no shared reference count written per request (arc-swap
        // falls back to a full reference by itself when a thread holds many at once).
        let snap = gw.snapshot_guard();
        if !req.uri().path_and_query().is_none_or(|t| t.as_str().is_ascii()) {
            if let Err(err) = encode_non_ascii(&mut req) {
                AccessLog::write_refusal(&req, &err, start);
                return local_error(&err, &unrouted(gw), start);
            }
        }
        let dots = route::dot_segments(req.uri().path());
        if dots != route::DotSegments::None {
            if let Err(err) = resolve_dot_segments(&mut req, dots, snap.proxy.limits.max_uri_bytes) {
                AccessLog::write_refusal(&req, &err, start);
                return local_error(&err, &unrouted(gw), start);
            }
        }
        let routed = match route_request(gw, &snap, conn, &req, start) {
            Ok(routed) => routed,
            Err((err, stats)) => {
                AccessLog::write_refusal(&req, &err, start);
                return local_error(&err, &stats.unwrap_or_else(|| unrouted(gw)), start);
            }
        };
        let result = match routed {
            Routed::Forward(route, authority) => forward(gw, &snap, conn, route, req, fields, authority, start).await,
            // Boxed: hyper keeps one request future per connection, sized for its largest
            // state, and upgrades are rare; inline they would cost every idle connection
            // ~2 KiB.
            Routed::Upgrade(route, authority) => {
                Box::pin(upgrade::proxy(gw, &snap, conn, &route, req, &authority, start))
                    .await
                    .map_err(|e| (e, Some(RouteRef::Route(Arc::clone(&route.stats)))))
            }
            Routed::Acme => {
                let resp = acme_answer(gw, &req, start).await;
                AccessLog::write_own(&req, resp.status().as_u16(), own_body_bytes(&resp), start);
                Ok(resp)
            }
            Routed::Answer(resp) => {
                AccessLog::write_own(&req, resp.status().as_u16(), own_body_bytes(&resp), start);
                Ok(*resp)
            }
        };
        match result {
            Ok(resp) => resp,
            Err((err, stats)) => {
                let stats = stats.unwrap_or_else(|| unrouted(gw));
                local_error(&err, &stats, start)
            }
        }
    }
}

/// Resolves the dot-segments of the request's path (see `route::dot_segments`): it is
/// routed, logged and sent on as the path they name, as a server resolving them would
/// read it. An ambiguous one is refused. A target over `max_uri_bytes` is left as it is,
/// for its 414: resolving it first would let any length through as `/./` repeats.
#[cold]
fn resolve_dot_segments(
    req: &mut Request<ClientBody>,
    dots: route::DotSegments,
    max_uri_bytes: usize,
) -> Result<(), ProxyError> {
    if dots == route::DotSegments::Ambiguous {
        return Err(ProxyError::BadRequest("a dot-segment servers read differently (after \\, %2F or %5C, or with ;)"));
    }
    if target_too_long(req, max_uri_bytes) {
        return Ok(());
    }
    // Fewer characters of the same kinds: it parses. Should it not, the path would be
    // routed unresolved: refused instead.
    set_target(req, target(&route::remove_dot_segments(req.uri().path()), req.uri().query()))
}

/// Puts `target` (an origin-form path and query) in place of the request's own.
fn set_target(req: &mut Request<ClientBody>, target: String) -> Result<(), ProxyError> {
    let mut parts = req.uri().clone().into_parts();
    parts.path_and_query = Some(target.parse().map_err(|_| ProxyError::BadRequest("invalid request target"))?);
    *req.uri_mut() = Uri::from_parts(parts).map_err(|_| ProxyError::BadRequest("invalid request target"))?;
    Ok(())
}

/// Whether a field value begins or ends with a space or a tab.
fn padded(value: &[u8]) -> bool {
    matches!(value.first(), Some(b' ' | b'\t')) || matches!(value.last(), Some(b' ' | b'\t'))
}

/// Percent-encodes the bytes of the request's path and query that are not ASCII (a URI
/// is ASCII, RFC 3986 section 2; raw UTF-8 comes from clients that do not encode, such as
/// curl given it). Servers decode `%C3%A9` to the bytes the client meant; raw, servers and
/// log readers would each read them their own way (U+2028 and U+0085 end a line for some).
#[cold]
#[inline(never)]
fn encode_non_ascii(req: &mut Request<ClientBody>) -> Result<(), ProxyError> {
    use std::fmt::Write as _;
    let Some(raw) = req.uri().path_and_query() else { return Ok(()) };
    let mut target = String::with_capacity(raw.as_str().len() * 3);
    for &b in raw.as_str().as_bytes() {
        if b.is_ascii() {
            target.push(char::from(b));
        } else {
            let _ = write!(target, "%{b:02X}");
        }
    }
    set_target(req, target)
}

/// Whether the request's path and query are over `max_uri_bytes` (a 414).
fn target_too_long(req: &Request<ClientBody>, max_uri_bytes: usize) -> bool {
    req.uri().path_and_query().map_or(0, |p| p.as_str().len()) > max_uri_bytes
}

/// An origin-form request target: `path`, and `?query` if there is one.
fn target(path: &str, query: Option<&str>) -> String {
    match query {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    }
}

fn unrouted(gw: &Arc<Gateway>) -> RouteRef {
    RouteRef::Gateway(Arc::clone(gw))
}

/// Where a request's statistics go: its route, or the gateway's "no route" bucket.
enum RouteRef {
    Route(Arc<RouteStats>),
    Gateway(Arc<Gateway>),
}

impl RouteRef {
    fn stats(&self) -> &RouteStats {
        match self {
            RouteRef::Route(r) => r,
            RouteRef::Gateway(g) => &g.metrics.unrouted,
        }
    }
}

type Failure = (ProxyError, Option<RouteRef>);

/// Where a request goes, decided from its head alone (the awaiting is `handle`'s: one
/// future fewer for every request to go through).
enum Routed {
    /// To a server of this route, as this authority.
    Forward(Arc<Route>, HeaderValue),
    /// Through a tunnel (a WebSocket upgrade, an extended CONNECT) to a server of this route.
    Upgrade(Arc<Route>, HeaderValue),
    /// To the HTTP-01 challenges' answers.
    Acme,
    /// The gateway's own answer (a redirect to HTTPS). Boxed: rare, and `handle`'s future
    /// keeps room for this whole enum while the request is forwarded.
    Answer(Box<Response<RespBody>>),
}

fn route_request(
    gw: &Arc<Gateway>,
    snap: &Snapshot,
    conn: &Conn,
    req: &Request<ClientBody>,
    start: Instant,
) -> Result<Routed, Failure> {
    let limits = &snap.proxy.limits;
    let authority = request_authority(req).map_err(|e| (e, None))?;
    // RFC 9112 section 6.1: a transfer coding the gateway does not undo (gzip, chunked) is
    // a 501; passed on as plain chunked, the server would take the coded bytes for the
    // content. (hyper reads only heads whose last coding is chunked.)
    // (The gateway's own reader leaves any request with Transfer-Encoding to hyper, and
    // HTTP/2 has none.)
    // The field count HTTP/1.1 heads are held to (hyper's and the own reader's limit),
    // for HTTP/2 too, where only the list's size is (`max_header_bytes`); an HTTP/2
    // client's cookie crumbs count as the one field they are joined into.
    if req.headers().len() > h1::MAX_HEADERS {
        let crumbs = req.headers().get_all(header::COOKIE).iter().count();
        if req.headers().len() - crumbs.saturating_sub(1) > h1::MAX_HEADERS {
            return Err((ProxyError::HeadTooLarge, None));
        }
    }
    // RFC 9113 section 8.2.1: an HTTP/2 field value beginning or ending with a space or
    // tab makes the request malformed (HTTP/1.1's grammar has no room for one, so a
    // server would read another value than the gateway passed on). The h2 crate lets it by.
    if req.version() == Version::HTTP_2 && req.headers().values().any(|v| padded(v.as_bytes())) {
        return Err((ProxyError::BadRequest("a field value beginning or ending with whitespace"), None));
    }
    if matches!(req.body(), ClientBody::Hyper(_)) && req.version() <= Version::HTTP_11 {
        let codings = req.headers().get_all(header::TRANSFER_ENCODING);
        match codings.iter().map(|v| hop::chunked_codings(v.as_bytes())).sum::<Option<usize>>() {
            None => return Err((ProxyError::UnsupportedCoding, None)),
            // Decoded once, a second layer would reach the server as content.
            Some(n) if n > 1 => return Err((ProxyError::BadRequest("chunked applied more than once"), None)),
            Some(_) => {}
        }
    }
    // RFC 9112 section 3.2.4: the asterisk-form is a server-wide OPTIONS's alone.
    if req.uri().path() == "*" && req.method() != Method::OPTIONS {
        return Err((ProxyError::BadRequest("asterisk-form request target outside OPTIONS"), None));
    }
    // A plain CONNECT: swarmgate is no forward proxy (on the plain port too, where a
    // redirect to https would be no answer to it).
    if req.method() == Method::CONNECT && req.extensions().get::<hyper::ext::Protocol>().is_none() {
        return Err((ProxyError::MethodNotAllowed("CONNECT"), None));
    }
    let authority_str = authority.to_str().unwrap_or("");
    if target_too_long(req, limits.max_uri_bytes) {
        return Err((ProxyError::UriTooLong(limits.max_uri_bytes), None));
    }
    if !conn.tls {
        if snap.proxy.acme_http01 && req.uri().path().starts_with(crate::acme::HTTP01_PREFIX) {
            return Ok(Routed::Acme);
        }
        // Not a request a trusted proxy says it took over HTTPS: that would loop.
        let came_over_https = || snap.proxy.is_trusted(conn.peer.ip()) && forwarded::Said::https(req.headers());
        if snap.proxy.redirect_https && !came_over_https() {
            if let Some(port) = snap.proxy.https_port {
                return Ok(Routed::Answer(Box::new(redirect(gw, req, authority_str, port, start))));
            }
        }
    }
    let host = route::normalize_host(authority_str);
    if let Some(sni) = &conn.sni {
        if **sni != *host {
            return Err((ProxyError::Misdirected, None));
        }
    }
    let Some(route) = snap.router.lookup(&host, req.uri().path()) else {
        return Err((ProxyError::NoRoute, None));
    };
    let route = Arc::clone(route);
    if req.method() == Method::CONNECT {
        return Ok(Routed::Upgrade(route, authority)); // extended CONNECT (see above)
    }
    if upgrade::is_h1_upgrade(req) {
        // A WebSocket handshake is a GET without content (RFC 6455 section 4.1); a body the
        // server would have to read before the switch (RFC 9110 section 7.8) has no place
        // in a tunnel, whose first bytes the server would take for it.
        let has_body = match req.body() {
            ClientBody::Empty => false,
            ClientBody::Hyper(body) => !http_body::Body::is_end_stream(body),
        };
        if has_body {
            return Err((
                ProxyError::BadRequest("an upgrade request with a body"),
                Some(RouteRef::Route(Arc::clone(&route.stats))),
            ));
        }
        return Ok(Routed::Upgrade(route, authority));
    }
    Ok(Routed::Forward(route, authority))
}

/// Rewrites the request, reads the start of its body, sends it (with safe retries) and
/// turns the answer into the client's response.
///
/// Not boxed (about 2.2 KiB): the futures it is part of live while a request is served,
/// and a connection that idles for `listener::PARK_AFTER` ends them (its serving task, or
/// the hyper session whose in-flight slot is sized for it), so idle connections keep no
/// room for it. A box was an allocation and a copy of it per request.
#[allow(clippy::too_many_arguments)] // what one request's future holds; a struct of them would be moved in whole
#[allow(clippy::manual_async_fn)] // arguments kept once, not twice (see `proxy::handle`)
fn forward(
    gw: &Arc<Gateway>,
    snap: &Snapshot,
    conn: &Conn,
    route: Arc<Route>,
    req: Request<ClientBody>,
    fields: &h1::Fields,
    authority: HeaderValue,
    start: Instant,
) -> impl Future<Output = Result<Response<RespBody>, Failure>> {
    // Split before the block: the block keeps what it captures for its whole life, and
    // would hold the request twice (whole, and in parts).
    let (mut parts, body) = req.into_parts();
    async move {
        let stats = || Some(RouteRef::Route(Arc::clone(&route.stats)));
        let limits = &snap.proxy.limits;
        let authority_str = authority.to_str().unwrap_or("");
        let forwarding = match rewrite_request(snap, conn, &route, &mut parts, &body, fields, &authority) {
            Ok(forwarding) => forwarding,
            Err(why) => {
                let err = ProxyError::BadRequest(why);
                AccessLog::write_refusal(&Request::from_parts(parts, ()), &err, start);
                return Err((err, stats()));
            }
        };
        // Written when the response ends; or with the gateway's own status when it
        // answers instead; or, should the client go before either (this future dropped),
        // as 499 "client closed request".
        let mut log = Pending {
            log: access_log_enabled()
                .then(|| AccessLog::new(&parts.method, authority_str, parts.uri.path(), forwarding.request_id.clone())),
            route: &route,
            start,
            answered: false,
        };
        let wait = route.upstream.config.response_timeout;
        let body = match body::prefetch(body, limits.retry_body_bytes, wait).await {
            Prefetched::Body(b) => b,
            Prefetched::Stalled => {
                tracing::debug!(after = ?wait, "the client sent none of its request body");
                return Err(log.failed(ProxyError::BodyTimeout, stats()));
            }
            Prefetched::Malformed(e) if body::client_went_away(&e) => {
                tracing::debug!(error = %e, "the client went away while it sent its request body");
                return Err(log.failed(ProxyError::ClientClosed, stats()));
            }
            Prefetched::Malformed(e) => {
                tracing::debug!(error = %e, "malformed request body");
                return Err(log.failed(ProxyError::BadRequest("malformed body"), stats()));
            }
        };
        let head = h1::RequestHead { parts: &parts, fields, added: &forwarding.fields };
        let sent = match attempts(gw, &route, &head, body, log.log.as_deref_mut()).await {
            Ok(sent) => sent,
            Err(e) => return Err(log.failed(e, stats())),
        };
        let log = log.taken();
        Ok(respond(sent, route, start, log))
    }
}

/// RFC 9113 section 8.2.3: an HTTP/2 client may send its cookies as several `cookie`
/// fields (browsers do, for header compression); they are joined with "; " before the
/// request goes on as HTTP/1.1, where a server may keep only one or join them with ",".
pub(super) fn join_cookies(headers: &mut hyper::HeaderMap) {
    let mut cookies = headers.get_all(header::COOKIE).iter();
    if cookies.next().is_none() || cookies.next().is_none() {
        return;
    }
    let joined: Vec<&[u8]> = headers.get_all(header::COOKIE).iter().map(HeaderValue::as_bytes).collect();
    if let Ok(value) = HeaderValue::from_bytes(&joined.join(&b"; "[..])) {
        headers.insert(header::COOKIE, value);
    }
}

/// The host the request is for: the URI authority (HTTP/2, or HTTP/1.1 absolute-form,
/// RFC 9112 section 3.2.2), else the one `Host` header an HTTP/1.1 request must carry.
fn request_authority(req: &Request<ClientBody>) -> Result<HeaderValue, ProxyError> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let first = hosts.next();
    if hosts.next().is_some() {
        return Err(ProxyError::BadRequest("more than one Host header"));
    }
    // RFC 9112 section 3.2: an HTTP/1.1 request without Host is refused, whatever its
    // target names (an HTTP/2 request names its authority in `:authority`).
    if first.is_none() && req.version() == Version::HTTP_11 {
        return Err(ProxyError::BadRequest("missing Host header"));
    }
    if let Some(auth) = req.uri().authority() {
        // The authority-form (`host:port`) is CONNECT's alone (RFC 9112 section 3.2.3).
        if req.uri().scheme().is_none() && req.method() != Method::CONNECT {
            return Err(ProxyError::BadRequest("authority-form request target"));
        }
        // An `ftp://` URL, say, names nothing the gateway serves.
        if let Some(scheme) = req.uri().scheme_str() {
            if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
                return Err(ProxyError::BadRequest("a request target of a scheme other than http or https"));
            }
        }
        if !valid_authority(auth.as_str()) {
            return Err(ProxyError::BadRequest("invalid authority"));
        }
        return HeaderValue::from_str(auth.as_str()).map_err(|_| ProxyError::BadRequest("invalid authority"));
    }
    match first {
        Some(h) if !h.is_empty() && h.to_str().is_ok_and(valid_authority) => Ok(h.clone()),
        Some(_) => Err(ProxyError::BadRequest("invalid Host header")),
        None if req.version() == Version::HTTP_10 => Ok(HeaderValue::from_static("")),
        None => Err(ProxyError::BadRequest("missing Host header")),
    }
}

/// `host[:port]`: the characters RFC 3986 allows in a reg-name or IP literal (so no
/// userinfo, which RFC 9110 section 4.2.4 makes an error), and a port, if any, of digits
/// up to 65535. One pass over the bytes: asked of every request.
#[doc(hidden)] // public for the fuzz targets
pub fn valid_authority(s: &str) -> bool {
    /// The bytes of a reg-name or an IPv4 address, and the `:` before a port (an IP
    /// literal's brackets are looked at apart).
    const HOST: [bool; 256] = {
        let mut t = [false; 256];
        let mut i = 0;
        while i < 256 {
            let b = i as u8;
            t[i] = b.is_ascii_alphanumeric()
                || matches!(b, b'-' | b'.' | b'_' | b'~' | b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*')
                || matches!(b, b'+' | b',' | b';' | b'=' | b':' | b'%');
            i += 1;
        }
        t
    };
    let bytes = s.as_bytes();
    // `[IP literal]` and what follows it, or a name with no brackets (and no `:` but the
    // port's: `app.test:80:80` is no authority).
    let (host, rest, literal) = match bytes.split_first() {
        Some((b'[', literal)) => match literal.iter().position(|&b| b == b']') {
            Some(end) => (&literal[..end], &literal[end + 1..], true),
            None => return false,
        },
        _ => match bytes.iter().rposition(|&b| b == b':') {
            Some(colon) => (&bytes[..colon], &bytes[colon..], false),
            None => (bytes, &[][..], false),
        },
    };
    let port = match rest {
        [] => &[][..],
        [b':', port @ ..] => port,
        _ => return false,
    };
    host.iter().all(|&b| HOST[usize::from(b)] && (literal || b != b':'))
        && port.len() <= 5
        && port.iter().all(u8::is_ascii_digit)
        && port.iter().fold(0u32, |n, &d| n * 10 + u32::from(d - b'0')) <= 65_535
}

/// Edits the request into what the server gets; returns the forwarding fields it gets on
/// top of its own (written with the head, see `forwarded`), or why the request is bad.
fn rewrite_request(
    snap: &Snapshot,
    conn: &Conn,
    route: &Route,
    req: &mut http::request::Parts,
    body: &ClientBody,
    fields: &h1::Fields,
    authority: &HeaderValue,
) -> Result<forwarded::Forwarding, &'static str> {
    let authority_str = authority.to_str().unwrap_or("");
    // The gateway's own reader leaves hop-by-hop fields out as it reads (and puts `TE:
    // trailers` back itself); hyper's heads are stripped here.
    let wants_trailers = match body {
        ClientBody::Empty => {
            debug_assert!(
                !req.headers.keys().any(|n| n != header::TE && hop::fixed(n.as_str().as_bytes()).is_some())
                    && !fields.iter().any(|(n, _)| hop::fixed(n).is_some()),
                "hop-by-hop fields in a head from the own reader: {:?} {fields:?}",
                req.headers
            );
            false
        }
        ClientBody::Hyper(_) => hop::strip(&mut req.headers)?,
    };
    let headers = &mut req.headers;
    headers.remove(header::EXPECT); // 100-continue was handled with the client
    let port = route::authority_port(authority_str).unwrap_or(if conn.tls { 443 } else { 80 });
    let facts = forwarded::Facts {
        peer: &conn.peer_values,
        trusted: snap.proxy.is_trusted(conn.peer.ip()),
        proto: conn.proto(),
        host: authority,
        port,
        prefix: route.prefix_header.as_ref(),
    };
    let forwarding = forwarded::forwarding(headers, &facts);
    if wants_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if !headers.contains_key(header::HOST) || req.uri.authority().is_some() {
        req.headers.insert(header::HOST, authority.clone());
    }
    if req.version == Version::HTTP_2 {
        join_cookies(&mut req.headers);
    }
    req.version = Version::HTTP_11;
    let needs_new_uri = route.strip_path || req.uri.scheme().is_some() || req.uri.authority().is_some();
    if needs_new_uri {
        let path = req.uri.path();
        let path = if route.strip_path { route::strip_prefix(path, route.prefix()) } else { path.into() };
        if let Ok(uri) = target(&path, req.uri.query()).parse::<Uri>() {
            req.uri = uri;
        }
    }
    Ok(forwarding)
}

/// Picks a server and sends, retrying on another server only when that is safe.
#[allow(clippy::manual_async_fn)] // arguments kept once, not twice (see `proxy::handle`)
fn attempts(
    gw: &Gateway,
    route: &Route,
    head: &h1::RequestHead<'_>,
    mut body: ReqBody,
    mut log: Option<&mut AccessLog>,
) -> impl Future<Output = Result<(client::Sent, InFlight), ProxyError>> {
    async move {
        let upstream = &route.upstream;
        let cfg = &upstream.config;
        let idempotent = client::is_idempotent(&head.parts.method);
        let mut tried: Vec<SocketAddr> = Vec::new();
        // Failed attempts that count against `retries` (see `SendError::uses_a_retry`;
        // each server is tried once per request at most).
        let mut charged: u32 = 0;
        // The last attempt's failure, once one has failed and another server is tried.
        let mut last: Option<SendError> = None;
        loop {
            let (server, trial) = match (choose(upstream, &tried), last.take()) {
                (Some(chosen), _) => chosen,
                (None, None) => return Err(ProxyError::NoServer(upstream.set.name.clone())),
                (None, Some(last)) => {
                    return Err(ProxyError::Exhausted { upstream: upstream.set.name.clone(), last });
                }
            };
            let (guard, nth) = server.begin_nth();
            if let Some(log) = log.as_deref_mut() {
                log.server = Some(server.addr);
            }
            // Held to the end of this attempt, whatever ends it.
            let _trial = trial.then(|| upstream.set.begin_trial(&server, nth));
            let replay = if idempotent && charged < cfg.retries { body.replay() } else { None };
            match client::send(&server, head, body, cfg.connect_timeout, cfg.response_timeout).await {
                Ok(sent) => {
                    record_success(&upstream.set, &server, nth);
                    return Ok((sent, guard));
                }
                Err(client::Failure { error: error @ SendError::ClientStalled { .. }, .. }) => {
                    tracing::debug!(upstream = %upstream.set.name, server = %server.addr, %error, "client body stalled");
                    return Err(ProxyError::BodyTimeout);
                }
                Err(client::Failure { error: SendError::ClientBody(e), .. }) => {
                    // The client's body broke (bad chunking) or its client went away while it
                    // streamed to the server: the client's doing, not the server's, and
                    // nothing to retry.
                    tracing::debug!(upstream = %upstream.set.name, server = %server.addr, error = %e, "client body failed");
                    let gone = body::client_went_away(&e);
                    return Err(if gone { ProxyError::ClientClosed } else { ProxyError::BadRequest("malformed body") });
                }
                Err(client::Failure { error, unsent }) => {
                    if error.is_local_shortage() {
                        shed_idle_connections(gw);
                    }
                    record_failure(&upstream.set, &server, &error, nth);
                    tried.push(server.addr);
                    tracing::debug!(upstream = %upstream.set.name, server = %server.addr, %error, "attempt failed");
                    if error.uses_a_retry(cfg.retries) {
                        charged += 1;
                    }
                    let may_retry = charged <= cfg.retries;
                    // Unsent: nothing reached the server, any method may go elsewhere. Sent (or
                    // maybe sent): only an idempotent request with a held body, and not after a
                    // response timeout (that would multiply the wait).
                    let next = match unsent {
                        Some(r) => Some(r),
                        None if !matches!(error, SendError::ResponseTimeout { .. }) => replay,
                        None => None,
                    };
                    match next {
                        Some(r) if may_retry => {
                            gw.metrics.retries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            last = Some(error);
                            body = r;
                        }
                        _ => return Err(ProxyError::Upstream(error)),
                    }
                }
            }
        }
    }
}

/// Out of descriptors (a connect or an accept failed with EMFILE): the idle connections kept for every
/// server are closed, and those in use are not kept after their responses, so that the
/// next connects find descriptors (a burst of HTTP/2 streams can fill the pools with
/// more than the open-files limit leaves room for). Once a second at most.
#[cold]
#[inline(never)]
pub(crate) fn shed_idle_connections(gw: &Gateway) {
    static SHED: Throttle = Throttle::new();
    if !SHED.allow(1) {
        return;
    }
    let snap = gw.snapshot_guard();
    let mut idle = 0;
    for upstream in snap.upstreams.values() {
        for server in upstream.set.all().iter() {
            idle += server.pool.idle_count();
            server.pool.clear();
        }
    }
    tracing::warn!(
        closed = idle,
        "out of file descriptors: idle server connections closed (see [limits].max_connections)"
    );
}

/// The server for a request's next attempt, other than those it `tried`: an ejected one
/// due for a trial (then `true`), else the balancer's pick among the eligible.
#[inline]
pub(crate) fn choose(upstream: &Upstream, tried: &[SocketAddr]) -> Option<(Arc<Server>, bool)> {
    if let Some(server) = upstream.set.claim_trial(tried) {
        return Some((server, true));
    }
    let eligible = upstream.set.eligible();
    with_rng(|rng| balance::pick(upstream.config.balance, &eligible, tried, rng)).map(|s| (Arc::clone(s), false))
}

/// A response from `server` to its `nth` request: failures in a row end, and an ejection
/// whose trial this was ends with the next request (see `ServerSet::trial_answered`).
/// No call: one here would move the response the caller holds (some 200 bytes a request).
#[inline]
pub(crate) fn record_success(set: &ServerSet, server: &Server, nth: u64) {
    use std::sync::atomic::Ordering::Relaxed;
    // Beside `begin`'s counts, written for each request anyway.
    server.answered.fetch_max(nth, Relaxed);
    // Loads first: the common case (nothing to reset) writes no other line.
    if server.consecutive_failures.load(Relaxed) != 0 {
        server.consecutive_failures.store(0, Relaxed);
    }
    set.trial_answered(server, nth);
}

/// Passive ejection of `server` after a failure of its `nth` request: a refused or
/// timed-out connect ejects at once (the container is gone); other failures (a reset, no
/// answer within `response_timeout`) after three in a row. The back-off doubles per
/// ejection in a row, from 1 s up to 30 s; after it, one request at a time tries the
/// server, and the trial's failure ejects it again. A response timeout of a request sent
/// before one the server has answered since is not counted: slow requests sent together
/// time out together, from a server that answers the others.
pub(crate) fn record_failure(set: &Arc<ServerSet>, server: &Arc<Server>, err: &SendError, nth: u64) {
    use std::sync::atomic::Ordering::Relaxed;
    let not_the_servers = !err.is_server_failure()
        || matches!(err, SendError::ResponseTimeout { .. }) && server.answered.load(Relaxed) > nth;
    if not_the_servers {
        return;
    }
    let trial = set.trial_failed(server, nth);
    let connect = matches!(err, SendError::Connect { .. } | SendError::ConnectTimeout { .. });
    if connect {
        set.stats.connect_errors.fetch_add(1, Relaxed);
        // The task may be gone, and DNS may say so already: its address must not wait
        // out `resolve_every` for another container to take it.
        set.resolve_soon();
    }
    if server.is_ejected() && !trial {
        // Sent before its ejection, or while every server of its upstream is ejected: the
        // ejection runs on, and its trial decides.
        return;
    }
    let failures = server.consecutive_failures.fetch_add(1, Relaxed) + 1;
    let threshold = if connect || trial { 1 } else { 3 };
    if failures >= threshold {
        server.consecutive_failures.store(0, Relaxed);
        let n = server.ejections.fetch_add(1, Relaxed).min(5);
        let backoff = Duration::from_secs(1 << n).min(Duration::from_secs(30));
        tracing::warn!(upstream = %set.name, server = %server.addr, error = %err, ?backoff, trial, "server ejected");
        set.eject(server, backoff);
    }
}

/// Turns the server's response into the client's.
fn respond(
    (sent, guard): (client::Sent, InFlight),
    route: Arc<Route>,
    start: Instant,
    log: Option<Box<AccessLog>>,
) -> Response<RespBody> {
    // The head came without its hop-by-hop fields (`h1::parse_head`).
    let (parts, body) = sent.response.into_parts();
    let status = parts.status;
    let done = Done { epoch: sent.epoch, guard, route, status, start, log };
    Response::from_parts(parts, RespBody::Upstream(UpstreamBody::new(body, done)))
}

/// Runs when a proxied response body ends: connection back to the pool, the server's
/// in-flight count released, metrics and the access log written.
pub(crate) struct Done {
    /// The pool epoch the connection was taken at.
    epoch: u64,
    guard: InFlight,
    route: Arc<Route>,
    status: StatusCode,
    start: Instant,
    log: Option<Box<AccessLog>>,
}

impl Done {
    /// `complete`: the server's body reached its end; `bytes`: data bytes passed;
    /// `reusable`: the connection, when it may carry another request.
    fn finish(mut self, complete: bool, bytes: u64, reusable: Option<tokio::net::TcpStream>) {
        let server = self.guard.server();
        let now = Instant::now();
        if let Some(socket) = reusable {
            server.pool.put(socket, self.epoch, bytes, now);
        }
        let took = now.saturating_duration_since(self.start);
        self.route.stats.record(self.status.as_u16(), took);
        if let Some(log) = self.log.take() {
            log.write(self.status.as_u16(), Some(server.addr), took, bytes, complete);
        }
    }
}

/// The access-log fields captured at the start of a request (only when logged).
pub struct AccessLog {
    method: Method,
    host: String,
    path: String,
    request_id: HeaderValue,
    /// The server the request went to last, for a line the gateway writes itself (a
    /// client gone mid-upload or while the server worked, a stalled upload).
    server: Option<SocketAddr>,
}

pub const ACCESS_TARGET: &str = "swarmgate::access";

fn access_log_enabled() -> bool {
    tracing::enabled!(target: ACCESS_TARGET, tracing::Level::INFO)
}

/// A forwarded request's access-log line until a response takes it over (see
/// `forward`).
struct Pending<'a> {
    log: Option<Box<AccessLog>>,
    route: &'a Arc<Route>,
    start: Instant,
    /// A response, or the gateway's own answer, took over.
    answered: bool,
}

impl Pending<'_> {
    /// A response takes the line over.
    fn taken(mut self) -> Option<Box<AccessLog>> {
        self.answered = true;
        self.log.take()
    }

    /// The gateway answers `err` itself: the line says its status.
    #[cold]
    #[inline(never)]
    fn failed(&mut self, err: ProxyError, stats: Option<RouteRef>) -> Failure {
        self.answered = true;
        if let Some(log) = self.log.take() {
            let status = err.logged_status();
            let server = err.server().or(log.server);
            log.write(status, server, self.start.elapsed(), err.body_bytes(), status != CLIENT_CLOSED);
        }
        (err, stats)
    }

    /// Dropped unanswered: the client went away while the request waited on a server (or
    /// on the rest of its own body). Kept out of line: the drop runs in each of
    /// `forward`'s states, and needs no copy of this in each.
    #[cold]
    #[inline(never)]
    fn abandoned(&mut self) {
        let took = self.start.elapsed();
        self.route.stats.record(CLIENT_CLOSED, took);
        if let Some(log) = self.log.take() {
            log.write(CLIENT_CLOSED, log.server, took, 0, false);
        }
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if !self.answered {
            self.abandoned();
        }
    }
}

/// The length of one of the gateway's own answers, for the access log.
fn own_body_bytes(resp: &Response<RespBody>) -> u64 {
    http_body::Body::size_hint(resp.body()).exact().unwrap_or(0)
}

/// nginx's status for a request whose client went away before the answer: in the access
/// log and the route's counters, never on the wire.
const CLIENT_CLOSED: u16 = 499;

impl AccessLog {
    /// A request the gateway answers itself before it has a route or an id: refused
    /// (404, 421, 400...), redirected to HTTPS, an ACME challenge's answer.
    /// [`AccessLog::write_own`] for a refusal.
    fn write_refusal<B>(req: &Request<B>, err: &ProxyError, start: Instant) {
        Self::write_own(req, err.logged_status(), err.body_bytes(), start);
    }

    #[inline(never)]
    fn write_own<B>(req: &Request<B>, status: u16, bytes: u64, start: Instant) {
        if !access_log_enabled() {
            return;
        }
        let header = || req.headers().get(header::HOST).and_then(|h| h.to_str().ok());
        let host = req.uri().authority().map(|a| a.as_str()).or_else(header).unwrap_or("-");
        let log = AccessLog {
            method: req.method().clone(),
            host: host.to_string(),
            path: req.uri().path().to_string(),
            request_id: HeaderValue::from_static("-"),
            server: None,
        };
        log.write(status, None, start.elapsed(), bytes, true);
    }

    fn new(method: &Method, host: &str, path: &str, request_id: HeaderValue) -> Box<Self> {
        let (host, path) = (host.to_string(), path.to_string());
        Box::new(AccessLog { method: method.clone(), host, path, request_id, server: None })
    }

    pub fn write(&self, status: u16, upstream: Option<SocketAddr>, took: Duration, bytes: u64, complete: bool) {
        let (method, request_id) = (self.method.as_str(), self.request_id.to_str().unwrap_or("-"));
        access_line([method, &self.host, &self.path, request_id], status, upstream, took, bytes, complete);
    }
}

/// The access log's one line format: method, host, path and request id (`-` where
/// unknown), then the outcome.
fn access_line(
    [method, host, path, request_id]: [&str; 4],
    status: u16,
    upstream: Option<SocketAddr>,
    took: Duration,
    bytes: u64,
    complete: bool,
) {
    tracing::info!(
        target: ACCESS_TARGET,
        method = %method,
        host = %host,
        path = %path,
        status,
        upstream = upstream.map(|a| a.to_string()).as_deref().unwrap_or("-"),
        duration_ms = took.as_secs_f64() * 1000.0,
        bytes,
        complete,
        request_id,
    );
}

/// Warnings of failed requests let through: with a server down under load, one a second
/// (the rest at debug; `swarmgate_responses_total` counts every one).
static FAILURE_WARNINGS: Throttle = Throttle::new();

fn local_error(err: &ProxyError, stats: &RouteRef, start: Instant) -> Response<RespBody> {
    let status = err.status();
    match status.as_u16() {
        500..=599 if FAILURE_WARNINGS.allow(1) => {
            tracing::warn!(status = status.as_u16(), error = %err, "request failed (more within a second: debug)");
        }
        500..=599 => tracing::debug!(status = status.as_u16(), error = %err, "request failed"),
        _ => tracing::debug!(status = status.as_u16(), error = %err, "request refused"),
    }
    stats.stats().record(err.logged_status(), start.elapsed());
    let mut resp = text(status, err.body());
    if status == StatusCode::METHOD_NOT_ALLOWED {
        // RFC 9110 section 15.5.6: what the gateway takes (everything but a plain CONNECT).
        let allow = HeaderValue::from_static("GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS, TRACE");
        resp.headers_mut().insert(header::ALLOW, allow);
    }
    resp
}

/// The answer to a head the HTTP/1.1 reader refused before it made a request of it (see
/// `front::Parsed::Refused`): counted with the unrouted requests, and in the access log
/// with `-` for what it could not tell.
#[cold]
pub(super) fn refuse_head(gw: &Arc<Gateway>, err: &ProxyError) -> Response<RespBody> {
    head_refused(gw, err.logged_status(), err.body_bytes(), err);
    text(err.status(), err.body())
}

/// Logs and counts a refused head: in the access log with `-` for what could not be told,
/// in the metrics with the unrouted requests.
#[cold]
pub(super) fn head_refused(gw: &Gateway, status: u16, bytes: u64, err: &dyn std::fmt::Display) {
    if access_log_enabled() {
        access_line(["-"; 4], status, None, Duration::ZERO, bytes, true);
    }
    // At debug whatever its status: what a client sends is no failure of the gateway's
    // (and a scanner's 505s would take the warnings of servers failing).
    tracing::debug!(status, error = %err, "request head refused");
    gw.metrics.unrouted.record(status, Duration::ZERO);
}

/// A short plain-text answer of the gateway's own.
pub fn text(status: StatusCode, body: &'static str) -> Response<RespBody> {
    let mut resp = Response::new(RespBody::text(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    resp
}

/// 308 to the same URL over https; the port is the HTTPS listener's when the client
/// named a port other than 80 (development: `localhost:8080`), else the scheme's default
/// (the usual :80 -> :443, which behind a port mapping is the only one right).
fn redirect(
    gw: &Gateway,
    req: &Request<ClientBody>,
    authority: &str,
    https_port: u16,
    start: Instant,
) -> Response<RespBody> {
    let host = route::strip_port(authority);
    // `:80` named is the default named: the default it is over https too.
    let port = match route::authority_port(authority) {
        Some(named) if named != 80 && https_port != 443 => format!(":{https_port}"),
        _ => String::new(),
    };
    let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let location = format!("https://{host}{port}{target}");
    // HTTP/1.0 without Host: no URL to send the client to.
    let resp = match HeaderValue::from_str(&location) {
        Ok(v) if !host.is_empty() => {
            let mut resp = text(StatusCode::PERMANENT_REDIRECT, "308 use https\n");
            resp.headers_mut().insert(header::LOCATION, v);
            resp
        }
        _ => text(StatusCode::BAD_REQUEST, ProxyError::BadRequest("no host to redirect to").body()),
    };
    gw.metrics.unrouted.record(resp.status().as_u16(), start.elapsed());
    resp
}

/// Answers an HTTP-01 validation request from the published key authorizations: this
/// replica's, else (clustered) those another replica published in the shared store.
async fn acme_answer(gw: &Gateway, req: &Request<ClientBody>, start: Instant) -> Response<RespBody> {
    let token = &req.uri().path()[crate::acme::HTTP01_PREFIX.len()..];
    let resp = match gw.challenges.answer_anywhere(token).await {
        Some((key_auth, source)) => {
            let mut r = Response::new(RespBody::from_bytes(key_auth.into()));
            r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
            tracing::info!(token, source, "answered an ACME HTTP-01 challenge");
            r
        }
        None => text(StatusCode::NOT_FOUND, "404 unknown ACME challenge token\n"),
    };
    gw.metrics.unrouted.record(resp.status().as_u16(), start.elapsed());
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::{ServerState, SetSettings, TrialGuard};

    fn refused(addr: SocketAddr) -> SendError {
        SendError::Connect { addr, source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused) }
    }

    /// A set of one healthy server, that server, and its address.
    fn one_server() -> (Arc<ServerSet>, Arc<Server>, SocketAddr) {
        let set = ServerSet::new("t", SetSettings { health_checked: false, drain_timeout: Duration::from_secs(1) });
        let addr = SocketAddr::from(([127, 0, 0, 1], 1));
        set.reconcile(&[addr]);
        let server = Arc::clone(&set.all()[0]);
        (set, server, addr)
    }

    /// Lets paused time run `ms` on, and the tasks woken by it run.
    async fn wait(ms: u64) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        tokio::task::yield_now().await;
    }

    /// A request that takes the trial of the one server of `set`, if one is due: its
    /// number and its hold on the trial (0 and none when none is due).
    fn claim<'a>(set: &'a Arc<ServerSet>, tried: &[SocketAddr]) -> (u64, Option<TrialGuard<'a>>) {
        match set.claim_trial(tried) {
            Some(server) => {
                let nth = server.begin_nth().1;
                (nth, Some(set.begin_trial(&server, nth)))
            }
            None => (0, None),
        }
    }

    /// Whether a trial of the one server of `set` is due (the looking request ends).
    fn due(set: &Arc<ServerSet>) -> bool {
        claim(set, &[]).1.is_some()
    }

    #[tokio::test(start_paused = true)]
    async fn ejection_backoff_doubles_until_a_trial_is_answered() {
        let (set, server, addr) = one_server();
        assert_eq!(server.state(), ServerState::Healthy);
        let before = server.begin_nth().1; // on the wire when the server is ejected
        // A refused connect ejects at once; after each back-off one request tries the
        // server, and that trial's failure ejects it again, for twice as long.
        record_failure(&set, &server, &refused(addr), 0);
        for backoff_ms in [1000u64, 2000, 4000] {
            assert!(server.is_ejected());
            wait(backoff_ms - 10).await;
            assert!(!due(&set), "no trial before {backoff_ms} ms");
            wait(20).await;
            let (trial, hold) = claim(&set, &[]);
            assert!(hold.is_some(), "a trial once the {backoff_ms} ms back-off is over");
            assert!(!due(&set), "one trial at a time");
            // Requests sent before (or while every server is ejected) change nothing.
            record_success(&set, &server, before);
            record_failure(&set, &server, &refused(addr), before);
            assert!(server.is_ejected() && !due(&set));
            record_failure(&set, &server, &refused(addr), trial);
            drop(hold);
            assert!(!due(&set), "a failed trial is not offered again before its back-off");
        }
        // The back-off is 8 s now; its trial is answered, which ends the ejection at the
        // next request's look.
        wait(8010).await;
        let (trial, hold) = claim(&set, &[]);
        record_success(&set, &server, trial);
        drop(hold);
        assert!(!due(&set), "nothing to try once back");
        assert!(!server.is_ejected());
        assert_eq!(set.stats.ejections.load(std::sync::atomic::Ordering::Relaxed), 4);
        // Other failures need three in a row; the back-off starts again from 1 s.
        let reset = SendError::Closed { addr, source: closed_error().await };
        record_failure(&set, &server, &reset, 0);
        record_failure(&set, &server, &reset, 0);
        assert!(!server.is_ejected());
        record_failure(&set, &server, &reset, 0);
        assert!(server.is_ejected());
        wait(1010).await;
        assert!(due(&set), "back-off restarted at 1 s after the answered trial");
    }

    #[tokio::test(start_paused = true)]
    async fn a_trial_that_finds_nothing_out_is_due_again_when_its_request_ends() {
        let (set, server, addr) = one_server();
        record_failure(&set, &server, &refused(addr), 0);
        wait(1010).await;
        // Not to a request that already tried the server; it stays due.
        assert!(claim(&set, &[addr]).1.is_none());
        let (trial, hold) = claim(&set, &[]);
        assert!(hold.is_some());
        // The failure was not the server's (a stalled client body), or the request was
        // dropped: the trial is over when its request ends, and due again.
        let stalled = SendError::ClientStalled { after: Duration::from_secs(1) };
        record_failure(&set, &server, &stalled, trial);
        assert!(!due(&set), "held while its request lasts");
        drop(hold);
        assert!(server.is_ejected());
        let (second, hold) = claim(&set, &[]);
        assert!(hold.is_some(), "due again at once");
        drop(hold);
        // An answer to it comes late: a request sent with or after the first trial was
        // answered, so the ejection ends.
        record_success(&set, &server, second);
        assert!(!due(&set));
        assert!(!server.is_ejected());
        // A server draining (or found unhealthy) meanwhile is never tried.
        record_failure(&set, &server, &refused(addr), 0);
        wait(1010).await;
        set.reconcile(&[]);
        assert!(!due(&set));
    }

    #[tokio::test(start_paused = true)]
    async fn a_trial_answered_with_every_server_ejected_ends_the_ejection() {
        // Every server ejected: all stay eligible, and requests go to them anyway. One
        // sent with or after the trial and answered shows the server works.
        let (set, server, addr) = one_server();
        record_failure(&set, &server, &refused(addr), 0);
        wait(1010).await;
        let (trial, hold) = claim(&set, &[]);
        assert!(hold.is_some());
        let later = server.begin_nth().1; // picked from the eligible (all ejected)
        record_success(&set, &server, later);
        // The trial times out, answered later requests notwithstanding: nothing against
        // the server, and the next look ends the ejection.
        let timeout = SendError::ResponseTimeout { addr, after: Duration::from_secs(5) };
        record_failure(&set, &server, &timeout, trial);
        drop(hold);
        assert!(!due(&set));
        assert!(!server.is_ejected());
        assert_eq!(set.stats.ejections.load(std::sync::atomic::Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_tried_while_ejected_is_not_ejected_again() {
        // Every server ejected: they stay eligible, and each failed try must not log,
        // count and time a new ejection (a flood at thousands of requests a second).
        let (set, server, addr) = one_server();
        record_failure(&set, &server, &refused(addr), 0);
        for _ in 0..100 {
            record_failure(&set, &server, &refused(addr), 0);
        }
        assert_eq!(set.stats.ejections.load(std::sync::atomic::Ordering::Relaxed), 1);
        assert_eq!(set.stats.connect_errors.load(std::sync::atomic::Ordering::Relaxed), 101);
        assert_eq!(set.eligible().len(), 1, "the only server stays eligible");
        // Its back-off ran out: only its trial's failure ejects it again; a reset too.
        wait(1010).await;
        record_failure(&set, &server, &refused(addr), 0);
        assert_eq!(set.stats.ejections.load(std::sync::atomic::Ordering::Relaxed), 1);
        let (trial, hold) = claim(&set, &[]);
        assert!(hold.is_some());
        let reset = SendError::Closed { addr, source: closed_error().await };
        record_failure(&set, &server, &reset, trial);
        assert_eq!(set.stats.ejections.load(std::sync::atomic::Ordering::Relaxed), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn timeouts_count_toward_ejection_unless_a_later_request_was_answered() {
        let (set, server, addr) = one_server();
        let timeout = SendError::ResponseTimeout { addr, after: Duration::from_secs(5) };
        let out = || server.is_ejected();
        // Slow requests 1 to 3 sent together; 4, sent after them, answered first.
        let nths: Vec<u64> = (0..4).map(|_| server.begin_nth().1).collect();
        record_success(&set, &server, nths[3]);
        for &nth in &nths[..3] {
            record_failure(&set, &server, &timeout, nth);
        }
        assert!(!out(), "a server that answers is not ejected for its slow requests");
        // A hung server answers nothing after them: three in a row eject it.
        let nths: Vec<u64> = (0..3).map(|_| server.begin_nth().1).collect();
        for (i, &nth) in nths.iter().enumerate() {
            assert!(!out(), "not before the third ({i})");
            record_failure(&set, &server, &timeout, nth);
        }
        assert!(out(), "three timeouts in a row, nothing answered since");
    }

    /// An error like a closed connection gives.
    async fn closed_error() -> std::io::Error {
        std::io::Error::from(std::io::ErrorKind::ConnectionReset)
    }

    #[test]
    fn an_authority_is_a_host_and_a_port_of_digits() {
        for ok in ["app.test", "app.test:8443", "app.test:", "127.0.0.1:80", "[::1]", "[::1]:443", "a.test:65535"] {
            assert!(valid_authority(ok), "{ok}");
        }
        for bad in [
            "u@app.test",
            "evil.test@app.test",
            "app.test:abc",
            "app.test:99999",
            "app.test:-1",
            "[::1]x",
            "a b",
            "[::1",
            "a[b]",
            "app.test:80:80",
            "app.test:443:",
            "::1",
        ] {
            assert!(!valid_authority(bad), "{bad}");
        }
    }
}
