//! Publishing challenge answers where the ACME server's validation will look for them.
//!
//! An [`Answer`] is plain data (serde), so a clustered backend can hand it to every
//! replica (the validation request may reach any of them) and each replica applies it
//! locally with [`LocalPublisher`]. TLS-ALPN-01 answers carry the key authorization's
//! digest, not a certificate: each replica makes its own challenge certificate.

use std::sync::Arc;

use async_trait::async_trait;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;

use super::Challenges;
use crate::tls::CertResolver;

/// One challenge answer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Answer {
    /// Served at `/.well-known/acme-challenge/{token}` on the plain HTTP listener.
    Http01 { token: String, key_authorization: String },
    /// A self-signed certificate for `name` with the acmeIdentifier extension holding
    /// `digest` (SHA-256 of the key authorization), served to `acme-tls/1` clients.
    TlsAlpn01 { name: String, digest: Vec<u8> },
}

/// Where answers go: this process only, or (later) every replica.
#[async_trait]
pub trait Publisher: Send + Sync + std::fmt::Debug {
    async fn publish(&self, answer: &Answer) -> Result<(), String>;
    async fn withdraw(&self, answer: &Answer);
}

/// Answers served by this process.
#[derive(Debug, Clone)]
pub struct LocalPublisher {
    pub challenges: Arc<Challenges>,
    pub certs: Arc<CertResolver>,
}

impl LocalPublisher {
    /// Applies an answer (also the entry point for answers received from other replicas).
    pub fn apply(&self, answer: &Answer) -> Result<(), String> {
        match answer {
            Answer::Http01 { token, key_authorization } => self.challenges.publish(token, key_authorization),
            Answer::TlsAlpn01 { name, digest } => {
                let cert = challenge_cert(name, digest)?;
                self.certs.set_challenge(name, Some(Arc::new(cert)));
            }
        }
        Ok(())
    }

    pub fn remove(&self, answer: &Answer) {
        match answer {
            Answer::Http01 { token, .. } => self.challenges.withdraw(token),
            Answer::TlsAlpn01 { name, .. } => self.certs.set_challenge(name, None),
        }
    }
}

#[async_trait]
impl Publisher for LocalPublisher {
    async fn publish(&self, answer: &Answer) -> Result<(), String> {
        self.apply(answer)
    }

    async fn withdraw(&self, answer: &Answer) {
        self.remove(answer);
    }
}

/// The RFC 8737 challenge certificate: self-signed, SAN = `name` only, critical
/// acmeIdentifier extension with `digest`.
pub fn challenge_cert(name: &str, digest: &[u8]) -> Result<CertifiedKey, String> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| format!("cannot make a challenge key: {e}"))?;
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()])
        .map_err(|e| format!("cannot make a challenge certificate for {name:?}: {e}"))?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let cert = params.self_signed(&key).map_err(|e| format!("cannot sign the challenge certificate: {e}"))?;
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signing = crate::tls::signing_key(&der).map_err(|e| format!("challenge key unusable: {e}"))?;
    Ok(CertifiedKey::new(vec![cert.der().clone()], signing))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn challenge_cert_carries_the_name_and_the_digest() {
        let digest = [7u8; 32];
        let ck = challenge_cert("app.example.org", &digest).unwrap();
        let info = crate::tls::store::describe(&ck.cert[0]).unwrap();
        assert_eq!(info.names, vec!["app.example.org".to_string()]);
        use x509_parser::prelude::*;
        let (_, cert) = X509Certificate::from_der(ck.cert[0].as_ref()).unwrap();
        let ext = cert
            .extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == "1.3.6.1.5.5.7.1.31")
            .expect("acmeIdentifier extension");
        assert!(ext.critical);
        // DER OCTET STRING of 32 bytes: 04 20 + digest.
        assert_eq!(&ext.value[..2], &[0x04, 0x20]);
        assert_eq!(&ext.value[2..], &digest);
    }

    #[tokio::test]
    async fn local_publisher_serves_and_withdraws() {
        let p =
            LocalPublisher { challenges: Arc::new(Challenges::default()), certs: Arc::new(CertResolver::default()) };
        let a = Answer::Http01 { token: "tok".into(), key_authorization: "tok.thumb".into() };
        p.publish(&a).await.unwrap();
        assert_eq!(p.challenges.answer("tok").as_deref(), Some("tok.thumb"));
        p.withdraw(&a).await;
        assert_eq!(p.challenges.answer("tok"), None);
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(serde_json::from_str::<Answer>(&json).unwrap(), a);
    }
}
