//! System event triggers: three phases (before, during, after) per named
//! event such as "startup" and "shutdown".
//!
//! Triggers are consumed as they run, so firing an event runs each trigger
//! once. A *before* trigger may return something that holds the event (a
//! Deferred, through [`Hold`]); the *during* and *after* phases then wait
//! until every hold is released. The phases keep their order whatever a
//! trigger returns, even a hold that is released at once.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Failure};

/// The phase of a system event a trigger runs in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Runs first; may hold the event by returning a Deferred.
    Before,
    /// Runs once every *before* Deferred has fired.
    During,
    /// Runs last.
    After,
}

impl FromStr for Phase {
    type Err = Error;
    fn from_str(s: &str) -> Result<Phase, Error> {
        match s {
            "before" => Ok(Phase::Before),
            "during" => Ok(Phase::During),
            "after" => Ok(Phase::After),
            other => Err(Error::UnknownPhase(other.to_string())),
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Before => "before",
            Phase::During => "during",
            Phase::After => "after",
        })
    }
}

/// Identifies one registered trigger, for `remove_system_event_trigger`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TriggerId {
    event: String,
    id: u64,
}

/// Called once the held work is done.
pub(crate) type Resume = Box<dyn FnOnce()>;

/// Registers a callback for when a held event may go on.
pub struct Hold(Box<dyn FnOnce(Resume)>);

/// What a trigger returned: finished (well or not), or holding the event.
pub enum TriggerOutcome {
    /// The trigger is done.
    Done(Result<(), Failure>),
    /// The event waits for this to finish (only honoured in *before*).
    Hold(Hold),
}

/// What a trigger callback may return: `()`, a `Result`, or something that
/// holds the event's later phases until it is done (a Deferred: see
/// `defer/`, which implements this trait for it).
pub trait TriggerResult {
    /// Converts the return value.
    fn into_outcome(self) -> TriggerOutcome;
}

impl TriggerResult for () {
    fn into_outcome(self) -> TriggerOutcome {
        TriggerOutcome::Done(Ok(()))
    }
}

impl<E: Into<Failure>> TriggerResult for Result<(), E> {
    fn into_outcome(self) -> TriggerOutcome {
        TriggerOutcome::Done(self.map_err(Into::into))
    }
}

impl Hold {
    /// A hold that, given the event's continuation, calls it once the held
    /// work is done (at once is allowed).
    pub(crate) fn new(on_done: impl FnOnce(Resume) + 'static) -> Hold {
        Hold(Box::new(on_done))
    }

    /// Calls `resume` once the held work is done (maybe at once).
    pub(crate) fn on_done(self, resume: Resume) {
        (self.0)(resume)
    }
}

pub(crate) type TriggerFn = Box<dyn FnOnce() -> TriggerOutcome>;

#[derive(Default)]
struct EventTriggers {
    before: VecDeque<(u64, TriggerFn)>,
    during: VecDeque<(u64, TriggerFn)>,
    after: VecDeque<(u64, TriggerFn)>,
    /// Holds from before-phase triggers not yet released in this firing.
    waiting: usize,
    /// Where the current firing is, if the event is firing.
    firing: Option<Firing>,
}

/// How far one firing of an event has got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Firing {
    /// The before triggers are still being run: a hold released now must
    /// not start the later phases, the loop over the rest comes first.
    RunningBefore,
    /// Every before trigger has run; waiting for holds to be released.
    BeforeDone,
    /// The during and after phases have begun (the continuation runs once).
    Continued,
}

impl EventTriggers {
    /// True exactly once per firing: when the before phase is over and no
    /// hold is left.
    fn take_continuation(&mut self) -> bool {
        if self.waiting == 0 && self.firing == Some(Firing::BeforeDone) {
            self.firing = Some(Firing::Continued);
            return true;
        }
        false
    }

    fn phase(&mut self, phase: Phase) -> &mut VecDeque<(u64, TriggerFn)> {
        match phase {
            Phase::Before => &mut self.before,
            Phase::During => &mut self.during,
            Phase::After => &mut self.after,
        }
    }
}

/// All triggers of one reactor.
#[derive(Default)]
pub(crate) struct Triggers {
    events: HashMap<String, EventTriggers>,
    next_id: u64,
}

impl Triggers {
    pub fn add(&mut self, phase: Phase, event: &str, f: TriggerFn) -> TriggerId {
        self.next_id += 1;
        let id = self.next_id;
        self.events.entry(event.to_string()).or_default().phase(phase).push_back((id, f));
        TriggerId { event: event.to_string(), id }
    }

    pub fn remove(&mut self, trigger: &TriggerId) -> Result<(), Error> {
        let event = self.events.get_mut(&trigger.event).ok_or(Error::NoSuchTrigger)?;
        for phase in [Phase::Before, Phase::During, Phase::After] {
            let list = event.phase(phase);
            if let Some(pos) = list.iter().position(|(id, _)| *id == trigger.id) {
                list.remove(pos);
                return Ok(());
            }
        }
        Err(Error::NoSuchTrigger)
    }

    /// Marks `event` as firing its before phase. False if it already is firing.
    pub fn begin(&mut self, event: &str) -> bool {
        let e = self.events.entry(event.to_string()).or_default();
        if e.firing.is_some() {
            return false;
        }
        e.firing = Some(Firing::RunningBefore);
        e.waiting = 0;
        true
    }

    /// Pops the next trigger of `phase` for `event`.
    pub fn pop(&mut self, event: &str, phase: Phase) -> Option<TriggerFn> {
        self.events.get_mut(event)?.phase(phase).pop_front().map(|(_, f)| f)
    }

    pub fn hold(&mut self, event: &str) {
        if let Some(e) = self.events.get_mut(event) {
            e.waiting += 1;
        }
    }

    /// One hold was released; true if the event may now go on (the caller
    /// then runs the continuation, and no later call returns true again).
    pub fn release(&mut self, event: &str) -> bool {
        match self.events.get_mut(event) {
            Some(e) => {
                e.waiting = e.waiting.saturating_sub(1);
                e.take_continuation()
            }
            None => false,
        }
    }

    /// Every before trigger has run: true if nothing holds the event, so the
    /// caller runs the continuation now; otherwise the last release will.
    pub fn before_done(&mut self, event: &str) -> bool {
        match self.events.get_mut(event) {
            Some(e) => {
                if e.firing == Some(Firing::RunningBefore) {
                    e.firing = Some(Firing::BeforeDone);
                }
                e.take_continuation()
            }
            None => false,
        }
    }

    pub fn finish(&mut self, event: &str) {
        if let Some(e) = self.events.get_mut(event) {
            e.firing = None;
        }
    }
}
