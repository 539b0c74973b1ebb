//! Route lookup through the real binary: host precedence (exact, one-label wildcard, `*`),
//! the longest whole-segment path prefix, `strip_path`, 404, Host and query passed on.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use support::*;

const CONFIG: &str = r#"
[listen]
http = "@HTTP@"
https = ""
admin = "@ADMIN@"

[[route]]
host = "a.example.test"
upstream = "exact"

[[route]]
host = "a.example.test"
path = "/fhir"
upstream = "fhir"

[[route]]
host = "a.example.test"
path = "/strip/"
strip_path = true
upstream = "strip"

[[route]]
host = "*.example.test"
upstream = "wild"

[[route]]
host = "*"
path = "/any"
upstream = "any"

[upstream.exact]
servers = ["@EXACT@"]
[upstream.fhir]
servers = ["@FHIR@"]
[upstream.strip]
servers = ["@STRIP@"]
[upstream.wild]
servers = ["@WILD@"]
[upstream.any]
servers = ["@ANY@"]
"#;

struct Setup {
    gw: Gateway,
    exact: Backend,
    fhir: Backend,
    strip: Backend,
    wild: Backend,
    any: Backend,
}

async fn setup() -> Setup {
    let exact = Backend::start("exact").await;
    let fhir = Backend::start("fhir").await;
    let strip = Backend::start("strip").await;
    let wild = Backend::start("wild").await;
    let any = Backend::start("any").await;
    let gw = Gateway::builder(CONFIG)
        .var("EXACT", exact.addr)
        .var("FHIR", fhir.addr)
        .var("STRIP", strip.addr)
        .var("WILD", wild.addr)
        .var("ANY", any.addr)
        .start()
        .await;
    Setup { gw, exact, fhir, strip, wild, any }
}

/// The backend (by name) that answered, or the status when the gateway answered itself.
async fn who(s: &Setup, host: &str, path: &str) -> String {
    let r = get(s.gw.http, host, path).await;
    match r.header("x-backend") {
        Some(b) => b.to_string(),
        None => format!("{} {}", r.status, r.text().trim_end()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_host_beats_wildcard_beats_any() {
    let s = setup().await;
    assert_eq!(who(&s, "a.example.test", "/").await, "exact");
    assert_eq!(who(&s, "A.Example.TEST:8080", "/x").await, "exact");
    assert_eq!(who(&s, "a.example.test.", "/").await, "exact");
    assert_eq!(who(&s, "b.example.test", "/").await, "wild");
    assert_eq!(who(&s, "b.example.test", "/any").await, "wild");
    // A wildcard covers exactly one label.
    assert_eq!(who(&s, "c.b.example.test", "/any/1").await, "any");
    assert_eq!(who(&s, "example.test", "/any").await, "any");
    assert_eq!(who(&s, "other.test", "/any/x").await, "any");
    // A host with routes but none for the path falls through to `*` routes.
    assert_eq!(s.exact.hits() + s.wild.hits() + s.any.hits(), 8);
    assert_eq!(s.exact.hits(), 3);
    assert_eq!(s.wild.hits(), 2);
    assert_eq!(s.any.hits(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn longest_whole_segment_prefix_wins() {
    let s = setup().await;
    assert_eq!(who(&s, "a.example.test", "/fhir").await, "fhir");
    assert_eq!(who(&s, "a.example.test", "/fhir/").await, "fhir");
    assert_eq!(who(&s, "a.example.test", "/fhir/Patient/1").await, "fhir");
    assert_eq!(who(&s, "a.example.test", "/fhirx").await, "exact");
    assert_eq!(who(&s, "a.example.test", "/fhir.json").await, "exact");
    assert_eq!(who(&s, "a.example.test", "/FHIR").await, "exact", "paths are case-sensitive");
    assert_eq!(who(&s, "a.example.test", "/strip").await, "strip");
    assert_eq!(who(&s, "a.example.test", "/stripped").await, "exact");
    assert_eq!(s.fhir.hits(), 3);
    assert_eq!(s.strip.hits(), 1);
    // Without strip_path the whole path goes to the server.
    let paths: Vec<String> = s.fhir.requests().into_iter().map(|r| r.uri).collect();
    assert_eq!(paths, ["/fhir", "/fhir/", "/fhir/Patient/1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strip_path_sends_the_rest_and_the_prefix_header() {
    let s = setup().await;
    for path in ["/strip/a/b?q=1&r=%20x", "/strip", "/strip/", "/strip?x=1"] {
        assert_eq!(who(&s, "a.example.test", path).await, "strip", "{path}");
    }
    let seen: Vec<(String, Option<String>)> = s
        .strip
        .requests()
        .into_iter()
        .map(|r| (r.uri.clone(), r.header("x-forwarded-prefix").map(str::to_string)))
        .collect();
    let prefix = Some("/strip".to_string());
    assert_eq!(
        seen,
        [
            ("/a/b?q=1&r=%20x".to_string(), prefix.clone()),
            ("/".to_string(), prefix.clone()),
            ("/".to_string(), prefix.clone()),
            ("/?x=1".to_string(), prefix.clone()),
        ]
    );
    // Routes without strip_path never send the header.
    who(&s, "a.example.test", "/fhir/1").await;
    assert!(!s.fhir.last().has("x-forwarded-prefix"));
}

/// A path with dot-segments is routed as the path they name, and sent on so: a prefix
/// route cannot be left (`/fhir/../x` is not the fhir route's) or entered sideways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dot_segments_are_resolved_before_routing() {
    let s = setup().await;
    assert_eq!(who(&s, "a.example.test", "/fhir/../internal").await, "exact");
    assert_eq!(who(&s, "a.example.test", "/fhir/%2e%2E/internal?q=1").await, "exact");
    assert_eq!(who(&s, "a.example.test", "/x/../fhir/Patient/./1").await, "fhir");
    assert_eq!(who(&s, "a.example.test", "/strip/a/../../fhir").await, "fhir");
    assert_eq!(who(&s, "a.example.test", "/strip/./b/..").await, "strip");
    let paths = |b: &Backend| b.requests().into_iter().map(|r| r.uri).collect::<Vec<_>>();
    assert_eq!(paths(&s.exact), ["/internal", "/internal?q=1"]);
    assert_eq!(paths(&s.fhir), ["/fhir/Patient/1", "/fhir"]);
    assert_eq!(paths(&s.strip), ["/"]);
    // Spellings some servers read as `..` and others not: refused, never routed.
    for path in ["/fhir/..;/internal", "/fhir/..%2Finternal", "/fhir/..%5cinternal"] {
        assert_eq!(who(&s, "a.example.test", path).await, "400 400 bad request", "{path}");
    }
    // A target over max_uri_bytes is refused whatever its dot-segments would leave of it.
    let long = format!("/fhir{}", "/.".repeat(5000));
    assert_eq!(who(&s, "a.example.test", &long).await, "414 414 request target too long");
    assert_eq!(s.exact.hits() + s.fhir.hits() + s.strip.hits(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_route_is_404_with_a_short_text_body() {
    let s = setup().await;
    let r = get(s.gw.http, "other.test", "/").await;
    assert_eq!(r.status, 404);
    assert_eq!(r.text(), "404 no route for this host and path\n");
    assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
    assert_eq!(r.header("x-backend"), None);
    let r = get(s.gw.http, "c.b.example.test", "/anything").await;
    assert_eq!(r.status, 404);
    let total = s.exact.hits() + s.fhir.hits() + s.strip.hits() + s.wild.hits() + s.any.hits();
    assert_eq!(total, 0, "no backend may see an unrouted request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_and_query_reach_the_server_as_sent() {
    let s = setup().await;
    let path = "/fhir/Patient?name=a%20b&x=1&x=2&empty=&flag";
    let r = get(s.gw.http, "A.Example.Test:8443", path).await;
    assert_eq!(r.status, 200);
    let seen = s.fhir.last();
    assert_eq!(seen.uri, path);
    assert_eq!(seen.header("host"), Some("A.Example.Test:8443"));
    assert_eq!(seen.method, "GET");
    assert_eq!(seen.version, hyper::Version::HTTP_11);

    // Methods and bodies pass unchanged.
    let r = send(s.gw.http, req("PATCH", "a.example.test", "/fhir/Patient/1").body(full("{\"a\":1}")).unwrap()).await;
    assert_eq!(r.status, 200);
    let seen = s.fhir.last();
    assert_eq!(seen.method, "PATCH");
    assert_eq!(&seen.body[..], b"{\"a\":1}");
}

/// Raw bytes other than ASCII in a target (curl sends `/café` as UTF-8) reach the server
/// percent-encoded: a URI is ASCII (RFC 3986 section 2), and raw, U+2028 or U+0085 end a
/// line for some readers of the server's logs and of the gateway's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_other_than_ascii_in_a_target_reach_the_server_percent_encoded() {
    let s = setup().await;
    let request =
        "GET /fhir/caf\u{e9}?name=Jos\u{e9}&x=\u{2028} HTTP/1.1\r\nHost: a.example.test\r\nConnection: close\r\n\r\n";
    let (raw, _) = raw_exchange(s.gw.http, request.as_bytes(), Duration::from_secs(5)).await;
    let r = parse_raw(&raw);
    assert_eq!((r.status, r.header("x-backend")), (200, Some("fhir")), "{}", String::from_utf8_lossy(&raw));
    assert_eq!(s.fhir.last().uri, "/fhir/caf%C3%A9?name=Jos%C3%A9&x=%E2%80%A8");
    // A target already encoded is left as it is.
    let r = get(s.gw.http, "a.example.test", "/fhir/caf%C3%A9?q=%e2%80%a8").await;
    assert_eq!(r.status, 200);
    assert_eq!(s.fhir.last().uri, "/fhir/caf%C3%A9?q=%e2%80%a8");
    let logged = wait_until(Duration::from_secs(5), || s.gw.logs().contains("path=/fhir/caf%C3%A9 ")).await;
    assert!(logged && !s.gw.logs().contains('\u{2028}'), "the access log: {}", s.gw.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_form_target_routes_by_its_authority() {
    let s = setup().await;
    let (raw, _) = raw_exchange(
        s.gw.http,
        b"GET http://a.example.test/fhir/x?y=1 HTTP/1.1\r\nHost: a.example.test\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    let r = parse_raw(&raw);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&raw));
    assert_eq!(r.header("x-backend"), Some("fhir"));
    let seen = s.fhir.last();
    assert_eq!(seen.uri, "/fhir/x?y=1", "origin-form towards the server");
    assert_eq!(seen.header("host"), Some("a.example.test"));
    // A URL of another scheme names nothing the gateway serves.
    for target in ["ftp://a.example.test/fhir/x", "ws://a.example.test/fhir/x"] {
        let request = format!("GET {target} HTTP/1.1\r\nHost: a.example.test\r\nConnection: close\r\n\r\n");
        let (raw, _) = raw_exchange(s.gw.http, request.as_bytes(), Duration::from_secs(5)).await;
        let r = parse_raw(&raw);
        assert_eq!((r.status, &r.body[..]), (400, &b"400 bad request\n"[..]), "{target}");
    }
    assert_eq!(s.fhir.hits(), 1);
    // The scheme's case does not matter (RFC 3986 section 3.1).
    let request = b"GET HTTP://a.example.test/fhir/y HTTP/1.1\r\nHost: a.example.test\r\nConnection: close\r\n\r\n";
    let (raw, _) = raw_exchange(s.gw.http, request, Duration::from_secs(5)).await;
    assert_eq!(parse_raw(&raw).status, 200, "{}", String::from_utf8_lossy(&raw));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_literal_hosts_route() {
    let v4 = Backend::start("v4").await;
    let v6 = Backend::start("v6").await;
    let gw = Gateway::builder(
        r#"
[listen]
http = "@HTTP@"
https = ""
admin = "@ADMIN@"
[[route]]
host = "127.0.0.1"
upstream = "v4"
[[route]]
host = "::1"
upstream = "v6"
[upstream.v4]
servers = ["@V4@"]
[upstream.v6]
servers = ["@V6@"]
"#,
    )
    .var("V4", v4.addr)
    .var("V6", v6.addr)
    .start()
    .await;
    let r = get(gw.http, &gw.http.to_string(), "/").await;
    assert_eq!((r.status, r.text().as_str()), (200, "v4"));
    // An IPv6 literal is bracketed in Host (RFC 3986 section 3.2.2).
    let r = get(gw.http, "[::1]:8080", "/").await;
    assert_eq!((r.status, r.text().as_str()), (200, "v6"));
    let r = get(gw.http, "[::1]", "/").await;
    assert_eq!((r.status, r.text().as_str()), (200, "v6"));
    assert_eq!(v6.last().header("x-forwarded-host"), Some("[::1]"));
    assert_eq!(v6.last().header("forwarded"), Some("for=127.0.0.1;host=\"[::1]\";proto=http"));
    let r = get(gw.http, "[0:0:0:0:0:0:0:1]:80", "/").await;
    assert_eq!((r.status, r.text().as_str()), (200, "v6"));
    let r = get(gw.http, "[::2]", "/").await;
    assert_eq!(r.status, 404);
}
