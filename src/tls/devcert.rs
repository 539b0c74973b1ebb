//! The self-signed development certificate, so a fresh checkout serves HTTPS at once.
//!
//! Made only when HTTPS is on, no `[acme]` section is configured, and some route host has
//! no static certificate. It covers those hosts plus `localhost` and `127.0.0.1`, is
//! written as `swarmgate-dev.crt`/`.key` in `certs_dir` (key mode 0600, temp file and
//! rename) and reused while it still covers every such host.

use std::path::Path;

use crate::config::HostPattern;
use crate::tls::store::{CertStore, certified_key_from_pem};

pub const DEV_CERT_STEM: &str = "swarmgate-dev";

/// How long a development certificate is valid.
const VALID_DAYS: u64 = 397;

/// Hosts that need the development certificate: route hosts no static certificate covers.
pub fn uncovered<'a>(hosts: impl Iterator<Item = &'a HostPattern>, statics: &CertStore) -> Vec<String> {
    // Routes share hosts (one per path): each distinct host is looked up once.
    let mut distinct = std::collections::HashSet::with_hasher(foldhash::fast::RandomState::default());
    let mut out: Vec<String> = hosts
        .filter(|h| !matches!(h, HostPattern::Any) && distinct.insert(*h) && !statics.covers(h))
        .map(ToString::to_string)
        .collect();
    out.sort();
    out
}

/// Loads the existing development certificate if it covers `hosts`, or makes a new one.
/// Returns the store holding it and whether it was newly made.
pub fn ensure(dir: &Path, hosts: &[String], always: bool) -> Result<(CertStore, bool), String> {
    let crt = dir.join(format!("{DEV_CERT_STEM}.crt"));
    let key = dir.join(format!("{DEV_CERT_STEM}.key"));
    if let Ok((ck, info)) = super::store::load_pair(&crt, &key) {
        let covers = hosts.iter().all(|h| info.names.iter().any(|n| n == h));
        let fresh = super::store::seconds_left(info.not_after) > 7 * 86_400;
        if covers && fresh {
            let mut store = CertStore::default();
            store.add(
                std::sync::Arc::new(ck),
                super::store::CertInfo { source: super::store::CertSource::Dev, file: Some(crt), ..info },
            );
            return Ok((store, false));
        }
    }
    if hosts.is_empty() && !always {
        return Ok((CertStore::default(), false));
    }
    let mut names: Vec<String> = hosts.to_vec();
    for extra in ["localhost", "127.0.0.1", "::1"] {
        if !names.iter().any(|n| n == extra) {
            names.push(extra.to_string());
        }
    }
    let key_pair =
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| format!("cannot make a key: {e}"))?;
    let mut params = rcgen::CertificateParams::new(names.clone())
        .map_err(|e| format!("cannot make a certificate for {names:?}: {e}"))?;
    params.distinguished_name.push(rcgen::DnType::CommonName, "swarmgate development certificate");
    // 397 days, the longest validity browsers take (Apple's platforms refuse any longer,
    // even from a root the user trusts); made anew at a start or reload in its last week.
    let now = x509_parser::time::ASN1Time::now().to_datetime();
    params.not_before = now - std::time::Duration::from_secs(86_400);
    params.not_after = now + std::time::Duration::from_secs(VALID_DAYS * 86_400);
    let cert = params.self_signed(&key_pair).map_err(|e| format!("cannot sign the certificate: {e}"))?;
    let (cert_pem, key_pem) = (cert.pem(), key_pair.serialize_pem());
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    crate::fsutil::write_atomic(&key, key_pem.as_bytes(), true)
        .map_err(|e| format!("cannot write {}: {e}", key.display()))?;
    crate::fsutil::write_atomic(&crt, cert_pem.as_bytes(), false)
        .map_err(|e| format!("cannot write {}: {e}", crt.display()))?;
    let (ck, info) = certified_key_from_pem(cert_pem.as_bytes(), key_pem.as_bytes())?;
    let mut store = CertStore::default();
    store.add(
        std::sync::Arc::new(ck),
        super::store::CertInfo { source: super::store::CertSource::Dev, file: Some(crt), ..info },
    );
    Ok((store, true))
}

#[cfg(test)]
#[allow(clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn a_development_certificate_is_valid_for_no_longer_than_browsers_take() {
        let dir = tempfile::tempdir().expect("a directory");
        let (store, made) = ensure(dir.path(), &["app.test".to_string()], false).expect("made");
        assert!(made);
        let info = store.infos().next().expect("one certificate");
        let days = super::super::store::seconds_left(info.not_after) / 86_400;
        assert!((396..=397).contains(&days), "valid for {days} more days");
        // Reused while it covers the hosts and has more than a week left.
        let (_, made) = ensure(dir.path(), &["app.test".to_string()], false).expect("loaded");
        assert!(!made);
    }
}
