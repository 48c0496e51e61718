//! Single-threaded TLS load generator for TLS echo servers: a rustls client on mio. Every
//! echoed byte is decrypted and checked.
//!
//! ```text
//! tls_loadgen SCENARIO --addr HOST:PORT --ca PEM [options]
//!   bulk       1 connection streams --bytes (256 MiB) through the echo, writing and reading
//!              concurrently (at most 4 MiB in flight); MiB/s
//!   handshake  --workers (32) concurrent short connections: connect, handshake, one --size (64)
//!              byte round trip, close_notify, close with SO_LINGER 0 (RST, so no TIME_WAIT
//!              piles up); handshakes/s. `--resume` gives each worker a session cache kept
//!              across its connections, so after the warm-up every handshake offers a ticket;
//!              without it every handshake is a full one
//!   idle       --conns (10000) connections, each with a full handshake and one 64-byte round
//!              trip, --workers (32) in progress at a time; held until a line on stdin
//!              (--wait-stdin) or for --hold S (0)
//! options: --seconds S (3; bulk: the time limit, 120), --max-ops N (bounds the handshake loop),
//!          --warmup N (handshake: connections before the measured run, 200)
//! ```
//!
//! Output on stdout, as `loadgen`'s: `MARK start` and `MARK end` around what `ops` counts (idle:
//! `MARK start` before the first connection, `MARK ready` when all are open, `MARK end` before
//! they close), then `RESULT scenario=... ops=N seconds=S rate=R ...`, with `resumed` (the share
//! of measured handshakes that were resumed), `version` and `suite` as negotiated. On any
//! failure, including a byte that came back wrong, `ERROR message` and exit status 2.

use std::io::{self, BufRead, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream as StdStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use braid_bench::{Args, Pattern, PATTERN_MAX_SLICE};
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, HandshakeKind};

type Res<T> = Result<T, String>;

/// Bytes of the round trip each connection makes after its handshake.
const PROBE: usize = 64;
/// Plaintext the bulk writer keeps ahead of what came back.
const BULK_WINDOW: u64 = 4 << 20;
/// How long a connection may take to finish once no new ones are started.
const DRAIN_LIMIT: Duration = Duration::from_secs(10);
const IO_TIMEOUT: Duration = Duration::from_secs(10);

fn main() {
    let args = Args::parse(&["wait-stdin", "resume"]);
    let Some(scenario) = args.positional().first().cloned() else {
        braid_bench::die("usage: tls_loadgen bulk|handshake|idle --addr HOST:PORT --ca PEM [options]")
    };
    let addr: SocketAddr = match args.get("addr").map(str::parse) {
        Some(Ok(a)) => a,
        _ => braid_bench::die("--addr HOST:PORT is required"),
    };
    let Some(ca) = args.get("ca") else { braid_bench::die("--ca PEM is required") };
    braid_bench::raise_nofile_limit();
    let resume = args.flag("resume");
    let config = braid_bench::tls::client_config(Path::new(ca), resume)
        .unwrap_or_else(|e| braid_bench::die(&format!("--ca: {e}")));
    let workers: usize = args.num("workers", 32usize).clamp(1, 4096);
    // A session cache for each worker, as if each were a client reconnecting: rustls keeps at
    // most a few TLS 1.3 tickets per server name, fewer than 32 connections in progress take.
    let configs = if resume {
        (0..workers)
            .map(|_| {
                let mut c = (*config).clone();
                c.resumption = rustls::client::Resumption::in_memory_sessions(4);
                Arc::new(c)
            })
            .collect()
    } else {
        vec![config]
    };
    let pattern = Pattern::new();
    let ctx = Ctx { addr, configs, workers, pattern: &pattern };
    let result = match scenario.as_str() {
        "bulk" => bulk(&args, &ctx),
        "handshake" => handshake(&args, &ctx, resume),
        "idle" => idle(&args, &ctx),
        other => braid_bench::die(&format!("unknown scenario {other}")),
    };
    match result {
        Ok(fields) => println!("RESULT scenario={scenario} {}", fields.join(" ")),
        Err(e) => {
            println!("ERROR {e}");
            eprintln!("tls_loadgen {scenario}: {e}");
            std::process::exit(2);
        }
    }
}

fn mark(name: &str) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "MARK {name}");
    let _ = out.flush();
}

fn field(key: &str, value: impl std::fmt::Display) -> String {
    format!("{key}={value}")
}

fn io_err(what: &str) -> impl Fn(io::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

fn poll_once(poll: &mut Poll, events: &mut Events, timeout: Duration) -> Res<()> {
    match poll.poll(events, Some(timeout)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::Interrupted => Ok(()),
        Err(e) => Err(format!("epoll_wait: {e}")),
    }
}

/// What every connection needs: where to go, how, and what to send.
struct Ctx<'a> {
    addr: SocketAddr,
    /// Worker `i` uses `configs[i % configs.len()]`.
    configs: Vec<Arc<ClientConfig>>,
    workers: usize,
    pattern: &'a Pattern,
}

/// One TLS client connection on a non-blocking socket.
struct Conn {
    s: TcpStream,
    tls: ClientConnection,
    /// Stream offset of this connection's first byte in the pattern.
    base: u64,
    /// Plaintext handed to rustls, plaintext read back (and checked), plaintext to send.
    sent: u64,
    recvd: u64,
    target: u64,
    /// The server closed its side (EOF or close_notify).
    eof: bool,
}

impl Conn {
    /// Connects (blocking: loopback connects complete in the kernel) and starts the handshake;
    /// the first `target` bytes go out as soon as it completes.
    fn open(ctx: &Ctx, worker: usize, id: u64, target: u64) -> Res<Conn> {
        let s = StdStream::connect_timeout(&ctx.addr, IO_TIMEOUT).map_err(io_err("connect"))?;
        s.set_nodelay(true).map_err(io_err("TCP_NODELAY"))?;
        s.set_nonblocking(true).map_err(io_err("O_NONBLOCK"))?;
        let name = ServerName::try_from("localhost").map_err(|e| e.to_string())?;
        let tls = ClientConnection::new(ctx.configs[worker % ctx.configs.len()].clone(), name)
            .map_err(|e| format!("rustls: {e}"))?;
        Ok(Conn {
            s: TcpStream::from_std(s),
            tls,
            base: Pattern::base(id),
            sent: 0,
            recvd: 0,
            target,
            eof: false,
        })
    }

    /// Moves everything that can move without blocking: ciphertext in, plaintext checked,
    /// plaintext out (at most `window` ahead of what came back), ciphertext out.
    fn pump(&mut self, pattern: &Pattern, scratch: &mut [u8], window: u64) -> Res<()> {
        loop {
            let mut progress = false;
            // In.
            if !self.eof {
                match self.tls.read_tls(&mut self.s) {
                    Ok(0) => self.eof = true,
                    Ok(_) => progress = true,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) => return Err(format!("read: {e}")),
                }
                let state = self.tls.process_new_packets().map_err(|e| format!("TLS: {e}"))?;
                if state.peer_has_closed() {
                    self.eof = true;
                }
            }
            loop {
                match self.tls.reader().read(scratch) {
                    Ok(0) => break,
                    Ok(n) => {
                        let want = pattern.at(self.base + self.recvd, n);
                        if &scratch[..n] != want {
                            return Err(format!("echo mismatch at stream offset {}", self.recvd));
                        }
                        self.recvd += n as u64;
                        if self.recvd > self.sent {
                            return Err("the server echoed more than was sent".into());
                        }
                        progress = true;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => return Err(format!("TLS read: {e}")),
                }
            }
            // Out.
            while self.sent < self.target && self.sent - self.recvd < window {
                let len =
                    (self.target - self.sent).min(window - (self.sent - self.recvd)).min(64 * 1024) as usize;
                let n = self
                    .tls
                    .writer()
                    .write(pattern.at(self.base + self.sent, len))
                    .map_err(io_err("TLS write"))?;
                if n == 0 {
                    break;
                }
                self.sent += n as u64;
                progress = true;
            }
            while self.tls.wants_write() {
                match self.tls.write_tls(&mut self.s) {
                    Ok(_) => progress = true,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => return Err(format!("write: {e}")),
                }
            }
            if !progress {
                return Ok(());
            }
        }
    }

    fn done(&self) -> bool {
        self.recvd == self.target
    }

    /// close_notify, then a reset: the server sees the alert first unless the reset overtakes it.
    fn close(mut self) {
        self.tls.send_close_notify();
        while self.tls.wants_write() {
            if self.tls.write_tls(&mut self.s).is_err() {
                break;
            }
        }
        let _ = rustix::net::sockopt::set_socket_linger(&self.s, Some(Duration::ZERO));
    }
}

/// How the negotiated parameters read in a RESULT line.
fn negotiated(tls: &ClientConnection) -> Vec<String> {
    let version = tls.protocol_version().map_or("none".to_string(), |v| format!("{v:?}"));
    let suite = tls.negotiated_cipher_suite().map_or("none".to_string(), |s| format!("{:?}", s.suite()));
    vec![field("version", version), field("suite", suite)]
}

fn bulk(args: &Args, ctx: &Ctx) -> Res<Vec<String>> {
    let bytes: u64 = args.num("bytes", 256u64 << 20).max(1);
    let limit = args.seconds("seconds", 120.0);
    let mut poll = Poll::new().map_err(io_err("epoll_create"))?;
    let mut events = Events::with_capacity(16);
    let mut scratch = vec![0u8; PATTERN_MAX_SLICE];
    let mut c = Conn::open(ctx, 0, 0, PROBE as u64)?;
    poll.registry()
        .register(&mut c.s, Token(0), Interest::READABLE | Interest::WRITABLE)
        .map_err(io_err("epoll_ctl"))?;
    let until = Instant::now() + IO_TIMEOUT;
    while !c.done() {
        c.pump(ctx.pattern, &mut scratch, BULK_WINDOW)?;
        if c.eof && !c.done() {
            return Err("the server closed during the handshake".into());
        }
        if Instant::now() > until {
            return Err("handshake and probe not done within 10 s".into());
        }
        if !c.done() {
            poll_once(&mut poll, &mut events, Duration::from_millis(50))?;
        }
    }
    mark("start");
    let start = Instant::now();
    let deadline = start + limit;
    c.target = PROBE as u64 + bytes;
    while !c.done() {
        c.pump(ctx.pattern, &mut scratch, BULK_WINDOW)?;
        if c.done() {
            break;
        }
        if c.eof {
            return Err(format!("the server closed after {} of {bytes} bytes", c.recvd));
        }
        if Instant::now() > deadline {
            return Err(format!("only {} of {bytes} bytes echoed within {limit:?}", c.recvd - PROBE as u64));
        }
        poll_once(&mut poll, &mut events, Duration::from_millis(50))?;
    }
    let secs = start.elapsed().as_secs_f64();
    mark("end");
    let mut fields = vec![
        field("bytes", bytes),
        field("ops", bytes as f64 / (1u64 << 20) as f64), // one operation = one MiB echoed
        field("op", "MiB"),
        field("seconds", format!("{secs:.4}")),
        field("rate", format!("{:.1}", bytes as f64 / (1u64 << 20) as f64 / secs)),
        field("gbps", format!("{:.3}", bytes as f64 / secs / 1e9)),
    ];
    fields.extend(negotiated(&c.tls));
    c.close();
    Ok(fields)
}

/// Figures of a run of short connections.
#[derive(Default)]
struct Run {
    completed: u64,
    resumed: u64,
    /// The negotiated parameters of the last connection.
    negotiated: Vec<String>,
}

/// Runs connections with `workers` in progress at a time until `count` have started or
/// `limit` has passed, then lets those in progress finish. Each makes a handshake and one
/// round trip; then it is closed, or with `keep` handed back (deregistered) in `kept`.
fn short_connections(
    ctx: &Ctx,
    poll: &mut Poll,
    workers: usize,
    count: u64,
    limit: Duration,
    first_id: u64,
    mut kept: Option<&mut Vec<Conn>>,
) -> Res<Run> {
    let mut slots: Vec<Option<(Conn, Instant)>> = (0..workers).map(|_| None).collect();
    let mut events = Events::with_capacity(1024);
    let mut scratch = vec![0u8; 16 * 1024];
    let mut ready: Vec<usize> = Vec::with_capacity(workers);
    let mut run = Run::default();
    let mut started = 0u64;
    let start = Instant::now();
    let stop_starting = start + limit;
    loop {
        let may_start = started < count && Instant::now() < stop_starting;
        for (i, slot) in slots.iter_mut().enumerate() {
            if slot.is_some() || !may_start || started >= count {
                continue;
            }
            let mut c = Conn::open(ctx, i, first_id + started, PROBE as u64)?;
            poll.registry()
                .register(&mut c.s, Token(i), Interest::READABLE | Interest::WRITABLE)
                .map_err(io_err("epoll_ctl"))?;
            c.pump(ctx.pattern, &mut scratch, PROBE as u64)?;
            *slot = Some((c, Instant::now()));
            started += 1;
        }
        if slots.iter().all(Option::is_none) {
            return Ok(run);
        }
        poll_once(poll, &mut events, Duration::from_millis(50))?;
        // Those with events; all of them when none had one, so a missed edge cannot stall one.
        ready.clear();
        ready.extend(events.iter().map(|e| e.token().0).filter(|&i| i < workers));
        if ready.is_empty() {
            ready.extend(0..workers);
        }
        for &i in &ready {
            let slot = &mut slots[i];
            let Some((c, since)) = slot.as_mut() else { continue };
            c.pump(ctx.pattern, &mut scratch, PROBE as u64)?;
            if c.done() && !c.tls.is_handshaking() {
                let (mut c, _) = slot.take().expect("slot");
                run.completed += 1;
                if c.tls.handshake_kind() == Some(HandshakeKind::Resumed) {
                    run.resumed += 1;
                }
                if run.negotiated.is_empty() {
                    run.negotiated = negotiated(&c.tls);
                }
                poll.registry().deregister(&mut c.s).map_err(io_err("epoll_ctl"))?;
                match kept.as_deref_mut() {
                    Some(k) => k.push(c),
                    None => c.close(),
                }
            } else if c.eof {
                return Err(format!("the server closed a connection after {} of {PROBE} bytes", c.recvd));
            } else if since.elapsed() > DRAIN_LIMIT {
                return Err(format!("a connection took more than {DRAIN_LIMIT:?} (handshake and {PROBE} B)"));
            }
        }
    }
}

fn handshake(args: &Args, ctx: &Ctx, resume: bool) -> Res<Vec<String>> {
    let workers = ctx.workers;
    let limit = args.seconds("seconds", 3.0);
    let max_ops: u64 = args.num("max-ops", 10_000_000);
    let warmup: u64 = args.num("warmup", 200);
    let mut poll = Poll::new().map_err(io_err("epoll_create"))?;
    // The warm-up also fills the session cache, so the measured run resumes from its start.
    short_connections(ctx, &mut poll, workers, warmup, Duration::from_secs(30), 0, None)?;
    mark("start");
    let start = Instant::now();
    let run = short_connections(ctx, &mut poll, workers, max_ops, limit, warmup, None)?;
    let secs = start.elapsed().as_secs_f64();
    mark("end");
    let share = run.resumed as f64 / run.completed.max(1) as f64;
    if resume && share < 0.5 {
        return Err(format!("only {} of {} handshakes were resumed", run.resumed, run.completed));
    }
    if !resume && run.resumed > 0 {
        return Err(format!("{} handshakes were resumed without a session cache", run.resumed));
    }
    let mut fields = vec![
        field("ops", run.completed),
        field("seconds", format!("{secs:.4}")),
        field("rate", format!("{:.1}", run.completed as f64 / secs)),
        field("resumed", format!("{share:.4}")),
        field("workers", workers),
    ];
    fields.extend(run.negotiated);
    Ok(fields)
}

fn idle(args: &Args, ctx: &Ctx) -> Res<Vec<String>> {
    let conns: u64 = args.num("conns", 10_000u64).max(1);
    let workers = ctx.workers;
    let mut poll = Poll::new().map_err(io_err("epoll_create"))?;
    let mut kept = Vec::with_capacity(conns as usize);
    mark("start");
    let start = Instant::now();
    let run =
        short_connections(ctx, &mut poll, workers, conns, Duration::from_secs(120), 0, Some(&mut kept))?;
    let secs = start.elapsed().as_secs_f64();
    if run.completed < conns {
        return Err(format!("only {} of {conns} connections opened within 120 s", run.completed));
    }
    mark("ready");
    if args.flag("wait-stdin") {
        let mut line = String::new();
        io::stdin().lock().read_line(&mut line).map_err(io_err("stdin"))?;
    } else {
        std::thread::sleep(args.seconds("hold", 0.0));
    }
    // Each is still there and still works: nothing the server did while idle broke one.
    let closed =
        kept.iter_mut().map(|c| matches!(c.tls.read_tls(&mut c.s), Ok(0))).filter(|&gone| gone).count();
    if closed > 0 {
        return Err(format!("the server closed {closed} of the idle connections"));
    }
    mark("end");
    let mut fields = vec![
        field("ops", run.completed),
        field("conns", run.completed),
        field("seconds", format!("{secs:.4}")),
        field("rate", format!("{:.1}", run.completed as f64 / secs)),
    ];
    fields.extend(run.negotiated);
    for c in kept {
        c.close();
    }
    Ok(fields)
}
