//! Lines and nothing else: Twisted's `LineOnlyReceiver`, the fast variant
//! of [`LineReceiver`](super::line::LineReceiver) without raw mode.
//!
//! [`LineOnlyDecoder`] is the pure parser; [`LineOnlyReceiver`] wraps it
//! and a [`LineOnlyHandler`] into a [`Protocol`]. With no mode switches
//! and no buffer to hand back, a callback cannot change how the rest of
//! the input is parsed, so the receiver does no bookkeeping between lines.
//!
//! As in Twisted, lines stop being delivered once the transport is
//! closing, and a line (or an unterminated remainder) longer than
//! `max_length` goes to [`LineOnlyHandler::line_length_exceeded`], which
//! closes the connection by default. Re-entrancy and pausing work as for
//! every receiver (see [`receiver`](super::receiver)).

use crate::error::Failure;
use crate::protocol::Protocol;
use crate::protocols::delimiter::Delimiter;
use crate::protocols::line::DEFAULT_MAX_LENGTH;
use crate::protocols::receiver::{common_context_methods, Ctl, Engine, Receiver, ReceiverHandle};
use crate::transport::Transport;

/// One thing a [`LineOnlyDecoder`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum LineOnlyEvent<'a> {
    /// A complete line, without its delimiter; never longer than `max_length`.
    Line(&'a [u8]),
    /// A complete line longer than `max_length`, or an unterminated
    /// remainder of `max_length + delimiter length` bytes or more; it was
    /// dropped. Unlike [`LineEvent::TooLong`](super::line::LineEvent::TooLong),
    /// only the offending line: what follows its delimiter is still parsed.
    TooLong(&'a [u8]),
}

/// What a scan found: a line (or an over-long one) and where parsing goes
/// on, or the need for more input and where to search next.
enum Scan {
    Found { too_long: bool, start: usize, end: usize, next: usize },
    Need(usize),
}

/// The parser of [`LineOnlyReceiver`], with no I/O. Invariant: after
/// `next_event` returned `None`, fewer than `max_length + delimiter
/// length` bytes stay buffered.
#[derive(Debug)]
pub struct LineOnlyDecoder {
    buf: Vec<u8>,
    pos: usize,
    search_from: usize,
    delimiter: Delimiter,
    max_length: usize,
}

impl Default for LineOnlyDecoder {
    fn default() -> Self {
        LineOnlyDecoder::new(Delimiter::crlf(), DEFAULT_MAX_LENGTH)
    }
}

impl LineOnlyDecoder {
    /// A decoder splitting at `delimiter`, accepting lines of up to
    /// `max_length` bytes.
    pub fn new(delimiter: Delimiter, max_length: usize) -> Self {
        LineOnlyDecoder { buf: Vec::new(), pos: 0, search_from: 0, delimiter, max_length }
    }

    /// Appends input.
    pub fn push(&mut self, data: &[u8]) {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.search_from -= self.pos;
            self.pos = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// The next line, or over-long line, or `None` when more input is needed.
    pub fn next_event(&mut self) -> Option<LineOnlyEvent<'_>> {
        match self.scan(&self.buf, self.pos, self.search_from) {
            Scan::Found { too_long, start, end, next } => {
                self.pos = next;
                self.search_from = next;
                let line = &self.buf[start..end];
                Some(if too_long { LineOnlyEvent::TooLong(line) } else { LineOnlyEvent::Line(line) })
            }
            Scan::Need(search_from) => {
                self.search_from = search_from;
                None
            }
        }
    }

    /// Finds the next line in `hay[pos..]`, no delimiter starting in
    /// `pos..search_from`: the buffer, or an input slice parsed in place.
    fn scan(&self, hay: &[u8], pos: usize, search_from: usize) -> Scan {
        let len = hay.len();
        let dlen = self.delimiter.len();
        match self.delimiter.find_in(&hay[search_from..]) {
            Some(i) => {
                let end = search_from + i;
                Scan::Found { too_long: end - pos > self.max_length, start: pos, end, next: end + dlen }
            }
            None if len - pos >= self.max_length.saturating_add(dlen) => {
                Scan::Found { too_long: true, start: pos, end: len, next: len }
            }
            None => Scan::Need(pos.max(len.saturating_sub(dlen - 1))),
        }
    }

    fn is_empty(&self) -> bool {
        self.pos == self.buf.len()
    }

    /// Buffers the unparsed tail of an input slice parsed in place.
    fn keep_tail(&mut self, tail: &[u8], searched: usize) {
        self.buf.clear();
        self.buf.extend_from_slice(tail);
        self.pos = 0;
        self.search_from = searched.min(tail.len());
    }

    /// The bytes buffered and not handed out yet.
    pub fn unparsed(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    /// The delimiter lines are split at.
    pub fn delimiter(&self) -> &Delimiter {
        &self.delimiter
    }

    /// The longest line accepted.
    pub fn max_length(&self) -> usize {
        self.max_length
    }
}

/// Your side of a [`LineOnlyReceiver`].
///
/// An `Err` from `line_received` is logged and aborts the connection.
pub trait LineOnlyHandler {
    /// The connection is up.
    fn connection_made(&mut self, cx: &mut LineOnlyContext<'_>) {
        let _ = cx;
    }

    /// A complete line arrived, without its delimiter.
    fn line_received(&mut self, cx: &mut LineOnlyContext<'_>, line: &[u8]) -> Result<(), Failure>;

    /// A line (or unterminated remainder) was longer than `max_length`;
    /// it was dropped. The default closes the connection.
    fn line_length_exceeded(&mut self, cx: &mut LineOnlyContext<'_>, line: &[u8]) {
        let _ = line;
        cx.lose_connection();
    }

    /// The connection is gone.
    fn connection_lost(&mut self, reason: Failure) {
        let _ = reason;
    }
}

/// The receiver as seen from inside a [`LineOnlyHandler`] callback.
pub struct LineOnlyContext<'a> {
    ctl: Ctl<'a>,
    delimiter: &'a Delimiter,
}

impl LineOnlyContext<'_> {
    common_context_methods!();

    /// Writes `line` and the delimiter together (one `writev`).
    pub fn send_line(&self, line: &[u8]) {
        self.ctl.transport.write_sequence(&[line, self.delimiter.as_bytes()]);
    }

    /// The delimiter in use.
    pub fn delimiter(&self) -> &Delimiter {
        self.delimiter
    }
}

pub(crate) struct LineOnlyEngine<H> {
    decoder: LineOnlyDecoder,
    handler: H,
    /// The decoder's delimiter again, for `send_line` while an event
    /// borrows the decoder.
    delimiter: Delimiter,
}

impl<H: LineOnlyHandler + 'static> Engine for LineOnlyEngine<H> {
    fn connection_made(&mut self, ctl: Ctl<'_>) {
        let mut cx = LineOnlyContext { ctl, delimiter: &self.delimiter };
        self.handler.connection_made(&mut cx);
    }

    fn push(&mut self, data: &[u8]) {
        self.decoder.push(data)
    }

    /// With nothing buffered, parses `data` where it lies and buffers only
    /// what is left.
    fn receive(&mut self, data: &[u8], mut ctl: Ctl<'_>) {
        if !self.decoder.is_empty() {
            self.decoder.push(data);
            return self.pump(ctl);
        }
        let LineOnlyEngine { decoder, handler, delimiter } = self;
        let (mut pos, mut searched) = (0, 0);
        while ctl.may_deliver() {
            let (too_long, line) = match decoder.scan(data, pos, searched) {
                Scan::Found { too_long, start, end, next } => {
                    pos = next;
                    searched = next;
                    (too_long, &data[start..end])
                }
                Scan::Need(search_from) => {
                    searched = search_from;
                    break;
                }
            };
            let mut cx = LineOnlyContext { ctl: ctl.reborrow(), delimiter };
            if too_long {
                handler.line_length_exceeded(&mut cx, line);
            } else if let Err(failure) = handler.line_received(&mut cx, line) {
                ctl.fail("line_received", failure);
                return;
            }
        }
        decoder.keep_tail(&data[pos..], searched - pos);
    }

    fn pump(&mut self, mut ctl: Ctl<'_>) {
        let LineOnlyEngine { decoder, handler, delimiter } = self;
        while ctl.may_deliver() {
            let Some(event) = decoder.next_event() else { break };
            let mut cx = LineOnlyContext { ctl: ctl.reborrow(), delimiter };
            match event {
                LineOnlyEvent::Line(line) => {
                    if let Err(failure) = handler.line_received(&mut cx, line) {
                        ctl.fail("line_received", failure);
                        break;
                    }
                }
                LineOnlyEvent::TooLong(line) => handler.line_length_exceeded(&mut cx, line),
            }
        }
    }

    fn connection_lost(&mut self, reason: Failure) {
        self.handler.connection_lost(reason)
    }
}

/// Twisted's `LineOnlyReceiver`: a [`Protocol`] that splits its input into
/// lines for a [`LineOnlyHandler`]. See the [module docs](self).
pub struct LineOnlyReceiver<H: LineOnlyHandler + 'static> {
    inner: Receiver<LineOnlyEngine<H>>,
}

impl<H: LineOnlyHandler + 'static> LineOnlyReceiver<H> {
    /// A receiver splitting at `\r\n`, accepting lines of up to
    /// [`DEFAULT_MAX_LENGTH`] bytes.
    pub fn new(handler: H) -> Self {
        Self::with_options(handler, Delimiter::crlf(), DEFAULT_MAX_LENGTH)
    }

    /// A receiver with its own delimiter and line length limit.
    pub fn with_options(handler: H, delimiter: Delimiter, max_length: usize) -> Self {
        let decoder = LineOnlyDecoder::new(delimiter.clone(), max_length);
        LineOnlyReceiver { inner: Receiver::new(LineOnlyEngine { decoder, handler, delimiter }) }
    }

    /// A handle to pause, resume or feed this receiver later.
    pub fn handle(&self) -> ReceiverHandle {
        self.inner.handle()
    }

    /// Runs `f` on the handler (`None` while one of its callbacks runs).
    pub fn with_handler<R>(&self, f: impl FnOnce(&mut H) -> R) -> Option<R> {
        self.inner.with_engine_mut(|e| f(&mut e.handler))
    }

    /// How many bytes are buffered and not delivered yet (`None` while
    /// one of its callbacks runs).
    pub fn buffered(&self) -> Option<usize> {
        self.inner.with_engine(|e| e.decoder.unparsed().len())
    }
}

impl<H: LineOnlyHandler + 'static> Protocol for LineOnlyReceiver<H> {
    fn connection_made(&mut self, transport: Transport) {
        self.inner.connection_made(transport)
    }

    fn data_received(&mut self, data: &[u8]) {
        self.inner.data_received(data)
    }

    fn connection_lost(&mut self, reason: Failure) {
        self.inner.connection_lost(reason)
    }
}
