//! Logs: `tracing` to stderr, filtered by `SWARMGATE_LOG` (an `EnvFilter` string, default
//! `info`), as text or, with `SWARMGATE_LOG_FORMAT=json`, one JSON object per line.
//! Access-log lines are `info` events with target `swarmgate::access`
//! (`SWARMGATE_LOG=info,swarmgate::access=off` turns them off).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing_subscriber::EnvFilter;

pub fn init(env: &BTreeMap<String, String>) {
    let spec = env.get("SWARMGATE_LOG").map_or("info", String::as_str);
    let (mut filter, bad) = match EnvFilter::try_new(spec) {
        Ok(f) => (f, None),
        Err(e) => (EnvFilter::new("info"), Some(e)),
    };
    // rustls warns of what a client sends (an IP address as SNI, say) on every handshake
    // that has it: a line per connection a client can set off. The gateway logs failed
    // handshakes itself (at debug); `SWARMGATE_LOG` naming rustls overrides this.
    if !spec.contains("rustls") {
        if let Ok(quiet) = "rustls=error".parse() {
            filter = filter.add_directive(quiet);
        }
    }
    let json = env.get("SWARMGATE_LOG_FORMAT").is_some_and(|f| f.eq_ignore_ascii_case("json"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // A log line that cannot be written (stderr a closed pipe) is lost, and that is
        // all: reporting it would write to stderr too, and `eprintln!` panics there.
        .log_internal_errors(false)
        .with_target(true)
        .with_ansi(ansi);
    let result = if json { builder.json().flatten_event(true).try_init() } else { builder.try_init() };
    if result.is_err() {
        return; // a subscriber is already installed (tests)
    }
    if let Some(e) = bad {
        tracing::warn!(SWARMGATE_LOG = spec, error = %e, "invalid SWARMGATE_LOG; using \"info\"");
    }
    if let Some(f) =
        env.get("SWARMGATE_LOG_FORMAT").filter(|f| !f.eq_ignore_ascii_case("json") && !f.eq_ignore_ascii_case("text"))
    {
        tracing::warn!(SWARMGATE_LOG_FORMAT = %f, "unknown log format; using text (\"json\" or \"text\")");
    }
}

/// Lets a warning through at most once per period; the caller logs the rest at debug.
/// For what a client or a failing server can set off on every request: a line per
/// request would flood the log (and cost more than the request), and the metrics count
/// every one anyway.
#[derive(Debug, Default)]
pub struct Throttle {
    /// Unix second of the last warning let through.
    last: AtomicU64,
}

impl Throttle {
    pub const fn new() -> Self {
        Throttle { last: AtomicU64::new(0) }
    }

    /// Whether a warning may be logged now, at most one per `period_secs` seconds (and
    /// at once after the clock was set back).
    pub fn allow(&self, period_secs: u64) -> bool {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let last = self.last.load(Ordering::Relaxed);
        (now < last || now >= last.saturating_add(period_secs))
            && self.last.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_throttle_lets_one_warning_through_per_period() {
        let t = Throttle::new();
        assert!(t.allow(60), "the first is let through");
        assert!(!t.allow(60), "the second within the period is not");
        assert!(!t.allow(60));
        // A period of 0 lets every one through.
        assert!(t.allow(0) && t.allow(0));
        // A clock set back does not silence warnings until it catches up.
        t.last.store(u64::MAX, Ordering::Relaxed);
        assert!(t.allow(60));
    }
}
