//! The one value a reload swaps: routes, upstreams and proxy settings of one config.
//!
//! A request loads `Arc<Snapshot>` once and keeps it to its end, so it can never see half
//! an old and half a new configuration.

use std::collections::HashMap;
use std::sync::Arc;

use hyper::header::HeaderValue;
use ipnet::IpNet;

use crate::config::{Config, HostPattern, Limits};
use crate::metrics::RouteStats;
use crate::route::Router;
use crate::upstream::Upstream;

#[derive(Debug)]
pub struct Route {
    pub host: HostPattern,
    pub prefix: String,
    pub strip_path: bool,
    pub upstream: Arc<Upstream>,
    pub stats: Arc<RouteStats>,
    /// `X-Forwarded-Prefix` value when `strip_path` is set.
    pub prefix_header: Option<HeaderValue>,
}

impl Route {
    /// `host/path`, the route's label in metrics and logs.
    pub fn key(host: &HostPattern, prefix: &str) -> String {
        // Built by hand: a reload makes one per route, and `format!` costs several times more.
        let (star, name) = host.parts();
        let mut key = String::with_capacity(star.len() + name.len() + prefix.len());
        key.push_str(star);
        key.push_str(name);
        key.push_str(prefix);
        key
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
    pub upstreams: HashMap<String, Arc<Upstream>>,
    pub routes: Vec<Arc<Route>>,
    pub proxy: ProxySettings,
    pub config: Arc<Config>,
    /// Counts reloads; 0 for the configuration the process started with.
    pub generation: u64,
}
