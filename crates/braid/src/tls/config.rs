//! Building TLS configurations: certificates and keys from PEM files, CA
//! bundles, client certificates, SNI, ALPN and the lowest protocol version.
//!
//! Every helper here fails with an [`Error::Io`] whose context names the
//! file (or the part of the configuration) and whose message says what is
//! wrong with it, so a server started with a bad `--tls-key` says which
//! file and why.

use std::fmt;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;

use crate::error::Error;

/// How long a handshake may take before the connection is dropped, unless
/// a configuration says otherwise.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

fn invalid(context: String, why: impl Into<String>) -> Error {
    Error::io(context, io::Error::new(io::ErrorKind::InvalidData, why.into()))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    // Named rather than taken from the process default, so another crate
    // enabling a second provider cannot make the choice ambiguous.
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_file(path: &Path, what: &str) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|e| Error::io(format!("reading {what} from {}", path.display()), e))
}

fn parse_certs(pem: &[u8], context: impl Fn() -> String) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(context(), format!("bad PEM: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(context(), "no CERTIFICATE block found (is it a PEM certificate file?)"));
    }
    Ok(certs)
}

fn parse_key(pem: &[u8], context: impl Fn() -> String) -> Result<PrivateKeyDer<'static>, Error> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => {
            invalid(context(), "no PRIVATE KEY block found (is it a PEM private key file?)")
        }
        other => invalid(context(), format!("bad PEM: {other}")),
    })
}

/// A certificate chain and its private key: what a server (or a client
/// doing mutual TLS) proves itself with.
pub struct Identity {
    key: Arc<CertifiedKey>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity").field("certificates", &self.key.cert.len()).finish()
    }
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity { key: self.key.clone() }
    }
}

impl Identity {
    /// Reads the chain (leaf first) from `cert` and the key (PKCS#8,
    /// PKCS#1 or SEC1) from `key`, both PEM. Fails naming the file if it
    /// is missing, holds no certificate or key, or if the key does not
    /// belong to the certificate.
    pub fn from_pem_files(cert: impl AsRef<Path>, key: impl AsRef<Path>) -> Result<Identity, Error> {
        let (cert, key) = (cert.as_ref(), key.as_ref());
        let cert_pem = read_file(cert, "the certificate chain")?;
        let key_pem = read_file(key, "the private key")?;
        let certs =
            parse_certs(&cert_pem, || format!("reading the certificate chain from {}", cert.display()))?;
        let key_der = parse_key(&key_pem, || format!("reading the private key from {}", key.display()))?;
        Self::build(certs, key_der, || {
            format!("pairing {} with the key in {}", cert.display(), key.display())
        })
    }

    /// The same from PEM text in memory.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<Identity, Error> {
        let certs = parse_certs(cert_pem, || "reading the certificate chain".to_string())?;
        let key = parse_key(key_pem, || "reading the private key".to_string())?;
        Self::build(certs, key, || "pairing the certificate with its key".to_string())
    }

    /// The same from DER: the chain, leaf first, and a PKCS#8 key.
    pub fn from_der(certs: Vec<Vec<u8>>, pkcs8_key: Vec<u8>) -> Result<Identity, Error> {
        let certs = certs.into_iter().map(CertificateDer::from).collect();
        let key = PrivateKeyDer::Pkcs8(pkcs8_key.into());
        Self::build(certs, key, || "pairing the certificate with its key".to_string())
    }

    fn build(
        certs: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        context: impl Fn() -> String,
    ) -> Result<Identity, Error> {
        let key = CertifiedKey::from_der(certs, key, &provider()).map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => {
                invalid(context(), "the private key does not match the certificate")
            }
            other => invalid(context(), other.to_string()),
        })?;
        Ok(Identity { key: Arc::new(key) })
    }
}

/// Certificate authorities to trust: for a client checking servers, or a
/// server checking client certificates.
#[derive(Clone, Debug)]
pub struct Roots {
    pub(crate) store: rustls::RootCertStore,
}

impl Default for Roots {
    fn default() -> Self {
        Roots { store: rustls::RootCertStore::empty() }
    }
}

impl Roots {
    /// No authority at all (add some with [`Roots::add_pem_file`]).
    pub fn empty() -> Roots {
        Roots::default()
    }

    /// The authorities in a PEM bundle file (a CA bundle).
    pub fn from_pem_file(path: impl AsRef<Path>) -> Result<Roots, Error> {
        let mut roots = Roots::empty();
        roots.add_pem_file(path)?;
        Ok(roots)
    }

    /// The system's trusted authorities (`SSL_CERT_FILE`/`SSL_CERT_DIR`,
    /// or the platform's store). Fails if none can be loaded.
    pub fn system() -> Result<Roots, Error> {
        let found = rustls_native_certs::load_native_certs();
        let mut roots = Roots::empty();
        let (added, _ignored) = roots.store.add_parsable_certificates(found.certs);
        if added == 0 {
            let why = found.errors.first().map_or("no certificates found".to_string(), |e| e.to_string());
            return Err(invalid("loading the system's certificate authorities".to_string(), why));
        }
        Ok(roots)
    }

    /// Adds every authority in a PEM bundle file.
    pub fn add_pem_file(&mut self, path: impl AsRef<Path>) -> Result<&mut Roots, Error> {
        let path = path.as_ref();
        let pem = read_file(path, "certificate authorities")?;
        self.add_pem_with(&pem, || format!("reading certificate authorities from {}", path.display()))
    }

    /// Adds every authority in PEM text.
    pub fn add_pem(&mut self, pem: &[u8]) -> Result<&mut Roots, Error> {
        self.add_pem_with(pem, || "reading certificate authorities".to_string())
    }

    fn add_pem_with(&mut self, pem: &[u8], context: impl Fn() -> String) -> Result<&mut Roots, Error> {
        for cert in parse_certs(pem, &context)? {
            self.store
                .add(cert)
                .map_err(|e| invalid(context(), format!("not a usable CA certificate: {e}")))?;
        }
        Ok(self)
    }

    /// Adds one authority in DER.
    pub fn add_der(&mut self, der: Vec<u8>) -> Result<&mut Roots, Error> {
        self.store
            .add(CertificateDer::from(der))
            .map_err(|e| invalid("adding a certificate authority".to_string(), e.to_string()))?;
        Ok(self)
    }

    /// How many authorities are trusted.
    pub fn len(&self) -> usize {
        self.store.len()
    }

    /// True if none is.
    pub fn is_empty(&self) -> bool {
        self.store.is_empty()
    }
}

/// The lowest TLS version a configuration accepts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum TlsVersion {
    /// TLS 1.2 and 1.3 (the default).
    #[default]
    Tls12,
    /// TLS 1.3 only.
    Tls13,
}

impl TlsVersion {
    fn versions(self) -> &'static [&'static rustls::SupportedProtocolVersion] {
        static BOTH: [&rustls::SupportedProtocolVersion; 2] =
            [&rustls::version::TLS13, &rustls::version::TLS12];
        static ONLY_13: [&rustls::SupportedProtocolVersion; 1] = [&rustls::version::TLS13];
        match self {
            TlsVersion::Tls12 => &BOTH,
            TlsVersion::Tls13 => &ONLY_13,
        }
    }
}

/// Whether a server asks clients for certificates (mutual TLS).
#[derive(Clone, Debug, Default)]
pub enum ClientAuth {
    /// No client certificate is asked for (the default).
    #[default]
    None,
    /// A client may present a certificate signed by one of these
    /// authorities; one without a certificate is let in too.
    Optional(Roots),
    /// A client must present a certificate signed by one of these.
    Required(Roots),
}

/// A server's TLS settings, ready to hand to `listen_ssl` or a
/// [`TlsFactory`](super::TlsFactory). Cheap to clone.
#[derive(Clone)]
pub struct ServerConfig {
    pub(crate) rustls: Arc<rustls::ServerConfig>,
    pub(crate) handshake_timeout: Option<Duration>,
}

impl fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerConfig").field("handshake_timeout", &self.handshake_timeout).finish()
    }
}

impl ServerConfig {
    /// A server proving itself with the chain and key in these PEM files,
    /// with every other setting at its default.
    pub fn from_pem_files(cert: impl AsRef<Path>, key: impl AsRef<Path>) -> Result<ServerConfig, Error> {
        ServerConfig::builder(Identity::from_pem_files(cert, key)?).build()
    }

    /// Starts a configuration whose certificate, when no SNI name matches
    /// (or the client sends none), is `identity`.
    pub fn builder(identity: Identity) -> ServerConfigBuilder {
        ServerConfigBuilder {
            default: identity,
            by_name: Vec::new(),
            alpn: Vec::new(),
            min_version: TlsVersion::default(),
            client_auth: ClientAuth::None,
            handshake_timeout: Some(DEFAULT_HANDSHAKE_TIMEOUT),
        }
    }

    /// Wraps a rustls configuration built by hand (for settings the
    /// builder does not offer), with the default handshake timeout.
    pub fn from_rustls(config: Arc<rustls::ServerConfig>) -> ServerConfig {
        let mut config = (*config).clone();
        config.cert_resolver = Arc::new(Recording(config.cert_resolver.clone()));
        ServerConfig { rustls: Arc::new(config), handshake_timeout: Some(DEFAULT_HANDSHAKE_TIMEOUT) }
    }

    /// Sets the handshake timeout (`None`: wait for ever).
    pub fn with_handshake_timeout(mut self, timeout: Option<Duration>) -> ServerConfig {
        self.handshake_timeout = timeout;
        self
    }

    /// The rustls configuration underneath.
    pub fn rustls(&self) -> &Arc<rustls::ServerConfig> {
        &self.rustls
    }
}

/// Builds a [`ServerConfig`]; see [`ServerConfig::builder`].
#[derive(Debug)]
pub struct ServerConfigBuilder {
    default: Identity,
    by_name: Vec<(String, Identity)>,
    alpn: Vec<Vec<u8>>,
    min_version: TlsVersion,
    client_auth: ClientAuth,
    handshake_timeout: Option<Duration>,
}

impl ServerConfigBuilder {
    /// Serves `identity` to clients that ask for `name` by SNI (matched
    /// without regard to case).
    pub fn sni(mut self, name: &str, identity: Identity) -> Self {
        self.by_name.push((name.to_ascii_lowercase(), identity));
        self
    }

    /// The ALPN protocols offered, most preferred first (`b"h2"`,
    /// `b"http/1.1"`). A client offering none of them is refused.
    pub fn alpn<P: AsRef<[u8]>>(mut self, protocols: impl IntoIterator<Item = P>) -> Self {
        self.alpn = protocols.into_iter().map(|p| p.as_ref().to_vec()).collect();
        self
    }

    /// The lowest version accepted.
    pub fn min_version(mut self, version: TlsVersion) -> Self {
        self.min_version = version;
        self
    }

    /// Asks clients for certificates.
    pub fn client_auth(mut self, auth: ClientAuth) -> Self {
        self.client_auth = auth;
        self
    }

    /// Sets the handshake timeout (`None`: wait for ever; default 30 s).
    pub fn handshake_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// The finished configuration. Session resumption is on (a session
    /// cache for TLS 1.2 and 1.3), as rustls has it by default.
    pub fn build(self) -> Result<ServerConfig, Error> {
        let context = || "building the TLS server configuration".to_string();
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(self.min_version.versions())
            .map_err(|e| invalid(context(), e.to_string()))?;
        let verifier = match self.client_auth {
            ClientAuth::None => None,
            ClientAuth::Optional(roots) => Some((roots, true)),
            ClientAuth::Required(roots) => Some((roots, false)),
        };
        let builder = match verifier {
            None => builder.with_no_client_auth(),
            Some((roots, optional)) => {
                if roots.is_empty() {
                    return Err(invalid(context(), "client authentication needs at least one authority"));
                }
                let v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots.store), provider());
                let v = if optional { v.allow_unauthenticated() } else { v };
                builder.with_client_cert_verifier(v.build().map_err(|e| invalid(context(), e.to_string()))?)
            }
        };
        // One resolver whether or not names are given: a single
        // certificate is the case with no names.
        let mut config =
            builder.with_cert_resolver(Arc::new(ByName { default: self.default, names: self.by_name }));
        config.alpn_protocols = self.alpn;
        Ok(ServerConfig { rustls: Arc::new(config), handshake_timeout: self.handshake_timeout })
    }
}

/// Chooses the certificate by the SNI name the client sent.
#[derive(Debug)]
struct ByName {
    default: Identity,
    names: Vec<(String, Identity)>,
}

std::thread_local! {
    /// The SNI name of the handshake rustls is running on this thread, for
    /// the session to pick up when the call into rustls returns (rustls's
    /// unbuffered server connection does not expose it).
    static SNI: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Takes the SNI name a certificate lookup on this thread saw, if any.
pub(crate) fn take_sni() -> Option<String> {
    SNI.with(|s| s.borrow_mut().take())
}

fn record_sni(hello: &ClientHello<'_>) {
    if let Some(name) = hello.server_name() {
        SNI.with(|s| *s.borrow_mut() = Some(name.to_string()));
    }
}

/// Wraps a hand-built configuration's resolver so the SNI name is seen.
#[derive(Debug)]
struct Recording(Arc<dyn ResolvesServerCert>);

impl ResolvesServerCert for Recording {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        record_sni(&hello);
        self.0.resolve(hello)
    }
}

impl ResolvesServerCert for ByName {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        record_sni(&hello);
        let wanted = hello.server_name().map(str::to_ascii_lowercase);
        let chosen =
            wanted.and_then(|w| self.names.iter().find(|(n, _)| *n == w)).map_or(&self.default, |(_, i)| i);
        Some(chosen.key.clone())
    }
}

/// A client's TLS settings, ready to hand to `connect_ssl` or a
/// [`TlsClientFactory`](super::TlsClientFactory). Cheap to clone.
#[derive(Clone)]
pub struct ClientConfig {
    pub(crate) rustls: Arc<rustls::ClientConfig>,
    pub(crate) handshake_timeout: Option<Duration>,
}

impl fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientConfig").field("handshake_timeout", &self.handshake_timeout).finish()
    }
}

impl ClientConfig {
    /// A client trusting the authorities in `roots`, every other setting
    /// at its default.
    pub fn new(roots: Roots) -> Result<ClientConfig, Error> {
        ClientConfig::builder(roots).build()
    }

    /// Starts a client configuration that trusts `roots`
    /// ([`Roots::system`] for the system's, [`Roots::from_pem_file`] for a
    /// CA bundle).
    pub fn builder(roots: Roots) -> ClientConfigBuilder {
        ClientConfigBuilder {
            roots,
            identity: None,
            alpn: Vec::new(),
            min_version: TlsVersion::default(),
            handshake_timeout: Some(DEFAULT_HANDSHAKE_TIMEOUT),
        }
    }

    /// Wraps a rustls configuration built by hand, with the default
    /// handshake timeout.
    pub fn from_rustls(config: Arc<rustls::ClientConfig>) -> ClientConfig {
        ClientConfig { rustls: config, handshake_timeout: Some(DEFAULT_HANDSHAKE_TIMEOUT) }
    }

    /// Sets the handshake timeout (`None`: wait for ever).
    pub fn with_handshake_timeout(mut self, timeout: Option<Duration>) -> ClientConfig {
        self.handshake_timeout = timeout;
        self
    }

    /// The rustls configuration underneath.
    pub fn rustls(&self) -> &Arc<rustls::ClientConfig> {
        &self.rustls
    }
}

/// Builds a [`ClientConfig`]; see [`ClientConfig::builder`].
#[derive(Debug)]
pub struct ClientConfigBuilder {
    roots: Roots,
    identity: Option<Identity>,
    alpn: Vec<Vec<u8>>,
    min_version: TlsVersion,
    handshake_timeout: Option<Duration>,
}

impl ClientConfigBuilder {
    /// Presents `identity` when the server asks for a certificate.
    pub fn identity(mut self, identity: Identity) -> Self {
        self.identity = Some(identity);
        self
    }

    /// The ALPN protocols offered, most preferred first.
    pub fn alpn<P: AsRef<[u8]>>(mut self, protocols: impl IntoIterator<Item = P>) -> Self {
        self.alpn = protocols.into_iter().map(|p| p.as_ref().to_vec()).collect();
        self
    }

    /// The lowest version accepted.
    pub fn min_version(mut self, version: TlsVersion) -> Self {
        self.min_version = version;
        self
    }

    /// Sets the handshake timeout (`None`: wait for ever; default 30 s).
    pub fn handshake_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// The finished configuration. Session resumption is on: the client
    /// keeps tickets in memory and offers them on later connections.
    pub fn build(self) -> Result<ClientConfig, Error> {
        let context = || "building the TLS client configuration".to_string();
        if self.roots.is_empty() {
            return Err(invalid(
                context(),
                "no certificate authority to trust (give a CA bundle or the system's)",
            ));
        }
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(self.min_version.versions())
            .map_err(|e| invalid(context(), e.to_string()))?
            .with_root_certificates(self.roots.store);
        let mut config = match self.identity {
            None => builder.with_no_client_auth(),
            Some(id) => builder.with_client_cert_resolver(Arc::new(ClientIdentity(id))),
        };
        config.alpn_protocols = self.alpn;
        Ok(ClientConfig { rustls: Arc::new(config), handshake_timeout: self.handshake_timeout })
    }
}

/// Presents one certificate whenever a server asks.
#[derive(Debug)]
struct ClientIdentity(Identity);

impl rustls::client::ResolvesClientCert for ClientIdentity {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The name a client checks the server's certificate against: a DNS name
/// or an IP literal.
pub(crate) fn server_name(host: &str) -> Result<ServerName<'static>, Error> {
    ServerName::try_from(host.to_string()).map_err(|e| {
        Error::io(
            format!("using {host:?} as a TLS server name"),
            io::Error::new(io::ErrorKind::InvalidInput, e),
        )
    })
}
