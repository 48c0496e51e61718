//! The FD set: add/remove readers and writers on real pipes and
//! socketpairs. Twisted reference §4.5 (test_fdset.py), on every backend.

mod common;

use std::cell::{Cell, RefCell};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::time::Duration;

use braid::{Backend, Error, Failure, FileDescriptor, Reactor};
use common::{capture_logs, pipe, run_reactor, write_byte};

/// A test descriptor: counts calls, drains what it reads, and can be told
/// to stop the reactor or to fail.
#[derive(Default)]
struct Probe {
    fd: RefCell<Option<OwnedFd>>,
    reads: Cell<usize>,
    writes: Cell<usize>,
    fileno_calls: Cell<usize>,
    lost: RefCell<Vec<String>>,
    half_closed: RefCell<Vec<String>>,
    half_closeable: bool,
    stop_on: RefCell<Option<Reactor>>,
    panic_on_read: bool,
}

impl Probe {
    fn new(fd: OwnedFd) -> Rc<Probe> {
        Rc::new(Probe { fd: RefCell::new(Some(fd)), ..Default::default() })
    }
    fn stopping(fd: OwnedFd, r: &Reactor) -> Rc<Probe> {
        let p = Probe::new(fd);
        *p.stop_on.borrow_mut() = Some(r.clone());
        p
    }
    fn stop(&self) {
        if let Some(r) = self.stop_on.borrow_mut().take() {
            let _ = r.stop();
        }
    }
}

impl FileDescriptor for Probe {
    fn fileno(&self) -> RawFd {
        self.fileno_calls.set(self.fileno_calls.get() + 1);
        self.fd.borrow().as_ref().map_or(-1, |f| f.as_raw_fd())
    }
    fn do_read(&self) -> Result<(), Failure> {
        self.reads.set(self.reads.get() + 1);
        if self.panic_on_read {
            panic!("do_read exploded");
        }
        let mut buf = [0u8; 256];
        let n = match self.fd.borrow().as_ref() {
            Some(fd) => rustix::io::read(fd, &mut buf).unwrap_or(1),
            None => 1,
        };
        self.stop();
        if n == 0 {
            return Err(Failure::new(Error::ConnectionDone));
        }
        Ok(())
    }
    fn do_write(&self) -> Result<(), Failure> {
        self.writes.set(self.writes.get() + 1);
        self.stop();
        Ok(())
    }
    fn connection_lost(&self, reason: Failure) {
        self.lost.borrow_mut().push(reason.to_string());
        self.stop();
    }
    fn half_closeable(&self) -> bool {
        self.half_closeable
    }
    fn read_connection_lost(&self, reason: Failure) {
        self.half_closed.borrow_mut().push(reason.to_string());
        self.stop();
    }
}

fn same(a: &Rc<dyn FileDescriptor>, b: &Rc<Probe>) -> bool {
    std::ptr::addr_eq(Rc::as_ptr(a), Rc::as_ptr(b))
}

reactor_test! {
    /// §4.5.1: do_read runs when the fd is readable.
    fn add_reader(r) {
        let (rd, wr) = pipe();
        let p = Probe::stopping(rd, &r);
        r.add_reader(p.clone()).unwrap();
        write_byte(&wr);
        run_reactor(&r);
        assert!(p.reads.get() >= 1);
    }
}

reactor_test! {
    /// §4.5.2: after remove_reader no more read callbacks.
    fn remove_reader(r) {
        let (rd, wr) = pipe();
        let p = Probe::new(rd);
        r.add_reader(p.clone()).unwrap();
        r.remove_reader(&p);
        write_byte(&wr);
        let rr = r.clone();
        r.call_later(Duration::from_millis(20), move || rr.stop().unwrap());
        run_reactor(&r);
        assert_eq!(p.reads.get(), 0);
    }
}

reactor_test! {
    /// §4.5.3: do_write runs when the fd is writable.
    fn add_writer(r) {
        let (_rd, wr) = pipe();
        let p = Probe::stopping(wr, &r);
        r.add_writer(p.clone()).unwrap();
        run_reactor(&r);
        assert!(p.writes.get() >= 1);
    }
}

reactor_test! {
    /// §4.5.5: after remove_writer no more write callbacks.
    fn remove_writer(r) {
        let (_rd, wr) = pipe();
        let p = Probe::new(wr);
        r.add_writer(p.clone()).unwrap();
        r.remove_writer(&p);
        let rr = r.clone();
        r.call_later(Duration::from_millis(20), move || rr.stop().unwrap());
        run_reactor(&r);
        assert_eq!(p.writes.get(), 0);
    }
}

reactor_test! {
    /// §4.5.4 and §4.5.6: get_readers / get_writers reflect adds and removes.
    fn get_readers_and_writers(r) {
        let (rd, wr) = pipe();
        let a = Probe::new(rd);
        let b = Probe::new(wr);
        r.add_reader(a.clone()).unwrap();
        r.add_writer(b.clone()).unwrap();
        let readers = r.get_readers();
        let writers = r.get_writers();
        assert!(readers.len() == 1 && same(&readers[0], &a));
        assert!(writers.len() == 1 && same(&writers[0], &b));
        r.remove_reader(&a);
        r.remove_writer(&b);
        assert!(r.get_readers().is_empty() && r.get_writers().is_empty());
    }
}

reactor_test! {
    /// §4.5.7: remove_all returns every user descriptor once, and leaves the
    /// reactor's own waker alone (calls from threads still wake it).
    fn remove_all(r) {
        let (rd, wr) = pipe();
        let (rd2, _wr2) = pipe();
        let both = Probe::new(rd);
        let reader = Probe::new(rd2);
        let writer = Probe::new(wr);
        r.add_reader(both.clone()).unwrap();
        r.add_writer(both.clone()).unwrap();
        r.add_reader(reader.clone()).unwrap();
        r.add_writer(writer.clone()).unwrap();
        let removed = r.remove_all();
        assert_eq!(removed.len(), 3);
        for p in [&both, &reader, &writer] {
            assert!(removed.iter().any(|d| same(d, p)));
        }
        assert!(r.get_readers().is_empty() && r.get_writers().is_empty());
        let remote = r.remote();
        std::thread::spawn(move || remote.call_from_thread(|r| r.stop().unwrap()).unwrap());
        run_reactor(&r);
    }
}

reactor_test! {
    /// §4.5.8: once removed, the reactor never asks for the fd again.
    fn removed_descriptor_is_not_asked_for_its_fd(r) {
        let (rd, wr) = pipe();
        let p = Probe::new(rd);
        r.add_reader(p.clone()).unwrap();
        r.remove_reader(&p);
        let asked = p.fileno_calls.get();
        write_byte(&wr);
        let rr = r.clone();
        r.call_later(Duration::from_millis(10), move || rr.stop().unwrap());
        run_reactor(&r);
        let _ = r.get_readers();
        assert_eq!(p.fileno_calls.get(), asked);
    }
}

reactor_test! {
    /// A negative fd is refused with a clear error.
    fn negative_fd_is_refused(r) {
        let p = Rc::new(Probe::default());
        assert!(matches!(r.add_reader(p.clone()), Err(Error::BadDescriptor(-1))));
        assert!(matches!(r.add_writer(p), Err(Error::BadDescriptor(-1))));
    }
}

reactor_test! {
    /// §4.5.9: a descriptor whose fd turns into -1 is dropped with
    /// FdWentAway, not spun on.
    fn negative_one_fileno_is_dropped(r) {
        let (rd, wr) = pipe();
        let p = Probe::stopping(rd, &r);
        r.add_reader(p.clone()).unwrap();
        // The object forgets its fd, but the fd stays open and readable.
        let kept = p.fd.borrow_mut().take().unwrap();
        write_byte(&wr);
        run_reactor(&r);
        assert_eq!(p.reads.get(), 0);
        assert_eq!(*p.lost.borrow(), ["file descriptor went away"]);
        assert!(r.get_readers().is_empty());
        drop(kept);
    }
}

reactor_test! {
    /// §4.5.10: closing the fd behind a registered descriptor does not make
    /// the loop spin or fail; the descriptor is dropped or simply silent.
    fn closed_fd_is_not_spun_on(r) {
        let (rd, wr) = pipe();
        let p = Probe::new(rd);
        r.add_reader(p.clone()).unwrap();
        write_byte(&wr);
        drop(p.fd.borrow_mut().take());
        let rr = r.clone();
        r.call_later(Duration::from_millis(100), move || rr.stop().unwrap());
        run_reactor(&r);
        assert_eq!(p.reads.get(), 0);
        assert!(r.iterations() < 50, "{} iterations: the loop spun", r.iterations());
    }
}

reactor_test! {
    /// §4.5.11: descriptors still registered at stop() get connection_lost.
    fn connection_lost_on_shutdown(r) {
        let (rd, _wr) = pipe();
        let p = Probe::new(rd);
        r.add_reader(p.clone()).unwrap();
        let rr = r.clone();
        r.call_later(Duration::ZERO, move || rr.stop().unwrap());
        run_reactor(&r);
        assert_eq!(*p.lost.borrow(), ["connection was lost"]);
    }
}

reactor_test! {
    /// End of stream on a reader: connection_lost(ConnectionDone); a
    /// half-closeable one gets read_connection_lost and stays a writer.
    fn end_of_stream_and_half_close(r) {
        let (a, a_peer) = rustix::net::socketpair(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::STREAM,
            rustix::net::SocketFlags::CLOEXEC | rustix::net::SocketFlags::NONBLOCK,
            None,
        ).unwrap();
        let (rd, wr) = pipe();
        let plain = Probe::stopping(rd, &r);
        r.add_reader(plain.clone()).unwrap();
        drop(wr);
        run_reactor(&r);
        assert_eq!(*plain.lost.borrow(), ["connection was closed cleanly"]);

        let r2 = common::build(r.backend());
        let half = Rc::new(Probe { fd: RefCell::new(Some(a)), half_closeable: true, ..Default::default() });
        *half.stop_on.borrow_mut() = Some(r2.clone());
        r2.add_reader(half.clone()).unwrap();
        r2.add_writer(half.clone()).unwrap();
        r2.remove_writer(&half);
        rustix::net::shutdown(&a_peer, rustix::net::Shutdown::Write).unwrap();
        run_reactor(&r2);
        assert_eq!(*half.half_closed.borrow(), ["connection was closed cleanly"]);
        assert!(half.lost.borrow().is_empty());
        assert!(r2.get_readers().is_empty());
        // Still usable for writing after the read side ended.
        r2.add_writer(half.clone()).unwrap();
        assert_eq!(r2.get_writers().len(), 1);
    }
}

reactor_test! {
    /// A panic in do_read is logged with the descriptor's name and
    /// disconnects that descriptor; the loop goes on.
    fn panic_in_do_read_disconnects_and_logs(r) {
        let (rd, wr) = pipe();
        let p = Rc::new(Probe { fd: RefCell::new(Some(rd)), panic_on_read: true, ..Default::default() });
        r.add_reader(p.clone()).unwrap();
        write_byte(&wr);
        let rr = r.clone();
        r.call_later(Duration::from_millis(50), move || rr.stop().unwrap());
        let ((), logs) = capture_logs(|| run_reactor(&r));
        assert_eq!(p.reads.get(), 1);
        assert_eq!(p.lost.borrow().len(), 1);
        assert!(p.lost.borrow()[0].contains("do_read exploded"));
        assert!(logs.contains("in do_read of fd") && logs.contains("do_read exploded"), "{logs}");
    }
}

reactor_test! {
    /// select refuses fds at or above FD_SETSIZE with a clear error; poll
    /// and epoll watch them.
    fn large_fd_numbers(r) {
        // The soft limit is raised to the hard limit; fd 1500 must fit.
        let limit = common::set_fd_limit(u64::MAX);
        assert!(limit > 1500, "RLIMIT_NOFILE hard limit {limit} is too low: this test needs fd 1500");
        let (rd, wr) = pipe();
        let big = rustix::io::fcntl_dupfd_cloexec(&rd, 1500).unwrap();
        drop(rd);
        let p = Probe::stopping(big, &r);
        let added = r.add_reader(p.clone());
        if r.backend() == Backend::Select {
            let err = added.unwrap_err();
            assert!(matches!(err, Error::DescriptorTooLarge { limit: 1024, .. }), "{err}");
            assert!(err.to_string().contains("select"));
            return;
        }
        added.unwrap();
        write_byte(&wr);
        run_reactor(&r);
        assert_eq!(p.reads.get(), 1);
    }
}

#[test]
fn tens_of_thousands_of_descriptors() {
    // 9,000 pipes = 18,000 descriptors on poll and epoll (select is capped
    // at FD_SETSIZE, checked above). In a child process: that many fds
    // would push concurrent tests' descriptors past FD_SETSIZE.
    const PIPES: usize = 9_000;
    if !common::is_child() {
        for backend in ["poll", "epoll", "io_uring"] {
            let out = common::in_child("tens_of_thousands_of_descriptors", backend);
            assert!(out.contains("all 9000 pipes read once"), "{out}");
        }
        return;
    }
    let backend: Backend = std::env::var(common::CHILD_ENV).unwrap().parse().unwrap();
    let limit = common::set_fd_limit(u64::MAX);
    assert!(limit >= (PIPES as u64) * 2 + 50, "RLIMIT_NOFILE hard limit {limit} is too low for this test");
    let r = common::build(backend);
    let mut writers = Vec::with_capacity(PIPES);
    let mut probes = Vec::with_capacity(PIPES);
    for _ in 0..PIPES {
        let (rd, wr) = pipe();
        let p = Probe::new(rd);
        r.add_reader(p.clone()).unwrap();
        writers.push(wr);
        probes.push(p);
    }
    for w in &writers {
        write_byte(w);
    }
    let deadline = std::time::Instant::now() + common::WATCHDOG;
    while probes.iter().any(|p| p.reads.get() == 0) && std::time::Instant::now() < deadline {
        r.iterate(Some(Duration::from_millis(100))).unwrap();
    }
    assert!(probes.iter().all(|p| p.reads.get() == 1), "{backend}: every pipe read exactly once");
    assert_eq!(r.remove_all().len(), PIPES);
    println!("all {PIPES} pipes read once");
}
