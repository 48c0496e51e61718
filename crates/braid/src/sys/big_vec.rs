//! A vector for collections that may hold millions of small elements.
//!
//! A queue of a million timers writes tens of megabytes of fresh memory,
//! and writing fresh memory (faulting pages in, zeroing them) was the
//! largest cost of scheduling. A `Vec` makes it worse in two ways: each
//! doubling copies everything into a new buffer, whose pages are faulted in
//! again, so a vector grown to N bytes has touched about 2N; and what the
//! allocator hands back depends on what the rest of the process freed
//! before, so the same work took from 62 to 160 ns per timer from one run
//! to the next.
//!
//! [`BigVec`] keeps small vectors on the heap, like `Vec`. From
//! [`MAP_FROM`] bytes on (Linux), it owns an anonymous memory mapping:
//!
//! * it grows with `mremap`, which moves page-table entries, never the
//!   data, so no element is copied and no page is faulted in twice;
//! * the mapping is aligned to 2 MiB and asks for transparent huge pages
//!   (`MADV_HUGEPAGE`), so the kernel can fault in 2 MiB at a time, and
//!   when a move is needed, whole huge pages move with it.
//!
//! Mappings are made of whole pages of the running kernel's size (4, 16 or
//! 64 KiB), read once from the system: the kernel refuses to unmap from an
//! address inside a page, so with a hard-coded 4 KiB page the trimming of a
//! fresh mapping would fail on a 16 KiB kernel and leave up to 2 MiB of
//! address space behind on every growth. Elements may be aligned to at
//! most [`MIN_PAGE`] (checked at compile time), the least any page is.

use std::alloc::{self, Layout};
use std::marker::PhantomData;
use std::mem::size_of;
use std::ops::{Deref, DerefMut};
use std::ptr::{self, NonNull};

/// Capacities of at least this many bytes live in their own mapping. Below
/// it, the heap's reuse of freed memory is worth more than remapping.
#[cfg(target_os = "linux")]
pub(crate) const MAP_FROM: usize = 256 << 10;
#[cfg(not(target_os = "linux"))]
pub(crate) const MAP_FROM: usize = usize::MAX;

/// The huge page size the mappings are aligned to (x86-64 and arm64 with
/// 4 KiB pages; elsewhere the alignment is merely harmless), unless pages
/// themselves are larger.
const HUGE: usize = 2 << 20;
/// The smallest page size of any system: the alignment every mapping has.
pub(crate) const MIN_PAGE: usize = 4096;

/// The kernel's page size (a power of two, at least [`MIN_PAGE`]).
fn page_size() -> usize {
    #[cfg(test)]
    if let Some(pretend) = tests::PRETEND_PAGE.with(|p| p.get()) {
        return pretend;
    }
    use std::sync::atomic::{AtomicUsize, Ordering};
    static PAGE: AtomicUsize = AtomicUsize::new(0);
    match PAGE.load(Ordering::Relaxed) {
        0 => {
            // SAFETY: sysconf only reads a system parameter.
            let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
            let page =
                usize::try_from(page).ok().filter(|p| p.is_power_of_two()).unwrap_or(MIN_PAGE).max(MIN_PAGE);
            PAGE.store(page, Ordering::Relaxed);
            page
        }
        page => page,
    }
}

/// What mappings are aligned to: a huge page, or a page if that is larger.
fn huge() -> usize {
    HUGE.max(page_size())
}

/// A growable array: `Vec`'s storage and the subset of its methods the
/// timer queue and closure pools use.
pub(crate) struct BigVec<T> {
    ptr: NonNull<T>,
    len: usize,
    cap: usize,
    /// Bytes mapped when the storage is a mapping; 0 when on the heap.
    mapped: usize,
    _owns: PhantomData<T>,
}

impl<T> Default for BigVec<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> BigVec<T> {
    pub const fn new() -> Self {
        let cap = if size_of::<T>() == 0 { usize::MAX } else { 0 };
        BigVec { ptr: NonNull::dangling(), len: 0, cap, mapped: 0, _owns: PhantomData }
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Whether the storage is its own mapping (for tests).
    #[cfg(test)]
    fn is_mapped(&self) -> bool {
        self.mapped != 0
    }

    #[inline]
    pub fn push(&mut self, x: T) {
        if self.len == self.cap {
            self.grow(self.len + 1);
        }
        // SAFETY: `len < cap`, so the slot is within the storage, and it
        // holds no live element (elements are `..len`).
        unsafe { self.ptr.as_ptr().add(self.len).write(x) };
        self.len += 1;
    }

    pub fn pop(&mut self) -> Option<T> {
        if self.len == 0 {
            return None;
        }
        self.len -= 1;
        // SAFETY: the element at the old `len - 1` was live; lowering `len`
        // first hands its ownership to the caller exactly once.
        Some(unsafe { self.ptr.as_ptr().add(self.len).read() })
    }

    /// Drops the elements from `len` on.
    pub fn truncate(&mut self, len: usize) {
        if len >= self.len {
            return;
        }
        let tail = ptr::slice_from_raw_parts_mut(
            // SAFETY: `len < self.len <= cap`: within the storage.
            unsafe { self.ptr.as_ptr().add(len) },
            self.len - len,
        );
        // Lowered first, so a panicking destructor leaks rather than
        // double-drops.
        self.len = len;
        // SAFETY: the tail's elements were live and are no longer counted.
        unsafe { ptr::drop_in_place(tail) };
    }

    pub fn clear(&mut self) {
        self.truncate(0);
    }

    /// Keeps the elements for which `keep` is true, in order.
    pub fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) {
        let len = self.len;
        // Elements leak rather than double-drop if `keep` panics.
        self.len = 0;
        let base = self.ptr.as_ptr();
        let mut kept = 0;
        for i in 0..len {
            // SAFETY: `i < len`: a live element, each visited once; it is
            // either moved down to `kept <= i` or dropped, never both.
            unsafe {
                let at = base.add(i);
                if keep(&*at) {
                    if kept != i {
                        ptr::copy_nonoverlapping(at, base.add(kept), 1);
                    }
                    kept += 1;
                } else {
                    ptr::drop_in_place(at);
                }
            }
        }
        self.len = kept;
    }

    /// Drops the first `n` elements and moves the rest to the front.
    pub fn remove_front(&mut self, n: usize) {
        let n = n.min(self.len);
        let base = self.ptr.as_ptr();
        let rest = self.len - n;
        self.len = 0;
        // SAFETY: `..n` are live and dropped once; `n..n + rest` are live
        // and moved (overlapping ranges allowed by `copy`) to `..rest`.
        unsafe {
            ptr::drop_in_place(ptr::slice_from_raw_parts_mut(base, n));
            ptr::copy(base.add(n), base, rest);
        }
        self.len = rest;
    }

    pub fn extend_from_slice(&mut self, items: &[T])
    where
        T: Copy,
    {
        if self.cap - self.len < items.len() {
            self.grow(self.len.checked_add(items.len()).expect("capacity overflow"));
        }
        // SAFETY: there is room for `items.len()` more; a `Copy` slice
        // cannot overlap storage this vector owns exclusively.
        unsafe {
            ptr::copy_nonoverlapping(items.as_ptr(), self.ptr.as_ptr().add(self.len), items.len());
        }
        self.len += items.len();
    }

    /// Makes room for at least `min_cap` elements, at least doubling.
    #[cold]
    fn grow(&mut self, min_cap: usize) {
        assert!(size_of::<T>() != 0, "capacity overflow");
        let cap = min_cap.max(self.cap.saturating_mul(2)).max(8);
        let bytes = cap.checked_mul(size_of::<T>()).filter(|&b| b <= isize::MAX as usize);
        let bytes = bytes.expect("capacity overflow");
        // Where no mapping can be made (the process's mapping count or
        // address-space limit reached), the heap serves instead.
        if bytes < MAP_FROM || !self.grow_mapped(bytes) {
            self.grow_on_heap(cap);
        }
    }

    fn grow_on_heap(&mut self, cap: usize) {
        let layout = Layout::array::<T>(cap).expect("capacity overflow");
        let new = if self.mapped != 0 {
            // A mapping that could not grow moves to the heap.
            // SAFETY: `layout` has a non-zero size (`cap >= 8`, `T` sized).
            let new = unsafe { alloc::alloc(layout) };
            if !new.is_null() {
                // SAFETY: the mapping holds `self.len` live elements; the
                // new buffer has room for `cap >= self.len`; distinct memory.
                unsafe { ptr::copy_nonoverlapping(self.ptr.as_ptr(), new.cast::<T>(), self.len) };
                self.free_storage();
            }
            new
        } else if self.cap == 0 {
            // SAFETY: as above.
            unsafe { alloc::alloc(layout) }
        } else {
            // SAFETY: the storage was allocated with `array::<T>(self.cap)`,
            // and the new size is non-zero and was checked above.
            unsafe {
                alloc::realloc(self.ptr.as_ptr().cast(), Layout::array::<T>(self.cap).unwrap(), layout.size())
            }
        };
        self.ptr = NonNull::new(new.cast()).unwrap_or_else(|| alloc::handle_alloc_error(layout));
        self.cap = cap;
    }

    /// Moves or grows the storage into a mapping of at least `bytes`;
    /// false, with nothing changed, if no mapping could be made.
    #[cfg(target_os = "linux")]
    fn grow_mapped(&mut self, bytes: usize) -> bool {
        const {
            assert!(
                std::mem::align_of::<T>() <= MIN_PAGE,
                "BigVec: a mapping is only page aligned; elements may not be aligned to more"
            )
        };
        let len = mapping_len(bytes);
        let new = if self.mapped == 0 {
            let Some(new) = map(len) else { return false };
            // SAFETY: the heap storage holds `self.len` live elements, the
            // mapping has room for more, and they are distinct memory.
            unsafe { ptr::copy_nonoverlapping(self.ptr.as_ptr(), new.cast::<T>(), self.len) };
            self.free_storage();
            new
        } else {
            match remap(self.ptr.as_ptr().cast(), self.mapped, len) {
                Some(new) => new,
                None => return false,
            }
        };
        self.ptr = NonNull::new(new.cast()).expect("mmap returned null");
        self.mapped = len;
        self.cap = len / size_of::<T>();
        true
    }

    #[cfg(not(target_os = "linux"))]
    fn grow_mapped(&mut self, _bytes: usize) -> bool {
        false
    }

    /// Frees the storage (elements must already be dropped or moved).
    fn free_storage(&mut self) {
        if self.mapped != 0 {
            #[cfg(target_os = "linux")]
            unmap(self.ptr.as_ptr().cast(), self.mapped);
        } else if self.cap != 0 && size_of::<T>() != 0 {
            // SAFETY: heap storage allocated with this very layout.
            unsafe { alloc::dealloc(self.ptr.as_ptr().cast(), Layout::array::<T>(self.cap).unwrap()) };
        }
        self.mapped = 0;
    }
}

impl<T> Drop for BigVec<T> {
    fn drop(&mut self) {
        self.clear();
        self.free_storage();
    }
}

impl<T> Deref for BigVec<T> {
    type Target = [T];
    #[inline]
    fn deref(&self) -> &[T] {
        // SAFETY: `..len` are live, initialized elements in storage this
        // vector owns; the pointer is non-null and aligned.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<T> DerefMut for BigVec<T> {
    #[inline]
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `deref`, and `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl<'a, T> IntoIterator for &'a BigVec<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

/// The mapping size for `bytes`: whole pages, and whole huge pages once
/// it spans one, so that no huge page is left half used at the end.
fn mapping_len(bytes: usize) -> usize {
    let unit = if bytes >= huge() { huge() } else { page_size() };
    bytes.div_ceil(unit) * unit
}

/// A fresh read-write anonymous mapping of `len` bytes (whole pages),
/// aligned to [`huge()`] and advised to use huge pages; `None` if the kernel
/// refuses one.
#[cfg(target_os = "linux")]
fn map(len: usize) -> Option<*mut u8> {
    use rustix::mm::{MapFlags, ProtFlags};
    #[cfg(test)]
    if tests::REFUSE_MAPS.with(|r| r.get()) {
        return None;
    }
    let align = huge();
    let reserve = len.checked_add(align)?;
    // SAFETY: a new private anonymous mapping at an address of the kernel's
    // choosing: no existing memory is touched.
    let base = unsafe {
        rustix::mm::mmap_anonymous(
            ptr::null_mut(),
            reserve,
            ProtFlags::READ | ProtFlags::WRITE,
            MapFlags::PRIVATE,
        )
    };
    let base = base.ok()? as usize;
    #[cfg(test)]
    tests::note_mapped(reserve);
    let start = base.next_multiple_of(align);
    let end = start + len;
    // The head and tail trimmed off lie inside the mapping just made, which
    // nothing else refers to yet; `start..start + len` stays. The head
    // starts where the kernel put the mapping (page aligned); the tail at
    // `end`, page aligned since `align` and `len` are whole pages.
    if start > base {
        // The kernel's own address: a test that pretends pages larger than
        // the real ones cannot make it aligned to those.
        unmap_unchecked(base as *mut u8, start - base);
    }
    if base + reserve > end {
        unmap(end as *mut u8, base + reserve - end);
    }
    // SAFETY: advice on our own mapping. A hint: without THP support it
    // fails and changes nothing.
    let _ = unsafe { rustix::mm::madvise(start as *mut _, len, rustix::mm::Advice::LinuxHugepage) };
    Some(start as *mut u8)
}

/// Grows the mapping at `old` (`old_len` bytes) to `len` bytes, keeping its
/// contents: in place when the addresses after it are free, otherwise by
/// moving its pages to the start of a new aligned mapping. `None`, with
/// `old` untouched, if no new mapping can be made.
#[cfg(target_os = "linux")]
fn remap(old: *mut u8, old_len: usize, len: usize) -> Option<*mut u8> {
    use rustix::mm::MremapFlags;
    // SAFETY: `old..old + old_len` is a mapping this vector owns; growing
    // in place only claims unmapped addresses after it (or fails).
    if unsafe { rustix::mm::mremap(old.cast(), old_len, len, MremapFlags::empty()) }.is_ok() {
        #[cfg(test)]
        tests::note_mapped(len - old_len);
        return Some(old);
    }
    #[cfg(test)]
    tests::MOVES.with(|m| m.set(m.get() + 1));
    let new = map(len)?;
    // SAFETY: `new..new + len` is a fresh mapping of ours, at least
    // `old_len` long; MREMAP_FIXED replaces its first `old_len` bytes with
    // the pages of `old`, which is then unmapped. Both are page aligned and
    // nothing else refers to either.
    let moved =
        unsafe { rustix::mm::mremap_fixed(old.cast(), old_len, old_len, MremapFlags::MAYMOVE, new.cast()) };
    #[cfg(test)]
    if moved.is_ok() {
        // The pages moved over as many of the new mapping's: `old` is gone.
        tests::note_unmapped(old_len);
    }
    if moved.is_err() {
        // Cannot happen with valid arguments; copy rather than fail.
        // SAFETY: distinct mappings, both at least `old_len` long.
        unsafe { ptr::copy_nonoverlapping(old, new, old_len) };
        unmap(old, old_len);
    }
    Some(new)
}

/// Unmaps `at..at + len`, part or all of a mapping made by `map` (and
/// possibly moved by `remap`) that nothing refers to any more.
#[cfg(target_os = "linux")]
fn unmap(at: *mut u8, len: usize) {
    // A test pretending larger pages refuses what such a kernel would.
    #[cfg(test)]
    if !tests::unmap_accepted(at as usize) {
        return;
    }
    unmap_unchecked(at, len);
}

#[cfg(target_os = "linux")]
fn unmap_unchecked(at: *mut u8, len: usize) {
    // SAFETY: the range is part of a mapping of ours that nothing uses (any
    // elements in it are already dropped or moved).
    if unsafe { rustix::mm::munmap(at.cast(), len) }.is_ok() {
        #[cfg(test)]
        tests::note_unmapped(len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::rc::Rc;

    thread_local! {
        /// Mappings this thread grew by moving them (not in place).
        pub(super) static MOVES: Cell<usize> = const { Cell::new(0) };
        /// Makes `map` fail on this thread, as when the process has run out
        /// of mappings or address space.
        pub(super) static REFUSE_MAPS: Cell<bool> = const { Cell::new(false) };
        /// A page size to pretend on this thread (16 or 64 KiB kernels).
        pub(super) static PRETEND_PAGE: Cell<Option<usize>> = const { Cell::new(None) };
        /// Bytes this thread's vectors hold mapped, by their own account.
        static MAPPED: Cell<isize> = const { Cell::new(0) };
        /// Unmaps refused because they started inside a page.
        static REFUSED: Cell<usize> = const { Cell::new(0) };
    }

    pub(super) fn note_mapped(len: usize) {
        MAPPED.with(|m| m.set(m.get() + len as isize));
    }

    pub(super) fn note_unmapped(len: usize) {
        MAPPED.with(|m| m.set(m.get() - len as isize));
    }

    /// Whether `munmap(at, len)` would be accepted with the page size in
    /// force: the kernel refuses an address inside a page (a length it
    /// rounds up, which only the end of a mapping may need). Counts refusals.
    pub(super) fn unmap_accepted(at: usize) -> bool {
        let accepted = at.is_multiple_of(page_size());
        if !accepted {
            REFUSED.with(|r| r.set(r.get() + 1));
        }
        accepted
    }

    /// Maps the page right after `v`'s mapping, so it cannot grow in place;
    /// `None` if something is mapped there already (it cannot grow then
    /// either).
    #[cfg(target_os = "linux")]
    fn block_after<T>(v: &BigVec<T>) -> Option<*mut std::ffi::c_void> {
        use rustix::mm::{MapFlags, ProtFlags};
        let end = v.as_ptr() as usize + v.mapped;
        // SAFETY: FIXED_NOREPLACE maps only if nothing is mapped there, so
        // no existing memory is replaced; the page is ours until `unblock`.
        unsafe {
            rustix::mm::mmap_anonymous(
                end as *mut _,
                page_size(),
                ProtFlags::empty(),
                MapFlags::PRIVATE | MapFlags::FIXED_NOREPLACE,
            )
        }
        .ok()
    }

    #[cfg(target_os = "linux")]
    fn unblock(page: *mut std::ffi::c_void) {
        // SAFETY: a page mapped by `block_after`, used by nothing.
        unsafe { rustix::mm::munmap(page, page_size()).expect("unmap the blocker") };
    }

    #[test]
    fn growth_onto_a_mapping_and_remapping_keeps_every_element() {
        let mut v: BigVec<u64> = BigVec::new();
        let count = 4 * HUGE / size_of::<u64>() + 123;
        let mut was_mapped_at = None;
        for i in 0..count as u64 {
            v.push(i * 7);
            if was_mapped_at.is_none() && v.is_mapped() {
                was_mapped_at = Some(v.len());
            }
        }
        assert_eq!(v.len(), count);
        assert!(v.iter().enumerate().all(|(i, &x)| x == i as u64 * 7));
        if cfg!(target_os = "linux") {
            let at = was_mapped_at.expect("a large vector moves to a mapping");
            assert!(at * size_of::<u64>() <= MAP_FROM, "moved at {at} elements");
            assert_eq!(v.as_ptr() as usize % HUGE, 0, "the mapping is huge-page aligned");
        }
        assert_eq!(v.pop(), Some((count as u64 - 1) * 7));
        v.truncate(10);
        assert_eq!(&v[..], &(0..10).map(|i| i * 7).collect::<Vec<u64>>()[..]);
    }

    #[test]
    fn elements_are_dropped_once_on_every_path() {
        let token = Rc::new(());
        let mut v = BigVec::new();
        for _ in 0..MAP_FROM.min(1 << 20) / size_of::<Rc<()>>() + 10 {
            v.push(token.clone());
        }
        let n = v.len();
        assert_eq!(Rc::strong_count(&token), n + 1);
        let mut i = 0;
        v.retain(|_| {
            i += 1;
            i % 3 != 0
        });
        assert_eq!(Rc::strong_count(&token), v.len() + 1);
        v.remove_front(5);
        assert_eq!(Rc::strong_count(&token), v.len() + 1);
        drop(v.pop());
        assert_eq!(Rc::strong_count(&token), v.len() + 1);
        drop(v);
        assert_eq!(Rc::strong_count(&token), 1);
    }

    #[test]
    fn retain_and_remove_front_keep_order() {
        let mut v = BigVec::new();
        v.extend_from_slice(&(0..100u32).collect::<Vec<_>>());
        v.retain(|&x| x % 2 == 0);
        v.remove_front(3);
        assert_eq!(&v[..], &(6..100).step_by(2).collect::<Vec<u32>>()[..]);
        v.remove_front(1000);
        assert!(v.is_empty());
        v.push(1);
        assert_eq!(&v[..], &[1]);
    }

    #[test]
    fn a_mapping_that_cannot_grow_in_place_moves_with_its_contents() {
        let mut v: BigVec<u32> = BigVec::new();
        let mut i = 0u32;
        while !v.is_mapped() {
            if cfg!(not(target_os = "linux")) || i > (MAP_FROM / 4) as u32 * 2 {
                return;
            }
            v.push(i);
            i += 1;
        }
        #[cfg(target_os = "linux")]
        {
            let blocker = block_after(&v);
            let moves = MOVES.with(Cell::get);
            let cap = v.capacity();
            while v.capacity() == cap {
                v.push(i);
                i += 1;
            }
            if blocker.is_some() {
                assert_eq!(MOVES.with(Cell::get), moves + 1, "the mapping moved");
            }
            assert!(v.iter().enumerate().all(|(k, &x)| x == k as u32), "contents survive the move");
            v.push(7);
            assert_eq!(v.last(), Some(&7));
            if let Some(page) = blocker {
                unblock(page);
            }
        }
    }

    #[test]
    fn many_mapped_vectors_grow_side_by_side() {
        let mut vs: Vec<BigVec<u32>> = (0..4).map(|_| BigVec::new()).collect();
        let per = 3 * HUGE / size_of::<u32>();
        for i in 0..per as u32 {
            for (k, v) in vs.iter_mut().enumerate() {
                v.push(i ^ k as u32);
            }
        }
        for (k, v) in vs.iter().enumerate() {
            assert_eq!(v.len(), per);
            assert!(v.iter().enumerate().all(|(i, &x)| x == i as u32 ^ k as u32));
        }
    }

    #[test]
    fn without_mappings_the_heap_serves_and_nothing_is_lost() {
        let count = 3 * MAP_FROM.min(1 << 20) / size_of::<u64>();
        // Refused from the start: the vector stays on the heap.
        REFUSE_MAPS.with(|r| r.set(true));
        let mut v: BigVec<u64> = BigVec::new();
        for i in 0..count as u64 {
            v.push(i);
        }
        assert!(!v.is_mapped());
        // Allowed again: the next growth moves it to a mapping (on Linux).
        REFUSE_MAPS.with(|r| r.set(false));
        let cap = v.capacity();
        let mut i = count as u64;
        while v.capacity() == cap {
            v.push(i);
            i += 1;
        }
        assert_eq!(v.is_mapped(), cfg!(target_os = "linux"));
        // Refused while mapped, with the page after the mapping taken so it
        // cannot grow in place either: it moves back to the heap.
        #[cfg(target_os = "linux")]
        {
            let blocker = block_after(&v);
            REFUSE_MAPS.with(|r| r.set(true));
            let cap = v.capacity();
            while v.capacity() == cap {
                v.push(i);
                i += 1;
            }
            if let Some(page) = blocker {
                assert!(!v.is_mapped(), "moved to the heap");
                unblock(page);
            }
        }
        REFUSE_MAPS.with(|r| r.set(false));
        assert!(v.iter().enumerate().all(|(k, &x)| x == k as u64));
    }

    /// Grows vectors through every mapped path with `page` pretended as the
    /// kernel's page size: every mapping stays whole pages, aligned, and
    /// nothing mapped is left behind.
    fn growth_keeps_whole_pages_with(page: usize) {
        PRETEND_PAGE.with(|p| p.set(Some(page)));
        let before = MAPPED.with(Cell::get);
        // 4100-byte elements: most capacities are not whole pages of any size.
        type Odd = [u8; 4100];
        let mut vs: Vec<BigVec<Odd>> = (0..3).map(|_| BigVec::new()).collect();
        let mut mapped_sizes = Vec::new();
        for round in 0..600u32 {
            for (k, v) in vs.iter_mut().enumerate() {
                let cap = v.capacity();
                v.push([(round as usize + k) as u8; 4100]);
                if v.capacity() != cap && v.is_mapped() {
                    assert_eq!(
                        v.mapped % page,
                        0,
                        "{page}: a mapping of {} bytes is not whole pages",
                        v.mapped
                    );
                    assert_eq!(v.as_ptr() as usize % huge(), 0, "{page}: a mapping is not aligned");
                    mapped_sizes.push(v.mapped);
                }
            }
            #[cfg(target_os = "linux")]
            if round == 300 {
                // The next growth of the first vector must move.
                if let Some(blocker) = block_after(&vs[0]) {
                    let cap = vs[0].capacity();
                    let moves = MOVES.with(Cell::get);
                    while vs[0].capacity() == cap {
                        vs[0].push([1; 4100]);
                    }
                    assert_eq!(MOVES.with(Cell::get), moves + 1, "{page}: the mapping moved");
                    assert_eq!(vs[0].mapped % page, 0);
                    unblock(blocker);
                }
            }
        }
        assert!(vs.iter().all(|v| v.iter().skip(1).all(|e| e[0] == e[4099])));
        if cfg!(target_os = "linux") {
            assert!(mapped_sizes.len() >= 3, "{page}: the vectors grew onto mappings: {mapped_sizes:?}");
        }
        drop(vs);
        assert_eq!(
            REFUSED.with(Cell::get),
            0,
            "{page}: an unmap started inside a page (the kernel refuses those)"
        );
        assert_eq!(MAPPED.with(Cell::get), before, "{page}: mapped bytes were left behind");
        PRETEND_PAGE.with(|p| p.set(None));
    }

    #[test]
    fn with_16k_pages_mappings_are_whole_pages_and_nothing_leaks() {
        growth_keeps_whole_pages_with(16 << 10);
    }

    #[test]
    fn with_64k_pages_mappings_are_whole_pages_and_nothing_leaks() {
        growth_keeps_whole_pages_with(64 << 10);
    }

    #[test]
    fn with_the_real_page_size_nothing_leaks() {
        let real = page_size();
        assert!(real.is_power_of_two() && real >= MIN_PAGE, "{real}");
        growth_keeps_whole_pages_with(real);
    }

    #[test]
    fn zero_sized_elements_never_allocate() {
        let mut v: BigVec<()> = BigVec::new();
        for _ in 0..1000 {
            v.push(());
        }
        assert_eq!(v.len(), 1000);
        assert_eq!(v.capacity(), usize::MAX);
    }
}
