//! A small executor that runs futures on the reactor thread, so sequential
//! logic can be written with `async`/`.await` on the same loop as the
//! callbacks (Twisted's `ensureDeferred` / `Deferred.fromCoroutine`).
//!
//! # How it works
//!
//! Each reactor has one task table (a per-reactor extension slot). A task
//! is a boxed future plus the Deferred that reports its result. The waker
//! handed to the future is `Send + Sync`: waking marks the task in a shared
//! ready list and, if no run is on its way yet, queues one run of the
//! executor with [`Remote::call_from_thread`]. That run, on the reactor
//! thread, polls every task in the ready list. So a future may be woken from
//! any thread (a channel, a worker) and still only ever runs on the reactor
//! thread, never inside the code that woke it.
//!
//! A spawned future is polled once at once, inside `spawn` (as Twisted runs
//! a coroutine up to its first `await` inside `ensureDeferred`); after that
//! it runs when woken, on the next reactor iteration.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Wake, Waker};

use super::deferred::panic_failure;
use super::Deferred;
use crate::error::Failure;
use crate::reactor::{Reactor, Remote};

/// What finishing a task does: fire its Deferred. It runs after the future
/// has been dropped and the task removed from the table.
type Completion = Box<dyn FnOnce()>;

/// A spawned future with its result type erased.
trait TaskFuture {
    /// Polls the future once; when it is done, returns what fires the
    /// task's Deferred. A panic in the future becomes an
    /// [`Error::Panicked`](crate::Error::Panicked) failure.
    fn poll_task(&mut self, cx: &mut Context<'_>) -> Poll<Completion>;
}

/// The user's future and the Deferred it reports to.
struct Spawned<F, T: 'static> {
    future: Pin<Box<F>>,
    deferred: Deferred<T>,
}

impl<F, T> TaskFuture for Spawned<F, T>
where
    F: Future<Output = Result<T, Failure>>,
    T: 'static,
{
    fn poll_task(&mut self, cx: &mut Context<'_>) -> Poll<Completion> {
        let result = match catch_unwind(AssertUnwindSafe(|| self.future.as_mut().poll(cx))) {
            Ok(Poll::Pending) => return Poll::Pending,
            Ok(Poll::Ready(result)) => result,
            Err(payload) => Err(panic_failure(payload)),
        };
        let d = self.deferred.clone();
        Poll::Ready(Box::new(move || {
            // Already fired only if it was cancelled meanwhile (the
            // canceller fires it); then this late result goes nowhere.
            let _ = match result {
                Ok(value) => d.callback(value),
                Err(failure) => d.errback(failure),
            };
        }))
    }
}

/// One entry of the task table. `future` is `None` while the task is being
/// polled (it is taken out so the poll holds no borrow of the table).
struct Task {
    future: Option<Box<dyn TaskFuture>>,
    waker: Arc<TaskWaker>,
}

/// The thread-safe part of the executor: which tasks want a poll, and
/// whether an executor run is already queued on the reactor.
#[derive(Default)]
struct ReadyList {
    ids: Mutex<Vec<u64>>,
    /// A run of the executor is queued (one `call_from_thread` covers any
    /// number of wake-ups before it runs).
    scheduled: AtomicBool,
    remote: OnceLock<Remote>,
}

impl ReadyList {
    fn push(&self, id: u64) {
        self.ids.lock().unwrap_or_else(|e| e.into_inner()).push(id);
        if !self.scheduled.swap(true, Ordering::SeqCst) {
            let Some(remote) = self.remote.get() else { return };
            let queued = remote.call_from_thread(|reactor| {
                let state = reactor.extension::<ExecutorState>();
                state.run_ready();
            });
            // `ReactorGone`: the reactor and its tasks are gone; nothing to
            // run, and nobody is left to run it.
            let _ = queued;
        }
    }

    fn take(&self) -> Vec<u64> {
        // Clear `scheduled` before taking the list, so a wake-up that comes
        // after the take always queues a new run.
        self.scheduled.store(false, Ordering::SeqCst);
        std::mem::take(&mut *self.ids.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// The waker of one task: `Send + Sync`, usable from any thread.
struct TaskWaker {
    id: u64,
    /// Already in the ready list: further wake-ups cost nothing.
    queued: AtomicBool,
    ready: Arc<ReadyList>,
}

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if !self.queued.swap(true, Ordering::SeqCst) {
            self.ready.push(self.id);
        }
    }
}

/// The per-reactor task table (stored with `Reactor::extension`).
#[derive(Default)]
pub(crate) struct ExecutorState {
    tasks: RefCell<HashMap<u64, Task>>,
    next_id: Cell<u64>,
    ready: Arc<ReadyList>,
}

impl ExecutorState {
    /// Polls every task woken since the last run.
    fn run_ready(&self) {
        for id in self.ready.take() {
            self.poll(id);
        }
    }

    /// Polls one task, if it still exists and is not being polled already.
    fn poll(&self, id: u64) {
        let (mut future, waker) = {
            let mut tasks = self.tasks.borrow_mut();
            let Some(task) = tasks.get_mut(&id) else { return };
            let Some(future) = task.future.take() else { return };
            (future, task.waker.clone())
        };
        waker.queued.store(false, Ordering::SeqCst);
        let std_waker = Waker::from(waker);
        let mut cx = Context::from_waker(&std_waker);
        match future.poll_task(&mut cx) {
            Poll::Ready(complete) => {
                let removed = self.tasks.borrow_mut().remove(&id);
                drop(removed);
                drop_logged(future);
                complete();
            }
            Poll::Pending => {
                let mut tasks = self.tasks.borrow_mut();
                match tasks.get_mut(&id) {
                    Some(task) => task.future = Some(future),
                    None => {
                        // Cancelled while it ran: drop it now, outside the
                        // borrow (its destructors may spawn or cancel).
                        drop(tasks);
                        drop_logged(future);
                    }
                }
            }
        }
    }

    /// Removes a task (its Deferred was cancelled) and drops its future.
    fn cancel(&self, id: u64) {
        let removed = self.tasks.borrow_mut().remove(&id);
        if let Some(Task { future: Some(future), .. }) = removed {
            drop_logged(future);
        }
        // `future: None` means it is being polled right now; the poll sees
        // the task gone and drops the future when it returns.
    }

    /// How many tasks have not finished yet.
    fn len(&self) -> usize {
        self.tasks.borrow().len()
    }
}

/// Drops a task's future, logging a panic in its destructors rather than
/// unwinding into the reactor.
fn drop_logged(future: Box<dyn TaskFuture>) {
    if let Err(payload) = catch_unwind(AssertUnwindSafe(move || drop(future))) {
        let failure = panic_failure(payload);
        tracing::error!(target: "braid", "a future panicked while being dropped: {failure}");
    }
}

impl Reactor {
    /// Runs `future` on this reactor's thread and returns a Deferred for
    /// its result: `Ok(v)` fires it with `v`, `Err(failure)` errbacks it,
    /// and a panic errbacks it with [`Error::Panicked`](crate::Error::Panicked).
    ///
    /// The output type is `Result<T, Failure>` so that `?` works on
    /// awaited Deferreds (whose output is `Result<T, Failure>`) and on any
    /// error type that converts into a [`Failure`]; a future that cannot
    /// fail ends in `Ok(value)`.
    ///
    /// The future is polled once at once (it runs up to its first pending
    /// `.await` before `spawn` returns), then each time it is woken, on the
    /// reactor thread. Wakers may be used from any thread. Cancelling the
    /// returned Deferred drops the future (whatever it was awaiting is
    /// dropped, not cancelled) and fails the Deferred with
    /// [`Error::Cancelled`](crate::Error::Cancelled). Dropping the returned
    /// Deferred does not stop the task.
    ///
    /// ```
    /// use std::time::Duration;
    /// use braid::{Backend, Deferred, Reactor};
    ///
    /// let reactor = Reactor::new(Backend::Poll).unwrap();
    /// let r = reactor.clone();
    /// let answer = reactor.spawn(async move {
    ///     let half: Deferred<u32> = braid::task::defer_later(&r, Duration::from_millis(1), || Ok(21));
    ///     let n = half.await?;
    ///     r.stop()?;
    ///     Ok(n * 2)
    /// });
    /// reactor.run_without_signal_handlers().unwrap();
    /// answer.add_callback(|n| {
    ///     assert_eq!(n, 42);
    ///     Ok(n)
    /// });
    /// ```
    pub fn spawn<T, F>(&self, future: F) -> Deferred<T>
    where
        T: 'static,
        F: Future<Output = Result<T, Failure>> + 'static,
    {
        let state = self.extension::<ExecutorState>();
        state.ready.remote.get_or_init(|| self.remote());
        let id = state.next_id.get();
        state.next_id.set(id + 1);

        let weak: Weak<ExecutorState> = Rc::downgrade(&state);
        let deferred = Deferred::with_canceller(move |_| {
            if let Some(state) = weak.upgrade() {
                state.cancel(id);
            }
        });
        let task = Spawned { future: Box::pin(future), deferred: deferred.clone() };
        let waker = Arc::new(TaskWaker { id, queued: AtomicBool::new(false), ready: state.ready.clone() });
        state.tasks.borrow_mut().insert(id, Task { future: Some(Box::new(task)), waker });
        state.poll(id);
        deferred
    }

    /// How many futures spawned on this reactor have not finished yet.
    pub fn pending_tasks(&self) -> usize {
        self.extension::<ExecutorState>().len()
    }
}

/// Runs `future` on `reactor` and returns a Deferred for its result (the
/// free-function form of [`Reactor::spawn`], named after Twisted's
/// `ensureDeferred`).
///
/// A Deferred is itself a future, so passing one works, but it gives a new
/// Deferred and takes the result out of the one passed in.
pub fn ensure_deferred<T, F>(reactor: &Reactor, future: F) -> Deferred<T>
where
    T: 'static,
    F: Future<Output = Result<T, Failure>> + 'static,
{
    reactor.spawn(future)
}
