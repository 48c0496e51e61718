//! Relaying two TCP connections through the kernel: `splice(2)` from one
//! socket into a pipe and from the pipe into the other socket, one pipe per
//! direction, so the bytes never enter user space (a port forwarder's
//! zero-copy path).
//!
//! Once [`splice_streams`] takes two connections, their own reading stops
//! for good and four small watchers drive them instead: per direction, one
//! on the source for readability and one on the destination for
//! writability. A direction reads only while its pipe is empty enough, so a
//! stalled destination stops reading from the source (backpressure, with
//! at most one pipe's worth in flight). The end of one direction's input is
//! passed on as a half-close of the other socket; once both directions have
//! ended, or on the first error, both connections are closed, and their
//! protocols hear `connection_lost` as usual.

use std::cell::{Cell, RefCell};
use std::os::fd::{OwnedFd, RawFd};
use std::rc::Rc;

use rustix::io::Errno;
use rustix::pipe::{pipe_with, splice, PipeFlags, SpliceFlags};

use super::connection::Connection;
use super::kind::Tcp;
use crate::defer::Deferred;
use crate::error::{Error, Failure};
use crate::reactor::{FileDescriptor, Reactor, WeakReactor};
use crate::transport::Transport;

/// Bytes moved per splice call at most (one pipe's default capacity).
const CHUNK: usize = 64 * 1024;
/// Bytes one readiness event moves in one direction at most, so a busy
/// pair cannot starve the rest of the loop.
const BUDGET: usize = 256 * 1024;

/// One direction: from `conns[i]` to `conns[1 - i]` through a pipe.
struct Dir {
    pipe_r: OwnedFd,
    pipe_w: OwnedFd,
    in_pipe: usize,
    eof: bool,
    done: bool,
    reading: bool,
    writing: bool,
}

struct Relay {
    reactor: WeakReactor,
    conns: [Rc<Connection<Tcp>>; 2],
    dirs: [RefCell<Dir>; 2],
    /// `readers[i]` watches `conns[i]` for direction `i`; `writers[i]`
    /// watches `conns[1 - i]` for direction `i`.
    readers: [Rc<Side>; 2],
    writers: [Rc<Side>; 2],
    finished: Cell<bool>,
    done: Deferred<()>,
}

/// One watcher: a descriptor, and which direction it serves.
/// Each side keeps the relay alive while the reactor watches it; the
/// links are cut when the relay finishes.
struct Side {
    fd: RawFd,
    /// The connection that owns `fd`: once it is closed (by a caller's
    /// `lose_connection`, say), this side reports no descriptor, so the
    /// reactor drops it rather than serve a reused number.
    conn: Rc<Connection<Tcp>>,
    dir: usize,
    relay: RefCell<Option<Rc<Relay>>>,
}

impl Side {
    fn relay(&self) -> Option<Rc<Relay>> {
        self.relay.borrow().clone()
    }
}

impl FileDescriptor for Side {
    fn fileno(&self) -> RawFd {
        if FileDescriptor::fileno(&*self.conn) < 0 {
            -1
        } else {
            self.fd
        }
    }

    fn do_read(&self) -> Result<(), Failure> {
        if let Some(r) = self.relay() {
            r.pump(self.dir);
        }
        Ok(())
    }

    fn do_write(&self) -> Result<(), Failure> {
        if let Some(r) = self.relay() {
            r.pump(self.dir);
        }
        Ok(())
    }

    fn reads_errors(&self) -> bool {
        // A reset or hang-up shows in the next splice, which tells how.
        true
    }

    fn connection_lost(&self, reason: Failure) {
        if let Some(r) = self.relay() {
            r.finish(Err(reason));
        }
    }

    fn log_prefix(&self) -> String {
        format!("splice relay fd {}", self.fd)
    }
}

/// The TCP connection behind `t`, if it is one.
fn tcp_connection(t: &Transport) -> Option<Rc<Connection<Tcp>>> {
    t.ops().clone().tcp()?.splice_source()?.downcast::<Connection<Tcp>>().ok()
}

/// Hands two established TCP connections to the kernel to relay each
/// one's input to the other (see the module docs). Their protocols stop
/// seeing data; they hear `connection_lost` when the relay ends. The
/// Deferred fires once both directions have ended (and fails with the
/// first error). Refused, with the connections untouched, unless both are
/// TCP connections with nothing buffered.
pub fn splice_streams(reactor: &Reactor, a: &Transport, b: &Transport) -> Result<Deferred<()>, Error> {
    let not_tcp = || {
        Error::io("splicing", std::io::Error::new(std::io::ErrorKind::Unsupported, "not a TCP connection"))
    };
    let (ca, cb) = (tcp_connection(a).ok_or_else(not_tcp)?, tcp_connection(b).ok_or_else(not_tcp)?);
    if a.buffered() > 0 || b.buffered() > 0 || !a.connected() || !b.connected() {
        return Err(Error::io(
            "splicing",
            std::io::Error::new(
                std::io::ErrorKind::WouldBlock,
                "a connection has bytes buffered or is closing",
            ),
        ));
    }
    let pipe = || {
        pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC)
            .map_err(|e| Error::io("making a pipe for splice", e.into()))
    };
    let (r0, w0) = pipe()?;
    let (r1, w1) = pipe()?;
    let dir = |pipe_r, pipe_w| {
        RefCell::new(Dir {
            pipe_r,
            pipe_w,
            in_pipe: 0,
            eof: false,
            done: false,
            reading: false,
            writing: false,
        })
    };
    let side = |conn: &Rc<Connection<Tcp>>, dir| {
        Rc::new(Side { fd: conn.raw_fd(), conn: conn.clone(), dir, relay: RefCell::new(None) })
    };
    // The connections stop reading and producing for each other for good.
    for t in [a, b] {
        t.unregister_producer();
        t.pause_producing();
    }
    let relay = Rc::new(Relay {
        reactor: reactor.weak(),
        readers: [side(&ca, 0), side(&cb, 1)],
        writers: [side(&cb, 0), side(&ca, 1)],
        conns: [ca, cb],
        dirs: [dir(r0, w0), dir(r1, w1)],
        finished: Cell::new(false),
        done: Deferred::new(),
    });
    for s in relay.readers.iter().chain(relay.writers.iter()) {
        *s.relay.borrow_mut() = Some(relay.clone());
    }
    for i in 0..2 {
        relay.watch(i, true, true);
    }
    Ok(relay.done.clone())
}

impl Relay {
    /// Watches (or stops watching) direction `i`'s source (`read`) or
    /// destination.
    fn watch(&self, i: usize, read: bool, on: bool) {
        let Some(reactor) = self.reactor.get() else { return };
        let mut d = self.dirs[i].borrow_mut();
        let (flag, side) =
            if read { (&mut d.reading, &self.readers[i]) } else { (&mut d.writing, &self.writers[i]) };
        if *flag == on {
            return;
        }
        *flag = on;
        let result = match (read, on) {
            (true, true) => reactor.add_reader(side.clone()),
            (false, true) => reactor.add_writer(side.clone()),
            (true, false) => {
                reactor.remove_reader(side);
                Ok(())
            }
            (false, false) => {
                reactor.remove_writer(side);
                Ok(())
            }
        };
        drop(d);
        if let Err(e) = result {
            self.finish(Err(Failure::new(e)));
        }
    }

    /// Moves what direction `i` can move now.
    fn pump(&self, i: usize) {
        if self.finished.get() {
            return;
        }
        let (src, dst) = (&self.conns[i], &self.conns[1 - i]);
        let mut moved = 0;
        loop {
            // Empty the pipe into the destination first.
            loop {
                let pending = self.dirs[i].borrow().in_pipe;
                if pending == 0 {
                    break;
                }
                let sent = {
                    let d = self.dirs[i].borrow();
                    dst.with_socket(|sock| {
                        splice(
                            &d.pipe_r,
                            None,
                            sock,
                            None,
                            pending,
                            SpliceFlags::MOVE | SpliceFlags::NONBLOCK,
                        )
                    })
                };
                match sent {
                    Some(Ok(n)) => self.dirs[i].borrow_mut().in_pipe -= n,
                    Some(Err(Errno::INTR)) => continue,
                    Some(Err(Errno::AGAIN)) => {
                        // Backpressure: wait for the destination, read nothing meanwhile.
                        self.watch(i, true, false);
                        self.watch(i, false, true);
                        return;
                    }
                    Some(Err(e)) => return self.finish(Err(Failure::new(lost(e)))),
                    None => return self.finish(Err(Failure::new(Error::ConnectionLost))),
                }
            }
            self.watch(i, false, false);
            if self.dirs[i].borrow().eof {
                self.end(i);
                return;
            }
            if moved >= BUDGET {
                self.watch(i, true, true);
                return;
            }
            let got = {
                let d = self.dirs[i].borrow();
                src.with_socket(|sock| {
                    splice(sock, None, &d.pipe_w, None, CHUNK, SpliceFlags::MOVE | SpliceFlags::NONBLOCK)
                })
            };
            match got {
                Some(Ok(0)) => self.dirs[i].borrow_mut().eof = true,
                Some(Ok(n)) => {
                    self.dirs[i].borrow_mut().in_pipe += n;
                    moved += n;
                }
                Some(Err(Errno::INTR)) => {}
                Some(Err(Errno::AGAIN)) => {
                    self.watch(i, true, true);
                    return;
                }
                Some(Err(e)) => return self.finish(Err(Failure::new(lost(e)))),
                None => return self.finish(Err(Failure::new(Error::ConnectionLost))),
            }
        }
    }

    /// Direction `i` has carried everything: half-close its destination.
    fn end(&self, i: usize) {
        self.watch(i, true, false);
        self.dirs[i].borrow_mut().done = true;
        self.conns[1 - i].shutdown_write_now();
        if self.dirs.iter().all(|d| d.borrow().done) {
            self.finish(Ok(()));
        }
    }

    /// Stops every watcher and closes both connections (once).
    fn finish(&self, result: Result<(), Failure>) {
        if self.finished.replace(true) {
            return;
        }
        for i in 0..2 {
            // Flags first, so `watch` cannot re-enter `finish`.
            if let Some(reactor) = self.reactor.get() {
                let mut d = self.dirs[i].borrow_mut();
                if std::mem::replace(&mut d.reading, false) {
                    reactor.remove_reader(&self.readers[i]);
                }
                if std::mem::replace(&mut d.writing, false) {
                    reactor.remove_writer(&self.writers[i]);
                }
            }
        }
        let reason = match &result {
            Ok(()) => Failure::new(Error::ConnectionDone),
            Err(f) => f.clone(),
        };
        for c in &self.conns {
            c.close(reason.clone());
        }
        let _ = match result {
            Ok(()) => self.done.callback(()),
            Err(f) => self.done.errback(f),
        };
        for s in self.readers.iter().chain(self.writers.iter()) {
            s.relay.borrow_mut().take();
        }
    }
}

fn lost(e: Errno) -> Error {
    match e {
        Errno::CONNRESET | Errno::PIPE => Error::ConnectionLost,
        other => Error::io("splicing between connections", other.into()),
    }
}
