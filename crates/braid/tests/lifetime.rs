//! How long things live: a listener without its handle, a protocol whose
//! connection could not be registered, a thread blocked on a reactor that
//! stops or goes away, and a reactor dropped with connections open. Each
//! test on every backend; the ones that change process-wide state (the
//! descriptor table, thread count) run in a child process.

mod common;

use std::cell::RefCell;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::sync::mpsc;
use std::time::Duration;

use braid::protocol::Protocol;
use braid::{Backend, Deferred, Error, Factory, Failure, Reactor, Transport};
use common::{capture_logs, in_child, is_child, run_reactor, WATCHDOG};

fn child_backend() -> Backend {
    std::env::var(common::CHILD_ENV).unwrap().parse().unwrap()
}

/// Opens `/dev/null` until the next descriptor would be `at_least` or
/// more (the kernel hands out the lowest free number).
fn fill_fds_below(at_least: i32) -> Vec<OwnedFd> {
    use std::os::fd::AsRawFd;
    let mut held = Vec::new();
    loop {
        let fd = rustix::fs::open(
            "/dev/null",
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .expect("opening /dev/null to fill the descriptor table");
        if fd.as_raw_fd() >= at_least - 1 {
            held.push(fd);
            return held;
        }
        held.push(fd);
    }
}

/// Opens `/dev/null` until the process is out of descriptors.
fn exhaust_fds() -> Vec<OwnedFd> {
    let mut held = Vec::new();
    loop {
        match rustix::fs::open(
            "/dev/null",
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        ) {
            Ok(fd) => held.push(fd),
            Err(rustix::io::Errno::MFILE) => return held,
            Err(e) => panic!("unexpected error filling the descriptor table: {e}"),
        }
    }
}

/// A factory that counts start/stop and records what its protocols hear.
struct Tracked {
    log: Rc<RefCell<Vec<String>>>,
}

struct TrackedProtocol {
    log: Rc<RefCell<Vec<String>>>,
    t: Option<Transport>,
}

impl Protocol for TrackedProtocol {
    fn connection_made(&mut self, t: Transport) {
        self.log.borrow_mut().push("made".into());
        self.t = Some(t);
    }
    fn data_received(&mut self, data: &[u8]) {
        if let Some(t) = &self.t {
            t.write(data);
        }
    }
    fn connection_lost(&mut self, reason: Failure) {
        self.log.borrow_mut().push(format!("lost: {reason}"));
    }
}

impl Factory for Tracked {
    fn build_protocol(&mut self, _addr: &braid::Address) -> Option<Box<dyn Protocol>> {
        Some(Box::new(TrackedProtocol { log: self.log.clone(), t: None }))
    }
    fn start_factory(&mut self) {
        self.log.borrow_mut().push("start_factory".into());
    }
    fn stop_factory(&mut self) {
        self.log.borrow_mut().push("stop_factory".into());
    }
}

reactor_test! {
    /// A port that backs off (here: EMFILE with no reserve descriptor to
    /// shed load with) stays in the reactor though nobody kept its
    /// `ListeningPort`: once descriptors are free again it accepts and
    /// serves, and at shutdown its factory is stopped.
    fn listener_without_handle_survives_back_off(r) {
        if !is_child() {
            let out = in_child(&format!("listener_without_handle_survives_back_off::{}", r.backend()), r.backend().name());
            assert!(out.contains("served after back-off"), "{out}");
            return;
        }
        drop(r);
        let r = Reactor::new(child_backend()).unwrap();
        assert!(common::set_fd_limit(256) >= 64, "cannot set a small descriptor limit");
        let log = Rc::new(RefCell::new(Vec::new()));
        let mut filler = exhaust_fds();
        // Room for the listening socket only: the process-wide reserve
        // descriptor cannot be opened, so EMFILE means backing off.
        drop(filler.pop());
        let addr = r.listen_tcp("127.0.0.1:0", Tracked { log: log.clone() }, 50).unwrap().local_addr();
        // The handle is gone. One descriptor for the client thread's socket.
        drop(filler.pop());
        let remote = r.remote();
        let (connected_tx, connected_rx) = mpsc::channel();
        let client = std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).expect("connect");
            connected_tx.send(()).unwrap();
            s.set_read_timeout(Some(WATCHDOG)).unwrap();
            s.write_all(b"ping").unwrap();
            let mut buf = [0u8; 4];
            let served = s.read_exact(&mut buf).is_ok() && &buf == b"ping";
            let _ = remote.call_from_thread(|r| {
                let _ = r.stop();
            });
            served
        });
        // The free descriptor is the client's before the reactor (which
        // may open a file now and then) runs.
        connected_rx.recv_timeout(WATCHDOG).expect("the client could not connect");
        // Let the accept fail with EMFILE for a while, then free room.
        let held = Rc::new(RefCell::new(Some(filler)));
        let h = held.clone();
        r.call_later(Duration::from_millis(300), move || {
            if let Some(f) = h.borrow_mut().as_mut() {
                f.truncate(f.len().saturating_sub(4));
            }
        });
        let ((), logs) = capture_logs(|| run_reactor(&r));
        assert!(client.join().unwrap(), "the client was not served: {logs}");
        assert!(logs.contains("pausing accepts"), "the port never backed off: {logs}");
        let log = log.borrow();
        assert_eq!(log.first().map(String::as_str), Some("start_factory"), "{log:?}");
        assert!(log.iter().any(|l| l == "made"), "{log:?}");
        assert_eq!(log.last().map(String::as_str), Some("stop_factory"), "stop_factory was never called: {log:?}");
        println!("served after back-off");
    }
}

#[test]
/// Only select can refuse to watch an accepted socket (an fd at or above
/// FD_SETSIZE); poll and epoll cannot be made to, so this runs on select.
/// The protocol built for it must hear nothing: no `connection_made`, so
/// no `connection_lost` either.
fn unregistrable_connection_never_hears_connection_lost() {
    if !is_child() {
        let out = in_child("unregistrable_connection_never_hears_connection_lost", "select");
        assert!(out.contains("nothing heard"), "{out}");
        return;
    }
    let r = Reactor::new(Backend::Select).unwrap();
    assert!(common::set_fd_limit(2048) >= 1100, "descriptor limit too low for this test");
    let log = Rc::new(RefCell::new(Vec::new()));
    let addr = r.listen_tcp("127.0.0.1:0", Tracked { log: log.clone() }, 50).unwrap().local_addr();
    let _filler = fill_fds_below(1024);
    let remote = r.remote();
    let client = std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(WATCHDOG)).unwrap();
        let mut buf = [0u8; 16];
        let outcome = s.read(&mut buf);
        let _ = remote.call_from_thread(|r| {
            let _ = r.stop();
        });
        matches!(outcome, Ok(0))
            || matches!(&outcome, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset)
    });
    let ((), logs) = capture_logs(|| run_reactor(&r));
    assert!(client.join().unwrap(), "the client was not closed: {logs}");
    assert!(logs.contains("too large for the select reactor"), "{logs}");
    let log = log.borrow();
    assert!(
        !log.iter().any(|l| l == "made" || l.starts_with("lost")),
        "the protocol heard something: {log:?}"
    );
    println!("nothing heard");
}

reactor_test! {
    /// A thread blocked in `blocking_call_from_thread` gets an error when
    /// the reactor is dropped with its call still queued.
    fn blocking_call_fails_when_the_reactor_is_dropped(r) {
        let remote = r.remote();
        let (queued_tx, queued_rx) = mpsc::channel();
        let (done_tx, done_rx) = mpsc::channel();
        std::thread::spawn(move || {
            queued_tx.send(()).unwrap();
            let result = remote.blocking_call_from_thread(|_| Deferred::succeed(1));
            let _ = done_tx.send(result.map_err(|f| f.to_string()));
        });
        queued_rx.recv().unwrap();
        // Give the thread time to queue its call (if it has not, it is
        // refused outright, which is also an error and no hang).
        std::thread::sleep(Duration::from_millis(100));
        drop(r);
        let result = done_rx.recv_timeout(WATCHDOG).expect("blocking_call_from_thread hung after the reactor was dropped");
        let err = result.expect_err("a dropped reactor answered");
        assert!(err.contains("stopped for good or been dropped"), "{err}");
    }
}

reactor_test! {
    /// Once the reactor has stopped for good, a blocking call from a
    /// thread fails at once instead of waiting for a reactor that will
    /// never run again; a plain call from a thread is refused too.
    fn blocking_call_fails_once_the_reactor_stopped(r) {
        let rr = r.clone();
        r.call_later(Duration::ZERO, move || rr.stop().unwrap());
        run_reactor(&r);
        let remote = r.remote();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let refused = remote.call_from_thread(|_| {});
            let blocked = remote.blocking_call_from_thread(|_| Deferred::succeed(1));
            let _ = tx.send((refused.is_err(), blocked.map_err(|f| f.to_string())));
        });
        let (refused, blocked) = rx.recv_timeout(WATCHDOG).expect("blocking_call_from_thread hung after stop");
        assert!(refused, "call_from_thread was accepted by a stopped reactor");
        assert!(blocked.is_err(), "a stopped reactor answered");
        // The reactor is still usable for what needs no loop.
        assert!(matches!(r.run(), Err(Error::ReactorNotRestartable)));
    }
}

/// Open descriptors and threads of this process.
fn fds_and_threads() -> (usize, usize) {
    let count = |dir| std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0);
    (count("/proc/self/fd"), count("/proc/self/task"))
}

/// The counts once they are back to `baseline`, or as they are after a
/// generous wait: a joined thread can still be listed in /proc for a
/// moment after `join` returns (the kernel wakes the joiner before the
/// thread is fully gone).
fn settled_counts(baseline: (usize, usize)) -> (usize, usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let now = fds_and_threads();
        if now == baseline || std::time::Instant::now() > deadline {
            return now;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Builds a reactor with a listener, a client connection (through a
/// connector) and the accepted connection, both with protocols that hold
/// their transports, and a started thread pool; runs until connected, then
/// leaves the loop with `crash()` (or, with `crash == false`, stops
/// iterating without ever running).
fn busy_reactor(backend: Backend, crash: bool) {
    let r = Reactor::new(backend).unwrap();
    let log = Rc::new(RefCell::new(Vec::new()));
    let addr = r.listen_tcp("127.0.0.1:0", Tracked { log: log.clone() }, 50).unwrap().local_addr();
    let l = log.clone();
    let _connector = r.connect_tcp(
        "127.0.0.1",
        addr.port(),
        move || TrackedProtocol { log: l.clone(), t: None },
        Some(Duration::from_secs(10)),
        None,
    );
    r.call_in_thread(|| {});
    if crash {
        let rr = r.clone();
        let l = log.clone();
        fn poll(r: Reactor, l: Rc<RefCell<Vec<String>>>) {
            if l.borrow().iter().filter(|e| *e == "made").count() >= 2 {
                r.crash();
            } else {
                let rr = r.clone();
                r.call_later(Duration::from_millis(5), move || poll(rr, l));
            }
        }
        r.call_later(Duration::ZERO, move || poll(rr, l));
        let watchdog = {
            let rr = r.clone();
            r.call_later(WATCHDOG, move || rr.crash())
        };
        r.run_without_signal_handlers().unwrap();
        let _ = watchdog.cancel();
        assert!(r.thread_pool_running(), "the pool never started");
    } else {
        for _ in 0..200 {
            if log.borrow().iter().filter(|e| *e == "made").count() >= 2 {
                break;
            }
            r.iterate(Some(Duration::from_millis(10))).unwrap();
        }
    }
    assert_eq!(log.borrow().iter().filter(|e| *e == "made").count(), 2, "{:?}", log.borrow());
    drop(r);
    // Every connection was told, once, as the reactor went away.
    let lost = log.borrow().iter().filter(|e| e.starts_with("lost")).count();
    assert_eq!(lost, 2, "{:?}", log.borrow());
}

reactor_test! {
    /// Dropping the last handle of a reactor that crashed, or that was only
    /// iterated, with connections open closes every descriptor and joins
    /// the pool threads: the process's fd and thread counts return to
    /// where they were.
    fn dropped_reactor_frees_descriptors_and_threads(r) {
        if !is_child() {
            let out = in_child(&format!("dropped_reactor_frees_descriptors_and_threads::{}", r.backend()), r.backend().name());
            assert!(out.contains("back to baseline"), "{out}");
            return;
        }
        drop(r);
        let backend = child_backend();
        // Once first, for what a process opens once (the listener's
        // reserve descriptor, the logger).
        let threads_before = fds_and_threads().1;
        busy_reactor(backend, false);
        // Descriptors after the warm-up; threads as before any reactor.
        let baseline = (fds_and_threads().0, threads_before);
        assert_eq!(settled_counts(baseline), baseline, "after the first reactor was dropped");
        busy_reactor(backend, true);
        assert_eq!(settled_counts(baseline), baseline, "after a crashed reactor was dropped");
        busy_reactor(backend, false);
        assert_eq!(settled_counts(baseline), baseline, "after an iterated reactor was dropped");
        println!("back to baseline");
    }
}
