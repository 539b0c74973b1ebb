//! The one value a reload swaps: routes, upstreams and proxy settings of one config.
//!
//! A request loads `Arc<Snapshot>` once and keeps it to its end, so it can never see half
//! an old and half a new configuration.

use std::sync::Arc;

use hyper::header::HeaderValue;
use ipnet::IpNet;

use crate::config::{Config, HostPattern, Limits};
use crate::metrics::RouteStats;
use crate::route::Router;
use crate::upstream::Upstream;

#[derive(Debug)]
pub struct Route {
    /// `host/path` as written (`*.example.org/fhir`): the route's label in metrics. Kept
    /// across reloads with the route's counters, so an unchanged route costs no copy.
    label: Arc<str>,
    /// Where the path prefix starts in `label`.
    prefix_at: usize,
    pub strip_path: bool,
    pub upstream: Arc<Upstream>,
    pub stats: Arc<RouteStats>,
    /// `X-Forwarded-Prefix` value when `strip_path` is set.
    pub prefix_header: Option<HeaderValue>,
}

impl Route {
    /// `label` must be what [`Route::write_label`] wrote for the route's host and `prefix`.
    pub fn new(
        label: Arc<str>,
        prefix: &str,
        strip_path: bool,
        upstream: Arc<Upstream>,
        stats: Arc<RouteStats>,
    ) -> Route {
        let prefix_header = (strip_path && prefix != "/").then(|| HeaderValue::from_str(prefix).ok()).flatten();
        assert!(label.ends_with(prefix), "route label {label:?} does not end with its prefix {prefix:?}");
        let prefix_at = label.len() - prefix.len();
        Route { label, prefix_at, strip_path, upstream, stats, prefix_header }
    }

    /// Writes `host/path` into `out` (cleared first): built by hand into a reused buffer,
    /// since a reload makes one per route.
    pub fn write_label(out: &mut String, host: &HostPattern, prefix: &str) {
        let (star, name) = host.parts();
        out.clear();
        out.push_str(star);
        out.push_str(name);
        out.push_str(prefix);
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    /// The path prefix the route matches (normalised: `/` or no trailing `/`).
    pub fn prefix(&self) -> &str {
        &self.label[self.prefix_at..]
    }
}

/// Settings the request path needs, typed.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    pub trusted_proxies: Vec<IpNet>,
    pub redirect_https: bool,
    /// Port of the HTTPS listener, when there is one (for redirects).
    pub https_port: Option<u16>,
    pub limits: Limits,
    /// Whether `/.well-known/acme-challenge/` is answered by the gateway.
    pub acme_http01: bool,
    /// An HTTP/2 stream that nothing moves for this long is reset: `idle_timeout`, or a
    /// second past the longest `response_timeout` when that is longer (a server may take
    /// that long to answer).
    pub stream_stall: std::time::Duration,
}

impl ProxySettings {
    pub fn is_trusted(&self, ip: std::net::IpAddr) -> bool {
        !self.trusted_proxies.is_empty() && {
            let ip = ip.to_canonical();
            self.trusted_proxies.iter().any(|net| net.contains(&ip))
        }
    }
}

#[derive(Debug)]
pub struct Snapshot {
    pub router: Router<Arc<Route>>,
    pub upstreams: crate::FastMap<String, Arc<Upstream>>,
    pub routes: Vec<Arc<Route>>,
    pub proxy: ProxySettings,
    pub config: Arc<Config>,
    /// Counts reloads; 0 for the configuration the process started with.
    pub generation: u64,
}
