//! Per-upstream background tasks (DNS discovery, active health checks) on the control
//! runtime, restarted only when their own settings change across a reload.

use std::sync::Arc;

use tokio::task::AbortHandle;

use crate::config::{Config, DnsTarget, HealthConfig};
use crate::gateway::Gateway;

#[derive(Debug, Default)]
pub struct Tasks {
    discovery: Option<(DnsTarget, std::time::Duration, AbortHandle)>,
    health: Option<(HealthConfig, AbortHandle)>,
}

impl Drop for Tasks {
    fn drop(&mut self) {
        if let Some((_, _, h)) = &self.discovery {
            h.abort();
        }
        if let Some((_, h)) = &self.health {
            h.abort();
        }
    }
}

/// Starts, keeps or stops each upstream's tasks to match `config`.
pub fn start_tasks(gw: &Arc<Gateway>, config: &Config) {
    let snapshot = gw.snapshot();
    let mut tasks = gw.tasks.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    tasks.retain(|name, _| config.upstreams.contains_key(name));
    let nameservers = &config.discovery.nameservers;
    for (name, up) in &config.upstreams {
        let Some(upstream) = snapshot.upstreams.get(name) else {
            continue;
        };
        let entry = tasks.entry(name.clone()).or_default();
        let want_dns = up.dns.clone().map(|d| (d, up.resolve_every));
        let have_dns = entry.discovery.as_ref().map(|(d, every, _)| (d.clone(), *every));
        if want_dns != have_dns || (want_dns.is_some() && nameservers_changed(gw, config)) {
            if let Some((_, _, h)) = entry.discovery.take() {
                h.abort();
            }
            if let Some((target, every)) = want_dns {
                let set = Arc::clone(&upstream.set);
                let handle = tokio::spawn(super::discovery::run(set, target.clone(), every, nameservers.clone()));
                entry.discovery = Some((target, every, handle.abort_handle()));
            }
        }
        let have_health = entry.health.as_ref().map(|(h, _)| h.clone());
        if up.health != have_health {
            if let Some((_, h)) = entry.health.take() {
                h.abort();
            }
            if let Some(health) = up.health.clone() {
                let set = Arc::clone(&upstream.set);
                let handle = tokio::spawn(super::health::run(set, health.clone()));
                entry.health = Some((health, handle.abort_handle()));
            }
        }
    }
    *gw.nameservers.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = nameservers.clone();
}

fn nameservers_changed(gw: &Gateway, config: &Config) -> bool {
    *gw.nameservers.lock().unwrap_or_else(std::sync::PoisonError::into_inner) != config.discovery.nameservers
}
