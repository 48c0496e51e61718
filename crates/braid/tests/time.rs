//! Time: call_later and DelayedCall. Twisted reference §4.2 and the
//! DelayedCall items of §4.6, each test on every backend.

mod common;

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, Instant};

use std::sync::Mutex;

use braid::testing::Clock;
use braid::{DelayedCall, Error};
use common::run_reactor;

/// Debug mode is process-wide: the tests that switch it take turns, and
/// no other test here depends on it.
static DEBUG_MODE: Mutex<()> = Mutex::new(());

/// Switches debug mode off again, even if the test fails.
struct DebugOff;

impl Drop for DebugOff {
    fn drop(&mut self) {
        DelayedCall::set_debug(false);
    }
}

/// A delayed call's string form without the seconds (which move on).
fn without_seconds(shown: &str) -> String {
    match (shown.find('['), shown.find("s]")) {
        (Some(start), Some(end)) => format!("{}{}", &shown[..start], &shown[end + 2..]),
        _ => shown.to_string(),
    }
}

/// The seconds a delayed call's string form says it is due in.
fn shown_seconds(shown: &str) -> Option<f64> {
    let start = shown.find('[')? + 1;
    let end = start + shown[start..].find("s]")?;
    shown[start..end].parse().ok()
}

reactor_test! {
    /// §4.2.1
    fn delayed_call_stops_reactor(r) {
        let rr = r.clone();
        r.call_later(Duration::ZERO, move || rr.stop());
        run_reactor(&r);
    }
}

reactor_test! {
    /// §4.2.2: an absurdly distant timer clamps the poll timeout; other work
    /// is served and afterwards the timer is still active and listed.
    fn distant_delayed_call(r) {
        let far = r.call_later(Duration::MAX, || ());
        let far2 = r.call_later(Duration::from_secs(u64::MAX / 2), || ());
        let remote = r.remote();
        std::thread::spawn(move || {
            remote.call_from_thread(|r| r.stop().unwrap()).unwrap();
        });
        run_reactor(&r);
        assert!(far.active() && far2.active());
        let pending = r.get_delayed_calls();
        assert!(pending.contains(&far) && pending.contains(&far2));
        assert!(far.time().unwrap() > r.seconds() + 1e9);
    }
}

reactor_test! {
    /// Equal deadlines run in the order they were scheduled.
    fn equal_deadlines_run_in_scheduling_order(r) {
        let order = Rc::new(RefCell::new(Vec::new()));
        for i in 0..50 {
            let o = order.clone();
            r.call_later(Duration::from_millis(1), move || o.borrow_mut().push(i));
        }
        let rr = r.clone();
        r.call_later(Duration::from_millis(1), move || rr.stop().unwrap());
        run_reactor(&r);
        assert_eq!(*order.borrow(), (0..50).collect::<Vec<_>>());
    }
}

reactor_test! {
    /// A call scheduled for "now" inside a callback runs on the next
    /// iteration, after one poll: order a, b, a-child.
    fn call_for_now_inside_callback_runs_next_iteration(r) {
        let order = Rc::new(RefCell::new(Vec::new()));
        let (o, rr) = (order.clone(), r.clone());
        r.call_later(Duration::ZERO, move || {
            let it = rr.iterations();
            o.borrow_mut().push("a".to_string());
            let (o2, rr2) = (o.clone(), rr.clone());
            rr.call_later(Duration::ZERO, move || {
                o2.borrow_mut().push(format!("a-child after {} iteration(s)", rr2.iterations() - it));
                rr2.stop().unwrap();
            });
        });
        let o = order.clone();
        r.call_later(Duration::ZERO, move || o.borrow_mut().push("b".to_string()));
        run_reactor(&r);
        assert_eq!(*order.borrow(), ["a", "b", "a-child after 1 iteration(s)"]);
    }
}

reactor_test! {
    /// Timers fire in deadline order regardless of scheduling order.
    fn timers_fire_in_deadline_order(r) {
        let order = Rc::new(RefCell::new(Vec::new()));
        for ms in [30u64, 10, 20] {
            let o = order.clone();
            r.call_later(Duration::from_millis(ms), move || o.borrow_mut().push(ms));
        }
        let rr = r.clone();
        r.call_later(Duration::from_millis(40), move || rr.stop().unwrap());
        run_reactor(&r);
        assert_eq!(*order.borrow(), [10, 20, 30]);
    }
}

reactor_test! {
    /// cancel, and the AlreadyCalled / AlreadyCancelled errors.
    fn cancel_and_errors(r) {
        let ran = Rc::new(Cell::new(0));
        let r1 = ran.clone();
        let cancelled = r.call_later(Duration::ZERO, move || r1.set(r1.get() + 1));
        let r2 = ran.clone();
        let called = r.call_later(Duration::ZERO, move || r2.set(r2.get() + 10));
        assert!(cancelled.active());
        cancelled.cancel().unwrap();
        assert!(!cancelled.active() && cancelled.cancelled());
        assert!(matches!(cancelled.cancel(), Err(Error::AlreadyCancelled)));
        assert!(matches!(cancelled.reset(Duration::ZERO), Err(Error::AlreadyCancelled)));
        let rr = r.clone();
        r.call_later(Duration::from_millis(1), move || rr.stop().unwrap());
        run_reactor(&r);
        assert_eq!(ran.get(), 10);
        assert!(called.called() && !called.active());
        assert!(matches!(called.cancel(), Err(Error::AlreadyCalled)));
        assert!(matches!(called.delay(Duration::ZERO), Err(Error::AlreadyCalled)));
        assert_eq!(called.time(), None);
    }
}

reactor_test! {
    /// Cancelling drops the closure at once, freeing what it captured.
    fn cancel_frees_the_closure(r) {
        let captured = Rc::new(());
        let c = captured.clone();
        let dc = r.call_later(Duration::from_secs(60), move || drop(c));
        assert_eq!(Rc::strong_count(&captured), 2);
        dc.cancel().unwrap();
        assert_eq!(Rc::strong_count(&captured), 1);
    }
}

reactor_test! {
    /// reset moves a call earlier or later; delay pushes it later.
    fn reset_and_delay(r) {
        let order = Rc::new(RefCell::new(Vec::new()));
        let o = order.clone();
        let late = r.call_later(Duration::from_secs(60), move || o.borrow_mut().push("was late"));
        let o = order.clone();
        let early = r.call_later(Duration::from_millis(1), move || o.borrow_mut().push("was early"));
        let before = late.time().unwrap();
        late.reset(Duration::ZERO).unwrap();
        assert!(late.time().unwrap() < before);
        let t = early.time().unwrap();
        early.delay(Duration::from_millis(20)).unwrap();
        assert!((early.time().unwrap() - t - 0.020).abs() < 1e-6);
        let rr = r.clone();
        r.call_later(Duration::from_millis(40), move || rr.stop().unwrap());
        run_reactor(&r);
        assert_eq!(*order.borrow(), ["was late", "was early"]);
    }
}

reactor_test! {
    /// A timer actually waits about as long as asked (generously bounded).
    fn call_later_waits(r) {
        let start = Instant::now();
        let rr = r.clone();
        r.call_later(Duration::from_millis(50), move || rr.stop().unwrap());
        run_reactor(&r);
        assert!(start.elapsed() >= Duration::from_millis(50));
    }
}

reactor_test! {
    /// get_delayed_calls lists pending calls only; a DelayedCall equals
    /// only itself.
    fn get_delayed_calls_lists_pending(r) {
        let a = r.call_later(Duration::from_secs(10), || ());
        let b = r.call_later(Duration::from_secs(20), || ());
        let c = r.call_later(Duration::from_secs(30), || ());
        b.cancel().unwrap();
        let pending = r.get_delayed_calls();
        assert_eq!(pending.len(), 2);
        assert!(pending.contains(&a) && pending.contains(&c) && !pending.contains(&b));
        assert_ne!(a, c);
        assert_eq!(a, a.clone());
        let shown = format!("{a:?}");
        assert!(shown.contains("called=false cancelled=false") && shown.contains("s]"), "{shown}");
    }
}

reactor_test! {
    /// Cancelled calls never pile up: after scheduling and cancelling many
    /// calls nothing is left pending, and the queue keeps working.
    fn cancelled_calls_do_not_pile_up(r) {
        let calls: Vec<_> = (0..100_000u64).map(|i| r.call_later(Duration::from_millis(1000 + i % 5000), || ())).collect();
        for c in &calls {
            c.cancel().unwrap();
        }
        assert!(r.get_delayed_calls().is_empty());
        let rr = r.clone();
        r.call_later(Duration::ZERO, move || rr.stop().unwrap());
        run_reactor(&r);
    }
}

reactor_test! {
    /// seconds() is monotonic and moves.
    fn seconds_is_monotonic(r) {
        let a = r.seconds();
        std::thread::sleep(Duration::from_millis(2));
        let b = r.seconds();
        assert!(b > a);
    }
}

reactor_test! {
    /// The "now" of a deadline lies between the seconds() readings around
    /// the call_later, and neither seconds() nor deadlines ever decrease,
    /// over many readings: long enough for the clock to learn the counter's
    /// rate and re-anchor many times.
    fn deadlines_lie_between_the_seconds_around_them(r) {
        let until = Instant::now() + Duration::from_millis(300);
        let (mut previous_seconds, mut previous_time) = (0.0, 0.0);
        let mut checked = 0u64;
        while Instant::now() < until || checked < 100_000 {
            let before = r.seconds();
            let dc = r.call_later(Duration::ZERO, || ());
            let after = r.seconds();
            let time = dc.time().unwrap();
            dc.cancel().unwrap();
            assert!(before <= time && time <= after, "deadline {time} not within [{before}, {after}]");
            assert!(before >= previous_seconds && time >= previous_time, "time stepped back");
            (previous_seconds, previous_time) = (after, time);
            checked += 1;
            if checked.is_multiple_of(20_000) {
                // Idle gaps, so readings also extrapolate across them.
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

reactor_test! {
    /// §4.6.5: the string form shows the call's identity, the seconds until
    /// it fires and the called/cancelled flags; Debug is the same text.
    fn delayed_call_string_form(r) {
        let a = r.call_later(Duration::from_millis(1500), || ());
        let b = r.call_later(Duration::from_secs(60), || ());
        let shown = a.to_string();
        assert_eq!(without_seconds(&shown), without_seconds(&format!("{a:?}")), "Debug and Display agree");
        assert!(shown.starts_with("<DelayedCall ") && shown.ends_with('>'), "{shown}");
        assert!(shown.contains("called=false cancelled=false"), "{shown}");
        let left = shown_seconds(&shown).unwrap_or_else(|| panic!("no seconds in {shown}"));
        assert!(left > 0.5 && left <= 1.5, "{shown}");
        let identity = |s: &str| s.split_whitespace().nth(1).unwrap().to_string();
        assert_ne!(identity(&shown), identity(&b.to_string()), "two calls show different identities");
        assert_eq!(identity(&shown), identity(&a.clone().to_string()), "a clone shows the same identity");
        b.cancel().unwrap();
        let cancelled = b.to_string();
        assert!(cancelled.contains("called=false cancelled=true") && shown_seconds(&cancelled).is_none(), "{cancelled}");
        a.reset(Duration::ZERO).unwrap();
        let rr = r.clone();
        r.call_later(Duration::from_millis(1), move || rr.stop().unwrap());
        run_reactor(&r);
        let called = a.to_string();
        assert!(called.contains("called=true cancelled=false"), "{called}");
        assert!(!called.contains("created at"), "no stack outside debug mode: {called}");
    }
}

reactor_test! {
    /// §4.6.6: delayed calls order by scheduled time with <, <=, >, >=,
    /// following reset and delay; §4.6.7: each equals only itself.
    // Every operator is tested on purpose, negations of partial orders too.
    #[allow(clippy::nonminimal_bool, clippy::eq_op, clippy::neg_cmp_op_on_partial_ord, clippy::double_comparisons)]
    fn delayed_calls_order_by_scheduled_time(r) {
        let a = r.call_later(Duration::from_secs(1), || ());
        let b = r.call_later(Duration::from_secs(2), || ());
        assert!(a < b && a <= b && b > a && b >= a);
        assert!(!(a > b) && !(a >= b) && !(b < a) && !(b <= a));
        assert!(a <= a && a >= a && !(a < a) && a == a.clone() && a != b);
        a.reset(Duration::from_secs(3)).unwrap();
        assert!(a > b && b < a, "reset moved a after b");
        b.delay(Duration::from_secs(5)).unwrap();
        assert!(a < b, "delay moved b after a");
        // A cancelled call has no place in the order, but equals itself.
        let c = r.call_later(Duration::from_millis(1500), || ());
        c.cancel().unwrap();
        assert_eq!(c.partial_cmp(&a), None);
        assert!(!(c < a) && !(c > a) && c <= c && c == c);
        // Calls of one reactor due at the same moment order as they run.
        let clock = Clock::new();
        let x = clock.call_later(Duration::from_secs(1), || ());
        let y = clock.call_later(Duration::from_secs(1), || ());
        assert!(x < y && y > x && x != y);
        let order = Rc::new(RefCell::new(Vec::new()));
        let calls: Vec<DelayedCall> = (0..20usize)
            .map(|i| {
                let o = order.clone();
                r.call_later(Duration::from_millis((i as u64 * 7) % 10), move || o.borrow_mut().push(i))
            })
            .collect();
        let mut sorted: Vec<usize> = (0..calls.len()).collect();
        sorted.sort_by(|&p, &q| calls[p].partial_cmp(&calls[q]).expect("pending calls of one reactor all compare"));
        let rr = r.clone();
        r.call_later(Duration::from_millis(20), move || rr.stop().unwrap());
        run_reactor(&r);
        assert_eq!(*order.borrow(), sorted, "sorted order is firing order");
    }
}

reactor_test! {
    /// §4.6.8: in debug mode the creation stack (and the closure's type) is
    /// captured and shown; switching debug mode between creation and
    /// printing shows the stack only if it was captured.
    fn debug_mode_shows_the_creation_stack(r) {
        let _turn = DEBUG_MODE.lock().unwrap_or_else(|e| e.into_inner());
        let _off = DebugOff;
        DelayedCall::set_debug(true);
        assert!(DelayedCall::debug());
        let traced = r.call_later(Duration::from_secs(10), || ());
        DelayedCall::set_debug(false);
        let plain = r.call_later(Duration::from_secs(10), || ());
        let shown = traced.to_string();
        assert_eq!(without_seconds(&shown), without_seconds(&format!("{traced:?}")));
        assert!(shown.contains("created at:"), "{shown}");
        assert!(shown.contains("debug_mode_shows_the_creation_stack"), "the stack names the creating test: {shown}");
        assert!(!plain.to_string().contains("created at"), "{plain}");
        // Switching on after creation shows no stack that was never taken;
        // switching off keeps the one that was.
        DelayedCall::set_debug(true);
        assert!(!plain.to_string().contains("created at"), "{plain}");
        DelayedCall::set_debug(false);
        assert!(traced.to_string().contains("created at:"));
        // Still printable once called or cancelled.
        traced.cancel().unwrap();
        assert!(traced.to_string().contains("cancelled=true"));
        plain.reset(Duration::ZERO).unwrap();
        let rr = r.clone();
        r.call_later(Duration::from_millis(1), move || rr.stop().unwrap());
        run_reactor(&r);
        assert!(plain.to_string().contains("called=true"));
    }
}
