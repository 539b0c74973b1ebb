//! Criterion benches of reload work for a large config: parsing and validating 10,000
//! routes (the SIGHUP path minus certificates and the swap), with the bare TOML parse as
//! the floor.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::hint::black_box;
use std::path::Path;

use criterion::{Criterion, criterion_group, criterion_main};

/// `routes` routes over routes/10 hosts and 10 upstreams.
pub fn big_config(routes: usize) -> String {
    let mut s = String::from("[listen]\nhttp = \"127.0.0.1:8080\"\nhttps = \"\"\nadmin = \"\"\n");
    let hosts = (routes / 10).max(1);
    for i in 0..routes {
        s += &format!(
            "[[route]]\nhost = \"svc{}.sandbox.example.org\"\npath = \"/api/v{}/r{}\"\nupstream = \"u{}\"\n",
            i % hosts,
            i % 3,
            i / hosts,
            i % 10
        );
    }
    for u in 0..10 {
        s += &format!("[upstream.u{u}]\nservers = [\"10.0.0.{}:8080\", \"10.0.1.{}:8080\"]\n", u + 1, u + 1);
    }
    s
}

fn parse(c: &mut Criterion) {
    let text = big_config(10_000);
    let env = BTreeMap::new();
    let mut g = c.benchmark_group("reload_10k_routes");
    g.sample_size(20);
    g.bench_function("toml_only", |b| b.iter(|| black_box(toml::de::DeTable::parse(black_box(&text)).unwrap())));
    g.bench_function("config_parse_and_validate", |b| {
        b.iter(|| black_box(swarmgate::config::parse(Path::new("big.toml"), black_box(&text), &env).unwrap()))
    });
    g.finish();
}

criterion_group!(benches, parse);
criterion_main!(benches);
