//! Graceful shutdown on SIGTERM and SIGINT: /readyz 503 at once, listeners open for
//! shutdown_delay, requests in flight finish, exit code 0; a second signal exits at once.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use support::*;

const CONFIG: &str = r#"
[listen]
http = "@HTTP@"
https = ""
admin = "@ADMIN@"

[proxy]
shutdown_delay = "@DELAY@"
drain_timeout = "5s"

[[route]]
host = "*"
upstream = "app"

[upstream.app]
servers = ["@B@"]
"#;

async fn start(delay: &str) -> (Gateway, Backend) {
    let b = Backend::start("app").await;
    let gw = Gateway::builder(CONFIG).var("B", b.addr).var("DELAY", delay).start().await;
    (gw, b)
}

/// Logs that cannot be written (stderr a pipe nobody reads any more) lose the logs, not
/// the gateway: it goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_stderr_does_not_stop_the_gateway() {
    let b = Backend::start("app").await;
    let (mut child, ports, _dir) =
        Gateway::builder(CONFIG).var("B", b.addr).var("DELAY", "0s").spawn_with_stderr_closed();
    let up = wait_until_async(Duration::from_secs(10), || async {
        tokio::net::TcpStream::connect(ports.http).await.is_ok()
    })
    .await;
    assert!(up, "the gateway never listened: {:?}", child.try_wait());
    for i in 0..20 {
        let r = get(ports.http, "app.test", &format!("/{i}")).await;
        assert_eq!(r.status, 200, "request {i}");
    }
    assert_eq!(b.hits(), 20);
    let exited = child.try_wait().unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(exited, None, "the gateway exited with its logs undeliverable");
}

async fn readyz(gw: &Gateway) -> Option<(u16, String)> {
    let fut = async {
        let s = tokio::net::TcpStream::connect(gw.admin).await.ok()?;
        let mut c = H1::over(s).await;
        let r = c.send(req("GET", "admin", "/readyz").body(empty()).unwrap()).await.ok()?;
        Some((r.status, r.text()))
    };
    tokio::time::timeout(Duration::from_secs(1), fut).await.ok().flatten()
}

async fn graceful(sig: &str) {
    let (mut gw, b) = start("1s").await;
    let http = gw.http;
    let in_flight = tokio::spawn(async move { get(http, "app.test", "/sleep?ms=2000").await });
    assert!(wait_until(Duration::from_secs(2), || b.hits() == 1).await);
    let t0 = Instant::now();
    gw.signal(sig);
    // Not ready at once.
    let mut not_ready = None;
    while t0.elapsed() < Duration::from_millis(500) {
        if let Some((503, body)) = readyz(&gw).await {
            not_ready = Some((t0.elapsed(), body));
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (when, body) = not_ready.expect("/readyz did not turn 503 within 500 ms");
    assert_eq!(body, "shutting down\n");
    assert!(when < Duration::from_millis(500), "{when:?}");
    // Still healthy (the process runs), and still serving new clients during the delay,
    // so a load balancer has time to notice.
    assert_eq!(gw.admin_get("/healthz").await.status, 200);
    let r = get(gw.http, "app.test", "/during").await;
    assert_eq!(r.status, 200);
    assert!(t0.elapsed() < Duration::from_secs(1), "test too slow to check the delay");
    // After shutdown_delay the listener is closed.
    tokio::time::sleep(Duration::from_secs(1).saturating_sub(t0.elapsed()) + Duration::from_millis(300)).await;
    assert!(tokio::net::TcpStream::connect(gw.http).await.is_err(), "listener still open after shutdown_delay");
    // The request from before the signal completes.
    let r = in_flight.await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "app");
    let status = gw.wait_exit(Duration::from_secs(5)).await.expect("did not exit");
    assert_eq!(status.code(), Some(0), "{}", gw.logs());
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(1900) && took < Duration::from_secs(4), "exited after {took:?}");
    assert!(gw.logs().contains("swarmgate stopped"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_exits_0() {
    graceful("TERM").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_drains_and_exits_0() {
    graceful("INT").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_gateway_exits_right_after_the_delay() {
    let (mut gw, _b) = start("300ms").await;
    let t0 = Instant::now();
    gw.signal("TERM");
    let status = gw.wait_exit(Duration::from_secs(5)).await.expect("did not exit");
    let took = t0.elapsed();
    assert_eq!(status.code(), Some(0));
    assert!(took >= Duration::from_millis(300) && took < Duration::from_millis(1500), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once() {
    let (mut gw, _b) = start("10s").await;
    gw.signal("TERM");
    assert!(wait_until_ready_503(&gw).await);
    let t0 = Instant::now();
    gw.signal("INT");
    let status = gw.wait_exit(Duration::from_secs(3)).await.expect("second signal did not end the wait");
    assert_eq!(status.code(), Some(0));
    assert!(t0.elapsed() < Duration::from_secs(2));
}

async fn wait_until_ready_503(gw: &Gateway) -> bool {
    // Generous: on a loaded 2-core CI machine signal delivery can take a while.
    for _ in 0..500 {
        if matches!(readyz(gw).await, Some((503, _))) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_does_not_stop_the_gateway() {
    let (mut gw, _b) = start("1s").await;
    gw.signal("HUP");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(gw.wait_exit(Duration::from_millis(10)).await.is_none());
    assert_eq!(gw.admin_get("/readyz").await.status, 200);
    assert_eq!(get(gw.http, "app.test", "/").await.status, 200);
}

/// A config whose start waits for the ACME store, with the store: a Redis that accepts
/// connections and never answers holds the start for its timeout (2 s).
fn slow_to_start(shutdown_delay: &str) -> (String, std::thread::JoinHandle<Vec<std::net::TcpStream>>) {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let held = std::thread::spawn(move || silent.incoming().take(8).flatten().collect::<Vec<_>>());
    let config = format!(
        r#"
[listen]
http = "@HTTP@"
https = ""
admin = "@ADMIN@"

[proxy]
shutdown_delay = "{shutdown_delay}"

[acme]
directory = "https://127.0.0.1:9/directory"
storage = "redis://127.0.0.1:{port}/0"

[[route]]
host = "app.test"
upstream = "app"

[upstream.app]
servers = ["@B@"]
"#
    );
    (config, held)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sighup_while_starting_is_applied_once_serving() {
    // A SIGHUP sent while the gateway starts (a deploy script reloading right after the
    // start) must neither end the process nor be lost.
    let (config, held) = slow_to_start("5s");
    let b = Backend::start("app").await;
    let mut gw =
        Gateway::builder(&config).var("B", b.addr).signal_after("HUP", Duration::from_millis(300)).start().await;
    assert!(
        gw.logs().contains("configuration reloaded")
            || wait_until(Duration::from_secs(5), || gw.logs().contains("configuration reloaded")).await,
        "{}",
        gw.logs()
    );
    assert!(gw.wait_exit(Duration::from_millis(10)).await.is_none());
    assert_eq!(get(gw.http, "app.test", "/").await.status, 200);
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigterm_while_starting_stops_without_the_shutdown_delay() {
    // No load balancer has seen a gateway that was stopped before it served: waiting
    // shutdown_delay for them to notice would only hold up the stop (and the next start).
    let (config, held) = slow_to_start("60s");
    let b = Backend::start("app").await;
    let (code, logs) = Gateway::builder(&config)
        .var("B", b.addr)
        .signal_after("TERM", Duration::from_millis(300))
        .run_to_exit(Duration::from_secs(20))
        .await;
    assert_eq!(code, Some(0), "{logs}");
    assert!(logs.contains("stopped before serving"), "{logs}");
    assert!(logs.contains("swarmgate stopped"), "{logs}");
    drop(held);
}

/// Stopped while `/readyz` still says "starting" (its first DNS lookup has not come
/// back): no load balancer has sent it anything, so no `shutdown_delay` either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigterm_before_the_first_dns_lookup_stops_without_the_shutdown_delay() {
    // A nameserver that takes queries and never answers.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let config = format!(
        "[listen]\nhttp = \"@HTTP@\"\nhttps = \"\"\nadmin = \"@ADMIN@\"\n\n[proxy]\nshutdown_delay = \"60s\"\n\n\
         [discovery]\nnameservers = [\"{}\"]\n\n[[route]]\nhost = \"*\"\nupstream = \"app\"\n\n\
         [upstream.app]\ndns = \"tasks.app:8080\"\n",
        silent.local_addr().unwrap()
    );
    // Exited within the 20 s it is given: not after the 60 s shutdown_delay.
    let (code, logs) = Gateway::builder(&config)
        .signal_after("TERM", Duration::from_millis(800))
        .run_to_exit(Duration::from_secs(20))
        .await;
    assert_eq!(code, Some(0), "{logs}");
    assert!(logs.contains("swarmgate is serving"), "signalled after start-up: {logs}");
    assert!(logs.contains("stopped before serving"), "{logs}");
    drop(silent);
}
