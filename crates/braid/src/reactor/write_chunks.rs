//! Emptied write buffers kept by the reactor for the next connection that
//! needs one.
//!
//! A connection that writes by completion (io_uring) frees its write buffer
//! once a send drains it, so that an idle connection holds no memory for its
//! last reply. Under load that is one allocation, and a few reallocations as
//! the buffer grows, for every batch of replies. The reactor keeps a few of
//! those emptied buffers instead and lends them out again: the memory a
//! connection drops goes to the next one that writes, and what the pool
//! holds is bounded in count and size, so it never grows with the number of
//! connections.

/// How many emptied buffers are kept.
const KEEP: usize = 64;
/// Buffers larger than this are freed rather than kept, so the pool never
/// holds more than `KEEP` times this much.
const MAX_CAPACITY: usize = 16 * 1024;

/// The reactor's spare write buffers.
#[derive(Default)]
pub(crate) struct WriteChunks {
    spare: Vec<Vec<u8>>,
}

impl WriteChunks {
    /// An empty buffer, with room from an earlier use if one is kept.
    pub fn take(&mut self) -> Vec<u8> {
        self.spare.pop().unwrap_or_default()
    }

    /// Keeps `chunk`'s memory for a later [`WriteChunks::take`], if it is
    /// worth keeping and there is room; frees it otherwise.
    pub fn give(&mut self, mut chunk: Vec<u8>) {
        let cap = chunk.capacity();
        if cap == 0 || cap > MAX_CAPACITY || self.spare.len() >= KEEP {
            return;
        }
        chunk.clear();
        self.spare.push(chunk);
    }

    /// Buffers kept now.
    #[cfg(test)]
    pub fn kept(&self) -> usize {
        self.spare.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_given_buffer_comes_back_empty_with_its_room() {
        let mut pool = WriteChunks::default();
        let mut v = Vec::with_capacity(2048);
        v.extend_from_slice(b"reply");
        let at = v.as_ptr();
        pool.give(v);
        let back = pool.take();
        assert!(back.is_empty());
        assert_eq!(back.as_ptr(), at, "the same memory is lent again");
        assert!(back.capacity() >= 2048);
        assert_eq!(pool.take().capacity(), 0, "an empty pool lends a new, unallocated buffer");
    }

    #[test]
    fn the_pool_is_bounded_in_count_and_in_size() {
        let mut pool = WriteChunks::default();
        for _ in 0..KEEP * 3 {
            pool.give(Vec::with_capacity(128));
        }
        assert_eq!(pool.kept(), KEEP);
        let mut pool = WriteChunks::default();
        pool.give(Vec::with_capacity(MAX_CAPACITY + 1));
        pool.give(Vec::new());
        assert_eq!(pool.kept(), 0, "a big buffer and an unallocated one are not kept");
    }
}
