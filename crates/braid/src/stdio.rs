//! Standard input and output as one connection (Twisted's
//! `twisted.internet.stdio.StandardIO`, and the `stdio:` server endpoint):
//! a [`Protocol`] reads what arrives on descriptor 0 and writes to
//! descriptor 1, through a [`Transport`] like any stream's: buffered
//! writes, `lose_connection` (flush, then close both), `abort_connection`,
//! half-close (`lose_write_connection` closes the output alone), producers
//! and backpressure on the output, pausing the input.
//!
//! Each direction is one stream connection of the pipe kinds (the same
//! buffering and exactly-once close as a socket's). The output is watched
//! for its reader going away only when it is a pipe: a terminal or socket
//! on descriptor 1 is readable for other reasons, so it is only written.
//!
//! # Ends
//! The input ending (EOF) is a half-close for a protocol that takes them
//! (`read_connection_lost`; the output stays open until the protocol
//! closes it); any other protocol has its output flushed and closed. The
//! output's reader going away is `write_connection_lost` for a
//! half-closeable protocol, otherwise the input is closed too.
//! `connection_lost` comes once both directions are closed, exactly once:
//! `ConnectionDone` for a clean end, the first error otherwise.
//!
//! # The process's own descriptors
//! [`StdioFds::process`] takes descriptors 0 and 1 for a connection:
//! copies of them are kept, and `/dev/null` is put in their place, so
//! closing the connection really closes the process's standard output for
//! its reader, and a stray `println!` cannot corrupt the stream. Both
//! descriptors are made non-blocking (which, for a terminal, its other
//! users see too, as in Twisted). They must be pollable: a pipe, terminal
//! or socket; a regular file or `/dev/null` on epoll is refused
//! (`EPERM`), an error from [`std_io`].

use std::cell::{Cell, RefCell};
use std::io::IoSlice;
use std::os::fd::{AsFd, OwnedFd};
use std::rc::Rc;

use rustix::io::Errno;

use crate::defer::Deferred;
use crate::error::{Error, Failure};
use crate::protocol::Protocol;
use crate::reactor::{catch_panic, log_failure, Reactor};
use crate::stream::connection::Connection;
use crate::stream::kind::Kind;
use crate::stream::pipe::{PipeReader, PipeWriter};
use crate::stream::Address;
use crate::transport::{Producer, Transport, TransportOps};

/// The two descriptors of a standard I/O connection: one read, one written.
#[derive(Debug)]
pub struct StdioFds {
    /// Read from (standard input).
    pub read: OwnedFd,
    /// Written to (standard output).
    pub write: OwnedFd,
}

impl StdioFds {
    /// This process's descriptors 0 and 1 (see the module docs: copies are
    /// taken, `/dev/null` put in their place). Rust's buffered stdout is
    /// flushed first.
    pub fn process() -> Result<StdioFds, Error> {
        use std::io::Write;
        let fail = |what: &str, e: std::io::Error| Error::io(format!("taking standard I/O: {what}"), e);
        let _ = std::io::stdout().flush();
        let read = std::io::stdin().as_fd().try_clone_to_owned().map_err(|e| fail("copying fd 0", e))?;
        let write = std::io::stdout().as_fd().try_clone_to_owned().map_err(|e| fail("copying fd 1", e))?;
        let null = rustix::fs::open(
            "/dev/null",
            rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .map_err(|e| fail("opening /dev/null", e.into()))?;
        rustix::stdio::dup2_stdin(&null).map_err(|e| fail("replacing fd 0", e.into()))?;
        rustix::stdio::dup2_stdout(&null).map_err(|e| fail("replacing fd 1", e.into()))?;
        Ok(StdioFds { read, write })
    }
}

/// An output that is not a pipe (a terminal, a socket): written with
/// `write`, never watched for reading (its readability means input, not
/// that its reader left).
pub(crate) struct PlainOutput;

impl Kind for PlainOutput {
    const NAME: &'static str = "stdout";
    const READS: bool = false;
    const WRITES: bool = true;

    fn peer(&self) -> Address {
        Address::Pipe
    }

    fn recv(&self, fd: &OwnedFd, buf: &mut [u8]) -> Result<usize, Errno> {
        rustix::io::read(fd, buf)
    }

    fn send(&self, fd: &OwnedFd, data: &[u8]) -> Result<usize, Errno> {
        rustix::io::write(fd, data)
    }

    fn send_vectored(&self, fd: &OwnedFd, bufs: &[IoSlice<'_>]) -> Result<usize, Errno> {
        rustix::io::writev(fd, bufs)
    }

    fn shutdown_write(&self, _fd: &OwnedFd) {
        // A write-only kind's half-close is a full close (see pipe.rs).
    }
}

/// Where the connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Life {
    Open,
    /// `lose_connection` or `abort_connection` was called, or one side's
    /// end closes the other: waiting for both directions to close.
    Closing,
    /// `connection_lost` was delivered.
    Lost,
}

/// One standard I/O connection: its protocol and its two directions.
struct Stdio {
    protocol: RefCell<Option<Box<dyn Protocol>>>,
    input: RefCell<Option<Transport>>,
    output: RefCell<Option<Transport>>,
    life: Cell<Life>,
    /// The protocol asked for the output alone to close.
    output_closing: Cell<bool>,
    /// The first error, if the end was not clean.
    reason: RefCell<Option<Failure>>,
    /// Fired once the connection is lost (the endpoint port's stop).
    when_lost: RefCell<Vec<Deferred<()>>>,
}

fn is_clean(f: &Failure) -> bool {
    matches!(f.braid_error(), Some(Error::ConnectionDone))
}

impl Stdio {
    fn call(&self, what: &str, f: impl FnOnce(&mut dyn Protocol)) {
        let result = catch_panic(|| match self.protocol.try_borrow_mut() {
            Ok(mut p) => {
                if let Some(p) = p.as_mut() {
                    f(&mut **p);
                }
                Ok(())
            }
            Err(_) => Err(Failure::msg("the protocol is busy in another callback")),
        });
        if let Err(failure) = result {
            log_failure(&format!("in {what} for standard I/O"), &failure);
            // A protocol that panicked is closed, as any connection's is.
            self.note(Failure::new(Error::ConnectionLost));
            self.close_all(false);
        }
    }

    fn note(&self, why: Failure) {
        if !is_clean(&why) {
            self.reason.borrow_mut().get_or_insert(why);
        }
    }

    fn half_closeable(&self) -> bool {
        self.protocol
            .try_borrow_mut()
            .ok()
            .is_some_and(|mut p| p.as_mut().is_some_and(|p| p.as_half_closeable().is_some()))
    }

    /// Closes both directions (the output after its buffer is sent, unless
    /// aborting).
    fn close_all(&self, abort: bool) {
        if self.life.get() == Life::Open {
            self.life.set(Life::Closing);
        }
        let input = self.input.borrow().clone();
        let output = self.output.borrow().clone();
        for t in [input, output].into_iter().flatten() {
            if abort {
                t.abort_connection();
            } else {
                t.lose_connection();
            }
        }
    }

    fn input_closed(&self, why: Failure) {
        self.input.borrow_mut().take();
        let clean = is_clean(&why);
        self.note(why);
        if self.life.get() == Life::Open {
            if clean && self.half_closeable() {
                self.call("read_connection_lost", |p| {
                    if let Some(h) = p.as_half_closeable() {
                        h.read_connection_lost();
                    }
                });
            } else {
                self.close_all(false);
            }
        }
        self.maybe_lost();
    }

    fn output_closed(&self, why: Failure) {
        self.output.borrow_mut().take();
        let clean = is_clean(&why);
        self.note(why);
        if self.life.get() == Life::Open {
            // Asked for, or the reader left: a half-closeable protocol may
            // go on reading.
            if (self.output_closing.get() && clean) || self.half_closeable() {
                self.call("write_connection_lost", |p| {
                    if let Some(h) = p.as_half_closeable() {
                        h.write_connection_lost();
                    }
                });
            } else {
                self.close_all(false);
            }
        }
        self.maybe_lost();
    }

    fn maybe_lost(&self) {
        if self.life.get() == Life::Lost || self.input.borrow().is_some() || self.output.borrow().is_some() {
            return;
        }
        self.life.set(Life::Lost);
        let reason = self.reason.borrow().clone().unwrap_or_else(|| Failure::new(Error::ConnectionDone));
        self.call("connection_lost", |p| p.connection_lost(reason));
        // The last call: dropping the protocol breaks the cycle through the
        // transport it keeps.
        drop(self.protocol.borrow_mut().take());
        for d in self.when_lost.take() {
            let _ = d.callback(());
        }
    }

    fn output(&self) -> Option<Transport> {
        self.output.borrow().clone()
    }

    fn input(&self) -> Option<Transport> {
        self.input.borrow().clone()
    }
}

/// Relays one direction's events to the connection.
struct Relay {
    stdio: Rc<Stdio>,
    input: bool,
}

impl Protocol for Relay {
    fn data_received(&mut self, data: &[u8]) {
        self.stdio.call("data_received", |p| p.data_received(data));
    }

    fn connection_lost(&mut self, reason: Failure) {
        if self.input {
            self.stdio.input_closed(reason)
        } else {
            self.stdio.output_closed(reason)
        }
    }
}

/// The protocol's transport.
struct StdioTransport(Rc<Stdio>);

impl TransportOps for StdioTransport {
    fn write(&self, data: &[u8]) {
        if let Some(t) = self.0.output() {
            t.write(data);
        }
    }

    fn write_vec(&self, data: Vec<u8>) {
        if let Some(t) = self.0.output() {
            t.write_vec(data);
        }
    }

    fn write_sequence(&self, data: &[&[u8]]) {
        if let Some(t) = self.0.output() {
            t.write_sequence(data);
        }
    }

    fn lose_connection(&self) {
        self.0.close_all(false);
    }

    fn abort_connection(&self) {
        if self.0.life.get() != Life::Lost {
            self.0.note(Failure::new(Error::ConnectionAborted));
        }
        self.0.close_all(true);
    }

    fn lose_write_connection(&self) {
        if let Some(t) = self.0.output() {
            self.0.output_closing.set(true);
            t.lose_connection();
        }
    }

    fn host(&self) -> Option<Address> {
        (self.0.life.get() != Life::Lost).then_some(Address::Pipe)
    }

    fn peer(&self) -> Address {
        Address::Pipe
    }

    fn pause_producing(&self) {
        if let Some(t) = self.0.input() {
            t.pause_producing();
        }
    }

    fn resume_producing(&self) {
        if let Some(t) = self.0.input() {
            t.resume_producing();
        }
    }

    fn stop_producing(&self) {
        self.lose_connection();
    }

    fn register_producer(&self, producer: Rc<dyn Producer>, streaming: bool) -> Result<(), Error> {
        match self.0.output() {
            Some(t) => t.register_producer(producer, streaming),
            None => {
                // Nothing will ever consume it.
                producer.stop_producing();
                Ok(())
            }
        }
    }

    fn unregister_producer(&self) {
        if let Some(t) = self.0.output() {
            t.unregister_producer();
        }
    }

    fn set_write_buffer_limits(&self, high: usize, low: usize) {
        if let Some(t) = self.0.output() {
            t.set_write_buffer_limits(high, low);
        }
    }

    fn buffered(&self) -> usize {
        self.0.output().map_or(0, |t| t.buffered())
    }

    fn connected(&self) -> bool {
        self.0.life.get() == Life::Open
    }
}

/// Starts one direction's connection; an error says which.
fn start<K: Kind>(conn: &Rc<Connection<K>>, relay: Relay) -> Result<(), Error> {
    let which = if relay.input { "the input" } else { "the output" };
    conn.start(Box::new(relay)).map_err(|(e, _)| {
        Error::io(
            format!("standard I/O: {which} cannot be watched (a pipe, terminal or socket can)"),
            std::io::Error::other(e.to_string()),
        )
    })
}

/// Connects `protocol` to `fds` (Twisted's `StandardIO(protocol)`): it gets
/// `connection_made` with the transport, which is also returned. For the
/// process's own standard I/O pass [`StdioFds::process`]; tests pass pipes.
pub fn std_io(
    reactor: &Reactor,
    protocol: impl Protocol + 'static,
    fds: StdioFds,
) -> Result<Transport, Error> {
    std_io_boxed(reactor, Box::new(protocol), fds).map(|(t, _)| t)
}

fn std_io_boxed(
    reactor: &Reactor,
    protocol: Box<dyn Protocol>,
    fds: StdioFds,
) -> Result<(Transport, Rc<Stdio>), Error> {
    let fail = |what: &str, e: Errno| Error::io(format!("standard I/O: {what}"), e.into());
    rustix::io::ioctl_fionbio(&fds.read, true).map_err(|e| fail("making the input non-blocking", e))?;
    rustix::io::ioctl_fionbio(&fds.write, true).map_err(|e| fail("making the output non-blocking", e))?;
    let is_pipe = rustix::fs::fstat(&fds.write)
        .map(|st| rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Fifo)
        .map_err(|e| fail("looking at the output", e))?;
    let me = std::process::id() as i32;
    let input = Connection::new(reactor, PipeReader::for_child(me, 0), fds.read);
    let stdio = Rc::new(Stdio {
        protocol: RefCell::new(None),
        input: RefCell::new(Some(Transport::new(input.clone()))),
        output: RefCell::new(None),
        life: Cell::new(Life::Open),
        output_closing: Cell::new(false),
        reason: RefCell::new(None),
        when_lost: RefCell::new(Vec::new()),
    });
    // Each started before the protocol hears of it, so that a start that
    // fails (a file epoll refuses) is an error here, not a lost connection.
    let out_relay = Relay { stdio: stdio.clone(), input: false };
    if is_pipe {
        let out = Connection::new(reactor, PipeWriter::for_child(me, 1), fds.write);
        *stdio.output.borrow_mut() = Some(Transport::new(out.clone()));
        start(&out, out_relay)
    } else {
        let out = Connection::new(reactor, PlainOutput, fds.write);
        *stdio.output.borrow_mut() = Some(Transport::new(out.clone()));
        start(&out, out_relay)
    }
    .inspect_err(|_| {
        stdio.input.borrow_mut().take();
        stdio.output.borrow_mut().take();
    })?;
    if let Err(e) = start(&input, Relay { stdio: stdio.clone(), input: true }) {
        stdio.input.borrow_mut().take();
        if let Some(out) = stdio.output.borrow_mut().take() {
            out.abort_connection();
        }
        return Err(e);
    }
    let transport = Transport::new(Rc::new(StdioTransport(stdio.clone())));
    *stdio.protocol.borrow_mut() = Some(protocol);
    stdio.call("connection_made", |p| p.connection_made(transport.clone()));
    Ok((transport, stdio))
}

/// The `stdio:` endpoint's "port": stopping it closes the connection.
struct StdioPort(Rc<Stdio>);

impl crate::stream::listener::PortOps for StdioPort {
    fn host(&self) -> Address {
        Address::Pipe
    }

    fn listening(&self) -> bool {
        self.0.life.get() != Life::Lost
    }

    fn stop_listening(&self) -> Deferred<()> {
        if self.0.life.get() == Life::Lost {
            return Deferred::succeed(());
        }
        let d = Deferred::new();
        self.0.when_lost.borrow_mut().push(d.clone());
        self.0.close_all(false);
        d
    }
}

/// Builds the protocol with `factory` for [`Address::Pipe`] and connects it
/// to `fds`: what the `stdio:` server endpoint does (with the process's
/// own descriptors).
pub(crate) fn listen_stdio(
    reactor: &Reactor,
    factory: &mut dyn crate::protocol::Factory,
    fds: StdioFds,
) -> Result<crate::tcp::ListeningPort, Error> {
    let protocol = factory.build_protocol(&Address::Pipe).ok_or_else(|| {
        Error::io("stdio", std::io::Error::other("the factory built no protocol (NoProtocol)"))
    })?;
    let (_, stdio) = std_io_boxed(reactor, protocol, fds)?;
    Ok(crate::tcp::ListeningPort::from_ops(Rc::new(StdioPort(stdio))))
}
