//! HTTP/1.1 towards servers, without a session of its own: the request head is written
//! straight from the rewritten request, the response head is parsed from the connection's
//! read buffer, and the response body is decoded from that buffer as the client's side
//! pulls it. No task, channel or per-request handshake sits between the client's request
//! and the server's socket; an idle connection is a bare socket.
//!
//! The grammar is RFC 9112's: a response head of at most [`MAX_HEAD`] bytes and
//! [`MAX_HEADERS`] fields, its body delimited by the request method and status, else
//! `Transfer-Encoding` (chunked last, else read until close), else `Content-Length`, else
//! until close. A response whose framing is ambiguous is refused or, where the RFC says
//! so, read until close and never reused.

use std::future::Future as _;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf as _, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version};
use http_body::{Body as _, Frame, SizeHint};
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;
use tokio_util::sync::WaitForCancellationFutureOwned;

use super::body::ReqBody;
use crate::upstream::Server;

/// The largest response head (status line and fields) accepted from a server.
pub const MAX_HEAD: usize = 64 * 1024;
/// The longest field name `HeaderName` takes.
pub const MAX_NAME: usize = (1 << 16) - 1;
/// The most fields a response head or a chunked body's trailer section may carry.
pub const MAX_HEADERS: usize = 100;
/// The longest chunk-size line (size and extensions) accepted.
const MAX_CHUNK_LINE: usize = 4 * 1024;
/// Room made in the read buffer before each read: a 16 KiB body arrives with its head in
/// one read (and leaves in one write to the client), where 16 KiB took two of each.
pub const READ_SIZE: usize = 32 * 1024;
/// Room for a response's first read on a connection whose last response was small: a
/// buffer of the allocator's small size classes, which its per-thread cache keeps however
/// many exchanges are in flight (an HTTP/2 client's streams, say), where 32 KiB buffers
/// go back to the shared arena once a few dozen are.
pub const SMALL_READ: usize = 8 * 1024;

/// A piece of a response body shorter than this is copied out of the read buffer rather
/// than handed on as a slice of it, whatever the body's framing: the buffer (8 KiB or
/// more) then stays the body's alone, goes back to the allocator as the body ends (a
/// small answer, the usual one) and is refilled in place by the next read (a stream of
/// small pieces), where a slice would hold it until the client's connection has written
/// the piece out, and the next read would need a new buffer. An HTTP/2 connection writes
/// its streams' pieces together, so with a hundred or more in flight the buffers went
/// back and forth between the allocator's thread cache and its arena (a slab made and
/// unmade every other request).
const COPY_UNDER: usize = 1024;

/// The next `n` bytes of `buf` as a piece of a body (see [`COPY_UNDER`]).
fn take_piece(buf: &mut BytesMut, n: usize) -> Bytes {
    if n < COPY_UNDER {
        let piece = Bytes::copy_from_slice(&buf[..n]);
        buf.advance(n);
        piece
    } else {
        buf.split_to(n).freeze()
    }
}

/// The room for the first read of a connection's next response, from what its last one
/// needed: `body` bytes and a head.
pub fn first_read_room(body: u64) -> usize {
    if body + 1024 <= SMALL_READ as u64 { SMALL_READ } else { READ_SIZE }
}

/// How a message body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body at all (and no length field for a request).
    Empty,
    Length(u64),
    Chunked,
    /// A response body that ends when the server closes the connection.
    Close,
}

fn invalid(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// The error of an exchange cut off because its server was removed (drain timeout).
pub fn removed() -> io::Error {
    io::Error::other("server removed after its drain timeout")
}

/// Appends one `name: value` field line.
pub fn push_field(name: &HeaderName, value: &HeaderValue, out: &mut Vec<u8>) {
    out.extend_from_slice(name.as_str().as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// A request's head as it goes to a server.
pub struct RequestHead<'a> {
    /// The request line, and the fields the gateway read or edited (`Host`...).
    pub parts: &'a http::request::Parts,
    /// The client's other fields, as it wrote them (empty for a head hyper read).
    pub fields: &'a Fields,
    /// The forwarding fields (see `forwarded`).
    pub added: &'a [(&'static HeaderName, HeaderValue)],
}

/// Appends the request head: request line, the fields of `parts` except the framing
/// ones, the client's own lines, the fields `added`, then the framing field `framing`
/// calls for. (The order of fields of different names carries no meaning, RFC 9110
/// section 5.3; those of one name are all in one of the three.)
pub fn encode_head(head: &RequestHead<'_>, framing: Framing, out: &mut Vec<u8>) {
    let parts = head.parts;
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(parts.uri.path_and_query().map_or("/", |p| p.as_str()).as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in &parts.headers {
        if name != header::CONTENT_LENGTH && name != header::TRANSFER_ENCODING {
            push_field(name, value, out);
        }
    }
    for (_, line) in head.fields.lines() {
        out.extend_from_slice(line);
        out.extend_from_slice(b"\r\n");
    }
    for (name, value) in head.added {
        push_field(name, value, out);
    }
    match framing {
        Framing::Length(n) => push_length(n, out),
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Framing::Empty | Framing::Close => {}
    }
    out.extend_from_slice(b"\r\n");
}

/// Appends the `Content-Length` field line.
pub fn push_length(n: u64, out: &mut Vec<u8>) {
    out.extend_from_slice(b"content-length: ");
    push_digits(n, 10, out);
    out.extend_from_slice(b"\r\n");
}

/// Appends the size line of a chunk of `len` bytes.
pub fn encode_chunk_line(len: usize, out: &mut Vec<u8>) {
    push_digits(len as u64, 16, out);
    out.extend_from_slice(b"\r\n");
}

/// Appends `n` in base 10 or 16 (lower case), without the formatting machinery.
fn push_digits(mut n: u64, base: u64, out: &mut Vec<u8>) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b"0123456789abcdef"[(n % base) as usize];
        n /= base;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// Appends one chunk of a chunked body (nothing for empty data: that would end it).
pub fn encode_chunk(data: &[u8], out: &mut Vec<u8>) {
    if !data.is_empty() {
        encode_chunk_line(data.len(), out);
        out.extend_from_slice(data);
        out.extend_from_slice(b"\r\n");
    }
}

/// Appends the end of a chunked body: the last chunk and the trailer section.
pub fn encode_last_chunk(trailers: Option<&HeaderMap>, out: &mut Vec<u8>) {
    out.extend_from_slice(b"0\r\n");
    for (name, value) in trailers.into_iter().flatten() {
        push_field(name, value, out);
    }
    out.extend_from_slice(b"\r\n");
}

/// A parsed response head.
#[derive(Debug)]
pub struct Head {
    pub status: StatusCode,
    pub version: Version,
    /// The end-to-end fields: hop-by-hop ones (see [`super::hop`]) are dropped as the head
    /// is read.
    pub fields: Fields,
    pub framing: Framing,
    /// Whether the connection may carry another request once this body has ended.
    pub keep_alive: bool,
    /// The server answered before the request body was all sent, refusing the request
    /// or no longer taking the body: the client's connection ends with this response
    /// (the rest of its body will not be read), and the answer says so.
    pub cuts_upload: bool,
}

/// Fields as a peer wrote them: one shared copy of its head and where each end-to-end
/// field lies in it. A server's response fields go to an HTTP/1.1 client written back as
/// they came ([`Fields::lines`]), to a client hyper answers (HTTP/2) in a `HeaderMap`
/// ([`Fields::append_to`]); the fields of a client's request that the gateway does not
/// read go to the server the same way (see `front::parse`). Making a `HeaderName`, a
/// `HeaderValue` and a map entry for each field, then writing them out of the map again,
/// took about 700 instructions per field.
///
/// The bytes were checked by httparse, whose rules for a field's name (a token) and
/// value (visible ASCII, obs-text, spaces and tabs) are those of `HeaderName` and
/// `HeaderValue`, but for length: a name over [`MAX_NAME`] bytes, which `HeaderName`
/// refuses, does not fit in a response head, and sends a request to hyper.
#[derive(Debug, Default, Clone)]
pub struct Fields {
    raw: Bytes,
    at: Vec<FieldAt>,
    /// The value of the `Content-Length` among the fields, if there is one.
    pub length: Option<u64>,
    /// A response's reason phrase (its span in `raw`; empty when it has none).
    reason: (u32, u32),
    /// A response's first `Content-Length` value, when it is digits alone (its span in
    /// `raw`; empty otherwise): [`Fields::append_to`] shares it rather than writing the
    /// number anew.
    length_at: (u32, u32),
}

/// Where one field's name and value lie in [`Fields::raw`] (start, end).
#[derive(Debug, Clone, Copy)]
pub(super) struct FieldAt {
    name: (u32, u32),
    value: (u32, u32),
}

impl FieldAt {
    /// Where `name` and `value`, slices of a buffer that begins at address `base`, lie
    /// in it. The buffer is a head: a response's is at most [`MAX_HEAD`] bytes, a
    /// request's at most `max_header_bytes` (1 MiB at most): the spans fit a u32.
    pub(super) fn within(base: usize, name: &[u8], value: &[u8]) -> FieldAt {
        let span = |part: &[u8]| {
            let start = (part.as_ptr() as usize - base) as u32;
            (start, start + part.len() as u32)
        };
        FieldAt { name: span(name), value: span(value) }
    }
}

/// The bytes of `raw` from `start` to `end`.
fn spanned(raw: &[u8], (start, end): (u32, u32)) -> &[u8] {
    &raw[start as usize..end as usize]
}

/// No fields: those of a request whose head hyper read (all in its map).
pub static NO_FIELDS: Fields = Fields::new(Bytes::new(), Vec::new());

impl Fields {
    /// The fields at `at` in `raw` (a copy of the head they were read from).
    pub(super) const fn new(raw: Bytes, at: Vec<FieldAt>) -> Fields {
        Fields { raw, at, length: None, reason: (0, 0), length_at: (0, 0) }
    }

    /// The reason phrase the server wrote in its status line, if any (`OK` in `200 OK`).
    pub fn reason(&self) -> Option<&[u8]> {
        Some(self.bytes(self.reason)).filter(|r| !r.is_empty())
    }

    /// Each field's name and value, in the order the peer sent them.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.at.iter().map(|f| (self.bytes(f.name), self.bytes(f.value)))
    }

    /// Each field's name and its line as the peer wrote it, without the line's end
    /// (`name: value`, with whatever spaces it had around the value).
    pub fn lines(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.at.iter().map(|f| (self.bytes(f.name), self.bytes((f.name.0, f.value.1))))
    }

    /// The values of the fields called `name` (ASCII case-insensitive).
    pub fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> {
        self.iter().filter(move |(n, _)| n.eq_ignore_ascii_case(name.as_bytes())).map(|(_, v)| v)
    }

    fn bytes(&self, span: (u32, u32)) -> &[u8] {
        spanned(&self.raw, span)
    }

    /// Removes the fields called `name`; [`Fields::length`] goes with `Content-Length`.
    pub(super) fn remove(&mut self, name: &[u8]) {
        let raw = &self.raw;
        self.at.retain(|f| !spanned(raw, f.name).eq_ignore_ascii_case(name));
        if name.eq_ignore_ascii_case(b"content-length") {
            self.length = None;
        }
    }

    /// The reason phrase for hyper to write in an HTTP/1.1 status line: the server's, when
    /// it is not the one hyper writes anyway; an empty one for a code hyper knows no phrase
    /// for (it would write `<none>`).
    pub fn reason_phrase(&self, status: StatusCode) -> Option<hyper::ext::ReasonPhrase> {
        let usual = status.canonical_reason();
        match self.reason() {
            Some(reason) if usual.is_some_and(|u| u.as_bytes() == reason) => None,
            Some(_) => {
                hyper::ext::ReasonPhrase::try_from(self.raw.slice(self.reason.0 as usize..self.reason.1 as usize)).ok()
            }
            None if usual.is_none() => Some(hyper::ext::ReasonPhrase::from_static(b"")),
            None => None,
        }
    }

    /// Appends the fields to `map`, their values sharing the head's bytes, and the
    /// length, if there is one.
    pub fn append_to(self, map: &mut HeaderMap) {
        map.reserve(self.at.len() + 1);
        if let Some(n) = self.length {
            let digits = self.raw.slice(self.length_at.0 as usize..self.length_at.1 as usize);
            let value = if digits.is_empty() {
                HeaderValue::from(n)
            } else {
                HeaderValue::from_maybe_shared(digits).unwrap_or_else(|_| HeaderValue::from(n))
            };
            map.append(header::CONTENT_LENGTH, value);
        }
        for f in &self.at {
            let name = HeaderName::from_bytes(self.bytes(f.name));
            let value = HeaderValue::from_maybe_shared(self.raw.slice(f.value.0 as usize..f.value.1 as usize));
            match (name, value) {
                (Ok(name), Ok(value)) => {
                    map.append(name, value);
                }
                // Not reached: httparse checked the same rules (see above).
                _ => tracing::debug!("a response field no HeaderMap takes was dropped"),
            }
        }
    }
}

/// Parses a response head from the start of `buf`, removing it from `buf`. `None` when
/// `buf` does not hold a whole head yet. The fields share one allocation with the head.
pub fn parse_head(buf: &mut BytesMut, method: &Method) -> io::Result<Option<Head>> {
    // Uninitialised: zeroing 100 fields per parse would cost more than parsing.
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut resp, buf, &mut slots) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => return Err(invalid("response head too large")),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(invalid("too many response header fields")),
        // HTTP/1.2 to 1.9: read as HTTP/1.1 (RFC 9110 section 2.5), once rewritten so.
        Err(httparse::Error::Version)
            if matches!(buf[..], [b'H', b'T', b'T', b'P', b'/', b'1', b'.', b'2'..=b'9', b' ', ..]) =>
        {
            buf[7] = b'1';
            return parse_head(buf, method);
        }
        // The same version with the read ending right after it: the rest is to come.
        Err(httparse::Error::Version) if matches!(buf[..], [b'H', b'T', b'T', b'P', b'/', b'1', b'.', b'2'..=b'9']) => {
            return Ok(None);
        }
        Err(_) => return Err(invalid("malformed response head")),
    };
    // 100 to 599: RFC 9110 section 15 makes the rest invalid (a client would take one for a
    // 5xx; the gateway answers 502).
    let status = resp
        .code
        .filter(|c| (100..=599).contains(c))
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or_else(|| invalid("bad status code"))?;
    let version = if resp.version == Some(0) { Version::HTTP_10 } else { Version::HTTP_11 };
    // One copy of the head; the fields are where they lie in it.
    let raw = Bytes::copy_from_slice(&buf[..len]);
    let base = buf.as_ptr() as usize;
    // httparse checked it: tabs, spaces, visible ASCII and obs-text.
    let reason = resp.reason.filter(|r| !r.is_empty()).map_or((0, 0), |r| {
        let start = (r.as_ptr() as usize - base) as u32;
        (start, start + r.len() as u32)
    });
    let mut at = Vec::with_capacity(resp.headers.len());
    // What framing and persistence depend on, noted as the fields go by rather than
    // looked up afterwards.
    let mut noted = Noted::default();
    let mut length_at = (0, 0);
    for field in resp.headers.iter() {
        let name = field.name.as_bytes();
        // Hop-by-hop fields are noted and dropped here.
        if let Some(which) = super::hop::fixed(name) {
            noted.note_hop(which, field.value);
            continue;
        }
        // Framing: passed on as the one number it says (`Fields::length`), however the
        // server repeated or listed it (RFC 9110 section 8.6).
        if name.eq_ignore_ascii_case(b"content-length") {
            if !matches!(noted.length, Some(Err(_))) {
                if noted.length.is_none() && field.value.iter().all(u8::is_ascii_digit) {
                    length_at = FieldAt::within(base, name, field.value).value;
                }
                noted.length = Some(content_length(field.value, noted.length.and_then(Result::ok)));
            }
            continue;
        }
        at.push(FieldAt::within(base, name, field.value));
    }
    buf.advance(len);
    // The spans are u32: `len` must be within MAX_HEAD before they are used.
    if len > MAX_HEAD {
        return Err(invalid("response head too large"));
    }
    if noted.connection.too_many {
        return Err(invalid(super::hop::TOO_MANY_NAMED));
    }
    let mut fields = Fields { length: noted.length.and_then(Result::ok), reason, length_at, ..Fields::new(raw, at) };
    // Fields the `Connection` header names are hop-by-hop too (rare beyond its usual tokens).
    for name in &noted.connection.named {
        fields.remove(name.as_str().as_bytes());
    }
    let (framing, mut clean) = response_framing(method, status, &noted)?;
    if noted.transfer_encoding {
        // Framed by Transfer-Encoding: a length beside it is stale and must not reach
        // the client, and HTTP/1.0 has no Transfer-Encoding (RFC 9112 section 6.1).
        if noted.length.is_some() {
            fields.remove(b"content-length");
        }
        clean &= version != Version::HTTP_10;
    }
    let persistent = super::hop::persistent(version, noted.connection.close, || noted.connection.keep_alive);
    let keep_alive = clean && persistent && framing != Framing::Close;
    Ok(Some(Head { status, version, fields, framing, keep_alive, cuts_upload: false }))
}

/// The fields a response's framing and persistence depend on.
#[derive(Default)]
struct Noted {
    transfer_encoding: bool,
    /// A transfer coding other than `chunked` (gzip, say) is named, or one in bytes other
    /// than visible ASCII, or chunked more than once (RFC 9112 section 6.1).
    other_coding: bool,
    /// `Content-Length`, if there is one: its value (repeated or listed values must
    /// agree), or the first fault in it.
    length: Option<Result<u64, &'static str>>,
    /// What `Connection` says.
    connection: super::hop::ConnectionSays,
}

impl Noted {
    /// A hop-by-hop field (see [`super::hop::fixed`]), which goes no further.
    fn note_hop(&mut self, which: super::hop::Fixed, value: &[u8]) {
        use super::hop::Fixed;
        match which {
            Fixed::Connection => self.connection.note(value),
            Fixed::TransferEncoding => {
                let once = !self.transfer_encoding && super::hop::chunked_codings(value) == Some(1);
                self.other_coding |= !once;
                self.transfer_encoding = true;
            }
            Fixed::Te | Fixed::Upgrade | Fixed::Other => {}
        }
    }
}

/// `length` (from earlier fields) and a `Content-Length` value (possibly a list)
/// together: repeated or listed values must agree (RFC 9110 section 8.6).
pub(super) fn content_length(value: &[u8], mut length: Option<u64>) -> Result<u64, &'static str> {
    // Bytes, not text: only ASCII digits and spaces count (a no-break space is no space).
    for part in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
        if part.is_empty() || !part.iter().all(u8::is_ascii_digit) {
            return Err("bad content-length");
        }
        let n = part
            .iter()
            .try_fold(0u64, |n, &b| n.checked_mul(10)?.checked_add(u64::from(b - b'0')))
            .ok_or("bad content-length")?;
        if length.is_some_and(|l| l != n) {
            return Err("conflicting content-length");
        }
        length = Some(n);
    }
    length.ok_or("bad content-length")
}

/// The response body's framing (RFC 9112 section 6.3), and whether it is unambiguous
/// enough to reuse the connection after it.
fn response_framing(method: &Method, status: StatusCode, noted: &Noted) -> io::Result<(Framing, bool)> {
    if *method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok((Framing::Empty, true));
    }
    if noted.other_coding {
        // A coding the gateway would have to undo (gzip, say), or pass on under a
        // Transfer-Encoding only HTTP/1.1 has: relayed as it is, the client would take the
        // coded bytes for the content.
        return Err(invalid("response body in a transfer coding other than chunked"));
    }
    if noted.transfer_encoding {
        // Chunked. With both fields the length is ignored and the connection is not reused.
        return Ok((Framing::Chunked, noted.length.is_none()));
    }
    Ok(match noted.length {
        Some(length) => (Framing::Length(length.map_err(invalid)?), true),
        None => (Framing::Close, false),
    })
}

/// `trailers` without the fields that may not be trailers (see `hop::may_be_trailer`):
/// an HTTP/2 client resets a stream whose trailers carry a connection field, and none
/// of framing, routing or the like may come after the content.
fn may_be_trailers(trailers: HeaderMap) -> HeaderMap {
    if trailers.keys().all(super::hop::may_be_trailer) {
        return trailers;
    }
    trailers.iter().filter(|(name, _)| super::hop::may_be_trailer(name)).map(|(n, v)| (n.clone(), v.clone())).collect()
}

/// What the chunked decoder found in the buffer.
#[derive(Debug, PartialEq)]
pub enum Decoded {
    Data(Bytes),
    Trailers(HeaderMap),
    End,
}

/// A chunked body's decoder (RFC 9112 section 7.1), fed from a read buffer.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum Chunked {
    #[default]
    Size,
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    Trailers,
    Done,
}

impl Chunked {
    /// Decodes the next piece from `buf`, consuming it; `None` when more input is needed.
    pub fn decode(&mut self, buf: &mut BytesMut) -> io::Result<Option<Decoded>> {
        loop {
            match *self {
                Chunked::Size => {
                    let Some(end) = buf.iter().position(|&b| b == b'\n') else {
                        return if buf.len() > MAX_CHUNK_LINE {
                            Err(invalid("chunk size line too long"))
                        } else {
                            Ok(None)
                        };
                    };
                    if end > MAX_CHUNK_LINE {
                        return Err(invalid("chunk size line too long"));
                    }
                    let size = chunk_size(&buf[..end])?;
                    buf.advance(end + 1);
                    *self = if size == 0 { Chunked::Trailers } else { Chunked::Data(size) };
                }
                Chunked::Data(left) => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let take = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                    let data = take_piece(buf, take);
                    let left = left - take as u64;
                    *self = if left == 0 { Chunked::DataEnd } else { Chunked::Data(left) };
                    return Ok(Some(Decoded::Data(data)));
                }
                Chunked::DataEnd => match buf.first() {
                    None => return Ok(None),
                    Some(b'\r') if buf.len() < 2 => return Ok(None),
                    Some(b'\r') if buf[1] == b'\n' => {
                        buf.advance(2);
                        *self = Chunked::Size;
                    }
                    Some(b'\n') => {
                        buf.advance(1);
                        *self = Chunked::Size;
                    }
                    Some(_) => return Err(invalid("chunk data not followed by CRLF")),
                },
                Chunked::Trailers => {
                    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
                    let (len, trailers) = match httparse::parse_headers(buf, &mut fields) {
                        Ok(httparse::Status::Complete((len, fields))) => {
                            let mut map = HeaderMap::with_capacity(fields.len());
                            for f in fields.iter() {
                                let name = HeaderName::from_bytes(f.name.as_bytes());
                                let value = HeaderValue::from_bytes(f.value);
                                if let (Ok(name), Ok(value)) = (name, value) {
                                    map.append(name, value);
                                }
                            }
                            (len, map)
                        }
                        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => {
                            return Err(invalid("trailer section too large"));
                        }
                        Ok(httparse::Status::Partial) => return Ok(None),
                        Err(_) => return Err(invalid("malformed trailer section")),
                    };
                    buf.advance(len);
                    *self = Chunked::Done;
                    if !trailers.is_empty() {
                        return Ok(Some(Decoded::Trailers(trailers)));
                    }
                }
                Chunked::Done => return Ok(Some(Decoded::End)),
            }
        }
    }
}

/// The size on a chunk-size line (`\n` excluded): hex digits, then optional extensions.
fn chunk_size(line: &[u8]) -> io::Result<u64> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    let rest = &line[digits..];
    let rest_ok = rest.is_empty() || matches!(rest.iter().find(|b| !matches!(b, b' ' | b'\t')), None | Some(b';'));
    if digits == 0 || digits > 16 || !rest_ok {
        return Err(invalid("bad chunk size"));
    }
    line[..digits].iter().try_fold(0u64, |n, &b| {
        let d = (b as char).to_digit(16).map_or(0, u64::from);
        n.checked_mul(16).map(|n| n + d).ok_or_else(|| invalid("chunk size overflows"))
    })
}

/// Reads more from `io` into `buf` (making room first); `Ok(0)` at end of stream.
pub fn poll_fill(io: &mut TcpStream, buf: &mut BytesMut, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
    poll_fill_with(io, buf, READ_SIZE, cx)
}

/// [`poll_fill`] with `room` made (a response's first read: see [`first_read_room`]).
///
/// The room is made once the socket has something to read: an exchange waiting for its
/// server's answer, or a body for more of it, holds no buffer meanwhile. (A buffer made
/// before the wait was 8 KiB per request in flight, which with a hundred or more in
/// flight went back and forth between the allocator's thread cache and its arena.)
pub fn poll_fill_with(
    io: &mut TcpStream,
    buf: &mut BytesMut,
    room: usize,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    if buf.capacity() - buf.len() < room {
        ready!(io.poll_read_ready(cx))?;
    }
    buf.reserve(room);
    tokio_util::io::poll_read_buf(Pin::new(io), cx, buf)
}

/// The final response head in `buf`, skipping interim (1xx) responses.
pub fn final_head(buf: &mut BytesMut, method: &Method) -> io::Result<Option<Head>> {
    while let Some(head) = parse_head(buf, method)? {
        if head.status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "101 to a request that did not upgrade"));
        }
        if !head.status.is_informational() {
            return Ok(Some(head));
        }
    }
    Ok(None)
}

/// How sending a request broke: on the server's side, or the client's body.
#[derive(Debug)]
pub enum Broke {
    Server(io::Error),
    Client(hyper::Error),
}

impl From<io::Error> for Broke {
    fn from(e: io::Error) -> Self {
        Broke::Server(e)
    }
}

/// A request body on its way to the server, framed; the server may answer meanwhile.
#[derive(Debug)]
pub struct Upload {
    body: ReqBody,
    framing: Framing,
    /// Framed bytes not yet written.
    out: Vec<u8>,
    /// Bytes of `out` already written.
    sent: usize,
    ended: bool,
    /// Writing failed: the server stopped reading; nothing more is sent.
    pub abandoned: bool,
    /// Bytes written so far (framing included): whether sending moves on.
    pub written: u64,
    /// Waiting for the client's next piece of the body (not for the server to take one).
    pub awaiting_client: bool,
}

impl Upload {
    pub fn new(body: ReqBody, framing: Framing) -> Self {
        Upload {
            body,
            framing,
            out: Vec::new(),
            sent: 0,
            ended: false,
            abandoned: false,
            written: 0,
            awaiting_client: false,
        }
    }

    /// Sends the body; `Some(head)` if the server answered before it was all sent.
    pub fn poll_until_answered(
        &mut self,
        io: &mut TcpStream,
        buf: &mut BytesMut,
        method: &Method,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Head>, Broke>> {
        loop {
            if !self.abandoned {
                match self.poll_send(io, cx) {
                    Ok(Poll::Ready(())) => return Poll::Ready(Ok(None)),
                    Ok(Poll::Pending) => {}
                    // The server stopped reading (an early answer, then a close or reset):
                    // its answer may already be here; read on for it.
                    Err(Broke::Server(e)) => {
                        tracing::debug!(error = %e, "request body not sent whole; reading the server's answer");
                        self.abandoned = true;
                    }
                    Err(client) => return Poll::Ready(Err(client)),
                }
            }
            match poll_fill(io, buf, cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed mid-request").into()));
                }
                Poll::Ready(Ok(_)) => {
                    if let Some(head) = final_head(buf, method)? {
                        return Poll::Ready(Ok(Some(head)));
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
            }
        }
    }

    /// Writes what is framed and frames more; ready once the whole body is written.
    pub fn poll_send(&mut self, io: &mut TcpStream, cx: &mut Context<'_>) -> Result<Poll<()>, Broke> {
        loop {
            if self.sent < self.out.len() {
                match Pin::new(&mut *io).poll_write(cx, &self.out[self.sent..]) {
                    Poll::Ready(Ok(0)) => return Err(io::Error::from(io::ErrorKind::WriteZero).into()),
                    Poll::Ready(Ok(n)) => {
                        self.sent += n;
                        self.written += n as u64;
                    }
                    Poll::Ready(Err(e)) => return Err(e.into()),
                    Poll::Pending => return Ok(Poll::Pending),
                }
                continue;
            }
            if self.ended {
                return Ok(Poll::Ready(()));
            }
            self.out.clear();
            self.sent = 0;
            let frame = Pin::new(&mut self.body).poll_frame(cx);
            self.awaiting_client = frame.is_pending();
            let frame = match frame {
                Poll::Pending => return Ok(Poll::Pending),
                Poll::Ready(Some(Err(e))) => return Err(Broke::Client(e)),
                Poll::Ready(Some(Ok(frame))) => frame,
                Poll::Ready(None) => {
                    self.ended = true;
                    if self.framing == Framing::Chunked {
                        encode_last_chunk(None, &mut self.out);
                    }
                    continue;
                }
            };
            match frame.into_data() {
                Ok(data) if self.framing == Framing::Chunked => encode_chunk(&data, &mut self.out),
                Ok(data) => self.out.extend_from_slice(&data),
                Err(frame) => {
                    self.ended = true;
                    if self.framing == Framing::Chunked {
                        let trailers = frame.into_trailers().ok().map(may_be_trailers);
                        encode_last_chunk(trailers.as_ref(), &mut self.out);
                    }
                }
            }
        }
    }
}

/// Where a response body stands.
#[derive(Debug)]
enum State {
    Length(u64),
    Chunked(Chunked),
    Close,
    Done,
}

/// A server's response body, read from its connection as it is polled. When it ends
/// cleanly on a connection that may be kept, [`ResponseBody::reusable`] gives the socket
/// back for the pool.
#[derive(Debug)]
pub struct ResponseBody {
    io: Option<TcpStream>,
    buf: BytesMut,
    state: State,
    keep_alive: bool,
    /// Its `kill` fires when the server is removed after its drain timeout: the body then
    /// fails. (Held through the server, whose counters the request touches anyway, rather
    /// than a clone of the token: with many servers the token's count is one more cache
    /// miss per request.)
    server: Arc<Server>,
    /// Waits on the server's `kill`, set up only once a read has had to wait.
    killed: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    /// The longest the server may send nothing while the body waits on it
    /// (`response_timeout`), timed by `stall` from the first wait after a read that
    /// brought something; set up only once a read has had to wait.
    stall_limit: Duration,
    stall: Option<Pin<Box<tokio::time::Sleep>>>,
    /// A read brought something since `stall` was set.
    moved: bool,
    /// The rest of a request body the server answered before it had all of it: sent
    /// on as the response is read.
    upload: Option<Box<Upload>>,
    /// The response's fields, until they are written or put in a map.
    fields: Fields,
    /// See [`Head::cuts_upload`].
    cuts_upload: bool,
}

impl ResponseBody {
    /// The body that follows `head` on `io`, whose read buffer already holds `buf`; it
    /// keeps the head's fields.
    pub fn new(
        io: TcpStream,
        buf: BytesMut,
        head: Head,
        server: Arc<Server>,
        upload: Option<Box<Upload>>,
        stall_limit: Duration,
    ) -> Self {
        let state = match head.framing {
            Framing::Empty | Framing::Length(0) => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::Chunked(Chunked::Size),
            Framing::Close => State::Close,
        };
        let (keep_alive, cuts_upload) = (head.keep_alive, head.cuts_upload);
        ResponseBody {
            io: Some(io),
            buf,
            state,
            keep_alive,
            server,
            killed: None,
            stall_limit,
            stall: None,
            moved: false,
            upload,
            fields: head.fields,
            cuts_upload,
        }
    }

    /// See [`Head::cuts_upload`].
    pub fn cuts_upload(&self) -> bool {
        self.cuts_upload
    }

    /// The response's fields (see [`Fields`]).
    pub fn fields(&self) -> &Fields {
        &self.fields
    }

    pub fn take_fields(&mut self) -> Fields {
        std::mem::take(&mut self.fields)
    }

    pub fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done | State::Length(0))
    }

    pub fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Done => SizeHint::with_exact(0),
            State::Length(n) => SizeHint::with_exact(n),
            State::Chunked(_) | State::Close => SizeHint::new(),
        }
    }

    /// The connection, when the body has ended cleanly and nothing else came after it.
    pub fn reusable(&mut self) -> Option<TcpStream> {
        let clean =
            matches!(self.state, State::Done) && self.keep_alive && self.buf.is_empty() && self.upload.is_none();
        if clean { self.io.take() } else { None }
    }

    pub fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Frame<Bytes>>>> {
        loop {
            match &mut self.state {
                State::Done => return Poll::Ready(None),
                State::Length(left) if !self.buf.is_empty() => {
                    let take = usize::try_from(*left).unwrap_or(usize::MAX).min(self.buf.len());
                    *left -= take as u64;
                    let data = take_piece(&mut self.buf, take);
                    if *left == 0 {
                        self.state = State::Done;
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                State::Chunked(decoder) => match decoder.decode(&mut self.buf) {
                    Ok(Some(Decoded::Data(data))) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    // The trailer section ends the body (hyper polls no further).
                    Ok(Some(Decoded::Trailers(t))) => {
                        self.state = State::Done;
                        return Poll::Ready(Some(Ok(Frame::trailers(may_be_trailers(t)))));
                    }
                    Ok(Some(Decoded::End)) => {
                        self.state = State::Done;
                        return Poll::Ready(None);
                    }
                    Ok(None) => {}
                    Err(e) => return Poll::Ready(Some(Err(self.fail(e)))),
                },
                State::Close if !self.buf.is_empty() => {
                    let all = self.buf.len();
                    return Poll::Ready(Some(Ok(Frame::data(take_piece(&mut self.buf, all)))));
                }
                State::Length(_) | State::Close => {}
            }
            // The buffer holds nothing more to hand out: read.
            let n = match ready!(self.poll_read(cx)) {
                Ok(n) => n,
                Err(e) => return Poll::Ready(Some(Err(self.fail(e)))),
            };
            if n == 0 {
                if matches!(self.state, State::Close) {
                    self.state = State::Done;
                    self.io = None;
                    return Poll::Ready(None);
                }
                let e = io::Error::new(io::ErrorKind::UnexpectedEof, "server closed the connection mid-body");
                return Poll::Ready(Some(Err(self.fail(e))));
            }
        }
    }

    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let Some(io) = self.io.as_mut() else {
            return Poll::Ready(Err(io::Error::from(io::ErrorKind::NotConnected)));
        };
        if let Some(upload) = self.upload.as_mut() {
            // An upload still going out after an early answer: the server taking it is the
            // exchange moving, whatever its body does meanwhile.
            let before = upload.written;
            let sent = upload.poll_send(io, cx);
            self.moved |= upload.written != before;
            match sent {
                Ok(Poll::Pending) => {}
                // Sent whole; the connection still is not kept (see `exchange`).
                Ok(Poll::Ready(())) => self.upload = None,
                // The server stopped reading: its response may still complete.
                Err(Broke::Server(e)) => {
                    tracing::debug!(error = %e, "request body not sent whole; the server answered before it");
                    self.upload = None;
                    self.keep_alive = false;
                }
                Err(Broke::Client(e)) => return Poll::Ready(Err(io::Error::other(e))),
            }
        }
        match poll_fill(io, &mut self.buf, cx) {
            Poll::Ready(r) => {
                self.moved |= matches!(r, Ok(n) if n > 0);
                Poll::Ready(r)
            }
            Poll::Pending => {
                let limit = self.stall_limit;
                let deadline = || tokio::time::Instant::now() + limit;
                let fresh = self.stall.is_none();
                let stall = self.stall.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline())));
                if std::mem::take(&mut self.moved) && !fresh {
                    stall.as_mut().reset(deadline());
                }
                if stall.as_mut().poll(cx).is_ready() {
                    let e = format!("the server sent nothing of its response body for {limit:?}");
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, e)));
                }
                let kill = &self.server.kill;
                let killed = self.killed.get_or_insert_with(|| Box::pin(kill.clone().cancelled_owned()));
                ready!(killed.as_mut().poll(cx));
                Poll::Ready(Err(removed()))
            }
        }
    }

    /// Ends the body on an error: the connection is closed.
    fn fail(&mut self, e: io::Error) -> io::Error {
        self.state = State::Done;
        self.io = None;
        e
    }
}

impl Drop for ResponseBody {
    /// A response read whole while the request body it answered early is still going out
    /// (a server answering 200 at once, then reading the upload; hyper drops a body once
    /// its length is written): the upload is finished on a task of its own. Dropped
    /// unsent, the rest of the client's body would go unread, and its connection would
    /// close under a client still sending it.
    fn drop(&mut self) {
        if !matches!(self.state, State::Done) {
            return;
        }
        if let (Some(upload), Some(io)) = (self.upload.take(), self.io.take()) {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(finish_upload(io, upload, self.stall_limit));
            }
        }
    }
}

/// Sends the rest of `upload`; gives up when nothing moves for `limit`, or when the
/// server stops taking it or the client's body breaks. The connection is not kept.
async fn finish_upload(mut io: TcpStream, mut upload: Box<Upload>, limit: Duration) {
    loop {
        let before = upload.written;
        let step = std::future::poll_fn(|cx| match upload.poll_send(&mut io, cx) {
            Ok(Poll::Ready(())) => Poll::Ready(Ok(true)),
            Ok(Poll::Pending) if upload.written != before => Poll::Ready(Ok(false)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(e) => Poll::Ready(Err(e)),
        });
        match tokio::time::timeout(limit, step).await {
            Ok(Ok(true)) => return,
            Ok(Ok(false)) => {}
            Ok(Err(e)) => {
                tracing::debug!(error = ?e, "request body not sent whole after the server's answer");
                return;
            }
            Err(_) => {
                tracing::debug!(?limit, "request body stalled after the server's answer; left unsent");
                return;
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::expect_used)]
mod tests {
    use super::*;

    /// Both ends of a loopback TCP connection.
    async fn socket_pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let near = TcpStream::connect(listener.local_addr().expect("address")).await.expect("connect");
        let (far, _) = listener.accept().await.expect("accept");
        (near, far)
    }

    #[tokio::test]
    async fn a_read_makes_its_room_only_once_there_is_something_to_read() {
        use tokio::io::AsyncWriteExt as _;
        let (mut io, mut server) = socket_pair().await;
        let mut buf = BytesMut::new();
        let waited = tokio::time::timeout(
            Duration::from_millis(100),
            std::future::poll_fn(|cx| poll_fill_with(&mut io, &mut buf, SMALL_READ, cx)),
        )
        .await;
        assert!(waited.is_err(), "nothing was sent, yet the read ended: {waited:?}");
        assert_eq!(buf.capacity(), 0, "a buffer was made for a read that has nothing to read");
        server.write_all(b"HTTP/1.1 200 OK\r\n").await.expect("write");
        let read = std::future::poll_fn(|cx| poll_fill_with(&mut io, &mut buf, SMALL_READ, cx)).await.expect("read");
        assert_eq!((read, &buf[..]), (17, &b"HTTP/1.1 200 OK\r\n"[..]));
        assert!(buf.capacity() >= SMALL_READ);
        // A server that closes with nothing sent: the end of stream, not a wait.
        let (mut io, server) = socket_pair().await;
        drop(server);
        let mut buf = BytesMut::new();
        let read = tokio::time::timeout(
            Duration::from_secs(5),
            std::future::poll_fn(|cx| poll_fill_with(&mut io, &mut buf, SMALL_READ, cx)),
        )
        .await
        .expect("a closed connection's read waited")
        .expect("read");
        assert_eq!(read, 0);
    }

    /// A server's body framed as `framing` whose read buffer (8 KiB) already holds
    /// `bytes`, over a connection the returned stream is the server's end of.
    async fn body_holding(framing: Framing, bytes: &[u8]) -> (ResponseBody, TcpStream) {
        let (io, server_end) = socket_pair().await;
        let server = Server::new(io.peer_addr().expect("address"), crate::upstream::ServerState::Healthy);
        let head = Head { framing, keep_alive: true, ..head("HTTP/1.1 200 OK\r\n\r\n") };
        let mut buf = BytesMut::with_capacity(SMALL_READ);
        buf.extend_from_slice(bytes);
        (ResponseBody::new(io, buf, head, server, None, Duration::from_secs(60)), server_end)
    }

    #[tokio::test]
    async fn a_small_piece_of_a_body_does_not_hold_the_read_buffer() {
        let (mut body, _server) = body_holding(Framing::Length(5), b"hello").await;
        let frame = std::future::poll_fn(|cx| body.poll_frame(cx)).await.expect("a frame").expect("data");
        let data = frame.into_data().expect("data");
        assert_eq!(&data[..], b"hello");
        // A slice of the buffer would share its allocation with the body's buffer.
        assert!(data.is_unique(), "the piece is a slice of the read buffer");
        assert!(body.is_end_stream());
        assert!(body.reusable().is_some(), "a body read whole leaves its connection reusable");

        // The same for a chunked body; a piece of 1 KiB or more is handed on as a slice.
        let big = "x".repeat(COPY_UNDER);
        let chunked = format!("5\r\nhello\r\n{:x}\r\n{big}\r\n0\r\n\r\n", big.len());
        let (mut body, _server) = body_holding(Framing::Chunked, chunked.as_bytes()).await;
        let mut next = async || std::future::poll_fn(|cx| body.poll_frame(cx)).await;
        let small = next().await.expect("a frame").expect("data").into_data().expect("data");
        assert_eq!(&small[..], b"hello");
        assert!(small.is_unique(), "a small chunk is a slice of the read buffer");
        let large = next().await.expect("a frame").expect("data").into_data().expect("data");
        assert_eq!(large.len(), COPY_UNDER);
        assert!(!large.is_unique(), "a large chunk was copied");
        assert!(next().await.is_none());
    }

    fn parse(raw: &str, method: Method) -> io::Result<Option<Head>> {
        parse_head(&mut BytesMut::from(raw), &method)
    }

    fn head(raw: &str) -> Head {
        parse(raw, Method::GET).expect("valid").expect("complete")
    }

    /// The names of a head's fields as the server wrote them, in order.
    fn names(h: &Head) -> Vec<&str> {
        h.fields.iter().map(|(n, _)| std::str::from_utf8(n).expect("a token")).collect()
    }

    #[test]
    fn request_head_carries_fields_and_its_own_framing() {
        let req = http::Request::post("/a/b?q=1")
            .header("host", "fhir.example")
            .header("content-length", "99")
            .header("transfer-encoding", "chunked")
            .header("x-two", "1")
            .header("x-two", "2")
            .body(())
            .expect("request");
        let (parts, ()) = req.into_parts();
        let fields = Fields::default();
        let mut out = Vec::new();
        encode_head(&RequestHead { parts: &parts, fields: &fields, added: &[] }, Framing::Length(5), &mut out);
        let text = String::from_utf8(out).expect("ascii");
        assert_eq!(
            text,
            "POST /a/b?q=1 HTTP/1.1\r\nhost: fhir.example\r\nx-two: 1\r\nx-two: 2\r\ncontent-length: 5\r\n\r\n"
        );
        // Added fields follow the request's own, before the framing.
        static X_ADDED: HeaderName = HeaderName::from_static("x-added");
        let mut out = Vec::new();
        let added = [(&X_ADDED, HeaderValue::from_static("yes"))];
        encode_head(&RequestHead { parts: &parts, fields: &fields, added: &added }, Framing::Chunked, &mut out);
        assert!(
            String::from_utf8_lossy(&out).ends_with("x-two: 2\r\nx-added: yes\r\ntransfer-encoding: chunked\r\n\r\n")
        );
    }

    #[test]
    fn lengths_and_chunk_sizes_are_written_in_their_bases() {
        for (n, text) in [(0u64, "0"), (9, "9"), (10, "10"), (1_048_576, "1048576"), (u64::MAX, "18446744073709551615")]
        {
            let mut out = Vec::new();
            push_length(n, &mut out);
            assert_eq!(out, format!("content-length: {text}\r\n").as_bytes());
        }
        for (n, text) in [(1usize, "1"), (15, "f"), (16, "10"), (16 * 1024, "4000")] {
            let mut out = Vec::new();
            encode_chunk_line(n, &mut out);
            assert_eq!(out, format!("{text}\r\n").as_bytes());
        }
    }

    #[test]
    fn chunks_encode_and_an_empty_one_is_skipped() {
        let mut out = Vec::new();
        encode_chunk(b"hello world, sixteen+", &mut out);
        encode_chunk(b"", &mut out);
        let mut t = HeaderMap::new();
        t.insert("x-sum", HeaderValue::from_static("7"));
        encode_last_chunk(Some(&t), &mut out);
        assert_eq!(out, b"15\r\nhello world, sixteen+\r\n0\r\nx-sum: 7\r\n\r\n");
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let h = head("HTTP/1.1 200 OK\r\nContent-Length: 12\r\nX-A: b\r\n\r\nbody");
        assert_eq!((h.framing, h.keep_alive, h.status.as_u16()), (Framing::Length(12), true, 200));
        assert_eq!(h.fields.values("x-a").collect::<Vec<_>>(), [b"b"]);
        assert_eq!(h.fields.length, Some(12));
        // Codings other than chunked are refused, wherever they are.
        for te in [
            "gzip, chunked",
            "chunked, gzip",
            "gzip",
            "chunked\r\nTransfer-Encoding: deflate",
            "chunked, chunked",
            "chunked\r\nTransfer-Encoding: chunked",
        ] {
            assert!(
                parse(&format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: {te}\r\n\r\n"), Method::GET).is_err(),
                "{te}"
            );
        }
        assert_eq!(head("HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n").framing, Framing::Chunked);
        let h = head("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n");
        assert_eq!((h.framing, h.keep_alive), (Framing::Chunked, false), "both fields: chunked, then close");
        assert_eq!((names(&h).len(), h.fields.length), (0, None), "the stale length must not reach the client");
        // Only visible ASCII spells chunked (a no-break space after it does not).
        assert!(parse("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\u{a0}\r\n\r\n", Method::GET).is_err());
        // Nor does it pad a length.
        assert!(parse("HTTP/1.1 200 OK\r\nContent-Length: 3\u{a0}\r\n\r\n", Method::GET).is_err());
        assert!(parse("HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n", Method::GET).is_err());
        let h = head("HTTP/1.1 200 OK\r\nContent-Length:\t3 ,3\r\n\r\n");
        assert_eq!((h.framing, h.fields.length), (Framing::Length(3), Some(3)));
        // A length the server calls hop-by-hop goes, and says nothing of the body's size.
        let h = parse("HTTP/1.1 200 OK\r\nConnection: Content-Length\r\nContent-Length: 3\r\n\r\n", Method::HEAD)
            .expect("ok")
            .expect("whole");
        assert_eq!((h.framing, names(&h).len(), h.fields.length), (Framing::Empty, 0, None));
        assert!(parse("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 3\r\n\r\n", Method::GET).is_err());
        // With no body, a coding frames nothing and is not judged.
        let h = parse("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", Method::HEAD)
            .expect("ok")
            .expect("whole");
        assert_eq!((h.framing, names(&h).len()), (Framing::Empty, 0));
        let h = head("HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!((h.framing, h.keep_alive), (Framing::Close, false));
        assert_eq!(head("HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n").framing, Framing::Empty);
        // A length that frames nothing is not judged.
        assert_eq!(head("HTTP/1.1 204 No Content\r\nContent-Length: abc\r\n\r\n").framing, Framing::Empty);
        let h = parse("HTTP/1.1 200 OK\r\nContent-Length: 4, 5\r\n\r\n", Method::HEAD).expect("ok").expect("whole");
        assert_eq!(h.framing, Framing::Empty);
        assert_eq!(head("HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n").framing, Framing::Empty);
        let h = parse("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", Method::HEAD).expect("ok").expect("whole");
        assert_eq!(h.framing, Framing::Empty);
        assert_eq!(
            head("HTTP/1.1 200 OK\r\nContent-Length: 4, 4\r\nContent-Length: 4\r\n\r\n").framing,
            Framing::Length(4)
        );
        for bad in
            ["Content-Length: 4\r\nContent-Length: 5", "Content-Length: -1", "Content-Length: 0x10", "Content-Length:"]
        {
            let raw = format!("HTTP/1.1 200 OK\r\n{bad}\r\n\r\n");
            assert!(parse(&raw, Method::GET).is_err(), "{bad} must be refused");
        }
    }

    #[test]
    fn hop_by_hop_fields_are_dropped_as_the_head_is_read() {
        let h = head(
            "HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Private\r\nKeep-Alive: timeout=5\r\nX-Private: 1\r\n\
             Proxy-Connection: close\r\nUpgrade: h2c\r\nTE: trailers\r\nX-Kept: yes\r\nContent-Length: 2\r\n\r\n",
        );
        // The length is framing, kept as a number (`Fields::length`), not as a field.
        assert_eq!((names(&h), h.fields.length), (vec!["X-Kept"], Some(2)));
        assert_eq!((h.framing, h.keep_alive), (Framing::Length(2), true), "Proxy-Connection is not Connection");
        // What Connection says still counts, whatever its case and however many lines.
        let h =
            head("HTTP/1.0 200 OK\r\nCONNECTION: X-A\r\nX-A: 1\r\nconnection: Keep-Alive\r\nContent-Length: 0\r\n\r\n");
        assert!(h.keep_alive);
        assert!(names(&h).is_empty(), "{:?}", h.fields);
        let h = head("HTTP/1.1 200 OK\r\nX-B: 1\r\nConnection: x-b,, CLOSE\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert!(names(&h).is_empty(), "{:?}", h.fields);
        assert_eq!((h.framing, h.keep_alive), (Framing::Chunked, false));
    }

    #[test]
    fn keep_alive_depends_on_version_and_connection() {
        assert!(!head("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n").keep_alive);
        assert!(!head("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n").keep_alive);
        let h = head("HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 0\r\n\r\n");
        assert!(h.keep_alive);
        assert_eq!(h.version, Version::HTTP_10);
        let h = head("HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert!(!h.keep_alive, "HTTP/1.0 with Transfer-Encoding is faulty framing: never reused");
        let h = head("HTTP/1.0 200 OK\r\nConnection: keep-alive, close\r\nContent-Length: 0\r\n\r\n");
        assert!(!h.keep_alive, "close wins over keep-alive");
    }

    #[test]
    fn a_partial_head_waits_and_a_bad_or_huge_one_fails() {
        // HTTP/1.2 is read as HTTP/1.1: a read that ends right after its version waits too.
        for full in ["HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", "HTTP/1.2 200 OK\r\nContent-Length: 0\r\n\r\n"] {
            for cut in 0..full.len() {
                assert!(
                    parse(&full[..cut], Method::GET).expect("no error on a prefix").is_none(),
                    "{full:?} cut at {cut}"
                );
            }
            assert!(parse(full, Method::GET).expect("a head").is_some());
        }
        let mut buf = BytesMut::from(&b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhiHTTP"[..]);
        assert!(parse_head(&mut buf, &Method::GET).expect("ok").is_some());
        assert_eq!(&buf[..], b"hiHTTP", "only the head is consumed");
        assert!(parse("HTTP/1.1 2OO OK\r\n\r\n", Method::GET).is_err());
        assert!(parse("garbage\r\n\r\n", Method::GET).is_err());
        let huge = format!("HTTP/1.1 200 OK\r\nX-Big: {}", "a".repeat(MAX_HEAD));
        assert!(parse(&huge, Method::GET).is_err());
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: 1\r\n")).collect();
        assert!(parse(&format!("HTTP/1.1 200 OK\r\n{many}\r\n"), Method::GET).is_err());
    }

    /// Feeds `raw` to a chunked decoder `step` bytes at a time; returns data and trailers.
    fn dechunk(raw: &[u8], step: usize) -> io::Result<(Vec<u8>, Option<HeaderMap>)> {
        let (mut decoder, mut buf, mut data, mut trailers) = (Chunked::Size, BytesMut::new(), Vec::new(), None);
        let mut fed = 0;
        loop {
            match decoder.decode(&mut buf)? {
                Some(Decoded::Data(d)) => data.extend_from_slice(&d),
                Some(Decoded::Trailers(t)) => trailers = Some(t),
                Some(Decoded::End) => return Ok((data, trailers)),
                None if fed == raw.len() => return Err(io::ErrorKind::UnexpectedEof.into()),
                None => {
                    let next = (fed + step).min(raw.len());
                    buf.extend_from_slice(&raw[fed..next]);
                    fed = next;
                }
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_whatever_the_read_boundaries() {
        let raw = b"5;ext=1\r\nhello\r\n1A\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-Sum: 31\r\n\r\n";
        for step in 1..=raw.len() {
            let (data, trailers) = dechunk(raw, step).expect("valid");
            assert_eq!(data, b"helloabcdefghijklmnopqrstuvwxyz", "step {step}");
            let trailers = trailers.expect("trailers");
            assert_eq!(trailers.get("x-sum").map(HeaderValue::as_bytes), Some(&b"31"[..]));
        }
        let (data, trailers) = dechunk(b"3\r\nabc\r\n0\r\n\r\n", 64).expect("valid");
        assert_eq!((data.as_slice(), trailers.is_none()), (&b"abc"[..], true));
    }

    #[test]
    fn bad_chunked_bodies_fail() {
        for bad in [&b"zz\r\n"[..], b"3\r\nabcX\r\n", b"11111111111111111\r\n", b"3 x\r\nabc\r\n", b"\r\n"] {
            assert!(dechunk(bad, 64).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        let long = vec![b'1'; MAX_CHUNK_LINE + 1];
        assert!(dechunk(&long, long.len()).is_err());
        let long_ext = format!("1;{}\r\na\r\n0\r\n\r\n", "x".repeat(MAX_CHUNK_LINE));
        assert!(dechunk(long_ext.as_bytes(), long_ext.len()).is_err(), "a whole line over the limit");
    }
}
