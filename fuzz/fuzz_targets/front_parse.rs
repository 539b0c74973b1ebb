//! `swarmgate::proxy::front::parse`: client request heads, read as a connection reads
//! them (bytes arriving in pieces, heads pipelined one after another).
//!
//! Input: byte 0 picks `max_head`, byte 1 tunes it, bytes 2..4 seed the read sizes; the
//! rest is what the client sends.
//!
//! Checked:
//! - no panic;
//! - a head taken as ours consumed between 1 and `buf.len()` bytes, at most `max_head`;
//! - its method, origin-form target and version are those of its request line;
//! - nothing taken as ours has a body or ambiguous framing: no `Transfer-Encoding`,
//!   `Upgrade`, `Expect`, no `CONNECT`, every `Content-Length` exactly a run of zeros;
//! - `keep_alive` and `trailers` follow `Connection` and `TE` as RFC 9112 says;
//! - the request's map holds only `Host` and forwarding fields, `Fields` none of those
//!   and no hop-by-hop field;
//! - the same bytes read whole and read in pieces give the same requests and the same
//!   final outcome.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use swarmgate::proxy::forwarded;
use swarmgate::proxy::front::{self, Parsed};
use swarmgate_fuzz::{HOP_BY_HOP, Rng};

#[derive(Debug, PartialEq)]
enum Out {
    Ours {
        consumed: usize,
        method: String,
        uri: String,
        version: http::Version,
        headers: Vec<(String, Vec<u8>)>,
        fields: Vec<(Vec<u8>, Vec<u8>)>,
        keep_alive: bool,
        trailers: bool,
    },
    Partial,
    NotOurs,
    Refused,
}

fn max_head_of(sel: u8, tune: u8) -> usize {
    match sel % 4 {
        0 => 64 * 1024,
        1 => 8 * 1024,
        2 => 16 + usize::from(tune) * 4,
        _ => 1 + usize::from(tune),
    }
}

/// Runs `parse` as the connection does: after each read, until it needs more or stops.
/// `stream`: all bytes (not empty); `next_read`: the size of each read.
fn run(stream: &[u8], max_head: usize, mut next_read: impl FnMut() -> usize) -> Vec<Out> {
    let mut outs = Vec::new();
    let mut buf = BytesMut::new();
    // Offset in `stream` of buf[0].
    let mut at = 0usize;
    let mut fed = 0usize;
    loop {
        let n = next_read().clamp(1, stream.len() - fed);
        buf.extend_from_slice(&stream[fed..fed + n]);
        fed += n;
        let mut stop = false;
        while !buf.is_empty() {
            let before = buf.len();
            let parsed = front::parse(&mut buf, max_head);
            let after = buf.len();
            assert!(after <= before, "parse grew the buffer");
            match parsed {
                Parsed::Ours(req, asks, fields) => {
                    let consumed = before - after;
                    assert!(consumed > 0, "a request of no bytes");
                    assert!(consumed <= max_head, "a head of {consumed} bytes over max_head {max_head}");
                    check_ours(&stream[at..at + consumed], &req, asks, &fields);
                    at += consumed;
                    let (parts, _) = req.into_parts();
                    outs.push(Out::Ours {
                        consumed,
                        method: parts.method.as_str().to_owned(),
                        uri: parts.uri.to_string(),
                        version: parts.version,
                        headers: parts
                            .headers
                            .iter()
                            .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
                            .collect(),
                        fields: fields.iter().map(|(n, v)| (n.to_vec(), v.to_vec())).collect(),
                        keep_alive: asks.keep_alive,
                        trailers: asks.trailers,
                    });
                    if !asks.keep_alive {
                        // The connection closes after this response.
                        stop = true;
                        break;
                    }
                }
                Parsed::Partial => {
                    assert_eq!(after, before, "Partial consumed bytes");
                    if !matches!(outs.last(), Some(Out::Partial)) {
                        outs.push(Out::Partial);
                    }
                    break;
                }
                Parsed::NotOurs => {
                    assert_eq!(after, before, "NotOurs consumed bytes (they go back to hyper)");
                    outs.push(Out::NotOurs);
                    stop = true;
                    break;
                }
                Parsed::Refused(_) => {
                    outs.push(Out::Refused);
                    stop = true;
                    break;
                }
            }
        }
        if stop || fed == stream.len() {
            break;
        }
    }
    // Partial markers between reads are not comparable across read patterns.
    let last_partial = matches!(outs.last(), Some(Out::Partial));
    outs.retain(|o| !matches!(o, Out::Partial));
    if last_partial {
        outs.push(Out::Partial);
    }
    outs
}

/// The request line of `head` (after any empty lines): method, target, version.
fn request_line(head: &[u8]) -> (&[u8], &[u8], &[u8]) {
    let start = head.iter().position(|&b| b != b'\r' && b != b'\n').expect("a head with a request line");
    let end = start + head[start..].iter().position(|&b| b == b'\n').expect("a request line that ends");
    let line = &head[start..end];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let mut parts = line.splitn(3, |&b| b == b' ');
    let method = parts.next().expect("method");
    let target = parts.next().expect("target");
    let version = parts.next().expect("version");
    (method, target, version)
}

fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|&b| b == b',').map(<[u8]>::trim_ascii).filter(|t| !t.is_empty())
}

fn check_ours(head: &[u8], req: &http::Request<impl Sized>, asks: front::Asks, fields: &swarmgate::proxy::h1::Fields) {
    let (method, target, version) = request_line(head);
    assert_eq!(method, req.method().as_str().as_bytes(), "method differs from the request line");
    assert_ne!(req.method(), http::Method::CONNECT);
    let want_version = match version {
        b"HTTP/1.0" => http::Version::HTTP_10,
        [b'H', b'T', b'T', b'P', b'/', b'1', b'.', b'1'..=b'9'] => http::Version::HTTP_11,
        other => panic!("accepted a request line version {:?}", String::from_utf8_lossy(other)),
    };
    assert_eq!(req.version(), want_version);
    if target.first() == Some(&b'/') {
        // `Uri` drops a fragment (`#...`), which no request target may carry (RFC 9112
        // section 3.2): the target sent on is the part before it, as hyper does too.
        let target = target.split(|&b| b == b'#').next().unwrap_or(target);
        let pq = req.uri().path_and_query().map(|p| p.as_str().as_bytes()).unwrap_or(b"");
        assert_eq!(pq, target, "origin-form target {:?} became {:?}", String::from_utf8_lossy(target), req.uri());
    }

    // The head's fields by an independent read (the version rewritten as the reader does).
    let mut copy = head.to_vec();
    let (_, _, v) = request_line(&copy);
    let vpos = v.as_ptr() as usize - copy.as_ptr() as usize;
    if copy[vpos + 7] != b'0' {
        copy[vpos + 7] = b'1';
    }
    let mut slots = [httparse::EMPTY_HEADER; 128];
    let mut r = httparse::Request::new(&mut slots);
    match r.parse(&copy) {
        Ok(httparse::Status::Complete(n)) => assert_eq!(n, copy.len(), "head length differs from httparse's"),
        other => panic!("head taken as ours that httparse reads as {other:?}"),
    }
    let (mut close, mut ka, mut te_trailers) = (false, false, false);
    let mut named: Vec<Vec<u8>> = Vec::new();
    for h in r.headers.iter() {
        let name = h.name.to_ascii_lowercase();
        match name.as_str() {
            "transfer-encoding" | "upgrade" | "expect" => panic!("taken as ours with a {name} field"),
            "content-length" => {
                let v = h.value.trim_ascii();
                assert!(
                    !v.is_empty() && v.iter().all(|&b| b == b'0'),
                    "taken as ours with Content-Length {:?}",
                    String::from_utf8_lossy(h.value)
                );
            }
            "connection" => {
                for t in tokens(h.value) {
                    if t.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if t.eq_ignore_ascii_case(b"keep-alive") {
                        ka = true;
                    } else {
                        named.push(t.to_ascii_lowercase());
                    }
                }
            }
            "te" => te_trailers |= tokens(h.value).any(|t| t.eq_ignore_ascii_case(b"trailers")),
            _ => {}
        }
    }
    let want_ka = !close && (want_version == http::Version::HTTP_11 || ka);
    assert_eq!(asks.keep_alive, want_ka, "keep_alive (close {close}, keep-alive {ka})");
    assert_eq!(asks.trailers, te_trailers, "trailers");

    for (name, _) in req.headers() {
        let n = name.as_str().as_bytes();
        assert!(
            n == b"host" || n == b"te" || forwarded::is_forwarding(n),
            "unexpected field {name} in the request's map"
        );
        if n != b"host" && n != b"te" {
            assert!(!named.iter().any(|x| x == n), "field {name} named by Connection kept");
        }
    }
    if asks.trailers {
        assert_eq!(req.headers().get("te").map(|v| v.as_bytes()), Some(&b"trailers"[..]));
    }
    for (name, _) in fields.iter() {
        let lower = name.to_ascii_lowercase();
        assert!(!HOP_BY_HOP.contains(&lower.as_slice()), "hop-by-hop {:?} in Fields", String::from_utf8_lossy(name));
        assert!(
            lower != b"host" && lower != b"expect" && lower != b"content-length",
            "{:?} in Fields",
            String::from_utf8_lossy(name)
        );
        assert!(!forwarded::is_forwarding(name) && !forwarded::is_lookalike(name));
        assert!(!named.contains(&lower), "field named by Connection kept in Fields");
    }
    // Lines are `name: value` as written.
    for (name, line) in fields.lines() {
        assert!(line.starts_with(name));
        assert!(!line.contains(&b'\n'), "a field line holding a line end");
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let max_head = max_head_of(data[0], data[1]);
    let seed = u32::from(data[2]) << 8 | u32::from(data[3]);
    let stream = &data[4..];
    if stream.is_empty() {
        return;
    }
    let whole = run(stream, max_head, || usize::MAX);
    let mut rng = Rng(seed | 1);
    // Mostly small reads, now and then a big one.
    let max_read = 1 + (seed as usize % 64);
    let pieces = run(stream, max_head, || {
        let r = rng.next_u32() as usize;
        if r.is_multiple_of(8) { 4096 } else { 1 + r % max_read }
    });
    // Whole and in pieces: the same requests, the same end, but where reading in pieces
    // stopped at a head over the limit before its end came (the same refusal, earlier).
    assert_eq!(whole, pieces, "reading in pieces changed the outcome");
});
