//! One HTTP/1.1 connection (Twisted's `HTTPChannel`) and the factory that
//! builds them (Twisted's `Site`).
//!
//! The connection is a state machine over [`Phase`]: requests are decoded
//! one at a time and answered in order; while a response's body is being
//! sent, later (pipelined) requests wait in the decoder's buffer, and the
//! transport stops reading once that buffer is full. Every phase that
//! waits for the client has its own deadline on one timer.

use std::cell::{Cell, RefCell};
use std::rc::{Rc, Weak};
use std::time::Duration;

use super::body::{self, Progress, Source};
use super::log::{AccessLog, Entry};
use super::path;
use super::request::{Event, Limits, RequestDecoder, RequestHead, Version};
use super::resource::{Request, Resource};
use super::response::{self, Body, Framing, Response};
use crate::error::Failure;
use crate::protocol::{Factory, Protocol};
use crate::reactor::{DelayedCall, ReactorTime};
use crate::stream::Address;
use crate::transport::Transport;

/// Limits and timeouts of a server, with nginx's defaults.
#[derive(Debug, Clone)]
pub struct Config {
    /// Sizes of what a client may send.
    pub limits: Limits,
    /// The whole head of a request must arrive within this from its first
    /// byte (or from the connection's start): slowloris protection
    /// (nginx's `client_header_timeout`).
    pub header_timeout: Duration,
    /// An idle kept-alive connection is closed after this
    /// (`keepalive_timeout`).
    pub keepalive_timeout: Duration,
    /// Longest wait between two pieces of a request body
    /// (`client_body_timeout`).
    pub body_timeout: Duration,
    /// A client that takes none of a response for this long is cut off
    /// (`send_timeout`).
    pub send_timeout: Duration,
    /// After our last response, how long the client's further bytes are
    /// read and dropped before the connection is closed, so it gets the
    /// response rather than a reset (`lingering_timeout`).
    pub lingering_timeout: Duration,
    /// Requests served on one connection before it is closed
    /// (`keepalive_requests`).
    pub max_requests: usize,
    /// Open connections at most; more are closed as they come, with a log
    /// line (`worker_connections`).
    pub max_connections: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            limits: Limits::default(),
            header_timeout: Duration::from_secs(60),
            keepalive_timeout: Duration::from_secs(75),
            body_timeout: Duration::from_secs(60),
            send_timeout: Duration::from_secs(60),
            lingering_timeout: Duration::from_secs(5),
            max_requests: 1000,
            max_connections: 512,
        }
    }
}

/// What every connection of one server shares.
struct Server {
    clock: Rc<dyn ReactorTime>,
    root: Rc<dyn Resource>,
    config: Config,
    log: Option<Rc<AccessLog>>,
    open: Cell<usize>,
    /// The cap was hit and not yet logged as over.
    at_cap: Cell<bool>,
}

/// Builds an [`HttpChannel`] per connection (Twisted's `Site`), up to
/// [`Config::max_connections`] open at once.
pub struct Site {
    server: Rc<Server>,
}

impl Site {
    /// A server answering every request with `root` (a
    /// [`Router`](super::resource::Router) to serve several), timing out on
    /// `clock` (the reactor), logging responses to `log` if given.
    pub fn new(
        clock: Rc<dyn ReactorTime>,
        root: Rc<dyn Resource>,
        config: Config,
        log: Option<AccessLog>,
    ) -> Self {
        Site {
            server: Rc::new(Server {
                clock,
                root,
                config,
                log: log.map(Rc::new),
                open: Cell::new(0),
                at_cap: Cell::new(false),
            }),
        }
    }

    /// Connections open now.
    pub fn open_connections(&self) -> usize {
        self.server.open.get()
    }

    /// A channel for a connection from `peer`, or `None` at the cap.
    pub fn channel(&self, peer: &Address) -> Option<HttpChannel> {
        let s = &self.server;
        if s.open.get() >= s.config.max_connections {
            if !s.at_cap.replace(true) {
                tracing::warn!(
                    target: "braid",
                    "http: connection limit ({}) reached: closing new connections until some end",
                    s.config.max_connections
                );
            }
            tracing::debug!(target: "braid", "http: refused {peer}: connection limit");
            return None;
        }
        s.open.set(s.open.get() + 1);
        Some(HttpChannel::new(s.clone(), peer.clone()))
    }
}

impl Factory for Site {
    fn build_protocol(&mut self, addr: &Address) -> Option<Box<dyn Protocol>> {
        self.channel(addr).map(|c| Box::new(c) as Box<dyn Protocol>)
    }
}

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Between requests, nothing of the next one received (before the
    /// first request the header timeout runs, after one the keep-alive
    /// timeout).
    Idle,
    /// Part of a head received.
    Head,
    /// Reading (and dropping) a request's body.
    Body,
    /// A response's body is being sent by a producer.
    Responding,
    /// The last response is out; the client's further bytes are dropped
    /// until it closes or the lingering timeout.
    Lingering,
    /// The connection is gone.
    Closed,
}

struct Core {
    transport: Option<Transport>,
    decoder: RequestDecoder,
    phase: Phase,
    /// The head whose body is being read.
    pending: Option<Box<RequestHead>>,
    served: usize,
    /// Keep the connection after the response being sent.
    keep_alive: bool,
    /// Reading is paused while pipelined requests wait.
    paused: bool,
    peer: Address,
    scratch: Vec<u8>,
}

struct Shared {
    server: Rc<Server>,
    core: RefCell<Core>,
    /// Inside `pump`: a body that finishes meanwhile is seen by its loop.
    pumping: Cell<bool>,
    /// Set by the body sender when the body is out.
    body_done: Cell<bool>,
    timer: RefCell<Option<DelayedCall>>,
    /// Bytes buffered when the send timer was last set: less at its
    /// deadline means the client took some.
    sent_mark: Cell<usize>,
}

/// What `step` asks `pump` to do outside the borrow of the core.
enum Step {
    /// Nothing more until the client or the body sender moves.
    Wait,
    /// Take the next step.
    Again,
    /// Start sending a body (registering a producer can call back).
    Send(Transport, Source),
}

/// One HTTP connection. Build them with [`Site`].
pub struct HttpChannel {
    shared: Rc<Shared>,
}

impl HttpChannel {
    fn new(server: Rc<Server>, peer: Address) -> Self {
        let decoder = RequestDecoder::new(server.config.limits.clone());
        HttpChannel {
            shared: Rc::new(Shared {
                server,
                core: RefCell::new(Core {
                    transport: None,
                    decoder,
                    phase: Phase::Idle,
                    pending: None,
                    served: 0,
                    keep_alive: false,
                    paused: false,
                    peer,
                    scratch: Vec::new(),
                }),
                pumping: Cell::new(false),
                body_done: Cell::new(false),
                timer: RefCell::new(None),
                sent_mark: Cell::new(0),
            }),
        }
    }
}

impl Drop for HttpChannel {
    fn drop(&mut self) {
        let s = &self.shared.server;
        s.open.set(s.open.get().saturating_sub(1));
        if s.open.get() < s.config.max_connections && s.at_cap.replace(false) {
            tracing::info!(target: "braid", "http: below the connection limit again");
        }
        if let Some(t) = self.shared.timer.borrow_mut().take() {
            let _ = t.cancel();
        }
    }
}

/// Sets the connection's one timer to fire after `delay`.
fn arm(shared: &Rc<Shared>, delay: Duration) {
    let mut timer = shared.timer.borrow_mut();
    if let Some(t) = timer.as_ref() {
        if t.active() && t.reset(delay).is_ok() {
            return;
        }
    }
    let weak: Weak<Shared> = Rc::downgrade(shared);
    *timer = Some(shared.server.clock.schedule(
        delay,
        Box::new(move || {
            if let Some(shared) = weak.upgrade() {
                timed_out(&shared);
            }
        }),
    ));
}

fn disarm(shared: &Shared) {
    if let Some(t) = shared.timer.borrow_mut().take() {
        let _ = t.cancel();
    }
}

fn timed_out(shared: &Rc<Shared>) {
    let (phase, transport) = {
        let c = shared.core.borrow();
        (c.phase, c.transport.clone())
    };
    let Some(t) = transport else { return };
    match phase {
        // Nothing asked (a browser's spare connection, say): closed
        // without an answer, as nginx does.
        Phase::Idle => {
            tracing::debug!(target: "braid", "http: {} idle: closed", t.peer());
            shared.core.borrow_mut().phase = Phase::Closed;
            t.lose_connection();
        }
        Phase::Head | Phase::Body => {
            tracing::info!(target: "braid", "http: {} too slow sending its request: 408", t.peer());
            let mut c = shared.core.borrow_mut();
            c.refuse(shared, 408, None);
        }
        Phase::Responding if t.buffered() < shared.sent_mark.get() => {
            // The kernel is still taking a file queued whole: progress.
            shared.sent_mark.set(t.buffered());
            arm(shared, shared.server.config.send_timeout);
        }
        Phase::Responding => {
            tracing::info!(target: "braid", "http: {} stopped reading its response: aborted", t.peer());
            shared.core.borrow_mut().phase = Phase::Closed;
            t.unregister_producer();
            t.abort_connection();
        }
        Phase::Lingering => {
            shared.core.borrow_mut().phase = Phase::Closed;
            t.lose_connection();
        }
        Phase::Closed => {}
    }
}

fn transport_buffered(shared: &Shared) -> usize {
    shared.core.try_borrow().ok().and_then(|c| c.transport.as_ref().map(Transport::buffered)).unwrap_or(0)
}

/// Runs the state machine until it waits.
fn pump(shared: &Rc<Shared>) {
    if shared.pumping.replace(true) {
        return;
    }
    loop {
        let step = shared.core.borrow_mut().step(shared);
        match step {
            Step::Wait => break,
            Step::Again => {}
            Step::Send(transport, source) => {
                let weak = Rc::downgrade(shared);
                body::send(
                    &transport,
                    source,
                    Box::new(move |progress| {
                        let Some(shared) = weak.upgrade() else { return };
                        match progress {
                            Progress::Wrote => {
                                shared.sent_mark.set(transport_buffered(&shared));
                                arm(&shared, shared.server.config.send_timeout)
                            }
                            Progress::Done => {
                                shared.body_done.set(true);
                                pump(&shared);
                            }
                            Progress::Failed => shared.core.borrow_mut().phase = Phase::Closed,
                        }
                    }),
                );
            }
        }
    }
    shared.pumping.set(false);
}

impl Core {
    fn step(&mut self, shared: &Rc<Shared>) -> Step {
        let config = &shared.server.config;
        match self.phase {
            Phase::Closed | Phase::Lingering => Step::Wait,
            Phase::Responding => {
                if shared.body_done.replace(false) {
                    self.finish(shared);
                    Step::Again
                } else {
                    Step::Wait
                }
            }
            Phase::Idle | Phase::Head | Phase::Body => match self.decoder.next_event() {
                Ok(None) => {
                    if matches!(self.phase, Phase::Idle) && !self.decoder.idle() {
                        self.phase = Phase::Head;
                        arm(shared, config.header_timeout);
                    }
                    Step::Wait
                }
                Ok(Some(Event::Head(head))) => {
                    if head.body != super::request::BodyFraming::None {
                        if head.expect_continue {
                            if let Some(t) = &self.transport {
                                t.write(b"HTTP/1.1 100 Continue\r\n\r\n");
                            }
                        }
                        self.phase = Phase::Body;
                        arm(shared, config.body_timeout);
                    }
                    self.pending = Some(head);
                    Step::Again
                }
                Ok(Some(Event::Body(_))) => {
                    arm(shared, config.body_timeout);
                    Step::Again
                }
                Ok(Some(Event::End)) => match self.pending.take() {
                    Some(head) => self.dispatch(shared, &head),
                    None => Step::Again,
                },
                Err(refused) => {
                    tracing::debug!(target: "braid", "http: {} sent a bad request: {}", self.peer, refused.why);
                    let head = self.pending.take();
                    self.refuse(shared, refused.status, head.as_deref());
                    Step::Wait
                }
            },
        }
    }

    /// Answers `status` and closes (after lingering).
    fn refuse(&mut self, shared: &Rc<Shared>, status: u16, head: Option<&RequestHead>) {
        let version = head.map_or(Version::Http11, |h| h.version);
        let response = Response::error(status);
        self.keep_alive = false;
        if let Some(t) = self.transport.clone() {
            let Body::Bytes(body) = &response.body else { return };
            let mut out = std::mem::take(&mut self.scratch);
            out.clear();
            response::write_head(&mut out, version, &response, Framing::Length(body.len() as u64), false);
            out.extend_from_slice(body);
            t.write(&out);
            self.scratch = out;
            self.log(shared, head, status, body.len() as u64);
        }
        self.linger(shared);
    }

    /// Our side is done: shut down our write side once the buffer is out,
    /// and drop what the client still sends until it closes too.
    fn linger(&mut self, shared: &Rc<Shared>) {
        self.phase = Phase::Lingering;
        if let Some(t) = &self.transport {
            if self.paused {
                self.paused = false;
                t.resume_producing();
            }
            t.lose_write_connection();
        }
        arm(shared, shared.server.config.lingering_timeout);
    }

    fn log(&self, shared: &Shared, head: Option<&RequestHead>, status: u16, bytes: u64) {
        let Some(log) = &shared.server.log else { return };
        let client = match &self.peer {
            Address::Ip(a) => a.ip().to_string(),
            other => other.to_string(),
        };
        let line = head.map(|h| h.request_line());
        let header =
            |n: &str| head.and_then(|h| h.headers().find(|(k, _)| k.eq_ignore_ascii_case(n)).map(|(_, v)| v));
        log.log(&Entry {
            client: &client,
            request_line: line.as_deref().map(str::as_bytes),
            status,
            bytes,
            referer: header("referer"),
            user_agent: header("user-agent"),
        });
    }

    /// Answers a complete request.
    fn dispatch(&mut self, shared: &Rc<Shared>, head: &RequestHead) -> Step {
        let server = &shared.server;
        self.served += 1;
        let Some(transport) = self.transport.clone() else { return Step::Wait };
        let target = match path::resolve(head.target()) {
            Ok(p) => p,
            // `OPTIONS *` asks about the server: no method but GET and HEAD.
            Err(_) if head.target() == "*" && head.method() == "OPTIONS" => {
                path::RequestPath { segments: Vec::new(), trailing_slash: true, query: None }
            }
            Err(_) => {
                self.refuse(shared, 400, Some(head));
                return Step::Wait;
            }
        };
        self.keep_alive = head.keep_alive && self.served < server.config.max_requests;
        let method = head.method();
        let request = Request { head, path: &target, mount_depth: 0, peer: &self.peer };
        let mut response = super::resource::render(&*server.root, &request);
        let head_only = method == "HEAD";
        let status = response.status;
        let body = std::mem::replace(&mut response.body, Body::Empty);
        let (framing, source, bytes): (Framing, Option<Source>, Vec<u8>) = match body {
            _ if response::bodiless(status) => (Framing::None, None, Vec::new()),
            Body::Empty => (Framing::Length(0), None, Vec::new()),
            Body::Bytes(b) => (Framing::Length(b.len() as u64), None, b),
            Body::File { file, offset, len } => {
                (Framing::Length(len), Some(Source::File { file: Rc::new(file), offset, len }), Vec::new())
            }
            Body::Stream(stream) if head_only => {
                drop(stream);
                (Framing::None, None, Vec::new())
            }
            Body::Stream(stream) => {
                let chunked = head.version == Version::Http11;
                if !chunked {
                    self.keep_alive = false;
                }
                let framing = if chunked { Framing::Chunked } else { Framing::None };
                (framing, Some(Source::Stream { stream, chunked }), Vec::new())
            }
        };
        let length = match framing {
            Framing::Length(n) => n,
            _ => 0,
        };
        let mut out = std::mem::take(&mut self.scratch);
        out.clear();
        response::write_head(&mut out, head.version, &response, framing, self.keep_alive);
        self.log(shared, Some(head), status, if head_only { 0 } else { length });
        let source = if head_only { None } else { source };
        let step = match source {
            None => {
                out.extend_from_slice(if head_only { &[] } else { &bytes[..] });
                transport.write(&out);
                self.finish(shared);
                Step::Again
            }
            // A small body goes out with its head in one write.
            Some(source) if body::inline_size(&source).is_some() => {
                match body::append_inline(&mut out, source) {
                    Ok(()) => {
                        transport.write(&out);
                        self.finish(shared);
                        Step::Again
                    }
                    Err(e) => {
                        tracing::warn!(target: "braid", "http: reading a file for {}: {e}", self.peer);
                        self.phase = Phase::Closed;
                        transport.abort_connection();
                        Step::Wait
                    }
                }
            }
            Some(source) => {
                transport.write(&out);
                self.phase = Phase::Responding;
                shared.body_done.set(false);
                arm(shared, server.config.send_timeout);
                Step::Send(transport, source)
            }
        };
        // Kept for the next response unless a large one grew it: an idle
        // connection should not hold a file's worth of memory.
        if out.capacity() <= SCRATCH_KEPT {
            self.scratch = out;
        }
        step
    }

    /// The response is out: on to the next request, or close.
    fn finish(&mut self, shared: &Rc<Shared>) {
        if !self.keep_alive {
            self.linger(shared);
            return;
        }
        self.phase = Phase::Idle;
        arm(shared, shared.server.config.keepalive_timeout);
        if self.paused {
            self.paused = false;
            if let Some(t) = &self.transport {
                t.resume_producing();
            }
        }
    }
}

/// The largest response-head buffer a connection keeps between requests.
const SCRATCH_KEPT: usize = 16 * 1024;

impl Protocol for HttpChannel {
    fn connection_made(&mut self, transport: Transport) {
        if let Some(tcp) = transport.tcp() {
            let _ = tcp.set_nodelay(true);
        }
        self.shared.core.borrow_mut().transport = Some(transport);
        arm(&self.shared, self.shared.server.config.header_timeout);
    }

    fn data_received(&mut self, data: &[u8]) {
        {
            let mut c = self.shared.core.borrow_mut();
            match c.phase {
                Phase::Lingering | Phase::Closed => return,
                Phase::Responding => {
                    c.decoder.feed(data);
                    // Pipelined requests wait; past a full head's worth, so
                    // does the client.
                    if c.decoder.buffered() > self.shared.server.config.limits.max_header_bytes && !c.paused {
                        c.paused = true;
                        if let Some(t) = &c.transport {
                            t.pause_producing();
                        }
                    }
                    return;
                }
                _ => c.decoder.feed(data),
            }
        }
        pump(&self.shared);
    }

    fn connection_lost(&mut self, _reason: Failure) {
        {
            let mut c = self.shared.core.borrow_mut();
            c.phase = Phase::Closed;
            c.transport = None;
        }
        disarm(&self.shared);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocols::http::resource::Router;
    use crate::protocols::http::response::BodyStream;
    use crate::testing::{Clock, StringTransport};

    struct Counter(u32);

    impl BodyStream for Counter {
        fn next_chunk(&mut self) -> std::io::Result<Option<Vec<u8>>> {
            self.0 += 1;
            Ok((self.0 <= 3).then(|| format!("part{}", self.0).into_bytes()))
        }
    }

    fn router() -> Router {
        Router::new()
            .mount("/hello", |r: &Request<'_>| {
                Response::text(200, format!("hello {}", r.segments().join("/")))
            })
            .mount("/stream", |_: &Request<'_>| Response::new(200).body(Body::Stream(Box::new(Counter(0)))))
            .mount("/big", |_: &Request<'_>| {
                let f = std::fs::File::open("/proc/self/exe").unwrap();
                Response::new(200).body(Body::File { file: f, offset: 0, len: 3 * body::CHUNK as u64 })
            })
    }

    fn setup(config: Config) -> (Rc<Clock>, StringTransport, HttpChannel) {
        let clock = Rc::new(Clock::new());
        let time: Rc<dyn ReactorTime> = clock.clone();
        let site = Site::new(time, Rc::new(router()), config, None);
        let st = StringTransport::new();
        let mut ch = site.channel(&st.transport().peer()).unwrap();
        st.connect(&mut ch);
        (clock, st, ch)
    }

    fn text(st: &StringTransport) -> String {
        String::from_utf8_lossy(&st.take()).into_owned()
    }

    fn bodies(out: &str) -> Vec<&str> {
        out.split("HTTP/1.1 ").skip(1).map(|r| r.split("\r\n\r\n").nth(1).unwrap_or("")).collect()
    }

    #[test]
    fn pipelined_requests_in_order_with_a_producer_body_between() {
        let (_clock, st, mut ch) = setup(Config::default());
        st.feed(
            &mut ch,
            b"GET /hello/a HTTP/1.1\r\nHost: x\r\n\r\nGET /big HTTP/1.1\r\nHost: x\r\n\r\nGET /hello/b HTTP/1.1\r\nHost: x\r\n\r\n",
        );
        let first = text(&st);
        assert!(first.contains("hello a"), "{first}");
        assert!(!first.contains("hello b"), "answered before the body in between was sent");
        let mut pieces = 0;
        while let Some(p) = st.producer() {
            p.resume_producing();
            pieces += 1;
            assert!(pieces < 10);
        }
        assert_eq!(pieces, 3, "one bounded piece per pull");
        let rest = text(&st);
        assert!(
            rest.ends_with("hello b"),
            "the pipelined request after the body: {}",
            &rest[rest.len() - 40..]
        );
        assert!(!st.disconnecting() && !st.write_closed());
    }

    // While a body is out, pipelined requests past a head's worth stop
    // the reading; once it is sent, reading resumes and they are answered.
    #[test]
    fn a_pipelined_backlog_pauses_reading() {
        use crate::testing::ProducerState;
        let (_clock, st, mut ch) = setup(Config::default());
        st.feed(&mut ch, b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n");
        let backlog = b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n".repeat(300);
        st.feed(&mut ch, &backlog[..4000]);
        assert_eq!(st.producer_state(), ProducerState::Producing);
        st.feed(&mut ch, &backlog[4000..]);
        assert_eq!(st.producer_state(), ProducerState::Paused);
        while let Some(p) = st.producer() {
            p.resume_producing();
        }
        assert_eq!(st.producer_state(), ProducerState::Producing);
        assert_eq!(text(&st).matches("hello ").count(), 300);
    }

    #[test]
    fn streams_are_chunked_on_1_1_and_end_the_connection_on_1_0() {
        let (_clock, st, mut ch) = setup(Config::default());
        st.feed(&mut ch, b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n");
        while let Some(p) = st.producer() {
            p.resume_producing();
        }
        let out = text(&st);
        assert!(out.contains("Transfer-Encoding: chunked\r\n"), "{out}");
        assert!(out.ends_with("\r\n\r\n5\r\npart1\r\n5\r\npart2\r\n5\r\npart3\r\n0\r\n\r\n"), "{out}");
        let (_clock, st, mut ch) = setup(Config::default());
        st.feed(&mut ch, b"GET /stream HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
        while let Some(p) = st.producer() {
            p.resume_producing();
        }
        let out = text(&st);
        assert!(out.contains("Connection: close\r\n") && out.ends_with("part1part2part3"), "{out}");
        assert!(st.write_closed(), "the body ends with the connection");
    }

    #[test]
    fn router_404_and_methods() {
        let (_clock, st, mut ch) = setup(Config::default());
        st.feed(&mut ch, b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\nPOST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhiHEAD /hello/z HTTP/1.1\r\nHost: x\r\n\r\n");
        let out = text(&st);
        let statuses: Vec<&str> = out.split("HTTP/1.1 ").skip(1).map(|r| &r[..3]).collect();
        assert_eq!(statuses, ["404", "405", "200"], "{out}");
        assert!(out.contains("Allow: GET, HEAD\r\n"));
        assert!(out.ends_with("Content-Length: 7\r\n\r\n"), "HEAD: the length, no body: {out}");
        assert_eq!(bodies(&out).last(), Some(&""));
    }

    #[test]
    fn timeouts_on_the_clock() {
        let config = Config {
            header_timeout: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(5),
            send_timeout: Duration::from_secs(7),
            ..Config::default()
        };
        // A head that never completes: 408 at the header timeout.
        let (clock, st, mut ch) = setup(config.clone());
        st.feed(&mut ch, b"GET /hello HTTP/1.1\r\n");
        clock.advance(Duration::from_secs(9));
        assert!(st.value().is_empty());
        clock.advance(Duration::from_secs(2));
        assert!(text(&st).starts_with("HTTP/1.1 408 "));
        assert!(st.write_closed());
        // Idle after a response: closed at the keep-alive timeout, not before.
        let (clock, st, mut ch) = setup(config.clone());
        st.feed(&mut ch, b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n");
        clock.advance(Duration::from_secs(4));
        assert!(!st.disconnecting());
        clock.advance(Duration::from_secs(2));
        assert!(st.disconnecting());
        // A client that takes nothing of a body: aborted at the send timeout.
        let (clock, st, mut ch) = setup(config);
        st.feed(&mut ch, b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(st.producer().is_some());
        clock.advance(Duration::from_secs(6));
        st.producer().unwrap().resume_producing();
        clock.advance(Duration::from_secs(6));
        assert!(!st.aborted(), "a piece was taken: the timer started again");
        clock.advance(Duration::from_secs(2));
        assert!(st.aborted());
    }

    #[test]
    fn requests_per_connection_and_the_connection_cap() {
        let clock = Rc::new(Clock::new());
        let time: Rc<dyn ReactorTime> = clock.clone();
        let config = Config { max_requests: 2, max_connections: 1, ..Config::default() };
        let site = Site::new(time, Rc::new(router()), config, None);
        let st = StringTransport::new();
        let mut ch = site.channel(&st.transport().peer()).unwrap();
        assert!(site.channel(&st.transport().peer()).is_none(), "past the cap");
        st.connect(&mut ch);
        st.feed(&mut ch, &b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n".repeat(3));
        let out = text(&st);
        assert_eq!(out.matches("HTTP/1.1 200").count(), 2, "{out}");
        assert!(out.ends_with("Connection: close\r\n\r\nhello "), "{out}");
        assert!(st.write_closed());
        drop(ch);
        assert_eq!(site.open_connections(), 0);
        assert!(site.channel(&st.transport().peer()).is_some(), "below the cap again");
    }
}
