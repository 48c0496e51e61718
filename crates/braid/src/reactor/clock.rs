//! Where the reactor reads the time.
//!
//! [`monotonic_ns`] is the precise clock (`CLOCK_MONOTONIC`, what `Instant`
//! reads). Firing, `seconds()` and poll timeouts use it.
//!
//! [`DeadlineClock`] is for the deadline of each `call_later` and `reset`,
//! which a burst of scheduling computes millions of times: reading the
//! precise clock was a quarter of the cost of a schedule. It scales the
//! CPU's time-stamp counter (`sys::tsc`) to nanoseconds, extrapolating from
//! an *anchor*, a precise reading taken at most [`EXTRAPOLATE_NS`] earlier.
//! Its readings are never behind the precise clock, so a call never runs
//! before its delay has passed:
//!
//! * The anchor pairs a counter value with a clock reading taken just
//!   *after* it, so the anchor's time is, if anything, ahead.
//! * The rate (ns per tick) is measured once per process between two
//!   readings at least [`CALIBRATE_AFTER_NS`] apart, each bracketed by
//!   counter reads close together, so its error is below 10^-4; it is then
//!   padded by 2^-10 (about 10^-3), so it is never slower than the truth.
//!
//! Readings may run ahead of the precise clock by at most that padding over
//! one extrapolation (about a microsecond), so a call may run that much
//! late. Until the rate is known, and where the counter is not usable (not
//! x86-64 Linux, a clocksource other than `tsc`, a counter that varies with
//! frequency), every deadline reads the precise clock.

use std::cell::Cell;
use std::sync::OnceLock;

use crate::sys::tsc;

/// How long a reading may extrapolate from its anchor.
pub(crate) const EXTRAPOLATE_NS: u64 = 1_000_000;
/// How far apart the two readings that measure the rate must be.
const CALIBRATE_AFTER_NS: u64 = 100_000_000;
/// A reading bracketed by counter values further apart than this (a
/// preemption, say) is not used to measure the rate.
const MAX_BRACKET_TICKS: u64 = 20_000;
/// The rate's padding, as a right shift: 2^-10.
const PAD_SHIFT: u32 = 10;

/// The monotonic clock (what `Instant` reads on Linux) in nanoseconds, read
/// directly: a third cheaper than `Instant::elapsed`.
#[inline]
pub(crate) fn monotonic_ns() -> u64 {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    (ts.tv_sec as u64).wrapping_mul(1_000_000_000).wrapping_add(ts.tv_nsec as u64)
}

/// A counter value and the precise time read right after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Sample {
    tsc: u64,
    ns: u64,
    /// Ticks between the counter reads before and after the clock read.
    bracket: u64,
}

impl Sample {
    fn take() -> Sample {
        let before = tsc::read();
        let ns = monotonic_ns();
        let after = tsc::read();
        Sample { tsc: before, ns, bracket: after.wrapping_sub(before) }
    }
}

/// Nanoseconds per tick as a 32.32 fixed-point number, and how many ticks
/// one extrapolation may span.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Scale {
    mult: u64,
    max_ticks: u64,
}

impl Scale {
    /// The padded rate between two samples, if they are far enough apart
    /// and precise enough to measure it.
    fn measure(a: Sample, b: Sample) -> Option<Scale> {
        let ticks = b.tsc.checked_sub(a.tsc).filter(|&t| t > 0)?;
        let ns = b.ns.checked_sub(a.ns).filter(|&ns| ns >= CALIBRATE_AFTER_NS)?;
        if a.bracket > MAX_BRACKET_TICKS || b.bracket > MAX_BRACKET_TICKS {
            return None;
        }
        let mult = ((ns as u128) << 32).div_ceil(ticks as u128);
        let mult = u64::try_from(mult + (mult >> PAD_SHIFT)).ok().filter(|&m| m > 0)?;
        let max_ticks = u64::try_from(((EXTRAPOLATE_NS as u128) << 32) / mult as u128).ok()?;
        Some(Scale { mult, max_ticks })
    }

    #[inline]
    fn ns(&self, ticks: u64) -> u64 {
        ((ticks as u128 * self.mult as u128) >> 32) as u64
    }
}

/// The process's first precise sample, and the rate measured from it.
static FIRST: OnceLock<Sample> = OnceLock::new();
static SCALE: OnceLock<Scale> = OnceLock::new();

/// Learns the rate from `sample` if it is far enough from the first one.
fn calibrate(sample: Sample) {
    if sample.bracket > MAX_BRACKET_TICKS {
        return;
    }
    let first = *FIRST.get_or_init(|| sample);
    if let Some(scale) = Scale::measure(first, sample) {
        let _ = SCALE.set(scale);
    }
}

/// A clock for deadlines: cheap, and never behind [`monotonic_ns`] (see
/// the module documentation). One per timer set; not shared between
/// threads.
pub(crate) struct DeadlineClock {
    anchor: Cell<Sample>,
}

impl DeadlineClock {
    pub fn new() -> DeadlineClock {
        // Counter 0 makes the first reading take a real anchor.
        DeadlineClock { anchor: Cell::new(Sample { tsc: 0, ns: 0, bracket: u64::MAX }) }
    }

    /// Now, in [`monotonic_ns`] units.
    #[inline]
    pub fn now(&self) -> u64 {
        if let Some(scale) = SCALE.get() {
            let anchor = self.anchor.get();
            // After a move to another CPU whose counter is a hair behind,
            // this wraps around to a huge value and takes a new anchor.
            let ticks = tsc::read().wrapping_sub(anchor.tsc);
            if ticks < scale.max_ticks {
                return anchor.ns + scale.ns(ticks);
            }
        }
        self.reanchor()
    }

    #[cold]
    fn reanchor(&self) -> u64 {
        if !tsc::usable() {
            return monotonic_ns();
        }
        let sample = Sample::take();
        self.anchor.set(sample);
        if SCALE.get().is_none() {
            calibrate(sample);
        }
        sample.ns
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn sample(tsc: u64, ns: u64) -> Sample {
        Sample { tsc, ns, bracket: 100 }
    }

    #[test]
    fn the_rate_is_measured_padded_and_bounded() {
        // 3 ticks per ns, over 200 ms.
        let scale =
            Scale::measure(sample(1_000, 5_000), sample(1_000 + 600_000_000, 5_000 + 200_000_000)).unwrap();
        let exact = (1u64 << 32) / 3;
        assert!(scale.mult > exact, "padded, so never slower than the truth");
        assert!(scale.mult < exact + (exact >> 9), "by about 2^-10, no more");
        // 3,000,000 ticks are 1 ms; a reading extrapolates at most 1 ms.
        assert!(scale.max_ticks <= 3_000_000 && scale.max_ticks > 2_990_000, "{}", scale.max_ticks);
        let ns = scale.ns(3_000_000);
        assert!((1_000_000..1_001_000).contains(&ns), "{ns}");
    }

    #[test]
    fn no_rate_from_close_backward_or_imprecise_samples() {
        let a = sample(1_000, 0);
        assert_eq!(Scale::measure(a, sample(2_000, CALIBRATE_AFTER_NS - 1)), None, "too close");
        assert_eq!(Scale::measure(a, sample(500, CALIBRATE_AFTER_NS)), None, "counter went back");
        assert_eq!(Scale::measure(a, sample(1_000, CALIBRATE_AFTER_NS)), None, "counter stood still");
        let blurred = Sample { bracket: MAX_BRACKET_TICKS + 1, ..sample(300_000_000, CALIBRATE_AFTER_NS) };
        assert_eq!(Scale::measure(a, blurred), None, "a preempted reading");
        assert!(Scale::measure(a, sample(300_000_000, CALIBRATE_AFTER_NS)).is_some());
    }

    #[test]
    fn a_reading_is_never_behind_the_precise_clock_nor_far_ahead() {
        let clock = DeadlineClock::new();
        // Long enough for the process to measure the rate where it can, with
        // pauses so that readings also extrapolate across idle time.
        let until = monotonic_ns() + 2 * CALIBRATE_AFTER_NS;
        let mut checked = 0u64;
        while monotonic_ns() < until || checked < 1_000_000 {
            let before = monotonic_ns();
            let now = clock.now();
            let after = monotonic_ns();
            assert!(now >= before, "deadline clock {now} behind the precise clock {before}");
            // The true bound is the padding over one extrapolation (about
            // 1 µs); a preemption only makes `after` later.
            assert!(now <= after + 100_000, "deadline clock {now} far ahead of {after}");
            checked += 1;
            if checked.is_multiple_of(50_000) {
                std::thread::sleep(Duration::from_micros(if checked.is_multiple_of(100_000) {
                    5_000
                } else {
                    250
                }));
            }
        }
        if tsc::usable() {
            assert!(SCALE.get().is_some(), "the rate was measured");
        }
    }
}
