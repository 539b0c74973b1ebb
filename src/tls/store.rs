//! A set of certificates indexed by their SAN names.
//!
//! `certs_dir` holds `NAME.crt` (PEM chain, leaf first) and `NAME.key` (PEM private key)
//! pairs. Each certificate is indexed under every DNS name in its subjectAltName (the
//! subject CN when it has none); `*.example.org` names go to the wildcard index. When two
//! files claim one name, one valid now beats an expired one, then `default.crt` wins,
//! then the one that expires later, then the first file in name order. An expired one is
//! logged. The default certificate (for clients without SNI) is `default.crt` if present,
//! else the first file.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CertSource {
    Static,
    Acme,
    Dev,
}

/// What `/certificates` and the expiry metric show.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CertInfo {
    pub names: Vec<String>,
    pub issuer: String,
    /// Seconds since the Unix epoch.
    pub not_after: i64,
    pub source: CertSource,
    pub file: Option<PathBuf>,
}

#[derive(Debug, Default)]
pub struct CertStore {
    exact: crate::FastMap<String, Arc<CertifiedKey>>,
    wildcard: crate::FastMap<String, Arc<CertifiedKey>>,
    default: Option<Arc<CertifiedKey>>,
    entries: Vec<(Arc<CertifiedKey>, CertInfo)>,
}

/// A problem with one certificate file.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}: {message}", path.display())]
pub struct CertError {
    pub path: PathBuf,
    pub message: String,
}

impl CertStore {
    /// Loads every `*.crt` with its `*.key` from `dir` (missing dir = empty store).
    /// `skip` names file stems to leave out. All problems are returned together.
    pub fn load_dir(dir: &Path, skip: &[&str]) -> Result<CertStore, Vec<CertError>> {
        let mut store = CertStore::default();
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(store),
            Err(e) => {
                return Err(vec![CertError { path: dir.to_path_buf(), message: format!("cannot read: {e}") }]);
            }
        };
        // The directory's files once: the pairs' `.crt`s, and the `.key`s without one.
        let ours = |p: &Path, ext: &str| {
            p.extension().is_some_and(|x| x == ext)
                && p.file_stem().and_then(|s| s.to_str()).is_none_or(|s| !skip.contains(&s))
        };
        let files: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        let mut crts: Vec<PathBuf> = files.iter().filter(|p| ours(p, "crt")).cloned().collect();
        crts.sort();
        for key in files.iter().filter(|p| ours(p, "key") && !crts.contains(&p.with_extension("crt"))) {
            tracing::warn!(file = %key.display(), "a key without its .crt is not loaded");
        }
        let is_default = |p: &Path| p.file_stem().is_some_and(|s| s == "default");
        let mut errors = Vec::new();
        let mut loaded = Vec::with_capacity(crts.len());
        for crt in crts {
            let key = crt.with_extension("key");
            match load_pair(&crt, &key) {
                Ok((ck, info)) => {
                    loaded.push((Arc::new(ck), CertInfo { source: CertSource::Static, file: Some(crt), ..info }))
                }
                Err(message) => errors.push(CertError { path: crt, message }),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let now = unix_now();
        for (_, info) in loaded.iter().filter(|(_, info)| info.not_after < now) {
            let file = info.file.as_deref().unwrap_or(dir);
            tracing::warn!(file = %file.display(), names = ?info.names, "certificate expired; served only for names no valid one has");
        }
        // For no SNI: `default.crt`, else the first file.
        store.default = loaded
            .iter()
            .find(|(_, i)| i.file.as_deref().is_some_and(is_default))
            .or(loaded.first())
            .map(|(c, _)| Arc::clone(c));
        // Which file keeps a name two claim (`add` lets the first keep it): valid now,
        // `default.crt`, expiring later, first by file name (a stable sort keeps that).
        loaded.sort_by_key(|(_, i)| {
            (i.not_after < now, !i.file.as_deref().is_some_and(is_default), std::cmp::Reverse(i.not_after))
        });
        for (ck, info) in loaded {
            if info.not_after < now {
                store.add_fallback(ck, info);
            } else {
                store.add(ck, info);
            }
        }
        Ok(store)
    }

    /// [`CertStore::add`] for an expired certificate: under the names no certificate
    /// here serves yet, a wildcard one included (an expired `a.example.org` does not
    /// shadow a valid `*.example.org`).
    fn add_fallback(&mut self, cert: Arc<CertifiedKey>, info: CertInfo) {
        for name in &info.names {
            let name = name.to_ascii_lowercase();
            match name.strip_prefix("*.") {
                Some(suffix) if !self.wildcard.contains_key(suffix) => {
                    self.wildcard.insert(suffix.to_string(), Arc::clone(&cert));
                }
                None if self.lookup(&name).is_none() => {
                    self.exact.insert(name, Arc::clone(&cert));
                }
                _ => {}
            }
        }
        self.entries.push((cert, info));
    }

    /// Where the certificate a route host is served with here came from (`None`: no
    /// certificate covers it, or it is `*`).
    pub fn served_from(&self, host: &crate::config::HostPattern) -> Option<CertSource> {
        use crate::config::HostPattern;
        let cert = match host {
            HostPattern::Exact(h) => self.lookup(h)?,
            HostPattern::Wildcard(s) => Arc::clone(self.wildcard.get(s.as_str())?),
            HostPattern::Any => return None,
        };
        self.entries.iter().find(|(c, _)| Arc::ptr_eq(c, &cert)).map(|(_, info)| info.source)
    }

    /// Adds a certificate under its names; earlier entries keep names they already have.
    pub fn add(&mut self, cert: Arc<CertifiedKey>, info: CertInfo) {
        for name in &info.names {
            let name = name.to_ascii_lowercase();
            match name.strip_prefix("*.") {
                Some(suffix) => self.wildcard.entry(suffix.to_string()).or_insert_with(|| Arc::clone(&cert)),
                None => self.exact.entry(name).or_insert_with(|| Arc::clone(&cert)),
            };
        }
        if self.default.is_none() {
            self.default = Some(Arc::clone(&cert));
        }
        self.entries.push((cert, info));
    }

    /// Adds every certificate of `other`, after this store's own.
    pub fn extend(&mut self, other: CertStore) {
        for (cert, info) in other.entries {
            self.add(cert, info);
        }
    }

    pub fn infos(&self) -> impl Iterator<Item = &CertInfo> {
        self.entries.iter().map(|(_, info)| info)
    }

    pub fn lookup(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        let lower;
        let name = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            lower = name.to_ascii_lowercase();
            &lower
        } else {
            name
        };
        if let Some(c) = self.exact.get(name) {
            return Some(Arc::clone(c));
        }
        let (_, parent) = name.split_once('.')?;
        self.wildcard.get(parent).cloned()
    }

    /// Whether a route host (exact or `*.suffix`) is covered by a certificate here.
    pub fn covers(&self, host: &crate::config::HostPattern) -> bool {
        use crate::config::HostPattern;
        match host {
            HostPattern::Exact(h) => self.lookup(h).is_some(),
            HostPattern::Wildcard(s) => self.wildcard.contains_key(s.as_str()),
            HostPattern::Any => true,
        }
    }

    pub fn default_cert(&self) -> Option<Arc<CertifiedKey>> {
        self.default.clone()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Reads a PEM chain and key and checks that they belong together.
pub fn load_pair(crt: &Path, key: &Path) -> Result<(CertifiedKey, CertInfo), String> {
    let chain_pem = std::fs::read(crt).map_err(|e| format!("cannot read: {e}"))?;
    let key_pem = std::fs::read(key).map_err(|e| format!("cannot read its key {}: {e}", key.display()))?;
    certified_key_from_pem(&chain_pem, &key_pem).map_err(|e| format!("{e} (key {})", key.display()))
}

/// Builds a rustls `CertifiedKey` (and its facts) from PEM bytes.
pub fn certified_key_from_pem(chain_pem: &[u8], key_pem: &[u8]) -> Result<(CertifiedKey, CertInfo), String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("not a PEM certificate chain: {e}"))?;
    if chain.is_empty() {
        return Err("no certificate in the file".into());
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| {
        if key_pem.windows(9).any(|w| w == b"ENCRYPTED") {
            "an encrypted private key: the key file must hold it unencrypted".to_string()
        } else {
            format!("not a PEM private key: {e}")
        }
    })?;
    let signing = super::signing_key(&key).map_err(|e| format!("unsupported private key: {e}"))?;
    let info = describe(&chain[0])?;
    let ck = CertifiedKey::new(chain, signing);
    ck.keys_match().map_err(|_| "the private key does not belong to the certificate".to_string())?;
    Ok((ck, info))
}

/// Names, issuer and expiry of a leaf certificate.
pub fn describe(leaf: &CertificateDer<'_>) -> Result<CertInfo, String> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(leaf.as_ref()).map_err(|e| format!("unreadable certificate: {e}"))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(d) => names.push(d.to_ascii_lowercase()),
                GeneralName::IPAddress(b) => {
                    if let Some(ip) = ip_from_bytes(b) {
                        names.push(ip.to_string());
                    }
                }
                _ => {}
            }
        }
    }
    if names.is_empty() {
        if let Some(cn) = cert.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()) {
            names.push(cn.to_ascii_lowercase());
        }
    }
    Ok(CertInfo {
        names,
        issuer: cert.issuer().to_string(),
        not_after: cert.validity().not_after.timestamp(),
        source: CertSource::Static,
        file: None,
    })
}

fn ip_from_bytes(b: &[u8]) -> Option<std::net::IpAddr> {
    match b.len() {
        4 => Some(std::net::IpAddr::from(<[u8; 4]>::try_from(b).ok()?)),
        16 => Some(std::net::IpAddr::from(<[u8; 16]>::try_from(b).ok()?)),
        _ => None,
    }
}

/// Seconds since the Unix epoch.
fn unix_now() -> i64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// Seconds until `not_after` (negative when expired).
pub fn seconds_left(not_after: i64) -> i64 {
    not_after - unix_now()
}

#[cfg(test)]
#[allow(clippy::expect_used)]
mod tests {
    use super::*;

    /// A self-signed certificate for `names` that ends in `year`, written as `stem.crt`
    /// and `stem.key` in `dir`; returns its DER.
    fn write_cert(dir: &Path, stem: &str, names: &[&str], year: i32) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().expect("a key");
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).expect("params");
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(year, 1, 1);
        let cert = params.self_signed(&key).expect("a certificate");
        std::fs::write(dir.join(format!("{stem}.crt")), cert.pem()).expect("write");
        std::fs::write(dir.join(format!("{stem}.key")), key.serialize_pem()).expect("write");
        cert.der().to_vec()
    }

    #[test]
    fn an_encrypted_key_is_named_for_what_it_is() {
        let dir = tempfile::tempdir().expect("a directory");
        write_cert(dir.path(), "app", &["app.test"], 2090);
        let encrypted = "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIB\n-----END ENCRYPTED PRIVATE KEY-----\n";
        std::fs::write(dir.path().join("app.key"), encrypted).expect("write");
        let errors = CertStore::load_dir(dir.path(), &[]).expect_err("refused");
        assert!(errors[0].message.contains("an encrypted private key"), "{}", errors[0]);
        assert!(errors[0].message.contains("app.key"), "{}", errors[0]);
    }

    #[test]
    fn of_two_files_for_one_name_a_valid_one_that_ends_later_wins() {
        let dir = tempfile::tempdir().expect("a directory");
        let expired = write_cert(dir.path(), "a-expired", &["app.test"], 2021);
        let sooner = write_cert(dir.path(), "b-sooner", &["app.test", "*.wild.test"], 2090);
        let later = write_cert(dir.path(), "c-later", &["app.test"], 2095);
        let old_exact = write_cert(dir.path(), "d-old", &["x.wild.test"], 2021);
        let store = CertStore::load_dir(dir.path(), &[]).expect("loads");
        let served = |name: &str| store.lookup(name).map(|c| c.cert[0].as_ref().to_vec());
        assert_eq!(served("app.test"), Some(later), "the valid one that ends later");
        // An expired exact name does not shadow a valid wildcard.
        assert_eq!(served("y.wild.test"), Some(sooner.clone()));
        assert_eq!(served("x.wild.test"), Some(sooner.clone()));
        // Alone, an expired certificate is still served (and logged).
        let only = write_cert(dir.path(), "e-only", &["only.test"], 2021);
        let store = CertStore::load_dir(dir.path(), &[]).expect("loads");
        assert_eq!(store.lookup("only.test").map(|c| c.cert[0].as_ref().to_vec()), Some(only));
        let _ = old_exact;
        // No SNI: the first file, as documented (no `default.crt` here).
        assert_eq!(store.default_cert().map(|c| c.cert[0].as_ref().to_vec()), Some(expired));
        // `default.crt` wins a name over a file that ends later, when both are valid.
        let default = write_cert(dir.path(), "default", &["app.test"], 2091);
        let store = CertStore::load_dir(dir.path(), &[]).expect("loads");
        assert_eq!(store.lookup("app.test").map(|c| c.cert[0].as_ref().to_vec()), Some(default.clone()));
        assert_eq!(store.default_cert().map(|c| c.cert[0].as_ref().to_vec()), Some(default));
        let _ = sooner;
    }
}
