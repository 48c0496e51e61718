//! A cache prefetch hint.
//!
//! Firing a burst of timers walks them in deadline order, which is a random
//! order over the memory that holds their state and closures. Asking the
//! CPU to fetch the next few ahead of time overlaps those cache misses
//! instead of paying them one after another. Unlike an ordinary load, a
//! prefetch never waits for the data and never faults.

/// Hints that `ptr` will be read soon. Any address is allowed, even a
/// dangling or out-of-bounds one: nothing is dereferenced.
#[inline(always)]
pub(crate) fn prefetch_read<T>(ptr: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `_mm_prefetch` only needs SSE, which every x86-64 CPU has, and
    // a prefetch is a hint that performs no architectural memory access: it
    // cannot fault or read memory into the program, whatever the address.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(ptr.cast::<i8>());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = ptr;
}
