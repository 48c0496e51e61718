//! The descriptor that wakes a sleeping reactor: an eventfd on Linux, a
//! non-blocking self-pipe elsewhere. Writers are other threads and the
//! signal handler; the reactor drains it when it polls readable.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};

/// A wake-up descriptor. `Send + Sync`: any thread may call [`Waker::wake`].
#[derive(Debug)]
pub(crate) struct Waker {
    read: OwnedFd,
    /// The pipe's write end; `None` for an eventfd (one fd does both).
    write: Option<OwnedFd>,
}

impl Waker {
    pub fn new() -> io::Result<Waker> {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        {
            use rustix::event::{eventfd, EventfdFlags};
            let fd = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
            Ok(Waker { read: fd, write: None })
        }
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        {
            use rustix::pipe::{pipe_with, PipeFlags};
            let (r, w) = pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?;
            Ok(Waker { read: r, write: Some(w) })
        }
    }

    /// The descriptor the reactor polls for readability.
    pub fn read_fd(&self) -> RawFd {
        self.read.as_raw_fd()
    }

    /// The descriptor a signal handler writes to (see `sys::signal`).
    pub fn write_fd(&self) -> RawFd {
        self.write.as_ref().unwrap_or(&self.read).as_raw_fd()
    }

    /// Makes the next (or current) poll return. A full counter or pipe
    /// already means a wake-up is pending, so EAGAIN is not an error.
    pub fn wake(&self) {
        let fd = self.write.as_ref().unwrap_or(&self.read);
        let one = 1u64.to_ne_bytes();
        loop {
            match rustix::io::write(fd.as_fd(), &one) {
                Err(rustix::io::Errno::INTR) => continue,
                _ => return,
            }
        }
    }

    /// Consumes pending wake-ups so the descriptor stops polling readable.
    pub fn drain(&self) {
        let mut buf = [0u8; 64];
        loop {
            match rustix::io::read(self.read.as_fd(), &mut buf) {
                Ok(n) if n == buf.len() => continue,
                Err(rustix::io::Errno::INTR) => continue,
                _ => return,
            }
        }
    }
}
