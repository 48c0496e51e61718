//! The reactor: one event loop per thread that waits on descriptors and
//! timers and calls your code.
//!
//! A [`Reactor`] is a cheap, clonable, `!Send` handle. [`reactor()`] gives
//! this thread's reactor, installing the default backend on first use;
//! [`install()`] picks the backend explicitly and must come first. Tests and
//! embedders may build independent reactors with [`Reactor::new`].
//!
//! One iteration: (1) run calls queued from other threads, (2) run due
//! timers, (3) fire the shutdown event if `stop()` was called, (4) flush
//! the transports that buffered writes during the pass, (5) poll the
//! backend until the next timer (or not at all if work is pending), (6)
//! dispatch readiness to descriptors, reads before writes.

use std::any::{Any, TypeId};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::os::fd::RawFd;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::time::Duration;

use slab::Slab;

use crate::backend::{AnyPoller, Backend, Event, Interest, Poller};
use crate::error::{Error, Failure};
use crate::sys::signal::SignalGuard;
use crate::sys::waker::Waker;

mod clock;
mod closure_pool;
mod events;
mod fdset;
mod guard;
mod ring_reads;
mod ring_sends;
mod signals;
mod threads;
mod time;
#[allow(dead_code)]
pub(crate) mod timer_queue;
mod write_chunks;

pub use events::{Hold, Phase, TriggerId, TriggerOutcome, TriggerResult};
pub use fdset::{FileDescriptor, IntoDescriptor};
pub use guard::CallbackResult;
pub(crate) use guard::{catch as catch_panic, log_failure, run_logged};
pub(crate) use ring_reads::{RingRead, RingReader, RingRecv};
pub(crate) use ring_sends::RingWriter;
pub use threads::Remote;
pub use time::{DelayedCall, ReactorTime};
pub(crate) use time::{TimeSource, Timers};

use events::{TriggerFn, Triggers};
use fdset::{identity, FdTable, Slot};
use threads::{Shared, ThreadCall, ThreadPool, DEFAULT_POOL_MAX};

/// The reactor's life cycle (Twisted keeps this in five booleans).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Built, never run (or crashed): `run()` may be called.
    NotStarted,
    /// `run()` fired the startup event; waiting for its *before* triggers.
    Starting,
    /// Running: the *during startup* phase has happened.
    Running,
    /// `stop()` was called; the shutdown event is firing.
    Stopping,
    /// Stopped: `run()` now fails with `ReactorNotRestartable`.
    Stopped,
}

/// The reactor's life cycle with the detail [`State`] leaves out: where a
/// shutdown has got to. One value, so that "running" and "stopped" cannot
/// both be written down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Life {
    NotStarted,
    Starting,
    Running,
    Stopping(Shutdown),
    Stopped,
}

/// How far a stop has got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shutdown {
    /// `stop()` was called: the shutdown event fires at the end of the next
    /// timer pass, never inside `stop()` itself.
    Pending,
    /// The shutdown event is firing (its *before* phase may be held); the
    /// reactor still counts as running.
    Firing,
    /// *During shutdown* has run: no longer running.
    Done,
}

impl Life {
    fn public(self) -> State {
        match self {
            Life::NotStarted => State::NotStarted,
            Life::Starting => State::Starting,
            Life::Running => State::Running,
            Life::Stopping(_) => State::Stopping,
            Life::Stopped => State::Stopped,
        }
    }

    /// Twisted's `running`: from *during startup* until *during shutdown*.
    fn running(self) -> bool {
        matches!(self, Life::Running | Life::Stopping(Shutdown::Pending | Shutdown::Firing))
    }
}

pub(crate) struct Inner {
    backend: Backend,
    poller: RefCell<AnyPoller>,
    fd_limit: Option<usize>,
    events_buf: Cell<Vec<Event>>,
    fds: RefCell<FdTable>,
    /// Descriptors the reactor owns whether or not they are watched now (a
    /// listener backing off): told they are lost at shutdown or drop.
    held: RefCell<Slab<Rc<dyn FileDescriptor>>>,
    /// Stream readers reading by completion (io_uring), by receive key.
    recv_owners: RefCell<ring_reads::Owners>,
    received_buf: Cell<Vec<crate::backend::uring::recv::Received>>,
    /// Stream writers with a send in the kernel (io_uring), by send key.
    send_owners: RefCell<ring_sends::SendOwners>,
    sent_buf: Cell<Vec<crate::backend::uring::send::Sent>>,
    timers: Rc<Timers>,
    life: Cell<Life>,
    /// A `run()` call is looping; cleared by `crash()` and by shutdown.
    /// Independent of `in_pass`: `iterate()` runs passes without `run()`.
    looping: Cell<bool>,
    /// Inside an iteration: guards against re-entrant `run`/`iterate`.
    in_pass: Cell<bool>,
    triggers: RefCell<Triggers>,
    shared: Arc<Shared>,
    /// Per-reactor state of higher layers (the future executor, ...), one
    /// value per type, so those layers need no field here. Declared after `shared` and
    /// before `signals` on purpose: a test drops a probe in the window
    /// between the waker closing and the signal guard going.
    extensions: RefCell<HashMap<TypeId, Rc<dyn Any>>>,
    spare_calls: Cell<Vec<ThreadCall>>,
    pool: RefCell<Option<ThreadPool>>,
    pool_max: Cell<usize>,
    install_signals: Cell<bool>,
    signals: RefCell<Option<SignalGuard>>,
    exit_signal: Cell<Option<i32>>,
    child_hooks: RefCell<Vec<Box<dyn FnMut()>>>,
    iterations: Cell<u64>,
    /// Transports with work for the end of this pass (buffered writes, a
    /// pending close): served once per iteration, just before polling.
    flushes: RefCell<Vec<Rc<dyn Flush>>>,
    /// The other half of the flush list's double buffer (no allocation per pass).
    spare_flushes: Cell<Vec<Rc<dyn Flush>>>,
    /// True while the first round of end-of-pass flushes serves exactly one
    /// transport (see [`Reactor::lone_flush`]).
    lone_flush: Cell<bool>,
    /// One read buffer shared by every connection of this reactor, so an
    /// idle connection holds no buffer of its own.
    read_buf: Cell<Vec<u8>>,
    /// Where a connection's writes made inside its own `data_received`
    /// gather until it returns; usually sent at once, so most connections
    /// never need a write buffer of their own.
    write_stage: RefCell<Vec<u8>>,
    /// Emptied write buffers, lent to the next connection that writes by
    /// completion (see `write_chunks`).
    write_chunks: RefCell<write_chunks::WriteChunks>,
}

/// Work a transport batches until the end of the pass (internal).
pub(crate) trait Flush {
    fn flush(&self);
}

/// Bytes read per readiness event at most: bounds what one busy connection
/// takes from the others in a pass (Twisted's 64 KiB).
pub(crate) const READ_CHUNK: usize = 64 * 1024;

/// A handle to one event loop. Cheap to clone; all clones drive the same
/// loop. Not `Send`: use [`Reactor::remote`] to reach it from other threads.
#[derive(Clone)]
pub struct Reactor {
    inner: Rc<Inner>,
}

thread_local! {
    static INSTALLED: RefCell<Option<Reactor>> = const { RefCell::new(None) };
}

/// Installs a reactor with `backend` as this thread's reactor. Fails with
/// `ReactorAlreadyInstalled` if this thread already has one (including one
/// installed implicitly by [`reactor()`]): install before first use.
pub fn install(backend: Backend) -> Result<Reactor, Error> {
    INSTALLED.with(|slot| {
        let mut slot = slot.borrow_mut();
        if slot.is_some() {
            return Err(Error::ReactorAlreadyInstalled);
        }
        let reactor = Reactor::new(backend)?;
        *slot = Some(reactor.clone());
        Ok(reactor)
    })
}

/// This thread's reactor, installing the default on first use: the backend
/// named by `BRAID_REACTOR`, else the platform default (epoll on Linux).
pub fn try_reactor() -> Result<Reactor, Error> {
    if let Some(r) = INSTALLED.with(|slot| slot.borrow().clone()) {
        return Ok(r);
    }
    install(Backend::from_env()?)
}

/// Like [`try_reactor`], for programs that cannot go on without a reactor.
///
/// # Panics
/// If no reactor can be built: `BRAID_REACTOR` names an unknown backend (the
/// message lists the valid names) or the OS refuses a descriptor. Use
/// [`try_reactor`] to handle that as an error.
pub fn reactor() -> Reactor {
    match try_reactor() {
        Ok(r) => r,
        Err(e) => panic!("braid: cannot install the default reactor: {e}"),
    }
}

impl Reactor {
    /// Builds an independent reactor using `backend`. It is not installed
    /// as this thread's reactor.
    pub fn new(backend: Backend) -> Result<Reactor, Error> {
        if !backend.is_available() {
            return Err(Error::BackendUnavailable {
                backend: backend.name(),
                why: "it is not built for this platform".into(),
            });
        }
        let mut poller = AnyPoller::new(backend)?;
        let waker = Waker::new().map_err(|e| Error::io("creating the reactor's waker", e))?;
        poller
            .update(waker.read_fd(), Interest::NONE, Interest { read: true, write: false })
            .map_err(|e| Error::io("registering the reactor's waker", e))?;
        let fd_limit = poller.fd_limit();
        Ok(Reactor {
            inner: Rc::new(Inner {
                backend,
                poller: RefCell::new(poller),
                fd_limit,
                events_buf: Cell::new(Vec::with_capacity(256)),
                fds: RefCell::new(FdTable::default()),
                held: RefCell::new(Slab::new()),
                recv_owners: RefCell::new(Slab::new()),
                received_buf: Cell::new(Vec::new()),
                send_owners: RefCell::new(Slab::new()),
                sent_buf: Cell::new(Vec::new()),
                timers: Timers::new(TimeSource::monotonic()),
                life: Cell::new(Life::NotStarted),
                looping: Cell::new(false),
                in_pass: Cell::new(false),
                triggers: RefCell::new(Triggers::default()),
                shared: Arc::new(Shared::new(waker)),
                spare_calls: Cell::new(Vec::new()),
                pool: RefCell::new(None),
                pool_max: Cell::new(DEFAULT_POOL_MAX),
                install_signals: Cell::new(true),
                signals: RefCell::new(None),
                exit_signal: Cell::new(None),
                child_hooks: RefCell::new(Vec::new()),
                iterations: Cell::new(0),
                flushes: RefCell::new(Vec::new()),
                spare_flushes: Cell::new(Vec::new()),
                lone_flush: Cell::new(false),
                read_buf: Cell::new(Vec::new()),
                write_stage: RefCell::new(Vec::new()),
                write_chunks: RefCell::new(write_chunks::WriteChunks::default()),
                extensions: RefCell::new(HashMap::new()),
            }),
        })
    }

    /// A handle that does not keep the reactor alive.
    pub(crate) fn weak(&self) -> WeakReactor {
        WeakReactor(self.downgrade())
    }

    fn downgrade(&self) -> Weak<Inner> {
        Rc::downgrade(&self.inner)
    }

    fn from_weak(weak: &Weak<Inner>) -> Option<Reactor> {
        weak.upgrade().map(|inner| Reactor { inner })
    }

    /// The polling backend this reactor uses.
    pub fn backend(&self) -> Backend {
        self.inner.backend
    }

    /// Where the reactor is in its life cycle.
    pub fn state(&self) -> State {
        self.inner.life.get().public()
    }

    /// True from the *during startup* phase until *during shutdown*.
    pub fn running(&self) -> bool {
        self.inner.life.get().running()
    }

    /// How many loop iterations have run (a diagnostic: an idle reactor's
    /// count stays still).
    pub fn iterations(&self) -> u64 {
        self.inner.iterations.get()
    }

    /// The signal (e.g. `SIGTERM`) that stopped the reactor, if one did, so
    /// a command can report it or exit with it.
    pub fn exit_signal(&self) -> Option<i32> {
        self.inner.exit_signal.get()
    }

    // ----- core -------------------------------------------------------

    /// Runs the loop until `stop()` or `crash()`: fires the startup event
    /// (installing SIGINT/SIGTERM/SIGCHLD handlers in its *during* phase),
    /// loops, fires the shutdown event, returns. Handlers are uninstalled
    /// when `run` returns.
    pub fn run(&self) -> Result<(), Error> {
        self.inner.install_signals.set(true);
        self.run_inner()
    }

    /// Like [`Reactor::run`], but leaves the process's signal handlers
    /// alone (for embedding in a program that handles signals itself).
    pub fn run_without_signal_handlers(&self) -> Result<(), Error> {
        self.inner.install_signals.set(false);
        self.run_inner()
    }

    fn run_inner(&self) -> Result<(), Error> {
        let inner = &self.inner;
        if matches!(inner.life.get(), Life::Stopping(_) | Life::Stopped) {
            return Err(Error::ReactorNotRestartable);
        }
        if inner.looping.get() || inner.in_pass.get() {
            return Err(Error::ReactorAlreadyRunning);
        }
        inner.looping.set(true);
        inner.life.set(Life::Starting);
        self.fire_system_event("startup");
        let result = self.main_loop();
        self.uninstall_signal_handlers();
        result
    }

    fn main_loop(&self) -> Result<(), Error> {
        let inner = &self.inner;
        while inner.looping.get() {
            if let Err(e) = self.iterate_once(None) {
                tracing::error!(target: "braid", "{e}; the reactor cannot go on");
                inner.looping.set(false);
                if inner.life.get().running() {
                    inner.life.set(Life::Stopping(Shutdown::Done));
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Asks the reactor to shut down: the shutdown event fires on the next
    /// iteration (never inside this call), then `run()` returns. Fails with
    /// `ReactorNotRunning` if the reactor is not running or already stopping.
    pub fn stop(&self) -> Result<(), Error> {
        let inner = &self.inner;
        match inner.life.get() {
            Life::Starting | Life::Running => {
                inner.life.set(Life::Stopping(Shutdown::Pending));
                Ok(())
            }
            _ => Err(Error::ReactorNotRunning),
        }
    }

    /// Leaves the loop at once, firing no shutdown triggers. Unlike after
    /// `stop()`, `run()` may be called again.
    pub fn crash(&self) {
        let inner = &self.inner;
        inner.looping.set(false);
        match inner.life.get() {
            Life::Starting | Life::Running => inner.life.set(Life::NotStarted),
            // A stop under way stays a stop (no restart), but not running.
            Life::Stopping(_) => inner.life.set(Life::Stopping(Shutdown::Done)),
            Life::NotStarted | Life::Stopped => {}
        }
    }

    /// Runs one iteration: due calls, then one poll of at most `timeout`
    /// (less if a timer is due sooner; `None` waits for the next event).
    /// Must not be called from inside a reactor callback.
    pub fn iterate(&self, timeout: Option<Duration>) -> Result<(), Error> {
        if self.inner.in_pass.get() {
            return Err(Error::ReactorAlreadyRunning);
        }
        self.iterate_once(timeout)
    }

    /// Registers `f` to run once the reactor is running: now if it already
    /// is (returning `None`), otherwise in the *after startup* phase
    /// (returning the trigger's id).
    pub fn call_when_running<F, R>(&self, f: F) -> Option<TriggerId>
    where
        F: FnOnce() -> R + 'static,
        R: TriggerResult + 'static,
    {
        if self.running() {
            let outcome = guard::catch(|| match f().into_outcome() {
                TriggerOutcome::Done(r) => r,
                TriggerOutcome::Hold(_) => Ok(()),
            });
            if let Err(failure) = outcome {
                guard::log_failure("in a call_when_running callable", &failure);
            }
            None
        } else {
            Some(self.add_system_event_trigger(Phase::After, "startup", f))
        }
    }

    /// Registers `f` for `phase` of `event` ("startup", "shutdown", or any
    /// name you fire yourself). A *before* trigger may return a Deferred to
    /// hold the later phases until it fires.
    pub fn add_system_event_trigger<F, R>(&self, phase: Phase, event: &str, f: F) -> TriggerId
    where
        F: FnOnce() -> R + 'static,
        R: TriggerResult + 'static,
    {
        let f: TriggerFn = Box::new(move || f().into_outcome());
        self.inner.triggers.borrow_mut().add(phase, event, f)
    }

    /// Unregisters a trigger. `NoSuchTrigger` if it is unknown or already ran.
    pub fn remove_system_event_trigger(&self, id: &TriggerId) -> Result<(), Error> {
        self.inner.triggers.borrow_mut().remove(id)
    }

    /// Runs the *before*, *during* and *after* triggers of `event`. An event
    /// already firing is not fired again.
    pub fn fire_system_event(&self, event: &str) {
        if !self.inner.triggers.borrow_mut().begin(event) {
            return;
        }
        loop {
            let next = self.inner.triggers.borrow_mut().pop(event, Phase::Before);
            let Some(trigger) = next else { break };
            match guard::catch(|| Ok(trigger())) {
                Ok(TriggerOutcome::Done(Ok(()))) => {}
                Ok(TriggerOutcome::Done(Err(failure))) | Err(failure) => {
                    guard::log_failure(&format!("in a before-{event} trigger"), &failure)
                }
                Ok(TriggerOutcome::Hold(hold)) => {
                    self.inner.triggers.borrow_mut().hold(event);
                    let weak = self.downgrade();
                    let name = event.to_string();
                    hold.on_done(Box::new(move || {
                        if let Some(reactor) = Reactor::from_weak(&weak) {
                            if reactor.inner.triggers.borrow_mut().release(&name) {
                                reactor.continue_firing(&name);
                            }
                        }
                    }));
                }
            }
        }
        // Go on now unless a hold is still out; then its release goes on.
        let go_on = self.inner.triggers.borrow_mut().before_done(event);
        if go_on {
            self.continue_firing(event);
        }
    }

    fn continue_firing(&self, event: &str) {
        match event {
            "startup" => self.really_start(),
            "shutdown" => self.begin_shutdown(),
            _ => {}
        }
        for phase in [Phase::During, Phase::After] {
            if phase == Phase::After && event == "startup" {
                self.start_thread_pool();
            }
            loop {
                let next = self.inner.triggers.borrow_mut().pop(event, phase);
                let Some(trigger) = next else { break };
                let outcome = guard::catch(|| match trigger() {
                    TriggerOutcome::Done(r) => r,
                    TriggerOutcome::Hold(_) => Ok(()),
                });
                if let Err(failure) = outcome {
                    guard::log_failure(&format!("in a {phase}-{event} trigger"), &failure);
                }
            }
        }
        self.inner.triggers.borrow_mut().finish(event);
        if event == "shutdown" {
            self.inner.life.set(Life::Stopped);
            // Stopped for good: calls queued from threads can never run now,
            // so they are dropped, which fails anyone blocked on one.
            self.inner.shared.close_queue();
        }
    }

    /// The built-in *during startup* step.
    fn really_start(&self) {
        let inner = &self.inner;
        if inner.life.get() == Life::Starting {
            inner.life.set(Life::Running);
        }
        if inner.install_signals.get() && inner.looping.get() {
            self.install_signal_handlers();
        }
    }

    /// The built-in *during shutdown* steps: leave the loop, send what
    /// transports buffered this pass (a `lose_connection` just before
    /// `stop()` then closes cleanly, as Twisted's pending write does),
    /// disconnect every descriptor, stop the thread pool.
    fn begin_shutdown(&self) {
        let inner = &self.inner;
        inner.looping.set(false);
        inner.life.set(Life::Stopping(Shutdown::Done));
        self.run_flushes();
        self.disconnect_all();
        self.stop_thread_pool();
    }

    /// Tells every registered descriptor it is lost. One descriptor failing
    /// does not stop the others.
    fn disconnect_all(&self) {
        let mut all = self.remove_all();
        let held: Vec<_> = self.inner.held.borrow().iter().map(|(_, d)| d.clone()).collect();
        all.extend(fdset::unique_besides(&all, held));
        tell_lost(all, "during shutdown", || Failure::new(Error::ConnectionLost));
    }

    // ----- one iteration ---------------------------------------------

    fn iterate_once(&self, max_timeout: Option<Duration>) -> Result<(), Error> {
        let inner = &self.inner;
        inner.in_pass.set(true);
        let result = self.iterate_guarded(max_timeout);
        inner.in_pass.set(false);
        result
    }

    fn iterate_guarded(&self, max_timeout: Option<Duration>) -> Result<(), Error> {
        let inner = &self.inner;
        inner.iterations.set(inner.iterations.get() + 1);
        let in_run = inner.looping.get();
        self.run_until_current();
        let left_run = in_run && !inner.looping.get();
        let stopped = matches!(inner.life.get(), Life::Stopping(_) | Life::Stopped);
        if left_run || (!in_run && max_timeout.is_none() && stopped) {
            // Stopped or crashed during this pass (or nothing will ever
            // wake a stopped reactor): do not block in poll.
            return Ok(());
        }
        self.run_flushes();
        let timeout = self.poll_timeout(max_timeout);
        let mut events = inner.events_buf.take();
        events.clear();
        let polled = inner.poller.borrow_mut().poll(&mut events, timeout);
        if let Err(e) = polled {
            inner.events_buf.set(events);
            return Err(Error::io(format!("waiting on the {} backend", inner.backend), e));
        }
        for ev in &events {
            self.dispatch(ev);
        }
        inner.events_buf.set(events);
        if inner.backend == Backend::IoUring {
            self.dispatch_sent();
            self.dispatch_received();
        }
        Ok(())
    }

    /// Steps 1–3 of an iteration: calls from threads, due timers, pending
    /// shutdown.
    fn run_until_current(&self) {
        let inner = &self.inner;
        let mut calls = inner.spare_calls.take();
        inner.shared.take_calls(&mut calls);
        for call in calls.drain(..) {
            guard::run_logged(
                || "in a call from a thread".to_string(),
                || {
                    call(self);
                    Ok(())
                },
            );
        }
        inner.spare_calls.set(calls);
        inner.timers.run_due();
        if inner.life.get() == Life::Stopping(Shutdown::Pending) {
            inner.life.set(Life::Stopping(Shutdown::Firing));
            self.fire_system_event("shutdown");
        }
    }

    fn poll_timeout(&self, max_timeout: Option<Duration>) -> Option<Duration> {
        let inner = &self.inner;
        if inner.life.get() == Life::Stopping(Shutdown::Pending)
            || inner.shared.has_calls()
            || !inner.flushes.borrow().is_empty()
        {
            return Some(Duration::ZERO);
        }
        match (inner.timers.timeout(), max_timeout) {
            (Some(t), Some(m)) => Some(t.min(m)),
            (t, m) => t.or(m),
        }
    }

    /// Serves the transports that asked for an end-of-pass flush. A flush
    /// may queue more (a resumed producer writes again): a few rounds, then
    /// the rest waits for the next iteration, which then polls without
    /// blocking.
    fn run_flushes(&self) {
        let mut batch = self.inner.spare_flushes.take();
        for round in 0..4 {
            std::mem::swap(&mut batch, &mut *self.inner.flushes.borrow_mut());
            if batch.is_empty() {
                break;
            }
            self.inner.lone_flush.set(round == 0 && batch.len() == 1);
            for f in batch.drain(..) {
                guard::run_logged(
                    || "while flushing a transport".to_string(),
                    || {
                        f.flush();
                        Ok(())
                    },
                );
            }
        }
        self.inner.lone_flush.set(false);
        self.inner.spare_flushes.set(batch);
    }

    /// Whether the flush being served is this pass's only one. A ring
    /// backend gathers a pass's sends into one system call; with a single
    /// sender there is nothing to gather, and a direct send saves the ring
    /// a request and the loop a pass for its completion.
    pub(crate) fn lone_flush(&self) -> bool {
        self.inner.lone_flush.get()
    }

    /// This reactor's instance of a higher layer's state `T`, created with
    /// `T::default()` on first use.
    pub(crate) fn extension<T: Default + 'static>(&self) -> Rc<T> {
        let mut map = self.inner.extensions.borrow_mut();
        let entry = map.entry(TypeId::of::<T>()).or_insert_with(|| Rc::new(T::default()));
        match entry.clone().downcast::<T>() {
            Ok(v) => v,
            // The map is keyed by the type id, so the downcast matches.
            Err(_) => unreachable!("extension map keyed by TypeId"),
        }
    }

    /// Keeps `d` alive in the reactor until [`Reactor::release`], watched or
    /// not; it is told `connection_lost` at shutdown if still held.
    pub(crate) fn hold(&self, d: Rc<dyn FileDescriptor>) -> usize {
        self.inner.held.borrow_mut().insert(d)
    }

    /// Lets go of a descriptor kept by [`Reactor::hold`].
    pub(crate) fn release(&self, key: usize) {
        let released = self.inner.held.borrow_mut().try_remove(key);
        drop(released);
    }

    /// Asks for `f.flush()` at the end of this pass.
    pub(crate) fn schedule_flush(&self, f: Rc<dyn Flush>) {
        self.inner.flushes.borrow_mut().push(f);
    }

    /// Lends the shared read buffer (at least `READ_CHUNK` long).
    pub(crate) fn take_read_buffer(&self) -> Vec<u8> {
        let mut buf = self.inner.read_buf.take();
        if buf.len() < READ_CHUNK {
            buf.resize(READ_CHUNK, 0);
        }
        buf
    }

    /// The shared write staging buffer (see `write_stage`).
    pub(crate) fn write_stage(&self) -> std::cell::RefMut<'_, Vec<u8>> {
        self.inner.write_stage.borrow_mut()
    }

    /// An empty write buffer, with room from an earlier connection's use
    /// when the reactor kept one.
    pub(crate) fn take_write_chunk(&self) -> Vec<u8> {
        self.inner.write_chunks.borrow_mut().take()
    }

    /// Hands back an emptied write buffer for another connection to use.
    pub(crate) fn give_write_chunk(&self, chunk: Vec<u8>) {
        self.inner.write_chunks.borrow_mut().give(chunk);
    }

    /// Returns the buffer lent by `take_read_buffer`.
    pub(crate) fn return_read_buffer(&self, buf: Vec<u8>) {
        self.inner.read_buf.set(buf);
    }

    fn dispatch(&self, ev: &Event) {
        let inner = &self.inner;
        if ev.fd == inner.shared.waker.read_fd() {
            inner.shared.waker.drain();
            self.handle_signals();
            return;
        }
        let slot = match inner.fds.borrow().get(ev.fd) {
            Some(slot) => slot.clone(),
            None => return,
        };
        if ev.invalid {
            self.drop_gone(ev.fd, &slot);
            return;
        }
        let Slot { reader, writer } = slot;
        // A datagram socket reports an ICMP error as an error event with
        // nothing to read; its reader consumes the error itself.
        let error_only = (ev.hangup || ev.error) && !ev.readable;
        let read_error = error_only && reader.as_ref().is_some_and(|r| r.reads_errors());
        if error_only && !read_error {
            // Hang-up without input: whatever was pending has been read, so
            // a reader sees a clean end, a pure writer a lost connection.
            if let Some(r) = reader {
                self.disconnect(ev.fd, &r, Failure::new(Error::ConnectionDone), true);
            } else if let Some(w) = writer {
                self.disconnect(ev.fd, &w, Failure::new(Error::ConnectionLost), false);
            }
            return;
        }
        if ev.readable || read_error {
            if let Some(r) = reader {
                if let Err(why) = self.call_descriptor(&r, ev.fd, true) {
                    self.disconnect(ev.fd, &r, why, true);
                    return;
                }
            }
        }
        if ev.writable || ev.hangup || ev.error {
            // The read handler may have removed or replaced the writer.
            let writer = inner.fds.borrow().get(ev.fd).and_then(|s| s.writer.clone());
            if let Some(w) = writer {
                if let Err(why) = self.call_descriptor(&w, ev.fd, false) {
                    self.disconnect(ev.fd, &w, why, false);
                }
            }
        }
    }

    fn call_descriptor(&self, d: &Rc<dyn FileDescriptor>, fd: RawFd, read: bool) -> Result<(), Failure> {
        let result = guard::catch(|| {
            if d.fileno() != fd {
                return Err(Failure::new(Error::FdWentAway));
            }
            if read {
                d.do_read()
            } else {
                d.do_write()
            }
        });
        if let Err(failure) = &result {
            if matches!(failure.braid_error(), Some(Error::Panicked(_))) {
                let prefix = d.log_prefix();
                let what = if read { "do_read" } else { "do_write" };
                guard::log_failure(&format!("in {what} of {prefix}"), failure);
            }
        }
        result
    }

    /// Stops watching a descriptor because of `why` and tells it: a clean
    /// end of a half-closeable reader only closes its read side.
    /// Ends a reader's reading with `why` outside a dispatch (a stream that
    /// reads by completion delivering held bytes), exactly as an `Err` from
    /// its `do_read` would.
    pub(crate) fn disconnect_reader(&self, fd: RawFd, d: Rc<dyn FileDescriptor>, why: Failure) {
        self.disconnect(fd, &d, why, true);
    }

    fn disconnect(&self, fd: RawFd, d: &Rc<dyn FileDescriptor>, why: Failure, read: bool) {
        let ptr = identity(d);
        if read && why.is_connection_done() && d.half_closeable() {
            self.remove_at(fd, ptr, true, false);
            guard::run_logged(
                || format!("in read_connection_lost of {}", d.log_prefix()),
                || {
                    d.read_connection_lost(why);
                    Ok(())
                },
            );
            return;
        }
        self.remove_at(fd, ptr, true, true);
        guard::run_logged(
            || format!("in connection_lost of {}", d.log_prefix()),
            || {
                d.connection_lost(why);
                Ok(())
            },
        );
    }

    /// The fd behind a slot is not open any more (POLLNVAL or EBADF).
    fn drop_gone(&self, fd: RawFd, slot: &Slot) {
        let mut told: Vec<*const ()> = Vec::new();
        for d in [&slot.reader, &slot.writer].into_iter().flatten() {
            if told.contains(&identity(d)) {
                continue;
            }
            told.push(identity(d));
            self.disconnect(fd, d, Failure::new(Error::FdWentAway), false);
        }
    }

    // ----- FD set -----------------------------------------------------

    fn check_fd(&self, fd: RawFd) -> Result<(), Error> {
        if fd < 0 {
            return Err(Error::BadDescriptor(fd));
        }
        if let Some(limit) = self.inner.fd_limit {
            if fd as usize >= limit {
                return Err(Error::DescriptorTooLarge { fd, limit });
            }
        }
        Ok(())
    }

    fn watch(&self, d: Rc<dyn FileDescriptor>, read: bool) -> Result<(), Error> {
        let fd = d.fileno();
        self.check_fd(fd)?;
        let mut fds = self.inner.fds.borrow_mut();
        let old = fds.interest(fd);
        let new = if read { Interest { read: true, ..old } } else { Interest { write: true, ..old } };
        if new != old {
            let direction = if read { "reading" } else { "writing" };
            self.inner
                .poller
                .borrow_mut()
                .update(fd, old, new)
                .map_err(|e| Error::io(format!("watching fd {fd} for {direction}"), e))?;
        }
        fds.insert(fd, d, read);
        Ok(())
    }

    /// Removes `ptr` as reader and/or writer of `fd`. Errors from the
    /// backend are ignored: the fd may already be closed.
    fn remove_at(&self, fd: RawFd, ptr: *const (), read: bool, write: bool) {
        let (old, new) = self.inner.fds.borrow_mut().remove(fd, ptr, read, write);
        if new != old {
            let _ = self.inner.poller.borrow_mut().update(fd, old, new);
        }
    }

    fn unwatch<D: FileDescriptor + ?Sized>(&self, d: &Rc<D>, read: bool) {
        let ptr = identity(d);
        let fd = d.fileno();
        let at = {
            let fds = self.inner.fds.borrow();
            if fds.holds(fd, ptr, read) {
                Some(fd)
            } else {
                // A descriptor whose fd changed or went away: searched for.
                fds.find(ptr, read)
            }
        };
        if let Some(fd) = at {
            self.remove_at(fd, ptr, read, !read);
        }
    }

    /// Stops watching `d`, registered under `fd`, for reading and writing:
    /// O(1) whatever `d.fileno()` says now. For the reactor's own
    /// transports, which remember their fd and are removed after they
    /// marked themselves closed.
    pub(crate) fn forget_at<D: FileDescriptor + ?Sized>(&self, fd: RawFd, d: &Rc<D>) {
        self.remove_at(fd, identity(d), true, true);
    }

    /// Watches `d` for readability: `d.do_read()` runs when its fd may be read.
    /// Fails for a negative fd, or one the backend cannot watch (select and
    /// fds at or above `FD_SETSIZE`).
    pub fn add_reader(&self, d: impl IntoDescriptor) -> Result<(), Error> {
        self.watch(d.into_descriptor(), true)
    }

    /// Watches `d` for writability: `d.do_write()` runs when its fd may be written.
    pub fn add_writer(&self, d: impl IntoDescriptor) -> Result<(), Error> {
        self.watch(d.into_descriptor(), false)
    }

    /// Stops watching `d` for readability (no-op if it was not watched).
    pub fn remove_reader<D: FileDescriptor + ?Sized>(&self, d: &Rc<D>) {
        self.unwatch(d, true)
    }

    /// Stops watching `d` for writability (no-op if it was not watched).
    pub fn remove_writer<D: FileDescriptor + ?Sized>(&self, d: &Rc<D>) {
        self.unwatch(d, false)
    }

    /// Stops watching every user descriptor and returns them (each once).
    /// The reactor's own descriptors (its waker) are not touched.
    pub fn remove_all(&self) -> Vec<Rc<dyn FileDescriptor>> {
        let taken = self.inner.fds.borrow_mut().take_all();
        {
            let mut poller = self.inner.poller.borrow_mut();
            for (fd, slot) in &taken {
                let _ = poller.update(*fd, slot.interest(), Interest::NONE);
            }
        }
        let mut taken = taken;
        // In descriptor order across both tables, as on the other backends.
        taken.extend(
            self.forget_ring_readers()
                .into_iter()
                .map(|(fd, d)| (fd, Slot { reader: Some(d), writer: None })),
        );
        taken.extend(
            self.forget_ring_writers()
                .into_iter()
                .map(|(fd, d)| (fd, Slot { reader: None, writer: Some(d) })),
        );
        taken.sort_by_key(|(fd, _)| *fd);
        fdset::unique(taken)
    }

    /// The descriptors watched for reading (on io_uring, also the streams
    /// reading by completion).
    pub fn get_readers(&self) -> Vec<Rc<dyn FileDescriptor>> {
        let mut readers = self.inner.fds.borrow().readers();
        readers.extend(self.ring_readers());
        readers
    }

    /// The descriptors watched for writing.
    pub fn get_writers(&self) -> Vec<Rc<dyn FileDescriptor>> {
        self.inner.fds.borrow().writers()
    }

    // ----- time -------------------------------------------------------

    /// Monotonic time in seconds, on the scale `DelayedCall::time` uses.
    pub fn seconds(&self) -> f64 {
        self.inner.timers.seconds()
    }

    /// Schedules `f` to run after `delay`. Calls due at the same time run in
    /// the order they were scheduled; a call scheduled for "now" from inside
    /// a callback runs on the next iteration, after one poll. `f` may return
    /// `()` or a `Result`; an `Err` or a panic is logged.
    pub fn call_later<F, R>(&self, delay: Duration, f: F) -> DelayedCall
    where
        F: FnOnce() -> R + 'static,
        R: CallbackResult + 'static,
    {
        self.inner.timers.call_later(delay, f)
    }

    /// Every pending (not yet run, not cancelled) delayed call.
    pub fn get_delayed_calls(&self) -> Vec<DelayedCall> {
        self.inner.timers.pending()
    }

    // ----- threads ----------------------------------------------------

    /// A `Send + Sync` handle for reaching this reactor from other threads.
    pub fn remote(&self) -> Remote {
        Remote { shared: self.inner.shared.clone() }
    }

    /// Queues `f` like [`Remote::call_from_thread`]; from the reactor thread
    /// itself the call still waits for the next iteration.
    pub fn call_from_thread(&self, f: impl FnOnce(&Reactor) + Send + 'static) {
        // Refused only once the reactor has stopped for good, when the call
        // could never run anyway.
        let _ = self.remote().call_from_thread(f);
    }

    /// True when called on the thread this reactor was built on.
    pub fn is_in_io_thread(&self) -> bool {
        self.remote().is_in_io_thread()
    }

    /// Runs `f` on the reactor's thread pool. The pool is created on first
    /// use and starts when the reactor runs; it is stopped and joined at
    /// shutdown. A panic in `f` is logged.
    pub fn call_in_thread(&self, f: impl FnOnce() + Send + 'static) {
        let mut pool = self.inner.pool.borrow_mut();
        let pool = pool.get_or_insert_with(|| {
            let mut p = ThreadPool::new(self.inner.pool_max.get());
            if self.running() {
                p.start();
            }
            p
        });
        pool.submit(Box::new(f));
    }

    /// Sets the maximum number of pool threads (Twisted's default is 10).
    pub fn suggest_thread_pool_size(&self, max: usize) {
        self.inner.pool_max.set(max.max(1));
        if let Some(pool) = self.inner.pool.borrow_mut().as_mut() {
            pool.set_max(max);
        }
    }

    /// The pool's maximum thread count.
    pub fn thread_pool_size(&self) -> usize {
        self.inner.pool_max.get()
    }

    /// True while the reactor has a started thread pool.
    pub fn thread_pool_running(&self) -> bool {
        self.inner.pool.borrow().as_ref().is_some_and(|p| p.started())
    }

    /// True if a thread pool exists (created and not yet torn down).
    pub fn has_thread_pool(&self) -> bool {
        self.inner.pool.borrow().is_some()
    }

    fn start_thread_pool(&self) {
        if let Some(pool) = self.inner.pool.borrow_mut().as_mut() {
            if !pool.started() {
                pool.start();
            }
        }
    }

    fn stop_thread_pool(&self) {
        let pool = self.inner.pool.borrow_mut().take();
        if let Some(mut pool) = pool {
            pool.stop();
        }
    }
}

impl ReactorTime for Reactor {
    fn seconds(&self) -> f64 {
        Reactor::seconds(self)
    }
    fn schedule(&self, delay: Duration, f: Box<dyn FnOnce()>) -> DelayedCall {
        self.call_later(delay, f)
    }
    fn pending_calls(&self) -> Vec<DelayedCall> {
        self.get_delayed_calls()
    }
}

/// The last handle is gone (and the reactor is not running, or it could
/// not be): nothing can drive it again, so everything it holds is released
/// here rather than leaked. Internal objects (connections, ports,
/// connectors) hold the reactor weakly, so they do not keep it alive; a
/// user's own object that holds a `Reactor` (a protocol, a pending call)
/// does, until it is dropped.
impl Drop for Inner {
    fn drop(&mut self) {
        // Fail every thread blocked on a call that can never run now.
        self.shared.close_queue();
        // Each descriptor hears `connection_lost`, which is what closes a
        // connection's socket and frees its protocol; the reactor cannot be
        // reached from inside (its weak handles no longer upgrade).
        let mut taken = self.fds.get_mut().take_all();
        taken.extend(
            Reactor::take_ring_readers(self.recv_owners.get_mut())
                .into_iter()
                .map(|(fd, d)| (fd, Slot { reader: Some(d), writer: None })),
        );
        taken.extend(
            Reactor::take_ring_writers(self.send_owners.get_mut())
                .into_iter()
                .map(|(fd, d)| (fd, Slot { reader: None, writer: Some(d) })),
        );
        taken.sort_by_key(|(fd, _)| *fd);
        let mut all = fdset::unique(taken);
        let held: Vec<_> = self.held.get_mut().drain().collect();
        all.extend(fdset::unique_besides(&all, held));
        tell_lost(all, "as the reactor was dropped", || {
            Failure::new(Error::ConnectionLost).context("the reactor was dropped")
        });
        self.flushes.get_mut().clear();
        if let Some(mut pool) = self.pool.get_mut().take() {
            pool.stop();
        }
    }
}

/// Tells each descriptor it is lost, `when` naming the occasion in logs;
/// one descriptor failing does not stop the others.
fn tell_lost(all: Vec<Rc<dyn FileDescriptor>>, when: &str, why: impl Fn() -> Failure) {
    for d in all {
        let prefix = d.log_prefix();
        guard::run_logged(
            || format!("in connection_lost of {prefix} {when}"),
            || {
                d.connection_lost(why());
                Ok(())
            },
        );
    }
}

/// A reactor handle that does not keep the reactor alive: what the
/// reactor's own objects (connections, ports, connectors) hold, so that
/// they and the reactor never keep each other alive.
#[derive(Clone)]
pub(crate) struct WeakReactor(Weak<Inner>);

impl WeakReactor {
    /// The reactor, unless it has been dropped.
    #[inline]
    pub fn get(&self) -> Option<Reactor> {
        Reactor::from_weak(&self.0)
    }
}
