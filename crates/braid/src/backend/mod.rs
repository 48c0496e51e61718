//! Polling backends: one small file per OS mechanism behind one trait.
//!
//! A backend only answers "which of these descriptors are ready?". It knows
//! nothing about protocols, callbacks or timers; the reactor keeps the map
//! from descriptor to handler and does the dispatch, so every readiness
//! backend shares one dispatch path. All `unsafe` in braid lives in this
//! folder and in `sys/`.

use std::fmt;
use std::io;
use std::os::fd::RawFd;
use std::str::FromStr;
use std::time::Duration;

use crate::error::Error;

#[cfg(test)]
mod conformance;
pub(crate) mod epoll;
pub(crate) mod poll;
pub(crate) mod select;
pub(crate) mod uring;

/// Which directions of a descriptor the reactor wants to hear about.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Interest {
    pub read: bool,
    pub write: bool,
}

impl Interest {
    pub const NONE: Interest = Interest { read: false, write: false };

    pub fn is_empty(self) -> bool {
        !self.read && !self.write
    }
}

/// One readiness report for one descriptor.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Event {
    pub fd: RawFd,
    pub readable: bool,
    pub writable: bool,
    /// The peer hung up (POLLHUP / EPOLLHUP).
    pub hangup: bool,
    /// An error condition (POLLERR / EPOLLERR), or an invalid fd (POLLNVAL).
    pub error: bool,
    /// The kernel says the fd is not open (POLLNVAL); the reactor drops it.
    pub invalid: bool,
}

/// What every polling mechanism provides.
///
/// The reactor calls `update` with the interest it had registered before
/// (`old`) and the interest it wants now (`new`), so each backend can pick
/// add, modify or delete without keeping a second copy of the state.
pub(crate) trait Poller {
    /// Changes the interest set for `fd`. `new == NONE` removes it.
    fn update(&mut self, fd: RawFd, old: Interest, new: Interest) -> io::Result<()>;

    /// Waits up to `timeout` (`None` = forever) and appends ready descriptors
    /// to `events`, which the caller has cleared. An interrupted wait (EINTR)
    /// returns `Ok` with no events.
    fn poll(&mut self, events: &mut Vec<Event>, timeout: Option<Duration>) -> io::Result<()>;
}

/// The polling mechanisms braid can use, chosen at run time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Backend {
    /// `select(2)`: portable, limited to descriptors below `FD_SETSIZE`.
    Select,
    /// `poll(2)`: portable, O(n) per wait.
    Poll,
    /// `epoll(7)`: Linux, O(ready) per wait. The Linux default.
    Epoll,
    /// `io_uring(7)`: Linux 5.11+, completion-based. Probed when a reactor
    /// is built; a kernel or seccomp filter that refuses it makes
    /// `Reactor::new` fail with [`Error::BackendUnavailable`] naming what is
    /// missing, never a silent fallback. On Linux 6.0+ TCP and UNIX streams
    /// accept, read and write by completion; other descriptors are watched
    /// with poll requests on the ring.
    IoUring,
}

impl Backend {
    /// Every backend this build knows, in the order they are documented.
    pub const ALL: &'static [Backend] = &[Backend::Select, Backend::Poll, Backend::Epoll, Backend::IoUring];

    /// The names accepted by [`Backend::from_str`], `BRAID_REACTOR` and `--reactor`.
    pub const NAMES: &'static [&'static str] = &["select", "poll", "epoll", "io_uring"];

    /// The environment variable that picks the default backend.
    pub const ENV_VAR: &'static str = "BRAID_REACTOR";

    /// epoll on Linux, poll on other Unix systems.
    pub fn platform_default() -> Backend {
        if cfg!(any(target_os = "linux", target_os = "android")) {
            Backend::Epoll
        } else {
            Backend::Poll
        }
    }

    /// The backend named by `BRAID_REACTOR`, or the platform default when it
    /// is unset or empty. An unknown name is an error listing the valid ones.
    pub fn from_env() -> Result<Backend, Error> {
        match std::env::var(Self::ENV_VAR) {
            Ok(name) if !name.trim().is_empty() => name.trim().parse(),
            _ => Ok(Self::platform_default()),
        }
    }

    /// The lower-case name of this backend.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Select => "select",
            Backend::Poll => "poll",
            Backend::Epoll => "epoll",
            Backend::IoUring => "io_uring",
        }
    }

    /// True if this backend can be built on the current platform. For
    /// io_uring this says only that the build has it: whether the running
    /// kernel allows it is known when a reactor is built.
    pub fn is_available(self) -> bool {
        match self {
            Backend::Epoll => cfg!(any(target_os = "linux", target_os = "android")),
            Backend::IoUring => cfg!(target_os = "linux"),
            Backend::Select | Backend::Poll => true,
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Backend {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let lower = s.to_ascii_lowercase();
        Backend::ALL
            .iter()
            .copied()
            .find(|b| b.name() == lower)
            .ok_or_else(|| Error::UnknownBackend { name: s.to_string(), valid: Self::NAMES })
    }
}

/// A built poller of one of the kinds above. An enum rather than a trait
/// object, so the hot `poll` call is a direct, inlinable match.
pub(crate) enum AnyPoller {
    Select(select::SelectPoller),
    Poll(poll::PollPoller),
    Epoll(epoll::EpollPoller),
    /// Boxed: the ring's state is several times larger than the others'.
    Uring(Box<uring::poller::RingPoller>),
}

impl AnyPoller {
    pub fn new(backend: Backend) -> Result<AnyPoller, Error> {
        let built = match backend {
            Backend::Select => select::SelectPoller::new().map(AnyPoller::Select),
            Backend::Poll => poll::PollPoller::new().map(AnyPoller::Poll),
            Backend::Epoll => epoll::EpollPoller::new().map(AnyPoller::Epoll),
            Backend::IoUring => {
                return uring::poller::RingPoller::new().map(|p| AnyPoller::Uring(Box::new(p))).map_err(
                    |why| Error::BackendUnavailable { backend: backend.name(), why: why.to_string() },
                )
            }
        };
        built.map_err(|e| Error::io(format!("creating the {backend} backend"), e))
    }

    /// The largest descriptor number this backend can watch, if limited.
    pub fn fd_limit(&self) -> Option<usize> {
        match self {
            AnyPoller::Select(_) => Some(select::FD_SETSIZE),
            _ => None,
        }
    }
}

impl Poller for AnyPoller {
    #[inline]
    fn update(&mut self, fd: RawFd, old: Interest, new: Interest) -> io::Result<()> {
        match self {
            AnyPoller::Select(p) => p.update(fd, old, new),
            AnyPoller::Poll(p) => p.update(fd, old, new),
            AnyPoller::Epoll(p) => p.update(fd, old, new),
            AnyPoller::Uring(p) => p.update(fd, old, new),
        }
    }

    #[inline]
    fn poll(&mut self, events: &mut Vec<Event>, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            AnyPoller::Select(p) => p.poll(events, timeout),
            AnyPoller::Poll(p) => p.poll(events, timeout),
            AnyPoller::Epoll(p) => p.poll(events, timeout),
            AnyPoller::Uring(p) => p.poll(events, timeout),
        }
    }
}

/// The longest wait passed to the kernel in one call, in seconds (about 68
/// years): longer waits, say for a timer 2^64 ns away, are clamped, and the
/// reactor simply waits again.
const MAX_WAIT_SECS: u64 = i32::MAX as u64;

/// Converts a wait timeout to a `timespec` for the waits that take one
/// (epoll_pwait2, ppoll), keeping sub-millisecond precision so that a timer
/// 200 µs away is not slept past by most of a millisecond. `None` waits
/// forever.
pub(crate) fn timeout_timespec(timeout: Option<Duration>) -> Option<libc::timespec> {
    timeout.map(|d| {
        if d.as_secs() >= MAX_WAIT_SECS {
            libc::timespec { tv_sec: MAX_WAIT_SECS as libc::time_t, tv_nsec: 0 }
        } else {
            libc::timespec { tv_sec: d.as_secs() as libc::time_t, tv_nsec: d.subsec_nanos() as libc::c_long }
        }
    })
}

/// Converts a wait timeout to a `timeval` for select, rounding up to whole
/// microseconds and clamping like [`timeout_timespec`].
pub(crate) fn timeout_timeval(timeout: Option<Duration>) -> Option<libc::timeval> {
    timeout.map(|d| {
        let micros = d.as_nanos().div_ceil(1_000);
        let secs = (micros / 1_000_000).min(u128::from(MAX_WAIT_SECS));
        let usec = if secs == u128::from(MAX_WAIT_SECS) { 0 } else { micros % 1_000_000 };
        libc::timeval { tv_sec: secs as libc::time_t, tv_usec: usec as libc::suseconds_t }
    })
}

/// Converts a wait timeout to whole milliseconds for poll/epoll/select,
/// rounding up (so a timer 0.3 ms away does not turn into a busy 0 ms wait)
/// and clamping to the largest value an `int` of milliseconds holds
/// (2,147,483 s), so a far-future timer never overflows.
pub(crate) fn timeout_ms(timeout: Option<Duration>) -> i32 {
    match timeout {
        None => -1,
        Some(d) => {
            let ms = d.as_nanos().div_ceil(1_000_000);
            ms.min(i32::MAX as u128) as i32
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precise_timeouts_keep_sub_millisecond_waits_and_clamp() {
        assert!(timeout_timespec(None).is_none());
        let ts = timeout_timespec(Some(Duration::from_nanos(1_500_000_250))).unwrap();
        assert_eq!((ts.tv_sec, ts.tv_nsec), (1, 500_000_250));
        let ts = timeout_timespec(Some(Duration::from_nanos(u64::MAX))).unwrap();
        assert_eq!((ts.tv_sec, ts.tv_nsec), (i64::from(i32::MAX), 0));
        let ts = timeout_timespec(Some(Duration::MAX)).unwrap();
        assert_eq!(ts.tv_sec, i64::from(i32::MAX));

        assert!(timeout_timeval(None).is_none());
        let tv = timeout_timeval(Some(Duration::from_nanos(200_001))).unwrap();
        assert_eq!((tv.tv_sec, tv.tv_usec), (0, 201), "rounded up to whole microseconds");
        let tv = timeout_timeval(Some(Duration::from_micros(2_000_300))).unwrap();
        assert_eq!((tv.tv_sec, tv.tv_usec), (2, 300));
        let tv = timeout_timeval(Some(Duration::MAX)).unwrap();
        assert_eq!((tv.tv_sec, tv.tv_usec), (i64::from(i32::MAX), 0));
        let tv = timeout_timeval(Some(Duration::ZERO)).unwrap();
        assert_eq!((tv.tv_sec, tv.tv_usec), (0, 0));
    }

    #[test]
    fn timeout_rounds_up_and_clamps() {
        assert_eq!(timeout_ms(None), -1);
        assert_eq!(timeout_ms(Some(Duration::ZERO)), 0);
        assert_eq!(timeout_ms(Some(Duration::from_micros(300))), 1);
        assert_eq!(timeout_ms(Some(Duration::from_millis(1500))), 1500);
        assert_eq!(timeout_ms(Some(Duration::from_secs(u64::MAX))), i32::MAX);
    }

    #[test]
    fn names_round_trip_and_unknown_lists_valid() {
        for b in Backend::ALL {
            assert_eq!(b.name().parse::<Backend>().unwrap(), *b);
        }
        assert_eq!("EPOLL".parse::<Backend>().unwrap(), Backend::Epoll);
        let err = "kqueue-ish".parse::<Backend>().unwrap_err().to_string();
        assert!(err.contains("kqueue-ish") && err.contains("select, poll, epoll, io_uring"), "{err}");
    }
}
