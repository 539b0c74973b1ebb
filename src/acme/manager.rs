//! The ACME manager: one background task on the control runtime.
//!
//! ```text
//!  Gateway::install ──want(Wanted)──▶ watch ──▶ run loop ──spawn──▶ obtain(name) (≤ 4 at once)
//!                                               │  ▲                  │ lock "order-NAME" (lease)
//!           CertResolver::set_acme ◀── publish ─┘  └──── Done ────────┘ order, put_fenced, unlock
//! ```
//!
//! - Start-up (`start`): the certificates in storage are loaded (corrupt or foreign files
//!   are reported and moved aside) and swapped into the resolver before the loop runs,
//!   so a restart serves at once and orders nothing it already has.
//! - Every name wanted (route hosts without a static certificate, sent on start and each
//!   reload) without a certificate is ordered at once; one with a certificate is renewed
//!   `renew_before` its expiry (at most a third of its lifetime, less up to 10% jitter).
//! - Each name is its own task: at most [`CONCURRENT_ORDERS`] run at once and a failing
//!   name never waits for another. Failures retry with exponential back-off (1 s
//!   doubling, capped at a tenth of the remaining lifetime, 5 minutes once expired, or an
//!   hour without one).
//! - Within an order, a lease `order-NAME` in storage keeps other gateways sharing the
//!   storage from ordering the same name; its fencing token guards the write.
//! - Clustered (a store with [`Storage::events`], Redis): a replica that stores a
//!   certificate announces it; every replica loads it at once (and re-reads every name
//!   every [`RESYNC_EVERY`] as the safety net, and after the event channel comes back).
//!   Challenge answers go to the store too, so any replica answers any validation. A
//!   store that cannot be reached pauses issuance (retried every few seconds, at most
//!   [`STORE_RETRY_CAP`]); certificates already loaded keep serving.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, BodyWrapper, BytesResponse, ChallengeType, HttpClient,
    Identifier, NewAccount, NewOrder, Order, OrderStatus, Problem, RetryPolicy,
};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use rustls::sign::CertifiedKey;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Challenges;
use super::cluster::{ClusterPublisher, RedisStorage, RemoteAnswers, is_redis_url};
use super::responder::{Answer, LocalPublisher, Publisher};
use super::storage::{DirStorage, Event, Lease, Sealing, Storage, StorageError, StoreCounters, unix_ms};
use crate::config::{self, Challenge, Config, HostPattern};
use crate::tls::{CertInfo, CertResolver, CertSource, CertStore};

/// Orders running at once.
pub const CONCURRENT_ORDERS: usize = 4;
/// Longest one attempt may take, end to end (account, order, storing).
const ORDER_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest the order itself may take (its two polls take up to 90 s each), inside
/// [`ORDER_TIMEOUT`]: when it runs out the published challenge answers are still withdrawn.
const ORDER_WORK_TIMEOUT: Duration = Duration::from_secs(240);
/// Longest one HTTP request to the ACME server may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Wait before looking again when another gateway holds a name's lease (an event from
/// the holder usually comes first).
const DEFERRED_RETRY: Duration = Duration::from_secs(3);
/// Clustered: every name is read again from the store this often (the safety net for
/// lost events).
pub const RESYNC_EVERY: Duration = Duration::from_secs(15);
/// Longest wait between attempts while the store cannot be reached.
pub const STORE_RETRY_CAP: Duration = Duration::from_secs(10);
/// Longest wait for another replica creating the account.
const ACCOUNT_WAIT: Duration = Duration::from_secs(30);
const RETRY_BASE: Duration = Duration::from_secs(1);
const RETRY_CAP: Duration = Duration::from_secs(3600);
/// Longest back-off once the certificate served has expired.
const EXPIRED_RETRY_CAP: Duration = Duration::from_secs(300);

/// What the gateway wants certificates for (sent on start and on every reload).
#[derive(Debug, Clone, Default)]
pub struct Wanted {
    pub acme: Option<config::Acme>,
    pub names: BTreeSet<String>,
    pub http_listener: bool,
    pub https_listener: bool,
}

impl Wanted {
    /// Every exact route host (not an IP address) no static certificate covers.
    pub fn from_config(config: &Config, statics: &CertStore) -> Wanted {
        let names = if config.acme.is_some() {
            config
                .routes
                .iter()
                .filter_map(|r| match &r.host {
                    HostPattern::Exact(h) => Some(h.to_ascii_lowercase()),
                    _ => None,
                })
                .filter(|h| h.parse::<IpAddr>().is_err() && statics.lookup(h).is_none())
                .filter(|h| {
                    // Public certificates name hosts of letters, digits and hyphens only.
                    let issuable = h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
                    if !issuable {
                        tracing::warn!(host = %h, "no ACME certificate for a host name with characters a certificate cannot carry (such as _); put a static certificate in certs_dir");
                    }
                    issuable
                })
                .collect()
        } else {
            BTreeSet::new()
        };
        Wanted {
            acme: config.acme.clone(),
            names,
            http_listener: config.listen.http.is_some(),
            https_listener: config.listen.https.is_some(),
        }
    }
}

/// Counters rendered on `/metrics`.
#[derive(Debug, Default)]
pub struct Stats {
    pub orders_ok: AtomicU64,
    pub orders_failed: AtomicU64,
    pub renewals: AtomicU64,
    /// Names wanted that have no certificate yet (gauge).
    pub pending: AtomicU64,
    /// Certificates another replica stored, loaded here.
    pub picked_up: AtomicU64,
    /// From a certificate being stored by one replica to its being served here.
    pub propagation: crate::metrics::Histogram,
    /// Reachability and errors of the store.
    pub store: Arc<StoreCounters>,
}

/// One name's state, as `/certificates` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NameStatus {
    pub name: String,
    /// `valid`, `pending` (no certificate yet), `renewing` (valid, due) or `expired` (past
    /// its not-after, still the one served until a new one arrives).
    pub state: &'static str,
    pub not_after: Option<i64>,
    /// Seconds until the next order or renewal attempt.
    pub next_attempt_in: Option<i64>,
    pub failures: u32,
    pub last_error: Option<String>,
    pub serial: Option<String>,
    /// The replica that ordered the certificate served (from the store's metadata).
    pub ordered_by: Option<String>,
    /// When it was stored (Unix seconds).
    pub ordered_at: Option<i64>,
}

/// Who ordered a certificate, and when: stored beside it as `orders/NAME.json`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OrderMeta {
    pub serial: String,
    pub by: String,
    pub at_ms: u64,
    /// The ACME directory that issued it (absent in what older versions stored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub directory: Option<String>,
}

/// The handle the gateway keeps.
#[derive(Debug)]
pub struct Manager {
    tx: watch::Sender<Wanted>,
    certs: Arc<CertResolver>,
    challenges: Arc<Challenges>,
    pub stats: Stats,
    status: Mutex<Vec<NameStatus>>,
    stop: CancellationToken,
    /// This replica's id and the store it uses, for `/certificates`.
    identity: Mutex<(String, String)>,
}

impl Manager {
    pub fn new(certs: Arc<CertResolver>, challenges: Arc<Challenges>) -> Arc<Manager> {
        Arc::new(Manager {
            tx: watch::Sender::new(Wanted::default()),
            certs,
            challenges,
            stats: Stats::default(),
            status: Mutex::new(Vec::new()),
            stop: CancellationToken::new(),
            identity: Mutex::new((super::storage::default_replica_id(), String::new())),
        })
    }

    /// (replica id, store) of the current `[acme]` settings.
    pub fn identity(&self) -> (String, String) {
        self.identity.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Tells the manager what is wanted now (cheap; the task does the work).
    pub fn want(&self, wanted: Wanted) {
        self.tx.send_replace(wanted);
    }

    /// Loads what storage has, swaps it into the resolver, then runs the loop as a task
    /// on the current runtime until [`Manager::stop`].
    pub async fn start(self: Arc<Self>) {
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let mut state = State {
            mgr: Arc::clone(&self),
            ctx: None,
            entries: BTreeMap::new(),
            generation: 0,
            done_tx,
            dirty: true,
            warned: String::new(),
            renew_before: Duration::ZERO,
            resync_at: None,
        };
        let mut rx = self.tx.subscribe();
        let wanted = rx.borrow_and_update().clone();
        state.apply(wanted).await;
        state.publish();
        tokio::spawn(state.run(rx, done_rx));
    }

    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// Whether `name` is one of the hosts ACME gets certificates for (lower case).
    pub fn wants(&self, name: &str) -> bool {
        self.tx.borrow().names.contains(name)
    }

    /// Per-name state for `/certificates` (`expired` as of now: the loop may be asleep).
    pub fn status(&self) -> Vec<NameStatus> {
        let mut status = self.status.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        for s in &mut status {
            if s.not_after.is_some_and(expired) {
                s.state = "expired";
            }
        }
        status
    }
}

// ---------------------------------------------------------------------------------------

/// A certificate with its key, ready to serve.
#[derive(Debug, Clone)]
struct Loaded {
    ck: Arc<CertifiedKey>,
    info: CertInfo,
    not_before: i64,
    serial: String,
    /// Who ordered it (when the store has that for this serial).
    meta: Option<OrderMeta>,
}

#[derive(Debug)]
struct Entry {
    cert: Option<Loaded>,
    next: Instant,
    failures: u32,
    busy: bool,
    last_error: Option<String>,
    /// An event said the store has something new while a task ran: look when it ends.
    recheck: bool,
    /// The last attempt failed because the store could not be reached.
    store_wait: bool,
    /// Attempts in a row the store could not be reached for: their own back-off, which an
    /// outage does not carry over to the ACME server's errors (`failures`).
    store_failures: u32,
    /// When a reload last cut its back-off short (see `State::retry_failed_now`).
    reload_retry: Option<Instant>,
}

/// The least time between two reloads' retries of one failing name.
const RELOAD_RETRY_EVERY: Duration = Duration::from_secs(60);

#[derive(Debug)]
enum Failure {
    /// Another gateway holds the name's lease: look again shortly, not a failure.
    Deferred,
    /// The store could not be reached: retried soon, not counted as a failed order.
    Store(String),
    Error(String),
    /// The ACME server does not know the account (any more), or it is deactivated.
    AccountGone(String),
}

fn store_failure(e: StorageError) -> Failure {
    Failure::Store(format!("storage: {e}"))
}

struct Outcome {
    loaded: Loaded,
    /// A new order was made (false: a certificate someone else stored was picked up).
    ordered: bool,
    took: Duration,
}

struct Done {
    name: String,
    generation: u64,
    result: Result<Outcome, Failure>,
}

/// What the run loop hears from the tasks it spawned and from the store.
enum Msg {
    Done(Done),
    /// An event from the store (tagged with the generation of the context it came from).
    Event(u64, Event),
    /// A name read again from the store (after an event or a resync).
    Reread {
        name: String,
        generation: u64,
        loaded: Option<Loaded>,
    },
}

/// Everything tied to one `[acme]` setting of directory, contact, CA file and storage.
struct Ctx {
    directory: String,
    contact: Vec<String>,
    ca_file: Option<PathBuf>,
    storage_spec: String,
    storage_key: Option<super::seal::SecretKey>,
    replica_id: Option<String>,
    /// This replica's id in the store's metadata.
    replica: String,
    storage: Arc<dyn Storage>,
    /// The store's health and lock waits (shared with the metrics).
    counters: Arc<StoreCounters>,
    /// Clustered: where answers published by other replicas are looked up.
    remote: Option<RemoteAnswers>,
    http: AcmeHttp,
    publisher: Arc<dyn Publisher>,
    account: tokio::sync::Mutex<Option<StoredAccount>>,
    account_key: String,
    limit: Semaphore,
}

/// An account with the stored credentials (JSON) it came from.
#[derive(Clone)]
struct StoredAccount {
    account: Account,
    creds: Vec<u8>,
}

impl std::fmt::Debug for Ctx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx")
            .field("directory", &self.directory)
            .field("storage", &self.storage)
            .finish_non_exhaustive()
    }
}

struct State {
    mgr: Arc<Manager>,
    ctx: Option<Arc<Ctx>>,
    entries: BTreeMap<String, Entry>,
    /// Bumped whenever `ctx` changes; results of older tasks are dropped.
    generation: u64,
    done_tx: mpsc::UnboundedSender<Msg>,
    /// Clustered: when every name is read again from the store.
    resync_at: Option<Instant>,
    /// The resolver's ACME store needs rebuilding.
    dirty: bool,
    /// The last configuration warning logged (not repeated on every reload).
    warned: String,
    /// The `renew_before` the schedule was made with.
    renew_before: Duration,
}

impl State {
    async fn run(mut self, mut rx: watch::Receiver<Wanted>, mut done_rx: mpsc::UnboundedReceiver<Msg>) {
        let stop = self.mgr.stop.clone();
        loop {
            if self.resync_at.is_some_and(|at| at <= Instant::now()) {
                self.resync();
            }
            self.spawn_due();
            self.publish();
            let mut next = self
                .entries
                .values()
                .filter(|e| !e.busy)
                .map(|e| e.next)
                .min()
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            if let Some(at) = self.resync_at {
                next = next.min(at);
            }
            tokio::select! {
                () = stop.cancelled() => return,
                changed = rx.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let wanted = rx.borrow_and_update().clone();
                    self.apply(wanted).await;
                }
                Some(msg) = done_rx.recv() => match msg {
                    Msg::Done(done) => self.finish(done),
                    Msg::Event(generation, event) => self.on_event(generation, event),
                    Msg::Reread { name, generation, loaded } => self.on_reread(&name, generation, loaded),
                },
                () = tokio::time::sleep_until(next) => {}
            }
        }
    }

    /// Adopts a new wanted set (and settings): new names get what storage has, gone
    /// names are dropped, changed settings start over with a new context.
    async fn apply(&mut self, wanted: Wanted) {
        let Some(acme) = wanted.acme.clone() else {
            if self.ctx.take().is_some() || !self.entries.is_empty() {
                tracing::info!("[acme] removed: ACME certificates are no longer served");
            }
            self.entries.clear();
            self.generation += 1;
            self.dirty = true;
            self.resync_at = None;
            self.mgr.challenges.set_remote(None);
            return;
        };
        self.warn_listeners(&wanted, &acme);
        let same = self.ctx.as_ref().is_some_and(|c| {
            c.directory == acme.directory
                && c.contact == acme.contact
                && c.ca_file == acme.ca_file
                && c.storage_spec == acme.storage
                && c.storage_key == acme.storage_key
                && c.replica_id == acme.replica_id
        });
        let mut stored = HashMap::new();
        // What served so far, for names the new settings' store has nothing for yet.
        let mut served = HashMap::new();
        if !same {
            let local =
                LocalPublisher { challenges: Arc::clone(&self.mgr.challenges), certs: Arc::clone(&self.mgr.certs) };
            // Made before anything is dropped: settings that cannot be used (a check at
            // reload catches them first) leave the running ones in force.
            let ctx = match Ctx::new(&acme, local, Arc::clone(&self.mgr.stats.store)) {
                Ok(ctx) => ctx,
                Err(e) if self.ctx.is_some() => {
                    tracing::error!("new [acme] settings not applied, the running ones stay: {e}");
                    return;
                }
                Err(e) => {
                    tracing::error!("ACME disabled: {e}");
                    return;
                }
            };
            self.generation += 1;
            served = std::mem::take(&mut self.entries)
                .into_iter()
                .filter_map(|(name, e)| e.cert.map(|c| (name, c)))
                .collect::<HashMap<_, _>>();
            self.dirty = true;
            self.resync_at = None;
            tracing::info!(directory = %ctx.directory, storage = %ctx.storage.describe(),
                replica = %ctx.replica, shared = ctx.storage.shared(),
                challenge = ?acme.challenge, "ACME configured");
            *self.mgr.identity.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                (ctx.replica.clone(), ctx.storage.describe());
            self.mgr.challenges.set_remote(ctx.remote.clone());
            self.listen(&ctx);
            stored = ctx.load_all(&wanted.names).await;
            let ctx = Arc::new(ctx);
            // Not in a store replicas share: while the key reaches them one by one (a
            // rollout), those without it could not read what this one sealed.
            if ctx.storage_key.is_some() && !ctx.storage.shared() {
                tokio::spawn(Arc::clone(&ctx).seal_the_clear());
            }
            self.ctx = Some(ctx);
        }
        let Some(ctx) = self.ctx.clone() else { return };
        self.entries.retain(|name, _| wanted.names.contains(name));
        if same && self.renew_before != acme.renew_before {
            // A new renew_before reschedules every certificate not being renewed now.
            for e in self.entries.values_mut().filter(|e| !e.busy) {
                if let Some(l) = &e.cert {
                    e.next = renewal_instant(l, acme.renew_before);
                }
            }
        }
        self.renew_before = acme.renew_before;
        let now = Instant::now();
        if same {
            self.retry_failed_now(now);
        }
        let mut waiting = Vec::new();
        for name in &wanted.names {
            if self.entries.contains_key(name) {
                continue;
            }
            let (cert, due) = match stored.remove(name) {
                Some(l) => {
                    let elsewhere = ctx.issued_elsewhere(&l);
                    (Some(l), elsewhere)
                }
                // With the store down, the order attempt finds out (without holding up the loop).
                None if same && self.mgr.stats.store.is_up() => (ctx.load_cert(name).await, false),
                // New settings whose store has none: the one served so far goes on serving
                // until the new store has one, ordered at once.
                None => (served.remove(name), true),
            };
            let next = match &cert {
                Some(l) if !due => renewal_instant(l, acme.renew_before),
                _ => now,
            };
            match &cert {
                Some(l) => {
                    tracing::info!(name = %name, serial = %l.serial, not_after = l.info.not_after,
                    "ACME certificate loaded from storage")
                }
                None => waiting.push(name.clone()),
            }
            self.entries.insert(
                name.clone(),
                Entry {
                    cert,
                    next,
                    failures: 0,
                    busy: false,
                    last_error: None,
                    recheck: false,
                    store_wait: false,
                    store_failures: 0,
                    reload_retry: None,
                },
            );
        }
        if !waiting.is_empty() {
            tracing::info!(names = ?waiting, "ordering ACME certificates; until each arrives, TLS handshakes for it are refused");
        }
        self.dirty = true;
    }

    /// A reload is an operator's word that something may have been mended (DNS, a
    /// firewall, a listener): names backing off after a failed order are tried again at
    /// once, but for those the server refused or rate-limited, whose long back-off keeps
    /// the server's limits from holding every other name.
    fn retry_failed_now(&mut self, now: Instant) {
        let mut retried = Vec::new();
        for (name, e) in &mut self.entries {
            let refused = e.last_error.as_deref().is_some_and(slow_down);
            // Once a minute at most: reloads sent by automation every few seconds must
            // not undo the back-off.
            let lately = e.reload_retry.is_some_and(|at| now.duration_since(at) < RELOAD_RETRY_EVERY);
            if e.failures > 0 && !e.busy && !e.store_wait && !refused && !lately && e.next > now {
                e.next = now;
                e.reload_retry = Some(now);
                retried.push(name.clone());
            }
        }
        if !retried.is_empty() {
            tracing::info!(names = ?retried, "reload: ordering again at once the ACME names whose last order failed");
        }
    }

    fn warn_listeners(&mut self, wanted: &Wanted, acme: &config::Acme) {
        let warning = match acme.challenge {
            Challenge::Http01 if !wanted.http_listener => {
                "[acme] challenge = \"http-01\" needs [listen].http (port 80 seen from the ACME server); orders will fail"
            }
            Challenge::TlsAlpn01 if !wanted.https_listener => {
                "[acme] challenge = \"tls-alpn-01\" needs [listen].https (port 443 seen from the ACME server); orders will fail"
            }
            _ => "",
        };
        if !warning.is_empty() && self.warned != warning {
            tracing::warn!("{warning}");
        }
        self.warned = warning.to_string();
    }

    fn spawn_due(&mut self) {
        let Some(ctx) = self.ctx.clone() else { return };
        let Some(acme) = self.mgr.tx.borrow().acme.clone() else {
            return;
        };
        let now = Instant::now();
        for (name, entry) in &mut self.entries {
            if entry.busy || entry.next > now {
                continue;
            }
            entry.busy = true;
            let job = Job {
                name: name.clone(),
                current: entry.cert.clone(),
                challenge: acme.challenge,
                renew_before: acme.renew_before,
            };
            let (ctx, tx, generation) = (Arc::clone(&ctx), self.done_tx.clone(), self.generation);
            tokio::spawn(async move {
                let name = job.name.clone();
                // A panic in the order must not leave the name marked busy forever.
                let result = tokio::spawn(ctx.obtain(job))
                    .await
                    .unwrap_or_else(|e| Err(Failure::Error(format!("the order task failed: {e}"))));
                let _ = tx.send(Msg::Done(Done { name, generation, result }));
            });
        }
    }

    fn finish(&mut self, done: Done) {
        if done.generation != self.generation {
            return;
        }
        let renew_before =
            self.mgr.tx.borrow().acme.as_ref().map_or(Duration::from_secs(30 * 86_400), |a| a.renew_before);
        let Some(entry) = self.entries.get_mut(&done.name) else {
            return;
        };
        entry.busy = false;
        let recheck = std::mem::take(&mut entry.recheck);
        let was_waiting = std::mem::take(&mut entry.store_wait);
        let store_failures = std::mem::take(&mut entry.store_failures);
        let stats = &self.mgr.stats;
        match done.result {
            Ok(out) => {
                let renewed = entry.cert.is_some();
                if out.ordered {
                    stats.orders_ok.fetch_add(1, Ordering::Relaxed);
                    if renewed {
                        stats.renewals.fetch_add(1, Ordering::Relaxed);
                    }
                    tracing::info!(name = %done.name, serial = %out.loaded.serial,
                        not_after = out.loaded.info.not_after, took_ms = out.took.as_millis() as u64,
                        renewal = renewed, "ACME certificate issued");
                } else {
                    stats.picked_up.fetch_add(1, Ordering::Relaxed);
                    let delay_ms = out.loaded.meta.as_ref().map(|m| unix_ms(SystemTime::now()).saturating_sub(m.at_ms));
                    if let Some(ms) = delay_ms {
                        stats.propagation.observe(Duration::from_millis(ms));
                    }
                    tracing::info!(name = %done.name, serial = %out.loaded.serial, propagation_ms = delay_ms,
                        "ACME certificate stored by another gateway picked up");
                }
                entry.next = renewal_instant(&out.loaded, renew_before);
                entry.cert = Some(out.loaded);
                entry.failures = 0;
                entry.last_error = None;
                self.dirty = true;
            }
            Err(Failure::Deferred) => {
                stats.store.lock_waits.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(name = %done.name, "another gateway is ordering this name; looking again shortly");
                // An event about a certificate stored meanwhile: look at once.
                entry.next = Instant::now() + if recheck { Duration::ZERO } else { jittered(DEFERRED_RETRY) };
            }
            Err(Failure::Store(message)) => {
                entry.store_failures = store_failures + 1;
                entry.store_wait = true;
                let delay = jittered(retry_delay(entry.store_failures, None).min(STORE_RETRY_CAP));
                entry.next = Instant::now() + delay;
                if was_waiting {
                    tracing::debug!(name = %done.name, retry_in_ms = delay.as_millis() as u64, "ACME store still unreachable: {message}");
                } else if entry.cert.is_some() {
                    tracing::warn!(name = %done.name, retry_in_ms = delay.as_millis() as u64,
                        "ACME renewal waits for the store (the current certificate keeps serving): {message}");
                } else {
                    tracing::warn!(name = %done.name, retry_in_ms = delay.as_millis() as u64,
                        "ACME host not ready: no certificate until the store can be reached (its handshakes are refused): {message}");
                }
                entry.last_error = Some(message);
                self.dirty = true;
            }
            Err(Failure::Error(message) | Failure::AccountGone(message)) => {
                stats.orders_failed.fetch_add(1, Ordering::Relaxed);
                entry.failures += 1;
                let remaining = remaining_lifetime(entry.cert.as_ref());
                // A server that refuses the name or says to slow down is asked again after
                // the longest back-off, not in seconds: failed validations and orders count
                // against its rate limits, which would then hold every other name too.
                let failures = if slow_down(&message) { u32::MAX } else { entry.failures };
                let delay = jittered(retry_delay(failures, remaining));
                entry.next = Instant::now() + delay;
                tracing::error!(name = %done.name, failures = entry.failures,
                    retry_in_ms = delay.as_millis() as u64,
                    has_certificate = entry.cert.is_some(), "ACME order failed: {message}");
                entry.last_error = Some(message);
                self.dirty = true;
            }
        }
    }

    /// Clustered: forwards the store's events to the loop and schedules the re-reads.
    fn listen(&mut self, ctx: &Ctx) {
        let Some(mut events) = ctx.storage.events() else {
            self.resync_at = None;
            return;
        };
        self.resync_at = Some(Instant::now() + jittered(RESYNC_EVERY));
        let (tx, generation, stop) = (self.done_tx.clone(), self.generation, self.mgr.stop.clone());
        tokio::spawn(async move {
            loop {
                let event = tokio::select! {
                    () = stop.cancelled() => return,
                    e = events.recv() => e,
                };
                let event = match event {
                    Ok(e) => e,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => Event::Resync,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                };
                if tx.send(Msg::Event(generation, event)).is_err() {
                    return;
                }
            }
        });
    }

    fn on_event(&mut self, generation: u64, event: Event) {
        if generation != self.generation {
            return;
        }
        let Some(ctx) = self.ctx.clone() else { return };
        match event {
            Event::Cert { name, by, .. } => {
                if by == ctx.replica {
                    return;
                }
                let Some(entry) = self.entries.get_mut(&name) else { return };
                if entry.busy {
                    entry.recheck = true;
                } else {
                    self.reread(&ctx, vec![name]);
                }
            }
            Event::Resync => {
                // The channel is (back) up: names that waited for the store go now, and
                // everything is read again for what the events missed.
                let now = Instant::now();
                for e in self.entries.values_mut().filter(|e| !e.busy && e.store_wait) {
                    e.next = now;
                }
                self.resync();
            }
        }
    }

    /// Reads every name not busy again from the store (clustered only).
    fn resync(&mut self) {
        let Some(ctx) = self.ctx.clone() else { return };
        if !ctx.storage.shared() {
            self.resync_at = None;
            return;
        }
        self.resync_at = Some(Instant::now() + jittered(RESYNC_EVERY));
        let names: Vec<String> = self.entries.iter().filter(|(_, e)| !e.busy).map(|(n, _)| n.clone()).collect();
        if !names.is_empty() {
            self.reread(&ctx, names);
        }
    }

    /// Reads `names` from the store in a task; each result comes back as `Msg::Reread`.
    fn reread(&self, ctx: &Arc<Ctx>, names: Vec<String>) {
        let (ctx, tx, generation) = (Arc::clone(ctx), self.done_tx.clone(), self.generation);
        tokio::spawn(async move {
            for name in names {
                match ctx.fetch_cert(&name).await {
                    Ok(loaded) => {
                        if tx.send(Msg::Reread { name, generation, loaded }).is_err() {
                            return;
                        }
                    }
                    // One that does not decrypt: the others may (its order sets it aside).
                    Err(StorageError::Sealed(e)) => tracing::debug!(name, "stored certificate not reread: {e}"),
                    // Unreachable store: recorded and logged by the store's counters.
                    Err(_) => return,
                }
            }
        });
    }

    /// Adopts a certificate read from the store when it is newer than the one served.
    fn on_reread(&mut self, name: &str, generation: u64, loaded: Option<Loaded>) {
        if generation != self.generation {
            return;
        }
        let renew_before = self.renew_before;
        let Some(entry) = self.entries.get_mut(name) else { return };
        let Some(l) = loaded else { return };
        let elsewhere = self.ctx.as_ref().is_some_and(|c| c.issued_elsewhere(&l));
        let newer = match &entry.cert {
            None => true,
            // Another directory's certificate (a replica still on staging, say) never
            // replaces one this directory issued.
            Some(c) => !elsewhere && c.serial != l.serial && l.info.not_after >= c.info.not_after,
        };
        if !newer {
            if let Some(c) = entry.cert.as_mut().filter(|c| c.serial == l.serial && c.meta.is_none()) {
                c.meta = l.meta;
            }
            return;
        }
        if entry.busy {
            entry.recheck = true;
            return;
        }
        let stats = &self.mgr.stats;
        stats.picked_up.fetch_add(1, Ordering::Relaxed);
        let delay_ms = l.meta.as_ref().map(|m| unix_ms(SystemTime::now()).saturating_sub(m.at_ms));
        if let Some(ms) = delay_ms {
            stats.propagation.observe(Duration::from_millis(ms));
        }
        tracing::info!(name, serial = %l.serial, not_after = l.info.not_after,
            ordered_by = l.meta.as_ref().map_or("?", |m| m.by.as_str()), propagation_ms = delay_ms,
            renewal = entry.cert.is_some(), "ACME certificate stored by another replica picked up");
        // Served until this directory's own replaces it, ordered at once.
        entry.next = if elsewhere { Instant::now() } else { renewal_instant(&l, renew_before) };
        entry.cert = Some(l);
        entry.failures = 0;
        entry.last_error = None;
        entry.store_wait = false;
        self.dirty = true;
    }

    /// Swaps the resolver's ACME store and the status when something changed.
    fn publish(&mut self) {
        let now = Instant::now();
        let status: Vec<NameStatus> = self
            .entries
            .iter()
            .map(|(name, e)| NameStatus {
                name: name.clone(),
                state: match &e.cert {
                    None => "pending",
                    Some(l) if expired(l.info.not_after) => "expired",
                    Some(_) if e.next <= now || e.busy => "renewing",
                    Some(_) => "valid",
                },
                not_after: e.cert.as_ref().map(|l| l.info.not_after),
                next_attempt_in: (!e.busy).then(|| e.next.saturating_duration_since(now).as_secs() as i64),
                failures: e.failures,
                last_error: e.last_error.clone(),
                serial: e.cert.as_ref().map(|l| l.serial.clone()),
                ordered_by: e.cert.as_ref().and_then(|l| l.meta.as_ref()).map(|m| m.by.clone()),
                ordered_at: e.cert.as_ref().and_then(|l| l.meta.as_ref()).map(|m| (m.at_ms / 1000) as i64),
            })
            .collect();
        let pending = self.entries.values().filter(|e| e.cert.is_none()).count();
        self.mgr.stats.pending.store(pending as u64, Ordering::Relaxed);
        *self.mgr.status.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = status;
        if !self.dirty {
            return;
        }
        self.dirty = false;
        let mut store = CertStore::default();
        for e in self.entries.values() {
            if let Some(l) = &e.cert {
                store.add(Arc::clone(&l.ck), l.info.clone());
            }
        }
        self.mgr.certs.set_acme(store);
    }
}

struct Job {
    name: String,
    current: Option<Loaded>,
    challenge: Challenge,
    renew_before: Duration,
}

fn cert_key(name: &str) -> String {
    format!("certs/{name}.pem")
}

/// Who ordered the certificate of `name` ([`OrderMeta`]).
fn meta_key(name: &str) -> String {
    format!("orders/{name}.json")
}

/// The `[acme]` settings' local resources, checked before a config is taken (start,
/// reload, `swarmgate check`): a storage directory that can be made and written to, a
/// Redis URL the client takes, a `ca_file` of certificates. Nothing is contacted.
pub fn check_settings(acme: &config::Acme) -> Vec<config::Problem> {
    let storage = if is_redis_url(&acme.storage) {
        RedisStorage::open(&acme.storage, None, Arc::default()).map(drop)
    } else {
        check_writable_dir(Path::new(&acme.storage))
    };
    let http = AcmeHttp::new(acme.ca_file.as_deref()).map(drop);
    [(storage, &acme.storage_at), (http, &acme.ca_file_at)]
        .into_iter()
        .filter_map(|(result, at)| result.err().map(|e| at.problem(e)))
        .collect()
}

/// Whether `dir`, or where it would be made (its nearest existing parent), is a directory
/// files can be written in (a read-only mount, or a file in the way, is not). Leaves
/// nothing behind.
fn check_writable_dir(dir: &Path) -> Result<(), String> {
    let at = dir.ancestors().find(|p| !p.as_os_str().is_empty() && p.exists()).unwrap_or(Path::new("."));
    if !at.is_dir() {
        return Err(format!("[acme].storage {}: {} is not a directory", dir.display(), at.display()));
    }
    // Random: replicas sharing the directory are all PID 1.
    let probe = at.join(format!(".swarmgate-probe-{:016x}", rand::random::<u64>()));
    std::fs::write(&probe, b"")
        .and_then(|()| match std::fs::remove_file(&probe) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        })
        .map_err(|e| format!("[acme].storage {}: cannot write in {}: {e}", dir.display(), at.display()))
}

impl Ctx {
    fn new(acme: &config::Acme, local: LocalPublisher, counters: Arc<StoreCounters>) -> Result<Ctx, String> {
        counters.up.store(1, Ordering::Relaxed);
        let (storage, publisher, remote): (Arc<dyn Storage>, Arc<dyn Publisher>, _) = if is_redis_url(&acme.storage) {
            let store = RedisStorage::open(&acme.storage, None, Arc::clone(&counters))?;
            let handle = tokio::runtime::Handle::try_current()
                .map_err(|e| format!("the ACME manager needs a tokio runtime: {e}"))?;
            let remote = RemoteAnswers { store: store.clone(), handle };
            let publisher = Arc::new(ClusterPublisher { local, store: store.clone() });
            (Arc::new(store), publisher, Some(remote))
        } else {
            (Arc::new(DirStorage::open(&acme.storage).map_err(|e| e.to_string())?), Arc::new(local), None)
        };
        let storage: Arc<dyn Storage> = match &acme.storage_key {
            Some(key) => Arc::new(super::seal::Sealed::new(storage, key)?),
            None => storage,
        };
        Ok(Ctx {
            directory: acme.directory.clone(),
            contact: acme.contact.clone(),
            ca_file: acme.ca_file.clone(),
            storage_spec: acme.storage.clone(),
            storage_key: acme.storage_key.clone(),
            replica_id: acme.replica_id.clone(),
            replica: acme.replica_id.clone().unwrap_or_else(super::storage::default_replica_id),
            storage,
            counters,
            remote,
            http: AcmeHttp::new(acme.ca_file.as_deref())?,
            publisher,
            account: tokio::sync::Mutex::new(None),
            account_key: format!("accounts/{}.json", key_segment(&acme.directory)),
            limit: Semaphore::new(CONCURRENT_ORDERS),
        })
    }

    /// Whether another ACME directory issued `l` (staging before production, say): it
    /// serves until this directory's certificate replaces it, ordered at once.
    fn issued_elsewhere(&self, l: &Loaded) -> bool {
        let same = |a: &str, b: &str| a.trim_end_matches('/') == b.trim_end_matches('/');
        l.meta.as_ref().and_then(|m| m.directory.as_deref()).is_some_and(|d| !same(d, &self.directory))
    }

    /// A sealed value read without `SWARMGATE_ACME_STORAGE_KEY` (another replica has it,
    /// this one does not, as during a rollout that brings it in): an error like a store
    /// that cannot be read, never a corrupt value to set aside.
    fn sealed_without_key(&self, key: &str, bytes: &[u8]) -> Result<(), StorageError> {
        if self.storage_key.is_none() && super::seal::is_sealed(bytes) {
            let file = self.storage.locate(key);
            return Err(StorageError::Sealed(format!("{file}: sealed, and {} is not set here", super::seal::KEY_VAR)));
        }
        Ok(())
    }

    /// Seals what was stored before `SWARMGATE_ACME_STORAGE_KEY` was set: the account,
    /// which is never written again, and certificates (with who ordered them), which would
    /// stay in the clear until their renewal.
    ///
    /// Only when no sealed value fails to open: one that does suggests this is the wrong
    /// key, and the account sealed with it would seem to prove the key right (then a
    /// certificate sealed with the right one would be set aside as corrupt). Each value is
    /// rewritten under the lease its writers take (`account`, `order-NAME`), read again
    /// there, so a value written meanwhile is never replaced by an older one; a value
    /// whose lease is busy is left as it is (sealed at its next write).
    ///
    /// Only for a store of this replica's own (a directory): see where it is started.
    async fn seal_the_clear(self: Arc<Self>) {
        let mut keys = vec![self.account_key.clone()];
        for (prefix, suffix) in [("certs/", ".pem"), ("orders/", ".json")] {
            match self.storage.list(prefix).await {
                Ok(found) => keys.extend(found.into_iter().filter(|k| k.ends_with(suffix))),
                Err(e) => {
                    tracing::debug!("ACME storage not checked for values in the clear: {e}");
                    return;
                }
            }
        }
        let mut clear = Vec::new();
        for key in keys {
            match self.storage.sealing(&key).await {
                Ok(Some(Sealing::Clear)) => clear.push(key),
                Ok(Some(Sealing::DoesNotOpen)) => {
                    let file = self.storage.locate(&key);
                    tracing::warn!(%file, "values stored in the clear stay so: this one does not decrypt with {}",
                        super::seal::KEY_VAR);
                    return;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!("ACME storage not checked for values in the clear: {e}");
                    return;
                }
            }
        }
        for key in clear {
            let lease = match key.strip_prefix("certs/").or_else(|| key.strip_prefix("orders/")) {
                Some(file) => format!("order-{}", file.trim_end_matches(".pem").trim_end_matches(".json")),
                None => "account".to_string(),
            };
            let Ok(Some(lease)) = self.storage.lock(&lease, self.storage.lease_ttl()).await else { continue };
            let sealed = async {
                if self.storage.sealing(&key).await? != Some(Sealing::Clear) {
                    return Ok(false);
                }
                let Some(value) = self.storage.get(&key).await? else { return Ok(false) };
                self.storage.put_fenced(&key, &value, lease.token).await.map(|()| true)
            };
            match sealed.await {
                Ok(true) => tracing::info!(file = %self.storage.locate(&key),
                    "ACME value stored in the clear is now encrypted with {}", super::seal::KEY_VAR),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(file = %self.storage.locate(&key), "cannot encrypt a value stored in the clear: {e}")
                }
            }
            if let Err(e) = self.storage.unlock(&lease).await {
                tracing::debug!("cannot release a lease after sealing: {e}");
            }
        }
    }

    /// Every stored certificate by name; files that are not one are moved aside.
    async fn load_all(&self, wanted: &BTreeSet<String>) -> HashMap<String, Loaded> {
        let mut out = HashMap::new();
        let keys = match self.storage.list("certs/").await {
            Ok(k) => k,
            Err(e) => {
                tracing::error!(storage = %self.storage.describe(), acme_hosts_not_ready = ?wanted,
                    "cannot list stored certificates ({e}); static hosts are served, ACME hosts wait for the store");
                return out;
            }
        };
        for key in keys {
            if key.contains(".corrupt-") {
                continue;
            }
            let Some(name) =
                key.strip_prefix("certs/").and_then(|k| k.strip_suffix(".pem")).filter(|n| !n.contains('/'))
            else {
                self.set_aside(&key, "not a file swarmgate writes here").await;
                continue;
            };
            if let Some(l) = self.load_cert(name).await {
                out.insert(name.to_string(), l);
            }
        }
        out
    }

    /// The stored certificate for `name`, if there is a good one (a bad one is set aside).
    async fn load_cert(&self, name: &str) -> Option<Loaded> {
        match self.fetch_cert(name).await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(name, "cannot read the stored certificate: {e}");
                None
            }
        }
    }

    /// The stored certificate for `name` with who ordered it; a bad one is set aside
    /// (`Ok(None)`); `Err` when the store cannot be read.
    async fn fetch_cert(&self, name: &str) -> Result<Option<Loaded>, StorageError> {
        let key = cert_key(name);
        let Some(bytes) = self.storage.get(&key).await? else {
            return Ok(None);
        };
        self.sealed_without_key(&key, &bytes)?;
        match parse_bundle(&bytes, name, self.storage.locate(&key)) {
            Ok(mut l) => {
                if let Ok(Some(meta)) = self.storage.get(&meta_key(name)).await {
                    l.meta = serde_json::from_slice::<OrderMeta>(&meta).ok().filter(|m| m.serial == l.serial);
                }
                Ok(Some(l))
            }
            Err(reason) => {
                self.set_aside(&key, &reason).await;
                Ok(None)
            }
        }
    }

    async fn set_aside(&self, key: &str, reason: &str) {
        let ts = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let aside = format!("{key}.corrupt-{ts}");
        match self.storage.rename(key, &aside).await {
            Ok(false) => {
                tracing::debug!(file = %self.storage.locate(key), "unusable file in ACME storage gone already")
            }
            Ok(true) => {
                tracing::error!(file = %self.storage.locate(key), moved_to = %self.storage.locate(&aside),
                "unusable file in ACME storage moved aside: {reason}")
            }
            Err(e) => tracing::error!(file = %self.storage.locate(key),
                "unusable file in ACME storage ({reason}) could not be moved aside: {e}"),
        }
    }

    fn builder(&self) -> instant_acme::AccountBuilder {
        Account::builder_with_http(Box::new(self.http.clone()))
    }

    /// The account: restored from storage, or created once (under the `account` lease),
    /// with the stored credentials it came from.
    ///
    /// `gone`: the credentials of an account the ACME server no longer knows (reset,
    /// deactivated, deleted). That account is neither used from memory nor taken from the
    /// store; one replica replaces it in the store (under the lease) and every other one,
    /// and every other order here, takes the replacement: all converge on one new account.
    /// Credentials tell accounts apart, not the account URL a reset server may reuse.
    async fn account(&self, gone: Option<(&StoredAccount, &str)>) -> Result<StoredAccount, Failure> {
        let mut slot = self.account.lock().await;
        let gone = gone.map(|(a, said)| {
            // Logged once: by the first order to find out (the others find it replaced).
            if slot.as_ref().is_some_and(|s| s.creds == a.creds) {
                tracing::warn!(id = %a.account.id(), file = %self.storage.locate(&self.account_key),
                    "the ACME server no longer knows this account ({said}); registering a new one and ordering again");
            }
            a.creds.as_slice()
        });
        if let Some(a) = slot.as_ref().filter(|a| Some(a.creds.as_slice()) != gone) {
            return Ok(a.clone());
        }
        *slot = None;
        let usable = |a: &StoredAccount| Some(a.creds.as_slice()) != gone;
        if let Some(account) = self.stored_account().await?.filter(usable) {
            tracing::info!(id = %account.account.id(), "ACME account restored from storage");
            *slot = Some(account.clone());
            return Ok(account);
        }
        // One replica creates it; the others wait for it to appear in the store.
        let waited_since = Instant::now();
        let mut counted = false;
        let lease = loop {
            match self.storage.lock("account", self.storage.lease_ttl()).await.map_err(store_failure)? {
                Some(l) => break l,
                None => {
                    if !counted {
                        counted = true;
                        self.counters.lock_waits.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!("another replica is creating the ACME account; waiting for it");
                    }
                    if waited_since.elapsed() > ACCOUNT_WAIT {
                        return Err(Failure::Deferred);
                    }
                    tokio::time::sleep(jittered(Duration::from_millis(150))).await;
                    if let Some(account) = self.stored_account().await?.filter(usable) {
                        tracing::info!(id = %account.account.id(), "ACME account created by another replica restored from storage");
                        *slot = Some(account.clone());
                        return Ok(account);
                    }
                }
            }
        };
        let created = async {
            // Another gateway may have made it while we waited for the lease.
            if let Some(account) = self.stored_account().await?.filter(usable) {
                return Ok(account);
            }
            let contact: Vec<&str> = self.contact.iter().map(String::as_str).collect();
            let (account, creds) = self
                .builder()
                .create(
                    &NewAccount { contact: &contact, terms_of_service_agreed: true, only_return_existing: false },
                    self.directory.clone(),
                    None,
                )
                .await
                .map_err(|e| Failure::Error(format!("creating the ACME account: {}", acme_error(&e))))?;
            let json =
                serde_json::to_vec_pretty(&creds).map_err(|e| Failure::Error(format!("account credentials: {e}")))?;
            // Replaces a stored account the server no longer knows (the fencing token of
            // this lease is newer than the one it was written with).
            match self.storage.put_fenced(&self.account_key, &json, lease.token).await {
                Ok(()) => {}
                Err(StorageError::Fenced { .. }) => {
                    if let Some(a) = self.stored_account().await?.filter(usable) {
                        return Ok(a);
                    }
                }
                Err(e) => tracing::error!("ACME account created but not stored ({e}); a restart will create another"),
            }
            tracing::info!(id = %account.id(), file = %self.storage.locate(&self.account_key),
                "ACME account created");
            Ok(StoredAccount { account, creds: json })
        }
        .await;
        let _ = self.storage.unlock(&lease).await;
        let account = created?;
        *slot = Some(account.clone());
        Ok(account)
    }

    async fn stored_account(&self) -> Result<Option<StoredAccount>, Failure> {
        let bytes = match self.storage.get(&self.account_key).await {
            Ok(Some(b)) => b,
            Ok(None) => return Ok(None),
            Err(e) => return Err(store_failure(e)),
        };
        self.sealed_without_key(&self.account_key, &bytes).map_err(store_failure)?;
        match serde_json::from_slice::<AccountCredentials>(&bytes) {
            Ok(creds) => self
                .builder()
                .from_credentials(creds)
                .await
                .map(|account| Some(StoredAccount { account, creds: bytes }))
                .map_err(|e| Failure::Error(format!("restoring the ACME account: {}", acme_error(&e)))),
            Err(e) => {
                self.set_aside(&self.account_key, &format!("not ACME account credentials: {e}")).await;
                Ok(None)
            }
        }
    }

    /// Gets a certificate for one name: picks up one another gateway stored, or orders.
    async fn obtain(self: Arc<Self>, job: Job) -> Result<Outcome, Failure> {
        let _permit = self.limit.acquire().await.map_err(|_| Failure::Error("shutting down".into()))?;
        let started = std::time::Instant::now();
        let lease = match self.storage.lock(&format!("order-{}", job.name), self.storage.lease_ttl()).await {
            Ok(Some(l)) => l,
            Ok(None) => return Err(Failure::Deferred),
            Err(e) => return Err(store_failure(e)),
        };
        let token = lease.token;
        let work = async {
            match tokio::time::timeout(ORDER_TIMEOUT, self.obtain_locked(&job, token)).await {
                Ok(r) => r,
                Err(_) => Err(Failure::Error(format!("no certificate within {}s", ORDER_TIMEOUT.as_secs()))),
            }
        };
        let (result, lease) = self.holding(lease, work).await;
        if let Err(e) = self.storage.unlock(&lease).await {
            tracing::warn!(name = %job.name, "cannot release the order lock: {e}");
        }
        result.map(|(loaded, ordered)| Outcome { loaded, ordered, took: started.elapsed() })
    }

    /// Runs `work` while renewing `lease`; returns the result and the lease as last renewed.
    async fn holding<T>(&self, mut lease: Lease, work: impl Future<Output = T>) -> (T, Lease) {
        tokio::pin!(work);
        let ttl = self.storage.lease_ttl();
        let every = ttl / 3;
        let mut tick = tokio::time::interval_at(Instant::now() + every, every);
        loop {
            tokio::select! {
                out = &mut work => return (out, lease),
                _ = tick.tick() => match self.storage.renew(&lease, ttl).await {
                    Ok(Some(l)) => lease = l,
                    Ok(None) => tracing::warn!(lock = %lease.name,
                        "order lease lost; the fencing token keeps a newer certificate from being overwritten"),
                    Err(e) => tracing::warn!(lock = %lease.name, "cannot renew the order lease: {e}"),
                },
            }
        }
    }

    async fn obtain_locked(&self, job: &Job, token: u64) -> Result<(Loaded, bool), Failure> {
        // Another gateway sharing the storage may have just stored a fresh one.
        let stored = match self.fetch_cert(&job.name).await {
            Ok(stored) => stored,
            // Sealed with another key, or altered. Only the account, sealed and opening
            // with this key, tells which: then the certificate is corrupt, and it would
            // block its name for good if it stayed. Otherwise (a wrong key) nothing moves.
            Err(StorageError::Sealed(e)) => {
                if !self.storage.opens_sealed(&self.account_key).await.map_err(store_failure)? {
                    return Err(store_failure(StorageError::Sealed(e)));
                }
                self.set_aside(&cert_key(&job.name), &format!("does not decrypt while the account does: {e}")).await;
                None
            }
            Err(e) => return Err(store_failure(e)),
        };
        if let Some(stored) = stored {
            let newer = job.current.as_ref().is_none_or(|c| c.serial != stored.serial);
            let not_due =
                !self.issued_elsewhere(&stored) && renewal_time(&stored, job.renew_before, 0.0) > SystemTime::now();
            if newer && not_due {
                return Ok((stored, false));
            }
        }
        let account = self.account(None).await?;
        let (chain, key) = match self.order(&account.account, &job.name, job.challenge).await {
            // Reset, deactivated or deleted: a new account, and the order again at once.
            Err(Failure::AccountGone(said)) => {
                let account = self.account(Some((&account, &said))).await?;
                self.order(&account.account, &job.name, job.challenge).await?
            }
            other => other?,
        };
        let bundle = format!("{}\n{}", chain.trim_end(), key);
        let key_name = cert_key(&job.name);
        let loaded = parse_bundle(bundle.as_bytes(), &job.name, self.storage.locate(&key_name))
            .map_err(|e| Failure::Error(format!("the ACME server returned an unusable certificate: {e}")))?;
        let meta = OrderMeta {
            serial: loaded.serial.clone(),
            by: self.replica.clone(),
            at_ms: unix_ms(SystemTime::now()),
            directory: Some(self.directory.clone()),
        };
        let mut stored = self.storage.put_fenced(&key_name, bundle.as_bytes(), token).await;
        // A store that went away mid-order: the certificate is worth a few more tries.
        for delay in [1, 2, 4] {
            match &stored {
                Err(StorageError::Backend(e)) => {
                    tracing::warn!(name = %job.name, "certificate issued but not stored yet ({e}); trying again in {delay}s");
                    tokio::time::sleep(Duration::from_secs(delay)).await;
                    stored = self.storage.put_fenced(&key_name, bundle.as_bytes(), token).await;
                }
                _ => break,
            }
        }
        match stored {
            Ok(()) => {
                let mut loaded = loaded;
                match serde_json::to_vec(&meta) {
                    Ok(json) => {
                        if let Err(e) = self.storage.put_fenced(&meta_key(&job.name), &json, token).await {
                            tracing::warn!(name = %job.name, "cannot store who ordered the certificate: {e}");
                        }
                    }
                    Err(e) => tracing::warn!(name = %job.name, "order metadata: {e}"),
                }
                let event = Event::Cert { name: job.name.clone(), by: meta.by.clone(), at_ms: meta.at_ms };
                if let Err(e) = self.storage.announce(&event).await {
                    tracing::warn!(name = %job.name,
                        "cannot tell the other replicas about the new certificate (they re-read the store): {e}");
                }
                loaded.meta = Some(meta);
                return Ok((loaded, true));
            }
            Err(StorageError::Fenced { .. }) => {
                tracing::warn!(name = %job.name, "a newer certificate was stored meanwhile by another gateway; using it");
                if let Some(stored) = self.load_cert(&job.name).await {
                    return Ok((stored, true));
                }
            }
            Err(e) => tracing::error!(name = %job.name,
                "certificate issued but not stored ({e}); it is served until restart"),
        }
        Ok((loaded, true))
    }

    /// One ACME order for `name`: answers the challenge, finalizes, downloads the chain.
    /// Returns (PEM chain, PEM key).
    async fn order(&self, account: &Account, name: &str, challenge: Challenge) -> Result<(String, String), Failure> {
        let err = |what: &str, e: instant_acme::Error| {
            let message = format!("{what} for {name}: {}", acme_error(&e));
            if account_gone(&e) { Failure::AccountGone(message) } else { Failure::Error(message) }
        };
        let ids = [Identifier::Dns(name.to_string())];
        let mut order = account.new_order(&NewOrder::new(&ids)).await.map_err(|e| err("new order", e))?;
        let kind = match challenge {
            Challenge::Http01 => ChallengeType::Http01,
            Challenge::TlsAlpn01 => ChallengeType::TlsAlpn01,
        };
        let mut published: Vec<Answer> = Vec::new();
        let work = async {
            let mut authzs = order.authorizations();
            while let Some(authz) = authzs.next().await {
                let mut authz = authz.map_err(|e| err("authorization", e))?;
                match authz.status {
                    AuthorizationStatus::Valid => continue,
                    AuthorizationStatus::Pending => {}
                    other => {
                        return Err(Failure::Error(format!("authorization for {name} is {other:?}")));
                    }
                }
                let mut ch = authz.challenge(kind.clone()).ok_or_else(|| {
                    Failure::Error(format!("the ACME server offers no {kind:?} challenge for {name}"))
                })?;
                let key_auth = ch.key_authorization();
                let answer = match challenge {
                    Challenge::Http01 => {
                        Answer::Http01 { token: ch.token.clone(), key_authorization: key_auth.as_str().to_string() }
                    }
                    Challenge::TlsAlpn01 => Answer::TlsAlpn01 {
                        name: ch.identifier().to_string(),
                        digest: key_auth.digest().as_ref().to_vec(),
                    },
                };
                // Noted first: a publish that failed half-way (applied here, not stored)
                // is withdrawn too.
                published.push(answer.clone());
                self.publisher
                    .publish(&answer)
                    .await
                    .map_err(|e| Failure::Error(format!("publishing the challenge answer: {e}")))?;
                ch.set_ready().await.map_err(|e| err("challenge", e))?;
            }
            let policy = RetryPolicy::new()
                .initial_delay(Duration::from_millis(50))
                .backoff(1.5)
                .timeout(Duration::from_secs(90));
            let status = match order.state().status {
                OrderStatus::Ready => OrderStatus::Ready,
                _ => match order.poll_ready(&policy).await {
                    Ok(s) => s,
                    Err(e) => {
                        let said = acme_error(&e);
                        let detail = failure_detail(&mut order, &said).await;
                        return Err(Failure::Error(format!("validation for {name}: {said}{detail}")));
                    }
                },
            };
            if status != OrderStatus::Ready {
                let detail = failure_detail(&mut order, "").await;
                return Err(Failure::Error(format!("order for {name} became {status:?}{detail}")));
            }
            let key = order.finalize().await.map_err(|e| err("finalize", e))?;
            let chain = order.poll_certificate(&policy).await.map_err(|e| err("certificate", e))?;
            Ok((chain, key))
        };
        let result = tokio::time::timeout(ORDER_WORK_TIMEOUT, work).await.unwrap_or_else(|_| {
            Err(Failure::Error(format!("order for {name} not done within {}s", ORDER_WORK_TIMEOUT.as_secs())))
        });
        // Never left published: a stale local answer would keep another replica's
        // validation of the name from being looked up in the store.
        for answer in &published {
            self.publisher.withdraw(answer).await;
        }
        result
    }
}

/// The problems of a failed order not already in `said`, as ": name Http01: type: detail; …".
async fn failure_detail(order: &mut Order, said: &str) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut add = |text: String, shown: String| {
        if !said.contains(&text) && !parts.iter().any(|p| p.contains(&text)) {
            parts.push(shown);
        }
    };
    if let Some(p) = &order.state().error {
        add(problem_text(p), problem_text(p));
    }
    let mut authzs = order.authorizations();
    while let Some(Ok(mut authz)) = authzs.next().await {
        if let Ok(state) = authz.refresh().await {
            for c in &state.challenges {
                if let Some(p) = &c.error {
                    add(problem_text(p), format!("{} {:?}: {}", state.identifier(), c.r#type, problem_text(p)));
                }
            }
        }
    }
    if parts.is_empty() { String::new() } else { format!(": {}", parts.join("; ")) }
}

/// An RFC 7807 problem as "type: detail (subproblems)".
pub fn problem_text(p: &Problem) -> String {
    let mut s =
        format!("{}: {}", p.r#type.as_deref().unwrap_or("problem"), p.detail.as_deref().unwrap_or("(no detail)"));
    for sub in &p.subproblems {
        s.push_str(&format!(
            "; {}: {}: {}",
            sub.identifier.as_ref().map_or(String::new(), |i| i.authorized(false).to_string()),
            sub.r#type.as_deref().unwrap_or("problem"),
            sub.detail.as_deref().unwrap_or("")
        ));
    }
    s
}

/// An instant-acme error with its problem document or its chain of causes.
pub fn acme_error(e: &instant_acme::Error) -> String {
    if let instant_acme::Error::Api(p) = e {
        return format!("ACME problem {}", problem_text(p));
    }
    let mut s = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        let c = cause.to_string();
        if !s.contains(&c) {
            s.push_str(": ");
            s.push_str(&c);
        }
        source = cause.source();
    }
    s
}

/// Parses a stored bundle (PEM chain, then the PEM key) and checks it covers `name`.
fn parse_bundle(bytes: &[u8], name: &str, location: String) -> Result<Loaded, String> {
    let (ck, info) = crate::tls::store::certified_key_from_pem(bytes, bytes)?;
    if !info.names.iter().any(|n| n.eq_ignore_ascii_case(name)) {
        return Err(format!("the certificate is for {:?}, not {name:?}", info.names));
    }
    let (not_before, serial) = facts(&ck.cert[0])?;
    Ok(Loaded {
        ck: Arc::new(ck),
        info: CertInfo { source: CertSource::Acme, file: Some(PathBuf::from(location)), ..info },
        not_before,
        serial,
        meta: None,
    })
}

fn facts(leaf: &CertificateDer<'_>) -> Result<(i64, String), String> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(leaf.as_ref()).map_err(|e| format!("unreadable certificate: {e}"))?;
    Ok((cert.validity().not_before.timestamp(), cert.raw_serial_as_string()))
}

/// When a certificate is due: `renew_before` its expiry, but no earlier than two thirds
/// into its lifetime (a short-lived certificate is not renewed in a loop), less a jitter
/// of up to 10% of that margin (`jitter` in 0..1) so a fleet spreads its renewals.
fn renewal_time(l: &Loaded, renew_before: Duration, jitter: f64) -> SystemTime {
    let lifetime = (l.info.not_after - l.not_before).max(1) as f64;
    let margin = renew_before.as_secs_f64().min(lifetime / 3.0);
    let at = l.info.not_after as f64 - margin - jitter * margin / 10.0;
    if at <= 0.0 { UNIX_EPOCH } else { UNIX_EPOCH + Duration::from_secs_f64(at) }
}

fn renewal_instant(l: &Loaded, renew_before: Duration) -> Instant {
    let at = renewal_time(l, renew_before, rand::random::<f64>());
    let wait = at.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO);
    Instant::now() + wait
}

/// Back-off after `failures` failed attempts: 1 s doubling, capped at a tenth of the
/// remaining lifetime of the certificate served (at least 1 s; [`EXPIRED_RETRY_CAP`] once
/// it has expired, `remaining` zero) or, without one (`None`), at an hour.
pub fn retry_delay(failures: u32, remaining: Option<Duration>) -> Duration {
    let exp = failures.saturating_sub(1).min(20);
    let delay = RETRY_BASE.saturating_mul(1 << exp);
    let cap = match remaining {
        None => RETRY_CAP,
        Some(Duration::ZERO) => EXPIRED_RETRY_CAP,
        Some(r) => (r / 10).clamp(RETRY_BASE, RETRY_CAP),
    };
    delay.min(cap)
}

/// What is left of the certificate served, for [`retry_delay`]: zero once it has expired
/// (retried every few minutes, not hourly), `None` without one.
fn remaining_lifetime(cert: Option<&Loaded>) -> Option<Duration> {
    cert.map(|l| Duration::from_secs(crate::tls::store::seconds_left(l.info.not_after).max(0) as u64))
}

/// Whether a certificate with this `not_after` has expired.
fn expired(not_after: i64) -> bool {
    crate::tls::store::seconds_left(not_after) <= 0
}

/// Whether the ACME server says the account signing the request is unusable: it does not
/// exist (`accountDoesNotExist`: a reset server, a deleted account) or it is deactivated
/// (RFC 8555 section 7.3.6: `unauthorized`, with a detail saying so: Pebble "Account has
/// been deactivated", Boulder "Account is not valid, has status \"deactivated\"").
fn account_gone(e: &instant_acme::Error) -> bool {
    const URN: &str = "urn:ietf:params:acme:error:";
    let instant_acme::Error::Api(p) = e else { return false };
    let kind = p.r#type.as_deref().and_then(|t| t.strip_prefix(URN));
    let detail = p.detail.as_deref().unwrap_or("").to_ascii_lowercase();
    match kind {
        Some("accountDoesNotExist") => true,
        Some("unauthorized") => detail.contains("deactivated") || detail.contains("account is not valid"),
        _ => false,
    }
}

/// ACME problem types (RFC 8555 section 6.7) after which asking again soon cannot succeed.
const SLOW_PROBLEMS: [&str; 4] = ["rateLimited", "rejectedIdentifier", "unsupportedIdentifier", "caa"];

/// Whether an order's error carries one of [`SLOW_PROBLEMS`].
fn slow_down(message: &str) -> bool {
    const URN: &str = "urn:ietf:params:acme:error:";
    message.match_indices(URN).any(|(i, _)| {
        let rest = &message[i + URN.len()..];
        let kind = &rest[..rest.find(|c: char| !c.is_ascii_alphanumeric()).unwrap_or(rest.len())];
        SLOW_PROBLEMS.contains(&kind)
    })
}

/// ±10% so that failing gateways do not retry in step.
fn jittered(d: Duration) -> Duration {
    d.mul_f64(0.9 + rand::random::<f64>() * 0.2)
}

/// A storage key segment naming a directory URL (`https://h:1/dir` → `h_1_dir`).
fn key_segment(url: &str) -> String {
    let rest = url.strip_prefix("https://").or_else(|| url.strip_prefix("http://")).unwrap_or(url);
    rest.chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' { c } else { '_' })
        .collect::<String>()
        .trim_start_matches('.')
        .to_string()
}

// ---------------------------------------------------------------------------------------

type Connector = hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>;

/// The HTTP client for the ACME API: TCP_NODELAY (no delayed-ACK stall per request),
/// webpki roots plus every certificate in `ca_file`, and a per-request timeout.
#[derive(Clone)]
struct AcmeHttp {
    client: hyper_util::client::legacy::Client<Connector, BodyWrapper<Bytes>>,
}

impl std::fmt::Debug for AcmeHttp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AcmeHttp")
    }
}

impl AcmeHttp {
    fn new(ca_file: Option<&Path>) -> Result<AcmeHttp, String> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = ca_file {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("[acme].ca_file {}: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!("[acme].ca_file {}: no certificate in it", path.display()));
            }
            for cert in certs {
                roots.add(cert).map_err(|e| format!("[acme].ca_file {}: {e}", path.display()))?;
            }
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(crate::tls::provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS client: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut tcp = hyper_util::client::legacy::connect::HttpConnector::new();
        tcp.set_nodelay(true);
        tcp.enforce_http(false);
        tcp.set_connect_timeout(Some(Duration::from_secs(10)));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(tcp);
        let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(AcmeHttp { client })
    }
}

impl HttpClient for AcmeHttp {
    fn request(
        &self,
        req: http::Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let fut = self.client.request(req);
        Box::pin(async move {
            match tokio::time::timeout(REQUEST_TIMEOUT, fut).await {
                Ok(Ok(rsp)) => Ok(BytesResponse::from(rsp)),
                Ok(Err(e)) => Err(instant_acme::Error::Other(Box::new(e))),
                Err(_) => {
                    Err(instant_acme::Error::Other(format!("no answer within {}s", REQUEST_TIMEOUT.as_secs()).into()))
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::super::cluster::redact;
    use super::*;

    #[test]
    fn acme_wants_exact_issuable_hosts_no_static_certificate_covers() {
        let text = "[acme]\n\
                    [[route]]\nhost = \"ok.test\"\nupstream = \"u\"\n\
                    [[route]]\nhost = \"Mixed.Test\"\nupstream = \"u\"\n\
                    [[route]]\nhost = \"a_b.test\"\nupstream = \"u\"\n\
                    [[route]]\nhost = \"10.0.0.1\"\nupstream = \"u\"\n\
                    [[route]]\nhost = \"*\"\nupstream = \"u\"\n\
                    [upstream.u]\nservers = [\"127.0.0.1:8080\"]\n";
        let config = config::parse(Path::new("t.toml"), text, &BTreeMap::new()).unwrap();
        let wanted = Wanted::from_config(&config, &CertStore::default());
        assert_eq!(wanted.names.into_iter().collect::<Vec<_>>(), ["mixed.test", "ok.test"]);
    }

    #[test]
    fn refusals_and_rate_limits_slow_the_retries_down() {
        for slow in [
            "urn:ietf:params:acme:error:rateLimited: too many failed authorizations recently",
            "order: urn:ietf:params:acme:error:rejectedIdentifier: blocked.test is forbidden",
            "urn:ietf:params:acme:error:caa: CAA record forbids issuance",
            "urn:ietf:params:acme:error:unsupportedIdentifier",
        ] {
            assert!(slow_down(slow), "{slow}");
        }
        for quick in [
            "urn:ietf:params:acme:error:connection: 127.0.0.1: connection refused",
            "urn:ietf:params:acme:error:caaFoo: not the caa type",
            "rateLimited without the namespace",
            "no certificate within 180s",
        ] {
            assert!(!slow_down(quick), "{quick}");
        }
    }

    fn loaded(not_before: i64, not_after: i64) -> Loaded {
        let ck = super::super::responder::challenge_cert("x.example", &[0; 32]).unwrap();
        Loaded {
            ck: Arc::new(ck),
            info: CertInfo {
                names: vec!["x.example".into()],
                issuer: String::new(),
                not_after,
                source: CertSource::Acme,
                file: None,
            },
            not_before,
            serial: "01".into(),
            meta: None,
        }
    }

    fn secs(t: SystemTime) -> f64 {
        t.duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
    }

    #[test]
    fn renewal_is_renew_before_expiry_for_long_certificates() {
        let day = 86_400;
        let l = loaded(0, 90 * day);
        let at = renewal_time(&l, Duration::from_secs(30 * day as u64), 0.0);
        assert_eq!(secs(at), (60 * day) as f64);
        let jittered = renewal_time(&l, Duration::from_secs(30 * day as u64), 1.0);
        assert_eq!(secs(jittered), (57 * day) as f64);
    }

    #[test]
    fn short_certificates_are_renewed_at_two_thirds_not_in_a_loop() {
        let l = loaded(1000, 1030);
        let at = renewal_time(&l, Duration::from_secs(30 * 86_400), 0.0);
        assert_eq!(secs(at), 1020.0);
    }

    #[test]
    fn retry_backs_off_and_stays_inside_the_lifetime() {
        assert_eq!(retry_delay(1, None), Duration::from_secs(1));
        assert_eq!(retry_delay(2, None), Duration::from_secs(2));
        assert_eq!(retry_delay(5, None), Duration::from_secs(16));
        assert_eq!(retry_delay(40, None), RETRY_CAP);
        let left = Some(Duration::from_secs(100));
        assert_eq!(retry_delay(10, left), Duration::from_secs(10));
        assert_eq!(retry_delay(10, Some(Duration::from_secs(3))), RETRY_BASE);
        assert_eq!(retry_delay(30, Some(Duration::from_secs(90 * 86_400))), RETRY_CAP);
        // Expired: every few minutes, not the hour of a name without a certificate.
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
        let gone = loaded(now - 100, now - 10);
        assert_eq!(remaining_lifetime(Some(&gone)), Some(Duration::ZERO));
        assert_eq!(retry_delay(40, remaining_lifetime(Some(&gone))), EXPIRED_RETRY_CAP);
        assert_eq!(retry_delay(40, remaining_lifetime(None)), RETRY_CAP);
        assert!(expired(gone.info.not_after) && !expired(now + 10));
        assert_eq!(retry_delay(u32::MAX, Some(Duration::ZERO)), EXPIRED_RETRY_CAP);
        assert_eq!(retry_delay(2, Some(Duration::ZERO)), Duration::from_secs(2));
    }

    #[test]
    fn directory_urls_become_key_segments() {
        assert_eq!(
            key_segment("https://acme-v02.api.letsencrypt.org/directory"),
            "acme-v02.api.letsencrypt.org_directory"
        );
        assert_eq!(key_segment("https://127.0.0.1:14000/dir"), "127.0.0.1_14000_dir");
        assert!(super::super::storage::valid_key(&format!("accounts/{}.json", key_segment("https://[::1]:14000/dir"))));
    }

    #[test]
    fn unknown_and_deactivated_accounts_are_recognised() {
        let problem = |kind: &str, detail: &str| {
            instant_acme::Error::Api(
                serde_json::from_value(serde_json::json!({
                    "type": format!("urn:ietf:params:acme:error:{kind}"), "detail": detail, "status": 400
                }))
                .unwrap(),
            )
        };
        for gone in [
            problem("accountDoesNotExist", "URL in JWS 'kid' field does not correspond to an account"),
            problem("unauthorized", "Account has been deactivated"),
            problem("unauthorized", "Account is not valid, has status \"deactivated\""),
        ] {
            assert!(account_gone(&gone), "{gone}");
        }
        for other in [
            problem("unauthorized", "Account authenticating Request is not owner of the challenge"),
            problem("rejectedIdentifier", "account deactivated"),
            problem("malformed", "accountDoesNotExist"),
            instant_acme::Error::Str("accountDoesNotExist"),
        ] {
            assert!(!account_gone(&other), "{other}");
        }
    }

    #[test]
    fn problems_read_well() {
        let p: Problem = serde_json::from_value(serde_json::json!({
            "type": "urn:ietf:params:acme:error:rejectedIdentifier",
            "detail": "not allowed",
            "status": 400,
            "subproblems": [{"type": "urn:ietf:params:acme:error:dns", "detail": "nope",
                             "identifier": {"type": "dns", "value": "a.test"}}]
        }))
        .unwrap();
        assert_eq!(
            problem_text(&p),
            "urn:ietf:params:acme:error:rejectedIdentifier: not allowed; a.test: urn:ietf:params:acme:error:dns: nope"
        );
        assert_eq!(redact("redis://:pw@h:6379/0"), "redis://***@h:6379/0");
    }

    #[test]
    fn bundles_must_cover_their_name() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["a.example".to_string()]).unwrap().self_signed(&key).unwrap();
        let bundle = format!("{}{}", cert.pem(), key.serialize_pem());
        let l = parse_bundle(bundle.as_bytes(), "a.example", "x".into()).unwrap();
        assert_eq!(l.info.source, CertSource::Acme);
        assert!(parse_bundle(bundle.as_bytes(), "b.example", "x".into()).is_err());
        assert!(parse_bundle(b"garbage", "a.example", "x".into()).is_err());
    }
}
