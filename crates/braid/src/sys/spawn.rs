//! Starting a child process: `posix_spawn` where it can do the job, else
//! `fork`, then in the child only async-signal-safe calls (`dup2`, `close`, `chdir`, `setsid`, the
//! id changes, `execve`, `_exit`) on memory prepared before the fork.
//!
//! The child sees exactly the descriptors it was given: each mapped source
//! is first copied above every number in play (so crossed mappings cannot
//! clobber each other), then moved to its place; everything else is
//! closed (`close_range`, or one `close` per number where the kernel lacks
//! it). Whether `execve` worked comes back through a close-on-exec pipe:
//! end of file means the program is running, four bytes are the `errno`
//! of the failed exec (the child is then reaped here, so a failed spawn
//! never leaves a zombie).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Everything the child needs, built before the fork (the child must not
/// allocate).
pub(crate) struct SpawnPlan {
    /// The program to execute: a path (searched for on `PATH` beforehand).
    pub program: CString,
    /// The argument vector, `argv[0]` included.
    pub argv: Vec<CString>,
    /// The whole environment, as `NAME=value`.
    pub env: Vec<CString>,
    /// The working directory, if it changes.
    pub dir: Option<CString>,
    /// `(child fd, parent fd)`: what each of the child's descriptors is.
    pub fds: Vec<(RawFd, RawFd)>,
    /// Start a new session and make descriptor 0 its controlling terminal
    /// (for a pseudo-terminal).
    pub new_session_tty: bool,
    /// Group and user ids to switch to (group first).
    pub gid: Option<u32>,
    /// See `gid`.
    pub uid: Option<u32>,
}

fn last_errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)
}

/// Starts `plan`: with `posix_spawn` (glibc's is a `vfork`-style clone,
/// cheap whatever the parent's size) when no id or session change is
/// asked for, else with [`fork_exec`]. Returns the child's pid once the
/// program runs, or the exec's error (the child already reaped).
pub(crate) fn spawn(plan: &SpawnPlan, allow_posix_spawn: bool) -> io::Result<i32> {
    if allow_posix_spawn && plan.uid.is_none() && plan.gid.is_none() && !plan.new_session_tty {
        posix_spawn(plan)
    } else {
        fork_exec(plan)
    }
}

/// `posix_spawn` with file actions that build the descriptor map (through
/// slots above every number in play, for crossed mappings), close the
/// rest (`closefrom`), set the directory, an empty signal mask and
/// SIGPIPE's default disposition.
fn posix_spawn(plan: &SpawnPlan) -> io::Result<i32> {
    let mut argv: Vec<*mut libc::c_char> = plan.argv.iter().map(|a| a.as_ptr() as *mut _).collect();
    argv.push(std::ptr::null_mut());
    let mut envp: Vec<*mut libc::c_char> = plan.env.iter().map(|e| e.as_ptr() as *mut _).collect();
    envp.push(std::ptr::null_mut());
    let highest = plan.fds.iter().map(|&(c, p)| c.max(p)).max().unwrap_or(2).max(2);
    let check = |rc: libc::c_int| if rc == 0 { Ok(()) } else { Err(io::Error::from_raw_os_error(rc)) };
    // SAFETY: the file actions and attributes are initialised before use
    // and destroyed on every path; each call gets pointers to them and to
    // NUL-terminated strings and arrays that outlive the call; the
    // descriptors named are plain integers the child acts on.
    unsafe {
        let mut actions: libc::posix_spawn_file_actions_t = std::mem::zeroed();
        let mut attr: libc::posix_spawnattr_t = std::mem::zeroed();
        check(libc::posix_spawn_file_actions_init(&mut actions))?;
        if let Err(e) = check(libc::posix_spawnattr_init(&mut attr)) {
            libc::posix_spawn_file_actions_destroy(&mut actions);
            return Err(e);
        }
        let result = (|| {
            let scratch = highest + 1;
            for (i, &(_, source)) in plan.fds.iter().enumerate() {
                check(libc::posix_spawn_file_actions_adddup2(&mut actions, source, scratch + i as RawFd))?;
            }
            for (i, &(target, _)) in plan.fds.iter().enumerate() {
                check(libc::posix_spawn_file_actions_adddup2(&mut actions, scratch + i as RawFd, target))?;
            }
            for fd in 0..=highest {
                if !plan.fds.iter().any(|&(c, _)| c == fd) {
                    check(libc::posix_spawn_file_actions_addclose(&mut actions, fd))?;
                }
            }
            check(libc::posix_spawn_file_actions_addclosefrom_np(&mut actions, highest + 1))?;
            if let Some(dir) = &plan.dir {
                check(libc::posix_spawn_file_actions_addchdir_np(&mut actions, dir.as_ptr()))?;
            }
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            let mut pipe_only: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut pipe_only);
            libc::sigaddset(&mut pipe_only, libc::SIGPIPE);
            check(libc::posix_spawnattr_setsigmask(&mut attr, &none))?;
            check(libc::posix_spawnattr_setsigdefault(&mut attr, &pipe_only))?;
            let flags = libc::POSIX_SPAWN_SETSIGMASK | libc::POSIX_SPAWN_SETSIGDEF;
            check(libc::posix_spawnattr_setflags(&mut attr, flags as libc::c_short))?;
            let mut pid = 0;
            check(libc::posix_spawn(
                &mut pid,
                plan.program.as_ptr(),
                &actions,
                &attr,
                argv.as_ptr(),
                envp.as_ptr(),
            ))?;
            Ok(pid)
        })();
        libc::posix_spawn_file_actions_destroy(&mut actions);
        libc::posix_spawnattr_destroy(&mut attr);
        result
    }
}

/// Forks and executes `plan`. Returns the child's pid once `execve`
/// succeeded, or the exec's error (the child already reaped).
fn fork_exec(plan: &SpawnPlan) -> io::Result<i32> {
    let mut argv: Vec<*const libc::c_char> = plan.argv.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = plan.env.iter().map(|e| e.as_ptr()).collect();
    envp.push(std::ptr::null());
    let highest = plan.fds.iter().map(|&(c, p)| c.max(p)).max().unwrap_or(2).max(2);

    // The report pipe: its write end sits above every descriptor the child
    // will use, so the moves below never touch it.
    let mut ends = [0; 2];
    // SAFETY: `ends` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(ends.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both descriptors are open and ours.
    let (report_r, report_w0) = unsafe { (OwnedFd::from_raw_fd(ends[0]), OwnedFd::from_raw_fd(ends[1])) };
    // SAFETY: F_DUPFD_CLOEXEC on an open descriptor; the result is checked.
    let moved = unsafe { libc::fcntl(report_w0.as_raw_fd(), libc::F_DUPFD_CLOEXEC, highest + 1) };
    if moved < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fcntl returned a new descriptor that we own.
    let report_w = unsafe { OwnedFd::from_raw_fd(moved) };
    drop(report_w0);
    let report = report_w.as_raw_fd();
    let scratch = report + 1;
    // Bounds the fallback close loop (for kernels without close_range).
    // SAFETY: sysconf has no preconditions.
    let open_max = unsafe { libc::sysconf(libc::_SC_OPEN_MAX) }.clamp(1024, 1 << 20) as RawFd;

    // SAFETY: fork has no preconditions. In the child, only the code in
    // `child` runs, which calls async-signal-safe functions only, on data
    // prepared above, and never returns.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: we are the child of a fork: see `child`'s contract.
        unsafe { child(plan, &argv, &envp, report, scratch, highest, open_max) }
    }
    drop(report_w);
    let mut buf = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        // SAFETY: reads into the unfilled tail of `buf` from a descriptor
        // we own.
        let n = unsafe { libc::read(report_r.as_raw_fd(), buf[got..].as_mut_ptr().cast(), 4 - got) };
        if n < 0 && last_errno() == libc::EINTR {
            continue;
        }
        if n <= 0 {
            break;
        }
        got += n as usize;
    }
    if got == 4 {
        let mut status = 0;
        // SAFETY: waits for our own child, which is exiting.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        return Err(io::Error::from_raw_os_error(i32::from_ne_bytes(buf)));
    }
    Ok(pid)
}

/// The child between `fork` and `execve`.
///
/// # Safety
/// Must run only in a freshly forked child. It calls only async-signal-safe
/// functions, reads only memory set up before the fork, and ends in
/// `execve` or `_exit`.
unsafe fn child(
    plan: &SpawnPlan,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
    report: RawFd,
    scratch: RawFd,
    highest: RawFd,
    open_max: RawFd,
) -> ! {
    let fail = |report: RawFd| -> ! {
        let e = last_errno().to_ne_bytes();
        // SAFETY: write and _exit are async-signal-safe; `e` is on our stack.
        unsafe {
            libc::write(report, e.as_ptr().cast(), 4);
            libc::_exit(127)
        }
    };
    // SAFETY: each call below is async-signal-safe and takes only plain
    // integers or pointers into memory prepared before the fork.
    unsafe {
        // Signals: an empty mask, and SIGPIPE back to its default (Rust
        // ignores it, and an ignored signal stays ignored across exec).
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::pthread_sigmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);

        // Copy every source above the numbers in play, then move each into
        // place (dup2 clears close-on-exec on the target).
        let mut temps = [0 as RawFd; 64];
        let n = plan.fds.len().min(temps.len());
        for (temp, &(_, source)) in temps.iter_mut().zip(&plan.fds[..n]) {
            *temp = libc::fcntl(source, libc::F_DUPFD, scratch);
            if *temp < 0 {
                fail(report);
            }
        }
        for (&temp, &(target, _)) in temps.iter().zip(&plan.fds[..n]) {
            if libc::dup2(temp, target) < 0 {
                fail(report);
            }
        }
        // Close what the child was not given.
        for fd in 0..=highest {
            if !plan.fds[..n].iter().any(|&(c, _)| c == fd) {
                libc::close(fd);
            }
        }
        for (lo, hi) in [(highest + 1, report - 1), (report + 1, RawFd::MAX)] {
            if lo > hi {
                continue;
            }
            if libc::syscall(libc::SYS_close_range, lo as libc::c_uint, hi as libc::c_uint, 0) != 0 {
                for fd in lo..=hi.min(open_max) {
                    libc::close(fd);
                }
            }
        }
        if plan.new_session_tty && (libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0) {
            fail(report);
        }
        if let Some(dir) = &plan.dir {
            if libc::chdir(dir.as_ptr()) != 0 {
                fail(report);
            }
        }
        if let Some(gid) = plan.gid {
            if libc::geteuid() == 0 && libc::setgroups(1, &gid) != 0 {
                fail(report);
            }
            if libc::setgid(gid) != 0 {
                fail(report);
            }
        }
        if let Some(uid) = plan.uid {
            if libc::setuid(uid) != 0 {
                fail(report);
            }
        }
        libc::execve(plan.program.as_ptr(), argv.as_ptr(), envp.as_ptr());
        fail(report)
    }
}

/// Sends `sig` to process `pid`.
pub(crate) fn kill(pid: i32, sig: i32) -> io::Result<()> {
    // SAFETY: kill takes plain integers; a bad pid or signal is an error.
    if unsafe { libc::kill(pid, sig) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A signal's number from its name ("TERM", "SIGTERM"), as `kill -l` knows them.
pub(crate) fn signal_number(name: &str) -> Option<i32> {
    let name = name.strip_prefix("SIG").unwrap_or(name);
    let table = [
        ("HUP", libc::SIGHUP),
        ("INT", libc::SIGINT),
        ("QUIT", libc::SIGQUIT),
        ("KILL", libc::SIGKILL),
        ("USR1", libc::SIGUSR1),
        ("USR2", libc::SIGUSR2),
        ("PIPE", libc::SIGPIPE),
        ("ALRM", libc::SIGALRM),
        ("TERM", libc::SIGTERM),
        ("CONT", libc::SIGCONT),
        ("STOP", libc::SIGSTOP),
        ("TSTP", libc::SIGTSTP),
        ("WINCH", libc::SIGWINCH),
    ];
    table.iter().find(|(n, _)| *n == name).map(|&(_, s)| s)
}

/// A new pseudo-terminal: `(master, slave)`, both close-on-exec, the
/// master non-blocking.
pub(crate) fn open_pty() -> io::Result<(OwnedFd, OwnedFd)> {
    // SAFETY: posix_openpt takes flags; the result is checked.
    let m = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if m < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: posix_openpt returned a descriptor we own.
    let master = unsafe { OwnedFd::from_raw_fd(m) };
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: `master` is an open pty master; ptsname_r writes at most
    // `name.len()` bytes, NUL included.
    let ok = unsafe {
        libc::grantpt(m) == 0
            && libc::unlockpt(m) == 0
            && libc::ptsname_r(m, name.as_mut_ptr(), name.len()) == 0
    };
    if !ok {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: ptsname_r wrote a NUL-terminated path into `name`.
    let s = unsafe { libc::open(name.as_ptr(), libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if s < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: open returned a descriptor we own.
    let slave = unsafe { OwnedFd::from_raw_fd(s) };
    rustix::io::ioctl_fionbio(&master, true)?;
    Ok((master, slave))
}

/// Sets a terminal's window size (`TIOCSWINSZ`).
pub(crate) fn set_window_size(fd: &OwnedFd, rows: u16, cols: u16) -> io::Result<()> {
    let ws = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCSWINSZ reads one `winsize` from the pointer, which is
    // valid for the call; the descriptor is borrowed.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
