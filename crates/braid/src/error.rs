//! Error types: what the reactor refuses, and why a connection ended.
//!
//! Two kinds of thing live here. [`Error`] is returned by reactor calls that
//! can be refused (stopping a reactor that is not running, cancelling a call
//! that already ran, registering a descriptor a backend cannot watch).
//! [`Failure`] is the value that travels down errback chains and into
//! `connection_lost`: any error plus the place it was raised, cheap to clone
//! and safe to send between threads.

use std::borrow::Cow;
use std::fmt;
use std::io;
use std::panic::Location;
use std::sync::Arc;

/// Everything a braid call can refuse, named as Twisted names it.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// `stop()` on a reactor that is not running, or that is already stopping.
    ReactorNotRunning,
    /// `run()` while the reactor is already running.
    ReactorAlreadyRunning,
    /// `run()` after a normal `stop()`: a stopped reactor cannot be restarted.
    ReactorNotRestartable,
    /// `install()` on a thread that already has a reactor.
    ReactorAlreadyInstalled,
    /// The reactor behind a `Remote` has been dropped.
    ReactorGone,
    /// `blocking_call_from_thread` from the reactor's own thread would deadlock.
    WouldDeadlock,
    /// A `DelayedCall` that already ran cannot be cancelled or moved.
    AlreadyCalled,
    /// A `DelayedCall` that was cancelled cannot be cancelled or moved again.
    AlreadyCancelled,
    /// A Deferred fired twice.
    DeferredAlreadyCalled,
    /// A backend name nobody knows; carries the valid names.
    UnknownBackend {
        /// The name that was asked for.
        name: String,
        /// The names this build knows.
        valid: &'static [&'static str],
    },
    /// A backend that cannot be used here: not built for this platform, or
    /// refused by the running kernel (io_uring on an old kernel or under a
    /// seccomp filter).
    BackendUnavailable {
        /// The backend's name.
        backend: &'static str,
        /// What is missing, in words.
        why: String,
    },
    /// `select` cannot watch descriptors at or above `FD_SETSIZE`.
    DescriptorTooLarge {
        /// The descriptor that was refused.
        fd: i32,
        /// The first descriptor number the backend cannot watch.
        limit: usize,
    },
    /// A negative descriptor number was handed to the reactor.
    BadDescriptor(i32),
    /// `remove_system_event_trigger` with an id that is not registered.
    NoSuchTrigger,
    /// A system event phase other than before/during/after.
    UnknownPhase(String),
    /// The operation was cancelled (Twisted's `CancelledError`).
    Cancelled,
    /// A deadline passed (Twisted's `TimeoutError`).
    TimedOut,
    /// The connection was closed cleanly (Twisted's `ConnectionDone`).
    ConnectionDone,
    /// The connection was lost in a non-clean fashion (Twisted's `ConnectionLost`).
    ConnectionLost,
    /// The connection was aborted locally (Twisted's `ConnectionAborted`).
    ConnectionAborted,
    /// The descriptor's fd went away while the reactor watched it.
    FdWentAway,
    /// The peer refused the connection (ECONNREFUSED).
    ConnectionRefused,
    /// A host name could not be resolved.
    DnsLookupFailed {
        /// The name that was looked up.
        host: String,
        /// Why the lookup failed, as the resolver said it.
        reason: String,
    },
    /// Binding or listening failed; names the address and the OS error.
    CannotListen {
        /// The address that could not be bound or listened on.
        addr: String,
        /// The OS error.
        source: io::Error,
    },
    /// `stop_connecting` on a connector that is not connecting.
    NotConnecting,
    /// `connect` on a connector that is already connecting or connected.
    AlreadyConnecting,
    /// An address a datagram port cannot use: a host name where an IP
    /// literal is needed, another address family, no destination on an
    /// unconnected port (Twisted's `InvalidAddressError`).
    InvalidAddress(String),
    /// A datagram too large to send (Twisted's `MessageLengthError`).
    MessageLength {
        /// Its size, when known before sending.
        size: Option<usize>,
        /// The largest payload the socket's protocol carries.
        max: usize,
    },
    /// A datagram port's send queue is full: the datagram was not sent.
    SendQueueFull,
    /// A write or option on a port that has stopped listening.
    PortClosed,
    /// `connect` on a datagram port that is connected already.
    AlreadyConnected,
    /// Joining (or leaving) a multicast group failed (Twisted's
    /// `MulticastJoinError`); names the group and interface.
    MulticastJoin {
        /// The group and interface, as text.
        group: String,
        /// The OS error.
        source: io::Error,
    },
    /// A child process exited with status 0 (Twisted's `ProcessDone`).
    ProcessDone,
    /// A child process exited with another status or was killed by a
    /// signal (Twisted's `ProcessTerminated`).
    ProcessTerminated {
        /// The exit status, if it exited.
        exit_code: Option<i32>,
        /// The signal that killed it, if one did.
        signal: Option<i32>,
    },
    /// `signal_process` after the child exited (Twisted's `ProcessExitedAlready`).
    ProcessExitedAlready,
    /// A child descriptor that is not mapped (or not for writing).
    NoSuchChildFd(i32),
    /// A child process could not be started; names the program.
    SpawnFailed {
        /// The program, as given.
        program: String,
        /// Why.
        source: io::Error,
    },
    /// A user callback panicked; carries the panic message.
    Panicked(String),
    /// An operating-system error with a short description of what was tried.
    Io {
        /// What was being tried, e.g. "watching fd 7 for reading".
        context: Cow<'static, str>,
        /// The OS error.
        source: io::Error,
    },
}

impl Error {
    /// Wraps an `io::Error` with a description of the operation that failed.
    pub fn io(context: impl Into<Cow<'static, str>>, source: io::Error) -> Self {
        Error::Io { context: context.into(), source }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::ReactorNotRunning => f.write_str("reactor is not running"),
            Error::ReactorAlreadyRunning => f.write_str("reactor is already running"),
            Error::ReactorNotRestartable => f.write_str("reactor cannot be restarted after stop()"),
            Error::ReactorAlreadyInstalled => f.write_str("a reactor is already installed on this thread"),
            Error::ReactorGone => f.write_str("the reactor has stopped for good or been dropped"),
            Error::WouldDeadlock => {
                f.write_str("blocking_call_from_thread called from the reactor thread would deadlock")
            }
            Error::AlreadyCalled => f.write_str("delayed call already ran"),
            Error::AlreadyCancelled => f.write_str("delayed call already cancelled"),
            Error::DeferredAlreadyCalled => f.write_str("Deferred already fired"),
            Error::UnknownBackend { name, valid } => {
                write!(f, "unknown reactor {name:?}; valid names: {}", valid.join(", "))
            }
            Error::BackendUnavailable { backend, why } => write!(f, "reactor {backend:?} is not available: {why}"),
            Error::DescriptorTooLarge { fd, limit } => write!(
                f,
                "descriptor {fd} is too large for the select reactor (FD_SETSIZE is {limit}); use poll or epoll"
            ),
            Error::BadDescriptor(fd) => write!(f, "bad file descriptor {fd}"),
            Error::NoSuchTrigger => f.write_str("no such system event trigger"),
            Error::UnknownPhase(p) => write!(f, "unknown event phase {p:?}; valid: before, during, after"),
            Error::Cancelled => f.write_str("cancelled"),
            Error::TimedOut => f.write_str("timed out"),
            Error::ConnectionDone => f.write_str("connection was closed cleanly"),
            Error::ConnectionLost => f.write_str("connection was lost"),
            Error::ConnectionAborted => f.write_str("connection was aborted"),
            Error::FdWentAway => f.write_str("file descriptor went away"),
            Error::ConnectionRefused => f.write_str("connection was refused by the other side"),
            Error::DnsLookupFailed { host, reason } => write!(f, "DNS lookup of {host:?} failed: {reason}"),
            Error::CannotListen { addr, source } => write!(f, "cannot listen on {addr}: {source}"),
            Error::NotConnecting => f.write_str("not connecting"),
            Error::AlreadyConnecting => f.write_str("connector is already connecting or connected"),
            Error::InvalidAddress(why) => write!(f, "invalid address: {why}"),
            Error::MessageLength { size: Some(size), max } => {
                write!(f, "datagram of {size} bytes is too long (at most {max})")
            }
            Error::MessageLength { size: None, max } => {
                write!(f, "datagram too long for the path (protocol limit {max} bytes)")
            }
            Error::SendQueueFull => f.write_str("the port's send queue is full; the datagram was not sent"),
            Error::PortClosed => f.write_str("the port is closed"),
            Error::AlreadyConnected => f.write_str("the datagram port is already connected"),
            Error::MulticastJoin { group, source } => write!(f, "cannot join multicast group {group}: {source}"),
            Error::ProcessDone => f.write_str("process finished with exit code 0"),
            Error::ProcessTerminated { exit_code: Some(code), .. } => {
                write!(f, "process ended with exit code {code}")
            }
            Error::ProcessTerminated { signal: Some(sig), .. } => write!(f, "process ended by signal {sig}"),
            Error::ProcessTerminated { .. } => f.write_str("process ended"),
            Error::ProcessExitedAlready => f.write_str("the process has exited already"),
            Error::NoSuchChildFd(fd) => write!(f, "child descriptor {fd} is not mapped for writing"),
            Error::SpawnFailed { program, source } => write!(f, "cannot run {program:?}: {source}"),
            Error::Panicked(msg) => write!(f, "callback panicked: {msg}"),
            Error::Io { context, source } => write!(f, "{context}: {source}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. }
            | Error::CannotListen { source, .. }
            | Error::MulticastJoin { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// An error on its way down an errback chain or into `connection_lost`.
///
/// It keeps the error itself (downcast it with [`Failure::downcast_ref`]),
/// the source location that created the `Failure`, and optional context
/// lines added on the way. Cloning shares the error, so one failure can be
/// handed to several observers (a `DeferredList`, a log) without copying.
/// `Failure` is `Send + Sync`, so results cross from worker threads.
///
/// `Failure` deliberately does not implement `std::error::Error`, so any
/// error converts into it with `?` or `.into()`.
#[derive(Clone)]
pub struct Failure {
    error: Arc<dyn std::error::Error + Send + Sync + 'static>,
    location: &'static Location<'static>,
    context: Vec<Cow<'static, str>>,
}

impl Failure {
    /// Wraps an error, recording the caller's location.
    #[track_caller]
    pub fn new(error: impl std::error::Error + Send + Sync + 'static) -> Self {
        Failure { error: Arc::new(error), location: Location::caller(), context: Vec::new() }
    }

    /// A failure carrying only a message.
    #[track_caller]
    pub fn msg(message: impl Into<String>) -> Self {
        Failure::new(Message(message.into()))
    }

    /// Adds a line of context ("while connecting to ...").
    pub fn context(mut self, line: impl Into<Cow<'static, str>>) -> Self {
        self.context.push(line.into());
        self
    }

    /// The wrapped error.
    pub fn error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.error
    }

    /// Where this failure was created.
    pub fn location(&self) -> &'static Location<'static> {
        self.location
    }

    /// The wrapped error as `E`, if it is one.
    pub fn downcast_ref<E: std::error::Error + 'static>(&self) -> Option<&E> {
        self.error.downcast_ref::<E>()
    }

    /// True if the wrapped error is an `E`.
    pub fn is<E: std::error::Error + 'static>(&self) -> bool {
        self.error.is::<E>()
    }

    /// The wrapped braid [`Error`], if it is one.
    pub fn braid_error(&self) -> Option<&Error> {
        self.downcast_ref::<Error>()
    }

    /// True if this is a clean close ([`Error::ConnectionDone`]).
    pub fn is_connection_done(&self) -> bool {
        matches!(self.braid_error(), Some(Error::ConnectionDone))
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for Failure {
    #[track_caller]
    fn from(error: E) -> Self {
        Failure::new(error)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.error)?;
        for line in self.context.iter().rev() {
            write!(f, " ({line})")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Failure({self} at {})", self.location)
    }
}

/// A plain-text error, for [`Failure::msg`].
#[derive(Debug)]
struct Message(String);

impl fmt::Display for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Message {}

/// Result type for braid calls that can be refused.
pub type Result<T, E = Error> = std::result::Result<T, E>;
