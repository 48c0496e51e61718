//! Byte streams: the one connection implementation every stream kind
//! (TCP, UNIX sockets and pipe ends today; adopted sockets next)
//! shares, over a small trait that says what each kind does differently,
//! and the pieces every kind uses: one [`Address`] type and the
//! UNIX-specific socket I/O (peer credentials, descriptor passing).

pub mod address;
mod adopt;
pub(crate) mod connection;
pub mod connector;
pub(crate) mod kind;
pub(crate) mod listener;
// Driven only by its tests until the processes issue spawns children.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) mod pipe;
pub mod splice;
#[cfg(any(target_os = "linux", target_os = "android"))]
pub mod unix_io;

pub use address::{Address, AddressError, UnixAddr, UnixAddrKind};
pub use adopt::systemd_sockets;
pub use connector::StreamConnector;
pub use splice::splice_streams;
