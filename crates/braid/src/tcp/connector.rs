//! Outgoing TCP connections: the `Connector` handle and one attempt.
//!
//! An attempt never calls back synchronously: `connect` returns at once and
//! the work starts on the next iteration. Host names are resolved on the
//! reactor's thread pool (getaddrinfo blocks), so the loop never blocks.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::rc::{Rc, Weak};

use std::time::Duration;

use rustix::io::Errno;
use rustix::net::{AddressFamily, SocketFlags, SocketType};

use super::connection::Connection;
use crate::error::{Error, Failure};
use crate::protocol::ClientFactory;
use crate::reactor::{DelayedCall, FileDescriptor, Reactor};
use crate::transport::TransportOps;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Disconnected,
    Connecting,
    Connected,
}

struct Inner {
    reactor: Reactor,
    host: String,
    port: u16,
    timeout: Option<Duration>,
    bind: Option<SocketAddr>,
    factory: RefCell<Box<dyn ClientFactory>>,
    factory_started: Cell<bool>,
    state: Cell<State>,
    attempt: RefCell<Option<Rc<Attempt>>>,
    connection: RefCell<Weak<Connection>>,
}

/// A handle to an outgoing connection and its factory: stop an attempt,
/// drop the connection, or connect again. Clones share the same connector.
#[derive(Clone)]
pub struct Connector {
    inner: Rc<Inner>,
}

impl fmt::Debug for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connector")
            .field("host", &self.inner.host)
            .field("port", &self.inner.port)
            .field("state", &self.inner.state.get())
            .finish()
    }
}

impl Connector {
    pub(crate) fn new(
        reactor: &Reactor,
        host: &str,
        port: u16,
        factory: Box<dyn ClientFactory>,
        timeout: Option<Duration>,
        bind: Option<SocketAddr>,
    ) -> Connector {
        Connector {
            inner: Rc::new(Inner {
                reactor: reactor.clone(),
                host: host.to_string(),
                port,
                timeout,
                bind,
                factory: RefCell::new(factory),
                factory_started: Cell::new(false),
                state: Cell::new(State::Disconnected),
                attempt: RefCell::new(None),
                connection: RefCell::new(Weak::new()),
            }),
        }
    }

    /// The host and port this connector dials.
    pub fn destination(&self) -> (String, u16) {
        (self.inner.host.clone(), self.inner.port)
    }

    /// True while an attempt is under way.
    pub fn is_connecting(&self) -> bool {
        self.inner.state.get() == State::Connecting
    }

    /// True while connected.
    pub fn is_connected(&self) -> bool {
        self.inner.state.get() == State::Connected
    }

    /// Starts an attempt (again). Fails with `AlreadyConnecting` unless
    /// disconnected. The factory's `started_connecting` runs now, or on the
    /// next iteration if the factory is busy (called from one of its own
    /// notifications).
    pub fn connect(&self) -> Result<(), Error> {
        let inner = &self.inner;
        if inner.state.get() != State::Disconnected {
            return Err(Error::AlreadyConnecting);
        }
        inner.state.set(State::Connecting);
        let attempt = Rc::new(Attempt {
            connector: RefCell::new(Some(inner.clone())),
            sock: RefCell::new(None),
            timer: RefCell::new(None),
        });
        *inner.attempt.borrow_mut() = Some(attempt.clone());
        match inner.factory.try_borrow_mut() {
            Ok(mut f) => {
                if !inner.factory_started.replace(true) {
                    f.start_factory();
                }
                f.started_connecting(self);
            }
            Err(_) => {
                let me = self.clone();
                inner.reactor.call_later(Duration::ZERO, move || {
                    let mut f = me.inner.factory.borrow_mut();
                    if !me.inner.factory_started.replace(true) {
                        f.start_factory();
                    }
                    f.started_connecting(&me);
                });
            }
        }
        if let Some(t) = inner.timeout {
            let a = Rc::downgrade(&attempt);
            let timer = inner.reactor.call_later(t, move || {
                if let Some(a) = a.upgrade() {
                    a.fail(Failure::new(Error::TimedOut).context("connecting"));
                }
            });
            *attempt.timer.borrow_mut() = Some(timer);
        }
        let a = attempt.clone();
        inner.reactor.call_later(Duration::ZERO, move || a.begin());
        Ok(())
    }

    /// Abandons the attempt under way; the factory hears
    /// `client_connection_failed(Cancelled)`. `NotConnecting` otherwise.
    pub fn stop_connecting(&self) -> Result<(), Error> {
        if self.inner.state.get() != State::Connecting {
            return Err(Error::NotConnecting);
        }
        let attempt = self.inner.attempt.borrow().clone();
        if let Some(a) = attempt {
            a.fail(Failure::new(Error::Cancelled).context("stop_connecting"));
        }
        Ok(())
    }

    /// Stops an attempt, or closes the connection if connected.
    pub fn disconnect(&self) {
        match self.inner.state.get() {
            State::Connecting => {
                let _ = self.stop_connecting();
            }
            State::Connected => {
                if let Some(c) = self.inner.connection.borrow().upgrade() {
                    c.lose_connection();
                }
            }
            State::Disconnected => {}
        }
    }

    /// Calls the factory now, or on the next iteration if it is busy (the
    /// notification came from inside one of its own callbacks), then stops
    /// the factory if nobody reconnected.
    fn notify(&self, f: impl FnOnce(&mut dyn ClientFactory, &Connector) + 'static) {
        let deliver = move |c: &Connector| {
            f(&mut **c.inner.factory.borrow_mut(), c);
            if c.inner.state.get() == State::Disconnected && c.inner.factory_started.replace(false) {
                c.inner.factory.borrow_mut().stop_factory();
            }
        };
        if self.inner.factory.try_borrow_mut().is_ok() {
            deliver(self);
        } else {
            let me = self.clone();
            self.inner.reactor.call_later(Duration::ZERO, move || deliver(&me));
        }
    }

    fn connection_failed(&self, reason: Failure) {
        self.inner.state.set(State::Disconnected);
        self.inner.attempt.borrow_mut().take();
        self.notify(move |f, c| f.client_connection_failed(c, reason));
    }

    fn connection_lost(&self, reason: Failure) {
        self.inner.state.set(State::Disconnected);
        *self.inner.connection.borrow_mut() = Weak::new();
        self.notify(move |f, c| f.client_connection_lost(c, reason));
    }
}

/// One connection attempt: resolve, connect, wait for the outcome. It
/// holds its connector strongly, so a connector whose handle the caller
/// dropped still completes; the cycle ends when the attempt does.
struct Attempt {
    connector: RefCell<Option<Rc<Inner>>>,
    sock: RefCell<Option<OwnedFd>>,
    timer: RefCell<Option<DelayedCall>>,
}

fn connect_error(e: Errno, addr: SocketAddr) -> Failure {
    match e {
        Errno::CONNREFUSED => Failure::new(Error::ConnectionRefused),
        Errno::TIMEDOUT => Failure::new(Error::TimedOut),
        other => Failure::new(Error::io(format!("connecting to {addr}"), other.into())),
    }
}

impl Attempt {
    fn connector(&self) -> Option<Connector> {
        self.connector.borrow().clone().map(|inner| Connector { inner })
    }

    /// True if this is still the connector's live attempt.
    fn current(self: &Rc<Self>) -> Option<Connector> {
        let c = self.connector()?;
        let live = c.inner.attempt.borrow().as_ref().is_some_and(|a| Rc::ptr_eq(a, self));
        (live && c.inner.state.get() == State::Connecting).then_some(c)
    }

    fn begin(self: Rc<Self>) {
        let Some(c) = self.current() else { return };
        let (host, port) = (c.inner.host.clone(), c.inner.port);
        if let Ok(ip) = host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
            self.connect_to(SocketAddr::new(ip, port));
            return;
        }
        let resolved = c.inner.reactor.resolver().resolve(&c.inner.reactor, &host, port);
        let me = self.clone();
        resolved.add_both(move |result| {
            match result.as_deref().map(<[SocketAddr]>::first) {
                Ok(Some(addr)) => me.connect_to(*addr),
                // A custom resolver may answer with nothing at all.
                Ok(None) => {
                    me.fail(Failure::new(Error::DnsLookupFailed { host, reason: "no addresses".into() }))
                }
                Err(f) => me.fail(f.clone()),
            }
            Ok(Vec::new())
        });
    }

    fn connect_to(self: &Rc<Self>, addr: SocketAddr) {
        let Some(c) = self.current() else { return };
        let family = if addr.is_ipv4() { AddressFamily::INET } else { AddressFamily::INET6 };
        let sock = match rustix::net::socket_with(
            family,
            SocketType::STREAM,
            SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
            None,
        ) {
            Ok(s) => s,
            Err(e) => return self.fail(Failure::new(Error::io("creating a TCP socket", e.into()))),
        };
        if let Some(bind) = c.inner.bind {
            if let Err(e) = rustix::net::bind(&sock, &bind) {
                return self.fail(Failure::new(Error::io(format!("binding to {bind}"), e.into())));
            }
        }
        match rustix::net::connect(&sock, &addr) {
            Ok(()) => {
                *self.sock.borrow_mut() = Some(sock);
                self.connected(addr);
            }
            Err(Errno::INPROGRESS) | Err(Errno::INTR) => {
                *self.sock.borrow_mut() = Some(sock);
                if let Err(e) = c.inner.reactor.add_writer(self.clone()) {
                    self.fail(Failure::new(e));
                }
            }
            Err(e) => self.fail(connect_error(e, addr)),
        }
    }

    fn connected(self: &Rc<Self>, addr: SocketAddr) {
        let Some(c) = self.current() else { return };
        if let Some(t) = self.timer.borrow_mut().take() {
            let _ = t.cancel();
        }
        let Some(sock) = self.sock.borrow_mut().take() else { return };
        c.inner.attempt.borrow_mut().take();
        let protocol = c.inner.factory.borrow_mut().build_protocol(addr);
        let Some(protocol) = protocol else {
            drop(sock);
            c.connection_failed(Failure::msg("the factory refused to build a protocol"));
            return;
        };
        c.inner.state.set(State::Connected);
        let conn = Connection::new(&c.inner.reactor, sock, Some(addr));
        *c.inner.connection.borrow_mut() = Rc::downgrade(&conn);
        let inner = c.inner.clone();
        conn.set_on_lost(Box::new(move |reason| Connector { inner }.connection_lost(reason)));
        self.connector.borrow_mut().take();
        if let Err((e, protocol)) = conn.start(protocol) {
            // Never made, so never told it was lost; the factory hears that
            // the attempt failed instead.
            drop(protocol);
            *c.inner.connection.borrow_mut() = Weak::new();
            c.connection_failed(Failure::new(e).context(format!("connecting to {addr}")));
        }
    }

    fn fail(self: &Rc<Self>, reason: Failure) {
        let Some(c) = self.current() else { return };
        if let Some(t) = self.timer.borrow_mut().take() {
            let _ = t.cancel();
        }
        let me: Rc<Attempt> = self.clone();
        c.inner.reactor.remove_writer(&me);
        self.sock.borrow_mut().take();
        self.connector.borrow_mut().take();
        c.connection_failed(reason);
    }
}

impl FileDescriptor for Attempt {
    fn fileno(&self) -> RawFd {
        self.sock.borrow().as_ref().map_or(-1, |s| s.as_raw_fd())
    }

    fn do_write(&self) -> Result<(), Failure> {
        let Some(c) = self.connector() else { return Ok(()) };
        let Some(me) = c.inner.attempt.borrow().clone() else { return Ok(()) };
        let outcome = {
            let sock = self.sock.borrow();
            let Some(sock) = sock.as_ref() else { return Ok(()) };
            let err = rustix::net::sockopt::socket_error(sock);
            let peer =
                rustix::net::getpeername(sock).ok().flatten().and_then(|a| SocketAddr::try_from(a).ok());
            (err, peer)
        };
        c.inner.reactor.remove_writer(&me);
        let addr = SocketAddr::new(IpAddr::from([0, 0, 0, 0]), c.inner.port);
        match outcome {
            (Ok(Ok(())), Some(peer)) => me.connected(peer),
            (Ok(Ok(())), None) => me.fail(Failure::new(Error::ConnectionRefused)),
            (Ok(Err(e)), _) | (Err(e), _) => me.fail(connect_error(e, addr)),
        }
        Ok(())
    }

    fn connection_lost(&self, reason: Failure) {
        // A refused connect polls as HUP|ERR without OUT; the socket's
        // pending error says what really happened. Otherwise: shutdown.
        let pending = self.sock.borrow().as_ref().and_then(|s| match rustix::net::sockopt::socket_error(s) {
            Ok(Err(e)) => Some(e),
            _ => None,
        });
        let reason = match (pending, self.connector()) {
            (Some(e), Some(c)) => connect_error(e, SocketAddr::new(IpAddr::from([0, 0, 0, 0]), c.inner.port)),
            _ => reason,
        };
        if let Some(c) = self.connector() {
            let me = c.inner.attempt.borrow().clone();
            if let Some(me) = me {
                me.fail(reason);
            }
        }
    }

    fn log_prefix(&self) -> String {
        match self.connector() {
            Some(c) => format!("TCP connect to {}:{}", c.inner.host, c.inner.port),
            None => "TCP connect".to_string(),
        }
    }
}
