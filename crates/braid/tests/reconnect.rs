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

/// A port bound (with SO_REUSEADDR) but not listening: connecting to it is
/// refused, and it stays reserved while the socket lives.
fn held_port() -> (std::os::fd::OwnedFd, u16) {
    use rustix::net::{AddressFamily, SocketFlags, SocketType};
    let sock = rustix::net::socket_with(AddressFamily::INET, SocketType::STREAM, SocketFlags::CLOEXEC, None)
        .unwrap();
    rustix::net::sockopt::set_socket_reuseaddr(&sock, true).unwrap();
    rustix::net::bind(&sock, &"127.0.0.1:0".parse::<std::net::SocketAddr>().unwrap()).unwrap();
    let addr = std::net::SocketAddr::try_from(rustix::net::getsockname(&sock).unwrap()).unwrap();
    (sock, addr.port())
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
    /// Jitter spreads the delays around the nominal (un-jittered) delay,
    /// each one different, within the bounds the normal variate allows and
    /// never past the cap; stop_trying cancels the scheduled retry.
    fn jitter_and_stop_trying(r) {
        const JITTER: f64 = 0.119_626_565_582_117_36;
        const CAP: f64 = 11.0;
        let clock = Clock::new();
        // Factor 1: every nominal delay is 10 s, so the samples are
        // comparable; the cap sits inside the jitter's reach.
        let factory = ReconnectingClientFactory::new(Rc::new(clock.clone()) as Rc<dyn ReactorTime>, Echo::new)
            .initial_delay(Duration::from_secs(10))
            .factor(1.0)
            .max_delay(Duration::from_secs_f64(CAP));
        let handle = factory.handle();
        r.connect_tcp("127.0.0.1", refused_port(), factory, None, None);
        let mut relative = Vec::new();
        for attempt in 1..=20u32 {
            spin_until(&r, || handle.retries() == attempt && handle.retry_pending());
            let due = clock.get_delayed_calls()[0].time().unwrap() - clock.seconds();
            let nominal = handle.delay().as_secs_f64();
            assert!((nominal - 10.0).abs() < 1e-9, "nominal delay {nominal}");
            // The Box-Muller variate from 53-bit uniforms stays within
            // about 8.6 standard deviations.
            let (lo, hi) = ((nominal * (1.0 - 9.0 * JITTER)).max(0.0), (nominal * (1.0 + 9.0 * JITTER)).min(CAP));
            assert!(due >= lo && due <= hi, "retry {attempt}: {due} s outside [{lo}, {hi}]");
            relative.push(due / nominal - 1.0);
            clock.advance(Duration::from_secs_f64(CAP + 1.0));
        }
        let mut distinct = relative.clone();
        distinct.sort_by(f64::total_cmp);
        distinct.dedup();
        // Only values clamped at the cap may repeat.
        let capped = relative.iter().filter(|d| (**d - (CAP / 10.0 - 1.0)).abs() < 1e-9).count();
        assert!(distinct.len() + capped.saturating_sub(1) == relative.len(), "delays repeat: {relative:?}");
        assert!(capped < relative.len() / 2, "most delays sit at the cap: {relative:?}");
        let mean = relative.iter().sum::<f64>() / relative.len() as f64;
        let sd = (relative.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / (relative.len() - 1) as f64).sqrt();
        assert!(mean.abs() < 0.1, "centred on the nominal delay: mean {mean}, {relative:?}");
        assert!((0.03..=0.3).contains(&sd), "spread {sd} is not the jitter's ({JITTER}): {relative:?}");
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
        // Hold the port with a bound socket that does not listen: connects
        // are refused, no one else can take it, and (both sockets having
        // SO_REUSEADDR) the server can still listen there later.
        let (holder, port) = held_port();
        let factory = ReconnectingClientFactory::new(Rc::new(clock.clone()) as Rc<dyn ReactorTime>, move || Client {
            made: m.clone(),
            handle: hs.borrow().clone(),
        })
        .jitter(0.0);
        let handle = factory.handle();
        *handle_slot.borrow_mut() = Some(handle.clone());
        r.connect_tcp("127.0.0.1", port, factory, None, None);
        spin_until(&r, || handle.retries() == 1 && handle.retry_pending());
        let listening = r
            .listen_tcp(("127.0.0.1".parse::<std::net::IpAddr>().unwrap(), port), Echo::new, 50)
            .unwrap_or_else(|e| panic!("listening on the held port {port}: {e}"));
        drop(holder);
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
