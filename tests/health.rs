//! Server eligibility: active health checks, passive ejection, DNS failures, and what a
//! client gets when no server is left. Real gateway process, real servers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod fleet;
mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use fleet::{Dns, Server};
use support::Gateway;

fn config(upstream: &str, extra: &str) -> String {
    format!(
        r#"
[listen]
http = "@HTTP@"
https = ""
admin = "@ADMIN@"

[proxy]
redirect_https = false
drain_timeout = "2s"
shutdown_delay = "0s"
{extra}

[[route]]
host = "app.test"
path = "/"
upstream = "app"

[upstream.app]
{upstream}
retries = 2
connect_timeout = "500ms"
response_timeout = "5s"
"#
    )
}

const HEALTH: &str =
    r#"health = { path = "/health", interval = "100ms", timeout = "500ms", healthy_after = 1, unhealthy_after = 2 }"#;

fn servers(list: &[&Server]) -> String {
    let l: Vec<String> = list.iter().map(|s| format!("\"{}\"", s.addr)).collect();
    format!("servers = [{}]\n{HEALTH}", l.join(", "))
}

/// The state `/upstreams` shows for `addr`, if listed.
async fn state_of(gw: &Gateway, addr: SocketAddr) -> Option<String> {
    let json: serde_json::Value = serde_json::from_str(&gw.admin_get("/upstreams").await.text()).unwrap();
    json["upstreams"][0]["servers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["address"] == addr.to_string())
        .map(|s| s["state"].as_str().unwrap().to_string())
}

async fn wait_state(gw: &Gateway, addr: SocketAddr, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = state_of(gw, addr).await;
        if now.as_deref() == Some(want) {
            return;
        }
        assert!(Instant::now() < deadline, "{addr} stayed {now:?}, wanted {want}; logs:\n{}", gw.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn get_n(gw: &Gateway, n: usize) -> Vec<u16> {
    let mut conn = support::H1::connect(gw.http).await;
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(conn.get("app.test", "/").await.status);
    }
    out
}

#[tokio::test]
async fn a_new_server_gets_traffic_only_after_passing_a_check() {
    let a = Server::start("127.0.0.1:0".parse().unwrap()).await;
    let gw = Gateway::start(&config(&servers(&[&a]), "")).await;
    wait_state(&gw, a.addr, "healthy").await;

    let b = Server::start("127.0.0.1:0".parse().unwrap()).await;
    b.set_healthy(false);
    assert_eq!(gw.reload(&config(&servers(&[&a, &b]), "")).await, support::Reload::Applied(1));
    // Not served until a check passes: `unhealthy`, and `pending` (no check has passed yet).
    assert_eq!(state_of(&gw, b.addr).await.as_deref(), Some("unhealthy"));
    let json: serde_json::Value = serde_json::from_str(&gw.admin_get("/upstreams").await.text()).unwrap();
    let pending: Vec<bool> =
        json["upstreams"][0]["servers"].as_array().unwrap().iter().map(|s| s["pending"].as_bool().unwrap()).collect();
    assert_eq!(pending.iter().filter(|p| **p).count(), 1, "{json}");
    let statuses = get_n(&gw, 200).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert!(b.health_checks() > 0, "the new server was never checked");
    assert_eq!(b.hits(), 0, "a server that never passed a check got traffic");

    b.set_healthy(true);
    wait_state(&gw, b.addr, "healthy").await;
    get_n(&gw, 200).await;
    assert!(b.hits() > 40, "the now-healthy server got {} of 200 requests", b.hits());
}

#[tokio::test]
async fn an_unhealthy_server_leaves_the_rotation_and_comes_back() {
    let a = Server::start("127.0.0.1:0".parse().unwrap()).await;
    let b = Server::start("127.0.0.1:0".parse().unwrap()).await;
    let gw = Gateway::start(&config(&servers(&[&a, &b]), "")).await;
    wait_state(&gw, a.addr, "healthy").await;
    wait_state(&gw, b.addr, "healthy").await;

    b.set_healthy(false);
    wait_state(&gw, b.addr, "unhealthy").await;
    let before = b.hits();
    let statuses = get_n(&gw, 200).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(b.hits(), before, "an unhealthy server got traffic");
    let transitions = gw.metric("swarmgate_upstream_health_transitions_total{upstream=\"app\"}").await.unwrap();
    assert!(transitions >= 3.0, "pending->healthy x2 and healthy->unhealthy: {transitions}");
    assert_eq!(gw.metric("swarmgate_upstream_servers{upstream=\"app\",state=\"unhealthy\"}").await, Some(1.0));
    assert!(gw.logs().contains("server is unhealthy"), "state change not logged");

    b.set_healthy(true);
    wait_state(&gw, b.addr, "healthy").await;
    get_n(&gw, 100).await;
    assert!(b.hits() > before, "the recovered server got no traffic");
}

#[tokio::test]
async fn no_eligible_server_answers_503_at_once() {
    let a = Server::start("127.0.0.1:0".parse().unwrap()).await;
    a.set_healthy(false);
    let gw = Gateway::start(&config(&servers(&[&a]), "")).await;
    let started = Instant::now();
    let resp = support::get(gw.http, "app.test", "/").await;
    assert_eq!(resp.status, 503);
    assert_eq!(resp.text(), "503 no server available\n");
    assert!(started.elapsed() < Duration::from_secs(2), "503 took {:?}", started.elapsed());
    assert_eq!(a.hits(), 0);
}

#[tokio::test]
async fn a_post_that_was_never_sent_is_retried_on_another_server() {
    // The first server's port refuses connections: nothing of a request can reach it.
    let dead: SocketAddr = format!("127.0.0.1:{}", support::free_port()).parse().unwrap();
    let alive = Server::start("127.0.0.1:0".parse().unwrap()).await;
    let upstream = format!("servers = [\"{dead}\", \"{}\"]", alive.addr);
    let gw = Gateway::start(&config(&upstream, "")).await;
    for i in 0..20 {
        let req = support::req("POST", "app.test", "/order").body(support::full(format!("order-{i}"))).unwrap();
        let resp = support::send(gw.http, req).await;
        assert_eq!(resp.status, 200, "POST {i}: {}", resp.text());
    }
    let ids: Vec<String> = alive.seen().into_iter().map(|s| s.id).collect();
    let expected: Vec<String> = (0..20).map(|i| format!("order-{i}")).collect();
    assert_eq!(ids, expected, "every POST delivered exactly once, in order");
    let errors = gw.metric("swarmgate_upstream_connect_errors_total{upstream=\"app\"}").await.unwrap();
    assert!(errors >= 1.0, "the refused connect was not counted");
    let json = gw.admin_get("/upstreams").await.text();
    assert!(json.contains("\"ejected\":true"), "a server refusing connections is ejected: {json}");
}

#[tokio::test]
async fn dns_failures_keep_the_last_known_servers() {
    let port = support::free_port();
    let ip = Ipv4Addr::new(127, 0, 0, 31);
    let a = Server::start(SocketAddr::from((ip, port))).await;
    let dns = Dns::start("tasks.app", vec![ip]).await;
    let upstream = format!("dns = \"tasks.app:{port}\"\nresolve_every = \"100ms\"");
    let extra = format!("\n[discovery]\nnameservers = [\"{}\"]", dns.addr);
    let gw = Gateway::start(&config(&upstream, &extra)).await;
    wait_state(&gw, a.addr, "healthy").await;

    // An empty answer, then no answer at all: neither may empty the upstream.
    dns.set(Vec::new());
    let q = dns.queries.load(Ordering::Relaxed);
    assert!(support::wait_until(Duration::from_secs(5), || dns.queries.load(Ordering::Relaxed) > q + 3).await);
    assert_eq!(state_of(&gw, a.addr).await.as_deref(), Some("healthy"));
    dns.answering.store(false, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(state_of(&gw, a.addr).await.as_deref(), Some("healthy"), "a DNS outage emptied the upstream");
    let statuses = get_n(&gw, 20).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let errors = gw.metric("swarmgate_upstream_resolve_errors_total{upstream=\"app\"}").await.unwrap();
    assert!(errors >= 2.0, "resolution failures not counted: {errors}");
    assert!(gw.logs().contains("keeping the last known servers"));

    // DNS comes back with a different set: it is applied.
    let ip2 = Ipv4Addr::new(127, 0, 0, 32);
    let b = Server::start(SocketAddr::from((ip2, port))).await;
    dns.set(vec![ip2]);
    dns.answering.store(true, Ordering::Relaxed);
    wait_state(&gw, b.addr, "healthy").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while state_of(&gw, a.addr).await.is_some() {
        assert!(Instant::now() < deadline, "the vanished server was never drained");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn readiness_waits_for_the_first_dns_answer() {
    // The DNS server drops the first queries: until an answer comes back, the upstream's
    // emptiness says nothing, and /readyz says 503 (starting), so no load balancer sends
    // requests that would find no server.
    let port = support::free_port();
    let ip = Ipv4Addr::new(127, 0, 0, 33);
    let _a = Server::start(SocketAddr::from((ip, port))).await;
    let dns = Dns::start("tasks.app", vec![ip]).await;
    dns.answering.store(false, Ordering::Relaxed);
    let answering = std::sync::Arc::clone(&dns.answering);
    let t0 = Instant::now();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        answering.store(true, Ordering::Relaxed);
    });
    let upstream = format!("dns = \"tasks.app:{port}\"\nresolve_every = \"100ms\"");
    let extra = format!("\n[discovery]\nnameservers = [\"{}\"]", dns.addr);
    let gw = Gateway::start(&config(&upstream, &extra)).await; // waits for /readyz 200
    assert!(t0.elapsed() >= Duration::from_millis(1400), "ready after {:?}, before any DNS answer", t0.elapsed());
    let statuses = get_n(&gw, 20).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
}
