//! UNIX datagram sockets (Twisted's `listenUNIXDatagram` and
//! `connectUNIXDatagram`): the shared datagram port with a kind that
//! sends only to UNIX addresses and removes its socket file at close.
//!
//! Names are paths, or abstract names written with a leading `@` (Linux),
//! as for [`Reactor::listen_unix`].

use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use rustix::net::{sockopt, AddressFamily, SocketAddrAny, SocketFlags, SocketType};

use crate::datagram::port::{DatagramKind, DatagramPort};
use crate::datagram::{DatagramProtocol, DatagramTransport, IntoDatagramProtocol, SharedDatagram};
use crate::error::Error;
use crate::reactor::Reactor;
use crate::stream::Address;
use crate::unix::{cannot_listen, socket_file_is_live};

/// Bytes of a UNIX datagram's send budget the kernel keeps for itself.
const SNDBUF_OVERHEAD: usize = 32;

/// The UNIX datagram kind.
pub(crate) struct UnixDatagram {
    /// The socket file to remove on close (`None`: abstract, unnamed, or
    /// adopted).
    path: Option<PathBuf>,
    /// The largest datagram the socket's send buffer admits.
    max_payload: usize,
}

impl UnixDatagram {
    fn new(sock: &OwnedFd, path: Option<PathBuf>) -> UnixDatagram {
        let sndbuf = sockopt::socket_send_buffer_size(sock).unwrap_or(usize::MAX);
        UnixDatagram { path, max_payload: sndbuf.saturating_sub(SNDBUF_OVERHEAD) }
    }
}

impl DatagramKind for UnixDatagram {
    const NAME: &'static str = "UNIX datagram";

    fn destination(&self, to: &Address) -> Result<SocketAddrAny, Error> {
        match to.as_unix() {
            Some(u) if !u.is_unnamed() => Ok(SocketAddrAny::from(u.to_rustix())),
            Some(_) => Err(Error::InvalidAddress("cannot send to an unnamed UNIX socket".into())),
            None => Err(Error::InvalidAddress(format!("{to} is not a UNIX socket address"))),
        }
    }

    fn max_payload(&self) -> usize {
        self.max_payload
    }

    fn unknown_peer(&self) -> Address {
        Address::unix_unnamed()
    }

    fn closed(&self) {
        if let Some(path) = &self.path {
            if let Err(e) = std::fs::remove_file(path) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(target: "braid", "could not remove {}: {e}", path.display());
                }
            }
        }
    }
}

/// Binds a new UNIX datagram socket to `name` (with `mode` on its file),
/// clearing a stale socket file first. Returns the socket, its address and
/// the file to remove at close.
fn bind(name: &Path, mode: Option<u32>) -> Result<(OwnedFd, Address, Option<PathBuf>), Error> {
    let addr = Address::unix(name.as_os_str()).map_err(|e| cannot_listen(name, e.into()))?;
    let path = addr.unix_path().map(Path::to_path_buf);
    if let Some(p) = &path {
        if std::fs::symlink_metadata(p).is_ok() {
            if socket_file_is_live(p, &addr, SocketType::DGRAM) {
                let e = io::Error::new(io::ErrorKind::AddrInUse, "another socket is bound there");
                return Err(cannot_listen(name, e));
            }
            let _ = std::fs::remove_file(p);
        }
    }
    let sock = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::DGRAM,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )
    .map_err(|e| cannot_listen(name, e.into()))?;
    let sockaddr = addr.to_sockaddr().ok_or_else(|| {
        cannot_listen(name, io::Error::new(io::ErrorKind::InvalidInput, "not a UNIX socket name"))
    })?;
    rustix::net::bind(&sock, &sockaddr).map_err(|e| cannot_listen(name, e.into()))?;
    if let (Some(mode), Some(p)) = (mode, &path) {
        use std::os::unix::fs::PermissionsExt;
        if let Err(e) = std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)) {
            let _ = std::fs::remove_file(p);
            return Err(cannot_listen(name, e));
        }
    }
    Ok((sock, addr, path))
}

impl Reactor {
    /// Receives datagrams on the UNIX datagram socket `name` (a path, or
    /// `@name` for an abstract one) and hands each to `protocol`. `mode`
    /// sets the socket file's permission bits. A stale socket file is
    /// replaced; one another socket is bound to is `CannotListen`. The file
    /// is removed when the port closes.
    pub fn listen_unix_datagram(
        &self,
        name: impl AsRef<Path>,
        protocol: impl IntoDatagramProtocol,
        max_packet_size: usize,
        mode: Option<u32>,
    ) -> Result<DatagramTransport, Error> {
        let (sock, addr, path) = bind(name.as_ref(), mode)?;
        let kind = UnixDatagram::new(&sock, path);
        let port =
            DatagramPort::start(self, kind, sock, addr, max_packet_size, protocol.into_shared(), None)?;
        Ok(port.transport())
    }

    /// A UNIX datagram socket connected to `name` (Twisted's
    /// `connectUNIXDatagram`): writes need no address, and only `name`'s
    /// datagrams are received. To get answers the socket needs a name of
    /// its own: `bind_address` (with `mode`), otherwise it stays unnamed.
    /// Nothing listening at `name` is an error now, not later.
    pub fn connect_unix_datagram(
        &self,
        name: impl AsRef<Path>,
        protocol: impl IntoDatagramProtocol,
        max_packet_size: usize,
        mode: Option<u32>,
        bind_address: Option<&Path>,
    ) -> Result<DatagramTransport, Error> {
        let name = name.as_ref();
        let target = Address::unix(name.as_os_str()).map_err(|e| cannot_connect(name, e.into()))?;
        let (sock, local, path) = match bind_address {
            Some(b) => bind(b, mode)?,
            None => {
                let sock = rustix::net::socket_with(
                    AddressFamily::UNIX,
                    SocketType::DGRAM,
                    SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
                    None,
                )
                .map_err(|e| cannot_connect(name, e.into()))?;
                (sock, Address::unix_unnamed(), None)
            }
        };
        let kind = UnixDatagram::new(&sock, path);
        let connected = kind
            .destination(&target)
            .and_then(|to| rustix::net::connect(&sock, &to).map_err(|e| cannot_connect(name, e.into())));
        if let Err(e) = connected {
            kind.closed();
            return Err(e);
        }
        let local = rustix::net::getsockname(&sock)
            .ok()
            .and_then(|a| Address::from_sockaddr(&a).ok())
            .unwrap_or(local);
        let port = DatagramPort::start(
            self,
            kind,
            sock,
            local,
            max_packet_size,
            protocol.into_shared(),
            Some(target),
        )?;
        Ok(port.transport())
    }
}

fn cannot_connect(name: &Path, source: io::Error) -> Error {
    Error::io(format!("connecting to unix datagram socket {}", name.display()), source)
}

/// `adopt_datagram_port` for a UNIX datagram socket.
pub(crate) fn adopt(
    reactor: &Reactor,
    fd: OwnedFd,
    local: Address,
    max_packet_size: usize,
    protocol: SharedDatagram<dyn DatagramProtocol>,
    peer: Option<Address>,
) -> Result<DatagramTransport, Error> {
    let kind = UnixDatagram::new(&fd, None);
    let port = DatagramPort::start(reactor, kind, fd, local, max_packet_size, protocol, peer)?;
    Ok(port.transport())
}
