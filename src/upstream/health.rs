//! Active health checks: `GET health.path` on every server of a set each `interval`,
//! off the traffic threads. A server turns healthy after `healthy_after` consecutive
//! passes (a new server gets traffic only then) and unhealthy after `unhealthy_after`
//! consecutive failures. A pass is any 2xx or 3xx answer within `timeout`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Empty;
use hyper::Request;
use hyper_util::rt::TokioIo;

use super::server::{Server, ServerState};
use super::set::ServerSet;
use crate::config::HealthConfig;

#[derive(Default, Clone, Copy)]
struct Streak {
    passes: u32,
    fails: u32,
}

pub(super) async fn run(set: Arc<ServerSet>, health: HealthConfig) {
    let mut streaks: HashMap<SocketAddr, Streak> = HashMap::new();
    let mut interval = tokio::time::interval(health.interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let servers: Vec<Arc<Server>> =
            set.all().iter().filter(|s| s.state() != ServerState::Draining).cloned().collect();
        streaks.retain(|addr, _| servers.iter().any(|s| s.addr == *addr));
        let mut checks = tokio::task::JoinSet::new();
        for server in servers {
            let (path, timeout) = (health.path.clone(), health.timeout);
            checks.spawn(async move {
                let result = check(server.addr, &path, timeout).await;
                (server, result)
            });
        }
        let round = checks.len();
        while let Some(Ok((server, result))) = checks.join_next().await {
            let streak = streaks.entry(server.addr).or_default();
            match &result {
                Ok(()) => *streak = Streak { passes: streak.passes.saturating_add(1), fails: 0 },
                Err(_) => *streak = Streak { passes: 0, fails: streak.fails.saturating_add(1) },
            }
            if result.is_ok() {
                // It answers: whatever passive ejection guessed is over.
                set.end_ejection(&server);
            }
            let state = server.state();
            let changed = if streak.passes >= health.healthy_after && state != ServerState::Healthy {
                set.set_health(&server, true)
            } else if streak.fails >= health.unhealthy_after && state == ServerState::Healthy {
                // A new server stays pending (never served) until its first pass.
                set.resolve_soon();
                set.set_health(&server, false)
            } else {
                false
            };
            if changed {
                match result {
                    Ok(()) => {
                        tracing::info!(upstream = %set.name, server = %server.addr, "server is healthy")
                    }
                    Err(e) => {
                        tracing::warn!(upstream = %set.name, server = %server.addr, error = %e, "server is unhealthy")
                    }
                }
            }
        }
        if round > 0 {
            set.mark_checked();
        }
    }
}

/// One check on a fresh connection (a pooled one could hide a dead listener).
pub(super) async fn check(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(), String> {
    let attempt = async {
        let stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Empty<bytes::Bytes>>(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(conn);
        let req = Request::get(path)
            .header(hyper::header::HOST, addr.to_string())
            .header(hyper::header::USER_AGENT, "swarmgate-health-check")
            .header(hyper::header::CONNECTION, "close")
            .body(Empty::new())
            .map_err(|e| format!("request: {e}"))?;
        let res = sender.send_request(req).await.map_err(|e| format!("request: {e}"))?;
        let status = res.status();
        if status.is_success() || status.is_redirection() { Ok(()) } else { Err(format!("status {status}")) }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}
