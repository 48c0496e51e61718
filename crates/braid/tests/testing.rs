//! The test doubles in `braid::testing`: `StringTransport` (Twisted's
//! `proto_helpers.StringTransport`) and `MemoryReactor`
//! (`MemoryReactorClock`). The `Clock` is covered in tests/task.rs.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use braid::protocols::echo::Echo;
use braid::task::LoopingCall;
use braid::testing::{MemoryReactor, ProducerState, StringTransport};
use braid::transport::TransportOps;
use braid::{ClientFactory, Connector, Error, Factory, Failure, Producer, Protocol, ReactorTime, Transport};

/// A line protocol: greets each line, closes on "QUIT", and records what
/// happened to it.
#[derive(Default)]
struct Greeter {
    transport: Option<Transport>,
    buf: Vec<u8>,
    events: Rc<RefCell<Vec<String>>>,
}

impl Protocol for Greeter {
    fn connection_made(&mut self, transport: Transport) {
        transport.write(b"welcome\r\n");
        self.events.borrow_mut().push(format!("made from {:?}", transport.peer().ip()));
        self.transport = Some(transport);
    }

    fn data_received(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
        while let Some(pos) = self.buf.windows(2).position(|w| w == b"\r\n") {
            let line: Vec<u8> = self.buf.drain(..pos + 2).take(pos).collect();
            let t = self.transport.as_ref().expect("connected");
            if line == b"QUIT" {
                t.write(b"bye\r\n");
                t.lose_connection();
            } else {
                t.write_sequence(&[b"hello ", &line, b"\r\n"]);
            }
        }
    }

    fn connection_lost(&mut self, reason: Failure) {
        self.events.borrow_mut().push(format!("lost: {reason}"));
    }
}

#[test]
fn string_transport_records_writes_and_close() {
    let mut p = Greeter::default();
    let events = p.events.clone();
    let tr = StringTransport::new();
    tr.connect(&mut p);
    assert_eq!(tr.value(), b"welcome\r\n");
    assert_eq!(events.borrow()[0], "made from Some(10.0.0.1:12345)");
    tr.clear();
    assert!(tr.value().is_empty());

    // Data arrives in pieces, as from a socket.
    tr.feed(&mut p, b"wor");
    assert!(tr.value().is_empty());
    tr.feed(&mut p, b"ld\r\nbraid\r\n");
    assert_eq!(tr.take(), b"hello world\r\nhello braid\r\n");
    assert!(tr.value().is_empty(), "take clears");
    assert!(!tr.disconnecting());
    assert!(TransportOps::connected(&tr));

    tr.feed(&mut p, b"QUIT\r\n");
    assert_eq!(tr.value(), b"bye\r\n");
    assert!(tr.disconnecting(), "lose_connection recorded");
    assert!(!tr.aborted());
    assert!(!TransportOps::connected(&tr));
    // Nothing calls connection_lost by itself; the test decides when.
    assert_eq!(events.borrow().len(), 1);
    tr.lose(&mut p, Failure::new(Error::ConnectionDone));
    assert_eq!(events.borrow()[1], "lost: connection was closed cleanly");
}

#[test]
fn string_transport_records_transport_calls() {
    let tr = StringTransport::with_addrs("127.0.0.1:1".parse().unwrap(), "127.0.0.1:2".parse().unwrap());
    let t = tr.transport();
    assert_eq!(t.host().and_then(|a| a.ip()), Some("127.0.0.1:1".parse().unwrap()));
    assert_eq!(t.peer().ip(), Some("127.0.0.1:2".parse().unwrap()));
    t.write_vec(b"ab".to_vec());
    t.write_sequence(&[b"c", b"d"]);
    assert_eq!(tr.value(), b"abcd");
    assert_eq!(t.buffered(), 4);
    t.tcp().expect("a TCP transport").set_nodelay(true).unwrap();
    t.tcp().expect("a TCP transport").set_keepalive(true).unwrap();
    t.set_write_buffer_limits(100, 10);
    assert!(tr.nodelay() && tr.keepalive());
    // It stands for a TCP connection: no UNIX-only options to fake.
    assert!(t.unix().is_none());
    assert_eq!(tr.write_buffer_limits(), (100, 10));
    t.lose_write_connection();
    assert!(tr.write_closed() && !tr.disconnecting());
    t.abort_connection();
    assert!(tr.aborted() && tr.disconnecting());
}

#[test]
fn string_transport_reports_producer_state() {
    let tr = StringTransport::new();
    let t = tr.transport();
    assert_eq!(tr.producer_state(), ProducerState::Producing);
    t.pause_producing();
    assert_eq!(tr.producer_state(), ProducerState::Paused);
    t.resume_producing();
    assert_eq!(tr.producer_state(), ProducerState::Producing);
    t.stop_producing();
    assert_eq!(tr.producer_state(), ProducerState::Stopped);
    // A stopped producer cannot be resumed or paused.
    t.resume_producing();
    t.pause_producing();
    assert_eq!(tr.producer_state(), ProducerState::Stopped);

    // After lose_connection, pause/resume are ignored as well.
    let tr = StringTransport::new();
    tr.transport().lose_connection();
    tr.transport().pause_producing();
    assert_eq!(tr.producer_state(), ProducerState::Producing);
}

struct CountingProducer {
    resumed: Cell<u32>,
}

impl Producer for CountingProducer {
    fn resume_producing(&self) {
        self.resumed.set(self.resumed.get() + 1);
    }
    fn stop_producing(&self) {}
}

#[test]
fn string_transport_records_registered_producers() {
    let tr = StringTransport::new();
    let t = tr.transport();
    assert!(tr.producer().is_none());
    let producer = Rc::new(CountingProducer { resumed: Cell::new(0) });
    t.register_producer(producer.clone(), false).unwrap();
    assert!(!tr.streaming());
    let registered = tr.producer().expect("registered");
    registered.resume_producing();
    assert_eq!(producer.resumed.get(), 1, "the same producer");
    assert!(t.register_producer(producer.clone(), true).is_err(), "two producers are refused");
    t.unregister_producer();
    assert!(tr.producer().is_none());
    t.register_producer(producer, true).unwrap();
    assert!(tr.streaming());
}

#[test]
fn echo_protocol_unit_test() {
    let mut echo = Echo::default();
    let tr = StringTransport::new();
    tr.connect(&mut echo);
    // Echo registers its own transport as a streaming producer.
    assert!(tr.producer().is_some() && tr.streaming());
    tr.feed(&mut echo, b"abc");
    tr.feed(&mut echo, b"def");
    assert_eq!(tr.value(), b"abcdef");
}

// ------------------------------------------------------------- MemoryReactor

#[test]
fn memory_reactor_records_listen_tcp() {
    let reactor = MemoryReactor::new();
    let built = Rc::new(Cell::new(0));
    let b = built.clone();
    let port = reactor
        .listen_tcp(
            "127.0.0.1:8080",
            move || {
                b.set(b.get() + 1);
                Echo::default()
            },
            77,
        )
        .unwrap();
    assert_eq!(port.local_addr(), "127.0.0.1:8080".parse::<SocketAddr>().unwrap());
    let any = reactor.listen_tcp(0u16, Echo::default, 50).unwrap();
    assert_ne!(any.local_addr().port(), 0, "port 0 gets a made-up port");

    let servers = reactor.tcp_servers();
    assert_eq!(servers.len(), 2);
    assert_eq!(servers[0].addr.port(), 8080);
    assert_eq!(servers[0].backlog, 77);
    assert_eq!(servers[1].backlog, 50);

    // Drive the factory by hand.
    let mut proto = servers[0].build_protocol("10.1.1.1:999".parse().unwrap()).unwrap();
    assert_eq!(built.get(), 1);
    let tr = StringTransport::new();
    tr.connect(&mut *proto);
    tr.feed(&mut *proto, b"x");
    assert_eq!(tr.value(), b"x");

    assert!(port.listening());
    assert!(port.stop_listening().called());
    assert!(!port.listening());

    // Addresses that cannot be parsed are refused as the reactor does.
    assert!(matches!(
        reactor.listen_tcp("not an address", Echo::default, 1),
        Err(Error::CannotListen { .. })
    ));
}

/// A client factory that counts protocols and refuses the second.
struct OneShot {
    built: Rc<Cell<u32>>,
}

impl Factory for OneShot {
    fn build_protocol(&mut self, _addr: &braid::Address) -> Option<Box<dyn Protocol>> {
        self.built.set(self.built.get() + 1);
        if self.built.get() > 1 {
            None
        } else {
            Some(Box::new(Echo::default()))
        }
    }
}

impl ClientFactory for OneShot {
    fn client_connection_failed(&mut self, _connector: &dyn Connector, _reason: Failure) {}
}

#[test]
fn memory_reactor_records_connect_tcp() {
    let reactor = MemoryReactor::new();
    let built = Rc::new(Cell::new(0));
    let bind: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let connector = reactor.connect_tcp(
        "example.test",
        4321,
        OneShot { built: built.clone() },
        Some(Duration::from_secs(7)),
        Some(bind),
    );
    assert_eq!(connector.destination(), ("example.test".to_string(), 4321));
    let clients = reactor.tcp_clients();
    assert_eq!(clients.len(), 1);
    let c = &clients[0];
    assert_eq!((c.host.as_str(), c.port), ("example.test", 4321));
    assert_eq!(c.timeout, Some(Duration::from_secs(7)));
    assert_eq!(c.bind, Some(bind));
    assert_eq!(built.get(), 0, "nothing is called on the factory by connect_tcp");

    let peer: SocketAddr = "10.0.0.2:4321".parse().unwrap();
    assert!(c.build_protocol(peer).is_some());
    assert!(c.with_factory(|f| f.build_protocol(&braid::Address::Ip(peer))).is_none());
    assert_eq!(built.get(), 2);

    connector.stop_connecting();
    assert!(c.connector.stopped_connecting(), "the record shares the handle");
    connector.disconnect();
    assert!(c.connector.disconnected());
}

#[test]
fn memory_reactor_keeps_time() {
    let reactor = MemoryReactor::new();
    assert_eq!(reactor.seconds(), 0.0);
    let fired = Rc::new(Cell::new(false));
    let f = fired.clone();
    let call = reactor.call_later(Duration::from_secs(3), move || f.set(true));
    assert_eq!(reactor.get_delayed_calls(), vec![call]);
    reactor.advance(Duration::from_secs(3));
    assert!(fired.get());
    assert_eq!(reactor.clock().seconds(), 3.0);

    // As a ReactorTime, for code that takes a clock.
    let t: Rc<dyn ReactorTime> = reactor.clone().into();
    assert_eq!(t.seconds(), 3.0);
    let n = Rc::new(Cell::new(0));
    let c = n.clone();
    let lc = LoopingCall::new(t, move || c.set(c.get() + 1));
    lc.start(Duration::from_secs(1), true).unwrap();
    reactor.advance(Duration::from_secs(2));
    assert_eq!(n.get(), 2);
    lc.stop().unwrap();
}
