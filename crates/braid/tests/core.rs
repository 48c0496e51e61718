//! Reactor core: run/stop/crash/iterate, system event triggers, errors in
//! user callbacks, idle cost. Twisted reference §4.1 (test_core.py), each
//! test on every backend.

mod common;

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, Instant};

use braid::{Deferred, Error, Failure, Phase, Reactor};
use common::{capture_logs, run_reactor};

type Log = Rc<RefCell<Vec<String>>>;

fn log() -> Log {
    Rc::new(RefCell::new(Vec::new()))
}

fn push(log: &Log, s: impl Into<String>) {
    log.borrow_mut().push(s.into());
}

fn stop_soon(r: &Reactor) {
    let rr = r.clone();
    r.call_later(Duration::ZERO, move || rr.stop().unwrap());
}

reactor_test! {
    /// §4.1.1
    fn stop_when_not_started(r) {
        assert!(matches!(r.stop(), Err(Error::ReactorNotRunning)));
    }
}

reactor_test! {
    /// §4.1.2
    fn stop_when_already_stopped(r) {
        stop_soon(&r);
        run_reactor(&r);
        assert!(matches!(r.stop(), Err(Error::ReactorNotRunning)));
    }
}

reactor_test! {
    /// A second stop() while the shutdown is pending is refused too.
    fn stop_twice_while_stopping(r) {
        let rr = r.clone();
        let second = Rc::new(Cell::new(None));
        let s = second.clone();
        r.call_later(Duration::ZERO, move || {
            rr.stop().unwrap();
            s.set(Some(matches!(rr.stop(), Err(Error::ReactorNotRunning))));
        });
        run_reactor(&r);
        assert_eq!(second.get(), Some(true));
    }
}

reactor_test! {
    /// §4.1.3
    fn call_when_running_order(r) {
        let l = log();
        for name in ["first", "second", "third"] {
            let l = l.clone();
            assert!(r.call_when_running(move || push(&l, name)).is_some());
        }
        stop_soon(&r);
        run_reactor(&r);
        assert_eq!(*l.borrow(), ["first", "second", "third"]);
    }
}

reactor_test! {
    /// Once running, call_when_running calls at once and returns no id.
    fn call_when_running_when_running(r) {
        let l = log();
        let (rr, ll) = (r.clone(), l.clone());
        r.call_when_running(move || {
            let l2 = ll.clone();
            let id = rr.call_when_running(move || push(&l2, "inner"));
            push(&ll, format!("id={}", id.is_some()));
            rr.stop().unwrap();
        });
        run_reactor(&r);
        assert_eq!(*l.borrow(), ["inner", "id=false"]);
    }
}

reactor_test! {
    /// §4.1.4
    fn running_for_startup_events(r) {
        let l = log();
        for phase in [Phase::Before, Phase::During, Phase::After] {
            let (l, rr) = (l.clone(), r.clone());
            r.add_system_event_trigger(phase, "startup", move || push(&l, format!("{phase}:{}", rr.running())));
        }
        assert!(!r.running());
        stop_soon(&r);
        run_reactor(&r);
        assert_eq!(*l.borrow(), ["before:false", "during:true", "after:true"]);
        assert!(!r.running());
    }
}

reactor_test! {
    /// §4.1.5: signal handlers go in during the *during startup* phase.
    fn signal_handlers_installed_during_startup(r) {
        let l = log();
        for phase in [Phase::Before, Phase::After] {
            let (l, rr) = (l.clone(), r.clone());
            r.add_system_event_trigger(phase, "startup", move || {
                push(&l, format!("{phase}:{}", rr.signal_handlers_installed()))
            });
        }
        stop_soon(&r);
        let rr = r.clone();
        let watchdog = r.call_later(common::WATCHDOG, move || rr.stop().unwrap());
        r.run().unwrap();
        let _ = watchdog.cancel();
        assert_eq!(*l.borrow(), ["before:false", "after:true"]);
        assert!(!r.signal_handlers_installed(), "uninstalled when run() returns");
    }
}

reactor_test! {
    /// run_without_signal_handlers never installs them.
    fn run_without_signal_handlers_installs_none(r) {
        let seen = Rc::new(Cell::new(true));
        let (s, rr) = (seen.clone(), r.clone());
        r.call_when_running(move || {
            s.set(rr.signal_handlers_installed());
            rr.stop().unwrap();
        });
        run_reactor(&r);
        assert!(!seen.get());
    }
}

reactor_test! {
    /// §4.1.6
    fn stop_shutdown_events(r) {
        let l = log();
        for phase in [Phase::After, Phase::During, Phase::Before] {
            let (l, rr) = (l.clone(), r.clone());
            r.add_system_event_trigger(phase, "shutdown", move || push(&l, format!("{phase}:{}", rr.running())));
        }
        stop_soon(&r);
        run_reactor(&r);
        assert_eq!(*l.borrow(), ["before:true", "during:false", "after:false"]);
    }
}

reactor_test! {
    /// §4.1.7: before-shutdown triggers do not run inside stop().
    fn shutdown_fires_triggers_asynchronously(r) {
        let l = log();
        let l2 = l.clone();
        r.add_system_event_trigger(Phase::Before, "shutdown", move || push(&l2, "trigger"));
        let (rr, l3) = (r.clone(), l.clone());
        r.call_later(Duration::ZERO, move || {
            rr.stop().unwrap();
            push(&l3, "after stop()");
        });
        run_reactor(&r);
        assert_eq!(*l.borrow(), ["after stop()", "trigger"]);
    }
}

/// A descriptor on a pipe that records its connection_lost, or panics in it.
struct Lossy {
    fd: std::os::fd::OwnedFd,
    lost: Log,
    explode: bool,
}

impl braid::FileDescriptor for Lossy {
    fn fileno(&self) -> std::os::fd::RawFd {
        common::raw(&self.fd)
    }
    fn connection_lost(&self, reason: Failure) {
        if self.explode {
            panic!("connection_lost exploded");
        }
        push(&self.lost, format!("{}:{}", self.fileno(), reason));
    }
}

reactor_test! {
    /// §4.1.8 and §4.5.11: at shutdown every descriptor gets connection_lost
    /// (ConnectionLost), even after one panics; the panic is logged once.
    fn shutdown_disconnects_cleanly(r) {
        let lost = log();
        let (a, _wa) = common::pipe();
        let (b, _wb) = common::pipe();
        let (c, _wc) = common::pipe();
        let a = Rc::new(Lossy { fd: a, lost: lost.clone(), explode: false });
        let b = Rc::new(Lossy { fd: b, lost: lost.clone(), explode: true });
        let c = Rc::new(Lossy { fd: c, lost: lost.clone(), explode: false });
        r.add_reader(a.clone()).unwrap();
        r.add_reader(b.clone()).unwrap();
        r.add_writer(c.clone()).unwrap();
        stop_soon(&r);
        let ((), logs) = capture_logs(|| run_reactor(&r));
        let mut got = lost.borrow().clone();
        got.sort();
        let mut want = vec![
            format!("{}:connection was lost", a.fileno()),
            format!("{}:connection was lost", c.fileno()),
        ];
        want.sort();
        assert_eq!(got, want);
        assert_eq!(logs.matches("connection_lost exploded").count(), 1, "{logs}");
        assert!(r.get_readers().is_empty() && r.get_writers().is_empty());
    }
}

use braid::FileDescriptor as _;

reactor_test! {
    /// §4.1.9
    fn multiple_run(r) {
        let got = Rc::new(RefCell::new(None));
        let (g, rr) = (got.clone(), r.clone());
        r.call_when_running(move || {
            *g.borrow_mut() = Some(rr.run_without_signal_handlers());
            assert!(rr.running(), "still running after the refused run()");
            rr.stop().unwrap();
        });
        run_reactor(&r);
        assert!(matches!(got.borrow_mut().take(), Some(Err(Error::ReactorAlreadyRunning))));
    }
}

reactor_test! {
    /// §4.1.10: a before-startup Deferred holds the rest of startup; timers
    /// still run meanwhile; run() returns only after stop().
    fn run_with_asynchronous_before_startup_trigger(r) {
        let l = log();
        let held = Deferred::<()>::new();
        let h = held.clone();
        r.add_system_event_trigger(Phase::Before, "startup", move || h);
        let (l2, rr) = (l.clone(), r.clone());
        r.call_when_running(move || {
            push(&l2, "running");
            rr.stop().unwrap();
        });
        let (l3, rr) = (l.clone(), r.clone());
        r.call_later(Duration::from_millis(5), move || {
            push(&l3, format!("timer, running={}", rr.running()));
            held.callback(()).unwrap();
        });
        run_reactor(&r);
        assert_eq!(*l.borrow(), ["timer, running=false", "running"]);
    }
}

reactor_test! {
    /// User-named events fire their phases in order, and a before Deferred
    /// holds during/after until it fires.
    fn custom_event_with_held_before_phase(r) {
        let l = log();
        let held = Deferred::<u32>::new();
        let (h, l1) = (held.clone(), l.clone());
        r.add_system_event_trigger(Phase::Before, "persist", move || {
            push(&l1, "before");
            h
        });
        for phase in [Phase::During, Phase::After] {
            let l = l.clone();
            r.add_system_event_trigger(phase, "persist", move || push(&l, phase.to_string()));
        }
        r.fire_system_event("persist");
        assert_eq!(*l.borrow(), ["before"]);
        held.callback(7).unwrap();
        assert_eq!(*l.borrow(), ["before", "during", "after"]);
        // Triggers are consumed: firing again runs nothing.
        r.fire_system_event("persist");
        assert_eq!(l.borrow().len(), 3);
    }
}

reactor_test! {
    /// Removing a trigger keeps it from running; removing twice is an error.
    fn remove_system_event_trigger(r) {
        let l = log();
        let l1 = l.clone();
        let id = r.add_system_event_trigger(Phase::During, "x", move || push(&l1, "removed one"));
        let l2 = l.clone();
        r.add_system_event_trigger(Phase::During, "x", move || push(&l2, "kept"));
        r.remove_system_event_trigger(&id).unwrap();
        assert!(matches!(r.remove_system_event_trigger(&id), Err(Error::NoSuchTrigger)));
        r.fire_system_event("x");
        assert_eq!(*l.borrow(), ["kept"]);
        assert!(matches!("sideways".parse::<Phase>(), Err(Error::UnknownPhase(_))));
    }
}

reactor_test! {
    /// §4.1.11: iterate(0) returns at once even with a timer 5 s away.
    fn iterate(r) {
        r.call_later(Duration::from_secs(5), || ());
        let start = Instant::now();
        r.iterate(Some(Duration::ZERO)).unwrap();
        assert!(start.elapsed() < Duration::from_secs(2));
    }
}

reactor_test! {
    /// iterate runs due timers without run().
    fn iterate_runs_due_calls(r) {
        let ran = Rc::new(Cell::new(false));
        let ran2 = ran.clone();
        r.call_later(Duration::ZERO, move || ran2.set(true));
        let deadline = Instant::now() + common::WATCHDOG;
        while !ran.get() && Instant::now() < deadline {
            r.iterate(Some(Duration::from_millis(10))).unwrap();
        }
        assert!(ran.get());
    }
}

reactor_test! {
    /// §4.1.12: crash leaves run() at once, running false, no shutdown triggers.
    fn crash(r) {
        let l = log();
        let l1 = l.clone();
        r.add_system_event_trigger(Phase::Before, "shutdown", move || push(&l1, "shutdown"));
        let rr = r.clone();
        r.call_when_running(move || rr.crash());
        run_reactor(&r);
        assert!(!r.running());
        assert!(l.borrow().is_empty());
    }
}

reactor_test! {
    /// §4.1.13: run() works again after crash().
    fn run_after_crash(r) {
        let rr = r.clone();
        r.call_when_running(move || rr.crash());
        run_reactor(&r);
        let seen = Rc::new(Cell::new(false));
        let (s, rr) = (seen.clone(), r.clone());
        r.call_when_running(move || {
            s.set(rr.running());
            rr.stop().unwrap();
        });
        run_reactor(&r);
        assert!(seen.get());
    }
}

reactor_test! {
    /// §4.1.14: run() after stop() is not restartable, even from an
    /// after-shutdown trigger.
    fn run_after_stop(r) {
        let inner = Rc::new(RefCell::new(None));
        let (i, rr) = (inner.clone(), r.clone());
        r.add_system_event_trigger(Phase::After, "shutdown", move || {
            *i.borrow_mut() = Some(rr.run_without_signal_handlers());
        });
        stop_soon(&r);
        run_reactor(&r);
        assert!(matches!(inner.borrow_mut().take(), Some(Err(Error::ReactorNotRestartable))));
        assert!(matches!(r.run_without_signal_handlers(), Err(Error::ReactorNotRestartable)));
    }
}

reactor_test! {
    /// A callback that panics or returns an error is logged with context,
    /// and the loop keeps running.
    fn errors_in_callbacks_are_logged_and_survived(r) {
        r.call_later::<_, ()>(Duration::ZERO, || panic!("boom in a timer"));
        r.call_later(Duration::ZERO, || Err::<(), _>(Failure::msg("bad result in a timer")));
        r.call_from_thread(|_| panic!("boom from a thread"));
        r.add_system_event_trigger(Phase::Before, "shutdown", || Err::<(), _>(Failure::msg("bad trigger")));
        let later = Rc::new(Cell::new(false));
        let (l, rr) = (later.clone(), r.clone());
        r.call_later(Duration::from_millis(20), move || {
            l.set(true);
            rr.stop().unwrap();
        });
        let ((), logs) = capture_logs(|| run_reactor(&r));
        assert!(later.get(), "the loop went on after the errors");
        for needle in [
            "boom in a timer",
            "bad result in a timer",
            "boom from a thread",
            "bad trigger",
            "in a delayed call",
            "in a call from a thread",
            "before-shutdown trigger",
        ] {
            assert!(logs.contains(needle), "missing {needle:?} in logs:\n{logs}");
        }
    }
}

fn thread_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

reactor_test! {
    /// An idle reactor sleeps: over 300 ms with nothing to do it runs a
    /// handful of iterations and burns (far) less than 50 ms of CPU.
    fn idle_costs_nothing(r) {
        let rr = r.clone();
        r.call_later(Duration::from_millis(300), move || rr.stop().unwrap());
        let cpu = thread_cpu();
        r.run_without_signal_handlers().unwrap();
        let used = thread_cpu() - cpu;
        assert!(r.iterations() <= 5, "{} iterations while idle", r.iterations());
        assert!(used < Duration::from_millis(50), "idle reactor used {used:?} of CPU");
    }
}

/// Microseconds during which some task on this machine was stalled waiting
/// for I/O (the kernel's pressure stall information).
fn io_stall_us() -> u64 {
    let text = std::fs::read_to_string("/proc/pressure/io").unwrap_or_else(|e| {
        panic!("/proc/pressure/io: {e}: this test needs the kernel's PSI (CONFIG_PSI, not booted with psi=0)")
    });
    let some = text.lines().find(|l| l.starts_with("some ")).expect("a `some` line in /proc/pressure/io");
    some.split("total=").nth(1).and_then(|n| n.trim().parse().ok()).expect("total= in /proc/pressure/io")
}

/// The running kernel's major and minor release.
fn kernel_release() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("/proc/sys/kernel/osrelease");
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit()).map(|p| p.parse().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// Reads and ignores what it gets.
struct Quiet;
impl braid::protocol::Protocol for Quiet {
    fn data_received(&mut self, _data: &[u8]) {}
}

reactor_test! {
    /// An idle reactor is idle, not waiting for I/O: with a listener and a
    /// connection whose reads are pending (on io_uring, an accept and a
    /// receive in flight), 300 ms of waiting must not show up as I/O
    /// pressure. A task counted as in iowait stalls the whole window. The
    /// pressure figure is the machine's, so other work (a journal commit,
    /// writeback) can add to it: the test fails only if three windows in a
    /// row are nine tenths stalled.
    fn idle_is_not_counted_as_waiting_for_io(r) {
        if r.backend() == braid::Backend::IoUring && kernel_release() < (6, 15) {
            panic!(
                "kernel {:?} has no IORING_ENTER_NO_IOWAIT (Linux 6.15+): an idle io_uring reactor \
                 is reported as waiting for I/O here",
                kernel_release()
            );
        }
        let port = r.listen_tcp("127.0.0.1:0", || Quiet, braid::tcp::DEFAULT_BACKLOG).unwrap();
        let _client = std::net::TcpStream::connect(port.local_addr()).unwrap();
        // The first pass accepts the connection and starts reading it.
        r.iterate(Some(Duration::from_millis(50))).unwrap();
        // Each window's stall is read by a timer at its end; the first quiet
        // one ends the run.
        let stalls = Rc::new(RefCell::new(Vec::new()));
        let mark = Rc::new(Cell::new(0));
        for i in 1..=3 {
            let (stalls, mark, rr) = (stalls.clone(), mark.clone(), r.clone());
            r.call_later(Duration::from_millis(300 * i), move || {
                let now = io_stall_us();
                let stalled = now - mark.replace(now);
                stalls.borrow_mut().push(stalled);
                if stalled < 270_000 || i == 3 {
                    rr.stop().unwrap();
                }
            });
        }
        mark.set(io_stall_us());
        r.run_without_signal_handlers().unwrap();
        let stalls = stalls.borrow();
        assert!(
            stalls.iter().any(|&s| s < 270_000),
            "I/O stall over each of three 300 ms idle waits on {}: {stalls:?} µs",
            r.backend()
        );
    }
}

reactor_test! {
    /// A *before* trigger that returns an already-fired Deferred (as
    /// `stop_listening()` on a stopped port does) must not start the
    /// *during* phase ahead of the remaining *before* triggers, nor run the
    /// later phases twice.
    fn before_trigger_returning_fired_deferred_keeps_phase_order(r) {
        let seen = log();
        let s = seen.clone();
        r.add_system_event_trigger(Phase::Before, "test", move || {
            push(&s, "before 1");
            Deferred::succeed(())
        });
        let s = seen.clone();
        r.add_system_event_trigger(Phase::Before, "test", move || push(&s, "before 2"));
        let s = seen.clone();
        r.add_system_event_trigger(Phase::Before, "test", move || {
            push(&s, "before 3");
            Deferred::<()>::fail(Failure::msg("already failed"))
        });
        for phase in [Phase::During, Phase::After] {
            let s = seen.clone();
            r.add_system_event_trigger(phase, "test", move || push(&s, format!("{phase}")));
        }
        r.fire_system_event("test");
        assert_eq!(*seen.borrow(), ["before 1", "before 2", "before 3", "during", "after"]);
    }
}

reactor_test! {
    /// A hold released while later *before* triggers are still pending, and
    /// another released afterwards: the later phases start once, after both.
    fn before_holds_released_during_and_after_the_before_phase(r) {
        let seen = log();
        let late: Deferred<()> = Deferred::new();
        let s = seen.clone();
        r.add_system_event_trigger(Phase::Before, "test", move || {
            push(&s, "before 1");
            Deferred::succeed(())
        });
        let (s, l) = (seen.clone(), late.clone());
        r.add_system_event_trigger(Phase::Before, "test", move || {
            push(&s, "before 2");
            l
        });
        let s = seen.clone();
        r.add_system_event_trigger(Phase::During, "test", move || push(&s, "during"));
        r.fire_system_event("test");
        assert_eq!(*seen.borrow(), ["before 1", "before 2"]);
        late.callback(()).unwrap();
        assert_eq!(*seen.borrow(), ["before 1", "before 2", "during"]);
    }
}

reactor_test! {
    /// `crash()` from a callback leaves `run()` at the end of that pass: it
    /// does not first block in poll until the next timer is due.
    fn crash_from_a_callback_returns_without_waiting_for_the_next_timer(r) {
        let far_fired = Rc::new(Cell::new(false));
        let f = far_fired.clone();
        let far = r.call_later(Duration::from_secs(10), move || f.set(true));
        let rr = r.clone();
        r.call_later(Duration::ZERO, move || rr.crash());
        let started = Instant::now();
        r.run_without_signal_handlers().unwrap();
        // A generous bound: the bug blocks until the 10 s timer's deadline.
        assert!(started.elapsed() < Duration::from_secs(5), "run() waited {:?} after crash()", started.elapsed());
        assert!(!far_fired.get());
        assert!(far.active());
        far.cancel().unwrap();
    }
}
