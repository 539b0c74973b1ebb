//! swarmgate: the front door of a Docker Swarm platform.
//!
//! ```text
//!  client ──TCP/TLS──▶ proxy::listener ──▶ proxy::handle ──▶ upstream server (HTTP/1.1)
//!                        │ SNI: tls::CertResolver   │ Arc<Snapshot> loaded once per request
//!                        │ ALPN h2 | http/1.1       │ route::Router  (host, longest prefix)
//!                        ▼                          │ upstream::balance (random | p2c)
//!                  acme-tls/1 answers               │ proxy::client pool per server
//!                                                   ▼
//!  control runtime: admin API, SIGHUP reload (gateway::Gateway::reload), DNS discovery,
//!  health checks; every server-set change goes through upstream::ServerSet::reconcile.
//! ```
//!
//! A request loads the snapshot once and keeps it to its end; a reload swaps the whole
//! snapshot. Server sets outlive reloads (kept by upstream name), so health, draining and
//! in-flight counts carry over.

/// A hash map with foldhash, for keys the operator wrote (routes, certificate names,
/// route labels): SipHash's DoS resistance buys nothing for them, and reloads and the
/// request path hash thousands.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

pub mod acme;
pub mod admin;
pub mod cli;
pub mod config;
pub mod fsutil;
pub mod gateway;
pub mod lifecycle;
pub mod metrics;
pub mod proxy;
pub mod route;
pub mod snapshot;
pub mod telemetry;
pub mod tls;
pub mod upstream;

/// Installs swarmgate's TLS crypto provider ([`tls::provider`]) as rustls's process-wide
/// one, for the clients that take it from there (Redis over TLS); idempotent.
pub fn install_crypto_provider() {
    let _ = tls::provider().install_default();
}
