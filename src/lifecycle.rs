//! Start, reload and shutdown.
//!
//! Start: the config was validated before this runs; the gateway state is built, every
//! listener is bound (exit 2 if one cannot be), then traffic is served by the workers
//! (one single-threaded runtime per thread, see `proxy::workers`) while the control
//! runtime (admin, signals, discovery, health checks) runs on a thread of its own, so
//! control work never competes with traffic.
//!
//! `SIGHUP`: re-read the file and the environment, validate, swap atomically; an invalid
//! config is refused whole and logged, and `/readyz` stays 200.
//! `SIGTERM`/`SIGINT`: `/readyz` answers 503 at once; after `shutdown_delay` the
//! listeners close and every connection is asked to finish; in-flight requests and
//! tunnels get up to `drain_timeout`; then the process exits 0. A second signal during
//! the drain exits at once.

use std::collections::BTreeMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, TlsVersion};
use crate::gateway::Gateway;
use crate::proxy::listener::{self, Kind, Shared};
use crate::proxy::workers::Workers;

/// Process exit codes of `swarmgate run`.
pub mod exit {
    pub const OK: u8 = 0;
    pub const INVALID_CONFIG: u8 = 1;
    pub const CANNOT_BIND: u8 = 2;
}

/// The process environment as a map (read once per start or reload).
pub fn environment() -> BTreeMap<String, String> {
    std::env::vars().collect()
}

/// Runs the gateway until a graceful shutdown; returns the exit code.
pub fn run(config: Config) -> u8 {
    let control = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("swarmgate-control")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the control runtime");
            return exit::INVALID_CONFIG;
        }
    };
    // Installed first: until then SIGHUP and SIGTERM would take their default action and
    // end the process, and starting can take seconds (ACME storage, binding). One that
    // comes before serving is handled once serving begins (a stop then skips
    // `shutdown_delay`).
    let signals_in = {
        let _rt = control.enter();
        match (signal(SignalKind::hangup()), signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            (Ok(h), Ok(t), Ok(i)) => Signals { hup: h, term: t, int: i },
            _ => {
                tracing::error!("cannot install signal handlers");
                return exit::INVALID_CONFIG;
            }
        }
    };
    let threads = config.runtime.threads();
    crate::proxy::workers::set_count(threads);
    let min_tls = config.tls.min_version;
    let listen = config.listen.clone();
    let limits = config.limits.clone();
    let gw = match control.block_on(async { Gateway::new(config) }) {
        Ok(gw) => gw,
        Err(e) => {
            tracing::error!("{e}");
            return exit::INVALID_CONFIG;
        }
    };
    // Stored ACME certificates are in the resolver before any listener serves.
    control.block_on(Arc::clone(&gw.acme).start());
    let tls_config = match crate::tls::server_config(Arc::clone(&gw.certs), min_tls) {
        Ok(c) => Arc::new(ArcSwap::new(c)),
        Err(e) => {
            tracing::error!(error = %e, "cannot build the TLS configuration");
            return exit::INVALID_CONFIG;
        }
    };

    // Bind everything before serving anything.
    let bind = |addr, what: &str| {
        control.block_on(async { listener::bind(addr).and_then(tokio::net::TcpListener::into_std) }).map_err(|e| {
            tracing::error!(listener = what, %addr, error = %e, "cannot bind");
        })
    };
    let http = match listen.http.map(|a| bind(a, "http")).transpose() {
        Ok(l) => l,
        Err(()) => return exit::CANNOT_BIND,
    };
    let https = match listen.https.map(|a| bind(a, "https")).transpose() {
        Ok(l) => l,
        Err(()) => return exit::CANNOT_BIND,
    };
    let admin =
        match listen.admin.map(|a| control.block_on(async { listener::bind(a) }).map_err(|e| (a, e))).transpose() {
            Ok(l) => l,
            Err((addr, e)) => {
                tracing::error!(listener = "admin", %addr, error = %e, "cannot bind");
                return exit::CANNOT_BIND;
            }
        };

    let shared = Shared {
        gw: Arc::clone(&gw),
        shutdown: CancellationToken::new(),
        tracker: TaskTracker::new(),
        permits: Arc::new(Semaphore::new(connection_limit(limits.max_connections).min(Semaphore::MAX_PERMITS))),
    };
    let mut listeners = Vec::new();
    for (l, kind, name) in [(http, Kind::Plain, "http"), (https, Kind::Tls(Arc::clone(&tls_config)), "https")] {
        if let Some(l) = l {
            tracing::info!(listener = name, addr = %l.local_addr().map_or_else(|_| "?".into(), |a| a.to_string()), "listening");
            listeners.push((l, kind));
        }
    }
    let workers = match Workers::start(threads, &listeners, &shared) {
        Ok(w) => w,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the worker threads");
            return exit::INVALID_CONFIG;
        }
    };
    drop(listeners);
    let admin_stop = CancellationToken::new();
    if let Some(l) = admin {
        tracing::info!(listener = "admin", addr = %l.local_addr().map_or_else(|_| "?".into(), |a| a.to_string()), "listening");
        let token = environment().get("SWARMGATE_ADMIN_TOKEN").cloned();
        control.spawn(crate::admin::serve(l, crate::admin::Admin { gw: Arc::clone(&gw), token }, admin_stop.clone()));
    }
    // `/readyz` says `starting` until each DNS upstream has had an answer (30 s at most);
    // the wait is logged every ten seconds.
    control.spawn({
        let gw = Arc::clone(&gw);
        let (at_most, remind) = (std::time::Duration::from_secs(30), std::time::Duration::from_secs(10));
        async move { gw.await_discovery(at_most, remind).await }
    });
    tracing::info!(version = env!("CARGO_PKG_VERSION"), workers = threads, "swarmgate is serving");

    let code = control.block_on(signals(signals_in, Arc::clone(&gw), tls_config, shared, min_tls));
    gw.acme.stop();
    admin_stop.cancel();
    workers.stop();
    control.shutdown_timeout(std::time::Duration::from_millis(100));
    code
}

/// Descriptors kept out of `max_connections`' reach: the admin listener, DNS, ACME,
/// certificate files, health checks.
const RESERVED_FDS: u64 = 64;

/// The client connections the process's descriptors allow, at most `configured`. The
/// soft limit on open files is first raised to the hard one (as nginx's and HAProxy's
/// packaging do): a container's default soft limit (1,024 in many) would cap the
/// gateway far below `max_connections`. Each client connection may need an upstream
/// connection too, so half of what is left after [`RESERVED_FDS`] goes to clients: the
/// gateway then waits at its limit (new clients stay in the backlog) instead of running
/// out of descriptors, where the admin listener, DNS and upstream connects would fail.
fn connection_limit(configured: usize) -> usize {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let Rlimit { current, maximum } = getrlimit(Resource::Nofile);
    // No hard limit: Linux still caps open files at fs.nr_open (2^20 by default).
    let wanted = maximum.unwrap_or(1 << 20);
    let soft = match current {
        Some(now) if now < wanted => match setrlimit(Resource::Nofile, Rlimit { current: Some(wanted), maximum }) {
            Ok(()) => {
                tracing::debug!(from = now, to = wanted, "open-files limit raised to the hard limit");
                wanted
            }
            Err(e) => {
                tracing::debug!(error = %e, limit = now, "open-files limit not raised");
                now
            }
        },
        Some(now) => now,
        None => return configured,
    };
    let room = usize::try_from(soft.saturating_sub(RESERVED_FDS) / 2).unwrap_or(usize::MAX).max(1);
    if room < configured {
        // A warning where the limit is low enough to matter; the default max_connections
        // is above what most hosts' limits allow.
        if room < 4096 {
            tracing::warn!(
                max_connections = configured,
                allowed = room,
                open_files_limit = soft,
                "[limits].max_connections is more than the open-files limit allows (half of it, less {RESERVED_FDS}, for clients): at most {room} client connections; raise the limit (ulimit -n, docker --ulimit nofile) for more"
            );
        } else {
            tracing::info!(
                max_connections = configured,
                allowed = room,
                open_files_limit = soft,
                "client connections capped by the open-files limit: at most {room} client connections"
            );
        }
    }
    room.min(configured)
}

/// The signals the gateway acts on.
struct Signals {
    hup: Signal,
    term: Signal,
    int: Signal,
}

/// Waits for signals: reloads on SIGHUP, drains and returns on SIGTERM/SIGINT.
async fn signals(
    signals: Signals,
    gw: Arc<Gateway>,
    tls: Arc<ArcSwap<rustls::ServerConfig>>,
    shared: Shared,
    mut min_tls: TlsVersion,
) -> u8 {
    let Signals { mut hup, mut term, mut int } = signals;
    // A stop that came while starting: no load balancer has seen this gateway ready, so
    // there is nobody to wait `shutdown_delay` for.
    let stopped_early = tokio::select! {
        biased;
        _ = term.recv() => true,
        _ = int.recv() => true,
        () = std::future::ready(()) => false,
    };
    if !stopped_early {
        loop {
            tokio::select! {
                _ = hup.recv() => {
                    let started = std::time::Instant::now();
                    match gw.reload(&environment()).await {
                        Ok(generation) => {
                            let next = gw.snapshot().config.tls.min_version;
                            if next != min_tls {
                                match crate::tls::server_config(Arc::clone(&gw.certs), next) {
                                    Ok(c) => { tls.store(c); min_tls = next; }
                                    Err(e) => tracing::error!(error = %e, "TLS settings not applied"),
                                }
                            }
                            let took_ms = started.elapsed().as_secs_f64() * 1000.0;
                            tracing::info!(generation, took_ms, "configuration reloaded");
                        }
                        Err(e) => tracing::error!("reload refused, the running configuration is kept: {e}"),
                    }
                }
                _ = term.recv() => break,
                _ = int.recv() => break,
            }
        }
    }
    let snap = gw.snapshot();
    let (delay, drain) = (snap.config.proxy.shutdown_delay, snap.config.proxy.drain_timeout);
    drop(snap);
    // Still waiting for its first DNS lookups, `/readyz` has said 503 all along: no load
    // balancer sends it anything to wait for either.
    let stopped_early = stopped_early || gw.readiness() == crate::gateway::Readiness::Starting;
    gw.set_not_ready();
    let forced = if stopped_early {
        tracing::info!("stopped before serving: shutting down without waiting shutdown_delay");
        false
    } else {
        tracing::info!(?delay, "shutting down: /readyz is 503; listeners close after shutdown_delay");
        tokio::select! {
            () = tokio::time::sleep(delay) => false,
            _ = term.recv() => true,
            _ = int.recv() => true,
        }
    };
    // Closed first: the HTTP/1.1 reader reads "shutting down" from the tracker, so a
    // response written while the token wakes every connection says `Connection: close`.
    shared.tracker.close();
    shared.shutdown.cancel();
    gw.tunnels.close();
    if !forced {
        tracing::info!(
            ?drain,
            open = shared.tracker.len() + gw.tunnels.len(),
            "listeners closed; draining connections"
        );
        let drained = async {
            shared.tracker.wait().await;
            gw.tunnels.wait().await;
        };
        tokio::select! {
            r = tokio::time::timeout(drain, drained) => if r.is_err() {
                tracing::warn!(left = shared.tracker.len() + gw.tunnels.len(), "drain_timeout reached; closing what is left");
            },
            _ = term.recv() => tracing::warn!("second signal: exiting without waiting"),
            _ = int.recv() => tracing::warn!("second signal: exiting without waiting"),
        }
    }
    tracing::info!("swarmgate stopped");
    exit::OK
}
