//! Huge pages for large, growing vectors.
//!
//! A queue of a million timers writes tens of megabytes of fresh memory,
//! and on a virtual machine each 4 KiB page the kernel faults in and zeroes
//! costs about a microsecond: a tenth of the cost of scheduling a timer.
//! Asking for transparent huge pages (`MADV_HUGEPAGE`) on those vectors
//! turns 512 faults into one. Systems whose THP setting is `madvise` (a
//! common default) only give huge pages to memory that asks.

use std::mem::size_of;

/// Vectors whose new buffer would be smaller than this grow as usual: only
/// a buffer spanning a whole aligned 2 MiB region can get a huge page.
const HUGE_FROM: usize = 4 << 20;

/// `v.push(x)`, except that when `v` is large and full it moves to a new
/// buffer that has asked for huge pages before anything was written to it.
#[inline]
pub(crate) fn push<T>(v: &mut Vec<T>, x: T) {
    if v.len() == v.capacity() && v.capacity().saturating_mul(2 * size_of::<T>()) >= HUGE_FROM {
        grow(v);
    }
    v.push(x);
}

#[cold]
fn grow<T>(v: &mut Vec<T>) {
    let mut bigger = Vec::with_capacity(v.capacity() * 2);
    advise_huge(&mut bigger);
    bigger.append(v);
    *v = bigger;
}

/// Marks the pages of `v`'s spare capacity as wanting huge pages. A hint:
/// failure (no THP support, or THP disabled) changes nothing.
fn advise_huge<T>(v: &mut Vec<T>) {
    const PAGE: usize = 4096;
    let bytes = v.capacity() * size_of::<T>();
    let start = v.as_mut_ptr() as usize;
    let first = start.next_multiple_of(PAGE);
    let end = (start + bytes) & !(PAGE - 1);
    if end <= first {
        return;
    }
    #[cfg(target_os = "linux")]
    // SAFETY: the range lies within `v`'s allocation, which this function
    // borrows mutably, and `MADV_HUGEPAGE` only changes how the kernel may
    // back those pages, never their contents or their mapping: no memory
    // the program can see is altered.
    unsafe {
        let _ = rustix::mm::madvise(first as *mut _, end - first, rustix::mm::Advice::LinuxHugepage);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn growth_past_the_threshold_keeps_every_element_in_order() {
        let mut v: Vec<u64> = Vec::new();
        let count = 3 * HUGE_FROM / size_of::<u64>();
        let mut grown_large = 0;
        for i in 0..count as u64 {
            let before = v.capacity();
            push(&mut v, i * 7);
            if v.capacity() != before && before * size_of::<u64>() * 2 >= HUGE_FROM {
                assert_eq!(v.capacity(), before * 2, "a large vector doubles");
                grown_large += 1;
            }
        }
        assert!(grown_large >= 2, "the huge-page path was taken");
        assert_eq!(v.len(), count);
        assert!(v.iter().enumerate().all(|(i, &x)| x == i as u64 * 7));
    }

    #[test]
    fn zero_sized_elements_never_take_the_huge_path() {
        let mut v: Vec<()> = Vec::new();
        for _ in 0..1000 {
            push(&mut v, ());
        }
        assert_eq!(v.len(), 1000);
    }
}
