//! TCP: `listen_tcp` and `connect_tcp`, as methods on the reactor.
//!
//! The accept loop is the shared one (`stream::listener`), the connection
//! the shared stream connection with the TCP kind (`stream::kind::Tcp`);
//! outgoing attempts are in `connector`.
//!
//! Where Twisted's TCP tests check something braid does differently:
//! - Log context (connectionmixins' `test_logPrefix`): the reactor's own
//!   log lines about a connection name it ("TCP connection with PEER", "TCP
//!   port ADDR"), but there is no per-connection tracing span, so a line a
//!   protocol logs itself carries no prefix unless it adds one.
//! - The port's start-up line (`test_startedListeningLogMessage`) names the
//!   address and the kind, not the factory: factories have no name.
//! - A transport's text form (`test_serverAddressTCP4/6`) shows its host,
//!   peer and state, not a protocol class and session number: braid keeps
//!   neither.
//! - The spare descriptor for EMFILE (`FileDescriptorReservationTests`) is
//!   a private, process-wide reserve opened once; a failure to open it is
//!   not logged (the listener then backs off instead), so the sub-cases
//!   about logging its errors have nothing to observe.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use rustix::net::{AddressFamily, SocketFlags, SocketType};

use crate::error::Error;
use crate::protocol::{ClientFactory, IntoFactory};
use crate::reactor::Reactor;

pub use crate::stream::listener::ListeningPort;

use crate::stream::kind::Tcp;
use crate::stream::listener::{Listen, Port};
use crate::stream::{Address, StreamConnector};

/// Twisted's default listen backlog.
pub const DEFAULT_BACKLOG: u32 = 50;

/// Twisted's default connect timeout.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Where to listen: a port number (all IPv4 interfaces), a socket address,
/// or text such as `"127.0.0.1:8000"` or `"[::1]:0"`.
pub trait ToListenAddr {
    /// The address, or an error naming what could not be parsed.
    fn to_listen_addr(&self) -> Result<SocketAddr, Error>;
}

impl ToListenAddr for u16 {
    fn to_listen_addr(&self) -> Result<SocketAddr, Error> {
        Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), *self))
    }
}

impl ToListenAddr for SocketAddr {
    fn to_listen_addr(&self) -> Result<SocketAddr, Error> {
        Ok(*self)
    }
}

impl ToListenAddr for (IpAddr, u16) {
    fn to_listen_addr(&self) -> Result<SocketAddr, Error> {
        Ok(SocketAddr::new(self.0, self.1))
    }
}

impl ToListenAddr for &str {
    fn to_listen_addr(&self) -> Result<SocketAddr, Error> {
        self.parse().map_err(|_| Error::CannotListen {
            addr: self.to_string(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not an IP address and port"),
        })
    }
}

/// How a TCP listener turns an accepted socket into a connection.
pub(crate) struct TcpListen;

impl Listen for TcpListen {
    type Conn = Tcp;
    const NAME: &'static str = "TCP";

    fn accepted(&self, peer: &Address) -> Option<Tcp> {
        peer.ip().map(|peer| Tcp { peer })
    }
}

fn cannot_listen(addr: SocketAddr, e: rustix::io::Errno) -> Error {
    Error::CannotListen { addr: addr.to_string(), source: e.into() }
}

impl Reactor {
    /// Listens for TCP connections on `addr` and builds a protocol with
    /// `factory` for each one. `SO_REUSEADDR` is set, as Twisted does.
    /// Bind or listen failures are `CannotListen`, naming the address.
    pub fn listen_tcp(
        &self,
        addr: impl ToListenAddr,
        factory: impl IntoFactory,
        backlog: u32,
    ) -> Result<ListeningPort, Error> {
        self.listen_tcp_sharing(addr, factory, backlog, false)
    }

    /// Like [`listen_tcp`](Reactor::listen_tcp); with `reuse_port`, also
    /// `SO_REUSEPORT`, so several sockets (one per worker thread, each on
    /// its own reactor) can listen on the same address and the kernel
    /// spreads the connections between them.
    pub fn listen_tcp_sharing(
        &self,
        addr: impl ToListenAddr,
        factory: impl IntoFactory,
        backlog: u32,
        reuse_port: bool,
    ) -> Result<ListeningPort, Error> {
        let addr = addr.to_listen_addr()?;
        let family = if addr.is_ipv4() { AddressFamily::INET } else { AddressFamily::INET6 };
        let sock = rustix::net::socket_with(
            family,
            SocketType::STREAM,
            SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
            None,
        )
        .map_err(|e| cannot_listen(addr, e))?;
        rustix::net::sockopt::set_socket_reuseaddr(&sock, true).map_err(|e| cannot_listen(addr, e))?;
        if reuse_port {
            rustix::net::sockopt::set_socket_reuseport(&sock, true).map_err(|e| cannot_listen(addr, e))?;
        }
        rustix::net::bind(&sock, &addr).map_err(|e| cannot_listen(addr, e))?;
        rustix::net::listen(&sock, backlog.min(i32::MAX as u32) as i32)
            .map_err(|e| cannot_listen(addr, e))?;
        let local =
            rustix::net::getsockname(&sock).ok().and_then(|a| SocketAddr::try_from(a).ok()).unwrap_or(addr);
        let port = Port::start(self, TcpListen, sock, Address::Ip(local), factory.into_shared())?;
        Ok(ListeningPort::new(port))
    }

    /// Connects to `host:port` (an IP literal, or a name resolved on the
    /// thread pool) and reports the outcome to `factory`. Returns at once;
    /// nothing is called back before the next iteration. `timeout` bounds
    /// the attempt (`None`: no limit beyond the kernel's); `bind` sets the
    /// local address.
    pub fn connect_tcp(
        &self,
        host: &str,
        port: u16,
        factory: impl ClientFactory + 'static,
        timeout: Option<Duration>,
        bind: Option<SocketAddr>,
    ) -> StreamConnector {
        let connector = StreamConnector::new(self, host, port, Box::new(factory), None, timeout, bind);
        // A fresh connector is disconnected, so this cannot be refused.
        let _ = connector.connect();
        connector
    }
}
