//! Time: `call_later` and the `DelayedCall` handle it returns.
//!
//! A scheduled call costs no allocation of its own: its state sits in the
//! timer queue's slab entry, and its closure in a pool for its closure type
//! (`closure_pool`). A `DelayedCall` names the entry and is counted in it,
//! so the entry (and with it the call's fate: pending, called, cancelled)
//! lasts as long as the call is pending or any handle remains, and an id is
//! never reused under a handle. The reactor and the deterministic
//! `testing::Clock` both keep a [`Timers`], differing only in where "now"
//! comes from, so a `DelayedCall` behaves the same whichever scheduled it.
//!
//! A `DelayedCall` prints (`Display`, and `Debug` alike) as its identity
//! (its timer set and id), the seconds until it is due while pending, and
//! whether it was called or cancelled. Closures have no name or arguments
//! to show; in debug mode ([`DelayedCall::set_debug`]) each call also
//! records its closure's type name, which names the function that made
//! it, and the stack that created it, shown after the rest: capturing a
//! stack costs microseconds, too much for every call. Pending calls order
//! by when they will run (deadline, then scheduling order); a call equals
//! only itself and its clones.

use std::backtrace::Backtrace;
use std::cell::{Cell, RefCell};
use std::cmp::Ordering;
use std::collections::HashMap;
use std::fmt;
use std::num::NonZeroU32;
use std::rc::{Rc, Weak};
use std::sync::atomic::{self, AtomicBool};
use std::sync::OnceLock;
use std::time::Duration;

use super::clock::{monotonic_ns, DeadlineClock};
use super::closure_pool::{ClosurePools, ClosureRef};
use super::guard::{self, CallbackResult};
use super::timer_queue::{TimerId, TimerQueue};
use crate::error::Error;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CallState {
    Pending,
    Called,
    Cancelled,
}

/// What the queue keeps for one call: 12 bytes, so that with the queue's
/// own fields a slab entry fits in 40.
struct Call {
    closure: ClosureRef,
    /// The state in the top two bits (never zero, which lets `Option<Call>`
    /// take no extra room), the number of live `DelayedCall` handles below.
    bits: NonZeroU32,
}

const STATE_SHIFT: u32 = 30;
const HANDLES: u32 = (1 << STATE_SHIFT) - 1;

impl Call {
    fn new(closure: ClosureRef) -> Call {
        Call { closure, bits: Call::pack(CallState::Pending, 1) }
    }

    fn pack(state: CallState, handles: u32) -> NonZeroU32 {
        let tag = match state {
            CallState::Pending => 1,
            CallState::Called => 2,
            CallState::Cancelled => 3,
        };
        NonZeroU32::new(tag << STATE_SHIFT | handles).expect("the state tag is never zero")
    }

    fn state(&self) -> CallState {
        match self.bits.get() >> STATE_SHIFT {
            1 => CallState::Pending,
            2 => CallState::Called,
            _ => CallState::Cancelled,
        }
    }

    fn handles(&self) -> u32 {
        self.bits.get() & HANDLES
    }

    fn set_state(&mut self, state: CallState) {
        self.bits = Call::pack(state, self.handles());
    }

    fn add_handle(&mut self) {
        // Past 2^30 - 1 handles the count sticks, and the entry is simply
        // never freed: better than wrapping around into a use after free.
        if self.handles() < HANDLES {
            self.bits = Call::pack(self.state(), self.handles() + 1);
        }
    }

    /// Forgets one handle; true if that was the last one.
    fn drop_handle(&mut self) -> bool {
        let handles = self.handles();
        if handles == HANDLES {
            return false;
        }
        self.bits = Call::pack(self.state(), handles.saturating_sub(1));
        handles <= 1
    }
}

/// How many times one `run_due` pass may read the clock again to take calls
/// that fell due while it ran, and for how long in all.
const MAX_CATCH_UPS: u32 = 16;
const CATCH_UP_FOR: u64 = 1_000_000;

/// How far ahead of the call it is running `run_due` prefetches.
const PREFETCH_AHEAD: usize = 16;

/// Where a timer set reads the current time.
pub(crate) enum TimeSource {
    /// The monotonic clock, counted from a process-wide origin (copied
    /// here) so every reactor in the process agrees on `seconds()`; and the
    /// cheaper clock for deadlines.
    Monotonic(u64, DeadlineClock),
    /// Time that moves only when told to (`testing::Clock`), in nanoseconds.
    Manual(Cell<u64>),
}

/// The process-wide origin of `seconds()`, in `monotonic_ns` units.
fn origin_ns() -> u64 {
    static ORIGIN: OnceLock<u64> = OnceLock::new();
    *ORIGIN.get_or_init(monotonic_ns)
}

/// Whether new calls record where they were made (`DelayedCall::set_debug`).
static DEBUG: AtomicBool = AtomicBool::new(false);

/// Where a call was made, recorded in debug mode.
struct Origin {
    closure: &'static str,
    stack: Backtrace,
}

/// A queue of delayed calls and the clock that says when they are due.
pub(crate) struct Timers {
    queue: RefCell<TimerQueue<Call>>,
    closures: ClosurePools,
    source: TimeSource,
    /// The origins of calls made in debug mode, until their entries go.
    origins: RefCell<HashMap<TimerId, Origin>>,
}

/// Nanoseconds in a duration, saturating (a delay of 2^64 ns or more means
/// "never", and must not wrap around to "soon").
fn saturating_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl TimeSource {
    /// The monotonic clock, from the process-wide origin.
    pub fn monotonic() -> TimeSource {
        TimeSource::Monotonic(origin_ns(), DeadlineClock::new())
    }
}

impl Timers {
    pub fn new(source: TimeSource) -> Rc<Timers> {
        Rc::new(Timers {
            queue: RefCell::new(TimerQueue::new()),
            closures: ClosurePools::new(),
            source,
            origins: RefCell::new(HashMap::new()),
        })
    }

    /// Now, in nanoseconds since the origin.
    #[inline]
    pub fn now_ns(&self) -> u64 {
        match &self.source {
            TimeSource::Monotonic(origin, _) => monotonic_ns().saturating_sub(*origin),
            TimeSource::Manual(now) => now.get(),
        }
    }

    /// Now for computing a deadline: never earlier than `now_ns`, possibly
    /// a hair later, and cheaper to read (see `clock`).
    #[inline]
    fn deadline_now_ns(&self) -> u64 {
        match &self.source {
            TimeSource::Monotonic(origin, clock) => clock.now().saturating_sub(*origin),
            TimeSource::Manual(now) => now.get(),
        }
    }

    /// Now, in seconds since the origin: the precise clock, or the latest
    /// deadline reading if that is ahead (by a microsecond at most), so
    /// that the "now" of every deadline computed before lies at or below
    /// it (see `clock`).
    pub fn seconds(&self) -> f64 {
        let ns = match &self.source {
            TimeSource::Monotonic(origin, clock) => {
                monotonic_ns().max(clock.latest()).saturating_sub(*origin)
            }
            TimeSource::Manual(now) => now.get(),
        };
        ns as f64 / 1e9
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
        let deadline = self.deadline_now_ns().saturating_add(saturating_nanos(delay));
        let closure = self.closures.insert(f);
        let call = Call::new(closure);
        let id = self.queue.borrow_mut().insert(deadline, call);
        if DEBUG.load(atomic::Ordering::Relaxed) {
            self.record_origin(id, std::any::type_name::<F>());
        }
        DelayedCall { timers: Rc::downgrade(self), id }
    }

    /// Records where call `id` was made (debug mode): out of line, so the
    /// schedule itself stays small.
    #[cold]
    #[inline(never)]
    fn record_origin(&self, id: TimerId, closure: &'static str) {
        let origin = Origin { closure, stack: Backtrace::force_capture() };
        self.origins.borrow_mut().insert(id, origin);
    }

    /// Forgets the origin of a released entry, whose id may be reused.
    #[inline]
    fn released(&self, id: TimerId) {
        let mut origins = self.origins.borrow_mut();
        if !origins.is_empty() {
            origins.remove(&id);
        }
    }

    /// The time until the earliest pending call, `None` if there is none.
    pub fn timeout(&self) -> Option<Duration> {
        let next = self.queue.borrow_mut().next_deadline()?;
        Some(Duration::from_nanos(next.saturating_sub(self.now_ns())))
    }

    /// Runs every call due now, in deadline order (ties in scheduling
    /// order). Calls scheduled while this runs wait for the next pass, even
    /// if they are already due. Returns how many ran.
    ///
    /// In a burst, calls scheduled earlier keep falling due while the pass
    /// runs: it then reads the clock again and takes those too (a few
    /// times, for at most [`CATCH_UP_FOR`]), rather than paying a whole
    /// reactor iteration, poll included, per handful of calls.
    pub fn run_due(&self) -> usize {
        let start = self.now_ns();
        let mut now = start;
        let limit = self.queue.borrow().next_seq();
        let mut ran = 0;
        let mut ran_before_refresh = 0;
        let mut refreshes = 0;
        loop {
            let popped = {
                let mut queue = self.queue.borrow_mut();
                // Firing goes in deadline order, a random order over the
                // memory of the calls: fetch the entry a few calls ahead,
                // and the closure of one whose entry has already arrived.
                queue.prefetch_upcoming(2 * PREFETCH_AHEAD);
                if let Some(call) = queue.upcoming(PREFETCH_AHEAD) {
                    self.closures.prefetch(call.closure);
                }
                queue.pop_due(now, limit).map(|id| {
                    let call = queue.get_mut(id).expect("timers: a popped call has an entry");
                    call.set_state(CallState::Called);
                    let closure = call.closure;
                    if call.handles() == 0 {
                        queue.release(id);
                        self.released(id);
                    }
                    closure
                })
            };
            let Some(closure) = popped else {
                if ran > ran_before_refresh && refreshes < MAX_CATCH_UPS {
                    let later = self.now_ns();
                    if later > now && later - start < CATCH_UP_FOR {
                        now = later;
                        ran_before_refresh = ran;
                        refreshes += 1;
                        continue;
                    }
                }
                break;
            };
            ran += 1;
            guard::run_logged(|| "in a delayed call".to_string(), || self.closures.call(closure));
        }
        ran
    }

    /// Handles to every pending call.
    pub fn pending(self: &Rc<Self>) -> Vec<DelayedCall> {
        let weak = Rc::downgrade(self);
        let mut queue = self.queue.borrow_mut();
        let ids: Vec<TimerId> = queue.pending().map(|(id, _)| id).collect();
        ids.into_iter()
            .map(|id| {
                if let Some(call) = queue.get_mut(id) {
                    call.add_handle();
                }
                DelayedCall { timers: weak.clone(), id }
            })
            .collect()
    }

    fn state(&self, id: TimerId) -> CallState {
        self.queue.borrow_mut().get_mut(id).map_or(CallState::Cancelled, |call| call.state())
    }
}

/// A handle to a call scheduled with `call_later`: cancel it, move it, ask
/// about it. Clones refer to the same call.
///
/// Once the reactor (or `Clock`) that scheduled the call is gone, the call
/// will never run: the handle then reports it as cancelled.
pub struct DelayedCall {
    timers: Weak<Timers>,
    id: TimerId,
}

impl DelayedCall {
    /// The timer set, if it still exists, with this call's state.
    fn lookup(&self) -> Option<(Rc<Timers>, CallState)> {
        let timers = self.timers.upgrade()?;
        let state = timers.state(self.id);
        Some((timers, state))
    }

    fn check_pending(&self) -> Result<Rc<Timers>, Error> {
        match self.lookup() {
            Some((timers, CallState::Pending)) => Ok(timers),
            Some((_, CallState::Called)) => Err(Error::AlreadyCalled),
            _ => Err(Error::AlreadyCancelled),
        }
    }

    /// Unschedules the call. Fails with `AlreadyCalled` or `AlreadyCancelled`.
    /// The closure is dropped at once, freeing what it captured.
    pub fn cancel(&self) -> Result<(), Error> {
        let timers = self.timers.upgrade().ok_or(Error::AlreadyCancelled)?;
        let closure = {
            let mut queue = timers.queue.borrow_mut();
            match queue.cancel(self.id) {
                Some(call) => {
                    call.set_state(CallState::Cancelled);
                    call.closure
                }
                None => {
                    return Err(match queue.get_mut(self.id).map(|call| call.state()) {
                        Some(CallState::Called) => Error::AlreadyCalled,
                        _ => Error::AlreadyCancelled,
                    })
                }
            }
        };
        // Outside the queue's borrow: dropping the closure may drop other
        // handles, which update the queue.
        timers.closures.discard(closure);
        Ok(())
    }

    /// Reschedules the call to run `delay` from now.
    pub fn reset(&self, delay: Duration) -> Result<(), Error> {
        let timers = self.check_pending()?;
        let deadline = timers.deadline_now_ns().saturating_add(saturating_nanos(delay));
        timers.queue.borrow_mut().reschedule(self.id, deadline);
        Ok(())
    }

    /// Pushes the call `by` later than it is now scheduled.
    pub fn delay(&self, by: Duration) -> Result<(), Error> {
        let timers = self.check_pending()?;
        let mut queue = timers.queue.borrow_mut();
        if let Some(current) = queue.deadline(self.id) {
            queue.reschedule(self.id, current.saturating_add(saturating_nanos(by)));
        }
        Ok(())
    }

    /// True until the call has run or been cancelled.
    pub fn active(&self) -> bool {
        matches!(self.lookup(), Some((_, CallState::Pending)))
    }

    /// True once the call has run.
    pub fn called(&self) -> bool {
        matches!(self.lookup(), Some((_, CallState::Called)))
    }

    /// True once the call has been cancelled (or can no longer run, its
    /// reactor being gone).
    pub fn cancelled(&self) -> bool {
        matches!(self.lookup(), None | Some((_, CallState::Cancelled)))
    }

    /// When the call is due, in the seconds of `Reactor::seconds()`; `None`
    /// once it has run or been cancelled.
    pub fn time(&self) -> Option<f64> {
        let timers = self.check_pending().ok()?;
        let deadline = timers.queue.borrow().deadline(self.id)?;
        Some(deadline as f64 / 1e9)
    }
}

impl Clone for DelayedCall {
    fn clone(&self) -> Self {
        if let Some(timers) = self.timers.upgrade() {
            if let Some(call) = timers.queue.borrow_mut().get_mut(self.id) {
                call.add_handle();
            }
        }
        DelayedCall { timers: self.timers.clone(), id: self.id }
    }
}

impl Drop for DelayedCall {
    fn drop(&mut self) {
        let Some(timers) = self.timers.upgrade() else { return };
        // The queue is never borrowed while user code runs, so this borrow
        // succeeds; if it ever did not, keeping the entry is the safe choice.
        let Ok(mut queue) = timers.queue.try_borrow_mut() else {
            debug_assert!(false, "DelayedCall dropped while the timer queue is borrowed");
            return;
        };
        let Some(call) = queue.get_mut(self.id) else { return };
        if call.drop_handle() && call.state() != CallState::Pending {
            queue.release(self.id);
            drop(queue);
            timers.released(self.id);
        }
    }
}

impl PartialEq for DelayedCall {
    /// A delayed call equals only itself (and its clones).
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id && Weak::ptr_eq(&self.timers, &other.timers)
    }
}

impl Eq for DelayedCall {}

impl DelayedCall {
    /// Where the call stands in firing order, while it is pending.
    fn order_key(&self) -> Option<(u64, u64)> {
        self.timers.upgrade()?.queue.borrow().order_key(self.id)
    }

    /// Turns debug mode on or off for the whole process: calls scheduled
    /// while it is on record their closure's type and the stack that
    /// created them, and show both when printed. Calls made before keep
    /// what they recorded (or did not).
    pub fn set_debug(on: bool) {
        DEBUG.store(on, atomic::Ordering::Relaxed);
    }

    /// Whether debug mode is on (see [`DelayedCall::set_debug`]).
    pub fn debug() -> bool {
        DEBUG.load(atomic::Ordering::Relaxed)
    }
}

impl PartialOrd for DelayedCall {
    /// Pending calls order by when they will run: deadline, then (in one
    /// reactor) scheduling order, so `a < b` means `a` runs first. A call
    /// that has run or been cancelled has no place, and compares with
    /// nothing but itself; nor do calls of different reactors due at the
    /// same nanosecond.
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        if self == other {
            return Some(Ordering::Equal);
        }
        let (mine, theirs) = (self.order_key()?, other.order_key()?);
        if Weak::ptr_eq(&self.timers, &other.timers) {
            Some(mine.cmp(&theirs))
        } else {
            Some(mine.0.cmp(&theirs.0)).filter(|o| o.is_ne())
        }
    }
}

impl fmt::Display for DelayedCall {
    /// `<DelayedCall 0x…#id [seconds until due] called=… cancelled=…>`, and
    /// in debug mode the closure's type and the creation stack.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<DelayedCall {:p}#{}", self.timers.as_ptr(), self.id)?;
        let Some((timers, state)) = self.lookup() else {
            return f.write_str(" called=false cancelled=true>");
        };
        if let Some(deadline) = timers.queue.borrow().deadline(self.id) {
            let left = deadline.saturating_sub(timers.now_ns()) as f64 / 1e9;
            write!(f, " [{left:.6}s]")?;
        }
        write!(f, " called={} cancelled={}", state == CallState::Called, state == CallState::Cancelled)?;
        let origins = timers.origins.borrow();
        match origins.get(&self.id) {
            Some(origin) => write!(f, " {}>\n\ncreated at:\n{}", origin.closure, origin.stack),
            None => f.write_str(">"),
        }
    }
}

impl fmt::Debug for DelayedCall {
    /// The same as `Display`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn manual() -> Rc<Timers> {
        Timers::new(TimeSource::Manual(Cell::new(0)))
    }

    /// Slab entries in use: pending calls plus finished ones with handles.
    fn entries(timers: &Timers) -> usize {
        timers.queue.borrow().allocated()
    }

    /// The deadline clock of a reactor's timers.
    fn deadline_clock(r: &crate::reactor::Reactor) -> &DeadlineClock {
        match &r.inner.timers.source {
            TimeSource::Monotonic(_, clock) => clock,
            TimeSource::Manual(_) => panic!("a reactor keeps monotonic time"),
        }
    }

    #[test]
    fn calls_scheduled_across_a_reanchor_fire_in_scheduling_order() {
        use crate::backend::Backend;
        for &backend in Backend::ALL {
            let r = crate::reactor::Reactor::new(backend).unwrap();
            let clock = deadline_clock(&r);
            // The extrapolated readings run ahead (magnified from the real
            // microsecond so the test is deterministic); then a re-anchor
            // reads the precise, earlier, time.
            clock.pretend_ahead(30_000_000);
            let order = Rc::new(RefCell::new(Vec::new()));
            let o = order.clone();
            let first = r.call_later(Duration::ZERO, move || o.borrow_mut().push("first"));
            clock.force_reanchor();
            let (o, rr) = (order.clone(), r.clone());
            let second = r.call_later(Duration::ZERO, move || {
                o.borrow_mut().push("second");
                rr.stop().unwrap();
            });
            assert!(second.time() >= first.time(), "{backend}: {second:?} is due before {first:?}");
            let rr = r.clone();
            let watchdog = r.call_later(Duration::from_secs(20), move || rr.stop().unwrap());
            r.run_without_signal_handlers().unwrap();
            assert!(watchdog.active(), "{backend}: the watchdog stopped the reactor");
            assert_eq!(*order.borrow(), ["first", "second"], "{backend}");
        }
    }

    #[test]
    fn call_packs_state_and_handles() {
        assert_eq!(std::mem::size_of::<Option<Call>>(), 12);
        let mut call = Call::new(ClosureRef::default());
        assert_eq!((call.state(), call.handles()), (CallState::Pending, 1));
        call.add_handle();
        call.set_state(CallState::Called);
        assert_eq!((call.state(), call.handles()), (CallState::Called, 2));
        assert!(!call.drop_handle());
        assert!(call.drop_handle());
        assert_eq!((call.state(), call.handles()), (CallState::Called, 0));
        call.set_state(CallState::Cancelled);
        assert_eq!(call.state(), CallState::Cancelled);
        // A count that reaches the limit sticks there rather than wrap.
        call.bits = Call::pack(CallState::Pending, HANDLES - 1);
        call.add_handle();
        call.add_handle();
        assert_eq!(call.handles(), HANDLES);
        assert!(!call.drop_handle());
        assert_eq!((call.state(), call.handles()), (CallState::Pending, HANDLES));
    }

    #[test]
    fn every_handle_sees_the_fate_of_the_call() {
        let timers = manual();
        let ran = Rc::new(Cell::new(0));
        let r = ran.clone();
        let a = timers.call_later(Duration::from_secs(1), move || r.set(r.get() + 1));
        let b = a.clone();
        let listed = timers.pending().pop().unwrap();
        assert!(a == b && b == listed);
        timers.advance(Duration::from_secs(1));
        assert_eq!(timers.run_due(), 1);
        assert_eq!(ran.get(), 1);
        drop(a);
        assert!(b.called() && listed.called() && !b.active() && !b.cancelled());
        assert!(matches!(listed.cancel(), Err(Error::AlreadyCalled)));

        let c = timers.call_later(Duration::from_secs(1), || ());
        let d = timers.pending().pop().unwrap();
        d.cancel().unwrap();
        assert!(c.cancelled() && !c.called(), "a cancel through one handle shows in the others");
        assert!(matches!(c.cancel(), Err(Error::AlreadyCancelled)));
        assert!(c != b, "a finished call's id is not reused while a handle names it");
    }

    #[test]
    fn entries_are_freed_with_the_last_handle() {
        let timers = manual();
        // Fire and forget: the entry goes as soon as the call has run.
        drop(timers.call_later(Duration::ZERO, || ()));
        assert_eq!(entries(&timers), 1);
        timers.run_due();
        assert_eq!(entries(&timers), 0);
        // Held handles keep a finished entry, and only until the last goes.
        let a = timers.call_later(Duration::ZERO, || ());
        let b = a.clone();
        a.cancel().unwrap();
        assert_eq!(entries(&timers), 1);
        drop(a);
        assert_eq!(entries(&timers), 1);
        drop(b);
        assert_eq!(entries(&timers), 0);
        // Many handles, all dropped, nothing left.
        let calls: Vec<_> = (0..10_000).map(|i| timers.call_later(Duration::from_millis(i), || ())).collect();
        timers.advance(Duration::from_millis(5_000));
        timers.run_due();
        drop(calls);
        assert_eq!(entries(&timers), 4_999, "calls due after 5 s are still pending");
        timers.advance(Duration::from_secs(10));
        timers.run_due();
        assert_eq!(entries(&timers), 0);
    }

    #[test]
    fn a_pass_takes_calls_that_fall_due_while_it_runs() {
        let timers = manual();
        let order = Rc::new(RefCell::new(Vec::new()));
        let (o, t) = (order.clone(), timers.clone());
        timers.call_later(Duration::from_secs(1), move || {
            o.borrow_mut().push("first");
            // Time passes while this callback runs (less than the catch-up
            // bound)...
            t.advance(Duration::from_micros(500));
            // ...and a call scheduled now still waits for the next pass.
            let o = o.clone();
            t.call_later(Duration::ZERO, move || o.borrow_mut().push("scheduled inside"));
        });
        let o = order.clone();
        timers
            .call_later(Duration::from_micros(1_000_400), move || o.borrow_mut().push("fell due meanwhile"));
        let o = order.clone();
        timers.call_later(Duration::from_micros(1_000_600), move || o.borrow_mut().push("not due yet"));
        timers.advance(Duration::from_secs(1));
        assert_eq!(timers.run_due(), 2);
        assert_eq!(*order.borrow(), ["first", "fell due meanwhile"]);
        assert_eq!(timers.run_due(), 1);
        assert_eq!(order.borrow().last(), Some(&"scheduled inside"));
    }

    #[test]
    fn a_handle_outliving_its_timers_reports_cancelled() {
        let timers = manual();
        let dc = timers.call_later(Duration::from_secs(1), || ());
        let copy = dc.clone();
        drop(timers);
        assert!(dc.cancelled() && !dc.active() && !dc.called());
        assert!(matches!(dc.cancel(), Err(Error::AlreadyCancelled)));
        assert!(matches!(dc.reset(Duration::ZERO), Err(Error::AlreadyCancelled)));
        assert_eq!(dc.time(), None);
        assert!(dc == copy);
        assert!(format!("{dc:?}").contains("cancelled=true"));
    }

    #[test]
    fn closures_may_drop_and_cancel_handles_while_running() {
        let timers = manual();
        let victim =
            timers.call_later(Duration::from_secs(2), || -> () { panic!("cancelled, must not run") });
        let held = Rc::new(RefCell::new(Some(victim.clone())));
        let h = held.clone();
        let t = timers.clone();
        timers.call_later(Duration::from_secs(1), move || {
            // Cancel another due call, drop a handle and schedule a new
            // closure type, all from inside a callback.
            h.borrow().as_ref().unwrap().cancel().unwrap();
            h.borrow_mut().take();
            t.call_later(Duration::ZERO, || ());
        });
        // A closure owning a handle: cancelling it drops the handle inside
        // the cancel.
        let inner = timers.call_later(Duration::from_secs(5), || ());
        let owner = timers.call_later(Duration::from_secs(5), move || drop(inner));
        owner.cancel().unwrap();
        timers.advance(Duration::from_secs(3));
        assert_eq!(timers.run_due(), 1, "the victim was cancelled before its turn");
        assert!(victim.cancelled());
        assert_eq!(timers.run_due(), 1, "the call scheduled inside runs next pass");
        drop(victim);
        assert_eq!(timers.pending().len(), 1);
    }
}
