//! What a service is told about the request it gets: the public base URL and the client.
//!
//! Sets `X-Forwarded-For`, `-Proto`, `-Host`, `-Port`, `-Prefix`, RFC 7239 `Forwarded`
//! and `X-Request-Id`. From a peer in `trusted_proxies` the existing values are kept and
//! the chains (`X-Forwarded-For`, `Forwarded`) extended; from anyone else every one of
//! them is replaced, so a client can never spoof its address or the public URL.

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Mutex;

use hyper::HeaderMap;
use hyper::header::{FORWARDED, HeaderName, HeaderValue};
use rand::Rng;

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub static X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");
pub static X_FORWARDED_PREFIX: HeaderName = HeaderName::from_static("x-forwarded-prefix");
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Per-connection values: the client's address, and what its requests' forwarding
/// fields were made of, kept while the connection is busy and let go of while it is
/// parked ([`PeerValues::forget`]): an idle connection keeps only the address.
#[derive(Debug)]
pub struct PeerValues {
    /// The client's address (an IPv4-mapped IPv6 address as IPv4).
    ip: IpAddr,
    /// The values the last request of the connection got, reused while its authority
    /// stays the same (nearly always): a `Forwarded` element and a port are otherwise
    /// built and allocated for every request.
    last: Mutex<Option<Box<Reused>>>,
}

#[derive(Debug)]
struct Reused {
    /// The client IP as `X-Forwarded-For` writes it.
    ip: HeaderValue,
    host: HeaderValue,
    port: u16,
    proto: &'static str,
    element: Option<HeaderValue>,
    port_value: HeaderValue,
}

/// What a request's forwarding fields are made of.
struct Values {
    ip: HeaderValue,
    element: Option<HeaderValue>,
    port: HeaderValue,
}

impl PeerValues {
    pub fn new(ip: IpAddr) -> Self {
        PeerValues { ip: ip.to_canonical(), last: Mutex::new(None) }
    }

    /// The values for `f`: the last request's when its authority, port and scheme were
    /// the same, else made anew (the IP's text kept from the last request).
    fn values(&self, f: &Facts<'_>) -> Values {
        let mut last = self.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(r) = last.as_ref().filter(|r| r.port == f.port && r.proto == f.proto && r.host == f.host) {
            return Values { ip: r.ip.clone(), element: r.element.clone(), port: r.port_value.clone() };
        }
        let ip = match last.take() {
            Some(r) => r.ip,
            None => HeaderValue::from_str(&self.ip.to_string()).unwrap_or(HeaderValue::from_static("unknown")),
        };
        let reused = Box::new(Reused {
            element: forwarded_element(self.ip, f),
            ip,
            // A copy, not a clone: a request's header values are slices of the buffer its
            // head was read into, and a clone kept here would pin that whole buffer (8 KiB)
            // for as long as the connection is busy.
            host: HeaderValue::from_bytes(f.host.as_bytes()).unwrap_or_else(|_| f.host.clone()),
            port: f.port,
            proto: f.proto,
            port_value: port_value(f.port),
        });
        let out = Values { ip: reused.ip.clone(), element: reused.element.clone(), port: reused.port_value.clone() };
        *last = Some(reused);
        out
    }

    /// Lets go of the last request's values (the connection is idle).
    pub fn forget(&self) {
        self.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
    }
}

/// The facts of one request.
pub struct Facts<'a> {
    pub peer: &'a PeerValues,
    pub trusted: bool,
    pub proto: &'static str,
    /// The authority the client used (Host, or `:authority` on HTTP/2).
    pub host: &'a HeaderValue,
    /// The public port: from the authority, else the scheme's default.
    pub port: u16,
    /// The prefix `strip_path` removed.
    pub prefix: Option<&'a HeaderValue>,
}

/// The forwarding fields a request gets on top of what is left of its own: the client's
/// values replaced (or, from a trusted peer, kept or extended), and the request id.
#[derive(Debug)]
pub struct Forwarding {
    /// Written after the request's own fields (`h1::encode_head`); the request no
    /// longer carries any field of these names.
    pub fields: Vec<(&'static HeaderName, HeaderValue)>,
    pub request_id: HeaderValue,
}

impl Forwarding {
    /// Puts the fields into `headers` (a request that is not encoded by `h1`).
    pub fn insert_into(&self, headers: &mut HeaderMap) {
        for (name, value) in &self.fields {
            headers.append(*name, value.clone());
        }
    }
}

/// The names this module writes, in the order they are written.
static NAMES: [&HeaderName; 7] = [
    &X_FORWARDED_FOR,
    &X_FORWARDED_PROTO,
    &X_FORWARDED_HOST,
    &X_FORWARDED_PORT,
    &X_FORWARDED_PREFIX,
    &FORWARDED,
    &X_REQUEST_ID,
];

/// [`NAMES`] as bytes (a `HeaderName`'s bytes take a branch to reach).
const NAME_BYTES: [&[u8]; 7] = [
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"x-forwarded-port",
    b"x-forwarded-prefix",
    b"forwarded",
    b"x-request-id",
];

/// Fields this module does not write that servers read as the same facts: the client's
/// address (`X-Real-IP`, what many frameworks take when it is there, and the names CDNs
/// and some frameworks use: `True-Client-IP`, `X-Client-IP`, `Client-IP`,
/// `X-Cluster-Client-IP`), the scheme (Rack's `X-Forwarded-Ssl: on` and
/// `X-Forwarded-Scheme`, `Front-End-Https: on`), and `X-Forwarded` (read by some as
/// `Forwarded`). Kept from a trusted peer, removed from anyone else: a client could
/// otherwise tell a service it came over https, or from another address.
const CLAIM_BYTES: [&[u8]; 9] = [
    b"x-real-ip",
    b"x-forwarded-ssl",
    b"x-forwarded-scheme",
    b"front-end-https",
    b"true-client-ip",
    b"x-client-ip",
    b"client-ip",
    b"x-cluster-client-ip",
    b"x-forwarded",
];

/// Whether a field called `name` (any case) is one this module reads and writes, or a
/// claim of the same facts ([`CLAIM_BYTES`]). Asked of every field a client sends: the
/// first byte is looked at first, then the length.
#[inline]
pub fn is_forwarding(name: &[u8]) -> bool {
    name.first().is_some_and(|&b| matches!(b | 0x20, b'x' | b'f' | b't' | b'c'))
        && (listed(&NAME_BYTES, name) || listed(&CLAIM_BYTES, name))
}

/// Whether `name` is one of [`CLAIM_BYTES`].
fn is_claim(name: &[u8]) -> bool {
    listed(&CLAIM_BYTES, name)
}

/// Whether `name` is one of `names` (lower case), in any case.
fn listed(names: &[&[u8]], name: &[u8]) -> bool {
    names.iter().any(|n| n.len() == name.len() && name.eq_ignore_ascii_case(n))
}

/// The framing fields, whose look-alikes are removed too (see [`is_lookalike`]).
const FRAMING_BYTES: [&[u8]; 2] = [b"content-length", b"transfer-encoding"];

/// Whether `name` is one of those fields, or a framing field, spelt with `_` for `-`
/// (`X_Forwarded_For`, `Transfer_Encoding`). Servers with CGI-style variables (WSGI,
/// Rack, PHP) read both spellings as one (`HTTP_X_FORWARDED_FOR`), so a client could pass
/// its own value in under the other spelling, and a server that reads `_` as `-` would
/// frame the request by a field the gateway did not: such a field is removed, whoever
/// sent it.
#[inline]
pub fn is_lookalike(name: &[u8]) -> bool {
    let alike = |ours: &u8, theirs: &u8| *ours == theirs.to_ascii_lowercase() || (*ours == b'-' && *theirs == b'_');
    // `Forwarded` has no `-`; the others begin with `x`, `f`, `c` or `t`.
    name.first().is_some_and(|&b| matches!(b | 0x20, b'x' | b'f' | b'c' | b't'))
        && NAME_BYTES
            .iter()
            .chain(&CLAIM_BYTES)
            .chain(&FRAMING_BYTES)
            .any(|n| n.len() == name.len() && n.iter().zip(name).all(|(o, t)| alike(o, t)))
        && name.contains(&b'_')
}

/// Works out the forwarding fields of a request, and removes from `headers` the fields
/// they replace (and their look-alikes, see [`is_lookalike`]). Nothing is inserted into
/// the map: the fields are written with the head.
pub fn forwarding(headers: &mut HeaderMap, f: &Facts<'_>) -> Forwarding {
    // One pass over the names: most requests carry none of these, and then the map is
    // left alone.
    let mut present = [false; NAMES.len()];
    let mut removed = Vec::new();
    for name in headers.keys() {
        if let Some(i) = NAMES.iter().position(|n| *n == name) {
            present[i] = true;
        } else if is_lookalike(name.as_str().as_bytes()) || (!f.trusted && is_claim(name.as_str().as_bytes())) {
            removed.push(name.clone());
        }
    }
    for name in &removed {
        headers.remove(name);
    }
    let [xff, proto, host, port_present, prefix, fwd, id_present] = present;
    let Values { ip, element, port } = f.peer.values(f);
    let mut fields: Vec<(&'static HeaderName, HeaderValue)> = Vec::with_capacity(NAMES.len());
    if f.trusted {
        let chain = |headers: &mut HeaderMap, name: &'static HeaderName, value: HeaderValue| {
            // An empty field (or one of spaces) names nobody: no empty member before ours.
            let all = headers
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok().map(str::trim).filter(|v| !v.is_empty()).map(str::to_owned))
                .collect();
            headers.remove(name);
            extended(all, value)
        };
        // The client its X-Forwarded-For names first, for a `Forwarded` of ours alone.
        let client: Option<IpAddr> = (xff && !fwd)
            .then(|| headers.get(&X_FORWARDED_FOR)?.to_str().ok()?.split(',').next()?.trim().parse().ok())
            .flatten();
        let value = if xff {
            chain(headers, &X_FORWARDED_FOR, ip)
        } else if fwd {
            // Only `Forwarded` from the peer: the clients it names, then the peer, so
            // that the two fields name the same chain.
            extended(forwarded_for(headers).iter().map(IpAddr::to_string).collect(), ip)
        } else {
            ip
        };
        fields.push((&X_FORWARDED_FOR, value));
        // The public URL is the one the peer says it was reached at, where it says so;
        // a fact it leaves out follows from those it gives (its own `Forwarded` element,
        // a port from its host or its scheme), so that the fields never disagree.
        let said = if proto || host || fwd { Said::of(headers) } else { Said::default() };
        if !proto {
            fields.push((&X_FORWARDED_PROTO, HeaderValue::from_static(said.proto_or(f.proto))));
        }
        if !host {
            match &said.host {
                Some(h) => fields.push((&X_FORWARDED_HOST, h.clone())),
                None if !f.host.is_empty() => fields.push((&X_FORWARDED_HOST, f.host.clone())),
                None => {}
            }
        }
        if !port_present {
            let host_port = said.host.as_ref().and_then(|h| h.to_str().ok()).and_then(crate::route::authority_port);
            let scheme_port = said.proto.map(|https| if https { 443 } else { 80 });
            fields.push((&X_FORWARDED_PORT, host_port.or(scheme_port).map_or(port, port_value)));
        }
        if let Some(p) = f.prefix {
            let outer = if prefix { headers.remove(&X_FORWARDED_PREFIX) } else { None };
            let value = outer
                .as_ref()
                .and_then(|v| v.to_str().ok())
                .map(|outer| format!("{}{}", outer.trim_end_matches('/'), p.to_str().unwrap_or("")))
                .and_then(|s| HeaderValue::from_str(&s).ok());
            fields.push((&X_FORWARDED_PREFIX, value.unwrap_or_else(|| p.clone())));
        }
        if let Some(element) = element {
            let value = if fwd {
                chain(headers, &FORWARDED, element)
            } else if xff || proto || host {
                // X-Forwarded-* but no `Forwarded` from the peer: the one element says
                // what they say (the client, the public host and scheme), for services
                // that read `Forwarded` first.
                let public = Facts { proto: said.proto_or(f.proto), host: said.host.as_ref().unwrap_or(f.host), ..*f };
                forwarded_element(client.unwrap_or(f.peer.ip), &public).unwrap_or(element)
            } else {
                element
            };
            fields.push((&FORWARDED, value));
        }
    } else {
        for (name, _) in NAMES.iter().zip(present).filter(|(_, p)| *p) {
            headers.remove(*name);
        }
        fields.push((&X_FORWARDED_FOR, ip));
        fields.push((&X_FORWARDED_PROTO, HeaderValue::from_static(f.proto)));
        if !f.host.is_empty() {
            fields.push((&X_FORWARDED_HOST, f.host.clone()));
        }
        fields.push((&X_FORWARDED_PORT, port));
        if let Some(p) = f.prefix {
            fields.push((&X_FORWARDED_PREFIX, p.clone()));
        }
        if let Some(element) = element {
            fields.push((&FORWARDED, element));
        }
    }
    // A trusted peer's request id stands (it is still in `headers`); any other is replaced.
    let kept = (f.trusted && id_present)
        .then(|| headers.get(&X_REQUEST_ID).filter(|v| !v.is_empty() && v.len() <= 200).cloned())
        .flatten();
    let request_id = match kept {
        Some(id) => id,
        None => {
            if id_present {
                headers.remove(&X_REQUEST_ID);
            }
            let id = new_request_id();
            fields.push((&X_REQUEST_ID, id.clone()));
            id
        }
    };
    Forwarding { fields, request_id }
}

/// What a trusted peer said of the request it was sent: the scheme (`true` for https) and
/// the host, from its `X-Forwarded-Proto` and `-Host`, else from its own (the last)
/// `Forwarded` element. Values that are no scheme or no host are not heard.
#[derive(Debug, Default)]
pub struct Said {
    pub proto: Option<bool>,
    pub host: Option<HeaderValue>,
}

impl Said {
    pub fn of(headers: &HeaderMap) -> Said {
        let element = own_element(headers);
        let host = last_member(headers, &X_FORWARDED_HOST).or(element.host.as_deref());
        Said {
            proto: said_proto(headers, &element),
            host: host
                .filter(|h| !h.is_empty() && super::valid_authority(h))
                .and_then(|h| HeaderValue::from_str(h).ok()),
        }
    }

    /// Whether the peer says it was reached over https ([`Said::of`]'s `proto` alone).
    pub fn https(headers: &HeaderMap) -> bool {
        said_proto(headers, &own_element(headers)) == Some(true)
    }

    /// The scheme said, else `ours`.
    fn proto_or(&self, ours: &'static str) -> &'static str {
        self.proto.map_or(ours, |https| if https { "https" } else { "http" })
    }
}

/// The scheme a peer said: its `X-Forwarded-Proto`, else its `Forwarded` element's.
fn said_proto(headers: &HeaderMap, element: &Element<'_>) -> Option<bool> {
    last_member(headers, &X_FORWARDED_PROTO).or(element.proto.as_deref()).and_then(scheme)
}

/// The last member of the last `name` field: the one the nearest proxy added.
fn last_member<'h>(headers: &'h HeaderMap, name: &HeaderName) -> Option<&'h str> {
    let value = headers.get_all(name).iter().next_back()?.to_str().ok()?;
    Some(value.rsplit(',').next().unwrap_or(value).trim())
}

/// `true` for https, `false` for http, any case.
fn scheme(p: &str) -> Option<bool> {
    if p.eq_ignore_ascii_case("https") {
        Some(true)
    } else if p.eq_ignore_ascii_case("http") {
        Some(false)
    } else {
        None
    }
}

/// The peer's own `Forwarded` element: the last one of the last field.
fn own_element(headers: &HeaderMap) -> Element<'_> {
    headers.get_all(FORWARDED).iter().next_back().and_then(|v| v.to_str().ok()).map(last_element).unwrap_or_default()
}

/// The `proto` and `host` parameters of the last element of a `Forwarded` value (RFC
/// 7239 section 4), unquoted.
fn last_element(value: &str) -> Element<'_> {
    let mut element = Element::default();
    let last = element_starts(value).last().map_or(value, |start| &value[start..]);
    for (name, v) in params(last) {
        if name.eq_ignore_ascii_case("proto") {
            element.proto = Some(v);
        } else if name.eq_ignore_ascii_case("host") {
            element.host = Some(v);
        }
    }
    element
}

/// Where the elements of a `Forwarded` value after the first begin: after each comma
/// outside a quoted string.
fn element_starts(value: &str) -> impl Iterator<Item = usize> + '_ {
    starts_unquoted(value, ',')
}

/// Where the pieces of `value` after the first begin: after each `sep` (one byte)
/// outside a quoted string.
fn starts_unquoted(value: &str, sep: char) -> impl Iterator<Item = usize> + '_ {
    let (mut quoted, mut escaped) = (false, false);
    value.char_indices().filter_map(move |(i, c)| {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if c == sep && !quoted => return Some(i + 1),
            _ => {}
        }
        None
    })
}

/// `value` split at each `sep` (one byte) outside a quoted string.
fn split_unquoted(value: &str, sep: char) -> impl Iterator<Item = &str> {
    let mut starts = std::iter::once(0).chain(starts_unquoted(value, sep)).peekable();
    std::iter::from_fn(move || {
        let start = starts.next()?;
        let end = starts.peek().map_or(value.len(), |next| next - 1);
        Some(&value[start..end])
    })
}

/// The elements of a `Forwarded` value.
fn elements(value: &str) -> impl Iterator<Item = &str> {
    split_unquoted(value, ',')
}

/// An element's `name=value` parameters, values unquoted; a `;` inside a quoted value
/// (a host may hold one) does not end it.
fn params(element: &str) -> impl Iterator<Item = (&str, Cow<'_, str>)> {
    split_unquoted(element, ';').filter_map(|pair| {
        let (name, v) = pair.split_once('=')?;
        let v = v.trim();
        let v = match v.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
            Some(inner) if inner.contains('\\') => Cow::Owned(inner.replace("\\\"", "\"").replace("\\\\", "\\")),
            Some(inner) => Cow::Borrowed(inner),
            None => Cow::Borrowed(v),
        };
        Some((name.trim(), v))
    })
}

/// `members` then `last`, as one comma-separated list (`last` alone without members).
fn extended(mut members: Vec<String>, last: HeaderValue) -> HeaderValue {
    if members.is_empty() {
        return last;
    }
    members.push(last.to_str().unwrap_or("").to_owned());
    HeaderValue::from_str(&members.join(", ")).unwrap_or(last)
}

/// The client addresses a peer's `Forwarded` fields name (`for=`, in order; obfuscated
/// and `unknown` nodes left out), for the `X-Forwarded-For` of a peer that sent none.
fn forwarded_for(headers: &HeaderMap) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for value in headers.get_all(&FORWARDED).iter().filter_map(|v| v.to_str().ok()) {
        for element in elements(value) {
            let Some((_, node)) = params(element).find(|(name, _)| name.eq_ignore_ascii_case("for")) else {
                continue;
            };
            // `192.0.2.43`, `192.0.2.43:47011`, `[2001:db8::1]`, `[2001:db8::1]:4711`.
            let ip = match node.strip_prefix('[') {
                Some(rest) => rest.split(']').next().and_then(|v6| v6.parse::<IpAddr>().ok()),
                None => node.split(':').next().and_then(|v4| v4.parse::<IpAddr>().ok()),
            };
            out.extend(ip);
        }
    }
    out
}

/// A `Forwarded` element's `proto` and `host`, as written.
#[derive(Debug, Default)]
struct Element<'v> {
    proto: Option<Cow<'v, str>>,
    host: Option<Cow<'v, str>>,
}

/// Rewrites the forwarding fields in `headers` itself; returns the request id in use.
pub fn apply(headers: &mut HeaderMap, f: &Facts<'_>) -> HeaderValue {
    let forwarding = forwarding(headers, f);
    forwarding.insert_into(headers);
    forwarding.request_id
}

/// `for=...;host=...;proto=...` (RFC 7239 section 4), values quoted where the grammar
/// needs it (section 6: an IPv6 node or a host with a port is not a token).
fn forwarded_element(ip: IpAddr, f: &Facts<'_>) -> Option<HeaderValue> {
    use std::fmt::Write as _;
    let host = f.host.to_str().ok()?;
    let mut element = String::with_capacity(64 + host.len());
    // RFC 7239 section 6: an IPv6 node is bracketed, and '[' ':' need quoting.
    let _ = match ip {
        IpAddr::V4(v4) => write!(element, "for={v4}"),
        IpAddr::V6(v6) => write!(element, "for=\"[{v6}]\""),
    };
    if !host.is_empty() {
        element.push_str(";host=");
        if host.bytes().all(is_token_byte) {
            element.push_str(host);
        } else {
            element.push('"');
            for c in host.chars() {
                if c == '\\' || c == '"' {
                    element.push('\\');
                }
                element.push(c);
            }
            element.push('"');
        }
    }
    element.push_str(";proto=");
    element.push_str(f.proto);
    // Takes the string's buffer: no second copy.
    HeaderValue::from_maybe_shared(bytes::Bytes::from(element)).ok()
}

/// The common ports without an allocation.
fn port_value(port: u16) -> HeaderValue {
    match port {
        443 => HeaderValue::from_static("443"),
        80 => HeaderValue::from_static("80"),
        p => HeaderValue::from(p),
    }
}

/// RFC 9110 `tchar`.
fn is_token_byte(b: u8) -> bool {
    matches!(b, b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'!' | b'#'..=b'\'' | b'*' | b'+' | b'-' | b'.' | b'^'..=b'`' | b'|' | b'~')
}

/// 128 random bits as 32 lower-case hex digits.
pub fn new_request_id() -> HeaderValue {
    let n: u128 = crate::proxy::with_rng(|r| r.random());
    let mut buf = [0u8; 32];
    for (i, b) in buf.iter_mut().enumerate() {
        let nibble = ((n >> (124 - 4 * i)) & 0xf) as u8;
        *b = b"0123456789abcdef"[nibble as usize];
    }
    HeaderValue::from_bytes(&buf).unwrap_or(HeaderValue::from_static("0"))
}

#[cfg(test)]
#[allow(clippy::expect_used)] // a test: a failed expectation is a failed test
mod tests {
    use super::*;

    fn facts<'a>(
        peer: &'a PeerValues,
        trusted: bool,
        host: &'a HeaderValue,
        prefix: Option<&'a HeaderValue>,
    ) -> Facts<'a> {
        Facts { peer, trusted, proto: "https", host, port: 443, prefix }
    }

    #[test]
    fn a_connection_reuses_its_last_values_only_for_the_same_authority() {
        let peer = PeerValues::new(IpAddr::from([192, 0, 2, 7]));
        let (a, b) = (HeaderValue::from_static("a.example"), HeaderValue::from_static("b.example:8443"));
        let mut h = HeaderMap::new();
        apply(&mut h, &facts(&peer, false, &a, None));
        assert_eq!(h[FORWARDED], "for=192.0.2.7;host=a.example;proto=https");
        let mut h = HeaderMap::new();
        apply(&mut h, &Facts { port: 8443, ..facts(&peer, false, &b, None) });
        assert_eq!(h[FORWARDED], "for=192.0.2.7;host=\"b.example:8443\";proto=https");
        assert_eq!(h[&X_FORWARDED_PORT], "8443");
        let mut h = HeaderMap::new();
        apply(&mut h, &Facts { proto: "http", port: 8443, ..facts(&peer, false, &b, None) });
        assert_eq!(h[FORWARDED], "for=192.0.2.7;host=\"b.example:8443\";proto=http");
        let mut h = HeaderMap::new();
        apply(&mut h, &facts(&peer, false, &a, None));
        assert_eq!(h[FORWARDED], "for=192.0.2.7;host=a.example;proto=https");
        assert_eq!(h[&X_FORWARDED_PORT], "443");
    }

    #[test]
    fn the_reused_host_is_a_copy_not_a_slice_of_the_request_buffer() {
        // hyper's header values are slices of the buffer the head was read into: one kept
        // by the connection would keep that whole buffer alive while the connection idles.
        let peer = PeerValues::new(IpAddr::from([192, 0, 2, 7]));
        let buffer = bytes::Bytes::copy_from_slice(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n");
        let host = HeaderValue::from_maybe_shared(buffer.slice(22..31)).expect("a valid value");
        assert_eq!(host, "a.example");
        apply(&mut HeaderMap::new(), &facts(&peer, false, &host, None));
        let last = peer.last.lock().expect("not poisoned");
        let kept = last.as_ref().expect("values kept for the next request").host.as_bytes();
        assert_eq!(kept, b"a.example");
        assert!(!buffer.as_ptr_range().contains(&kept.as_ptr()), "the kept host points into the request's buffer");
        drop(last);
        peer.forget();
        assert!(peer.last.lock().expect("not poisoned").is_none());
    }

    #[test]
    fn the_names_as_bytes_are_the_names() {
        let names: Vec<&str> = NAMES.iter().map(|n| n.as_str()).collect();
        let bytes: Vec<&str> = NAME_BYTES.iter().map(|n| std::str::from_utf8(n).unwrap_or("")).collect();
        assert_eq!(names, bytes);
    }

    #[test]
    fn lookalikes_are_the_forwarding_names_with_underscores() {
        for name in [
            "X_Forwarded_For",
            "x_forwarded-proto",
            "X-Forwarded_Host",
            "X_FORWARDED_PORT",
            "x_request_id",
            "Content_Length",
            "transfer_encoding",
        ] {
            assert!(is_lookalike(name.as_bytes()), "{name}");
        }
        for name in [
            "X-Forwarded-For",
            "Forwarded",
            "X_Forwarded_Forx",
            "X_Custom_Header",
            "x_forwardedx",
            "_",
            "Content-Length",
            "Content_Type",
            "Transfer-Encoding",
            "te_",
        ] {
            assert!(!is_lookalike(name.as_bytes()), "{name}");
        }
    }

    #[test]
    fn token_bytes_are_rfc9110_tchar() {
        for b in 0..=u8::MAX {
            let tchar = b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
            assert_eq!(is_token_byte(b), tchar, "byte {b:#04x}");
        }
    }

    #[test]
    fn a_quoted_host_escapes_quotes_and_backslashes() {
        let peer = PeerValues::new(IpAddr::from([192, 0, 2, 7]));
        let host = HeaderValue::from_static("a\\b\"c:1");
        let e = forwarded_element(peer.ip, &facts(&peer, false, &host, None));
        assert_eq!(e.as_ref().map(HeaderValue::as_bytes), Some(&br#"for=192.0.2.7;host="a\\b\"c:1";proto=https"#[..]));
    }

    #[test]
    fn forwarding_removes_what_it_replaces_and_leaves_the_rest() {
        let peer = PeerValues::new(IpAddr::from([192, 0, 2, 7]));
        let host = HeaderValue::from_static("fhir.example.org");
        let mut h = HeaderMap::new();
        h.insert("accept", HeaderValue::from_static("*/*"));
        h.insert(&X_FORWARDED_FOR, HeaderValue::from_static("6.6.6.6"));
        h.insert(FORWARDED, HeaderValue::from_static("for=6.6.6.6"));
        let fw = forwarding(&mut h, &facts(&peer, false, &host, None));
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("accept"));
        let names: Vec<&str> = fw.fields.iter().map(|(n, _)| n.as_str()).collect();
        let want = ["x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-forwarded-port", "forwarded"];
        assert_eq!(names, [&want[..], &["x-request-id"]].concat());
        assert_eq!(fw.fields.last().map(|(_, v)| v), Some(&fw.request_id));
        // A request with none of them: the map is not touched.
        let mut h = HeaderMap::new();
        h.insert("accept", HeaderValue::from_static("*/*"));
        let fw = forwarding(&mut h, &facts(&peer, false, &host, None));
        assert_eq!((h.len(), fw.fields.len()), (1, 6));
    }

    #[test]
    fn other_claims_of_the_same_facts_are_heard_only_from_a_trusted_peer() {
        let peer = PeerValues::new(IpAddr::from([192, 0, 2, 7]));
        let host = HeaderValue::from_static("fhir.example.org");
        let claims = [
            "X-Real-IP",
            "x-forwarded-ssl",
            "X-Forwarded-Scheme",
            "Front-End-Https",
            "True-Client-IP",
            "X-Client-IP",
            "Client-IP",
            "X-Cluster-Client-IP",
            "X-Forwarded",
        ];
        for name in claims {
            assert!(is_forwarding(name.as_bytes()), "{name}");
            assert!(is_lookalike(name.replace('-', "_").as_bytes()), "{name}");
        }
        for trusted in [false, true] {
            let mut h = HeaderMap::new();
            for name in claims {
                h.insert(HeaderName::from_bytes(name.as_bytes()).expect("a name"), HeaderValue::from_static("on"));
            }
            h.insert("accept", HeaderValue::from_static("*/*"));
            apply(&mut h, &facts(&peer, trusted, &host, None));
            let kept: Vec<&str> = claims.iter().copied().filter(|n| h.contains_key(*n)).collect();
            assert_eq!(kept, if trusted { &claims[..] } else { &[] }, "trusted: {trusted}");
            assert!(h.contains_key("accept"));
        }
    }

    #[test]
    fn untrusted_values_are_replaced() {
        let peer = PeerValues::new("192.0.2.7".parse().unwrap_or(IpAddr::from([0, 0, 0, 0])));
        let mut h = HeaderMap::new();
        h.insert(&X_FORWARDED_FOR, HeaderValue::from_static("6.6.6.6"));
        h.insert(&X_FORWARDED_HOST, HeaderValue::from_static("evil.example"));
        h.insert(&X_FORWARDED_PREFIX, HeaderValue::from_static("/evil"));
        h.insert(FORWARDED, HeaderValue::from_static("for=6.6.6.6"));
        h.insert(&X_REQUEST_ID, HeaderValue::from_static("spoofed"));
        let id = apply(&mut h, &facts(&peer, false, &HeaderValue::from_static("fhir.example.org"), None));
        assert_eq!(h[&X_FORWARDED_FOR], "192.0.2.7");
        assert_eq!(h[&X_FORWARDED_HOST], "fhir.example.org");
        assert_eq!(h[&X_FORWARDED_PROTO], "https");
        assert_eq!(h[&X_FORWARDED_PORT], "443");
        assert!(h.get(&X_FORWARDED_PREFIX).is_none());
        assert_eq!(h[FORWARDED], "for=192.0.2.7;host=fhir.example.org;proto=https");
        assert_ne!(id, "spoofed");
        assert_eq!(id.len(), 32);
    }

    /// A trusted peer's facts complete each other: what it leaves out follows from what it
    /// gives, never from the gateway's own listener.
    #[test]
    fn a_trusted_peer_s_missing_facts_follow_from_those_it_gives() {
        let peer = PeerValues::new(IpAddr::from([10, 0, 0, 2]));
        let ours = HeaderValue::from_static("gw.internal");
        // The fields the service gets when the peer sends `given`.
        let sent = |given: &[(&str, &str)]| {
            let mut h = HeaderMap::new();
            for (name, value) in given {
                h.append(
                    HeaderName::from_bytes(name.as_bytes()).expect("a name"),
                    HeaderValue::from_str(value).expect("a value"),
                );
            }
            apply(&mut h, &Facts { proto: "http", port: 80, ..facts(&peer, true, &ours, None) });
            move |n: &HeaderName| h.get(n).and_then(|v| v.to_str().ok()).unwrap_or("-").to_string()
        };
        let case = |given: &[(&str, &str)]| {
            let get = sent(given);
            [get(&X_FORWARDED_PROTO), get(&X_FORWARDED_HOST), get(&X_FORWARDED_PORT)]
        };
        let forwarded = |given: &[(&str, &str)]| sent(given)(&FORWARDED);
        // X-Forwarded-* alone: `Forwarded` says the same (client, public host and scheme).
        let xf = [
            ("x-forwarded-for", "203.0.113.9, 10.0.0.1"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "pub.example.org"),
        ];
        assert_eq!(forwarded(&xf), "for=203.0.113.9;host=pub.example.org;proto=https");
        assert_eq!(forwarded(&[("x-forwarded-proto", "https")]), "for=10.0.0.2;host=gw.internal;proto=https");
        // Its own `Forwarded` is extended by the gateway's hop, as RFC 7239 has it.
        assert_eq!(
            forwarded(&[("forwarded", "for=203.0.113.9;proto=https"), ("x-forwarded-proto", "https")]),
            "for=203.0.113.9;proto=https, for=10.0.0.2;host=gw.internal;proto=http"
        );
        // Nothing forwarded: the gateway's own facts.
        assert_eq!(forwarded(&[]), "for=10.0.0.2;host=gw.internal;proto=http");
        assert_eq!(case(&[("x-forwarded-proto", "https")]), ["https", "gw.internal", "443"]);
        assert_eq!(case(&[("x-forwarded-host", "pub.example.org:8443")]), ["http", "pub.example.org:8443", "8443"]);
        assert_eq!(
            case(&[("x-forwarded-proto", "https"), ("x-forwarded-host", "pub.example.org")]),
            ["https", "pub.example.org", "443"]
        );
        assert_eq!(
            case(&[("x-forwarded-proto", "https"), ("x-forwarded-port", "8443")]),
            ["https", "gw.internal", "8443"]
        );
        // Its own `Forwarded` element (the last), quoted or not.
        let element = "for=1.2.3.4;host=evil;proto=http, for=10.9.9.9;Host=\"pub.example.org:444\";PROTO=HTTPS";
        assert_eq!(case(&[("forwarded", element)]), ["https", "pub.example.org:444", "444"]);
        assert_eq!(
            case(&[("forwarded", "for=10.9.9.9;host=pub.example.org;proto=https")]),
            ["https", "pub.example.org", "443"]
        );
        // X-Forwarded-* win over its element; what is no scheme or host is not heard.
        assert_eq!(case(&[("forwarded", "proto=https"), ("x-forwarded-proto", "http")]), ["http", "gw.internal", "80"]);
        assert_eq!(case(&[("forwarded", "proto=ftp;host=\"a b\"")]), ["http", "gw.internal", "80"]);
        // Nothing said: the gateway's own facts.
        assert_eq!(case(&[]), ["http", "gw.internal", "80"]);
        // Only `Forwarded`: X-Forwarded-For names the same clients, then the peer.
        let xff = |given: &[(&str, &str)]| sent(given)(&X_FORWARDED_FOR);
        let chain = "for=\"[2001:db8::1]:4711\";proto=https, for=_hidden, for=192.0.2.43:47011;host=pub.example.org";
        assert_eq!(xff(&[("forwarded", chain)]), "2001:db8::1, 192.0.2.43, 10.0.0.2");
        assert_eq!(xff(&[("forwarded", "for=unknown;proto=https")]), "10.0.0.2");
        // An empty X-Forwarded-For names nobody.
        assert_eq!(xff(&[("x-forwarded-for", "")]), "10.0.0.2");
        assert_eq!(xff(&[("x-forwarded-for", " "), ("x-forwarded-for", "203.0.113.9")]), "203.0.113.9, 10.0.0.2");
        // Its own X-Forwarded-For, when it sends one, is the chain.
        assert_eq!(
            xff(&[("forwarded", "for=192.0.2.43"), ("x-forwarded-for", "203.0.113.9")]),
            "203.0.113.9, 10.0.0.2"
        );
    }

    #[test]
    fn trusted_chains_are_extended_and_ipv6_quoted() {
        let peer = PeerValues::new("2001:db8::1".parse().unwrap_or(IpAddr::from([0, 0, 0, 0])));
        let prefix = HeaderValue::from_static("/fhir");
        let mut h = HeaderMap::new();
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("203.0.113.1"));
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("203.0.113.2"));
        h.insert(&X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        h.insert(&X_FORWARDED_PREFIX, HeaderValue::from_static("/outer/"));
        h.insert(FORWARDED, HeaderValue::from_static("for=203.0.113.1"));
        h.insert(&X_REQUEST_ID, HeaderValue::from_static("abc"));
        let id = apply(&mut h, &facts(&peer, true, &HeaderValue::from_static("example.org:8443"), Some(&prefix)));
        assert_eq!(h[&X_FORWARDED_FOR], "203.0.113.1, 203.0.113.2, 2001:db8::1");
        assert_eq!(h[&X_FORWARDED_PREFIX], "/outer/fhir");
        assert_eq!(h[FORWARDED], "for=203.0.113.1, for=\"[2001:db8::1]\";host=\"example.org:8443\";proto=https");
        assert_eq!(id, "abc");
    }

    #[test]
    fn a_quoted_forwarded_host_keeps_its_semicolons() {
        // `;` is a sub-delim a reg-name may hold (valid_authority takes it), so this
        // module quotes such a host when it writes one; reading it back must not split
        // the quoted string at its `;` (RFC 7239 section 4: forwarded-pair values are
        // tokens or quoted-strings).
        let mut h = HeaderMap::new();
        h.insert(FORWARDED, HeaderValue::from_static("for=192.0.2.1;host=\"a;host=evil.example;x=\";proto=https"));
        let said = Said::of(&h);
        assert_eq!(said.host.as_ref().map(HeaderValue::as_bytes), Some(&b"a;host=evil.example;x="[..]));
        assert_eq!(said.proto, Some(true));
        // From a trusted peer that sent only `Forwarded`, the service's public host is
        // the quoted one, not the name smuggled inside it.
        let peer = PeerValues::new(IpAddr::from([10, 0, 0, 2]));
        let ours = HeaderValue::from_static("gw.example");
        let out = forwarding(&mut h, &facts(&peer, true, &ours, None));
        let xfh = out.fields.iter().find(|(n, _)| **n == X_FORWARDED_HOST).map(|(_, v)| v.as_bytes());
        assert_eq!(xfh, Some(&b"a;host=evil.example;x="[..]));
        // What this module writes for such a host reads back as that host.
        let odd = HeaderValue::from_static("a;host=evil.example;x=");
        let mut h = HeaderMap::new();
        apply(&mut h, &facts(&PeerValues::new(IpAddr::from([192, 0, 2, 7])), false, &odd, None));
        assert_eq!(Said::of(&h).host.as_ref().map(HeaderValue::as_bytes), Some(odd.as_bytes()));
    }
}
