//! An upstream's server set and the one `reconcile` that changes it.
//!
//! Discovery results, config reloads and admin drains all come through here, so "a server
//! appears" and "a server goes away" mean one thing everywhere:
//! - an address already present keeps its `Server` (state, counters, pool);
//! - a new address enters `Pending` when health checks are on, `Healthy` otherwise;
//! - a vanished address starts draining: no new requests, idle connections closed at
//!   once, in-flight work gets up to `drain_timeout`, then it is forgotten.
//!
//! The hot path reads `eligible` with one atomic load (and `trial_due` with another);
//! every change rebuilds it under `update`, so readers never see a half-applied change.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use arc_swap::ArcSwap;

use super::server::{Server, ServerState};

/// Settings of a set that a reload may change.
#[derive(Debug, Clone)]
pub struct SetSettings {
    pub health_checked: bool,
    pub drain_timeout: Duration,
}

#[derive(Debug, Default)]
pub struct SetStats {
    pub connect_errors: AtomicU64,
    pub ejections: AtomicU64,
    pub resolve_errors: AtomicU64,
    pub health_transitions: AtomicU64,
}

#[derive(Debug)]
pub struct ServerSet {
    pub name: String,
    /// Every server not yet forgotten, draining ones included.
    all: ArcSwap<Vec<Arc<Server>>>,
    /// Healthy, not draining, not ejected: what the balancer picks from.
    eligible: ArcSwap<Vec<Arc<Server>>>,
    settings: ArcSwap<SetSettings>,
    /// Serialises every change; holds the addresses an operator drained, which stay out
    /// while the source (config or DNS) keeps listing them and are forgotten once it
    /// stops (an address that comes back later is a new server).
    update: Mutex<HashSet<SocketAddr>>,
    /// False from the start of a DNS upstream until its first answer (servers, or none):
    /// until then its emptiness says nothing.
    looked_up: AtomicBool,
    /// A DNS upstream whose last lookup failed: its servers are the last ones DNS listed,
    /// unconfirmed. Their addresses may meanwhile belong to another service's containers
    /// (Swarm reuses a task's address soon after it is gone), so a server that fails
    /// then stays out until DNS lists it again: no trial, no health check and no
    /// "every server ejected" fallback brings it back. (A new server still waiting for
    /// its first passing check may pass it: the last answer listed it, and it has not
    /// failed.)
    stale: AtomicBool,
    /// Asks discovery to look up now (a server refused a connection: its task may be
    /// gone, and DNS may already say so).
    resolve_now: tokio::sync::Notify,
    /// Health checks have been through the set's servers once (a round with one or more
    /// servers ended): until then its new servers wait for a first check that has not
    /// come yet, and the start's readiness waits with them.
    checked: AtomicBool,
    /// Set when a server may be due for a trial or its trial was answered (a back-off
    /// ended, a trial ended, a change of the set); cleared by the request that then looks.
    trial_due: AtomicBool,
    pub stats: SetStats,
}

/// `Server::trial` between a request's claim and its `begin_trial`.
const CLAIMED: u64 = u64::MAX;

/// A request's hold on the trial of an ejected server. When it drops with the trial still
/// its own (no server failure settled it), the server is due again: the next request
/// ends the ejection if the trial was answered, or tries the server in its turn.
#[derive(Debug)]
pub struct TrialGuard<'a> {
    set: &'a ServerSet,
    server: Arc<Server>,
    nth: u64,
}

impl Drop for TrialGuard<'_> {
    fn drop(&mut self) {
        let trial = &self.server.trial;
        if trial.compare_exchange(self.nth, 0, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
            self.set.trial_due.store(true, Ordering::Release);
        }
    }
}

/// What a reconcile did, for logs and tests.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reconciled {
    pub added: Vec<SocketAddr>,
    pub draining: Vec<SocketAddr>,
    pub kept: usize,
}

impl ServerSet {
    pub fn new(name: &str, settings: SetSettings) -> Arc<Self> {
        Arc::new(ServerSet {
            name: name.to_string(),
            all: ArcSwap::from_pointee(Vec::new()),
            eligible: ArcSwap::from_pointee(Vec::new()),
            settings: ArcSwap::from_pointee(settings),
            update: Mutex::new(HashSet::new()),
            looked_up: AtomicBool::new(true),
            stale: AtomicBool::new(false),
            resolve_now: tokio::sync::Notify::new(),
            checked: AtomicBool::new(false),
            trial_due: AtomicBool::new(false),
            stats: SetStats::default(),
        })
    }

    /// A new set whose servers DNS discovery will find.
    pub fn new_discovered(name: &str, settings: SetSettings) -> Arc<Self> {
        let set = Self::new(name, settings);
        set.looked_up.store(false, Ordering::Relaxed);
        set
    }

    /// Whether the set's servers are known: listed in the config, or looked up once.
    pub fn looked_up(&self) -> bool {
        self.looked_up.load(Ordering::Acquire)
    }

    /// DNS answered (after the answer's servers, or none, were reconciled), or the config
    /// lists the servers: the set is what its source says again.
    pub fn answered(&self) {
        self.looked_up.store(true, Ordering::Release);
        self.set_stale(false);
    }

    /// A lookup failed: the servers are kept, unconfirmed (see `stale`).
    pub(super) fn lookup_failed(&self) {
        self.set_stale(true);
    }

    fn set_stale(&self, stale: bool) {
        if self.stale.load(Ordering::Acquire) != stale {
            let _g = self.lock();
            self.stale.store(stale, Ordering::Release);
            if !stale {
                // Trials held back while stale may be due.
                self.trial_due.store(true, Ordering::SeqCst);
            }
            self.refresh_eligible_locked();
        }
    }

    /// A round of health checks went through one or more servers.
    pub(super) fn mark_checked(&self) {
        self.checked.store(true, Ordering::Release);
    }

    /// Whether its servers have had their first health checks (or it has none to check).
    pub fn first_checks_done(&self) -> bool {
        self.checked.load(Ordering::Acquire) || self.all.load().is_empty()
    }

    /// Whether the last lookup failed (see `stale`).
    pub fn is_stale(&self) -> bool {
        self.stale.load(Ordering::Acquire)
    }

    /// Asks a DNS upstream's discovery to look up now (nothing for listed servers).
    pub fn resolve_soon(&self) {
        self.resolve_now.notify_one();
    }

    /// Waits for [`ServerSet::resolve_soon`].
    pub(super) async fn resolve_asked(&self) {
        self.resolve_now.notified().await;
    }

    fn lock(&self) -> MutexGuard<'_, HashSet<SocketAddr>> {
        self.update.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The servers requests may go to now.
    pub fn eligible(&self) -> arc_swap::Guard<Arc<Vec<Arc<Server>>>> {
        self.eligible.load()
    }

    /// Every server, draining ones included.
    pub fn all(&self) -> Arc<Vec<Arc<Server>>> {
        self.all.load_full()
    }

    pub fn settings(&self) -> Arc<SetSettings> {
        self.settings.load_full()
    }

    pub fn set_settings(&self, settings: SetSettings) {
        let _g = self.lock();
        let was_checked = self.settings.load().health_checked;
        if was_checked && !settings.health_checked {
            // Health checks switched off: nothing will ever promote pending servers.
            for s in self.all.load().iter() {
                if matches!(s.state(), ServerState::Pending | ServerState::Unhealthy) {
                    s.set_state(ServerState::Healthy);
                }
            }
        }
        self.settings.store(Arc::new(settings));
        self.refresh_eligible_locked();
    }

    /// Makes the set's addresses exactly `addrs` (see the module docs).
    pub fn reconcile(self: &Arc<Self>, addrs: &[SocketAddr]) -> Reconciled {
        let mut held = self.lock();
        let listed: HashSet<SocketAddr> = addrs.iter().copied().collect();
        held.retain(|a| listed.contains(a));
        let wanted: HashSet<SocketAddr> = listed.difference(&held).copied().collect();
        let current = self.all.load_full();
        let initial = if self.settings.load().health_checked { ServerState::Pending } else { ServerState::Healthy };
        let mut report = Reconciled::default();
        let mut next: Vec<Arc<Server>> = Vec::with_capacity(wanted.len() + current.len());
        let mut present = HashSet::new();
        for s in current.iter() {
            // A drain that has finished (an operator's, kept while listed): forgotten
            // once its address is no longer held out; an address coming back is new.
            if s.kill.is_cancelled() && !held.contains(&s.addr) {
                continue;
            }
            present.insert(s.addr);
            if wanted.contains(&s.addr) {
                if s.state() == ServerState::Draining {
                    // Back before its drain finished: it serves again.
                    s.set_state(initial);
                    report.added.push(s.addr);
                } else {
                    report.kept += 1;
                }
            } else if s.state() != ServerState::Draining {
                self.start_drain_locked(s);
                report.draining.push(s.addr);
            }
            next.push(Arc::clone(s));
        }
        for addr in addrs {
            if wanted.contains(addr) && present.insert(*addr) {
                next.push(Server::new(*addr, initial));
                report.added.push(*addr);
            }
        }
        self.all.store(Arc::new(next));
        self.refresh_eligible_locked();
        report
    }

    /// Drains one server by hand (admin). False when the address is not in the set.
    /// The drain sticks while the config or DNS keeps listing the address.
    pub fn drain(self: &Arc<Self>, addr: SocketAddr) -> bool {
        let mut held = self.lock();
        let Some(server) = self.all.load().iter().find(|s| s.addr == addr).cloned() else {
            return false;
        };
        if server.state() == ServerState::Draining && !held.contains(&addr) {
            // Already on its way out: the source stopped listing it. Held, it would be
            // kept (and shown draining) until the next reconcile.
            return true;
        }
        held.insert(addr);
        if server.state() != ServerState::Draining {
            self.start_drain_locked(&server);
            self.refresh_eligible_locked();
        }
        true
    }

    fn start_drain_locked(self: &Arc<Self>, server: &Arc<Server>) {
        server.set_state(ServerState::Draining);
        server.pool.clear();
        let drain = server.drains.fetch_add(1, Ordering::Relaxed) + 1;
        let set = Arc::clone(self);
        let server = Arc::clone(server);
        let timeout = self.settings.load().drain_timeout;
        // Reconcile runs on the control runtime; outside one (unit tests without a
        // runtime) the server is simply forgotten when nothing is in flight.
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(async move { set.finish_drain(server, drain, timeout).await });
            }
            Err(_) => {
                tracing::warn!(upstream = %self.name, server = %server.addr, "no runtime to drain on")
            }
        }
    }

    async fn finish_drain(self: Arc<Self>, server: Arc<Server>, drain: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        // Over when the server came back, or was drained again with a new deadline: then
        // the wake-up for its last request (one permit, maybe taken here) is passed on to
        // the newer drain's task.
        let superseded = || server.state() != ServerState::Draining || server.drains.load(Ordering::Relaxed) != drain;
        while server.in_flight() > 0 && !superseded() {
            if tokio::time::timeout_at(deadline, server.idle.notified()).await.is_err() {
                if !superseded() {
                    tracing::warn!(upstream = %self.name, server = %server.addr, in_flight = server.in_flight(),
                        "drain_timeout reached; closing what is still in flight");
                }
                break;
            }
        }
        let held = self.lock();
        if superseded() {
            server.idle.notify_one();
            return;
        }
        server.kill.cancel();
        server.pool.clear();
        if held.contains(&server.addr) {
            // Drained by an operator and still listed: it stays in the set, `draining`,
            // for `/upstreams` and the metrics to show, until the source stops listing it.
            tracing::info!(upstream = %self.name, server = %server.addr, "server drained; held out while listed");
            return;
        }
        let next: Vec<Arc<Server>> = self.all.load().iter().filter(|s| !Arc::ptr_eq(s, &server)).cloned().collect();
        self.all.store(Arc::new(next));
        tracing::info!(upstream = %self.name, server = %server.addr, "server drained and removed");
    }

    /// Ends a passive ejection of `server` (it answered a trial request or passed a health
    /// check). Returns whether it was ejected.
    pub fn end_ejection(&self, server: &Server) -> bool {
        if server.ejected_until_ms.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let _g = self.lock();
        self.end_ejection_locked(server)
    }

    fn end_ejection_locked(&self, server: &Server) -> bool {
        if server.ejected_until_ms.load(Ordering::SeqCst) == 0 || self.stale.load(Ordering::Acquire) {
            return false;
        }
        server.ejected_until_ms.store(0, Ordering::SeqCst);
        server.trial.store(0, Ordering::SeqCst);
        server.first_trial.store(0, Ordering::SeqCst);
        server.ejections.store(0, Ordering::Relaxed);
        self.refresh_eligible_locked();
        true
    }

    /// Sets a server's health state (health checker). Returns whether it changed.
    pub fn set_health(&self, server: &Arc<Server>, healthy: bool) -> bool {
        let _g = self.lock();
        let now = server.state();
        let next = if healthy { ServerState::Healthy } else { ServerState::Unhealthy };
        // Stale (see `stale`): a server that failed stays out until DNS lists it again.
        let failed = now == ServerState::Unhealthy;
        if now == ServerState::Draining || now == next || healthy && failed && self.stale.load(Ordering::Acquire) {
            return false;
        }
        server.set_state(next);
        self.stats.health_transitions.fetch_add(1, Ordering::Relaxed);
        self.refresh_eligible_locked();
        true
    }

    /// Passive ejection: keeps `server` out for `for_how_long` (its back-off), then lets
    /// one request at a time try it until one is answered (see [`ServerSet::claim_trial`]).
    pub fn eject(self: &Arc<Self>, server: &Arc<Server>, for_how_long: Duration) {
        {
            let _g = self.lock();
            let until = server.born.elapsed() + for_how_long;
            server.ejected_until_ms.store(until.as_millis().max(1) as u64, Ordering::SeqCst);
            server.trial.store(0, Ordering::SeqCst);
            server.first_trial.store(0, Ordering::SeqCst);
            self.stats.ejections.fetch_add(1, Ordering::Relaxed);
            self.refresh_eligible_locked();
        }
        let set = Arc::clone(self);
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                tokio::time::sleep(for_how_long).await;
                set.trial_due.store(true, Ordering::SeqCst);
            });
        }
    }

    /// A trial of an ejected server whose back-off is over (healthy, not being tried, not
    /// tried by this request): the server gets this one request, not its share, until one
    /// is answered, so a hung server costs one `response_timeout` per back-off. The
    /// request, numbered `nth` by [`Server::begin_nth`], takes the trial with
    /// [`ServerSet::begin_trial`] and holds it until it ends; its outcome settles it (see
    /// `proxy::record_success`, `proxy::record_failure`). Looked at before each pick: one
    /// atomic load unless a server may be due.
    #[inline]
    pub fn claim_trial(&self, tried: &[SocketAddr]) -> Option<Arc<Server>> {
        if !self.trial_due.load(Ordering::Acquire) {
            return None;
        }
        self.claim_due_trial(tried)
    }

    #[cold]
    fn claim_due_trial(&self, tried: &[SocketAddr]) -> Option<Arc<Server>> {
        // Under the lock, so no ejection starts or ends while one is looked at.
        let _g = self.lock();
        // Cleared before looking (and what was written before it was set is seen):
        // whatever makes a server due after this sets it again.
        self.trial_due.swap(false, Ordering::AcqRel);
        if self.stale.load(Ordering::Acquire) {
            return None; // `answered` sets `trial_due` again
        }
        let now = Instant::now();
        let mut claimed = None;
        let mut due_left = false;
        for s in self.all.load().iter() {
            let ejection = s.ejected_until_ms.load(Ordering::SeqCst);
            if ejection == 0 || s.state() != ServerState::Healthy {
                // Not ejected; or out anyway (a change of state sets `trial_due`).
                continue;
            }
            if self.end_answered_trial_locked(s) {
                continue;
            }
            if s.ms_at(now) < ejection || s.trial.load(Ordering::SeqCst) != 0 {
                continue; // its back-off runs, or a request tries it: their ends set `trial_due`
            }
            if claimed.is_none() && !tried.contains(&s.addr) {
                s.trial.store(CLAIMED, Ordering::SeqCst);
                claimed = Some(Arc::clone(s));
            } else {
                due_left = true;
            }
        }
        if due_left {
            self.trial_due.store(true, Ordering::SeqCst);
        }
        claimed
    }

    /// Ends the ejections whose trials were answered (done by the next request otherwise):
    /// for reports of the servers' states.
    pub fn settle_answered_trials(&self) {
        if self.trial_due.load(Ordering::Acquire) {
            let _g = self.lock();
            for s in self.all.load().iter() {
                self.end_answered_trial_locked(s);
            }
        }
    }

    /// Ends the ejection of `server` if its first trial, or a request sent after it, was
    /// answered; whether it did.
    fn end_answered_trial_locked(&self, server: &Server) -> bool {
        let first = server.first_trial.load(Ordering::SeqCst);
        if first == 0 || server.answered.load(Ordering::SeqCst) < first || !self.end_ejection_locked(server) {
            return false;
        }
        tracing::info!(upstream = %self.name, server = %server.addr, "ejected server answered a trial request; back in rotation");
        true
    }

    /// Request `nth` takes the trial of `server` claimed for it: the trial is its own
    /// until the returned guard drops.
    pub fn begin_trial<'a>(&'a self, server: &Arc<Server>, nth: u64) -> TrialGuard<'a> {
        server.trial.store(nth, Ordering::SeqCst);
        let _ = server.first_trial.compare_exchange(0, nth, Ordering::SeqCst, Ordering::SeqCst);
        TrialGuard { set: self, server: Arc::clone(server), nth }
    }

    /// A server failure of request `nth`: whether it was the server's trial (then over).
    pub fn trial_failed(&self, server: &Server, nth: u64) -> bool {
        nth != 0
            && server.trial.load(Ordering::Relaxed) == nth
            && server.trial.compare_exchange(nth, 0, Ordering::SeqCst, Ordering::SeqCst).is_ok()
    }

    /// Request `nth` was answered by `server` (after its `answered` was raised): if the
    /// server is ejected and it was sent with or after its first trial, the next request
    /// ends the ejection (see `claim_due_trial`; a store here, so that no call sits
    /// between a response and its return).
    #[inline]
    pub fn trial_answered(&self, server: &Server, nth: u64) {
        let first = server.first_trial.load(Ordering::Relaxed);
        if first != 0 && nth >= first {
            self.trial_due.store(true, Ordering::Release);
        }
    }

    /// Healthy servers that are not ejected; or, when every healthy server is ejected,
    /// all of them. Ejection is a guess from a few failures, and keeping every server out
    /// on it would make the guess an outage: during a rollout the new replicas can be
    /// ejected while they boot just as the old ones go away, and a request is better tried
    /// (and retried on another server) than answered 503 while one of them already serves.
    fn refresh_eligible_locked(&self) {
        let all = self.all.load();
        let healthy = |s: &&Arc<Server>| s.state() == ServerState::Healthy;
        let mut eligible: Vec<Arc<Server>> = all.iter().filter(healthy).filter(|s| !s.is_ejected()).cloned().collect();
        if eligible.len() < all.iter().filter(healthy).count() {
            // An ejected server may have become healthy again (back before its drain
            // finished, health checks switched off) after its back-off ended.
            self.trial_due.store(true, Ordering::SeqCst);
        }
        // Not while stale (see `stale`): an ejected server's address may answer for
        // another service by now.
        if eligible.is_empty() && !self.stale.load(Ordering::Acquire) {
            eligible = all.iter().filter(healthy).cloned().collect();
        }
        self.eligible.store(Arc::new(eligible));
    }

    /// Counts by state, for metrics: (pending, healthy, unhealthy, draining, ejected).
    pub fn counts(&self) -> [usize; 5] {
        self.settle_answered_trials();
        let mut c = [0; 5];
        for s in self.all.load().iter() {
            c[s.state() as usize] += 1;
            if s.is_ejected() {
                c[4] += 1;
            }
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(p: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], p))
    }

    fn set(health: bool) -> Arc<ServerSet> {
        ServerSet::new("t", SetSettings { health_checked: health, drain_timeout: Duration::from_secs(5) })
    }

    #[tokio::test(start_paused = true)]
    async fn reconcile_keeps_adds_and_drains() {
        let s = set(false);
        let r = s.reconcile(&[addr(1), addr(2)]);
        assert_eq!(r.added, vec![addr(1), addr(2)]);
        let first = Arc::clone(&s.all()[0]);
        first.requests.fetch_add(7, Ordering::Relaxed);
        let guard = s.all()[1].begin();
        let r = s.reconcile(&[addr(1), addr(3)]);
        assert_eq!(r, Reconciled { added: vec![addr(3)], draining: vec![addr(2)], kept: 1 });
        assert!(Arc::ptr_eq(&first, &s.all()[0]), "an unchanged server keeps its state");
        let eligible: Vec<_> = s.eligible().iter().map(|s| s.addr).collect();
        assert_eq!(eligible, vec![addr(1), addr(3)]);
        assert_eq!(s.all().len(), 3, "draining server is kept while a request is in flight");
        drop(guard);
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(s.all().len(), 2, "drained server is forgotten once idle");
    }

    #[tokio::test(start_paused = true)]
    async fn an_admin_drain_sticks_while_the_source_lists_the_server() {
        let s = set(false);
        s.reconcile(&[addr(1), addr(2)]);
        let drained = Arc::clone(&s.all()[1]);
        assert!(s.drain(addr(2)));
        tokio::time::sleep(Duration::from_millis(1)).await;
        // Drained and idle: its connections are closed, and it is still shown, draining.
        assert!(drained.kill.is_cancelled());
        assert_eq!(addrs(&s.all()), [addr(1), addr(2)]);
        assert_eq!(s.all()[1].state(), ServerState::Draining);
        // The next reload or DNS answer still lists it: it stays out.
        let r = s.reconcile(&[addr(1), addr(2)]);
        assert!(r.added.is_empty(), "{r:?}");
        assert_eq!(addrs(&s.eligible()), [addr(1)]);
        assert_eq!(addrs(&s.all()), [addr(1), addr(2)]);
        // Once the source stops listing it, it is forgotten; coming back, it is new.
        s.reconcile(&[addr(1)]);
        assert_eq!(addrs(&s.all()), [addr(1)]);
        let r = s.reconcile(&[addr(1), addr(2)]);
        assert_eq!(r.added, vec![addr(2)]);
        assert_eq!(s.eligible().len(), 2);
        assert!(!Arc::ptr_eq(&s.all()[1], &drained), "a new server, not the drained one");
    }

    #[tokio::test(start_paused = true)]
    async fn an_admin_drain_of_a_server_the_source_dropped_leaves_nothing_behind() {
        let s = set(false);
        s.reconcile(&[addr(1), addr(2)]);
        let stuck = s.all()[1].begin();
        s.reconcile(&[addr(1)]); // addr(2) drains: no longer listed
        assert!(s.drain(addr(2)), "a draining server is still in the set");
        drop(stuck);
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(addrs(&s.all()), [addr(1)], "forgotten once idle, not held as drained");
    }

    #[tokio::test(start_paused = true)]
    async fn drain_timeout_kills_stuck_requests() {
        let s = set(false);
        s.reconcile(&[addr(1)]);
        let server = Arc::clone(&s.all()[0]);
        let _stuck = server.begin();
        s.reconcile(&[]);
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(!server.kill.is_cancelled());
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(server.kill.is_cancelled());
        assert!(s.all().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_drained_again_gets_a_whole_drain_timeout() {
        let s = set(false);
        s.reconcile(&[addr(1)]);
        let server = Arc::clone(&s.all()[0]);
        let _stuck = server.begin();
        s.reconcile(&[]); // t = 0: drains until 5 s
        tokio::time::sleep(Duration::from_secs(1)).await;
        s.reconcile(&[addr(1)]); // back
        tokio::time::sleep(Duration::from_secs(3)).await;
        s.reconcile(&[]); // t = 4: drains until 9 s
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(!server.kill.is_cancelled(), "cut at the first drain's deadline");
        assert_eq!(s.all().len(), 1);
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(server.kill.is_cancelled());
        assert!(s.all().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_drained_again_is_forgotten_when_its_last_request_ends() {
        let s = set(false);
        s.reconcile(&[addr(1)]);
        let server = Arc::clone(&s.all()[0]);
        let stuck = server.begin();
        s.reconcile(&[]);
        tokio::time::sleep(Duration::from_millis(100)).await;
        s.reconcile(&[addr(1)]);
        s.reconcile(&[]); // two drain tasks wait; the first is stale
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(stuck);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(s.all().is_empty(), "kept until the drain timeout though idle");
        assert!(server.kill.is_cancelled());
    }

    #[tokio::test(start_paused = true)]
    async fn new_servers_wait_for_health_when_checked() {
        let s = set(true);
        s.reconcile(&[addr(1)]);
        assert!(s.eligible().is_empty());
        let server = Arc::clone(&s.all()[0]);
        assert!(s.set_health(&server, true));
        assert_eq!(s.eligible().len(), 1);
        // A passing check ends an ejection.
        s.eject(&server, Duration::from_secs(30));
        s.reconcile(&[addr(1), addr(2)]);
        let second = Arc::clone(&s.all()[1]);
        assert!(s.set_health(&second, true));
        assert_eq!(addrs(&s.eligible()), [addr(2)]);
        assert!(s.end_ejection(&server));
        assert!(!server.is_ejected());
        assert_eq!(addrs(&s.eligible()), [addr(1), addr(2)]);
    }

    fn addrs(servers: &[Arc<Server>]) -> Vec<SocketAddr> {
        let mut out: Vec<SocketAddr> = servers.iter().map(|s| s.addr).collect();
        out.sort();
        out
    }

    #[tokio::test(start_paused = true)]
    async fn ejection_never_leaves_an_upstream_with_no_server() {
        let s = set(false);
        s.reconcile(&[addr(1), addr(2), addr(3)]);
        let all = s.all();
        s.eject(&all[0], Duration::from_secs(1));
        s.eject(&all[1], Duration::from_secs(4));
        assert_eq!(addrs(&s.eligible()), [addr(3)]);
        // The last one out too: all stay eligible rather than none.
        s.eject(&all[2], Duration::from_secs(2));
        assert_eq!(addrs(&s.eligible()), [addr(1), addr(2), addr(3)]);
        // A back-off's end alone brings none back: a trial request must be answered.
        let due = |tried: &[SocketAddr]| s.claim_trial(tried).map(|server| server.addr);
        tokio::time::sleep(Duration::from_millis(1001)).await;
        tokio::task::yield_now().await;
        assert_eq!(addrs(&s.eligible()), [addr(1), addr(2), addr(3)]);
        assert_eq!(due(&[]), Some(addr(1)), "the first back-off is over");
        // (That claim of the first server holds: no request took it up, none ended it.)
        assert_eq!(due(&[]), None, "one trial of a server at a time");
        assert!(s.end_ejection(&all[0]));
        assert_eq!(addrs(&s.eligible()), [addr(1)], "answered: back; the others are out again");
        assert_eq!(due(&[]), None);
        tokio::time::sleep(Duration::from_millis(1000)).await;
        tokio::task::yield_now().await;
        assert_eq!(due(&[addr(3)]), None, "not to a request that tried it");
        assert_eq!(due(&[]), Some(addr(3)), "the 2 s back-off is over; the 4 s one is not");
        assert!(s.end_ejection(&all[2]));
        assert_eq!(addrs(&s.eligible()), [addr(1), addr(3)]);
        // Draining and unhealthy servers are never brought back this way.
        s.reconcile(&[addr(2)]);
        assert_eq!(addrs(&s.eligible()), [addr(2)]);
    }

    #[tokio::test(start_paused = true)]
    async fn while_dns_fails_a_failed_server_stays_out_until_listed_again() {
        let s = set(true);
        s.reconcile(&[addr(1), addr(2)]);
        let all = s.all();
        for server in all.iter() {
            assert!(s.set_health(server, true));
        }
        s.lookup_failed();
        assert!(s.is_stale());
        assert_eq!(addrs(&s.eligible()), [addr(1), addr(2)], "working servers go on serving");
        s.eject(&all[0], Duration::from_secs(1));
        assert!(s.set_health(&all[1], false));
        assert!(s.eligible().is_empty(), "no fallback to the ejected server");
        tokio::time::sleep(Duration::from_millis(1100)).await;
        tokio::task::yield_now().await;
        assert!(s.claim_trial(&[]).is_none(), "no trial");
        assert!(!s.end_ejection(&all[0]), "a passing health check ends no ejection");
        assert!(!s.set_health(&all[1], true), "nor makes a failed server healthy");
        assert!(s.eligible().is_empty());
        // A new server the last answer listed may pass its first check meanwhile.
        s.answered();
        s.reconcile(&[addr(1), addr(2), addr(3)]);
        s.lookup_failed();
        let Some(new) = s.all().iter().find(|x| x.addr == addr(3)).cloned() else { panic!("not added") };
        assert_eq!(new.state(), ServerState::Pending);
        assert!(s.set_health(&new, true));
        assert_eq!(addrs(&s.eligible()), [addr(3)]);
        // DNS answers: the first is listed again and tried; the second is gone.
        s.reconcile(&[addr(1), addr(3)]);
        s.answered();
        assert!(!s.is_stale());
        assert_eq!(s.claim_trial(&[]).map(|server| server.addr), Some(addr(1)));
        assert!(s.end_ejection(&all[0]));
        assert_eq!(addrs(&s.eligible()), [addr(1), addr(3)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_back_from_draining_after_its_back_off_is_tried() {
        let s = set(false);
        let due = |tried: &[SocketAddr]| s.claim_trial(tried).map(|server| server.addr);
        s.reconcile(&[addr(1), addr(2)]);
        let first = Arc::clone(&s.all()[0]);
        s.eject(&first, Duration::from_secs(1));
        let stuck = first.begin(); // keeps its drain going
        s.reconcile(&[addr(2)]);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(due(&[]), None, "a draining server is never tried");
        s.reconcile(&[addr(1), addr(2)]);
        assert_eq!(addrs(&s.eligible()), [addr(2)], "still ejected");
        assert_eq!(due(&[]), Some(addr(1)), "tried once back");
        drop(stuck);
    }
}
