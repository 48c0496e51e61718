//! Stream reads on the ring: multishot receives into one shared ring of
//! provided buffers.
//!
//! A connection that reads by completion asks once (`IORING_OP_RECV` with
//! `IORING_RECV_MULTISHOT` and buffer select); from then on the kernel posts
//! one completion per arrival, each naming a buffer it took from the
//! provided-buffer ring and filled. No buffer belongs to a connection: an
//! idle connection holds none, and the buffer goes back to the ring as soon
//! as the completion has been handed to the protocol ([`RingBuf`]'s drop).
//!
//! # Ownership of the memory the kernel writes
//!
//! The buffers and the ring of entries describing them live in allocations
//! this module owns ([`Pool`]) and never moves. A buffer is the kernel's
//! from the moment its entry is published until a completion names it;
//! then it is ours (one [`RingBuf`]) until that is dropped, which publishes
//! it again. The pool outlives every request that could write into it: the
//! poller frees it only after every receive has posted its final
//! completion, and leaks it rather than free memory a request might still
//! write (see the poller's `Drop`).
//!
//! # Growth
//!
//! The ring starts with a few buffers and gains a block more whenever the
//! kernel found it empty (`-ENOBUFS`, which ends that receive; the
//! connection re-arms it), up to a fixed maximum, so a reactor with a few
//! connections keeps a small pool and a busy one stops running dry.

use std::cell::Cell;
use std::ops::Deref;
use std::ptr::NonNull;
use std::rc::Rc;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;

/// Bytes per buffer: what one completion can carry.
pub(crate) const BUF_SIZE: usize = 64 * 1024;
/// Buffers added at a time.
const BLOCK: usize = 64;
/// The most buffers the ring ever holds (a power of two, as the kernel
/// requires of the ring's size).
const MAX_BUFS: usize = 1024;
/// The buffer group id braid registers its ring under.
pub(crate) const GROUP: u16 = 0;

/// The provided-buffer ring and its buffers.
pub(crate) struct Pool {
    /// `MAX_BUFS` entries, page-aligned, shared with the kernel.
    entries: NonNull<BufRingEntry>,
    /// One allocation of `BLOCK` buffers per block, in bid order.
    blocks: std::cell::RefCell<Vec<NonNull<u8>>>,
    /// Our copy of the ring's tail (the kernel reads the shared one).
    tail: Cell<u16>,
}

const ENTRIES_BYTES: usize = MAX_BUFS * std::mem::size_of::<BufRingEntry>();
/// Each block's buffers start this far into its mapping, so a buffer is
/// half a page off the page-aligned start the allocator's large buffers
/// also tend to have (less their header). Protocols copy out of these
/// buffers into such buffers (a write staged for sending, a line kept for
/// later); a destination a few bytes past its source modulo 4 KiB slows a
/// copy several times over (4K aliasing).
const BLOCK_SKEW: usize = 2048;
const BLOCK_BYTES: usize = BLOCK * BUF_SIZE + BLOCK_SKEW;

/// A fresh private anonymous mapping: page aligned, as the kernel wants the
/// ring, and zero pages that cost no memory until written (the allocator's
/// aligned zeroed memory would be written through at once).
fn map(len: usize) -> Option<NonNull<u8>> {
    // SAFETY: a new mapping at an address of the kernel's choosing; no
    // existing memory is touched.
    let p = unsafe {
        rustix::mm::mmap_anonymous(
            std::ptr::null_mut(),
            len,
            rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
            rustix::mm::MapFlags::PRIVATE,
        )
    };
    p.ok().and_then(|p| NonNull::new(p.cast::<u8>()))
}

/// Unmaps what [`map`] returned.
///
/// # Safety
/// `p` and `len` are a mapping made by [`map`] that nothing uses any more.
unsafe fn unmap(p: NonNull<u8>, len: usize) {
    // SAFETY: per this function's contract.
    let _ = unsafe { rustix::mm::munmap(p.as_ptr().cast(), len) };
}

impl Pool {
    /// Allocates the ring's entries (no buffers yet). Its address is what
    /// the caller registers with the kernel.
    pub fn new() -> Option<Pool> {
        let entries = map(ENTRIES_BYTES)?.cast::<BufRingEntry>();
        Some(Pool { entries, blocks: std::cell::RefCell::new(Vec::new()), tail: Cell::new(0) })
    }

    pub fn ring_addr(&self) -> u64 {
        self.entries.as_ptr() as u64
    }

    pub fn ring_entries() -> u16 {
        MAX_BUFS as u16
    }

    /// Adds a block of buffers and publishes them; false at the maximum or
    /// if memory is refused.
    pub fn grow(&self) -> bool {
        let mut blocks = self.blocks.borrow_mut();
        if (blocks.len() + 1) * BLOCK > MAX_BUFS {
            return false;
        }
        let Some(block) = map(BLOCK_BYTES) else { return false };
        let first = blocks.len() * BLOCK;
        blocks.push(block);
        drop(blocks);
        for bid in first..first + BLOCK {
            self.publish(bid as u16);
        }
        true
    }

    fn buffer(&self, bid: u16) -> *mut u8 {
        let bid = bid as usize;
        let block = self.blocks.borrow()[bid / BLOCK];
        // SAFETY: `bid` names a buffer of an existing block (bids are
        // handed out only for published buffers), so the offset stays
        // inside that block's allocation.
        unsafe { block.as_ptr().add(BLOCK_SKEW + (bid % BLOCK) * BUF_SIZE) }
    }

    /// Hands buffer `bid` to the kernel.
    fn publish(&self, bid: u16) {
        let tail = self.tail.get();
        let slot = (tail as usize) & (MAX_BUFS - 1);
        // SAFETY: `slot < MAX_BUFS`, inside the entries allocation. The
        // kernel reads entries only between its head and the published
        // tail, and this slot is past the tail, so it is ours to write.
        // The setters write the address, length and id fields, never the
        // `resv` field that doubles as the ring's tail in entry 0.
        unsafe {
            let entry = &mut *self.entries.as_ptr().add(slot);
            entry.set_addr(self.buffer(bid) as u64);
            entry.set_len(BUF_SIZE as u32);
            entry.set_bid(bid);
        }
        let next = tail.wrapping_add(1);
        self.tail.set(next);
        // SAFETY: `tail` points at entry 0's `resv` field, a properly
        // aligned u16 inside our allocation that the kernel only reads; the
        // release store makes the entry written above visible before the
        // new tail.
        unsafe {
            let shared = BufRingEntry::tail(self.entries.as_ptr()) as *mut u16;
            AtomicU16::from_ptr(shared).store(next, Ordering::Release);
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        for block in self.blocks.get_mut().drain(..) {
            // SAFETY: mapped in `grow` with this length; the poller drops
            // the pool only once no request can write into it.
            unsafe { unmap(block, BLOCK_BYTES) };
        }
        // SAFETY: mapped in `new` with this length, and unregistered (or
        // the ring destroyed) before the pool is dropped.
        unsafe { unmap(self.entries.cast::<u8>(), ENTRIES_BYTES) };
    }
}

/// Bytes a completion delivered, in a buffer lent by the ring; returned to
/// the kernel when dropped.
pub(crate) struct RingBuf {
    pool: Rc<Pool>,
    bid: u16,
    /// The bytes meant: `start..start + len` of the buffer (a message
    /// receive puts a header and control data ahead of the payload).
    start: usize,
    len: usize,
}

impl RingBuf {
    /// Takes ownership of buffer `bid`, which a completion said holds
    /// `len` bytes.
    pub(crate) fn new(pool: &Rc<Pool>, bid: u16, len: usize) -> Option<RingBuf> {
        if bid as usize >= pool.blocks.borrow().len() * BLOCK || len > BUF_SIZE {
            return None;
        }
        Some(RingBuf { pool: pool.clone(), bid, start: 0, len })
    }

    /// Narrows the bytes meant to `start..start + len` of those meant now.
    pub(crate) fn narrow(&mut self, start: usize, len: usize) {
        let start = start.min(self.len);
        self.start += start;
        self.len = len.min(self.len - start);
    }
}

impl Deref for RingBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: the completion that named `bid` gave the buffer back to
        // us; the kernel does not write it again until `drop` publishes
        // it, and the pool (kept alive by `self.pool`) never moves or frees
        // it meanwhile. The kernel wrote the first bytes, of which
        // `start..start + len` lie within them (`new` and `narrow` keep
        // that), so within the `BUF_SIZE` buffer.
        unsafe { std::slice::from_raw_parts(self.pool.buffer(self.bid).add(self.start), self.len) }
    }
}

impl Drop for RingBuf {
    fn drop(&mut self) {
        self.pool.publish(self.bid);
    }
}

/// What one receive completion brought.
pub(crate) enum Got {
    /// Bytes, and the descriptors that came with them (a message receive's
    /// `SCM_RIGHTS`; none for a plain receive).
    Data(RingBuf, Vec<std::os::fd::OwnedFd>),
    /// A connection a multishot accept took.
    Accepted(std::os::fd::OwnedFd),
    /// The peer shut down its sending side.
    Eof,
    /// The receive failed with this errno.
    Error(i32),
    /// Nothing: the receive was cancelled, or the ring had no buffer.
    Nothing,
}

/// One completion for a stream read, for the reactor to route by `key`.
pub(crate) struct Received {
    pub key: u32,
    pub got: Got,
    /// The receive is over: no more completions carry this key, and the
    /// reader must re-arm to read again.
    pub ended: bool,
}
