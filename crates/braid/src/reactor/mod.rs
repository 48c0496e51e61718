//! The reactor. (being written)
use std::time::Duration;

use crate::backend::Backend;
use crate::error::Error;

#[allow(dead_code)]
pub(crate) mod timer_queue;

/// This thread's event loop.
#[derive(Clone)]
pub struct Reactor {}

impl Reactor {
    /// Builds an independent reactor.
    pub fn new(_backend: Backend) -> Result<Reactor, Error> {
        todo!()
    }
    /// Schedules `f`.
    pub fn call_later(&self, _delay: Duration, _f: impl FnOnce() + 'static) {
        todo!()
    }
    /// Stops.
    pub fn stop(&self) -> Result<(), Error> {
        todo!()
    }
    /// Runs.
    pub fn run_without_signal_handlers(&self) -> Result<(), Error> {
        todo!()
    }
}

/// This thread's reactor.
pub fn reactor() -> Reactor {
    todo!()
}
/// This thread's reactor.
pub fn try_reactor() -> Result<Reactor, Error> {
    todo!()
}
/// Installs.
pub fn install(_backend: Backend) -> Result<Reactor, Error> {
    todo!()
}
