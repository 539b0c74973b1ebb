//! Certificates and SNI: the static store (`certs_dir`), the ACME store, and the rustls
//! resolver that picks between them and the TLS-ALPN-01 challenge certificates.
//!
//! Lookup order for a handshake: a client offering only `acme-tls/1` gets the challenge
//! certificate for its SNI name (RFC 8737); otherwise a static certificate (exact SAN,
//! then wildcard SAN) wins over an ACME one, which wins over nothing. A client without
//! SNI gets the default static certificate. A name no certificate covers fails the
//! handshake (logged): it never gets another host's certificate.

pub mod devcert;
pub mod store;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::config::TlsVersion;
use crate::telemetry::Throttle;
pub use store::{CertInfo, CertSource, CertStore};

/// ALPN protocol id of TLS-ALPN-01 (RFC 8737 section 6.2).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// Picks a certificate per handshake; every part can be swapped while serving.
#[derive(Debug, Default)]
pub struct CertResolver {
    statics: ArcSwap<CertStore>,
    acme: ArcSwap<CertStore>,
    challenges: Mutex<HashMap<String, Arc<CertifiedKey>>>,
    pub unknown_names: AtomicU64,
    /// Refusals logged as warnings (see `resolve`).
    refusal_warnings: Throttle,
}

impl CertResolver {
    pub fn set_static(&self, store: CertStore) {
        self.statics.store(Arc::new(store));
    }

    pub fn set_acme(&self, store: CertStore) {
        self.acme.store(Arc::new(store));
    }

    pub fn statics(&self) -> Arc<CertStore> {
        self.statics.load_full()
    }

    pub fn acme(&self) -> Arc<CertStore> {
        self.acme.load_full()
    }

    /// Publishes (or with `None` withdraws) a TLS-ALPN-01 challenge certificate.
    pub fn set_challenge(&self, name: &str, cert: Option<Arc<CertifiedKey>>) {
        let mut map = self.challenges.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match cert {
            Some(c) => map.insert(name.to_ascii_lowercase(), c),
            None => map.remove(&name.to_ascii_lowercase()),
        };
    }

    /// Whether this process publishes a TLS-ALPN-01 answer for `name`.
    pub fn has_challenge(&self, name: &str) -> bool {
        let map = self.challenges.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        map.contains_key(&name.to_ascii_lowercase())
    }

    /// The certificate a client asking for `sni` gets, without the challenge case.
    pub fn lookup(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        match sni {
            None => self.statics.load().default_cert().or_else(|| self.acme.load().default_cert()),
            Some(name) => self.statics.load().lookup(name).or_else(|| self.acme.load().lookup(name)),
        }
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let sni = hello.server_name();
        let wants_challenge = hello.alpn().is_some_and(|mut alpn| alpn.any(|p| p == ACME_TLS_ALPN));
        if wants_challenge {
            let name = sni?;
            let map = self.challenges.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            return map.get(&name.to_ascii_lowercase()).cloned();
        }
        let cert = self.lookup(sni);
        if cert.is_none() {
            self.unknown_names.fetch_add(1, Ordering::Relaxed);
            // Scanners ask for names by the thousand: a warning a minute at most, the rest
            // at debug (all are counted in swarmgate_tls_handshake_errors_total).
            let sni = sni.unwrap_or("<none>");
            if self.refusal_warnings.allow(60) {
                tracing::warn!(
                    sni,
                    "TLS handshake refused: no certificate for this name (more within a minute: debug)"
                );
            } else {
                tracing::debug!(sni, "TLS handshake refused: no certificate for this name");
            }
        }
        cert
    }
}

/// The TLS crypto provider of every rustls configuration swarmgate makes (aws-lc-rs),
/// and of the keys of the certificates it serves.
pub fn provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::aws_lc_rs::default_provider()
}

/// A signing key of the provider for a private key (RSA, ECDSA or Ed25519).
pub fn signing_key(
    key: &rustls::pki_types::PrivateKeyDer<'_>,
) -> Result<Arc<dyn rustls::sign::SigningKey>, rustls::Error> {
    rustls::crypto::aws_lc_rs::sign::any_supported_type(key)
}

/// The rustls server configuration: TLS 1.2/1.3 (or 1.3 only), ALPN h2, http/1.1 and
/// acme-tls/1, stateless session tickets for resumption.
pub fn server_config(resolver: Arc<CertResolver>, min: TlsVersion) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let provider = Arc::new(provider());
    let versions: &[&'static rustls::SupportedProtocolVersion] = match min {
        TlsVersion::V1_2 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::V1_3 => &[&rustls::version::TLS13],
    };
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    // http/1.0 too: a client that offers only it (curl --http1.0) is served HTTP/1.0
    // rather than refused, as without ALPN.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec(), b"http/1.0".to_vec(), ACME_TLS_ALPN.to_vec()];
    config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()?;
    Ok(Arc::new(config))
}

/// Serves one TLS-ALPN-01 challenge certificate (ALPN `acme-tls/1` only): the
/// configuration of a single validation handshake.
pub fn challenge_config(cert: Arc<CertifiedKey>) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let provider = Arc::new(provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Fixed(cert)));
    config.alpn_protocols = vec![ACME_TLS_ALPN.to_vec()];
    Ok(Arc::new(config))
}

#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }
}
