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
use rustix::net::{RecvFlags, SendFlags};

use crate::error::{Error, Failure};
use crate::protocol::Protocol;
use crate::reactor::{FileDescriptor, Flush, Reactor, READ_CHUNK};
use crate::transport::{Producer, Transport, TransportOps, DEFAULT_HIGH_WATER};

/// Small writes are copied into the tail chunk up to this size; an owned
/// buffer at least this large is queued as its own chunk, without a copy.
const CHUNK: usize = 16 * 1024;
/// A write made inside data_received at least this large, with nothing
/// queued ahead of it, is sent at once instead of being copied to the stage.
const DIRECT_WRITE: usize = 8 * 1024;
/// How many chunks one `writev` sends at most.
const MAX_IOV: usize = 64;
/// A drained buffer keeps its allocation up to this size for reuse.
const KEEP_CAPACITY: usize = 64 * 1024;

/// Buffered outgoing bytes: a queue of chunks, the first partly sent. The
/// first chunk is held inline (the common case is one chunk, reused for
/// every write), so a write touches one heap buffer, not a queue too.
#[derive(Default)]
pub(crate) struct OutBuf {
    first: Vec<u8>,
    rest: VecDeque<Vec<u8>>,
    /// Bytes of `first` already sent.
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
        if self.rest.is_empty() {
            if self.first.len() < CHUNK || self.first.len() == self.head {
                return self.first.extend_from_slice(data);
            }
        } else if let Some(tail) = self.rest.back_mut() {
            if tail.len() < CHUNK {
                return tail.extend_from_slice(data);
            }
        }
        self.rest.push_back(data.to_vec());
    }

    pub fn push_vec(&mut self, data: Vec<u8>) {
        if data.len() < CHUNK {
            return self.push(&data);
        }
        self.len += data.len();
        if self.len == data.len() {
            // Empty before: the buffer becomes the first chunk, no copy.
            self.first = data;
            self.head = 0;
        } else {
            self.rest.push_back(data);
        }
    }

    /// Writes as much as the kernel takes; `Ok(true)` when all is sent.
    pub fn send(&mut self, fd: &OwnedFd) -> Result<bool, Errno> {
        while self.len > 0 {
            // send/sendmsg rather than write/writev: the socket calls skip
            // the VFS layer, and MSG_NOSIGNAL turns a write to a reset peer
            // into EPIPE instead of a process-killing SIGPIPE.
            let result = if self.rest.is_empty() {
                rustix::net::send(fd, &self.first[self.head..], SendFlags::NOSIGNAL)
            } else {
                let mut iov: [IoSlice<'_>; MAX_IOV] = [IoSlice::new(&[]); MAX_IOV];
                iov[0] = IoSlice::new(&self.first[self.head..]);
                let mut n = 1;
                for c in self.rest.iter().take(MAX_IOV - 1) {
                    iov[n] = IoSlice::new(c);
                    n += 1;
                }
                let mut no_control = rustix::net::SendAncillaryBuffer::default();
                rustix::net::sendmsg(fd, &iov[..n], &mut no_control, SendFlags::NOSIGNAL)
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
            let first_left = self.first.len() - self.head;
            if n < first_left {
                self.head += n;
                return;
            }
            n -= first_left;
            self.head = 0;
            match self.rest.pop_front() {
                Some(next) => self.first = next,
                None => {
                    self.first.clear();
                    if self.first.capacity() > KEEP_CAPACITY {
                        self.first = Vec::new();
                    }
                }
            }
        }
    }
}

type OnLost = Box<dyn FnOnce(Failure)>;

const READING: u16 = 1; // registered with the reactor as a reader
const WRITING: u16 = 1 << 1; // registered as a writer (the kernel buffer was full)
const PAUSED: u16 = 1 << 2; // reading paused by pause_producing
const READ_CLOSED: u16 = 1 << 3;
const DISCONNECTING: u16 = 1 << 4;
const ABORTING: u16 = 1 << 5;
const WRITE_SHUTDOWN: u16 = 1 << 6; // lose_write_connection asked for
const WRITE_CLOSED: u16 = 1 << 7;
const LOST: u16 = 1 << 8;
const FLUSH_QUEUED: u16 = 1 << 9;
const STREAMING: u16 = 1 << 10; // the registered producer is a push producer
const PRODUCER_PAUSED: u16 = 1 << 11;
const IN_READ: u16 = 1 << 12; // inside do_read: writes are flushed when it ends

/// Marks a connection as inside `do_read` until dropped (also when the
/// protocol panics, so the mark never sticks).
struct ReadScope<'a>(&'a Flags);

impl<'a> ReadScope<'a> {
    fn enter(flags: &'a Flags) -> Self {
        flags.set(IN_READ, true);
        ReadScope(flags)
    }
}

impl Drop for ReadScope<'_> {
    fn drop(&mut self) {
        self.0.set(IN_READ, false);
    }
}

/// A connection's state bits in one word (idle connections are many, so
/// their size matters).
#[derive(Default)]
struct Flags(Cell<u16>);

impl Flags {
    #[inline]
    fn get(&self, f: u16) -> bool {
        self.0.get() & f != 0
    }
    #[inline]
    fn set(&self, f: u16, on: bool) {
        let v = self.0.get();
        self.0.set(if on { v | f } else { v & !f });
    }
    #[inline]
    fn replace(&self, f: u16, on: bool) -> bool {
        let was = self.get(f);
        self.set(f, on);
        was
    }
}

/// A connected TCP socket driven by the reactor.
pub(crate) struct Connection {
    reactor: Reactor,
    me: Weak<Connection>,
    /// `None` once closed (`Option<OwnedFd>` is one word: the fd's niche).
    sock: Cell<Option<OwnedFd>>,
    fd: RawFd,
    peer: Option<SocketAddr>,
    protocol: RefCell<Option<Box<dyn Protocol>>>,
    /// Created on the first write, so an idle connection owns no buffer.
    out: RefCell<Option<Box<OutBuf>>>,
    flags: Flags,
    producer: Cell<Option<Rc<dyn Producer>>>,
    high_water: Cell<u32>,
    low_water: Cell<u32>,
    /// Told after the protocol's `connection_lost` (a client's connector).
    on_lost: Cell<Option<OnLost>>,
}

impl Connection {
    pub fn new(reactor: &Reactor, sock: OwnedFd, peer: Option<SocketAddr>) -> Rc<Connection> {
        let fd = sock.as_raw_fd();
        Rc::new_cyclic(|me| Connection {
            reactor: reactor.clone(),
            me: me.clone(),
            sock: Cell::new(Some(sock)),
            fd,
            peer,
            protocol: RefCell::new(None),
            out: RefCell::new(None),
            flags: Flags::default(),
            producer: Cell::new(None),
            high_water: Cell::new(DEFAULT_HIGH_WATER as u32),
            low_water: Cell::new(0),
            on_lost: Cell::new(None),
        })
    }

    pub fn set_on_lost(&self, f: OnLost) {
        self.on_lost.set(Some(f));
    }

    fn rc(&self) -> Option<Rc<Connection>> {
        self.me.upgrade()
    }

    /// Starts reading and tells the protocol the connection is made.
    pub fn start(self: &Rc<Self>, protocol: Box<dyn Protocol>) -> Result<(), Error> {
        *self.protocol.borrow_mut() = Some(protocol);
        self.reactor.add_reader(self.clone())?;
        self.flags.set(READING, true);
        let transport = Transport::new(self.clone());
        if let Some(p) = self.protocol.borrow_mut().as_mut() {
            p.connection_made(transport);
        }
        Ok(())
    }

    fn queue_flush(&self) {
        // Inside our own do_read the flush happens when the protocol
        // returns, with the data still in cache; no need for the reactor's
        // end-of-pass list.
        if !self.flags.replace(FLUSH_QUEUED, true) && !self.flags.get(IN_READ) {
            if let Some(me) = self.rc() {
                self.reactor.schedule_flush(me);
            }
        }
    }

    fn stop_reading(&self) {
        if self.flags.replace(READING, false) {
            if let Some(me) = self.rc() {
                self.reactor.remove_reader(&me);
            }
        }
    }

    fn start_reading(&self) {
        if self.flags.get(READING)
            || self.flags.get(PAUSED)
            || self.flags.get(READ_CLOSED)
            || self.flags.get(DISCONNECTING)
        {
            return;
        }
        if self.flags.get(LOST) {
            return;
        }
        if let Some(me) = self.rc() {
            if self.reactor.add_reader(me).is_ok() {
                self.flags.set(READING, true);
            }
        }
    }

    /// Sends what is buffered; on a full socket, asks for writability.
    fn send_buffered(&self) -> Result<(), Failure> {
        let sent = self.with_sock(|sock| match self.out.borrow_mut().as_mut() {
            Some(out) if out.len() > 0 => out.send(sock),
            _ => Ok(true),
        });
        let drained = match sent {
            None => return Ok(()),
            Some(Ok(done)) => done,
            Some(Err(Errno::PIPE) | Err(Errno::CONNRESET)) => {
                return Err(Failure::new(Error::ConnectionLost))
            }
            Some(Err(e)) => {
                return Err(Failure::new(Error::io("writing to a TCP connection", e.into()))
                    .context("connection lost"))
            }
        };
        let left = self.buffered_len();
        if self.flags.get(STREAMING)
            && self.flags.get(PRODUCER_PAUSED)
            && left <= self.low_water.get() as usize
        {
            self.flags.set(PRODUCER_PAUSED, false);
            let producer = self.producer();
            if let Some(p) = producer {
                p.resume_producing();
            }
        }
        if !drained {
            if !self.flags.get(WRITING) {
                let me = self.rc().ok_or_else(|| Failure::new(Error::ConnectionLost))?;
                self.reactor.add_writer(me).map_err(Failure::new)?;
                self.flags.set(WRITING, true);
            }
            return Ok(());
        }
        if self.flags.replace(WRITING, false) {
            if let Some(me) = self.rc() {
                self.reactor.remove_writer(&me);
            }
        }
        self.drained()
    }

    /// Everything buffered is sent: feed a pull producer, or finish a close.
    fn drained(&self) -> Result<(), Failure> {
        let producer = self.producer();
        if let Some(p) = producer {
            if !self.flags.get(STREAMING) {
                p.resume_producing();
            }
            // Twisted: a close waits until the producer is unregistered.
            return Ok(());
        }
        if self.flags.get(DISCONNECTING) {
            if self.buffered_len() == 0 {
                return Err(Failure::new(Error::ConnectionDone));
            }
            return Ok(());
        }
        if self.flags.get(WRITE_SHUTDOWN) && !self.flags.get(WRITE_CLOSED) {
            self.flags.set(WRITE_CLOSED, true);
            self.with_sock(|sock| rustix::net::shutdown(sock, rustix::net::Shutdown::Write));
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
        if self.flags.replace(LOST, true) {
            return;
        }
        if let Some(me) = self.rc() {
            self.reactor.remove_reader(&me);
            self.reactor.remove_writer(&me);
        }
        self.flags.set(READING, false);
        self.flags.set(WRITING, false);
        if let Some(sock) = self.sock.take() {
            if self.flags.get(ABORTING) {
                // Linger 0: close sends RST and drops unsent data.
                let _ = rustix::net::sockopt::set_socket_linger(&sock, Some(std::time::Duration::ZERO));
            }
            drop(sock);
        }
        *self.out.borrow_mut() = None;
        let producer = self.producer.take();
        if let Some(p) = producer {
            p.stop_producing();
        }
        let protocol = self.protocol.borrow_mut().take();
        if let Some(mut p) = protocol {
            p.connection_lost(reason.clone());
        }
        let on_lost = self.on_lost.take();
        if let Some(f) = on_lost {
            f(reason);
        }
    }

    fn closing(&self) -> bool {
        self.flags.get(LOST) || self.flags.get(ABORTING)
    }
}

impl Flush for Connection {
    fn flush(&self) {
        // Already flushed since it was queued (after a read): nothing to do.
        if !self.flags.replace(FLUSH_QUEUED, false) || self.flags.get(LOST) {
            return;
        }
        if self.flags.get(ABORTING) {
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
        if self.flags.get(LOST) {
            -1
        } else {
            self.fd
        }
    }

    fn do_read(&self) -> Result<(), Failure> {
        // Left over only if a protocol panicked mid-read: never send it.
        self.reactor.write_stage().clear();
        let mut buf = self.reactor.take_read_buffer();
        let result = self
            .with_sock(|sock| {
                rustix::net::recv(sock, &mut buf[..READ_CHUNK], RecvFlags::empty()).map(|(n, _)| n)
            })
            .unwrap_or(Err(Errno::BADF));
        let outcome = match result {
            Ok(0) => Err(Failure::new(Error::ConnectionDone)),
            Ok(n) => {
                {
                    let _reading = ReadScope::enter(&self.flags);
                    // Borrow released before any other call can reach the protocol.
                    if let Some(p) = self.protocol.borrow_mut().as_mut() {
                        p.data_received(&buf[..n]);
                    }
                }
                self.flush_stage();
                if self.flags.get(FLUSH_QUEUED) {
                    self.flush();
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
        if self.flags.get(ABORTING) {
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
        self.flags.set(READING, false);
        self.flags.set(READ_CLOSED, true);
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

impl Producer for Connection {
    fn pause_producing(&self) {
        TransportOps::pause_producing(self)
    }
    fn resume_producing(&self) {
        TransportOps::resume_producing(self)
    }
    fn stop_producing(&self) {
        TransportOps::stop_producing(self)
    }
}

impl TransportOps for Connection {
    fn into_producer(self: Rc<Self>) -> Option<Rc<dyn Producer>> {
        Some(self)
    }

    #[inline]
    fn write(&self, data: &[u8]) {
        if self.closing() || self.flags.get(WRITE_CLOSED) || data.is_empty() {
            return;
        }
        if self.flags.get(IN_READ) && self.buffered_len() == 0 {
            let mut stage = self.reactor.write_stage();
            let mut sent = 0;
            if stage.is_empty() && data.len() >= DIRECT_WRITE {
                // Large, and nothing queued ahead of it: send it now rather
                // than copy it. A failure is left for the flush after
                // data_received to find, so the connection is never closed
                // from inside the protocol's own call.
                sent = self
                    .with_sock(|sock| rustix::net::send(sock, data, SendFlags::NOSIGNAL).unwrap_or(0))
                    .unwrap_or(0);
            }
            // The rest is sent when data_received returns; see `flush_stage`.
            stage.extend_from_slice(&data[sent..]);
            self.flags.set(FLUSH_QUEUED, true);
            return;
        }
        self.out_mut().push(data);
        self.after_write();
    }

    fn write_vec(&self, data: Vec<u8>) {
        if self.closing() || self.flags.get(WRITE_CLOSED) || data.is_empty() {
            return;
        }
        self.unstage();
        self.out_mut().push_vec(data);
        self.after_write();
    }

    fn write_sequence(&self, data: &[&[u8]]) {
        if self.closing() || self.flags.get(WRITE_CLOSED) {
            return;
        }
        self.unstage();
        {
            let mut out = self.out_mut();
            for d in data {
                out.push(d);
            }
        }
        self.after_write();
    }

    fn lose_connection(&self) {
        if self.closing() || self.flags.replace(DISCONNECTING, true) {
            return;
        }
        self.stop_reading();
        self.queue_flush();
    }

    fn abort_connection(&self) {
        if self.closing() {
            return;
        }
        self.flags.set(ABORTING, true);
        self.stop_reading();
        *self.out.borrow_mut() = None;
        self.queue_flush();
    }

    fn lose_write_connection(&self) {
        if self.closing() || self.flags.replace(WRITE_SHUTDOWN, true) {
            return;
        }
        self.queue_flush();
    }

    fn local_addr(&self) -> Option<SocketAddr> {
        self.with_sock(|sock| rustix::net::getsockname(sock).ok().and_then(|a| SocketAddr::try_from(a).ok()))?
    }

    fn peer_addr(&self) -> Option<SocketAddr> {
        self.peer
    }

    fn set_nodelay(&self, on: bool) -> Result<(), Error> {
        self.with_sock(|sock| rustix::net::sockopt::set_tcp_nodelay(sock, on))
            .ok_or(Error::ConnectionDone)?
            .map_err(|e| Error::io("setting TCP_NODELAY", e.into()))
    }

    fn set_keepalive(&self, on: bool) -> Result<(), Error> {
        self.with_sock(|sock| rustix::net::sockopt::set_socket_keepalive(sock, on))
            .ok_or(Error::ConnectionDone)?
            .map_err(|e| Error::io("setting SO_KEEPALIVE", e.into()))
    }

    fn pause_producing(&self) {
        self.flags.set(PAUSED, true);
        self.stop_reading();
    }

    fn resume_producing(&self) {
        self.flags.set(PAUSED, false);
        self.start_reading();
    }

    fn stop_producing(&self) {
        self.lose_connection();
    }

    fn register_producer(&self, producer: Rc<dyn Producer>, streaming: bool) -> Result<(), Error> {
        if self.has_producer() {
            return Err(Error::io(
                "registering a producer",
                std::io::Error::new(std::io::ErrorKind::AlreadyExists, "a producer is already registered"),
            ));
        }
        if self.flags.get(LOST) {
            // Twisted: a producer registered on a dead transport is stopped.
            producer.stop_producing();
            return Ok(());
        }
        self.producer.set(Some(producer.clone()));
        self.flags.set(STREAMING, streaming);
        self.flags.set(PRODUCER_PAUSED, false);
        if !streaming {
            // A pull producer is asked for its first chunk at once.
            producer.resume_producing();
        }
        Ok(())
    }

    fn unregister_producer(&self) {
        self.producer.take();
        self.flags.set(PRODUCER_PAUSED, false);
        // A close that waited for the producer can go on now.
        if !self.flags.get(LOST) && (self.flags.get(DISCONNECTING) || self.flags.get(WRITE_SHUTDOWN)) {
            self.queue_flush();
        }
    }

    fn set_write_buffer_limits(&self, high: usize, low: usize) {
        let high = u32::try_from(high).unwrap_or(u32::MAX);
        self.high_water.set(high);
        self.low_water.set(u32::try_from(low).unwrap_or(u32::MAX).min(high));
    }

    fn buffered(&self) -> usize {
        self.buffered_len()
    }

    fn connected(&self) -> bool {
        !self.flags.get(LOST) && !self.flags.get(DISCONNECTING) && !self.flags.get(ABORTING)
    }
}

impl Connection {
    /// Runs `f` on the socket, if still open. `f` must not re-enter.
    #[inline]
    fn with_sock<R>(&self, f: impl FnOnce(&OwnedFd) -> R) -> Option<R> {
        let sock = self.sock.take();
        let r = sock.as_ref().map(f);
        self.sock.set(sock);
        r
    }

    /// Moves staged writes into the connection's own buffer, keeping their
    /// order ahead of a write that cannot be staged.
    fn unstage(&self) {
        if self.flags.get(IN_READ) {
            let mut stage = self.reactor.write_stage();
            if !stage.is_empty() {
                self.out_mut().push(&stage);
                stage.clear();
                drop(stage);
                self.after_write();
            }
        }
    }

    /// Sends what the protocol wrote during data_received straight from the
    /// shared stage; whatever the kernel does not take now is copied into
    /// the connection's own buffer, to go out when the socket is writable.
    fn flush_stage(&self) {
        let mut stage = self.reactor.write_stage();
        if stage.is_empty() {
            return;
        }
        if self.closing() {
            stage.clear();
            return;
        }
        let sent = self.with_sock(|sock| loop {
            match rustix::net::send(sock, &stage, SendFlags::NOSIGNAL) {
                Err(Errno::INTR) => continue,
                other => break other,
            }
        });
        let rest = match sent {
            Some(Ok(n)) => n,
            Some(Err(Errno::AGAIN)) => 0,
            // Errors surface from the normal flush, which retries the send.
            _ => 0,
        };
        let unsent = rest < stage.len();
        if unsent {
            self.out_mut().push(&stage[rest..]);
        }
        stage.clear();
        if stage.capacity() > 4 * READ_CHUNK {
            // One huge response should not pin its memory for good.
            *stage = Vec::new();
        }
        drop(stage);
        if unsent {
            self.after_write();
        }
    }

    /// The write buffer, created on first use.
    #[inline]
    fn out_mut(&self) -> std::cell::RefMut<'_, OutBuf> {
        std::cell::RefMut::map(self.out.borrow_mut(), |o| &mut **o.get_or_insert_with(Default::default))
    }

    #[inline]
    fn buffered_len(&self) -> usize {
        self.out.borrow().as_ref().map_or(0, |o| o.len())
    }

    fn producer(&self) -> Option<Rc<dyn Producer>> {
        let p = self.producer.take();
        self.producer.set(p.clone());
        p
    }

    fn has_producer(&self) -> bool {
        let p = self.producer.take();
        let has = p.is_some();
        self.producer.set(p);
        has
    }

    #[inline]
    fn after_write(&self) {
        self.queue_flush();
        if self.flags.get(STREAMING)
            && !self.flags.get(PRODUCER_PAUSED)
            && self.buffered_len() > self.high_water.get() as usize
        {
            self.flags.set(PRODUCER_PAUSED, true);
            let producer = self.producer();
            if let Some(p) = producer {
                p.pause_producing();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rustix::net::{socketpair, AddressFamily, SocketFlags, SocketType};

    /// Sends everything through a non-blocking socketpair (so sends are
    /// partial whenever the socket buffer fills) and returns what arrived.
    fn drain(out: &mut OutBuf) -> Vec<u8> {
        let (a, b) = socketpair(
            AddressFamily::UNIX,
            SocketType::STREAM,
            SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
            None,
        )
        .unwrap();
        let mut got = Vec::new();
        let mut buf = vec![0u8; 7_000];
        loop {
            let done = out.send(&a).unwrap();
            while let Ok(n) = rustix::io::read(&b, &mut buf) {
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            if done {
                return got;
            }
        }
    }

    proptest! {
        /// Any mix of copied and owned writes, small and large, comes out
        /// complete and in order, and the length bookkeeping stays right.
        #[test]
        fn writes_come_out_in_order(writes in proptest::collection::vec((0usize..40_000, any::<bool>(), any::<u8>()), 1..40)) {
            let mut out = OutBuf::default();
            let mut expected = Vec::new();
            for (len, owned, byte) in writes {
                let data: Vec<u8> = (0..len).map(|i| byte.wrapping_add(i as u8)).collect();
                expected.extend_from_slice(&data);
                if owned { out.push_vec(data) } else { out.push(&data) }
                prop_assert_eq!(out.len(), expected.len());
            }
            let got = drain(&mut out);
            prop_assert_eq!(out.len(), 0);
            prop_assert!(got == expected, "{} bytes out, {} expected", got.len(), expected.len());
            // The buffer is reusable after draining.
            out.push(b"again");
            prop_assert_eq!(drain(&mut out), b"again".to_vec());
        }
    }
}
