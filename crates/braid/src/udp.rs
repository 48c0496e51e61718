//! UDP (Twisted's `IReactorUDP` and `IReactorMulticast`): `listen_udp`,
//! `listen_multicast` and `adopt_datagram_port` as methods on the reactor,
//! and the multicast side of a UDP port ([`Multicast`]).
//!
//! The port itself is the shared datagram port (`datagram::port`) with the
//! UDP kind below, which only checks addresses: a UDP socket is IPv4 or
//! IPv6, and a destination must be an IP literal of the same family.
//!
//! Interfaces for multicast are given as text: `""` for the system's
//! choice, an IPv4 address (IPv4 groups, as in Twisted), or an interface
//! name or index (`"eth0"`, `"2"`; both families).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::OwnedFd;
use std::rc::Rc;

use rustix::net::{sockopt, AddressFamily, SocketAddrAny, SocketFlags, SocketType};

use crate::datagram::port::{DatagramKind, DatagramPort};
use crate::datagram::{DatagramTransport, IntoDatagramProtocol};
use crate::defer::Deferred;
use crate::error::{Error, Failure};
use crate::reactor::Reactor;
use crate::stream::Address;

pub use crate::datagram::{DatagramProtocol, SharedDatagram, DEFAULT_MAX_PACKET_SIZE, DEFAULT_SEND_QUEUE};

/// The largest UDP payload over IPv4 (65,535 less the IP and UDP headers).
const MAX_PAYLOAD_V4: usize = 65_507;
/// The largest UDP payload over IPv6 without jumbograms.
const MAX_PAYLOAD_V6: usize = 65_527;

/// The UDP datagram kind: which family the socket is.
pub(crate) struct Udp {
    v6: bool,
}

impl DatagramKind for Udp {
    const NAME: &'static str = "UDP";

    fn destination(&self, to: &Address) -> Result<SocketAddrAny, Error> {
        match to {
            Address::Ip(a) if a.is_ipv6() == self.v6 => Ok(SocketAddrAny::from(*a)),
            Address::Ip(a) => {
                let (want, got) = if self.v6 { ("IPv6", "IPv4") } else { ("IPv4", "IPv6") };
                Err(Error::InvalidAddress(format!("{a} is {got}; this port is {want}")))
            }
            Address::Hostname { host, .. } => Err(Error::InvalidAddress(format!(
                "{host:?} is a host name, not an IP address: resolve it first"
            ))),
            other => Err(Error::InvalidAddress(format!("{other} is not an IP address"))),
        }
    }

    fn max_payload(&self) -> usize {
        if self.v6 {
            MAX_PAYLOAD_V6
        } else {
            MAX_PAYLOAD_V4
        }
    }

    fn unknown_peer(&self) -> Address {
        let ip = if self.v6 { IpAddr::V6(Ipv6Addr::UNSPECIFIED) } else { IpAddr::V4(Ipv4Addr::UNSPECIFIED) };
        Address::Ip(SocketAddr::new(ip, 0))
    }

    fn multicast(port: &Rc<DatagramPort<Self>>) -> Option<Multicast> {
        Some(Multicast { port: port.clone() })
    }
}

/// Parses `interface` as Twisted does for `listenUDP`: empty for all IPv4
/// interfaces, otherwise an IP literal.
fn bind_address(port: u16, interface: &str) -> Result<SocketAddr, Error> {
    if interface.is_empty() {
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port));
    }
    let ip: IpAddr = interface
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .map_err(|_| Error::InvalidAddress(format!("interface {interface:?} is not an IP address")))?;
    Ok(SocketAddr::new(ip, port))
}

fn cannot_listen(addr: SocketAddr, e: impl Into<std::io::Error>) -> Error {
    Error::CannotListen { addr: format!("udp:{addr}"), source: e.into() }
}

/// Opens and binds a UDP socket; `reuse` sets `SO_REUSEADDR`,
/// `reuse_port` `SO_REUSEPORT`.
fn bind_udp(addr: SocketAddr, reuse: bool, reuse_port: bool) -> Result<(OwnedFd, SocketAddr), Error> {
    let family = if addr.is_ipv4() { AddressFamily::INET } else { AddressFamily::INET6 };
    let sock = rustix::net::socket_with(
        family,
        SocketType::DGRAM,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )
    .map_err(|e| cannot_listen(addr, e))?;
    if reuse {
        sockopt::set_socket_reuseaddr(&sock, true).map_err(|e| cannot_listen(addr, e))?;
    }
    if reuse_port {
        sockopt::set_socket_reuseport(&sock, true).map_err(|e| cannot_listen(addr, e))?;
    }
    rustix::net::bind(&sock, &addr).map_err(|e| cannot_listen(addr, e))?;
    let local =
        rustix::net::getsockname(&sock).ok().and_then(|a| SocketAddr::try_from(a).ok()).unwrap_or(addr);
    Ok((sock, local))
}

impl Reactor {
    /// Listens for UDP datagrams on `port` of `interface` (`""`: every
    /// IPv4 interface; an IPv6 literal such as `"::"` or `"::1"` for IPv6)
    /// and hands each to `protocol`. Datagrams longer than
    /// `max_packet_size` ([`DEFAULT_MAX_PACKET_SIZE`] is Twisted's) go to
    /// `datagram_truncated`. The returned transport is also the port:
    /// `stop_listening` closes it. A non-IP interface is `InvalidAddress`;
    /// a bind failure `CannotListen`.
    pub fn listen_udp(
        &self,
        port: u16,
        protocol: impl IntoDatagramProtocol,
        interface: &str,
        max_packet_size: usize,
    ) -> Result<DatagramTransport, Error> {
        let addr = bind_address(port, interface)?;
        let (sock, local) = bind_udp(addr, false, false)?;
        self.start_udp(sock, local, protocol, max_packet_size)
    }

    /// Like [`listen_udp`](Reactor::listen_udp), for a port that joins
    /// multicast groups (Twisted's `listenMulticast`). With
    /// `listen_multiple`, `SO_REUSEADDR` and `SO_REUSEPORT` are set, so
    /// several sockets (in this process or others, all asking for it) can
    /// bind the same port and each receives the group's datagrams. Join
    /// groups with `transport.multicast()`.
    pub fn listen_multicast(
        &self,
        port: u16,
        protocol: impl IntoDatagramProtocol,
        interface: &str,
        listen_multiple: bool,
    ) -> Result<DatagramTransport, Error> {
        let addr = bind_address(port, interface)?;
        let (sock, local) = bind_udp(addr, listen_multiple, listen_multiple)?;
        self.start_udp(sock, local, protocol, DEFAULT_MAX_PACKET_SIZE)
    }

    fn start_udp(
        &self,
        sock: OwnedFd,
        local: SocketAddr,
        protocol: impl IntoDatagramProtocol,
        max_packet_size: usize,
    ) -> Result<DatagramTransport, Error> {
        let kind = Udp { v6: local.is_ipv6() };
        let port = DatagramPort::start(
            self,
            kind,
            sock,
            Address::Ip(local),
            max_packet_size,
            protocol.into_shared(),
            None,
        )?;
        Ok(port.transport())
    }

    /// Serves a datagram socket made elsewhere (Twisted's
    /// `adoptDatagramPort`): a bound UDP socket of `family` (INET or
    /// INET6), or a UNIX datagram socket (UNIX). The reactor owns the
    /// socket from now on and makes it non-blocking. A socket of another
    /// type or family than stated is refused with a clear error. An adopted
    /// UNIX socket's file is left alone at close: whoever bound it owns it.
    pub fn adopt_datagram_port(
        &self,
        socket: impl Into<OwnedFd>,
        family: AddressFamily,
        protocol: impl IntoDatagramProtocol,
        max_packet_size: usize,
    ) -> Result<DatagramTransport, Error> {
        let fd = socket.into();
        let what = "adopting a datagram socket";
        let invalid =
            |why: String| Error::io(what, std::io::Error::new(std::io::ErrorKind::InvalidInput, why));
        let kind = sockopt::socket_type(&fd).map_err(|e| Error::io(what, e.into()))?;
        if kind != SocketType::DGRAM {
            return Err(invalid("not a datagram socket".into()));
        }
        let local = rustix::net::getsockname(&fd).map_err(|e| Error::io(what, e.into()))?;
        if local.address_family() != family {
            return Err(invalid(format!(
                "the socket's family is {:?}, not {family:?}",
                local.address_family()
            )));
        }
        rustix::io::ioctl_fionbio(&fd, true).map_err(|e| Error::io(what, e.into()))?;
        let local = Address::from_sockaddr(&local).map_err(|e| Error::io(what, e.into()))?;
        let peer = rustix::net::getpeername(&fd).ok().flatten().and_then(|a| Address::from_sockaddr(&a).ok());
        let protocol = protocol.into_shared();
        match local {
            Address::Ip(ip) => {
                let kind = Udp { v6: ip.is_ipv6() };
                let port = DatagramPort::start(self, kind, fd, local, max_packet_size, protocol, peer)?;
                Ok(port.transport())
            }
            Address::Unix(_) => crate::unix_datagram::adopt(self, fd, local, max_packet_size, protocol, peer),
            other => Err(invalid(format!("unsupported address {other}"))),
        }
    }
}

/// Which interface a multicast call means.
enum Interface {
    /// Let the system choose.
    Any,
    /// An IPv4 interface by its address.
    V4(Ipv4Addr),
    /// An interface by index.
    Index(u32),
}

/// The multicast side of a UDP port (Twisted's `IMulticastTransport`),
/// from [`DatagramTransport::multicast`].
#[derive(Clone)]
pub struct Multicast {
    port: Rc<DatagramPort<Udp>>,
}

impl Multicast {
    fn v6(&self) -> bool {
        self.port.local().ip().is_some_and(|a| a.is_ipv6())
    }

    fn interface(&self, interface: &str) -> Result<Interface, Error> {
        if interface.is_empty() {
            return Ok(Interface::Any);
        }
        if let Ok(v4) = interface.parse::<Ipv4Addr>() {
            return Ok(Interface::V4(v4));
        }
        if let Ok(index) = interface.parse::<u32>() {
            return Ok(Interface::Index(index));
        }
        if interface.parse::<Ipv6Addr>().is_ok() {
            return Err(Error::InvalidAddress(format!(
                "interface {interface:?}: name an IPv6 interface by name or index, not by address"
            )));
        }
        self.port
            .with_sock(|s| rustix::net::netdevice::name_to_index(s, interface), "looking up an interface")
            .map(Interface::Index)
            .map_err(|_| Error::InvalidAddress(format!("no network interface named {interface:?}")))
    }

    /// Joins or leaves `group` on `interface`.
    fn membership(&self, group: IpAddr, interface: &str, join: bool) -> Result<(), Error> {
        let shown = if interface.is_empty() { group.to_string() } else { format!("{group} on {interface}") };
        if !group.is_multicast() {
            return Err(Error::InvalidAddress(format!("{group} is not a multicast group")));
        }
        let iface = self.interface(interface)?;
        let result = self.port.with_sock(
            |s| match (group, &iface) {
                (IpAddr::V4(g), Interface::Any) if join => {
                    sockopt::set_ip_add_membership(s, &g, &Ipv4Addr::UNSPECIFIED)
                }
                (IpAddr::V4(g), Interface::Any) => {
                    sockopt::set_ip_drop_membership(s, &g, &Ipv4Addr::UNSPECIFIED)
                }
                (IpAddr::V4(g), Interface::V4(i)) if join => sockopt::set_ip_add_membership(s, &g, i),
                (IpAddr::V4(g), Interface::V4(i)) => sockopt::set_ip_drop_membership(s, &g, i),
                (IpAddr::V4(g), Interface::Index(i)) if join => {
                    sockopt::set_ip_add_membership_with_ifindex(s, &g, &Ipv4Addr::UNSPECIFIED, *i)
                }
                (IpAddr::V4(g), Interface::Index(i)) => {
                    sockopt::set_ip_drop_membership_with_ifindex(s, &g, &Ipv4Addr::UNSPECIFIED, *i)
                }
                (IpAddr::V6(g), Interface::Any) if join => sockopt::set_ipv6_add_membership(s, &g, 0),
                (IpAddr::V6(g), Interface::Any) => sockopt::set_ipv6_drop_membership(s, &g, 0),
                (IpAddr::V6(g), Interface::Index(i)) if join => sockopt::set_ipv6_add_membership(s, &g, *i),
                (IpAddr::V6(g), Interface::Index(i)) => sockopt::set_ipv6_drop_membership(s, &g, *i),
                (IpAddr::V6(_), Interface::V4(_)) => Err(rustix::io::Errno::INVAL),
            },
            "multicast membership",
        );
        result.map_err(|e| match e {
            Error::Io { source, .. } => Error::MulticastJoin { group: shown, source },
            other => other,
        })
    }

    /// Joins `group` on `interface` (Twisted's `joinGroup`). Fails with
    /// `MulticastJoin` naming the group when the kernel refuses, with
    /// `InvalidAddress` for an address that is not a group or an interface
    /// that does not exist.
    pub fn join_group(&self, group: IpAddr, interface: &str) -> Deferred<()> {
        settled(self.membership(group, interface, true))
    }

    /// Leaves `group` on `interface` (Twisted's `leaveGroup`).
    pub fn leave_group(&self, group: IpAddr, interface: &str) -> Deferred<()> {
        settled(self.membership(group, interface, false))
    }

    /// Whether this host's own members of a group get the datagrams this
    /// socket sends to it (`IP_MULTICAST_LOOP`; on by default).
    pub fn set_loopback_mode(&self, on: bool) -> Result<(), Error> {
        if self.v6() {
            self.port.with_sock(|s| sockopt::set_ipv6_multicast_loop(s, on), "setting IPV6_MULTICAST_LOOP")
        } else {
            self.port.with_sock(|s| sockopt::set_ip_multicast_loop(s, on), "setting IP_MULTICAST_LOOP")
        }
    }

    /// See [`set_loopback_mode`](Multicast::set_loopback_mode).
    pub fn loopback_mode(&self) -> Result<bool, Error> {
        if self.v6() {
            self.port.with_sock(|s| sockopt::ipv6_multicast_loop(s), "reading IPV6_MULTICAST_LOOP")
        } else {
            self.port.with_sock(|s| sockopt::ip_multicast_loop(s), "reading IP_MULTICAST_LOOP")
        }
    }

    /// How many routers a multicast datagram may cross (`IP_MULTICAST_TTL`,
    /// IPv6 hop limit); 1 by default.
    pub fn set_ttl(&self, ttl: u32) -> Result<(), Error> {
        if ttl > 255 {
            return Err(Error::InvalidAddress(format!("multicast TTL {ttl} is above 255")));
        }
        if self.v6() {
            self.port.with_sock(|s| sockopt::set_ipv6_multicast_hops(s, ttl), "setting IPV6_MULTICAST_HOPS")
        } else {
            self.port.with_sock(|s| sockopt::set_ip_multicast_ttl(s, ttl), "setting IP_MULTICAST_TTL")
        }
    }

    /// See [`set_ttl`](Multicast::set_ttl).
    pub fn ttl(&self) -> Result<u32, Error> {
        if self.v6() {
            self.port.with_sock(|s| sockopt::ipv6_multicast_hops(s), "reading IPV6_MULTICAST_HOPS")
        } else {
            self.port.with_sock(|s| sockopt::ip_multicast_ttl(s), "reading IP_MULTICAST_TTL")
        }
    }

    /// The interface multicast datagrams go out on (Twisted's
    /// `setOutgoingInterface`): an IPv4 address or an interface name or
    /// index, as for [`join_group`](Multicast::join_group).
    pub fn set_outgoing_interface(&self, interface: &str) -> Result<(), Error> {
        let iface = self.interface(interface)?;
        if self.v6() {
            let index = match iface {
                Interface::Any => 0,
                Interface::Index(i) => i,
                Interface::V4(a) => {
                    return Err(Error::InvalidAddress(format!("{a} is IPv4; this port is IPv6")));
                }
            };
            self.port.with_sock(|s| sockopt::set_ipv6_multicast_if(s, index), "setting IPV6_MULTICAST_IF")
        } else {
            self.port.with_sock(
                |s| match iface {
                    Interface::Any => sockopt::set_ip_multicast_if(s, &Ipv4Addr::UNSPECIFIED),
                    Interface::V4(a) => sockopt::set_ip_multicast_if(s, &a),
                    Interface::Index(i) => sockopt::set_ip_multicast_if_with_ifindex(
                        s,
                        &Ipv4Addr::UNSPECIFIED,
                        &Ipv4Addr::UNSPECIFIED,
                        i,
                    ),
                },
                "setting IP_MULTICAST_IF",
            )
        }
    }

    /// The outgoing interface: an IPv4 address (`0.0.0.0` for the
    /// system's choice), or for IPv6 the interface index (`0`: the
    /// system's choice), as text.
    pub fn outgoing_interface(&self) -> Result<String, Error> {
        if self.v6() {
            self.port
                .with_sock(|s| sockopt::ipv6_multicast_if(s), "reading IPV6_MULTICAST_IF")
                .map(|i| i.to_string())
        } else {
            self.port
                .with_sock(|s| sockopt::ip_multicast_if(s), "reading IP_MULTICAST_IF")
                .map(|a| a.to_string())
        }
    }
}

fn settled(result: Result<(), Error>) -> Deferred<()> {
    match result {
        Ok(()) => Deferred::succeed(()),
        Err(e) => Deferred::fail(Failure::new(e)),
    }
}
