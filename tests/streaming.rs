//! Bodies stream through the gateway: 256 MiB up and down while its resident memory stays
//! small, full-duplex echo, and trailers passed on to HTTP/1.1 and HTTP/2 clients.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use http_body_util::BodyExt;
use support::*;

const CONFIG: &str = r#"
[listen]
http = "@HTTP@"
https = "@HTTPS@"
admin = "@ADMIN@"

[runtime]
workers = 2

[proxy]
redirect_https = false

[tls]
certs_dir = "certs"

[[route]]
host = "*"
upstream = "app"

[upstream.app]
servers = ["@B@"]
response_timeout = "60s"
"#;

const MIB: u64 = 1 << 20;
/// Bytes moved each way.
const SIZE: u64 = 256 * MIB;
/// The gateway's resident memory must stay under this while it moves SIZE bytes.
const RSS_LIMIT_KIB: u64 = 64 * 1024;

async fn setup() -> (Gateway, Backend, Pki) {
    let pki = Pki::new();
    let (crt, key) = pki.leaf(&["stream.test"]);
    let b = Backend::start("app").await;
    let gw = Gateway::builder(CONFIG)
        .var("B", b.addr)
        .file("certs/s.crt", crt)
        .file("certs/s.key", key)
        .env("SWARMGATE_LOG", "info")
        .start()
        .await;
    (gw, b, pki)
}

/// Samples the gateway's RSS every 20 ms until stopped; returns the peak (KiB).
fn watch_rss(gw: &Gateway) -> (Arc<AtomicBool>, tokio::task::JoinHandle<u64>) {
    let stop = Arc::new(AtomicBool::new(false));
    let pid = gw.pid();
    let stop2 = Arc::clone(&stop);
    let task = tokio::spawn(async move {
        let mut peak = 0;
        while !stop2.load(Ordering::SeqCst) {
            if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
                let kib = status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                    .unwrap_or(0);
                peak = peak.max(kib);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        peak
    });
    (stop, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_256_mib_streams_through_small_memory() {
    let (gw, b, _) = setup().await;
    let base = gw.rss_kib();
    let (stop, peak) = watch_rss(&gw);
    let r = send(gw.http, req("POST", "app.test", "/sink").body(pattern_body(SIZE, 64 * 1024)).unwrap()).await;
    stop.store(true, Ordering::SeqCst);
    let peak = peak.await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), format!("{SIZE} pattern"));
    assert_eq!(b.hits(), 1);
    eprintln!("upload: gateway RSS {base} KiB before, peak {peak} KiB");
    assert!(peak < RSS_LIMIT_KIB, "gateway RSS peaked at {peak} KiB moving {SIZE} bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_256_mib_streams_through_small_memory() {
    let (gw, _b, _) = setup().await;
    let base = gw.rss_kib();
    let (stop, peak) = watch_rss(&gw);
    let mut c = H1::connect(gw.http).await;
    c.sender.ready().await.unwrap();
    let resp = c
        .sender
        .send_request(req("GET", "app.test", &format!("/big?mb={}", SIZE / MIB)).body(empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers().get("content-length").unwrap().to_str().unwrap(), SIZE.to_string());
    let mut body = resp.into_body();
    let mut got = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.unwrap();
        if let Some(d) = frame.data_ref() {
            assert!(is_pattern(got, d), "corrupt data at offset {got}");
            got += d.len() as u64;
        }
    }
    stop.store(true, Ordering::SeqCst);
    let peak = peak.await.unwrap();
    assert_eq!(got, SIZE);
    eprintln!("download: gateway RSS {base} KiB before, peak {peak} KiB");
    assert!(peak < RSS_LIMIT_KIB, "gateway RSS peaked at {peak} KiB moving {SIZE} bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_is_full_duplex() {
    let (gw, _b, _) = setup().await;
    // The server streams the body back while it is still being sent: a gateway that
    // waited for the whole request before answering would still work, but one that
    // buffered either direction would show in RSS; here the order of bytes is checked.
    let total = 32 * MIB;
    let mut c = H1::connect(gw.http).await;
    c.sender.ready().await.unwrap();
    let resp = c
        .sender
        .send_request(req("POST", "app.test", "/echo").body(pattern_body(total, 16 * 1024)).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // An answer that takes the body as it comes does not end the client's connection.
    assert_eq!(resp.headers().get("connection"), None);
    let mut body = resp.into_body();
    let got = Arc::new(AtomicU64::new(0));
    while let Some(frame) = body.frame().await {
        if let Some(d) = frame.unwrap().data_ref() {
            let at = got.load(Ordering::SeqCst);
            assert!(is_pattern(at, d), "corrupt echo at offset {at}");
            got.fetch_add(d.len() as u64, Ordering::SeqCst);
        }
    }
    assert_eq!(got.load(Ordering::SeqCst), total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailers_reach_an_http1_client_that_asks() {
    let (gw, b, _) = setup().await;
    let mut c = H1::connect(gw.http).await;
    let r = c
        .send(
            req("GET", "app.test", "/trailers")
                .header("te", "trailers")
                .header("connection", "te")
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "hello world");
    assert_eq!(r.header("trailer"), Some("x-checksum"));
    let trailers = r.trailers.expect("trailers");
    assert_eq!(trailers.get("x-checksum").unwrap(), "abc123");
    assert_eq!(b.last().header("te"), Some("trailers"));
    // A client that did not ask gets the body without them.
    let r = c.get("app.test", "/trailers").await;
    assert_eq!(r.text(), "hello world");
    assert!(r.trailers.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailers_reach_an_h2_client() {
    let (gw, b, pki) = setup().await;
    let opts = TlsOpts::sni("stream.test").verified(&pki).alpn(&[b"h2"]);
    let (tls, _) = tls_connect(gw.https, &opts).await.unwrap();
    let mut h2 = H2::over(tls).await;
    let r =
        h2.send(req2("GET", "stream.test", "/trailers").header("te", "trailers").body(empty()).unwrap()).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.version, hyper::Version::HTTP_2);
    assert_eq!(r.text(), "hello world");
    let trailers = r.trailers.expect("trailers");
    assert_eq!(trailers.get("x-checksum").unwrap(), "abc123");
    assert_eq!(b.last().header("te"), Some("trailers"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_trailers_reach_the_server() {
    let (gw, b, _) = setup().await;
    let mut trailers = hyper::HeaderMap::new();
    trailers.insert("x-digest", "sha-256=abc".parse().unwrap());
    let frames: Vec<Result<hyper::body::Frame<bytes::Bytes>, BoxError>> = vec![
        Ok(hyper::body::Frame::data(bytes::Bytes::from_static(b"part one, "))),
        Ok(hyper::body::Frame::data(bytes::Bytes::from_static(b"part two"))),
        Ok(hyper::body::Frame::trailers(trailers)),
    ];
    let body = BodyExt::boxed(http_body_util::StreamBody::new(futures_util::stream::iter(frames)));
    let r = send(gw.http, req("POST", "app.test", "/upload").header("trailer", "x-digest").body(body).unwrap()).await;
    assert_eq!(r.status, 200);
    let seen = b.last();
    assert_eq!(&seen.body[..], b"part one, part two");
    let t = seen.trailers.expect("request trailers at the server");
    assert_eq!(t.get("x-digest").unwrap(), "sha-256=abc");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_trailers_that_may_not_be_trailers_are_dropped() {
    // Fields that frame, route, authenticate or condition the request (RFC 9110 section
    // 6.5.1), hop-by-hop ones,
    // and those the gateway writes for the server: a client must not add them after the
    // head. (Written raw: hyper's own client sends only the trailers `Trailer` declares.)
    let (gw, b, _) = setup().await;
    let request = "POST /upload HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
                   5\r\nhello\r\n0\r\nX-Digest: sha-256=abc\r\nX-Forwarded-For: 6.6.6.6\r\nX_Forwarded_Proto: https\r\n\
                   X-Request-Id: spoofed\r\nHost: evil.test\r\nContent-Length: 99\r\nAuthorization: Bearer forged\r\n\
                   Keep-Alive: 1\r\nCookie: session=forged\r\nRange: bytes=0-1\r\nIf-None-Match: \"x\"\r\n\
                   If-Match: *\r\nExpect: 100-continue\r\nPragma: no-cache\r\n\r\n";
    let (raw, _) = raw_exchange(gw.http, request.as_bytes(), Duration::from_secs(5)).await;
    assert_eq!(raw_status(&raw), Some(200), "{}", String::from_utf8_lossy(&raw));
    let seen = b.last();
    assert_eq!(&seen.body[..], b"hello");
    let t = seen.trailers.expect("request trailers at the server");
    assert_eq!(t.get("x-digest").unwrap(), "sha-256=abc");
    assert_eq!(t.len(), 1, "only x-digest may be a trailer: {t:?}");
}
