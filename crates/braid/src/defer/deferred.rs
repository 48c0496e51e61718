//! The `Deferred` type itself: firing, the callback chain, chaining onto
//! other Deferreds, pausing, cancellation and unhandled-error reporting.
//!
//! # How the chain runs
//!
//! Every Deferred keeps a queue of steps. Running a chain never recurses
//! into another chain: when a step hands its result to another Deferred
//! (implicit chaining, `then`, `chain_deferred`, `DeferredList` ...), it
//! returns that Deferred as a type-erased [`Node`] and the driver loop in
//! [`drive`] pushes it on an explicit stack. Stack depth therefore stays
//! flat however many Deferreds are chained, and the same holds for dropping
//! a long unfired chain (see [`bury`]).

use std::any::Any;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::{Rc, Weak};
use std::task::Waker;

use super::DeferError;
use crate::error::{Error, Failure};

/// What a callback hands on: a finished result, or another Deferred whose
/// result the chain should wait for (Twisted's "return a Deferred from a
/// callback").
///
/// Callbacks return anything that converts into an `Outcome`: a
/// `Result<T, Failure>` or a `Deferred<T>`, so `Ok(x)`, `Err(failure)` and
/// `some_deferred` all work as return values.
pub enum Outcome<T: 'static> {
    /// The step finished with this result.
    Done(Result<T, Failure>),
    /// The chain pauses until this Deferred fires, then carries on with its
    /// result.
    Wait(Deferred<T>),
}

impl<T: 'static> From<Result<T, Failure>> for Outcome<T> {
    fn from(result: Result<T, Failure>) -> Self {
        Outcome::Done(result)
    }
}

/// `()` is a success for a `Deferred<()>`, so callbacks (and looping
/// calls) that cannot fail may simply return nothing.
impl From<()> for Outcome<()> {
    fn from(_: ()) -> Self {
        Outcome::Done(Ok(()))
    }
}

impl<T: 'static> From<Deferred<T>> for Outcome<T> {
    fn from(d: Deferred<T>) -> Self {
        Outcome::Wait(d)
    }
}

impl<T: 'static> fmt::Debug for Outcome<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Done(Ok(_)) => f.write_str("Outcome::Done(Ok(..))"),
            Outcome::Done(Err(failure)) => write!(f, "Outcome::Done(Err({failure:?}))"),
            Outcome::Wait(d) => write!(f, "Outcome::Wait({d:?})"),
        }
    }
}

/// What an internal hand-off step leaves behind: the result that stays in
/// this Deferred (None: it moved away) and another chain to run next.
pub(super) struct Handed<T: 'static> {
    pub(super) keep: Option<Result<T, Failure>>,
    pub(super) next: Option<Rc<dyn Node>>,
}

impl<T: 'static> Handed<T> {
    /// The result moved away; `next` (if any) runs next.
    pub(super) fn moved(next: Option<Rc<dyn Node>>) -> Self {
        Handed { keep: None, next }
    }
}

type CallFn<T> = Box<dyn FnOnce(Result<T, Failure>) -> Outcome<T>>;
type HandoffFn<T> = Box<dyn FnOnce(Result<T, Failure>) -> Handed<T>>;
type Canceller<T> = Box<dyn FnOnce(&Deferred<T>)>;

/// One entry of a callback chain.
pub(super) enum Step<T: 'static> {
    /// A user callback: result in, outcome out.
    Call(CallFn<T>),
    /// Implicit chaining: move the result into the Deferred that waits on
    /// this one and resume it (Twisted's `_CONTINUE` marker).
    Continue(Rc<RefCell<Inner<T>>>),
    /// Library plumbing that may move the result elsewhere (type-changing
    /// combinators, lists, `chain_deferred`).
    Handoff(HandoffFn<T>),
}

enum State<T: 'static> {
    /// Not fired yet.
    Pending,
    /// The current result of the chain.
    Ready(Result<T, Failure>),
    /// Fired, but the chain waits for another Deferred.
    Waiting(Weak<RefCell<Inner<T>>>),
    /// The result moved elsewhere (chaining, `then`, `.await`).
    Consumed,
    /// A step is running with the result; its outcome comes next.
    Busy,
}

pub(super) struct Inner<T: 'static> {
    state: State<T>,
    called: bool,
    steps: VecDeque<Step<T>>,
    running: bool,
    paused: usize,
    canceller: Option<Canceller<T>>,
    suppress_already_called: bool,
    wakers: Vec<Waker>,
}

impl<T: 'static> Inner<T> {
    fn idle(&self) -> bool {
        !self.running && self.paused == 0
    }
}

impl<T: 'static> Drop for Inner<T> {
    fn drop(&mut self) {
        if let State::Ready(Err(failure)) = &self.state {
            tracing::error!(
                location = %failure.location(),
                "Unhandled error in Deferred: {failure}"
            );
        }
        if !self.steps.is_empty() {
            bury(Box::new(std::mem::take(&mut self.steps)));
        }
        if let Some(canceller) = self.canceller.take() {
            bury(Box::new(canceller));
        }
    }
}

/// A type-erased Deferred whose chain the driver can run.
pub(super) trait Node {
    /// Runs this chain until it ends, blocks, or hands over to another
    /// chain, which is returned so the driver runs it first.
    fn run(self: Rc<Self>) -> Option<Rc<dyn Node>>;
}

/// Runs `start`'s chain and every chain it hands over to, iteratively.
pub(super) fn drive(start: Rc<dyn Node>) {
    let Some(first) = Rc::clone(&start).run() else { return };
    let mut stack = vec![start, first];
    while let Some(top) = stack.last() {
        match Rc::clone(top).run() {
            Some(next) => stack.push(next),
            None => {
                stack.pop();
            }
        }
    }
}

thread_local! {
    static GRAVEYARD: RefCell<Option<Vec<Box<dyn Any>>>> = const { RefCell::new(None) };
}

/// Drops `item` without recursing: chains of Deferreds that own each other
/// (through their pending steps) are freed one at a time, so dropping a
/// 100,000-long unfired chain does not overflow the stack.
pub(super) fn bury(item: Box<dyn Any>) {
    let first = GRAVEYARD.try_with(move |g| {
        let mut g = g.borrow_mut();
        match g.as_mut() {
            Some(queue) => {
                queue.push(item);
                None
            }
            None => {
                *g = Some(Vec::new());
                Some(item)
            }
        }
    });
    let Ok(Some(item)) = first else { return };

    /// Clears the graveyard even if a destructor panics.
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            let rest = GRAVEYARD.try_with(|g| g.borrow_mut().take()).ok().flatten();
            drop(rest);
        }
    }
    let _reset = Reset;
    drop(item);
    while let Some(next) = GRAVEYARD.with(|g| g.borrow_mut().as_mut().and_then(Vec::pop)) {
        drop(next);
    }
}

/// Turns a caught panic into a Failure carrying its message.
pub(crate) fn panic_failure(payload: Box<dyn Any + Send>) -> Failure {
    let message = if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    };
    Failure::new(Error::Panicked(message))
}

fn wake_all(wakers: Vec<Waker>) {
    for waker in wakers {
        waker.wake();
    }
}

/// Where implicit chaining left the waiting Deferred.
enum Chained {
    /// The other Deferred's result was taken at once; keep running.
    Continue,
    /// Now waiting; run this chain (the other Deferred) first.
    Resume(Rc<dyn Node>),
    /// Now waiting on a Deferred that cannot make progress yet.
    Blocked,
}

/// Makes `waiter` wait for `other`'s result (or take it at once if `other`
/// has a final result already). Must be called with no borrows held.
fn wait_on<T: 'static>(waiter: &Rc<RefCell<Inner<T>>>, other: Deferred<T>) -> Chained {
    if Rc::ptr_eq(waiter, &other.inner) {
        waiter.borrow_mut().state = State::Ready(Err(Failure::new(DeferError::CircularChain)));
        return Chained::Continue;
    }
    let mut o = other.inner.borrow_mut();
    let taken = match &o.state {
        State::Ready(_) if o.steps.is_empty() && o.idle() => {
            match std::mem::replace(&mut o.state, State::Consumed) {
                State::Ready(result) => Some(result),
                _ => None,
            }
        }
        State::Consumed => Some(Err(Failure::new(DeferError::ResultConsumed))),
        _ => None,
    };
    if let Some(result) = taken {
        let wakers = std::mem::take(&mut o.wakers);
        drop(o);
        wake_all(wakers);
        waiter.borrow_mut().state = State::Ready(result);
        return Chained::Continue;
    }
    o.steps.push_back(Step::Continue(Rc::clone(waiter)));
    let runnable = matches!(o.state, State::Ready(_)) && o.idle();
    drop(o);
    waiter.borrow_mut().state = State::Waiting(Rc::downgrade(&other.inner));
    if runnable {
        Chained::Resume(other.inner)
    } else {
        Chained::Blocked
    }
}

impl<T: 'static> Node for RefCell<Inner<T>> {
    fn run(self: Rc<Self>) -> Option<Rc<dyn Node>> {
        loop {
            let Ok(mut inner) = self.try_borrow_mut() else { return None };
            if !inner.idle() {
                return None;
            }
            let result = match std::mem::replace(&mut inner.state, State::Busy) {
                State::Ready(result) => result,
                State::Consumed => {
                    inner.state = State::Consumed;
                    // The result moved away: later steps have nothing to run on.
                    let steps = std::mem::take(&mut inner.steps);
                    let wakers = std::mem::take(&mut inner.wakers);
                    drop(inner);
                    if !steps.is_empty() {
                        tracing::debug!("dropping {} callbacks added after the result moved", steps.len());
                        bury(Box::new(steps));
                    }
                    wake_all(wakers);
                    return None;
                }
                other => {
                    inner.state = other;
                    return None;
                }
            };
            let Some(step) = inner.steps.pop_front() else {
                inner.state = State::Ready(result);
                let wakers = std::mem::take(&mut inner.wakers);
                drop(inner);
                wake_all(wakers);
                return None;
            };
            match step {
                Step::Call(f) => {
                    inner.running = true;
                    drop(inner);
                    let out = catch_unwind(AssertUnwindSafe(move || f(result)))
                        .unwrap_or_else(|payload| Outcome::Done(Err(panic_failure(payload))));
                    let mut inner = self.borrow_mut();
                    inner.running = false;
                    match out {
                        Outcome::Done(result) => inner.state = State::Ready(result),
                        Outcome::Wait(other) => {
                            drop(inner);
                            match wait_on(&self, other) {
                                Chained::Continue => {}
                                Chained::Resume(next) => return Some(next),
                                Chained::Blocked => return None,
                            }
                        }
                    }
                }
                Step::Continue(waiter) => {
                    inner.state = State::Consumed;
                    drop(inner);
                    let mut w = waiter.borrow_mut();
                    if matches!(w.state, State::Waiting(_)) {
                        w.state = State::Ready(result);
                        drop(w);
                        return Some(waiter);
                    }
                    // Nobody waits any more (cannot normally happen): keep it.
                    drop(w);
                    self.borrow_mut().state = State::Ready(result);
                }
                Step::Handoff(h) => {
                    inner.running = true;
                    drop(inner);
                    let handed = catch_unwind(AssertUnwindSafe(move || h(result)));
                    let mut inner = self.borrow_mut();
                    inner.running = false;
                    match handed {
                        Ok(Handed { keep, next }) => {
                            inner.state = match keep {
                                Some(result) => State::Ready(result),
                                None => State::Consumed,
                            };
                            if next.is_some() {
                                return next;
                            }
                        }
                        Err(payload) => {
                            inner.state = State::Consumed;
                            let failure = panic_failure(payload);
                            tracing::error!("internal Deferred step panicked: {failure}");
                        }
                    }
                }
            }
        }
    }
}

/// A value (or a [`Failure`]) that arrives later, with a chain of callbacks
/// to run when it does. Cloning gives another handle to the same Deferred.
///
/// See the [module documentation](crate::defer) for a guide.
pub struct Deferred<T: 'static> {
    pub(super) inner: Rc<RefCell<Inner<T>>>,
}

impl<T: 'static> Clone for Deferred<T> {
    fn clone(&self) -> Self {
        Deferred { inner: self.inner.clone() }
    }
}

impl<T: 'static> Default for Deferred<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: 'static> fmt::Debug for Deferred<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ptr = Rc::as_ptr(&self.inner);
        let Ok(inner) = self.inner.try_borrow() else {
            return write!(f, "<Deferred at {ptr:p} (running)>");
        };
        match &inner.state {
            State::Pending => write!(f, "<Deferred at {ptr:p}>"),
            State::Ready(Ok(_)) => write!(f, "<Deferred at {ptr:p} current result: Ok(..)>"),
            State::Ready(Err(failure)) => write!(f, "<Deferred at {ptr:p} current result: {failure:?}>"),
            State::Waiting(other) => {
                write!(f, "<Deferred at {ptr:p} waiting on Deferred at {:p}>", other.as_ptr())
            }
            State::Consumed => write!(f, "<Deferred at {ptr:p} result moved>"),
            State::Busy => write!(f, "<Deferred at {ptr:p} (running)>"),
        }
    }
}

impl<T: 'static> Deferred<T> {
    /// A Deferred that has not fired yet.
    pub fn new() -> Self {
        Deferred {
            inner: Rc::new(RefCell::new(Inner {
                state: State::Pending,
                called: false,
                steps: VecDeque::new(),
                running: false,
                paused: 0,
                canceller: None,
                suppress_already_called: false,
                wakers: Vec::new(),
            })),
        }
    }

    /// A Deferred that has not fired yet, with a canceller: [`cancel`]
    /// calls it (once, with this Deferred) so the operation behind it can
    /// stop. If the canceller does not fire the Deferred itself, `cancel`
    /// errbacks it with [`Error::Cancelled`]. Firing releases the canceller.
    ///
    /// [`cancel`]: Deferred::cancel
    pub fn with_canceller(canceller: impl FnOnce(&Deferred<T>) + 'static) -> Self {
        let d = Self::new();
        d.inner.borrow_mut().canceller = Some(Box::new(canceller));
        d
    }

    /// A Deferred that has already fired with `value`.
    pub fn succeed(value: T) -> Self {
        Self::from_result(Ok(value))
    }

    /// A Deferred that has already failed.
    #[track_caller]
    pub fn fail(failure: impl Into<Failure>) -> Self {
        Self::from_result(Err(failure.into()))
    }

    /// A Deferred that has already fired with `result`.
    pub fn from_result(result: Result<T, Failure>) -> Self {
        let d = Self::new();
        {
            let mut inner = d.inner.borrow_mut();
            inner.called = true;
            inner.state = State::Ready(result);
        }
        d
    }

    /// True once `callback` or `errback` has been called (or `cancel` fired it).
    pub fn called(&self) -> bool {
        self.inner.borrow().called
    }

    /// True while [`pause`](Deferred::pause) calls outnumber `unpause` calls.
    pub fn is_paused(&self) -> bool {
        self.inner.borrow().paused > 0
    }

    /// True while the chain waits for another Deferred returned by a callback.
    pub fn is_waiting(&self) -> bool {
        matches!(self.inner.borrow().state, State::Waiting(_))
    }

    /// True if both handles refer to the same Deferred.
    pub fn ptr_eq(&self, other: &Deferred<T>) -> bool {
        Rc::ptr_eq(&self.inner, &other.inner)
    }

    /// Fires with a value and runs the chain. A second fire is
    /// [`Error::DeferredAlreadyCalled`] (except the one fire swallowed after
    /// a `cancel` without canceller).
    pub fn callback(&self, value: T) -> Result<(), Error> {
        self.fire(Ok(value))
    }

    /// Fires with a failure and runs the chain. A second fire is
    /// [`Error::DeferredAlreadyCalled`].
    #[track_caller]
    pub fn errback(&self, failure: impl Into<Failure>) -> Result<(), Error> {
        self.fire(Err(failure.into()))
    }

    fn fire(&self, result: Result<T, Failure>) -> Result<(), Error> {
        if let Some(next) = self.settle(Outcome::Done(result))? {
            drive(next);
        }
        Ok(())
    }

    /// Gives this (unfired) Deferred its result without running anything;
    /// returns the chain the caller must drive.
    pub(super) fn settle(&self, out: Outcome<T>) -> Result<Option<Rc<dyn Node>>, Error> {
        let mut inner = self.inner.borrow_mut();
        if inner.called {
            if inner.suppress_already_called {
                inner.suppress_already_called = false;
                drop(inner);
                drop(out);
                return Ok(None);
            }
            drop(inner);
            drop(out);
            return Err(Error::DeferredAlreadyCalled);
        }
        inner.called = true;
        let canceller = inner.canceller.take();
        match out {
            Outcome::Done(result) => {
                inner.state = State::Ready(result);
                drop(inner);
                drop(canceller);
                Ok(Some(self.node()))
            }
            Outcome::Wait(other) => {
                drop(inner);
                drop(canceller);
                Ok(match wait_on(&self.inner, other) {
                    Chained::Continue => Some(self.node()),
                    Chained::Resume(next) => Some(next),
                    Chained::Blocked => None,
                })
            }
        }
    }

    pub(super) fn node(&self) -> Rc<dyn Node> {
        self.inner.clone()
    }

    /// Appends a step and runs the chain if it can make progress.
    pub(super) fn push(&self, step: Step<T>) {
        let runnable = {
            let mut inner = self.inner.borrow_mut();
            inner.steps.push_back(step);
            matches!(inner.state, State::Ready(_) | State::Consumed) && inner.idle()
        };
        if runnable {
            drive(self.node());
        }
    }

    /// Adds a callback for the success track. Its return value (`Ok`,
    /// `Err`, or a Deferred to wait for) becomes the next result; failures
    /// pass it by. On a fired Deferred it runs at once.
    pub fn add_callback<R>(&self, f: impl FnOnce(T) -> R + 'static) -> &Self
    where
        R: Into<Outcome<T>>,
    {
        self.push(Step::Call(Box::new(move |result| match result {
            Ok(value) => f(value).into(),
            Err(failure) => Outcome::Done(Err(failure)),
        })));
        self
    }

    /// Adds an errback for the failure track. Returning `Ok` recovers (the
    /// chain switches back to callbacks); successes pass it by.
    pub fn add_errback<R>(&self, f: impl FnOnce(Failure) -> R + 'static) -> &Self
    where
        R: Into<Outcome<T>>,
    {
        self.push(Step::Call(Box::new(move |result| match result {
            Ok(value) => Outcome::Done(Ok(value)),
            Err(failure) => f(failure).into(),
        })));
        self
    }

    /// Adds a callback/errback pair as one step: exactly one of them runs,
    /// so `errback` never sees a failure raised by `callback`.
    pub fn add_callbacks<R1, R2>(
        &self,
        callback: impl FnOnce(T) -> R1 + 'static,
        errback: impl FnOnce(Failure) -> R2 + 'static,
    ) -> &Self
    where
        R1: Into<Outcome<T>>,
        R2: Into<Outcome<T>>,
    {
        self.push(Step::Call(Box::new(move |result| match result {
            Ok(value) => callback(value).into(),
            Err(failure) => errback(failure).into(),
        })));
        self
    }

    /// Adds a step that sees the result, success or failure, and passes on
    /// what it returns. On a fired Deferred it runs at once.
    pub fn add_both<R>(&self, f: impl FnOnce(Result<T, Failure>) -> R + 'static) -> &Self
    where
        R: Into<Outcome<T>>,
    {
        self.push(Step::Call(Box::new(move |result| f(result).into())));
        self
    }

    /// Moves this chain's result into `other` when it arrives (Twisted's
    /// `chainDeferred`). Afterwards this Deferred holds no result. If
    /// `other` has already fired, this chain continues with
    /// [`Error::DeferredAlreadyCalled`].
    pub fn chain_deferred(&self, other: &Deferred<T>) -> &Self {
        let target = other.clone();
        self.push(Step::Handoff(Box::new(move |result| match target.settle(Outcome::Done(result)) {
            Ok(next) => Handed::moved(next),
            Err(e) => Handed { keep: Some(Err(Failure::new(e))), next: None },
        })));
        self
    }

    /// Ends this chain in a step that may change the type: `f` gets the
    /// result and returns the new Deferred's outcome (a result, or a
    /// `Deferred<U>` to wait for). The result moves into the new Deferred,
    /// so steps added to this one afterwards do not run. Cancelling the new
    /// Deferred cancels this one (while something else still holds it: the
    /// new Deferred does not keep its source alive).
    pub fn then<U: 'static, R>(&self, f: impl FnOnce(Result<T, Failure>) -> R + 'static) -> Deferred<U>
    where
        R: Into<Outcome<U>>,
    {
        let upstream = Rc::downgrade(&self.inner);
        let next = Deferred::<U>::with_canceller(move |_| {
            if let Some(inner) = upstream.upgrade() {
                Deferred { inner }.cancel();
            }
        });
        let target = next.clone();
        self.push(Step::Handoff(Box::new(move |result| {
            let out = catch_unwind(AssertUnwindSafe(move || f(result).into()))
                .unwrap_or_else(|payload| Outcome::Done(Err(panic_failure(payload))));
            // If the new Deferred was fired by hand meanwhile, this result
            // arrives too late and goes nowhere.
            Handed::moved(target.settle(out).unwrap_or(None))
        })));
        next
    }

    /// Like [`then`](Deferred::then), but `f` only sees successes; a
    /// failure passes straight to the new Deferred.
    pub fn and_then<U: 'static, R>(&self, f: impl FnOnce(T) -> R + 'static) -> Deferred<U>
    where
        R: Into<Outcome<U>>,
    {
        self.then(move |result| match result {
            Ok(value) => f(value).into(),
            Err(failure) => Outcome::Done(Err(failure)),
        })
    }

    /// A new Deferred with `f` applied to the success value; failures pass
    /// through unchanged.
    pub fn map<U: 'static>(&self, f: impl FnOnce(T) -> U + 'static) -> Deferred<U> {
        self.then(move |result| Outcome::Done(result.map(f)))
    }

    /// Stops the chain: results are held until a matching
    /// [`unpause`](Deferred::unpause). Calls nest.
    pub fn pause(&self) {
        self.inner.borrow_mut().paused += 1;
    }

    /// Undoes one [`pause`](Deferred::pause) and, once none are left, runs
    /// the held chain. Unpausing a Deferred that is not paused does nothing.
    pub fn unpause(&self) {
        {
            let mut inner = self.inner.borrow_mut();
            if inner.paused == 0 {
                return;
            }
            inner.paused -= 1;
            if inner.paused > 0 {
                return;
            }
        }
        drive(self.node());
    }

    /// Cancels the operation behind this Deferred.
    ///
    /// - Not fired: calls the canceller (if any); if it did not fire the
    ///   Deferred, errbacks with [`Error::Cancelled`]. Without a canceller
    ///   the next `callback`/`errback` is swallowed once.
    /// - Fired, but waiting on a Deferred returned by a callback: cancels
    ///   that one instead (and so on down the chain).
    /// - Otherwise: does nothing.
    ///
    /// A panicking canceller is logged and treated as one that did nothing.
    #[track_caller]
    pub fn cancel(&self) {
        let cancelled = Failure::new(Error::Cancelled);
        let mut target = self.clone();
        loop {
            let next = {
                let inner = target.inner.borrow();
                if !inner.called {
                    None
                } else if let State::Waiting(other) = &inner.state {
                    match other.upgrade() {
                        Some(other) => Some(other),
                        None => return,
                    }
                } else {
                    return;
                }
            };
            match next {
                Some(inner) => target = Deferred { inner },
                None => break,
            }
        }
        let canceller = {
            let mut inner = target.inner.borrow_mut();
            let canceller = inner.canceller.take();
            if canceller.is_none() {
                inner.suppress_already_called = true;
            }
            canceller
        };
        if let Some(canceller) = canceller {
            if let Err(payload) = catch_unwind(AssertUnwindSafe(|| canceller(&target))) {
                let failure = panic_failure(payload);
                tracing::error!("Deferred canceller panicked: {failure}");
            }
        }
        if !target.called() {
            let _ = target.fire(Err(cancelled));
        }
    }

    /// Cancels this Deferred if it has not fired `delay` from now on
    /// `clock` (the reactor, or `testing::Clock`), and turns the resulting
    /// [`Error::Cancelled`] failure into [`Error::TimedOut`]. Returns `self`
    /// for chaining.
    ///
    /// - A result (or failure) that arrives first passes through unchanged,
    ///   and the timer is cancelled.
    /// - Only steps added *before* this call see the cancellation: an
    ///   errback added earlier sees `Cancelled` and may recover from it;
    ///   if the failure reaching this point is still `Cancelled` (and the
    ///   timer fired), it becomes `TimedOut`. A canceller that fires the
    ///   Deferred with a success, or with another failure, keeps that outcome.
    /// - A `cancel()` by hand before the deadline stays a plain `Cancelled`.
    ///
    /// ```
    /// use std::time::Duration;
    /// use braid::{testing::Clock, Deferred, Error};
    ///
    /// let clock = Clock::new();
    /// let d: Deferred<u32> = Deferred::new();
    /// d.add_timeout(&clock, Duration::from_secs(5));
    /// clock.advance(Duration::from_secs(5));
    /// d.add_errback(|failure| {
    ///     assert!(matches!(failure.braid_error(), Some(Error::TimedOut)));
    ///     Ok(0)
    /// });
    /// ```
    pub fn add_timeout(&self, clock: &dyn crate::reactor::ReactorTime, delay: std::time::Duration) -> &Self {
        self.add_timeout_with(clock, delay, |result, _delay| match result {
            Err(failure) if matches!(failure.braid_error(), Some(Error::Cancelled)) => {
                Outcome::Done(Err(Failure::new(Error::TimedOut)))
            }
            other => Outcome::Done(other),
        })
    }

    /// Like [`add_timeout`](Deferred::add_timeout), but when the timer has
    /// fired, `on_timeout` gets the result the cancellation produced (and
    /// the delay) and decides the outcome, as Twisted's `onTimeoutCancel`.
    /// It is not called when the result came before the deadline.
    pub fn add_timeout_with<R>(
        &self,
        clock: &dyn crate::reactor::ReactorTime,
        delay: std::time::Duration,
        on_timeout: impl FnOnce(Result<T, Failure>, std::time::Duration) -> R + 'static,
    ) -> &Self
    where
        R: Into<Outcome<T>>,
    {
        let timed_out = Rc::new(std::cell::Cell::new(false));
        let flag = timed_out.clone();
        let target = self.clone();
        let timer = clock.schedule(
            delay,
            Box::new(move || {
                flag.set(true);
                target.cancel();
            }),
        );
        self.add_both(move |result| {
            if timed_out.get() {
                on_timeout(result, delay).into()
            } else {
                // The result came first: the timer must not fire any more.
                let _ = timer.cancel();
                Outcome::Done(result)
            }
        })
    }

    /// Takes the final result if the chain has finished (used by `.await`).
    pub(super) fn poll_take(&self, waker: &Waker) -> Option<Result<T, Failure>> {
        let mut inner = self.inner.borrow_mut();
        let finished = inner.steps.is_empty() && inner.idle();
        match &inner.state {
            State::Ready(_) if finished => {
                let State::Ready(result) = std::mem::replace(&mut inner.state, State::Consumed) else {
                    return None;
                };
                let others = std::mem::take(&mut inner.wakers);
                drop(inner);
                wake_all(others);
                Some(result)
            }
            State::Consumed => Some(Err(Failure::new(DeferError::ResultConsumed))),
            _ => {
                if !inner.wakers.iter().any(|w| w.will_wake(waker)) {
                    inner.wakers.push(waker.clone());
                }
                None
            }
        }
    }
}

/// Runs `f` now and wraps what it gives in a Deferred: a value or failure
/// becomes a fired Deferred, a returned Deferred is passed through as is,
/// and a panic becomes a failure ([`Error::Panicked`]).
pub fn maybe_deferred<T: 'static, R>(f: impl FnOnce() -> R) -> Deferred<T>
where
    R: Into<Outcome<T>>,
{
    match catch_unwind(AssertUnwindSafe(|| f().into())) {
        Ok(Outcome::Done(result)) => Deferred::from_result(result),
        Ok(Outcome::Wait(d)) => d,
        Err(payload) => Deferred::from_result(Err(panic_failure(payload))),
    }
}

/// An errback that logs the failure (at error level) and passes it on.
pub fn log_error<T>(failure: Failure) -> Result<T, Failure> {
    tracing::error!(location = %failure.location(), "Deferred failed: {failure}");
    Err(failure)
}
