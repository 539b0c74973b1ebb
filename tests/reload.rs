//! SIGHUP: a valid new config takes effect at once (routes, servers, certificates, TLS
//! version); an invalid one is refused whole; requests in flight finish.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use support::*;

const V1: &str = r#"
[listen]
http = "@HTTP@"
https = "@HTTPS@"
admin = "@ADMIN@"

[proxy]
redirect_https = false
drain_timeout = "5s"

[tls]
certs_dir = "certs"
min_version = "1.2"

[[route]]
host = "a.test"
upstream = "one"

[[route]]
host = "b.test"
upstream = "two"

[upstream.one]
servers = ["@B1@"]

[upstream.two]
servers = ["@B2@"]
"#;

/// Route b.test removed, c.test added, upstream `one` moved from B1 to B4, TLS 1.3 only.
const V2: &str = r#"
[listen]
http = "@HTTP@"
https = "@HTTPS@"
admin = "@ADMIN@"

[proxy]
redirect_https = false
drain_timeout = "5s"

[tls]
certs_dir = "certs"
min_version = "1.3"

[[route]]
host = "a.test"
upstream = "one"

[[route]]
host = "c.test"
upstream = "three"

[upstream.one]
servers = ["@B4@"]

[upstream.three]
servers = ["@B3@"]
"#;

/// V1 with a route naming an upstream that does not exist.
const BROKEN: &str = r#"
[listen]
http = "@HTTP@"
https = "@HTTPS@"
admin = "@ADMIN@"

[[route]]
host = "a.test"
upstream = "nonexistent"

[upstream.one]
servers = ["@B1@"]
"#;

struct Setup {
    gw: Gateway,
    pki: Pki,
    b1: Backend,
    b2: Backend,
    b3: Backend,
    b4: Backend,
}

async fn setup() -> Setup {
    let pki = Pki::new();
    let (b1, b2, b3, b4) = (
        Backend::start("b1").await,
        Backend::start("b2").await,
        Backend::start("b3").await,
        Backend::start("b4").await,
    );
    let (a_crt, a_key) = pki.leaf(&["a.test", "b.test"]);
    let gw = Gateway::builder(V1)
        .var("B1", b1.addr)
        .var("B2", b2.addr)
        .var("B3", b3.addr)
        .var("B4", b4.addr)
        .file("certs/ab.crt", a_crt)
        .file("certs/ab.key", a_key)
        .start()
        .await;
    Setup { gw, pki, b1, b2, b3, b4 }
}

async fn who(gw: &Gateway, host: &str) -> String {
    let r = get(gw.http, host, "/").await;
    r.header("x-backend").map_or_else(|| r.status.to_string(), str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_config_takes_effect() {
    let s = setup().await;
    let gw = &s.gw;
    assert_eq!(who(gw, "a.test").await, "b1");
    assert_eq!(who(gw, "b.test").await, "b2");
    assert_eq!(who(gw, "c.test").await, "404");
    assert!(tls_connect(gw.https, &TlsOpts::sni("c.test")).await.is_err(), "c.test has no certificate yet");
    let mut tls12 = TlsOpts::sni("a.test").verified(&s.pki);
    tls12.tls12_only = true;
    assert!(tls_connect(gw.https, &tls12).await.is_ok());
    // A kept-alive client connection from before the reload.
    let mut kept = H1::connect(gw.http).await;
    assert_eq!(kept.get("a.test", "/").await.header("x-backend"), Some("b1"));

    let (c_crt, c_key) = s.pki.leaf(&["c.test"]);
    std::fs::write(gw.dir().join("certs/c.crt"), c_crt).unwrap();
    std::fs::write(gw.dir().join("certs/c.key"), c_key).unwrap();
    assert_eq!(gw.reload(V2).await, Reload::Applied(1));

    for _ in 0..20 {
        assert_eq!(who(gw, "a.test").await, "b4");
        assert_eq!(kept.get("a.test", "/").await.header("x-backend"), Some("b4"));
    }
    assert_eq!(who(gw, "b.test").await, "404");
    assert_eq!(who(gw, "c.test").await, "b3");
    let (r, info) = https_get(gw.https, &TlsOpts::sni("c.test").verified(&s.pki), "c.test", "/").await.unwrap();
    assert_eq!(info.san, ["c.test"]);
    assert_eq!(r.status, 200);
    assert!(tls_connect(gw.https, &tls12).await.is_err(), "TLS 1.2 accepted after min_version became 1.3");
    assert_eq!(s.b1.hits(), 2);
    assert_eq!(s.b2.hits(), 1);

    let v: serde_json::Value = serde_json::from_slice(&gw.admin_get("/upstreams").await.body).unwrap();
    assert_eq!(v["generation"], 1);
    let names: Vec<&str> = v["upstreams"].as_array().unwrap().iter().map(|u| u["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["one", "three"]);
    let m = gw.metrics().await;
    assert_eq!(metric_value(&m, r#"swarmgate_reloads_total{result="ok"}"#), Some(1.0));
    assert_eq!(metric_value(&m, r#"swarmgate_reloads_total{result="failed"}"#), Some(0.0));
    assert!(m.contains(r#"swarmgate_requests_total{route="c.test/",upstream="three",class="2xx"} 2"#), "{m}");
    // A route both configs have keeps its counters: 2 requests before the reload, 40 after.
    assert!(m.contains(r#"swarmgate_requests_total{route="a.test/",upstream="one",class="2xx"} 42"#), "{m}");
    assert!(!m.contains(r#"route="b.test/""#), "removed route still in metrics:\n{m}");

    // And back: the first config again.
    assert_eq!(gw.reload(V1).await, Reload::Applied(2));
    assert_eq!(who(gw, "a.test").await, "b1");
    assert_eq!(who(gw, "b.test").await, "b2");
    assert_eq!(who(gw, "c.test").await, "404");
}

/// A route whose upstream changes starts new counters under the new upstream's label:
/// its old upstream's requests are not counted as the new one's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_moved_to_another_upstream_counts_afresh_under_it() {
    let s = setup().await;
    let gw = &s.gw;
    for _ in 0..3 {
        assert_eq!(who(gw, "a.test").await, "b1");
    }
    assert_eq!(
        gw.reload(&V1.replace("host = \"a.test\"\nupstream = \"one\"", "host = \"a.test\"\nupstream = \"two\"")).await,
        Reload::Applied(1)
    );
    assert_eq!(who(gw, "a.test").await, "b2");
    let m = gw.metrics().await;
    assert_eq!(
        metric_value(&m, r#"swarmgate_requests_total{route="a.test/",upstream="two",class="2xx"}"#),
        Some(1.0),
        "{m}"
    );
    assert!(!m.contains(r#"route="a.test/",upstream="one""#), "the old upstream's series stays:\n{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_config_is_refused_whole() {
    let s = setup().await;
    let gw = &s.gw;
    assert_eq!(gw.reload(BROKEN).await, Reload::Refused);
    // The running config still serves, readiness unchanged.
    assert_eq!(who(gw, "a.test").await, "b1");
    assert_eq!(who(gw, "b.test").await, "b2");
    let r = gw.admin_get("/readyz").await;
    assert_eq!(r.status, 200);
    let m = gw.metrics().await;
    assert_eq!(metric_value(&m, "swarmgate_config_generation"), Some(0.0));
    assert_eq!(metric_value(&m, r#"swarmgate_reloads_total{result="failed"}"#), Some(1.0));
    assert_eq!(metric_value(&m, r#"swarmgate_reloads_total{result="ok"}"#), Some(0.0));
    let logs = gw.logs();
    assert!(logs.contains("reload refused, the running configuration is kept"), "{logs}");
    assert!(
        logs.contains(r#"unknown upstream \"nonexistent\""#) || logs.contains(r#"unknown upstream "nonexistent""#),
        "{logs}"
    );

    // A broken certificate refuses a reload too.
    gw.rewrite_config(V1);
    std::fs::write(gw.dir().join("certs/bad.crt"), "garbage").unwrap();
    std::fs::write(gw.dir().join("certs/bad.key"), "garbage").unwrap();
    assert_eq!(gw.reload(V2).await, Reload::Refused);
    assert_eq!(who(gw, "b.test").await, "b2");
    assert_eq!(who(gw, "c.test").await, "404");

    // Fixed, the next SIGHUP applies.
    std::fs::remove_file(gw.dir().join("certs/bad.crt")).unwrap();
    assert_eq!(gw.reload(V2).await, Reload::Applied(1));
    assert_eq!(who(gw, "a.test").await, "b4");
    assert_eq!(s.b3.hits() + s.b4.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_flight_finishes_across_a_reload() {
    let s = setup().await;
    let gw = &s.gw;
    let http = gw.http;
    let slow = tokio::spawn(async move { get(http, "a.test", "/sleep?ms=1500").await });
    assert!(wait_until(Duration::from_secs(2), || s.b1.hits() == 1).await);
    // B1 leaves upstream `one` and the route b.test goes away while the request runs.
    assert_eq!(gw.reload(V2).await, Reload::Applied(1));
    assert_eq!(who(gw, "a.test").await, "b4");
    let r = slow.await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "b1");
    assert_eq!(s.b1.hits(), 1);
    // The removed server is forgotten once its request is done.
    let gone = async {
        for _ in 0..100 {
            let v: serde_json::Value = serde_json::from_slice(&gw.admin_get("/upstreams").await.body).unwrap();
            let addrs: Vec<String> = v["upstreams"][0]["servers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["address"].as_str().unwrap().to_string())
                .collect();
            if addrs == [s.b4.addr.to_string()] {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    };
    assert!(gone.await);
    let _ = &s.b2;
}

const STUCK: &str = r#"
[listen]
http = "@HTTP@"
https = ""
admin = "@ADMIN@"

[proxy]
drain_timeout = "1s"

[[route]]
host = "*"
upstream = "app"

[upstream.app]
servers = ["@SERVER@"]
retries = 0
response_timeout = "30s"
"#;

/// A server removed by a reload drains for `drain_timeout`; a request still waiting on
/// it then is cut (its upstream connection aborted: 502), not left to response_timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_stuck_on_a_removed_server_is_cut_at_drain_timeout() {
    let slow = Backend::start_with_delay("slow", Duration::from_secs(20)).await;
    let fast = Backend::start("fast").await;
    let gw = Gateway::builder(STUCK).var("SERVER", slow.addr).start().await;
    let http = gw.http;
    let stuck = tokio::spawn(async move {
        let t0 = std::time::Instant::now();
        (get(http, "app.test", "/stuck").await.status, t0.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let v2 = STUCK.replace("@SERVER@", &fast.addr.to_string());
    assert!(matches!(gw.reload(&v2).await, Reload::Applied(_)));
    assert_eq!(get(gw.http, "app.test", "/").await.status, 200, "the new server does not serve");
    let (status, took) = tokio::time::timeout(Duration::from_secs(10), stuck).await.expect("cut in time").unwrap();
    assert_eq!(status, 502);
    assert!(took < Duration::from_secs(5), "cut after {took:?}, not at drain_timeout");
}

/// `[listen]` takes effect at restart only: a reload that turns HTTPS on keeps serving as
/// before (no redirect to a port nobody listens on) and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_listen_section_waits_for_a_restart() {
    let b = Backend::start("app").await;
    let gw = Gateway::builder(STUCK).var("SERVER", b.addr).start().await;
    assert_eq!(get(gw.http, "app.test", "/").await.status, 200);
    let https = format!("127.0.0.1:{}", free_port());
    let v2 = STUCK.replace("https = \"\"", &format!("https = \"{https}\"")).replace("@SERVER@", &b.addr.to_string());
    assert!(matches!(gw.reload(&v2).await, Reload::Applied(_)));
    assert!(gw.logs().contains("[listen] changed"), "{}", gw.logs());
    let r = get(gw.http, "app.test", "/").await;
    assert_eq!(r.status, 200, "{:?}", r.headers);
    assert!(tokio::net::TcpStream::connect(&https).await.is_err(), "nothing listens on the new address");
}
