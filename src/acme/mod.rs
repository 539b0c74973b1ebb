//! ACME: certificates for every route host without a static one, kept renewed.
//!
//! - [`manager`]: the background task (control runtime) that loads stored certificates,
//!   orders missing ones, renews them before expiry and swaps them into the resolver.
//! - [`storage`]: the [`storage::Storage`] trait (values, leases with fencing tokens) and
//!   its directory backend; [`contract`] is the check every backend must pass.
//! - [`responder`]: how challenge answers are published ([`responder::Publisher`]); the
//!   local one feeds [`Challenges`] (HTTP-01) and the TLS resolver (TLS-ALPN-01).
//!
//! - [`cluster`]: the Redis store every replica shares, its challenge publisher and the
//!   lookups a replica makes for answers another replica published.
//! - [`seal`]: private keys encrypted at rest (`SWARMGATE_ACME_STORAGE_KEY`).
//!
//! What the request path needs: HTTP-01 key authorizations live in [`Challenges`],
//! answered on the plain HTTP listener at `/.well-known/acme-challenge/{token}` before
//! redirects and routing; TLS-ALPN-01 certificates live in the TLS resolver.

pub mod cluster;
pub mod contract;
pub mod manager;
pub mod responder;
pub mod seal;
pub mod storage;

use std::collections::HashMap;
use std::sync::Mutex;

pub use manager::{Manager, Wanted};

/// Published HTTP-01 key authorizations, by token, and (clustered) where to look for
/// answers other replicas published.
#[derive(Debug, Default)]
pub struct Challenges {
    tokens: Mutex<HashMap<String, String>>,
    remote: arc_swap::ArcSwapOption<cluster::RemoteAnswers>,
}

/// Path prefix of HTTP-01 validation requests (RFC 8555 section 8.3).
pub const HTTP01_PREFIX: &str = "/.well-known/acme-challenge/";

impl Challenges {
    pub fn publish(&self, token: &str, key_authorization: &str) {
        self.lock().insert(token.to_string(), key_authorization.to_string());
    }

    pub fn withdraw(&self, token: &str) {
        self.lock().remove(token);
    }

    /// The key authorization for a token, if one is published.
    pub fn answer(&self, token: &str) -> Option<String> {
        self.lock().get(token).cloned()
    }

    /// Sets (or with `None` clears) the shared store consulted when an answer is not local.
    pub fn set_remote(&self, remote: Option<cluster::RemoteAnswers>) {
        self.remote.store(remote.map(std::sync::Arc::new));
    }

    /// The shared store's answers, when clustered.
    pub fn remote(&self) -> Option<std::sync::Arc<cluster::RemoteAnswers>> {
        self.remote.load_full()
    }

    /// The key authorization for a token and where it was found: `"local"`, else
    /// `"store"` (published by another replica).
    pub async fn answer_anywhere(&self, token: &str) -> Option<(String, &'static str)> {
        if let Some(a) = self.answer(token) {
            return Some((a, "local"));
        }
        // ACME tokens are base64url, at least 128 bits (RFC 8555 section 8.1): anything
        // else costs no store lookup.
        let plausible = (16..=256).contains(&token.len())
            && token.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !plausible {
            return None;
        }
        let remote = self.remote()?;
        remote.http01(token).await.map(|a| (a, "store"))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.tokens.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
