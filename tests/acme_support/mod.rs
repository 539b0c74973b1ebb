//! Fixtures for the ACME tests: a real Pebble (Debian's `pebble` package) on free
//! loopback ports, the real swarmgate binary, a backend, and TLS/HTTP clients.
//!
//! Pebble is started as the notes in shared/notes/acme-testing.md describe: an API
//! certificate made here with rcgen, `pebble-challtestsrv` as DNS only (every name is
//! 127.0.0.1, no AAAA), pebble with `-dnsserver`, no validation sleeps, no nonce
//! rejections, no authz reuse. Its `httpPort`/`tlsPort` are the gateway's listener ports.
//! Both processes are killed on drop.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

pub mod cluster;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, ServerName};

/// A free loopback port below the kernel's ephemeral range (32768-60999 here), so the
/// outgoing connections of other tests, which get ephemeral ports, never take it between
/// this pick and the bind of whoever it is for. Ports are handed out in order from a
/// random start, each checked bindable, never twice in one process.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    if NEXT.load(Ordering::Relaxed) == u32::MAX {
        let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos()
            ^ std::process::id().wrapping_mul(7919);
        let _ = NEXT.compare_exchange(u32::MAX, seed % SPAN, Ordering::Relaxed, Ordering::Relaxed);
    }
    for _ in 0..SPAN {
        let port = (LOW + NEXT.fetch_add(1, Ordering::Relaxed) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn binary(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let p = dir.join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "`{name}` is not installed: the ACME tests need Debian's Pebble. Install it with \
         `apt-get install pebble` (scripts/test.sh does this on CI)"
    );
}

/// Pebble's ports and files, chosen and written before it runs (so a gateway can be
/// configured against a Pebble that is not up yet).
#[derive(Clone)]
pub struct PebblePlan {
    pub dir: PathBuf,
    pub api_port: u16,
    pub mgmt_port: u16,
    pub dns_port: u16,
    pub dns_mgmt_port: u16,
    pub http_port: u16,
    pub tls_port: u16,
    pub api_ca: PathBuf,
    pub validity_secs: Option<u64>,
    /// Names Pebble refuses at new-order (`rejectedIdentifier`).
    pub blocklist: Vec<String>,
    /// `PEBBLE_VA_ALWAYS_VALID=1`: every challenge passes without a validation request.
    pub always_valid: bool,
}

pub struct Pebble {
    pub plan: PebblePlan,
    pebble: Child,
    challtestsrv: Child,
    pub log: PathBuf,
    /// PEM of the root that signs issued certificates (`/roots/0`).
    pub root_pem: String,
}

impl PebblePlan {
    /// Picks ports and writes the API certificate and `pebble.json` into `dir`.
    /// `http_port`/`tls_port` are where Pebble validates (the gateway's listeners).
    pub fn new(dir: &Path, http_port: u16, tls_port: u16, validity_secs: Option<u64>) -> PebblePlan {
        // Fail loudly before anything else when Pebble is missing.
        binary("pebble");
        binary("pebble-challtestsrv");
        std::fs::create_dir_all(dir).unwrap();
        let (ca_pem, cert_pem, key_pem) = ca_and_leaf("pebble test API CA", &["localhost", "127.0.0.1", "::1"]);
        let api_ca = dir.join("api-ca.pem");
        std::fs::write(&api_ca, ca_pem).unwrap();
        std::fs::write(dir.join("api.pem"), cert_pem).unwrap();
        std::fs::write(dir.join("api.key"), key_pem).unwrap();
        PebblePlan {
            dir: dir.to_path_buf(),
            api_port: free_port(),
            mgmt_port: free_port(),
            dns_port: free_port(),
            dns_mgmt_port: free_port(),
            http_port,
            tls_port,
            api_ca,
            validity_secs,
            blocklist: Vec::new(),
            always_valid: false,
        }
    }

    pub fn directory_url(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.api_port)
    }

    /// Starts challtestsrv and pebble, waits for `/dir`, fetches `/roots/0`.
    pub fn start(self) -> Pebble {
        let mut config = serde_json::json!({
            "pebble": {
                "listenAddress": format!("127.0.0.1:{}", self.api_port),
                "managementListenAddress": format!("127.0.0.1:{}", self.mgmt_port),
                "certificate": self.dir.join("api.pem"),
                "privateKey": self.dir.join("api.key"),
                "httpPort": self.http_port,
                "tlsPort": self.tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false,
            }
        });
        if !self.blocklist.is_empty() {
            config["pebble"]["domainBlocklist"] = self.blocklist.clone().into();
        }
        if let Some(v) = self.validity_secs {
            config["pebble"]["certificateValidityPeriod"] = v.into();
        }
        let config_path = self.dir.join("pebble.json");
        std::fs::write(&config_path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();

        let cts_log = std::fs::File::create(self.dir.join("challtestsrv.log")).unwrap();
        let challtestsrv = Command::new(binary("pebble-challtestsrv"))
            .args(["-dns01", &format!("127.0.0.1:{}", self.dns_port)])
            .args(["-management", &format!("127.0.0.1:{}", self.dns_mgmt_port)])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .stdin(Stdio::null())
            .stdout(cts_log.try_clone().unwrap())
            .stderr(cts_log)
            .spawn()
            .expect("start pebble-challtestsrv");
        let log = self.dir.join("pebble.log");
        let out = std::fs::File::create(&log).unwrap();
        let pebble = Command::new(binary("pebble"))
            .arg("-config")
            .arg(&config_path)
            .args(["-dnsserver", &format!("127.0.0.1:{}", self.dns_port)])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_AUTHZREUSE", "0")
            .env("PEBBLE_VA_ALWAYS_VALID", if self.always_valid { "1" } else { "0" })
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start pebble");
        let mut p = Pebble { plan: self, pebble, challtestsrv, log, root_pem: String::new() };
        let roots = roots_from_pem(&std::fs::read(&p.plan.api_ca).unwrap());
        let mut delay = Duration::from_millis(20);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok((200, _)) = https_get(p.plan.api_port, "localhost", "/dir", &roots) {
                break;
            }
            if let Ok(Some(status)) = p.pebble.try_wait() {
                panic!("pebble exited ({status}) at start:\n{}", p.log_text());
            }
            assert!(Instant::now() < deadline, "pebble did not answer /dir in 20 s:\n{}", p.log_text());
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_millis(500));
        }
        let (status, root) = https_get(p.plan.mgmt_port, "localhost", "/roots/0", &roots).unwrap();
        assert_eq!(status, 200, "GET /roots/0");
        p.root_pem = String::from_utf8(root).unwrap();
        p
    }
}

impl Pebble {
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// New orders Pebble has received (its log line per `POST /order-plz`).
    pub fn orders(&self) -> usize {
        self.log_text().lines().filter(|l| l.contains("POST /order-plz")).count()
    }

    /// New accounts Pebble has received (`POST /sign-me-up`).
    pub fn accounts(&self) -> usize {
        self.log_text().lines().filter(|l| l.contains("POST /sign-me-up")).count()
    }

    /// Points `host` at `address` in the DNS Pebble validates with (challtestsrv's
    /// management API), or back at the default 127.0.0.1 with `None`.
    pub fn set_dns_a(&self, host: &str, address: Option<&str>) {
        let (path, body) = match address {
            Some(a) => ("/add-a", serde_json::json!({ "host": format!("{host}."), "addresses": [a] })),
            None => ("/clear-a", serde_json::json!({ "host": format!("{host}.") })),
        };
        let body = body.to_string();
        let mut s = TcpStream::connect(("127.0.0.1", self.plan.dns_mgmt_port)).unwrap();
        write!(
            s,
            "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "challtestsrv {path}: {answer}");
    }

    pub fn roots(&self) -> rustls::RootCertStore {
        roots_from_pem(self.root_pem.as_bytes())
    }

    /// Stops this Pebble and starts another on the same ports and API certificate. Pebble
    /// keeps no state: the new one knows no account (`accountDoesNotExist` for the old
    /// ones), signs with a new root, and its log starts empty.
    pub fn restart(self) -> Pebble {
        let plan = self.plan.clone();
        drop(self);
        plan.start()
    }
}

impl Pebble {
    /// [`Pebble::restart`] for a Pebble held in a field.
    pub fn restart_in_place(&mut self) {
        let _ = self.pebble.kill();
        let _ = self.challtestsrv.kill();
        let _ = self.pebble.wait();
        let _ = self.challtestsrv.wait();
        *self = self.plan.clone().start();
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        let _ = self.pebble.kill();
        let _ = self.challtestsrv.kill();
        let _ = self.pebble.wait();
        let _ = self.challtestsrv.wait();
    }
}

/// (CA PEM, server cert PEM, server key PEM): a CA named `ca_cn` and a server
/// certificate for `names` it signed (Pebble's API, static certificates).
pub fn ca_and_leaf(ca_cn: &str, names: &[&str]) -> (String, String, String) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name.push(DnType::CommonName, ca_cn);
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut leaf = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    leaf.distinguished_name.push(DnType::CommonName, names[0]);
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    (ca_cert.pem(), cert.pem(), key.serialize_pem())
}

/// A self-signed certificate + key (PEM) for `names`, for static certificates.
pub fn self_signed(names: &[&str]) -> (String, String) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let params = rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), key.serialize_pem())
}

pub fn roots_from_pem(pem: &[u8]) -> rustls::RootCertStore {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(pem) {
        roots.add(c.unwrap()).unwrap();
    }
    roots
}

fn client_config(roots: &rustls::RootCertStore) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut c = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(c)
}

/// A verified TLS connection (blocking) to `127.0.0.1:port` with SNI `sni`.
pub type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// Connects and completes the handshake, verifying the chain against `roots` and the
/// name against `sni`.
pub fn tls_connect(port: u16, sni: &str, roots: &rustls::RootCertStore) -> Result<Tls, String> {
    let name = ServerName::try_from(sni.to_string()).map_err(|e| e.to_string())?;
    let conn = rustls::ClientConnection::new(client_config(roots), name).map_err(|e| e.to_string())?;
    let tcp = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tcp.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock).map_err(|e| format!("handshake: {e}"))?;
    }
    Ok(tls)
}

/// The leaf certificate the server presented: (serial hex, DNS names, not_after).
pub fn peer_leaf(tls: &Tls) -> (String, Vec<String>, i64) {
    use x509_parser::prelude::*;
    let certs = tls.conn.peer_certificates().unwrap();
    let (_, cert) = X509Certificate::from_der(certs[0].as_ref()).unwrap();
    let names = cert
        .subject_alternative_name()
        .unwrap()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::DNSName(d) => Some(d.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    (cert.raw_serial_as_string(), names, cert.validity().not_after.timestamp())
}

/// Sends one HTTP/1.1 request on an open connection and reads one response
/// (Content-Length bodies only). Returns (status, body).
pub fn request<S: Read + Write>(s: &mut S, host: &str, path: &str, close: bool) -> Result<(u16, String), String> {
    let conn = if close { "close" } else { "keep-alive" };
    write!(s, "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: {conn}\r\n\r\n").map_err(|e| e.to_string())?;
    s.flush().map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        let n = s.read(&mut byte).map_err(|e| format!("read head: {e}"))?;
        if n == 0 {
            return Err(format!("connection closed after {} bytes", buf.len()));
        }
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).to_string();
    let status: u16 = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or(head.clone())?;
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length").then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).map_err(|e| format!("read body: {e}"))?;
    Ok((status, String::from_utf8_lossy(&body).to_string()))
}

/// `GET https://127.0.0.1:port{path}` with SNI `sni`, `Connection: close`, read to the end.
pub fn https_get(port: u16, sni: &str, path: &str, roots: &rustls::RootCertStore) -> Result<(u16, Vec<u8>), String> {
    let mut tls = tls_connect(port, sni, roots)?;
    write!(tls, "GET {path} HTTP/1.0\r\nHost: {sni}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    match tls.read_to_end(&mut out) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
        Err(e) => return Err(e.to_string()),
    }
    split_response(&out)
}

/// `GET http://127.0.0.1:port{path}` (HTTP/1.0), read to the end.
pub fn http_get(port: u16, host: &str, path: &str) -> Result<(u16, Vec<u8>), String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).map_err(|e| e.to_string())?;
    split_response(&out)
}

fn split_response(out: &[u8]) -> Result<(u16, Vec<u8>), String> {
    let end = out.windows(4).position(|w| w == b"\r\n\r\n").ok_or("no response head")?;
    let head = String::from_utf8_lossy(&out[..end]);
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or("no status")?;
    Ok((status, out[end + 4..].to_vec()))
}

/// A backend answering every request with 200 `backend ok` (HTTP/1.1, keep-alive).
pub fn backend() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        let body = "backend ok";
                        let resp = format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: text/plain\r\n\r\n{body}",
                            body.len()
                        );
                        if s.write_all(resp.as_bytes()).is_err() {
                            return;
                        }
                    }
                    match s.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    port
}

/// The gateway's listener ports.
#[derive(Clone, Copy, Debug)]
pub struct Ports {
    pub http: u16,
    pub https: u16,
    pub admin: u16,
}

impl Ports {
    pub fn free() -> Ports {
        Ports { http: free_port(), https: free_port(), admin: free_port() }
    }
}

/// `[acme]` settings for a test gateway.
pub struct AcmeSettings<'a> {
    pub directory: String,
    pub ca_file: &'a Path,
    pub challenge: &'a str,
    pub renew_before: &'a str,
}

/// Writes a config with one route per host (all to `backend_port`).
pub fn write_config(dir: &Path, ports: Ports, acme: &AcmeSettings<'_>, hosts: &[String], backend_port: u16) -> PathBuf {
    let mut s = format!(
        r#"[listen]
http = "127.0.0.1:{http}"
https = "127.0.0.1:{https}"
admin = "127.0.0.1:{admin}"

[runtime]
workers = 1

[proxy]
shutdown_delay = "0s"
drain_timeout = "1s"

[tls]
certs_dir = "{certs}"

[acme]
directory = "{directory}"
contact = "mailto:ops@swarmgate.test"
challenge = "{challenge}"
ca_file = "{ca}"
renew_before = "{renew}"
storage = "{storage}"

[upstream.backend]
servers = ["127.0.0.1:{backend_port}"]
"#,
        http = ports.http,
        https = ports.https,
        admin = ports.admin,
        certs = dir.join("certs").display(),
        directory = acme.directory,
        challenge = acme.challenge,
        ca = acme.ca_file.display(),
        renew = acme.renew_before,
        storage = dir.join("acme").display(),
    );
    for h in hosts {
        s.push_str(&format!("\n[[route]]\nhost = \"{h}\"\npath = \"/\"\nupstream = \"backend\"\n"));
    }
    std::fs::create_dir_all(dir.join("certs")).unwrap();
    let path = dir.join("swarmgate.toml");
    std::fs::write(&path, s).unwrap();
    path
}

/// The swarmgate binary, running; killed on drop.
pub struct Gateway {
    child: Child,
    pub ports: Ports,
    pub log: PathBuf,
    pub started: Instant,
}

impl Gateway {
    /// Starts `swarmgate run --config CONFIG` and waits for `/healthz`.
    pub fn start(config: &Path, ports: Ports, log: PathBuf) -> Gateway {
        Self::start_env(config, ports, log, &[])
    }

    /// `start` with extra environment variables.
    pub fn start_env(config: &Path, ports: Ports, log: PathBuf, env: &[(&str, &str)]) -> Gateway {
        match Self::try_start_env(config, ports, log, env) {
            Ok(gw) => gw,
            Err(e) => panic!("{e}"),
        }
    }

    /// `start_env`, but a gateway that exits at start (e.g. 2: a port another test took
    /// between picking and binding) is an error to retry with other ports.
    pub fn try_start_env(config: &Path, ports: Ports, log: PathBuf, env: &[(&str, &str)]) -> Result<Gateway, String> {
        let out = std::fs::File::create(&log).unwrap();
        let started = Instant::now();
        let child = Command::new(env!("CARGO_BIN_EXE_swarmgate"))
            .arg("run")
            .arg("--config")
            .arg(config)
            .env("SWARMGATE_LOG", "info,swarmgate=debug")
            .env_remove("SWARMGATE_LOG_FORMAT")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start swarmgate");
        let mut gw = Gateway { child, ports, log, started };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok((200, _)) = http_get(ports.admin, "admin", "/healthz") {
                break;
            }
            if let Ok(Some(status)) = gw.child.try_wait() {
                return Err(format!("swarmgate exited ({status}) at start:\n{}", gw.log_text()));
            }
            assert!(Instant::now() < deadline, "swarmgate did not come up:\n{}", gw.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(gw)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn admin(&self, path: &str) -> (u16, String) {
        let (status, body) = http_get(self.ports.admin, "admin", path).unwrap();
        (status, String::from_utf8_lossy(&body).to_string())
    }

    /// The value of an unlabelled or fully labelled metric line, e.g.
    /// `swarmgate_acme_orders_total{result="ok"}`.
    pub fn metric(&self, series: &str) -> f64 {
        let (_, text) = self.admin("/metrics");
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no metric {series}"))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no shutdown, no lease released.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for exit.
    pub fn stop(mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `f` until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until `host` presents a certificate that verifies against `roots`.
pub fn wait_for_cert(port: u16, host: &str, roots: &rustls::RootCertStore, timeout: Duration) -> Option<Tls> {
    wait_for(timeout, || tls_connect(port, host, roots).ok())
}

pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}
