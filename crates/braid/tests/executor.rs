//! The future executor: `Reactor::spawn` / `ensure_deferred` on every
//! backend. Twisted reference §2.7 (coroutines) and §4.14.41 (ensureDeferred).
//!
//! Not ported (Python-only): coroutine/generator type checks (§4.14.21, 41's
//! "rejects anything else": the type system does it), asyncio bridging
//! (§4.14.43), contextvars (§4.14.44) and reference-cycle checks (§4.14.45).

mod common;

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::task::{Context, Poll};
use std::time::Duration;

use braid::defer::ensure_deferred;
use braid::{task, Deferred, Error, Failure, Reactor};
use common::{capture_logs, collect, run_reactor};

/// Like `collect`, and stops the reactor once the result is in.
fn collect_then_stop<T: 'static>(r: &Reactor, d: &Deferred<T>) -> Rc<RefCell<Option<Result<T, String>>>> {
    let out = Rc::new(RefCell::new(None));
    let (o, rr) = (out.clone(), r.clone());
    let _sink: Deferred<()> = d.then(move |r| {
        *o.borrow_mut() = Some(r.map_err(|f| f.to_string()));
        rr.stop()?;
        Ok(())
    });
    out
}

/// Sets a flag when dropped.
struct DropGuard(Rc<Cell<bool>>);

impl Drop for DropGuard {
    fn drop(&mut self) {
        self.0.set(true);
    }
}

fn stop_soon(r: &Reactor) {
    let rr = r.clone();
    r.call_later(Duration::from_millis(1), move || rr.stop());
}

reactor_test! {
    /// A future awaits a Deferred that a timer fires; the spawned Deferred
    /// gets the future's result.
    fn awaits_deferred_fired_by_call_later(r) {
        let d: Deferred<u32> = Deferred::new();
        let d2 = d.clone();
        r.call_later(Duration::from_millis(5), move || d2.callback(20));
        let rr = r.clone();
        let out = r.spawn(async move {
            let n = d.await?;
            rr.stop()?;
            Ok(n + 1)
        });
        assert!(!out.called(), "pending until the timer fires");
        let got = collect(&out);
        run_reactor(&r);
        assert_eq!(*got.borrow(), Some(Ok(21)));
        assert_eq!(r.pending_tasks(), 0);
    }
}

reactor_test! {
    /// A future awaits another spawned future (and a Deferred chain waits
    /// on a spawned future's Deferred), so Deferreds and futures mix.
    fn awaits_another_spawned_future(r) {
        let rr = r.clone();
        let inner = r.spawn(async move {
            task::sleep(&rr, Duration::from_millis(2)).await?;
            Ok(String::from("inner"))
        });
        let rr = r.clone();
        let outer = r.spawn(async move {
            let s = inner.await?;
            let more = rr.spawn(async { Ok(3usize) }).await?;
            Ok(format!("{s}+{more}"))
        });
        // A callback that returns a spawned future's Deferred: the chain
        // waits for it.
        let rr = r.clone();
        let chained: Deferred<String> = Deferred::succeed(String::from("x"));
        chained.add_callback(move |x| {
            let rrr = rr.clone();
            rr.spawn(async move {
                task::sleep(&rrr, Duration::from_millis(1)).await?;
                Ok(x + "y")
            })
        });
        // Both results, then stop: a future awaiting two Deferreds.
        let both = r.spawn(async move { Ok((outer.await?, chained.await?)) });
        let got = collect_then_stop(&r, &both);
        run_reactor(&r);
        assert_eq!(*got.borrow(), Some(Ok(("inner+3".to_string(), "xy".to_string()))));
    }
}

reactor_test! {
    /// Cancelling the returned Deferred drops the future at once and fails
    /// the Deferred with Cancelled; the future never resumes.
    fn cancel_drops_the_future(r) {
        let dropped = Rc::new(Cell::new(false));
        let resumed = Rc::new(Cell::new(false));
        let never: Deferred<()> = Deferred::new();
        let (guard, res, wait) = (DropGuard(dropped.clone()), resumed.clone(), never.clone());
        let d = r.spawn(async move {
            let _guard = guard;
            wait.await?;
            res.set(true);
            Ok(())
        });
        assert_eq!(r.pending_tasks(), 1);
        let got = collect(&d);
        d.cancel();
        assert!(dropped.get(), "future dropped by cancel");
        assert_eq!(r.pending_tasks(), 0);
        assert_eq!(*got.borrow(), Some(Err("cancelled".to_string())));
        // Firing what it awaited wakes nobody and changes nothing.
        never.callback(()).unwrap();
        stop_soon(&r);
        run_reactor(&r);
        assert!(!resumed.get());
        // Cancelling again, or cancelling a finished task, does nothing.
        d.cancel();
        let done = r.spawn(async { Ok(1) });
        done.cancel();
        assert_eq!(*collect(&done).borrow(), Some(Ok(1)));
    }
}

reactor_test! {
    /// A future that cancels its own Deferred while it runs is dropped when
    /// that poll returns, not during it.
    fn cancel_from_inside_the_future(r) {
        let slot: Rc<RefCell<Option<Deferred<()>>>> = Rc::new(RefCell::new(None));
        let dropped = Rc::new(Cell::new(false));
        let (s, guard) = (slot.clone(), DropGuard(dropped.clone()));
        let gate: Deferred<()> = Deferred::new();
        let g = gate.clone();
        let seen_alive = Rc::new(Cell::new(false));
        let alive = seen_alive.clone();
        let dropped2 = dropped.clone();
        let d = r.spawn(async move {
            let _guard = guard;
            g.await?;
            let me = s.borrow_mut().take();
            if let Some(me) = me {
                me.cancel();
            }
            alive.set(!dropped2.get());
            std::future::pending::<()>().await;
            Ok(())
        });
        *slot.borrow_mut() = Some(d.clone());
        let got = collect_then_stop(&r, &d);
        let g = gate.clone();
        r.call_later(Duration::from_millis(1), move || g.callback(()));
        run_reactor(&r);
        assert!(seen_alive.get(), "not dropped while running");
        assert!(dropped.get(), "dropped after the poll");
        assert_eq!(*got.borrow(), Some(Err("cancelled".to_string())));
        assert_eq!(r.pending_tasks(), 0);
    }
}

reactor_test! {
    /// A panic in the future errbacks its Deferred with Panicked; the
    /// reactor goes on.
    fn panic_errbacks_with_panicked(r) {
        let rr = r.clone();
        let d: Deferred<u32> = r.spawn(async move {
            task::sleep(&rr, Duration::from_millis(1)).await?;
            panic!("boom in a future");
        });
        let failure: Rc<RefCell<Option<Failure>>> = Rc::new(RefCell::new(None));
        let (f, rr) = (failure.clone(), r.clone());
        d.add_errback(move |e| {
            *f.borrow_mut() = Some(e);
            rr.stop()?;
            Ok(0)
        });
        // A panic in the first poll (inside spawn) is caught as well.
        let early = r.spawn(async { if true { panic!("early") } Ok(()) });
        let early_got = collect(&early);
        run_reactor(&r);
        let failure = failure.borrow().clone().expect("errback ran");
        match failure.braid_error() {
            Some(Error::Panicked(msg)) => assert!(msg.contains("boom in a future"), "{msg}"),
            other => panic!("expected Panicked, got {other:?}"),
        }
        assert!(matches!(&*early_got.borrow(), Some(Err(m)) if m.contains("early")));
        assert_eq!(r.pending_tasks(), 0);
    }
}

reactor_test! {
    /// A Deferred fired from another thread (through call_from_thread)
    /// wakes the future that awaits it.
    fn wake_from_another_thread_via_call_from_thread(r) {
        thread_local! {
            static SLOT: RefCell<Option<Deferred<u64>>> = const { RefCell::new(None) };
        }
        let d: Deferred<u64> = Deferred::new();
        SLOT.with(|s| *s.borrow_mut() = Some(d.clone()));
        let remote = r.remote();
        let rr = r.clone();
        let out = r.spawn(async move {
            let from_thread = d.await?;
            let pooled = rr.defer_to_thread(|| Ok::<_, Failure>(7u64)).await?;
            rr.stop()?;
            Ok(from_thread + pooled)
        });
        let got = collect(&out);
        let worker = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(5));
            remote
                .call_from_thread(|_| {
                    // Runs on the reactor thread, where the Deferred lives.
                    let d = SLOT.with(|s| s.borrow_mut().take()).expect("deferred parked");
                    d.callback(35).unwrap();
                })
                .unwrap();
        });
        run_reactor(&r);
        worker.join().unwrap();
        assert_eq!(*got.borrow(), Some(Ok(42)));
    }
}

/// A future whose first poll hands its waker to another thread, which
/// wakes it: checks that the executor's waker is really Send + Sync.
struct WokenByThread {
    flag: Arc<AtomicBool>,
    started: bool,
}

impl Future for WokenByThread {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.flag.load(Ordering::SeqCst) {
            return Poll::Ready(());
        }
        if !self.started {
            self.started = true;
            let (flag, waker) = (self.flag.clone(), cx.waker().clone());
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(5));
                flag.store(true, Ordering::SeqCst);
                waker.wake();
            });
        }
        Poll::Pending
    }
}

reactor_test! {
    /// The std Waker handed to futures can be woken from any thread.
    fn std_waker_wakes_from_another_thread(r) {
        let rr = r.clone();
        let d = r.spawn(async move {
            WokenByThread { flag: Arc::new(AtomicBool::new(false)), started: false }.await;
            rr.stop()?;
            Ok("woken")
        });
        let got = collect(&d);
        run_reactor(&r);
        assert_eq!(*got.borrow(), Some(Ok("woken")));
    }
}

reactor_test! {
    /// A future that is ready at once fires its Deferred inside spawn (it
    /// runs up to its first pending await right away), as does one awaiting
    /// an already-fired Deferred; `Err` errbacks.
    fn ready_future_fires_inside_spawn(r) {
        let ran = Rc::new(Cell::new(false));
        let flag = ran.clone();
        let d = r.spawn(async move {
            flag.set(true);
            Deferred::succeed(5).await
        });
        assert!(ran.get());
        assert!(d.called());
        assert_eq!(*collect(&d).borrow(), Some(Ok(5)));

        let failed: Deferred<()> = r.spawn(async { Err(Failure::new(Error::TimedOut)) });
        assert_eq!(*collect(&failed).borrow(), Some(Err("timed out".to_string())));

        // `?` converts any error type into a Failure.
        let parsed: Deferred<i32> = r.spawn(async { Ok("12".parse::<i32>()? * 2) });
        assert_eq!(*collect(&parsed).borrow(), Some(Ok(24)));
        assert_eq!(r.pending_tasks(), 0);
    }
}

reactor_test! {
    /// ensure_deferred is spawn; many tasks spawned before the reactor runs
    /// all finish once it does.
    fn ensure_deferred_and_many_tasks(r) {
        let total = Rc::new(Cell::new(0u32));
        let mut all = Vec::new();
        for i in 0..50u32 {
            let (rr, t) = (r.clone(), total.clone());
            all.push(ensure_deferred(&r, async move {
                task::sleep(&rr, Duration::from_millis(u64::from(i % 5))).await?;
                t.set(t.get() + i);
                Ok(i)
            }));
        }
        assert_eq!(r.pending_tasks(), 50);
        let rr = r.clone();
        let list = braid::defer::gather_results(all);
        list.add_callback(move |v| {
            rr.stop().unwrap();
            Ok(v)
        });
        let got = collect(&list);
        run_reactor(&r);
        assert_eq!(total.get(), (0..50).sum::<u32>());
        assert_eq!(got.borrow().as_ref().unwrap().as_ref().unwrap().len(), 50);
        assert_eq!(r.pending_tasks(), 0);
    }
}

reactor_test! {
    /// A waker kept past the reactor's life is harmless to use.
    fn waker_after_reactor_dropped(r) {
        let (tx, rx) = mpsc::channel();
        struct Grab(Option<mpsc::Sender<std::task::Waker>>);
        impl Future for Grab {
            type Output = ();
            fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
                if let Some(tx) = self.0.take() {
                    tx.send(cx.waker().clone()).unwrap();
                }
                Poll::Pending
            }
        }
        let d = r.spawn(async move {
            Grab(Some(tx)).await;
            Ok(())
        });
        let waker = rx.recv().unwrap();
        d.cancel();
        drop(d);
        drop(r);
        std::thread::spawn(move || waker.wake()).join().unwrap();
    }
}

reactor_test! {
    /// blocking_call_from_thread hands the result over without leaving a
    /// failure in the chain: nothing is logged as unhandled.
    fn blocking_call_from_thread_logs_nothing(r) {
        let remote = r.remote();
        let (tx, rx) = mpsc::channel();
        let (_, logs) = capture_logs(|| {
            r.call_in_thread(move || {
                let ok = remote.blocking_call_from_thread(|_| Deferred::succeed(1u8));
                let failed = remote.blocking_call_from_thread(|_| Deferred::<u8>::fail(Error::TimedOut));
                tx.send((ok.unwrap(), failed.unwrap_err().to_string())).unwrap();
                remote.call_from_thread(|r| r.stop().unwrap()).unwrap();
            });
            run_reactor(&r);
        });
        assert_eq!(rx.recv().unwrap(), (1, "timed out".to_string()));
        assert!(!logs.contains("Unhandled error"), "{logs}");
    }
}

/// Wakes itself and returns Pending `n` times (a cooperative yield).
struct YieldTimes(u32);

impl Future for YieldTimes {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 == 0 {
            return Poll::Ready(());
        }
        self.0 -= 1;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

reactor_test! {
    /// A future that wakes itself is polled again on a later iteration,
    /// not in a loop inside the wake: timers keep running meanwhile.
    fn self_wake_yields_to_the_loop(r) {
        let ticks = Rc::new(Cell::new(0u32));
        let t = ticks.clone();
        let lc = task::LoopingCall::new(r.clone(), move || t.set(t.get() + 1));
        lc.start(Duration::ZERO, true).unwrap();
        let start_iter = r.iterations();
        let rr = r.clone();
        let d = r.spawn(async move {
            YieldTimes(20).await;
            Ok(rr.iterations())
        });
        assert!(!d.called(), "the first poll yields");
        let got = collect_then_stop(&r, &d);
        run_reactor(&r);
        lc.stop().unwrap();
        let end_iter = match *got.borrow() {
            Some(Ok(n)) => n,
            ref other => panic!("{other:?}"),
        };
        assert!(end_iter - start_iter >= 20, "one poll per iteration at most");
        assert!(ticks.get() >= 20, "the zero-interval loop ran alongside: {}", ticks.get());
    }
}
