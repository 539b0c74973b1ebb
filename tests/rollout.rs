//! Zero-error rollouts, replayed under constant load against the real binary.
//!
//! Three "old" servers serve; 16 keep-alive clients send GETs and POSTs (each POST with a
//! unique id); three "new" servers appear (by config reload in one test, by a DNS change
//! in another), the old ones are removed, and killed a few seconds later. Asserted: no
//! client request fails, no POST is delivered twice, every new server gets traffic, and
//! no request reaches an old server after its drain finished. A third test kills one
//! server without warning: GETs still never fail; what happens to POSTs is reported.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod fleet;
mod support;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleet::{Dns, Server};
use support::Gateway;

/// The outcome of the client load.
#[derive(Default)]
struct Load {
    ok_gets: AtomicU64,
    ok_posts: AtomicU64,
    failures: Mutex<Vec<String>>,
    post_failures: Mutex<Vec<String>>,
    acked_posts: Mutex<Vec<String>>,
}

/// `clients` keep-alive connections alternating GET and POST until `stop` is set.
fn start_load(
    gw_http: SocketAddr,
    clients: usize,
    posts: bool,
    stop: Arc<AtomicBool>,
) -> (Arc<Load>, Vec<tokio::task::JoinHandle<()>>) {
    let load = Arc::new(Load::default());
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (load, stop) = (Arc::clone(&load), Arc::clone(&stop));
        tasks.push(tokio::spawn(async move {
            let mut conn = support::H1::connect(gw_http).await;
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let is_post = posts && n % 2 == 0;
                let id = format!("c{c}-{n}");
                let req = if is_post {
                    support::req("POST", "app.test", "/order").body(support::full(id.clone())).unwrap()
                } else {
                    support::req("GET", "app.test", "/").body(support::empty()).unwrap()
                };
                match conn.send(req).await {
                    Ok(r) if r.status == 200 => {
                        if is_post {
                            load.ok_posts.fetch_add(1, Ordering::Relaxed);
                            load.acked_posts.lock().unwrap().push(id);
                        } else {
                            load.ok_gets.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    other => {
                        let what = match other {
                            Ok(r) => format!(
                                "{} {id}: status {} {:?}",
                                if is_post { "POST" } else { "GET" },
                                r.status,
                                r.text()
                            ),
                            Err(e) => format!("{} {id}: {e}", if is_post { "POST" } else { "GET" }),
                        };
                        if is_post {
                            load.post_failures.lock().unwrap().push(what.clone());
                        }
                        load.failures.lock().unwrap().push(what);
                        if conn.is_closed() {
                            conn = support::H1::connect(gw_http).await;
                        }
                    }
                }
            }
        }));
    }
    (load, tasks)
}

fn config(upstream: &str, extra: &str) -> String {
    format!(
        r#"
[listen]
http = "@HTTP@"
https = ""
admin = "@ADMIN@"

[proxy]
redirect_https = false
drain_timeout = "5s"
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

fn servers_line(servers: &[&Server]) -> String {
    let list: Vec<String> = servers.iter().map(|s| format!("\"{}\"", s.addr)).collect();
    format!("servers = [{}]", list.join(", "))
}

/// Waits until none of `addrs` is listed by `/upstreams` any more; returns that instant.
async fn wait_forgotten(gw: &Gateway, addrs: &[SocketAddr]) -> Instant {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let json: serde_json::Value = serde_json::from_str(&gw.admin_get("/upstreams").await.text()).unwrap();
        let listed: Vec<String> = json["upstreams"][0]["servers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["address"].as_str().unwrap().to_string())
            .collect();
        if addrs.iter().all(|a| !listed.contains(&a.to_string())) {
            return Instant::now();
        }
        assert!(Instant::now() < deadline, "old servers never finished draining: {listed:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The assertions shared by both rollout replays.
fn check_rollout(load: &Load, old: &[Server], new: &[Server], drained_at: Instant) {
    let failures = load.failures.lock().unwrap().clone();
    let (gets, posts) = (load.ok_gets.load(Ordering::Relaxed), load.ok_posts.load(Ordering::Relaxed));
    eprintln!("rollout: {gets} GETs and {posts} POSTs answered 200, {} failed", failures.len());
    assert!(
        failures.is_empty(),
        "{} client requests failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
    assert!(gets > 500 && posts > 500, "too little load to prove anything: {gets} GETs, {posts} POSTs");

    let mut deliveries: HashMap<String, usize> = HashMap::new();
    for s in old.iter().chain(new) {
        for seen in s.seen().into_iter().filter(|r| r.method == "POST") {
            *deliveries.entry(seen.id).or_default() += 1;
        }
    }
    let twice: Vec<_> = deliveries.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "POSTs delivered more than once: {twice:?}");
    for id in load.acked_posts.lock().unwrap().iter() {
        assert_eq!(deliveries.get(id), Some(&1), "acknowledged POST {id} was not delivered exactly once");
    }
    for s in new {
        assert!(!s.seen().is_empty(), "new server {} got no traffic", s.addr);
    }
    for s in old {
        let late: Vec<_> = s.seen().into_iter().filter(|r| r.at > drained_at).collect();
        assert!(late.is_empty(), "{} requests reached old server {} after its drain finished", late.len(), s.addr);
        assert!(!s.seen().is_empty(), "old server {} never served (the test did not exercise it)", s.addr);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rollout_by_config_reload_loses_nothing() {
    let old = [
        Server::start("127.0.0.1:0".parse().unwrap()).await,
        Server::start("127.0.0.1:0".parse().unwrap()).await,
        Server::start("127.0.0.1:0".parse().unwrap()).await,
    ];
    let gw = Gateway::start(&config(&servers_line(&old.iter().collect::<Vec<_>>()), "")).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (load, clients) = start_load(gw.http, 16, true, Arc::clone(&stop));

    tokio::time::sleep(Duration::from_millis(1000)).await;
    let new = [
        Server::start("127.0.0.1:0".parse().unwrap()).await,
        Server::start("127.0.0.1:0".parse().unwrap()).await,
        Server::start("127.0.0.1:0".parse().unwrap()).await,
    ];
    let both: Vec<&Server> = old.iter().chain(new.iter()).collect();
    assert_eq!(gw.reload(&config(&servers_line(&both), "")).await, support::Reload::Applied(1));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        gw.reload(&config(&servers_line(&new.iter().collect::<Vec<_>>()), "")).await,
        support::Reload::Applied(2)
    );
    let drained_at = wait_forgotten(&gw, &old.iter().map(|s| s.addr).collect::<Vec<_>>()).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    for s in &old {
        s.kill();
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    check_rollout(&load, &old, &new, drained_at);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rollout_by_dns_change_loses_nothing() {
    // Old servers on 127.0.0.11-13, new ones on 127.0.0.21-23, all on one port (as Swarm
    // tasks share the service's port on their own addresses).
    let port = support::free_port();
    let ip = |last: u8| Ipv4Addr::new(127, 0, 0, last);
    let mut old = Vec::new();
    for last in [11, 12, 13] {
        old.push(Server::start(SocketAddr::from((ip(last), port))).await);
    }
    let dns = Dns::start("tasks.app", vec![ip(11), ip(12), ip(13)]).await;
    let upstream = format!("dns = \"tasks.app:{port}\"\nresolve_every = \"200ms\"");
    let extra = format!("\n[discovery]\nnameservers = [\"{}\"]", dns.addr);
    let gw = Gateway::start(&config(&upstream, &extra)).await;
    // Discovery runs in the background: wait for the first answer to be applied.
    assert!(
        support::wait_until(Duration::from_secs(10), || dns.queries.load(Ordering::Relaxed) > 0).await,
        "gateway never asked the DNS server"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !gw.admin_get("/upstreams").await.text().contains(&format!("127.0.0.13:{port}")) {
        assert!(Instant::now() < deadline, "DNS servers never appeared:\n{}", gw.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let (load, clients) = start_load(gw.http, 16, true, Arc::clone(&stop));
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let mut new = Vec::new();
    for last in [21, 22, 23] {
        new.push(Server::start(SocketAddr::from((ip(last), port))).await);
    }
    dns.set(vec![ip(11), ip(12), ip(13), ip(21), ip(22), ip(23)]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    dns.set(vec![ip(21), ip(22), ip(23)]);
    let drained_at = wait_forgotten(&gw, &old.iter().map(|s| s.addr).collect::<Vec<_>>()).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    for s in &old {
        s.kill();
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    check_rollout(&load, &old, &new, drained_at);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn abrupt_server_death_costs_no_get() {
    let servers = [
        Server::start("127.0.0.1:0".parse().unwrap()).await,
        Server::start("127.0.0.1:0".parse().unwrap()).await,
        Server::start("127.0.0.1:0".parse().unwrap()).await,
    ];
    let gw = Gateway::start(&config(&servers_line(&servers.iter().collect::<Vec<_>>()), "")).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (gets, get_clients) = start_load(gw.http, 12, false, Arc::clone(&stop));
    let (posts, post_clients) = start_load(gw.http, 4, true, Arc::clone(&stop));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let hits_before = servers[0].seen().len();
    servers[0].kill(); // no drain, no warning: the config still lists it
    tokio::time::sleep(Duration::from_millis(2500)).await;
    stop.store(true, Ordering::Relaxed);
    for c in get_clients.into_iter().chain(post_clients) {
        c.await.unwrap();
    }
    let get_failures = gets.failures.lock().unwrap().clone();
    let post_failures = posts.post_failures.lock().unwrap().clone();
    let ok_gets = gets.ok_gets.load(Ordering::Relaxed) + posts.ok_gets.load(Ordering::Relaxed);
    eprintln!(
        "abrupt death: {ok_gets} GETs ok, {} GETs failed; {} POSTs ok, {} POSTs failed: {:?}",
        get_failures.len() + posts.failures.lock().unwrap().len() - post_failures.len(),
        posts.ok_posts.load(Ordering::Relaxed),
        post_failures.len(),
        post_failures
    );
    assert!(hits_before > 0, "the killed server never served");
    assert!(get_failures.is_empty(), "GETs failed after a server died: {get_failures:?}");
    let get_failures_in_post_clients: Vec<_> =
        posts.failures.lock().unwrap().iter().filter(|f| f.starts_with("GET")).cloned().collect();
    assert!(get_failures_in_post_clients.is_empty(), "GETs failed: {get_failures_in_post_clients:?}");
    // Every POST that was acknowledged was delivered exactly once.
    let mut deliveries: HashMap<String, usize> = HashMap::new();
    for s in &servers {
        for seen in s.seen().into_iter().filter(|r| r.method == "POST") {
            *deliveries.entry(seen.id).or_default() += 1;
        }
    }
    assert!(deliveries.values().all(|n| *n == 1), "a POST was delivered twice");
    for id in posts.acked_posts.lock().unwrap().iter() {
        assert_eq!(deliveries.get(id), Some(&1), "acknowledged POST {id} not delivered exactly once");
    }
    let json = gw.admin_get("/upstreams").await.text();
    assert!(json.contains("\"ejected\":true"), "the dead server should be ejected: {json}");
}
