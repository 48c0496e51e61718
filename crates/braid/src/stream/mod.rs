//! Byte streams: the one connection implementation every stream kind
//! (TCP today; UNIX sockets, pipes and adopted sockets next) shares, over a
//! small trait that says what each kind does differently, and the pieces
//! every kind uses: one [`Address`] type and the UNIX-specific socket I/O
//! (peer credentials, descriptor passing).

pub mod address;
mod adopt;
pub(crate) mod connection;
pub(crate) mod kind;
pub(crate) mod listener;
#[cfg(any(target_os = "linux", target_os = "android"))]
pub mod unix_io;

pub use address::{Address, AddressError, UnixAddr, UnixAddrKind};
