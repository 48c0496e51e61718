//! Shared test harness: build a fresh reactor per backend (Twisted's
//! ReactorBuilder), run it with a watchdog, capture log lines.
#![allow(dead_code)]

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use braid::{Backend, Reactor};

/// Writes a test once and runs it on every backend: `name::select`,
/// `name::poll`, `name::epoll`.
#[macro_export]
macro_rules! reactor_test {
    ($(#[$meta:meta])* fn $name:ident($r:ident) $body:block) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            $(#[$meta])*
            fn body($r: braid::Reactor) $body
            #[test]
            fn select() {
                body($crate::common::build(braid::Backend::Select))
            }
            #[test]
            fn poll() {
                body($crate::common::build(braid::Backend::Poll))
            }
            #[test]
            fn epoll() {
                body($crate::common::build(braid::Backend::Epoll))
            }
            #[test]
            fn io_uring() {
                body($crate::common::build(braid::Backend::IoUring))
            }
        }
    };
}

/// A fresh, uninstalled reactor.
pub fn build(backend: Backend) -> Reactor {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    Reactor::new(backend).unwrap_or_else(|e| panic!("building {backend}: {e}"))
}

/// Generous: machines are shared and slow; a test that needs this long has
/// hung, not merely run slowly.
pub const WATCHDOG: Duration = Duration::from_secs(20);

/// Runs the reactor (without signal handlers) until it stops; fails the
/// test if the watchdog had to stop it.
pub fn run_reactor(r: &Reactor) {
    let fired = std::rc::Rc::new(std::cell::Cell::new(false));
    let (f, rr) = (fired.clone(), r.clone());
    let watchdog = r.call_later(WATCHDOG, move || {
        f.set(true);
        let _ = rr.stop();
    });
    r.run_without_signal_handlers().expect("run");
    let _ = watchdog.cancel();
    assert!(!fired.get(), "watchdog fired: the reactor did not stop by itself");
}

/// Collects everything logged on this thread while `f` runs.
pub fn capture_logs<T>(f: impl FnOnce() -> T) -> (T, String) {
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buf = Buf::default();
    let writer = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .finish();
    let out = tracing::subscriber::with_default(subscriber, f);
    let text = String::from_utf8_lossy(&buf.0.lock().unwrap()).into_owned();
    (out, text)
}

/// A non-blocking pipe: (read end, write end).
pub fn pipe() -> (OwnedFd, OwnedFd) {
    use rustix::pipe::{pipe_with, PipeFlags};
    pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK).expect("pipe")
}

pub fn write_byte(fd: &OwnedFd) {
    rustix::io::write(fd, b"x").expect("write");
}

pub fn raw(fd: &OwnedFd) -> RawFd {
    fd.as_raw_fd()
}

/// Set in a child test process started by [`in_child`].
pub const CHILD_ENV: &str = "BRAID_TEST_CHILD";

/// True in the child process of [`in_child`].
pub fn is_child() -> bool {
    std::env::var_os(CHILD_ENV).is_some()
}

/// Runs the test `name` (its full path in this test binary) again in a
/// fresh process with [`CHILD_ENV`] set to `arg`, for tests that change
/// process-wide state (descriptor limits, thousands of open fds). Returns
/// the child's stdout; fails if the child fails or runs no test.
pub fn in_child(name: &str, arg: &str) -> String {
    let exe = std::env::current_exe().expect("current_exe");
    let out = std::process::Command::new(exe)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, arg)
        .output()
        .expect("starting the child test process");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "child {name} failed: {}\n{stdout}\n{stderr}", out.status);
    assert!(stdout.contains("1 passed"), "child {name} ran no test:\n{stdout}");
    stdout
}

/// Sets the soft descriptor limit (as far as the hard limit allows) and
/// returns the soft limit in force.
pub fn set_fd_limit(want: u64) -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let lim = getrlimit(Resource::Nofile);
    let max = lim.maximum.unwrap_or(u64::MAX);
    let _ = setrlimit(Resource::Nofile, Rlimit { current: Some(want.min(max)), maximum: lim.maximum });
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// Records the final result of a Deferred (failures as text) and handles
/// it, so a test can look at it after the reactor ran.
pub fn collect<T: 'static>(
    d: &braid::Deferred<T>,
) -> std::rc::Rc<std::cell::RefCell<Option<Result<T, String>>>> {
    let out = std::rc::Rc::new(std::cell::RefCell::new(None));
    let o = out.clone();
    let _sink: braid::Deferred<()> = d.then(move |r| {
        *o.borrow_mut() = Some(r.map_err(|f| f.to_string()));
        Ok(())
    });
    out
}

/// Sends `msg` through the client `connect` makes (on another thread, so
/// the reactor can run here), reads as many bytes back, then stops the
/// reactor; returns what came back. For echo tests over std sockets.
pub fn echo_via<S: std::io::Read + std::io::Write + 'static>(
    r: &Reactor,
    connect: impl FnOnce() -> S + Send + 'static,
    msg: &'static [u8],
) -> Vec<u8> {
    let remote = r.remote();
    let client = std::thread::spawn(move || {
        let mut s = connect();
        s.write_all(msg).unwrap();
        let mut back = vec![0u8; msg.len()];
        let got = s.read_exact(&mut back).map(|()| back);
        let _ = remote.call_from_thread(|r| {
            let _ = r.stop();
        });
        got.expect("no echo")
    });
    run_reactor(r);
    client.join().expect("client")
}
