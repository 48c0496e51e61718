//! Threads: call_from_thread, the thread pool, defer_to_thread,
//! blocking_call_from_thread. Twisted reference §4.3, on every backend.

mod common;

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use braid::{Deferred, Error, Failure, Reactor};
use common::run_reactor;

reactor_test! {
    /// §4.3.1: the pool starts when run() starts and is stopped and joined
    /// before run() returns.
    fn pool_lives_for_the_run(r) {
        let done = Arc::new(AtomicUsize::new(0));
        let d = done.clone();
        r.call_in_thread(move || {
            std::thread::sleep(Duration::from_millis(20));
            d.fetch_add(1, Ordering::SeqCst);
        });
        assert!(r.has_thread_pool() && !r.thread_pool_running());
        let seen = Rc::new(Cell::new(false));
        let (s, rr) = (seen.clone(), r.clone());
        r.call_when_running(move || {
            s.set(rr.thread_pool_running());
            rr.stop().unwrap();
        });
        run_reactor(&r);
        assert!(seen.get(), "pool running once the reactor runs");
        assert_eq!(done.load(Ordering::SeqCst), 1, "job finished before run() returned");
        assert!(!r.has_thread_pool(), "pool torn down at shutdown");
    }
}

reactor_test! {
    /// §4.3.2
    fn suggest_thread_pool_size(r) {
        r.suggest_thread_pool_size(3);
        assert_eq!(r.thread_pool_size(), 3);
        // The size is respected: 6 jobs that wait for each other in pairs of
        // 3 never see more than 3 at once.
        let live = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        for _ in 0..6 {
            let (l, p) = (live.clone(), peak.clone());
            r.call_in_thread(move || {
                let now = l.fetch_add(1, Ordering::SeqCst) + 1;
                p.fetch_max(now, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(10));
                l.fetch_sub(1, Ordering::SeqCst);
            });
        }
        let rr = r.clone();
        r.call_when_running(move || rr.stop().unwrap());
        run_reactor(&r);
        assert!(peak.load(Ordering::SeqCst) <= 3);
        assert!(peak.load(Ordering::SeqCst) >= 1);
    }
}

reactor_test! {
    /// §4.3.3: call_from_thread made on the reactor thread inside a timer
    /// wakes the loop: it runs on the next iteration, not after the next
    /// (distant) timer.
    fn call_from_thread_in_timer_wakes_loop(r) {
        r.call_later(Duration::from_secs(60), || ());
        let start = Instant::now();
        let rr = r.clone();
        r.call_later(Duration::ZERO, move || {
            rr.call_from_thread(|r| r.stop().unwrap());
        });
        run_reactor(&r);
        assert!(start.elapsed() < Duration::from_secs(10));
    }
}

reactor_test! {
    /// §4.3.4: a foreign thread's call runs on the reactor thread, and wakes
    /// a reactor that has nothing else to wake it.
    fn call_from_foreign_thread(r) {
        let remote = r.remote();
        let ran_on = Arc::new(std::sync::Mutex::new(None));
        let seen = ran_on.clone();
        let handle = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            remote
                .call_from_thread(move |r| {
                    *seen.lock().unwrap() = Some((std::thread::current().id(), r.is_in_io_thread()));
                    r.stop().unwrap();
                })
                .unwrap();
            std::thread::current().id()
        });
        run_reactor(&r);
        let caller = handle.join().unwrap();
        let (thread, in_io_thread) = ran_on.lock().unwrap().take().expect("the call ran");
        assert_eq!(thread, std::thread::current().id(), "ran on the reactor thread");
        assert_ne!(thread, caller, "not on the thread that queued it");
        assert!(in_io_thread);
    }
}

reactor_test! {
    /// Calls from threads run in the order they were queued.
    fn calls_from_threads_keep_order(r) {
        let remote = r.remote();
        let (tx, rx) = mpsc::channel::<usize>();
        std::thread::spawn(move || {
            for i in 0..1000 {
                let tx = tx.clone();
                remote.call_from_thread(move |_| tx.send(i).unwrap()).unwrap();
            }
            remote.call_from_thread(|r| r.stop().unwrap()).unwrap();
        });
        run_reactor(&r);
        let got: Vec<usize> = rx.try_iter().collect();
        assert_eq!(got, (0..1000).collect::<Vec<_>>());
    }
}

reactor_test! {
    /// Calls queued from threads during a pass run on the next pass, so a
    /// call that keeps re-queueing itself cannot starve timers or I/O.
    fn thread_calls_do_not_starve_io(r) {
        fn again(r: &Reactor, n: Arc<AtomicUsize>) {
            n.fetch_add(1, Ordering::SeqCst);
            let n2 = n.clone();
            r.call_from_thread(move |r| again(r, n2));
        }
        let count = Arc::new(AtomicUsize::new(0));
        let c = count.clone();
        r.call_from_thread(move |r| again(r, c));
        let (rd, wr) = common::pipe();
        struct Stopper(std::os::fd::OwnedFd, Reactor);
        impl braid::FileDescriptor for Stopper {
            fn fileno(&self) -> std::os::fd::RawFd {
                common::raw(&self.0)
            }
            fn do_read(&self) -> Result<(), Failure> {
                let _ = self.1.stop();
                Ok(())
            }
            fn connection_lost(&self, _: Failure) {}
        }
        r.add_reader(Rc::new(Stopper(rd, r.clone()))).unwrap();
        common::write_byte(&wr);
        run_reactor(&r);
        let n = count.load(Ordering::SeqCst);
        assert!((1..100).contains(&n), "{n} passes of the self-requeueing call before I/O was served");
    }
}

reactor_test! {
    /// §4.3.5: a pool created before run() is torn down at shutdown.
    fn stop_thread_pool(r) {
        r.call_in_thread(|| ());
        assert!(r.has_thread_pool());
        let rr = r.clone();
        r.call_when_running(move || rr.stop().unwrap());
        run_reactor(&r);
        assert!(!r.has_thread_pool());
    }
}

reactor_test! {
    /// §4.3.6: so is a pool created after the reactor started.
    fn stop_thread_pool_when_started_after_run(r) {
        let rr = r.clone();
        r.call_when_running(move || {
            rr.call_in_thread(|| ());
            assert!(rr.thread_pool_running());
            rr.stop().unwrap();
        });
        run_reactor(&r);
        assert!(!r.has_thread_pool());
    }
}

reactor_test! {
    /// §4.3.7: firing shutdown on a reactor that never ran still tears the
    /// pool down.
    fn clean_up_thread_pool_before_run(r) {
        r.call_in_thread(|| ());
        r.fire_system_event("shutdown");
        assert!(!r.has_thread_pool());
    }
}

reactor_test! {
    /// §4.3.8 and §4.3.9
    fn is_in_io_thread(r) {
        assert!(r.is_in_io_thread());
        let remote = r.remote();
        let elsewhere = std::thread::spawn(move || remote.is_in_io_thread()).join().unwrap();
        assert!(!elsewhere);
    }
}

reactor_test! {
    /// defer_to_thread delivers a value, an error, and a panic (as a
    /// failure) to Deferreds on the reactor thread.
    fn defer_to_thread_results(r) {
        let got = Rc::new(RefCell::new(Vec::new()));
        let ok: Deferred<u32> = r.defer_to_thread(|| Ok::<_, Error>(6 * 7));
        let err: Deferred<u32> = r.defer_to_thread(|| Err(Error::TimedOut));
        let boom: Deferred<u32> = r.defer_to_thread(|| -> Result<u32, Error> { panic!("worker exploded") });
        let remaining = Rc::new(Cell::new(3));
        for d in [ok, err, boom] {
            let (g, rem, rr) = (got.clone(), remaining.clone(), r.clone());
            d.add_both(move |res| {
                assert!(rr.is_in_io_thread());
                g.borrow_mut().push(match &res {
                    Ok(v) => v.to_string(),
                    Err(f) => f.to_string(),
                });
                rem.set(rem.get() - 1);
                if rem.get() == 0 {
                    rr.stop().unwrap();
                }
                Ok(0)
            });
        }
        run_reactor(&r);
        let mut got = got.borrow().clone();
        got.sort();
        assert_eq!(got, ["42", "callback panicked: worker exploded", "timed out"]);
    }
}

reactor_test! {
    /// blocking_call_from_thread returns the Deferred's result to the
    /// calling thread, and refuses to deadlock on the reactor thread.
    fn blocking_call_from_thread(r) {
        let remote = r.remote();
        assert!(remote.blocking_call_from_thread(|_| Deferred::succeed(1)).is_err());
        let (tx, rx) = mpsc::channel();
        r.call_in_thread(move || {
            let value = remote.blocking_call_from_thread(|r| {
                let d = Deferred::new();
                let d2 = d.clone();
                r.call_later(Duration::from_millis(5), move || d2.callback(String::from("later")).unwrap());
                d
            });
            let failed = remote.blocking_call_from_thread(|_| Deferred::<u8>::fail(Error::TimedOut));
            tx.send((value.unwrap(), failed.unwrap_err().to_string())).unwrap();
            remote.call_from_thread(|r| r.stop().unwrap()).unwrap();
        });
        run_reactor(&r);
        assert_eq!(rx.recv().unwrap(), ("later".to_string(), "timed out".to_string()));
    }
}

#[test]
fn remote_after_reactor_dropped_is_an_error() {
    let r = common::build(braid::Backend::platform_default());
    let remote = r.remote();
    drop(r);
    assert!(matches!(remote.call_from_thread(|_| ()), Err(Error::ReactorGone)));
}

#[test]
fn remote_is_send_and_sync() {
    fn check<T: Send + Sync + Clone>() {}
    check::<braid::Remote>();
}
