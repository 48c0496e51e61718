//! The timer queue behind `call_later`.
//!
//! Deadlines are nanoseconds since the owning clock's origin. Entries with
//! equal deadlines come out in insertion order (each insert and each
//! reschedule takes the next sequence number).
//!
//! # Design
//!
//! Entries live in a slab and are named by their index ([`TimerId`]). The
//! queue orders *items*, small copies of `(deadline, seq, index)`:
//!
//! * Time is cut into ticks of 2^16 ns (65.5 µs). A hierarchical wheel of 8
//!   levels of 64 slots holds the items not yet due; a slot at level `l`
//!   spans 64^l ticks, so the levels cover every `u64` deadline. An item
//!   lives at the level of the highest 6-bit digit in which its tick differs
//!   from the wheel's origin tick, in the slot named by that digit, so
//!   everything at level `l` is earlier than everything at level `l + 1`.
//! * A slot is a plain vector (schedule is a push). Only the *front* slot,
//!   which holds the earliest items, is kept in 4-ary heap order, so
//!   `next_deadline` is exact.
//! * Items whose tick has been reached sit in `run`, a sorted vector filled
//!   a whole level-0 slot at a time (one `sort_unstable` per slot; firing
//!   is a cursor walk), or in `late`, a heap for items scheduled into the
//!   past or the current tick.
//!
//! **Cancelling is lazy.** The entry records the sequence number of the
//! item that stands for it (`queued`); cancel just clears that, turning the
//! item into a tombstone, which costs one write to the entry and touches no
//! container. (Finding and unlinking the item at once would cost one or
//! two cache misses per cancel at a random place in a large queue: the
//! profile of the eager version spent most of its cancel time there.)
//! Tombstones are dropped when they reach the front: firing reads the
//! entry anyway, and `next_deadline` pops stale heads. So that they never
//! pile up, a sweep removes them all once they outnumber twice the pending
//! entries (plus a floor), which keeps memory within a constant factor of
//! what is pending and costs O(1) amortized per cancel.
//!
//! **Postponing is lazy too.** Moving an entry later only rewrites its
//! deadline; the old item surfaces at its old time and is put back at the
//! new one. Network timeouts are reset on every message and almost always
//! later, so a reset is usually a couple of stores. Moving earlier adds a
//! new item and leaves the old one as a tombstone.
//!
//! A slab entry stays allocated after it has fired or been cancelled until
//! the owner calls [`TimerQueue::release`], so an owner can keep per-entry
//! state (the reactor keeps the call's fate for its handles) and ids are
//! never reused under it. Because sequence numbers are never reused, a
//! tombstone can never be mistaken for a later entry in the same slot.

use std::cmp::Ordering;

use crate::sys::big_vec::BigVec;
use crate::sys::prefetch::prefetch_read;

/// Names an entry of a [`TimerQueue`] until it is released.
pub(crate) type TimerId = u32;

/// log2 of the tick length in nanoseconds (65.536 µs).
const TICK_SHIFT: u32 = 16;
const LEVEL_BITS: u32 = 6;
const SLOTS: usize = 1 << LEVEL_BITS;
const SLOT_MASK: u64 = SLOTS as u64 - 1;
/// Enough levels to cover every tick of a `u64` deadline.
const LEVELS: usize = (64 - TICK_SHIFT).div_ceil(LEVEL_BITS) as usize;
const MAX_TICK: u64 = u64::MAX >> TICK_SHIFT;
const ARITY: usize = 4;

/// The place of an item that goes to the `late` heap rather than a slot.
const LATE: u32 = u32::MAX;
/// End of the free list.
const NONE: u32 = u32::MAX;
/// `Entry::queued` of an entry that is not pending.
const DONE: u64 = u64::MAX;

/// Vectors larger than this (in items) are released rather than kept for
/// reuse once emptied.
const KEEP_CAPACITY: usize = 1024;
/// A slab at least this long is released when the queue holds nothing.
const RESET_SLAB_LEN: usize = 4096;
/// Tombstones are swept once there are more than twice the pending entries
/// plus this many.
const SWEEP_FLOOR: usize = 1024;

/// Packed to 20 bytes: millions of these are written when scheduling, and
/// every byte is memory the kernel must fault in and zero.
#[derive(Clone, Copy, Debug)]
#[repr(C, packed(4))]
struct Item {
    deadline: u64,
    seq: u64,
    index: u32,
}

impl Item {
    /// The order of entries: deadline, then sequence number, as one integer
    /// (branch-free comparisons).
    #[inline]
    fn key(&self) -> u128 {
        (self.deadline as u128) << 64 | self.seq as u128
    }
}

struct Entry<T> {
    /// When the entry is due (its latest schedule).
    deadline: u64,
    /// Its order among equal deadlines (its latest schedule).
    seq: u64,
    /// The sequence number of the item that stands for it in a container,
    /// or `DONE`. Behind `(deadline, seq)` after a lazy postpone.
    queued: u64,
    /// For a vacant entry, the next free index.
    next_free: u32,
    /// `None` while vacant.
    value: Option<T>,
}

/// What an item found in a container means now.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Status {
    /// Its entry is gone, done, or has a newer item elsewhere.
    Stale,
    /// Its entry was moved later: put it back at the entry's deadline.
    Postponed,
    Live,
}

#[inline]
fn status<T>(slab: &[Entry<T>], item: &Item) -> Status {
    match slab.get(item.index as usize) {
        Some(entry) if entry.queued == item.seq => {
            if entry.seq == item.seq {
                Status::Live
            } else {
                Status::Postponed
            }
        }
        _ => Status::Stale,
    }
}

pub(crate) struct TimerQueue<T> {
    slab: BigVec<Entry<T>>,
    free: u32,
    /// Slab entries holding a value (pending or waiting for `release`).
    allocated: usize,
    /// Pending entries.
    live: usize,
    /// Tombstones still in containers.
    stale: usize,
    seq: u64,
    slots: Vec<BigVec<Item>>,
    /// Per level, which slots hold items.
    occupied: [u64; LEVELS],
    /// Per level, which slots are kept in heap order. Only the front slot
    /// (the first occupied slot of the lowest occupied level) has to be.
    ordered: [u64; LEVELS],
    /// The wheel's origin tick: every wheel item has a tick `>= bound >=
    /// origin`, placed relative to `origin`.
    origin: u64,
    /// Ticks below this are due: their items are in `run` or `late`.
    bound: u64,
    run: BigVec<Item>,
    run_head: usize,
    late: BigVec<Item>,
}

impl<T> Default for TimerQueue<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> TimerQueue<T> {
    pub fn new() -> Self {
        TimerQueue {
            slab: BigVec::new(),
            free: NONE,
            allocated: 0,
            live: 0,
            stale: 0,
            seq: 0,
            slots: (0..LEVELS * SLOTS).map(|_| BigVec::new()).collect(),
            occupied: [0; LEVELS],
            ordered: [0; LEVELS],
            origin: 0,
            bound: 0,
            run: BigVec::new(),
            run_head: 0,
            late: BigVec::new(),
        }
    }

    /// Adds an entry due at `deadline`; takes the next sequence number.
    pub fn insert(&mut self, deadline: u64, value: T) -> TimerId {
        let seq = self.take_seq();
        let index = self.alloc(deadline, seq, value);
        self.live += 1;
        self.push(Item { deadline, seq, index });
        index
    }

    /// Unschedules a pending entry and returns its value; `None` if it is
    /// not pending. The entry stays allocated until released.
    pub fn cancel(&mut self, id: TimerId) -> Option<&mut T> {
        let entry = self.pending_entry(id)?;
        entry.queued = DONE;
        self.live -= 1;
        self.stale += 1;
        self.maybe_sweep();
        self.slab[id as usize].value.as_mut()
    }

    /// Moves a pending entry to `deadline` and gives it a fresh sequence
    /// number; false if it is not pending.
    pub fn reschedule(&mut self, id: TimerId, deadline: u64) -> bool {
        let Some(current) = self.pending_entry(id).map(|e| e.deadline) else {
            return false;
        };
        let seq = self.take_seq();
        let entry = &mut self.slab[id as usize];
        entry.deadline = deadline;
        entry.seq = seq;
        if deadline < current {
            // Earlier than the item in the queue: it must be replaced.
            entry.queued = seq;
            self.stale += 1;
            self.push(Item { deadline, seq, index: id });
            self.maybe_sweep();
        }
        // Later (or equal: the new sequence number sorts after the old):
        // the item surfaces first and is then moved.
        true
    }

    /// The deadline of a pending entry.
    pub fn deadline(&self, id: TimerId) -> Option<u64> {
        let entry = self.slab.get(id as usize)?;
        (entry.value.is_some() && entry.queued != DONE).then_some(entry.deadline)
    }

    /// Where a pending entry stands in firing order: its deadline, then its
    /// sequence number (distinct for every pending entry).
    pub fn order_key(&self, id: TimerId) -> Option<(u64, u64)> {
        let entry = self.slab.get(id as usize)?;
        (entry.value.is_some() && entry.queued != DONE).then_some((entry.deadline, entry.seq))
    }

    /// The value of an allocated entry (pending, or fired/cancelled and not
    /// yet released).
    pub fn get_mut(&mut self, id: TimerId) -> Option<&mut T> {
        self.slab.get_mut(id as usize)?.value.as_mut()
    }

    /// Frees an entry (cancelling it first if it is still pending) and
    /// returns its value; its id may then be reused.
    pub fn release(&mut self, id: TimerId) -> Option<T> {
        self.cancel(id);
        let entry = self.slab.get_mut(id as usize)?;
        let value = entry.value.take()?;
        entry.next_free = self.free;
        self.free = id;
        self.allocated -= 1;
        if self.allocated == 0 {
            self.reset();
        }
        Some(value)
    }

    /// The earliest deadline, if any entry is pending. Drops stale items and
    /// moves postponed ones it meets at the front.
    pub fn next_deadline(&mut self) -> Option<u64> {
        loop {
            if let Some((item, from_run)) = self.due_top() {
                match status(&self.slab, &item) {
                    Status::Live => return Some(item.deadline),
                    Status::Stale => self.drop_stale_due(from_run),
                    Status::Postponed => {
                        self.drop_due_top(from_run);
                        self.requeue(item.index);
                    }
                }
                continue;
            }
            // Nothing due: the earliest item is the top of the front slot.
            let level = self.occupied.iter().position(|&bits| bits != 0)?;
            let slot = self.occupied[level].trailing_zeros() as usize;
            debug_assert!(self.ordered[level] & (1 << slot) != 0);
            let id = level * SLOTS + slot;
            let top = self.slots[id][0];
            let status = status(&self.slab, &top);
            if status == Status::Live {
                return Some(top.deadline);
            }
            heap_pop(&mut self.slots[id]);
            if self.slots[id].is_empty() {
                self.occupied[level] &= !(1 << slot);
                self.ordered[level] &= !(1 << slot);
                self.slots[id] = recycle(std::mem::take(&mut self.slots[id]));
            }
            if status == Status::Stale {
                self.stale -= 1;
            } else {
                self.requeue(top.index);
            }
            self.order_front();
        }
    }

    /// The sequence number the next insert/reschedule will take.
    pub fn next_seq(&self) -> u64 {
        self.seq
    }

    /// Takes the earliest pending entry out of the queue if its deadline is
    /// `<= now` and its sequence number is `< seq_limit` (entries added
    /// during a firing pass wait for the next pass). The entry stays
    /// allocated until released.
    pub fn pop_due(&mut self, now: u64, seq_limit: u64) -> Option<TimerId> {
        let now_tick = now >> TICK_SHIFT;
        if now_tick >= self.bound {
            self.advance(now_tick);
            self.order_front();
        }
        loop {
            let (item, from_run) = self.due_top()?;
            match status(&self.slab, &item) {
                Status::Stale => self.drop_stale_due(from_run),
                Status::Postponed => {
                    self.drop_due_top(from_run);
                    self.requeue(item.index);
                }
                Status::Live => {
                    if item.deadline > now || item.seq >= seq_limit {
                        return None;
                    }
                    self.drop_due_top(from_run);
                    self.slab[item.index as usize].queued = DONE;
                    self.live -= 1;
                    return Some(item.index);
                }
            }
        }
    }

    /// Hints the CPU to fetch the entry of the item `ahead` places into the
    /// run (the order `pop_due` will most likely follow). Firing walks the
    /// run in deadline order, a random order over the slab; fetching ahead
    /// overlaps the cache misses.
    #[inline]
    pub fn prefetch_upcoming(&self, ahead: usize) {
        if let Some(item) = self.run.get(self.run_head + ahead) {
            let entry = self.slab.as_ptr().wrapping_add(item.index as usize);
            // An entry may straddle two cache lines.
            prefetch_read(entry);
            prefetch_read(entry.cast::<u8>().wrapping_add(std::mem::size_of::<Entry<T>>() - 1));
        }
    }

    /// The value of the item `ahead` places into the run, live or not.
    #[inline]
    pub fn upcoming(&self, ahead: usize) -> Option<&T> {
        let item = self.run.get(self.run_head + ahead)?;
        self.slab.get(item.index as usize)?.value.as_ref()
    }

    /// How many entries are pending.
    pub fn len(&self) -> usize {
        self.live
    }

    /// How many entries are allocated (pending, or done and not released).
    #[allow(dead_code)]
    pub fn allocated(&self) -> usize {
        self.allocated
    }

    #[allow(dead_code)]
    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Every pending entry with its deadline, in no particular order.
    pub fn pending(&self) -> impl Iterator<Item = (TimerId, u64)> + '_ {
        self.slab.iter().enumerate().filter_map(|(index, entry)| {
            (entry.value.is_some() && entry.queued != DONE).then_some((index as TimerId, entry.deadline))
        })
    }

    // ----- internals -----

    fn take_seq(&mut self) -> u64 {
        let seq = self.seq;
        self.seq += 1;
        seq
    }

    fn pending_entry(&mut self, id: TimerId) -> Option<&mut Entry<T>> {
        self.slab.get_mut(id as usize).filter(|e| e.value.is_some() && e.queued != DONE)
    }

    fn alloc(&mut self, deadline: u64, seq: u64, value: T) -> u32 {
        self.allocated += 1;
        if self.free != NONE {
            let index = self.free;
            let entry = &mut self.slab[index as usize];
            self.free = entry.next_free;
            *entry = Entry { deadline, seq, queued: seq, next_free: NONE, value: Some(value) };
            return index;
        }
        let index = u32::try_from(self.slab.len())
            .ok()
            .filter(|&i| i != NONE)
            .expect("timer queue: more than 2^32 - 1 entries");
        self.slab.push(Entry { deadline, seq, queued: seq, next_free: NONE, value: Some(value) });
        index
    }

    /// Nothing is allocated, so every item left is a tombstone: drop them
    /// all, and give a large slab's memory back.
    fn reset(&mut self) {
        self.sweep(false);
        if self.slab.len() >= RESET_SLAB_LEN {
            self.slab = BigVec::new();
            self.free = NONE;
        }
    }

    /// Puts a postponed entry's item back at the entry's deadline.
    fn requeue(&mut self, index: u32) {
        let entry = &mut self.slab[index as usize];
        entry.queued = entry.seq;
        let item = Item { deadline: entry.deadline, seq: entry.seq, index };
        self.push(item);
    }

    /// Where an item due at `deadline` belongs now: `LATE` or a wheel slot.
    #[inline]
    fn place_for(&self, deadline: u64) -> u32 {
        let tick = deadline >> TICK_SHIFT;
        if tick < self.bound {
            return LATE;
        }
        // The highest differing digit picks the level; `| SLOT_MASK` makes
        // ticks that differ only in the lowest digit land on level 0.
        let diff = (tick ^ self.origin) | SLOT_MASK;
        let level = (63 - diff.leading_zeros()) / LEVEL_BITS;
        let slot = (tick >> (level * LEVEL_BITS)) & SLOT_MASK;
        level * SLOTS as u32 + slot as u32
    }

    /// Puts an item where it belongs, keeping the front in heap order.
    #[inline]
    fn push(&mut self, item: Item) {
        let place = self.place_for(item.deadline);
        self.push_quiet(place, item);
        if place != LATE && self.slots[place as usize].len() == 1 {
            // A slot filled up from empty: it may be the new front.
            self.order_front();
        }
    }

    /// `push` to a known place without checking the front (for bulk moves,
    /// which call `order_front` when done).
    #[inline]
    fn push_quiet(&mut self, place: u32, item: Item) {
        if place == LATE {
            self.late.push(item);
            let at = self.late.len() - 1;
            sift_up(&mut self.late, at);
            return;
        }
        let (level, slot) = split(place);
        self.occupied[level] |= 1 << slot;
        let items = &mut self.slots[place as usize];
        items.push(item);
        // Scheduling appends to dozens of slots at once, more streams than
        // the CPU's own prefetcher follows: fetch this slot's next line.
        prefetch_read(items.as_ptr().wrapping_add(items.len() + 64 / std::mem::size_of::<Item>()));
        if self.ordered[level] & (1 << slot) != 0 {
            let at = items.len() - 1;
            sift_up(items, at);
        }
    }

    /// Puts the front slot into heap order if it is not already.
    fn order_front(&mut self) {
        let Some(level) = self.occupied.iter().position(|&bits| bits != 0) else {
            return;
        };
        let slot = self.occupied[level].trailing_zeros();
        if self.ordered[level] & (1 << slot) != 0 {
            return;
        }
        self.ordered[level] |= 1 << slot;
        heapify(&mut self.slots[level * SLOTS + slot as usize]);
    }

    /// The earliest item that is due (in `run` or `late`), stale or not,
    /// and whether it is the head of the run.
    #[inline]
    fn due_top(&self) -> Option<(Item, bool)> {
        match (self.run.get(self.run_head), self.late.first()) {
            (Some(run), Some(late)) => {
                Some(if run.key() < late.key() { (*run, true) } else { (*late, false) })
            }
            (Some(run), None) => Some((*run, true)),
            (None, Some(late)) => Some((*late, false)),
            (None, None) => None,
        }
    }

    fn drop_due_top(&mut self, from_run: bool) {
        if from_run {
            self.run_head += 1;
            if self.run_head == self.run.len() {
                self.run_head = 0;
                self.run.clear();
                self.run = recycle(std::mem::take(&mut self.run));
            }
        } else {
            heap_pop(&mut self.late);
        }
    }

    fn drop_stale_due(&mut self, from_run: bool) {
        self.drop_due_top(from_run);
        self.stale -= 1;
    }

    fn maybe_sweep(&mut self) {
        if self.stale > 2 * self.live + SWEEP_FLOOR {
            self.sweep(true);
        }
    }

    /// Removes every tombstone from every container (with `keep_live`
    /// false, every item), letting go of the room of emptied containers.
    fn sweep(&mut self, keep_live: bool) {
        let slab = &self.slab;
        let keep = |item: &Item| keep_live && status(slab, item) != Status::Stale;
        for level in 0..LEVELS {
            let mut bits = self.occupied[level];
            while bits != 0 {
                let slot = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                let items = &mut self.slots[level * SLOTS + slot];
                items.retain(keep);
                if items.is_empty() {
                    self.occupied[level] &= !(1 << slot);
                    self.ordered[level] &= !(1 << slot);
                    *items = recycle(std::mem::take(items));
                } else if self.ordered[level] & (1 << slot) != 0 {
                    heapify(items);
                }
            }
        }
        self.late.retain(keep);
        heapify(&mut self.late);
        self.run.remove_front(self.run_head);
        self.run_head = 0;
        self.run.retain(keep);
        for items in [&mut self.late, &mut self.run] {
            if items.is_empty() {
                *items = recycle(std::mem::take(items));
            }
        }
        self.stale = 0;
        self.order_front();
    }

    /// Makes every item with a tick `<= now_tick` due.
    fn advance(&mut self, now_tick: u64) {
        while let Some(level) = self.occupied.iter().position(|&bits| bits != 0) {
            let slot = self.occupied[level].trailing_zeros() as u64;
            let shift = level as u32 * LEVEL_BITS;
            let span = 1u64 << (shift + LEVEL_BITS);
            let start = (self.origin & !(span - 1)) | (slot << shift);
            if start > now_tick {
                break;
            }
            // Nothing is queued before `start`: jump there. That enters
            // this slot, which cascades down to level 0.
            self.set_origin(start);
            self.drain_origin_slot();
        }
        if now_tick >= MAX_TICK {
            // Every tick has been reached: the wheel is empty and all later
            // inserts are due at once.
            debug_assert!(self.occupied.iter().all(|&bits| bits == 0));
            self.origin = MAX_TICK;
            self.bound = MAX_TICK + 1;
        } else {
            self.set_origin(now_tick + 1);
        }
    }

    /// Moves the origin forward to `origin`, which must not be later than
    /// any wheel item. Slots the origin enters are cascaded to lower
    /// levels, highest first. Tombstones move along unexamined: looking up
    /// their entries would cost more than carrying them.
    fn set_origin(&mut self, origin: u64) {
        debug_assert!(origin >= self.bound);
        self.origin = origin;
        self.bound = origin;
        for level in (1..LEVELS).rev() {
            let slot = (origin >> (level as u32 * LEVEL_BITS)) & SLOT_MASK;
            if self.occupied[level] & (1 << slot) == 0 {
                continue;
            }
            self.occupied[level] &= !(1 << slot);
            self.ordered[level] &= !(1 << slot);
            let id = level * SLOTS + slot as usize;
            let mut items = std::mem::take(&mut self.slots[id]);
            for &item in items.iter() {
                let place = self.place_for(item.deadline);
                debug_assert!((place as usize) < level * SLOTS);
                self.push_quiet(place, item);
            }
            items.clear();
            self.slots[id] = recycle(items);
        }
    }

    /// Makes the level-0 slot of the origin tick due: sorts it onto the
    /// end of the run (everything already there is earlier).
    fn drain_origin_slot(&mut self) {
        self.bound = self.origin + 1;
        let slot = (self.origin & SLOT_MASK) as usize;
        if self.occupied[0] & (1 << slot) == 0 {
            return;
        }
        self.occupied[0] &= !(1 << slot);
        self.ordered[0] &= !(1 << slot);
        let mut items = std::mem::take(&mut self.slots[slot]);
        items.sort_unstable_by_key(Item::key);
        if self.run_head > 0 && self.run_head * 2 >= self.run.len() {
            // Drop the consumed prefix before it grows.
            self.run.remove_front(self.run_head);
            self.run_head = 0;
        }
        if self.run.is_empty() {
            std::mem::swap(&mut self.run, &mut items);
        } else {
            self.run.extend_from_slice(&items);
            items.clear();
        }
        self.slots[slot] = recycle(items);
    }
}

/// The level and slot of a wheel place.
#[inline]
fn split(place: u32) -> (usize, u32) {
    (place as usize / SLOTS, place % SLOTS as u32)
}

/// Keeps an emptied vector's buffer for reuse unless it is large.
fn recycle(items: BigVec<Item>) -> BigVec<Item> {
    debug_assert!(items.is_empty());
    if items.capacity() > KEEP_CAPACITY {
        BigVec::new()
    } else {
        items
    }
}

#[inline]
fn less(a: &Item, b: &Item) -> bool {
    a.key().cmp(&b.key()) == Ordering::Less
}

/// Moves `heap[pos]` up to its place.
#[inline]
fn sift_up(heap: &mut [Item], mut pos: usize) {
    let item = heap[pos];
    while pos > 0 {
        let parent = (pos - 1) / ARITY;
        if !less(&item, &heap[parent]) {
            break;
        }
        heap[pos] = heap[parent];
        pos = parent;
    }
    heap[pos] = item;
}

/// Moves `heap[pos]` down to its place.
#[inline]
fn sift_down(heap: &mut [Item], mut pos: usize) {
    let item = heap[pos];
    let len = heap.len();
    loop {
        let first = pos * ARITY + 1;
        if first >= len {
            break;
        }
        let mut best = first;
        for child in first + 1..(first + ARITY).min(len) {
            if less(&heap[child], &heap[best]) {
                best = child;
            }
        }
        if !less(&heap[best], &item) {
            break;
        }
        heap[pos] = heap[best];
        pos = best;
    }
    heap[pos] = item;
}

/// Puts a whole vector into heap order.
fn heapify(heap: &mut [Item]) {
    if heap.len() > 1 {
        for pos in (0..=(heap.len() - 2) / ARITY).rev() {
            sift_down(heap, pos);
        }
    }
}

/// Removes the top of a heap.
fn heap_pop(heap: &mut BigVec<Item>) {
    let last = heap.pop().expect("timer queue: pop from an empty heap");
    if !heap.is_empty() {
        heap[0] = last;
        sift_down(heap, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, HashMap};

    const MS: u64 = 1_000_000;
    const SEC: u64 = 1_000_000_000;

    impl<T> TimerQueue<T> {
        /// Every item in every container, with where it is.
        fn all_items(&self) -> Vec<(Option<u32>, Item)> {
            let mut out = Vec::new();
            for (id, items) in self.slots.iter().enumerate() {
                out.extend(items.iter().map(|&item| (Some(id as u32), item)));
            }
            out.extend(self.late.iter().map(|&item| (None, item)));
            out.extend(self.run[self.run_head..].iter().map(|&item| (None, item)));
            out
        }

        /// Checks every structural invariant; panics on the first broken one.
        fn check(&self) {
            let allocated = self.slab.iter().filter(|e| e.value.is_some()).count();
            assert_eq!(allocated, self.allocated, "allocated");
            let pending = self.slab.iter().filter(|e| e.value.is_some() && e.queued != DONE).count();
            assert_eq!(pending, self.live, "live");
            // Free list: every entry on it is vacant, no cycles.
            let mut free = self.free;
            let mut seen = 0;
            while free != NONE {
                assert!(self.slab[free as usize].value.is_none());
                free = self.slab[free as usize].next_free;
                seen += 1;
                assert!(seen <= self.slab.len(), "free list cycle");
            }
            assert_eq!(seen, self.slab.len() - allocated, "every vacant entry is on the free list");
            assert!(self.origin <= self.bound && self.bound <= MAX_TICK + 1);

            // Each pending entry has exactly one item, never later than it.
            let items = self.all_items();
            let mut stale = 0;
            let mut found = vec![0; self.slab.len()];
            for &(_, item) in &items {
                match status(&self.slab, &item) {
                    Status::Stale => stale += 1,
                    _ => {
                        found[item.index as usize] += 1;
                        let entry = &self.slab[item.index as usize];
                        assert!(item.deadline <= entry.deadline && item.seq <= entry.seq);
                        assert!(entry.value.is_some());
                    }
                }
            }
            assert_eq!(stale, self.stale, "tombstone count");
            for (index, entry) in self.slab.iter().enumerate() {
                let expected = usize::from(entry.value.is_some() && entry.queued != DONE);
                assert_eq!(found[index], expected, "entry {index} has one item");
            }
            assert!(self.stale <= 2 * self.live + SWEEP_FLOOR, "tombstones bounded");

            let front = self
                .occupied
                .iter()
                .position(|&bits| bits != 0)
                .map(|level| (level, self.occupied[level].trailing_zeros()));
            for level in 0..LEVELS {
                assert_eq!(self.ordered[level] & !self.occupied[level], 0);
                for slot in 0..SLOTS as u32 {
                    let items = &self.slots[level * SLOTS + slot as usize];
                    let bit = 1u64 << slot;
                    assert_eq!(self.occupied[level] & bit != 0, !items.is_empty());
                    if self.ordered[level] & bit != 0 {
                        assert_heap(items);
                    }
                    if front == Some((level, slot)) {
                        assert!(self.ordered[level] & bit != 0, "front slot in heap order");
                    }
                    let place = (level * SLOTS) as u32 + slot;
                    for item in items {
                        assert!(item.deadline >> TICK_SHIFT >= self.bound);
                        assert_eq!(self.place_for(item.deadline), place, "placement");
                    }
                }
            }
            assert_heap(&self.late);
            for item in &self.late {
                assert!(item.deadline >> TICK_SHIFT < self.bound);
            }
            let mut last: Option<u128> = None;
            for item in &self.run[self.run_head..] {
                assert!(item.deadline >> TICK_SHIFT < self.bound);
                assert!(last < Some(item.key()), "run sorted");
                last = Some(item.key());
            }
        }
    }

    fn assert_heap(items: &[Item]) {
        for pos in 1..items.len() {
            assert!(items[(pos - 1) / ARITY].key() < items[pos].key(), "heap order");
        }
    }

    /// Pops everything due at `now` (releasing it), checking as it goes.
    fn pop_all(q: &mut TimerQueue<u64>, now: u64) -> Vec<u64> {
        let mut out = Vec::new();
        while let Some(id) = q.pop_due(now, u64::MAX) {
            out.push(q.release(id).unwrap());
        }
        q.check();
        out
    }

    #[test]
    fn empty_queue() {
        let mut q = TimerQueue::<u64>::new();
        assert!(q.is_empty());
        assert_eq!(q.len(), 0);
        assert_eq!(q.next_deadline(), None);
        assert_eq!(q.next_seq(), 0);
        assert!(q.pop_due(u64::MAX, u64::MAX).is_none());
        assert_eq!(q.pending().count(), 0);
        q.check();
    }

    #[test]
    fn fires_in_deadline_order() {
        let mut q = TimerQueue::new();
        let deadlines = [5 * SEC, 3, 70 * MS, 2 * SEC, 100, 3 * MS, 3600 * SEC, 0];
        for (i, &d) in deadlines.iter().enumerate() {
            q.insert(d, i as u64);
        }
        assert_eq!(q.len(), deadlines.len());
        assert_eq!(q.next_deadline(), Some(0));
        let mut expected: Vec<_> = (0..deadlines.len() as u64).collect();
        expected.sort_by_key(|&i| deadlines[i as usize]);
        assert_eq!(pop_all(&mut q, u64::MAX), expected);
        assert!(q.is_empty());
    }

    #[test]
    fn equal_deadlines_fire_in_scheduling_order() {
        let mut q = TimerQueue::new();
        for i in 0..100 {
            q.insert(7 * MS, i);
        }
        // Same tick, different nanoseconds: deadline first, then order.
        q.insert(7 * MS - 1, 1000);
        assert_eq!(pop_all(&mut q, 7 * MS - 1), vec![1000]);
        assert_eq!(pop_all(&mut q, 7 * MS), (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn reschedule_takes_a_fresh_sequence_number() {
        let mut q = TimerQueue::new();
        let a = q.insert(10 * MS, 1);
        q.insert(10 * MS, 2);
        let seq = q.next_seq();
        assert!(q.reschedule(a, 10 * MS));
        assert_eq!(q.next_seq(), seq + 1);
        assert_eq!(pop_all(&mut q, 10 * MS), vec![2, 1]);
    }

    #[test]
    fn reschedule_moves_between_levels() {
        let mut q = TimerQueue::new();
        let a = q.insert(10 * SEC, 1);
        let b = q.insert(20 * MS, 2);
        q.check();
        assert!(q.reschedule(a, 5 * MS));
        assert!(q.reschedule(b, 3600 * SEC));
        q.check();
        assert_eq!(q.deadline(a), Some(5 * MS));
        assert_eq!(q.deadline(b), Some(3600 * SEC));
        assert_eq!(q.next_deadline(), Some(5 * MS));
        assert_eq!(pop_all(&mut q, 10 * SEC), vec![1]);
        // Back into the past after time moved on: due at once.
        assert!(q.reschedule(b, 0));
        q.check();
        assert_eq!(q.next_deadline(), Some(0));
        assert_eq!(pop_all(&mut q, 10 * SEC), vec![2]);
    }

    #[test]
    fn postponed_entries_surface_at_their_new_time() {
        let mut q = TimerQueue::new();
        let a = q.insert(10 * MS, 1);
        q.insert(15 * MS, 2);
        // Later: no new item, only the entry changes.
        assert!(q.reschedule(a, 20 * MS));
        assert_eq!(q.stale, 0);
        assert_eq!(q.deadline(a), Some(20 * MS));
        q.check();
        // The old item is met at the front and moved.
        assert_eq!(q.next_deadline(), Some(15 * MS));
        q.check();
        assert!(pop_all(&mut q, 12 * MS).is_empty());
        assert_eq!(pop_all(&mut q, 19 * MS), vec![2]);
        // Postponed again, then brought earlier than the item: replaced.
        assert!(q.reschedule(a, 30 * MS));
        assert!(q.reschedule(a, 25 * MS));
        assert_eq!(q.stale, 1);
        q.check();
        assert!(pop_all(&mut q, 24 * MS).is_empty());
        assert_eq!(pop_all(&mut q, 25 * MS), vec![1]);
        assert!(q.is_empty());
    }

    #[test]
    fn pop_due_waits_for_the_deadline() {
        let mut q = TimerQueue::new();
        q.insert(SEC + 5, 1);
        q.insert(SEC + 10, 2);
        assert!(q.pop_due(SEC, u64::MAX).is_none());
        assert!(q.pop_due(SEC + 4, u64::MAX).is_none());
        assert_eq!(q.next_deadline(), Some(SEC + 5));
        assert_eq!(pop_all(&mut q, SEC + 9), vec![1]);
        assert_eq!(q.next_deadline(), Some(SEC + 10));
        // Asking about an earlier time again is harmless.
        assert!(q.pop_due(SEC, u64::MAX).is_none());
        assert_eq!(pop_all(&mut q, SEC + 10), vec![2]);
    }

    #[test]
    fn pop_due_stops_at_the_sequence_limit() {
        let mut q = TimerQueue::new();
        q.insert(5, 1);
        let limit = q.next_seq();
        // Added "during the pass": due, but must wait for the next one.
        q.insert(5, 2);
        q.insert(3, 3);
        // The earliest entry (3) is past the limit: nothing pops, even
        // though entry 1 is due and under the limit.
        assert!(q.pop_due(10, limit).is_none());
        assert_eq!(q.len(), 3);
        let limit = q.next_seq();
        let popped: Vec<_> =
            std::iter::from_fn(|| q.pop_due(10, limit).and_then(|id| q.release(id))).collect();
        assert_eq!(popped, vec![3, 1, 2]);
    }

    #[test]
    fn a_callback_scheduling_now_runs_next_pass() {
        let mut q = TimerQueue::new();
        let now = 3 * SEC;
        q.insert(now - MS, 1);
        q.insert(now, 2);
        let limit = q.next_seq();
        let id = q.pop_due(now, limit).unwrap();
        assert_eq!(q.release(id), Some(1));
        q.insert(now, 3); // "call_later(0)" from inside the callback
        let id = q.pop_due(now, limit).unwrap();
        assert_eq!(q.release(id), Some(2));
        assert!(q.pop_due(now, limit).is_none());
        assert_eq!(q.next_deadline(), Some(now));
        let id = q.pop_due(now, q.next_seq()).unwrap();
        assert_eq!(q.release(id), Some(3));
        q.check();
    }

    #[test]
    fn done_entries_stay_until_released() {
        let mut q = TimerQueue::new();
        let a = q.insert(10, 1);
        assert!(q.cancel(a).is_some());
        assert!(q.cancel(a).is_none());
        assert!(!q.reschedule(a, 20));
        assert_eq!(q.deadline(a), None);
        assert_eq!(q.get_mut(a), Some(&mut 1), "the value outlives the cancel");
        // Not reused while allocated.
        let b = q.insert(30, 2);
        assert_ne!(a, b);
        let id = q.pop_due(30, u64::MAX).unwrap();
        assert_eq!(id, b);
        assert!(q.cancel(b).is_none(), "a popped entry is not pending");
        assert_eq!(q.deadline(b), None);
        q.check();
        assert_eq!(q.release(a), Some(1));
        assert_eq!(q.release(a), None);
        assert_eq!(q.release(b), Some(2));
        // Released ids are reused.
        let c = q.insert(40, 3);
        assert!(c == a || c == b);
        assert_eq!(q.release(c), Some(3), "releasing a pending entry cancels it");
        assert!(q.is_empty());
        q.check();
    }

    #[test]
    fn far_future_deadlines_work() {
        let mut q = TimerQueue::new();
        let never = q.insert(u64::MAX, 1);
        q.insert(u64::MAX - 1, 2);
        q.insert(u64::MAX, 3);
        q.insert(1 << 63, 4);
        q.insert(5, 5);
        q.check();
        assert_eq!(q.next_deadline(), Some(5));
        assert_eq!(pop_all(&mut q, 1 << 62), vec![5]);
        assert_eq!(q.next_deadline(), Some(1 << 63));
        assert_eq!(pop_all(&mut q, u64::MAX - 1), vec![4, 2]);
        assert_eq!(q.deadline(never), Some(u64::MAX));
        assert_eq!(pop_all(&mut q, u64::MAX), vec![1, 3]);
        // After the end of time everything is due at once.
        q.insert(u64::MAX, 6);
        q.insert(7, 7);
        q.check();
        assert_eq!(pop_all(&mut q, u64::MAX), vec![7, 6]);
    }

    #[test]
    fn next_deadline_is_exact_while_time_advances() {
        let mut rng = fastrand_like(0x5eed);
        let mut q = TimerQueue::new();
        let mut model = BTreeMap::new();
        let mut ids = Vec::new();
        for i in 0..5000u64 {
            let d = rng() % (20 * SEC);
            ids.push(q.insert(d, i));
            model.insert((d, i), i);
        }
        // Some cancelled, some postponed, to leave tombstones about.
        for i in (0..5000).step_by(7) {
            let key = model.iter().find(|(_, &v)| v == i).map(|(&k, _)| k).unwrap();
            model.remove(&key);
            assert!(q.cancel(ids[i as usize]).is_some());
        }
        let mut now = 0;
        while !model.is_empty() {
            now += rng() % (3 * MS);
            while let Some((&(d, i), _)) = model.first_key_value() {
                if d > now {
                    break;
                }
                model.pop_first();
                let id = q.pop_due(now, u64::MAX).expect("due");
                assert_eq!(q.get_mut(id).copied(), Some(i));
            }
            assert!(q.pop_due(now, u64::MAX).is_none());
            assert_eq!(q.next_deadline(), model.keys().next().map(|&(d, _)| d));
        }
        q.check();
    }

    #[test]
    fn cancelling_due_entries() {
        let mut q = TimerQueue::new();
        let ids: Vec<_> = (0..10).map(|i| q.insert(SEC + i, i)).collect();
        // Make them due (they move into the run) without popping all.
        let first = q.pop_due(SEC, u64::MAX).unwrap();
        assert_eq!(q.release(first), Some(0));
        q.check();
        assert!(q.cancel(ids[1]).is_some()); // the run's head
        assert!(q.cancel(ids[5]).is_some()); // the middle
        assert!(q.cancel(ids[9]).is_some()); // the end
        q.check();
        assert_eq!(q.next_deadline(), Some(SEC + 2));
        assert!(q.reschedule(ids[2], SEC + 7)); // postponed within the run
        q.check();
        let late = q.insert(SEC + 3, 100);
        q.check();
        assert!(q.cancel(late).is_some());
        for id in [ids[1], ids[5], ids[9], late] {
            q.release(id);
        }
        assert_eq!(pop_all(&mut q, SEC + 100), vec![3, 4, 6, 7, 2, 8]);
    }

    #[test]
    fn big_random_workload_matches_sorting() {
        let mut rng = fastrand_like(42);
        let mut q = TimerQueue::new();
        let n = 100_000;
        let deadlines: Vec<u64> = (0..n).map(|_| rng() % (10 * SEC)).collect();
        let ids: Vec<_> = deadlines.iter().enumerate().map(|(i, &d)| q.insert(d, i as u64)).collect();
        for &id in ids.iter().step_by(2) {
            assert!(q.release(id).is_some());
        }
        q.check();
        assert_eq!(q.len(), n / 2);
        let mut expected: Vec<u64> = (1..n as u64).step_by(2).collect();
        expected.sort_by_key(|&i| (deadlines[i as usize], i));
        let mut got = Vec::new();
        let mut now = 0;
        while got.len() < expected.len() {
            now += 10 * MS;
            got.extend(pop_all(&mut q, now));
        }
        assert_eq!(got, expected);
    }

    #[test]
    fn tombstones_never_pile_up() {
        let mut q = TimerQueue::new();
        // A few long-lived entries and a storm of short-lived ones that are
        // all cancelled: the sweep keeps the containers small.
        let keep: Vec<_> = (0..10).map(|i| q.insert((i + 1) * 3600 * SEC, i)).collect();
        for round in 0..100_000u64 {
            let id = q.insert(60 * SEC + round, round);
            q.release(id);
            // Earlier reschedules leave a tombstone each, too.
            q.reschedule(keep[(round % 10) as usize], 3600 * SEC - round);
            assert!(q.stale <= 2 * q.len() + SWEEP_FLOOR);
        }
        q.check();
        let items = q.all_items().len();
        assert!(items <= 3 * q.len() + SWEEP_FLOOR + 1, "{items} items for {} pending", q.len());
        assert_eq!(q.slab.len(), 11, "ids are reused");
    }

    #[test]
    fn memory_is_released_when_empty() {
        let mut q = TimerQueue::new();
        let ids: Vec<_> = (0..200_000u64).map(|i| q.insert(5 * SEC + i, i)).collect();
        for id in ids {
            q.release(id);
        }
        q.check();
        assert_eq!(q.slab.capacity(), 0);
        assert!(q.slots.iter().all(|s| s.capacity() <= KEEP_CAPACITY));
        assert_eq!(q.all_items().len(), 0);
        let id = q.insert(1, 1);
        assert_eq!(pop_all(&mut q, 1), vec![1]);
        let _ = id;
        q.check();
    }

    /// A small deterministic generator (xorshift) for the plain tests.
    fn fastrand_like(seed: u64) -> impl FnMut() -> u64 {
        let mut x = seed | 1;
        move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        }
    }

    #[derive(Clone, Copy, Debug)]
    enum When {
        After(u64),
        Before(u64),
        At(u64),
    }

    impl When {
        fn resolve(self, now: u64) -> u64 {
            match self {
                When::After(d) => now.saturating_add(d),
                When::Before(d) => now.saturating_sub(d),
                When::At(t) => t,
            }
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Insert(When),
        Cancel(usize),
        Release(usize),
        Reschedule(usize, When),
        /// Advance time by the amount (or step back), then pop with the
        /// chosen limit until `None`.
        Pop(i64, Limit),
        PopOne(Limit),
        NextDeadline,
    }

    #[derive(Clone, Copy, Debug)]
    enum Limit {
        Unlimited,
        PassStart,
        Seq(u64),
    }

    /// Deadlines around "now" that exercise every level, the current tick,
    /// the past, exact ties and the end of time.
    fn when() -> impl Strategy<Value = When> {
        prop_oneof![
            3 => (0u64..(1 << 16)).prop_map(When::After),
            3 => (0u64..(1 << 22)).prop_map(When::After),
            3 => (0..10 * SEC).prop_map(When::After),
            1 => (0u64..(1 << 40)).prop_map(When::After),
            1 => any::<u64>().prop_map(When::After),
            1 => (0u64..(1 << 20)).prop_map(When::Before),
            1 => prop::sample::select(vec![0, 1, 65_535, 65_536, 1 << 22, 1 << 28])
                .prop_map(When::After),
            1 => prop::sample::select(vec![0, 1 << 16, u64::MAX - 1, u64::MAX]).prop_map(When::At),
        ]
    }

    fn op() -> impl Strategy<Value = Op> {
        let limit =
            prop_oneof![Just(Limit::Unlimited), Just(Limit::PassStart), (0u64..400).prop_map(Limit::Seq),];
        let pick = || any::<prop::sample::Index>().prop_map(|i| i.index(usize::MAX));
        prop_oneof![
            8 => when().prop_map(Op::Insert),
            3 => pick().prop_map(Op::Cancel),
            2 => pick().prop_map(Op::Release),
            4 => (pick(), when()).prop_map(|(i, w)| Op::Reschedule(i, w)),
            3 => (prop_oneof![
                    0i64..(1 << 17),
                    0i64..(1 << 24),
                    0i64..(4 * SEC as i64),
                    -(1i64 << 20)..0,
                    Just(i64::MAX),
                ], limit.clone()).prop_map(|(step, l)| Op::Pop(step, l)),
            1 => limit.prop_map(Op::PopOne),
            1 => Just(Op::NextDeadline),
        ]
    }

    fn seq_limit(limit: Limit, seq: u64) -> u64 {
        match limit {
            Limit::Unlimited => u64::MAX,
            Limit::PassStart => seq,
            Limit::Seq(s) => s,
        }
    }

    /// Pops once from the queue and the model, checking they agree; true if
    /// something was due.
    fn pop_one(
        q: &mut TimerQueue<usize>,
        model: &mut BTreeMap<(u64, u64), usize>,
        pending: &mut HashMap<usize, (u64, u64)>,
        ids: &[Option<TimerId>],
        now: u64,
        limit: u64,
    ) -> bool {
        let expected =
            model.first_key_value().filter(|(&(d, s), _)| d <= now && s < limit).map(|(_, &name)| name);
        assert_eq!(q.pop_due(now, limit), expected.and_then(|name| ids[name]));
        let Some(name) = expected else { return false };
        model.remove(&pending.remove(&name).unwrap());
        true
    }

    /// Runs `ops` against the queue and a `BTreeMap` model side by side.
    /// Like the reactor, the test releases an entry only once it is done
    /// with its id, and never uses the id afterwards.
    fn run_model(ops: &[Op]) {
        let mut q = TimerQueue::<usize>::new();
        // (deadline, seq) -> name, and per name: its id while allocated,
        // and (deadline, seq) while pending.
        let mut model: BTreeMap<(u64, u64), usize> = BTreeMap::new();
        let mut ids: Vec<Option<TimerId>> = Vec::new();
        let mut pending: HashMap<usize, (u64, u64)> = HashMap::new();
        let mut now: u64 = 0;
        let mut seq: u64 = 0;
        for op in ops {
            match *op {
                Op::Insert(when) => {
                    let d = when.resolve(now);
                    let name = ids.len();
                    ids.push(Some(q.insert(d, name)));
                    model.insert((d, seq), name);
                    pending.insert(name, (d, seq));
                    seq += 1;
                }
                Op::Cancel(i) | Op::Release(i) => {
                    if ids.is_empty() {
                        continue;
                    }
                    let name = i % ids.len();
                    let Some(id) = ids[name] else { continue };
                    let was_pending = pending.remove(&name).inspect(|k| {
                        model.remove(k);
                    });
                    if let Op::Cancel(_) = op {
                        assert_eq!(q.cancel(id).is_some(), was_pending.is_some());
                        assert_eq!(q.get_mut(id).copied(), Some(name));
                    } else {
                        assert_eq!(q.release(id), Some(name));
                        ids[name] = None;
                    }
                }
                Op::Reschedule(i, when) => {
                    if ids.is_empty() {
                        continue;
                    }
                    let name = i % ids.len();
                    let Some(id) = ids[name] else { continue };
                    let d = when.resolve(now);
                    let ok = q.reschedule(id, d);
                    match pending.get_mut(&name) {
                        Some(k) => {
                            assert!(ok);
                            model.remove(k);
                            *k = (d, seq);
                            model.insert((d, seq), name);
                            seq += 1;
                        }
                        None => assert!(!ok, "a done entry rescheduled"),
                    }
                }
                Op::Pop(step, limit) => {
                    now = if step < 0 {
                        now.saturating_sub(step.unsigned_abs())
                    } else {
                        now.saturating_add(step as u64)
                    };
                    let limit = seq_limit(limit, seq);
                    while pop_one(&mut q, &mut model, &mut pending, &ids, now, limit) {}
                }
                Op::PopOne(limit) => {
                    pop_one(&mut q, &mut model, &mut pending, &ids, now, seq_limit(limit, seq));
                }
                Op::NextDeadline => {
                    assert_eq!(q.next_deadline(), model.keys().next().map(|&(d, _)| d));
                }
            }
            assert_eq!(q.len(), model.len());
            assert_eq!(q.next_seq(), seq);
            q.check();
        }
        assert_eq!(q.next_deadline(), model.keys().next().map(|&(d, _)| d));
        for (&name, &(d, _)) in &pending {
            assert_eq!(q.deadline(ids[name].unwrap()), Some(d));
        }
        let mut listed: Vec<_> = q.pending().collect();
        listed.sort_unstable();
        let mut expected: Vec<_> = pending.iter().map(|(&name, &(d, _))| (ids[name].unwrap(), d)).collect();
        expected.sort_unstable();
        assert_eq!(listed, expected);
        // Drain the rest in order.
        let mut rest = Vec::new();
        while let Some(id) = q.pop_due(u64::MAX, u64::MAX) {
            rest.push(*q.get_mut(id).unwrap());
        }
        assert_eq!(rest, model.values().copied().collect::<Vec<_>>());
        q.check();
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn matches_a_btreemap_model(ops in prop::collection::vec(op(), 1..300)) {
            run_model(&ops);
        }
    }
}
