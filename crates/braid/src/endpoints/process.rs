//! The process client endpoint (Twisted's `ProcessEndpoint`): "connecting"
//! starts a child process and speaks to it as to a stream, a plain
//! [`Protocol`] reading its stdout and writing its stdin.
//!
//! The protocol is driven through an adapter to [`ProcessProtocol`]
//! (Twisted's `_WrapIProtocol`): the child's stdout is `data_received`;
//! its stderr is logged (a warning naming the process, by default) or
//! dropped, as [`StderrPolicy`] says; the end of the process is
//! `connection_lost`, with `ConnectionDone` for exit status 0 and
//! `ConnectionLost` for any other status or a signal (the status itself
//! is logged at debug level). The protocol's transport forwards writes,
//! `lose_connection` (close stdin once written, and our ends of stdout and
//! stderr), `lose_write_connection` (close stdin alone), producers,
//! pausing (stops reading the child), host and peer to the
//! [`ProcessTransport`]; it is no TCP, UNIX or TLS transport.
//!
//! The protocol is built once the child runs, for its address
//! ([`Address::Process`] with its pid and descriptor 0). A factory that
//! builds none fails the connect with `NoProtocol`, and the child, which
//! nobody would talk to, is killed. A program that cannot be started
//! fails the connect with `SpawnFailed`, naming it.

use std::cell::Cell;
use std::ffi::{OsStr, OsString};
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use super::ClientEndpoint;
use crate::defer::Deferred;
use crate::error::{Error, Failure};
use crate::process::{ChildFd, Command, ProcessProtocol, ProcessTransport};
use crate::protocol::{Factory, Protocol};
use crate::reactor::Reactor;
use crate::stream::Address;
use crate::transport::{Producer, Transport, TransportOps};

/// What becomes of the child's stderr (Twisted's `StandardErrorBehavior`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StderrPolicy {
    /// Each chunk is logged as a warning naming the process (the default).
    #[default]
    Log,
    /// Read and thrown away.
    Drop,
}

/// Starts a program and connects a protocol to it (see the module docs).
/// The spawn parameters are those of [`Command`]: by default no
/// arguments, an empty environment, this directory, this user and group,
/// pipes (no terminal) for descriptors 0, 1 and 2.
#[derive(Clone)]
pub struct ProcessEndpoint {
    reactor: Reactor,
    program: OsString,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    path: Option<PathBuf>,
    uid: Option<u32>,
    gid: Option<u32>,
    pty: bool,
    child_fds: Option<Vec<(RawFd, ChildFd)>>,
    stderr: StderrPolicy,
}

impl ProcessEndpoint {
    /// An endpoint that runs `program` (a path, or a name looked up on
    /// `PATH`) with the defaults.
    pub fn new(reactor: &Reactor, program: impl AsRef<OsStr>) -> ProcessEndpoint {
        ProcessEndpoint {
            reactor: reactor.clone(),
            program: program.as_ref().to_owned(),
            args: Vec::new(),
            env: Vec::new(),
            path: None,
            uid: None,
            gid: None,
            pty: false,
            child_fds: None,
            stderr: StderrPolicy::Log,
        }
    }

    /// Adds arguments (after `argv[0]`).
    pub fn args<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(mut self, args: I) -> ProcessEndpoint {
        self.args.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Sets one environment variable (the environment starts empty).
    pub fn env(mut self, name: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> ProcessEndpoint {
        self.env.push((name.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// The child's working directory.
    pub fn path(mut self, dir: impl AsRef<Path>) -> ProcessEndpoint {
        self.path = Some(dir.as_ref().to_owned());
        self
    }

    /// Runs the child as this user (needs privilege).
    pub fn uid(mut self, uid: u32) -> ProcessEndpoint {
        self.uid = Some(uid);
        self
    }

    /// Runs the child in this group (needs privilege).
    pub fn gid(mut self, gid: u32) -> ProcessEndpoint {
        self.gid = Some(gid);
        self
    }

    /// Gives the child a pseudo-terminal instead of pipes (its output then
    /// all arrives as stdout).
    pub fn pty(mut self, on: bool) -> ProcessEndpoint {
        self.pty = on;
        self
    }

    /// Replaces the child's descriptor map (see [`Command::child_fds`]).
    pub fn child_fds(mut self, fds: impl IntoIterator<Item = (RawFd, ChildFd)>) -> ProcessEndpoint {
        self.child_fds = Some(fds.into_iter().collect());
        self
    }

    /// What to do with the child's stderr.
    pub fn stderr(mut self, policy: StderrPolicy) -> ProcessEndpoint {
        self.stderr = policy;
        self
    }

    /// The program.
    pub fn program(&self) -> &OsStr {
        &self.program
    }

    /// The arguments after `argv[0]`.
    pub fn arguments(&self) -> &[OsString] {
        &self.args
    }

    /// The child's environment (nothing else is passed).
    pub fn environment(&self) -> &[(OsString, OsString)] {
        &self.env
    }

    /// The working directory (`None`: this one).
    pub fn working_dir(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The user to run as (`None`: this one).
    pub fn user(&self) -> Option<u32> {
        self.uid
    }

    /// The group to run in (`None`: this one).
    pub fn group(&self) -> Option<u32> {
        self.gid
    }

    /// Whether the child gets a terminal.
    pub fn uses_pty(&self) -> bool {
        self.pty
    }

    /// The descriptor map, `None` for the default (0 to the child, 1 and 2
    /// from it).
    pub fn descriptor_map(&self) -> Option<&[(RawFd, ChildFd)]> {
        self.child_fds.as_deref()
    }

    /// The stderr policy.
    pub fn stderr_policy(&self) -> StderrPolicy {
        self.stderr
    }

    fn command(&self) -> Command {
        let mut c = Command::new(&self.program).args(&self.args).pty(self.pty);
        for (k, v) in &self.env {
            c = c.env(k, v);
        }
        if let Some(dir) = &self.path {
            c = c.current_dir(dir);
        }
        if let Some(uid) = self.uid {
            c = c.uid(uid);
        }
        if let Some(gid) = self.gid {
            c = c.gid(gid);
        }
        if let Some(fds) = &self.child_fds {
            c = c.child_fds(fds.iter().copied());
        }
        c
    }
}

impl std::fmt::Debug for ProcessEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ProcessEndpoint({})", self.describe())
    }
}

impl ClientEndpoint for ProcessEndpoint {
    fn connect(&self, factory: Box<dyn Factory>) -> Deferred<Transport> {
        let done = Deferred::new();
        let adapter = WrapProtocol {
            factory,
            protocol: None,
            done: Some(done.clone()),
            stderr: self.stderr,
            name: self.program.to_string_lossy().into_owned(),
            pid: 0,
        };
        if let Err(e) = self.reactor.spawn_process(adapter, &self.command()) {
            // The adapter failed it already with the same reason; this
            // covers any error it was not told of.
            let _ = done.errback(Failure::new(e));
        }
        done
    }

    fn describe(&self) -> String {
        let mut text = format!("process:{}", self.program.to_string_lossy());
        for a in &self.args {
            text.push(' ');
            text.push_str(&a.to_string_lossy());
        }
        text
    }
}

/// Drives a [`Protocol`] as a [`ProcessProtocol`] (Twisted's
/// `_WrapIProtocol`).
struct WrapProtocol {
    factory: Box<dyn Factory>,
    protocol: Option<Box<dyn Protocol>>,
    /// Until the protocol is connected (or the attempt failed).
    done: Option<Deferred<Transport>>,
    stderr: StderrPolicy,
    name: String,
    pid: i32,
}

impl ProcessProtocol for WrapProtocol {
    fn connection_made(&mut self, process: ProcessTransport) {
        self.pid = process.pid().unwrap_or_default();
        let Some(mut protocol) = self.factory.build_protocol(&process.peer()) else {
            if let Some(d) = self.done.take() {
                let _ = d.errback(Failure::msg(format!(
                    "the factory built no protocol for process {} ({}) (NoProtocol)",
                    self.pid, self.name
                )));
            }
            let _ = process.signal_process("KILL");
            process.lose_connection();
            return;
        };
        let transport =
            Transport::new(Rc::new(ProcessEndpointTransport { process, closing: Cell::new(false) }));
        protocol.connection_made(transport.clone());
        self.protocol = Some(protocol);
        if let Some(d) = self.done.take() {
            let _ = d.callback(transport);
        }
    }

    fn out_received(&mut self, data: &[u8]) {
        if let Some(p) = self.protocol.as_mut() {
            p.data_received(data);
        }
    }

    fn err_received(&mut self, data: &[u8]) {
        if self.stderr == StderrPolicy::Log {
            let text = String::from_utf8_lossy(data);
            tracing::warn!(target: "braid", "process {} ({}) stderr: {}", self.pid, self.name, text.trim_end());
        }
    }

    fn process_ended(&mut self, reason: Failure) {
        match self.protocol.take() {
            Some(mut protocol) => {
                tracing::debug!(target: "braid", "process {} ({}) ended: {reason}", self.pid, self.name);
                let why = match reason.braid_error() {
                    Some(Error::ProcessDone) => Error::ConnectionDone,
                    _ => Error::ConnectionLost,
                };
                protocol.connection_lost(Failure::new(why));
            }
            None => {
                // Never connected: spawning failed (or no protocol).
                if let Some(d) = self.done.take() {
                    let _ = d.errback(reason);
                }
            }
        }
    }
}

/// The protocol's transport: the process transport, as a stream's.
struct ProcessEndpointTransport {
    process: ProcessTransport,
    closing: Cell<bool>,
}

impl TransportOps for ProcessEndpointTransport {
    fn write(&self, data: &[u8]) {
        self.process.write(data);
    }

    fn write_sequence(&self, data: &[&[u8]]) {
        self.process.write_sequence(data);
    }

    fn lose_connection(&self) {
        self.closing.set(true);
        self.process.lose_connection();
    }

    /// A child cannot be reset like a socket: it is killed, and its pipes
    /// closed.
    fn abort_connection(&self) {
        self.closing.set(true);
        let _ = self.process.signal_process("KILL");
        self.process.lose_connection();
    }

    fn lose_write_connection(&self) {
        self.process.close_stdin();
    }

    fn host(&self) -> Option<Address> {
        self.process.host()
    }

    fn peer(&self) -> Address {
        self.process.peer()
    }

    fn pause_producing(&self) {
        self.process.pause_producing();
    }

    fn resume_producing(&self) {
        self.process.resume_producing();
    }

    fn stop_producing(&self) {
        self.lose_connection();
    }

    fn register_producer(&self, producer: Rc<dyn Producer>, streaming: bool) -> Result<(), Error> {
        self.process.register_producer(producer, streaming)
    }

    fn unregister_producer(&self) {
        self.process.unregister_producer();
    }

    fn set_write_buffer_limits(&self, high: usize, low: usize) {
        self.process.set_write_buffer_limits(high, low);
    }

    fn buffered(&self) -> usize {
        self.process.buffered()
    }

    fn connected(&self) -> bool {
        !self.closing.get() && self.process.pid().is_some()
    }
}
