//! The timer queue behind `call_later`.
//!
//! Deadlines are nanoseconds since the owning clock's origin. Entries with
//! equal deadlines come out in insertion order (each insert and each
//! reschedule takes the next sequence number).
//!
//! # Design
//!
//! A hierarchical timing wheel in front of a sorted "due" run:
//!
//! * Time is cut into ticks of 2^16 ns (65.5 µs). The wheel has 8 levels of
//!   64 slots; a slot at level `l` spans 64^l ticks, so the levels together
//!   cover every `u64` deadline. An entry lives at the level of the highest
//!   6-bit digit in which its tick differs from the wheel's origin tick
//!   (`origin`), in the slot named by that digit. Everything at level `l` is
//!   therefore earlier than everything at level `l + 1`, and within a level
//!   the slots are in time order.
//! * A slot is a vector of `(deadline, seq, index)` items. Schedule is a
//!   push, cancel a swap-remove. Only the *front* slot (the first occupied
//!   slot of the lowest occupied level, found with `trailing_zeros`, which
//!   holds the wheel's earliest entry) is kept as an indexed 4-ary min-heap,
//!   so `next_deadline` is exact and O(1); a slot is heapified when it
//!   becomes the front, at most once per stay.
//! * Entries whose tick is below `bound` are due now or soon. They sit either
//!   in `run`, a sorted vector filled with whole level-0 slots as time
//!   reaches them (one `sort_unstable` per slot; firing is then a cursor
//!   walk), or in `late`, an indexed heap for entries scheduled into the
//!   past or the current tick (a callback rescheduling "now", say).
//! * `pop_due` moves the origin forward to the caller's `now`, cascading the
//!   slots it enters into lower levels (an entry moves at most once per
//!   level over its life).
//!
//! Every entry has a stable index into `slab` (an intrusive free list links
//! the vacant ones) recording where its item sits, so cancel and reschedule
//! find it at once: O(1) in a plain slot, O(log k) in a heap of k items.
//! Nothing is removed lazily: a cancelled entry leaves its slot at once and
//! its slab index is reused at once, with a new generation so stale keys are
//! recognised. (Cancelling an entry already in the sorted run blanks its run
//! cell; the run only holds entries whose tick has been reached and is
//! consumed as they fire, so blanks cannot accumulate beyond it.)
//!
//! Measured against a plain indexed 4-ary heap at 1,000,000 pending timers
//! with random deadlines, the wheel is as fast to schedule, a little slower
//! to cancel in scheduling order, faster to cancel in random order, and
//! about twice as fast to fire a dense burst (no sift-down through a big
//! heap per pop). See BENCHMARKS.md, "Timers".

/// Identifies one entry; stale keys (popped or removed) are detected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct TimerKey {
    pub(crate) index: u32,
    pub(crate) generation: u32,
}

/// log2 of the tick length in nanoseconds (65.536 µs).
const TICK_SHIFT: u32 = 16;
const LEVEL_BITS: u32 = 6;
const SLOTS: usize = 1 << LEVEL_BITS;
const SLOT_MASK: u64 = SLOTS as u64 - 1;
/// Enough levels to cover every tick of a `u64` deadline.
const LEVELS: usize = (64 - TICK_SHIFT).div_ceil(LEVEL_BITS) as usize;
const MAX_TICK: u64 = u64::MAX >> TICK_SHIFT;
const ARITY: usize = 4;

/// `Entry::place` values other than a wheel slot number.
const LATE: u32 = u32::MAX - 2;
const RUN: u32 = u32::MAX - 1;
const VACANT: u32 = u32::MAX;
/// "No index": end of the free list, or a cancelled cell of the run.
const NONE: u32 = u32::MAX;

/// Vectors larger than this (in items) are released rather than kept for
/// reuse once emptied, and shrink when they fall below a quarter full.
const KEEP_CAPACITY: usize = 1024;
/// A slab at least this long is released when the queue becomes empty.
const RESET_SLAB_LEN: usize = 4096;

#[derive(Clone, Copy, Debug)]
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
    /// Position in the container named by `place`; for the run, the
    /// position plus `run_base`; for a vacant slot, the next free index.
    pos: u32,
    generation: u32,
    /// A wheel slot (`level * SLOTS + slot`), `LATE`, `RUN` or `VACANT`.
    place: u32,
    value: Option<T>,
}

pub(crate) struct TimerQueue<T> {
    slab: Vec<Entry<T>>,
    free: u32,
    len: usize,
    seq: u64,
    /// Generation given to brand-new slab slots; raised when the slab is
    /// released so that keys from before stay stale.
    generation_floor: u32,
    /// Highest generation any key has carried.
    max_generation: u32,
    slots: Vec<Vec<Item>>,
    /// Per level, which slots hold items.
    occupied: [u64; LEVELS],
    /// Per level, which slots are kept in heap order. Only the front slot
    /// (the first occupied slot of the lowest occupied level, where the
    /// wheel's earliest entry is) has to be; the others are plain vectors
    /// until they become the front.
    ordered: [u64; LEVELS],
    /// The wheel's origin tick: every wheel entry has a tick `>= bound >=
    /// origin`, placed relative to `origin`.
    origin: u64,
    /// Ticks below this are due: their entries are in `run` or `late`.
    bound: u64,
    run: Vec<Item>,
    run_head: usize,
    run_base: u32,
    late: Vec<Item>,
}

impl<T> Default for TimerQueue<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> TimerQueue<T> {
    pub fn new() -> Self {
        TimerQueue {
            slab: Vec::new(),
            free: NONE,
            len: 0,
            seq: 0,
            generation_floor: 0,
            max_generation: 0,
            slots: (0..LEVELS * SLOTS).map(|_| Vec::new()).collect(),
            occupied: [0; LEVELS],
            ordered: [0; LEVELS],
            origin: 0,
            bound: 0,
            run: Vec::new(),
            run_head: 0,
            run_base: 0,
            late: Vec::new(),
        }
    }

    /// An empty queue with room for `capacity` entries in its slab.
    #[allow(dead_code)]
    pub fn with_capacity(capacity: usize) -> Self {
        let mut q = Self::new();
        q.slab.reserve(capacity);
        q
    }

    /// Adds an entry due at `deadline`; takes the next sequence number.
    pub fn insert(&mut self, deadline: u64, value: T) -> TimerKey {
        let seq = self.take_seq();
        let index = self.alloc(value);
        let place = self.place_for(deadline);
        self.push(place, Item { deadline, seq, index });
        TimerKey { index, generation: self.slab[index as usize].generation }
    }

    /// Removes a pending entry; `None` if the key is stale.
    pub fn remove(&mut self, key: TimerKey) -> Option<T> {
        let (place, pos) = self.locate(key)?;
        self.unlink(place, pos);
        Some(self.release(key.index))
    }

    /// Moves a pending entry to `deadline` and gives it a fresh sequence
    /// number; false if the key is stale.
    pub fn reschedule(&mut self, key: TimerKey, deadline: u64) -> bool {
        let Some((place, pos)) = self.locate(key) else {
            return false;
        };
        let seq = self.take_seq();
        let new_place = self.place_for(deadline);
        let item = Item { deadline, seq, index: key.index };
        if new_place == place && place != RUN {
            // Same container: update in place and restore the heap order.
            let (heap, ordered) = if place == LATE {
                (&mut self.late, true)
            } else {
                let (level, slot) = split(place);
                let ordered = self.ordered[level] & (1 << slot) != 0;
                (&mut self.slots[place as usize], ordered)
            };
            let old = std::mem::replace(&mut heap[pos as usize], item);
            if !ordered {
                // A plain vector: nothing to restore.
            } else if item.key() < old.key() {
                sift_up(heap, &mut self.slab, pos as usize);
            } else {
                sift_down(heap, &mut self.slab, pos as usize);
            }
        } else {
            self.unlink(place, pos);
            self.push(new_place, item);
        }
        true
    }

    /// The deadline of a pending entry.
    pub fn deadline(&self, key: TimerKey) -> Option<u64> {
        let (place, pos) = self.locate(key)?;
        Some(self.item_at(place, pos).deadline)
    }

    /// The earliest deadline, if any entry is pending.
    pub fn next_deadline(&self) -> Option<u64> {
        if let Some(item) = self.due_top().map(|(item, _)| item) {
            return Some(item.deadline);
        }
        // Nothing due: the earliest entry is the top of the first occupied
        // slot of the lowest occupied level.
        self.occupied.iter().enumerate().find(|(_, &bits)| bits != 0).map(|(level, &bits)| {
            let slot = bits.trailing_zeros() as usize;
            debug_assert!(self.ordered[level] & (1 << slot) != 0);
            self.slots[level * SLOTS + slot][0].deadline
        })
    }

    /// The sequence number the next insert/reschedule will take.
    pub fn next_seq(&self) -> u64 {
        self.seq
    }

    /// Pops the earliest entry if its deadline is `<= now` and its sequence
    /// number is `< seq_limit` (entries added during a firing pass wait for
    /// the next pass).
    pub fn pop_due(&mut self, now: u64, seq_limit: u64) -> Option<(TimerKey, T)> {
        let now_tick = now >> TICK_SHIFT;
        if now_tick >= self.bound {
            self.advance(now_tick);
            self.order_front();
        }
        let (item, from_run) = self.due_top()?;
        if item.deadline > now || item.seq >= seq_limit {
            return None;
        }
        if from_run {
            self.run_head += 1;
            self.skip_blanks();
        } else {
            heap_remove(&mut self.late, &mut self.slab, 0);
        }
        let key = TimerKey { index: item.index, generation: self.slab[item.index as usize].generation };
        Some((key, self.release(item.index)))
    }

    #[allow(dead_code)]
    pub fn len(&self) -> usize {
        self.len
    }

    #[allow(dead_code)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every pending entry, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (TimerKey, u64, &T)> + '_ {
        self.slab.iter().enumerate().filter_map(move |(index, entry)| {
            let value = entry.value.as_ref()?;
            let key = TimerKey { index: index as u32, generation: entry.generation };
            Some((key, self.item_at(entry.place, entry.pos).deadline, value))
        })
    }

    /// Removes every entry; their keys become stale.
    #[allow(dead_code)]
    pub fn clear(&mut self) {
        drop(self.drain());
    }

    /// Removes every entry and returns them with their keys and deadlines,
    /// in no particular order. The keys are stale afterwards.
    #[allow(dead_code)]
    pub fn drain(&mut self) -> std::vec::IntoIter<(TimerKey, u64, T)> {
        let mut out = Vec::with_capacity(self.len);
        for index in 0..self.slab.len() {
            if self.len == 0 {
                // The last release may have let go of the slab.
                break;
            }
            let entry = &self.slab[index];
            if entry.place == VACANT {
                continue;
            }
            let key = TimerKey { index: index as u32, generation: entry.generation };
            let deadline = self.item_at(entry.place, entry.pos).deadline;
            out.push((key, deadline, self.release(index as u32)));
        }
        for slot in &mut self.slots {
            *slot = Vec::new();
        }
        self.occupied = [0; LEVELS];
        self.ordered = [0; LEVELS];
        self.run = Vec::new();
        self.run_head = 0;
        self.late = Vec::new();
        out.into_iter()
    }

    // ----- internals -----

    fn take_seq(&mut self) -> u64 {
        let seq = self.seq;
        self.seq += 1;
        seq
    }

    fn alloc(&mut self, value: T) -> u32 {
        self.len += 1;
        if self.free != NONE {
            let index = self.free;
            let entry = &mut self.slab[index as usize];
            self.free = entry.pos;
            entry.value = Some(value);
            return index;
        }
        let index = u32::try_from(self.slab.len())
            .ok()
            .filter(|&i| i != NONE)
            .expect("timer queue: more than 2^32 - 1 entries");
        self.slab.push(Entry {
            pos: 0,
            generation: self.generation_floor,
            place: VACANT,
            value: Some(value),
        });
        index
    }

    /// Frees a slab slot whose item has already been unlinked.
    fn release(&mut self, index: u32) -> T {
        let entry = &mut self.slab[index as usize];
        entry.place = VACANT;
        self.max_generation = self.max_generation.max(entry.generation);
        // With its generations exhausted a slot is retired rather than let
        // an old key match a new entry.
        if let Some(generation) = entry.generation.checked_add(1) {
            entry.generation = generation;
            entry.pos = self.free;
            self.free = index;
        }
        let value = entry.value.take().expect("timer queue: occupied slot without a value");
        self.len -= 1;
        if self.len == 0 {
            self.release_slab();
        }
        value
    }

    /// After a burst, gives the slab's memory back once the queue is empty.
    fn release_slab(&mut self) {
        if self.slab.len() < RESET_SLAB_LEN {
            return;
        }
        let Some(floor) = self.max_generation.checked_add(1) else {
            return;
        };
        self.generation_floor = floor;
        self.slab = Vec::new();
        self.free = NONE;
    }

    fn locate(&self, key: TimerKey) -> Option<(u32, u32)> {
        let entry = self.slab.get(key.index as usize)?;
        (entry.generation == key.generation && entry.place != VACANT).then_some((entry.place, entry.pos))
    }

    fn item_at(&self, place: u32, pos: u32) -> &Item {
        match place {
            RUN => &self.run[pos.wrapping_sub(self.run_base) as usize],
            LATE => &self.late[pos as usize],
            slot => &self.slots[slot as usize][pos as usize],
        }
    }

    /// Where an entry due at `deadline` belongs now.
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

    /// Puts an item into `LATE` or a wheel slot.
    #[inline]
    fn push(&mut self, place: u32, item: Item) {
        self.push_quiet(place, item);
        if place != LATE && self.slots[place as usize].len() == 1 {
            // A slot filled up from empty: it may be the new front.
            self.order_front();
        }
    }

    /// `push` without keeping the front in order (for bulk moves, which
    /// call `order_front` when done).
    #[inline]
    fn push_quiet(&mut self, place: u32, item: Item) {
        let (heap, ordered) = if place == LATE {
            (&mut self.late, true)
        } else {
            let (level, slot) = split(place);
            self.occupied[level] |= 1 << slot;
            let ordered = self.ordered[level] & (1 << slot) != 0;
            (&mut self.slots[place as usize], ordered)
        };
        self.slab[item.index as usize].place = place;
        let pos = heap.len();
        heap.push(item);
        if ordered {
            sift_up(heap, &mut self.slab, pos);
        } else {
            self.slab[item.index as usize].pos = pos as u32;
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
        heapify(&mut self.slots[level * SLOTS + slot as usize], &mut self.slab);
    }

    /// Takes an item out of its container (the slab slot stays occupied).
    fn unlink(&mut self, place: u32, pos: u32) {
        match place {
            RUN => {
                let at = pos.wrapping_sub(self.run_base) as usize;
                self.run[at].index = NONE;
                if at == self.run_head {
                    self.skip_blanks();
                }
            }
            LATE => {
                heap_remove(&mut self.late, &mut self.slab, pos as usize);
            }
            place => {
                let (level, slot) = split(place);
                let heap = &mut self.slots[place as usize];
                if self.ordered[level] & (1 << slot) != 0 {
                    heap_remove(heap, &mut self.slab, pos as usize);
                } else {
                    vec_remove(heap, &mut self.slab, pos as usize);
                }
                if heap.is_empty() {
                    self.occupied[level] &= !(1 << slot);
                    self.ordered[level] &= !(1 << slot);
                    self.order_front();
                }
            }
        }
    }

    /// The earliest due entry and whether it is the head of the run.
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

    /// Moves the run's head past cancelled cells; empties it when consumed.
    fn skip_blanks(&mut self) {
        while self.run_head < self.run.len() && self.run[self.run_head].index == NONE {
            self.run_head += 1;
        }
        if self.run_head == self.run.len() {
            self.run_base = self.run_base.wrapping_add(self.run.len() as u32);
            self.run_head = 0;
            self.run.clear();
            if self.run.capacity() > KEEP_CAPACITY {
                self.run = Vec::new();
            }
        }
    }

    /// Makes every entry with a tick `<= now_tick` due.
    fn advance(&mut self, now_tick: u64) {
        while let Some(level) = self.occupied.iter().position(|&bits| bits != 0) {
            let slot = self.occupied[level].trailing_zeros() as u64;
            let shift = level as u32 * LEVEL_BITS;
            let span = 1u64 << (shift + LEVEL_BITS);
            let start = (self.origin & !(span - 1)) | (slot << shift);
            if start > now_tick {
                break;
            }
            // Nothing is pending before `start`: jump there. That enters
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
    /// any wheel entry. Slots the origin enters are cascaded to lower
    /// levels, highest first.
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
            for item in items.drain(..) {
                let place = self.place_for(item.deadline);
                debug_assert!((place as usize) < level * SLOTS);
                self.push_quiet(place, item);
            }
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
            // Drop the consumed prefix; positions are relative to
            // `run_base`, so the cells that move keep their `pos`.
            self.run.drain(..self.run_head);
            self.run_base = self.run_base.wrapping_add(self.run_head as u32);
            self.run_head = 0;
        }
        let first = self.run_base.wrapping_add(self.run.len() as u32);
        for (i, item) in items.iter().enumerate() {
            let entry = &mut self.slab[item.index as usize];
            entry.place = RUN;
            entry.pos = first.wrapping_add(i as u32);
        }
        if self.run.is_empty() {
            std::mem::swap(&mut self.run, &mut items);
            self.slots[slot] = recycle(items);
        } else {
            self.run.extend_from_slice(&items);
            items.clear();
            self.slots[slot] = recycle(items);
        }
    }
}

/// The level and slot of a wheel place.
#[inline]
fn split(place: u32) -> (usize, u32) {
    (place as usize / SLOTS, place % SLOTS as u32)
}

/// Keeps an emptied vector's buffer for reuse unless it is large.
fn recycle(items: Vec<Item>) -> Vec<Item> {
    debug_assert!(items.is_empty());
    if items.capacity() > KEEP_CAPACITY {
        Vec::new()
    } else {
        items
    }
}

#[inline]
fn less(a: &Item, b: &Item) -> bool {
    a.key() < b.key()
}

/// Moves `heap[pos]` up to its place, recording positions in the slab.
#[inline]
fn sift_up<T>(heap: &mut [Item], slab: &mut [Entry<T>], mut pos: usize) {
    let item = heap[pos];
    while pos > 0 {
        let parent = (pos - 1) / ARITY;
        let above = heap[parent];
        if !less(&item, &above) {
            break;
        }
        heap[pos] = above;
        slab[above.index as usize].pos = pos as u32;
        pos = parent;
    }
    heap[pos] = item;
    slab[item.index as usize].pos = pos as u32;
}

/// Moves `heap[pos]` down to its place, recording positions in the slab.
#[inline]
fn sift_down<T>(heap: &mut [Item], slab: &mut [Entry<T>], mut pos: usize) {
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
        slab[heap[pos].index as usize].pos = pos as u32;
        pos = best;
    }
    heap[pos] = item;
    slab[item.index as usize].pos = pos as u32;
}

/// Puts a whole vector into heap order.
fn heapify<T>(heap: &mut [Item], slab: &mut [Entry<T>]) {
    if heap.len() > 1 {
        for pos in (0..=(heap.len() - 2) / ARITY).rev() {
            sift_down(heap, slab, pos);
        }
    }
}

/// Removes `items[pos]` from an unordered slot, keeping slab positions.
fn vec_remove<T>(items: &mut Vec<Item>, slab: &mut [Entry<T>], pos: usize) {
    // Overwrite rather than `swap_remove`: the removed item is never read,
    // so a cancel costs stores, not a load, at a random position.
    let last = items.pop().expect("timer queue: removing from an empty slot");
    if pos < items.len() {
        items[pos] = last;
        slab[last.index as usize].pos = pos as u32;
    }
    shrink(items);
}

/// Lets go of most of a vector's spare room once it is a quarter full.
fn shrink(items: &mut Vec<Item>) {
    if items.capacity() > KEEP_CAPACITY && items.len() < items.capacity() / 4 {
        items.shrink_to(items.capacity() / 2);
    }
}

/// Removes `heap[pos]`, keeping the heap order and slab positions.
fn heap_remove<T>(heap: &mut Vec<Item>, slab: &mut [Entry<T>], pos: usize) -> Item {
    let item = heap.swap_remove(pos);
    if pos < heap.len() {
        if less(&heap[pos], &item) {
            sift_up(heap, slab, pos);
        } else {
            sift_down(heap, slab, pos);
        }
    }
    shrink(heap);
    item
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, HashMap};

    const MS: u64 = 1_000_000;
    const SEC: u64 = 1_000_000_000;

    impl<T> TimerQueue<T> {
        /// Checks every structural invariant; panics on the first broken one.
        fn check(&self) {
            let live = self.slab.iter().filter(|m| m.place != VACANT).count();
            assert_eq!(live, self.len, "len");
            assert_eq!(self.slab.iter().filter(|e| e.value.is_some()).count(), self.len);
            for (index, entry) in self.slab.iter().enumerate() {
                if entry.place != VACANT {
                    let item = self.item_at(entry.place, entry.pos);
                    assert_eq!(item.index as usize, index, "entry points at its item");
                }
            }
            // Free list: every entry on it is vacant, no cycles.
            let mut free = self.free;
            let mut seen = 0;
            while free != NONE {
                assert_eq!(self.slab[free as usize].place, VACANT);
                free = self.slab[free as usize].pos;
                seen += 1;
                assert!(seen <= self.slab.len(), "free list cycle");
            }
            assert!(self.origin <= self.bound && self.bound <= MAX_TICK + 1);
            let front = self
                .occupied
                .iter()
                .position(|&bits| bits != 0)
                .map(|level| (level, self.occupied[level].trailing_zeros()));
            let mut total = 0;
            for level in 0..LEVELS {
                assert_eq!(self.ordered[level] & !self.occupied[level], 0);
                for slot in 0..SLOTS as u32 {
                    let items = &self.slots[level * SLOTS + slot as usize];
                    total += items.len();
                    let bit = 1u64 << slot;
                    assert_eq!(self.occupied[level] & bit != 0, !items.is_empty());
                    if self.ordered[level] & bit != 0 {
                        assert_heap(items);
                    }
                    if front == Some((level, slot)) {
                        assert!(self.ordered[level] & bit != 0, "front slot in heap order");
                    }
                    let place = (level * SLOTS) as u32 + slot;
                    for (pos, item) in items.iter().enumerate() {
                        assert!(item.deadline >> TICK_SHIFT >= self.bound);
                        assert_eq!(self.place_for(item.deadline), place, "placement");
                        let entry = &self.slab[item.index as usize];
                        assert_eq!((entry.place, entry.pos as usize), (place, pos));
                    }
                }
            }
            assert_heap(&self.late);
            for (pos, item) in self.late.iter().enumerate() {
                assert!(item.deadline >> TICK_SHIFT < self.bound);
                let entry = &self.slab[item.index as usize];
                assert_eq!((entry.place, entry.pos as usize), (LATE, pos));
            }
            total += self.late.len();
            if let Some(head) = self.run.get(self.run_head) {
                assert_ne!(head.index, NONE, "run head is live");
            }
            let mut last: Option<u128> = None;
            for (at, item) in self.run.iter().enumerate().skip(self.run_head) {
                if item.index == NONE {
                    continue;
                }
                total += 1;
                assert!(item.deadline >> TICK_SHIFT < self.bound);
                assert!(last < Some(item.key()), "run sorted");
                last = Some(item.key());
                let entry = &self.slab[item.index as usize];
                assert_eq!(entry.place, RUN);
                assert_eq!(entry.pos, self.run_base.wrapping_add(at as u32));
            }
            assert_eq!(total, self.len, "every entry is in exactly one container");
        }
    }

    fn assert_heap(items: &[Item]) {
        for pos in 1..items.len() {
            assert!(items[(pos - 1) / ARITY].key() < items[pos].key(), "heap order");
        }
    }

    /// Pops everything due at `now`, checking as it goes.
    fn pop_all(q: &mut TimerQueue<u64>, now: u64) -> Vec<u64> {
        let mut out = Vec::new();
        while let Some((_, v)) = q.pop_due(now, u64::MAX) {
            out.push(v);
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
        assert_eq!(q.iter().count(), 0);
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
        let popped: Vec<_> = std::iter::from_fn(|| q.pop_due(10, limit).map(|(_, v)| v)).collect();
        assert_eq!(popped, vec![3, 1, 2]);
    }

    #[test]
    fn a_callback_scheduling_now_runs_next_pass() {
        let mut q = TimerQueue::new();
        let now = 3 * SEC;
        q.insert(now - MS, 1);
        q.insert(now, 2);
        let limit = q.next_seq();
        let (_, v) = q.pop_due(now, limit).unwrap();
        assert_eq!(v, 1);
        q.insert(now, 3); // "call_later(0)" from inside the callback
        let (_, v) = q.pop_due(now, limit).unwrap();
        assert_eq!(v, 2);
        assert!(q.pop_due(now, limit).is_none());
        assert_eq!(q.next_deadline(), Some(now));
        let (_, v) = q.pop_due(now, q.next_seq()).unwrap();
        assert_eq!(v, 3);
        q.check();
    }

    #[test]
    fn stale_keys_are_rejected() {
        let mut q = TimerQueue::new();
        let a = q.insert(10, 1);
        assert_eq!(q.remove(a), Some(1));
        assert_eq!(q.remove(a), None);
        assert!(!q.reschedule(a, 20));
        assert_eq!(q.deadline(a), None);
        // The slot is reused for the next entry, with a new generation.
        let b = q.insert(30, 2);
        assert_eq!(b.index, a.index);
        assert_ne!(b.generation, a.generation);
        assert_eq!(q.remove(a), None);
        assert!(!q.reschedule(a, 40));
        assert_eq!(q.deadline(b), Some(30));
        // Popped keys are stale too.
        let (key, v) = q.pop_due(30, u64::MAX).unwrap();
        assert_eq!((key, v), (b, 2));
        assert_eq!(q.remove(b), None);
        assert_eq!(q.deadline(b), None);
        // Keys that never existed.
        let bogus = TimerKey { index: 12345, generation: 0 };
        assert_eq!(q.remove(bogus), None);
        assert!(!q.reschedule(bogus, 1));
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
        for i in 0..5000u64 {
            let d = rng() % (20 * SEC);
            q.insert(d, i);
            model.insert((d, i), i);
        }
        let mut now = 0;
        while !model.is_empty() {
            now += rng() % (3 * MS);
            while let Some((&(d, i), _)) = model.first_key_value() {
                if d > now {
                    break;
                }
                model.pop_first();
                assert_eq!(q.pop_due(now, u64::MAX).map(|(_, v)| v), Some(i));
            }
            assert!(q.pop_due(now, u64::MAX).is_none());
            assert_eq!(q.next_deadline(), model.keys().next().map(|&(d, _)| d));
        }
        q.check();
    }

    #[test]
    fn cancelling_due_entries() {
        let mut q = TimerQueue::new();
        let keys: Vec<_> = (0..10).map(|i| q.insert(SEC + i, i)).collect();
        // Make them due (they move into the run) without popping all.
        assert_eq!(q.pop_due(SEC, u64::MAX).map(|(_, v)| v), Some(0));
        q.check();
        assert_eq!(q.remove(keys[1]), Some(1)); // the run's head
        assert_eq!(q.remove(keys[5]), Some(5)); // the middle
        assert_eq!(q.remove(keys[9]), Some(9)); // the end
        q.check();
        assert_eq!(q.next_deadline(), Some(SEC + 2));
        assert!(q.reschedule(keys[2], SEC + 7)); // leaves the run for `late`
        q.check();
        let late = q.insert(SEC + 3, 100);
        q.check();
        assert_eq!(q.remove(late), Some(100));
        assert_eq!(pop_all(&mut q, SEC + 100), vec![3, 4, 6, 7, 2, 8]);
    }

    #[test]
    fn big_random_workload_matches_sorting() {
        let mut rng = fastrand_like(42);
        let mut q = TimerQueue::new();
        let n = 100_000;
        let deadlines: Vec<u64> = (0..n).map(|_| rng() % (10 * SEC)).collect();
        let keys: Vec<_> = deadlines.iter().enumerate().map(|(i, &d)| q.insert(d, i as u64)).collect();
        for key in keys.iter().step_by(2) {
            assert!(q.remove(*key).is_some());
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
    fn memory_is_reused_and_released() {
        let mut q = TimerQueue::new();
        // Steady insert/cancel churn does not grow anything.
        let keep: Vec<_> = (0..100).map(|i| q.insert(i * SEC, i)).collect();
        for round in 0..10_000u64 {
            let k = q.insert((round % 977) * MS, round);
            assert_eq!(q.remove(k), Some(round));
        }
        assert_eq!(q.slab.len(), 101);
        assert!(q.slots.iter().all(|s| s.capacity() <= KEEP_CAPACITY));
        for k in keep {
            q.remove(k);
        }
        // A burst, then everything cancelled: memory goes back.
        let keys: Vec<_> = (0..200_000u64).map(|i| q.insert(5 * SEC + i, i)).collect();
        let old = keys[7];
        for k in keys {
            q.remove(k);
        }
        q.check();
        assert_eq!(q.slab.capacity(), 0);
        assert!(q.slots.iter().all(|s| s.capacity() <= KEEP_CAPACITY));
        // Keys from before the release stay stale.
        let fresh: Vec<_> = (0..10).map(|i| q.insert(i, i)).collect();
        assert!(fresh.iter().all(|k| k.generation > old.generation));
        assert_eq!(q.remove(old), None);
        q.check();
    }

    #[test]
    fn exhausted_generations_retire_the_slot() {
        let mut q = TimerQueue::new();
        let a = q.insert(1, 1);
        q.slab[a.index as usize].generation = u32::MAX;
        let a = TimerKey { generation: u32::MAX, ..a };
        assert_eq!(q.remove(a), Some(1));
        let b = q.insert(1, 2);
        assert_ne!(b.index, a.index, "retired slot is not reused");
        assert_eq!(q.remove(a), None);
        q.check();
    }

    #[test]
    fn iter_drain_and_clear() {
        let mut q = TimerQueue::new();
        let keys: Vec<_> = (0..50u64).map(|i| q.insert(i * 37 * MS, i)).collect();
        pop_all(&mut q, 100 * MS); // 0, 1, 2 fire; some move around
        let mut seen: Vec<_> = q.iter().map(|(k, d, &v)| (k, d, v)).collect();
        seen.sort_by_key(|&(_, _, v)| v);
        let expected: Vec<_> = (3..50u64).map(|i| (keys[i as usize], i * 37 * MS, i)).collect();
        assert_eq!(seen, expected);
        let mut drained: Vec<_> = q.drain().collect();
        drained.sort_by_key(|&(_, _, v)| v);
        assert_eq!(drained, expected);
        assert!(q.is_empty());
        assert_eq!(q.remove(keys[10]), None);
        q.check();
        let k = q.insert(5, 1);
        q.clear();
        assert_eq!(q.remove(k), None);
        assert!(q.pop_due(u64::MAX, u64::MAX).is_none());
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
        Remove(usize),
        Reschedule(usize, When),
        /// Advance time by the amount (or step back), then pop with the
        /// chosen limit until `None`.
        Pop(i64, Limit),
        PopOne(Limit),
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
        prop_oneof![
            8 => when().prop_map(Op::Insert),
            3 => any::<prop::sample::Index>().prop_map(|i| Op::Remove(i.index(usize::MAX))),
            3 => (any::<prop::sample::Index>(), when())
                .prop_map(|(i, w)| Op::Reschedule(i.index(usize::MAX), w)),
            3 => (prop_oneof![
                    0i64..(1 << 17),
                    0i64..(1 << 24),
                    0i64..(4 * SEC as i64),
                    -(1i64 << 20)..0,
                    Just(i64::MAX),
                ], limit.clone()).prop_map(|(step, l)| Op::Pop(step, l)),
            1 => limit.prop_map(Op::PopOne),
        ]
    }

    /// Runs `ops` against the queue and a `BTreeMap` model side by side.
    fn run_model(ops: &[Op]) {
        let mut q = TimerQueue::<usize>::new();
        // (deadline, seq) -> id, and per id: its key and (deadline, seq)
        // while pending.
        let mut model: BTreeMap<(u64, u64), usize> = BTreeMap::new();
        let mut keys: Vec<TimerKey> = Vec::new();
        let mut pending: HashMap<usize, (u64, u64)> = HashMap::new();
        let mut now: u64 = 0;
        let mut seq: u64 = 0;
        for op in ops {
            match *op {
                Op::Insert(when) => {
                    let d = when.resolve(now);
                    let id = keys.len();
                    keys.push(q.insert(d, id));
                    model.insert((d, seq), id);
                    pending.insert(id, (d, seq));
                    seq += 1;
                }
                Op::Remove(i) => {
                    if keys.is_empty() {
                        continue;
                    }
                    let id = i % keys.len();
                    let got = q.remove(keys[id]);
                    match pending.remove(&id) {
                        Some(k) => {
                            model.remove(&k);
                            assert_eq!(got, Some(id));
                        }
                        None => assert_eq!(got, None, "stale key removed something"),
                    }
                }
                Op::Reschedule(i, when) => {
                    if keys.is_empty() {
                        continue;
                    }
                    let id = i % keys.len();
                    let d = when.resolve(now);
                    let ok = q.reschedule(keys[id], d);
                    match pending.get_mut(&id) {
                        Some(k) => {
                            assert!(ok);
                            model.remove(k);
                            *k = (d, seq);
                            model.insert((d, seq), id);
                            seq += 1;
                        }
                        None => assert!(!ok, "stale key rescheduled"),
                    }
                }
                Op::Pop(step, limit) => {
                    now = if step < 0 {
                        now.saturating_sub(step.unsigned_abs())
                    } else {
                        now.saturating_add(step as u64)
                    };
                    let limit = match limit {
                        Limit::Unlimited => u64::MAX,
                        Limit::PassStart => seq,
                        Limit::Seq(s) => s,
                    };
                    loop {
                        let expected = model
                            .first_key_value()
                            .filter(|(&(d, s), _)| d <= now && s < limit)
                            .map(|(_, &id)| id);
                        let got = q.pop_due(now, limit);
                        assert_eq!(got.as_ref().map(|&(_, v)| v), expected);
                        let Some((key, id)) = got else { break };
                        assert_eq!(key, keys[id]);
                        model.remove(&pending.remove(&id).unwrap());
                    }
                }
                Op::PopOne(limit) => {
                    let limit = match limit {
                        Limit::Unlimited => u64::MAX,
                        Limit::PassStart => seq,
                        Limit::Seq(s) => s,
                    };
                    let expected = model
                        .first_key_value()
                        .filter(|(&(d, s), _)| d <= now && s < limit)
                        .map(|(_, &id)| id);
                    let got = q.pop_due(now, limit).map(|(_, v)| v);
                    assert_eq!(got, expected);
                    if let Some(id) = got {
                        model.remove(&pending.remove(&id).unwrap());
                    }
                }
            }
            assert_eq!(q.len(), model.len());
            assert_eq!(q.next_seq(), seq);
            assert_eq!(q.next_deadline(), model.keys().next().map(|&(d, _)| d));
            q.check();
        }
        for (&id, &(d, _)) in &pending {
            assert_eq!(q.deadline(keys[id]), Some(d));
        }
        let mut listed: Vec<_> = q.iter().map(|(k, d, &id)| (id, k, d)).collect();
        listed.sort_unstable_by_key(|&(id, _, _)| id);
        let mut expected: Vec<_> = pending.iter().map(|(&id, &(d, _))| (id, keys[id], d)).collect();
        expected.sort_unstable_by_key(|&(id, _, _)| id);
        assert_eq!(listed, expected);
        // Drain the rest in order.
        let mut rest = Vec::new();
        while let Some((_, id)) = q.pop_due(u64::MAX, u64::MAX) {
            rest.push(id);
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
