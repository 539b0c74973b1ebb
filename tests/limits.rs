//! Malformed, oversized, slow and too many clients; servers that are gone or too slow.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CONFIG: &str = r#"
[listen]
http = "@HTTP@"
https = ""
admin = "@ADMIN@"

[limits]
header_read_timeout = "@HRT@"
max_header_bytes = 8192
max_uri_bytes = 256
max_connections = @MAXCONN@

[[route]]
host = "*"
upstream = "app"

[upstream.app]
servers = [@SERVERS@]
connect_timeout = "500ms"
response_timeout = "700ms"
"#;

async fn gateway_with(servers: &[&Backend], hrt: &str, max_conn: usize) -> Gateway {
    let list: Vec<String> = servers.iter().map(|b| format!("\"{}\"", b.addr)).collect();
    Gateway::builder(CONFIG).var("SERVERS", list.join(", ")).var("HRT", hrt).var("MAXCONN", max_conn).start().await
}

async fn gateway(b: &Backend) -> Gateway {
    gateway_with(&[b], "1s", 1000).await
}

async fn raw(gw: &Gateway, request: &[u8]) -> (Vec<u8>, bool) {
    raw_exchange(gw.http, request, Duration::from_secs(5)).await
}

/// A request with both Content-Length and Transfer-Encoding. hyper (the HTTP/1.1 parser)
/// settles it before the gateway sees the request: Transfer-Encoding wins and the
/// connection is closed after the response (RFC 9112 section 6.3 allows this instead of
/// a 400). What must hold either way: one request reaches the server, with the body
/// chunked decoding gives, the client's Content-Length not forwarded (a length, if any,
/// is the gateway's own and matches the body), and nothing is smuggled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_with_transfer_encoding_cannot_smuggle() {
    let b = Backend::start("app").await;
    let gw = gateway(&b).await;
    // CL.TE: by Content-Length the body holds a second request; by chunked it is empty.
    let cl_te = b"POST /first HTTP/1.1\r\nHost: app.test\r\nContent-Length: 44\r\nTransfer-Encoding: chunked\r\n\r\n\
0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: app.test\r\n\r\n";
    // TE.CL: by chunked the body is "GET /smuggled..." (0x2e bytes); by Content-Length 4.
    let te_cl = b"POST /second HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n\
2e\r\nGET /smuggled HTTP/1.1\r\nHost: app.test\r\nX: 123\r\n0\r\n\r\n";
    for (attack, path, body) in [
        (&cl_te[..], "/first", &b""[..]),
        (&te_cl[..], "/second", &b"GET /smuggled HTTP/1.1\r\nHost: app.test\r\nX: 123"[..]),
    ] {
        let before = b.hits();
        let (bytes, closed) = raw(&gw, attack).await;
        let text = String::from_utf8_lossy(&bytes).into_owned();
        assert!(closed, "connection kept open after a request with both framings: {text}");
        assert_eq!(raw_response_count(&bytes), 1, "{text}");
        let status = raw_status(&bytes);
        match status {
            Some(400) => assert_eq!(b.hits(), before, "a refused request reached the server"),
            Some(200) => {
                assert_eq!(b.hits(), before + 1, "{:?}", b.requests());
                let seen = b.last();
                assert_eq!(seen.uri, path);
                assert_eq!(&seen.body[..], body);
                let length = seen.headers.iter().find(|(n, _)| n == "content-length").map(|(_, v)| v.as_str());
                assert!(length.is_none_or(|l| l == body.len().to_string()), "{:?}", seen.headers);
            }
            other => panic!("{path}: status {other:?}: {text}"),
        }
    }
    assert!(b.requests().iter().all(|r| r.uri != "/smuggled"), "{:?}", b.requests());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_chunk_size_is_400_and_never_reaches_the_server() {
    let b = Backend::start("app").await;
    let gw = gateway(&b).await;
    let (bytes, _) =
        raw(&gw, b"POST /x HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n")
            .await;
    let r = parse_raw(&bytes);
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&bytes));
    assert_eq!(String::from_utf8_lossy(&r.body), "400 bad request\n");
    // A chunk size that overflows.
    let (bytes, _) = raw(
        &gw,
        b"POST /x HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffffff\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(raw_status(&bytes), Some(400), "{}", String::from_utf8_lossy(&bytes));
    assert_eq!(b.hits(), 0, "the server saw {:?}", b.requests());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_must_be_there_once() {
    let b = Backend::start("app").await;
    let gw = gateway(&b).await;
    let (bytes, _) = raw(&gw, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n").await;
    let r = parse_raw(&bytes);
    assert_eq!(r.status, 400);
    assert_eq!(String::from_utf8_lossy(&r.body), "400 bad request\n");
    let (bytes, _) = raw(&gw, b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\nConnection: close\r\n\r\n").await;
    assert_eq!(raw_status(&bytes), Some(400));
    let (bytes, _) = raw(&gw, b"GET / HTTP/1.1\r\nHost: a.test/evil\r\nConnection: close\r\n\r\n").await;
    assert_eq!(raw_status(&bytes), Some(400));
    let (bytes, _) = raw(&gw, b"GET / HTTP/1.1\r\nHost:\r\nConnection: close\r\n\r\n").await;
    assert_eq!(raw_status(&bytes), Some(400));
    assert_eq!(b.hits(), 0);
    // The well-formed request on the same gateway goes through.
    let (bytes, _) = raw(&gw, b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n").await;
    assert_eq!(raw_status(&bytes), Some(200));
    assert_eq!(b.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_head_is_431_and_long_target_414() {
    let b = Backend::start("app").await;
    let gw = gateway(&b).await;
    let big = "x".repeat(9000);
    let request = format!("GET / HTTP/1.1\r\nHost: app.test\r\nX-Big: {big}\r\nConnection: close\r\n\r\n");
    let (bytes, _) = raw(&gw, request.as_bytes()).await;
    assert_eq!(raw_status(&bytes), Some(431), "{}", String::from_utf8_lossy(&bytes[..bytes.len().min(200)]));
    // Headers that each fit but add up to more than max_header_bytes count too.
    let many: String = (0..50).map(|i| format!("X-H{i:02}: {}\r\n", "v".repeat(200))).collect();
    let request = format!("GET / HTTP/1.1\r\nHost: app.test\r\n{many}Connection: close\r\n\r\n");
    let (bytes, _) = raw(&gw, request.as_bytes()).await;
    assert_eq!(raw_status(&bytes), Some(431));
    // Just under the limit passes.
    let many: String = (0..30).map(|i| format!("X-H{i:02}: {}\r\n", "v".repeat(200))).collect();
    let request = format!("GET /fits HTTP/1.1\r\nHost: app.test\r\n{many}Connection: close\r\n\r\n");
    let (bytes, _) = raw(&gw, request.as_bytes()).await;
    assert_eq!(raw_status(&bytes), Some(200));
    assert_eq!(b.last().header("x-h29").map(str::len), Some(200));

    let long = format!("/{}", "a".repeat(300));
    let r = get(gw.http, "app.test", &long).await;
    assert_eq!(r.status, 414);
    assert_eq!(r.text(), "414 request target too long\n");
    // The query counts as part of the target.
    let r = get(gw.http, "app.test", &format!("/x?{}", "q".repeat(260))).await;
    assert_eq!(r.status, 414);
    assert_eq!(b.hits(), 1, "only /fits reached the server");
    let ok = format!("/{}", "a".repeat(200));
    let r = get(gw.http, "app.test", &ok).await;
    assert_eq!(r.status, 200);
    assert_eq!(b.last().uri, ok);
}

/// A head the gateway cannot take as a request gets its own answer (a status and a short
/// text, then the connection closed), a line in the access log and a count in the
/// metrics, like every other answer. HTTP/1.2 and on are read as HTTP/1.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_head_is_answered_logged_and_counted() {
    let b = Backend::start("app").await;
    let gw = gateway(&b).await;
    let long_target = format!("GET /{} HTTP/1.1\r\nHost: app.test\r\n\r\n", "u".repeat(70 * 1024));
    let fields: String = (0..=100).map(|i| format!("X-F{i}: 1\r\n")).collect();
    let many_fields = format!("GET / HTTP/1.1\r\nHost: app.test\r\n{fields}\r\n");
    let cases: [(&[u8], u16, &str); 9] = [
        (b"GET /\x01 HTTP/1.1\r\nHost: app.test\r\n\r\n", 400, "400 bad request\n"),
        (b"GET / http/1.1\r\nHost: app.test\r\n\r\n", 400, "400 bad request\n"),
        (b"PUT / HTTP/1.1\r\nHost: app.test\r\nContent-Length: 2, 2\r\n\r\nhi", 400, "400 bad request\n"),
        // The answer to a HEAD has no content, even this one.
        (b"HEAD / HTTP/1.1\r\nHost: app.test\r\nContent-Length: +1\r\n\r\n", 400, ""),
        (
            b"PUT / HTTP/1.1\r\nHost: app.test\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nhi",
            400,
            "400 bad request\n",
        ),
        // A TLS ClientHello on the plain port.
        (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03", 400, "400 bad request\n"),
        (b"GET / HTTP/2.0\r\nHost: app.test\r\n\r\n", 505, "505 HTTP version not supported\n"),
        (long_target.as_bytes(), 414, "414 request target too long\n"),
        (many_fields.as_bytes(), 431, "431 request head too large\n"),
    ];
    for (request, status, text) in cases {
        let (bytes, closed) = raw(&gw, request).await;
        let answer = String::from_utf8_lossy(&bytes);
        assert_eq!(raw_status(&bytes), Some(status), "{answer}");
        assert!(answer.ends_with(&format!("\r\n\r\n{text}")), "{answer}");
        assert!(answer.to_ascii_lowercase().contains("\r\nconnection: close\r\n"), "{answer}");
        assert!(closed, "the connection is closed after the answer");
    }
    assert_eq!(b.hits(), 0);
    let (bytes, _) = raw(&gw, b"GET /later HTTP/1.2\r\nHost: app.test\r\nConnection: close\r\n\r\n").await;
    assert_eq!(raw_status(&bytes), Some(200), "{}", String::from_utf8_lossy(&bytes));
    assert_eq!((b.hits(), b.last().uri.as_str()), (1, "/later"));

    let statuses: Vec<u16> = cases.iter().map(|c| c.1).collect();
    assert_refusals_counted_and_logged(&gw, &statuses, &[400, 414, 431, 505]).await;
    // A client's bad head is no failure of the gateway's: no warning, even for a 505.
    assert!(!gw.logs().lines().any(|l| l.contains("WARN") && l.contains("request failed")), "{}", gw.logs());
}

/// A bad head behind a request with a body (which a hyper session serves, and so reads
/// the heads after it) gets hyper's answer, and is logged and counted all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_head_behind_a_request_with_a_body_is_logged_and_counted() {
    let b = Backend::start("app").await;
    let gw = gateway(&b).await;
    let post = "POST /first HTTP/1.1\r\nHost: app.test\r\nContent-Length: 2\r\n\r\nhi";
    let fields: String = (0..=100).map(|i| format!("X-F{i}: 1\r\n")).collect();
    let cases = [
        ("GET /\x01 HTTP/1.1\r\nHost: app.test\r\n\r\n".to_string(), 400),
        ("GET / HTTP/1.1\r\nBad Name: 1\r\n\r\n".to_string(), 400),
        (format!("GET / HTTP/1.1\r\nHost: app.test\r\n{fields}\r\n"), 431),
    ];
    for (bad, status) in &cases {
        let (bytes, closed) = raw(&gw, format!("{post}{bad}").as_bytes()).await;
        let answer = String::from_utf8_lossy(&bytes);
        assert!(answer.starts_with("HTTP/1.1 200 "), "the request before it is served: {answer}");
        let second = answer.match_indices("HTTP/1.1 ").nth(1).map(|(i, _)| &answer[i..]);
        assert!(second.is_some_and(|r| r.starts_with(&format!("HTTP/1.1 {status} "))), "{answer}");
        assert!(closed, "the connection is closed after the answer");
    }
    assert_eq!(b.hits(), cases.len());
    let statuses: Vec<u16> = cases.iter().map(|c| c.1).collect();
    assert_refusals_counted_and_logged(&gw, &statuses, &[400, 431]).await;
}

/// Each of `statuses` (the refused heads' answers) is counted with the unrouted requests
/// and has its access-log line with `-` for what could not be told.
async fn assert_refusals_counted_and_logged(gw: &Gateway, statuses: &[u16], kinds: &[u16]) {
    let m = gw.metrics().await;
    for &status in kinds {
        let n = statuses.iter().filter(|&&s| s == status).count();
        let series = format!(r#"swarmgate_responses_total{{route="",upstream="",status="{status}"}}"#);
        assert_eq!(metric_value(&m, &series), Some(n as f64), "{series}\n{m}");
        let line = format!("method=- host=- path=- status={status} ");
        let logged = gw.logs().lines().filter(|l| l.contains("swarmgate::access") && l.contains(&line)).count();
        assert_eq!(logged, n, "{status}\n{}", gw.logs());
    }
}

/// A client still sending an oversized head when it is refused gets the answer: the
/// gateway reads and drops the rest for a while before it closes, where closing with
/// unread bytes would reset the connection under the client's next write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_head_still_coming_gets_its_answer() {
    let b = Backend::start("app").await;
    let gw = gateway(&b).await;
    let mut c = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    c.write_all(format!("GET /{}", "u".repeat(16 * 1024)).as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await; // refused by now
    let rest = format!("{} HTTP/1.1\r\nHost: app.test\r\n\r\n", "u".repeat(16 * 1024));
    c.write_all(rest.as_bytes()).await.expect("the rest of the head is taken");
    let (bytes, closed) = read_until_close(&mut c, Duration::from_secs(5)).await;
    assert_eq!(raw_status(&bytes), Some(414), "{}", String::from_utf8_lossy(&bytes));
    assert!(closed);
    assert_eq!(b.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_does_not_block_others_and_is_cut_off() {
    let b = Backend::start("app").await;
    let gw = gateway(&b).await;
    let mut slow = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    let started = Instant::now();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: app.test\r\nX-Slow: ").await.unwrap();
    let trickle = tokio::spawn(async move {
        // One byte every 100 ms: never a complete head.
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if slow.write_all(b"a").await.is_err() {
                return (slow, started.elapsed(), true);
            }
        }
        (slow, started.elapsed(), false)
    });
    // Meanwhile other clients are served at once.
    for _ in 0..5 {
        let t = Instant::now();
        let r = get(gw.http, "app.test", "/").await;
        assert_eq!(r.status, 200);
        assert!(t.elapsed() < Duration::from_millis(500));
    }
    let (mut slow, _, _) = trickle.await.unwrap();
    let (bytes, closed) = read_until_close(&mut slow, Duration::from_secs(3)).await;
    let took = started.elapsed();
    assert!(closed, "slow client still connected after {took:?}");
    assert!(took < Duration::from_secs(6), "closed only after {took:?}");
    // Closed (possibly with a 408), never answered by the server.
    assert!(bytes.is_empty() || raw_status(&bytes) == Some(408), "{}", String::from_utf8_lossy(&bytes));
    assert_eq!(b.hits(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_is_closed_after_header_read_timeout() {
    let b = Backend::start("app").await;
    let gw = gateway(&b).await;
    let mut slow = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    let started = Instant::now();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: app.test\r\n").await.unwrap();
    let (_, closed) = read_until_close(&mut slow, Duration::from_secs(5)).await;
    let took = started.elapsed();
    assert!(closed);
    assert!(took >= Duration::from_millis(900) && took < Duration::from_millis(2500), "closed after {took:?}");
    assert_eq!(b.hits(), 0);
    // Counted, so that an operator sees a slowloris.
    assert_eq!(gw.metric("swarmgate_slow_heads_total").await, Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_max_connections_wait_their_turn() {
    let b = Backend::start("app").await;
    let gw = gateway_with(&[&b], "10s", 2).await;
    let mut c1 = H1::connect(gw.http).await;
    let mut c2 = H1::connect(gw.http).await;
    assert_eq!(c1.get("app.test", "/").await.status, 200);
    assert_eq!(c2.get("app.test", "/").await.status, 200);
    // A third connection is not refused, just not served yet.
    let mut c3 = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    c3.write_all(b"GET /third HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n").await.unwrap();
    let (bytes, closed) = read_until_close(&mut c3, Duration::from_millis(700)).await;
    assert!(bytes.is_empty() && !closed, "third connection served early: {}", String::from_utf8_lossy(&bytes));
    // The admin listener does not count against the limit.
    let h = gw.admin_get("/healthz").await;
    assert_eq!((h.status, h.text().as_str()), (200, "ok\n"));
    assert_eq!(gw.metric("swarmgate_open_connections").await, Some(2.0));
    // The wait is counted and said.
    assert_eq!(gw.metric("swarmgate_connection_limit_waits_total").await, Some(1.0));
    assert!(gw.logs().contains("client connections at their limit"), "{}", gw.logs());
    // One leaves: the waiting one is served.
    drop(c1);
    let t = Instant::now();
    let (bytes, closed) = read_until_close(&mut c3, Duration::from_secs(3)).await;
    assert_eq!(raw_status(&bytes), Some(200), "{}", String::from_utf8_lossy(&bytes));
    assert!(closed);
    assert!(t.elapsed() < Duration::from_secs(2));
    assert_eq!(b.last().uri, "/third");
    assert_eq!(c2.get("app.test", "/").await.status, 200);
}

/// At the limit, a connection that ends makes room for one that is waiting, whichever
/// listener and worker it came to: the room never goes to an accept loop with no client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_max_connections_each_freed_place_goes_to_a_waiting_client() {
    let b = Backend::start("app").await;
    // Two listeners (and two workers): four accept loops share the one place.
    let config = CONFIG
        .replace(r#"https = """#, r#"https = "@HTTPS@""#)
        .replace("[limits]", "[runtime]\nworkers = 2\n\n[proxy]\nredirect_https = false\n\n[limits]");
    let gw = Gateway::builder(&config)
        .var("SERVERS", format!("\"{}\"", b.addr))
        .var("HRT", "10s")
        .var("MAXCONN", 1)
        .start()
        .await;
    let mut held = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    held.write_all(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n").await.unwrap();
    let mut head = [0u8; 12];
    let read = tokio::time::timeout(Duration::from_secs(3), held.read_exact(&mut head)).await;
    assert!(matches!(read, Ok(Ok(_))), "the first client was not served: {read:?}");
    assert_eq!(&head, b"HTTP/1.1 200");
    for i in 0..6 {
        // A client waits behind the limit; the one served goes; the waiting one is served.
        let mut next = tokio::net::TcpStream::connect(gw.http).await.unwrap();
        next.write_all(format!("GET /{i} HTTP/1.1\r\nHost: app.test\r\n\r\n").as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(held);
        let mut head = [0u8; 12];
        let read = tokio::time::timeout(Duration::from_secs(3), next.read_exact(&mut head)).await;
        assert!(matches!(read, Ok(Ok(_))), "round {i}: the waiting client was not served: {read:?}");
        assert_eq!(&head, b"HTTP/1.1 200");
        held = next;
    }
}

/// `swarmgate_open_connections` comes down to 0 within 3 s.
async fn assert_no_open_connections_soon(gw: &Gateway) {
    let gone = wait_until_async(Duration::from_secs(3), || async {
        gw.metric("swarmgate_open_connections").await == Some(0.0)
    })
    .await;
    assert!(gone, "open_connections: {:?}", gw.metric("swarmgate_open_connections").await);
}

/// A WebSocket tunnel is still a client connection: it keeps its place under
/// max_connections and its count in open_connections until it closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_tunnel_keeps_its_connection_place_until_it_closes() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let b = Backend::start("app").await;
    let gw = gateway_with(&[&b], "10s", 1).await;
    let tcp = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    let (mut ws, resp) = tokio_tungstenite::client_async("ws://app.test/ws", tcp).await.unwrap();
    assert_eq!(resp.status(), 101);
    async fn echo<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>, text: &str)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        ws.send(Message::text(text)).await.unwrap();
        let back = tokio::time::timeout(Duration::from_secs(3), ws.next()).await.expect("echo in time");
        assert_eq!(back.unwrap().unwrap(), Message::text(text));
    }
    echo(&mut ws, "first").await;
    assert_eq!(gw.metric("swarmgate_open_connections").await, Some(1.0));
    // Another client waits while the tunnel is open ...
    let mut next = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    next.write_all(b"GET /next HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n").await.unwrap();
    let (bytes, closed) = read_until_close(&mut next, Duration::from_millis(700)).await;
    assert!(bytes.is_empty() && !closed, "served while the tunnel held the place: {}", String::from_utf8_lossy(&bytes));
    echo(&mut ws, "second").await;
    // ... and is served once the tunnel closes.
    ws.close(None).await.unwrap();
    drop(ws);
    let (bytes, closed) = read_until_close(&mut next, Duration::from_secs(3)).await;
    assert_eq!(raw_status(&bytes), Some(200), "{}", String::from_utf8_lossy(&bytes));
    assert!(closed);
    assert_eq!(b.last().uri, "/next");
    assert_no_open_connections_soon(&gw).await;
}

/// A refused upgrade ends its connection (hyper closes it after the answer) and gives its
/// place back: the hold the upgrade request carried for a tunnel is not kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_upgrade_gives_its_connection_place_back() {
    let b = Backend::start("app").await;
    let gw = gateway_with(&[&b], "10s", 1).await;
    let mut first = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    first
        .write_all(
            b"GET /status?code=403 HTTP/1.1\r\nHost: app.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
              Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .await
        .unwrap();
    let (bytes, closed) = read_until_close(&mut first, Duration::from_secs(3)).await;
    assert_eq!(raw_status(&bytes), Some(403), "{}", String::from_utf8_lossy(&bytes));
    assert!(closed);
    for i in 0..3 {
        let mut next = tokio::net::TcpStream::connect(gw.http).await.unwrap();
        next.write_all(format!("GET /next{i} HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let (bytes, closed) = read_until_close(&mut next, Duration::from_secs(3)).await;
        assert_eq!(raw_status(&bytes), Some(200), "client {i}: {}", String::from_utf8_lossy(&bytes));
        assert!(closed);
    }
    assert_no_open_connections_soon(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_server_gives_502_or_503_quickly() {
    let b = Backend::start("app").await;
    let gw = gateway(&b).await;
    assert_eq!(get(gw.http, "app.test", "/").await.status, 200);
    b.stop();
    tokio::time::sleep(Duration::from_millis(50)).await;
    for i in 0..5 {
        let t = Instant::now();
        let r = get(gw.http, "app.test", "/").await;
        assert!(t.elapsed() < Duration::from_secs(2), "request {i} took {:?}", t.elapsed());
        match r.status {
            502 => assert_eq!(r.text(), "502 upstream failed\n"),
            503 => assert_eq!(r.text(), "503 no server available\n"),
            s => panic!("request {i}: status {s}"),
        }
    }
    let m = gw.metrics().await;
    assert!(metric_value(&m, "swarmgate_upstream_connect_errors_total{upstream=\"app\"}").unwrap() >= 1.0, "{m}");
}

/// A server that answers, a hung one (never accepted: the kernel completes the
/// connections, and nothing ever answers), and a gateway to both.
async fn live_and_hung() -> (Backend, std::net::TcpListener, Gateway) {
    let live = Backend::start("live").await;
    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let servers = format!("\"{}\", \"{}\"", live.addr, hung.local_addr().unwrap());
    let gw = Gateway::builder(CONFIG).var("SERVERS", servers).var("HRT", "1s").var("MAXCONN", 1000).start().await;
    (live, hung, gw)
}

/// A server that takes connections and answers nothing (hung) times out every request it
/// gets: after three in a row it is ejected like a failing one, and the requests go to
/// the server that answers, where without ejection about half of them would wait
/// `response_timeout` for a 504, for as long as it hangs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_server_is_ejected_after_three_timeouts() {
    let (_live, hung, gw) = live_and_hung().await;
    let mut timeouts = 0;
    for i in 0..40 {
        let r = get(gw.http, "app.test", &format!("/{i}")).await;
        match r.status {
            200 => {}
            504 => timeouts += 1,
            s => panic!("request {i}: {s}"),
        }
    }
    // Three, then ejected; its back-off (1 s) outlasts the rest on any but a very slow
    // machine, where one trial request may meet it once more.
    assert!((3..=4).contains(&timeouts), "{timeouts} timeouts of 40 (about half without ejection)");
    let m = gw.metrics().await;
    let ejections = metric_value(&m, r#"swarmgate_upstream_ejections_total{upstream="app"}"#).unwrap_or(0.0);
    assert!((1.0..=2.0).contains(&ejections), "{m}");
    drop(hung);
}

/// After its back-off a hung server gets one trial request, not its share: each failed
/// trial costs one request a `response_timeout` and ejects it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_server_gets_one_trial_request_per_back_off() {
    let (_live, hung, gw) = live_and_hung().await;
    let ejections = |m: &str| metric_value(m, r#"swarmgate_upstream_ejections_total{upstream="app"}"#).unwrap_or(0.0);
    // One client until three timeouts in a row eject the hung server.
    let mut timeouts = 0;
    while timeouts < 3 {
        match get(gw.http, "app.test", "/").await.status {
            200 => {}
            504 => timeouts += 1,
            s => panic!("{s}"),
        }
    }
    let first = ejections(&gw.metrics().await);
    assert_eq!(first, 1.0);
    // Four clients for 2.5 s: the 1 s back-off ends within them, and so does its trial's
    // timeout (700 ms). A server back with its share would get requests from all four.
    let http = gw.http;
    let until = Instant::now() + Duration::from_millis(2500);
    let clients: Vec<_> = (0..4)
        .map(|_| {
            tokio::spawn(async move {
                let mut timeouts = 0;
                while Instant::now() < until {
                    match get(http, "app.test", "/").await.status {
                        200 => {}
                        504 => timeouts += 1,
                        s => panic!("{s}"),
                    }
                }
                timeouts
            })
        })
        .collect();
    let mut timeouts = 0;
    for c in clients {
        timeouts += c.await.unwrap();
    }
    // One trial: it fails at about 1.7 s, and the next back-off (2 s) outlasts the window.
    let trials = ejections(&gw.metrics().await) - first;
    assert_eq!(trials, 1.0, "failed trials in 2.5 s after a 1 s back-off");
    assert_eq!(timeouts, 1, "{timeouts} timeouts for one failed trial");
    drop(hung);
}

/// Slow requests sent together time out together: from a server that answers the
/// requests sent after them, they are no sign of a hung server, and eject nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_requests_timing_out_together_do_not_eject_a_server_that_answers() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let gw = gateway_with(&[&a, &b], "1s", 1000).await; // response_timeout 700 ms
    let http = gw.http;
    let slow: Vec<_> =
        (0..8).map(|_| tokio::spawn(async move { get(http, "app.test", "/sleep?ms=1500").await })).collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    for i in 0..20 {
        assert_eq!(get(gw.http, "app.test", &format!("/{i}")).await.status, 200);
    }
    for s in slow {
        assert_eq!(s.await.unwrap().status, 504);
    }
    let m = gw.metrics().await;
    assert_eq!(metric_value(&m, r#"swarmgate_upstream_ejections_total{upstream="app"}"#), Some(0.0), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connect_is_retried_on_another_server() {
    let live = Backend::start("live").await;
    let dead = Backend::start("dead").await;
    let gw = gateway_with(&[&live, &dead], "1s", 1000).await;
    dead.stop();
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Nothing of a refused request reached a server: even a POST is sent again.
    for i in 0..20 {
        let r = send(gw.http, req("POST", "app.test", "/echo").body(full(format!("n{i}"))).unwrap()).await;
        assert_eq!(r.status, 200, "request {i}");
        assert_eq!(r.text(), format!("n{i}"));
    }
    assert_eq!(live.hits(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_timeout_is_504() {
    let b = Backend::start("app").await;
    let gw = gateway(&b).await;
    let t = Instant::now();
    let r = get(gw.http, "app.test", "/sleep?ms=3000").await;
    let took = t.elapsed();
    assert_eq!(r.status, 504);
    assert_eq!(r.text(), "504 upstream timed out\n");
    assert!(took >= Duration::from_millis(650) && took < Duration::from_millis(2000), "{took:?}");
    // A timeout is not retried: the server saw the request once.
    assert_eq!(b.hits(), 1);
    let r = get(gw.http, "app.test", "/sleep?ms=100").await;
    assert_eq!(r.status, 200);
}

/// A transfer coding the gateway does not undo (RFC 9112 section 6.1: 501), and request
/// targets whose authority is not a host and a port: userinfo, the authority-form outside
/// CONNECT, a port that is no number (400). None reaches the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_codings_and_odd_authorities_never_reach_the_server() {
    let b = Backend::start("app").await;
    let gw = gateway(&b).await;
    let coded = b"POST / HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: gzip, chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
    let (bytes, _) = raw(&gw, coded).await;
    assert_eq!(raw_status(&bytes), Some(501), "{}", String::from_utf8_lossy(&bytes));
    for (request, why) in [
        ("GET http://evil.test@app.test/x HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n", "userinfo"),
        ("GET user@evil.test:80 HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n", "authority-form"),
        ("GET / HTTP/1.1\r\nHost: app.test:abc\r\nConnection: close\r\n\r\n", "port"),
        ("GET / HTTP/1.1\r\nHost: app.test:99999\r\nConnection: close\r\n\r\n", "port"),
        ("GET / HTTP/1.1\r\nHost: [::1\r\nConnection: close\r\n\r\n", "bracket"),
        ("GET / HTTP/1.1\r\nHost: app.test:80:80\r\nConnection: close\r\n\r\n", "two ports"),
        ("GET http://app.test/x HTTP/1.1\r\nConnection: close\r\n\r\n", "no Host in HTTP/1.1"),
        ("GET * HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n", "asterisk-form"),
        (
            "POST / HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked, chunked\r\nConnection: close\r\n\r\n\
             7\r\n2\r\nhi\r\n\r\n0\r\n\r\n",
            "chunked twice",
        ),
        (
            "POST http://evil.test@app.test/x HTTP/1.1\r\nHost: app.test\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi",
            "userinfo",
        ),
    ] {
        let (bytes, _) = raw(&gw, request.as_bytes()).await;
        assert_eq!(raw_status(&bytes), Some(400), "{why}: {request:?} got {}", String::from_utf8_lossy(&bytes));
    }
    assert_eq!(b.hits(), 0);
    // The well-formed ones pass: the asterisk-form is OPTIONS's (RFC 9112 section 3.2.4).
    let (bytes, _) =
        raw(&gw, b"GET http://app.test:8080/x HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n").await;
    assert_eq!(raw_status(&bytes), Some(200), "{}", String::from_utf8_lossy(&bytes));
    let (bytes, _) = raw(&gw, b"OPTIONS * HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n").await;
    assert_eq!(raw_status(&bytes), Some(200), "{}", String::from_utf8_lossy(&bytes));
    assert_eq!((b.last().method.as_str(), b.last().uri.as_str()), ("OPTIONS", "*"));
}

/// `response_timeout` counts from the request's last byte sent: an upload slower than it
/// in all passes while it keeps moving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upload_that_keeps_moving_outlives_response_timeout() {
    let b = Backend::start("app").await;
    let gw = gateway(&b).await;
    let mut s = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: app.test\r\nContent-Length: 12\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let t = Instant::now();
    for byte in b"slow but on." {
        tokio::time::sleep(Duration::from_millis(250)).await;
        s.write_all(&[*byte]).await.unwrap();
    }
    let (bytes, _) = read_until_close(&mut s, Duration::from_secs(5)).await;
    assert_eq!(raw_status(&bytes), Some(200), "after {:?}: {}", t.elapsed(), String::from_utf8_lossy(&bytes));
    assert!(t.elapsed() > Duration::from_millis(2800), "{:?}", t.elapsed());
    assert_eq!(&b.last().body[..], b"slow but on.");
}

/// A client that stops sending its body is answered 408 once `response_timeout` passes
/// without a byte of it, and the server is not blamed (no ejection after many).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_upload_is_408_and_not_the_servers_fault() {
    let b = Backend::start("app").await;
    let gw = gateway(&b).await;
    for i in 0..4 {
        let mut s = tokio::net::TcpStream::connect(gw.http).await.unwrap();
        s.write_all(b"POST /upload HTTP/1.1\r\nHost: app.test\r\nContent-Length: 20\r\n\r\nhalf of it").await.unwrap();
        let t = Instant::now();
        let (bytes, closed) = read_until_close(&mut s, Duration::from_secs(5)).await;
        let took = t.elapsed();
        assert_eq!(raw_status(&bytes), Some(408), "request {i}: {}", String::from_utf8_lossy(&bytes));
        assert!(String::from_utf8_lossy(&bytes).ends_with("408 request body timed out\n"));
        assert!(took >= Duration::from_millis(650) && took < Duration::from_millis(3000), "{took:?}");
        assert!(closed, "the connection is not kept after a body cut short");
    }
    // A head whose body never starts: the same, and the server never sees the request.
    let hits = b.hits();
    let mut s = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: app.test\r\nContent-Length: 20\r\n\r\n").await.unwrap();
    let (bytes, _) = read_until_close(&mut s, Duration::from_secs(5)).await;
    assert_eq!(raw_status(&bytes), Some(408), "no body at all: {}", String::from_utf8_lossy(&bytes));
    assert_eq!(b.hits(), hits);
    let m = gw.metrics().await;
    assert_eq!(metric_value(&m, "swarmgate_upstream_ejections_total{upstream=\"app\"}"), Some(0.0), "{m}");
    assert_eq!(get(gw.http, "app.test", "/").await.status, 200);
}

/// A server that answers `GET /` with a head promising 12 bytes and sends them `gap` apart
/// (`None`: sends 3 and goes silent, the connection held open).
async fn dribbling_server(gap: Option<Duration>) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                if read_request_head(&mut s).await.is_none() {
                    return;
                }
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n").await;
                match gap {
                    Some(gap) => {
                        for b in b"still coming" {
                            tokio::time::sleep(gap).await;
                            let _ = s.write_all(&[*b]).await;
                        }
                    }
                    None => {
                        let _ = s.write_all(b"sti").await;
                        tokio::time::sleep(Duration::from_secs(30)).await;
                    }
                }
            });
        }
    });
    addr
}

/// `response_timeout` also bounds each wait for the next piece of a response body: a
/// server that goes silent mid-body is cut off (the client sees the body end short, never
/// a complete one), and one that keeps sending, however slowly, is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_body_that_stops_coming_is_cut_off() {
    let gateway_at = |server: std::net::SocketAddr| {
        Gateway::builder(CONFIG).var("SERVERS", format!("\"{server}\"")).var("HRT", "1s").var("MAXCONN", 100).start()
    };
    let gw = gateway_at(dribbling_server(None).await).await;
    let t = Instant::now();
    let (bytes, closed) = raw(&gw, b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n").await;
    let text = String::from_utf8_lossy(&bytes);
    assert!(closed && text.starts_with("HTTP/1.1 200 OK\r\n") && text.ends_with("\r\n\r\nsti"), "{text}");
    assert!(t.elapsed() >= Duration::from_millis(650) && t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());

    let gw = gateway_at(dribbling_server(Some(Duration::from_millis(250))).await).await;
    let t = Instant::now();
    let r = get(gw.http, "app.test", "/").await;
    assert_eq!((r.status, r.text().as_str()), (200, "still coming"));
    assert!(t.elapsed() > Duration::from_millis(2800), "{:?}", t.elapsed());
}

/// A server that answers before the upload ends and sends its body only once the whole
/// upload is in (full duplex): while the upload moves, the response's silence is not a
/// stall.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_answer_whose_body_waits_for_a_moving_upload_is_not_cut() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let Ok((mut s, _)) = listener.accept().await else { return };
        if read_request_head(&mut s).await.is_none() {
            return;
        }
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n").await;
        let mut upload = [0u8; 10];
        if s.read_exact(&mut upload).await.is_ok() {
            let _ = s.write_all(b"done").await;
        }
    });
    let gw = Gateway::builder(CONFIG)
        .var("SERVERS", format!("\"{server}\""))
        .var("HRT", "1s")
        .var("MAXCONN", 100)
        .start()
        .await;
    let mut c = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    c.write_all(b"POST /up HTTP/1.1\r\nHost: app.test\r\nContent-Length: 10\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    for byte in b"ten bytes!" {
        tokio::time::sleep(Duration::from_millis(200)).await;
        c.write_all(&[*byte]).await.unwrap();
    }
    let (bytes, _) = read_until_close(&mut c, Duration::from_secs(5)).await;
    let text = String::from_utf8_lossy(&bytes);
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n") && text.ends_with("\r\n\r\ndone"), "{text}");
}

/// A body that turns malformed after it started streaming to the server is the client's
/// fault: 400, and it must not count against the server (or three such requests would
/// eject a healthy server for everyone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_broken_mid_stream_is_the_clients_fault() {
    let b = Backend::start("app").await;
    let gw = gateway(&b).await;
    for i in 0..4 {
        let mut s = tokio::net::TcpStream::connect(gw.http).await.unwrap();
        s.write_all(b"POST /sink HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        s.write_all(b"zz\r\nbroken\r\n0\r\n\r\n").await.unwrap();
        let (bytes, _) = read_until_close(&mut s, Duration::from_secs(3)).await;
        assert_eq!(raw_status(&bytes), Some(400), "request {i}: {}", String::from_utf8_lossy(&bytes));
    }
    for i in 0..5 {
        let r = get(gw.http, "app.test", "/").await;
        assert_eq!(r.status, 200, "request {i} after the broken ones: {}", r.text());
    }
    let m = gw.metrics().await;
    assert_eq!(metric_value(&m, "swarmgate_upstream_ejections_total{upstream=\"app\"}"), Some(0.0), "{m}");
}

/// A client that goes away partway through its upload, while the gateway holds the body's
/// start or streams it to the server, is logged and counted as 499 (it got no answer),
/// not as a malformed request; nor is the server blamed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gone_mid_upload_is_499_not_400() {
    let b = Backend::start("app").await;
    let gw = gateway(&b).await;
    for (path, length, sent) in [("/held", 10, 3), ("/streamed", 400_000, 200_000)] {
        let mut s = tokio::net::TcpStream::connect(gw.http).await.unwrap();
        let head = format!("POST {path} HTTP/1.1\r\nHost: app.test\r\nContent-Length: {length}\r\n\r\n");
        s.write_all(head.as_bytes()).await.unwrap();
        s.write_all(&vec![b'x'; sent]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    } // dropped: both clients go away
    let logged = |status: &str, path: &str| {
        gw.logs()
            .lines()
            .any(|l| l.contains("swarmgate::access") && l.contains(&format!("status={status} ")) && l.contains(path))
    };
    let both = || logged("499", "path=/held ") && logged("499", "path=/streamed ");
    assert!(wait_until(Duration::from_secs(3), both).await, "{}", gw.logs());
    assert!(!logged("400", "path=/"), "{}", gw.logs());
    // Each line names the server that had the request's head.
    for path in ["/held", "/streamed"] {
        assert!(logged("499", &format!("path={path} status=499 upstream=\"{}\"", b.addr)), "{}", gw.logs());
    }
    let m = gw.metrics().await;
    let count = |status: &str| -> f64 {
        m.lines()
            .filter(|l| l.starts_with("swarmgate_responses_total{") && l.contains(&format!("status=\"{status}\"")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert_eq!((count("499"), count("400")), (2.0, 0.0), "{m}");
    assert_eq!(metric_value(&m, "swarmgate_upstream_ejections_total{upstream=\"app\"}"), Some(0.0), "{m}");
}

/// The same over HTTP/2: a client whose connection ends partway through an upload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_client_gone_mid_upload_is_499_not_400() {
    use futures_util::StreamExt;
    let b = Backend::start("app").await;
    let gw = stall_gateway(b.addr).await;
    let (tls, _) = tls_connect(gw.https, &TlsOpts::sni("app.test").alpn(&[b"h2"])).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .handshake::<_, Body>(hyper_util::rt::TokioIo::new(tls))
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    // Three bytes, then the body waits forever.
    let first = futures_util::stream::once(async {
        Ok::<_, BoxError>(hyper::body::Frame::data(bytes::Bytes::from_static(b"abc")))
    });
    let body =
        http_body_util::BodyExt::boxed(http_body_util::StreamBody::new(first.chain(futures_util::stream::pending())));
    sender.ready().await.unwrap();
    let req = req2("POST", "app.test", "/upload").header("content-length", "10").body(body).unwrap();
    let answer = tokio::spawn(sender.send_request(req));
    tokio::time::sleep(Duration::from_millis(300)).await;
    conn.abort(); // the connection ends under the upload
    answer.abort();
    let logged = |status: &str| {
        gw.logs().lines().any(|l| {
            l.contains("swarmgate::access") && l.contains(&format!("status={status} ")) && l.contains("path=/upload ")
        })
    };
    assert!(wait_until(Duration::from_secs(3), || logged("499")).await, "{}", gw.logs());
    assert!(!logged("400"), "{}", gw.logs());
}

const IDLE: &str = r#"
[listen]
http = "@HTTP@"
https = "@HTTPS@"
admin = "@ADMIN@"

[proxy]
redirect_https = false

[limits]
header_read_timeout = "1s"
idle_timeout = "1s"
tls_handshake_timeout = "1s"

[[route]]
host = "*"
upstream = "app"

[upstream.app]
servers = ["@B@"]
"#;

async fn idle_gateway(b: &Backend) -> Gateway {
    with_certificate(IDLE, b).start().await
}

/// A gateway for `config` (routing to `b`) with a certificate for `app.test`.
fn with_certificate(config: &str, b: &Backend) -> GatewayBuilder {
    let pki = Pki::new();
    let (crt, key) = pki.leaf(&["app.test"]);
    Gateway::builder(config).var("B", b.addr).file("certs/app.crt", crt).file("certs/app.key", key)
}

/// A kept-alive HTTP/1.1 connection with no request is closed after idle_timeout (not
/// header_read_timeout, which is for a head that started arriving).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_http1_connection_is_closed_after_idle_timeout() {
    let b = Backend::start("app").await;
    let gw = Gateway::builder(&IDLE.replace(r#"header_read_timeout = "1s""#, r#"header_read_timeout = "5s""#))
        .var("B", b.addr)
        .start()
        .await;
    let mut s = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n").await.unwrap();
    let started = Instant::now();
    let (bytes, closed) = read_until_close(&mut s, Duration::from_secs(4)).await;
    let took = started.elapsed();
    assert_eq!(raw_status(&bytes), Some(200));
    assert!(closed, "kept-alive connection still open after {took:?}");
    assert!(took >= Duration::from_millis(900) && took < Duration::from_millis(2500), "closed after {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_h2_connection_is_closed_after_idle_timeout() {
    let b = Backend::start("app").await;
    let gw = idle_gateway(&b).await;
    let (tls, info) = tls_connect(gw.https, &TlsOpts::sni("app.test").alpn(&[b"h2"])).await.unwrap();
    assert_eq!(info.alpn.as_deref(), Some(&b"h2"[..]));
    let mut h2 = H2::over(tls).await;
    assert_eq!(h2.get("app.test", "/").await.status, 200);
    // A stream open longer than idle_timeout keeps the connection: it is not idle.
    assert_eq!(h2.get("app.test", "/sleep?ms=1800").await.status, 200);
    assert_eq!(h2.get("app.test", "/").await.status, 200);
    let started = Instant::now();
    // hyper's client answers PINGs by itself: only a real idle timeout closes this.
    let closed = wait_until_async(Duration::from_secs(4), || {
        let mut s = h2.sender.clone();
        async move { s.ready().await.is_err() || s.is_closed() }
    })
    .await;
    assert!(closed, "idle h2 connection still open after {:?}", started.elapsed());
    assert!(started.elapsed() >= Duration::from_millis(900), "closed after {:?}", started.elapsed());
}

/// An idle HTTP/2 client that never answers the PING of the GOAWAY that ends its
/// connection is closed a few seconds later, not kept for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_h2_client_that_never_answers_the_goaway_is_closed() {
    let b = Backend::start("app").await;
    let gw = idle_gateway(&b).await;
    let (mut tls, info) = tls_connect(gw.https, &TlsOpts::sni("app.test").alpn(&[b"h2"])).await.unwrap();
    assert_eq!(info.alpn.as_deref(), Some(&b"h2"[..]));
    // The preface and an empty SETTINGS frame; then nothing: no SETTINGS or PING ack.
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00").await.unwrap();
    let started = Instant::now();
    // Reads (the gateway's SETTINGS, its GOAWAY and PING) until the connection ends.
    let mut buf = [0u8; 4096];
    let closed = loop {
        match tokio::time::timeout(Duration::from_secs(12), tls.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => break true,
            Ok(Ok(_)) => {}
            Err(_) => break false,
        }
    };
    let took = started.elapsed();
    assert!(closed, "silent HTTP/2 client still connected after {took:?}");
    // idle_timeout (1 s), then at most 5 s for the GOAWAY's PING.
    assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(8), "closed after {took:?}");
    let counted_closed = wait_until_async(Duration::from_secs(2), || async {
        gw.metric("swarmgate_open_connections").await == Some(0.0)
    });
    assert!(counted_closed.await);
}

/// An HTTP/2 client that resets its streams as soon as their requests are under way (a
/// paced rapid reset, CVE-2023-44487) has its connection ended with GOAWAY after 100
/// such cancels: its resets no longer each cost a server request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_client_cancelling_request_after_request_is_sent_away() {
    let b = Backend::start("app").await;
    let gw = idle_gateway(&b).await;
    let (tls, _) = tls_connect(gw.https, &TlsOpts::sni("app.test").alpn(&[b"h2"])).await.unwrap();
    let h2 = H2::over(tls).await;
    let mut sent = 0;
    'attack: for _ in 0..40 {
        let mut batch = Vec::new();
        for _ in 0..10 {
            let mut sender = h2.sender.clone();
            if sender.ready().await.is_err() {
                break 'attack;
            }
            let req = req2("GET", "app.test", "/sleep?ms=2000").body(empty()).unwrap();
            // Dropped (aborted) below: hyper resets the stream (CANCEL).
            batch.push(tokio::spawn(async move { sender.send_request(req).await }));
            sent += 1;
        }
        // Long enough for the gateway to take the requests up (a reset before that is
        // h2's to count, not the gateway's).
        tokio::time::sleep(Duration::from_millis(80)).await;
        for task in batch {
            task.abort();
        }
        // Padding the gateway answers itself (421: the TLS name is app.test) does not
        // dilute the cancels.
        for _ in 0..15 {
            let mut sender = h2.sender.clone();
            if sender.ready().await.is_err() {
                break 'attack;
            }
            let req = req2("GET", "other.test", "/").body(empty()).unwrap();
            match sender.send_request(req).await {
                Ok(r) => assert_eq!(r.status(), 421),
                Err(_) => break 'attack,
            }
        }
    }
    let closed = wait_until_async(Duration::from_secs(8), || {
        let mut s = h2.sender.clone();
        async move { s.ready().await.is_err() || s.is_closed() }
    })
    .await;
    assert!(closed, "connection still open after {sent} cancelled requests");
    assert!(sent < 400, "all {sent} requests were sent: no GOAWAY");
    assert!(b.hits() < 200, "{} requests reached the server", b.hits());
    assert_eq!(gw.metric("swarmgate_h2_reset_floods_total").await, Some(1.0));
    assert!(gw.logs().contains("cancels most of its requests"), "{}", gw.logs());
    // Another connection is served as ever.
    let (tls, _) = tls_connect(gw.https, &TlsOpts::sni("app.test").alpn(&[b"h2"])).await.unwrap();
    assert_eq!(H2::over(tls).await.get("app.test", "/").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_tls_handshake_is_cut_off() {
    let b = Backend::start("app").await;
    let gw = idle_gateway(&b).await;
    let before = gw.metric("swarmgate_tls_handshake_errors_total").await.unwrap();
    let mut s = tokio::net::TcpStream::connect(gw.https).await.unwrap();
    let started = Instant::now();
    let (_, closed) = read_until_close(&mut s, Duration::from_secs(4)).await;
    let took = started.elapsed();
    assert!(closed, "silent TLS client still connected after {took:?}");
    assert!(took >= Duration::from_millis(900) && took < Duration::from_millis(2500), "closed after {took:?}");
    let after = gw.metric("swarmgate_tls_handshake_errors_total").await.unwrap();
    assert_eq!(after - before, 1.0);
}

/// Messages echoed through a tunnel, each followed by a quiet spell (longer than the
/// gateway's timeouts under test).
async fn echo_across_quiet_spells<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>, spell: Duration)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    for i in 0..3 {
        ws.send(Message::text(format!("m{i}"))).await.unwrap();
        let back = tokio::time::timeout(Duration::from_secs(2), ws.next()).await.expect("echo").unwrap().unwrap();
        assert_eq!(back, Message::text(format!("m{i}")));
        tokio::time::sleep(spell).await;
    }
    ws.send(Message::text("last")).await.unwrap();
    let back = tokio::time::timeout(Duration::from_secs(2), ws.next()).await.expect("echo").unwrap().unwrap();
    assert_eq!(back, Message::text("last"));
}

/// A WebSocket over an HTTP/2 connection (RFC 8441 extended CONNECT) to the backend's
/// `/ws` echo.
async fn h2_websocket(
    sender: &mut hyper::client::conn::http2::SendRequest<Body>,
) -> tokio_tungstenite::WebSocketStream<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>> {
    let mut req = req2("CONNECT", "app.test", "/ws").header("sec-websocket-version", "13").body(empty()).unwrap();
    req.extensions_mut().insert(hyper::ext::Protocol::from_static("websocket"));
    sender.ready().await.unwrap();
    let mut resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let upgraded = hyper::upgrade::on(&mut resp).await.unwrap();
    tokio_tungstenite::WebSocketStream::from_raw_socket(
        hyper_util::rt::TokioIo::new(upgraded),
        tokio_tungstenite::tungstenite::protocol::Role::Client,
        None,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_websocket_tunnel_outlives_idle_timeout() {
    let b = Backend::start("app").await;
    let gw = idle_gateway(&b).await;
    let (tls, _) = tls_connect(gw.https, &TlsOpts::sni("app.test").alpn(&[b"h2"])).await.unwrap();
    let mut h2 = H2::over(tls).await;
    assert_eq!(h2.get("app.test", "/").await.status, 200);
    let mut ws = h2_websocket(&mut h2.sender).await;
    echo_across_quiet_spells(&mut ws, Duration::from_millis(1300)).await;
    // The tunnel is an open stream: its connection was not closed as idle under it.
    assert_eq!(h2.get("app.test", "/").await.status, 200);
}

/// IDLE with `response_timeout = "1s"`: HTTP/2 streams that nothing moves for 2 s (the
/// longer of idle_timeout and a second past the longest response_timeout) are reset.
async fn stall_gateway(server: std::net::SocketAddr) -> Gateway {
    let pki = Pki::new();
    let (crt, key) = pki.leaf(&["app.test"]);
    let config = IDLE.replace("servers = [\"@B@\"]", "servers = [\"@B@\"]\nresponse_timeout = \"1s\"");
    Gateway::builder(&config).var("B", server).file("certs/app.crt", crt).file("certs/app.key", key).start().await
}

/// An HTTP/2 connection whose streams get a 64 KiB flow-control window, which the client
/// opens again only as it reads.
async fn h2_small_window(gw: &Gateway) -> hyper::client::conn::http2::SendRequest<Body> {
    let (tls, _) = tls_connect(gw.https, &TlsOpts::sni("app.test").alpn(&[b"h2"])).await.unwrap();
    let (sender, conn) = hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .initial_stream_window_size(65_535)
        .handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

/// Reads a body to its end or its first error: (bytes read, the error).
async fn drain(mut body: hyper::body::Incoming, pause: Duration) -> (usize, Option<hyper::Error>) {
    use http_body_util::BodyExt;
    let mut got = 0;
    loop {
        match body.frame().await {
            Some(Ok(frame)) => got += frame.data_ref().map_or(0, |d| d.len()),
            Some(Err(e)) => return (got, Some(e)),
            None => return (got, None),
        }
        tokio::time::sleep(pause).await;
    }
}

async fn upstream_in_flight(gw: &Gateway) -> u64 {
    let r = get(gw.admin, "admin", "/upstreams").await;
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    v["upstreams"][0]["servers"][0]["in_flight"].as_u64().unwrap()
}

/// An HTTP/2 client that takes none of a large response (its stream's flow-control
/// window stays shut) does not hold the server's request for good: once neither side
/// has moved the stream for the stall bound, it is reset and the server's request ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_stream_whose_client_takes_nothing_is_reset() {
    let b = Backend::start("app").await;
    let gw = stall_gateway(b.addr).await;
    let mut sender = h2_small_window(&gw).await;
    sender.ready().await.unwrap();
    let resp = sender.send_request(req2("GET", "app.test", "/big?mb=4").body(empty()).unwrap()).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(upstream_in_flight(&gw).await, 1, "the download holds its server request");
    let t = Instant::now();
    let released = wait_until_async(Duration::from_secs(8), || async { upstream_in_flight(&gw).await == 0 }).await;
    assert!(released, "a stream its client takes nothing of still holds its server request after {:?}", t.elapsed());
    let (got, error) = drain(resp.into_body(), Duration::ZERO).await;
    assert!(error.is_some() && got < 4 << 20, "the stalled stream was not reset: {got} bytes, error {error:?}");
    assert_eq!(gw.metric("swarmgate_h2_streams_stalled_total").await, Some(1.0));
    // Other streams are untouched.
    let (got, error) = drain(
        sender.send_request(req2("GET", "app.test", "/big?mb=1").body(empty()).unwrap()).await.unwrap().into_body(),
        Duration::ZERO,
    )
    .await;
    assert_eq!((got, error.is_none()), (1 << 20, true));
}

/// Movement from either side keeps a stream: a client taking a response a piece at a
/// time, and a server sending one a piece at a time, each over longer than the stall bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_stream_that_keeps_moving_is_not_reset() {
    let b = Backend::start("app").await;
    let gw = stall_gateway(b.addr).await;
    let mut sender = h2_small_window(&gw).await;
    sender.ready().await.unwrap();
    let upload = vec![b'x'; 256 * 1024];
    let resp = sender.send_request(req2("POST", "app.test", "/echo").body(full(upload)).unwrap()).await.unwrap();
    let t = Instant::now();
    let (got, error) = drain(resp.into_body(), Duration::from_millis(150)).await;
    assert_eq!((got, error.map(|e| e.to_string())), (256 * 1024, None));
    assert_eq!(gw.metric("swarmgate_h2_streams_stalled_total").await, Some(0.0));
    assert!(t.elapsed() > Duration::from_secs(2), "read too fast to show anything: {:?}", t.elapsed());

    let gw = stall_gateway(dribbling_server(Some(Duration::from_millis(250))).await).await;
    let mut sender = h2_small_window(&gw).await;
    sender.ready().await.unwrap();
    let resp = sender.send_request(req2("GET", "app.test", "/").body(empty()).unwrap()).await.unwrap();
    let collected = collect(resp).await.unwrap();
    assert_eq!((collected.status, collected.text().as_str()), (200, "still coming"));
}

/// A server that goes silent mid-body is cut by the body's own response_timeout, and not
/// taken (or counted) for a stream its client stalled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_server_is_not_counted_as_a_stalled_stream() {
    let gw = stall_gateway(dribbling_server(None).await).await;
    let mut sender = h2_small_window(&gw).await;
    sender.ready().await.unwrap();
    let resp = sender.send_request(req2("GET", "app.test", "/").body(empty()).unwrap()).await.unwrap();
    let t = Instant::now();
    let (got, error) = drain(resp.into_body(), Duration::ZERO).await;
    assert!(error.is_some() && got == 3, "{got} bytes, error {error:?}");
    assert!(t.elapsed() < Duration::from_millis(1900), "cut after {:?}", t.elapsed());
    assert_eq!(gw.metric("swarmgate_h2_streams_stalled_total").await, Some(0.0));
}

/// A tunnel over HTTP/2 (extended CONNECT) may idle: its quiet spells, longer than the
/// stall bound that resets a stream stuck in its response, do not end it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_websocket_tunnel_is_not_a_stalled_stream() {
    let b = Backend::start("app").await;
    let gw = stall_gateway(b.addr).await;
    let mut sender = h2_small_window(&gw).await;
    let mut ws = h2_websocket(&mut sender).await;
    echo_across_quiet_spells(&mut ws, Duration::from_millis(2500)).await;
}

/// In-flight counts (what p2c and drains rely on) come back down when a client gives up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_is_no_longer_in_flight() {
    let b = Backend::start("app").await;
    let gw = gateway(&b).await;
    let in_flight = |gw: &Gateway| {
        let admin = gw.admin;
        async move {
            let r = get(admin, "admin", "/upstreams").await;
            let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
            v["upstreams"][0]["servers"][0]["in_flight"].as_u64().unwrap()
        }
    };
    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut s = tokio::net::TcpStream::connect(gw.http).await.unwrap();
        s.write_all(b"GET /sleep?ms=600 HTTP/1.1\r\nHost: app.test\r\n\r\n").await.unwrap();
        clients.push(s);
    }
    assert!(wait_until_async(Duration::from_secs(2), || async { in_flight(&gw).await == 3 }).await);
    drop(clients);
    let t = Instant::now();
    let mut now = 3;
    while now != 0 && t.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(20)).await;
        now = in_flight(&gw).await;
    }
    assert_eq!(now, 0, "requests of gone clients still counted in flight");
    assert!(t.elapsed() < Duration::from_secs(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_websocket_tunnel_outlives_the_idle_timeouts() {
    let b = Backend::start("app").await;
    let gw = idle_gateway(&b).await;
    let tcp = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async("ws://app.test/ws", tcp).await.unwrap();
    echo_across_quiet_spells(&mut ws, Duration::from_millis(1300)).await;
}

/// A download that takes longer than the idle timeouts is not idleness.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_response_outlives_the_idle_timeouts() {
    let b = Backend::start("app").await;
    let gw = idle_gateway(&b).await;
    let mut c = H1::connect(gw.http).await;
    let r = c.get("app.test", "/sleep?ms=1800").await;
    assert_eq!(r.status, 200);
    let r = c.get("app.test", "/").await;
    assert_eq!(r.status, 200);
}

/// The head of a second request on a kept-alive connection gets header_read_timeout too,
/// however long idle_timeout is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_on_a_kept_alive_connection_is_cut_off() {
    let b = Backend::start("app").await;
    let gw = Gateway::builder(&IDLE.replace(r#"idle_timeout = "1s""#, r#"idle_timeout = "20s""#))
        .var("B", b.addr)
        .start()
        .await;
    let mut s = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n").await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    assert_eq!(raw_status(&buf[..n]), Some(200));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    s.write_all(b"GET / HTTP/1.1\r\nHost: app.te").await.unwrap();
    let (mut s, closed) = {
        let mut closed = false;
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if s.write_all(b"s").await.is_err() {
                closed = true;
                break;
            }
            let mut probe = [0u8; 64];
            match tokio::time::timeout(Duration::from_millis(1), s.read(&mut probe)).await {
                Ok(Ok(0)) | Ok(Err(_)) => {
                    closed = true;
                    break;
                }
                _ => {}
            }
        }
        (s, closed)
    };
    let took = started.elapsed();
    let _ = s.shutdown().await;
    assert!(closed, "slow second head still open after {took:?}");
    assert!(took < Duration::from_millis(2500), "closed only after {took:?}");
    assert_eq!(b.hits(), 1);
}

/// The soft and hard open-files limits of process `pid` (`/proc/PID/limits`).
fn open_files_limits(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap().to_string();
    let mut fields = line.split_whitespace().skip(3);
    (fields.next().unwrap().to_string(), fields.next().unwrap().to_string())
}

/// A container's low default soft limit on open files is raised to the hard limit at
/// start, so it does not cap the gateway far below `max_connections`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_soft_open_files_limit_is_raised_to_the_hard_one() {
    let b = Backend::start("app").await;
    let gw = Gateway::builder(IDLE).var("B", b.addr).open_files("-Sn 200").start().await;
    let (soft, hard) = open_files_limits(gw.pid());
    assert_ne!(soft, "200", "soft limit not raised (hard {hard})");
    assert_eq!(soft, hard);
}

/// With few descriptors, client connections are capped at half of them (less a reserve):
/// the rest wait in the backlog, and the gateway keeps descriptors for its servers and
/// its admin listener instead of running out (where `/healthz` and every new server
/// connection would fail).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_connections_are_capped_by_the_open_files_limit() {
    let b = Backend::start("app").await;
    let gw = Gateway::builder(&IDLE.replace(r#"idle_timeout = "1s""#, r#"idle_timeout = "30s""#))
        .var("B", b.addr)
        .open_files("-n 200")
        .start()
        .await;
    // (200 - 64) / 2 = 68 client connections at once.
    assert!(gw.logs().contains("at most 68 client connections"), "{}", gw.logs());
    let mut held = Vec::new();
    for _ in 0..250 {
        held.push(tokio::net::TcpStream::connect(gw.http).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(gw.metric("swarmgate_open_connections").await, Some(68.0));
    assert_eq!(gw.admin_get("/healthz").await.status, 200);
    // A request on an accepted connection reaches the server on a new connection.
    held[0].write_all(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n").await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), held[0].read(&mut buf)).await.unwrap().unwrap();
    assert_eq!(raw_status(&buf[..n]), Some(200), "{}", String::from_utf8_lossy(&buf[..n]));
    assert!(!gw.logs().contains("Too many open files"), "{}", gw.logs());
    // Closing accepted ones lets waiting ones in.
    drop(held.drain(..10));
    assert!(
        wait_until_async(Duration::from_secs(5), || async {
            gw.metric("swarmgate_open_connections").await == Some(68.0)
                && gw.metric("swarmgate_connections_total").await >= Some(78.0)
        })
        .await
    );
}

/// An HTTP/2 request is held to the field count of HTTP/1.1 heads (100): 431 over it, as
/// over HTTP/1.1; a browser's cookie crumbs count as the one field they are joined into.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_request_with_more_than_100_fields_is_431() {
    let b = Backend::start("app").await;
    let gw = idle_gateway(&b).await;
    let (tls, _) = tls_connect(gw.https, &TlsOpts::sni("app.test").alpn(&[b"h2"])).await.unwrap();
    let mut h2 = H2::over(tls).await;
    let with = |fields: usize, cookies: usize| {
        let mut req = req2("GET", "app.test", "/").body(empty()).unwrap();
        for i in 0..fields {
            req.headers_mut()
                .append(format!("x-f{i}").parse::<hyper::header::HeaderName>().unwrap(), "v".parse().unwrap());
        }
        for i in 0..cookies {
            req.headers_mut().append("cookie", format!("c{i}=v").parse().unwrap());
        }
        req
    };
    let r = h2.send(with(150, 0)).await.unwrap();
    assert_eq!((r.status, r.text()), (431, "431 request head too large\n".to_string()));
    // (90: the forwarding fields the gateway adds must fit the test server's 100 too.)
    let r = h2.send(with(90, 0)).await.unwrap();
    assert_eq!(r.status, 200, "{}\n{}", r.text(), gw.logs());
    // 85 fields and 60 cookie crumbs: 86 fields once joined.
    let r = h2.send(with(85, 60)).await.unwrap();
    assert_eq!(r.status, 200);
    let cookie = b.last().header("cookie").unwrap().to_string();
    assert!(cookie.starts_with("c0=v; c1=v") && cookie.ends_with("c59=v"), "{cookie}");
}

/// RFC 9113 section 8.2.1: an HTTP/2 field value with a space or tab at either end is
/// malformed; HTTP/1.1 has no room for one, so the server would read another value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_field_value_with_whitespace_at_an_end_is_400() {
    let b = Backend::start("app").await;
    let gw = idle_gateway(&b).await;
    let (tls, _) = tls_connect(gw.https, &TlsOpts::sni("app.test").alpn(&[b"h2"])).await.unwrap();
    let mut h2 = H2::over(tls).await;
    for value in [" a", "a ", "a\t", "\ta"] {
        let mut req = req2("GET", "app.test", "/").body(empty()).unwrap();
        req.headers_mut().insert("x-a", hyper::header::HeaderValue::from_str(value).unwrap());
        let r = h2.send(req).await.unwrap();
        assert_eq!(r.status, 400, "{value:?}");
    }
    assert_eq!(b.hits(), 0);
    // Whitespace within a value is no matter; the connection still serves.
    let mut req = req2("GET", "app.test", "/").body(empty()).unwrap();
    req.headers_mut().insert("x-a", hyper::header::HeaderValue::from_static("a b\tc"));
    assert_eq!(h2.send(req).await.unwrap().status, 200);
    assert_eq!(b.last().header("x-a"), Some("a b\tc"));
}

/// A burst of HTTP/2 streams can take more server connections than the open-files limit
/// leaves room for, and the pools then keep them idle: the first accept or connect that
/// fails for want of a descriptor closes the idle ones, so the admin listener and new
/// requests are served again at once, not when the pools' idle connections time out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_server_connections_are_shed_when_descriptors_run_out() {
    let b = Backend::start("app").await;
    let config = IDLE.replace(r#"idle_timeout = "1s""#, r#"idle_timeout = "60s""#);
    let gw = with_certificate(&config, &b).open_files("-n 200").start().await;
    // 190 streams at once on one connection: each its own server connection, more than
    // the 200 descriptors hold.
    let (tls, _) = tls_connect(gw.https, &TlsOpts::sni("app.test").alpn(&[b"h2"])).await.unwrap();
    let h2 = H2::over(tls).await;
    let mut streams = Vec::new();
    for _ in 0..190 {
        let mut sender = h2.sender.clone();
        streams.push(tokio::spawn(async move {
            sender.ready().await.ok()?;
            let req = req2("GET", "app.test", "/sleep?ms=500").body(empty()).unwrap();
            Some(sender.send_request(req).await.ok()?.status().as_u16())
        }));
    }
    let mut statuses = Vec::new();
    for s in streams {
        statuses.push(s.await.unwrap());
    }
    let ok = statuses.iter().filter(|s| **s == Some(200)).count();
    let overloaded = statuses.iter().filter(|s| **s == Some(503)).count();
    assert!(ok > 50 && overloaded > 0, "{ok} answered, {overloaded} overloaded: {statuses:?}");
    // The pools' idle connections were closed: the admin listener and a new client are
    // served now.
    let healthz = tokio::time::timeout(Duration::from_secs(5), gw.admin_get("/healthz")).await;
    assert_eq!(healthz.map(|r| r.status).ok(), Some(200), "{}", gw.logs());
    let r = tokio::time::timeout(Duration::from_secs(5), get(gw.http, "app.test", "/")).await;
    assert_eq!(r.map(|r| r.status).ok(), Some(200));
    assert!(gw.logs().contains("idle server connections closed"), "{}", gw.logs());
    assert_eq!(gw.metric("swarmgate_upstream_ejections_total{upstream=\"app\"}").await, Some(0.0));
}

/// A plain CONNECT is 405 (swarmgate is no forward proxy), on the plain port too, where
/// `redirect_https` would otherwise send it to https.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_connect_is_405_on_either_port() {
    let b = Backend::start("app").await;
    let gw = with_certificate(&IDLE.replace("redirect_https = false", "redirect_https = true"), &b).start().await;
    let connect = b"CONNECT app.test:443 HTTP/1.1\r\nHost: app.test:443\r\n\r\n";
    let mut s = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    s.write_all(connect).await.unwrap();
    let (bytes, _) = read_until_close(&mut s, Duration::from_secs(3)).await;
    assert_eq!(raw_status(&bytes), Some(405), "{}", String::from_utf8_lossy(&bytes));
    assert!(String::from_utf8_lossy(&bytes).ends_with("405 method not allowed\n"));
    let (mut tls, _) = tls_connect(gw.https, &TlsOpts::sni("app.test")).await.unwrap();
    tls.write_all(connect).await.unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(3), tls.read(&mut buf)).await.unwrap().unwrap();
    assert_eq!(raw_status(&buf[..n]), Some(405), "{}", String::from_utf8_lossy(&buf[..n]));
    assert_eq!(b.hits(), 0);
}
