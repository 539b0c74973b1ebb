//! Upstreams: named server sets that outlive reloads.
//!
//! The snapshot holds an [`Upstream`] per name (its settings from this config) pointing
//! at a [`ServerSet`] that is kept across reloads by name, so health, draining and
//! in-flight counts carry over; a reload reconciles addresses, it does not rebuild them.

pub mod balance;
mod discovery;
mod health;
pub mod server;
pub mod set;
mod tasks;

use std::sync::Arc;

pub use server::{InFlight, Server, ServerState};
pub use set::{ServerSet, SetSettings, TrialGuard};
pub use tasks::{Tasks, start_tasks};

use crate::config::UpstreamConfig;

#[derive(Debug)]
pub struct Upstream {
    pub config: UpstreamConfig,
    pub set: Arc<ServerSet>,
}
