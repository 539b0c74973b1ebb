//! What a client connection is doing, for its timeouts: requests (streams) open, when
//! that last changed, and when the head of the next HTTP/1.1 request began to arrive.
//!
//! - HTTP/1.1: a request head must be complete within `header_read_timeout` of its first
//!   byte (or of the connection's start, for the first request): slowloris gets closed.
//!   A kept-alive connection with no request open and no byte arriving is closed after
//!   `idle_timeout`. Nothing here is enforced while a request is open (a long download,
//!   or a slow server, is not idleness); the kernel closes a client that is gone or takes
//!   none of its response for 90 s (see `listener::UNACKED_TIMEOUT`).
//! - HTTP/2: closed (GOAWAY) when no stream has been open for `idle_timeout`. A stream
//!   that neither its client nor its server moves for `idle_timeout` (or a second past the
//!   longest `response_timeout`, if longer) is reset ([`Streams`]): a client that never opens its
//!   flow-control window would otherwise hold the stream's server request for good.
//!
//! A request counts from its head until its response body is done or dropped (the own
//! reader's exchange, or [`Tracked`] for hyper's), so a streaming response keeps its
//! connection busy.
//!
//! It also tells when an HTTP/1.1 connection may be parked ([`Expired::Park`]): idle
//! long enough that its read buffer, or hyper's session, and its serving task are better
//! freed than kept (see `listener::serving` and `listener::park`). While a hyper session
//! is ended to park, [`Watched`] swallows the shutdown hyper sends, so the socket stays
//! open for the next request.

use std::cell::Cell;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// Shared by a connection's IO wrapper, its service and its watchdog.
pub(super) struct Activity {
    /// `header_read_timeout` (HTTP/1.1 only) and `idle_timeout`.
    header: Option<Duration>,
    idle: Duration,
    open: AtomicUsize,
    born: Instant,
    /// Milliseconds after `born` of the last time a request closed.
    last_change_ms: AtomicU64,
    /// 1 + milliseconds after `born` when the first byte of the next request head came
    /// (0: none yet). Starts at 1: the first head is timed from the connection's start.
    head_started_ms: AtomicU64,
    /// Requests seen so far.
    requests: AtomicU64,
    /// A request asked to close the connection after its response: never parked then.
    closing: AtomicBool,
    /// The session is being ended to park the connection: shutdowns are not passed on.
    parking: AtomicBool,
}

/// Why a watchdog completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Expired {
    Idle,
    SlowHead,
    /// Idle long enough to park (only when asked for).
    Park,
}

impl Activity {
    pub(super) fn new(header: Option<Duration>, idle: Duration) -> Arc<Self> {
        Arc::new(Activity {
            header,
            idle,
            open: AtomicUsize::new(0),
            born: Instant::now(),
            last_change_ms: AtomicU64::new(0),
            head_started_ms: AtomicU64::new(1),
            requests: AtomicU64::new(0),
            closing: AtomicBool::new(false),
            parking: AtomicBool::new(false),
        })
    }

    /// Requests seen so far on the connection.
    pub(super) fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// No request (or tunnel) is open on the connection.
    pub(super) fn is_idle(&self) -> bool {
        self.open.load(Ordering::Relaxed) == 0
    }

    /// The client asked for the connection to end after the current response.
    pub(super) fn set_closing(&self) {
        self.closing.store(true, Ordering::Relaxed);
    }

    /// While set, the IO's `poll_shutdown` succeeds without shutting anything down.
    pub(super) fn set_parking(&self, parking: bool) {
        self.parking.store(parking, Ordering::Relaxed);
    }

    fn now_ms(&self) -> u64 {
        self.born.elapsed().as_millis() as u64
    }

    fn at(&self, ms: u64) -> Instant {
        self.born + Duration::from_millis(ms)
    }

    /// Bytes of a request head have arrived (counted only between requests).
    pub(super) fn head_begun(&self) {
        if self.open.load(Ordering::Relaxed) == 0 && self.head_started_ms.load(Ordering::Relaxed) == 0 {
            self.head_started_ms.store(self.now_ms() + 1, Ordering::Relaxed);
        }
    }

    /// Completes when the connection should be closed (see the module docs) or, given
    /// `park`, parked: idle that long with no request open, no head begun and no request
    /// having asked to close. One timer for all three, as it is polled at every wake-up
    /// of the connection's task.
    ///
    /// A block rather than an `async fn`, which would keep a second copy of its arguments
    /// for its whole life: every connection holds one of these.
    #[allow(clippy::manual_async_fn)] // an `async fn` would keep `park` twice
    pub(super) fn expired(&self, park: Option<Duration>) -> impl Future<Output = Expired> + Send + '_ {
        // Nothing wakes the watchdog when the state changes, so it never sleeps past
        // `now + step`: a change at `c > now` can only set a deadline of `c + header`,
        // `c + idle` or `c + park`, all later than that. (Sleeping until the deadline of
        // the state seen would overshoot when a change brings it earlier: a request
        // ending, or the next head starting, while the first head's or an open request's
        // wait runs.) The step is worked out at each wake-up rather than kept: every
        // connection holds one of these futures, and 16 bytes less took a plain
        // connection's task (tokio aligns it to 128 bytes) from 896 to 768 bytes.
        async move {
            loop {
                let step = self.header.map_or(self.idle, |h| h.min(self.idle));
                let step = park.map_or(step, |p| p.min(step));
                let now = Instant::now();
                let wake = if self.open.load(Ordering::Relaxed) > 0 {
                    now + step
                } else {
                    let (deadline, why) = self.deadline_and_why(park);
                    if now >= deadline {
                        return why;
                    }
                    deadline.min(now + step)
                };
                tokio::time::sleep_until(wake).await;
            }
        }
    }

    /// When a connection with no request open times out (its head's deadline once one
    /// has begun, else its idle deadline).
    pub(super) fn deadline(&self) -> Instant {
        self.deadline_and_why(None).0
    }

    /// The earliest deadline of a connection with no request open, and what it means.
    fn deadline_and_why(&self, park: Option<Duration>) -> (Instant, Expired) {
        let (header, idle) = (self.header, self.idle);
        let head = self.head_started_ms.load(Ordering::Relaxed);
        let last = self.at(self.last_change_ms.load(Ordering::Relaxed));
        let (deadline, why) = match header {
            Some(h) if head != 0 => (self.at(head - 1) + h, Expired::SlowHead),
            _ => (last + idle, Expired::Idle),
        };
        match park.filter(|_| head == 0 && !self.closing.load(Ordering::Relaxed)) {
            Some(p) if last + p < deadline => (last + p, Expired::Park),
            _ => (deadline, why),
        }
    }
}

/// One request open on a connection, until dropped.
pub(super) struct RequestGuard(Arc<Activity>);

impl RequestGuard {
    pub(super) fn open(activity: &Arc<Activity>) -> Self {
        activity.open.fetch_add(1, Ordering::Relaxed);
        activity.requests.fetch_add(1, Ordering::Relaxed);
        activity.head_started_ms.store(0, Ordering::Relaxed);
        // `last_change_ms` is only read while no request is open: the guard's drop sets
        // it, and a clock read here would buy nothing.
        RequestGuard(Arc::clone(activity))
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.last_change_ms.store(self.0.now_ms(), Ordering::Relaxed);
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Runs an HTTP/2 connection's tasks, each in its own tokio task: its streams, which are
/// reset when nothing moves them for `stall` once their response body has begun (see
/// [`StalledStream`]), and the pumps of its upgraded streams (tunnels, which may idle).
/// Like the connection's other limits, the bound is the configuration's when the
/// connection began.
#[derive(Clone, Copy)]
pub(super) struct Streams {
    pub(super) stall: Duration,
}

impl<F> hyper::rt::Executor<F> for Streams
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, stream: F) {
        tokio::spawn(StalledStream { stream, stall: self.stall, moved: false, timer: None });
    }
}

/// HTTP/2 streams reset by [`StalledStream`] (`swarmgate_h2_streams_stalled_total`).
/// Process-wide, as the gateway is: a stream's task has no handle on the gateway's
/// metrics, and one per stream would be a shared reference count taken per request.
pub(crate) static STALLED_STREAMS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// Set when a response body ([`Tracked`]) is polled: tells [`StalledStream`] that the
    /// task it runs is a stream whose response body has begun (hyper's types for its
    /// tasks cannot be named, and a tunnel's pump polls no body).
    static BODY_POLLED: Cell<bool> = const { Cell::new(false) };
}

pin_project! {
    /// An HTTP/2 task, ended when its response body has begun and it has then not been
    /// woken for `stall`: nothing woke it from either side, neither the server (a piece of
    /// body, or the body's own wait for one, bounded by `response_timeout`) nor the
    /// client (its flow-control window, which hyper waits on before it polls the body
    /// again). Ending it drops the server's request and connection and resets the stream
    /// (CANCEL).
    ///
    /// Most responses are whole in the first poll of their body, and the stream ends
    /// there: the watch, and its timer, start only when a stream waits after that poll.
    struct StalledStream<F> {
        #[pin]
        stream: F,
        stall: Duration,
        // Woken, other than by the timer, since the timer was last set.
        moved: bool,
        timer: Option<Pin<Box<tokio::time::Sleep>>>,
    }
}

impl<F: Future<Output = ()>> Future for StalledStream<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        let Some(timer) = this.timer else {
            BODY_POLLED.set(false);
            let Poll::Pending = this.stream.poll(cx) else { return Poll::Ready(()) };
            if BODY_POLLED.get() {
                let mut timer = Box::pin(tokio::time::sleep(*this.stall));
                // Registers the timer; it cannot have elapsed yet.
                let _ = timer.as_mut().poll(cx);
                *this.timer = Some(timer);
            }
            return Poll::Pending;
        };
        if timer.as_mut().poll(cx).is_ready() {
            if !std::mem::take(this.moved) {
                // Debug, not info: any client can set this off on every stream it opens.
                tracing::debug!(stall = ?*this.stall, "HTTP/2 stream reset: neither its client nor its server moved it");
                STALLED_STREAMS.fetch_add(1, Ordering::Relaxed);
                return Poll::Ready(());
            }
            timer.as_mut().reset(Instant::now() + *this.stall);
            let _ = timer.as_mut().poll(cx);
        } else {
            *this.moved = true;
        }
        this.stream.poll(cx)
    }
}

/// An HTTP/2 extended CONNECT's connection, for its tunnel to count as an open request
/// while it lives: the request's own count ends with its (empty) response body, and the
/// connection would be closed as idle under a busy tunnel.
#[derive(Clone)]
pub(super) struct TunnelStream(pub(super) Arc<Activity>);

impl TunnelStream {
    pub(super) fn open(self) -> RequestGuard {
        RequestGuard::open(&self.0)
    }
}

/// A response body that keeps its request counted until hyper drops it.
pub(super) struct Tracked {
    pub(super) body: super::body::RespBody,
    pub(super) _guard: RequestGuard,
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<std::io::Result<hyper::body::Frame<Bytes>>>> {
        BODY_POLLED.set(true);
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

pin_project! {
    /// A connection's IO, noting when request bytes arrive. Bytes read by an earlier
    /// session but not consumed by it (`unread`) are read again first.
    pub(super) struct Watched<I> {
        #[pin]
        io: I,
        activity: Arc<Activity>,
        unread: Bytes,
    }
}

impl<I> Watched<I> {
    pub(super) fn new(io: I, activity: Arc<Activity>) -> Self {
        Watched { io, activity, unread: Bytes::new() }
    }

    /// The IO, once everything put back has been read again.
    pub(super) fn into_inner(self) -> I {
        debug_assert!(self.unread.is_empty(), "bytes put back would be lost");
        self.io
    }

    /// Whether bytes put back by [`Watched::unread`] are still to be read.
    pub(super) fn has_unread(&self) -> bool {
        !self.unread.is_empty()
    }

    /// Puts back bytes read but not consumed (a pipelined head), before any still
    /// unread. They are copied: the slice may hold on to a whole read buffer.
    pub(super) fn unread(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let mut all = BytesMut::with_capacity(bytes.len() + self.unread.len());
        all.extend_from_slice(bytes);
        all.extend_from_slice(&self.unread);
        self.unread = all.freeze();
        // A head has begun: timed from now, and no reason to park.
        self.activity.head_begun();
    }
}

impl<I: AsyncRead> AsyncRead for Watched<I> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.project();
        if !this.unread.is_empty() {
            let n = this.unread.len().min(buf.remaining());
            buf.put_slice(&this.unread[..n]);
            this.unread.advance(n);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let r = this.io.poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.head_begun();
        }
        r
    }
}

impl<I: AsyncWrite> AsyncWrite for Watched<I> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.project().io.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.project().io.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.project();
        if this.activity.parking.load(Ordering::Relaxed) {
            return Poll::Ready(Ok(()));
        }
        this.io.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_and_slow_heads_expire_but_open_requests_do_not() {
        let (header, idle) = (Some(Duration::from_secs(10)), Duration::from_secs(60));
        // The first head is timed from the connection's start.
        let a = Activity::new(header, idle);
        let t0 = Instant::now();
        assert_eq!(a.expired(None).await, Expired::SlowHead);
        assert_eq!(t0.elapsed(), Duration::from_secs(10));

        // After a request, an idle connection lasts idle_timeout...
        let a = Activity::new(header, idle);
        drop(RequestGuard::open(&a));
        let t0 = Instant::now();
        assert_eq!(a.expired(None).await, Expired::Idle);
        assert_eq!(t0.elapsed(), Duration::from_secs(60));

        // ...unless a head starts arriving: then it has header_read_timeout from its first byte.
        let a = Activity::new(header, idle);
        drop(RequestGuard::open(&a));
        tokio::time::sleep(Duration::from_secs(30)).await;
        a.head_begun();
        let t0 = Instant::now();
        assert_eq!(a.expired(None).await, Expired::SlowHead);
        assert_eq!(t0.elapsed(), Duration::from_secs(10));

        // An open request (a long response) is never idle.
        let a = Activity::new(header, idle);
        let guard = RequestGuard::open(&a);
        let watch = tokio::time::timeout(Duration::from_secs(600), a.expired(None)).await;
        assert!(watch.is_err(), "a connection with an open request expired");
        drop(guard);
        let t0 = Instant::now();
        assert_eq!(a.expired(None).await, Expired::Idle);
        assert_eq!(t0.elapsed(), Duration::from_secs(60));
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_parks_unless_busy_or_closing() {
        let (header, idle, park) =
            (Some(Duration::from_secs(10)), Duration::from_secs(60), Some(Duration::from_secs(1)));
        // Parked a second after its request ended...
        let a = Activity::new(header, idle);
        drop(RequestGuard::open(&a));
        let t0 = Instant::now();
        assert_eq!(a.expired(park).await, Expired::Park);
        assert_eq!(t0.elapsed(), Duration::from_secs(1));

        // ...not while a request is open: a second after it ends.
        let a = Activity::new(header, idle);
        let guard = RequestGuard::open(&a);
        let watch = tokio::time::timeout(Duration::from_secs(30), a.expired(park)).await;
        assert!(watch.is_err(), "parked with a request open");
        drop(guard);
        let t0 = Instant::now();
        assert_eq!(a.expired(park).await, Expired::Park);
        assert_eq!(t0.elapsed(), Duration::from_secs(1));

        // A head that has begun is timed, not parked.
        let a = Activity::new(header, idle);
        drop(RequestGuard::open(&a));
        a.head_begun();
        assert_eq!(a.expired(park).await, Expired::SlowHead);

        // A connection asked to close is never parked: it just idles out.
        let a = Activity::new(header, idle);
        drop(RequestGuard::open(&a));
        a.set_closing();
        let t0 = Instant::now();
        assert_eq!(a.expired(park).await, Expired::Idle);
        assert_eq!(t0.elapsed(), Duration::from_secs(60));
    }
}
