//! Running user callbacks so that one bad callback cannot stop the loop.
//!
//! A callback may return `()` or a `Result`; an `Err` or a panic is logged
//! with context (which call, which descriptor) and the loop goes on.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::error::{Error, Failure};

/// What a reactor callback may return: nothing, or a `Result` whose error
/// the reactor logs.
pub trait CallbackResult {
    /// Turns the return value into a result the reactor can log.
    fn into_result(self) -> Result<(), Failure>;
}

impl CallbackResult for () {
    #[inline]
    fn into_result(self) -> Result<(), Failure> {
        Ok(())
    }
}

impl<E: Into<Failure>> CallbackResult for Result<(), E> {
    #[inline]
    fn into_result(self) -> Result<(), Failure> {
        self.map_err(Into::into)
    }
}

/// Describes a panic payload as text.
pub(crate) fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

/// Runs `f`, turning a panic into a `Failure`.
#[inline]
pub(crate) fn catch<R>(f: impl FnOnce() -> Result<R, Failure>) -> Result<R, Failure> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => Err(Failure::new(Error::Panicked(panic_message(&*payload)))),
    }
}

/// Runs `f`; logs an error or a panic with `what` as context. Returns true
/// if the callback succeeded.
#[inline]
pub(crate) fn run_logged(what: impl FnOnce() -> String, f: impl FnOnce() -> Result<(), Failure>) -> bool {
    match catch(f) {
        Ok(()) => true,
        Err(failure) => {
            log_failure(&what(), &failure);
            false
        }
    }
}

/// Logs a failure from user code.
pub(crate) fn log_failure(what: &str, failure: &Failure) {
    tracing::error!(target: "braid", "unhandled error {what}: {failure} (raised at {})", failure.location());
}
