//! Deferred: a result that is not there yet, with a chain of callbacks.
//!
//! This is the minimal core the reactor needs (fire once, observe the
//! result); the Deferred issue grows it into Twisted's full toolkit.

use std::cell::RefCell;
use std::rc::Rc;

use crate::error::{Error, Failure};

type Callback<T> = Box<dyn FnOnce(Result<T, Failure>) -> Result<T, Failure>>;

struct Inner<T> {
    result: Option<Result<T, Failure>>,
    called: bool,
    callbacks: Vec<Callback<T>>,
    running: bool,
}

/// A value (or a [`Failure`]) that arrives later, with callbacks to run when
/// it does. Cloning gives another handle to the same Deferred.
pub struct Deferred<T: 'static> {
    inner: Rc<RefCell<Inner<T>>>,
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

impl<T: 'static> Deferred<T> {
    /// A Deferred that has not fired yet.
    pub fn new() -> Self {
        Deferred {
            inner: Rc::new(RefCell::new(Inner {
                result: None,
                called: false,
                callbacks: Vec::new(),
                running: false,
            })),
        }
    }

    /// A Deferred that has already fired with `value`.
    pub fn succeed(value: T) -> Self {
        let d = Self::new();
        let _ = d.callback(value);
        d
    }

    /// A Deferred that has already failed.
    pub fn fail(failure: impl Into<Failure>) -> Self {
        let d = Self::new();
        let _ = d.errback(failure.into());
        d
    }

    /// True once `callback` or `errback` has been called.
    pub fn called(&self) -> bool {
        self.inner.borrow().called
    }

    /// Fires with a value. A second fire is [`Error::DeferredAlreadyCalled`].
    pub fn callback(&self, value: T) -> Result<(), Error> {
        self.fire(Ok(value))
    }

    /// Fires with a failure. A second fire is [`Error::DeferredAlreadyCalled`].
    pub fn errback(&self, failure: impl Into<Failure>) -> Result<(), Error> {
        self.fire(Err(failure.into()))
    }

    fn fire(&self, result: Result<T, Failure>) -> Result<(), Error> {
        {
            let mut inner = self.inner.borrow_mut();
            if inner.called {
                return Err(Error::DeferredAlreadyCalled);
            }
            inner.called = true;
            inner.result = Some(result);
        }
        self.run_callbacks();
        Ok(())
    }

    /// Adds a callback that sees the result, success or failure, and passes
    /// on what it returns. On a fired Deferred it runs at once.
    pub fn add_both(&self, f: impl FnOnce(Result<T, Failure>) -> Result<T, Failure> + 'static) -> &Self {
        self.inner.borrow_mut().callbacks.push(Box::new(f));
        self.run_callbacks();
        self
    }

    fn run_callbacks(&self) {
        loop {
            let (cb, result) = {
                let mut inner = self.inner.borrow_mut();
                if inner.running || !inner.called || inner.callbacks.is_empty() {
                    return;
                }
                let Some(result) = inner.result.take() else { return };
                inner.running = true;
                (inner.callbacks.remove(0), result)
            };
            let out = cb(result);
            let mut inner = self.inner.borrow_mut();
            inner.result = Some(out);
            inner.running = false;
        }
    }
}
