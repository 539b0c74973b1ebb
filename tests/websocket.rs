//! WebSocket tunnels: HTTP/1.1 Upgrade over ws and wss, and RFC 8441 extended CONNECT
//! over HTTP/2, all to an HTTP/1.1 server's `/ws` echo.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role;

const CONFIG: &str = r#"
[listen]
http = "@HTTP@"
https = "@HTTPS@"
admin = "@ADMIN@"

[proxy]
redirect_https = false

[tls]
certs_dir = "certs"

[[route]]
host = "ws.test"
upstream = "app"

[[route]]
host = "ws.test"
path = "/chat"
strip_path = true
upstream = "app"

[upstream.app]
servers = ["@B@"]
"#;

async fn setup() -> (Gateway, Backend, Pki) {
    let pki = Pki::new();
    let (crt, key) = pki.leaf(&["ws.test"]);
    let b = Backend::start("app").await;
    let gw =
        Gateway::builder(CONFIG).var("B", b.addr).file("certs/ws.crt", crt).file("certs/ws.key", key).start().await;
    (gw, b, pki)
}

/// Sends a text, a binary and a large message and expects each echoed, then closes.
async fn exchange<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    for msg in [Message::text("hello through the gateway"), Message::binary(vec![0u8, 1, 2, 255]), Message::binary(big)]
    {
        ws.send(msg.clone()).await.unwrap();
        let back = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.expect("echo in time");
        assert_eq!(back.unwrap().unwrap(), msg);
    }
    ws.close(None).await.unwrap();
}

fn assert_upgrade_request(b: &Backend, proto: &str, path: &str) {
    let seen = b.requests().into_iter().rfind(|r| r.header("upgrade").is_some()).expect("upgrade request");
    assert_eq!(seen.method, "GET");
    assert_eq!(seen.uri, path);
    assert_eq!(seen.version, hyper::Version::HTTP_11);
    assert_eq!(seen.header("upgrade").map(str::to_ascii_lowercase).as_deref(), Some("websocket"));
    assert_eq!(seen.header("connection").map(str::to_ascii_lowercase).as_deref(), Some("upgrade"));
    assert_eq!(seen.header("host"), Some("ws.test"));
    assert_eq!(seen.header("x-forwarded-proto"), Some(proto));
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
    assert!(seen.header("sec-websocket-key").is_some_and(|k| k.len() == 24), "{:?}", seen.headers);
    assert_eq!(seen.header("sec-websocket-version"), Some("13"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_over_plain_http() {
    let (gw, b, _) = setup().await;
    let tcp = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    let (mut ws, resp) = tokio_tungstenite::client_async("ws://ws.test/ws?room=1", tcp).await.unwrap();
    assert_eq!(resp.status(), 101);
    assert_eq!(resp.headers().get("x-backend").unwrap(), "app");
    exchange(&mut ws).await;
    assert_upgrade_request(&b, "http", "/ws?room=1");
    // With strip_path the server gets the stripped path.
    let tcp = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async("ws://ws.test/chat/ws", tcp).await.unwrap();
    exchange(&mut ws).await;
    assert_upgrade_request(&b, "http", "/ws");
    let m = gw.metrics().await;
    assert_eq!(metric_value(&m, "swarmgate_upgrades_total"), Some(2.0), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_over_https_http11() {
    let (gw, b, pki) = setup().await;
    let (tls, info) = tls_connect(gw.https, &TlsOpts::sni("ws.test").verified(&pki)).await.unwrap();
    assert_eq!(info.alpn.as_deref(), Some(&b"http/1.1"[..]));
    let (mut ws, resp) = tokio_tungstenite::client_async("wss://ws.test/ws", tls).await.unwrap();
    assert_eq!(resp.status(), 101);
    exchange(&mut ws).await;
    assert_upgrade_request(&b, "https", "/ws");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_upgrade_is_passed_on() {
    let (gw, b, _) = setup().await;
    // The server answers a normal response to an upgrade it does not do.
    let tcp = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    let err = tokio_tungstenite::client_async("ws://ws.test/status?code=403", tcp).await;
    match err {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 403);
            assert_eq!(resp.body().as_deref(), Some(&b"app"[..]));
        }
        other => panic!("expected the server's 403, got {other:?}"),
    }
    assert_eq!(b.hits(), 1);
}

/// An Upgrade request in raw bytes, for `path` on ws.test.
fn raw_upgrade(path: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: ws.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    .into_bytes()
}

/// A WebSocket handshake carrying a body: the server would take the tunnel's first bytes
/// for the body its head announces. Refused, and nothing reaches the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_request_with_a_body_is_400() {
    let (gw, b, _) = setup().await;
    for framing in ["Content-Length: 5\r\n\r\nhello", "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"] {
        let mut request = raw_upgrade("/ws");
        request.truncate(request.len() - 2);
        request.extend_from_slice(framing.as_bytes());
        let (raw, _) = raw_exchange(gw.http, &request, Duration::from_secs(5)).await;
        assert_eq!(raw_status(&raw), Some(400), "{framing}: {}", String::from_utf8_lossy(&raw));
    }
    assert_eq!(b.hits(), 0);
    // With an empty one, the handshake goes through.
    let mut request = raw_upgrade("/ws");
    request.truncate(request.len() - 2);
    request.extend_from_slice(b"Content-Length: 0\r\n\r\n");
    let mut s = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    s.write_all(&request).await.unwrap();
    let (head, _) = read_head(&mut s, Vec::new()).await.expect("an answer");
    assert_eq!(raw_status(&head), Some(101), "{}", String::from_utf8_lossy(&head));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_upgrade_says_the_connection_closes() {
    let (gw, _b, _) = setup().await;
    // The connection ends after a refused upgrade; the answer says so (RFC 9112 9.6).
    let (raw, closed) = raw_exchange(gw.http, &raw_upgrade("/status?code=404"), Duration::from_secs(5)).await;
    let text = String::from_utf8_lossy(&raw).to_ascii_lowercase();
    assert_eq!(raw_status(&raw), Some(404), "{text}");
    assert!(text.contains("\r\nconnection: close\r\n"), "{text}");
    assert!(text.ends_with("\r\n\r\napp"), "{text}");
    assert!(closed, "the connection stays open: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_upgrades_answer_streams() {
    // A server that refuses the upgrade with an answer that starts and never ends (a
    // stream, or a large download): the client gets what has come so far at once, and the
    // gateway holds no more of it than a normal response's body.
    let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = server.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let (mut s, _) = server.accept().await.unwrap();
        let (head, _) = read_until_close_or(&mut s, b"\r\n\r\n").await;
        assert!(head.starts_with(b"GET /feed HTTP/1.1\r\n"), "{}", String::from_utf8_lossy(&head));
        s.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n").await.unwrap();
        let big = vec![b'x'; 1 << 20];
        // 64 MiB more, then it stalls: buffered whole, the answer would never be sent.
        for _ in 0..64 {
            s.write_all(format!("{:x}\r\n", big.len()).as_bytes()).await.unwrap();
            s.write_all(&big).await.unwrap();
            s.write_all(b"\r\n").await.unwrap();
        }
        std::future::pending::<()>().await;
    });
    let pki = Pki::new();
    let (crt, key) = pki.leaf(&["ws.test"]);
    let gw = Gateway::builder(CONFIG).var("B", addr).file("certs/ws.crt", crt).file("certs/ws.key", key).start().await;
    let rss_before = gw.rss_kib();
    let mut c = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    c.write_all(&raw_upgrade("/feed")).await.unwrap();
    let (head, rest) = read_until_close_or(&mut c, b"\r\n\r\n").await;
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200 ok\r\n"), "{head}");
    assert!(head.contains("\r\nconnection: close\r\n"), "{head}");
    // The whole 64 MiB and more passes through while the server never ends its answer.
    let mut got = rest.len() as u64;
    let mut buf = vec![0u8; 256 * 1024];
    while got < (64 << 20) {
        let n = tokio::time::timeout(Duration::from_secs(10), c.read(&mut buf)).await.expect("body in time").unwrap();
        assert!(n > 0, "closed after {got} bytes");
        got += n as u64;
    }
    let grown = gw.rss_kib().saturating_sub(rss_before);
    assert!(grown < 32 * 1024, "RSS grew by {grown} KiB while 64 MiB passed");
    // Its access-log line is written once the answer ends (here, its client goes), with
    // the bytes that went through.
    drop(c);
    let line =
        || gw.logs().lines().find(|l| l.contains("swarmgate::access") && l.contains("path=/feed ")).map(String::from);
    assert!(wait_until(Duration::from_secs(3), || line().is_some()).await, "{}", gw.logs());
    let line = line().unwrap();
    let bytes: u64 = line.split(" bytes=").nth(1).and_then(|b| b.split(' ').next()?.parse().ok()).unwrap();
    assert!(bytes >= got - (1 << 20) && line.contains("complete=false"), "{line}");
    held.abort();
}

/// A request head from `s`, `buffered` first; returns it and what came after it (`None`
/// once the connection ends).
async fn read_head(s: &mut tokio::net::TcpStream, mut buffered: Vec<u8>) -> Option<(Vec<u8>, Vec<u8>)> {
    let mut buf = [0u8; 16 * 1024];
    loop {
        if let Some(i) = buffered.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buffered.split_off(i + 4);
            return Some((buffered, rest));
        }
        match s.read(&mut buf).await {
            Ok(n) if n > 0 => buffered.extend_from_slice(&buf[..n]),
            _ => return None,
        }
    }
}

/// Reads until `end` has been seen; returns the bytes up to and including it, and the rest.
async fn read_until_close_or(s: &mut tokio::net::TcpStream, end: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        if let Some(i) = out.windows(end.len()).position(|w| w == end) {
            let rest = out.split_off(i + end.len());
            return (out, rest);
        }
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await.expect("head in time").unwrap();
        assert!(n > 0, "closed before the head's end: {}", String::from_utf8_lossy(&out));
        out.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc8441_extended_connect_over_h2() {
    let (gw, b, pki) = setup().await;
    let opts = TlsOpts::sni("ws.test").verified(&pki).alpn(&[b"h2"]);
    let (tls, info) = tls_connect(gw.https, &opts).await.unwrap();
    assert_eq!(info.alpn.as_deref(), Some(&b"h2"[..]));
    let mut h2 = H2::over(tls).await;
    // One ordinary request first, so the server's SETTINGS (with
    // SETTINGS_ENABLE_CONNECT_PROTOCOL) have arrived.
    assert_eq!(h2.get("ws.test", "/").await.status, 200);
    let mut req = req2("CONNECT", "ws.test", "/ws?via=h2")
        .header("sec-websocket-version", "13")
        .header("origin", "https://ws.test")
        .header("cookie", "session=1")
        .header("cookie", "theme=dark")
        .body(empty())
        .unwrap();
    req.extensions_mut().insert(hyper::ext::Protocol::from_static("websocket"));
    h2.sender.ready().await.unwrap();
    let mut resp = h2.sender.send_request(req).await.expect("extended CONNECT");
    assert_eq!(resp.status(), 200, "{:?}", resp.headers());
    assert!(resp.headers().get("sec-websocket-accept").is_none());
    let upgraded = hyper::upgrade::on(&mut resp).await.expect("h2 tunnel");
    let mut ws =
        tokio_tungstenite::WebSocketStream::from_raw_socket(hyper_util::rt::TokioIo::new(upgraded), Role::Client, None)
            .await;
    exchange(&mut ws).await;
    assert_upgrade_request(&b, "https", "/ws?via=h2");
    assert_eq!(b.last().header("origin"), Some("https://ws.test"));
    // HTTP/2's several cookie fields go to the HTTP/1.1 server as one (RFC 9113 8.2.3).
    assert_eq!(b.last().header("cookie"), Some("session=1; theme=dark"));
    // The connection still serves ordinary streams.
    assert_eq!(h2.get("ws.test", "/after").await.status, 200);
    // A server that refuses: its answer reaches the client as a response to the CONNECT,
    // and the connection goes on serving.
    let mut req =
        req2("CONNECT", "ws.test", "/status?code=403").header("sec-websocket-version", "13").body(empty()).unwrap();
    req.extensions_mut().insert(hyper::ext::Protocol::from_static("websocket"));
    h2.sender.ready().await.unwrap();
    let refused = collect(h2.sender.send_request(req).await.expect("refused CONNECT")).await.unwrap();
    assert_eq!(refused.status, 403);
    assert_eq!(&refused.body[..], b"app");
    assert!(refused.header("connection").is_none());
    assert_eq!(h2.get("ws.test", "/after-refusal").await.status, 200);
}

/// Every upgrade has an access-log line: a tunnel once it closes, with the status its
/// client got (101; HTTP/2's extended CONNECT, 200) and the bytes the client got through
/// it; a refused one with the server's status; one the gateway cannot carry out with its
/// own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_upgrade_has_an_access_log_line() {
    let (gw, b, pki) = setup().await;
    let tcp = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async("ws://ws.test/ws?via=h1", tcp).await.unwrap();
    exchange(&mut ws).await;
    drop(ws); // the tunnel ends with its connection
    let opts = TlsOpts::sni("ws.test").verified(&pki).alpn(&[b"h2"]);
    let (tls, _) = tls_connect(gw.https, &opts).await.unwrap();
    let mut h2 = H2::over(tls).await;
    assert_eq!(h2.get("ws.test", "/").await.status, 200);
    let mut req = req2("CONNECT", "ws.test", "/ws?via=h2").header("sec-websocket-version", "13").body(empty()).unwrap();
    req.extensions_mut().insert(hyper::ext::Protocol::from_static("websocket"));
    h2.sender.ready().await.unwrap();
    let mut resp = h2.sender.send_request(req).await.unwrap();
    let upgraded = hyper::upgrade::on(&mut resp).await.unwrap();
    let mut ws =
        tokio_tungstenite::WebSocketStream::from_raw_socket(hyper_util::rt::TokioIo::new(upgraded), Role::Client, None)
            .await;
    exchange(&mut ws).await;
    drop((ws, resp, h2));
    let tcp = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    assert!(tokio_tungstenite::client_async("ws://ws.test/status?code=403", tcp).await.is_err());
    drop(b); // gone: the next upgrade finds no server to carry it to
    let tcp = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    assert!(tokio_tungstenite::client_async("ws://ws.test/ws?gone", tcp).await.is_err());

    // (status, path) -> the line's bytes.
    let bytes = |status: u16, path: &str| {
        gw.logs().lines().find_map(|l| {
            let ours = l.contains("swarmgate::access") && l.contains(&format!("status={status} ")) && l.contains(path);
            let at = l.find(" bytes=")?;
            ours.then(|| l[at + 7..].split(' ').next()?.parse::<u64>().ok()).flatten()
        })
    };
    let logged = || {
        bytes(101, "path=/ws ").is_some()
            && bytes(200, "path=/ws ").is_some()
            && bytes(403, "path=/status ").is_some()
            && bytes(502, "path=/ws ").is_some()
    };
    assert!(wait_until(Duration::from_secs(3), logged).await, "{}", gw.logs());
    // The refused one's line waits for its body (3 bytes) to be sent. The echoes: over
    // 200,000 bytes each way.
    assert_eq!(bytes(403, "path=/status "), Some(3), "{}", gw.logs());
    assert!(bytes(101, "path=/ws ").unwrap() > 200_000, "{}", gw.logs());
    assert!(bytes(200, "path=/ws ").unwrap() > 200_000, "{}", gw.logs());
}

/// A server that switches to any protocol it is asked for: `101` with the request's own
/// `Upgrade` when there is one (or `answer_upgrade` in its place), `200` otherwise. Sends
/// each request head it reads.
async fn switching_server(
    answer_upgrade: Option<&'static str>,
) -> (std::net::SocketAddr, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = server.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = server.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                // Requests one after the other (a kept-alive connection) until one switches.
                let mut rest = Vec::new();
                loop {
                    let Some((head, more)) = read_head(&mut s, std::mem::take(&mut rest)).await else { return };
                    rest = more;
                    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
                    let asked = head.lines().find_map(|l| l.strip_prefix("upgrade:")).map(|v| v.trim().to_string());
                    let _ = tx.send(head);
                    let answer = match (asked, answer_upgrade) {
                        (None, _) => {
                            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nplain").await;
                            continue;
                        }
                        (Some(_), Some("")) => "HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\n\r\n".into(),
                        (Some(asked), answered) => format!(
                            "HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: {}\r\n\r\n",
                            answered.unwrap_or(&asked)
                        ),
                    };
                    let _ = s.write_all(answer.as_bytes()).await;
                    // What comes after a switch would be the other protocol's: hold the line.
                    let mut sink = [0u8; 1024];
                    while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {}
                    return;
                }
            });
        }
    });
    (addr, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_to_anything_but_websocket_is_an_ordinary_request() {
    // h2c (or any protocol a server would switch to) through a tunnel would carry the
    // client's next requests past the gateway, forged X-Forwarded-* and all.
    let (addr, mut heads) = switching_server(None).await;
    let gw = Gateway::builder(CONFIG).var("B", addr).start().await;
    for upgrade in ["h2c", "foo/1", "websocket-not"] {
        let request = format!(
            "GET / HTTP/1.1\r\nHost: ws.test\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: {upgrade}\r\n\
             HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n"
        );
        let (raw, _) = raw_exchange(gw.http, request.as_bytes(), Duration::from_secs(5)).await;
        let text = String::from_utf8_lossy(&raw).to_ascii_lowercase();
        assert_eq!(raw_status(&raw), Some(200), "Upgrade: {upgrade}: {text}");
        assert!(text.ends_with("plain"), "{text}");
        let seen = heads.recv().await.unwrap();
        assert!(!seen.contains("\r\nupgrade:"), "Upgrade: {upgrade} reached the server: {seen}");
        assert!(!seen.contains("http2-settings"), "{seen}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switch_to_a_protocol_the_client_did_not_ask_for_is_refused() {
    for answered in ["h2c", ""] {
        let (addr, mut heads) = switching_server(Some(answered)).await;
        let gw = Gateway::builder(CONFIG).var("B", addr).start().await;
        let (raw, closed) = raw_exchange(gw.http, &raw_upgrade("/ws"), Duration::from_secs(5)).await;
        let text = String::from_utf8_lossy(&raw).to_ascii_lowercase();
        assert!(heads.recv().await.unwrap().contains("\r\nupgrade: websocket\r\n"));
        assert_eq!(raw_status(&raw), Some(502), "101 with Upgrade: {answered:?} passed: {text}");
        assert!(closed, "{text}");
        // Counted once, as the 502 the client got.
        let m = gw.metrics().await;
        let counted: f64 = m
            .lines()
            .filter(|l| l.starts_with(r#"swarmgate_responses_total{route="ws.test/""#))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        let as_502 = r#"swarmgate_responses_total{route="ws.test/",upstream="app",status="502"}"#;
        assert_eq!((counted, metric_value(&m, as_502)), (1.0, Some(1.0)), "{m}");
    }
}

/// A gateway routing `ws.test` to `servers`.
async fn gateway_to(servers: &[String]) -> Gateway {
    let config = CONFIG.replace("servers = [\"@B@\"]", &format!("servers = [\"{}\"]", servers.join("\", \"")));
    let pki = Pki::new();
    let (crt, key) = pki.leaf(&["ws.test"]);
    Gateway::builder(&config).file("certs/ws.crt", crt).file("certs/ws.key", key).start().await
}

/// A WebSocket upgrade through the gateway at `http` to the echo service, closed at once.
async fn echo_upgrade(http: std::net::SocketAddr, i: usize) {
    let tcp = tokio::net::TcpStream::connect(http).await.unwrap();
    let (mut ws, resp) = tokio_tungstenite::client_async(format!("ws://ws.test/ws?n={i}"), tcp)
        .await
        .unwrap_or_else(|e| panic!("upgrade {i}: {e}"));
    assert_eq!(resp.status(), 101);
    ws.close(None).await.unwrap();
}

/// An upgrade that meets dead replicas first (refusing connections) goes on to a live
/// one: refused connects do not use up `retries` (default 2), as for other requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_meeting_dead_replicas_first_reaches_a_live_one() {
    let b = Backend::start("app").await;
    let listeners: Vec<std::net::TcpListener> =
        (0..30).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    let mut servers: Vec<String> = listeners.iter().map(|l| l.local_addr().unwrap().to_string()).collect();
    drop(listeners); // every one of these ports refuses from now on
    servers.push(b.addr.to_string());
    let gw = gateway_to(&servers).await;
    for i in 0..5 {
        echo_upgrade(gw.http, i).await;
    }
    // Each refused connect ejected its server, as for any request.
    let m = gw.metrics().await;
    let ejected = metric_value(&m, r#"swarmgate_upstream_ejections_total{upstream="app"}"#).unwrap_or(0.0);
    assert!(ejected >= 1.0, "{m}");
}

/// A server ejected in an upstream that only upgrades reach is tried by an upgrade once
/// its back-off is over, and is back when it answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_tries_an_ejected_server_after_its_back_off() {
    let live = Backend::start("live").await;
    // Bound but not listening: connects to it are refused, and no other socket can take
    // the port before the server comes back on it.
    let reserved = tokio::net::TcpSocket::new_v4().unwrap();
    reserved.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let dead = reserved.local_addr().unwrap();
    let gw = gateway_to(&[live.addr.to_string(), dead.to_string()]).await;
    let ejected = |r: Resp| {
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        let servers = v["upstreams"][0]["servers"].as_array().unwrap().clone();
        servers.iter().find(|s| s["address"] == dead.to_string()).map(|s| s["ejected"] == true).unwrap()
    };
    let mut i = 0;
    while !ejected(gw.admin_get("/upstreams").await) {
        assert!(i < 60, "the refusing server was never tried");
        echo_upgrade(gw.http, i).await;
        i += 1;
    }
    let back = Backend::start_on("back", reserved);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    echo_upgrade(gw.http, 100).await; // the trial: it goes to the server back at that port
    assert_eq!(back.hits(), 1);
    assert!(!ejected(gw.admin_get("/upstreams").await), "answered its trial: back in rotation");
}
