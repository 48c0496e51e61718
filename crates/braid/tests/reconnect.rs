//! ReconnectingClientFactory with a fake clock: the reactor makes real
//! (refused, then successful) loopback connections; `testing::Clock`
//! decides when retries happen.

mod common;

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, Instant};

use braid::protocol::{Protocol, ReconnectingClientFactory};
use braid::protocols::echo::Echo;
use braid::testing::Clock;
use braid::{Reactor, ReactorTime, Transport};

/// Iterates the reactor until `done()` or the watchdog.
fn spin_until(r: &Reactor, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + common::WATCHDOG;
    while !done() {
        assert!(Instant::now() < deadline, "condition not reached in time");
        r.iterate(Some(Duration::from_millis(20))).unwrap();
    }
}

fn refused_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Client {
    made: Rc<Cell<u32>>,
    handle: Option<braid::protocol::ReconnectHandle>,
}

impl Protocol for Client {
    fn connection_made(&mut self, t: Transport) {
        self.made.set(self.made.get() + 1);
        if let Some(h) = &self.handle {
            h.reset_delay();
        }
        t.lose_connection();
    }
    fn data_received(&mut self, _data: &[u8]) {}
}

reactor_test! {
    /// Retries follow the clock: nothing happens until it advances; the
    /// un-jittered delay grows by the factor up to the cap; max_retries
    /// stops it.
    fn backoff_follows_the_fake_clock(r) {
        let clock = Clock::new();
        let made = Rc::new(Cell::new(0));
        let m = made.clone();
        let factory = ReconnectingClientFactory::new(Rc::new(clock.clone()) as Rc<dyn ReactorTime>, move || Client { made: m.clone(), handle: None })
            .initial_delay(Duration::from_secs(1))
            .factor(2.0)
            .max_delay(Duration::from_secs(5))
            .jitter(0.0)
            .max_retries(4);
        let handle = factory.handle();
        r.connect_tcp("127.0.0.1", refused_port(), factory, None, None);
        let mut delays = Vec::new();
        for attempt in 1..=4u32 {
            // The attempt fails; a retry is scheduled on the fake clock.
            spin_until(&r, || handle.retries() == attempt && handle.retry_pending());
            delays.push(handle.delay());
            let calls = clock.get_delayed_calls();
            assert_eq!(calls.len(), 1);
            let due = calls[0].time().unwrap() - clock.seconds();
            assert!((due - handle.delay().as_secs_f64()).abs() < 1e-6, "scheduled {due} s ahead");
            // Real time passing does nothing: only the fake clock triggers it.
            for _ in 0..3 {
                r.iterate(Some(Duration::from_millis(5))).unwrap();
            }
            assert_eq!(handle.retries(), attempt);
            clock.advance(handle.delay());
        }
        assert_eq!(delays, [2, 4, 5, 5].map(Duration::from_secs));
        // The fifth failure exceeds max_retries: nothing more is scheduled.
        spin_until(&r, || handle.retries() == 5);
        assert!(!handle.retry_pending() && clock.get_delayed_calls().is_empty());
        assert_eq!(made.get(), 0);
    }
}

reactor_test! {
    /// Jittered delays stay within the cap and spread around the nominal
    /// delay; stop_trying cancels the scheduled retry.
    fn jitter_and_stop_trying(r) {
        let clock = Clock::new();
        let factory = ReconnectingClientFactory::new(Rc::new(clock.clone()) as Rc<dyn ReactorTime>, Echo::new)
            .initial_delay(Duration::from_secs(10))
            .max_delay(Duration::from_secs(60));
        let handle = factory.handle();
        r.connect_tcp("127.0.0.1", refused_port(), factory, None, None);
        let mut seen = Vec::new();
        for attempt in 1..=3u32 {
            spin_until(&r, || handle.retries() == attempt && handle.retry_pending());
            let due = clock.get_delayed_calls()[0].time().unwrap() - clock.seconds();
            assert!((0.0..=60.0).contains(&due), "{due}");
            seen.push(due);
            clock.advance(Duration::from_secs(61));
        }
        // Nominal delays: 27.2, 60 (capped), 60 — jitter moves them.
        assert!(seen.iter().any(|d| (d - 60.0).abs() > 1e-9 || *d < 60.0));
        spin_until(&r, || handle.retries() == 4 && handle.retry_pending());
        handle.stop_trying();
        assert!(!handle.retry_pending());
        assert!(clock.get_delayed_calls().is_empty());
    }
}

reactor_test! {
    /// After the server appears, the retry connects; reset_delay from the
    /// protocol puts the backoff back to the start; a lost connection is
    /// retried too.
    fn reconnects_when_the_server_appears(r) {
        let clock = Clock::new();
        let made = Rc::new(Cell::new(0));
        let handle_slot = Rc::new(RefCell::new(None));
        let (m, hs) = (made.clone(), handle_slot.clone());
        // Reserve a port, free it, and listen there later.
        let port = refused_port();
        let factory = ReconnectingClientFactory::new(Rc::new(clock.clone()) as Rc<dyn ReactorTime>, move || Client {
            made: m.clone(),
            handle: hs.borrow().clone(),
        })
        .jitter(0.0);
        let handle = factory.handle();
        *handle_slot.borrow_mut() = Some(handle.clone());
        r.connect_tcp("127.0.0.1", port, factory, None, None);
        spin_until(&r, || handle.retries() == 1 && handle.retry_pending());
        let listening = match r.listen_tcp(("127.0.0.1".parse::<std::net::IpAddr>().unwrap(), port), Echo::new, 50) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("skipping: port {port} was taken meanwhile ({e})");
                return;
            }
        };
        clock.advance(handle.delay());
        spin_until(&r, || made.get() == 1);
        assert_eq!(handle.retries(), 0, "reset_delay from connection_made");
        // The client closes at once; the lost connection is retried.
        spin_until(&r, || handle.retry_pending());
        assert_eq!(handle.retries(), 1);
        clock.advance(handle.delay());
        spin_until(&r, || made.get() == 2);
        handle.stop_trying();
        listening.stop_listening();
    }
}
