//! Process signal handlers for SIGINT, SIGTERM and SIGCHLD.
//!
//! Signal dispositions are process-wide, but reactors are per thread, so the
//! handler fans out: every reactor that installed handlers owns a slot with
//! its wake-up descriptor and a bitmask of pending signals. The handler only
//! does async-signal-safe work: an atomic OR and a `write(2)` per slot. The
//! reactor then sees its waker readable and reads the mask.
//!
//! The first installer saves the previous dispositions; the last one to
//! leave restores them, so `run()` returning leaves the process as it was.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::Mutex;

/// How many reactors can hold signal handlers at once.
const SLOTS: usize = 64;

#[allow(clippy::declare_interior_mutable_const)]
const NO_FD: AtomicI32 = AtomicI32::new(-1);
#[allow(clippy::declare_interior_mutable_const)]
const NO_SIGNALS: AtomicU64 = AtomicU64::new(0);

static WAKE_FDS: [AtomicI32; SLOTS] = [NO_FD; SLOTS];
static PENDING: [AtomicU64; SLOTS] = [NO_SIGNALS; SLOTS];

/// The signals braid handles.
pub(crate) const HANDLED: [i32; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGCHLD];

struct Saved {
    users: usize,
    /// Previous disposition of each signal in `HANDLED`, `None` where we
    /// left the signal alone (SIGINT/SIGTERM that were being ignored).
    old: [Option<libc::sigaction>; 3],
}

// SAFETY: `libc::sigaction` is plain old data (a function pointer, flags and
// a signal mask); moving it between threads is sound.
unsafe impl Send for Saved {}

static SAVED: Mutex<Saved> = Mutex::new(Saved { users: 0, old: [None, None, None] });

extern "C" fn on_signal(signum: libc::c_int) {
    let saved_errno = errno_get();
    let bit = 1u64 << (signum as u64 & 63);
    for (slot, fd_cell) in WAKE_FDS.iter().enumerate() {
        let fd = fd_cell.load(Ordering::Acquire);
        if fd < 0 {
            continue;
        }
        PENDING[slot].fetch_or(bit, Ordering::AcqRel);
        let one = 1u64.to_ne_bytes();
        // SAFETY: write(2) is async-signal-safe; the buffer is a live local of
        // the given length. A stale or full fd only makes write fail, which
        // is fine: the pending bit is already set.
        unsafe {
            libc::write(fd, one.as_ptr().cast(), one.len());
        }
    }
    errno_set(saved_errno);
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn errno_get() -> libc::c_int {
    // SAFETY: __errno_location returns this thread's errno slot, always valid.
    unsafe { *libc::__errno_location() }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn errno_set(value: libc::c_int) {
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = value }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn errno_get() -> libc::c_int {
    0
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn errno_set(_value: libc::c_int) {}

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
}

impl SignalGuard {
    /// Installs the handlers (first user) and takes a slot that wakes `wake_fd`.
    pub fn install(wake_fd: RawFd) -> io::Result<SignalGuard> {
        let mut saved = SAVED.lock().unwrap_or_else(|e| e.into_inner());
        let slot = WAKE_FDS
            .iter()
            .position(|cell| cell.compare_exchange(-1, wake_fd, Ordering::AcqRel, Ordering::Acquire).is_ok())
            .ok_or_else(|| io::Error::other("too many reactors with signal handlers in this process"))?;
        PENDING[slot].store(0, Ordering::Release);
        if saved.users == 0 {
            for (i, &signum) in HANDLED.iter().enumerate() {
                let old = match current_action(signum) {
                    Ok(old) => old,
                    Err(e) => {
                        WAKE_FDS[slot].store(-1, Ordering::Release);
                        restore(&mut saved.old);
                        return Err(e);
                    }
                };
                // A shell starts background jobs with SIGINT ignored; leave
                // such a choice alone, as Twisted leaves custom handlers.
                if signum != libc::SIGCHLD && old.sa_sigaction == libc::SIG_IGN {
                    continue;
                }
                if let Err(e) = set_action(signum, &our_action(signum)) {
                    WAKE_FDS[slot].store(-1, Ordering::Release);
                    restore(&mut saved.old);
                    return Err(e);
                }
                saved.old[i] = Some(old);
            }
        }
        saved.users += 1;
        Ok(SignalGuard { slot })
    }

    /// Takes the signals delivered since the last call, as a bitmask of
    /// `1 << signum`.
    pub fn take_pending(&self) -> u64 {
        PENDING[self.slot].swap(0, Ordering::AcqRel)
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
        WAKE_FDS[self.slot].store(-1, Ordering::Release);
        PENDING[self.slot].store(0, Ordering::Release);
        saved.users -= 1;
        if saved.users == 0 {
            restore(&mut saved.old);
        }
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
