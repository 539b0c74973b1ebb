//! Logs: `tracing` to stderr, filtered by `SWARMGATE_LOG` (an `EnvFilter` string, default
//! `info`), as text or, with `SWARMGATE_LOG_FORMAT=json`, one JSON object per line.
//! Access-log lines are `info` events with target `swarmgate::access`
//! (`SWARMGATE_LOG=info,swarmgate::access=off` turns them off).

use std::collections::BTreeMap;

use tracing_subscriber::EnvFilter;

pub fn init(env: &BTreeMap<String, String>) {
    let spec = env.get("SWARMGATE_LOG").map_or("info", String::as_str);
    let (filter, bad) = match EnvFilter::try_new(spec) {
        Ok(f) => (f, None),
        Err(e) => (EnvFilter::new("info"), Some(e)),
    };
    let json = env.get("SWARMGATE_LOG_FORMAT").is_some_and(|f| f.eq_ignore_ascii_case("json"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
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
