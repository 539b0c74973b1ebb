//! The gateway's own HTTP/1.1 towards servers, against servers that answer with exact
//! bytes: interim responses, bodies delimited by close, early answers to uploads, and
//! responses too broken or ambiguous to pass on (502, never a guess).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

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
servers = ["@B@"]
retries = 0
"#;

/// A server that answers every request head it reads with `reply`, then closes the
/// connection if `close`, else waits for the next request on it.
struct Scripted {
    addr: std::net::SocketAddr,
    connections: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    /// The request heads read, in order.
    heads: Arc<Mutex<Vec<String>>>,
}

impl Scripted {
    async fn start(reply: &'static [u8], close: bool) -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (connections, requests) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let (c, r, h) = (Arc::clone(&connections), Arc::clone(&requests), Arc::clone(&heads));
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                let (r, h) = (Arc::clone(&r), Arc::clone(&h));
                tokio::spawn(async move {
                    while let Some(head) = read_request_head(&mut s).await {
                        h.lock().unwrap().push(String::from_utf8_lossy(&head).into_owned());
                        r.fetch_add(1, Ordering::SeqCst);
                        if s.write_all(reply).await.is_err() || close {
                            return;
                        }
                    }
                });
            }
        });
        Scripted { addr, connections, requests, heads }
    }
}

/// A server that answers each request head it reads (bodies unread) with `answer(head)`,
/// then waits `pause` before it reads the next one; and the connections it accepted.
async fn head_server(answer: fn(&[u8]) -> Vec<u8>, pause: Duration) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&connections);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            seen.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                while let Some(head) = read_request_head(&mut s).await {
                    if s.write_all(&answer(&head)).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(pause).await;
                }
            });
        }
    });
    (addr, connections)
}

async fn gateway(server: std::net::SocketAddr) -> Gateway {
    Gateway::builder(CONFIG).var("B", server).start().await
}

/// Sends `n` requests over one client connection through a gateway in front of `s`; each
/// must be answered with `status`, `body` and the server's `X-Final: yes`. Returns the
/// connections the server saw.
async fn get_n(s: &Scripted, n: usize, status: u16, body: &str) -> usize {
    let gw = gateway(s.addr).await;
    let mut c = H1::connect(gw.http).await;
    for _ in 0..n {
        let r = c.get("app.test", "/").await;
        assert_eq!((r.status, r.text().as_str(), r.header("x-final")), (status, body, Some("yes")));
    }
    s.connections.load(Ordering::SeqCst)
}

/// A server that refuses a POST without reading its body reads the body as the next
/// request on that connection, and answers it: that connection must not carry anyone's
/// next request, which would get the answer meant for the body's "request".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_whose_server_refused_a_body_unread_is_not_reused() {
    // Answers each head it reads with 401 and the head's target, taking its time before
    // it reads the next one.
    let answer = |head: &[u8]| {
        let head = String::from_utf8_lossy(head).into_owned();
        let target = head.split(' ').nth(1).unwrap_or("?").to_string();
        format!("HTTP/1.1 401 Unauthorized\r\nContent-Length: {}\r\n\r\n{target}", target.len()).into_bytes()
    };
    let (addr, connections) = head_server(answer, Duration::from_millis(300)).await;
    let gw = gateway(addr).await;
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: inside\r\n\r\n";
    let r = send(gw.http, req("POST", "app.test", "/upload").body(full(smuggled)).unwrap()).await;
    assert_eq!((r.status, r.text().as_str()), (401, "/upload"));
    // Before the server gets to the body: the next request must not go on its connection.
    let r = get(gw.http, "app.test", "/victim").await;
    assert_eq!((r.status, r.text().as_str()), (401, "/victim"), "another request's answer");
    assert_eq!(connections.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interim_responses_are_skipped_and_the_final_one_forwarded() {
    let s = Scripted::start(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n\
HTTP/1.1 201 Created\r\nContent-Length: 4\r\nX-Final: yes\r\n\r\ndone",
        false,
    )
    .await;
    assert_eq!(get_n(&s, 3, 201, "done").await, 1, "one kept-alive connection carried all three");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_delimited_by_close_arrives_whole_and_its_connection_is_not_reused() {
    let s = Scripted::start(b"HTTP/1.1 200 OK\r\nX-Final: yes\r\n\r\nuntil the server closes", true).await;
    assert_eq!(get_n(&s, 2, 200, "until the server closes").await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_with_extensions_and_trailers_arrives_whole_and_its_connection_is_kept() {
    let s = Scripted::start(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Final: yes\r\n\r\n\
3;x=y\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\nX-Sum: 19\r\n\r\n",
        false,
    )
    .await;
    assert_eq!(get_n(&s, 3, 200, "abc0123456789abcdef").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_servers_fields_reach_the_client_as_it_wrote_them() {
    let s = Scripted::start(
        b"HTTP/1.1 200 OK\r\nX-Mixed-Case: a\r\nSet-Cookie: a=1\r\nConnection: X-Private\r\nX-Private: 1\r\n\
set-cookie:b=2\r\nContent-Length: 2\r\nX-Final: yes\r\n\r\nok",
        false,
    )
    .await;
    let gw = gateway(s.addr).await;
    let request = b"GET / HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n";
    let (raw, closed) = raw_exchange(gw.http, request, Duration::from_secs(5)).await;
    let text = String::from_utf8_lossy(&raw);
    assert!(closed && text.starts_with("HTTP/1.1 200 OK\r\n") && text.ends_with("\r\n\r\nok"), "{text}");
    // In the server's order and case (Set-Cookie lines apart, as sent), without the fields
    // its Connection named, the length and connection fields the gateway's own.
    assert!(text.contains("\r\nX-Mixed-Case: a\r\nSet-Cookie: a=1\r\nset-cookie:b=2\r\nX-Final: yes\r\n"), "{text}");
    assert!(!text.to_ascii_lowercase().contains("x-private"), "{text}");
    assert!(!text.contains("Content-Length") && text.contains("\r\ncontent-length: 2\r\n"), "{text}");
    assert!(!text.contains("Connection: X-Private") && text.contains("\r\nconnection: close\r\n"), "{text}");
    // A client of hyper's reads the same fields.
    let mut c = H1::connect(gw.http).await;
    let r = c.get("app.test", "/").await;
    assert_eq!((r.status, r.text().as_str(), r.header("x-mixed-case")), (200, "ok", Some("a")));
    assert_eq!(r.header_all("set-cookie"), ["a=1", "b=2"]);
    assert!(r.header("x-private").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_fields_reach_the_server_as_it_wrote_them() {
    // The server closes after each answer and says so: the POST below never meets a
    // connection closing under it.
    let s = Scripted::start(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", true).await;
    let gw = gateway(s.addr).await;
    let fields = "User-Agent: probe/1\r\nHost: app.test\r\naccept:application/fhir+json\r\n\
                  X-Forwarded-For: 6.6.6.6\r\nConnection: close, X-Private\r\nX-Private: 1\r\nCookie: a=1\r\n\
                  Authorization:  Bearer t\r\ncookie: b=2\r\n";
    // Read by the gateway's own reader (no body), then by hyper's (a chunked body, empty:
    // nothing follows the head to the server, which closes after its answer).
    for (request, body) in [("GET /fhir/Patient?_count=2", ""), ("POST /fhir/Patient", "0\r\n\r\n")] {
        let framing = if body.is_empty() { "" } else { "Transfer-Encoding: chunked\r\n" };
        let raw = format!("{request} HTTP/1.1\r\n{fields}{framing}\r\n{body}");
        let (answer, _) = raw_exchange(gw.http, raw.as_bytes(), Duration::from_secs(5)).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n") && answer.ends_with("\r\n\r\nok"), "{answer}");
    }
    let heads = s.heads.lock().unwrap().clone();
    assert_eq!(heads.len(), 2, "{heads:?}");
    for head in &heads {
        // The spoofed address, Connection and the field it names never reach the server.
        let lower = head.to_ascii_lowercase();
        assert!(!lower.contains("x-private") && !lower.contains("6.6.6.6") && !lower.contains("connection"), "{head}");
        assert!(lower.contains("\r\nhost: app.test\r\n") && lower.contains("\r\nx-forwarded-for: 127.0.0.1\r\n"));
    }
    // The own reader's: in the client's order, case and spacing.
    assert!(heads[0].starts_with("GET /fhir/Patient?_count=2 HTTP/1.1\r\n"), "{}", heads[0]);
    let own = "\r\nUser-Agent: probe/1\r\naccept:application/fhir+json\r\nCookie: a=1\r\n\
               Authorization:  Bearer t\r\ncookie: b=2\r\n";
    assert!(heads[0].contains(own), "{}", heads[0]);
    let lower = heads[0].to_ascii_lowercase();
    assert!(!lower.contains("content-length") && !lower.contains("transfer-encoding"), "{}", heads[0]);
    // hyper's (names lower-cased, lines of one name together): the same fields.
    let lower = heads[1].to_ascii_lowercase();
    for line in [
        "user-agent: probe/1",
        "accept: application/fhir+json",
        "authorization: bearer t",
        "cookie: a=1",
        "cookie: b=2",
    ] {
        assert!(lower.contains(&format!("\r\n{line}\r\n")), "{line} in {}", heads[1]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_length_beside_transfer_encoding_is_not_passed_on() {
    // Framed by chunked: the stale length would cut the client's body to 3 bytes.
    let s = Scripted::start(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\nX-Final: yes\r\n\r\n\
a\r\n0123456789\r\n0\r\n\r\n",
        false,
    )
    .await;
    assert_eq!(get_n(&s, 2, 200, "0123456789").await, 2, "ambiguous framing: the connection is not reused");
}

/// A length the server repeated or listed (`5` twice, `5, 5`) reaches a client as the one
/// number it says (RFC 9110 section 8.6): an HTTP/2 client refuses a response with two
/// (RFC 9113 section 8.1.1), and one written as a list is no number to anyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_or_listed_length_reaches_the_client_once() {
    let config = CONFIG
        .replace(r#"https = """#, r#"https = "@HTTPS@""#)
        .replace("[limits]", "[proxy]\nredirect_https = false\n\n[limits]");
    for reply in [
        &b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Final: yes\r\nContent-Length: 5\r\n\r\nhello"[..],
        b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\nX-Final: yes\r\n\r\nhello",
    ] {
        let s = Scripted::start(reply, false).await;
        let gw = Gateway::builder(&config).var("B", s.addr).start().await;
        // The development certificate covers localhost.
        let (tls, _) = tls_connect(gw.https, &TlsOpts::sni("localhost").alpn(&[b"h2"])).await.unwrap();
        let r = H2::over(tls).await.get("localhost", "/").await;
        assert_eq!(
            (r.status, r.text().as_str(), r.header_all("content-length"), r.header("x-final")),
            (200, "hello", vec!["5".to_string()], Some("yes")),
            "HTTP/2, the server sent {:?}",
            String::from_utf8_lossy(reply)
        );
        let (raw, _) = raw_exchange(
            gw.http,
            b"GET / HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n",
            Duration::from_secs(5),
        )
        .await;
        let text = String::from_utf8_lossy(&raw).to_ascii_lowercase();
        assert!(text.ends_with("\r\n\r\nhello") && text.matches("content-length").count() == 1, "{text}");
        assert!(text.contains("\r\ncontent-length: 5\r\n"), "{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_or_ambiguous_responses_are_502() {
    for reply in [
        &b"HTTP/1.1 2OO OK\r\nContent-Length: 2\r\n\r\nok"[..],
        // RFC 9110 section 15: codes outside 100-599 are invalid.
        b"HTTP/1.1 600 Custom\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 999 Custom\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: -2\r\n\r\nok",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
        b"not http at all\r\n\r\n",
        // Transfer codings other than chunked: relayed, the client would take the coded
        // bytes for the content.
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nok",
    ] {
        let s = Scripted::start(reply, true).await;
        let gw = gateway(s.addr).await;
        let r = get(gw.http, "app.test", "/").await;
        assert_eq!(r.status, 502, "{}", String::from_utf8_lossy(reply));
        assert_eq!(s.requests.load(Ordering::SeqCst), 1);
    }
}

/// A status line of a later HTTP/1 minor version is read as HTTP/1.1 (RFC 9110 section
/// 2.5); another major version is no answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_http1_minor_version_is_read_as_http11() {
    for (reply, status) in [
        (&b"HTTP/1.2 200 OK\r\nContent-Length: 2\r\n\r\nok"[..], 200),
        (b"HTTP/1.9 404 Not Found\r\nContent-Length: 2\r\n\r\nno", 404),
        (b"HTTP/2.0 200 OK\r\nContent-Length: 2\r\n\r\nok", 502),
    ] {
        let s = Scripted::start(reply, true).await;
        let gw = gateway(s.addr).await;
        let r = get(gw.http, "app.test", "/").await;
        assert_eq!(r.status, status, "{}", String::from_utf8_lossy(reply));
        if status != 502 {
            assert_eq!(r.body.len(), 2);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_field_naming_more_fields_than_a_message_has_is_refused() {
    // 101 names: a client's request is a 400 and never reaches a server, whichever reader
    // reads it (none, or a body), and a server's response is a 502.
    let names: Vec<String> = (0..101).map(|i| format!("x-{i}")).collect();
    let names = names.join(", ");
    let s = Scripted::start(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", true).await;
    let gw = gateway(s.addr).await;
    for body in ["", "Content-Length: 2\r\n\r\nhi"] {
        let head_end = if body.is_empty() { "\r\n" } else { "" };
        let raw = format!("GET / HTTP/1.1\r\nHost: app.test\r\nConnection: close, {names}\r\n{head_end}{body}");
        let (answer, _) = raw_exchange(gw.http, raw.as_bytes(), Duration::from_secs(5)).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    }
    assert_eq!(s.requests.load(Ordering::SeqCst), 0);
    // The same Connection with 100 names is served.
    let fewer: Vec<String> = (0..100).map(|i| format!("x-{i}")).collect();
    let raw = format!("GET / HTTP/1.1\r\nHost: app.test\r\nConnection: close, {}\r\n\r\n", fewer.join(", "));
    let (answer, _) = raw_exchange(gw.http, raw.as_bytes(), Duration::from_secs(5)).await;
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200 "));
    let reply = format!("HTTP/1.1 200 OK\r\nConnection: {names}\r\nContent-Length: 2\r\n\r\nok");
    let s = Scripted::start(reply.leak().as_bytes(), true).await;
    let gw = gateway(s.addr).await;
    assert_eq!(get(gw.http, "app.test", "/").await.status, 502);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_head_too_large_is_502() {
    let reply = format!("HTTP/1.1 200 OK\r\nX-Huge: {}\r\nContent-Length: 0\r\n\r\n", "a".repeat(70 * 1024));
    let s = Scripted::start(reply.leak().as_bytes(), true).await;
    let gw = gateway(s.addr).await;
    assert_eq!(get(gw.http, "app.test", "/").await.status, 502);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_cut_short_by_the_server_is_not_completed() {
    let s = Scripted::start(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part", true).await;
    let gw = gateway(s.addr).await;
    let mut c = TcpStream::connect(gw.http).await.unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n").await.unwrap();
    let (bytes, closed) = read_until_close(&mut c, Duration::from_secs(5)).await;
    let text = String::from_utf8_lossy(&bytes);
    // Whatever of it was passed on, the client never sees a whole response.
    assert!(closed, "the client's connection must be closed: its response cannot be completed: {text}");
    let body = text.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    assert!(body.len() < 100, "{text}");
    assert_eq!(s.requests.load(Ordering::SeqCst), 1);
}

/// A server that refuses every upload from its head alone and does not read the body;
/// after answering it holds the connection open for `hold`, or closes it at once (a
/// close with unread data is a reset).
async fn refusing_server(hold: Option<Duration>) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                if read_request_head(&mut s).await.is_some() {
                    let _ = s.write_all(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 8\r\n\r\ntoo big\n").await;
                    if let Some(hold) = hold {
                        tokio::time::sleep(hold).await;
                    }
                }
            });
        }
    });
    addr
}

/// Starts a 1 MiB upload through the gateway (the client keeps sending in the background)
/// and returns what the client reads until the early answer's body.
async fn upload_and_read_answer(gw: &Gateway) -> Vec<u8> {
    let c = TcpStream::connect(gw.http).await.unwrap();
    let (mut rd, mut wr) = c.into_split();
    tokio::spawn(async move {
        // More than retry_body_bytes: streamed. Errors are expected once the gateway
        // has answered and closed.
        let _ = wr.write_all(b"POST /upload HTTP/1.1\r\nHost: app.test\r\nContent-Length: 1048576\r\n\r\n").await;
        for _ in 0..16 {
            if wr.write_all(&[b'x'; 64 * 1024]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.ends_with(b"too big\n") {
        match tokio::time::timeout(Duration::from_secs(5), rd.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            other => panic!("no early answer: {other:?}, got {}", String::from_utf8_lossy(&got)),
        }
    }
    got
}

/// A server that answers a request's head at once with `200 ok`, then reads its whole
/// body (as nginx does for a `return 200` to a POST), counting the body bytes it read.
async fn answers_then_reads() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let read = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&read);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let counted = Arc::clone(&counted);
            tokio::spawn(async move {
                while let Some(head) = read_request_head(&mut s).await {
                    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
                    let length: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map_or(0, |v| v.trim().parse().unwrap());
                    if s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await.is_err() {
                        return;
                    }
                    let (mut left, mut buf) = (length, vec![0; 65536]);
                    while left > 0 {
                        let n = s.read(&mut buf[..left.min(65536)]).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        left -= n;
                        counted.fetch_add(n, Ordering::SeqCst);
                    }
                }
            });
        }
    });
    (addr, read)
}

/// A server that answers an upload at once and then reads it: the rest of the client's
/// body still goes to the server after the answer has ended, and the client's connection
/// carries its next request (it was closed under the client still sending: a broken pipe).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_answered_at_once_is_still_sent_whole_and_its_connection_kept() {
    let (addr, read) = answers_then_reads().await;
    let gw = gateway(addr).await;
    let mut s = TcpStream::connect(gw.http).await.unwrap();
    let total = 1 << 20;
    s.write_all(format!("POST /up HTTP/1.1\r\nHost: app.test\r\nContent-Length: {total}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let (mut reader, mut writer) = s.into_split();
    let sender = tokio::spawn(async move {
        let piece = vec![b'x'; 64 * 1024];
        for _ in 0..total / piece.len() {
            writer.write_all(&piece).await?;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        writer.write_all(b"GET /next HTTP/1.1\r\nHost: app.test\r\n\r\n").await?;
        Ok::<_, std::io::Error>(writer)
    });
    let mut got = Vec::new();
    let mut buf = vec![0; 4096];
    let answered = tokio::time::timeout(Duration::from_secs(10), async {
        while raw_response_count(&got) < 2 {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&got);
    assert!(answered.is_ok() && raw_response_count(&got) == 2, "two answers on the connection: {text}\n{}", gw.logs());
    assert!(sender.await.unwrap().is_ok(), "the upload was cut: {text}");
    assert!(!text.to_ascii_lowercase().contains("connection: close"), "{text}");
    assert_eq!(read.load(Ordering::SeqCst), total, "the server read the whole upload");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_answer_to_an_upload_reaches_the_client() {
    let gw = gateway(refusing_server(Some(Duration::from_secs(10))).await).await;
    let got = upload_and_read_answer(&gw).await;
    assert_eq!(raw_status(&got), Some(413), "{}", String::from_utf8_lossy(&got));
    // The rest of the upload will not be read: the answer says the connection ends.
    assert!(says_close(&got), "{}", String::from_utf8_lossy(&got));
}

/// Whether a raw response's head has `Connection: close`.
fn says_close(raw: &[u8]) -> bool {
    let text = String::from_utf8_lossy(raw).to_ascii_lowercase();
    let head = text.split("\r\n\r\n").next().unwrap_or("");
    head.split("\r\n").any(|line| line == "connection: close")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_answer_then_a_reset_still_reaches_the_client_and_ejects_nothing() {
    let gw = gateway(refusing_server(None).await).await;
    for _ in 0..4 {
        let got = upload_and_read_answer(&gw).await;
        assert_eq!(raw_status(&got), Some(413), "{}", String::from_utf8_lossy(&got));
        assert!(says_close(&got), "{}", String::from_utf8_lossy(&got));
    }
    let v: serde_json::Value = serde_json::from_slice(&gw.admin_get("/upstreams").await.body).unwrap();
    assert_eq!(v["upstreams"][0]["servers"][0]["ejected"], false, "{v}");
}

/// A response's first read gets the room the connection's last response needed (a small
/// buffer after a small one): a large body after small ones, and small ones after it, all
/// arrive whole over one kept server connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_of_any_size_arrive_whole_whatever_the_last_one_needed() {
    const BIG: usize = 100 * 1024;
    let answer = |head: &[u8]| {
        let body = if head.starts_with(b"GET /big") { vec![b'x'; BIG] } else { b"small".to_vec() };
        let mut reply = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
        reply.extend_from_slice(&body);
        reply
    };
    let (addr, connections) = head_server(answer, Duration::ZERO).await;
    let gw = gateway(addr).await;
    let mut c = H1::connect(gw.http).await;
    for path in ["/small", "/small", "/big", "/big", "/small", "/big", "/small"] {
        let r = c.get("app.test", path).await;
        assert_eq!(r.status, 200, "{path}");
        if path == "/big" {
            assert_eq!(r.body.len(), BIG, "{path}");
            assert!(r.body.iter().all(|&b| b == b'x'), "{path}");
        } else {
            assert_eq!(r.text(), "small", "{path}");
        }
    }
    assert_eq!(connections.load(Ordering::SeqCst), 1, "the server connection was not kept");
}

/// A server that answers every request, except one that arrives on a connection idle for
/// more than `idle` since its last answer: that one it reads, writes `last_words` and
/// closes the connection, as a server does whose keep-alive timeout fires just as the
/// request goes out (with no last words, nothing reaches the gateway after the request).
/// Counts connections and requests.
async fn closes_idle_connections_on_the_next_request(
    idle: Duration,
    last_words: &'static [u8],
) -> (std::net::SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (connections, requests) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (c, r) = (Arc::clone(&connections), Arc::clone(&requests));
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            let r = Arc::clone(&r);
            tokio::spawn(async move {
                let mut answered_at = None::<std::time::Instant>;
                while let Some(head) = read_request_head(&mut s).await {
                    let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
                    let length = text
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map_or(0, |v| v.trim().parse::<usize>().unwrap());
                    let mut body = vec![0u8; length];
                    if s.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    r.fetch_add(1, Ordering::SeqCst);
                    if answered_at.is_some_and(|t| t.elapsed() > idle) {
                        let _ = s.write_all(last_words).await;
                        return; // closed, unanswered
                    }
                    let reply = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{}",
                        length,
                        String::from_utf8_lossy(&body)
                    );
                    if s.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                    answered_at = Some(std::time::Instant::now());
                }
            });
        }
    });
    (addr, connections, requests)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_closing_an_idle_connection_as_the_request_goes_out_fails_no_request() {
    let (addr, connections, _) = closes_idle_connections_on_the_next_request(Duration::from_millis(300), b"").await;
    let gw = gateway(addr).await; // one server, retries = 0
    let mut c = H1::connect(gw.http).await;
    assert_eq!(c.get("app.test", "/").await.status, 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // A GET may be sent twice: once more, on a new connection to the same server.
    let r = c.get("app.test", "/again").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(connections.load(Ordering::SeqCst), 2);
    // So may a PUT with a small body (it goes with the head): the body arrives whole on the
    // new connection (the server answers with what it read).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let put = req("PUT", "app.test", "/record").body(full("the record")).unwrap();
    let r = c.send(put).await.unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "the record"));
    assert_eq!(connections.load(Ordering::SeqCst), 3, "the PUT went again on a new connection");
    // A POST may not: it takes no connection idle for 2 s or more, so it meets none that
    // the server is closing.
    let post = |body: &'static str| req("POST", "app.test", "/order").body(full(body)).unwrap();
    assert_eq!(c.send(post("first")).await.unwrap().status, 200);
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let r = c.send(post("second")).await.unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "second"));
    assert_eq!(connections.load(Ordering::SeqCst), 4, "the POST went on a new connection");
}

/// A server seen to close idle connections sooner than the 2 s a POST's connection may
/// have idled (here: a GET sent again after it closed one idle for 500 ms) gets POSTs only
/// on connections idle for under half that, or on new ones: none is lost to its closing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_seen_to_close_idle_connections_soon_loses_no_post() {
    let (addr, connections, _) = closes_idle_connections_on_the_next_request(Duration::from_millis(300), b"").await;
    let gw = gateway(addr).await; // one server, retries = 0
    let mut c = H1::connect(gw.http).await;
    assert_eq!(c.get("app.test", "/").await.status, 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(c.get("app.test", "/again").await.status, 200, "sent again on a new connection");
    assert_eq!(connections.load(Ordering::SeqCst), 2);
    for i in 0..3 {
        tokio::time::sleep(Duration::from_millis(450)).await; // under 2 s, over the server's 300 ms
        let body = format!("order {i}");
        let r = c.send(req("POST", "app.test", "/order").body(full(body.clone())).unwrap()).await.unwrap();
        assert_eq!((r.status, r.text()), (200, body), "POST {i}");
    }
    assert_eq!(connections.load(Ordering::SeqCst), 5, "each POST went on a new connection");
    // Each made way for its own: the pool does not grow by one per POST.
    let v: serde_json::Value = serde_json::from_slice(&gw.admin_get("/upstreams").await.body).unwrap();
    assert_eq!(v["upstreams"][0]["servers"][0]["idle_connections"], 1, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_server_began_to_answer_is_not_sent_again() {
    // The server starts an answer on the stale connection, then closes: it did see the
    // request, so even a GET is not sent twice (a 502).
    let (addr, connections, requests) =
        closes_idle_connections_on_the_next_request(Duration::from_millis(300), b"HTTP/1.1 200 OK\r\nContent-Le").await;
    let gw = gateway(addr).await;
    let mut c = H1::connect(gw.http).await;
    assert_eq!(c.get("app.test", "/").await.status, 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(c.get("app.test", "/again").await.status, 502);
    assert_eq!((requests.load(Ordering::SeqCst), connections.load(Ordering::SeqCst)), (2, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_servers_reason_phrase_reaches_the_client() {
    // As the server wrote it, on both readers (a request without a body is the gateway's
    // own, one with a body hyper's); a code with no phrase anywhere gets an empty one.
    for (reply, line) in [
        (&b"HTTP/1.1 200 Everything Fine\r\nContent-Length: 2\r\n\r\nok"[..], "HTTP/1.1 200 Everything Fine\r\n"),
        (
            b"HTTP/1.1 499 Client Closed Request\r\nContent-Length: 2\r\n\r\nok",
            "HTTP/1.1 499 Client Closed Request\r\n",
        ),
        (b"HTTP/1.1 599\r\nContent-Length: 2\r\n\r\nok", "HTTP/1.1 599 \r\n"),
        (b"HTTP/1.1 404\r\nContent-Length: 2\r\n\r\nok", "HTTP/1.1 404 Not Found\r\n"),
    ] {
        let s = Scripted::start(reply, true).await;
        let gw = gateway(s.addr).await;
        for request in [
            &b"GET / HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nHost: app.test\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi",
        ] {
            let (raw, _) = raw_exchange(gw.http, request, Duration::from_secs(5)).await;
            let text = String::from_utf8_lossy(&raw);
            assert!(text.starts_with(line), "{:?} answered {text:?}", String::from_utf8_lossy(&request[..4]));
            assert!(text.ends_with("\r\n\r\nok"), "{text}");
        }
    }
}
