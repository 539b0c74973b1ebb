//! Fixtures for clustered ACME tests: a real `redis-server` on a free loopback port and a
//! TCP round-robin balancer that Pebble validates through, so validation requests land on
//! replicas that did not place the order.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{Ports, free_port};

/// `redis-server` on `127.0.0.1:port`, data in its own directory (kept across restarts
/// when saved), killed on drop.
pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    pub dir: PathBuf,
    password: Option<String>,
    tls: Option<(PathBuf, PathBuf)>,
}

impl Redis {
    /// A plain server on a free port.
    pub fn start(dir: &Path) -> Redis {
        Self::start_with(dir, None, None)
    }

    /// `password`: `requirepass`; `tls`: (certificate, key) PEM files: TLS only.
    pub fn start_with(dir: &Path, password: Option<&str>, tls: Option<(PathBuf, PathBuf)>) -> Redis {
        std::fs::create_dir_all(dir).unwrap();
        let mut r = Redis {
            child: None,
            port: free_port(),
            dir: dir.to_path_buf(),
            password: password.map(str::to_string),
            tls,
        };
        r.restart();
        r
    }

    /// Starts (again) on the same port with the same directory.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "redis-server already runs");
        let mut cmd = Command::new("redis-server");
        cmd.args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]);
        cmd.arg("--dir").arg(&self.dir).args(["--dbfilename", "dump.rdb"]);
        match &self.tls {
            Some((cert, key)) => {
                cmd.args(["--port", "0", "--tls-port", &self.port.to_string(), "--tls-auth-clients", "no"]);
                cmd.arg("--tls-cert-file").arg(cert).arg("--tls-key-file").arg(key);
            }
            None => {
                cmd.args(["--port", &self.port.to_string()]);
            }
        }
        if let Some(pw) = &self.password {
            cmd.args(["--requirepass", pw]);
        }
        let log = std::fs::File::create(self.dir.join("redis.log")).unwrap();
        let child = match cmd.stdin(Stdio::null()).stdout(log.try_clone().unwrap()).stderr(log).spawn() {
            Ok(c) => c,
            Err(e) => panic!(
                "cannot run redis-server ({e}): the clustered ACME tests need Redis; install it with \
                 `apt-get install redis-server` (scripts/test.sh does this)"
            ),
        };
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not listen on {}", self.port);
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// A command over a fresh plain connection (plain servers only).
    pub fn cmd(&self, args: &[&str]) -> redis::Value {
        let client = redis::Client::open(self.url()).unwrap();
        let mut con = client.get_connection_with_timeout(Duration::from_secs(5)).unwrap();
        let mut c = redis::cmd(args[0]);
        for a in &args[1..] {
            c.arg(*a);
        }
        c.query(&mut con).unwrap()
    }

    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        match self.cmd(&["GET", key]) {
            redis::Value::BulkString(b) => Some(b),
            _ => None,
        }
    }

    /// Saves the data set (kept for a restart), then kills the server (SIGKILL).
    pub fn save_and_kill(&mut self) {
        self.cmd(&["SAVE"]);
        self.kill();
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Round-robin TCP forwarding: each connection to `http_port` (`https_port`) goes to the
/// next replica's HTTP (HTTPS) listener, skipping replicas that refuse the connection.
/// While `hold` is set, accepted connections wait before being forwarded.
pub struct Balancer {
    pub http_port: u16,
    pub https_port: u16,
    targets: Arc<Mutex<Vec<Ports>>>,
    pub hold: Arc<AtomicBool>,
    /// Connections forwarded, by target index.
    pub forwarded: Arc<Mutex<Vec<usize>>>,
}

impl Balancer {
    /// Listens on free ports; targets are set later with [`Balancer::set_targets`].
    pub fn start() -> Balancer {
        let b = Balancer {
            http_port: 0,
            https_port: 0,
            targets: Arc::new(Mutex::new(Vec::new())),
            hold: Arc::new(AtomicBool::new(false)),
            forwarded: Arc::new(Mutex::new(Vec::new())),
        };
        let http_port = b.listen(false);
        let https_port = b.listen(true);
        Balancer { http_port, https_port, ..b }
    }

    pub fn set_targets(&self, targets: &[Ports]) {
        *self.targets.lock().unwrap() = targets.to_vec();
        self.forwarded.lock().unwrap().resize(targets.len(), 0);
    }

    fn listen(&self, tls: bool) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (targets, hold, forwarded) =
            (Arc::clone(&self.targets), Arc::clone(&self.hold), Arc::clone(&self.forwarded));
        let next = Arc::new(AtomicUsize::new(0));
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let (targets, hold, forwarded, next) =
                    (Arc::clone(&targets), Arc::clone(&hold), Arc::clone(&forwarded), Arc::clone(&next));
                std::thread::spawn(move || {
                    let deadline = Instant::now() + Duration::from_secs(30);
                    while (hold.load(Ordering::SeqCst) || targets.lock().unwrap().is_empty())
                        && Instant::now() < deadline
                    {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    let list = targets.lock().unwrap().clone();
                    let n = next.fetch_add(1, Ordering::SeqCst);
                    for i in 0..list.len() {
                        let idx = (n + i) % list.len();
                        let port = if tls { list[idx].https } else { list[idx].http };
                        if let Ok(upstream) = TcpStream::connect(("127.0.0.1", port)) {
                            forwarded.lock().unwrap()[idx] += 1;
                            pipe(client, upstream);
                            return;
                        }
                    }
                });
            }
        });
        port
    }

    pub fn forwarded(&self) -> Vec<usize> {
        self.forwarded.lock().unwrap().clone()
    }
}

fn pipe(a: TcpStream, b: TcpStream) {
    let (mut a_read, mut b_write) = (a.try_clone().unwrap(), b.try_clone().unwrap());
    let t = std::thread::spawn(move || {
        let _ = copy(&mut a_read, &mut b_write);
        let _ = b_write.shutdown(Shutdown::Write);
    });
    let (mut b_read, mut a_write) = (b, a);
    let _ = copy(&mut b_read, &mut a_write);
    let _ = a_write.shutdown(Shutdown::Write);
    let _ = t.join();
}

fn copy(from: &mut TcpStream, to: &mut TcpStream) -> std::io::Result<()> {
    from.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = from.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        to.write_all(&buf[..n])?;
    }
}

/// Rewrites the `storage = "…"` line of a config written by `write_config`, and appends
/// `extra` lines to its `[acme]` section.
pub fn set_acme(config: &Path, storage: &str, extra: &[String]) {
    let text = std::fs::read_to_string(config).unwrap();
    let mut out = String::new();
    for line in text.lines() {
        if line.starts_with("storage = ") {
            out.push_str(&format!("storage = \"{storage}\"\n"));
            for e in extra {
                out.push_str(e);
                out.push('\n');
            }
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    std::fs::write(config, out).unwrap();
}
