//! Test doubles: drive time and connections by hand, with no sockets and
//! no waiting. Used by braid's own tests and meant for yours.

use std::rc::Rc;
use std::time::Duration;

use crate::reactor::{CallbackResult, DelayedCall, ReactorTime, TimeSource, Timers};

/// Deterministic time (Twisted's `task.Clock`): starts at 0 and moves only
/// when told to. It hands out the same [`DelayedCall`] as the reactor.
///
/// ```
/// use std::cell::Cell;
/// use std::rc::Rc;
/// use std::time::Duration;
/// use braid::testing::Clock;
///
/// let clock = Clock::new();
/// let fired = Rc::new(Cell::new(false));
/// let f = fired.clone();
/// clock.call_later(Duration::from_secs(5), move || f.set(true));
/// clock.advance(Duration::from_secs(4));
/// assert!(!fired.get());
/// clock.advance(Duration::from_secs(1));
/// assert!(fired.get());
/// ```
#[derive(Clone)]
pub struct Clock {
    timers: Rc<Timers>,
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock {
    /// A clock at time 0 with nothing scheduled.
    pub fn new() -> Clock {
        Clock { timers: Timers::new(TimeSource::Manual(std::cell::Cell::new(0))) }
    }

    /// The clock's current time in seconds.
    pub fn seconds(&self) -> f64 {
        self.timers.seconds()
    }

    /// Schedules `f` to run once the clock has advanced by `delay`.
    pub fn call_later<F, R>(&self, delay: Duration, f: F) -> DelayedCall
    where
        F: FnOnce() -> R + 'static,
        R: CallbackResult + 'static,
    {
        self.timers.call_later(delay, f)
    }

    /// Moves time forward by `by` and runs every call now due, in order,
    /// including calls those calls schedule for no later than the new time.
    pub fn advance(&self, by: Duration) {
        self.timers.advance(by);
        while self.timers.run_due() > 0 {}
    }

    /// Advances by each step in turn (Twisted's `Clock.pump`).
    pub fn pump(&self, steps: &[Duration]) {
        for &step in steps {
            self.advance(step);
        }
    }

    /// Every pending call.
    pub fn get_delayed_calls(&self) -> Vec<DelayedCall> {
        self.timers.pending()
    }
}

impl ReactorTime for Clock {
    fn seconds(&self) -> f64 {
        Clock::seconds(self)
    }
    fn schedule(&self, delay: Duration, f: Box<dyn FnOnce()>) -> DelayedCall {
        self.call_later(delay, f)
    }
    fn pending_calls(&self) -> Vec<DelayedCall> {
        self.get_delayed_calls()
    }
}
