//! The handler side shared by the string receivers: netstrings
//! ([`NetstringReceiver`](super::netstring::NetstringReceiver)) and
//! length prefixes ([`Int8StringReceiver`](super::prefixed::Int8StringReceiver)
//! and its 16- and 32-bit siblings). One [`StringHandler`] works under
//! either framing, as Twisted's `stringReceived` does; the framing only
//! changes what [`StringContext::send_string`] writes.
//!
//! The callbacks run with the receiver borrowed: a pause or close asked
//! for in one applies before the next string, and bytes fed through a
//! [`ReceiverHandle`](super::receiver::ReceiverHandle) meanwhile are only
//! buffered (see [`receiver`](super::receiver)).

use std::fmt;

use crate::error::Failure;
use crate::protocols::netstring;
use crate::protocols::prefixed::PrefixWidth;
use crate::protocols::receiver::{common_context_methods, Ctl};

/// Your side of a string receiver: what to do with each string.
///
/// An `Err` from `string_received` is logged and aborts the connection.
pub trait StringHandler {
    /// The connection is up.
    fn connection_made(&mut self, cx: &mut StringContext<'_>) {
        let _ = cx;
    }

    /// A complete string arrived.
    fn string_received(&mut self, cx: &mut StringContext<'_>, string: &[u8]) -> Result<(), Failure>;

    /// Length-prefixed receivers only: the peer announced a string of
    /// `length` bytes, more than the receiver's `max_length`. The string
    /// is never delivered and nothing after it is parsed (the stream can
    /// no longer be trusted). The default closes the connection.
    fn length_limit_exceeded(&mut self, cx: &mut StringContext<'_>, length: usize) {
        let _ = length;
        cx.lose_connection();
    }

    /// Netstring receivers only: the peer sent a malformed netstring. The
    /// receiver has already marked the peer broken and is closing the
    /// connection; this is for logging or counting.
    fn peer_broken(&mut self, error: &netstring::NetstringError) {
        let _ = error;
    }

    /// The connection is gone.
    fn connection_lost(&mut self, reason: Failure) {
        let _ = reason;
    }
}

/// How strings are framed on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Framing {
    Netstring,
    Prefixed(PrefixWidth),
}

/// `send_string` of a string longer than its length prefix can encode
/// (Twisted's `StringTooLongError`); nothing was sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StringTooLong {
    /// The length of the refused string.
    pub len: usize,
    /// The longest string the prefix can encode.
    pub limit: usize,
}

impl fmt::Display for StringTooLong {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a string of {} bytes is too long for its length prefix (at most {})", self.len, self.limit)
    }
}

impl std::error::Error for StringTooLong {}

/// The receiver as seen from inside a [`StringHandler`] callback.
pub struct StringContext<'a> {
    pub(crate) ctl: Ctl<'a>,
    pub(crate) framing: Framing,
}

impl StringContext<'_> {
    common_context_methods!();

    /// Sends `string` framed the receiver's way: as a netstring, or after
    /// its length prefix. A length prefix too narrow for it refuses it.
    pub fn send_string(&self, string: &[u8]) -> Result<(), StringTooLong> {
        let t = self.ctl.transport;
        match self.framing {
            Framing::Netstring => {
                let mut digits = [0; 20];
                let len = netstring::format_len(string.len(), &mut digits);
                t.write_sequence(&[len, b":", string, b","]);
            }
            Framing::Prefixed(width) => {
                let (prefix, n) = width.encode(string.len())?;
                t.write_sequence(&[&prefix[..n], string]);
            }
        }
        Ok(())
    }
}
