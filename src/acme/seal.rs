//! Private keys encrypted at rest: with `SWARMGATE_ACME_STORAGE_KEY` set, every value the
//! ACME manager stores (account credentials with the account key, certificate bundles with
//! their key, order metadata) is sealed with AES-256-GCM before it reaches the backend,
//! directory or Redis alike.
//!
//! - Key: HKDF-SHA256 (ring) of the variable's bytes, fixed salt and info. HKDF is not a
//!   password hash: the variable must be random (at least 32 characters, e.g.
//!   `openssl rand -base64 32`); the config check refuses shorter ones.
//! - Value: `swarmgate-sealed-v1\n` + 12-byte random nonce + ciphertext and tag; the
//!   storage key is the associated data, so a sealed value moved to another key (another
//!   name's certificate) does not open.
//! - A value without the prefix (written before the variable was set) is read as it is,
//!   and sealed when the ACME manager starts with the key (see `Ctx::seal_the_clear` in
//!   `manager`), or else at its next write. A sealed value that does not open is
//!   `StorageError::Sealed`: another key, or an altered value. The ACME manager tells the
//!   two apart by the account: a certificate that does not open while the sealed account
//!   does is corrupt and set aside; with a wrong key the account does not open and nothing
//!   moves (nor when the account was stored before the key was set: it proves nothing).
//! - Lease and fencing data are not secret and not sealed; challenge answers are public.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

use super::storage::{Event, Lease, Sealing, Storage, StorageError};

/// The environment variable holding the storage key.
pub const KEY_VAR: &str = "SWARMGATE_ACME_STORAGE_KEY";
/// Shortest value accepted for [`KEY_VAR`].
pub const MIN_KEY_CHARS: usize = 32;
const MAGIC: &[u8] = b"swarmgate-sealed-v1\n";

/// Whether a stored value is sealed (whatever the key), for a store read without a key:
/// such a value is not corrupt, and must not be set aside.
pub fn is_sealed(stored: &[u8]) -> bool {
    stored.starts_with(MAGIC)
}
const SALT: &[u8] = b"swarmgate acme storage";
const INFO: &[u8] = b"swarmgate-acme-storage-v1 aes-256-gcm";

/// A storage key, redacted in `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretKey(String);

impl SecretKey {
    pub fn new(value: String) -> SecretKey {
        SecretKey(value)
    }
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(***)")
    }
}

struct Len(usize);

impl ring::hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// Derives the AEAD key from the variable's value.
fn derive(secret: &SecretKey) -> Result<LessSafeKey, String> {
    let salt = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, SALT);
    let prk = salt.extract(secret.0.as_bytes());
    let info = [INFO];
    let okm = prk.expand(&info, Len(AES_256_GCM.key_len())).map_err(|_| "key derivation failed".to_string())?;
    let mut bytes = [0u8; 32];
    okm.fill(&mut bytes).map_err(|_| "key derivation failed".to_string())?;
    let key = UnboundKey::new(&AES_256_GCM, &bytes).map_err(|_| "AES-256-GCM key refused".to_string())?;
    Ok(LessSafeKey::new(key))
}

/// A [`Storage`] whose values are sealed before they reach `inner`.
pub struct Sealed {
    inner: Arc<dyn Storage>,
    key: LessSafeKey,
    rng: SystemRandom,
}

impl std::fmt::Debug for Sealed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealed").field("inner", &self.inner).finish_non_exhaustive()
    }
}

impl Sealed {
    pub fn new(inner: Arc<dyn Storage>, secret: &SecretKey) -> Result<Sealed, String> {
        Ok(Sealed { inner, key: derive(secret)?, rng: SystemRandom::new() })
    }

    fn seal(&self, key: &str, plain: &[u8]) -> Result<Vec<u8>, StorageError> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).map_err(|_| StorageError::Backend("no random bytes for a nonce".into()))?;
        let mut out = Vec::with_capacity(MAGIC.len() + NONCE_LEN + plain.len() + AES_256_GCM.tag_len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&nonce);
        let mut body = plain.to_vec();
        self.key
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(key.as_bytes()), &mut body)
            .map_err(|_| StorageError::Backend(format!("{key}: cannot encrypt")))?;
        out.extend_from_slice(&body);
        Ok(out)
    }

    fn open(&self, key: &str, stored: Vec<u8>) -> Result<Vec<u8>, StorageError> {
        let Some(rest) = stored.strip_prefix(MAGIC) else {
            tracing::debug!(key, "value stored without encryption; it is encrypted at its next write");
            return Ok(stored);
        };
        if rest.len() < NONCE_LEN + AES_256_GCM.tag_len() {
            return Err(StorageError::Sealed(format!("{}: sealed value too short", self.inner.locate(key))));
        }
        let (nonce, body) = rest.split_at(NONCE_LEN);
        let mut nonce_bytes = [0u8; NONCE_LEN];
        nonce_bytes.copy_from_slice(nonce);
        let mut body = body.to_vec();
        let plain = self
            .key
            .open_in_place(Nonce::assume_unique_for_key(nonce_bytes), Aad::from(key.as_bytes()), &mut body)
            .map_err(|_| {
                StorageError::Sealed(format!(
                    "{}: cannot decrypt: sealed with another {KEY_VAR} (or altered)",
                    self.inner.locate(key)
                ))
            })?;
        Ok(plain.to_vec())
    }
}

#[async_trait]
impl Storage for Sealed {
    fn describe(&self) -> String {
        format!("{} (encrypted)", self.inner.describe())
    }

    fn locate(&self, key: &str) -> String {
        self.inner.locate(key)
    }

    fn lease_ttl(&self) -> Duration {
        self.inner.lease_ttl()
    }

    fn shared(&self) -> bool {
        self.inner.shared()
    }

    fn events(&self) -> Option<tokio::sync::broadcast::Receiver<Event>> {
        self.inner.events()
    }

    async fn announce(&self, event: &Event) -> Result<(), StorageError> {
        self.inner.announce(event).await
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        match self.inner.get(key).await? {
            Some(v) => self.open(key, v).map(Some),
            None => Ok(None),
        }
    }

    async fn put(&self, key: &str, value: &[u8]) -> Result<(), StorageError> {
        let sealed = self.seal(key, value)?;
        self.inner.put(key, &sealed).await
    }

    async fn put_fenced(&self, key: &str, value: &[u8], token: u64) -> Result<(), StorageError> {
        let sealed = self.seal(key, value)?;
        self.inner.put_fenced(key, &sealed, token).await
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        self.inner.delete(key).await
    }

    /// The value moves as it is stored: one that does not open can be set aside too.
    async fn rename(&self, key: &str, to: &str) -> Result<bool, StorageError> {
        self.inner.rename(key, to).await
    }

    async fn sealing(&self, key: &str) -> Result<Option<Sealing>, StorageError> {
        Ok(self.inner.get(key).await?.map(|v| match v.starts_with(MAGIC) {
            false => Sealing::Clear,
            true if self.open(key, v).is_ok() => Sealing::Opens,
            true => Sealing::DoesNotOpen,
        }))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
        self.inner.list(prefix).await
    }

    async fn lock(&self, name: &str, ttl: Duration) -> Result<Option<Lease>, StorageError> {
        self.inner.lock(name, ttl).await
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Option<Lease>, StorageError> {
        self.inner.renew(lease, ttl).await
    }

    async fn unlock(&self, lease: &Lease) -> Result<(), StorageError> {
        self.inner.unlock(lease).await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::super::storage::DirStorage;
    use super::*;

    fn secret(s: &str) -> SecretKey {
        SecretKey::new(s.to_string())
    }

    #[tokio::test]
    async fn sealed_directory_passes_the_contract() {
        let dir = tempfile::tempdir().unwrap();
        let key = secret("0123456789abcdef0123456789abcdef");
        let a = Sealed::new(Arc::new(DirStorage::open(dir.path()).unwrap()), &key).unwrap();
        let b = Sealed::new(Arc::new(DirStorage::open(dir.path()).unwrap()), &key).unwrap();
        super::super::contract::run(&a, &b).await.unwrap();
    }

    #[tokio::test]
    async fn values_are_encrypted_bound_to_their_key_and_need_the_same_secret() {
        let dir = tempfile::tempdir().unwrap();
        let raw: Arc<dyn Storage> = Arc::new(DirStorage::open(dir.path()).unwrap());
        let s = Sealed::new(Arc::clone(&raw), &secret("0123456789abcdef0123456789abcdef")).unwrap();
        let secret_pem = b"-----BEGIN PRIVATE KEY-----\nsecret\n-----END PRIVATE KEY-----\n";
        s.put("certs/a.example.pem", secret_pem).await.unwrap();
        let on_disk = std::fs::read(dir.path().join("certs/a.example.pem")).unwrap();
        assert!(on_disk.starts_with(MAGIC));
        assert!(!on_disk.windows(6).any(|w| w == b"secret"), "plaintext on disk");
        assert_eq!(s.get("certs/a.example.pem").await.unwrap().as_deref(), Some(&secret_pem[..]));
        // Two writes of one value differ (fresh nonce).
        s.put("certs/b.example.pem", secret_pem).await.unwrap();
        let other = std::fs::read(dir.path().join("certs/b.example.pem")).unwrap();
        assert_ne!(on_disk, other);
        // Moved to another key: refused.
        raw.put("certs/b.example.pem", &on_disk).await.unwrap();
        assert!(matches!(s.get("certs/b.example.pem").await, Err(StorageError::Sealed(_))));
        // Another secret: refused, with a message naming the variable.
        let wrong = Sealed::new(Arc::clone(&raw), &secret("ffffffffffffffffffffffffffffffff")).unwrap();
        match wrong.get("certs/a.example.pem").await {
            Err(StorageError::Sealed(m)) => assert!(m.contains(KEY_VAR), "{m}"),
            other => panic!("{other:?}"),
        }
        // Plaintext written before the key was set is read as it is.
        raw.put("accounts/x.json", b"{}").await.unwrap();
        assert_eq!(s.get("accounts/x.json").await.unwrap().as_deref(), Some(&b"{}"[..]));
        assert_eq!(format!("{:?}", secret("abc")), "SecretKey(***)");
    }
}
