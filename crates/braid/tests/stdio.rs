//! Standard I/O as a connection (Twisted's `StandardIO`, the `stdio:`
//! endpoint; reference §4.13 item 9): over pipes in this process on every
//! backend, and over a child process's real descriptors 0 and 1.

mod common;

use std::cell::RefCell;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::time::{Duration, Instant};

use braid::endpoints::server_from_string;
use braid::protocol::IntoFactory;
use braid::protocols::echo::Echo;
use braid::stdio::{std_io, StdioFds};
use braid::{Address, Error, Failure, HalfCloseable, Producer, Protocol, Reactor, Transport};

fn run_until(r: &Reactor, done: impl Fn() -> bool) {
    let deadline = Instant::now() + common::WATCHDOG;
    while !done() {
        assert!(Instant::now() < deadline, "watchdog: the condition never held");
        r.iterate(Some(Duration::from_millis(5))).expect("iterate");
    }
}

type Log = Rc<RefCell<Vec<String>>>;

fn reason(f: &Failure) -> String {
    match f.braid_error() {
        Some(Error::ConnectionDone) => "done".into(),
        Some(Error::ConnectionLost) => "lost".into(),
        Some(Error::ConnectionAborted) => "aborted".into(),
        _ => format!("other: {f}"),
    }
}

type Hook = Option<Box<dyn FnMut(&Transport)>>;

/// Records events; optionally half-closeable, with hooks.
#[derive(Default)]
struct Rec {
    log: Log,
    data: Rc<RefCell<Vec<u8>>>,
    half: bool,
    echo: bool,
    on_made: Hook,
    on_read_closed: Hook,
    t: Option<Transport>,
}

impl Protocol for Rec {
    fn connection_made(&mut self, t: Transport) {
        self.log.borrow_mut().push("made".into());
        if let Some(f) = self.on_made.as_mut() {
            f(&t);
        }
        self.t = Some(t);
    }
    fn data_received(&mut self, data: &[u8]) {
        self.data.borrow_mut().extend_from_slice(data);
        if self.echo {
            self.t.as_ref().unwrap().write(data);
        }
    }
    fn connection_lost(&mut self, why: Failure) {
        self.log.borrow_mut().push(format!("lost: {}", reason(&why)));
    }
    fn as_half_closeable(&mut self) -> Option<&mut dyn HalfCloseable> {
        if self.half {
            Some(self)
        } else {
            None
        }
    }
}

impl HalfCloseable for Rec {
    fn read_connection_lost(&mut self) {
        self.log.borrow_mut().push("read closed".into());
        if let (Some(f), Some(t)) = (self.on_read_closed.as_mut(), self.t.as_ref()) {
            f(t);
        }
    }
    fn write_connection_lost(&mut self) {
        self.log.borrow_mut().push("write closed".into());
    }
}

/// Pipes standing in for a process's standard I/O: the descriptors for
/// the connection, and our ends (to write its input, read its output).
struct Pipes {
    fds: Option<StdioFds>,
    to_input: Option<std::fs::File>,
    from_output: Option<OwnedFd>,
}

fn pipes() -> Pipes {
    let (in_r, in_w) = common::pipe();
    let (out_r, out_w) = common::pipe();
    rustix::io::ioctl_fionbio(&in_w, false).unwrap();
    Pipes {
        fds: Some(StdioFds { read: in_r, write: out_w }),
        to_input: Some(std::fs::File::from(in_w)),
        from_output: Some(out_r),
    }
}

impl Pipes {
    /// Reads what the output has now; `None` at its end.
    fn read_now(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 65536];
        match rustix::io::read(self.from_output.as_ref().unwrap(), &mut buf) {
            Ok(0) => None,
            Ok(n) => Some(buf[..n].to_vec()),
            Err(rustix::io::Errno::AGAIN) => Some(Vec::new()),
            Err(e) => panic!("reading the output: {e}"),
        }
    }

    /// Runs `r` until the output has given `want` bytes in all.
    fn expect(&self, r: &Reactor, got: &RefCell<Vec<u8>>, want: &[u8]) {
        run_until(r, || {
            if let Some(more) = self.read_now() {
                got.borrow_mut().extend_from_slice(&more);
            }
            got.borrow().len() >= want.len()
        });
        assert_eq!(&*got.borrow(), want);
    }

    /// Runs `r` until the output ends; returns what came before.
    fn until_eof(&self, r: &Reactor) -> Vec<u8> {
        let got = RefCell::new(Vec::new());
        let done = std::cell::Cell::new(false);
        run_until(r, || {
            match self.read_now() {
                Some(more) => got.borrow_mut().extend_from_slice(&more),
                None => done.set(true),
            }
            done.get()
        });
        got.into_inner()
    }
}

// §4.13 item 9: a protocol on a standard I/O transport reads the input and
// writes the output; host and peer are pipe addresses; the input's end
// (for a protocol that takes no half-close) flushes and closes the output,
// then connection_lost(ConnectionDone), once.
reactor_test!(
    fn echo_over_standard_io(r) {
        let mut p = pipes();
        let log = Log::default();
        let t = std_io(&r, Rec { log: log.clone(), echo: true, ..Default::default() }, p.fds.take().unwrap()).unwrap();
        assert_eq!(t.peer(), Address::Pipe);
        assert_eq!(t.host(), Some(Address::Pipe));
        assert!(t.connected());
        p.to_input.as_mut().unwrap().write_all(b"hello, stdio").unwrap();
        let got = RefCell::new(Vec::new());
        p.expect(&r, &got, b"hello, stdio");
        // Sequences and owned buffers go out in order too.
        t.write_sequence(&[b"a", b"b"]);
        t.write_vec(b"c".to_vec());
        p.expect(&r, &got, b"hello, stdioabc");
        drop(p.to_input.take());
        assert!(p.until_eof(&r).is_empty());
        let l = log.clone();
        run_until(&r, move || l.borrow().len() == 2);
        assert_eq!(*log.borrow(), ["made", "lost: done"]);
        assert_eq!(t.host(), None, "no host once lost");
        assert!(!t.connected());
    }
);

// The input's end is a half-close for a protocol that takes one: it may
// still write, and closes when it chooses.
reactor_test!(
    fn input_end_is_a_half_close(r) {
        let mut p = pipes();
        let log = Log::default();
        let proto = Rec {
            log: log.clone(),
            half: true,
            on_read_closed: Some(Box::new(|t: &Transport| {
                t.write(b"goodbye");
                t.lose_connection();
            })),
            ..Default::default()
        };
        let _t = std_io(&r, proto, p.fds.take().unwrap()).unwrap();
        p.to_input.as_mut().unwrap().write_all(b"x").unwrap();
        drop(p.to_input.take());
        assert_eq!(p.until_eof(&r), b"goodbye");
        let l = log.clone();
        run_until(&r, move || l.borrow().len() == 3);
        assert_eq!(*log.borrow(), ["made", "read closed", "lost: done"]);
    }
);

// lose_write_connection closes the output alone (after its bytes):
// write_connection_lost, reading goes on; the input's end then ends it.
reactor_test!(
    fn output_half_close_keeps_reading(r) {
        let mut p = pipes();
        let log = Log::default();
        let data = Rc::new(RefCell::new(Vec::new()));
        let proto = Rec {
            log: log.clone(),
            data: data.clone(),
            half: true,
            on_made: Some(Box::new(|t: &Transport| {
                t.write(b"last words");
                t.lose_write_connection();
            })),
            ..Default::default()
        };
        let t = std_io(&r, proto, p.fds.take().unwrap()).unwrap();
        assert_eq!(p.until_eof(&r), b"last words");
        let l = log.clone();
        run_until(&r, move || l.borrow().len() == 2);
        assert_eq!(*log.borrow(), ["made", "write closed"]);
        assert!(t.connected());
        t.write(b"dropped: the output is closed");
        p.to_input.as_mut().unwrap().write_all(b"still read").unwrap();
        let d = data.clone();
        run_until(&r, move || d.borrow().len() == 10);
        assert_eq!(&*data.borrow(), b"still read");
        drop(p.to_input.take());
        let l = log.clone();
        run_until(&r, move || l.borrow().len() == 4);
        assert_eq!(*log.borrow(), ["made", "write closed", "read closed", "lost: done"]);
    }
);

// lose_connection sends what is buffered, then closes both directions;
// abort drops it and reports ConnectionAborted.
reactor_test!(
    fn lose_and_abort(r) {
        let mut p = pipes();
        let log = Log::default();
        let t = std_io(&r, Rec { log: log.clone(), ..Default::default() }, p.fds.take().unwrap()).unwrap();
        t.write(b"flushed first");
        t.lose_connection();
        assert!(!t.connected());
        assert_eq!(p.until_eof(&r), b"flushed first");
        let l = log.clone();
        run_until(&r, move || l.borrow().len() == 2);
        assert_eq!(*log.borrow(), ["made", "lost: done"]);
        // The input was closed too: writing to it now fails (EPIPE).
        let err = p.to_input.as_mut().unwrap().write_all(b"x").unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::BrokenPipe);

        let mut p = pipes();
        let log = Log::default();
        let t = std_io(&r, Rec { log: log.clone(), ..Default::default() }, p.fds.take().unwrap()).unwrap();
        t.write_vec(vec![7; 1 << 20]);
        t.abort_connection();
        let l = log.clone();
        run_until(&r, move || l.borrow().len() == 2);
        assert_eq!(*log.borrow(), ["made", "lost: aborted"]);
        assert!(p.until_eof(&r).len() < 1 << 20, "an abort sent everything");
    }
);

// The output's reader going away closes everything for a protocol that
// takes no half-close.
reactor_test!(
    fn output_reader_leaving_ends_it(r) {
        let mut p = pipes();
        let log = Log::default();
        let _t = std_io(&r, Rec { log: log.clone(), ..Default::default() }, p.fds.take().unwrap()).unwrap();
        drop(p.from_output.take());
        let l = log.clone();
        run_until(&r, move || l.borrow().len() == 2);
        assert_eq!(*log.borrow(), ["made", "lost: done"]);
    }
);

/// A streaming producer that records being paused and resumed.
#[derive(Default)]
struct Marks(RefCell<Vec<&'static str>>);

impl Producer for Marks {
    fn pause_producing(&self) {
        self.0.borrow_mut().push("pause");
    }
    fn resume_producing(&self) {
        self.0.borrow_mut().push("resume");
    }
    fn stop_producing(&self) {
        self.0.borrow_mut().push("stop");
    }
}

// A producer on the output is paused above the high-water mark and
// resumed once the reader drained it; pausing the transport stops reading
// the input.
reactor_test!(
    fn producers_and_pausing(r) {
        let mut p = pipes();
        let data = Rc::new(RefCell::new(Vec::new()));
        let t = std_io(&r, Rec { data: data.clone(), ..Default::default() }, p.fds.take().unwrap()).unwrap();
        let marks = Rc::new(Marks::default());
        t.set_write_buffer_limits(16 * 1024, 4 * 1024);
        t.register_producer(marks.clone(), true).unwrap();
        t.write_vec(vec![1; 1 << 20]);
        for _ in 0..20 {
            r.iterate(Some(Duration::from_millis(5))).unwrap();
        }
        assert_eq!(*marks.0.borrow(), ["pause"]);
        assert!(t.buffered() > 16 * 1024);
        let got = RefCell::new(Vec::new());
        p.expect(&r, &got, &vec![1; 1 << 20]);
        let m = marks.clone();
        run_until(&r, move || m.0.borrow().len() == 2);
        assert_eq!(*marks.0.borrow(), ["pause", "resume"]);
        t.unregister_producer();

        t.pause_producing();
        p.to_input.as_mut().unwrap().write_all(b"later").unwrap();
        for _ in 0..20 {
            r.iterate(Some(Duration::from_millis(5))).unwrap();
        }
        assert!(data.borrow().is_empty(), "read while paused");
        t.resume_producing();
        let d = data.clone();
        run_until(&r, move || d.borrow().len() == 5);
    }
);

// An output that is not a pipe (a socket here, a terminal for real) is
// readable for other reasons: that must not end it.
reactor_test!(
    fn a_readable_output_that_is_not_a_pipe_stays_open(r) {
        let (in_r, in_w) = common::pipe();
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let log = Log::default();
        let fds = StdioFds { read: in_r, write: OwnedFd::from(ours) };
        let t = std_io(&r, Rec { log: log.clone(), ..Default::default() }, fds).unwrap();
        let mut theirs = theirs;
        // Readable at its end: no bytes left unread (closing a socket with
        // some would reset it).
        theirs.shutdown(std::net::Shutdown::Write).unwrap();
        for _ in 0..20 {
            r.iterate(Some(Duration::from_millis(5))).unwrap();
        }
        assert_eq!(*log.borrow(), ["made"], "the output's readability closed it");
        t.write(b"still writing");
        t.lose_connection();
        let l = log.clone();
        run_until(&r, move || l.borrow().len() == 2);
        theirs.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut got = Vec::new();
        theirs.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"still writing");
        drop(in_w);
    }
);

// A descriptor epoll cannot watch (a regular file) is an error from
// std_io, and the protocol never hears of it.
#[test]
fn an_unpollable_input_is_an_error() {
    let r = common::build(braid::Backend::Epoll);
    let file = std::env::temp_dir().join(format!("braid-stdio-file-{}", std::process::id()));
    std::fs::write(&file, b"a regular file").unwrap();
    let (_out_r, out_w) = common::pipe();
    let fds = StdioFds { read: OwnedFd::from(std::fs::File::open(&file).unwrap()), write: out_w };
    let log = Log::default();
    let err = std_io(&r, Rec { log: log.clone(), ..Default::default() }, fds).map(|_| ()).unwrap_err();
    let err = err.to_string();
    assert!(err.contains("standard I/O: the input cannot be watched"), "{err}");
    assert!(log.borrow().is_empty(), "the protocol heard of it: {:?}", log.borrow());
    let _ = std::fs::remove_file(&file);
}

// §4.13 item 9: the `stdio:` server endpoint builds its protocol for a
// pipe address and connects it to this process's own descriptors 0 and 1,
// with the reactor it was given. Run in a child whose standard I/O are
// pipes to this test.
#[test]
fn stdio_endpoint_in_a_child_process() {
    if common::is_child() {
        let r = common::build(braid::Backend::Epoll);
        let addrs = Rc::new(RefCell::new(Vec::new()));
        let a = addrs.clone();
        struct Recording(Rc<RefCell<Vec<Address>>>);
        impl braid::protocol::Factory for Recording {
            fn build_protocol(&mut self, addr: &Address) -> Option<Box<dyn Protocol>> {
                self.0.borrow_mut().push(addr.clone());
                Some(Box::new(Echo::new()))
            }
        }
        let ep = server_from_string(&r, "stdio:").unwrap();
        assert_eq!(ep.describe(), "stdio:");
        let port = settle(&r, &ep.listen(braid::protocol::SharedFactory::new(Recording(a)).erase()));
        assert_eq!(port.host(), Address::Pipe);
        assert_eq!(*addrs.borrow(), [Address::Pipe]);
        let again = server_from_string(&r, "stdio:").unwrap();
        let err = settle_err(&r, &again.listen(Echo::new.into_shared()));
        assert!(err.contains("in use"), "{err}");
        eprintln!("child: serving stdio");
        // The parent closes our input after its message: Echo then closes.
        run_until(&r, || !port.listening());
        eprintln!("child: stdio closed");
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let mut child = std::process::Command::new(exe)
        .args(["stdio_endpoint_in_a_child_process", "--exact", "--nocapture", "--test-threads=1"])
        .env(common::CHILD_ENV, "1")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the child test process");
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    // The test harness prints its header on fd 1 before the endpoint takes
    // it: read up to it, then the echo.
    stdin.write_all(b"over the endpoint\n").unwrap();
    drop(stdin);
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        stdout.read_to_end(&mut all).unwrap();
        all
    });
    let deadline = Instant::now() + common::WATCHDOG;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the child did not finish");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let out = String::from_utf8_lossy(&reader.join().unwrap()).into_owned();
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(status.success(), "child failed: {status}\n{out}\n{err}");
    assert!(err.contains("child: stdio closed"), "the child test did not run: {err}");
    assert!(out.ends_with("over the endpoint\n"), "{out:?}");
}

// §4.13 items 9 and 10 together: the same child, started through a
// ProcessEndpoint, echoes through its `stdio:` endpoint; it ends with
// status 0 once its input is closed (ConnectionDone).
reactor_test!(
    fn stdio_child_through_a_process_endpoint(r) {
        use braid::endpoints::{connect_protocol, ProcessEndpoint, StderrPolicy};
        let exe = std::env::current_exe().unwrap();
        let ep = ProcessEndpoint::new(&r, exe)
            .args(["stdio_endpoint_in_a_child_process", "--exact", "--nocapture", "--test-threads=1"])
            .env(common::CHILD_ENV, "1")
            .stderr(StderrPolicy::Drop);
        let log = Log::default();
        let data = Rc::new(RefCell::new(Vec::new()));
        let t = settle(&r, &connect_protocol(&ep, Rec { log: log.clone(), data: data.clone(), ..Default::default() }));
        t.write(b"through both endpoints\n");
        t.lose_write_connection();
        let l = log.clone();
        run_until(&r, move || l.borrow().len() == 2);
        assert_eq!(*log.borrow(), ["made", "lost: done"]);
        let out = String::from_utf8_lossy(&data.borrow()).into_owned();
        assert!(out.ends_with("through both endpoints\n"), "{out:?}");
    }
);

fn settle<T: 'static>(r: &Reactor, d: &braid::Deferred<T>) -> T {
    let out = common::collect(d);
    let o = out.clone();
    run_until(r, move || o.borrow().is_some());
    let v = out.borrow_mut().take();
    v.unwrap().unwrap_or_else(|e| panic!("failed: {e}"))
}

fn settle_err<T: 'static>(r: &Reactor, d: &braid::Deferred<T>) -> String {
    let out = common::collect(d);
    let o = out.clone();
    run_until(r, move || o.borrow().is_some());
    let v = out.borrow_mut().take();
    match v.unwrap() {
        Ok(_) => panic!("it succeeded"),
        Err(e) => e,
    }
}
