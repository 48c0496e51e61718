//! Test doubles: drive time and connections by hand, with no sockets and
//! no waiting. Used by braid's own tests and meant for yours.
//!
//! - [`Clock`]: deterministic time; `advance` runs what is due.
//! - [`StringTransport`]: a transport that records writes, closes and
//!   producer calls; feed a protocol bytes with `feed`.
//! - [`MemoryReactor`]: records `listen_tcp`/`connect_tcp` so factories
//!   can be driven by hand; keeps time with its own `Clock`.
//!
//! `Clock` and `MemoryReactor` implement [`ReactorTime`], so they go
//! wherever a clock does (`LoopingCall::new(clock.clone(), ..)`,
//! `Deferred::add_timeout(&clock, ..)`, `ReconnectingClientFactory`).
//! See [`task`](crate::task) for a protocol unit test using a clock and a
//! `StringTransport` together.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use crate::defer::Deferred;
use crate::error::{Error, Failure};
use crate::protocol::{ClientFactory, Factory, IntoFactory, Protocol, SharedFactory};
use crate::reactor::{CallbackResult, DelayedCall, ReactorTime, TimeSource, Timers};
use crate::stream::Address;
use crate::tcp::ToListenAddr;
use crate::transport::{Producer, TcpOptions, Transport, TransportOps, DEFAULT_HIGH_WATER};

/// Deterministic time (Twisted's `task.Clock`): starts at 0 and moves only
/// when told to. It hands out the same [`DelayedCall`] as the reactor.
///
/// ```
/// use std::cell::Cell;
/// use std::rc::Rc;
/// use std::time::Duration;
/// use braid::testing::Clock;
///
/// let clock = Clock::new();
/// let fired = Rc::new(Cell::new(false));
/// let f = fired.clone();
/// clock.call_later(Duration::from_secs(5), move || f.set(true));
/// clock.advance(Duration::from_secs(4));
/// assert!(!fired.get());
/// clock.advance(Duration::from_secs(1));
/// assert!(fired.get());
/// ```
#[derive(Clone)]
pub struct Clock {
    timers: Rc<Timers>,
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock {
    /// A clock at time 0 with nothing scheduled.
    pub fn new() -> Clock {
        Clock { timers: Timers::new(TimeSource::Manual(Cell::new(0))) }
    }

    /// The clock's current time in seconds.
    pub fn seconds(&self) -> f64 {
        self.timers.seconds()
    }

    /// Schedules `f` to run once the clock has advanced by `delay`.
    pub fn call_later<F, R>(&self, delay: Duration, f: F) -> DelayedCall
    where
        F: FnOnce() -> R + 'static,
        R: CallbackResult + 'static,
    {
        self.timers.call_later(delay, f)
    }

    /// Moves time forward by `by` and runs every call now due, in order,
    /// including calls those calls schedule for no later than the new time.
    pub fn advance(&self, by: Duration) {
        self.timers.advance(by);
        while self.timers.run_due() > 0 {}
    }

    /// Advances by each step in turn (Twisted's `Clock.pump`).
    pub fn pump(&self, steps: &[Duration]) {
        for &step in steps {
            self.advance(step);
        }
    }

    /// Every pending call.
    pub fn get_delayed_calls(&self) -> Vec<DelayedCall> {
        self.timers.pending()
    }
}

impl ReactorTime for Clock {
    fn seconds(&self) -> f64 {
        Clock::seconds(self)
    }
    fn schedule(&self, delay: Duration, f: Box<dyn FnOnce()>) -> DelayedCall {
        self.call_later(delay, f)
    }
    fn pending_calls(&self) -> Vec<DelayedCall> {
        self.get_delayed_calls()
    }
}

/// Lets clock-taking constructors (`LoopingCall::new`, `Cooperator::new`,
/// ...) take a `Clock` directly.
impl From<Clock> for Rc<dyn ReactorTime> {
    fn from(clock: Clock) -> Self {
        Rc::new(clock)
    }
}

// ------------------------------------------------------------ StringTransport

/// What a [`StringTransport`]'s own producer side (the "reading" half of a
/// connection) has been told to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProducerState {
    /// Reading (the initial state, and after `resume_producing`).
    Producing,
    /// Paused by `pause_producing`.
    Paused,
    /// Stopped for good by `stop_producing`.
    Stopped,
}

struct StringInner {
    written: RefCell<Vec<u8>>,
    disconnecting: Cell<bool>,
    aborted: Cell<bool>,
    write_closed: Cell<bool>,
    producer_state: Cell<ProducerState>,
    producer: RefCell<Option<Rc<dyn Producer>>>,
    streaming: Cell<bool>,
    nodelay: Cell<bool>,
    keepalive: Cell<bool>,
    limits: Cell<(usize, usize)>,
    local: SocketAddr,
    peer: SocketAddr,
}

/// A transport that records instead of sending (Twisted's
/// `StringTransport`): unit-test a protocol with no reactor and no socket.
///
/// Writes pile up in [`value`](StringTransport::value);
/// `lose_connection` only marks it [`disconnecting`](StringTransport::disconnecting)
/// (nothing calls `connection_lost` by itself: do it with
/// [`lose`](StringTransport::lose) when the test wants the protocol to see
/// the close). [`connect`](StringTransport::connect) and
/// [`feed`](StringTransport::feed) call the protocol as the reactor would.
/// Clones share the same record.
///
/// ```
/// use braid::testing::StringTransport;
/// use braid::protocols::echo::Echo;
///
/// let mut echo = Echo::default();
/// let tr = StringTransport::new();
/// tr.connect(&mut echo);
/// tr.feed(&mut echo, b"hello");
/// assert_eq!(tr.value(), b"hello");
/// ```
#[derive(Clone)]
pub struct StringTransport {
    inner: Rc<StringInner>,
}

impl Default for StringTransport {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for StringTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StringTransport")
            .field("written", &self.inner.written.borrow().len())
            .field("disconnecting", &self.inner.disconnecting.get())
            .field("producer_state", &self.inner.producer_state.get())
            .finish()
    }
}

impl StringTransport {
    /// A fresh transport with made-up addresses (local 192.168.1.1:54321,
    /// peer 10.0.0.1:12345, as Twisted's).
    pub fn new() -> Self {
        Self::with_addrs(
            SocketAddr::from(([192, 168, 1, 1], 54321)),
            SocketAddr::from(([10, 0, 0, 1], 12345)),
        )
    }

    /// A fresh transport reporting these addresses.
    pub fn with_addrs(local: SocketAddr, peer: SocketAddr) -> Self {
        StringTransport {
            inner: Rc::new(StringInner {
                written: RefCell::new(Vec::new()),
                disconnecting: Cell::new(false),
                aborted: Cell::new(false),
                write_closed: Cell::new(false),
                producer_state: Cell::new(ProducerState::Producing),
                producer: RefCell::new(None),
                streaming: Cell::new(false),
                nodelay: Cell::new(false),
                keepalive: Cell::new(false),
                limits: Cell::new((DEFAULT_HIGH_WATER, 0)),
                local,
                peer,
            }),
        }
    }

    /// The [`Transport`] handle to give a protocol.
    pub fn transport(&self) -> Transport {
        Transport::new(Rc::new(self.clone()))
    }

    /// Everything written so far (since the last [`clear`](StringTransport::clear)).
    pub fn value(&self) -> Vec<u8> {
        self.inner.written.borrow().clone()
    }

    /// Forgets what was written.
    pub fn clear(&self) {
        self.inner.written.borrow_mut().clear();
    }

    /// Returns what was written and clears it.
    pub fn take(&self) -> Vec<u8> {
        std::mem::take(&mut *self.inner.written.borrow_mut())
    }

    /// True once `lose_connection` (or `abort_connection`) was called.
    pub fn disconnecting(&self) -> bool {
        self.inner.disconnecting.get()
    }

    /// True once `abort_connection` was called.
    pub fn aborted(&self) -> bool {
        self.inner.aborted.get()
    }

    /// True once `lose_write_connection` was called.
    pub fn write_closed(&self) -> bool {
        self.inner.write_closed.get()
    }

    /// What the protocol asked of the transport's reading side.
    pub fn producer_state(&self) -> ProducerState {
        self.inner.producer_state.get()
    }

    /// The registered producer, if any.
    pub fn producer(&self) -> Option<Rc<dyn Producer>> {
        self.inner.producer.borrow().clone()
    }

    /// True if the registered producer is a streaming (push) one.
    pub fn streaming(&self) -> bool {
        self.inner.streaming.get()
    }

    /// The last `set_nodelay` value (off at first).
    pub fn nodelay(&self) -> bool {
        self.inner.nodelay.get()
    }

    /// The last `set_keepalive` value (off at first).
    pub fn keepalive(&self) -> bool {
        self.inner.keepalive.get()
    }

    /// The last `set_write_buffer_limits` (high, low).
    pub fn write_buffer_limits(&self) -> (usize, usize) {
        self.inner.limits.get()
    }

    /// Calls `protocol.connection_made` with this transport.
    pub fn connect<P: Protocol + ?Sized>(&self, protocol: &mut P) {
        protocol.connection_made(self.transport());
    }

    /// Calls `protocol.data_received(data)`, as the reactor does when
    /// bytes arrive.
    pub fn feed<P: Protocol + ?Sized>(&self, protocol: &mut P, data: &[u8]) {
        protocol.data_received(data);
    }

    /// Marks the transport closed and calls `protocol.connection_lost`.
    pub fn lose<P: Protocol + ?Sized>(&self, protocol: &mut P, reason: Failure) {
        self.inner.disconnecting.set(true);
        protocol.connection_lost(reason);
    }
}

/// A string transport stands in for a TCP connection: it records the
/// options set on it.
impl TcpOptions for StringTransport {
    fn set_nodelay(&self, on: bool) -> Result<(), Error> {
        self.inner.nodelay.set(on);
        Ok(())
    }
    fn set_keepalive(&self, on: bool) -> Result<(), Error> {
        self.inner.keepalive.set(on);
        Ok(())
    }
}

impl TransportOps for StringTransport {
    fn write(&self, data: &[u8]) {
        self.inner.written.borrow_mut().extend_from_slice(data);
    }
    fn lose_connection(&self) {
        self.inner.disconnecting.set(true);
    }
    fn abort_connection(&self) {
        self.inner.aborted.set(true);
        self.inner.disconnecting.set(true);
    }
    fn lose_write_connection(&self) {
        self.inner.write_closed.set(true);
    }
    fn host(&self) -> Option<Address> {
        Some(Address::Ip(self.inner.local))
    }
    fn peer(&self) -> Address {
        Address::Ip(self.inner.peer)
    }
    fn tcp(self: Rc<Self>) -> Option<Rc<dyn TcpOptions>> {
        Some(self)
    }
    /// Ignored once stopped or disconnecting (Twisted raises there).
    fn pause_producing(&self) {
        if self.inner.producer_state.get() != ProducerState::Stopped && !self.inner.disconnecting.get() {
            self.inner.producer_state.set(ProducerState::Paused);
        }
    }
    /// Ignored once stopped or disconnecting (Twisted raises there).
    fn resume_producing(&self) {
        if self.inner.producer_state.get() != ProducerState::Stopped && !self.inner.disconnecting.get() {
            self.inner.producer_state.set(ProducerState::Producing);
        }
    }
    fn stop_producing(&self) {
        self.inner.producer_state.set(ProducerState::Stopped);
    }
    fn register_producer(&self, producer: Rc<dyn Producer>, streaming: bool) -> Result<(), Error> {
        let mut slot = self.inner.producer.borrow_mut();
        if slot.is_some() {
            return Err(Error::io(
                "registering a producer",
                io::Error::new(io::ErrorKind::AlreadyExists, "a producer is already registered"),
            ));
        }
        *slot = Some(producer);
        self.inner.streaming.set(streaming);
        Ok(())
    }
    fn unregister_producer(&self) {
        self.inner.producer.borrow_mut().take();
        self.inner.streaming.set(false);
    }
    fn set_write_buffer_limits(&self, high: usize, low: usize) {
        self.inner.limits.set((high, low));
    }
    /// Everything written and not yet cleared counts as buffered.
    fn buffered(&self) -> usize {
        self.inner.written.borrow().len()
    }
    fn connected(&self) -> bool {
        !self.inner.disconnecting.get()
    }
}

// ------------------------------------------------------------- MemoryReactor

/// One `listen_tcp` call recorded by a [`MemoryReactor`].
#[derive(Clone)]
pub struct TcpServer {
    /// The address asked for (a port-0 request gets a made-up port).
    pub addr: SocketAddr,
    /// The backlog asked for.
    pub backlog: u32,
    /// The factory, to build protocols by hand.
    pub factory: SharedFactory<dyn Factory>,
}

impl TcpServer {
    /// Asks the factory for a protocol for a connection from `peer`.
    pub fn build_protocol(&self, peer: SocketAddr) -> Option<Box<dyn Protocol>> {
        self.factory.with(|f| f.build_protocol(&Address::Ip(peer)))
    }
}

impl fmt::Debug for TcpServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpServer").field("addr", &self.addr).field("backlog", &self.backlog).finish()
    }
}

/// One `connect_tcp` call recorded by a [`MemoryReactor`].
#[derive(Clone)]
pub struct TcpClient {
    /// The host asked for.
    pub host: String,
    /// The port asked for.
    pub port: u16,
    /// The connect timeout asked for.
    pub timeout: Option<Duration>,
    /// The local address asked for.
    pub bind: Option<SocketAddr>,
    /// The handle returned to the caller.
    pub connector: MemoryConnector,
    factory: Rc<RefCell<Box<dyn ClientFactory>>>,
}

impl TcpClient {
    /// Asks the factory for a protocol for a connection to `peer`.
    pub fn build_protocol(&self, peer: SocketAddr) -> Option<Box<dyn Protocol>> {
        self.factory.borrow_mut().build_protocol(&Address::Ip(peer))
    }

    /// Runs `f` with the factory (to inspect it, or call its other methods).
    pub fn with_factory<R>(&self, f: impl FnOnce(&mut dyn ClientFactory) -> R) -> R {
        f(&mut **self.factory.borrow_mut())
    }
}

impl fmt::Debug for TcpClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpClient")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("timeout", &self.timeout)
            .field("bind", &self.bind)
            .finish()
    }
}

/// The port a [`MemoryReactor`] hands out for `listen_tcp`: it only
/// remembers whether it is still "listening".
#[derive(Clone, Debug)]
pub struct MemoryPort {
    addr: SocketAddr,
    listening: Rc<Cell<bool>>,
}

impl MemoryPort {
    /// The address recorded for the port.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// True until `stop_listening`.
    pub fn listening(&self) -> bool {
        self.listening.get()
    }

    /// Marks the port stopped; the Deferred has already fired.
    pub fn stop_listening(&self) -> Deferred<()> {
        self.listening.set(false);
        Deferred::succeed(())
    }
}

/// The connector a [`MemoryReactor`] hands out for `connect_tcp`: it
/// records what was asked of it.
#[derive(Clone, Debug)]
pub struct MemoryConnector {
    host: String,
    port: u16,
    stopped_connecting: Rc<Cell<bool>>,
    disconnected: Rc<Cell<bool>>,
}

impl MemoryConnector {
    /// The host and port this connector "dials".
    pub fn destination(&self) -> (String, u16) {
        (self.host.clone(), self.port)
    }

    /// Records a `stop_connecting` call.
    pub fn stop_connecting(&self) {
        self.stopped_connecting.set(true);
    }

    /// Records a `disconnect` call.
    pub fn disconnect(&self) {
        self.disconnected.set(true);
    }

    /// True once `stop_connecting` was called.
    pub fn stopped_connecting(&self) -> bool {
        self.stopped_connecting.get()
    }

    /// True once `disconnect` was called.
    pub fn disconnected(&self) -> bool {
        self.disconnected.get()
    }
}

struct MemoryInner {
    clock: Clock,
    servers: RefCell<Vec<TcpServer>>,
    clients: RefCell<Vec<TcpClient>>,
    next_port: Cell<u16>,
}

/// A stand-in for the reactor that records connection requests instead
/// of opening sockets (Twisted's `MemoryReactorClock`), so a factory can
/// be driven by hand. It keeps time with a [`Clock`], and implements
/// [`ReactorTime`], so timers, `LoopingCall` and timeouts run on it.
///
/// It is not a [`Reactor`](crate::Reactor) (that type is the real loop):
/// code that should run on both takes `Rc<dyn ReactorTime>` for time, and
/// `listen_tcp`/`connect_tcp` here have the reactor's names and arguments
/// but return [`MemoryPort`]/[`MemoryConnector`]. Clones share the record.
///
/// ```
/// use braid::testing::{MemoryReactor, StringTransport};
/// use braid::protocols::echo::Echo;
///
/// let reactor = MemoryReactor::new();
/// reactor.listen_tcp(8000, || Echo::default(), 50).unwrap();
/// let server = &reactor.tcp_servers()[0];
/// assert_eq!(server.addr.port(), 8000);
///
/// let mut protocol = server.build_protocol("10.0.0.1:5555".parse().unwrap()).unwrap();
/// let tr = StringTransport::new();
/// tr.connect(&mut *protocol);
/// tr.feed(&mut *protocol, b"ping");
/// assert_eq!(tr.value(), b"ping");
/// ```
#[derive(Clone)]
pub struct MemoryReactor {
    inner: Rc<MemoryInner>,
}

impl Default for MemoryReactor {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for MemoryReactor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryReactor")
            .field("seconds", &self.seconds())
            .field("tcp_servers", &self.inner.servers.borrow())
            .field("tcp_clients", &self.inner.clients.borrow())
            .finish()
    }
}

impl MemoryReactor {
    /// An empty record with its clock at 0.
    pub fn new() -> Self {
        MemoryReactor {
            inner: Rc::new(MemoryInner {
                clock: Clock::new(),
                servers: RefCell::new(Vec::new()),
                clients: RefCell::new(Vec::new()),
                next_port: Cell::new(30000),
            }),
        }
    }

    /// Records a `listen_tcp` call (same arguments as
    /// [`Reactor::listen_tcp`](crate::Reactor::listen_tcp)). A port-0
    /// request gets a made-up port number. Address errors are reported as
    /// the reactor would; nothing else can fail.
    pub fn listen_tcp(
        &self,
        addr: impl ToListenAddr,
        factory: impl IntoFactory,
        backlog: u32,
    ) -> Result<MemoryPort, Error> {
        let mut addr = addr.to_listen_addr()?;
        if addr.port() == 0 {
            let port = self.inner.next_port.get();
            self.inner.next_port.set(port.checked_add(1).unwrap_or(30000));
            addr.set_port(port);
        }
        self.inner.servers.borrow_mut().push(TcpServer { addr, backlog, factory: factory.into_shared() });
        Ok(MemoryPort { addr, listening: Rc::new(Cell::new(true)) })
    }

    /// Records a `connect_tcp` call (same arguments as
    /// [`Reactor::connect_tcp`](crate::Reactor::connect_tcp)); nothing is
    /// called on the factory.
    pub fn connect_tcp(
        &self,
        host: &str,
        port: u16,
        factory: impl ClientFactory + 'static,
        timeout: Option<Duration>,
        bind: Option<SocketAddr>,
    ) -> MemoryConnector {
        let connector = MemoryConnector {
            host: host.to_string(),
            port,
            stopped_connecting: Rc::new(Cell::new(false)),
            disconnected: Rc::new(Cell::new(false)),
        };
        self.inner.clients.borrow_mut().push(TcpClient {
            host: host.to_string(),
            port,
            timeout,
            bind,
            connector: connector.clone(),
            factory: Rc::new(RefCell::new(Box::new(factory))),
        });
        connector
    }

    /// Every `listen_tcp` call so far, in order.
    pub fn tcp_servers(&self) -> Vec<TcpServer> {
        self.inner.servers.borrow().clone()
    }

    /// Every `connect_tcp` call so far, in order.
    pub fn tcp_clients(&self) -> Vec<TcpClient> {
        self.inner.clients.borrow().clone()
    }

    /// The clock behind this reactor's time.
    pub fn clock(&self) -> &Clock {
        &self.inner.clock
    }

    /// The current time in seconds (starts at 0).
    pub fn seconds(&self) -> f64 {
        self.inner.clock.seconds()
    }

    /// Schedules `f` after `delay` of this reactor's (manual) time.
    pub fn call_later<F, R>(&self, delay: Duration, f: F) -> DelayedCall
    where
        F: FnOnce() -> R + 'static,
        R: CallbackResult + 'static,
    {
        self.inner.clock.call_later(delay, f)
    }

    /// Moves time forward and runs what is due (see [`Clock::advance`]).
    pub fn advance(&self, by: Duration) {
        self.inner.clock.advance(by)
    }

    /// Every pending delayed call.
    pub fn get_delayed_calls(&self) -> Vec<DelayedCall> {
        self.inner.clock.get_delayed_calls()
    }
}

impl ReactorTime for MemoryReactor {
    fn seconds(&self) -> f64 {
        MemoryReactor::seconds(self)
    }
    fn schedule(&self, delay: Duration, f: Box<dyn FnOnce()>) -> DelayedCall {
        self.call_later(delay, f)
    }
    fn pending_calls(&self) -> Vec<DelayedCall> {
        self.get_delayed_calls()
    }
}

/// Lets clock-taking constructors take a `MemoryReactor` directly.
impl From<MemoryReactor> for Rc<dyn ReactorTime> {
    fn from(reactor: MemoryReactor) -> Self {
        Rc::new(reactor)
    }
}
