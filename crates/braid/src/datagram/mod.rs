//! Datagram sockets (Twisted's `DatagramProtocol`, `IUDPTransport`,
//! `IMulticastTransport`): UDP over IPv4 and IPv6, multicast, and UNIX
//! datagram sockets, all through one port implementation (`port`).
//!
//! A protocol is told about every datagram with one `datagram_received`
//! call. It may be shared by several ports: `start_protocol` runs when the
//! first one attaches, `stop_protocol` when the last one has closed (on a
//! later iteration than `stop_listening`, never inside it).
//!
//! # Writes
//!
//! [`DatagramTransport::write`] checks what it can at once (a destination
//! of the socket's family, a datagram the protocol can carry, room in the
//! queue) and returns an error for those: such a datagram was not sent.
//! An accepted datagram is queued and sent at the end of the reactor's pass
//! (right after the read batch when written from `datagram_received`), many
//! at once with `sendmmsg`. So a write never blocks, and a datagram the
//! caller was told was accepted is never dropped without a word:
//! - a full kernel buffer (`EAGAIN`) keeps it queued until the socket is
//!   writable again;
//! - an error the kernel reports for it later (an unreachable network, a
//!   broadcast address without [`set_broadcast_allowed`]) is reported to
//!   [`DatagramProtocol::send_failed`] with the destination;
//! - `ECONNREFUSED` is the echo of an earlier datagram's ICMP error: on a
//!   connected port it calls `connection_refused`, and either way the
//!   datagram at hand is tried again;
//! - at close, what is still queued gets one last try; anything left is
//!   logged with its count.
//!
//! A write from inside a callback never calls back into the protocol: the
//! reactor's re-entrancy rule holds for datagrams too.
//!
//! [`set_broadcast_allowed`]: DatagramTransport::set_broadcast_allowed

pub(crate) mod port;

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use crate::defer::Deferred;
use crate::error::{Error, Failure};
use crate::stream::Address;

pub use crate::udp::Multicast;

/// What a datagram port calls (Twisted's `DatagramProtocol`). Calls come
/// from the reactor loop, one at a time, never re-entrantly.
pub trait DatagramProtocol {
    /// A port now uses this protocol: keep `transport` to write. Called
    /// once per port, before `start_protocol` on the first.
    fn make_connection(&mut self, transport: DatagramTransport) {
        let _ = transport;
    }

    /// The first port attached (Twisted's `startProtocol`).
    fn start_protocol(&mut self) {}

    /// One datagram arrived from `from`. The slice is only valid during
    /// the call. A panic here is logged and reading goes on.
    fn datagram_received(&mut self, data: &[u8], from: &Address);

    /// A datagram of `len` bytes arrived that is larger than the port's
    /// `max_packet_size`; `data` is the part that fit. The default logs a
    /// warning and drops it, so a cut datagram is never taken for a whole one.
    fn datagram_truncated(&mut self, data: &[u8], len: usize, from: &Address) {
        tracing::warn!(
            target: "braid",
            "dropped a {len}-byte datagram from {from}: larger than max_packet_size ({} bytes kept)",
            data.len()
        );
    }

    /// On a connected port, the peer answered an earlier datagram with an
    /// ICMP error: nothing listens there (Twisted's `connectionRefused`).
    fn connection_refused(&mut self) {}

    /// A datagram that `write` accepted could not be sent: the kernel
    /// refused it with `reason`. `to` is its destination (`None` on a
    /// connected port). The default logs a warning.
    fn send_failed(&mut self, to: Option<&Address>, reason: Failure) {
        match to {
            Some(to) => tracing::warn!(target: "braid", "could not send a datagram to {to}: {reason}"),
            None => tracing::warn!(target: "braid", "could not send a datagram: {reason}"),
        }
    }

    /// The last port using this protocol has closed (Twisted's `stopProtocol`).
    fn stop_protocol(&mut self) {}
}

/// A datagram protocol shared by several ports, so `start_protocol` and
/// `stop_protocol` are counted across all of them. Clone it to hand it to
/// another port; [`with`](SharedDatagram::with) reaches the protocol.
pub struct SharedDatagram<P: ?Sized> {
    inner: Rc<SharedInner<P>>,
}

struct SharedInner<P: ?Sized> {
    ports: Cell<usize>,
    name: &'static str,
    protocol: RefCell<P>,
}

impl<P: ?Sized> Clone for SharedDatagram<P> {
    fn clone(&self) -> Self {
        SharedDatagram { inner: self.inner.clone() }
    }
}

impl<P: DatagramProtocol + 'static> SharedDatagram<P> {
    /// Wraps a protocol for sharing.
    pub fn new(protocol: P) -> Self {
        SharedDatagram {
            inner: Rc::new(SharedInner {
                ports: Cell::new(0),
                name: std::any::type_name::<P>(),
                protocol: RefCell::new(protocol),
            }),
        }
    }
}

impl<P: ?Sized> SharedDatagram<P> {
    /// Runs `f` with the protocol borrowed mutably. Panics if called from
    /// inside one of the protocol's own callbacks (it is borrowed then).
    pub fn with<R>(&self, f: impl FnOnce(&mut P) -> R) -> R {
        f(&mut self.inner.protocol.borrow_mut())
    }

    /// How many ports use the protocol now.
    pub fn ports(&self) -> usize {
        self.inner.ports.get()
    }

    /// The protocol's type name, for log lines.
    pub fn name(&self) -> &'static str {
        self.inner.name
    }
}

impl SharedDatagram<dyn DatagramProtocol> {
    /// Runs `f` on the protocol unless it is busy in a callback already
    /// (which the loop never causes; a user's nested call could). A panic
    /// in `f` is returned as a failure.
    pub(crate) fn call(&self, f: impl FnOnce(&mut dyn DatagramProtocol)) -> Result<(), Failure> {
        crate::reactor::catch_panic(|| match self.inner.protocol.try_borrow_mut() {
            Ok(mut p) => {
                f(&mut *p);
                Ok(())
            }
            Err(_) => {
                Err(Failure::msg(format!("datagram protocol {} is busy in another callback", self.name())))
            }
        })
    }

    /// Counts one more port; the first starts the protocol.
    pub(crate) fn attach(&self, transport: DatagramTransport) -> Result<(), Failure> {
        self.call(|p| p.make_connection(transport))?;
        let n = self.inner.ports.get();
        self.inner.ports.set(n + 1);
        if n == 0 {
            self.call(|p| p.start_protocol())?;
        }
        Ok(())
    }

    /// Counts one port less; the last stops the protocol.
    pub(crate) fn detach(&self) -> Result<(), Failure> {
        let n = self.inner.ports.get();
        if n == 0 {
            return Ok(());
        }
        self.inner.ports.set(n - 1);
        if n == 1 {
            self.call(|p| p.stop_protocol())?;
        }
        Ok(())
    }
}

/// Anything a datagram port accepts as its protocol: a protocol value, or
/// a [`SharedDatagram`] already used by other ports.
pub trait IntoDatagramProtocol {
    /// Wraps the protocol for the port.
    fn into_shared(self) -> SharedDatagram<dyn DatagramProtocol>;
}

impl<P: DatagramProtocol + 'static> IntoDatagramProtocol for P {
    fn into_shared(self) -> SharedDatagram<dyn DatagramProtocol> {
        SharedDatagram::new(self).erase()
    }
}

impl<P: DatagramProtocol + 'static> IntoDatagramProtocol for SharedDatagram<P> {
    fn into_shared(self) -> SharedDatagram<dyn DatagramProtocol> {
        self.erase()
    }
}

impl IntoDatagramProtocol for SharedDatagram<dyn DatagramProtocol> {
    fn into_shared(self) -> SharedDatagram<dyn DatagramProtocol> {
        self
    }
}

impl<P: DatagramProtocol + 'static> SharedDatagram<P> {
    /// The same shared protocol, with its type erased.
    pub fn erase(&self) -> SharedDatagram<dyn DatagramProtocol> {
        let inner: Rc<SharedInner<dyn DatagramProtocol>> = self.inner.clone();
        SharedDatagram { inner }
    }
}

/// What a datagram port does for its handle (internal).
pub(crate) trait DatagramOps {
    fn write_parts(&self, parts: &[&[u8]], to: Option<&Address>) -> Result<(), Error>;
    fn connect(&self, to: &Address) -> Result<(), Error>;
    fn host(&self) -> Address;
    fn peer(&self) -> Option<Address>;
    fn listening(&self) -> bool;
    fn stop_listening(&self) -> Deferred<()>;
    fn max_packet_size(&self) -> usize;
    fn queued(&self) -> usize;
    fn set_send_queue_limit(&self, bytes: usize);
    fn set_broadcast_allowed(&self, on: bool) -> Result<(), Error>;
    fn broadcast_allowed(&self) -> Result<bool, Error>;
    fn multicast(&self) -> Option<Multicast>;
    fn describe(&self) -> String;
}

/// A datagram port, as its protocol and its owner see it (Twisted's
/// `IUDPTransport` and `IListeningPort` in one). Cheap to clone. The port
/// lives in the reactor until `stop_listening` (or shutdown) whether or not
/// a handle is kept.
#[derive(Clone)]
pub struct DatagramTransport {
    port: Rc<dyn DatagramOps>,
}

impl DatagramTransport {
    pub(crate) fn new(port: Rc<dyn DatagramOps>) -> DatagramTransport {
        DatagramTransport { port }
    }

    /// Queues `data` as one datagram to `to` (`None` only on a connected
    /// port). Errors mean it was not sent: `InvalidAddress` (no destination
    /// on an unconnected port, a host name, another family, another address
    /// than the connected one), `MessageLength` (larger than the protocol
    /// carries), `SendQueueFull`, `PortClosed`. See the module docs for
    /// what happens after.
    pub fn write(&self, data: &[u8], to: Option<&Address>) -> Result<(), Error> {
        self.port.write_parts(&[data], to)
    }

    /// Queues the pieces joined as **one** datagram (Twisted's `writeSequence`).
    pub fn write_sequence(&self, parts: &[&[u8]], to: Option<&Address>) -> Result<(), Error> {
        self.port.write_parts(parts, to)
    }

    /// Connects the port to `to` (an IP address literal, or a UNIX address
    /// for a UNIX port): writes need no address after this, datagrams from
    /// elsewhere are no longer received, and ICMP errors call
    /// `connection_refused`. Only once: a second call is `AlreadyConnected`.
    pub fn connect(&self, to: &Address) -> Result<(), Error> {
        self.port.connect(to)
    }

    /// The address the port is bound to (Twisted's `getHost`), with the
    /// real port number when port 0 was asked for.
    pub fn host(&self) -> Address {
        self.port.host()
    }

    /// The IP address and port the socket is bound to; `0.0.0.0:0` for a
    /// UNIX port (use [`host`](DatagramTransport::host) there).
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.host().ip().unwrap_or_else(|| std::net::SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// The connected address, if [`connect`](DatagramTransport::connect)ed.
    pub fn peer(&self) -> Option<Address> {
        self.port.peer()
    }

    /// True until `stop_listening`.
    pub fn listening(&self) -> bool {
        self.port.listening()
    }

    /// Stops reading now; the socket closes (after one last try at what is
    /// queued) and `stop_protocol` runs on a later iteration, then the
    /// Deferred fires.
    pub fn stop_listening(&self) -> Deferred<()> {
        self.port.stop_listening()
    }

    /// The largest datagram delivered whole; larger ones are reported to
    /// `datagram_truncated`.
    pub fn max_packet_size(&self) -> usize {
        self.port.max_packet_size()
    }

    /// Datagrams accepted by `write` and not yet handed to the kernel.
    pub fn queued(&self) -> usize {
        self.port.queued()
    }

    /// Caps the bytes waiting in the send queue (see [`DEFAULT_SEND_QUEUE`]);
    /// a write beyond it is `SendQueueFull`.
    pub fn set_send_queue_limit(&self, bytes: usize) {
        self.port.set_send_queue_limit(bytes)
    }

    /// Allows or forbids sending to broadcast addresses (`SO_BROADCAST`).
    pub fn set_broadcast_allowed(&self, on: bool) -> Result<(), Error> {
        self.port.set_broadcast_allowed(on)
    }

    /// Whether sending to broadcast addresses is allowed.
    pub fn broadcast_allowed(&self) -> Result<bool, Error> {
        self.port.broadcast_allowed()
    }

    /// The multicast side of a UDP port (`None` on a UNIX port).
    pub fn multicast(&self) -> Option<Multicast> {
        self.port.multicast()
    }
}

impl std::fmt::Display for DatagramTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.port.describe())
    }
}

impl std::fmt::Debug for DatagramTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DatagramTransport({})", self.port.describe())
    }
}

/// Twisted's default `maxPacketSize` for UDP ports.
pub const DEFAULT_MAX_PACKET_SIZE: usize = 8192;

/// The default cap on bytes waiting in a port's send queue.
pub const DEFAULT_SEND_QUEUE: usize = 1024 * 1024;
