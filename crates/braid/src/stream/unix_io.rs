//! UNIX-socket I/O beyond plain bytes: peer credentials and passing file
//! descriptors.
//!
//! The UNIX stream kind needs three things a TCP socket has no notion of:
//! who the peer is (`SO_PEERCRED`), sending descriptors along with bytes and
//! receiving them (`SCM_RIGHTS`, Twisted's `sendFileDescriptor` and
//! `fileDescriptorReceived`). These functions are the socket calls only; the
//! connection decides when to send, splits long descriptor lists and hands
//! what arrives to the protocol.
//!
//! Descriptors are never lost silently. Received ones are [`OwnedFd`]s (close
//! on drop) opened close-on-exec; if the kernel could not deliver some
//! (the control buffer was too small, or this process ran out of descriptors)
//! [`Received::fds_truncated`] says so. The kernel closes the ones it could
//! not deliver.
//!
//! Linux rules these follow (`unix(7)`): at most [`SCM_MAX_FD`] descriptors
//! per message, and on a stream socket descriptors travel with at least one
//! byte of data, attached to the first byte of the send.

use std::io::IoSlice;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::io::Errno;
use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

/// The most descriptors one message may carry: Linux's `SCM_MAX_FD`. A
/// longer list makes `sendmsg` fail with `EINVAL`, so callers send it in
/// chunks of at most this many, each with at least one byte.
pub const SCM_MAX_FD: usize = 253;

/// Control-buffer bytes for one `SCM_RIGHTS` message of [`SCM_MAX_FD`]
/// descriptors (kept on the stack: about a kilobyte).
const CONTROL_SPACE: usize = rustix::cmsg_space!(ScmRights(SCM_MAX_FD));

/// Who is on the other end of a UNIX socket, as the kernel recorded it when
/// the connection (or socket pair) was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Credentials {
    /// The peer's process id; `None` when that process is not visible from
    /// this PID namespace (e.g. a peer in a container) or the socket has no
    /// peer.
    pub pid: Option<u32>,
    /// The peer's effective user id.
    pub uid: u32,
    /// The peer's effective group id.
    pub gid: u32,
}

/// The peer's credentials (`SO_PEERCRED`) of a connected UNIX socket.
pub fn peer_credentials(sock: impl AsFd) -> Result<Credentials, crate::Error> {
    let raw = crate::sys::unix_socket::peer_cred(sock.as_fd())
        .map_err(|e| crate::Error::io("reading the peer's credentials (SO_PEERCRED)", e))?;
    let pid = u32::try_from(raw.pid).ok().filter(|&p| p != 0);
    Ok(Credentials { pid, uid: raw.uid, gid: raw.gid })
}

/// Sends `data` with `fds` attached (`SCM_RIGHTS`), as one `sendmsg` with
/// `MSG_NOSIGNAL` (a closed peer is `EPIPE`, never `SIGPIPE`).
///
/// Returns the bytes sent, like `writev`. When that is at least one, every
/// descriptor went with the first byte; on an error none did. The peer gets
/// duplicates; the caller's descriptors stay open.
///
/// Refused with `EINVAL` before any syscall: more than [`SCM_MAX_FD`]
/// descriptors (the kernel's limit; split them), or descriptors with no
/// bytes (a stream socket would drop them). With no descriptors this is a
/// plain vectored send. `EINTR` is retried.
pub fn send_with_fds(sock: impl AsFd, data: &[IoSlice<'_>], fds: &[BorrowedFd<'_>]) -> Result<usize, Errno> {
    if fds.len() > SCM_MAX_FD {
        return Err(Errno::INVAL);
    }
    if !fds.is_empty() && data.iter().all(|s| s.is_empty()) {
        return Err(Errno::INVAL);
    }
    let mut space = [MaybeUninit::<u8>::uninit(); CONTROL_SPACE];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        // CONTROL_SPACE holds SCM_MAX_FD descriptors, checked above.
        return Err(Errno::NOBUFS);
    }
    loop {
        match sendmsg(sock.as_fd(), data, &mut control, SendFlags::NOSIGNAL) {
            Err(Errno::INTR) => continue,
            r => return r,
        }
    }
}

/// What one [`recv_with_fds`] call received.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub struct Received {
    /// Bytes read into the buffer; 0 is end of stream.
    pub bytes: usize,
    /// The kernel had descriptors it could not deliver (`MSG_CTRUNC`): the
    /// control buffer was too small or this process is out of descriptors.
    /// The kernel closed those; the connection should treat it as lost data.
    pub fds_truncated: bool,
}

/// Receives bytes into `buf` and any descriptors sent with them, appended to
/// `fds_out` in the order they were sent. One `recvmsg` with
/// `MSG_CMSG_CLOEXEC` and room for [`SCM_MAX_FD`] descriptors.
///
/// Linux ends a read after the bytes of a send that carried descriptors:
/// one call returns at most one send's descriptors (so they always fit,
/// unless this process runs out of descriptors, see
/// [`Received::fds_truncated`]), and bytes sent after them come in a later
/// call. A connection that hands the descriptors to the protocol before the
/// bytes of the same call therefore delivers them before everything sent
/// after them. Control messages of other kinds are dropped. `EINTR` is
/// retried; on a non-blocking socket with nothing to read this is `EAGAIN`.
pub fn recv_with_fds(sock: impl AsFd, buf: &mut [u8], fds_out: &mut Vec<OwnedFd>) -> Result<Received, Errno> {
    let mut space = [MaybeUninit::<u8>::uninit(); CONTROL_SPACE];
    recv_with_control(sock.as_fd(), buf, fds_out, &mut space)
}

/// [`recv_with_fds`] with a caller-sized control buffer (tests use a small
/// one to make the kernel truncate).
fn recv_with_control(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    fds_out: &mut Vec<OwnedFd>,
    space: &mut [MaybeUninit<u8>],
) -> Result<Received, Errno> {
    let mut control = RecvAncillaryBuffer::new(space);
    let msg = loop {
        let mut iov = [std::io::IoSliceMut::new(buf)];
        match recvmsg(sock, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC) {
            Err(Errno::INTR) => continue,
            r => break r?,
        }
    };
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = m {
            fds_out.extend(fds);
        }
        // Other kinds carry no descriptors (credentials come only with
        // SO_PASSCRED, which braid does not set), so dropping them loses
        // nothing that needs closing.
    }
    Ok(Received { bytes: msg.bytes, fds_truncated: msg.flags.contains(ReturnFlags::CTRUNC) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::fs::fstat;
    use rustix::io::{fcntl_getfd, FdFlags};
    use rustix::io::{read, write};
    use rustix::net::{socketpair, AddressFamily, SocketFlags, SocketType};
    use rustix::pipe::{pipe_with, PipeFlags};
    use std::os::fd::{AsRawFd, RawFd};

    fn pair() -> (OwnedFd, OwnedFd) {
        socketpair(
            AddressFamily::UNIX,
            SocketType::STREAM,
            SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
            None,
        )
        .unwrap()
    }

    fn pipe() -> (OwnedFd, OwnedFd) {
        pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK).unwrap()
    }

    /// Receives until `want` bytes arrived, collecting descriptors; returns
    /// (bytes, whether any call saw truncation). Bounded.
    fn recv_all(sock: &OwnedFd, want: usize, fds: &mut Vec<OwnedFd>) -> (Vec<u8>, bool) {
        let mut got = Vec::new();
        let mut truncated = false;
        for _ in 0..1000 {
            if got.len() >= want {
                return (got, truncated);
            }
            let mut buf = [0u8; 64];
            match recv_with_fds(sock, &mut buf, fds) {
                Ok(r) => {
                    assert_ne!(r.bytes, 0, "unexpected end of stream");
                    got.extend_from_slice(&buf[..r.bytes]);
                    truncated |= r.fds_truncated;
                }
                Err(Errno::AGAIN) => std::thread::sleep(std::time::Duration::from_millis(1)),
                Err(e) => panic!("recv_with_fds: {e}"),
            }
        }
        panic!("only {} of {want} bytes arrived", got.len());
    }

    /// Whether every write end of the pipe whose read end is `r` is closed:
    /// a read then says end of file instead of EAGAIN.
    fn all_writers_closed(r: &OwnedFd) -> bool {
        let mut b = [0u8; 16];
        match read(r, &mut b) {
            Ok(0) => true,
            Err(Errno::AGAIN) => false,
            other => panic!("unexpected read result {other:?}"),
        }
    }

    #[test]
    fn one_fd_arrives_usable_and_close_on_exec() {
        let (a, b) = pair();
        let (r, w) = pipe();
        assert_eq!(send_with_fds(&a, &[IoSlice::new(b"x")], &[w.as_fd()]), Ok(1));
        drop(w);
        let mut fds = Vec::new();
        let (bytes, truncated) = recv_all(&b, 1, &mut fds);
        assert_eq!((bytes.as_slice(), truncated, fds.len()), (&b"x"[..], false, 1));
        assert!(fcntl_getfd(&fds[0]).unwrap().contains(FdFlags::CLOEXEC));
        write(&fds[0], b"hello").unwrap();
        let mut out = [0u8; 8];
        assert_eq!(read(&r, &mut out), Ok(5));
        assert_eq!(&out[..5], b"hello");
    }

    #[test]
    fn several_fds_arrive_in_order() {
        let (a, b) = pair();
        let pipes: Vec<_> = (0..4).map(|_| pipe()).collect();
        let ws: Vec<BorrowedFd<'_>> = pipes.iter().map(|(_, w)| w.as_fd()).collect();
        assert_eq!(send_with_fds(&a, &[IoSlice::new(b"ab"), IoSlice::new(b"c")], &ws), Ok(3));
        let mut fds = Vec::new();
        let (bytes, truncated) = recv_all(&b, 3, &mut fds);
        assert_eq!((bytes.as_slice(), truncated, fds.len()), (&b"abc"[..], false, 4));
        for (i, fd) in fds.iter().enumerate() {
            write(fd, &[i as u8]).unwrap();
        }
        for (i, (r, _)) in pipes.iter().enumerate() {
            let mut out = [0u8; 4];
            assert_eq!(read(r, &mut out), Ok(1));
            assert_eq!(out[0], i as u8, "descriptor {i} arrived out of order");
        }
    }

    #[test]
    fn exactly_scm_max_fd_fit_in_one_message() {
        let (a, b) = pair();
        let (r, w) = pipe();
        let ws = vec![w.as_fd(); SCM_MAX_FD];
        assert_eq!(send_with_fds(&a, &[IoSlice::new(b"m")], &ws), Ok(1));
        let mut fds = Vec::new();
        let (_, truncated) = recv_all(&b, 1, &mut fds);
        assert!(!truncated);
        assert_eq!(fds.len(), SCM_MAX_FD);
        let mut nums: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        nums.sort_unstable();
        nums.dedup();
        assert_eq!(nums.len(), SCM_MAX_FD, "each descriptor is a new number");
        let ino = fstat(&w).unwrap().st_ino;
        assert!(fds.iter().all(|f| fstat(f).unwrap().st_ino == ino));
        drop(ws);
        drop(w);
        assert!(!all_writers_closed(&r));
        drop(fds);
        assert!(all_writers_closed(&r), "dropping the received descriptors closed them");
    }

    #[test]
    fn scm_max_fd_is_the_kernels_limit() {
        let (a, _b) = pair();
        let (_r, w) = pipe();
        // Straight to the kernel, past send_with_fds's own check.
        let raw_send = |n: usize| {
            let ws = vec![w.as_fd(); n];
            let mut space = vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(n))];
            let mut control = SendAncillaryBuffer::new(&mut space);
            assert!(control.push(SendAncillaryMessage::ScmRights(&ws)));
            sendmsg(&a, &[IoSlice::new(b"k")], &mut control, SendFlags::NOSIGNAL)
        };
        assert_eq!(raw_send(SCM_MAX_FD), Ok(1));
        assert_eq!(raw_send(SCM_MAX_FD + 1), Err(Errno::INVAL));
        let ws = vec![w.as_fd(); SCM_MAX_FD + 1];
        assert_eq!(send_with_fds(&a, &[IoSlice::new(b"k")], &ws), Err(Errno::INVAL));
    }

    #[test]
    fn more_than_scm_max_fd_go_in_chunks() {
        let (a, b) = pair();
        let (r, w) = pipe();
        let total = SCM_MAX_FD + 47;
        let ws = vec![w.as_fd(); total];
        let mut sent = 0;
        for chunk in ws.chunks(SCM_MAX_FD) {
            assert_eq!(send_with_fds(&a, &[IoSlice::new(b"c")], chunk), Ok(1));
            sent += 1;
        }
        assert_eq!(sent, 2);
        let mut fds = Vec::new();
        let (bytes, truncated) = recv_all(&b, 2, &mut fds);
        assert_eq!((bytes.as_slice(), truncated), (&b"cc"[..], false));
        assert_eq!(fds.len(), total);
        drop(ws);
        drop(w);
        drop(fds);
        assert!(all_writers_closed(&r));
    }

    #[test]
    fn a_read_stops_after_the_bytes_that_carried_descriptors() {
        let (a, b) = pair();
        let (_r, w) = pipe();
        send_with_fds(&a, &[IoSlice::new(b"a")], &[]).unwrap();
        send_with_fds(&a, &[IoSlice::new(b"b")], &[w.as_fd()]).unwrap();
        send_with_fds(&a, &[IoSlice::new(b"c")], &[]).unwrap();
        let mut fds = Vec::new();
        let mut buf = [0u8; 16];
        let first = recv_with_fds(&b, &mut buf, &mut fds).unwrap();
        assert_eq!(&buf[..first.bytes], b"ab", "earlier bytes join, later ones wait");
        assert_eq!(fds.len(), 1);
        let second = recv_with_fds(&b, &mut buf, &mut fds).unwrap();
        assert_eq!((&buf[..second.bytes], fds.len()), (&b"c"[..], 1));
    }

    #[test]
    fn dropped_fds_are_closed() {
        let (a, b) = pair();
        let (r, w) = pipe();
        send_with_fds(&a, &[IoSlice::new(b"d")], &[w.as_fd()]).unwrap();
        drop(w);
        // In flight, the kernel holds the write end open.
        assert!(!all_writers_closed(&r));
        let mut fds = Vec::new();
        recv_all(&b, 1, &mut fds);
        assert!(!all_writers_closed(&r));
        drop(fds);
        assert!(all_writers_closed(&r));
    }

    #[test]
    fn truncated_control_data_is_reported_and_the_rest_closed() {
        let (a, b) = pair();
        let pipes: Vec<_> = (0..3).map(|_| pipe()).collect();
        let ws: Vec<BorrowedFd<'_>> = pipes.iter().map(|(_, w)| w.as_fd()).collect();
        send_with_fds(&a, &[IoSlice::new(b"t")], &ws).unwrap();
        drop(ws);
        let (readers, writers): (Vec<_>, Vec<_>) = pipes.into_iter().unzip();
        drop(writers);
        // Room for exactly one descriptor: a header and one int, aligned so
        // rustix does not trim it (cmsg_space! leaves slack for more).
        #[repr(C, align(8))]
        struct OneFd([MaybeUninit<u8>; 20]);
        assert_eq!(std::mem::size_of::<libc::cmsghdr>() + std::mem::size_of::<RawFd>(), 20);
        let mut space = OneFd([MaybeUninit::uninit(); 20]);
        let mut fds = Vec::new();
        let mut buf = [0u8; 8];
        let got = recv_with_control(b.as_fd(), &mut buf, &mut fds, &mut space.0).unwrap();
        assert_eq!(got, Received { bytes: 1, fds_truncated: true });
        assert_eq!(fds.len(), 1);
        assert!(!all_writers_closed(&readers[0]), "the delivered descriptor is ours, still open");
        assert!(all_writers_closed(&readers[1]) && all_writers_closed(&readers[2]));
    }

    #[test]
    fn plain_sends_and_refusals() {
        let (a, b) = pair();
        assert_eq!(send_with_fds(&a, &[IoSlice::new(b"plain")], &[]), Ok(5));
        let mut fds = Vec::new();
        let (bytes, _) = recv_all(&b, 5, &mut fds);
        assert_eq!((bytes.as_slice(), fds.len()), (&b"plain"[..], 0));
        let (_r, w) = pipe();
        assert_eq!(send_with_fds(&a, &[], &[w.as_fd()]), Err(Errno::INVAL));
        assert_eq!(send_with_fds(&a, &[IoSlice::new(b"")], &[w.as_fd()]), Err(Errno::INVAL));
        let mut buf = [0u8; 8];
        assert_eq!(recv_with_fds(&b, &mut buf, &mut fds), Err(Errno::AGAIN));
        drop(b);
        assert_eq!(send_with_fds(&a, &[IoSlice::new(b"x")], &[w.as_fd()]), Err(Errno::PIPE));
    }

    #[test]
    fn end_of_stream_is_zero_bytes() {
        let (a, b) = pair();
        drop(a);
        let mut fds = Vec::new();
        let mut buf = [0u8; 8];
        assert_eq!(recv_with_fds(&b, &mut buf, &mut fds), Ok(Received { bytes: 0, fds_truncated: false }));
    }

    #[test]
    fn peer_credentials_are_ours() {
        let me = Credentials {
            pid: Some(std::process::id()),
            uid: rustix::process::geteuid().as_raw(),
            gid: rustix::process::getegid().as_raw(),
        };
        let (a, b) = pair();
        assert_eq!(peer_credentials(&a).unwrap(), me);
        assert_eq!(peer_credentials(&b).unwrap(), me);
        // Through a listener too (credentials recorded at connect).
        let name = format!("braid-unix-io-{}", std::process::id());
        let addr = crate::stream::Address::unix_abstract(name).unwrap().to_sockaddr().unwrap();
        let l = rustix::net::socket(AddressFamily::UNIX, SocketType::STREAM, None).unwrap();
        rustix::net::bind(&l, &addr).unwrap();
        rustix::net::listen(&l, 1).unwrap();
        let c = rustix::net::socket(AddressFamily::UNIX, SocketType::STREAM, None).unwrap();
        rustix::net::connect(&c, &addr).unwrap();
        let s = rustix::net::accept(&l).unwrap();
        assert_eq!(peer_credentials(&s).unwrap(), me);
        assert_eq!(peer_credentials(&c).unwrap(), me);
    }

    #[test]
    fn no_peer_means_no_pid() {
        // The kernel reports pid 0 here; that must be `None`, not a bad Pid.
        let s = rustix::net::socket(AddressFamily::UNIX, SocketType::STREAM, None).unwrap();
        assert_eq!(peer_credentials(&s).unwrap().pid, None);
        let bad = rustix::net::socket(AddressFamily::INET, SocketType::DGRAM, None).unwrap();
        assert_eq!(peer_credentials(&bad).unwrap().pid, None);
    }
}
