//! One TCP connection: the socket, its protocol and its write buffer.
//!
//! Reads: one `read` of at most 64 KiB per readiness event, into a buffer
//! the whole reactor shares (so idle connections own no read buffer).
//! Writes: appended to the connection's buffer and sent at the end of the
//! reactor pass with one `write`/`writev`; only when the kernel refuses
//! (EAGAIN) does the connection ask to be watched for writability.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io::IoSlice;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::rc::{Rc, Weak};

use rustix::io::Errno;

use crate::error::{Error, Failure};
use crate::protocol::Protocol;
use crate::reactor::{FileDescriptor, Flush, Reactor, READ_CHUNK};
use crate::transport::{Producer, Transport, TransportOps, DEFAULT_HIGH_WATER};

/// Small writes are copied into the tail chunk up to this size; an owned
/// buffer at least this large is queued as its own chunk, without a copy.
const CHUNK: usize = 16 * 1024;
/// How many chunks one `writev` sends at most.
const MAX_IOV: usize = 64;
/// A drained buffer keeps its allocation up to this size for reuse.
const KEEP_CAPACITY: usize = 64 * 1024;

/// Buffered outgoing bytes: a queue of chunks, the first partly sent.
#[derive(Default)]
pub(crate) struct OutBuf {
    chunks: VecDeque<Vec<u8>>,
    /// Bytes of the first chunk already sent.
    head: usize,
    len: usize,
}

impl OutBuf {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn push(&mut self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        self.len += data.len();
        match self.chunks.back_mut() {
            Some(tail) if tail.len() < CHUNK => tail.extend_from_slice(data),
            _ => self.chunks.push_back(data.to_vec()),
        }
    }

    pub fn push_vec(&mut self, data: Vec<u8>) {
        if data.len() < CHUNK {
            return self.push(&data);
        }
        self.len += data.len();
        self.chunks.push_back(data);
    }

    /// Writes as much as the kernel takes; `Ok(true)` when all is sent.
    pub fn send(&mut self, fd: &OwnedFd) -> Result<bool, Errno> {
        while self.len > 0 {
            let result = if self.chunks.len() == 1 {
                rustix::io::write(fd, &self.chunks[0][self.head..])
            } else {
                let mut iov: [IoSlice<'_>; MAX_IOV] = [IoSlice::new(&[]); MAX_IOV];
                let mut n = 0;
                for (i, c) in self.chunks.iter().take(MAX_IOV).enumerate() {
                    iov[i] = IoSlice::new(if i == 0 { &c[self.head..] } else { c });
                    n += 1;
                }
                rustix::io::writev(fd, &iov[..n])
            };
            match result {
                Ok(n) => {
                    let full = n == self.len;
                    self.consume(n);
                    if !full {
                        // A short write means the socket buffer is full.
                        return Ok(self.len == 0);
                    }
                }
                Err(Errno::INTR) => continue,
                Err(Errno::AGAIN) => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    fn consume(&mut self, mut n: usize) {
        self.len -= n;
        while n > 0 {
            let first_left = self.chunks[0].len() - self.head;
            if n < first_left {
                self.head += n;
                return;
            }
            n -= first_left;
            self.head = 0;
            if self.chunks.len() == 1 {
                let c = &mut self.chunks[0];
                c.clear();
                if c.capacity() > KEEP_CAPACITY {
                    *c = Vec::new();
                }
            } else {
                self.chunks.pop_front();
            }
        }
    }

    pub fn clear(&mut self) {
        *self = OutBuf::default();
    }
}

type OnLost = Box<dyn FnOnce(Failure)>;

/// A connected TCP socket driven by the reactor.
pub(crate) struct Connection {
    reactor: Reactor,
    me: Weak<Connection>,
    sock: RefCell<Option<OwnedFd>>,
    fd: RawFd,
    peer: Option<SocketAddr>,
    protocol: RefCell<Option<Box<dyn Protocol>>>,
    out: RefCell<OutBuf>,
    /// Registered with the reactor as a reader / a writer.
    reading: Cell<bool>,
    writing: Cell<bool>,
    /// Reading paused by `pause_producing`.
    paused: Cell<bool>,
    read_closed: Cell<bool>,
    disconnecting: Cell<bool>,
    aborting: Cell<bool>,
    write_shutdown: Cell<bool>,
    write_closed: Cell<bool>,
    lost: Cell<bool>,
    flush_queued: Cell<bool>,
    producer: RefCell<Option<Rc<dyn Producer>>>,
    streaming: Cell<bool>,
    producer_paused: Cell<bool>,
    high_water: Cell<usize>,
    low_water: Cell<usize>,
    /// Told after the protocol's `connection_lost` (a client's connector).
    on_lost: RefCell<Option<OnLost>>,
}

impl Connection {
    pub fn new(reactor: &Reactor, sock: OwnedFd, peer: Option<SocketAddr>) -> Rc<Connection> {
        let fd = sock.as_raw_fd();
        Rc::new_cyclic(|me| Connection {
            reactor: reactor.clone(),
            me: me.clone(),
            sock: RefCell::new(Some(sock)),
            fd,
            peer,
            protocol: RefCell::new(None),
            out: RefCell::new(OutBuf::default()),
            reading: Cell::new(false),
            writing: Cell::new(false),
            paused: Cell::new(false),
            read_closed: Cell::new(false),
            disconnecting: Cell::new(false),
            aborting: Cell::new(false),
            write_shutdown: Cell::new(false),
            write_closed: Cell::new(false),
            lost: Cell::new(false),
            flush_queued: Cell::new(false),
            producer: RefCell::new(None),
            streaming: Cell::new(false),
            producer_paused: Cell::new(false),
            high_water: Cell::new(DEFAULT_HIGH_WATER),
            low_water: Cell::new(0),
            on_lost: RefCell::new(None),
        })
    }

    pub fn set_on_lost(&self, f: OnLost) {
        *self.on_lost.borrow_mut() = Some(f);
    }

    fn rc(&self) -> Option<Rc<Connection>> {
        self.me.upgrade()
    }

    /// Starts reading and tells the protocol the connection is made.
    pub fn start(self: &Rc<Self>, protocol: Box<dyn Protocol>) -> Result<(), Error> {
        *self.protocol.borrow_mut() = Some(protocol);
        self.reactor.add_reader(self.clone())?;
        self.reading.set(true);
        let transport = Transport::new(self.clone());
        if let Some(p) = self.protocol.borrow_mut().as_mut() {
            p.connection_made(transport);
        }
        Ok(())
    }

    fn queue_flush(&self) {
        if !self.flush_queued.replace(true) {
            if let Some(me) = self.rc() {
                self.reactor.schedule_flush(me);
            }
        }
    }

    fn stop_reading(&self) {
        if self.reading.replace(false) {
            if let Some(me) = self.rc() {
                self.reactor.remove_reader(&me);
            }
        }
    }

    fn start_reading(&self) {
        if self.reading.get() || self.paused.get() || self.read_closed.get() || self.disconnecting.get() {
            return;
        }
        if self.lost.get() {
            return;
        }
        if let Some(me) = self.rc() {
            if self.reactor.add_reader(me).is_ok() {
                self.reading.set(true);
            }
        }
    }

    /// Sends what is buffered; on a full socket, asks for writability.
    fn send_buffered(&self) -> Result<(), Failure> {
        let drained = {
            let sock = self.sock.borrow();
            let Some(sock) = sock.as_ref() else { return Ok(()) };
            let mut out = self.out.borrow_mut();
            if out.len() == 0 {
                true
            } else {
                match out.send(sock) {
                    Ok(done) => done,
                    Err(Errno::PIPE) | Err(Errno::CONNRESET) => {
                        return Err(Failure::new(Error::ConnectionLost))
                    }
                    Err(e) => {
                        return Err(Failure::new(Error::io("writing to a TCP connection", e.into()))
                            .context("connection lost"))
                    }
                }
            }
        };
        let left = self.out.borrow().len();
        if self.streaming.get() && self.producer_paused.get() && left <= self.low_water.get() {
            self.producer_paused.set(false);
            let producer = self.producer.borrow().clone();
            if let Some(p) = producer {
                p.resume_producing();
            }
        }
        if !drained {
            if !self.writing.get() {
                let me = self.rc().ok_or_else(|| Failure::new(Error::ConnectionLost))?;
                self.reactor.add_writer(me).map_err(Failure::new)?;
                self.writing.set(true);
            }
            return Ok(());
        }
        if self.writing.replace(false) {
            if let Some(me) = self.rc() {
                self.reactor.remove_writer(&me);
            }
        }
        self.drained()
    }

    /// Everything buffered is sent: feed a pull producer, or finish a close.
    fn drained(&self) -> Result<(), Failure> {
        let producer = self.producer.borrow().clone();
        if let Some(p) = producer {
            if !self.streaming.get() {
                p.resume_producing();
            }
            // Twisted: a close waits until the producer is unregistered.
            return Ok(());
        }
        if self.disconnecting.get() {
            if self.out.borrow().len() == 0 {
                return Err(Failure::new(Error::ConnectionDone));
            }
            return Ok(());
        }
        if self.write_shutdown.get() && !self.write_closed.get() {
            self.write_closed.set(true);
            if let Some(sock) = self.sock.borrow().as_ref() {
                let _ = rustix::net::shutdown(sock, rustix::net::Shutdown::Write);
            }
            if let Some(p) = self.protocol.borrow_mut().as_mut() {
                if let Some(h) = p.as_half_closeable() {
                    h.write_connection_lost();
                }
            }
        }
        Ok(())
    }

    /// Closes the socket and tells the protocol, exactly once.
    pub fn close(&self, reason: Failure) {
        if self.lost.replace(true) {
            return;
        }
        if let Some(me) = self.rc() {
            self.reactor.remove_reader(&me);
            self.reactor.remove_writer(&me);
        }
        self.reading.set(false);
        self.writing.set(false);
        if let Some(sock) = self.sock.borrow_mut().take() {
            if self.aborting.get() {
                // Linger 0: close sends RST and drops unsent data.
                let _ = rustix::net::sockopt::set_socket_linger(&sock, Some(std::time::Duration::ZERO));
            }
            drop(sock);
        }
        self.out.borrow_mut().clear();
        let producer = self.producer.borrow_mut().take();
        if let Some(p) = producer {
            p.stop_producing();
        }
        let protocol = self.protocol.borrow_mut().take();
        if let Some(mut p) = protocol {
            p.connection_lost(reason.clone());
        }
        let on_lost = self.on_lost.borrow_mut().take();
        if let Some(f) = on_lost {
            f(reason);
        }
    }

    fn closing(&self) -> bool {
        self.lost.get() || self.aborting.get()
    }
}

impl Flush for Connection {
    fn flush(&self) {
        self.flush_queued.set(false);
        if self.lost.get() {
            return;
        }
        if self.aborting.get() {
            self.close(Failure::new(Error::ConnectionAborted));
            return;
        }
        if let Err(reason) = self.send_buffered() {
            self.close(reason);
        }
    }
}

impl FileDescriptor for Connection {
    fn fileno(&self) -> RawFd {
        if self.sock.borrow().is_some() {
            self.fd
        } else {
            -1
        }
    }

    fn do_read(&self) -> Result<(), Failure> {
        let mut buf = self.reactor.take_read_buffer();
        let result = match self.sock.borrow().as_ref() {
            Some(sock) => rustix::io::read(sock, &mut buf[..READ_CHUNK]),
            None => Err(Errno::BADF),
        };
        let outcome = match result {
            Ok(0) => Err(Failure::new(Error::ConnectionDone)),
            Ok(n) => {
                // Borrow released before any other call can reach the protocol.
                if let Some(p) = self.protocol.borrow_mut().as_mut() {
                    p.data_received(&buf[..n]);
                }
                Ok(())
            }
            Err(Errno::AGAIN) | Err(Errno::INTR) => Ok(()),
            Err(Errno::CONNRESET) => Err(Failure::new(Error::ConnectionLost)),
            Err(e) => Err(Failure::new(Error::io("reading from a TCP connection", e.into()))),
        };
        self.reactor.return_read_buffer(buf);
        outcome
    }

    fn do_write(&self) -> Result<(), Failure> {
        if self.aborting.get() {
            return Err(Failure::new(Error::ConnectionAborted));
        }
        self.send_buffered()
    }

    fn connection_lost(&self, reason: Failure) {
        self.close(reason);
    }

    fn half_closeable(&self) -> bool {
        match self.protocol.try_borrow_mut() {
            Ok(mut p) => p.as_mut().is_some_and(|p| p.as_half_closeable().is_some()),
            Err(_) => false,
        }
    }

    fn read_connection_lost(&self, _reason: Failure) {
        self.reading.set(false);
        self.read_closed.set(true);
        if let Some(p) = self.protocol.borrow_mut().as_mut() {
            if let Some(h) = p.as_half_closeable() {
                h.read_connection_lost();
            }
        }
    }

    fn log_prefix(&self) -> String {
        match self.peer {
            Some(peer) => format!("TCP connection with {peer}"),
            None => "TCP connection".to_string(),
        }
    }
}

impl TransportOps for Connection {
    #[inline]
    fn write(&self, data: &[u8]) {
        if self.closing() || self.write_closed.get() || data.is_empty() {
            return;
        }
        self.out.borrow_mut().push(data);
        self.after_write();
    }

    fn write_vec(&self, data: Vec<u8>) {
        if self.closing() || self.write_closed.get() || data.is_empty() {
            return;
        }
        self.out.borrow_mut().push_vec(data);
        self.after_write();
    }

    fn write_sequence(&self, data: &[&[u8]]) {
        if self.closing() || self.write_closed.get() {
            return;
        }
        {
            let mut out = self.out.borrow_mut();
            for d in data {
                out.push(d);
            }
        }
        self.after_write();
    }

    fn lose_connection(&self) {
        if self.closing() || self.disconnecting.replace(true) {
            return;
        }
        self.stop_reading();
        self.queue_flush();
    }

    fn abort_connection(&self) {
        if self.closing() {
            return;
        }
        self.aborting.set(true);
        self.stop_reading();
        self.out.borrow_mut().clear();
        self.queue_flush();
    }

    fn lose_write_connection(&self) {
        if self.closing() || self.write_shutdown.replace(true) {
            return;
        }
        self.queue_flush();
    }

    fn local_addr(&self) -> Option<SocketAddr> {
        let sock = self.sock.borrow();
        rustix::net::getsockname(sock.as_ref()?).ok().and_then(|a| SocketAddr::try_from(a).ok())
    }

    fn peer_addr(&self) -> Option<SocketAddr> {
        self.peer
    }

    fn set_nodelay(&self, on: bool) -> Result<(), Error> {
        let sock = self.sock.borrow();
        let sock = sock.as_ref().ok_or(Error::ConnectionDone)?;
        rustix::net::sockopt::set_tcp_nodelay(sock, on)
            .map_err(|e| Error::io("setting TCP_NODELAY", e.into()))
    }

    fn set_keepalive(&self, on: bool) -> Result<(), Error> {
        let sock = self.sock.borrow();
        let sock = sock.as_ref().ok_or(Error::ConnectionDone)?;
        rustix::net::sockopt::set_socket_keepalive(sock, on)
            .map_err(|e| Error::io("setting SO_KEEPALIVE", e.into()))
    }

    fn pause_producing(&self) {
        self.paused.set(true);
        self.stop_reading();
    }

    fn resume_producing(&self) {
        self.paused.set(false);
        self.start_reading();
    }

    fn stop_producing(&self) {
        self.lose_connection();
    }

    fn register_producer(&self, producer: Rc<dyn Producer>, streaming: bool) -> Result<(), Error> {
        if self.producer.borrow().is_some() {
            return Err(Error::io(
                "registering a producer",
                std::io::Error::new(std::io::ErrorKind::AlreadyExists, "a producer is already registered"),
            ));
        }
        if self.lost.get() {
            // Twisted: a producer registered on a dead transport is stopped.
            producer.stop_producing();
            return Ok(());
        }
        *self.producer.borrow_mut() = Some(producer.clone());
        self.streaming.set(streaming);
        self.producer_paused.set(false);
        if !streaming {
            // A pull producer is asked for its first chunk at once.
            producer.resume_producing();
        }
        Ok(())
    }

    fn unregister_producer(&self) {
        self.producer.borrow_mut().take();
        self.producer_paused.set(false);
        // A close that waited for the producer can go on now.
        if !self.lost.get() && (self.disconnecting.get() || self.write_shutdown.get()) {
            self.queue_flush();
        }
    }

    fn set_write_buffer_limits(&self, high: usize, low: usize) {
        self.high_water.set(high);
        self.low_water.set(low.min(high));
    }

    fn buffered(&self) -> usize {
        self.out.borrow().len()
    }

    fn connected(&self) -> bool {
        !self.lost.get() && !self.disconnecting.get() && !self.aborting.get()
    }
}

impl Connection {
    #[inline]
    fn after_write(&self) {
        self.queue_flush();
        if self.streaming.get()
            && !self.producer_paused.get()
            && self.out.borrow().len() > self.high_water.get()
        {
            self.producer_paused.set(true);
            let producer = self.producer.borrow().clone();
            if let Some(p) = producer {
                p.pause_producing();
            }
        }
    }
}
