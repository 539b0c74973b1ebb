//! The store every replica shares: Redis (`[acme].storage = "redis://…"`, `rediss://` for TLS).
//!
//! Layout (all under the `swarmgate:` prefix of the URL's database):
//! - `swarmgate:v:KEY`: a value (`KEY` as in [`Storage`], e.g. `certs/NAME.pem`);
//! - `swarmgate:fence:KEY`: the greatest fencing token a fenced write to `KEY` used;
//! - `swarmgate:lock:NAME`: a lease, `SET NX PX` with the holder's random id as value;
//! - `swarmgate:counter`: fencing tokens (`INCR`), granted in the same Lua script as the
//!   lease so a later grant always carries a greater token;
//! - `swarmgate:challenge:http-01:TOKEN`, `swarmgate:challenge:tls-alpn-01:NAME`: challenge
//!   answers with a TTL, so any replica answers a validation another one started;
//! - channel `swarmgate:events`: [`Event`]s (a certificate was stored), JSON.
//!
//! Renew, unlock and fenced writes are Lua scripts that check the holder (or the stored
//! fence) and act in one step. Every call has a 2 s connect and response timeout; a broken
//! connection is dropped and made again by the next call, so an outage costs failed store
//! calls (retried by the manager with back-off), never a stuck task. One task per store
//! keeps a pub/sub subscription, reconnecting with back-off, and sends [`Event::Resync`]
//! after each (re)subscription because messages sent meanwhile are lost.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use futures_util::StreamExt as _;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Script};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::responder::{Answer, LocalPublisher, Publisher};
use super::storage::{Event, Lease, Storage, StorageError, StoreCounters, holder_id, unix_ms, valid_key};

const PREFIX: &str = "swarmgate:";
const CHANNEL: &str = "swarmgate:events";
/// Connect and response timeout of every call.
const TIMEOUT: Duration = Duration::from_secs(2);
/// Leases last this long unless renewed (every third of it): a replica that dies holding
/// one loses it this long after its last renewal.
pub const LEASE_TTL: Duration = Duration::from_secs(10);
/// Challenge answers expire on their own (an order never takes this long).
const ANSWER_TTL: Duration = Duration::from_secs(600);

const LOCK: &str = r"
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return false end
return redis.call('INCR', KEYS[2])
";
const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
";
const UNLOCK: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";
const RENAME: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('RENAME', KEYS[1], KEYS[2])
return 1
";
const PUT_FENCED: &str = r"
local current = tonumber(redis.call('GET', KEYS[2]) or '0')
if current > tonumber(ARGV[2]) then return current end
redis.call('SET', KEYS[2], ARGV[2])
redis.call('SET', KEYS[1], ARGV[1])
return -1
";

/// A Redis store (cheap to clone: one shared connection).
#[derive(Clone)]
pub struct RedisStorage {
    inner: Arc<Inner>,
}

struct Inner {
    client: redis::Client,
    describe: String,
    conn: tokio::sync::Mutex<Option<MultiplexedConnection>>,
    counters: Arc<StoreCounters>,
    events: broadcast::Sender<Event>,
    subscribed: std::sync::Once,
    /// Stops the subscriber task when the store is dropped (a reload changed it).
    stop: CancellationToken,
    scripts: Scripts,
}

struct Scripts {
    lock: Script,
    renew: Script,
    unlock: Script,
    put_fenced: Script,
    rename: Script,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl std::fmt::Debug for RedisStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStorage").field("url", &self.inner.describe).finish_non_exhaustive()
    }
}

/// A URL without its password, for logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***@{}", &url[..s], &url[at + 1..]),
        _ => url.to_string(),
    }
}

/// Whether a `[acme].storage` value names Redis rather than a directory.
pub fn is_redis_url(spec: &str) -> bool {
    spec.starts_with("redis://") || spec.starts_with("rediss://")
}

fn backend(e: &redis::RedisError) -> StorageError {
    StorageError::Backend(format!("redis: {e}"))
}

impl RedisStorage {
    /// Parses the URL; connects lazily (at the first call), so a replica starts while
    /// Redis is down. `ca_pem`: trust only these roots for `rediss://` (tests); without
    /// it the system store is used (`SSL_CERT_FILE`/`SSL_CERT_DIR` are honoured).
    pub fn open(url: &str, ca_pem: Option<Vec<u8>>, counters: Arc<StoreCounters>) -> Result<RedisStorage, String> {
        // The Redis client's TLS takes rustls's process-wide provider: make sure there is one.
        crate::install_crypto_provider();
        let described = redact(url);
        let client = match ca_pem {
            Some(pem) => {
                redis::Client::build_with_tls(url, redis::TlsCertificates { client_tls: None, root_cert: Some(pem) })
            }
            None => redis::Client::open(url),
        }
        .map_err(|e| format!("[acme].storage {described}: {e}"))?;
        let (events, _) = broadcast::channel(256);
        Ok(RedisStorage {
            inner: Arc::new(Inner {
                client,
                describe: described,
                conn: tokio::sync::Mutex::new(None),
                counters,
                events,
                subscribed: std::sync::Once::new(),
                stop: CancellationToken::new(),
                scripts: Scripts {
                    lock: Script::new(LOCK),
                    renew: Script::new(RENEW),
                    unlock: Script::new(UNLOCK),
                    put_fenced: Script::new(PUT_FENCED),
                    rename: Script::new(RENAME),
                },
            }),
        })
    }

    pub fn counters(&self) -> &Arc<StoreCounters> {
        &self.inner.counters
    }

    fn config() -> AsyncConnectionConfig {
        AsyncConnectionConfig::new().set_connection_timeout(Some(TIMEOUT)).set_response_timeout(Some(TIMEOUT))
    }

    /// The shared connection, made on first use and after a failure.
    async fn conn(&self) -> Result<MultiplexedConnection, StorageError> {
        let mut slot = self.inner.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let made = tokio::time::timeout(
            TIMEOUT,
            self.inner.client.get_multiplexed_async_connection_with_config(&Self::config()),
        )
        .await;
        match made {
            Ok(Ok(c)) => {
                *slot = Some(c.clone());
                Ok(c)
            }
            Ok(Err(e)) => {
                self.inner.counters.record(&self.inner.describe, false, Some(&e.to_string()));
                Err(backend(&e))
            }
            Err(_) => {
                let msg = format!("no connection within {}s", TIMEOUT.as_secs());
                self.inner.counters.record(&self.inner.describe, false, Some(&msg));
                Err(StorageError::Backend(format!("redis: {msg}")))
            }
        }
    }

    /// Runs one call on the shared connection; records the outcome and drops a broken
    /// connection so the next call makes a new one.
    async fn call<T, F, Fut>(&self, f: F) -> Result<T, StorageError>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let conn = self.conn().await?;
        match f(conn).await {
            Ok(v) => {
                self.inner.counters.record(&self.inner.describe, true, None);
                Ok(v)
            }
            Err(e) => {
                if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_unrecoverable_error() {
                    *self.inner.conn.lock().await = None;
                }
                self.inner.counters.record(&self.inner.describe, false, Some(&e.to_string()));
                Err(backend(&e))
            }
        }
    }

    /// Runs a Lua script (EVALSHA, loading it when Redis does not know it yet).
    async fn script<T: redis::FromRedisValue>(
        &self,
        script: &Script,
        keys: &[&str],
        args: &[&[u8]],
    ) -> Result<T, StorageError> {
        self.call(|mut c| async move {
            let mut invocation = script.prepare_invoke();
            for k in keys {
                invocation.key(*k);
            }
            for a in args {
                invocation.arg(*a);
            }
            invocation.invoke_async(&mut c).await
        })
        .await
    }

    fn value_key(key: &str) -> Result<String, StorageError> {
        if valid_key(key) { Ok(format!("{PREFIX}v:{key}")) } else { Err(StorageError::InvalidKey(key.to_string())) }
    }

    fn lock_key(name: &str) -> Result<String, StorageError> {
        if valid_key(name) && !name.contains('/') {
            Ok(format!("{PREFIX}lock:{name}"))
        } else {
            Err(StorageError::InvalidKey(name.to_string()))
        }
    }

    fn answer_key(answer: &Answer) -> String {
        match answer {
            Answer::Http01 { token, .. } => format!("{PREFIX}challenge:http-01:{token}"),
            Answer::TlsAlpn01 { name, .. } => format!("{PREFIX}challenge:tls-alpn-01:{}", name.to_ascii_lowercase()),
        }
    }

    /// Stores a challenge answer for every replica (expires after 10 minutes).
    pub async fn put_answer(&self, answer: &Answer) -> Result<(), StorageError> {
        let key = Self::answer_key(answer);
        let value: Vec<u8> = match answer {
            Answer::Http01 { key_authorization, .. } => key_authorization.as_bytes().to_vec(),
            Answer::TlsAlpn01 { digest, .. } => digest.clone(),
        };
        self.call(|mut c| async move {
            redis::cmd("SET")
                .arg(&key)
                .arg(value)
                .arg("PX")
                .arg(ANSWER_TTL.as_millis() as u64)
                .query_async(&mut c)
                .await
        })
        .await
    }

    pub async fn delete_answer(&self, answer: &Answer) -> Result<(), StorageError> {
        let key = Self::answer_key(answer);
        self.call(|mut c| async move { redis::cmd("DEL").arg(&key).query_async(&mut c).await }).await
    }

    /// The key authorization another replica published for an HTTP-01 token.
    pub async fn http01_answer(&self, token: &str) -> Option<String> {
        if !valid_key(token) || token.contains('/') {
            return None;
        }
        let key = format!("{PREFIX}challenge:http-01:{token}");
        let got: Option<String> =
            self.call(|mut c| async move { redis::cmd("GET").arg(&key).query_async(&mut c).await }).await.ok()?;
        got
    }

    /// The key authorization digest another replica published for a TLS-ALPN-01 name.
    pub async fn tls_alpn01_answer(&self, name: &str) -> Option<Vec<u8>> {
        let name = name.to_ascii_lowercase();
        if !valid_key(&name) || name.contains('/') {
            return None;
        }
        let key = format!("{PREFIX}challenge:tls-alpn-01:{name}");
        let got: Option<Vec<u8>> =
            self.call(|mut c| async move { redis::cmd("GET").arg(&key).query_async(&mut c).await }).await.ok()?;
        got.filter(|d| d.len() == 32)
    }

    /// Starts the subscriber task (once, on the current runtime).
    fn subscribe(&self) {
        self.inner.subscribed.call_once(|| {
            let client = self.inner.client.clone();
            let events = self.inner.events.clone();
            let stop = self.inner.stop.clone();
            let counters = Arc::clone(&self.inner.counters);
            let describe = self.inner.describe.clone();
            tokio::spawn(subscriber(client, events, stop, counters, describe));
        });
    }
}

/// Keeps one subscription to [`CHANNEL`], forwarding its events; reconnects with
/// back-off (0.5 s doubling to 5 s) and sends `Resync` after every subscription.
async fn subscriber(
    client: redis::Client,
    events: broadcast::Sender<Event>,
    stop: CancellationToken,
    counters: Arc<StoreCounters>,
    describe: String,
) {
    let mut delay = Duration::from_millis(500);
    loop {
        let attempt = async {
            let mut pubsub = tokio::time::timeout(TIMEOUT, client.get_async_pubsub())
                .await
                .map_err(|_| format!("no connection within {}s", TIMEOUT.as_secs()))?
                .map_err(|e| e.to_string())?;
            tokio::time::timeout(TIMEOUT, pubsub.subscribe(CHANNEL))
                .await
                .map_err(|_| "SUBSCRIBE timed out".to_string())?
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(pubsub)
        };
        let result = tokio::select! {
            () = stop.cancelled() => return,
            r = attempt => r,
        };
        match result {
            Ok(pubsub) => {
                counters.record(&describe, true, None);
                tracing::debug!(store = %describe, "subscribed to ACME events");
                delay = Duration::from_millis(500);
                let _ = events.send(Event::Resync);
                let mut stream = pubsub.into_on_message();
                loop {
                    let msg = tokio::select! {
                        () = stop.cancelled() => return,
                        m = stream.next() => m,
                    };
                    let Some(msg) = msg else { break };
                    match serde_json::from_slice::<Event>(msg.get_payload_bytes()) {
                        Ok(ev) => {
                            let _ = events.send(ev);
                        }
                        Err(e) => tracing::debug!("ignoring an unreadable ACME event: {e}"),
                    }
                }
                counters.record(&describe, false, Some("the event subscription was closed"));
            }
            Err(e) => counters.record(&describe, false, Some(&e)),
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

#[async_trait]
impl Storage for RedisStorage {
    fn describe(&self) -> String {
        self.inner.describe.clone()
    }

    fn lease_ttl(&self) -> Duration {
        LEASE_TTL
    }

    fn shared(&self) -> bool {
        true
    }

    fn events(&self) -> Option<broadcast::Receiver<Event>> {
        let rx = self.inner.events.subscribe();
        self.subscribe();
        Some(rx)
    }

    async fn announce(&self, event: &Event) -> Result<(), StorageError> {
        let payload = serde_json::to_vec(event).map_err(|e| StorageError::Backend(e.to_string()))?;
        self.call(|mut c| async move { redis::cmd("PUBLISH").arg(CHANNEL).arg(payload).query_async(&mut c).await })
            .await
            .map(|_: i64| ())
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        let key = Self::value_key(key)?;
        self.call(|mut c| async move { redis::cmd("GET").arg(&key).query_async(&mut c).await }).await
    }

    async fn put(&self, key: &str, value: &[u8]) -> Result<(), StorageError> {
        let key = Self::value_key(key)?;
        let value = value.to_vec();
        self.call(|mut c| async move { redis::cmd("SET").arg(&key).arg(value).query_async(&mut c).await }).await
    }

    async fn put_fenced(&self, key: &str, value: &[u8], token: u64) -> Result<(), StorageError> {
        let vkey = Self::value_key(key)?;
        let fkey = format!("{PREFIX}fence:{key}");
        let token_arg = token.to_string();
        let current: i64 =
            self.script(&self.inner.scripts.put_fenced, &[&vkey, &fkey], &[value, token_arg.as_bytes()]).await?;
        if current >= 0 {
            return Err(StorageError::Fenced { key: key.to_string(), token, current: current as u64 });
        }
        Ok(())
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        let key = Self::value_key(key)?;
        self.call(|mut c| async move { redis::cmd("DEL").arg(&key).query_async(&mut c).await }).await.map(|_: i64| ())
    }

    /// One script: the value moves whole or not at all.
    async fn rename(&self, key: &str, to: &str) -> Result<bool, StorageError> {
        let (from, to) = (Self::value_key(key)?, Self::value_key(to)?);
        let moved: i64 = self.script(&self.inner.scripts.rename, &[&from, &to], &[]).await?;
        Ok(moved == 1)
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
        let base = format!("{PREFIX}v:");
        let mut pattern = base.clone();
        for ch in prefix.chars() {
            if matches!(ch, '*' | '?' | '[' | ']' | '\\' | '^') {
                pattern.push('\\');
            }
            pattern.push(ch);
        }
        pattern.push('*');
        let mut out: Vec<String> = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let pattern = pattern.clone();
            let (next, keys): (u64, Vec<String>) = self
                .call(|mut c| async move {
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(&pattern)
                        .arg("COUNT")
                        .arg(500)
                        .query_async(&mut c)
                        .await
                })
                .await?;
            out.extend(keys.into_iter().filter_map(|k| k.strip_prefix(&base).map(str::to_string)));
            if next == 0 {
                break;
            }
            cursor = next;
        }
        out.retain(|k| k.starts_with(prefix) && valid_key(k));
        out.sort();
        out.dedup();
        Ok(out)
    }

    async fn lock(&self, name: &str, ttl: Duration) -> Result<Option<Lease>, StorageError> {
        let key = Self::lock_key(name)?;
        let holder = holder_id();
        let ttl_ms = ttl.as_millis().max(1) as u64;
        let counter = format!("{PREFIX}counter");
        let ttl_arg = ttl_ms.to_string();
        let token: Option<u64> =
            self.script(&self.inner.scripts.lock, &[&key, &counter], &[holder.as_bytes(), ttl_arg.as_bytes()]).await?;
        Ok(token.map(|token| Lease {
            name: name.to_string(),
            token,
            expires: from_ms(unix_ms(SystemTime::now()) + ttl_ms),
            holder,
        }))
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Option<Lease>, StorageError> {
        let key = Self::lock_key(&lease.name)?;
        let ttl_ms = ttl.as_millis().max(1) as u64;
        let ttl_arg = ttl_ms.to_string();
        let renewed: i64 =
            self.script(&self.inner.scripts.renew, &[&key], &[lease.holder.as_bytes(), ttl_arg.as_bytes()]).await?;
        Ok((renewed == 1).then(|| Lease { expires: from_ms(unix_ms(SystemTime::now()) + ttl_ms), ..lease.clone() }))
    }

    async fn unlock(&self, lease: &Lease) -> Result<(), StorageError> {
        let key = Self::lock_key(&lease.name)?;
        self.script(&self.inner.scripts.unlock, &[&key], &[lease.holder.as_bytes()]).await.map(|_: i64| ())
    }
}

fn from_ms(ms: u64) -> SystemTime {
    std::time::UNIX_EPOCH + Duration::from_millis(ms)
}

/// Publishes challenge answers to this replica and to the store, where every other
/// replica finds them when a validation request reaches it.
#[derive(Debug, Clone)]
pub struct ClusterPublisher {
    pub local: LocalPublisher,
    pub store: RedisStorage,
}

#[async_trait]
impl Publisher for ClusterPublisher {
    async fn publish(&self, answer: &Answer) -> Result<(), String> {
        self.local.apply(answer)?;
        // The answer must be in the store before the ACME server is told to validate.
        self.store.put_answer(answer).await.map_err(|e| format!("cannot share the answer with the other replicas: {e}"))
    }

    async fn withdraw(&self, answer: &Answer) {
        self.local.remove(answer);
        if let Err(e) = self.store.delete_answer(answer).await {
            tracing::debug!("challenge answer left in the store until it expires: {e}");
        }
    }
}

/// Looks up answers other replicas published; the lookups run on the control runtime
/// (where the store's connection lives), callers may be on any runtime.
#[derive(Debug, Clone)]
pub struct RemoteAnswers {
    pub store: RedisStorage,
    pub handle: tokio::runtime::Handle,
}

impl RemoteAnswers {
    pub async fn http01(&self, token: &str) -> Option<String> {
        let (store, token) = (self.store.clone(), token.to_string());
        self.handle.spawn(async move { store.http01_answer(&token).await }).await.ok().flatten()
    }

    pub async fn tls_alpn01(&self, name: &str) -> Option<Vec<u8>> {
        let (store, name) = (self.store.clone(), name.to_string());
        self.handle.spawn(async move { store.tls_alpn01_answer(&name).await }).await.ok().flatten()
    }
}

/// A `redis-server` of its own for tests: free loopback port, no persistence, killed on
/// drop. Fails (never skips) when Redis is not installed.
#[cfg(test)]
pub(crate) mod test_server {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use std::io::{Read, Write};
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    pub(crate) struct RedisServer {
        child: Child,
        pub(crate) port: u16,
        _dir: tempfile::TempDir,
        /// PEM of the CA that signed the TLS certificate (TLS servers only).
        pub(crate) ca_pem: Option<String>,
    }

    /// A bindable port below the ephemeral range (outgoing connections never take it).
    fn free_port() -> u16 {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let start = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        let _ = NEXT.compare_exchange(0, start % 8000 + 1, Ordering::Relaxed, Ordering::Relaxed);
        loop {
            let port = (21_000 + NEXT.fetch_add(1, Ordering::Relaxed) % 10_000) as u16;
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }

    impl RedisServer {
        pub(crate) fn start() -> RedisServer {
            Self::start_with(None, false)
        }

        /// `password`: `requirepass`; `tls`: TLS only (`rediss://`), certificate for
        /// `localhost`/127.0.0.1 signed by a CA made here.
        pub(crate) fn start_with(password: Option<&str>, tls: bool) -> RedisServer {
            Self::start_on(free_port(), password, tls)
        }

        pub(crate) fn start_on(port: u16, password: Option<&str>, tls: bool) -> RedisServer {
            let dir = tempfile::tempdir().unwrap();
            let mut cmd = Command::new("redis-server");
            cmd.args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]);
            cmd.arg("--dir").arg(dir.path());
            let mut ca_pem = None;
            if tls {
                let (ca, cert, key) = ca_and_leaf();
                std::fs::write(dir.path().join("tls.crt"), cert).unwrap();
                std::fs::write(dir.path().join("tls.key"), key).unwrap();
                cmd.args(["--port", "0", "--tls-port", &port.to_string(), "--tls-auth-clients", "no"]);
                cmd.arg("--tls-cert-file").arg(dir.path().join("tls.crt"));
                cmd.arg("--tls-key-file").arg(dir.path().join("tls.key"));
                ca_pem = Some(ca);
            } else {
                cmd.args(["--port", &port.to_string()]);
            }
            if let Some(pw) = password {
                cmd.args(["--requirepass", pw]);
            }
            let child = match cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn() {
                Ok(c) => c,
                Err(e) => panic!(
                    "cannot run redis-server ({e}): the clustered ACME tests need Redis; install it with \
                     `apt-get install redis-server` (scripts/test.sh does this)"
                ),
            };
            let server = RedisServer { child, port, _dir: dir, ca_pem };
            let deadline = Instant::now() + Duration::from_secs(10);
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                assert!(Instant::now() < deadline, "redis-server did not listen on {port}");
                std::thread::sleep(Duration::from_millis(10));
            }
            if !tls && password.is_none() {
                let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
                s.write_all(b"PING\r\n").unwrap();
                let mut buf = [0u8; 7];
                s.read_exact(&mut buf).unwrap();
                assert_eq!(&buf, b"+PONG\r\n");
            }
            server
        }

        pub(crate) fn url(&self) -> String {
            format!("redis://127.0.0.1:{}/0", self.port)
        }

        pub(crate) fn kill(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    impl Drop for RedisServer {
        fn drop(&mut self) {
            self.kill();
        }
    }

    fn ca_and_leaf() -> (String, String, String) {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
        let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.distinguished_name.push(DnType::CommonName, "redis test CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let leaf = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        let cert = leaf.signed_by(&key, &issuer).unwrap();
        (ca_cert.pem(), cert.pem(), key.serialize_pem())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::test_server::RedisServer;
    use super::*;

    fn open(url: &str) -> RedisStorage {
        RedisStorage::open(url, None, Arc::new(StoreCounters::default())).unwrap()
    }

    #[tokio::test]
    async fn redis_passes_the_contract() {
        let server = RedisServer::start();
        // Two stores, two connections: two replicas.
        let (a, b) = (open(&server.url()), open(&server.url()));
        super::super::contract::run(&a, &b).await.unwrap();
    }

    #[tokio::test]
    async fn rediss_with_a_password_passes_the_contract() {
        let server = RedisServer::start_with(Some("s3cret pass"), true);
        let ca = server.ca_pem.clone().unwrap().into_bytes();
        let url = format!("rediss://:s3cret%20pass@localhost:{}/3", server.port);
        let counters = Arc::new(StoreCounters::default());
        let a = RedisStorage::open(&url, Some(ca.clone()), Arc::clone(&counters)).unwrap();
        let b = RedisStorage::open(&url, Some(ca), Arc::new(StoreCounters::default())).unwrap();
        assert_eq!(a.describe(), format!("rediss://***@localhost:{}/3", server.port));
        super::super::contract::run(&a, &b).await.unwrap();
        assert_eq!(counters.errors.load(std::sync::atomic::Ordering::Relaxed), 0);
        // A wrong password is an error, not a hang.
        let wrong = format!("rediss://:nope@localhost:{}/3", server.port);
        let w = RedisStorage::open(&wrong, server.ca_pem.clone().map(String::into_bytes), Arc::default()).unwrap();
        assert!(matches!(w.get("x").await, Err(StorageError::Backend(_))));
    }

    #[tokio::test]
    async fn the_contract_holds_with_encrypted_values() {
        let server = RedisServer::start();
        let key = super::super::seal::SecretKey::new("k".repeat(40));
        let a = super::super::seal::Sealed::new(Arc::new(open(&server.url())), &key).unwrap();
        let b = super::super::seal::Sealed::new(Arc::new(open(&server.url())), &key).unwrap();
        super::super::contract::run(&a, &b).await.unwrap();
        a.put("certs/x.pem", b"-----BEGIN PRIVATE KEY-----").await.unwrap();
        let raw = open(&server.url());
        let stored = raw.get("certs/x.pem").await.unwrap().unwrap();
        assert!(stored.starts_with(b"swarmgate-sealed-v1\n"), "{stored:?}");
        assert!(!stored.windows(7).any(|w| w == b"PRIVATE"));
    }

    #[tokio::test]
    async fn events_reach_the_other_replicas_and_answers_are_shared() {
        let server = RedisServer::start();
        let (a, b) = (open(&server.url()), open(&server.url()));
        let mut rx = b.events().unwrap();
        // The first event after subscribing is a resync.
        let first = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.unwrap().unwrap();
        assert_eq!(first, Event::Resync);
        let ev = Event::Cert { name: "a.example".into(), by: "r1".into(), at_ms: 5 };
        a.announce(&ev).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.unwrap().unwrap();
        assert_eq!(got, ev);

        let http = Answer::Http01 { token: "tok-1_x".into(), key_authorization: "tok-1_x.thumb".into() };
        let tls = Answer::TlsAlpn01 { name: "App.Example".into(), digest: vec![9; 32] };
        a.put_answer(&http).await.unwrap();
        a.put_answer(&tls).await.unwrap();
        assert_eq!(b.http01_answer("tok-1_x").await.as_deref(), Some("tok-1_x.thumb"));
        assert_eq!(b.tls_alpn01_answer("app.example").await, Some(vec![9; 32]));
        assert_eq!(b.http01_answer("../x").await, None);
        // The request path: local first, then the store; implausible tokens cost no lookup.
        let challenges = super::super::Challenges::default();
        challenges.set_remote(Some(RemoteAnswers { store: b.clone(), handle: tokio::runtime::Handle::current() }));
        let long = Answer::Http01 { token: "T".repeat(43), key_authorization: "from-a".into() };
        a.put_answer(&long).await.unwrap();
        assert_eq!(challenges.answer_anywhere(&"T".repeat(43)).await, Some(("from-a".to_string(), "store")));
        challenges.publish(&"T".repeat(43), "mine");
        assert_eq!(challenges.answer_anywhere(&"T".repeat(43)).await, Some(("mine".to_string(), "local")));
        assert_eq!(challenges.answer_anywhere("tok-1_x").await, None, "too short for an ACME token");
        assert_eq!(challenges.answer_anywhere(&format!("{}.x", "T".repeat(43))).await, None);
        a.delete_answer(&http).await.unwrap();
        assert_eq!(b.http01_answer("tok-1_x").await, None);
    }

    #[tokio::test]
    async fn an_outage_fails_calls_fast_and_the_store_comes_back_by_itself() {
        let mut server = RedisServer::start();
        let port = server.port;
        let counters = Arc::new(StoreCounters::default());
        let s = RedisStorage::open(&server.url(), None, Arc::clone(&counters)).unwrap();
        s.put("k", b"v").await.unwrap();
        assert!(counters.is_up());
        server.kill();
        let started = std::time::Instant::now();
        assert!(matches!(s.get("k").await, Err(StorageError::Backend(_))));
        assert!(matches!(s.lock("l", Duration::from_secs(1)).await, Err(StorageError::Backend(_))));
        assert!(started.elapsed() < Duration::from_secs(3), "failed calls must not hang: {:?}", started.elapsed());
        assert!(!counters.is_up());
        assert!(counters.errors.load(std::sync::atomic::Ordering::Relaxed) >= 2);
        let _again = RedisServer::start_on(port, None, false);
        // The empty new server: the call reconnects and succeeds.
        assert_eq!(s.get("k").await.unwrap(), None);
        assert!(counters.is_up());
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(redact("redis://:pw@h:6379/0"), "redis://***@h:6379/0");
        assert_eq!(redact("rediss://user:p@w@h/1"), "rediss://***@h/1");
        assert_eq!(redact("redis://h:6379/0"), "redis://h:6379/0");
        assert!(is_redis_url("rediss://h") && !is_redis_url("certs/acme"));
    }
}
