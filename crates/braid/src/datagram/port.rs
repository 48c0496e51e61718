//! The one datagram port, for every datagram kind (UDP, UNIX datagram):
//! batched reads, the send queue, connected mode and the close.
//!
//! # Reading
//! A readiness event reads in `recvmmsg` batches until the socket is empty
//! or `READ_BUDGET` bytes came in (Twisted's `maxThroughput`), so a flood on
//! one port cannot starve the rest of the loop; what is left waits for the
//! next pass (the socket stays readable). Each datagram is one call into the
//! protocol. The batch buffers belong to the reactor and are lent out for
//! the read, so an idle port holds none.
//!
//! # Writing
//! Writes are queued (one byte buffer and a list of entries, so a datagram
//! costs no allocation of its own) and sent with `sendmmsg`: right after a
//! read batch, or at the end of the pass. See the parent module for what
//! each error means to the caller.
//!
//! # Re-entrancy
//! Nothing here calls into the protocol while a write is on the stack: an
//! error found while sending is reported from the send, which runs only
//! from the loop (after a batch, from the end-of-pass flush, on
//! writability, at close), never from inside `write`.

use std::cell::{Cell, RefCell};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::rc::{Rc, Weak};
use std::time::Duration;

use rustix::io::Errno;
use rustix::net::SocketAddrAny;

use super::{
    DatagramOps, DatagramProtocol, DatagramTransport, Multicast, SharedDatagram, DEFAULT_SEND_QUEUE,
};
use crate::defer::Deferred;
use crate::error::{Error, Failure};
use crate::reactor::{log_failure, FileDescriptor, Flush, Reactor, WeakReactor};
use crate::stream::Address;
use crate::sys::mmsg::{self, Outgoing, RecvBatch, MAX_BATCH};

/// Bytes read per readiness event at most (Twisted's `maxThroughput`).
const READ_BUDGET: usize = 256 * 1024;

/// Entries a send queue may hold, whatever their size.
const QUEUE_MAX_DATAGRAMS: usize = 4096;

/// What one datagram kind does differently (internal).
pub(crate) trait DatagramKind: Sized + 'static {
    /// Names the kind in log lines ("UDP", "UNIX datagram").
    const NAME: &'static str;

    /// Checks a destination and turns it into a socket address:
    /// `InvalidAddress` for one this socket cannot send to.
    fn destination(&self, to: &Address) -> Result<SocketAddrAny, Error>;

    /// The largest payload the protocol can carry (`MessageLength` above).
    fn max_payload(&self) -> usize;

    /// Who sent a datagram the kernel gave no address for.
    fn unknown_peer(&self) -> Address;

    /// The socket is closed: undo what binding it made (a socket file).
    fn closed(&self) {}

    /// The multicast side, for the kinds that have one.
    fn multicast(_port: &Rc<DatagramPort<Self>>) -> Option<Multicast> {
        None
    }
}

/// Where a port is in its life. Only `Open` reads and accepts writes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    Open,
    /// `stop_listening` was called; the close runs on the next iteration.
    Stopping,
    Closed,
}

/// How the port is being served by the loop right now.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Sending {
    /// Nothing queued, or a flush is not needed yet.
    Idle,
    /// An end-of-pass flush is scheduled.
    FlushQueued,
    /// The kernel buffer was full: watching for writability.
    WaitingWritable,
}

/// One queued datagram: a range of the queue's bytes and where it goes.
struct Entry {
    start: usize,
    len: usize,
    to: Option<SocketAddrAny>,
    /// Already tried once after an `ECONNREFUSED` from an earlier datagram.
    retried: bool,
}

#[derive(Default)]
struct SendQueue {
    bytes: Vec<u8>,
    entries: Vec<Entry>,
    /// Entries before this one were sent.
    head: usize,
}

impl SendQueue {
    fn len(&self) -> usize {
        self.entries.len() - self.head
    }

    fn waiting_bytes(&self) -> usize {
        self.entries.get(self.head).map_or(0, |e| self.bytes.len() - e.start)
    }

    fn push(&mut self, parts: &[&[u8]], to: Option<SocketAddrAny>) {
        let start = self.bytes.len();
        for p in parts {
            self.bytes.extend_from_slice(p);
        }
        self.entries.push(Entry { start, len: self.bytes.len() - start, to, retried: false });
    }

    /// Forgets what was sent, keeping the buffers' capacity (unless a burst
    /// grew them far beyond what a port needs between passes).
    fn compact(&mut self) {
        if self.head == self.entries.len() {
            self.entries.clear();
            self.bytes.clear();
            if self.bytes.capacity() > DEFAULT_SEND_QUEUE {
                self.bytes = Vec::new();
                self.entries = Vec::new();
            }
        } else if self.head > 0 {
            let first = self.entries[self.head].start;
            self.bytes.drain(..first);
            self.entries.drain(..self.head);
            for e in &mut self.entries {
                e.start -= first;
            }
        }
        self.head = 0;
    }
}

/// The per-reactor receive buffers, lent to one port's read at a time.
#[derive(Default)]
struct SharedRecv(Cell<Option<Box<RecvBatch>>>);

pub(crate) struct DatagramPort<K: DatagramKind> {
    kind: K,
    reactor: WeakReactor,
    me: Weak<DatagramPort<K>>,
    /// This port's entry among the reactor's held descriptors.
    held: Cell<Option<usize>>,
    sock: RefCell<Option<OwnedFd>>,
    fd: RawFd,
    local: Address,
    max_packet: usize,
    protocol: RefCell<Option<SharedDatagram<dyn DatagramProtocol>>>,
    state: Cell<State>,
    reading: Cell<bool>,
    sending: Cell<Sending>,
    /// Inside a read batch: writes wait for the batch's own send.
    in_batch: Cell<bool>,
    connected: RefCell<Option<Address>>,
    queue: RefCell<SendQueue>,
    queue_limit: Cell<usize>,
    closed: RefCell<Vec<Deferred<()>>>,
}

impl<K: DatagramKind> DatagramPort<K> {
    /// Watches `sock` and attaches `protocol`. `connected` is set for a
    /// socket connected already (a connected UNIX datagram socket).
    pub fn start(
        reactor: &Reactor,
        kind: K,
        sock: OwnedFd,
        local: Address,
        max_packet: usize,
        protocol: SharedDatagram<dyn DatagramProtocol>,
        connected: Option<Address>,
    ) -> Result<Rc<DatagramPort<K>>, Error> {
        let fd = sock.as_raw_fd();
        let port = Rc::new_cyclic(|me| DatagramPort {
            kind,
            reactor: reactor.weak(),
            me: me.clone(),
            held: Cell::new(None),
            sock: RefCell::new(Some(sock)),
            fd,
            local,
            max_packet: max_packet.max(1),
            protocol: RefCell::new(Some(protocol.clone())),
            state: Cell::new(State::Open),
            reading: Cell::new(false),
            sending: Cell::new(Sending::Idle),
            in_batch: Cell::new(false),
            connected: RefCell::new(connected),
            queue: RefCell::new(SendQueue::default()),
            queue_limit: Cell::new(DEFAULT_SEND_QUEUE),
            closed: RefCell::new(Vec::new()),
        });
        reactor.add_reader(port.clone())?;
        port.reading.set(true);
        port.held.set(Some(reactor.hold(port.clone())));
        tracing::debug!(
            target: "braid",
            "{} port {} started, protocol {}",
            K::NAME,
            port.local,
            protocol.name()
        );
        if let Err(f) = protocol.attach(port.transport()) {
            log_failure(&format!("in start_protocol for {}", port.log_prefix()), &f);
        }
        Ok(port)
    }

    /// A handle for the protocol and the caller.
    pub fn transport(self: &Rc<Self>) -> DatagramTransport {
        DatagramTransport::new(self.clone())
    }

    /// Runs `f` with the socket, or `PortClosed` once it is gone.
    pub fn with_sock<R>(
        &self,
        f: impl FnOnce(&OwnedFd) -> Result<R, Errno>,
        what: &'static str,
    ) -> Result<R, Error> {
        let sock = self.sock.borrow();
        let sock = sock.as_ref().ok_or(Error::PortClosed)?;
        f(sock).map_err(|e| Error::io(what, e.into()))
    }

    /// The bound address.
    pub fn local(&self) -> &Address {
        &self.local
    }

    fn call_protocol(&self, what: &str, f: impl FnOnce(&mut dyn DatagramProtocol)) {
        let Some(protocol) = self.protocol.borrow().clone() else { return };
        if let Err(failure) = protocol.call(f) {
            log_failure(&format!("in {what} for {}", self.log_prefix()), &failure);
        }
    }

    fn peer_of(&self, from: Option<SocketAddrAny>) -> Address {
        from.and_then(|a| Address::from_sockaddr(&a).ok()).unwrap_or_else(|| self.kind.unknown_peer())
    }

    /// One `recvmmsg` batch into `batch`; delivers each datagram. Returns
    /// the bytes read and whether the socket may hold more.
    fn read_batch(&self, batch: &mut RecvBatch, slots: usize) -> Option<usize> {
        let result = {
            let sock = self.sock.borrow();
            let sock = sock.as_ref()?;
            batch.recv(sock.as_fd(), self.max_packet, slots)
        };
        match result {
            Ok(n) => {
                let mut bytes = 0;
                for i in 0..n {
                    let Some(d) = batch.get(i) else { break };
                    bytes += d.len.max(1);
                    let from = self.peer_of(d.from);
                    if d.truncated {
                        self.call_protocol("datagram_truncated", |p| {
                            p.datagram_truncated(d.data, d.len, &from)
                        });
                    } else {
                        self.call_protocol("datagram_received", |p| p.datagram_received(d.data, &from));
                    }
                    if self.state.get() != State::Open {
                        return None;
                    }
                }
                // A short batch means the socket was emptied.
                if n < slots {
                    None
                } else {
                    Some(bytes)
                }
            }
            Err(Errno::INTR) => Some(0),
            Err(Errno::CONNREFUSED) => {
                // The ICMP answer to an earlier datagram; only a connected
                // socket can tell whose.
                if self.connected.borrow().is_some() {
                    self.call_protocol("connection_refused", |p| p.connection_refused());
                }
                Some(0)
            }
            Err(Errno::AGAIN) => None,
            Err(e) => {
                tracing::warn!(target: "braid", "reading from {} failed: {e}", self.log_prefix());
                None
            }
        }
    }

    /// Sends what is queued, as far as the kernel takes it.
    fn send_queued(&self) {
        loop {
            let result = {
                let queue = self.queue.borrow();
                if queue.len() == 0 {
                    break;
                }
                let sock = self.sock.borrow();
                let Some(sock) = sock.as_ref() else { return };
                let msgs = queue.entries[queue.head..]
                    .iter()
                    .map(|e| Outgoing { data: &queue.bytes[e.start..e.start + e.len], to: e.to.as_ref() });
                mmsg::send_batch(sock.as_fd(), msgs)
            };
            match result {
                Ok(sent) => {
                    let mut queue = self.queue.borrow_mut();
                    queue.head += sent;
                    if sent == 0 {
                        break;
                    }
                }
                Err(Errno::INTR) => continue,
                Err(Errno::AGAIN) | Err(Errno::NOBUFS) => {
                    self.wait_writable();
                    break;
                }
                Err(e) => self.first_failed(e),
            }
        }
        let empty = {
            let mut queue = self.queue.borrow_mut();
            queue.compact();
            queue.len() == 0
        };
        if empty && self.sending.get() == Sending::WaitingWritable {
            self.sending.set(Sending::Idle);
            if let (Some(me), Some(reactor)) = (self.me.upgrade(), self.reactor.get()) {
                reactor.remove_writer(&me);
            }
        }
    }

    /// The kernel refused the first queued datagram with `e`.
    fn first_failed(&self, e: Errno) {
        if e == Errno::CONNREFUSED {
            // The error belongs to an earlier datagram: this one was not
            // sent, so it gets one more try.
            let retry = {
                let mut queue = self.queue.borrow_mut();
                let head = queue.head;
                let entry = &mut queue.entries[head];
                !std::mem::replace(&mut entry.retried, true)
            };
            if self.connected.borrow().is_some() {
                self.call_protocol("connection_refused", |p| p.connection_refused());
            }
            if retry {
                return;
            }
        }
        let to = {
            let mut queue = self.queue.borrow_mut();
            let head = queue.head;
            queue.head += 1;
            queue.entries[head].to.take()
        };
        let to = to.map(|a| self.peer_of(Some(a)));
        let reason = if e == Errno::MSGSIZE {
            Error::MessageLength { size: None, max: self.kind.max_payload() }
        } else {
            let what = match &to {
                Some(to) => format!("sending a datagram to {to}"),
                None => "sending a datagram".to_string(),
            };
            Error::io(what, e.into())
        };
        self.call_protocol("send_failed", |p| p.send_failed(to.as_ref(), Failure::new(reason)));
    }

    fn wait_writable(&self) {
        if self.sending.replace(Sending::WaitingWritable) == Sending::WaitingWritable {
            return;
        }
        if let (Some(me), Some(reactor)) = (self.me.upgrade(), self.reactor.get()) {
            if let Err(e) = reactor.add_writer(me) {
                tracing::warn!(target: "braid", "cannot watch {} for writing: {e}", self.log_prefix());
                self.sending.set(Sending::Idle);
            }
        }
    }

    fn stop_reading(&self) {
        if self.reading.replace(false) {
            if let (Some(me), Some(reactor)) = (self.me.upgrade(), self.reactor.get()) {
                reactor.remove_reader(&me);
            }
        }
    }

    /// Closes the socket (once): last try at the queue, then the protocol
    /// is detached (`stop_protocol` if it was the last port).
    fn close(&self) {
        if self.state.replace(State::Closed) == State::Closed {
            return;
        }
        self.stop_reading();
        self.send_queued();
        let left = self.queue.borrow().len();
        if left > 0 {
            tracing::warn!(
                target: "braid",
                "{} closed with {left} datagram(s) the kernel would not take; dropped",
                self.log_prefix()
            );
        }
        if let (Some(me), Some(reactor)) = (self.me.upgrade(), self.reactor.get()) {
            if self.sending.replace(Sending::Idle) == Sending::WaitingWritable {
                reactor.remove_writer(&me);
            }
        }
        *self.queue.borrow_mut() = SendQueue::default();
        drop(self.sock.borrow_mut().take());
        if let (Some(key), Some(reactor)) = (self.held.take(), self.reactor.get()) {
            reactor.release(key);
        }
        self.kind.closed();
        tracing::debug!(target: "braid", "({} port {} closed)", K::NAME, self.local);
        // Dropping our share of the protocol breaks the cycle through the
        // transport it keeps.
        if let Some(protocol) = self.protocol.borrow_mut().take() {
            if let Err(f) = protocol.detach() {
                log_failure(&format!("in stop_protocol for {}", self.log_prefix()), &f);
            }
        }
        for d in self.closed.borrow_mut().drain(..) {
            let _ = d.callback(());
        }
    }
}

impl<K: DatagramKind> FileDescriptor for DatagramPort<K> {
    fn fileno(&self) -> RawFd {
        if self.sock.borrow().is_some() {
            self.fd
        } else {
            -1
        }
    }

    fn do_read(&self) -> Result<(), Failure> {
        if self.state.get() != State::Open {
            return Ok(());
        }
        let Some(reactor) = self.reactor.get() else { return Ok(()) };
        let shared = reactor.extension::<SharedRecv>();
        let mut batch = shared.0.take().unwrap_or_default();
        let slots = (READ_BUDGET / self.max_packet).clamp(1, MAX_BATCH);
        let mut total = 0;
        self.in_batch.set(true);
        while total < READ_BUDGET {
            match self.read_batch(&mut batch, slots) {
                Some(bytes) => total += bytes.max(1),
                None => break,
            }
        }
        self.in_batch.set(false);
        shared.0.set(Some(batch));
        self.send_queued();
        Ok(())
    }

    fn do_write(&self) -> Result<(), Failure> {
        self.send_queued();
        Ok(())
    }

    fn reads_errors(&self) -> bool {
        true
    }

    fn connection_lost(&self, _reason: Failure) {
        self.reading.set(false);
        self.close();
    }

    /// Names the port and its protocol (Twisted's `logPrefix` is the
    /// protocol's), so a line about a failure says whose code it was.
    fn log_prefix(&self) -> String {
        match &*self.protocol.borrow() {
            Some(p) => format!("{} port {} ({})", K::NAME, self.local, p.name()),
            None => format!("{} port {}", K::NAME, self.local),
        }
    }
}

impl<K: DatagramKind> Flush for DatagramPort<K> {
    fn flush(&self) {
        if self.sending.get() == Sending::FlushQueued {
            self.sending.set(Sending::Idle);
        }
        if self.state.get() != State::Closed {
            self.send_queued();
        }
    }
}

impl<K: DatagramKind> DatagramOps for DatagramPort<K> {
    fn write_parts(&self, parts: &[&[u8]], to: Option<&Address>) -> Result<(), Error> {
        if self.state.get() != State::Open {
            return Err(Error::PortClosed);
        }
        let to = match (to, &*self.connected.borrow()) {
            (None, None) => {
                return Err(Error::InvalidAddress("an unconnected port needs a destination address".into()))
            }
            (None, Some(_)) => None,
            (Some(to), Some(peer)) if to == peer => None,
            (Some(to), Some(peer)) => {
                return Err(Error::InvalidAddress(format!("{to}: this port is connected to {peer}")));
            }
            (Some(to), None) => Some(self.kind.destination(to)?),
        };
        let size: usize = parts.iter().map(|p| p.len()).sum();
        let max = self.kind.max_payload();
        if size > max {
            return Err(Error::MessageLength { size: Some(size), max });
        }
        {
            let mut queue = self.queue.borrow_mut();
            if queue.len() >= QUEUE_MAX_DATAGRAMS || queue.waiting_bytes() + size > self.queue_limit.get() {
                return Err(Error::SendQueueFull);
            }
            queue.push(parts, to);
        }
        if self.sending.get() == Sending::Idle && !self.in_batch.get() {
            if let (Some(me), Some(reactor)) = (self.me.upgrade(), self.reactor.get()) {
                self.sending.set(Sending::FlushQueued);
                reactor.schedule_flush(me);
            }
        }
        Ok(())
    }

    fn connect(&self, to: &Address) -> Result<(), Error> {
        if self.connected.borrow().is_some() {
            return Err(Error::AlreadyConnected);
        }
        let addr = self.kind.destination(to)?;
        self.with_sock(|s| rustix::net::connect(s, &addr), "connecting a datagram socket")?;
        *self.connected.borrow_mut() = Some(to.clone());
        Ok(())
    }

    fn host(&self) -> Address {
        self.local.clone()
    }

    fn peer(&self) -> Option<Address> {
        self.connected.borrow().clone()
    }

    fn listening(&self) -> bool {
        self.state.get() == State::Open
    }

    fn stop_listening(&self) -> Deferred<()> {
        match self.state.get() {
            State::Closed => return Deferred::succeed(()),
            State::Stopping => {
                let d = Deferred::new();
                self.closed.borrow_mut().push(d.clone());
                return d;
            }
            State::Open => {}
        }
        self.state.set(State::Stopping);
        self.stop_reading();
        let d = Deferred::new();
        self.closed.borrow_mut().push(d.clone());
        let Some(reactor) = self.reactor.get() else {
            self.close();
            return d;
        };
        let me = self.me.clone();
        reactor.call_later(Duration::ZERO, move || {
            if let Some(port) = me.upgrade() {
                port.close();
            }
        });
        d
    }

    fn max_packet_size(&self) -> usize {
        self.max_packet
    }

    fn queued(&self) -> usize {
        self.queue.borrow().len()
    }

    fn set_send_queue_limit(&self, bytes: usize) {
        self.queue_limit.set(bytes);
    }

    fn set_broadcast_allowed(&self, on: bool) -> Result<(), Error> {
        self.with_sock(|s| rustix::net::sockopt::set_socket_broadcast(s, on), "setting SO_BROADCAST")
    }

    fn broadcast_allowed(&self) -> Result<bool, Error> {
        self.with_sock(|s| rustix::net::sockopt::socket_broadcast(s), "reading SO_BROADCAST")
    }

    fn multicast(&self) -> Option<Multicast> {
        self.me.upgrade().and_then(|me| K::multicast(&me))
    }

    fn describe(&self) -> String {
        let state = match self.state.get() {
            State::Open => "open",
            State::Stopping => "stopping",
            State::Closed => "closed",
        };
        match &*self.connected.borrow() {
            Some(peer) => format!("{} port {} connected to {peer} ({state})", K::NAME, self.local),
            None => format!("{} port {} ({state})", K::NAME, self.local),
        }
    }
}
