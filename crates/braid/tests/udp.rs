//! UDP and UNIX datagram ports (Twisted reference §2.3, §3.9, §4.9 and the
//! datagram items of §4.10), each test on every backend. Peers are other
//! braid ports on the same reactor, or std sockets on another thread.

mod common;

use std::cell::RefCell;
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use braid::datagram::{DatagramProtocol, DatagramTransport, SharedDatagram};
use braid::protocols::echo::DatagramEcho;
use braid::{Address, Error, Failure, Reactor};
use common::{capture_logs, collect};

#[derive(Debug, Clone, PartialEq)]
enum Ev {
    Made,
    Start,
    Data(Vec<u8>, Address),
    Truncated { kept: usize, len: usize },
    Refused,
    SendFailed(Option<Address>, String),
    Stop,
}

type Log = Rc<RefCell<Vec<Ev>>>;
type OnData = Box<dyn FnMut(&DatagramTransport, &[u8], &Address)>;

/// Records every call; optionally acts on each datagram.
struct Rec {
    log: Log,
    transport: Option<DatagramTransport>,
    on_data: Option<OnData>,
}

impl Rec {
    fn new() -> (Rec, Log) {
        let log = Log::default();
        (Rec { log: log.clone(), transport: None, on_data: None }, log)
    }

    fn with(on_data: impl FnMut(&DatagramTransport, &[u8], &Address) + 'static) -> (Rec, Log) {
        let (mut rec, log) = Rec::new();
        rec.on_data = Some(Box::new(on_data));
        (rec, log)
    }
}

impl DatagramProtocol for Rec {
    fn make_connection(&mut self, transport: DatagramTransport) {
        self.log.borrow_mut().push(Ev::Made);
        self.transport = Some(transport);
    }
    fn start_protocol(&mut self) {
        self.log.borrow_mut().push(Ev::Start);
    }
    fn datagram_received(&mut self, data: &[u8], from: &Address) {
        self.log.borrow_mut().push(Ev::Data(data.to_vec(), from.clone()));
        if let (Some(f), Some(t)) = (self.on_data.as_mut(), self.transport.as_ref()) {
            f(t, data, from);
        }
    }
    fn datagram_truncated(&mut self, data: &[u8], len: usize, _from: &Address) {
        self.log.borrow_mut().push(Ev::Truncated { kept: data.len(), len });
    }
    fn connection_refused(&mut self) {
        self.log.borrow_mut().push(Ev::Refused);
    }
    fn send_failed(&mut self, to: Option<&Address>, reason: Failure) {
        self.log.borrow_mut().push(Ev::SendFailed(to.cloned(), reason.to_string()));
    }
    fn stop_protocol(&mut self) {
        self.log.borrow_mut().push(Ev::Stop);
    }
}

fn data_of(log: &Log) -> Vec<Vec<u8>> {
    log.borrow()
        .iter()
        .filter_map(|e| match e {
            Ev::Data(d, _) => Some(d.clone()),
            _ => None,
        })
        .collect()
}

fn count(log: &Log, pred: impl Fn(&Ev) -> bool) -> usize {
    log.borrow().iter().filter(|e| pred(e)).count()
}

/// Iterates the reactor until `done()` holds; fails the test if that takes
/// longer than the common watchdog.
fn run_until(r: &Reactor, done: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + common::WATCHDOG;
    while !done() {
        assert!(std::time::Instant::now() < deadline, "watchdog: the condition never held");
        r.iterate(Some(Duration::from_millis(5))).expect("iterate");
    }
}

fn v4(port: u16) -> Address {
    Address::Ip(SocketAddr::from(([127, 0, 0, 1], port)))
}

fn v6(port: u16) -> Address {
    Address::Ip(SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port)))
}

/// A UDP port on 127.0.0.1 that nothing listens on any more.
fn dead_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A fresh socket path in the temp directory (nothing there yet).
fn temp_path(what: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let p = std::env::temp_dir().join(format!("braid-udp-{}-{n}-{what}.sock", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p
}

/// Stops `port` and runs the reactor until its Deferred has fired.
fn stop_and_wait(r: &Reactor, port: &DatagramTransport) {
    let done = collect(&port.stop_listening());
    let d = done.clone();
    run_until(r, move || d.borrow().is_some());
    assert_eq!(*done.borrow(), Some(Ok(())), "stop_listening failed");
}

// §4.9 item 1: log lines name the protocol when the port starts, the port
// when it closes.
reactor_test!(
    fn start_and_close_log_lines(r) {
        let ((), logs) = capture_logs(|| {
            let (rec, _log) = Rec::new();
            let port = r.listen_udp(0, rec, "127.0.0.1", 8192).unwrap();
            stop_and_wait(&r, &port);
        });
        let start = logs.lines().find(|l| l.contains("UDP port 127.0.0.1:") && l.contains("started"));
        let start = start.unwrap_or_else(|| panic!("no start line in:\n{logs}"));
        assert!(start.contains("protocol udp::Rec"), "start line does not name the protocol: {start}");
        assert!(logs.lines().any(|l| l.contains("(UDP port 127.0.0.1:") && l.contains("closed)")), "{logs}");
    }
);

// §4.9 item 2: stop_protocol runs later, never inside stop_listening; the
// Deferred fires after it.
reactor_test!(
    fn stop_protocol_runs_after_stop_listening_returns(r) {
        let (rec, log) = Rec::new();
        let port = r.listen_udp(0, rec, "127.0.0.1", 8192).unwrap();
        assert_eq!(*log.borrow(), vec![Ev::Made, Ev::Start], "make_connection then start_protocol at listen");
        let d = port.stop_listening();
        assert!(!port.listening());
        assert_eq!(count(&log, |e| *e == Ev::Stop), 0, "stop_protocol ran inside stop_listening");
        let seen_stop = Rc::new(RefCell::new(None));
        let (s, l) = (seen_stop.clone(), log.clone());
        let _sink: braid::Deferred<()> = d.then(move |res| {
            *s.borrow_mut() = Some((res.is_ok(), l.borrow().contains(&Ev::Stop)));
            Ok(())
        });
        let s = seen_stop.clone();
        run_until(&r, move || s.borrow().is_some());
        assert_eq!(*seen_stop.borrow(), Some((true, true)), "the Deferred fires once stop_protocol ran");
        assert_eq!(count(&log, |e| *e == Ev::Stop), 1);
        // Stopping again is harmless and fires at once.
        assert_eq!(*collect(&port.stop_listening()).borrow(), Some(Ok(())));
    }
);

// §4.9 items 3, 4 and 8: the host address is the bound one with the real
// port, IPv4 or IPv6; the text form names the port.
reactor_test!(
    fn host_and_text_form(r) {
        let (a, _) = Rec::new();
        let p4 = r.listen_udp(0, a, "127.0.0.1", 8192).unwrap();
        let h = p4.host().ip().expect("an IP address");
        assert!(h.is_ipv4() && h.ip().is_loopback() && h.port() != 0, "{h}");
        assert_eq!(p4.local_addr(), h);
        assert!(p4.to_string().contains(&h.port().to_string()), "{p4}");
        assert!(format!("{p4:?}").contains(&h.port().to_string()), "{p4:?}");
        let (b, _) = Rec::new();
        let p6 = r.listen_udp(0, b, "::1", 8192).unwrap();
        let h6 = p6.host().ip().expect("an IP address");
        assert!(h6.is_ipv6() && h6.port() != 0, "{h6}");
        assert_eq!(p4.max_packet_size(), 8192);
        stop_and_wait(&r, &p4);
        stop_and_wait(&r, &p6);
    }
);

// §4.9 item 5: an interface that is not an IP address is InvalidAddress.
reactor_test!(
    fn non_ip_interface_is_invalid(r) {
        let (rec, log) = Rec::new();
        match r.listen_udp(0, rec, "example.invalid", 8192) {
            Err(Error::InvalidAddress(why)) => assert!(why.contains("example.invalid"), "{why}"),
            other => panic!("expected InvalidAddress, got {other:?}"),
        }
        assert!(log.borrow().is_empty(), "the protocol was started for a port that never existed");
    }
);

// A round trip through an echo port, and the sender's address as seen.
reactor_test!(
    fn echo_round_trip_ipv4(r) {
        let echo = r.listen_udp(0, DatagramEcho::new(), "127.0.0.1", 8192).unwrap();
        let to = Address::Ip(echo.local_addr());
        let (rec, log) = Rec::new();
        let client = r.listen_udp(0, rec, "127.0.0.1", 8192).unwrap();
        for i in 0..50u8 {
            client.write(&[i; 100], Some(&to)).unwrap();
        }
        let l = log.clone();
        run_until(&r, move || data_of(&l).len() == 50);
        let got = data_of(&log);
        for i in 0..50u8 {
            assert!(got.contains(&vec![i; 100]), "datagram {i} not echoed");
        }
        assert!(log.borrow().iter().all(|e| !matches!(e, Ev::Data(_, from) if *from != to)), "wrong sender");
        stop_and_wait(&r, &client);
        stop_and_wait(&r, &echo);
    }
);

// §4.9 item 7: write_sequence sends the pieces as one datagram.
reactor_test!(
    fn write_sequence_is_one_datagram(r) {
        let (rec, log) = Rec::new();
        let server = r.listen_udp(0, rec, "127.0.0.1", 8192).unwrap();
        let (c, _) = Rec::new();
        let client = r.listen_udp(0, c, "127.0.0.1", 8192).unwrap();
        let to = Address::Ip(server.local_addr());
        client.write_sequence(&[b"some", b"", b" pieces", b" of one"], Some(&to)).unwrap();
        let l = log.clone();
        run_until(&r, move || !data_of(&l).is_empty());
        assert_eq!(data_of(&log), vec![b"some pieces of one".to_vec()]);
        stop_and_wait(&r, &client);
        stop_and_wait(&r, &server);
    }
);

// §4.9 item 9: IPv6 ports send and receive, connected or not.
reactor_test!(
    fn ipv6_send_and_receive(r) {
        let (rec, log) = Rec::with(|t, data, from| {
            t.write(data, Some(from)).unwrap();
        });
        let server = r.listen_udp(0, rec, "::1", 8192).unwrap();
        let to = v6(server.local_addr().port());
        let (c, clog) = Rec::new();
        let client = r.listen_udp(0, c, "::1", 8192).unwrap();
        client.write(b"unconnected", Some(&to)).unwrap();
        let (cc, cclog) = Rec::new();
        let connected = r.listen_udp(0, cc, "::", 8192).unwrap();
        connected.connect(&to).unwrap();
        assert_eq!(connected.peer(), Some(to.clone()));
        connected.write(b"connected", None).unwrap();
        // The connected address may be repeated.
        connected.write(b"connected again", Some(&to)).unwrap();
        let (l1, l2) = (clog.clone(), cclog.clone());
        run_until(&r, move || data_of(&l1).len() == 1 && data_of(&l2).len() == 2);
        assert_eq!(data_of(&clog), vec![b"unconnected".to_vec()]);
        assert_eq!(data_of(&cclog), vec![b"connected".to_vec(), b"connected again".to_vec()]);
        assert_eq!(data_of(&log).len(), 3);
        for p in [&client, &connected, &server] {
            stop_and_wait(&r, p);
        }
    }
);

// §4.9 item 10, and the rest of `write`'s address rules.
reactor_test!(
    fn bad_destinations_are_invalid_address(r) {
        let (a, alog) = Rec::new();
        let p4 = r.listen_udp(0, a, "127.0.0.1", 8192).unwrap();
        let (b, _) = Rec::new();
        let p6 = r.listen_udp(0, b, "::1", 8192).unwrap();
        let invalid = |res: Result<(), Error>, what: &str| match res {
            Err(Error::InvalidAddress(_)) => {}
            other => panic!("{what}: expected InvalidAddress, got {other:?}"),
        };
        invalid(p4.write(b"x", Some(&Address::hostname("localhost", 9))), "a host name");
        invalid(p4.write(b"x", Some(&v6(9))), "IPv6 on an IPv4 port");
        invalid(p6.write(b"x", Some(&v4(9))), "IPv4 on an IPv6 port");
        invalid(p4.write(b"x", None), "no address on an unconnected port");
        invalid(p4.write(b"x", Some(&Address::unix("/tmp/x").unwrap())), "a UNIX address");
        invalid(p4.connect(&Address::hostname("localhost", 9)), "connecting to a host name");
        assert_eq!(p4.queued(), 0, "a refused write was queued");
        p4.connect(&v4(9)).unwrap();
        invalid(p4.write(b"x", Some(&v4(10))), "another address than the connected one");
        match p4.connect(&v4(10)) {
            Err(Error::AlreadyConnected) => {}
            other => panic!("a second connect: expected AlreadyConnected, got {other:?}"),
        }
        assert!(!alog.borrow().iter().any(|e| matches!(e, Ev::SendFailed(..))));
        stop_and_wait(&r, &p4);
        stop_and_wait(&r, &p6);
    }
);

// §4.9 item 11: set_broadcast_allowed toggles SO_BROADCAST; without it a
// broadcast datagram is refused by the kernel and reported to send_failed
// with its destination (it was accepted by write, so it is not lost
// silently).
reactor_test!(
    fn broadcast_allowed_and_refused_sends_are_reported(r) {
        let (rec, log) = Rec::new();
        let port = r.listen_udp(0, rec, "", 8192).unwrap();
        assert!(!port.broadcast_allowed().unwrap());
        port.set_broadcast_allowed(true).unwrap();
        assert!(port.broadcast_allowed().unwrap());
        port.set_broadcast_allowed(false).unwrap();
        assert!(!port.broadcast_allowed().unwrap());
        let bcast = Address::Ip(SocketAddr::from(([255, 255, 255, 255], 9)));
        port.write(b"to everyone", Some(&bcast)).unwrap();
        let l = log.clone();
        run_until(&r, move || count(&l, |e| matches!(e, Ev::SendFailed(..))) == 1);
        let failed = log.borrow().iter().find(|e| matches!(e, Ev::SendFailed(..))).cloned();
        match failed {
            Some(Ev::SendFailed(Some(to), why)) => {
                assert_eq!(to, bcast);
                assert!(why.contains("255.255.255.255"), "{why}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(port.queued(), 0);
        stop_and_wait(&r, &port);
    }
);

// EMSGSIZE: a datagram larger than UDP can carry is MessageLength at once.
reactor_test!(
    fn oversize_is_message_length(r) {
        let (rec, _) = Rec::new();
        let p4 = r.listen_udp(0, rec, "127.0.0.1", 8192).unwrap();
        let big = vec![0u8; 65_508];
        match p4.write(&big, Some(&v4(9))) {
            Err(Error::MessageLength { size: Some(65_508), max: 65_507 }) => {}
            other => panic!("expected MessageLength, got {other:?}"),
        }
        match p4.write_sequence(&[&big[..40_000], &big[..30_000]], Some(&v4(9))) {
            Err(Error::MessageLength { .. }) => {}
            other => panic!("write_sequence: expected MessageLength, got {other:?}"),
        }
        // The largest one that fits is fine.
        p4.write(&big[..65_507], Some(&v4(dead_port()))).unwrap();
        stop_and_wait(&r, &p4);
    }
);

// A datagram over max_packet_size is reported truncated, never delivered
// as if whole; the next one is whole again.
reactor_test!(
    fn truncated_datagrams_are_reported(r) {
        let (rec, log) = Rec::new();
        let server = r.listen_udp(0, rec, "127.0.0.1", 100).unwrap();
        let to = Address::Ip(server.local_addr());
        let (c, _) = Rec::new();
        let client = r.listen_udp(0, c, "127.0.0.1", 8192).unwrap();
        client.write(&[7u8; 500], Some(&to)).unwrap();
        client.write(&[8u8; 100], Some(&to)).unwrap();
        let l = log.clone();
        run_until(&r, move || l.borrow().len() >= 4);
        let events = log.borrow().clone();
        assert_eq!(events[2], Ev::Truncated { kept: 100, len: 500 });
        assert!(matches!(&events[3], Ev::Data(d, _) if *d == vec![8u8; 100]), "{:?}", events[3]);
        stop_and_wait(&r, &client);
        stop_and_wait(&r, &server);
    }
);

// Connected mode: datagrams to a port nobody listens on bring ICMP errors,
// which call connection_refused (from the loop, not inside write).
reactor_test!(
    fn connected_port_hears_connection_refused(r) {
        let (rec, log) = Rec::new();
        let port = r.listen_udp(0, rec, "127.0.0.1", 8192).unwrap();
        port.connect(&v4(dead_port())).unwrap();
        let deadline = std::time::Instant::now() + common::WATCHDOG;
        while !log.borrow().contains(&Ev::Refused) {
            assert!(std::time::Instant::now() < deadline, "no connection_refused: {:?}", log.borrow());
            port.write(b"anyone?", None).unwrap();
            assert!(!log.borrow().contains(&Ev::Refused), "connection_refused ran inside write");
            r.iterate(Some(Duration::from_millis(5))).unwrap();
        }
        assert!(log.borrow().contains(&Ev::Refused), "no connection_refused: {:?}", log.borrow());
        assert!(!log.borrow().iter().any(|e| matches!(e, Ev::SendFailed(..))), "{:?}", log.borrow());
        stop_and_wait(&r, &port);
    }
);

// An unconnected port never hears connection_refused, and its writes to a
// dead port are not reported as failures.
reactor_test!(
    fn unconnected_refusals_are_ignored(r) {
        let (rec, log) = Rec::new();
        let port = r.listen_udp(0, rec, "127.0.0.1", 8192).unwrap();
        let to = v4(dead_port());
        for _ in 0..20 {
            port.write(b"anyone?", Some(&to)).unwrap();
        }
        let (c, clog) = Rec::new();
        let probe = r.listen_udp(0, c, "127.0.0.1", 8192).unwrap();
        // A datagram sent after them arrives: the port still works.
        let me = Address::Ip(probe.local_addr());
        let p = port.clone();
        r.call_later(Duration::from_millis(50), move || p.write(b"still here", Some(&me)).unwrap());
        let l = clog.clone();
        run_until(&r, move || !data_of(&l).is_empty());
        assert!(!log.borrow().iter().any(|e| matches!(e, Ev::Refused | Ev::SendFailed(..))), "{:?}", log.borrow());
        stop_and_wait(&r, &port);
        stop_and_wait(&r, &probe);
    }
);

// One protocol on two ports: started once at the first, stopped once after
// the last; datagrams from both ports reach it.
reactor_test!(
    fn a_protocol_shared_by_two_ports(r) {
        let (rec, log) = Rec::new();
        let shared = SharedDatagram::new(rec);
        let a = r.listen_udp(0, shared.clone(), "127.0.0.1", 8192).unwrap();
        let b = r.listen_udp(0, shared.clone(), "127.0.0.1", 8192).unwrap();
        assert_eq!(shared.ports(), 2);
        assert_eq!(*log.borrow(), vec![Ev::Made, Ev::Start, Ev::Made]);
        let (c, _) = Rec::new();
        let client = r.listen_udp(0, c, "127.0.0.1", 8192).unwrap();
        client.write(b"to a", Some(&Address::Ip(a.local_addr()))).unwrap();
        client.write(b"to b", Some(&Address::Ip(b.local_addr()))).unwrap();
        let l = log.clone();
        run_until(&r, move || data_of(&l).len() == 2);
        stop_and_wait(&r, &a);
        assert_eq!(count(&log, |e| *e == Ev::Stop), 0, "stopped while a port still used it");
        stop_and_wait(&r, &b);
        assert_eq!(count(&log, |e| *e == Ev::Stop), 1);
        assert_eq!(shared.ports(), 0);
        stop_and_wait(&r, &client);
    }
);

// A panic in datagram_received is logged; the next datagrams still come.
reactor_test!(
    fn a_panic_in_datagram_received_is_contained(r) {
        let (rec, log) = Rec::with(|_, data, _| {
            if data == b"boom" {
                panic!("protocol bug");
            }
        });
        let ((), logs) = capture_logs(|| {
            let server = r.listen_udp(0, rec, "127.0.0.1", 8192).unwrap();
            let to = Address::Ip(server.local_addr());
            let (c, _) = Rec::new();
            let client = r.listen_udp(0, c, "127.0.0.1", 8192).unwrap();
            for msg in [&b"one"[..], b"boom", b"two", b"boom", b"three"] {
                client.write(msg, Some(&to)).unwrap();
            }
            let l = log.clone();
            run_until(&r, move || data_of(&l).len() == 5);
            assert!(server.listening());
            stop_and_wait(&r, &client);
            stop_and_wait(&r, &server);
        });
        assert_eq!(
            data_of(&log),
            vec![b"one".to_vec(), b"boom".to_vec(), b"two".to_vec(), b"boom".to_vec(), b"three".to_vec()]
        );
        assert_eq!(logs.matches("protocol bug").count(), 2, "{logs}");
        // §4.9 item 6: the log prefix names the protocol.
        let line = logs.lines().find(|l| l.contains("protocol bug")).unwrap();
        assert!(line.contains("in datagram_received for UDP port 127.0.0.1:"), "{line}");
        assert!(line.contains("(udp::Rec)"), "the line does not name the protocol: {line}");
    }
);

// Many datagrams waiting at once: one call each, none lost, in order.
reactor_test!(
    fn a_backlog_is_delivered_one_call_per_datagram(r) {
        let (rec, log) = Rec::new();
        let server = r.listen_udp(0, rec, "127.0.0.1", 8192).unwrap();
        let to = server.local_addr();
        // Sent before the reactor runs, so they wait in the socket together.
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        for i in 0..150u32 {
            client.send_to(&i.to_be_bytes(), to).unwrap();
        }
        let l = log.clone();
        run_until(&r, move || data_of(&l).len() == 150);
        let got: Vec<u32> = data_of(&log).iter().map(|d| u32::from_be_bytes(d[..].try_into().unwrap())).collect();
        assert_eq!(got, (0..150).collect::<Vec<_>>());
        stop_and_wait(&r, &server);
    }
);

// Writes after stop_listening are refused, not queued and lost.
reactor_test!(
    fn writes_after_stop_are_port_closed(r) {
        let (rec, _) = Rec::new();
        let port = r.listen_udp(0, rec, "127.0.0.1", 8192).unwrap();
        drop(port.stop_listening());
        match port.write(b"late", Some(&v4(9))) {
            Err(Error::PortClosed) => {}
            other => panic!("expected PortClosed, got {other:?}"),
        }
        stop_and_wait(&r, &port);
        match port.set_broadcast_allowed(true) {
            Err(Error::PortClosed) => {}
            other => panic!("an option on a closed port: expected PortClosed, got {other:?}"),
        }
    }
);

// A full kernel buffer (EAGAIN) keeps datagrams queued until the socket is
// writable again: every accepted datagram arrives, in order. A UNIX
// datagram receiver that does not read fills up quickly.
reactor_test!(
    fn eagain_keeps_datagrams_queued_until_writable(r) {
        let path = temp_path("eagain");
        let receiver = UnixDatagram::bind(&path).unwrap();
        let (rec, log) = Rec::new();
        let port = r.connect_unix_datagram(&path, rec, 8192, None, None).unwrap();
        const N: u32 = 3_000;
        for i in 0..N {
            port.write(&[&i.to_be_bytes()[..], &[0u8; 60]].concat(), None).unwrap();
        }
        // Once the kernel refuses more, the rest wait in the queue.
        let p = port.clone();
        run_until(&r, move || p.queued() < N as usize);
        let waiting = port.queued();
        assert!(waiting > 0, "the receiver never filled up: nothing stayed queued");
        let reader = std::thread::spawn(move || {
            receiver.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 100];
            while got.len() < N as usize {
                let n = receiver.recv(&mut buf).expect("a datagram");
                assert_eq!(n, 64);
                got.push(u32::from_be_bytes(buf[..4].try_into().unwrap()));
            }
            got
        });
        let p = port.clone();
        run_until(&r, move || p.queued() == 0);
        let got = reader.join().unwrap();
        assert_eq!(got, (0..N).collect::<Vec<_>>(), "datagrams lost or reordered");
        assert!(!log.borrow().iter().any(|e| matches!(e, Ev::SendFailed(..))));
        stop_and_wait(&r, &port);
        let _ = std::fs::remove_file(&path);
    }
);

// The send queue is bounded: past the limit write says SendQueueFull, and
// exactly the accepted datagrams arrive.
reactor_test!(
    fn a_full_send_queue_is_an_error(r) {
        let path = temp_path("full");
        let receiver = UnixDatagram::bind(&path).unwrap();
        let (rec, _) = Rec::new();
        let port = r.connect_unix_datagram(&path, rec, 8192, None, None).unwrap();
        port.set_send_queue_limit(64_000);
        let mut accepted = 0u32;
        let mut refused = 0;
        for i in 0..5_000u32 {
            match port.write(&[&i.to_be_bytes()[..], &[1u8; 996]].concat(), None) {
                Ok(()) => accepted += 1,
                Err(Error::SendQueueFull) => refused += 1,
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(accepted, 64, "the limit counts bytes waiting");
        assert!(refused > 0);
        let reader = std::thread::spawn(move || {
            receiver.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 2000];
            while let Ok(n) = receiver.recv(&mut buf) {
                assert_eq!(n, 1000);
                got.push(u32::from_be_bytes(buf[..4].try_into().unwrap()));
            }
            got
        });
        let p = port.clone();
        run_until(&r, move || p.queued() == 0);
        let got = reader.join().unwrap();
        assert_eq!(got, (0..accepted).collect::<Vec<_>>());
        stop_and_wait(&r, &port);
        let _ = std::fs::remove_file(&path);
    }
);

// §4.10 item 11: listen_unix_datagram applies the mode; the file goes at
// close; datagrams come with the sender's address and answers go back.
reactor_test!(
    fn unix_datagram_listen_mode_and_round_trip(r) {
        use std::os::unix::fs::PermissionsExt;
        let path = temp_path("listen");
        let (rec, log) = Rec::with(|t, data, from| {
            t.write(data, Some(from)).unwrap();
        });
        let port = r.listen_unix_datagram(&path, rec, 8192, Some(0o600)).unwrap();
        assert_eq!(port.host().unix_path(), Some(path.as_path()));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(port.multicast().is_none(), "a UNIX port has no multicast side");
        let me = temp_path("client");
        let (c, clog) = Rec::new();
        let client = r.connect_unix_datagram(&path, c, 8192, None, Some(me.as_path())).unwrap();
        assert_eq!(client.peer().and_then(|p| p.unix_path().map(|p| p.to_path_buf())), Some(path.clone()));
        client.write(b"over a unix datagram socket", None).unwrap();
        let l = clog.clone();
        run_until(&r, move || !data_of(&l).is_empty());
        assert_eq!(data_of(&clog), vec![b"over a unix datagram socket".to_vec()]);
        match &log.borrow()[2] {
            Ev::Data(_, from) => assert_eq!(from.unix_path(), Some(me.as_path())),
            other => panic!("{other:?}"),
        }
        match port.write(b"x", Some(&v4(9))) {
            Err(Error::InvalidAddress(_)) => {}
            other => panic!("an IP address on a UNIX port: expected InvalidAddress, got {other:?}"),
        }
        stop_and_wait(&r, &client);
        stop_and_wait(&r, &port);
        assert!(!path.exists(), "the socket file outlived the port");
        assert!(!me.exists(), "the client's socket file outlived it");
    }
);

// §4.10 item 11: the abstract namespace works for listen and connect.
reactor_test!(
    fn unix_datagram_abstract_names(r) {
        let name = format!("@braid-udp-test-{}-{:?}", std::process::id(), std::thread::current().id());
        let (rec, log) = Rec::new();
        let port = r.listen_unix_datagram(&name, rec, 8192, None).unwrap();
        assert!(port.host().unix_abstract_name().is_some());
        let (c, _) = Rec::new();
        let client = r.connect_unix_datagram(&name, c, 8192, None, None).unwrap();
        client.write(b"abstract", None).unwrap();
        let l = log.clone();
        run_until(&r, move || !data_of(&l).is_empty());
        assert_eq!(data_of(&log), vec![b"abstract".to_vec()]);
        stop_and_wait(&r, &client);
        stop_and_wait(&r, &port);
    }
);

// A live socket file is not taken over; a stale one is; a path with no
// listener is an error at connect time.
reactor_test!(
    fn unix_datagram_socket_files(r) {
        let path = temp_path("live");
        let live = UnixDatagram::bind(&path).unwrap();
        let (rec, _) = Rec::new();
        match r.listen_unix_datagram(&path, rec, 8192, None) {
            Err(Error::CannotListen { .. }) => {}
            other => panic!("expected CannotListen, got {other:?}"),
        }
        drop(live);
        // The file stays behind: stale now.
        assert!(path.exists());
        let (rec, _) = Rec::new();
        let port = r.listen_unix_datagram(&path, rec, 8192, None).unwrap();
        stop_and_wait(&r, &port);
        let (rec, log) = Rec::new();
        match r.connect_unix_datagram(temp_path("nobody"), rec, 8192, None, None) {
            Err(e) => assert!(e.to_string().contains("nobody"), "{e}"),
            Ok(_) => panic!("connected to nothing"),
        }
        assert!(log.borrow().is_empty());
    }
);

// adopt_datagram_port: a bound UDP socket (IPv4 or IPv6) or UNIX datagram
// socket made elsewhere; the wrong family or type is refused.
reactor_test!(
    fn adopted_datagram_ports(r) {
        use rustix::net::AddressFamily;
        let std4 = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr4 = std4.local_addr().unwrap();
        let (rec, log) = Rec::new();
        let p4 = r.adopt_datagram_port(std4, AddressFamily::INET, rec, 8192).unwrap();
        assert_eq!(p4.local_addr(), addr4);
        let std6 = UdpSocket::bind("[::1]:0").unwrap();
        match r.adopt_datagram_port(std6.try_clone().unwrap(), AddressFamily::INET, Rec::new().0, 8192) {
            Err(e) => assert!(e.to_string().contains("family"), "{e}"),
            Ok(_) => panic!("adopted an IPv6 socket as IPv4"),
        }
        let p6 = r.adopt_datagram_port(std6, AddressFamily::INET6, Rec::new().0, 8192).unwrap();
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        match r.adopt_datagram_port(tcp, AddressFamily::INET, Rec::new().0, 8192) {
            Err(e) => assert!(e.to_string().contains("not a datagram socket"), "{e}"),
            Ok(_) => panic!("adopted a TCP listener as a datagram port"),
        }
        let path = temp_path("adopt");
        let unix = UnixDatagram::bind(&path).unwrap();
        let (urec, ulog) = Rec::new();
        let pu = r.adopt_datagram_port(unix, AddressFamily::UNIX, urec, 8192).unwrap();
        let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
        sender.send_to(b"adopted", addr4).unwrap();
        let usender = UnixDatagram::unbound().unwrap();
        usender.send_to(b"adopted unix", &path).unwrap();
        let (l, ul) = (log.clone(), ulog.clone());
        run_until(&r, move || !data_of(&l).is_empty() && !data_of(&ul).is_empty());
        assert_eq!(data_of(&log), vec![b"adopted".to_vec()]);
        assert_eq!(data_of(&ulog), vec![b"adopted unix".to_vec()]);
        match &ulog.borrow()[2] {
            Ev::Data(_, from) => assert!(from.is_unix_unnamed(), "{from}"),
            other => panic!("{other:?}"),
        }
        for p in [&p4, &p6, &pu] {
            stop_and_wait(&r, p);
        }
        assert!(path.exists(), "an adopted socket's file belongs to whoever bound it");
        let _ = std::fs::remove_file(&path);
    }
);

// Writes made in one callback go out together after the batch; a port
// dropped by its owner keeps serving until stop_listening.
reactor_test!(
    fn a_port_lives_without_its_handle(r) {
        let echo_port = r.listen_udp(0, DatagramEcho::new(), "127.0.0.1", 8192).unwrap().local_addr();
        let (rec, log) = Rec::new();
        let client = r.listen_udp(0, rec, "127.0.0.1", 8192).unwrap();
        for i in 0..10u8 {
            client.write(&[i], Some(&Address::Ip(echo_port))).unwrap();
        }
        let l = log.clone();
        run_until(&r, move || data_of(&l).len() == 10);
        stop_and_wait(&r, &client);
    }
);

// A flood is read in bounded slices (Twisted's 256 KiB per readiness
// event): a timer due at once gets its turn long before a backlog of
// 1.5 MiB is drained, and every datagram is still delivered, one call
// each. The receive buffer is forced large (as root) so the backlog fits.
reactor_test!(
    fn a_flood_is_read_in_bounded_slices(r) {
        use rustix::net::{sockopt, AddressFamily};
        let std_sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sockopt::set_socket_recv_buffer_size_force(&std_sock, 16 << 20)
            .expect("SO_RCVBUFFORCE needs root (CAP_NET_ADMIN); the tests run as root");
        let to = std_sock.local_addr().unwrap();
        let seen_by_timer = Rc::new(RefCell::new(None));
        let delivered = Rc::new(std::cell::Cell::new(0usize));
        let (rr, s, n) = (r.clone(), seen_by_timer.clone(), delivered.clone());
        let (rec, log) = Rec::with(move |_, _, _| {
            n.set(n.get() + 1);
            if n.get() == 1 {
                let (s, n) = (s.clone(), n.clone());
                rr.call_later(Duration::ZERO, move || *s.borrow_mut() = Some(n.get()));
            }
        });
        let server = r.adopt_datagram_port(std_sock, AddressFamily::INET, rec, 8192).unwrap();
        const N: u32 = 1_500;
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        for i in 0..N {
            client.send_to(&[&i.to_be_bytes()[..], &[0u8; 1020]].concat(), to).unwrap();
        }
        let l = log.clone();
        run_until(&r, move || data_of(&l).len() == N as usize);
        let first_slice = seen_by_timer.borrow().expect("the timer ran");
        // One event reads at most 256 KiB plus the batch it was in.
        assert!(first_slice <= 256 + 32, "{first_slice} datagrams were read before the timer ran");
        let got: Vec<u32> =
            data_of(&log).iter().map(|d| u32::from_be_bytes(d[..4].try_into().unwrap())).collect();
        assert_eq!(got, (0..N).collect::<Vec<_>>());
        stop_and_wait(&r, &server);
    }
);

// A reactor dropped with ports open closes them: the socket is released
// (its address can be bound again) and the protocol is stopped.
reactor_test!(
    fn dropping_the_reactor_closes_its_ports(r) {
        let (rec, log) = Rec::new();
        let port = r.listen_udp(0, rec, "127.0.0.1", 8192).unwrap();
        let addr = port.local_addr();
        let path = temp_path("dropped");
        let (urec, ulog) = Rec::new();
        let unix = r.listen_unix_datagram(&path, urec, 8192, None).unwrap();
        drop(r);
        assert_eq!(log.borrow().last(), Some(&Ev::Stop));
        assert_eq!(ulog.borrow().last(), Some(&Ev::Stop));
        UdpSocket::bind(addr).expect("the port's socket is still open");
        assert!(!path.exists(), "the socket file outlived the reactor");
        assert!(!port.listening() && !unix.listening());
    }
);
