//! poll(2) backend: portable, O(registered) per wait.
//!
//! The `pollfd` array handed to the kernel is kept between waits, together
//! with a map from descriptor number to array position, so adding, changing
//! and removing a descriptor are O(1) (removal swaps the last entry into the
//! hole).
//!
//! A registered descriptor that has been closed is reported once with
//! `invalid` and `error` set (POLLNVAL) and then dropped from the array, so a
//! reactor that forgets to remove it cannot spin on it.

use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

use super::{Event, Interest, Poller};

/// Marks a descriptor number with no entry in `fds`.
const NO_SLOT: u32 = u32::MAX;

pub(crate) struct PollPoller {
    /// Exactly the registered descriptors, each with a non-empty interest.
    fds: Vec<libc::pollfd>,
    /// `slots[fd]` is the position of `fd` in `fds`, or [`NO_SLOT`].
    /// Descriptor numbers are allocated lowest-first, so this stays about as
    /// long as the highest descriptor the process has open.
    slots: Vec<u32>,
}

fn poll_events(interest: Interest) -> libc::c_short {
    let mut events = 0;
    if interest.read {
        events |= libc::POLLIN;
    }
    if interest.write {
        events |= libc::POLLOUT;
    }
    events
}

impl PollPoller {
    pub fn new() -> io::Result<Self> {
        Ok(PollPoller { fds: Vec::new(), slots: Vec::new() })
    }

    fn slot(&self, fd: RawFd) -> Option<usize> {
        let i = usize::try_from(fd).ok()?;
        match self.slots.get(i) {
            Some(&pos) if pos != NO_SLOT => Some(pos as usize),
            _ => None,
        }
    }

    fn add(&mut self, fd: RawFd, events: libc::c_short) -> io::Result<()> {
        let index = usize::try_from(fd).map_err(|_| negative(fd))?;
        let pos = u32::try_from(self.fds.len())
            .ok()
            .filter(|&p| p != NO_SLOT)
            .ok_or_else(|| io::Error::other("too many descriptors for the poll backend"))?;
        if index >= self.slots.len() {
            let grow = index + 1 - self.slots.len();
            self.slots.try_reserve(grow).map_err(|_| io::ErrorKind::OutOfMemory)?;
            self.slots.resize(index + 1, NO_SLOT);
        }
        self.fds.try_reserve(1).map_err(|_| io::ErrorKind::OutOfMemory)?;
        self.fds.push(libc::pollfd { fd, events, revents: 0 });
        self.slots[index] = pos;
        Ok(())
    }

    /// Removes the entry at `pos`, moving the last entry into its place.
    fn remove_at(&mut self, pos: usize) {
        let removed = self.fds.swap_remove(pos);
        self.set_slot(removed.fd, NO_SLOT);
        if let Some(moved) = self.fds.get(pos) {
            // `pos` came from a u32 slot, so it fits.
            self.set_slot(moved.fd, pos as u32);
        }
    }

    fn set_slot(&mut self, fd: RawFd, pos: u32) {
        if let Some(slot) = usize::try_from(fd).ok().and_then(|i| self.slots.get_mut(i)) {
            *slot = pos;
        }
    }
}

fn negative(fd: RawFd) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, format!("cannot watch negative file descriptor {fd}"))
}

impl Poller for PollPoller {
    /// `old` is not needed: the slot map says whether `fd` is registered.
    fn update(&mut self, fd: RawFd, _old: Interest, new: Interest) -> io::Result<()> {
        if fd < 0 {
            return Err(negative(fd));
        }
        match (self.slot(fd), new.is_empty()) {
            (Some(pos), true) => self.remove_at(pos),
            (None, true) => {}
            (Some(pos), false) => {
                let entry = &mut self.fds[pos];
                entry.events = poll_events(new);
                entry.revents = 0;
            }
            (None, false) => self.add(fd, poll_events(new))?,
        }
        Ok(())
    }

    fn poll(&mut self, events: &mut Vec<Event>, timeout: Option<Duration>) -> io::Result<()> {
        let n = wait(&mut self.fds, timeout);
        if n < 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::EINTR) => Ok(()),
                _ => Err(err),
            };
        }

        let mut remaining = n as usize;
        events.reserve(remaining);
        let mut pos = 0;
        while remaining > 0 && pos < self.fds.len() {
            let entry = self.fds[pos];
            let revents = entry.revents;
            if revents == 0 {
                pos += 1;
                continue;
            }
            remaining -= 1;
            self.fds[pos].revents = 0;
            let invalid = revents & libc::POLLNVAL != 0;
            events.push(Event {
                fd: entry.fd,
                readable: revents & (libc::POLLIN | libc::POLLPRI) != 0,
                writable: revents & libc::POLLOUT != 0,
                hangup: revents & libc::POLLHUP != 0,
                error: invalid || revents & libc::POLLERR != 0,
                invalid,
            });
            if invalid {
                // Not open: forget it, or every later wait would return at
                // once. The last entry moves into `pos`; it belongs to this
                // same wait, so look at `pos` again.
                self.remove_at(pos);
            } else {
                pos += 1;
            }
        }
        Ok(())
    }
}

/// One wait. On Linux, ppoll takes the timeout with nanosecond precision.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn wait(fds: &mut [libc::pollfd], timeout: Option<Duration>) -> libc::c_int {
    let ts = super::timeout_timespec(timeout);
    let ts_ptr: *const libc::timespec = ts.as_ref().map_or(std::ptr::null(), |ts| ts as *const _);
    // SAFETY: the pointer and length describe the initialised `pollfd`s of
    // `fds`, borrowed exclusively for the call; the kernel writes only their
    // `revents` fields and keeps no pointer. An empty slice gives a dangling
    // but aligned pointer with length 0, which the kernel does not
    // dereference. `ts_ptr` is null (wait forever) or points at `ts`, which
    // outlives the call; the signal mask is null (unchanged).
    unsafe { libc::ppoll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ts_ptr, std::ptr::null()) }
}

/// One wait, with the timeout in whole milliseconds (rounded up).
#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn wait(fds: &mut [libc::pollfd], timeout: Option<Duration>) -> libc::c_int {
    let ms = super::timeout_ms(timeout);
    // SAFETY: as for the Linux version; `ms` is a plain integer.
    unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) }
}

#[cfg(test)]
mod tests {
    use super::super::conformance::{self as c, NONE, READ, WRITE};
    use super::*;

    fn new() -> PollPoller {
        PollPoller::new().unwrap()
    }

    c::shared_tests!(new());

    #[test]
    fn hangup_when_writer_closes() {
        c::hangup_when_writer_closes(new(), true);
    }

    #[test]
    fn closed_fd_reported_invalid() {
        c::closed_fd_reported_invalid(new());
    }

    #[test]
    fn handles_20000_descriptors() {
        // 20k descriptors would push concurrent tests' fds past FD_SETSIZE,
        // so the work runs in a fresh copy of this test binary.
        if c::in_child() {
            c::many_descriptors(new(), 10_000);
        } else {
            c::run_in_child("backend::poll::tests::handles_20000_descriptors");
        }
    }

    /// The array and the slot map stay consistent through swap-removals:
    /// every registered descriptor is found where the map says, and removed
    /// ones are gone.
    #[test]
    fn slot_map_survives_swap_remove() {
        let mut p = new();
        let pipes: Vec<_> = (0..6).map(|_| c::pipe()).collect();
        for (r, _) in &pipes {
            p.update(c::raw(r), NONE, READ).unwrap();
        }
        // Remove the first (forces the last into slot 0) and a middle one.
        p.update(c::raw(&pipes[0].0), READ, NONE).unwrap();
        p.update(c::raw(&pipes[3].0), READ, NONE).unwrap();
        // Removing again is a no-op.
        p.update(c::raw(&pipes[3].0), READ, NONE).unwrap();
        assert_eq!(p.fds.len(), 4);
        for (pos, entry) in p.fds.iter().enumerate() {
            assert_eq!(p.slot(entry.fd), Some(pos));
        }
        assert_eq!(p.slot(c::raw(&pipes[0].0)), None);
        assert_eq!(p.slot(c::raw(&pipes[3].0)), None);
        // Every remaining one still works, the removed ones stay silent.
        for (_, w) in &pipes {
            c::write_byte(w);
        }
        let events = c::poll_once(&mut p, Some(Duration::from_secs(1)));
        let mut fds: Vec<RawFd> = events.iter().map(|e| e.fd).collect();
        fds.sort_unstable();
        let mut want: Vec<RawFd> = [1, 2, 4, 5].iter().map(|&i| c::raw(&pipes[i].0)).collect();
        want.sort_unstable();
        assert_eq!(fds, want);
        // Modifying a moved entry changes that entry only.
        p.update(c::raw(&pipes[5].0), READ, WRITE).unwrap();
        let events = c::poll_once(&mut p, Some(Duration::ZERO));
        assert_eq!(c::event_for(&events, c::raw(&pipes[5].0)), None, "read end is never writable");
        assert!(c::event_for(&events, c::raw(&pipes[4].0)).is_some());
    }

    /// Several closed descriptors in one wait are all reported and dropped,
    /// including the ones swapped into a removed entry's place.
    #[test]
    fn several_closed_fds_in_one_wait() {
        let _numbers = c::fd_numbers();
        let mut p = new();
        let (keep_r, keep_w) = c::pipe();
        p.update(c::raw(&keep_r), NONE, READ).unwrap();
        // Each pipe read end moved to a high number, held until all are
        // registered so the numbers are distinct.
        let pipes: Vec<_> = (0..4).map(|_| c::pipe()).collect();
        let highs: Vec<_> = pipes.iter().map(|(r, _)| c::dup_at_least(r, c::HIGH_FD)).collect();
        let closed: Vec<RawFd> = highs.iter().map(c::raw).collect();
        for &fd in &closed {
            p.update(fd, NONE, READ).unwrap();
        }
        drop(highs);
        c::write_byte(&keep_w);
        let events = c::poll_once(&mut p, Some(Duration::from_secs(1)));
        for &fd in &closed {
            let ev = c::event_for(&events, fd).unwrap_or_else(|| panic!("{fd}: {events:?}"));
            assert!(ev.invalid && ev.error, "{ev:?}");
        }
        assert!(c::event_for(&events, c::raw(&keep_r)).is_some_and(|e| e.readable));
        assert_eq!(p.fds.len(), 1);
        assert_eq!(p.slot(c::raw(&keep_r)), Some(0));
    }
}
