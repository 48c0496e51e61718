//! Ready-made services: a listener on an endpoint, a client that stays
//! connected, a timer.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use super::Service;
use crate::datagram::{DatagramProtocol, DatagramTransport, SharedDatagram};
use crate::defer::Deferred;
use crate::endpoints::{ClientEndpoint, ServerEndpoint};
use crate::error::{Error, Failure};
use crate::protocol::{Factory, FileDescriptorReceiver, HalfCloseable, Protocol, SharedFactory};
use crate::reactor::{DelayedCall, Reactor};
use crate::stream::Address;
use crate::task::LoopingCall;
use crate::tcp::ListeningPort;
use crate::transport::Transport;

/// What a [`StreamServerEndpointService`] serves.
enum Serving {
    Streams(SharedFactory<dyn Factory>),
    Datagrams(SharedDatagram<dyn DatagramProtocol>),
}

/// What it is listening with.
enum Listening {
    Stream(ListeningPort),
    Datagram(DatagramTransport),
}

/// Listens on an endpoint while running (Twisted's
/// `StreamServerEndpointService`; braid's datagram endpoints too).
pub struct StreamServerEndpointService {
    name: Option<String>,
    endpoint: Box<dyn ServerEndpoint>,
    serving: Serving,
    port: Option<Listening>,
}

impl StreamServerEndpointService {
    /// Serves streams on `endpoint` with `factory`.
    pub fn new(endpoint: Box<dyn ServerEndpoint>, factory: SharedFactory<dyn Factory>) -> Self {
        StreamServerEndpointService { name: None, endpoint, serving: Serving::Streams(factory), port: None }
    }

    /// Serves datagrams on a datagram `endpoint` with `protocol`.
    pub fn datagrams(
        endpoint: Box<dyn ServerEndpoint>,
        protocol: SharedDatagram<dyn DatagramProtocol>,
    ) -> Self {
        StreamServerEndpointService {
            name: None,
            endpoint,
            serving: Serving::Datagrams(protocol),
            port: None,
        }
    }

    /// Names the service.
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Where it listens once started: the real address (port 0 resolved).
    pub fn address(&self) -> Option<Address> {
        match &self.port {
            Some(Listening::Stream(p)) => Some(p.host()),
            Some(Listening::Datagram(t)) => Some(t.host()),
            None => None,
        }
    }

    /// The endpoint's description.
    pub fn describe(&self) -> String {
        self.endpoint.describe()
    }
}

/// The value of a Deferred that has fired already (the endpoints here
/// listen synchronously); an error if it is still waiting.
fn now<T: 'static>(d: Deferred<T>) -> Result<T, Failure> {
    let out = Rc::new(RefCell::new(None));
    let o = out.clone();
    let _sink: Deferred<()> = d.then(move |r| {
        *o.borrow_mut() = Some(r);
        Ok(())
    });
    let taken = out.borrow_mut().take();
    taken.unwrap_or_else(|| Err(Failure::msg("the endpoint did not listen at once")))
}

impl Service for StreamServerEndpointService {
    fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    fn start_service(&mut self) -> Result<(), Failure> {
        self.port = Some(match &self.serving {
            Serving::Streams(f) => Listening::Stream(now(self.endpoint.listen(f.clone()))?),
            Serving::Datagrams(p) => Listening::Datagram(now(self.endpoint.listen_datagram(p.clone()))?),
        });
        Ok(())
    }

    fn stop_service(&mut self) -> Deferred<()> {
        match self.port.take() {
            Some(Listening::Stream(p)) => p.stop_listening(),
            Some(Listening::Datagram(t)) => t.stop_listening(),
            None => Deferred::succeed(()),
        }
    }

    fn running(&self) -> bool {
        self.port.is_some()
    }
}

/// How a [`ClientService`] waits between attempts: `initial`, times
/// `factor` after each failure, at most `max`, each spread by up to
/// `jitter` (a fraction) so many clients do not retry in step (Twisted's
/// `backoffPolicy`).
#[derive(Clone, Copy, Debug)]
pub struct Retry {
    /// The first delay.
    pub initial: Duration,
    /// The growth per failed attempt.
    pub factor: f64,
    /// The largest delay.
    pub max: Duration,
    /// The spread, as a fraction of the delay.
    pub jitter: f64,
}

impl Default for Retry {
    fn default() -> Retry {
        Retry { initial: Duration::from_secs(1), factor: 1.5, max: Duration::from_secs(60), jitter: 0.1 }
    }
}

impl Retry {
    fn delay(&self, failures: u32, noise: f64) -> Duration {
        let base = self.initial.as_secs_f64() * self.factor.powi(failures.min(64) as i32);
        let capped = base.min(self.max.as_secs_f64());
        Duration::from_secs_f64((capped * (1.0 + self.jitter * noise)).max(0.0))
    }
}

/// Where a [`ClientService`] is.
enum ClientState {
    Stopped,
    Connecting,
    Connected(Transport),
    Waiting(DelayedCall),
}

struct ClientInner {
    reactor: Reactor,
    endpoint: Box<dyn ClientEndpoint>,
    factory: Rc<RefCell<Box<dyn Factory>>>,
    retry: Retry,
    failures: u32,
    state: ClientState,
    waiting: Vec<Deferred<Transport>>,
    stopped: Vec<Deferred<()>>,
    noise: u64,
}

/// Keeps a connection to an endpoint while running, reconnecting with
/// back-off after a failure or a loss (Twisted's `ClientService`).
pub struct ClientService {
    name: Option<String>,
    inner: Rc<RefCell<ClientInner>>,
}

/// The user's factory, whose protocols tell the service when they end.
struct Reporting {
    factory: Rc<RefCell<Box<dyn Factory>>>,
    service: std::rc::Weak<RefCell<ClientInner>>,
}

struct Watched {
    inner: Box<dyn Protocol>,
    service: std::rc::Weak<RefCell<ClientInner>>,
}

impl Protocol for Watched {
    fn connection_made(&mut self, transport: Transport) {
        self.inner.connection_made(transport)
    }
    fn data_received(&mut self, data: &[u8]) {
        self.inner.data_received(data)
    }

    fn data_received_mut(&mut self, data: &mut [u8]) {
        self.inner.data_received_mut(data)
    }
    fn connection_lost(&mut self, reason: Failure) {
        self.inner.connection_lost(reason);
        if let Some(s) = self.service.upgrade() {
            lost(&s);
        }
    }
    fn as_half_closeable(&mut self) -> Option<&mut dyn HalfCloseable> {
        self.inner.as_half_closeable()
    }
    fn as_fd_receiver(&mut self) -> Option<&mut dyn FileDescriptorReceiver> {
        self.inner.as_fd_receiver()
    }
    fn handshake_completed(&mut self) {
        self.inner.handshake_completed()
    }
}

impl Factory for Reporting {
    fn build_protocol(&mut self, addr: &Address) -> Option<Box<dyn Protocol>> {
        let inner = self.factory.borrow_mut().build_protocol(addr)?;
        Some(Box::new(Watched { inner, service: self.service.clone() }))
    }
}

fn attempt(s: &Rc<RefCell<ClientInner>>) {
    let d = {
        let mut st = s.borrow_mut();
        st.state = ClientState::Connecting;
        let factory = Reporting { factory: st.factory.clone(), service: Rc::downgrade(s) };
        st.endpoint.connect(Box::new(factory))
    };
    let weak = Rc::downgrade(s);
    let _sink: Deferred<()> = d.then(move |result| {
        let Some(s) = weak.upgrade() else { return Ok(()) };
        match result {
            Ok(t) => {
                let mut st = s.borrow_mut();
                if matches!(st.state, ClientState::Stopped) {
                    // Stopped while connecting: this connection is not wanted.
                    t.lose_connection();
                    return Ok(());
                }
                st.failures = 0;
                st.state = ClientState::Connected(t.clone());
                for w in std::mem::take(&mut st.waiting) {
                    let _ = w.callback(t.clone());
                }
            }
            Err(f) => {
                tracing::info!(target: "braid", "{}: {f}", s.borrow().endpoint.describe());
                retry_later(&s);
            }
        }
        Ok(())
    });
}

fn lost(s: &Rc<RefCell<ClientInner>>) {
    let stopped = matches!(s.borrow().state, ClientState::Stopped);
    if stopped {
        for d in std::mem::take(&mut s.borrow_mut().stopped) {
            let _ = d.callback(());
        }
        return;
    }
    retry_later(s);
}

fn retry_later(s: &Rc<RefCell<ClientInner>>) {
    let mut st = s.borrow_mut();
    if matches!(st.state, ClientState::Stopped) {
        return;
    }
    // xorshift: spread only, no need for quality.
    st.noise ^= st.noise << 13;
    st.noise ^= st.noise >> 7;
    st.noise ^= st.noise << 17;
    let noise = (st.noise % 2001) as f64 / 1000.0 - 1.0;
    let delay = st.retry.delay(st.failures, noise);
    st.failures = st.failures.saturating_add(1);
    let weak = Rc::downgrade(s);
    let call = st.reactor.call_later(delay, move || {
        if let Some(s) = weak.upgrade() {
            attempt(&s);
        }
    });
    st.state = ClientState::Waiting(call);
}

impl ClientService {
    /// Connects to `endpoint` with `factory` while running, retrying as
    /// `retry` says.
    pub fn new(
        reactor: &Reactor,
        endpoint: Box<dyn ClientEndpoint>,
        factory: impl Factory + 'static,
        retry: Retry,
    ) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        ClientService {
            name: None,
            inner: Rc::new(RefCell::new(ClientInner {
                reactor: reactor.clone(),
                endpoint,
                factory: Rc::new(RefCell::new(Box::new(factory))),
                retry,
                failures: 0,
                state: ClientState::Stopped,
                waiting: Vec::new(),
                stopped: Vec::new(),
                noise: seed | 1,
            })),
        }
    }

    /// Names the service.
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// The current connection's transport, or the next one's when it is
    /// made (Twisted's `whenConnected`). Fails with `Cancelled` if the
    /// service stops first.
    pub fn when_connected(&self) -> Deferred<Transport> {
        let mut st = self.inner.borrow_mut();
        if let ClientState::Connected(t) = &st.state {
            return Deferred::succeed(t.clone());
        }
        let d = Deferred::new();
        st.waiting.push(d.clone());
        d
    }
}

impl Service for ClientService {
    fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    fn start_service(&mut self) -> Result<(), Failure> {
        if matches!(self.inner.borrow().state, ClientState::Stopped) {
            attempt(&self.inner);
        }
        Ok(())
    }

    /// Stops retrying and closes the connection; fires once it is closed.
    fn stop_service(&mut self) -> Deferred<()> {
        let (previous, waiting) = {
            let mut st = self.inner.borrow_mut();
            (std::mem::replace(&mut st.state, ClientState::Stopped), std::mem::take(&mut st.waiting))
        };
        for w in waiting {
            let _ = w.errback(Failure::new(Error::Cancelled));
        }
        match previous {
            ClientState::Connected(t) => {
                let d = Deferred::new();
                self.inner.borrow_mut().stopped.push(d.clone());
                t.lose_connection();
                d
            }
            ClientState::Waiting(call) => {
                let _ = call.cancel();
                Deferred::succeed(())
            }
            ClientState::Connecting | ClientState::Stopped => Deferred::succeed(()),
        }
    }

    fn running(&self) -> bool {
        !matches!(self.inner.borrow().state, ClientState::Stopped)
    }
}

/// Calls a function every `step` while running (Twisted's `TimerService`).
pub struct TimerService {
    name: Option<String>,
    step: Duration,
    call: LoopingCall,
}

impl TimerService {
    /// Calls `f` every `step`, the first time when started.
    pub fn new(reactor: &Reactor, step: Duration, f: impl FnMut() + 'static) -> Self {
        TimerService { name: None, step, call: LoopingCall::new(reactor.clone(), f) }
    }

    /// Names the service.
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }
}

impl Service for TimerService {
    fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    fn start_service(&mut self) -> Result<(), Failure> {
        self.call.start(self.step, true).map(drop).map_err(Failure::new)
    }

    fn stop_service(&mut self) -> Deferred<()> {
        let _ = self.call.stop();
        Deferred::succeed(())
    }

    fn running(&self) -> bool {
        self.call.running()
    }
}
