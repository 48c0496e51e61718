//! Behaviour every readiness backend must show, written once and run from
//! each backend's own `tests` module against real pipes and socketpairs.
//!
//! Two things about the test process shape these helpers:
//!
//! * Unit tests run on many threads of one process, so they share one
//!   descriptor table. A test that closes a registered descriptor and then
//!   expects its number to stay closed moves it to a high number first and
//!   holds [`fd_numbers`] while it does, so no other test of ours can be
//!   handed that number in between.
//! * The many-descriptor tests open more than 20,000 descriptors. Done in the
//!   shared process, every other test would get descriptor numbers above
//!   `FD_SETSIZE` and select-based tests would fail, so they run in a child
//!   copy of the test binary ([`run_in_child`]).

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rustix::net::{AddressFamily, SocketFlags, SocketType};
use rustix::pipe::PipeFlags;
use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

use super::{Event, Interest, Poller};

pub(crate) const NONE: Interest = Interest::NONE;
pub(crate) const READ: Interest = Interest { read: true, write: false };
pub(crate) const WRITE: Interest = Interest { read: false, write: true };
pub(crate) const BOTH: Interest = Interest { read: true, write: true };

/// Long enough that a ready descriptor is always seen on a loaded machine.
const PATIENCE: Duration = Duration::from_secs(5);

/// Set in the environment of a child started by [`run_in_child`].
pub(crate) const CHILD_ENV: &str = "BRAID_BACKEND_TEST_CHILD";

/// Where tests park a descriptor they are about to close (below FD_SETSIZE,
/// far above what the other tests of this process normally use).
pub(crate) const HIGH_FD: RawFd = 900;

/// Serialises the tests that depend on a particular descriptor number
/// staying free (see the module docs).
pub(crate) fn fd_numbers() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub(crate) fn pipe() -> (OwnedFd, OwnedFd) {
    rustix::pipe::pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK).expect("pipe2")
}

pub(crate) fn socketpair() -> (OwnedFd, OwnedFd) {
    rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )
    .expect("socketpair")
}

pub(crate) fn raw(fd: &OwnedFd) -> RawFd {
    fd.as_raw_fd()
}

pub(crate) fn write_byte(fd: impl AsFd) {
    assert_eq!(rustix::io::write(fd, b"x").expect("write"), 1);
}

/// Moves `fd` to the lowest free number at or above `min`.
pub(crate) fn dup_at_least(fd: &OwnedFd, min: RawFd) -> OwnedFd {
    raise_nofile(min as u64 + 64);
    rustix::io::fcntl_dupfd_cloexec(fd, min).expect("F_DUPFD_CLOEXEC")
}

/// One wait; returns what the backend reported.
pub(crate) fn poll_once<P: Poller>(p: &mut P, timeout: Option<Duration>) -> Vec<Event> {
    let mut events = Vec::new();
    p.poll(&mut events, timeout).expect("poll failed");
    events
}

/// The single event for `fd` in `events`; fails if the backend reported the
/// same descriptor twice in one wait.
pub(crate) fn event_for(events: &[Event], fd: RawFd) -> Option<Event> {
    let mut found = events.iter().filter(|e| e.fd == fd);
    let first = found.next().copied();
    assert!(found.next().is_none(), "fd {fd} reported twice in one wait: {events:?}");
    first
}

/// Waits (up to [`PATIENCE`]) until the backend reports `fd`.
pub(crate) fn wait_for<P: Poller>(p: &mut P, fd: RawFd) -> Event {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let events = poll_once(p, Some(left));
        if let Some(ev) = event_for(&events, fd) {
            return ev;
        }
        assert!(Instant::now() < deadline, "fd {fd} never reported (last wait: {events:?})");
    }
}

/// Asserts that an immediate wait reports nothing about `fd`.
pub(crate) fn assert_not_reported<P: Poller>(p: &mut P, fd: RawFd) {
    let events = poll_once(p, Some(Duration::ZERO));
    assert_eq!(event_for(&events, fd), None, "fd {fd} unexpectedly reported");
}

/// Raises the soft RLIMIT_NOFILE to at least `needed`, raising the hard
/// limit too when the process may (root). Returns false if it cannot.
pub(crate) fn raise_nofile(needed: u64) -> bool {
    let lim = getrlimit(Resource::Nofile);
    let soft = lim.current.unwrap_or(u64::MAX);
    if soft >= needed {
        return true;
    }
    let hard = lim.maximum.unwrap_or(u64::MAX);
    if hard >= needed {
        return setrlimit(
            Resource::Nofile,
            Rlimit { current: Some(hard.min(needed.max(soft))), maximum: lim.maximum },
        )
        .is_ok();
    }
    // Only a privileged process may raise the hard limit; try, then settle
    // for the hard limit as it is.
    let raised = Rlimit { current: Some(needed), maximum: Some(needed) };
    if setrlimit(Resource::Nofile, raised).is_ok() {
        return true;
    }
    let _ = setrlimit(Resource::Nofile, Rlimit { current: lim.maximum, maximum: lim.maximum });
    false
}

/// True inside the child process started by [`run_in_child`].
pub(crate) fn in_child() -> bool {
    std::env::var_os(CHILD_ENV).is_some()
}

/// Runs the test `name` (its path inside the crate, e.g.
/// `backend::epoll::tests::handles_20000_descriptors`) again in a fresh copy
/// of this test binary, where [`in_child`] is true, and fails if it fails or
/// does not run.
pub(crate) fn run_in_child(name: &str) {
    let exe = std::env::current_exe().expect("current_exe");
    let out = Command::new(exe)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .output()
        .expect("starting the child test process");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprint!("{stderr}");
    assert!(out.status.success(), "child test {name} failed: {}\n{stdout}\n{stderr}", out.status);
    assert!(stdout.contains("1 passed"), "child test {name} did not run:\n{stdout}");
}

// ---------------------------------------------------------------------------
// The shared behaviour.

pub(crate) fn not_readable_before_write<P: Poller>(mut p: P) {
    let (r, _w) = pipe();
    p.update(raw(&r), NONE, READ).unwrap();
    assert_not_reported(&mut p, raw(&r));
}

pub(crate) fn readable_after_write<P: Poller>(mut p: P) {
    let (r, w) = pipe();
    p.update(raw(&r), NONE, READ).unwrap();
    write_byte(&w);
    let ev = wait_for(&mut p, raw(&r));
    assert!(ev.readable, "{ev:?}");
    assert!(!ev.writable && !ev.invalid && !ev.error, "{ev:?}");

    // Level-triggered: still reported while the byte is unread...
    let again = wait_for(&mut p, raw(&r));
    assert!(again.readable, "{again:?}");
    // ...and no longer once it has been read.
    let mut buf = [0u8; 8];
    assert_eq!(rustix::io::read(&r, &mut buf).unwrap(), 1);
    assert_not_reported(&mut p, raw(&r));
}

pub(crate) fn reports_only_ready_descriptors<P: Poller>(mut p: P) {
    let pipes: Vec<_> = (0..3).map(|_| pipe()).collect();
    for (r, _) in &pipes {
        p.update(raw(r), NONE, READ).unwrap();
    }
    write_byte(&pipes[1].1);
    let ready = raw(&pipes[1].0);
    wait_for(&mut p, ready);
    let events = poll_once(&mut p, Some(Duration::ZERO));
    let fds: Vec<RawFd> = events.iter().map(|e| e.fd).collect();
    assert_eq!(fds, vec![ready], "{events:?}");
}

pub(crate) fn write_end_is_writable<P: Poller>(mut p: P) {
    let (_r, w) = pipe();
    p.update(raw(&w), NONE, WRITE).unwrap();
    let ev = wait_for(&mut p, raw(&w));
    assert!(ev.writable && !ev.readable && !ev.invalid, "{ev:?}");
}

/// Writability follows the space in the pipe: a full pipe is not reported,
/// and it is again once drained.
pub(crate) fn writable_follows_buffer_space<P: Poller>(mut p: P) {
    let (r, w) = pipe();
    let chunk = [7u8; 4096];
    loop {
        match rustix::io::write(&w, &chunk) {
            Ok(_) => continue,
            Err(rustix::io::Errno::AGAIN) => break,
            Err(e) => panic!("filling the pipe: {e}"),
        }
    }
    p.update(raw(&w), NONE, WRITE).unwrap();
    assert_not_reported(&mut p, raw(&w));
    let mut buf = [0u8; 4096];
    loop {
        match rustix::io::read(&r, &mut buf) {
            Ok(_) => continue,
            Err(rustix::io::Errno::AGAIN) => break,
            Err(e) => panic!("draining the pipe: {e}"),
        }
    }
    let ev = wait_for(&mut p, raw(&w));
    assert!(ev.writable, "{ev:?}");
}

pub(crate) fn modify_interest<P: Poller>(mut p: P) {
    let (a, b) = socketpair();
    let fd = raw(&a);

    p.update(fd, NONE, READ).unwrap();
    // Writable, but only reading was asked for, and there is nothing to read.
    assert_not_reported(&mut p, fd);

    p.update(fd, READ, WRITE).unwrap();
    let ev = wait_for(&mut p, fd);
    assert!(ev.writable && !ev.readable, "{ev:?}");

    write_byte(&b);
    // Data is waiting, but reading is no longer asked for.
    let ev = wait_for(&mut p, fd);
    assert!(ev.writable && !ev.readable, "{ev:?}");

    p.update(fd, WRITE, BOTH).unwrap();
    let ev = wait_for(&mut p, fd);
    assert!(ev.writable && ev.readable, "{ev:?}");

    p.update(fd, BOTH, READ).unwrap();
    let ev = wait_for(&mut p, fd);
    assert!(!ev.writable && ev.readable, "{ev:?}");

    p.update(fd, READ, NONE).unwrap();
    assert_not_reported(&mut p, fd);
}

pub(crate) fn remove_stops_events<P: Poller>(mut p: P) {
    let (r, w) = pipe();
    let (r2, w2) = pipe();
    p.update(raw(&r), NONE, READ).unwrap();
    p.update(raw(&r2), NONE, READ).unwrap();
    write_byte(&w);
    write_byte(&w2);
    wait_for(&mut p, raw(&r));

    p.update(raw(&r), READ, NONE).unwrap();
    // The other descriptor is unaffected by the removal.
    let events = poll_once(&mut p, Some(Duration::from_millis(50)));
    assert_eq!(event_for(&events, raw(&r)), None, "{events:?}");
    assert!(event_for(&events, raw(&r2)).is_some_and(|e| e.readable), "{events:?}");

    p.update(raw(&r2), READ, NONE).unwrap();
    let events = poll_once(&mut p, Some(Duration::from_millis(50)));
    assert!(events.is_empty(), "{events:?}");

    // Registering again works and sees the unread byte.
    p.update(raw(&r), NONE, READ).unwrap();
    assert!(wait_for(&mut p, raw(&r)).readable);
}

pub(crate) fn zero_timeout_returns_promptly<P: Poller>(mut p: P) {
    // With nothing registered at all...
    let start = Instant::now();
    assert!(poll_once(&mut p, Some(Duration::ZERO)).is_empty());
    // ...and with a registered descriptor that is not ready.
    let (r, _w) = pipe();
    p.update(raw(&r), NONE, READ).unwrap();
    assert!(poll_once(&mut p, Some(Duration::ZERO)).is_empty());
    let took = start.elapsed();
    assert!(took < Duration::from_millis(500), "Some(0) blocked for {took:?}");
}

pub(crate) fn timeout_is_honoured<P: Poller>(mut p: P) {
    let (r, _w) = pipe();
    p.update(raw(&r), NONE, READ).unwrap();
    let start = Instant::now();
    let events = poll_once(&mut p, Some(Duration::from_millis(60)));
    let took = start.elapsed();
    assert!(events.is_empty(), "{events:?}");
    assert!(took >= Duration::from_millis(55), "returned early after {took:?}");
    assert!(took < Duration::from_secs(5), "overslept: {took:?}");
}

/// A timeout with a fraction of a millisecond is never cut short (rounded
/// down), whatever precision the backend has.
pub(crate) fn fractional_timeout_is_not_cut_short<P: Poller>(mut p: P) {
    let (r, _w) = pipe();
    p.update(raw(&r), NONE, READ).unwrap();
    for asked in [Duration::from_micros(300), Duration::from_micros(1_700)] {
        let start = Instant::now();
        let events = poll_once(&mut p, Some(asked));
        let took = start.elapsed();
        assert!(events.is_empty(), "{events:?}");
        assert!(took >= asked, "asked for {asked:?}, returned after {took:?}");
        assert!(took < Duration::from_secs(5), "overslept: {took:?}");
    }
}

/// `None` blocks until something is ready, however long that takes.
pub(crate) fn no_timeout_blocks_until_ready<P: Poller>(mut p: P) {
    let (r, w) = pipe();
    p.update(raw(&r), NONE, READ).unwrap();
    let start = Instant::now();
    let writer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        write_byte(&w);
        w
    });
    let ev = loop {
        // An EINTR wakes with no events; wait again.
        let events = poll_once(&mut p, None);
        if let Some(ev) = event_for(&events, raw(&r)) {
            break ev;
        }
    };
    assert!(ev.readable, "{ev:?}");
    assert!(start.elapsed() >= Duration::from_millis(90), "woke before the write");
    drop(writer.join().unwrap());
}

/// When the write end closes, the read end is reported (readable or hangup)
/// so the reactor reads and sees EOF. `hangup_flag`: the backend can tell
/// hangups apart (poll, epoll; select cannot).
pub(crate) fn hangup_when_writer_closes<P: Poller>(mut p: P, hangup_flag: bool) {
    let (r, w) = pipe();
    p.update(raw(&r), NONE, READ).unwrap();
    write_byte(&w);
    drop(w);

    let ev = wait_for(&mut p, raw(&r));
    assert!(ev.readable, "unread data must be readable: {ev:?}");
    assert_eq!(ev.hangup, hangup_flag, "{ev:?}");
    let mut buf = [0u8; 8];
    assert_eq!(rustix::io::read(&r, &mut buf).unwrap(), 1);

    // Drained: still reported, so the EOF gets read.
    let ev = wait_for(&mut p, raw(&r));
    assert!(ev.readable || ev.hangup, "{ev:?}");
    assert_eq!(ev.hangup, hangup_flag, "{ev:?}");
    assert!(!ev.invalid, "{ev:?}");
    assert_eq!(rustix::io::read(&r, &mut buf).unwrap(), 0, "expected EOF");

    // The same for a socket whose peer goes away.
    let (a, b) = socketpair();
    p.update(raw(&a), NONE, READ).unwrap();
    drop(b);
    let ev = wait_for(&mut p, raw(&a));
    assert!(ev.readable || ev.hangup, "{ev:?}");
    assert_eq!(rustix::io::read(&a, &mut buf).unwrap(), 0, "expected EOF");
}

/// Negative descriptors are refused with InvalidInput, never a panic.
pub(crate) fn negative_fd_is_invalid_input<P: Poller>(mut p: P) {
    for fd in [-1, RawFd::MIN] {
        let err = p.update(fd, NONE, READ).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{err}");
    }
    // And the poller still works afterwards.
    assert!(poll_once(&mut p, Some(Duration::ZERO)).is_empty());
}

/// Registers a pipe read end moved to [`HIGH_FD`]-ish, makes it readable,
/// closes it, and returns its number (with the [`fd_numbers`] guard held by
/// the caller). The write end is returned so the pipe stays half open.
fn register_then_close<P: Poller>(p: &mut P) -> (RawFd, OwnedFd) {
    let (r, w) = pipe();
    let high = dup_at_least(&r, HIGH_FD);
    drop(r);
    let fd = raw(&high);
    p.update(fd, NONE, READ).unwrap();
    write_byte(&w);
    drop(high);
    (fd, w)
}

/// poll and select: a registered descriptor closed behind the backend's back
/// is reported once as invalid, then forgotten, so the loop does not spin.
pub(crate) fn closed_fd_reported_invalid<P: Poller>(mut p: P) {
    let _numbers = fd_numbers();
    let (other_r, other_w) = pipe();
    p.update(raw(&other_r), NONE, READ).unwrap();
    let (fd, _w) = register_then_close(&mut p);

    let ev = wait_for(&mut p, fd);
    assert!(ev.invalid && ev.error, "{ev:?}");
    assert!(!ev.readable && !ev.writable, "{ev:?}");

    // No spinning: the next wait sleeps for its whole timeout.
    let start = Instant::now();
    let events = poll_once(&mut p, Some(Duration::from_millis(60)));
    assert!(events.is_empty(), "{events:?}");
    assert!(start.elapsed() >= Duration::from_millis(55), "spun: {:?}", start.elapsed());

    // The other descriptor still works, and the reactor may remove the dead
    // one without an error.
    write_byte(&other_w);
    assert!(wait_for(&mut p, raw(&other_r)).readable);
    p.update(fd, READ, NONE).unwrap();
}

/// epoll: the kernel drops a closed descriptor by itself; nothing is
/// reported, the wait does not fail or spin, and removing it is not an error.
pub(crate) fn closed_fd_silently_dropped<P: Poller>(mut p: P) {
    let _numbers = fd_numbers();
    let (fd, _w) = register_then_close(&mut p);
    let start = Instant::now();
    let events = poll_once(&mut p, Some(Duration::from_millis(60)));
    assert!(events.is_empty(), "{events:?}");
    assert!(start.elapsed() >= Duration::from_millis(55), "spun: {:?}", start.elapsed());
    p.update(fd, READ, NONE).unwrap();
}

/// Registers `wanted` pipes' read ends for reading and write ends for
/// writing (2 × `wanted` descriptors), checks that only the write ends are
/// ready, writes one byte to each pipe and checks that every descriptor is
/// reported. Meant to run in a child process ([`run_in_child`]).
///
/// If RLIMIT_NOFILE cannot be raised far enough, it uses as many pipes as the
/// hard limit allows (saying so), and skips only below 1,000 pipes.
pub(crate) fn many_descriptors<P: Poller>(mut p: P, wanted: usize) {
    const SPARE: u64 = 16;
    let needed = 2 * wanted as u64 + SPARE;
    let pipes = if raise_nofile(needed) {
        wanted
    } else {
        let limit = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
        let open = std::fs::read_dir("/proc/self/fd").map_or(64, |d| d.count() as u64);
        let fit = (limit.saturating_sub(open + SPARE) / 2) as usize;
        if fit < 1_000 {
            eprintln!(
                "SKIPPED many_descriptors: needs RLIMIT_NOFILE >= {needed}, the hard limit is \
                 {limit} and cannot be raised"
            );
            return;
        }
        eprintln!(
            "NOTE many_descriptors: RLIMIT_NOFILE hard limit {limit} < {needed} and cannot be \
             raised; using {fit} pipes ({} descriptors) instead of {wanted}",
            2 * fit
        );
        fit
    };
    let all: Vec<(OwnedFd, OwnedFd)> = (0..pipes).map(|_| pipe()).collect();
    // fd -> true for a read end, false for a write end.
    let kind: HashMap<RawFd, bool> =
        all.iter().flat_map(|(r, w)| [(raw(r), true), (raw(w), false)]).collect();
    for (r, w) in &all {
        p.update(raw(r), NONE, READ).unwrap();
        p.update(raw(w), NONE, WRITE).unwrap();
    }

    // Before any write, no read end is ready (checked over a few waits,
    // since a backend may hand out a large ready set in parts).
    for _ in 0..8 {
        for ev in poll_once(&mut p, Some(Duration::ZERO)) {
            assert_eq!(kind.get(&ev.fd), Some(&false), "unexpected {ev:?}");
            assert!(ev.writable && !ev.readable, "{ev:?}");
        }
    }

    for (_, w) in &all {
        write_byte(w);
    }
    let mut seen: HashMap<RawFd, bool> = HashMap::with_capacity(2 * pipes);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut events = Vec::new();
    while seen.len() < 2 * pipes {
        assert!(Instant::now() < deadline, "only {} of {} descriptors reported", seen.len(), 2 * pipes);
        events.clear();
        p.poll(&mut events, Some(Duration::from_secs(1))).unwrap();
        for ev in &events {
            let is_read = *kind.get(&ev.fd).unwrap_or_else(|| panic!("unknown {ev:?}"));
            assert!(!ev.invalid && !ev.error, "{ev:?}");
            if is_read {
                assert!(ev.readable && !ev.writable, "{ev:?}");
            } else {
                assert!(ev.writable && !ev.readable, "{ev:?}");
            }
            seen.insert(ev.fd, is_read);
        }
    }
    assert_eq!(seen.values().filter(|&&r| r).count(), pipes);
}

/// One `#[test]` per shared check, for a backend whose poller `$new` builds.
macro_rules! shared_tests {
    ($new:expr) => {
        #[test]
        fn not_readable_before_write() {
            $crate::backend::conformance::not_readable_before_write($new);
        }
        #[test]
        fn readable_after_write() {
            $crate::backend::conformance::readable_after_write($new);
        }
        #[test]
        fn reports_only_ready_descriptors() {
            $crate::backend::conformance::reports_only_ready_descriptors($new);
        }
        #[test]
        fn write_end_is_writable() {
            $crate::backend::conformance::write_end_is_writable($new);
        }
        #[test]
        fn writable_follows_buffer_space() {
            $crate::backend::conformance::writable_follows_buffer_space($new);
        }
        #[test]
        fn modify_interest() {
            $crate::backend::conformance::modify_interest($new);
        }
        #[test]
        fn remove_stops_events() {
            $crate::backend::conformance::remove_stops_events($new);
        }
        #[test]
        fn zero_timeout_returns_promptly() {
            $crate::backend::conformance::zero_timeout_returns_promptly($new);
        }
        #[test]
        fn timeout_is_honoured() {
            $crate::backend::conformance::timeout_is_honoured($new);
        }
        #[test]
        fn fractional_timeout_is_not_cut_short() {
            $crate::backend::conformance::fractional_timeout_is_not_cut_short($new);
        }
        #[test]
        fn no_timeout_blocks_until_ready() {
            $crate::backend::conformance::no_timeout_blocks_until_ready($new);
        }
        #[test]
        fn negative_fd_is_invalid_input() {
            $crate::backend::conformance::negative_fd_is_invalid_input($new);
        }
    };
}
pub(crate) use shared_tests;
