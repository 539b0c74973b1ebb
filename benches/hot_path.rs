//! Criterion benches of the per-request pieces: route lookup (10 and 10,000 routes),
//! balancer pick (3 and 1,000 servers), the header rewrite, and the HTTP/1.1 codec on
//! both sides (a browser's request head read, a response head written, the server's
//! request head written and its response head read). The flat-cost claim is that the
//! large cases cost about what the small ones do.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::net::SocketAddr;

use criterion::{Criterion, criterion_group, criterion_main};
use hyper::HeaderMap;
use hyper::header::HeaderValue;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use swarmgate::config::{Balance, HostPattern};
use swarmgate::proxy::{forwarded, front, h1, hop};
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
                black_box(hop::strip(h)).unwrap();
                let facts = forwarded::Facts {
                    peer: &peer,
                    trusted: false,
                    proto: "https",
                    host: &host,
                    port: 443,
                    prefix: None,
                };
                black_box(forwarded::forwarding(h, &facts))
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
                black_box(hop::strip(h)).unwrap();
                let facts = forwarded::Facts {
                    peer: &peer,
                    trusted: true,
                    proto: "https",
                    host: &host,
                    port: 443,
                    prefix: Some(&prefix),
                };
                black_box(forwarded::forwarding(h, &facts))
            },
            criterion::BatchSize::SmallInput,
        )
    });
    g.finish();
}

/// The head a browser sends: what `browser_headers` holds, on the wire.
const BROWSER_HEAD: &[u8] = b"GET /fhir/Patient?_count=20 HTTP/1.1\r\n\
    Host: fhir.sandbox.example.org\r\n\
    User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/130.0 Safari/537.36\r\n\
    Accept: application/fhir+json, application/json;q=0.9, */*;q=0.8\r\n\
    Accept-Encoding: gzip, deflate, br\r\n\
    Accept-Language: en-US,en;q=0.9\r\n\
    Connection: keep-alive\r\n\
    Authorization: Bearer eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiIxMjM0In0.c2lnbmF0dXJl\r\n\r\n";

/// A FHIR server's answer head.
const SERVER_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\n\
    Content-Type: application/fhir+json;charset=utf-8\r\n\
    Content-Length: 1834\r\n\
    Date: Thu, 26 Nov 2026 16:00:00 GMT\r\n\
    ETag: W/\"3\"\r\n\
    Last-Modified: Thu, 26 Nov 2026 15:59:00 GMT\r\n\
    Cache-Control: no-cache\r\n\
    X-Request-Id: 0123456789abcdef0123456789abcdef\r\n\r\n";

fn http1_codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("http1_codec");
    g.bench_function("client_request_head_read", |b| {
        b.iter(|| {
            let mut buf = bytes::BytesMut::from(BROWSER_HEAD);
            black_box(front::parse(&mut buf, 8192))
        })
    });
    g.bench_function("client_response_head_written", |b| {
        let head = h1::parse_head(&mut bytes::BytesMut::from(SERVER_HEAD), &hyper::Method::GET).unwrap().unwrap();
        let (parts, _) = hyper::Response::new(()).into_parts();
        let (get, v11) = (hyper::Method::GET, hyper::Version::HTTP_11);
        let mut out = Vec::with_capacity(512);
        b.iter(|| {
            out.clear();
            black_box(front::encode_head(&parts, Some(&head.fields), Some(1834), &get, v11, true, &mut out))
        })
    });
    g.bench_function("server_request_head_written", |b| {
        let mut buf = bytes::BytesMut::from(BROWSER_HEAD);
        let front::Parsed::Ours(req, _, fields) = front::parse(&mut buf, 8192) else { panic!("not parsed") };
        let (mut parts, _) = req.into_parts();
        let peer = forwarded::PeerValues::new("192.0.2.10".parse().unwrap());
        let host = HeaderValue::from_static("fhir.sandbox.example.org");
        let facts =
            forwarded::Facts { peer: &peer, trusted: false, proto: "https", host: &host, port: 443, prefix: None };
        let added = forwarded::forwarding(&mut parts.headers, &facts).fields;
        let mut out = Vec::with_capacity(1024);
        b.iter(|| {
            out.clear();
            let head = h1::RequestHead { parts: &parts, fields: &fields, added: &added };
            h1::encode_head(&head, h1::Framing::Empty, &mut out);
            black_box(out.len())
        })
    });
    g.bench_function("server_response_head_read", |b| {
        b.iter(|| {
            let mut buf = bytes::BytesMut::from(SERVER_HEAD);
            black_box(h1::parse_head(&mut buf, &hyper::Method::GET).unwrap())
        })
    });
    g.finish();
}

criterion_group!(benches, route_lookup, balancer_pick, header_rewrite, http1_codec);
criterion_main!(benches);
