//! A listening stream socket and its accept loop, for every kind that
//! listens (TCP, UNIX): what differs is only how an accepted socket's peer
//! becomes a connection of that kind ([`Listen`]).
//!
//! Each readiness event accepts a bounded, adaptive batch: it starts at 100,
//! grows by 20 while every event fills the batch, and shrinks to what was
//! actually accepted otherwise (Twisted's numbers).
//!
//! Running out of descriptors must neither spin the CPU (the listener stays
//! readable while connections wait in the backlog, so a loop that merely
//! gives up would wake at once, forever) nor drop the listener. Two tools:
//! - EMFILE: a reserve descriptor (`/dev/null`) is closed to make room,
//!   the waiting connections are accepted and closed at once, so their
//!   peers learn it quickly instead of hanging, then the reserve is
//!   re-opened.
//! - ENFILE, ENOBUFS, ENOMEM, EMFILE without a reserve: the listener stops
//!   reading and a back-off timer (10 ms, doubling to 1 s) turns it back on.
//!
//! On io_uring the listener accepts by completion instead: one multishot
//! accept, whose completions each bring a connected socket (its peer's
//! address is then asked of the kernel, as the multishot accept does not
//! report it). There is no batch to size: the kernel posts what arrives,
//! and the completion queue bounds one wait. Out of descriptors, the
//! accept ends with the error; the same two tools apply, then it is
//! started again (at once after shedding, after the delay when backing
//! off). Pausing cancels it; closing forgets it before the socket closes.
//!
//! A port lives in the reactor from `listen_tcp` until `stop_listening` (or
//! shutdown), whether or not the caller keeps its `ListeningPort`: the
//! reactor holds it even while it is not watched (backing off).
//!
//! A failure in user code for one connection (the factory's
//! `build_protocol`, the protocol's `connection_made`) is logged with the
//! peer's address and costs only that connection: the accept loop goes on.

use std::cell::{Cell, RefCell};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::rc::{Rc, Weak};
use std::sync::Mutex;
use std::time::Duration;

use rustix::io::Errno;
use rustix::net::SocketFlags;

use super::connection::Connection;
use super::kind::Kind;
use crate::defer::Deferred;
use crate::error::{Error, Failure};
use crate::protocol::{Factory, SharedFactory};
use crate::reactor::{
    catch_panic, log_failure, DelayedCall, FileDescriptor, Reactor, RingRead, RingReader, RingRecv,
    WeakReactor,
};
use crate::stream::Address;

const INITIAL_ACCEPTS: usize = 100;
const ACCEPT_GROWTH: usize = 20;
const BACKOFF_MIN: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The process-wide spare descriptor for EMFILE recovery.
static RESERVE: Mutex<Option<OwnedFd>> = Mutex::new(None);

fn reserve_fd() {
    let mut r = RESERVE.lock().unwrap_or_else(|e| e.into_inner());
    if r.is_none() {
        *r = rustix::fs::open(
            "/dev/null",
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .ok();
    }
}

/// What one listening kind does differently (internal).
pub(crate) trait Listen: 'static {
    /// The kind of the accepted connections.
    type Conn: Kind;
    /// Names the kind in log lines ("TCP", "UNIX").
    const NAME: &'static str;
    /// The connection kind for a socket accepted from `peer`, or `None` to
    /// refuse it (a peer this kind cannot have).
    fn accepted(&self, peer: &Address) -> Option<Self::Conn>;
    /// The socket is closed: clean up what binding it made (a UNIX
    /// socket's file).
    fn closed(&self) {}
}

pub(crate) struct Port<L: Listen> {
    listen: L,
    reactor: WeakReactor,
    /// This port's entry among the reactor's held descriptors.
    held: Cell<Option<usize>>,
    me: Weak<Port<L>>,
    sock: RefCell<Option<OwnedFd>>,
    fd: RawFd,
    local: Address,
    factory: SharedFactory<dyn Factory>,
    accepts: Cell<usize>,
    backoff: Cell<Duration>,
    backoff_call: RefCell<Option<DelayedCall>>,
    listening: Cell<bool>,
    /// Wants connections (cleared while backing off or stopped).
    reading: Cell<bool>,
    /// Accepts by completion (io_uring).
    by_ring: bool,
    /// The multishot accept in the kernel, when `by_ring`.
    ring: Cell<RingRecv>,
}

impl<L: Listen> Port<L> {
    pub fn start(
        reactor: &Reactor,
        listen: L,
        sock: OwnedFd,
        local: Address,
        factory: SharedFactory<dyn Factory>,
    ) -> Result<Rc<Port<L>>, Error> {
        reserve_fd();
        let fd = sock.as_raw_fd();
        let by_ring = reactor.reads_by_completion();
        let port = Rc::new_cyclic(|me| Port {
            listen,
            reactor: reactor.weak(),
            held: Cell::new(None),
            me: me.clone(),
            sock: RefCell::new(Some(sock)),
            fd,
            local,
            factory,
            accepts: Cell::new(INITIAL_ACCEPTS),
            backoff: Cell::new(BACKOFF_MIN),
            backoff_call: RefCell::new(None),
            listening: Cell::new(true),
            reading: Cell::new(false),
            by_ring,
            ring: Cell::new(RingRecv::Off),
        });
        if by_ring {
            port.ring_start(reactor)?;
        } else {
            reactor.add_reader(port.clone())?;
        }
        port.reading.set(true);
        port.held.set(Some(reactor.hold(port.clone())));
        if let Err(failure) = catch_panic(|| {
            port.factory.do_start();
            Ok(())
        }) {
            log_failure(&format!("in start_factory for {}", port.log_prefix()), &failure);
        }
        tracing::debug!(target: "braid", "listening on {} ({})", port.local, L::NAME);
        Ok(port)
    }

    pub fn listening(&self) -> bool {
        self.listening.get()
    }

    /// Builds a protocol for one accepted socket and starts it. Nothing
    /// that goes wrong here reaches the accept loop.
    fn handle(&self, reactor: &Reactor, sock: OwnedFd, addr: Option<rustix::net::SocketAddrAny>) {
        let peer = addr.and_then(|a| Address::from_sockaddr(&a).ok());
        // A peer whose address cannot be read, or that this kind cannot
        // have, is refused: dropping the socket closes it.
        let Some((peer, kind)) = peer.and_then(|p| self.listen.accepted(&p).map(|k| (p, k))) else { return };
        let built = catch_panic(|| Ok(self.factory.build(&peer)));
        let protocol = match built {
            Ok(Some(p)) => p,
            Ok(None) => return, // refused: dropping the socket closes it
            Err(failure) => {
                let from = &peer;
                log_failure(
                    &format!("in build_protocol for the connection from {from} on {}", self.local),
                    &failure,
                );
                return;
            }
        };
        let conn = Connection::new(reactor, kind, sock);
        if let Err((e, protocol)) = conn.start(protocol) {
            let from = peer;
            tracing::error!(target: "braid", "dropping the connection from {from} on {}: {e}", self.local);
            // Never made, so never told it was lost.
            drop(protocol);
        }
    }

    /// Stops reading and turns reading back on after the back-off delay.
    fn back_off(&self, why: Errno) {
        let delay = self.backoff.get();
        tracing::warn!(target: "braid", "could not accept on {}: {why}; pausing accepts for {delay:?}", self.local);
        self.backoff.set((delay * 2).min(BACKOFF_MAX));
        self.stop_reading();
        let Some(reactor) = self.reactor.get() else { return };
        let me = self.me.clone();
        let call = reactor.call_later(delay, move || {
            if let Some(port) = me.upgrade() {
                port.backoff_call.borrow_mut().take();
                if port.listening.get() {
                    port.start_reading();
                }
            }
        });
        if let Some(old) = self.backoff_call.borrow_mut().replace(call) {
            let _ = old.cancel();
        }
    }

    /// Out of descriptors: free the reserve, accept-and-close what waits,
    /// take the reserve back. Returns how many connections were shed.
    fn shed_load(&self, sock: &OwnedFd, budget: usize) -> Option<usize> {
        let mut reserve = RESERVE.lock().unwrap_or_else(|e| e.into_inner());
        reserve.take()?;
        let mut shed = 0;
        while shed < budget {
            match rustix::net::acceptfrom_with(sock, SocketFlags::NONBLOCK | SocketFlags::CLOEXEC) {
                Ok((client, addr)) => {
                    shed += 1;
                    let peer = addr.and_then(|a| Address::from_sockaddr(&a).ok());
                    let peer = peer.map_or_else(|| "an unknown peer".to_string(), |p| p.to_string());
                    tracing::warn!(target: "braid", "EMFILE recovery: closed connection from {peer}");
                    drop(client);
                }
                Err(Errno::INTR) | Err(Errno::CONNABORTED) => continue,
                Err(_) => break,
            }
        }
        *reserve = rustix::fs::open(
            "/dev/null",
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .ok();
        Some(shed)
    }

    fn stop_reading(&self) {
        if self.reading.replace(false) {
            if let (Some(me), Some(reactor)) = (self.me.upgrade(), self.reactor.get()) {
                if !self.by_ring {
                    reactor.remove_reader(&me);
                    return;
                }
                let me: Rc<dyn RingReader> = me;
                reactor.ring_read_pause(&self.ring, &me);
            }
        }
    }

    fn start_reading(&self) {
        if self.reading.get() {
            return;
        }
        let Some(reactor) = self.reactor.get() else { return };
        if self.by_ring {
            let started = match self.ring.get() {
                RingRecv::Off => self.ring_start(&reactor).is_ok(),
                RingRecv::Stopping(k) => {
                    self.ring.set(RingRecv::Restart(k));
                    true
                }
                RingRecv::On(_) | RingRecv::Restart(_) => true,
            };
            self.reading.set(started);
            return;
        }
        if let Some(me) = self.me.upgrade() {
            if reactor.add_reader(me).is_ok() {
                self.reading.set(true);
            }
        }
    }

    /// Starts the multishot accept (none is in the kernel).
    fn ring_start(&self, reactor: &Reactor) -> Result<(), Error> {
        let me: Rc<dyn RingReader> = self.me.upgrade().ok_or(Error::ConnectionDone)?;
        let key = reactor.ring_accept_start(self.fd, me)?;
        self.ring.set(RingRecv::On(key));
        Ok(())
    }

    /// Handles one socket a multishot accept brought.
    fn ring_accepted(&self, reactor: &Reactor, client: OwnedFd) {
        self.backoff.set(BACKOFF_MIN);
        let addr = rustix::net::getpeername(&client).ok().flatten();
        self.handle(reactor, client, addr);
    }

    /// Stops listening: no more accepts now; the socket closes and the
    /// factory stops on the next iteration, then the Deferred fires.
    pub fn stop_listening(&self) -> Deferred<()> {
        if !self.listening.replace(false) {
            return Deferred::succeed(());
        }
        self.stop_reading();
        if let Some(call) = self.backoff_call.borrow_mut().take() {
            let _ = call.cancel();
        }
        let d = Deferred::new();
        let Some(reactor) = self.reactor.get() else {
            let _ = self.close();
            return Deferred::succeed(());
        };
        let (d2, me) = (d.clone(), self.me.clone());
        reactor.call_later(Duration::ZERO, move || {
            let result = match me.upgrade() {
                Some(port) => port.close(),
                None => Ok(()),
            };
            let _ = match result {
                Ok(()) => d2.callback(()),
                Err(f) => d2.errback(f),
            };
        });
        d
    }

    /// Closes the socket and stops the factory (once).
    fn close(&self) -> Result<(), Failure> {
        let Some(sock) = self.sock.borrow_mut().take() else { return Ok(()) };
        self.listening.set(false);
        if let Some(key) = self.ring.replace(RingRecv::Off).key() {
            // Before the close: the accept must not keep the socket open.
            if let (Some(me), Some(reactor)) = (self.me.upgrade(), self.reactor.get()) {
                let me: Rc<dyn RingReader> = me;
                reactor.ring_read_forget(key, &me);
            }
        }
        drop(sock);
        if let (Some(key), Some(reactor)) = (self.held.take(), self.reactor.get()) {
            reactor.release(key);
        }
        self.listen.closed();
        tracing::debug!(target: "braid", "stopped listening on {} ({})", self.local, L::NAME);
        catch_panic(|| {
            self.factory.do_stop();
            Ok(())
        })
    }
}

impl<L: Listen> FileDescriptor for Port<L> {
    fn fileno(&self) -> RawFd {
        if self.sock.borrow().is_some() {
            self.fd
        } else {
            -1
        }
    }

    fn do_read(&self) -> Result<(), Failure> {
        let Some(reactor) = self.reactor.get() else { return Ok(()) };
        let budget = self.accepts.get();
        let mut accepted = 0;
        let mut attempts = 0;
        while attempts < budget {
            attempts += 1;
            let result = {
                let sock = self.sock.borrow();
                let Some(sock) = sock.as_ref() else { return Ok(()) };
                rustix::net::acceptfrom_with(sock, SocketFlags::NONBLOCK | SocketFlags::CLOEXEC)
            };
            match result {
                Ok((client, addr)) => {
                    accepted += 1;
                    self.backoff.set(BACKOFF_MIN);
                    self.handle(&reactor, client, addr);
                    if !self.listening.get() {
                        break;
                    }
                }
                Err(Errno::AGAIN) => break,
                // The client gave up before we accepted (or netfilter said
                // no): nothing to do for this one, try the next.
                Err(Errno::INTR) | Err(Errno::CONNABORTED) | Err(Errno::PERM) | Err(Errno::PROTO) => continue,
                Err(Errno::MFILE) => {
                    let shed = {
                        let sock = self.sock.borrow();
                        sock.as_ref().and_then(|s| self.shed_load(s, budget))
                    };
                    if shed.is_none() {
                        self.back_off(Errno::MFILE);
                    }
                    break;
                }
                Err(e) => {
                    // ENFILE, ENOBUFS, ENOMEM, and anything unexpected: keep
                    // the listener, but give the system time to recover.
                    self.back_off(e);
                    break;
                }
            }
        }
        let next = if accepted == budget { budget + ACCEPT_GROWTH } else { accepted.max(1) };
        self.accepts.set(next);
        Ok(())
    }

    fn connection_lost(&self, _reason: Failure) {
        self.reading.set(false);
        if let Some(call) = self.backoff_call.borrow_mut().take() {
            let _ = call.cancel();
        }
        if let Err(f) = self.close() {
            log_failure(&format!("in stop_factory for {}", self.log_prefix()), &f);
        }
    }

    fn log_prefix(&self) -> String {
        format!("{} port {}", L::NAME, self.local)
    }
}

impl<L: Listen> RingReader for Port<L> {
    fn ring_received(&self, got: RingRead<'_>, ended: bool) -> Result<(), Failure> {
        if ended {
            self.ring.set(RingRecv::Off);
        }
        let Some(reactor) = self.reactor.get() else { return Ok(()) };
        match got {
            // Closing, or not listening any more: dropped, so closed.
            RingRead::Accepted(client) if !self.listening.get() => drop(client),
            RingRead::Accepted(client) => self.ring_accepted(&reactor, client),
            // The client gave up before we accepted, and the like: the
            // accept goes on (or is started again below).
            RingRead::Error(Errno::INTR | Errno::CONNABORTED | Errno::PERM | Errno::PROTO | Errno::AGAIN) => {
            }
            RingRead::Error(Errno::MFILE) => {
                let shed = {
                    let sock = self.sock.borrow();
                    sock.as_ref().and_then(|s| self.shed_load(s, INITIAL_ACCEPTS))
                };
                if shed.is_none() {
                    self.back_off(Errno::MFILE);
                }
            }
            RingRead::Error(e) => self.back_off(e),
            RingRead::Data(..) | RingRead::Eof | RingRead::Nothing => {}
        }
        if ended && self.reading.get() && self.listening.get() && self.ring.get() == RingRecv::Off {
            self.ring_start(&reactor).map_err(Failure::new)?;
        }
        Ok(())
    }

    fn ring_reading(&self) -> bool {
        self.reading.get()
    }

    fn descriptor(self: Rc<Self>) -> Rc<dyn FileDescriptor> {
        self
    }
}

/// A listening port of any kind, as its handle sees it.
pub(crate) trait PortOps {
    fn host(&self) -> Address;
    fn listening(&self) -> bool;
    fn stop_listening(&self) -> Deferred<()>;
}

impl<L: Listen> PortOps for Port<L> {
    fn host(&self) -> Address {
        self.local.clone()
    }
    fn listening(&self) -> bool {
        Port::listening(self)
    }
    fn stop_listening(&self) -> Deferred<()> {
        Port::stop_listening(self)
    }
}

/// A listening port (Twisted's `IListeningPort`): TCP or UNIX. The port
/// lives in the reactor until `stop_listening` (or shutdown) whether or not
/// this handle is kept.
#[derive(Clone)]
pub struct ListeningPort {
    port: Rc<dyn PortOps>,
}

impl ListeningPort {
    pub(crate) fn new<L: Listen>(port: Rc<Port<L>>) -> ListeningPort {
        ListeningPort { port }
    }

    /// A port that is not a listening socket (the `stdio:` endpoint's).
    pub(crate) fn from_ops(port: Rc<dyn PortOps>) -> ListeningPort {
        ListeningPort { port }
    }

    /// The address the port is bound to (Twisted's `getHost`): for TCP
    /// with the real port number when port 0 was asked for; for UNIX the
    /// socket's path or abstract name.
    pub fn host(&self) -> Address {
        self.port.host()
    }

    /// The IP address and port of a TCP port. A UNIX port has none and
    /// answers `0.0.0.0:0`: use [`host`](ListeningPort::host) for those.
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.port.host().ip().unwrap_or_else(|| std::net::SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// True until `stop_listening`.
    pub fn listening(&self) -> bool {
        self.port.listening()
    }

    /// Stops accepting. The Deferred fires once the socket is closed and the
    /// factory stopped (on the next iteration); open connections stay open.
    pub fn stop_listening(&self) -> Deferred<()> {
        self.port.stop_listening()
    }
}
