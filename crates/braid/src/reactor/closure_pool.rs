//! Pending closures, stored by type.
//!
//! `call_later` takes any `FnOnce`. Boxing each one would cost a heap
//! allocation and a free per call, a large share of a schedule+cancel.
//! Instead every closure *type* gets its own slab, a `Pool<F>` found by
//! `TypeId`: a closure is moved into a vector slot, and the slot is reused
//! once the closure has run or been dropped. Only calling it goes through
//! a `dyn` call (on the pool). There are as many pools as call sites that
//! schedule, a small fixed number in any program.

use std::any::{Any, TypeId};
use std::cell::{Cell, OnceCell, RefCell};
use std::collections::HashMap;

use super::guard::CallbackResult;
use crate::error::Failure;
use crate::sys::big_vec::BigVec;
use crate::sys::prefetch::prefetch_read;

/// A closure the reactor can run later.
pub(crate) trait Callback: 'static {
    fn invoke(self) -> Result<(), Failure>;
}

impl<F, R> Callback for F
where
    F: FnOnce() -> R + 'static,
    R: CallbackResult,
{
    fn invoke(self) -> Result<(), Failure> {
        self().into_result()
    }
}

/// A pool with its closure type erased. `Any` as a supertrait lets a pool be
/// viewed as `dyn Any` (to get its type back) without a call.
trait ErasedPool: Any {
    /// Takes the closure out of `slot` and runs it.
    fn call(&self, slot: u32) -> Result<(), Failure>;
    /// Takes the closure out of `slot` and drops it.
    fn discard(&self, slot: u32);
    /// Hints the CPU to fetch the slot before it is needed.
    fn prefetch(&self, slot: u32);
}

const NONE: u32 = u32::MAX;
/// A pool this large lets go of its memory once it is empty.
const RELEASE_LEN: usize = 4096;

/// `Option<F>` rather than an enum with a free-list link, so that a closure
/// capturing a reference-counted pointer takes 8 bytes, not 16; the free
/// slots are kept on a separate stack.
struct Slots<F> {
    items: BigVec<Option<F>>,
    free: Vec<u32>,
}

struct Pool<F> {
    slots: RefCell<Slots<F>>,
}

impl<F: Callback> Pool<F> {
    fn new() -> Self {
        Pool { slots: RefCell::new(Slots { items: BigVec::new(), free: Vec::new() }) }
    }

    fn insert(&self, f: F) -> u32 {
        let mut s = self.slots.borrow_mut();
        if let Some(slot) = s.free.pop() {
            s.items[slot as usize] = Some(f);
            return slot;
        }
        let slot = u32::try_from(s.items.len())
            .ok()
            .filter(|&i| i != NONE)
            .expect("closure pool: more than 2^32 - 1 pending closures");
        s.items.push(Some(f));
        slot
    }

    /// Takes the closure out. The borrow ends before the caller runs or
    /// drops it, since either may schedule or cancel calls.
    fn take(&self, slot: u32) -> Option<F> {
        let mut s = self.slots.borrow_mut();
        let f = s.items.get_mut(slot as usize)?.take()?;
        s.free.push(slot);
        if s.free.len() == s.items.len() && s.items.len() >= RELEASE_LEN {
            s.items = BigVec::new();
            s.free = Vec::new();
        }
        Some(f)
    }
}

impl<F: Callback> ErasedPool for Pool<F> {
    fn call(&self, slot: u32) -> Result<(), Failure> {
        match self.take(slot) {
            Some(f) => f.invoke(),
            None => Ok(()),
        }
    }

    fn discard(&self, slot: u32) {
        drop(self.take(slot));
    }

    fn prefetch(&self, slot: u32) {
        prefetch_read(self.slots.borrow().items.as_ptr().wrapping_add(slot as usize));
    }
}

/// Where a pending closure is: which pool, which slot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct ClosureRef {
    pool: u32,
    slot: u32,
}

/// The pools of one timer set, in the order they were created.
///
/// Pools are only ever added, and never move once made (each is boxed, in
/// chunks that are never reallocated), so a pool can be used through a
/// plain reference tied to `&self`: no `RefCell` borrow or reference count
/// per call, and a closure may create new pools while its own pool is
/// running or dropping it.
struct PoolList {
    /// Chunk `k` holds `FIRST_CHUNK << k` pools.
    chunks: [OnceCell<Chunk>; CHUNKS],
    len: Cell<u32>,
}

/// A run of pool places, each filled once.
type Chunk = Box<[OnceCell<Box<dyn ErasedPool>>]>;

const FIRST_CHUNK: usize = 8;
/// Room for about 2^27 closure types, far more than any program has.
const CHUNKS: usize = 24;

impl PoolList {
    fn new() -> Self {
        PoolList { chunks: std::array::from_fn(|_| OnceCell::new()), len: Cell::new(0) }
    }

    /// The chunk and the place in it of pool `index`.
    #[inline]
    fn locate(index: u32) -> (usize, usize) {
        let k = (index as usize / FIRST_CHUNK + 1).ilog2() as usize;
        (k, index as usize - FIRST_CHUNK * ((1 << k) - 1))
    }

    #[inline]
    fn get(&self, index: u32) -> Option<&dyn ErasedPool> {
        let (k, at) = Self::locate(index);
        Some(&**self.chunks.get(k)?.get()?.get(at)?.get()?)
    }

    fn push(&self, pool: Box<dyn ErasedPool>) -> u32 {
        let index = self.len.get();
        let (k, at) = Self::locate(index);
        let chunk = self
            .chunks
            .get(k)
            .expect("closure pools: more closure types than any program has")
            .get_or_init(|| (0..FIRST_CHUNK << k).map(|_| OnceCell::new()).collect());
        if chunk[at].set(pool).is_err() {
            unreachable!("closure pools: a pool slot was filled twice");
        }
        self.len.set(index + 1);
        index
    }
}

/// Every pool of one timer set.
pub(crate) struct ClosurePools {
    pools: PoolList,
    by_type: RefCell<HashMap<TypeId, u32>>,
    /// The last type looked up: a call site usually schedules many times.
    last: Cell<(TypeId, u32)>,
}

impl ClosurePools {
    pub fn new() -> Self {
        ClosurePools {
            pools: PoolList::new(),
            by_type: RefCell::new(HashMap::new()),
            last: Cell::new((TypeId::of::<()>(), NONE)),
        }
    }

    /// Stores `f` until it is called or discarded.
    pub fn insert<F: Callback>(&self, f: F) -> ClosureRef {
        let pool = self.pool_for::<F>();
        let any: &dyn Any = self.pools.get(pool).expect("closure pools: a looked-up pool exists");
        let typed = any.downcast_ref::<Pool<F>>().expect("closure pool: registered under another type");
        ClosureRef { pool, slot: typed.insert(f) }
    }

    /// Runs the closure (once; later calls do nothing).
    pub fn call(&self, at: ClosureRef) -> Result<(), Failure> {
        match self.pools.get(at.pool) {
            Some(pool) => pool.call(at.slot),
            None => Ok(()),
        }
    }

    /// Drops the closure without running it, freeing what it captured.
    pub fn discard(&self, at: ClosureRef) {
        if let Some(pool) = self.pools.get(at.pool) {
            pool.discard(at.slot);
        }
    }

    /// Hints the CPU to fetch the closure (see `TimerQueue::prefetch_upcoming`).
    pub fn prefetch(&self, at: ClosureRef) {
        if let Some(pool) = self.pools.get(at.pool) {
            pool.prefetch(at.slot);
        }
    }

    fn pool_for<F: Callback>(&self) -> u32 {
        let ty = TypeId::of::<F>();
        let (last_ty, last) = self.last.get();
        if last_ty == ty && last != NONE {
            return last;
        }
        let known = self.by_type.borrow().get(&ty).copied();
        let pool = match known {
            Some(pool) => pool,
            None => {
                let pool = self.pools.push(Box::new(Pool::<F>::new()));
                self.by_type.borrow_mut().insert(ty, pool);
                pool
            }
        };
        self.last.set((ty, pool));
        pool
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::rc::Rc;

    #[test]
    fn closures_run_once_and_slots_are_reused() {
        let pools = ClosurePools::new();
        let hits = Rc::new(Cell::new(0));
        let make = |n: i32| {
            let hits = hits.clone();
            move || hits.set(hits.get() + n)
        };
        let a = pools.insert(make(1));
        let b = pools.insert(make(10));
        assert_eq!(a.pool, b.pool, "one pool per closure type");
        assert_ne!(a.slot, b.slot);
        pools.call(a).unwrap();
        pools.call(a).unwrap();
        assert_eq!(hits.get(), 1, "a closure runs at most once");
        let c = pools.insert(make(100));
        assert_eq!(c.slot, a.slot, "a freed slot is reused");
        pools.discard(b);
        pools.call(b).unwrap();
        pools.call(c).unwrap();
        assert_eq!(hits.get(), 101);
        assert_eq!(Rc::strong_count(&hits), 1, "every capture was dropped");
    }

    #[test]
    fn different_types_get_different_pools() {
        let pools = ClosurePools::new();
        let a = pools.insert(|| ());
        let b =
            pools.insert(|| -> Result<(), crate::error::Error> { Err(crate::error::Error::AlreadyCalled) });
        let c = pools.insert(Box::new(|| ()) as Box<dyn FnOnce()>);
        assert!(a.pool != b.pool && b.pool != c.pool && a.pool != c.pool);
        assert!(pools.call(a).is_ok());
        assert!(pools.call(b).is_err(), "the closure's error comes back");
        assert!(pools.call(c).is_ok());
    }

    #[test]
    fn a_closure_may_schedule_into_the_pools_while_running_or_dropping() {
        let pools = Rc::new(ClosurePools::new());
        struct OnDrop(Rc<ClosurePools>);
        impl Drop for OnDrop {
            fn drop(&mut self) {
                // A new closure type, so a new pool, from inside a drop.
                self.0.insert(|| Ok::<(), crate::error::Error>(()));
            }
        }
        let guard = OnDrop(pools.clone());
        let inner = pools.clone();
        let run = pools.insert(move || {
            inner.insert(|| ());
        });
        let dropped = pools.insert(move || drop(guard));
        pools.call(run).unwrap();
        pools.discard(dropped);
        assert_eq!(pools.pools.len.get(), 4);
    }

    #[test]
    fn pools_are_found_across_chunks() {
        let list = PoolList::new();
        let count = FIRST_CHUNK * 15 + 3; // into the fifth chunk
        for i in 0..count {
            assert_eq!(list.push(Box::new(Pool::<fn()>::new())), i as u32);
        }
        assert_eq!(PoolList::locate(0), (0, 0));
        assert_eq!(PoolList::locate(FIRST_CHUNK as u32 - 1), (0, FIRST_CHUNK - 1));
        assert_eq!(PoolList::locate(FIRST_CHUNK as u32), (1, 0));
        assert_eq!(PoolList::locate(3 * FIRST_CHUNK as u32), (2, 0));
        for i in 0..count as u32 {
            assert!(list.get(i).is_some(), "pool {i}");
        }
        assert!(list.get(count as u32).is_none());
        assert!(list.get(u32::MAX).is_none(), "far out of range is simply absent");
    }

    #[test]
    fn an_emptied_large_pool_lets_go_of_its_memory() {
        let make = |i: u64| move || assert!(i < u64::MAX);
        let pool = Pool::new();
        let slots: Vec<_> = (0..RELEASE_LEN as u64).map(|i| pool.insert(make(i))).collect();
        assert!(pool.slots.borrow().items.capacity() >= RELEASE_LEN);
        for slot in slots {
            assert!(pool.take(slot).is_some());
        }
        assert_eq!(pool.slots.borrow().items.capacity(), 0);
        assert!(pool.take(0).is_none(), "a stale slot is harmless");
    }
}
