//! braid: an event-driven networking engine with Twisted's reactor design.
//!
//! One [`Reactor`] per thread waits on file descriptors and timers and calls
//! your callbacks. Its polling [`Backend`] (select, poll, epoll, io_uring) is chosen at
//! run time. See the crate README for a tour.
//!
//! ```
//! use std::time::Duration;
//! use braid::{Backend, Reactor};
//!
//! let reactor = Reactor::new(Backend::Poll).unwrap();
//! let r = reactor.clone();
//! reactor.call_later(Duration::from_millis(10), move || {
//!     r.stop().unwrap();
//! });
//! reactor.run_without_signal_handlers().unwrap();
//! ```
//!
//! `ARCHITECTURE.md` at the repository root describes the layers, who owns
//! whom, and how one pass of the loop runs.

// `unsafe` is confined to the two modules that talk to the OS directly;
// every block there carries a `// SAFETY:` comment (enforced by
// `clippy::undocumented_unsafe_blocks`, see the workspace lints).
#![deny(unsafe_code)]

pub mod app;
#[allow(unsafe_code)]
pub mod backend;
pub mod datagram;
pub mod defer;
pub mod endpoints;
pub mod error;
pub mod process;
pub mod protocol;
pub mod protocols;
pub mod reactor;
pub mod resolver;
pub mod stdio;
pub mod stream;
#[allow(unsafe_code)]
mod sys;
pub mod task;
pub mod tcp;
pub mod testing;
pub mod tls;
pub mod transport;
pub mod udp;
pub mod unix;
pub mod unix_datagram;

pub use backend::Backend;
pub use datagram::{DatagramProtocol, DatagramTransport, SharedDatagram};
pub use defer::Deferred;
pub use error::{Error, Failure};
pub use protocol::{
    ClientFactory, Connector, Factory, FileDescriptorReceiver, HalfCloseable, Protocol,
    ReconnectingClientFactory, SharedFactory,
};
pub use reactor::{install, reactor, try_reactor, Reactor};
pub use reactor::{DelayedCall, FileDescriptor, Phase, ReactorTime, Remote};
pub use stream::Address;
pub use stream::StreamConnector;
pub use tcp::ListeningPort;
pub use transport::{Producer, Tcp, TcpOptions, Tls, TlsOptions, Transport, Unix, UnixOptions};
