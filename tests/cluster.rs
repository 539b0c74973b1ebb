//! Clustered ACME: three real swarmgate processes sharing one real `redis-server`, one real
//! Pebble validating through a TCP round-robin balancer (each validation connection goes
//! to the next replica, so most land on replicas that did not place the order).
//!
//! Figures are printed as `MEASURE:` lines; run alone for numbers:
//! `cargo test --test cluster -- --nocapture`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod acme_support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use acme_support::cluster::{Balancer, Redis, set_acme};
use acme_support::*;

/// Longest time from the first replica serving a new certificate to all of them serving it.
const PROPAGATION_BOUND: Duration = Duration::from_secs(3);

struct Cluster {
    dir: tempfile::TempDir,
    redis: Redis,
    balancer: Balancer,
    pebble: Pebble,
    backend: u16,
    replicas: Vec<Gateway>,
    configs: Vec<PathBuf>,
}

impl Cluster {
    /// Redis, the balancer, Pebble (validating through the balancer) and `n` replicas
    /// (`replica-1`…) routing `names`.
    fn start(n: usize, challenge: &str, validity: Option<u64>, names: &[String], hold: bool) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let redis = Redis::start(&dir.path().join("redis"));
        let balancer = Balancer::start();
        // Validations wait until every replica listens, so they are spread over all of
        // them (otherwise the first replica may order and validate alone before the
        // others start); `hold` keeps them waiting for the caller to release.
        balancer.hold.store(true, std::sync::atomic::Ordering::SeqCst);
        let plan = PebblePlan::new(&dir.path().join("pebble"), balancer.http_port, balancer.https_port, validity);
        let pebble = plan.start();
        let backend = backend();
        let mut c = Cluster { dir, redis, balancer, pebble, backend, replicas: Vec::new(), configs: Vec::new() };
        for i in 1..=n {
            let gw = c.replica(&format!("replica-{i}"), challenge, names);
            c.replicas.push(gw);
            let ports: Vec<Ports> = c.replicas.iter().map(|r| r.ports).collect();
            c.balancer.set_targets(&ports);
        }
        if !hold {
            c.balancer.hold.store(false, std::sync::atomic::Ordering::SeqCst);
        }
        c
    }

    /// Starts a replica on free ports (new ones when another test took one meanwhile).
    fn replica(&mut self, id: &str, challenge: &str, names: &[String]) -> Gateway {
        let mut attempt = 0;
        loop {
            let ports = Ports::free();
            let config = self.config(id, ports, challenge, names);
            match Gateway::try_start_env(&config, ports, self.dir.path().join(format!("{id}.log")), &[]) {
                Ok(gw) => {
                    self.configs.push(config);
                    return gw;
                }
                Err(e) if attempt < 3 && e.contains("exit status: 2") => attempt += 1,
                Err(e) => panic!("{e}"),
            }
        }
    }

    fn config(&self, id: &str, ports: Ports, challenge: &str, names: &[String]) -> PathBuf {
        let dir = self.dir.path().join(id);
        std::fs::create_dir_all(&dir).unwrap();
        let acme = AcmeSettings {
            directory: self.pebble.plan.directory_url(),
            ca_file: &self.pebble.plan.api_ca,
            challenge,
            renew_before: "30d",
        };
        let path = write_config(&dir, ports, &acme, names, self.backend);
        set_acme(&path, &self.redis.url(), &[format!("replica_id = \"{id}\"")]);
        path
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for (i, r) in self.replicas.iter().enumerate() {
            out += &format!("--- replica-{}\n{}\n", i + 1, r.log_text());
        }
        out + &format!("--- pebble\n{}", self.pebble.log_text())
    }

    /// The serial each live replica serves for `name` (None: no valid certificate).
    fn serials(&self, name: &str) -> Vec<Option<String>> {
        let roots = self.pebble.roots();
        self.replicas.iter().map(|r| tls_connect(r.ports.https, name, &roots).ok().map(|t| peer_leaf(&t).0)).collect()
    }

    /// Waits until every replica serves one certificate for `name` other than `not`;
    /// returns (its serial, time from the first replica serving it to all of them).
    fn converge(&self, name: &str, not: Option<&str>, timeout: Duration) -> (String, Duration) {
        let deadline = Instant::now() + timeout;
        let mut first: Option<(Instant, String)> = None;
        loop {
            let serials = self.serials(name);
            let fresh: Vec<&String> = serials.iter().flatten().filter(|s| Some(s.as_str()) != not).collect();
            if first.is_none() {
                if let Some(s) = fresh.first() {
                    first = Some((Instant::now(), (*s).clone()));
                }
            }
            if fresh.len() == serials.len() && fresh.iter().all(|s| *s == fresh[0]) {
                let took = first.as_ref().map_or(Duration::ZERO, |(t, _)| t.elapsed());
                return (fresh[0].clone(), took);
            }
            assert!(Instant::now() < deadline, "{name}: replicas serve {serials:?} after {timeout:?}\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn names(prefix: &str, n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("{prefix}{i}.swarmgate.test")).collect()
}

fn certificates(gw: &Gateway) -> serde_json::Value {
    serde_json::from_str(&gw.admin("/certificates").1).unwrap()
}

/// `ordered_by` of `name` in a replica's `/certificates`.
fn ordered_by(gw: &Gateway, name: &str) -> Option<String> {
    let certs = certificates(gw);
    certs["acme"]["names"].as_array()?.iter().find(|n| n["name"] == name)?["ordered_by"].as_str().map(str::to_string)
}

#[test]
fn three_replicas_order_each_name_once_serve_it_everywhere_and_renewals_propagate() {
    // 24 s certificates: renewed two thirds in (~16 s) while the test watches.
    let hosts = names("c", 4);
    let c = Cluster::start(3, "http-01", Some(24), &hosts, false);
    let mut worst = Duration::ZERO;
    let mut first_serials = Vec::new();
    for name in &hosts {
        let (serial, took) = c.converge(name, None, Duration::from_secs(30));
        worst = worst.max(took);
        first_serials.push(serial);
    }
    eprintln!(
        "MEASURE: issuance: all 3 replicas serve the same certificate at most {} ms after the first",
        worst.as_millis()
    );
    assert!(worst <= PROPAGATION_BOUND, "propagation took {worst:?}\n{}", c.logs());
    let orders = c.pebble.orders();
    eprintln!(
        "MEASURE: {} names, 3 replicas: {orders} orders at Pebble, {} account(s)",
        hosts.len(),
        c.pebble.accounts()
    );
    assert_eq!(orders, hosts.len(), "exactly one order per name\n{}", c.logs());
    assert_eq!(c.pebble.accounts(), 1, "one account for the cluster");
    let ordered: f64 = c.replicas.iter().map(|r| r.metric("swarmgate_acme_orders_total{result=\"ok\"}")).sum();
    assert_eq!(ordered, hosts.len() as f64);

    // Every replica says who ordered each certificate, and they agree.
    for name in &hosts {
        let by: Vec<Option<String>> = c.replicas.iter().map(|r| ordered_by(r, name)).collect();
        assert!(by[0].as_deref().is_some_and(|b| b.starts_with("replica-")), "{name}: {by:?}");
        assert!(by.iter().all(|b| *b == by[0]), "{name}: {by:?}");
    }
    let certs = certificates(&c.replicas[0]);
    assert!(certs["acme"]["names"][0]["ordered_at"].as_i64().unwrap() > 1_700_000_000, "{certs}");
    assert_eq!(certs["acme"]["replica"], "replica-1");

    // Validations were answered by replicas that did not order (answers from the store).
    let from_store: usize = c
        .replicas
        .iter()
        .map(|r| {
            let log = r.log_text();
            log.lines()
                .filter(|l| l.contains("answered an ACME HTTP-01 challenge") && l.contains("source=\"store\""))
                .count()
        })
        .sum();
    let forwarded = c.balancer.forwarded();
    eprintln!("MEASURE: validation connections per replica {forwarded:?}; answered from the store: {from_store}");
    assert!(from_store > 0, "no validation reached a replica that did not order\n{}", c.logs());
    // Replicas start one after the other: the first orders may be validated before the
    // last one listens, so not every replica need have had a validation.
    assert!(forwarded.iter().filter(|&&n| n > 0).count() >= 2, "{forwarded:?}");
    let picked: f64 = c.replicas.iter().map(|r| r.metric("swarmgate_acme_picked_up_total")).sum();
    assert!(picked >= (hosts.len() * 2) as f64, "each name picked up by the two other replicas: {picked}");
    let delays: f64 = c.replicas.iter().map(|r| r.metric("swarmgate_acme_propagation_seconds_count")).sum();
    assert!(delays >= (hosts.len() * 2) as f64);
    report_propagation(&c, "issuance");

    // Renewal: one replica renews each name, every replica serves the new certificate.
    let mut worst = Duration::ZERO;
    for (name, old) in hosts.iter().zip(&first_serials) {
        let (serial, took) = c.converge(name, Some(old), Duration::from_secs(30));
        assert_ne!(&serial, old);
        worst = worst.max(took);
    }
    eprintln!(
        "MEASURE: renewal: all 3 replicas serve the renewed certificate at most {} ms after the first",
        worst.as_millis()
    );
    assert!(worst <= PROPAGATION_BOUND, "renewal propagation took {worst:?}\n{}", c.logs());
    let orders = c.pebble.orders();
    eprintln!("MEASURE: after one renewal round: {orders} orders for {} names", hosts.len());
    assert_eq!(orders, 2 * hosts.len(), "one renewal per name, not one per replica\n{}", c.logs());
    let renewals: f64 = c.replicas.iter().map(|r| r.metric("swarmgate_acme_renewals_total")).sum();
    assert_eq!(renewals, hosts.len() as f64);
    report_propagation(&c, "issuance + renewal");
}

/// Prints the replicas' own propagation histogram: certificate stored by one replica ->
/// served by another (mean, and the smallest bucket holding every observation).
fn report_propagation(c: &Cluster, what: &str) {
    let (mut sum, mut count) = (0.0, 0.0);
    let mut bound = 0.0f64;
    for r in &c.replicas {
        sum += r.metric("swarmgate_acme_propagation_seconds_sum");
        let n = r.metric("swarmgate_acme_propagation_seconds_count");
        count += n;
        let (_, text) = r.admin("/metrics");
        let le = text
            .lines()
            .filter_map(|l| l.strip_prefix("swarmgate_acme_propagation_seconds_bucket{le=\""))
            .filter_map(|l| l.split_once("\"} "))
            .find(|(_, v)| v.trim().parse::<f64>().ok() == Some(n))
            .and_then(|(le, _)| le.parse::<f64>().ok())
            .unwrap_or(f64::INFINITY);
        bound = bound.max(if n > 0.0 { le } else { 0.0 });
    }
    eprintln!(
        "MEASURE: propagation ({what}), from the store write to serving on another replica: {count} pick-ups, \
         mean {:.1} ms, all <= {} ms",
        sum / count.max(1.0) * 1000.0,
        bound * 1000.0
    );
    assert!(bound <= PROPAGATION_BOUND.as_secs_f64());
}

#[test]
fn killing_the_lock_holder_mid_order_lets_another_replica_finish() {
    const NAME: &str = "kill.swarmgate.test";
    // Validations wait in the balancer, so the order is in progress when its holder dies.
    let mut c = Cluster::start(3, "tls-alpn-01", None, &[NAME.to_string()], true);
    let holder = wait_for(Duration::from_secs(20), || {
        let held = c.redis.get(&format!("swarmgate:lock:order-{NAME}"))?;
        (c.pebble.orders() >= 1).then(|| String::from_utf8(held).unwrap())
    })
    .unwrap_or_else(|| panic!("no order in progress\n{}", c.logs()));
    let pid: u32 = holder.split('/').nth(1).unwrap().parse().unwrap();
    let victim = c.replicas.iter().position(|r| r.pid() == pid).unwrap_or_else(|| panic!("holder {holder}"));
    c.replicas[victim].kill();
    let killed = Instant::now();
    let dead = c.replicas.remove(victim);
    c.balancer.hold.store(false, std::sync::atomic::Ordering::SeqCst);

    let (_, _) = c.converge(NAME, None, Duration::from_secs(40));
    let took = killed.elapsed();
    eprintln!(
        "MEASURE: lock holder SIGKILLed mid-order: the 2 other replicas serve a certificate {} ms later (lease TTL 10 s)",
        took.as_millis()
    );
    assert!(took < Duration::from_secs(25), "{took:?}");
    let finisher = ordered_by(&c.replicas[0], NAME).unwrap();
    assert_ne!(finisher, format!("replica-{}", victim + 1), "the dead replica cannot have finished");
    let new_holder_pid =
        c.replicas.iter().find(|r| certificates(r)["acme"]["replica"] == finisher.as_str()).map(Gateway::pid);
    assert!(new_holder_pid.is_some_and(|p| p != dead.pid()));
    // The abandoned order and the one that finished.
    assert_eq!(c.pebble.orders(), 2, "{}", c.logs());
    // TLS-ALPN-01 validations reached replicas that had not published the answer.
    let remote = c
        .replicas
        .iter()
        .map(|r| {
            r.log_text().matches("answering a TLS-ALPN-01 validation with an answer another replica published").count()
        })
        .sum::<usize>();
    eprintln!("MEASURE: TLS-ALPN-01 validations answered from the store by a replica that did not order: {remote}");
    assert!(remote > 0, "{}", c.logs());
    let waits: f64 = c.replicas.iter().map(|r| r.metric("swarmgate_acme_lock_waits_total")).sum();
    assert!(waits >= 1.0, "the survivors waited for the lease");
    drop(dead);
}

/// One static certificate for `static.swarmgate.test` in `dir/certs` (written by
/// `write_config`); returns the roots that verify it.
fn static_cert(config_dir: &Path) -> rustls::RootCertStore {
    let (ca, crt, key) = ca_and_leaf("static test CA", &["static.swarmgate.test"]);
    std::fs::create_dir_all(config_dir.join("certs")).unwrap();
    std::fs::write(config_dir.join("certs/static.crt"), crt).unwrap();
    std::fs::write(config_dir.join("certs/static.key"), key).unwrap();
    roots_from_pem(ca.as_bytes())
}

#[test]
fn a_redis_outage_costs_no_request_and_a_replica_started_during_it_catches_up() {
    const APP: &str = "app.swarmgate.test";
    const LATE: &str = "late.swarmgate.test";
    let mut c = Cluster::start(3, "http-01", None, &[APP.to_string()], false);
    let (serial, _) = c.converge(APP, None, Duration::from_secs(30));

    c.redis.save_and_kill();
    let down = Instant::now();
    let roots = c.pebble.roots();
    let mut requests = 0;
    while down.elapsed() < Duration::from_secs(3) {
        for (i, r) in c.replicas.iter().enumerate() {
            let mut tls = tls_connect(r.ports.https, APP, &roots)
                .unwrap_or_else(|e| panic!("replica-{} refused a handshake during the outage: {e}", i + 1));
            let got = request(&mut tls, APP, "/", true).unwrap();
            assert_eq!(got, (200, "backend ok".to_string()), "replica-{}", i + 1);
            requests += 1;
        }
    }
    eprintln!("MEASURE: Redis down 3 s: {requests} requests (new TLS connections) through the 3 replicas, 0 failed");
    for r in &c.replicas {
        let noticed = wait_for(Duration::from_secs(5), || (r.metric("swarmgate_acme_store_up") == 0.0).then_some(()));
        assert!(noticed.is_some(), "store_up stays 1 during the outage");
    }

    // A fourth replica starts while Redis is down: static host served, ACME hosts not ready.
    // The static certificate is in place before the replica starts (write_config made certs/).
    let static_roots = static_cert(&c.dir.path().join("replica-4"));
    let late = c.replica("replica-4", "http-01", &["static.swarmgate.test".into(), APP.into(), LATE.into()]);
    let ports = late.ports;
    let mut tls = tls_connect(ports.https, "static.swarmgate.test", &static_roots).unwrap();
    assert_eq!(request(&mut tls, "static.swarmgate.test", "/", true).unwrap().0, 200);
    assert_eq!(late.admin("/readyz").0, 200);
    assert_eq!(late.metric("swarmgate_acme_store_up"), 0.0);
    assert_eq!(late.metric(&format!("swarmgate_acme_certificate_ready{{name=\"{APP}\"}}")), 0.0);
    assert_eq!(late.metric("swarmgate_acme_certificates_pending"), 2.0);
    assert!(tls_connect(ports.https, APP, &roots).is_err());
    let logged =
        wait_for(Duration::from_secs(5), || late.log_text().contains("ACME hosts wait for the store").then_some(()));
    assert!(logged.is_some(), "{}", late.log_text());

    c.redis.restart();
    let back = Instant::now();
    let caught_up = wait_for(Duration::from_secs(30), || {
        let app = tls_connect(ports.https, APP, &roots).ok()?;
        let late_ok = tls_connect(ports.https, LATE, &roots).ok()?;
        Some((peer_leaf(&app).0, peer_leaf(&late_ok).1))
    });
    let (app_serial, late_names) =
        caught_up.unwrap_or_else(|| panic!("no catch-up\n{}\n{}", late.log_text(), c.logs()));
    eprintln!(
        "MEASURE: replica started during the outage served its ACME hosts {} ms after Redis returned",
        back.elapsed().as_millis()
    );
    assert_eq!(app_serial, serial, "the stored certificate, not a new order");
    assert_eq!(late_names, vec![LATE.to_string()]);
    for r in c.replicas.iter().chain([&late]) {
        let up = wait_for(Duration::from_secs(10), || (r.metric("swarmgate_acme_store_up") == 1.0).then_some(()));
        assert!(up.is_some(), "store_up back to 1");
        assert!(r.metric("swarmgate_acme_store_errors_total") >= 1.0);
    }
    // APP once before the outage, LATE once after it.
    assert_eq!(c.pebble.orders(), 2, "{}\n{}", late.log_text(), c.logs());
    // Requests kept working through the whole thing.
    for r in &c.replicas {
        let mut tls = tls_connect(r.ports.https, APP, &roots).unwrap();
        assert_eq!(request(&mut tls, APP, "/", true).unwrap().0, 200);
    }
}

/// The ACME server forgets the account the replicas share through Redis (a Pebble
/// restart): replicas ordering new names at once converge on one new account (the
/// account lease in Redis), and each gets its name.
#[test]
fn replicas_sharing_redis_replace_a_forgotten_account_with_one_new_account() {
    const APP: &str = "app.swarmgate.test";
    let mut c = Cluster::start(2, "http-01", None, &[APP.to_string()], false);
    c.converge(APP, None, Duration::from_secs(30));
    assert_eq!(c.pebble.accounts(), 1, "{}", c.logs());

    c.pebble.restart_in_place();
    // A name of each replica's own, ordered by both at once with the forgotten account.
    for i in 0..c.replicas.len() {
        let (id, ports) = (format!("replica-{}", i + 1), c.replicas[i].ports);
        c.config(&id, ports, "http-01", &[APP.to_string(), format!("own{}.swarmgate.test", i + 1)]);
    }
    for r in &c.replicas {
        let status = std::process::Command::new("kill").arg("-HUP").arg(r.pid().to_string()).status().unwrap();
        assert!(status.success());
    }
    let roots = c.pebble.roots();
    for (i, r) in c.replicas.iter().enumerate() {
        let name = format!("own{}.swarmgate.test", i + 1);
        let served = wait_for(Duration::from_secs(30), || tls_connect(r.ports.https, &name, &roots).ok());
        let served = served.unwrap_or_else(|| panic!("replica-{} has no certificate for {name}\n{}", i + 1, c.logs()));
        assert_eq!(peer_leaf(&served).1, vec![name]);
    }
    assert_eq!(c.pebble.accounts(), 1, "one new account for the replicas:\n{}", c.logs());
    let told: usize = c.replicas.iter().map(|r| r.log_text().matches("no longer knows this account").count()).sum();
    assert!(told >= 1, "{}", c.logs());
    // APP once before the restart, each new name once after it; none failed (the
    // refused order is sent again within its attempt).
    let orders = |result: &str| -> f64 {
        c.replicas.iter().map(|r| r.metric(&format!("swarmgate_acme_orders_total{{result=\"{result}\"}}"))).sum()
    };
    assert_eq!((orders("ok"), orders("failed")), (3.0, 0.0), "{}", c.logs());
}
