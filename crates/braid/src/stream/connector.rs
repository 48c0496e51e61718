//! Outgoing TCP connections: the `StreamConnector` handle and one attempt.
//!
//! An attempt never calls back synchronously: `connect` returns at once and
//! the work starts on the next iteration. Host names go to the reactor's
//! resolver (by default getaddrinfo on the thread pool), so the loop never
//! blocks.
//!
//! Every resolved address is tried, in the resolver's order, staggered as
//! Twisted's `HostnameEndpoint` does: the first dial starts at once; if it
//! has not connected after `ATTEMPT_DELAY` (0.3 s) the next one starts
//! while the first keeps going, and a dial that fails starts the next one
//! at once.
//! The first dial to connect wins; every other one is cancelled (its socket
//! closed, its writer registration removed). The connect timeout bounds the
//! whole attempt, resolution included, and `stop_connecting` cancels every
//! dial; either way the factory hears one `client_connection_failed`.
//!
//! Each dial's error names the address it tried ("connecting to
//! 127.0.0.1:80"). When every address fails, `client_connection_failed`
//! gets the error of the dial that failed last (its kind, e.g.
//! `Error::ConnectionRefused`, is what `Failure::braid_error` shows), with
//! the earlier dials' errors added to its text as context.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::rc::{Rc, Weak};

use std::time::Duration;

use rustix::io::Errno;
use rustix::net::{SocketFlags, SocketType};

use crate::error::{Error, Failure};
use crate::protocol::Protocol;
use crate::protocol::{ClientFactory, Connector};
use crate::reactor::{DelayedCall, FileDescriptor, Reactor, WeakReactor};
use crate::stream::connection::Connection;
use crate::stream::kind::{Kind, Tcp};
use crate::stream::Address;
use crate::transport::TransportOps;
use crate::unix::Unix;

/// How long a dial may go unanswered before the next address is tried
/// alongside it (Twisted's `HostnameEndpoint` attempt delay).
const ATTEMPT_DELAY: Duration = Duration::from_millis(300);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Disconnected,
    Connecting,
    Connected,
}

struct Inner {
    /// Weak: a connector (and the connection that tells it when it ends)
    /// must not keep the reactor alive.
    reactor: WeakReactor,
    host: String,
    port: u16,
    /// A destination that needs no resolving (a UNIX socket), dialled as
    /// it is; `None` for TCP, whose host goes through the resolver.
    target: Option<Address>,
    timeout: Option<Duration>,
    bind: Option<SocketAddr>,
    factory: RefCell<Box<dyn ClientFactory>>,
    factory_started: Cell<bool>,
    state: Cell<State>,
    attempt: RefCell<Option<Rc<Attempt>>>,
    connection: RefCell<Weak<dyn TransportOps>>,
}

/// A handle to an outgoing connection and its factory: stop an attempt,
/// drop the connection, or connect again. Clones share the same connector.
#[derive(Clone)]
pub struct StreamConnector {
    inner: Rc<Inner>,
}

impl fmt::Debug for StreamConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamConnector")
            .field("host", &self.inner.host)
            .field("port", &self.inner.port)
            .field("state", &self.inner.state.get())
            .finish()
    }
}

impl StreamConnector {
    pub(crate) fn new(
        reactor: &Reactor,
        host: &str,
        port: u16,
        factory: Box<dyn ClientFactory>,
        target: Option<Address>,
        timeout: Option<Duration>,
        bind: Option<SocketAddr>,
    ) -> StreamConnector {
        StreamConnector {
            inner: Rc::new(Inner {
                reactor: reactor.weak(),
                host: host.to_string(),
                port,
                target,
                timeout,
                bind,
                factory: RefCell::new(factory),
                factory_started: Cell::new(false),
                state: Cell::new(State::Disconnected),
                attempt: RefCell::new(None),
                connection: RefCell::new(no_connection()),
            }),
        }
    }

    /// The host and port this connector dials: an IP address if the host
    /// is one, else the name as given.
    pub fn destination(&self) -> Address {
        if let Some(target) = &self.inner.target {
            return target.clone();
        }
        let host = self.inner.host.trim_start_matches('[').trim_end_matches(']');
        match host.parse::<IpAddr>() {
            Ok(ip) => Address::Ip(SocketAddr::new(ip, self.inner.port)),
            Err(_) => Address::hostname(host, self.inner.port),
        }
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
        self.start(None)
    }

    /// Starts an attempt that fails with `reason` on the next iteration
    /// (a destination that cannot be dialled): the factory hears it as it
    /// would any failure, never synchronously.
    pub(crate) fn refuse(&self, reason: Failure) {
        let _ = self.start(Some(reason));
    }

    fn start(&self, refusal: Option<Failure>) -> Result<(), Error> {
        let inner = &self.inner;
        if inner.state.get() != State::Disconnected {
            return Err(Error::AlreadyConnecting);
        }
        let Some(reactor) = inner.reactor.get() else { return Err(Error::ReactorGone) };
        inner.state.set(State::Connecting);
        let attempt = Rc::new(Attempt {
            connector: RefCell::new(Some(inner.clone())),
            timer: RefCell::new(None),
            queue: RefCell::new(VecDeque::new()),
            dials: RefCell::new(Vec::new()),
            stagger: RefCell::new(None),
            failures: RefCell::new(Vec::new()),
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
                reactor.call_later(Duration::ZERO, move || {
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
            let timer = reactor.call_later(t, move || {
                if let Some(a) = a.upgrade() {
                    let what = a.in_flight();
                    a.fail(Failure::new(Error::TimedOut).context(format!("connecting to {what}")));
                }
            });
            *attempt.timer.borrow_mut() = Some(timer);
        }
        let a = attempt.clone();
        reactor.call_later(Duration::ZERO, move || match refusal {
            None => a.begin(),
            Some(reason) => a.fail(reason),
        });
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
    fn notify(&self, f: impl FnOnce(&mut dyn ClientFactory, &StreamConnector) + 'static) {
        let deliver = move |c: &StreamConnector| {
            f(&mut **c.inner.factory.borrow_mut(), c);
            if c.inner.state.get() == State::Disconnected && c.inner.factory_started.replace(false) {
                c.inner.factory.borrow_mut().stop_factory();
            }
        };
        if self.inner.factory.try_borrow_mut().is_ok() {
            deliver(self);
        } else if let Some(reactor) = self.inner.reactor.get() {
            let me = self.clone();
            reactor.call_later(Duration::ZERO, move || deliver(&me));
        }
    }

    fn connection_failed(&self, reason: Failure) {
        self.inner.state.set(State::Disconnected);
        self.inner.attempt.borrow_mut().take();
        self.notify(move |f, c| f.client_connection_failed(c, reason));
    }

    fn connection_lost(&self, reason: Failure) {
        self.inner.state.set(State::Disconnected);
        *self.inner.connection.borrow_mut() = no_connection();
        self.notify(move |f, c| f.client_connection_lost(c, reason));
    }
}

/// One connection attempt: resolve, dial the addresses (staggered), and
/// report the outcome. It holds its connector strongly, so a connector
/// whose handle the caller dropped still completes; the cycle ends when the
/// attempt does.
struct Attempt {
    connector: RefCell<Option<Rc<Inner>>>,
    /// The connect timeout, which bounds the whole attempt.
    timer: RefCell<Option<DelayedCall>>,
    /// Resolved addresses not dialled yet, in the order to try them.
    queue: RefCell<VecDeque<Address>>,
    /// Dials in flight: started, not yet connected or failed.
    dials: RefCell<Vec<Rc<Dial>>>,
    /// Starts the next address when the newest dial stays unanswered.
    stagger: RefCell<Option<DelayedCall>>,
    /// Why each finished dial failed, in the order they failed.
    failures: RefCell<Vec<Failure>>,
}

/// One non-blocking connect to one address, watched for writability.
struct Dial {
    attempt: Weak<Attempt>,
    addr: Address,
    sock: RefCell<Option<OwnedFd>>,
}

fn connect_error(e: Errno, addr: &Address) -> Failure {
    let what = format!("connecting to {addr}");
    match e {
        Errno::CONNREFUSED => Failure::new(Error::ConnectionRefused).context(what),
        Errno::TIMEDOUT => Failure::new(Error::TimedOut).context(what),
        other => Failure::new(Error::io(what, other.into())),
    }
}

/// How a dial started.
enum Started {
    /// The connect is in progress; the dial waits for writability.
    Pending,
    /// The connect completed at once (it may, for loopback).
    Connected(Rc<Dial>),
}

impl Attempt {
    fn connector(&self) -> Option<StreamConnector> {
        self.connector.borrow().clone().map(|inner| StreamConnector { inner })
    }

    /// True if this is still the connector's live attempt.
    fn current(self: &Rc<Self>) -> Option<StreamConnector> {
        let c = self.connector()?;
        let live = c.inner.attempt.borrow().as_ref().is_some_and(|a| Rc::ptr_eq(a, self));
        (live && c.inner.state.get() == State::Connecting).then_some(c)
    }

    /// The addresses being dialled, for a timeout's message; the host and
    /// port while nothing is in flight (still resolving).
    fn in_flight(&self) -> String {
        let dials = self.dials.borrow();
        if dials.is_empty() {
            return self.destination();
        }
        dials.iter().map(|d| d.addr.to_string()).collect::<Vec<_>>().join(", ")
    }

    fn begin(self: Rc<Self>) {
        let Some(c) = self.current() else { return };
        let (host, port) = (c.inner.host.clone(), c.inner.port);
        if let Some(target) = c.inner.target.clone() {
            self.queue.borrow_mut().push_back(target);
            self.start_next();
            return;
        }
        if let Ok(ip) = host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
            self.queue.borrow_mut().push_back(Address::Ip(SocketAddr::new(ip, port)));
            self.start_next();
            return;
        }
        let Some(reactor) = c.inner.reactor.get() else { return };
        let resolved = reactor.resolver().resolve(&reactor, &host, port);
        let me = self.clone();
        resolved.add_both(move |result| {
            match result {
                // A custom resolver may answer with nothing at all.
                Ok(addrs) if addrs.is_empty() => {
                    me.fail(Failure::new(Error::DnsLookupFailed { host, reason: "no addresses".into() }))
                }
                Ok(addrs) => {
                    me.queue.borrow_mut().extend(addrs.iter().copied().map(Address::Ip));
                    me.start_next();
                }
                Err(f) => me.fail(f.clone()),
            }
            Ok(Vec::new())
        });
    }

    /// Dials the next queued address (skipping over addresses that fail at
    /// once); with none left and nothing in flight, the attempt has failed.
    fn start_next(self: &Rc<Self>) {
        if let Some(t) = self.stagger.borrow_mut().take() {
            let _ = t.cancel();
        }
        loop {
            let Some(c) = self.current() else { return };
            let next = self.queue.borrow_mut().pop_front();
            let Some(addr) = next else {
                if self.dials.borrow().is_empty() {
                    self.all_failed();
                }
                return;
            };
            match self.dial(&c, addr) {
                Ok(Started::Pending) => {
                    let reactor = c.inner.reactor.get();
                    if let (false, Some(reactor)) = (self.queue.borrow().is_empty(), reactor) {
                        let a = Rc::downgrade(self);
                        let timer = reactor.call_later(ATTEMPT_DELAY, move || {
                            if let Some(a) = a.upgrade() {
                                a.stagger.borrow_mut().take();
                                a.start_next();
                            }
                        });
                        *self.stagger.borrow_mut() = Some(timer);
                    }
                    return;
                }
                Ok(Started::Connected(dial)) => return self.connected(&dial),
                Err(reason) => self.dial_failed(None, reason),
            }
        }
    }

    fn dial(self: &Rc<Self>, c: &StreamConnector, addr: Address) -> Result<Started, Failure> {
        let what = || format!("connecting to {addr}");
        let (Some(family), Some(to)) = (addr.family(), addr.to_sockaddr()) else {
            return Err(Failure::msg(format!("{addr} is not an address to connect to")));
        };
        let sock = rustix::net::socket_with(
            family,
            SocketType::STREAM,
            SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
            None,
        )
        .map_err(|e| Failure::new(Error::io("creating a socket", e.into())).context(what()))?;
        if let (Some(bind), true) = (c.inner.bind, addr.is_ip()) {
            rustix::net::bind(&sock, &bind).map_err(|e| {
                Failure::new(Error::io(format!("binding to {bind}"), e.into())).context(what())
            })?;
        }
        let immediate = match rustix::net::connect(&sock, &to) {
            Ok(()) => true,
            Err(Errno::INPROGRESS) | Err(Errno::INTR) => false,
            Err(e) => return Err(connect_error(e, &addr)),
        };
        let dial = Rc::new(Dial {
            attempt: Rc::downgrade(self),
            addr: addr.clone(),
            sock: RefCell::new(Some(sock)),
        });
        if immediate {
            return Ok(Started::Connected(dial));
        }
        let reactor = c.inner.reactor.get().ok_or_else(|| Failure::new(Error::ReactorGone))?;
        reactor.add_writer(dial.clone()).map_err(|e| Failure::new(e).context(what()))?;
        self.dials.borrow_mut().push(dial);
        Ok(Started::Pending)
    }

    /// Stops watching a dial and closes its socket.
    fn cancel_dial(c: &StreamConnector, dial: &Rc<Dial>) {
        if let Some(reactor) = c.inner.reactor.get() {
            reactor.remove_writer(dial);
        }
        dial.sock.borrow_mut().take();
    }

    /// Cancels every dial in flight and the stagger and timeout timers.
    fn cancel_all(&self, c: &StreamConnector) {
        for t in [self.timer.borrow_mut().take(), self.stagger.borrow_mut().take()].into_iter().flatten() {
            let _ = t.cancel();
        }
        self.queue.borrow_mut().clear();
        let dials: Vec<Rc<Dial>> = self.dials.borrow_mut().drain(..).collect();
        for d in &dials {
            Attempt::cancel_dial(c, d);
        }
    }

    /// One dial failed: forget it and try the next address at once.
    fn dial_failed(self: &Rc<Self>, dial: Option<&Rc<Dial>>, reason: Failure) {
        if let Some(dial) = dial {
            self.dials.borrow_mut().retain(|d| !Rc::ptr_eq(d, dial));
            if let Some(c) = self.connector() {
                Attempt::cancel_dial(&c, dial);
            }
        }
        if self.current().is_none() {
            return;
        }
        tracing::debug!(target: "braid", "TCP connect to {}: {reason}", self.destination());
        self.failures.borrow_mut().push(reason);
        if dial.is_some() {
            self.start_next();
        }
    }

    /// "host:port" as the caller gave them.
    fn destination(&self) -> String {
        self.connector().map_or_else(String::new, |c| format!("{}:{}", c.inner.host, c.inner.port))
    }

    /// Every address failed: report the last failure, naming the others.
    fn all_failed(self: &Rc<Self>) {
        let mut failures = self.failures.take();
        let Some(mut last) = failures.pop() else {
            return self.fail(Failure::msg("no address to connect to"));
        };
        if !failures.is_empty() {
            let earlier = failures.iter().map(Failure::to_string).collect::<Vec<_>>().join("; ");
            let n = failures.len() + 1;
            let what =
                format!("all {n} addresses of {} failed; before this one: {earlier}", self.destination());
            last = last.context(what);
        }
        self.fail(last);
    }

    fn connected(self: &Rc<Self>, dial: &Rc<Dial>) {
        let Some(c) = self.current() else {
            if let Some(c) = self.connector() {
                Attempt::cancel_dial(&c, dial);
            }
            return;
        };
        let Some(reactor) = c.inner.reactor.get() else { return };
        reactor.remove_writer(dial);
        let sock = dial.sock.borrow_mut().take();
        self.dials.borrow_mut().retain(|d| !Rc::ptr_eq(d, dial));
        self.cancel_all(&c);
        let Some(sock) = sock else { return };
        let addr = dial.addr.clone();
        c.inner.attempt.borrow_mut().take();
        let protocol = c.inner.factory.borrow_mut().build_protocol(&addr);
        let Some(protocol) = protocol else {
            drop(sock);
            self.connector.borrow_mut().take();
            c.connection_failed(Failure::msg("the factory refused to build a protocol"));
            return;
        };
        c.inner.state.set(State::Connected);
        self.connector.borrow_mut().take();
        let started = match &addr {
            Address::Unix(peer) => establish(&c, &reactor, Unix::new(peer.clone()), sock, protocol),
            Address::Ip(peer) => establish(&c, &reactor, Tcp { peer: *peer }, sock, protocol),
            // `dial` refuses names, so none gets here; fail rather than panic.
            Address::Hostname { .. } | Address::Process { .. } | Address::Pipe => Err((
                Error::io("connecting", std::io::Error::other("a host name is not an address")),
                protocol,
            )),
        };
        if let Err((e, protocol)) = started {
            // Never made, so never told it was lost; the factory hears that
            // the attempt failed instead.
            drop(protocol);
            *c.inner.connection.borrow_mut() = no_connection();
            c.connection_failed(Failure::new(e).context(format!("connecting to {addr}")));
        }
    }

    /// The whole attempt failed (timeout, stop_connecting, resolution,
    /// every address): cancel what is in flight and tell the factory once.
    fn fail(self: &Rc<Self>, reason: Failure) {
        let Some(c) = self.current() else { return };
        self.cancel_all(&c);
        self.connector.borrow_mut().take();
        c.connection_failed(reason);
    }
}

impl Dial {
    /// This dial's attempt and its own `Rc`, while the attempt still has
    /// it in flight.
    fn owned(&self) -> Option<(Rc<Attempt>, Rc<Dial>)> {
        let attempt = self.attempt.upgrade()?;
        let me = attempt.dials.borrow().iter().find(|d| std::ptr::eq(&***d, self)).cloned()?;
        Some((attempt, me))
    }
}

impl FileDescriptor for Dial {
    fn fileno(&self) -> RawFd {
        self.sock.borrow().as_ref().map_or(-1, |s| s.as_raw_fd())
    }

    fn do_write(&self) -> Result<(), Failure> {
        // A dial its attempt no longer holds should not be watched: have
        // the reactor drop it.
        let Some((attempt, me)) = self.owned() else {
            return Err(Failure::new(Error::Cancelled).context(format!("connecting to {}", self.addr)));
        };
        let outcome = {
            let sock = self.sock.borrow();
            let Some(sock) = sock.as_ref() else { return Ok(()) };
            let err = rustix::net::sockopt::socket_error(sock);
            let connected = rustix::net::getpeername(sock).ok().flatten().is_some();
            (err, connected)
        };
        match outcome {
            (Ok(Ok(())), true) => attempt.connected(&me),
            (Ok(Ok(())), false) => attempt.dial_failed(
                Some(&me),
                Failure::new(Error::ConnectionRefused).context(format!("connecting to {}", self.addr)),
            ),
            (Ok(Err(e)), _) | (Err(e), _) => attempt.dial_failed(Some(&me), connect_error(e, &self.addr)),
        }
        Ok(())
    }

    fn connection_lost(&self, reason: Failure) {
        let Some((attempt, me)) = self.owned() else { return };
        // A refused connect polls as HUP|ERR without OUT; the socket's
        // pending error says what really happened, and only this dial
        // failed. Anything else (the reactor shutting down, the fd gone)
        // ends the whole attempt.
        let pending = self.sock.borrow().as_ref().and_then(|s| match rustix::net::sockopt::socket_error(s) {
            Ok(Err(e)) => Some(e),
            _ => None,
        });
        match pending {
            Some(e) => attempt.dial_failed(Some(&me), connect_error(e, &self.addr)),
            None => attempt.fail(reason.context(format!("connecting to {}", self.addr))),
        }
    }

    fn log_prefix(&self) -> String {
        format!("TCP connect to {}", self.addr)
    }
}

impl Connector for StreamConnector {
    fn connect(&self) -> Result<(), Error> {
        StreamConnector::connect(self)
    }
    fn stop_connecting(&self) -> Result<(), Error> {
        StreamConnector::stop_connecting(self)
    }
    fn disconnect(&self) {
        StreamConnector::disconnect(self)
    }
    fn destination(&self) -> Address {
        StreamConnector::destination(self)
    }
    fn is_connecting(&self) -> bool {
        StreamConnector::is_connecting(self)
    }
    fn is_connected(&self) -> bool {
        StreamConnector::is_connected(self)
    }
    fn handle(&self) -> Rc<dyn Connector> {
        Rc::new(self.clone())
    }
}

/// Makes the connection of kind `K` on a connected socket: the connector
/// hears when it ends.
fn establish<K: Kind>(
    c: &StreamConnector,
    reactor: &Reactor,
    kind: K,
    sock: OwnedFd,
    protocol: Box<dyn Protocol>,
) -> Result<(), (Error, Box<dyn Protocol>)> {
    let conn = Connection::new(reactor, kind, sock);
    let weak: Weak<dyn TransportOps> = Rc::downgrade(&conn) as Weak<Connection<K>>;
    *c.inner.connection.borrow_mut() = weak;
    let inner = c.inner.clone();
    conn.set_on_lost(Box::new(move |reason| StreamConnector { inner }.connection_lost(reason)));
    conn.start(protocol)
}

/// No connection (yet, or any more).
fn no_connection() -> Weak<dyn TransportOps> {
    Weak::<Connection<Tcp>>::new()
}
