//! UNIX stream sockets: `listen_unix`, as a method on the reactor, and the
//! UNIX kind of the one stream connection.
//!
//! A name is a filesystem path, or (Linux) an abstract name written with a
//! leading `@` or NUL. A path longer than the kernel's `sun_path` is an
//! error, never truncated.
//!
//! The socket file belongs to the port: a stale file left by a process that
//! died is removed before binding (nothing answers a connect to it), a live
//! one makes `listen_unix` fail with `CannotListen`, and the file is removed
//! when the port stops listening. With `want_pid`, the port also holds
//! Twisted's lock file `PATH.lock`, naming the owner's pid, and refuses to
//! start while another live process holds it.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::ffi::OsString;
use std::io;
use std::io::IoSlice;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use rustix::net::{AddressFamily, SocketFlags, SocketType};

use crate::error::Error;
use crate::error::Failure;
use crate::protocol::{ClientFactory, IntoFactory};
use crate::reactor::Reactor;
use crate::stream::connection::Connection;
use crate::stream::kind::Kind;
use crate::stream::listener::{Listen, ListeningPort, Port};
use crate::stream::unix_io::{recv_with_fds, send_with_fds, Credentials, SCM_MAX_FD};
use crate::stream::{Address, StreamConnector, UnixAddr};
use crate::transport::UnixOptions;
use rustix::io::Errno;

/// A UNIX stream connection: the default stream-socket behaviour plus
/// descriptor passing; the peer is usually unnamed (a client that did not
/// bind).
pub(crate) struct Unix {
    pub peer: UnixAddr,
    /// Descriptors in flight, made on first use: an idle connection that
    /// never passes one pays a pointer.
    fds: RefCell<Option<Box<Passing>>>,
}

/// Descriptors received and not yet given to the protocol, and queued to
/// go with the next bytes.
#[derive(Default)]
struct Passing {
    received: Vec<OwnedFd>,
    outgoing: VecDeque<OwnedFd>,
}

impl Unix {
    pub fn new(peer: UnixAddr) -> Unix {
        Unix { peer, fds: RefCell::new(None) }
    }

    /// Sends what the kernel takes of `bufs`, with up to `SCM_MAX_FD`
    /// queued descriptors on the first byte. The copies sent are closed
    /// here once the kernel has them (the peer holds its own).
    fn send_with_queued(&self, fd: &OwnedFd, bufs: &[IoSlice<'_>]) -> Result<usize, Errno> {
        let mut fds = self.fds.borrow_mut();
        let Some(passing) = fds.as_mut().filter(|p| !p.outgoing.is_empty()) else {
            drop(fds);
            let mut no_control = rustix::net::SendAncillaryBuffer::default();
            return rustix::net::sendmsg(fd, bufs, &mut no_control, rustix::net::SendFlags::NOSIGNAL);
        };
        let batch = passing.outgoing.len().min(SCM_MAX_FD);
        let sent = {
            let borrowed: Vec<BorrowedFd<'_>> =
                passing.outgoing.iter().take(batch).map(|f| f.as_fd()).collect();
            send_with_fds(fd, bufs, &borrowed)?
        };
        if sent > 0 {
            passing.outgoing.drain(..batch);
        }
        Ok(sent)
    }
}

impl Kind for Unix {
    const NAME: &'static str = "UNIX";
    const RING_READS: bool = true;
    const RING_RECVMSG: bool = true;

    fn peer(&self) -> Address {
        Address::Unix(self.peer.clone())
    }

    fn recv(&self, fd: &OwnedFd, buf: &mut [u8]) -> Result<usize, Errno> {
        let mut fds = self.fds.borrow_mut();
        let passing = fds.get_or_insert_with(Default::default);
        let got = recv_with_fds(fd, buf, &mut passing.received)?;
        if got.fds_truncated {
            tracing::warn!(
                target: "braid",
                "descriptors from {} were lost: the kernel could not deliver them all (out of descriptors?)",
                Address::Unix(self.peer.clone())
            );
        }
        if passing.received.is_empty() && passing.outgoing.is_empty() {
            // Nothing in flight: give the memory back.
            *fds = None;
        }
        Ok(got.bytes)
    }

    fn send(&self, fd: &OwnedFd, data: &[u8]) -> Result<usize, Errno> {
        self.send_with_queued(fd, &[IoSlice::new(data)])
    }

    fn send_vectored(&self, fd: &OwnedFd, bufs: &[IoSlice<'_>]) -> Result<usize, Errno> {
        self.send_with_queued(fd, bufs)
    }

    fn take_received_fds(&self) -> Option<Vec<OwnedFd>> {
        let mut fds = self.fds.borrow_mut();
        let passing = fds.as_mut().filter(|p| !p.received.is_empty())?;
        Some(std::mem::take(&mut passing.received))
    }

    fn put_received_fds(&self, fds: Vec<OwnedFd>) {
        self.fds.borrow_mut().get_or_insert_with(Default::default).received.extend(fds);
    }

    fn needs_carrier_byte(&self) -> bool {
        self.fds.borrow().as_ref().is_some_and(|p| !p.outgoing.is_empty())
    }

    fn unix_options(conn: Rc<Connection<Self>>) -> Option<Rc<dyn UnixOptions>> {
        Some(conn)
    }
}

impl UnixOptions for Connection<Unix> {
    fn peer_credentials(&self) -> Result<Credentials, Error> {
        self.socket_peer_credentials()
    }

    fn send_file_descriptor(&self, fd: OwnedFd) -> Result<(), Error> {
        if !self.writable() {
            return Err(Error::ConnectionDone);
        }
        self.kind().fds.borrow_mut().get_or_insert_with(Default::default).outgoing.push_back(fd);
        self.wake_writer();
        Ok(())
    }
}

/// A UNIX listener: what it bound, so it can clean up after itself.
pub(crate) struct UnixListen {
    /// The socket file to remove on close (`None` for an abstract name,
    /// or a socket someone else bound: an adopted one).
    pub path: Option<PathBuf>,
    /// The lock file to remove on close, with `want_pid`.
    pub lock: Option<PathBuf>,
}

impl Listen for UnixListen {
    type Conn = Unix;
    const NAME: &'static str = "UNIX";

    fn accepted(&self, peer: &Address) -> Option<Unix> {
        peer.as_unix().map(|peer| Unix::new(peer.clone()))
    }

    fn closed(&self) {
        for file in [&self.path, &self.lock].into_iter().flatten() {
            if let Err(e) = std::fs::remove_file(file) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(target: "braid", "could not remove {}: {e}", file.display());
                }
            }
        }
    }
}

pub(crate) fn cannot_listen(name: &Path, source: io::Error) -> Error {
    Error::CannotListen { addr: format!("unix:{}", name.display()), source }
}

/// True if a socket of type `kind` is bound to the socket file at `path`
/// and takes connections now; false if nothing does (the file is stale).
pub(crate) fn socket_file_is_live(path: &Path, addr: &Address, kind: SocketType) -> bool {
    let Ok(probe) = rustix::net::socket_with(AddressFamily::UNIX, kind, SocketFlags::CLOEXEC, None) else {
        // Cannot tell: treat it as live rather than delete someone's socket.
        return true;
    };
    match rustix::net::connect(&probe, &addr.to_sockaddr().expect("a UNIX address")) {
        Err(rustix::io::Errno::CONNREFUSED) | Err(rustix::io::Errno::NOENT) => false,
        Ok(()) | Err(_) => {
            tracing::debug!(target: "braid", "{} is in use", path.display());
            true
        }
    }
}

/// Takes `PATH.lock` for this process (Twisted's `wantPID`): refused while
/// a live process holds it; a lock left by a dead one is taken over.
fn take_lock(path: &Path) -> Result<PathBuf, Error> {
    let mut lock = OsString::from(path.as_os_str());
    lock.push(".lock");
    let lock = PathBuf::from(lock);
    let mine = std::process::id().to_string();
    for _ in 0..2 {
        match std::fs::OpenOptions::new().write(true).create_new(true).open(&lock) {
            Ok(mut f) => {
                use std::io::Write;
                f.write_all(mine.as_bytes()).map_err(|e| cannot_listen(path, e))?;
                return Ok(lock);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let holder = std::fs::read_to_string(&lock).ok().and_then(|s| s.trim().parse::<i32>().ok());
                let alive = holder.is_some_and(|pid| {
                    rustix::process::Pid::from_raw(pid)
                        .is_some_and(|p| rustix::process::test_kill_process(p).is_ok())
                });
                if alive {
                    let who = holder.map_or_else(String::new, |p| format!(" (pid {p})"));
                    return Err(cannot_listen(
                        path,
                        io::Error::new(
                            io::ErrorKind::AddrInUse,
                            format!("{} is held by a live process{who}", lock.display()),
                        ),
                    ));
                }
                // Left by a dead process: take it over.
                let _ = std::fs::remove_file(&lock);
            }
            Err(e) => return Err(cannot_listen(path, e)),
        }
    }
    Err(cannot_listen(
        path,
        io::Error::new(io::ErrorKind::AddrInUse, format!("could not take {}", lock.display())),
    ))
}

impl Reactor {
    /// Listens for UNIX stream connections on `name` (a path, or an
    /// abstract name with a leading `@`) and builds a protocol with
    /// `factory` for each one.
    ///
    /// `mode` sets the socket file's permission bits (say `0o660`);
    /// `want_pid` takes the lock file `NAME.lock` (see the module docs).
    /// A name that is too long, a live socket at the path, or a bind or
    /// listen failure is `CannotListen`, naming the path.
    pub fn listen_unix(
        &self,
        name: impl AsRef<Path>,
        factory: impl IntoFactory,
        backlog: u32,
        mode: Option<u32>,
        want_pid: bool,
    ) -> Result<ListeningPort, Error> {
        let name = name.as_ref();
        let addr = Address::unix(name.as_os_str()).map_err(|e| cannot_listen(name, e.into()))?;
        let path = addr.unix_path().map(Path::to_path_buf);
        let lock = match (&path, want_pid) {
            (Some(p), true) => Some(take_lock(p)?),
            _ => None,
        };
        // From here on the lock (if any) is ours: give it back on failure.
        let listen = UnixListen { path: None, lock };
        if let Some(p) = &path {
            if std::fs::symlink_metadata(p).is_ok() {
                if socket_file_is_live(p, &addr, SocketType::STREAM) {
                    let e = io::Error::new(io::ErrorKind::AddrInUse, "another process is listening there");
                    listen.closed();
                    return Err(cannot_listen(name, e));
                }
                let _ = std::fs::remove_file(p);
            }
        }
        let bound = (|| {
            let sock = rustix::net::socket_with(
                AddressFamily::UNIX,
                SocketType::STREAM,
                SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
                None,
            )?;
            rustix::net::bind(&sock, &addr.to_sockaddr().expect("a UNIX address"))?;
            Ok::<_, rustix::io::Errno>(sock)
        })();
        let sock = match bound {
            Ok(s) => s,
            Err(e) => {
                listen.closed();
                return Err(cannot_listen(name, e.into()));
            }
        };
        // The file is ours now: removed on close, or on any failure below.
        let listen = UnixListen { path, lock: listen.lock };
        let finish = (|| {
            if let (Some(mode), Some(p)) = (mode, &listen.path) {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))?;
            }
            rustix::net::listen(&sock, backlog.min(i32::MAX as u32) as i32)?;
            Ok::<_, io::Error>(())
        })();
        if let Err(e) = finish {
            listen.closed();
            return Err(cannot_listen(name, e));
        }
        let port = Port::start(self, listen, sock, addr, factory.into_shared())?;
        Ok(ListeningPort::new(port))
    }
}

impl Reactor {
    /// Connects to the UNIX stream socket `name` (a path, or an abstract
    /// name with a leading `@`) and reports the outcome to `factory`, as
    /// `connect_tcp` does: nothing is called back before the next
    /// iteration, `timeout` bounds the attempt, and the returned connector
    /// can stop it, disconnect, or connect again (so a
    /// `ReconnectingClientFactory` works over UNIX sockets too).
    ///
    /// With `check_pid`, the attempt fails at once unless a live process
    /// holds the lock file `NAME.lock` (see [`Reactor::listen_unix`]'s
    /// `want_pid`). A name that is too long fails the attempt with a clear
    /// error naming it.
    pub fn connect_unix(
        &self,
        name: impl AsRef<Path>,
        factory: impl ClientFactory + 'static,
        timeout: Option<std::time::Duration>,
        check_pid: bool,
    ) -> StreamConnector {
        let name = name.as_ref();
        let target = Address::unix(name.as_os_str());
        let shown = name.display().to_string();
        let (target, refusal) = match target {
            Ok(t) => {
                let dead = check_pid && t.unix_path().is_some_and(|p| !lock_is_held(p));
                (Some(t), dead.then(|| format!("no live process holds {shown}.lock")))
            }
            Err(e) => (None, Some(e.to_string())),
        };
        let refused = refusal.is_some();
        // An impossible name still yields a connector: the attempt fails
        // through the factory, never synchronously.
        let target = target.or_else(|| Some(Address::unix_unnamed()));
        let connector = StreamConnector::new(self, &shown, 0, Box::new(factory), target, timeout, None);
        if let (true, Some(why)) = (refused, refusal) {
            connector.refuse(Failure::new(Error::io(
                format!("connecting to unix:{shown}"),
                io::Error::new(io::ErrorKind::InvalidInput, why),
            )));
        } else {
            let _ = connector.connect();
        }
        connector
    }
}

/// True if the lock file beside `path` names a live process.
fn lock_is_held(path: &Path) -> bool {
    let mut lock = OsString::from(path.as_os_str());
    lock.push(".lock");
    std::fs::read_to_string(lock)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .and_then(rustix::process::Pid::from_raw)
        .is_some_and(|p| rustix::process::test_kill_process(p).is_ok())
}
