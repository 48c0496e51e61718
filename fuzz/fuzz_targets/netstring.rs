//! NetstringDecoder: arbitrary input and fragmentation. Properties: no
//! panic; never more than max_length bytes buffered; an error ends the
//! stream (nothing after it); fragmentation changes neither the strings
//! nor the error; re-encoding the strings decodes to the same strings.
#![no_main]

mod script;

use braid::protocols::netstring::{self, NetstringDecoder, NetstringError};
use libfuzzer_sys::fuzz_target;

fn decode(d: &mut NetstringDecoder, chunks: &[&[u8]]) -> Vec<Result<Vec<u8>, NetstringError>> {
    let mut out: Vec<Result<Vec<u8>, NetstringError>> = Vec::new();
    let max = d.max_length();
    for chunk in chunks {
        d.push(chunk);
        while let Some(event) = d.next_event() {
            assert!(!matches!(out.last(), Some(Err(_))), "an event after the error");
            if let Ok(s) = &event {
                assert!(s.len() <= max);
            }
            out.push(event.map(<[u8]>::to_vec));
        }
        assert!(d.buffered() <= d.max_length().max(1), "buffer over the bound");
    }
    if let Some(Err(e)) = out.last() {
        assert_eq!(d.broken(), Some(*e));
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((config, chunks)) = script::config_and_chunks(data) else { return };
    let max = if config == 255 { netstring::DEFAULT_MAX_LENGTH } else { usize::from(config) * 3 };
    let mut a = NetstringDecoder::new(max);
    let chunked = decode(&mut a, &chunks);
    let whole = chunks.concat();
    let mut b = NetstringDecoder::new(max);
    assert_eq!(decode(&mut b, &[&whole]), chunked, "fragmentation changed the result");
    let strings: Vec<Vec<u8>> = chunked.into_iter().filter_map(Result::ok).collect();
    let wire: Vec<u8> = strings.iter().flat_map(|s| netstring::encode(s)).collect();
    let mut c = NetstringDecoder::new(max);
    let again = decode(&mut c, &[&wire]);
    assert_eq!(again, strings.into_iter().map(Ok).collect::<Vec<_>>());
    assert_eq!(c.buffered(), 0);
});
