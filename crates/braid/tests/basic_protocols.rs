//! The basic protocols (Twisted's `protocols/basic.py`) through their
//! `Protocol` wrappers: in memory with `StringTransport`, and once per
//! receiver over real loopback sockets on every backend. Twisted
//! reference §4.16, items 4–9; test names follow its checklist.

mod common;

use std::cell::RefCell;
use std::rc::Rc;

use braid::protocols::delimiter::Delimiter;
use braid::protocols::line::{LineContext, LineHandler, LineMode, LineReceiver, DEFAULT_MAX_LENGTH};
use braid::protocols::line_only::{LineOnlyContext, LineOnlyHandler, LineOnlyReceiver};
use braid::protocols::netstring::{self, NetstringError, NetstringReceiver};
use braid::protocols::prefixed::{
    Int16StringReceiver, Int32StringReceiver, Int8StringReceiver, PrefixWidth, PrefixedReceiver,
};
use braid::protocols::receiver::Flow;
use braid::protocols::strings::{StringContext, StringHandler, StringTooLong};
use braid::testing::{ProducerState, StringTransport};
use braid::{Failure, Producer, Protocol};

/// What a handler saw, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Ev {
    Line(Vec<u8>),
    Raw(Vec<u8>),
    TooLong(Vec<u8>),
    Str(Vec<u8>),
    LimitExceeded(usize),
    Broken(NetstringError),
    Lost,
}

type Log = Rc<RefCell<Vec<Ev>>>;

fn log() -> Log {
    Rc::new(RefCell::new(Vec::new()))
}

fn line(s: &[u8]) -> Ev {
    Ev::Line(s.to_vec())
}

fn string(s: &[u8]) -> Ev {
    Ev::Str(s.to_vec())
}

fn chunks(data: &[u8], size: usize) -> impl Iterator<Item = &[u8]> {
    data.chunks(size.max(1))
}

// ------------------------------------------------------------ LineReceiver

type LineHook = Box<dyn FnMut(&mut LineContext<'_>, &[u8]) -> Result<(), Failure>>;

/// A line handler that records everything and runs optional hooks; with
/// `raw_lengths`, a line `len N` switches to raw mode for N bytes
/// (Twisted's `LineTester`).
#[derive(Default)]
struct Lines {
    log: Log,
    on_line: Option<LineHook>,
    on_raw: Option<LineHook>,
    keep_long: bool,
    raw_lengths: bool,
    raw_left: usize,
    raw_acc: Vec<u8>,
}

impl Lines {
    fn new(log: &Log) -> Self {
        Lines { log: log.clone(), ..Default::default() }
    }
}

impl LineHandler for Lines {
    fn line_received(&mut self, cx: &mut LineContext<'_>, l: &[u8]) -> Result<(), Failure> {
        self.log.borrow_mut().push(line(l));
        if self.raw_lengths {
            if let Some(n) = l.strip_prefix(b"len ") {
                self.raw_left = std::str::from_utf8(n).unwrap().parse().unwrap();
                cx.set_raw_mode();
            }
        }
        match &mut self.on_line {
            Some(hook) => hook(cx, l),
            None => Ok(()),
        }
    }

    fn raw_data_received(&mut self, cx: &mut LineContext<'_>, data: &[u8]) -> Result<(), Failure> {
        if let Some(hook) = &mut self.on_raw {
            self.log.borrow_mut().push(Ev::Raw(data.to_vec()));
            return hook(cx, data);
        }
        assert!(self.raw_lengths, "raw data without a raw hook");
        let take = self.raw_left.min(data.len());
        self.raw_acc.extend_from_slice(&data[..take]);
        self.raw_left -= take;
        if self.raw_left == 0 {
            self.log.borrow_mut().push(Ev::Raw(std::mem::take(&mut self.raw_acc)));
            cx.set_line_mode(&data[take..]);
        }
        Ok(())
    }

    fn line_length_exceeded(&mut self, cx: &mut LineContext<'_>, remainder: &[u8]) {
        self.log.borrow_mut().push(Ev::TooLong(remainder.to_vec()));
        if !self.keep_long {
            cx.lose_connection();
        }
    }

    fn connection_lost(&mut self, _reason: Failure) {
        self.log.borrow_mut().push(Ev::Lost);
    }
}

fn connected<P: Protocol>(p: &mut P) -> StringTransport {
    let tr = StringTransport::new();
    tr.connect(p);
    tr
}

const MIXED: &[u8] = b"len 10\r\n0123456789len 5\r\n1234\nline\r\n\r\nlen 3\r\nabclen 0\r\nend\r\n";

fn mixed_events() -> Vec<Ev> {
    vec![
        line(b"len 10"),
        Ev::Raw(b"0123456789".to_vec()),
        line(b"len 5"),
        Ev::Raw(b"1234\n".to_vec()),
        line(b"line"),
        line(b""),
        line(b"len 3"),
        Ev::Raw(b"abc".to_vec()),
        line(b"len 0"),
    ]
}

/// §4.16 item 4: lines come out right for every chunking, and raw and
/// line modes switch repeatedly on the same data (set_line_mode from
/// inside raw_data_received) without recursing.
#[test]
fn line_receiver_every_chunking_with_mode_switches() {
    for size in 1..=MIXED.len() {
        let log = log();
        let mut p = LineReceiver::new(Lines { raw_lengths: true, ..Lines::new(&log) });
        let tr = connected(&mut p);
        for c in chunks(MIXED, size) {
            p.data_received(c);
        }
        let mut expect = mixed_events();
        // `len 0` switches to raw mode with nothing to read: the rest is
        // raw data until a raw byte arrives, which returns to line mode.
        expect.push(Ev::Raw(Vec::new()));
        expect.push(line(b"end"));
        assert_eq!(*log.borrow(), expect, "chunk size {size}");
        assert!(!tr.disconnecting());
        assert_eq!(p.mode(), Some(LineMode::Line));
    }
}

/// §4.16 item 4 (basic buffering): lines split at the delimiter, empty
/// lines included, and an unfinished line waits.
#[test]
fn line_receiver_buffer() {
    let log = log();
    let mut p = LineReceiver::new(Lines::new(&log));
    let _tr = connected(&mut p);
    p.data_received(b"first line\r\nsecond\r\n\r\nthird line\r\nunfinished");
    assert_eq!(*log.borrow(), vec![line(b"first line"), line(b"second"), line(b""), line(b"third line")]);
    assert_eq!(p.buffered(), Some(b"unfinished".len()));
}

/// A custom delimiter splits there and only there.
#[test]
fn line_receiver_custom_delimiter() {
    let log = log();
    let mut p = LineReceiver::with_options(Lines::new(&log), Delimiter::lf(), 100);
    let _tr = connected(&mut p);
    p.data_received(b"a\r\nb\n\nc");
    assert_eq!(*log.borrow(), vec![line(b"a\r"), line(b"b"), line(b"")]);
}

/// §4.16 item 4: send_line writes the line and the delimiter.
#[test]
fn line_receiver_send_line() {
    let mut p = LineReceiver::new(Lines {
        on_line: Some(Box::new(|cx, l| {
            cx.send_line(&l.to_ascii_uppercase());
            Ok(())
        })),
        ..Lines::new(&log())
    });
    let tr = connected(&mut p);
    p.data_received(b"abc\r\ndef\r\n");
    assert_eq!(tr.value(), b"ABC\r\nDEF\r\n");
}

/// §4.16 item 4: pausing from inside line_received stops delivery (and
/// pauses the transport) until resumed; resume replays the buffer at once.
#[test]
fn pause_from_line_received_stops_delivery_until_resumed() {
    let log = log();
    let mut p = LineReceiver::new(Lines {
        on_line: Some(Box::new(|cx, l| {
            if l == b"pause" {
                cx.pause_producing();
            }
            Ok(())
        })),
        ..Lines::new(&log)
    });
    let tr = connected(&mut p);
    let handle = p.handle();
    p.data_received(b"one\r\npause\r\ntwo\r\nthree\r\n");
    assert_eq!(*log.borrow(), vec![line(b"one"), line(b"pause")]);
    assert_eq!(tr.producer_state(), ProducerState::Paused);
    p.data_received(b"four\r\n");
    assert_eq!(log.borrow().len(), 2, "nothing is delivered while paused");
    handle.resume_producing();
    assert_eq!(tr.producer_state(), ProducerState::Producing);
    assert_eq!(
        *log.borrow(),
        vec![line(b"one"), line(b"pause"), line(b"two"), line(b"three"), line(b"four")]
    );
}

/// §4.16 item 4: pausing from inside raw_data_received holds raw data too.
#[test]
fn pause_from_raw_data_received_stops_delivery_until_resumed() {
    let log = log();
    let mut p = LineReceiver::new(Lines {
        on_line: Some(Box::new(|cx, _| {
            cx.set_raw_mode();
            Ok(())
        })),
        on_raw: Some(Box::new(|cx, _| {
            cx.pause_producing();
            Ok(())
        })),
        ..Lines::new(&log)
    });
    let tr = connected(&mut p);
    p.data_received(b"go\r\nraw1");
    assert_eq!(*log.borrow(), vec![line(b"go"), Ev::Raw(b"raw1".to_vec())]);
    p.data_received(b"raw2");
    assert_eq!(log.borrow().len(), 2);
    assert_eq!(tr.producer_state(), ProducerState::Paused);
    p.handle().resume_producing();
    assert_eq!(log.borrow().last(), Some(&Ev::Raw(b"raw2".to_vec())));
}

/// §4.16 item 4: stop_producing halts delivery for good and stops the
/// transport; resume does not undo it.
#[test]
fn stop_producing_halts_delivery() {
    let log = log();
    let mut p = LineReceiver::new(Lines::new(&log));
    let tr = connected(&mut p);
    p.data_received(b"a\r\n");
    let h = p.handle();
    h.stop_producing();
    assert_eq!(tr.producer_state(), ProducerState::Stopped);
    p.data_received(b"b\r\n");
    h.resume_producing();
    assert_eq!(*log.borrow(), vec![line(b"a")]);
}

/// §4.16 item 4: clear_line_buffer from inside a callback empties the
/// buffer and returns it; nothing of it is parsed.
#[test]
fn clear_line_buffer_from_a_callback_returns_the_rest() {
    let log = log();
    let taken = Rc::new(RefCell::new(Vec::new()));
    let t = taken.clone();
    let mut p = LineReceiver::new(Lines {
        on_line: Some(Box::new(move |cx, l| {
            if l == b"clear" {
                *t.borrow_mut() = cx.clear_line_buffer();
            }
            Ok(())
        })),
        ..Lines::new(&log)
    });
    let _tr = connected(&mut p);
    p.data_received(b"a\r\nclear\r\nb\r\nc\r\npartial");
    assert_eq!(*taken.borrow(), b"b\r\nc\r\npartial");
    assert_eq!(*log.borrow(), vec![line(b"a"), line(b"clear")]);
    assert_eq!(p.buffered(), Some(0));
    p.data_received(b"d\r\n");
    assert_eq!(log.borrow().last(), Some(&line(b"d")));
}

/// §4.16 item 4: an over-long line drops the connection.
#[test]
fn over_long_line_drops_connection() {
    let mut p = LineReceiver::new(Lines::new(&log()));
    let tr = connected(&mut p);
    let mut data = vec![b'x'; DEFAULT_MAX_LENGTH + 1];
    data.extend_from_slice(b"\r\n");
    p.data_received(&data);
    assert!(tr.disconnecting());
}

/// §4.16 item 4: a line of exactly max_length whose delimiter is split
/// across chunks is a line, not an over-long one.
#[test]
fn max_length_line_with_split_delimiter_is_kept() {
    let log = log();
    let mut p = LineReceiver::new(Lines::new(&log));
    let tr = connected(&mut p);
    let mut first = vec![b'x'; DEFAULT_MAX_LENGTH];
    first.push(b'\r');
    p.data_received(&first);
    assert!(!tr.disconnecting());
    p.data_received(b"\n");
    assert!(!tr.disconnecting());
    assert_eq!(*log.borrow(), vec![line(&vec![b'x'; DEFAULT_MAX_LENGTH])]);
}

/// §4.16 item 4: an unfinished line of max_length that is only partly
/// into the delimiter does not drop the connection.
#[test]
fn unfinished_line_partly_into_delimiter_is_kept() {
    let mut p = LineReceiver::with_options(Lines::new(&log()), Delimiter::new(b"\r\n\r\n").unwrap(), 10);
    let tr = connected(&mut p);
    p.data_received(b"0123456789\r\n\r");
    assert!(!tr.disconnecting());
    p.data_received(b"x");
    assert!(tr.disconnecting(), "one byte more without the delimiter is over the limit");
}

/// §4.16 item 4: an error returned by raw_data_received is passed on: the
/// connection is aborted and nothing more is delivered.
#[test]
fn raw_data_received_error_is_passed_on() {
    let log = log();
    let mut p = LineReceiver::new(Lines {
        on_line: Some(Box::new(|cx, _| {
            cx.set_raw_mode();
            Ok(())
        })),
        on_raw: Some(Box::new(|cx, _| {
            cx.set_line_mode(b"after\r\n");
            Err(Failure::msg("bad raw data"))
        })),
        ..Lines::new(&log)
    });
    let tr = connected(&mut p);
    p.data_received(b"go\r\nraw");
    assert!(tr.aborted());
    assert_eq!(*log.borrow(), vec![line(b"go"), Ev::Raw(b"raw".to_vec())]);
}

/// An error returned by line_received aborts the connection too.
#[test]
fn line_received_error_is_passed_on() {
    let log = log();
    let mut p = LineReceiver::new(Lines {
        on_line: Some(Box::new(|_, l| if l == b"bad" { Err(Failure::msg("bad line")) } else { Ok(()) })),
        ..Lines::new(&log)
    });
    let tr = connected(&mut p);
    p.data_received(b"ok\r\nbad\r\nnever\r\n");
    assert!(tr.aborted());
    assert_eq!(*log.borrow(), vec![line(b"ok"), line(b"bad")]);
}

/// §4.16 item 4: the default raw_data_received fails (Twisted raises
/// NotImplementedError), which aborts the connection. The default
/// line_received does not exist: the compiler demands it.
#[test]
fn default_raw_data_received_fails() {
    struct OnlyLines;
    impl LineHandler for OnlyLines {
        fn line_received(&mut self, cx: &mut LineContext<'_>, _: &[u8]) -> Result<(), Failure> {
            cx.set_raw_mode();
            Ok(())
        }
    }
    let mut p = LineReceiver::new(OnlyLines);
    let tr = connected(&mut p);
    p.data_received(b"raw next\r\n");
    assert!(!tr.aborted());
    p.data_received(b"x");
    assert!(tr.aborted());
}

/// Parsing stops once the transport is closing: lines after the one that
/// called lose_connection are not delivered, and later input is dropped.
#[test]
fn parsing_stops_once_the_transport_is_closing() {
    let log = log();
    let mut p = LineReceiver::new(Lines {
        on_line: Some(Box::new(|cx, l| {
            if l == b"quit" {
                cx.lose_connection();
            }
            Ok(())
        })),
        ..Lines::new(&log)
    });
    let tr = connected(&mut p);
    p.data_received(b"a\r\nquit\r\nb\r\n");
    p.data_received(b"c\r\n");
    assert!(tr.disconnecting());
    assert_eq!(*log.borrow(), vec![line(b"a"), line(b"quit")]);
    assert_eq!(p.buffered(), Some(b"b\r\n".len()), "input after closing is not buffered");
}

/// Data fed during a callback (a synchronous loopback answering at once)
/// is only buffered, and parsed after the callback returns, in order.
#[test]
fn data_arriving_during_a_callback_is_only_buffered() {
    let log = log();
    let handle = Rc::new(RefCell::new(None::<braid::protocols::receiver::ReceiverHandle>));
    let (h, l2) = (handle.clone(), log.clone());
    let mut p = LineReceiver::new(Lines {
        on_line: Some(Box::new(move |_, l| {
            if l == b"ping" {
                let h = h.borrow().clone().unwrap();
                h.data_received(b"pong\r\n");
                // Not parsed yet: the callback is still running.
                assert_eq!(l2.borrow().last(), Some(&line(b"ping")));
            }
            Ok(())
        })),
        ..Lines::new(&log)
    });
    *handle.borrow_mut() = Some(p.handle());
    let _tr = connected(&mut p);
    p.data_received(b"ping\r\nafter\r\n");
    assert_eq!(*log.borrow(), vec![line(b"ping"), line(b"after"), line(b"pong")]);
}

/// A handle used inside a callback to pause is honoured once the callback
/// returns; the handle dies with the receiver.
#[test]
fn handle_pause_inside_a_callback_and_after_drop() {
    let log = log();
    let slot = Rc::new(RefCell::new(None::<braid::protocols::receiver::ReceiverHandle>));
    let s = slot.clone();
    let mut p = LineReceiver::new(Lines {
        on_line: Some(Box::new(move |cx, _| {
            s.borrow().as_ref().unwrap().pause_producing();
            assert_eq!(cx.flow(), Flow::Running, "recorded, applied after the callback");
            Ok(())
        })),
        ..Lines::new(&log)
    });
    *slot.borrow_mut() = Some(p.handle());
    let tr = connected(&mut p);
    p.data_received(b"a\r\nb\r\n");
    assert_eq!(*log.borrow(), vec![line(b"a")]);
    assert_eq!(tr.producer_state(), ProducerState::Paused);
    let h = p.handle();
    drop(p);
    slot.borrow_mut().take();
    assert!(!h.is_alive());
    h.resume_producing();
}

/// set_line_mode's extra is parsed after what is still buffered.
#[test]
fn set_line_mode_extra_goes_after_the_buffer() {
    let log = log();
    let mut p = LineReceiver::new(Lines {
        on_line: Some(Box::new(|cx, l| {
            if l == b"inject" {
                cx.set_line_mode(b"injected\r\n");
            }
            Ok(())
        })),
        ..Lines::new(&log)
    });
    let _tr = connected(&mut p);
    p.data_received(b"inject\r\nnext\r\n");
    assert_eq!(*log.borrow(), vec![line(b"inject"), line(b"next"), line(b"injected")]);
}

// ------------------------------------------------- line length exceeded

fn exceeded(max: usize, input: &[&[u8]]) -> (Vec<Ev>, bool) {
    let log = log();
    let mut p =
        LineReceiver::with_options(Lines { keep_long: true, ..Lines::new(&log) }, Delimiter::crlf(), max);
    let tr = connected(&mut p);
    for c in input {
        p.data_received(c);
    }
    let events = log.borrow().clone();
    (events, tr.disconnecting())
}

/// §4.16 item 5: an unterminated over-long chunk goes whole to
/// line_length_exceeded.
#[test]
fn line_length_exceeded_unterminated_chunk_goes_whole() {
    let data = vec![b'x'; 12];
    assert_eq!(exceeded(10, &[&data]).0, vec![Ev::TooLong(data)]);
}

/// §4.16 item 5: after a short line, everything following its delimiter
/// goes there.
#[test]
fn line_length_exceeded_after_a_short_line() {
    let mut data = b"short\r\n".to_vec();
    let long = [vec![b'x'; 11], b"\r\nmore\r\n".to_vec()].concat();
    data.extend_from_slice(&long);
    assert_eq!(exceeded(10, &[&data]).0, vec![line(b"short"), Ev::TooLong(long)]);
}

/// §4.16 item 5: input whose only delimiter is past max_length goes there whole.
#[test]
fn line_length_exceeded_one_delimiter_past_max() {
    let data = [vec![b'x'; 11], b"\r\n".to_vec()].concat();
    assert_eq!(exceeded(10, &[&data]).0, vec![Ev::TooLong(data)]);
}

/// §4.16 item 5: input whose delimiters are all past max_length goes there whole.
#[test]
fn line_length_exceeded_many_delimiters_past_max() {
    let data = [vec![b'x'; 11], b"\r\nab\r\ncd\r\n".to_vec()].concat();
    assert_eq!(exceeded(10, &[&data]).0, vec![Ev::TooLong(data)]);
}

/// §4.16 item 5: the default drops the connection for an over-long
/// finished line.
#[test]
fn line_length_exceeded_drops_connection_finished_line() {
    let mut p = LineReceiver::with_options(Lines::new(&log()), Delimiter::crlf(), 10);
    let tr = connected(&mut p);
    p.data_received(&[vec![b'x'; 11], b"\r\n".to_vec()].concat());
    assert!(tr.disconnecting());
}

/// §4.16 item 5: the default drops the connection for an over-long
/// unfinished remainder.
#[test]
fn line_length_exceeded_drops_connection_unfinished_remainder() {
    let mut p = LineReceiver::with_options(Lines::new(&log()), Delimiter::crlf(), 10);
    let tr = connected(&mut p);
    p.data_received(b"ok\r\n0123456789");
    assert!(!tr.disconnecting());
    p.data_received(b"ab");
    assert!(tr.disconnecting());
}

// --------------------------------------------------------- LineOnlyReceiver

#[derive(Default)]
struct OnlyLines {
    log: Log,
    echo: bool,
}

impl LineOnlyHandler for OnlyLines {
    fn line_received(&mut self, cx: &mut LineOnlyContext<'_>, l: &[u8]) -> Result<(), Failure> {
        self.log.borrow_mut().push(line(l));
        if self.echo {
            cx.send_line(l);
        }
        if l == b"quit" {
            cx.lose_connection();
        }
        Ok(())
    }

    fn line_length_exceeded(&mut self, cx: &mut LineOnlyContext<'_>, l: &[u8]) {
        self.log.borrow_mut().push(Ev::TooLong(l.to_vec()));
        cx.lose_connection();
    }
}

/// §4.16 item 6: correct buffering, in every chunking.
#[test]
fn line_only_receiver_buffer() {
    let data = b"first line\r\nsecond line\r\n\r\nthird\r\nunfinished";
    for size in 1..=data.len() {
        let log = log();
        let mut p = LineOnlyReceiver::new(OnlyLines { log: log.clone(), echo: true });
        let tr = connected(&mut p);
        for c in chunks(data, size) {
            p.data_received(c);
        }
        assert_eq!(
            *log.borrow(),
            vec![line(b"first line"), line(b"second line"), line(b""), line(b"third")],
            "chunk size {size}"
        );
        assert_eq!(tr.value(), b"first line\r\nsecond line\r\n\r\nthird\r\n");
        assert_eq!(p.buffered(), Some(b"unfinished".len()));
    }
}

/// §4.16 item 6: a line longer than max_length disconnects, and so does
/// an unterminated remainder of max_length plus the delimiter.
#[test]
fn line_only_receiver_line_too_long_disconnects() {
    let log = log();
    let mut p =
        LineOnlyReceiver::with_options(OnlyLines { log: log.clone(), echo: false }, Delimiter::crlf(), 5);
    let tr = connected(&mut p);
    p.data_received(b"12345\r\n123456\r\nnext\r\n");
    assert!(tr.disconnecting());
    assert_eq!(*log.borrow(), vec![line(b"12345"), Ev::TooLong(b"123456".to_vec())]);

    let mut p = LineOnlyReceiver::with_options(OnlyLines::default(), Delimiter::crlf(), 5);
    let tr = connected(&mut p);
    p.data_received(b"12345\r");
    assert!(!tr.disconnecting(), "exactly max_length with the delimiter split is fine");
    p.data_received(b"x");
    assert!(tr.disconnecting());
}

/// LineOnlyReceiver drops lines once the transport is disconnecting.
#[test]
fn line_only_receiver_drops_lines_after_disconnecting() {
    let log = log();
    let mut p = LineOnlyReceiver::new(OnlyLines { log: log.clone(), echo: false });
    let _tr = connected(&mut p);
    p.data_received(b"a\r\nquit\r\nb\r\n");
    assert_eq!(*log.borrow(), vec![line(b"a"), line(b"quit")]);
}

// --------------------------------------------------------- string receivers

#[derive(Default)]
struct Strings {
    log: Log,
    echo: bool,
    pause_each: bool,
}

impl StringHandler for Strings {
    fn string_received(&mut self, cx: &mut StringContext<'_>, s: &[u8]) -> Result<(), Failure> {
        self.log.borrow_mut().push(string(s));
        if self.echo {
            cx.send_string(s)?;
        }
        if self.pause_each {
            cx.pause_producing();
        }
        Ok(())
    }

    fn length_limit_exceeded(&mut self, cx: &mut StringContext<'_>, length: usize) {
        self.log.borrow_mut().push(Ev::LimitExceeded(length));
        cx.lose_connection();
    }

    fn peer_broken(&mut self, error: &NetstringError) {
        self.log.borrow_mut().push(Ev::Broken(*error));
    }

    fn connection_lost(&mut self, _: Failure) {
        self.log.borrow_mut().push(Ev::Lost);
    }
}

const NETSTRINGS: &[&[u8]] = &[b"", b"1", b"12", b"1234567890", b"3:abc,", b"x,y:z", b"\0\r\n"];

/// §4.16 item 7: strings in any chunking, down to one byte at a time with
/// the length split across chunks: empty, 1- and 2-character, nested and
/// back-to-back netstrings.
#[test]
fn netstring_receiver_any_chunking() {
    let wire: Vec<u8> = NETSTRINGS.iter().flat_map(|s| netstring::encode(s)).collect();
    for size in 1..=wire.len() {
        let log = log();
        let mut p = NetstringReceiver::new(Strings { log: log.clone(), ..Default::default() });
        let tr = connected(&mut p);
        for c in chunks(&wire, size) {
            p.data_received(c);
        }
        let expect: Vec<Ev> = NETSTRINGS.iter().map(|s| string(s)).collect();
        assert_eq!(*log.borrow(), expect, "chunk size {size}");
        assert!(!tr.disconnecting());
        assert_eq!(p.broken_peer(), None);
    }
}

/// §4.16 item 7: a netstring of exactly max_length is accepted.
#[test]
fn netstring_receiver_max_length_is_fine() {
    let log = log();
    let mut p = NetstringReceiver::with_max_length(Strings { log: log.clone(), ..Default::default() }, 5);
    let tr = connected(&mut p);
    p.data_received(b"5:abcde,");
    assert_eq!(*log.borrow(), vec![string(b"abcde")]);
    assert!(!tr.disconnecting());
}

/// Feeds `input` to a netstring receiver (max_length 99,999) in one
/// chunk, then one byte at a time, and checks it is refused with
/// `error`: nothing delivered, connection closing, peer marked broken.
fn assert_netstring_rejected(input: &[u8], error: NetstringError) {
    for size in [input.len(), 1] {
        let log = log();
        let mut p = NetstringReceiver::new(Strings { log: log.clone(), ..Default::default() });
        let tr = connected(&mut p);
        for c in chunks(input, size) {
            p.data_received(c);
        }
        assert!(tr.disconnecting(), "{input:?} closes the connection");
        assert_eq!(p.broken_peer(), Some(error), "{input:?} marks the peer broken");
        assert_eq!(*log.borrow(), vec![Ev::Broken(error)], "{input:?} delivers nothing");
        // Nothing after the error is parsed.
        p.data_received(b"3:abc,");
        assert_eq!(log.borrow().len(), 1);
    }
}

/// §4.16 item 7: more data than declared is refused.
#[test]
fn netstring_rejects_more_data_than_declared() {
    assert_netstring_rejected(b"3:abcd,", NetstringError::MissingComma { found: b'd' });
}

/// §4.16 item 7: more data than declared, for a declared length of 0.
#[test]
fn netstring_rejects_more_data_than_declared_length_zero() {
    assert_netstring_rejected(b"0:a,", NetstringError::MissingComma { found: b'a' });
}

/// §4.16 item 7: a missing number.
#[test]
fn netstring_rejects_missing_number() {
    assert_netstring_rejected(b":abc,", NetstringError::MissingLength { found: b':' });
}

/// §4.16 item 7: a missing colon.
#[test]
fn netstring_rejects_missing_colon() {
    assert_netstring_rejected(b"3abc,", NetstringError::MissingColon { found: b'a' });
}

/// §4.16 item 7: both number and colon missing.
#[test]
fn netstring_rejects_missing_number_and_colon() {
    assert_netstring_rejected(b"abc,", NetstringError::MissingLength { found: b'a' });
}

/// §4.16 item 7: data only.
#[test]
fn netstring_rejects_data_only() {
    assert_netstring_rejected(b"abc", NetstringError::MissingLength { found: b'a' });
}

/// §4.16 item 7: a length above max_length, by one and by more, without
/// waiting for the data.
#[test]
fn netstring_rejects_length_above_max() {
    let too_long = NetstringError::TooLong { max_length: netstring::DEFAULT_MAX_LENGTH };
    assert_netstring_rejected(b"100000:", too_long);
    assert_netstring_rejected(b"999999999999999999999999999:", too_long);
}

/// §4.16 item 7: illegal strings in general: a leading zero, a missing
/// comma, a sign.
#[test]
fn netstring_rejects_illegal_strings() {
    assert_netstring_rejected(b"01:a,", NetstringError::LeadingZero);
    assert_netstring_rejected(b"00:", NetstringError::LeadingZero);
    assert_netstring_rejected(b"1:ab", NetstringError::MissingComma { found: b'b' });
    assert_netstring_rejected(b"-1:a,", NetstringError::MissingLength { found: b'-' });
}

/// A good netstring before a bad one is delivered; the bad one breaks the peer.
#[test]
fn netstring_good_then_bad() {
    let log = log();
    let mut p = NetstringReceiver::new(Strings { log: log.clone(), ..Default::default() });
    let tr = connected(&mut p);
    p.data_received(b"2:ab,x");
    assert_eq!(*log.borrow(), vec![string(b"ab"), Ev::Broken(NetstringError::MissingLength { found: b'x' })]);
    assert!(tr.disconnecting());
}

/// send_string writes a netstring.
#[test]
fn netstring_send_string() {
    let mut p = NetstringReceiver::new(Strings { echo: true, ..Default::default() });
    let tr = connected(&mut p);
    p.data_received(b"5:hello,0:,");
    assert_eq!(tr.value(), b"5:hello,0:,");
}

fn prefixed_round_trip<const W: usize>() {
    let width = PrefixWidth::from_bytes(W).unwrap();
    let strings: Vec<Vec<u8>> = vec![b"".to_vec(), b"a".to_vec(), b"hello".to_vec(), vec![7; 255]];
    let wire: Vec<u8> = strings.iter().flat_map(|s| width.frame(s).unwrap()).collect();
    for size in [1, 2, 3, 7, wire.len()] {
        let log = log();
        let mut p =
            PrefixedReceiver::<_, W>::new(Strings { log: log.clone(), echo: true, ..Default::default() });
        let tr = connected(&mut p);
        for c in chunks(&wire, size) {
            p.data_received(c);
        }
        assert_eq!(
            *log.borrow(),
            strings.iter().map(|s| string(s)).collect::<Vec<_>>(),
            "width {W} size {size}"
        );
        assert_eq!(tr.value(), wire, "send_string frames the same way");
    }
}

/// §4.16 item 8: send/receive round trip, for each width.
#[test]
fn int_string_receivers_round_trip() {
    prefixed_round_trip::<1>();
    prefixed_round_trip::<2>();
    prefixed_round_trip::<4>();
}

/// §4.16 item 8: a partial message delivers nothing.
#[test]
fn int_string_receivers_partial_delivers_nothing() {
    let log = log();
    let mut p = Int32StringReceiver::new(Strings { log: log.clone(), ..Default::default() });
    let _tr = connected(&mut p);
    p.data_received(&[0, 0, 0, 5, b'a', b'b']);
    p.data_received(b"cd");
    assert!(log.borrow().is_empty());
    assert_eq!(p.buffered(), Some(4));
    p.data_received(b"e");
    assert_eq!(*log.borrow(), vec![string(b"abcde")]);
}

/// §4.16 item 8: a prefix over max_length calls length_limit_exceeded
/// with the length, and the string is never delivered, even when it all
/// arrived in the same chunk.
#[test]
fn int_string_receivers_length_limit_exceeded() {
    let log = log();
    let mut p = Int16StringReceiver::with_max_length(Strings { log: log.clone(), ..Default::default() }, 4);
    let tr = connected(&mut p);
    let mut data = PrefixWidth::Two.frame(b"ok").unwrap();
    data.extend(PrefixWidth::Two.frame(b"12345").unwrap());
    data.extend(PrefixWidth::Two.frame(b"no").unwrap());
    p.data_received(&data);
    assert_eq!(*log.borrow(), vec![string(b"ok"), Ev::LimitExceeded(5)]);
    assert!(tr.disconnecting());
    assert_eq!(p.length_exceeded(), Some(5));
}

/// §4.16 item 8: the wire format is a big-endian length prefix.
#[test]
fn int_string_receivers_wire_format_is_big_endian() {
    let mut p = Int32StringReceiver::new(Strings { echo: true, ..Default::default() });
    let tr = connected(&mut p);
    let payload = vec![b'z'; 0x0102];
    p.data_received(&[&[0u8, 0, 1, 2][..], &payload].concat());
    assert_eq!(&tr.value()[..4], &[0, 0, 1, 2]);
    let mut p = Int16StringReceiver::new(Strings { echo: true, ..Default::default() });
    let tr = connected(&mut p);
    p.data_received(&[&[1u8, 2][..], &payload].concat());
    assert_eq!(&tr.value()[..2], &[1, 2]);
    let mut p = Int8StringReceiver::new(Strings { echo: true, ..Default::default() });
    let tr = connected(&mut p);
    p.data_received(b"\x03abc");
    assert_eq!(tr.value(), b"\x03abc");
}

/// §4.16 item 8: sending a string too long for the prefix is refused with
/// StringTooLong and nothing is written (16- and 8-bit).
#[test]
fn int_string_receivers_send_too_long_is_refused() {
    struct Sender(Rc<RefCell<Vec<Result<(), StringTooLong>>>>, usize);
    impl StringHandler for Sender {
        fn connection_made(&mut self, cx: &mut StringContext<'_>) {
            self.0.borrow_mut().push(cx.send_string(&vec![b'a'; self.1]));
            self.0.borrow_mut().push(cx.send_string(&vec![b'b'; self.1 + 1]));
        }
        fn string_received(&mut self, _: &mut StringContext<'_>, _: &[u8]) -> Result<(), Failure> {
            Ok(())
        }
    }
    let results = Rc::new(RefCell::new(Vec::new()));
    let mut p = Int8StringReceiver::new(Sender(results.clone(), 255));
    let tr = connected(&mut p);
    assert_eq!(*results.borrow(), vec![Ok(()), Err(StringTooLong { len: 256, limit: 255 })]);
    assert_eq!(tr.value().len(), 256, "only the string that fits was sent");

    results.borrow_mut().clear();
    let mut p = Int16StringReceiver::new(Sender(results.clone(), 65535));
    let tr = connected(&mut p);
    assert_eq!(*results.borrow(), vec![Ok(()), Err(StringTooLong { len: 65536, limit: 65535 })]);
    assert_eq!(tr.value().len(), 65537);
    let msg = StringTooLong { len: 65536, limit: 65535 }.to_string();
    assert!(msg.contains("65536") && msg.contains("65535"), "{msg}");
}

/// IntN receivers are pauseable: a pause from string_received holds the
/// rest until resumed.
#[test]
fn int_string_receivers_pauseable() {
    let log = log();
    let mut p = Int8StringReceiver::new(Strings { log: log.clone(), pause_each: true, ..Default::default() });
    let tr = connected(&mut p);
    p.data_received(b"\x01a\x01b\x01c");
    assert_eq!(*log.borrow(), vec![string(b"a")]);
    assert_eq!(tr.producer_state(), ProducerState::Paused);
    p.handle().resume_producing();
    assert_eq!(*log.borrow(), vec![string(b"a"), string(b"b")]);
    p.handle().resume_producing();
    p.handle().resume_producing();
    assert_eq!(*log.borrow(), vec![string(b"a"), string(b"b"), string(b"c")]);
}

// --------------------------------------------------------------- producer

/// §4.16 item 9: a LineReceiver that pauses after each line delivers
/// nothing while paused, and the buffered lines right after resume.
#[test]
fn producer_pause_after_each_line() {
    let log = log();
    let mut p = LineReceiver::new(Lines {
        on_line: Some(Box::new(|cx, _| {
            cx.pause_producing();
            Ok(())
        })),
        ..Lines::new(&log)
    });
    let tr = connected(&mut p);
    let h = p.handle();
    p.data_received(b"one\r\ntwo\r\nthree\r\n");
    assert_eq!(*log.borrow(), vec![line(b"one")]);
    p.data_received(b"four\r\n");
    assert_eq!(log.borrow().len(), 1);
    for (i, expect) in [b"two".as_slice(), b"three", b"four"].iter().enumerate() {
        assert_eq!(tr.producer_state(), ProducerState::Paused);
        h.resume_producing();
        assert_eq!(log.borrow().len(), i + 2);
        assert_eq!(log.borrow().last(), Some(&line(expect)));
    }
}

/// connection_lost reaches the handler.
#[test]
fn connection_lost_reaches_the_handler() {
    let log = log();
    let mut p = LineReceiver::new(Lines::new(&log));
    let tr = connected(&mut p);
    tr.lose(&mut p, Failure::new(braid::Error::ConnectionDone));
    assert_eq!(*log.borrow(), vec![Ev::Lost]);
    let log2 = self::log();
    let mut p = NetstringReceiver::new(Strings { log: log2.clone(), ..Default::default() });
    let tr = connected(&mut p);
    tr.lose(&mut p, Failure::new(braid::Error::ConnectionDone));
    assert_eq!(*log2.borrow(), vec![Ev::Lost]);
}

// ------------------------------------------------------- real sockets

use braid::{Reactor, Transport};
use common::run_reactor;

/// Sends `payload` in small writes, collects the answer until `want`
/// bytes came (then closes) or the server closes; stops the reactor once
/// the connection is gone.
struct Client {
    payload: Vec<u8>,
    want: usize,
    got: Rc<RefCell<Vec<u8>>>,
    t: Option<Transport>,
    r: Reactor,
}

impl Protocol for Client {
    fn connection_made(&mut self, t: Transport) {
        for c in self.payload.chunks(1000) {
            t.write(c);
        }
        self.t = Some(t);
    }
    fn data_received(&mut self, data: &[u8]) {
        self.got.borrow_mut().extend_from_slice(data);
        if self.got.borrow().len() >= self.want {
            self.t.as_ref().unwrap().lose_connection();
        }
    }
    fn connection_lost(&mut self, _: Failure) {
        let _ = self.r.stop();
    }
}

/// Runs a server built by `server` on loopback, sends `payload`, and
/// returns what came back (at most `want` bytes are waited for).
fn exchange<P: Protocol + 'static>(
    r: &Reactor,
    server: impl FnMut() -> P + 'static,
    payload: Vec<u8>,
    want: usize,
) -> Vec<u8> {
    let port = r.listen_tcp("127.0.0.1:0", server, 50).unwrap();
    let got = Rc::new(RefCell::new(Vec::new()));
    let (g, rr) = (got.clone(), r.clone());
    r.connect_tcp(
        "127.0.0.1",
        port.local_addr().port(),
        move || Client { payload: payload.clone(), want, got: g.clone(), t: None, r: rr.clone() },
        Some(std::time::Duration::from_secs(10)),
        None,
    );
    run_reactor(r);
    let out = got.borrow().clone();
    out
}

/// Echoes lines uppercased, and raw data (after `len N`) as it is.
struct UpperEcho {
    raw_left: usize,
}

impl LineHandler for UpperEcho {
    fn line_received(&mut self, cx: &mut LineContext<'_>, l: &[u8]) -> Result<(), Failure> {
        cx.send_line(&l.to_ascii_uppercase());
        if let Some(n) = l.strip_prefix(b"len ") {
            self.raw_left = std::str::from_utf8(n)?.parse()?;
            cx.set_raw_mode();
        }
        Ok(())
    }
    fn raw_data_received(&mut self, cx: &mut LineContext<'_>, data: &[u8]) -> Result<(), Failure> {
        let take = self.raw_left.min(data.len());
        cx.transport().write(&data[..take]);
        self.raw_left -= take;
        if self.raw_left == 0 {
            cx.set_line_mode(&data[take..]);
        }
        Ok(())
    }
}

reactor_test! {
    /// A LineReceiver server over TCP: many lines and a large raw block,
    /// answered in order.
    fn line_receiver_over_tcp(r) {
        let raw: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let mut payload = Vec::new();
        let mut expect = Vec::new();
        for i in 0..2000 {
            payload.extend_from_slice(format!("line {i}\r\n").as_bytes());
            expect.extend_from_slice(format!("LINE {i}\r\n").as_bytes());
        }
        payload.extend_from_slice(format!("len {}\r\n", raw.len()).as_bytes());
        expect.extend_from_slice(format!("LEN {}\r\n", raw.len()).as_bytes());
        payload.extend_from_slice(&raw);
        expect.extend_from_slice(&raw);
        payload.extend_from_slice(b"last\r\n");
        expect.extend_from_slice(b"LAST\r\n");
        let want = expect.len();
        assert_eq!(exchange(&r, || LineReceiver::new(UpperEcho { raw_left: 0 }), payload, want), expect);
    }
}

reactor_test! {
    /// A LineReceiver that pauses after each line over TCP, resumed by a
    /// timer: every line still arrives, in order.
    fn line_receiver_pause_resume_over_tcp(r) {
        struct Slow(Reactor);
        impl LineHandler for Slow {
            fn line_received(&mut self, cx: &mut LineContext<'_>, l: &[u8]) -> Result<(), Failure> {
                cx.send_line(l);
                cx.pause_producing();
                let h = cx.handle();
                self.0.call_later(std::time::Duration::from_millis(1), move || h.resume_producing());
                Ok(())
            }
        }
        let payload: Vec<u8> = (0..50).flat_map(|i| format!("{i}\r\n").into_bytes()).collect();
        let want = payload.len();
        let rr = r.clone();
        assert_eq!(exchange(&r, move || LineReceiver::new(Slow(rr.clone())), payload.clone(), want), payload);
    }
}

struct OnlyEcho;

impl LineOnlyHandler for OnlyEcho {
    fn line_received(&mut self, cx: &mut LineOnlyContext<'_>, l: &[u8]) -> Result<(), Failure> {
        cx.send_line(l);
        Ok(())
    }
}

reactor_test! {
    /// A LineOnlyReceiver server over TCP echoes every line; an over-long
    /// one closes the connection.
    fn line_only_receiver_over_tcp(r) {
        let payload: Vec<u8> = (0..5000).flat_map(|i| format!("line number {i}\r\n").into_bytes()).collect();
        let want = payload.len();
        assert_eq!(exchange(&r, || LineOnlyReceiver::new(OnlyEcho), payload.clone(), want), payload);
    }
}

reactor_test! {
    /// An over-long line closes a LineOnlyReceiver's TCP connection after
    /// the lines before it were answered.
    fn line_only_receiver_over_long_line_over_tcp(r) {
        let mut long = b"ok\r\n".to_vec();
        long.extend(vec![b'x'; DEFAULT_MAX_LENGTH + 10]);
        long.extend_from_slice(b"\r\nnever\r\n");
        assert_eq!(exchange(&r, || LineOnlyReceiver::new(OnlyEcho), long, usize::MAX), b"ok\r\n");
    }
}

reactor_test! {
    /// A NetstringReceiver server over TCP echoes strings up to the
    /// limit; a malformed netstring closes the connection.
    fn netstring_receiver_over_tcp(r) {
        let strings: Vec<Vec<u8>> = (0..20).map(|i| vec![i as u8; i * 5000]).collect();
        let payload: Vec<u8> = strings.iter().flat_map(|s| netstring::encode(s)).collect();
        let want = payload.len();
        let echo = || NetstringReceiver::new(Strings { echo: true, ..Default::default() });
        assert_eq!(exchange(&r, echo, payload.clone(), want), payload);
    }
}

reactor_test! {
    /// A malformed netstring closes the TCP connection after the good
    /// ones before it were answered.
    fn netstring_broken_peer_over_tcp(r) {
        let echo = || NetstringReceiver::new(Strings { echo: true, ..Default::default() });
        let bad = [netstring::encode(b"fine"), b"4:toolong,".to_vec(), netstring::encode(b"never")].concat();
        assert_eq!(exchange(&r, echo, bad, usize::MAX), netstring::encode(b"fine"));
    }
}

reactor_test! {
    /// Int32StringReceiver over TCP echoes strings up to the limit; a
    /// prefix over it closes the connection.
    fn int32_string_receiver_over_tcp(r) {
        let strings: Vec<Vec<u8>> = (0..20).map(|i| vec![i as u8; i * 5000]).collect();
        let payload: Vec<u8> = strings.iter().flat_map(|s| PrefixWidth::Four.frame(s).unwrap()).collect();
        let want = payload.len();
        let echo = || Int32StringReceiver::new(Strings { echo: true, ..Default::default() });
        assert_eq!(exchange(&r, echo, payload.clone(), want), payload);
    }
}

reactor_test! {
    /// A length prefix over the limit closes the TCP connection after the
    /// strings before it were answered.
    fn int32_length_limit_exceeded_over_tcp(r) {
        let echo = || Int32StringReceiver::new(Strings { echo: true, ..Default::default() });
        let fine = PrefixWidth::Four.frame(b"fine").unwrap();
        let bad = [fine.clone(), vec![0, 1, 0x86, 0xa0], PrefixWidth::Four.frame(b"never").unwrap()].concat();
        assert_eq!(exchange(&r, echo, bad, usize::MAX), fine);
    }
}

reactor_test! {
    /// Int8StringReceiver over TCP echoes strings of every length its
    /// prefix allows.
    fn int8_string_receiver_over_tcp(r) {
        let payload: Vec<u8> = (0..=255usize).flat_map(|n| PrefixWidth::One.frame(&vec![n as u8; n]).unwrap()).collect();
        let want = payload.len();
        let echo = || Int8StringReceiver::new(Strings { echo: true, ..Default::default() });
        assert_eq!(exchange(&r, echo, payload.clone(), want), payload);
    }
}

reactor_test! {
    /// Int16StringReceiver over TCP echoes strings up to its limit.
    fn int16_string_receiver_over_tcp(r) {
        let payload: Vec<u8> =
            (0..40usize).flat_map(|n| PrefixWidth::Two.frame(&vec![n as u8; n * 1600]).unwrap()).collect();
        let want = payload.len();
        let echo = || Int16StringReceiver::with_max_length(Strings { echo: true, ..Default::default() }, 65_535);
        assert_eq!(exchange(&r, echo, payload.clone(), want), payload);
    }
}
