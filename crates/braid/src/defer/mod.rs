//! Deferred: a result that is not there yet, with a chain of callbacks.
//!
//! A [`Deferred<T>`] stands for an operation in progress. Whoever runs the
//! operation fires it once, with [`callback`](Deferred::callback) (a value)
//! or [`errback`](Deferred::errback) (a [`Failure`]); whoever wants the
//! result adds steps to its chain. Steps run in the order they were added,
//! each getting the result the previous one returned:
//!
//! - [`add_callback`](Deferred::add_callback) runs on success,
//!   [`add_errback`](Deferred::add_errback) on failure,
//!   [`add_callbacks`](Deferred::add_callbacks) is one of each as a pair,
//!   [`add_both`](Deferred::add_both) sees either.
//! - A step returning `Err` (or panicking) switches the chain to the error
//!   track; an errback returning `Ok` switches it back.
//! - A step may instead return another `Deferred<T>`: the chain pauses until
//!   that one fires and then carries on with its result. Any value that
//!   converts into an [`Outcome`] can be returned.
//! - Steps added to a Deferred that has already fired run at once.
//!
//! ```
//! use braid::defer::Deferred;
//! use braid::Failure;
//! use std::cell::RefCell;
//! use std::rc::Rc;
//!
//! let seen = Rc::new(RefCell::new(Vec::new()));
//! let d: Deferred<i32> = Deferred::new();
//!
//! let log = seen.clone();
//! d.add_callback(|n| Ok(n * 2))
//!     .add_callback(|n| if n > 10 { Err(Failure::msg("too big")) } else { Ok(n) })
//!     .add_callback(|n| Ok(n + 1000)) // skipped: the chain is on the error track
//!     .add_errback(move |failure| {
//!         log.borrow_mut().push(format!("recovered from: {failure}"));
//!         Ok(0) // back on the success track
//!     })
//!     .add_callback({
//!         let log = seen.clone();
//!         move |n| {
//!             log.borrow_mut().push(format!("final: {n}"));
//!             Ok(n)
//!         }
//!     });
//!
//! d.callback(21).unwrap(); // 21 * 2 = 42 > 10
//! assert_eq!(*seen.borrow(), ["recovered from: too big", "final: 0"]);
//! // A Deferred fires only once.
//! assert!(d.callback(1).is_err());
//! ```
//!
//! # Waiting on another Deferred
//!
//! A callback that starts another operation returns its Deferred; the rest
//! of the chain runs when that one fires. However deeply Deferreds are
//! nested, the chain runs in a loop, never by recursion.
//!
//! ```
//! use braid::defer::Deferred;
//!
//! let lookup: Deferred<u32> = Deferred::new();
//! let connect: Deferred<u32> = Deferred::new();
//!
//! let inner = lookup.clone();
//! connect.add_callback(move |_| inner); // wait for the lookup
//! connect.add_callback(|addr| Ok(addr + 1));
//!
//! connect.callback(0).unwrap();
//! assert!(connect.is_waiting());
//! lookup.callback(41).unwrap();
//! assert!(!connect.is_waiting());
//! ```
//!
//! # Changing the type
//!
//! The chain itself keeps one type `T`. [`then`](Deferred::then),
//! [`and_then`](Deferred::and_then) and [`map`](Deferred::map) end it in a
//! step that produces a new `Deferred<U>`; the result moves into it, and
//! cancelling the new Deferred cancels the old one.
//!
//! ```
//! use braid::defer::Deferred;
//!
//! let bytes: Deferred<Vec<u8>> = Deferred::new();
//! let length: Deferred<usize> = bytes.map(|b| b.len());
//! let text: Deferred<String> = length.and_then(|n| Ok(format!("{n} bytes")));
//! bytes.callback(vec![1, 2, 3]).unwrap();
//! text.add_callback(|s| {
//!     assert_eq!(s, "3 bytes");
//!     Ok(s)
//! });
//! ```
//!
//! # Cancellation, pausing, errors
//!
//! [`cancel`](Deferred::cancel) asks the operation to stop: the canceller
//! given to [`with_canceller`](Deferred::with_canceller) runs, and if it does
//! not fire the Deferred, it fails with [`Error::Cancelled`](crate::Error::Cancelled).
//! A Deferred waiting on another one passes the cancel on. [`pause`](Deferred::pause)
//! holds the chain until [`unpause`](Deferred::unpause).
//!
//! A Deferred whose result is still a failure when its last handle is
//! dropped logs "Unhandled error in Deferred" with `tracing::error!`. Add
//! an errback (or [`log_error`]) to every chain that can fail.
//!
//! # async/await
//!
//! `Deferred<T>` is a [`Future`](std::future::Future) with output
//! `Result<T, Failure>`; awaiting takes the final result (so `?` works).
//! [`Reactor::spawn`](crate::Reactor::spawn) (or [`ensure_deferred`]) runs
//! a future on the reactor thread and gives a Deferred for its result, so
//! the two styles mix freely: futures await Deferreds, callbacks return
//! the Deferreds of spawned futures. The future must end in
//! `Result<T, Failure>`: `Ok` fires the Deferred, `Err` errbacks it, a
//! panic errbacks it with [`Error::Panicked`](crate::Error::Panicked).
//! Cancelling the Deferred drops the future.
//!
//! ```
//! use std::time::Duration;
//! use braid::{task, Backend, Deferred, Failure, Reactor};
//!
//! let reactor = Reactor::new(Backend::Poll).unwrap();
//!
//! // Callback style: a Deferred some other code will fire.
//! let greeting: Deferred<String> = task::defer_later(&reactor, Duration::from_millis(2), || {
//!     Ok(String::from("hello"))
//! });
//!
//! // Async style, awaiting it, then a timer, then stopping the reactor.
//! let r = reactor.clone();
//! let done: Deferred<usize> = reactor.spawn(async move {
//!     let text = greeting.await?;
//!     task::sleep(&r, Duration::from_millis(1)).await?;
//!     let n: usize = "42".parse()?; // any error converts into a Failure
//!     r.stop()?;
//!     Ok(text.len() + n)
//! });
//!
//! reactor.run_without_signal_handlers().unwrap();
//! done.add_callback(|n| {
//!     assert_eq!(n, 47);
//!     Ok(n)
//! });
//! ```
//!
//! # Threads
//!
//! A Deferred belongs to the thread that made it (like the reactor): it is
//! neither `Send` nor `Sync`. Results from other threads come in through
//! the reactor's thread-safe entry points.
//!
//! ```compile_fail
//! fn needs_send<T: Send>(_: T) {}
//! needs_send(braid::Deferred::<i32>::new());
//! ```
//!
//! # Groups and coordination
//!
//! [`DeferredList`], [`deferred_list`], [`gather_results`] and [`race`] wait
//! on several Deferreds. [`DeferredLock`], [`DeferredSemaphore`] and
//! [`DeferredQueue`] coordinate callback code on one thread.
//!
//! # Timeouts
//!
//! [`add_timeout`](Deferred::add_timeout) cancels a Deferred that has not
//! fired by a deadline and turns the cancellation into
//! [`Error::TimedOut`](crate::Error::TimedOut). It takes any clock: the
//! reactor, or [`testing::Clock`](crate::testing::Clock) in tests.
//!
//! ```
//! use std::time::Duration;
//! use braid::testing::Clock;
//! use braid::{Deferred, Error};
//!
//! let clock = Clock::new();
//! let reply: Deferred<String> = Deferred::new();
//! reply.add_timeout(&clock, Duration::from_secs(30));
//! clock.advance(Duration::from_secs(30));
//! reply.add_errback(|failure| {
//!     assert!(matches!(failure.braid_error(), Some(Error::TimedOut)));
//!     Ok(String::from("no reply"))
//! });
//! ```
//!
//! For repeating calls, delays, cooperative iteration and small programs,
//! see [`task`](crate::task); for unit-testing protocols without sockets,
//! [`testing`](crate::testing).

use std::fmt;

use crate::error::Failure;

mod deferred;
mod executor;
mod future;
mod list;
mod primitives;
mod reactor;

pub(crate) use deferred::panic_failure as panic_to_failure;
pub use deferred::{log_error, maybe_deferred, Deferred, Outcome};
pub use executor::ensure_deferred;
pub use list::{deferred_list, gather_results, race, DeferredList, ListResult};
pub use primitives::{DeferredLock, DeferredQueue, DeferredSemaphore, QueueOverflow};

/// Misuse and bookkeeping errors of the Deferred toolkit.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeferError {
    /// `DeferredQueue::get` with `backlog` getters already waiting
    /// (Twisted's `QueueUnderflow`).
    QueueUnderflow,
    /// A semaphore needs at least one token.
    NoTokens,
    /// `release` with no token or lock held.
    NotAcquired,
    /// The result had already moved elsewhere (chained on, or awaited).
    ResultConsumed,
    /// A callback returned the Deferred it belongs to.
    CircularChain,
}

impl fmt::Display for DeferError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeferError::QueueUnderflow => "too many getters are already waiting on the queue",
            DeferError::NoTokens => "a semaphore needs at least one token",
            DeferError::NotAcquired => "release without a matching acquire",
            DeferError::ResultConsumed => "the Deferred's result has already been taken",
            DeferError::CircularChain => "a callback returned the Deferred it was added to",
        })
    }
}

impl std::error::Error for DeferError {}

/// The first failure of a [`DeferredList`] with `fire_on_one_errback`, or of
/// [`gather_results`], with the index of the input that failed.
#[derive(Debug, Clone)]
pub struct FirstError {
    /// Position of the failed input.
    pub index: usize,
    /// Its failure.
    pub failure: Failure,
}

impl fmt::Display for FirstError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FirstError[#{}, {}]", self.index, self.failure)
    }
}

impl std::error::Error for FirstError {}

/// Every input of a [`race`] failed; the failures are in input order.
#[derive(Debug, Clone)]
pub struct FailureGroup {
    /// One failure per input.
    pub failures: Vec<Failure>,
}

impl fmt::Display for FailureGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "all {} Deferreds failed", self.failures.len())?;
        for (i, failure) in self.failures.iter().enumerate() {
            write!(f, "{} #{i}: {failure}", if i == 0 { ":" } else { ";" })?;
        }
        Ok(())
    }
}

impl std::error::Error for FailureGroup {}
