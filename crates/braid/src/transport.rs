//! The transport a protocol writes to, and the producer/consumer contract
//! that gives backpressure.
//!
//! A [`Transport`] is a cheap handle (one `Rc`). Writes are buffered and
//! never block: the reactor sends everything a connection buffered during a
//! pass with one `write`/`writev` at the end of the pass, and watches for
//! writability only when the kernel's buffer is full.

use std::fmt;
use std::rc::Rc;

use crate::error::Error;
use crate::stream::unix_io::Credentials;
use crate::stream::Address;

/// Something that produces data for a consumer (a transport), and can be
/// asked to pause and resume (Twisted's `IPushProducer`/`IPullProducer`).
///
/// A *streaming* (push) producer writes on its own and is paused when the
/// consumer's buffer passes its high-water mark, resumed once it drains
/// below the low-water mark. A *pull* producer writes only when asked: its
/// `resume_producing` is called each time the buffer empties.
pub trait Producer {
    /// Stop writing for now (streaming producers only).
    fn pause_producing(&self) {}
    /// Write more (streaming: carry on; pull: produce the next chunk).
    fn resume_producing(&self);
    /// Stop for good; the consumer is going away.
    fn stop_producing(&self);
}

/// What a transport does. Implemented by TCP connections and by the test
/// double `testing::StringTransport`; protocols only see [`Transport`].
pub trait TransportOps {
    /// Buffers `data` for sending. Ignored once the connection is closed.
    fn write(&self, data: &[u8]);
    /// Buffers an owned buffer without copying it.
    fn write_vec(&self, data: Vec<u8>) {
        self.write(&data)
    }
    /// Buffers several pieces; they go out together (`writev`).
    fn write_sequence(&self, data: &[&[u8]]) {
        for d in data {
            self.write(d);
        }
    }
    /// Closes once everything buffered (including later writes) is sent;
    /// the protocol then gets `connection_lost(ConnectionDone)`.
    fn lose_connection(&self);
    /// Closes now, dropping buffered data; the peer sees a reset and the
    /// protocol gets `connection_lost(ConnectionAborted)` from the loop.
    fn abort_connection(&self);
    /// Shuts down the write side once the buffer is sent (half-close).
    fn lose_write_connection(&self);
    /// Our address (`None` once closed).
    fn host(&self) -> Option<Address>;
    /// The peer's address.
    fn peer(&self) -> Address;
    /// The TCP options of this transport, if it is a TCP connection.
    fn tcp(self: Rc<Self>) -> Option<Rc<dyn TcpOptions>> {
        None
    }
    /// The UNIX-socket side of this transport, if it is one.
    fn unix(self: Rc<Self>) -> Option<Rc<dyn UnixOptions>> {
        None
    }
    /// The TLS side of this transport, if it is a TLS connection (or one
    /// that may become one with `start_tls`).
    fn tls(self: Rc<Self>) -> Option<Rc<dyn TlsOptions>> {
        None
    }
    /// Stops reading (the transport as a push producer).
    fn pause_producing(&self);
    /// Starts reading again.
    fn resume_producing(&self);
    /// Stops for good: closes the connection.
    fn stop_producing(&self);
    /// Attaches a producer that feeds this transport.
    fn register_producer(&self, producer: Rc<dyn Producer>, streaming: bool) -> Result<(), Error>;
    /// Detaches the producer.
    fn unregister_producer(&self);
    /// Sets the buffer sizes at which a streaming producer is paused
    /// (above `high`) and resumed (at or below `low`).
    fn set_write_buffer_limits(&self, high: usize, low: usize);
    /// Bytes buffered and not yet sent.
    fn buffered(&self) -> usize;
    /// Queues part of a file to be sent without copying it (see
    /// [`Transport::write_file`]); false if this transport cannot.
    fn write_file(&self, file: &Rc<std::fs::File>, offset: u64, len: u64) -> bool {
        let _ = (file, offset, len);
        false
    }
    /// True until the connection is closed (or closing).
    fn connected(&self) -> bool;
    /// This transport as a producer without a new allocation, if it can be
    /// one (a TCP connection can); `None` makes `Transport::as_producer`
    /// wrap the handle instead.
    fn into_producer(self: Rc<Self>) -> Option<Rc<dyn Producer>> {
        None
    }
    /// Puts a layer (TLS, from `start_tls`) between this live connection
    /// and its protocol: see [`Layer`]. Only the stream connection can.
    #[doc(hidden)]
    fn insert_layer(self: Rc<Self>, make: MakeLayer) -> Result<(), Error> {
        drop(make);
        Err(Error::io(
            "starting TLS",
            std::io::Error::new(std::io::ErrorKind::Unsupported, "this transport cannot take a layer"),
        ))
    }
}

/// A protocol layer started on a live connection (TLS by `start_tls`):
/// from then on the application's calls on the transport it already holds
/// go to the layer's [`upper`](Layer::upper) side, and what the connection
/// reads goes to the layer's protocol, which wraps the application's.
#[doc(hidden)]
pub trait Layer {
    /// What the application's transport calls reach from now on.
    fn upper(&self) -> Rc<dyn TransportOps>;
    /// Takes the application's protocol and returns the protocol the
    /// connection drives in its place. Called once no call into the
    /// application's protocol is on the stack.
    fn adopt(self: Box<Self>, app: Box<dyn crate::protocol::Protocol>) -> Box<dyn crate::protocol::Protocol>;
}

/// Builds a [`Layer`] over the connection's own side below it (a transport
/// that bypasses the layer), on the connection's reactor.
#[doc(hidden)]
pub type MakeLayer = Box<dyn FnOnce(Transport, &crate::reactor::Reactor) -> Box<dyn Layer>>;

/// The handle a protocol keeps to write to its connection and close it.
/// Cloning is cheap; every clone drives the same connection.
#[derive(Clone)]
pub struct Transport {
    ops: Rc<dyn TransportOps>,
}

impl Transport {
    /// Wraps a transport implementation.
    pub fn new(ops: Rc<dyn TransportOps>) -> Transport {
        Transport { ops }
    }

    /// Buffers `data` for sending; never blocks. Ignored after close.
    #[inline]
    pub fn write(&self, data: &[u8]) {
        self.ops.write(data)
    }

    /// Buffers an owned buffer without copying it.
    pub fn write_vec(&self, data: Vec<u8>) {
        self.ops.write_vec(data)
    }

    /// Buffers several pieces to go out together with one `writev`.
    pub fn write_sequence(&self, data: &[&[u8]]) {
        self.ops.write_sequence(data)
    }

    /// Closes after sending everything buffered, including writes made after
    /// this call; the protocol then gets `connection_lost(ConnectionDone)`.
    /// While a producer is registered the close waits for it to unregister
    /// (as in Twisted), so a producer can finish what it is sending.
    pub fn lose_connection(&self) {
        self.ops.lose_connection()
    }

    /// Closes now, discarding buffered data (the peer sees a reset).
    pub fn abort_connection(&self) {
        self.ops.abort_connection()
    }

    /// Half-closes: shuts down our write side once the buffer is sent;
    /// reading goes on.
    pub fn lose_write_connection(&self) {
        self.ops.lose_write_connection()
    }

    /// Our address (Twisted's `getHost`): the local IP and port, or the
    /// UNIX socket's name. `None` once the connection is closed.
    pub fn host(&self) -> Option<Address> {
        self.ops.host()
    }

    /// The peer's address (Twisted's `getPeer`).
    pub fn peer(&self) -> Address {
        self.ops.peer()
    }

    /// What only a TCP connection has (`TCP_NODELAY`, keep-alive), or
    /// `None` for any other kind of stream: kind-specific options are
    /// reached through here rather than faked by every transport.
    pub fn tcp(&self) -> Option<Tcp> {
        self.ops.clone().tcp().map(|ops| Tcp { ops })
    }

    /// What only a UNIX socket connection has (the peer's credentials), or
    /// `None` for any other kind of stream.
    pub fn unix(&self) -> Option<Unix> {
        self.ops.clone().unix().map(|ops| Unix { ops })
    }

    /// What only a TLS connection has (the peer's certificates, the
    /// negotiated ALPN protocol, the SNI name, `start_tls`), or `None` for
    /// a stream that is not wrapped in TLS (see the `tls` module).
    pub fn tls(&self) -> Option<Tls> {
        self.ops.clone().tls().map(|ops| Tls { ops })
    }

    /// The implementation behind this handle, for layers that wrap one
    /// transport in another (TLS reaches the TCP options below it).
    pub(crate) fn ops(&self) -> &Rc<dyn TransportOps> {
        &self.ops
    }

    /// Stops reading until `resume_producing`.
    pub fn pause_producing(&self) {
        self.ops.pause_producing()
    }

    /// Resumes reading.
    pub fn resume_producing(&self) {
        self.ops.resume_producing()
    }

    /// Closes the connection (the transport as a producer, stopped).
    pub fn stop_producing(&self) {
        self.ops.stop_producing()
    }

    /// Attaches `producer`; `streaming` for a push producer. Fails if one
    /// is already registered.
    pub fn register_producer(&self, producer: Rc<dyn Producer>, streaming: bool) -> Result<(), Error> {
        self.ops.register_producer(producer, streaming)
    }

    /// Detaches the producer.
    pub fn unregister_producer(&self) {
        self.ops.unregister_producer()
    }

    /// Sets the high- and low-water marks for pausing a streaming producer
    /// (defaults: 64 KiB and 0, as Twisted).
    pub fn set_write_buffer_limits(&self, high: usize, low: usize) {
        self.ops.set_write_buffer_limits(high, low)
    }

    /// Bytes buffered and not yet sent (a queued file's too).
    pub fn buffered(&self) -> usize {
        self.ops.buffered()
    }

    /// Queues `len` bytes of the regular file `file`, from `offset`, to be
    /// sent after what is buffered and before what is written next, by
    /// the kernel (`sendfile(2)`) with no copy through user space: for
    /// serving files. Returns false, queuing nothing, where that cannot be
    /// done: a transport that is not a plain stream socket or pipe (TLS, a
    /// test double), a file that is not a regular file, descriptors
    /// waiting to be passed. The caller then writes the bytes itself. A
    /// pull producer is asked for more once everything, files included,
    /// is sent. The file's bytes count in `buffered` but
    /// not against the high-water mark; if the file turns out shorter
    /// than `len`, the connection is closed with an error.
    pub fn write_file(&self, file: &Rc<std::fs::File>, offset: u64, len: u64) -> bool {
        self.ops.write_file(file, offset, len)
    }

    /// True until the connection is closed or closing.
    pub fn connected(&self) -> bool {
        self.ops.connected()
    }

    /// This transport as a producer, e.g. to register it with another
    /// transport so a proxy stops reading when its peer is slow.
    pub fn as_producer(&self) -> Rc<dyn Producer> {
        self.ops.clone().into_producer().unwrap_or_else(|| Rc::new(self.clone()))
    }
}

impl Producer for Transport {
    fn pause_producing(&self) {
        self.ops.pause_producing()
    }
    fn resume_producing(&self) {
        self.ops.resume_producing()
    }
    fn stop_producing(&self) {
        self.ops.stop_producing()
    }
}

impl fmt::Debug for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transport")
            .field("host", &self.host())
            .field("peer", &self.peer())
            .field("connected", &self.connected())
            .finish()
    }
}

/// The options only a TCP transport has (implemented by TCP connections
/// and by `testing::StringTransport`).
pub trait TcpOptions {
    /// Turns Nagle's algorithm off (`true`) or on.
    fn set_nodelay(&self, on: bool) -> Result<(), Error>;
    /// Turns TCP keep-alive probes on or off.
    fn set_keepalive(&self, on: bool) -> Result<(), Error>;

    /// The connection itself, for braid's kernel relay
    /// (`stream::splice_streams`); other implementations have none.
    #[doc(hidden)]
    fn splice_source(self: Rc<Self>) -> Option<Rc<dyn std::any::Any>> {
        None
    }
}

/// A TCP transport's own options, from [`Transport::tcp`].
#[derive(Clone)]
pub struct Tcp {
    ops: Rc<dyn TcpOptions>,
}

impl Tcp {
    /// Sets `TCP_NODELAY`: `true` sends small writes at once (no Nagle).
    pub fn set_nodelay(&self, on: bool) -> Result<(), Error> {
        self.ops.set_nodelay(on)
    }

    /// Sets `SO_KEEPALIVE`: the kernel probes an idle peer.
    pub fn set_keepalive(&self, on: bool) -> Result<(), Error> {
        self.ops.set_keepalive(on)
    }
}

/// The side only a UNIX socket transport has.
pub trait UnixOptions {
    /// Who is at the other end (`SO_PEERCRED`): pid, uid and gid as the
    /// kernel recorded them when the peer connected.
    fn peer_credentials(&self) -> Result<Credentials, Error>;
    /// Queues `fd` to go to the peer with the next bytes written (alone,
    /// with one zero byte, if nothing else is written this pass).
    fn send_file_descriptor(&self, fd: std::os::fd::OwnedFd) -> Result<(), Error>;
}

/// A UNIX socket transport's own side, from [`Transport::unix`].
#[derive(Clone)]
pub struct Unix {
    ops: Rc<dyn UnixOptions>,
}

impl Unix {
    /// The peer's pid (when visible from this PID namespace), uid and gid.
    pub fn peer_credentials(&self) -> Result<Credentials, Error> {
        self.ops.peer_credentials()
    }

    /// Sends `fd` to the peer (`SCM_RIGHTS`, Twisted's
    /// `sendFileDescriptor`): it goes with the next bytes written, or, if
    /// nothing is written in this pass, with one zero byte of its own. Any
    /// number may be queued; they go in order, at most 253 per message
    /// (the kernel's limit). Our copy is closed once the kernel has it.
    /// `ConnectionDone` once the connection is closing.
    pub fn send_file_descriptor(&self, fd: impl Into<std::os::fd::OwnedFd>) -> Result<(), Error> {
        self.ops.send_file_descriptor(fd.into())
    }
}

/// The side only a TLS transport has (implemented in the `tls` module).
pub trait TlsOptions {
    /// True once the handshake has finished.
    fn handshake_complete(&self) -> bool;
    /// The peer's certificate chain, leaf first, in DER (empty before the
    /// handshake, or if the peer sent none).
    fn peer_certificates(&self) -> Vec<Vec<u8>>;
    /// The ALPN protocol both sides agreed on, if any.
    fn alpn_protocol(&self) -> Option<Vec<u8>>;
    /// The server name the client asked for (SNI): on a server, what the
    /// client sent; on a client, what it sent.
    fn server_name(&self) -> Option<String>;
    /// The negotiated protocol version ("TLSv1.3", "TLSv1.2").
    fn protocol_version(&self) -> Option<&'static str>;
    /// True if the handshake resumed an earlier session.
    fn resumed(&self) -> bool;
    /// Fires once the handshake finishes, or fails with the reason the
    /// connection ended before it did.
    fn when_handshake_completed(&self) -> crate::defer::Deferred<()>;
    /// The implementation, so the TLS layer can reach its own type
    /// (`start_tls` takes a configuration this layer does not know).
    fn as_any(self: Rc<Self>) -> Rc<dyn std::any::Any>;
}

/// A TLS transport's own side, from [`Transport::tls`].
#[derive(Clone)]
pub struct Tls {
    pub(crate) ops: Rc<dyn TlsOptions>,
}

impl Tls {
    /// True once the handshake has finished.
    pub fn handshake_complete(&self) -> bool {
        self.ops.handshake_complete()
    }

    /// The peer's certificate chain, leaf first, in DER.
    pub fn peer_certificates(&self) -> Vec<Vec<u8>> {
        self.ops.peer_certificates()
    }

    /// The negotiated ALPN protocol, if any.
    pub fn alpn_protocol(&self) -> Option<Vec<u8>> {
        self.ops.alpn_protocol()
    }

    /// The SNI server name of this connection, if one was sent.
    pub fn server_name(&self) -> Option<String> {
        self.ops.server_name()
    }

    /// The negotiated protocol version, once known.
    pub fn protocol_version(&self) -> Option<&'static str> {
        self.ops.protocol_version()
    }

    /// True if the handshake resumed an earlier session.
    pub fn resumed(&self) -> bool {
        self.ops.resumed()
    }

    /// A Deferred that fires once the handshake finishes (at once if it
    /// already has), or fails with the reason the connection ended first.
    pub fn when_handshake_completed(&self) -> crate::defer::Deferred<()> {
        self.ops.when_handshake_completed()
    }
}

/// Twisted's default high-water mark for pausing a streaming producer.
pub const DEFAULT_HIGH_WATER: usize = 64 * 1024;
