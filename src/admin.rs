//! The admin listener: `/healthz`, `/readyz`, `/metrics`, `/upstreams`, `/certificates`
//! and `POST /upstreams/{name}/drain?server=IP:PORT`.
//!
//! It runs on the control runtime, so it answers while traffic saturates the workers.
//! Mutating calls need `Authorization: Bearer $SWARMGATE_ADMIN_TOKEN`: without the
//! variable every one is refused (403), with a wrong or missing token 401.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::gateway::Gateway;
use crate::metrics::{CLASSES, family, label};
use crate::tls::store::seconds_left;

/// Settings of the admin API.
#[derive(Clone)]
pub struct Admin {
    pub gw: Arc<Gateway>,
    /// `SWARMGATE_ADMIN_TOKEN`; `None` refuses every mutating call.
    pub token: Option<String>,
}

/// Serves the admin API until `stop` fires.
pub async fn serve(listener: TcpListener, admin: Admin, stop: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            () = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    if crate::proxy::listener::ACCEPT_WARNINGS.allow(60) {
                        tracing::warn!(error = %e, "admin accept failed (more within a minute: debug)");
                    } else {
                        tracing::debug!(error = %e, "admin accept failed");
                    }
                    if crate::proxy::listener::local_shortage(&e) {
                        crate::proxy::shed_idle_connections(&admin.gw);
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(route(&admin, req).await) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "admin connection ended with an error");
            }
        });
    }
}

type Resp = Response<Full<Bytes>>;

fn reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Resp {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn text(status: StatusCode, body: &'static str) -> Resp {
    reply(status, "text/plain; charset=utf-8", body)
}

async fn route(admin: &Admin, req: Request<Incoming>) -> Resp {
    let gw = &admin.gw;
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    match (method, path.as_str()) {
        (Method::GET | Method::HEAD, "/healthz") => text(StatusCode::OK, "ok\n"),
        (Method::GET | Method::HEAD, "/readyz") => match gw.readiness() {
            crate::gateway::Readiness::Ready => text(StatusCode::OK, "ready\n"),
            crate::gateway::Readiness::Starting => text(StatusCode::SERVICE_UNAVAILABLE, "starting\n"),
            crate::gateway::Readiness::ShuttingDown => text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n"),
        },
        (Method::GET | Method::HEAD, "/metrics") => {
            reply(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", render_metrics(gw))
        }
        (Method::GET | Method::HEAD, "/upstreams") => reply(StatusCode::OK, "application/json", upstreams_json(gw)),
        (Method::GET | Method::HEAD, "/certificates") => {
            reply(StatusCode::OK, "application/json", certificates_json(gw))
        }
        (Method::POST, p) if drain_target(p).is_some() => {
            if let Some(resp) = authorize(admin, &req) {
                return resp;
            }
            let name = drain_target(p).unwrap_or_default();
            let server = req
                .uri()
                .query()
                .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("server=")))
                .map(str::to_string);
            let _ = req.into_body().collect().await;
            drain(gw, name, server.as_deref())
        }
        (_, "/healthz" | "/readyz" | "/metrics" | "/upstreams" | "/certificates") => {
            let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
            r.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            r
        }
        (_, p) if drain_target(p).is_some() => {
            let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
            r.headers_mut().insert(header::ALLOW, HeaderValue::from_static("POST"));
            r
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// The upstream's name in `/upstreams/{name}/drain` (not empty, no `/`).
fn drain_target(path: &str) -> Option<&str> {
    let name = path.strip_prefix("/upstreams/")?.strip_suffix("/drain")?;
    (!name.is_empty() && !name.contains('/')).then_some(name)
}

/// `None` when the request carries the admin token, else the refusal to send.
fn authorize(admin: &Admin, req: &Request<Incoming>) -> Option<Resp> {
    let Some(token) = admin.token.as_deref().filter(|t| !t.is_empty()) else {
        return Some(text(
            StatusCode::FORBIDDEN,
            "mutating admin calls are disabled: SWARMGATE_ADMIN_TOKEN is not set\n",
        ));
    };
    // The scheme's name is case-insensitive (RFC 9110 section 11.1).
    let given = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| {
        let (scheme, token) = v.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim_start())
    });
    match given {
        Some(g) if constant_time_eq(g.as_bytes(), token.as_bytes()) => None,
        _ => {
            let mut r = text(StatusCode::UNAUTHORIZED, "missing or wrong bearer token\n");
            r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            Some(r)
        }
    }
}

/// Compares without an early exit, so timing does not reveal the token.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn drain(gw: &Gateway, name: &str, server: Option<&str>) -> Resp {
    let snap = gw.snapshot();
    let Some(upstream) = snap.upstreams.get(name) else {
        return text(StatusCode::NOT_FOUND, "no such upstream\n");
    };
    let Some(addr) = server.and_then(|s| {
        s.replace("%3A", ":").replace("%3a", ":").replace("%5B", "[").replace("%5D", "]").parse::<SocketAddr>().ok()
    }) else {
        return text(StatusCode::BAD_REQUEST, "needs ?server=IP:PORT\n");
    };
    if upstream.set.drain(addr) {
        tracing::info!(upstream = name, server = %addr, "server drained by admin request");
        reply(
            StatusCode::OK,
            "application/json",
            serde_json::json!({"upstream": name, "server": addr.to_string(), "state": "draining"}).to_string(),
        )
    } else {
        text(StatusCode::NOT_FOUND, "no such server in this upstream\n")
    }
}

fn upstreams_json(gw: &Gateway) -> String {
    let snap = gw.snapshot();
    let mut names: Vec<&String> = snap.upstreams.keys().collect();
    names.sort();
    let now = tokio::time::Instant::now();
    let list: Vec<serde_json::Value> = names
        .into_iter()
        .filter_map(|n| snap.upstreams.get(n))
        .map(|u| {
            u.set.settle_answered_trials();
            let servers: Vec<serde_json::Value> = u
                .set
                .all()
                .iter()
                .map(|s| {
                    serde_json::json!({
                        "address": s.addr.to_string(),
                        // The interface's three states; a server waiting for its first
                        // passing check is not served, so it reads `unhealthy`, `pending`.
                        "state": match s.state() {
                            crate::upstream::ServerState::Pending => "unhealthy",
                            state => state.as_str(),
                        },
                        "pending": s.state() == crate::upstream::ServerState::Pending,
                        "ejected": s.is_ejected(),
                        "awaiting_trial": s.awaits_trial(now),
                        "in_flight": s.in_flight(),
                        "requests": s.requests.load(Ordering::Relaxed),
                        "idle_connections": s.pool.idle_count(),
                    })
                })
                .collect();
            serde_json::json!({
                "name": u.set.name,
                "balance": match u.config.balance { crate::config::Balance::Random => "random", crate::config::Balance::P2c => "p2c" },
                "discovery": u.config.dns.as_ref().map(|d| format!("{}:{}", d.name, d.port)),
                // Its last lookup failed: the servers are the last ones DNS listed.
                "dns_failing": u.set.is_stale(),
                "servers": servers,
            })
        })
        .collect();
    serde_json::json!({ "generation": snap.generation, "upstreams": list }).to_string()
}

fn certificates_json(gw: &Gateway) -> String {
    let statics = gw.certs.statics();
    let acme = gw.certs.acme();
    let list: Vec<serde_json::Value> = statics
        .infos()
        .chain(acme.infos())
        .map(|c| {
            serde_json::json!({
                "names": c.names,
                "issuer": c.issuer,
                "not_after": c.not_after,
                "seconds_left": seconds_left(c.not_after),
                "source": c.source,
                "file": c.file.as_ref().map(|f| f.display().to_string()),
            })
        })
        .collect();
    let snap = gw.snapshot();
    let (replica, storage) = gw.acme.identity();
    let acme = snap.config.acme.as_ref().map(|a| {
        serde_json::json!({
            "directory": a.directory,
            "challenge": match a.challenge {
                crate::config::Challenge::Http01 => "http-01",
                crate::config::Challenge::TlsAlpn01 => "tls-alpn-01",
            },
            "names": gw.acme.status(),
            "replica": replica,
            "storage": storage,
            "store_reachable": gw.acme.stats.store.is_up(),
        })
    });
    serde_json::json!({ "certificates": list, "acme": acme }).to_string()
}

/// The Prometheus text exposition of everything.
pub fn render_metrics(gw: &Gateway) -> String {
    let snap = gw.snapshot();
    let m = &gw.metrics;
    let mut out = String::with_capacity(16 * 1024);

    family(&mut out, "swarmgate_requests_total", "counter", "Requests answered, by route, upstream and status class.");
    for r in &snap.routes {
        let (route, up) = (label(r.label()), label(&r.upstream.set.name));
        for (class, n) in CLASSES.iter().zip(r.stats.class_counts()) {
            let _ =
                writeln!(out, "swarmgate_requests_total{{route=\"{route}\",upstream=\"{up}\",class=\"{class}\"}} {n}");
        }
    }
    for (class, n) in CLASSES.iter().zip(m.unrouted.class_counts()) {
        let _ = writeln!(out, "swarmgate_requests_total{{route=\"\",upstream=\"\",class=\"{class}\"}} {n}");
    }
    family(
        &mut out,
        "swarmgate_responses_total",
        "counter",
        "Requests answered, by route, upstream and status code (the codes seen; a class, such as 4xx, for the codes not counted one by one).",
    );
    for r in &snap.routes {
        let (route, up) = (label(r.label()), label(&r.upstream.set.name));
        for (status, n) in r.stats.status_counts() {
            let _ = writeln!(
                out,
                "swarmgate_responses_total{{route=\"{route}\",upstream=\"{up}\",status=\"{status}\"}} {n}"
            );
        }
    }
    for (status, n) in m.unrouted.status_counts() {
        let _ = writeln!(out, "swarmgate_responses_total{{route=\"\",upstream=\"\",status=\"{status}\"}} {n}");
    }
    family(
        &mut out,
        "swarmgate_request_duration_seconds",
        "histogram",
        "Time from request head to the end of the response body.",
    );
    for r in &snap.routes {
        let labels = format!("route=\"{}\",upstream=\"{}\"", label(r.label()), label(&r.upstream.set.name));
        r.stats.duration.render(&mut out, "swarmgate_request_duration_seconds", &labels);
    }
    m.unrouted.duration.render(&mut out, "swarmgate_request_duration_seconds", "route=\"\",upstream=\"\"");

    let mut names: Vec<&String> = snap.upstreams.keys().collect();
    names.sort();
    family(
        &mut out,
        "swarmgate_upstream_servers",
        "gauge",
        "Servers by state (ejected counts servers passively ejected).",
    );
    for n in &names {
        let c = snap.upstreams[*n].set.counts();
        for (state, v) in ["pending", "healthy", "unhealthy", "draining", "ejected"].iter().zip(c) {
            let _ = writeln!(out, "swarmgate_upstream_servers{{upstream=\"{}\",state=\"{state}\"}} {v}", label(n));
        }
    }
    let per_upstream = [
        ("swarmgate_upstream_connect_errors_total", "Failed connects to servers.", 0),
        ("swarmgate_upstream_ejections_total", "Servers passively ejected after failures.", 1),
        ("swarmgate_upstream_resolve_errors_total", "DNS lookups that got no answer.", 2),
        ("swarmgate_upstream_health_transitions_total", "Health state changes from active checks.", 3),
    ];
    for (name, help, which) in per_upstream {
        family(&mut out, name, "counter", help);
        for n in &names {
            let st = &snap.upstreams[*n].set.stats;
            let v = [&st.connect_errors, &st.ejections, &st.resolve_errors, &st.health_transitions][which]
                .load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}{{upstream=\"{}\"}} {v}", label(n));
        }
    }
    family(
        &mut out,
        "swarmgate_upstream_dns_failing",
        "gauge",
        "1 while a DNS upstream's last lookup got no answer (its servers are the last ones listed).",
    );
    for n in &names {
        let failing = u8::from(snap.upstreams[*n].set.is_stale());
        let _ = writeln!(out, "swarmgate_upstream_dns_failing{{upstream=\"{}\"}} {failing}", label(n));
    }
    let simple = [
        (
            "swarmgate_open_connections",
            "gauge",
            "Client connections open now.",
            m.open_connections.load(Ordering::Relaxed),
        ),
        (
            "swarmgate_connections_total",
            "counter",
            "Client connections accepted.",
            m.connections_total.load(Ordering::Relaxed) as i64,
        ),
        (
            "swarmgate_connections_parked_total",
            "counter",
            "Times an idle HTTP/1.1 connection was parked: its buffers freed until its next request.",
            m.connections_parked.load(Ordering::Relaxed) as i64,
        ),
        (
            "swarmgate_tls_handshakes_total",
            "counter",
            "Completed TLS handshakes.",
            m.tls_handshakes.load(Ordering::Relaxed) as i64,
        ),
        (
            "swarmgate_tls_handshake_errors_total",
            "counter",
            "Failed or timed-out TLS handshakes (a client closing during one is not counted).",
            m.tls_handshake_errors.load(Ordering::Relaxed) as i64,
        ),
        (
            "swarmgate_retries_total",
            "counter",
            "Requests sent again to another server.",
            m.retries.load(Ordering::Relaxed) as i64,
        ),
        (
            "swarmgate_h2_streams_stalled_total",
            "counter",
            "HTTP/2 streams reset as neither side moved them for idle_timeout (or a second past the longest response_timeout): a client that takes none of its response.",
            crate::proxy::activity::STALLED_STREAMS.load(Ordering::Relaxed) as i64,
        ),
        (
            "swarmgate_h2_reset_floods_total",
            "counter",
            "HTTP/2 connections ended with GOAWAY for cancelling most of their requests (100 or more, at least half): a rapid-reset flood.",
            m.h2_reset_floods.load(Ordering::Relaxed) as i64,
        ),
        (
            "swarmgate_connection_limit_waits_total",
            "counter",
            "Accepted clients that found the client connections at their limit (max_connections, or the open-files cap) and waited for one to end.",
            m.connection_limit_waits.load(Ordering::Relaxed) as i64,
        ),
        (
            "swarmgate_slow_heads_total",
            "counter",
            "HTTP/1.1 connections closed because a request head did not arrive whole within header_read_timeout (a slowloris, or a client stalled mid-head).",
            m.slow_heads.load(Ordering::Relaxed) as i64,
        ),
        (
            "swarmgate_upgrades_total",
            "counter",
            "Upgrade (WebSocket) requests sent to servers.",
            m.upgrades.load(Ordering::Relaxed) as i64,
        ),
        ("swarmgate_config_generation", "gauge", "Reloads applied since start.", snap.generation as i64),
    ];
    for (name, kind, help, v) in simple {
        family(&mut out, name, kind, help);
        let _ = writeln!(out, "{name} {v}");
    }
    family(&mut out, "swarmgate_reloads_total", "counter", "Configuration reloads by result.");
    let _ = writeln!(out, "swarmgate_reloads_total{{result=\"ok\"}} {}", m.reloads_ok.load(Ordering::Relaxed));
    let _ = writeln!(out, "swarmgate_reloads_total{{result=\"failed\"}} {}", m.reloads_failed.load(Ordering::Relaxed));
    family(&mut out, "swarmgate_certificate_expiry_seconds", "gauge", "Seconds until a served certificate expires.");
    let (statics, acme) = (gw.certs.statics(), gw.certs.acme());
    // One series per name and source: of two certificates for a name (a renewed file
    // beside the old one), the one served, which is the first.
    let mut seen = std::collections::HashSet::new();
    for c in statics.infos().chain(acme.infos()) {
        let source = match c.source {
            crate::tls::CertSource::Static => "static",
            crate::tls::CertSource::Acme => "acme",
            crate::tls::CertSource::Dev => "dev",
        };
        for name in &c.names {
            if !seen.insert((name.to_ascii_lowercase(), source)) {
                continue;
            }
            let _ = writeln!(
                out,
                "swarmgate_certificate_expiry_seconds{{name=\"{}\",source=\"{source}\"}} {}",
                label(name),
                seconds_left(c.not_after)
            );
        }
    }
    let st = &gw.acme.stats;
    family(&mut out, "swarmgate_acme_orders_total", "counter", "ACME certificate orders by result.");
    for (result, n) in [("ok", &st.orders_ok), ("failed", &st.orders_failed)] {
        let _ = writeln!(out, "swarmgate_acme_orders_total{{result=\"{result}\"}} {}", n.load(Ordering::Relaxed));
    }
    let acme_simple = [
        (
            "swarmgate_acme_renewals_total",
            "counter",
            "ACME certificates replaced by a renewal.",
            st.renewals.load(Ordering::Relaxed),
        ),
        (
            "swarmgate_acme_certificates_pending",
            "gauge",
            "Route hosts waiting for their first ACME certificate.",
            st.pending.load(Ordering::Relaxed),
        ),
    ];
    let acme_cluster = [
        (
            "swarmgate_acme_lock_waits_total",
            "counter",
            "Times another replica held a name's (or the account's) lease and this one waited.",
            st.store.lock_waits.load(Ordering::Relaxed),
        ),
        (
            "swarmgate_acme_picked_up_total",
            "counter",
            "Certificates another replica stored, loaded and served here.",
            st.picked_up.load(Ordering::Relaxed),
        ),
        (
            "swarmgate_acme_store_errors_total",
            "counter",
            "Failed calls to the ACME store (Redis unreachable, timeouts, errors).",
            st.store.errors.load(Ordering::Relaxed),
        ),
        (
            "swarmgate_acme_store_up",
            "gauge",
            "1 while the ACME store answers, 0 while it cannot be reached.",
            st.store.up.load(Ordering::Relaxed),
        ),
    ];
    for (name, kind, help, v) in acme_simple.into_iter().chain(acme_cluster) {
        family(&mut out, name, kind, help);
        let _ = writeln!(out, "{name} {v}");
    }
    family(
        &mut out,
        "swarmgate_acme_propagation_seconds",
        "histogram",
        "From a certificate stored by another replica to its being served here.",
    );
    let mut hist = String::new();
    st.propagation.render(&mut hist, "swarmgate_acme_propagation_seconds", "");
    // The shared renderer writes `{,le=..}` and `{}` without labels: tidy both.
    out.push_str(&hist.replace("{,", "{").replace("{}", ""));
    family(
        &mut out,
        "swarmgate_acme_certificate_ready",
        "gauge",
        "1 when an ACME host has an unexpired certificate to serve, else 0.",
    );
    for n in gw.acme.status() {
        let ready = u8::from(n.not_after.is_some() && n.state != "expired");
        let _ = writeln!(out, "swarmgate_acme_certificate_ready{{name=\"{}\"}} {ready}", label(&n.name));
    }
    out
}
