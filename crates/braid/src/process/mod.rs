//! Child processes (Twisted's `IReactorProcess.spawnProcess`,
//! `ProcessProtocol`, `IProcessTransport`).
//!
//! [`Reactor::spawn_process`] starts a program described by a [`Command`]
//! and hands its [`ProcessProtocol`] a [`ProcessTransport`]. Each pipe to
//! the child is a stream connection of the pipe kind (the same buffering,
//! producers and exactly-once close as a socket); a pseudo-terminal is one
//! connection on its master.
//!
//! # Order of calls
//! `connection_made`, then as they happen `child_data_received` and
//! `child_connection_lost` for each descriptor, and `process_exited` as
//! soon as the child has exited (even if a grandchild still holds its
//! pipes); `process_ended` comes last, once the child has exited **and**
//! every pipe has closed. The reason is [`Error::ProcessDone`] for exit
//! status 0, otherwise [`Error::ProcessTerminated`] with the status or the
//! signal.
//!
//! # Reaping
//! Each child is waited for by pid, never with `waitpid(-1)`, so children
//! other code in the process started are left alone. On Linux 5.3 and
//! later a pidfd is watched like any descriptor: nothing else is needed,
//! not even signal handlers. Elsewhere (`ENOSYS`) the reactor's SIGCHLD
//! hook looks at each of its children, and while any is waited for this
//! way a timer looks too (every 100 ms), so the fallback also works under
//! `run_without_signal_handlers`, only slower. A reactor that stops or is
//! dropped while children run leaves them running, as Twisted does; they
//! are not killed, and whoever waits for them next reaps them.
//!
//! # Spawning
//! Without a user, group or terminal to set up, the child is started with
//! `posix_spawn` (a `vfork`-style clone in glibc: cheap for a large parent);
//! otherwise it is forked and, before `execve`, only async-signal-safe calls
//! run in it. It gets exactly the descriptors its [`Command`] maps for it
//! (every other one is closed), an empty signal mask and `SIGPIPE` back to
//! its default. A program that cannot be found or executed is an error
//! from `spawn_process` itself ([`Error::SpawnFailed`], naming it), and the
//! protocol hears the same reason in `process_ended`, its only call (it is
//! never connected); no zombie is left behind.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::ffi::{CString, OsStr, OsString};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use crate::error::{Error, Failure};
use crate::protocol::Protocol;
use crate::reactor::{catch_panic, log_failure, FileDescriptor, Reactor, WeakReactor};
use crate::stream::connection::Connection;
use crate::stream::pipe::{PipeReader, PipeWriter, PtyMaster};
use crate::stream::Address;
use crate::sys::spawn::{self, SpawnPlan};
use crate::transport::{Producer, Transport};

/// What the parent does with one of the child's descriptors (Twisted's
/// `childFDs` values).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChildFd {
    /// The parent writes, the child reads (Twisted's `"w"`): stdin.
    ToChild,
    /// The child writes, the parent reads (Twisted's `"r"`): stdout, stderr.
    FromChild,
    /// The child gets a copy of this parent descriptor.
    Inherit(RawFd),
}

/// What to run and how (Twisted's `spawnProcess` arguments).
#[derive(Clone, Debug)]
pub struct Command {
    program: OsString,
    arg0: Option<OsString>,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    inherit_env: bool,
    dir: Option<PathBuf>,
    fds: BTreeMap<RawFd, ChildFd>,
    uid: Option<u32>,
    gid: Option<u32>,
    pty: bool,
}

impl Command {
    /// Runs `program`: a path, or a name looked up on the parent's `PATH`.
    /// By default, as in Twisted: no arguments, an **empty** environment
    /// (see [`inherit_env`](Command::inherit_env)), this working directory,
    /// and descriptors 0 (written by us), 1 and 2 (read by us).
    pub fn new(program: impl AsRef<OsStr>) -> Command {
        let fds = [(0, ChildFd::ToChild), (1, ChildFd::FromChild), (2, ChildFd::FromChild)].into();
        Command {
            program: program.as_ref().to_owned(),
            arg0: None,
            args: Vec::new(),
            env: Vec::new(),
            inherit_env: false,
            dir: None,
            fds,
            uid: None,
            gid: None,
            pty: false,
        }
    }

    /// Adds one argument (after `argv[0]`).
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Command {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    /// Adds arguments.
    pub fn args<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(mut self, args: I) -> Command {
        self.args.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Sets `argv[0]` (default: the program as given).
    pub fn arg0(mut self, arg0: impl AsRef<OsStr>) -> Command {
        self.arg0 = Some(arg0.as_ref().to_owned());
        self
    }

    /// Sets one environment variable for the child.
    pub fn env(mut self, name: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Command {
        self.env.push((name.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// Starts from this process's environment (Twisted's `env=None`);
    /// [`env`](Command::env) entries then add to or override it.
    pub fn inherit_env(mut self) -> Command {
        self.inherit_env = true;
        self
    }

    /// The child's working directory.
    pub fn current_dir(mut self, dir: impl AsRef<Path>) -> Command {
        self.dir = Some(dir.as_ref().to_owned());
        self
    }

    /// Replaces the descriptor map (Twisted's `childFDs`): only these
    /// descriptors exist in the child.
    pub fn child_fds(mut self, fds: impl IntoIterator<Item = (RawFd, ChildFd)>) -> Command {
        self.fds = fds.into_iter().collect();
        self
    }

    /// Runs the child as this user (needs privilege).
    pub fn uid(mut self, uid: u32) -> Command {
        self.uid = Some(uid);
        self
    }

    /// Runs the child in this group (needs privilege).
    pub fn gid(mut self, gid: u32) -> Command {
        self.gid = Some(gid);
        self
    }

    /// Gives the child a pseudo-terminal as descriptors 0, 1 and 2 (in a
    /// new session, as its controlling terminal) instead of pipes; the
    /// descriptor map is ignored. Output arrives as descriptor 1.
    pub fn pty(mut self, on: bool) -> Command {
        self.pty = on;
        self
    }

    fn failed(&self, source: std::io::Error) -> Error {
        Error::SpawnFailed { program: self.program.to_string_lossy().into_owned(), source }
    }

    /// The program's path: as given if it names a directory, else the first
    /// executable match on `PATH`.
    fn resolve(&self) -> Result<PathBuf, Error> {
        let program = Path::new(&self.program);
        if self.program.as_bytes().contains(&b'/') {
            return Ok(program.to_owned());
        }
        let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
        std::env::split_paths(&path)
            .map(|dir| dir.join(program))
            .find(|p| {
                use std::os::unix::fs::PermissionsExt;
                p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            })
            .ok_or_else(|| {
                self.failed(std::io::Error::new(std::io::ErrorKind::NotFound, "not found on PATH"))
            })
    }
}

fn cstring(bytes: &[u8], what: &Command) -> Result<CString, Error> {
    CString::new(bytes)
        .map_err(|_| what.failed(std::io::Error::new(std::io::ErrorKind::InvalidInput, "a NUL byte")))
}

/// What a child process's owner is told (Twisted's `ProcessProtocol`).
/// Calls come from the reactor loop, one at a time.
pub trait ProcessProtocol {
    /// The child is running; keep `transport` to write to it and signal it.
    fn connection_made(&mut self, transport: ProcessTransport) {
        let _ = transport;
    }

    /// The child wrote `data` on descriptor `fd`. The default sends
    /// descriptor 1 to `out_received` and 2 to `err_received`.
    fn child_data_received(&mut self, fd: RawFd, data: &[u8]) {
        match fd {
            1 => self.out_received(data),
            2 => self.err_received(data),
            _ => {}
        }
    }

    /// Output on the child's stdout.
    fn out_received(&mut self, data: &[u8]) {
        let _ = data;
    }

    /// Output on the child's stderr.
    fn err_received(&mut self, data: &[u8]) {
        let _ = data;
    }

    /// Our end of the child's descriptor `fd` closed. The default calls
    /// `in_`, `out_` or `err_connection_lost` for 0, 1 and 2.
    fn child_connection_lost(&mut self, fd: RawFd) {
        match fd {
            0 => self.in_connection_lost(),
            1 => self.out_connection_lost(),
            2 => self.err_connection_lost(),
            _ => {}
        }
    }

    /// The child's stdin is closed.
    fn in_connection_lost(&mut self) {}

    /// The child's stdout is closed.
    fn out_connection_lost(&mut self) {}

    /// The child's stderr is closed.
    fn err_connection_lost(&mut self) {}

    /// The child exited (its pipes may still be open).
    fn process_exited(&mut self, reason: Failure) {
        let _ = reason;
    }

    /// The child exited and every pipe to it has closed: the last call.
    fn process_ended(&mut self, reason: Failure) {
        let _ = reason;
    }
}

/// Where a process is in its life.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Life {
    Running,
    /// Reaped; some pipes may still be open.
    Exited,
    /// `process_ended` was delivered.
    Ended,
}

/// One pipe's parent end.
#[derive(Clone)]
enum End {
    /// We write (stdin, or another `ToChild` descriptor).
    Writer(Transport),
    /// We read.
    Reader(Transport),
    /// A pseudo-terminal master: both.
    Pty(Transport),
}

impl End {
    fn transport(&self) -> &Transport {
        match self {
            End::Writer(t) | End::Reader(t) | End::Pty(t) => t,
        }
    }
}

struct Process {
    pid: i32,
    name: String,
    protocol: RefCell<Option<Box<dyn ProcessProtocol>>>,
    ends: RefCell<BTreeMap<RawFd, End>>,
    life: Cell<Life>,
    reason: RefCell<Option<Failure>>,
    /// A copy of the pty master, for window-size changes.
    pty: Option<OwnedFd>,
}

impl Process {
    fn call(&self, what: &str, f: impl FnOnce(&mut dyn ProcessProtocol)) {
        let result = catch_panic(|| match self.protocol.try_borrow_mut() {
            Ok(mut p) => {
                if let Some(p) = p.as_mut() {
                    f(&mut **p);
                }
                Ok(())
            }
            Err(_) => Err(Failure::msg("the process protocol is busy in another callback")),
        });
        if let Err(failure) = result {
            log_failure(&format!("in {what} for process {} ({})", self.pid, self.name), &failure);
        }
    }

    fn end_closed(self: &Rc<Self>, fd: RawFd) {
        if self.ends.borrow_mut().remove(&fd).is_none() {
            return;
        }
        self.call("child_connection_lost", |p| p.child_connection_lost(fd));
        self.maybe_ended();
    }

    fn exited(self: &Rc<Self>, status: Exit) {
        if self.life.get() != Life::Running {
            return;
        }
        let reason = match status {
            Exit::Code(0) => Error::ProcessDone,
            Exit::Code(code) => Error::ProcessTerminated { exit_code: Some(code), signal: None },
            Exit::Signal(sig) => Error::ProcessTerminated { exit_code: None, signal: Some(sig) },
            Exit::Unknown => Error::ProcessTerminated { exit_code: None, signal: None },
        };
        self.life.set(Life::Exited);
        let failure = Failure::new(reason);
        *self.reason.borrow_mut() = Some(failure.clone());
        tracing::debug!(target: "braid", "process {} ({}) exited: {failure}", self.pid, self.name);
        self.call("process_exited", |p| p.process_exited(failure));
        self.maybe_ended();
    }

    fn maybe_ended(self: &Rc<Self>) {
        if self.life.get() != Life::Exited || !self.ends.borrow().is_empty() {
            return;
        }
        self.life.set(Life::Ended);
        let reason = self.reason.borrow().clone().unwrap_or_else(|| Failure::new(Error::ProcessDone));
        self.call("process_ended", |p| p.process_ended(reason));
        // The last call: dropping the protocol breaks the cycle through the
        // transport it keeps.
        drop(self.protocol.borrow_mut().take());
    }
}

/// Relays one pipe's events to the process's protocol.
struct EndProtocol {
    process: Rc<Process>,
    fd: RawFd,
}

impl Protocol for EndProtocol {
    fn data_received(&mut self, data: &[u8]) {
        let fd = self.fd;
        self.process.call("child_data_received", |p| p.child_data_received(fd, data));
    }

    fn connection_lost(&mut self, _reason: Failure) {
        self.process.end_closed(self.fd);
    }
}

/// Watches a pidfd: readable once the child has exited.
struct PidWatch {
    me: std::rc::Weak<PidWatch>,
    pidfd: RefCell<Option<OwnedFd>>,
    fd: RawFd,
    process: RefCell<Option<Rc<Process>>>,
    reactor: WeakReactor,
    held: Cell<Option<usize>>,
}

impl PidWatch {
    fn finish(&self) {
        drop(self.pidfd.borrow_mut().take());
        drop(self.process.borrow_mut().take());
        if let (Some(key), Some(r)) = (self.held.take(), self.reactor.get()) {
            r.release(key);
        }
    }
}

impl FileDescriptor for PidWatch {
    fn fileno(&self) -> RawFd {
        if self.pidfd.borrow().is_some() {
            self.fd
        } else {
            -1
        }
    }

    fn do_read(&self) -> Result<(), Failure> {
        let Some(process) = self.process.borrow().clone() else { return Ok(()) };
        if let Some(status) = try_reap(process.pid) {
            // Unwatch first: the process must be out of the reaper's hands
            // before `process_ended` runs (Twisted's order).
            if let (Some(r), Some(me)) = (self.reactor.get(), self.me.upgrade()) {
                r.remove_reader(&me);
            }
            self.finish();
            process.exited(status);
        }
        Ok(())
    }

    fn connection_lost(&self, _reason: Failure) {
        self.finish();
    }

    fn log_prefix(&self) -> String {
        format!("pidfd {}", self.fd)
    }
}

/// How a child ended.
#[derive(Clone, Copy, Debug)]
enum Exit {
    Code(i32),
    Signal(i32),
    /// Someone else reaped it (`ECHILD`): the status is lost.
    Unknown,
}

/// `waitpid(pid, WNOHANG)`: how the child ended, once it has.
fn try_reap(pid: i32) -> Option<Exit> {
    let pid = rustix::process::Pid::from_raw(pid)?;
    loop {
        match rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::NOHANG) {
            Ok(Some((_, status))) => {
                if let Some(code) = status.exit_status() {
                    return Some(Exit::Code(code));
                }
                if let Some(sig) = status.terminating_signal() {
                    return Some(Exit::Signal(sig));
                }
                return None;
            }
            Ok(None) => return None,
            Err(rustix::io::Errno::INTR) => continue,
            Err(_) => return Some(Exit::Unknown),
        }
    }
}

/// The fallback reaper's list, for kernels without pidfds.
#[derive(Default)]
struct Reaper {
    children: RefCell<Vec<Rc<Process>>>,
    hooked: Cell<bool>,
    polling: Cell<bool>,
}

impl Reaper {
    fn reap_all(&self) {
        let waiting: Vec<Rc<Process>> = self.children.borrow().clone();
        for p in waiting {
            if let Some(status) = try_reap(p.pid) {
                self.children.borrow_mut().retain(|c| !Rc::ptr_eq(c, &p));
                p.exited(status);
            }
        }
    }
}

fn poll_children(reactor: &Reactor) {
    let reaper = reactor.extension::<Reaper>();
    reaper.reap_all();
    if reaper.children.borrow().is_empty() {
        reaper.polling.set(false);
        return;
    }
    let r = reactor.clone();
    reactor.call_later(Duration::from_millis(100), move || poll_children(&r));
}

/// `BRAID_SPAWN=fork` makes every spawn fork, so tests can hold both ways
/// of spawning to the same behaviour.
fn forced_fork() -> bool {
    std::env::var_os("BRAID_SPAWN").is_some_and(|v| v == "fork")
}

/// `BRAID_PIDFD=off` reaps as on a kernel without pidfds (for tests).
fn pidfds_disabled() -> bool {
    std::env::var_os("BRAID_PIDFD").is_some_and(|v| v == "off")
}

impl Reactor {
    /// Starts `command` as a child process and connects `protocol` to it
    /// (Twisted's `spawnProcess`). Returns its transport once the program
    /// is running; see the module docs for the order of calls. A program
    /// that cannot be found or executed, or a descriptor map that cannot be
    /// set up, is [`Error::SpawnFailed`].
    pub fn spawn_process(
        &self,
        protocol: impl ProcessProtocol + 'static,
        command: &Command,
    ) -> Result<ProcessTransport, Error> {
        let mut protocol = protocol;
        let (pid, pty_master, parents) = match start_child(command) {
            Ok(started) => started,
            Err(e) => {
                // The protocol hears it too, as its last (and only) call.
                let told = catch_panic(|| {
                    protocol.process_ended(Failure::new(copy_error(&e)));
                    Ok(())
                });
                if let Err(f) = told {
                    log_failure(&format!("in process_ended for {:?}", command.program), &f);
                }
                return Err(e);
            }
        };
        self.connect_child(protocol, command, pid, pty_master, parents)
    }
}

/// A second copy of a spawn error, for the protocol and the caller both.
fn copy_error(e: &Error) -> Error {
    match e {
        Error::SpawnFailed { program, source } => Error::SpawnFailed {
            program: program.clone(),
            source: source
                .raw_os_error()
                .map(std::io::Error::from_raw_os_error)
                .unwrap_or_else(|| std::io::Error::new(source.kind(), source.to_string())),
        },
        other => Error::io("spawning a process", std::io::Error::other(other.to_string())),
    }
}

/// The parent's ends of the child's pipes: child fd, direction, our end.
type ParentEnds = Vec<(RawFd, ChildFd, OwnedFd)>;

/// Builds everything the child needs and starts it: its pid, the pty
/// master if it has one, and our ends of its pipes.
fn start_child(command: &Command) -> Result<(i32, Option<OwnedFd>, ParentEnds), Error> {
    {
        let program = command.resolve()?;
        let arg0 = command.arg0.clone().unwrap_or_else(|| command.program.clone());
        let mut argv = vec![cstring(arg0.as_bytes(), command)?];
        for a in &command.args {
            argv.push(cstring(a.as_bytes(), command)?);
        }
        let mut env: Vec<(OsString, OsString)> =
            if command.inherit_env { std::env::vars_os().collect() } else { Vec::new() };
        for (k, v) in &command.env {
            env.retain(|(name, _)| name != k);
            env.push((k.clone(), v.clone()));
        }
        let env = env
            .iter()
            .map(|(k, v)| cstring(&[k.as_bytes(), b"=", v.as_bytes()].concat(), command))
            .collect::<Result<Vec<_>, _>>()?;
        let dir = command.dir.as_ref().map(|d| cstring(d.as_os_str().as_bytes(), command)).transpose()?;

        // The parent's ends (non-blocking) and the child's (blocking, closed
        // here once the child has its copies).
        let mut parents: ParentEnds = Vec::new();
        let mut childs: Vec<OwnedFd> = Vec::new();
        let mut map: Vec<(RawFd, RawFd)> = Vec::new();
        let mut pty_master = None;
        if command.pty {
            let (master, slave) = spawn::open_pty().map_err(|e| command.failed(e))?;
            for fd in 0..3 {
                map.push((fd, slave.as_raw_fd()));
            }
            childs.push(slave);
            pty_master = Some(master);
        } else {
            if command.fds.len() > 64 {
                return Err(command
                    .failed(std::io::Error::new(std::io::ErrorKind::InvalidInput, "over 64 descriptors")));
            }
            for (&child_fd, &how) in &command.fds {
                match how {
                    ChildFd::Inherit(parent) => map.push((child_fd, parent)),
                    ChildFd::ToChild | ChildFd::FromChild => {
                        let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
                            .map_err(|e| command.failed(e.into()))?;
                        let (ours, theirs) = if how == ChildFd::ToChild { (w, r) } else { (r, w) };
                        rustix::io::ioctl_fionbio(&ours, true).map_err(|e| command.failed(e.into()))?;
                        map.push((child_fd, theirs.as_raw_fd()));
                        childs.push(theirs);
                        parents.push((child_fd, how, ours));
                    }
                }
            }
        }
        let plan = SpawnPlan {
            program: cstring(program.as_os_str().as_bytes(), command)?,
            argv,
            env,
            dir,
            fds: map,
            new_session_tty: command.pty,
            gid: command.gid,
            uid: command.uid,
        };
        let pid = spawn::spawn(&plan, !forced_fork()).map_err(|e| command.failed(e))?;
        drop(childs);
        Ok((pid, pty_master, parents))
    }
}

impl Reactor {
    fn connect_child(
        &self,
        protocol: impl ProcessProtocol + 'static,
        command: &Command,
        pid: i32,
        pty_master: Option<OwnedFd>,
        parents: ParentEnds,
    ) -> Result<ProcessTransport, Error> {
        let pty_copy = pty_master.as_ref().and_then(|m| m.try_clone().ok());
        let process = Rc::new(Process {
            pid,
            name: command.program.to_string_lossy().into_owned(),
            protocol: RefCell::new(None),
            ends: RefCell::new(BTreeMap::new()),
            life: Cell::new(Life::Running),
            reason: RefCell::new(None),
            pty: pty_copy,
        });
        tracing::debug!(target: "braid", "started process {pid} ({})", process.name);
        self.watch_child(&process);
        let mut started: Vec<(RawFd, Rc<dyn ConnectionStart>)> = Vec::new();
        if let Some(master) = pty_master {
            let conn = Connection::new(self, PtyMaster::for_child(pid), master);
            process.ends.borrow_mut().insert(1, End::Pty(Transport::new(conn.clone())));
            started.push((1, conn));
        }
        for (fd, how, ours) in parents {
            if how == ChildFd::ToChild {
                let conn = Connection::new(self, PipeWriter::for_child(pid, fd), ours);
                process.ends.borrow_mut().insert(fd, End::Writer(Transport::new(conn.clone())));
                started.push((fd, conn));
            } else {
                let conn = Connection::new(self, PipeReader::for_child(pid, fd), ours);
                process.ends.borrow_mut().insert(fd, End::Reader(Transport::new(conn.clone())));
                started.push((fd, conn));
            }
        }
        let transport = ProcessTransport { process: process.clone() };
        *process.protocol.borrow_mut() = Some(Box::new(protocol));
        process.call("connection_made", |p| p.connection_made(transport.clone()));
        for (fd, conn) in started {
            let relay = Box::new(EndProtocol { process: process.clone(), fd });
            if let Err(e) = conn.start_boxed(relay) {
                tracing::error!(target: "braid", "process {pid}: cannot watch descriptor {fd}: {e}");
                process.end_closed(fd);
            }
        }
        Ok(transport)
    }

    fn watch_child(&self, process: &Rc<Process>) {
        let pidfd = if pidfds_disabled() {
            None
        } else {
            rustix::process::Pid::from_raw(process.pid)
                .and_then(|pid| rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::NONBLOCK).ok())
        };
        if let Some(pidfd) = pidfd {
            let fd = pidfd.as_raw_fd();
            let watch = Rc::new_cyclic(|me| PidWatch {
                me: me.clone(),
                pidfd: RefCell::new(Some(pidfd)),
                fd,
                process: RefCell::new(Some(process.clone())),
                reactor: self.weak(),
                held: Cell::new(None),
            });
            if self.add_reader(watch.clone()).is_ok() {
                watch.held.set(Some(self.hold(watch.clone())));
                return;
            }
        }
        let reaper = self.extension::<Reaper>();
        reaper.children.borrow_mut().push(process.clone());
        if !reaper.hooked.replace(true) {
            let r = self.weak();
            self.add_child_hook(move || {
                if let Some(r) = r.get() {
                    r.extension::<Reaper>().reap_all();
                }
            });
        }
        if !reaper.polling.replace(true) {
            let r = self.clone();
            self.call_later(Duration::from_millis(100), move || poll_children(&r));
        }
    }
}

/// Starting a pipe connection whatever its kind (internal).
trait ConnectionStart {
    fn start_boxed(self: Rc<Self>, protocol: Box<dyn Protocol>) -> Result<(), Error>;
}

impl<K: crate::stream::kind::Kind> ConnectionStart for Connection<K> {
    fn start_boxed(self: Rc<Self>, protocol: Box<dyn Protocol>) -> Result<(), Error> {
        self.start(protocol).map_err(|(e, _)| e)
    }
}

/// A signal for [`ProcessTransport::signal_process`]: a name (`"TERM"`,
/// `"SIGKILL"`) or a number.
pub trait IntoSignal {
    /// The signal number, or `None` for a name nobody knows.
    fn signal_number(&self) -> Option<i32>;
}

impl IntoSignal for &str {
    fn signal_number(&self) -> Option<i32> {
        spawn::signal_number(self)
    }
}

impl IntoSignal for i32 {
    fn signal_number(&self) -> Option<i32> {
        Some(*self)
    }
}

/// A child process, as its protocol and owner see it (Twisted's
/// `IProcessTransport`). Cheap to clone.
#[derive(Clone)]
pub struct ProcessTransport {
    process: Rc<Process>,
}

impl ProcessTransport {
    /// The child's process id, until `process_ended`.
    pub fn pid(&self) -> Option<i32> {
        (self.process.life.get() != Life::Ended).then_some(self.process.pid)
    }

    fn writer(&self, fd: RawFd) -> Result<Transport, Error> {
        match self.process.ends.borrow().get(&fd) {
            Some(End::Writer(t)) | Some(End::Pty(t)) => Ok(t.clone()),
            _ if fd == 0 => self
                .process
                .ends
                .borrow()
                .get(&1)
                .and_then(|e| match e {
                    End::Pty(t) => Some(t.clone()),
                    _ => None,
                })
                .ok_or(Error::NoSuchChildFd(fd)),
            _ => Err(Error::NoSuchChildFd(fd)),
        }
    }

    /// Writes to the child's stdin (buffered, never blocking). Dropped if
    /// stdin is closed.
    pub fn write(&self, data: &[u8]) {
        if let Ok(t) = self.writer(0) {
            t.write(data);
        }
    }

    /// Writes several buffers to stdin, in order.
    pub fn write_sequence(&self, data: &[&[u8]]) {
        if let Ok(t) = self.writer(0) {
            t.write_sequence(data);
        }
    }

    /// Writes to the child's descriptor `fd` (one mapped [`ChildFd::ToChild`]).
    pub fn write_to_child(&self, fd: RawFd, data: &[u8]) -> Result<(), Error> {
        self.writer(fd)?.write(data);
        Ok(())
    }

    /// Closes our end of the child's descriptor `fd`; a write end first
    /// sends what is buffered. Unknown or closed descriptors are ignored.
    pub fn close_child_fd(&self, fd: RawFd) {
        let end = self.process.ends.borrow().get(&fd).cloned();
        if let Some(end) = end {
            end.transport().lose_connection();
        }
    }

    /// Closes stdin once what was written is sent: the child reads EOF.
    pub fn close_stdin(&self) {
        self.close_child_fd(0)
    }

    /// Closes our end of stdout.
    pub fn close_stdout(&self) {
        self.close_child_fd(1)
    }

    /// Closes our end of stderr.
    pub fn close_stderr(&self) {
        self.close_child_fd(2)
    }

    /// Closes stdin, stdout and stderr (Twisted's `loseConnection`).
    pub fn lose_connection(&self) {
        for fd in 0..3 {
            self.close_child_fd(fd);
        }
    }

    /// Sends a signal (`"TERM"`, `"KILL"`, `"INT"`, ... or a number).
    /// `ProcessExitedAlready` once the child has exited.
    pub fn signal_process(&self, signal: impl IntoSignal) -> Result<(), Error> {
        if self.process.life.get() != Life::Running {
            return Err(Error::ProcessExitedAlready);
        }
        let sig = signal.signal_number().ok_or_else(|| {
            Error::io(
                "signal_process",
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "unknown signal name"),
            )
        })?;
        spawn::kill(self.process.pid, sig)
            .map_err(|e| Error::io(format!("signalling process {}", self.process.pid), e))
    }

    /// Sets a pseudo-terminal child's window size (`TIOCSWINSZ`; the
    /// child gets `SIGWINCH`). An error for a child with pipes.
    pub fn set_window_size(&self, rows: u16, cols: u16) -> Result<(), Error> {
        let Some(master) = &self.process.pty else {
            return Err(Error::io("set_window_size", std::io::Error::other("the child has no terminal")));
        };
        spawn::set_window_size(master, rows, cols).map_err(|e| Error::io("setting the window size", e))
    }

    /// Registers a producer for stdin: paused while stdin's buffer is
    /// above its high-water mark (a child that reads slowly).
    pub fn register_producer(&self, producer: Rc<dyn Producer>, streaming: bool) -> Result<(), Error> {
        self.writer(0)?.register_producer(producer, streaming)
    }

    /// Unregisters stdin's producer.
    pub fn unregister_producer(&self) {
        if let Ok(t) = self.writer(0) {
            t.unregister_producer();
        }
    }

    /// Sets stdin's buffer sizes at which its producer is paused (above
    /// `high`) and resumed (at or below `low`).
    pub fn set_write_buffer_limits(&self, high: usize, low: usize) {
        if let Ok(t) = self.writer(0) {
            t.set_write_buffer_limits(high, low);
        }
    }

    /// The child as an address (Twisted's `_ProcessAddress`): descriptor 0,
    /// where writes go.
    pub fn peer(&self) -> Address {
        Address::Process { pid: self.process.pid, fd: 0 }
    }

    /// The same address as [`peer`](ProcessTransport::peer) (both ends of
    /// the pipes are this pairing, as in Twisted), until `process_ended`.
    pub fn host(&self) -> Option<Address> {
        self.pid().map(|_| self.peer())
    }

    /// Bytes written to stdin and not yet taken by the kernel.
    pub fn buffered(&self) -> usize {
        self.writer(0).map_or(0, |t| t.buffered())
    }

    /// Stops reading the child's output (all its read ends).
    pub fn pause_producing(&self) {
        for t in self.readers() {
            t.pause_producing();
        }
    }

    /// Reads the child's output again.
    pub fn resume_producing(&self) {
        for t in self.readers() {
            t.resume_producing();
        }
    }

    fn readers(&self) -> Vec<Transport> {
        self.process
            .ends
            .borrow()
            .values()
            .filter_map(|e| match e {
                End::Reader(t) | End::Pty(t) => Some(t.clone()),
                End::Writer(_) => None,
            })
            .collect()
    }

    /// This transport as a producer, to register with a consumer of the
    /// child's output (pausing it pauses reading from the child).
    pub fn as_producer(&self) -> Rc<dyn Producer> {
        Rc::new(self.clone())
    }
}

impl Producer for ProcessTransport {
    fn pause_producing(&self) {
        ProcessTransport::pause_producing(self)
    }
    fn resume_producing(&self) {
        ProcessTransport::resume_producing(self)
    }
    fn stop_producing(&self) {
        self.lose_connection()
    }
}

impl std::fmt::Debug for ProcessTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ProcessTransport(pid {}, {}, {:?})",
            self.process.pid,
            self.process.name,
            self.process.life.get()
        )
    }
}
