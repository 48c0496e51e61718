//! Readiness on a ring: one poll request per watched descriptor.
//!
//! The reactor's dispatch path expects level-triggered readiness (a
//! descriptor is reported on every wait until drained), as select, poll and
//! epoll give it. A one-shot `IORING_OP_POLL_ADD` checks readiness when it is
//! armed and completes as soon as the descriptor is ready, so re-arming it
//! before every wait for each descriptor that completed gives exactly that.
//! Multishot polls would save the re-arm but fire once per wake-up, which is
//! edge-triggered: a descriptor the reactor did not drain would never be
//! reported again. The re-arms are queued and go to the kernel with the
//! wait itself, in the same `io_uring_enter`.
//!
//! # Stale completions
//!
//! Each armed request carries the descriptor and a per-descriptor
//! generation in its user data. Changing or removing the interest bumps the
//! generation and cancels the request; a completion that was already on its
//! way for the old generation (or the cancellation's own `-ECANCELED`) no
//! longer matches and is dropped, so it is never reported as readiness of
//! whatever holds the descriptor now.
//!
//! # Closing
//!
//! A pending poll request holds a reference to the open file, so a socket
//! closed while one is armed would stay open in the kernel until the
//! request completed. The reactor always removes a descriptor before its
//! owner closes it, and removal here submits the cancellation at once (and,
//! on a `DEFER_TASKRUN` ring, runs the kernel's completion work too), so the
//! reference is gone by the time `update` returns. A descriptor closed
//! behind the reactor's back is reported as `invalid` at its next re-arm
//! (`-EBADF`), as poll(2) reports POLLNVAL, and then forgotten.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::time::Duration;

use io_uring::types::{SubmitArgs, Timespec};
use io_uring::{cqueue, opcode, squeue, types, EnterFlags, IoUring};

use super::recv::{Got, Pool, Received, RingBuf, GROUP};
use super::send::{InFlight, Outgoing, Sent};
use super::{probe, Refused, Setup};
use crate::backend::{Event, Interest, Poller};

/// User data of requests whose completions carry nothing to report (the
/// cancellations).
const IGNORED: u64 = u64::MAX;

/// Set in the user data of stream receives (whose low 32 bits are the
/// reactor's key for the reader); clear in poll requests.
const RECV: u64 = 1 << 62;

/// Set in the user data of stream sends (whose low 32 bits are the
/// reactor's key for the writer).
const SEND: u64 = 1 << 61;

/// Set, with [`RECV`], in the user data of multishot accepts: they are
/// routed and cancelled as receives are, and bring descriptors.
const ACCEPT: u64 = 1 << 60;

/// Set, with [`RECV`], in the user data of multishot message receives
/// (`recvmsg`, for sockets that may carry descriptors).
const RECVMSG: u64 = 1 << 59;

/// Poll generations use bits 32..59 of the user data, below [`RECVMSG`].
const GENERATION_MASK: u32 = (1 << 27) - 1;

/// Room for the control data of one message receive: one `SCM_RIGHTS`
/// message of the most descriptors Linux sends at once (`SCM_MAX_FD`).
const CONTROL_LEN: u32 = 1024 + 16;

/// Which kind of multishot request a receive key names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RecvOp {
    /// `recv` into the buffer ring.
    Recv,
    /// `recvmsg` into the buffer ring, with room for descriptors.
    RecvMsg,
    /// `accept`: each completion is a connected socket.
    Accept,
}

impl RecvOp {
    fn tag(self) -> u64 {
        match self {
            RecvOp::Recv => RECV,
            RecvOp::RecvMsg => RECV | RECVMSG,
            RecvOp::Accept => RECV | ACCEPT,
        }
    }
}

/// How long dropping the poller waits for cancelled receives to finish
/// before it leaks their buffers instead of freeing memory the kernel might
/// still write.
const DRAIN_PATIENCE: Duration = Duration::from_secs(2);

/// How many finished send boxes are kept for reuse.
const SPARE_FLIGHTS: usize = 256;

/// The longest wait handed to the kernel at once, as in the other backends.
const MAX_WAIT_SECS: u64 = i32::MAX as u64;

/// What the poller knows about one descriptor number.
#[derive(Clone, Copy, Default)]
struct Slot {
    /// What the reactor wants to hear about.
    want: Interest,
    /// The poll mask of the request in the kernel for this generation, or 0
    /// if none is armed.
    armed: u32,
    /// Bumped whenever an armed request is cancelled.
    generation: u32,
}

pub(crate) struct RingPoller {
    ring: IoUring,
    setup: Setup,
    /// Indexed by descriptor number.
    slots: Vec<Slot>,
    /// Descriptors whose one-shot request completed since the last wait;
    /// re-armed at the next wait if they are still wanted.
    rearm: Vec<RawFd>,
    /// Stream reads: `None` until the first receive asks, then whether
    /// this kernel takes multishot receives into a buffer ring.
    streams: Option<Option<Rc<Pool>>>,
    /// Receives submitted whose final completion has not come.
    live_recvs: usize,
    /// Receive completions since the last `take_received`.
    received: Vec<Received>,
    /// Counts the `take_received` calls: which batch of completions is
    /// being reaped.
    round: u32,
    /// Per receive key, the last round in which a completion brought it
    /// bytes.
    fed: Vec<u32>,
    /// The last round in which the buffer ring was grown.
    grown: u32,
    /// The message header every message receive reads its sizes from (no
    /// address, [`CONTROL_LEN`] of control data), boxed so it never moves
    /// while a request may read it.
    recvmsg_hdr: Box<libc::msghdr>,
    /// Sends in the kernel, indexed by the reactor's key: the memory each
    /// request reads (see `send.rs`).
    sends: Vec<Option<Box<InFlight>>>,
    live_sends: usize,
    /// Boxes of finished sends, for the next ones (boxed so they move
    /// in and out of `sends` without a new allocation).
    #[allow(clippy::vec_box)]
    spare_flights: Vec<Box<InFlight>>,
    /// Send completions since the last `take_sent`.
    sent: Vec<Sent>,
}

fn poll_mask(want: Interest) -> u32 {
    let mut mask = 0;
    if want.read {
        // RDHUP: a peer that shut its sending side makes the socket
        // readable, so the reactor reads the EOF (as on epoll).
        mask |= (libc::POLLIN | libc::POLLPRI | libc::POLLRDHUP) as u32;
    }
    if want.write {
        mask |= libc::POLLOUT as u32;
    }
    mask
}

fn user_data(fd: RawFd, generation: u32) -> u64 {
    (u64::from(generation & GENERATION_MASK) << 32) | u64::from(fd as u32)
}

fn decode(data: u64) -> (RawFd, u32) {
    ((data & 0xffff_ffff) as u32 as RawFd, (data >> 32) as u32)
}

impl RingPoller {
    pub fn new() -> Result<RingPoller, Refused> {
        let probe = probe()?;
        Ok(RingPoller {
            ring: probe.ring,
            setup: probe.setup,
            slots: Vec::new(),
            rearm: Vec::new(),
            streams: None,
            live_recvs: 0,
            received: Vec::new(),
            round: 0,
            fed: Vec::new(),
            grown: u32::MAX,
            recvmsg_hdr: {
                // SAFETY: msghdr is a plain C struct for which all zeroes
                // is a valid value (no address, no buffers, no flags).
                let mut hdr: Box<libc::msghdr> = Box::new(unsafe { std::mem::zeroed() });
                hdr.msg_controllen = CONTROL_LEN as _;
                hdr
            },
            sends: Vec::new(),
            live_sends: 0,
            spare_flights: Vec::new(),
            sent: Vec::new(),
        })
    }

    /// Whether streams can read by completion here: multishot receives
    /// (Linux 6.0) into a registered buffer ring (5.19). Checked once.
    pub fn reads_streams(&mut self) -> bool {
        self.pool().is_some()
    }

    fn pool(&mut self) -> Option<&Rc<Pool>> {
        if self.streams.is_none() {
            let pool = kernel_at_least(6, 0).then(Pool::new).flatten().and_then(|pool| {
                // SAFETY: the ring of entries lives in `pool`, which the
                // poller keeps until the ring is destroyed (see `Drop`),
                // and spans `ring_entries()` entries.
                let registered = unsafe {
                    self.ring.submitter().register_buf_ring_with_flags(
                        pool.ring_addr(),
                        Pool::ring_entries(),
                        GROUP,
                        0,
                    )
                };
                (registered.is_ok() && pool.start()).then(|| Rc::new(pool))
            });
            self.streams = Some(pool);
        }
        self.streams.as_ref().and_then(Option::as_ref)
    }

    /// Starts a multishot receive on `fd` (with `msg`, a message receive
    /// that also takes descriptors); its completions come back from
    /// [`RingPoller::take_received`] under `key`.
    pub fn recv_start(&mut self, fd: RawFd, key: u32, msg: bool) -> io::Result<()> {
        if self.pool().is_none() {
            return Err(io::Error::from(io::ErrorKind::Unsupported));
        }
        let entry = if msg {
            let hdr: *const libc::msghdr = &*self.recvmsg_hdr;
            opcode::RecvMsgMulti::new(types::Fd(fd), hdr, GROUP)
                .flags(libc::MSG_CMSG_CLOEXEC as u32)
                .build()
                .user_data(RecvOp::RecvMsg.tag() | u64::from(key))
        } else {
            opcode::RecvMulti::new(types::Fd(fd), GROUP).build().user_data(RECV | u64::from(key))
        };
        self.push(&entry)?;
        self.live_recvs += 1;
        Ok(())
    }

    /// Starts a multishot accept on the listening socket `fd`; each
    /// accepted connection comes back from [`RingPoller::take_received`]
    /// under `key`, as [`Got::Accepted`] (non-blocking, close-on-exec).
    pub fn accept_start(&mut self, fd: RawFd, key: u32) -> io::Result<()> {
        let flags = libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
        let entry = opcode::AcceptMulti::new(types::Fd(fd))
            .flags(flags)
            .build()
            .user_data(RECV | ACCEPT | u64::from(key));
        self.push(&entry)?;
        self.live_recvs += 1;
        Ok(())
    }

    /// Cancels the receive (or accept) of kind `op` under `key`.
    /// Completions already on their way still come, then a final one. With
    /// `now`, the cancellation is carried out before this returns, so the
    /// request no longer holds the socket open and the caller may close it.
    pub fn recv_cancel(&mut self, key: u32, op: RecvOp, now: bool) -> io::Result<()> {
        let entry = opcode::AsyncCancel::new(op.tag() | u64::from(key)).build().user_data(IGNORED);
        self.push(&entry)?;
        if now {
            self.flush()?;
        }
        Ok(())
    }

    /// Sends `out` on `fd`, its completion to come back from
    /// [`RingPoller::take_sent`] under `key`, with the chunks. At most one
    /// send per key is in the kernel; a refused submission hands the chunks
    /// back.
    pub fn send_start(&mut self, fd: RawFd, key: u32, out: Outgoing) -> Result<(), (io::Error, Outgoing)> {
        let slot = key as usize;
        if self.sends.len() <= slot {
            self.sends.resize_with(slot + 1, || None);
        }
        if self.sends[slot].is_some() {
            return Err((io::Error::from(io::ErrorKind::AlreadyExists), out));
        }
        let mut flight = self.spare_flights.pop().unwrap_or_default();
        flight.fill(out);
        let data = SEND | u64::from(key);
        let flags = libc::MSG_NOSIGNAL;
        let entry = match &flight.msg {
            Some(msg) => opcode::SendMsg::new(types::Fd(fd), msg).flags(flags as u32).build().user_data(data),
            None => {
                let iov = flight.iov[0];
                let len = u32::try_from(iov.iov_len).unwrap_or(u32::MAX);
                opcode::Send::new(types::Fd(fd), iov.iov_base as *const u8, len)
                    .flags(flags)
                    .build()
                    .user_data(data)
            }
        };
        // The box goes into the table before the request can reach the
        // kernel, and stays until its completion.
        self.sends[slot] = Some(flight);
        if let Err(e) = self.push(&entry) {
            let flight = self.sends[slot].take().map(|f| f.out).unwrap_or_default();
            return Err((e, flight));
        }
        self.live_sends += 1;
        Ok(())
    }

    /// Cancels the send under `key` and carries the cancellation out at
    /// once, so the request no longer holds the socket open and the caller
    /// may close it. Its completion still comes (with what it sent, or
    /// `ECANCELED`), and only then is its memory freed.
    pub fn send_cancel(&mut self, key: u32) -> io::Result<()> {
        let entry = opcode::AsyncCancel::new(SEND | u64::from(key)).build().user_data(IGNORED);
        self.push(&entry)?;
        self.flush()
    }

    /// Hands over the send completions reaped by the last waits.
    pub fn take_sent(&mut self, into: &mut Vec<Sent>) {
        std::mem::swap(into, &mut self.sent);
    }

    fn complete_send(&mut self, cqe: &cqueue::Entry) {
        let key = (cqe.user_data() & 0xffff_ffff) as u32;
        let Some(mut flight) = self.sends.get_mut(key as usize).and_then(Option::take) else { return };
        self.live_sends -= 1;
        let res = cqe.result();
        let result = if res >= 0 { Ok(res as usize) } else { Err(-res) };
        let out = std::mem::take(&mut flight.out);
        flight.msg = None;
        if self.spare_flights.len() < SPARE_FLIGHTS {
            self.spare_flights.push(flight);
        }
        self.sent.push(Sent { key, result, out });
    }

    /// Hands over the receive completions reaped by the last waits.
    pub fn take_received(&mut self, into: &mut Vec<Received>) {
        std::mem::swap(into, &mut self.received);
        self.round = self.round.wrapping_add(1);
        if let Some(Some(pool)) = &self.streams {
            pool.end_round();
        }
    }

    fn complete_recv(&mut self, cqe: &cqueue::Entry) {
        let key = (cqe.user_data() & 0xffff_ffff) as u32;
        let flags = cqe.flags();
        let ended = !cqueue::more(flags);
        if ended {
            self.live_recvs = self.live_recvs.saturating_sub(1);
        }
        let res = cqe.result();
        if cqe.user_data() & ACCEPT != 0 {
            let got = match res {
                // SAFETY: a successful accept's result is a descriptor the
                // kernel just installed for us; nothing else owns it.
                fd if fd >= 0 => Got::Accepted(unsafe { OwnedFd::from_raw_fd(fd) }),
                n if n == -libc::ECANCELED => Got::Nothing,
                n => Got::Error(-n),
            };
            self.received.push(Received { key, got, ended });
            return;
        }
        let buf = cqueue::buffer_select(flags);
        let got = match (res, buf, self.streams.as_ref().and_then(Option::as_ref)) {
            (n, Some(bid), Some(pool)) if n > 0 => {
                let i = key as usize;
                if self.fed.len() <= i {
                    self.fed.resize(i + 1, self.round.wrapping_sub(1));
                }
                self.fed[i] = self.round;
                match RingBuf::new(pool, bid, n as usize) {
                    Some(buf) if cqe.user_data() & RECVMSG != 0 => message(buf, &self.recvmsg_hdr),
                    Some(buf) => Got::Data(buf, Vec::new()),
                    None => Got::Error(libc::EIO),
                }
            }
            (n, Some(bid), Some(pool)) => {
                // A buffer named by a completion with no bytes for us.
                pool.reclaim(bid);
                match n {
                    0 => Got::Eof,
                    n if n == -libc::ECANCELED => Got::Nothing,
                    n => Got::Error(-n),
                }
            }
            (0, _, _) => Got::Eof,
            (n, _, _) if n == -libc::ECANCELED => Got::Nothing,
            (n, _, _) if n == -libc::ENOBUFS => {
                // The ring ran dry. A receive that already had buffers in
                // this batch has had its share of the pass (it re-arms and
                // reads on in the next): more buffers would only let one
                // busy stream fill more of them before any is read, out of
                // cache by then. One that got none needs more: once per
                // batch, however many starved in it (the buffers added
                // for the first are not the kernel's until the next wait).
                let fed = self.fed.get(key as usize) == Some(&self.round);
                if let (false, Some(pool)) = (fed, self.streams.as_ref().and_then(Option::as_ref)) {
                    if self.grown != self.round {
                        self.grown = self.round;
                        pool.ran_dry();
                    }
                }
                Got::Nothing
            }
            (n, _, _) if n < 0 => Got::Error(-n),
            _ => Got::Error(libc::EIO),
        };
        self.received.push(Received { key, got, ended });
    }

    fn slot(&mut self, fd: RawFd) -> &mut Slot {
        let i = fd as usize;
        if i >= self.slots.len() {
            self.slots.resize(i + 1, Slot::default());
        }
        &mut self.slots[i]
    }

    /// Queues one request, handing the queue to the kernel first if full.
    fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: poll requests, receives and cancellations point at
            // no memory of ours (a receive writes only into the buffer
            // ring, which the poller keeps until every receive is over);
            // a send points at an `InFlight` that `send_start` put in
            // `self.sends` first and that stays there, unmoved (boxed),
            // until the send's completion is reaped.
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                return Ok(());
            }
            self.ring.submit()?;
        }
    }

    fn arm(&mut self, fd: RawFd) -> io::Result<()> {
        let slot = self.slot(fd);
        let mask = poll_mask(slot.want);
        let data = user_data(fd, slot.generation);
        slot.armed = mask;
        let entry = opcode::PollAdd::new(types::Fd(fd), mask).build().user_data(data);
        self.push(&entry)
    }

    fn cancel(&mut self, fd: RawFd) -> io::Result<()> {
        let slot = self.slot(fd);
        let data = user_data(fd, slot.generation);
        slot.armed = 0;
        slot.generation = slot.generation.wrapping_add(1) & GENERATION_MASK;
        let entry = opcode::PollRemove::new(data).build().user_data(IGNORED);
        self.push(&entry)
    }

    /// Hands queued requests to the kernel and, on a ring whose completion
    /// work is deferred, runs that work now: what a cancellation frees
    /// (the request's reference to the file) is freed before we return.
    pub fn flush(&mut self) -> io::Result<()> {
        if self.setup.defers_work() {
            match self.wait(Some(Duration::ZERO), 1) {
                Err(e) if e.raw_os_error() == Some(libc::ETIME) => Ok(()),
                other => other.map(drop),
            }
        } else {
            self.ring.submit().map(drop)
        }
    }

    fn wait(&mut self, timeout: Option<Duration>, want: usize) -> io::Result<usize> {
        let flags = self.wait_flags();
        match timeout {
            None if flags.is_empty() => self.ring.submit_and_wait(want.max(1)),
            // An extended argument with no timeout waits as long as it takes.
            None => self.ring.submitter().submit_with_args_and_flags(want.max(1), &SubmitArgs::new(), flags),
            Some(d) => {
                let secs = d.as_secs().min(MAX_WAIT_SECS);
                let nanos = if secs == MAX_WAIT_SECS { 0 } else { d.subsec_nanos() };
                let ts = Timespec::new().sec(secs).nsec(nanos);
                let args = SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args_and_flags(want, &args, flags)
            }
        }
    }

    /// How the reactor waits: never counted as waiting for I/O where the
    /// kernel lets us say so (see the module's kernel requirements). A
    /// network server waiting for its peers is idle, not I/O-bound.
    fn wait_flags(&self) -> EnterFlags {
        if self.ring.params().is_feature_no_iowait() {
            EnterFlags::NO_IOWAIT
        } else {
            EnterFlags::empty()
        }
    }
}

/// What a message receive put in `buf`: a header, the control data, the
/// payload. No payload is the end of the stream; descriptors in the control
/// data become owned (they are ours from the moment the kernel installed
/// them).
fn message(mut buf: RingBuf, hdr: &libc::msghdr) -> Got {
    let (start, len, fds, truncated) = {
        let Ok(out) = types::RecvMsgOut::parse(&buf, hdr) else { return Got::Error(libc::EIO) };
        let payload = out.payload_data();
        let start = payload.as_ptr() as usize - buf.as_ptr() as usize;
        (start, payload.len(), rights(out.control_data()), out.is_control_data_truncated())
    };
    if truncated {
        // The kernel closed what it could not deliver, as for recvmsg(2).
        tracing::warn!(target: "braid", "descriptors passed over a UNIX connection were lost: the kernel truncated the control data");
    }
    if len == 0 {
        return Got::Eof;
    }
    buf.narrow(start, len);
    Got::Data(buf, fds)
}

/// The descriptors of the `SCM_RIGHTS` messages in `control`.
fn rights(control: &[u8]) -> Vec<OwnedFd> {
    let header = std::mem::size_of::<libc::cmsghdr>();
    let mut fds = Vec::new();
    let mut at = 0;
    while at + header <= control.len() {
        // SAFETY: `at + header <= control.len()`, and the header is read
        // unaligned, so any byte offset inside the slice will do.
        let cmsg: libc::cmsghdr = unsafe { std::ptr::read_unaligned(control[at..].as_ptr().cast()) };
        let len = cmsg.cmsg_len as usize;
        if len < header || at + len > control.len() {
            break;
        }
        // Linux aligns a control message's data to the size of its length
        // field (CMSG_ALIGN): right after the header on every target.
        let data = &control[at + header..at + len];
        if cmsg.cmsg_level == libc::SOL_SOCKET && cmsg.cmsg_type == libc::SCM_RIGHTS {
            for raw in data.chunks_exact(4) {
                let fd = i32::from_ne_bytes([raw[0], raw[1], raw[2], raw[3]]);
                if fd >= 0 {
                    // SAFETY: an SCM_RIGHTS message names descriptors the
                    // kernel installed in this process for this receive;
                    // nothing else owns them.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        let step = (len + std::mem::size_of::<usize>() - 1) & !(std::mem::size_of::<usize>() - 1);
        at += step;
    }
    fds
}

/// Turns one completion into an event, if it still means something.
fn complete(slots: &mut [Slot], rearm: &mut Vec<RawFd>, cqe: &cqueue::Entry, events: &mut Vec<Event>) {
    let data = cqe.user_data();
    if data == IGNORED {
        return;
    }
    let (fd, generation) = decode(data);
    let Some(slot) = slots.get_mut(fd as usize) else { return };
    if slot.generation != generation || slot.armed == 0 {
        return;
    }
    slot.armed = 0;
    let res = cqe.result();
    if res == -libc::EBADF {
        // Closed behind our back: reported once, then forgotten.
        slot.want = Interest::NONE;
        events.push(Event { fd, error: true, invalid: true, ..Event::default() });
        return;
    }
    rearm.push(fd);
    if res < 0 {
        events.push(Event { fd, error: true, ..Event::default() });
        return;
    }
    let revents = res as u32;
    let invalid = revents & libc::POLLNVAL as u32 != 0;
    if invalid {
        slot.want = Interest::NONE;
    }
    events.push(Event {
        fd,
        readable: revents & (libc::POLLIN | libc::POLLPRI | libc::POLLRDHUP) as u32 != 0,
        writable: revents & libc::POLLOUT as u32 != 0,
        hangup: revents & libc::POLLHUP as u32 != 0,
        error: invalid || revents & libc::POLLERR as u32 != 0,
        invalid,
    });
}

impl Poller for RingPoller {
    fn update(&mut self, fd: RawFd, _old: Interest, new: Interest) -> io::Result<()> {
        if fd < 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cannot watch negative file descriptor {fd}"),
            ));
        }
        // The poller's own record is the truth about what is armed; `old`
        // may be stale (a number reused after a close).
        let slot = *self.slot(fd);
        self.slot(fd).want = new;
        let mask = poll_mask(new);
        if slot.armed != 0 && slot.armed != mask {
            self.cancel(fd)?;
        }
        if new.is_empty() {
            return if slot.armed != 0 { self.flush() } else { Ok(()) };
        }
        if self.slot(fd).armed == 0 {
            self.arm(fd)?;
        }
        Ok(())
    }

    fn poll(&mut self, events: &mut Vec<Event>, timeout: Option<Duration>) -> io::Result<()> {
        let rearm = std::mem::take(&mut self.rearm);
        for &fd in &rearm {
            let slot = self.slots[fd as usize];
            if slot.armed == 0 && !slot.want.is_empty() {
                self.arm(fd)?;
            }
        }
        self.rearm = rearm;
        self.rearm.clear();
        match self.wait(timeout, 1) {
            Ok(_) => {}
            Err(e) => match e.raw_os_error() {
                // The timeout passed; a signal interrupted the wait; the
                // completion queue is full (its entries are read below).
                Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY) => {}
                _ => return Err(e),
            },
        }
        loop {
            let Some(cqe) = self.ring.completion().next() else { break };
            let data = cqe.user_data();
            if data != IGNORED && data & RECV != 0 {
                self.complete_recv(&cqe);
            } else if data != IGNORED && data & SEND != 0 {
                self.complete_send(&cqe);
            } else {
                complete(&mut self.slots, &mut self.rearm, &cqe, events);
            }
        }
        Ok(())
    }
}

impl Drop for RingPoller {
    /// A receive still in the kernel could write into the buffer pool, and
    /// a send still reads its chunks, so every request is cancelled and its
    /// final completion awaited before that memory may be freed. What never
    /// finishes is leaked: a bounded loss instead of memory used by the
    /// kernel after it was freed.
    fn drop(&mut self) {
        if self.live_recvs > 0 || self.live_sends > 0 {
            let all = opcode::AsyncCancel2::new(types::CancelBuilder::any()).build().user_data(IGNORED);
            let _ = self.push(&all);
            let deadline = std::time::Instant::now() + DRAIN_PATIENCE;
            while (self.live_recvs > 0 || self.live_sends > 0) && std::time::Instant::now() < deadline {
                let _ = self.wait(Some(Duration::from_millis(50)), 1);
                let done: Vec<cqueue::Entry> = self.ring.completion().collect();
                for cqe in done {
                    let data = cqe.user_data();
                    if data != IGNORED && data & RECV != 0 {
                        // Counts it out; what it brought (a buffer, an
                        // accepted descriptor) is given back below.
                        self.complete_recv(&cqe);
                    } else if data != IGNORED && data & SEND != 0 {
                        self.complete_send(&cqe);
                    }
                }
                // Buffers named by those completions go back to the pool
                // when these drop; sent chunks are freed.
                self.received.clear();
                self.sent.clear();
            }
            if self.live_recvs > 0 {
                if let Some(Some(pool)) = self.streams.take() {
                    std::mem::forget(pool);
                }
            }
            if self.live_sends > 0 {
                for flight in self.sends.drain(..).flatten() {
                    std::mem::forget(flight);
                }
            }
        }
        self.received.clear();
        if let Some(Some(_)) = &self.streams {
            let _ = self.ring.submitter().unregister_buf_ring(GROUP);
        }
    }
}

/// Whether the running kernel's release is at least `major.minor`.
fn kernel_at_least(major: u32, minor: u32) -> bool {
    let Ok(release) = std::fs::read_to_string("/proc/sys/kernel/osrelease") else { return false };
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
    let got_major = parts.next().and_then(|p| p.parse::<u32>().ok()).unwrap_or(0);
    let got_minor = parts.next().and_then(|p| p.parse::<u32>().ok()).unwrap_or(0);
    (got_major, got_minor) >= (major, minor)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::conformance as c;
    use c::{NONE, READ};

    fn new() -> RingPoller {
        RingPoller::new().unwrap_or_else(|e| panic!("io_uring is not usable on this machine: {e}"))
    }

    c::shared_tests!(new());

    #[test]
    fn hangup_when_writer_closes() {
        c::hangup_when_writer_closes(new(), true);
    }

    /// Closed behind the poller's back: reported as invalid (after at most
    /// one report the kernel had already made), then forgotten, without
    /// spinning.
    #[test]
    fn closed_fd_reported_invalid_then_forgotten() {
        let _numbers = c::fd_numbers();
        let mut p = new();
        let (r, w) = c::pipe();
        let high = c::dup_at_least(&r, c::HIGH_FD);
        drop(r);
        let fd = c::raw(&high);
        p.update(fd, NONE, READ).unwrap();
        c::write_byte(&w);
        drop(high);
        let mut saw_invalid = false;
        for _ in 0..3 {
            let events = c::poll_once(&mut p, Some(Duration::from_secs(5)));
            if let Some(ev) = c::event_for(&events, fd) {
                if ev.invalid {
                    assert!(ev.error, "{ev:?}");
                    saw_invalid = true;
                    break;
                }
            }
        }
        assert!(saw_invalid, "a closed descriptor was never reported invalid");
        let start = std::time::Instant::now();
        let events = c::poll_once(&mut p, Some(Duration::from_millis(60)));
        assert!(events.is_empty(), "{events:?}");
        assert!(start.elapsed() >= Duration::from_millis(55), "spun: {:?}", start.elapsed());
        p.update(fd, READ, NONE).unwrap();
    }

    /// Removing a descriptor's interest releases the kernel's reference to
    /// the file at once: closing our end then really closes the socket, and
    /// its peer sees the end of the stream without the poller waiting.
    #[test]
    fn removal_releases_the_file_before_the_owner_closes_it() {
        let mut p = new();
        let (a, b) = c::socketpair();
        p.update(c::raw(&a), NONE, READ).unwrap();
        // Let the request reach the kernel and be armed.
        assert!(c::poll_once(&mut p, Some(Duration::ZERO)).is_empty());
        p.update(c::raw(&a), READ, NONE).unwrap();
        drop(a);
        let mut buf = [0u8; 1];
        let n = rustix::io::read(&b, &mut buf).expect("the peer reads the end of the stream, not EAGAIN");
        assert_eq!(n, 0);
    }

    /// Fills `w`'s socket until it takes no more; returns the bytes queued.
    fn fill(w: &OwnedFd) -> usize {
        let chunk = vec![7u8; 64 * 1024];
        let mut queued = 0;
        loop {
            match rustix::io::write(w, &chunk) {
                Ok(n) => queued += n,
                Err(rustix::io::Errno::AGAIN) => return queued,
                Err(e) => panic!("write: {e}"),
            }
        }
    }

    /// Waits until the receives under `keys` have ended, gathering what came
    /// (in one batch: nothing is taken meanwhile).
    fn until_ended(p: &mut RingPoller, keys: &[u32]) -> Vec<Received> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let _ = c::poll_once(p, Some(Duration::from_millis(100)));
            if keys.iter().all(|&key| p.received.iter().any(|r| r.key == key && r.ended)) {
                let mut got = Vec::new();
                p.take_received(&mut got);
                return got;
            }
            assert!(std::time::Instant::now() < deadline, "the receives under {keys:?} never ended");
        }
    }

    /// A receive that filled buffers and then found the ring empty has had
    /// its share of the pass: the ring does not grow for it, so one busy
    /// stream cycles through a few warm buffers. A receive that found the
    /// ring empty before it got any buffer makes it grow.
    #[test]
    fn only_a_starved_receive_grows_the_buffer_ring() {
        let mut p = new();
        assert!(p.reads_streams(), "this kernel's io_uring takes no multishot receives into a buffer ring");
        let first = Pool::FIRST_WANT;
        let wanted = |p: &mut RingPoller| p.pool().map(|pool| pool.wanted()).unwrap();
        assert_eq!(wanted(&mut p), first);

        let (a, b) = c::socketpair();
        rustix::net::sockopt::set_socket_send_buffer_size(&b, 1 << 20).unwrap();
        let queued = fill(&b);
        assert!(
            queued > first * super::super::recv::BUF_SIZE,
            "a socketpair took only {queued} bytes: too few to use up the ring's first buffers"
        );
        p.recv_start(c::raw(&a), 1, false).unwrap();
        let busy = until_ended(&mut p, &[1]);
        let held: Vec<RingBuf> = busy
            .into_iter()
            .filter_map(|r| match r.got {
                Got::Data(buf, _) => Some(buf),
                _ => None,
            })
            .collect();
        assert_eq!(held.len(), first, "the busy receive should have taken every published buffer");
        assert_eq!(wanted(&mut p), first, "a receive that had its share grew the ring");

        // Every buffer is still ours: the next receives find none. Two
        // starved in one batch grow the ring once.
        let (c2, d2) = c::socketpair();
        let (c3, d3) = c::socketpair();
        c::write_byte(&d2);
        c::write_byte(&d3);
        p.recv_start(c::raw(&c2), 2, false).unwrap();
        p.recv_start(c::raw(&c3), 3, false).unwrap();
        let starved = until_ended(&mut p, &[2, 3]);
        assert!(
            starved.iter().all(|r| matches!(r.got, Got::Nothing)),
            "a receive got bytes from an empty ring"
        );
        assert_eq!(wanted(&mut p), 2 * first, "receives that got no buffer did not grow the ring once");
        drop(held);
    }

    /// A completion from a cancelled generation is never reported for the
    /// descriptor's new interest.
    #[test]
    fn stale_completions_are_dropped() {
        let mut p = new();
        let (r, w) = c::pipe();
        let fd = c::raw(&r);
        p.update(fd, NONE, READ).unwrap();
        c::write_byte(&w);
        // The byte made the read request complete in the kernel, but the
        // reactor changed its mind before reaping it.
        p.update(fd, READ, NONE).unwrap();
        p.update(fd, NONE, c::WRITE).unwrap();
        let events = c::poll_once(&mut p, Some(Duration::from_millis(50)));
        assert!(c::event_for(&events, fd).is_none(), "{events:?}");
    }

    #[test]
    fn many_descriptors() {
        if c::in_child() {
            c::many_descriptors(new(), 10_000);
        } else {
            c::run_in_child("backend::uring::poller::tests::many_descriptors");
        }
    }
}
