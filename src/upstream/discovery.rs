//! DNS discovery: `dns = "tasks.NAME:PORT"` re-resolved every `resolve_every`; every A and
//! AAAA record is a server. A failed or empty answer keeps the last known set (logged and
//! counted): a DNS hiccup must never empty an upstream in the middle of a rollout.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::{Resolver, TokioResolver};

use super::set::ServerSet;
use crate::config::DnsTarget;

/// A resolver that never answers from cache: Swarm changes `tasks.NAME` at any time.
pub(super) fn resolver(nameservers: &[SocketAddr]) -> Result<TokioResolver, String> {
    let mut opts = ResolverOpts::default();
    opts.cache_size = 0;
    opts.positive_max_ttl = Some(Duration::ZERO);
    opts.negative_max_ttl = Some(Duration::ZERO);
    opts.attempts = 2;
    opts.timeout = Duration::from_secs(2);
    opts.ip_strategy = hickory_resolver::config::LookupIpStrategy::Ipv4AndIpv6;
    let builder = if nameservers.is_empty() {
        Resolver::builder_tokio().map_err(|e| format!("cannot read the system resolver config: {e}"))?
    } else {
        let mut config = ResolverConfig::new();
        for ns in nameservers {
            config.add_name_server(NameServerConfig::new(*ns, Protocol::Udp));
            config.add_name_server(NameServerConfig::new(*ns, Protocol::Tcp));
        }
        Resolver::builder_with_config(config, TokioConnectionProvider::default())
    };
    Ok(builder.with_options(opts).build())
}

pub(super) async fn run(set: Arc<ServerSet>, target: DnsTarget, every: Duration, nameservers: Vec<SocketAddr>) {
    let resolver = match resolver(&nameservers) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(upstream = %set.name, error = %e, "DNS discovery cannot start");
            return;
        }
    };
    // A fully qualified name: no search-domain guessing for service names.
    let name = if target.name.ends_with('.') { target.name.clone() } else { format!("{}.", target.name) };
    let mut last: Option<Vec<SocketAddr>> = None;
    loop {
        match resolver.lookup_ip(name.as_str()).await {
            Ok(found) => {
                let mut addrs: Vec<SocketAddr> = found.iter().map(|ip| SocketAddr::new(ip, target.port)).collect();
                addrs.sort();
                addrs.dedup();
                if addrs.is_empty() {
                    set.stats.resolve_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(upstream = %set.name, name = %target.name, "DNS answer is empty; keeping the last known servers");
                } else if last.as_ref() != Some(&addrs) {
                    let r = set.reconcile(&addrs);
                    tracing::info!(upstream = %set.name, name = %target.name, added = ?r.added, draining = ?r.draining, "DNS servers changed");
                    last = Some(addrs);
                }
            }
            Err(e) => {
                set.stats.resolve_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(upstream = %set.name, name = %target.name, error = %e, "DNS resolution failed; keeping the last known servers");
            }
        }
        set.mark_looked_up();
        tokio::time::sleep(every).await;
    }
}
