//! Where the reactor reads the time.
//!
//! [`monotonic_ns`] is the precise clock (`CLOCK_MONOTONIC`, what `Instant`
//! reads). Firing and poll timeouts use it.
//!
//! [`DeadlineClock`] is for the deadline of each `call_later` and `reset`,
//! which a burst of scheduling computes millions of times: reading the
//! precise clock was a quarter of the cost of a schedule. It scales the
//! CPU's time-stamp counter (`sys::tsc`) to nanoseconds, extrapolating from
//! an *anchor*, a precise reading taken at most [`EXTRAPOLATE_NS`] earlier.
//!
//! # What is guaranteed
//!
//! * **Never decreasing.** A clock never returns less than it returned
//!   before: each reading is at least the previous one (`last`). Without
//!   that, a reading extrapolated a hair ahead followed by a re-anchor (which
//!   returns the precise, slightly earlier, time) would step backwards, and
//!   two calls scheduled in that order with the same delay could fire in the
//!   other order.
//! * **Never behind the precise clock**, so a call never runs before its
//!   delay has passed:
//!   * the anchor pairs a counter value with a clock reading taken just
//!     *after* it, so the anchor's time is, if anything, ahead;
//!   * the rate (ns per tick) is measured once per process between two
//!     readings at least [`CALIBRATE_AFTER_NS`] apart, each bracketed by
//!     counter reads close together, so its error is below 10^-4; it is
//!     then padded by 2^-10 (about 10^-3), so it is never slower than the
//!     truth;
//!   * this rests on the counter ticking at one rate and agreeing across
//!     CPUs, which the kernel checks before it keeps time with it (and
//!     which `CLOCK_MONOTONIC` itself relies on). It is checked again at
//!     every re-anchor (had the extrapolation fallen behind the new precise
//!     reading, the counter ran slow), and the clocksource is read again
//!     about every second (`tsc::usable`); on either failure the process
//!     stops using the counter.
//! * **At most about a microsecond ahead**: the padding over one
//!   extrapolation. A call may run that much late.
//!
//! `Timers::seconds` returns the precise clock, or the latest deadline
//! reading if that is ahead, so it too never decreases and is never behind
//! the precise clock, and the "now" a call's deadline was computed from
//! lies between the `seconds()` readings taken before and after the
//! `call_later`: `time()` minus the delay is never above a later
//! `seconds()` nor below an earlier one.
//!
//! Until the rate is known, and where the counter is not usable (not x86-64
//! Linux, a clocksource other than `tsc`, a counter that varies with
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
pub(crate) struct Sample {
    tsc: u64,
    ns: u64,
    /// Ticks between the counter reads before and after the clock read.
    bracket: u64,
}

impl Sample {
    fn take(counter: &impl Counter) -> Sample {
        let before = counter.ticks();
        let ns = counter.precise();
        let after = counter.ticks();
        Sample { tsc: before, ns, bracket: after.wrapping_sub(before) }
    }
}

/// Nanoseconds per tick as a 32.32 fixed-point number, and how many ticks
/// one extrapolation may span.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Scale {
    mult: u64,
    max_ticks: u64,
}

impl Scale {
    /// No rate: every reading re-anchors.
    const NONE: Scale = Scale { mult: 0, max_ticks: 0 };

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

    /// `ticks` in nanoseconds (exact for `ticks < max_ticks`; saturating
    /// beyond `u64`).
    #[inline]
    fn ns(&self, ticks: u64) -> u64 {
        u64::try_from((ticks as u128 * self.mult as u128) >> 32).unwrap_or(u64::MAX)
    }

    /// Whether the readings extrapolated from `anchor` kept up with the
    /// precise clock until `sample`: extrapolated to the counter read that
    /// closes `sample`, taken after its clock read, they must not be
    /// behind that clock read. A counter that went backwards (another
    /// CPU's, a hair behind) tells nothing about the rate.
    fn held(&self, anchor: Sample, sample: Sample) -> bool {
        let ticks = sample.tsc.wrapping_add(sample.bracket).wrapping_sub(anchor.tsc);
        ticks > u64::MAX / 2 || anchor.ns.saturating_add(self.ns(ticks)) >= sample.ns
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

/// Where a [`DeadlineClock`] reads the counter and the precise clock: the
/// hardware, or a simulation in tests.
pub(crate) trait Counter {
    /// The counter now.
    fn ticks(&self) -> u64;
    /// The precise clock now, in [`monotonic_ns`] units.
    fn precise(&self) -> u64;
    /// Whether the counter may be used now.
    fn usable(&self) -> bool;
    /// The rate, once known, learning it from `sample` until then.
    fn rate(&self, sample: Sample) -> Option<Scale>;
    /// Stops all use of the counter.
    fn distrust(&self, why: &str);
}

/// The CPU's counter and `CLOCK_MONOTONIC`, with the process-wide rate.
pub(crate) struct Hardware;

impl Counter for Hardware {
    #[inline(always)]
    fn ticks(&self) -> u64 {
        tsc::read()
    }
    fn precise(&self) -> u64 {
        monotonic_ns()
    }
    fn usable(&self) -> bool {
        tsc::usable()
    }
    fn rate(&self, sample: Sample) -> Option<Scale> {
        if SCALE.get().is_none() {
            calibrate(sample);
        }
        SCALE.get().copied()
    }
    fn distrust(&self, why: &str) {
        tsc::distrust(why);
    }
}

/// A clock for deadlines: cheap, never decreasing, and never behind
/// [`monotonic_ns`] (see the module documentation). One per timer set;
/// not shared between threads.
pub(crate) struct DeadlineClock {
    anchor: Cell<Sample>,
    /// The anchor's rate; [`Scale::NONE`] while there is none.
    scale: Cell<Scale>,
    /// The latest reading returned.
    last: Cell<u64>,
}

impl DeadlineClock {
    pub fn new() -> DeadlineClock {
        DeadlineClock {
            anchor: Cell::new(Sample { tsc: 0, ns: 0, bracket: u64::MAX }),
            scale: Cell::new(Scale::NONE),
            last: Cell::new(0),
        }
    }

    /// Now, in [`monotonic_ns`] units.
    #[inline]
    pub fn now(&self) -> u64 {
        self.now_on(&Hardware)
    }

    /// The latest reading returned (0 before the first).
    #[inline]
    pub fn latest(&self) -> u64 {
        self.last.get()
    }

    #[inline]
    fn now_on(&self, counter: &impl Counter) -> u64 {
        let anchor = self.anchor.get();
        let scale = self.scale.get();
        // After a move to another CPU whose counter is a hair behind, this
        // wraps around to a huge value and takes a new anchor.
        let ticks = counter.ticks().wrapping_sub(anchor.tsc);
        if ticks < scale.max_ticks {
            return self.returning(anchor.ns + scale.ns(ticks));
        }
        self.reanchor(counter)
    }

    /// Returns `now`, or the latest reading if that was later.
    #[inline]
    fn returning(&self, now: u64) -> u64 {
        let now = now.max(self.last.get());
        self.last.set(now);
        now
    }

    #[cold]
    #[inline(never)]
    fn reanchor(&self, counter: &impl Counter) -> u64 {
        if !counter.usable() {
            self.scale.set(Scale::NONE);
            return self.returning(counter.precise());
        }
        let sample = Sample::take(counter);
        let scale = self.scale.get();
        if scale != Scale::NONE && !scale.held(self.anchor.get(), sample) {
            counter.distrust("it ran slower than the rate measured for it");
            self.scale.set(Scale::NONE);
        } else {
            self.anchor.set(sample);
            self.scale.set(counter.rate(sample).unwrap_or(Scale::NONE));
        }
        self.returning(sample.ns)
    }

    /// Makes the readings run `ahead_ns` ahead of the precise clock (and
    /// stand still) until [`DeadlineClock::force_reanchor`]: a magnified,
    /// deterministic version of the extrapolation's lead.
    #[cfg(test)]
    pub fn pretend_ahead(&self, ahead_ns: u64) {
        self.anchor.set(Sample { tsc: tsc::read(), ns: monotonic_ns() + ahead_ns, bracket: 0 });
        self.scale.set(Scale { mult: 0, max_ticks: u64::MAX });
    }

    /// Takes a new anchor now, as a reading past the extrapolation limit
    /// would.
    #[cfg(test)]
    pub fn force_reanchor(&self) -> u64 {
        // The pretended rate is not one to check the counter against.
        self.scale.set(Scale::NONE);
        self.reanchor(&Hardware)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Duration;

    /// A simulated counter at 3 ticks per ns, with a precise clock read
    /// `read_ns` after the counter (as a real clock read takes time).
    struct Sim {
        tick: Cell<u64>,
        read_ns: Cell<u64>,
        /// Ticks per ns the counter really runs at, in thousandths (3000
        /// for the rate the scale was measured at).
        milli_rate: u64,
        distrusted: Cell<bool>,
        scale: Scale,
    }

    impl Sim {
        fn new(milli_rate: u64) -> Sim {
            let scale = Scale::measure(sample(0, 0), sample(3 * 200_000_000, 200_000_000)).unwrap();
            let start = 3 * 5_000_000_000;
            Sim {
                tick: Cell::new(start),
                read_ns: Cell::new(1),
                milli_rate,
                distrusted: Cell::new(false),
                scale,
            }
        }

        /// The true time at the current tick.
        fn truth(&self) -> u64 {
            self.tick.get() * 1000 / self.milli_rate
        }

        fn advance(&self, ticks: u64) {
            self.tick.set(self.tick.get() + ticks);
        }
    }

    impl Counter for Sim {
        fn ticks(&self) -> u64 {
            self.tick.get()
        }
        fn precise(&self) -> u64 {
            self.advance(self.read_ns.get() * self.milli_rate / 1000);
            self.truth()
        }
        fn usable(&self) -> bool {
            !self.distrusted.get()
        }
        fn rate(&self, _: Sample) -> Option<Scale> {
            Some(self.scale)
        }
        fn distrust(&self, _: &str) {
            self.distrusted.set(true);
        }
    }

    /// One step of a simulated run: the counter moves on, then the clock is
    /// read, or re-anchored as the test hook does.
    #[derive(Clone, Debug)]
    enum Step {
        Read { ticks: u64, read_ns: u64 },
        Reanchor { ticks: u64, read_ns: u64 },
    }

    fn steps() -> impl Strategy<Value = Vec<Step>> {
        let max = Sim::new(3000).scale.max_ticks;
        // Small steps, steps that land near the extrapolation limit (where
        // the lead is largest and the next reading re-anchors), and idle gaps.
        let ticks = prop_oneof![0..3_000u64, max - 3_000..max + 3_000, 0..4 * max, 0..3_000_000_000u64];
        let step = (ticks, 1..2_000u64, 0..8u8).prop_map(|(ticks, read_ns, kind)| {
            if kind == 0 {
                Step::Reanchor { ticks, read_ns }
            } else {
                Step::Read { ticks, read_ns }
            }
        });
        proptest::collection::vec(step, 1..400)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// Across re-anchors, natural (past the limit) and forced, readings
        /// never decrease, are never behind the true time, and at most a
        /// little ahead; and an honest counter is never distrusted.
        #[test]
        fn readings_never_decrease_nor_fall_behind_across_reanchors(steps in steps()) {
            let sim = Sim::new(3000);
            let clock = DeadlineClock::new();
            let mut previous = 0;
            for step in steps {
                let (Step::Read { ticks, read_ns } | Step::Reanchor { ticks, read_ns }) = step;
                sim.advance(ticks);
                sim.read_ns.set(read_ns);
                let now = match step {
                    Step::Read { .. } => clock.now_on(&sim),
                    Step::Reanchor { .. } => clock.reanchor(&sim),
                };
                let truth = sim.truth();
                prop_assert!(now >= previous, "stepped back from {} to {}", previous, now);
                prop_assert!(now >= truth, "{} behind the truth {}", now, truth);
                // The padding over one extrapolation (under 1 µs), and the
                // lead of the anchor's clock read (under 2 µs here).
                prop_assert!(now <= truth + 3_000, "{} too far ahead of {}", now, truth);
                prop_assert_eq!(clock.latest(), now);
                previous = now;
            }
            prop_assert!(!sim.distrusted.get(), "an honest counter was distrusted");
        }
    }

    #[test]
    fn a_counter_slower_than_its_rate_is_distrusted_at_the_next_anchor() {
        // The counter runs 1% slow: extrapolations fall behind.
        let sim = Sim::new(2970);
        let clock = DeadlineClock::new();
        clock.now_on(&sim);
        sim.advance(sim.scale.max_ticks - 10);
        let behind = clock.now_on(&sim);
        assert!(behind < sim.truth(), "the simulation must make the extrapolation fall behind");
        sim.advance(20);
        let now = clock.now_on(&sim);
        assert!(sim.distrusted.get(), "the slow counter is caught at the re-anchor");
        assert!(now >= sim.truth(), "and the reading is the precise one");
        sim.advance(10);
        assert!(clock.now_on(&sim) >= sim.truth(), "from then on the precise clock is read");
        assert_eq!(clock.scale.get(), Scale::NONE);
    }

    #[test]
    fn a_reanchor_after_a_lead_does_not_step_back() {
        let clock = DeadlineClock::new();
        clock.now();
        clock.pretend_ahead(50_000_000);
        let ahead = clock.now();
        let after = clock.force_reanchor();
        assert!(after >= ahead, "the re-anchor returned {after}, below the earlier {ahead}");
        assert!(clock.now() >= ahead);
    }

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
    fn a_reading_is_never_behind_the_precise_clock_nor_far_ahead_nor_decreasing() {
        let clock = DeadlineClock::new();
        // Long enough for the process to measure the rate where it can, with
        // pauses so that readings also extrapolate across idle time.
        let until = monotonic_ns() + 2 * CALIBRATE_AFTER_NS;
        let mut checked = 0u64;
        let mut previous = 0;
        while monotonic_ns() < until || checked < 1_000_000 {
            let before = monotonic_ns();
            let now = clock.now();
            let after = monotonic_ns();
            assert!(now >= before, "deadline clock {now} behind the precise clock {before}");
            assert!(now >= previous, "deadline clock stepped back from {previous} to {now}");
            previous = now;
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
