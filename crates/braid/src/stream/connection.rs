//! One stream connection: the descriptor, its protocol and its write
//! buffer, for every kind of byte stream (see [`Kind`]).
//!
//! Reads: one `read` of at most 64 KiB per readiness event, into a buffer
//! the whole reactor shares (so idle connections own no read buffer).
//! Writes: appended to the connection's buffer and sent at the end of the
//! reactor pass with one `write`/`writev`; only when the kernel refuses
//! (EAGAIN) does the connection ask to be watched for writability.
//!
//! Layers: `start_tls` on a live connection puts a layer (TLS) between the
//! connection and its protocol without a new transport handle. The handle
//! the application holds keeps pointing here; once a layer is started its
//! calls are passed to the layer's upper side, and the layer writes below
//! through [`Below`], which bypasses it. The layer's protocol takes the
//! application's place in the protocol slot only when no call into the
//! application is on the stack (the slot is borrowed while one is), so it
//! never re-enters a protocol: until then, writes already go through the
//! layer, and nothing is read. Bytes written before the layer started stay
//! in this connection's buffer (or the reactor's stage) ahead of the
//! layer's, so they leave first and in the clear.
//!
//! Reads on a ring: on io_uring a kind that can ([`Kind::RING_READS`])
//! reads by completion: one multishot receive per connection, whose
//! completions the reactor hands to [`RingReader::ring_received`] with the
//! bytes in a buffer lent by the ring. Pausing cancels the receive, but
//! completions already posted still arrive: their bytes are held and
//! delivered, in order, from the loop once reading resumes, so a paused
//! protocol never hears `data_received`. An end of stream seen while
//! paused is not kept: the receive started on resuming finds it again, on
//! a later pass, as a readiness backend would read it. A new receive
//! starts only after the cancelled one's final completion, so two
//! receives never race on one socket. Held bytes reach the protocol a read
//! (at most 64 KiB) at a time, so it can pause again between two. Closing
//! forgets the receive before the socket is closed (see `RingRecv`).
//!
//! Sends on a ring: such a connection also writes by completion. What a
//! pass writes gathers in the buffer and goes out at the end of the pass
//! as one send request, whose chunks move into the poller until the
//! kernel completes it (see `backend/uring/send.rs`); a large write with
//! nothing ahead of it is still sent at once, from the protocol's own
//! buffer, as on the other backends. One send at a time:
//! writes made meanwhile queue behind it, and the unsent rest of a short
//! send goes back in front of them, so bytes never reorder. The bytes of a
//! send in the kernel still count as buffered (they are still ours), for
//! producers and watermarks as for `buffered()`. Files still go by
//! sendfile(2), once no send is in the kernel; a close forgets the send
//! (cancelling it) before closing the socket.
//!
//! Files: `write_file` queues part of a regular file, remembering how many
//! buffered bytes go before it; the send path sends those, then the file
//! with sendfile(2) (a bounded part per turn, for fairness), then what was
//! written after. The file never enters the buffer, so a slow reader of a
//! large file costs no memory.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io::IoSlice;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::rc::{Rc, Weak};

use rustix::io::Errno;

use super::kind::Kind;
use crate::backend::uring::send::Outgoing;
use crate::error::{Error, Failure};
use crate::protocol::Protocol;
use crate::reactor::{
    catch_panic, log_failure, run_logged, FileDescriptor, Flush, Reactor, RingRead, RingReader, RingRecv,
    RingWriter, WeakReactor, READ_CHUNK,
};
use crate::stream::kind::Tcp;
use crate::stream::Address;
use crate::transport::{
    Layer, MakeLayer, Producer, TcpOptions, TlsOptions, Transport, TransportOps, UnixOptions,
    DEFAULT_HIGH_WATER,
};

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
pub(crate) struct OutBuf {
    first: Vec<u8>,
    rest: VecDeque<Vec<u8>>,
    /// Bytes of `first` already sent.
    head: usize,
    len: usize,
    /// Bytes taken out of the queue by a ring send still in the kernel:
    /// ours until it completes, so they count as buffered.
    flying: usize,
    /// A chunk a finished ring send gave back, cleared, for reuse.
    spare: Vec<u8>,
    /// A streaming producer is paused above `high` bytes buffered and
    /// resumed at or below `low`. Kept here, not in the connection: only a
    /// connection that writes (or sets them) needs them.
    high: u32,
    low: u32,
}

impl Default for OutBuf {
    fn default() -> Self {
        OutBuf {
            first: Vec::new(),
            rest: VecDeque::new(),
            head: 0,
            len: 0,
            flying: 0,
            spare: Vec::new(),
            high: DEFAULT_HIGH_WATER as u32,
            low: 0,
        }
    }
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
    pub fn send<K: Kind>(&mut self, kind: &K, fd: &OwnedFd) -> Result<bool, Errno> {
        self.send_upto(kind, fd, usize::MAX)
    }

    /// Writes at most the first `limit` bytes; `Ok(true)` when they (or
    /// all there is, if less) are sent.
    pub fn send_upto<K: Kind>(&mut self, kind: &K, fd: &OwnedFd, mut limit: usize) -> Result<bool, Errno> {
        while self.len > 0 && limit > 0 {
            let want = self.len.min(limit);
            let result = if self.rest.is_empty() || self.first.len() - self.head >= want {
                kind.send(fd, &self.first[self.head..self.head + want])
            } else {
                let mut iov: [IoSlice<'_>; MAX_IOV] = [IoSlice::new(&[]); MAX_IOV];
                iov[0] = IoSlice::new(&self.first[self.head..]);
                let mut n = 1;
                let mut room = want - iov[0].len();
                for c in self.rest.iter().take(MAX_IOV - 1) {
                    if room == 0 {
                        break;
                    }
                    let take = c.len().min(room);
                    iov[n] = IoSlice::new(&c[..take]);
                    room -= take;
                    n += 1;
                }
                kind.send_vectored(fd, &iov[..n])
            };
            match result {
                Ok(n) => {
                    let full = n == want;
                    self.consume(n);
                    limit -= n;
                    if !full {
                        // A short write means the socket buffer is full.
                        return Ok(self.len == 0 || limit == 0);
                    }
                }
                Err(Errno::INTR) => continue,
                Err(Errno::AGAIN) => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Empty, nothing in flight, and the default limits: nothing worth
    /// keeping.
    pub fn is_idle_default(&self) -> bool {
        self.len == 0 && self.flying == 0 && self.high == DEFAULT_HIGH_WATER as u32 && self.low == 0
    }

    /// Makes `data` the queue's only chunk, without a copy, and hands back
    /// the queue's empty first chunk in its place. The queue must be empty.
    pub fn swap_in(&mut self, data: &mut Vec<u8>) {
        debug_assert_eq!(self.len, 0);
        std::mem::swap(&mut self.first, data);
        data.clear();
        self.head = 0;
        self.len = self.first.len();
    }

    /// Takes the queued chunks (at most `max` of them) for a send on the
    /// ring; they count as buffered still, until put back.
    pub fn take_for_ring(&mut self, max: usize) -> Outgoing {
        let mut out =
            Outgoing { first: std::mem::take(&mut self.first), rest: VecDeque::new(), head: self.head };
        while out.rest.len() + 1 < max {
            let Some(c) = self.rest.pop_front() else { break };
            out.rest.push_back(c);
        }
        self.head = 0;
        // Later writes go into the memory a finished send gave back.
        self.first = self.rest.pop_front().unwrap_or_else(|| std::mem::take(&mut self.spare));
        self.len -= out.len();
        self.flying = out.len();
        out
    }

    /// Puts what a ring send left unsent back at the front, ahead of what
    /// was queued meanwhile; `spare` (a sent chunk, cleared) is kept for
    /// the next send's later writes.
    pub fn put_back(&mut self, out: Outgoing, spare: Option<Vec<u8>>) {
        self.flying = 0;
        if let Some(spare) = spare {
            if self.spare.capacity() == 0 && spare.capacity() <= KEEP_CAPACITY {
                self.spare = spare;
            }
        }
        let left = out.len();
        if left == 0 {
            return;
        }
        if self.head > 0 {
            self.first.drain(..self.head);
            self.head = 0;
        }
        let Outgoing { first, mut rest, head } = out;
        let mine = std::mem::replace(&mut self.first, first);
        if !mine.is_empty() {
            rest.push_back(mine);
        }
        rest.append(&mut self.rest);
        self.rest = rest;
        self.head = head;
        self.len += left;
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

/// A connection's seldom-used state.
#[derive(Default)]
struct Rare {
    /// Set when the connection must close while one of its protocol's own
    /// calls is on the stack: the close (with this reason) is made from
    /// the loop instead, so `connection_lost` never re-enters the protocol.
    doomed: Option<Failure>,
    /// The layer started on this connection, which the application's
    /// transport calls reach from then on.
    upper: Option<Rc<dyn TransportOps>>,
    /// The layer, until it takes the protocol's place.
    pending: Option<Box<dyn Layer>>,
    /// Files queued by `write_file`, in order.
    files: VecDeque<FileSegment>,
    /// Bytes a ring receive delivered while reading was paused, for the
    /// protocol once it resumes (see the module docs).
    held_in: Vec<u8>,
    /// Bytes of `held_in` already delivered (a release that paused again
    /// part way keeps the rest where it is, uncopied).
    held_at: usize,
}

/// Part of a file to send with sendfile(2), after the bytes that were
/// buffered when it was queued and before those written after.
struct FileSegment {
    file: Rc<std::fs::File>,
    offset: u64,
    left: u64,
    /// Bytes of the buffer that go before the file: after the previous
    /// queued file, or from the front for the first.
    ahead: usize,
}

/// How much one sendfile(2) call asks for, so one big file does not keep
/// the loop from other connections.
const SENDFILE_CHUNK: usize = 1 << 20;

/// How far the connection is from closed. One value, so that a connection
/// cannot be both aborting and lost, say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Life {
    Open,
    /// `lose_connection`: send what is buffered (after any producer is
    /// unregistered), then close.
    Disconnecting,
    /// `abort_connection`: drop the buffer and reset, from the loop.
    Aborting,
    /// Closed and the protocol told; nothing more happens.
    Lost,
}

/// The write side, for half-close.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WriteSide {
    Open,
    /// `lose_write_connection`: shut down once the buffer is sent.
    ShutdownAsked,
    Closed,
}

bitflags::bitflags! {
    /// What the connection is doing now; these vary independently.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    struct Io: u16 {
        /// Registered with the reactor as a reader.
        const READING = 1;
        /// Registered as a writer (the kernel buffer was full).
        const WRITING = 1 << 1;
        /// Reading paused by `pause_producing`.
        const PAUSED = 1 << 2;
        /// The peer half-closed and the protocol kept the write side.
        const READ_CLOSED = 1 << 3;
        /// A flush is due at the end of the pass (or of `do_read`).
        const FLUSH_QUEUED = 1 << 4;
        /// Inside `do_read`: writes gather in the reactor's stage.
        const IN_READ = 1 << 5;
        /// A layer (TLS) was started on the connection: the application's
        /// transport calls go to it (see [`Rare::upper`]).
        const LAYERED = 1 << 6;
        /// The layer waits to take the protocol's place until the call
        /// into the protocol now on the stack returns.
        const LAYER_PENDING = 1 << 7;
        /// A file is queued to go out by sendfile(2) (see [`FileSegment`]).
        const FILE = 1 << 8;
        /// Reads by completion on a ring (see [`RingRecv`]).
        const RING = 1 << 9;
        /// Bytes are held for the protocol ([`Rare::held_in`]).
        const HELD = 1 << 10;
    }
}

/// How the registered producer is driven.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Asked for more each time the buffer empties.
    Pull,
    /// Writes on its own; paused above the high-water mark.
    Streaming,
    /// A streaming producer we paused; resumed at the low-water mark.
    StreamingPaused,
}

/// Marks a connection as inside `do_read` until dropped (also when the
/// protocol panics, so the mark never sticks).
struct ReadScope<'a>(&'a Cell<Io>);

impl<'a> ReadScope<'a> {
    fn enter(io: &'a Cell<Io>) -> Self {
        io.set(io.get() | Io::IN_READ);
        ReadScope(io)
    }
}

impl Drop for ReadScope<'_> {
    fn drop(&mut self) {
        self.0.set(self.0.get() - Io::IN_READ);
    }
}

/// A connected byte stream of kind `K` driven by the reactor.
///
/// Every call into user code (the protocol, a producer, the connector's
/// notification) goes through one of the `call_*` helpers, which contain
/// a panic: it is logged naming the call and the peer, and the connection
/// is closed with the panic as its reason. The listener, the loop and every
/// other connection go on. A protocol whose `connection_made` panicked is
/// never called again; any other protocol still gets its one
/// `connection_lost`.
pub(crate) struct Connection<K: Kind> {
    kind: K,
    /// Weak, so a reactor dropped with connections open is freed (and then
    /// closes them) instead of being kept alive by them.
    reactor: WeakReactor,
    me: Weak<Connection<K>>,
    /// `None` once closed (`Option<OwnedFd>` is one word: the fd's niche).
    sock: Cell<Option<OwnedFd>>,
    fd: RawFd,
    protocol: RefCell<Option<Box<dyn Protocol>>>,
    /// Created on the first write, so an idle connection owns no buffer.
    out: RefCell<Option<Box<OutBuf>>>,
    life: Cell<Life>,
    write_side: Cell<WriteSide>,
    io: Cell<Io>,
    producer: Cell<Option<Rc<dyn Producer>>>,
    /// How `producer` is driven; meaningless while there is none. Kept
    /// beside it rather than boxed with it: echo-like protocols register a
    /// producer on every connection, and a box would cost each of them an
    /// allocation.
    mode: Cell<Mode>,
    /// What few connections need, boxed so the others do not pay for it.
    rare: Cell<Option<Box<Rare>>>,
    /// Told after the protocol's `connection_lost` (a client's connector).
    on_lost: Cell<Option<OnLost>>,
    /// The receive in the kernel, when reading by completion.
    ring: Cell<RingRecv>,
    /// The key of the send in the kernel, when writing by completion (its
    /// bytes still count as buffered: see [`OutBuf::take_for_ring`]).
    sending: Cell<Option<u32>>,
}

impl<K: Kind> Connection<K> {
    pub fn new(reactor: &Reactor, kind: K, sock: OwnedFd) -> Rc<Connection<K>> {
        let fd = sock.as_raw_fd();
        Rc::new_cyclic(|me| Connection {
            kind,
            reactor: reactor.weak(),
            me: me.clone(),
            sock: Cell::new(Some(sock)),
            fd,
            protocol: RefCell::new(None),
            out: RefCell::new(None),
            life: Cell::new(Life::Open),
            // A kind that cannot write starts with its write side closed, so
            // writes are dropped and nothing ever registers it as a writer;
            // one that cannot read starts with its read side closed, so
            // nothing ever registers it as a reader.
            write_side: Cell::new(if K::WRITES { WriteSide::Open } else { WriteSide::Closed }),
            io: Cell::new(if K::READS { Io::empty() } else { Io::READ_CLOSED }),
            producer: Cell::new(None),
            mode: Cell::new(Mode::Pull),
            rare: Cell::new(None),
            on_lost: Cell::new(None),
            ring: Cell::new(RingRecv::Off),
            sending: Cell::new(None),
        })
    }

    pub fn set_on_lost(&self, f: OnLost) {
        self.on_lost.set(Some(f));
    }

    fn rc(&self) -> Option<Rc<Connection<K>>> {
        self.me.upgrade()
    }

    #[inline]
    fn has(&self, f: Io) -> bool {
        self.io.get().contains(f)
    }

    #[inline]
    fn set_io(&self, f: Io, on: bool) {
        let mut io = self.io.get();
        io.set(f, on);
        self.io.set(io);
    }

    /// Sets `f`; returns whether it was already set.
    #[inline]
    fn replace_io(&self, f: Io, on: bool) -> bool {
        let was = self.has(f);
        self.set_io(f, on);
        was
    }

    /// Registers the socket for reading (if its kind reads), then hands the
    /// protocol its transport. If registering fails (select and an fd at or
    /// above `FD_SETSIZE`), the protocol is handed back unused: it never gets
    /// `connection_made`, so it must never get `connection_lost` either;
    /// the socket closes when the connection is dropped.
    pub fn start(self: &Rc<Self>, protocol: Box<dyn Protocol>) -> Result<(), (Error, Box<dyn Protocol>)> {
        let Some(reactor) = self.reactor.get() else {
            return Err((Error::ReactorGone, protocol));
        };
        if K::READS {
            let registered = if K::RING_READS && reactor.reads_by_completion() {
                self.set_io(Io::RING, true);
                self.ring_start(&reactor)
            } else {
                reactor.add_reader(self.clone())
            };
            if let Err(e) = registered {
                self.life.set(Life::Lost);
                self.sock.take();
                return Err((e, protocol));
            }
            self.set_io(Io::READING, true);
        } else if K::HEARS_PEER_CLOSE {
            // Watched, not reading: pausing does not apply, and the close
            // unregisters every role at once.
            if let Err(e) = reactor.add_reader(self.clone()) {
                self.life.set(Life::Lost);
                self.sock.take();
                return Err((e, protocol));
            }
        }
        *self.protocol.borrow_mut() = Some(protocol);
        let transport = Transport::new(self.clone());
        let made = catch_panic(|| {
            if let Some(p) = self.protocol.borrow_mut().as_mut() {
                p.connection_made(transport);
            }
            Ok(())
        });
        self.adopt_layer();
        if let Err(failure) = made {
            log_failure(&format!("in connection_made of {}", self.log_prefix()), &failure);
            // Never made: no further calls, not even connection_lost.
            drop(self.protocol.borrow_mut().take());
            self.close(failure);
        }
        Ok(())
    }

    /// Runs one protocol callback, containing a panic (see the type's docs).
    /// Returns false if it panicked (the connection is then closed).
    fn call_protocol(&self, what: &str, f: impl FnOnce(&mut dyn Protocol)) -> bool {
        let result = catch_panic(|| {
            if let Some(p) = self.protocol.borrow_mut().as_mut() {
                f(&mut **p);
            }
            Ok(())
        });
        self.adopt_layer();
        match result {
            Ok(()) => true,
            Err(failure) => {
                log_failure(&format!("in {what} of {}", self.log_prefix()), &failure);
                self.close(failure);
                false
            }
        }
    }

    /// Runs `f` on the seldom-used state, creating it if need be. `f` must
    /// not call user code.
    fn with_rare<R>(&self, f: impl FnOnce(&mut Rare) -> R) -> R {
        let mut rare = self.rare.take().unwrap_or_default();
        let r = f(&mut rare);
        self.rare.set(Some(rare));
        r
    }

    /// Runs `f` on the seldom-used state if there is any.
    fn peek_rare<R>(&self, f: impl FnOnce(&mut Rare) -> R) -> Option<R> {
        let mut rare = self.rare.take()?;
        let r = f(&mut rare);
        self.rare.set(Some(rare));
        Some(r)
    }

    /// The layer the application's transport calls go to, if one was
    /// started.
    #[inline]
    fn upper(&self) -> Option<Rc<dyn TransportOps>> {
        if !self.has(Io::LAYERED) {
            return None;
        }
        self.peek_rare(|r| r.upper.clone()).flatten()
    }

    /// Starts a layer (TLS) on this live connection. What was written
    /// before stays below it, in order, and goes out as it was; what the
    /// application writes from now on goes through the layer. The
    /// application's producer, pause and buffer limits move up to the
    /// layer, which paces them from now on; reading resumes below if the
    /// application had paused it, since a handshake needs to read (the
    /// layer pauses it again after).
    fn start_layer(self: Rc<Self>, make: MakeLayer) -> Result<(), Error> {
        if self.has(Io::LAYERED) {
            return Err(Error::io(
                "starting TLS",
                std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "TLS is already started on this connection",
                ),
            ));
        }
        if self.life.get() != Life::Open || self.write_side.get() != WriteSide::Open {
            return Err(Error::ConnectionDone);
        }
        let reactor = self.reactor.get().ok_or(Error::ReactorGone)?;
        let producer = self.producer.take().map(|p| (p, self.mode.get()));
        let paused = self.has(Io::PAUSED);
        let limits = self.out.borrow().as_ref().map(|o| (o.high as usize, o.low as usize));
        let below = Transport::new(Rc::new(Below(self.clone())));
        let layer = make(below, &reactor);
        let upper = layer.upper();
        self.with_rare(|r| {
            r.upper = Some(upper.clone());
            r.pending = Some(layer);
        });
        self.set_io(Io::LAYERED | Io::LAYER_PENDING, true);
        if paused {
            self.raw_resume_producing();
            upper.pause_producing();
        }
        if let Some((high, low)) = limits {
            upper.set_write_buffer_limits(high, low);
        }
        if let Some((p, mode)) = producer {
            let _ = upper.register_producer(p.clone(), mode != Mode::Pull);
            if mode == Mode::StreamingPaused {
                // Paused for a buffer the layer does not count: the layer
                // pauses it again by its own measure.
                self.call_producer("resume_producing", &p, |p| p.resume_producing());
            }
        }
        self.adopt_layer();
        Ok(())
    }

    /// Puts a started layer in the protocol's place, wrapping it, unless a
    /// call into the protocol is on the stack: then this runs again when
    /// that call returns.
    fn adopt_layer(&self) {
        if !self.has(Io::LAYER_PENDING) {
            return;
        }
        let Ok(mut slot) = self.protocol.try_borrow_mut() else { return };
        self.set_io(Io::LAYER_PENDING, false);
        let Some(layer) = self.peek_rare(|r| r.pending.take()).flatten() else { return };
        if let Some(app) = slot.take() {
            *slot = Some(layer.adopt(app));
        }
    }

    /// Runs one producer callback, containing a panic like `call_protocol`.
    fn call_producer(&self, what: &str, p: &Rc<dyn Producer>, f: impl FnOnce(&dyn Producer)) -> bool {
        match catch_panic(|| {
            f(&**p);
            Ok(())
        }) {
            Ok(()) => true,
            Err(failure) => {
                log_failure(&format!("in the producer's {what} on {}", self.log_prefix()), &failure);
                self.close(failure);
                false
            }
        }
    }

    fn queue_flush(&self) {
        // Inside our own do_read the flush happens when the protocol
        // returns, with the data still in cache; no need for the reactor's
        // end-of-pass list. On a ring it is always the end of the pass, so
        // the pass's writes gather into one send.
        if !self.replace_io(Io::FLUSH_QUEUED, true) && (!self.has(Io::IN_READ) || self.has(Io::RING)) {
            if let (Some(me), Some(reactor)) = (self.rc(), self.reactor.get()) {
                reactor.schedule_flush(me);
            }
        }
    }

    fn stop_reading(&self) {
        if self.replace_io(Io::READING, false) {
            if let (Some(me), Some(reactor)) = (self.rc(), self.reactor.get()) {
                if self.has(Io::RING) {
                    let me: Rc<dyn RingReader> = me;
                    reactor.ring_read_pause(&self.ring, &me);
                } else {
                    reactor.remove_reader(&me);
                }
            }
        }
    }

    fn start_reading(&self) {
        if self.has(Io::READING) || self.has(Io::PAUSED) || self.has(Io::READ_CLOSED) {
            return;
        }
        if self.life.get() != Life::Open {
            return;
        }
        let Some(reactor) = self.reactor.get() else { return };
        if self.has(Io::RING) {
            self.set_io(Io::READING, true);
            if self.has(Io::HELD) {
                // Held bytes go first, from the loop; the receive is
                // re-armed after them.
                self.queue_flush();
                return;
            }
            match self.ring.get() {
                RingRecv::Off => {
                    if self.ring_start(&reactor).is_err() {
                        self.set_io(Io::READING, false);
                    }
                }
                RingRecv::Stopping(k) => self.ring.set(RingRecv::Restart(k)),
                RingRecv::On(_) | RingRecv::Restart(_) => {}
            }
            return;
        }
        if let Some(me) = self.rc() {
            if reactor.add_reader(me).is_ok() {
                self.set_io(Io::READING, true);
            }
        }
    }

    /// Starts a receive on the ring (none is in the kernel).
    fn ring_start(&self, reactor: &Reactor) -> Result<(), Error> {
        let me: Rc<dyn RingReader> = self.rc().ok_or(Error::ConnectionLost)?;
        let key = reactor.ring_read_start(self.fd, me, K::RING_RECVMSG)?;
        self.ring.set(RingRecv::On(key));
        Ok(())
    }

    /// Hands `data` to the protocol as `data_received`, then sends what it
    /// wrote in reply.
    fn deliver(&self, reactor: &Reactor, data: &mut [u8]) {
        let delivered = {
            let _reading = ReadScope::enter(&self.io);
            self.call_protocol("data_received", |p| p.data_received_mut(data))
        };
        if delivered {
            self.flush_stage(reactor);
            // On a ring the flush is already queued for the end of the pass.
            if self.has(Io::FLUSH_QUEUED) && !self.has(Io::RING) {
                self.flush();
            }
        } else {
            reactor.write_stage().clear();
        }
    }

    /// Delivers what a ring receive brought while reading was paused, now
    /// that it reads again; then receives on. An `Err` ends the connection.
    fn release_held(&self, reactor: &Reactor) -> Result<(), Failure> {
        self.set_io(Io::HELD, false);
        let (mut data, mut at) = self
            .peek_rare(|r| (std::mem::take(&mut r.held_in), std::mem::take(&mut r.held_at)))
            .unwrap_or_default();
        // Descriptors that came with the held bytes go first.
        self.deliver_fds();
        // A read at a time, as a readiness backend would deliver them, so
        // the protocol can pause again between two and a large hold never
        // reaches it as one burst.
        while at < data.len() {
            if self.life.get() != Life::Open || !self.has(Io::READING) {
                // Nothing was added meanwhile: receives complete only
                // between passes, never inside this call.
                self.with_rare(|r| {
                    r.held_in = data;
                    r.held_at = at;
                });
                self.set_io(Io::HELD, true);
                return Ok(());
            }
            let end = data.len().min(at + READ_CHUNK);
            reactor.write_stage().clear();
            self.deliver(reactor, &mut data[at..end]);
            at = end;
        }
        if self.life.get() == Life::Open && self.has(Io::READING) && !self.has(Io::HELD) {
            match self.ring.get() {
                RingRecv::Off => self.ring_start(reactor).map_err(Failure::new)?,
                RingRecv::Stopping(k) => self.ring.set(RingRecv::Restart(k)),
                RingRecv::On(_) | RingRecv::Restart(_) => {}
            }
        }
        Ok(())
    }

    /// Hands descriptors that came with the last read to the protocol,
    /// before the bytes that carried them; closes them if it does not take
    /// descriptors.
    fn deliver_fds(&self) {
        let Some(fds) = self.kind.take_received_fds() else { return };
        for fd in fds {
            self.call_protocol("file_descriptor_received", move |p| match p.as_fd_receiver() {
                Some(r) => r.file_descriptor_received(fd),
                None => tracing::debug!(target: "braid", "closing a descriptor the protocol does not take"),
            });
        }
    }

    /// Sends what is buffered; on a full socket, asks for writability.
    fn send_buffered(&self) -> Result<(), Failure> {
        if self.has(Io::RING) {
            if self.sending.get().is_some() {
                // One send at a time: its completion sends the rest.
                return Ok(());
            }
            if !self.has(Io::FILE)
                && self.queued_len() > 0
                && !self.kind.needs_carrier_byte()
                && !self.reactor.get().is_some_and(|r| r.lone_flush())
            {
                return self.ring_submit();
            }
            // Files go by sendfile(2), and descriptors to pass by
            // sendmsg(2), below, with nothing in flight ahead of them; so
            // does the pass's only sender (`Reactor::lone_flush`).
        }
        if self.has(Io::FILE) && !self.send_file_segment()? {
            return self.wait_writable();
        }
        let sent = self.with_sock(|sock| loop {
            if self.buffered_len() == 0 && self.kind.needs_carrier_byte() {
                // Descriptors must travel with at least one byte.
                self.out_mut().push(&[0]);
            }
            let done = match self.out.borrow_mut().as_mut() {
                Some(out) if out.len() > 0 => out.send(&self.kind, sock),
                _ => Ok(true),
            };
            // A message carries a bounded batch of descriptors: go on
            // while more wait and the socket takes them.
            if !matches!(done, Ok(true)) || !self.kind.needs_carrier_byte() {
                break done;
            }
        });
        let drained = match sent {
            None => return Ok(()),
            Some(Ok(done)) => done,
            Some(Err(Errno::PIPE) | Err(Errno::CONNRESET)) => {
                return Err(Failure::new(Error::ConnectionLost))
            }
            Some(Err(e)) => {
                return Err(Failure::new(Error::io(format!("writing to a {} connection", K::NAME), e.into()))
                    .context("connection lost"))
            }
        };
        let left = self.buffered_len();
        if left <= self.out.borrow().as_ref().map_or(0, |o| o.low as usize) {
            if let Some(p) = self.producer_in(Mode::StreamingPaused, Mode::Streaming) {
                if !self.call_producer("resume_producing", &p, |p| p.resume_producing()) {
                    return Ok(());
                }
            }
        }
        if self.life.get() == Life::Lost {
            return Ok(());
        }
        if !drained {
            if self.has(Io::RING) && !self.has(Io::FILE) && !self.kind.needs_carrier_byte() {
                // What a direct send left goes by the ring, which waits
                // for room itself.
                return self.ring_submit();
            }
            return self.wait_writable();
        }
        if self.replace_io(Io::WRITING, false) {
            if let (Some(me), Some(reactor)) = (self.rc(), self.reactor.get()) {
                reactor.remove_writer(&me);
            }
        }
        if self.has(Io::RING) {
            self.release_out();
        }
        self.drained()
    }

    /// Frees the emptied write buffer of a connection that writes by
    /// completion, unless it holds limits of its own: every reply passes
    /// through it there, and an idle connection should keep no memory for
    /// its last one.
    fn release_out(&self) {
        let mut out = self.out.borrow_mut();
        if out.as_ref().is_some_and(|o| o.is_idle_default()) {
            // Its memory goes to the next connection that writes.
            if let (Some(o), Some(reactor)) = (out.take(), self.reactor.get()) {
                let OutBuf { first, spare, .. } = *o;
                reactor.give_write_chunk(first);
                reactor.give_write_chunk(spare);
            }
        }
    }

    /// Hands the queued chunks to the ring in one send.
    fn ring_submit(&self) -> Result<(), Failure> {
        let reactor = self.reactor.get().ok_or_else(|| Failure::new(Error::ReactorGone))?;
        let me: Rc<dyn RingWriter> = self.rc().ok_or_else(|| Failure::new(Error::ConnectionLost))?;
        let out = self.out_mut().take_for_ring(MAX_IOV);
        match reactor.ring_send(self.fd, me.clone(), out) {
            Ok(key) => {
                self.sending.set(Some(key));
                if self.replace_io(Io::WRITING, false) {
                    // The ring waits for room itself.
                    let me: Rc<dyn FileDescriptor> = me;
                    reactor.remove_writer(&me);
                }
                Ok(())
            }
            Err((e, out)) => {
                self.out_mut().put_back(out, None);
                Err(Failure::new(e).context("connection lost"))
            }
        }
    }

    /// Asks to be told when the socket takes more.
    fn wait_writable(&self) -> Result<(), Failure> {
        if !self.has(Io::WRITING) {
            let me = self.rc().ok_or_else(|| Failure::new(Error::ConnectionLost))?;
            let reactor = self.reactor.get().ok_or_else(|| Failure::new(Error::ReactorGone))?;
            reactor.add_writer(me).map_err(Failure::new)?;
            self.set_io(Io::WRITING, true);
        }
        Ok(())
    }

    /// Sends the bytes queued ahead of a file, then (a bounded part of)
    /// the file; true once the file is all sent.
    fn send_file_segment(&self) -> Result<bool, Failure> {
        loop {
            match self.send_first_file()? {
                Some(true) => {}
                Some(false) => return Ok(false),
                None => {
                    self.set_io(Io::FILE, false);
                    return Ok(true);
                }
            }
        }
    }

    /// Sends what goes before the first queued file and a bounded part of
    /// it: `Some(true)` when it is all sent, `None` when none is queued.
    fn send_first_file(&self) -> Result<Option<bool>, Failure> {
        let Some(mut seg) = self.peek_rare(|r| r.files.pop_front()).flatten() else {
            return Ok(None);
        };
        let result = self.with_sock(|sock| -> Result<bool, Errno> {
            if seg.ahead > 0 {
                let before = self.buffered_len();
                let done = match self.out.borrow_mut().as_mut() {
                    Some(out) => out.send_upto(&self.kind, sock, seg.ahead)?,
                    None => true,
                };
                seg.ahead = seg.ahead.saturating_sub(before - self.buffered_len());
                if !done || seg.ahead > 0 {
                    return Ok(false);
                }
            }
            let want = seg.left.min(SENDFILE_CHUNK as u64) as usize;
            loop {
                match rustix::fs::sendfile(sock, &*seg.file, Some(&mut seg.offset), want) {
                    // The file is shorter than what was queued.
                    Ok(0) => return Err(Errno::NODATA),
                    Ok(n) => {
                        seg.left -= n as u64;
                        // One chunk per turn: the loop comes back for more
                        // once the socket is writable, after the others.
                        return Ok(seg.left == 0);
                    }
                    Err(Errno::INTR) => continue,
                    Err(Errno::AGAIN) => return Ok(false),
                    Err(e) => return Err(e),
                }
            }
        });
        match result {
            None => Ok(Some(false)),
            Some(Ok(true)) => Ok(Some(true)),
            Some(Ok(false)) => {
                self.with_rare(|r| r.files.push_front(seg));
                Ok(Some(false))
            }
            Some(Err(Errno::PIPE) | Err(Errno::CONNRESET)) => Err(Failure::new(Error::ConnectionLost)),
            Some(Err(Errno::NODATA)) => Err(Failure::new(Error::io(
                format!("sending a file to a {} connection", K::NAME),
                std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the file ended before the bytes queued",
                ),
            ))),
            Some(Err(e)) => {
                Err(Failure::new(Error::io(format!("sending a file to a {} connection", K::NAME), e.into())))
            }
        }
    }

    /// Drops a queued file (the connection is aborting or closed).
    fn drop_file(&self) {
        if self.has(Io::FILE) {
            self.set_io(Io::FILE, false);
            drop(self.peek_rare(|r| std::mem::take(&mut r.files)));
        }
    }

    /// Everything buffered is sent: feed a pull producer, or finish a close.
    fn drained(&self) -> Result<(), Failure> {
        if let Some((p, mode)) = self.producer() {
            if mode == Mode::Pull {
                self.call_producer("resume_producing", &p, |p| p.resume_producing());
            }
            // Twisted: a close waits until the producer is unregistered.
            return Ok(());
        }
        if self.life.get() == Life::Disconnecting {
            if self.buffered_len() == 0 {
                return Err(Failure::new(Error::ConnectionDone));
            }
            return Ok(());
        }
        if self.write_side.get() == WriteSide::ShutdownAsked {
            self.write_side.set(WriteSide::Closed);
            self.with_sock(|sock| self.kind.shutdown_write(sock));
            self.call_protocol("write_connection_lost", |p| {
                if let Some(h) = p.as_half_closeable() {
                    h.write_connection_lost();
                }
            });
        }
        Ok(())
    }

    /// Closes the socket and tells the protocol, exactly once. Each user
    /// callback on the way (the producer's `stop_producing`, the protocol's
    /// `connection_lost`, the connector's notification) is contained on
    /// its own, so one panicking never skips the others.
    pub fn close(&self, reason: Failure) {
        if self.life.get() == Life::Lost {
            return;
        }
        if self.protocol.try_borrow_mut().is_err() {
            // Inside one of the protocol's own calls (a producer it
            // registered panicked, say): abort now, tell it from the loop.
            self.with_rare(|r| {
                r.doomed.get_or_insert(reason);
            });
            self.life.set(Life::Aborting);
            self.queue_flush();
            return;
        }
        self.adopt_layer();
        let reason = self.peek_rare(|r| r.doomed.take()).flatten().unwrap_or(reason);
        let was = self.life.replace(Life::Lost);
        // Removed under the fd it was registered with: O(1), although
        // `fileno()` already reports the connection closed.
        if let (Some(me), Some(reactor)) = (self.rc(), self.reactor.get()) {
            reactor.forget_at(self.fd, &me);
        }
        self.set_io(Io::READING | Io::WRITING, false);
        if let Some(key) = self.ring.replace(RingRecv::Off).key() {
            // Before the close: the receive must not keep the socket open.
            if let (Some(me), Some(reactor)) = (self.rc(), self.reactor.get()) {
                let me: Rc<dyn RingReader> = me;
                reactor.ring_read_forget(key, &me);
            }
        }
        if self.has(Io::HELD) {
            self.set_io(Io::HELD, false);
            drop(self.peek_rare(|r| {
                r.held_at = 0;
                std::mem::take(&mut r.held_in)
            }));
        }
        if let Some(key) = self.sending.take() {
            // Before the close, as for the receive.
            if let (Some(me), Some(reactor)) = (self.rc(), self.reactor.get()) {
                let me: Rc<dyn RingWriter> = me;
                reactor.ring_send_forget(key, &me);
            }
        }
        if let Some(sock) = self.sock.take() {
            if was == Life::Aborting {
                self.kind.prepare_abort(&sock);
            }
            drop(sock);
        }
        *self.out.borrow_mut() = None;
        self.drop_file();
        let prefix = self.log_prefix();
        if let Some(producer) = self.producer.take() {
            run_logged(
                || format!("in the producer's stop_producing on {prefix}"),
                || {
                    producer.stop_producing();
                    Ok(())
                },
            );
        }
        let protocol = self.protocol.borrow_mut().take();
        if let Some(mut p) = protocol {
            let why = reason.clone();
            run_logged(
                || format!("in connection_lost of {prefix}"),
                move || {
                    p.connection_lost(why);
                    Ok(())
                },
            );
        }
        if let Some(f) = self.on_lost.take() {
            run_logged(
                || format!("in the connector's notification for {prefix}"),
                move || {
                    f(reason);
                    Ok(())
                },
            );
        }
    }

    fn closing(&self) -> bool {
        matches!(self.life.get(), Life::Lost | Life::Aborting)
    }
}

impl<K: Kind> Flush for Connection<K> {
    fn flush(&self) {
        // Already flushed since it was queued (after a read): nothing to do.
        if !self.replace_io(Io::FLUSH_QUEUED, false) || self.life.get() == Life::Lost {
            return;
        }
        if self.life.get() == Life::Aborting {
            self.close(Failure::new(Error::ConnectionAborted));
            return;
        }
        if self.has(Io::HELD) && self.has(Io::READING) {
            if let Some(reactor) = self.reactor.get() {
                if let Err(reason) = self.release_held(&reactor) {
                    if let Some(me) = self.rc() {
                        reactor.disconnect_reader(self.fd, me, reason);
                    }
                    return;
                }
                if self.life.get() == Life::Lost {
                    return;
                }
            }
        }
        if let Err(reason) = self.send_buffered() {
            self.close(reason);
        }
    }
}

impl<K: Kind> FileDescriptor for Connection<K> {
    fn reads_errors(&self) -> bool {
        // A write-only kind is watched for reading only to hear its peer
        // go away, which is an error event: `do_read` tells how it ended.
        !K::READS
    }

    fn fileno(&self) -> RawFd {
        if self.life.get() == Life::Lost {
            -1
        } else {
            self.fd
        }
    }

    fn do_read(&self) -> Result<(), Failure> {
        if !K::READS {
            // Only a kind that hears its peer close is watched: this is it.
            // Bytes still waiting are bytes the peer will never read.
            let why = if self.buffered_len() > 0 { Error::ConnectionLost } else { Error::ConnectionDone };
            return Err(Failure::new(why));
        }
        let Some(reactor) = self.reactor.get() else { return Ok(()) };
        // Left over only if a protocol panicked mid-read: never send it.
        reactor.write_stage().clear();
        let mut buf = reactor.take_read_buffer();
        let result =
            self.with_sock(|sock| self.kind.recv(sock, &mut buf[..READ_CHUNK])).unwrap_or(Err(Errno::BADF));
        let outcome = match result {
            Ok(0) => {
                self.deliver_fds();
                Err(Failure::new(Error::ConnectionDone))
            }
            Ok(n) => {
                self.deliver_fds();
                self.deliver(&reactor, &mut buf[..n]);
                Ok(())
            }
            Err(Errno::AGAIN) | Err(Errno::INTR) => Ok(()),
            Err(Errno::CONNRESET) => Err(Failure::new(Error::ConnectionLost)),
            Err(e) => {
                Err(Failure::new(Error::io(format!("reading from a {} connection", K::NAME), e.into())))
            }
        };
        reactor.return_read_buffer(buf);
        outcome
    }

    fn do_write(&self) -> Result<(), Failure> {
        if self.life.get() == Life::Aborting {
            return Err(Failure::new(Error::ConnectionAborted));
        }
        self.send_buffered()
    }

    fn connection_lost(&self, reason: Failure) {
        self.close(reason);
    }

    fn half_closeable(&self) -> bool {
        if !K::WRITES || !K::READS {
            // Nothing is left open once the only direction has ended (for
            // a write-only kind, the "read" side is its peer going away).
            return false;
        }
        let Ok(mut p) = self.protocol.try_borrow_mut() else { return false };
        let Some(p) = p.as_mut() else { return false };
        catch_panic(|| Ok(p.as_half_closeable().is_some())).unwrap_or(false)
    }

    fn read_connection_lost(&self, _reason: Failure) {
        self.set_io(Io::READING, false);
        self.set_io(Io::READ_CLOSED, true);
        self.call_protocol("read_connection_lost", |p| {
            if let Some(h) = p.as_half_closeable() {
                h.read_connection_lost();
            }
        });
    }

    fn log_prefix(&self) -> String {
        format!("{} connection with {}", K::NAME, self.kind.peer())
    }
}

impl<K: Kind> RingWriter for Connection<K> {
    fn ring_sent(&self, result: Result<usize, Errno>, mut out: Outgoing) -> Result<(), Failure> {
        self.sending.set(None);
        if self.closing() {
            return Ok(());
        }
        let spare = match result {
            Ok(n) => out.consume(n),
            // Not sent (the socket was full, for a descriptor the kernel
            // would not wait on): wait for room as a readiness backend does.
            Err(Errno::AGAIN) | Err(Errno::INTR) => None,
            Err(Errno::PIPE) | Err(Errno::CONNRESET) => return Err(Failure::new(Error::ConnectionLost)),
            Err(e) => {
                return Err(Failure::new(Error::io(format!("writing to a {} connection", K::NAME), e.into()))
                    .context("connection lost"))
            }
        };
        let left = out.len();
        if left > 0 && self.has(Io::FILE) {
            // The unsent rest goes before the first queued file too.
            self.with_rare(|r| {
                if let Some(first) = r.files.front_mut() {
                    first.ahead += left;
                }
            });
        }
        self.out_mut().put_back(out, spare);
        if matches!(result, Err(Errno::AGAIN) | Err(Errno::INTR)) {
            return self.wait_writable();
        }
        if self.buffered_len() <= self.out.borrow().as_ref().map_or(0, |o| o.low as usize) {
            if let Some(p) = self.producer_in(Mode::StreamingPaused, Mode::Streaming) {
                if !self.call_producer("resume_producing", &p, |p| p.resume_producing()) {
                    return Ok(());
                }
            }
        }
        if self.life.get() == Life::Lost {
            return Ok(());
        }
        if self.queued_len() > 0 || self.has(Io::FILE) || self.kind.needs_carrier_byte() {
            // Sent at the end of the pass, with what this pass adds (and
            // descriptors waiting to be passed, by sendmsg).
            self.queue_flush();
            return Ok(());
        }
        self.release_out();
        self.drained()
    }
}

impl<K: Kind> RingReader for Connection<K> {
    fn ring_received(&self, got: RingRead<'_>, ended: bool) -> Result<(), Failure> {
        if ended {
            self.ring.set(RingRecv::Off);
        }
        if self.life.get() == Life::Lost {
            return Ok(());
        }
        let Some(reactor) = self.reactor.get() else { return Ok(()) };
        // Paused (or bytes still held): keep it for the protocol.
        let hold = !self.has(Io::READING) || self.has(Io::HELD);
        match got {
            RingRead::Data(data, fds) if hold => {
                if !fds.is_empty() {
                    // Kept by the kind, for when the held bytes go.
                    self.kind.put_received_fds(fds);
                }
                self.with_rare(|r| r.held_in.extend_from_slice(data));
                self.set_io(Io::HELD, true);
            }
            RingRead::Data(data, fds) => {
                if !fds.is_empty() {
                    // Before the bytes that carried them, as `do_read`.
                    self.kind.put_received_fds(fds);
                    self.deliver_fds();
                }
                reactor.write_stage().clear();
                self.deliver(&reactor, data);
            }
            // Not held: the receive has ended, and the one started when
            // reading resumes finds the end of the stream again, on a
            // later pass, after what was held (as a readiness backend
            // would read it).
            RingRead::Eof if hold => return Ok(()),
            RingRead::Eof => return Err(Failure::new(Error::ConnectionDone)),
            RingRead::Error(Errno::CONNRESET) => return Err(Failure::new(Error::ConnectionLost)),
            RingRead::Error(e) => {
                return Err(Failure::new(Error::io(
                    format!("reading from a {} connection", K::NAME),
                    e.into(),
                )))
            }
            RingRead::Nothing | RingRead::Accepted(_) => {}
        }
        // The receive ended while still wanted (the ring ran out of
        // buffers, or a resume came during its cancellation): again.
        if ended
            && self.life.get() == Life::Open
            && self.has(Io::READING)
            && !self.has(Io::HELD)
            && self.ring.get() == RingRecv::Off
        {
            self.ring_start(&reactor).map_err(Failure::new)?;
        }
        Ok(())
    }

    fn ring_reading(&self) -> bool {
        self.has(Io::READING)
    }

    fn descriptor(self: Rc<Self>) -> Rc<dyn FileDescriptor> {
        self
    }
}

impl<K: Kind> Producer for Connection<K> {
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

/// What the connection does itself; the application's calls come here
/// unless a layer was started on the connection (see [`Layer`]).
impl<K: Kind> Connection<K> {
    #[inline]
    fn raw_write(&self, data: &[u8]) {
        if self.closing() || self.write_side.get() == WriteSide::Closed || data.is_empty() {
            return;
        }
        if self.has(Io::IN_READ)
            && self.buffered_len() == 0
            && !self.has(Io::FILE)
            && self.sending.get().is_none()
        {
            let Some(reactor) = self.reactor.get() else { return };
            let mut stage = reactor.write_stage();
            let high = self.out.borrow().as_ref().map_or(DEFAULT_HIGH_WATER, |o| o.high as usize);
            if stage.len() + data.len() > high {
                // A burst past the high-water mark. With nothing queued
                // ahead of it, what the kernel takes now is neither copied
                // nor counted; the rest goes to the connection's own
                // buffer, where a registered producer is paused. (A send
                // error is left for the flush to find, as below.)
                let sent = if stage.is_empty() {
                    self.with_sock(|sock| self.kind.send(sock, data).unwrap_or(0)).unwrap_or(0)
                } else {
                    0
                };
                drop(stage);
                if sent == data.len() {
                    return;
                }
                self.unstage();
                self.out_mut().push(&data[sent..]);
                self.after_write();
                return;
            }
            let mut sent = 0;
            if stage.is_empty() && data.len() >= DIRECT_WRITE {
                // Large, and nothing queued ahead of it (nor in a ring
                // send): send it now rather than copy it, on a ring too,
                // where the copy would cost more than the system call it
                // saves. A failure is left for the flush after
                // data_received to find, so the connection is never closed
                // from inside the protocol's own call.
                sent = self.with_sock(|sock| self.kind.send(sock, data).unwrap_or(0)).unwrap_or(0);
            }
            // The rest is sent when data_received returns; see `flush_stage`.
            stage.extend_from_slice(&data[sent..]);
            drop(stage);
            self.queue_flush();
            return;
        }
        self.out_mut().push(data);
        self.after_write();
    }

    fn raw_write_vec(&self, data: Vec<u8>) {
        if self.closing() || self.write_side.get() == WriteSide::Closed || data.is_empty() {
            return;
        }
        self.unstage();
        self.out_mut().push_vec(data);
        self.after_write();
    }

    fn raw_write_sequence(&self, data: &[&[u8]]) {
        if self.closing() || self.write_side.get() == WriteSide::Closed {
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

    fn raw_lose_connection(&self) {
        if self.life.get() != Life::Open {
            return;
        }
        self.life.set(Life::Disconnecting);
        self.stop_reading();
        self.queue_flush();
    }

    fn raw_abort_connection(&self) {
        if self.closing() {
            return;
        }
        self.life.set(Life::Aborting);
        self.stop_reading();
        *self.out.borrow_mut() = None;
        self.drop_file();
        self.queue_flush();
    }

    fn raw_lose_write_connection(&self) {
        if !K::READS {
            // Writing is all it does: ending it ends the connection.
            return self.raw_lose_connection();
        }
        if self.closing() || self.write_side.get() != WriteSide::Open {
            return;
        }
        self.write_side.set(WriteSide::ShutdownAsked);
        self.queue_flush();
    }

    fn raw_pause_producing(&self) {
        self.set_io(Io::PAUSED, true);
        self.stop_reading();
    }

    fn raw_resume_producing(&self) {
        self.set_io(Io::PAUSED, false);
        self.start_reading();
    }

    fn raw_stop_producing(&self) {
        self.raw_lose_connection();
    }

    fn raw_register_producer(&self, producer: Rc<dyn Producer>, streaming: bool) -> Result<(), Error> {
        if self.producer().is_some() {
            return Err(Error::io(
                "registering a producer",
                std::io::Error::new(std::io::ErrorKind::AlreadyExists, "a producer is already registered"),
            ));
        }
        if self.life.get() == Life::Lost {
            // Twisted: a producer registered on a dead transport is stopped.
            self.call_producer("stop_producing", &producer, |p| p.stop_producing());
            return Ok(());
        }
        let mode = if streaming { Mode::Streaming } else { Mode::Pull };
        self.producer.set(Some(producer.clone()));
        self.mode.set(mode);
        if !streaming {
            // A pull producer is asked for its first chunk at once.
            self.call_producer("resume_producing", &producer, |p| p.resume_producing());
        }
        Ok(())
    }

    fn raw_unregister_producer(&self) {
        self.producer.take();
        // A close that waited for the producer can go on now.
        if self.life.get() == Life::Disconnecting || self.write_side.get() == WriteSide::ShutdownAsked {
            self.queue_flush();
        }
    }

    fn raw_set_write_buffer_limits(&self, high: usize, low: usize) {
        let high = u32::try_from(high).unwrap_or(u32::MAX);
        let mut out = self.out_mut();
        out.high = high;
        out.low = u32::try_from(low).unwrap_or(u32::MAX).min(high);
    }

    fn raw_buffered(&self) -> usize {
        let file = if self.has(Io::FILE) {
            self.peek_rare(|r| r.files.iter().map(|f| f.left).sum::<u64>()).unwrap_or(0)
        } else {
            0
        };
        self.buffered_len() + usize::try_from(file).unwrap_or(usize::MAX)
    }

    /// Queues `len` bytes of `file` from `offset` to go out by sendfile(2)
    /// after what is buffered (see `Transport::write_file`).
    fn raw_write_file(&self, file: &Rc<std::fs::File>, offset: u64, len: u64) -> bool {
        if self.closing() || self.write_side.get() == WriteSide::Closed {
            // Ignored, as writes after the end are.
            return true;
        }
        if self.kind.needs_carrier_byte() || !file.metadata().is_ok_and(|m| m.is_file()) {
            return false;
        }
        if len == 0 {
            return true;
        }
        self.unstage();
        let buffered = self.queued_len();
        self.with_rare(|r| {
            let before: usize = r.files.iter().map(|f| f.ahead).sum();
            let ahead = buffered.saturating_sub(before);
            r.files.push_back(FileSegment { file: file.clone(), offset, left: len, ahead });
        });
        self.set_io(Io::FILE, true);
        self.queue_flush();
        true
    }

    fn raw_connected(&self) -> bool {
        self.life.get() == Life::Open
    }
}

impl<K: Kind> TransportOps for Connection<K> {
    fn into_producer(self: Rc<Self>) -> Option<Rc<dyn Producer>> {
        Some(self)
    }

    fn host(&self) -> Option<Address> {
        self.with_sock(|sock| {
            rustix::net::getsockname(sock).ok().and_then(|a| Address::from_sockaddr(&a).ok())
        })?
    }

    fn peer(&self) -> Address {
        self.kind.peer()
    }

    fn tcp(self: Rc<Self>) -> Option<Rc<dyn TcpOptions>> {
        K::tcp_options(self)
    }

    fn unix(self: Rc<Self>) -> Option<Rc<dyn UnixOptions>> {
        K::unix_options(self)
    }

    fn tls(self: Rc<Self>) -> Option<Rc<dyn TlsOptions>> {
        self.upper().and_then(|up| up.tls())
    }

    fn insert_layer(self: Rc<Self>, make: MakeLayer) -> Result<(), Error> {
        self.start_layer(make)
    }

    #[inline]
    fn write(&self, data: &[u8]) {
        match self.upper() {
            None => self.raw_write(data),
            Some(up) => up.write(data),
        }
    }

    fn write_vec(&self, data: Vec<u8>) {
        match self.upper() {
            None => self.raw_write_vec(data),
            Some(up) => up.write_vec(data),
        }
    }

    fn write_sequence(&self, data: &[&[u8]]) {
        match self.upper() {
            None => self.raw_write_sequence(data),
            Some(up) => up.write_sequence(data),
        }
    }

    fn lose_connection(&self) {
        match self.upper() {
            None => self.raw_lose_connection(),
            Some(up) => up.lose_connection(),
        }
    }

    fn abort_connection(&self) {
        match self.upper() {
            None => self.raw_abort_connection(),
            Some(up) => up.abort_connection(),
        }
    }

    fn lose_write_connection(&self) {
        match self.upper() {
            None => self.raw_lose_write_connection(),
            Some(up) => up.lose_write_connection(),
        }
    }

    fn pause_producing(&self) {
        match self.upper() {
            None => self.raw_pause_producing(),
            Some(up) => up.pause_producing(),
        }
    }

    fn resume_producing(&self) {
        match self.upper() {
            None => self.raw_resume_producing(),
            Some(up) => up.resume_producing(),
        }
    }

    fn stop_producing(&self) {
        match self.upper() {
            None => self.raw_stop_producing(),
            Some(up) => up.stop_producing(),
        }
    }

    fn register_producer(&self, producer: Rc<dyn Producer>, streaming: bool) -> Result<(), Error> {
        match self.upper() {
            None => self.raw_register_producer(producer, streaming),
            Some(up) => up.register_producer(producer, streaming),
        }
    }

    fn unregister_producer(&self) {
        match self.upper() {
            None => self.raw_unregister_producer(),
            Some(up) => up.unregister_producer(),
        }
    }

    fn set_write_buffer_limits(&self, high: usize, low: usize) {
        match self.upper() {
            None => self.raw_set_write_buffer_limits(high, low),
            Some(up) => up.set_write_buffer_limits(high, low),
        }
    }

    fn buffered(&self) -> usize {
        match self.upper() {
            None => self.raw_buffered(),
            Some(up) => up.buffered(),
        }
    }

    fn write_file(&self, file: &Rc<std::fs::File>, offset: u64, len: u64) -> bool {
        match self.upper() {
            None => self.raw_write_file(file, offset, len),
            Some(up) => up.write_file(file, offset, len),
        }
    }

    fn connected(&self) -> bool {
        match self.upper() {
            None => self.raw_connected(),
            Some(up) => up.connected(),
        }
    }
}

/// The connection's own side under a layer: the layer's transport below,
/// whose calls bypass the layer.
struct Below<K: Kind>(Rc<Connection<K>>);

impl<K: Kind> TransportOps for Below<K> {
    fn write(&self, data: &[u8]) {
        self.0.raw_write(data)
    }
    fn write_vec(&self, data: Vec<u8>) {
        self.0.raw_write_vec(data)
    }
    fn write_sequence(&self, data: &[&[u8]]) {
        self.0.raw_write_sequence(data)
    }
    fn lose_connection(&self) {
        self.0.raw_lose_connection()
    }
    fn abort_connection(&self) {
        self.0.raw_abort_connection()
    }
    fn lose_write_connection(&self) {
        self.0.raw_lose_write_connection()
    }
    fn host(&self) -> Option<Address> {
        self.0.host()
    }
    fn peer(&self) -> Address {
        self.0.peer()
    }
    fn tcp(self: Rc<Self>) -> Option<Rc<dyn TcpOptions>> {
        K::tcp_options(self.0.clone())
    }
    fn unix(self: Rc<Self>) -> Option<Rc<dyn UnixOptions>> {
        K::unix_options(self.0.clone())
    }
    fn pause_producing(&self) {
        self.0.raw_pause_producing()
    }
    fn resume_producing(&self) {
        self.0.raw_resume_producing()
    }
    fn stop_producing(&self) {
        self.0.raw_stop_producing()
    }
    fn register_producer(&self, producer: Rc<dyn Producer>, streaming: bool) -> Result<(), Error> {
        self.0.raw_register_producer(producer, streaming)
    }
    fn unregister_producer(&self) {
        self.0.raw_unregister_producer()
    }
    fn set_write_buffer_limits(&self, high: usize, low: usize) {
        self.0.raw_set_write_buffer_limits(high, low)
    }
    fn buffered(&self) -> usize {
        self.0.raw_buffered()
    }
    fn write_file(&self, file: &Rc<std::fs::File>, offset: u64, len: u64) -> bool {
        self.0.raw_write_file(file, offset, len)
    }
    fn connected(&self) -> bool {
        self.0.raw_connected()
    }
}

impl TcpOptions for Connection<Tcp> {
    fn splice_source(self: Rc<Self>) -> Option<Rc<dyn std::any::Any>> {
        // Under a layer the bytes on the socket are not the application's.
        // On a ring, bytes may already be in the ring's buffers or held.
        if self.has(Io::LAYERED) || self.has(Io::RING) {
            return None;
        }
        Some(self)
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
}

impl<K: Kind> Connection<K> {
    /// The kind's own state.
    /// The descriptor number, as registered with the reactor.
    pub(crate) fn raw_fd(&self) -> RawFd {
        self.fd
    }

    /// Runs `f` with the socket, unless it is closed.
    pub(crate) fn with_socket<R>(&self, f: impl FnOnce(&OwnedFd) -> R) -> Option<R> {
        self.with_sock(f)
    }

    /// Shuts the write side now (`SHUT_WR`), bypassing the buffer: for a
    /// relay that writes to the socket itself.
    pub(crate) fn shutdown_write_now(&self) {
        self.with_sock(|sock| self.kind.shutdown_write(sock));
    }

    pub(crate) fn kind(&self) -> &K {
        &self.kind
    }

    /// True while writes are still taken (not closing, write side open).
    pub(crate) fn writable(&self) -> bool {
        self.life.get() == Life::Open && self.write_side.get() == WriteSide::Open
    }

    /// Asks for a flush at the end of the pass, as a write does, for work
    /// the kind queued (descriptors to pass).
    pub(crate) fn wake_writer(&self) {
        self.queue_flush();
    }

    /// The peer's credentials (for the UNIX kind).
    pub(crate) fn socket_peer_credentials(&self) -> Result<crate::stream::unix_io::Credentials, Error> {
        self.with_sock(|s| crate::stream::unix_io::peer_credentials(s)).unwrap_or(Err(Error::ConnectionDone))
    }

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
        if !self.has(Io::IN_READ) {
            return;
        }
        let Some(reactor) = self.reactor.get() else { return };
        let mut stage = reactor.write_stage();
        if !stage.is_empty() {
            self.out_mut().push(&stage);
            stage.clear();
            drop(stage);
            self.after_write();
        }
    }

    /// Sends what the protocol wrote during data_received straight from the
    /// shared stage; whatever the kernel does not take now is copied into
    /// the connection's own buffer, to go out when the socket is writable.
    fn flush_stage(&self, reactor: &Reactor) {
        let mut stage = reactor.write_stage();
        if stage.is_empty() {
            return;
        }
        if self.closing() {
            stage.clear();
            return;
        }
        if self.has(Io::RING) {
            // Gathered with the pass's other writes into one send at its
            // end; a large reply moves into an empty queue without a copy
            // (a small one is copied, so the stage keeps its memory).
            if self.queued_len() == 0 && stage.len() >= CHUNK {
                self.out_mut().swap_in(&mut stage);
            } else {
                self.out_mut().push(&stage);
                stage.clear();
            }
            drop(stage);
            self.after_write();
            return;
        }
        let sent = self.with_sock(|sock| loop {
            match self.kind.send(sock, &stage) {
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
        std::cell::RefMut::map(self.out.borrow_mut(), |o| &mut **o.get_or_insert_with(|| self.new_out()))
    }

    /// A new write buffer; on a ring, in memory another connection gave
    /// back (see `release_out`).
    fn new_out(&self) -> Box<OutBuf> {
        let mut out = Box::<OutBuf>::default();
        if self.has(Io::RING) {
            if let Some(reactor) = self.reactor.get() {
                out.first = reactor.take_write_chunk();
            }
        }
        out
    }

    /// Bytes not yet taken by the kernel: queued, and in a ring send.
    #[inline]
    fn buffered_len(&self) -> usize {
        self.out.borrow().as_ref().map_or(0, |o| o.len() + o.flying)
    }

    /// Bytes queued and not yet handed to a send.
    #[inline]
    fn queued_len(&self) -> usize {
        self.out.borrow().as_ref().map_or(0, |o| o.len())
    }

    /// The registered producer and its mode, if any.
    #[inline]
    fn producer(&self) -> Option<(Rc<dyn Producer>, Mode)> {
        let registered = self.producer.take();
        let found = registered.as_ref().map(|p| (p.clone(), self.mode.get()));
        self.producer.set(registered);
        found
    }

    /// If the producer is in mode `from`, switches it to `to` and returns it.
    fn producer_in(&self, from: Mode, to: Mode) -> Option<Rc<dyn Producer>> {
        if self.mode.get() != from {
            return None;
        }
        let registered = self.producer.take();
        let found = registered.clone();
        self.producer.set(registered);
        if found.is_some() {
            self.mode.set(to);
        }
        found
    }

    #[inline]
    fn after_write(&self) {
        self.queue_flush();
        let over = self.out.borrow().as_ref().is_some_and(|o| o.len + o.flying > o.high as usize);
        if over {
            if let Some(p) = self.producer_in(Mode::Streaming, Mode::StreamingPaused) {
                self.call_producer("pause_producing", &p, |p| p.pause_producing());
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
            let tcp = crate::stream::kind::Tcp { peer: ([127, 0, 0, 1], 1).into() };
            let done = out.send(&tcp, &a).unwrap();
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

        /// Ring sends: chunks taken for a send, partly sent, and put back
        /// ahead of what was written meanwhile, come out complete and in
        /// order; in-flight bytes count as buffered until put back.
        #[test]
        fn ring_sends_keep_the_order(steps in proptest::collection::vec((0usize..40_000, any::<bool>(), 0usize..70_000, 1usize..5), 1..30)) {
            let mut out = OutBuf::default();
            let mut expected = Vec::new();
            let mut got = Vec::new();
            let mut byte = 0u8;
            for (len, owned, sent, max) in steps {
                let data: Vec<u8> = (0..len).map(|_| { byte = byte.wrapping_add(1); byte }).collect();
                expected.extend_from_slice(&data);
                if owned { out.push_vec(data) } else { out.push(&data) }
                if out.len() == 0 {
                    continue;
                }
                let total = out.len();
                let mut flight = out.take_for_ring(max);
                prop_assert_eq!(out.len() + out.flying, total);
                // Written while the send is in the kernel.
                let more: Vec<u8> = (0..len / 3).map(|_| { byte = byte.wrapping_add(1); byte }).collect();
                let n = sent.min(flight.len());
                let flat: Vec<u8> = flight.slices().flatten().copied().collect();
                got.extend_from_slice(&flat[..n]);
                out.push(&more);
                let spare = flight.consume(n);
                prop_assert_eq!(flight.len(), flat.len() - n);
                out.put_back(flight, spare);
                prop_assert_eq!(out.flying, 0);
                // `more` is expected after the unsent rest: it was pushed
                // after everything taken.
                expected.extend_from_slice(&more);
            }
            got.extend(drain(&mut out));
            prop_assert!(got == expected, "{} bytes out, {} expected", got.len(), expected.len());
        }
    }
}
