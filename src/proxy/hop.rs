//! Hop-by-hop headers (RFC 9110 section 7.6.1): meaningful for one connection only, so
//! removed before a message is forwarded, together with every field the `Connection`
//! header names.

use hyper::header::{self, HeaderName};
use hyper::{HeaderMap, Version};

/// Fields that are hop-by-hop whatever `Connection` says (RFC 9110 7.6.1, plus the
/// non-standard `Proxy-Connection` and `Keep-Alive` still sent by old clients).
const ALWAYS_LEN: usize = 7;
static ALWAYS: [HeaderName; ALWAYS_LEN] = [
    header::CONNECTION,
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
];

/// The most fields a message's `Connection` may name. No message has more fields than
/// that (`h1::MAX_HEADERS`); each name costs a `HeaderName` and a removal from every
/// field of the message, so a head of nothing but names (a 64 KiB `Connection: a,a,...`
/// is 32,000 of them) would cost milliseconds to read. Such a message is malformed.
pub const MAX_NAMED: usize = 100;

/// Why a message is refused: its `Connection` names more than [`MAX_NAMED`] fields.
pub const TOO_MANY_NAMED: &str = "Connection names too many fields";

/// Removes hop-by-hop fields. Returns whether the client asked for trailers
/// (`TE: trailers`), which the upstream request then carries again (RFC 9110 10.1.4),
/// or [`TOO_MANY_NAMED`] (the fields are then left as they were).
pub fn strip(headers: &mut HeaderMap) -> Result<bool, &'static str> {
    // One pass over the names first: a removal costs a hash lookup, and most messages
    // carry none of these fields or only `Connection`. Standard names compare as enums.
    let mut present = [false; ALWAYS_LEN];
    for name in headers.keys() {
        if let Some(i) = ALWAYS.iter().position(|h| h == name) {
            present[i] = true;
        }
    }
    let [connection, te, ..] = present;
    // Read before anything is removed: a client sending TE must also name it in
    // Connection (RFC 9110 section 10.1.4), which removes it below.
    let wants_trailers = te && headers.get_all(header::TE).iter().any(|v| has_token(v.as_bytes(), "trailers"));
    if connection {
        // Every Connection line counts: a message may carry the field more than once.
        let mut says = ConnectionSays::default();
        for value in headers.get_all(header::CONNECTION) {
            says.note(value.as_bytes());
        }
        if says.too_many {
            return Err(TOO_MANY_NAMED);
        }
        for name in says.named {
            headers.remove(name);
        }
    }
    for (name, _) in ALWAYS.iter().zip(present).filter(|(_, p)| *p) {
        headers.remove(name);
    }
    Ok(wants_trailers)
}

/// The codings a `Transfer-Encoding` value names, when every one is `chunked` (in visible
/// ASCII); `None` when any is another (gzip, say), which the gateway does not undo. Over
/// all of a message's fields more than one is chunked applied twice (RFC 9112 section
/// 6.1): either way the message cannot be passed on as it is.
pub fn chunked_codings(value: &[u8]) -> Option<usize> {
    let visible = value.iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b));
    let mut n = 0;
    for coding in value.split(|&b| b == b',') {
        if !visible || !coding.trim_ascii().eq_ignore_ascii_case(b"chunked") {
            return None;
        }
        n += 1;
    }
    Some(n)
}

/// Whether a field may travel in a trailer section (RFC 9110 section 6.5.1): not one
/// that frames, routes, authenticates, controls or conditions the request or describes
/// the content, which are acted on before the content arrives (a server merging
/// trailers into the head would act on them anyway); not a hop-by-hop one; and not one
/// the gateway writes for the server (`X-Forwarded-*`, `Forwarded`, `X-Request-Id`, or a
/// look-alike of them), which a client could otherwise add after the head.
pub fn may_be_trailer(name: &HeaderName) -> bool {
    let forbidden = matches!(
        *name,
        header::AUTHORIZATION
            | header::CACHE_CONTROL
            | header::CONTENT_ENCODING
            | header::CONTENT_LENGTH
            | header::CONTENT_RANGE
            | header::CONTENT_TYPE
            | header::COOKIE
            | header::EXPECT
            | header::HOST
            | header::IF_MATCH
            | header::IF_MODIFIED_SINCE
            | header::IF_NONE_MATCH
            | header::IF_RANGE
            | header::IF_UNMODIFIED_SINCE
            | header::MAX_FORWARDS
            | header::PRAGMA
            | header::PROXY_AUTHORIZATION
            | header::RANGE
            | header::SET_COOKIE
            | header::TRAILER
            | header::WWW_AUTHENTICATE
    );
    let bytes = name.as_str().as_bytes();
    !forbidden
        && fixed(bytes).is_none()
        && !super::forwarded::is_forwarding(bytes)
        && !super::forwarded::is_lookalike(bytes)
}

/// Which of [`ALWAYS`] a field is, told from its name as read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fixed {
    Connection,
    Te,
    TransferEncoding,
    Upgrade,
    /// `Keep-Alive`, `Proxy-Connection`, `Proxy-Authenticate`: nothing in them matters here.
    Other,
}

/// Whether a field name (as read, any case) is one of [`ALWAYS`], and which: compared
/// bytewise, so that a head being read can drop these fields before a `HeaderName` is
/// made for them.
pub fn fixed(name: &[u8]) -> Option<Fixed> {
    let candidates: &[(&[u8], Fixed)] = match name.len() {
        2 => &[(b"te", Fixed::Te)],
        7 => &[(b"upgrade", Fixed::Upgrade)],
        10 => &[(b"connection", Fixed::Connection), (b"keep-alive", Fixed::Other)],
        16 => &[(b"proxy-connection", Fixed::Other)],
        17 => &[(b"transfer-encoding", Fixed::TransferEncoding)],
        18 => &[(b"proxy-authenticate", Fixed::Other)],
        _ => return None,
    };
    candidates.iter().find(|(c, _)| name.eq_ignore_ascii_case(c)).map(|&(_, which)| which)
}

/// What a message's `Connection` fields say, read line by line.
#[derive(Debug, Default)]
pub struct ConnectionSays {
    pub close: bool,
    pub keep_alive: bool,
    /// The other fields it names, hop-by-hop too (`upgrade` aside: it names the field
    /// already dropped with the rest of [`ALWAYS`]). Rare: usually left empty, unallocated.
    pub named: Vec<HeaderName>,
    /// It names more than [`MAX_NAMED`] fields (those past it are not kept): the message
    /// is to be refused.
    pub too_many: bool,
}

impl ConnectionSays {
    /// Reads one `Connection` value (case-insensitive tokens, optional whitespace).
    pub fn note(&mut self, value: &[u8]) {
        for token in value.split(|&b| b == b',').map(<[u8]>::trim_ascii).filter(|t| !t.is_empty()) {
            if token.eq_ignore_ascii_case(b"close") {
                self.close = true;
            } else if token.eq_ignore_ascii_case(b"keep-alive") {
                self.keep_alive = true;
            } else if !token.eq_ignore_ascii_case(b"upgrade") {
                if self.named.len() == MAX_NAMED {
                    self.too_many = true;
                    return;
                }
                self.named.extend(HeaderName::from_bytes(token).ok());
            }
        }
    }
}

/// Whether a comma-separated field value holds `token` (case-insensitive; optional
/// whitespace around each element). Bytewise: asked of `Connection` on every message.
pub fn has_token(value: &[u8], token: &str) -> bool {
    value.split(|&b| b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// Whether `Connection` contains `token` (case-insensitive).
pub fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers.get_all(header::CONNECTION).iter().any(|v| has_token(v.as_bytes(), token))
}

/// Whether a message of `version` leaves its connection open, given whether its
/// `Connection` field says `close` and (asked only for HTTP/1.0) `keep-alive` (RFC 9112
/// section 9.3: HTTP/1.1 persists unless closed, HTTP/1.0 only when asked; `close` wins).
pub fn persistent(version: Version, close: bool, keep_alive: impl FnOnce() -> bool) -> bool {
    !close && (version != Version::HTTP_10 || keep_alive())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    #[test]
    fn tokens_are_found_in_lists_whatever_their_case_and_whitespace() {
        assert!(has_token(b"close", "close"));
        assert!(has_token(b"Keep-Alive, CLOSE", "close"));
        assert!(has_token(b" upgrade ,\tclose\t", "close"));
        assert!(has_token(b"a,,close,", "close"));
        assert!(!has_token(b"closed, xclose, clo se", "close"));
        assert!(!has_token(b"", "close"));
        // An element of other bytes does not hide the token next to it.
        assert!(has_token(b"\xff, close", "close"));
    }

    #[test]
    fn raw_names_are_told_hop_by_hop_as_the_list_says() {
        for name in &ALWAYS {
            let which = fixed(name.as_str().as_bytes());
            assert!(which.is_some(), "{name}");
            assert_eq!(fixed(name.as_str().to_ascii_uppercase().as_bytes()), which, "{name}");
        }
        assert_eq!(fixed(b"Connection"), Some(Fixed::Connection));
        assert_eq!(fixed(b"TE"), Some(Fixed::Te));
        assert_eq!(fixed(b"transfer-Encoding"), Some(Fixed::TransferEncoding));
        assert_eq!(fixed(b"UPGRADE"), Some(Fixed::Upgrade));
        assert_eq!(fixed(b"Keep-Alive"), Some(Fixed::Other));
        for name in ["t", "tee", "content-length", "connectionx", "keep-alivf", "x-connection", "trailer", ""] {
            assert_eq!(fixed(name.as_bytes()), None, "{name}");
        }
    }

    #[test]
    fn removes_fixed_and_named_fields() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, X-Secret, close"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("gzip, trailers"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        h.insert("x-kept", HeaderValue::from_static("yes"));
        assert_eq!(strip(&mut h), Ok(true));
        let left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(left, vec!["x-kept"]);
    }

    #[test]
    fn te_named_in_connection_still_asks_for_trailers_and_every_line_counts() {
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, HeaderValue::from_static("TE"));
        h.append(header::CONNECTION, HeaderValue::from_static("x-second"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-second", HeaderValue::from_static("2"));
        assert_eq!(strip(&mut h), Ok(true), "a compliant client names TE in Connection");
        assert!(h.is_empty(), "{h:?}");
    }

    #[test]
    fn a_connection_naming_more_fields_than_a_message_has_is_refused() {
        let names = |n: usize| (0..n).map(|i| format!("x-{i}")).collect::<Vec<_>>().join(", ");
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_str(&names(MAX_NAMED)).unwrap());
        h.insert("x-0", HeaderValue::from_static("0"));
        h.insert("x-kept", HeaderValue::from_static("yes"));
        assert_eq!(strip(&mut h), Ok(false));
        assert_eq!(h.keys().map(HeaderName::as_str).collect::<Vec<_>>(), ["x-kept"]);
        // One more, over two lines; the same name over and over counts each time.
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, HeaderValue::from_str(&names(MAX_NAMED)).unwrap());
        h.append(header::CONNECTION, HeaderValue::from_static("close, x-last, keep-alive"));
        assert_eq!(strip(&mut h), Err(TOO_MANY_NAMED));
        let mut says = ConnectionSays::default();
        says.note(vec!["a"; 32_000].join(",").as_bytes());
        assert!(says.too_many && says.named.len() == MAX_NAMED);
    }
}
