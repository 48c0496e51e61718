//! One file per subcommand (plugin), plus what they share: serving a
//! plugin's protocols on its `--listen` endpoints as a service tree, and
//! the clean shutdown (listeners first, then open connections get a
//! bounded grace period).

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use braid::app::{Application, MultiService, Service, StreamServerEndpointService};
use braid::datagram::{DatagramProtocol, SharedDatagram};
use braid::endpoints::server_from_string;
use braid::protocol::{Factory, FileDescriptorReceiver, HalfCloseable, Protocol, SharedFactory};
use braid::{Address, Backend, Deferred, Failure, Reactor, Transport};

pub mod chargen;
pub mod daytime;
pub mod discard;
pub mod echo;
pub mod exec;
pub mod portforward;
pub mod web;

/// The backend named by `--reactor`, else by `BRAID_REACTOR`, else the
/// platform default. An unknown name is an error listing the valid ones.
pub fn backend(flag: Option<&str>) -> Result<Backend, String> {
    match flag {
        Some(name) => name.parse().map_err(|e: braid::Error| e.to_string()),
        None => Backend::from_env().map_err(|e| e.to_string()),
    }
}

/// With `--workers`: where each worker sends a handle to its reactor once
/// it runs, so that main can start the next worker, or stop the ones
/// running if one fails to start.
pub static RUNNING: std::sync::Mutex<Option<std::sync::mpsc::Sender<braid::Remote>>> =
    std::sync::Mutex::new(None);

/// What every plugin is run with.
#[derive(Clone, Copy)]
pub struct Common {
    /// The polling backend.
    pub backend: Backend,
    /// How long open connections may take to finish at shutdown.
    pub grace: Duration,
    /// With `--workers`: this thread's number and how many there are.
    pub worker: Option<(usize, usize)>,
}

/// The endpoints worker `common.worker` listens on: with several workers,
/// each has its own `SO_REUSEPORT` listener for every TCP endpoint (which
/// needs a fixed port: with port 0 each would get another), and the other
/// endpoints (UNIX, UDP, systemd) are served by worker 0 alone.
fn for_worker(common: Common, listens: &[String]) -> Result<Vec<String>, String> {
    let Some((index, _)) = common.worker else { return Ok(listens.to_vec()) };
    let mut mine = Vec::new();
    for desc in listens {
        let d = braid::endpoints::parse(desc).map_err(|e| format!("--listen {desc}: {e}"))?;
        let kind = d.kind.to_ascii_lowercase();
        if kind == "tcp" || kind == "tcp6" {
            if d.arg_or(0, "port") == Some("0") {
                return Err(format!(
                    "--listen {desc}: --workers needs a fixed port (with 0 each worker would get its own)"
                ));
            }
            mine.push(format!("{desc}:reusePort=1"));
        } else if index == 0 {
            mine.push(desc.clone());
        }
    }
    Ok(mine)
}

/// What a plugin serves: streams, datagrams, or both.
pub struct Serve {
    /// The plugin's name, for log lines.
    pub name: &'static str,
    /// Builds a protocol per connection.
    pub streams: Option<SharedFactory<dyn Factory>>,
    /// Handles datagrams on `udp:` endpoints.
    pub datagrams: Option<SharedDatagram<dyn DatagramProtocol>>,
    /// Said after a stream listener's address (" over TLS").
    pub over: &'static str,
}

/// Installs the reactor, listens on every endpoint (logging one line each
/// with the real address), and runs until SIGINT or SIGTERM. A bad
/// endpoint or a port in use is an error before anything runs.
pub fn serve(common: Common, listens: &[String], what: Serve) -> Result<(), String> {
    let reactor = braid::install(common.backend).map_err(|e| e.to_string())?;
    serve_on(&reactor, common, listens, what, Vec::new())
}

/// [`serve`] on an installed reactor, with services of the plugin's own
/// (adopted sockets, say) started after the listeners.
pub fn serve_on(
    reactor: &Reactor,
    common: Common,
    listens: &[String],
    what: Serve,
    extra: Vec<Box<dyn Service>>,
) -> Result<(), String> {
    let listens = &for_worker(common, listens)?;
    let open = Open::default();
    let mut tree = MultiService::new();
    // Added first, so stopped last: the listeners close before the
    // connections are asked to finish.
    tree.add_service(Box::new(Grace {
        reactor: reactor.clone(),
        open: open.clone(),
        grace: common.grace,
        running: false,
    }))
    .map_err(|e| e.to_string())?;
    let mut names = Vec::new();
    for desc in listens {
        let endpoint = server_from_string(reactor, desc).map_err(|e| format!("--listen {desc}: {e}"))?;
        let service = if endpoint.is_datagram() {
            let protocol = what
                .datagrams
                .clone()
                .ok_or_else(|| format!("--listen {desc}: {} does not serve datagrams", what.name))?;
            StreamServerEndpointService::datagrams(endpoint, protocol)
        } else {
            let factory = what
                .streams
                .clone()
                .ok_or_else(|| format!("--listen {desc}: {} serves only datagrams", what.name))?;
            let worker = common.worker.map(|(i, _)| i);
            let tracked: SharedFactory<dyn Factory> =
                SharedFactory::new(Tracked { inner: factory, open: open.clone(), worker }).erase();
            StreamServerEndpointService::new(endpoint, tracked)
        };
        names.push(desc.clone());
        tree.add_service(Box::new(Announce {
            inner: service,
            plugin: what.name,
            backend: common.backend,
            over: what.over,
            worker: common.worker.map(|(i, _)| i),
        }))
        .map_err(|e| e.to_string())?;
    }
    for service in extra {
        tree.add_service(service).map_err(|e| e.to_string())?;
    }
    if names.is_empty() && tree.len() == 1 {
        return Err(format!("{}: nothing to listen on (give --listen ENDPOINT)", what.name));
    }
    let _app = Application::start(reactor, tree).map_err(|e| e.to_string())?;
    if let Some(ready) = RUNNING.lock().unwrap_or_else(|e| e.into_inner()).clone() {
        let remote = reactor.remote();
        reactor.call_when_running(move || {
            let _ = ready.send(remote);
        });
    }
    reactor.run().map_err(|e| e.to_string())?;
    if let Some(sig) = reactor.exit_signal() {
        tracing::info!("stopped by signal {sig}; clean shutdown");
    }
    Ok(())
}

/// Logs where a listener listens once it does.
struct Announce {
    inner: StreamServerEndpointService,
    plugin: &'static str,
    backend: Backend,
    over: &'static str,
    worker: Option<usize>,
}

impl Service for Announce {
    fn start_service(&mut self) -> Result<(), Failure> {
        self.inner.start_service()?;
        let shown = match self.inner.address() {
            Some(Address::Ip(a)) if self.inner.describe().starts_with("udp") => format!("udp {a}"),
            Some(a) => format!("{a}{}", self.over),
            None => self.inner.describe(),
        };
        match self.worker {
            Some(w) => {
                tracing::info!("{} listening on {shown} (reactor: {}, worker {w})", self.plugin, self.backend)
            }
            None => tracing::info!("{} listening on {shown} (reactor: {})", self.plugin, self.backend),
        }
        Ok(())
    }

    fn stop_service(&mut self) -> Deferred<()> {
        self.inner.stop_service()
    }

    fn running(&self) -> bool {
        self.inner.running()
    }
}

/// The open connections, so the shutdown can wait for them.
#[derive(Clone, Default)]
struct Open(Rc<RefCell<slab::Slab<Transport>>>);

/// Wraps a plugin's factory so its connections are counted.
struct Tracked {
    inner: SharedFactory<dyn Factory>,
    open: Open,
    worker: Option<usize>,
}

impl Factory for Tracked {
    fn build_protocol(&mut self, addr: &Address) -> Option<Box<dyn Protocol>> {
        match self.worker {
            Some(w) => tracing::debug!("accepted {addr} on worker {w}"),
            None => tracing::debug!("accepted {addr}"),
        }
        let inner = self.inner.with(|f| f.build_protocol(addr))?;
        Some(Box::new(Counted { inner, open: self.open.clone(), key: None }))
    }
}

struct Counted {
    inner: Box<dyn Protocol>,
    open: Open,
    key: Option<usize>,
}

impl Protocol for Counted {
    fn connection_made(&mut self, transport: Transport) {
        self.key = Some(self.open.0.borrow_mut().insert(transport.clone()));
        self.inner.connection_made(transport);
    }
    fn data_received(&mut self, data: &[u8]) {
        self.inner.data_received(data)
    }

    fn data_received_mut(&mut self, data: &mut [u8]) {
        self.inner.data_received_mut(data)
    }
    fn connection_lost(&mut self, reason: Failure) {
        if let Some(k) = self.key.take() {
            self.open.0.borrow_mut().try_remove(k);
        }
        self.inner.connection_lost(reason)
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

/// At shutdown: asks every open connection to finish (flush and close),
/// waits up to the grace period, then aborts what is left.
struct Grace {
    reactor: Reactor,
    open: Open,
    grace: Duration,
    running: bool,
}

impl Service for Grace {
    fn start_service(&mut self) -> Result<(), Failure> {
        self.running = true;
        Ok(())
    }

    fn stop_service(&mut self) -> Deferred<()> {
        self.running = false;
        let open: Vec<Transport> = self.open.0.borrow().iter().map(|(_, t)| t.clone()).collect();
        if open.is_empty() {
            return Deferred::succeed(());
        }
        tracing::info!("closing {} open connection(s); grace period {:?}", open.len(), self.grace);
        for t in &open {
            t.unregister_producer();
            t.lose_connection();
        }
        let done = Deferred::new();
        wait_closed(
            self.reactor.clone(),
            self.open.clone(),
            Instant::now() + self.grace,
            done.clone(),
            false,
        );
        done
    }

    fn running(&self) -> bool {
        self.running
    }
}

/// How long aborted connections may take to be gone before the shutdown
/// goes on regardless.
const AFTER_ABORT: Duration = Duration::from_secs(1);

fn wait_closed(reactor: Reactor, open: Open, deadline: Instant, done: Deferred<()>, aborted: bool) {
    if open.0.borrow().is_empty() || Instant::now() >= deadline + AFTER_ABORT {
        let _ = done.callback(());
        return;
    }
    let aborted = if !aborted && Instant::now() >= deadline {
        let left: Vec<Transport> = open.0.borrow().iter().map(|(_, t)| t.clone()).collect();
        tracing::warn!("grace period over: aborting {} connection(s)", left.len());
        for t in left {
            t.abort_connection();
        }
        true
    } else {
        aborted
    };
    let r = reactor.clone();
    reactor.call_later(Duration::from_millis(10), move || wait_closed(r, open, deadline, done, aborted));
}
