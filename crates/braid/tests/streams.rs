//! Stream behaviours every kind of byte stream shares (Twisted's
//! `connectionmixins`): one test body, run once per backend **and** per
//! stream kind: TCP over IPv4, TCP over IPv6, a UNIX socket file, a UNIX
//! abstract name, and TLS over TCP and over a UNIX socket. The server
//! side is braid; the client is a plain std socket on another thread (for
//! TLS, relayed through a rustls client), so each test sees what a real
//! peer sees.

mod common;
mod tls_support;

use std::cell::{Cell, RefCell};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use braid::protocol::{HalfCloseable, IntoFactory, Protocol};
use braid::tcp::ListeningPort;
use braid::{Failure, Producer, Reactor, Transport};
use common::{run_reactor, WATCHDOG};

/// The stream kinds under test.
#[derive(Clone, Copy, Debug)]
enum StreamKind {
    Tcp4,
    Tcp6,
    UnixPath,
    UnixAbstract,
    /// `listen_ssl` over TCP on 127.0.0.1.
    TlsTcp,
    /// A `TlsFactory` on a UNIX socket file.
    TlsUnix,
    /// A plain TCP listener whose protocols call `start_tls_server` on
    /// their live transport first thing (the layer put in place).
    StartTlsTcp,
}

/// Where a client connects.
#[derive(Clone)]
enum Target {
    Ip(std::net::SocketAddr),
    Path(PathBuf),
    Abstract(Vec<u8>),
    /// TLS to the server at the inner target, trusting this client config.
    Tls(Box<Target>, std::sync::Arc<rustls::ClientConfig>),
}

/// A std client socket of either family.
enum Client {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Target {
    fn connect(&self) -> Client {
        let c = match self {
            Target::Ip(a) => Client::Tcp(TcpStream::connect(a).expect("connect")),
            Target::Path(p) => Client::Unix(UnixStream::connect(p).expect("connect")),
            Target::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name).unwrap();
                Client::Unix(UnixStream::connect_addr(&addr).expect("connect"))
            }
            Target::Tls(inner, config) => {
                let end = match &**inner {
                    Target::Ip(a) => tls_support::proxy::connect(
                        TcpStream::connect(a).expect("connect"),
                        config.clone(),
                        "localhost",
                    ),
                    Target::Path(p) => tls_support::proxy::connect(
                        UnixStream::connect(p).expect("connect"),
                        config.clone(),
                        "localhost",
                    ),
                    _ => unreachable!("TLS kinds are over TCP or a UNIX path"),
                };
                Client::Unix(end)
            }
        };
        c.set_timeout(WATCHDOG);
        c
    }
}

impl Client {
    fn set_timeout(&self, t: Duration) {
        match self {
            Client::Tcp(s) => s.set_read_timeout(Some(t)).unwrap(),
            Client::Unix(s) => s.set_read_timeout(Some(t)).unwrap(),
        }
    }
    fn try_clone(&self) -> Client {
        match self {
            Client::Tcp(s) => Client::Tcp(s.try_clone().unwrap()),
            Client::Unix(s) => Client::Unix(s.try_clone().unwrap()),
        }
    }
    fn set_write_timeout(&self, t: Duration) {
        match self {
            Client::Tcp(s) => s.set_write_timeout(Some(t)).unwrap(),
            Client::Unix(s) => s.set_write_timeout(Some(t)).unwrap(),
        }
    }
    fn shutdown_write(&self) {
        match self {
            Client::Tcp(s) => s.shutdown(Shutdown::Write).unwrap(),
            Client::Unix(s) => s.shutdown(Shutdown::Write).unwrap(),
        }
    }
    /// Everything until EOF or a reset; panics on a timeout (a hung peer).
    fn read_to_end(&mut self) -> Vec<u8> {
        let mut got = Vec::new();
        let mut buf = [0u8; 64 * 1024];
        loop {
            match self.read(&mut buf) {
                Ok(0) => return got,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return got,
                Err(e) => panic!("neither closed nor reset: {e}"),
            }
        }
    }
}

impl Read for Client {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Client::Tcp(s) => s.read(b),
            Client::Unix(s) => s.read(b),
        }
    }
}

impl Write for Client {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        match self {
            Client::Tcp(s) => s.write(b),
            Client::Unix(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl StreamKind {
    /// Listens with `factory` on a fresh address of this kind.
    fn listen(self, r: &Reactor, factory: impl IntoFactory) -> (ListeningPort, Target) {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let unique = format!("braid-streams-{}-{n}", std::process::id());
        match self {
            StreamKind::Tcp4 => {
                let p = r.listen_tcp("127.0.0.1:0", factory, 50).unwrap();
                let a = p.local_addr();
                (p, Target::Ip(a))
            }
            StreamKind::Tcp6 => {
                let p = r
                    .listen_tcp("[::1]:0", factory, 50)
                    .expect("IPv6 loopback (::1) is needed for these tests");
                let a = p.local_addr();
                (p, Target::Ip(a))
            }
            StreamKind::UnixPath => {
                let path = std::env::temp_dir().join(format!("{unique}.sock"));
                let _ = std::fs::remove_file(&path);
                (r.listen_unix(&path, factory, 50, None, false).unwrap(), Target::Path(path))
            }
            StreamKind::UnixAbstract => {
                let p = r.listen_unix(format!("@{unique}"), factory, 50, None, false).unwrap();
                (p, Target::Abstract(unique.into_bytes()))
            }
            StreamKind::TlsTcp => {
                let ca = tls_support::Ca::new();
                let p = r.listen_ssl("127.0.0.1:0", factory, ca.server(), 50).unwrap();
                let a = p.local_addr();
                (p, Target::Tls(Box::new(Target::Ip(a)), ca.rustls_client()))
            }
            StreamKind::TlsUnix => {
                let ca = tls_support::Ca::new();
                let path = std::env::temp_dir().join(format!("{unique}.sock"));
                let _ = std::fs::remove_file(&path);
                let factory = braid::tls::TlsFactory::new(r, factory, ca.server());
                let p = r.listen_unix(&path, factory, 50, None, false).unwrap();
                (p, Target::Tls(Box::new(Target::Path(path)), ca.rustls_client()))
            }
            StreamKind::StartTlsTcp => {
                let ca = tls_support::Ca::new();
                let factory = StartTlsFirst { inner: factory.into_shared(), config: ca.server() };
                let p = r.listen_tcp("127.0.0.1:0", factory, 50).unwrap();
                let a = p.local_addr();
                (p, Target::Tls(Box::new(Target::Ip(a)), ca.rustls_client()))
            }
        }
    }

    fn tls(self) -> bool {
        matches!(self, StreamKind::TlsTcp | StreamKind::TlsUnix | StreamKind::StartTlsTcp)
    }
}

/// Builds the inner factory's protocols behind one that starts TLS on its
/// plain transport before handing it on.
struct StartTlsFirst {
    inner: braid::protocol::SharedFactory<dyn braid::protocol::Factory>,
    config: braid::tls::ServerConfig,
}

impl braid::protocol::Factory for StartTlsFirst {
    fn build_protocol(&mut self, addr: &braid::Address) -> Option<Box<dyn Protocol>> {
        let inner = self.inner.with(|f| f.build_protocol(addr))?;
        Some(Box::new(StartsTls { inner, config: self.config.clone() }))
    }
}

struct StartsTls {
    inner: Box<dyn Protocol>,
    config: braid::tls::ServerConfig,
}

impl Protocol for StartsTls {
    fn connection_made(&mut self, t: Transport) {
        assert!(t.tls().is_none());
        t.start_tls_server(&self.config).unwrap();
        self.inner.connection_made(t)
    }
    fn data_received(&mut self, data: &[u8]) {
        self.inner.data_received(data)
    }
    fn data_received_mut(&mut self, data: &mut [u8]) {
        self.inner.data_received_mut(data)
    }
    fn connection_lost(&mut self, reason: Failure) {
        self.inner.connection_lost(reason)
    }
    fn as_half_closeable(&mut self) -> Option<&mut dyn HalfCloseable> {
        self.inner.as_half_closeable()
    }
}

/// Writes a test once and runs it on every backend and every stream kind:
/// `name::epoll::tcp4`, `name::poll::unix_path`, ...
macro_rules! stream_test {
    ($(#[$meta:meta])* fn $name:ident($r:ident, $kind:ident) $body:block) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            $(#[$meta])*
            fn body($r: braid::Reactor, $kind: StreamKind) $body
            stream_test!(@backend select);
            stream_test!(@backend poll);
            stream_test!(@backend epoll);
            stream_test!(@backend io_uring);
        }
    };
    (@backend $backend:ident) => {
        mod $backend {
            stream_test!(@kind $backend, tcp4, Tcp4);
            stream_test!(@kind $backend, tcp6, Tcp6);
            stream_test!(@kind $backend, unix_path, UnixPath);
            stream_test!(@kind $backend, unix_abstract, UnixAbstract);
            stream_test!(@kind $backend, tls_tcp, TlsTcp);
            stream_test!(@kind $backend, tls_unix, TlsUnix);
            stream_test!(@kind $backend, start_tls_tcp, StartTlsTcp);
        }
    };
    (@kind $backend:ident, $test:ident, $kind:ident) => {
        #[test]
        fn $test() {
            let backend: braid::Backend = stringify!($backend).parse().unwrap();
            super::body(crate::common::build(backend), super::StreamKind::$kind)
        }
    };
}

/// Runs `client` against `target` on a thread, then stops the reactor.
fn with_client<T: Send + 'static>(
    r: &Reactor,
    target: Target,
    client: impl FnOnce(Target) -> T + Send + 'static,
) -> T {
    let remote = r.remote();
    let handle = std::thread::spawn(move || {
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| client(target)));
        let _ = remote.call_from_thread(|r| {
            let _ = r.stop();
        });
        out
    });
    run_reactor(r);
    match handle.join().expect("client thread") {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e),
    }
}

type Events = Rc<RefCell<Vec<String>>>;

/// What a test tells its server protocol to do.
type OnTransport = Option<Box<dyn FnMut(&Transport)>>;
type OnData = Option<Box<dyn FnMut(&Transport, &[u8])>>;

/// A server protocol that records what happens and does what it is told.
#[derive(Default)]
struct Server {
    log: Events,
    t: Option<Transport>,
    on_made: OnTransport,
    on_data: OnData,
    on_read_closed: OnTransport,
    on_lost: Option<Box<dyn FnMut()>>,
    /// Dropped with the protocol: tells a test whether it was freed.
    _alive: Option<Rc<()>>,
}

impl Protocol for Server {
    fn connection_made(&mut self, t: Transport) {
        self.log.borrow_mut().push("made".into());
        if let Some(f) = self.on_made.as_mut() {
            f(&t);
        }
        self.t = Some(t);
    }
    fn data_received(&mut self, data: &[u8]) {
        let t = self.t.clone().unwrap();
        match self.on_data.as_mut() {
            Some(f) => f(&t, data),
            None => t.write(data),
        }
    }
    fn connection_lost(&mut self, reason: Failure) {
        self.log.borrow_mut().push(format!("lost: {reason}"));
        if let Some(f) = self.on_lost.as_mut() {
            f();
        }
    }
    fn as_half_closeable(&mut self) -> Option<&mut dyn HalfCloseable> {
        if self.on_read_closed.is_some() {
            Some(self)
        } else {
            None
        }
    }
}

impl HalfCloseable for Server {
    fn read_connection_lost(&mut self) {
        self.log.borrow_mut().push("read closed".into());
        let t = self.t.clone().unwrap();
        if let Some(f) = self.on_read_closed.as_mut() {
            f(&t);
        }
    }
}

fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

stream_test! {
    /// Bytes come back as sent; the client's close is a clean
    /// `connection_lost`, exactly once. (The echo is half-closeable: a
    /// protocol that is not would be closed at the client's EOF with its
    /// unsent echo dropped, as in Twisted.)
    fn echo_and_clean_close(r, kind) {
        let log: Events = Default::default();
        let l = log.clone();
        let (_port, target) = kind.listen(&r, move || Server {
            log: l.clone(),
            on_made: Some(Box::new(move |t| {
                // Each kind offers its own options and only those.
                let tcp = matches!(kind, StreamKind::Tcp4 | StreamKind::Tcp6 | StreamKind::TlsTcp | StreamKind::StartTlsTcp);
                assert_eq!((t.tcp().is_some(), t.unix().is_some()), (tcp, !tcp), "{kind:?}");
                assert_eq!(t.tls().is_some(), kind.tls(), "{kind:?}");
            })),
            on_read_closed: Some(Box::new(|t| t.lose_connection())),
            ..Default::default()
        });
        let data = payload(300_000);
        let sent = data.clone();
        let back = with_client(&r, target, move |t| {
            let mut c = t.connect();
            let mut w = c.try_clone();
            let writer = std::thread::spawn(move || {
                w.write_all(&sent).unwrap();
                w.shutdown_write();
            });
            let back = c.read_to_end();
            writer.join().unwrap();
            back
        });
        assert!(back == data, "{kind:?}: {} of {} bytes came back", back.len(), data.len());
        assert_eq!(*log.borrow(), ["made", "read closed", "lost: connection was closed cleanly"], "{kind:?}");
    }
}

/// Takes its bytes in the buffer it may change, turns them to upper case
/// there and echoes them; counts the arrivals that came by the other door.
struct InPlace {
    t: Option<Transport>,
    by_copy: Rc<Cell<usize>>,
}

impl Protocol for InPlace {
    fn connection_made(&mut self, t: Transport) {
        self.t = Some(t);
    }
    fn data_received(&mut self, data: &[u8]) {
        self.by_copy.set(self.by_copy.get() + 1);
        self.data_received_mut(&mut data.to_vec());
    }
    fn data_received_mut(&mut self, data: &mut [u8]) {
        data.make_ascii_uppercase();
        let t = self.t.as_ref().unwrap();
        t.write(data);
        if data.last() == Some(&b'!') {
            t.lose_connection();
        }
    }
}

stream_test! {
    /// Every kind hands what it reads (or, for TLS, decrypts) in a buffer
    /// the protocol may change, and what the protocol does to it there is
    /// what it writes: nothing else reads that buffer afterwards.
    fn bytes_come_in_a_buffer_the_protocol_may_change(r, kind) {
        let by_copy = Rc::new(Cell::new(0));
        let b = by_copy.clone();
        let (_port, target) = kind.listen(&r, move || InPlace { t: None, by_copy: b.clone() });
        let text: Vec<u8> = (0..200_000).map(|i| b"abcdefghij"[i % 10]).collect();
        let sent = text.clone();
        let back = with_client(&r, target, move |t| {
            let mut c = t.connect();
            let mut w = c.try_clone();
            let writer = std::thread::spawn(move || {
                w.write_all(&sent).unwrap();
                w.write_all(b"!").unwrap();
            });
            let back = c.read_to_end();
            writer.join().unwrap();
            back
        });
        let mut want = text.to_ascii_uppercase();
        want.push(b'!');
        assert!(back == want, "{kind:?}: {} of {} bytes came back as expected", back.len(), want.len());
        assert_eq!(by_copy.get(), 0, "{kind:?}: bytes came by data_received");
    }
}

stream_test! {
    /// Half-close: the client ends its side; a half-closeable protocol
    /// hears `read_connection_lost`, can still write, then closes.
    fn half_close_keeps_the_write_side(r, kind) {
        let log: Events = Default::default();
        let l = log.clone();
        let (_port, target) = kind.listen(&r, move || Server {
            log: l.clone(),
            on_read_closed: Some(Box::new(|t| {
                t.write(b" and goodbye");
                t.lose_connection();
            })),
            ..Default::default()
        });
        let back = with_client(&r, target, |t| {
            let mut c = t.connect();
            c.write_all(b"hello").unwrap();
            c.shutdown_write();
            c.read_to_end()
        });
        assert_eq!(back, b"hello and goodbye", "{kind:?}");
        assert_eq!(*log.borrow(), ["made", "read closed", "lost: connection was closed cleanly"], "{kind:?}");
    }
}

stream_test! {
    /// `lose_connection` sends everything written before and after it (in
    /// the same callback) before closing; `abort_connection` drops what is
    /// buffered and reports `ConnectionAborted`.
    fn lose_flushes_abort_drops(r, kind) {
        // More than any kernel socket buffer takes, so some is still in
        // braid's buffer when the abort comes.
        let big = payload(32 * 1024 * 1024);
        let log: Events = Default::default();
        let (l, b) = (log.clone(), big.clone());
        let (_port, target) = kind.listen(&r, move || {
            let b = b.clone();
            Server {
                log: l.clone(),
                on_data: Some(Box::new(move |t, d| {
                    if d.starts_with(b"lose") {
                        t.write(&b);
                        t.lose_connection();
                        // Written after lose_connection: still sent (Twisted).
                        t.write(b"and this");
                    } else if d.starts_with(b"abort") {
                        t.write(&b);
                        t.abort_connection();
                    }
                })),
                ..Default::default()
            }
        });
        let (lost, aborted) = with_client(&r, target, |t| {
            let mut c = t.connect();
            c.write_all(b"lose").unwrap();
            let lost = c.read_to_end();
            let mut c = t.connect();
            c.write_all(b"abort").unwrap();
            (lost, c.read_to_end())
        });
        let mut want = big.clone();
        want.extend_from_slice(b"and this");
        assert!(lost == want, "{kind:?}: lose_connection delivered {} of {} bytes", lost.len(), want.len());
        assert!(aborted.len() < big.len(), "{kind:?}: abort sent the whole buffer");
        let log = log.borrow();
        assert_eq!(log.iter().filter(|e| e.as_str() == "lost: connection was closed cleanly").count(), 1, "{kind:?}: {log:?}");
        assert_eq!(log.iter().filter(|e| e.as_str() == "lost: connection was aborted").count(), 1, "{kind:?}: {log:?}");
    }
}

stream_test! {
    /// After the connection is lost, writes are ignored, `connection_lost`
    /// came once, and the protocol is freed (nothing keeps it alive).
    fn after_the_end_writes_are_ignored_and_the_protocol_freed(r, kind) {
        let log: Events = Default::default();
        let token = Rc::new(());
        let weak: Weak<()> = Rc::downgrade(&token);
        let kept: Rc<RefCell<Option<Transport>>> = Default::default();
        let (l, k) = (log.clone(), kept.clone());
        let token = RefCell::new(Some(token));
        let (_port, target) = kind.listen(&r, move || {
            let k = k.clone();
            Server {
                log: l.clone(),
                _alive: token.borrow_mut().take(),
                on_made: Some(Box::new(move |t| *k.borrow_mut() = Some(t.clone()))),
                ..Default::default()
            }
        });
        with_client(&r, target, |t| {
            let mut c = t.connect();
            c.write_all(b"x").unwrap();
            let mut one = [0u8; 1];
            c.read_exact(&mut one).unwrap();
        });
        let t = kept.borrow_mut().take().expect("a transport");
        assert!(!t.connected(), "{kind:?}");
        t.write(b"late");
        t.write_sequence(&[b"late", b"r"]);
        t.lose_connection();
        t.abort_connection();
        assert_eq!(log.borrow().iter().filter(|e| e.starts_with("lost")).count(), 1, "{kind:?}: {:?}", log.borrow());
        drop(t);
        assert!(weak.upgrade().is_none(), "{kind:?}: the protocol outlived its connection");
    }
}

/// A push producer that writes until paused, counting what it is told.
struct Pump {
    t: Transport,
    paused: Cell<bool>,
    pauses: Cell<u32>,
    resumes: Cell<u32>,
    written: Cell<usize>,
    total: usize,
}

impl Pump {
    fn pump(&self) {
        while !self.paused.get() && self.written.get() < self.total {
            let n = 64 * 1024.min(self.total - self.written.get());
            self.t.write(&vec![b'p'; n]);
            self.written.set(self.written.get() + n);
        }
        if self.written.get() >= self.total {
            self.t.unregister_producer();
            self.t.lose_connection();
        }
    }
}

impl Producer for Pump {
    fn pause_producing(&self) {
        self.paused.set(true);
        self.pauses.set(self.pauses.get() + 1);
    }
    fn resume_producing(&self) {
        self.paused.set(false);
        self.resumes.set(self.resumes.get() + 1);
        self.pump();
    }
    fn stop_producing(&self) {}
}

stream_test! {
    /// A streaming producer is paused while the peer does not read (the
    /// buffer stays bounded) and resumed once it drains; every byte
    /// arrives.
    fn producers_are_paused_and_resumed(r, kind) {
        const TOTAL: usize = 16 * 1024 * 1024;
        let pumps: Rc<RefCell<Vec<Rc<Pump>>>> = Default::default();
        let p = pumps.clone();
        let (_port, target) = kind.listen(&r, move || {
            let p = p.clone();
            Server {
                on_made: Some(Box::new(move |t| {
                    let pump = Rc::new(Pump {
                        t: t.clone(),
                        paused: Cell::new(false),
                        pauses: Cell::new(0),
                        resumes: Cell::new(0),
                        written: Cell::new(0),
                        total: TOTAL,
                    });
                    t.register_producer(pump.clone(), true).unwrap();
                    p.borrow_mut().push(pump.clone());
                    pump.pump();
                })),
                ..Default::default()
            }
        });
        let got = with_client(&r, target, |t| {
            let mut c = t.connect();
            // Read nothing for a while: the server must pause, not buffer it all.
            std::thread::sleep(Duration::from_millis(300));
            c.read_to_end().len()
        });
        assert_eq!(got, TOTAL, "{kind:?}");
        let pump = pumps.borrow()[0].clone();
        assert!(pump.pauses.get() >= 1, "{kind:?}: never paused");
        assert!(pump.resumes.get() >= 1, "{kind:?}: never resumed");
    }
}

stream_test! {
    /// A protocol that panics in `data_received` costs only its own
    /// connection: it is closed, and the next client is served.
    fn a_panic_costs_only_its_connection(r, kind) {
        let first = Rc::new(Cell::new(true));
        let log: Events = Default::default();
        let (f, l) = (first.clone(), log.clone());
        let (_port, target) = kind.listen(&r, move || {
            let bad = f.replace(false);
            Server {
                log: l.clone(),
                on_data: Some(Box::new(move |t, d| {
                    if bad {
                        panic!("protocol bug");
                    }
                    t.write(d);
                })),
                ..Default::default()
            }
        });
        let (bad, good) = with_client(&r, target, |t| {
            let mut bad = t.connect();
            bad.write_all(b"boom").unwrap();
            let bad = bad.read_to_end();
            let mut good = t.connect();
            good.write_all(b"fine").unwrap();
            let mut back = [0u8; 4];
            good.read_exact(&mut back).unwrap();
            (bad, back)
        });
        assert!(bad.is_empty(), "{kind:?}");
        assert_eq!(&good, b"fine", "{kind:?}");
        assert!(log.borrow().iter().any(|e| e.contains("protocol bug")), "{kind:?}: {:?}", log.borrow());
    }
}

stream_test! {
    /// Half-close the other way: the server ends its write side and keeps
    /// reading; the client sees EOF, still writes, and the server hears it.
    fn server_half_close_keeps_reading(r, kind) {
        let log: Events = Default::default();
        let (l, rr) = (log.clone(), r.clone());
        let (_port, target) = kind.listen(&r, move || {
            let (l2, rr) = (l.clone(), rr.clone());
            Server {
                log: l.clone(),
                on_made: Some(Box::new(|t| {
                    t.write(b"bye for now");
                    t.lose_write_connection();
                    // Written after, in the same callback: still sent
                    // before the FIN (as after lose_connection, in Twisted).
                    t.write(b" and this");
                })),
                on_data: Some(Box::new(move |_, d| {
                    l2.borrow_mut().push(format!("data: {}", String::from_utf8_lossy(d)));
                })),
                on_read_closed: Some(Box::new(|t| t.lose_connection())),
                on_lost: Some(Box::new(move || {
                    let _ = rr.stop();
                })),
                ..Default::default()
            }
        });
        // The client cannot see the server's full close (it already has
        // the server's FIN), so the server stops the reactor itself.
        let client = std::thread::spawn(move || {
            let mut c = target.connect();
            let back = c.read_to_end();
            // The server's write side is closed; ours is still open.
            c.write_all(b"still here").unwrap();
            c.shutdown_write();
            back
        });
        run_reactor(&r);
        let back = client.join().unwrap();
        assert_eq!(back, b"bye for now and this", "{kind:?}");
        let log = log.borrow();
        let data: String = log.iter().filter_map(|e| e.strip_prefix("data: ")).collect();
        assert_eq!(data, "still here", "{kind:?}: {log:?}");
        assert!(log.iter().any(|e| e == "read closed"), "{kind:?}: {log:?}");
        assert_eq!(log.last().map(String::as_str), Some("lost: connection was closed cleanly"), "{kind:?}: {log:?}");
    }
}

stream_test! {
    /// `write_sequence` is one gathered write; writes made inside
    /// `data_received` go out in the order they were made.
    fn writes_keep_their_order(r, kind) {
        let (_port, target) = kind.listen(&r, || Server {
            on_data: Some(Box::new(|t, d| {
                t.write(b"<");
                t.write_sequence(&[b"a", d, b"b"]);
                t.write(b">");
            })),
            ..Default::default()
        });
        let back = with_client(&r, target, |t| {
            let mut c = t.connect();
            let mut back = Vec::new();
            for i in 0..50u8 {
                c.write_all(&[b'0' + i % 10]).unwrap();
                let mut one = [0u8; 5];
                c.read_exact(&mut one).unwrap();
                back.extend_from_slice(&one);
            }
            back
        });
        let want: Vec<u8> = (0..50u8).flat_map(|i| [b'<', b'a', b'0' + i % 10, b'b', b'>']).collect();
        assert_eq!(String::from_utf8_lossy(&back), String::from_utf8_lossy(&want), "{kind:?}");
    }
}

stream_test! {
    /// Backpressure: an echo registered as its own producer stops reading
    /// while its peer does not read, so its buffer stays near the
    /// high-water mark; once the peer reads, every byte comes back.
    fn a_non_reading_peer_keeps_the_buffer_bounded(r, kind) {
        let peak = Rc::new(Cell::new(0usize));
        let p = peak.clone();
        let (_port, target) = kind.listen(&r, move || {
            let p = p.clone();
            Server {
                on_made: Some(Box::new(|t| t.register_producer(t.as_producer(), true).unwrap())),
                on_data: Some(Box::new(move |t, d| {
                    t.write(d);
                    p.set(p.get().max(t.buffered()));
                })),
                // A close waits for a registered producer to unregister.
                on_read_closed: Some(Box::new(|t| {
                    t.unregister_producer();
                    t.lose_connection();
                })),
                ..Default::default()
            }
        });
        const LIMIT: usize = 64 * 1024 * 1024;
        let (sent, back) = with_client(&r, target, |t| {
            let mut c = t.connect();
            c.set_write_timeout(Duration::from_millis(500));
            let chunk = vec![7u8; 64 * 1024];
            let mut sent = 0;
            while sent < LIMIT {
                match c.write(&chunk) {
                    Ok(n) => sent += n,
                    Err(_) => break, // stalled: the server stopped reading
                }
            }
            c.shutdown_write();
            (sent, c.read_to_end().len())
        });
        assert!(sent < LIMIT, "{kind:?}: the client never stalled, so the server never stopped reading");
        assert_eq!(back, sent, "{kind:?}: bytes were lost");
        // The high-water mark plus at most one read past it. Over TLS that read may also finish
        // a record the previous read cut (at most 16 KiB), and what the echo buffers is
        // ciphertext: each record of it carries its framing (22 bytes in TLS 1.3, 29 in 1.2 with
        // AES-GCM; the read and the record it finishes make at most 6 records).
        let framing = if kind.tls() { 16 * 1024 + 6 * 32 } else { 0 };
        let bound = 64 * 1024 + 64 * 1024 + framing;
        assert!(peak.get() <= bound, "{kind:?}: the server buffered {} bytes (bound {bound})", peak.get());
    }
}

stream_test! {
    /// A peer that floods its connection does not starve another one.
    fn a_flood_does_not_starve_others(r, kind) {
        let (_port, target) = kind.listen(&r, Server::default);
        let back = with_client(&r, target, |t| {
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let flood = t.connect();
            let (mut w, mut rd, s1, s2) = (flood.try_clone(), flood, stop.clone(), stop.clone());
            let drain = std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                while !s1.load(Ordering::Relaxed) && rd.read(&mut buf).unwrap_or(0) > 0 {}
            });
            let writer = std::thread::spawn(move || {
                let chunk = vec![1u8; 64 * 1024];
                let deadline = std::time::Instant::now() + WATCHDOG;
                while !s2.load(Ordering::Relaxed) && std::time::Instant::now() < deadline && w.write_all(&chunk).is_ok() {}
                w.shutdown_write();
            });
            std::thread::sleep(Duration::from_millis(100));
            let mut c = t.connect();
            c.write_all(b"ping").unwrap();
            let mut back = [0u8; 4];
            let got = c.read_exact(&mut back).map(|_| back);
            stop.store(true, Ordering::Relaxed);
            writer.join().unwrap();
            drain.join().unwrap();
            got
        });
        assert_eq!(&back.expect("the second client was starved"), b"ping", "{kind:?}");
    }
}

stream_test! {
    /// The peer's EOF closes a protocol that is not half-closeable, cleanly
    /// and once; one that was paused when the peer closed still gets every
    /// byte before `connection_lost`.
    fn eof_closes_and_a_paused_reader_loses_nothing(r, kind) {
        let log: Events = Default::default();
        let got = Rc::new(Cell::new(0usize));
        let (l, g, rr) = (log.clone(), got.clone(), r.clone());
        let (_port, target) = kind.listen(&r, move || {
            let (g, rr) = (g.clone(), rr.clone());
            Server {
                log: l.clone(),
                on_made: Some(Box::new(move |t| {
                    t.pause_producing();
                    let t = t.clone();
                    rr.call_later(Duration::from_millis(100), move || t.resume_producing());
                })),
                on_data: Some(Box::new(move |_, d| g.set(g.get() + d.len()))),
                ..Default::default()
            }
        });
        with_client(&r, target, |t| {
            let mut c = t.connect();
            c.write_all(&payload(50_000)).unwrap();
            c.shutdown_write();
            // The server closes once it has read everything and our EOF.
            c.read_to_end();
        });
        assert_eq!(got.get(), 50_000, "{kind:?}");
        assert_eq!(*log.borrow(), ["made", "lost: connection was closed cleanly"], "{kind:?}");
    }
}

/// Sends a file in slices, one `write_file` each time it is asked, as a
/// file server's body would, copying where the transport cannot.
struct FileSlices {
    t: Transport,
    file: Rc<std::fs::File>,
    next: Cell<u64>,
    end: u64,
    slice: u64,
    zero_copy: Rc<Cell<Option<bool>>>,
    tail: &'static [u8],
}

impl Producer for FileSlices {
    fn resume_producing(&self) {
        let at = self.next.get();
        if at >= self.end {
            self.t.unregister_producer();
            self.t.write(self.tail);
            self.t.lose_connection();
            return;
        }
        let len = self.slice.min(self.end - at);
        if !self.t.write_file(&self.file, at, len) {
            // Not a plain stream (TLS): the bytes go through user space.
            self.zero_copy.set(Some(false));
            let mut buf = vec![0u8; len as usize];
            std::os::unix::fs::FileExt::read_exact_at(&*self.file, &mut buf, at).unwrap();
            self.t.write(&buf);
        }
        self.next.set(at + len);
    }
    fn stop_producing(&self) {}
}

stream_test! {
    /// `write_file` puts a file's bytes between the writes before and
    /// after it, in order, by sendfile(2) on plain streams (and is refused,
    /// so the caller copies, over TLS). A pull producer queuing the file in
    /// slices to a client that starts reading late gets every byte across,
    /// with the file never in the server's buffer.
    fn write_file_sends_a_file_in_order(r, kind) {
        let path = std::env::temp_dir().join(format!("braid-sendfile-{}-{kind:?}-{:?}", std::process::id(), r.backend()));
        let content = payload(5 * 1024 * 1024 + 123);
        std::fs::write(&path, &content).unwrap();
        let file = Rc::new(std::fs::File::open(&path).unwrap());
        let zero_copy: Rc<Cell<Option<bool>>> = Default::default();
        let (f, z) = (file.clone(), zero_copy.clone());
        let (_port, target) = kind.listen(&r, move || {
            let (f, z) = (f.clone(), z.clone());
            Server {
                on_data: Some(Box::new(move |t, _| {
                    t.write(b"head:");
                    // A small slice first, between two writes.
                    let first = t.write_file(&f, 7, 10);
                    if !first {
                        let mut buf = vec![0u8; 10];
                        std::os::unix::fs::FileExt::read_exact_at(&*f, &mut buf, 7).unwrap();
                        t.write(&buf);
                    }
                    t.write(b":body:");
                    z.set(Some(first));
                    let slices = Rc::new(FileSlices {
                        t: t.clone(),
                        file: f.clone(),
                        next: Cell::new(0),
                        end: f.metadata().unwrap().len(),
                        slice: 1 << 20,
                        zero_copy: z.clone(),
                        tail: b":tail",
                    });
                    t.register_producer(slices, false).unwrap();
                })),
                ..Default::default()
            }
        });
        let got = with_client(&r, target, |t| {
            let mut c = t.connect();
            c.write_all(b"go").unwrap();
            std::thread::sleep(std::time::Duration::from_millis(200));
            c.read_to_end()
        });
        let _ = std::fs::remove_file(&path);
        let mut want = b"head:".to_vec();
        want.extend_from_slice(&content[7..17]);
        want.extend_from_slice(b":body:");
        want.extend_from_slice(&content);
        want.extend_from_slice(b":tail");
        assert!(got.len() == want.len() && got == want, "{kind:?}: {} bytes, {} wanted", got.len(), want.len());
        assert_eq!(zero_copy.get(), Some(!kind.tls()), "{kind:?}: sendfile used exactly on plain streams");
    }
}

stream_test! {
    /// A file that turns out shorter than what `write_file` queued ends the
    /// connection with an error saying so, after the bytes it had; over TLS
    /// `write_file` is refused and nothing is queued.
    fn a_file_shorter_than_queued_ends_the_connection(r, kind) {
        let path = std::env::temp_dir().join(format!("braid-short-{}-{kind:?}-{:?}", std::process::id(), r.backend()));
        std::fs::write(&path, payload(1000)).unwrap();
        let file = Rc::new(std::fs::File::open(&path).unwrap());
        let log: Events = Default::default();
        let queued: Rc<Cell<Option<bool>>> = Default::default();
        let (l, f, q) = (log.clone(), file.clone(), queued.clone());
        let (_port, target) = kind.listen(&r, move || {
            let (f, q) = (f.clone(), q.clone());
            Server {
                log: l.clone(),
                on_data: Some(Box::new(move |t, _| {
                    let ok = t.write_file(&f, 0, 5000);
                    q.set(Some(ok));
                    if !ok {
                        t.lose_connection();
                    }
                })),
                ..Default::default()
            }
        });
        let got = with_client(&r, target, |t| {
            let mut c = t.connect();
            c.write_all(b"go").unwrap();
            c.read_to_end()
        });
        let _ = std::fs::remove_file(&path);
        assert_eq!(queued.get(), Some(!kind.tls()), "{kind:?}");
        let lost = log.borrow().last().cloned().unwrap_or_default();
        if kind.tls() {
            assert!(got.is_empty() && lost.contains("closed cleanly"), "{kind:?}: {lost}");
        } else {
            assert_eq!(got, payload(1000), "{kind:?}");
            assert!(lost.contains("the file ended before the bytes queued"), "{kind:?}: {lost}");
        }
    }
}
