//! Stream sends on the ring: one send request per socket at a time, whose
//! memory the poller holds until the kernel says it is done with it.
//!
//! A connection that writes by completion hands its queued chunks over
//! ([`Outgoing`]): they move into the poller, which points a send request
//! at them (`IORING_OP_SEND` for one chunk, `IORING_OP_SENDMSG` with an
//! iovec per chunk for several), and they come back with the completion
//! ([`Sent`]), which says how many bytes went. The connection puts any
//! unsent rest back at the front of its queue, ahead of what was written
//! meanwhile, and sends again: bytes never reorder, and writes made while
//! a send is in the kernel are gathered into the next one.
//!
//! # Ownership of the memory the kernel reads
//!
//! From submission to completion the chunks, the iovecs and the message
//! header belong to the poller ([`InFlight`], boxed so that nothing moves),
//! and nothing else can reach them: the connection holds no reference.
//! A connection that closes meanwhile only cancels the request; the memory
//! is freed when the cancelled request's completion comes back, and the
//! poller's `Drop` waits for every request to finish (or leaks what never
//! does) rather than free memory the kernel may still read.

use std::collections::VecDeque;

/// The chunks of one send, the first partly sent already. The first is
/// held inline: most sends are one chunk, and then no queue is allocated.
#[derive(Default)]
pub(crate) struct Outgoing {
    pub first: Vec<u8>,
    pub rest: VecDeque<Vec<u8>>,
    /// Bytes of `first` already sent.
    pub head: usize,
}

impl Outgoing {
    /// The bytes still to send.
    pub fn len(&self) -> usize {
        self.first.len() - self.head + self.rest.iter().map(Vec::len).sum::<usize>()
    }

    /// The unsent bytes, chunk by chunk.
    pub fn slices(&self) -> impl Iterator<Item = &[u8]> {
        std::iter::once(&self.first[self.head..]).chain(self.rest.iter().map(Vec::as_slice))
    }

    /// Drops the first `n` bytes (sent). Returns the first chunk that was
    /// sent whole, cleared, so the caller can reuse its memory.
    pub fn consume(&mut self, mut n: usize) -> Option<Vec<u8>> {
        let mut spare = None;
        while n > 0 {
            let left = self.first.len() - self.head;
            if n < left {
                self.head += n;
                break;
            }
            n -= left;
            self.head = 0;
            let mut done = std::mem::replace(&mut self.first, self.rest.pop_front().unwrap_or_default());
            if spare.is_none() {
                done.clear();
                spare = Some(done);
            }
            if self.first.is_empty() && self.rest.is_empty() {
                break;
            }
        }
        spare
    }
}

/// A send in the kernel: the memory its request points at. Boxes are
/// reused from send to send.
#[derive(Default)]
pub(super) struct InFlight {
    pub out: Outgoing,
    /// One per chunk (a multi-chunk send's `msg` points here).
    pub iov: Vec<libc::iovec>,
    pub msg: Option<libc::msghdr>,
}

impl InFlight {
    /// Takes `out` and points the iovecs (and the message header, for more
    /// than one chunk) at its chunks.
    pub fn fill(&mut self, out: Outgoing) {
        self.out = out;
        self.iov.clear();
        for c in self.out.slices() {
            self.iov.push(libc::iovec { iov_base: c.as_ptr() as *mut libc::c_void, iov_len: c.len() });
        }
        self.msg = None;
        if self.iov.len() > 1 {
            // SAFETY: msghdr is a plain C struct for which all zeroes is a
            // valid value (no address, no control data, no flags).
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = self.iov.as_mut_ptr();
            msg.msg_iovlen = self.iov.len() as _;
            self.msg = Some(msg);
        }
    }
}

/// One send's completion, for the reactor to route by `key`.
pub(crate) struct Sent {
    pub key: u32,
    /// Bytes sent, or the errno the send failed with (`ECANCELED` when it
    /// was cancelled before it sent anything).
    pub result: Result<usize, i32>,
    /// The chunks, back from the kernel.
    pub out: Outgoing,
}
