//! Graceful shutdown, as a load balancer and its clients see it: `/readyz` turns 503 at
//! once, listeners stay open for `shutdown_delay`, keep-alive clients get
//! `Connection: close` on their last response, HTTP/2 clients get GOAWAY, requests and
//! tunnels in flight get up to `drain_timeout`, and the process exits 0.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use support::{Backend, Gateway, TlsOpts};
use tokio_tungstenite::tungstenite::Message;

fn config(backend: &Backend, delay: &str, drain: &str) -> String {
    format!(
        r#"
[listen]
http = "@HTTP@"
https = "@HTTPS@"
admin = "@ADMIN@"

[proxy]
redirect_https = false
shutdown_delay = "{delay}"
drain_timeout = "{drain}"

[tls]
certs_dir = "@DIR@/certs"

[[route]]
host = "app.test"
path = "/"
upstream = "app"

[upstream.app]
servers = ["{}"]
"#,
        backend.addr
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_politely_and_exits_zero() {
    let backend = Backend::start("app").await;
    let mut gw = Gateway::start(&config(&backend, "1s", "10s")).await;

    // A kept-alive HTTP/1.1 client and an HTTP/2 client, both with a request in flight.
    let mut h1 = support::H1::connect(gw.http).await;
    assert_eq!(h1.get("app.test", "/").await.status, 200);
    let (tls, info) = support::tls_connect(gw.https, &TlsOpts::sni("app.test").alpn(&[b"h2"])).await.unwrap();
    assert_eq!(info.alpn.as_deref(), Some(&b"h2"[..]));
    let mut h2 = support::H2::over(tls).await;
    assert_eq!(h2.get("app.test", "/").await.status, 200);

    let h1_slow = tokio::spawn(async move {
        let r = h1.get("app.test", "/sleep?ms=2000").await;
        (r, h1)
    });
    let mut h2_sender = h2.sender.clone();
    let h2_slow = tokio::spawn(async move {
        let req = support::req2("GET", "app.test", "/sleep?ms=2000").body(support::empty()).unwrap();
        h2_sender.ready().await.unwrap();
        let resp = h2_sender.send_request(req).await.unwrap();
        support::collect(resp).await.unwrap()
    });
    tokio::time::sleep(Duration::from_millis(200)).await;

    let term_at = Instant::now();
    gw.signal("TERM");
    // Readiness turns at once (within 500 ms: the signal is handled asynchronously); the
    // listeners still take new clients during the delay.
    loop {
        let ready = gw.admin_get("/readyz").await.status;
        if ready == 503 {
            break;
        }
        assert!(term_at.elapsed() < Duration::from_millis(500), "/readyz still {ready} 500 ms after SIGTERM");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(support::get(gw.http, "app.test", "/").await.status, 200, "listener closed before shutdown_delay");

    // After the delay: no new connections.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert!(tokio::net::TcpStream::connect(gw.http).await.is_err(), "listener still open after shutdown_delay");
    // HTTP/2: GOAWAY means no new stream on this connection.
    let refused = tokio::time::timeout(
        Duration::from_secs(2),
        h2.send(support::req2("GET", "app.test", "/").body(support::empty()).unwrap()),
    )
    .await;
    assert!(!matches!(refused, Ok(Ok(ref r)) if r.status == 200), "a new stream was served after GOAWAY");

    // Requests in flight finish, the HTTP/1.1 one told to close its connection.
    let (r1, h1) = h1_slow.await.unwrap();
    assert_eq!(r1.status, 200);
    assert_eq!(r1.header("connection"), Some("close"), "the last keep-alive response must say Connection: close");
    let r2 = h2_slow.await.unwrap();
    assert_eq!(r2.status, 200);
    assert!(support::wait_until(Duration::from_secs(2), || h1.is_closed()).await, "keep-alive connection not closed");

    let status = gw.wait_exit(Duration::from_secs(5)).await.expect("gateway did not exit");
    assert_eq!(status.code(), Some(0));
    let took = term_at.elapsed();
    assert!(took < Duration::from_secs(5), "exit took {took:?}: it should not wait for drain_timeout when idle");
}

/// What a raw keep-alive client saw of its requests until its connection ended: answers,
/// whether the last said `Connection: close`, and whether a request went unanswered.
#[derive(Debug, Default)]
struct Seen {
    answered: usize,
    told_close: bool,
    lost: Option<String>,
}

/// Sends requests one after another on one connection (a POST with a body every other
/// one, which hyper's session serves), a few milliseconds apart, until the gateway ends
/// the connection.
async fn one_after_another(addr: std::net::SocketAddr) -> Seen {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut seen = Seen::default();
    let mut buf = Vec::new();
    for i in 0.. {
        let req = if i % 2 == 0 {
            "GET / HTTP/1.1\r\nHost: app.test\r\n\r\n".to_string()
        } else {
            "POST /echo HTTP/1.1\r\nHost: app.test\r\nContent-Length: 5\r\n\r\nhello".to_string()
        };
        if let Err(e) = c.write_all(req.as_bytes()).await {
            seen.lost = Some(format!("request {i} not written: {e}"));
            return seen;
        }
        // One whole response: its head, then Content-Length bytes.
        buf.clear();
        let mut chunk = [0u8; 4096];
        let (head_end, length) = loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let length = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .map_or(0, |v| v.trim().parse::<usize>().unwrap());
                seen.told_close = head.lines().any(|l| l == "connection: close");
                break (end + 4, length);
            }
            match c.read(&mut chunk).await {
                Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                other => {
                    seen.lost = Some(format!("request {i} unanswered: {other:?}"));
                    return seen;
                }
            }
        };
        while buf.len() < head_end + length {
            match c.read(&mut chunk).await {
                Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                other => {
                    seen.lost = Some(format!("request {i}'s body cut: {other:?}"));
                    return seen;
                }
            }
        }
        seen.answered += 1;
        if seen.told_close {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    seen
}

/// Keep-alive clients sending requests one after another (clients that never look at
/// `/readyz`, such as those reaching a stopping task through Swarm's routing mesh) lose
/// none at shutdown: an idle connection is not closed under a request about to arrive,
/// but given a moment for it, and that request is answered with `Connection: close`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_clients_sending_one_request_after_another_lose_none_at_shutdown() {
    let backend = Backend::start("app").await;
    let mut gw = Gateway::start(&config(&backend, "0s", "5s")).await;
    let clients: Vec<_> = (0..8).map(|_| tokio::spawn(one_after_another(gw.http))).collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    gw.signal("TERM");
    for (i, c) in clients.into_iter().enumerate() {
        let seen = c.await.unwrap();
        assert!(seen.lost.is_none() && seen.told_close, "client {i}: {seen:?}\n{}", gw.logs());
        assert!(seen.answered > 10, "client {i}: {seen:?}");
    }
    let status = gw.wait_exit(Duration::from_secs(5)).await.expect("gateway did not exit");
    assert_eq!(status.code(), Some(0));
}

/// An HTTP/2 client with no stream open that never answers the shutdown's GOAWAY (its
/// PING) does not hold the exit up until `drain_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_h2_client_does_not_hold_the_exit_up() {
    use tokio::io::AsyncWriteExt;
    let backend = Backend::start("app").await;
    let mut gw = Gateway::start(&config(&backend, "0s", "30s")).await;
    let (mut tls, info) = support::tls_connect(gw.https, &TlsOpts::sni("app.test").alpn(&[b"h2"])).await.unwrap();
    assert_eq!(info.alpn.as_deref(), Some(&b"h2"[..]));
    // The preface and an empty SETTINGS frame; then nothing, and nothing read.
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let term_at = Instant::now();
    gw.signal("TERM");
    let status = gw.wait_exit(Duration::from_secs(20)).await.expect("gateway did not exit before drain_timeout");
    assert_eq!(status.code(), Some(0));
    let took = term_at.elapsed();
    assert!(took < Duration::from_secs(10), "exit took {took:?}");
    drop(tls);
}

#[tokio::test]
async fn drain_timeout_bounds_the_wait() {
    let backend = Backend::start("app").await;
    let mut gw = Gateway::start(&config(&backend, "0s", "1s")).await;
    let addr = gw.http;
    let stuck = tokio::spawn(async move {
        let mut c = support::H1::connect(addr).await;
        c.send(support::req("GET", "app.test", "/sleep?ms=30000").body(support::empty()).unwrap()).await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let term_at = Instant::now();
    gw.signal("TERM");
    let status = gw.wait_exit(Duration::from_secs(10)).await.expect("gateway did not exit");
    let took = term_at.elapsed();
    assert_eq!(status.code(), Some(0));
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "exit after {took:?}, drain_timeout is 1s"
    );
    assert!(stuck.await.unwrap().is_err(), "the stuck request cannot have completed");
    assert!(gw.logs().contains("drain_timeout reached"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_websocket_gets_drain_timeout() {
    let backend = Backend::start("app").await;
    let mut gw = Gateway::start(&config(&backend, "0s", "2s")).await;
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(format!("ws://{}/ws", gw.http))
            .unwrap();
    request.headers_mut().insert("host", "app.test".parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let term_at = Instant::now();
    gw.signal("TERM");
    tokio::time::sleep(Duration::from_millis(800)).await;
    ws.send(Message::Text("still here".into())).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::Text("still here".into()),
        "tunnel cut before drain_timeout"
    );
    let status = gw.wait_exit(Duration::from_secs(10)).await.expect("gateway did not exit");
    assert_eq!(status.code(), Some(0));
    let took = term_at.elapsed();
    assert!(took >= Duration::from_millis(1800), "the tunnel was not given drain_timeout: exit after {took:?}");
    assert!(took < Duration::from_secs(5), "exit after {took:?}");
}
