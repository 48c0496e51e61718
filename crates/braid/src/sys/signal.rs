//! Process signal handlers for SIGINT, SIGTERM and SIGCHLD.
//!
//! Signal dispositions are process-wide, but reactors are per thread, so the
//! handler fans out: every reactor that installed handlers owns a slot with
//! a wake-up descriptor and a bitmask of pending signals. The handler only
//! does async-signal-safe work: an atomic OR and a `write(2)` per slot, with
//! `errno` saved and restored around it. The reactor then sees its waker
//! readable and reads the mask.
//!
//! The first installer saves the previous dispositions; the last one to
//! leave restores them, so `run()` returning leaves the process as it was.
//!
//! A handler must never write to a descriptor number that has been closed
//! and perhaps reused by an unrelated file. So a [`SignalGuard`] writes to
//! its own duplicate of the reactor's waker, which it alone closes, and
//! only after it has emptied its slot, restored the dispositions (if it was
//! the last) and waited for handlers already running on other threads, which
//! may have read the slot just before, to return. However the reactor's
//! fields are dropped, the handler never sees a closed number.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

/// How many reactors can hold signal handlers at once.
const SLOTS: usize = 64;

#[allow(clippy::declare_interior_mutable_const)]
const NO_FD: AtomicI32 = AtomicI32::new(-1);
#[allow(clippy::declare_interior_mutable_const)]
const NO_SIGNALS: AtomicU64 = AtomicU64::new(0);

static WAKE_FDS: [AtomicI32; SLOTS] = [NO_FD; SLOTS];
static PENDING: [AtomicU64; SLOTS] = [NO_SIGNALS; SLOTS];
/// Handlers running now, on any thread (see `SignalGuard::drop`).
static RUNNING: AtomicUsize = AtomicUsize::new(0);

/// The signals braid handles.
pub(crate) const HANDLED: [i32; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGCHLD];

struct Saved {
    users: usize,
    /// Previous disposition of each signal in `HANDLED`, `None` where we
    /// left the signal alone (SIGINT/SIGTERM that were being ignored).
    old: [Option<libc::sigaction>; 3],
}

static SAVED: Mutex<Saved> = Mutex::new(Saved { users: 0, old: [None, None, None] });

extern "C" fn on_signal(signum: libc::c_int) {
    let saved_errno = errno::get();
    // Counted before any slot is read: a guard that empties its slot and then
    // sees no handler running knows none still holds its descriptor.
    RUNNING.fetch_add(1, Ordering::SeqCst);
    let bit = 1u64 << (signum as u64 & 63);
    for (slot, fd_cell) in WAKE_FDS.iter().enumerate() {
        let fd = fd_cell.load(Ordering::SeqCst);
        if fd < 0 {
            continue;
        }
        PENDING[slot].fetch_or(bit, Ordering::AcqRel);
        let one = 1u64.to_ne_bytes();
        // SAFETY: write(2) is async-signal-safe; the buffer is a live local of
        // the given length. `fd` stays open until this handler has returned
        // (`RUNNING`); a full waker only makes write fail, which is fine: the
        // pending bit is already set.
        unsafe {
            libc::write(fd, one.as_ptr().cast(), one.len());
        }
    }
    RUNNING.fetch_sub(1, Ordering::SeqCst);
    errno::set(saved_errno);
}

/// This thread's `errno`, which a handler must leave as it found it: the
/// code it interrupted may be about to read it.
pub(crate) mod errno {
    #[cfg(any(target_os = "solaris", target_os = "illumos"))]
    use libc::___errno as location;
    #[cfg(not(any(
        target_os = "linux",
        target_os = "emscripten",
        target_os = "hurd",
        target_os = "redox",
        target_os = "dragonfly",
        target_os = "fuchsia",
        target_os = "android",
        target_os = "netbsd",
        target_os = "openbsd",
        target_os = "cygwin",
        target_os = "macos",
        target_os = "ios",
        target_os = "tvos",
        target_os = "watchos",
        target_os = "visionos",
        target_os = "freebsd",
        target_os = "solaris",
        target_os = "illumos"
    )))]
    compile_error!("braid's signal handler does not know where errno lives on this platform");
    #[cfg(any(
        target_os = "android",
        target_os = "netbsd",
        target_os = "openbsd",
        target_os = "cygwin"
    ))]
    use libc::__errno as location;
    #[cfg(any(
        target_os = "linux",
        target_os = "emscripten",
        target_os = "hurd",
        target_os = "redox",
        target_os = "dragonfly",
        target_os = "fuchsia"
    ))]
    use libc::__errno_location as location;
    #[cfg(any(
        target_os = "macos",
        target_os = "ios",
        target_os = "tvos",
        target_os = "watchos",
        target_os = "visionos",
        target_os = "freebsd"
    ))]
    use libc::__error as location;

    pub(crate) fn get() -> libc::c_int {
        // SAFETY: the function returns this thread's errno slot, always valid.
        unsafe { *location() }
    }

    pub(crate) fn set(value: libc::c_int) {
        // SAFETY: as above.
        unsafe { *location() = value }
    }
}

fn current_action(signum: i32) -> io::Result<libc::sigaction> {
    // SAFETY: a zeroed sigaction is a valid value to be overwritten; passing a
    // null new action only queries the current disposition.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(signum, std::ptr::null(), &mut old) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(old)
    }
}

fn set_action(signum: i32, action: &libc::sigaction) -> io::Result<()> {
    // SAFETY: `action` is a fully initialised sigaction; the old action is
    // not wanted (null).
    let rc = unsafe { libc::sigaction(signum, action, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn our_action(signum: i32) -> libc::sigaction {
    // SAFETY: zeroed is a valid starting sigaction; sigemptyset initialises
    // the mask it is given.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        libc::sigemptyset(&mut action.sa_mask);
        action.sa_flags = libc::SA_RESTART;
        if signum == libc::SIGCHLD {
            action.sa_flags |= libc::SA_NOCLDSTOP;
        }
        action
    }
}

/// True if SIGCHLD has its default disposition.
#[cfg(test)]
pub(crate) fn sigchld_is_default() -> bool {
    current_action(libc::SIGCHLD).map(|a| a.sa_sigaction == libc::SIG_DFL).unwrap_or(false)
}

/// While alive, signals wake the reactor that owns this guard.
pub(crate) struct SignalGuard {
    slot: usize,
    /// The handler's own duplicate of the wake-up descriptor (the slot
    /// holds its number): closed, when the guard drops, only once no
    /// handler can write to it any more.
    _fd: OwnedFd,
}

impl SignalGuard {
    /// Installs the handlers (first user) and takes a slot that wakes
    /// `wake_fd`, an open descriptor (duplicated here: the caller may close
    /// its own whenever it likes).
    pub fn install(wake_fd: RawFd) -> io::Result<SignalGuard> {
        // SAFETY: the caller passes a descriptor open for this call; it is
        // only borrowed long enough to duplicate it.
        let borrowed = unsafe { BorrowedFd::borrow_raw(wake_fd) };
        let fd = rustix::io::fcntl_dupfd_cloexec(borrowed, 0)?;
        let mut saved = SAVED.lock().unwrap_or_else(|e| e.into_inner());
        let slot = WAKE_FDS
            .iter()
            .position(|cell| {
                cell.compare_exchange(-1, fd.as_raw_fd(), Ordering::SeqCst, Ordering::SeqCst).is_ok()
            })
            .ok_or_else(|| io::Error::other("too many reactors with signal handlers in this process"))?;
        PENDING[slot].store(0, Ordering::Release);
        if saved.users == 0 {
            for (i, &signum) in HANDLED.iter().enumerate() {
                let installed = current_action(signum).and_then(|old| {
                    // A shell starts background jobs with SIGINT ignored;
                    // leave such a choice alone, as Twisted leaves custom
                    // handlers.
                    if signum != libc::SIGCHLD && old.sa_sigaction == libc::SIG_IGN {
                        return Ok(None);
                    }
                    set_action(signum, &our_action(signum)).map(|()| Some(old))
                });
                match installed {
                    Ok(old) => saved.old[i] = old,
                    Err(e) => {
                        restore(&mut saved.old);
                        drop(saved);
                        release(slot);
                        return Err(e);
                    }
                }
            }
        }
        saved.users += 1;
        Ok(SignalGuard { slot, _fd: fd })
    }

    /// Takes the signals delivered since the last call, as a bitmask of
    /// `1 << signum`.
    pub fn take_pending(&self) -> u64 {
        PENDING[self.slot].swap(0, Ordering::AcqRel)
    }
}

/// Empties `slot`, then waits until no handler that may have read it before
/// is still running, so that its descriptor can be closed.
fn release(slot: usize) {
    WAKE_FDS[slot].store(-1, Ordering::SeqCst);
    PENDING[slot].store(0, Ordering::Release);
    // A handler counts itself before it reads any slot; once the count is
    // seen at zero after the store above, every handler still to come reads
    // the empty slot. Handlers are a handful of instructions and a
    // non-blocking write, so this wait is short.
    while RUNNING.load(Ordering::SeqCst) != 0 {
        std::thread::yield_now();
    }
}

fn restore(old: &mut [Option<libc::sigaction>; 3]) {
    for (i, &signum) in HANDLED.iter().enumerate() {
        if let Some(action) = old[i].take() {
            // Restoring a disposition we read earlier cannot fail for a
            // valid signal number; if it did there is nothing better to do.
            let _ = set_action(signum, &action);
        }
    }
}

impl Drop for SignalGuard {
    fn drop(&mut self) {
        let mut saved = SAVED.lock().unwrap_or_else(|e| e.into_inner());
        saved.users -= 1;
        if saved.users == 0 {
            restore(&mut saved.old);
        }
        drop(saved);
        release(self.slot);
        // `self._fd` is closed after this, when no handler can reach it.
    }
}

/// Counts a handler in or out as if one were running on another thread
/// (for tests).
#[cfg(test)]
pub(crate) fn pretend_handler_running(running: bool) {
    if running {
        RUNNING.fetch_add(1, Ordering::SeqCst);
    } else {
        RUNNING.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Sends `signum` to this thread (for tests).
#[cfg(test)]
pub(crate) fn raise(signum: i32) {
    // SAFETY: raise(3) with a valid signal number has no memory effects.
    unsafe {
        libc::raise(signum);
    }
}
