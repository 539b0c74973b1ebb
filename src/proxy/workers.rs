//! Traffic workers: one single-threaded tokio runtime per thread (thread per core), each
//! accepting from the same listening sockets.
//!
//! A connection lives and dies on the worker that accepted it, together with the upstream
//! connections it opens, so a request is served without any cross-thread wake-up; the
//! upstream pools are sharded per worker for the same reason. The kernel hands each new
//! connection to whichever worker accepts first. Listeners are bound once (no
//! SO_REUSEPORT), so a second process cannot silently share a port.

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::client;
use super::listener::{self, Kind, Shared};
use crate::gateway::Gateway;

static COUNT: AtomicUsize = AtomicUsize::new(1);

thread_local! {
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

/// Sets how many workers will serve traffic; called once before any server (and its
/// sharded pool) is created.
pub fn set_count(n: usize) {
    COUNT.store(n.max(1), Ordering::Relaxed);
}

/// How many workers serve traffic (1 unless [`set_count`] said otherwise).
pub fn count() -> usize {
    COUNT.load(Ordering::Relaxed)
}

/// This thread's worker index (0 on threads that are not workers).
pub fn index() -> usize {
    INDEX.with(Cell::get)
}

/// Closes this worker's idle upstream connections that their servers closed (see
/// `client`), every [`client::SWEEP_EVERY`], for as long as the worker runs.
async fn sweep_upstream_pools(gw: Arc<Gateway>) {
    let mut tick = tokio::time::interval(client::SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let snap = gw.snapshot_guard();
        for upstream in snap.upstreams.values() {
            for server in upstream.set.all().iter() {
                server.pool.sweep();
            }
        }
    }
}

pub struct Workers {
    stop: CancellationToken,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Workers {
    /// Starts `n` workers serving `listeners` until [`Workers::stop`].
    pub fn start(n: usize, listeners: &[(std::net::TcpListener, Kind)], shared: &Shared) -> std::io::Result<Workers> {
        let stop = CancellationToken::new();
        let mut threads = Vec::with_capacity(n);
        for i in 0..n.max(1) {
            let mine =
                listeners.iter().map(|(l, k)| Ok((l.try_clone()?, k.clone()))).collect::<std::io::Result<Vec<_>>>()?;
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let (stop, shared) = (stop.clone(), shared.clone());
            let thread = std::thread::Builder::new().name(format!("swarmgate-worker-{i}")).spawn(move || {
                INDEX.with(|c| c.set(i));
                rt.block_on(async move {
                    tokio::spawn(sweep_upstream_pools(Arc::clone(&shared.gw)));
                    for (l, kind) in mine {
                        match TcpListener::from_std(l) {
                            Ok(l) => {
                                tokio::spawn(listener::serve(l, kind, shared.clone()));
                            }
                            Err(e) => tracing::error!(worker = i, error = %e, "cannot register a listener"),
                        }
                    }
                    stop.cancelled().await;
                });
            })?;
            threads.push(thread);
        }
        Ok(Workers { stop, threads })
    }

    /// Ends every worker runtime (whatever still runs on them is dropped) and joins them.
    pub fn stop(self) {
        self.stop.cancel();
        for t in self.threads {
            let _ = t.join();
        }
    }
}
