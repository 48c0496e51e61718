//! Protocols and the factories that build them, as in Twisted: one
//! protocol object per connection, told when the connection is made, when
//! data arrives and when it is lost.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;

use crate::error::Failure;
use crate::tcp::Connector;
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

    /// The connection is gone: `Error::ConnectionDone` for a clean close,
    /// `ConnectionLost` or `ConnectionAborted` otherwise.
    fn connection_lost(&mut self, reason: Failure) {
        let _ = reason;
    }

    /// Return `Some(self)` to take part in half-close (see [`HalfCloseable`]).
    fn as_half_closeable(&mut self) -> Option<&mut dyn HalfCloseable> {
        None
    }
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
    fn build_protocol(&mut self, addr: SocketAddr) -> Option<Box<dyn Protocol>>;

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
    fn build_protocol(&mut self, _addr: SocketAddr) -> Option<Box<dyn Protocol>> {
        Some(Box::new(self()))
    }
}

/// A factory for outgoing connections, told how each attempt went. To
/// reconnect, call `connector.connect()` from `client_connection_failed`
/// or `client_connection_lost`.
pub trait ClientFactory: Factory {
    /// An attempt started.
    fn started_connecting(&mut self, connector: &Connector) {
        let _ = connector;
    }

    /// The attempt failed (refused, timed out, DNS lookup failed, ...).
    fn client_connection_failed(&mut self, connector: &Connector, reason: Failure) {
        let _ = (connector, reason);
    }

    /// An established connection ended (after the protocol's own
    /// `connection_lost`).
    fn client_connection_lost(&mut self, connector: &Connector, reason: Failure) {
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

    pub(crate) fn build(&self, addr: SocketAddr) -> Option<Box<dyn Protocol>> {
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
