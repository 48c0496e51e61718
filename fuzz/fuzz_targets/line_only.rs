//! LineOnlyDecoder: arbitrary input and fragmentation. Properties: no
//! panic; lines never exceed max_length nor hold the delimiter; fewer than
//! max_length + delimiter bytes stay buffered; when nothing is over-long,
//! the chunked stream gives the same lines as the whole stream, and
//! re-encoding them gives the same lines again.
#![no_main]

mod script;

use std::cell::RefCell;
use std::rc::Rc;

use braid::protocols::delimiter::Delimiter;
use braid::protocols::line_only::{
    LineOnlyContext, LineOnlyDecoder, LineOnlyEvent, LineOnlyHandler, LineOnlyReceiver,
};
use braid::testing::StringTransport;
use braid::{Failure, Protocol};
use libfuzzer_sys::fuzz_target;

const DELIMITERS: [&[u8]; 3] = [b"\r\n", b"\n", b"END"];

#[derive(Debug, PartialEq)]
enum Ev {
    Line(Vec<u8>),
    TooLong,
}

fn decode(d: &mut LineOnlyDecoder, chunks: &[&[u8]], delim: &[u8], max: usize) -> Vec<Ev> {
    let mut out = Vec::new();
    for chunk in chunks {
        d.push(chunk);
        while let Some(event) = d.next_event() {
            match event {
                LineOnlyEvent::Line(l) => {
                    assert!(l.len() <= max);
                    assert!(!script::contains(l, delim));
                    out.push(Ev::Line(l.to_vec()));
                }
                LineOnlyEvent::TooLong(l) => {
                    assert!(l.len() > max);
                    out.push(Ev::TooLong);
                }
            }
        }
        assert!(d.unparsed().len() < max + delim.len(), "buffer over the bound");
    }
    out
}

/// Records what it is given and never closes.
struct Recorder(Rc<RefCell<Vec<Ev>>>);

impl LineOnlyHandler for Recorder {
    fn line_received(&mut self, _: &mut LineOnlyContext<'_>, line: &[u8]) -> Result<(), Failure> {
        self.0.borrow_mut().push(Ev::Line(line.to_vec()));
        Ok(())
    }

    fn line_length_exceeded(&mut self, _: &mut LineOnlyContext<'_>, _: &[u8]) {
        self.0.borrow_mut().push(Ev::TooLong);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((config, chunks)) = script::config_and_chunks(data) else { return };
    let delim = DELIMITERS[usize::from(config % 3)];
    let max = usize::from(config / 3) % 40 + 1;
    let new = || LineOnlyDecoder::new(Delimiter::new(delim).unwrap(), max);
    let mut a = new();
    let chunked = decode(&mut a, &chunks, delim, max);
    // The receiver parses in place while its buffer is empty; it must
    // agree with the decoder, which always buffers.
    let record = Rc::new(RefCell::new(Vec::new()));
    let mut p = LineOnlyReceiver::with_options(Recorder(record.clone()), Delimiter::new(delim).unwrap(), max);
    let tr = StringTransport::new();
    tr.connect(&mut p);
    for chunk in &chunks {
        p.data_received(chunk);
    }
    assert_eq!(*record.borrow(), chunked, "receiver and decoder disagree");
    assert_eq!(p.buffered(), Some(a.unparsed().len()));
    let whole: Vec<u8> = chunks.concat();
    let mut b = new();
    let at_once = decode(&mut b, &[&whole], delim, max);
    if chunked.contains(&Ev::TooLong) || at_once.contains(&Ev::TooLong) {
        return;
    }
    assert_eq!(chunked, at_once, "fragmentation changed the lines");
    assert_eq!(a.unparsed(), b.unparsed());
    let lines: Vec<Vec<u8>> = chunked.into_iter().map(|e| if let Ev::Line(l) = e { l } else { unreachable!() }).collect();
    let wire: Vec<u8> = lines.iter().flat_map(|l| [l.as_slice(), delim].concat()).collect();
    let mut c = new();
    let again = decode(&mut c, &[&wire], delim, max);
    assert_eq!(again, lines.into_iter().map(Ev::Line).collect::<Vec<_>>());
});
