//! Differential: a body written with `h1::encode_chunk` / `h1::encode_last_chunk` (with
//! trailers) and read back by `h1::Chunked::decode`, in pieces of fuzz-chosen sizes, is
//! the same data and the same trailers (values without the whitespace around them, which
//! a field line's OWS is), ending exactly at the end of what was written.
#![no_main]

use arbitrary::Arbitrary;
use bytes::BytesMut;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use swarmgate::proxy::h1::{self, Chunked, Decoded};
use swarmgate_fuzz::Rng;

#[derive(Arbitrary, Debug)]
struct Input {
    chunks: Vec<Vec<u8>>,
    /// Repeats a chunk to over 1 KiB (the decoder's copy/split threshold) or 4 KiB.
    big: Option<(u8, u16)>,
    trailers: Vec<(u8, Vec<u8>, Vec<u8>)>,
    /// An empty trailer map given rather than none.
    some_map: bool,
    seed: u16,
    max_read: u8,
}

const NAMES: [&str; 8] = ["x-sum", "grpc-status", "grpc-message", "etag", "server-timing", "x-a", "digest", "expires"];

fuzz_target!(|input: Input| {
    let mut chunks = input.chunks;
    if let Some((which, times)) = input.big
        && !chunks.is_empty()
    {
        let i = usize::from(which) % chunks.len();
        let c = chunks[i].repeat(usize::from(times % 64).max(1));
        chunks[i] = c.repeat((8192 / c.len().max(1)).clamp(1, 64));
    }
    let mut map = HeaderMap::new();
    for (sel, name, value) in &input.trailers {
        let name = if sel % 2 == 0 {
            HeaderName::from_static(NAMES[usize::from(sel / 2) % NAMES.len()])
        } else {
            match HeaderName::from_bytes(name) {
                Ok(n) => n,
                Err(_) => continue,
            }
        };
        let Ok(value) = HeaderValue::from_bytes(value) else { continue };
        // The decoder's documented limit: 100 trailer fields (`h1::MAX_HEADERS`).
        if map.len() < h1::MAX_HEADERS {
            map.append(name, value);
        }
    }
    let mut wire = Vec::new();
    for c in &chunks {
        h1::encode_chunk(c, &mut wire);
    }
    let given = if map.is_empty() && !input.some_map { None } else { Some(&map) };
    h1::encode_last_chunk(given, &mut wire);

    let mut rng = Rng(u32::from(input.seed) | 1);
    let max_read = 1 + usize::from(input.max_read);
    let mut dec = Chunked::default();
    let mut buf = BytesMut::new();
    let mut fed = 0;
    let mut data = Vec::new();
    let mut trailers: Option<HeaderMap> = None;
    loop {
        match dec.decode(&mut buf) {
            Ok(Some(Decoded::Data(d))) => {
                assert!(!d.is_empty());
                data.extend_from_slice(&d);
            }
            Ok(Some(Decoded::Trailers(t))) => {
                assert!(trailers.is_none());
                trailers = Some(t);
            }
            Ok(Some(Decoded::End)) => break,
            Ok(None) => {
                assert!(
                    fed < wire.len(),
                    "the decoder wants more after the whole body: {:?}",
                    String::from_utf8_lossy(&wire)
                );
                let n = (1 + rng.next_u32() as usize % max_read).min(wire.len() - fed);
                buf.extend_from_slice(&wire[fed..fed + n]);
                fed += n;
            }
            Err(e) => panic!("the decoder refused what encode wrote: {e}: {:?}", String::from_utf8_lossy(&wire)),
        }
    }
    assert_eq!(fed - buf.len(), wire.len(), "the body ended elsewhere than where it was written to end");
    assert_eq!(data, chunks.concat(), "other data came back");
    // Field values: OWS around them is not part of them (RFC 9110 section 5.5).
    let want: Vec<(String, Vec<u8>)> =
        map.iter().map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().trim_ascii().to_vec())).collect();
    let got: Vec<(String, Vec<u8>)> = trailers
        .map(|t| t.iter().map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec())).collect())
        .unwrap_or_default();
    assert_eq!(got, want, "other trailers came back");
});
