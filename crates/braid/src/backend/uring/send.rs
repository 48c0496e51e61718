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

/// The chunks of one send, the first partly sent already.
#[derive(Default)]
pub(crate) struct Outgoing {
    pub chunks: VecDeque<Vec<u8>>,
    /// Bytes of the first chunk already sent.
    pub head: usize,
}

impl Outgoing {
    /// The bytes still to send.
    pub fn len(&self) -> usize {
        self.chunks.iter().map(Vec::len).sum::<usize>() - self.head
    }

    /// Drops the first `n` bytes (sent). Fully sent chunks are cleared and
    /// kept at the back, so the caller can reuse their memory.
    pub fn consume(&mut self, mut n: usize) -> Vec<Vec<u8>> {
        let mut done = Vec::new();
        while n > 0 {
            let Some(first) = self.chunks.front() else { break };
            let left = first.len() - self.head;
            if n < left {
                self.head += n;
                break;
            }
            n -= left;
            self.head = 0;
            if let Some(mut chunk) = self.chunks.pop_front() {
                chunk.clear();
                done.push(chunk);
            }
        }
        done
    }
}

/// A send in the kernel: the memory its request points at.
pub(super) struct InFlight {
    pub out: Outgoing,
    /// One per chunk (a multi-chunk send's `msg` points here).
    pub iov: Vec<libc::iovec>,
    pub msg: libc::msghdr,
}

impl InFlight {
    pub fn new(out: Outgoing) -> Box<InFlight> {
        let iov = out
            .chunks
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let skip = if i == 0 { out.head } else { 0 };
                libc::iovec { iov_base: c[skip..].as_ptr() as *mut libc::c_void, iov_len: c.len() - skip }
            })
            .collect::<Vec<_>>();
        // SAFETY: msghdr is a plain C struct for which all zeroes is a
        // valid value (no address, no control data, no flags).
        let msg: libc::msghdr = unsafe { std::mem::zeroed() };
        let mut flight = Box::new(InFlight { out, iov, msg });
        // The iovecs' heap memory does not move with the box.
        let iov = flight.iov.as_mut_ptr();
        flight.msg.msg_iov = iov;
        flight.msg.msg_iovlen = flight.iov.len() as _;
        flight
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
