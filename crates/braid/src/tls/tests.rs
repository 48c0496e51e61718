//! Handshakes and TLS semantics in memory: two `StringTransport`s and a
//! pump that carries each side's output to the other, no sockets.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use super::*;
use crate::error::Error;
use crate::protocol::HalfCloseable;
use crate::testing::{Clock, StringTransport};
use crate::transport::{Producer, Transport};
use rustls::pki_types::pem::PemObject;
use std::sync::Arc;

/// A test CA and leaf certificates it signs.
struct Ca {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pem: String,
}

impl Ca {
    fn new() -> Ca {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        // Each CA its own name, so one is never mistaken for another.
        static SERIAL: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        params.distinguished_name.push(rcgen::DnType::CommonName, format!("braid test CA {n}"));
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca { pem: cert.pem(), issuer: rcgen::Issuer::new(params, key) }
    }

    fn leaf_params(&self, params: rcgen::CertificateParams) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// (certificate PEM, key PEM) for these names.
    fn leaf(&self, names: &[&str]) -> (String, String) {
        let params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        self.leaf_params(params)
    }

    fn identity(&self, names: &[&str]) -> Identity {
        let (c, k) = self.leaf(names);
        Identity::from_pem(c.as_bytes(), k.as_bytes()).unwrap()
    }

    fn roots(&self) -> Roots {
        let mut r = Roots::empty();
        r.add_pem(self.pem.as_bytes()).unwrap();
        r
    }

    fn client(&self) -> ClientConfig {
        ClientConfig::new(self.roots()).unwrap()
    }

    fn server(&self) -> ServerConfig {
        ServerConfig::builder(self.identity(&["localhost"])).build().unwrap()
    }
}

#[derive(Default)]
struct Log {
    made: bool,
    /// How many times handshake_completed ran, and how many data bytes
    /// had arrived before the first.
    handshakes: u32,
    data_before_handshake: Option<usize>,
    data: Vec<u8>,
    lost: Option<Failure>,
    read_closed: bool,
    write_closed: bool,
}

type OnMade = Box<dyn FnOnce(&Transport)>;
type Shared<T> = Rc<RefCell<T>>;
type OnData = Box<dyn FnMut(&Transport, &[u8])>;

/// An application protocol that records what happens to it.
struct App {
    log: Rc<RefCell<Log>>,
    transport: Rc<RefCell<Option<Transport>>>,
    on_made: Option<OnMade>,
    on_data: Option<OnData>,
    half: bool,
}

impl App {
    fn new() -> (App, Shared<Log>, Shared<Option<Transport>>) {
        let log = Rc::new(RefCell::new(Log::default()));
        let tr = Rc::new(RefCell::new(None));
        (App { log: log.clone(), transport: tr.clone(), on_made: None, on_data: None, half: false }, log, tr)
    }
}

impl Protocol for App {
    fn connection_made(&mut self, transport: Transport) {
        self.log.borrow_mut().made = true;
        if let Some(f) = self.on_made.take() {
            f(&transport);
        }
        *self.transport.borrow_mut() = Some(transport);
    }
    fn handshake_completed(&mut self) {
        let mut log = self.log.borrow_mut();
        log.handshakes += 1;
        let before = log.data.len();
        log.data_before_handshake.get_or_insert(before);
        let t = self.transport.borrow().clone().unwrap();
        assert!(t.tls().unwrap().handshake_complete(), "handshake_completed before the handshake was");
    }
    fn data_received(&mut self, data: &[u8]) {
        self.log.borrow_mut().data.extend_from_slice(data);
        let t = self.transport.borrow().clone().unwrap();
        if let Some(f) = self.on_data.as_mut() {
            f(&t, data);
        }
    }
    fn connection_lost(&mut self, reason: Failure) {
        self.log.borrow_mut().lost = Some(reason);
    }
    fn as_half_closeable(&mut self) -> Option<&mut dyn HalfCloseable> {
        if self.half {
            Some(self)
        } else {
            None
        }
    }
}

impl HalfCloseable for App {
    fn read_connection_lost(&mut self) {
        self.log.borrow_mut().read_closed = true;
    }
    fn write_connection_lost(&mut self) {
        self.log.borrow_mut().write_closed = true;
    }
}

/// A client and a server TLS layer over two string transports.
struct Pair {
    ct: StringTransport,
    st: StringTransport,
    client: TlsProtocol,
    server: TlsProtocol,
}

impl Pair {
    fn new(client: TlsProtocol, server: TlsProtocol) -> Pair {
        let mut p = Pair { ct: StringTransport::new(), st: StringTransport::new(), client, server };
        p.st.connect(&mut p.server);
        p.ct.connect(&mut p.client);
        p
    }

    fn start(ca: &Ca, client_app: App, server_app: App) -> Pair {
        Pair::with(ca.client(), "localhost", ca.server(), client_app, server_app)
    }

    fn with(cc: ClientConfig, name: &str, sc: ServerConfig, client_app: App, server_app: App) -> Pair {
        let client = TlsProtocol::client(Box::new(client_app), &cc, name, None).unwrap();
        let server = TlsProtocol::server(Box::new(server_app), &sc, None);
        Pair::new(client, server)
    }

    /// Carries bytes both ways until neither side has more to say.
    fn pump(&mut self) {
        for _ in 0..100 {
            let c = self.ct.take();
            if !c.is_empty() {
                self.st.feed(&mut self.server, &c);
            }
            let s = self.st.take();
            if !s.is_empty() {
                self.ct.feed(&mut self.client, &s);
            }
            if c.is_empty() && s.is_empty() {
                return;
            }
        }
        panic!("the two sides never stopped talking");
    }

    /// Closes both transports below as the reactor would once asked to.
    fn close_below(&mut self, reason: Error) {
        let r = Failure::new(reason);
        let r2 = r.clone();
        self.ct.lose(&mut self.client, r);
        self.st.lose(&mut self.server, r2);
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn tls_error(f: &Failure) -> &TlsError {
    f.downcast_ref::<TlsError>().unwrap_or_else(|| panic!("not a TLS error: {f}"))
}

#[test]
fn handshake_then_data_both_ways() {
    let ca = Ca::new();
    let (mut capp, clog, _) = App::new();
    capp.on_made = Some(Box::new(|t| t.write(b"hello")));
    let (mut sapp, slog, str_) = App::new();
    sapp.on_data = Some(Box::new(|t, d| t.write(&d.to_ascii_uppercase())));
    let mut p = Pair::start(&ca, capp, sapp);
    p.pump();
    assert_eq!(slog.borrow().data, b"hello");
    assert_eq!(clog.borrow().data, b"HELLO");
    let stls = str_.borrow().as_ref().unwrap().tls().expect("a TLS side");
    assert!(stls.handshake_complete());
    assert_eq!(stls.protocol_version(), Some("TLSv1.3"));
    assert_eq!(stls.server_name().as_deref(), Some("localhost"));
    assert!(clog.borrow().lost.is_none() && slog.borrow().lost.is_none());
}

#[test]
fn connection_made_comes_before_the_handshake_and_writes_wait_for_it() {
    let ca = Ca::new();
    let (mut capp, _, ctr) = App::new();
    capp.on_made = Some(Box::new(|t| {
        assert!(!t.tls().unwrap().handshake_complete());
        t.write(b"early secret");
    }));
    let (sapp, slog, _) = App::new();
    let mut p = Pair::start(&ca, capp, sapp);
    assert!(slog.borrow().made, "the server's application is told at once");
    let hello = p.ct.value();
    assert!(!hello.is_empty(), "the client hello went out");
    assert!(!contains(&hello, b"early secret"), "queued, not sent in the clear");
    assert_eq!(ctr.borrow().as_ref().unwrap().buffered(), hello.len() + b"early secret".len());
    p.pump();
    assert_eq!(slog.borrow().data, b"early secret");
}

#[test]
fn handshake_completed_deferred_fires_once_done() {
    let ca = Ca::new();
    let fired = Rc::new(RefCell::new(Vec::new()));
    let (mut capp, _, _) = App::new();
    let f = fired.clone();
    capp.on_made = Some(Box::new(move |t| {
        let tls = t.tls().unwrap();
        let t2 = t.clone();
        tls.when_handshake_completed().add_callback(move |()| {
            f.borrow_mut().push(t2.tls().unwrap().handshake_complete());
        });
    }));
    let (sapp, _, _) = App::new();
    let mut p = Pair::start(&ca, capp, sapp);
    assert!(fired.borrow().is_empty());
    p.pump();
    assert_eq!(*fired.borrow(), vec![true]);
}

// Twisted's IHandshakeListener: handshake_completed once per side, after
// the handshake and before any application data.
#[test]
fn handshake_completed_is_called_once_before_data() {
    let ca = Ca::new();
    let (mut capp, clog, _) = App::new();
    capp.on_made = Some(Box::new(|t| t.write(b"first")));
    let (sapp, slog, _) = App::new();
    let mut p = Pair::start(&ca, capp, sapp);
    assert_eq!(clog.borrow().handshakes + slog.borrow().handshakes, 0, "called before the handshake");
    p.pump();
    assert_eq!(clog.borrow().handshakes, 1);
    assert_eq!(slog.borrow().handshakes, 1);
    assert_eq!(slog.borrow().data, b"first");
    assert_eq!(slog.borrow().data_before_handshake, Some(0), "data came before handshake_completed");
}

#[test]
fn lose_connection_sends_close_notify_and_both_sides_see_connection_done() {
    let ca = Ca::new();
    let (capp, clog, ctr) = App::new();
    let (sapp, slog, _) = App::new();
    let mut p = Pair::start(&ca, capp, sapp);
    p.pump();
    ctr.borrow().as_ref().unwrap().lose_connection();
    assert!(p.ct.disconnecting(), "the transport below is closed after close_notify");
    assert!(!p.ct.value().is_empty(), "close_notify was written");
    p.pump();
    assert!(p.st.disconnecting(), "the server answered close_notify by closing");
    p.close_below(Error::ConnectionDone);
    assert!(clog.borrow().lost.as_ref().unwrap().is_connection_done());
    assert!(slog.borrow().lost.as_ref().unwrap().is_connection_done());
}

#[test]
fn end_of_stream_without_close_notify_is_connection_lost() {
    let ca = Ca::new();
    let (capp, _, _) = App::new();
    let (sapp, slog, _) = App::new();
    let mut p = Pair::start(&ca, capp, sapp);
    p.pump();
    p.server.read_connection_lost();
    assert!(p.st.disconnecting());
    p.st.lose(&mut p.server, Failure::new(Error::ConnectionDone));
    let lost = slog.borrow_mut().lost.take().unwrap();
    assert!(matches!(lost.braid_error(), Some(Error::ConnectionLost)), "{lost}");
    assert!(lost.to_string().contains("close_notify"), "{lost}");
}

#[test]
fn truncated_record_then_end_of_stream_is_connection_lost() {
    let ca = Ca::new();
    let (capp, _, ctr) = App::new();
    let (sapp, slog, _) = App::new();
    let mut p = Pair::start(&ca, capp, sapp);
    p.pump();
    ctr.borrow().as_ref().unwrap().write(&[7u8; 1000]);
    let record = p.ct.take();
    p.st.feed(&mut p.server, &record[..record.len() / 2]);
    assert!(slog.borrow().data.is_empty(), "half a record decrypts to nothing");
    p.server.read_connection_lost();
    p.st.lose(&mut p.server, Failure::new(Error::ConnectionDone));
    let lost = slog.borrow_mut().lost.take().unwrap();
    assert!(matches!(lost.braid_error(), Some(Error::ConnectionLost)), "{lost}");
}

#[test]
fn corrupted_record_is_a_tls_error() {
    let ca = Ca::new();
    let (capp, _, ctr) = App::new();
    let (sapp, slog, _) = App::new();
    let mut p = Pair::start(&ca, capp, sapp);
    p.pump();
    ctr.borrow().as_ref().unwrap().write(b"some data to spoil");
    let mut record = p.ct.take();
    let last = record.len() - 1;
    record[last] ^= 0xff;
    p.st.feed(&mut p.server, &record);
    assert!(p.st.disconnecting(), "the connection is closed");
    assert!(slog.borrow().data.is_empty(), "nothing forged reaches the application");
    p.st.lose(&mut p.server, Failure::new(Error::ConnectionDone));
    let lost = slog.borrow_mut().lost.take().unwrap();
    let e = tls_error(&lost);
    assert!(!e.during_handshake(), "{e}");
}

#[test]
fn garbage_instead_of_a_client_hello_is_a_handshake_error() {
    let ca = Ca::new();
    let (sapp, slog, _) = App::new();
    let mut server = TlsProtocol::server(Box::new(sapp), &ca.server(), None);
    let st = StringTransport::new();
    st.connect(&mut server);
    st.feed(&mut server, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(st.disconnecting(), "closed at once");
    st.feed(&mut server, b"more garbage is ignored");
    st.lose(&mut server, Failure::new(Error::ConnectionDone));
    let lost = slog.borrow_mut().lost.take().unwrap();
    let e = tls_error(&lost);
    assert!(e.during_handshake(), "{e}");
    assert!(slog.borrow().data.is_empty());
}

#[test]
fn hostname_mismatch_fails_both_sides() {
    let ca = Ca::new();
    let (capp, clog, _) = App::new();
    let (sapp, slog, _) = App::new();
    let mut p = Pair::with(ca.client(), "other.example", ca.server(), capp, sapp);
    p.pump();
    assert!(p.ct.disconnecting() && p.st.disconnecting());
    p.close_below(Error::ConnectionDone);
    let c = clog.borrow_mut().lost.take().unwrap();
    assert!(tls_error(&c).during_handshake());
    assert!(
        matches!(
            tls_error(&c).rustls_error(),
            Some(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForNameContext { .. }))
                | Some(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
        ),
        "{c}"
    );
    let s = slog.borrow_mut().lost.take().unwrap();
    assert!(tls_error(&s).during_handshake(), "{s}");
}

#[test]
fn certificate_from_an_unknown_authority_is_refused() {
    let ca = Ca::new();
    let other = Ca::new();
    let (capp, clog, _) = App::new();
    let (sapp, _, _) = App::new();
    let mut p = Pair::with(other.client(), "localhost", ca.server(), capp, sapp);
    p.pump();
    p.close_below(Error::ConnectionDone);
    let c = clog.borrow_mut().lost.take().unwrap();
    assert!(
        matches!(
            tls_error(&c).rustls_error(),
            Some(rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer))
        ),
        "{c}"
    );
}

#[test]
fn expired_certificate_is_refused() {
    let ca = Ca::new();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params.not_before = rcgen::date_time_ymd(2001, 1, 1);
    params.not_after = rcgen::date_time_ymd(2002, 1, 1);
    let (c, k) = ca.leaf_params(params);
    let sc = ServerConfig::builder(Identity::from_pem(c.as_bytes(), k.as_bytes()).unwrap()).build().unwrap();
    let (capp, clog, _) = App::new();
    let (sapp, _, _) = App::new();
    let mut p = Pair::with(ca.client(), "localhost", sc, capp, sapp);
    p.pump();
    p.close_below(Error::ConnectionDone);
    let c = clog.borrow_mut().lost.take().unwrap();
    assert!(
        matches!(
            tls_error(&c).rustls_error(),
            Some(rustls::Error::InvalidCertificate(rustls::CertificateError::Expired))
                | Some(rustls::Error::InvalidCertificate(rustls::CertificateError::ExpiredContext { .. }))
        ),
        "{c}"
    );
}

#[test]
fn handshake_timeout_aborts_a_silent_peer() {
    let ca = Ca::new();
    let clock = Clock::new();
    let (sapp, slog, _) = App::new();
    let config = ca.server().with_handshake_timeout(Some(Duration::from_secs(30)));
    let mut server = TlsProtocol::server(Box::new(sapp), &config, Some(Rc::new(clock.clone())));
    let st = StringTransport::new();
    st.connect(&mut server);
    clock.advance(Duration::from_secs(29));
    assert!(!st.aborted(), "not yet");
    clock.advance(Duration::from_secs(1));
    assert!(st.aborted(), "a silent peer is dropped");
    st.lose(&mut server, Failure::new(Error::ConnectionAborted));
    let lost = slog.borrow_mut().lost.take().unwrap();
    assert!(matches!(lost.braid_error(), Some(Error::TimedOut)), "{lost}");
    assert!(lost.to_string().contains("handshake"), "{lost}");
}

#[test]
fn finished_handshake_cancels_the_timeout() {
    let ca = Ca::new();
    let clock = Clock::new();
    let (sapp, _, _) = App::new();
    let (capp, _, _) = App::new();
    let server = TlsProtocol::server(Box::new(sapp), &ca.server(), Some(Rc::new(clock.clone())));
    let client = TlsProtocol::client(Box::new(capp), &ca.client(), "localhost", None).unwrap();
    let mut p = Pair::new(client, server);
    p.pump();
    clock.advance(Duration::from_secs(60));
    assert!(!p.st.aborted());
    assert!(clock.get_delayed_calls().is_empty());
}

#[test]
fn abort_connection_resets_below() {
    let ca = Ca::new();
    let (capp, clog, ctr) = App::new();
    let (sapp, _, _) = App::new();
    let mut p = Pair::start(&ca, capp, sapp);
    p.pump();
    let t = ctr.borrow().clone().unwrap();
    t.write(b"dropped");
    t.abort_connection();
    assert!(p.ct.aborted());
    assert!(!t.connected());
    p.ct.lose(&mut p.client, Failure::new(Error::ConnectionAborted));
    assert!(matches!(clog.borrow().lost.as_ref().unwrap().braid_error(), Some(Error::ConnectionAborted)));
}

#[test]
fn writes_after_close_are_ignored() {
    let ca = Ca::new();
    let (capp, _, ctr) = App::new();
    let (sapp, _, _) = App::new();
    let mut p = Pair::start(&ca, capp, sapp);
    p.pump();
    let t = ctr.borrow().clone().unwrap();
    p.close_below(Error::ConnectionDone);
    p.ct.clear();
    t.write(b"late");
    t.write_sequence(&[b"late", b"r"]);
    assert!(p.ct.value().is_empty());
}

#[test]
fn peer_close_notify_on_tls13_is_a_half_close_for_a_protocol_that_takes_it() {
    let ca = Ca::new();
    let (capp, _, ctr) = App::new();
    let (mut sapp, slog, str_) = App::new();
    sapp.half = true;
    let mut p = Pair::start(&ca, capp, sapp);
    p.pump();
    ctr.borrow().as_ref().unwrap().lose_write_connection();
    assert!(p.ct.write_closed(), "the write side below was shut down");
    p.pump();
    assert!(slog.borrow().read_closed);
    assert!(!p.st.disconnecting(), "the server may still write");
    str_.borrow().as_ref().unwrap().write(b"still here");
    p.pump();
    p.client.write_connection_lost();
    str_.borrow().as_ref().unwrap().lose_connection();
    assert!(p.st.disconnecting());
}

#[test]
fn mutual_tls_required_refuses_a_client_without_a_certificate() {
    let ca = Ca::new();
    let sc = ServerConfig::builder(ca.identity(&["localhost"]))
        .client_auth(ClientAuth::Required(ca.roots()))
        .build()
        .unwrap();
    let (capp, _, _) = App::new();
    let (sapp, slog, _) = App::new();
    let mut p = Pair::with(ca.client(), "localhost", sc, capp, sapp);
    p.pump();
    p.close_below(Error::ConnectionDone);
    let s = slog.borrow_mut().lost.take().unwrap();
    assert!(tls_error(&s).during_handshake(), "{s}");
}

#[test]
fn mutual_tls_accepts_a_client_certificate_and_shows_it() {
    let ca = Ca::new();
    let sc = ServerConfig::builder(ca.identity(&["localhost"]))
        .client_auth(ClientAuth::Required(ca.roots()))
        .build()
        .unwrap();
    let (cert, key) = ca.leaf(&["client.example"]);
    let id = Identity::from_pem(cert.as_bytes(), key.as_bytes()).unwrap();
    let cc = ClientConfig::builder(ca.roots()).identity(id).build().unwrap();
    let (capp, _, _) = App::new();
    let (sapp, slog, str_) = App::new();
    let mut p = Pair::with(cc, "localhost", sc, capp, sapp);
    p.pump();
    assert!(slog.borrow().lost.is_none());
    let certs = str_.borrow().as_ref().unwrap().tls().unwrap().peer_certificates();
    let expected = rustls::pki_types::CertificateDer::from_pem_slice(cert.as_bytes()).unwrap();
    assert_eq!(certs.first().map(Vec::as_slice), Some(expected.as_ref()));
}

#[test]
fn sni_chooses_the_certificate_by_name() {
    let ca = Ca::new();
    let (a_cert, a_key) = ca.leaf(&["a.example"]);
    let (b_cert, b_key) = ca.leaf(&["b.example"]);
    let sc = ServerConfig::builder(Identity::from_pem(a_cert.as_bytes(), a_key.as_bytes()).unwrap())
        .sni("B.example", Identity::from_pem(b_cert.as_bytes(), b_key.as_bytes()).unwrap())
        .build()
        .unwrap();
    for (name, pem) in [("a.example", &a_cert), ("b.example", &b_cert)] {
        let (capp, clog, ctr) = App::new();
        let (sapp, _, str_) = App::new();
        let mut p = Pair::with(ca.client(), name, sc.clone(), capp, sapp);
        p.pump();
        assert!(clog.borrow().lost.is_none(), "{name}: {:?}", clog.borrow().lost);
        let got = ctr.borrow().as_ref().unwrap().tls().unwrap().peer_certificates();
        let expected = rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        assert_eq!(got[0], expected.as_ref(), "{name}");
        assert_eq!(str_.borrow().as_ref().unwrap().tls().unwrap().server_name().as_deref(), Some(name));
    }
}

#[test]
fn alpn_is_negotiated_and_a_mismatch_refused() {
    let ca = Ca::new();
    let sc = ServerConfig::builder(ca.identity(&["localhost"])).alpn(["h2", "http/1.1"]).build().unwrap();
    let cc = ClientConfig::builder(ca.roots()).alpn(["http/1.1"]).build().unwrap();
    let (capp, _, ctr) = App::new();
    let (sapp, _, str_) = App::new();
    let mut p = Pair::with(cc, "localhost", sc.clone(), capp, sapp);
    p.pump();
    assert_eq!(
        ctr.borrow().as_ref().unwrap().tls().unwrap().alpn_protocol().as_deref(),
        Some(&b"http/1.1"[..])
    );
    assert_eq!(
        str_.borrow().as_ref().unwrap().tls().unwrap().alpn_protocol().as_deref(),
        Some(&b"http/1.1"[..])
    );

    let cc = ClientConfig::builder(ca.roots()).alpn(["spdy/1"]).build().unwrap();
    let (capp, _, _) = App::new();
    let (sapp, slog, _) = App::new();
    let mut p = Pair::with(cc, "localhost", sc, capp, sapp);
    p.pump();
    p.close_below(Error::ConnectionDone);
    let s = slog.borrow_mut().lost.take().unwrap();
    assert!(matches!(tls_error(&s).rustls_error(), Some(rustls::Error::NoApplicationProtocol)), "{s}");
}

#[test]
fn minimum_version_refuses_an_older_peer() {
    let ca = Ca::new();
    let sc =
        ServerConfig::builder(ca.identity(&["localhost"])).min_version(TlsVersion::Tls13).build().unwrap();
    let tls12_only =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .with_root_certificates(ca.roots().store)
            .with_no_client_auth();
    let cc = ClientConfig::from_rustls(Arc::new(tls12_only));
    let (capp, _, _) = App::new();
    let (sapp, slog, _) = App::new();
    let mut p = Pair::with(cc.clone(), "localhost", sc, capp, sapp);
    p.pump();
    p.close_below(Error::ConnectionDone);
    let s = slog.borrow_mut().lost.take().unwrap();
    assert!(tls_error(&s).during_handshake(), "{s}");

    // The same client gets TLS 1.2 from a server with the default minimum.
    let (capp, _, ctr) = App::new();
    let (sapp, _, _) = App::new();
    let mut p = Pair::with(cc, "localhost", ca.server(), capp, sapp);
    p.pump();
    assert_eq!(ctr.borrow().as_ref().unwrap().tls().unwrap().protocol_version(), Some("TLSv1.2"));
}

#[test]
fn second_connection_resumes_the_session() {
    let ca = Ca::new();
    let (cc, sc) = (ca.client(), ca.server());
    let mut resumed = Vec::new();
    for _ in 0..2 {
        let (capp, _, ctr) = App::new();
        let (sapp, _, _) = App::new();
        let mut p = Pair::with(cc.clone(), "localhost", sc.clone(), capp, sapp);
        p.pump();
        resumed.push(ctr.borrow().as_ref().unwrap().tls().unwrap().resumed());
    }
    assert_eq!(resumed, vec![false, true]);
}

#[test]
fn tls12_close_notify_is_answered_and_closes() {
    let ca = Ca::new();
    let tls12_only =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .with_root_certificates(ca.roots().store)
            .with_no_client_auth();
    let (capp, _, ctr) = App::new();
    let (mut sapp, slog, _) = App::new();
    sapp.half = true;
    let mut p =
        Pair::with(ClientConfig::from_rustls(Arc::new(tls12_only)), "localhost", ca.server(), capp, sapp);
    p.pump();
    ctr.borrow().as_ref().unwrap().lose_write_connection();
    p.pump();
    assert!(!slog.borrow().read_closed, "no half-close on TLS 1.2");
    assert!(p.st.disconnecting(), "the server answered and closed");
    p.st.lose(&mut p.server, Failure::new(Error::ConnectionDone));
    assert!(slog.borrow().lost.as_ref().unwrap().is_connection_done());
}

struct CountingProducer {
    calls: RefCell<Vec<&'static str>>,
}

impl Producer for CountingProducer {
    fn pause_producing(&self) {
        self.calls.borrow_mut().push("pause");
    }
    fn resume_producing(&self) {
        self.calls.borrow_mut().push("resume");
    }
    fn stop_producing(&self) {
        self.calls.borrow_mut().push("stop");
    }
}

#[test]
fn a_streaming_producer_is_paced_by_queued_plaintext_then_by_the_transport_below() {
    let ca = Ca::new();
    let producer = Rc::new(CountingProducer { calls: RefCell::new(Vec::new()) });
    let (mut capp, _, ctr) = App::new();
    let prod = producer.clone();
    capp.on_made = Some(Box::new(move |t| {
        t.set_write_buffer_limits(1000, 0);
        t.register_producer(prod, true).unwrap();
        t.write(&[1u8; 1500]);
    }));
    let (sapp, slog, _) = App::new();
    let mut p = Pair::start(&ca, capp, sapp);
    assert_eq!(*producer.calls.borrow(), vec!["pause"], "over the mark before the handshake");
    assert!(p.ct.producer().is_none(), "the transport below does not pace the handshake");
    p.pump();
    assert_eq!(*producer.calls.borrow(), vec!["pause", "resume"]);
    assert!(p.ct.producer().is_some(), "now the transport below paces it");
    assert_eq!(slog.borrow().data.len(), 1500);
    p.ct.producer().unwrap().pause_producing();
    assert_eq!(producer.calls.borrow().last(), Some(&"pause"));
    let t = ctr.borrow().clone().unwrap();
    t.lose_connection();
    assert!(!p.ct.disconnecting(), "a close waits for the producer");
    t.unregister_producer();
    assert!(p.ct.disconnecting());
    assert!(p.ct.producer().is_none());
    p.ct.lose(&mut p.client, Failure::new(Error::ConnectionDone));
}

#[test]
fn pausing_reading_waits_for_the_handshake() {
    let ca = Ca::new();
    let (mut capp, _, ctr) = App::new();
    capp.on_made = Some(Box::new(|t| t.pause_producing()));
    let (sapp, _, _) = App::new();
    let mut p = Pair::start(&ca, capp, sapp);
    assert_eq!(p.ct.producer_state(), crate::testing::ProducerState::Producing);
    p.pump();
    assert!(ctr.borrow().as_ref().unwrap().tls().unwrap().handshake_complete());
    assert_eq!(p.ct.producer_state(), crate::testing::ProducerState::Paused);
}

#[test]
fn start_tls_keeps_earlier_bytes_in_the_clear_and_encrypts_later_ones() {
    let ca = Ca::new();
    let (sc, cc) = (ca.server(), ca.client());
    let (mut sapp, slog, _) = App::new();
    sapp.on_data = Some(Box::new(move |t, d| {
        if d == b"STARTTLS\r\n" {
            t.write(b"GO\r\n");
            t.tls().unwrap().start_tls_server(&sc).unwrap();
            t.write(b"after");
        }
    }));
    let (mut capp, clog, ctr) = App::new();
    capp.on_data = Some(Box::new(move |t, d| {
        if d == b"GO\r\n" {
            t.tls().unwrap().start_tls_client(&cc, "localhost").unwrap();
            t.write(b"secret");
        }
    }));
    let client = TlsProtocol::plain(Box::new(capp), None);
    let server = TlsProtocol::plain(Box::new(sapp), None);
    let mut p = Pair::new(client, server);
    ctr.borrow().as_ref().unwrap().write(b"STARTTLS\r\n");
    assert_eq!(p.ct.value(), b"STARTTLS\r\n", "in the clear");
    let c = p.ct.take();
    p.st.feed(&mut p.server, &c);
    let s = p.st.take();
    assert!(s.starts_with(b"GO\r\n"), "written before start_tls: in the clear");
    assert!(!contains(&s, b"after"), "written after start_tls: not in the clear");
    p.ct.feed(&mut p.client, &s);
    assert!(!contains(&p.ct.value(), b"secret"));
    p.pump();
    assert_eq!(slog.borrow().data, b"STARTTLS\r\nsecret");
    assert_eq!(clog.borrow().data, b"GO\r\nafter");
    let again = ctr.borrow().as_ref().unwrap().tls().unwrap().start_tls_client(&ca.client(), "localhost");
    assert!(again.is_err(), "TLS cannot be started twice");
}

#[test]
fn pem_errors_name_the_file_and_the_problem() {
    let dir = std::env::temp_dir().join(format!("braid-tls-pem-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = Ca::new();
    let (cert, key) = ca.leaf(&["localhost"]);
    let (_, other_key) = ca.leaf(&["localhost"]);
    let (c, k, ok, junk) =
        (dir.join("c.pem"), dir.join("k.pem"), dir.join("other.pem"), dir.join("junk.pem"));
    std::fs::write(&c, &cert).unwrap();
    std::fs::write(&k, &key).unwrap();
    std::fs::write(&ok, &other_key).unwrap();
    std::fs::write(&junk, "not pem at all\n").unwrap();
    assert!(Identity::from_pem_files(&c, &k).is_ok());
    let missing = dir.join("missing.pem");
    let e = Identity::from_pem_files(&missing, &k).unwrap_err().to_string();
    assert!(e.contains("missing.pem") && e.contains("certificate"), "{e}");
    let e = Identity::from_pem_files(&junk, &k).unwrap_err().to_string();
    assert!(e.contains("junk.pem") && e.contains("no CERTIFICATE"), "{e}");
    let e = Identity::from_pem_files(&c, &junk).unwrap_err().to_string();
    assert!(e.contains("junk.pem") && e.contains("no PRIVATE KEY"), "{e}");
    let e = Identity::from_pem_files(&c, &ok).unwrap_err().to_string();
    assert!(e.contains("other.pem") && e.contains("does not match"), "{e}");
    let e = Roots::from_pem_file(&junk).unwrap_err().to_string();
    assert!(e.contains("junk.pem"), "{e}");
    let e = ClientConfig::new(Roots::empty()).unwrap_err().to_string();
    assert!(e.contains("no certificate authority"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_bad_server_name_is_refused_at_once() {
    let ca = Ca::new();
    let (capp, _, _) = App::new();
    let e = TlsProtocol::client(Box::new(capp), &ca.client(), "not a name!", None).err().unwrap();
    assert!(e.to_string().contains("not a name!"), "{e}");
}

#[test]
fn close_notify_during_the_handshake_ends_the_connection_at_once() {
    let ca = Ca::new();
    let (sapp, slog, _) = App::new();
    let mut server = TlsProtocol::server(Box::new(sapp), &ca.server(), None);
    let st = StringTransport::new();
    st.connect(&mut server);
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut peer = rustls::ClientConnection::new(ca.client().rustls().clone(), name).unwrap();
    peer.send_close_notify();
    let mut hello = Vec::new();
    while peer.wants_write() {
        peer.write_tls(&mut hello).unwrap();
    }
    st.feed(&mut server, &hello);
    assert!(st.disconnecting(), "not left waiting for the handshake timeout");
    st.lose(&mut server, Failure::new(Error::ConnectionDone));
    let lost = slog.borrow_mut().lost.take().unwrap();
    assert!(tls_error(&lost).during_handshake(), "{lost}");
    assert!(lost.to_string().contains("CloseNotify"), "{lost}");
}

#[test]
fn optional_client_auth_lets_both_kinds_of_client_in() {
    let ca = Ca::new();
    let sc = ServerConfig::builder(ca.identity(&["localhost"]))
        .client_auth(ClientAuth::Optional(ca.roots()))
        .build()
        .unwrap();
    let with_cert =
        ClientConfig::builder(ca.roots()).identity(ca.identity(&["client.example"])).build().unwrap();
    for (cc, certs) in [(ca.client(), 0), (with_cert, 1)] {
        let (capp, _, _) = App::new();
        let (sapp, slog, str_) = App::new();
        let mut p = Pair::with(cc, "localhost", sc.clone(), capp, sapp);
        p.pump();
        assert!(slog.borrow().lost.is_none(), "{:?}", slog.borrow().lost);
        let tls = str_.borrow().as_ref().unwrap().tls().unwrap();
        assert!(tls.handshake_complete());
        assert_eq!(tls.peer_certificates().len(), certs);
    }
}

#[test]
fn a_pull_producer_is_handed_to_the_transport_below_once_the_handshake_is_done() {
    let ca = Ca::new();
    let producer = Rc::new(CountingProducer { calls: RefCell::new(Vec::new()) });
    let (mut capp, _, _) = App::new();
    let prod = producer.clone();
    capp.on_made = Some(Box::new(move |t| t.register_producer(prod, false).unwrap()));
    let (sapp, _, _) = App::new();
    let mut p = Pair::start(&ca, capp, sapp);
    assert!(p.ct.producer().is_none(), "no chunk is asked for while nothing can be sent");
    p.pump();
    assert!(p.ct.producer().is_some() && !p.ct.streaming(), "a pull producer, below");
    p.ct.producer().unwrap().resume_producing();
    assert_eq!(*producer.calls.borrow(), vec!["resume"], "asked through the transport below");
}

#[test]
fn the_peer_address_is_the_transport_s_below_and_stays_after_the_close() {
    let ca = Ca::new();
    let (capp, _, ctr) = App::new();
    let (sapp, _, _) = App::new();
    let mut p = Pair::start(&ca, capp, sapp);
    p.pump();
    let t = ctr.borrow().clone().unwrap();
    assert_eq!(t.peer(), p.ct.transport().peer());
    assert_eq!(t.host(), p.ct.transport().host());
    p.close_below(Error::ConnectionDone);
    assert_eq!(t.peer(), p.ct.transport().peer());
}

/// Carries bytes both ways in pieces of at most `piece` bytes, so records
/// and handshake messages arrive split anywhere.
fn pump_in_pieces(p: &mut Pair, piece: usize) {
    for _ in 0..100_000 {
        let c = p.ct.take();
        for chunk in c.chunks(piece) {
            p.st.feed(&mut p.server, chunk);
        }
        let s = p.st.take();
        for chunk in s.chunks(piece) {
            p.ct.feed(&mut p.client, chunk);
        }
        if c.is_empty() && s.is_empty() {
            return;
        }
    }
    panic!("the two sides never stopped talking");
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
    /// However the ciphertext is split on its way (down to one byte at a
    /// time), the handshake completes and the plaintext arrives whole and
    /// in order, both ways; nothing stays pending inside the session.
    #[test]
    fn any_split_of_the_ciphertext_gives_the_same_plaintext(piece in 1usize..40_000, len in 0usize..100_000) {
        let ca = Ca::new();
        let (capp, clog, ctr) = App::new();
        let (sapp, slog, str_) = App::new();
        let mut p = Pair::start(&ca, capp, sapp);
        pump_in_pieces(&mut p, piece);
        let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        ctr.borrow().as_ref().unwrap().write(&data);
        str_.borrow().as_ref().unwrap().write(b"pong");
        pump_in_pieces(&mut p, piece);
        proptest::prop_assert!(clog.borrow().lost.is_none() && slog.borrow().lost.is_none());
        proptest::prop_assert_eq!(&slog.borrow().data, &data);
        proptest::prop_assert_eq!(&clog.borrow().data, b"pong");
    }
}

#[test]
fn the_sni_name_is_seen_on_full_and_resumed_handshakes() {
    let ca = Ca::new();
    let (cc, sc) = (ca.client(), ca.server());
    let mut seen = Vec::new();
    for _ in 0..2 {
        let (capp, _, ctr) = App::new();
        let (sapp, _, str_) = App::new();
        let mut p = Pair::with(cc.clone(), "localhost", sc.clone(), capp, sapp);
        p.pump();
        let resumed = ctr.borrow().as_ref().unwrap().tls().unwrap().resumed();
        seen.push((resumed, str_.borrow().as_ref().unwrap().tls().unwrap().server_name()));
    }
    assert_eq!(seen, [(false, Some("localhost".to_string())), (true, Some("localhost".to_string()))]);
}
