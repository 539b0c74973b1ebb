//! HTTP/1.1 from clients, on the connection's own task, for the requests that are nearly
//! all of the traffic: no body (no `Content-Length` but 0, no `Transfer-Encoding`), no
//! upgrade, no `Expect`, not `CONNECT`. Such a request is parsed from the connection's
//! read buffer, handled, and its response written straight to the socket: no session,
//! channel or buffer lives between requests, and an idle connection holds no buffer.
//!
//! Any other request (a body to stream, an upgrade, 100-continue) goes with the bytes
//! read so far to a hyper session, which serves the connection until it idles (see
//! `listener::serving`). A head that is no request (malformed, over `max_header_bytes`
//! or 100 fields, another HTTP version) is answered here (see [`refuse`]). The
//! grammar both accept is RFC 9112's, and responses are written as hyper wrote them: in
//! the client's version (HTTP/1.0 or 1.1), framed by the response's `Content-Length` or
//! its body's exact size, else chunked (HTTP/1.1) or until close (HTTP/1.0); `Date`
//! added; trailers, to a client that sent `TE: trailers`, for the fields the response's
//! `Trailer` field names.

use std::cell::RefCell;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf as _, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode, Uri, Version};
use http_body::Body as _;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use super::Conn;
use super::ProxyError;
use super::activity::{Activity, Expired, RequestGuard, Watched};
use super::body::{ClientBody, RespBody};
use super::forwarded;
use super::h1::{self, FieldAt, Fields, Framing};
use super::hop::{self, Fixed};
use super::listener::{PARK_AFTER, Shared};

/// The longest request target `Uri` takes is one byte under this.
const URI_MAX: usize = u16::MAX as usize - 1;
/// Room made in the read buffer before a read (a head may grow it to `max_header_bytes`).
const READ_SIZE: usize = 4096;
/// Body data up to this size is copied behind the head or chunk line, for one write;
/// larger data goes out from its own buffer in the same (vectored) write.
const COPY_MAX: usize = 4096;
/// Written data gathered before a write while the body still has more ready.
const WRITE_BATCH: usize = 64 * 1024;

/// Why [`serve`] returned.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Outcome {
    /// The connection is done: closed by the client, timed out, shut down, or failed.
    Closed,
    /// A request for hyper has begun: its bytes are back in the IO, unread.
    Hyper,
    /// Idle for [`PARK_AFTER`], with nothing read of a next request: to be parked.
    Idle,
}

/// What serving a connection's requests needs besides its IO.
pub(super) struct Ctx<'a> {
    pub conn: &'a Arc<Conn>,
    pub shared: &'a Shared,
    pub activity: &'a Arc<Activity>,
    /// `max_header_bytes`.
    pub max_head: usize,
}

/// Serves requests on `io` until the connection is done or a request needs hyper.
///
/// The watchdog (see `activity`) times heads and idleness and, made with a park delay,
/// tells when the connection has idled long enough to be parked (`Outcome::Idle`).
/// `first`: the first byte of a request, read by a parked connection.
pub(super) async fn serve<I, W>(
    io: &mut Watched<I>,
    ctx: &Ctx<'_>,
    mut watchdog: Pin<&mut W>,
    watch: &impl Fn(Option<Duration>) -> W,
    first: Option<u8>,
) -> Outcome
where
    I: AsyncRead + AsyncWrite + Unpin,
    W: Future<Output = Expired>,
{
    let mut buf = BytesMut::with_capacity(READ_SIZE);
    buf.extend(first);
    // Made once: each new wait on the token would take its lock twice.
    let shutdown = ctx.shared.shutdown.cancelled();
    tokio::pin!(shutdown);
    // Whether the watchdog must be made anew for the connection to park: at first, as the
    // one handed in may be past parking (it would fire again at once).
    let mut rearm = true;
    // Shutting down (see `SHUTDOWN_GRACE`): when the connection closes if no request comes.
    let mut closing: Option<Pin<Box<tokio::time::Sleep>>> = None;
    loop {
        let (req, asks, fields) = loop {
            if !buf.is_empty() {
                match parse(&mut buf, ctx.max_head) {
                    Parsed::Ours(req, asks, fields) => break (req, asks, fields),
                    Parsed::Partial => {}
                    Parsed::NotOurs => {
                        io.unread(&buf);
                        return Outcome::Hyper;
                    }
                    Parsed::Refused(err) => {
                        refuse(io, &mut buf, ctx, err).await;
                        return Outcome::Closed;
                    }
                }
            }
            tokio::select! {
                biased;
                read = read_more(io, &mut buf) => match read {
                    Ok(0) => return Outcome::Closed,
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(error = %e, "client connection failed");
                        return Outcome::Closed;
                    }
                },
                () = shutdown.as_mut(), if closing.is_none() => {
                    closing = Some(Box::pin(tokio::time::sleep(SHUTDOWN_GRACE)));
                }
                () = until(&mut closing), if closing.is_some() => return Outcome::Closed,
                why = watchdog.as_mut() => {
                    if why != Expired::Park {
                        super::listener::closed_by_timeout(&ctx.shared.gw, why);
                        return Outcome::Closed;
                    }
                    if buf.is_empty() && !io.has_unread() {
                        if closing.is_none() {
                            return Outcome::Idle;
                        }
                        // Shutting down: parked, it would be closed at once; its grace
                        // runs on.
                    } else {
                        // Bytes of a head are here (the watchdog would not say park then):
                        // timed as a head from now on.
                        ctx.activity.head_begun();
                    }
                    watchdog.set(watch(None));
                    rearm = true;
                }
            }
        };
        // Not boxed: the exchange (4.1 KiB with the proxying in it) is part of the
        // serving task, which lives while the connection is busy and ends when it parks
        // (see `listener::park`), so an idle connection keeps no room for it; a box was an
        // allocation and a copy of it per request (about 400 instructions).
        let keep = exchange(io, &mut buf, ctx, req, asks, &fields).await;
        if !keep {
            return Outcome::Closed;
        }
        if !buf.is_empty() {
            // Part of the next head came while this request was open: it is timed from now.
            ctx.activity.head_begun();
        }
        if rearm {
            // Otherwise the watchdog goes on from the state it reads, with no new timer.
            watchdog.set(watch(Some(PARK_AFTER)));
            rearm = false;
        }
    }
}

/// At shutdown an idle connection is not closed at once: a client sending requests one
/// after another would find it closed just as its next one goes out (and could not tell
/// whether that one was taken). It gets this long for its next request, which is answered
/// with `Connection: close`; a connection already parked (idle for [`PARK_AFTER`]) is
/// closed at once.
pub(super) const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// Waits for `deadline`, or forever without one.
pub(super) async fn until(deadline: &mut Option<Pin<Box<tokio::time::Sleep>>>) {
    match deadline {
        Some(sleep) => sleep.as_mut().await,
        None => std::future::pending().await,
    }
}

/// Reads more of a request head into `buf`.
async fn read_more<I: AsyncRead + Unpin>(io: &mut Watched<I>, buf: &mut BytesMut) -> std::io::Result<usize> {
    buf.reserve(READ_SIZE);
    io.read_buf(buf).await
}

/// What a client's head asks of its connection and response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Asks {
    /// The connection stays open after the response.
    pub keep_alive: bool,
    /// `TE: trailers`: a chunked response may end with trailer fields.
    pub trailers: bool,
}

/// What the start of the read buffer holds.
#[doc(hidden)] // public for the benches
#[allow(clippy::large_enum_variant)] // made once per request and moved on at once
pub enum Parsed {
    /// Not a whole head yet.
    Partial,
    /// A request this reader serves, and its fields the gateway does not read.
    Ours(Request<ClientBody>, Asks, Fields),
    /// A request (or bytes) for hyper.
    NotOurs,
    /// A head the gateway answers itself and then closes the connection: malformed, over
    /// `max_header_bytes` or 100 fields, or of an HTTP version other than 1.x.
    Refused(ProxyError),
}

/// Parses a request head from the start of `buf`, removing it from `buf` when it is ours.
///
/// The fields the gateway reads (`Host` and the forwarding fields) go into the request's
/// map, their values slices of one copy of the head; the others stay as the client wrote
/// them, spans of the same copy ([`Fields`]), and go to the server as they came.
/// Hop-by-hop fields are noted and left out of both.
#[doc(hidden)] // public for the benches
pub fn parse(buf: &mut BytesMut, max_head: usize) -> Parsed {
    // Uninitialised: zeroing 100 fields per parse would cost more than parsing.
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; h1::MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    // Spans of the head are u32 (`h1::Fields`); the config allows 1 MiB at most.
    let max_head = max_head.min(u32::MAX as usize);
    let len = match httparse::ParserConfig::default().parse_request_with_uninit_headers(&mut req, buf, &mut slots) {
        Ok(httparse::Status::Complete(len)) if len <= max_head => len,
        Ok(httparse::Status::Partial) if buf.len() < max_head => return Parsed::Partial,
        Ok(_) => return Parsed::Refused(too_large(buf, max_head)),
        Err(httparse::Error::TooManyHeaders) => return Parsed::Refused(ProxyError::HeadTooLarge),
        Err(httparse::Error::Version) => {
            return match version_of(buf) {
                // Read as HTTP/1.1 (RFC 9110 section 2.5), once rewritten so.
                LineVersion::Later(at) => {
                    buf[at] = b'1';
                    parse(buf, max_head)
                }
                LineVersion::Other => Parsed::Refused(ProxyError::VersionNotSupported),
                LineVersion::NoVersion => Parsed::Refused(ProxyError::BadRequest("malformed request line")),
                LineVersion::Incomplete if buf.len() < max_head => Parsed::Partial,
                LineVersion::Incomplete => Parsed::Refused(too_large(buf, max_head)),
            };
        }
        Err(_) => return Parsed::Refused(ProxyError::BadRequest("malformed request head")),
    };
    let (Some(method), Some(target), Some(minor)) = (req.method, req.path, req.version) else {
        return Parsed::NotOurs;
    };
    let Ok(method) = Method::from_bytes(method.as_bytes()) else { return Parsed::NotOurs };
    if method == Method::CONNECT {
        return Parsed::NotOurs;
    }
    let raw = Bytes::copy_from_slice(&buf[..len]);
    let base = buf.as_ptr() as usize;
    let slice = |s: &[u8]| {
        let start = s.as_ptr() as usize - base;
        raw.slice(start..start + s.len())
    };
    if target.len() >= URI_MAX {
        return Parsed::Refused(ProxyError::UriTooLong(URI_MAX - 1));
    }
    let Ok(uri) = Uri::from_maybe_shared(slice(target.as_bytes())) else {
        return Parsed::Refused(ProxyError::BadRequest("malformed request target"));
    };
    // Room for Host and `TE`; a trusted proxy's forwarding fields may grow it.
    let mut headers = HeaderMap::with_capacity(4);
    // For all but `Host`: a request with no other field allocates nothing.
    let mut at = Vec::with_capacity(req.headers.len().saturating_sub(1));
    // What the client asks of the connection, read as the fields go by (no lookups after).
    let (mut trailers, mut connection, mut length) = (false, hop::ConnectionSays::default(), None);
    for field in req.headers.iter() {
        let name = field.name.as_bytes();
        if let Some(which) = hop::fixed(name) {
            match which {
                Fixed::Connection => connection.note(field.value),
                Fixed::Te => trailers |= hop::has_token(field.value, "trailers"),
                Fixed::TransferEncoding | Fixed::Upgrade => return Parsed::NotOurs,
                Fixed::Other => {}
            }
            continue;
        }
        if name.eq_ignore_ascii_case(b"content-length") {
            // A length that is none, or lengths that disagree, frame nothing: refused
            // (RFC 9112 section 6.3) before hyper would read them.
            match request_length(field.value, length) {
                Ok(n) => length = Some(n),
                Err(why) => return Parsed::Refused(ProxyError::BadRequest(why)),
            }
            continue;
        }
        if name.eq_ignore_ascii_case(b"expect") {
            return Parsed::NotOurs;
        }
        if name.eq_ignore_ascii_case(b"host") || forwarded::is_forwarding(name) {
            let Ok(name) = HeaderName::from_bytes(name) else { return Parsed::NotOurs };
            let Ok(value) = HeaderValue::from_maybe_shared(slice(field.value)) else { return Parsed::NotOurs };
            headers.append(name, value);
        } else if forwarded::is_lookalike(name) {
            // Removed whoever sent it (see `forwarded::is_lookalike`).
        } else if name.len() <= h1::MAX_NAME {
            // httparse checked the name (a token) and the value by `HeaderName`'s and
            // `HeaderValue`'s rules (see `h1::Fields`).
            at.push(FieldAt::within(base, name, field.value));
        } else {
            // Too long a name for `HeaderName` (or for `Connection` to name): hyper's.
            return Parsed::NotOurs;
        }
    }
    if length.is_some_and(|n| n > 0) {
        // A body is hyper's; a length of 0 is left out like a framing field (the proxy
        // frames the request itself, see `client::request_framing`).
        return Parsed::NotOurs;
    }
    if connection.too_many {
        return Parsed::NotOurs; // hyper's session reads it, and the proxy refuses it (400)
    }
    let mut fields = Fields::new(raw, at);
    for name in &connection.named {
        // `Host` stays: the request is routed by it (and the server gets it anyway).
        if name != header::HOST {
            headers.remove(name);
            fields.remove(name.as_str().as_bytes());
        }
    }
    if trailers {
        // The one hop-by-hop field passed on (RFC 9110 section 10.1.4).
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    let version = if minor == 0 { Version::HTTP_10 } else { Version::HTTP_11 };
    let keep_alive = hop::persistent(version, connection.close, || connection.keep_alive);
    buf.advance(len);
    let mut request = Request::new(ClientBody::Empty);
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    *request.headers_mut() = headers;
    Parsed::Ours(request, Asks { keep_alive, trailers }, fields)
}

/// A request's `Content-Length`, with those before it, as hyper (which reads request
/// bodies) takes it: digits, no list; when repeated, equal; at most `i64::MAX`.
fn request_length(value: &[u8], before: Option<u64>) -> Result<u64, &'static str> {
    if value.contains(&b',') {
        return Err("a list as content-length");
    }
    match h1::content_length(value, before)? {
        n if n > i64::MAX as u64 => Err("content-length too large"),
        n => Ok(n),
    }
}

/// What the request line's version says, when the parser takes it for neither HTTP/1.0
/// nor HTTP/1.1.
enum LineVersion {
    /// HTTP/1.2 to 1.9: its minor digit is at this index.
    Later(usize),
    /// A well-formed version of another major number (`HTTP/2.0`, the HTTP/2 preface).
    Other,
    /// No version at all (`http/1.1`, `HTTP/1.10`, `FOO/1.1`): a malformed line.
    NoVersion,
    /// The line has not ended yet.
    Incomplete,
}

/// The version at the end of the request line at the start of `buf` (after the empty
/// lines a client may send first, RFC 9112 section 2.2).
fn version_of(buf: &[u8]) -> LineVersion {
    let start = request_line_start(buf);
    let Some(len) = buf[start..].iter().position(|&b| b == b'\n') else { return LineVersion::Incomplete };
    let line = buf[start..start + len].strip_suffix(b"\r").unwrap_or(&buf[start..start + len]);
    // method SP target SP version: a line of any other shape has no version to speak of.
    if line.split(|&b| b == b' ').filter(|part| !part.is_empty()).count() != 3 {
        return LineVersion::NoVersion;
    }
    let from = line.iter().rposition(|&b| b == b' ').map_or(0, |i| i + 1);
    match line[from..] {
        [b'H', b'T', b'T', b'P', b'/', b'1', b'.', b'2'..=b'9'] => LineVersion::Later(start + from + 7),
        [b'H', b'T', b'T', b'P', b'/', major, b'.', minor]
            if major.is_ascii_digit() && minor.is_ascii_digit() && major != b'1' =>
        {
            LineVersion::Other
        }
        _ => LineVersion::NoVersion,
    }
}

/// Where the request line begins: after any empty lines.
fn request_line_start(buf: &[u8]) -> usize {
    buf.iter().position(|&b| b != b'\r' && b != b'\n').unwrap_or(buf.len())
}

/// The refusal of a head over `max_head` bytes: 414 when its request line alone is,
/// else 431.
fn too_large(buf: &[u8], max_head: usize) -> ProxyError {
    let end = buf.len().min(max_head);
    let line = &buf[request_line_start(buf).min(end)..end];
    if line.contains(&b'\n') { ProxyError::HeadTooLarge } else { ProxyError::UriTooLong(max_head) }
}

/// How long a refused client's further bytes are read and dropped before its connection
/// closes (see [`refuse`]).
const LINGER: Duration = Duration::from_secs(2);

/// Answers a head the reader refused (see [`Parsed::Refused`]) and closes the connection:
/// where such a head ends, and so where a next request would begin, cannot be known.
///
/// Closing with bytes unread would reset the connection, and a client still sending its
/// head could lose the answer under its next write; so, once the answer is out, what the
/// client sends is read and dropped until it closes, for [`LINGER`] at most.
#[cold]
async fn refuse<I>(io: &mut Watched<I>, buf: &mut BytesMut, ctx: &Ctx<'_>, err: ProxyError)
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let resp = super::refuse_head(&ctx.shared.gw, &err);
    let asks = Asks { keep_alive: false, trailers: false };
    // The answer to a HEAD has no content (RFC 9110 section 9.3.2), even this one.
    let head = buf[request_line_start(buf)..].starts_with(b"HEAD ");
    let method = if head { Method::HEAD } else { Method::GET };
    if let Err(e) = write_response(io, resp, &method, Version::HTTP_11, asks).await {
        tracing::debug!(error = %e, "writing a refusal to the client failed");
        return;
    }
    let _ = io.shutdown().await;
    let drop_the_rest = async {
        loop {
            buf.clear();
            if !matches!(read_more(io, buf).await, Ok(1..)) {
                return;
            }
        }
    };
    tokio::select! {
        () = drop_the_rest => {}
        () = tokio::time::sleep(LINGER) => {}
        () = ctx.shared.shutdown.cancelled() => {}
    }
}

/// One request and its response. `true`: the connection may carry the next request.
#[allow(clippy::manual_async_fn)] // arguments kept once, not twice (see `proxy::handle`)
fn exchange<I>(
    io: &mut Watched<I>,
    buf: &mut BytesMut,
    ctx: &Ctx<'_>,
    req: Request<ClientBody>,
    asks: Asks,
    fields: &Fields,
) -> impl Future<Output = bool>
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    async move {
        let Ctx { conn, shared, activity, .. } = *ctx;
        let _guard = RequestGuard::open(activity);
        if !asks.keep_alive {
            activity.set_closing();
        }
        let (method, version) = (req.method().clone(), req.version());
        let handler = super::handle(&shared.gw, conn, req, fields);
        tokio::pin!(handler);
        // While the request is handled, the client's side is read too: a client that goes
        // away cancels its request (and so the server's). Once a pipelined request has begun
        // to arrive, reading stops (its client may have half-closed after sending it: the
        // responses are still owed).
        let resp = loop {
            if buf.capacity() == buf.len() {
                buf.reserve(READ_SIZE);
            }
            tokio::select! {
                biased;
                resp = handler.as_mut() => break resp,
                read = io.read_buf(buf), if buf.is_empty() => match read {
                    Ok(0) => {
                        tracing::debug!("client closed the connection before its response");
                        return false;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(error = %e, "client connection failed before its response");
                        return false;
                    }
                },
            }
        };
        // Shutdown closes the tracker just before it cancels `shutdown`: the tracker's flag is
        // one atomic load, the token's a lock every worker shares.
        let asks = Asks { keep_alive: asks.keep_alive && !shared.tracker.is_closed(), ..asks };
        match write_response(io, resp, &method, version, asks).await {
            Ok(true) => true,
            Ok(false) => {
                let _ = io.shutdown().await;
                false
            }
            Err(e) => {
                tracing::debug!(error = %e, "writing a response to the client failed");
                false
            }
        }
    }
}

/// Writes the response; `Ok(true)` when the connection stays open for the next request.
async fn write_response<I>(
    io: &mut Watched<I>,
    resp: http::Response<RespBody>,
    method: &Method,
    version: Version,
    asks: Asks,
) -> std::io::Result<bool>
where
    I: AsyncWrite + Unpin,
{
    let (parts, mut body) = resp.into_parts();
    let mut out = Vec::with_capacity(512);
    let framing =
        encode_head(&parts, body.fields(), body.size_hint().exact(), method, version, asks.keep_alive, &mut out);
    // Trailers go to a client that asked for them (`TE: trailers`), as hyper sends them.
    let trailers_allowed =
        if asks.trailers { trailer_names(&parts.headers, body.fields(), framing) } else { Vec::new() };
    let mut sent: u64 = 0;
    let mut ended = false;
    while framing != Framing::Empty && !ended {
        // Frames already here are gathered (the first one behind the head); the write
        // happens when the body has to wait, or enough is gathered.
        let frame = if out.is_empty() {
            std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
        } else {
            match std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await {
                Poll::Ready(frame) => frame,
                Poll::Pending => {
                    io.write_all(&out).await?;
                    io.flush().await?;
                    out.clear();
                    continue;
                }
            }
        };
        let frame = match frame {
            None => break,
            Some(Ok(frame)) => frame,
            Some(Err(e)) => {
                // The server's body broke: the client must not take what it got as whole.
                let _ = io.write_all(&out).await;
                return Err(e);
            }
        };
        match frame.into_data() {
            Ok(data) => {
                sent += data.len() as u64;
                if let Framing::Length(n) = framing {
                    if sent > n {
                        return Err(std::io::Error::other("response body longer than its Content-Length"));
                    }
                }
                let chunked = framing == Framing::Chunked;
                if data.len() <= COPY_MAX {
                    if chunked {
                        h1::encode_chunk(&data, &mut out);
                    } else {
                        out.extend_from_slice(&data);
                    }
                } else {
                    if chunked {
                        h1::encode_chunk_line(data.len(), &mut out);
                    }
                    let tail: &[u8] = if chunked { b"\r\n" } else { b"" };
                    let mut all = bytes::Buf::chain(bytes::Buf::chain(&out[..], data), tail);
                    io.write_all_buf(&mut all).await?;
                    out.clear();
                }
                if out.len() >= WRITE_BATCH {
                    io.write_all(&out).await?;
                    out.clear();
                }
            }
            Err(frame) => {
                if framing == Framing::Chunked {
                    let trailers = frame.into_trailers().ok().map(|t| allowed_trailers(t, &trailers_allowed));
                    h1::encode_last_chunk(trailers.as_ref(), &mut out);
                    ended = true;
                }
                break;
            }
        }
    }
    if framing == Framing::Chunked && !ended {
        h1::encode_last_chunk(None, &mut out);
    }
    if !out.is_empty() {
        io.write_all(&out).await?;
    }
    io.flush().await?;
    if let Framing::Length(n) = framing {
        if sent != n {
            return Err(std::io::Error::other("response body shorter than its Content-Length"));
        }
    }
    Ok(asks.keep_alive && framing != Framing::Close)
}

/// Appends the status line and fields (a server's `fields` as it wrote them, then those
/// of `parts`) for a body of `body_length` if known; returns how the body is delimited.
/// `Connection` says `close` when the connection ends after this response (`keep-alive`
/// to an HTTP/1.0 client when it does not).
#[doc(hidden)] // public for the benches
pub fn encode_head(
    parts: &http::response::Parts,
    fields: Option<&Fields>,
    body_length: Option<u64>,
    method: &Method,
    version: Version,
    keep_alive: bool,
    out: &mut Vec<u8>,
) -> Framing {
    let status = parts.status;
    // An HTTP/1.0 client is answered in its version, as hyper answers it.
    out.extend_from_slice(if version == Version::HTTP_10 { b"HTTP/1.0 " } else { b"HTTP/1.1 " });
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    // The server's reason phrase, as it wrote it; else the usual one, if the code has one
    // (the phrase may be empty, RFC 9112 section 4).
    let reason = fields.and_then(Fields::reason).or(status.canonical_reason().map(str::as_bytes));
    out.extend_from_slice(reason.unwrap_or_default());
    out.extend_from_slice(b"\r\n");
    let mut has_date = false;
    // The length is written below (a server's is not among its fields: `h1::parse_head`).
    for (name, line) in fields.iter().flat_map(|f| f.lines()) {
        has_date |= name.eq_ignore_ascii_case(b"date");
        out.extend_from_slice(line);
        out.extend_from_slice(b"\r\n");
    }
    for (name, value) in &parts.headers {
        match *name {
            header::CONTENT_LENGTH | header::TRANSFER_ENCODING | header::CONNECTION => continue,
            header::DATE => has_date = true,
            _ => {}
        }
        h1::push_field(name, value, out);
    }
    // RFC 9110 sections 6.4.1, 8.6: no body for these, and no length for 1xx and 204.
    let no_body = *method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let may_have_length = !(status.is_informational() || status == StatusCode::NO_CONTENT);
    let declared = fields
        .and_then(|f| f.length)
        .or_else(|| parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok()));
    let length = declared.or(body_length);
    let framing = match length {
        _ if no_body => Framing::Empty,
        Some(n) => Framing::Length(n),
        None if version == Version::HTTP_11 => Framing::Chunked,
        None => Framing::Close,
    };
    match length {
        // A length the server declared stands (for HEAD and 304 too); an implicit empty
        // body of a HEAD or 304 answer says nothing of the resource's size.
        Some(n) if may_have_length && (declared.is_some() || n > 0 || !no_body) => {
            h1::push_length(n, out);
        }
        _ => {}
    }
    if framing == Framing::Chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if !keep_alive || framing == Framing::Close {
        out.extend_from_slice(b"connection: close\r\n");
    } else if version == Version::HTTP_10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    if !has_date {
        push_date(out);
    }
    out.extend_from_slice(b"\r\n");
    framing
}

/// The trailer fields a chunked response may carry: those its `Trailer` field names.
fn trailer_names(headers: &HeaderMap, fields: Option<&Fields>, framing: Framing) -> Vec<HeaderName> {
    if framing != Framing::Chunked {
        return Vec::new();
    }
    let server = fields.into_iter().flat_map(|f| f.values("trailer"));
    server
        .chain(headers.get_all(header::TRAILER).iter().map(HeaderValue::as_bytes))
        .filter_map(|v| std::str::from_utf8(v).ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect()
}

/// The trailers that were announced and may be trailers at all (RFC 9110 section 6.5.1).
fn allowed_trailers(trailers: HeaderMap, announced: &[HeaderName]) -> HeaderMap {
    let mut allowed = HeaderMap::new();
    let mut last = None;
    for (name, value) in trailers {
        let name = match name {
            Some(n) => {
                last = Some(n.clone());
                n
            }
            None => match &last {
                Some(n) => n.clone(),
                None => continue,
            },
        };
        if announced.contains(&name) && hop::may_be_trailer(&name) {
            allowed.append(name, value);
        }
    }
    allowed
}

/// Appends the `Date` field, formatted at most once a second per thread.
fn push_date(out: &mut Vec<u8>) {
    thread_local! {
        static DATE: RefCell<(u64, [u8; 29])> = const { RefCell::new((u64::MAX, [0; 29])) };
    }
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    DATE.with(|cached| {
        let mut cached = cached.borrow_mut();
        if cached.0 != secs {
            let text = httpdate::fmt_http_date(now);
            if text.len() == 29 {
                cached.1.copy_from_slice(text.as_bytes());
                cached.0 = secs;
            }
        }
        if cached.0 == secs {
            out.extend_from_slice(b"date: ");
            out.extend_from_slice(&cached.1);
            out.extend_from_slice(b"\r\n");
        }
    });
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parse_all(raw: &str) -> (Vec<Parsed>, BytesMut) {
        let mut buf = BytesMut::from(raw.as_bytes());
        let mut out = Vec::new();
        loop {
            let p = parse(&mut buf, 8192);
            let more = matches!(p, Parsed::Ours(..));
            out.push(p);
            if !more || buf.is_empty() {
                return (out, buf);
            }
        }
    }

    /// All of a parsed request's fields, map and raw, names lower-cased, sorted.
    fn all_fields(p: &Parsed) -> Vec<(String, Vec<u8>)> {
        let Parsed::Ours(r, _, raw) = p else { panic!("not parsed") };
        let mut all: Vec<(String, Vec<u8>)> =
            r.headers().iter().map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec())).collect();
        all.extend(raw.iter().map(|(n, v)| (String::from_utf8(n.to_ascii_lowercase()).unwrap(), v.to_vec())));
        all.sort_unstable();
        all
    }

    fn ours(p: &Parsed) -> (&Request<ClientBody>, bool) {
        match p {
            Parsed::Ours(r, asks, _) => (r, asks.keep_alive),
            Parsed::Partial => panic!("partial"),
            Parsed::NotOurs | Parsed::Refused(_) => panic!("not ours"),
        }
    }

    #[test]
    fn bodiless_requests_are_parsed_pipelined_and_keep_alive_follows_the_version() {
        let raw = "GET /a?b=1 HTTP/1.1\r\nHost: x.test\r\nX-A: 1\r\nX-A: 2\r\n\r\n\
                   HEAD / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n\
                   DELETE /d HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n\
                   GET / HTTP/1.0\r\n\r\n\
                   GET / HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\nGET /par";
        let (parsed, rest) = parse_all(raw);
        assert_eq!(parsed.len(), 6);
        let (r, keep) = ours(&parsed[0]);
        assert_eq!((r.method(), r.uri().path(), r.uri().query(), keep), (&Method::GET, "/a", Some("b=1"), true));
        assert_eq!(
            all_fields(&parsed[0]),
            [("host".into(), b"x.test".to_vec()), ("x-a".into(), b"1".to_vec()), ("x-a".into(), b"2".to_vec())]
        );
        let (r, keep) = ours(&parsed[1]);
        assert_eq!((r.method(), r.version(), keep), (&Method::HEAD, Version::HTTP_10, true));
        let (r, keep) = ours(&parsed[2]);
        assert_eq!((r.method(), keep), (&Method::DELETE, false));
        let (r, keep) = ours(&parsed[3]);
        assert_eq!((r.version(), keep), (Version::HTTP_10, false));
        // `close` wins over `keep-alive` (RFC 9112 section 9.3).
        assert!(!ours(&parsed[4]).1);
        assert!(matches!(parsed[5], Parsed::Partial));
        assert_eq!(&rest[..], b"GET /par");
    }

    #[test]
    fn te_trailers_is_noted() {
        for (te, want) in [("", false), ("TE: gzip\r\n", false), ("TE: gzip, Trailers\r\n", true)] {
            let raw = format!("GET / HTTP/1.1\r\nHost: x\r\n{te}Connection: TE\r\n\r\n");
            match parse(&mut BytesMut::from(raw.as_bytes()), 8192) {
                Parsed::Ours(_, asks, _) => assert_eq!(asks, Asks { keep_alive: true, trailers: want }, "{te:?}"),
                _ => panic!("{raw:?} not parsed"),
            }
        }
    }

    #[test]
    fn hop_by_hop_fields_are_left_out_and_te_trailers_put_back() {
        // X-Before comes before the Connection line that names it, X-Private after.
        let raw = "GET / HTTP/1.1\r\nHost: x\r\nX-Before: 0\r\nConnection: keep-alive, X-Private, TE, x-before\r\n\
                   X-Private: 1\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: gzip, trailers\r\n\
                   X-Kept: yes\r\nconnection: CLOSE\r\n\r\n";
        let (parsed, _) = parse_all(raw);
        let Parsed::Ours(_, asks, _) = &parsed[0] else { panic!("not parsed") };
        assert_eq!(*asks, Asks { keep_alive: false, trailers: true });
        let want = [("host", &b"x"[..]), ("te", b"trailers"), ("x-kept", b"yes")];
        assert_eq!(all_fields(&parsed[0]), want.map(|(n, v)| (n.to_owned(), v.to_vec())));
        let (_, keep) = ours(&parse_all("GET / HTTP/1.0\r\nCONNECTION: Keep-Alive\r\n\r\n").0[0]);
        assert!(keep, "HTTP/1.0 asking for keep-alive in capitals");
        // Host is what the request is routed by: naming it in Connection does not hide it.
        let (parsed, _) = parse_all("GET / HTTP/1.1\r\nHost: x\r\nConnection: host\r\n\r\n");
        let (r, _) = ours(&parsed[0]);
        assert_eq!(r.headers().get(header::HOST).map(HeaderValue::as_bytes), Some(&b"x"[..]));
    }

    #[test]
    fn bodies_and_upgrades_go_to_hyper_untouched() {
        for raw in [
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nhi",
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            "PUT / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 0\r\n\r\n",
            "CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n",
        ] {
            let mut buf = BytesMut::from(raw.as_bytes());
            assert!(matches!(parse(&mut buf, 8192), Parsed::NotOurs), "{raw:?} was taken");
            assert_eq!(&buf[..], raw.as_bytes(), "{raw:?} was consumed");
        }
    }

    /// The status the reader refuses `raw` with, if it does.
    fn refused(raw: &[u8], max_head: usize) -> Option<u16> {
        match parse(&mut BytesMut::from(raw), max_head) {
            Parsed::Refused(err) => Some(err.status().as_u16()),
            _ => None,
        }
    }

    #[test]
    fn bad_heads_are_refused_with_their_status() {
        for (raw, status) in [
            (&b"GET / HTTP/2.0\r\n\r\n"[..], 505),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
            (b"GET / HTTP/3.0\r\n\r\n", 505),
            (b"GET / HTTP/1.10\r\n\r\n", 400), // not a version at all
            (b"GET /\x01 HTTP/1.1\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nBad Name: 1\r\n\r\n", 400),
            (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400), // a TLS ClientHello
            (b"GET http://[::1/ HTTP/1.1\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello", 400),
            (b"POST / HTTP/1.1\r\nContent-Length: 5, 6\r\n\r\nhello", 400),
            // Lists, even of one length, are refused: hyper, which reads bodies, takes none.
            (b"POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\nhello", 400),
            (b"POST / HTTP/1.1\r\nContent-Length: 0, 0\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nContent-Length: 18446744073709551615\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n", 400),
            // Not a version: 400, not 505.
            (b"GET / http/1.1\r\n\r\n", 400),
            (b"GET / FOO/1.1\r\n\r\n", 400),
            (b"GET / HTTP/1.a\r\n\r\n", 400),
            (b"GET / HTTP/1.20\r\n\r\n", 400),
            (b"GET / HTTP/12.0\r\n\r\n", 400),
            (b"GET / HTTP/1.2 HTTP/1.1\r\n\r\n", 400),
            (b"GET / x HTTP/1.2\r\n\r\n", 400),
            (b"GET /a b HTTP/2.0\r\n\r\n", 400),
            (b"\r\nGET / HTTP/2.0\r\n\r\n", 505),
            (b"POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\nhello", 400),
            (b"POST / HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 1\r\n\r\nh", 400),
        ] {
            assert_eq!(refused(raw, 8192), Some(status), "{:?}", String::from_utf8_lossy(raw));
        }
        // Over the head limit, whole or not yet whole: 431; the request line alone: 414.
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(300));
        assert_eq!(refused(big.as_bytes(), 256), Some(431));
        assert_eq!(refused(&big.as_bytes()[..280], 256), Some(431));
        assert!(matches!(parse(&mut BytesMut::from(&big.as_bytes()[..200]), 256), Parsed::Partial));
        let long = format!("GET /{} HTTP/1.1\r\n", "a".repeat(300));
        assert_eq!(refused(long.as_bytes(), 256), Some(414));
        assert_eq!(refused(&long.as_bytes()[..260], 256), Some(414));
        assert_eq!(refused(format!("\r\n{long}").as_bytes(), 256), Some(414));
        // Empty lines past the limit (the request line never began): no panic, 414.
        assert_eq!(refused(&[b'\n'; 300], 256), Some(414));
        assert_eq!(refused(&[b'\n'; 300], 299), Some(414));
        let late = [&[b'\n'; 300][..], b"GET / HTTP/1.1\r\n\r\n"].concat();
        assert_eq!(refused(&late, 256), Some(414));
        // A target longer than a `Uri` takes, in a head limit that allows it: 414.
        let huge = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(70_000));
        assert_eq!(refused(huge.as_bytes(), 1 << 20), Some(414));
        let long = format!("GET /{} HTTP/1.2\r\n", "a".repeat(300));
        assert_eq!(refused(long.as_bytes(), 256), Some(414));
        let many: String = (0..=h1::MAX_HEADERS).map(|i| format!("X-{i}: 1\r\n")).collect();
        assert_eq!(refused(format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes(), 8192), Some(431));
    }

    #[test]
    fn a_length_of_zero_however_written_is_no_body() {
        for cl in ["0", "0\r\nContent-Length: 00"] {
            let raw = format!("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {cl}\r\n\r\n");
            let (parsed, _) = parse_all(&raw);
            assert_eq!(all_fields(&parsed[0]), [("host".to_owned(), b"x".to_vec())], "{cl:?}");
        }
    }

    #[test]
    fn later_minor_versions_are_read_as_http_1_1() {
        for raw in [
            "GET /a HTTP/1.2\r\nHost: x\r\n\r\n",
            "GET /a HTTP/1.9\nHost: x\n\n",
            "\r\n\r\nGET /a HTTP/1.2\r\nHost: x\r\n\r\n",
        ] {
            let (parsed, _) = parse_all(raw);
            let (r, keep) = ours(&parsed[0]);
            assert_eq!((r.uri().path(), r.version(), keep), ("/a", Version::HTTP_11, true), "{raw:?}");
        }
        // Still partial after the version: the rest is read as 1.1 once it comes.
        let mut buf = BytesMut::from(&b"GET /a HTTP/1.3"[..]);
        assert!(matches!(parse(&mut buf, 8192), Parsed::Partial));
        buf.extend_from_slice(b"\r\nHost: x\r\n\r\n");
        assert!(matches!(parse(&mut buf, 8192), Parsed::Ours(..)));
    }

    #[test]
    fn too_many_connection_names_and_overlong_names_go_to_hyper() {
        // A Connection naming more fields than a message may have (hyper's session then
        // reads it, and the proxy refuses it).
        let names: Vec<String> = (0..=hop::MAX_NAMED).map(|i| format!("x-{i}")).collect();
        let raw = format!("GET / HTTP/1.1\r\nHost: x\r\nConnection: {}\r\n\r\n", names.join(","));
        assert!(matches!(parse(&mut BytesMut::from(raw.as_bytes()), 8192), Parsed::NotOurs));
        let raw = format!("GET / HTTP/1.1\r\nHost: x\r\nConnection: {}\r\n\r\n", names[1..].join(","));
        assert!(matches!(parse(&mut BytesMut::from(raw.as_bytes()), 8192), Parsed::Ours(..)));
        // A name longer than `HeaderName` takes, within the head's limit.
        let long = |n: usize| format!("GET / HTTP/1.1\r\nHost: x\r\n{}: 1\r\n\r\n", "a".repeat(n));
        assert!(matches!(parse(&mut BytesMut::from(long(h1::MAX_NAME).as_bytes()), 1 << 20), Parsed::Ours(..)));
        assert!(matches!(parse(&mut BytesMut::from(long(h1::MAX_NAME + 1).as_bytes()), 1 << 20), Parsed::NotOurs));
    }

    #[test]
    fn a_clients_fields_reach_the_server_as_it_wrote_them() {
        // The head the server gets for `raw`, from an untrusted client, with only the
        // X-Forwarded-For of the forwarding fields; and the names in the request's map.
        let server_head = |raw: &[u8]| {
            let Parsed::Ours(req, _, fields) = parse(&mut BytesMut::from(raw), 8192) else { panic!("not parsed") };
            let names: Vec<String> = req.headers().keys().map(|n| n.as_str().to_owned()).collect();
            let (mut parts, _) = req.into_parts();
            let peer = forwarded::PeerValues::new([192, 0, 2, 7].into());
            let host = HeaderValue::from_static("fhir.example");
            let facts =
                forwarded::Facts { peer: &peer, trusted: false, proto: "https", host: &host, port: 443, prefix: None };
            let mut added = forwarded::forwarding(&mut parts.headers, &facts).fields;
            added.retain(|(name, _)| **name == forwarded::X_FORWARDED_FOR);
            let mut out = Vec::new();
            h1::encode_head(
                &h1::RequestHead { parts: &parts, fields: &fields, added: &added },
                Framing::Empty,
                &mut out,
            );
            (String::from_utf8_lossy(&out).into_owned(), names)
        };
        let (out, names) = server_head(
            b"GET /fhir/Patient?_count=2 HTTP/1.1\r\nUser-Agent: probe/1\r\nHOST: fhir.example\r\n\
              accept:application/fhir+json\r\nX-Forwarded-For: 6.6.6.6\r\nContent-Length: 0\r\n\
              Connection: keep-alive, X-Private\r\nX-Private: 1\r\nCookie: a=1\r\nAuthorization:  Bearer t \r\n\
              cookie: b=2\r\n\r\n",
        );
        // The map holds what the gateway reads; the rest stays raw.
        assert_eq!(names, ["host", "x-forwarded-for"]);
        assert_eq!(
            out,
            "GET /fhir/Patient?_count=2 HTTP/1.1\r\nhost: fhir.example\r\nUser-Agent: probe/1\r\n\
             accept:application/fhir+json\r\nCookie: a=1\r\nAuthorization:  Bearer t\r\ncookie: b=2\r\n\
             x-forwarded-for: 192.0.2.7\r\n\r\n",
            "the client's lines in their order, case and spacing; the spoofed address, the length, Connection \
             and what it names gone"
        );
        // Bare LF line ends become CRLF; names the gateway reads are told in any case;
        // empty values, tabs and obs-text pass as they came.
        let (out, names) = server_head(
            b"GET / HTTP/1.1\nhost: x\nx-FORWARDED-for: 6.6.6.6\ncontent-LENGTH: 0\nX-E:\nX-F:   \nX-T:\tv\t\nX-O: caf\xe9\n\n",
        );
        assert_eq!(names, ["host", "x-forwarded-for"]);
        assert_eq!(
            out,
            "GET / HTTP/1.1\r\nhost: x\r\nX-E:\r\nX-F:   \r\nX-T:\tv\r\nX-O: caf\u{fffd}\r\nx-forwarded-for: 192.0.2.7\r\n\r\n",
            "an empty value after spaces keeps them (they are the line's OWS); trailing OWS after a value goes"
        );
    }

    #[test]
    fn random_heads_reach_the_server_with_every_end_to_end_field_and_no_other() {
        use rand::{Rng as _, SeedableRng as _};
        // Names the reader treats each its own way, and plain ones; any case, any spacing.
        const NAMES: [&str; 14] = [
            "x-a",
            "X-B",
            "accept",
            "cookie",
            "user-agent",
            "x-forwarded-for",
            "forwarded",
            "x-request-id",
            "keep-alive",
            "proxy-connection",
            "te",
            "connection",
            "content-length",
            "x-named",
        ];
        let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
        let mut served = 0;
        for _ in 0..2000 {
            let eol = if rng.random_bool(0.2) { "\n" } else { "\r\n" };
            let mut raw = format!("GET /p HTTP/1.1{eol}Host: h.test{eol}");
            let mut sent: Vec<(String, String)> = Vec::new();
            for _ in 0..rng.random_range(0..12) {
                let name = NAMES[rng.random_range(0..NAMES.len())];
                let name: String =
                    name.chars().map(|c| if rng.random_bool(0.3) { c.to_ascii_uppercase() } else { c }).collect();
                let value = match name.to_ascii_lowercase().as_str() {
                    "connection" => {
                        ["keep-alive", "x-named", "close, X-Named", "te"][rng.random_range(0..4)].to_string()
                    }
                    "content-length" => "0".to_string(),
                    "te" => "trailers".to_string(),
                    _ => format!("v{}", rng.random_range(0..100)),
                };
                let (before, after) =
                    ([" ", "", "\t", "  "][rng.random_range(0..4)], ["", " ", "\t"][rng.random_range(0..3)]);
                raw.push_str(&format!("{name}:{before}{value}{after}{eol}"));
                sent.push((name, value));
            }
            raw.push_str(eol);
            let Parsed::Ours(req, _, fields) = parse(&mut BytesMut::from(raw.as_str()), 8192) else {
                // Only a second Content-Length is not the reader's here.
                let lengths = sent.iter().filter(|(n, _)| n.eq_ignore_ascii_case("content-length")).count();
                assert!(lengths > 1, "{raw:?} was not taken");
                continue;
            };
            served += 1;
            let (mut parts, _) = req.into_parts();
            let peer = forwarded::PeerValues::new([192, 0, 2, 7].into());
            let host = HeaderValue::from_static("h.test");
            let facts =
                forwarded::Facts { peer: &peer, trusted: false, proto: "http", host: &host, port: 80, prefix: None };
            let added = forwarded::forwarding(&mut parts.headers, &facts).fields;
            let mut out = Vec::new();
            h1::encode_head(
                &h1::RequestHead { parts: &parts, fields: &fields, added: &added },
                Framing::Empty,
                &mut out,
            );
            // What the server reads, by a strict parser.
            let mut slots = [httparse::EMPTY_HEADER; 64];
            let mut got = httparse::Request::new(&mut slots);
            assert!(matches!(got.parse(&out), Ok(httparse::Status::Complete(n)) if n == out.len()), "{raw:?}");
            assert!(out.windows(2).filter(|w| w[1] == b'\n').all(|w| w[0] == b'\r'), "bare LF in {out:?}");
            let named = sent
                .iter()
                .any(|(n, v)| n.eq_ignore_ascii_case("connection") && v.to_ascii_lowercase().contains("x-named"));
            let ours = ["keep-alive", "proxy-connection", "te", "connection", "content-length", "host"];
            let want: Vec<(String, String)> = sent
                .iter()
                .filter(|(n, _)| {
                    let n = n.to_ascii_lowercase();
                    let dropped = named && n == "x-named";
                    !(ours.contains(&n.as_str()) || forwarded::is_forwarding(n.as_bytes()) || dropped)
                })
                .cloned()
                .collect();
            // The forwarding fields are the gateway's alone (every value a client sent
            // here begins with `v`), and the client's address is the peer's.
            let forwarding: Vec<(String, &[u8])> = got
                .headers
                .iter()
                .filter(|h| forwarded::is_forwarding(h.name.as_bytes()))
                .map(|h| (h.name.to_ascii_lowercase(), h.value))
                .collect();
            assert!(forwarding.iter().all(|(_, v)| !v.starts_with(b"v")), "{raw:?}: {forwarding:?}");
            assert!(forwarding.contains(&("x-forwarded-for".into(), &b"192.0.2.7"[..])), "{forwarding:?}");
            let got: Vec<(String, String)> = got
                .headers
                .iter()
                .map(|h| (h.name.to_string(), String::from_utf8_lossy(h.value).into_owned()))
                .filter(|(n, _)| {
                    let n = n.to_ascii_lowercase();
                    n != "host" && n != "te" && !forwarded::is_forwarding(n.as_bytes())
                })
                .collect();
            assert_eq!(got, want, "{raw:?}");
            let server = String::from_utf8_lossy(&out).to_ascii_lowercase();
            assert_eq!(server.matches("\r\nhost: h.test\r\n").count(), 1, "{server}");
        }
        assert!(served > 1500, "{served} of 2000 heads served by the own reader");
    }

    fn head(resp: http::Response<RespBody>, method: Method, version: Version, keep_alive: bool) -> (String, Framing) {
        let (parts, body) = resp.into_parts();
        let mut out = Vec::new();
        let framing = encode_head(&parts, None, body.size_hint().exact(), &method, version, keep_alive, &mut out);
        (String::from_utf8(out).unwrap(), framing)
    }

    #[test]
    fn response_heads_carry_their_framing_connection_and_date() {
        let text = || super::super::text(StatusCode::NOT_FOUND, "no\n");
        let (h, f) = head(text(), Method::GET, Version::HTTP_11, true);
        assert!(h.starts_with("HTTP/1.1 404 Not Found\r\n"), "{h}");
        assert!(h.contains("content-length: 3\r\n") && h.contains("\r\ndate: ") && h.ends_with("\r\n\r\n"), "{h}");
        assert!(!h.contains("connection"), "{h}");
        assert_eq!(f, Framing::Length(3));
        // HEAD: the length is told, no body follows.
        let (h, f) = head(text(), Method::HEAD, Version::HTTP_11, true);
        assert!(h.contains("content-length: 3\r\n"), "{h}");
        assert_eq!(f, Framing::Empty);
        // HTTP/1.0 is answered in its version, and keep-alive is said; so is the end of a
        // connection.
        let (h, _) = head(text(), Method::GET, Version::HTTP_10, true);
        assert!(h.starts_with("HTTP/1.0 404 Not Found\r\n") && h.contains("connection: keep-alive\r\n"), "{h}");
        let (h, _) = head(text(), Method::GET, Version::HTTP_11, false);
        assert!(h.contains("connection: close\r\n"), "{h}");
        // A code without a reason phrase gets an empty one.
        let mut r = http::Response::new(RespBody::empty());
        *r.status_mut() = StatusCode::from_u16(599).unwrap();
        assert!(head(r, Method::GET, Version::HTTP_11, true).0.starts_with("HTTP/1.1 599 \r\n"));
        // 204 and 304: no body, no implicit length.
        for status in [StatusCode::NO_CONTENT, StatusCode::NOT_MODIFIED] {
            let mut r = http::Response::new(RespBody::empty());
            *r.status_mut() = status;
            let (h, f) = head(r, Method::GET, Version::HTTP_11, true);
            assert!(!h.contains("content-length"), "{h}");
            assert_eq!(f, Framing::Empty);
        }
        // A declared length stands; a date of the response's own is kept, not doubled.
        let mut r = http::Response::new(RespBody::empty());
        r.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from_static("42"));
        r.headers_mut().insert(header::DATE, HeaderValue::from_static("Thu, 26 Nov 2026 16:00:00 GMT"));
        let (h, f) = head(r, Method::HEAD, Version::HTTP_11, true);
        assert!(h.contains("content-length: 42\r\n") && h.matches("date: ").count() == 1, "{h}");
        assert_eq!(f, Framing::Empty);
    }

    #[test]
    fn a_servers_fields_are_written_as_it_wrote_them() {
        let raw = "HTTP/1.1 200 OK\r\nX-Mixed-Case: a\r\nSet-Cookie: a=1\r\nDate: Thu, 26 Nov 2026 16:00:00 GMT\r\n\
                   Content-Length:  3 \r\nConnection: X-Private\r\nX-Private: 1\r\nset-cookie:b=2\n\
                   Trailer: x-sum  \r\n\r\n";
        let mut added = http::Response::new(RespBody::empty());
        added.headers_mut().insert("x-added", HeaderValue::from_static("yes"));
        let (parts, body) = added.into_parts();
        // The server's head read for `method`, and the client's head written from it.
        let write = |method: Method| {
            let server = h1::parse_head(&mut BytesMut::from(raw), &method).unwrap().unwrap();
            let mut out = Vec::new();
            let framing = encode_head(
                &parts,
                Some(&server.fields),
                body.size_hint().exact(),
                &method,
                Version::HTTP_11,
                true,
                &mut out,
            );
            (server, String::from_utf8(out).unwrap(), framing)
        };
        let (_, out, framing) = write(Method::GET);
        assert_eq!(framing, Framing::Length(3));
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\nX-Mixed-Case: a\r\nSet-Cookie: a=1\r\nDate: Thu, 26 Nov 2026 16:00:00 GMT\r\n\
             set-cookie:b=2\r\nTrailer: x-sum\r\nx-added: yes\r\ncontent-length: 3\r\n\r\n",
            "in order, case and spacing, each line ended by CRLF, the hop-by-hop ones gone, the length \
             ours, the server's date alone"
        );
        // For HEAD the server's length stands though no body follows.
        let (server, out, framing) = write(Method::HEAD);
        assert_eq!(framing, Framing::Empty);
        assert!(out.contains("\r\ncontent-length: 3\r\n"));
        assert_eq!(trailer_names(&HeaderMap::new(), Some(&server.fields), Framing::Chunked), ["x-sum"]);
        // In a map (for hyper's clients), the same fields, values shared with the head.
        let mut map = HeaderMap::new();
        server.fields.append_to(&mut map);
        let cookies: Vec<&str> = map.get_all("set-cookie").iter().map(|v| v.to_str().unwrap()).collect();
        assert_eq!(cookies, ["a=1", "b=2"]);
        assert_eq!(
            (map.len(), map["x-mixed-case"].as_bytes(), map["content-length"].as_bytes()),
            (6, &b"a"[..], &b"3"[..])
        );
        assert!(!map.contains_key("x-private") && !map.contains_key("connection"));
    }

    #[test]
    fn only_announced_and_permitted_trailers_are_sent() {
        let mut headers = HeaderMap::new();
        headers.insert(header::TRAILER, HeaderValue::from_static("x-sum, content-type"));
        let names = trailer_names(&headers, None, Framing::Chunked);
        assert!(trailer_names(&headers, None, Framing::Length(1)).is_empty());
        let mut t = HeaderMap::new();
        t.insert("x-sum", HeaderValue::from_static("1"));
        t.insert("x-other", HeaderValue::from_static("2"));
        t.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        let allowed = allowed_trailers(t, &names);
        assert_eq!(allowed.len(), 1);
        assert_eq!(allowed["x-sum"], "1");
    }
}
