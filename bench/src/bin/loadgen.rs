//! Single-threaded load generator for echo servers. Every echoed byte is checked.
//!
//! ```text
//! loadgen SCENARIO --addr HOST:PORT [options]
//!   pingpong   1 connection, one --size (64) byte message at a time; round trips/s, p50/p99
//!   pipeline   --conns (100) connections, each keeping --depth (16) messages of --size (128)
//!              bytes in flight; messages/s
//!   bulk       1 connection streams --bytes (1 GiB) through the echo, writing and reading
//!              concurrently; GB/s
//!   accept     --workers (32) concurrent short connections: connect, one --size (64) byte round
//!              trip, close; connections/s. `--close rst` (the default) closes with SO_LINGER 0, so
//!              no TIME_WAIT piles up on the client; `--close fin` closes normally, and on loopback
//!              the ephemeral ports held in TIME_WAIT then cap the rate (about 14k/s here)
//!   idle       --conns (10000) connections opened (each makes one 64-byte round trip, so the
//!              server has surely accepted it) and held; then a ping-pong on a new connection
//!              while they stay open
//!   short-idle the accept loop in three phases: with no other connection open, with --idle
//!              (10000) idle ones open (opened as in idle), and after those were reset (then
//!              --wait-stdin, else --hold S, 1). Per phase a warm-up and --rounds (5) runs of
//!              --count (5000) connections, each run also ended by --seconds (3). Marks `start.P.R`
//!              and `end.P.R` around run R of phase P (0, 1, 2), `ops.P.R`, `secs.P.R` in the result
//! options: --seconds S (3; bulk: the time limit, 120), --max-ops N (bounds every load loop),
//!          --wait-stdin (idle: after `MARK ready`, wait for a line on stdin; short-idle: after
//!          `MARK idle-closed`), --hold S (idle: else wait S seconds, 0), --connect-concurrency N (32)
//! ```
//!
//! Output on stdout: `MARK NAME` lines at phase boundaries (`start`, `end`; idle also `ready` and
//! `pingpong`; short-idle its own, above) so a runner can sample the server's CPU time and memory there, then one line
//! `RESULT scenario=... ops=N seconds=S rate=R ...` (key=value). On any failure, including a
//! byte that came back wrong, it prints `ERROR message` and exits with status 2.
//! The time between `MARK start` and `MARK end` is what `seconds` measures and what `ops` counts.

use std::io::{self, BufRead, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream as StdStream};
use std::time::{Duration, Instant};

use braid_bench::{Args, Pattern, PATTERN_MAX_SLICE};
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

type Res<T> = Result<T, String>;

/// Size of the probe round trip each mio connection makes before the measured phase.
const PROBE: u64 = 64;
/// How long stragglers may take after the sending stops.
const DRAIN_LIMIT: Duration = Duration::from_secs(10);
/// Timeout of blocking I/O, so a stalled server cannot hang the load generator.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

fn main() {
    let args = Args::parse(&["wait-stdin"]);
    let Some(scenario) = args.positional().first().cloned() else {
        braid_bench::die(
            "usage: loadgen pingpong|pipeline|bulk|accept|idle|short-idle --addr HOST:PORT [options]",
        )
    };
    let addr: SocketAddr = match args.get("addr").map(str::parse) {
        Some(Ok(a)) => a,
        _ => braid_bench::die("--addr HOST:PORT is required"),
    };
    braid_bench::raise_nofile_limit();
    let pattern = Pattern::new();
    let result = match scenario.as_str() {
        "pingpong" => pingpong(&args, addr, &pattern),
        "pipeline" => pipeline(&args, addr, &pattern),
        "bulk" => bulk(&args, addr, &pattern),
        "accept" => accept(&args, addr, &pattern),
        "idle" => idle(&args, addr, &pattern),
        "short-idle" => short_idle(&args, addr, &pattern),
        other => braid_bench::die(&format!("unknown scenario {other}")),
    };
    match result {
        Ok(fields) => println!("RESULT scenario={scenario} {}", fields.join(" ")),
        Err(e) => {
            println!("ERROR {e}");
            eprintln!("loadgen {scenario}: {e}");
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

// ---------------------------------------------------------------------------------------------
// Ping-pong on a blocking socket (used by `pingpong` and by `idle`).

struct PingPong {
    ops: u64,
    elapsed: Duration,
    latencies_ns: Vec<u32>,
}

impl PingPong {
    fn percentile_us(&mut self, p: f64) -> f64 {
        if self.latencies_ns.is_empty() {
            return f64::NAN;
        }
        self.latencies_ns.sort_unstable();
        let i = ((self.latencies_ns.len() - 1) as f64 * p).round() as usize;
        self.latencies_ns[i] as f64 / 1000.0
    }

    fn fields(mut self) -> Vec<String> {
        let secs = self.elapsed.as_secs_f64();
        vec![
            field("ops", self.ops),
            field("seconds", format!("{secs:.4}")),
            field("rate", format!("{:.1}", self.ops as f64 / secs)),
            field("p50_us", format!("{:.2}", self.percentile_us(0.50))),
            field("p99_us", format!("{:.2}", self.percentile_us(0.99))),
        ]
    }
}

fn connect_blocking(addr: SocketAddr) -> Res<StdStream> {
    let s = StdStream::connect_timeout(&addr, IO_TIMEOUT).map_err(io_err("connect"))?;
    s.set_nodelay(true).map_err(io_err("TCP_NODELAY"))?;
    s.set_read_timeout(Some(IO_TIMEOUT)).map_err(io_err("SO_RCVTIMEO"))?;
    s.set_write_timeout(Some(IO_TIMEOUT)).map_err(io_err("SO_SNDTIMEO"))?;
    Ok(s)
}

/// Round trips of `size` bytes until `limit` passes or `max_ops` are done.
fn pingpong_loop(
    s: &mut StdStream,
    pattern: &Pattern,
    offset: &mut u64,
    size: usize,
    limit: Duration,
    max_ops: u64,
    marker: Option<&str>,
) -> Res<PingPong> {
    let mut buf = vec![0u8; size];
    let mut latencies_ns = Vec::with_capacity(max_ops.min(1 << 22) as usize);
    if let Some(m) = marker {
        mark(m);
    }
    let start = Instant::now();
    let deadline = start + limit;
    let mut t0 = start;
    let mut ops = 0;
    while ops < max_ops {
        let msg = pattern.at(*offset, size);
        s.write_all(msg).map_err(io_err("write"))?;
        s.read_exact(&mut buf).map_err(io_err("read"))?;
        if buf != msg {
            return Err(format!("echo mismatch at stream offset {offset}"));
        }
        *offset += size as u64;
        let t1 = Instant::now();
        if latencies_ns.len() < latencies_ns.capacity() {
            latencies_ns.push((t1 - t0).as_nanos().min(u32::MAX as u128) as u32);
        }
        t0 = t1;
        ops += 1;
        if t1 >= deadline {
            break;
        }
    }
    Ok(PingPong { ops, elapsed: t0 - start, latencies_ns })
}

fn pingpong(args: &Args, addr: SocketAddr, pattern: &Pattern) -> Res<Vec<String>> {
    let size: usize = args.num("size", 64).clamp(1, PATTERN_MAX_SLICE);
    let limit = args.seconds("seconds", 3.0);
    let max_ops: u64 = args.num("max-ops", 50_000_000);
    let mut s = connect_blocking(addr)?;
    let mut offset = Pattern::base(0);
    pingpong_loop(&mut s, pattern, &mut offset, size, Duration::from_secs(1), 200, None)?; // warm-up
    let result = pingpong_loop(&mut s, pattern, &mut offset, size, limit, max_ops, Some("start"))?;
    mark("end");
    let mut fields = vec![field("size", size)];
    fields.extend(result.fields());
    Ok(fields)
}

// ---------------------------------------------------------------------------------------------
// Non-blocking connections on one mio poll (pipeline, bulk, idle).

struct Conn {
    s: TcpStream,
    /// Stream offset of this connection's first byte in the pattern.
    base: u64,
    /// Bytes written, bytes read back (and checked), bytes we mean to write.
    sent: u64,
    recvd: u64,
    target: u64,
    connected: bool,
}

impl Conn {
    /// Writes towards `target` until done or the socket is full.
    fn write(&mut self, pattern: &Pattern) -> Res<()> {
        while self.sent < self.target {
            let len = (self.target - self.sent).min(PATTERN_MAX_SLICE as u64) as usize;
            match self.s.write(pattern.at(self.base + self.sent, len)) {
                Ok(n) => {
                    self.sent += n as u64;
                    if n < len {
                        return Ok(()); // full: wait for the writable edge
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("write: {e}")),
            }
        }
        Ok(())
    }

    /// Reads and checks everything available (edge-triggered: a short read means drained).
    fn read(&mut self, pattern: &Pattern, scratch: &mut [u8]) -> Res<()> {
        loop {
            match self.s.read(scratch) {
                Ok(0) => return Err(format!("server closed the connection after {} bytes", self.recvd)),
                Ok(n) => {
                    if self.recvd + n as u64 > self.sent {
                        return Err(format!(
                            "echoed {} bytes, sent only {}",
                            self.recvd + n as u64,
                            self.sent
                        ));
                    }
                    if scratch[..n] != *pattern.at(self.base + self.recvd, n) {
                        return Err(format!(
                            "echo mismatch within stream bytes {}..{}",
                            self.recvd,
                            self.recvd + n as u64
                        ));
                    }
                    self.recvd += n as u64;
                    if n < scratch.len() {
                        return Ok(());
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    }

    /// After a writable edge of a connecting socket: whether the connection is up.
    fn check_connected(&mut self) -> Res<bool> {
        if let Some(e) = self.s.take_error().map_err(io_err("SO_ERROR"))? {
            return Err(format!("connect: {e}"));
        }
        match self.s.peer_addr() {
            Ok(_) => {
                self.connected = true;
                self.s.set_nodelay(true).map_err(io_err("TCP_NODELAY"))?;
                Ok(true)
            }
            Err(e) if e.kind() == ErrorKind::NotConnected => Ok(false),
            Err(e) => Err(format!("connect: {e}")),
        }
    }
}

fn poll_once(poll: &mut Poll, events: &mut Events, timeout: Duration) -> Res<()> {
    match poll.poll(events, Some(timeout)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::Interrupted => Ok(()),
        Err(e) => Err(format!("epoll_wait: {e}")),
    }
}

/// Opens `n` connections, at most `concurrency` in progress at a time; each makes one
/// 64-byte round trip before it counts as open, which proves the server accepted it.
fn establish(
    poll: &mut Poll,
    addr: SocketAddr,
    n: usize,
    concurrency: usize,
    pattern: &Pattern,
    limit: Duration,
) -> Res<Vec<Conn>> {
    let deadline = Instant::now() + limit;
    let mut conns: Vec<Conn> = Vec::with_capacity(n);
    let mut events = Events::with_capacity(1024);
    let mut scratch = vec![0u8; 4096];
    let (mut open, mut in_progress) = (0, 0);
    while open < n {
        while in_progress < concurrency && conns.len() < n {
            let id = conns.len();
            let mut s = TcpStream::connect(addr).map_err(io_err("connect"))?;
            poll.registry()
                .register(&mut s, Token(id), Interest::READABLE | Interest::WRITABLE)
                .map_err(io_err("epoll_ctl"))?;
            let base = Pattern::base(id as u64 + 1);
            conns.push(Conn { s, base, sent: 0, recvd: 0, target: PROBE, connected: false });
            in_progress += 1;
        }
        poll_once(poll, &mut events, Duration::from_millis(100))?;
        for ev in events.iter() {
            let c = &mut conns[ev.token().0];
            if c.recvd == PROBE {
                continue;
            }
            if !c.connected && !c.check_connected()? {
                continue;
            }
            c.write(pattern)?;
            c.read(pattern, &mut scratch)?;
            if c.recvd == PROBE {
                open += 1;
                in_progress -= 1;
            }
        }
        if Instant::now() > deadline {
            return Err(format!("only {open} of {n} connections open after {limit:?}"));
        }
    }
    Ok(conns)
}

fn pipeline(args: &Args, addr: SocketAddr, pattern: &Pattern) -> Res<Vec<String>> {
    let n: usize = args.num("conns", 100).max(1);
    let depth: u64 = args.num("depth", 16).max(1);
    let size: u64 = args.num("size", 128).clamp(1, PATTERN_MAX_SLICE as u64);
    let limit = args.seconds("seconds", 3.0);
    let max_ops: u64 = args.num("max-ops", 500_000_000);
    let concurrency = args.num("connect-concurrency", 32usize).max(1);
    let mut poll = Poll::new().map_err(io_err("epoll_create"))?;
    let mut conns = establish(&mut poll, addr, n, concurrency, pattern, Duration::from_secs(60))?;
    let mut scratch = vec![0u8; 64 * 1024];
    let mut events = Events::with_capacity(1024);
    let mut issued: u64 = 0;
    let mut stopping = false;

    // Keeps `depth` messages beyond the last fully echoed one in flight.
    let refill = |c: &mut Conn, issued: &mut u64, stopping: bool| {
        if stopping {
            return;
        }
        let done = (c.recvd - PROBE) / size;
        let want = PROBE + (done + depth) * size;
        if want > c.target {
            *issued += (want - c.target) / size;
            c.target = want;
        }
    };

    mark("start");
    let start = Instant::now();
    let deadline = start + limit;
    for c in conns.iter_mut() {
        refill(c, &mut issued, false);
        c.write(pattern)?;
    }
    let end = loop {
        poll_once(&mut poll, &mut events, Duration::from_millis(50))?;
        let now = Instant::now();
        if !stopping && (now >= deadline || issued >= max_ops) {
            stopping = true;
        }
        for ev in events.iter() {
            let c = &mut conns[ev.token().0];
            c.read(pattern, &mut scratch)?;
            refill(c, &mut issued, stopping);
            c.write(pattern)?;
        }
        if stopping {
            if conns.iter().all(|c| c.recvd == c.target) {
                break Instant::now();
            }
            if now > deadline + DRAIN_LIMIT {
                return Err("echoes still missing after the drain limit".into());
            }
        }
    };
    mark("end");
    let secs = (end - start).as_secs_f64();
    let ops: u64 = conns.iter().map(|c| (c.recvd - PROBE) / size).sum();
    Ok(vec![
        field("conns", n),
        field("depth", depth),
        field("size", size),
        field("ops", ops),
        field("seconds", format!("{secs:.4}")),
        field("rate", format!("{:.1}", ops as f64 / secs)),
    ])
}

fn bulk(args: &Args, addr: SocketAddr, pattern: &Pattern) -> Res<Vec<String>> {
    let bytes: u64 = args.num("bytes", 1u64 << 30).max(1);
    let limit = args.seconds("seconds", 120.0);
    let mut poll = Poll::new().map_err(io_err("epoll_create"))?;
    let mut conns = establish(&mut poll, addr, 1, 1, pattern, Duration::from_secs(30))?;
    let c = &mut conns[0];
    let mut scratch = vec![0u8; PATTERN_MAX_SLICE];
    let mut events = Events::with_capacity(16);
    mark("start");
    let start = Instant::now();
    let deadline = start + limit;
    c.target = PROBE + bytes;
    c.write(pattern)?;
    while c.recvd < c.target {
        poll_once(&mut poll, &mut events, Duration::from_millis(50))?;
        c.read(pattern, &mut scratch)?;
        c.write(pattern)?;
        if Instant::now() > deadline {
            return Err(format!("only {} of {bytes} bytes echoed within {limit:?}", c.recvd - PROBE));
        }
    }
    let secs = start.elapsed().as_secs_f64();
    mark("end");
    Ok(vec![
        field("bytes", bytes),
        field("ops", bytes >> 20), // one operation = one MiB echoed
        field("op", "MiB"),
        field("seconds", format!("{secs:.4}")),
        field("rate", format!("{:.1}", (bytes >> 20) as f64 / secs)),
        field("gbps", format!("{:.3}", bytes as f64 / secs / 1e9)),
    ])
}

// ---------------------------------------------------------------------------------------------
// Short connections.

struct Worker {
    conn: Option<Conn>,
    generation: usize,
    retry: bool,
}

const WORKER_BITS: u32 = 16;

/// How short connections are made: how many at once, the round trip's size, how the client closes.
struct ShortOpts {
    workers: usize,
    size: u64,
    /// Close with SO_LINGER 0 (RST) rather than a normal close (FIN).
    rst: bool,
}

impl ShortOpts {
    fn parse(args: &Args) -> Res<ShortOpts> {
        let rst = match args.get("close").unwrap_or("rst") {
            "rst" => true,
            "fin" => false,
            other => return Err(format!("--close takes rst or fin, not {other}")),
        };
        Ok(ShortOpts {
            workers: args.num("workers", 32usize).clamp(1, 1 << WORKER_BITS),
            size: args.num("size", 64).clamp(1, PATTERN_MAX_SLICE as u64),
            rst,
        })
    }
}

/// What one bounded run of short connections did.
struct ShortRun {
    ops: u64,
    secs: f64,
    errors: u64,
    port_busy: u64,
}

/// Runs short connections (connect, one round trip, close), `opts.workers` at a time, until
/// `count` have been started or `limit` has passed, then waits for those in flight. `next_id`
/// numbers the connections across runs so each carries its own bytes. With `marks`, prints the
/// first name just before the first connect and the second once the last connection is closed.
fn short_connections(
    addr: SocketAddr,
    pattern: &Pattern,
    opts: &ShortOpts,
    count: u64,
    limit: Duration,
    next_id: &mut u64,
    marks: Option<(&str, &str)>,
) -> Res<ShortRun> {
    let size = opts.size;
    let mut poll = Poll::new().map_err(io_err("epoll_create"))?;
    let mut events = Events::with_capacity(1024);
    let mut scratch = vec![0u8; 4096];
    let mut workers: Vec<Worker> =
        (0..opts.workers).map(|_| Worker { conn: None, generation: 0, retry: true }).collect();
    let (mut started, mut ops, mut port_busy, mut errors) = (0u64, 0u64, 0u64, 0u64);
    let mut stopping = false;

    if let Some((m, _)) = marks {
        mark(m);
    }
    let start = Instant::now();
    let deadline = start + limit;
    let end = loop {
        let now = Instant::now();
        if !stopping && (now >= deadline || started >= count) {
            stopping = true;
        }
        // (Re)start idle workers.
        let mut any_retry = false;
        for (w, worker) in workers.iter_mut().enumerate() {
            if !worker.retry {
                continue;
            }
            worker.retry = false;
            if stopping || started >= count {
                continue;
            }
            match TcpStream::connect(addr) {
                Ok(mut s) => {
                    worker.generation += 1;
                    let token = Token(worker.generation << WORKER_BITS | w);
                    poll.registry()
                        .register(&mut s, token, Interest::READABLE | Interest::WRITABLE)
                        .map_err(io_err("epoll_ctl"))?;
                    let base = Pattern::base(*next_id);
                    *next_id += 1;
                    started += 1;
                    worker.conn = Some(Conn { s, base, sent: 0, recvd: 0, target: size, connected: false });
                }
                Err(e) if e.kind() == ErrorKind::AddrNotAvailable => {
                    // Out of ephemeral ports (TIME_WAIT): try again shortly.
                    port_busy += 1;
                    worker.retry = true;
                    any_retry = true;
                }
                Err(e) => return Err(format!("connect: {e}")),
            }
        }
        if (stopping || started >= count) && workers.iter().all(|w| w.conn.is_none()) {
            break Instant::now();
        }
        if now > deadline + DRAIN_LIMIT {
            return Err("short connections still open after the drain limit".into());
        }
        let timeout = if any_retry { Duration::from_millis(1) } else { Duration::from_millis(50) };
        poll_once(&mut poll, &mut events, timeout)?;
        for ev in events.iter() {
            let w = ev.token().0 & ((1 << WORKER_BITS) - 1);
            let worker = &mut workers[w];
            if ev.token().0 >> WORKER_BITS != worker.generation {
                continue; // an event of the previous connection of this worker
            }
            let Some(c) = worker.conn.as_mut() else { continue };
            let step = (|| -> Res<bool> {
                if !c.connected && !c.check_connected()? {
                    return Ok(false);
                }
                c.write(pattern)?;
                c.read(pattern, &mut scratch)?;
                Ok(c.recvd == size)
            })();
            match step {
                Ok(false) => {}
                Ok(true) => {
                    ops += 1;
                    if opts.rst {
                        rustix::net::sockopt::set_socket_linger(&c.s, Some(Duration::ZERO))
                            .map_err(|e| format!("SO_LINGER: {e}"))?;
                    }
                    worker.conn = None; // close
                    worker.retry = true;
                }
                Err(e) if e.starts_with("echo") => return Err(e),
                Err(_) => {
                    // refused or reset: counted, and the worker starts over
                    errors += 1;
                    worker.conn = None;
                    worker.retry = true;
                }
            }
        }
    };
    if let Some((_, m)) = marks {
        mark(m);
    }
    Ok(ShortRun { ops, secs: (end - start).as_secs_f64(), errors, port_busy })
}

fn accept(args: &Args, addr: SocketAddr, pattern: &Pattern) -> Res<Vec<String>> {
    let opts = ShortOpts::parse(args)?;
    let limit = args.seconds("seconds", 3.0);
    let max_ops: u64 = args.num("max-ops", 10_000_000);
    let mut next_id = 0;
    let run = short_connections(addr, pattern, &opts, max_ops, limit, &mut next_id, Some(("start", "end")))?;
    Ok(vec![
        field("workers", opts.workers),
        field("close", if opts.rst { "rst" } else { "fin" }),
        field("ops", run.ops),
        field("seconds", format!("{:.4}", run.secs)),
        field("rate", format!("{:.1}", run.ops as f64 / run.secs)),
        field("errors", run.errors),
        field("port_busy", run.port_busy),
    ])
}

/// Short connections in three phases: 0 with no other connection open, 1 with `--idle` (10000)
/// idle connections open, 2 after those were reset (and, with `--wait-stdin`, a line on stdin
/// was read, else `--hold` seconds, 1, passed, so the server has let them go). Each phase is a
/// warm-up run and `--rounds` (5) measured runs of `--count` (5000) connections, each also ended
/// by `--seconds` (3). Measured run R of phase P lies between the marks `start.P.R` and
/// `end.P.R`, and the result gives `ops.P.R` and `secs.P.R`.
fn short_idle(args: &Args, addr: SocketAddr, pattern: &Pattern) -> Res<Vec<String>> {
    let opts = ShortOpts::parse(args)?;
    let idle_n: usize = args.num("idle", 10_000);
    let count: u64 = args.num("count", 5_000u64).max(1);
    let rounds: usize = args.num("rounds", 5usize).clamp(1, 100);
    let limit = args.seconds("seconds", 3.0);
    let hold = args.seconds("hold", 1.0);
    let concurrency = args.num("connect-concurrency", 32usize).max(1);
    let mut fields = vec![
        field("idle", idle_n),
        field("workers", opts.workers),
        field("close", if opts.rst { "rst" } else { "fin" }),
        field("count", count),
        field("rounds", rounds),
    ];
    let mut next_id = 1 << 32; // apart from the idle connections' ids
    let (mut ops, mut secs, mut errors, mut port_busy) = (0u64, 0.0f64, 0u64, 0u64);
    let mut idle_poll = Poll::new().map_err(io_err("epoll_create"))?;
    let mut idle_conns: Vec<Conn> = Vec::new();
    for phase in 0..3 {
        if phase == 1 {
            mark("idle-start");
            let t = Instant::now();
            idle_conns =
                establish(&mut idle_poll, addr, idle_n, concurrency, pattern, Duration::from_secs(120))?;
            fields.push(field("establish_seconds", format!("{:.3}", t.elapsed().as_secs_f64())));
            mark("idle-open");
        } else if phase == 2 {
            check_idle(&mut idle_poll, &mut idle_conns)?;
            // A reset, not a FIN, so these ports are not left in TIME_WAIT.
            for c in &idle_conns {
                rustix::net::sockopt::set_socket_linger(&c.s, Some(Duration::ZERO))
                    .map_err(|e| format!("SO_LINGER: {e}"))?;
            }
            idle_conns.clear();
            mark("idle-closed");
            if args.flag("wait-stdin") {
                let mut line = String::new();
                io::stdin().lock().read_line(&mut line).map_err(io_err("stdin"))?;
            } else {
                std::thread::sleep(hold);
            }
        }
        short_connections(addr, pattern, &opts, count.min(500), limit, &mut next_id, None)?; // warm-up
        for r in 0..rounds {
            let (from, to) = (format!("start.{phase}.{r}"), format!("end.{phase}.{r}"));
            let run =
                short_connections(addr, pattern, &opts, count, limit, &mut next_id, Some((&from, &to)))?;
            fields.push(field(&format!("ops.{phase}.{r}"), run.ops));
            fields.push(field(&format!("secs.{phase}.{r}"), format!("{:.4}", run.secs)));
            ops += run.ops;
            secs += run.secs;
            errors += run.errors;
            port_busy += run.port_busy;
        }
    }
    fields.extend([
        field("ops", ops),
        field("seconds", format!("{secs:.4}")),
        field("rate", format!("{:.1}", ops as f64 / secs)),
        field("errors", errors),
        field("port_busy", port_busy),
    ]);
    Ok(fields)
}

/// Fails unless every connection in `conns` is still open and has received nothing.
fn check_idle(poll: &mut Poll, conns: &mut [Conn]) -> Res<()> {
    let mut events = Events::with_capacity(1024);
    let mut scratch = [0u8; 64];
    poll_once(poll, &mut events, Duration::ZERO)?;
    let mut closed = 0;
    for ev in events.iter() {
        let c = &mut conns[ev.token().0];
        match c.s.read(&mut scratch) {
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            _ => closed += 1,
        }
    }
    if closed > 0 {
        return Err(format!("{closed} of {} idle connections were closed or got data", conns.len()));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Idle connections.

fn idle(args: &Args, addr: SocketAddr, pattern: &Pattern) -> Res<Vec<String>> {
    let n: usize = args.num("conns", 10_000).max(1);
    let limit = args.seconds("seconds", 3.0);
    let max_ops: u64 = args.num("max-ops", 50_000_000);
    let concurrency = args.num("connect-concurrency", 32usize).max(1);
    let hold = args.seconds("hold", 0.0);
    let mut poll = Poll::new().map_err(io_err("epoll_create"))?;
    mark("start");
    let t = Instant::now();
    let mut conns = establish(&mut poll, addr, n, concurrency, pattern, Duration::from_secs(120))?;
    let establish_secs = t.elapsed().as_secs_f64();
    mark("ready");
    if args.flag("wait-stdin") {
        let mut line = String::new();
        io::stdin().lock().read_line(&mut line).map_err(io_err("stdin"))?;
    } else {
        std::thread::sleep(hold);
    }
    let mut s = connect_blocking(addr)?;
    let mut offset = Pattern::base(0);
    pingpong_loop(&mut s, pattern, &mut offset, 64, Duration::from_secs(1), 100, None)?; // warm-up
    let result = pingpong_loop(&mut s, pattern, &mut offset, 64, limit, max_ops, Some("pingpong"))?;
    mark("end");

    // The idle connections must all still be open: none may have been closed or sent data.
    check_idle(&mut poll, &mut conns)?;
    let mut fields = vec![field("conns", n), field("establish_seconds", format!("{establish_secs:.3}"))];
    fields.extend(result.fields());
    Ok(fields)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    /// An echo server on a thread: each connection, one at a time, is echoed until the peer
    /// closes or resets it. Stops when `stop` is set, and after 60 s in any case.
    fn echo_server() -> (SocketAddr, Arc<AtomicBool>, std::thread::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let handle = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut buf = [0u8; 4096];
            while !stop2.load(Ordering::Relaxed) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        s.set_nonblocking(false).expect("blocking");
                        s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
                        while let Ok(n) = s.read(&mut buf) {
                            if n == 0 || s.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(1)),
                }
            }
        });
        (addr, stop, handle)
    }

    fn opts() -> ShortOpts {
        ShortOpts { workers: 4, size: 64, rst: true }
    }

    #[test]
    fn short_connections_stop_at_the_count() {
        let (addr, stop, handle) = echo_server();
        let mut next_id = 0;
        let run = short_connections(
            addr,
            &Pattern::new(),
            &opts(),
            37,
            Duration::from_secs(30),
            &mut next_id,
            None,
        )
        .expect("run");
        stop.store(true, Ordering::Relaxed);
        handle.join().expect("server thread");
        assert_eq!(run.ops, 37);
        assert_eq!(next_id, 37, "exactly the counted connections were started");
        assert_eq!(run.errors, 0);
    }

    #[test]
    fn short_connections_stop_at_the_time_limit() {
        let (addr, stop, handle) = echo_server();
        let mut next_id = 0;
        let t = Instant::now();
        let run = short_connections(
            addr,
            &Pattern::new(),
            &opts(),
            u64::MAX,
            Duration::from_millis(200),
            &mut next_id,
            None,
        )
        .expect("run");
        let took = t.elapsed();
        stop.store(true, Ordering::Relaxed);
        handle.join().expect("server thread");
        assert!(run.ops > 0, "some connections completed");
        assert!(took < Duration::from_secs(15), "the run ended by its time limit, took {took:?}");
    }
}
