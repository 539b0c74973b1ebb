//! DNS discovery: `dns = "tasks.NAME:PORT"` looked up every `resolve_every`, and at once
//! when a server refuses a connection (its task may be gone); every A and AAAA record is
//! a server.
//!
//! An answer is the truth, an empty one too: NXDOMAIN or no records (a service scaled to
//! zero, a name no longer there) empties the upstream, its servers drained, rather than
//! keep addresses Swarm may soon give to another service's containers. A lookup that gets
//! no answer (a timeout, SERVFAIL, REFUSED) keeps the last known servers, so a DNS hiccup
//! never empties an upstream in the middle of a rollout; but they are unconfirmed until
//! DNS answers again, and one that fails meanwhile stays out (see `ServerSet::stale`).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hickory_resolver::ResolveError;
use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::ProtoErrorKind;
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::{Resolver, TokioResolver};
use tokio::time::Instant;

use super::set::ServerSet;
use crate::config::DnsTarget;

/// The shortest time between two lookups asked for by refused connects.
const MIN_GAP: Duration = Duration::from_millis(250);

/// How often a lookup failing on and on is logged again (each is counted).
const WARN_EVERY: Duration = Duration::from_secs(60);

/// A resolver that never answers from cache: Swarm changes `tasks.NAME` at any time.
pub(super) fn resolver(nameservers: &[SocketAddr]) -> Result<TokioResolver, String> {
    let mut opts = ResolverOpts::default();
    opts.cache_size = 0;
    opts.positive_max_ttl = Some(Duration::ZERO);
    opts.negative_max_ttl = Some(Duration::ZERO);
    opts.attempts = 2;
    opts.timeout = Duration::from_secs(2);
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

/// What one lookup of one record type came back with.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Found {
    Addresses(Vec<IpAddr>),
    /// An answer with none: NXDOMAIN, or the name with no record of the type.
    Nothing(&'static str),
    /// No answer: why.
    Failed(String),
}

impl Found {
    fn of(result: Result<Vec<IpAddr>, ResolveError>) -> Found {
        match result {
            Ok(ips) => Found::Addresses(ips),
            Err(e) => match e.proto().map(|p| p.kind()) {
                Some(ProtoErrorKind::NoRecordsFound { response_code: ResponseCode::NXDomain, .. }) => {
                    Found::Nothing("NXDOMAIN")
                }
                Some(ProtoErrorKind::NoRecordsFound { response_code: ResponseCode::NoError, .. }) => {
                    Found::Nothing("no records")
                }
                Some(ProtoErrorKind::NoRecordsFound { response_code, .. }) => {
                    Found::Failed(format!("the DNS server answered {response_code}"))
                }
                _ => Found::Failed(e.to_string()),
            },
        }
    }
}

/// The servers the A and AAAA lookups say, `Err` when they do not tell. The A answer
/// decides (Swarm's overlay networks are IPv4): an AAAA lookup that fails beside A
/// records is left out, and one that fails beside no A records leaves the set unknown.
pub(super) fn servers(v4: Found, v6: Found, port: u16) -> Result<Vec<SocketAddr>, String> {
    let ips = match (v4, v6) {
        (Found::Failed(e), _) => return Err(e),
        (Found::Addresses(mut a), Found::Addresses(b)) => {
            a.extend(b);
            a
        }
        (Found::Addresses(a), _) | (Found::Nothing(_), Found::Addresses(a)) => a,
        (Found::Nothing(_), Found::Failed(e)) => return Err(format!("AAAA: {e}")),
        (Found::Nothing(why), Found::Nothing(_)) => {
            tracing::debug!(answer = why, "DNS lists no servers");
            Vec::new()
        }
    };
    let mut addrs: Vec<SocketAddr> = ips.into_iter().map(|ip| SocketAddr::new(ip, port)).collect();
    addrs.sort();
    addrs.dedup();
    Ok(addrs)
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
    // Failed lookups in a row, and when one was last logged.
    let (mut failures, mut warned) = (0u64, None::<Instant>);
    loop {
        let started = Instant::now();
        let (v4, v6) = tokio::join!(resolver.ipv4_lookup(name.as_str()), resolver.ipv6_lookup(name.as_str()));
        let v4 = v4.map(|l| l.iter().map(|a| IpAddr::V4(a.0)).collect());
        let v6 = v6.map(|l| l.iter().map(|a| IpAddr::V6(a.0)).collect());
        match servers(Found::of(v4), Found::of(v6), target.port) {
            Ok(addrs) => {
                if failures > 0 {
                    tracing::info!(upstream = %set.name, name = %target.name, failures, "DNS answers again");
                    (failures, warned) = (0, None);
                }
                if last.as_ref() != Some(&addrs) {
                    let r = set.reconcile(&addrs);
                    if addrs.is_empty() {
                        tracing::warn!(upstream = %set.name, name = %target.name, draining = ?r.draining,
                            "DNS lists no servers (no task runs, or no such service): the upstream is empty until it lists some");
                    } else {
                        tracing::info!(upstream = %set.name, name = %target.name, added = ?r.added, draining = ?r.draining, "DNS servers changed");
                    }
                    last = Some(addrs);
                }
                set.answered();
            }
            Err(error) => {
                set.stats.resolve_errors.fetch_add(1, Ordering::Relaxed);
                set.lookup_failed();
                failures += 1;
                if warned.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
                    warned = Some(Instant::now());
                    match &last {
                        Some(kept) => {
                            tracing::warn!(upstream = %set.name, name = %target.name, %error, failures, kept = ?kept,
                            "DNS lookup failed; keeping the last known servers, and any that fails stays out until DNS answers")
                        }
                        None => tracing::warn!(upstream = %set.name, name = %target.name, %error, failures,
                            "DNS lookup failed; no servers known yet"),
                    }
                } else {
                    tracing::debug!(upstream = %set.name, name = %target.name, %error, failures, "DNS lookup failed");
                }
            }
        }
        let next = started + every;
        tokio::select! {
            () = tokio::time::sleep_until(next) => {}
            () = set.resolve_asked() => {
                tokio::time::sleep_until((started + MIN_GAP).min(next)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn an_answer_with_no_servers_empties_and_no_answer_tells_nothing() {
        let at = |last: u8| SocketAddr::new(ip(last), 80);
        let (a, none, failed) =
            (|v: &[u8]| Found::Addresses(v.iter().map(|l| ip(*l)).collect()), Found::Nothing, Found::Failed);
        assert_eq!(servers(a(&[2, 1, 2]), none("no records"), 80), Ok(vec![at(1), at(2)]));
        assert_eq!(servers(none("NXDOMAIN"), none("NXDOMAIN"), 80), Ok(vec![]));
        assert_eq!(servers(none("no records"), none("no records"), 80), Ok(vec![]));
        // The A lookup failing tells nothing, whatever AAAA says.
        assert!(servers(failed("SERVFAIL".into()), none("no records"), 80).is_err());
        assert!(servers(failed("timed out".into()), a(&[1]), 80).is_err());
        // AAAA failing beside A records is left out; beside none, nothing is known.
        assert_eq!(servers(a(&[1]), failed("REFUSED".into()), 80), Ok(vec![at(1)]));
        assert!(servers(none("no records"), failed("REFUSED".into()), 80).is_err());
    }
}
