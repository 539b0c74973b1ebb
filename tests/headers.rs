//! What a server is told, byte for byte: X-Forwarded-*, Forwarded, X-Request-Id from
//! untrusted and trusted peers, and hop-by-hop headers removed in both directions.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashSet;
use std::time::Duration;

use support::*;

const CONFIG: &str = r#"
[listen]
http = "@HTTP@"
https = ""
admin = "@ADMIN@"

[proxy]
trusted_proxies = [@TRUSTED@]

[[route]]
host = "*"
upstream = "app"

[[route]]
host = "*"
path = "/strip"
strip_path = true
upstream = "app"

[upstream.app]
servers = ["@B@"]
"#;

async fn gateway(trusted: &str) -> (Gateway, Backend) {
    let b = Backend::start("app").await;
    let gw = Gateway::builder(CONFIG).var("B", b.addr).var("TRUSTED", trusted).start().await;
    (gw, b)
}

/// Sends raw request bytes (which should ask for `Connection: close`) and returns the
/// parsed response.
async fn raw(gw: &Gateway, request: &str) -> RawResp {
    let (bytes, closed) = raw_exchange(gw.http, request.as_bytes(), Duration::from_secs(5)).await;
    assert!(closed, "the gateway kept the connection open: {}", String::from_utf8_lossy(&bytes));
    parse_raw(&bytes)
}

fn is_request_id(v: &str) -> bool {
    v.len() == 32 && v.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The forwarding headers a server got, in a fixed order, for exact comparison.
fn forwarding(r: &Recorded) -> Vec<(String, Vec<String>)> {
    [
        "host",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-forwarded-port",
        "x-forwarded-prefix",
        "forwarded",
    ]
    .iter()
    .map(|n| (n.to_string(), r.header_all(n).into_iter().map(str::to_string).collect()))
    .collect()
}

fn expect(pairs: &[(&str, &[&str])]) -> Vec<(String, Vec<String>)> {
    pairs.iter().map(|(n, v)| (n.to_string(), v.iter().map(|s| s.to_string()).collect())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_client_gets_fresh_forwarding_headers() {
    let (gw, b) = gateway("").await;
    let r = raw(&gw, "GET /a?b=1 HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n").await;
    assert_eq!(r.status, 200);
    let seen = b.last();
    assert_eq!(
        forwarding(&seen),
        expect(&[
            ("host", &["app.test"]),
            ("x-forwarded-for", &["127.0.0.1"]),
            ("x-forwarded-proto", &["http"]),
            ("x-forwarded-host", &["app.test"]),
            ("x-forwarded-port", &["80"]),
            ("x-forwarded-prefix", &[]),
            ("forwarded", &["for=127.0.0.1;host=app.test;proto=http"]),
        ])
    );
    let id = seen.header("x-request-id").unwrap();
    assert!(is_request_id(id), "{id:?}");

    // A port in Host is the public port, and a host:port is quoted in Forwarded.
    raw(&gw, "GET / HTTP/1.1\r\nHost: App.Test:8080\r\nConnection: close\r\n\r\n").await;
    assert_eq!(
        forwarding(&b.last()),
        expect(&[
            ("host", &["App.Test:8080"]),
            ("x-forwarded-for", &["127.0.0.1"]),
            ("x-forwarded-proto", &["http"]),
            ("x-forwarded-host", &["App.Test:8080"]),
            ("x-forwarded-port", &["8080"]),
            ("x-forwarded-prefix", &[]),
            ("forwarded", &["for=127.0.0.1;host=\"App.Test:8080\";proto=http"]),
        ])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_headers_from_an_untrusted_peer_are_replaced() {
    let (gw, b) = gateway("").await;
    let r = raw(
        &gw,
        "GET /strip/x HTTP/1.1\r\n\
         Host: app.test\r\n\
         X-Forwarded-For: 6.6.6.6\r\n\
         X-Forwarded-For: 7.7.7.7\r\n\
         X-Forwarded-Proto: https\r\n\
         X-Forwarded-Host: evil.test\r\n\
         X-Forwarded-Port: 1\r\n\
         X-Forwarded-Prefix: /evil\r\n\
         Forwarded: for=6.6.6.6;host=evil.test;proto=https\r\n\
         X-Request-Id: spoofed-id\r\n\
         Connection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200);
    let seen = b.last();
    assert_eq!(seen.uri, "/x");
    assert_eq!(
        forwarding(&seen),
        expect(&[
            ("host", &["app.test"]),
            ("x-forwarded-for", &["127.0.0.1"]),
            ("x-forwarded-proto", &["http"]),
            ("x-forwarded-host", &["app.test"]),
            ("x-forwarded-port", &["80"]),
            ("x-forwarded-prefix", &["/strip"]),
            ("forwarded", &["for=127.0.0.1;host=app.test;proto=http"]),
        ])
    );
    let id = seen.header("x-request-id").unwrap();
    assert!(is_request_id(id), "{id:?}");
    assert_ne!(id, "spoofed-id");
    // Without strip_path, a client's X-Forwarded-Prefix is removed.
    raw(&gw, "GET / HTTP/1.1\r\nHost: app.test\r\nX-Forwarded-Prefix: /evil\r\nConnection: close\r\n\r\n").await;
    assert!(!b.last().has("x-forwarded-prefix"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn underscore_spellings_of_the_forwarding_and_framing_fields_never_reach_the_server() {
    // CGI-style servers read X_Forwarded_For as X-Forwarded-For (HTTP_X_FORWARDED_FOR),
    // and a server reading `_` as `-` would frame by Transfer_Encoding. Removed on both
    // readers (a request without a body, and one hyper reads), and from a
    // trusted peer too: no proxy spells them so.
    for trusted in ["", "\"127.0.0.0/8\""] {
        let (gw, b) = gateway(trusted).await;
        for (start, end) in [("GET / HTTP/1.1", ""), ("POST / HTTP/1.1", "Content-Length: 2\r\n")] {
            let request = format!(
                "{start}\r\nHost: app.test\r\nX_Forwarded_For: 6.6.6.6\r\nx_forwarded_proto: https\r\n\
                 X-Forwarded_Host: evil.test\r\nX_Request_Id: spoofed\r\nX_Other: kept\r\n\
                 Transfer_Encoding: chunked\r\nContent_Length: 44\r\n{end}\
                 Connection: close\r\n\r\n{}",
                if end.is_empty() { "" } else { "ok" }
            );
            assert_eq!(raw(&gw, &request).await.status, 200);
            let seen = b.last();
            for gone in [
                "x_forwarded_for",
                "x_forwarded_proto",
                "x-forwarded_host",
                "x_request_id",
                "transfer_encoding",
                "content_length",
            ] {
                assert!(
                    !seen.has(gone),
                    "{gone} reached the server ({start}, trusted {trusted:?}): {:?}",
                    seen.headers
                );
            }
            assert_eq!(seen.header("x_other"), Some("kept"));
            assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
            assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
        }
    }
}

/// Other fields servers read as the client's address or scheme (`X-Real-IP`, Rack's
/// `X-Forwarded-Ssl: on`...) never come from a client; a trusted peer's are kept. On both
/// readers (a request without a body, and one hyper reads).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_claims_of_address_or_scheme_come_only_from_trusted_peers() {
    let claims = [
        ("x-real-ip", "6.6.6.6"),
        ("x-forwarded-ssl", "on"),
        ("x-forwarded-scheme", "https"),
        ("front-end-https", "on"),
        ("true-client-ip", "6.6.6.6"),
        ("x-client-ip", "6.6.6.6"),
        ("client-ip", "6.6.6.6"),
        ("x-cluster-client-ip", "6.6.6.6"),
        ("x-forwarded", "for=6.6.6.6"),
    ];
    let sent: String = claims.iter().map(|(n, v)| format!("{n}: {v}\r\n")).collect();
    for trusted in ["", "\"127.0.0.0/8\""] {
        let (gw, b) = gateway(trusted).await;
        for (start, end) in [("GET / HTTP/1.1", ""), ("POST / HTTP/1.1", "Content-Length: 2\r\n")] {
            let body = if end.is_empty() { "" } else { "ok" };
            let request = format!("{start}\r\nHost: app.test\r\n{sent}{end}Connection: close\r\n\r\n{body}");
            assert_eq!(raw(&gw, &request).await.status, 200);
            let seen = b.last();
            for (name, value) in claims {
                let want = if trusted.is_empty() { None } else { Some(value) };
                assert_eq!(seen.header(name), want, "{name} ({start}, trusted {trusted:?}): {:?}", seen.headers);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_are_new_for_every_request() {
    let (gw, b) = gateway("").await;
    let mut conn = H1::connect(gw.http).await;
    for _ in 0..50 {
        assert_eq!(conn.get("app.test", "/").await.status, 200);
    }
    let ids: HashSet<String> = b.requests().iter().map(|r| r.header("x-request-id").unwrap().to_string()).collect();
    assert_eq!(ids.len(), 50, "request ids repeat");
    assert!(ids.iter().all(|id| is_request_id(id)), "{ids:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusted_peer_chains_are_extended_and_values_kept() {
    let (gw, b) = gateway("\"127.0.0.1/32\"").await;
    let r = raw(
        &gw,
        "GET /strip/x HTTP/1.1\r\n\
         Host: internal.test:8080\r\n\
         X-Forwarded-For: 203.0.113.1\r\n\
         X-Forwarded-For: 203.0.113.2\r\n\
         X-Forwarded-Proto: https\r\n\
         X-Forwarded-Host: public.example\r\n\
         X-Forwarded-Port: 443\r\n\
         X-Forwarded-Prefix: /outer/\r\n\
         Forwarded: for=203.0.113.1;proto=https\r\n\
         X-Request-Id: abc-123\r\n\
         Connection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200);
    let seen = b.last();
    assert_eq!(
        forwarding(&seen),
        expect(&[
            ("host", &["internal.test:8080"]),
            ("x-forwarded-for", &["203.0.113.1, 203.0.113.2, 127.0.0.1"]),
            ("x-forwarded-proto", &["https"]),
            ("x-forwarded-host", &["public.example"]),
            ("x-forwarded-port", &["443"]),
            ("x-forwarded-prefix", &["/outer/strip"]),
            ("forwarded", &["for=203.0.113.1;proto=https, for=127.0.0.1;host=\"internal.test:8080\";proto=http"]),
        ])
    );
    assert_eq!(seen.header("x-request-id"), Some("abc-123"));

    // A trusted peer that sends nothing gets what an untrusted one would.
    raw(&gw, "GET / HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n").await;
    let seen = b.last();
    assert_eq!(
        forwarding(&seen),
        expect(&[
            ("host", &["app.test"]),
            ("x-forwarded-for", &["127.0.0.1"]),
            ("x-forwarded-proto", &["http"]),
            ("x-forwarded-host", &["app.test"]),
            ("x-forwarded-port", &["80"]),
            ("x-forwarded-prefix", &[]),
            ("forwarded", &["for=127.0.0.1;host=app.test;proto=http"]),
        ])
    );
    assert!(is_request_id(seen.header("x-request-id").unwrap()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_outside_trusted_proxies_is_not_trusted() {
    let (gw, b) = gateway("\"10.0.0.0/8\", \"192.0.2.1\"").await;
    raw(
        &gw,
        "GET / HTTP/1.1\r\nHost: app.test\r\nX-Forwarded-For: 203.0.113.1\r\nX-Request-Id: abc\r\nConnection: close\r\n\r\n",
    )
    .await;
    let seen = b.last();
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_ne!(seen.header("x-request-id"), Some("abc"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_request_headers_are_removed() {
    let (gw, b) = gateway("").await;
    let r = raw(
        &gw,
        "GET / HTTP/1.1\r\n\
         Host: app.test\r\n\
         Connection: close, X-Secret\r\n\
         Connection: X-Second\r\n\
         X-Secret: 1\r\n\
         X-Second: 2\r\n\
         Keep-Alive: timeout=5\r\n\
         TE: gzip\r\n\
         Proxy-Connection: keep-alive\r\n\
         Upgrade: h2c\r\n\
         X-Kept: yes\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200);
    let seen = b.last();
    for gone in
        ["connection", "x-secret", "x-second", "keep-alive", "te", "proxy-connection", "upgrade", "transfer-encoding"]
    {
        assert!(!seen.has(gone), "{gone} reached the server: {:?}", seen.headers);
    }
    assert_eq!(seen.header("x-kept"), Some("yes"));

    // Without `Upgrade` the gateway's own reader takes the request: the same fields go.
    let r = raw(
        &gw,
        "GET /own HTTP/1.1\r\nHost: app.test\r\nConnection: close, X-Secret\r\nConnection: X-Second\r\n\
         X-Secret: 1\r\nX-Second: 2\r\nKeep-Alive: timeout=5\r\nTE: gzip\r\nProxy-Connection: keep-alive\r\n\
         X-Kept: yes\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200);
    let seen = b.last();
    assert_eq!(seen.uri, "/own");
    for gone in ["connection", "x-secret", "x-second", "keep-alive", "te", "proxy-connection"] {
        assert!(!seen.has(gone), "{gone} reached the server: {:?}", seen.headers);
    }
    assert_eq!(seen.header("x-kept"), Some("yes"));

    // `TE: trailers` is the one TE value passed on (RFC 9110 section 10.1.4).
    raw(&gw, "GET / HTTP/1.1\r\nHost: app.test\r\nTE: trailers, gzip\r\nConnection: close, TE\r\n\r\n").await;
    assert_eq!(b.last().header_all("te"), ["trailers"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_response_headers_are_removed() {
    let (gw, _b) = gateway("").await;
    let r = raw(&gw, "GET /hop HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-kept"), Some("yes"));
    for gone in ["x-private", "x-other", "keep-alive", "proxy-connection", "upgrade"] {
        assert!(!r.has(gone), "{gone} reached the client: {:?}", r.headers);
    }
    // The only Connection header the client sees is the gateway's own.
    assert!(r.headers.iter().filter(|(n, _)| n == "connection").all(|(_, v)| v == "close"), "{:?}", r.headers);

    // Over a kept-alive connection (hyper client) too.
    let mut c = H1::connect(gw.http).await;
    let r = c.get("app.test", "/hop").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-kept"), Some("yes"));
    for gone in ["connection", "x-private", "x-other", "keep-alive", "proxy-connection", "upgrade"] {
        assert!(r.header(gone).is_none(), "{gone} reached the client: {:?}", r.headers);
    }
}
