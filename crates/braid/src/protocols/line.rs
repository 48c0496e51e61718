//! Line-oriented protocols: Twisted's `LineReceiver`.
//!
//! [`LineDecoder`] is the parser, pure and separate from I/O: feed it
//! bytes with [`push`](LineDecoder::push), take [`LineEvent`]s with
//! [`next_event`](LineDecoder::next_event). [`LineReceiver`] wraps it and
//! a [`LineHandler`] (your code) into a [`Protocol`]: each complete line
//! goes to [`LineHandler::line_received`], raw-mode data to
//! [`LineHandler::raw_data_received`], and a line longer than
//! `max_length` to [`LineHandler::line_length_exceeded`], which closes
//! the connection unless you override it.
//!
//! Every callback gets a [`LineContext`]: send lines, switch between line
//! and raw mode, take the rest of the buffer, pause, close.
//!
//! Re-entrancy and closing, as in Twisted: a mode switch, a cleared buffer
//! or a pause made during a callback applies to the very next byte after
//! the current message; bytes fed during a callback (through a
//! [`ReceiverHandle`]) are only buffered; and once the transport is
//! closing, nothing more is delivered. See [`receiver`](super::receiver)
//! for pausing.
//!
//! ```
//! use braid::protocols::line::{LineContext, LineHandler, LineReceiver};
//! use braid::testing::StringTransport;
//! use braid::Failure;
//!
//! /// Answers each line with its length; `bye` closes.
//! struct Lengths;
//!
//! impl LineHandler for Lengths {
//!     fn line_received(&mut self, cx: &mut LineContext<'_>, line: &[u8]) -> Result<(), Failure> {
//!         if line == b"bye" {
//!             cx.lose_connection();
//!         } else {
//!             cx.send_line(line.len().to_string().as_bytes());
//!         }
//!         Ok(())
//!     }
//! }
//!
//! let mut proto = LineReceiver::new(Lengths);
//! let tr = StringTransport::new();
//! tr.connect(&mut proto);
//! tr.feed(&mut proto, b"hello\r\nwor");
//! tr.feed(&mut proto, b"ld!\r\nbye\r\nignored\r\n");
//! assert_eq!(tr.value(), b"5\r\n6\r\n");
//! assert!(tr.disconnecting());
//! ```

use crate::error::Failure;
use crate::protocol::Protocol;
use crate::protocols::delimiter::Delimiter;
use crate::protocols::receiver::{common_context_methods, Ctl, Engine, Receiver, ReceiverHandle};
use crate::transport::Transport;

/// Twisted's `LineReceiver.MAX_LENGTH`: the longest line accepted by default.
pub const DEFAULT_MAX_LENGTH: usize = 16384;

/// Whether a [`LineDecoder`] splits lines or passes bytes through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LineMode {
    /// Split at the delimiter (the initial mode).
    Line,
    /// Hand over everything buffered as it is.
    Raw,
}

/// One thing a [`LineDecoder`] found in its buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum LineEvent<'a> {
    /// A complete line, without its delimiter; never longer than `max_length`.
    Line(&'a [u8]),
    /// Raw-mode data: everything that was buffered.
    Raw(&'a [u8]),
    /// A line longer than `max_length` (or an unterminated buffer of
    /// `max_length + delimiter length` bytes): the whole rest of the buffer,
    /// delimiters included, which the decoder has dropped.
    TooLong(&'a [u8]),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FrameKind {
    Line,
    Raw,
    TooLong,
}

/// A message as offsets into the decoder's buffer (or an input slice), so
/// it can be handed out while the receiver's other state is borrowed
/// mutably.
/// What [`LineDecoder::scan`] found: a message and where parsing goes on,
/// or the need for more input and where to search next.
pub(crate) enum Scan {
    Frame(Frame, usize),
    Need(usize),
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct Frame {
    pub(crate) kind: FrameKind,
    start: usize,
    end: usize,
}

/// The line parser of [`LineReceiver`], with no I/O: push bytes, pull
/// events. Invariant: after `next_event` returned `None` in line mode,
/// fewer than `max_length + delimiter length` bytes stay buffered.
#[derive(Debug)]
pub struct LineDecoder {
    buf: Vec<u8>,
    /// Start of the bytes not handed out yet.
    pos: usize,
    /// Where the next delimiter search starts (no delimiter begins in
    /// `pos..search_from`).
    search_from: usize,
    delimiter: Delimiter,
    max_length: usize,
    mode: LineMode,
}

impl Default for LineDecoder {
    fn default() -> Self {
        LineDecoder::new(Delimiter::crlf(), DEFAULT_MAX_LENGTH)
    }
}

impl LineDecoder {
    /// A decoder in line mode splitting at `delimiter`, accepting lines of
    /// up to `max_length` bytes.
    pub fn new(delimiter: Delimiter, max_length: usize) -> Self {
        LineDecoder { buf: Vec::new(), pos: 0, search_from: 0, delimiter, max_length, mode: LineMode::Line }
    }

    /// Appends input; nothing is parsed until [`next_event`](Self::next_event).
    pub fn push(&mut self, data: &[u8]) {
        if self.pos > 0 {
            // Handed-out bytes are dropped here, never while an event
            // still points at them.
            self.buf.drain(..self.pos);
            self.search_from -= self.pos;
            self.pos = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// The next line, raw chunk or over-long remainder, or `None` when
    /// more input is needed.
    pub fn next_event(&mut self) -> Option<LineEvent<'_>> {
        let frame = self.next_frame()?;
        let bytes = self.frame_bytes(&frame);
        Some(match frame.kind {
            FrameKind::Line => LineEvent::Line(bytes),
            FrameKind::Raw => LineEvent::Raw(bytes),
            FrameKind::TooLong => LineEvent::TooLong(bytes),
        })
    }

    pub(crate) fn next_frame(&mut self) -> Option<Frame> {
        match self.scan(&self.buf, self.pos, self.search_from) {
            Scan::Frame(frame, next) => {
                self.pos = next;
                self.search_from = next;
                Some(frame)
            }
            Scan::Need(search_from) => {
                self.search_from = search_from;
                None
            }
        }
    }

    /// Finds the next message in `hay[pos..]`, no delimiter starting in
    /// `pos..search_from`. `hay` is the buffer, or a fresh input slice
    /// parsed in place while the buffer is empty.
    pub(crate) fn scan(&self, hay: &[u8], pos: usize, search_from: usize) -> Scan {
        let len = hay.len();
        if pos == len {
            return Scan::Need(pos);
        }
        let rest = |kind| Scan::Frame(Frame { kind, start: pos, end: len }, len);
        match self.mode {
            LineMode::Raw => rest(FrameKind::Raw),
            LineMode::Line => match self.delimiter.find_in(&hay[search_from..]) {
                Some(i) if search_from + i - pos > self.max_length => rest(FrameKind::TooLong),
                Some(i) => {
                    let at = search_from + i;
                    Scan::Frame(
                        Frame { kind: FrameKind::Line, start: pos, end: at },
                        at + self.delimiter.len(),
                    )
                }
                None if len - pos >= self.max_length.saturating_add(self.delimiter.len()) => {
                    rest(FrameKind::TooLong)
                }
                // A delimiter split across pushes may start in the last few
                // bytes: search those again next time.
                None => Scan::Need(pos.max(len.saturating_sub(self.delimiter.len() - 1))),
            },
        }
    }

    /// True if nothing is buffered.
    pub(crate) fn is_empty(&self) -> bool {
        self.pos == self.buf.len()
    }

    /// Buffers the unparsed tail of an input slice parsed in place (the
    /// buffer being empty); no delimiter starts in its first `searched` bytes.
    pub(crate) fn keep_tail(&mut self, tail: &[u8], searched: usize) {
        self.buf.clear();
        self.buf.extend_from_slice(tail);
        self.pos = 0;
        self.search_from = searched.min(tail.len());
    }

    pub(crate) fn frame_bytes(&self, frame: &Frame) -> &[u8] {
        &self.buf[frame.start..frame.end]
    }

    /// Switches between line and raw mode; the next event uses the new
    /// mode on whatever is still buffered.
    pub fn set_mode(&mut self, mode: LineMode) {
        self.mode = mode;
    }

    /// The current mode.
    pub fn mode(&self) -> LineMode {
        self.mode
    }

    /// Takes everything buffered and not handed out yet (Twisted's
    /// `clearLineBuffer`).
    pub fn clear(&mut self) -> Vec<u8> {
        let rest = self.buf[self.pos..].to_vec();
        self.discard();
        rest
    }

    fn discard(&mut self) {
        self.buf.clear();
        self.pos = 0;
        self.search_from = 0;
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

/// Your side of a [`LineReceiver`]: what to do with lines.
///
/// The callbacks that return `Result` may fail: an `Err` is logged and
/// aborts the connection (Twisted passes an error returned from
/// `lineReceived` or `rawDataReceived` on to the transport, which drops
/// the connection). Panics are contained by the reactor the same way.
pub trait LineHandler {
    /// The connection is up.
    fn connection_made(&mut self, cx: &mut LineContext<'_>) {
        let _ = cx;
    }

    /// A complete line arrived, without its delimiter.
    fn line_received(&mut self, cx: &mut LineContext<'_>, line: &[u8]) -> Result<(), Failure>;

    /// Data arrived in raw mode. The default fails (so the connection is
    /// aborted): a handler that calls `set_raw_mode` must implement it.
    fn raw_data_received(&mut self, cx: &mut LineContext<'_>, data: &[u8]) -> Result<(), Failure> {
        let _ = (cx, data);
        Err(Failure::msg("raw data arrived but the line handler does not implement raw_data_received"))
    }

    /// A line was longer than the receiver's `max_length`; `remainder` is
    /// everything that was buffered from its start on (the decoder dropped
    /// it). The default closes the connection.
    fn line_length_exceeded(&mut self, cx: &mut LineContext<'_>, remainder: &[u8]) {
        let _ = remainder;
        cx.lose_connection();
    }

    /// The connection is gone.
    fn connection_lost(&mut self, reason: Failure) {
        let _ = reason;
    }
}

/// What a [`LineReceiver`] asked for during one callback, applied to the
/// decoder once the callback returns.
#[derive(Default)]
struct Requests {
    mode: Option<LineMode>,
    /// `set_line_mode`'s `extra`, appended after what is buffered.
    extra: Vec<u8>,
    cleared: bool,
}

/// The receiver as seen from inside a [`LineHandler`] callback.
pub struct LineContext<'a> {
    ctl: Ctl<'a>,
    req: &'a mut Requests,
    rest: &'a [u8],
    delimiter: &'a Delimiter,
}

impl LineContext<'_> {
    common_context_methods!();

    /// Writes `line` followed by the delimiter. The line is sent as it is:
    /// a delimiter inside it splits it for the peer.
    pub fn send_line(&self, line: &[u8]) {
        self.ctl.transport.write_sequence(&[line, self.delimiter.as_bytes()]);
    }

    /// The delimiter in use.
    pub fn delimiter(&self) -> &Delimiter {
        self.delimiter
    }

    /// From the next byte on, hand data to `raw_data_received` instead of
    /// splitting lines.
    pub fn set_raw_mode(&mut self) {
        self.req.mode = Some(LineMode::Raw);
    }

    /// From the next byte on, split lines again; `extra` is parsed after
    /// whatever is still buffered (Twisted's `setLineMode(extra)`).
    pub fn set_line_mode(&mut self, extra: &[u8]) {
        self.req.mode = Some(LineMode::Line);
        self.req.extra.extend_from_slice(extra);
    }

    /// Takes and returns everything buffered after the current message
    /// (including `set_line_mode` extras); it will not be parsed.
    pub fn clear_line_buffer(&mut self) -> Vec<u8> {
        let mut out = self.rest.to_vec();
        out.append(&mut self.req.extra);
        self.rest = &[];
        self.req.cleared = true;
        out
    }
}

pub(crate) struct LineEngine<H> {
    decoder: LineDecoder,
    handler: H,
    req: Requests,
}

impl<H> LineEngine<H> {
    fn apply_requests(&mut self) {
        let req = &mut self.req;
        if req.cleared {
            self.decoder.discard();
            req.cleared = false;
        }
        if let Some(mode) = req.mode.take() {
            self.decoder.set_mode(mode);
        }
        if !req.extra.is_empty() {
            self.decoder.push(&req.extra);
            req.extra.clear();
        }
    }
}

/// Calls the handler for one message; an `Err` names the callback.
fn deliver<H: LineHandler>(
    handler: &mut H,
    kind: FrameKind,
    cx: &mut LineContext<'_>,
    bytes: &[u8],
) -> Result<(), (&'static str, Failure)> {
    match kind {
        FrameKind::Line => handler.line_received(cx, bytes).map_err(|f| ("line_received", f)),
        FrameKind::Raw => handler.raw_data_received(cx, bytes).map_err(|f| ("raw_data_received", f)),
        FrameKind::TooLong => {
            handler.line_length_exceeded(cx, bytes);
            Ok(())
        }
    }
}

impl<H: LineHandler + 'static> Engine for LineEngine<H> {
    fn connection_made(&mut self, ctl: Ctl<'_>) {
        let LineEngine { decoder, handler, req } = self;
        let mut cx = LineContext { ctl, req, rest: decoder.unparsed(), delimiter: &decoder.delimiter };
        handler.connection_made(&mut cx);
        self.apply_requests();
    }

    fn push(&mut self, data: &[u8]) {
        self.decoder.push(data)
    }

    /// With nothing buffered, parses `data` where it lies and buffers only
    /// what is left: one copy less for every complete line.
    fn receive(&mut self, data: &[u8], mut ctl: Ctl<'_>) {
        if !self.decoder.is_empty() {
            self.decoder.push(data);
            return self.pump(ctl);
        }
        let (mut pos, mut searched) = (0, 0);
        while ctl.may_deliver() {
            let (frame, next) = match self.decoder.scan(data, pos, searched) {
                Scan::Frame(frame, next) => (frame, next),
                Scan::Need(search_from) => {
                    searched = search_from;
                    break;
                }
            };
            pos = next;
            searched = next;
            let LineEngine { decoder, handler, req } = self;
            let mut cx =
                LineContext { ctl: ctl.reborrow(), req, rest: &data[pos..], delimiter: &decoder.delimiter };
            let result = deliver(handler, frame.kind, &mut cx, &data[frame.start..frame.end]);
            if let Err((what, failure)) = result {
                ctl.fail(what, failure);
                return;
            }
            if req.cleared {
                req.cleared = false;
                pos = data.len();
                searched = pos;
            }
            if let Some(mode) = req.mode.take() {
                decoder.set_mode(mode);
            }
            if !req.extra.is_empty() {
                // The extra goes after the rest of `data`: from here on,
                // parse from the buffer.
                decoder.keep_tail(&data[pos..], searched - pos);
                self.apply_requests();
                return self.pump(ctl);
            }
        }
        self.decoder.keep_tail(&data[pos..], searched - pos);
    }

    fn pump(&mut self, mut ctl: Ctl<'_>) {
        while ctl.may_deliver() {
            let Some(frame) = self.decoder.next_frame() else { break };
            let LineEngine { decoder, handler, req } = self;
            let bytes = decoder.frame_bytes(&frame);
            let mut cx = LineContext {
                ctl: ctl.reborrow(),
                req,
                rest: decoder.unparsed(),
                delimiter: &decoder.delimiter,
            };
            let result = deliver(handler, frame.kind, &mut cx, bytes);
            self.apply_requests();
            if let Err((what, failure)) = result {
                ctl.fail(what, failure);
                break;
            }
        }
    }

    fn connection_lost(&mut self, reason: Failure) {
        self.handler.connection_lost(reason)
    }
}

/// Twisted's `LineReceiver`: a [`Protocol`] that splits its input into
/// lines for a [`LineHandler`], with raw mode, a line length limit and
/// pausing. See the [module docs](self).
pub struct LineReceiver<H: LineHandler + 'static> {
    inner: Receiver<LineEngine<H>>,
}

impl<H: LineHandler + 'static> LineReceiver<H> {
    /// A receiver splitting at `\r\n`, accepting lines of up to
    /// [`DEFAULT_MAX_LENGTH`] bytes.
    pub fn new(handler: H) -> Self {
        Self::with_decoder(handler, LineDecoder::default())
    }

    /// A receiver with its own delimiter and line length limit.
    pub fn with_options(handler: H, delimiter: Delimiter, max_length: usize) -> Self {
        Self::with_decoder(handler, LineDecoder::new(delimiter, max_length))
    }

    fn with_decoder(handler: H, decoder: LineDecoder) -> Self {
        LineReceiver { inner: Receiver::new(LineEngine { decoder, handler, req: Requests::default() }) }
    }

    /// A handle to pause, resume or feed this receiver later.
    pub fn handle(&self) -> ReceiverHandle {
        self.inner.handle()
    }

    /// Runs `f` on the handler (`None` while one of its callbacks runs).
    pub fn with_handler<R>(&self, f: impl FnOnce(&mut H) -> R) -> Option<R> {
        self.inner.with_engine_mut(|e| f(&mut e.handler))
    }

    /// The current mode (`None` while one of its callbacks runs).
    pub fn mode(&self) -> Option<LineMode> {
        self.inner.with_engine(|e| e.decoder.mode())
    }

    /// How many bytes are buffered and not delivered yet (`None` while
    /// one of its callbacks runs).
    pub fn buffered(&self) -> Option<usize> {
        self.inner.with_engine(|e| e.decoder.unparsed().len())
    }
}

impl<H: LineHandler + 'static> Protocol for LineReceiver<H> {
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
