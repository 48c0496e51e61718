//! One end of a pipe as a stream kind: what a child process's stdin,
//! stdout and stderr will be. It is the same [`Connection`] as a socket's;
//! only the system calls differ (`read`/`write`/`writev`, since a pipe is
//! not a socket), and a pipe end goes one way only.
//!
//! A pseudo-terminal's master is the third kind here: one descriptor read
//! and written, whose end is `EIO` once the child side has closed.
//!
//! A read end is registered only for reading: the writer closing its end
//! is the end of the stream (`ConnectionDone`), never a half-close, since
//! nothing is left open. A write end is registered for writing only while
//! the kernel refuses bytes, and for "reading" all along, only to hear the
//! reader close its end (a pipe's write end is never readable; the kernel
//! reports the reader's close as an error event, which `select` shows as
//! readable): that ends the connection (`ConnectionDone`), so a child's
//! stdin is known closed when the child exits, written to or not. A write
//! that meets the closed reader first fails with `EPIPE`
//! (`ConnectionLost`).
//!
//! Half-closing a write end (`lose_write_connection`) is losing it; losing
//! or aborting either end closes the descriptor (a pipe has no reset).
//!
//! `write(2)` to a pipe whose reader is gone raises `SIGPIPE` (there is no
//! `MSG_NOSIGNAL` for pipes); Rust programs ignore it from startup, and a
//! reactor that spawns processes must make sure it stays ignored.
//!
//! The descriptor must be non-blocking, like every descriptor a
//! [`Connection`] drives.
//!
//! [`Connection`]: super::connection::Connection

use std::io::IoSlice;
use std::os::fd::OwnedFd;

use rustix::io::Errno;

use super::kind::Kind;
use super::Address;

/// One end of a pipe; `WRITE_END` says which (see the module docs). The
/// direction is part of the type so that the connection's checks of it
/// compile away.
pub(crate) struct Pipe<const WRITE_END: bool> {
    /// Whose descriptor this is: the child's pid and its fd number (0 and
    /// 0 for a pipe no process holds, as in the tests below).
    pid: i32,
    fd: i32,
}

/// The end a process writes to and we read from (its stdout or stderr).
pub(crate) type PipeReader = Pipe<false>;
/// The end we write to and a process reads from (its stdin).
pub(crate) type PipeWriter = Pipe<true>;

impl<const WRITE_END: bool> Pipe<WRITE_END> {
    #[cfg(test)]
    pub fn new() -> Self {
        Pipe { pid: 0, fd: 0 }
    }

    /// The parent's end of child `pid`'s descriptor `fd`.
    pub fn for_child(pid: i32, fd: i32) -> Self {
        Pipe { pid, fd }
    }
}

impl<const WRITE_END: bool> Kind for Pipe<WRITE_END> {
    const NAME: &'static str = "pipe";
    const READS: bool = !WRITE_END;
    const HEARS_PEER_CLOSE: bool = WRITE_END;
    const WRITES: bool = WRITE_END;

    fn peer(&self) -> Address {
        Address::Process { pid: self.pid, fd: self.fd }
    }

    #[inline]
    fn recv(&self, fd: &OwnedFd, buf: &mut [u8]) -> Result<usize, Errno> {
        rustix::io::read(fd, buf)
    }

    #[inline]
    fn send(&self, fd: &OwnedFd, data: &[u8]) -> Result<usize, Errno> {
        rustix::io::write(fd, data)
    }

    #[inline]
    fn send_vectored(&self, fd: &OwnedFd, bufs: &[IoSlice<'_>]) -> Result<usize, Errno> {
        rustix::io::writev(fd, bufs)
    }

    fn shutdown_write(&self, _fd: &OwnedFd) {
        // Never reached: a write end's half-close is a full close (the
        // connection sees `READS` is false), and a read end has no write
        // side to shut. Closing the descriptor is the pipe's only shutdown.
    }
}

/// A pseudo-terminal's master end, which carries both directions. Once
/// every descriptor of the slave side is closed, Linux reports `EIO` on
/// reads: that is the end of the stream.
pub(crate) struct PtyMaster {
    pid: i32,
}

impl PtyMaster {
    pub fn for_child(pid: i32) -> Self {
        PtyMaster { pid }
    }
}

impl Kind for PtyMaster {
    const NAME: &'static str = "pty";

    fn peer(&self) -> Address {
        Address::Process { pid: self.pid, fd: 0 }
    }

    fn recv(&self, fd: &OwnedFd, buf: &mut [u8]) -> Result<usize, Errno> {
        match rustix::io::read(fd, buf) {
            Err(Errno::IO) => Ok(0),
            other => other,
        }
    }

    fn send(&self, fd: &OwnedFd, data: &[u8]) -> Result<usize, Errno> {
        rustix::io::write(fd, data)
    }

    fn send_vectored(&self, fd: &OwnedFd, bufs: &[IoSlice<'_>]) -> Result<usize, Errno> {
        rustix::io::writev(fd, bufs)
    }

    fn shutdown_write(&self, _fd: &OwnedFd) {
        // A terminal has no half-close; losing the write side waits for the
        // whole connection to close.
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Backend;
    use crate::error::{Error, Failure};
    use crate::protocol::{HalfCloseable, Protocol};
    use crate::reactor::Reactor;
    use crate::stream::connection::Connection;
    use crate::transport::{Producer, Transport};
    use rustix::pipe::{pipe_with, PipeFlags};
    use std::cell::{Cell, RefCell};
    use std::os::fd::AsRawFd;
    use std::rc::Rc;
    use std::time::Duration;

    /// How long a test may take before it is called hung (generous: the
    /// machine is shared).
    const WATCHDOG: Duration = Duration::from_secs(20);

    type Log = Rc<RefCell<Vec<String>>>;

    /// Names a close reason briefly, for comparing event logs.
    fn reason(f: &Failure) -> String {
        match f.braid_error() {
            Some(Error::ConnectionDone) => "done".into(),
            Some(Error::ConnectionLost) => "lost".into(),
            _ => format!("other: {f}"),
        }
    }

    type MadeHook = Option<Box<dyn FnMut(&Transport)>>;

    /// Records what happens to one connection; runs a hook when it is made.
    #[derive(Default)]
    struct Rec {
        log: Log,
        data: Rc<RefCell<Vec<u8>>>,
        on_made: MadeHook,
        on_data: Option<Box<dyn FnMut()>>,
        on_lost: Option<Box<dyn FnMut()>>,
        transport: Option<Transport>,
    }

    impl Protocol for Rec {
        fn connection_made(&mut self, t: Transport) {
            self.log.borrow_mut().push("made".into());
            if let Some(f) = self.on_made.as_mut() {
                f(&t);
            }
            self.transport = Some(t);
        }
        fn data_received(&mut self, data: &[u8]) {
            self.data.borrow_mut().extend_from_slice(data);
            if let Some(f) = self.on_data.as_mut() {
                f();
            }
        }
        fn connection_lost(&mut self, why: Failure) {
            self.log.borrow_mut().push(format!("lost: {}", reason(&why)));
            if let Some(f) = self.on_lost.as_mut() {
                f();
            }
        }
        // Half-closeable, so a read end's EOF closing it whole is shown to
        // be the connection's choice, not the protocol's.
        fn as_half_closeable(&mut self) -> Option<&mut dyn HalfCloseable> {
            Some(self)
        }
    }

    impl HalfCloseable for Rec {
        fn read_connection_lost(&mut self) {
            self.log.borrow_mut().push("read closed".into());
        }
        fn write_connection_lost(&mut self) {
            self.log.borrow_mut().push("write closed".into());
        }
    }

    /// A non-blocking pipe: (read end, write end).
    fn pipe() -> (OwnedFd, OwnedFd) {
        pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC).expect("pipe2")
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    /// Stops `r` once `count` reaches `n` (each call adds one).
    fn stop_at(r: &Reactor, count: &Rc<Cell<usize>>, n: usize) -> Box<dyn FnMut()> {
        let (r, count) = (r.clone(), count.clone());
        Box::new(move || {
            count.set(count.get() + 1);
            if count.get() == n {
                let _ = r.stop();
            }
        })
    }

    /// Runs `r` until it is stopped; fails the test if the watchdog fired.
    fn run(r: &Reactor, backend: Backend) {
        let rr = r.clone();
        let fired = Rc::new(Cell::new(false));
        let f = fired.clone();
        let watchdog = r.call_later(WATCHDOG, move || {
            f.set(true);
            let _ = rr.stop();
        });
        r.run_without_signal_handlers().unwrap();
        let _ = watchdog.cancel();
        assert!(!fired.get(), "{backend}: hung (the watchdog stopped the reactor)");
    }

    /// Bytes written through a write-only pipe connection arrive, in order,
    /// through a read-only one on the other end; more than the pipe holds,
    /// so the writer must wait for writability. The writer's
    /// `lose_connection` (when the first bytes arrive) ends both: the reader with a clean close (not a
    /// half-close, although its protocol would take one).
    #[test]
    fn bytes_flow_through_a_pipe_and_lose_closes_both_ends() {
        for &backend in Backend::ALL {
            let r = Reactor::new(backend).unwrap();
            let (rd, wr) = pipe();
            let capacity = rustix::pipe::fcntl_getpipe_size(&wr).unwrap();
            // Owned chunks and copied ones, so both `write` and `writev` run.
            let parts = [pattern(100), pattern(300_000), pattern(5), pattern(700_000), pattern(40_000)];
            let payload: Vec<u8> = parts.concat();
            assert!(
                payload.len() > 4 * capacity,
                "{backend}: the payload must overflow the pipe ({capacity} B)"
            );

            let lost = Rc::new(Cell::new(0));
            let (wlog, rlog) = (Log::default(), Log::default());
            let got = Rc::new(RefCell::new(Vec::new()));
            let wt: Rc<RefCell<Option<Transport>>> = Rc::default();
            let wt2 = wt.clone();
            let writer = Rec {
                log: wlog.clone(),
                on_made: Some(Box::new(move |t: &Transport| {
                    for (i, p) in parts.iter().enumerate() {
                        if i % 2 == 0 {
                            t.write(p);
                        } else {
                            t.write_vec(p.clone());
                        }
                    }
                    *wt2.borrow_mut() = Some(t.clone());
                })),
                on_lost: Some(stop_at(&r, &lost, 2)),
                ..Default::default()
            };
            // While bytes arrive: the read end is never a writer, the write
            // end is watched for reading only to hear its reader close, and
            // the write end does wait as a writer.
            let (rfd, wfd) = (rd.as_raw_fd(), wr.as_raw_fd());
            let wrong = Rc::new(RefCell::new(Vec::new()));
            let writer_waited = Rc::new(Cell::new(false));
            let (rr, wrong2, waited) = (r.clone(), wrong.clone(), writer_waited.clone());
            let wlog2 = wlog.clone();
            let check = move || {
                let writer_open = !wlog2.borrow().iter().any(|e| e.starts_with("lost"));
                let readers: Vec<_> = rr.get_readers().iter().map(|d| d.fileno()).collect();
                let writers: Vec<_> = rr.get_writers().iter().map(|d| d.fileno()).collect();
                if writer_open && !readers.contains(&wfd) {
                    wrong2.borrow_mut().push("the write end does not listen for its reader's close");
                }
                if writers.contains(&rfd) {
                    wrong2.borrow_mut().push("the read end is a writer");
                }
                if writers.contains(&wfd) {
                    waited.set(true);
                }
                // Lost with most of the payload still buffered: the rest
                // must still be sent before the close.
                if let Some(t) = wt.borrow_mut().take() {
                    t.lose_connection();
                }
            };
            let reader = Rec {
                log: rlog.clone(),
                data: got.clone(),
                on_data: Some(Box::new(check)),
                on_lost: Some(stop_at(&r, &lost, 2)),
                ..Default::default()
            };
            let rconn = Connection::new(&r, PipeReader::new(), rd);
            let wconn = Connection::new(&r, PipeWriter::new(), wr);
            assert!(rconn.start(Box::new(reader)).is_ok(), "{backend}: reader start");
            assert!(wconn.start(Box::new(writer)).is_ok(), "{backend}: writer start");
            run(&r, backend);

            assert_eq!(*wlog.borrow(), ["made", "lost: done"], "{backend}: writer");
            assert_eq!(*rlog.borrow(), ["made", "lost: done"], "{backend}: reader");
            assert!(wrong.borrow().is_empty(), "{backend}: {:?}", wrong.borrow());
            assert!(writer_waited.get(), "{backend}: the writer never waited for writability");
            let got = got.borrow();
            assert!(
                *got == payload,
                "{backend}: {} bytes arrived of {}, or out of order",
                got.len(),
                payload.len()
            );
        }
    }

    /// The reader closing its end while the writer still has bytes buffered
    /// loses the writer's connection (no hang waiting for writability).
    #[test]
    fn closing_the_read_end_loses_a_writer_with_buffered_bytes() {
        for &backend in Backend::ALL {
            let r = Reactor::new(backend).unwrap();
            let (rd, wr) = pipe();
            let capacity = rustix::pipe::fcntl_getpipe_size(&wr).unwrap();
            let wlog = Log::default();
            let lost = Rc::new(Cell::new(0));
            let writer = Rec {
                log: wlog.clone(),
                on_made: Some(Box::new(move |t: &Transport| t.write_vec(pattern(4 * capacity)))),
                on_lost: Some(stop_at(&r, &lost, 1)),
                ..Default::default()
            };
            let wconn = Connection::new(&r, PipeWriter::new(), wr);
            assert!(wconn.start(Box::new(writer)).is_ok(), "{backend}: writer start");
            // After the first pass has filled the pipe: check the writer is
            // waiting on buffered bytes, then close the read end.
            let buffered_then = Rc::new(Cell::new(None));
            let (w, b) = (wconn.clone(), buffered_then.clone());
            let mut rd = Some(rd);
            r.call_later(Duration::from_millis(20), move || {
                b.set(Some(crate::transport::TransportOps::buffered(&*w)));
                drop(rd.take());
            });
            run(&r, backend);

            let buffered = buffered_then.get().expect("the read end was closed");
            assert!(buffered > 0, "{backend}: the writer had nothing buffered when the reader left");
            assert_eq!(*wlog.borrow(), ["made", "lost: lost"], "{backend}: writer");
        }
    }

    /// ("pause" | "resume", bytes buffered, bytes the reader had then).
    type Marks = Rc<RefCell<Vec<(&'static str, usize, usize)>>>;

    /// Half-closing a write end ends it (after its bytes are sent): there
    /// is no other direction to keep open. Writes to a read end are dropped
    /// rather than failing the connection.
    #[test]
    fn half_close_of_a_write_end_closes_it_and_a_read_end_drops_writes() {
        for &backend in Backend::ALL {
            let r = Reactor::new(backend).unwrap();
            let (rd, wr) = pipe();
            let lost = Rc::new(Cell::new(0));
            let (wlog, rlog) = (Log::default(), Log::default());
            let got = Rc::new(RefCell::new(Vec::new()));
            let writer = Rec {
                log: wlog.clone(),
                on_made: Some(Box::new(|t: &Transport| {
                    t.write(b"last words");
                    t.lose_write_connection();
                })),
                on_lost: Some(stop_at(&r, &lost, 2)),
                ..Default::default()
            };
            let buffered = Rc::new(Cell::new(None));
            let b = buffered.clone();
            let reader = Rec {
                log: rlog.clone(),
                data: got.clone(),
                on_made: Some(Box::new(move |t: &Transport| {
                    t.write(b"ignored");
                    t.write_vec(vec![1; 100_000]);
                    b.set(Some(t.buffered()));
                })),
                on_lost: Some(stop_at(&r, &lost, 2)),
                ..Default::default()
            };
            let rconn = Connection::new(&r, PipeReader::new(), rd);
            let wconn = Connection::new(&r, PipeWriter::new(), wr);
            assert!(rconn.start(Box::new(reader)).is_ok(), "{backend}: reader start");
            assert!(wconn.start(Box::new(writer)).is_ok(), "{backend}: writer start");
            run(&r, backend);

            assert_eq!(buffered.get(), Some(0), "{backend}: a read end buffered writes");
            assert_eq!(*wlog.borrow(), ["made", "lost: done"], "{backend}: writer");
            assert_eq!(*rlog.borrow(), ["made", "lost: done"], "{backend}: reader");
            assert_eq!(*got.borrow(), b"last words", "{backend}");
        }
    }

    /// A streaming producer that writes in bursts until paused, and records
    /// how much was buffered at each pause and resume.
    struct Burst {
        t: Transport,
        reactor: Reactor,
        data: Vec<u8>,
        left: Cell<usize>,
        paused: Cell<bool>,
        log: Marks,
        received: Rc<RefCell<Vec<u8>>>,
        me: RefCell<std::rc::Weak<Burst>>,
    }

    const BURST_CHUNK: usize = 4096;

    impl Burst {
        /// Writes until paused or done (bounded by `left`), then either
        /// finishes or continues on the next pass.
        fn produce(&self) {
            while !self.paused.get() && self.left.get() > 0 {
                let n = self.left.get().min(BURST_CHUNK);
                let offset = self.data.len() - self.left.get();
                self.t.write(&self.data[offset..offset + n]);
                self.left.set(self.left.get() - n);
            }
            if self.left.get() == 0 {
                self.t.unregister_producer();
                self.t.lose_connection();
            }
        }
    }

    const BURST_TOTAL: usize = 400_000;

    impl Producer for Burst {
        fn pause_producing(&self) {
            self.paused.set(true);
            self.log.borrow_mut().push(("pause", self.t.buffered(), self.received.borrow().len()));
        }
        fn resume_producing(&self) {
            self.paused.set(false);
            self.log.borrow_mut().push(("resume", self.t.buffered(), self.received.borrow().len()));
            // Not from inside the connection's own flush: on the next pass.
            let me = self.me.borrow().clone();
            self.reactor.call_later(Duration::ZERO, move || {
                if let Some(me) = me.upgrade() {
                    me.produce();
                }
            });
        }
        fn stop_producing(&self) {}
    }

    /// A streaming producer on a write-only pipe is paused when the buffer
    /// passes the high-water mark and resumed once the reader has drained
    /// it to the low-water mark: the same contract as on TCP.
    #[test]
    fn streaming_producer_paused_and_resumed_on_a_pipe() {
        const HIGH: usize = 32 * 1024;
        const LOW: usize = 8 * 1024;
        for &backend in Backend::ALL {
            let r = Reactor::new(backend).unwrap();
            let (rd, wr) = pipe();
            // A pipe smaller than the high-water mark, so the buffer can only
            // drain as the reader reads.
            let capacity = rustix::pipe::fcntl_setpipe_size(&wr, 4096).unwrap();
            assert!(
                capacity < LOW,
                "{backend}: the pipe holds {capacity} B, not less than the low-water mark"
            );

            let lost = Rc::new(Cell::new(0));
            let (wlog, rlog) = (Log::default(), Log::default());
            let got = Rc::new(RefCell::new(Vec::new()));
            let marks = Rc::new(RefCell::new(Vec::new()));
            let producer: Rc<RefCell<Option<Rc<Burst>>>> = Rc::default();
            let (rr, m, g, p) = (r.clone(), marks.clone(), got.clone(), producer.clone());
            let writer = Rec {
                log: wlog.clone(),
                on_made: Some(Box::new(move |t: &Transport| {
                    t.set_write_buffer_limits(HIGH, LOW);
                    let burst = Rc::new(Burst {
                        t: t.clone(),
                        reactor: rr.clone(),
                        data: pattern(BURST_TOTAL),
                        left: Cell::new(BURST_TOTAL),
                        paused: Cell::new(false),
                        log: m.clone(),
                        received: g.clone(),
                        me: RefCell::new(std::rc::Weak::new()),
                    });
                    *burst.me.borrow_mut() = Rc::downgrade(&burst);
                    t.register_producer(burst.clone(), true).unwrap();
                    *p.borrow_mut() = Some(burst.clone());
                    burst.produce();
                })),
                on_lost: Some(stop_at(&r, &lost, 2)),
                ..Default::default()
            };
            let reader = Rec {
                log: rlog.clone(),
                data: got.clone(),
                on_lost: Some(stop_at(&r, &lost, 2)),
                ..Default::default()
            };
            let rconn = Connection::new(&r, PipeReader::new(), rd);
            let wconn = Connection::new(&r, PipeWriter::new(), wr);
            assert!(rconn.start(Box::new(reader)).is_ok(), "{backend}: reader start");
            assert!(wconn.start(Box::new(writer)).is_ok(), "{backend}: writer start");
            run(&r, backend);
            producer.borrow_mut().take();

            let marks = marks.borrow();
            assert!(!marks.is_empty(), "{backend}: the producer was never paused");
            for (i, &(what, buffered, received)) in marks.iter().enumerate() {
                let expected = if i % 2 == 0 { "pause" } else { "resume" };
                assert_eq!(what, expected, "{backend}: event {i} of {marks:?}");
                if what == "pause" {
                    assert!(buffered > HIGH, "{backend}: paused at {buffered} B buffered");
                } else {
                    assert!(buffered <= LOW, "{backend}: resumed at {buffered} B buffered");
                    let paused_at = marks[i - 1].2;
                    assert!(received > paused_at, "{backend}: resumed before the reader read anything");
                }
            }
            assert_eq!(marks.last().map(|m| m.0), Some("resume"), "{backend}: left paused: {marks:?}");
            assert!(marks.len() >= 4, "{backend}: expected several pauses for {BURST_TOTAL} B: {marks:?}");
            assert_eq!(*wlog.borrow(), ["made", "lost: done"], "{backend}: writer");
            assert_eq!(*rlog.borrow(), ["made", "lost: done"], "{backend}: reader");
            assert!(
                *got.borrow() == pattern(BURST_TOTAL),
                "{backend}: the bytes arrived incomplete or out of order"
            );
        }
    }
}
