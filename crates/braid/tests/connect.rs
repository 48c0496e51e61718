//! `connect_tcp` with several resolved addresses (Twisted reference §4.6,
//! HostnameEndpoint items 16, 17 and 21): every address is tried,
//! staggered; the first to connect wins and the others are cancelled;
//! errors name the address tried; the timeout and `stop_connecting` end
//! every dial with one notification.
//!
//! A dial that hangs is made deterministically on loopback: a listener
//! with a backlog of 0 that never accepts, whose queue is filled first. The
//! kernel then drops further SYNs, so a connect to it stays pending until
//! it is cancelled (or the listener accepts and a retransmitted SYN gets
//! in, which is how a slow winner is made).

mod common;

use std::cell::RefCell;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::time::Duration;

use braid::defer::Deferred;
use braid::protocols::echo::Echo;
use braid::resolver::Resolver;
use braid::{ClientFactory, Connector, Error, Failure, FileDescriptor, Protocol, Reactor, Transport};

use common::run_reactor;

/// Answers every name with a fixed list of addresses, whatever the port.
struct Table(Vec<SocketAddr>);

impl Resolver for Table {
    fn resolve(&self, _reactor: &Reactor, _host: &str, _port: u16) -> Deferred<Vec<SocketAddr>> {
        Deferred::succeed(self.0.clone())
    }
}

fn install(r: &Reactor, addrs: &[SocketAddr]) {
    r.install_resolver(Rc::new(Table(addrs.to_vec())));
}

/// A loopback port where nothing listens (bound, then released).
fn refused_v4() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// A listener whose connects hang: backlog 0, never accepting, its queue
/// already full. `release` makes room so a retransmitted SYN gets in.
struct Hanging {
    listener: OwnedFd,
    addr: SocketAddr,
    _fillers: Vec<TcpStream>,
    accepted: Vec<OwnedFd>,
}

impl Hanging {
    fn new() -> Hanging {
        use rustix::net::{AddressFamily, SocketFlags, SocketType};
        let flags = SocketFlags::CLOEXEC | SocketFlags::NONBLOCK;
        let listener =
            rustix::net::socket_with(AddressFamily::INET, SocketType::STREAM, flags, None).unwrap();
        rustix::net::bind(&listener, &"127.0.0.1:0".parse::<SocketAddr>().unwrap()).unwrap();
        rustix::net::listen(&listener, 0).unwrap();
        let addr = SocketAddr::try_from(rustix::net::getsockname(&listener).unwrap()).unwrap();
        let mut fillers = Vec::new();
        for _ in 0..16 {
            match TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
                Ok(s) => fillers.push(s),
                Err(_) => return Hanging { listener, addr, _fillers: fillers, accepted: Vec::new() },
            }
        }
        panic!("could not fill the accept queue of {addr}: connects to it would not hang");
    }

    /// Accepts everything queued, so the next SYN is answered.
    fn release(&mut self) {
        while let Ok(s) = rustix::net::accept(&self.listener) {
            self.accepted.push(s);
        }
        assert!(!self.accepted.is_empty(), "the queue of {} was not full", self.addr);
    }
}

/// What a client saw, in order.
type Log = Rc<RefCell<Vec<String>>>;

/// Records the address it builds for, the delayed calls and watched
/// writers at `connection_made`, the echo, and every failure (stopping the
/// reactor on each outcome unless told to keep running).
struct Client {
    log: Log,
    failures: Rc<RefCell<Vec<Failure>>>,
    reactor: Reactor,
    stop_on_failure: bool,
    /// Stop at connection_made (for a server that never answers).
    stop_when_made: bool,
    /// How many writers the reactor watched at each failure.
    writers_at_failure: Rc<RefCell<Vec<usize>>>,
}

impl Client {
    fn new(r: &Reactor) -> (Client, Log, Rc<RefCell<Vec<Failure>>>) {
        let log = Log::default();
        let failures = Rc::new(RefCell::new(Vec::new()));
        let c = Client {
            log: log.clone(),
            failures: failures.clone(),
            reactor: r.clone(),
            stop_on_failure: true,
            stop_when_made: false,
            writers_at_failure: Rc::default(),
        };
        (c, log, failures)
    }
}

impl braid::protocol::Factory for Client {
    fn build_protocol(&mut self, addr: &braid::Address) -> Option<Box<dyn Protocol>> {
        self.log.borrow_mut().push(format!("build {addr}"));
        let (log, reactor, stop) = (self.log.clone(), self.reactor.clone(), self.stop_when_made);
        Some(Box::new(Hello { log, reactor, stop, t: None }))
    }
}

impl ClientFactory for Client {
    fn client_connection_failed(&mut self, _c: &dyn Connector, reason: Failure) {
        self.log.borrow_mut().push(format!("failed: {reason}"));
        self.failures.borrow_mut().push(reason);
        self.writers_at_failure.borrow_mut().push(self.reactor.get_writers().len());
        if self.stop_on_failure {
            let _ = self.reactor.stop();
        }
    }
    fn client_connection_lost(&mut self, _c: &dyn Connector, _reason: Failure) {
        self.log.borrow_mut().push("lost".into());
        let _ = self.reactor.stop();
    }
}

struct Hello {
    log: Log,
    reactor: Reactor,
    stop: bool,
    t: Option<Transport>,
}

impl Protocol for Hello {
    fn connection_made(&mut self, t: Transport) {
        let calls = self.reactor.get_delayed_calls().len();
        let writers = self.reactor.get_writers().len();
        self.log.borrow_mut().push(format!("made: {calls} delayed calls, {writers} writers"));
        if self.stop {
            let _ = self.reactor.stop();
        }
        t.write(b"hello");
        self.t = Some(t);
    }
    fn data_received(&mut self, data: &[u8]) {
        self.log.borrow_mut().push(format!("echo {}", String::from_utf8_lossy(data)));
        if let Some(t) = &self.t {
            t.lose_connection();
        }
    }
}

/// Calls `then` once `cond` holds, checking every 10 ms; fails the test
/// (by stopping the reactor with a note in `log`) after 10 s.
fn when(
    r: &Reactor,
    log: &Log,
    what: &'static str,
    cond: impl Fn() -> bool + 'static,
    then: impl FnOnce() + 'static,
) {
    type Step = Rc<RefCell<Option<Box<dyn FnOnce()>>>>;
    fn step(r: Reactor, log: Log, what: &'static str, left: u32, cond: Rc<dyn Fn() -> bool>, then: Step) {
        let rr = r.clone();
        r.call_later(Duration::from_millis(10), move || {
            if cond() {
                if let Some(f) = then.borrow_mut().take() {
                    f();
                }
            } else if left == 0 {
                log.borrow_mut().push(format!("gave up waiting for {what}"));
                let _ = rr.stop();
            } else {
                step(rr, log, what, left - 1, cond, then);
            }
        });
    }
    let then: Step = Rc::new(RefCell::new(Some(Box::new(then))));
    step(r.clone(), log.clone(), what, 1000, Rc::new(cond), then);
}

/// The writers the reactor watches now, once it watches exactly `n`.
fn pending_dials(r: &Reactor, n: usize) -> impl Fn() -> bool + 'static {
    let r = r.clone();
    move || r.get_writers().len() == n
}

reactor_test! {
    /// The resolver answers ::1 first, where nothing listens; the server
    /// listens on 127.0.0.1 only. The connect falls through to 127.0.0.1,
    /// and the win leaves no timer behind (neither the connect timeout nor
    /// the stagger for the third address) and no dial watched.
    fn refused_first_address_falls_back_to_the_next(r) {
        let server = r.listen_tcp("127.0.0.1:0", Echo::new, 50).unwrap();
        let v4 = server.local_addr();
        let v6: SocketAddr = format!("[::1]:{}", v4.port()).parse().unwrap();
        // Nothing may listen on [::1] at that port, or the test proves
        // nothing: if binding it works, it was free.
        if let Err(e) = TcpListener::bind(v6) {
            assert_ne!(e.kind(), std::io::ErrorKind::AddrInUse, "something listens on {v6}; cannot run the test");
        }
        install(&r, &[v6, v4, v4]);
        let (client, log, _) = Client::new(&r);
        r.connect_tcp("somehost", v4.port(), client, Some(Duration::from_secs(15)), None);
        run_reactor(&r);
        // At connection_made only the watchdog remains scheduled.
        assert_eq!(*log.borrow(), [
            format!("build {v4}"), "made: 1 delayed calls, 0 writers".into(), "echo hello".into(), "lost".into(),
        ]);
    }
}

reactor_test! {
    /// When every address is refused, the failure is ConnectionRefused (the
    /// last dial's error) and its text names every address tried, never
    /// 0.0.0.0. An IP literal's refusal names it too.
    fn errors_name_the_addresses_tried(r) {
        let (a, b) = (refused_v4(), refused_v4());
        install(&r, &[a, b]);
        let (mut client, _, failures) = Client::new(&r);
        client.stop_on_failure = false;
        r.connect_tcp("somehost", a.port(), client, None, None);
        let (mut client, log, literal) = Client::new(&r);
        client.stop_on_failure = false;
        r.connect_tcp("127.0.0.1", a.port(), client, None, None);
        let (f, l) = (failures.clone(), literal.clone());
        when(&r, &log, "both attempts to fail", move || f.borrow().len() + l.borrow().len() >= 2, {
            let rr = r.clone();
            move || {
                let _ = rr.stop();
            }
        });
        run_reactor(&r);

        let failures = failures.borrow();
        assert_eq!(failures.len(), 1, "{failures:?}");
        let f = &failures[0];
        assert!(matches!(f.braid_error(), Some(Error::ConnectionRefused)), "{f}");
        let text = f.to_string();
        for addr in [a, b] {
            assert!(text.contains(&format!("connecting to {addr}")), "{addr} not named: {text}");
        }
        assert!(!text.contains("0.0.0.0"), "{text}");
        assert!(text.contains("somehost"), "{text}");

        let literal = literal.borrow();
        assert_eq!(literal.len(), 1, "{literal:?}");
        assert!(matches!(literal[0].braid_error(), Some(Error::ConnectionRefused)), "{}", literal[0]);
        assert_eq!(literal[0].to_string(), format!("connection was refused by the other side (connecting to {a})"));
    }
}

reactor_test! {
    /// The first address hangs, so after the stagger delay the second is
    /// dialled alongside it. Both wait (two writers watched) until the
    /// second listener makes room and its connect completes: the second
    /// wins, and the hanging dial is cancelled, its socket closed
    /// (`fileno` -1) and its writer registration gone.
    fn first_to_connect_wins_and_the_others_are_cancelled(r) {
        let hang = Hanging::new();
        let slow = Rc::new(RefCell::new(Hanging::new()));
        let slow_addr = slow.borrow().addr;
        install(&r, &[hang.addr, slow_addr]);
        let (mut client, log, _) = Client::new(&r);
        client.stop_when_made = true;
        r.connect_tcp("somehost", 1, client, None, None);
        let dials: Rc<RefCell<Vec<Rc<dyn FileDescriptor>>>> = Rc::default();
        let (d, rr, s) = (dials.clone(), r.clone(), slow.clone());
        when(&r, &log, "two pending dials", pending_dials(&r, 2), move || {
            *d.borrow_mut() = rr.get_writers();
            s.borrow_mut().release();
        });
        run_reactor(&r);
        // (The reactor's shutdown then loses the connection.)
        assert_eq!(log.borrow()[..2], [format!("build {slow_addr}"), "made: 1 delayed calls, 0 writers".to_string()]);
        let dials = dials.borrow();
        assert_eq!(dials.len(), 2);
        for d in dials.iter() {
            assert_eq!(d.fileno(), -1, "{} still has its socket", d.log_prefix());
        }
        drop((hang, slow));
    }
}

reactor_test! {
    /// stop_connecting with three dials pending cancels all of them and
    /// reports exactly one client_connection_failed(Cancelled), even after
    /// the reactor ran on for a while.
    fn stop_connecting_cancels_every_pending_dial(r) {
        let hang = Hanging::new();
        install(&r, &[hang.addr, hang.addr, hang.addr]);
        let (mut client, log, failures) = Client::new(&r);
        client.stop_on_failure = false;
        let c = r.connect_tcp("somehost", 1, client, None, None);
        let dials: Rc<RefCell<Vec<Rc<dyn FileDescriptor>>>> = Rc::default();
        let after: Rc<RefCell<Option<(usize, usize)>>> = Rc::default();
        let (d, a, rr) = (dials.clone(), after.clone(), r.clone());
        when(&r, &log, "three pending dials", pending_dials(&r, 3), move || {
            *d.borrow_mut() = rr.get_writers();
            c.stop_connecting().unwrap();
            *a.borrow_mut() = Some((rr.get_writers().len(), rr.get_delayed_calls().len()));
            // Long enough for a stray stagger timer or dial to report.
            let r2 = rr.clone();
            rr.call_later(Duration::from_millis(500), move || {
                let _ = r2.stop();
            });
        });
        run_reactor(&r);
        assert_eq!(*log.borrow(), ["failed: cancelled (stop_connecting)"]);
        assert!(matches!(failures.borrow()[0].braid_error(), Some(Error::Cancelled)));
        // Right after stop_connecting: no dial watched, and no timer but
        // the watchdog (the test's stop timer is scheduled after looking).
        assert_eq!(*after.borrow(), Some((0, 1)), "(writers, delayed calls) after stop_connecting");
        let dials = dials.borrow();
        assert_eq!(dials.len(), 3);
        for d in dials.iter() {
            assert_eq!(d.fileno(), -1, "{} still has its socket", d.log_prefix());
        }
    }
}

reactor_test! {
    /// The connect timeout bounds all the dials together: with two pending
    /// it fires once, naming both, and leaves nothing watched.
    fn timeout_ends_every_pending_dial(r) {
        let hang = Hanging::new();
        install(&r, &[hang.addr, hang.addr]);
        let (mut client, log, failures) = Client::new(&r);
        client.stop_on_failure = false;
        let writers = client.writers_at_failure.clone();
        // The second dial starts after ATTEMPT_DELAY (0.3 s), well before
        // the deadline; the reactor runs on past it to catch a second report.
        r.connect_tcp("somehost", 1, client, Some(Duration::from_secs(1)), None);
        let rr = r.clone();
        r.call_later(Duration::from_millis(1800), move || {
            let _ = rr.stop();
        });
        run_reactor(&r);
        let h = hang.addr;
        assert_eq!(*log.borrow(), [format!("failed: timed out (connecting to {h}, {h})")]);
        assert!(matches!(failures.borrow()[0].braid_error(), Some(Error::TimedOut)));
        assert_eq!(*writers.borrow(), [0], "writers still watched when the timeout was reported");
    }
}
