//! Threads: the `Remote` handle other threads use to reach a reactor, and
//! the reactor's worker pool for blocking calls.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle, ThreadId};

use super::guard::{log_failure, panic_message};
use super::Reactor;
use crate::error::{Error, Failure};
use crate::sys::waker::Waker;

pub(crate) type ThreadCall = Box<dyn FnOnce(&Reactor) + Send>;

/// The part of a reactor that other threads may touch.
pub(crate) struct Shared {
    queue: Mutex<Queue>,
    /// Set when a wake-up is already on its way, so a burst of calls from
    /// threads costs one write to the waker rather than one each.
    pub notified: AtomicBool,
    pub waker: Waker,
    pub thread: ThreadId,
}

/// Calls from threads waiting for the reactor. Once closed (the reactor
/// stopped for good or was dropped) nothing more is queued: the check and
/// the push happen under the same lock, so no call can slip in after the
/// queue was drained and wait forever.
struct Queue {
    calls: Vec<ThreadCall>,
    open: bool,
}

impl Shared {
    pub fn new(waker: Waker) -> Shared {
        Shared {
            queue: Mutex::new(Queue { calls: Vec::new(), open: true }),
            notified: AtomicBool::new(false),
            waker,
            thread: thread::current().id(),
        }
    }

    /// Takes the queued calls into `into` (which must be empty). Clearing
    /// `notified` before taking the queue means a call queued after the take
    /// always writes the waker again, so no wake-up is lost.
    pub fn take_calls(&self, into: &mut Vec<ThreadCall>) {
        // Callers set `notified` after queueing, so while it is clear the
        // queue is empty (or its caller is about to set it and wake us):
        // skip the lock on the common path.
        if !self.notified.swap(false, Ordering::SeqCst) {
            return;
        }
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::swap(&mut queue.calls, into);
    }

    /// Refuses further calls and drops the queued ones unrun (dropping a
    /// call is what tells a thread blocked on it that no answer will come).
    pub fn close_queue(&self) {
        let calls = {
            let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            queue.open = false;
            std::mem::take(&mut queue.calls)
        };
        // Outside the lock: a call's captures may run arbitrary drops.
        drop(calls);
    }

    /// True if calls were queued since the last `take_calls`.
    pub fn has_calls(&self) -> bool {
        self.notified.load(Ordering::SeqCst)
    }
}

/// A handle to a reactor that any thread may hold (`Send + Sync + Clone`):
/// the only way into a reactor from another thread.
#[derive(Clone)]
pub struct Remote {
    pub(crate) shared: Arc<Shared>,
}

impl Remote {
    /// Queues `f` to run on the reactor thread and wakes the reactor at
    /// once. Calls run in the order they were queued, on the iteration
    /// after they arrive. Fails with `ReactorGone` once the reactor has
    /// stopped for good (after `stop()`) or been dropped: such a call could
    /// never run.
    pub fn call_from_thread(&self, f: impl FnOnce(&Reactor) + Send + 'static) -> Result<(), Error> {
        let shared = &self.shared;
        {
            let mut queue = shared.queue.lock().unwrap_or_else(|e| e.into_inner());
            if !queue.open {
                return Err(Error::ReactorGone);
            }
            queue.calls.push(Box::new(f));
        }
        if !shared.notified.swap(true, Ordering::SeqCst) {
            shared.waker.wake();
        }
        Ok(())
    }

    /// True when called on the reactor's thread (the I/O thread).
    pub fn is_in_io_thread(&self) -> bool {
        thread::current().id() == self.shared.thread
    }
}

type Job = Box<dyn FnOnce() + Send>;

struct PoolState {
    jobs: VecDeque<Job>,
    idle: usize,
    threads: usize,
    stopping: bool,
}

struct PoolShared {
    state: Mutex<PoolState>,
    work: Condvar,
}

/// The reactor's worker threads for blocking calls: created lazily, grown
/// on demand up to `max` (min 0, so an idle pool holds no threads until its
/// first job), started when the reactor runs, stopped and joined at
/// shutdown. Jobs queued before it starts wait for the start.
pub(crate) struct ThreadPool {
    shared: Arc<PoolShared>,
    workers: Vec<JoinHandle<()>>,
    max: usize,
    started: bool,
}

/// Twisted's reactor pool maximum.
pub(crate) const DEFAULT_POOL_MAX: usize = 10;

impl ThreadPool {
    pub fn new(max: usize) -> ThreadPool {
        ThreadPool {
            shared: Arc::new(PoolShared {
                state: Mutex::new(PoolState { jobs: VecDeque::new(), idle: 0, threads: 0, stopping: false }),
                work: Condvar::new(),
            }),
            workers: Vec::new(),
            max: max.max(1),
            started: false,
        }
    }

    pub fn set_max(&mut self, max: usize) {
        self.max = max.max(1);
    }

    pub fn started(&self) -> bool {
        self.started
    }

    pub fn submit(&mut self, job: Job) {
        let spawn = {
            let mut state = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
            state.jobs.push_back(job);
            self.started && state.idle < state.jobs.len() && state.threads < self.max
        };
        if spawn {
            self.spawn_worker();
        }
        self.shared.work.notify_one();
    }

    pub fn start(&mut self) {
        self.started = true;
        let queued = self.shared.state.lock().unwrap_or_else(|e| e.into_inner()).jobs.len();
        for _ in 0..queued.min(self.max) {
            self.spawn_worker();
        }
    }

    fn spawn_worker(&mut self) {
        let shared = self.shared.clone();
        shared.state.lock().unwrap_or_else(|e| e.into_inner()).threads += 1;
        let spawned = thread::Builder::new().name("braid-pool".into()).spawn(move || worker(&shared));
        match spawned {
            Ok(handle) => self.workers.push(handle),
            Err(e) => {
                self.shared.state.lock().unwrap_or_else(|e| e.into_inner()).threads -= 1;
                tracing::error!(target: "braid", "could not start a pool thread: {e}");
            }
        }
    }

    /// Lets the workers finish the queued jobs, then joins them.
    pub fn stop(&mut self) {
        {
            let mut state = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
            state.stopping = true;
            if self.workers.is_empty() && !state.jobs.is_empty() {
                drop(state);
                // Never started: run nothing on this thread, but do not lose
                // the jobs silently either.
                tracing::warn!(target: "braid", "thread pool stopped with jobs that never ran");
            }
        }
        self.shared.work.notify_all();
        for handle in self.workers.drain(..) {
            let _ = handle.join();
        }
        self.started = false;
    }
}

fn worker(shared: &PoolShared) {
    let mut state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        if let Some(job) = state.jobs.pop_front() {
            drop(state);
            if let Err(payload) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)) {
                log_failure("in a pool thread", &Failure::new(Error::Panicked(panic_message(&*payload))));
            }
            state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
            continue;
        }
        if state.stopping {
            state.threads -= 1;
            return;
        }
        state.idle += 1;
        state = shared.work.wait(state).unwrap_or_else(|e| e.into_inner());
        state.idle -= 1;
    }
}
