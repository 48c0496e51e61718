//! The two UNIX-socket reads rustix cannot do soundly for braid.
//!
//! - The raw bytes of a [`SocketAddrAny`]. rustix's own conversion to
//!   `SocketAddrUnix` indexes past `sun_path` (and panics) when the kernel
//!   reports a 108-byte path that has no room for its NUL, which Linux allows
//!   a peer to bind; `stream::address` parses the bytes itself instead.
//! - `SO_PEERCRED`. rustix reads it into a `Pid` that cannot be zero, but the
//!   kernel reports pid 0 for a peer in a PID namespace we cannot see (a
//!   container connecting through a bind-mounted socket), so that read would
//!   be undefined behaviour; here the pid is a plain integer.

#[cfg(any(target_os = "linux", target_os = "android"))]
use std::io;
#[cfg(any(target_os = "linux", target_os = "android"))]
use std::os::fd::{AsRawFd, BorrowedFd};

use rustix::net::SocketAddrAny;

/// The initialized bytes of `addr`, family field included.
pub(crate) fn sockaddr_bytes(addr: &SocketAddrAny) -> &[u8] {
    let len = addr.addr_len() as usize;
    // SAFETY: a `SocketAddrAny` keeps its first `addr_len()` bytes
    // initialized and `addr_len()` within its storage (its constructors
    // require both); the slice borrows `addr`, so the storage outlives it.
    unsafe { std::slice::from_raw_parts(addr.as_ptr().cast::<u8>(), len) }
}

/// `SO_PEERCRED` as the kernel reports it: pid 0 means the peer's process is
/// not visible from our PID namespace.
#[cfg(any(target_os = "linux", target_os = "android"))]
#[derive(Clone, Copy, Debug)]
pub(crate) struct RawPeerCred {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

/// Reads `SO_PEERCRED` from a UNIX socket.
#[cfg(any(target_os = "linux", target_os = "android"))]
pub(crate) fn peer_cred(fd: BorrowedFd<'_>) -> io::Result<RawPeerCred> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `fd` is a live descriptor for the duration of the call (it is
    // borrowed); the kernel writes at most `len` bytes into `cred`, which is a
    // `ucred` of exactly `len` bytes, and every bit pattern is a valid `ucred`.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if len as usize != std::mem::size_of::<libc::ucred>() {
        return Err(io::Error::other(format!("SO_PEERCRED returned {len} bytes, expected a ucred")));
    }
    Ok(RawPeerCred { pid: cred.pid, uid: cred.uid, gid: cred.gid })
}
