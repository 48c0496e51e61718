//! Property tests for the basic protocols: for every decoder and every
//! receiver, any split of a valid stream gives the same messages as the
//! stream in one piece, and they are the messages that were encoded.

use std::cell::RefCell;
use std::rc::Rc;

use braid::protocols::delimiter::Delimiter;
use braid::protocols::line::{LineContext, LineDecoder, LineEvent, LineHandler, LineReceiver};
use braid::protocols::line_only::{
    LineOnlyContext, LineOnlyDecoder, LineOnlyEvent, LineOnlyHandler, LineOnlyReceiver,
};
use braid::protocols::netstring::{self, NetstringDecoder, NetstringReceiver};
use braid::protocols::prefixed::{PrefixWidth, PrefixedDecoder, PrefixedEvent, PrefixedReceiver};
use braid::protocols::strings::{StringContext, StringHandler};
use braid::testing::StringTransport;
use braid::{Failure, Protocol};
use proptest::prelude::*;

/// Cuts `data` at the given points (taken modulo its length, sorted).
fn split(data: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
    let mut points: Vec<usize> =
        cuts.iter().map(|c| if data.is_empty() { 0 } else { c % data.len() }).collect();
    points.push(0);
    points.push(data.len());
    points.sort_unstable();
    points.windows(2).map(|w| data[w[0]..w[1]].to_vec()).collect()
}

/// Lines over a small alphabet heavy in delimiter bytes, none containing
/// the delimiter itself.
fn lines(delimiter: &'static [u8], max: usize) -> impl Strategy<Value = Vec<Vec<u8>>> {
    let line = proptest::collection::vec(prop::sample::select(vec![b'a', b'\r', b'\n', b'x', 0]), 0..max);
    proptest::collection::vec(line, 0..20).prop_map(move |ls| {
        ls.into_iter().filter(|l| !l.windows(delimiter.len()).any(|w| w == delimiter)).collect()
    })
}

fn join(lines: &[Vec<u8>], delimiter: &[u8]) -> Vec<u8> {
    lines.iter().flat_map(|l| [l.as_slice(), delimiter].concat()).collect()
}

fn decode_lines(chunks: &[Vec<u8>], delimiter: &[u8], max: usize) -> Vec<Vec<u8>> {
    let mut d = LineDecoder::new(Delimiter::new(delimiter).unwrap(), max);
    let mut out = Vec::new();
    for c in chunks {
        d.push(c);
        while let Some(e) = d.next_event() {
            match e {
                LineEvent::Line(l) => out.push(l.to_vec()),
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    assert!(d.unparsed().is_empty());
    out
}

fn decode_line_only(chunks: &[Vec<u8>], delimiter: &[u8], max: usize) -> Vec<Vec<u8>> {
    let mut d = LineOnlyDecoder::new(Delimiter::new(delimiter).unwrap(), max);
    let mut out = Vec::new();
    for c in chunks {
        d.push(c);
        while let Some(e) = d.next_event() {
            match e {
                LineOnlyEvent::Line(l) => out.push(l.to_vec()),
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    out
}

type Out = Rc<RefCell<Vec<Vec<u8>>>>;

/// Records lines; `len N` switches to raw mode for N bytes, recorded as
/// one message prefixed with `raw:`.
struct Lines {
    out: Out,
    raw_left: usize,
    raw: Vec<u8>,
}

impl LineHandler for Lines {
    fn line_received(&mut self, cx: &mut LineContext<'_>, l: &[u8]) -> Result<(), Failure> {
        self.out.borrow_mut().push(l.to_vec());
        if let Some(n) = l.strip_prefix(b"len ") {
            self.raw_left = std::str::from_utf8(n).unwrap().parse().unwrap();
            if self.raw_left > 0 {
                cx.set_raw_mode();
            } else {
                self.out.borrow_mut().push(b"raw:".to_vec());
            }
        }
        Ok(())
    }

    fn raw_data_received(&mut self, cx: &mut LineContext<'_>, data: &[u8]) -> Result<(), Failure> {
        let take = self.raw_left.min(data.len());
        self.raw.extend_from_slice(&data[..take]);
        self.raw_left -= take;
        if self.raw_left == 0 {
            let raw = [b"raw:".as_slice(), &std::mem::take(&mut self.raw)].concat();
            self.out.borrow_mut().push(raw);
            cx.set_line_mode(&data[take..]);
        }
        Ok(())
    }
}

struct OnlyLines(Out);

impl LineOnlyHandler for OnlyLines {
    fn line_received(&mut self, _: &mut LineOnlyContext<'_>, l: &[u8]) -> Result<(), Failure> {
        self.0.borrow_mut().push(l.to_vec());
        Ok(())
    }
}

struct Strings(Out);

impl StringHandler for Strings {
    fn string_received(&mut self, _: &mut StringContext<'_>, s: &[u8]) -> Result<(), Failure> {
        self.0.borrow_mut().push(s.to_vec());
        Ok(())
    }
}

/// Feeds the chunks to a protocol over a string transport; returns what
/// it recorded, after checking the connection stayed open.
fn through<P: Protocol>(mut p: P, out: &Out, chunks: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let tr = StringTransport::new();
    tr.connect(&mut p);
    for c in chunks {
        p.data_received(c);
    }
    assert!(!tr.disconnecting(), "a valid stream keeps the connection open");
    out.borrow().clone()
}

/// An item of the mixed line/raw stream.
#[derive(Clone, Debug)]
enum Item {
    Line(Vec<u8>),
    Raw(Vec<u8>),
}

fn items() -> impl Strategy<Value = Vec<Item>> {
    let bytes = proptest::collection::vec(prop::sample::select(vec![b'a', b'\r', b'\n', b'l']), 0..12);
    let item = prop_oneof![
        bytes.clone().prop_filter_map("no delimiter, no len prefix", |l| {
            (!l.windows(2).any(|w| w == b"\r\n") && !l.starts_with(b"len ")).then_some(Item::Line(l))
        }),
        bytes.prop_map(Item::Raw),
    ];
    proptest::collection::vec(item, 0..16)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// LineDecoder: any split gives the encoded lines, for a one- and a
    /// multi-byte delimiter.
    #[test]
    fn line_decoder_any_split(ls in lines(b"\r\n", 30), ls2 in lines(b"-=-", 30),
                              cuts in proptest::collection::vec(any::<usize>(), 0..30)) {
        let wire = join(&ls, b"\r\n");
        prop_assert_eq!(decode_lines(&split(&wire, &cuts), b"\r\n", 64), ls.clone());
        prop_assert_eq!(decode_lines(&[wire], b"\r\n", 64), ls);
        let wire = join(&ls2, b"-=-");
        prop_assert_eq!(decode_lines(&split(&wire, &cuts), b"-=-", 64), ls2);
    }

    /// LineReceiver with raw-mode switches: any split gives the same
    /// messages as one piece, and they are the items encoded.
    #[test]
    fn line_receiver_any_split(items in items(), cuts in proptest::collection::vec(any::<usize>(), 0..30)) {
        let mut wire = Vec::new();
        let mut expect = Vec::new();
        for item in &items {
            match item {
                Item::Line(l) => {
                    wire.extend_from_slice(l);
                    wire.extend_from_slice(b"\r\n");
                    expect.push(l.clone());
                }
                Item::Raw(r) => {
                    let header = format!("len {}", r.len()).into_bytes();
                    wire.extend_from_slice(&header);
                    wire.extend_from_slice(b"\r\n");
                    wire.extend_from_slice(r);
                    expect.push(header);
                    expect.push([b"raw:".as_slice(), r].concat());
                }
            }
        }
        let run = |chunks: &[Vec<u8>]| {
            let out = Out::default();
            through(LineReceiver::new(Lines { out: out.clone(), raw_left: 0, raw: Vec::new() }), &out, chunks)
        };
        prop_assert_eq!(run(&split(&wire, &cuts)), expect.clone());
        prop_assert_eq!(run(&[wire]), expect);
    }

    /// LineOnlyDecoder and LineOnlyReceiver: any split gives the encoded lines.
    #[test]
    fn line_only_any_split(ls in lines(b"\r\n", 30), cuts in proptest::collection::vec(any::<usize>(), 0..30)) {
        let wire = join(&ls, b"\r\n");
        let chunks = split(&wire, &cuts);
        prop_assert_eq!(decode_line_only(&chunks, b"\r\n", 64), ls.clone());
        let out = Out::default();
        prop_assert_eq!(through(LineOnlyReceiver::new(OnlyLines(out.clone())), &out, &chunks), ls.clone());
        let out = Out::default();
        prop_assert_eq!(through(LineOnlyReceiver::new(OnlyLines(out.clone())), &out, &[wire]), ls);
    }

    /// NetstringDecoder and NetstringReceiver: any split gives the encoded strings.
    #[test]
    fn netstring_any_split(ss in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 0..20),
                           cuts in proptest::collection::vec(any::<usize>(), 0..40)) {
        let wire: Vec<u8> = ss.iter().flat_map(|s| netstring::encode(s)).collect();
        let chunks = split(&wire, &cuts);
        let mut d = NetstringDecoder::default();
        let mut got = Vec::new();
        for c in &chunks {
            d.push(c);
            while let Some(e) = d.next_event() {
                got.push(e.expect("valid netstrings").to_vec());
            }
        }
        prop_assert_eq!(&got, &ss);
        prop_assert_eq!(d.buffered(), 0);
        let out = Out::default();
        prop_assert_eq!(through(NetstringReceiver::new(Strings(out.clone())), &out, &chunks), ss.clone());
        let out = Out::default();
        prop_assert_eq!(through(NetstringReceiver::new(Strings(out.clone())), &out, &[wire]), ss);
    }

    /// PrefixedDecoder and the Int8/16/32 receivers: any split gives the
    /// encoded strings.
    #[test]
    fn int_prefixed_any_split(ss in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..12),
                              cuts in proptest::collection::vec(any::<usize>(), 0..40)) {
        for width in [PrefixWidth::One, PrefixWidth::Two, PrefixWidth::Four] {
            let fitting: Vec<Vec<u8>> = ss.iter().filter(|s| s.len() <= width.limit()).cloned().collect();
            let wire: Vec<u8> = fitting.iter().flat_map(|s| width.frame(s).unwrap()).collect();
            let chunks = split(&wire, &cuts);
            let mut d = PrefixedDecoder::new(width, 99_999);
            let mut got = Vec::new();
            for c in &chunks {
                d.push(c);
                while let Some(e) = d.next_event() {
                    match e {
                        PrefixedEvent::String(s) => got.push(s.to_vec()),
                        other => prop_assert!(false, "unexpected {:?}", other),
                    }
                }
            }
            prop_assert_eq!(&got, &fitting);
            let out = Out::default();
            let recorded = match width {
                PrefixWidth::One => through(PrefixedReceiver::<_, 1>::new(Strings(out.clone())), &out, &chunks),
                PrefixWidth::Two => through(PrefixedReceiver::<_, 2>::new(Strings(out.clone())), &out, &chunks),
                PrefixWidth::Four => through(PrefixedReceiver::<_, 4>::new(Strings(out.clone())), &out, &chunks),
            };
            prop_assert_eq!(recorded, fitting);
        }
    }

    /// Arbitrary input never leaves more than max_length plus the
    /// delimiter buffered in a LineDecoder, and loses nothing: lines,
    /// over-long remainders and the unparsed tail add up to the input.
    #[test]
    fn line_decoder_bounded_and_lossless(data in proptest::collection::vec(prop::sample::select(vec![b'a', b'\r', b'\n']), 0..400),
                                         cuts in proptest::collection::vec(any::<usize>(), 0..30)) {
        let max = 16;
        let mut d = LineDecoder::new(Delimiter::crlf(), max);
        let mut seen = Vec::new();
        for c in split(&data, &cuts) {
            d.push(&c);
            while let Some(e) = d.next_event() {
                match e {
                    LineEvent::Line(l) => {
                        prop_assert!(l.len() <= max);
                        seen.extend_from_slice(l);
                        seen.extend_from_slice(b"\r\n");
                    }
                    LineEvent::TooLong(r) => seen.extend_from_slice(r),
                    LineEvent::Raw(_) => prop_assert!(false, "raw in line mode"),
                }
            }
            prop_assert!(d.unparsed().len() < max + 2);
        }
        seen.extend_from_slice(d.unparsed());
        prop_assert_eq!(seen, data);
    }
}
