//! Endpoints (Twisted's `IStreamServerEndpoint`, `IStreamClientEndpoint`
//! and the `serverFromString`/`clientFromString` descriptions): where to
//! listen or connect, named by a string such as `tcp:8080:interface=127.0.0.1`
//! (grammar in [`grammar`]).
//!
//! Servers: `tcp:PORT[:interface=IP][:backlog=N][:reusePort=1]` (the last
//! is braid's: `SO_REUSEPORT`, for one listener per worker thread),
//! `tcp6:PORT[:interface=::]`,
//! `unix:PATH[:mode=666][:backlog=50][:lockfile=1]`,
//! `udp:PORT[:interface=IP][:maxPacketSize=8192]` (braid's own: a datagram
//! endpoint), and `systemd:domain=INET|INET6|UNIX:index=N` or `name=NAME`
//! (a socket passed by the service manager). Clients:
//! `tcp:HOST:PORT[:timeout=30][:bindAddress=IP]` (every resolved address
//! is tried, staggered, as Twisted's `HostnameEndpoint`; a name in any
//! script is kept, resolved and shown in its IDNA form, and one with no
//! such form fails the connect, not the parse: see [`HostnameEndpoint`]) and
//! `unix:PATH[:timeout=30][:lockfile=0]`. TLS: the server
//! `ssl:PORT:privateKey=KEY.pem[:certKey=CERT.pem][:extraCertChain=CHAIN.pem][:interface=IP][:backlog=N]`
//! (certKey defaults to privateKey, as in Twisted: one file holding both),
//! and `tls:DIRECTORY[:port=443][:interface=::][:backlog=50]`, which
//! chooses the certificate by the name the client asks for (SNI): each
//! `NAME.pem` in the directory holds that name's chain and key,
//! `*.DOMAIN.pem` serves one label below DOMAIN; a client that names none,
//! or a name without a file, gets the first file's (sorted by name); files
//! that cannot serve are skipped with a warning, see [`sni`]),
//! `stdio:` (Twisted's `StandardIOEndpoint`: one protocol, built for
//! [`Address::Pipe`], on this process's standard input and output; see
//! [`crate::stdio`]),
//! and the clients `tls:HOST:PORT[:timeout=30][:bindAddress=IP][:trustRoots=CA.pem]`
//! (also as `ssl:`; without trustRoots, the system's roots), which check
//! the server's certificate against HOST's IDNA form. A [`Registry`] maps
//! kinds to parsers: a new kind is one entry. Built in code only: the
//! [`ProcessEndpoint`], whose connect starts a program and speaks to it.
//!
//! Listening and connecting hand back Deferreds, as in Twisted: a server's
//! fires with its port, a client's with the connection's transport once it
//! is made (or fails with why it was not).

pub mod grammar;
pub mod hostname;
pub mod process;
pub mod sni;

use std::cell::RefCell;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Mutex;
use std::time::Duration;

pub use grammar::{parse, quote, Description, EndpointError};
pub use hostname::{Host, HostnameEndpoint};
pub use process::{ProcessEndpoint, StderrPolicy};

use crate::datagram::{DatagramProtocol, DatagramTransport, SharedDatagram};
use crate::defer::Deferred;
use crate::error::{Error, Failure};
use crate::protocol::{
    ClientFactory, Connector, Factory, FileDescriptorReceiver, HalfCloseable, Protocol, SharedFactory,
};
use crate::reactor::Reactor;
use crate::stream::{Address, StreamConnector};
use crate::tcp::ListeningPort;
use crate::transport::Transport;

/// Where to listen (Twisted's `IStreamServerEndpoint`, and braid's
/// datagram endpoints).
pub trait ServerEndpoint {
    /// Listens for streams with `factory`; fires with the port, or fails
    /// (`CannotListen`, naming the address).
    fn listen(&self, factory: SharedFactory<dyn Factory>) -> Deferred<ListeningPort>;

    /// Listens for datagrams with `protocol` (datagram endpoints only).
    fn listen_datagram(&self, protocol: SharedDatagram<dyn DatagramProtocol>) -> Deferred<DatagramTransport> {
        let _ = protocol;
        Deferred::fail(Failure::new(EndpointError(format!("{} is not a datagram endpoint", self.describe()))))
    }

    /// True for an endpoint that carries datagrams, not streams.
    fn is_datagram(&self) -> bool {
        false
    }

    /// The description, for log lines.
    fn describe(&self) -> String;
}

/// Where to connect (Twisted's `IStreamClientEndpoint`).
pub trait ClientEndpoint {
    /// Connects; `factory` builds the protocol. Fires with the
    /// connection's transport once `connection_made` has run, or fails with
    /// why (refused, timed out, the factory built nothing).
    fn connect(&self, factory: Box<dyn Factory>) -> Deferred<Transport>;

    /// The description, for log lines.
    fn describe(&self) -> String;
}

/// Connects `endpoint` to exactly `protocol` (Twisted's `connectProtocol`).
pub fn connect_protocol(
    endpoint: &dyn ClientEndpoint,
    protocol: impl Protocol + 'static,
) -> Deferred<Transport> {
    let mut once = Some(protocol);
    let factory = OneShot(Box::new(move || once.take().map(|p| Box::new(p) as Box<dyn Protocol>)));
    endpoint.connect(Box::new(factory))
}

type BuildOnce = Box<dyn FnMut() -> Option<Box<dyn Protocol>>>;

/// A factory that builds one protocol.
struct OneShot(BuildOnce);

impl Factory for OneShot {
    fn build_protocol(&mut self, _addr: &Address) -> Option<Box<dyn Protocol>> {
        (self.0)()
    }
}

/// Builds a server endpoint from its description.
pub type ServerParser = fn(&Reactor, &Description) -> Result<Box<dyn ServerEndpoint>, EndpointError>;
/// Builds a client endpoint from its description.
pub type ClientParser = fn(&Reactor, &Description) -> Result<Box<dyn ClientEndpoint>, EndpointError>;

/// The endpoint kinds a description may name. `Registry::default()` knows
/// the built-ins; add one with [`add_server`](Registry::add_server) or
/// [`add_client`](Registry::add_client).
pub struct Registry {
    servers: Vec<(String, ServerParser)>,
    clients: Vec<(String, ClientParser)>,
}

impl Default for Registry {
    fn default() -> Registry {
        let mut r = Registry { servers: Vec::new(), clients: Vec::new() };
        r.add_server("tcp", tcp_server);
        r.add_server("tcp6", tcp6_server);
        r.add_server("unix", unix_server);
        r.add_server("udp", udp_server);
        r.add_server("systemd", systemd_server);
        r.add_server("ssl", ssl_server);
        r.add_server("tls", tls_server);
        r.add_server("stdio", stdio_server);
        r.add_client("tcp", tcp_client);
        r.add_client("unix", unix_client);
        r.add_client("tls", tls_client);
        r.add_client("ssl", tls_client);
        r
    }
}

impl Registry {
    /// Adds (or replaces) a server kind; names are matched case-insensitively.
    pub fn add_server(&mut self, kind: &str, parser: ServerParser) {
        let kind = kind.to_ascii_lowercase();
        self.servers.retain(|(k, _)| *k != kind);
        self.servers.push((kind, parser));
    }

    /// Adds (or replaces) a client kind.
    pub fn add_client(&mut self, kind: &str, parser: ClientParser) {
        let kind = kind.to_ascii_lowercase();
        self.clients.retain(|(k, _)| *k != kind);
        self.clients.push((kind, parser));
    }

    /// A server endpoint for `desc`.
    pub fn server(&self, reactor: &Reactor, desc: &str) -> Result<Box<dyn ServerEndpoint>, EndpointError> {
        let d = parse(desc)?;
        let kind = d.kind.to_ascii_lowercase();
        let Some((_, parser)) = self.servers.iter().find(|(k, _)| *k == kind) else {
            let known: Vec<&str> = self.servers.iter().map(|(k, _)| k.as_str()).collect();
            return Err(EndpointError(format!(
                "unknown endpoint type '{}' (known: {})",
                d.kind,
                known.join(", ")
            )));
        };
        parser(reactor, &d)
    }

    /// A client endpoint for `desc`.
    pub fn client(&self, reactor: &Reactor, desc: &str) -> Result<Box<dyn ClientEndpoint>, EndpointError> {
        let d = parse(desc)?;
        let kind = d.kind.to_ascii_lowercase();
        let Some((_, parser)) = self.clients.iter().find(|(k, _)| *k == kind) else {
            let known: Vec<&str> = self.clients.iter().map(|(k, _)| k.as_str()).collect();
            return Err(EndpointError(format!(
                "unknown endpoint type '{}' (known: {})",
                d.kind,
                known.join(", ")
            )));
        };
        parser(reactor, &d)
    }
}

/// A server endpoint from a description, with the built-in kinds
/// (Twisted's `serverFromString`).
pub fn server_from_string(reactor: &Reactor, desc: &str) -> Result<Box<dyn ServerEndpoint>, EndpointError> {
    Registry::default().server(reactor, desc)
}

/// A client endpoint from a description, with the built-in kinds
/// (Twisted's `clientFromString`).
pub fn client_from_string(reactor: &Reactor, desc: &str) -> Result<Box<dyn ClientEndpoint>, EndpointError> {
    Registry::default().client(reactor, desc)
}

fn settled<T: 'static>(result: Result<T, Error>) -> Deferred<T> {
    match result {
        Ok(v) => Deferred::succeed(v),
        Err(e) => Deferred::fail(Failure::new(e)),
    }
}

fn port_of(d: &Description) -> Result<u16, EndpointError> {
    let text = d.arg_or(0, "port").ok_or_else(|| EndpointError(format!("{}: no port given", d.kind)))?;
    d.number(text, "port")
}

fn interface_of(d: &Description, default: IpAddr) -> Result<IpAddr, EndpointError> {
    match d.get("interface") {
        None | Some("") => Ok(default),
        Some(text) => text
            .parse()
            .map_err(|_| EndpointError(format!("{}: interface '{text}' is not an IP address", d.kind))),
    }
}

fn backlog_of(d: &Description) -> Result<u32, EndpointError> {
    d.get("backlog").map_or(Ok(crate::tcp::DEFAULT_BACKLOG), |b| d.number(b, "backlog"))
}

/// `tcp:` and `tcp6:` servers.
struct TcpServer {
    reactor: Reactor,
    addr: SocketAddr,
    backlog: u32,
    reuse_port: bool,
    desc: String,
}

impl ServerEndpoint for TcpServer {
    fn listen(&self, factory: SharedFactory<dyn Factory>) -> Deferred<ListeningPort> {
        settled(self.reactor.listen_tcp_sharing(self.addr, factory, self.backlog, self.reuse_port))
    }

    fn describe(&self) -> String {
        self.desc.clone()
    }
}

fn tcp_like(
    reactor: &Reactor,
    d: &Description,
    any: IpAddr,
) -> Result<Box<dyn ServerEndpoint>, EndpointError> {
    d.only(&["port", "interface", "backlog", "reusePort"])?;
    d.at_most(1)?;
    let addr = SocketAddr::new(interface_of(d, any)?, port_of(d)?);
    let desc = format!("{}:{}", d.kind, addr);
    let reuse_port = flag(d, "reusePort", false)?;
    Ok(Box::new(TcpServer { reactor: reactor.clone(), addr, backlog: backlog_of(d)?, reuse_port, desc }))
}

fn tcp_server(reactor: &Reactor, d: &Description) -> Result<Box<dyn ServerEndpoint>, EndpointError> {
    tcp_like(reactor, d, IpAddr::V4(Ipv4Addr::UNSPECIFIED))
}

fn tcp6_server(reactor: &Reactor, d: &Description) -> Result<Box<dyn ServerEndpoint>, EndpointError> {
    tcp_like(reactor, d, IpAddr::V6(Ipv6Addr::UNSPECIFIED))
}

/// `unix:` servers.
struct UnixServer {
    reactor: Reactor,
    path: PathBuf,
    mode: u32,
    backlog: u32,
    lockfile: bool,
}

impl ServerEndpoint for UnixServer {
    fn listen(&self, factory: SharedFactory<dyn Factory>) -> Deferred<ListeningPort> {
        settled(self.reactor.listen_unix(&self.path, factory, self.backlog, Some(self.mode), self.lockfile))
    }

    fn describe(&self) -> String {
        format!("unix:{}", self.path.display())
    }
}

fn flag(d: &Description, key: &str, default: bool) -> Result<bool, EndpointError> {
    match d.get(key) {
        None => Ok(default),
        Some("1") | Some("true") => Ok(true),
        Some("0") | Some("false") => Ok(false),
        Some(other) => Err(EndpointError(format!("{}: {key} '{other}' is not 0 or 1", d.kind))),
    }
}

fn unix_server(reactor: &Reactor, d: &Description) -> Result<Box<dyn ServerEndpoint>, EndpointError> {
    d.only(&["address", "mode", "backlog", "lockfile"])?;
    d.at_most(1)?;
    let path = d.arg_or(0, "address").ok_or_else(|| EndpointError("unix: no path given".into()))?;
    let mode = match d.get("mode") {
        None => 0o666,
        Some(m) => u32::from_str_radix(m, 8)
            .ok()
            .filter(|m| *m <= 0o7777)
            .ok_or_else(|| EndpointError(format!("unix: mode '{m}' is not an octal file mode")))?,
    };
    Ok(Box::new(UnixServer {
        reactor: reactor.clone(),
        path: PathBuf::from(path),
        mode,
        backlog: backlog_of(d)?,
        lockfile: flag(d, "lockfile", true)?,
    }))
}

/// `udp:` servers (braid's own kind).
struct UdpServer {
    reactor: Reactor,
    port: u16,
    interface: String,
    max_packet_size: usize,
}

impl ServerEndpoint for UdpServer {
    fn listen(&self, _factory: SharedFactory<dyn Factory>) -> Deferred<ListeningPort> {
        Deferred::fail(Failure::new(EndpointError(format!(
            "{} carries datagrams: give it a datagram protocol",
            self.describe()
        ))))
    }

    fn listen_datagram(&self, protocol: SharedDatagram<dyn DatagramProtocol>) -> Deferred<DatagramTransport> {
        settled(self.reactor.listen_udp(self.port, protocol, &self.interface, self.max_packet_size))
    }

    fn is_datagram(&self) -> bool {
        true
    }

    fn describe(&self) -> String {
        match self.interface.as_str() {
            "" => format!("udp:{}", self.port),
            i => format!("udp:{}:interface={i}", self.port),
        }
    }
}

fn udp_server(reactor: &Reactor, d: &Description) -> Result<Box<dyn ServerEndpoint>, EndpointError> {
    d.only(&["port", "interface", "maxPacketSize"])?;
    d.at_most(1)?;
    let interface = interface_of(d, IpAddr::V4(Ipv4Addr::UNSPECIFIED))?;
    let max = d
        .get("maxPacketSize")
        .map_or(Ok(crate::datagram::DEFAULT_MAX_PACKET_SIZE), |m| d.number(m, "maxPacketSize"))?;
    Ok(Box::new(UdpServer {
        reactor: reactor.clone(),
        port: port_of(d)?,
        interface: interface.to_string(),
        max_packet_size: max,
    }))
}

/// The sockets the service manager passed, taken from the environment at
/// first use; each `systemd:` endpoint takes its own. Process-wide, as
/// the descriptors themselves are.
static INHERITED: Mutex<Option<Vec<Passed>>> = Mutex::new(None);

/// One passed socket (`None` once an endpoint took it) and its name.
type Passed = (Option<OwnedFd>, String);

fn inherited_socket(
    index: Option<usize>,
    name: Option<&str>,
    domain: rustix::net::AddressFamily,
) -> Result<OwnedFd, String> {
    let mut all = INHERITED.lock().unwrap_or_else(|e| e.into_inner());
    if all.is_none() {
        let taken = crate::sys::listen_fds::take_named()?;
        *all = Some(taken.into_iter().map(|(fd, n)| (Some(fd), n)).collect());
    }
    let all = all.as_mut().expect("filled above");
    let slot = match (index, name) {
        (Some(i), _) => {
            let passed = all.len();
            all.get_mut(i).ok_or_else(|| format!("no socket {i} was passed ({passed} were)"))?
        }
        (None, Some(n)) => all
            .iter_mut()
            .find(|(_, name)| name == n)
            .ok_or_else(|| format!("no socket named '{n}' was passed"))?,
        (None, None) => return Err("give index= or name=".into()),
    };
    let fd = slot.0.as_ref().ok_or("that socket is in use by another endpoint already")?;
    // Checked before it is taken: a mismatch leaves it for the right endpoint.
    let family = rustix::net::getsockname(fd).map(|a| a.address_family()).map_err(|e| e.to_string())?;
    if family != domain {
        return Err(format!("the passed socket is of another domain ({family:?})"));
    }
    Ok(slot.0.take().expect("checked above"))
}

/// `systemd:` servers.
struct SystemdServer {
    reactor: Reactor,
    domain: rustix::net::AddressFamily,
    index: Option<usize>,
    name: Option<String>,
    desc: String,
}

impl SystemdServer {
    fn socket(&self) -> Result<OwnedFd, Error> {
        inherited_socket(self.index, self.name.as_deref(), self.domain).map_err(|why| {
            Error::io(self.desc.clone(), std::io::Error::new(std::io::ErrorKind::NotFound, why))
        })
    }
}

impl ServerEndpoint for SystemdServer {
    fn listen(&self, factory: SharedFactory<dyn Factory>) -> Deferred<ListeningPort> {
        settled(self.socket().and_then(|fd| self.reactor.adopt_stream_port(fd, factory)))
    }

    fn listen_datagram(&self, protocol: SharedDatagram<dyn DatagramProtocol>) -> Deferred<DatagramTransport> {
        let max = crate::datagram::DEFAULT_MAX_PACKET_SIZE;
        settled(self.socket().and_then(|fd| self.reactor.adopt_datagram_port(fd, self.domain, protocol, max)))
    }

    fn describe(&self) -> String {
        self.desc.clone()
    }
}

fn systemd_server(reactor: &Reactor, d: &Description) -> Result<Box<dyn ServerEndpoint>, EndpointError> {
    d.only(&["domain", "index", "name"])?;
    d.at_most(0)?;
    let domain = match d.get("domain") {
        Some("INET") => rustix::net::AddressFamily::INET,
        Some("INET6") => rustix::net::AddressFamily::INET6,
        Some("UNIX") => rustix::net::AddressFamily::UNIX,
        Some(other) => {
            return Err(EndpointError(format!("systemd: domain '{other}' is not INET, INET6 or UNIX")))
        }
        None => return Err(EndpointError("systemd: no domain given (INET, INET6 or UNIX)".into())),
    };
    let index = d.get("index").map(|i| d.number::<usize>(i, "index")).transpose()?;
    let name = d.get("name").map(str::to_owned);
    if index.is_some() == name.is_some() {
        return Err(EndpointError("systemd: give exactly one of index= and name=".into()));
    }
    let desc = format!(
        "systemd:domain={}:{}",
        d.get("domain").unwrap_or_default(),
        match (&index, &name) {
            (Some(i), _) => format!("index={i}"),
            (None, Some(n)) => format!("name={n}"),
            (None, None) => String::new(),
        }
    );
    Ok(Box::new(SystemdServer { reactor: reactor.clone(), domain, index, name, desc }))
}

/// Whether a `stdio:` endpoint has taken this process's standard I/O.
static STDIO_TAKEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// `stdio:` servers (Twisted's `StandardIOEndpoint`): one protocol on this
/// process's standard input and output, built for [`Address::Pipe`]; the
/// port's `stop_listening` closes it. Standard I/O can be taken once.
struct StdioServer {
    reactor: Reactor,
}

impl ServerEndpoint for StdioServer {
    fn listen(&self, factory: SharedFactory<dyn Factory>) -> Deferred<ListeningPort> {
        use std::sync::atomic::Ordering;
        if STDIO_TAKEN.swap(true, Ordering::SeqCst) {
            return Deferred::fail(Failure::new(EndpointError(
                "stdio: standard I/O is in use by another endpoint already".into(),
            )));
        }
        let port = crate::stdio::StdioFds::process()
            .and_then(|fds| factory.with(|f| crate::stdio::listen_stdio(&self.reactor, f, fds)));
        settled(port)
    }

    fn describe(&self) -> String {
        "stdio:".into()
    }
}

fn stdio_server(reactor: &Reactor, d: &Description) -> Result<Box<dyn ServerEndpoint>, EndpointError> {
    d.only(&[])?;
    // `stdio:` has one empty field.
    if let Some(extra) = d.args.iter().find(|a| !a.is_empty()) {
        return Err(EndpointError(format!("stdio: unexpected argument '{extra}' (stdio: takes none)")));
    }
    Ok(Box::new(StdioServer { reactor: reactor.clone() }))
}

/// Wraps a user's factory for a client endpoint: fires the Deferred with
/// the transport at `connection_made`, or fails it.
pub(super) struct Wrapping {
    pub(super) factory: Box<dyn Factory>,
    pub(super) done: Deferred<Transport>,
}

/// The user's protocol, and the Deferred to fire when it is made.
struct Notify {
    inner: Box<dyn Protocol>,
    done: Option<Deferred<Transport>>,
}

impl Protocol for Notify {
    fn connection_made(&mut self, transport: Transport) {
        self.inner.connection_made(transport.clone());
        if let Some(d) = self.done.take() {
            let _ = d.callback(transport);
        }
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

    fn as_fd_receiver(&mut self) -> Option<&mut dyn FileDescriptorReceiver> {
        self.inner.as_fd_receiver()
    }
    fn handshake_completed(&mut self) {
        self.inner.handshake_completed()
    }
}

impl Factory for Wrapping {
    fn build_protocol(&mut self, addr: &Address) -> Option<Box<dyn Protocol>> {
        match self.factory.build_protocol(addr) {
            Some(inner) => Some(Box::new(Notify { inner, done: Some(self.done.clone()) })),
            None => {
                let _ = self
                    .done
                    .errback(Failure::msg(format!("the factory built no protocol for {addr} (NoProtocol)")));
                None
            }
        }
    }

    fn start_factory(&mut self) {
        self.factory.start_factory()
    }

    fn stop_factory(&mut self) {
        self.factory.stop_factory()
    }
}

impl ClientFactory for Wrapping {
    fn client_connection_failed(&mut self, _connector: &dyn Connector, reason: Failure) {
        let _ = self.done.errback(reason);
    }
}

/// A Deferred whose cancellation stops the attempt (Twisted's
/// `ConnectingCancelledError`: the factory hears `Cancelled`, which fails
/// the Deferred), and the slot the attempt's connector goes in.
pub(super) fn cancellable() -> (Deferred<Transport>, Rc<RefCell<Option<StreamConnector>>>) {
    let slot: Rc<RefCell<Option<StreamConnector>>> = Rc::default();
    let s = slot.clone();
    let done = Deferred::with_canceller(move |_| {
        if let Some(c) = s.borrow_mut().take() {
            let _ = c.stop_connecting();
        }
    });
    (done, slot)
}

fn timeout_of(d: &Description) -> Result<Duration, EndpointError> {
    match d.get("timeout") {
        None => Ok(crate::tcp::DEFAULT_CONNECT_TIMEOUT),
        Some(t) => {
            let secs: f64 = d.number(t, "timeout")?;
            Duration::try_from_secs_f64(secs)
                .map_err(|_| EndpointError(format!("{}: timeout '{t}' is not a length of time", d.kind)))
        }
    }
}

fn tcp_client(reactor: &Reactor, d: &Description) -> Result<Box<dyn ClientEndpoint>, EndpointError> {
    Ok(Box::new(tcp_client_parts(reactor, d)?))
}

fn tcp_client_parts(reactor: &Reactor, d: &Description) -> Result<HostnameEndpoint, EndpointError> {
    d.only(&["host", "port", "timeout", "bindAddress"])?;
    d.at_most(2)?;
    let host = d.arg_or(0, "host").ok_or_else(|| EndpointError("tcp: no host given".into()))?;
    let port_text = if d.get("host").is_some() { d.arg_or(0, "port") } else { d.arg_or(1, "port") };
    let port_text = port_text.ok_or_else(|| EndpointError("tcp: no port given".into()))?;
    let port = d.number(port_text, "port")?;
    let bind = match d.get("bindAddress") {
        None => None,
        Some(b) => Some(SocketAddr::new(
            b.parse().map_err(|_| EndpointError(format!("tcp: bindAddress '{b}' is not an IP address")))?,
            0,
        )),
    };
    Ok(HostnameEndpoint::new(reactor, host, port).with_timeout(timeout_of(d)?).with_bind_address(bind))
}

/// `unix:` clients.
struct UnixClient {
    reactor: Reactor,
    path: PathBuf,
    timeout: Duration,
    lockfile: bool,
}

impl ClientEndpoint for UnixClient {
    fn connect(&self, factory: Box<dyn Factory>) -> Deferred<Transport> {
        let (done, slot) = cancellable();
        let wrapping = Wrapping { factory, done: done.clone() };
        *slot.borrow_mut() =
            Some(self.reactor.connect_unix(&self.path, wrapping, Some(self.timeout), self.lockfile));
        done
    }

    fn describe(&self) -> String {
        format!("unix:{}", self.path.display())
    }
}

fn unix_client(reactor: &Reactor, d: &Description) -> Result<Box<dyn ClientEndpoint>, EndpointError> {
    d.only(&["path", "timeout", "lockfile"])?;
    d.at_most(1)?;
    let path = d.arg_or(0, "path").ok_or_else(|| EndpointError("unix: no path given".into()))?;
    Ok(Box::new(UnixClient {
        reactor: reactor.clone(),
        path: PathBuf::from(path),
        timeout: timeout_of(d)?,
        lockfile: flag(d, "lockfile", false)?,
    }))
}

/// `ssl:` servers: TCP with every protocol wrapped in TLS.
struct SslServer {
    tcp: TcpServer,
    config: crate::tls::ServerConfig,
}

impl ServerEndpoint for SslServer {
    fn listen(&self, factory: SharedFactory<dyn Factory>) -> Deferred<ListeningPort> {
        let tls = crate::tls::TlsFactory::new(&self.tcp.reactor, factory, self.config.clone());
        settled(self.tcp.reactor.listen_tcp(self.tcp.addr, tls, self.tcp.backlog))
    }

    fn describe(&self) -> String {
        format!("ssl:{}", self.tcp.addr)
    }
}

fn ssl_server(reactor: &Reactor, d: &Description) -> Result<Box<dyn ServerEndpoint>, EndpointError> {
    d.only(&["port", "interface", "backlog", "privateKey", "certKey", "extraCertChain"])?;
    d.at_most(1)?;
    let key = d.get("privateKey").ok_or_else(|| EndpointError("ssl: no privateKey given".into()))?;
    let cert = d.get("certKey").unwrap_or(key);
    // The chain: the certificate file, then any extra chain (intermediates).
    let mut chain = std::fs::read(cert).map_err(|e| EndpointError(format!("ssl: certKey '{cert}': {e}")))?;
    if let Some(extra) = d.get("extraCertChain") {
        let more =
            std::fs::read(extra).map_err(|e| EndpointError(format!("ssl: extraCertChain '{extra}': {e}")))?;
        if !chain.ends_with(b"\n") {
            chain.push(b'\n');
        }
        chain.extend_from_slice(&more);
    }
    let key_pem = std::fs::read(key).map_err(|e| EndpointError(format!("ssl: privateKey '{key}': {e}")))?;
    let identity =
        crate::tls::Identity::from_pem(&chain, &key_pem).map_err(|e| EndpointError(format!("ssl: {e}")))?;
    let config = crate::tls::ServerConfig::builder(identity)
        .build()
        .map_err(|e| EndpointError(format!("ssl: {e}")))?;
    let addr = SocketAddr::new(interface_of(d, IpAddr::V4(Ipv4Addr::UNSPECIFIED))?, port_of(d)?);
    let tcp = TcpServer {
        reactor: reactor.clone(),
        addr,
        backlog: backlog_of(d)?,
        reuse_port: false,
        desc: String::new(),
    };
    Ok(Box::new(SslServer { tcp, config }))
}

/// `tls:` clients.
struct TlsClient {
    tcp: HostnameEndpoint,
    config: crate::tls::ClientConfig,
}

impl ClientEndpoint for TlsClient {
    fn connect(&self, factory: Box<dyn Factory>) -> Deferred<Transport> {
        let (done, slot) = cancellable();
        let wrapping = Wrapping { factory, done: done.clone() };
        // The certificate is checked against the name's ASCII form: the
        // form certificates carry.
        let dialled = self.tcp.host().ascii().and_then(|name| {
            let tls =
                crate::tls::TlsClientFactory::new(self.tcp.reactor(), wrapping, self.config.clone(), &name)?;
            self.tcp.dial(tls)
        });
        match dialled {
            Ok(connector) => *slot.borrow_mut() = Some(connector),
            Err(e) => {
                let _ = done.errback(Failure::new(e));
            }
        }
        done
    }

    fn describe(&self) -> String {
        format!("tls:{}", self.tcp)
    }
}

fn tls_client(reactor: &Reactor, d: &Description) -> Result<Box<dyn ClientEndpoint>, EndpointError> {
    d.only(&["host", "port", "timeout", "bindAddress", "trustRoots"])?;
    let plain = Description {
        kind: d.kind.clone(),
        args: d.args.clone(),
        kwargs: d.kwargs.iter().filter(|(k, _)| k != "trustRoots").cloned().collect(),
    };
    let tcp = tcp_client_parts(reactor, &plain)?;
    let roots = match d.get("trustRoots") {
        Some(path) => crate::tls::Roots::from_pem_file(path)
            .map_err(|e| EndpointError(format!("{}: trustRoots: {e}", d.kind)))?,
        None => crate::tls::Roots::system()
            .map_err(|e| EndpointError(format!("{}: the system's roots: {e}", d.kind)))?,
    };
    let config =
        crate::tls::ClientConfig::new(roots).map_err(|e| EndpointError(format!("{}: {e}", d.kind)))?;
    Ok(Box::new(TlsClient { tcp, config }))
}

/// `tls:` servers: TLS over TCP with a certificate per server name, read
/// from a directory of `NAME.pem` files (chain and key in one file).
fn tls_server(reactor: &Reactor, d: &Description) -> Result<Box<dyn ServerEndpoint>, EndpointError> {
    d.only(&["path", "port", "interface", "backlog"])?;
    d.at_most(1)?;
    let dir =
        d.arg_or(0, "path").ok_or_else(|| EndpointError("tls: no certificate directory given".into()))?;
    let config = sni::SniDirectory::load(dir)?.server_config()?;
    let port = match d.get("port") {
        None => 443,
        Some(p) => d.number(p, "port")?,
    };
    let addr = SocketAddr::new(interface_of(d, IpAddr::V6(Ipv6Addr::UNSPECIFIED))?, port);
    let tcp = TcpServer {
        reactor: reactor.clone(),
        addr,
        backlog: backlog_of(d)?,
        reuse_port: false,
        desc: String::new(),
    };
    Ok(Box::new(SslServer { tcp, config }))
}
