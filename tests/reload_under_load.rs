//! SIGHUP while traffic flows: no request fails, no client connection is dropped, an open
//! WebSocket stays up, and a route that disappears answers 404 only to requests that
//! start after the swap.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use support::{Backend, Gateway};
use tokio_tungstenite::tungstenite::Message;

fn config(a: &Backend, b: &Backend, with_slow_route: bool, generation_marker: usize) -> String {
    let slow = if with_slow_route {
        "[[route]]\nhost = \"app.test\"\npath = \"/slow\"\nstrip_path = true\nupstream = \"app\"\n"
    } else {
        ""
    };
    // The marker route changes on every reload so each one really swaps routes.
    format!(
        r#"
[listen]
http = "@HTTP@"
https = ""
admin = "@ADMIN@"

[proxy]
redirect_https = false
drain_timeout = "5s"
shutdown_delay = "0s"

[[route]]
host = "app.test"
path = "/"
upstream = "app"

[[route]]
host = "app.test"
path = "/marker{generation_marker}"
upstream = "app"

{slow}
[upstream.app]
servers = ["{}", "{}"]
"#,
        a.addr, b.addr
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reloads_under_load_lose_nothing() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let gw = Gateway::start(&config(&a, &b, true, 0)).await;

    // An open WebSocket through the gateway.
    let url = format!("ws://{}/ws", gw.http);
    let mut request = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url).unwrap();
    request.headers_mut().insert("host", "app.test".parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    ws.send(Message::Text("before".into())).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::Text("before".into()));

    // Keep-alive clients hammering the gateway; each counts its connection's requests.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for _ in 0..16 {
        let (stop, ok, addr) = (Arc::clone(&stop), Arc::clone(&ok), gw.http);
        clients.push(tokio::spawn(async move {
            let mut conn = support::H1::connect(addr).await;
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let req = support::req("GET", "app.test", "/").body(support::empty()).unwrap();
                match conn.send(req).await {
                    Ok(r) if r.status == 200 => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => failures.push(format!("status {}", r.status)),
                    Err(e) => {
                        failures.push(format!("error {e}"));
                        break;
                    }
                }
            }
            (failures, conn.is_closed())
        }));
    }

    // A slow request on the route about to disappear: it started before the swap.
    let slow_addr = gw.http;
    let slow = tokio::spawn(async move { support::get(slow_addr, "app.test", "/slow/sleep?ms=1500").await });
    tokio::time::sleep(Duration::from_millis(300)).await;

    let before = ok.load(Ordering::Relaxed);
    for generation in 1..=10u64 {
        let keep_slow = generation < 10;
        let reload = gw.reload(&config(&a, &b, keep_slow, generation as usize)).await;
        assert_eq!(reload, support::Reload::Applied(generation));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let slow = slow.await.unwrap();
    assert_eq!(slow.status, 200, "a request in flight across ten reloads must finish: {}", slow.text());

    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all_failures = Vec::new();
    for c in clients {
        let (failures, closed) = c.await.unwrap();
        assert!(!closed, "a reload closed a client connection");
        all_failures.extend(failures);
    }
    let served = ok.load(Ordering::Relaxed) - before;
    eprintln!("10 reloads under load: {served} requests answered during them, {} failed", all_failures.len());
    assert!(all_failures.is_empty(), "requests failed during reloads: {all_failures:?}");
    assert!(served > 200, "too little traffic during the reloads to prove anything: {served}");

    // The WebSocket opened before the reloads still works.
    ws.send(Message::Text("after".into())).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::Text("after".into()));
}

#[tokio::test]
async fn a_removed_route_answers_404_only_to_requests_that_start_after_the_swap() {
    let a = Backend::start("a").await;
    let route = |with_extra: bool| {
        let extra = if with_extra {
            "[[route]]\nhost = \"app.test\"\npath = \"/extra\"\nstrip_path = true\nupstream = \"app\"\n"
        } else {
            ""
        };
        format!(
            "[listen]\nhttp = \"@HTTP@\"\nhttps = \"\"\nadmin = \"@ADMIN@\"\n[proxy]\nredirect_https = false\n\
             [[route]]\nhost = \"app.test\"\npath = \"/home\"\nupstream = \"app\"\n{extra}\
             [upstream.app]\nservers = [\"{}\"]\n",
            a.addr
        )
    };
    let gw = Gateway::start(&route(true)).await;
    assert_eq!(support::get(gw.http, "app.test", "/extra").await.status, 200);
    let addr = gw.http;
    // Started before the swap; the backend holds it for a second.
    let in_flight = tokio::spawn(async move { support::get(addr, "app.test", "/extra/sleep?ms=1000").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(gw.reload(&route(false)).await, support::Reload::Applied(1));
    let after = support::get(gw.http, "app.test", "/extra").await;
    assert_eq!(after.status, 404, "a route removed by the reload must not match new requests");
    let before = in_flight.await.unwrap();
    assert_eq!(before.status, 200, "the request that started before the swap finishes on its route");
    assert_eq!(support::get(gw.http, "app.test", "/home").await.status, 200);
}
