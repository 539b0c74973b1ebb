//! One upstream server: its address, state, in-flight count and idle connection pool.
//!
//! Invariants: `in_flight` counts requests and tunnels between pick and the end of the
//! response body (or tunnel); it only moves through [`InFlight`], a guard released on
//! drop. A server whose state is `Draining` is never picked again; its `kill` token
//! fires when its drain time is up, closing whatever it still carries.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::proxy::client::Pool;

/// Where a server stands. `Pending` is a new server waiting for its first passing health
/// check; only `Healthy` servers (not ejected) receive requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ServerState {
    Pending = 0,
    Healthy = 1,
    Unhealthy = 2,
    Draining = 3,
}

impl ServerState {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => ServerState::Pending,
            1 => ServerState::Healthy,
            2 => ServerState::Unhealthy,
            _ => ServerState::Draining,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ServerState::Pending => "pending",
            ServerState::Healthy => "healthy",
            ServerState::Unhealthy => "unhealthy",
            ServerState::Draining => "draining",
        }
    }
}

#[derive(Debug)]
pub struct Server {
    pub addr: SocketAddr,
    state: AtomicU8,
    in_flight: AtomicUsize,
    /// Requests sent to this server since it appeared.
    pub requests: AtomicU64,
    /// The highest number (counted by `requests`) of a request whose response came back:
    /// a response timeout of a request sent before it is no sign of a hung server.
    pub(crate) answered: AtomicU64,
    /// Consecutive connect failures or resets (passive ejection).
    pub(crate) consecutive_failures: AtomicU32,
    /// How many times it was ejected in a row (failed trials); grows the back-off, and
    /// is reset when the ejection ends.
    pub(crate) ejections: AtomicU32,
    /// 0 when not ejected; else the end of the ejection's back-off, in milliseconds after
    /// `born` (tokio's clock, so back-off is testable with paused time). The ejection
    /// outlasts its back-off: after it one request at a time tries the server (a trial,
    /// see `ServerSet::claim_trial`), and the first trial it answers ends the ejection.
    pub(crate) ejected_until_ms: AtomicU64,
    /// The number (counted by `requests`) of the request trying it while ejected (see
    /// `ServerSet::claim_trial`); 0 for none.
    pub(crate) trial: AtomicU64,
    /// The number of the first request that tried it in this ejection (0 for none): an
    /// answer to it or to any request sent after it ends the ejection.
    pub(crate) first_trial: AtomicU64,
    pub(crate) born: Instant,
    /// Drains started so far: a drain's task acts only while it is the latest one (a
    /// server back and drained again has a new task and a new deadline).
    pub(crate) drains: AtomicU64,
    pub pool: Pool,
    /// Woken when the last in-flight request of a draining server ends.
    pub(crate) idle: Notify,
    /// Fired when the server's drain time is up or it is forgotten.
    pub kill: CancellationToken,
}

impl Server {
    pub fn new(addr: SocketAddr, state: ServerState) -> Arc<Self> {
        Arc::new(Server {
            addr,
            state: AtomicU8::new(state as u8),
            in_flight: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            answered: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            trial: AtomicU64::new(0),
            first_trial: AtomicU64::new(0),
            born: Instant::now(),
            drains: AtomicU64::new(0),
            pool: Pool::default(),
            idle: Notify::new(),
            kill: CancellationToken::new(),
        })
    }

    pub fn state(&self) -> ServerState {
        ServerState::from_u8(self.state.load(Ordering::Acquire))
    }

    /// Sets the state; callers hold the set's update lock and refresh eligibility.
    pub(crate) fn set_state(&self, state: ServerState) {
        self.state.store(state as u8, Ordering::Release);
        if state == ServerState::Draining && self.in_flight() == 0 {
            self.idle.notify_one();
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Whether passive ejection keeps it out (back-off over or not: until a trial succeeds).
    pub fn is_ejected(&self) -> bool {
        self.ejected_until_ms.load(Ordering::Relaxed) != 0
    }

    /// Whether it is ejected with its back-off over: the next request may try it.
    pub fn awaits_trial(&self, now: Instant) -> bool {
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        until != 0 && self.ms_at(now) >= until
    }

    /// `now` on the clock of `ejected_until_ms`.
    pub(crate) fn ms_at(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.born).as_millis() as u64
    }

    /// Counts a request or tunnel until the guard drops.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.begin_nth().0
    }

    /// [`Server::begin`], and the request's number among those sent to this server.
    pub fn begin_nth(self: &Arc<Self>) -> (InFlight, u64) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        let nth = self.requests.fetch_add(1, Ordering::Relaxed) + 1;
        (InFlight(Arc::clone(self)), nth)
    }
}

/// One request or tunnel in flight on a server.
#[derive(Debug)]
pub struct InFlight(Arc<Server>);

impl InFlight {
    pub fn server(&self) -> &Arc<Server> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 && self.0.state() == ServerState::Draining {
            self.0.idle.notify_one();
        }
    }
}
