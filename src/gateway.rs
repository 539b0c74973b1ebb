//! The gateway's shared state and how a configuration becomes (or replaces) it.
//!
//! [`Gateway::new`] and [`Gateway::reload`] are the whole of start-up and reload: load
//! certificates, keep or create each upstream's server set by name, reconcile static
//! server lists, build the router, then swap the snapshot and the certificate store.
//! Anything that can fail happens before the first swap, so an invalid config changes
//! nothing.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use crate::acme::Challenges;
use crate::config::{self, Config};
use crate::metrics::{Metrics, RouteStats};
use crate::route::Router;
use crate::snapshot::{ProxySettings, Route, Snapshot};
use crate::tls::store::CertSource;
use crate::tls::{CertResolver, CertStore, devcert};
use crate::upstream::{ServerSet, SetSettings, Upstream};

/// Everything that outlives one configuration.
pub struct Gateway {
    snapshot: ArcSwap<Snapshot>,
    sets: Mutex<HashMap<String, Arc<ServerSet>>>,
    route_stats: Mutex<crate::FastMap<Arc<str>, Counted>>,
    /// Serialises `apply` (SIGHUP and admin never race each other).
    applying: tokio::sync::Mutex<()>,
    pub certs: Arc<CertResolver>,
    pub challenges: Arc<Challenges>,
    /// Orders and renews certificates for route hosts without a static one.
    pub acme: Arc<crate::acme::Manager>,
    pub metrics: Metrics,
    ready: AtomicBool,
    /// The start's wait for DNS discovery is over (see [`Gateway::await_discovery`]).
    discovered: AtomicBool,
    /// Tasks (discovery, health) per upstream, restarted when their settings change.
    pub(crate) tasks: Mutex<HashMap<String, crate::upstream::Tasks>>,
    /// The nameservers discovery tasks were started with.
    pub(crate) nameservers: Mutex<Vec<std::net::SocketAddr>>,
    /// Upgraded connections (WebSocket tunnels), waited for at shutdown.
    pub tunnels: tokio_util::task::TaskTracker,
}

/// Why a configuration was not applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("invalid configuration:\n{}", problems.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid { problems: Vec<config::Problem> },
    #[error("certificates:\n{}", .0.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n"))]
    Certificates(Vec<crate::tls::store::CertError>),
    #[error("development certificate: {0}")]
    DevCert(String),
    /// What only checks after reading find, each where its setting is written.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Acme(Vec<config::Problem>),
}

/// With `[acme]`: its settings' local resources are usable (see
/// `acme::manager::check_settings`), and every wildcard route host has a static
/// certificate, as ACME cannot issue one and nothing else could serve it over HTTPS.
/// (`*`, any host, is served with whatever certificate a client's name finds.) Run by
/// start, reload and `swarmgate check`.
pub fn check_acme(config: &Config, statics: &CertStore) -> Result<(), ApplyError> {
    let Some(acme) = &config.acme else { return Ok(()) };
    let mut problems: Vec<config::Problem> = config
        .routes
        .iter()
        .filter(|r| matches!(r.host, config::HostPattern::Wildcard(_)) && !statics.covers(&r.host))
        .map(|r| {
            r.host_at.problem(format!(
                "no static certificate for route host {:?}: ACME's HTTP-01 and TLS-ALPN-01 challenges cannot \
                 issue wildcard certificates; put one in [tls].certs_dir",
                r.host.to_string()
            ))
        })
        .collect();
    problems.extend(crate::acme::manager::check_settings(acme));
    problems.sort_by_key(|p| p.order);
    if problems.is_empty() { Ok(()) } else { Err(ApplyError::Acme(problems)) }
}

/// What `/readyz` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// Waiting for the first DNS lookups (see [`Gateway::await_discovery`]).
    Starting,
    Ready,
    ShuttingDown,
}

impl Gateway {
    /// Builds the gateway for `config` (the start-up form of [`Gateway::reload`]).
    pub fn new(config: Config) -> Result<Arc<Gateway>, ApplyError> {
        let certs = Arc::new(CertResolver::default());
        let prepared = prepare_certs(&config, None)?;
        let challenges = Arc::new(Challenges::default());
        let acme = crate::acme::Manager::new(Arc::clone(&certs), Arc::clone(&challenges));
        let gw = Arc::new(Gateway {
            snapshot: ArcSwap::from_pointee(Snapshot {
                router: Router::default(),
                upstreams: crate::FastMap::default(),
                routes: Vec::new(),
                proxy: proxy_settings(&config),
                config: Arc::new(config.clone()),
                generation: 0,
            }),
            sets: Mutex::new(HashMap::new()),
            route_stats: Mutex::new(crate::FastMap::default()),
            applying: tokio::sync::Mutex::new(()),
            certs,
            challenges,
            acme,
            metrics: Metrics::default(),
            ready: AtomicBool::new(true),
            discovered: AtomicBool::new(false),
            tasks: Mutex::new(HashMap::new()),
            nameservers: Mutex::new(Vec::new()),
            tunnels: tokio_util::task::TaskTracker::new(),
        });
        gw.install(config, prepared, 0);
        Ok(gw)
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// The snapshot without touching its reference count (hot path).
    pub fn snapshot_guard(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.snapshot.load()
    }

    /// Serving, and past the start's wait for discovery (see [`Gateway::await_discovery`]).
    pub fn readiness(&self) -> Readiness {
        if !self.ready.load(Ordering::Acquire) {
            Readiness::ShuttingDown
        } else if !self.discovered.load(Ordering::Acquire) {
            Readiness::Starting
        } else {
            Readiness::Ready
        }
    }

    /// At start: `/readyz` says 503 until every DNS upstream has had its first answer
    /// (servers, or none) and every upstream with health checks has had them run through
    /// its servers once, so no load balancer sends traffic that would find an upstream
    /// empty for want of a lookup or a first check: a lookup that fails is no answer. For `at_most`: a
    /// replica whose resolver fails for one name for good still serves its other routes
    /// then (the wait is logged every `remind`). Reloads do not wait: a new upstream is
    /// empty for its first lookup's time, while the rest serve.
    pub async fn await_discovery(&self, at_most: std::time::Duration, remind: std::time::Duration) {
        let started = std::time::Instant::now();
        // And, with health checks, until their servers have had their first: new servers
        // get traffic only after a passing one.
        let pending = || -> Vec<String> {
            let snap = self.snapshot();
            let waits = |u: &Upstream| !u.set.looked_up() || u.config.health.is_some() && !u.set.first_checks_done();
            snap.upstreams.values().filter(|u| waits(u)).map(|u| u.set.name.clone()).collect()
        };
        let mut reminded = started;
        loop {
            let waiting = pending();
            if waiting.is_empty() {
                tracing::debug!(took_ms = started.elapsed().as_millis() as u64, "upstreams looked up and checked");
                break;
            }
            if started.elapsed() >= at_most {
                tracing::warn!(upstreams = ?waiting, waited_s = started.elapsed().as_secs(),
                    "ready with no DNS answer or first health checks yet for these upstreams: they answer 503 until then");
                break;
            }
            if reminded.elapsed() >= remind {
                reminded = std::time::Instant::now();
                tracing::warn!(upstreams = ?waiting, waited_s = started.elapsed().as_secs(),
                    "not ready: no DNS answer or first health checks yet for these upstreams (/readyz says 503, starting)");
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        self.discovered.store(true, Ordering::Release);
    }

    /// From the start of a graceful shutdown, `/readyz` answers 503.
    pub fn set_not_ready(&self) {
        self.ready.store(false, Ordering::Release);
    }

    /// Re-reads the config file and the environment and applies them, or changes nothing.
    pub async fn reload(self: &Arc<Self>, env: &BTreeMap<String, String>) -> Result<u64, ApplyError> {
        let _one_at_a_time = self.applying.lock().await;
        let path = self.snapshot().config.path.clone();
        let t0 = std::time::Instant::now();
        let result = match config::load(&path, env) {
            Err(problems) => Err(ApplyError::Invalid { problems }),
            Ok(mut config) => {
                self.keep_restart_only(&mut config);
                let t1 = std::time::Instant::now();
                prepare_certs(&config, Some(&self.certs.statics())).map(|prepared| {
                    let t2 = std::time::Instant::now();
                    let generation = self.snapshot().generation + 1;
                    self.install(config, prepared, generation);
                    tracing::debug!(
                        parse_ms = (t1 - t0).as_secs_f64() * 1e3,
                        certs_ms = (t2 - t1).as_secs_f64() * 1e3,
                        install_ms = t2.elapsed().as_secs_f64() * 1e3,
                        "reload phases"
                    );
                    generation
                })
            }
        };
        match &result {
            Ok(_) => self.metrics.reloads_ok.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.metrics.reloads_failed.fetch_add(1, Ordering::Relaxed),
        };
        result
    }

    /// Settings only a restart can change are logged, not refused, and the running ones
    /// stay in force: the new snapshot keeps them, so nothing acts on listeners that do
    /// not exist (redirects to an HTTPS port nobody listens on, a development certificate
    /// skipped for one that does).
    fn keep_restart_only(&self, next: &mut Config) {
        let now = self.snapshot();
        if now.config.listen != next.listen {
            tracing::warn!("[listen] changed; the running listeners are kept until restart");
            next.listen = now.config.listen.clone();
        }
        if now.config.runtime.workers != next.runtime.workers {
            tracing::warn!("[runtime] workers changed; takes effect at restart");
            next.runtime.workers = now.config.runtime.workers;
        }
        if now.config.limits.max_connections != next.limits.max_connections {
            tracing::warn!("[limits] max_connections changed; takes effect at restart");
            next.limits.max_connections = now.config.limits.max_connections;
        }
    }

    /// Swaps in a validated config. Cannot fail.
    fn install(self: &Arc<Self>, config: Config, certs: PreparedCerts, generation: u64) {
        let upstreams = self.upstreams_for(&config);
        let (routes, router) = self.routes_for(&config, &upstreams);
        let config = Arc::new(config);
        let snapshot = Snapshot {
            router,
            upstreams,
            routes,
            proxy: proxy_settings(&config),
            config: Arc::clone(&config),
            generation,
        };
        self.certs.set_static(certs.statics);
        self.acme.want(crate::acme::Wanted::from_config(&config, &self.certs.statics()));
        retire(self.snapshot.swap(Arc::new(snapshot)));
        self.retire_upstreams(&config);
        crate::upstream::start_tasks(self, &config);
        if certs.dev_made {
            let file = config.tls.certs_dir.join(format!("{}.crt", devcert::DEV_CERT_STEM));
            tracing::warn!(file = %file.display(), route_hosts = ?certs.dev_hosts,
                "made a self-signed development certificate for localhost, 127.0.0.1, ::1 and the route hosts no certificate covers: browsers will warn; put real certificates in certs_dir, or add an [acme] section");
        }
    }

    /// One `Upstream` per configured name, reusing server sets by name.
    fn upstreams_for(&self, config: &Config) -> crate::FastMap<String, Arc<Upstream>> {
        let mut sets = self.sets.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut out = crate::FastMap::default();
        for (name, up) in &config.upstreams {
            let settings =
                SetSettings { health_checked: up.health.is_some(), drain_timeout: config.proxy.drain_timeout };
            let set = match sets.get(name) {
                Some(set) => {
                    set.set_settings(settings);
                    Arc::clone(set)
                }
                None => {
                    let set = match up.dns {
                        Some(_) => ServerSet::new_discovered(name, settings),
                        None => ServerSet::new(name, settings),
                    };
                    sets.insert(name.clone(), Arc::clone(&set));
                    set
                }
            };
            if up.dns.is_none() {
                let r = set.reconcile(&up.servers);
                if !r.added.is_empty() || !r.draining.is_empty() {
                    tracing::info!(upstream = %name, added = ?r.added, draining = ?r.draining, "servers reconciled");
                }
                // Listed servers are what the config says: no DNS failure left over from a
                // `dns` this upstream had (see `ServerSet::stale`) keeps any of them out.
                set.answered();
            }
            out.insert(name.clone(), Arc::new(Upstream { config: up.clone(), set }));
        }
        out
    }

    /// Upstreams that left the config: their servers drain, then the set is dropped.
    fn retire_upstreams(&self, config: &Config) {
        let mut sets = self.sets.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        sets.retain(|name, set| {
            if config.upstreams.contains_key(name) {
                return true;
            }
            let r = set.reconcile(&[]);
            tracing::info!(upstream = %name, draining = ?r.draining, "upstream removed from the config");
            false
        });
    }

    /// One `Route` per configured route, and the router over them; a route whose label the
    /// last config had keeps its counters and its label.
    fn routes_for(
        &self,
        config: &Config,
        upstreams: &crate::FastMap<String, Arc<Upstream>>,
    ) -> (Vec<Arc<Route>>, Router<Arc<Route>>) {
        let mut stats = self.route_stats.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut keep = crate::FastMap::default();
        keep.reserve(config.routes.len());
        let mut label = String::new();
        let mut routes = Vec::with_capacity(config.routes.len());
        let mut router = Router::default();
        for rc in &config.routes {
            let Some(upstream) = upstreams.get(&rc.upstream) else { continue };
            Route::write_label(&mut label, &rc.host, &rc.path);
            // A route keeps its counters across reloads while its upstream stays: they
            // are shown under the upstream's label, which must not take in another's.
            let (label, s) = match stats.get_key_value(label.as_str()) {
                Some((label, (s, set))) if Arc::ptr_eq(set, &upstream.set) => (Arc::clone(label), Arc::clone(s)),
                Some((label, _)) => (Arc::clone(label), Arc::default()),
                None => (Arc::from(label.as_str()), Arc::default()),
            };
            keep.insert(Arc::clone(&label), (Arc::clone(&s), Arc::clone(&upstream.set)));
            let route = Arc::new(Route::new(label, &rc.path, rc.strip_path, Arc::clone(upstream), s));
            router.insert(&rc.host, &rc.path, Arc::clone(&route));
            routes.push(route);
        }
        *stats = keep;
        (routes, router)
    }
}

/// A route's counters (by its label) with the upstream they were counted for.
type Counted = (Arc<RouteStats>, Arc<ServerSet>);

/// Frees a replaced value on the calling (control) runtime once nothing else holds it.
/// Requests in flight keep the snapshot they began with, and the last of them would
/// otherwise free it on its traffic thread: with 10,000 routes that is about 6 M
/// instructions (some 2 ms) during which the worker's other connections wait.
fn retire<T: Send + Sync + 'static>(old: Arc<T>) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
    runtime.spawn(async move {
        let mut old = old;
        loop {
            match Arc::try_unwrap(old) {
                Ok(last) => return drop(last),
                Err(shared) => old = shared,
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    });
}

/// How much longer than a `response_timeout` an HTTP/2 stream's stall bound is: a server
/// that goes silent mid-body is the body's own timer's to cut (and counted as the
/// server's), before the stream is taken for stalled.
const STALL_MARGIN: std::time::Duration = std::time::Duration::from_secs(1);

fn proxy_settings(config: &Config) -> ProxySettings {
    ProxySettings {
        trusted_proxies: config.proxy.trusted_proxies.clone(),
        redirect_https: config.proxy.redirect_https,
        https_port: config.listen.https.map(|a| a.port()),
        limits: config.limits.clone(),
        acme_http01: config.acme.as_ref().is_some_and(|a| a.challenge == config::Challenge::Http01),
        stream_stall: config
            .upstreams
            .values()
            .map(|u| u.response_timeout + STALL_MARGIN)
            .fold(config.limits.idle_timeout, Ord::max),
    }
}

/// Certificates loaded for a config, before anything is swapped.
pub struct PreparedCerts {
    pub statics: CertStore,
    dev_made: bool,
    dev_hosts: Vec<String>,
}

/// Loads `certs_dir` and, where HTTPS is on without ACME, the development certificate.
/// `running`: the certificates served now, on a reload (see [`refuse_lost_certificates`]).
pub fn prepare_certs(config: &Config, running: Option<&CertStore>) -> Result<PreparedCerts, ApplyError> {
    let dir = &config.tls.certs_dir;
    let mut statics = CertStore::load_dir(dir, &[devcert::DEV_CERT_STEM]).map_err(ApplyError::Certificates)?;
    check_acme(config, &statics)?;
    let mut dev_made = false;
    let mut dev_hosts = Vec::new();
    if config.listen.https.is_some() && config.acme.is_none() {
        dev_hosts = devcert::uncovered(config.routes.iter().map(|r| &r.host), &statics);
        if let Some(running) = running {
            refuse_lost_certificates(config, &dev_hosts, running)?;
        }
        // With no static certificate at all, clients without SNI need one too.
        let always = statics.is_empty();
        if !dev_hosts.is_empty() || always {
            let (dev, made) = devcert::ensure(dir, &dev_hosts, always).map_err(ApplyError::DevCert)?;
            dev_made = made;
            statics.extend(dev);
        }
    }
    Ok(PreparedCerts { statics, dev_made, dev_hosts })
}

/// A reload that would serve a route host the development certificate where a
/// certificate file serves it now is refused (before anything is written): `certs_dir`
/// gone at the reload (a volume or secret not mounted, a directory being swapped) or a
/// file removed would otherwise turn every client of the host away with a self-signed
/// certificate.
fn refuse_lost_certificates(config: &Config, dev_hosts: &[String], running: &CertStore) -> Result<(), ApplyError> {
    let mut lost: Vec<String> = config
        .routes
        .iter()
        .filter(|r| running.served_from(&r.host) == Some(CertSource::Static))
        .map(|r| r.host.to_string())
        .filter(|h| dev_hosts.contains(h))
        .collect();
    if lost.is_empty() {
        return Ok(());
    }
    lost.sort_unstable();
    lost.dedup();
    Err(ApplyError::Certificates(vec![crate::tls::store::CertError {
        path: config.tls.certs_dir.clone(),
        message: format!(
            "no certificate file covers {} any more (one does now): the reload would serve the self-signed \
             development certificate; put the files back, or remove the routes",
            lost.join(", ")
        ),
    }]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_replaced_value_is_freed_by_the_control_runtime_not_its_last_user() {
        let old = Arc::new(vec![1u8; 64]);
        let (in_flight, weak) = (Arc::clone(&old), Arc::downgrade(&old));
        retire(old);
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert!(weak.upgrade().is_some(), "freed while a request still held it");
        // The last request ends: it lets go, but does not free it itself.
        let user = std::thread::spawn(move || drop(in_flight));
        assert!(user.join().is_ok());
        assert!(weak.upgrade().is_some(), "freed by its last user's thread");
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert!(weak.upgrade().is_none(), "never freed");
    }
}
