//! The stream layer shared by every byte-stream kind (TCP, UNIX sockets,
//! pipes): addresses and the UNIX-specific socket I/O so far.
//!
//! These are building blocks: the connection, listener and connector that use
//! them live beside them as they are ported onto this layer.

pub mod address;
#[cfg(any(target_os = "linux", target_os = "android"))]
pub mod unix_io;

pub use address::{Address, AddressError, UnixAddr, UnixAddrKind};
