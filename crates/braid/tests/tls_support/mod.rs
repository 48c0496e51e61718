//! Certificates for the TLS tests, made when the tests run (never
//! committed): a CA, leaf certificates it signs, and the PEM files that
//! outside peers (openssl, curl) and `Identity::from_pem_files` read.
#![allow(dead_code)]

pub mod proxy;

use std::cell::RefCell;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicU32, Ordering};

use braid::tls::{ClientConfig, Identity, Roots, ServerConfig};
use braid::{Failure, HalfCloseable, Protocol, Transport};

/// A test CA that signs leaf certificates.
pub struct Ca {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pub pem: String,
}

static SERIAL: AtomicU32 = AtomicU32::new(0);

impl Ca {
    pub fn new() -> Ca {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        // Each CA its own name, so one is never mistaken for another.
        let n = SERIAL.fetch_add(1, Ordering::Relaxed);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("braid test CA {} {n}", std::process::id()));
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca { pem: cert.pem(), issuer: rcgen::Issuer::new(params, key) }
    }

    /// (certificate PEM, key PEM) for these names (DNS names or IPs).
    pub fn leaf(&self, names: &[&str]) -> (String, String) {
        let params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    pub fn identity(&self, names: &[&str]) -> Identity {
        let (c, k) = self.leaf(names);
        Identity::from_pem(c.as_bytes(), k.as_bytes()).unwrap()
    }

    pub fn roots(&self) -> Roots {
        let mut r = Roots::empty();
        r.add_pem(self.pem.as_bytes()).unwrap();
        r
    }

    pub fn client(&self) -> ClientConfig {
        ClientConfig::new(self.roots()).unwrap()
    }

    pub fn server(&self) -> ServerConfig {
        ServerConfig::builder(self.identity(&["localhost", "127.0.0.1"])).build().unwrap()
    }

    /// A rustls client configuration trusting this CA, for peers written
    /// with plain rustls on a thread.
    pub fn rustls_client(&self) -> std::sync::Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        use rustls::pki_types::pem::PemObject;
        roots.add(rustls::pki_types::CertificateDer::from_pem_slice(self.pem.as_bytes()).unwrap()).unwrap();
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        std::sync::Arc::new(
            rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    }
}

/// PEM files in a fresh directory, removed when dropped.
pub struct Files {
    pub dir: PathBuf,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Files {
    /// The CA and one leaf for `names`, written out.
    pub fn new(ca: &Ca, names: &[&str]) -> Files {
        let n = SERIAL.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("braid-tls-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = ca.leaf(names);
        let files =
            Files { ca: dir.join("ca.pem"), cert: dir.join("cert.pem"), key: dir.join("key.pem"), dir };
        std::fs::write(&files.ca, &ca.pem).unwrap();
        std::fs::write(&files.cert, cert).unwrap();
        std::fs::write(&files.key, key).unwrap();
        files
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub type Events = Rc<RefCell<Vec<String>>>;
type OnTransport = Option<Box<dyn FnMut(&Transport)>>;
type OnData = Option<Box<dyn FnMut(&Transport, &[u8])>>;
type OnLost = Option<Box<dyn FnMut(&Failure)>>;

/// A protocol that records what happens to it and runs optional hooks.
#[derive(Default)]
pub struct Rec {
    pub log: Events,
    pub data: Rc<RefCell<Vec<u8>>>,
    pub transport: Option<Transport>,
    pub on_made: OnTransport,
    pub on_data: OnData,
    pub on_lost: OnLost,
    pub half: bool,
    pub on_read_closed: OnTransport,
}

impl Protocol for Rec {
    fn connection_made(&mut self, t: Transport) {
        self.log.borrow_mut().push("made".into());
        if let Some(f) = self.on_made.as_mut() {
            f(&t);
        }
        self.transport = Some(t);
    }
    fn data_received(&mut self, data: &[u8]) {
        self.data.borrow_mut().extend_from_slice(data);
        if let (Some(f), Some(t)) = (self.on_data.as_mut(), self.transport.as_ref()) {
            f(t, data);
        }
    }
    fn connection_lost(&mut self, reason: Failure) {
        self.log.borrow_mut().push(format!("lost: {reason}"));
        if let Some(f) = self.on_lost.as_mut() {
            f(&reason);
        }
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
        if let (Some(f), Some(t)) = (self.on_read_closed.as_mut(), self.transport.as_ref()) {
            f(t);
        }
    }
    fn write_connection_lost(&mut self) {
        self.log.borrow_mut().push("write closed".into());
    }
}

/// Bytes that do not repeat with a short period, so a lost or reordered
/// chunk shows.
pub fn payload(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
}
