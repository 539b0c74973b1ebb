//! Request-path and host handling: `route::{dot_segments, remove_dot_segments,
//! normalize_host, strip_port, authority_port, strip_prefix}`, `Router::lookup` against a
//! brute-force model, `config::{parse_host_pattern, parse_cidr}` and
//! `config::duration::{parse, format}`.
//!
//! Checked:
//! - no panic;
//! - a resolvable path resolves (`remove_dot_segments`) to a path with no dot-segment
//!   left, starting with `/`, that still parses as a request target;
//! - the router finds what a brute-force longest-whole-segment-prefix search finds
//!   (exact host, then one-label wildcard, then `*`);
//! - a host pattern the config accepts is what `normalize_host` makes of a client's
//!   Host for that host (so the route can be reached);
//! - `duration::parse(duration::format(d)) == d`; what `parse` accepts is at most a year.
#![no_main]

use std::time::Duration;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use swarmgate::config::{self, HostPattern};
use swarmgate::route::{self, DotSegments, Router};

#[derive(Arbitrary, Debug)]
struct Input {
    path: String,
    authority: String,
    routes: Vec<(u8, Vec<u8>)>,
    lookups: Vec<(u8, Vec<u8>)>,
    pattern: String,
    duration: String,
    millis: u64,
}

const HOSTS: [&str; 4] = ["a.example", "b.a.example", "example", "x.example"];

/// A path of segments from a small alphabet (collisions are the point).
fn path_of(bytes: &[u8]) -> String {
    let mut p = String::new();
    for &b in bytes {
        p.push_str(match b % 8 {
            0 => "/",
            1 => "a",
            2 => "b",
            3 => "/a",
            4 => "/b",
            5 => "c",
            6 => "%2F",
            _ => ".",
        });
    }
    p
}

fn pattern_of(sel: u8) -> HostPattern {
    match sel % 6 {
        0 => HostPattern::Any,
        1 => HostPattern::Exact("a.example".into()),
        2 => HostPattern::Exact("b.a.example".into()),
        3 => HostPattern::Wildcard("example".into()),
        4 => HostPattern::Wildcard("a.example".into()),
        _ => HostPattern::Exact("example".into()),
    }
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    prefix == "/" || path == prefix || path.strip_prefix(prefix).is_some_and(|r| r.starts_with('/'))
}

/// One tier of the route lookup: which host patterns it takes.
type HostTest<'a> = Box<dyn Fn(&HostPattern) -> bool + 'a>;

fn model(routes: &[(HostPattern, String, usize)], host: &str, path: &str) -> Option<usize> {
    let path = if path.is_empty() { "/" } else { path };
    let tiers: [HostTest<'_>; 3] = [
        Box::new(|p| matches!(p, HostPattern::Exact(h) if h == host)),
        Box::new(
            |p| matches!(p, HostPattern::Wildcard(s) if host.split_once('.').is_some_and(|(_, parent)| parent == s)),
        ),
        Box::new(|p| matches!(p, HostPattern::Any)),
    ];
    for tier in tiers {
        // The last of duplicates wins, as in the router.
        let best = routes.iter().filter(|(p, prefix, _)| tier(p) && prefix_matches(prefix, path)).fold(
            None::<&(HostPattern, String, usize)>,
            |best, r| match best {
                Some(b) if b.1.len() > r.1.len() => Some(b),
                _ => Some(r),
            },
        );
        if let Some((_, _, id)) = best {
            return Some(*id);
        }
    }
    None
}

fuzz_target!(|input: Input| {
    // Dot-segments, on paths a request can carry.
    let path = &input.path;
    if let Ok(pq) = http::uri::PathAndQuery::try_from(path.as_str())
        && pq.query().is_none()
        && pq.path() == path
    {
        match route::dot_segments(path) {
            DotSegments::Resolvable => {
                let r = route::remove_dot_segments(path);
                assert!(r.starts_with('/'), "{path:?} resolved to {r:?}");
                assert_eq!(route::dot_segments(&r), DotSegments::None, "{path:?} resolved to {r:?}");
                assert!(http::uri::PathAndQuery::try_from(r.as_str()).is_ok(), "{r:?} no longer parses");
            }
            DotSegments::None => {
                assert!(
                    !path.split('/').any(route::is_dot_segment) || !path.starts_with('/'),
                    "dot-segment in {path:?} not seen"
                );
            }
            DotSegments::Ambiguous => {}
        }
    }
    let _ = route::strip_prefix(path, "/a");

    // Hosts.
    let a = &input.authority;
    let _ = route::normalize_host(a);
    let host = route::strip_port(a);
    if let Some(port) = route::authority_port(a) {
        let rest = &a[host.len()..];
        assert!(
            rest.starts_with(':') && rest[1..].bytes().all(|b| b.is_ascii_digit()),
            "{a:?}: port {port} from {rest:?}"
        );
    }
    if let Ok(pattern) = config::parse_host_pattern(&input.pattern) {
        match &pattern {
            HostPattern::Exact(h) => {
                let sent = if h.contains(':') { format!("[{h}]") } else { h.clone() };
                assert_eq!(
                    route::normalize_host(&sent),
                    h.as_str(),
                    "route host {h:?} (from {:?}) unreachable",
                    input.pattern
                );
                assert_eq!(route::normalize_host(&format!("{sent}:8443")), h.as_str());
            }
            HostPattern::Wildcard(s) => {
                let sent = format!("x.{s}");
                assert_eq!(route::normalize_host(&sent), sent.as_str(), "wildcard {s:?} unreachable");
            }
            HostPattern::Any => {}
        }
    }
    let _ = config::parse_cidr(&input.pattern);

    // Durations.
    if let Ok(d) = config::duration::parse(&input.duration) {
        assert!(d <= config::duration::MAX);
        assert_eq!(config::duration::parse(&config::duration::format(d)), Ok(d));
    }
    let d = Duration::from_millis(input.millis % (config::duration::MAX.as_millis() as u64 + 1));
    assert_eq!(config::duration::parse(&config::duration::format(d)), Ok(d), "{:?}", config::duration::format(d));

    // The router against the model.
    let mut router = Router::default();
    let mut routes = Vec::new();
    for (i, (sel, segs)) in input.routes.iter().take(16).enumerate() {
        let p = path_of(segs);
        // Prefixes as the config makes them: from `/`, no trailing `/` but `/` itself.
        let p = format!("/{}", p.trim_start_matches('/').trim_end_matches('/'));
        let pattern = pattern_of(*sel);
        router.insert(&pattern, &p, i);
        routes.retain(|(q, r, _): &(HostPattern, String, usize)| !(q == &pattern && r == &p));
        routes.push((pattern, p, i));
    }
    for (sel, segs) in input.lookups.iter().take(16) {
        let host = HOSTS[usize::from(*sel) % HOSTS.len()];
        let p = path_of(segs);
        assert_eq!(router.lookup(host, &p).copied(), model(&routes, host, &p), "{host} {p:?} in {routes:?}");
    }
});
