//! The admin listener: health, readiness, Prometheus metrics that move with traffic, the
//! upstreams view and the authenticated drain call.

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
redirect_https = false

[tls]
certs_dir = "certs"

[[route]]
host = "app.test"
upstream = "app"

[upstream.app]
servers = [@SERVERS@]
"#;

async fn start(servers: &[&Backend], token: Option<&str>) -> (Gateway, Pki) {
    let pki = Pki::new();
    let (crt, key) = pki.leaf(&["app.test"]);
    let list: Vec<String> = servers.iter().map(|b| format!("\"{}\"", b.addr)).collect();
    let mut b =
        Gateway::builder(CONFIG).var("SERVERS", list.join(", ")).file("certs/app.crt", crt).file("certs/app.key", key);
    if let Some(t) = token {
        b = b.env("SWARMGATE_ADMIN_TOKEN", t);
    }
    (b.start().await, pki)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_readiness() {
    let b = Backend::start("app").await;
    let (gw, _) = start(&[&b], None).await;
    let r = gw.admin_get("/healthz").await;
    assert_eq!((r.status, r.text().as_str()), (200, "ok\n"));
    let r = gw.admin_get("/readyz").await;
    assert_eq!((r.status, r.text().as_str()), (200, "ready\n"));
    let r = gw.admin_get("/nope").await;
    assert_eq!(r.status, 404);
    let r = admin_post(gw.admin, "/healthz", None).await;
    assert_eq!((r.status, r.header("allow")), (405, Some("GET, HEAD")));
    let r = gw.admin_get("/upstreams/app/drain").await;
    assert_eq!((r.status, r.header("allow")), (405, Some("POST")));
    // The admin listener is not a route: traffic never reaches it from there.
    assert_eq!(b.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_families_move_with_traffic() {
    let b = Backend::start("app").await;
    let (gw, pki) = start(&[&b], None).await;
    let m = gw.metrics().await;
    for family in [
        "# TYPE swarmgate_requests_total counter",
        "# TYPE swarmgate_responses_total counter",
        "# TYPE swarmgate_request_duration_seconds histogram",
        "# TYPE swarmgate_open_connections gauge",
        "# TYPE swarmgate_tls_handshakes_total counter",
        "# TYPE swarmgate_upstream_connect_errors_total counter",
        "# TYPE swarmgate_upstream_servers gauge",
        "# TYPE swarmgate_reloads_total counter",
        "# TYPE swarmgate_certificate_expiry_seconds gauge",
    ] {
        assert!(m.lines().any(|l| l == family), "missing {family:?} in\n{m}");
    }
    let ok = r#"swarmgate_requests_total{route="app.test/",upstream="app",class="2xx"}"#;
    let err5 = r#"swarmgate_requests_total{route="app.test/",upstream="app",class="5xx"}"#;
    let unrouted = r#"swarmgate_requests_total{route="",upstream="",class="4xx"}"#;
    let count = r#"swarmgate_request_duration_seconds_count{route="app.test/",upstream="app"}"#;
    assert_eq!(metric_value(&m, ok), Some(0.0));
    assert_eq!(metric_value(&m, count), Some(0.0));
    assert_eq!(metric_value(&m, "swarmgate_tls_handshakes_total"), Some(0.0));
    assert_eq!(metric_value(&m, r#"swarmgate_upstream_servers{upstream="app",state="healthy"}"#), Some(1.0));
    assert!(
        m.lines().any(|l| l.starts_with(r#"swarmgate_certificate_expiry_seconds{name="app.test",source="static"} "#)),
        "{m}"
    );

    let mut c = H1::connect(gw.http).await;
    for _ in 0..7 {
        assert_eq!(c.get("app.test", "/").await.status, 200);
    }
    assert_eq!(c.get("app.test", "/status?code=503").await.status, 503);
    assert_eq!(c.get("nowhere.test", "/").await.status, 404);
    assert_eq!(c.get("nowhere.test", "/").await.status, 404);
    let (r, _) = https_get(gw.https, &TlsOpts::sni("app.test").verified(&pki), "app.test", "/").await.unwrap();
    assert_eq!(r.status, 200);
    // Connections held open show in the gauge (c plus two more).
    let mut c2 = H1::connect(gw.http).await;
    let mut c3 = H1::connect(gw.http).await;
    assert_eq!(c2.get("app.test", "/").await.status, 200);
    assert_eq!(c3.get("app.test", "/").await.status, 200);
    let m = gw.metrics().await;
    assert_eq!(metric_value(&m, ok), Some(10.0), "{m}");
    assert_eq!(metric_value(&m, err5), Some(1.0), "the server's 503 counts as 5xx");
    assert_eq!(metric_value(&m, unrouted), Some(2.0));
    // By status code: the codes seen, no others.
    let status = |route: &str, up: &str, code: &str| {
        metric_value(&m, &format!(r#"swarmgate_responses_total{{route="{route}",upstream="{up}",status="{code}"}}"#))
    };
    assert_eq!(status("app.test/", "app", "200"), Some(10.0), "{m}");
    assert_eq!(status("app.test/", "app", "503"), Some(1.0), "{m}");
    assert_eq!(status("", "", "404"), Some(2.0), "{m}");
    assert_eq!(status("app.test/", "app", "404"), None, "{m}");
    assert_eq!(m.lines().filter(|l| l.starts_with("swarmgate_responses_total{")).count(), 3, "{m}");
    assert_eq!(metric_value(&m, count), Some(11.0));
    assert_eq!(metric_value(&m, "swarmgate_tls_handshakes_total"), Some(1.0));
    // (The TLS connection above closed a moment ago: wait for the gateway to see it.)
    assert!(
        wait_until_async(Duration::from_secs(3), || async {
            gw.metric("swarmgate_open_connections").await == Some(3.0)
        })
        .await,
        "{}",
        gw.metrics().await
    );
    // Buckets are cumulative and end at the count.
    let buckets: Vec<f64> = m
        .lines()
        .filter(|l| l.starts_with(r#"swarmgate_request_duration_seconds_bucket{route="app.test/",upstream="app",le="#))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(buckets.len(), 15, "{m}");
    assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{buckets:?}");
    assert_eq!(*buckets.last().unwrap(), 11.0);
    let sum = metric_value(&m, r#"swarmgate_request_duration_seconds_sum{route="app.test/",upstream="app"}"#).unwrap();
    assert!(sum > 0.0 && sum < 11.0, "{sum}");

    drop((c, c2, c3));
    assert!(
        wait_until_async(Duration::from_secs(3), || async {
            gw.metric("swarmgate_open_connections").await == Some(0.0)
        })
        .await,
        "connections still counted after they closed"
    );

    // A server that refuses connections counts as a connect error.
    b.stop();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let r = get(gw.http, "app.test", "/").await;
    assert!(matches!(r.status, 502 | 503), "{}", r.status);
    let m = gw.metrics().await;
    assert_eq!(metric_value(&m, r#"swarmgate_upstream_connect_errors_total{upstream="app"}"#), Some(1.0), "{m}");
}

fn upstreams(r: &Resp) -> serde_json::Value {
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    serde_json::from_slice(&r.body).unwrap()
}

/// (address, state, in_flight) of every server of `app`.
async fn servers(gw: &Gateway) -> Vec<(String, String, u64)> {
    let v = upstreams(&gw.admin_get("/upstreams").await);
    let app = v["upstreams"].as_array().unwrap().iter().find(|u| u["name"] == "app").expect("upstream app");
    let mut out: Vec<(String, String, u64)> = app["servers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["address"].as_str().unwrap().to_string(),
                s["state"].as_str().unwrap().to_string(),
                s["in_flight"].as_u64().unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstreams_lists_servers_and_states() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let (gw, _) = start(&[&a, &b], None).await;
    let v = upstreams(&gw.admin_get("/upstreams").await);
    assert_eq!(v["generation"], 0);
    let ups = v["upstreams"].as_array().unwrap();
    assert_eq!(ups.len(), 1);
    assert_eq!(ups[0]["name"], "app");
    assert_eq!(ups[0]["balance"], "random");
    assert_eq!(ups[0]["discovery"], serde_json::Value::Null);
    let mut want = vec![(a.addr.to_string(), "healthy".to_string(), 0), (b.addr.to_string(), "healthy".to_string(), 0)];
    want.sort();
    assert_eq!(servers(&gw).await, want);

    // In-flight requests show while they last.
    let http = gw.http;
    let slow = tokio::spawn(async move { get(http, "app.test", "/sleep?ms=800").await });
    assert!(
        wait_until_async(Duration::from_secs(2), || async { servers(&gw).await.iter().map(|s| s.2).sum::<u64>() == 1 })
            .await
    );
    assert_eq!(slow.await.unwrap().status, 200);
    assert_eq!(servers(&gw).await.iter().map(|s| s.2).sum::<u64>(), 0);
    let v = upstreams(&gw.admin_get("/upstreams").await);
    let requests: u64 =
        v["upstreams"][0]["servers"].as_array().unwrap().iter().map(|s| s["requests"].as_u64().unwrap()).sum();
    assert_eq!(requests, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_is_refused_without_a_configured_token() {
    let a = Backend::start("a").await;
    let (gw, _) = start(&[&a], None).await;
    let path = format!("/upstreams/app/drain?server={}", a.addr);
    let r = admin_post(gw.admin, &path, None).await;
    assert_eq!(r.status, 403);
    let r = admin_post(gw.admin, &path, Some("anything")).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.text(), "mutating admin calls are disabled: SWARMGATE_ADMIN_TOKEN is not set\n");
    assert_eq!(servers(&gw).await, [(a.addr.to_string(), "healthy".to_string(), 0)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_with_the_token_stops_new_requests() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let (gw, _) = start(&[&a, &b], Some("s3cret-token")).await;
    let path = format!("/upstreams/app/drain?server={}", a.addr);
    let r = admin_post(gw.admin, &path, None).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    let r = admin_post(gw.admin, &path, Some("wrong-token")).await;
    assert_eq!(r.status, 401);
    let r = admin_post(gw.admin, &path, Some("s3cret-token-and-more")).await;
    assert_eq!(r.status, 401);
    // Refused calls changed nothing.
    assert!(servers(&gw).await.iter().all(|s| s.1 == "healthy"));
    let r = admin_post(gw.admin, "/upstreams/ghost/drain?server=127.0.0.1:1", Some("s3cret-token")).await;
    assert_eq!(r.status, 404);
    let r = admin_post(gw.admin, "/upstreams/app/drain", Some("s3cret-token")).await;
    assert_eq!(r.status, 400);
    // No name, or a path around it: not a drain call (the first once killed the call).
    for path in ["/upstreams/drain", "/upstreams//drain", "/upstreams/a/b/drain"] {
        let r = admin_post(gw.admin, path, Some("s3cret-token")).await;
        assert_eq!(r.status, 404, "{path}");
    }
    let r = admin_post(gw.admin, "/upstreams/app/drain?server=127.0.0.1:1", Some("s3cret-token")).await;
    assert_eq!(r.status, 404);
    // The scheme's name in any case (RFC 9110 section 11.1); the token exactly.
    for (value, status) in [("bearer s3cret-token", 404), ("BEARER s3cret-token", 404), ("Bearer S3CRET-TOKEN", 401)] {
        let call = req("POST", &gw.admin.to_string(), "/upstreams/app/drain?server=127.0.0.1:1");
        let r = send(gw.admin, call.header("authorization", value).body(empty()).unwrap()).await;
        assert_eq!(r.status, status, "{value}");
    }

    // Hold a request on `a` so that the drained server is still there to be seen.
    a.set_delay(Duration::from_millis(1500));
    let http = gw.http;
    let mut held = Vec::new();
    // One request at a time until one is on `a` (random picks: a few tries), each one
    // at its server before the next, so none is between pick and server at the drain.
    while a.hits() == 0 {
        assert!(held.len() < 40, "a was never picked");
        held.push(tokio::spawn(async move { get(http, "app.test", "/").await }));
        let n = held.len();
        assert!(wait_until(Duration::from_secs(2), || a.hits() + b.hits() == n).await);
    }
    assert!(
        wait_until_async(Duration::from_secs(2), || async {
            servers(&gw).await.iter().any(|s| s.0 == a.addr.to_string() && s.2 > 0)
        })
        .await,
        "no request in flight on a"
    );
    let r = admin_post(gw.admin, &path, Some("s3cret-token")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v, serde_json::json!({"upstream": "app", "server": a.addr.to_string(), "state": "draining"}));
    let now = servers(&gw).await;
    let a_state = now.iter().find(|s| s.0 == a.addr.to_string()).unwrap();
    assert_eq!(a_state.1, "draining");
    assert!(a_state.2 > 0, "{now:?}");
    let m = gw.metrics().await;
    assert_eq!(metric_value(&m, r#"swarmgate_upstream_servers{upstream="app",state="draining"}"#), Some(1.0));

    // New requests all go to b; the ones in flight on a finish normally.
    let a_before = a.hits();
    let mut c = H1::connect(gw.http).await;
    for _ in 0..30 {
        let r = c.get("app.test", "/").await;
        assert_eq!(r.header("x-backend"), Some("b"));
    }
    for h in held {
        assert_eq!(h.await.unwrap().status, 200);
    }
    assert_eq!(a.hits(), a_before);
    // Once idle, a drained server is still shown, draining, while the config lists it:
    // the operator sees what is held out.
    let mut idle =
        vec![(a.addr.to_string(), "draining".to_string(), 0), (b.addr.to_string(), "healthy".to_string(), 0)];
    idle.sort(); // as `servers` lists them
    assert!(
        wait_until_async(Duration::from_secs(3), || async { servers(&gw).await == idle }).await,
        "{:?}",
        servers(&gw).await
    );
    assert!(wait_until(Duration::from_secs(3), || gw.logs().contains("server drained; held out while listed")).await);
    assert_eq!(servers(&gw).await, idle);
    let m = gw.metrics().await;
    assert_eq!(metric_value(&m, r#"swarmgate_upstream_servers{upstream="app",state="draining"}"#), Some(1.0));
    // With every server drained there is nothing to send to.
    let r = admin_post(gw.admin, &format!("/upstreams/app/drain?server={}", b.addr), Some("s3cret-token")).await;
    assert_eq!(r.status, 200);
    let r = c.get("app.test", "/").await;
    assert_eq!((r.status, r.text().as_str()), (503, "503 no server available\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_two_certificates_cover_has_one_expiry_series() {
    // A renewed file beside the old one: one is served, and one series says when it ends.
    let b = Backend::start("app").await;
    let pki = Pki::new();
    let (old_crt, old_key) = pki.leaf(&["app.test"]);
    let (new_crt, new_key) = pki.leaf(&["app.test", "www.app.test"]);
    let gw = Gateway::builder(CONFIG)
        .var("SERVERS", format!("\"{}\"", b.addr))
        .file("certs/app.crt", old_crt)
        .file("certs/app.key", old_key)
        .file("certs/app-renewed.crt", new_crt)
        .file("certs/app-renewed.key", new_key)
        .start()
        .await;
    let m = gw.metrics().await;
    let series = |name: &str| {
        let prefix = format!(r#"swarmgate_certificate_expiry_seconds{{name="{name}",source="static"}} "#);
        m.lines().filter(|l| l.starts_with(&prefix)).count()
    };
    assert_eq!((series("app.test"), series("www.app.test")), (1, 1), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_has_an_access_log_line_refused_failed_or_abandoned() {
    let b = Backend::start("app").await;
    let (gw, _) = start(&[&b], None).await;
    // Answered, refused (no route), failed (the server answers nothing in time is not
    // configured here: a stopped server is), and abandoned (the client goes while the
    // server takes its time).
    assert_eq!(get(gw.http, "app.test", "/ok").await.status, 200);
    assert_eq!(get(gw.http, "nowhere.test", "/refused").await.status, 404);
    {
        let mut c = tokio::net::TcpStream::connect(gw.http).await.unwrap();
        use tokio::io::AsyncWriteExt;
        c.write_all(b"GET /sleep?ms=3000 HTTP/1.1\r\nHost: app.test\r\n\r\n").await.unwrap();
        assert!(wait_until(Duration::from_secs(2), || b.hits() >= 2).await, "the request reached the server");
    } // dropped: the client goes away
    let logged = |status: &str, path: &str| {
        gw.logs()
            .lines()
            .any(|l| l.contains("swarmgate::access") && l.contains(&format!("status={status} ")) && l.contains(path))
    };
    assert!(wait_until(Duration::from_secs(2), || logged("499", "path=/sleep")).await, "{}", gw.logs());
    // The client left while the server worked: the line names that server.
    assert!(logged("499", &format!("path=/sleep status=499 upstream=\"{}\"", b.addr)), "{}", gw.logs());
    assert!(logged("200", "path=/ok") && logged("404", "path=/refused"), "{}", gw.logs());
    // The gateway's own answer is logged with the bytes of its text.
    let text = "404 no route for this host and path\n";
    assert!(logged("404", "path=/refused status=404 upstream=\"-\" "), "{}", gw.logs());
    assert!(
        gw.logs().lines().any(|l| l.contains("path=/refused ") && l.contains(&format!(" bytes={} ", text.len()))),
        "{}",
        gw.logs()
    );
    let m = gw.metrics().await;
    let abandoned = r#"swarmgate_responses_total{route="app.test/",upstream="app",status="499"}"#;
    assert_eq!(metric_value(&m, abandoned), Some(1.0), "{m}");
    let b_addr = b.addr;
    drop(b); // a server that is gone: 502, logged with the gateway's status
    let r = get(gw.http, "app.test", "/failed").await;
    assert!(r.status == 502 || r.status == 503, "{}", r.status);
    assert!(
        wait_until(Duration::from_secs(2), || logged(&r.status.to_string(), "path=/failed")).await,
        "{}",
        gw.logs()
    );
    if r.status == 502 {
        // The server that failed is named.
        let named = format!("path=/failed status=502 upstream=\"{}\" ", b_addr);
        assert!(logged("502", &named), "{}", gw.logs());
    }
}
