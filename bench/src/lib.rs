//! Benchmark peers and load generators for braid. Not part of the library.
//!
//! The binaries in `src/bin/`:
//! - `echo_tokio`, `echo_mio`: the peers braid is measured against;
//! - `loadgen`: the single-threaded load generator (pingpong, pipeline, bulk, accept, idle,
//!   short-idle);
//! - `bench-all`: runs every scenario against every server and writes BENCHMARKS.md.
//!
//! This file holds the few helpers they share: argument parsing, the descriptor limit and
//! the byte pattern the load generator sends and checks.

use std::time::Duration;

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and returns the new soft limit.
/// Children spawned afterwards inherit it.
pub fn raise_nofile_limit() -> Option<u64> {
    let lim = getrlimit(Resource::Nofile);
    if lim.current == lim.maximum {
        return lim.current;
    }
    let new = Rlimit { current: lim.maximum, maximum: lim.maximum };
    match setrlimit(Resource::Nofile, new) {
        Ok(()) => lim.maximum,
        Err(_) => lim.current,
    }
}

/// Minimal `--name value` argument list: flags without values are `--name` alone.
pub struct Args {
    positional: Vec<String>,
    named: Vec<(String, Option<String>)>,
}

impl Args {
    /// Parses the process arguments. `flags` names the options that take no value.
    pub fn parse(flags: &[&str]) -> Args {
        Args::from_iter(std::env::args().skip(1), flags)
    }

    /// Parses the given arguments. `flags` names the options that take no value.
    pub fn from_iter(args: impl IntoIterator<Item = String>, flags: &[&str]) -> Args {
        let mut positional = Vec::new();
        let mut named = Vec::new();
        let mut it = args.into_iter();
        while let Some(a) = it.next() {
            if let Some(name) = a.strip_prefix("--") {
                if let Some((k, v)) = name.split_once('=') {
                    named.push((k.to_string(), Some(v.to_string())));
                } else if flags.contains(&name) {
                    named.push((name.to_string(), None));
                } else {
                    let v = it.next().unwrap_or_else(|| die(&format!("--{name} needs a value")));
                    named.push((name.to_string(), Some(v)));
                }
            } else {
                positional.push(a);
            }
        }
        Args { positional, named }
    }

    /// The positional arguments, in order.
    pub fn positional(&self) -> &[String] {
        &self.positional
    }

    /// Whether the flag `--name` was given.
    pub fn flag(&self, name: &str) -> bool {
        self.named.iter().any(|(k, _)| k == name)
    }

    /// The value of `--name`, the last one if repeated.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.named.iter().rev().find(|(k, _)| k == name).and_then(|(_, v)| v.as_deref())
    }

    /// The value of `--name` parsed as `T`, or `default`; a bad value ends the process.
    pub fn num<T: std::str::FromStr>(&self, name: &str, default: T) -> T {
        match self.get(name) {
            None => default,
            Some(v) => v.parse().unwrap_or_else(|_| die(&format!("bad value for --{name}: {v}"))),
        }
    }

    /// `--name` in seconds (fractions allowed).
    pub fn seconds(&self, name: &str, default: f64) -> Duration {
        let s: f64 = self.num(name, default);
        if !(s.is_finite() && s >= 0.0) {
            die(&format!("bad value for --{name}: {s}"));
        }
        Duration::from_secs_f64(s)
    }
}

/// Prints `message` to stderr and exits with status 1.
pub fn die(message: &str) -> ! {
    eprintln!("{}: {message}", program_name());
    std::process::exit(1)
}

fn program_name() -> String {
    std::env::args()
        .next()
        .and_then(|p| p.rsplit('/').next().map(str::to_string))
        .unwrap_or_else(|| "bench".into())
}

/// The longest slice [`Pattern::at`] hands out.
pub const PATTERN_MAX_SLICE: usize = 256 * 1024;
const PATTERN_PERIOD: usize = 65_521; // prime, so streams of different offsets differ

/// A fixed pseudo-random byte stream of period [`PATTERN_PERIOD`]: byte `i` of a
/// connection's stream is `pattern[(base + i) % period]`. Sending and checking are a
/// slice copy and a `memcmp`, so the load generator spends its time on I/O.
pub struct Pattern {
    bytes: Vec<u8>,
}

impl Default for Pattern {
    fn default() -> Self {
        Pattern::new()
    }
}

impl Pattern {
    /// Builds the pattern (deterministic).
    pub fn new() -> Pattern {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut period = Vec::with_capacity(PATTERN_PERIOD);
        for _ in 0..PATTERN_PERIOD {
            // xorshift64*
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            period.push((x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8);
        }
        let mut bytes = Vec::with_capacity(PATTERN_PERIOD + PATTERN_MAX_SLICE);
        while bytes.len() < PATTERN_PERIOD + PATTERN_MAX_SLICE {
            let take = (PATTERN_PERIOD + PATTERN_MAX_SLICE - bytes.len()).min(PATTERN_PERIOD);
            bytes.extend_from_slice(&period[..take]);
        }
        Pattern { bytes }
    }

    /// The `len` bytes of the stream starting at `offset` (`len` ≤ [`PATTERN_MAX_SLICE`]).
    pub fn at(&self, offset: u64, len: usize) -> &[u8] {
        assert!(len <= PATTERN_MAX_SLICE);
        let start = (offset % PATTERN_PERIOD as u64) as usize;
        &self.bytes[start..start + len]
    }

    /// The stream base of connection `id`, so connections carry different bytes.
    pub fn base(id: u64) -> u64 {
        id.wrapping_mul(7_919) % PATTERN_PERIOD as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_periodic_and_slices_agree() {
        let p = Pattern::new();
        let a = p.at(10, 1000).to_vec();
        let b = p.at(10 + PATTERN_PERIOD as u64, 1000);
        assert_eq!(&a[..], b);
        assert_eq!(p.at(PATTERN_PERIOD as u64 - 5, 10)[5..], p.at(0, 5)[..]);
        assert_ne!(p.at(0, 64), p.at(Pattern::base(1), 64));
    }

    #[test]
    fn args_parse() {
        let a = Args::from_iter(
            ["pipeline", "--addr", "x:1", "--quick", "--seconds=2"].map(String::from),
            &["quick"],
        );
        assert_eq!(a.positional(), ["pipeline"]);
        assert_eq!(a.get("addr"), Some("x:1"));
        assert!(a.flag("quick"));
        assert_eq!(a.num("seconds", 0.0), 2.0);
        assert_eq!(a.num("conns", 7u32), 7);
    }
}
