//! Server choice: `random` is uniform and never pins a connection to a server; `p2c`
//! keeps requests away from a slow server.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;

const CONFIG: &str = r#"
[listen]
http = "@HTTP@"
https = ""
admin = "@ADMIN@"

[[route]]
host = "*"
upstream = "app"

[upstream.app]
servers = [@SERVERS@]
balance = "@BALANCE@"
"#;

async fn gateway(backends: &[&Backend], balance: &str) -> Gateway {
    let servers: Vec<String> = backends.iter().map(|b| format!("\"{}\"", b.addr)).collect();
    Gateway::builder(CONFIG)
        .var("SERVERS", servers.join(", "))
        .var("BALANCE", balance)
        // Thousands of requests: keep the log to what the gateway itself says.
        .env("SWARMGATE_LOG", "info,swarmgate::access=off")
        .start()
        .await
}

/// Pearson's chi-square statistic of `counts` against a uniform distribution.
fn chi_square(counts: &[usize]) -> f64 {
    let n: usize = counts.iter().sum();
    let expected = n as f64 / counts.len() as f64;
    counts.iter().map(|&c| (c as f64 - expected).powi(2) / expected).sum()
}

/// Chi-square critical value for 2 degrees of freedom (3 servers) at p = 0.001: a fair
/// balancer fails this one run in a thousand.
const CHI2_DF2_P001: f64 = 13.816;

fn index_of(names: &[&str], r: &Resp) -> usize {
    let b = r.header("x-backend").expect("answered by a backend");
    names.iter().position(|n| *n == b).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_is_uniform_on_one_kept_alive_connection() {
    let (a, b, c) = (Backend::start("a").await, Backend::start("b").await, Backend::start("c").await);
    let gw = gateway(&[&a, &b, &c], "random").await;
    let names = ["a", "b", "c"];
    const N: usize = 3000;
    let mut conn = H1::connect(gw.http).await;
    let mut counts = [0usize; 3];
    let mut switches = 0;
    let mut last = None;
    for _ in 0..N {
        let r = conn.get("app.test", "/").await;
        assert_eq!(r.status, 200);
        let i = index_of(&names, &r);
        counts[i] += 1;
        if last.is_some_and(|l| l != i) {
            switches += 1;
        }
        last = Some(i);
    }
    assert!(!conn.is_closed(), "the one connection stayed open");
    let chi2 = chi_square(&counts);
    assert!(chi2 < CHI2_DF2_P001, "not uniform: {counts:?}, chi-square {chi2:.2} (df 2)");
    // Consecutive requests on one connection: with independent uniform picks 2/3 of the
    // 2999 pairs switch (expected 1999, sd ~26); pinning would give ~0.
    assert!(switches > 1800, "only {switches} switches in {N} requests: {counts:?}");
    assert_eq!(a.hits() + b.hits() + c.hits(), N);
    assert_eq!([a.hits(), b.hits(), c.hits()], counts);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_is_uniform_across_fresh_connections() {
    let (a, b, c) = (Backend::start("a").await, Backend::start("b").await, Backend::start("c").await);
    let gw = gateway(&[&a, &b, &c], "random").await;
    let names = ["a", "b", "c"];
    const N: usize = 1500;
    let mut counts = [0usize; 3];
    for _ in 0..N {
        let r = get(gw.http, "app.test", "/").await;
        assert_eq!(r.status, 200);
        counts[index_of(&names, &r)] += 1;
    }
    let chi2 = chi_square(&counts);
    assert!(chi2 < CHI2_DF2_P001, "not uniform: {counts:?}, chi-square {chi2:.2} (df 2)");
    assert_eq!([a.hits(), b.hits(), c.hits()], counts);
}

/// Runs `clients` loops of back-to-back requests for `dur`; returns requests answered.
async fn load(gw: &Gateway, clients: usize, dur: Duration) -> usize {
    let deadline = Instant::now() + dur;
    let addr = gw.http;
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let done = Arc::clone(&done);
        tasks.push(tokio::spawn(async move {
            let mut conn = H1::connect(addr).await;
            while Instant::now() < deadline {
                let r = conn.get("app.test", "/").await;
                assert_eq!(r.status, 200);
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    done.load(std::sync::atomic::Ordering::SeqCst)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2c_keeps_requests_away_from_a_slow_server() {
    let fast = Backend::start("fast").await;
    let slow = Backend::start_with_delay("slow", Duration::from_millis(300)).await;
    let gw = gateway(&[&fast, &slow], "p2c").await;
    let total = load(&gw, 8, Duration::from_millis(1500)).await;
    assert_eq!(fast.hits() + slow.hits(), total);
    let share = slow.hits() as f64 / total as f64;
    // With two servers p2c compares both every time: the slow one only gets a request
    // when it has no more in flight than the fast one.
    eprintln!("p2c: slow {} of {total}, max in flight {}", slow.hits(), slow.max_in_flight());
    assert!(share < 0.05, "slow server got {} of {total} requests", slow.hits());
    // A pick that takes the slow server to k+1 in flight needs the fast one to have at
    // least k in flight too, and with 8 clients k + k + 1 <= 8: never more than 4.
    assert!(slow.max_in_flight() <= 4, "slow server had {} in flight at once", slow.max_in_flight());
    assert!(total > 200, "only {total} requests in 1.5 s");

    // The same load with `random`: half the picks go to the slow server, so every client
    // spends most of its time waiting on it.
    let fast2 = Backend::start("fast").await;
    let slow2 = Backend::start_with_delay("slow", Duration::from_millis(300)).await;
    let gw2 = gateway(&[&fast2, &slow2], "random").await;
    let total2 = load(&gw2, 8, Duration::from_millis(1500)).await;
    let share2 = slow2.hits() as f64 / total2 as f64;
    eprintln!("random: slow {} of {total2}, max in flight {}", slow2.hits(), slow2.max_in_flight());
    assert!(share2 > 0.25, "random: slow server got {} of {total2}", slow2.hits());
    assert!(slow2.max_in_flight() >= 6, "random: slow server had only {} in flight", slow2.max_in_flight());
}
