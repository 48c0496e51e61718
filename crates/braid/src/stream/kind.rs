//! What one kind of byte stream does differently: how bytes move through
//! its descriptor and how it ends. Everything else (buffering, the write
//! stage, producers, half-close, lose/abort, the exactly-once close) is the
//! one [`Connection`](super::connection::Connection), shared by every kind.
//!
//! The defaults are those of a connected stream socket: `recv`/`send`/
//! `sendmsg` with `MSG_NOSIGNAL` (a write to a reset peer is `EPIPE`, not a
//! process-killing `SIGPIPE`), and `shutdown(SHUT_WR)` for a half-close. A
//! kind overrides what it does differently (TCP resets on abort; a pipe
//! reads and writes with `read`/`write`).

use std::io::IoSlice;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::rc::Rc;

use rustix::io::Errno;

use super::connection::Connection;
use super::Address;
use crate::transport::{TcpOptions, UnixOptions};
use rustix::net::{RecvFlags, SendFlags};

/// One kind of byte stream (internal: TCP, UNIX, pipes).
pub(crate) trait Kind: Sized + 'static {
    /// Names the kind in log lines and errors ("TCP", "UNIX").
    const NAME: &'static str;

    /// Whether bytes come in through the descriptor. A kind that does not
    /// read (a pipe's write end) is never registered for reading, and its
    /// connection ends when its write side does.
    const READS: bool = true;

    /// For a kind that does not read: whether it is still watched for
    /// reading, to hear the other end go away (a pipe's write end reports
    /// its reader closing as an error event). Such a readiness ends the
    /// connection.
    const HEARS_PEER_CLOSE: bool = false;

    /// Whether bytes go out through the descriptor. A kind that does not
    /// write (a pipe's read end) is never registered for writing; writes to
    /// it are dropped, as after the write side is closed.
    const WRITES: bool = true;

    /// Whether, on a ring (io_uring), the kind reads and writes by
    /// completion (multishot receives into the ring's buffers, sends by
    /// request) rather than on readiness: the stream sockets do.
    const RING_READS: bool = false;

    /// For a kind that reads by completion: whether its receives are
    /// message receives (`recvmsg`), which also bring the descriptors a
    /// UNIX peer passes; they go to [`Kind::put_received_fds`].
    const RING_RECVMSG: bool = false;

    /// The other end (kept by the kind, which knows its address type).
    fn peer(&self) -> Address;

    /// This kind's own options on a transport, if it has any (TCP's).
    fn tcp_options(_conn: Rc<Connection<Self>>) -> Option<Rc<dyn TcpOptions>> {
        None
    }

    /// This kind's UNIX-socket side, if it is one.
    fn unix_options(_conn: Rc<Connection<Self>>) -> Option<Rc<dyn UnixOptions>> {
        None
    }

    /// Reads what is there, at most `buf.len()` bytes; `Ok(0)` is the end.
    #[inline]
    fn recv(&self, fd: &OwnedFd, buf: &mut [u8]) -> Result<usize, Errno> {
        rustix::net::recv(fd, buf, RecvFlags::empty()).map(|(n, _)| n)
    }

    /// Writes what the kernel takes of `data`.
    #[inline]
    fn send(&self, fd: &OwnedFd, data: &[u8]) -> Result<usize, Errno> {
        rustix::net::send(fd, data, SendFlags::NOSIGNAL)
    }

    /// Writes what the kernel takes of several buffers, in order.
    #[inline]
    fn send_vectored(&self, fd: &OwnedFd, bufs: &[IoSlice<'_>]) -> Result<usize, Errno> {
        let mut no_control = rustix::net::SendAncillaryBuffer::default();
        rustix::net::sendmsg(fd, bufs, &mut no_control, SendFlags::NOSIGNAL)
    }

    /// Ends the write side; reading goes on (half-close).
    fn shutdown_write(&self, fd: &OwnedFd) {
        let _ = rustix::net::shutdown(fd, rustix::net::Shutdown::Write);
    }

    /// Descriptors that arrived with the last `recv`, for the protocol
    /// (UNIX sockets); `None` for kinds that cannot receive any.
    fn take_received_fds(&self) -> Option<Vec<std::os::fd::OwnedFd>> {
        None
    }

    /// Keeps descriptors a ring receive brought, for the next
    /// [`Kind::take_received_fds`]; a kind that cannot pass descriptors
    /// closes them.
    fn put_received_fds(&self, fds: Vec<std::os::fd::OwnedFd>) {
        drop(fds);
    }

    /// True if descriptors wait to be sent and nothing is buffered to
    /// carry them: the connection then sends one zero byte with them.
    fn needs_carrier_byte(&self) -> bool {
        false
    }

    /// Readies the descriptor for an abortive close (closing follows).
    fn prepare_abort(&self, _fd: &OwnedFd) {}
}

/// A TCP connection: a stream socket whose abort is a reset.
pub(crate) struct Tcp {
    pub peer: SocketAddr,
}

impl Kind for Tcp {
    const NAME: &'static str = "TCP";
    const RING_READS: bool = true;

    fn peer(&self) -> Address {
        Address::Ip(self.peer)
    }

    fn tcp_options(conn: Rc<Connection<Self>>) -> Option<Rc<dyn TcpOptions>> {
        Some(conn)
    }

    fn prepare_abort(&self, fd: &OwnedFd) {
        // Linger 0: close sends RST and drops unsent data.
        let _ = rustix::net::sockopt::set_socket_linger(fd, Some(std::time::Duration::ZERO));
    }
}
