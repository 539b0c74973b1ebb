//! Counters and histograms, kept as plain atomics where the hot path touches them and
//! rendered to Prometheus text only when scraped.
//!
//! A route's statistics are looked up once when the snapshot is built (by route key, so
//! they survive reloads) and carried by the route: a request touches a few relaxed
//! atomics, never a map or a lock.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (seconds) of the request duration histogram.
pub const BUCKETS: [f64; 14] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

#[derive(Debug, Default)]
pub struct Histogram {
    /// Per-bucket (not cumulative) counts; the last one is +Inf.
    buckets: [AtomicU64; BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = BUCKETS.iter().position(|&b| secs <= b).unwrap_or(BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// Appends `NAME_bucket`, `NAME_sum` and `NAME_count` lines with `labels`.
    pub fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (i, bound) in BUCKETS.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {cumulative}");
        }
        cumulative += self.buckets[BUCKETS.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {cumulative}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {cumulative}");
    }
}

/// The status codes counted one by one (the rest count by class): what a service answers
/// most, and the gateway's own answers, so that a rollout's 502, 503 and 504 are told apart.
pub const CODES: [u16; 29] = [
    200, 201, 202, 204, 206, 301, 302, 304, 307, 308, 400, 401, 403, 404, 405, 408, 409, 413, 414, 421, 429, 431, 499,
    500, 501, 502, 503, 504, 505,
];
/// The status classes, in the order of [`RouteStats::class_counts`].
pub const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Where a status is counted: its place in [`CODES`], else after them, by class.
fn slot(status: u16) -> usize {
    match CODES.binary_search(&status) {
        Ok(i) => i,
        Err(_) => CODES.len() + (status / 100).clamp(1, 5) as usize - 1,
    }
}

/// The class (index into [`CLASSES`]) of the counter at `slot`.
fn class_of(slot: usize) -> usize {
    match CODES.get(slot) {
        Some(code) => (code / 100) as usize - 1,
        None => slot - CODES.len(),
    }
}

/// Requests of one route (or of no route) by status, and their durations.
#[derive(Debug)]
pub struct RouteStats {
    /// One counter per code of [`CODES`], then one per class for the other codes.
    statuses: [AtomicU64; CODES.len() + 5],
    pub duration: Histogram,
}

impl Default for RouteStats {
    fn default() -> Self {
        RouteStats { statuses: std::array::from_fn(|_| AtomicU64::new(0)), duration: Histogram::default() }
    }
}

impl RouteStats {
    pub fn record(&self, status: u16, took: Duration) {
        self.statuses[slot(status)].fetch_add(1, Ordering::Relaxed);
        self.duration.observe(took);
    }

    /// Requests by class (`1xx` to `5xx`).
    pub fn class_counts(&self) -> [u64; 5] {
        let mut out = [0; 5];
        for (i, n) in self.statuses.iter().enumerate() {
            out[class_of(i)] += n.load(Ordering::Relaxed);
        }
        out
    }

    /// Requests by status that have been seen: `("404", n)`, or `("4xx", n)` for the codes
    /// not counted one by one.
    pub fn status_counts(&self) -> impl Iterator<Item = (std::borrow::Cow<'static, str>, u64)> + '_ {
        self.statuses.iter().enumerate().filter_map(|(i, n)| {
            let n = n.load(Ordering::Relaxed);
            let label = match CODES.get(i) {
                Some(code) => std::borrow::Cow::Owned(code.to_string()),
                None => std::borrow::Cow::Borrowed(CLASSES[class_of(i)]),
            };
            (n > 0).then_some((label, n))
        })
    }
}

/// Process-wide counters.
#[derive(Debug, Default)]
pub struct Metrics {
    pub open_connections: AtomicI64,
    pub connections_total: AtomicU64,
    pub tls_handshakes: AtomicU64,
    pub tls_handshake_errors: AtomicU64,
    /// Idle HTTP/1.1 connections whose session was ended to free its buffers.
    pub connections_parked: AtomicU64,
    pub reloads_ok: AtomicU64,
    pub reloads_failed: AtomicU64,
    /// Requests answered before a route was known (400, 404, 421, redirects...).
    pub unrouted: RouteStats,
    pub retries: AtomicU64,
    pub upgrades: AtomicU64,
    /// HTTP/2 connections ended for cancelling most of their requests (rapid reset).
    pub h2_reset_floods: AtomicU64,
    /// HTTP/1.1 connections closed because a request head did not arrive whole within
    /// `header_read_timeout` (a slowloris, or a client stalled mid-head).
    pub slow_heads: AtomicU64,
    /// Accepted clients that found the connections at their limit and waited.
    pub connection_limit_waits: AtomicU64,
}

/// Escapes a label value (Prometheus text format: backslash, quote, newline).
pub fn label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Writes `# HELP` and `# TYPE` for a family.
pub fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_counted_by_code_and_by_class() {
        assert!(CODES.windows(2).all(|w| w[0] < w[1]), "sorted, for the binary search");
        let r = RouteStats::default();
        for status in [200, 200, 204, 418, 502, 503, 503, 599, 101, 0, 999] {
            r.record(status, Duration::ZERO);
        }
        assert_eq!(r.class_counts(), [2, 3, 0, 1, 5]);
        let seen: Vec<(String, u64)> = r.status_counts().map(|(l, n)| (l.into_owned(), n)).collect();
        let want = [("200", 2), ("204", 1), ("502", 1), ("503", 2), ("1xx", 2), ("4xx", 1), ("5xx", 2)];
        assert_eq!(seen, want.map(|(l, n)| (l.to_string(), n)));
    }

    #[test]
    fn histogram_is_cumulative() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(300));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60));
        let mut out = String::new();
        h.render(&mut out, "x", "a=\"b\"");
        assert!(out.contains("x_bucket{a=\"b\",le=\"0.0005\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{a=\"b\",le=\"0.005\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{a=\"b\",le=\"10\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{a=\"b\",le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_count{a=\"b\"} 3\n"), "{out}");
    }
}
