//! Configuration: TOML file, then the environment, then one typed and validated [`Config`].
//!
//! Invariants: a `Config` that exists is valid as a whole (addresses parse, every route
//! names a declared upstream, no duplicate routes, no empty upstreams, durations sane);
//! the hot path never parses. Problems are collected all at once with their place
//! (`FILE:LINE:COL`, or the environment variable) so `swarmgate check` can show every one.
//! The environment is passed in as a map, so tests never touch the process environment.

pub mod duration;
mod reader;
mod route_path;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use toml::de::DeTable;

pub use reader::{At, Problem};
use reader::{Origin, Source, Table, TableName, as_str};
use route_path::normalize_path;

/// `SWARMGATE_*` variables that are not config keys.
const NON_KEY_VARS: &[&str] = &[
    "SWARMGATE_CONFIG",
    "SWARMGATE_LOG",
    "SWARMGATE_LOG_FORMAT",
    "SWARMGATE_ADMIN_TOKEN",
    "SWARMGATE_ACME_STORAGE_KEY",
];

#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from (for reload and messages).
    pub path: PathBuf,
    pub listen: Listen,
    pub runtime: Runtime,
    pub proxy: Proxy,
    pub limits: Limits,
    pub tls: Tls,
    pub acme: Option<Acme>,
    pub discovery: Discovery,
    pub routes: Vec<RouteConfig>,
    pub upstreams: BTreeMap<String, UpstreamConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listen {
    pub http: Option<SocketAddr>,
    pub https: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
}

#[derive(Debug, Clone)]
pub struct Runtime {
    /// Threads serving traffic; resolved (0 = one per core) by [`Runtime::threads`].
    pub workers: usize,
}

impl Runtime {
    pub fn threads(&self) -> usize {
        if self.workers > 0 { self.workers } else { std::thread::available_parallelism().map_or(1, usize::from) }
    }
}

#[derive(Debug, Clone)]
pub struct Proxy {
    pub trusted_proxies: Vec<IpNet>,
    pub redirect_https: bool,
    pub shutdown_delay: Duration,
    pub drain_timeout: Duration,
}

/// Protections against slow, large or too many clients.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Time a client has to send a complete HTTP/1.1 request head, from its first byte
    /// (from the connection's start for the first request): slowloris is closed.
    pub header_read_timeout: Duration,
    /// Largest request head (request line + headers): larger gets 431.
    pub max_header_bytes: usize,
    /// Longest request target: longer gets 414.
    pub max_uri_bytes: usize,
    /// A kept-alive connection with no request open (HTTP/1.1: and no byte arriving;
    /// HTTP/2: no stream open) is closed after this long.
    pub idle_timeout: Duration,
    /// Client connections served at once; further ones wait in the listen backlog.
    pub max_connections: usize,
    /// Request bodies up to this size are held so that an idempotent request can be
    /// retried on another server; larger ones stream and are never replayed.
    pub retry_body_bytes: usize,
    /// Time allowed for a TLS handshake.
    pub tls_handshake_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsVersion {
    V1_2,
    V1_3,
}

#[derive(Debug, Clone)]
pub struct Tls {
    pub certs_dir: PathBuf,
    pub min_version: TlsVersion,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Challenge {
    Http01,
    TlsAlpn01,
}

impl Challenge {
    /// As the config writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Challenge::Http01 => "http-01",
            Challenge::TlsAlpn01 => "tls-alpn-01",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Acme {
    pub directory: String,
    pub contact: Vec<String>,
    pub challenge: Challenge,
    pub ca_file: Option<PathBuf>,
    /// Where `ca_file` is written (or its default's table).
    pub ca_file_at: At,
    pub renew_before: Duration,
    /// A directory, or `redis://`/`rediss://` shared by every replica.
    pub storage: String,
    /// Where `storage` is written (or its default's table).
    pub storage_at: At,
    /// This replica's name in the shared store (`/certificates` shows who ordered what);
    /// `None`: `HOST/PID`.
    pub replica_id: Option<String>,
    /// `SWARMGATE_ACME_STORAGE_KEY`: private keys are encrypted in the store with it.
    pub storage_key: Option<crate::acme::seal::SecretKey>,
}

#[derive(Debug, Clone, Default)]
pub struct Discovery {
    pub nameservers: Vec<SocketAddr>,
}

/// A route's host: exact (`fhir.example.org`), one-label wildcard (`*.example.org`), or `*`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HostPattern {
    Exact(String),
    /// The suffix after `*.`, e.g. `example.org`.
    Wildcard(String),
    Any,
}

impl HostPattern {
    /// The pattern as written, in two pieces (`*.` and `example.org` for a wildcard), so
    /// that it can be joined to other text without the formatting machinery.
    pub fn parts(&self) -> (&'static str, &str) {
        match self {
            HostPattern::Exact(h) => ("", h),
            HostPattern::Wildcard(s) => ("*.", s),
            HostPattern::Any => ("*", ""),
        }
    }
}

impl std::fmt::Display for HostPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (star, name) = self.parts();
        f.write_str(star)?;
        f.write_str(name)
    }
}

#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub host: HostPattern,
    /// Where `host` is written.
    pub host_at: At,
    /// Normalised: starts with `/`, no trailing `/` unless it is `/`.
    pub path: String,
    pub strip_path: bool,
    pub upstream: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    Random,
    P2c,
}

impl Balance {
    /// As the config writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Balance::Random => "random",
            Balance::P2c => "p2c",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthConfig {
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive passes that make a server healthy.
    pub healthy_after: u32,
    /// Consecutive failures that make a server unhealthy.
    pub unhealthy_after: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsTarget {
    pub name: String,
    pub port: u16,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub name: String,
    pub servers: Vec<SocketAddr>,
    pub dns: Option<DnsTarget>,
    pub resolve_every: Duration,
    pub balance: Balance,
    pub health: Option<HealthConfig>,
    pub retries: u32,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
}

/// Reads `path` and overlays `env`; every problem at once on failure.
pub fn load(path: &Path, env: &BTreeMap<String, String>) -> Result<Config, Vec<Problem>> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| vec![Problem { location: file.clone(), message: format!("cannot read config: {e}"), order: 0 }])?;
    parse(path, &text, env)
}

/// Parses config text (as if read from `path`) and overlays `env`.
pub fn parse(path: &Path, text: &str, env: &BTreeMap<String, String>) -> Result<Config, Vec<Problem>> {
    let file = path.display().to_string();
    let src = Source::new(&file, text, env);
    let doc = match DeTable::parse(text) {
        Ok(doc) => doc,
        Err(e) => {
            let origin = Origin::File(e.span().unwrap_or(0..0));
            src.problem(&origin, e.message().trim().to_string());
            return Err(src.into_problems());
        }
    };
    let root = Table::new(&src, Some(doc.get_ref()), doc.span(), None, "config");
    let config = read_config(&root, path);
    root.finish();
    unknown_env_vars(&src);
    if src.has_problems() { Err(src.into_problems()) } else { Ok(config) }
}

fn section<'s, 't, 'i>(root: &Table<'s, 't, 'i>, name: &'static str) -> Table<'s, 't, 'i>
where
    's: 't,
{
    let (table, span) = match root.table(name) {
        Some((t, span)) => (Some(t), span),
        None => (None, 0..0),
    };
    Table::new(
        root.source(),
        table,
        span,
        Some(format!("SWARMGATE_{}_", name.to_ascii_uppercase())),
        format!("[{name}]"),
    )
}

fn read_config(root: &Table<'_, '_, '_>, path: &Path) -> Config {
    let listen = read_listen(&section(root, "listen"));
    let runtime = {
        let t = section(root, "runtime");
        let (workers, workers_at) = t.u64_with_origin("workers", 0);
        // One worker thread per core is the design; a thousand is a typo, not a plan.
        if workers > 1024 {
            t.source().problem(&workers_at, "[runtime].workers must be at most 1024 (0: one per core)");
        }
        let workers = workers.min(1024) as usize;
        t.finish();
        Runtime { workers }
    };
    let proxy = read_proxy(&section(root, "proxy"));
    let limits = read_limits(&section(root, "limits"));
    let tls = read_tls(&section(root, "tls"), path);
    let acme = read_acme(&section(root, "acme"), path);
    let discovery = read_discovery(&section(root, "discovery"));
    let upstreams = read_upstreams(root);
    let routes = read_routes(root, &upstreams);
    Config { path: path.to_path_buf(), listen, runtime, proxy, limits, tls, acme, discovery, routes, upstreams }
}

fn read_listen(t: &Table<'_, '_, '_>) -> Listen {
    let addr = |key: &'static str, default: &str| -> (Option<SocketAddr>, Origin) {
        t.get_with_origin(key, parse_listen_addr(default).ok().flatten(), |raw| parse_listen_addr(as_str(raw)?))
    };
    let (http, http_at) = addr("http", "0.0.0.0:80");
    let (https, https_at) = addr("https", "0.0.0.0:443");
    let (admin, admin_at) = addr("admin", "127.0.0.1:9901");
    // Both are on by default, so both were turned off by a key: the environment's, if one
    // did, is the likelier slip.
    if http.is_none() && https.is_none() {
        let at =
            if matches!(https_at, Origin::Env(_)) && !matches!(http_at, Origin::Env(_)) { &https_at } else { &http_at };
        t.source().problem(at, "[listen]: at least one of http and https must be set");
    }
    let bound: Vec<(SocketAddr, &Origin)> = [(http, &http_at), (https, &https_at), (admin, &admin_at)]
        .into_iter()
        .filter_map(|(a, at)| Some((a?, at)))
        .collect();
    for (i, (a, at)) in bound.iter().enumerate() {
        if a.port() != 0 && bound[..i].iter().any(|(b, _)| b == a) {
            t.source().problem(at, format!("[listen]: {a} is used by two listeners"));
        }
    }
    t.finish();
    Listen { http, https, admin }
}

/// `""` or `"off"` turns a listener off.
fn parse_listen_addr(text: &str) -> Result<Option<SocketAddr>, String> {
    let text = text.trim();
    if text.is_empty() || text == "off" {
        return Ok(None);
    }
    text.parse::<SocketAddr>().map(Some).map_err(|_| {
        format!("{text:?} is not an IP:PORT address (use [::]:443 for IPv6, \"\" to turn the listener off)")
    })
}

fn read_proxy(t: &Table<'_, '_, '_>) -> Proxy {
    let trusted_proxies = each_of_list(t, "trusted_proxies", parse_cidr);
    let proxy = Proxy {
        trusted_proxies,
        redirect_https: t.bool("redirect_https", true),
        shutdown_delay: t.duration("shutdown_delay", Duration::from_secs(5)),
        drain_timeout: t.duration("drain_timeout", Duration::from_secs(30)),
    };
    t.finish();
    proxy
}

/// A list whose entries are each read by `parse`: every bad entry is its own problem (at
/// the list, in the file or the variable), and is left out.
fn each_of_list<T>(t: &Table<'_, '_, '_>, key: &'static str, parse: impl Fn(&str) -> Result<T, String>) -> Vec<T> {
    let (items, at) = t.list(key);
    items
        .iter()
        .filter_map(|s| match parse(s) {
            Ok(v) => Some(v),
            Err(e) => {
                t.source().problem(&at, format!("{}.{key}: {e}", t.name));
                None
            }
        })
        .collect()
}

/// A CIDR, or a bare address meaning just that host.
pub fn parse_cidr(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    if let Ok(net) = text.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    text.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("{text:?} is not a CIDR (e.g. 10.0.0.0/8) or an IP address"))
}

/// The largest `max_header_bytes` accepted.
const MAX_HEADER_BYTES: usize = 1 << 20;

fn read_limits(t: &Table<'_, '_, '_>) -> Limits {
    let (header_read_timeout, header_read_timeout_at) =
        t.duration_with_origin("header_read_timeout", Duration::from_secs(30));
    let (max_header_bytes, max_header_bytes_at) = t.u64_with_origin("max_header_bytes", 64 * 1024);
    let (max_uri_bytes, max_uri_bytes_at) = t.u64_with_origin("max_uri_bytes", 8 * 1024);
    let (idle_timeout, idle_timeout_at) = t.duration_with_origin("idle_timeout", Duration::from_secs(120));
    let (max_connections, max_connections_at) = t.u64_with_origin("max_connections", 100_000);
    let limits = Limits {
        header_read_timeout,
        max_header_bytes: max_header_bytes as usize,
        max_uri_bytes: max_uri_bytes as usize,
        idle_timeout,
        max_connections: max_connections as usize,
        retry_body_bytes: t.u64("retry_body_bytes", 64 * 1024) as usize,
        tls_handshake_timeout: t.duration("tls_handshake_timeout", Duration::from_secs(10)),
    };
    let problem = |at: &Origin, message: &str| t.source().problem(at, message);
    if limits.header_read_timeout.is_zero() {
        problem(&header_read_timeout_at, "[limits].header_read_timeout must be more than 0");
    }
    // Bounded above: a head is held whole while it is read, HTTP/2's header list limit is
    // a u32, and the own HTTP/1.1 reader keeps u32 spans of it.
    let header_ok = (8192..=MAX_HEADER_BYTES).contains(&limits.max_header_bytes);
    if !header_ok {
        problem(&max_header_bytes_at, "[limits].max_header_bytes must be between 8192 and 1048576 (1 MiB)");
    }
    // Against a bad max_header_bytes only the bound it would have had: one mistake, one problem.
    let uri_bound = if header_ok { limits.max_header_bytes } else { MAX_HEADER_BYTES };
    if limits.max_uri_bytes < 64 || limits.max_uri_bytes > uri_bound {
        problem(&max_uri_bytes_at, "[limits].max_uri_bytes must be between 64 and max_header_bytes");
    }
    if limits.max_connections == 0 {
        problem(&max_connections_at, "[limits].max_connections must be more than 0");
    }
    // A parked connection keeps the time it has left in milliseconds as a u32.
    if limits.idle_timeout.as_millis() > u128::from(u32::MAX) {
        problem(&idle_timeout_at, "[limits].idle_timeout must be at most 49 days");
    }
    t.finish();
    limits
}

fn read_tls(t: &Table<'_, '_, '_>, config_path: &Path) -> Tls {
    let (dir, _) = t.string("certs_dir", "certs");
    let min_version = t.get("min_version", TlsVersion::V1_2, |raw| match as_str(raw)? {
        "1.2" => Ok(TlsVersion::V1_2),
        "1.3" => Ok(TlsVersion::V1_3),
        other => Err(format!("{other:?} is not a TLS version swarmgate offers (\"1.2\" or \"1.3\")")),
    });
    t.finish();
    Tls { certs_dir: relative_to(config_path, &dir), min_version }
}

/// Paths in the config are relative to the working directory, like every CLI tool's;
/// the config's own folder would surprise a user running `swarmgate` from the repo.
fn relative_to(_config_path: &Path, value: &str) -> PathBuf {
    PathBuf::from(value)
}

fn read_acme(t: &Table<'_, '_, '_>, config_path: &Path) -> Option<Acme> {
    let env_has_acme =
        t.source().env.keys().any(|k| k.starts_with("SWARMGATE_ACME_") && k != "SWARMGATE_ACME_STORAGE_KEY");
    if !t.present() && !env_has_acme {
        return None;
    }
    let (directory, dir_origin) = t.string("directory", "https://acme-v02.api.letsencrypt.org/directory");
    if !(directory.starts_with("https://") || directory.starts_with("http://")) {
        t.source().problem(&dir_origin, format!("[acme].directory: {directory:?} is not an http(s) URL"));
    }
    let (contact, contact_at) = t.get_with_origin("contact", Vec::new(), |raw| match raw {
        reader::Raw::Toml(toml::de::DeValue::Array(_)) => reader::as_list(raw),
        other => Ok(vec![as_str(other)?.to_string()]),
    });
    for c in &contact {
        if !c.starts_with("mailto:") {
            t.source().problem(&contact_at, format!("[acme].contact: {c:?} must start with mailto:"));
        }
    }
    let challenge = t.get("challenge", Challenge::Http01, |raw| match as_str(raw)? {
        "http-01" => Ok(Challenge::Http01),
        "tls-alpn-01" => Ok(Challenge::TlsAlpn01),
        other => Err(format!("{other:?} is not a challenge swarmgate answers (\"http-01\" or \"tls-alpn-01\")")),
    });
    let (ca_file, ca_origin) = t.string("ca_file", "");
    let ca_file = (!ca_file.is_empty()).then(|| relative_to(config_path, &ca_file));
    if let Some(ca) = &ca_file {
        if let Err(e) = std::fs::metadata(ca) {
            t.source().problem(&ca_origin, format!("[acme].ca_file: cannot read {}: {e}", ca.display()));
        }
    }
    let renew_before = t.duration("renew_before", Duration::from_secs(30 * 86_400));
    let (storage, storage_origin) = t.string("storage", "certs/acme");
    if storage.is_empty() {
        t.source().problem(&storage_origin, "[acme].storage must name a directory or a redis:// URL");
    } else if crate::acme::cluster::is_redis_url(&storage) {
        if let Err(e) = redis::IntoConnectionInfo::into_connection_info(storage.as_str()) {
            // The message never repeats the URL (it may hold a password).
            t.source().problem(
                &storage_origin,
                format!(
                    "[acme].storage: not a usable Redis URL ({e}): expected redis://[:PASSWORD@]HOST:PORT/DB or rediss://…"
                ),
            );
        }
    } else if let Some((scheme, _)) = storage.split_once("://") {
        // Only the scheme is repeated: the rest may hold a password.
        t.source().problem(
            &storage_origin,
            format!(
                "[acme].storage: {scheme}:// is not a store swarmgate has; storage is a directory path \
                 (e.g. \"certs/acme\") or a Redis URL, redis://[:PASSWORD@]HOST:PORT/DB (rediss:// for TLS)"
            ),
        );
    }
    let (replica_id, replica_origin) = t.string("replica_id", "");
    if replica_id.len() > 200 || replica_id.chars().any(char::is_control) {
        t.source().problem(&replica_origin, "[acme].replica_id: at most 200 printable characters");
    }
    let replica_id = (!replica_id.is_empty()).then_some(replica_id);
    let key_var = crate::acme::seal::KEY_VAR;
    let storage_key = t.source().env.get(key_var).filter(|v| !v.is_empty()).cloned();
    if let Some(k) = &storage_key {
        if k.chars().count() < crate::acme::seal::MIN_KEY_CHARS {
            t.source().problem(
                &Origin::Env(key_var.to_string()),
                format!(
                    "{key_var}: at least {} characters of random data (e.g. `openssl rand -base64 32`)",
                    crate::acme::seal::MIN_KEY_CHARS
                ),
            );
        }
    }
    let storage_key = storage_key.map(crate::acme::seal::SecretKey::new);
    t.finish();
    let (storage_at, ca_file_at) = (t.source().at(&storage_origin), t.source().at(&ca_origin));
    Some(Acme {
        directory,
        contact,
        challenge,
        ca_file,
        ca_file_at,
        renew_before,
        storage,
        storage_at,
        replica_id,
        storage_key,
    })
}

fn read_discovery(t: &Table<'_, '_, '_>) -> Discovery {
    let nameservers = each_of_list(t, "nameservers", |s| {
        s.parse::<SocketAddr>().map_err(|_| format!("{s:?} is not an IP:PORT address"))
    });
    t.finish();
    Discovery { nameservers }
}

fn read_upstreams(root: &Table<'_, '_, '_>) -> BTreeMap<String, UpstreamConfig> {
    let mut out = BTreeMap::new();
    let Some((table, _)) = root.table("upstream") else {
        return out;
    };
    for (name, value) in table.iter() {
        let name_str = name.get_ref().to_string();
        let toml::de::DeValue::Table(t) = value.get_ref() else {
            root.source().problem(&Origin::File(value.span()), format!("upstream.{name_str} must be a table"));
            continue;
        };
        if name_str.is_empty() || !name_str.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            root.source().problem(
                &Origin::File(name.span()),
                format!("upstream name {name_str:?}: use letters, digits, - and _"),
            );
            continue;
        }
        let env_prefix = format!("SWARMGATE_UPSTREAM_{}_", name_str.to_ascii_uppercase().replace('-', "_"));
        let t = Table::new(root.source(), Some(t), value.span(), Some(env_prefix), format!("[upstream.{name_str}]"));
        out.insert(name_str.clone(), read_upstream(&t, &name_str));
    }
    out
}

fn read_upstream(t: &Table<'_, '_, '_>, name: &str) -> UpstreamConfig {
    let (servers, servers_origin) = t.list("servers");
    let listed = servers.len();
    let mut servers: Vec<SocketAddr> = servers
        .iter()
        .filter_map(|s| match s.parse::<SocketAddr>() {
            Ok(a) if a.port() == 0 => {
                t.source().problem(&servers_origin, format!("{}.servers: {s:?} has port 0", t.name));
                None
            }
            Ok(a) => Some(a),
            Err(_) => {
                t.source().problem(&servers_origin, format!("{}.servers: {s:?} is not an IP:PORT address", t.name));
                None
            }
        })
        .collect();
    let (dns_text, dns_origin) = t.string("dns", "");
    let mut dns = if dns_text.is_empty() {
        None
    } else {
        match parse_dns_target(&dns_text) {
            Ok(d) => Some(d),
            Err(e) => {
                t.source().problem(&dns_origin, format!("{}.dns: {e}", t.name));
                None
            }
        }
    };
    if listed > 0 && !dns_text.is_empty() {
        // An environment variable overrides the file: the one it sets wins.
        match (matches!(servers_origin, Origin::Env(_)), matches!(dns_origin, Origin::Env(_))) {
            (false, true) => servers.clear(),
            (true, false) => dns = None,
            _ => t.source().problem(&dns_origin, format!("{}: servers and dns both given; use one", t.name)),
        }
    }
    // Only when nothing was listed: unparsable entries were reported above. At the key
    // that emptied the list, if one did; else at the table.
    if listed == 0 && dns_text.is_empty() {
        let at = match (&servers_origin, &dns_origin) {
            (Origin::Default(_), Origin::Env(_) | Origin::File(_)) => &dns_origin,
            _ => &servers_origin,
        };
        t.source().problem(at, format!("{}: needs servers = [\"IP:PORT\", ...] or dns = \"NAME:PORT\"", t.name));
    }
    let (resolve_every, resolve_every_at) = t.duration_with_origin("resolve_every", Duration::from_secs(2));
    if resolve_every < Duration::from_millis(100) {
        t.source().problem(&resolve_every_at, format!("{}.resolve_every must be at least 100ms", t.name));
    }
    let balance = t.get("balance", Balance::Random, |raw| match as_str(raw)? {
        "random" => Ok(Balance::Random),
        "p2c" => Ok(Balance::P2c),
        other => Err(format!("{other:?} is not a balancer (\"random\" or \"p2c\")")),
    });
    let health = read_health(t, name);
    let upstream = UpstreamConfig {
        name: name.to_string(),
        servers,
        dns,
        resolve_every,
        balance,
        health,
        retries: t.u64("retries", 2).min(100) as u32,
        connect_timeout: more_than_0(t, "connect_timeout", Duration::from_secs(2)),
        response_timeout: more_than_0(t, "response_timeout", Duration::from_secs(60)),
    };
    t.finish();
    upstream
}

/// The keys of an upstream's `health` table.
const HEALTH_KEYS: [&str; 5] = ["path", "interval", "timeout", "healthy_after", "unhealthy_after"];

/// An upstream's `health` table. Its keys have environment forms like every scalar,
/// `SWARMGATE_UPSTREAM_<NAME>_HEALTH_<KEY>`; one set where the file has no `health` turns
/// checks on with the defaults for the rest, as `SWARMGATE_ACME_*` does for `[acme]`.
fn read_health(t: &Table<'_, '_, '_>, name: &str) -> Option<HealthConfig> {
    let env_prefix = format!("SWARMGATE_UPSTREAM_{}_HEALTH_", name.to_ascii_uppercase().replace('-', "_"));
    let (table, span) = match t.table("health") {
        Some((h, span)) => (Some(h), span),
        None => (None, t.span()),
    };
    let env = &t.source().env;
    if table.is_none()
        && !HEALTH_KEYS.iter().any(|k| env.contains_key(&format!("{env_prefix}{}", k.to_ascii_uppercase())))
    {
        return None;
    }
    let h = Table::new(t.source(), table, span, Some(env_prefix), format!("{}.health", t.name));
    let (path, path_origin) = h.string("path", "/health");
    if !path.starts_with('/') {
        h.source().problem(&path_origin, format!("{}.path must start with /", h.name));
    }
    let health = HealthConfig {
        path,
        interval: more_than_0(&h, "interval", Duration::from_secs(2)),
        timeout: more_than_0(&h, "timeout", Duration::from_secs(1)),
        healthy_after: checks_in_a_row(&h, "healthy_after", 1),
        unhealthy_after: checks_in_a_row(&h, "unhealthy_after", 2),
    };
    h.finish();
    Some(health)
}

/// `healthy_after` or `unhealthy_after`: 1 to 1000 checks in a row.
fn checks_in_a_row(h: &Table<'_, '_, '_>, key: &'static str, default: u64) -> u32 {
    let (n, at) = h.u64_with_origin(key, default);
    if n == 0 {
        h.source().problem(&at, format!("{}.{key} must be at least 1 (checks in a row, 1 to 1000)", h.name));
    } else if n > 1000 {
        h.source().problem(&at, format!("{}.{key} must be at most 1000", h.name));
    }
    n.clamp(1, 1000) as u32
}

/// A duration that must be more than 0 (a timeout or an interval), reported at its key.
fn more_than_0(t: &Table<'_, '_, '_>, key: &'static str, default: Duration) -> Duration {
    let (d, at) = t.duration_with_origin(key, default);
    if d.is_zero() {
        t.source().problem(&at, format!("{}.{key} must be more than 0", t.name));
    }
    d
}

fn parse_dns_target(text: &str) -> Result<DnsTarget, String> {
    let (name, port) = text.rsplit_once(':').ok_or_else(|| format!("{text:?} needs a port: \"tasks.NAME:PORT\""))?;
    let port: u16 = port.parse().ok().filter(|p| *p != 0).ok_or_else(|| format!("{text:?}: {port:?} is not a port"))?;
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.') {
        return Err(format!("{text:?}: {name:?} is not a DNS name"));
    }
    Ok(DnsTarget { name: name.to_ascii_lowercase(), port })
}

/// The routes; a duplicate is reported (at its place in the file) and left out.
fn read_routes(root: &Table<'_, '_, '_>, upstreams: &BTreeMap<String, UpstreamConfig>) -> Vec<RouteConfig> {
    let tables = root.array_of_tables("route");
    let mut routes = Vec::with_capacity(tables.len());
    let mut origins = Vec::with_capacity(tables.len());
    for (i, (table, span)) in tables.into_iter().enumerate() {
        let t = Table::new(root.source(), Some(table), span.clone(), None, TableName::Item("route", i + 1));
        let (host, host_origin) = t.str("host", "");
        let host = match parse_host_pattern(host) {
            Ok(h) => Some(h),
            Err(e) => {
                t.source().problem(&host_origin, format!("{}.host: {e}", t.name));
                None
            }
        };
        let (path, path_origin) = t.str("path", "/");
        let path = match normalize_path(path) {
            Ok(p) => Some(p),
            Err(e) => {
                t.source().problem(&path_origin, format!("{}.path: {e}", t.name));
                None // reported once: not checked any further (for a duplicate, say)
            }
        };
        let strip_path = t.bool("strip_path", false);
        let (upstream, up_origin) = t.str("upstream", "");
        if upstream.is_empty() {
            t.source().problem(&up_origin, format!("{}: needs upstream = \"NAME\"", t.name));
        } else if !upstreams.contains_key(upstream) {
            let known: Vec<&str> = upstreams.keys().map(String::as_str).collect();
            t.source().problem(
                &up_origin,
                format!(
                    "{}: unknown upstream {upstream:?} (declared: {})",
                    t.name,
                    if known.is_empty() { "none".into() } else { known.join(", ") }
                ),
            );
        }
        t.finish();
        let (Some(host), Some(path)) = (host, path) else { continue };
        routes.push(RouteConfig {
            host,
            host_at: root.source().at(&host_origin),
            path,
            strip_path,
            upstream: upstream.to_string(),
        });
        origins.push(Origin::File(span));
    }
    // A duplicate is reported once, as a duplicate; it is not checked any further.
    for i in report_duplicate_routes(root.source(), &routes, &origins).into_iter().rev() {
        routes.remove(i);
    }
    routes
}

/// One problem per route whose (host, path) an earlier route has: found in one pass over
/// a map that borrows the routes, not by a scan per route. Returns the duplicates' indices,
/// in order.
fn report_duplicate_routes(src: &Source<'_>, routes: &[RouteConfig], origins: &[Origin]) -> Vec<usize> {
    let mut duplicates = Vec::new();
    let mut first: crate::FastMap<(&HostPattern, &str), &Origin> = crate::FastMap::default();
    first.reserve(routes.len());
    for (i, (route, origin)) in routes.iter().zip(origins).enumerate() {
        let first_origin = match first.entry((&route.host, &route.path)) {
            std::collections::hash_map::Entry::Occupied(e) => *e.get(),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(origin);
                continue;
            }
        };
        let first_at = match first_origin {
            Origin::File(s) | Origin::Default(s) => src.position(s.start),
            Origin::Env(v) => v.clone(),
        };
        src.problem(
            origin,
            format!(
                "duplicate route for host {:?} path {:?} (first at {first_at})",
                route.host.to_string(),
                route.path
            ),
        );
        duplicates.push(i);
    }
    duplicates
}

/// `example.org`, `*.example.org` or `*`; lower-cased, no port.
pub fn parse_host_pattern(text: &str) -> Result<HostPattern, String> {
    // A reload reads one per route: the common case, a DNS name, in one pass.
    let trimmed = text.trim();
    let (wild, name) = match trimmed.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, trimmed),
    };
    if let Some(name) = dns_name(name) {
        return Ok(if wild { HostPattern::Wildcard(name) } else { HostPattern::Exact(name) });
    }
    let text_trimmed = trimmed;
    let host: std::borrow::Cow<'_, str> = if text_trimmed.bytes().any(|b| b.is_ascii_uppercase()) {
        text_trimmed.to_ascii_lowercase().into()
    } else {
        text_trimmed.into()
    };
    if host.is_empty() {
        return Err("needs a host name (\"fhir.example.org\", \"*.example.org\" or \"*\")".into());
    }
    if host == "*" {
        return Ok(HostPattern::Any);
    }
    // IP literals in canonical form, an IPv6 one with or without brackets: the router
    // compares them with the Host a client sends (normalised the same way).
    let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(&host);
    if let Some(ip) = parse_ip_literal(bare) {
        return Ok(HostPattern::Exact(ip.to_string()));
    }
    let (wild, name) = match host.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, &*host),
    };
    // A wildcard's `*.` stands for a DNS label: what follows is labels too, never an
    // IPv6 address (`*.b:f::`), which no Host ends with.
    if (wild || parse_ip_literal(name).is_none()) && dns_labels(name).is_none() {
        return Err(format!("{text:?} is not a host name (no port, no scheme; a wildcard is \"*.example.org\")"));
    }
    Ok(if wild { HostPattern::Wildcard(name.to_string()) } else { HostPattern::Exact(name.to_string()) })
}

/// `name` lower-cased, if it is a DNS name (see [`dns_labels`]) that cannot be an IP
/// address (it is not all digits and dots).
fn dns_name(name: &str) -> Option<String> {
    (dns_labels(name) == Some(false)).then(|| name.to_ascii_lowercase())
}

/// Whether `name` is dot-separated labels of 1 to 63 letters, digits, `-` or `_`
/// (`None` when it is not), and whether it is all digits and dots; in one pass.
fn dns_labels(name: &str) -> Option<bool> {
    let (mut label, mut numeric) = (0, true);
    for b in name.bytes() {
        match b {
            b'.' if label == 0 => return None,
            b'.' => label = 0,
            b'0'..=b'9' if label < 63 => label += 1,
            b'a'..=b'z' | b'A'..=b'Z' | b'-' | b'_' if label < 63 => {
                label += 1;
                numeric = false;
            }
            _ => return None,
        }
    }
    (label > 0).then_some(numeric)
}

/// An IP address, tried only on text that can be one (digits and dots, or a colon): a
/// reload reads thousands of host names, and the address parser is the slow way to learn
/// that `fhir.example.org` is not one.
fn parse_ip_literal(text: &str) -> Option<IpAddr> {
    let maybe = text.contains(':') || text.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    if maybe { text.parse().ok() } else { None }
}

/// The keys of an `[upstream.NAME]` table but `health`'s (see [`HEALTH_KEYS`]), for
/// telling a variable that names an undeclared upstream (`undeclared_upstream`).
const UPSTREAM_KEYS: [&str; 7] =
    ["servers", "dns", "resolve_every", "balance", "retries", "connect_timeout", "response_timeout"];

/// The upstream an unread `SWARMGATE_UPSTREAM_<NAME>_<KEY>` names, when `<KEY>` is an
/// upstream key (lower-cased, as upstream names are read from variables).
fn undeclared_upstream(var: &str) -> Option<String> {
    let rest = var.strip_prefix("SWARMGATE_UPSTREAM_")?;
    let keys = UPSTREAM_KEYS.iter().map(|k| k.to_string()).chain(HEALTH_KEYS.iter().map(|k| format!("health_{k}")));
    keys.map(|k| format!("_{}", k.to_ascii_uppercase()))
        .find_map(|k| rest.strip_suffix(&k).map(str::to_ascii_lowercase))
        .filter(|n| !n.is_empty())
}

/// Any `SWARMGATE_*` variable that is neither a key that was read nor a known setting.
fn unknown_env_vars(src: &Source<'_>) {
    let used = src.used_env();
    for var in src.env.keys().filter(|k| k.starts_with("SWARMGATE_")) {
        if !used.contains(var) && !NON_KEY_VARS.contains(&var.as_str()) {
            src.problem(
                &Origin::Env(var.clone()),
                match undeclared_upstream(var) {
                    Some(name) => format!(
                        "no upstream {name:?} in the config file: SWARMGATE_UPSTREAM_<NAME>_<KEY> sets a key of an upstream the file declares"
                    ),
                    None => "not a swarmgate setting (SWARMGATE_<SECTION>_<KEY> of a key that exists)".to_string(),
                },
            );
        }
    }
}

impl Config {
    /// A one-screen summary for `swarmgate check`.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let opt = |a: Option<SocketAddr>| a.map_or_else(|| "off".to_string(), |a| a.to_string());
        s += &format!("config {} is valid\n", self.path.display());
        s += &format!(
            "listen: http {}, https {}, admin {}\n",
            opt(self.listen.http),
            opt(self.listen.https),
            opt(self.listen.admin)
        );
        s += &format!("workers: {}\n", self.runtime.threads());
        s += &format!(
            "certificates: {}{}\n",
            self.tls.certs_dir.display(),
            self.acme.as_ref().map_or(String::new(), |a| format!(
                ", ACME {} ({}), storage {}{}",
                a.directory,
                a.challenge.as_str(),
                crate::acme::cluster::redact(&a.storage),
                if a.storage_key.is_some() { " (encrypted)" } else { "" }
            ))
        );
        s += &format!("routes ({}):\n", self.routes.len());
        for r in self.routes.iter().take(20) {
            s += &format!(
                "  {}{} -> {}{}\n",
                r.host,
                r.path,
                r.upstream,
                if r.strip_path { " (strip_path)" } else { "" }
            );
        }
        if self.routes.len() > 20 {
            s += &format!("  ... and {} more\n", self.routes.len() - 20);
        }
        s += &format!("upstreams ({}):\n", self.upstreams.len());
        for u in self.upstreams.values().take(20) {
            let servers = match &u.dns {
                Some(d) => format!("dns {}:{} every {}", d.name, d.port, duration::format(u.resolve_every)),
                None => format!("{} server(s)", u.servers.len()),
            };
            s += &format!(
                "  {}: {servers}, {}{}\n",
                u.name,
                u.balance.as_str(),
                if u.health.is_some() { ", health checked" } else { "" }
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn host_patterns_are_normalised_and_checked() {
        let exact = |s: &str| Ok(HostPattern::Exact(s.to_string()));
        assert_eq!(parse_host_pattern("FHIR.Example.org"), exact("fhir.example.org"));
        assert_eq!(parse_host_pattern(" a_b-c.test "), exact("a_b-c.test"));
        assert_eq!(parse_host_pattern("*.Example.org"), Ok(HostPattern::Wildcard("example.org".into())));
        assert_eq!(parse_host_pattern("*"), Ok(HostPattern::Any));
        assert_eq!(parse_host_pattern("10.0.0.1"), exact("10.0.0.1"));
        assert_eq!(parse_host_pattern("[2001:DB8:0::1]"), exact("2001:db8::1"));
        assert_eq!(parse_host_pattern("2001:db8::1"), exact("2001:db8::1"));
        assert_eq!(parse_host_pattern("1.2.3"), exact("1.2.3"), "digits and dots that are no address are labels");
        assert_eq!(parse_host_pattern("*.10.0.0.1"), Ok(HostPattern::Wildcard("10.0.0.1".into())));
        assert_eq!(parse_host_pattern("*.9.A-b_c"), Ok(HostPattern::Wildcard("9.a-b_c".into())));
        let label63 = "a".repeat(63);
        assert_eq!(parse_host_pattern(&format!("{label63}.test")), exact(&format!("{label63}.test")));
        for bad in [
            "",
            "a..b",
            ".a",
            "a.",
            "a b",
            "a:80",
            "http://a",
            "ä.test",
            &format!("{label63}a.test"),
            "*.",
            "1::2::3",
            "*.*",
            "*.a..b",
        ] {
            assert!(parse_host_pattern(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn a_wildcard_over_an_ipv6_address_is_refused() {
        // `*.` stands for one DNS label before a name. A Host `x.b:f::` is no authority
        // (`valid_authority`), and `normalize_host` would make `x.b:f:` of it anyway: a
        // route `*.b:f::` could never match. (`*.10.0.0.1` stays: its labels are DNS labels.)
        for bad in ["*.::1", "*.b:f::", "*.2001:db8::1", "*.::ffff:10.0.0.1"] {
            assert!(parse_host_pattern(bad).is_err(), "{bad:?} was accepted");
        }
        assert_eq!(parse_host_pattern("*.10.0.0.1"), Ok(HostPattern::Wildcard("10.0.0.1".into())));
    }

    /// The problems `[limits]` with `line` in it has.
    fn limits_problems(line: &str) -> Vec<String> {
        match parse(Path::new("t.toml"), &format!("[limits]\n{line}\n"), &BTreeMap::new()) {
            Ok(_) => Vec::new(),
            Err(problems) => problems.into_iter().map(|p| p.to_string()).collect(),
        }
    }

    #[test]
    fn an_idle_timeout_past_49_days_is_refused() {
        assert_eq!(limits_problems("idle_timeout = \"49d\""), Vec::<String>::new());
        let refused = limits_problems("idle_timeout = \"50d\"");
        assert!(refused.iter().any(|p| p.contains("idle_timeout must be at most 49 days")), "{refused:#?}");
    }

    #[test]
    fn a_bad_max_header_bytes_is_one_problem() {
        for env in [[("SWARMGATE_LIMITS_MAX_HEADER_BYTES", "10")], [("SWARMGATE_LIMITS_MAX_HEADER_BYTES", "2000000")]] {
            assert_eq!(
                problems(ONE_UPSTREAM, &env),
                [
                    "env SWARMGATE_LIMITS_MAX_HEADER_BYTES: [limits].max_header_bytes must be between 8192 and 1048576 (1 MiB)"
                ]
            );
        }
        // A max_uri_bytes that is wrong on its own is still reported.
        let text = format!("[limits]\nmax_header_bytes = 10\nmax_uri_bytes = 2000000\n{ONE_UPSTREAM}");
        let found = problems(&text, &[]);
        assert_eq!(found.len(), 2, "{found:#?}");
        assert!(found[1].ends_with("max_uri_bytes must be between 64 and max_header_bytes"), "{found:#?}");
    }

    #[test]
    fn every_bad_entry_of_a_list_is_reported() {
        let text = format!(
            "[proxy]\ntrusted_proxies = [\"garbage1\", \"10.0.0.0/8\", \"garbage2\"]\n\
             [discovery]\nnameservers = [\"ns1\", \"ns2\"]\n{ONE_UPSTREAM}"
        );
        let (proxies, nameservers) = (after(&text, "trusted_proxies = "), after(&text, "nameservers = "));
        assert_eq!(
            problems(&text, &[]),
            [
                format!(
                    "{proxies}: [proxy].trusted_proxies: \"garbage1\" is not a CIDR (e.g. 10.0.0.0/8) or an IP address"
                ),
                format!(
                    "{proxies}: [proxy].trusted_proxies: \"garbage2\" is not a CIDR (e.g. 10.0.0.0/8) or an IP address"
                ),
                format!("{nameservers}: [discovery].nameservers: \"ns1\" is not an IP:PORT address"),
                format!("{nameservers}: [discovery].nameservers: \"ns2\" is not an IP:PORT address"),
            ]
        );
        let env = [("SWARMGATE_PROXY_TRUSTED_PROXIES", "garbage1, 10.0.0.1,garbage2")];
        assert_eq!(
            problems(ONE_UPSTREAM, &env),
            [
                "env SWARMGATE_PROXY_TRUSTED_PROXIES: [proxy].trusted_proxies: \"garbage1\" is not a CIDR (e.g. 10.0.0.0/8) or an IP address",
                "env SWARMGATE_PROXY_TRUSTED_PROXIES: [proxy].trusted_proxies: \"garbage2\" is not a CIDR (e.g. 10.0.0.0/8) or an IP address",
            ]
        );
    }

    #[test]
    fn max_header_bytes_is_bounded_both_ways() {
        for ok in [8192u64, 65536, 1 << 20] {
            assert_eq!(limits_problems(&format!("max_header_bytes = {ok}")), Vec::<String>::new(), "{ok}");
        }
        for bad in [8191u64, (1 << 20) + 1, 1 << 40] {
            let refused = limits_problems(&format!("max_header_bytes = {bad}"));
            assert!(
                refused.iter().any(|p| p.contains("max_header_bytes must be between 8192 and 1048576")),
                "{bad}: {refused:#?}"
            );
        }
    }

    /// The problems of a config with one route to `[upstream.u]`, whose body is `upstream`.
    fn upstream_problems(upstream: &str, more: &str) -> Vec<String> {
        let text = format!("{more}\n[[route]]\nhost = \"a.test\"\nupstream = \"u\"\n[upstream.u]\n{upstream}\n");
        match parse(Path::new("t.toml"), &text, &BTreeMap::new()) {
            Ok(_) => Vec::new(),
            Err(problems) => problems.into_iter().map(|p| p.to_string()).collect(),
        }
    }

    #[test]
    fn out_of_range_upstream_and_runtime_values_are_refused() {
        let ok = "servers = [\"127.0.0.1:8080\"]";
        assert_eq!(upstream_problems(ok, ""), Vec::<String>::new());
        let checked = format!("{ok}\nhealth = {{ healthy_after = 1000, unhealthy_after = 1 }}");
        assert_eq!(upstream_problems(&checked, ""), Vec::<String>::new());
        for (upstream, more, says) in [
            // Once taken `as u32`: 4294967296 became 0, a server passing every check unhealthy.
            (format!("{ok}\nhealth = {{ unhealthy_after = 4294967296 }}"), "", "unhealthy_after must be at most 1000"),
            (format!("{ok}\nhealth = {{ healthy_after = 1001 }}"), "", "healthy_after must be at most 1000"),
            (format!("{ok}\nhealth = {{ healthy_after = 0 }}"), "", "healthy_after must be at least 1"),
            (format!("{ok}\nhealth = {{ unhealthy_after = 0 }}"), "", "unhealthy_after must be at least 1"),
            // Once the list was silently ignored.
            (format!("{ok}\ndns = \"tasks.u:8080\""), "", "servers and dns both given"),
            ("servers = [\"127.0.0.1:0\"]".to_string(), "", "has port 0"),
            ("dns = \"tasks.u:0\"".to_string(), "", "is not a port"),
            (format!("{ok}\nresponse_timeout = \"400d\""), "", "more than a year"),
            (ok.to_string(), "[runtime]\nworkers = 100000", "workers must be at most 1024"),
        ] {
            let problems = upstream_problems(&upstream, more);
            assert!(problems.iter().any(|p| p.contains(says)), "{upstream} {more}: {problems:#?}");
        }
    }

    /// A config whose one route goes to `[upstream.u]`, which ends the text (more keys of
    /// it can follow).
    const ONE_UPSTREAM: &str =
        "[[route]]\nhost = \"a.test\"\nupstream = \"u\"\n[upstream.u]\nservers = [\"127.0.0.1:8080\"]\n";

    /// The problems of `text` with `env`, as `check` prints them.
    fn problems(text: &str, env: &[(&str, &str)]) -> Vec<String> {
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        match parse(Path::new("t.toml"), text, &env) {
            Ok(_) => Vec::new(),
            Err(problems) => problems.into_iter().map(|p| p.to_string()).collect(),
        }
    }

    /// `t.toml:LINE:COL` of what follows the first `needle` in `text`.
    fn after(text: &str, needle: &str) -> String {
        let offset = text.find(needle).unwrap() + needle.len();
        let line = text[..offset].matches('\n').count() + 1;
        let col = offset - text[..offset].rfind('\n').map_or(0, |i| i + 1) + 1;
        format!("t.toml:{line}:{col}")
    }

    #[test]
    fn range_problems_point_at_the_key_or_the_variable() {
        let up = ONE_UPSTREAM;
        let no_https = format!("[listen]\nhttps = \"\"\n{up}");
        let same_port = format!("[listen]\nhttp = \"127.0.0.1:1\"\nadmin = \"127.0.0.1:1\"\n{up}");
        let workers = format!("[runtime]\nworkers = 5000\n{up}");
        let limits = format!("[limits]\nmax_connections = 0\nidle_timeout = \"50d\"\n{up}");
        let contact = format!("[acme]\ncontact = \"ops@example.org\"\n{up}");
        let health = format!("{up}health = {{ interval = \"0\" }}\nconnect_timeout = \"0\"\n");
        for (text, env, expected) in [
            (
                up.to_string(),
                vec![("SWARMGATE_LIMITS_MAX_HEADER_BYTES", "10")],
                vec!["env SWARMGATE_LIMITS_MAX_HEADER_BYTES: [limits].max_header_bytes must be between 8192 and 1048576 (1 MiB)".to_string()],
            ),
            (
                up.to_string(),
                vec![("SWARMGATE_LIMITS_HEADER_READ_TIMEOUT", "0")],
                vec!["env SWARMGATE_LIMITS_HEADER_READ_TIMEOUT: [limits].header_read_timeout must be more than 0".into()],
            ),
            (
                up.to_string(),
                vec![("SWARMGATE_UPSTREAM_U_RESOLVE_EVERY", "10ms")],
                vec!["env SWARMGATE_UPSTREAM_U_RESOLVE_EVERY: [upstream.u].resolve_every must be at least 100ms".into()],
            ),
            (
                up.to_string(),
                vec![("SWARMGATE_UPSTREAM_U_SERVERS", "")],
                vec![r#"env SWARMGATE_UPSTREAM_U_SERVERS: [upstream.u]: needs servers = ["IP:PORT", ...] or dns = "NAME:PORT""#.into()],
            ),
            (
                no_https.clone(),
                vec![("SWARMGATE_LISTEN_HTTP", "")],
                vec!["env SWARMGATE_LISTEN_HTTP: [listen]: at least one of http and https must be set".into()],
            ),
            (
                same_port.clone(),
                vec![],
                vec![format!("{}: [listen]: 127.0.0.1:1 is used by two listeners", after(&same_port, "admin = "))],
            ),
            (
                workers.clone(),
                vec![],
                vec![format!("{}: [runtime].workers must be at most 1024 (0: one per core)", after(&workers, "workers = "))],
            ),
            (
                limits.clone(),
                vec![],
                vec![
                    format!("{}: [limits].max_connections must be more than 0", after(&limits, "max_connections = ")),
                    format!("{}: [limits].idle_timeout must be at most 49 days", after(&limits, "idle_timeout = ")),
                ],
            ),
            (
                contact.clone(),
                vec![],
                vec![format!(
                    "{}: [acme].contact: \"ops@example.org\" must start with mailto:",
                    after(&contact, "contact = ")
                )],
            ),
            (
                health.clone(),
                vec![],
                vec![
                    format!("{}: [upstream.u].health.interval must be more than 0", after(&health, "interval = ")),
                    format!("{}: [upstream.u].connect_timeout must be more than 0", after(&health, "connect_timeout = ")),
                ],
            ),
        ] {
            let found = problems(&text, &env);
            for e in &expected {
                assert!(found.contains(e), "{env:?} {text}\nmissing {e:?} in {found:#?}");
            }
        }
    }

    #[test]
    fn the_environment_chooses_between_servers_and_dns() {
        let text = "[[route]]\nhost = \"a.test\"\nupstream = \"u\"\n[upstream.u]\nservers = [\"127.0.0.1:8080\"]\n";
        let env = |k: &str, v: &str| BTreeMap::from([(k.to_string(), v.to_string())]);
        // The file lists servers, the environment names a DNS target: DNS it is.
        let c = parse(Path::new("t.toml"), text, &env("SWARMGATE_UPSTREAM_U_DNS", "tasks.u:8080")).unwrap();
        let u = &c.upstreams["u"];
        assert!(u.servers.is_empty());
        assert_eq!(u.dns.as_ref().map(|d| (d.name.as_str(), d.port)), Some(("tasks.u", 8080)));
        // And the other way round.
        let text = text.replace("servers = [\"127.0.0.1:8080\"]", "dns = \"tasks.u:8080\"");
        let c = parse(Path::new("t.toml"), &text, &env("SWARMGATE_UPSTREAM_U_SERVERS", "127.0.0.1:9000")).unwrap();
        let u = &c.upstreams["u"];
        assert!(u.dns.is_none());
        assert_eq!(u.servers, ["127.0.0.1:9000".parse::<SocketAddr>().unwrap()]);
    }

    #[test]
    fn health_keys_have_environment_forms_with_or_without_a_health_table() {
        let checked = format!("{ONE_UPSTREAM}health = {{ path = \"/health\", interval = \"5s\" }}\n");
        for text in [ONE_UPSTREAM.to_string(), checked] {
            let env = BTreeMap::from([
                ("SWARMGATE_UPSTREAM_U_HEALTH_PATH".to_string(), "/ready".to_string()),
                ("SWARMGATE_UPSTREAM_U_HEALTH_UNHEALTHY_AFTER".to_string(), "3".to_string()),
            ]);
            let c = parse(Path::new("t.toml"), &text, &env).unwrap();
            let health = c.upstreams["u"].health.clone().unwrap();
            assert_eq!(
                (health.path.as_str(), health.unhealthy_after, health.healthy_after),
                ("/ready", 3, 1),
                "{text}"
            );
        }
        let c = parse(Path::new("t.toml"), ONE_UPSTREAM, &BTreeMap::new()).unwrap();
        assert_eq!(c.upstreams["u"].health, None, "no variable, no table: no checks");
        assert_eq!(
            problems(ONE_UPSTREAM, &[("SWARMGATE_UPSTREAM_U_HEALTH_INTERVAL", "0")]),
            ["env SWARMGATE_UPSTREAM_U_HEALTH_INTERVAL: [upstream.u].health.interval must be more than 0"]
        );
        assert_eq!(
            problems(ONE_UPSTREAM, &[("SWARMGATE_UPSTREAM_U_HEALTH_PORT", "1")]),
            [
                "env SWARMGATE_UPSTREAM_U_HEALTH_PORT: not a swarmgate setting (SWARMGATE_<SECTION>_<KEY> of a key that exists)"
            ]
        );
    }

    #[test]
    fn an_acme_storage_url_of_another_scheme_says_what_is_accepted() {
        let text = format!("[acme]\nstorage = \"mysql://user:secret@db:3306/acme\"\n{ONE_UPSTREAM}");
        assert_eq!(
            problems(&text, &[]),
            [format!(
                "{}: [acme].storage: mysql:// is not a store swarmgate has; storage is a directory path \
                 (e.g. \"certs/acme\") or a Redis URL, redis://[:PASSWORD@]HOST:PORT/DB (rediss:// for TLS)",
                after(&text, "storage = ")
            )]
        );
    }

    #[test]
    fn a_route_path_that_cannot_match_is_reported_at_its_value() {
        let text = ONE_UPSTREAM.replace("upstream = \"u\"\n[", "path = \"/café\"\nupstream = \"u\"\n[");
        assert_eq!(
            problems(&text, &[]),
            [format!(
                "{}: [[route]] #1.path: \"/café\": percent-encode 'é' in a path prefix, as %C3%A9",
                after(&text, "path = ")
            )]
        );
    }

    #[test]
    fn the_summary_uses_the_config_spellings() {
        let text = format!(
            "[acme]\nchallenge = \"tls-alpn-01\"\n{ONE_UPSTREAM}balance = \"p2c\"\n\
             [upstream.d]\ndns = \"tasks.d:80\"\nresolve_every = \"1500ms\"\n"
        );
        let summary = parse(Path::new("t.toml"), &text, &BTreeMap::new()).unwrap().summary();
        let lines: Vec<&str> = summary.lines().collect();
        assert!(
            lines.iter().any(|l| l
                .ends_with(", ACME https://acme-v02.api.letsencrypt.org/directory (tls-alpn-01), storage certs/acme")),
            "{summary}"
        );
        assert!(lines.contains(&"  u: 1 server(s), p2c"), "{summary}");
        assert!(lines.contains(&"  d: dns tasks.d:80 every 1s500ms, random"), "{summary}");
    }

    #[test]
    fn a_route_with_a_bad_path_is_no_duplicate_of_another() {
        let text = "[[route]]\nhost = \"a.example\"\npath = \"fhir\"\nupstream = \"u\"\n\
                    [[route]]\nhost = \"a.example\"\nupstream = \"u\"\n\
                    [upstream.u]\nservers = [\"127.0.0.1:8080\"]\n";
        let problems = problems(text, &[]);
        assert_eq!(problems.len(), 1, "{problems:#?}");
        assert!(problems[0].contains("\"fhir\" must start with /"), "{problems:#?}");
    }

    #[test]
    fn a_variable_for_an_undeclared_upstream_says_so() {
        let dns = problems(ONE_UPSTREAM, &[("SWARMGATE_UPSTREAM_GHOST_DNS", "tasks.g:80")]);
        assert_eq!(
            dns,
            [
                "env SWARMGATE_UPSTREAM_GHOST_DNS: no upstream \"ghost\" in the config file: SWARMGATE_UPSTREAM_<NAME>_<KEY> sets a key of an upstream the file declares"
            ],
        );
        let health = problems(ONE_UPSTREAM, &[("SWARMGATE_UPSTREAM_GHOST_HEALTH_PATH", "/h")]);
        assert!(health[0].contains("no upstream \"ghost\""), "{health:#?}");
        let other = problems(ONE_UPSTREAM, &[("SWARMGATE_UPSTREAM_U_COLOUR", "red")]);
        assert!(other[0].ends_with("not a swarmgate setting (SWARMGATE_<SECTION>_<KEY> of a key that exists)"));
    }

    #[test]
    fn a_duplicate_route_is_reported_once() {
        let text = "[acme]\ncontact = []\n\
                    [[route]]\nhost = \"*.example.org\"\nupstream = \"u\"\n\
                    [[route]]\nhost = \"*.Example.org\"\nupstream = \"u\"\n\
                    [upstream.u]\nservers = [\"127.0.0.1:8080\"]\n";
        let problems = match parse(Path::new("t.toml"), text, &BTreeMap::new()) {
            Ok(_) => Vec::new(),
            Err(problems) => problems.into_iter().map(|p| p.to_string()).collect(),
        };
        let duplicate = problems.iter().filter(|p| p.contains("duplicate route")).count();
        assert_eq!(duplicate, 1, "{problems:#?}");
        assert!(
            problems.iter().any(|p| p.starts_with(
                "t.toml:6:1: duplicate route for host \"*.example.org\" path \"/\" (first at t.toml:3:1)"
            )),
            "{problems:#?}"
        );
    }
}
