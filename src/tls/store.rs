//! A set of certificates indexed by their SAN names.
//!
//! `certs_dir` holds `NAME.crt` (PEM chain, leaf first) and `NAME.key` (PEM private key)
//! pairs. Each certificate is indexed under every DNS name in its subjectAltName (the
//! subject CN when it has none); `*.example.org` names go to the wildcard index. When two
//! files claim one name, the first file in name order keeps it. The default certificate
//! (for clients without SNI) is `default.crt` if present, else the first file.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

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
        let mut crts: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "crt"))
            .filter(|p| p.file_stem().and_then(|s| s.to_str()).is_none_or(|s| !skip.contains(&s)))
            .collect();
        crts.sort();
        // `default.crt` first, so it is the default and wins name conflicts.
        if let Some(i) = crts.iter().position(|p| p.file_stem().is_some_and(|s| s == "default")) {
            let d = crts.remove(i);
            crts.insert(0, d);
        }
        let mut errors = Vec::new();
        for crt in crts {
            let key = crt.with_extension("key");
            match load_pair(&crt, &key) {
                Ok((ck, info)) => {
                    store.add(Arc::new(ck), CertInfo { source: CertSource::Static, file: Some(crt), ..info })
                }
                Err(message) => errors.push(CertError { path: crt, message }),
            }
        }
        if errors.is_empty() { Ok(store) } else { Err(errors) }
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
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| format!("not a PEM private key: {e}"))?;
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

/// Seconds until `not_after` (negative when expired).
pub fn seconds_left(not_after: i64) -> i64 {
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or(Duration::ZERO).as_secs() as i64;
    not_after - now
}
