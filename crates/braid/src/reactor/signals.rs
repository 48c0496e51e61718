//! The reactor's side of signal handling: SIGINT and SIGTERM stop it
//! cleanly, SIGCHLD runs the child-exit hooks (process support reaps there).

use super::{guard, Reactor};
use crate::sys::signal::SignalGuard;

impl Reactor {
    pub(super) fn install_signal_handlers(&self) {
        let inner = &self.inner;
        if inner.signals.borrow().is_some() {
            return;
        }
        match SignalGuard::install(inner.shared.waker.write_fd()) {
            Ok(g) => {
                *inner.signals.borrow_mut() = Some(g);
                // Children that exited before the handler existed sent their
                // SIGCHLD into the void: look once now.
                self.run_child_hooks();
            }
            Err(e) => tracing::warn!(target: "braid", "running without signal handlers: {e}"),
        }
    }

    pub(super) fn uninstall_signal_handlers(&self) {
        self.inner.signals.borrow_mut().take();
    }

    /// True while this reactor's signal handlers are installed.
    pub fn signal_handlers_installed(&self) -> bool {
        self.inner.signals.borrow().is_some()
    }

    /// Reads the signals delivered since the last wake-up and acts on them.
    pub(super) fn handle_signals(&self) {
        let pending = match self.inner.signals.borrow().as_ref() {
            Some(g) => g.take_pending(),
            None => return,
        };
        if pending == 0 {
            return;
        }
        for (signum, name) in [(libc::SIGINT, "SIGINT"), (libc::SIGTERM, "SIGTERM")] {
            if pending & (1u64 << signum) != 0 {
                tracing::info!(target: "braid", "received {name}, shutting down");
                self.inner.exit_signal.set(Some(signum));
                if let Err(e) = self.stop() {
                    tracing::info!(target: "braid", "{name} while already shutting down: {e}");
                }
            }
        }
        if pending & (1u64 << libc::SIGCHLD) != 0 {
            self.run_child_hooks();
        }
    }

    /// Registers `f` to run on the reactor thread whenever SIGCHLD arrives
    /// (and once when handlers are installed). Process support uses it to
    /// reap children.
    pub fn add_child_hook(&self, f: impl FnMut() + 'static) {
        self.inner.child_hooks.borrow_mut().push(Box::new(f));
    }

    fn run_child_hooks(&self) {
        let mut hooks = std::mem::take(&mut *self.inner.child_hooks.borrow_mut());
        for hook in hooks.iter_mut() {
            guard::run_logged(
                || "in a child-exit hook".to_string(),
                || {
                    hook();
                    Ok(())
                },
            );
        }
        let mut current = self.inner.child_hooks.borrow_mut();
        hooks.append(&mut current);
        *current = hooks;
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::rc::Rc;
    use std::sync::Mutex;
    use std::time::Duration;

    use crate::backend::Backend;
    use crate::reactor::{Phase, Reactor};
    use crate::sys::signal::{raise, sigchld_is_default};

    /// Signal dispositions are process-wide: one signal test at a time.
    static SERIAL: Mutex<()> = Mutex::new(());

    fn with_watchdog(r: &Reactor) -> crate::reactor::DelayedCall {
        let rr = r.clone();
        r.call_later::<_, ()>(Duration::from_secs(20), move || {
            let _ = rr.stop();
            panic!("watchdog: the signal did not stop the reactor");
        })
    }

    fn stops_cleanly_on(signum: i32) {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        for &backend in Backend::ALL {
            let r = Reactor::new(backend).unwrap();
            assert_eq!(r.exit_signal(), None);
            let shutdown_ran = Rc::new(Cell::new(false));
            let s = shutdown_ran.clone();
            r.add_system_event_trigger(Phase::Before, "shutdown", move || s.set(true));
            r.call_when_running(move || raise(signum));
            let watchdog = with_watchdog(&r);
            r.run().unwrap();
            let _ = watchdog.cancel();
            assert!(shutdown_ran.get(), "{backend}: shutdown triggers ran");
            assert_eq!(r.exit_signal(), Some(signum), "{backend}");
            assert!(sigchld_is_default(), "{backend}: handlers uninstalled when run() returned");
        }
    }

    #[test]
    fn sigterm_stops_the_reactor_cleanly() {
        stops_cleanly_on(libc::SIGTERM);
    }

    #[test]
    fn sigint_stops_the_reactor_cleanly() {
        stops_cleanly_on(libc::SIGINT);
    }

    #[test]
    fn sigchld_runs_child_hooks() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        for &backend in Backend::ALL {
            assert!(sigchld_is_default());
            let r = Reactor::new(backend).unwrap();
            let child = Rc::new(std::cell::RefCell::new(None::<std::process::Child>));
            let (c, rr) = (child.clone(), r.clone());
            let reaped = Rc::new(Cell::new(false));
            let done = reaped.clone();
            r.add_child_hook(move || {
                let exited = c.borrow_mut().as_mut().is_some_and(|ch| matches!(ch.try_wait(), Ok(Some(_))));
                if exited {
                    done.set(true);
                    let _ = rr.stop();
                }
            });
            let (c, rr) = (child.clone(), r.clone());
            r.call_when_running(move || {
                assert!(!sigchld_is_default(), "SIGCHLD handler installed while running");
                assert!(rr.signal_handlers_installed());
                *c.borrow_mut() = Some(std::process::Command::new("true").spawn().unwrap());
            });
            let watchdog = with_watchdog(&r);
            r.run().unwrap();
            let _ = watchdog.cancel();
            assert!(reaped.get(), "{backend}: SIGCHLD woke the reactor and the hook reaped the child");
            assert!(sigchld_is_default());
        }
    }

    #[test]
    fn two_reactors_share_the_handlers() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        // Another thread's reactor holds the handlers too; ours leaving must
        // not uninstall them under it.
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let other = std::thread::spawn(move || {
            let r = Reactor::new(Backend::Poll).unwrap();
            r.call_when_running(move || ready_tx.send(()).unwrap());
            r.run().unwrap();
            r.exit_signal()
        });
        ready_rx.recv().unwrap();
        let r = Reactor::new(Backend::Epoll).unwrap();
        let rr = r.clone();
        r.call_when_running(move || rr.stop().unwrap());
        r.run().unwrap();
        assert!(!sigchld_is_default(), "the other reactor still has handlers");
        // SIGTERM now reaches the other reactor and stops it.
        raise(libc::SIGTERM);
        let got = other.join().unwrap();
        assert_eq!(got, Some(libc::SIGTERM));
        assert!(sigchld_is_default());
    }
}
