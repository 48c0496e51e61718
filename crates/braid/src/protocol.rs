//! Protocols and the factories that build them, as in Twisted: one
//! protocol object per connection, told when the connection is made, when
//! data arrives and when it is lost.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use crate::error::{Error, Failure};
use crate::reactor::{DelayedCall, ReactorTime};
use crate::stream::Address;
use crate::transport::Transport;

/// One connection's behaviour. The reactor calls these from the loop and
/// never re-entrantly: while one of them runs, no other is called on the
/// same protocol. `connection_lost` comes exactly once, after the last
/// `data_received`.
pub trait Protocol {
    /// The connection is up; keep `transport` to write and close.
    fn connection_made(&mut self, transport: Transport) {
        let _ = transport;
    }

    /// Bytes arrived. The slice is only valid during the call.
    fn data_received(&mut self, data: &[u8]);

    /// Bytes arrived, in a buffer this call may change: the reactor's own
    /// read buffer, which it reuses once the call returns. The default
    /// hands them to [`Protocol::data_received`]. A protocol that rewrites
    /// what it reads where it lies (the TLS layer decrypts records in
    /// place) overrides this to save a copy; one that wraps another
    /// protocol passes it on.
    fn data_received_mut(&mut self, data: &mut [u8]) {
        self.data_received(data)
    }

    /// The connection is gone: `Error::ConnectionDone` for a clean close,
    /// `ConnectionLost` or `ConnectionAborted` otherwise.
    fn connection_lost(&mut self, reason: Failure) {
        let _ = reason;
    }

    /// A TLS handshake on this connection finished (Twisted's
    /// `IHandshakeListener.handshakeCompleted`): the peer's certificate,
    /// ALPN and SNI are known now (`transport.tls()`). Never called on a
    /// connection without TLS.
    fn handshake_completed(&mut self) {}

    /// Return `Some(self)` to take part in half-close (see [`HalfCloseable`]).
    fn as_half_closeable(&mut self) -> Option<&mut dyn HalfCloseable> {
        None
    }

    /// Return `Some(self)` to accept descriptors a UNIX socket peer sends
    /// (see [`FileDescriptorReceiver`]); without it they are closed.
    fn as_fd_receiver(&mut self) -> Option<&mut dyn FileDescriptorReceiver> {
        None
    }
}

/// The optional descriptor-passing extension of a protocol (Twisted's
/// `IFileDescriptorReceiver`), for UNIX socket connections.
pub trait FileDescriptorReceiver {
    /// The peer sent `fd` (`SCM_RIGHTS`). It arrives before the bytes that
    /// carried it are given to `data_received`. It is yours: dropping it
    /// closes it.
    fn file_descriptor_received(&mut self, fd: std::os::fd::OwnedFd);
}

/// The optional half-close extension of a protocol (Twisted's
/// `IHalfCloseableProtocol`). Without it, the peer closing its write side
/// closes the whole connection.
pub trait HalfCloseable {
    /// The peer will send no more data; the connection stays open for
    /// writing until you call `lose_connection`.
    fn read_connection_lost(&mut self);

    /// Our write side was shut down after `lose_write_connection`.
    fn write_connection_lost(&mut self) {}
}

/// Builds protocols for a listening port: one per accepted connection.
///
/// Any `FnMut() -> P` closure is a factory for the simple case:
/// `reactor.listen_tcp(8000, || Echo::default(), 50)`.
pub trait Factory {
    /// A protocol for a connection from `addr`, or `None` to refuse it
    /// (the connection is closed at once).
    fn build_protocol(&mut self, addr: &Address) -> Option<Box<dyn Protocol>>;

    /// Called before the first port using this factory starts listening.
    fn start_factory(&mut self) {}

    /// Called after the last port using this factory stopped listening.
    fn stop_factory(&mut self) {}
}

impl<F, P> Factory for F
where
    F: FnMut() -> P,
    P: Protocol + 'static,
{
    fn build_protocol(&mut self, _addr: &Address) -> Option<Box<dyn Protocol>> {
        Some(Box::new(self()))
    }
}

/// An outgoing connection and its attempts (Twisted's `IConnector`): what
/// a [`ClientFactory`] is told about, whatever the kind of stream
/// (each connecting call returns its own kind of connector).
pub trait Connector {
    /// Starts an attempt (again): `AlreadyConnecting` unless disconnected.
    fn connect(&self) -> Result<(), Error>;
    /// Abandons the attempt under way (`NotConnecting` otherwise); the
    /// factory hears `client_connection_failed(Cancelled)`.
    fn stop_connecting(&self) -> Result<(), Error>;
    /// Stops an attempt, or closes the connection if connected.
    fn disconnect(&self);
    /// Where it connects: an IP address and port, a UNIX socket, or a
    /// host name not resolved yet.
    fn destination(&self) -> Address;
    /// True while an attempt is under way.
    fn is_connecting(&self) -> bool;
    /// True while connected.
    fn is_connected(&self) -> bool;
    /// A handle to keep (to reconnect later, say); it drives this same
    /// connector.
    fn handle(&self) -> Rc<dyn Connector>;
}

/// A factory for outgoing connections, told how each attempt went. To
/// reconnect, call `connector.connect()` from `client_connection_failed`
/// or `client_connection_lost`.
pub trait ClientFactory: Factory {
    /// An attempt started.
    fn started_connecting(&mut self, connector: &dyn Connector) {
        let _ = connector;
    }

    /// The attempt failed (refused, timed out, DNS lookup failed, ...).
    fn client_connection_failed(&mut self, connector: &dyn Connector, reason: Failure) {
        let _ = (connector, reason);
    }

    /// An established connection ended (after the protocol's own
    /// `connection_lost`).
    fn client_connection_lost(&mut self, connector: &dyn Connector, reason: Failure) {
        let _ = (connector, reason);
    }
}

/// Closures make client factories too, with the default (do-nothing)
/// notifications.
impl<F, P> ClientFactory for F
where
    F: FnMut() -> P,
    P: Protocol + 'static,
{
}

/// A factory shared between several ports (or connectors), so
/// `start_factory`/`stop_factory` are counted across all of them: started
/// when the first port starts, stopped when the last one stops.
pub struct SharedFactory<F: ?Sized> {
    inner: Rc<SharedInner<F>>,
}

struct SharedInner<F: ?Sized> {
    users: std::cell::Cell<usize>,
    factory: RefCell<F>,
}

impl<F: ?Sized> Clone for SharedFactory<F> {
    fn clone(&self) -> Self {
        SharedFactory { inner: self.inner.clone() }
    }
}

impl<F> SharedFactory<F> {
    /// Wraps a factory for sharing.
    pub fn new(factory: F) -> Self {
        SharedFactory {
            inner: Rc::new(SharedInner { users: std::cell::Cell::new(0), factory: RefCell::new(factory) }),
        }
    }
}

impl<F: ?Sized> SharedFactory<F> {
    /// Runs `f` with the factory borrowed mutably.
    pub fn with<R>(&self, f: impl FnOnce(&mut F) -> R) -> R {
        f(&mut self.inner.factory.borrow_mut())
    }

    /// How many ports or connectors use the factory now.
    pub fn users(&self) -> usize {
        self.inner.users.get()
    }
}

impl<F: Factory + ?Sized> SharedFactory<F> {
    /// Counts one more user; the first starts the factory.
    pub(crate) fn do_start(&self) {
        let n = self.inner.users.get();
        if n == 0 {
            self.inner.factory.borrow_mut().start_factory();
        }
        self.inner.users.set(n + 1);
    }

    /// Counts one user less; the last stops the factory.
    pub(crate) fn do_stop(&self) {
        let n = self.inner.users.get();
        if n == 0 {
            return;
        }
        self.inner.users.set(n - 1);
        if n == 1 {
            self.inner.factory.borrow_mut().stop_factory();
        }
    }

    pub(crate) fn build(&self, addr: &Address) -> Option<Box<dyn Protocol>> {
        self.inner.factory.borrow_mut().build_protocol(addr)
    }
}

/// Anything `listen_tcp` accepts as a factory: a factory value (or closure)
/// or a [`SharedFactory`] already shared with other ports.
pub trait IntoFactory {
    /// Wraps the factory for the port.
    fn into_shared(self) -> SharedFactory<dyn Factory>;
}

impl<F: Factory + 'static> IntoFactory for F {
    fn into_shared(self) -> SharedFactory<dyn Factory> {
        let inner: Rc<SharedInner<dyn Factory>> =
            Rc::new(SharedInner { users: std::cell::Cell::new(0), factory: RefCell::new(self) });
        SharedFactory { inner }
    }
}

impl IntoFactory for SharedFactory<dyn Factory> {
    fn into_shared(self) -> SharedFactory<dyn Factory> {
        self
    }
}

impl<F: Factory + 'static> IntoFactory for SharedFactory<F> {
    fn into_shared(self) -> SharedFactory<dyn Factory> {
        self.erase()
    }
}

impl<F: Factory + 'static> SharedFactory<F> {
    /// The same shared factory, with its type erased.
    pub fn erase(&self) -> SharedFactory<dyn Factory> {
        let inner: Rc<SharedInner<dyn Factory>> = self.inner.clone();
        SharedFactory { inner }
    }
}

/// Backoff settings and state of a [`ReconnectingClientFactory`].
struct Backoff {
    initial_delay: Duration,
    max_delay: Duration,
    factor: f64,
    jitter: f64,
    max_retries: Option<u32>,
    delay: Duration,
    retries: u32,
    continue_trying: bool,
    pending: Option<DelayedCall>,
    connector: Option<Rc<dyn Connector>>,
    rng: u64,
}

impl Backoff {
    /// A uniform number in [0, 1) from a xorshift generator (jitter needs
    /// spread, not cryptographic quality).
    fn uniform(&mut self) -> f64 {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        (x >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A normal variate around 0 with standard deviation 1 (Box-Muller).
    fn gaussian(&mut self) -> f64 {
        let u1 = self.uniform().max(f64::MIN_POSITIVE);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// The next delay: grown by `factor`, capped at `max_delay`, then
    /// spread by `jitter` (a normal variate with that relative deviation),
    /// as Twisted does; never negative, never past the cap.
    fn next_delay(&mut self) -> Duration {
        let grown = (self.delay.as_secs_f64() * self.factor).min(self.max_delay.as_secs_f64());
        let jittered = if self.jitter > 0.0 { grown + grown * self.jitter * self.gaussian() } else { grown };
        let d = Duration::from_secs_f64(jittered.clamp(0.0, self.max_delay.as_secs_f64()));
        self.delay = Duration::from_secs_f64(grown);
        d
    }
}

/// A client factory that reconnects after failures and lost connections,
/// waiting longer each time (Twisted's `ReconnectingClientFactory`):
/// delays start at `initial_delay`, grow by `factor` (e), are capped at
/// `max_delay` (one hour) and spread by `jitter` (0.1196), for up to
/// `max_retries` attempts (unlimited by default).
///
/// The factory is moved into `connect_tcp`; keep a [`ReconnectHandle`]
/// (from [`ReconnectingClientFactory::handle`]) to call `reset_delay` once
/// a connection works, or `stop_trying`.
pub struct ReconnectingClientFactory<F> {
    factory: F,
    clock: Rc<dyn ReactorTime>,
    state: Rc<RefCell<Backoff>>,
}

/// Controls a [`ReconnectingClientFactory`] after it was handed over.
#[derive(Clone)]
pub struct ReconnectHandle {
    state: Rc<RefCell<Backoff>>,
}

impl<F: Factory> ReconnectingClientFactory<F> {
    /// Wraps `factory`, scheduling retries on `clock` (the reactor, or a
    /// `testing::Clock` in tests).
    pub fn new(clock: Rc<dyn ReactorTime>, factory: F) -> Self {
        let seed = (clock.seconds().to_bits() ^ 0x9E37_79B9_7F4A_7C15) | 1;
        let initial = Duration::from_secs(1);
        ReconnectingClientFactory {
            factory,
            clock,
            state: Rc::new(RefCell::new(Backoff {
                initial_delay: initial,
                max_delay: Duration::from_secs(3600),
                factor: std::f64::consts::E,
                jitter: 0.119_626_565_582_117_36,
                max_retries: None,
                delay: initial,
                retries: 0,
                continue_trying: true,
                pending: None,
                connector: None,
                rng: seed,
            })),
        }
    }

    /// Sets the first delay (and the delay `reset_delay` returns to).
    pub fn initial_delay(self, d: Duration) -> Self {
        {
            let mut s = self.state.borrow_mut();
            s.initial_delay = d;
            s.delay = d;
        }
        self
    }

    /// Caps the delay.
    pub fn max_delay(self, d: Duration) -> Self {
        self.state.borrow_mut().max_delay = d;
        self
    }

    /// Sets the growth factor per retry (at least 1).
    pub fn factor(self, f: f64) -> Self {
        self.state.borrow_mut().factor = if f.is_finite() { f.max(1.0) } else { 1.0 };
        self
    }

    /// Sets the relative spread of each delay (0 for none).
    pub fn jitter(self, j: f64) -> Self {
        self.state.borrow_mut().jitter = if j.is_finite() { j.max(0.0) } else { 0.0 };
        self
    }

    /// Gives up after `n` retries.
    pub fn max_retries(self, n: u32) -> Self {
        self.state.borrow_mut().max_retries = Some(n);
        self
    }

    /// A handle to control retrying later.
    pub fn handle(&self) -> ReconnectHandle {
        ReconnectHandle { state: self.state.clone() }
    }

    fn retry(&mut self, connector: &dyn Connector) {
        let mut s = self.state.borrow_mut();
        if !s.continue_trying {
            return;
        }
        s.connector = Some(connector.handle());
        s.retries += 1;
        if s.max_retries.is_some_and(|max| s.retries > max) {
            tracing::info!(target: "braid", "abandoning {:?} after {} retries", connector.destination(), s.retries - 1);
            return;
        }
        let delay = s.next_delay();
        tracing::info!(target: "braid", "will retry {:?} in {delay:?}", connector.destination());
        let c = connector.handle();
        let state = Rc::downgrade(&self.state);
        let call = self.clock.schedule(
            delay,
            Box::new(move || {
                if let Some(state) = state.upgrade() {
                    state.borrow_mut().pending = None;
                }
                // Already connecting again (e.g. by hand): nothing to do.
                let _ = c.connect();
            }),
        );
        s.pending = Some(call);
    }
}

impl ReconnectHandle {
    /// Back to the initial delay and zero retries: call it once a
    /// connection works.
    pub fn reset_delay(&self) {
        let mut s = self.state.borrow_mut();
        s.delay = s.initial_delay;
        s.retries = 0;
    }

    /// Stops reconnecting: cancels a scheduled retry and an attempt in
    /// progress.
    pub fn stop_trying(&self) {
        let (pending, connector) = {
            let mut s = self.state.borrow_mut();
            s.continue_trying = false;
            (s.pending.take(), s.connector.clone())
        };
        if let Some(call) = pending {
            let _ = call.cancel();
        }
        if let Some(c) = connector {
            if c.is_connecting() {
                let _ = c.stop_connecting();
            }
        }
    }

    /// Retries since the last reset.
    pub fn retries(&self) -> u32 {
        self.state.borrow().retries
    }

    /// The current (un-jittered) delay.
    pub fn delay(&self) -> Duration {
        self.state.borrow().delay
    }

    /// True while a retry is scheduled.
    pub fn retry_pending(&self) -> bool {
        self.state.borrow().pending.as_ref().is_some_and(|c| c.active())
    }
}

impl<F: Factory> Factory for ReconnectingClientFactory<F> {
    fn build_protocol(&mut self, addr: &Address) -> Option<Box<dyn Protocol>> {
        self.factory.build_protocol(addr)
    }
    fn start_factory(&mut self) {
        self.factory.start_factory()
    }
    fn stop_factory(&mut self) {
        self.factory.stop_factory()
    }
}

impl<F: Factory> ClientFactory for ReconnectingClientFactory<F> {
    fn started_connecting(&mut self, connector: &dyn Connector) {
        self.state.borrow_mut().connector = Some(connector.handle());
    }
    fn client_connection_failed(&mut self, connector: &dyn Connector, reason: Failure) {
        tracing::debug!(target: "braid", "connection to {:?} failed: {reason}", connector.destination());
        self.retry(connector);
    }
    fn client_connection_lost(&mut self, connector: &dyn Connector, reason: Failure) {
        tracing::debug!(target: "braid", "connection to {:?} lost: {reason}", connector.destination());
        self.retry(connector);
    }
}
