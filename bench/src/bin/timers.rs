//! Timer benchmark: braid's reactor against tokio-util's `DelayQueue` on a
//! current_thread tokio runtime, side by side in one run.
//!
//! 1. schedule 1,000,000 timers with random delays in [0, 10 s);
//! 2. cancel half of them (every other one, in scheduling order), then the
//!    other half in random order;
//! 3. fire 100,000 timers due in one 10 ms window (50 ms from now): the span
//!    from the first fire to the last, how late the last one was, and the
//!    thread CPU time per timer for scheduling and firing them. The window is
//!    fixed before scheduling starts, and each timer is given the delay from
//!    the moment it is scheduled to its place in the window, so the time
//!    scheduling takes does not stretch the window.
//!
//! Every figure is the median of several rounds; braid and tokio alternate
//! within a round. Prints a markdown section; `--write` also puts it into
//! BENCHMARKS.md (replacing an earlier "## Timers" section).
//!
//! ```text
//! cargo run --release -p braid-bench --bin timers [-- --write] [--rounds N]
//! cargo run --release -p braid-bench --bin timers -- --only braid-fire   # one phase, for profiling
//! cargo run --release -p braid-bench --bin timers -- --only braid-schedule   # schedule + in-order cancel
//! ```

use std::cell::Cell;
use std::fmt::Write as _;
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;

const SCHEDULE: usize = 1_000_000;
const MAX_DELAY_NS: u64 = 10_000_000_000;
const FIRE: usize = 100_000;
const FIRE_AFTER: Duration = Duration::from_millis(50);
const FIRE_WINDOW_NS: u64 = 10_000_000;
const COMMAND: &str = "cargo run --release -p braid-bench --bin timers";

/// Results of the schedule/cancel phase, in ns per operation.
#[derive(Clone, Copy, Default)]
struct Churn {
    schedule: f64,
    cancel_in_order: f64,
    cancel_random: f64,
    /// Minor page faults taken while scheduling, per 1,000 timers.
    faults_per_k: f64,
}

/// This thread's minor page faults so far (field 10 of /proc/thread-self/stat).
fn minor_faults() -> u64 {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").expect("stat");
    let after_name = &stat[stat.rfind(')').expect("stat format") + 2..];
    after_name.split_whitespace().nth(7).and_then(|n| n.parse().ok()).expect("stat format")
}

/// Results of the firing phase.
#[derive(Clone, Copy, Default)]
struct Fire {
    /// First fire to last fire.
    span: Duration,
    /// How long after its deadline the last timer fired.
    last_late: Duration,
    /// Thread CPU time for scheduling and firing, per timer.
    cpu_per_timer_ns: f64,
}

/// CPU time this thread has used, from the scheduler's own accounting
/// (`/proc/thread-self/schedstat`, nanoseconds).
fn thread_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").expect("schedstat");
    let ns = stat.split_whitespace().next().and_then(|n| n.parse().ok()).expect("schedstat format");
    Duration::from_nanos(ns)
}

fn per_op(elapsed: Duration, ops: usize) -> f64 {
    elapsed.as_nanos() as f64 / ops as f64
}

/// The delays for the schedule phase and the cancel orders, shared by both
/// sides so they do the same work.
struct Workload {
    delays: Vec<Duration>,
    /// Indices of the other half, shuffled.
    random_half: Vec<usize>,
    fire_offsets: Vec<Duration>,
}

impl Workload {
    fn new(seed: u64) -> Workload {
        let mut rng = fastrand::Rng::with_seed(seed);
        let delays = (0..SCHEDULE).map(|_| Duration::from_nanos(rng.u64(0..MAX_DELAY_NS))).collect();
        let mut random_half: Vec<usize> = (1..SCHEDULE).step_by(2).collect();
        rng.shuffle(&mut random_half);
        let fire_offsets =
            (0..FIRE).map(|_| FIRE_AFTER + Duration::from_nanos(rng.u64(0..FIRE_WINDOW_NS))).collect();
        Workload { delays, random_half, fire_offsets }
    }
}

// ---------------------------------------------------------------- braid --

fn braid_churn(w: &Workload) -> Churn {
    braid_churn_with(w, true)
}

/// The churn phase; `random` false skips the random-order cancel (the
/// `braid-schedule` profiling phase: just the headline schedule+cancel).
fn braid_churn_with(w: &Workload, random: bool) -> Churn {
    let reactor = braid::Reactor::new(braid::Backend::Epoll).expect("reactor");
    let fired = Rc::new(Cell::new(0u64));
    let faults = minor_faults();
    let start = Instant::now();
    let calls: Vec<braid::reactor::DelayedCall> = w
        .delays
        .iter()
        .map(|&delay| {
            let fired = fired.clone();
            reactor.call_later(delay, move || fired.set(fired.get() + 1))
        })
        .collect();
    let schedule = per_op(start.elapsed(), SCHEDULE);
    let faults_per_k = (minor_faults() - faults) as f64 * 1000.0 / SCHEDULE as f64;

    let start = Instant::now();
    for call in calls.iter().step_by(2) {
        call.cancel().expect("cancel");
    }
    let cancel_in_order = per_op(start.elapsed(), SCHEDULE / 2);

    let start = Instant::now();
    if random {
        for &i in &w.random_half {
            calls[i].cancel().expect("cancel");
        }
    }
    let cancel_random = per_op(start.elapsed(), w.random_half.len());
    assert_eq!(fired.get(), 0);
    Churn { schedule, cancel_in_order, cancel_random, faults_per_k }
}

struct FireState {
    count: Cell<usize>,
    first: Cell<Option<Instant>>,
    last: Cell<Option<Instant>>,
}

impl FireState {
    fn new() -> Rc<FireState> {
        Rc::new(FireState { count: Cell::new(0), first: Cell::new(None), last: Cell::new(None) })
    }

    /// Records one fire; true when it was the last.
    fn fired(&self) -> bool {
        let n = self.count.get() + 1;
        self.count.set(n);
        if n == 1 {
            self.first.set(Some(Instant::now()));
        }
        if n == FIRE {
            self.last.set(Some(Instant::now()));
            return true;
        }
        false
    }

    fn result(&self, start: Instant, cpu: Duration, w: &Workload) -> Fire {
        assert_eq!(self.count.get(), FIRE);
        let (first, last) = (self.first.get().unwrap(), self.last.get().unwrap());
        let latest = *w.fire_offsets.iter().max().unwrap();
        Fire {
            span: last - first,
            last_late: (last - start).saturating_sub(latest),
            cpu_per_timer_ns: per_op(cpu, FIRE),
        }
    }
}

fn braid_fire(w: &Workload) -> Fire {
    let reactor = braid::Reactor::new(braid::Backend::Epoll).expect("reactor");
    let state = FireState::new();
    let cpu = thread_cpu();
    let start = Instant::now();
    for &offset in &w.fire_offsets {
        let state = state.clone();
        let r = reactor.clone();
        let delay = (start + offset).saturating_duration_since(Instant::now());
        reactor.call_later(delay, move || {
            if state.fired() {
                r.stop().expect("stop");
            }
        });
    }
    reactor.run_without_signal_handlers().expect("run");
    let cpu = thread_cpu() - cpu;
    state.result(start, cpu, w)
}

// ---------------------------------------------------------------- tokio --

fn tokio_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_time().build().expect("tokio runtime")
}

fn tokio_churn(rt: &tokio::runtime::Runtime, w: &Workload) -> Churn {
    rt.block_on(async {
        let mut queue = tokio_util::time::DelayQueue::new();
        let faults = minor_faults();
        let start = Instant::now();
        let keys: Vec<_> = w.delays.iter().enumerate().map(|(i, &delay)| queue.insert(i, delay)).collect();
        let schedule = per_op(start.elapsed(), SCHEDULE);
        let faults_per_k = (minor_faults() - faults) as f64 * 1000.0 / SCHEDULE as f64;

        let start = Instant::now();
        for key in keys.iter().step_by(2) {
            std::hint::black_box(queue.remove(key));
        }
        let cancel_in_order = per_op(start.elapsed(), SCHEDULE / 2);

        let start = Instant::now();
        for &i in &w.random_half {
            std::hint::black_box(queue.remove(&keys[i]));
        }
        let cancel_random = per_op(start.elapsed(), w.random_half.len());
        assert!(queue.is_empty());
        Churn { schedule, cancel_in_order, cancel_random, faults_per_k }
    })
}

fn tokio_fire(rt: &tokio::runtime::Runtime, w: &Workload) -> Fire {
    rt.block_on(async {
        let state = FireState::new();
        let mut queue = tokio_util::time::DelayQueue::new();
        let cpu = thread_cpu();
        let start = Instant::now();
        for (i, &offset) in w.fire_offsets.iter().enumerate() {
            queue.insert_at(i, tokio::time::Instant::from_std(start + offset));
        }
        while let Some(expired) = queue.next().await {
            std::hint::black_box(expired.into_inner());
            if state.fired() {
                break;
            }
        }
        let cpu = thread_cpu() - cpu;
        state.result(start, cpu, w)
    })
}

// --------------------------------------------------------------- report --

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

struct Row {
    figure: &'static str,
    target: &'static str,
    unit: &'static str,
    braid: f64,
    tokio: f64,
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// The 1-minute load average (other work on a shared machine skews results).
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// Today's UTC date as YYYY-MM-DD (days-since-epoch to civil date).
fn today() -> String {
    let secs =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let mut days = (secs / 86_400) as i64;
    let mut year = 1970;
    loop {
        let len = if is_leap(year) { 366 } else { 365 };
        if days < len {
            break;
        }
        days -= len;
        year += 1;
    }
    let months = [31, if is_leap(year) { 29 } else { 28 }, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    let mut month = 1;
    for len in months {
        if days < len {
            break;
        }
        days -= len;
        month += 1;
    }
    format!("{year:04}-{month:02}-{:02}", days + 1)
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn versions() -> String {
    // Resolved versions from the lock file, if it is where we expect it.
    let lock =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.lock")).unwrap_or_default();
    let find = |name: &str| -> String {
        let needle = format!("name = \"{name}\"\nversion = \"");
        lock.find(&needle)
            .map(|at| {
                let rest = &lock[at + needle.len()..];
                rest[..rest.find('"').unwrap_or(0)].to_string()
            })
            .unwrap_or_else(|| "?".into())
    };
    format!("tokio {}, tokio-util {}", find("tokio"), find("tokio-util"))
}

fn render(rows: &[Row], rounds: usize, load: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "## Timers\n");
    let _ = writeln!(s, "Command: `{COMMAND}` (add `-- --write` to update this file).\n");
    let _ = writeln!(
        s,
        "Machine: {} (nproc {}), Linux {}, load average {} at the start; {}; date {}. \
         Single thread, not pinned; each figure is the median of {rounds} rounds, braid and \
         tokio alternating.\n",
        cpu_model(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        kernel(),
        load,
        versions(),
        today(),
    );
    let _ = writeln!(
        s,
        "braid: `Reactor::call_later` / `DelayedCall::cancel` on an epoll reactor, fired by \
         `run_without_signal_handlers`. tokio: `tokio_util::time::DelayQueue` `insert` / \
         `remove` inside a current_thread runtime, fired by polling the queue. Delays are the \
         same random draws on both sides.\n"
    );
    let _ = writeln!(s, "| figure | braid | tokio | braid / tokio | braid target (DESIGN §8) |");
    let _ = writeln!(s, "|---|---:|---:|---:|---|");
    for row in rows {
        let (b, t) = if row.unit == "ms" {
            (format!("{:.2} ms", row.braid), format!("{:.2} ms", row.tokio))
        } else {
            (format!("{:.0} {}", row.braid, row.unit), format!("{:.0} {}", row.tokio, row.unit))
        };
        let ratio = if row.tokio > 0.0 { format!("{:.2}", row.braid / row.tokio) } else { "—".into() };
        let _ = writeln!(s, "| {} | {b} | {t} | {ratio} | {} |", row.figure, row.target);
    }
    let _ = writeln!(
        s,
        "\nThe fire window is 10 ms wide, so a span near 10 ms means the loop kept up; \
         \"late\" is how long after its deadline the last timer ran."
    );
    s
}

/// Replaces (or appends) the "## Timers" section of a markdown document.
fn splice(old: &str, section: &str) -> String {
    const HEADING: &str = "## Timers\n";
    let start =
        if old.starts_with(HEADING) { Some(0) } else { old.find(&format!("\n{HEADING}")).map(|i| i + 1) };
    match start {
        Some(start) => {
            let body = start + HEADING.len();
            let end = old[body..].find("\n## ").map_or(old.len(), |i| body + i + 1);
            let rest = &old[end..];
            let gap = if rest.is_empty() { "" } else { "\n" };
            format!("{}{section}{gap}{rest}", &old[..start])
        }
        None => format!("{}\n\n{section}", old.trim_end()),
    }
}

fn write_section(section: &str) -> std::io::Result<std::path::PathBuf> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("bench/ has a parent");
    let path = root.join("BENCHMARKS.md");
    let old = std::fs::read_to_string(&path).unwrap_or_else(|_| "# Benchmarks\n".into());
    std::fs::write(&path, splice(&old, section))?;
    Ok(path)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let write = args.iter().any(|a| a == "--write");
    let rounds = args
        .iter()
        .position(|a| a == "--rounds")
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(5usize);

    let load = load_average();
    let rt = tokio_runtime();
    if let Some(phase) = args.iter().position(|a| a == "--only").and_then(|i| args.get(i + 1)) {
        // One phase, each round printed: for profiling.
        for round in 0..rounds {
            let w = Workload::new(0x7133_0000 + round as u64);
            match phase.as_str() {
                "braid-churn" | "tokio-churn" | "braid-schedule" => {
                    let c = match phase.as_str() {
                        "braid-churn" => braid_churn(&w),
                        "braid-schedule" => braid_churn_with(&w, false),
                        _ => tokio_churn(&rt, &w),
                    };
                    println!(
                        "{phase}: schedule {:.0} ns, cancel in order {:.0} ns, cancel random {:.0} ns, {:.1} page faults per 1k",
                        c.schedule, c.cancel_in_order, c.cancel_random, c.faults_per_k
                    );
                }
                "braid-fire" | "tokio-fire" => {
                    let f = if phase == "braid-fire" { braid_fire(&w) } else { tokio_fire(&rt, &w) };
                    println!(
                        "{phase}: span {:.2} ms, last late {:.2} ms, cpu {:.0} ns/timer",
                        f.span.as_secs_f64() * 1e3,
                        f.last_late.as_secs_f64() * 1e3,
                        f.cpu_per_timer_ns
                    );
                }
                _ => {
                    eprintln!(
                        "--only takes braid-churn, braid-schedule, tokio-churn, braid-fire or tokio-fire"
                    );
                    std::process::exit(2);
                }
            }
        }
        return;
    }
    let mut churn = (Vec::new(), Vec::new());
    let mut fire = (Vec::new(), Vec::new());
    let started = Instant::now();
    for round in 0..rounds {
        let w = Workload::new(0x7133_0000 + round as u64);
        // Alternate who goes first so drift on a noisy machine is shared.
        if round % 2 == 0 {
            churn.0.push(braid_churn(&w));
            churn.1.push(tokio_churn(&rt, &w));
            fire.0.push(braid_fire(&w));
            fire.1.push(tokio_fire(&rt, &w));
        } else {
            churn.1.push(tokio_churn(&rt, &w));
            churn.0.push(braid_churn(&w));
            fire.1.push(tokio_fire(&rt, &w));
            fire.0.push(braid_fire(&w));
        }
        let (b, t) = (churn.0.last().expect("a round"), churn.1.last().expect("a round"));
        eprintln!(
            "round {}/{rounds} done ({:.1} s): schedule + cancel: braid {:.0} + {:.0} ns ({:.1} faults/1k), tokio {:.0} + {:.0} ns ({:.1} faults/1k)",
            round + 1,
            started.elapsed().as_secs_f64(),
            b.schedule,
            b.cancel_in_order,
            b.faults_per_k,
            t.schedule,
            t.cancel_in_order,
            t.faults_per_k
        );
    }

    let med_c = |v: &[Churn], f: fn(&Churn) -> f64| median(v.iter().map(f).collect());
    let med_f = |v: &[Fire], f: fn(&Fire) -> f64| median(v.iter().map(f).collect());
    fn ms(d: Duration) -> f64 {
        d.as_secs_f64() * 1e3
    }
    let rows = [
        Row {
            figure: "schedule 1,000,000 timers, random delays in [0, 10 s)",
            target: "",
            unit: "ns/op",
            braid: med_c(&churn.0, |c| c.schedule),
            tokio: med_c(&churn.1, |c| c.schedule),
        },
        Row {
            figure: "cancel half of them (every other, in scheduling order; 1M → 500k pending)",
            target: "",
            unit: "ns/op",
            braid: med_c(&churn.0, |c| c.cancel_in_order),
            tokio: med_c(&churn.1, |c| c.cancel_in_order),
        },
        Row {
            figure: "schedule + cancel (the two rows above)",
            target: "≤ 100 ns",
            unit: "ns",
            braid: med_c(&churn.0, |c| c.schedule + c.cancel_in_order),
            tokio: med_c(&churn.1, |c| c.schedule + c.cancel_in_order),
        },
        Row {
            figure: "cancel the other half in random order (500k → 0 pending)",
            target: "",
            unit: "ns/op",
            braid: med_c(&churn.0, |c| c.cancel_random),
            tokio: med_c(&churn.1, |c| c.cancel_random),
        },
        Row {
            figure: "fire 100,000 timers due in one 10 ms window: span, first fire to last",
            target: "≤ 10 ms",
            unit: "ms",
            braid: med_f(&fire.0, |f| ms(f.span)),
            tokio: med_f(&fire.1, |f| ms(f.span)),
        },
        Row {
            figure: "same: last fire after its deadline",
            target: "",
            unit: "ms",
            braid: med_f(&fire.0, |f| ms(f.last_late)),
            tokio: med_f(&fire.1, |f| ms(f.last_late)),
        },
        Row {
            figure: "same: thread CPU per timer, scheduling + firing",
            target: "",
            unit: "ns",
            braid: med_f(&fire.0, |f| f.cpu_per_timer_ns),
            tokio: med_f(&fire.1, |f| f.cpu_per_timer_ns),
        },
    ];
    let section = render(&rows, rounds, &load);
    print!("{section}");
    if write {
        match write_section(&section) {
            Ok(path) => eprintln!("wrote {}", path.display()),
            Err(e) => {
                eprintln!("could not write BENCHMARKS.md: {e}");
                std::process::exit(1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splice_replaces_only_the_timers_section() {
        let doc =
            "# Benchmarks\n\nintro\n\n## Echo\n\necho table\n\n## Timers\n\nold\n\n## Accept\n\naccept\n";
        let out = splice(doc, "## Timers\n\nnew\n");
        assert_eq!(
            out,
            "# Benchmarks\n\nintro\n\n## Echo\n\necho table\n\n## Timers\n\nnew\n\n## Accept\n\naccept\n"
        );
        // Last section, and appending when absent.
        let out = splice("# B\n\n## Timers\n\nold\n", "## Timers\n\nnew\n");
        assert_eq!(out, "# B\n\n## Timers\n\nnew\n");
        let out = splice("# B\n\n## Echo\n\nx\n", "## Timers\n\nnew\n");
        assert_eq!(out, "# B\n\n## Echo\n\nx\n\n## Timers\n\nnew\n");
        // Idempotent.
        assert_eq!(splice(&out, "## Timers\n\nnew\n"), out);
    }

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn today_is_a_plausible_date() {
        let d = today();
        assert_eq!(d.len(), 10);
        assert!(d.as_str() >= "2024-01-01", "{d}");
    }
}
