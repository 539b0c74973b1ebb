//! The upstream response side of `swarmgate::proxy::h1`: `final_head` (through
//! `parse_head`), then the body by the framing it found (`Chunked::decode` for chunked
//! bodies; `ResponseBody` itself needs a TcpStream, so length and close framing are
//! checked on the head only).
//!
//! Input: byte 0 picks the request method, bytes 1..3 seed the read sizes; the rest is
//! what the server sends.
//!
//! Checked:
//! - no panic;
//! - read whole or in pieces, the same head (or the same failure), the same body data,
//!   trailers and end;
//! - the head is a final one (no 1xx, no 101); it ends exactly where an independent read
//!   of the interim and final heads ends;
//! - the framing is RFC 9112's: nothing for HEAD/204/304; with `Transfer-Encoding`,
//!   chunked, never a length; a length only when every `Content-Length` value agrees;
//! - a connection is kept only when the framing is unambiguous (no close-delimited body,
//!   not both `Content-Length` and `Transfer-Encoding`, not `Transfer-Encoding` in
//!   HTTP/1.0, not `Connection: close`);
//! - `Fields` has no hop-by-hop field nor any `Connection` names; `append_to` drops none;
//! - a chunked body a strict RFC 9112 decoder accepts is decoded to the same data and
//!   trailers; `Data` pieces are never empty; the decoder never takes more bytes than
//!   there are.
#![no_main]

use bytes::BytesMut;
use http::Method;
use libfuzzer_sys::fuzz_target;
use swarmgate::proxy::h1::{self, Chunked, Decoded, Framing};
use swarmgate_fuzz::{HOP_BY_HOP, Rng};

const METHODS: [Method; 6] = [Method::GET, Method::HEAD, Method::POST, Method::PUT, Method::OPTIONS, Method::DELETE];

#[derive(Debug, PartialEq)]
struct HeadOut {
    consumed: usize,
    status: u16,
    version: http::Version,
    framing: Framing,
    keep_alive: bool,
    fields: Vec<(Vec<u8>, Vec<u8>)>,
    length: Option<u64>,
    reason: Option<Vec<u8>>,
}

#[derive(Debug, PartialEq)]
enum HeadResult {
    Head(HeadOut),
    Err,
    Partial,
}

#[derive(Debug, PartialEq)]
enum BodyEnd {
    /// Ended after consuming this many bytes of the body stream.
    End(usize),
    Err,
    NeedMore,
}

/// Trailer fields, name and value.
type Trailers = Vec<(String, Vec<u8>)>;

#[derive(Debug, PartialEq)]
struct BodyOut {
    data: Vec<u8>,
    trailers: Option<Vec<(String, Vec<u8>)>>,
    end: BodyEnd,
}

/// Reads the final head: each read appends to the buffer, then `final_head` is asked.
fn read_head(stream: &[u8], method: &Method, next_read: &mut impl FnMut() -> usize) -> (HeadResult, Option<h1::Head>) {
    let mut buf = BytesMut::new();
    let mut fed = 0;
    while fed < stream.len() {
        let n = next_read().clamp(1, stream.len() - fed);
        buf.extend_from_slice(&stream[fed..fed + n]);
        fed += n;
        let before_total = fed;
        match h1::final_head(&mut buf, method) {
            Ok(Some(head)) => {
                let consumed = before_total - buf.len();
                let out = HeadOut {
                    consumed,
                    status: head.status.as_u16(),
                    version: head.version,
                    framing: head.framing,
                    keep_alive: head.keep_alive,
                    fields: head.fields.iter().map(|(n, v)| (n.to_vec(), v.to_vec())).collect(),
                    length: head.fields.length,
                    reason: head.fields.reason().map(<[u8]>::to_vec),
                };
                return (HeadResult::Head(out), Some(head));
            }
            Ok(None) => {}
            Err(_) => return (HeadResult::Err, None),
        }
    }
    (HeadResult::Partial, None)
}

/// Decodes a chunked body from `stream`, read in pieces.
fn read_chunked(stream: &[u8], next_read: &mut impl FnMut() -> usize) -> BodyOut {
    let mut dec = Chunked::default();
    let mut buf = BytesMut::new();
    let mut fed = 0;
    let mut data = Vec::new();
    let mut trailers = None;
    loop {
        match dec.decode(&mut buf) {
            Ok(Some(Decoded::Data(d))) => {
                assert!(!d.is_empty(), "an empty Data piece (it would end an HTTP/2 stream's data early)");
                assert!(trailers.is_none(), "data after trailers");
                data.extend_from_slice(&d);
            }
            Ok(Some(Decoded::Trailers(t))) => {
                assert!(trailers.is_none(), "trailers twice");
                assert!(!t.is_empty(), "an empty trailer section handed out");
                trailers = Some(t.iter().map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec())).collect());
            }
            Ok(Some(Decoded::End)) => {
                // Stays ended.
                assert!(matches!(dec.decode(&mut buf), Ok(Some(Decoded::End))));
                let consumed = fed - buf.len();
                return BodyOut { data, trailers, end: BodyEnd::End(consumed) };
            }
            Ok(None) => {
                if fed == stream.len() {
                    return BodyOut { data, trailers, end: BodyEnd::NeedMore };
                }
                let n = next_read().clamp(1, stream.len() - fed);
                buf.extend_from_slice(&stream[fed..fed + n]);
                fed += n;
            }
            Err(_) => return BodyOut { data, trailers, end: BodyEnd::Err },
        }
    }
}

/// A strict RFC 9112 section 7.1 decoder, within swarmgate's documented limits (a size of
/// at most 16 hex digits, a size line of at most 4 KiB, a trailer section under 64 KiB and
/// 100 fields). `None` when it refuses the body or it is incomplete.
fn strict_chunked(s: &[u8]) -> Option<(Vec<u8>, Trailers, usize)> {
    let mut at = 0;
    let mut data = Vec::new();
    loop {
        let line_end = at + s[at..].windows(2).position(|w| w == b"\r\n")?;
        let line = &s[at..line_end];
        if line.len() > 4096 || line.contains(&b'\n') || line.contains(&b'\r') {
            return None;
        }
        let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
        if digits == 0 || digits > 16 {
            return None;
        }
        let rest = &line[digits..];
        // chunk-ext = *( BWS ";" BWS ext-name [ BWS "=" BWS ext-val ] ): only tokens,
        // quoted strings and whitespace; no controls.
        let rest_trim = &rest[rest.iter().take_while(|&&b| b == b' ' || b == b'\t').count()..];
        if !rest_trim.is_empty()
            && (rest_trim[0] != b';' || rest.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f))
        {
            return None;
        }
        let size = u64::from_str_radix(std::str::from_utf8(&line[..digits]).ok()?, 16).ok()?;
        at = line_end + 2;
        if size == 0 {
            break;
        }
        let size = usize::try_from(size).ok()?;
        if s.len() - at < size.checked_add(2)? {
            return None;
        }
        data.extend_from_slice(&s[at..at + size]);
        at += size;
        if &s[at..at + 2] != b"\r\n" {
            return None;
        }
        at += 2;
    }
    // Trailer section: field lines, CRLF each, then CRLF.
    let mut trailers = Vec::new();
    loop {
        let line_end = at + s[at..].windows(2).position(|w| w == b"\r\n")?;
        let line = &s[at..line_end];
        if line.contains(&b'\n') || line.contains(&b'\r') {
            return None;
        }
        at = line_end + 2;
        if line.is_empty() {
            break;
        }
        let colon = line.iter().position(|&b| b == b':')?;
        let name = &line[..colon];
        // OWS is spaces and tabs only.
        let mut value = &line[colon + 1..];
        while let [b' ' | b'\t', rest @ ..] = value {
            value = rest;
        }
        while let [rest @ .., b' ' | b'\t'] = value {
            value = rest;
        }
        let tchar = |b: &u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b);
        if name.is_empty() || !name.iter().all(tchar) {
            return None;
        }
        if value.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
            return None;
        }
        trailers.push((String::from_utf8(name.to_ascii_lowercase()).ok()?, value.to_vec()));
    }
    if trailers.len() > 100 || at >= 64 * 1024 {
        return None;
    }
    Some((data, trailers, at))
}

/// The interim and final heads of `bytes` by httparse, each with its status; the final
/// one's end.
fn independent_heads(bytes: &[u8]) -> (Vec<u16>, usize, Trailers) {
    let mut at = 0;
    let mut statuses = Vec::new();
    loop {
        let mut copy = bytes[at..].to_vec();
        let lead = copy.iter().position(|&b| b != b'\r' && b != b'\n').unwrap_or(0);
        if lead == 0 && copy.starts_with(b"HTTP/1.") && copy.len() > 8 && (b'2'..=b'9').contains(&copy[7]) {
            copy[7] = b'1';
        }
        let mut slots = [httparse::EMPTY_HEADER; 128];
        let mut r = httparse::Response::new(&mut slots);
        let n = match r.parse(&copy) {
            Ok(httparse::Status::Complete(n)) => n,
            other => panic!("a head taken that httparse reads as {other:?}"),
        };
        let code = r.code.expect("a status");
        statuses.push(code);
        at += n;
        if !(100..200).contains(&code) {
            let fields = r.headers.iter().map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec())).collect();
            return (statuses, at, fields);
        }
    }
}

fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|&b| b == b',').map(<[u8]>::trim_ascii).filter(|t| !t.is_empty())
}

fn check_head(stream: &[u8], method: &Method, out: &HeadOut, head: h1::Head) {
    assert!(!head.status.is_informational(), "a 1xx as the final head");
    let (statuses, end, raw) = independent_heads(&stream[..out.consumed]);
    assert_eq!(end, out.consumed, "the final head ends elsewhere than httparse says");
    assert_eq!(*statuses.last().expect("a head"), out.status);
    assert!(!statuses.contains(&101), "a 101 skipped as interim");

    let te = raw.iter().any(|(n, _)| n == "transfer-encoding");
    let lengths: Vec<&[u8]> = raw.iter().filter(|(n, _)| n == "content-length").map(|(_, v)| v.as_slice()).collect();
    let mut close = false;
    let mut named: Vec<Vec<u8>> = Vec::new();
    for (n, v) in &raw {
        if n == "connection" {
            for t in tokens(v) {
                if t.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if !t.eq_ignore_ascii_case(b"keep-alive") && !t.eq_ignore_ascii_case(b"upgrade") {
                    named.push(t.to_ascii_lowercase());
                }
            }
        }
    }
    let no_body = *method == Method::HEAD || out.status == 204 || out.status == 304;
    if no_body {
        assert_eq!(out.framing, Framing::Empty);
    } else {
        assert_ne!(out.framing, Framing::Empty, "no body for status {}", out.status);
    }
    if te && !no_body {
        assert_eq!(out.framing, Framing::Chunked, "Transfer-Encoding, yet framed {:?}", out.framing);
    }
    if te {
        assert!(out.fields.iter().all(|(n, _)| !n.eq_ignore_ascii_case(b"content-length")), "CL kept beside TE");
        assert_eq!(out.length, None);
    }
    if let Framing::Length(n) = out.framing {
        assert!(!te);
        assert!(!lengths.is_empty());
        for v in &lengths {
            for part in v.split(|&b| b == b',') {
                let part = std::str::from_utf8(part.trim_ascii()).expect("digits");
                assert_eq!(part.parse::<u64>().ok(), Some(n), "Content-Length {part:?} under a length of {n}");
            }
        }
        // (A `Connection` naming Content-Length makes it hop-by-hop: dropped from the
        // fields, though it still frames this body.)
        if !named.iter().any(|n| n == b"content-length") {
            assert_eq!(out.length, Some(n));
        }
    }
    if out.framing == Framing::Close {
        assert!(!te && lengths.is_empty(), "close-delimited with a framing field");
    }
    if out.keep_alive {
        assert_ne!(out.framing, Framing::Close);
        // (For HEAD, 204 and 304 the head alone is the message, RFC 9112 section 6.3 (1):
        // the fields frame nothing.)
        assert!(no_body || !(te && !lengths.is_empty()), "kept alive with both Transfer-Encoding and Content-Length");
        assert!(!(te && out.version == http::Version::HTTP_10), "kept alive with Transfer-Encoding in HTTP/1.0");
        assert!(!close, "kept alive with Connection: close");
        if out.version == http::Version::HTTP_10 {
            assert!(
                raw.iter().any(|(n, v)| n == "connection" && tokens(v).any(|t| t.eq_ignore_ascii_case(b"keep-alive"))),
                "HTTP/1.0 kept alive without keep-alive"
            );
        }
    }
    for (n, _) in &out.fields {
        let lower = n.to_ascii_lowercase();
        assert!(!HOP_BY_HOP.contains(&lower.as_slice()), "hop-by-hop {:?} in Fields", String::from_utf8_lossy(n));
        assert!(!named.contains(&lower), "a field Connection names kept: {:?}", String::from_utf8_lossy(n));
    }
    for (name, line) in head.fields.lines() {
        assert!(line.starts_with(name));
        assert!(!line.contains(&b'\n') && !line.contains(&b'\r'), "a line end inside a field line");
    }
    let _ = head.fields.reason_phrase(head.status);
    let count = head.fields.iter().count();
    let mut map = http::HeaderMap::new();
    head.fields.clone().append_to(&mut map);
    // (Since def54ef the length goes in as one field of its own, `Fields::length`.)
    let length = usize::from(head.fields.length.is_some());
    assert_eq!(map.len(), count + length, "append_to dropped or added a field");
    if let Some(n) = head.fields.length {
        assert_eq!(map.get_all("content-length").iter().count(), 1);
        assert_eq!(map["content-length"].to_str().ok().and_then(|v| v.parse().ok()), Some(n));
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let method = &METHODS[usize::from(data[0]) % METHODS.len()];
    let seed = u32::from(data[1]) << 8 | u32::from(data[2]);
    let stream = &data[3..];
    if stream.is_empty() {
        return;
    }
    let (whole, head) = read_head(stream, method, &mut || usize::MAX);
    let mut rng = Rng(seed | 1);
    let max_read = 1 + (seed as usize % 32);
    let mut pieces_read = move || {
        let r = rng.next_u32() as usize;
        if r.is_multiple_of(16) { 8192 } else { 1 + r % max_read }
    };
    let (pieces, _) = read_head(stream, method, &mut pieces_read);
    assert_eq!(whole, pieces, "reading the head in pieces changed it");
    let (HeadResult::Head(out), Some(head)) = (whole, head) else { return };
    let framing = out.framing;
    check_head(stream, method, &out, head);
    if framing != Framing::Chunked {
        return;
    }
    let body = &stream[out.consumed..];
    let whole = read_chunked(body, &mut || usize::MAX);
    let pieces = read_chunked(body, &mut pieces_read);
    assert_eq!(whole, pieces, "decoding the body in pieces changed it");
    if let BodyEnd::End(n) = whole.end {
        assert!(n <= body.len());
    }
    if let Some((data, trailers, end)) = strict_chunked(body) {
        assert_eq!(whole.end, BodyEnd::End(end), "a strict decoder ends the body elsewhere");
        assert_eq!(whole.data, data, "a strict decoder reads other data");
        // Trailers with a value HeaderValue refuses are dropped by the decoder; the strict
        // decoder's values are visible ASCII, obs-text and whitespace, which it takes.
        let got = whole.trailers.unwrap_or_default();
        let got: Vec<(String, Vec<u8>)> = got.into_iter().collect();
        let mut want = trailers;
        let mut got_sorted = got.clone();
        want.sort();
        got_sorted.sort();
        assert_eq!(got_sorted, want, "a strict decoder reads other trailers");
    }
});
