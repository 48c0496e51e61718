//! Stream sends by completion (io_uring): routing each send completion to
//! the writer that started it.
//!
//! A stream writer on a ring hands its queued chunks to
//! [`Reactor::ring_send`] and keeps no reference to them; the completion
//! brings them back to [`RingWriter::ring_sent`] with how much went, after
//! the pass's readiness events and before its receive completions (so the
//! replies to this pass's reads gather behind what the send left). A writer
//! has at most one send in the kernel, so its bytes cannot reorder.
//!
//! Keys work as for receives: a send's index in the reactor's table is
//! freed only by its completion. Forgetting a send (the connection closes)
//! cancels it at once, so the socket can be closed, and drops the writer;
//! the chunks are freed when the completion comes back.

use std::os::fd::RawFd;
use std::rc::Rc;

use super::fdset::identity;
use super::{guard, FileDescriptor, Reactor};
use crate::backend::uring::send::{Outgoing, Sent};
use crate::backend::AnyPoller;
use crate::error::Failure;

/// A descriptor that writes by completion on a ring.
pub(crate) trait RingWriter: FileDescriptor {
    /// The completion of this writer's send: bytes sent (or the errno),
    /// and the chunks back. An `Err` disconnects it.
    fn ring_sent(&self, result: Result<usize, rustix::io::Errno>, out: Outgoing) -> Result<(), Failure>;
}

/// A started send's writer; `None` once forgotten.
pub(crate) struct SendOwner {
    writer: Option<Rc<dyn RingWriter>>,
    fd: RawFd,
}

pub(crate) type SendOwners = slab::Slab<SendOwner>;

impl Reactor {
    /// Sends `out` on `fd` for `writer`; returns the send's key, or hands
    /// the chunks back with the reason the ring refused.
    pub(crate) fn ring_send(
        &self,
        fd: RawFd,
        writer: Rc<dyn RingWriter>,
        out: Outgoing,
    ) -> Result<u32, (crate::Error, Outgoing)> {
        let mut owners = self.inner.send_owners.borrow_mut();
        let entry = owners.vacant_entry();
        let Ok(key) = u32::try_from(entry.key()) else {
            return Err((crate::Error::BadDescriptor(fd), out));
        };
        let started = match &mut *self.inner.poller.borrow_mut() {
            AnyPoller::Uring(p) => p.send_start(fd, key, out),
            _ => Err((std::io::Error::from(std::io::ErrorKind::Unsupported), out)),
        };
        match started {
            Ok(()) => {
                entry.insert(SendOwner { writer: Some(writer), fd });
                Ok(key)
            }
            Err((e, out)) => Err((crate::Error::io(format!("starting a send on fd {fd}"), e), out)),
        }
    }

    /// Cancels the send under `key`, if `writer` still owns it, and drops
    /// the writer: the socket may be closed once this returns.
    pub(crate) fn ring_send_forget(&self, key: u32, writer: &Rc<dyn RingWriter>) {
        let dropped = {
            let mut owners = self.inner.send_owners.borrow_mut();
            match owners.get_mut(key as usize) {
                Some(o) if o.writer.as_ref().is_some_and(|w| identity(w) == identity(writer)) => {
                    o.writer.take()
                }
                _ => return,
            }
        };
        if let AnyPoller::Uring(p) = &mut *self.inner.poller.borrow_mut() {
            let _ = p.send_cancel(key);
        }
        drop(dropped);
    }

    /// Hands the send completions of the last wait to their writers.
    pub(crate) fn dispatch_sent(&self) {
        let mut sent = self.inner.sent_buf.take();
        if let AnyPoller::Uring(p) = &mut *self.inner.poller.borrow_mut() {
            p.take_sent(&mut sent);
        }
        for Sent { key, result, out } in sent.drain(..) {
            let owner = self.inner.send_owners.borrow_mut().try_remove(key as usize);
            // A forgotten writer's chunks are freed here.
            let Some(SendOwner { writer: Some(writer), fd }) = owner else { continue };
            let result = result.map_err(rustix::io::Errno::from_raw_os_error);
            if let Err(why) = guard::catch(|| writer.ring_sent(result, out)) {
                let d: Rc<dyn FileDescriptor> = writer;
                self.disconnect(fd, &d, why, false);
            }
        }
        self.inner.sent_buf.set(sent);
    }

    /// The writers of every send in the kernel (for drop), forgetting them.
    pub(crate) fn take_ring_writers(owners: &mut SendOwners) -> Vec<(RawFd, Rc<dyn FileDescriptor>)> {
        owners
            .iter_mut()
            .filter_map(|(_, o)| {
                let w: Rc<dyn FileDescriptor> = o.writer.take()?;
                Some((o.fd, w))
            })
            .collect()
    }

    /// Cancels every send and returns the writers (`remove_all`).
    pub(crate) fn forget_ring_writers(&self) -> Vec<(RawFd, Rc<dyn FileDescriptor>)> {
        let mut keys = Vec::new();
        let writers: Vec<_> = {
            let mut owners = self.inner.send_owners.borrow_mut();
            owners
                .iter_mut()
                .filter_map(|(key, o)| {
                    let w: Rc<dyn FileDescriptor> = o.writer.take()?;
                    keys.push(key as u32);
                    Some((o.fd, w))
                })
                .collect()
        };
        if let AnyPoller::Uring(p) = &mut *self.inner.poller.borrow_mut() {
            for key in keys {
                let _ = p.send_cancel(key);
            }
        }
        writers
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::io::Read;
    use std::rc::Rc;
    use std::time::Duration;

    use crate::protocol::Protocol;
    use crate::{Backend, Reactor, Transport};

    const TOTAL: usize = 16 * 1024 * 1024;

    fn pattern(i: usize) -> u8 {
        (i % 251) as u8
    }

    /// Writes far more than the socket holds, in pieces, while the peer
    /// does not read, and records how many sends were in the kernel.
    struct Flood {
        reactor: Reactor,
        in_flight: Rc<RefCell<Vec<usize>>>,
    }

    impl Protocol for Flood {
        fn connection_made(&mut self, t: Transport) {
            let chunk: Vec<u8> = (0..TOTAL / 64).map(pattern).collect();
            // Writes over several passes: each pass adds a piece while the
            // first send is still in the kernel.
            fn write_more(
                r: Reactor,
                t: Transport,
                chunk: Rc<Vec<u8>>,
                n: usize,
                seen: Rc<RefCell<Vec<usize>>>,
            ) {
                seen.borrow_mut().push(r.inner.send_owners.borrow().len());
                if n == 64 {
                    t.lose_connection();
                    return;
                }
                t.write(&chunk);
                let r2 = r.clone();
                r.call_later(Duration::from_millis(1), move || write_more(r2, t, chunk, n + 1, seen));
            }
            write_more(self.reactor.clone(), t, Rc::new(chunk), 0, self.in_flight.clone());
        }
        fn data_received(&mut self, _data: &[u8]) {}
        fn connection_lost(&mut self, _reason: crate::Failure) {
            let _ = self.reactor.stop();
        }
    }

    /// On io_uring a TCP connection sends by completion, never with more
    /// than one send in the kernel, and the bytes of many writes made
    /// meanwhile arrive whole and in order, then the clean close.
    #[test]
    fn one_send_in_flight_and_the_order_kept() {
        let r = Reactor::new(Backend::IoUring).expect("io_uring reactor");
        assert!(r.reads_by_completion(), "this kernel should take stream requests");
        let in_flight = Rc::new(RefCell::new(Vec::new()));
        let (rr, seen) = (r.clone(), in_flight.clone());
        let port = r
            .listen_tcp("127.0.0.1:0", move || Flood { reactor: rr.clone(), in_flight: seen.clone() }, 8)
            .unwrap();
        let addr = port.local_addr();
        let client = std::thread::spawn(move || {
            let mut c = std::net::TcpStream::connect(addr).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            // Let the server's first send fill the socket and wait in the
            // kernel before reading anything.
            std::thread::sleep(Duration::from_millis(300));
            let mut back = Vec::new();
            c.read_to_end(&mut back).unwrap();
            back
        });
        let r2 = r.clone();
        r.call_later(Duration::from_secs(60), move || {
            let _ = r2.stop();
        });
        r.run().unwrap();
        let back = client.join().unwrap();
        assert_eq!(back.len(), TOTAL, "bytes lost or added");
        let chunk_len = TOTAL / 64;
        assert!(back.iter().enumerate().all(|(i, b)| *b == pattern(i % chunk_len)), "bytes out of order");
        let seen = in_flight.borrow();
        assert!(seen.iter().all(|&n| n <= 1), "more than one send in the kernel: {seen:?}");
        assert!(seen.contains(&1), "no send was ever in the kernel: {seen:?}");
    }
}
