//! `swarmgate check` and start-up failures of `swarmgate run`: exit codes, the summary,
//! every problem at once as `FILE:LINE:COL: message`, environment overrides, certificates.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use support::*;

const VALID: &str = r#"
[listen]
http = "@HTTP@"
https = ""
admin = "@ADMIN@"

[[route]]
host = "app.test"
upstream = "app"

[[route]]
host = "*.wild.test"
path = "/api/"
strip_path = true
upstream = "api"

[upstream.app]
servers = ["127.0.0.1:9001", "127.0.0.1:9002"]

[upstream.api]
servers = ["127.0.0.1:9003"]
balance = "p2c"
"#;

#[test]
fn valid_config_exits_0_with_a_summary() {
    let b = Gateway::builder(VALID).var("X", "");
    let out = b.check();
    assert_eq!(out.code, Some(0), "stderr: {}", out.stderr);
    assert_eq!(out.stderr, "");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines[0], "config swarmgate.toml is valid");
    assert!(lines[1].starts_with("listen: http 127.0.0.1:"), "{}", lines[1]);
    assert!(lines[1].contains(", https off, admin 127.0.0.1:"), "{}", lines[1]);
    assert!(lines.contains(&"routes (2):"), "{}", out.stdout);
    assert!(lines.contains(&"  app.test/ -> app"), "{}", out.stdout);
    assert!(lines.contains(&"  *.wild.test/api -> api (strip_path)"), "{}", out.stdout);
    assert!(lines.contains(&"upstreams (2):"), "{}", out.stdout);
    assert!(lines.contains(&"  api: 1 server(s), p2c"), "{}", out.stdout);
    assert!(lines.contains(&"  app: 2 server(s), random"), "{}", out.stdout);
    assert!(lines.contains(&"static certificates: none"), "{}", out.stdout);
}

#[test]
fn environment_overrides_are_applied() {
    let https = format!("127.0.0.1:{}", free_port());
    let out =
        Gateway::builder(VALID).env("SWARMGATE_LISTEN_HTTPS", &https).env("SWARMGATE_RUNTIME_WORKERS", "1").check();
    assert_eq!(out.code, Some(0), "stderr: {}", out.stderr);
    assert!(out.stdout.contains(&format!(", https {https}, admin ")), "{}", out.stdout);
    assert!(out.stdout.lines().any(|l| l == "workers: 1"), "{}", out.stdout);
    // With HTTPS on and no certificate, check says the development one will be used.
    assert!(
        out.stdout
            .lines()
            .any(|l| l
                == "no certificate for: *.wild.test, app.test (a self-signed development certificate will be used)"),
        "{}",
        out.stdout
    );
    let out = Gateway::builder(VALID).env("SWARMGATE_RUNTIME_WORKERS", "3").check();
    assert!(out.stdout.lines().any(|l| l == "workers: 3"), "{}", out.stdout);
}

/// Line numbers below count from the first line of the string (which is empty).
const BROKEN: &str = r#"
[listen]
http = "nonsense"
https = "@HTTPS@"
admin = "@ADMIN@"
colour = "blue"

[proxy]
shutdown_delay = "5 parsecs"

[upstream.app]
servers = ["127.0.0.1:9001"]

[upstream.empty]
balance = "random"

[[route]]
host = "a.test"
upstream = "app"

[[route]]
host = "a.test"
upstream = "app"

[[route]]
host = "b.test"
upstream = "ghost"
"#;

#[test]
fn invalid_config_reports_every_problem_with_its_place() {
    let out = Gateway::builder(BROKEN)
        .env("SWARMGATE_BOGUS_THING", "1")
        .env("SWARMGATE_PROXY_DRAIN_TIMEOUT", "forever")
        .check();
    assert_eq!(out.code, Some(1), "stdout: {}\nstderr: {}", out.stdout, out.stderr);
    assert_eq!(out.stdout, "");
    let lines: Vec<&str> = out.stderr.lines().collect();
    let expected = [
        r#"swarmgate.toml:3:8: [listen].http: "nonsense" is not an IP:PORT address (use [::]:443 for IPv6, "" to turn the listener off)"#,
        r#"swarmgate.toml:6:1: unknown key "colour" in [listen]"#,
        r#"swarmgate.toml:9:18: [proxy].shutdown_delay: invalid duration "5 parsecs": 5 needs a unit (ms, s, m, h, d)"#,
        r#"swarmgate.toml:14:1: [upstream.empty]: needs servers = ["IP:PORT", ...] or dns = "NAME:PORT""#,
        r#"swarmgate.toml:21:1: duplicate route for host "a.test" path "/" (first at swarmgate.toml:17:1)"#,
        r#"swarmgate.toml:27:12: [[route]] #3: unknown upstream "ghost" (declared: app, empty)"#,
        r#"env SWARMGATE_PROXY_DRAIN_TIMEOUT: [proxy].drain_timeout: invalid duration "forever": expected a number at "forever""#,
        r#"env SWARMGATE_BOGUS_THING: not a swarmgate setting (SWARMGATE_<SECTION>_<KEY> of a key that exists)"#,
        "8 problem(s) in swarmgate.toml",
    ];
    for e in &expected {
        assert!(lines.contains(e), "missing {e:?} in:\n{}", out.stderr);
    }
    assert_eq!(lines.len(), expected.len(), "unexpected lines in:\n{}", out.stderr);
}

#[test]
fn toml_syntax_error_has_a_place() {
    let out = Gateway::builder("[listen]\nhttp = \"@HTTP@\"\nadmin = \n").check();
    assert_eq!(out.code, Some(1));
    let first = out.stderr.lines().next().unwrap();
    assert!(first.starts_with("swarmgate.toml:3:"), "{}", out.stderr);
}

#[test]
fn certificate_problems_are_reported() {
    let pki = Pki::new();
    let (a_crt, _a_key) = pki.leaf(&["a.test"]);
    let (_b_crt, b_key) = pki.leaf(&["b.test"]);
    let (ok_crt, ok_key) = pki.leaf(&["ok.test"]);
    let out = Gateway::builder(VALID)
        .file("certs/broken.crt", "this is not PEM\n")
        .file("certs/broken.key", "neither is this\n")
        .file("certs/mismatch.crt", a_crt)
        .file("certs/mismatch.key", b_key)
        .file("certs/nokey.crt", ok_crt.clone())
        .file("certs/ok.crt", ok_crt)
        .file("certs/ok.key", ok_key)
        .check();
    assert_eq!(out.code, Some(1), "stdout: {}\nstderr: {}", out.stdout, out.stderr);
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 4, "{}", out.stderr);
    assert_eq!(lines[0], "certs/broken.crt: no certificate in the file (key certs/broken.key)");
    assert_eq!(
        lines[1],
        "certs/mismatch.crt: the private key does not belong to the certificate (key certs/mismatch.key)"
    );
    assert!(lines[2].starts_with("certs/nokey.crt: cannot read its key certs/nokey.key: "), "{}", lines[2]);
    assert_eq!(lines[3], "3 problem(s) with certificates in certs");

    // The good pair alone passes and is listed.
    let (ok_crt, ok_key) = pki.leaf(&["ok.test", "*.ok.test"]);
    let out = Gateway::builder(VALID).file("certs/ok.crt", ok_crt).file("certs/ok.key", ok_key).check();
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(out.stdout.lines().any(|l| l == "static certificates: ok.test,*.ok.test"), "{}", out.stdout);
}

#[tokio::test]
async fn run_with_an_invalid_config_exits_1() {
    let (code, logs) = Gateway::builder(BROKEN).run_to_exit(Duration::from_secs(10)).await;
    assert_eq!(code, Some(1), "{logs}");
    assert!(logs.contains(r#"swarmgate.toml:27:12: [[route]] #3: unknown upstream "ghost""#), "{logs}");
}

#[tokio::test]
async fn run_with_a_taken_port_exits_2() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (code, logs) = Gateway::builder(
        r#"
[listen]
http = "@TAKEN@"
https = ""
admin = "@ADMIN@"
[[route]]
host = "*"
upstream = "app"
[upstream.app]
servers = ["127.0.0.1:9"]
"#,
    )
    .var("TAKEN", taken.local_addr().unwrap())
    .run_to_exit(Duration::from_secs(10))
    .await;
    assert_eq!(code, Some(2), "{logs}");
    assert!(logs.contains("cannot bind"), "{logs}");
}

#[tokio::test]
async fn run_applies_environment_overrides() {
    let port = free_port();
    let b = Backend::start("app").await;
    let gw = Gateway::builder(
        r#"
[listen]
http = "@HTTP@"
https = ""
admin = "@ADMIN@"
[[route]]
host = "*"
upstream = "app"
[upstream.app]
servers = ["@B@"]
"#,
    )
    .var("B", b.addr)
    .env("SWARMGATE_LISTEN_HTTP", &format!("127.0.0.1:{port}"))
    .start()
    .await;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let r = get(addr, "x.test", "/").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "app");
    // The file's address is not listened on.
    assert!(tokio::net::TcpStream::connect(gw.http).await.is_err());
}

#[test]
fn version_and_help() {
    let out = Gateway::builder("").exec(&["--version"]);
    assert_eq!(out.code, Some(0));
    assert_eq!(out.stdout, format!("swarmgate {}\n", env!("CARGO_PKG_VERSION")));
    let out = Gateway::builder("").exec(&["--help"]);
    assert_eq!(out.code, Some(0));
    for word in ["run", "check", "--config"] {
        assert!(out.stdout.contains(word), "--help does not mention {word}:\n{}", out.stdout);
    }
}

#[test]
fn config_path_from_the_environment_and_the_default() {
    let out = Gateway::builder(VALID).env("SWARMGATE_CONFIG", CONFIG_FILE).exec(&["check"]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(out.stdout.starts_with("config swarmgate.toml is valid\n"), "{}", out.stdout);
    // Without either, config/swarmgate.toml (absent here).
    let out = Gateway::builder(VALID).exec(&["check"]);
    assert_eq!(out.code, Some(1));
    let first = out.stderr.lines().next().unwrap();
    assert!(first.starts_with("config/swarmgate.toml: cannot read config: "), "{}", out.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line() {
    let b = Backend::start("app").await;
    let gw = Gateway::builder(
        r#"
[listen]
http = "@HTTP@"
https = ""
admin = "@ADMIN@"
[[route]]
host = "*"
upstream = "app"
[upstream.app]
servers = ["@B@"]
"#,
    )
    .var("B", b.addr)
    .env("SWARMGATE_LOG", "info")
    .env("SWARMGATE_LOG_FORMAT", "json")
    .start()
    .await;
    assert_eq!(get(gw.http, "app.test", "/logged?x=1").await.status, 200);
    let access = async {
        for _ in 0..100 {
            if let Some(line) = gw.logs().lines().find(|l| l.contains("swarmgate::access")) {
                return line.to_string();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("no access log line:\n{}", gw.logs());
    }
    .await;
    let logs = gw.logs();
    for line in logs.lines().filter(|l| !l.is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["level"].is_string() && v["timestamp"].is_string(), "{line}");
    }
    assert!(logs.lines().any(|l| l.contains("\"message\":\"swarmgate is serving\"")), "{logs}");
    let v: serde_json::Value = serde_json::from_str(&access).unwrap();
    assert_eq!(v["target"], "swarmgate::access");
    assert_eq!(v["method"], "GET");
    assert_eq!(v["path"], "/logged");
    assert_eq!(v["host"], "app.test");
    assert_eq!(v["status"], 200);
    assert_eq!(v["upstream"], b.addr.to_string());
    assert_eq!(v["complete"], true);
    assert_eq!(v["request_id"].as_str().map(str::len), Some(32));
}

#[test]
fn nested_keys_have_environment_forms() {
    let config = r#"
[listen]
http = "@HTTP@"
https = ""
admin = "@ADMIN@"

[[route]]
host = "app.test"
upstream = "my-app"

[upstream.my-app]
servers = ["127.0.0.1:9001"]
health = { path = "/health", interval = "2s" }
"#;
    let out = Gateway::builder(config)
        .env("SWARMGATE_UPSTREAM_MY_APP_SERVERS", "127.0.0.1:9001, 127.0.0.1:9002,127.0.0.1:9003")
        .env("SWARMGATE_UPSTREAM_MY_APP_BALANCE", "p2c")
        .env("SWARMGATE_UPSTREAM_MY_APP_HEALTH_PATH", "/ready")
        .env("SWARMGATE_PROXY_SHUTDOWN_DELAY", "100ms")
        .check();
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(out.stdout.lines().any(|l| l == "  my-app: 3 server(s), p2c, health checked"), "{}", out.stdout);

    // Bad values from the environment are reported against the variable.
    let out = Gateway::builder(config)
        .env("SWARMGATE_UPSTREAM_MY_APP_SERVERS", "127.0.0.1:9001,nonsense")
        .env("SWARMGATE_UPSTREAM_MY_APP_HEALTH_PATH", "ready")
        .env("SWARMGATE_UPSTREAM_GHOST_SERVERS", "127.0.0.1:1")
        .check();
    assert_eq!(out.code, Some(1));
    let lines: Vec<&str> = out.stderr.lines().collect();
    let expected = [
        r#"env SWARMGATE_UPSTREAM_MY_APP_SERVERS: [upstream.my-app].servers: "nonsense" is not an IP:PORT address"#,
        r#"env SWARMGATE_UPSTREAM_MY_APP_HEALTH_PATH: [upstream.my-app].health.path must start with /"#,
        r#"env SWARMGATE_UPSTREAM_GHOST_SERVERS: no upstream "ghost" in the config file: SWARMGATE_UPSTREAM_<NAME>_<KEY> sets a key of an upstream the file declares"#,
        "3 problem(s) in swarmgate.toml",
    ];
    assert_eq!(lines, expected, "{}", out.stderr);
}

#[test]
fn both_traffic_listeners_off_is_a_problem() {
    let out = Gateway::builder("\n[listen]\nhttp = \"\"\nhttps = \"off\"\nadmin = \"@ADMIN@\"\n").check();
    assert_eq!(out.code, Some(1));
    let first = out.stderr.lines().next().unwrap();
    // At the value that turned the last one off.
    assert!(first.starts_with("swarmgate.toml:3:8:"), "{}", out.stderr);
    assert!(first.ends_with(": [listen]: at least one of http and https must be set"), "{}", out.stderr);
    // Turned off by the environment: the variable is at fault.
    let out =
        Gateway::builder("\n[listen]\nhttps = \"off\"\nadmin = \"@ADMIN@\"\n").env("SWARMGATE_LISTEN_HTTP", "").check();
    assert_eq!(out.code, Some(1));
    assert_eq!(
        out.stderr.lines().next(),
        Some("env SWARMGATE_LISTEN_HTTP: [listen]: at least one of http and https must be set"),
        "{}",
        out.stderr
    );
}

#[test]
fn acme_storage_settings_are_checked_without_echoing_secrets() {
    let acme = format!("{VALID}\n[acme]\nstorage = \"redis://:file-secret@127.0.0.1:6379/0\"\n");
    let acme = acme.replace("host = \"*.wild.test\"", "host = \"wild.test\"");
    let out = Gateway::builder(&acme)
        .env("SWARMGATE_ACME_STORAGE", "rediss://:env-secret@redis.internal:6380/2")
        .env("SWARMGATE_ACME_REPLICA_ID", "task-1")
        .env("SWARMGATE_ACME_STORAGE_KEY", "0123456789abcdef0123456789abcdef")
        .check();
    assert_eq!(out.code, Some(0), "stderr: {}", out.stderr);
    assert!(
        out.stdout.contains("storage rediss://***@redis.internal:6380/2 (encrypted)"),
        "the password is never shown: {}",
        out.stdout
    );
    assert!(!out.stdout.contains("secret"), "{}", out.stdout);

    let out = Gateway::builder(&acme)
        .env("SWARMGATE_ACME_STORAGE", "redis://:env-secret@redis.internal:notaport/0")
        .env("SWARMGATE_ACME_STORAGE_KEY", "too short")
        .check();
    assert_eq!(out.code, Some(1), "stdout: {}", out.stdout);
    assert!(
        out.stderr.contains("env SWARMGATE_ACME_STORAGE: [acme].storage: not a usable Redis URL"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("env SWARMGATE_ACME_STORAGE_KEY: SWARMGATE_ACME_STORAGE_KEY: at least 32 characters"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("secret") && !out.stderr.contains("too short"), "{}", out.stderr);
}

#[test]
fn acme_takes_wildcard_routes_a_static_certificate_covers() {
    const ACME_WILDCARD: &str = r#"
[listen]
http = "@HTTP@"
https = "@HTTPS@"
admin = ""

[acme]
directory = "https://127.0.0.1:9/directory"

[[route]]
host = "*.sandbox.test"
upstream = "app"

[[route]]
host = "api.test"
upstream = "app"

[[route]]
host = "*"
upstream = "app"

[upstream.app]
servers = ["127.0.0.1:9000"]
"#;
    // No certificate for the wildcard: ACME cannot get one, so nothing would serve it.
    let out = Gateway::builder(ACME_WILDCARD).check();
    assert_eq!(out.code, Some(1), "stdout: {}\nstderr: {}", out.stdout, out.stderr);
    // Where the route's host is written, as every problem `check` reports.
    assert!(
        out.stderr.contains("swarmgate.toml:11:8: no static certificate for route host \"*.sandbox.test\"")
            && out.stderr.contains("cannot issue wildcard")
            && out.stderr.contains("1 problem(s) in swarmgate.toml"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("\"*\""), "a catch-all route needs no certificate of its own: {}", out.stderr);
    // With a static certificate for it (api.test is ACME's; `*` takes what SNI finds).
    let pki = Pki::new();
    let (crt, key) = pki.leaf(&["*.sandbox.test"]);
    let out = Gateway::builder(ACME_WILDCARD).file("certs/wild.crt", crt).file("certs/wild.key", key).check();
    assert_eq!(out.code, Some(0), "stdout: {}\nstderr: {}", out.stdout, out.stderr);
}

const ACME_SETTINGS: &str = r#"
[listen]
http = "@HTTP@"
https = "@HTTPS@"
admin = "@ADMIN@"

[acme]
directory = "https://127.0.0.1:9/directory"
@ACME@

[[route]]
host = "api.test"
upstream = "app"

[upstream.app]
servers = ["127.0.0.1:9000"]
"#;

#[tokio::test]
async fn unusable_acme_storage_or_ca_file_is_refused_by_check_start_and_reload() {
    // Each where it is written (the `@ACME@` line is the 9th).
    let cases = [
        ("storage = \"blocker/acme\"", "swarmgate.toml:9:11: [acme].storage blocker/acme: blocker is not a directory"),
        ("ca_file = \"not-pem.txt\"", "swarmgate.toml:9:11: [acme].ca_file not-pem.txt"),
    ];
    for (line, says) in cases {
        let out = Gateway::builder(ACME_SETTINGS)
            .var("ACME", line)
            .file("blocker", "a file where the directory would go\n")
            .file("not-pem.txt", "not a certificate\n")
            .check();
        assert_eq!(out.code, Some(1), "{line}: stdout: {}\nstderr: {}", out.stdout, out.stderr);
        assert!(out.stderr.contains(says), "{line}: {}", out.stderr);
        let (code, logs) = Gateway::builder(ACME_SETTINGS)
            .var("ACME", line)
            .file("blocker", "x\n")
            .file("not-pem.txt", "x\n")
            .run_to_exit(Duration::from_secs(10))
            .await;
        assert_eq!(code, Some(1), "{line}: {logs}");
        assert!(logs.contains(says), "{line}: {logs}");
    }
    // Both at once: both reported, in the file's order.
    let out = Gateway::builder(ACME_SETTINGS)
        .var("ACME", "storage = \"blocker/acme\"\nca_file = \"not-pem.txt\"")
        .file("blocker", "x\n")
        .file("not-pem.txt", "x\n")
        .check();
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 3, "{}", out.stderr);
    assert!(lines[0].starts_with("swarmgate.toml:9:11: [acme].storage"), "{}", out.stderr);
    assert!(lines[1].starts_with("swarmgate.toml:10:11: [acme].ca_file"), "{}", out.stderr);
    assert_eq!(lines[2], "2 problem(s) in swarmgate.toml");
    // Started with usable settings, a reload to unusable ones is refused whole.
    let gw = Gateway::builder(ACME_SETTINGS).var("ACME", "").file("not-pem.txt", "not a certificate\n").start().await;
    let bad = ACME_SETTINGS.replace("@ACME@", "ca_file = \"not-pem.txt\"");
    assert!(matches!(gw.reload(&bad).await, Reload::Refused), "{}", gw.logs());
    assert!(gw.logs().contains("reload refused"), "{}", gw.logs());
}
