//! Single-threaded UDP load generator for echo servers. Every echoed datagram is checked byte
//! for byte.
//!
//! ```text
//! udp_loadgen --addr HOST:PORT [options]
//!   --flows F          UDP sockets, each connected to the server (1)
//!   --depth K          datagrams in flight per flow (16)
//!   --size S           bytes per datagram, at least 16 (64)
//!   --seconds T        how long datagrams are issued (3)
//!   --max-ops N        at most N datagrams are issued (bounds the run by count too)
//!   --loss-timeout MS  a datagram not echoed within this many ms counts as lost and is
//!                      replaced by a new one, so a lost datagram never stalls a flow (200)
//! ```
//!
//! Each datagram starts with a 16-byte header (flow id, sequence number, size) followed by a
//! slice of the shared [`Pattern`] chosen by flow and sequence number, so a datagram echoed to
//! the wrong flow, or with any byte changed, is caught. Sequence number `q` of a flow lives in
//! window slot `q % K`, so finding the datagram an echo answers is one comparison.
//!
//! Output on stdout, as `loadgen`'s: `MARK start` and `MARK end` around the measured phase (a
//! runner samples the server's CPU time there), then `RESULT key=value ...` with `ops` (echoes
//! received in the measured phase), `sent`, `lost` (timed out, late ones included), `late`
//! (echoes of datagrams no longer in flight: after their timeout, or a second time), `loss`
//! (lost ÷ sent), `seconds` (from the start to the last echo, so the final wait for lost
//! datagrams to time out is not counted) and `rate` (ops per second). Before `MARK start` each
//! flow makes one round trip, which proves the server echoes to it. New datagrams go out with
//! one `sendmmsg` per flow, so the load generator spends less per datagram than a server that
//! sends one at a time. On any failure, including a datagram that came back wrong, it prints
//! `ERROR message`
//! and exits with status 2.

use std::io::{self, ErrorKind, IoSlice, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use braid_bench::{Args, Pattern, PATTERN_MAX_SLICE};
use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token};
use rustix::net::{sendmmsg, MMsgHdr, SendAncillaryBuffer, SendFlags};

type Res<T> = Result<T, String>;

const HEADER: usize = 16;
/// How often the in-flight datagrams are checked for timeouts.
const SCAN_EVERY: Duration = Duration::from_millis(10);
/// Bounds the round trip each flow makes before the measured phase.
const WARMUP_LIMIT: Duration = Duration::from_secs(10);
/// The largest datagram an echo can bring back here; anything longer is a wrong echo anyway.
const RECV_BUF: usize = 65_536;

fn main() {
    let args = Args::parse(&[]);
    let addr: SocketAddr = match args.get("addr").map(str::parse) {
        Some(Ok(a)) => a,
        _ => braid_bench::die("--addr HOST:PORT is required"),
    };
    braid_bench::raise_nofile_limit();
    match run(&args, addr) {
        Ok(fields) => println!("RESULT scenario=udp {}", fields.join(" ")),
        Err(e) => {
            println!("ERROR {e}");
            eprintln!("udp_loadgen: {e}");
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

/// One window slot: the datagram in it, if any, and when it was sent.
#[derive(Clone, Copy)]
enum Slot {
    Free,
    InFlight { seq: u64, sent_at: Instant },
}

/// What the measured phase counted.
#[derive(Default)]
struct Counts {
    sent: u64,
    echoed: u64,
    lost: u64,
    late: u64,
    /// When the last echo came in.
    last_echo: Option<Instant>,
}

struct Flow {
    id: u32,
    sock: UdpSocket,
    slots: Vec<Slot>,
    /// The next sequence number each slot sends (`slot + K × n`).
    next_seq: Vec<u64>,
    in_flight: usize,
    /// The oldest sequence number that still counts: echoes below it belong to the warm-up.
    first_counted: u64,
}

/// Builds and checks datagrams.
struct Codec<'a> {
    pattern: &'a Pattern,
    size: usize,
}

impl Codec<'_> {
    fn payload_offset(flow: u32, seq: u64) -> u64 {
        Pattern::base(u64::from(flow)).wrapping_add(seq.wrapping_mul(131))
    }

    fn encode(&self, flow: u32, seq: u64, out: &mut [u8]) {
        out[0..4].copy_from_slice(&flow.to_le_bytes());
        out[4..12].copy_from_slice(&seq.to_le_bytes());
        out[12..16].copy_from_slice(&(self.size as u32).to_le_bytes());
        out[HEADER..self.size]
            .copy_from_slice(self.pattern.at(Self::payload_offset(flow, seq), self.size - HEADER));
    }

    /// The sequence number an echo on `flow` carries, once every byte is checked.
    fn decode(&self, flow: u32, got: &[u8]) -> Res<u64> {
        if got.len() != self.size {
            return Err(format!("flow {flow}: echo of {} bytes, sent {}", got.len(), self.size));
        }
        let word = |r: std::ops::Range<usize>| got[r].iter().rev().fold(0u64, |a, &b| a << 8 | u64::from(b));
        let (id, seq, size) = (word(0..4), word(4..12), word(12..16));
        if id != u64::from(flow) || size != self.size as u64 {
            return Err(format!("flow {flow}: echo carries flow {id} and size {size}"));
        }
        if got[HEADER..] != *self.pattern.at(Self::payload_offset(flow, seq), self.size - HEADER) {
            return Err(format!("flow {flow}: payload of datagram {seq} came back changed"));
        }
        Ok(seq)
    }
}

impl Flow {
    /// Fills every free slot, sending the new datagrams with one `sendmmsg` per `buf`-full;
    /// counts what it sent.
    fn refill(&mut self, codec: &Codec, buf: &mut [u8], now: Instant, counts: &mut Counts) -> Res<()> {
        let per_call = (buf.len() / codec.size).max(1);
        let free: Vec<usize> =
            (0..self.slots.len()).filter(|&i| matches!(self.slots[i], Slot::Free)).collect();
        for batch in free.chunks(per_call) {
            for (k, &slot) in batch.iter().enumerate() {
                codec.encode(self.id, self.next_seq[slot], &mut buf[k * codec.size..(k + 1) * codec.size]);
            }
            let iovs: Vec<[IoSlice; 1]> =
                buf.chunks(codec.size).take(batch.len()).map(|c| [IoSlice::new(c)]).collect();
            let mut controls: Vec<SendAncillaryBuffer> = iovs.iter().map(|_| Default::default()).collect();
            let mut msgs: Vec<MMsgHdr> = iovs
                .iter()
                .zip(controls.iter_mut())
                .map(|(iov, control)| MMsgHdr::new(iov, control))
                .collect();
            let sent = match sendmmsg(&self.sock, &mut msgs, SendFlags::empty()) {
                Ok(n) => n,
                // Full for now: the next echo or timeout scan fills the slots.
                Err(e) if e == rustix::io::Errno::AGAIN || e == rustix::io::Errno::INTR => 0,
                Err(e) => return Err(format!("flow {}: sendmmsg: {e}", self.id)),
            };
            for &slot in &batch[..sent] {
                let seq = self.next_seq[slot];
                self.next_seq[slot] = seq + self.slots.len() as u64;
                self.slots[slot] = Slot::InFlight { seq, sent_at: now };
            }
            self.in_flight += sent;
            counts.sent += sent as u64;
            if sent < batch.len() {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Reads and checks every datagram queued on the socket (edge-triggered).
    fn drain(&mut self, codec: &Codec, buf: &mut [u8], now: Instant, counts: &mut Counts) -> Res<()> {
        loop {
            let n = match self.sock.recv(buf) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("flow {}: recv: {e}", self.id)),
            };
            let seq = codec.decode(self.id, &buf[..n])?;
            counts.last_echo = Some(now);
            let slot = (seq % self.slots.len() as u64) as usize;
            match self.slots[slot] {
                Slot::InFlight { seq: s, .. } if s == seq => {
                    self.slots[slot] = Slot::Free;
                    self.in_flight -= 1;
                    counts.echoed += 1;
                }
                _ if seq >= self.next_seq[slot] => {
                    return Err(format!("flow {}: echo of datagram {seq}, never sent", self.id));
                }
                // Echoed after its timeout (already counted lost and replaced), or twice.
                _ if seq >= self.first_counted => counts.late += 1,
                _ => {}
            }
        }
    }

    /// Frees the slots whose datagram is older than `timeout`, counting each as lost.
    fn expire(&mut self, now: Instant, timeout: Duration, counts: &mut Counts) {
        for slot in self.slots.iter_mut() {
            if let Slot::InFlight { sent_at, .. } = *slot {
                if now.duration_since(sent_at) >= timeout {
                    *slot = Slot::Free;
                    self.in_flight -= 1;
                    counts.lost += 1;
                }
            }
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

fn run(args: &Args, addr: SocketAddr) -> Res<Vec<String>> {
    let flows_n: usize = args.num("flows", 1usize).clamp(1, 60_000);
    let depth: usize = args.num("depth", 16usize).clamp(1, 65_536);
    let size: usize = args.num("size", 64usize);
    if !(HEADER..=PATTERN_MAX_SLICE.min(RECV_BUF)).contains(&size) {
        return Err(format!("--size must be {HEADER}..={}", PATTERN_MAX_SLICE.min(RECV_BUF)));
    }
    let limit = args.seconds("seconds", 3.0);
    let max_ops: u64 = args.num("max-ops", 1_000_000_000);
    let loss_timeout = Duration::from_millis(args.num("loss-timeout", 200u64).max(1));
    let pattern = Pattern::new();
    let codec = Codec { pattern: &pattern, size };
    let mut poll = Poll::new().map_err(io_err("epoll_create"))?;
    let local: SocketAddr = if addr.is_ipv4() { "127.0.0.1:0" } else { "[::1]:0" }.parse().expect("address");
    let mut flows = Vec::with_capacity(flows_n);
    for id in 0..flows_n {
        let mut sock = UdpSocket::bind(local).map_err(io_err("bind"))?;
        sock.connect(addr).map_err(io_err("connect"))?;
        poll.registry().register(&mut sock, Token(id), Interest::READABLE).map_err(io_err("epoll_ctl"))?;
        flows.push(Flow {
            id: id as u32,
            sock,
            slots: vec![Slot::Free; depth],
            next_seq: (0..depth as u64).collect(),
            in_flight: 0,
            first_counted: 0,
        });
    }
    let mut buf = vec![0u8; RECV_BUF];
    let mut events = Events::with_capacity(1024);

    // Warm-up: one datagram per flow until each has had one echo (lost ones are resent).
    let mut warm = Counts::default();
    let warm_deadline = Instant::now() + WARMUP_LIMIT;
    let mut next_scan = Instant::now() + SCAN_EVERY;
    for f in flows.iter_mut() {
        f.slots.truncate(1);
        f.refill(&codec, &mut buf, Instant::now(), &mut warm)?;
    }
    while warm.echoed < flows_n as u64 {
        poll_once(&mut poll, &mut events, SCAN_EVERY)?;
        let now = Instant::now();
        for ev in events.iter() {
            flows[ev.token().0].drain(&codec, &mut buf, now, &mut warm)?;
        }
        if now >= next_scan {
            next_scan = now + SCAN_EVERY;
            for f in flows.iter_mut().filter(|f| f.in_flight > 0) {
                f.expire(now, loss_timeout, &mut warm);
                f.refill(&codec, &mut buf, now, &mut warm)?;
            }
        }
        if now >= warm_deadline {
            return Err(format!(
                "only {} of {flows_n} flows had an echo within {WARMUP_LIMIT:?}",
                warm.echoed
            ));
        }
    }
    // Warm-up sent only from slot 0 (whose sequence numbers step by 1 there); start the
    // measured window afresh above everything sent so far.
    for f in flows.iter_mut() {
        let base = f.next_seq[0] * depth as u64;
        f.slots = vec![Slot::Free; depth];
        f.next_seq = (base..base + depth as u64).collect();
        f.first_counted = base;
    }

    let mut c = Counts::default();
    mark("start");
    let start = Instant::now();
    let deadline = start + limit;
    let mut stopping = false;
    for f in flows.iter_mut() {
        f.refill(&codec, &mut buf, start, &mut c)?;
    }
    let end = loop {
        poll_once(&mut poll, &mut events, SCAN_EVERY)?;
        let now = Instant::now();
        if !stopping && (now >= deadline || c.sent >= max_ops) {
            stopping = true;
        }
        for ev in events.iter() {
            let f = &mut flows[ev.token().0];
            f.drain(&codec, &mut buf, now, &mut c)?;
            if !stopping {
                f.refill(&codec, &mut buf, now, &mut c)?;
            }
        }
        if now >= next_scan {
            next_scan = now + SCAN_EVERY;
            for f in flows.iter_mut() {
                f.expire(now, loss_timeout, &mut c);
                if !stopping {
                    f.refill(&codec, &mut buf, now, &mut c)?;
                }
            }
        }
        // Every datagram is echoed or timed out within the loss timeout, so this ends. The
        // phase ends at the last echo: the wait for the lost ones to time out is idle time.
        if stopping && flows.iter().all(|f| f.in_flight == 0) {
            break c.last_echo.unwrap_or(now);
        }
        if now > deadline + loss_timeout + Duration::from_secs(5) {
            return Err("datagrams still in flight after the loss timeout".into());
        }
    };
    mark("end");
    let secs = (end - start).as_secs_f64();
    let ops = c.echoed + c.late;
    Ok(vec![
        field("flows", flows_n),
        field("depth", depth),
        field("size", size),
        field("ops", ops),
        field("sent", c.sent),
        field("echoed", c.echoed),
        field("lost", c.lost),
        field("late", c.late),
        field("loss", format!("{:.6}", c.lost as f64 / c.sent.max(1) as f64)),
        field("seconds", format!("{secs:.4}")),
        field("rate", format!("{:.1}", ops as f64 / secs)),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codec_round_trips_and_catches_any_changed_byte() {
        let pattern = Pattern::new();
        let codec = Codec { pattern: &pattern, size: 64 };
        let mut d = [0u8; 64];
        codec.encode(3, 1234, &mut d);
        assert_eq!(codec.decode(3, &d), Ok(1234));
        for i in 0..d.len() {
            let mut bad = d;
            bad[i] ^= 0x40;
            assert!(codec.decode(3, &bad).is_err(), "byte {i} changed but accepted");
        }
        assert!(codec.decode(4, &d).is_err(), "another flow's datagram accepted");
        assert!(codec.decode(3, &d[..63]).is_err(), "a short echo accepted");
        let mut other = [0u8; 64];
        codec.encode(3, 1235, &mut other);
        assert_ne!(d[HEADER..], other[HEADER..], "consecutive datagrams carry the same payload");
    }
}
