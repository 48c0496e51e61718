//! One address type for every stream kind: IPv4, IPv6 and UNIX sockets.
//!
//! Factories (`build_protocol(&Address)`), transports (`host()`, `peer()`),
//! listeners and connectors all speak [`Address`], so the protocol layer never
//! names a transport kind. An IPv6 address keeps its flow info and scope id
//! (it is a [`std::net::SocketAddrV6`]); a UNIX address is a filesystem path,
//! a Linux abstract name, or unnamed (a client socket that never bound).
//!
//! Conversions go both ways with rustix: [`Address::from_sockaddr`] reads what
//! `accept`, `getsockname` and `getpeername` return, for any address family,
//! without panicking on one braid does not speak; [`Address::to_sockaddr`]
//! gives what `bind` and `connect` take.
//!
//! UNIX names are checked when they are built, never truncated: a path must
//! fit in `sun_path` with its terminating NUL (107 bytes on Linux), an
//! abstract name must fit after the leading NUL (also 107 bytes). Addresses
//! the kernel reports are taken as they are, so a peer bound to a 108-byte
//! path without a NUL (which Linux allows) still converts.
//!
//! [`Display`](fmt::Display) is the form to log: `127.0.0.1:8080`,
//! `[::1]:8080`, `[fe80::1%2]:80`, `unix:/run/x.sock`, `unix:@name`,
//! `unix:(unnamed)`; control characters, backslashes and bytes that are not
//! UTF-8 are shown as `\xNN` / `\\`.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::io;
use std::mem::{offset_of, size_of};
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use rustix::net::{AddressFamily, SocketAddrAny, SocketAddrUnix};

/// Where `sun_path` starts in a `sockaddr_un`; an address this long (the
/// family field alone) is an unnamed UNIX socket.
const SUN_PATH_OFFSET: usize = offset_of!(libc::sockaddr_un, sun_path);

/// The size of `sockaddr_un::sun_path` on this platform (108 on Linux).
pub const SUN_PATH_LEN: usize = size_of::<libc::sockaddr_un>() - SUN_PATH_OFFSET;

/// The longest filesystem path [`UnixAddr`] accepts, in bytes: `sun_path`
/// less one byte for the terminating NUL, the portable limit (107 on Linux).
pub const MAX_UNIX_PATH_LEN: usize = SUN_PATH_LEN - 1;

/// The longest Linux abstract name, in bytes, not counting the leading NUL
/// that marks it abstract (107). Abstract names are not NUL-terminated; every
/// byte up to the address length is part of the name, NULs included.
pub const MAX_UNIX_ABSTRACT_NAME_LEN: usize = SUN_PATH_LEN - 1;

/// A socket address of any stream kind braid speaks.
///
/// Build one from a [`SocketAddr`] (`Address::from(addr)`), with
/// [`Address::unix`] for UNIX names, or from what the kernel reports with
/// [`Address::from_sockaddr`]. More kinds (process pipes) may be added, so
/// matches need a wildcard arm.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Address {
    /// An IPv4 or IPv6 address and port; IPv6 keeps flow info and scope id.
    Ip(SocketAddr),
    /// A UNIX-domain socket address.
    Unix(UnixAddr),
    /// A host name and port not resolved yet: where a TCP connector dials
    /// (Twisted's `HostnameAddress`). It names no socket, so it has no
    /// family and cannot be bound or connected to as it is.
    Hostname {
        /// The name, as given.
        host: String,
        /// The port.
        port: u16,
    },
    /// One of a child process's descriptors, seen from the parent end of
    /// its pipe (Twisted's `_ProcessAddress`): no socket names it.
    Process {
        /// The child's process id.
        pid: i32,
        /// The descriptor number in the child (0 stdin, 1 stdout, ...).
        fd: i32,
    },
    /// This process's own standard input and output (Twisted's
    /// `PipeAddress`): no socket, no name.
    Pipe,
}

/// A UNIX-domain socket address: a filesystem path, a Linux abstract name, or
/// unnamed. Always valid: it can be built only through checks that keep the
/// name within `sun_path`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UnixAddr(UnixName);

// Paths are kept as raw bytes (`OsString`), not `PathBuf`: `PathBuf`
// compares by components, so `a//b` would equal `a/b`, while the kernel
// reports and compares the exact bytes.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum UnixName {
    Path(OsString),
    Abstract(Box<[u8]>),
    Unnamed,
}

/// A borrowed view of a [`UnixAddr`], for matching on what kind it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnixAddrKind<'a> {
    /// A filesystem path (non-empty, no NUL bytes).
    Path(&'a Path),
    /// A Linux abstract name, without the leading NUL; any bytes.
    Abstract(&'a [u8]),
    /// No name: a socket that was never bound.
    Unnamed,
}

/// Why an address could not be built or converted.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum AddressError {
    /// An empty UNIX path (an unnamed address is [`UnixAddr::unnamed`]).
    EmptyPath,
    /// A UNIX path longer than fits in `sun_path` with its NUL.
    PathTooLong {
        /// The path that was refused.
        path: PathBuf,
        /// Its length in bytes.
        len: usize,
        /// The longest path allowed, in bytes.
        max: usize,
    },
    /// A UNIX path with a NUL byte after the start (the kernel would stop
    /// at it and bind a different name).
    NulInPath {
        /// The path that was refused.
        path: PathBuf,
    },
    /// A Linux abstract name longer than fits in `sun_path` after the
    /// leading NUL.
    AbstractNameTooLong {
        /// The name that was refused, without the leading NUL.
        name: Vec<u8>,
        /// Its length in bytes.
        len: usize,
        /// The longest name allowed, in bytes.
        max: usize,
    },
    /// Abstract names exist only on Linux (and Android).
    AbstractUnsupported,
    /// A socket address of a family braid does not speak (only INET, INET6
    /// and UNIX are).
    UnsupportedFamily {
        /// The raw `sa_family` value.
        family: u16,
    },
    /// A socket address too short for its family.
    Truncated {
        /// The raw `sa_family` value.
        family: u16,
        /// The address length the kernel reported.
        len: usize,
    },
    /// An IP address was needed and this is another kind.
    NotIp(Address),
}

impl fmt::Display for AddressError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AddressError::EmptyPath => f.write_str("empty UNIX socket path"),
            AddressError::PathTooLong { path, len, max } => {
                f.write_str("UNIX socket path \"")?;
                write_escaped(f, path.as_os_str().as_bytes())?;
                write!(
                    f,
                    "\" is {len} bytes; at most {max} fit in sun_path ({SUN_PATH_LEN} bytes with the \
                     terminating NUL)"
                )
            }
            AddressError::NulInPath { path } => {
                f.write_str("UNIX socket path \"")?;
                write_escaped(f, path.as_os_str().as_bytes())?;
                f.write_str("\" contains a NUL byte")
            }
            AddressError::AbstractNameTooLong { name, len, max } => {
                f.write_str("abstract UNIX socket name \"@")?;
                write_escaped(f, name)?;
                write!(
                    f,
                    "\" is {len} bytes; at most {max} fit in sun_path ({SUN_PATH_LEN} bytes with the \
                     leading NUL)"
                )
            }
            AddressError::AbstractUnsupported => {
                f.write_str("abstract UNIX socket names exist only on Linux")
            }
            AddressError::UnsupportedFamily { family } => {
                write!(f, "socket address family {family} is not supported (only IPv4, IPv6 and UNIX)")
            }
            AddressError::Truncated { family, len } => {
                write!(f, "socket address of family {family} is truncated ({len} bytes)")
            }
            AddressError::NotIp(addr) => write!(f, "{addr} is not an IP address"),
        }
    }
}

impl std::error::Error for AddressError {}

impl From<AddressError> for io::Error {
    /// An invalid-input error carrying the message, for the `io::Error`
    /// slots of `Error::CannotListen` and `Error::Io`.
    fn from(e: AddressError) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidInput, e)
    }
}

impl Address {
    /// A UNIX address from a string or path: a leading `@` or NUL makes the
    /// rest a Linux abstract name, anything else is a filesystem path (write
    /// `./@x` for a file whose name starts with `@`). Too long, empty, or with
    /// a NUL inside a path: an error, never a truncated name.
    pub fn unix(name: impl AsRef<OsStr>) -> Result<Address, AddressError> {
        UnixAddr::parse(name).map(Address::Unix)
    }

    /// A Linux abstract UNIX address; `name` excludes the leading NUL.
    pub fn unix_abstract(name: impl AsRef<[u8]>) -> Result<Address, AddressError> {
        UnixAddr::from_abstract_name(name).map(Address::Unix)
    }

    /// The unnamed UNIX address: a socket that never bound. Binding to it
    /// makes Linux pick a free abstract name ("autobind").
    pub fn unix_unnamed() -> Address {
        Address::Unix(UnixAddr::unnamed())
    }

    /// Whether this is an IPv4 or IPv6 address.
    pub fn is_ip(&self) -> bool {
        matches!(self, Address::Ip(_))
    }

    /// Whether this is a UNIX-domain address.
    pub fn is_unix(&self) -> bool {
        matches!(self, Address::Unix(_))
    }

    /// The IP address and port, if this is one.
    pub fn ip(&self) -> Option<SocketAddr> {
        match self {
            Address::Ip(a) => Some(*a),
            _ => None,
        }
    }

    /// The port, for an IP address or a host name.
    pub fn port(&self) -> Option<u16> {
        match self {
            Address::Ip(a) => Some(a.port()),
            Address::Hostname { port, .. } => Some(*port),
            Address::Unix(_) | Address::Process { .. } | Address::Pipe => None,
        }
    }

    /// A host name and port, unresolved (see [`Address::Hostname`]).
    pub fn hostname(host: impl Into<String>, port: u16) -> Address {
        Address::Hostname { host: host.into(), port }
    }

    /// The UNIX address, if this is one.
    pub fn as_unix(&self) -> Option<&UnixAddr> {
        match self {
            Address::Unix(u) => Some(u),
            _ => None,
        }
    }

    /// The filesystem path, if this is a UNIX path address.
    pub fn unix_path(&self) -> Option<&Path> {
        self.as_unix().and_then(UnixAddr::as_path)
    }

    /// The abstract name (without the leading NUL), if this is one.
    pub fn unix_abstract_name(&self) -> Option<&[u8]> {
        self.as_unix().and_then(UnixAddr::abstract_name)
    }

    /// Whether this is the unnamed UNIX address.
    pub fn is_unix_unnamed(&self) -> bool {
        self.as_unix().is_some_and(UnixAddr::is_unnamed)
    }

    /// The address family, for creating a socket that can bind or connect
    /// to this address (`rustix::net::socket(addr.family(), ...)`).
    pub fn family(&self) -> Option<AddressFamily> {
        match self {
            Address::Ip(SocketAddr::V4(_)) => Some(AddressFamily::INET),
            Address::Ip(SocketAddr::V6(_)) => Some(AddressFamily::INET6),
            Address::Unix(_) => Some(AddressFamily::UNIX),
            Address::Hostname { .. } | Address::Process { .. } | Address::Pipe => None,
        }
    }

    /// The address in the form rustix's `bind` and `connect` take.
    /// `None` for a host name (resolve it first) or a process pipe.
    pub fn to_sockaddr(&self) -> Option<SocketAddrAny> {
        match self {
            Address::Ip(a) => Some(SocketAddrAny::from(*a)),
            Address::Unix(u) => Some(SocketAddrAny::from(u.to_rustix())),
            Address::Hostname { .. } | Address::Process { .. } | Address::Pipe => None,
        }
    }

    /// Reads an address the kernel reported (`accept`, `getsockname`,
    /// `getpeername`, `recvfrom`). Families other than INET, INET6 and UNIX,
    /// and addresses too short for their family, are errors.
    pub fn from_sockaddr(addr: &SocketAddrAny) -> Result<Address, AddressError> {
        let family = addr.address_family();
        let len = addr.addr_len() as usize;
        let truncated = || AddressError::Truncated { family: family.as_raw(), len };
        // rustix asserts these lengths; check first so a short address is an
        // error, not a panic.
        match family {
            AddressFamily::INET => {
                if len < size_of::<libc::sockaddr_in>() {
                    return Err(truncated());
                }
                let a = SocketAddrV4::try_from(addr.clone()).map_err(|_| truncated())?;
                Ok(Address::Ip(SocketAddr::V4(a)))
            }
            AddressFamily::INET6 => {
                if len < size_of::<libc::sockaddr_in6>() {
                    return Err(truncated());
                }
                let a = SocketAddrV6::try_from(addr.clone()).map_err(|_| truncated())?;
                Ok(Address::Ip(SocketAddr::V6(a)))
            }
            AddressFamily::UNIX => {
                let bytes = crate::sys::unix_socket::sockaddr_bytes(addr);
                match bytes.get(SUN_PATH_OFFSET..) {
                    Some(sun_path) => UnixAddr::from_sun_path(sun_path).map(Address::Unix),
                    None => Err(truncated()),
                }
            }
            other => Err(AddressError::UnsupportedFamily { family: other.as_raw() }),
        }
    }
}

impl UnixAddr {
    /// Parses a UNIX name: a leading `@` or NUL makes the rest a Linux
    /// abstract name, anything else is a filesystem path.
    pub fn parse(name: impl AsRef<OsStr>) -> Result<UnixAddr, AddressError> {
        let bytes = name.as_ref().as_bytes();
        match bytes.first() {
            Some(b'@') | Some(0) => UnixAddr::from_abstract_name(&bytes[1..]),
            _ => UnixAddr::from_path(name.as_ref()),
        }
    }

    /// A filesystem-path address, taken literally (a leading `@` is part of
    /// the file name). The path must be non-empty, contain no NUL, and be at
    /// most [`MAX_UNIX_PATH_LEN`] bytes.
    pub fn from_path(path: impl AsRef<Path>) -> Result<UnixAddr, AddressError> {
        UnixAddr::checked_path(path.as_ref().as_os_str().as_bytes(), MAX_UNIX_PATH_LEN)
    }

    /// A Linux abstract address; `name` excludes the leading NUL and may be
    /// any bytes, at most [`MAX_UNIX_ABSTRACT_NAME_LEN`] of them.
    pub fn from_abstract_name(name: impl AsRef<[u8]>) -> Result<UnixAddr, AddressError> {
        let name = name.as_ref();
        if !cfg!(any(target_os = "linux", target_os = "android")) {
            return Err(AddressError::AbstractUnsupported);
        }
        if name.len() > MAX_UNIX_ABSTRACT_NAME_LEN {
            return Err(AddressError::AbstractNameTooLong {
                name: name.to_vec(),
                len: name.len(),
                max: MAX_UNIX_ABSTRACT_NAME_LEN,
            });
        }
        Ok(UnixAddr(UnixName::Abstract(name.into())))
    }

    /// The unnamed address: a socket that never bound.
    pub fn unnamed() -> UnixAddr {
        UnixAddr(UnixName::Unnamed)
    }

    /// Which kind of UNIX address this is, borrowed.
    pub fn kind(&self) -> UnixAddrKind<'_> {
        match &self.0 {
            UnixName::Path(p) => UnixAddrKind::Path(Path::new(p)),
            UnixName::Abstract(n) => UnixAddrKind::Abstract(n),
            UnixName::Unnamed => UnixAddrKind::Unnamed,
        }
    }

    /// The filesystem path, if this is a path address.
    pub fn as_path(&self) -> Option<&Path> {
        match &self.0 {
            UnixName::Path(p) => Some(Path::new(p)),
            _ => None,
        }
    }

    /// The abstract name (without the leading NUL), if this is one.
    pub fn abstract_name(&self) -> Option<&[u8]> {
        match &self.0 {
            UnixName::Abstract(n) => Some(n),
            _ => None,
        }
    }

    /// Whether this is the unnamed address.
    pub fn is_unnamed(&self) -> bool {
        matches!(self.0, UnixName::Unnamed)
    }

    /// The address as rustix's `SocketAddrUnix`, for `bind` and `connect`.
    pub fn to_rustix(&self) -> SocketAddrUnix {
        let built = match &self.0 {
            UnixName::Path(p) => SocketAddrUnix::new(p.as_os_str()),
            #[cfg(any(target_os = "linux", target_os = "android"))]
            UnixName::Abstract(n) => SocketAddrUnix::new_abstract_name(n),
            #[cfg(not(any(target_os = "linux", target_os = "android")))]
            UnixName::Abstract(_) => unreachable!("abstract names are refused off Linux"),
            UnixName::Unnamed => Ok(SocketAddrUnix::new_unnamed()),
        };
        // Every constructor checked what rustix checks (length, no NUL in a
        // path), so rustix cannot refuse it.
        built.expect("UnixAddr was validated when it was built")
    }

    /// `path` must fit in `max` bytes; the kernel's own reports may use all
    /// of `sun_path`, names built here leave room for the NUL.
    fn checked_path(bytes: &[u8], max: usize) -> Result<UnixAddr, AddressError> {
        let path = || PathBuf::from(OsStr::from_bytes(bytes));
        if bytes.is_empty() {
            return Err(AddressError::EmptyPath);
        }
        if bytes.contains(&0) {
            return Err(AddressError::NulInPath { path: path() });
        }
        if bytes.len() > max {
            return Err(AddressError::PathTooLong { path: path(), len: bytes.len(), max });
        }
        Ok(UnixAddr(UnixName::Path(OsString::from_vec(bytes.to_vec()))))
    }

    /// Reads the `sun_path` part of an address the kernel reported: empty
    /// for unnamed, a leading NUL for abstract (every later byte is the
    /// name), otherwise a path ending at the first NUL or at the end.
    fn from_sun_path(sun_path: &[u8]) -> Result<UnixAddr, AddressError> {
        match sun_path.split_first() {
            None => Ok(UnixAddr::unnamed()),
            Some((0, name)) => UnixAddr::from_abstract_name(name),
            Some(_) => {
                let end = sun_path.iter().position(|&b| b == 0).unwrap_or(sun_path.len());
                UnixAddr::checked_path(&sun_path[..end], SUN_PATH_LEN)
            }
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Ip(a) => fmt::Display::fmt(a, f),
            Address::Unix(u) => fmt::Display::fmt(u, f),
            Address::Hostname { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Address::Hostname { host, port } => write!(f, "{host}:{port}"),
            Address::Process { pid, fd } => write!(f, "process {pid} fd {fd}"),
            Address::Pipe => f.write_str("standard I/O"),
        }
    }
}

impl fmt::Display for UnixAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            UnixName::Path(p) => {
                f.write_str("unix:")?;
                let bytes = p.as_bytes();
                // A relative path starting with `@` would read as an
                // abstract name.
                if bytes.first() == Some(&b'@') {
                    f.write_str("./")?;
                }
                write_escaped(f, bytes)
            }
            UnixName::Abstract(n) => {
                f.write_str("unix:@")?;
                write_escaped(f, n)
            }
            UnixName::Unnamed => f.write_str("unix:(unnamed)"),
        }
    }
}

impl fmt::Debug for UnixAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UnixAddr({self})")
    }
}

/// Writes `bytes` as text: UTF-8 that prints as itself, control characters
/// and invalid bytes as `\xNN`, a backslash as `\\` (so the form is
/// unambiguous).
fn write_escaped(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c == '\\' {
                f.write_str("\\\\")?;
            } else if c.is_control() {
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    write!(f, "\\x{b:02x}")?;
                }
            } else {
                write!(f, "{c}")?;
            }
        }
        for b in chunk.invalid() {
            write!(f, "\\x{b:02x}")?;
        }
    }
    Ok(())
}

impl From<SocketAddr> for Address {
    fn from(a: SocketAddr) -> Address {
        Address::Ip(a)
    }
}

impl From<SocketAddrV4> for Address {
    fn from(a: SocketAddrV4) -> Address {
        Address::Ip(SocketAddr::V4(a))
    }
}

impl From<SocketAddrV6> for Address {
    fn from(a: SocketAddrV6) -> Address {
        Address::Ip(SocketAddr::V6(a))
    }
}

impl From<UnixAddr> for Address {
    fn from(a: UnixAddr) -> Address {
        Address::Unix(a)
    }
}

impl TryFrom<Address> for SocketAddr {
    type Error = AddressError;

    /// The IP address; any other kind is [`AddressError::NotIp`].
    fn try_from(a: Address) -> Result<SocketAddr, AddressError> {
        match a {
            Address::Ip(ip) => Ok(ip),
            other => Err(AddressError::NotIp(other)),
        }
    }
}

impl TryFrom<&Address> for SocketAddr {
    type Error = AddressError;

    /// The IP address; any other kind is [`AddressError::NotIp`].
    fn try_from(a: &Address) -> Result<SocketAddr, AddressError> {
        a.ip().ok_or_else(|| AddressError::NotIp(a.clone()))
    }
}

impl TryFrom<&SocketAddrAny> for Address {
    type Error = AddressError;

    /// See [`Address::from_sockaddr`].
    fn try_from(a: &SocketAddrAny) -> Result<Address, AddressError> {
        Address::from_sockaddr(a)
    }
}

impl TryFrom<SocketAddrAny> for Address {
    type Error = AddressError;

    /// See [`Address::from_sockaddr`].
    fn try_from(a: SocketAddrAny) -> Result<Address, AddressError> {
        Address::from_sockaddr(&a)
    }
}

impl TryFrom<&std::os::unix::net::SocketAddr> for Address {
    type Error = AddressError;

    /// The address of a std `UnixListener` or `UnixStream` (for adopting
    /// one): its path, abstract name, or unnamed.
    fn try_from(a: &std::os::unix::net::SocketAddr) -> Result<Address, AddressError> {
        if let Some(p) = a.as_pathname() {
            return UnixAddr::checked_path(p.as_os_str().as_bytes(), SUN_PATH_LEN).map(Address::Unix);
        }
        #[cfg(any(target_os = "linux", target_os = "android"))]
        {
            #[cfg(target_os = "android")]
            use std::os::android::net::SocketAddrExt;
            #[cfg(target_os = "linux")]
            use std::os::linux::net::SocketAddrExt;
            if let Some(name) = a.as_abstract_name() {
                return Address::unix_abstract(name);
            }
        }
        Ok(Address::unix_unnamed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rustix::net::{
        accept, bind, connect, getpeername, getsockname, listen, socket_with, SocketFlags, SocketType,
    };
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::os::fd::OwnedFd;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A socket path in the temp dir that no other test (or run) uses; the
    /// file is removed when dropped.
    struct TempSock(PathBuf);

    impl TempSock {
        fn new(tag: &str) -> TempSock {
            static N: AtomicUsize = AtomicUsize::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            let p = std::env::temp_dir().join(format!("braid-addr-{}-{tag}-{n}.sock", std::process::id()));
            let _ = std::fs::remove_file(&p);
            TempSock(p)
        }
    }

    impl Drop for TempSock {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// A unique abstract name for this process and test.
    fn abstract_name(tag: &str) -> Vec<u8> {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        format!("braid-addr-{}-{tag}-{n}", std::process::id()).into_bytes()
    }

    fn unix_stream() -> OwnedFd {
        socket_with(AddressFamily::UNIX, SocketType::STREAM, SocketFlags::CLOEXEC, None).unwrap()
    }

    /// Listens on `addr`, connects a client (bound to `client` first, if
    /// given), accepts; returns (listener, client, accepted).
    fn listen_connect_accept(addr: &Address, client: Option<&Address>) -> (OwnedFd, OwnedFd, OwnedFd) {
        let l = unix_stream();
        bind(&l, &addr.to_sockaddr().unwrap()).unwrap();
        listen(&l, 8).unwrap();
        let c = unix_stream();
        if let Some(client) = client {
            bind(&c, &client.to_sockaddr().unwrap()).unwrap();
        }
        connect(&c, &addr.to_sockaddr().unwrap()).unwrap();
        let s = accept(&l).unwrap();
        (l, c, s)
    }

    fn conv(a: SocketAddrAny) -> Address {
        Address::from_sockaddr(&a).unwrap()
    }

    #[test]
    fn display_every_variant() {
        let v4 = Address::from(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8080));
        assert_eq!(v4.to_string(), "127.0.0.1:8080");
        let v6 = Address::from(SocketAddrV6::new(Ipv6Addr::LOCALHOST, 8080, 0, 0));
        assert_eq!(v6.to_string(), "[::1]:8080");
        let scoped = Address::from(SocketAddrV6::new("fe80::1".parse().unwrap(), 80, 0, 2));
        assert_eq!(scoped.to_string(), "[fe80::1%2]:80");
        assert_eq!(Address::unix("/run/x.sock").unwrap().to_string(), "unix:/run/x.sock");
        assert_eq!(Address::unix("@name").unwrap().to_string(), "unix:@name");
        assert_eq!(Address::unix("\0name").unwrap().to_string(), "unix:@name");
        assert_eq!(Address::unix_unnamed().to_string(), "unix:(unnamed)");
    }

    #[test]
    fn display_escapes_unprintable_bytes() {
        let a = Address::unix_abstract(b"a\0b\n\xff\\c \xc3\xbc").unwrap();
        assert_eq!(a.to_string(), "unix:@a\\x00b\\x0a\\xff\\\\c \u{fc}");
        let p = Address::unix(OsStr::from_bytes(b"/tmp/\x01x\xfe")).unwrap();
        assert_eq!(p.to_string(), "unix:/tmp/\\x01x\\xfe");
        // A file whose name starts with `@` must not read as abstract.
        let at = Address::Unix(UnixAddr::from_path("@file").unwrap());
        assert_eq!(at.to_string(), "unix:./@file");
        assert_eq!(format!("{:?}", Address::unix("@n").unwrap()), "Unix(UnixAddr(unix:@n))");
    }

    #[test]
    fn parse_picks_the_kind() {
        let p = Address::unix("/run/x.sock").unwrap();
        assert_eq!(p.unix_path(), Some(Path::new("/run/x.sock")));
        assert!(p.is_unix() && !p.is_ip() && p.ip().is_none() && p.unix_abstract_name().is_none());
        let a = Address::unix("@srv").unwrap();
        assert_eq!(a.unix_abstract_name(), Some(&b"srv"[..]));
        assert_eq!(a.as_unix().unwrap().kind(), UnixAddrKind::Abstract(b"srv"));
        assert_eq!(Address::unix("\0srv").unwrap(), a);
        assert!(Address::unix_unnamed().is_unix_unnamed());
        let ip = Address::from(SocketAddr::from(([127, 0, 0, 1], 9)));
        assert!(ip.is_ip() && ip.port() == Some(9) && ip.unix_path().is_none());
        assert_eq!(ip.family().unwrap(), AddressFamily::INET);
        assert_eq!(a.family().unwrap(), AddressFamily::UNIX);
        // Exact bytes: `a//b` is not `a/b` (PathBuf would say it is).
        assert_ne!(Address::unix("a//b").unwrap(), Address::unix("a/b").unwrap());
        assert_eq!(Address::unix(""), Err(AddressError::EmptyPath));
        assert!(matches!(Address::unix("a\0b"), Err(AddressError::NulInPath { .. })));
    }

    #[test]
    fn ip_conversions_round_trip() {
        let v6 = SocketAddr::V6(SocketAddrV6::new("fe80::1".parse().unwrap(), 80, 0x12345, 7));
        let a = Address::from(v6);
        assert_eq!(SocketAddr::try_from(&a), Ok(v6));
        assert_eq!(SocketAddr::try_from(a.clone()), Ok(v6));
        assert_eq!(conv(a.to_sockaddr().unwrap()), a, "flow info and scope id survive rustix");
        let u = Address::unix("@x").unwrap();
        assert_eq!(SocketAddr::try_from(&u), Err(AddressError::NotIp(u.clone())));
    }

    #[test]
    fn long_paths_are_refused_not_truncated() {
        assert_eq!(SUN_PATH_LEN, 108);
        let fits = format!("/{}", "a".repeat(MAX_UNIX_PATH_LEN - 1));
        assert_eq!(Address::unix(&fits).unwrap().unix_path().unwrap().as_os_str().len(), 107);
        let long = format!("/{}", "a".repeat(MAX_UNIX_PATH_LEN));
        let err = Address::unix(&long).unwrap_err();
        assert_eq!(err, AddressError::PathTooLong { path: PathBuf::from(&long), len: 108, max: 107 });
        let msg = err.to_string();
        assert!(msg.contains(&long) && msg.contains("108 bytes") && msg.contains("107"), "{msg}");

        let name = vec![b'n'; MAX_UNIX_ABSTRACT_NAME_LEN];
        assert!(Address::unix_abstract(&name).is_ok());
        let long_name = vec![b'n'; MAX_UNIX_ABSTRACT_NAME_LEN + 1];
        let err = Address::unix_abstract(&long_name).unwrap_err();
        assert!(matches!(err, AddressError::AbstractNameTooLong { len: 108, max: 107, .. }));
        assert!(err.to_string().contains("108 bytes"), "{err}");
        let io: io::Error = err.into();
        assert_eq!(io.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn the_longest_names_bind_for_real() {
        // 107 bytes is what the kernel accepts with a NUL; show it binds and
        // reports back the same name.
        let dir = std::env::temp_dir();
        let prefix = format!("{}/braid-long-{}-", dir.display(), std::process::id());
        assert!(prefix.len() < MAX_UNIX_PATH_LEN, "temp dir {dir:?} too long for this test");
        let path = format!("{prefix}{}", "p".repeat(MAX_UNIX_PATH_LEN - prefix.len()));
        let _cleanup = TempSock(PathBuf::from(&path));
        let addr = Address::unix(&path).unwrap();
        let s = unix_stream();
        bind(&s, &addr.to_sockaddr().unwrap()).unwrap();
        assert_eq!(conv(getsockname(&s).unwrap()), addr);

        let mut name = abstract_name("long");
        name.resize(MAX_UNIX_ABSTRACT_NAME_LEN, b'z');
        let addr = Address::unix_abstract(&name).unwrap();
        let s = unix_stream();
        bind(&s, &addr.to_sockaddr().unwrap()).unwrap();
        assert_eq!(conv(getsockname(&s).unwrap()), addr);
    }

    #[test]
    fn a_peer_bound_to_a_108_byte_path_converts_without_panic() {
        // Linux lets a socket bind a path that fills sun_path with no NUL;
        // rustix's own conversion of that address panics. We refuse to build
        // such a name, but must read it when a peer uses one.
        let dir = std::env::temp_dir();
        let prefix = format!("{}/braid-full-{}-", dir.display(), std::process::id());
        assert!(prefix.len() < SUN_PATH_LEN, "temp dir {dir:?} too long for this test");
        let path = format!("{prefix}{}", "f".repeat(SUN_PATH_LEN - prefix.len()));
        assert_eq!(path.len(), 108);
        let _cleanup = TempSock(PathBuf::from(&path));
        let server = TempSock::new("full");
        let l = unix_stream();
        bind(&l, &Address::unix(&server.0).unwrap().to_sockaddr().unwrap()).unwrap();
        listen(&l, 1).unwrap();
        let c = unix_stream();
        bind(&c, &SocketAddrUnix::new(path.as_str()).unwrap()).unwrap();
        connect(&c, &Address::unix(&server.0).unwrap().to_sockaddr().unwrap()).unwrap();
        let s = accept(&l).unwrap();
        let peer = conv(getpeername(&s).unwrap().unwrap());
        assert_eq!(peer.unix_path(), Some(Path::new(&path)));
        assert_eq!(conv(getsockname(&c).unwrap()), peer);
        // And it converts back to something that names the same socket.
        assert_eq!(conv(peer.to_sockaddr().unwrap()), peer);
    }

    #[test]
    fn path_listener_reports_path_and_unnamed_peer() {
        let tmp = TempSock::new("path");
        let addr = Address::unix(&tmp.0).unwrap();
        let (l, c, s) = listen_connect_accept(&addr, None);
        assert_eq!(conv(getsockname(&l).unwrap()), addr);
        assert_eq!(conv(getsockname(&s).unwrap()), addr);
        assert_eq!(conv(getpeername(&c).unwrap().unwrap()), addr);
        let peer = conv(getpeername(&s).unwrap().unwrap());
        assert!(peer.is_unix_unnamed(), "{peer}");
        assert_eq!(peer.to_string(), "unix:(unnamed)");
        assert!(conv(getsockname(&c).unwrap()).is_unix_unnamed());
    }

    #[test]
    fn abstract_listener_reports_abstract_names() {
        let addr = Address::unix_abstract(abstract_name("srv")).unwrap();
        let client = Address::unix_abstract(abstract_name("cli")).unwrap();
        let (l, c, s) = listen_connect_accept(&addr, Some(&client));
        assert_eq!(conv(getsockname(&l).unwrap()), addr);
        assert_eq!(conv(getsockname(&s).unwrap()), addr);
        assert_eq!(conv(getpeername(&s).unwrap().unwrap()), client);
        assert_eq!(conv(getpeername(&c).unwrap().unwrap()), addr);
    }

    #[test]
    fn binding_unnamed_autobinds_an_abstract_name() {
        let s = unix_stream();
        bind(&s, &Address::unix_unnamed().to_sockaddr().unwrap()).unwrap();
        let got = conv(getsockname(&s).unwrap());
        assert!(got.unix_abstract_name().is_some_and(|n| !n.is_empty()), "{got}");
    }

    #[test]
    fn ipv6_real_socket_round_trip() {
        // Only loopback may be used, and Linux reports a scope id only for
        // link-local addresses, so the scope id's trip through sockaddr_in6
        // is checked in `ip_conversions_round_trip`; here the real kernel
        // addresses of an IPv6 listener, client and accepted socket.
        let v6 =
            || socket_with(AddressFamily::INET6, SocketType::STREAM, SocketFlags::CLOEXEC, None).unwrap();
        let l = v6();
        bind(&l, &Address::from(SocketAddrV6::new(Ipv6Addr::LOCALHOST, 0, 0, 0)).to_sockaddr().unwrap())
            .unwrap();
        listen(&l, 1).unwrap();
        let at = conv(getsockname(&l).unwrap());
        assert_eq!(at.family().unwrap(), AddressFamily::INET6);
        assert_eq!(at.ip().unwrap().ip(), Ipv6Addr::LOCALHOST);
        assert_ne!(at.port(), Some(0));
        let c = v6();
        connect(&c, &at.to_sockaddr().unwrap()).unwrap();
        let s = accept(&l).unwrap();
        assert_eq!(conv(getpeername(&s).unwrap().unwrap()), conv(getsockname(&c).unwrap()));
        assert_eq!(conv(getpeername(&c).unwrap().unwrap()), at);
        assert_eq!(conv(getsockname(&s).unwrap()), at);
    }

    #[test]
    fn ipv4_real_socket() {
        let s = socket_with(AddressFamily::INET, SocketType::STREAM, SocketFlags::CLOEXEC, None).unwrap();
        bind(&s, &Address::from(SocketAddr::from(([127, 0, 0, 1], 0))).to_sockaddr().unwrap()).unwrap();
        let got = conv(getsockname(&s).unwrap());
        assert_eq!(got.ip().unwrap().ip(), Ipv4Addr::LOCALHOST);
        assert_eq!(got.family().unwrap(), AddressFamily::INET);
    }

    #[test]
    fn other_families_are_an_error() {
        let nl = rustix::net::netlink::SocketAddrNetlink::new(0, 0);
        let err = Address::from_sockaddr(&SocketAddrAny::from(nl)).unwrap_err();
        assert_eq!(err, AddressError::UnsupportedFamily { family: AddressFamily::NETLINK.as_raw() });
        assert!(err.to_string().contains("not supported"), "{err}");
    }

    #[test]
    fn std_unix_addresses_convert() {
        let tmp = TempSock::new("std");
        let l = std::os::unix::net::UnixListener::bind(&tmp.0).unwrap();
        let a = Address::try_from(&l.local_addr().unwrap()).unwrap();
        assert_eq!(a.unix_path(), Some(tmp.0.as_path()));
        let c = std::os::unix::net::UnixStream::connect(&tmp.0).unwrap();
        assert!(Address::try_from(&c.local_addr().unwrap()).unwrap().is_unix_unnamed());
        let (pair, _other) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(Address::try_from(&pair.local_addr().unwrap()).unwrap().is_unix_unnamed());
        use std::os::linux::net::SocketAddrExt;
        let name = abstract_name("std");
        let std_addr = std::os::unix::net::SocketAddr::from_abstract_name(&name).unwrap();
        let l = std::os::unix::net::UnixListener::bind_addr(&std_addr).unwrap();
        let a = Address::try_from(&l.local_addr().unwrap()).unwrap();
        assert_eq!(a.unix_abstract_name(), Some(&name[..]));
    }

    proptest! {
        /// Any name either builds an address that survives the trip through
        /// rustix unchanged, or is refused with an error; nothing panics.
        #[test]
        fn unix_names_round_trip_or_are_refused(
            bytes in proptest::collection::vec(any::<u8>(), 0..140),
            prefix in prop_oneof![Just(&b""[..]), Just(&b"@"[..]), Just(&b"\0"[..]), Just(&b"/"[..])],
        ) {
            let mut name = prefix.to_vec();
            name.extend_from_slice(&bytes);
            match Address::unix(OsStr::from_bytes(&name)) {
                Ok(a) => {
                    prop_assert_eq!(Address::from_sockaddr(&a.to_sockaddr().unwrap()), Ok(a.clone()));
                    let _ = a.to_string();
                }
                Err(e) => {
                    let _ = e.to_string();
                    let is_abstract = matches!(name.first(), Some(b'@') | Some(0));
                    let body = if is_abstract { &name[1..] } else { &name[..] };
                    prop_assert!(
                        (is_abstract && body.len() > MAX_UNIX_ABSTRACT_NAME_LEN)
                            || (!is_abstract
                                && (body.is_empty() || body.contains(&0) || body.len() > MAX_UNIX_PATH_LEN)),
                        "refused a valid name: {:?}", e
                    );
                }
            }
        }

        /// Whatever `sun_path` bytes the kernel could report (up to the
        /// storage size), reading them never panics, and a name read back
        /// converts to rustix and back unchanged.
        #[test]
        fn any_sun_path_reads_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..126)) {
            if let Ok(u) = UnixAddr::from_sun_path(&bytes) {
                let a = Address::Unix(u);
                prop_assert_eq!(Address::from_sockaddr(&a.to_sockaddr().unwrap()), Ok(a.clone()));
            }
        }
    }
}
