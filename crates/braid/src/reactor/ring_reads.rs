//! Stream reads by completion (io_uring): routing each receive completion
//! to the reader that asked for it.
//!
//! On a readiness backend the reactor calls a reader's `do_read` and the
//! reader reads. On a ring a stream reader instead starts a multishot
//! receive once ([`Reactor::ring_read_start`]), and the reactor hands it
//! each completion ([`RingReader::ring_received`]) after the pass's
//! readiness events. The bytes are in a buffer lent by the ring for the
//! length of that call.
//!
//! Keys: a receive is known by its index in the reactor's table of
//! readers, and that index is freed only by the receive's final
//! completion, never before, so a key never names two receives and a late
//! completion never reaches the wrong reader. Stopping a receive (pausing)
//! keeps its reader in the table, so bytes already received still reach
//! it, and it holds them until it reads again; forgetting one (closing)
//! drops the reader at once, and whatever still comes under its key only
//! returns its buffer to the ring.

use std::os::fd::RawFd;
use std::rc::Rc;

use super::fdset::identity;
use super::{guard, FileDescriptor, Reactor};
use crate::backend::uring::poller::RecvOp;
use crate::backend::uring::recv::{Got, Received};
use crate::backend::AnyPoller;
use crate::error::Failure;

/// What one receive completion brought a reader.
pub(crate) enum RingRead<'a> {
    /// Bytes, and descriptors that came with them (UNIX streams).
    Data(&'a mut [u8], Vec<std::os::fd::OwnedFd>),
    /// A connection accepted by a multishot accept (a listener's).
    Accepted(std::os::fd::OwnedFd),
    /// The peer shut down its sending side.
    Eof,
    /// The receive failed with this errno.
    Error(rustix::io::Errno),
    /// Nothing (the receive was stopped, or the ring had no buffer free).
    Nothing,
}

/// A descriptor that reads by completion on a ring.
pub(crate) trait RingReader: FileDescriptor {
    /// One completion of the receive this reader started. `ended`: the
    /// receive is over, and the reader must start another to read on. An
    /// `Err` disconnects it, as an `Err` from `do_read` does.
    fn ring_received(&self, got: RingRead<'_>, ended: bool) -> Result<(), Failure>;

    /// Whether it reads now (false while paused, though its cancelled
    /// receive may still deliver what it had): what `get_readers` lists.
    fn ring_reading(&self) -> bool;

    fn descriptor(self: Rc<Self>) -> Rc<dyn FileDescriptor>;
}

/// A started receive's reader; `None` once forgotten.
pub(crate) struct Owner {
    reader: Option<Rc<dyn RingReader>>,
    fd: RawFd,
    /// What the request is.
    op: RecvOp,
}

/// A reader's request on the ring, from its own side: what the connection
/// or listener needs to know to pause, resume and close safely.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RingRecv {
    /// None in the kernel.
    Off,
    /// Receiving (or accepting) under this key.
    On(u32),
    /// Cancelled; its final completion has not come yet.
    Stopping(u32),
    /// Cancelled, and reading resumed since: a new request starts when the
    /// old one's final completion comes.
    Restart(u32),
}

impl RingRecv {
    pub(crate) fn key(self) -> Option<u32> {
        match self {
            RingRecv::Off => None,
            RingRecv::On(k) | RingRecv::Stopping(k) | RingRecv::Restart(k) => Some(k),
        }
    }
}

pub(crate) type Owners = slab::Slab<Owner>;

fn ptr_of(reader: &Rc<dyn RingReader>) -> *const () {
    identity(reader)
}

impl Reactor {
    /// Whether stream readers should read by completion here.
    pub(crate) fn reads_by_completion(&self) -> bool {
        match &mut *self.inner.poller.borrow_mut() {
            AnyPoller::Uring(p) => p.reads_streams(),
            _ => false,
        }
    }

    /// Starts a multishot receive for `reader` on `fd` (with `msg`, one
    /// that takes descriptors too); returns its key.
    pub(crate) fn ring_read_start(
        &self,
        fd: RawFd,
        reader: Rc<dyn RingReader>,
        msg: bool,
    ) -> Result<u32, crate::Error> {
        self.ring_request(fd, reader, if msg { RecvOp::RecvMsg } else { RecvOp::Recv })
    }

    /// Starts a multishot accept for the listener `reader` on `fd`;
    /// returns its key. It is stopped and forgotten as a receive is.
    pub(crate) fn ring_accept_start(
        &self,
        fd: RawFd,
        reader: Rc<dyn RingReader>,
    ) -> Result<u32, crate::Error> {
        self.ring_request(fd, reader, RecvOp::Accept)
    }

    fn ring_request(&self, fd: RawFd, reader: Rc<dyn RingReader>, op: RecvOp) -> Result<u32, crate::Error> {
        let mut owners = self.inner.recv_owners.borrow_mut();
        let entry = owners.vacant_entry();
        let key = u32::try_from(entry.key()).map_err(|_| crate::Error::BadDescriptor(fd))?;
        let started = match &mut *self.inner.poller.borrow_mut() {
            AnyPoller::Uring(p) => match op {
                RecvOp::Accept => p.accept_start(fd, key),
                RecvOp::Recv | RecvOp::RecvMsg => p.recv_start(fd, key, op == RecvOp::RecvMsg),
            },
            _ => Err(std::io::Error::from(std::io::ErrorKind::Unsupported)),
        };
        let what = if op == RecvOp::Accept { "an accept" } else { "a receive" };
        started.map_err(|e| crate::Error::io(format!("starting {what} on fd {fd}"), e))?;
        entry.insert(Owner { reader: Some(reader), fd, op });
        Ok(key)
    }

    fn op_of(&self, key: u32) -> RecvOp {
        self.inner.recv_owners.borrow().get(key as usize).map_or(RecvOp::Recv, |o| o.op)
    }

    /// Stops the receive under `key`, if `reader` still owns it. Bytes it
    /// had already received still reach the reader.
    pub(crate) fn ring_read_stop(&self, key: u32, reader: &Rc<dyn RingReader>) {
        if self.owns(key, reader) {
            let op = self.op_of(key);
            if let AnyPoller::Uring(p) = &mut *self.inner.poller.borrow_mut() {
                let _ = p.recv_cancel(key, op, false);
            }
        }
    }

    /// Pauses `reader`'s request, whose state is `state`: cancels it if it
    /// runs, or forgets a restart asked for while it was being cancelled.
    pub(crate) fn ring_read_pause(&self, state: &std::cell::Cell<RingRecv>, reader: &Rc<dyn RingReader>) {
        match state.get() {
            RingRecv::On(k) => {
                self.ring_read_stop(k, reader);
                state.set(RingRecv::Stopping(k));
            }
            RingRecv::Restart(k) => state.set(RingRecv::Stopping(k)),
            RingRecv::Off | RingRecv::Stopping(_) => {}
        }
    }

    /// Stops the receive under `key` for good and drops its reader: the
    /// socket may be closed once this returns.
    pub(crate) fn ring_read_forget(&self, key: u32, reader: &Rc<dyn RingReader>) {
        if !self.owns(key, reader) {
            return;
        }
        let op = self.op_of(key);
        let dropped = self.inner.recv_owners.borrow_mut().get_mut(key as usize).and_then(|o| o.reader.take());
        if let AnyPoller::Uring(p) = &mut *self.inner.poller.borrow_mut() {
            let _ = p.recv_cancel(key, op, true);
        }
        drop(dropped);
    }

    fn owns(&self, key: u32, reader: &Rc<dyn RingReader>) -> bool {
        let owners = self.inner.recv_owners.borrow();
        owners
            .get(key as usize)
            .and_then(|o| o.reader.as_ref())
            .is_some_and(|r| std::ptr::eq(ptr_of(r), ptr_of(reader)))
    }

    /// Hands the receive completions of the last wait to their readers.
    pub(crate) fn dispatch_received(&self) {
        let mut got = self.inner.received_buf.take();
        if let AnyPoller::Uring(p) = &mut *self.inner.poller.borrow_mut() {
            p.take_received(&mut got);
        }
        for Received { key, got: what, ended } in got.drain(..) {
            let owner = {
                let mut owners = self.inner.recv_owners.borrow_mut();
                let o = owners.get(key as usize).and_then(|o| o.reader.clone().map(|r| (r, o.fd)));
                if ended && owners.contains(key as usize) {
                    owners.remove(key as usize);
                }
                o
            };
            // A forgotten reader's buffer goes back to the ring here (and
            // a connection accepted for a forgotten listener is closed).
            let Some((reader, fd)) = owner else { continue };
            let result = match what {
                Got::Data(mut buf, fds) => {
                    let r = guard::catch(|| reader.ring_received(RingRead::Data(&mut buf, fds), ended));
                    drop(buf);
                    r
                }
                Got::Accepted(sock) => guard::catch(|| reader.ring_received(RingRead::Accepted(sock), ended)),
                Got::Eof => guard::catch(|| reader.ring_received(RingRead::Eof, ended)),
                Got::Error(errno) => {
                    let e = rustix::io::Errno::from_raw_os_error(errno);
                    guard::catch(|| reader.ring_received(RingRead::Error(e), ended))
                }
                Got::Nothing => guard::catch(|| reader.ring_received(RingRead::Nothing, ended)),
            };
            if let Err(why) = result {
                self.disconnect(fd, &reader.descriptor(), why, true);
            }
        }
        self.inner.received_buf.set(got);
    }

    /// The readers of every started receive (for `remove_all`, shutdown and
    /// drop), forgetting them all.
    pub(crate) fn take_ring_readers(owners: &mut Owners) -> Vec<(RawFd, Rc<dyn FileDescriptor>)> {
        owners.iter_mut().filter_map(|(_, o)| Some((o.fd, o.reader.take()?.descriptor()))).collect()
    }

    /// Stops every started receive and returns the readers (`remove_all`).
    pub(crate) fn forget_ring_readers(&self) -> Vec<(RawFd, Rc<dyn FileDescriptor>)> {
        let mut keys = Vec::new();
        let readers: Vec<_> = {
            let mut owners = self.inner.recv_owners.borrow_mut();
            owners
                .iter_mut()
                .filter_map(|(key, o)| {
                    let r = o.reader.take()?;
                    keys.push((key as u32, o.op));
                    Some((o.fd, r.descriptor()))
                })
                .collect()
        };
        if let AnyPoller::Uring(p) = &mut *self.inner.poller.borrow_mut() {
            for (key, op) in keys {
                let _ = p.recv_cancel(key, op, false);
            }
            let _ = p.flush();
        }
        readers
    }

    /// The readers of every started receive, still reading.
    pub(crate) fn ring_readers(&self) -> Vec<Rc<dyn FileDescriptor>> {
        self.inner
            .recv_owners
            .borrow()
            .iter()
            .filter_map(|(_, o)| o.reader.clone())
            .filter(|r| r.ring_reading())
            .map(|r| r.descriptor())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::io::{Read, Write};
    use std::rc::Rc;
    use std::time::Duration;

    use crate::protocol::Protocol;
    use crate::{Backend, Reactor, Transport};

    /// Echoes, and on its first bytes records how the reactor reads it.
    struct Probe {
        reactor: Reactor,
        transport: Option<Transport>,
        seen: Rc<RefCell<Option<(usize, usize, usize)>>>,
    }

    impl Protocol for Probe {
        fn connection_made(&mut self, t: Transport) {
            self.transport = Some(t);
        }
        fn data_received(&mut self, data: &[u8]) {
            let mut seen = self.seen.borrow_mut();
            if seen.is_none() {
                let owners = self.reactor.inner.recv_owners.borrow();
                let accepts = owners.iter().filter(|(_, o)| o.op == super::RecvOp::Accept).count();
                let receives = owners.len() - accepts;
                let polled = self.reactor.inner.fds.borrow().readers().len();
                *seen = Some((accepts, receives, polled));
            }
            if let Some(t) = &self.transport {
                t.write(data);
            }
        }
    }

    /// On io_uring a TCP listener accepts by completion and its connection
    /// reads by completion: one accept and one receive in the reactor's
    /// table, and no descriptor polled; the bytes still come back whole
    /// and in order.
    #[test]
    fn tcp_accepts_and_reads_by_completion_on_a_ring() {
        let r = Reactor::new(Backend::IoUring).expect("io_uring reactor");
        assert!(r.reads_by_completion(), "this kernel should take multishot receives");
        let seen = Rc::new(RefCell::new(None));
        let (rr, s) = (r.clone(), seen.clone());
        let port = r
            .listen_tcp(
                "127.0.0.1:0",
                move || Probe { reactor: rr.clone(), transport: None, seen: s.clone() },
                8,
            )
            .unwrap();
        let addr = port.local_addr();
        let remote = r.remote();
        let client = std::thread::spawn(move || {
            let mut c = std::net::TcpStream::connect(addr).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let sent: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
            let writer = {
                let mut c = c.try_clone().unwrap();
                let sent = sent.clone();
                std::thread::spawn(move || c.write_all(&sent).unwrap())
            };
            let mut back = vec![0u8; sent.len()];
            c.read_exact(&mut back).unwrap();
            writer.join().unwrap();
            let _ = remote.call_from_thread(|r| {
                let _ = r.stop();
            });
            back == sent
        });
        let r2 = r.clone();
        r.call_later(Duration::from_secs(60), move || {
            let _ = r2.stop();
        });
        r.run().unwrap();
        assert!(client.join().unwrap(), "the echo came back changed");
        assert_eq!(*seen.borrow(), Some((1, 1, 0)), "(accepts, receives, descriptors polled)");
    }
}
