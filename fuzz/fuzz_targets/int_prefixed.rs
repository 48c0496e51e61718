//! PrefixedDecoder for 1-, 2- and 4-byte prefixes: arbitrary input and
//! fragmentation. Properties: no panic; never more than max_length (or one
//! prefix) buffered; an over-long length ends the stream; fragmentation
//! changes nothing; re-encoding the strings decodes to the same strings,
//! and a string too long for the prefix is refused.
#![no_main]

mod script;

use braid::protocols::prefixed::{PrefixWidth, PrefixedDecoder, PrefixedEvent};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, PartialEq)]
enum Ev {
    Str(Vec<u8>),
    Exceeded(usize),
}

fn decode(d: &mut PrefixedDecoder, chunks: &[&[u8]]) -> Vec<Ev> {
    let mut out = Vec::new();
    let max = d.max_length();
    for chunk in chunks {
        d.push(chunk);
        while let Some(event) = d.next_event() {
            assert!(!matches!(out.last(), Some(Ev::Exceeded(_))), "an event after the limit");
            out.push(match event {
                PrefixedEvent::String(s) => {
                    assert!(s.len() <= max);
                    Ev::Str(s.to_vec())
                }
                PrefixedEvent::LengthLimitExceeded(n) => {
                    assert!(n > max);
                    Ev::Exceeded(n)
                }
            });
        }
        assert!(d.buffered() <= d.max_length().max(d.width().bytes()), "buffer over the bound");
    }
    if let Some(Ev::Exceeded(n)) = out.last() {
        assert_eq!(d.exceeded(), Some(*n));
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((config, chunks)) = script::config_and_chunks(data) else { return };
    let width = [PrefixWidth::One, PrefixWidth::Two, PrefixWidth::Four][usize::from(config % 3)];
    let max = usize::from(config / 3) * 5;
    let mut a = PrefixedDecoder::new(width, max);
    let chunked = decode(&mut a, &chunks);
    let whole = chunks.concat();
    let mut b = PrefixedDecoder::new(width, max);
    assert_eq!(decode(&mut b, &[&whole]), chunked, "fragmentation changed the result");
    let strings: Vec<Vec<u8>> =
        chunked.into_iter().filter_map(|e| if let Ev::Str(s) = e { Some(s) } else { None }).collect();
    let wire: Vec<u8> = strings.iter().flat_map(|s| width.frame(s).expect("a decoded string fits")).collect();
    let mut c = PrefixedDecoder::new(width, max);
    assert_eq!(decode(&mut c, &[&wire]), strings.into_iter().map(Ev::Str).collect::<Vec<_>>());
    assert_eq!(c.buffered(), 0);
    if width != PrefixWidth::Four {
        let too_long = vec![0; width.limit() + 1];
        assert!(width.frame(&too_long).is_err());
    }
});
