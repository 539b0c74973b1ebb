//! Route lookup: host, then the longest whole-segment path prefix.
//!
//! Precedence: an exact host beats a one-label wildcard (`*.example.org`), which beats
//! the catch-all `*`; within a host the longest prefix wins. Prefixes match whole path
//! segments: `/fhir` matches `/fhir`, `/fhir/` and `/fhir/x`, never `/fhirx`. Duplicate
//! (host, prefix) pairs are refused by the config, so no tie can reach this module.
//!
//! Cost: one hash lookup per host candidate plus one per path segment of the request,
//! whatever the number of routes, so 10,000 routes cost what 10 do.

/// foldhash: route lookup hashes the host and one candidate per path segment on every
/// request.
use crate::FastMap as HashMap;
use std::sync::Arc;

use crate::config::HostPattern;

/// A host's routes, by normalised prefix.
#[derive(Debug)]
struct HostRoutes<R> {
    by_prefix: HashMap<Box<str>, R>,
    /// Longest prefix length present: a path walk can skip longer candidates.
    longest: usize,
}

impl<R> Default for HostRoutes<R> {
    fn default() -> Self {
        HostRoutes { by_prefix: HashMap::default(), longest: 0 }
    }
}

impl<R> HostRoutes<R> {
    fn insert(&mut self, prefix: &str, route: R) {
        self.longest = self.longest.max(prefix.len());
        self.by_prefix.insert(prefix.into(), route);
    }

    /// The value of the longest prefix of `path` that ends at a segment boundary.
    fn lookup(&self, path: &str) -> Option<&R> {
        // Candidates: the whole path, then every cut before a '/', longest first; cuts
        // longer than the longest prefix present are skipped. "/" is tried last.
        let mut end = path.len();
        if end > self.longest {
            match path.as_bytes()[..=self.longest].iter().rposition(|&b| b == b'/') {
                Some(i) if i > 0 => end = i,
                _ => return self.by_prefix.get("/"),
            }
        }
        loop {
            let cut = &path[..end];
            let at_boundary = end == path.len() || path.as_bytes()[end] == b'/';
            if at_boundary && !cut.is_empty() {
                if let Some(r) = self.by_prefix.get(cut) {
                    return Some(r);
                }
            }
            match cut.rfind('/') {
                Some(0) | None => break,
                Some(i) => end = i,
            }
        }
        self.by_prefix.get("/")
    }
}

/// Routes by host pattern; `R` is what a match yields (the proxy's `Arc<Route>`).
#[derive(Debug)]
pub struct Router<R> {
    exact: HashMap<Box<str>, HostRoutes<R>>,
    wildcard: HashMap<Box<str>, HostRoutes<R>>,
    any: HostRoutes<R>,
    len: usize,
}

impl<R> Default for Router<R> {
    fn default() -> Self {
        Router { exact: HashMap::default(), wildcard: HashMap::default(), any: HostRoutes::default(), len: 0 }
    }
}

impl<R> Router<R> {
    /// Adds a route; a later duplicate replaces an earlier one (the config refuses them).
    pub fn insert(&mut self, host: &HostPattern, prefix: &str, route: R) {
        // A host's first route makes its entry (one key copy per host, not per route):
        // `entry` would need an owned key for every route, and returning `get_mut`'s borrow
        // early is refused by the borrow checker, hence the second lookup.
        fn host_routes<'m, R>(map: &'m mut HashMap<Box<str>, HostRoutes<R>>, name: &str) -> &'m mut HostRoutes<R> {
            if !map.contains_key(name) {
                map.insert(name.into(), HostRoutes::default());
            }
            map.get_mut(name).unwrap_or_else(|| unreachable!("inserted above"))
        }
        let routes = match host {
            HostPattern::Exact(h) => host_routes(&mut self.exact, h),
            HostPattern::Wildcard(s) => host_routes(&mut self.wildcard, s),
            HostPattern::Any => &mut self.any,
        };
        routes.insert(prefix, route);
        self.len += 1;
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Finds the route for a normalised host (lower case, no port) and a request path.
    /// A host that has routes but none for this path falls through to wildcard and `*`
    /// routes, like a more general virtual host would.
    pub fn lookup(&self, host: &str, path: &str) -> Option<&R> {
        let path = if path.is_empty() { "/" } else { path };
        if let Some(r) = self.exact.get(host).and_then(|routes| routes.lookup(path)) {
            return Some(r);
        }
        if let Some((_, parent)) = host.split_once('.') {
            if let Some(r) = self.wildcard.get(parent).and_then(|routes| routes.lookup(path)) {
                return Some(r);
            }
        }
        self.any.lookup(path)
    }
}

/// Normalises the authority a client sent into a route host: lower case, port and
/// trailing dot removed, an IPv6 literal unbracketed and canonical (`[0::1]` -> `::1`, as
/// the config writes it). Borrows when nothing needs to change.
pub fn normalize_host(authority: &str) -> std::borrow::Cow<'_, str> {
    let host = strip_port(authority);
    // An IPv6 literal is bracketed in Host and written bare, canonical, in routes (`::1`).
    if let Some(ip) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return match ip.parse::<std::net::Ipv6Addr>() {
            Ok(ip) => std::borrow::Cow::Owned(ip.to_string()),
            Err(_) => std::borrow::Cow::Borrowed(host),
        };
    }
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(host.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(host)
    }
}

/// `example.org:8443` -> `example.org`; `[::1]:8443` -> `[::1]`.
pub fn strip_port(authority: &str) -> &str {
    if authority.starts_with('[') {
        return match authority.find(']') {
            Some(i) => &authority[..=i],
            None => authority,
        };
    }
    // Bytewise: every request asks, and `rsplit_once` takes the slow way for one byte.
    let bytes = authority.as_bytes();
    match bytes.iter().rposition(|&b| b == b':') {
        Some(colon) if bytes[colon + 1..].iter().all(u8::is_ascii_digit) => &authority[..colon],
        _ => authority,
    }
}

/// The port in an authority, if it has one: what [`strip_port`] leaves after the host.
pub fn authority_port(authority: &str) -> Option<u16> {
    // `strip_port` takes a colon off only before digits (or nothing: then no port).
    authority[strip_port(authority).len()..].strip_prefix(':')?.parse().ok()
}

/// Removes a matched route prefix from a path; the result always starts with `/`.
pub fn strip_prefix<'p>(path: &'p str, prefix: &str) -> std::borrow::Cow<'p, str> {
    if prefix == "/" {
        return std::borrow::Cow::Borrowed(path);
    }
    match path.strip_prefix(prefix) {
        Some(rest) if rest.starts_with('/') => std::borrow::Cow::Borrowed(rest),
        Some(rest) => std::borrow::Cow::Owned(format!("/{rest}")),
        None => std::borrow::Cow::Borrowed(path),
    }
}

/// What a request path's dot-segments make of it (see [`dot_segments`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DotSegments {
    None,
    /// `.` or `..` segments between `/`s (each dot perhaps `%2e`): the path names another
    /// one (RFC 3986 section 5.2.4), which [`remove_dot_segments`] gives.
    Resolvable,
    /// A dot-segment that servers read differently: after a `\`, an encoded `/` or `\`
    /// (`%2F`, `%5C`), or with parameters (`..;x`). Tomcat, IIS, nginx and others take it
    /// for `..` where others do not, so no one reading of it is safe to route by.
    Ambiguous,
}

/// Whether `path` has dot-segments, and of which kind. A server resolving them would
/// serve what a prefix route never let through (`/api/../internal`), so a resolvable
/// path is routed resolved and an ambiguous one refused. Asked of every request: one
/// pass over the bytes, looking further only where a segment begins with `.` or `%`,
/// no allocation (`split('/')` cost about 170 instructions for `/` alone).
pub fn dot_segments(path: &str) -> DotSegments {
    let bytes = path.as_bytes();
    let mut found = DotSegments::None;
    let mut i = 0;
    while i < bytes.len() {
        // Where a segment begins, and whether what ends the one before is a plain `/`.
        let Some((len, plain)) = separator(&bytes[i..]) else {
            i += 1;
            continue;
        };
        i += len;
        if !matches!(bytes.get(i), Some(b'.' | b'%')) {
            continue;
        }
        let segment = &bytes[i..];
        let end = (0..segment.len()).find(|&j| separator(&segment[j..]).is_some()).unwrap_or(segment.len());
        let (name, params) = match segment[..end].iter().position(|&b| b == b';') {
            Some(semicolon) => (&segment[..semicolon], true),
            None => (&segment[..end], false),
        };
        if dots(name).is_some() {
            let next_plain = segment.get(end).is_none_or(|&b| b == b'/');
            if !plain || params || !next_plain {
                return DotSegments::Ambiguous;
            }
            found = DotSegments::Resolvable;
        }
    }
    found
}

/// The separator `bytes` begins with, if any: its length, and whether it is a plain `/`
/// (else `\`, `%2F` or `%5C`, which some servers read as one).
fn separator(bytes: &[u8]) -> Option<(usize, bool)> {
    match bytes {
        [b'/', ..] => Some((1, true)),
        [b'\\', ..] => Some((1, false)),
        [b'%', b'2', c, ..] if c.eq_ignore_ascii_case(&b'f') => Some((3, false)),
        [b'%', b'5', c, ..] if c.eq_ignore_ascii_case(&b'c') => Some((3, false)),
        _ => None,
    }
}

/// Whether one segment of a path is `.` or `..` (each dot perhaps `%2e` or `%2E`).
pub fn is_dot_segment(segment: &str) -> bool {
    dots(segment.as_bytes()).is_some()
}

/// 1 for a `.` segment, 2 for `..` (each dot perhaps `%2e` or `%2E`), else `None`.
fn dots(segment: &[u8]) -> Option<u8> {
    let mut rest = segment;
    if !matches!(rest.first(), Some(b'.' | b'%')) {
        return None;
    }
    let mut n = 0;
    while !rest.is_empty() {
        rest = match rest {
            [b'.', tail @ ..] => tail,
            [b'%', b'2', e, tail @ ..] if e.eq_ignore_ascii_case(&b'e') => tail,
            _ => return None,
        };
        n += 1;
    }
    (n <= 2).then_some(n)
}

/// `path` with its dot-segments resolved (RFC 3986 section 5.2.4): `.` goes, `..` takes
/// the segment before it with it (none above the root), and a path ending in either ends
/// in `/`. `/a/./b` is `/a/b`, `/a/b/..` is `/a/`, `/api/%2e%2e/internal` is `/internal`.
pub fn remove_dot_segments(path: &str) -> String {
    let segments: Vec<&str> = path.strip_prefix('/').unwrap_or(path).split('/').collect();
    let mut kept: Vec<&str> = Vec::with_capacity(segments.len());
    for (i, segment) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        match dots(segment.as_bytes()) {
            None => kept.push(segment),
            Some(n) => {
                if n == 2 {
                    kept.pop();
                }
                if last {
                    kept.push("");
                }
            }
        }
    }
    format!("/{}", kept.join("/"))
}

/// A shared handle is what the proxy stores.
pub type SharedRouter<R> = Arc<Router<R>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_segments_are_found_and_resolved() {
        let cases = [
            ("/a/./b", "/a/b"),
            ("/a/b/..", "/a/"),
            ("/a/b/.", "/a/b/"),
            ("/api/../internal", "/internal"),
            ("/api/%2e%2e/internal", "/internal"),
            ("/api/.%2E/internal", "/internal"),
            ("/x/../api/y", "/api/y"),
            ("/..", "/"),
            ("/../../a", "/a"),
            ("/a/../", "/"),
            ("/a//../b", "/a/b"),
            ("/.", "/"),
        ];
        for (path, resolved) in cases {
            assert_eq!(dot_segments(path), DotSegments::Resolvable, "{path}");
            assert_eq!(remove_dot_segments(path), resolved, "{path}");
        }
        let plain = ["/", "", "*", "/a/b", "/.well-known/x", "/a/...", "/a..b/c", "/%2e%2e%2e", "/a.", "/%2ex", "/%2"];
        for path in plain.into_iter().chain(["/a;b/c", "/a\\b", "/a%2Fb", "/..x;y"]) {
            assert_eq!(dot_segments(path), DotSegments::None, "{path}");
        }
        // Read as `..` by some servers and not by others: refused, not guessed at.
        for path in [
            "/public/..;/admin",
            "/public/..;x=1/admin",
            "/public/..%2Fadmin",
            "/public/..%2fadmin",
            "/public%2F..%2Fadmin",
            "/public/..%5Cadmin",
            "/public\\..\\admin",
            "/public/..\\admin",
            "/public\\../admin",
            "/a/./b/..;/c",
            "/.;",
            "/%2e%2e%5c",
        ] {
            assert_eq!(dot_segments(path), DotSegments::Ambiguous, "{path}");
        }
    }

    fn router() -> Router<&'static str> {
        let mut r = Router::default();
        r.insert(&HostPattern::Exact("a.example.org".into()), "/", "a-root");
        r.insert(&HostPattern::Exact("a.example.org".into()), "/fhir", "a-fhir");
        r.insert(&HostPattern::Exact("a.example.org".into()), "/fhir/r4/metadata", "a-meta");
        r.insert(&HostPattern::Wildcard("example.org".into()), "/", "wild");
        r.insert(&HostPattern::Wildcard("example.org".into()), "/x", "wild-x");
        r.insert(&HostPattern::Any, "/only-any", "any");
        r
    }

    #[test]
    fn exact_host_longest_whole_segment_prefix() {
        let r = router();
        assert_eq!(r.lookup("a.example.org", "/fhir"), Some(&"a-fhir"));
        assert_eq!(r.lookup("a.example.org", "/fhir/"), Some(&"a-fhir"));
        assert_eq!(r.lookup("a.example.org", "/fhir/Patient/1"), Some(&"a-fhir"));
        assert_eq!(r.lookup("a.example.org", "/fhirx"), Some(&"a-root"));
        assert_eq!(r.lookup("a.example.org", "/fhir/r4/metadata"), Some(&"a-meta"));
        assert_eq!(r.lookup("a.example.org", "/fhir/r4/metadatax"), Some(&"a-fhir"));
        assert_eq!(r.lookup("a.example.org", ""), Some(&"a-root"));
    }

    #[test]
    fn wildcard_matches_one_label_and_any_is_last() {
        let r = router();
        assert_eq!(r.lookup("b.example.org", "/x/1"), Some(&"wild-x"));
        assert_eq!(r.lookup("b.example.org", "/y"), Some(&"wild"));
        assert_eq!(r.lookup("example.org", "/only-any"), Some(&"any"));
        assert_eq!(r.lookup("c.b.example.org", "/"), None);
        assert_eq!(r.lookup("other.org", "/only-any/z"), Some(&"any"));
        assert_eq!(r.lookup("other.org", "/"), None);
    }

    #[test]
    fn host_normalisation() {
        assert_eq!(normalize_host("Example.ORG:8443"), "example.org");
        assert_eq!(normalize_host("example.org."), "example.org");
        assert_eq!(normalize_host("[::1]:80"), "::1");
        assert_eq!(normalize_host("[2001:DB8:0::1]:443"), "2001:db8::1");
        assert_eq!(authority_port("[::1]:80"), Some(80));
        assert_eq!(authority_port("example.org"), None);
        assert_eq!(authority_port("example.org:8443"), Some(8443));
        assert_eq!(authority_port("[::1]"), None);
        assert_eq!(authority_port("[2001:db8::1]:65535"), Some(65535));
        for bad in ["[::1", "a:b:c", "host:", "host:65536", "host:+80", "host:8 0", "host:123456"] {
            assert_eq!(authority_port(bad), None, "{bad}");
        }
    }

    #[test]
    fn prefix_stripping_keeps_a_leading_slash() {
        assert_eq!(strip_prefix("/fhir/Patient", "/fhir"), "/Patient");
        assert_eq!(strip_prefix("/fhir", "/fhir"), "/");
        assert_eq!(strip_prefix("/a", "/"), "/a");
    }
}
