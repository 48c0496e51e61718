//! The CPU's time-stamp counter.
//!
//! Reading it takes a few nanoseconds, against about twenty for
//! `clock_gettime` (which reads the same counter and then converts it, under
//! a sequence lock). `reactor::clock` scales it to nanoseconds for the one
//! place where that difference shows: the deadline of every `call_later`.

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

/// Whether the counter can stand in for the monotonic clock: it ticks at
/// one rate whatever the CPU's frequency or sleep state (`constant_tsc`,
/// `nonstop_tsc`), and the kernel itself keeps time with it (clocksource
/// `tsc`), which it only does after checking that the counters of all CPUs
/// agree. Probed once per process.
pub(crate) fn usable() -> bool {
    static USABLE: OnceLock<bool> = OnceLock::new();
    *USABLE.get_or_init(|| cfg!(all(target_arch = "x86_64", target_os = "linux")) && probe())
}

fn probe() -> bool {
    let source = std::fs::read_to_string("/sys/devices/system/clocksource/clocksource0/current_clocksource");
    if source.as_deref().map(str::trim).ok() != Some("tsc") {
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
