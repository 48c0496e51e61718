//! Scheduling helpers on top of time and Deferreds (Twisted's
//! `twisted.internet.task`): repeat a call ([`LoopingCall`]), run one later
//! ([`defer_later`], [`sleep`]), share the loop between long jobs
//! ([`Cooperator`], [`cooperate`], [`coiterate`]), and run a small program
//! ([`react`]).
//!
//! Everything here takes its clock as `impl Into<Rc<dyn ReactorTime>>` or
//! `&dyn ReactorTime`, so the same code runs on the [`Reactor`] and on
//! [`testing::Clock`](crate::testing::Clock) (or
//! [`testing::MemoryReactor`](crate::testing::MemoryReactor)), where tests
//! move time by hand.
//!
//! # A looping call
//!
//! ```
//! use std::cell::Cell;
//! use std::rc::Rc;
//! use std::time::Duration;
//! use braid::task::LoopingCall;
//! use braid::testing::Clock;
//!
//! let clock = Clock::new();
//! let ticks = Rc::new(Cell::new(0));
//! let t = ticks.clone();
//! let lc = LoopingCall::new(clock.clone(), move || t.set(t.get() + 1));
//! let done = lc.start(Duration::from_secs(1), true).unwrap();
//! assert_eq!(ticks.get(), 1); // `now = true`: the first call is at once
//!
//! clock.advance(Duration::from_secs(1));
//! assert_eq!(ticks.get(), 2);
//! // Falling behind skips the missed ticks rather than queueing them.
//! clock.advance(Duration::from_secs(5));
//! assert_eq!(ticks.get(), 3);
//!
//! lc.stop().unwrap();
//! assert!(done.called());
//! ```
//!
//! # Unit-testing a protocol that uses time
//!
//! A protocol that sends a heartbeat every second, written against
//! `Rc<dyn ReactorTime>`, is tested with a [`testing::Clock`](crate::testing::Clock)
//! and a [`testing::StringTransport`](crate::testing::StringTransport): no
//! reactor, no socket, no waiting.
//!
//! ```
//! use std::rc::Rc;
//! use std::time::Duration;
//! use braid::task::LoopingCall;
//! use braid::testing::{Clock, StringTransport};
//! use braid::{Error, Failure, Protocol, ReactorTime, Transport};
//!
//! struct Heartbeat {
//!     clock: Rc<dyn ReactorTime>,
//!     beat: Option<LoopingCall>,
//! }
//!
//! impl Protocol for Heartbeat {
//!     fn connection_made(&mut self, transport: Transport) {
//!         let beat = LoopingCall::new(self.clock.clone(), move || transport.write(b"PING\n"));
//!         let _ = beat.start(Duration::from_secs(1), false);
//!         self.beat = Some(beat);
//!     }
//!     fn data_received(&mut self, _data: &[u8]) {}
//!     fn connection_lost(&mut self, _reason: Failure) {
//!         if let Some(beat) = self.beat.take() {
//!             let _ = beat.stop();
//!         }
//!     }
//! }
//!
//! let clock = Clock::new();
//! let mut proto = Heartbeat { clock: clock.clone().into(), beat: None };
//! let tr = StringTransport::new();
//! tr.connect(&mut proto);
//! assert!(tr.value().is_empty());
//! clock.advance(Duration::from_secs(1));
//! assert_eq!(tr.take(), b"PING\n");
//! clock.advance(Duration::from_secs(2));
//! assert_eq!(tr.take(), b"PING\n", "one beat per advance: missed beats are skipped");
//! tr.lose(&mut proto, Failure::new(Error::ConnectionDone));
//! clock.advance(Duration::from_secs(5));
//! assert!(tr.value().is_empty(), "no beats after the connection is lost");
//! assert!(clock.get_delayed_calls().is_empty());
//! ```
//!
//! # Sleeping in async code
//!
//! ```
//! use std::time::Duration;
//! use braid::{task, Backend, Reactor};
//!
//! let reactor = Reactor::new(Backend::Poll).unwrap();
//! let result = task::react_on(&reactor, false, |r| {
//!     let r = r.clone();
//!     r.clone().spawn(async move {
//!         task::sleep(&r, Duration::from_millis(5)).await?;
//!         Ok("slept")
//!     })
//! });
//! assert_eq!(result.unwrap(), "slept");
//! ```

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::defer::{maybe_deferred, Deferred, Outcome};
use crate::error::Failure;
use crate::reactor::{DelayedCall, Reactor, ReactorTime, State};

/// Misuse of the task helpers, and the ways a cooperative task can end.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TaskError {
    /// `LoopingCall::stop`/`reset` on a loop that is not running.
    NotRunning,
    /// `LoopingCall::start` on a loop that is already running.
    AlreadyRunning,
    /// `CooperativeTask::resume` on a task that is not paused.
    NotPaused,
    /// The cooperative task has finished its iterator.
    TaskDone,
    /// The cooperative task failed.
    TaskFailed,
    /// The cooperative task was stopped with `stop()`.
    TaskStopped,
    /// The cooperator was stopped (its tasks end with this, and it takes
    /// no new ones).
    SchedulerStopped,
    /// `react`: the reactor stopped before main's Deferred fired.
    ReactorStopped,
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TaskError::NotRunning => "the looping call is not running",
            TaskError::AlreadyRunning => "the looping call is already running",
            TaskError::NotPaused => "the task is not paused",
            TaskError::TaskDone => "the task has finished",
            TaskError::TaskFailed => "the task has failed",
            TaskError::TaskStopped => "the task was stopped",
            TaskError::SchedulerStopped => "the cooperator was stopped",
            TaskError::ReactorStopped => "the reactor stopped before main finished",
        })
    }
}

impl std::error::Error for TaskError {}

/// Lets `LoopingCall::new(reactor.clone(), ...)` take the reactor directly.
impl From<Reactor> for Rc<dyn ReactorTime> {
    fn from(reactor: Reactor) -> Self {
        Rc::new(reactor)
    }
}

/// A clock's time in whole nanoseconds. `ReactorTime` speaks `f64`
/// seconds; rounding to the nanosecond recovers the clock's exact integer
/// time (exact below 2^53 ns, about 104 days), so interval arithmetic
/// below has no float drift.
fn now_ns(clock: &dyn ReactorTime) -> u64 {
    let secs = clock.seconds();
    if secs.is_nan() || secs <= 0.0 {
        0
    } else {
        let ns = (secs * 1e9).round();
        if ns >= u64::MAX as f64 {
            u64::MAX
        } else {
            ns as u64
        }
    }
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

// ---------------------------------------------------------------- LoopingCall

type LoopFn = Box<dyn FnMut(u64) -> Outcome<()>>;

struct LoopState {
    running: bool,
    /// Bumped by every `start`, so a call still in flight from an earlier
    /// run cannot reschedule the new one.
    generation: u64,
    interval: u64,
    start_time: u64,
    run_at_start: bool,
    /// `with_count`: when the callable last ran.
    last_time: Option<u64>,
    call: Option<DelayedCall>,
    deferred: Option<Deferred<()>>,
}

struct LoopInner {
    clock: Rc<dyn ReactorTime>,
    /// Taken out while it runs, so a re-entrant start finds it busy.
    f: RefCell<Option<LoopFn>>,
    counted: bool,
    state: RefCell<LoopState>,
}

/// Calls a function repeatedly, every `interval` (Twisted's `LoopingCall`).
///
/// - [`start`](LoopingCall::start) returns a Deferred that fires (with
///   `()`) when [`stop`](LoopingCall::stop) is called, or fails with the
///   error if the function fails (which also stops the loop).
/// - The schedule is anchored at the start time: each run is at the next
///   multiple of the interval still in the future, so if the function (or
///   the whole process) falls behind, the missed ticks are skipped, not
///   run in a burst. [`with_count`](LoopingCall::with_count) tells the
///   function how many intervals passed.
/// - If the function returns a Deferred, the next run is scheduled only
///   once it fires.
/// - An interval of zero runs the function on every reactor iteration.
///
/// The function may return `()`, a `Result<(), Failure>`, or a
/// `Deferred<()>`. Clones are handles to the same loop. A running loop
/// keeps itself alive through its pending timer.
#[derive(Clone)]
pub struct LoopingCall {
    inner: Rc<LoopInner>,
}

impl fmt::Debug for LoopingCall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.inner.state.borrow();
        f.debug_struct("LoopingCall")
            .field("running", &st.running)
            .field("interval", &Duration::from_nanos(st.interval))
            .field("with_count", &self.inner.counted)
            .finish()
    }
}

impl LoopingCall {
    /// A loop that calls `f` on `clock` (not started yet).
    pub fn new<R>(clock: impl Into<Rc<dyn ReactorTime>>, mut f: impl FnMut() -> R + 'static) -> Self
    where
        R: Into<Outcome<()>>,
    {
        Self::build(clock.into(), false, Box::new(move |_| f().into()))
    }

    /// A loop whose function gets the number of intervals that elapsed
    /// since it last ran (at least 1; more when ticks were skipped), so it
    /// can catch up: the counts add up to the number of intervals since
    /// the start. With an interval of zero the count is always 1.
    pub fn with_count<R>(clock: impl Into<Rc<dyn ReactorTime>>, mut f: impl FnMut(u64) -> R + 'static) -> Self
    where
        R: Into<Outcome<()>>,
    {
        Self::build(clock.into(), true, Box::new(move |n| f(n).into()))
    }

    fn build(clock: Rc<dyn ReactorTime>, counted: bool, f: LoopFn) -> Self {
        LoopingCall {
            inner: Rc::new(LoopInner {
                clock,
                f: RefCell::new(Some(f)),
                counted,
                state: RefCell::new(LoopState {
                    running: false,
                    generation: 0,
                    interval: 0,
                    start_time: 0,
                    run_at_start: false,
                    last_time: None,
                    call: None,
                    deferred: None,
                }),
            }),
        }
    }

    /// Starts calling every `interval`: at once if `now`, otherwise first
    /// after one interval. The returned Deferred fires when the loop is
    /// stopped, or fails with the function's failure. Fails with
    /// [`TaskError::AlreadyRunning`] if the loop is running.
    pub fn start(&self, interval: Duration, now: bool) -> Result<Deferred<()>, TaskError> {
        let inner = &self.inner;
        let d = Deferred::new();
        let previous = {
            let mut st = inner.state.borrow_mut();
            if st.running {
                return Err(TaskError::AlreadyRunning);
            }
            let start = now_ns(&*inner.clock);
            st.running = true;
            st.generation += 1;
            st.interval = duration_ns(interval);
            st.start_time = start;
            st.run_at_start = now;
            st.last_time = None;
            st.deferred.replace(d.clone())
        };
        // A previous run stopped while its function's Deferred was still
        // pending: that run is over now, so its Deferred fires.
        if let Some(previous) = previous {
            let _ = previous.callback(());
        }
        if now {
            invoke(inner);
        } else {
            let start = inner.state.borrow().start_time;
            schedule_from(inner, start);
        }
        Ok(d)
    }

    /// Stops the loop: cancels the pending run and fires the Deferred from
    /// [`start`](LoopingCall::start). If the function's own Deferred is
    /// still pending, that Deferred fires when it does.
    pub fn stop(&self) -> Result<(), TaskError> {
        let fire = {
            let mut st = self.inner.state.borrow_mut();
            if !st.running {
                return Err(TaskError::NotRunning);
            }
            st.running = false;
            match st.call.take() {
                Some(call) => {
                    let _ = call.cancel();
                    st.deferred.take()
                }
                None => None,
            }
        };
        if let Some(d) = fire {
            let _ = d.callback(());
        }
        Ok(())
    }

    /// Restarts the schedule from now: the next run is one interval from
    /// now. Does nothing while the function's Deferred is pending.
    pub fn reset(&self) -> Result<(), TaskError> {
        let inner = &self.inner;
        let now = {
            let mut st = inner.state.borrow_mut();
            if !st.running {
                return Err(TaskError::NotRunning);
            }
            let Some(call) = st.call.take() else { return Ok(()) };
            let _ = call.cancel();
            let now = now_ns(&*inner.clock);
            st.start_time = now;
            now
        };
        schedule_from(inner, now);
        Ok(())
    }

    /// True between `start` and `stop` (or a failure).
    pub fn running(&self) -> bool {
        self.inner.state.borrow().running
    }

    /// The interval given to the last `start`.
    pub fn interval(&self) -> Duration {
        Duration::from_nanos(self.inner.state.borrow().interval)
    }
}

/// Schedules the next run at the next interval boundary after `when`.
fn schedule_from(inner: &Rc<LoopInner>, when: u64) {
    let delay = {
        let st = inner.state.borrow();
        if st.interval == 0 {
            0
        } else {
            let running_for = when.saturating_sub(st.start_time);
            st.interval - running_for % st.interval
        }
    };
    let lc = inner.clone();
    let call = inner.clock.schedule(Duration::from_nanos(delay), Box::new(move || invoke(&lc)));
    inner.state.borrow_mut().call = Some(call);
}

/// How many intervals passed since the last run (`with_count`); 0 means
/// "still in the same interval: skip this run".
fn elapsed_intervals(st: &mut LoopState, now: u64) -> u64 {
    if st.interval == 0 {
        st.last_time = Some(now);
        return 1;
    }
    let interval = i128::from(st.interval);
    let start = i128::from(st.start_time);
    let last = match st.last_time {
        Some(t) => i128::from(t),
        None if st.run_at_start => start - interval,
        None => start,
    };
    let interval_of = |t: i128| (t - start).div_euclid(interval);
    let count = interval_of(i128::from(now)) - interval_of(last);
    if count > 0 {
        st.last_time = Some(now);
        u64::try_from(count).unwrap_or(u64::MAX)
    } else {
        0
    }
}

/// One run: call the function, then reschedule (or finish) once its
/// outcome is known.
fn invoke(inner: &Rc<LoopInner>) {
    let (generation, count) = {
        let mut st = inner.state.borrow_mut();
        st.call = None;
        if !st.running {
            return;
        }
        let count = if inner.counted { elapsed_intervals(&mut st, now_ns(&*inner.clock)) } else { 1 };
        (st.generation, count)
    };
    let d: Deferred<()> = if count == 0 {
        Deferred::succeed(())
    } else {
        let taken = inner.f.borrow_mut().take();
        let Some(mut f) = taken else {
            // Re-entrant: the function started the loop again from inside
            // itself. Run once it has returned.
            let lc = inner.clone();
            let call = inner.clock.schedule(Duration::ZERO, Box::new(move || invoke(&lc)));
            inner.state.borrow_mut().call = Some(call);
            return;
        };
        let d = maybe_deferred(|| f(count));
        *inner.f.borrow_mut() = Some(f);
        d
    };
    let lc = inner.clone();
    let _done: Deferred<()> = d.then(move |result| {
        finish_run(&lc, generation, result);
        Ok(())
    });
}

/// The function's outcome is known: schedule the next run, or fire the
/// start Deferred if the loop was stopped or the function failed.
fn finish_run(inner: &Rc<LoopInner>, generation: u64, result: Result<(), Failure>) {
    let mut st = inner.state.borrow_mut();
    if st.generation != generation {
        drop(st);
        if let Err(failure) = result {
            tracing::error!(target: "braid", "a looping call failed after it was restarted: {failure}");
        }
        return;
    }
    match result {
        Ok(()) if st.running => {
            drop(st);
            let now = now_ns(&*inner.clock);
            schedule_from(inner, now);
        }
        Ok(()) => {
            let d = st.deferred.take();
            drop(st);
            if let Some(d) = d {
                let _ = d.callback(());
            }
        }
        Err(failure) => {
            st.running = false;
            let d = st.deferred.take();
            drop(st);
            if let Some(d) = d {
                let _ = d.errback(failure);
            }
        }
    }
}

// ---------------------------------------------------------------- defer_later

/// A Deferred that fires with what `f` returns, `delay` from now on
/// `clock` (Twisted's `deferLater`). `f` may return a `Result` or a
/// Deferred to wait for; a panic becomes a failure. Cancelling the
/// Deferred before then cancels the call (`f` never runs) and fails it
/// with [`Error::Cancelled`](crate::Error::Cancelled).
pub fn defer_later<T, R>(
    clock: &dyn ReactorTime,
    delay: Duration,
    f: impl FnOnce() -> R + 'static,
) -> Deferred<T>
where
    T: 'static,
    R: Into<Outcome<T>>,
{
    let slot: Rc<RefCell<Option<DelayedCall>>> = Rc::new(RefCell::new(None));
    let pending = slot.clone();
    let d = Deferred::with_canceller(move |_| {
        if let Some(call) = pending.borrow_mut().take() {
            let _ = call.cancel();
        }
    });
    let target = d.clone();
    let call = clock.schedule(
        delay,
        Box::new(move || {
            maybe_deferred(f).chain_deferred(&target);
        }),
    );
    *slot.borrow_mut() = Some(call);
    d
}

/// A Deferred that fires with `()` after `delay` on `clock`; `.await` it
/// to pause an async function. Cancelling it cancels the timer.
pub fn sleep(clock: &dyn ReactorTime, delay: Duration) -> Deferred<()> {
    defer_later(clock, delay, || ())
}

// ---------------------------------------------------------------- Cooperator

/// What one step of a cooperative task's iterator asks for.
pub enum Work {
    /// Done with this step; run the next one when the task's turn comes.
    Continue,
    /// Wait for this Deferred before the next step; its failure fails the
    /// task (its success value is ignored).
    Wait(Deferred<()>),
    /// The task failed.
    Fail(Failure),
}

impl From<()> for Work {
    fn from(_: ()) -> Self {
        Work::Continue
    }
}

impl From<Deferred<()>> for Work {
    fn from(d: Deferred<()>) -> Self {
        Work::Wait(d)
    }
}

impl<E: Into<Failure>> From<Result<(), E>> for Work {
    fn from(r: Result<(), E>) -> Self {
        match r {
            Ok(()) => Work::Continue,
            Err(e) => Work::Fail(e.into()),
        }
    }
}

impl fmt::Debug for Work {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Work::Continue => f.write_str("Work::Continue"),
            Work::Wait(d) => write!(f, "Work::Wait({d:?})"),
            Work::Fail(failure) => write!(f, "Work::Fail({failure:?})"),
        }
    }
}

/// How long one scheduler tick may run tasks before giving the loop back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    /// Wall-clock time (Twisted uses 10 ms). Measured with the monotonic
    /// clock even when the scheduler is a test clock.
    Time(Duration),
    /// A fixed number of steps (deterministic; for tests). 0 counts as 1.
    Steps(usize),
}

impl Default for Budget {
    fn default() -> Self {
        Budget::Time(Duration::from_millis(10))
    }
}

/// The delay between ticks (Twisted's `_EPSILON`): tiny, so the next tick
/// runs on the next reactor iteration, after I/O; not zero, so advancing a
/// test clock runs one tick per `advance`.
const TICK_DELAY: Duration = Duration::from_nanos(10);

#[derive(Clone)]
enum Finish {
    Done,
    Failed(Failure),
    Stopped,
    SchedulerStopped,
}

impl Finish {
    fn error(&self) -> TaskError {
        match self {
            Finish::Done => TaskError::TaskDone,
            Finish::Failed(_) => TaskError::TaskFailed,
            Finish::Stopped => TaskError::TaskStopped,
            Finish::SchedulerStopped => TaskError::SchedulerStopped,
        }
    }

    fn result(&self) -> Result<(), Failure> {
        match self {
            Finish::Done => Ok(()),
            Finish::Failed(failure) => Err(failure.clone()),
            Finish::Stopped => Err(Failure::new(TaskError::TaskStopped)),
            Finish::SchedulerStopped => Err(Failure::new(TaskError::SchedulerStopped)),
        }
    }
}

struct CoopInner {
    clock: Rc<dyn ReactorTime>,
    budget: Budget,
    /// Tasks that may run now, in round-robin order.
    runnable: RefCell<VecDeque<Rc<TaskCore>>>,
    /// Every unfinished task, runnable or paused.
    live: RefCell<Vec<Rc<TaskCore>>>,
    tick: RefCell<Option<DelayedCall>>,
    stopped: Cell<bool>,
}

impl CoopInner {
    fn reschedule(self: &Rc<Self>) {
        if self.stopped.get() || self.runnable.borrow().is_empty() || self.tick.borrow().is_some() {
            return;
        }
        let coop = self.clone();
        let call = self.clock.schedule(TICK_DELAY, Box::new(move || coop.run_tick()));
        *self.tick.borrow_mut() = Some(call);
    }

    fn run_tick(self: &Rc<Self>) {
        self.tick.borrow_mut().take();
        let started = Instant::now();
        let mut steps = 0usize;
        while !self.stopped.get() {
            let task = {
                let mut runnable = self.runnable.borrow_mut();
                let Some(task) = runnable.pop_front() else { break };
                runnable.push_back(task.clone());
                task
            };
            task.work_once();
            steps += 1;
            let spent = match self.budget {
                Budget::Time(limit) => started.elapsed() >= limit,
                Budget::Steps(n) => steps >= n.max(1),
            };
            if spent {
                break;
            }
        }
        self.reschedule();
    }

    fn make_runnable(self: &Rc<Self>, task: &Rc<TaskCore>) {
        self.runnable.borrow_mut().push_back(task.clone());
        self.reschedule();
    }

    fn remove_runnable(&self, task: &Rc<TaskCore>) {
        let empty = {
            let mut runnable = self.runnable.borrow_mut();
            runnable.retain(|t| !Rc::ptr_eq(t, task));
            runnable.is_empty()
        };
        if empty {
            // Nothing left to run: the pending tick is not needed.
            let tick = self.tick.borrow_mut().take();
            if let Some(tick) = tick {
                let _ = tick.cancel();
            }
        }
    }

    fn forget(&self, task: &Rc<TaskCore>) {
        self.live.borrow_mut().retain(|t| !Rc::ptr_eq(t, task));
        self.remove_runnable(task);
    }
}

type WorkIter = Box<dyn Iterator<Item = Work>>;

struct TaskCore {
    coop: Rc<CoopInner>,
    /// Taken out while a step runs (and dropped once the task finishes).
    iter: RefCell<Option<WorkIter>>,
    paused: Cell<usize>,
    finished: RefCell<Option<Finish>>,
    waiters: RefCell<Vec<Deferred<()>>>,
}

impl TaskCore {
    fn is_finished(&self) -> bool {
        self.finished.borrow().is_some()
    }

    fn work_once(self: &Rc<Self>) {
        let taken = self.iter.borrow_mut().take();
        let Some(mut iter) = taken else { return };
        let step = catch_unwind(AssertUnwindSafe(|| iter.next()));
        if self.is_finished() {
            // Stopped from inside its own step.
            drop_iter(iter);
            return;
        }
        match step {
            Ok(Some(Work::Continue)) => *self.iter.borrow_mut() = Some(iter),
            Ok(Some(Work::Wait(d))) => {
                *self.iter.borrow_mut() = Some(iter);
                self.pause_internal();
                let task = self.clone();
                let _done: Deferred<()> = d.then(move |result| {
                    match result {
                        Ok(()) => {
                            task.resume_internal();
                        }
                        Err(failure) => task.complete(Finish::Failed(failure)),
                    }
                    Ok(())
                });
            }
            Ok(Some(Work::Fail(failure))) => {
                drop_iter(iter);
                self.complete(Finish::Failed(failure));
            }
            Ok(None) => {
                drop_iter(iter);
                self.complete(Finish::Done);
            }
            Err(payload) => {
                drop_iter(iter);
                self.complete(Finish::Failed(crate::defer::panic_to_failure(payload)));
            }
        }
    }

    fn pause_internal(self: &Rc<Self>) {
        let n = self.paused.get() + 1;
        self.paused.set(n);
        if n == 1 {
            self.coop.remove_runnable(self);
        }
    }

    /// Undoes one pause; false if the task was not paused.
    fn resume_internal(self: &Rc<Self>) -> bool {
        let n = self.paused.get();
        if n == 0 {
            return false;
        }
        self.paused.set(n - 1);
        if n == 1 && !self.is_finished() {
            self.coop.make_runnable(self);
        }
        true
    }

    fn complete(self: &Rc<Self>, finish: Finish) {
        {
            let mut finished = self.finished.borrow_mut();
            if finished.is_some() {
                return;
            }
            *finished = Some(finish.clone());
        }
        self.coop.forget(self);
        let iter = self.iter.borrow_mut().take();
        if let Some(iter) = iter {
            drop_iter(iter);
        }
        let waiters = std::mem::take(&mut *self.waiters.borrow_mut());
        for d in waiters {
            let _ = match finish.result() {
                Ok(()) => d.callback(()),
                Err(failure) => d.errback(failure),
            };
        }
    }
}

fn drop_iter(iter: WorkIter) {
    if let Err(payload) = catch_unwind(AssertUnwindSafe(move || drop(iter))) {
        let failure = crate::defer::panic_to_failure(payload);
        tracing::error!(target: "braid", "a cooperative task panicked while being dropped: {failure}");
    }
}

/// Runs many long jobs (iterators) a step at a time, round-robin, giving
/// the loop back between ticks so I/O and timers keep flowing (Twisted's
/// `Cooperator`). Each tick runs steps until its [`Budget`] is spent, then
/// schedules the next tick a moment later. Clones are handles to the same
/// cooperator.
///
/// An iterator's items say what to do ([`Work`]): `()` or `Ok(())` to go
/// on, a `Deferred<()>` to wait for before the next step, `Err(e)` to fail.
///
/// ```
/// use std::time::Duration;
/// use braid::task::{Budget, Cooperator};
/// use braid::testing::Clock;
///
/// let clock = Clock::new();
/// let coop = Cooperator::with_budget(clock.clone(), Budget::Steps(2));
/// let done = coop.coiterate((0..3).map(|_| ()));
/// clock.advance(Duration::from_millis(1)); // steps 1 and 2
/// assert!(!done.called());
/// clock.advance(Duration::from_millis(1)); // step 3, then the end
/// assert!(done.called());
/// ```
#[derive(Clone)]
pub struct Cooperator {
    inner: Rc<CoopInner>,
}

impl fmt::Debug for Cooperator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cooperator")
            .field("tasks", &self.inner.live.borrow().len())
            .field("running", &self.running())
            .finish()
    }
}

impl Cooperator {
    /// A cooperator scheduling its ticks on `clock`, with the default
    /// 10 ms budget per tick.
    pub fn new(clock: impl Into<Rc<dyn ReactorTime>>) -> Self {
        Self::with_budget(clock, Budget::default())
    }

    /// A cooperator with a chosen budget per tick.
    pub fn with_budget(clock: impl Into<Rc<dyn ReactorTime>>, budget: Budget) -> Self {
        Cooperator {
            inner: Rc::new(CoopInner {
                clock: clock.into(),
                budget,
                runnable: RefCell::new(VecDeque::new()),
                live: RefCell::new(Vec::new()),
                tick: RefCell::new(None),
                stopped: Cell::new(false),
            }),
        }
    }

    /// Adds a task that runs `iter` a step at a time. On a stopped
    /// cooperator the task ends at once with
    /// [`TaskError::SchedulerStopped`].
    pub fn cooperate<I>(&self, iter: I) -> CooperativeTask
    where
        I: IntoIterator,
        I::IntoIter: 'static,
        I::Item: Into<Work> + 'static,
    {
        let task = Rc::new(TaskCore {
            coop: self.inner.clone(),
            iter: RefCell::new(Some(Box::new(iter.into_iter().map(Into::into)))),
            paused: Cell::new(0),
            finished: RefCell::new(None),
            waiters: RefCell::new(Vec::new()),
        });
        if self.inner.stopped.get() {
            task.complete(Finish::SchedulerStopped);
        } else {
            self.inner.live.borrow_mut().push(task.clone());
            self.inner.make_runnable(&task);
        }
        CooperativeTask { core: task }
    }

    /// Runs `iter` as a task and returns a Deferred that fires when it has
    /// finished (or fails as [`CooperativeTask::when_done`] does).
    pub fn coiterate<I>(&self, iter: I) -> Deferred<()>
    where
        I: IntoIterator,
        I::IntoIter: 'static,
        I::Item: Into<Work> + 'static,
    {
        self.cooperate(iter).when_done()
    }

    /// Stops the cooperator: every unfinished task (running, paused, or
    /// waiting on a Deferred) ends with [`TaskError::SchedulerStopped`],
    /// and new tasks are refused the same way. A second stop fails with
    /// `SchedulerStopped`.
    pub fn stop(&self) -> Result<(), TaskError> {
        let inner = &self.inner;
        if inner.stopped.replace(true) {
            return Err(TaskError::SchedulerStopped);
        }
        let tick = inner.tick.borrow_mut().take();
        if let Some(tick) = tick {
            let _ = tick.cancel();
        }
        inner.runnable.borrow_mut().clear();
        let tasks = std::mem::take(&mut *inner.live.borrow_mut());
        for task in tasks {
            task.complete(Finish::SchedulerStopped);
        }
        Ok(())
    }

    /// True until [`stop`](Cooperator::stop).
    pub fn running(&self) -> bool {
        !self.inner.stopped.get()
    }

    /// How many tasks have not finished.
    pub fn task_count(&self) -> usize {
        self.inner.live.borrow().len()
    }

    /// True while a tick is scheduled.
    pub fn tick_pending(&self) -> bool {
        self.inner.tick.borrow().is_some()
    }
}

/// One task of a [`Cooperator`] (Twisted's `CooperativeTask`): pause,
/// resume, stop, or wait for it. Clones are handles to the same task.
#[derive(Clone)]
pub struct CooperativeTask {
    core: Rc<TaskCore>,
}

impl fmt::Debug for CooperativeTask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CooperativeTask")
            .field("paused", &self.core.paused.get())
            .field("state", &self.state())
            .finish()
    }
}

impl CooperativeTask {
    /// A fresh Deferred for the end of the task: it fires with `()` when the
    /// iterator is exhausted, or fails with the iterator's failure,
    /// [`TaskError::TaskStopped`] or [`TaskError::SchedulerStopped`]. On a
    /// finished task it has already fired.
    pub fn when_done(&self) -> Deferred<()> {
        let finished = self.core.finished.borrow().clone();
        match finished {
            Some(finish) => Deferred::from_result(finish.result()),
            None => {
                let d = Deferred::new();
                self.core.waiters.borrow_mut().push(d.clone());
                d
            }
        }
    }

    /// Pauses the task (calls nest). On a finished task, fails with how it
    /// finished (`TaskDone`, `TaskFailed`, `TaskStopped`, `SchedulerStopped`).
    pub fn pause(&self) -> Result<(), TaskError> {
        if let Some(finish) = &*self.core.finished.borrow() {
            return Err(finish.error());
        }
        self.core.pause_internal();
        Ok(())
    }

    /// Undoes one [`pause`](CooperativeTask::pause); the task runs again
    /// when none are left (and it is not waiting on a Deferred).
    /// [`TaskError::NotPaused`] if it is not paused.
    pub fn resume(&self) -> Result<(), TaskError> {
        if self.core.resume_internal() {
            Ok(())
        } else {
            Err(TaskError::NotPaused)
        }
    }

    /// Stops the task: it runs no more steps and its `when_done` Deferreds
    /// fail with [`TaskError::TaskStopped`]. On a finished task, fails with
    /// how it finished.
    pub fn stop(&self) -> Result<(), TaskError> {
        if let Some(finish) = &*self.core.finished.borrow() {
            return Err(finish.error());
        }
        self.core.complete(Finish::Stopped);
        Ok(())
    }

    /// `None` while the task is unfinished, otherwise how it finished
    /// (as the error a further `stop` would give).
    pub fn state(&self) -> Option<TaskError> {
        self.core.finished.borrow().as_ref().map(Finish::error)
    }

    /// True while paused (by `pause`, or waiting on a Deferred).
    pub fn is_paused(&self) -> bool {
        self.core.paused.get() > 0
    }
}

/// The reactor's own cooperator, made on first use.
#[derive(Default)]
struct ReactorCooperator(RefCell<Option<Cooperator>>);

fn reactor_cooperator(reactor: &Reactor) -> Cooperator {
    let slot = reactor.extension::<ReactorCooperator>();
    let mut slot = slot.0.borrow_mut();
    slot.get_or_insert_with(|| Cooperator::new(reactor.clone())).clone()
}

/// Runs `iter` as a task of `reactor`'s own cooperator (shared by every
/// caller, like Twisted's module-level `cooperate`).
pub fn cooperate<I>(reactor: &Reactor, iter: I) -> CooperativeTask
where
    I: IntoIterator,
    I::IntoIter: 'static,
    I::Item: Into<Work> + 'static,
{
    reactor_cooperator(reactor).cooperate(iter)
}

/// Runs `iter` on `reactor`'s own cooperator; the Deferred fires when it
/// has finished.
pub fn coiterate<I>(reactor: &Reactor, iter: I) -> Deferred<()>
where
    I: IntoIterator,
    I::IntoIter: 'static,
    I::Item: Into<Work> + 'static,
{
    reactor_cooperator(reactor).coiterate(iter)
}

// ---------------------------------------------------------------- react

/// An error that asks [`exit_code`] for a specific exit status (Twisted's
/// `SystemExit(code)`): fail main's Deferred with `Exit(3)` to exit with 3.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit(pub i32);

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "exit with status {}", self.0)
    }
}

impl std::error::Error for Exit {}

/// Runs a small program on this thread's reactor (Twisted's `react`):
/// calls `main` once the reactor is running, runs until the Deferred it
/// returns fires, stops the reactor and returns main's result. Installs
/// the SIGINT/SIGTERM handlers for the run. See [`react_on`].
pub fn react<T, F, R>(main: F) -> Result<T, Failure>
where
    T: 'static,
    F: FnOnce(&Reactor) -> R + 'static,
    R: Into<Outcome<T>>,
{
    let reactor = crate::reactor::try_reactor().map_err(Failure::new)?;
    react_on(&reactor, true, main)
}

/// [`react`] on a given reactor; `handle_signals` chooses between
/// [`Reactor::run`] and [`Reactor::run_without_signal_handlers`].
///
/// - `main` runs once the reactor is running; it may return a value, a
///   failure, or a Deferred (use [`Reactor::spawn`] for an async main).
/// - When its result arrives the reactor is stopped once; if something
///   else stopped it already, it is not stopped again.
/// - A failure is logged and returned. If the reactor stops before main's
///   result arrives, the result is [`TaskError::ReactorStopped`].
/// - A reactor that cannot run (already running, or stopped before) gives
///   that error as the failure.
///
/// Map the result to a process exit status with [`exit_code`].
pub fn react_on<T, F, R>(reactor: &Reactor, handle_signals: bool, main: F) -> Result<T, Failure>
where
    T: 'static,
    F: FnOnce(&Reactor) -> R + 'static,
    R: Into<Outcome<T>>,
{
    let slot: Rc<RefCell<Option<Result<T, Failure>>>> = Rc::new(RefCell::new(None));
    let result_slot = slot.clone();
    let r = reactor.clone();
    reactor.call_when_running(move || {
        let d = maybe_deferred(|| main(&r));
        let _done: Deferred<()> = d.then(move |result| {
            *result_slot.borrow_mut() = Some(result);
            if matches!(r.state(), State::Starting | State::Running) {
                let _ = r.stop();
            }
            Ok(())
        });
    });
    let run = if handle_signals { reactor.run() } else { reactor.run_without_signal_handlers() };
    let result = slot.borrow_mut().take();
    match (result, run) {
        (Some(Ok(value)), _) => Ok(value),
        (Some(Err(failure)), _) => {
            if !failure.is::<Exit>() {
                tracing::error!(target: "braid", location = %failure.location(), "main failed: {failure}");
            }
            Err(failure)
        }
        (None, Err(e)) => Err(Failure::new(e)),
        (None, Ok(())) => Err(Failure::new(TaskError::ReactorStopped)),
    }
}

/// The process exit status for a [`react`] result: 0 for success, the
/// code of an [`Exit`] failure, 0 when the reactor was stopped before main
/// finished (as Twisted), 1 for any other failure.
pub fn exit_code<T>(result: &Result<T, Failure>) -> i32 {
    match result {
        Ok(_) => 0,
        Err(failure) => match (failure.downcast_ref::<Exit>(), failure.downcast_ref::<TaskError>()) {
            (Some(Exit(code)), _) => *code,
            (None, Some(TaskError::ReactorStopped)) => 0,
            _ => 1,
        },
    }
}
