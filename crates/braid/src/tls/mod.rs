//! TLS on rustls (ring provider), as a protocol that wraps a protocol
//! over any transport (Twisted's `TLSMemoryBIOProtocol`): TCP, UNIX
//! sockets, or a test's `StringTransport` all carry it the same way.
//!
//! - [`Reactor::listen_ssl`] and [`Reactor::connect_ssl`] are `listen_tcp`
//!   and `connect_tcp` with TLS; for UNIX sockets (or any other listening
//!   call) wrap the factory in a [`TlsFactory`] or [`TlsClientFactory`].
//! - [`ServerConfig`] and [`ClientConfig`] are built from PEM files
//!   ([`Identity`], [`Roots`]) with SNI, ALPN, client certificates and a
//!   lowest version; each error names the file and what is wrong.
//! - The application's transport has a [`Tls`] side
//!   ([`Transport::tls`](crate::Transport::tls)): peer certificates,
//!   ALPN, SNI name, version, [`Tls::when_handshake_completed`], and
//!   [`Tls::start_tls_server`] / [`Tls::start_tls_client`] on a
//!   connection made with [`StartTlsFactory`].
//! - [`Transport::start_tls_server`](crate::Transport::start_tls_server) /
//!   [`start_tls_client`](crate::Transport::start_tls_client) switch any
//!   live stream connection to TLS (Twisted's `startTLS`): the layer is
//!   put between the connection and its protocol in place.
//!
//! Semantics through the layer:
//! - `connection_made` reaches the application at once (Twisted's
//!   order); writes made before the handshake finishes are queued, then
//!   sent encrypted. Reading is not paused for the application until the
//!   handshake is done, since the handshake needs it.
//! - `lose_connection` sends close_notify (after the handshake and after a
//!   registered producer unregisters), flushes and closes; the application
//!   gets `ConnectionDone`. `abort_connection` resets at once.
//! - A peer's close_notify is `ConnectionDone`; an end of stream without
//!   it is `ConnectionLost` (possible truncation). On TLS 1.3 a protocol
//!   with half-close gets `read_connection_lost` for the peer's
//!   close_notify and may go on writing; on TLS 1.2, where close_notify
//!   must be answered, we answer it and close.
//! - `lose_write_connection` sends close_notify and shuts down the write
//!   side below (on TLS 1.2 the peer will then close the whole connection).
//! - Producers: the application's producer is paced by the ciphertext
//!   buffered below once the handshake is done, and by the queued
//!   plaintext before; `buffered()` counts both.
//! - Memory: the session runs on rustls's unbuffered API, decrypting and
//!   encrypting in buffers each reactor lends its TLS connections for one
//!   call, so an idle connection holds only rustls's session state (no
//!   read or write buffer); a record split across reads is kept until it
//!   completes (at most 80 KiB, else the connection fails).
//! - Bad input (not TLS, a bad certificate, a name mismatch, a truncated
//!   record, a handshake that does not finish in 30 s by default) ends
//!   that connection only, with a [`TlsError`] (or `TimedOut`,
//!   `ConnectionLost`) as the reason.

mod config;
mod protocol;
mod session;

use std::fmt;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

pub use config::{
    ClientAuth, ClientConfig, ClientConfigBuilder, Identity, Roots, ServerConfig, ServerConfigBuilder,
    TlsVersion, DEFAULT_HANDSHAKE_TIMEOUT,
};
pub use protocol::TlsProtocol;

use crate::error::{Error, Failure};
use crate::protocol::{ClientFactory, Connector, Factory, IntoFactory, Protocol, SharedFactory};
use crate::reactor::{Reactor, ReactorTime};
use crate::stream::{Address, StreamConnector};
use crate::tcp::{ListeningPort, ToListenAddr};
use crate::transport::Tls;
use protocol::{ReasonSlot, Side, Timer, TlsState};

/// Why TLS ended a connection: what rustls said, and whether it was in the
/// handshake (a bad certificate, a name mismatch, not TLS at all) or later
/// (a bad record).
#[derive(Debug)]
pub struct TlsError {
    during_handshake: bool,
    error: Option<rustls::Error>,
    message: String,
}

impl TlsError {
    pub(crate) fn handshake(e: rustls::Error) -> Self {
        TlsError { during_handshake: true, message: e.to_string(), error: Some(e) }
    }

    pub(crate) fn session(e: rustls::Error) -> Self {
        TlsError { during_handshake: false, message: e.to_string(), error: Some(e) }
    }

    /// True if the handshake failed (as opposed to a later record).
    pub fn during_handshake(&self) -> bool {
        self.during_handshake
    }

    /// The rustls error, if rustls raised it.
    pub fn rustls_error(&self) -> Option<&rustls::Error> {
        self.error.as_ref()
    }
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.during_handshake {
            write!(f, "TLS handshake failed: {}", self.message)
        } else {
            write!(f, "TLS error: {}", self.message)
        }
    }
}

impl std::error::Error for TlsError {}

impl crate::Transport {
    /// Starts TLS on this live connection as the server side (Twisted's
    /// `startTLS`): what was written before goes out in the clear, in
    /// order; what is written after is encrypted (queued until the
    /// handshake is done); every byte received after this call is read as
    /// TLS. Bytes that arrived with the ones that asked for TLS (in the
    /// same `data_received`) stay the application's, as in Twisted: a
    /// peer should wait for the answer before it starts its handshake.
    ///
    /// Works on every stream connection (TCP, UNIX, adopted) and on one
    /// made by a [`StartTlsFactory`]; the transport the application holds
    /// becomes the TLS transport (its [`tls`](crate::Transport::tls) side
    /// appears), and the application's producer and pause move with it.
    /// Fails if TLS is already on, or the connection is closing.
    pub fn start_tls_server(&self, config: &ServerConfig) -> Result<(), Error> {
        self.start_tls(Side::Server(config.clone()))
    }

    /// The same as the client side, checking the server's certificate
    /// against `server_name`.
    pub fn start_tls_client(&self, config: &ClientConfig, server_name: &str) -> Result<(), Error> {
        let name = config::server_name(server_name)?;
        self.start_tls(Side::Client(config.clone(), name))
    }

    fn start_tls(&self, side: Side) -> Result<(), Error> {
        if let Some(tls) = self.tls() {
            return tls.state()?.start_tls(side);
        }
        self.ops().clone().insert_layer(Box::new(move |below, reactor| {
            TlsProtocol::layered(side, timer_for(reactor), below)
        }))
    }
}

impl Tls {
    /// Starts TLS on a connection that was in the clear (one built by a
    /// [`StartTlsFactory`]), as the server side; the same as
    /// [`Transport::start_tls_server`](crate::Transport::start_tls_server). What was written before
    /// goes out in the clear, what is written after is encrypted (queued
    /// until the handshake is done); every byte received after this call
    /// is read as TLS. Fails if TLS is already on, or the connection is
    /// closing.
    pub fn start_tls_server(&self, config: &ServerConfig) -> Result<(), Error> {
        self.state()?.start_tls(Side::Server(config.clone()))
    }

    /// The same as the client side, checking the server's certificate
    /// against `server_name`.
    pub fn start_tls_client(&self, config: &ClientConfig, server_name: &str) -> Result<(), Error> {
        let name = config::server_name(server_name)?;
        self.state()?.start_tls(Side::Client(config.clone(), name))
    }

    fn state(&self) -> Result<Rc<TlsState>, Error> {
        self.ops.clone().as_any().downcast::<TlsState>().map_err(|_| {
            Error::io(
                "starting TLS",
                std::io::Error::new(std::io::ErrorKind::Unsupported, "this transport cannot start TLS"),
            )
        })
    }
}

fn timer_for(reactor: &Reactor) -> Timer {
    Timer::Reactor(reactor.weak())
}

/// Wraps a factory so that every protocol it builds runs over TLS as the
/// server side. Hand it to any listening call: `listen_tcp`,
/// `listen_unix`, `adopt_stream_port`.
pub struct TlsFactory {
    inner: SharedFactory<dyn Factory>,
    config: ServerConfig,
    timer: Timer,
}

impl TlsFactory {
    /// TLS with `config` over the protocols `factory` builds; the
    /// handshake timeout runs on `reactor` (held weakly).
    pub fn new(reactor: &Reactor, factory: impl IntoFactory, config: ServerConfig) -> TlsFactory {
        TlsFactory { inner: factory.into_shared(), config, timer: timer_for(reactor) }
    }

    /// The same with the handshake timeout on another clock (a test's
    /// `testing::Clock`).
    pub fn with_clock(
        clock: Rc<dyn ReactorTime>,
        factory: impl IntoFactory,
        config: ServerConfig,
    ) -> TlsFactory {
        TlsFactory { inner: factory.into_shared(), config, timer: Timer::Clock(clock) }
    }
}

impl Factory for TlsFactory {
    fn build_protocol(&mut self, addr: &Address) -> Option<Box<dyn Protocol>> {
        let app = self.inner.build(addr)?;
        Some(Box::new(TlsProtocol::new(app, Some(Side::Server(self.config.clone())), self.timer.clone())))
    }
    fn start_factory(&mut self) {
        self.inner.do_start()
    }
    fn stop_factory(&mut self) {
        self.inner.do_stop()
    }
}

/// `Factory` and `ClientFactory` for a wrapper with fields `inner`,
/// `timer` and `last` and a `side()`: each protocol it builds runs inside a
/// TLS layer, and a client factory hears the reason the application was
/// given (a TLS error, say), not how the transport below ended.
macro_rules! wrapping_factory {
    ($name:ident) => {
        impl<F: Factory> Factory for $name<F> {
            fn build_protocol(&mut self, addr: &Address) -> Option<Box<dyn Protocol>> {
                let app = self.inner.build_protocol(addr)?;
                let p = TlsProtocol::new(app, self.side(), self.timer.clone());
                p.report_to(self.last.clone());
                Some(Box::new(p))
            }
            fn start_factory(&mut self) {
                self.inner.start_factory()
            }
            fn stop_factory(&mut self) {
                self.inner.stop_factory()
            }
        }

        impl<F: ClientFactory> ClientFactory for $name<F> {
            fn started_connecting(&mut self, connector: &dyn Connector) {
                self.inner.started_connecting(connector)
            }
            fn client_connection_failed(&mut self, connector: &dyn Connector, reason: Failure) {
                self.inner.client_connection_failed(connector, reason)
            }
            fn client_connection_lost(&mut self, connector: &dyn Connector, reason: Failure) {
                let reason = self.last.borrow_mut().take().unwrap_or(reason);
                self.inner.client_connection_lost(connector, reason)
            }
        }
    };
}

/// Wraps a factory so that every protocol it builds starts in the clear
/// and may switch to TLS with [`Tls::start_tls_server`] or
/// [`Tls::start_tls_client`] (Twisted's `startTLS`), on either side.
pub struct StartTlsFactory<F> {
    inner: F,
    timer: Timer,
    last: ReasonSlot,
}

impl<F> StartTlsFactory<F> {
    /// Plain connections that can start TLS later; the handshake timeout
    /// runs on `reactor` (held weakly).
    pub fn new(reactor: &Reactor, factory: F) -> Self {
        StartTlsFactory { inner: factory, timer: timer_for(reactor), last: ReasonSlot::default() }
    }
}

impl<F> StartTlsFactory<F> {
    fn side(&self) -> Option<Side> {
        None
    }
}

wrapping_factory!(StartTlsFactory);

/// Wraps a client factory so that every protocol it builds runs over TLS
/// as the client side, checking the server's certificate against one
/// name. Hand it to `connect_tcp` or `connect_unix`.
pub struct TlsClientFactory<F> {
    inner: F,
    config: ClientConfig,
    name: rustls::pki_types::ServerName<'static>,
    timer: Timer,
    last: ReasonSlot,
}

impl<F> TlsClientFactory<F> {
    /// TLS with `config` to the server called `server_name` (a DNS name or
    /// an IP literal); fails if that is neither.
    pub fn new(
        reactor: &Reactor,
        factory: F,
        config: ClientConfig,
        server_name: &str,
    ) -> Result<Self, Error> {
        let name = config::server_name(server_name)?;
        Ok(TlsClientFactory {
            inner: factory,
            config,
            name,
            timer: timer_for(reactor),
            last: ReasonSlot::default(),
        })
    }
}

impl<F> TlsClientFactory<F> {
    fn side(&self) -> Option<Side> {
        Some(Side::Client(self.config.clone(), self.name.clone()))
    }
}

wrapping_factory!(TlsClientFactory);

impl Reactor {
    /// Listens for TLS connections over TCP on `addr` (Twisted's
    /// `listenSSL`): `listen_tcp` with every protocol wrapped in TLS with
    /// `config`.
    pub fn listen_ssl(
        &self,
        addr: impl ToListenAddr,
        factory: impl IntoFactory,
        config: ServerConfig,
        backlog: u32,
    ) -> Result<ListeningPort, Error> {
        self.listen_tcp(addr, TlsFactory::new(self, factory, config), backlog)
    }

    /// Connects over TCP and TLS to `host:port` (Twisted's `connectSSL`),
    /// checking the server's certificate against `host`. Fails at once if
    /// `host` cannot be a TLS server name; everything else is reported to
    /// `factory`, as with `connect_tcp`.
    pub fn connect_ssl(
        &self,
        host: &str,
        port: u16,
        factory: impl ClientFactory + 'static,
        config: ClientConfig,
        timeout: Option<Duration>,
        bind: Option<SocketAddr>,
    ) -> Result<StreamConnector, Error> {
        let factory = TlsClientFactory::new(self, factory, config, host)?;
        Ok(self.connect_tcp(host, port, factory, timeout, bind))
    }
}

#[cfg(test)]
mod tests;
