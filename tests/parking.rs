//! Parked HTTP/1.1 connections: after 250 ms of idleness the gateway lets go of a
//! kept-alive connection's buffers and serving task (a hyper session is ended without a
//! byte on the wire), keeps the socket in a small task of its own, and serves the next
//! request from its first byte. To the client nothing changes. Idle
//! upstream connections are bare sockets from the start: kept, reused after idling, and
//! let go of when their server closes them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

const CONFIG: &str = r#"
[listen]
http = "@HTTP@"
https = "@HTTPS@"
admin = "@ADMIN@"

[proxy]
shutdown_delay = "0s"
redirect_https = false

[tls]
certs_dir = "certs"

[limits]
header_read_timeout = "1s"
idle_timeout = "30s"

[[route]]
host = "*"
upstream = "app"

[upstream.app]
servers = ["@B@"]
"#;

/// Longer than the gateway's park delay (250 ms).
const IDLE: Duration = Duration::from_millis(800);

async fn setup() -> (Gateway, Backend) {
    let (gw, b, _) = setup_tls().await;
    (gw, b)
}

async fn setup_tls() -> (Gateway, Backend, Pki) {
    let pki = Pki::new();
    let (crt, key) = pki.leaf(&["app.test"]);
    let b = Backend::start("app").await;
    let gw =
        Gateway::builder(CONFIG).var("B", b.addr).file("certs/app.crt", crt).file("certs/app.key", key).start().await;
    (gw, b, pki)
}

async fn parked(gw: &Gateway) -> f64 {
    gw.metric("swarmgate_connections_parked_total").await.unwrap_or(0.0)
}

/// Reads responses until `n` have arrived (each framed by Content-Length) or 5 s passed.
async fn read_responses(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while raw_response_count(&buf) < n {
        let mut chunk = [0u8; 4096];
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut chunk)).await {
            Ok(Ok(0)) | Err(_) => break,
            Ok(Ok(k)) => buf.extend_from_slice(&chunk[..k]),
            Ok(Err(e)) => panic!("read failed: {e}"),
        }
    }
    buf
}

const GET: &[u8] = b"GET /a HTTP/1.1\r\nHost: app.test\r\n\r\n";

/// A connection that served one request (`GET /a`) and has been parked since.
async fn parked_connection(gw: &Gateway) -> TcpStream {
    let mut s = TcpStream::connect(gw.http).await.unwrap();
    s.write_all(GET).await.unwrap();
    assert_eq!(raw_status(&read_responses(&mut s, 1).await), Some(200));
    tokio::time::sleep(IDLE).await;
    assert_eq!(parked(gw).await, 1.0, "an idle connection was not parked");
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_parked_and_serves_its_next_request() {
    let (gw, b) = setup().await;
    let mut s = TcpStream::connect(gw.http).await.unwrap();
    s.write_all(GET).await.unwrap();
    assert_eq!(raw_status(&read_responses(&mut s, 1).await), Some(200));
    tokio::time::sleep(IDLE).await;
    assert_eq!(parked(&gw).await, 1.0, "an idle connection was not parked");
    for _ in 0..3 {
        s.write_all(GET).await.unwrap();
        let raw = read_responses(&mut s, 1).await;
        assert_eq!(raw_status(&raw), Some(200), "{}", String::from_utf8_lossy(&raw));
    }
    assert_eq!(b.requests().len(), 4);
    // Parked again after the second round of requests, on the same socket.
    tokio::time::sleep(IDLE).await;
    assert_eq!(parked(&gw).await, 2.0);
    s.write_all(GET).await.unwrap();
    assert_eq!(raw_status(&read_responses(&mut s, 1).await), Some(200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_and_split_heads_after_parking_are_served_in_order() {
    let (gw, b) = setup().await;
    let mut s = parked_connection(&gw).await;
    // Two requests in one write: the first byte wakes the parked connection, the rest
    // (the second head included) must reach the new session.
    s.write_all(b"GET /one HTTP/1.1\r\nHost: app.test\r\n\r\nGET /two HTTP/1.1\r\nHost: app.test\r\n\r\n")
        .await
        .unwrap();
    let raw = read_responses(&mut s, 2).await;
    assert_eq!(raw_response_count(&raw), 2, "{}", String::from_utf8_lossy(&raw));
    tokio::time::sleep(IDLE).await;
    // A head split across writes, its first part arriving at a parked connection.
    s.write_all(b"GET /three HT").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.write_all(b"TP/1.1\r\nHost: app.test\r\n\r\n").await.unwrap();
    let raw = read_responses(&mut s, 1).await;
    assert_eq!(raw_status(&raw), Some(200), "{}", String::from_utf8_lossy(&raw));
    // A request with the start of the next one behind it: the partial head is kept while
    // the first request is answered, is not parked, and the rest completes it.
    tokio::time::sleep(IDLE).await;
    s.write_all(b"GET /four HTTP/1.1\r\nHost: app.test\r\n\r\nGET /fi").await.unwrap();
    assert_eq!(raw_status(&read_responses(&mut s, 1).await), Some(200));
    let before = parked(&gw).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(parked(&gw).await, before, "parked with part of a head read");
    s.write_all(b"ve HTTP/1.1\r\nHost: app.test\r\n\r\n").await.unwrap();
    let raw = read_responses(&mut s, 1).await;
    assert_eq!(raw_status(&raw), Some(200), "{}", String::from_utf8_lossy(&raw));
    let paths: Vec<String> = b.requests().iter().map(|r| r.uri.clone()).collect();
    assert_eq!(paths, ["/a", "/one", "/two", "/three", "/four", "/five"]);
    // Such a head has `header_read_timeout` (1 s here) from its first byte, like any other.
    s.write_all(b"GET /six HTTP/1.1\r\nHost: app.test\r\n\r\nGET /se").await.unwrap();
    assert_eq!(raw_status(&read_responses(&mut s, 1).await), Some(200));
    let (_, closed) = read_until_close(&mut s, Duration::from_secs(3)).await;
    assert!(closed, "a pipelined head left unfinished was not timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_head_on_a_parked_connection_still_times_out() {
    let (gw, _b) = setup().await;
    let mut s = parked_connection(&gw).await;
    s.write_all(b"GET / HT").await.unwrap();
    let t0 = Instant::now();
    let (_, closed) = read_until_close(&mut s, Duration::from_secs(5)).await;
    assert!(closed, "a head that never completes kept its parked connection open");
    assert!(t0.elapsed() < Duration::from_secs(4), "closed after {:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_asked_to_close_is_closed_not_parked() {
    let (gw, _b) = setup().await;
    let mut s = TcpStream::connect(gw.http).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n").await.unwrap();
    let (raw, closed) = read_until_close(&mut s, Duration::from_secs(3)).await;
    assert_eq!(raw_status(&raw), Some(200));
    assert!(closed, "Connection: close was not honoured");
    tokio::time::sleep(IDLE).await;
    assert_eq!(parked(&gw).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_upgrade_on_a_parked_connection_works() {
    let (gw, _b) = setup().await;
    let s = parked_connection(&gw).await;
    let (mut ws, resp) = tokio_tungstenite::client_async("ws://app.test/ws", s).await.unwrap();
    assert_eq!(resp.status(), 101);
    ws.send(Message::text("after parking")).await.unwrap();
    let back = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.expect("echo in time");
    assert_eq!(back.unwrap().unwrap(), Message::text("after parking"));
    // An open tunnel is not an idle connection: nothing is parked under it.
    tokio::time::sleep(IDLE).await;
    ws.send(Message::text("still there")).await.unwrap();
    let back = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.expect("echo in time");
    assert_eq!(back.unwrap().unwrap(), Message::text("still there"));
    ws.close(None).await.unwrap();
}

/// A request hyper served (one with a body) ends in a parked connection too, and a head
/// that came behind it is served before any parking.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_parks_after_a_hyper_session_and_keeps_what_came_behind_it() {
    let (gw, b) = setup().await;
    let mut s = TcpStream::connect(gw.http).await.unwrap();
    let post = b"POST /p HTTP/1.1\r\nHost: app.test\r\nContent-Length: 5\r\n\r\nhello";
    s.write_all(post).await.unwrap();
    assert_eq!(raw_status(&read_responses(&mut s, 1).await), Some(200));
    tokio::time::sleep(IDLE).await;
    assert_eq!(parked(&gw).await, 1.0, "not parked after a hyper session");
    s.write_all(GET).await.unwrap();
    assert_eq!(raw_status(&read_responses(&mut s, 1).await), Some(200));
    // A POST with a GET and the start of another right behind it, in one write: hyper
    // serves the POST, hands back the rest, and both GETs are answered in order.
    tokio::time::sleep(IDLE).await;
    let mut burst = post.to_vec();
    burst.extend_from_slice(b"GET /after HTTP/1.1\r\nHost: app.test\r\n\r\nGET /la");
    s.write_all(&burst).await.unwrap();
    let raw = read_responses(&mut s, 2).await;
    assert_eq!(raw_response_count(&raw), 2, "{}", String::from_utf8_lossy(&raw));
    // Longer than the park delay, shorter than header_read_timeout (1 s): the session
    // idles out holding the partial head, which must not be lost or parked on.
    let before = parked(&gw).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.write_all(b"st HTTP/1.1\r\nHost: app.test\r\n\r\n").await.unwrap();
    assert_eq!(raw_status(&read_responses(&mut s, 1).await), Some(200));
    assert_eq!(parked(&gw).await, before, "parked with part of a head read");
    let paths: Vec<String> = b.requests().iter().map(|r| r.uri.clone()).collect();
    assert_eq!(paths, ["/p", "/a", "/p", "/after", "/last"]);
}

/// A parked connection keeps its idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_connection_is_closed_at_its_idle_timeout() {
    let b = Backend::start("app").await;
    let gw = Gateway::builder(&CONFIG.replace(r#"idle_timeout = "30s""#, r#"idle_timeout = "2s""#))
        .var("B", b.addr)
        .start()
        .await;
    let mut s = TcpStream::connect(gw.http).await.unwrap();
    s.write_all(GET).await.unwrap();
    assert_eq!(raw_status(&read_responses(&mut s, 1).await), Some(200));
    let answered = Instant::now();
    tokio::time::sleep(IDLE).await;
    assert_eq!(parked(&gw).await, 1.0, "an idle connection was not parked");
    let (bytes, closed) = read_until_close(&mut s, Duration::from_secs(5)).await;
    let took = answered.elapsed();
    assert!(bytes.is_empty() && closed, "not closed: {}", String::from_utf8_lossy(&bytes));
    assert!(took >= Duration::from_millis(1900) && took < Duration::from_millis(3500), "closed after {took:?}");
    assert_eq!(gw.metric("swarmgate_open_connections").await, Some(0.0));
}

/// A parked connection still holds its `max_connections` permit, and gives it back when
/// it closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_connection_holds_its_permit_until_it_closes() {
    let b = Backend::start("app").await;
    let gw =
        Gateway::builder(&CONFIG.replace("[limits]", "[limits]\nmax_connections = 1")).var("B", b.addr).start().await;
    let mut first = TcpStream::connect(gw.http).await.unwrap();
    first.write_all(GET).await.unwrap();
    assert_eq!(raw_status(&read_responses(&mut first, 1).await), Some(200));
    tokio::time::sleep(IDLE).await;
    assert_eq!(parked(&gw).await, 1.0, "an idle connection was not parked");
    assert_eq!(gw.metric("swarmgate_open_connections").await, Some(1.0));
    // The limit is reached: a second connection waits for a place...
    let mut second = TcpStream::connect(gw.http).await.unwrap();
    second.write_all(b"GET /second HTTP/1.1\r\nHost: app.test\r\n\r\n").await.unwrap();
    let early = tokio::time::timeout(Duration::from_secs(1), second.read(&mut [0u8; 1])).await;
    assert!(early.is_err(), "served past max_connections: {early:?}");
    // ...the parked one still answers...
    first.write_all(GET).await.unwrap();
    assert_eq!(raw_status(&read_responses(&mut first, 1).await), Some(200));
    // ...and once it is gone, the waiting one is served.
    drop(first);
    assert_eq!(raw_status(&read_responses(&mut second, 1).await), Some(200));
    assert_eq!(b.last().uri, "/second");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_parked_connections_at_once() {
    let (gw, _b) = setup().await;
    let mut s = parked_connection(&gw).await;
    gw.signal("TERM");
    let t0 = Instant::now();
    let (_, closed) = read_until_close(&mut s, Duration::from_secs(10)).await;
    assert!(closed, "a parked connection outlived shutdown");
    assert!(t0.elapsed() < Duration::from_secs(8), "closed after {:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_https_connection_is_parked_and_keeps_its_tls_session() {
    let (gw, b, pki) = setup_tls().await;
    let (tls, info) = tls_connect(gw.https, &TlsOpts::sni("app.test").verified(&pki)).await.unwrap();
    assert_eq!(info.alpn.as_deref(), Some(&b"http/1.1"[..]));
    let mut h1 = H1::over(tls).await;
    assert_eq!(h1.get("app.test", "/a").await.status, 200);
    tokio::time::sleep(IDLE).await;
    assert_eq!(parked(&gw).await, 1.0, "an idle HTTPS connection was not parked");
    // Same TLS connection, no new handshake: the session survived the parking.
    let handshakes = gw.metric("swarmgate_tls_handshakes_total").await;
    assert_eq!(h1.get("app.test", "/b").await.status, 200);
    assert_eq!(h1.get("app.test", "/c").await.status, 200);
    assert!(!h1.is_closed());
    assert_eq!(gw.metric("swarmgate_tls_handshakes_total").await, handshakes);
    assert_eq!(b.requests().len(), 3);
}

/// Idle upstream connections of the only server, from the admin API.
async fn upstream_idle(gw: &Gateway) -> u64 {
    let v: serde_json::Value = serde_json::from_slice(&gw.admin_get("/upstreams").await.body).unwrap();
    v["upstreams"][0]["servers"][0]["idle_connections"].as_u64().unwrap()
}

/// Waits (up to 5 s) until the server's pool holds `want` idle connections.
async fn wait_for_pool(gw: &Gateway, want: u64, what: &str) {
    let start = Instant::now();
    loop {
        let seen = upstream_idle(gw).await;
        if seen == want {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "{what}: {seen} idle, not {want}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_upstream_connection_is_reused_by_the_next_request() {
    let (gw, b) = setup().await;
    // One client connection: its requests are served by one worker, whose pool shard
    // holds the upstream connection.
    let mut c = H1::connect(gw.http).await;
    assert_eq!(c.get("app.test", "/").await.status, 200);
    wait_for_pool(&gw, 1, "pooled after the response").await;
    tokio::time::sleep(IDLE).await;
    // The idle socket carries the next requests: the server sees no new connection.
    for _ in 0..3 {
        let r = c.get("app.test", "/").await;
        assert_eq!((r.status, r.text().as_str()), (200, "app"));
    }
    assert_eq!(b.hits(), 4);
    assert_eq!(b.connections(), 1, "the idle connection was not reused");
    wait_for_pool(&gw, 1, "back in the pool").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_upstream_connection_the_server_closed_is_not_used() {
    // A server that closes each connection 2.5 s after answering on it.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = std::sync::Arc::clone(&accepted);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await.unwrap();
                tokio::time::sleep(Duration::from_millis(2500)).await;
            });
        }
    });
    let pki = Pki::new();
    let (crt, key) = pki.leaf(&["app.test"]);
    let gw =
        Gateway::builder(CONFIG).var("B", addr).file("certs/app.crt", crt).file("certs/app.key", key).start().await;
    let mut c = H1::connect(gw.http).await;
    assert_eq!(c.get("app.test", "/").await.text(), "ok");
    wait_for_pool(&gw, 1, "pooled after the response").await;
    // Closed by the server while idle: let go of without waiting for a request...
    wait_for_pool(&gw, 0, "an idle socket the server closed").await;
    // ...and the next request gets a new connection.
    let r = c.get("app.test", "/").await;
    assert_eq!((r.status, r.text().as_str()), (200, "ok"));
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
}
