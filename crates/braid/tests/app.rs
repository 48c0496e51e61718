//! Services and the application runner (Twisted reference §2.12): order of
//! starts and stops, Deferred stops, listeners on endpoints, a client that
//! reconnects, timers. Each test on every backend.

mod common;

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use braid::app::{
    Application, ClientService, MultiService, Retry, Service, StreamServerEndpointService, TimerService,
};
use braid::endpoints::{client_from_string, server_from_string};
use braid::protocol::{IntoFactory, Protocol};
use braid::protocols::echo::Echo;
use braid::{Deferred, Failure, Phase, Reactor, Transport};
use common::collect;

type Log = Rc<RefCell<Vec<String>>>;

/// Logs its start and stop; its stop fires after `stop_delay` if given.
struct Step {
    name: &'static str,
    log: Log,
    running: bool,
    fail_start: bool,
    stop_delay: Option<(Reactor, Duration)>,
}

impl Service for Step {
    fn name(&self) -> Option<&str> {
        Some(self.name)
    }
    fn start_service(&mut self) -> Result<(), Failure> {
        if self.fail_start {
            self.log.borrow_mut().push(format!("fail {}", self.name));
            return Err(Failure::msg(format!("{} cannot start", self.name)));
        }
        self.running = true;
        self.log.borrow_mut().push(format!("start {}", self.name));
        Ok(())
    }
    fn stop_service(&mut self) -> Deferred<()> {
        self.running = false;
        self.log.borrow_mut().push(format!("stop {}", self.name));
        match &self.stop_delay {
            None => Deferred::succeed(()),
            Some((r, delay)) => {
                let d = Deferred::new();
                let (d2, log, name) = (d.clone(), self.log.clone(), self.name);
                r.call_later(*delay, move || {
                    log.borrow_mut().push(format!("stopped {name}"));
                    let _ = d2.callback(());
                });
                d
            }
        }
    }
    fn running(&self) -> bool {
        self.running
    }
}

fn step(name: &'static str, log: &Log) -> Step {
    Step { name, log: log.clone(), running: false, fail_start: false, stop_delay: None }
}

fn run_until(r: &Reactor, done: impl Fn() -> bool) {
    let deadline = Instant::now() + common::WATCHDOG;
    while !done() {
        assert!(Instant::now() < deadline, "watchdog: the condition never held");
        r.iterate(Some(Duration::from_millis(5))).expect("iterate");
    }
}

// §2.12: start in order, stop in reverse, Deferred stops awaited.
reactor_test!(
    fn multiservice_order_and_deferred_stops(r) {
        let log = Log::default();
        let mut all = MultiService::new();
        all.add_service(Box::new(step("a", &log))).unwrap();
        let mut slow = step("b", &log);
        slow.stop_delay = Some((r.clone(), Duration::from_millis(50)));
        all.add_service(Box::new(slow)).unwrap();
        all.add_service(Box::new(step("c", &log))).unwrap();
        all.start_service().unwrap();
        assert!(all.running());
        assert_eq!(*log.borrow(), ["start a", "start b", "start c"]);
        let stopped = collect(&all.stop_service());
        assert!(stopped.borrow().is_none(), "fired before b had stopped");
        let s = stopped.clone();
        run_until(&r, move || s.borrow().is_some());
        assert_eq!(*log.borrow(), ["start a", "start b", "start c", "stop c", "stop b", "stop a", "stopped b"]);
        assert_eq!(*stopped.borrow(), Some(Ok(())));
    }
);

// Duplicate names are refused; a child added to a running collection
// starts at once; remove_service stops it; get_service_named finds it.
reactor_test!(
    fn multiservice_names_and_late_children(r) {
        let _ = r;
        let log = Log::default();
        let mut all = MultiService::named("top");
        assert_eq!(all.name(), Some("top"));
        all.add_service(Box::new(step("a", &log))).unwrap();
        let dup = all.add_service(Box::new(step("a", &log)));
        assert!(dup.is_err_and(|e| e.to_string().contains("\"a\"")), "a duplicate name");
        all.start_service().unwrap();
        all.add_service(Box::new(step("late", &log))).unwrap();
        assert_eq!(log.borrow().last().map(String::as_str), Some("start late"));
        assert!(all.get_service_named("late").is_some_and(|s| s.running()));
        assert!(all.remove_service("late").is_some());
        assert_eq!(log.borrow().last().map(String::as_str), Some("stop late"));
        assert!(all.remove_service("nobody").is_none());
        assert_eq!(all.len(), 1);
    }
);

// A child that fails to start stops those started before it.
reactor_test!(
    fn a_failed_start_is_rolled_back(r) {
        let _ = r;
        let log = Log::default();
        let mut all = MultiService::new();
        all.add_service(Box::new(step("a", &log))).unwrap();
        let mut bad = step("b", &log);
        bad.fail_start = true;
        all.add_service(Box::new(bad)).unwrap();
        all.add_service(Box::new(step("c", &log))).unwrap();
        let err = all.start_service().expect_err("b fails");
        assert!(err.to_string().contains("b cannot start"));
        assert!(!all.running());
        assert_eq!(*log.borrow(), ["start a", "fail b", "stop a"]);
    }
);

// A listener on an endpoint, its address, a port in use at start.
reactor_test!(
    fn stream_server_endpoint_service(r) {
        let ep = server_from_string(&r, "tcp:0:interface=127.0.0.1").unwrap();
        let mut svc = StreamServerEndpointService::new(ep, Echo::new.into_shared());
        svc.start_service().unwrap();
        let addr = svc.address().and_then(|a| a.ip()).unwrap();
        let c = std::thread::spawn(move || {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.write_all(b"svc").unwrap();
            let mut b = [0u8; 3];
            s.read_exact(&mut b).unwrap();
            b
        });
        run_until(&r, || c.is_finished());
        assert_eq!(&c.join().unwrap(), b"svc");
        let busy = server_from_string(&r, &format!("tcp:{}:interface=127.0.0.1", addr.port())).unwrap();
        let mut clash = StreamServerEndpointService::new(busy, Echo::new.into_shared());
        assert!(clash.start_service().is_err_and(|e| e.to_string().contains("cannot listen")));
        let stopped = collect(&svc.stop_service());
        let s = stopped.clone();
        run_until(&r, move || s.borrow().is_some());
        assert!(!svc.running());
        std::net::TcpListener::bind(addr).expect("the port was released");
    }
);

/// Counts connections; closes each one at once if asked.
struct Hello;

impl Protocol for Hello {
    fn connection_made(&mut self, t: Transport) {
        t.write(b"hello");
        t.lose_connection();
    }
    fn data_received(&mut self, _: &[u8]) {}
}

// ClientService: retries until the server exists, reconnects after a
// loss, when_connected gives the current connection; stop ends it all.
reactor_test!(
    fn client_service_reconnects(r) {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let ep = client_from_string(&r, &format!("tcp:127.0.0.1:{port}")).unwrap();
        let retry = Retry { initial: Duration::from_millis(20), factor: 1.5, max: Duration::from_millis(100), jitter: 0.1 };
        struct Quiet;
        impl Protocol for Quiet {
            fn data_received(&mut self, _: &[u8]) {}
        }
        let mut svc = ClientService::new(&r, ep, || Quiet, retry);
        svc.start_service().unwrap();
        let first = collect(&svc.when_connected());
        run_for(&r, Duration::from_millis(150));
        assert!(first.borrow().is_none(), "connected with no server");
        // The server appears: the next retry connects.
        let accepted = Rc::new(RefCell::new(0));
        let a = accepted.clone();
        let listener = r
            .listen_tcp(("127.0.0.1:".to_string() + &port.to_string()).as_str(), move || {
                *a.borrow_mut() += 1;
                Hello
            }, 50)
            .unwrap();
        let f = first.clone();
        run_until(&r, move || f.borrow().is_some());
        assert!(first.borrow().as_ref().unwrap().is_ok());
        // The server closes each connection: the service connects again.
        let a = accepted.clone();
        run_until(&r, move || *a.borrow() >= 3);
        let stopped = collect(&svc.stop_service());
        let s = stopped.clone();
        run_until(&r, move || s.borrow().is_some());
        let count = *accepted.borrow();
        run_for(&r, Duration::from_millis(300));
        assert_eq!(*accepted.borrow(), count, "it went on connecting after stop");
        assert!(!svc.running());
        let later = collect(&svc.when_connected());
        assert!(later.borrow().is_none());
        drop(listener);
    }
);

fn run_for(r: &Reactor, how_long: Duration) {
    let end = Instant::now() + how_long;
    while Instant::now() < end {
        r.iterate(Some(Duration::from_millis(5))).expect("iterate");
    }
}

reactor_test!(
    fn timer_service_ticks_while_running(r) {
        let ticks = Rc::new(RefCell::new(0));
        let t = ticks.clone();
        let mut svc = TimerService::new(&r, Duration::from_millis(10), move || *t.borrow_mut() += 1);
        svc.start_service().unwrap();
        assert_eq!(*ticks.borrow(), 1, "the first call is at start");
        let t = ticks.clone();
        run_until(&r, move || *t.borrow() >= 3);
        drop(svc.stop_service());
        let n = *ticks.borrow();
        run_for(&r, Duration::from_millis(60));
        assert_eq!(*ticks.borrow(), n, "it ticked after stop");
    }
);

// The application starts the tree once the reactor runs and stops it
// before shutdown; the shutdown waits for the stop's Deferred.
reactor_test!(
    fn application_follows_the_reactor(r) {
        let log = Log::default();
        let mut tree = MultiService::new();
        let mut slow = step("svc", &log);
        slow.stop_delay = Some((r.clone(), Duration::from_millis(50)));
        tree.add_service(Box::new(slow)).unwrap();
        let app = Application::new(&r, tree);
        assert!(log.borrow().is_empty(), "started before the reactor ran");
        let l = log.clone();
        r.add_system_event_trigger(Phase::After, "shutdown", move || l.borrow_mut().push("after shutdown".into()));
        let (rr, l) = (r.clone(), log.clone());
        r.call_later(Duration::from_millis(20), move || {
            l.borrow_mut().push("stop".into());
            rr.stop().unwrap();
        });
        common::run_reactor(&r);
        assert_eq!(*log.borrow(), ["start svc", "stop", "stop svc", "stopped svc", "after shutdown"]);
        assert!(app.start_failure().is_none());
    }
);

// A tree that cannot start stops the reactor and says why.
reactor_test!(
    fn application_start_failure_stops_the_reactor(r) {
        let log = Log::default();
        let mut bad = step("bad", &log);
        bad.fail_start = true;
        let app = Application::new(&r, bad);
        common::run_reactor(&r);
        assert!(app.start_failure().is_some_and(|f| f.to_string().contains("bad cannot start")));
    }
);
