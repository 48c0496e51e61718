//! Turns fuzz input into a configuration byte and a list of chunks, so
#![allow(dead_code)] // each target uses part of it
//! every target explores both the content and the fragmentation.

/// The first byte, and the rest cut into chunks: each chunk is a length
/// byte followed by that many bytes (the last one may be shorter).
pub fn config_and_chunks(data: &[u8]) -> Option<(u8, Vec<&[u8]>)> {
    let (&config, mut rest) = data.split_first()?;
    let mut chunks = Vec::new();
    while let Some((&n, tail)) = rest.split_first() {
        let n = usize::from(n).min(tail.len());
        let (chunk, tail) = tail.split_at(n);
        chunks.push(chunk);
        rest = tail;
    }
    Some((config, chunks))
}

/// True if `needle` occurs in `hay`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}
