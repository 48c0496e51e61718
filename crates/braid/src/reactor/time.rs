//! Time: `call_later` and the `DelayedCall` handle it returns.
//!
//! Each scheduled call is one allocation that holds the closure and the
//! call's state; the queue and every `DelayedCall` handle share it. The
//! reactor and the deterministic `testing::Clock` both keep a [`Timers`],
//! differing only in where "now" comes from, so a `DelayedCall` behaves the
//! same whichever scheduled it.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::rc::{Rc, Weak};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::guard::{self, CallbackResult};
use super::timer_queue::{TimerKey, TimerQueue};
use crate::error::{Error, Failure};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CallState {
    Pending,
    Called,
    Cancelled,
}

/// The shared part of one scheduled call.
trait CallNode {
    fn state(&self) -> &Cell<CallState>;
    fn key(&self) -> &Cell<TimerKey>;
    /// Runs the closure (once); later calls do nothing.
    fn fire(&self) -> Result<(), Failure>;
    /// Drops the closure, freeing what it captured.
    fn discard(&self);
}

struct Node<F> {
    state: Cell<CallState>,
    key: Cell<TimerKey>,
    f: Cell<Option<F>>,
}

impl<F, R> CallNode for Node<F>
where
    F: FnOnce() -> R,
    R: CallbackResult,
{
    fn state(&self) -> &Cell<CallState> {
        &self.state
    }
    fn key(&self) -> &Cell<TimerKey> {
        &self.key
    }
    fn fire(&self) -> Result<(), Failure> {
        match self.f.take() {
            Some(f) => f().into_result(),
            None => Ok(()),
        }
    }
    fn discard(&self) {
        drop(self.f.take());
    }
}

/// Where a timer set reads the current time.
pub(crate) enum TimeSource {
    /// The monotonic clock, counted from a process-wide origin so every
    /// reactor in the process agrees on `seconds()`.
    Monotonic,
    /// Time that moves only when told to (`testing::Clock`), in nanoseconds.
    Manual(Cell<u64>),
}

fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

/// A queue of delayed calls and the clock that says when they are due.
pub(crate) struct Timers {
    queue: RefCell<TimerQueue<Rc<dyn CallNode>>>,
    source: TimeSource,
}

/// Nanoseconds in a duration, saturating (a delay of 2^64 ns or more means
/// "never", and must not wrap around to "soon").
fn saturating_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Timers {
    pub fn new(source: TimeSource) -> Rc<Timers> {
        if matches!(source, TimeSource::Monotonic) {
            origin();
        }
        Rc::new(Timers { queue: RefCell::new(TimerQueue::new()), source })
    }

    /// Now, in nanoseconds since the origin.
    #[inline]
    pub fn now_ns(&self) -> u64 {
        match &self.source {
            TimeSource::Monotonic => saturating_nanos(origin().elapsed()),
            TimeSource::Manual(now) => now.get(),
        }
    }

    /// Now, in seconds since the origin.
    pub fn seconds(&self) -> f64 {
        self.now_ns() as f64 / 1e9
    }

    /// Moves manual time forward (no-op for the monotonic source).
    pub fn advance(&self, by: Duration) {
        if let TimeSource::Manual(now) = &self.source {
            now.set(now.get().saturating_add(saturating_nanos(by)));
        }
    }

    /// Schedules `f` to run `delay` from now.
    pub fn call_later<F, R>(self: &Rc<Self>, delay: Duration, f: F) -> DelayedCall
    where
        F: FnOnce() -> R + 'static,
        R: CallbackResult + 'static,
    {
        let deadline = self.now_ns().saturating_add(saturating_nanos(delay));
        let node: Rc<dyn CallNode> = Rc::new(Node {
            state: Cell::new(CallState::Pending),
            key: Cell::new(TimerKey { index: 0, generation: 0 }),
            f: Cell::new(Some(f)),
        });
        let key = self.queue.borrow_mut().insert(deadline, node.clone());
        node.key().set(key);
        DelayedCall { node, timers: Rc::downgrade(self) }
    }

    /// The time until the earliest pending call, `None` if there is none.
    pub fn timeout(&self) -> Option<Duration> {
        let next = self.queue.borrow().next_deadline()?;
        Some(Duration::from_nanos(next.saturating_sub(self.now_ns())))
    }

    /// Runs every call due now, in deadline order (ties in scheduling
    /// order). Calls scheduled while this runs wait for the next pass, even
    /// if they are already due. Returns how many ran.
    pub fn run_due(&self) -> usize {
        let now = self.now_ns();
        let limit = self.queue.borrow().next_seq();
        let mut ran = 0;
        loop {
            let popped = self.queue.borrow_mut().pop_due(now, limit);
            let Some((_, node)) = popped else { break };
            node.state().set(CallState::Called);
            ran += 1;
            guard::run_logged(|| "in a delayed call".to_string(), || node.fire());
        }
        ran
    }

    /// Handles to every pending call.
    pub fn pending(self: &Rc<Self>) -> Vec<DelayedCall> {
        let weak = Rc::downgrade(self);
        self.queue
            .borrow()
            .iter()
            .map(|(_, _, node)| DelayedCall { node: node.clone(), timers: weak.clone() })
            .collect()
    }
}

/// A handle to a call scheduled with `call_later`: cancel it, move it, ask
/// about it. Clones refer to the same call.
#[derive(Clone)]
pub struct DelayedCall {
    node: Rc<dyn CallNode>,
    timers: Weak<Timers>,
}

impl DelayedCall {
    fn check_pending(&self) -> Result<Rc<Timers>, Error> {
        match self.node.state().get() {
            CallState::Called => Err(Error::AlreadyCalled),
            CallState::Cancelled => Err(Error::AlreadyCancelled),
            // A reactor that is gone will never run the call: treat it as
            // cancelled rather than pretending it can still be moved.
            CallState::Pending => self.timers.upgrade().ok_or(Error::AlreadyCancelled),
        }
    }

    /// Unschedules the call. Fails with `AlreadyCalled` or `AlreadyCancelled`.
    /// The closure is dropped at once, freeing what it captured.
    pub fn cancel(&self) -> Result<(), Error> {
        let timers = self.check_pending()?;
        timers.queue.borrow_mut().remove(self.node.key().get());
        self.node.state().set(CallState::Cancelled);
        self.node.discard();
        Ok(())
    }

    /// Reschedules the call to run `delay` from now.
    pub fn reset(&self, delay: Duration) -> Result<(), Error> {
        let timers = self.check_pending()?;
        let deadline = timers.now_ns().saturating_add(saturating_nanos(delay));
        timers.queue.borrow_mut().reschedule(self.node.key().get(), deadline);
        Ok(())
    }

    /// Pushes the call `by` later than it is now scheduled.
    pub fn delay(&self, by: Duration) -> Result<(), Error> {
        let timers = self.check_pending()?;
        let mut queue = timers.queue.borrow_mut();
        let key = self.node.key().get();
        if let Some(current) = queue.deadline(key) {
            queue.reschedule(key, current.saturating_add(saturating_nanos(by)));
        }
        Ok(())
    }

    /// True until the call has run or been cancelled.
    pub fn active(&self) -> bool {
        self.node.state().get() == CallState::Pending && self.timers.strong_count() > 0
    }

    /// True once the call has run.
    pub fn called(&self) -> bool {
        self.node.state().get() == CallState::Called
    }

    /// True once the call has been cancelled.
    pub fn cancelled(&self) -> bool {
        self.node.state().get() == CallState::Cancelled
    }

    /// When the call is due, in the seconds of `Reactor::seconds()`; `None`
    /// once it has run or been cancelled.
    pub fn time(&self) -> Option<f64> {
        let timers = self.check_pending().ok()?;
        let deadline = timers.queue.borrow().deadline(self.node.key().get())?;
        Some(deadline as f64 / 1e9)
    }
}

impl PartialEq for DelayedCall {
    /// A delayed call equals only itself (and its clones).
    fn eq(&self, other: &Self) -> bool {
        Rc::ptr_eq(&self.node, &other.node)
    }
}

impl Eq for DelayedCall {}

impl fmt::Debug for DelayedCall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.node.state().get();
        let mut d = f.debug_struct("DelayedCall");
        d.field("id", &(Rc::as_ptr(&self.node) as *const ()));
        if let (CallState::Pending, Some(timers)) = (state, self.timers.upgrade()) {
            if let Some(deadline) = timers.queue.borrow().deadline(self.node.key().get()) {
                let left = deadline.saturating_sub(timers.now_ns()) as f64 / 1e9;
                d.field("due_in_seconds", &left);
            }
        }
        d.field("state", &state).finish()
    }
}

/// Something that can schedule calls: the reactor, or the deterministic
/// `testing::Clock`. Code that only needs time (backoff, timeouts, looping
/// calls) takes `Rc<dyn ReactorTime>`, so tests can drive it by hand.
pub trait ReactorTime {
    /// The current time in seconds on this scheduler's scale.
    fn seconds(&self) -> f64;
    /// Schedules `f` after `delay` (the object-safe form of `call_later`).
    fn schedule(&self, delay: Duration, f: Box<dyn FnOnce()>) -> DelayedCall;
    /// Every pending call.
    fn pending_calls(&self) -> Vec<DelayedCall>;
}
