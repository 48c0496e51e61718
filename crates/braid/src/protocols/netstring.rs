//! Netstrings (`<length>:<data>,`, D. J. Bernstein's format): Twisted's
//! `NetstringReceiver`.
//!
//! [`NetstringDecoder`] is the parser, with no I/O: a state machine that
//! accepts input split anywhere, down to one byte at a time, and never
//! buffers more than one netstring. [`NetstringReceiver`] wraps it and a
//! [`StringHandler`] into a [`Protocol`].
//!
//! Any malformed input is a [`NetstringError`]: a missing or non-decimal
//! length, a leading zero, a length above `max_length` (99,999 by
//! default), a missing colon, or a byte other than the comma after the
//! declared data (more data than declared). The receiver then marks the
//! peer broken ([`NetstringReceiver::broken_peer`], Twisted's
//! `brokenPeer`), tells [`StringHandler::peer_broken`], closes the
//! connection and ignores everything after. Re-entrancy and pausing work
//! as for every receiver (see [`receiver`](super::receiver)).

use std::fmt;

use crate::error::Failure;
use crate::protocol::Protocol;
use crate::protocols::receiver::{Ctl, Engine, Receiver, ReceiverHandle};
use crate::protocols::strings::{Framing, StringContext, StringHandler};
use crate::transport::Transport;

/// Twisted's `NetstringReceiver.MAX_LENGTH`: the longest string accepted
/// by default.
pub const DEFAULT_MAX_LENGTH: usize = 99_999;

/// How a netstring stream was malformed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetstringError {
    /// A netstring must start with a decimal length; `found` came instead
    /// (a colon for an empty length, or data with no length at all).
    MissingLength {
        /// The offending byte.
        found: u8,
    },
    /// A length of more than one digit starting with `0`.
    LeadingZero,
    /// The length went past the receiver's `max_length`.
    TooLong {
        /// The receiver's limit.
        max_length: usize,
    },
    /// The length's digits were followed by `found`, not `:`.
    MissingColon {
        /// The offending byte.
        found: u8,
    },
    /// The declared data was followed by `found`, not `,` (more data than
    /// declared, or a missing comma).
    MissingComma {
        /// The offending byte.
        found: u8,
    },
}

impl fmt::Display for NetstringError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetstringError::MissingLength { found } => {
                write!(f, "netstring length missing: found {:?}", char::from(*found))
            }
            NetstringError::LeadingZero => f.write_str("netstring length has a leading zero"),
            NetstringError::TooLong { max_length } => {
                write!(f, "netstring longer than the limit of {max_length} bytes")
            }
            NetstringError::MissingColon { found } => {
                write!(f, "netstring length not followed by ':' but {:?}", char::from(*found))
            }
            NetstringError::MissingComma { found } => {
                write!(f, "netstring data not followed by ',' but {:?}", char::from(*found))
            }
        }
    }
}

impl std::error::Error for NetstringError {}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Reading the length: its value and how many digits so far.
    Length { value: usize, digits: u32 },
    /// Waiting for `len` bytes and the comma.
    Payload { len: usize },
    /// Malformed input was reported; nothing more is parsed.
    Broken(NetstringError),
}

/// The netstring parser, with no I/O. Invariant: after `next_event`
/// returned `None`, at most one unfinished netstring stays buffered.
#[derive(Debug)]
pub struct NetstringDecoder {
    buf: Vec<u8>,
    pos: usize,
    state: State,
    max_length: usize,
}

impl Default for NetstringDecoder {
    fn default() -> Self {
        NetstringDecoder::new(DEFAULT_MAX_LENGTH)
    }
}

impl NetstringDecoder {
    /// A decoder accepting strings of up to `max_length` bytes.
    pub fn new(max_length: usize) -> Self {
        NetstringDecoder { buf: Vec::new(), pos: 0, state: State::Length { value: 0, digits: 0 }, max_length }
    }

    /// Appends input (dropped once the stream is broken).
    pub fn push(&mut self, data: &[u8]) {
        if matches!(self.state, State::Broken(_)) {
            return;
        }
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// The next string, the error that broke the stream (once), or `None`
    /// when more input is needed or the stream is broken.
    pub fn next_event(&mut self) -> Option<Result<&[u8], NetstringError>> {
        loop {
            match self.state {
                State::Broken(_) => return None,
                State::Length { mut value, mut digits } => {
                    let &b = self.buf.get(self.pos)?;
                    self.pos += 1;
                    let next = match b {
                        b'0'..=b'9' if digits == 1 && value == 0 => Err(NetstringError::LeadingZero),
                        b'0'..=b'9' => {
                            digits += 1;
                            match value.checked_mul(10).and_then(|v| v.checked_add(usize::from(b - b'0'))) {
                                Some(v) if v <= self.max_length => {
                                    value = v;
                                    Ok(State::Length { value, digits })
                                }
                                _ => Err(NetstringError::TooLong { max_length: self.max_length }),
                            }
                        }
                        b':' if digits > 0 => Ok(State::Payload { len: value }),
                        found if digits == 0 => Err(NetstringError::MissingLength { found }),
                        found => Err(NetstringError::MissingColon { found }),
                    };
                    match next {
                        Ok(state) => self.state = state,
                        Err(e) => return Some(Err(self.break_with(e))),
                    }
                }
                State::Payload { len } => {
                    if self.buf.len() - self.pos <= len {
                        return None;
                    }
                    let start = self.pos;
                    let end = start + len;
                    let found = self.buf[end];
                    if found != b',' {
                        return Some(Err(self.break_with(NetstringError::MissingComma { found })));
                    }
                    self.pos = end + 1;
                    self.state = State::Length { value: 0, digits: 0 };
                    return Some(Ok(&self.buf[start..end]));
                }
            }
        }
    }

    fn break_with(&mut self, e: NetstringError) -> NetstringError {
        self.state = State::Broken(e);
        self.buf = Vec::new();
        self.pos = 0;
        e
    }

    /// The error that broke the stream, if one did.
    pub fn broken(&self) -> Option<NetstringError> {
        match self.state {
            State::Broken(e) => Some(e),
            _ => None,
        }
    }

    /// How many bytes are buffered and not handed out yet.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// The longest string accepted.
    pub fn max_length(&self) -> usize {
        self.max_length
    }
}

/// `n` in decimal, written into `buf`.
pub(crate) fn format_len(mut n: usize, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

/// `string` as a netstring.
pub fn encode(string: &[u8]) -> Vec<u8> {
    let mut digits = [0; 20];
    let len = format_len(string.len(), &mut digits);
    let mut out = Vec::with_capacity(len.len() + string.len() + 2);
    out.extend_from_slice(len);
    out.push(b':');
    out.extend_from_slice(string);
    out.push(b',');
    out
}

pub(crate) struct NetstringEngine<H> {
    decoder: NetstringDecoder,
    handler: H,
}

impl<H: StringHandler + 'static> Engine for NetstringEngine<H> {
    fn connection_made(&mut self, ctl: Ctl<'_>) {
        let mut cx = StringContext { ctl, framing: Framing::Netstring };
        self.handler.connection_made(&mut cx);
    }

    fn push(&mut self, data: &[u8]) {
        self.decoder.push(data)
    }

    fn pump(&mut self, mut ctl: Ctl<'_>) {
        let NetstringEngine { decoder, handler } = self;
        while ctl.may_deliver() {
            match decoder.next_event() {
                None => break,
                Some(Ok(string)) => {
                    let mut cx = StringContext { ctl: ctl.reborrow(), framing: Framing::Netstring };
                    if let Err(failure) = handler.string_received(&mut cx, string) {
                        ctl.fail("string_received", failure);
                        break;
                    }
                }
                Some(Err(error)) => {
                    tracing::debug!(target: "braid", "broken netstring peer {:?}: {error}", ctl.transport.peer());
                    handler.peer_broken(&error);
                    ctl.transport.lose_connection();
                    break;
                }
            }
        }
    }

    fn connection_lost(&mut self, reason: Failure) {
        self.handler.connection_lost(reason)
    }
}

/// Twisted's `NetstringReceiver`: a [`Protocol`] that hands each
/// netstring to a [`StringHandler`]. See the [module docs](self).
pub struct NetstringReceiver<H: StringHandler + 'static> {
    inner: Receiver<NetstringEngine<H>>,
}

impl<H: StringHandler + 'static> NetstringReceiver<H> {
    /// A receiver accepting strings of up to [`DEFAULT_MAX_LENGTH`] bytes.
    pub fn new(handler: H) -> Self {
        Self::with_max_length(handler, DEFAULT_MAX_LENGTH)
    }

    /// A receiver accepting strings of up to `max_length` bytes.
    pub fn with_max_length(handler: H, max_length: usize) -> Self {
        let decoder = NetstringDecoder::new(max_length);
        NetstringReceiver { inner: Receiver::new(NetstringEngine { decoder, handler }) }
    }

    /// What the peer got wrong, once it sent a malformed netstring
    /// (Twisted's `brokenPeer`); `None` while it behaves, and while one of
    /// the handler's callbacks runs.
    pub fn broken_peer(&self) -> Option<NetstringError> {
        self.inner.with_engine(|e| e.decoder.broken()).flatten()
    }

    /// A handle to pause, resume or feed this receiver later.
    pub fn handle(&self) -> ReceiverHandle {
        self.inner.handle()
    }

    /// Runs `f` on the handler (`None` while one of its callbacks runs).
    pub fn with_handler<R>(&self, f: impl FnOnce(&mut H) -> R) -> Option<R> {
        self.inner.with_engine_mut(|e| f(&mut e.handler))
    }
}

impl<H: StringHandler + 'static> Protocol for NetstringReceiver<H> {
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
