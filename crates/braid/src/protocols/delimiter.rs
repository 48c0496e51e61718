//! Line delimiters and the search for them.
//!
//! A [`Delimiter`] is never empty, so a line parser can always make
//! progress; the search looks for the delimiter's first byte a machine
//! word at a time, then checks the rest, which is what keeps line parsing
//! fast without a dependency on a SIMD search crate.

use std::fmt;

/// The bytes that end a line: never empty. [`Delimiter::CRLF`] is the
/// default of every line receiver, as in Twisted.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Delimiter(Box<[u8]>);

impl Delimiter {
    /// `\r\n`, the line end of most Internet protocols.
    pub const CRLF: &'static [u8] = b"\r\n";

    /// A delimiter of these bytes, or `None` if `bytes` is empty (an empty
    /// delimiter would split between every pair of bytes, or never).
    pub fn new(bytes: &[u8]) -> Option<Delimiter> {
        if bytes.is_empty() {
            None
        } else {
            Some(Delimiter(bytes.into()))
        }
    }

    /// `\r\n`.
    pub fn crlf() -> Delimiter {
        Delimiter(Self::CRLF.into())
    }

    /// `\n` alone.
    pub fn lf() -> Delimiter {
        Delimiter(Box::new([b'\n']))
    }

    /// The delimiter's bytes (at least one).
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Its length in bytes (at least one).
    #[allow(clippy::len_without_is_empty)] // never empty by construction
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The offset of the first occurrence of the delimiter in `hay`.
    pub fn find_in(&self, hay: &[u8]) -> Option<usize> {
        let d = &*self.0;
        let (first, rest) = (d[0], &d[1..]);
        let mut from = 0;
        while let Some(i) = find_byte(&hay[from..], first) {
            let at = from + i;
            let tail = &hay[at + 1..];
            if tail.len() < rest.len() {
                return None;
            }
            // Delimiters are short: a byte loop beats a call to memcmp.
            if rest.iter().zip(tail).all(|(a, b)| a == b) {
                return Some(at);
            }
            from = at + 1;
        }
        None
    }
}

impl Default for Delimiter {
    fn default() -> Self {
        Delimiter::crlf()
    }
}

impl fmt::Debug for Delimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Delimiter({:?})", self.0.escape_ascii().to_string())
    }
}

/// The offset of the first `byte` in `hay`, sixteen bytes per step: a
/// word XORed with the byte repeated has a zero byte exactly where `hay`
/// holds `byte`, and the classic has-zero-byte test finds the lowest one
/// (its false positives only sit above a true zero byte).
fn find_byte(hay: &[u8], byte: u8) -> Option<usize> {
    const LO: u64 = u64::from_ne_bytes([0x01; 8]);
    const HI: u64 = u64::from_ne_bytes([0x80; 8]);
    let pattern = LO * u64::from(byte);
    let zeros = |chunk: &[u8]| {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let x = u64::from_le_bytes(word) ^ pattern;
        x.wrapping_sub(LO) & !x & HI
    };
    let mut chunks = hay.chunks_exact(16);
    let mut offset = 0;
    for chunk in &mut chunks {
        let (a, b) = (zeros(&chunk[..8]), zeros(&chunk[8..]));
        if a | b != 0 {
            let first = if a != 0 { a.trailing_zeros() } else { 64 + b.trailing_zeros() };
            return Some(offset + (first / 8) as usize);
        }
        offset += 16;
    }
    chunks.remainder().iter().position(|&b| b == byte).map(|i| offset + i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn find_byte_agrees_with_a_plain_scan() {
        let hay: Vec<u8> = (0..200u32).map(|i| (i * 7 % 251) as u8).collect();
        for start in 0..hay.len() {
            for byte in [0u8, 1, 7, 0x80, 0xff, 14, 250] {
                let expect = hay[start..].iter().position(|&b| b == byte);
                assert_eq!(find_byte(&hay[start..], byte), expect, "start {start} byte {byte}");
            }
        }
    }

    #[test]
    fn find_in_handles_partial_matches_and_the_end() {
        let d = Delimiter::crlf();
        assert_eq!(d.find_in(b"ab\r\r\ncd"), Some(3));
        assert_eq!(d.find_in(b"ab\r"), None);
        assert_eq!(d.find_in(b"\r\n"), Some(0));
        assert_eq!(d.find_in(b""), None);
        let long = Delimiter::new(b"-=-").unwrap();
        assert_eq!(long.find_in(b"--=--=-x"), Some(1));
        assert_eq!(long.find_in(b"-=x-=-"), Some(3));
    }

    proptest::proptest! {
        /// The word-at-a-time search finds what a naive search finds.
        #[test]
        fn find_in_agrees_with_a_naive_search(
            hay in proptest::collection::vec(proptest::sample::select(vec![b'\r', b'\n', b'a', 0x80, 0xff]), 0..100),
            delim in proptest::collection::vec(proptest::sample::select(vec![b'\r', b'\n', b'a']), 1..4),
        ) {
            let naive = hay.windows(delim.len()).position(|w| w == delim.as_slice());
            proptest::prop_assert_eq!(Delimiter::new(&delim).unwrap().find_in(&hay), naive);
        }
    }

    #[test]
    fn an_empty_delimiter_is_refused() {
        assert!(Delimiter::new(b"").is_none());
    }
}
