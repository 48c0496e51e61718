//! Waiting on many Deferreds at once: `DeferredList`, `gather_results`, `race`.

use std::cell::RefCell;
use std::rc::{Rc, Weak};

use super::deferred::{Handed, Inner, Outcome, Step};
use super::{Deferred, FailureGroup, FirstError};
use crate::error::Failure;

type WeakInputs<T> = Vec<Weak<RefCell<Inner<T>>>>;

fn weak_inputs<T: 'static>(inputs: &[Deferred<T>]) -> WeakInputs<T> {
    inputs.iter().map(|d| Rc::downgrade(&d.inner)).collect()
}

/// Cancels every input still alive; each cancel logs its own canceller's
/// panic, so one bad canceller does not stop the rest.
fn cancel_all<T: 'static>(inputs: &[Weak<RefCell<Inner<T>>>]) {
    for input in inputs {
        if let Some(inner) = input.upgrade() {
            Deferred { inner }.cancel();
        }
    }
}

/// What a [`DeferredList`] fires with.
#[derive(Debug)]
pub enum ListResult<T> {
    /// Every input fired: one result per input, in input order.
    All(Vec<Result<T, Failure>>),
    /// With `fire_on_one_callback`: the first success and its input's index.
    First {
        /// Position of the input that succeeded first.
        index: usize,
        /// Its value.
        value: T,
    },
}

impl<T> ListResult<T> {
    /// The per-input results, if every input fired.
    pub fn into_all(self) -> Option<Vec<Result<T, Failure>>> {
        match self {
            ListResult::All(results) => Some(results),
            ListResult::First { .. } => None,
        }
    }

    /// The first success and its index, if the list fired on one callback.
    pub fn into_first(self) -> Option<(usize, T)> {
        match self {
            ListResult::First { index, value } => Some((index, value)),
            ListResult::All(_) => None,
        }
    }
}

/// Builds a Deferred that fires when a group of Deferreds has fired
/// (Twisted's `DeferredList`).
///
/// By default it fires with [`ListResult::All`] once every input has fired.
/// Success values move from the inputs into the list. A failure is copied:
/// the input keeps it (so its own later errbacks see it, and it is reported
/// if nobody handles it) unless [`consume_errors`](Self::consume_errors) is
/// set. Inputs that fired before the list was built count at once.
/// Cancelling the list's Deferred cancels every input that has not fired.
///
/// The list does not keep its inputs alive: an input nothing else holds
/// could never fire, so it is freed rather than kept for a later cancel.
/// List an input once; a value cannot move into two places.
pub struct DeferredList<T: 'static> {
    inputs: Vec<Deferred<T>>,
    fire_on_one_callback: bool,
    fire_on_one_errback: bool,
    consume_errors: bool,
}

struct ListState<T: 'static> {
    results: Vec<Option<Result<T, Failure>>>,
    remaining: usize,
    done: bool,
    fire_on_one_callback: bool,
    fire_on_one_errback: bool,
    consume_errors: bool,
    target: Deferred<ListResult<T>>,
}

impl<T: 'static> DeferredList<T> {
    /// A list over `inputs`, firing when all of them have fired.
    pub fn new(inputs: impl IntoIterator<Item = Deferred<T>>) -> Self {
        DeferredList {
            inputs: inputs.into_iter().collect(),
            fire_on_one_callback: false,
            fire_on_one_errback: false,
            consume_errors: false,
        }
    }

    /// Fire with [`ListResult::First`] as soon as one input succeeds. An
    /// empty list with this set never fires.
    pub fn fire_on_one_callback(mut self, on: bool) -> Self {
        self.fire_on_one_callback = on;
        self
    }

    /// Fail with [`FirstError`] as soon as one input fails.
    pub fn fire_on_one_errback(mut self, on: bool) -> Self {
        self.fire_on_one_errback = on;
        self
    }

    /// Take each input's failure away from it, so the input's later
    /// errbacks never see it and it is not reported as unhandled.
    pub fn consume_errors(mut self, on: bool) -> Self {
        self.consume_errors = on;
        self
    }

    /// Starts watching the inputs; returns the list's Deferred.
    pub fn build(self) -> Deferred<ListResult<T>> {
        let n = self.inputs.len();
        let weak = weak_inputs(&self.inputs);
        let target = Deferred::with_canceller(move |_| cancel_all(&weak));
        if n == 0 {
            if !self.fire_on_one_callback {
                let _ = target.callback(ListResult::All(Vec::new()));
            }
            return target;
        }
        let state = Rc::new(RefCell::new(ListState {
            results: (0..n).map(|_| None).collect(),
            remaining: n,
            done: false,
            fire_on_one_callback: self.fire_on_one_callback,
            fire_on_one_errback: self.fire_on_one_errback,
            consume_errors: self.consume_errors,
            target: target.clone(),
        }));
        for (index, input) in self.inputs.into_iter().enumerate() {
            let state = Rc::clone(&state);
            input.push(Step::Handoff(Box::new(move |result| record(&state, index, result))));
        }
        target
    }

    /// Fires with every input's value in input order, or fails with the
    /// first failure (as [`FirstError`]). `fire_on_one_callback` is ignored.
    pub fn gather(self) -> Deferred<Vec<T>> {
        self.fire_on_one_callback(false).fire_on_one_errback(true).build().then(|result| match result {
            Ok(ListResult::All(results)) => results.into_iter().collect::<Result<Vec<T>, Failure>>(),
            Ok(ListResult::First { .. }) => Err(Failure::msg("DeferredList fired on one callback in gather")),
            Err(failure) => Err(failure),
        })
    }
}

/// Records one input's result in the list; returns what stays in the input
/// and, if the list just fired, its chain to run.
fn record<T: 'static>(
    state: &Rc<RefCell<ListState<T>>>,
    index: usize,
    result: Result<T, Failure>,
) -> Handed<T> {
    let mut st = state.borrow_mut();
    let keep_err = |f: &Failure, consume: bool| if consume { None } else { Some(Err(f.clone())) };
    if st.done {
        // The list has fired: leave the result with the input.
        return match result {
            Ok(value) => Handed { keep: Some(Ok(value)), next: None },
            Err(failure) => Handed { keep: keep_err(&failure, st.consume_errors), next: None },
        };
    }
    let mut keep = None;
    let mut fire = None;
    match result {
        Ok(value) if st.fire_on_one_callback => {
            fire = Some(Ok(ListResult::First { index, value }));
        }
        Ok(value) => st.results[index] = Some(Ok(value)),
        Err(failure) => {
            keep = keep_err(&failure, st.consume_errors);
            if st.fire_on_one_errback {
                fire = Some(Err(Failure::new(FirstError { index, failure })));
            } else {
                st.results[index] = Some(Err(failure));
            }
        }
    }
    st.remaining -= 1;
    if fire.is_none() && st.remaining == 0 {
        let results = std::mem::take(&mut st.results)
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(Failure::new(super::DeferError::ResultConsumed))))
            .collect();
        fire = Some(Ok(ListResult::All(results)));
    }
    let Some(outcome) = fire else { return Handed { keep, next: None } };
    st.done = true;
    // Values of inputs that no longer matter are dropped after the borrow.
    let leftovers = std::mem::take(&mut st.results);
    let target = st.target.clone();
    drop(st);
    drop(leftovers);
    Handed { keep, next: target.settle(Outcome::Done(outcome)).unwrap_or(None) }
}

/// A Deferred list that fires once every input has fired, with each
/// input's result in input order (`DeferredList(ds)` with no options).
pub fn deferred_list<T: 'static>(
    inputs: impl IntoIterator<Item = Deferred<T>>,
) -> Deferred<Vec<Result<T, Failure>>> {
    DeferredList::new(inputs).build().then(|result| match result {
        Ok(ListResult::All(results)) => Ok(results),
        Ok(ListResult::First { .. }) => Err(Failure::msg("DeferredList fired on one callback")),
        Err(failure) => Err(failure),
    })
}

/// Fires with all the inputs' values in input order, or fails with the
/// first failure, wrapped in [`FirstError`] (Twisted's `gatherResults`).
/// Cancelling it cancels every input.
pub fn gather_results<T: 'static>(inputs: impl IntoIterator<Item = Deferred<T>>) -> Deferred<Vec<T>> {
    DeferredList::new(inputs).gather()
}

struct RaceState<T: 'static> {
    failures: Vec<Option<Failure>>,
    remaining: usize,
    done: bool,
    inputs: WeakInputs<T>,
    target: Deferred<(usize, T)>,
}

/// Fires with `(index, value)` of the first input to succeed and cancels
/// all the others; results arriving later go nowhere. If every input fails
/// it fails with a [`FailureGroup`] holding each failure in input order (an
/// empty input fails that way at once). Cancelling it cancels every input.
pub fn race<T: 'static>(inputs: impl IntoIterator<Item = Deferred<T>>) -> Deferred<(usize, T)> {
    let inputs: Vec<Deferred<T>> = inputs.into_iter().collect();
    let n = inputs.len();
    let weak = weak_inputs(&inputs);
    let for_cancel = weak.clone();
    let target = Deferred::with_canceller(move |_| cancel_all(&for_cancel));
    if n == 0 {
        let _ = target.errback(FailureGroup { failures: Vec::new() });
        return target;
    }
    let state = Rc::new(RefCell::new(RaceState {
        failures: (0..n).map(|_| None).collect(),
        remaining: n,
        done: false,
        inputs: weak,
        target: target.clone(),
    }));
    for (index, input) in inputs.into_iter().enumerate() {
        let state = Rc::clone(&state);
        input.push(Step::Handoff(Box::new(move |result| {
            let mut st = state.borrow_mut();
            if st.done {
                return Handed::moved(None);
            }
            let outcome = match result {
                Ok(value) => {
                    st.done = true;
                    let losers: WeakInputs<T> = st
                        .inputs
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| *i != index)
                        .map(|(_, w)| w.clone())
                        .collect();
                    let target = st.target.clone();
                    st.failures.clear();
                    drop(st);
                    cancel_all(&losers);
                    return Handed::moved(target.settle(Outcome::Done(Ok((index, value)))).unwrap_or(None));
                }
                Err(failure) => {
                    st.failures[index] = Some(failure);
                    st.remaining -= 1;
                    if st.remaining > 0 {
                        return Handed::moved(None);
                    }
                    st.done = true;
                    let failures = std::mem::take(&mut st.failures).into_iter().flatten().collect();
                    Err(Failure::new(FailureGroup { failures }))
                }
            };
            let target = st.target.clone();
            drop(st);
            Handed::moved(target.settle(Outcome::Done(outcome)).unwrap_or(None))
        })));
    }
    target
}
