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
//! # Growth, and which buffer the kernel fills next
//!
//! The kernel takes published buffers in the order they were published, so
//! with every idle buffer published each receive would land in the one
//! used longest ago: a working set of every buffer, long out of cache,
//! where an epoll loop reads every time into one hot buffer. So only as
//! many buffers are published as the kernel has been seen to need at once
//! (`want`); the rest wait, most recently used on top, and a buffer handed
//! back goes straight to the kernel while it holds fewer than that. When
//! the kernel finds the ring empty (`-ENOBUFS`, which ends that receive;
//! the connection re-arms it) for a receive that got no buffer in that
//! batch of completions, `want` doubles (once per batch; the poller
//! decides), and a block of buffers more is made when none wait, up to a
//! fixed maximum: a reactor with one busy
//! connection cycles through a few buffers, and a busy one stops running
//! dry. `want` halves again after a long run of batches that each took a
//! small part of it, so a burst long past does not leave every later
//! receive landing in a cold buffer.

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
/// Buffers the kernel holds at first.
const FIRST_WANT: usize = 4;
/// Batches of completions over which the most any one took is compared
/// with `want`, to let it shrink.
const DECAY_ROUNDS: u32 = 1024;
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
    /// Buffers neither published nor lent out, the most recently used last.
    idle: std::cell::RefCell<Vec<u16>>,
    /// Buffers published and not yet named by a completion.
    published: Cell<usize>,
    /// How many the kernel should hold at once.
    want: Cell<usize>,
    /// Buffers taken in the batch of completions being reaped.
    round_taken: Cell<usize>,
    /// The most taken in one batch since `want` was last weighed, and how
    /// many batches that covers.
    peak: Cell<usize>,
    rounds: Cell<u32>,
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
        Some(Pool {
            entries,
            blocks: std::cell::RefCell::new(Vec::new()),
            tail: Cell::new(0),
            idle: std::cell::RefCell::new(Vec::new()),
            published: Cell::new(0),
            want: Cell::new(FIRST_WANT),
            round_taken: Cell::new(0),
            peak: Cell::new(0),
            rounds: Cell::new(0),
        })
    }

    pub fn ring_addr(&self) -> u64 {
        self.entries.as_ptr() as u64
    }

    pub fn ring_entries() -> u16 {
        MAX_BUFS as u16
    }

    /// Makes the first block of buffers and publishes a few; false if
    /// memory is refused.
    pub fn start(&self) -> bool {
        self.add_block() && {
            self.top_up();
            true
        }
    }

    /// The kernel found the ring empty: it gets twice as many buffers from
    /// now on (up to the maximum), from those waiting or a new block.
    pub fn ran_dry(&self) {
        self.want.set((self.want.get() * 2).min(MAX_BUFS));
        self.top_up();
    }

    /// Publishes waiting buffers, making blocks as needed, until the kernel
    /// holds `want` (or no more can be made).
    fn top_up(&self) {
        while self.published.get() < self.want.get() {
            let bid = self.idle.borrow_mut().pop();
            match bid {
                Some(bid) => self.publish(bid),
                None if self.add_block() => {}
                None => break,
            }
        }
    }

    /// Maps a block of buffers, all waiting; false at the maximum or if
    /// memory is refused.
    fn add_block(&self) -> bool {
        let mut blocks = self.blocks.borrow_mut();
        if (blocks.len() + 1) * BLOCK > MAX_BUFS {
            return false;
        }
        let Some(block) = map(BLOCK_BYTES) else { return false };
        let first = blocks.len() * BLOCK;
        blocks.push(block);
        // Reversed, so the lowest ids come off the top first.
        self.idle.borrow_mut().extend((first..first + BLOCK).rev().map(|bid| bid as u16));
        true
    }

    /// How many buffers the kernel is to hold at once.
    #[cfg(test)]
    pub(crate) fn wanted(&self) -> usize {
        self.want.get()
    }

    /// The initial [`Pool::wanted`].
    #[cfg(test)]
    pub(crate) const FIRST_WANT: usize = FIRST_WANT;

    /// A completion named `bid`: the kernel no longer holds it.
    fn taken(&self) {
        self.published.set(self.published.get().saturating_sub(1));
        self.round_taken.set(self.round_taken.get() + 1);
    }

    /// A batch of completions has been reaped. After [`DECAY_ROUNDS`] of
    /// them in which none took more than a quarter of `want`, `want`
    /// halves: the buffers the kernel holds beyond it are not published
    /// again once they come back.
    pub(crate) fn end_round(&self) {
        self.peak.set(self.peak.get().max(self.round_taken.replace(0)));
        let rounds = self.rounds.get() + 1;
        if rounds < DECAY_ROUNDS {
            self.rounds.set(rounds);
            return;
        }
        let want = self.want.get();
        if self.peak.get() * 4 <= want && want > FIRST_WANT {
            self.want.set((want / 2).max(FIRST_WANT));
        }
        self.rounds.set(0);
        self.peak.set(0);
    }

    /// Buffer `bid` is free again: to the kernel if it holds fewer than it
    /// needs, else on top of the waiting ones.
    fn give_back(&self, bid: u16) {
        if self.published.get() < self.want.get() {
            self.publish(bid);
        } else {
            self.idle.borrow_mut().push(bid);
        }
    }

    /// A completion named `bid` without bytes for us (it failed, or the
    /// stream ended): the buffer is free at once.
    pub(crate) fn reclaim(&self, bid: u16) {
        if (bid as usize) < self.blocks.borrow().len() * BLOCK {
            self.taken();
            self.give_back(bid);
        }
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
        self.published.set(self.published.get() + 1);
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
        if bid as usize >= pool.blocks.borrow().len() * BLOCK {
            return None;
        }
        pool.taken();
        if len > BUF_SIZE {
            pool.give_back(bid);
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

impl std::ops::DerefMut for RingBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as for `deref`: the buffer is ours alone until `drop`
        // publishes it, and `&mut self` makes this the only view of it.
        unsafe { std::slice::from_raw_parts_mut(self.pool.buffer(self.bid).add(self.start), self.len) }
    }
}

impl Drop for RingBuf {
    fn drop(&mut self) {
        self.pool.give_back(self.bid);
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

#[cfg(test)]
mod tests {
    use super::{Pool, RingBuf, DECAY_ROUNDS, FIRST_WANT};
    use std::rc::Rc;

    /// The kernel is not involved: a pool's ring is ordinary memory until
    /// it is registered, and completions are played by taking buffers.
    fn pool() -> Rc<Pool> {
        let pool = Pool::new().expect("mapping the ring");
        assert!(pool.start());
        Rc::new(pool)
    }

    /// Takes what a completion would: the oldest published buffer.
    fn take(pool: &Rc<Pool>, bids: &mut std::collections::VecDeque<u16>) -> RingBuf {
        let bid = bids.pop_front().expect("a published buffer");
        RingBuf::new(pool, bid, 1).expect("a buffer of the pool")
    }

    #[test]
    fn the_kernel_holds_a_few_buffers_and_gets_back_the_warmest() {
        let pool = pool();
        assert_eq!(pool.published.get(), FIRST_WANT);
        // The ring was published lowest id first.
        let mut ring: std::collections::VecDeque<u16> = (0..FIRST_WANT as u16).collect();
        let a = take(&pool, &mut ring);
        let b = take(&pool, &mut ring);
        let (a_bid, b_bid) = (a.bid, b.bid);
        drop(a);
        drop(b);
        // Handed back at once, not left for buffers never used.
        assert_eq!(pool.published.get(), FIRST_WANT);
        assert!(pool.idle.borrow().iter().all(|&bid| bid as usize >= FIRST_WANT));
        let tail = pool.tail.get() as usize;
        let last_two: Vec<u16> = (tail - 2..tail)
            .map(|slot| {
                // SAFETY: `slot % MAX_BUFS` is inside the entries allocation,
                // which this pool wrote and no kernel reads (never registered).
                unsafe { (*pool.entries.as_ptr().add(slot % super::MAX_BUFS)).bid() }
            })
            .collect();
        assert_eq!(last_two, [a_bid, b_bid]);
    }

    #[test]
    fn want_doubles_when_dry_and_halves_after_a_long_quiet() {
        let pool = pool();
        pool.ran_dry();
        pool.ran_dry();
        assert_eq!(pool.wanted(), 4 * FIRST_WANT);
        assert_eq!(pool.published.get(), 4 * FIRST_WANT);
        // Busy batches keep it.
        let mut ring: std::collections::VecDeque<u16> = (0..4 * FIRST_WANT as u16).collect();
        for round in 0..DECAY_ROUNDS {
            if round == DECAY_ROUNDS / 2 {
                let held: Vec<RingBuf> = (0..2 * FIRST_WANT).map(|_| take(&pool, &mut ring)).collect();
                pool.end_round();
                drop(held);
                continue;
            }
            pool.end_round();
        }
        assert_eq!(pool.wanted(), 4 * FIRST_WANT, "a batch that took half of it let it shrink");
        // Quiet ones halve it, down to the first size and no further.
        for _ in 0..3 * DECAY_ROUNDS {
            pool.end_round();
        }
        assert_eq!(pool.wanted(), FIRST_WANT);
    }
}
