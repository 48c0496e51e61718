//! TLS over real loopback sockets, on every backend: `listen_ssl` and
//! `connect_ssl` over TCP, TLS over UNIX sockets through the factory
//! wrappers, bad peers (garbage, a silent one, a name mismatch) ending
//! only their own connection, and a slow reader keeping the server's
//! buffer bounded. Twisted reference §4.7, §4.11.

mod common;
mod tls_support;

use std::cell::{Cell, RefCell};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::rc::Rc;
use std::time::Duration;

use braid::tls::{ClientConfig, ServerConfig, TlsClientFactory, TlsFactory};
use braid::{Producer, Reactor, Transport};
use common::run_reactor;
use tls_support::{payload, Ca, Events, Rec};

fn local() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// Stops the reactor once `n` connections have been lost.
fn stop_after(r: &Reactor, n: u32) -> impl Fn() + Clone {
    let left = Rc::new(Cell::new(n));
    let r = r.clone();
    move || {
        left.set(left.get() - 1);
        if left.get() == 0 {
            let _ = r.stop();
        }
    }
}

/// A server protocol that echoes and records.
fn echo_server(log: Events, done: impl Fn() + 'static) -> Rec {
    Rec {
        log,
        on_data: Some(Box::new(|t, d| t.write(d))),
        on_lost: Some(Box::new(move |_| done())),
        ..Default::default()
    }
}

/// A client that sends `data` as soon as it is connected (before the
/// handshake: it is queued), closes once all of it came back, and checks
/// the TLS side of its transport on the way.
fn echo_client(log: Events, got: Rc<RefCell<Vec<u8>>>, data: Vec<u8>, done: impl Fn() + 'static) -> Rec {
    Rec {
        log,
        data: got,
        on_made: Some(Box::new(move |t| t.write(&data))),
        on_data: Some(Box::new(move |t, _| {
            let tls = t.tls().expect("a TLS transport");
            assert!(tls.handshake_complete());
            assert_eq!(tls.protocol_version(), Some("TLSv1.3"));
            assert!(!tls.peer_certificates().is_empty(), "the server's chain is there");
        })),
        on_lost: Some(Box::new(move |_| done())),
        ..Default::default()
    }
}

/// Closes the client's connection once `n` bytes came back.
fn close_at(rec: &mut Rec, n: usize) {
    let got = rec.data.clone();
    let mut inner = rec.on_data.take();
    rec.on_data = Some(Box::new(move |t, d| {
        if let Some(f) = inner.as_mut() {
            f(t, d);
        }
        if got.borrow().len() >= n {
            t.lose_connection();
        }
    }));
}

reactor_test! {
    /// `listen_ssl` and `connect_ssl`: a large payload written before the
    /// handshake comes back whole; the client's `lose_connection` is a
    /// clean close (close_notify) on both ends.
    fn echo_over_tcp(r) {
        let ca = Ca::new();
        let done = stop_after(&r, 2);
        let slog: Events = Default::default();
        let (sl, d) = (slog.clone(), done.clone());
        let port = r.listen_ssl(local(), move || echo_server(sl.clone(), d.clone()), ca.server(), 50).unwrap();
        let data = payload(300_000);
        let (clog, got): (Events, Rc<RefCell<Vec<u8>>>) = Default::default();
        let (cl, g, dd, d) = (clog.clone(), got.clone(), data.clone(), done.clone());
        let client = move || {
            let mut c = echo_client(cl.clone(), g.clone(), dd.clone(), d.clone());
            close_at(&mut c, dd.len());
            c
        };
        r.connect_ssl("localhost", port.local_addr().port(), client, ca.client(), None, None).unwrap();
        run_reactor(&r);
        assert!(*got.borrow() == data, "{} of {} bytes came back", got.borrow().len(), data.len());
        assert_eq!(*clog.borrow(), ["made", "lost: connection was closed cleanly"]);
        assert_eq!(*slog.borrow(), ["made", "lost: connection was closed cleanly"]);
    }
}

reactor_test! {
    /// TLS over UNIX sockets: `listen_unix` with a `TlsFactory`,
    /// `connect_unix` with a `TlsClientFactory`; the transport has both
    /// its TLS and its UNIX side.
    fn echo_over_unix(r) {
        let ca = Ca::new();
        let path = std::env::temp_dir().join(format!("braid-tls-{}-{:?}.sock", std::process::id(), r.backend()));
        let _ = std::fs::remove_file(&path);
        let done = stop_after(&r, 2);
        let slog: Events = Default::default();
        let (sl, d) = (slog.clone(), done.clone());
        let server = move || {
            let mut s = echo_server(sl.clone(), d.clone());
            s.on_made = Some(Box::new(|t| {
                assert!(t.unix().is_some() && t.tls().is_some() && t.tcp().is_none());
            }));
            s
        };
        let _port = r.listen_unix(&path, TlsFactory::new(&r, server, ca.server()), 50, None, false).unwrap();
        let data = payload(100_000);
        let (clog, got): (Events, Rc<RefCell<Vec<u8>>>) = Default::default();
        let (cl, g, dd, d) = (clog.clone(), got.clone(), data.clone(), done.clone());
        let client = move || {
            let mut c = echo_client(cl.clone(), g.clone(), dd.clone(), d.clone());
            close_at(&mut c, dd.len());
            c
        };
        let factory = TlsClientFactory::new(&r, client, ca.client(), "localhost").unwrap();
        r.connect_unix(&path, factory, None, false);
        run_reactor(&r);
        let _ = std::fs::remove_file(&path);
        assert!(*got.borrow() == data, "{} of {} bytes came back", got.borrow().len(), data.len());
        assert_eq!(*clog.borrow(), ["made", "lost: connection was closed cleanly"]);
        assert_eq!(*slog.borrow(), ["made", "lost: connection was closed cleanly"]);
    }
}

reactor_test! {
    /// Garbage instead of a ClientHello ends that connection with a TLS
    /// handshake error; the listener and the next client carry on.
    fn garbage_ends_only_its_connection(r) {
        let ca = Ca::new();
        let slog: Events = Default::default();
        let sl = slog.clone();
        let port = r.listen_ssl(local(), move || echo_server(sl.clone(), || ()), ca.server(), 50).unwrap();
        let addr = port.local_addr();
        let remote = r.remote();
        let config = ca.rustls_client();
        let peer = std::thread::spawn(move || {
            let mut bad = TcpStream::connect(addr).unwrap();
            bad.set_read_timeout(Some(common::WATCHDOG)).unwrap();
            bad.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
            let mut answer = Vec::new();
            let ended = bad.read_to_end(&mut answer).is_ok();
            // Then a real client on the same port.
            let sock = TcpStream::connect(addr).unwrap();
            sock.set_read_timeout(Some(common::WATCHDOG)).unwrap();
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let mut good = rustls::StreamOwned::new(rustls::ClientConnection::new(config, name).unwrap(), sock);
            good.write_all(b"ping").unwrap();
            let mut back = [0u8; 4];
            good.read_exact(&mut back).unwrap();
            let _ = remote.call_from_thread(|r| {
                let _ = r.stop();
            });
            (ended, answer, back)
        });
        run_reactor(&r);
        let (ended, answer, back) = peer.join().unwrap();
        assert!(ended, "the garbage client's connection was closed");
        assert_eq!(answer.first(), Some(&0x15), "it got a TLS alert record: {answer:?}");
        assert_eq!(&back, b"ping");
        let log = slog.borrow();
        assert_eq!(log[0], "made");
        assert!(log[1].starts_with("lost: TLS handshake failed"), "{log:?}");
        assert_eq!(log[2], "made", "the second client was served: {log:?}");
    }
}

reactor_test! {
    /// A client that connects and says nothing is dropped when the
    /// handshake timeout passes.
    fn silent_peer_hits_the_handshake_timeout(r) {
        let ca = Ca::new();
        let config = ca.server().with_handshake_timeout(Some(Duration::from_millis(200)));
        let slog: Events = Default::default();
        let sl = slog.clone();
        let port = r.listen_ssl(local(), move || echo_server(sl.clone(), || ()), config, 50).unwrap();
        let addr = port.local_addr();
        let remote = r.remote();
        let peer = std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(common::WATCHDOG)).unwrap();
            let mut buf = Vec::new();
            // Ends (EOF or reset) when the server gives up on us.
            let r2 = s.read_to_end(&mut buf);
            let _ = remote.call_from_thread(|r| {
                let _ = r.stop();
            });
            r2.map_err(|e| e.kind())
        });
        run_reactor(&r);
        let ended = peer.join().unwrap();
        assert!(
            ended.is_ok() || ended == Err(std::io::ErrorKind::ConnectionReset),
            "the silent client was dropped: {ended:?}"
        );
        let log = slog.borrow();
        assert_eq!(log.len(), 2, "{log:?}");
        assert!(log[1].contains("timed out") && log[1].contains("handshake"), "{log:?}");
    }
}

reactor_test! {
    /// A certificate that does not name the host is refused by the
    /// client; both ends hear a TLS handshake error, not a clean close.
    fn hostname_mismatch_is_refused(r) {
        let ca = Ca::new();
        let config = ServerConfig::builder(ca.identity(&["elsewhere.example"])).build().unwrap();
        let done = stop_after(&r, 2);
        let slog: Events = Default::default();
        let (sl, d) = (slog.clone(), done.clone());
        let port = r.listen_ssl(local(), move || echo_server(sl.clone(), d.clone()), config, 50).unwrap();
        let clog: Events = Default::default();
        let (cl, d) = (clog.clone(), done.clone());
        let client = move || Rec {
            log: cl.clone(),
            on_made: Some(Box::new(|t| t.write(b"never seen"))),
            on_lost: Some(Box::new({
                let d = d.clone();
                move |_| d()
            })),
            ..Default::default()
        };
        r.connect_ssl("localhost", port.local_addr().port(), client, ca.client(), None, None).unwrap();
        run_reactor(&r);
        let c = clog.borrow();
        assert!(c[1].starts_with("lost: TLS handshake failed") && c[1].contains("certificate"), "{c:?}");
        let s = slog.borrow();
        assert!(s[1].starts_with("lost: TLS handshake failed"), "{s:?}");
    }
}

/// Writes a large total in chunks as long as it is not paused, recording
/// the most the transport ever held.
struct Flood {
    t: Transport,
    data: Vec<u8>,
    paused: Cell<bool>,
    sent: Cell<usize>,
    total: usize,
    pauses: Cell<u32>,
    peak: Cell<usize>,
}

impl Producer for Flood {
    fn pause_producing(&self) {
        self.paused.set(true);
        self.pauses.set(self.pauses.get() + 1);
    }
    fn resume_producing(&self) {
        self.paused.set(false);
        while !self.paused.get() && self.sent.get() < self.total {
            let at = self.sent.get();
            let n = CHUNK.min(self.total - at);
            self.t.write(&self.data[at..at + n]);
            self.sent.set(at + n);
            self.peak.set(self.peak.get().max(self.t.buffered()));
        }
        if self.sent.get() == self.total {
            self.t.unregister_producer();
            self.t.lose_connection();
        }
    }
    fn stop_producing(&self) {}
}

const CHUNK: usize = 16 * 1024;

reactor_test! {
    /// A reader slower than the writer: the server's producer is paused
    /// by the TLS transport, so it never holds much more than the
    /// high-water mark (plaintext queued plus ciphertext below), and every
    /// byte still arrives in order.
    fn slow_reader_keeps_the_buffer_bounded(r) {
        let ca = Ca::new();
        const TOTAL: usize = 16 << 20;
        let flood: Rc<RefCell<Option<Rc<Flood>>>> = Default::default();
        let f = flood.clone();
        let server = move || {
            let f = f.clone();
            Rec {
                on_made: Some(Box::new(move |t| {
                    let p = Rc::new(Flood {
                        t: t.clone(),
                        data: payload(TOTAL),
                        paused: Cell::new(false),
                        sent: Cell::new(0),
                        total: TOTAL,
                        pauses: Cell::new(0),
                        peak: Cell::new(0),
                    });
                    t.register_producer(p.clone(), true).unwrap();
                    *f.borrow_mut() = Some(p.clone());
                    p.resume_producing();
                })),
                ..Default::default()
            }
        };
        let port = r.listen_ssl(local(), server, ca.server(), 50).unwrap();
        let addr = port.local_addr();
        let remote = r.remote();
        let config = ca.rustls_client();
        let peer = std::thread::spawn(move || {
            let sock = TcpStream::connect(addr).unwrap();
            rustix::net::sockopt::set_socket_recv_buffer_size(&sock, 64 * 1024).unwrap();
            sock.set_read_timeout(Some(common::WATCHDOG)).unwrap();
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let mut c = rustls::StreamOwned::new(rustls::ClientConnection::new(config, name).unwrap(), sock);
            let mut got = Vec::with_capacity(TOTAL);
            let mut buf = vec![0u8; 64 * 1024];
            // Not reading at first, so the server's buffers fill.
            std::thread::sleep(Duration::from_millis(200));
            loop {
                match c.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e) => panic!("after {} bytes: {e}", got.len()),
                }
            }
            let _ = remote.call_from_thread(|r| {
                let _ = r.stop();
            });
            got
        });
        run_reactor(&r);
        let got = peer.join().unwrap();
        assert!(got == payload(TOTAL), "{} of {TOTAL} bytes, in order?", got.len());
        let p = flood.borrow().clone().unwrap();
        // Once by the queue before the handshake, then by the socket.
        assert!(p.pauses.get() > 1, "the producer was never paused by the transport below");
        let bound = braid::transport::DEFAULT_HIGH_WATER + 2 * CHUNK + 4096;
        assert!(p.peak.get() <= bound, "held {} bytes (bound {bound})", p.peak.get());
    }
}

reactor_test! {
    /// A client certificate the server requires: accepted when signed by
    /// the CA the server trusts (and visible to the server), refused when
    /// missing.
    fn mutual_tls_accepted_and_refused(r) {
        let ca = Ca::new();
        let config = ServerConfig::builder(ca.identity(&["localhost"]))
            .client_auth(braid::tls::ClientAuth::Required(ca.roots()))
            .build()
            .unwrap();
        let done = stop_after(&r, 4);
        let slog: Events = Default::default();
        let peer_certs = Rc::new(Cell::new(0usize));
        let (sl, d, pc) = (slog.clone(), done.clone(), peer_certs.clone());
        let server = move || {
            let mut s = echo_server(sl.clone(), d.clone());
            let pc = pc.clone();
            s.on_data = Some(Box::new(move |t, data| {
                pc.set(t.tls().unwrap().peer_certificates().len());
                t.write(data);
                t.lose_connection();
            }));
            s
        };
        let port = r.listen_ssl(local(), server, config, 50).unwrap();
        let with_cert = ClientConfig::builder(ca.roots()).identity(ca.identity(&["client.example"])).build().unwrap();
        let mut logs = Vec::new();
        for config in [with_cert, ca.client()] {
            let log = Events::default();
            let (cl, d) = (log.clone(), done.clone());
            let client = move || Rec {
                log: cl.clone(),
                on_made: Some(Box::new(|t| t.write(b"hi"))),
                on_lost: Some(Box::new({
                    let d = d.clone();
                    move |_| d()
                })),
                ..Default::default()
            };
            r.connect_ssl("localhost", port.local_addr().port(), client, config, None, None).unwrap();
            logs.push(log);
        }
        run_reactor(&r);
        assert_eq!(*logs[0].borrow(), ["made", "lost: connection was closed cleanly"]);
        assert!(logs[1].borrow()[1].starts_with("lost: TLS"), "{:?}", logs[1].borrow());
        assert_eq!(peer_certs.get(), 1, "the server saw the client's certificate");
        let s = slog.borrow();
        assert_eq!(s.iter().filter(|l| l.starts_with("lost: TLS handshake failed")).count(), 1, "{s:?}");
    }
}

#[test]
fn a_bad_server_name_fails_connect_ssl_at_once() {
    let r = common::build(braid::Backend::Poll);
    let ca = Ca::new();
    let e = r.connect_ssl("bad name!", 443, Rec::default, ca.client(), None, None).unwrap_err();
    assert!(e.to_string().contains("bad name!"), "{e}");
}

reactor_test! {
    /// `start_tls` on both sides of a live TCP connection (a
    /// `StartTlsFactory` on each end): the line before it goes in the
    /// clear, what follows is encrypted, and `lose_connection` right after
    /// a write made after `start_tls` still delivers the write and ends
    /// cleanly on both ends (Twisted's test_disconnectAfterWriteAfterStartTLS).
    fn start_tls_on_both_sides_of_a_live_connection(r) {
        let ca = Ca::new();
        let done = stop_after(&r, 2);
        let (slog, sdata): (Events, Rc<RefCell<Vec<u8>>>) = Default::default();
        let (sl, sd, d, sc) = (slog.clone(), sdata.clone(), done.clone(), ca.server());
        let server = move || {
            let (d, sc) = (d.clone(), sc.clone());
            Rec {
                log: sl.clone(),
                data: sd.clone(),
                on_data: Some(Box::new(move |t, data| {
                    if data == b"STARTTLS\r\n" {
                        t.write(b"GO\r\n");
                        t.tls().unwrap().start_tls_server(&sc).unwrap();
                    }
                })),
                on_lost: Some(Box::new(move |_| d())),
                ..Default::default()
            }
        };
        let port = r.listen_tcp(local(), braid::tls::StartTlsFactory::new(&r, server), 50).unwrap();
        let (clog, cdata): (Events, Rc<RefCell<Vec<u8>>>) = Default::default();
        let (cl, cd, d, cc) = (clog.clone(), cdata.clone(), done.clone(), ca.client());
        let client = move || {
            let (d, cc) = (d.clone(), cc.clone());
            Rec {
                log: cl.clone(),
                data: cd.clone(),
                on_made: Some(Box::new(|t| {
                    assert!(!t.tls().unwrap().handshake_complete());
                    t.write(b"STARTTLS\r\n");
                })),
                on_data: Some(Box::new(move |t, data| {
                    if data == b"GO\r\n" {
                        t.tls().unwrap().start_tls_client(&cc, "localhost").unwrap();
                        t.write(b"secret");
                        t.lose_connection();
                    }
                })),
                on_lost: Some(Box::new(move |_| d())),
                ..Default::default()
            }
        };
        let client = braid::tls::StartTlsFactory::new(&r, client);
        r.connect_tcp("127.0.0.1", port.local_addr().port(), client, None, None);
        run_reactor(&r);
        assert_eq!(*sdata.borrow(), b"STARTTLS\r\nsecret");
        assert!(cdata.borrow().starts_with(b"GO\r\n"));
        assert_eq!(*slog.borrow(), ["made", "lost: connection was closed cleanly"]);
        assert_eq!(*clog.borrow(), ["made", "lost: connection was closed cleanly"]);
    }
}

/// Sets its flag when dropped, so a test sees the protocol freed.
struct Freed {
    flag: Rc<Cell<bool>>,
    transport: Option<Transport>,
    panic_in_made: bool,
    on_lost: Box<dyn Fn()>,
}

impl braid::Protocol for Freed {
    fn connection_made(&mut self, t: Transport) {
        // Keeping the transport makes a cycle that the close must break.
        self.transport = Some(t.clone());
        if self.panic_in_made {
            panic!("boom in connection_made");
        }
        t.write(b"x");
        t.lose_connection();
    }
    fn data_received(&mut self, _: &[u8]) {}
    fn connection_lost(&mut self, _: braid::Failure) {
        (self.on_lost)()
    }
}

impl Drop for Freed {
    fn drop(&mut self) {
        self.flag.set(true);
    }
}

reactor_test! {
    /// After a TLS connection closes (or its protocol panicked in
    /// `connection_made`), nothing keeps the application protocol alive,
    /// though it held its own transport (Twisted's
    /// test_protocolGarbageAfterLostConnection); the port serves on.
    fn the_protocol_is_freed_after_the_close(r) {
        let ca = Ca::new();
        let flags: Rc<RefCell<Vec<Rc<Cell<bool>>>>> = Default::default();
        // The two clients and the second server protocol; the first never
        // hears connection_lost (it panicked in connection_made).
        let done = stop_after(&r, 3);
        let (f, d) = (flags.clone(), done.clone());
        let made = Rc::new(Cell::new(0));
        let m = made.clone();
        let server = move || {
            let flag = Rc::new(Cell::new(false));
            f.borrow_mut().push(flag.clone());
            m.set(m.get() + 1);
            let d = d.clone();
            Freed { flag, transport: None, panic_in_made: m.get() == 1, on_lost: Box::new(d) }
        };
        let port = r.listen_ssl(local(), server, ca.server(), 50).unwrap().local_addr().port();
        for _ in 0..2 {
            let d = done.clone();
            let client = move || {
                let d = d.clone();
                Rec { on_lost: Some(Box::new(move |_| d())), ..Default::default() }
            };
            r.connect_ssl("localhost", port, client, ca.client(), None, None).unwrap();
        }
        run_reactor(&r);
        let flags = flags.borrow();
        assert_eq!(flags.len(), 2);
        assert!(flags.iter().all(|f| f.get()), "freed: {:?}", flags.iter().map(|f| f.get()).collect::<Vec<_>>());
    }
}

/// A client factory that records how each connection ended.
struct Told {
    inner: Rec,
    lost: Rc<RefCell<Vec<String>>>,
    r: Reactor,
}

impl braid::Factory for Told {
    fn build_protocol(&mut self, _: &braid::Address) -> Option<Box<dyn braid::Protocol>> {
        Some(Box::new(std::mem::take(&mut self.inner)))
    }
}

impl braid::ClientFactory for Told {
    fn client_connection_lost(&mut self, _: &dyn braid::Connector, reason: braid::Failure) {
        self.lost.borrow_mut().push(reason.to_string());
        let _ = self.r.stop();
    }
}

reactor_test! {
    /// A client factory hears the reason its protocol heard (a TLS
    /// error), not the clean close of the socket underneath.
    fn the_client_factory_hears_the_tls_reason(r) {
        let ca = Ca::new();
        let config = ServerConfig::builder(ca.identity(&["elsewhere.example"])).build().unwrap();
        let port = r.listen_ssl(local(), Rec::default, config, 50).unwrap().local_addr().port();
        let lost: Rc<RefCell<Vec<String>>> = Default::default();
        let factory = Told { inner: Rec::default(), lost: lost.clone(), r: r.clone() };
        r.connect_ssl("localhost", port, factory, ca.client(), None, None).unwrap();
        run_reactor(&r);
        let lost = lost.borrow();
        assert_eq!(lost.len(), 1);
        assert!(lost[0].starts_with("TLS handshake failed"), "{lost:?}");
    }
}

reactor_test! {
    /// What is written after `lose_connection` (or `lose_write_connection`)
    /// in the same callback still goes out before close_notify, as it does
    /// without TLS; the peer sees a clean close.
    fn writes_after_lose_in_the_same_callback_are_sent(r) {
        let ca = Ca::new();
        let done = stop_after(&r, 4);
        let d = done.clone();
        let server = move || {
            let d = d.clone();
            Rec {
                on_data: Some(Box::new(|t, data| {
                    if data == b"half" {
                        t.write(b"a");
                        t.lose_write_connection();
                        t.write(b"b");
                    } else {
                        t.write(b"c");
                        t.lose_connection();
                        t.write(b"d");
                    }
                })),
                half: true,
                on_read_closed: Some(Box::new(|t| t.lose_connection())),
                on_lost: Some(Box::new(move |_| d())),
                ..Default::default()
            }
        };
        let port = r.listen_ssl(local(), server, ca.server(), 50).unwrap().local_addr().port();
        let got: Rc<RefCell<Vec<Vec<u8>>>> = Default::default();
        for msg in [&b"half"[..], &b"full"[..]] {
            let (g, d) = (got.clone(), done.clone());
            let client = move || {
                let (g, d) = (g.clone(), d.clone());
                let seen: Rc<RefCell<Vec<u8>>> = Default::default();
                Rec {
                    data: seen.clone(),
                    on_made: Some(Box::new(move |t| t.write(msg))),
                    half: true,
                    // The server's write side ended: end ours too.
                    on_read_closed: Some(Box::new(|t| t.lose_connection())),
                    on_lost: Some(Box::new(move |_| {
                        g.borrow_mut().push(seen.borrow().clone());
                        d()
                    })),
                    ..Default::default()
                }
            };
            r.connect_ssl("localhost", port, client, ca.client(), None, None).unwrap();
        }
        run_reactor(&r);
        let mut got = got.borrow().clone();
        got.sort();
        assert_eq!(got, [b"ab".to_vec(), b"cd".to_vec()]);
    }
}

/// Aborts in `data_received` in the way it is told, recording whether
/// `connection_lost` ever came while its own call was on the stack.
struct Aborter {
    how: &'static str,
    t: Option<Transport>,
    inside: Rc<Cell<bool>>,
    log: Events,
    done: Box<dyn Fn()>,
}

impl braid::Protocol for Aborter {
    fn connection_made(&mut self, t: Transport) {
        self.t = Some(t);
    }
    fn data_received(&mut self, _: &[u8]) {
        let t = self.t.clone().unwrap();
        self.inside.set(true);
        match self.how {
            "twice" => {
                t.abort_connection();
                t.abort_connection();
            }
            "then lose" => {
                t.abort_connection();
                t.lose_connection();
            }
            "full buffer" => {
                // More than the kernel takes at once: most is still
                // buffered when the abort drops it.
                t.write(&vec![9u8; 8 << 20]);
                t.abort_connection();
            }
            "then panic" => {
                t.abort_connection();
                self.inside.set(false);
                panic!("bug after abort");
            }
            _ => t.abort_connection(),
        }
        self.inside.set(false);
    }
    fn connection_lost(&mut self, reason: braid::Failure) {
        let re_entered = if self.inside.get() { " (re-entered)" } else { "" };
        self.log.borrow_mut().push(format!("{}: {reason}{re_entered}", self.how));
        (self.done)()
    }
}

reactor_test! {
    /// `abort_connection` over TLS (Twisted's AbortConnectionMixin, run
    /// for TLS): inside `data_received`, twice, followed by
    /// `lose_connection`, with a full write buffer: the connection ends
    /// with `ConnectionAborted`, never re-entrantly; if the protocol then
    /// panics, the panic is the reason (an abort does not hide a bug).
    fn abort_over_tls(r) {
        let ca = Ca::new();
        let hows = ["plain", "twice", "then lose", "full buffer", "then panic"];
        let done = stop_after(&r, 2 * hows.len() as u32);
        let log: Events = Default::default();
        let queue = Rc::new(RefCell::new(hows.to_vec()));
        let (l, d, q) = (log.clone(), done.clone(), queue.clone());
        let server = move || {
            let d = d.clone();
            Aborter {
                how: q.borrow_mut().remove(0),
                t: None,
                inside: Default::default(),
                log: l.clone(),
                done: Box::new(d),
            }
        };
        let port = r.listen_ssl(local(), server, ca.server(), 50).unwrap().local_addr().port();
        // One client at a time, so each server protocol gets its `how`.
        fn next(r: &Reactor, ca: Rc<Ca>, port: u16, left: usize, done: impl Fn() + Clone + 'static) {
            if left == 0 {
                return;
            }
            let (rr, d, config, ca2) = (r.clone(), done.clone(), ca.client(), ca.clone());
            let client = move || {
                let (rr, d, ca) = (rr.clone(), d.clone(), ca2.clone());
                Rec {
                    on_made: Some(Box::new(|t| t.write(b"go"))),
                    on_lost: Some(Box::new(move |_| {
                        d();
                        next(&rr, ca.clone(), port, left - 1, d.clone());
                    })),
                    ..Default::default()
                }
            };
            r.connect_ssl("localhost", port, client, config, None, None).unwrap();
        }
        let ca = Rc::new(ca);
        next(&r, ca, port, hows.len(), done);
        run_reactor(&r);
        let log = log.borrow();
        assert_eq!(
            *log,
            [
                "plain: connection was aborted",
                "twice: connection was aborted",
                "then lose: connection was aborted",
                "full buffer: connection was aborted",
                "then panic: callback panicked: bug after abort",
            ]
        );
    }
}

/// A server that speaks in the clear until `STARTTLS`, echoing as its own
/// producer (registered before TLS starts), and records what it gets.
struct Upgrading {
    transport: Option<Transport>,
    config: ServerConfig,
    got: Rc<RefCell<Vec<u8>>>,
    log: Events,
    done: Box<dyn Fn()>,
}

impl braid::Protocol for Upgrading {
    fn connection_made(&mut self, t: Transport) {
        assert!(t.tls().is_none(), "a plain connection has no TLS side yet");
        t.register_producer(t.as_producer(), true).unwrap();
        self.transport = Some(t);
    }
    fn data_received(&mut self, data: &[u8]) {
        let t = self.transport.clone().unwrap();
        if t.tls().is_none() {
            assert_eq!(data, b"STARTTLS\r\n", "the clear part arrives alone");
            self.got.borrow_mut().extend_from_slice(data);
            t.write(b"GO\r\n");
            t.start_tls_server(&self.config).unwrap();
            let tls = t.tls().expect("the same transport is TLS now");
            assert!(!tls.handshake_complete());
            let again = t.start_tls_server(&self.config).unwrap_err();
            assert!(again.to_string().contains("already"), "{again}");
            return;
        }
        self.got.borrow_mut().extend_from_slice(data);
        t.write(data);
    }
    fn connection_lost(&mut self, reason: braid::Failure) {
        self.log.borrow_mut().push(format!("lost: {reason}"));
        (self.done)();
    }
}

/// `start_tls` on plain connections, with no TLS factory on either side
/// (Twisted's `startTLS` on any TCP or UNIX transport): the line before it
/// goes in the clear, 1 MiB after it is encrypted both ways through an echo
/// whose producer was registered before TLS started, and both ends close
/// cleanly.
fn start_tls_on_plain_connections(r: Reactor, unix: bool) {
    let ca = Ca::new();
    let done = stop_after(&r, 2);
    let (slog, sgot): (Events, Rc<RefCell<Vec<u8>>>) = Default::default();
    let (sl, sg, d, sc) = (slog.clone(), sgot.clone(), done.clone(), ca.server());
    let server = move || {
        let d = d.clone();
        Upgrading { transport: None, config: sc.clone(), got: sg.clone(), log: sl.clone(), done: Box::new(d) }
    };
    let data = payload(1 << 20);
    let (clog, cgot): (Events, Rc<RefCell<Vec<u8>>>) = Default::default();
    let (cl, cg, d, cc, sent) = (clog.clone(), cgot.clone(), done.clone(), ca.client(), data.clone());
    let client = move || {
        let (d, cc, sent, got) = (d.clone(), cc.clone(), sent.clone(), cg.clone());
        Rec {
            log: cl.clone(),
            data: cg.clone(),
            on_made: Some(Box::new(|t| t.write(b"STARTTLS\r\n"))),
            on_data: Some(Box::new(move |t, _| {
                if t.tls().is_none() {
                    assert_eq!(*got.borrow(), b"GO\r\n", "the answer comes in the clear");
                    t.start_tls_client(&cc, "localhost").unwrap();
                    t.write(&sent);
                } else if got.borrow().len() == 4 + sent.len() {
                    assert!(t.tls().unwrap().handshake_complete());
                    t.lose_connection();
                }
            })),
            on_lost: Some(Box::new(move |_| d())),
            ..Default::default()
        }
    };
    let _port;
    if unix {
        let path = std::env::temp_dir().join(format!(
            "braid-starttls-{}-{:?}.sock",
            std::process::id(),
            r.backend()
        ));
        let _ = std::fs::remove_file(&path);
        _port = r.listen_unix(&path, server, 50, None, false).unwrap();
        r.connect_unix(&path, client, None, false);
    } else {
        _port = r.listen_tcp(local(), server, 50).unwrap();
        r.connect_tcp("127.0.0.1", _port.local_addr().port(), client, None, None);
    }
    run_reactor(&r);
    let mut want = b"STARTTLS\r\n".to_vec();
    want.extend_from_slice(&data);
    assert!(
        *sgot.borrow() == want,
        "the server got {} bytes, not the {} sent",
        sgot.borrow().len(),
        want.len()
    );
    let mut back = b"GO\r\n".to_vec();
    back.extend_from_slice(&data);
    assert!(*cgot.borrow() == back, "the client got {} bytes back", cgot.borrow().len());
    assert_eq!(*slog.borrow(), ["lost: connection was closed cleanly"]);
    assert_eq!(*clog.borrow(), ["made", "lost: connection was closed cleanly"]);
}

reactor_test! {
    /// See `start_tls_on_plain_connections`, over TCP.
    fn start_tls_on_a_plain_tcp_connection(r) {
        start_tls_on_plain_connections(r, false);
    }
}

reactor_test! {
    /// See `start_tls_on_plain_connections`, over a UNIX socket.
    fn start_tls_on_a_plain_unix_connection(r) {
        start_tls_on_plain_connections(r, true);
    }
}

reactor_test! {
    /// A server that paused reading before `start_tls` still completes the
    /// handshake (which needs reading), then stays paused for the
    /// application: nothing sent after the handshake reaches it until it
    /// resumes, and then all of it does.
    fn start_tls_while_paused_handshakes_then_stays_paused(r) {
        let ca = Ca::new();
        let done = stop_after(&r, 2);
        let sgot: Rc<RefCell<Vec<u8>>> = Default::default();
        let seen_paused: Rc<Cell<Option<(bool, usize)>>> = Default::default();
        let (sg, d, sc, rr, seen) = (sgot.clone(), done.clone(), ca.server(), r.clone(), seen_paused.clone());
        let server = move || {
            let (d, sc, rr, seen, got) = (d.clone(), sc.clone(), rr.clone(), seen.clone(), sg.clone());
            Rec {
                data: sg.clone(),
                on_data: Some(Box::new(move |t, _| {
                    if t.tls().is_none() {
                        t.write(b"GO\r\n");
                        t.pause_producing();
                        t.start_tls_server(&sc).unwrap();
                        let (t, seen, got) = (t.clone(), seen.clone(), got.clone());
                        rr.call_later(Duration::from_millis(300), move || {
                            let tls = t.tls().unwrap();
                            seen.set(Some((tls.handshake_complete(), got.borrow().len())));
                            t.resume_producing();
                        });
                    } else if got.borrow().len() == 10 + 5 {
                        t.lose_connection();
                    }
                })),
                on_lost: Some(Box::new(move |_| d())),
                ..Default::default()
            }
        };
        let port = r.listen_tcp(local(), server, 50).unwrap();
        let (d, cc) = (done.clone(), ca.client());
        let client = move || {
            let (d, cc) = (d.clone(), cc.clone());
            Rec {
                on_made: Some(Box::new(|t| t.write(b"STARTTLS\r\n"))),
                on_data: Some(Box::new(move |t, _| {
                    if t.tls().is_none() {
                        t.start_tls_client(&cc, "localhost").unwrap();
                        t.write(b"hello");
                    }
                })),
                on_lost: Some(Box::new(move |_| d())),
                ..Default::default()
            }
        };
        r.connect_tcp("127.0.0.1", port.local_addr().port(), client, None, None);
        run_reactor(&r);
        assert_eq!(seen_paused.get(), Some((true, 10)), "(handshake done, bytes delivered) while paused");
        assert_eq!(*sgot.borrow(), b"STARTTLS\r\nhello");
    }
}
