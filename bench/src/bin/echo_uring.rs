//! A hand-written single-threaded echo loop on io_uring, the least work an io_uring echo server
//! does, as `echo_mio` is for epoll: one multishot accept; per connection one multishot receive
//! into a shared provided-buffer ring; at most one send in flight, carrying everything received
//! since the last one. No reactor, no timers, no protocol dispatch. `bench-all` runs it beside
//! braid-io_uring to show what the interface allows on this kernel at best.
//!
//! `echo_uring --port N` (0 picks a free port); prints `listening on 127.0.0.1:PORT`.
//!
//! It talks to the kernel directly, so unlike the rest of the bench crate it has `unsafe`, all
//! in `mod ring`, each block with a SAFETY comment. It stands for a user's program; braid's own
//! `unsafe` stays in its backend/ and sys/ modules.
#![allow(unsafe_code)]

use std::io::{self, ErrorKind};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, OwnedFd};

use io_uring::{cqueue, opcode, types, IoUring};

/// Provided buffers: as many as braid's pool holds at most, of the same size.
const BUFS: u16 = 1024;
const BUF_SIZE: usize = 64 * 1024;
/// Echoed bytes waiting beyond which a connection stops receiving, and below which it starts
/// again (a peer that does not read must not grow the server without bound).
const HIGH: usize = 1 << 20;
const LOW: usize = 256 << 10;

/// What a completion is for: the top byte of its user data.
const ACCEPT: u64 = 1 << 56;
const RECV: u64 = 2 << 56;
const SEND: u64 = 3 << 56;
const IGNORED: u64 = 4 << 56;
const KIND: u64 = 0xff << 56;

/// The ring and the buffers it shares with the kernel.
mod ring {
    use std::io;
    use std::os::fd::{FromRawFd, OwnedFd, RawFd};
    use std::ptr::NonNull;
    use std::sync::atomic::{AtomicU16, Ordering};

    use io_uring::types::BufRingEntry;
    use io_uring::{opcode, squeue, types, IoUring};

    /// The buffer group the receives take from.
    pub const GROUP: u16 = 0;
    /// Buffers start half a page into their mapping. The allocator's large blocks (what a
    /// connection's pending bytes grow into) start just past a page boundary; copying between
    /// addresses a few bytes apart modulo 4 KiB runs several times slower (4K aliasing).
    const SKEW: usize = 2048;

    /// A fresh private anonymous mapping; its pages cost nothing until written.
    fn map(len: usize) -> io::Result<NonNull<u8>> {
        // SAFETY: a new mapping at an address of the kernel's choosing; no existing memory
        // is touched.
        let p = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                len,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::PRIVATE,
            )
        }?;
        NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))
    }

    /// A registered ring of up to `count` buffers of `size` bytes. It lives as long as the
    /// process (the loop never ends), so it is never unmapped.
    ///
    /// The kernel takes buffers in the order they were published, so a ring holding all
    /// `count` would cycle a single busy connection through all of them, and each receive would
    /// land in memory long out of cache. So only `want` are published; it starts small and
    /// doubles whenever the ring runs dry, and the rest wait on a stack.
    pub struct Bufs {
        entries: NonNull<BufRingEntry>,
        data: NonNull<u8>,
        count: u16,
        size: usize,
        tail: u16,
        published: usize,
        want: usize,
        idle: Vec<u16>,
    }

    impl Bufs {
        /// Maps and registers the ring and publishes the first buffers.
        pub fn new(ring: &IoUring, count: u16, size: usize) -> io::Result<Bufs> {
            assert!(count.is_power_of_two(), "a buffer ring's size is a power of two");
            let entries = map(usize::from(count) * std::mem::size_of::<BufRingEntry>())?.cast();
            let data = map(SKEW + usize::from(count) * size)?;
            // SAFETY: `entries` is a page-aligned mapping of `count` entries that this value
            // keeps for the life of the process, so for as long as the ring may read it.
            unsafe {
                ring.submitter().register_buf_ring_with_flags(entries.as_ptr() as u64, count, GROUP, 0)
            }?;
            let idle = (0..count).rev().collect();
            let want = usize::from(count).min(16);
            let mut bufs = Bufs { entries, data, count, size, tail: 0, published: 0, want, idle };
            bufs.top_up();
            Ok(bufs)
        }

        /// The ring ran dry: publish twice as many.
        pub fn grow(&mut self) {
            let want = (self.want * 2).min(usize::from(self.count));
            if want != self.want {
                eprintln!("the buffer ring ran dry: publishing {want} buffers");
            }
            self.want = want;
            self.top_up();
        }

        fn top_up(&mut self) {
            while self.published < self.want {
                let Some(bid) = self.idle.pop() else { break };
                self.publish(bid);
            }
        }

        /// The first `len` bytes of buffer `bid`, which a completion just handed us.
        pub fn get(&self, bid: u16, len: usize) -> &[u8] {
            assert!(bid < self.count && len <= self.size, "buffer {bid} of {len} bytes is not in the ring");
            // SAFETY: in bounds (checked above); the kernel wrote these bytes before posting
            // the completion that named `bid`, and does not touch the buffer again until
            // `give_back` publishes it.
            unsafe { std::slice::from_raw_parts(self.buffer(bid), len) }
        }

        fn buffer(&self, bid: u16) -> *mut u8 {
            debug_assert!(bid < self.count);
            // SAFETY: `bid < count`, so the offset stays inside the data mapping.
            unsafe { self.data.as_ptr().add(SKEW + usize::from(bid) * self.size) }
        }

        /// Takes back buffer `bid`, which a completion named, once its bytes are used.
        pub fn give_back(&mut self, bid: u16) {
            self.published -= 1;
            if self.published < self.want {
                self.publish(bid);
            } else {
                self.idle.push(bid);
            }
        }

        fn publish(&mut self, bid: u16) {
            self.published += 1;
            let slot = usize::from(self.tail & (self.count - 1));
            // SAFETY: `slot < count`, inside the entries mapping. The kernel reads entries only
            // between its head and the published tail, and this slot is at the tail, so it is
            // ours to write; the setters leave entry 0's tail field alone.
            unsafe {
                let entry = &mut *self.entries.as_ptr().add(slot);
                entry.set_addr(self.buffer(bid) as u64);
                entry.set_len(self.size as u32);
                entry.set_bid(bid);
            }
            self.tail = self.tail.wrapping_add(1);
            // SAFETY: the tail is an aligned u16 inside entry 0 that the kernel only reads; the
            // release store publishes the entry written above before the new tail.
            unsafe {
                let shared = BufRingEntry::tail(self.entries.as_ptr()) as *mut u16;
                AtomicU16::from_ptr(shared).store(self.tail, Ordering::Release);
            }
        }
    }

    /// Queues `entry`, first handing the kernel what is queued if the queue is full.
    ///
    /// # Safety
    /// Whatever memory `entry` points at stays valid and unmoved until its last completion.
    pub unsafe fn push(ring: &mut IoUring, entry: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: per this function's contract.
            if unsafe { ring.submission().push(entry) }.is_ok() {
                return Ok(());
            }
            ring.submit()?;
        }
    }

    /// Queues a request that points at no memory of ours.
    pub fn push_plain(ring: &mut IoUring, entry: &squeue::Entry) -> io::Result<()> {
        // SAFETY: accept, multishot receive (into ring buffers, which live for the process)
        // and cancel point at no memory that could go away.
        unsafe { push(ring, entry) }
    }

    /// Queues a send of `data` on `fd`.
    ///
    /// # Safety
    /// `data` stays allocated, unmoved and unchanged until the send's completion.
    pub unsafe fn push_send(ring: &mut IoUring, fd: RawFd, data: &[u8], user_data: u64) -> io::Result<()> {
        let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
        let entry = opcode::Send::new(types::Fd(fd), data.as_ptr(), len)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(user_data);
        // SAFETY: per this function's contract.
        unsafe { push(ring, &entry) }
    }

    /// Takes ownership of a descriptor an accept completion returned.
    pub fn accepted(fd: RawFd) -> OwnedFd {
        // SAFETY: the kernel installed `fd` in this process for this accept; nothing else
        // owns it.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }
}

/// One connection. Its receive and its send complete before it is dropped, so no request
/// names a closed (and maybe reused) descriptor or a freed buffer.
struct Conn {
    fd: OwnedFd,
    /// Told apart from an earlier connection in the same slot.
    generation: u32,
    /// Received and not yet handed to a send.
    out: Vec<u8>,
    /// What the send in flight reads; never touched while `sending`.
    flight: Vec<u8>,
    /// How much of `flight` the kernel took.
    sent: usize,
    sending: bool,
    /// A multishot receive is in the kernel.
    receiving: bool,
    /// Receiving was stopped on purpose (too much waiting to be sent).
    paused: bool,
    /// The peer closed its side, or the connection failed (then nothing more is sent).
    ended: bool,
    failed: bool,
    /// Queued for `settle` at the end of this batch of completions.
    dirty: bool,
}

struct Server {
    ring: IoUring,
    bufs: ring::Bufs,
    listener: TcpListener,
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    dirty: Vec<usize>,
    next_generation: u32,
}

fn user_data(kind: u64, id: usize, generation: u32) -> u64 {
    kind | ((generation as u64 & 0xff_ffff) << 32) | id as u64
}

/// The connection a completion names, if it is still the same one; it is queued for `settle`.
fn conn<'a>(conns: &'a mut [Option<Conn>], dirty: &mut Vec<usize>, data: u64) -> Option<&'a mut Conn> {
    let id = (data & 0xffff_ffff) as usize;
    let generation = ((data >> 32) & 0xff_ffff) as u32;
    let c = conns.get_mut(id)?.as_mut()?;
    if c.generation & 0xff_ffff != generation {
        return None;
    }
    if !c.dirty {
        c.dirty = true;
        dirty.push(id);
    }
    Some(c)
}

impl Server {
    fn arm_accept(&mut self) -> io::Result<()> {
        let entry = opcode::AcceptMulti::new(types::Fd(self.listener.as_raw_fd()))
            .flags(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
            .build()
            .user_data(ACCEPT);
        ring::push_plain(&mut self.ring, &entry)
    }

    fn arm_recv(&mut self, id: usize) -> io::Result<()> {
        let Some(c) = self.conns[id].as_mut() else { return Ok(()) };
        c.receiving = true;
        let entry = opcode::RecvMulti::new(types::Fd(c.fd.as_raw_fd()), ring::GROUP)
            .build()
            .user_data(user_data(RECV, id, c.generation));
        ring::push_plain(&mut self.ring, &entry)
    }

    fn complete(&mut self, data: u64, res: i32, flags: u32) -> io::Result<()> {
        match data & KIND {
            ACCEPT => {
                if res >= 0 {
                    let fd = ring::accepted(res);
                    let id = self.free.pop().unwrap_or_else(|| {
                        self.conns.push(None);
                        self.conns.len() - 1
                    });
                    self.next_generation = self.next_generation.wrapping_add(1);
                    self.conns[id] = Some(Conn {
                        fd,
                        generation: self.next_generation,
                        out: Vec::new(),
                        flight: Vec::new(),
                        sent: 0,
                        sending: false,
                        receiving: false,
                        paused: false,
                        ended: false,
                        failed: false,
                        dirty: false,
                    });
                    self.arm_recv(id)?;
                } else {
                    eprintln!("accept: {}", io::Error::from_raw_os_error(-res));
                }
                if !cqueue::more(flags) {
                    self.arm_accept()?;
                }
            }
            RECV => {
                let more = cqueue::more(flags);
                let bid = cqueue::buffer_select(flags);
                let Some(c) = conn(&mut self.conns, &mut self.dirty, data) else {
                    if let Some(bid) = bid {
                        self.bufs.give_back(bid);
                    }
                    return Ok(());
                };
                if !more {
                    c.receiving = false;
                }
                if let Some(bid) = bid {
                    let len = usize::try_from(res).unwrap_or(0);
                    c.out.extend_from_slice(self.bufs.get(bid, len));
                    self.bufs.give_back(bid);
                }
                match res {
                    0 => c.ended = true,
                    // The ring ran dry: `settle` re-arms.
                    r if r == -libc::ENOBUFS => self.bufs.grow(),
                    // We cancelled: `settle` re-arms once enough was sent.
                    r if r == -libc::ECANCELED => {}
                    r if r < 0 => {
                        c.ended = true;
                        c.failed = true;
                    }
                    _ => {}
                }
            }
            SEND => {
                let Some(c) = conn(&mut self.conns, &mut self.dirty, data) else { return Ok(()) };
                c.sending = false;
                if res < 0 {
                    c.ended = true;
                    c.failed = true;
                } else {
                    c.sent += res as usize;
                    if c.sent >= c.flight.len() {
                        c.flight.clear();
                        c.sent = 0;
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// After a batch of completions: sends what waits, stops or restarts receiving, closes.
    fn settle(&mut self, id: usize) -> io::Result<()> {
        let Some(c) = self.conns[id].as_mut() else { return Ok(()) };
        c.dirty = false;
        if c.failed {
            c.out.clear();
        }
        if !c.sending && !c.failed {
            if c.sent == 0 && c.flight.is_empty() {
                std::mem::swap(&mut c.out, &mut c.flight);
            }
            if c.sent < c.flight.len() {
                c.sending = true;
                let ud = user_data(SEND, id, c.generation);
                // SAFETY: `flight` is neither changed nor dropped while `sending` (the
                // connection is dropped only once its send completed); moving the `Conn`
                // moves the vector's header, not its heap buffer.
                unsafe { ring::push_send(&mut self.ring, c.fd.as_raw_fd(), &c.flight[c.sent..], ud) }?;
            }
        }
        let waiting = c.out.len() + c.flight.len() - c.sent;
        if !c.ended && !c.failed {
            if c.receiving && !c.paused && waiting > HIGH {
                c.paused = true;
                let entry =
                    opcode::AsyncCancel::new(user_data(RECV, id, c.generation)).build().user_data(IGNORED);
                ring::push_plain(&mut self.ring, &entry)?;
            } else if !c.receiving && (!c.paused || waiting < LOW) {
                c.paused = false;
                return self.arm_recv(id);
            }
            return Ok(());
        }
        if c.failed && c.receiving && !c.paused {
            // A failed send: stop receiving too, so the connection can close.
            c.paused = true;
            let entry =
                opcode::AsyncCancel::new(user_data(RECV, id, c.generation)).build().user_data(IGNORED);
            ring::push_plain(&mut self.ring, &entry)?;
        }
        if !c.receiving && !c.sending && (c.failed || waiting == 0) {
            // Nothing of ours is in the kernel any more: dropping the descriptor closes it.
            self.conns[id] = None;
            self.free.push(id);
        }
        Ok(())
    }

    fn run(&mut self) -> io::Result<()> {
        self.arm_accept()?;
        let mut batch: Vec<(u64, i32, u32)> = Vec::with_capacity(4096);
        loop {
            // Waiting for peers is idle time, not I/O wait (Linux 6.15+; see braid's backend).
            let waited = if self.ring.params().is_feature_no_iowait() {
                let args = types::SubmitArgs::new();
                self.ring.submitter().submit_with_args_and_flags(1, &args, io_uring::EnterFlags::NO_IOWAIT)
            } else {
                self.ring.submit_and_wait(1)
            };
            match waited {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EBUSY)) => {}
                Err(e) => return Err(e),
            }
            batch.extend(self.ring.completion().map(|e| (e.user_data(), e.result(), e.flags())));
            for (data, res, flags) in batch.drain(..) {
                self.complete(data, res, flags)?;
            }
            while let Some(id) = self.dirty.pop() {
                self.settle(id)?;
            }
        }
    }
}

fn main() -> io::Result<()> {
    let args = braid_bench::Args::parse(&[]);
    let port: u16 = args.num("port", 0);
    braid_bench::raise_nofile_limit();

    let mut builder = IoUring::builder();
    builder.setup_cqsize(8192).setup_single_issuer().setup_defer_taskrun();
    let ring = builder.build(1024).map_err(|e| {
        io::Error::new(ErrorKind::Unsupported, format!("io_uring with DEFER_TASKRUN (Linux 6.1+): {e}"))
    })?;
    let bufs = ring::Bufs::new(&ring, BUFS, BUF_SIZE)?;
    let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port)))?;
    println!("listening on {}", listener.local_addr()?);
    let mut server = Server {
        ring,
        bufs,
        listener,
        conns: Vec::new(),
        free: Vec::new(),
        dirty: Vec::new(),
        next_generation: 0,
    };
    server.run()
}
