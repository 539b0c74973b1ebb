//! Shared fixtures of the integration tests: the real `swarmgate` binary in a temp dir,
//! real upstream servers, a test PKI, HTTP/1.1, HTTP/2 and TLS clients, raw TCP.
//!
//! Everything listens on 127.0.0.1 with ports picked at run time.

#![allow(dead_code, unreachable_pub)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::convert::Infallible;
use std::io::Write as _;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;

pub const BIN: &str = env!("CARGO_BIN_EXE_swarmgate");

// ---------------------------------------------------------------------------------------
// Bodies and responses
// ---------------------------------------------------------------------------------------

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|e| match e {}).boxed()
}

pub fn empty() -> Body {
    Empty::<Bytes>::new().map_err(|e| match e {}).boxed()
}

/// Longest chunk [`pattern_body`] makes.
pub const PATTERN_CHUNK_MAX: usize = 64 * 1024;

fn pattern_buf() -> &'static Bytes {
    static BUF: OnceLock<Bytes> = OnceLock::new();
    BUF.get_or_init(|| (0..(PATTERN_CHUNK_MAX + 251) as u64).map(pattern_byte).collect::<Vec<u8>>().into())
}

/// `n` (at most [`PATTERN_CHUNK_MAX`]) bytes of the test pattern from `offset`, zero-copy.
pub fn pattern_slice(offset: u64, n: usize) -> Bytes {
    let start = (offset % 251) as usize;
    pattern_buf().slice(start..start + n)
}

/// Whether `data` is the test pattern from `offset`.
pub fn is_pattern(offset: u64, data: &[u8]) -> bool {
    let mut done = 0usize;
    while done < data.len() {
        let n = (data.len() - done).min(PATTERN_CHUNK_MAX);
        if data[done..done + n] != pattern_slice(offset + done as u64, n)[..] {
            return false;
        }
        done += n;
    }
    true
}

/// A streamed body of `total` bytes of the test pattern, in chunks of `chunk` bytes.
pub fn pattern_body(total: u64, chunk: usize) -> Body {
    assert!(chunk <= PATTERN_CHUNK_MAX);
    let stream = futures_util::stream::unfold(0u64, move |sent| async move {
        if sent >= total {
            return None;
        }
        let n = (total - sent).min(chunk as u64) as usize;
        Some((Ok::<_, BoxError>(Frame::data(pattern_slice(sent, n))), sent + n as u64))
    });
    BodyExt::boxed(StreamBody::new(stream))
}

/// The byte at `offset` of the repeating test pattern.
pub fn pattern_byte(offset: u64) -> u8 {
    (offset % 251) as u8
}

/// A collected response.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub trailers: Option<HeaderMap>,
}

impl Resp {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Every value of `name`, in order.
    pub fn header_all(&self, name: &str) -> Vec<String> {
        self.headers.get_all(name).iter().map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()).collect()
    }
}

pub async fn collect(resp: Response<Incoming>) -> Result<Resp, hyper::Error> {
    let (parts, body) = resp.into_parts();
    let collected = body.collect().await?;
    let trailers = collected.trailers().cloned();
    Ok(Resp {
        status: parts.status.as_u16(),
        version: parts.version,
        headers: parts.headers,
        body: collected.to_bytes(),
        trailers,
    })
}

/// A request builder with `Host` (HTTP/1.1) set.
pub fn req(method: &str, host: &str, path: &str) -> http::request::Builder {
    Request::builder().method(method).uri(path).header(hyper::header::HOST, host)
}

/// An HTTP/2 request builder (authority in the URI).
pub fn req2(method: &str, authority: &str, path: &str) -> http::request::Builder {
    Request::builder().method(method).version(Version::HTTP_2).uri(format!("https://{authority}{path}"))
}

// ---------------------------------------------------------------------------------------
// HTTP clients
// ---------------------------------------------------------------------------------------

/// One HTTP/1.1 client connection.
pub struct H1 {
    pub sender: hyper::client::conn::http1::SendRequest<Body>,
}

impl H1 {
    pub async fn connect(addr: SocketAddr) -> H1 {
        let stream = TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).ok();
        H1::over(stream).await
    }

    pub async fn over<I>(io: I) -> H1
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await.expect("h1 handshake");
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        H1 { sender }
    }

    pub async fn send(&mut self, req: Request<Body>) -> Result<Resp, hyper::Error> {
        self.sender.ready().await?;
        let resp = self.sender.send_request(req).await?;
        collect(resp).await
    }

    pub async fn get(&mut self, host: &str, path: &str) -> Resp {
        self.send(req("GET", host, path).body(empty()).unwrap()).await.expect("request")
    }

    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }
}

/// One HTTP/2 client connection.
pub struct H2 {
    pub sender: hyper::client::conn::http2::SendRequest<Body>,
}

impl H2 {
    pub async fn over<I>(io: I) -> H2
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(io))
            .await
            .expect("h2 handshake");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        H2 { sender }
    }

    pub async fn send(&mut self, req: Request<Body>) -> Result<Resp, hyper::Error> {
        self.sender.ready().await?;
        let resp = self.sender.send_request(req).await?;
        collect(resp).await
    }

    pub async fn get(&mut self, authority: &str, path: &str) -> Resp {
        self.send(req2("GET", authority, path).body(empty()).unwrap()).await.expect("h2 request")
    }
}

/// GET on a fresh HTTP/1.1 connection.
pub async fn get(addr: SocketAddr, host: &str, path: &str) -> Resp {
    H1::connect(addr).await.get(host, path).await
}

/// Any request on a fresh HTTP/1.1 connection.
pub async fn send(addr: SocketAddr, req: Request<Body>) -> Resp {
    H1::connect(addr).await.send(req).await.expect("request")
}

// ---------------------------------------------------------------------------------------
// Raw TCP
// ---------------------------------------------------------------------------------------

/// Writes `bytes`, then reads until the server closes or `timeout` passes.
/// Returns what was read and whether the server closed the connection.
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8], timeout: Duration) -> (Vec<u8>, bool) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(bytes).await.expect("write");
    read_until_close(&mut s, timeout).await
}

/// Reads one request head (up to its blank line, byte by byte: nothing after it is
/// taken) for a test's own raw server; `None` once the connection ends.
pub async fn read_request_head(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => return None,
        }
    }
    Some(head)
}

/// Reads until EOF (or a reset) or `timeout`; returns the bytes and whether it closed.
pub async fn read_until_close(s: &mut TcpStream, timeout: Duration) -> (Vec<u8>, bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return (out, false),
            Ok(Ok(0)) | Ok(Err(_)) => return (out, true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// The status code of the first response in raw bytes.
pub fn raw_status(raw: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(raw.get(..raw.len().min(64))?).ok()?;
    let rest = text.strip_prefix("HTTP/1.1 ")?;
    rest.get(..3)?.parse().ok()
}

/// How many HTTP/1.1 status lines raw bytes hold.
pub fn raw_response_count(raw: &[u8]) -> usize {
    String::from_utf8_lossy(raw).matches("HTTP/1.1 ").count()
}

// ---------------------------------------------------------------------------------------
// Ports
// ---------------------------------------------------------------------------------------

fn handed_out() -> &'static Mutex<HashSet<u16>> {
    static PORTS: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    PORTS.get_or_init(|| Mutex::new(HashSet::new()))
}

/// A port on 127.0.0.1 that was free a moment ago and that this process has not
/// handed out before.
///
/// Taken below the kernel's ephemeral range (32768 and up on Linux), from a start that
/// differs per test binary: a port the kernel handed out for `:0` could be taken by an
/// outgoing connection between the pick and the gateway's bind (seen as "Address
/// already in use", or a test talking to another test's gateway).
pub fn free_port() -> u16 {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let _ = NEXT.compare_exchange(0, seed as usize % 10_000 + 1, Ordering::Relaxed, Ordering::Relaxed);
    loop {
        let port = (12_000 + NEXT.fetch_add(1, Ordering::Relaxed) % 10_000) as u16;
        if StdListener::bind(("127.0.0.1", port)).is_ok() && handed_out().lock().unwrap().insert(port) {
            return port;
        }
    }
}

/// Polls `f` every 20 ms until it is true or `timeout` passes; returns the last result.
pub async fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// [`wait_until`] with a condition that has to await.
pub async fn wait_until_async<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if f().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------
// The gateway process
// ---------------------------------------------------------------------------------------

/// A config, environment and files for one gateway, in a temp dir of its own.
pub struct GatewayBuilder {
    config: String,
    env: Vec<(String, String)>,
    files: Vec<(PathBuf, Vec<u8>)>,
    vars: Vec<(String, String)>,
    dir: tempfile::TempDir,
    /// A signal sent to the process this long after it is spawned (not waiting for ready).
    early_signal: Option<(&'static str, Duration)>,
    /// `ulimit` arguments for the open-files limit the process starts with (`-Sn 200`).
    open_files: Option<&'static str>,
}

/// The result of `swarmgate check`.
#[derive(Debug)]
pub struct CheckOutput {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl GatewayBuilder {
    /// An environment variable for the process (SWARMGATE_LOG defaults to `debug`).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// A file written (relative to the temp dir) before the process starts.
    pub fn file(mut self, rel: &str, contents: impl Into<Vec<u8>>) -> Self {
        self.files.push((rel.into(), contents.into()));
        self
    }

    /// Replaces `@NAME@` in the config (and in later rewrites) with `value`.
    pub fn var(mut self, name: &str, value: impl ToString) -> Self {
        self.vars.push((format!("@{name}@"), value.to_string()));
        self
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `start` sends `sig` this long after spawning the process, ready or not.
    pub fn signal_after(mut self, sig: &'static str, after: Duration) -> Self {
        self.early_signal = Some((sig, after));
        self
    }

    fn write_files(&self) {
        for (rel, contents) in &self.files {
            let path = self.dir.path().join(rel);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).unwrap();
            }
            std::fs::write(path, contents).unwrap();
        }
    }

    /// The process starts with this open-files limit: `ulimit` arguments (`-Sn 200` for
    /// the soft limit alone, `-n 200` for both).
    pub fn open_files(mut self, ulimit: &'static str) -> Self {
        self.open_files = Some(ulimit);
        self
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = match self.open_files {
            // The shell becomes the gateway (`exec`): same process, same pid.
            Some(ulimit) => {
                let mut sh = Command::new("sh");
                sh.args(["-c", &format!("ulimit {ulimit} && exec \"$0\" \"$@\""), BIN]);
                sh
            }
            None => Command::new(BIN),
        };
        cmd.args(args).current_dir(self.dir.path());
        for (k, _) in std::env::vars() {
            if k.starts_with("SWARMGATE_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("SWARMGATE_LOG", "debug");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Runs `swarmgate check --config swarmgate.toml` (placeholders substituted with
    /// fresh ports).
    pub fn check(self) -> CheckOutput {
        self.write_files();
        let ports = Ports::pick();
        let text = substitute(&self.config, &ports, self.dir.path(), &self.vars);
        std::fs::write(self.dir.path().join(CONFIG_FILE), text).unwrap();
        let out = self
            .command(&["check", "--config", CONFIG_FILE])
            .stdin(Stdio::null())
            .output()
            .expect("run swarmgate check");
        CheckOutput {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Runs the binary with `args` (the config written as `swarmgate.toml` first) and
    /// waits for it to exit.
    pub fn exec(self, args: &[&str]) -> CheckOutput {
        self.write_files();
        let ports = Ports::pick();
        let text = substitute(&self.config, &ports, self.dir.path(), &self.vars);
        std::fs::write(self.dir.path().join(CONFIG_FILE), text).unwrap();
        let out = self.command(args).stdin(Stdio::null()).output().expect("run swarmgate");
        CheckOutput {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Spawns `swarmgate run` with its stderr a pipe whose reading end is already closed
    /// (a log collector gone): every log line it writes fails. The directory it runs in
    /// lives as long as the returned `TempDir`.
    pub fn spawn_with_stderr_closed(self) -> (Child, Ports, tempfile::TempDir) {
        self.write_files();
        let ports = Ports::pick();
        let text = substitute(&self.config, &ports, self.dir.path(), &self.vars);
        std::fs::write(self.dir.path().join(CONFIG_FILE), text).unwrap();
        let mut child = self
            .command(&["run", "--config", CONFIG_FILE])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn swarmgate");
        drop(child.stderr.take());
        (child, ports, self.dir)
    }

    /// Runs `swarmgate run` and waits for it to exit by itself (for start-up failures).
    /// Returns the exit code and the logs.
    pub async fn run_to_exit(self, timeout: Duration) -> (Option<i32>, String) {
        self.write_files();
        let ports = Ports::pick();
        self.run_to_exit_with(&ports, timeout).await
    }

    /// Like [`run_to_exit`] with the listener addresses given.
    pub async fn run_to_exit_with(&self, ports: &Ports, timeout: Duration) -> (Option<i32>, String) {
        let text = substitute(&self.config, ports, self.dir.path(), &self.vars);
        std::fs::write(self.dir.path().join(CONFIG_FILE), text).unwrap();
        let log_path = self.dir.path().join("gateway.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let mut child = self
            .command(&["run", "--config", CONFIG_FILE])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn swarmgate");
        self.send_early_signal(&child);
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break Some(st);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let logs = std::fs::read_to_string(&log_path).unwrap_or_default();
        (status.and_then(|s| s.code()), logs)
    }

    fn send_early_signal(&self, child: &Child) {
        if let Some((sig, after)) = self.early_signal {
            let pid = child.id().to_string();
            std::thread::spawn(move || {
                std::thread::sleep(after);
                let _ = Command::new("kill").args(["-s", sig, &pid]).status();
            });
        }
    }

    /// Starts the gateway and waits until `/readyz` answers 200. A listener port lost
    /// to a race (exit code 2) is retried with new ports.
    pub async fn start(self) -> Gateway {
        self.write_files();
        for attempt in 0..4 {
            let ports = Ports::pick();
            let text = substitute(&self.config, &ports, self.dir.path(), &self.vars);
            let config_path = self.dir.path().join(CONFIG_FILE);
            std::fs::write(&config_path, text).unwrap();
            let log_path = self.dir.path().join(format!("gateway-{attempt}.log"));
            let log = std::fs::File::create(&log_path).unwrap();
            let child = self
                .command(&["run", "--config", CONFIG_FILE])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("spawn swarmgate");
            self.send_early_signal(&child);
            let mut gw = Gateway {
                child: Some(child),
                http: ports.http,
                https: ports.https,
                admin: ports.admin,
                log_path,
                config_path,
                vars: self.vars.clone(),
                dir: None,
            };
            match gw.wait_ready(Duration::from_secs(10)).await {
                Ok(()) => {
                    gw.dir = Some(self.dir);
                    return gw;
                }
                Err(Some(2)) if attempt < 3 => {
                    eprintln!("listener port taken; retrying with new ports");
                    continue;
                }
                Err(code) => {
                    let logs = gw.logs();
                    panic!("gateway did not become ready (exit code {code:?}); logs:\n{logs}");
                }
            }
        }
        unreachable!()
    }
}

pub const CONFIG_FILE: &str = "swarmgate.toml";

/// The listener addresses of one gateway.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    pub http: SocketAddr,
    pub https: SocketAddr,
    pub admin: SocketAddr,
}

impl Ports {
    pub fn pick() -> Ports {
        let a = |p| SocketAddr::from(([127, 0, 0, 1], p));
        Ports { http: a(free_port()), https: a(free_port()), admin: a(free_port()) }
    }
}

fn substitute(config: &str, ports: &Ports, dir: &Path, vars: &[(String, String)]) -> String {
    let mut text = config
        .replace("@HTTP@", &ports.http.to_string())
        .replace("@HTTPS@", &ports.https.to_string())
        .replace("@ADMIN@", &ports.admin.to_string())
        .replace("@DIR@", &dir.display().to_string());
    for (k, v) in vars {
        text = text.replace(k, v);
    }
    text
}

/// A running `swarmgate run`; killed on drop.
pub struct Gateway {
    child: Option<Child>,
    pub http: SocketAddr,
    pub https: SocketAddr,
    pub admin: SocketAddr,
    log_path: PathBuf,
    pub config_path: PathBuf,
    vars: Vec<(String, String)>,
    dir: Option<tempfile::TempDir>,
}

/// What a SIGHUP did.
#[derive(Debug, PartialEq, Eq)]
pub enum Reload {
    /// Applied; the new `swarmgate_config_generation`.
    Applied(u64),
    Refused,
}

impl Gateway {
    pub fn builder(config: &str) -> GatewayBuilder {
        GatewayBuilder {
            config: config.to_string(),
            env: Vec::new(),
            files: Vec::new(),
            vars: Vec::new(),
            dir: tempfile::Builder::new().prefix("swarmgate-test-").tempdir().unwrap(),
            early_signal: None,
            open_files: None,
        }
    }

    pub async fn start(config: &str) -> Gateway {
        Gateway::builder(config).start().await
    }

    pub fn dir(&self) -> &Path {
        self.dir.as_ref().map(|d| d.path()).unwrap_or_else(|| self.config_path.parent().unwrap())
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    async fn wait_ready(&mut self, timeout: Duration) -> Result<(), Option<i32>> {
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(10);
        loop {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                return Err(st.code());
            }
            if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(1), try_get(self.admin, "/readyz")).await {
                if r.status == 200 {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                return Err(None);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(200));
        }
    }

    /// Sends a signal by name (`HUP`, `TERM`, `INT`, `KILL`).
    pub fn signal(&self, sig: &str) {
        let st = Command::new("kill").args(["-s", sig, &self.pid().to_string()]).status().expect("run kill");
        assert!(st.success(), "kill -s {sig} failed");
    }

    /// Waits for the process to exit by itself.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// GET on the admin listener.
    pub async fn admin_get(&self, path: &str) -> Resp {
        try_get(self.admin, path).await.expect("admin request")
    }

    pub async fn metrics(&self) -> String {
        let r = self.admin_get("/metrics").await;
        assert_eq!(r.status, 200);
        r.text()
    }

    /// The value of one series, e.g. `swarmgate_config_generation` or
    /// `swarmgate_reloads_total{result="failed"}`.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        metric_value(&self.metrics().await, series)
    }

    /// Writes a new config (placeholders substituted with this gateway's addresses).
    pub fn rewrite_config(&self, config: &str) {
        let ports = Ports { http: self.http, https: self.https, admin: self.admin };
        let text = substitute(config, &ports, self.dir(), &self.vars);
        let tmp = self.config_path.with_extension("tmp");
        std::fs::File::create(&tmp).and_then(|mut f| f.write_all(text.as_bytes())).unwrap();
        std::fs::rename(tmp, &self.config_path).unwrap();
    }

    /// Rewrites the config, sends SIGHUP and waits until the reload was applied (config
    /// generation went up) or refused (failed reloads went up).
    pub async fn reload(&self, config: &str) -> Reload {
        let generation = self.metric("swarmgate_config_generation").await.unwrap();
        let failed = self.metric("swarmgate_reloads_total{result=\"failed\"}").await.unwrap();
        self.rewrite_config(config);
        self.signal("HUP");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let m = self.metrics().await;
            let g = metric_value(&m, "swarmgate_config_generation").unwrap();
            let f = metric_value(&m, "swarmgate_reloads_total{result=\"failed\"}").unwrap();
            if g > generation {
                return Reload::Applied(g as u64);
            }
            if f > failed {
                return Reload::Refused;
            }
            assert!(Instant::now() < deadline, "reload neither applied nor refused; logs:\n{}", self.logs());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Resident memory of the gateway process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            let logs = self.logs();
            let tail: Vec<&str> = logs.lines().rev().take(80).collect();
            eprintln!("---- last gateway log lines ----");
            for l in tail.into_iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// The value of `series` (the metric name with its labels, exactly as rendered).
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(series)?;
        rest.strip_prefix(' ')?.trim().parse().ok()
    })
}

async fn try_get(addr: SocketAddr, path: &str) -> Result<Resp, BoxError> {
    let stream = TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let resp = sender.send_request(req("GET", &addr.to_string(), path).body(empty())?).await?;
    Ok(collect(resp).await?)
}

/// POST on the admin listener with an optional bearer token.
pub async fn admin_post(addr: SocketAddr, path: &str, token: Option<&str>) -> Resp {
    let mut b = req("POST", &addr.to_string(), path);
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    send(addr, b.body(empty()).unwrap()).await
}

// ---------------------------------------------------------------------------------------
// Backends
// ---------------------------------------------------------------------------------------

/// One request as a backend saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    /// Path and query.
    pub uri: String,
    pub version: Version,
    /// Every header line, in order (names lower case).
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    pub trailers: Option<HeaderMap>,
}

impl Recorded {
    /// The only value of `name`; panics when the header is repeated.
    pub fn header(&self, name: &str) -> Option<&str> {
        let all: Vec<&str> = self.headers.iter().filter(|(n, _)| n == name).map(|(_, v)| v.as_str()).collect();
        assert!(all.len() <= 1, "{name} repeated: {all:?}");
        all.first().copied()
    }

    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers.iter().filter(|(n, _)| n == name).map(|(_, v)| v.as_str()).collect()
    }

    pub fn has(&self, name: &str) -> bool {
        self.headers.iter().any(|(n, _)| n == name)
    }
}

#[derive(Default)]
struct BackendState {
    requests: Mutex<Vec<Recorded>>,
    /// TCP connections accepted.
    connections: AtomicUsize,
    hits: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    /// Added to every answer.
    delay: Mutex<Duration>,
}

/// A real HTTP/1.1 upstream server on 127.0.0.1.
///
/// Paths: default -> 200, body = name, header `x-backend: name`; `/echo` streams the
/// request body back; `/sink` reads the body and answers `BYTES pattern|corrupt`; `/big?mb=N`
/// streams N MiB of the test pattern in 64 KiB chunks; `/sleep?ms=N`;
/// `/status?code=N`; `/trailers` (chunked, trailer `x-checksum`); `/hop` (answers with
/// hop-by-hop headers); `/ws` (WebSocket echo).
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    state: Arc<BackendState>,
    stop: CancellationToken,
}

impl Backend {
    pub async fn start(name: &str) -> Backend {
        Backend::start_with_delay(name, Duration::ZERO).await
    }

    /// A backend that waits `delay` before every answer.
    pub async fn start_with_delay(name: &str, delay: Duration) -> Backend {
        Backend::serve(TcpListener::bind("127.0.0.1:0").await.unwrap(), name, delay)
    }

    /// A backend at `addr` (a port that refused until now).
    /// A backend listening on a socket the test bound (and kept) beforehand.
    pub fn start_on(name: &str, socket: tokio::net::TcpSocket) -> Backend {
        Backend::serve(socket.listen(1024).unwrap(), name, Duration::ZERO)
    }

    fn serve(listener: TcpListener, name: &str, delay: Duration) -> Backend {
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(BackendState { delay: Mutex::new(delay), ..Default::default() });
        let stop = CancellationToken::new();
        let (st, name2, stop2) = (Arc::clone(&state), name.to_string(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    () = stop2.cancelled() => return,
                    r = listener.accept() => match r { Ok(c) => c, Err(_) => continue },
                };
                stream.set_nodelay(true).ok();
                st.connections.fetch_add(1, Ordering::SeqCst);
                let (st, name, stop) = (Arc::clone(&st), name2.clone(), stop2.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let (st, name) = (Arc::clone(&st), name.clone());
                        async move { Ok::<_, Infallible>(handle(st, name, req).await) }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades();
                    tokio::select! {
                        _ = conn => {}
                        () = stop.cancelled() => {}
                    }
                });
            }
        });
        Backend { name: name.to_string(), addr, state, stop }
    }

    /// Closes the listener and every connection: the port refuses from now on.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    pub fn hits(&self) -> usize {
        self.state.hits.load(Ordering::SeqCst)
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().unwrap().clone()
    }

    pub fn last(&self) -> Recorded {
        self.requests().pop().expect("backend saw no request")
    }

    pub fn max_in_flight(&self) -> usize {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }

    /// Requests the backend is working on now.
    pub fn in_flight(&self) -> usize {
        self.state.in_flight.load(Ordering::SeqCst)
    }

    pub fn set_delay(&self, d: Duration) {
        *self.state.delay.lock().unwrap() = d;
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

struct InFlightGuard(Arc<BackendState>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

fn query_param(uri: &hyper::Uri, key: &str) -> Option<u64> {
    uri.query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| v.parse().ok()).flatten()
    })
}

async fn handle(st: Arc<BackendState>, name: String, mut req: Request<Incoming>) -> Response<Body> {
    st.hits.fetch_add(1, Ordering::SeqCst);
    let now = st.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    st.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let _guard = InFlightGuard(Arc::clone(&st));
    let path = req.uri().path().to_string();
    let mut rec = Recorded {
        method: req.method().to_string(),
        uri: req.uri().path_and_query().map_or_else(|| "/".to_string(), |p| p.to_string()),
        version: req.version(),
        headers: req
            .headers()
            .iter()
            .map(|(n, v)| (n.as_str().to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
            .collect(),
        body: Bytes::new(),
        trailers: None,
    };
    let delay = *st.delay.lock().unwrap();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let base = |status: u16, body: Body| {
        let mut r = Response::new(body);
        *r.status_mut() = StatusCode::from_u16(status).unwrap();
        r.headers_mut().insert("x-backend", HeaderValue::from_str(&name).unwrap());
        r
    };
    match path.as_str() {
        "/echo" => {
            st.requests.lock().unwrap().push(rec);
            let body = req.into_body().map_err(|e| -> BoxError { Box::new(e) }).boxed();
            return base(200, body);
        }
        "/sink" => {
            st.requests.lock().unwrap().push(rec);
            let mut body = req.into_body();
            let (mut n, mut ok) = (0u64, true);
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => {
                        if let Some(d) = f.data_ref() {
                            ok &= is_pattern(n, d);
                            n += d.len() as u64;
                        }
                    }
                    Err(_) => return base(400, full("body error")),
                }
            }
            return base(200, full(format!("{n} {}", if ok { "pattern" } else { "corrupt" })));
        }
        "/ws" => {
            st.requests.lock().unwrap().push(rec);
            let key = req.headers().get("sec-websocket-key").cloned();
            let upgrade = req
                .headers()
                .get(hyper::header::UPGRADE)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
            let Some(key) = key.filter(|_| upgrade) else {
                return base(400, full("not a websocket request"));
            };
            let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
            let on_upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let Ok(up) = on_upgrade.await else { return };
                let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                    TokioIo::new(up),
                    tokio_tungstenite::tungstenite::protocol::Role::Server,
                    None,
                )
                .await;
                let (mut tx, mut rx) = ws.split();
                while let Some(Ok(msg)) = rx.next().await {
                    if msg.is_text() || msg.is_binary() {
                        if tx.send(msg).await.is_err() {
                            break;
                        }
                    } else if msg.is_close() {
                        let _ = tx.close().await;
                        break;
                    }
                }
            });
            let mut r = base(101, empty());
            let h = r.headers_mut();
            h.insert(hyper::header::UPGRADE, HeaderValue::from_static("websocket"));
            h.insert(hyper::header::CONNECTION, HeaderValue::from_static("Upgrade"));
            h.insert("sec-websocket-accept", HeaderValue::from_str(&accept).unwrap());
            return r;
        }
        _ => {}
    }
    // Every other path records its body (up to 4 MiB) first.
    let uri = req.uri().clone();
    let collected = match req.into_body().collect().await {
        Ok(c) => c,
        Err(_) => {
            rec.body = Bytes::from_static(b"<body error>");
            st.requests.lock().unwrap().push(rec);
            return base(400, full("body error"));
        }
    };
    rec.trailers = collected.trailers().cloned();
    let body = collected.to_bytes();
    rec.body = if body.len() <= 4 << 20 { body } else { Bytes::new() };
    st.requests.lock().unwrap().push(rec);
    match path.as_str() {
        "/big" => {
            let mb = query_param(&uri, "mb").unwrap_or(1);
            let total = mb << 20;
            let mut r = base(200, pattern_body(total, 64 * 1024));
            r.headers_mut().insert(hyper::header::CONTENT_LENGTH, HeaderValue::from(total));
            r
        }
        "/sleep" => {
            let ms = query_param(&uri, "ms").unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            base(200, full(name.clone()))
        }
        "/status" => {
            let code = query_param(&uri, "code").unwrap_or(200) as u16;
            base(code, full(name.clone()))
        }
        "/trailers" => {
            let mut trailers = HeaderMap::new();
            trailers.insert("x-checksum", HeaderValue::from_static("abc123"));
            let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
                Ok(Frame::data(Bytes::from_static(b"hello "))),
                Ok(Frame::data(Bytes::from_static(b"world"))),
                Ok(Frame::trailers(trailers)),
            ];
            let mut r = base(200, BodyExt::boxed(StreamBody::new(futures_util::stream::iter(frames))));
            r.headers_mut().insert(hyper::header::TRAILER, HeaderValue::from_static("x-checksum"));
            r
        }
        "/hop" => {
            let mut r = base(200, full(name.clone()));
            let h = r.headers_mut();
            h.insert(hyper::header::CONNECTION, HeaderValue::from_static("X-Private, X-Other"));
            h.insert("x-private", HeaderValue::from_static("secret"));
            h.insert("x-other", HeaderValue::from_static("other"));
            h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
            h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
            h.insert(hyper::header::UPGRADE, HeaderValue::from_static("h2c"));
            h.insert("x-kept", HeaderValue::from_static("yes"));
            r
        }
        _ => base(200, full(name.clone())),
    }
}

// ---------------------------------------------------------------------------------------
// TLS
// ---------------------------------------------------------------------------------------

/// A test certificate authority.
pub struct Pki {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pub ca_pem: String,
    pub ca_der: rustls::pki_types::CertificateDer<'static>,
}

impl Pki {
    pub fn new() -> Pki {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, "swarmgate test CA");
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).unwrap();
        Pki { ca_pem: cert.pem(), ca_der: cert.der().clone(), issuer: rcgen::Issuer::new(params, key) }
    }

    /// A leaf certificate for `names`: (chain PEM, key PEM).
    pub fn leaf(&self, names: &[&str]) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(names.clone()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, names.first().cloned().unwrap_or_default());
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    pub fn roots(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der.clone()).unwrap();
        roots
    }
}

impl Default for Pki {
    fn default() -> Self {
        Pki::new()
    }
}

/// How a test client connects over TLS.
#[derive(Clone)]
pub struct TlsOpts {
    /// The server name sent; `None` sends no SNI.
    pub sni: Option<String>,
    pub alpn: Vec<Vec<u8>>,
    pub tls12_only: bool,
    pub tls13_only: bool,
    /// Verify the chain against these roots and the name against `sni`; `None` accepts
    /// any certificate (the test then looks at its names itself).
    pub roots: Option<rustls::RootCertStore>,
}

impl TlsOpts {
    pub fn sni(name: &str) -> TlsOpts {
        TlsOpts {
            sni: Some(name.into()),
            alpn: vec![b"http/1.1".to_vec()],
            tls12_only: false,
            tls13_only: false,
            roots: None,
        }
    }

    pub fn verified(mut self, pki: &Pki) -> TlsOpts {
        self.roots = Some(pki.roots());
        self
    }

    pub fn alpn(mut self, protos: &[&[u8]]) -> TlsOpts {
        self.alpn = protos.iter().map(|p| p.to_vec()).collect();
        self
    }

    pub fn no_sni() -> TlsOpts {
        TlsOpts { sni: None, ..TlsOpts::sni("unused.invalid") }
    }
}

/// What a handshake showed.
#[derive(Debug, Clone)]
pub struct TlsInfo {
    /// DNS names in the peer certificate's subjectAltName.
    pub san: Vec<String>,
    pub alpn: Option<Vec<u8>>,
    pub version: Option<rustls::ProtocolVersion>,
}

pub type ClientTls = tokio_rustls::client::TlsStream<TcpStream>;

pub async fn tls_connect(addr: SocketAddr, opts: &TlsOpts) -> std::io::Result<(ClientTls, TlsInfo)> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions: &[&'static rustls::SupportedProtocolVersion] = if opts.tls12_only {
        &[&rustls::version::TLS12]
    } else if opts.tls13_only {
        &[&rustls::version::TLS13]
    } else {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    };
    let builder =
        rustls::ClientConfig::builder_with_provider(Arc::clone(&provider)).with_protocol_versions(versions).unwrap();
    let mut config = match &opts.roots {
        Some(roots) => builder.with_root_certificates(roots.clone()).with_no_client_auth(),
        None => {
            builder.dangerous().with_custom_certificate_verifier(Arc::new(AcceptAny(provider))).with_no_client_auth()
        }
    };
    config.alpn_protocols = opts.alpn.clone();
    config.enable_sni = opts.sni.is_some();
    let name = opts.sni.clone().unwrap_or_else(|| "no-sni.invalid".into());
    let server_name = rustls::pki_types::ServerName::try_from(name).unwrap();
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true).ok();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let stream = tokio::time::timeout(Duration::from_secs(5), connector.connect(server_name, tcp))
        .await
        .map_err(|_| std::io::Error::other("TLS handshake timed out"))??;
    let (_, session) = stream.get_ref();
    let san = session.peer_certificates().and_then(|c| c.first()).map(|c| san_names(c.as_ref())).unwrap_or_default();
    let info = TlsInfo { san, alpn: session.alpn_protocol().map(<[u8]>::to_vec), version: session.protocol_version() };
    Ok((stream, info))
}

/// The DNS (and IP) names in a DER certificate's subjectAltName.
pub fn san_names(der: &[u8]) -> Vec<String> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).unwrap();
    let mut out = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(d) => out.push(d.to_string()),
                GeneralName::IPAddress(b) if b.len() == 4 => {
                    out.push(std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]).to_string())
                }
                GeneralName::IPAddress(b) if b.len() == 16 => {
                    let a: [u8; 16] = (*b).try_into().unwrap();
                    out.push(std::net::Ipv6Addr::from(a).to_string())
                }
                _ => {}
            }
        }
    }
    out
}

/// Accepts every certificate (signatures are still checked).
#[derive(Debug)]
struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// HTTPS GET over a fresh connection: the response and the handshake facts.
pub async fn https_get(addr: SocketAddr, opts: &TlsOpts, host: &str, path: &str) -> std::io::Result<(Resp, TlsInfo)> {
    let (stream, info) = tls_connect(addr, opts).await?;
    let resp = if info.alpn.as_deref() == Some(b"h2") {
        H2::over(stream).await.get(host, path).await
    } else {
        H1::over(stream).await.get(host, path).await
    };
    Ok((resp, info))
}

/// A header name (for building requests).
pub fn hn(name: &'static str) -> HeaderName {
    HeaderName::from_static(name)
}

/// A response read raw: status, header lines in order (names lower case), body bytes.
#[derive(Debug)]
pub struct RawResp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    pub fn has(&self, name: &str) -> bool {
        self.headers.iter().any(|(n, _)| n == name)
    }
}

/// Parses the first response of raw bytes (the body is whatever follows the head).
pub fn parse_raw(raw: &[u8]) -> RawResp {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no complete head in {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status = status_line.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("status");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    RawResp { status, headers, body: raw[end + 4..].to_vec() }
}

/// A server that reads each request head and closes the connection without answering
/// (a crashed or reset replica). Records what it read.
pub struct Broken {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Vec<u8>>>>,
    stop: CancellationToken,
}

impl Broken {
    pub async fn start() -> Broken {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let (seen2, stop2) = (Arc::clone(&seen), stop.clone());
        tokio::spawn(async move {
            loop {
                let (mut s, _) = tokio::select! {
                    () = stop2.cancelled() => return,
                    r = listener.accept() => match r { Ok(c) => c, Err(_) => continue },
                };
                let seen = Arc::clone(&seen2);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 8192];
                    loop {
                        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk)).await {
                            Ok(Ok(n)) if n > 0 => {
                                buf.extend_from_slice(&chunk[..n]);
                                if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                                    break;
                                }
                            }
                            _ => break,
                        }
                    }
                    // Whatever of the body came with the head is kept too.
                    if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(20), s.read(&mut chunk)).await {
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    seen.lock().unwrap().push(buf);
                    // Dropping the stream closes it without a response.
                });
            }
        });
        Broken { addr, seen, stop }
    }

    pub fn hits(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// The raw bytes each connection sent before it was closed.
    pub fn seen(&self) -> Vec<Vec<u8>> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Broken {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
