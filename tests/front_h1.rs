//! The gateway's own HTTP/1.1 reader and writer (requests without a body), over raw
//! sockets: pipelining across it and hyper (which takes requests with a body), HTTP/1.0
//! framing and keep-alive, HEAD, `Date`, and a client that leaves before its response.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CONFIG: &str = r#"
[listen]
http = "@HTTP@"
https = ""
admin = "@ADMIN@"

[proxy]
shutdown_delay = "0s"
redirect_https = false

[[route]]
host = "*"
upstream = "app"

[upstream.app]
servers = ["@B@"]
"#;

async fn setup() -> (Gateway, Backend) {
    let b = Backend::start("app").await;
    let gw = Gateway::builder(CONFIG).var("B", b.addr).start().await;
    (gw, b)
}

/// One response as read off the wire.
#[derive(Debug)]
struct Raw {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// Reads responses off one connection, framed as RFC 9112 says.
struct Reader {
    s: TcpStream,
    buf: Vec<u8>,
    closed: bool,
    /// The protocol version of the last status line read.
    version: String,
}

impl Reader {
    fn new(s: TcpStream) -> Self {
        Reader { s, buf: Vec::new(), closed: false, version: String::new() }
    }

    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 16 * 1024];
        match tokio::time::timeout(Duration::from_secs(5), self.s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                self.closed = true;
                false
            }
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
            Err(_) => panic!("no response within 5 s; read so far: {:?}", String::from_utf8_lossy(&self.buf)),
        }
    }

    /// The next response; `head` says it answers a HEAD request (no body).
    async fn next(&mut self, head: bool) -> Raw {
        let end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            assert!(self.fill().await, "closed before a whole head: {:?}", String::from_utf8_lossy(&self.buf));
        };
        let text = String::from_utf8(self.buf.drain(..end).collect()).unwrap();
        let mut lines = text.split("\r\n");
        let (version, rest) = lines.next().unwrap().split_once(' ').unwrap();
        self.version = version.to_string();
        let status = rest[..3].parse().unwrap();
        let headers: Vec<(String, String)> = lines
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (n, v) = l.split_once(':').unwrap();
                (n.to_ascii_lowercase(), v.trim().to_string())
            })
            .collect();
        let mut raw = Raw { status, headers, body: Vec::new() };
        if head || status == 204 || status == 304 {
            return raw;
        }
        if let Some(len) = raw.header("content-length") {
            let len: usize = len.parse().unwrap();
            while self.buf.len() < len {
                assert!(self.fill().await, "closed inside a body");
            }
            raw.body = self.buf.drain(..len).collect();
        } else if raw.header("transfer-encoding") == Some("chunked") {
            loop {
                let line_end = loop {
                    if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                        break i;
                    }
                    assert!(self.fill().await, "closed inside a chunk line");
                };
                let size = usize::from_str_radix(std::str::from_utf8(&self.buf[..line_end]).unwrap(), 16).unwrap();
                self.buf.drain(..line_end + 2);
                if size == 0 {
                    // Trailer section (empty here unless asked for) up to the blank line.
                    while !self.buf.windows(2).any(|w| w == b"\r\n") {
                        assert!(self.fill().await);
                    }
                    let end = self.buf.windows(2).position(|w| w == b"\r\n").unwrap();
                    self.buf.drain(..end + 2);
                    break;
                }
                while self.buf.len() < size + 2 {
                    assert!(self.fill().await, "closed inside a chunk");
                }
                raw.body.extend(self.buf.drain(..size));
                self.buf.drain(..2);
            }
        } else {
            while self.fill().await {}
            raw.body = std::mem::take(&mut self.buf);
        }
        raw
    }

    /// Whether the gateway closes the connection (nothing more arrives) within 2 s.
    async fn closes(&mut self) -> bool {
        let mut chunk = [0u8; 1024];
        matches!(tokio::time::timeout(Duration::from_secs(2), self.s.read(&mut chunk)).await, Ok(Ok(0)) | Ok(Err(_)))
    }
}

async fn connect(gw: &Gateway) -> Reader {
    Reader::new(TcpStream::connect(gw.http).await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_with_and_without_bodies_are_answered_in_order() {
    let (gw, b) = setup().await;
    let mut r = connect(&gw).await;
    // Bodiless, with a body (hyper's), bodiless again, all in one write, twice over.
    let batch = b"GET /one HTTP/1.1\r\nHost: app.test\r\n\r\n\
        POST /two HTTP/1.1\r\nHost: app.test\r\nContent-Length: 5\r\n\r\nhello\
        GET /three HTTP/1.1\r\nHost: app.test\r\n\r\n";
    for _ in 0..2 {
        r.s.write_all(batch).await.unwrap();
        for _ in 0..3 {
            let resp = r.next(false).await;
            assert_eq!(resp.status, 200, "{resp:?}");
            assert_eq!(resp.body, b"app");
            assert!(resp.header("date").is_some_and(|d| d.ends_with(" GMT")), "no Date: {resp:?}");
        }
    }
    let seen: Vec<(String, String)> =
        b.requests().iter().map(|q| (q.uri.clone(), String::from_utf8_lossy(&q.body).into_owned())).collect();
    let one = [("/one", ""), ("/two", "hello"), ("/three", "")].map(|(u, b)| (u.to_string(), b.to_string()));
    assert_eq!(seen, [one.clone(), one].concat());
    // The gateway's own answers carry a Date too.
    r.s.write_all(b"GET /x HTTP/1.1\r\nHost: other.test:99999\r\n\r\n").await.unwrap();
    let resp = r.next(false).await;
    assert!(resp.header("date").is_some(), "{resp:?}");
}

/// A client that half-closes behind pipelined requests: those read before its end of
/// stream was seen are answered; the one in flight when it is seen is dropped, its server
/// request cancelled (hyper's and nginx's default too: an end of stream mid-request reads
/// as a client gone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_close_behind_pipelined_requests_still_gets_the_first_answered() {
    let (gw, b) = setup().await;
    let mut r = connect(&gw).await;
    let two = b"GET /sleep?ms=200 HTTP/1.1\r\nHost: app.test\r\n\r\nGET /b HTTP/1.1\r\nHost: app.test\r\n\r\n";
    r.s.write_all(two).await.unwrap();
    r.s.shutdown().await.unwrap();
    let first = r.next(false).await;
    assert_eq!((first.status, first.body.as_slice()), (200, &b"app"[..]), "{first:?}");
    assert!(r.closes().await, "the connection stayed open after the client's end of stream");
    assert_eq!(b.requests().first().map(|q| q.uri.as_str()), Some("/sleep?ms=200"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http10_clients_get_close_delimited_bodies_and_keep_alive_when_asked() {
    let (gw, _b) = setup().await;
    // A body of unknown length (the server chunks it): to HTTP/1.1 chunked, to HTTP/1.0
    // until close.
    let mut r = connect(&gw).await;
    r.s.write_all(b"GET /trailers HTTP/1.1\r\nHost: app.test\r\n\r\n").await.unwrap();
    let resp = r.next(false).await;
    assert_eq!(resp.header("transfer-encoding"), Some("chunked"), "{resp:?}");
    assert_eq!(resp.body, b"hello world");

    let mut r = connect(&gw).await;
    r.s.write_all(b"GET /trailers HTTP/1.0\r\nHost: app.test\r\nConnection: keep-alive\r\n\r\n").await.unwrap();
    let resp = r.next(false).await;
    assert_eq!(r.version, "HTTP/1.0", "an HTTP/1.0 client is answered in its version");
    assert_eq!(resp.header("transfer-encoding"), None, "{resp:?}");
    assert_eq!(resp.header("connection"), Some("close"), "{resp:?}");
    assert_eq!(resp.body, b"hello world");
    assert!(r.closed, "the connection did not end the body");

    // A known length: HTTP/1.0 keep-alive holds, and is said.
    let mut r = connect(&gw).await;
    for path in ["/a", "/b"] {
        let req = format!("GET {path} HTTP/1.0\r\nHost: app.test\r\nConnection: keep-alive\r\n\r\n");
        r.s.write_all(req.as_bytes()).await.unwrap();
        let resp = r.next(false).await;
        assert_eq!((resp.status, resp.header("connection")), (200, Some("keep-alive")), "{resp:?}");
        assert_eq!(resp.body, b"app");
    }
    // Without keep-alive, HTTP/1.0 gets one response and the end of the connection.
    r.s.write_all(b"GET /c HTTP/1.0\r\nHost: app.test\r\n\r\n").await.unwrap();
    let resp = r.next(false).await;
    assert_eq!((resp.status, resp.header("connection")), (200, Some("close")), "{resp:?}");
    assert!(r.closes().await, "an HTTP/1.0 connection without keep-alive stayed open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_answers_carry_the_length_and_no_body() {
    let (gw, b) = setup().await;
    let mut r = connect(&gw).await;
    r.s.write_all(b"HEAD /big?mb=1 HTTP/1.1\r\nHost: app.test\r\n\r\nGET /after HTTP/1.1\r\nHost: app.test\r\n\r\n")
        .await
        .unwrap();
    let head = r.next(true).await;
    assert_eq!((head.status, head.header("content-length")), (200, Some("1048576")), "{head:?}");
    // Had a byte of body followed the HEAD answer, this would not parse as a response.
    let next = r.next(false).await;
    assert_eq!((next.status, next.body.as_slice()), (200, &b"app"[..]), "{next:?}");
    assert_eq!(b.requests().iter().map(|q| q.method.as_str()).collect::<Vec<_>>(), ["HEAD", "GET"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_cancels_its_request_to_the_server() {
    let (gw, b) = setup().await;
    let mut s = TcpStream::connect(gw.http).await.unwrap();
    s.write_all(b"GET /sleep?ms=4000 HTTP/1.1\r\nHost: app.test\r\n\r\n").await.unwrap();
    assert!(wait_until(Duration::from_secs(2), || b.in_flight() == 1).await, "the request never reached the server");
    let left = Instant::now();
    drop(s);
    // The gateway drops its side: the server sees its connection go and stops working.
    assert!(
        wait_until(Duration::from_secs(2), || b.in_flight() == 0).await,
        "the server still works for a client that left {:?} ago",
        left.elapsed()
    );
    // Another request on a new connection is served as usual.
    let mut r = connect(&gw).await;
    r.s.write_all(b"GET /a HTTP/1.1\r\nHost: app.test\r\n\r\n").await.unwrap();
    assert_eq!(r.next(false).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_split_across_writes_is_served_and_a_bad_one_gets_400() {
    let (gw, _b) = setup().await;
    let mut r = connect(&gw).await;
    for part in ["GE", "T /a HTTP/1.1\r\nHo", "st: app.test\r\n", "\r\n"] {
        r.s.write_all(part.as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(r.next(false).await.status, 200);
    // A malformed head after a good one is hyper's to refuse, on the same connection.
    r.s.write_all(b"GET /a HTTP/1.1\r\nBad Header: x\r\n\r\n").await.unwrap();
    assert_eq!(r.next(false).await.status, 400);
}
