//! A panic in any user callback costs only its own connection: the
//! listener keeps accepting, a client's connector still hears the end, and
//! the exactly-once `connection_lost` rules hold. Each test on every backend.

mod common;

use std::cell::{Cell, RefCell};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::rc::Rc;
use std::time::Duration;

use braid::protocol::Protocol;
use braid::{ClientFactory, Connector, Factory, Failure, Producer, Reactor, Transport};
use common::{capture_logs, run_reactor, WATCHDOG};

type Log = Rc<RefCell<Vec<String>>>;

fn log() -> Log {
    Rc::new(RefCell::new(Vec::new()))
}

/// Records every call it gets, and panics in the calls it is told to.
#[derive(Default)]
struct Fragile {
    log: Log,
    t: Option<Transport>,
    panic_in_made: bool,
    panic_in_lost: bool,
    producer: Option<Rc<dyn Producer>>,
}

impl Protocol for Fragile {
    fn connection_made(&mut self, t: Transport) {
        self.log.borrow_mut().push("made".into());
        if let Some(p) = self.producer.take() {
            t.register_producer(p, true).unwrap();
        }
        self.t = Some(t);
        if self.panic_in_made {
            panic!("bug in connection_made");
        }
    }
    fn data_received(&mut self, data: &[u8]) {
        self.log.borrow_mut().push(format!("data {}", data.len()));
        if let Some(t) = &self.t {
            t.write(data);
        }
    }
    fn connection_lost(&mut self, reason: Failure) {
        self.log.borrow_mut().push(format!("lost: {reason}"));
        if self.panic_in_lost {
            panic!("bug in connection_lost");
        }
    }
}

/// Runs `client` on its own thread against `addr`, then stops the reactor.
fn with_client(r: &Reactor, client: impl FnOnce() + Send + 'static) -> std::thread::JoinHandle<()> {
    let remote = r.remote();
    std::thread::spawn(move || {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(client));
        let _ = remote.call_from_thread(|r| {
            let _ = r.stop();
        });
        if let Err(e) = outcome {
            std::panic::resume_unwind(e);
        }
    })
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(WATCHDOG)).unwrap();
    s
}

/// Reads until EOF or a reset; fails on a timeout (a hung peer).
fn read_to_end_or_reset(s: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return got,
            Err(e) => panic!("the connection was neither closed nor reset: {e}"),
        }
    }
}

reactor_test! {
    /// Twisted keeps listening when a protocol fails in connectionMade. The
    /// failed connection is closed, the panic is logged with the peer's
    /// address, that protocol gets no further call (not even
    /// connection_lost), and the next client is served.
    fn connection_made_panic_keeps_the_listener(r) {
        let calls = log();
        let first = Rc::new(Cell::new(true));
        let (c, f) = (calls.clone(), first.clone());
        let port = r
            .listen_tcp(
                "127.0.0.1:0",
                move || Fragile { log: c.clone(), panic_in_made: f.replace(false), ..Default::default() },
                50,
            )
            .unwrap();
        let addr = port.local_addr();
        let client = with_client(&r, move || {
            let mut bad = connect(addr);
            let bad_port = bad.local_addr().unwrap().port();
            // Whatever it sends, the failed connection only closes.
            let _ = bad.write_all(b"ignored");
            assert_eq!(read_to_end_or_reset(&mut bad), b"", "the failed connection echoed");
            let mut good = connect(addr);
            good.write_all(b"ping").unwrap();
            let mut buf = [0u8; 4];
            good.read_exact(&mut buf).expect("the second client was not served");
            assert_eq!(&buf, b"ping");
            println!("bad client port {bad_port}");
        });
        let ((), logs) = capture_logs(|| run_reactor(&r));
        // The second client was served (checked on the client thread), so
        // the port kept accepting after the panic.
        client.join().expect("client");
        let calls = calls.borrow();
        assert_eq!(calls[0], "made", "{calls:?}");
        assert_eq!(calls[1], "made", "the panicking protocol got a further call: {calls:?}");
        assert!(calls[2..].iter().all(|c| c != "made"), "{calls:?}");
        assert!(logs.contains("bug in connection_made"), "the panic was not logged: {logs}");
        assert!(
            logs.lines().any(|l| l.contains("connection_made") && l.contains("127.0.0.1:")),
            "the log line does not name the peer: {logs}"
        );
    }
}

/// A client factory that counts its notifications and reconnects once.
struct Counting {
    calls: Log,
    protocol: Box<dyn FnMut() -> Fragile>,
    reconnect: bool,
    stop: Reactor,
}

impl Factory for Counting {
    fn build_protocol(&mut self, _addr: &braid::Address) -> Option<Box<dyn Protocol>> {
        Some(Box::new((self.protocol)()))
    }
}

impl ClientFactory for Counting {
    fn client_connection_failed(&mut self, _c: &dyn Connector, reason: Failure) {
        self.calls.borrow_mut().push(format!("failed: {reason}"));
        let _ = self.stop.stop();
    }
    fn client_connection_lost(&mut self, c: &dyn Connector, reason: Failure) {
        self.calls.borrow_mut().push(format!("client lost: {reason}"));
        if std::mem::take(&mut self.reconnect) {
            // The connector is disconnected again, so it may reconnect.
            c.connect().expect("connect() refused after a connection_lost panic");
        } else {
            let _ = self.stop.stop();
        }
    }
}

/// Connects a [`Counting`] factory building `protocol` to `addr`.
fn connect_counting(
    r: &Reactor,
    addr: SocketAddr,
    calls: &Log,
    protocol: Box<dyn FnMut() -> Fragile>,
    reconnect: bool,
) {
    let factory = Counting { calls: calls.clone(), protocol, reconnect, stop: r.clone() };
    r.connect_tcp("127.0.0.1", addr.port(), factory, Some(Duration::from_secs(10)), None);
}

/// A server that closes every connection as soon as it is made.
fn closing_server(r: &Reactor) -> SocketAddr {
    struct Closer;
    impl Protocol for Closer {
        fn connection_made(&mut self, t: Transport) {
            t.lose_connection();
        }
        fn data_received(&mut self, _: &[u8]) {}
    }
    r.listen_tcp("127.0.0.1:0", || Closer, 50).unwrap().local_addr()
}

reactor_test! {
    /// A panic in connection_lost is logged, and the connector still hears
    /// client_connection_lost, so it can connect again (a reconnecting
    /// factory would otherwise never retry).
    fn connection_lost_panic_still_notifies_the_connector(r) {
        let addr = closing_server(&r);
        let calls = log();
        let c = calls.clone();
        let protocol = Box::new(move || Fragile { log: c.clone(), panic_in_lost: true, ..Default::default() });
        connect_counting(&r, addr, &calls, protocol, true);
        let ((), logs) = capture_logs(|| run_reactor(&r));
        assert!(logs.contains("bug in connection_lost"), "{logs}");
        let calls = calls.borrow();
        let lost = calls.iter().filter(|c| c.starts_with("lost:")).count();
        let client_lost = calls.iter().filter(|c| c.starts_with("client lost:")).count();
        assert_eq!((lost, client_lost), (2, 2), "two connections, each told once: {calls:?}");
    }
}

/// A push producer whose stop_producing panics.
struct BadProducer(Log);

impl Producer for BadProducer {
    fn resume_producing(&self) {}
    fn stop_producing(&self) {
        self.0.borrow_mut().push("stop_producing".into());
        panic!("bug in stop_producing");
    }
}

reactor_test! {
    /// A panic in the producer's stop_producing skips neither the
    /// protocol's connection_lost nor the connector's notification.
    fn stop_producing_panic_still_delivers_connection_lost(r) {
        let addr = closing_server(&r);
        let calls = log();
        let c = calls.clone();
        let protocol = Box::new(move || Fragile {
            log: c.clone(),
            producer: Some(Rc::new(BadProducer(c.clone()))),
            ..Default::default()
        });
        connect_counting(&r, addr, &calls, protocol, false);
        let ((), logs) = capture_logs(|| run_reactor(&r));
        assert!(logs.contains("bug in stop_producing"), "{logs}");
        let calls = calls.borrow();
        assert_eq!(calls[0], "made", "{calls:?}");
        assert_eq!(calls[1], "stop_producing", "{calls:?}");
        assert!(calls[2].starts_with("lost:"), "connection_lost was skipped: {calls:?}");
        assert!(calls[3].starts_with("client lost:"), "the connector was not told: {calls:?}");
        assert_eq!(calls.len(), 4, "{calls:?}");
    }
}
