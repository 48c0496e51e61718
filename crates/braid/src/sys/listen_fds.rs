//! Taking the listening sockets a service manager passed at start-up
//! (systemd's socket activation: `LISTEN_PID`, `LISTEN_FDS`, descriptors
//! from 3 on). Here because turning an inherited descriptor number into an
//! owned descriptor is `unsafe`: only the protocol says nobody else owns it.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// The first descriptor passed (`SD_LISTEN_FDS_START`).
const FIRST: RawFd = 3;

/// The descriptors passed to this process, taken once: the variables are
/// removed, so a second call (or a child process) finds none. Empty when
/// the variables are absent or name another process.
pub(crate) fn take() -> Result<Vec<OwnedFd>, String> {
    Ok(take_named()?.into_iter().map(|(fd, _)| fd).collect())
}

/// Like [`take`], with each descriptor's name from `LISTEN_FDNAMES` (`""`
/// where none was given).
pub(crate) fn take_named() -> Result<Vec<(OwnedFd, String)>, String> {
    let (Ok(pid), Ok(count)) = (std::env::var("LISTEN_PID"), std::env::var("LISTEN_FDS")) else {
        return Ok(Vec::new());
    };
    let pid: u32 = pid.trim().parse().map_err(|_| format!("LISTEN_PID={pid:?} is not a process id"))?;
    if pid != std::process::id() {
        return Ok(Vec::new());
    }
    let count: RawFd = count
        .trim()
        .parse()
        .ok()
        .filter(|n| (0..=4096).contains(n))
        .ok_or_else(|| format!("LISTEN_FDS={count:?} is not a descriptor count"))?;
    let names: Vec<String> = std::env::var("LISTEN_FDNAMES")
        .map(|n| n.split(':').map(str::to_owned).collect())
        .unwrap_or_default();
    std::env::remove_var("LISTEN_PID");
    std::env::remove_var("LISTEN_FDS");
    std::env::remove_var("LISTEN_FDNAMES");
    let mut fds = Vec::new();
    for fd in FIRST..FIRST + count {
        // A number that is not open was never passed: refuse rather than
        // own whatever gets that number later.
        // Nor one that is not a socket: something else opened that number
        // (the variables were stale, or read after the process opened
        // files of its own).
        match rustix::fs::fstat(borrow_number(fd)) {
            Err(_) => return Err(format!("LISTEN_FDS names descriptor {fd}, which is not open")),
            Ok(st) if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::Socket => {
                return Err(format!("LISTEN_FDS names descriptor {fd}, which is not a socket"));
            }
            Ok(_) => {}
        }
        // SAFETY: the socket-activation protocol hands descriptors
        // FIRST..FIRST+count to this process (LISTEN_PID is ours) for it
        // to own; the variables were just removed, so no later call takes
        // them again, and `fd` was checked to be open.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let _ = rustix::io::fcntl_setfd(&owned, rustix::io::FdFlags::CLOEXEC);
        let name = names.get((fd - FIRST) as usize).cloned().unwrap_or_default();
        fds.push((owned, name));
    }
    Ok(fds)
}

fn borrow_number(fd: RawFd) -> std::os::fd::BorrowedFd<'static> {
    // SAFETY: only used for `fstat`, which reports EBADF for a number that
    // is not open and touches nothing else; the borrow ends with that call.
    unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }
}
