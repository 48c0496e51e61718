//! The timer queue behind `call_later`. (being written)
//!
//! Deadlines are nanoseconds since the owning clock's origin. Entries with
//! equal deadlines come out in insertion order (each insert and each
//! reschedule takes the next sequence number).

/// Identifies one entry; stale keys (popped or removed) are detected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct TimerKey {
    pub(crate) index: u32,
    pub(crate) generation: u32,
}

pub(crate) struct TimerQueue<T> {
    _p: std::marker::PhantomData<T>,
}

impl<T> TimerQueue<T> {
    pub fn new() -> Self {
        todo!()
    }
    /// Adds an entry due at `deadline`; takes the next sequence number.
    pub fn insert(&mut self, _deadline: u64, _value: T) -> TimerKey {
        todo!()
    }
    /// Removes a pending entry; `None` if the key is stale.
    pub fn remove(&mut self, _key: TimerKey) -> Option<T> {
        todo!()
    }
    /// Moves a pending entry to `deadline` and gives it a fresh sequence
    /// number; false if the key is stale.
    pub fn reschedule(&mut self, _key: TimerKey, _deadline: u64) -> bool {
        todo!()
    }
    /// The deadline of a pending entry.
    pub fn deadline(&self, _key: TimerKey) -> Option<u64> {
        todo!()
    }
    /// The earliest deadline, if any entry is pending.
    pub fn next_deadline(&self) -> Option<u64> {
        todo!()
    }
    /// The sequence number the next insert/reschedule will take.
    pub fn next_seq(&self) -> u64 {
        todo!()
    }
    /// Pops the earliest entry if its deadline is `<= now` and its sequence
    /// number is `< seq_limit` (entries added during a firing pass wait for
    /// the next pass).
    pub fn pop_due(&mut self, _now: u64, _seq_limit: u64) -> Option<(TimerKey, T)> {
        todo!()
    }
    pub fn len(&self) -> usize {
        todo!()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Every pending entry, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (TimerKey, u64, &T)> + '_ {
        std::iter::empty()
    }
}
