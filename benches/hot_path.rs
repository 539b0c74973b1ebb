//! Criterion benches of the per-request pieces: route lookup (10 and 10,000 routes),
//! balancer pick (3 and 1,000 servers) and the header rewrite. The flat-cost claim is
//! that the large cases cost about what the small ones do.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::net::SocketAddr;

use criterion::{Criterion, criterion_group, criterion_main};
use hyper::HeaderMap;
use hyper::header::HeaderValue;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use swarmgate::config::{Balance, HostPattern};
use swarmgate::proxy::{forwarded, hop};
use swarmgate::route::Router;
use swarmgate::upstream::{Server, ServerState, balance};

/// `n` routes spread over n/10 hosts with 10 prefixes each (plus wildcards).
fn router(n: usize) -> Router<usize> {
    let mut r = Router::default();
    let hosts = (n / 10).max(1);
    for i in 0..n {
        let host = HostPattern::Exact(format!("svc{}.sandbox.example.org", i % hosts));
        let prefix = format!("/api/v{}/resource{}", i % 3, i / hosts);
        r.insert(&host, &prefix, i);
    }
    r.insert(&HostPattern::Wildcard("sandbox.example.org".into()), "/", usize::MAX);
    r
}

fn route_lookup(c: &mut Criterion) {
    let mut g = c.benchmark_group("route_lookup");
    for n in [10, 10_000] {
        let r = router(n);
        let hosts = (n / 10).max(1);
        let host = format!("svc{}.sandbox.example.org", (n / 2) % hosts);
        let path = format!("/api/v{}/resource{}/Patient/123/_history/4", (n / 2) % 3, (n / 2) / hosts);
        assert!(r.lookup(&host, &path).is_some());
        g.bench_function(format!("{n}_routes"), |b| b.iter(|| black_box(r.lookup(black_box(&host), black_box(&path)))));
        g.bench_function(format!("{n}_routes_wildcard_fallback"), |b| {
            b.iter(|| black_box(r.lookup(black_box("other.sandbox.example.org"), black_box("/x/y"))))
        });
    }
    g.finish();
}

fn balancer_pick(c: &mut Criterion) {
    let mut g = c.benchmark_group("balancer_pick");
    for n in [3u16, 1000] {
        let servers: Vec<_> = (0..n)
            .map(|i| Server::new(SocketAddr::from(([10, 0, (i >> 8) as u8, i as u8], 8080)), ServerState::Healthy))
            .collect();
        let mut rng = SmallRng::seed_from_u64(1);
        for (name, how) in [("random", Balance::Random), ("p2c", Balance::P2c)] {
            g.bench_function(format!("{name}_{n}_servers"), |b| {
                b.iter(|| black_box(balance::pick(how, black_box(&servers), &[], &mut rng).map(|s| s.addr)))
            });
        }
        let exclude = [servers[0].addr];
        g.bench_function(format!("random_{n}_servers_retry"), |b| {
            b.iter(|| black_box(balance::pick(Balance::Random, &servers, &exclude, &mut rng).map(|s| s.addr)))
        });
    }
    g.finish();
}

fn browser_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("host", HeaderValue::from_static("fhir.sandbox.example.org"));
    h.insert(
        "user-agent",
        HeaderValue::from_static(
            "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/130.0 Safari/537.36",
        ),
    );
    h.insert("accept", HeaderValue::from_static("application/fhir+json, application/json;q=0.9, */*;q=0.8"));
    h.insert("accept-encoding", HeaderValue::from_static("gzip, deflate, br"));
    h.insert("accept-language", HeaderValue::from_static("en-US,en;q=0.9"));
    h.insert("connection", HeaderValue::from_static("keep-alive"));
    h.insert("authorization", HeaderValue::from_static("Bearer eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiIxMjM0In0.c2lnbmF0dXJl"));
    h
}

fn header_rewrite(c: &mut Criterion) {
    let peer = forwarded::PeerValues::new("192.0.2.10".parse().unwrap());
    let template = browser_headers();
    let prefix = HeaderValue::from_static("/fhir");
    let host = HeaderValue::from_static("fhir.sandbox.example.org");
    let mut g = c.benchmark_group("header_rewrite");
    g.bench_function("untrusted_peer", |b| {
        b.iter_batched_ref(
            || template.clone(),
            |h| {
                hop::strip(h);
                let facts = forwarded::Facts {
                    peer: &peer,
                    trusted: false,
                    proto: "https",
                    host: &host,
                    port: 443,
                    prefix: None,
                };
                black_box(forwarded::apply(h, &facts))
            },
            criterion::BatchSize::SmallInput,
        )
    });
    let mut trusted = template.clone();
    trusted.insert("x-forwarded-for", HeaderValue::from_static("203.0.113.9"));
    trusted.insert("forwarded", HeaderValue::from_static("for=203.0.113.9;proto=https"));
    g.bench_function("trusted_peer_extends_chains", |b| {
        b.iter_batched_ref(
            || trusted.clone(),
            |h| {
                hop::strip(h);
                let facts = forwarded::Facts {
                    peer: &peer,
                    trusted: true,
                    proto: "https",
                    host: &host,
                    port: 443,
                    prefix: Some(&prefix),
                };
                black_box(forwarded::apply(h, &facts))
            },
            criterion::BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, route_lookup, balancer_pick, header_rewrite);
criterion_main!(benches);
