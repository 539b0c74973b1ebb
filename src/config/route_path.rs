//! A route's `path`: a prefix of an origin-form request path (RFC 9112 3.2.1), checked
//! and normalised once, when the config is read.
//!
//! The router compares request paths with prefixes byte for byte, as the client sent them
//! (no decoding) once their dot-segments are resolved, so a prefix is refused when no
//! request could match it as meant: it starts with `/` and holds only RFC 3986 (3.3) path
//! characters, percent-encodings in upper case (the form RFC 3986 2.1 has clients send;
//! `%c3` would never match a request's `%C3`), and no dot-segment (`.` or `..`, also as
//! `%2E`), which no resolved request path has.

/// The prefix `text` normalised: a trailing `/` is dropped (`/api/` is `/api`; `/` stays).
pub(super) fn normalize_path(text: &str) -> Result<String, String> {
    if !text.starts_with('/') {
        return Err(format!("{text:?} must start with /"));
    }
    let lower_hex = check_chars(text)?;
    if text.split('/').any(crate::route::is_dot_segment) {
        return Err(format!(
            "{text:?}: a dot-segment (\".\" or \"..\", also written %2E) cannot be part of a path prefix"
        ));
    }
    if let Some(escape) = lower_hex {
        return Err(format!(
            "{text:?}: write {escape} in upper case ({}): request paths are matched as sent, and \
             RFC 3986 has clients send upper-case hex",
            escape.to_ascii_uppercase()
        ));
    }
    let trimmed = text.trim_end_matches('/');
    Ok(if trimmed.is_empty() { "/".to_string() } else { trimmed.to_string() })
}

/// Refuses a character a path cannot hold as it is; returns the first percent-encoding
/// with lower-case hex, if any.
fn check_chars(text: &str) -> Result<Option<&str>, String> {
    let bytes = text.as_bytes();
    let mut lower_hex = None;
    for (i, c) in text.char_indices() {
        if c == '%' {
            let hex = bytes.get(i + 1..i + 3).filter(|h| h.iter().all(u8::is_ascii_hexdigit));
            let Some(hex) = hex else {
                return Err(format!("{text:?}: % must start a percent-encoding like %2F (a literal % is %25)"));
            };
            if lower_hex.is_none() && hex.iter().any(u8::is_ascii_lowercase) {
                lower_hex = Some(&text[i..i + 3]);
            }
        } else if !is_path_char(c) {
            let encoded: String = c.to_string().bytes().map(|b| format!("%{b:02X}")).collect();
            let why = match c {
                '?' | '#' => " (a route matches the path only, never a query or fragment)",
                _ => "",
            };
            return Err(format!("{text:?}: percent-encode {c:?} in a path prefix, as {encoded}{why}"));
        }
    }
    Ok(lower_hex)
}

/// RFC 3986 3.3 `pchar` and `/`, but `%` (checked with the two digits after it); and `|`,
/// `[`, `]`, `^`, which browsers send as they are (the WHATWG URL standard's path
/// percent-encode set leaves them), so a route must name them so to match.
fn is_path_char(c: char) -> bool {
    matches!(c, 'a'..='z' | 'A'..='Z' | '0'..='9' | '-' | '.' | '_' | '~' // unreserved
        | '!' | '$' | '&' | '\'' | '(' | ')' | '*' | '+' | ',' | ';' | '=' // sub-delims
        | ':' | '@' | '/'
        | '|' | '[' | ']' | '^')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_normalised() {
        for (text, prefix) in [
            ("/", "/"),
            ("//", "/"),
            ("/api/", "/api"),
            ("/api", "/api"),
            ("/caf%C3%A9/", "/caf%C3%A9"),
            ("/a-b._~!$&'()*+,;=:@/c", "/a-b._~!$&'()*+,;=:@/c"),
            ("/.well-known/x", "/.well-known/x"),
            ("/.../a..b/.x", "/.../a..b/.x"),
            ("/a|b/[c]^", "/a|b/[c]^"),
        ] {
            assert_eq!(normalize_path(text).as_deref(), Ok(prefix), "{text:?}");
        }
    }

    #[test]
    fn paths_that_cannot_match_as_meant_are_refused() {
        for (text, says) in [
            ("api", "must start with /"),
            ("/café", "percent-encode 'é' in a path prefix, as %C3%A9"),
            ("/a b", "percent-encode ' ' in a path prefix, as %20"),
            ("/a\u{1}", "percent-encode '\\u{1}' in a path prefix, as %01"),
            ("/a\"b", "percent-encode '\"'"),
            ("/a\\b", "percent-encode '\\\\'"),
            ("/a?b=1", "as %3F (a route matches the path only, never a query or fragment)"),
            ("/a#top", "as %23 (a route matches"),
            ("/a{b}", "percent-encode '{'"),
            ("/a`b", "percent-encode '`'"),
            ("/a%", "% must start a percent-encoding"),
            ("/a%4", "% must start a percent-encoding"),
            ("/a%G0", "% must start a percent-encoding"),
            ("/caf%c3%a9", "write %c3 in upper case (%C3): request paths are matched as sent"),
            ("/.", "a dot-segment"),
            ("/a/../admin", "a dot-segment"),
            ("/a/./", "a dot-segment"),
            ("/%2E%2E/x", "a dot-segment"),
            ("/%2e", "a dot-segment"),
            ("/.%2E", "a dot-segment"),
            ("/%2E.", "a dot-segment"),
        ] {
            match normalize_path(text) {
                Ok(p) => panic!("{text:?} was accepted as {p:?}"),
                Err(e) => assert!(e.contains(says), "{text:?}: {e}"),
            }
        }
    }
}
