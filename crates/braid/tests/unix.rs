//! UNIX stream sockets (Twisted reference §4.10): listening on a path or
//! an abstract name, the socket file's life (mode, stale files, live
//! owners, removal on stop, the `want_pid` lock file), addresses. Each test
//! on every backend; clients are std `UnixStream`s on another thread.

mod common;

use std::cell::RefCell;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};

use braid::protocol::Protocol;
use braid::protocols::echo::Echo;
use braid::{Address, Error, Reactor, Transport};
use common::{echo_via, run_reactor, WATCHDOG};

/// A fresh socket path in the temp directory (nothing there yet).
fn temp_path(what: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let p = std::env::temp_dir().join(format!("braid-{}-{n}-{what}.sock", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p
}

/// Stops `port` and runs the reactor until its Deferred has fired with
/// success (the socket closed, the factory stopped).
fn stop_listening_and_wait(r: &Reactor, port: &braid::ListeningPort) {
    let d = port.stop_listening();
    let done = common::collect(&d);
    let rr = r.clone();
    r.call_later(std::time::Duration::from_millis(50), move || rr.stop().unwrap());
    run_reactor(r);
    assert_eq!(*done.borrow(), Some(Ok(())));
}

/// A client with the tests' read timeout.
fn timed(s: UnixStream) -> UnixStream {
    s.set_read_timeout(Some(WATCHDOG)).unwrap();
    s
}

/// A transport's host and peer, as seen in `connection_made`.
type Seen = Rc<RefCell<Option<(Option<Address>, Address)>>>;

/// Records the transport's addresses when the connection is made, then echoes.
struct Where {
    seen: Seen,
    t: Option<Transport>,
}

impl Protocol for Where {
    fn connection_made(&mut self, t: Transport) {
        *self.seen.borrow_mut() = Some((t.host(), t.peer()));
        assert!(t.tcp().is_none(), "a UNIX transport offers no TCP options");
        // The client is this very process.
        let creds = t.unix().expect("a UNIX transport").peer_credentials().unwrap();
        assert_eq!(creds.pid, Some(std::process::id()));
        assert_eq!(
            (creds.uid, creds.gid),
            (rustix::process::getuid().as_raw(), rustix::process::getgid().as_raw())
        );
        self.t = Some(t);
    }
    fn data_received(&mut self, data: &[u8]) {
        if let Some(t) = &self.t {
            t.write(data);
        }
    }
}

reactor_test! {
    /// Echo over a socket file; the server's transport names the path as
    /// its host and an unnamed peer; the port's host is the path too.
    fn echo_over_a_path(r) {
        let path = temp_path("echo");
        let seen = Rc::new(RefCell::new(None));
        let s = seen.clone();
        let port = r.listen_unix(&path, move || Where { seen: s.clone(), t: None }, 50, None, false).unwrap();
        assert_eq!(port.host().unix_path(), Some(path.as_path()));
        assert!(port.host().to_string().starts_with("unix:/"), "{}", port.host());
        let p = path.clone();
        assert_eq!(echo_via(&r, move || timed(UnixStream::connect(p).unwrap()), b"over a path"), b"over a path");
        let (host, peer) = seen.borrow().clone().expect("connection made");
        assert_eq!(host.as_ref().and_then(Address::unix_path), Some(path.as_path()));
        assert!(peer.is_unix_unnamed(), "peer {peer}");
        let _ = std::fs::remove_file(&path);
    }
}

reactor_test! {
    /// Echo over a Linux abstract name (no file is made).
    fn echo_over_an_abstract_name(r) {
        let name = format!("@braid-test-{}-{}", std::process::id(), r.backend());
        let port = r.listen_unix(&name, Echo::new, 50, None, false).unwrap();
        assert_eq!(port.host().to_string(), format!("unix:{name}"));
        let abstract_name = name.as_bytes()[1..].to_vec();
        let connect = move || {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(&abstract_name).unwrap();
            UnixStream::connect_addr(&addr).unwrap()
        };
        assert_eq!(echo_via(&r, move || timed(connect()), b"abstract"), b"abstract");
    }
}

reactor_test! {
    /// `stop_listening` removes the socket file; the mode is applied.
    fn the_socket_file_has_the_mode_and_goes_on_stop(r) {
        let path = temp_path("mode");
        let port = r.listen_unix(&path, Echo::new, 50, Some(0o600), false).unwrap();
        let mode = std::fs::metadata(&path).expect("socket file").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        stop_listening_and_wait(&r, &port);
        assert!(!path.exists(), "the socket file was left behind");
    }
}

reactor_test! {
    /// A socket file that nobody listens on any more (its process died) is
    /// replaced; one with a live listener is `CannotListen`.
    fn stale_socket_files_are_replaced_live_ones_refused(r) {
        let path = temp_path("stale");
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let port = r.listen_unix(&path, Echo::new, 50, None, false).expect("a stale file must be replaced");
        let p = path.clone();
        assert_eq!(echo_via(&r, move || timed(UnixStream::connect(p).unwrap()), b"x"), b"x");
        drop(port);

        let live_path = temp_path("live");
        let _live = UnixListener::bind(&live_path).unwrap();
        match r.listen_unix(&live_path, Echo::new, 50, None, false) {
            Err(Error::CannotListen { addr, .. }) => assert!(addr.contains(live_path.to_str().unwrap()), "{addr}"),
            Err(e) => panic!("expected CannotListen, got {e}"),
            Ok(_) => panic!("listened over a live socket"),
        }
        assert!(live_path.exists(), "the live socket's file was removed");
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(&live_path);
    }
}

reactor_test! {
    /// A name longer than `sun_path` is a clear error, never truncated.
    fn a_path_too_long_is_refused(r) {
        let long = std::env::temp_dir().join("x".repeat(200));
        match r.listen_unix(&long, Echo::new, 50, None, false) {
            Err(Error::CannotListen { source, .. }) => {
                assert!(source.to_string().contains("sun_path"), "{source}");
            }
            Err(e) => panic!("expected CannotListen, got {e}"),
            Ok(_) => panic!("listened on a truncated path"),
        }
        let truncated: String = long.to_string_lossy().chars().take(107).collect();
        assert!(!std::path::Path::new(&truncated).exists(), "a truncated file was made");
    }
}

reactor_test! {
    /// `want_pid` holds `PATH.lock` with our pid: a second listener on the
    /// path is refused while it is held; the lock goes on stop; a lock left
    /// by a dead process is taken over.
    fn want_pid_lock_file(r) {
        let path = temp_path("lock");
        let lock = PathBuf::from(format!("{}.lock", path.display()));
        let port = r.listen_unix(&path, Echo::new, 50, None, true).unwrap();
        assert_eq!(std::fs::read_to_string(&lock).unwrap().trim(), std::process::id().to_string());
        assert!(matches!(r.listen_unix(&path, Echo::new, 50, None, true), Err(Error::CannotListen { .. })));
        stop_listening_and_wait(&r, &port);
        assert!(!lock.exists() && !path.exists(), "lock or socket file left behind");

        // A lock naming a process that has exited.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        std::fs::write(&lock, dead.to_string()).unwrap();
        let r2 = common::build(r.backend());
        let port = r2.listen_unix(&path, Echo::new, 50, None, true).expect("a dead owner's lock is taken over");
        assert_eq!(std::fs::read_to_string(&lock).unwrap().trim(), std::process::id().to_string());
        drop(port);
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(&lock);
    }
}

/// Sends descriptors when made: `count` pipe write ends, each after
/// writing its index into it, then a line of text.
struct FdSender {
    fds: Vec<std::os::fd::OwnedFd>,
    text: &'static [u8],
}

impl Protocol for FdSender {
    fn connection_made(&mut self, t: Transport) {
        let unix = t.unix().expect("a UNIX transport");
        for fd in self.fds.drain(..) {
            unix.send_file_descriptor(fd).unwrap();
        }
        if !self.text.is_empty() {
            t.write(self.text);
        }
    }
    fn data_received(&mut self, _: &[u8]) {}
}

/// Collects what arrives: descriptors (or refuses them) and bytes; stops
/// the reactor once `want_bytes` have come.
struct FdCollector {
    fds: Rc<RefCell<Vec<std::os::fd::OwnedFd>>>,
    bytes: Rc<RefCell<Vec<u8>>>,
    accept_fds: bool,
    want_bytes: usize,
    want_fds: usize,
    reactor: Reactor,
    /// The number of descriptors that had arrived when the first byte did.
    fds_before_bytes: Rc<std::cell::Cell<Option<usize>>>,
}

impl Protocol for FdCollector {
    fn data_received(&mut self, data: &[u8]) {
        if self.fds_before_bytes.get().is_none() {
            self.fds_before_bytes.set(Some(self.fds.borrow().len()));
        }
        self.bytes.borrow_mut().extend_from_slice(data);
        if self.bytes.borrow().len() >= self.want_bytes && self.fds.borrow().len() >= self.want_fds {
            let _ = self.reactor.stop();
        }
    }
    fn as_fd_receiver(&mut self) -> Option<&mut dyn braid::FileDescriptorReceiver> {
        if self.accept_fds {
            Some(self)
        } else {
            None
        }
    }
}

impl braid::FileDescriptorReceiver for FdCollector {
    fn file_descriptor_received(&mut self, fd: std::os::fd::OwnedFd) {
        self.fds.borrow_mut().push(fd);
    }
}

/// `count` pipes: (read ends, write ends). Close-on-exec, so a child
/// another test spawns does not keep a write end open.
fn pipes(count: usize) -> (Vec<std::os::fd::OwnedFd>, Vec<std::os::fd::OwnedFd>) {
    (0..count).map(|_| rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap()).unzip()
}

/// Passes `count` pipe write ends over a socketpair, braid to braid;
/// returns what the receiving protocol saw, and the pipes' read ends.
fn pass_fds(
    r: &Reactor,
    count: usize,
    text: &'static [u8],
    accept_fds: bool,
) -> (Vec<std::os::fd::OwnedFd>, Vec<u8>, Option<usize>, Vec<std::os::fd::OwnedFd>) {
    // The socketpair first: the lowest descriptor numbers (select).
    let (a, b) = UnixStream::pair().unwrap();
    let (reads, writes) = pipes(count);
    let fds = Rc::new(RefCell::new(Vec::new()));
    let bytes = Rc::new(RefCell::new(Vec::new()));
    let before = Rc::new(std::cell::Cell::new(None));
    let mut sender = Some(FdSender { fds: writes, text });
    r.adopt_stream_connection(a, move || sender.take().unwrap()).unwrap();
    let (f, by, be, rr) = (fds.clone(), bytes.clone(), before.clone(), r.clone());
    let want_bytes = if text.is_empty() { 1 } else { text.len() };
    let want_fds = if accept_fds { count } else { 0 };
    let mut collector = Some(FdCollector {
        fds: f,
        bytes: by,
        accept_fds,
        want_bytes,
        want_fds,
        reactor: rr,
        fds_before_bytes: be,
    });
    r.adopt_stream_connection(b, move || collector.take().unwrap()).unwrap();
    run_reactor(r);
    let got = std::mem::take(&mut *fds.borrow_mut());
    let text = bytes.borrow().clone();
    (got, text, before.get(), reads)
}

/// True if every write end of the pipe behind `read` is closed (EOF). A
/// child that another test is spawning may hold a copy for the moment
/// between its fork and its exec, so this waits (boundedly) for the EOF.
fn all_writers_closed(read: &std::os::fd::OwnedFd) -> bool {
    rustix::io::ioctl_fionbio(read, true).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let mut b = [0u8; 1];
        match rustix::io::read(read, &mut b) {
            Ok(0) => return true,
            _ if std::time::Instant::now() > deadline => return false,
            _ => std::thread::sleep(std::time::Duration::from_millis(10)),
        }
    }
}

reactor_test! {
    /// One descriptor, sent with the next bytes: it arrives before them,
    /// it works (a byte written through it comes out of the pipe), and the
    /// sender's copy was closed.
    fn one_descriptor_passes_with_the_next_bytes(r) {
        let (fds, text, before, reads) = pass_fds(&r, 1, b"hello", true);
        assert_eq!(text, b"hello");
        assert_eq!(fds.len(), 1);
        assert_eq!(before, Some(1), "the descriptor came after its bytes");
        rustix::io::write(&fds[0], b"!").unwrap();
        let mut b = [0u8; 1];
        rustix::io::read(&reads[0], &mut b).unwrap();
        assert_eq!(&b, b"!");
        drop(fds);
        assert!(all_writers_closed(&reads[0]), "the sender kept its copy open");
    }
}

reactor_test! {
    /// More than fit in one message (the kernel's limit is 253): all
    /// arrive, in order; with nothing else written, one zero byte carries
    /// each batch.
    fn more_descriptors_than_fit_in_one_message(r) {
        // Hundreds of descriptors: in a process of its own, so select's
        // sockets stay below FD_SETSIZE whatever other tests hold.
        if !common::is_child() {
            let out = common::in_child(&format!("more_descriptors_than_fit_in_one_message::{}", r.backend()), "1");
            assert!(out.contains("all 300 in order"), "{out}");
            return;
        }
        assert!(common::set_fd_limit(4096) >= 1024, "descriptor limit too low");
        let (fds, text, _, reads) = pass_fds(&r, 300, b"", true);
        assert_eq!(fds.len(), 300, "descriptors lost");
        assert!(text.iter().all(|&b| b == 0) && !text.is_empty(), "{text:?}");
        // In order: the n-th received is the n-th pipe's write end.
        for (i, (w, rd)) in fds.iter().zip(&reads).enumerate() {
            rustix::io::write(w, &[i as u8]).unwrap();
            let mut b = [0u8; 1];
            rustix::io::read(rd, &mut b).unwrap();
            assert_eq!(b[0], i as u8, "descriptor {i} out of order");
        }
        println!("all 300 in order");
    }
}

reactor_test! {
    /// A protocol that does not take descriptors never leaks them: they
    /// are closed (the pipe's last write end goes), and the bytes still
    /// arrive.
    fn unwanted_descriptors_are_closed(r) {
        let (fds, text, _, reads) = pass_fds(&r, 3, b"data", false);
        assert!(fds.is_empty());
        assert_eq!(text, b"data");
        for rd in &reads {
            assert!(all_writers_closed(rd), "a refused descriptor was left open");
        }
    }
}

reactor_test! {
    /// Python's `socket.send_fds` (a real outside peer) passes a pipe's
    /// write end to a braid UNIX server, which writes through it.
    fn python_sends_a_descriptor(r) {
        let path = temp_path("python-fds");
        struct WriteThrough;
        impl Protocol for WriteThrough {
            fn data_received(&mut self, _: &[u8]) {}
        }
        impl braid::FileDescriptorReceiver for WriteThrough {
            fn file_descriptor_received(&mut self, fd: std::os::fd::OwnedFd) {
                rustix::io::write(&fd, b"via braid").unwrap();
            }
        }
        struct Wrapper(WriteThrough);
        impl Protocol for Wrapper {
            fn data_received(&mut self, d: &[u8]) {
                self.0.data_received(d)
            }
            fn as_fd_receiver(&mut self) -> Option<&mut dyn braid::FileDescriptorReceiver> {
                Some(&mut self.0)
            }
        }
        let _port = r.listen_unix(&path, || Wrapper(WriteThrough), 50, None, false).unwrap();
        let script = "import os, socket, sys\n\
            r, w = os.pipe()\n\
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n\
            s.connect(sys.argv[1])\n\
            socket.send_fds(s, [b'x'], [w])\n\
            os.close(w)\n\
            sys.stdout.write(os.read(r, 100).decode())\n";
        let remote = r.remote();
        let p = path.clone();
        let python = std::thread::spawn(move || {
            let out = std::process::Command::new("python3").args(["-c", script, p.to_str().unwrap()]).output();
            let _ = remote.call_from_thread(|r| {
                let _ = r.stop();
            });
            out.expect("python3")
        });
        run_reactor(&r);
        let out = python.join().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8_lossy(&out.stdout), "via braid");
        let _ = std::fs::remove_file(&path);
    }
}

/// A client factory that records what it hears and stops the reactor on
/// a failure or a lost connection.
struct UnixClient {
    log: Rc<RefCell<Vec<String>>>,
    send: &'static [u8],
    reactor: Reactor,
}

struct SendAndRead {
    log: Rc<RefCell<Vec<String>>>,
    send: &'static [u8],
}

impl Protocol for SendAndRead {
    fn connection_made(&mut self, t: Transport) {
        self.log.borrow_mut().push(format!("made, peer {}", t.peer()));
        t.write(self.send);
    }
    fn data_received(&mut self, data: &[u8]) {
        self.log.borrow_mut().push(format!("data {}", String::from_utf8_lossy(data)));
    }
}

impl braid::Factory for UnixClient {
    fn build_protocol(&mut self, addr: &Address) -> Option<Box<dyn Protocol>> {
        self.log.borrow_mut().push(format!("build for {addr}"));
        Some(Box::new(SendAndRead { log: self.log.clone(), send: self.send }))
    }
}

impl braid::ClientFactory for UnixClient {
    fn client_connection_failed(&mut self, c: &dyn braid::Connector, reason: braid::Failure) {
        self.log.borrow_mut().push(format!("failed to {}: {reason}", c.destination()));
        let _ = self.reactor.stop();
    }
    fn client_connection_lost(&mut self, _c: &dyn braid::Connector, reason: braid::Failure) {
        self.log.borrow_mut().push(format!("lost: {reason}"));
        let _ = self.reactor.stop();
    }
}

/// Closes each connection after echoing the first bytes.
struct EchoOnce(Option<Transport>);

impl Protocol for EchoOnce {
    fn connection_made(&mut self, t: Transport) {
        self.0 = Some(t);
    }
    fn data_received(&mut self, data: &[u8]) {
        if let Some(t) = &self.0 {
            t.write(data);
            t.lose_connection();
        }
    }
}

reactor_test! {
    /// braid to braid over a UNIX socket: `connect_unix` reports to its
    /// factory (built for the path, the connection's peer is the path),
    /// echoes, and hears the end through `client_connection_lost`.
    fn connect_unix_talks_to_listen_unix(r) {
        let path = temp_path("connect");
        let _port = r.listen_unix(&path, || EchoOnce(None), 50, None, false).unwrap();
        let log = Rc::new(RefCell::new(Vec::new()));
        let c = r.connect_unix(&path, UnixClient { log: log.clone(), send: b"ping", reactor: r.clone() }, Some(WATCHDOG), false);
        assert_eq!(c.destination().unix_path(), Some(path.as_path()));
        run_reactor(&r);
        let shown = format!("unix:{}", path.display());
        assert_eq!(
            *log.borrow(),
            [format!("build for {shown}"), format!("made, peer {shown}"), "data ping".into(), "lost: connection was closed cleanly".into()]
        );
        let _ = std::fs::remove_file(&path);
    }
}

reactor_test! {
    /// Failures come through the factory on a later iteration, naming the
    /// path: nothing there, a stale socket file (refused), a name too
    /// long, and `check_pid` with no live lock holder.
    fn connect_unix_failures_name_the_path(r) {
        let missing = temp_path("missing");
        let stale = temp_path("stale-client");
        drop(UnixListener::bind(&stale).unwrap());
        let long = std::env::temp_dir().join("y".repeat(200));
        let lonely = temp_path("nolock");
        let _listener = UnixListener::bind(&lonely).unwrap();
        for (path, check_pid, want) in [
            (&missing, false, "No such file"),
            (&stale, false, "refused"),
            (&long, false, "sun_path"),
            (&lonely, true, ".lock"),
        ] {
            let r = common::build(r.backend());
            let log = Rc::new(RefCell::new(Vec::new()));
            let _c = r.connect_unix(path, UnixClient { log: log.clone(), send: b"", reactor: r.clone() }, Some(WATCHDOG), check_pid);
            assert!(log.borrow().is_empty(), "called back synchronously");
            run_reactor(&r);
            let log = log.borrow();
            assert_eq!(log.len(), 1, "{log:?}");
            assert!(log[0].starts_with("failed to ") && log[0].contains(want), "{path:?}: {log:?}");
        }
        let _ = std::fs::remove_file(&stale);
        let _ = std::fs::remove_file(&lonely);
    }
}

reactor_test! {
    /// `ReconnectingClientFactory` over a UNIX socket: the first attempts
    /// fail (nothing listens yet); once a server appears, it connects.
    fn reconnecting_over_unix(r) {
        let path = temp_path("reconnect");
        let made = Rc::new(std::cell::Cell::new(false));
        struct Hello(Rc<std::cell::Cell<bool>>, Reactor);
        impl Protocol for Hello {
            fn connection_made(&mut self, _t: Transport) {
                self.0.set(true);
                let _ = self.1.stop();
            }
            fn data_received(&mut self, _: &[u8]) {}
        }
        let (m, rr) = (made.clone(), r.clone());
        let factory = braid::ReconnectingClientFactory::new(Rc::new(r.clone()), move || Hello(m.clone(), rr.clone()))
            .initial_delay(std::time::Duration::from_millis(20))
            .max_delay(std::time::Duration::from_millis(100))
            .jitter(0.0);
        let _c = r.connect_unix(&path, factory, Some(WATCHDOG), false);
        let (rr, p) = (r.clone(), path.clone());
        r.call_later(std::time::Duration::from_millis(150), move || {
            // The port lives in the reactor without its handle.
            drop(rr.listen_unix(&p, Echo::new, 50, None, false).unwrap());
        });
        run_reactor(&r);
        assert!(made.get(), "never connected");
        let _ = std::fs::remove_file(&path);
    }
}

/// Writes `bulk` bytes when made, then, a little later (once they are on
/// their way), passes one descriptor with nothing written after it.
struct BulkThenFd {
    bulk: usize,
    fd: Option<std::os::fd::OwnedFd>,
    reactor: Reactor,
}

impl Protocol for BulkThenFd {
    fn connection_made(&mut self, t: Transport) {
        t.write(&vec![7u8; self.bulk]);
        let fd = self.fd.take().unwrap();
        self.reactor.call_later(std::time::Duration::from_millis(20), move || {
            t.unix().expect("a UNIX transport").send_file_descriptor(fd).unwrap();
        });
    }
    fn data_received(&mut self, _: &[u8]) {}
}

reactor_test! {
    /// A descriptor passed while the bytes ahead of it wait for room in a
    /// full socket (on a ring: in a send in flight, which then completes
    /// whole), with nothing written after it: it still goes once they
    /// have, and every byte arrives.
    fn a_descriptor_passed_behind_a_waiting_send_still_goes(r) {
        use std::io::Write;
        const LATE: usize = 1024;
        let (mut a, b) = UnixStream::pair().unwrap();
        // Fill the socket first, so the protocol's bytes must wait.
        a.set_nonblocking(true).unwrap();
        let mut filler = 0;
        // Large writes, then single bytes, until not even one more fits.
        for size in [4096, 1] {
            loop {
                match a.write(&vec![7u8; size]) {
                    Ok(n) => filler += n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("filling the socket: {e}"),
                }
            }
        }
        let total = filler + LATE;
        let (reads, mut writes) = pipes(1);
        let mut sender = Some(BulkThenFd { bulk: LATE, fd: writes.pop(), reactor: r.clone() });
        r.adopt_stream_connection(a, move || sender.take().unwrap()).unwrap();
        let fds = Rc::new(RefCell::new(Vec::new()));
        let bytes = Rc::new(RefCell::new(Vec::new()));
        let mut collector = Some(FdCollector {
            fds: fds.clone(),
            bytes: bytes.clone(),
            accept_fds: true,
            want_bytes: total,
            want_fds: 1,
            reactor: r.clone(),
            fds_before_bytes: Rc::new(std::cell::Cell::new(None)),
        });
        // Nothing reads the other end until long after the descriptor is
        // queued: until then the bytes ahead of it wait for room.
        let rr = r.clone();
        r.call_later(std::time::Duration::from_millis(100), move || {
            rr.adopt_stream_connection(b, move || collector.take().unwrap()).unwrap();
        });
        run_reactor(&r);
        let got = bytes.borrow();
        assert!(got.len() >= total, "{} of {total} bytes arrived", got.len());
        assert!(got[..total].iter().all(|&b| b == 7), "the bytes were changed");
        // At most a zero byte carried the descriptor after them.
        assert!(got[total..].iter().all(|&b| b == 0) && got.len() <= total + 1, "{} bytes", got.len());
        let fds = fds.borrow();
        assert_eq!(fds.len(), 1, "the descriptor did not arrive");
        rustix::io::write(&fds[0], b"!").unwrap();
        let mut one = [0u8; 1];
        rustix::io::read(&reads[0], &mut one).unwrap();
        assert_eq!(&one, b"!");
    }
}
