//! epoll(7) backend: Linux, O(ready) per wait.
//!
//! Registrations are level-triggered (no `EPOLLET`, no `EPOLLONESHOT`), so a
//! descriptor keeps being reported until the reactor has drained it, exactly
//! like select and poll; the reactor's dispatch path does not need to know
//! which backend it runs on. Each registration's user data is the descriptor
//! number itself.
//!
//! The kernel forgets a descriptor by itself once its last reference is
//! closed, so a closed descriptor simply stops being reported, and removing
//! it afterwards is not an error.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::time::Duration;

use rustix::buffer::spare_capacity;
use rustix::event::epoll;
use rustix::event::Timespec;

use super::{timeout_ms, Event, Interest, Poller};

use epoll::EventFlags as F;

/// Events fetched per wait at first; the buffer doubles whenever a wait fills
/// it, up to [`MAX_EVENTS`]. More ready descriptors than fit are handed out
/// by later waits (the kernel rotates its ready list), so nothing starves.
const INITIAL_EVENTS: usize = 256;
const MAX_EVENTS: usize = 64 * 1024;

pub(crate) struct EpollPoller {
    epoll: OwnedFd,
    /// Reused by every wait; `len() == 0` between waits.
    events: Vec<epoll::Event>,
    /// Whether `epoll_pwait2` (Linux 5.11+, nanosecond timeouts) is
    /// available; cleared the first time the kernel refuses it.
    precise: bool,
}

// `wait_precise` hands rustix's event buffer to the kernel directly.
const _: () = assert!(std::mem::size_of::<epoll::Event>() == std::mem::size_of::<libc::epoll_event>());

impl EpollPoller {
    pub fn new() -> io::Result<Self> {
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        Ok(EpollPoller { epoll, events: Vec::with_capacity(INITIAL_EVENTS), precise: true })
    }

    /// Waits with a nanosecond timeout through `epoll_pwait2`, so a timer
    /// 200 µs away is not slept past by most of a millisecond. `None` if the
    /// kernel does not have it (older than 5.11, or a seccomp filter refuses
    /// it): the caller then falls back to `epoll_pwait`'s milliseconds.
    fn wait_precise(&mut self, timeout: Duration) -> Option<io::Result<usize>> {
        if !self.precise {
            return None;
        }
        let ts = super::timeout_timespec(Some(timeout))?;
        let max = self.events.capacity().min(libc::c_int::MAX as usize) as libc::c_int;
        // SAFETY: the event pointer and `max` describe the spare capacity of
        // `self.events` (empty, so all of it), borrowed exclusively for the
        // call; `epoll::Event` has the kernel's `epoll_event` layout (checked
        // above). `ts` lives on this frame for the call, the signal mask is
        // null (unchanged) and its size argument is then ignored. The kernel
        // keeps none of the pointers.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_epoll_pwait2,
                self.epoll.as_raw_fd(),
                self.events.as_mut_ptr().cast::<libc::epoll_event>(),
                max,
                &ts as *const libc::timespec,
                std::ptr::null::<libc::sigset_t>(),
                0usize,
            )
        };
        if rc >= 0 {
            let n = (rc as usize).min(self.events.capacity());
            // SAFETY: the kernel filled the first `n` entries (it never
            // returns more than `max`), and `epoll::Event` is plain data.
            unsafe { self.events.set_len(n) };
            return Some(Ok(n));
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => Some(Ok(0)),
            Some(libc::ENOSYS) | Some(libc::EPERM) => {
                self.precise = false;
                None
            }
            _ => Some(Err(err)),
        }
    }

    /// One `epoll_ctl` call on a raw descriptor number.
    fn ctl(&self, op: libc::c_int, fd: RawFd, interest: Interest) -> io::Result<()> {
        let mut flags = 0u32;
        if interest.read {
            // RDHUP: a peer that shut down its sending side makes the socket
            // readable, so the reactor reads the EOF.
            flags |= (libc::EPOLLIN | libc::EPOLLRDHUP) as u32;
        }
        if interest.write {
            flags |= libc::EPOLLOUT as u32;
        }
        // `fd >= 0` was checked by the caller, so the cast is lossless.
        let mut ev = libc::epoll_event { events: flags, u64: fd as u64 };
        // The descriptor is passed to the kernel as a plain number rather
        // than as a `BorrowedFd`, because when removing, it may already have
        // been closed: the kernel validates it (EBADF), and no Rust
        // ownership claim is made about it.
        //
        // SAFETY: `self.epoll` is an open epoll descriptor we own; `ev` is an
        // initialised `epoll_event` living on this stack frame for the whole
        // call, which the kernel only reads (and ignores for EPOLL_CTL_DEL)
        // and does not keep a pointer to. `fd` is only an integer argument.
        let rc = unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), op, fd, &mut ev) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

fn is_errno(err: &io::Error, errno: libc::c_int) -> bool {
    err.raw_os_error() == Some(errno)
}

impl Poller for EpollPoller {
    fn update(&mut self, fd: RawFd, old: Interest, new: Interest) -> io::Result<()> {
        if fd < 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cannot watch negative file descriptor {fd}"),
            ));
        }
        if new.is_empty() {
            if old.is_empty() {
                return Ok(());
            }
            return match self.ctl(libc::EPOLL_CTL_DEL, fd, new) {
                // Already closed (EBADF), or closed and its number reused by
                // a descriptor we never registered (ENOENT): either way it is
                // gone, which is what the caller wanted.
                Err(e) if is_errno(&e, libc::EBADF) || is_errno(&e, libc::ENOENT) => Ok(()),
                other => other,
            };
        }
        if old.is_empty() {
            match self.ctl(libc::EPOLL_CTL_ADD, fd, new) {
                // Still registered from before (say, a number reused after a
                // close the kernel has not forgotten yet): take it over.
                Err(e) if is_errno(&e, libc::EEXIST) => self.ctl(libc::EPOLL_CTL_MOD, fd, new),
                other => other,
            }
        } else {
            match self.ctl(libc::EPOLL_CTL_MOD, fd, new) {
                // The kernel dropped it (closed and reopened under the same
                // number): register afresh.
                Err(e) if is_errno(&e, libc::ENOENT) => self.ctl(libc::EPOLL_CTL_ADD, fd, new),
                other => other,
            }
        }
    }

    fn poll(&mut self, events: &mut Vec<Event>, timeout: Option<Duration>) -> io::Result<()> {
        self.events.clear();
        let n = match timeout.and_then(|t| self.wait_precise(t)) {
            Some(result) => result?,
            None => {
                let ms = timeout_ms(timeout);
                let timespec = (ms >= 0).then(|| Timespec {
                    tv_sec: i64::from(ms / 1000),
                    tv_nsec: i64::from(ms % 1000) * 1_000_000,
                });
                match epoll::wait(self.epoll.as_fd(), spare_capacity(&mut self.events), timespec.as_ref()) {
                    Ok(n) => n,
                    Err(rustix::io::Errno::INTR) => return Ok(()),
                    Err(e) => return Err(e.into()),
                }
            }
        };

        events.reserve(n);
        for raw in &self.events {
            // Copy out of the (on x86-64, packed) kernel struct before use.
            let raw = *raw;
            let flags = raw.flags;
            let Ok(fd) = RawFd::try_from(raw.data.u64()) else {
                // Only descriptor numbers are ever stored as user data.
                continue;
            };
            events.push(Event {
                fd,
                readable: flags.intersects(F::IN | F::PRI | F::RDHUP),
                writable: flags.contains(F::OUT),
                hangup: flags.contains(F::HUP),
                error: flags.contains(F::ERR),
                invalid: false,
            });
        }

        let capacity = self.events.capacity();
        self.events.clear();
        if n >= capacity && capacity < MAX_EVENTS {
            // The buffer was full: there may be more ready descriptors than
            // it holds, so fetch more at once next time.
            self.events.reserve_exact((capacity * 2).min(MAX_EVENTS));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::conformance::{self as c, BOTH, NONE, READ, WRITE};
    use super::*;

    fn new() -> EpollPoller {
        EpollPoller::new().expect("epoll_create1")
    }

    c::shared_tests!(new());

    #[test]
    fn hangup_when_writer_closes() {
        c::hangup_when_writer_closes(new(), true);
    }

    #[test]
    fn closed_fd_silently_dropped() {
        c::closed_fd_silently_dropped(new());
    }

    #[test]
    fn handles_20000_descriptors() {
        // 20k descriptors would push concurrent tests' fds past FD_SETSIZE,
        // so the work runs in a fresh copy of this test binary.
        if c::in_child() {
            c::many_descriptors(new(), 10_000);
        } else {
            c::run_in_child("backend::epoll::tests::handles_20000_descriptors");
        }
    }

    #[test]
    fn millisecond_fallback_still_works() {
        // As on a kernel without epoll_pwait2.
        let mut p = new();
        p.precise = false;
        c::fractional_timeout_is_not_cut_short(p);
        let mut p = new();
        p.precise = false;
        c::readable_after_write(p);
        let mut p = new();
        p.precise = false;
        c::zero_timeout_returns_promptly(p);
    }

    #[test]
    fn epoll_fd_is_cloexec() {
        let p = new();
        let flags = rustix::io::fcntl_getfd(&p.epoll).unwrap();
        assert!(flags.contains(rustix::io::FdFlags::CLOEXEC));
    }

    #[test]
    fn dropping_closes_the_epoll_fd() {
        // Park the epoll descriptor on a high number nobody else takes while
        // the guard is held, so "closed" cannot be confused with "reused".
        let _numbers = c::fd_numbers();
        let EpollPoller { epoll, events, precise } = new();
        let p = EpollPoller { epoll: c::dup_at_least(&epoll, c::HIGH_FD), events, precise };
        drop(epoll);
        let fd = p.epoll.as_raw_fd();
        let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap();
        assert!(link.to_string_lossy().contains("eventpoll"), "{link:?}");
        drop(p);
        let err = std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    /// Registering an fd that is already registered (old said NONE) and
    /// modifying one the kernel does not know (old said READ) both recover.
    #[test]
    fn update_recovers_from_stale_old_interest() {
        let mut p = new();
        let (r, w) = c::pipe();
        let fd = c::raw(&r);
        p.update(fd, NONE, READ).unwrap();
        p.update(fd, NONE, BOTH).unwrap(); // EEXIST -> MOD
        let (r2, _w2) = c::pipe();
        p.update(c::raw(&r2), WRITE, READ).unwrap(); // ENOENT -> ADD
        c::write_byte(&w);
        let ev = c::wait_for(&mut p, fd);
        assert!(ev.readable, "{ev:?}");
        // Removing something never registered is fine as well.
        let (r3, _w3) = c::pipe();
        p.update(c::raw(&r3), READ, NONE).unwrap();
    }

    /// A wait that fills the event buffer grows it, so the next wait hands
    /// out more ready descriptors at once.
    #[test]
    fn event_buffer_grows_when_full() {
        let mut p = new();
        let pipes: Vec<_> = (0..150).map(|_| c::pipe()).collect();
        for (r, w) in &pipes {
            c::write_byte(w);
            p.update(c::raw(r), NONE, READ).unwrap();
            p.update(c::raw(w), NONE, WRITE).unwrap();
        }
        assert_eq!(p.events.capacity(), INITIAL_EVENTS);
        let first = c::poll_once(&mut p, Some(Duration::from_secs(1)));
        assert_eq!(first.len(), INITIAL_EVENTS);
        assert!(p.events.capacity() >= 2 * INITIAL_EVENTS);
        let second = c::poll_once(&mut p, Some(Duration::from_secs(1)));
        assert_eq!(second.len(), 300, "all ready descriptors in one wait");
        // Level-triggered: the second wait saw every descriptor exactly once.
        let mut fds: Vec<RawFd> = second.iter().map(|e| e.fd).collect();
        fds.sort_unstable();
        fds.dedup();
        assert_eq!(fds.len(), 300);
    }
}
