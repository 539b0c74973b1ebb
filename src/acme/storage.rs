//! Where ACME state lives: the account, certificates with their keys, and the locks that
//! keep two gateways from ordering one name at once.
//!
//! [`Storage`] is the seam between the ACME manager and a backend. Today the backend is a
//! directory ([`DirStorage`], `[acme].storage = "certs/acme"`); a store shared by every
//! replica (Redis) implements the same trait and must pass the same contract
//! ([`super::contract::run`]).
//!
//! Semantics every backend keeps:
//! - keys are `/`-separated segments of `[A-Za-z0-9._@+=-]`, none empty, none starting
//!   with `.`; values are bytes; `put` replaces atomically (a reader sees the old or the
//!   new value, never a mix);
//! - `lock(name, ttl)` grants a lease to one holder at a time until it expires; every
//!   lease granted carries a fencing token greater than any token granted before by
//!   this store (renewal keeps the token);
//! - `put_fenced(key, value, token)` refuses to write when a fenced write with a greater
//!   token has already reached `key`, so a holder whose lease expired while it worked can
//!   never overwrite what the next holder wrote.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;

/// Why a storage call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StorageError {
    #[error("invalid storage key or lock name {0:?}")]
    InvalidKey(String),
    #[error("{key}: write refused: fencing token {token} is older than {current}")]
    Fenced { key: String, token: u64, current: u64 },
    #[error("{0}")]
    Backend(String),
    /// A sealed value that does not open with this process's key: sealed with another
    /// `SWARMGATE_ACME_STORAGE_KEY`, or altered (see `seal`).
    #[error("{0}")]
    Sealed(String),
}

/// A granted lock: held until `expires` unless renewed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub name: String,
    /// Fencing token: greater than every token this store granted before.
    pub token: u64,
    pub expires: SystemTime,
    /// Identifies this grant (a random id), so only its holder renews or releases it.
    pub holder: String,
}

/// What replicas sharing a store tell each other (Redis pub/sub; a directory has none).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Event {
    /// A certificate for `name` was stored by replica `by` at `at_ms` (Unix milliseconds).
    Cert { name: String, by: String, at_ms: u64 },
    /// Events may have been missed (the channel was down): read everything again.
    Resync,
}

/// Health of a store, shared with the metrics.
#[derive(Debug)]
pub struct StoreCounters {
    /// Failed store calls (connection refused, timeouts, server errors).
    pub errors: std::sync::atomic::AtomicU64,
    /// 1 while the last call (or the event channel) reached the store, else 0.
    pub up: std::sync::atomic::AtomicU64,
    /// Times a lease (a name's or the account's) was held by another replica and this
    /// one waited for it.
    pub lock_waits: std::sync::atomic::AtomicU64,
}

impl Default for StoreCounters {
    fn default() -> Self {
        StoreCounters { errors: 0.into(), up: 1.into(), lock_waits: 0.into() }
    }
}

impl StoreCounters {
    /// Records the outcome of a call; logs when the store becomes unreachable or comes back.
    pub fn record(&self, what: &str, ok: bool, error: Option<&str>) {
        use std::sync::atomic::Ordering;
        if ok {
            if self.up.swap(1, Ordering::Relaxed) == 0 {
                tracing::info!(store = what, "ACME store reachable again: issuance and renewal resume");
            }
        } else {
            self.errors.fetch_add(1, Ordering::Relaxed);
            if self.up.swap(0, Ordering::Relaxed) == 1 {
                tracing::error!(
                    store = what,
                    error = error.unwrap_or(""),
                    "ACME store unreachable: certificates already loaded keep serving; issuance and renewal wait for it"
                );
            }
        }
    }

    pub fn is_up(&self) -> bool {
        self.up.load(std::sync::atomic::Ordering::Relaxed) == 1
    }
}

/// How a store that seals keeps a value (see `seal`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sealing {
    /// In the clear: stored before the store's key was set.
    Clear,
    /// Sealed, and opens with the store's key.
    Opens,
    /// Sealed with another key, or altered.
    DoesNotOpen,
}

/// The ACME manager's view of a store (a directory, or Redis shared by every replica).
#[async_trait]
pub trait Storage: Send + Sync + std::fmt::Debug {
    /// Where the data is, for logs (`certs/acme`, `redis://host/0`).
    fn describe(&self) -> String;
    /// How long a lease lasts unless renewed (renewed every third of it while held).
    fn lease_ttl(&self) -> Duration {
        Duration::from_secs(120)
    }
    /// Whether other replicas share this store and talk through [`Storage::events`].
    fn shared(&self) -> bool {
        false
    }
    /// Events from replicas sharing the store, or `None` for a store nobody else watches.
    fn events(&self) -> Option<tokio::sync::broadcast::Receiver<Event>> {
        None
    }
    /// Tells every replica sharing the store (best effort; a no-op without a channel).
    async fn announce(&self, _event: &Event) -> Result<(), StorageError> {
        Ok(())
    }
    /// Where a key is kept, for operators (a file path for a directory).
    fn locate(&self, key: &str) -> String {
        format!("{}:{key}", self.describe())
    }
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError>;
    async fn put(&self, key: &str, value: &[u8]) -> Result<(), StorageError>;
    /// `put` unless a fenced write with a greater token already reached `key`
    /// ([`StorageError::Fenced`]). An equal token may write again.
    async fn put_fenced(&self, key: &str, value: &[u8], token: u64) -> Result<(), StorageError>;
    /// Removes `key`; a missing key is not an error.
    async fn delete(&self, key: &str) -> Result<(), StorageError>;
    /// Moves the value at `key` to `to` as it is stored, whole or not at all (a file set
    /// aside); false when there was none.
    async fn rename(&self, key: &str, to: &str) -> Result<bool, StorageError>;
    /// How the value at `key` is kept by a store that seals (see `seal`); `None` when
    /// there is no value or the store does not seal.
    async fn sealing(&self, _key: &str) -> Result<Option<Sealing>, StorageError> {
        Ok(None)
    }
    /// Whether the value at `key` is sealed and opens with this store's key; false for a
    /// store that does not seal.
    async fn opens_sealed(&self, key: &str) -> Result<bool, StorageError> {
        Ok(self.sealing(key).await? == Some(Sealing::Opens))
    }
    /// Every key starting with `prefix`, sorted.
    async fn list(&self, prefix: &str) -> Result<Vec<String>, StorageError>;
    /// A lease on `name` for `ttl`, or `None` while someone else holds it.
    async fn lock(&self, name: &str, ttl: Duration) -> Result<Option<Lease>, StorageError>;
    /// Extends a lease still held (same token); `None` when it was lost.
    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Option<Lease>, StorageError>;
    /// Releases a lease if it is still held by this grant.
    async fn unlock(&self, lease: &Lease) -> Result<(), StorageError>;
}

/// Checks a key: `/`-separated segments of `[A-Za-z0-9._@+=-]`, none empty or hidden.
pub fn valid_key(key: &str) -> bool {
    !key.is_empty() && key.split('/').all(valid_segment)
}

fn valid_segment(s: &str) -> bool {
    !s.is_empty() && !s.starts_with('.') && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._@+=-".contains(&b))
}

/// A fresh id for a lease holder: `HOST/PID/RANDOM`.
pub fn holder_id() -> String {
    format!("{}/{}/{:016x}", this_host().unwrap_or("unknown"), std::process::id(), rand::random::<u64>())
}

/// This replica's id when `[acme].replica_id` is not set: `HOST/PID`.
pub fn default_replica_id() -> String {
    format!("{}/{}", this_host().unwrap_or("unknown"), std::process::id())
}

fn this_host() -> Option<&'static str> {
    static HOST: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    HOST.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty() && !h.contains('/'))
    })
    .as_deref()
}

/// Whether a holder id names a process of this host (same hostname, so the same PID
/// namespace in practice) that no longer runs: its lease can be taken at once instead
/// of after its TTL (a gateway killed in the middle of an order, then restarted). A
/// holder with this process's PID is never judged gone: a container restarted with the
/// same hostname and PID 1 cannot be told from another one sharing both, so such a
/// lease is waited out (its TTL, 2 minutes).
fn holder_is_gone(holder: &str) -> bool {
    let mut parts = holder.splitn(3, '/');
    let (Some(host), Some(pid)) = (parts.next(), parts.next()) else {
        return false;
    };
    let Ok(pid) = pid.parse::<u32>() else { return false };
    this_host() == Some(host)
        && pid != std::process::id()
        && Path::new("/proc/self").exists()
        && !Path::new(&format!("/proc/{pid}")).exists()
}

pub(crate) fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn from_unix_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

// ---------------------------------------------------------------------------------------

/// Storage in a directory: one file per key (mode 0600, written through a temp file and a
/// rename), and a hidden `.meta/` with the locks, the fencing counter and the per-key
/// fencing tokens.
///
/// Layout under the root:
/// - `KEY` (e.g. `accounts/…json`, `certs/NAME.pem`): the value;
/// - `.meta/counter`: the last fencing token granted;
/// - `.meta/locks/NAME`: `{"token":…,"holder":…,"expires_ms":…}` of the lease;
/// - `.meta/fence/KEY`: the greatest token a fenced write to KEY used;
/// - `.meta/mutex`: exists while one process runs a critical section (a few file
///   operations); created with `O_EXCL`, broken when older than [`MUTEX_STALE`] (its
///   holder died inside the section).
///
/// Two processes on one host sharing the directory are serialised by the mutex file;
/// tasks of one process also by an in-process mutex. A lease whose holder was a process
/// of this host that no longer runs (killed mid-order) is taken over before its TTL.
#[derive(Debug, Clone)]
pub struct DirStorage {
    inner: Arc<DirInner>,
}

#[derive(Debug)]
struct DirInner {
    root: PathBuf,
    local: std::sync::Mutex<()>,
}

/// A mutex file older than this is taken to belong to a process that died holding it.
pub const MUTEX_STALE: Duration = Duration::from_secs(20);

#[derive(serde::Serialize, serde::Deserialize)]
struct LockFile {
    token: u64,
    holder: String,
    expires_ms: u64,
}

impl DirStorage {
    /// Opens (creating, mode 0700) the directory.
    pub fn open(root: impl Into<PathBuf>) -> Result<DirStorage, StorageError> {
        let root = root.into();
        create_private_dir(&root.join(".meta"))
            .map_err(|e| StorageError::Backend(format!("cannot create {}: {e}", root.display())))?;
        Ok(DirStorage { inner: Arc::new(DirInner { root, local: std::sync::Mutex::new(()) }) })
    }

    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T, StorageError>
    where
        T: Send + 'static,
        F: FnOnce(&DirInner) -> Result<T, StorageError> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| StorageError::Backend(format!("storage task failed: {e}")))?
    }
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(dir)
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> StorageError {
    StorageError::Backend(format!("cannot {what} {}: {e}", path.display()))
}

impl DirInner {
    fn path(&self, key: &str) -> Result<PathBuf, StorageError> {
        if !valid_key(key) {
            return Err(StorageError::InvalidKey(key.to_string()));
        }
        Ok(self.root.join(key))
    }

    fn meta(&self) -> PathBuf {
        self.root.join(".meta")
    }

    fn read(&self, path: &Path) -> Result<Option<Vec<u8>>, StorageError> {
        match std::fs::read(path) {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("read", path, e)),
        }
    }

    fn write(&self, path: &Path, value: &[u8]) -> Result<(), StorageError> {
        if let Some(parent) = path.parent() {
            create_private_dir(parent).map_err(|e| io_err("create", parent, e))?;
        }
        crate::fsutil::write_atomic(path, value, true).map_err(|e| io_err("write", path, e))
    }

    fn remove(&self, path: &Path) -> Result<(), StorageError> {
        match std::fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("remove", path, e)),
        }
    }

    /// Runs `f` while holding the in-process mutex and the mutex file.
    fn critical<T>(&self, f: impl FnOnce(&DirInner) -> Result<T, StorageError>) -> Result<T, StorageError> {
        let _local = self.local.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let path = self.meta().join("mutex");
        let give_up = std::time::Instant::now() + MUTEX_STALE + Duration::from_secs(5);
        loop {
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            match options.open(&path) {
                Ok(mut file) => {
                    use std::io::Write as _;
                    let _ = writeln!(file, "{}", std::process::id());
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let age = std::fs::metadata(&path).and_then(|m| m.modified()).ok().and_then(|m| m.elapsed().ok());
                    if age.is_some_and(|a| a > MUTEX_STALE) {
                        tracing::warn!(path = %path.display(), "breaking a stale storage mutex (its process died holding it)");
                        let _ = std::fs::remove_file(&path);
                        continue;
                    }
                    if std::time::Instant::now() > give_up {
                        return Err(StorageError::Backend(format!(
                            "{} stays locked; remove it if no swarmgate uses this directory",
                            path.display()
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    create_private_dir(&self.meta()).map_err(|e| io_err("create", &self.meta(), e))?;
                }
                Err(e) => return Err(io_err("create", &path, e)),
            }
        }
        let result = f(self);
        let _ = std::fs::remove_file(&path);
        result
    }

    /// The next fencing token (inside the critical section).
    fn next_token(&self) -> Result<u64, StorageError> {
        let path = self.meta().join("counter");
        let last = match self.read(&path)? {
            None => 0,
            Some(bytes) => match std::str::from_utf8(&bytes).ok().and_then(|s| s.trim().parse::<u64>().ok()) {
                Some(n) => n,
                None => {
                    // Tokens only need to keep increasing: milliseconds since the epoch are
                    // far above any counter this file could have held.
                    let now = unix_ms(SystemTime::now());
                    tracing::warn!(path = %path.display(), "fencing counter unreadable; continuing from the clock ({now})");
                    now
                }
            },
        };
        let next = last.saturating_add(1);
        self.write(&path, next.to_string().as_bytes())?;
        Ok(next)
    }

    fn read_lock(&self, name: &str) -> Result<Option<LockFile>, StorageError> {
        let path = self.meta().join("locks").join(name);
        Ok(self.read(&path)?.and_then(|b| serde_json::from_slice::<LockFile>(&b).ok()))
    }

    fn write_lock(&self, name: &str, lock: &LockFile) -> Result<(), StorageError> {
        let path = self.meta().join("locks").join(name);
        let bytes = serde_json::to_vec(lock).map_err(|e| StorageError::Backend(e.to_string()))?;
        self.write(&path, &bytes)
    }

    fn fence(&self, key: &str) -> Result<u64, StorageError> {
        let path = self.meta().join("fence").join(key);
        Ok(self.read(&path)?.and_then(|b| String::from_utf8(b).ok()).and_then(|s| s.trim().parse().ok()).unwrap_or(0))
    }

    fn list_into(&self, dir: &Path, rel: &str, out: &mut Vec<String>) -> Result<(), StorageError> {
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err("list", dir, e)),
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if !valid_segment(name) {
                continue; // .meta, temp files, names no key can have
            }
            let key = if rel.is_empty() { name.to_string() } else { format!("{rel}/{name}") };
            let ft = entry.file_type().map_err(|e| io_err("stat", &entry.path(), e))?;
            if ft.is_dir() {
                self.list_into(&entry.path(), &key, out)?;
            } else if ft.is_file() {
                out.push(key);
            }
        }
        Ok(())
    }
}

fn valid_lock_name(name: &str) -> Result<(), StorageError> {
    if valid_segment(name) { Ok(()) } else { Err(StorageError::InvalidKey(name.to_string())) }
}

#[async_trait]
impl Storage for DirStorage {
    fn describe(&self) -> String {
        self.inner.root.display().to_string()
    }

    fn locate(&self, key: &str) -> String {
        self.inner.root.join(key).display().to_string()
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        let key = key.to_string();
        self.blocking(move |s| s.read(&s.path(&key)?)).await
    }

    async fn put(&self, key: &str, value: &[u8]) -> Result<(), StorageError> {
        let (key, value) = (key.to_string(), value.to_vec());
        self.blocking(move |s| s.write(&s.path(&key)?, &value)).await
    }

    async fn put_fenced(&self, key: &str, value: &[u8], token: u64) -> Result<(), StorageError> {
        let (key, value) = (key.to_string(), value.to_vec());
        self.blocking(move |s| {
            let path = s.path(&key)?;
            s.critical(|s| {
                let current = s.fence(&key)?;
                if current > token {
                    return Err(StorageError::Fenced { key: key.clone(), token, current });
                }
                // The fence first: a crash between the two writes leaves the old value
                // behind a newer fence, never a new value a stale holder could replace.
                s.write(&s.meta().join("fence").join(&key), token.to_string().as_bytes())?;
                s.write(&path, &value)
            })
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        let key = key.to_string();
        self.blocking(move |s| s.remove(&s.path(&key)?)).await
    }

    /// One `rename(2)`: the file moves whole or not at all.
    async fn rename(&self, key: &str, to: &str) -> Result<bool, StorageError> {
        let (key, to) = (key.to_string(), to.to_string());
        self.blocking(move |s| {
            let (from, to) = (s.path(&key)?, s.path(&to)?);
            if let Some(parent) = to.parent() {
                create_private_dir(parent).map_err(|e| io_err("create", parent, e))?;
            }
            match std::fs::rename(&from, &to) {
                Ok(()) => Ok(true),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
                Err(e) => Err(io_err("rename", &from, e)),
            }
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
        let prefix = prefix.to_string();
        self.blocking(move |s| {
            let mut out = Vec::new();
            s.list_into(&s.root, "", &mut out)?;
            out.retain(|k| k.starts_with(&prefix));
            out.sort();
            Ok(out)
        })
        .await
    }

    async fn lock(&self, name: &str, ttl: Duration) -> Result<Option<Lease>, StorageError> {
        valid_lock_name(name)?;
        let name = name.to_string();
        self.blocking(move |s| {
            s.critical(|s| {
                let now = SystemTime::now();
                if let Some(held) = s.read_lock(&name)? {
                    if from_unix_ms(held.expires_ms) > now {
                        if !holder_is_gone(&held.holder) {
                            return Ok(None);
                        }
                        tracing::warn!(lock = %name, holder = %held.holder,
                            "taking over a lease whose process no longer runs on this host");
                    }
                }
                let token = s.next_token()?;
                let expires = now + ttl;
                let holder = holder_id();
                s.write_lock(&name, &LockFile { token, holder: holder.clone(), expires_ms: unix_ms(expires) })?;
                Ok(Some(Lease { name: name.clone(), token, expires: from_unix_ms(unix_ms(expires)), holder }))
            })
        })
        .await
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Option<Lease>, StorageError> {
        valid_lock_name(&lease.name)?;
        let lease = lease.clone();
        self.blocking(move |s| {
            s.critical(|s| match s.read_lock(&lease.name)? {
                Some(held) if held.holder == lease.holder && held.token == lease.token => {
                    let expires = SystemTime::now() + ttl;
                    s.write_lock(&lease.name, &LockFile { expires_ms: unix_ms(expires), ..held })?;
                    Ok(Some(Lease { expires: from_unix_ms(unix_ms(expires)), ..lease.clone() }))
                }
                _ => Ok(None),
            })
        })
        .await
    }

    async fn unlock(&self, lease: &Lease) -> Result<(), StorageError> {
        valid_lock_name(&lease.name)?;
        let lease = lease.clone();
        self.blocking(move |s| {
            s.critical(|s| match s.read_lock(&lease.name)? {
                Some(held) if held.holder == lease.holder && held.token == lease.token => {
                    s.remove(&s.meta().join("locks").join(&lease.name))
                }
                _ => Ok(()),
            })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[tokio::test]
    async fn directory_passes_the_contract() {
        let dir = tempfile::tempdir().unwrap();
        let a = DirStorage::open(dir.path()).unwrap();
        // A second handle on the same directory stands for a second process.
        let b = DirStorage::open(dir.path()).unwrap();
        super::super::contract::run(&a, &b).await.unwrap();
    }

    #[tokio::test]
    async fn files_are_private_and_meta_is_hidden() {
        let dir = tempfile::tempdir().unwrap();
        let s = DirStorage::open(dir.path()).unwrap();
        s.put("certs/a.example.pem", b"x").await.unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("certs/a.example.pem")).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let lease = s.lock("order-a", Duration::from_secs(5)).await.unwrap().unwrap();
        s.put_fenced("certs/b.pem", b"y", lease.token).await.unwrap();
        assert_eq!(s.list("").await.unwrap(), vec!["certs/a.example.pem".to_string(), "certs/b.pem".to_string()]);
    }

    #[tokio::test]
    async fn unreadable_counter_and_lock_files_do_not_wedge() {
        let dir = tempfile::tempdir().unwrap();
        let s = DirStorage::open(dir.path()).unwrap();
        let first = s.lock("x", Duration::from_secs(5)).await.unwrap().unwrap();
        std::fs::write(dir.path().join(".meta/counter"), b"garbage").unwrap();
        std::fs::write(dir.path().join(".meta/locks/y"), b"{not json").unwrap();
        let second = s.lock("y", Duration::from_secs(5)).await.unwrap().unwrap();
        assert!(second.token > first.token);
    }

    #[tokio::test]
    async fn a_lease_of_a_dead_process_on_this_host_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let s = DirStorage::open(dir.path()).unwrap();
        let locks = dir.path().join(".meta/locks");
        std::fs::create_dir_all(&locks).unwrap();
        let far = unix_ms(SystemTime::now() + Duration::from_secs(3600));
        let host = this_host().unwrap();
        // PIDs above the kernel's maximum (4194304) never run.
        let dead = format!(r#"{{"token":7,"holder":"{host}/999999999/ab","expires_ms":{far}}}"#);
        std::fs::write(locks.join("order-a"), dead).unwrap();
        let lease = s.lock("order-a", Duration::from_secs(5)).await.unwrap().expect("taken over");
        assert!(lease.token >= 1);
        // Another host's holder (other PID namespace) is never judged.
        let foreign = format!(r#"{{"token":7,"holder":"elsewhere/999999999/ab","expires_ms":{far}}}"#);
        std::fs::write(locks.join("order-b"), foreign).unwrap();
        assert!(s.lock("order-b", Duration::from_secs(5)).await.unwrap().is_none());
        // A live one (this process, via another grant) is kept.
        let live = s.lock("order-c", Duration::from_secs(60)).await.unwrap().unwrap();
        assert!(s.lock("order-c", Duration::from_secs(5)).await.unwrap().is_none());
        s.unlock(&live).await.unwrap();
    }

    #[test]
    fn keys() {
        assert!(valid_key("certs/app.example.org.pem"));
        assert!(valid_key("accounts/https_x.json"));
        for bad in ["", "/x", "x/", "a//b", "../x", "a/../b", ".meta/x", "a b", "a\\b"] {
            assert!(!valid_key(bad), "{bad:?}");
        }
    }
}
