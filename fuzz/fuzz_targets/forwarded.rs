//! `swarmgate::proxy::forwarded::forwarding`: the forwarding fields of a request, from a
//! map of fuzz-chosen forwarding fields, for a trusted or an untrusted peer, twice on the
//! same connection (the reused values) and once on a fresh one.
//!
//! Checked:
//! - no panic;
//! - no field written twice, and none left in the map under a name written;
//! - from an untrusted peer: no forwarding field, claim or look-alike left in the map;
//!   X-Forwarded-For is the peer's address; Host, Proto, Port are the request's;
//! - from a trusted one: X-Forwarded-For ends with the peer and is a comma list of IP
//!   addresses whenever what the peer sent was;
//! - X-Forwarded-Proto is http or https; X-Forwarded-Port a port;
//! - the `Forwarded` element written for the request reads back (by `Said::of`, as a
//!   swarmgate behind this one reads it) as the same host and scheme;
//! - a connection's reused values give what a fresh connection would.
#![no_main]

use std::net::IpAddr;

use arbitrary::Arbitrary;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use swarmgate::proxy::forwarded::{self, Facts, PeerValues, Said};

const NAMES: [&str; 14] = [
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-real-ip",
    "host",
    "x-request-id",
    "x_forwarded_for",
    "x-forwarded-ssl",
    "X_Forwarded_Host",
    "front-end-https",
    "x-other",
];

#[derive(Arbitrary, Debug, Clone)]
enum Ip {
    V4([u8; 4]),
    V6([u8; 16]),
    Mapped([u8; 4]),
}

impl Ip {
    fn addr(&self) -> IpAddr {
        match self {
            Ip::V4(b) => IpAddr::from(*b),
            Ip::V6(b) => IpAddr::from(*b),
            Ip::Mapped(b) => IpAddr::V6(std::net::Ipv4Addr::from(*b).to_ipv6_mapped()),
        }
    }
}

/// One `Forwarded` element's parts, as the target writes them.
type ElementParts = (Option<Ip>, Option<Vec<u8>>, Option<bool>, bool);

#[derive(Arbitrary, Debug)]
enum Value {
    Raw(Vec<u8>),
    Ips(Vec<Ip>),
    Elements(Vec<ElementParts>),
    Text(String),
}

impl Value {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Value::Raw(b) => b.clone(),
            Value::Text(s) => s.as_bytes().to_vec(),
            Value::Ips(ips) => ips.iter().map(|i| i.addr().to_string()).collect::<Vec<_>>().join(", ").into_bytes(),
            Value::Elements(els) => els
                .iter()
                .map(|(ip, host, proto, port)| {
                    let mut p = Vec::new();
                    if let Some(ip) = ip {
                        p.push(match ip.addr() {
                            IpAddr::V4(v4) if *port => format!("for=\"{v4}:4711\""),
                            IpAddr::V4(v4) => format!("for={v4}"),
                            IpAddr::V6(v6) => format!("for=\"[{v6}]\""),
                        });
                    }
                    if let Some(h) = host {
                        p.push(format!("host={}", String::from_utf8_lossy(h)));
                    }
                    if let Some(https) = proto {
                        p.push(format!("proto={}", if *https { "https" } else { "http" }));
                    }
                    p.join(";")
                })
                .collect::<Vec<_>>()
                .join(", ")
                .into_bytes(),
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Request {
    trusted: bool,
    https: bool,
    host: Value,
    port: u16,
    prefix: Option<Vec<u8>>,
    fields: Vec<(u8, Value)>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    peer: Ip,
    first: Request,
    second: Option<Request>,
}

fn is_ip_list(v: &[u8]) -> bool {
    std::str::from_utf8(v).is_ok_and(|s| s.split(',').all(|m| m.trim().parse::<IpAddr>().is_ok()))
}

fn map_of(req: &Request) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (sel, value) in &req.fields {
        let name = HeaderName::from_bytes(NAMES[usize::from(*sel) % NAMES.len()].as_bytes()).expect("a name");
        if let Ok(v) = HeaderValue::from_bytes(&value.bytes()) {
            map.append(name, v);
        }
    }
    map
}

/// Runs `forwarding` for `req` on `peer`; checks it; the fields but the request id.
fn run(peer: &PeerValues, peer_ip: IpAddr, req: &Request) -> Option<Vec<(String, Vec<u8>)>> {
    let host = HeaderValue::from_bytes(&req.host.bytes()).ok()?;
    let prefix = match &req.prefix {
        Some(p) => Some(HeaderValue::from_bytes(p).ok()?),
        None => None,
    };
    let proto = if req.https { "https" } else { "http" };
    let facts = Facts { peer, trusted: req.trusted, proto, host: &host, port: req.port, prefix: prefix.as_ref() };
    let before = map_of(req);
    let mut headers = before.clone();
    let out = forwarded::forwarding(&mut headers, &facts);
    let peer_text = peer_ip.to_canonical().to_string();

    let mut seen: Vec<&str> = Vec::new();
    for (name, _) in &out.fields {
        assert!(!seen.contains(&name.as_str()), "{name} written twice");
        seen.push(name.as_str());
        assert!(!headers.contains_key(*name), "{name} written and still in the map");
    }
    for name in headers.keys() {
        assert!(!forwarded::is_lookalike(name.as_str().as_bytes()), "look-alike {name} kept");
        if !req.trusted {
            assert!(!forwarded::is_forwarding(name.as_str().as_bytes()), "{name} from an untrusted peer kept");
        }
    }
    let get = |n: &str| out.fields.iter().find(|(name, _)| name.as_str() == n).map(|(_, v)| v.as_bytes());
    let xff = get("x-forwarded-for").expect("X-Forwarded-For always written");
    let last = std::str::from_utf8(xff).expect("ASCII").rsplit(',').next().expect("a member").trim();
    assert_eq!(last, peer_text, "X-Forwarded-For {:?} does not end with the peer", String::from_utf8_lossy(xff));
    if let Some(p) = get("x-forwarded-proto") {
        assert!(p == b"http" || p == b"https", "X-Forwarded-Proto {p:?}");
    }
    if let Some(p) = get("x-forwarded-port") {
        assert!(std::str::from_utf8(p).is_ok_and(|p| p.parse::<u16>().is_ok()), "X-Forwarded-Port {p:?}");
    }
    assert!(!out.request_id.is_empty());
    if req.trusted {
        let sent: Vec<&[u8]> = before.get_all("x-forwarded-for").iter().map(|v| v.as_bytes()).collect();
        let clean = if sent.is_empty() {
            true // from Forwarded, or the peer alone: addresses only
        } else {
            sent.iter().all(|v| is_ip_list(v))
        };
        if clean {
            assert!(is_ip_list(xff), "X-Forwarded-For {:?} from {sent:?}", String::from_utf8_lossy(xff));
        }
    } else {
        assert_eq!(xff, peer_text.as_bytes());
        assert_eq!(get("x-forwarded-proto"), Some(proto.as_bytes()));
        assert_eq!(get("x-forwarded-port"), Some(req.port.to_string().as_bytes()));
        if !host.is_empty() {
            assert_eq!(get("x-forwarded-host"), Some(host.as_bytes()));
        }
        // The element written reads back as the same facts.
        if let Some(element) = get("forwarded") {
            let mut own = HeaderMap::new();
            own.insert("forwarded", HeaderValue::from_bytes(element).expect("a value"));
            let said = Said::of(&own);
            assert_eq!(
                said.proto,
                Some(req.https),
                "Forwarded {:?}: scheme read back",
                String::from_utf8_lossy(element)
            );
            let h = host.to_str().expect("an element only for text hosts");
            let want = (!h.is_empty() && swarmgate::proxy::valid_authority(h)).then_some(h.as_bytes());
            assert!(
                said.host.as_ref().map(HeaderValue::as_bytes) == want,
                "Forwarded {:?}: host read back as {:?}, want {:?}",
                String::from_utf8_lossy(element),
                said.host,
                want.map(String::from_utf8_lossy)
            );
        } else {
            assert!(host.to_str().is_err(), "no Forwarded element for host {host:?}");
        }
    }
    Some(
        out.fields
            .iter()
            .filter(|(n, _)| n.as_str() != "x-request-id")
            .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
            .collect(),
    )
}

fuzz_target!(|input: Input| {
    let ip = input.peer.addr();
    let peer = PeerValues::new(ip);
    run(&peer, ip, &input.first);
    if let Some(second) = &input.second {
        let reused = run(&peer, ip, second);
        let fresh = run(&PeerValues::new(ip), ip, second);
        assert_eq!(reused, fresh, "a connection's reused values differ from a fresh connection's");
    }
});
