//! What the fuzz targets share.

/// xorshift32: read sizes and split points drawn from a seed in the fuzz input, so that a
/// failing input replays the same pieces.
pub struct Rng(pub u32);

impl Rng {
    pub fn next_u32(&mut self) -> u32 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.0 = x;
        x
    }
}

/// The hop-by-hop fields RFC 9110 section 7.6.1 names (and those proxies know as such),
/// written out here rather than taken from swarmgate, as the oracle the targets check
/// passed-on fields against.
pub const HOP_BY_HOP: [&[u8]; 7] =
    [b"connection", b"te", b"transfer-encoding", b"upgrade", b"keep-alive", b"proxy-connection", b"proxy-authenticate"];
