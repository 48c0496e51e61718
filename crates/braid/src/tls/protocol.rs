//! The TLS layer itself: a protocol that sits on any transport, runs a
//! rustls connection over the bytes that transport carries, and gives the
//! application protocol a transport of its own (Twisted's
//! `TLSMemoryBIOProtocol`).
//!
//! Two rules keep it re-entrancy safe: the rustls connection is never
//! borrowed while user code runs (plaintext is gathered first, delivered
//! after), and the application protocol is told `connection_lost` only from
//! this layer's own `connection_lost`, which the transport below calls from
//! the loop. A TLS failure therefore records its reason and closes the
//! transport below; the application hears that reason when the close lands.

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::rc::{Rc, Weak};
use std::time::Duration;

use crate::defer::Deferred;
use crate::error::{Error, Failure};
use crate::protocol::{FileDescriptorReceiver, HalfCloseable, Protocol};
use crate::reactor::{DelayedCall, ReactorTime, WeakReactor};
use crate::stream::Address;
use crate::transport::{
    Layer, Producer, TcpOptions, TlsOptions, Transport, TransportOps, UnixOptions, DEFAULT_HIGH_WATER,
};

use super::config::{ClientConfig, ServerConfig};
use super::session::{OutBuf, Session};
use super::TlsError;

/// Where the handshake timer is scheduled. A reactor is held weakly, as
/// every object the reactor itself holds must be.
#[derive(Clone)]
pub(crate) enum Timer {
    None,
    Reactor(WeakReactor),
    Clock(Rc<dyn ReactorTime>),
}

/// Buffers every TLS connection on a reactor borrows for one call (the
/// ciphertext going out, the plaintext coming in), so a connection
/// allocates nothing per chunk and an idle one holds no buffer.
#[derive(Default)]
struct Scratch {
    out: Cell<OutBuf>,
    plain: Cell<Vec<u8>>,
    incoming: Cell<Vec<u8>>,
}

/// A borrowed scratch buffer grows to what a pass needs; one that grew
/// beyond this is given back to the allocator.
const SCRATCH_KEEP: usize = 1 << 20;

impl Timer {
    fn scratch(&self) -> Option<Rc<Scratch>> {
        match self {
            Timer::Reactor(r) => r.get().map(|r| r.extension::<Scratch>()),
            Timer::None | Timer::Clock(_) => None,
        }
    }

    fn schedule(&self, delay: Duration, f: Box<dyn FnOnce()>) -> Option<DelayedCall> {
        match self {
            Timer::None => None,
            Timer::Reactor(r) => r.get().map(|r| r.schedule(delay, f)),
            Timer::Clock(c) => Some(c.schedule(delay, f)),
        }
    }
}

/// Which side of the handshake this end plays, with what it needs.
pub(crate) enum Side {
    Server(ServerConfig),
    Client(ClientConfig, rustls::pki_types::ServerName<'static>),
}

impl Side {
    fn timeout(&self) -> Option<Duration> {
        match self {
            Side::Server(c) => c.handshake_timeout,
            Side::Client(c, _) => c.handshake_timeout,
        }
    }

    fn connect(self) -> Result<Session, rustls::Error> {
        Session::new(self)
    }
}

/// How far the TLS session has come.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// No TLS yet: bytes pass through in the clear until `start_tls`.
    Plain,
    /// Handshake under way; application writes are queued.
    Handshaking,
    /// Handshake done; writes are encrypted as they come.
    Established,
    /// A TLS error (or the handshake timeout) ended the session; its
    /// reason is recorded and the transport below is closing.
    Failed,
}

/// How far the connection is from closed, as the application sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Life {
    Open,
    /// `lose_connection` was called: close_notify goes out once the
    /// handshake is done and any producer unregistered.
    Disconnecting,
    /// close_notify sent (or the session failed) and the transport below
    /// told to close.
    Closing,
    /// `abort_connection`: the transport below is resetting.
    Aborting,
    /// The application was told `connection_lost`.
    Lost,
}

/// Our write side, for half-close.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WriteSide {
    Open,
    /// `lose_write_connection`: close_notify once the handshake is done.
    ShutdownAsked,
    /// close_notify sent; the write side below is shutting down.
    NotifySent,
    Closed,
}

/// What the peer has said about its end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReadSide {
    Open,
    /// The peer sent close_notify.
    CloseNotify,
    /// The transport below reached end of stream.
    Eof,
}

/// The application's producer and whether the transport below knows it.
struct AppProducer {
    producer: Rc<dyn Producer>,
    streaming: bool,
    /// Registered (as a [`Membrane`]) with the transport below. Not while
    /// handshaking: queued plaintext is not in that transport's buffer, so
    /// it could not pace the producer.
    below: bool,
    /// Paused by us because the pre-handshake queue passed the high mark.
    paused_by_queue: bool,
}

/// Everything one TLS connection holds; the application's transport is an
/// `Rc` of it, and so is the protocol the transport below drives.
pub(crate) struct TlsState {
    me: Weak<TlsState>,
    timer: Timer,
    /// What `start_tls` or `connection_made` turns into a session.
    side: RefCell<Option<Side>>,
    /// Never borrowed while user code runs.
    tls: RefCell<Option<Session>>,
    lower: RefCell<Option<Transport>>,
    /// The peer's address, kept after the transport below is let go.
    peer: RefCell<Option<Address>>,
    app: RefCell<Option<Box<dyn Protocol>>>,
    phase: Cell<Phase>,
    life: Cell<Life>,
    write_side: Cell<WriteSide>,
    read_side: Cell<ReadSide>,
    /// The application paused reading (applied below once the handshake,
    /// which needs reading, is done).
    app_paused: Cell<bool>,
    /// Plaintext written before the handshake finished.
    queued: RefCell<Vec<u8>>,
    limits: Cell<(usize, usize)>,
    producer: RefCell<Option<AppProducer>>,
    /// Why the session ended, when it was this layer's doing; the
    /// application gets it instead of what the transport below reports.
    reason: RefCell<Option<Failure>>,
    handshake_timer: RefCell<Option<DelayedCall>>,
    waiters: RefCell<Vec<Deferred<()>>>,
    /// A close is due at the end of the reactor's pass.
    close_scheduled: Cell<bool>,
    /// Plaintext decrypted while the application was paused (it came in
    /// the same read as the end of the handshake, or before the pause
    /// reached the transport below), delivered once it resumes.
    held: RefCell<Vec<u8>>,
    /// The peer's close_notify came behind held plaintext (or while paused).
    held_close: Cell<bool>,
    /// Held plaintext is due for delivery at the end of the reactor's pass.
    release_scheduled: Cell<bool>,
    /// Where the application's final reason is copied, for a client
    /// factory to report instead of how the transport below ended.
    report: RefCell<Option<ReasonSlot>>,
}

/// Holds the reason a TLS connection ended, once it has.
pub(crate) type ReasonSlot = Rc<RefCell<Option<Failure>>>;

/// The protocol that the transport below drives: TCP, UNIX, a test's
/// `StringTransport`, anything with a [`Transport`]. It wraps the
/// application protocol, which gets a TLS transport in `connection_made`.
///
/// `connection_made` reaches the application at once, before the
/// handshake (Twisted's order): what it writes is queued and sent,
/// encrypted, once the handshake is done. Use
/// [`Tls::when_handshake_completed`](crate::transport::Tls::when_handshake_completed)
/// on its transport to act when it is.
pub struct TlsProtocol {
    state: Rc<TlsState>,
}

impl TlsProtocol {
    /// Wraps `app` as the server side of a TLS connection. `clock` runs
    /// the handshake timeout (`None`: no timeout).
    pub fn server(app: Box<dyn Protocol>, config: &ServerConfig, clock: Option<Rc<dyn ReactorTime>>) -> Self {
        Self::new(app, Some(Side::Server(config.clone())), clock.map_or(Timer::None, Timer::Clock))
    }

    /// Wraps `app` as the client side of a TLS connection to `server_name`
    /// (a DNS name or an IP literal, checked against the certificate).
    pub fn client(
        app: Box<dyn Protocol>,
        config: &ClientConfig,
        server_name: &str,
        clock: Option<Rc<dyn ReactorTime>>,
    ) -> Result<Self, Error> {
        let name = super::config::server_name(server_name)?;
        Ok(Self::new(app, Some(Side::Client(config.clone(), name)), clock.map_or(Timer::None, Timer::Clock)))
    }

    /// Wraps `app` in a layer that passes bytes through in the clear until
    /// the application calls `start_tls` on its transport.
    pub fn plain(app: Box<dyn Protocol>, clock: Option<Rc<dyn ReactorTime>>) -> Self {
        Self::new(app, None, clock.map_or(Timer::None, Timer::Clock))
    }

    /// A session started on a live connection (`Transport::start_tls_*`):
    /// `lower` is the connection's own side, below the layer. The
    /// application's protocol comes later, through [`Layer::adopt`], once
    /// no call into it is on the stack; it got `connection_made` long ago.
    pub(crate) fn layered(side: Side, timer: Timer, lower: Transport) -> Box<dyn Layer> {
        let layer = Self::build(None, None, timer);
        let s = &layer.state;
        *s.peer.borrow_mut() = Some(lower.peer());
        *s.lower.borrow_mut() = Some(lower);
        s.begin(side);
        Box::new(layer)
    }

    pub(crate) fn new(app: Box<dyn Protocol>, side: Option<Side>, timer: Timer) -> Self {
        Self::build(Some(app), side, timer)
    }

    fn build(app: Option<Box<dyn Protocol>>, side: Option<Side>, timer: Timer) -> Self {
        let state = Rc::new_cyclic(|me| TlsState {
            me: me.clone(),
            timer,
            side: RefCell::new(side),
            tls: RefCell::new(None),
            lower: RefCell::new(None),
            peer: RefCell::new(None),
            app: RefCell::new(app),
            phase: Cell::new(Phase::Plain),
            life: Cell::new(Life::Open),
            write_side: Cell::new(WriteSide::Open),
            read_side: Cell::new(ReadSide::Open),
            app_paused: Cell::new(false),
            queued: RefCell::new(Vec::new()),
            limits: Cell::new((DEFAULT_HIGH_WATER, 0)),
            producer: RefCell::new(None),
            reason: RefCell::new(None),
            handshake_timer: RefCell::new(None),
            waiters: RefCell::new(Vec::new()),
            close_scheduled: Cell::new(false),
            held: RefCell::new(Vec::new()),
            held_close: Cell::new(false),
            release_scheduled: Cell::new(false),
            report: RefCell::new(None),
        });
        TlsProtocol { state }
    }

    /// The transport the application protocol was given.
    pub fn transport(&self) -> Transport {
        Transport::new(self.state.clone())
    }

    /// Copies the application's final reason into `slot` when it is told.
    pub(crate) fn report_to(&self, slot: ReasonSlot) {
        *self.state.report.borrow_mut() = Some(slot);
    }
}

impl Layer for TlsProtocol {
    fn upper(&self) -> Rc<dyn TransportOps> {
        self.state.clone()
    }

    fn adopt(self: Box<Self>, app: Box<dyn Protocol>) -> Box<dyn Protocol> {
        *self.state.app.borrow_mut() = Some(app);
        self
    }
}

/// The transport below dropped this layer (after `connection_lost`, or
/// without it if the application's `connection_made` panicked): whatever
/// is left is let go, so the application and its transport, which hold
/// each other, are freed.
impl Drop for TlsProtocol {
    fn drop(&mut self) {
        let s = &self.state;
        s.cancel_timer();
        s.life.set(Life::Lost);
        let app = s.app.try_borrow_mut().ok().and_then(|mut a| a.take());
        drop(app);
        s.lower.borrow_mut().take();
        s.producer.borrow_mut().take();
        s.waiters.borrow_mut().clear();
        s.queued.borrow_mut().clear();
    }
}

impl Protocol for TlsProtocol {
    fn connection_made(&mut self, transport: Transport) {
        let s = &self.state;
        *s.peer.borrow_mut() = Some(transport.peer());
        *s.lower.borrow_mut() = Some(transport);
        if let Some(side) = s.side.borrow_mut().take() {
            s.begin(side);
        }
        let me = Transport::new(s.clone());
        s.call_app(|p| p.connection_made(me));
    }

    fn data_received(&mut self, data: &[u8]) {
        // rustls decrypts in place: a copy it may scramble.
        let scratch = self.state.timer.scratch();
        let mut copy = scratch.as_ref().map(|s| s.incoming.take()).unwrap_or_default();
        copy.clear();
        copy.extend_from_slice(data);
        self.state.receive(&mut copy);
        if let Some(s) = scratch {
            if copy.capacity() <= SCRATCH_KEEP {
                s.incoming.set(copy);
            }
        }
    }

    fn data_received_mut(&mut self, data: &mut [u8]) {
        self.state.receive(data)
    }

    fn connection_lost(&mut self, reason: Failure) {
        self.state.lost(reason)
    }

    fn as_half_closeable(&mut self) -> Option<&mut dyn HalfCloseable> {
        // Always: an end of stream must come here, to tell a clean TLS
        // close from a truncated one.
        Some(self)
    }

    fn as_fd_receiver(&mut self) -> Option<&mut dyn FileDescriptorReceiver> {
        Some(self)
    }
}

/// Descriptors a UNIX socket peer passes go to the application if it
/// takes them (they are closed otherwise), as without TLS.
impl FileDescriptorReceiver for TlsProtocol {
    fn file_descriptor_received(&mut self, fd: std::os::fd::OwnedFd) {
        self.state.call_app(move |p| match p.as_fd_receiver() {
            Some(r) => r.file_descriptor_received(fd),
            None => drop(fd),
        });
    }
}

impl HalfCloseable for TlsProtocol {
    fn read_connection_lost(&mut self) {
        self.state.eof()
    }

    fn write_connection_lost(&mut self) {
        let s = &self.state;
        s.write_side.set(WriteSide::Closed);
        s.call_app(|p| {
            if let Some(h) = p.as_half_closeable() {
                h.write_connection_lost();
            }
        });
    }
}

/// Stands between the transport below and the application's producer:
/// the transport paces it by its (ciphertext) buffer.
struct Membrane {
    state: Weak<TlsState>,
}

impl Membrane {
    fn with(&self, f: impl FnOnce(&dyn Producer)) {
        let Some(s) = self.state.upgrade() else { return };
        let p = s.producer.borrow().as_ref().map(|p| p.producer.clone());
        if let Some(p) = p {
            f(&*p);
        }
    }
}

impl Producer for Membrane {
    fn pause_producing(&self) {
        self.with(|p| p.pause_producing())
    }
    fn resume_producing(&self) {
        self.with(|p| p.resume_producing())
    }
    fn stop_producing(&self) {
        // The application's producer is stopped when the application is
        // told the connection is lost, once, by this layer.
    }
}

impl TlsState {
    fn lower(&self) -> Option<Transport> {
        self.lower.borrow().clone()
    }

    fn call_app(&self, f: impl FnOnce(&mut dyn Protocol)) {
        // A borrow conflict would mean a re-entrant call, which the rules
        // above exclude; skipping is safer than panicking inside the loop.
        if let Ok(mut app) = self.app.try_borrow_mut() {
            if let Some(p) = app.as_mut() {
                f(&mut **p);
            }
        }
    }

    /// Creates the session and sends what it starts with (a client's
    /// hello), and arms the handshake timer.
    fn begin(&self, side: Side) {
        let timeout = side.timeout();
        match side.connect() {
            Ok(conn) => {
                *self.tls.borrow_mut() = Some(conn);
                self.phase.set(Phase::Handshaking);
            }
            Err(e) => {
                self.phase.set(Phase::Handshaking);
                return self.fail(Failure::new(TlsError::handshake(e)));
            }
        }
        self.release_below();
        if let Some(t) = timeout {
            let me = self.me.clone();
            let call = self.timer.schedule(
                t,
                Box::new(move || {
                    if let Some(s) = me.upgrade() {
                        if s.phase.get() == Phase::Handshaking {
                            let why = Failure::new(Error::TimedOut)
                                .context(format!("the TLS handshake did not finish within {t:?}"));
                            s.fail_with(why, true);
                        }
                    }
                }),
            );
            *self.handshake_timer.borrow_mut() = call;
        }
        self.send_tls();
    }

    /// Moves whatever rustls has to send to the transport below.
    fn send_tls(&self) {
        let scratch = self.timer.scratch();
        let mut out = scratch.as_ref().map(|s| s.out.take()).unwrap_or_default();
        out.clear();
        {
            let mut tls = self.tls.borrow_mut();
            if let Some(conn) = tls.as_mut() {
                conn.flush(&mut out);
            }
        }
        self.send_out(scratch, out);
    }

    /// Sends `out` below and gives the buffer back to the scratch.
    fn send_out(&self, scratch: Option<Rc<Scratch>>, mut out: OutBuf) {
        if !out.is_empty() {
            if let Some(lower) = self.lower() {
                // The transport sends what it can at once and copies only
                // the rest: the buffer goes back for the next call.
                lower.write(out.as_slice());
            }
        }
        if let Some(s) = scratch {
            out.clear();
            if out.footprint() > SCRATCH_KEEP {
                out = OutBuf::default();
            }
            s.out.set(out);
        }
    }

    /// Encrypts `data` and sends it.
    fn encrypt(&self, data: &[u8]) {
        self.encrypt_all(&[data])
    }

    /// Encrypts each piece and sends them all with one write below.
    fn encrypt_all(&self, data: &[&[u8]]) {
        let scratch = self.timer.scratch();
        let mut out = scratch.as_ref().map(|s| s.out.take()).unwrap_or_default();
        out.clear();
        let mut failed = None;
        {
            let mut tls = self.tls.borrow_mut();
            let Some(conn) = tls.as_mut() else { return };
            for d in data.iter().filter(|d| !d.is_empty()) {
                if let Err(e) = conn.encrypt(d, &mut out) {
                    failed = Some(e);
                    break;
                }
            }
        }
        self.send_out(scratch, out);
        if let Some(e) = failed {
            self.fail(Failure::new(TlsError::session(e)));
        }
    }

    /// Encrypts a close_notify and sends it.
    fn send_close_notify(&self) {
        let scratch = self.timer.scratch();
        let mut out = scratch.as_ref().map(|s| s.out.take()).unwrap_or_default();
        out.clear();
        if let Some(conn) = self.tls.borrow_mut().as_mut() {
            conn.close_notify(&mut out);
        }
        self.send_out(scratch, out);
    }

    /// Records `reason` as why the session ended and closes the
    /// transport below (sending any alert rustls queued first, unless
    /// `abort`).
    fn fail_with(&self, reason: Failure, abort: bool) {
        if matches!(self.life.get(), Life::Lost | Life::Aborting) || self.phase.get() == Phase::Failed {
            return;
        }
        tracing::debug!(target: "braid", "TLS connection failed: {reason}");
        self.phase.set(Phase::Failed);
        self.reason.borrow_mut().get_or_insert(reason);
        self.queued.borrow_mut().clear();
        self.cancel_timer();
        if !abort {
            self.send_tls();
        }
        self.release_below();
        if let Some(lower) = self.lower() {
            if abort {
                self.life.set(Life::Aborting);
                lower.abort_connection();
            } else {
                self.life.set(Life::Closing);
                lower.lose_connection();
            }
        }
    }

    fn fail(&self, reason: Failure) {
        self.fail_with(reason, false)
    }

    fn cancel_timer(&self) {
        if let Some(t) = self.handshake_timer.borrow_mut().take() {
            let _ = t.cancel();
        }
    }

    /// Takes the application's producer off the transport below (a close
    /// below would wait for it otherwise, and a handshake must not be paced
    /// by it).
    fn release_below(&self) {
        let was = self.producer.borrow_mut().as_mut().is_some_and(|p| std::mem::replace(&mut p.below, false));
        if was {
            if let Some(lower) = self.lower() {
                lower.unregister_producer();
            }
        }
    }

    /// Hands the application's producer to the transport below, once
    /// writes go straight to it.
    fn give_producer_below(&self) {
        let streaming = {
            let mut p = self.producer.borrow_mut();
            let Some(p) = p.as_mut() else { return };
            if p.below {
                return;
            }
            p.below = true;
            p.streaming
        };
        if let Some(lower) = self.lower() {
            let membrane = Rc::new(Membrane { state: self.me.clone() });
            if lower.register_producer(membrane, streaming).is_err() {
                if let Some(p) = self.producer.borrow_mut().as_mut() {
                    p.below = false;
                }
            }
        }
    }

    /// Ciphertext from below (or plaintext, before TLS starts), in a
    /// buffer this may scramble.
    fn receive(&self, data: &mut [u8]) {
        match self.phase.get() {
            Phase::Plain => {
                if self.life.get() != Life::Lost {
                    self.call_app(|p| p.data_received_mut(data));
                }
                return;
            }
            Phase::Failed => return,
            Phase::Handshaking | Phase::Established => {}
        }
        if matches!(self.life.get(), Life::Lost | Life::Aborting) || self.read_side.get() != ReadSide::Open {
            return;
        }
        let scratch = self.timer.scratch();
        let mut plain = scratch.as_ref().map(|s| s.plain.take()).unwrap_or_default();
        plain.clear();
        let mut out = scratch.as_ref().map(|s| s.out.take()).unwrap_or_default();
        out.clear();
        let mut error = None;
        let closed;
        let plain_from;
        let was_handshaking;
        let handshaking;
        {
            let mut tls = self.tls.borrow_mut();
            let Some(conn) = tls.as_mut() else { return };
            was_handshaking = conn.is_handshaking();
            let read = conn.read(data, &mut out, &mut plain);
            closed = read.peer_closed;
            plain_from = read.plain_from;
            if let Some(e) = read.error {
                error = Some(Failure::new(if conn.is_handshaking() {
                    TlsError::handshake(e)
                } else {
                    TlsError::session(e)
                }));
            }
            handshaking = conn.is_handshaking();
        }
        let got = &mut plain[plain_from..];
        if error.is_none() {
            self.send_out(scratch.clone(), out);
        } else if let Some(s) = scratch.as_ref() {
            s.out.set(out);
        }
        if was_handshaking && !handshaking && error.is_none() {
            self.handshake_done();
        }
        // A paused application gets nothing until it resumes, and what
        // waits for it keeps its place ahead of what comes after.
        let hold = self.app_paused.get() || !self.held.borrow().is_empty() || self.held_close.get();
        if !got.is_empty() && !matches!(self.life.get(), Life::Lost | Life::Aborting) {
            if hold {
                self.held.borrow_mut().extend_from_slice(got);
            } else {
                self.call_app(|p| p.data_received_mut(got));
            }
        }
        if let Some(s) = scratch {
            if plain.len() > SCRATCH_KEEP {
                plain = Vec::new();
            }
            s.plain.set(plain);
        }
        if let Some(e) = error {
            return self.fail(e);
        }
        if closed {
            if hold {
                self.held_close.set(true);
            } else {
                self.peer_closed();
            }
        }
    }

    /// Delivers what was held for a paused application, from the loop
    /// (never inside the application's own call to `resume_producing`).
    fn release_soon(&self) {
        if self.held.borrow().is_empty() && !self.held_close.get() {
            return;
        }
        self.at_end_of_pass(&self.release_scheduled, || self.release_held());
    }

    /// Sets `flag` and runs this layer's `Flush` at the end of the reactor's
    /// pass (once, however often asked); with no loop to wait for (a test
    /// double below), runs `now` at once.
    fn at_end_of_pass(&self, flag: &Cell<bool>, now: impl FnOnce()) {
        if flag.replace(true) {
            return;
        }
        let reactor = match &self.timer {
            Timer::Reactor(r) => r.get(),
            Timer::None | Timer::Clock(_) => None,
        };
        match (reactor, self.me.upgrade()) {
            (Some(reactor), Some(me)) => reactor.schedule_flush(me),
            _ => now(),
        }
    }

    fn release_held(&self) {
        self.release_scheduled.set(false);
        if self.app_paused.get() || self.app.try_borrow_mut().is_err() {
            // Paused again, or (with no loop to wait for) inside the
            // application: it stays held for the next resume.
            return;
        }
        let mut data = std::mem::take(&mut *self.held.borrow_mut());
        if !data.is_empty() && !matches!(self.life.get(), Life::Lost | Life::Aborting) {
            self.call_app(|p| p.data_received_mut(&mut data));
        }
        if self.app_paused.get() {
            return;
        }
        if self.held_close.replace(false) && !matches!(self.life.get(), Life::Lost | Life::Aborting) {
            self.peer_closed();
        }
    }

    fn handshake_done(&self) {
        self.cancel_timer();
        self.phase.set(Phase::Established);
        let queued = std::mem::take(&mut *self.queued.borrow_mut());
        if !queued.is_empty() {
            self.encrypt(&queued);
        }
        self.give_producer_below();
        let paused_by_queue = self
            .producer
            .borrow_mut()
            .as_mut()
            .is_some_and(|p| std::mem::replace(&mut p.paused_by_queue, false));
        if paused_by_queue {
            // Queued bytes are now the transport's: it paces the producer.
            let p = self.producer.borrow().as_ref().map(|p| p.producer.clone());
            if let Some(p) = p {
                p.resume_producing();
            }
        }
        if self.app_paused.get() {
            if let Some(lower) = self.lower() {
                lower.pause_producing();
            }
        }
        for d in std::mem::take(&mut *self.waiters.borrow_mut()) {
            let _ = d.callback(());
        }
        if !matches!(self.life.get(), Life::Lost | Life::Aborting) {
            self.call_app(|p| p.handshake_completed());
        }
        self.after_handshake();
    }

    /// Carries out a close or half-close asked for during the handshake.
    fn after_handshake(&self) {
        if self.life.get() == Life::Disconnecting {
            self.finish_close();
        } else if self.write_side.get() == WriteSide::ShutdownAsked {
            self.finish_write_shutdown();
        }
    }

    /// The peer sent close_notify.
    fn peer_closed(&self) {
        self.read_side.set(ReadSide::CloseNotify);
        let tls13 = self.tls.borrow().as_ref().and_then(|c| c.common().protocol_version())
            == Some(rustls::ProtocolVersion::TLSv1_3);
        let mut half = false;
        if tls13 && self.life.get() == Life::Open {
            // TLS 1.3 lets the other direction go on; a protocol that
            // takes half-close keeps writing.
            self.call_app(|p| {
                if let Some(h) = p.as_half_closeable() {
                    half = true;
                    h.read_connection_lost();
                }
            });
        }
        if !half {
            // TLS 1.2 (and a protocol without half-close): answer with our
            // own close_notify and close, cleanly.
            if matches!(self.life.get(), Life::Open | Life::Disconnecting) {
                self.reason.borrow_mut().get_or_insert_with(|| Failure::new(Error::ConnectionDone));
                self.life.set(Life::Disconnecting);
                self.finish_close();
            }
        }
    }

    /// The transport below reached end of stream.
    fn eof(&self) {
        let before = self.read_side.replace(ReadSide::Eof);
        match self.phase.get() {
            Phase::Plain => {
                let mut half = false;
                self.call_app(|p| {
                    if let Some(h) = p.as_half_closeable() {
                        half = true;
                        h.read_connection_lost();
                    }
                });
                if !half {
                    self.reason.borrow_mut().get_or_insert_with(|| Failure::new(Error::ConnectionDone));
                    self.release_below();
                    if let Some(lower) = self.lower() {
                        lower.lose_connection();
                    }
                }
            }
            Phase::Failed => {}
            Phase::Handshaking | Phase::Established => {
                if before == ReadSide::CloseNotify {
                    return;
                }
                let during =
                    if self.phase.get() == Phase::Handshaking { " during the handshake" } else { "" };
                self.fail(Failure::new(Error::ConnectionLost).context(format!(
                    "the peer closed the stream{during} without a TLS close_notify: the data may be truncated"
                )));
            }
        }
    }

    /// Closes once nothing holds the close back (the handshake, a
    /// registered producer). The close itself waits for the end of the
    /// reactor's pass, so what the application writes after
    /// `lose_connection` in the same callback still goes out before
    /// close_notify, as it would without TLS.
    fn finish_close(&self) {
        if self.close_ready() {
            self.close_soon();
        }
    }

    fn finish_write_shutdown(&self) {
        if self.write_shutdown_ready() {
            self.close_soon();
        }
    }

    fn close_ready(&self) -> bool {
        self.life.get() == Life::Disconnecting
            && matches!(self.phase.get(), Phase::Plain | Phase::Established)
            // Twisted: a close waits for the producer to unregister, unless
            // the peer has closed already.
            && (self.producer.borrow().is_none() || self.read_side.get() != ReadSide::Open)
    }

    fn write_shutdown_ready(&self) -> bool {
        self.write_side.get() == WriteSide::ShutdownAsked
            && self.phase.get() == Phase::Established
            && self.producer.borrow().is_none()
    }

    fn close_soon(&self) {
        self.at_end_of_pass(&self.close_scheduled, || self.run_close());
    }

    fn run_close(&self) {
        self.close_scheduled.set(false);
        if self.close_ready() {
            self.life.set(Life::Closing);
            if self.phase.get() == Phase::Established
                && matches!(self.write_side.get(), WriteSide::Open | WriteSide::ShutdownAsked)
            {
                self.send_close_notify();
            }
            self.release_below();
            if let Some(lower) = self.lower() {
                lower.lose_connection();
            }
        } else if self.write_shutdown_ready() {
            self.write_side.set(WriteSide::NotifySent);
            self.send_close_notify();
            if let Some(lower) = self.lower() {
                lower.lose_write_connection();
            }
        }
    }

    /// The transport below is gone: tell the application, once, why.
    fn lost(&self, below: Failure) {
        if self.life.replace(Life::Lost) == Life::Lost {
            return;
        }
        self.cancel_timer();
        // What this layer recorded (a TLS failure, a truncation, the peer's
        // close_notify) wins over how the transport below ended.
        let reason = self.reason.borrow_mut().take().unwrap_or(below);
        self.queued.borrow_mut().clear();
        for d in std::mem::take(&mut *self.waiters.borrow_mut()) {
            let _ = d.errback(reason.clone());
        }
        if let Some(p) = self.producer.borrow_mut().take() {
            p.producer.stop_producing();
        }
        if let Some(slot) = self.report.borrow_mut().take() {
            *slot.borrow_mut() = Some(reason.clone());
        }
        let app = self.app.borrow_mut().take();
        if let Some(mut app) = app {
            app.connection_lost(reason);
        }
        self.lower.borrow_mut().take();
    }

    /// Switches a plain connection to TLS (see [`Tls::start_tls`]).
    pub(crate) fn start_tls(&self, side: Side) -> Result<(), Error> {
        if self.phase.get() != Phase::Plain || self.tls.borrow().is_some() {
            return Err(Error::io(
                "starting TLS",
                std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "TLS is already started on this connection",
                ),
            ));
        }
        if self.life.get() != Life::Open || self.lower.borrow().is_none() {
            return Err(Error::ConnectionDone);
        }
        self.begin(side);
        Ok(())
    }

    fn pause_queue_producer(&self) {
        let (high, _) = self.limits.get();
        if self.queued.borrow().len() <= high {
            return;
        }
        let p = {
            let mut slot = self.producer.borrow_mut();
            match slot.as_mut() {
                Some(p) if p.streaming && !p.paused_by_queue => {
                    p.paused_by_queue = true;
                    Some(p.producer.clone())
                }
                _ => None,
            }
        };
        if let Some(p) = p {
            p.pause_producing();
        }
    }

    /// Writes are taken until close_notify is sent: after
    /// `lose_connection` or `lose_write_connection` too, as without TLS.
    fn takes_writes(&self) -> bool {
        matches!(self.life.get(), Life::Open | Life::Disconnecting)
            && matches!(self.write_side.get(), WriteSide::Open | WriteSide::ShutdownAsked)
    }
}

impl crate::reactor::Flush for TlsState {
    fn flush(&self) {
        if self.release_scheduled.get() {
            self.release_held();
        }
        if self.close_scheduled.get() {
            self.run_close();
        }
    }
}

impl TransportOps for TlsState {
    fn write(&self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        if self.phase.get() == Phase::Plain {
            // In the clear the transport below keeps its own rules.
            if !matches!(self.life.get(), Life::Aborting | Life::Lost) {
                if let Some(lower) = self.lower() {
                    lower.write(data);
                }
            }
            return;
        }
        if !self.takes_writes() {
            return;
        }
        match self.phase.get() {
            Phase::Plain => {}
            Phase::Handshaking => {
                self.queued.borrow_mut().extend_from_slice(data);
                self.pause_queue_producer();
            }
            Phase::Established => self.encrypt(data),
            Phase::Failed => {}
        }
    }

    fn write_sequence(&self, data: &[&[u8]]) {
        if self.phase.get() == Phase::Established && self.takes_writes() {
            return self.encrypt_all(data);
        }
        for d in data {
            self.write(d);
        }
    }

    fn lose_connection(&self) {
        if self.life.get() != Life::Open {
            return;
        }
        self.life.set(Life::Disconnecting);
        self.finish_close();
    }

    fn abort_connection(&self) {
        if matches!(self.life.get(), Life::Aborting | Life::Lost) {
            return;
        }
        self.life.set(Life::Aborting);
        self.queued.borrow_mut().clear();
        self.cancel_timer();
        self.release_below();
        if let Some(lower) = self.lower() {
            lower.abort_connection();
        }
    }

    fn lose_write_connection(&self) {
        if !self.takes_writes() || self.write_side.get() != WriteSide::Open {
            return;
        }
        match self.phase.get() {
            Phase::Plain => {
                if let Some(lower) = self.lower() {
                    lower.lose_write_connection();
                }
            }
            Phase::Failed => {}
            Phase::Handshaking | Phase::Established => {
                self.write_side.set(WriteSide::ShutdownAsked);
                self.finish_write_shutdown();
            }
        }
    }

    fn host(&self) -> Option<Address> {
        self.lower().and_then(|l| l.host())
    }

    fn peer(&self) -> Address {
        self.peer.borrow().clone().unwrap_or_else(Address::unix_unnamed)
    }

    fn tcp(self: Rc<Self>) -> Option<Rc<dyn TcpOptions>> {
        self.lower().and_then(|l| l.ops().clone().tcp())
    }

    fn unix(self: Rc<Self>) -> Option<Rc<dyn UnixOptions>> {
        self.lower().and_then(|l| l.ops().clone().unix())
    }

    fn tls(self: Rc<Self>) -> Option<Rc<dyn TlsOptions>> {
        Some(self)
    }

    fn pause_producing(&self) {
        self.app_paused.set(true);
        if self.phase.get() != Phase::Handshaking {
            if let Some(lower) = self.lower() {
                lower.pause_producing();
            }
        }
    }

    fn resume_producing(&self) {
        self.app_paused.set(false);
        if let Some(lower) = self.lower() {
            lower.resume_producing();
        }
        self.release_soon();
    }

    fn stop_producing(&self) {
        self.lose_connection();
    }

    fn register_producer(&self, producer: Rc<dyn Producer>, streaming: bool) -> Result<(), Error> {
        if self.producer.borrow().is_some() {
            return Err(Error::io(
                "registering a producer",
                std::io::Error::new(std::io::ErrorKind::AlreadyExists, "a producer is already registered"),
            ));
        }
        if self.life.get() == Life::Lost {
            producer.stop_producing();
            return Ok(());
        }
        *self.producer.borrow_mut() =
            Some(AppProducer { producer, streaming, below: false, paused_by_queue: false });
        if matches!(self.phase.get(), Phase::Plain | Phase::Established) {
            self.give_producer_below();
        } else {
            self.pause_queue_producer();
        }
        Ok(())
    }

    fn unregister_producer(&self) {
        let Some(p) = self.producer.borrow_mut().take() else { return };
        if p.below {
            if let Some(lower) = self.lower() {
                lower.unregister_producer();
            }
        }
        if self.life.get() == Life::Disconnecting {
            self.finish_close();
        } else if self.write_side.get() == WriteSide::ShutdownAsked {
            self.finish_write_shutdown();
        }
    }

    fn set_write_buffer_limits(&self, high: usize, low: usize) {
        self.limits.set((high, low.min(high)));
        if let Some(lower) = self.lower() {
            lower.set_write_buffer_limits(high, low);
        }
    }

    /// Plaintext queued for the handshake plus ciphertext buffered below.
    fn buffered(&self) -> usize {
        self.queued.borrow().len() + self.lower().map_or(0, |l| l.buffered())
    }

    fn connected(&self) -> bool {
        self.life.get() == Life::Open
    }
}

impl TlsOptions for TlsState {
    fn handshake_complete(&self) -> bool {
        self.phase.get() == Phase::Established
    }

    fn peer_certificates(&self) -> Vec<Vec<u8>> {
        let tls = self.tls.borrow();
        let certs = tls.as_ref().and_then(|c| c.common().peer_certificates());
        certs.map_or_else(Vec::new, |cs| cs.iter().map(|c| c.as_ref().to_vec()).collect())
    }

    fn alpn_protocol(&self) -> Option<Vec<u8>> {
        self.tls.borrow().as_ref().and_then(|c| c.common().alpn_protocol().map(<[u8]>::to_vec))
    }

    fn server_name(&self) -> Option<String> {
        self.tls.borrow().as_ref()?.server_name().map(str::to_string)
    }

    fn protocol_version(&self) -> Option<&'static str> {
        match self.tls.borrow().as_ref()?.common().protocol_version()? {
            rustls::ProtocolVersion::TLSv1_3 => Some("TLSv1.3"),
            rustls::ProtocolVersion::TLSv1_2 => Some("TLSv1.2"),
            _ => Some("other"),
        }
    }

    fn resumed(&self) -> bool {
        self.tls.borrow().as_ref().and_then(|c| c.common().handshake_kind())
            == Some(rustls::HandshakeKind::Resumed)
    }

    fn when_handshake_completed(&self) -> Deferred<()> {
        match (self.phase.get(), self.life.get()) {
            (Phase::Established, _) => Deferred::succeed(()),
            (_, Life::Lost) => Deferred::fail(Error::ConnectionDone),
            (Phase::Failed, _) => {
                let why = self.reason.borrow().clone();
                Deferred::fail(why.unwrap_or_else(|| Failure::new(Error::ConnectionLost)))
            }
            _ => {
                let d = Deferred::new();
                self.waiters.borrow_mut().push(d.clone());
                d
            }
        }
    }

    fn as_any(self: Rc<Self>) -> Rc<dyn Any> {
        self
    }
}
