//! Batched datagram I/O: `recvmmsg` and `sendmmsg`, one system call for
//! many datagrams. rustix has `sendmmsg` but not `recvmmsg`; both are
//! written here against libc so the two sides share one layout.
//!
//! The headers point into buffers this module owns (receive) or the caller
//! lends for the call (send), and they are rebuilt on every call: nothing
//! the kernel is given outlives the call that gave it.

use std::mem::{size_of, MaybeUninit};
use std::os::fd::{AsRawFd, BorrowedFd};

use rustix::io::Errno;
use rustix::net::addr::SocketAddrStorage;
use rustix::net::SocketAddrAny;

/// The most datagrams one call moves (well under the kernel's `UIO_MAXIOV`).
pub(crate) const MAX_BATCH: usize = 64;

/// One received datagram, borrowed from a [`RecvBatch`].
pub(crate) struct Received<'a> {
    /// The bytes that fit in the slot.
    pub data: &'a [u8],
    /// The datagram's full length (larger than `data` when truncated).
    pub len: usize,
    /// The kernel cut the datagram to fit the slot (`MSG_TRUNC`).
    pub truncated: bool,
    /// The sender, if the kernel named one (an unbound UNIX sender has none).
    pub from: Option<SocketAddrAny>,
}

/// Buffers for receiving up to [`MAX_BATCH`] datagrams of one slot size
/// each, kept between calls so a read costs no allocation.
#[derive(Default)]
pub(crate) struct RecvBatch {
    buf: Vec<u8>,
    slot: usize,
    names: Vec<MaybeUninit<SocketAddrStorage>>,
    hdrs: Vec<libc::mmsghdr>,
    count: usize,
}

impl RecvBatch {
    /// Receives up to `slots` datagrams (at most [`MAX_BATCH`]) of up to
    /// `slot` bytes each from a non-blocking socket. Returns how many
    /// arrived; `Errno::AGAIN` when none was waiting.
    pub fn recv(&mut self, fd: BorrowedFd<'_>, slot: usize, slots: usize) -> Result<usize, Errno> {
        let slots = slots.clamp(1, MAX_BATCH);
        let slot = slot.max(1);
        self.count = 0;
        self.slot = slot;
        if self.buf.len() < slot * slots {
            self.buf.resize(slot * slots, 0);
        }
        if self.names.len() < slots {
            self.names.resize_with(slots, MaybeUninit::uninit);
        }
        let mut iovs = [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; MAX_BATCH];
        self.hdrs.clear();
        let base = self.buf.as_mut_ptr();
        for (i, iov) in iovs.iter_mut().enumerate().take(slots) {
            // SAFETY: `i * slot + slot <= buf.len()` (resized above), so the
            // offset stays inside the buffer.
            iov.iov_base = unsafe { base.add(i * slot) }.cast();
            iov.iov_len = slot;
            // SAFETY: an all-zero `mmsghdr` is valid (null pointers, zero
            // lengths); the fields that matter are set next.
            let mut hdr: libc::mmsghdr = unsafe { std::mem::zeroed() };
            hdr.msg_hdr.msg_name = self.names[i].as_mut_ptr().cast();
            hdr.msg_hdr.msg_namelen = size_of::<SocketAddrStorage>() as libc::socklen_t;
            hdr.msg_hdr.msg_iov = iov;
            hdr.msg_hdr.msg_iovlen = 1;
            self.hdrs.push(hdr);
        }
        // SAFETY: `hdrs` holds `slots` headers whose name and iovec pointers
        // point into `names`, `iovs` and `buf`, all alive and unmoved for
        // the whole call and large enough for the lengths given; the socket
        // is borrowed, so it stays open. A null timeout is allowed.
        let n = unsafe {
            libc::recvmmsg(
                fd.as_raw_fd(),
                self.hdrs.as_mut_ptr(),
                slots as libc::c_uint,
                libc::MSG_TRUNC | libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(Errno::from_io_error(&std::io::Error::last_os_error()).unwrap_or(Errno::IO));
        }
        self.count = n as usize;
        Ok(self.count)
    }

    /// The `i`th datagram of the last [`recv`](RecvBatch::recv).
    pub fn get(&self, i: usize) -> Option<Received<'_>> {
        if i >= self.count {
            return None;
        }
        let hdr = &self.hdrs[i];
        let len = hdr.msg_len as usize;
        let start = i * self.slot;
        let data = &self.buf[start..start + len.min(self.slot)];
        let truncated = hdr.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 || len > self.slot;
        let name_len = hdr.msg_hdr.msg_namelen as usize;
        let from = if name_len >= size_of::<libc::sa_family_t>() && name_len <= size_of::<SocketAddrStorage>()
        {
            // SAFETY: the kernel wrote a socket address of `name_len` bytes
            // into this slot of `names` during the last call, and the length
            // is within the storage (checked above).
            Some(unsafe { SocketAddrAny::read(self.names[i].as_ptr(), name_len as _) })
        } else {
            None
        };
        Some(Received { data, len, truncated, from })
    }
}

/// One datagram to send: its bytes and, unless the socket is connected,
/// where to.
pub(crate) struct Outgoing<'a> {
    /// The whole datagram.
    pub data: &'a [u8],
    /// The destination; `None` on a connected socket.
    pub to: Option<&'a SocketAddrAny>,
}

/// Sends the first [`MAX_BATCH`] datagrams of `msgs` with one
/// `sendmmsg`. Returns how many the kernel took, in order; an error means
/// the first one was not sent.
pub(crate) fn send_batch<'a>(
    fd: BorrowedFd<'_>,
    msgs: impl IntoIterator<Item = Outgoing<'a>>,
) -> Result<usize, Errno> {
    let mut iovs = [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; MAX_BATCH];
    // SAFETY: an all-zero `mmsghdr` is valid (null pointers, zero lengths).
    let mut hdrs: [libc::mmsghdr; MAX_BATCH] = unsafe { std::mem::zeroed() };
    let mut n = 0;
    for (i, m) in msgs.into_iter().take(MAX_BATCH).enumerate() {
        n = i + 1;
        // The kernel only reads through this pointer for a send.
        iovs[i].iov_base = m.data.as_ptr() as *mut libc::c_void;
        iovs[i].iov_len = m.data.len();
        let hdr = &mut hdrs[i].msg_hdr;
        hdr.msg_iov = &mut iovs[i];
        hdr.msg_iovlen = 1;
        if let Some(to) = m.to {
            hdr.msg_name = to.as_ptr() as *mut libc::c_void;
            hdr.msg_namelen = to.addr_len() as libc::socklen_t;
        }
    }
    if n == 0 {
        return Ok(0);
    }
    // SAFETY: the first `n` headers point at `iovs` (alive for the call)
    // whose entries point at the callers' byte slices, and at socket
    // addresses of the stated lengths, all borrowed for the call; the kernel
    // only reads them (and writes `msg_len` into `hdrs`).
    let sent =
        unsafe { libc::sendmmsg(fd.as_raw_fd(), hdrs.as_mut_ptr(), n as libc::c_uint, libc::MSG_DONTWAIT) };
    if sent < 0 {
        return Err(Errno::from_io_error(&std::io::Error::last_os_error()).unwrap_or(Errno::IO));
    }
    Ok(sent as usize)
}
