//! ACME end to end: the real swarmgate binary against a real Pebble (Debian's `pebble`).
//!
//! Each test runs its own Pebble on free loopback ports whose `httpPort`/`tlsPort` are
//! the gateway's plain HTTP and HTTPS listeners, so Pebble validates against the gateway
//! itself. Served certificates are verified with rustls against Pebble's `/roots/0`.
//!
//! The key cases run twice: with the directory store and with a Redis store (a
//! `redis-server` of the test's own; `rediss://` with a password and sealed keys for the
//! restart case). tests/cluster.rs runs several replicas on one Redis.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod acme_support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use acme_support::cluster::{Redis, set_acme};
use acme_support::*;

const APP: &str = "app.swarmgate.test";
/// A `SWARMGATE_ACME_STORAGE_KEY` for the tests that seal.
const STORAGE_KEY: &str = "c3dhcm1nYXRlIHRlc3Qga2V5IDMyIGJ5dGVzIGxvbmc=";

struct Setup {
    dir: tempfile::TempDir,
    ports: Ports,
    backend: u16,
    redis: Option<Redis>,
}

impl Setup {
    fn new() -> Setup {
        Setup { dir: tempfile::tempdir().unwrap(), ports: Ports::free(), backend: backend(), redis: None }
    }

    /// ACME state in a Redis of its own instead of a directory.
    fn with_redis() -> Setup {
        let s = Setup::new();
        let redis = Redis::start(&s.path().join("redis"));
        Setup { redis: Some(redis), ..s }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn plan(&self, validity: Option<u64>) -> PebblePlan {
        PebblePlan::new(&self.path().join("pebble"), self.ports.http, self.ports.https, validity)
    }

    fn config(&self, plan: &PebblePlan, challenge: &str, renew_before: &str, hosts: &[String]) -> PathBuf {
        let acme = AcmeSettings { directory: plan.directory_url(), ca_file: &plan.api_ca, challenge, renew_before };
        let path = write_config(self.path(), self.ports, &acme, hosts, self.backend);
        if let Some(r) = &self.redis {
            set_acme(&path, &r.url(), &["replica_id = \"only-replica\"".to_string()]);
        }
        path
    }

    fn gateway(&self, config: &Path, log: &str) -> Gateway {
        Gateway::start(config, self.ports, self.path().join(log))
    }
}

fn hosts(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// Waits for a verified certificate for `host`, with the logs on failure.
fn expect_cert(gw: &Gateway, pebble: &Pebble, host: &str, timeout: Duration) -> Tls {
    match wait_for_cert(gw.ports.https, host, &pebble.roots(), timeout) {
        Some(t) => t,
        None => panic!(
            "no valid certificate for {host} within {timeout:?}\n--- gateway\n{}\n--- pebble\n{}",
            gw.log_text(),
            pebble.log_text()
        ),
    }
}

fn issue_and_serve(challenge: &str, redis: bool) {
    let s = if redis { Setup::with_redis() } else { Setup::new() };
    let plan = s.plan(None);
    let config = s.config(&plan, challenge, "30d", &hosts(&[APP]));
    let pebble = plan.start();
    let gw = s.gateway(&config, "gw.log");
    let mut tls = expect_cert(&gw, &pebble, APP, Duration::from_secs(30));
    let took = gw.started.elapsed();
    eprintln!("{challenge}: start-up to a valid certificate for 1 host: {} ms", took.as_millis());

    // rustls verified the chain against Pebble's root and the name; check the leaf too.
    let (_, names, _) = peer_leaf(&tls);
    assert_eq!(names, vec![APP.to_string()]);
    let (status, body) = request(&mut tls, APP, "/", true).unwrap();
    assert_eq!((status, body.as_str()), (200, "backend ok"));

    assert_eq!(gw.metric("swarmgate_acme_orders_total{result=\"ok\"}"), 1.0);
    assert_eq!(gw.metric("swarmgate_acme_orders_total{result=\"failed\"}"), 0.0);
    assert_eq!(gw.metric("swarmgate_acme_certificates_pending"), 0.0);
    let expiry = gw.metric(&format!("swarmgate_certificate_expiry_seconds{{name=\"{APP}\",source=\"acme\"}}"));
    assert!(expiry > 86_400.0, "expiry metric {expiry}");
    let (status, certs) = gw.admin("/certificates");
    assert_eq!(status, 200);
    let certs: serde_json::Value = serde_json::from_str(&certs).unwrap();
    let list = certs["certificates"].as_array().unwrap();
    let entry = list.iter().find(|c| c["names"][0] == APP).unwrap_or_else(|| panic!("{certs}"));
    assert_eq!(entry["source"], "acme");
    assert!(entry["issuer"].as_str().unwrap().contains("Pebble Intermediate"), "{entry}");
    assert!(entry["not_after"].as_i64().unwrap() > 0);
    assert_eq!(certs["acme"]["names"][0]["state"], "valid", "{certs}");
    assert_eq!(certs["acme"]["store_reachable"], true, "{certs}");

    match &s.redis {
        None => {
            // Stored for the next start: one file, private.
            let stored = s.path().join("acme/certs").join(format!("{APP}.pem"));
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                assert_eq!(std::fs::metadata(&stored).unwrap().permissions().mode() & 0o777, 0o600);
            }
        }
        Some(r) => {
            let bundle = r.get(&format!("swarmgate:v:certs/{APP}.pem")).expect("certificate in Redis");
            let bundle = String::from_utf8(bundle).unwrap();
            assert!(bundle.contains("BEGIN CERTIFICATE") && bundle.contains("PRIVATE KEY"), "{bundle}");
            let meta = r.get(&format!("swarmgate:v:orders/{APP}.json")).expect("order metadata in Redis");
            assert!(String::from_utf8_lossy(&meta).contains("only-replica"));
            let name = &certs["acme"]["names"][0];
            assert_eq!(name["ordered_by"], "only-replica", "{certs}");
            assert!(name["ordered_at"].as_i64().unwrap() > 1_700_000_000, "{certs}");
            assert_eq!(certs["acme"]["replica"], "only-replica");
            assert_eq!(gw.metric("swarmgate_acme_store_up"), 1.0);
            assert_eq!(gw.metric(&format!("swarmgate_acme_certificate_ready{{name=\"{APP}\"}}")), 1.0);
        }
    }
    let log = gw.log_text();
    let http01_answers = log.matches("answered an ACME HTTP-01 challenge").count();
    match challenge {
        "http-01" => assert!(http01_answers > 0, "{log}"),
        _ => assert_eq!(http01_answers, 0, "{log}"),
    }
    assert_eq!(pebble.orders(), 1);
    assert_eq!(pebble.accounts(), 1);
}

#[test]
fn http01_first_issuance_chains_to_pebble_and_is_served() {
    issue_and_serve("http-01", false);
}

#[test]
fn tls_alpn01_first_issuance_chains_to_pebble_and_is_served() {
    issue_and_serve("tls-alpn-01", false);
}

#[test]
fn redis_http01_first_issuance_chains_to_pebble_and_is_served() {
    issue_and_serve("http-01", true);
}

#[test]
fn redis_tls_alpn01_first_issuance_chains_to_pebble_and_is_served() {
    issue_and_serve("tls-alpn-01", true);
}

#[test]
fn restart_reuses_the_account_and_the_certificate() {
    let s = Setup::new();
    let plan = s.plan(None);
    let config = s.config(&plan, "http-01", "30d", &hosts(&[APP]));
    let pebble = plan.start();
    let gw = s.gateway(&config, "gw1.log");
    let tls = expect_cert(&gw, &pebble, APP, Duration::from_secs(30));
    let (serial, _, _) = peer_leaf(&tls);
    drop(tls);
    gw.stop();
    assert_eq!((pebble.orders(), pebble.accounts()), (1, 1));
    let account_file = std::fs::read_dir(s.path().join("acme/accounts")).unwrap().count();
    assert_eq!(account_file, 1);

    let gw = s.gateway(&config, "gw2.log");
    // Loaded before the listeners serve: the very first handshake gets it.
    let tls = tls_connect(s.ports.https, APP, &pebble.roots())
        .unwrap_or_else(|e| panic!("first handshake after restart: {e}\n{}", gw.log_text()));
    assert_eq!(peer_leaf(&tls).0, serial, "the stored certificate is served");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(pebble.orders(), 1, "no second order:\n{}", pebble.log_text());
    assert_eq!(pebble.accounts(), 1, "no second account");
    assert_eq!(gw.metric("swarmgate_acme_orders_total{result=\"ok\"}"), 0.0);
    assert!(gw.log_text().contains("ACME certificate loaded from storage"));
}

/// The restart case over `rediss://` with a password given in the environment
/// (`SWARMGATE_ACME_STORAGE`), and private keys sealed with `SWARMGATE_ACME_STORAGE_KEY`.
#[test]
fn rediss_with_a_password_from_the_environment_and_sealed_keys_restart_reuses_everything() {
    let s = Setup::new();
    let (ca, crt, key) = ca_and_leaf("redis test CA", &["localhost", "127.0.0.1"]);
    let tls_dir = s.path().join("redis-tls");
    std::fs::create_dir_all(&tls_dir).unwrap();
    for (f, pem) in [("ca.pem", &ca), ("redis.crt", &crt), ("redis.key", &key)] {
        std::fs::write(tls_dir.join(f), pem).unwrap();
    }
    let password = "cluster-secret-Zq8";
    let redis = Redis::start_with(
        &s.path().join("redis"),
        Some(password),
        Some((tls_dir.join("redis.crt"), tls_dir.join("redis.key"))),
    );
    let url = format!("rediss://:{password}@localhost:{}/2", redis.port);
    let storage_key = STORAGE_KEY;
    let ca_file = tls_dir.join("ca.pem").display().to_string();
    let env = [
        ("SWARMGATE_ACME_STORAGE", url.as_str()),
        ("SWARMGATE_ACME_STORAGE_KEY", storage_key),
        ("SSL_CERT_FILE", ca_file.as_str()),
    ];
    let plan = s.plan(None);
    let config = s.config(&plan, "http-01", "30d", &hosts(&[APP]));
    let pebble = plan.start();
    let gw = Gateway::start_env(&config, s.ports, s.path().join("gw1.log"), &env);
    let tls = expect_cert(&gw, &pebble, APP, Duration::from_secs(30));
    let (serial, _, _) = peer_leaf(&tls);
    drop(tls);
    let (_, certs) = gw.admin("/certificates");
    let certs: serde_json::Value = serde_json::from_str(&certs).unwrap();
    assert_eq!(certs["acme"]["storage"], format!("rediss://***@localhost:{}/2 (encrypted)", redis.port), "{certs}");
    assert!(!gw.log_text().contains(password), "the password must never be logged");
    assert!(!gw.log_text().contains(storage_key), "the storage key must never be logged");
    gw.stop();
    assert!(!s.path().join("acme").exists(), "nothing stored in the directory the file names");

    // What Redis holds: sealed, no private key in the clear. (The Redis client's TLS takes
    // rustls's process-wide provider; the test process picks the gateway's.)
    swarmgate::install_crypto_provider();
    let client = redis::Client::build_with_tls(
        url.as_str(),
        redis::TlsCertificates { client_tls: None, root_cert: Some(ca.clone().into_bytes()) },
    )
    .unwrap();
    let mut con = client.get_connection_with_timeout(Duration::from_secs(5)).unwrap();
    let keys: Vec<String> = redis::cmd("KEYS").arg("swarmgate:v:*").query(&mut con).unwrap();
    assert!(keys.iter().any(|k| k.starts_with("swarmgate:v:accounts/")), "{keys:?}");
    assert!(keys.contains(&format!("swarmgate:v:certs/{APP}.pem")), "{keys:?}");
    for k in &keys {
        let v: Vec<u8> = redis::cmd("GET").arg(k).query(&mut con).unwrap();
        assert!(v.starts_with(b"swarmgate-sealed-v1\n"), "{k} is not sealed");
        assert!(!v.windows(11).any(|w| w == b"PRIVATE KEY"), "{k} holds a key in the clear");
    }

    let gw = Gateway::start_env(&config, s.ports, s.path().join("gw2.log"), &env);
    let tls = tls_connect(s.ports.https, APP, &pebble.roots())
        .unwrap_or_else(|e| panic!("first handshake after restart: {e}\n{}", gw.log_text()));
    assert_eq!(peer_leaf(&tls).0, serial, "the stored certificate is served");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!((pebble.orders(), pebble.accounts()), (1, 1), "no second order or account");
    assert!(gw.log_text().contains("ACME certificate loaded from storage"));
}

#[test]
fn renewal_swaps_the_certificate_while_a_connection_stays_open() {
    renewal(false);
}

#[test]
fn redis_renewal_swaps_the_certificate_while_a_connection_stays_open() {
    renewal(true);
}

fn renewal(redis: bool) {
    let s = if redis { Setup::with_redis() } else { Setup::new() };
    // 15 s certificates with renew_before = 30d: renewed two thirds in (~10 s).
    let plan = s.plan(Some(15));
    let config = s.config(&plan, "tls-alpn-01", "30d", &hosts(&[APP]));
    let pebble = plan.start();
    let gw = s.gateway(&config, "gw.log");
    let mut held = expect_cert(&gw, &pebble, APP, Duration::from_secs(30));
    let (first, _, first_not_after) = peer_leaf(&held);
    assert_eq!(request(&mut held, APP, "/", false).unwrap().0, 200);

    let deadline = Instant::now() + Duration::from_secs(40);
    let renewed = loop {
        assert!(Instant::now() < deadline, "no renewal:\n{}\n{}", gw.log_text(), pebble.log_text());
        // The open connection keeps working through the swap.
        assert_eq!(request(&mut held, APP, "/", false).unwrap(), (200, "backend ok".to_string()));
        let fresh = tls_connect(s.ports.https, APP, &pebble.roots()).unwrap();
        let (serial, names, not_after) = peer_leaf(&fresh);
        if serial != first {
            assert_eq!(names, vec![APP.to_string()]);
            assert!(not_after > first_not_after);
            break serial;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_ne!(renewed, first);
    assert_eq!(request(&mut held, APP, "/", false).unwrap().0, 200, "old connection survives");
    assert!(gw.metric("swarmgate_acme_renewals_total") >= 1.0);
    assert!(pebble.orders() >= 2);
    assert_eq!(pebble.accounts(), 1);
}

/// A certificate that expires while the ACME server is unreachable shows `expired` and is
/// not ready (the back-off cap once expired is checked by the unit test of retry_delay).
#[test]
fn a_certificate_expiring_while_the_acme_server_is_down_shows_expired_and_retries_soon() {
    let s = Setup::new();
    let plan = s.plan(Some(6));
    let config = s.config(&plan, "tls-alpn-01", "30d", &hosts(&[APP]));
    let pebble = plan.start();
    let gw = s.gateway(&config, "gw.log");
    expect_cert(&gw, &pebble, APP, Duration::from_secs(30));
    drop(pebble);
    let name = || {
        let (_, certs) = gw.admin("/certificates");
        let certs: serde_json::Value = serde_json::from_str(&certs).unwrap();
        certs["acme"]["names"][0].clone()
    };
    let expired = wait_for(Duration::from_secs(20), || (name()["state"] == "expired").then_some(()));
    assert!(expired.is_some(), "{}\n{}", name(), gw.log_text());
    assert_eq!(gw.metric(&format!("swarmgate_acme_certificate_ready{{name=\"{APP}\"}}")), 0.0);
    let n = name();
    assert!(n["failures"].as_u64().unwrap() >= 1, "{n}");
    assert!(n["next_attempt_in"].as_i64().unwrap() <= 300, "retried within minutes: {n}");
}

#[test]
fn pebble_down_at_start_static_hosts_serve_and_acme_issues_once_it_appears() {
    let s = Setup::new();
    let plan = s.plan(None);
    let config = s.config(&plan, "http-01", "30d", &hosts(&["static.swarmgate.test", APP]));
    let (ca, crt, key) = ca_and_leaf("static test CA", &["static.swarmgate.test"]);
    std::fs::write(s.path().join("certs/static.crt"), crt).unwrap();
    std::fs::write(s.path().join("certs/static.key"), key).unwrap();
    let static_roots = roots_from_pem(ca.as_bytes());

    let gw = s.gateway(&config, "gw.log");
    let mut tls = tls_connect(s.ports.https, "static.swarmgate.test", &static_roots).unwrap();
    assert_eq!(request(&mut tls, "static.swarmgate.test", "/", true).unwrap().0, 200);
    assert_eq!(gw.admin("/readyz").0, 200, "ready while ACME certificates are pending");
    let failed = wait_for(Duration::from_secs(10), || {
        (gw.metric("swarmgate_acme_orders_total{result=\"failed\"}") >= 1.0).then_some(())
    });
    assert!(failed.is_some(), "{}", gw.log_text());
    assert_eq!(gw.metric("swarmgate_acme_certificates_pending"), 1.0);
    // Until the certificate exists, its handshakes are refused (never another host's cert).
    let refused = tls_connect(s.ports.https, APP, &static_roots);
    assert!(refused.is_err());
    assert!(gw.log_text().contains("ACME order failed"), "{}", gw.log_text());

    let pebble = plan.start();
    let appeared = Instant::now();
    let tls = expect_cert(&gw, &pebble, APP, Duration::from_secs(30));
    eprintln!("issued {} ms after pebble appeared", appeared.elapsed().as_millis());
    assert_eq!(peer_leaf(&tls).1, vec![APP.to_string()]);
    // The static host kept its own certificate.
    assert!(tls_connect(s.ports.https, "static.swarmgate.test", &static_roots).is_ok());
    assert_eq!(gw.metric("swarmgate_acme_certificates_pending"), 0.0);
}

#[test]
fn corrupt_and_foreign_storage_files_are_set_aside() {
    let s = Setup::new();
    let plan = s.plan(None);
    let config = s.config(&plan, "http-01", "30d", &hosts(&[APP]));
    let certs = s.path().join("acme/certs");
    let accounts = s.path().join("acme/accounts");
    std::fs::create_dir_all(&certs).unwrap();
    std::fs::create_dir_all(&accounts).unwrap();
    std::fs::write(certs.join(format!("{APP}.pem")), b"-----BEGIN GARBAGE-----\nnope\n").unwrap();
    let (other_crt, other_key) = self_signed(&["other.example"]);
    std::fs::write(certs.join("wrong.swarmgate.test.pem"), format!("{other_crt}{other_key}")).unwrap();
    std::fs::write(certs.join("notes.txt"), b"left here by someone").unwrap();
    let account_name = format!("127.0.0.1_{}_dir.json", plan.api_port);
    std::fs::write(accounts.join(&account_name), b"{\"not\": \"credentials\"}").unwrap();
    let pebble = plan.start();

    let gw = s.gateway(&config, "gw.log");
    let tls = expect_cert(&gw, &pebble, APP, Duration::from_secs(30));
    assert_eq!(peer_leaf(&tls).1, vec![APP.to_string()]);
    let names = |dir: &Path| -> Vec<String> {
        let mut v: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        v.sort();
        v
    };
    let in_certs = names(&certs);
    for prefix in
        [format!("{APP}.pem.corrupt-"), "wrong.swarmgate.test.pem.corrupt-".into(), "notes.txt.corrupt-".into()]
    {
        assert!(in_certs.iter().any(|n| n.starts_with(&prefix)), "{prefix} missing in {in_certs:?}");
    }
    assert!(in_certs.contains(&format!("{APP}.pem")), "{in_certs:?}");
    let in_accounts = names(&accounts);
    assert!(in_accounts.contains(&account_name), "new account stored: {in_accounts:?}");
    assert!(in_accounts.iter().any(|n| n.starts_with(&format!("{account_name}.corrupt-"))), "{in_accounts:?}");
    let log = gw.log_text();
    assert!(log.matches("moved aside").count() >= 4, "{log}");
    assert_eq!(gw.admin("/readyz").0, 200);
}

/// A store with the account and a certificate for APP, sealed with [`STORAGE_KEY`] by a
/// gateway since stopped: its set-up, config, Pebble and the certificate's serial.
fn sealed_store() -> (Setup, PathBuf, Pebble, String) {
    let s = Setup::new();
    let plan = s.plan(None);
    let config = s.config(&plan, "http-01", "30d", &hosts(&[APP]));
    let pebble = plan.start();
    let key = ("SWARMGATE_ACME_STORAGE_KEY", STORAGE_KEY);
    let gw = Gateway::start_env(&config, s.ports, s.path().join("gw1.log"), &[key]);
    let (serial, _, _) = peer_leaf(&expect_cert(&gw, &pebble, APP, Duration::from_secs(30)));
    gw.stop();
    (s, config, pebble, serial)
}

/// A sealed certificate that no longer decrypts (altered on disk) while the account
/// decrypts with the same key is corrupt: it is set aside and the name ordered again. With
/// another key nothing decrypts, so nothing is set aside and nothing ordered.
#[test]
fn a_sealed_certificate_that_no_longer_decrypts_is_set_aside_and_ordered_again() {
    let (s, config, pebble, serial) = sealed_store();
    let key = ("SWARMGATE_ACME_STORAGE_KEY", STORAGE_KEY);
    let certs = s.path().join("acme/certs");
    let file = certs.join(format!("{APP}.pem"));
    let mut sealed = std::fs::read(&file).unwrap();
    assert!(sealed.starts_with(b"swarmgate-sealed-v1\n"));
    let last = sealed.len() - 1;
    sealed[last] ^= 1; // the tag no longer matches
    std::fs::write(&file, &sealed).unwrap();
    let set_aside = || set_aside_files(&certs);

    // Another key: the account does not decrypt either.
    let wrong = ("SWARMGATE_ACME_STORAGE_KEY", "YW5vdGhlciBrZXksIDMyIGJ5dGVzIGxvbmcsIHRvbyE=");
    let gw = Gateway::start_env(&config, s.ports, s.path().join("gw2.log"), &[wrong]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !gw.log_text().contains("accounts/") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(gw.log_text().contains("cannot decrypt"), "{}", gw.log_text());
    gw.stop();
    assert_eq!(set_aside(), 0, "a wrong key moves nothing aside");
    assert_eq!(pebble.orders(), 1);

    // The right key: the account decrypts, so the certificate is corrupt.
    let gw = Gateway::start_env(&config, s.ports, s.path().join("gw3.log"), &[key]);
    let tls = expect_cert(&gw, &pebble, APP, Duration::from_secs(30));
    assert_ne!(peer_leaf(&tls).0, serial, "a new certificate");
    assert_eq!(pebble.orders(), 2);
    assert_eq!(set_aside(), 1, "the corrupt file is kept, aside");
    assert!(gw.log_text().contains("does not decrypt while the account does"), "{}", gw.log_text());
}

/// An account stored before `SWARMGATE_ACME_STORAGE_KEY` was set is in the clear: it opens
/// with any key, so it cannot tell a corrupt certificate from a wrong key, and nothing is
/// moved aside or ordered.
#[test]
fn an_account_stored_in_the_clear_proves_nothing_about_the_key() {
    let s = Setup::new();
    let plan = s.plan(None);
    let config = s.config(&plan, "http-01", "30d", &hosts(&[APP]));
    let pebble = plan.start();
    let gw = s.gateway(&config, "gw1.log");
    drop(expect_cert(&gw, &pebble, APP, Duration::from_secs(30)));
    gw.stop();
    // A sealed value that opens with no key, in place of the certificate.
    let certs = s.path().join("acme/certs");
    let mut sealed = b"swarmgate-sealed-v1\n".to_vec();
    sealed.extend_from_slice(&[7u8; 60]);
    std::fs::write(certs.join(format!("{APP}.pem")), &sealed).unwrap();

    let key = ("SWARMGATE_ACME_STORAGE_KEY", STORAGE_KEY);
    let gw = Gateway::start_env(&config, s.ports, s.path().join("gw2.log"), &[key]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while gw.log_text().matches("cannot decrypt").count() < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let warned = wait_for(Duration::from_secs(10), || {
        gw.log_text().contains("values stored in the clear stay so").then_some(())
    });
    let log = gw.log_text();
    assert!(log.matches("cannot decrypt").count() >= 2, "read at start and by the order attempt:\n{log}");
    assert!(warned.is_some(), "{log}");
    gw.stop();
    assert_eq!(set_aside_files(&certs), 0, "nothing moved aside");
    assert_eq!(pebble.orders(), 1, "nothing ordered");
    // Nor is the account sealed with a key that a sealed value does not open with.
    assert_eq!(sealed_files(&s.path().join("acme/accounts")), (0, 1));
}

/// Files moved aside under `dir` (`NAME.corrupt-TIME`).
fn set_aside_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().contains(".corrupt-"))
        .count()
}

/// Files under `dir` (not set aside), as (sealed, in the clear).
fn sealed_files(dir: &Path) -> (usize, usize) {
    let files: Vec<Vec<u8>> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| !p.to_string_lossy().contains(".corrupt-"))
        .map(|p| std::fs::read(p).unwrap())
        .collect();
    let sealed = files.iter().filter(|f| f.starts_with(b"swarmgate-sealed-v1\n")).count();
    (sealed, files.len() - sealed)
}

/// A replica without `SWARMGATE_ACME_STORAGE_KEY` (as during a rollout that brings the
/// key in) cannot read sealed values: it reports them, and neither moves them aside as
/// corrupt nor orders again (a new account, new certificates).
#[test]
fn sealed_values_read_without_the_key_are_not_set_aside() {
    let (s, config, pebble, _) = sealed_store();
    let gw = s.gateway(&config, "gw2.log"); // no key
    let said = wait_for(Duration::from_secs(20), || {
        let log = gw.log_text();
        (log.matches("is not set here").count() >= 2).then_some(())
    });
    let log = gw.log_text();
    assert!(said.is_some(), "the certificate at start and the account when ordering:\n{log}");
    gw.stop();
    for dir in ["accounts", "certs"] {
        assert_eq!(sealed_files(&s.path().join("acme").join(dir)), (1, 0), "{dir}: kept as it was");
        assert_eq!(set_aside_files(&s.path().join("acme").join(dir)), 0, "{dir}: nothing moved aside\n{log}");
    }
    assert_eq!(pebble.orders(), 1, "nothing ordered again");
}

/// What was stored before `SWARMGATE_ACME_STORAGE_KEY` was set (the account, which is
/// never written again, a certificate and who ordered it) is sealed once the gateway
/// starts with the key, without a new order, and opens at the next start.
#[test]
fn values_stored_before_the_key_was_set_are_sealed_when_it_is() {
    let s = Setup::new();
    let plan = s.plan(None);
    let config = s.config(&plan, "http-01", "30d", &hosts(&[APP]));
    let pebble = plan.start();
    let gw = s.gateway(&config, "gw1.log");
    let (serial, _, _) = peer_leaf(&expect_cert(&gw, &pebble, APP, Duration::from_secs(30)));
    gw.stop();
    let dirs = ["accounts", "certs", "orders"].map(|d| s.path().join("acme").join(d));
    assert_eq!(dirs.each_ref().map(|d| sealed_files(d)), [(0, 1); 3], "all in the clear at first");

    let key = ("SWARMGATE_ACME_STORAGE_KEY", STORAGE_KEY);
    let gw = Gateway::start_env(&config, s.ports, s.path().join("gw2.log"), &[key]);
    let all_sealed =
        wait_for(Duration::from_secs(20), || (dirs.each_ref().map(|d| sealed_files(d)) == [(1, 0); 3]).then_some(()));
    assert!(all_sealed.is_some(), "{:?}\n{}", dirs.each_ref().map(|d| sealed_files(d)), gw.log_text());
    assert_eq!(gw.log_text().matches("is now encrypted with SWARMGATE_ACME_STORAGE_KEY").count(), 3);
    assert_eq!(peer_leaf(&expect_cert(&gw, &pebble, APP, Duration::from_secs(5))).0, serial);
    gw.stop();

    // They open: the next start serves the same certificate with no new order.
    let gw = Gateway::start_env(&config, s.ports, s.path().join("gw3.log"), &[key]);
    assert_eq!(peer_leaf(&expect_cert(&gw, &pebble, APP, Duration::from_secs(10))).0, serial);
    let log = gw.log_text();
    assert!(!log.contains("cannot decrypt") && !log.contains("in the clear"), "{log}");
    assert_eq!(pebble.orders(), 1);
}

#[test]
fn reload_orders_new_hosts_and_a_refused_host_never_delays_the_others() {
    let s = Setup::new();
    let mut plan = s.plan(None);
    plan.blocklist = vec!["blocked.swarmgate.test".into()];
    let config = s.config(&plan, "http-01", "30d", &hosts(&["blocked.swarmgate.test", APP]));
    let pebble = plan.start();
    let gw = s.gateway(&config, "gw.log");
    expect_cert(&gw, &pebble, APP, Duration::from_secs(30));
    let logged = wait_for(Duration::from_secs(10), || {
        gw.log_text().contains("urn:ietf:params:acme:error:rejectedIdentifier").then_some(())
    });
    assert!(logged.is_some(), "the problem document is logged:\n{}", gw.log_text());
    let (_, certs) = gw.admin("/certificates");
    assert!(certs.contains("rejectedIdentifier"), "last error shown: {certs}");

    // SIGHUP with one more host: it gets its certificate without a restart.
    s.config(&pebble.plan, "http-01", "30d", &hosts(&["blocked.swarmgate.test", APP, "new.swarmgate.test"]));
    let status = std::process::Command::new("kill").arg("-HUP").arg(gw.pid().to_string()).status().unwrap();
    assert!(status.success());
    let tls = expect_cert(&gw, &pebble, "new.swarmgate.test", Duration::from_secs(30));
    assert_eq!(peer_leaf(&tls).1, vec!["new.swarmgate.test".to_string()]);
    assert!(tls_connect(s.ports.https, APP, &pebble.roots()).is_ok());
}

/// The ACME server forgets the account (here Pebble restarts; in production a staging
/// reset, a deleted or deactivated account): the next order registers a new account,
/// replaces the stored one and gets its certificate at once, without a gateway restart.
#[test]
fn an_account_the_server_no_longer_knows_is_replaced_and_the_order_goes_through() {
    const NEW: &str = "new.swarmgate.test";
    let s = Setup::new();
    let plan = s.plan(None);
    let config = s.config(&plan, "http-01", "30d", &hosts(&[APP]));
    let pebble = plan.start();
    let gw = s.gateway(&config, "gw.log");
    expect_cert(&gw, &pebble, APP, Duration::from_secs(30));
    let account_file = std::fs::read_dir(s.path().join("acme/accounts")).unwrap().next().unwrap().unwrap().path();
    let old_account = std::fs::read(&account_file).unwrap();

    let pebble = pebble.restart();
    // A host added by reload: its order is the first request signed by the old account.
    s.config(&pebble.plan, "http-01", "30d", &hosts(&[APP, NEW]));
    let status = std::process::Command::new("kill").arg("-HUP").arg(gw.pid().to_string()).status().unwrap();
    assert!(status.success());
    let tls = expect_cert(&gw, &pebble, NEW, Duration::from_secs(30));
    assert_eq!(peer_leaf(&tls).1, vec![NEW.to_string()]);

    assert_eq!(pebble.accounts(), 1, "one new account:\n{}", pebble.log_text());
    assert_ne!(std::fs::read(&account_file).unwrap(), old_account, "the stored account is replaced");
    assert_eq!(std::fs::read_dir(s.path().join("acme/accounts")).unwrap().count(), 1);
    let log = gw.log_text();
    assert_eq!(log.matches("no longer knows this account").count(), 1, "one clear line:\n{log}");
    assert!(log.contains("accountDoesNotExist"), "{log}");
    // Ordered again within the same attempt: no failure, no back-off.
    assert_eq!(gw.metric("swarmgate_acme_orders_total{result=\"failed\"}"), 0.0, "{log}");
}

#[test]
fn failed_validation_logs_the_problem_document_and_retries_with_back_off() {
    let s = Setup::new();
    // Pebble validates HTTP-01 on a port where nothing listens.
    let plan = PebblePlan::new(&s.path().join("pebble"), free_port(), s.ports.https, None);
    let config = s.config(&plan, "http-01", "30d", &hosts(&[APP]));
    let pebble = plan.start();
    let gw = s.gateway(&config, "gw.log");
    let retried = wait_for(Duration::from_secs(15), || {
        (gw.metric("swarmgate_acme_orders_total{result=\"failed\"}") >= 2.0).then_some(())
    });
    assert!(retried.is_some(), "{}", gw.log_text());
    let log = gw.log_text();
    assert!(log.contains("urn:ietf:params:acme:error:connection"), "challenge problem logged:\n{log}");
    eprintln!("{}", log.lines().find(|l| l.contains("ACME order failed")).unwrap());
    let (_, certs) = gw.admin("/certificates");
    let certs: serde_json::Value = serde_json::from_str(&certs).unwrap();
    let name = &certs["acme"]["names"][0];
    assert_eq!(name["state"], "pending", "{certs}");
    assert!(name["failures"].as_u64().unwrap() >= 2, "{certs}");
    assert!(name["last_error"].as_str().unwrap().contains("error:connection"), "{certs}");
    assert!(pebble.orders() >= 2);
    assert_eq!(pebble.accounts(), 1, "the account is made once, not per attempt");
    assert!(tls_connect(s.ports.https, APP, &pebble.roots()).is_err());
}

/// A reload is an operator's word that something may have been mended: a name backing
/// off after failed orders is ordered again at once, not at the end of its back-off.
#[test]
fn a_reload_orders_again_at_once_a_name_backing_off_after_failures() {
    let s = Setup::new();
    let plan = s.plan(None);
    let config = s.config(&plan, "http-01", "30d", &hosts(&[APP]));
    let pebble = plan.start();
    // Pebble validates at an address where nothing listens: every order fails.
    pebble.set_dns_a(APP, Some("127.0.0.2"));
    let gw = s.gateway(&config, "gw.log");
    let next_attempt_in = || {
        let (_, certs) = gw.admin("/certificates");
        let certs: serde_json::Value = serde_json::from_str(&certs).unwrap();
        let name = &certs["acme"]["names"][0];
        (name["failures"].as_u64().unwrap_or(0), name["next_attempt_in"].as_i64().unwrap_or(0))
    };
    // Four failures: the next attempt is about 8 s away.
    let waiting = wait_for(Duration::from_secs(40), || {
        let (failures, next) = next_attempt_in();
        (failures >= 4 && next >= 6).then_some(next)
    });
    let Some(waiting) = waiting else { panic!("no back-off of 6 s or more:\n{}", gw.log_text()) };
    let failed = pebble.orders();

    pebble.set_dns_a(APP, None);
    let status = std::process::Command::new("kill").arg("-HUP").arg(gw.pid().to_string()).status().unwrap();
    assert!(status.success());
    // Well before the back-off would have ended.
    let timeout = Duration::from_secs(waiting as u64 - 1);
    let tls = wait_for_cert(s.ports.https, APP, &pebble.roots(), timeout);
    assert!(tls.is_some(), "no certificate {timeout:?} after the reload:\n{}", gw.log_text());
    assert_eq!(pebble.orders(), failed + 1, "one order after the reload:\n{}", gw.log_text());
    assert!(gw.log_text().contains("ordering again at once"), "{}", gw.log_text());
}

#[test]
fn two_gateways_sharing_storage_order_each_name_once() {
    // Pebble validates nothing here (both gateways answer for every name only in the
    // clustered setup): this is about the storage lock, the account lease and pick-up.
    let a = Setup::new();
    let mut plan = a.plan(None);
    plan.always_valid = true;
    let names: Vec<String> = (1..=5).map(|i| format!("s{i}.swarmgate.test")).collect();
    let config_a = a.config(&plan, "http-01", "30d", &names);
    // Gateway B: its own ports and config, the same storage directory.
    let b_ports = Ports::free();
    let b_dir = tempfile::tempdir().unwrap();
    let acme = AcmeSettings {
        directory: plan.directory_url(),
        ca_file: &plan.api_ca,
        challenge: "http-01",
        renew_before: "30d",
    };
    let config_b = write_config(b_dir.path(), b_ports, &acme, &names, a.backend);
    let shared = a.path().join("acme").display().to_string();
    let text = std::fs::read_to_string(&config_b).unwrap();
    std::fs::write(&config_b, text.replace(&b_dir.path().join("acme").display().to_string(), &shared)).unwrap();
    let pebble = plan.start();

    let gw_a = a.gateway(&config_a, "gw-a.log");
    let gw_b = Gateway::start(&config_b, b_ports, b_dir.path().join("gw-b.log"));
    for name in &names {
        expect_cert(&gw_a, &pebble, name, Duration::from_secs(30));
        expect_cert(&gw_b, &pebble, name, Duration::from_secs(30));
    }
    assert_eq!(pebble.orders(), names.len(), "each name ordered once:\n{}\n{}", gw_a.log_text(), gw_b.log_text());
    assert_eq!(pebble.accounts(), 1, "one account for the shared storage");
    let ordered = gw_a.metric("swarmgate_acme_orders_total{result=\"ok\"}")
        + gw_b.metric("swarmgate_acme_orders_total{result=\"ok\"}");
    assert_eq!(ordered, names.len() as f64);
    // Every name the one ordered, the other took from storage (at start or when its
    // lease attempt found the fresh certificate).
    let reused = |g: &Gateway| {
        let log = g.log_text();
        log.matches("picked up").count() + log.matches("loaded from storage").count()
    };
    assert_eq!(reused(&gw_a) + reused(&gw_b), names.len());
}

/// Two gateways sharing storage both find the account gone (a Pebble restart): they
/// converge on one new account (the `account` lease), and both get their new names.
#[test]
fn gateways_sharing_storage_replace_a_forgotten_account_with_one_new_account() {
    let a = Setup::new();
    let mut plan = a.plan(None);
    plan.always_valid = true;
    fn acme(plan: &PebblePlan) -> AcmeSettings<'_> {
        AcmeSettings {
            directory: plan.directory_url(),
            ca_file: &plan.api_ca,
            challenge: "http-01",
            renew_before: "30d",
        }
    }
    let (b_ports, b_dir) = (Ports::free(), tempfile::tempdir().unwrap());
    let shared = a.path().join("acme").display().to_string();
    let config_b = |plan: &PebblePlan, names: &[String]| {
        let path = write_config(b_dir.path(), b_ports, &acme(plan), names, a.backend);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replace(&b_dir.path().join("acme").display().to_string(), &shared)).unwrap();
        path
    };
    let first = hosts(&[APP]);
    let config_a = a.config(&plan, "http-01", "30d", &first);
    let cb = config_b(&plan, &first);
    let pebble = plan.start();
    let gw_a = a.gateway(&config_a, "gw-a.log");
    let gw_b = Gateway::start(&cb, b_ports, b_dir.path().join("gw-b.log"));
    expect_cert(&gw_a, &pebble, APP, Duration::from_secs(30));
    expect_cert(&gw_b, &pebble, APP, Duration::from_secs(30));

    let pebble = pebble.restart();
    // Names of each gateway's own: both order at once, both with the forgotten account.
    let (more_a, more_b) = (hosts(&[APP, "a.swarmgate.test"]), hosts(&[APP, "b.swarmgate.test"]));
    a.config(&pebble.plan, "http-01", "30d", &more_a);
    config_b(&pebble.plan, &more_b);
    for gw in [&gw_a, &gw_b] {
        let status = std::process::Command::new("kill").arg("-HUP").arg(gw.pid().to_string()).status().unwrap();
        assert!(status.success());
    }
    expect_cert(&gw_a, &pebble, "a.swarmgate.test", Duration::from_secs(30));
    expect_cert(&gw_b, &pebble, "b.swarmgate.test", Duration::from_secs(30));
    let logs = format!("{}\n{}", gw_a.log_text(), gw_b.log_text());
    assert_eq!(pebble.accounts(), 1, "one new account for the shared storage:\n{logs}");
    assert_eq!(std::fs::read_dir(a.path().join("acme/accounts")).unwrap().count(), 1);
}

/// Start-up to valid certificates for 1 and for 20 hosts (printed; loose bounds only,
/// since tests share two cores). Run alone for numbers:
/// `cargo test --test acme time_to -- --nocapture --test-threads=1`.
#[test]
fn time_to_valid_certificates_for_1_and_20_hosts() {
    for n in [1usize, 20] {
        let s = Setup::new();
        let plan = s.plan(None);
        let names: Vec<String> = (1..=n).map(|i| format!("h{i}.swarmgate.test")).collect();
        let config = s.config(&plan, "http-01", "30d", &names);
        let pebble = plan.start();
        let gw = s.gateway(&config, "gw.log");
        let mut last = Duration::ZERO;
        for name in &names {
            expect_cert(&gw, &pebble, name, Duration::from_secs(60));
            last = gw.started.elapsed();
        }
        eprintln!("MEASURE: start-up to valid certificates for {n} host(s): {} ms", last.as_millis());
        assert_eq!(pebble.orders(), n);
        assert_eq!(gw.metric("swarmgate_acme_orders_total{result=\"ok\"}"), n as f64);
        assert!(last < Duration::from_secs(60));
    }
}

#[test]
fn a_new_acme_directory_replaces_the_certificates_another_one_issued() {
    // Staging first, then production: the same store holds staging's certificate, which
    // no browser trusts; it is replaced at once, not at its renewal time.
    let s = Setup::new();
    let staging_plan = s.plan(None);
    let config = s.config(&staging_plan, "http-01", "30d", &hosts(&[APP]));
    let staging = staging_plan.start();
    let gw = s.gateway(&config, "gw.log");
    expect_cert(&gw, &staging, APP, Duration::from_secs(30));
    let production = PebblePlan::new(&s.path().join("pebble-production"), s.ports.http, s.ports.https, None);
    s.config(&production, "http-01", "30d", &hosts(&[APP]));
    let production = production.start();
    assert!(std::process::Command::new("kill").arg("-HUP").arg(gw.pid().to_string()).status().unwrap().success());
    let tls = expect_cert(&gw, &production, APP, Duration::from_secs(30));
    assert_eq!(peer_leaf(&tls).1, vec![APP.to_string()]);
    assert!(production.orders() >= 1);
}
