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
    use std::os::fd::{AsRawFd, OwnedFd, RawFd};
    use std::rc::Rc;
    use std::sync::Mutex;
    use std::time::Duration;

    use crate::backend::Backend;
    use crate::reactor::{Phase, Reactor};
    use crate::sys::signal::{errno, pretend_handler_running, raise, sigchld_is_default, SignalGuard};
    use crate::sys::waker::Waker;

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

    /// Finds a socket end numbered `number` (just freed, so the next new
    /// descriptor normally takes it; another test thread may take it
    /// first, so a few tries): returns it and its peer.
    fn socket_numbered(number: RawFd) -> (OwnedFd, OwnedFd) {
        use rustix::net::{socketpair, AddressFamily, SocketFlags, SocketType};
        let mut kept = Vec::new();
        for _ in 0..64 {
            let (a, b) = socketpair(AddressFamily::UNIX, SocketType::STREAM, SocketFlags::NONBLOCK, None)
                .expect("socketpair");
            if a.as_raw_fd() == number {
                return (a, b);
            }
            if b.as_raw_fd() == number {
                return (b, a);
            }
            kept.push((a, b));
        }
        panic!("descriptor {number} was not reused: another thread holds it");
    }

    /// True if `fd` has nothing to read.
    fn is_empty(fd: &OwnedFd) -> bool {
        let mut buf = [0u8; 16];
        matches!(rustix::io::read(fd, &mut buf), Err(rustix::io::Errno::AGAIN))
    }

    #[test]
    fn the_handler_never_writes_to_a_closed_and_reused_wake_fd() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let waker = Waker::new().unwrap();
        let number = waker.write_fd();
        let guard = SignalGuard::install(number).unwrap();
        // The reactor's waker closes while the guard still holds its slot
        // (as when its fields are dropped in that order), and an unrelated
        // file takes the number.
        drop(waker);
        let (reused, peer) = socket_numbered(number);
        assert!(!sigchld_is_default(), "the handler is installed");
        raise(libc::SIGCHLD);
        assert_ne!(guard.take_pending() & 1 << libc::SIGCHLD, 0, "the handler ran for this guard");
        assert!(is_empty(&peer), "the handler wrote into descriptor {number}, now an unrelated socket");
        drop(guard);
        assert!(sigchld_is_default());
        drop(reused);
    }

    #[test]
    fn a_guard_closes_its_descriptor_only_after_running_handlers_return() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let waker = Waker::new().unwrap();
        let guard = SignalGuard::install(waker.write_fd()).unwrap();
        // A handler on another thread that has read the slot and not yet
        // returned.
        pretend_handler_running(true);
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let dropper = std::thread::spawn(move || {
            drop(guard);
            done_tx.send(()).unwrap();
        });
        let waited = done_rx.recv_timeout(Duration::from_millis(100)).is_err();
        // Before asserting: a count left up would hang every later guard.
        pretend_handler_running(false);
        assert!(
            waited,
            "the guard was dropped (its descriptor closed) while a handler could still write to it"
        );
        done_rx.recv_timeout(Duration::from_secs(20)).expect("the guard drops once the handler returned");
        dropper.join().unwrap();
        assert!(sigchld_is_default());
    }

    #[test]
    fn the_handler_leaves_errno_as_it_found_it() {
        use rustix::pipe::{pipe_with, PipeFlags};
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        // A full pipe: the handler's write fails, setting errno (EAGAIN).
        let (_read, write) = pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK).unwrap();
        while rustix::io::write(&write, &[0u8; 4096]).is_ok() {}
        let guard = SignalGuard::install(write.as_raw_fd()).unwrap();
        errno::set(libc::EDOM);
        raise(libc::SIGCHLD);
        let after = errno::get();
        assert_ne!(guard.take_pending() & 1 << libc::SIGCHLD, 0, "the handler ran");
        assert_eq!(after, libc::EDOM, "the handler changed errno");
    }

    #[test]
    fn a_reactor_dropped_with_handlers_installed_never_writes_to_its_old_fd() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        /// Dropped with the reactor's extensions: after its waker (a field
        /// before them) and before its signal guard (a field after them),
        /// the window in which the waker's number is closed but a handler
        /// may still run.
        struct Probe {
            number: RawFd,
            seen: Rc<Cell<Option<bool>>>,
        }
        impl Drop for Probe {
            fn drop(&mut self) {
                let (_reused, peer) = socket_numbered(self.number);
                assert!(!sigchld_is_default(), "the reactor's handler is still installed");
                raise(libc::SIGCHLD);
                self.seen.set(Some(is_empty(&peer)));
            }
        }
        for &backend in Backend::ALL {
            let r = Reactor::new(backend).unwrap();
            r.install_signal_handlers();
            assert!(r.signal_handlers_installed());
            let seen = Rc::new(Cell::new(None));
            let number = r.inner.shared.waker.write_fd();
            #[derive(Default)]
            struct ProbeSlot(std::cell::RefCell<Option<Probe>>);
            r.extension::<ProbeSlot>().0.replace(Some(Probe { number, seen: seen.clone() }));
            drop(r);
            let empty = seen.get().expect("the probe ran while the reactor was dropped");
            assert!(
                empty,
                "{backend}: the handler wrote into descriptor {number} after the reactor closed it"
            );
            assert!(sigchld_is_default(), "{backend}: handlers restored");
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
