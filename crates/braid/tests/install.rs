//! Install semantics: one reactor per thread, installed before first use;
//! the backend comes from the API or from BRAID_REACTOR.

use std::sync::{Mutex, MutexGuard};

use braid::{Backend, Error};

/// The default backend comes from the environment: tests here take turns.
static ENV: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    ENV.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn install_then_reactor_returns_it() {
    let _env = serial();
    std::thread::spawn(|| {
        let installed = braid::install(Backend::Poll).unwrap();
        assert_eq!(installed.backend(), Backend::Poll);
        assert_eq!(braid::reactor().backend(), Backend::Poll);
        assert!(matches!(braid::install(Backend::Epoll), Err(Error::ReactorAlreadyInstalled)));
    })
    .join()
    .unwrap();
}

#[test]
fn first_use_installs_and_later_install_fails() {
    let _env = serial();
    std::thread::spawn(|| {
        let r = braid::try_reactor().unwrap();
        assert!(matches!(braid::install(Backend::Select), Err(Error::ReactorAlreadyInstalled)));
        // The same loop every time on this thread...
        let flag = std::rc::Rc::new(std::cell::Cell::new(false));
        let f = flag.clone();
        r.call_later(std::time::Duration::ZERO, move || f.set(true));
        braid::reactor().iterate(Some(std::time::Duration::ZERO)).unwrap();
        assert!(flag.get());
    })
    .join()
    .unwrap();
    // ...and a separate one on each thread.
    let a = std::thread::spawn(|| braid::install(Backend::Select).map(|r| r.backend())).join().unwrap();
    assert_eq!(a.unwrap(), Backend::Select);
}

#[test]
fn independent_reactors_are_not_installed() {
    let _env = serial();
    std::thread::spawn(|| {
        let _own = braid::Reactor::new(Backend::Select).unwrap();
        assert_eq!(braid::install(Backend::Poll).unwrap().backend(), Backend::Poll);
    })
    .join()
    .unwrap();
}

#[test]
fn backend_names_and_env_var() {
    let _env = serial();
    assert_eq!(Backend::platform_default(), Backend::Epoll);
    std::env::set_var("BRAID_REACTOR", "poll");
    assert_eq!(Backend::from_env().unwrap(), Backend::Poll);
    let from_env = std::thread::spawn(|| braid::try_reactor().map(|r| r.backend())).join().unwrap();
    assert_eq!(from_env.unwrap(), Backend::Poll);
    std::env::set_var("BRAID_REACTOR", "kqueue");
    let err = Backend::from_env().unwrap_err().to_string();
    assert!(err.contains("\"kqueue\"") && err.contains("select, poll, epoll, io_uring"), "{err}");
    let failed = std::thread::spawn(|| braid::try_reactor().err().map(|e| e.to_string())).join().unwrap();
    assert!(failed.is_some_and(|e| e.contains("valid names")));
    std::env::set_var("BRAID_REACTOR", "");
    assert_eq!(Backend::from_env().unwrap(), Backend::platform_default());
    std::env::remove_var("BRAID_REACTOR");
}
