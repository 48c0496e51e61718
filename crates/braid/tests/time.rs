//! Time: call_later and DelayedCall. Twisted reference §4.2 and the
//! DelayedCall items of §4.6, each test on every backend.

mod common;

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, Instant};

use braid::Error;
use common::run_reactor;

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
        assert!(shown.contains("Pending") && shown.contains("due_in_seconds"), "{shown}");
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
