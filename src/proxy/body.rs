//! Body types of the proxy: what goes to a server, and what comes back to a client.
//!
//! Request bodies stream unless small enough to hold for a retry; response bodies stream
//! through a wrapper that keeps the server's in-flight guard, hands the upstream
//! connection back to its pool at the end, and writes the access log and metrics once.
//! Nothing buffers a whole large body: memory per request is bounded by the read
//! buffers plus `retry_body_bytes`.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use std::net::SocketAddr;
use std::time::Instant;

use super::h1::{Fields, ResponseBody};
use super::{AccessLog, Done};
use crate::upstream::server::InFlight;

/// A request body as the client side hands it over.
#[derive(Debug)]
pub enum ClientBody {
    /// No body: the requests the gateway's own HTTP/1.1 reader serves (see `front`),
    /// whose heads come without hop-by-hop fields (so the proxy does not strip them).
    /// Their map holds the fields the gateway reads; the others come beside the request
    /// as the client wrote them (see `proxy::handle`).
    Empty,
    /// hyper's: HTTP/2, and HTTP/1.1 requests that carry a body.
    Hyper(Incoming),
}

/// The body sent to a server.
#[derive(Debug)]
pub enum ReqBody {
    Empty,
    /// Fully read and small: can be sent again on a retry.
    Held {
        data: Option<Bytes>,
        trailers: Option<HeaderMap>,
    },
    /// Already-read head (if any) followed by the rest of the client's body.
    Stream {
        head: Option<Bytes>,
        rest: Incoming,
    },
}

impl ReqBody {
    /// A copy for another attempt, when the body can be replayed.
    pub fn replay(&self) -> Option<ReqBody> {
        match self {
            ReqBody::Empty => Some(ReqBody::Empty),
            ReqBody::Held { data, trailers } => Some(ReqBody::Held { data: data.clone(), trailers: trailers.clone() }),
            ReqBody::Stream { .. } => None,
        }
    }
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ReqBody::Empty => Poll::Ready(None),
            ReqBody::Held { data, trailers } => {
                if let Some(d) = data.take() {
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(t))))
            }
            ReqBody::Stream { head, rest } => {
                if let Some(h) = head.take() {
                    return Poll::Ready(Some(Ok(Frame::data(h))));
                }
                Pin::new(rest).poll_frame(cx)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Empty => true,
            ReqBody::Held { data, trailers } => data.is_none() && trailers.is_none(),
            ReqBody::Stream { head, rest } => head.is_none() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Empty => SizeHint::with_exact(0),
            ReqBody::Held { data, .. } => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
            ReqBody::Stream { head, rest } => {
                let head_len = head.as_ref().map_or(0, |h| h.len() as u64);
                let r = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(r.lower() + head_len);
                if let Some(u) = r.upper() {
                    hint.set_upper(u + head_len);
                }
                hint
            }
        }
    }
}

/// What reading the start of a client body found.
pub enum Prefetched {
    Body(ReqBody),
    /// The client's body was malformed (bad chunking, cut short): 400, nothing sent on.
    Malformed(hyper::Error),
    /// None of the body came within the wait: 408, nothing sent on.
    Stalled,
}

/// Whether a request body's error says its client went away (its connection closed or
/// reset mid-body, its HTTP/2 stream cancelled) rather than sent something malformed.
pub fn client_went_away(e: &hyper::Error) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
    if e.is_incomplete_message() {
        return true;
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            if matches!(io.kind(), UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe) {
                return true;
            }
        }
        if let Some(h2) = s.downcast_ref::<h2::Error>() {
            if h2.reason() == Some(h2::Reason::CANCEL) || h2.is_io() {
                return true;
            }
        }
        source = s.source();
    }
    false
}

/// Reads what the client has already sent of its body, up to `limit` bytes, without
/// waiting for more than the first frame: a body that ends within it is held (it can be
/// replayed), a longer one streams on. Waiting for the first frame also catches a
/// malformed body before any server sees the request; the first frame is waited for
/// `wait` at most (a head whose body never comes must not hold a request open).
pub async fn prefetch(body: ClientBody, limit: usize, wait: std::time::Duration) -> Prefetched {
    let mut body = match body {
        ClientBody::Hyper(body) => body,
        ClientBody::Empty => return Prefetched::Body(ReqBody::Empty),
    };
    if body.is_end_stream() {
        return Prefetched::Body(ReqBody::Empty);
    }
    let mut held: Vec<Bytes> = Vec::new();
    let mut size = 0usize;
    let mut first = true;
    loop {
        let next = if first {
            first = false;
            let frame = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx));
            match tokio::time::timeout(wait, frame).await {
                Ok(frame) => frame,
                Err(_) => return Prefetched::Stalled,
            }
        } else {
            // Only frames that are already here: never wait on a client that may be
            // waiting for our response before it sends more.
            match std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await {
                Poll::Ready(f) => f,
                Poll::Pending => return Prefetched::Body(stream(held, body)),
            }
        };
        match next {
            None => {
                return Prefetched::Body(ReqBody::Held { data: concat(held), trailers: None });
            }
            Some(Err(e)) => return Prefetched::Malformed(e),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    size += data.len();
                    held.push(data);
                    if body.is_end_stream() {
                        return Prefetched::Body(ReqBody::Held { data: concat(held), trailers: None });
                    }
                    if size > limit {
                        return Prefetched::Body(stream(held, body));
                    }
                }
                Err(frame) => {
                    let trailers = frame.into_trailers().ok();
                    return Prefetched::Body(ReqBody::Held { data: concat(held), trailers });
                }
            },
        }
    }
}

fn concat(mut parts: Vec<Bytes>) -> Option<Bytes> {
    match parts.len() {
        0 => None,
        1 => parts.pop(),
        _ => Some(parts.concat().into()),
    }
}

fn stream(held: Vec<Bytes>, rest: Incoming) -> ReqBody {
    ReqBody::Stream { head: concat(held), rest }
}

/// The body sent to a client.
pub enum RespBody {
    /// A short answer of the gateway's own.
    Local(Option<Bytes>),
    /// A server's body, streamed. The fields of the server's head ride with it (see
    /// [`Fields`]): a response's fields are those and the ones in its `HeaderMap`.
    /// Boxed, with what runs at its end: a response is moved from function to function on
    /// its way to the client, 152 bytes each time rather than 320 (and one allocation per
    /// response either way; the end's work was boxed alone before).
    Upstream(Box<UpstreamBody>),
    /// A server's answer to an upgrade it refused, streamed as hyper reads it from the
    /// upgrade's own connection.
    Refused(Box<RefusedBody>),
}

/// The body of a refused upgrade's answer: its server counts it in flight, and its
/// access-log line waits, until it ends (fully sent, failed or dropped).
pub struct RefusedBody {
    body: Incoming,
    _in_flight: InFlight,
    /// The line, and what it says beside the bytes sent and whether they all were.
    log: Option<Box<AccessLog>>,
    status: u16,
    server: SocketAddr,
    start: Instant,
    bytes: u64,
}

impl RefusedBody {
    pub(super) fn new(
        body: Incoming,
        in_flight: InFlight,
        log: Option<Box<AccessLog>>,
        status: u16,
        server: SocketAddr,
        start: Instant,
    ) -> Box<Self> {
        let mut refused = Box::new(RefusedBody { body, _in_flight: in_flight, log, status, server, start, bytes: 0 });
        if refused.body.is_end_stream() {
            // Nothing to stream (e.g. Content-Length: 0): hyper will not poll it.
            refused.done(true);
        }
        refused
    }

    fn done(&mut self, complete: bool) {
        if let Some(log) = self.log.take() {
            log.write(self.status, Some(self.server), self.start.elapsed(), self.bytes, complete);
        }
    }
}

impl Drop for RefusedBody {
    fn drop(&mut self) {
        self.done(false);
    }
}

impl RespBody {
    /// The server's fields of a proxied response.
    pub fn fields(&self) -> Option<&Fields> {
        match self {
            RespBody::Upstream(b) => Some(b.inner.fields()),
            RespBody::Local(_) | RespBody::Refused(_) => None,
        }
    }

    /// The server answered before the request body was all sent and will not take the
    /// rest (see `h1::Head::cuts_upload`).
    pub fn cuts_upload(&self) -> bool {
        matches!(self, RespBody::Upstream(b) if b.inner.cuts_upload())
    }

    /// Takes the server's fields out, for a client that needs them in a `HeaderMap`.
    pub fn take_fields(&mut self) -> Option<Fields> {
        match self {
            RespBody::Upstream(b) => Some(b.inner.take_fields()),
            RespBody::Local(_) | RespBody::Refused(_) => None,
        }
    }

    pub fn text(text: &'static str) -> Self {
        RespBody::Local(Some(Bytes::from_static(text.as_bytes())))
    }

    pub fn from_bytes(bytes: Bytes) -> Self {
        RespBody::Local(if bytes.is_empty() { None } else { Some(bytes) })
    }

    pub fn empty() -> Self {
        RespBody::Local(None)
    }
}

/// A server's response body; runs its [`Done`] exactly once, when the body ends (fully
/// sent, failed or dropped).
pub struct UpstreamBody {
    inner: ResponseBody,
    bytes: u64,
    done: Option<Done>,
}

impl UpstreamBody {
    pub(crate) fn new(inner: ResponseBody, done: Done) -> Box<Self> {
        let mut body = Box::new(UpstreamBody { inner, bytes: 0, done: Some(done) });
        if body.inner.is_end_stream() {
            // Nothing to stream (e.g. 204, 304, Content-Length: 0): hyper will not poll it.
            body.done(true);
        }
        body
    }

    fn done(&mut self, complete: bool) {
        if let Some(done) = self.done.take() {
            let reusable = if complete { self.inner.reusable() } else { None };
            done.finish(complete, self.bytes, reusable);
        }
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        self.done(false);
    }
}

/// Counts a streamed body's frame into `bytes`; once the body has ended, whether it
/// was whole (its last frame, or its end) or not (an error).
fn ended<E>(frame: &Option<Result<Frame<Bytes>, E>>, bytes: &mut u64, at_end: impl FnOnce() -> bool) -> Option<bool> {
    match frame {
        Some(Ok(f)) => {
            *bytes += f.data_ref().map_or(0, |d| d.len() as u64);
            at_end().then_some(true)
        }
        None => Some(true),
        Some(Err(_)) => Some(false),
    }
}

impl Body for RespBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<std::io::Result<Frame<Bytes>>>> {
        match self.get_mut() {
            RespBody::Local(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            RespBody::Upstream(u) => {
                let frame = ready!(u.inner.poll_frame(cx));
                if let Some(complete) = ended(&frame, &mut u.bytes, || u.inner.is_end_stream()) {
                    u.done(complete);
                }
                Poll::Ready(frame)
            }
            RespBody::Refused(r) => {
                let frame = ready!(Pin::new(&mut r.body).poll_frame(cx));
                if let Some(complete) = ended(&frame, &mut r.bytes, || r.body.is_end_stream()) {
                    r.done(complete);
                }
                Poll::Ready(frame.map(|f| f.map_err(std::io::Error::other)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RespBody::Local(b) => b.is_none(),
            RespBody::Upstream(u) => u.inner.is_end_stream(),
            RespBody::Refused(r) => r.body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RespBody::Local(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            RespBody::Upstream(u) => u.inner.size_hint(),
            RespBody::Refused(r) => r.body.size_hint(),
        }
    }
}
