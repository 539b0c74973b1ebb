//! Upstream fleets for rollout and health tests: servers bound to chosen loopback
//! addresses that record what reaches them and can turn unhealthy or die, and a tiny DNS
//! server for discovery tests.
#![allow(dead_code, unreachable_pub)]

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, UdpSocket};
use tokio_util::sync::CancellationToken;

/// What a server saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub at: Instant,
    pub method: String,
    pub id: String,
}

/// A server bound to a chosen loopback address, recording what reaches it.
pub struct Server {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    kill: CancellationToken,
    healthy: Arc<AtomicBool>,
    health_checks: Arc<AtomicU64>,
}

impl Server {
    pub async fn start(addr: SocketAddr) -> Server {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let kill = CancellationToken::new();
        let healthy = Arc::new(AtomicBool::new(true));
        let health_checks = Arc::new(AtomicU64::new(0));
        let (seen2, kill2, healthy2, checks2) =
            (Arc::clone(&seen), kill.clone(), Arc::clone(&healthy), Arc::clone(&health_checks));
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    () = kill2.cancelled() => return,
                    r = listener.accept() => match r { Ok(c) => c, Err(_) => continue },
                };
                let (seen, kill, healthy, checks) =
                    (Arc::clone(&seen2), kill2.clone(), Arc::clone(&healthy2), Arc::clone(&checks2));
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let (seen, healthy, checks) = (Arc::clone(&seen), Arc::clone(&healthy), Arc::clone(&checks));
                        async move {
                            if req.uri().path() == "/health" {
                                checks.fetch_add(1, Ordering::Relaxed);
                                let mut r = Response::new(Full::new(Bytes::from_static(b"health")));
                                if !healthy.load(Ordering::Relaxed) {
                                    *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                                }
                                return Ok::<_, Infallible>(r);
                            }
                            let method = req.method().to_string();
                            let body = req.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
                            let id = String::from_utf8_lossy(&body).into_owned();
                            seen.lock().unwrap().push(Seen { at: Instant::now(), method, id });
                            // Some work, so requests are in flight when servers change.
                            tokio::time::sleep(Duration::from_millis(2)).await;
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                        }
                    });
                    let conn =
                        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
                    tokio::select! {
                        _ = conn => {}
                        () = kill.cancelled() => {} // dropped: the connection closes mid-whatever
                    }
                });
            }
        });
        Server { addr, seen, kill, healthy, health_checks }
    }

    /// Stops listening and drops every connection at once, without warning.
    pub fn kill(&self) {
        self.kill.cancel();
    }

    /// What `/health` answers from now on (200 or 503).
    pub fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::Relaxed);
    }

    pub fn health_checks(&self) -> u64 {
        self.health_checks.load(Ordering::Relaxed)
    }

    /// Requests other than health checks.
    pub fn hits(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// A DNS server for one name answering A queries with the current address list.
pub struct Dns {
    pub addr: SocketAddr,
    answers: Arc<Mutex<Vec<Ipv4Addr>>>,
    pub queries: Arc<AtomicU64>,
    /// When false, queries are dropped unanswered (a DNS outage).
    pub answering: Arc<AtomicBool>,
    /// When not 0, every query is answered with this response code and no records
    /// (2 SERVFAIL, 3 NXDOMAIN, 5 REFUSED).
    pub rcode: Arc<AtomicU8>,
}

impl Dns {
    pub async fn start(name: &str, first: Vec<Ipv4Addr>) -> Dns {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let answers = Arc::new(Mutex::new(first));
        let queries = Arc::new(AtomicU64::new(0));
        let answering = Arc::new(AtomicBool::new(true));
        let rcode = Arc::new(AtomicU8::new(0));
        let (answers2, queries2, answering2, rcode2, name) =
            (Arc::clone(&answers), Arc::clone(&queries), Arc::clone(&answering), Arc::clone(&rcode), name.to_string());
        tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buf).await else { return };
                queries2.fetch_add(1, Ordering::Relaxed);
                if !answering2.load(Ordering::Relaxed) {
                    continue;
                }
                let ips = answers2.lock().unwrap().clone();
                let reply = match rcode2.load(Ordering::Relaxed) {
                    0 => dns_reply(&buf[..n], &name, &ips),
                    code => dns_reply(&buf[..n], &name, &[]).map(|mut r| {
                        r[3] = 0x80 | code;
                        r
                    }),
                };
                if let Some(reply) = reply {
                    let _ = socket.send_to(&reply, from).await;
                }
            }
        });
        Dns { addr, answers, queries, answering, rcode }
    }

    pub fn set(&self, ips: Vec<Ipv4Addr>) {
        *self.answers.lock().unwrap() = ips;
    }
}

/// An answer to a one-question query (RFC 1035 section 4.1): A records for `name`, no
/// records (NOERROR) for any other type, NXDOMAIN for other names.
pub fn dns_reply(query: &[u8], name: &str, ips: &[Ipv4Addr]) -> Option<Vec<u8>> {
    if query.len() < 12 {
        return None;
    }
    let mut i = 12;
    let mut labels = Vec::new();
    while i < query.len() && query[i] != 0 {
        let len = query[i] as usize;
        labels.push(String::from_utf8_lossy(query.get(i + 1..i + 1 + len)?).to_ascii_lowercase());
        i += 1 + len;
    }
    let qtype = u16::from_be_bytes([*query.get(i + 1)?, *query.get(i + 2)?]);
    let question_end = i + 5;
    let matches = labels.join(".") == name;
    let answers: Vec<Ipv4Addr> = if matches && qtype == 1 { ips.to_vec() } else { Vec::new() };
    let mut out = Vec::with_capacity(question_end + 16 * answers.len());
    out.extend_from_slice(&query[0..2]); // id
    let rcode = if matches { 0 } else { 3 };
    out.extend_from_slice(&[0x81, 0x80 | rcode]); // response, RD, RA
    out.extend_from_slice(&[0, 1]); // QDCOUNT
    out.extend_from_slice(&(answers.len() as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]); // NSCOUNT, ARCOUNT
    out.extend_from_slice(query.get(12..question_end)?);
    for ip in answers {
        out.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 0, 0, 4]);
        out.extend_from_slice(&ip.octets());
    }
    Some(out)
}
