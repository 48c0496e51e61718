//! The CPU's time-stamp counter.
//!
//! Reading it takes a few nanoseconds, against about twenty for
//! `clock_gettime` (which reads the same counter and then converts it, under
//! a sequence lock). `reactor::clock` scales it to nanoseconds for the one
//! place where that difference shows: the deadline of every `call_later`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;

/// Reads the counter (0 where there is none; `usable` is then false).
#[inline(always)]
pub(crate) fn read() -> u64 {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: every x86-64 CPU has RDTSC; it reads a register into a value
    // and touches no memory.
    unsafe {
        core::arch::x86_64::_rdtsc()
    }
    #[cfg(not(target_arch = "x86_64"))]
    0
}

/// Set for good once the counter misbehaved or the kernel stopped keeping
/// time with it.
static DISTRUSTED: AtomicBool = AtomicBool::new(false);
/// The counter value after which the clocksource is read again.
static NEXT_PROBE: AtomicU64 = AtomicU64::new(0);
/// Ticks between two reads of the clocksource: about a second at the
/// usual few GHz.
const PROBE_EVERY: u64 = 1 << 31;

/// Whether the counter can stand in for the monotonic clock: it ticks at
/// one rate whatever the CPU's frequency or sleep state (`constant_tsc`,
/// `nonstop_tsc`), and the kernel itself keeps time with it (clocksource
/// `tsc`), which it only does after checking that the counters of all CPUs
/// agree. The CPU flags are read once; the clocksource again about every
/// second, since the kernel switches away from a counter its watchdog
/// finds unstable. Once false, false for the rest of the process.
pub(crate) fn usable() -> bool {
    static USABLE: OnceLock<bool> = OnceLock::new();
    if !*USABLE.get_or_init(|| cfg!(all(target_arch = "x86_64", target_os = "linux")) && probe()) {
        return false;
    }
    if DISTRUSTED.load(Ordering::Relaxed) {
        return false;
    }
    let now = read();
    let next = NEXT_PROBE.load(Ordering::Relaxed);
    // Whoever moves the probe time on reads the file; the others go on.
    if now >= next
        && NEXT_PROBE
            .compare_exchange(next, now.saturating_add(PROBE_EVERY), Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        && clocksource_is_tsc() == Some(false)
    {
        distrust("the kernel no longer keeps time with it");
    }
    !DISTRUSTED.load(Ordering::Relaxed)
}

/// Stops every use of the counter for the rest of the process.
pub(crate) fn distrust(why: &str) {
    if !DISTRUSTED.swap(true, Ordering::Relaxed) {
        tracing::warn!(target: "braid", "the CPU's time-stamp counter is no longer used for deadlines: {why}");
    }
}

/// Whether the kernel keeps time with the counter; `None` if the file
/// could not be read (say, the process is out of descriptors), which says
/// nothing about the counter: the check is simply tried again later.
fn clocksource_is_tsc() -> Option<bool> {
    let source = std::fs::read_to_string("/sys/devices/system/clocksource/clocksource0/current_clocksource");
    source.ok().map(|s| s.trim() == "tsc")
}

fn probe() -> bool {
    if clocksource_is_tsc() != Some(true) {
        return false;
    }
    let Ok(cpuinfo) = std::fs::read_to_string("/proc/cpuinfo") else {
        return false;
    };
    cpu_flags_allow(&cpuinfo)
}

/// True if the first `flags` line of `/proc/cpuinfo` names both invariant
/// counter features.
fn cpu_flags_allow(cpuinfo: &str) -> bool {
    let Some(flags) = cpuinfo.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        (name.trim() == "flags").then_some(value)
    }) else {
        return false;
    };
    let has = |flag: &str| flags.split_whitespace().any(|f| f == flag);
    has("constant_tsc") && has("nonstop_tsc")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_invariance_flags_are_required() {
        let line =
            |flags: &str| format!("processor\t: 0\nflags\t\t: fpu {flags} sse2\nbugs\t\t: spectre_v1\n");
        assert!(cpu_flags_allow(&line("constant_tsc nonstop_tsc")));
        assert!(!cpu_flags_allow(&line("constant_tsc")));
        assert!(!cpu_flags_allow(&line("nonstop_tsc")));
        assert!(!cpu_flags_allow(&line("constant_tsc_x nonstop_tsc")), "whole words only");
        assert!(!cpu_flags_allow("processor\t: 0\n"), "no flags line");
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn the_counter_moves_forward() {
        let a = read();
        std::thread::sleep(std::time::Duration::from_millis(1));
        assert!(read() > a);
    }
}
