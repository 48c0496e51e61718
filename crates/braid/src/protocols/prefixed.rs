//! Length-prefixed strings: Twisted's `Int8StringReceiver`,
//! `Int16StringReceiver` and `Int32StringReceiver` (`IntNStringReceiver`).
//!
//! Each string goes after its length as a big-endian unsigned integer of
//! one, two or four bytes ([`PrefixWidth`]). [`PrefixedDecoder`] is the
//! parser, with no I/O; [`PrefixedReceiver`] wraps it and a
//! [`StringHandler`] into a [`Protocol`], under the three names
//! [`Int8StringReceiver`], [`Int16StringReceiver`], [`Int32StringReceiver`].
//!
//! A prefix announcing more than `max_length` bytes (99,999 by default)
//! goes to [`StringHandler::length_limit_exceeded`] (default: close the
//! connection); that string is never delivered, even if it already
//! arrived whole, and nothing after it is parsed. Sending a string the
//! prefix cannot encode is refused with [`StringTooLong`]. Re-entrancy and
//! pausing work as for every receiver (see [`receiver`](super::receiver)).
//!
//! Twisted's legacy `recvd` attribute (the unparsed buffer, rewritable
//! from `stringReceived`) has no counterpart: the buffer belongs to the
//! decoder.

use crate::error::Failure;
use crate::protocol::Protocol;
use crate::protocols::receiver::{Ctl, Engine, Receiver, ReceiverHandle};
use crate::protocols::strings::{Framing, StringContext, StringHandler, StringTooLong};
use crate::transport::Transport;

/// Twisted's `IntNStringReceiver.MAX_LENGTH`: the longest string accepted
/// by default (an 8-bit prefix cannot reach it).
pub const DEFAULT_MAX_LENGTH: usize = 99_999;

/// The size of the length prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefixWidth {
    /// One byte: strings of up to 255 bytes.
    One,
    /// Two bytes: up to 65,535.
    Two,
    /// Four bytes: up to 4,294,967,295.
    Four,
}

impl PrefixWidth {
    /// The prefix's size in bytes.
    pub const fn bytes(self) -> usize {
        match self {
            PrefixWidth::One => 1,
            PrefixWidth::Two => 2,
            PrefixWidth::Four => 4,
        }
    }

    /// The longest string the prefix can encode.
    pub const fn limit(self) -> usize {
        match self {
            PrefixWidth::One => u8::MAX as usize,
            PrefixWidth::Two => u16::MAX as usize,
            // On 64-bit targets every u32 fits a usize.
            PrefixWidth::Four => u32::MAX as usize,
        }
    }

    /// The width for a prefix of `bytes` bytes (1, 2 or 4).
    pub const fn from_bytes(bytes: usize) -> Option<PrefixWidth> {
        match bytes {
            1 => Some(PrefixWidth::One),
            2 => Some(PrefixWidth::Two),
            4 => Some(PrefixWidth::Four),
            _ => None,
        }
    }

    /// The prefix for a string of `len` bytes: a buffer and how many of
    /// its bytes to send.
    pub fn encode(self, len: usize) -> Result<([u8; 4], usize), StringTooLong> {
        let limit = self.limit();
        if len > limit {
            return Err(StringTooLong { len, limit });
        }
        let n = self.bytes();
        let be = (len as u32).to_be_bytes();
        let mut out = [0; 4];
        out[..n].copy_from_slice(&be[4 - n..]);
        Ok((out, n))
    }

    /// Reads a prefix from the first [`bytes`](Self::bytes) bytes of `b`.
    fn decode(self, b: &[u8]) -> usize {
        b[..self.bytes()].iter().fold(0usize, |acc, &x| (acc << 8) | usize::from(x))
    }

    /// `string` with its prefix in front, or `StringTooLong`.
    pub fn frame(self, string: &[u8]) -> Result<Vec<u8>, StringTooLong> {
        let (prefix, n) = self.encode(string.len())?;
        let mut out = Vec::with_capacity(n + string.len());
        out.extend_from_slice(&prefix[..n]);
        out.extend_from_slice(string);
        Ok(out)
    }
}

/// One thing a [`PrefixedDecoder`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum PrefixedEvent<'a> {
    /// A complete string.
    String(&'a [u8]),
    /// A prefix announced `length` bytes, more than `max_length`; the
    /// decoder parses nothing more.
    LengthLimitExceeded(usize),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Waiting for a whole prefix.
    Prefix,
    /// Waiting for `len` bytes of string.
    Body { len: usize },
    /// A prefix went over the limit: the rest of the stream is ignored.
    Exceeded { length: usize },
}

/// The length-prefix parser, with no I/O. Invariant: after `next_event`
/// returned `None`, less than one prefix plus `max_length` bytes stay
/// buffered.
#[derive(Debug)]
pub struct PrefixedDecoder {
    buf: Vec<u8>,
    pos: usize,
    state: State,
    width: PrefixWidth,
    max_length: usize,
}

impl PrefixedDecoder {
    /// A decoder for prefixes of `width`, accepting strings of up to
    /// `max_length` bytes.
    pub fn new(width: PrefixWidth, max_length: usize) -> Self {
        PrefixedDecoder { buf: Vec::new(), pos: 0, state: State::Prefix, width, max_length }
    }

    /// Appends input (dropped once a length went over the limit).
    pub fn push(&mut self, data: &[u8]) {
        if let State::Exceeded { .. } = self.state {
            return;
        }
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// The next string, the over-long length (once), or `None` when more
    /// input is needed or the limit was exceeded.
    pub fn next_event(&mut self) -> Option<PrefixedEvent<'_>> {
        loop {
            let available = self.buf.len() - self.pos;
            match self.state {
                State::Exceeded { .. } => return None,
                State::Prefix => {
                    let w = self.width.bytes();
                    if available < w {
                        return None;
                    }
                    let len = self.width.decode(&self.buf[self.pos..]);
                    self.pos += w;
                    if len > self.max_length {
                        self.state = State::Exceeded { length: len };
                        self.buf = Vec::new();
                        self.pos = 0;
                        return Some(PrefixedEvent::LengthLimitExceeded(len));
                    }
                    self.state = State::Body { len };
                }
                State::Body { len } => {
                    if available < len {
                        return None;
                    }
                    let start = self.pos;
                    self.pos += len;
                    self.state = State::Prefix;
                    return Some(PrefixedEvent::String(&self.buf[start..start + len]));
                }
            }
        }
    }

    /// The announced length that went over the limit, if one did.
    pub fn exceeded(&self) -> Option<usize> {
        match self.state {
            State::Exceeded { length } => Some(length),
            _ => None,
        }
    }

    /// How many bytes are buffered and not handed out yet.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// The prefix width.
    pub fn width(&self) -> PrefixWidth {
        self.width
    }

    /// The longest string accepted.
    pub fn max_length(&self) -> usize {
        self.max_length
    }
}

pub(crate) struct PrefixedEngine<H> {
    decoder: PrefixedDecoder,
    handler: H,
}

impl<H: StringHandler + 'static> Engine for PrefixedEngine<H> {
    fn connection_made(&mut self, ctl: Ctl<'_>) {
        let mut cx = StringContext { ctl, framing: Framing::Prefixed(self.decoder.width) };
        self.handler.connection_made(&mut cx);
    }

    fn push(&mut self, data: &[u8]) {
        self.decoder.push(data)
    }

    fn pump(&mut self, mut ctl: Ctl<'_>) {
        let PrefixedEngine { decoder, handler } = self;
        let framing = Framing::Prefixed(decoder.width);
        while ctl.may_deliver() {
            let Some(event) = decoder.next_event() else { break };
            let mut cx = StringContext { ctl: ctl.reborrow(), framing };
            match event {
                PrefixedEvent::String(string) => {
                    if let Err(failure) = handler.string_received(&mut cx, string) {
                        ctl.fail("string_received", failure);
                        break;
                    }
                }
                PrefixedEvent::LengthLimitExceeded(length) => handler.length_limit_exceeded(&mut cx, length),
            }
        }
    }

    fn connection_lost(&mut self, reason: Failure) {
        self.handler.connection_lost(reason)
    }
}

/// Twisted's `IntNStringReceiver`: a [`Protocol`] that hands each
/// length-prefixed string to a [`StringHandler`]; `WIDTH` is the prefix
/// size in bytes (1, 2 or 4; any other does not compile). Use it through
/// [`Int8StringReceiver`], [`Int16StringReceiver`] or
/// [`Int32StringReceiver`]. See the [module docs](self).
pub struct PrefixedReceiver<H: StringHandler + 'static, const WIDTH: usize> {
    inner: Receiver<PrefixedEngine<H>>,
}

/// Strings after a one-byte length (Twisted's `Int8StringReceiver`).
pub type Int8StringReceiver<H> = PrefixedReceiver<H, 1>;
/// Strings after a big-endian two-byte length (Twisted's `Int16StringReceiver`).
pub type Int16StringReceiver<H> = PrefixedReceiver<H, 2>;
/// Strings after a big-endian four-byte length (Twisted's `Int32StringReceiver`).
pub type Int32StringReceiver<H> = PrefixedReceiver<H, 4>;

impl<H: StringHandler + 'static, const WIDTH: usize> PrefixedReceiver<H, WIDTH> {
    const WIDTH: PrefixWidth = match PrefixWidth::from_bytes(WIDTH) {
        Some(w) => w,
        None => panic!("a length prefix is 1, 2 or 4 bytes wide"),
    };

    /// A receiver accepting strings of up to [`DEFAULT_MAX_LENGTH`] bytes.
    pub fn new(handler: H) -> Self {
        Self::with_max_length(handler, DEFAULT_MAX_LENGTH)
    }

    /// A receiver accepting strings of up to `max_length` bytes.
    pub fn with_max_length(handler: H, max_length: usize) -> Self {
        let decoder = PrefixedDecoder::new(Self::WIDTH, max_length);
        PrefixedReceiver { inner: Receiver::new(PrefixedEngine { decoder, handler }) }
    }

    /// The announced length that went over `max_length`, once one did
    /// (`None` also while one of the handler's callbacks runs).
    pub fn length_exceeded(&self) -> Option<usize> {
        self.inner.with_engine(|e| e.decoder.exceeded()).flatten()
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
    /// one of the handler's callbacks runs).
    pub fn buffered(&self) -> Option<usize> {
        self.inner.with_engine(|e| e.decoder.buffered())
    }
}

impl<H: StringHandler + 'static, const WIDTH: usize> Protocol for PrefixedReceiver<H, WIDTH> {
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
