//! Coordination on one thread with Deferreds: lock, semaphore, queue.
//!
//! Each waiter is a Deferred; cancelling a waiter that has not been served
//! removes it from the queue, so a later release or put skips it.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::fmt;
use std::rc::Rc;

use super::deferred::maybe_deferred;
use super::{DeferError, Deferred, Outcome};

struct SemState {
    limit: usize,
    tokens: usize,
    waiting: VecDeque<Deferred<()>>,
}

/// Limits how many operations run at once (Twisted's `DeferredSemaphore`).
///
/// [`acquire`](Self::acquire) fires at once while tokens are left, and
/// otherwise queues in FIFO order; [`release`](Self::release) hands the
/// token to the oldest waiter. Cloning gives another handle to the same
/// semaphore.
#[derive(Clone)]
pub struct DeferredSemaphore {
    state: Rc<RefCell<SemState>>,
}

impl fmt::Debug for DeferredSemaphore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.state.borrow();
        f.debug_struct("DeferredSemaphore")
            .field("limit", &st.limit)
            .field("tokens", &st.tokens)
            .field("waiting", &st.waiting.len())
            .finish()
    }
}

impl DeferredSemaphore {
    /// A semaphore with `tokens` concurrent holders; zero is
    /// [`DeferError::NoTokens`].
    pub fn new(tokens: usize) -> Result<Self, DeferError> {
        if tokens == 0 {
            return Err(DeferError::NoTokens);
        }
        Ok(DeferredSemaphore {
            state: Rc::new(RefCell::new(SemState { limit: tokens, tokens, waiting: VecDeque::new() })),
        })
    }

    /// The number of holders allowed at once.
    pub fn limit(&self) -> usize {
        self.state.borrow().limit
    }

    /// Tokens free right now.
    pub fn tokens(&self) -> usize {
        self.state.borrow().tokens
    }

    /// Acquires still waiting for a token.
    pub fn waiting(&self) -> usize {
        self.state.borrow().waiting.len()
    }

    /// A Deferred that fires when a token is ours. Cancelling it while it
    /// waits removes it from the queue (it fails with `Cancelled`);
    /// cancelling it after it fired does nothing.
    pub fn acquire(&self) -> Deferred<()> {
        let mut st = self.state.borrow_mut();
        if st.tokens > 0 {
            st.tokens -= 1;
            return Deferred::succeed(());
        }
        let d = waiter(&self.state, |st| &mut st.waiting);
        st.waiting.push_back(d.clone());
        d
    }

    /// Gives a token back, handing it to the oldest waiter if there is one.
    /// Releasing more tokens than were acquired is [`DeferError::NotAcquired`].
    pub fn release(&self) -> Result<(), DeferError> {
        loop {
            let mut st = self.state.borrow_mut();
            if let Some(waiter) = st.waiting.pop_front() {
                drop(st);
                // A waiter someone fired by hand is skipped.
                if waiter.callback(()).is_ok() {
                    return Ok(());
                }
                continue;
            }
            if st.tokens >= st.limit {
                return Err(DeferError::NotAcquired);
            }
            st.tokens += 1;
            return Ok(());
        }
    }

    /// Acquires, runs `f`, and releases once the Deferred (or result) `f`
    /// gives has fired; the returned Deferred has `f`'s result. A panic in
    /// `f` becomes a failure and still releases. Cancelling while waiting
    /// for the token withdraws the request without running `f`.
    pub fn run<T: 'static, R>(&self, f: impl FnOnce() -> R + 'static) -> Deferred<T>
    where
        R: Into<Outcome<T>>,
    {
        let sem = self.clone();
        self.acquire().then(move |acquired| match acquired {
            Err(failure) => Outcome::Done(Err(failure)),
            Ok(()) => {
                let release = Release(Some(sem));
                let d = maybe_deferred(f);
                d.add_both(move |result| {
                    release.now();
                    result
                });
                Outcome::Wait(d)
            }
        })
    }
}

/// Releases a token exactly once: when `now` is called, or when dropped
/// unused (the operation's Deferred was dropped without firing).
struct Release(Option<DeferredSemaphore>);

impl Release {
    fn now(mut self) {
        if let Some(sem) = self.0.take() {
            let _ = sem.release();
        }
    }
}

impl Drop for Release {
    fn drop(&mut self) {
        if let Some(sem) = self.0.take() {
            let _ = sem.release();
        }
    }
}

/// A mutual-exclusion lock for callback code (Twisted's `DeferredLock`): a
/// [`DeferredSemaphore`] with one token.
#[derive(Clone, Debug)]
pub struct DeferredLock {
    sem: DeferredSemaphore,
}

impl Default for DeferredLock {
    fn default() -> Self {
        Self::new()
    }
}

impl DeferredLock {
    /// An unlocked lock.
    pub fn new() -> Self {
        let state = SemState { limit: 1, tokens: 1, waiting: VecDeque::new() };
        DeferredLock { sem: DeferredSemaphore { state: Rc::new(RefCell::new(state)) } }
    }

    /// True while someone holds the lock.
    pub fn locked(&self) -> bool {
        self.sem.tokens() == 0
    }

    /// Acquires still waiting for the lock.
    pub fn waiting(&self) -> usize {
        self.sem.waiting()
    }

    /// A Deferred that fires when the lock is ours (at once if it is free).
    /// Cancelling a waiting acquire removes it from the queue.
    pub fn acquire(&self) -> Deferred<()> {
        self.sem.acquire()
    }

    /// Releases the lock, handing it to the oldest waiter. Releasing an
    /// unlocked lock is [`DeferError::NotAcquired`].
    pub fn release(&self) -> Result<(), DeferError> {
        self.sem.release()
    }

    /// Runs `f` while holding the lock, until the Deferred it gives fires.
    pub fn run<T: 'static, R>(&self, f: impl FnOnce() -> R + 'static) -> Deferred<T>
    where
        R: Into<Outcome<T>>,
    {
        self.sem.run(f)
    }
}

/// An item [`DeferredQueue::put`] refused because the queue was full
/// (Twisted's `QueueOverflow`); it hands the item back.
pub struct QueueOverflow<T>(pub T);

impl<T> QueueOverflow<T> {
    /// The refused item.
    pub fn into_inner(self) -> T {
        self.0
    }
}

impl<T> fmt::Debug for QueueOverflow<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("QueueOverflow(..)")
    }
}

impl<T> fmt::Display for QueueOverflow<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("queue is full")
    }
}

impl<T> std::error::Error for QueueOverflow<T> {}

struct QueueState<T: 'static> {
    items: VecDeque<T>,
    waiting: VecDeque<Deferred<T>>,
    size: Option<usize>,
    backlog: Option<usize>,
}

/// A queue whose `get` returns a Deferred (Twisted's `DeferredQueue`).
///
/// `size` bounds the items held (a `put` beyond it is refused with
/// [`QueueOverflow`]); `backlog` bounds the getters waiting (a `get` beyond
/// it is [`DeferError::QueueUnderflow`]). Cloning gives another handle to
/// the same queue.
pub struct DeferredQueue<T: 'static> {
    state: Rc<RefCell<QueueState<T>>>,
}

impl<T: 'static> Clone for DeferredQueue<T> {
    fn clone(&self) -> Self {
        DeferredQueue { state: Rc::clone(&self.state) }
    }
}

impl<T: 'static> Default for DeferredQueue<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: 'static> fmt::Debug for DeferredQueue<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.state.borrow();
        f.debug_struct("DeferredQueue")
            .field("items", &st.items.len())
            .field("waiting", &st.waiting.len())
            .field("size", &st.size)
            .field("backlog", &st.backlog)
            .finish()
    }
}

impl<T: 'static> DeferredQueue<T> {
    /// An unbounded queue.
    pub fn new() -> Self {
        Self::bounded(None, None)
    }

    /// A queue holding at most `size` items and `backlog` waiting getters
    /// (`None`: no limit).
    pub fn bounded(size: Option<usize>, backlog: Option<usize>) -> Self {
        DeferredQueue {
            state: Rc::new(RefCell::new(QueueState {
                items: VecDeque::new(),
                waiting: VecDeque::new(),
                size,
                backlog,
            })),
        }
    }

    /// Items waiting for a getter.
    pub fn len(&self) -> usize {
        self.state.borrow().items.len()
    }

    /// True if no items are waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Getters waiting for an item.
    pub fn waiting(&self) -> usize {
        self.state.borrow().waiting.len()
    }

    /// Hands `item` to the oldest waiting getter, or stores it. A full
    /// queue refuses it with [`QueueOverflow`], which gives it back.
    pub fn put(&self, item: T) -> Result<(), QueueOverflow<T>> {
        // Getters fired by hand no longer want an item; they are skipped
        // (and dropped only after the borrow ends).
        let mut skipped = Vec::new();
        let mut st = self.state.borrow_mut();
        let waiter = loop {
            match st.waiting.pop_front() {
                Some(w) if w.called() => skipped.push(w),
                next => break next,
            }
        };
        if let Some(waiter) = waiter {
            drop(st);
            let _ = waiter.callback(item);
            return Ok(());
        }
        if st.size.is_some_and(|size| st.items.len() >= size) {
            return Err(QueueOverflow(item));
        }
        st.items.push_back(item);
        Ok(())
    }

    /// A Deferred for the next item: fired at once if one is stored,
    /// otherwise queued behind earlier getters. Too many waiting getters is
    /// [`DeferError::QueueUnderflow`]. Cancelling a waiting get removes it.
    pub fn get(&self) -> Result<Deferred<T>, DeferError> {
        let mut st = self.state.borrow_mut();
        if let Some(item) = st.items.pop_front() {
            drop(st);
            return Ok(Deferred::succeed(item));
        }
        if st.backlog.is_some_and(|backlog| st.waiting.len() >= backlog) {
            return Err(DeferError::QueueUnderflow);
        }
        let d = waiter(&self.state, |st| &mut st.waiting);
        st.waiting.push_back(d.clone());
        Ok(d)
    }
}

/// A Deferred for a waiter queued in `waiting(state)`: cancelling it while
/// it waits takes it out of the queue, so cancelled waiters never pile up.
/// The removed Deferreds are dropped after the borrow ends, since dropping
/// one may run code that touches the state again.
fn waiter<S: 'static, T: 'static>(
    state: &Rc<RefCell<S>>,
    waiting: fn(&mut S) -> &mut VecDeque<Deferred<T>>,
) -> Deferred<T> {
    let weak = Rc::downgrade(state);
    Deferred::with_canceller(move |d: &Deferred<T>| {
        if let Some(state) = weak.upgrade() {
            let removed: VecDeque<Deferred<T>> = {
                let mut st = state.borrow_mut();
                let queue = waiting(&mut st);
                let (gone, kept) = std::mem::take(queue).into_iter().partition(|w| w.ptr_eq(d));
                *queue = kept;
                gone
            };
            drop(removed);
        }
    })
}
