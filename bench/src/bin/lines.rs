//! Line parsing benchmark, in memory: braid's `LineReceiver` and
//! `LineOnlyReceiver` (as protocols fed by a `StringTransport`, the way a
//! connection feeds them) and the bare `LineDecoder`, side by side with a
//! tokio-util `LinesCodec` decode loop on the same input, in the same run.
//!
//! The input is `\r\n`-terminated ASCII lines of 32 B or 1 KiB (delimiter
//! included), handed over in 64 KiB chunks as a socket read would. Each
//! handler counts lines and looks at their length; `LinesCodec` yields an
//! owned `String` per line (UTF-8 checked, `\r` stripped), which is how it
//! is used. Every figure is the median of several rounds, the contenders
//! alternating within a round; each measurement runs for a fixed time, so
//! the whole run is bounded (about 2 × 4 × rounds × `--ms` milliseconds).
//!
//! ```text
//! cargo run --release -p braid-bench --bin lines [-- --rounds N --ms MS]
//! ```

use std::cell::Cell;
use std::hint::black_box;
use std::rc::Rc;
use std::time::{Duration, Instant};

use braid::protocols::line::{LineContext, LineDecoder, LineEvent, LineHandler, LineReceiver};
use braid::protocols::line_only::{LineOnlyContext, LineOnlyHandler, LineOnlyReceiver};
use braid::testing::StringTransport;
use braid::{Failure, Protocol};
use tokio_util::bytes::BytesMut;
use tokio_util::codec::{Decoder, LinesCodec};

const CHUNK: usize = 64 * 1024;
/// Bytes of input per pass over it: large enough to leave the caches.
const INPUT: usize = 16 * 1024 * 1024;

/// Counts lines (and their bytes, so the work cannot be optimised away).
struct Count(Rc<Cell<u64>>);

impl LineHandler for Count {
    fn line_received(&mut self, _: &mut LineContext<'_>, line: &[u8]) -> Result<(), Failure> {
        self.0.set(self.0.get() + 1 + black_box(line.len()) as u64 % 2);
        Ok(())
    }
}

impl LineOnlyHandler for Count {
    fn line_received(&mut self, _: &mut LineOnlyContext<'_>, line: &[u8]) -> Result<(), Failure> {
        self.0.set(self.0.get() + 1 + black_box(line.len()) as u64 % 2);
        Ok(())
    }
}

/// About `INPUT` bytes of lines of `size` bytes each, `\r\n` included.
fn input(size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(INPUT + size);
    let mut i = 0u64;
    while out.len() < INPUT {
        let start = out.len();
        let tag = format!("{i:08} ");
        out.extend_from_slice(tag.as_bytes());
        while out.len() < start + size - 2 {
            out.push(b'a' + (out.len() % 26) as u8);
        }
        out.extend_from_slice(b"\r\n");
        i += 1;
    }
    out
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Contender {
    LineReceiver,
    LineOnlyReceiver,
    LineDecoder,
    LinesCodec,
}

impl Contender {
    const ALL: [Contender; 4] =
        [Contender::LineReceiver, Contender::LineOnlyReceiver, Contender::LineDecoder, Contender::LinesCodec];

    fn name(self) -> &'static str {
        match self {
            Contender::LineReceiver => "braid LineReceiver",
            Contender::LineOnlyReceiver => "braid LineOnlyReceiver",
            Contender::LineDecoder => "braid LineDecoder (no protocol)",
            Contender::LinesCodec => "tokio-util LinesCodec",
        }
    }

    /// Parses `data` once; returns the number of lines seen.
    fn pass(self, data: &[u8], size: usize) -> u64 {
        let seen = Rc::new(Cell::new(0u64));
        match self {
            Contender::LineReceiver => {
                let mut p = LineReceiver::with_options(
                    Count(seen.clone()),
                    braid::protocols::delimiter::Delimiter::crlf(),
                    size,
                );
                feed(&mut p, data);
            }
            Contender::LineOnlyReceiver => {
                let mut p = LineOnlyReceiver::with_options(
                    Count(seen.clone()),
                    braid::protocols::delimiter::Delimiter::crlf(),
                    size,
                );
                feed(&mut p, data);
            }
            Contender::LineDecoder => {
                let mut d = LineDecoder::new(braid::protocols::delimiter::Delimiter::crlf(), size);
                let mut n = 0u64;
                for chunk in data.chunks(CHUNK) {
                    d.push(chunk);
                    while let Some(event) = d.next_event() {
                        if let LineEvent::Line(l) = event {
                            n += 1 + black_box(l.len()) as u64 % 2;
                        }
                    }
                }
                seen.set(n);
            }
            Contender::LinesCodec => {
                let mut codec = LinesCodec::new_with_max_length(size + 16);
                let mut buf = BytesMut::with_capacity(CHUNK);
                let mut n = 0u64;
                for chunk in data.chunks(CHUNK) {
                    buf.extend_from_slice(chunk);
                    while let Some(line) = codec.decode(&mut buf).expect("valid lines") {
                        n += 1 + black_box(line.len()) as u64 % 2;
                    }
                }
                seen.set(n);
            }
        }
        seen.get()
    }
}

fn feed<P: Protocol>(p: &mut P, data: &[u8]) {
    let tr = StringTransport::new();
    tr.connect(p);
    for chunk in data.chunks(CHUNK) {
        p.data_received(chunk);
    }
    assert!(!tr.disconnecting(), "valid input must not close the connection");
}

/// Lines per second over `budget`, passing over `data` as often as fits.
fn measure(c: Contender, data: &[u8], size: usize, lines_per_pass: u64, budget: Duration) -> f64 {
    let start = Instant::now();
    let mut lines = 0u64;
    loop {
        let seen = c.pass(data, size);
        assert!(seen >= lines_per_pass, "{}: saw {seen} of {lines_per_pass} lines", c.name());
        lines += lines_per_pass;
        let elapsed = start.elapsed();
        if elapsed >= budget {
            return lines as f64 / elapsed.as_secs_f64();
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let mut rounds = 5usize;
    let mut ms = 300u64;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |what: &str| -> u64 {
            args.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
                eprintln!("{a} needs a number ({what})");
                std::process::exit(2)
            })
        };
        match a.as_str() {
            "--rounds" => rounds = value("rounds").max(1) as usize,
            "--ms" => ms = value("milliseconds per measurement").max(1),
            other => {
                eprintln!("unknown argument {other:?}; usage: lines [--rounds N] [--ms MS]");
                std::process::exit(2)
            }
        }
    }
    let budget = Duration::from_millis(ms);
    println!("## Line parsing (in memory, 64 KiB chunks, median of {rounds} rounds of {ms} ms)\n");
    println!("| line size | parser | lines/s | MiB/s | ÷ LinesCodec |");
    println!("|---|---|---:|---:|---:|");
    for size in [32usize, 1024] {
        let data = input(size);
        let lines_per_pass = (data.len() / size) as u64;
        let mut results: Vec<Vec<f64>> = vec![Vec::new(); Contender::ALL.len()];
        for _ in 0..rounds {
            for (i, c) in Contender::ALL.iter().enumerate() {
                results[i].push(measure(*c, &data, size, lines_per_pass, budget));
            }
        }
        let medians: Vec<f64> = results.into_iter().map(median).collect();
        let codec = medians[Contender::ALL.iter().position(|c| *c == Contender::LinesCodec).unwrap()];
        for (c, m) in Contender::ALL.iter().zip(&medians) {
            let mib = m * size as f64 / (1024.0 * 1024.0);
            println!("| {size} B | {} | {:.2} M | {mib:.0} | {:.2}× |", c.name(), m / 1e6, m / codec);
        }
    }
}
