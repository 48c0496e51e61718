//! Socket adoption (Twisted's `IReactorSocket`): a listening or connected
//! stream socket made elsewhere (inherited, passed over a UNIX socket,
//! handed over by systemd, or a std `TcpListener`/`UnixStream`) becomes a
//! braid port or connection. The reactor takes ownership of the descriptor,
//! makes it non-blocking, and reads the address family off the socket, so
//! TCP and UNIX sockets are adopted by the same calls.

use std::os::fd::OwnedFd;

use super::connection::Connection;
use super::listener::{ListeningPort, Port};
use super::Address;
use crate::error::Error;
use crate::protocol::{Factory, IntoFactory};
use crate::reactor::Reactor;
use crate::stream::kind::Tcp;
use crate::tcp::TcpListen;
use crate::unix::{Unix, UnixListen};

fn adopt_error(what: &str, source: std::io::Error) -> Error {
    Error::io(format!("adopting {what}"), source)
}

/// Checks that `fd` is a stream socket, listening or not as asked, makes
/// it non-blocking, and returns its local address.
fn prepare(fd: &OwnedFd, listening: bool, what: &str) -> Result<Address, Error> {
    use rustix::net::sockopt;
    let kind = sockopt::socket_type(fd).map_err(|e| adopt_error(what, e.into()))?;
    if kind != rustix::net::SocketType::STREAM {
        return Err(adopt_error(
            what,
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a stream socket"),
        ));
    }
    let accepting = sockopt::socket_acceptconn(fd).map_err(|e| adopt_error(what, e.into()))?;
    if accepting != listening {
        let why = if listening { "the socket is not listening" } else { "the socket is a listener" };
        return Err(adopt_error(what, std::io::Error::new(std::io::ErrorKind::InvalidInput, why)));
    }
    rustix::io::ioctl_fionbio(fd, true).map_err(|e| adopt_error(what, e.into()))?;
    let local = rustix::net::getsockname(fd).map_err(|e| adopt_error(what, e.into()))?;
    Address::from_sockaddr(&local).map_err(|e| adopt_error(what, e.into()))
}

impl Reactor {
    /// Serves connections on a listening TCP or UNIX stream socket made
    /// elsewhere (Twisted's `adoptStreamPort`): `factory` builds a protocol
    /// for each. The reactor owns the socket from now on. An adopted UNIX
    /// socket's file is left alone when the port stops: whoever bound it
    /// owns it.
    pub fn adopt_stream_port(
        &self,
        socket: impl Into<OwnedFd>,
        factory: impl IntoFactory,
    ) -> Result<ListeningPort, Error> {
        let fd = socket.into();
        let local = prepare(&fd, true, "a listening socket")?;
        let factory = factory.into_shared();
        Ok(match local {
            Address::Unix(_) => ListeningPort::new(Port::start(
                self,
                UnixListen { path: None, lock: None },
                fd,
                local,
                factory,
            )?),
            _ => ListeningPort::new(Port::start(self, TcpListen, fd, local, factory)?),
        })
    }

    /// Runs a protocol from `factory` on a connected TCP or UNIX stream
    /// socket made elsewhere (Twisted's `adoptStreamConnection`): it gets
    /// `connection_made` on the next iteration's terms, like an accepted
    /// connection. The reactor owns the socket from now on; a factory that
    /// refuses (returns `None`) closes it.
    pub fn adopt_stream_connection(
        &self,
        socket: impl Into<OwnedFd>,
        mut factory: impl Factory,
    ) -> Result<(), Error> {
        let fd = socket.into();
        prepare(&fd, false, "a connected socket")?;
        let peer = rustix::net::getpeername(&fd)
            .map_err(|e| adopt_error("a connected socket", e.into()))?
            .map(|a| Address::from_sockaddr(&a))
            .transpose()
            .map_err(|e| adopt_error("a connected socket", e.into()))?
            .unwrap_or_else(Address::unix_unnamed);
        let Some(protocol) = factory.build_protocol(&peer) else { return Ok(()) };
        let started = match peer {
            Address::Unix(peer) => Connection::new(self, Unix::new(peer), fd).start(protocol),
            Address::Ip(peer) => Connection::new(self, Tcp { peer }, fd).start(protocol),
            // A kernel-reported peer is never a name.
            Address::Hostname { .. } | Address::Process { .. } | Address::Pipe => {
                return Err(adopt_error("a connected socket", std::io::Error::other("no peer address")))
            }
        };
        started.map_err(|(e, _never_made)| e)
    }
}

/// The listening sockets a service manager passed to this process at
/// start-up (systemd socket activation: `LISTEN_PID` names this process,
/// `LISTEN_FDS` counts the descriptors from 3 on), ready for
/// [`Reactor::adopt_stream_port`]. They can be taken once: the variables
/// are removed, so a second call, or a child process, finds none. Empty
/// when the process was not socket-activated.
pub fn systemd_sockets() -> Result<Vec<OwnedFd>, Error> {
    crate::sys::listen_fds::take().map_err(|why| {
        adopt_error("systemd's sockets", std::io::Error::new(std::io::ErrorKind::InvalidInput, why))
    })
}
