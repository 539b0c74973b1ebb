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

/// Whether a request is answered 200 within 10 s (tried again and again).
async fn served_within_10_s(gw: &Gateway) -> bool {
    support::wait_until_async(Duration::from_secs(10), || async { get_n(gw, 1).await == vec![200] }).await
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
    // Failed checks leave it pending: it never passed one.
    assert!(support::wait_until(Duration::from_secs(5), || b.health_checks() >= 4).await);
    let json: serde_json::Value = serde_json::from_str(&gw.admin_get("/upstreams").await.text()).unwrap();
    let pending: Vec<bool> =
        json["upstreams"][0]["servers"].as_array().unwrap().iter().map(|s| s["pending"].as_bool().unwrap()).collect();
    assert_eq!(pending.iter().filter(|p| **p).count(), 1, "{json}");

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

/// The upstream's DNS state in `/upstreams`: whether its last lookup failed.
async fn dns_failing(gw: &Gateway) -> bool {
    let json: serde_json::Value = serde_json::from_str(&gw.admin_get("/upstreams").await.text()).unwrap();
    json["upstreams"][0]["dns_failing"].as_bool().unwrap()
}

async fn dns_gateway(dns: &Dns, port: u16, every: &str) -> Gateway {
    let upstream = format!("dns = \"tasks.app:{port}\"\nresolve_every = \"{every}\"");
    let extra = format!("\n[discovery]\nnameservers = [\"{}\"]", dns.addr);
    Gateway::start(&config(&upstream, &extra)).await
}

/// Lookups that get no answer (SERVFAIL, REFUSED, none at all) keep the last known servers.
#[tokio::test]
async fn dns_failures_keep_the_last_known_servers() {
    let port = support::free_port();
    let ip = Ipv4Addr::new(127, 0, 0, 31);
    let a = Server::start(SocketAddr::from((ip, port))).await;
    let dns = Dns::start("tasks.app", vec![ip]).await;
    let gw = dns_gateway(&dns, port, "100ms").await;
    wait_state(&gw, a.addr, "healthy").await;
    assert!(!dns_failing(&gw).await);

    for (rcode, answering) in [(2, true), (5, true), (0, false)] {
        // Each from a good answer: each must make the lookups fail on its own.
        dns.rcode.store(0, Ordering::Relaxed);
        dns.answering.store(true, Ordering::Relaxed);
        assert!(support::wait_until_async(Duration::from_secs(5), || async { !dns_failing(&gw).await }).await);
        dns.rcode.store(rcode, Ordering::Relaxed);
        dns.answering.store(answering, Ordering::Relaxed);
        // (Unanswered lookups fail only after their timeouts: 2 s, twice.)
        let failing = support::wait_until_async(Duration::from_secs(15), || async { dns_failing(&gw).await });
        assert!(failing.await, "rcode {rcode}");
        let q = dns.queries.load(Ordering::Relaxed);
        assert!(support::wait_until(Duration::from_secs(10), || dns.queries.load(Ordering::Relaxed) > q + 2).await);
        assert_eq!(state_of(&gw, a.addr).await.as_deref(), Some("healthy"), "rcode {rcode}: the upstream was emptied");
        let statuses = get_n(&gw, 10).await;
        assert!(statuses.iter().all(|s| *s == 200), "rcode {rcode}: {statuses:?}");
    }
    assert_eq!(gw.metric("swarmgate_upstream_dns_failing{upstream=\"app\"}").await, Some(1.0));
    let errors = gw.metric("swarmgate_upstream_resolve_errors_total{upstream=\"app\"}").await.unwrap();
    assert!(errors >= 6.0, "resolution failures not counted: {errors}");
    let logs = gw.logs();
    assert!(logs.contains("keeping the last known servers"), "{logs}");
    assert!(logs.contains("answered SERVFAIL") || logs.contains("answered Server Failure"), "{logs}");
    // Logged once per outage (three here), not at every lookup.
    assert_eq!(logs.matches("DNS lookup failed;").count(), 3, "{logs}");

    // DNS comes back with a different set: it is applied.
    let ip2 = Ipv4Addr::new(127, 0, 0, 32);
    let b = Server::start(SocketAddr::from((ip2, port))).await;
    dns.set(vec![ip2]);
    dns.rcode.store(0, Ordering::Relaxed);
    dns.answering.store(true, Ordering::Relaxed);
    wait_state(&gw, b.addr, "healthy").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while state_of(&gw, a.addr).await.is_some() {
        assert!(Instant::now() < deadline, "the vanished server was never drained");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!dns_failing(&gw).await);
    assert!(gw.logs().contains("DNS answers again"));
}

/// An answer that lists no server (NXDOMAIN: a service scaled to zero; or no records) is
/// the truth: the upstream empties (503), rather than keep addresses Swarm may give to
/// another service's containers; it fills again when DNS lists servers.
#[tokio::test]
async fn a_dns_answer_with_no_servers_empties_the_upstream() {
    let port = support::free_port();
    let ip = Ipv4Addr::new(127, 0, 0, 34);
    let a = Server::start(SocketAddr::from((ip, port))).await;
    let dns = Dns::start("tasks.app", vec![ip]).await;
    let gw = dns_gateway(&dns, port, "100ms").await;
    wait_state(&gw, a.addr, "healthy").await;
    for (what, empty) in [("NXDOMAIN", 3u8), ("no records", 0)] {
        if empty == 0 {
            dns.set(Vec::new());
        }
        dns.rcode.store(empty, Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(10);
        while state_of(&gw, a.addr).await.is_some() {
            assert!(Instant::now() < deadline, "{what}: the upstream kept its server:\n{}", gw.logs());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(get_n(&gw, 3).await, vec![503; 3], "{what}");
        assert!(!dns_failing(&gw).await, "{what}: an answer is no failure");
        assert!(gw.logs().contains("DNS lists no servers"), "{what}");
        // Listed again: served again.
        dns.rcode.store(0, Ordering::Relaxed);
        dns.set(vec![ip]);
        wait_state(&gw, a.addr, "healthy").await;
        assert_eq!(get_n(&gw, 3).await, vec![200; 3], "{what}");
    }
}

/// While DNS fails, a server that fails stays out until DNS lists it again: by then its
/// address may be another service's (Swarm reuses a gone task's address), and a trial
/// request or the "every server ejected" fallback would send this service's requests
/// there.
#[tokio::test]
async fn a_server_failing_while_dns_fails_stays_out_until_dns_lists_it_again() {
    let port = support::free_port();
    let ip = Ipv4Addr::new(127, 0, 0, 35);
    let mine = Server::start(SocketAddr::from((ip, port))).await;
    let dns = Dns::start("tasks.app", vec![ip]).await;
    let gw = dns_gateway(&dns, port, "100ms").await;
    wait_state(&gw, mine.addr, "healthy").await;
    assert_eq!(get_n(&gw, 3).await, vec![200; 3]);

    dns.rcode.store(2, Ordering::Relaxed); // SERVFAIL from now on
    assert!(support::wait_until_async(Duration::from_secs(5), || async { dns_failing(&gw).await }).await);
    mine.kill();
    // The refused connect ejects it; then another service's container takes the address.
    let statuses = get_n(&gw, 2).await;
    assert!(statuses.iter().all(|s| *s == 502 || *s == 503), "{statuses:?}");
    let mut other = None;
    for _ in 0..50 {
        if let Ok(l) = std::net::TcpListener::bind(SocketAddr::from((ip, port))) {
            drop(l);
            other = Some(Server::start(SocketAddr::from((ip, port))).await);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let other = other.expect("the address could not be taken again");
    // Past the first ejection's back-off (1 s), requests keep finding no server.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let statuses = get_n(&gw, 10).await;
    assert!(statuses.iter().all(|s| *s == 503), "{statuses:?}\n{}", gw.logs());
    assert_eq!(other.hits(), 0, "a request went to whatever listens at the address now");

    // DNS answers again and lists the address: it is this service's again, and tried.
    dns.rcode.store(0, Ordering::Relaxed);
    let served = served_within_10_s(&gw).await;
    assert!(served, "{}", gw.logs());
    assert!(other.hits() >= 1);
}

/// A refused connect has discovery look up at once: the task is likely gone, and DNS
/// may already say so, long before `resolve_every`.
#[tokio::test]
async fn a_refused_connect_has_dns_looked_up_at_once() {
    let port = support::free_port();
    let (ip, ip2) = (Ipv4Addr::new(127, 0, 0, 36), Ipv4Addr::new(127, 0, 0, 37));
    let old = Server::start(SocketAddr::from((ip, port))).await;
    let new = Server::start(SocketAddr::from((ip2, port))).await;
    let dns = Dns::start("tasks.app", vec![ip]).await;
    let gw = dns_gateway(&dns, port, "30s").await;
    wait_state(&gw, old.addr, "healthy").await;
    let asked = dns.queries.load(Ordering::Relaxed);
    dns.set(vec![ip2]);
    old.kill();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The first request meets the refusal (retried elsewhere if it can: nowhere yet).
    let _ = get_n(&gw, 1).await;
    let looked_up = support::wait_until(Duration::from_secs(5), || dns.queries.load(Ordering::Relaxed) > asked).await;
    assert!(looked_up, "no lookup before resolve_every (30 s)");
    wait_state(&gw, new.addr, "healthy").await;
    assert_eq!(get_n(&gw, 5).await, vec![200; 5]);
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

/// A lookup that fails (SERVFAIL at once) is no answer either: `/readyz` stays 503 until
/// DNS answers, however long that takes.
#[tokio::test]
async fn readiness_waits_through_failed_lookups() {
    let port = support::free_port();
    let ip = Ipv4Addr::new(127, 0, 0, 38);
    let _a = Server::start(SocketAddr::from((ip, port))).await;
    let dns = Dns::start("tasks.app", vec![ip]).await;
    dns.rcode.store(2, Ordering::Relaxed);
    let rcode = std::sync::Arc::clone(&dns.rcode);
    let t0 = Instant::now();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(2000)).await;
        rcode.store(0, Ordering::Relaxed);
    });
    let gw = dns_gateway(&dns, port, "100ms").await; // waits for /readyz 200
    assert!(t0.elapsed() >= Duration::from_millis(1900), "ready after {:?}, with no DNS answer", t0.elapsed());
    assert!(dns.queries.load(Ordering::Relaxed) >= 10, "lookups went on meanwhile");
    let statuses = get_n(&gw, 10).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
}

/// An upstream moved from `dns` to listed `servers` by a reload while its DNS failed is
/// what the config says: no failure left over from DNS keeps a server out (a server
/// refused once is tried again after its back-off and comes back).
#[tokio::test]
async fn servers_listed_by_a_reload_are_not_held_out_by_a_past_dns_failure() {
    let port = support::free_port();
    let (ip, ip2) = (Ipv4Addr::new(127, 0, 0, 40), Ipv4Addr::new(127, 0, 0, 41));
    let a = Server::start(SocketAddr::from((ip, port))).await;
    let dns = Dns::start("tasks.app", vec![ip]).await;
    let gw = dns_gateway(&dns, port, "100ms").await;
    wait_state(&gw, a.addr, "healthy").await;
    dns.rcode.store(2, Ordering::Relaxed);
    assert!(support::wait_until_async(Duration::from_secs(5), || async { dns_failing(&gw).await }).await);

    // The operator pins the servers: one not listening yet.
    let pinned = SocketAddr::from((ip2, port));
    let reloaded = gw.reload(&config(&format!("servers = [\"{pinned}\"]"), "")).await;
    assert_eq!(reloaded, support::Reload::Applied(1));
    assert!(!dns_failing(&gw).await);
    assert_eq!(gw.metric("swarmgate_upstream_dns_failing{upstream=\"app\"}").await, Some(0.0));
    let refused = get_n(&gw, 1).await;
    assert!(refused[0] == 502 || refused[0] == 503, "{refused:?}");
    let b = Server::start(pinned).await;
    let served = served_within_10_s(&gw).await;
    assert!(served, "the listed server never came back:\n{}", gw.logs());
    assert!(b.hits() >= 1);
}

/// At start, `/readyz` waits for the first health checks of an upstream's servers: a
/// load balancer would otherwise send requests that find them all still pending (503).
#[tokio::test]
async fn readiness_waits_for_the_first_health_checks() {
    // Every answer, health checks included, takes 800 ms.
    let slow = support::Backend::start_with_delay("slow", Duration::from_millis(800)).await;
    let health =
        r#"health = { path = "/health", interval = "5s", timeout = "2s", healthy_after = 1, unhealthy_after = 2 }"#;
    let upstream = format!("servers = [\"{}\"]\n{health}", slow.addr);
    let t0 = Instant::now();
    let gw = Gateway::start(&config(&upstream, "")).await; // waits for /readyz 200
    assert!(t0.elapsed() >= Duration::from_millis(700), "ready after {:?}, before any check", t0.elapsed());
    assert_eq!(support::get(gw.http, "app.test", "/").await.status, 200);
}
