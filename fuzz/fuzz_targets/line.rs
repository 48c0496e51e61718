//! LineDecoder and LineReceiver: arbitrary input, fragmentation and mode
//! switches. Properties: no panic; lines never exceed max_length nor hold
//! the delimiter; in line mode fewer than max_length + delimiter bytes stay
//! buffered; nothing is lost (everything pushed comes back out as lines,
//! raw data, over-long remainders, cleared bytes or the unparsed tail);
//! re-encoding the lines and decoding them again gives the same lines.
#![no_main]

mod script;

use std::cell::RefCell;
use std::rc::Rc;

use braid::protocols::delimiter::Delimiter;
use braid::protocols::line::{LineContext, LineDecoder, LineEvent, LineHandler, LineMode, LineReceiver};
use braid::testing::StringTransport;
use braid::{Failure, Producer, Protocol};
use libfuzzer_sys::fuzz_target;

/// Delimiters without a border (no proper prefix that is also a suffix),
/// so joined lines split back exactly.
const DELIMITERS: [&[u8]; 3] = [b"\r\n", b"\n", b"END"];

fn decoder_properties(config: u8, script: &[u8]) {
    let delim = DELIMITERS[usize::from(config % 3)];
    let max = usize::from(config / 3) % 40;
    let mut d = LineDecoder::new(Delimiter::new(delim).unwrap(), max);
    let (mut pushed, mut accounted, mut lines) = (Vec::new(), Vec::new(), Vec::new());
    let mut rest = script;
    while let Some((&c, tail)) = rest.split_first() {
        rest = tail;
        match c & 7 {
            0..=4 => {
                let n = (usize::from(c >> 3) + 1).min(rest.len());
                let (chunk, tail) = rest.split_at(n);
                rest = tail;
                d.push(chunk);
                pushed.extend_from_slice(chunk);
            }
            5 => d.set_mode(LineMode::Raw),
            6 => d.set_mode(LineMode::Line),
            _ => accounted.extend(d.clear()),
        }
        while let Some(event) = d.next_event() {
            match event {
                LineEvent::Line(l) => {
                    assert!(l.len() <= max, "line of {} bytes over max {max}", l.len());
                    assert!(!script::contains(l, delim), "a line holds the delimiter");
                    accounted.extend_from_slice(l);
                    accounted.extend_from_slice(delim);
                    lines.push(l.to_vec());
                }
                LineEvent::Raw(r) => {
                    assert!(!r.is_empty());
                    accounted.extend_from_slice(r);
                }
                LineEvent::TooLong(r) => {
                    assert!(r.len() > max);
                    accounted.extend_from_slice(r);
                }
            }
        }
        match d.mode() {
            LineMode::Line => assert!(d.unparsed().len() < max + delim.len(), "buffer over the bound"),
            LineMode::Raw => assert!(d.unparsed().is_empty()),
        }
    }
    accounted.extend_from_slice(d.unparsed());
    assert_eq!(accounted, pushed, "bytes lost or invented");

    let wire: Vec<u8> = lines.iter().flat_map(|l| [l.as_slice(), delim].concat()).collect();
    let mut again = LineDecoder::new(Delimiter::new(delim).unwrap(), max);
    again.push(&wire);
    let mut relines = Vec::new();
    while let Some(event) = again.next_event() {
        match event {
            LineEvent::Line(l) => relines.push(l.to_vec()),
            other => panic!("re-decoding gave {other:?}"),
        }
    }
    assert_eq!(relines, lines, "re-encoded lines decode differently");
    assert!(again.unparsed().is_empty());
}

/// Switches modes, clears and pauses according to what it receives.
struct Switcher {
    max: usize,
    lines: Rc<RefCell<usize>>,
}

impl LineHandler for Switcher {
    fn line_received(&mut self, cx: &mut LineContext<'_>, line: &[u8]) -> Result<(), Failure> {
        assert!(line.len() <= self.max);
        *self.lines.borrow_mut() += 1;
        match line.first() {
            Some(b'r') => cx.set_raw_mode(),
            Some(b'c') => drop(cx.clear_line_buffer()),
            Some(b'p') => cx.pause_producing(),
            Some(b'e') => cx.set_line_mode(&line[1..]),
            Some(b'q') => cx.lose_connection(),
            _ => {}
        }
        Ok(())
    }

    fn raw_data_received(&mut self, cx: &mut LineContext<'_>, data: &[u8]) -> Result<(), Failure> {
        assert!(!data.is_empty());
        if let Some(i) = data.iter().position(|&b| b == b'l') {
            cx.set_line_mode(&data[i + 1..]);
        }
        Ok(())
    }

    fn line_length_exceeded(&mut self, _: &mut LineContext<'_>, remainder: &[u8]) {
        assert!(remainder.len() > self.max);
    }
}

fn receiver_properties(config: u8, chunks: &[&[u8]]) {
    let max = usize::from(config / 3) % 40;
    let lines = Rc::new(RefCell::new(0));
    let mut p = LineReceiver::with_options(
        Switcher { max, lines: lines.clone() },
        Delimiter::new(DELIMITERS[usize::from(config % 3)]).unwrap(),
        max,
    );
    let handle = p.handle();
    let tr = StringTransport::new();
    tr.connect(&mut p);
    for chunk in chunks {
        p.data_received(chunk);
        if chunk.first() == Some(&b'R') {
            handle.resume_producing();
        }
    }
    handle.resume_producing();
}

/// Records what it is given and never closes, so its record can be
/// compared with the bare decoder's events.
struct Recorder(Rc<RefCell<Vec<(u8, Vec<u8>)>>>);

impl LineHandler for Recorder {
    fn line_received(&mut self, _: &mut LineContext<'_>, line: &[u8]) -> Result<(), Failure> {
        self.0.borrow_mut().push((b'L', line.to_vec()));
        Ok(())
    }

    fn line_length_exceeded(&mut self, _: &mut LineContext<'_>, remainder: &[u8]) {
        self.0.borrow_mut().push((b'T', remainder.to_vec()));
    }
}

/// The receiver (which parses input in place while its buffer is empty)
/// and the decoder (which always buffers) agree on every event.
fn receiver_matches_decoder(config: u8, chunks: &[&[u8]]) {
    let delim = DELIMITERS[usize::from(config % 3)];
    let max = usize::from(config / 3) % 40;
    let record = Rc::new(RefCell::new(Vec::new()));
    let mut p = LineReceiver::with_options(Recorder(record.clone()), Delimiter::new(delim).unwrap(), max);
    let tr = StringTransport::new();
    tr.connect(&mut p);
    let mut d = LineDecoder::new(Delimiter::new(delim).unwrap(), max);
    let mut expect = Vec::new();
    for chunk in chunks {
        p.data_received(chunk);
        d.push(chunk);
        while let Some(event) = d.next_event() {
            expect.push(match event {
                LineEvent::Line(l) => (b'L', l.to_vec()),
                LineEvent::TooLong(r) => (b'T', r.to_vec()),
                LineEvent::Raw(_) => unreachable!("no raw mode here"),
            });
        }
        assert_eq!(p.buffered(), Some(d.unparsed().len()));
    }
    assert_eq!(*record.borrow(), expect, "receiver and decoder disagree");
}

fuzz_target!(|data: &[u8]| {
    let Some((&config, script)) = data.split_first() else { return };
    decoder_properties(config, script);
    if let Some((config, chunks)) = script::config_and_chunks(data) {
        receiver_properties(config, &chunks);
        receiver_matches_decoder(config, &chunks);
    }
});
