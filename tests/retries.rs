//! When a request may go to another server (SPEC: nothing of it reached the first one,
//! or it is idempotent and no response byte came back), and the message framings that
//! must survive the trip: HEAD, 204/304, Expect: 100-continue.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashSet;
use std::time::Duration;

use support::*;
use tokio::io::AsyncWriteExt;

const CONFIG: &str = r#"
[listen]
http = "@HTTP@"
https = ""
admin = "@ADMIN@"

[limits]
retry_body_bytes = 1024

[[route]]
host = "*"
upstream = "app"

[upstream.app]
servers = [@SERVERS@]
retries = @RETRIES@
"#;

async fn gateway(servers: &[std::net::SocketAddr], retries: u32) -> Gateway {
    let list: Vec<String> = servers.iter().map(|a| format!("\"{a}\"")).collect();
    Gateway::builder(CONFIG).var("SERVERS", list.join(", ")).var("RETRIES", retries).start().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_requests_are_retried_when_no_response_came() {
    let good = Backend::start("good").await;
    let broken = Broken::start().await;
    let gw = gateway(&[good.addr, broken.addr], 2).await;
    let mut c = H1::connect(gw.http).await;
    for i in 0..30 {
        let r = c.get("app.test", &format!("/get/{i}")).await;
        assert_eq!(r.status, 200, "GET {i}: {}", r.text());
        assert_eq!(r.text(), "good");
        // PUT and DELETE are idempotent too; a small body is held for the replay.
        let r =
            c.send(req("PUT", "app.test", &format!("/put/{i}")).body(full(format!("put {i}"))).unwrap()).await.unwrap();
        assert_eq!(r.status, 200, "PUT {i}");
    }
    assert!(broken.hits() >= 1, "the broken server was never picked");
    assert_eq!(good.hits(), 60, "each request reached the good server exactly once");
    let puts: Vec<Recorded> = good.requests().into_iter().filter(|r| r.method == "PUT").collect();
    for (i, p) in puts.iter().enumerate() {
        assert_eq!(p.uri, format!("/put/{i}"));
        assert_eq!(&p.body[..], format!("put {i}").as_bytes(), "replayed body differs");
    }
    let retries = gw.metric("swarmgate_retries_total").await.unwrap();
    assert_eq!(retries as usize, broken.hits());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_that_reached_a_server_is_never_sent_again() {
    let good = Backend::start("good").await;
    let broken = Broken::start().await;
    let gw = gateway(&[good.addr, broken.addr], 2).await;
    let mut failed = Vec::new();
    for i in 0..40 {
        let r = send(gw.http, req("POST", "app.test", "/post").body(full(format!("id-{i:02}"))).unwrap()).await;
        match r.status {
            200 => {}
            502 => {
                assert_eq!(r.text(), "502 upstream failed\n");
                failed.push(format!("id-{i:02}"));
            }
            s => panic!("POST {i}: status {s}"),
        }
    }
    assert!(!failed.is_empty(), "the broken server was never picked");
    assert_eq!(failed.len(), broken.hits(), "every POST the broken server got failed");
    // The broken server saw exactly the failed ones; the good one never saw them.
    let at_broken: HashSet<String> = broken
        .seen()
        .iter()
        .map(|raw| String::from_utf8_lossy(raw).rsplit("\r\n\r\n").next().unwrap().to_string())
        .collect();
    assert_eq!(at_broken, failed.iter().cloned().collect::<HashSet<_>>());
    let at_good: Vec<String> = good.requests().iter().map(|r| String::from_utf8_lossy(&r.body).into_owned()).collect();
    assert_eq!(at_good.len() + failed.len(), 40);
    assert!(at_good.iter().all(|b| !failed.contains(b)), "a POST was sent twice");
    assert_eq!(gw.metric("swarmgate_retries_total").await, Some(0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_too_large_to_hold_is_not_replayed() {
    let good = Backend::start("good").await;
    let broken = Broken::start().await;
    let gw = gateway(&[good.addr, broken.addr], 2).await;
    let big = "x".repeat(100 * 1024);
    let mut statuses = Vec::new();
    for _ in 0..30 {
        if broken.hits() > 0 {
            break;
        }
        let r = send(gw.http, req("PUT", "app.test", "/big").body(full(big.clone())).unwrap()).await;
        statuses.push(r.status);
    }
    assert!(broken.hits() > 0, "the broken server was never picked");
    // The PUT that met the broken server could not be replayed: 502.
    assert_eq!(statuses.last(), Some(&502), "{statuses:?}");
    assert!(statuses[..statuses.len() - 1].iter().all(|s| *s == 200), "{statuses:?}");
    assert!(good.requests().iter().all(|r| r.body.len() == big.len()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_zero_means_one_attempt() {
    let broken = Broken::start().await;
    let good = Backend::start("good").await;
    let gw = gateway(&[broken.addr, good.addr], 0).await;
    let mut saw_502 = false;
    for _ in 0..30 {
        let r = get(gw.http, "app.test", "/").await;
        match r.status {
            200 => {}
            502 => saw_502 = true,
            s => panic!("status {s}"),
        }
        if saw_502 {
            break;
        }
    }
    assert!(saw_502, "with retries = 0 a GET to the broken server must fail");
    assert_eq!(gw.metric("swarmgate_retries_total").await, Some(0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_204_and_304_keep_connections_in_step() {
    let b = Backend::start("app").await;
    let gw = gateway(&[b.addr], 2).await;
    let mut c = H1::connect(gw.http).await;
    for _ in 0..5 {
        let r = c.send(req("HEAD", "app.test", "/").body(empty()).unwrap()).await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-length"), Some("3"));
        assert!(r.body.is_empty());
        let r = c.get("app.test", "/status?code=204").await;
        assert_eq!(r.status, 204);
        assert!(r.body.is_empty());
        let r = c.get("app.test", "/status?code=304").await;
        assert_eq!(r.status, 304);
        assert!(r.body.is_empty());
        let r = c.get("app.test", "/").await;
        assert_eq!((r.status, r.text().as_str()), (200, "app"));
    }
    assert_eq!(b.hits(), 20);
    // One upstream connection carried them all, returned to the pool after each.
    let v: serde_json::Value = serde_json::from_slice(&gw.admin_get("/upstreams").await.body).unwrap();
    assert_eq!(v["upstreams"][0]["servers"][0]["idle_connections"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_is_answered_by_the_gateway() {
    let b = Backend::start("app").await;
    let gw = gateway(&[b.addr], 2).await;
    let mut s = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    s.write_all(
        b"POST /upload HTTP/1.1\r\nHost: app.test\r\nContent-Length: 11\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let (first, _) = read_until_close(&mut s, Duration::from_millis(1000)).await;
    assert!(first.starts_with(b"HTTP/1.1 100 Continue\r\n\r\n"), "{}", String::from_utf8_lossy(&first));
    s.write_all(b"hello world").await.unwrap();
    let (rest, closed) = read_until_close(&mut s, Duration::from_secs(3)).await;
    assert!(closed);
    assert_eq!(raw_status(&rest), Some(200), "{}", String::from_utf8_lossy(&rest));
    let seen = b.last();
    assert_eq!(&seen.body[..], b"hello world");
    assert!(!seen.has("expect"), "{:?}", seen.headers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_form_authority_wins_over_host() {
    let b = Backend::start("app").await;
    let gw = gateway(&[b.addr], 2).await;
    let (raw, _) = raw_exchange(
        gw.http,
        b"GET http://real.test:8080/p?q=1 HTTP/1.1\r\nHost: other.test\r\nConnection: close\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    assert_eq!(raw_status(&raw), Some(200), "{}", String::from_utf8_lossy(&raw));
    let seen = b.last();
    assert_eq!(seen.uri, "/p?q=1");
    assert_eq!(seen.header_all("host"), ["real.test:8080"]);
    assert_eq!(seen.header("x-forwarded-host"), Some("real.test:8080"));
    assert_eq!(seen.header("x-forwarded-port"), Some("8080"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order() {
    let b = Backend::start("app").await;
    let gw = gateway(&[b.addr], 2).await;
    let (raw, closed) = raw_exchange(
        gw.http,
        b"GET /sleep?ms=200 HTTP/1.1\r\nHost: app.test\r\n\r\n\
POST /echo HTTP/1.1\r\nHost: app.test\r\nContent-Length: 6\r\n\r\nsecond\
GET /third HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    assert!(closed);
    let text = String::from_utf8_lossy(&raw).into_owned();
    assert_eq!(raw_response_count(&raw), 3, "{text}");
    let first = text.find("\r\n\r\napp").expect("first answer");
    let second = text.find("\r\n\r\nsecond").expect("second answer");
    let third = text.rfind("\r\n\r\napp").expect("third answer");
    assert!(first < second && second < third, "{text}");
    let uris: Vec<String> = b.requests().into_iter().map(|r| r.uri).collect();
    assert_eq!(uris, ["/sleep?ms=200", "/echo", "/third"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_server_does_not_flood_the_log() {
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let gw = gateway(&[dead], 0).await;
    let mut c = H1::connect(gw.http).await;
    for i in 0..200 {
        let r = c.get("app.test", &format!("/{i}")).await;
        assert_eq!(r.status, 502, "request {i}: {}", r.text());
    }
    let logs = gw.logs();
    let failed = |l: &&str| l.contains("request failed") && l.contains("Connection refused");
    let warned = logs.lines().filter(failed).filter(|l| l.contains("WARN")).count();
    let all = logs.lines().filter(failed).count();
    // One warning a second at most (the requests may straddle a second or two), every
    // one at debug: none is lost.
    assert!((1..=3).contains(&warned), "{warned} warnings for 200 failed requests");
    assert_eq!(all, 200, "each failed request is logged once, at warn or debug");
    assert_eq!(gw.metric(r#"swarmgate_responses_total{route="*/",upstream="app",status="502"}"#).await, Some(200.0));
}

/// Replicas that died before the config or DNS caught up refuse connections: each such
/// attempt sent nothing and waited for nothing, so it does not count against `retries`,
/// and however many of them a request meets first, it reaches the live server. (Ejection
/// takes each dead one out after its first refusal; the first requests meet them all.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connects_do_not_use_up_the_retries() {
    let live = Backend::start("live").await;
    let listeners: Vec<std::net::TcpListener> =
        (0..30).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    let mut servers: Vec<std::net::SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    drop(listeners); // every one of these ports refuses from now on
    servers.push(live.addr);
    let gw = gateway(&servers, 1).await;
    let mut c = H1::connect(gw.http).await;
    for i in 0..10 {
        let r = c.send(req("POST", "app.test", &format!("/post/{i}")).body(full("once")).unwrap()).await.unwrap();
        assert_eq!(r.status, 200, "POST {i}: {}", r.text());
    }
    assert_eq!(live.hits(), 10);
    let refused = gw.metric(r#"swarmgate_upstream_connect_errors_total{upstream="app"}"#).await.unwrap_or(0.0);
    assert!(refused >= 2.0, "the dead servers were met first: {refused} refused connects");
}
