//! select(2) backend: portable, limited to descriptors below `FD_SETSIZE`.
//!
//! An `fd_set` is a fixed-size bitmap and `FD_SET` does no bounds checking,
//! so a descriptor number at or above `FD_SETSIZE` would write past its end.
//! Every descriptor therefore goes through [`InRange::new`] before it touches
//! an `fd_set`; anything else is refused with `InvalidInput`.
//!
//! The interest sets are kept between waits and copied into scratch sets for
//! each call, since select overwrites its arguments with the result.
//!
//! select cannot say which descriptor is bad: if it fails with EBADF, every
//! registered descriptor is probed with `fcntl(F_GETFD)`, the closed ones are
//! reported with `invalid` and `error` set, and they are dropped from the
//! sets so the next wait works again.

use std::io;
use std::os::fd::RawFd;
use std::ptr;
use std::time::Duration;

use super::{timeout_timeval, Event, Interest, Poller};

pub(crate) const FD_SETSIZE: usize = libc::FD_SETSIZE;

/// A descriptor number known to satisfy `0 <= fd < FD_SETSIZE`, the only
/// kind the `fd_set` helpers below accept. The field is private to this
/// module and the only constructor checks the range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct InRange(libc::c_int);

impl InRange {
    fn new(fd: RawFd) -> Option<InRange> {
        let index = usize::try_from(fd).ok()?;
        (index < FD_SETSIZE).then_some(InRange(fd))
    }
}

fn empty_set() -> libc::fd_set {
    // SAFETY: `fd_set` is a plain array of integers, for which all-zero bits
    // are a valid value: the empty set, exactly what FD_ZERO produces.
    unsafe { std::mem::zeroed() }
}

fn insert(set: &mut libc::fd_set, fd: InRange) {
    // SAFETY: `set` is a valid, exclusively borrowed fd_set and `fd` is in
    // 0..FD_SETSIZE (the `InRange` invariant), so the bit FD_SET writes lies
    // inside it.
    unsafe { libc::FD_SET(fd.0, set) }
}

fn remove(set: &mut libc::fd_set, fd: InRange) {
    // SAFETY: as in `insert`: valid exclusive reference, in-range bit.
    unsafe { libc::FD_CLR(fd.0, set) }
}

fn contains(set: &libc::fd_set, fd: InRange) -> bool {
    // SAFETY: `set` is a valid fd_set and `fd` is in 0..FD_SETSIZE, so the
    // bit FD_ISSET reads lies inside it.
    unsafe { libc::FD_ISSET(fd.0, set) }
}

/// True if the kernel says `fd` is not an open descriptor.
fn is_closed(fd: InRange) -> bool {
    // The probe takes the number as a plain integer: the point is that it
    // may be closed, so it cannot honestly be made into a `BorrowedFd` (as
    // `rustix::io::fcntl_getfd` would need).
    //
    // SAFETY: F_GETFD takes no third argument and reads or writes no memory
    // of ours; the kernel validates the descriptor and fails with EBADF if
    // it is not open.
    let rc = unsafe { libc::fcntl(fd.0, libc::F_GETFD) };
    rc == -1 && io::Error::last_os_error().raw_os_error() == Some(libc::EBADF)
}

/// The four sets, boxed so a `SelectPoller` (and so the reactor's
/// `AnyPoller`) stays small: on Linux they are 512 bytes together.
struct Sets {
    /// What the reactor asked for.
    want_read: libc::fd_set,
    want_write: libc::fd_set,
    /// Scratch copies handed to select, which overwrites them.
    ready_read: libc::fd_set,
    ready_write: libc::fd_set,
}

pub(crate) struct SelectPoller {
    sets: Box<Sets>,
    /// Highest registered descriptor, or -1 when none is.
    max_fd: libc::c_int,
}

impl SelectPoller {
    pub fn new() -> io::Result<Self> {
        Ok(SelectPoller {
            sets: Box::new(Sets {
                want_read: empty_set(),
                want_write: empty_set(),
                ready_read: empty_set(),
                ready_write: empty_set(),
            }),
            max_fd: -1,
        })
    }

    fn is_registered(&self, fd: InRange) -> bool {
        contains(&self.sets.want_read, fd) || contains(&self.sets.want_write, fd)
    }

    /// Every descriptor number that may be registered, each range-checked.
    fn candidates(&self) -> impl Iterator<Item = InRange> {
        (0..=self.max_fd).filter_map(InRange::new)
    }

    fn set_interest(&mut self, fd: InRange, interest: Interest) {
        if interest.read {
            insert(&mut self.sets.want_read, fd);
        } else {
            remove(&mut self.sets.want_read, fd);
        }
        if interest.write {
            insert(&mut self.sets.want_write, fd);
        } else {
            remove(&mut self.sets.want_write, fd);
        }
        if !interest.is_empty() {
            self.max_fd = self.max_fd.max(fd.0);
        } else if fd.0 == self.max_fd {
            self.max_fd = (0..fd.0)
                .rev()
                .filter_map(InRange::new)
                .find(|&lower| self.is_registered(lower))
                .map_or(-1, |lower| lower.0);
        }
    }

    /// After EBADF: reports and forgets every registered descriptor that is
    /// no longer open. Returns how many there were.
    fn drop_closed(&mut self, events: &mut Vec<Event>) -> usize {
        let mut found = 0;
        for fd in self.candidates() {
            if self.is_registered(fd) && is_closed(fd) {
                events.push(Event { fd: fd.0, error: true, invalid: true, ..Event::default() });
                self.set_interest(fd, Interest::NONE);
                found += 1;
            }
        }
        found
    }
}

impl Poller for SelectPoller {
    /// `old` is not needed: the interest sets say what is registered.
    fn update(&mut self, fd: RawFd, _old: Interest, new: Interest) -> io::Result<()> {
        match InRange::new(fd) {
            Some(fd) => {
                self.set_interest(fd, new);
                Ok(())
            }
            // Out of range can never have been registered: nothing to remove.
            None if new.is_empty() && fd >= 0 => Ok(()),
            None if fd < 0 => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cannot watch negative file descriptor {fd}"),
            )),
            None => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "file descriptor {fd} is too large for the select backend, which can only \
                     watch descriptors below FD_SETSIZE ({FD_SETSIZE}); use the poll or epoll \
                     backend"
                ),
            )),
        }
    }

    fn poll(&mut self, events: &mut Vec<Event>, timeout: Option<Duration>) -> io::Result<()> {
        let mut tv = timeout_timeval(timeout);
        let tv_ptr: *mut libc::timeval = tv.as_mut().map_or(ptr::null_mut(), |tv| tv as *mut _);

        // Always true (only `InRange` descriptors are registered); clamped
        // anyway so the bound below holds locally.
        let nfds = (self.max_fd + 1).clamp(0, FD_SETSIZE as libc::c_int);
        let sets = &mut *self.sets;
        sets.ready_read = sets.want_read;
        sets.ready_write = sets.want_write;
        // SAFETY: `nfds <= FD_SETSIZE`, so select looks at no bit outside the
        // sets. The two set pointers come from exclusive borrows of our boxed
        // sets, valid for the call; the except set is null (not wanted);
        // `tv_ptr` is null (wait forever) or points at `tv`, which outlives
        // the call. select keeps none of these pointers.
        let n = unsafe {
            libc::select(nfds, &mut sets.ready_read, &mut sets.ready_write, ptr::null_mut(), tv_ptr)
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::EINTR) => Ok(()),
                Some(libc::EBADF) if self.drop_closed(events) > 0 => Ok(()),
                _ => Err(err),
            };
        }

        // `n` counts set bits over both sets; stop once all are found.
        let mut remaining = n as usize;
        for fd in self.candidates() {
            if remaining == 0 {
                break;
            }
            let readable = contains(&self.sets.ready_read, fd);
            let writable = contains(&self.sets.ready_write, fd);
            if readable || writable {
                remaining = remaining.saturating_sub(usize::from(readable) + usize::from(writable));
                events.push(Event { fd: fd.0, readable, writable, ..Event::default() });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::conformance::{self as c, NONE, READ, WRITE};
    use super::*;

    fn new() -> SelectPoller {
        SelectPoller::new().unwrap()
    }

    c::shared_tests!(new());

    #[test]
    fn hangup_when_writer_closes() {
        // select has no hangup bit: EOF shows up as readable.
        c::hangup_when_writer_closes(new(), false);
    }

    #[test]
    fn closed_fd_reported_invalid() {
        c::closed_fd_reported_invalid(new());
    }

    #[test]
    fn in_range_checks_both_ends() {
        assert_eq!(InRange::new(-1), None);
        assert_eq!(InRange::new(RawFd::MIN), None);
        assert_eq!(InRange::new(0), Some(InRange(0)));
        let last = FD_SETSIZE as RawFd - 1;
        assert_eq!(InRange::new(last), Some(InRange(last)));
        assert_eq!(InRange::new(last + 1), None);
        assert_eq!(InRange::new(RawFd::MAX), None);
    }

    /// A real descriptor numbered at or above FD_SETSIZE is refused with
    /// InvalidInput, and the refusal leaves the poller untouched.
    #[test]
    fn rejects_fd_at_or_above_fd_setsize() {
        let mut p = new();
        let (r, w) = c::pipe();
        p.update(c::raw(&r), NONE, READ).unwrap();
        let max_before = p.max_fd;
        let big = c::dup_at_least(&r, 1100);
        let at_limit = c::dup_at_least(&r, FD_SETSIZE as RawFd);
        for fd in [c::raw(&big), c::raw(&at_limit)] {
            assert!(fd as usize >= FD_SETSIZE);
            for interest in [READ, WRITE] {
                let err = p.update(fd, NONE, interest).unwrap_err();
                assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{err}");
                assert!(err.to_string().contains("FD_SETSIZE"), "{err}");
            }
            // Removing what could never have been added is harmless.
            p.update(fd, READ, NONE).unwrap();
        }
        assert_eq!(p.max_fd, max_before);
        c::write_byte(&w);
        let events = c::poll_once(&mut p, Some(Duration::from_secs(1)));
        let fds: Vec<RawFd> = events.iter().map(|e| e.fd).collect();
        assert_eq!(fds, vec![c::raw(&r)]);
    }

    /// The highest descriptor select can take, FD_SETSIZE - 1, works.
    #[test]
    fn accepts_the_last_fd_below_fd_setsize() {
        let _numbers = c::fd_numbers();
        let (r, w) = c::pipe();
        let last = c::dup_at_least(&r, FD_SETSIZE as RawFd - 1);
        if c::raw(&last) != FD_SETSIZE as RawFd - 1 {
            eprintln!("SKIPPED: descriptor {} is taken", FD_SETSIZE - 1);
            return;
        }
        let mut p = new();
        p.update(c::raw(&last), NONE, READ).unwrap();
        assert_eq!(p.max_fd, FD_SETSIZE as RawFd - 1);
        c::assert_not_reported(&mut p, c::raw(&last));
        c::write_byte(&w);
        assert!(c::wait_for(&mut p, c::raw(&last)).readable);
        p.update(c::raw(&last), READ, NONE).unwrap();
        assert_eq!(p.max_fd, -1);
    }

    /// max_fd follows registrations down as the top ones are removed.
    #[test]
    fn max_fd_tracks_removals() {
        let mut p = new();
        let (a, _aw) = c::pipe();
        let (b, _bw) = c::pipe();
        let (lo, hi) = if c::raw(&a) < c::raw(&b) { (a, b) } else { (b, a) };
        p.update(c::raw(&lo), NONE, READ).unwrap();
        p.update(c::raw(&hi), NONE, WRITE).unwrap();
        assert_eq!(p.max_fd, c::raw(&hi));
        p.update(c::raw(&lo), READ, NONE).unwrap();
        assert_eq!(p.max_fd, c::raw(&hi));
        p.update(c::raw(&hi), WRITE, READ).unwrap();
        assert_eq!(p.max_fd, c::raw(&hi));
        p.update(c::raw(&hi), READ, NONE).unwrap();
        assert_eq!(p.max_fd, -1);
    }
}
