//! The reactor's calls that answer with a Deferred. They live here, not in
//! the reactor core, because Deferred is built on the reactor and the core
//! must not depend on it: a *before* trigger that returns a Deferred holds
//! its event, `defer_to_thread` runs a blocking call on the pool, and
//! `blocking_call_from_thread` waits on another thread for one.

use std::sync::mpsc;

use super::Deferred;
use crate::error::{Error, Failure};
use crate::reactor::{catch_panic, Hold, Reactor, Remote, TriggerOutcome, TriggerResult};

/// A Deferred returned by a *before* trigger holds the event's later phases
/// until it fires (with a value or a failure alike).
impl<T: 'static> TriggerResult for Deferred<T> {
    fn into_outcome(self) -> TriggerOutcome {
        TriggerOutcome::Hold(Hold::new(move |resume| {
            self.add_both(move |result| {
                resume();
                result
            });
        }))
    }
}

/// Deferreds waiting for a pool thread's result. A Deferred is not `Send`,
/// so it stays here on the reactor thread; the thread sends back only its
/// index and the result.
#[derive(Default)]
struct ThreadResults(std::cell::RefCell<slab::Slab<Box<dyn std::any::Any>>>);

impl Reactor {
    /// Runs `f` on the thread pool and delivers its result to a Deferred on
    /// the reactor thread. A panic in `f` becomes a failure.
    pub fn defer_to_thread<T, E, F>(&self, f: F) -> Deferred<T>
    where
        T: Send + 'static,
        E: Into<Failure> + Send + 'static,
        F: FnOnce() -> Result<T, E> + Send + 'static,
    {
        let d = Deferred::<T>::new();
        let id = self.extension::<ThreadResults>().0.borrow_mut().insert(Box::new(d.clone()));
        let remote = self.remote();
        self.call_in_thread(move || {
            let result = catch_panic(|| f().map_err(Into::into));
            let _ = remote.call_from_thread(move |reactor| {
                let slot = reactor.extension::<ThreadResults>().0.borrow_mut().try_remove(id);
                if let Some(d) = slot.and_then(|b| b.downcast::<Deferred<T>>().ok()) {
                    let _ = match result {
                        Ok(v) => d.callback(v),
                        Err(e) => d.errback(e),
                    };
                }
            });
        });
        d
    }
}

impl Remote {
    /// Runs `f` on the reactor thread and blocks this thread until the
    /// Deferred it returns fires; returns that result. Use
    /// `Deferred::succeed(v)` for a plain value.
    ///
    /// Fails with `WouldDeadlock` on the reactor's own thread, and with
    /// `ReactorGone` if the reactor stops for good or is dropped before the
    /// call runs (or before its Deferred fires): it never waits forever on a
    /// reactor that will not answer.
    pub fn blocking_call_from_thread<T, F>(&self, f: F) -> Result<T, Failure>
    where
        T: Send + 'static,
        F: FnOnce(&Reactor) -> Deferred<T> + Send + 'static,
    {
        if self.is_in_io_thread() {
            return Err(Failure::new(Error::WouldDeadlock));
        }
        let (tx, rx) = mpsc::sync_channel::<Result<T, Failure>>(1);
        // If the queued call is dropped unrun (the reactor stopped or went
        // away), `tx` goes with it and `recv` below returns an error.
        self.call_from_thread(move |reactor| match catch_panic(|| Ok(f(reactor))) {
            Ok(d) => {
                // The result moves into a `Deferred<()>` that ends the chain
                // with `Ok(())`: the value (or failure) goes to the waiting
                // thread, and nothing is left behind to be reported as
                // unhandled.
                let _done: Deferred<()> = d.then(move |result| {
                    let _ = tx.send(result);
                    Ok(())
                });
            }
            Err(failure) => {
                let _ = tx.send(Err(failure));
            }
        })?;
        rx.recv().unwrap_or_else(|_| Err(Failure::new(Error::ReactorGone)))
    }
}
