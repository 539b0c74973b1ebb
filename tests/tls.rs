//! TLS termination: certificate choice by SNI, 421, ALPN h2 and http/1.1, minimum TLS
//! version, the development certificate, and the plain-HTTP redirect.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use support::*;

const CONFIG: &str = r#"
[listen]
http = "@HTTP@"
https = "@HTTPS@"
admin = "@ADMIN@"

[proxy]
redirect_https = @REDIRECT@

[tls]
certs_dir = "certs"
min_version = "@MIN@"

[[route]]
host = "a.test"
upstream = "app"

[[route]]
host = "*.wild.test"
upstream = "app"

[upstream.app]
servers = ["@B@"]
"#;

struct Setup {
    gw: Gateway,
    b: Backend,
    pki: Pki,
}

async fn setup(min: &str, redirect: bool) -> Setup {
    setup_with(min, redirect, &[]).await
}

async fn setup_with(min: &str, redirect: bool, env: &[(&str, &str)]) -> Setup {
    let pki = Pki::new();
    let b = Backend::start("app").await;
    let (a_crt, a_key) = pki.leaf(&["a.test"]);
    let (w_crt, w_key) = pki.leaf(&["*.wild.test"]);
    let (d_crt, d_key) = pki.leaf(&["default.test"]);
    let gw = Gateway::builder(CONFIG)
        .var("B", b.addr)
        .var("MIN", min)
        .var("REDIRECT", redirect)
        .file("certs/a.crt", a_crt)
        .file("certs/a.key", a_key)
        .file("certs/wild.crt", w_crt)
        .file("certs/wild.key", w_key)
        .file("certs/default.crt", d_crt)
        .file("certs/default.key", d_key);
    let gw = env.iter().fold(gw, |gw, (k, v)| gw.env(k, v)).start().await;
    Setup { gw, b, pki }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_the_certificate_by_san() {
    let s = setup("1.2", true).await;
    let opts = TlsOpts::sni("a.test").verified(&s.pki);
    let (r, info) = https_get(s.gw.https, &opts, "a.test", "/x").await.unwrap();
    assert_eq!(info.san, ["a.test"]);
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "app");
    let seen = s.b.last();
    assert_eq!(seen.header("x-forwarded-proto"), Some("https"));
    assert_eq!(seen.header("x-forwarded-port"), Some("443"));
    assert_eq!(seen.header("x-forwarded-host"), Some("a.test"));
    assert_eq!(seen.header("forwarded"), Some("for=127.0.0.1;host=a.test;proto=https"));

    // A wildcard SAN covers one label.
    let opts = TlsOpts::sni("x.wild.test").verified(&s.pki);
    let (r, info) = https_get(s.gw.https, &opts, "x.wild.test", "/").await.unwrap();
    assert_eq!(info.san, ["*.wild.test"]);
    assert_eq!(r.status, 200);
    let err = tls_connect(s.gw.https, &TlsOpts::sni("y.x.wild.test")).await;
    assert!(err.is_err(), "a two-label name got a certificate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_sni_fails_the_handshake() {
    let s = setup("1.2", true).await;
    let before = s.gw.metric("swarmgate_tls_handshake_errors_total").await.unwrap();
    // Not even with a client that accepts any certificate: no other host's one is sent.
    let err = tls_connect(s.gw.https, &TlsOpts::sni("unknown.test")).await;
    assert!(err.is_err(), "handshake for an unknown name succeeded");
    let err = tls_connect(s.gw.https, &TlsOpts::sni("test")).await;
    assert!(err.is_err());
    // The server counts its side of the failure a moment after the client sees it.
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    let mut after = before;
    while after - before < 2.0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        after = s.gw.metric("swarmgate_tls_handshake_errors_total").await.unwrap();
    }
    assert_eq!(after - before, 2.0);
    assert_eq!(s.b.hits(), 0);
    // A client that connects and leaves (a load balancer's TCP check), or leaves in the
    // middle of its ClientHello, or right after its handshake: no failed handshake.
    use tokio::io::AsyncWriteExt;
    for partial in [&b""[..], &client_hello("a.test")[..20]] {
        let mut c = tokio::net::TcpStream::connect(s.gw.https).await.unwrap();
        c.write_all(partial).await.unwrap();
        drop(c);
    }
    let c = tls_connect(s.gw.https, &TlsOpts::sni("a.test")).await.expect("a handshake");
    drop(c);
    // The failed handshakes above were counted within moments: give these as long.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(s.gw.metric("swarmgate_tls_handshake_errors_total").await.unwrap(), after);
    assert!(s.gw.logs().contains("client closed the connection during the TLS handshake"), "{}", s.gw.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_sni_gets_the_default_certificate() {
    let s = setup("1.2", true).await;
    let (r, info) = https_get(s.gw.https, &TlsOpts::no_sni(), "a.test", "/").await.unwrap();
    assert_eq!(info.san, ["default.test"]);
    // Without SNI there is nothing for Host to disagree with.
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_other_than_sni_is_421() {
    let s = setup("1.2", true).await;
    let opts = TlsOpts::sni("a.test").verified(&s.pki);
    let (r, _) = https_get(s.gw.https, &opts, "x.wild.test", "/").await.unwrap();
    assert_eq!(r.status, 421);
    assert_eq!(r.text(), "421 misdirected request: TLS server name and Host differ\n");
    // The same over HTTP/2 (:authority).
    let opts = opts.alpn(&[b"h2"]);
    let (r, info) = https_get(s.gw.https, &opts, "x.wild.test", "/").await.unwrap();
    assert_eq!(info.alpn.as_deref(), Some(&b"h2"[..]));
    assert_eq!(r.status, 421);
    // HEAD over HTTP/2: the gateway's own answer comes without its text (a body there is a
    // protocol error for the client), its length as for a GET.
    let (stream, _) = tls_connect(s.gw.https, &opts).await.unwrap();
    let mut h2 = H2::over(stream).await;
    let r = h2.send(req2("HEAD", "x.wild.test", "/").body(empty()).unwrap()).await.expect("HEAD over HTTP/2");
    let text = "421 misdirected request: TLS server name and Host differ\n";
    assert_eq!((r.status, r.body.len()), (421, 0));
    assert_eq!(r.header("content-length"), Some(text.len().to_string().as_str()));
    // Case and port do not count as a difference.
    let (r, _) = https_get(s.gw.https, &opts, "A.Test:443", "/").await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(s.b.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_h2_is_proxied_to_an_http1_server() {
    let s = setup("1.2", true).await;
    let opts = TlsOpts::sni("a.test").verified(&s.pki).alpn(&[b"h2", b"http/1.1"]);
    let (stream, info) = tls_connect(s.gw.https, &opts).await.unwrap();
    assert_eq!(info.alpn.as_deref(), Some(&b"h2"[..]));
    let mut h2 = H2::over(stream).await;
    // Several streams at once on one connection.
    let mut futs = Vec::new();
    for i in 0..10 {
        let req = req2("POST", "a.test", &format!("/echo?i={i}")).body(full(format!("body {i}"))).unwrap();
        let mut sender = h2.sender.clone();
        futs.push(tokio::spawn(async move {
            sender.ready().await.unwrap();
            collect(sender.send_request(req).await.unwrap()).await.unwrap()
        }));
    }
    for (i, f) in futs.into_iter().enumerate() {
        let r = f.await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.version, hyper::Version::HTTP_2);
        assert_eq!(r.text(), format!("body {i}"));
    }
    let r = h2.get("a.test", "/plain").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "app");
    let seen = s.b.last();
    assert_eq!(seen.version, hyper::Version::HTTP_11);
    assert_eq!(seen.uri, "/plain");
    assert_eq!(seen.header("host"), Some("a.test"));
    assert_eq!(seen.header("x-forwarded-proto"), Some("https"));
    // The server's fields reach an HTTP/2 client; its hop-by-hop ones do not.
    let r = h2.get("a.test", "/hop").await;
    assert_eq!((r.status, r.header("x-kept"), r.header("content-length")), (200, Some("yes"), Some("3")));
    for gone in ["x-private", "x-other", "keep-alive", "proxy-connection", "upgrade", "connection"] {
        assert!(r.header(gone).is_none(), "{gone} reached the client: {:?}", r.headers);
    }

    // http/1.1 by ALPN, and no ALPN at all, are HTTP/1.1.
    let (r, info) = https_get(s.gw.https, &TlsOpts::sni("a.test").alpn(&[b"http/1.1"]), "a.test", "/").await.unwrap();
    assert_eq!(info.alpn.as_deref(), Some(&b"http/1.1"[..]));
    assert_eq!((r.status, r.version), (200, hyper::Version::HTTP_11));
    let (r, info) = https_get(s.gw.https, &TlsOpts::sni("a.test").alpn(&[]), "a.test", "/").await.unwrap();
    assert_eq!(info.alpn, None);
    assert_eq!((r.status, r.version), (200, hyper::Version::HTTP_11));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls12_client_with_min_version_12_and_13() {
    let s = setup("1.2", true).await;
    let mut opts = TlsOpts::sni("a.test").verified(&s.pki);
    opts.tls12_only = true;
    let (r, info) = https_get(s.gw.https, &opts, "a.test", "/").await.unwrap();
    assert_eq!(info.version, Some(rustls::ProtocolVersion::TLSv1_2));
    assert_eq!(r.status, 200);
    let (_, info) = https_get(s.gw.https, &TlsOpts::sni("a.test"), "a.test", "/").await.unwrap();
    assert_eq!(info.version, Some(rustls::ProtocolVersion::TLSv1_3));
    drop(s);

    let s = setup("1.3", true).await;
    assert!(tls_connect(s.gw.https, &opts).await.is_err(), "TLS 1.2 accepted with min_version 1.3");
    let (r, info) = https_get(s.gw.https, &TlsOpts::sni("a.test").verified(&s.pki), "a.test", "/").await.unwrap();
    assert_eq!(info.version, Some(rustls::ProtocolVersion::TLSv1_3));
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_is_redirected_to_https() {
    let s = setup("1.2", true).await;
    let https_port = s.gw.https.port();
    let r = get(s.gw.http, &format!("a.test:{}", s.gw.http.port()), "/p/q?x=1&y=%20").await;
    assert_eq!(r.status, 308);
    assert_eq!(r.header("location"), Some(format!("https://a.test:{https_port}/p/q?x=1&y=%20").as_str()));
    assert_eq!(r.text(), "308 use https\n");
    // Without a port in Host, the scheme's default port.
    let r = get(s.gw.http, "a.test", "/p").await;
    assert_eq!(r.status, 308);
    assert_eq!(r.header("location"), Some("https://a.test/p"));
    // Hosts without a route are redirected too (the route is looked up over https).
    let r = get(s.gw.http, "nowhere.test", "/").await;
    assert_eq!(r.status, 308);
    assert_eq!(r.header("location"), Some("https://nowhere.test/"));
    assert_eq!(s.b.hits(), 0);
    // Each has its access-log line.
    let redirected = |path: &str| {
        s.gw.logs().lines().any(|l| l.contains("swarmgate::access") && l.contains("status=308 ") && l.contains(path))
    };
    assert!(
        wait_until(Duration::from_secs(2), || redirected("path=/p/q ") && redirected("path=/p ")).await,
        "{}",
        s.gw.logs()
    );
}

/// `Host: name:80` names the default port: the redirect's URL names none (behind a port
/// mapping the HTTPS listener's own port would be unreachable). A client's own claim to
/// have come over https is no reason not to redirect it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_for_port_80_names_no_port_and_untrusted_claims_do_not_stop_it() {
    let s = setup("1.2", true).await;
    let r = get(s.gw.http, "a.test:80", "/p").await;
    assert_eq!(r.status, 308);
    assert_eq!(r.header("location"), Some("https://a.test/p"));
    let claims = [("x-forwarded-proto", "https"), ("forwarded", "for=192.0.2.1;proto=https")];
    for (name, value) in claims {
        let r = send(s.gw.http, req("GET", "a.test", "/q").header(name, value).body(empty()).unwrap()).await;
        assert_eq!((r.status, r.header("location")), (308, Some("https://a.test/q")), "{name}");
    }
    assert_eq!(s.b.hits(), 0);
}

/// A load balancer in `trusted_proxies` that ends TLS itself sends plain HTTP saying it
/// was reached over https: proxied, not redirected (which would loop), and the service
/// told the public URL, its port following from the scheme the balancer gave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_proxy_ending_tls_is_not_redirected() {
    let s = setup_with("1.2", true, &[("SWARMGATE_PROXY_TRUSTED_PROXIES", "127.0.0.1/32")]).await;
    let said = [
        ("x-forwarded-proto", "https"),
        ("forwarded", "for=192.0.2.1;proto=http, for=192.0.2.9;host=\"a.test:8443\";proto=https"),
    ];
    for (name, value) in said {
        let r = send(s.gw.http, req("GET", "a.test", "/q").header(name, value).body(empty()).unwrap()).await;
        assert_eq!(r.status, 200, "{name}: {:?}", r.header("location"));
    }
    let seen: Vec<_> =
        s.b.requests()
            .into_iter()
            .map(|r| {
                let h = |n: &str| r.header(n).unwrap_or("-").to_string();
                (h("x-forwarded-proto"), h("x-forwarded-host"), h("x-forwarded-port"))
            })
            .collect();
    let want = |proto: &str, host: &str, port: &str| (proto.to_string(), host.to_string(), port.to_string());
    assert_eq!(seen, [want("https", "a.test", "443"), want("https", "a.test:8443", "8443")]);
    // The balancer's plain-HTTP requests are still redirected.
    let r =
        send(s.gw.http, req("GET", "a.test", "/q").header("x-forwarded-proto", "http").body(empty()).unwrap()).await;
    assert_eq!(r.status, 308);
    let r = get(s.gw.http, "a.test", "/q").await;
    assert_eq!(r.status, 308);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_off_proxies_plain_http() {
    let s = setup("1.2", false).await;
    let r = get(s.gw.http, "a.test", "/p?x=1").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "app");
    let seen = s.b.last();
    assert_eq!(seen.uri, "/p?x=1");
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
    assert_eq!(seen.header("x-forwarded-port"), Some("80"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_development_certificate_is_made_when_none_covers_a_host() {
    let b = Backend::start("app").await;
    let gw = Gateway::builder(
        r#"
[listen]
http = ""
https = "@HTTPS@"
admin = "@ADMIN@"
[tls]
certs_dir = "certs"
[[route]]
host = "dev.test"
upstream = "app"
[upstream.app]
servers = ["@B@"]
"#,
    )
    .var("B", b.addr)
    .start()
    .await;
    let crt = gw.dir().join("certs/swarmgate-dev.crt");
    let key = gw.dir().join("certs/swarmgate-dev.key");
    assert!(crt.is_file(), "no {}", crt.display());
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    let (r, info) = https_get(gw.https, &TlsOpts::sni("dev.test"), "dev.test", "/").await.unwrap();
    assert_eq!(info.san, ["dev.test", "localhost", "127.0.0.1", "::1"]);
    assert_eq!(r.status, 200);
    // The same certificate is what is written on disk, and clients without SNI get it.
    let pem = std::fs::read_to_string(&crt).unwrap();
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
    let (_, info) = https_get(gw.https, &TlsOpts::no_sni(), "dev.test", "/").await.unwrap();
    assert_eq!(info.san, ["dev.test", "localhost", "127.0.0.1", "::1"]);
    assert!(gw.logs().contains("self-signed development certificate"), "{}", gw.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_are_listed_on_the_admin_listener() {
    let s = setup("1.2", true).await;
    let r = s.gw.admin_get("/certificates").await;
    assert_eq!(r.status, 200);
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    let mut certs: Vec<(String, String, String)> = v["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let names: Vec<&str> = c["names"].as_array().unwrap().iter().map(|n| n.as_str().unwrap()).collect();
            let left = c["seconds_left"].as_i64().unwrap();
            assert!(left > 300 * 86_400, "{c}");
            assert_eq!(c["issuer"], "CN=swarmgate test CA");
            (names.join(","), c["source"].as_str().unwrap().to_string(), c["file"].as_str().unwrap().to_string())
        })
        .collect();
    certs.sort();
    let want = [
        ("*.wild.test", "static", "certs/wild.crt"),
        ("a.test", "static", "certs/a.crt"),
        ("default.test", "static", "certs/default.crt"),
    ];
    let want: Vec<(String, String, String)> =
        want.iter().map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string())).collect();
    assert_eq!(certs, want);
    let _ = &s.b;
}

/// A reload that would serve a route host the self-signed development certificate where a
/// certificate file serves it now (`certs_dir` not there at the reload, a file removed)
/// is refused, and the files' certificates go on being served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_would_leave_a_host_the_development_certificate_is_refused() {
    let s = setup("1.2", true).await;
    let (certs, moved) = (s.gw.dir().join("certs"), s.gw.dir().join("certs.moved"));
    let verified = TlsOpts::sni("a.test").verified(&s.pki);
    std::fs::rename(&certs, &moved).unwrap();
    assert!(matches!(s.gw.reload(CONFIG).await, Reload::Refused), "{}", s.gw.logs());
    assert!(s.gw.logs().contains("no certificate file covers *.wild.test, a.test any more"), "{}", s.gw.logs());
    let (r, _) = https_get(s.gw.https, &verified, "a.test", "/").await.expect("still the file's certificate");
    assert_eq!(r.status, 200);
    // One file removed: refused too.
    std::fs::rename(&moved, &certs).unwrap();
    std::fs::remove_file(certs.join("a.crt")).unwrap();
    assert!(matches!(s.gw.reload(CONFIG).await, Reload::Refused), "{}", s.gw.logs());
    assert!(s.gw.logs().contains("no certificate file covers a.test any more"), "{}", s.gw.logs());
    assert!(https_get(s.gw.https, &verified, "a.test", "/").await.is_ok());
    // Its route gone with it: applied.
    let without_a = CONFIG.replace("[[route]]\nhost = \"a.test\"\nupstream = \"app\"\n", "");
    assert!(matches!(s.gw.reload(&without_a).await, Reload::Applied(_)), "{}", s.gw.logs());
}

/// An HTTP/1.0 request may come without Host: there is no URL to redirect it to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_without_host_is_not_redirected_to_nowhere() {
    let s = setup("1.2", true).await;
    let (raw, _) = raw_exchange(s.gw.http, b"GET /x HTTP/1.0\r\n\r\n", Duration::from_secs(2)).await;
    let r = parse_raw(&raw);
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&raw));
    assert_eq!(r.header("location"), None);
    assert_eq!(String::from_utf8_lossy(&r.body), "400 bad request\n");
    // With a Host, HTTP/1.0 is redirected like HTTP/1.1.
    let (raw, _) = raw_exchange(s.gw.http, b"GET /x HTTP/1.0\r\nHost: a.test\r\n\r\n", Duration::from_secs(2)).await;
    let r = parse_raw(&raw);
    assert_eq!(r.status, 308);
    assert_eq!(r.header("location"), Some("https://a.test/x"));
}

/// A client that sends its ClientHello and then nothing holds no worker's turn at the
/// handshake's signing: other clients' handshakes go on while it stalls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_stalled_after_its_hello_does_not_hold_up_other_handshakes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Stalled handshakes last longer than a client here waits for its own (5 s), and
    // two workers, so that the stalled clients are likely on each of them.
    let env = [("SWARMGATE_LIMITS_TLS_HANDSHAKE_TIMEOUT", "60s"), ("SWARMGATE_RUNTIME_WORKERS", "2")];
    let s = setup_with("1.2", false, &env).await;
    let mut stalled = Vec::new();
    for _ in 0..4 {
        let mut tcp = tokio::net::TcpStream::connect(s.gw.https).await.unwrap();
        tcp.write_all(&client_hello("a.test")).await.unwrap();
        // The server's first flight: it has signed and now waits for this client.
        let mut buf = [0u8; 512];
        let read = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf)).await;
        let n = read.expect("the server's first flight waited for a stalled client").unwrap();
        assert!(n > 0 && buf[0] == 0x16, "no handshake record from the server");
        stalled.push(tcp);
    }
    for _ in 0..4 {
        let (_, info) =
            tls_connect(s.gw.https, &TlsOpts::sni("a.test")).await.expect("a handshake waited for a stalled client");
        assert_eq!(info.san, ["a.test"]);
    }
    drop(stalled);
}

/// The bytes of a TLS ClientHello for `name`.
fn client_hello(name: &str) -> Vec<u8> {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
    let mut conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
    let mut out = Vec::new();
    conn.write_tls(&mut out).unwrap();
    out
}

/// An HTTP/1.1 server answering by path with exact bytes: `/trailers` a chunked body whose
/// trailer section carries fields that may not be trailers, `/204` a 204 with a length.
async fn answering_server() -> std::net::SocketAddr {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                while let Some(head) = read_request_head(&mut s).await {
                    let reply: &[u8] = if head.starts_with(b"GET /trailers ") {
                        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-trailer\r\n\r\n5\r\nhello\r\n0\r\n\
                          X-Trailer: kept\r\nContent-Length: 9\r\nConnection: close\r\nHost: evil.test\r\n\
                          Transfer-Encoding: gzip\r\n\r\n"
                    } else {
                        b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\nX-Kept: yes\r\n\r\n"
                    };
                    if s.write_all(reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_gets_what_http2_allows_and_its_cookies_go_as_one_field() {
    let pki = Pki::new();
    let (crt, key) = pki.leaf(&["a.test"]);
    let server = answering_server().await;
    let b = Backend::start("app").await;
    for (upstream, what) in [(server, "answers"), (b.addr, "cookies")] {
        let gw = Gateway::builder(CONFIG)
            .var("B", upstream)
            .var("MIN", "1.2")
            .var("REDIRECT", false)
            .file("certs/a.crt", crt.clone())
            .file("certs/a.key", key.clone())
            .start()
            .await;
        let opts = TlsOpts::sni("a.test").verified(&pki).alpn(&[b"h2"]);
        let (stream, _) = tls_connect(gw.https, &opts).await.unwrap();
        let mut h2 = H2::over(stream).await;
        if what == "answers" {
            // Trailers: only those that may be trailers (a connection field would make
            // the client reset the stream, a length in them is a protocol error).
            let resp = {
                h2.sender.ready().await.unwrap();
                h2.sender.send_request(req2("GET", "a.test", "/trailers").body(empty()).unwrap()).await.unwrap()
            };
            let collected =
                http_body_util::BodyExt::collect(resp.into_body()).await.expect("the whole body, not a reset");
            let trailers = collected.trailers().cloned().expect("trailers");
            assert_eq!(&collected.to_bytes()[..], b"hello");
            assert_eq!(trailers.get("x-trailer").map(|v| v.to_str().unwrap()), Some("kept"));
            assert_eq!(trailers.len(), 1, "{trailers:?}");
            // A 204 carries no length (RFC 9110 section 8.6).
            let r = h2.get("a.test", "/204").await;
            assert_eq!((r.status, r.header("x-kept"), r.header("content-length")), (204, Some("yes"), None));
        } else {
            let req =
                req2("GET", "a.test", "/plain").header("cookie", "a=1").header("cookie", "b=2").header("cookie", "c=3");
            let r = h2.send(req.body(empty()).unwrap()).await.unwrap();
            assert_eq!(r.status, 200);
            let seen = b.last();
            assert_eq!(seen.headers.iter().filter(|(n, _)| n == "cookie").count(), 1, "{:?}", seen.headers);
            assert_eq!(seen.header("cookie"), Some("a=1; b=2; c=3"));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http10_by_alpn_is_served_and_an_ip_address_as_sni_is_no_warning_per_handshake() {
    let s = setup("1.2", false).await;
    let (r, info) = https_get(s.gw.https, &TlsOpts::sni("a.test").alpn(&[b"http/1.0"]), "a.test", "/").await.unwrap();
    assert_eq!(info.alpn.as_deref(), Some(&b"http/1.0"[..]));
    assert_eq!(r.status, 200);
    // rustls warns of such a name on every handshake that carries it: a line per
    // connection any client could set off.
    for _ in 0..3 {
        let out = std::process::Command::new("openssl")
            .args(["s_client", "-connect", &s.gw.https.to_string(), "-servername", "127.0.0.1"])
            .stdin(std::process::Stdio::null())
            .output()
            .expect("openssl (installed by scripts/test.sh)");
        assert!(String::from_utf8_lossy(&out.stdout).contains("Server certificate"), "no handshake");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!s.gw.logs().contains("Illegal SNI"), "{}", s.gw.logs());
}
