//! Services (Twisted's `twisted.application`): long-running parts of a
//! program that start and stop as a tree, and the runner that ties the
//! tree to the reactor's life.
//!
//! A [`Service`] starts (`start_service`) and stops (`stop_service`, which
//! may return a Deferred that fires when it has really stopped). A
//! [`MultiService`] starts its children in the order they were added and
//! stops them in reverse, waiting for every child's Deferred. The ready-made
//! services are in [`services`]. [`Application`] starts a tree once the
//! reactor runs and stops it in the *before shutdown* phase, so the
//! reactor does not stop until the services have (Twisted's
//! `startApplication`).

pub mod services;

use std::cell::RefCell;
use std::rc::Rc;

use crate::defer::{gather_results, Deferred};
use crate::error::{Error, Failure};
use crate::reactor::{log_failure, Phase, Reactor};

pub use services::{ClientService, Retry, StreamServerEndpointService, TimerService};

/// A part of a program with a start and a stop (Twisted's `IService`).
pub trait Service {
    /// The name it has among its siblings, if any.
    fn name(&self) -> Option<&str> {
        None
    }

    /// Starts it. An error means it did not start (a port in use, say).
    fn start_service(&mut self) -> Result<(), Failure>;

    /// Stops it; the Deferred fires once it has stopped.
    fn stop_service(&mut self) -> Deferred<()>;

    /// True between a successful start and the stop.
    fn running(&self) -> bool;
}

/// Services started and stopped together (Twisted's `MultiService`).
#[derive(Default)]
pub struct MultiService {
    name: Option<String>,
    children: Vec<Box<dyn Service>>,
    running: bool,
}

impl MultiService {
    /// An empty collection.
    pub fn new() -> MultiService {
        MultiService::default()
    }

    /// An empty collection with a name.
    pub fn named(name: impl Into<String>) -> MultiService {
        MultiService { name: Some(name.into()), ..MultiService::default() }
    }

    /// Adds a child; it starts at once if the collection is running. A
    /// second child of the same name is refused.
    pub fn add_service(&mut self, mut service: Box<dyn Service>) -> Result<(), Failure> {
        if let Some(name) = service.name() {
            if self.children.iter().any(|c| c.name() == Some(name)) {
                return Err(Failure::new(Error::io(
                    "adding a service",
                    std::io::Error::new(
                        std::io::ErrorKind::AlreadyExists,
                        format!("a service named {name:?} exists"),
                    ),
                )));
            }
        }
        if self.running {
            service.start_service()?;
        }
        self.children.push(service);
        Ok(())
    }

    /// Removes the child named `name`, stopping it if running; `None` if
    /// there is none.
    pub fn remove_service(&mut self, name: &str) -> Option<Deferred<()>> {
        let i = self.children.iter().position(|c| c.name() == Some(name))?;
        let mut child = self.children.remove(i);
        Some(if child.running() { child.stop_service() } else { Deferred::succeed(()) })
    }

    /// The child named `name`.
    pub fn get_service_named(&mut self, name: &str) -> Option<&mut (dyn Service + 'static)> {
        self.children.iter_mut().find(|c| c.name() == Some(name)).map(|c| &mut **c)
    }

    /// How many children there are.
    pub fn len(&self) -> usize {
        self.children.len()
    }

    /// True without children.
    pub fn is_empty(&self) -> bool {
        self.children.is_empty()
    }
}

impl Service for MultiService {
    fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// Starts the children in order; if one fails, those already started
    /// are stopped again (in reverse) and its error is returned.
    fn start_service(&mut self) -> Result<(), Failure> {
        for i in 0..self.children.len() {
            if let Err(e) = self.children[i].start_service() {
                for started in self.children[..i].iter_mut().rev() {
                    drop(started.stop_service());
                }
                return Err(e);
            }
        }
        self.running = true;
        Ok(())
    }

    /// Stops the children in reverse order; fires once all have stopped
    /// (with the first failure, if any failed).
    fn stop_service(&mut self) -> Deferred<()> {
        self.running = false;
        let stops: Vec<Deferred<()>> =
            self.children.iter_mut().rev().filter(|c| c.running()).map(|c| c.stop_service()).collect();
        gather_results(stops).then(|r| r.map(|_| ()))
    }

    fn running(&self) -> bool {
        self.running
    }
}

/// A service tree tied to a reactor (Twisted's `Application` with
/// `startApplication`): started once the reactor runs, stopped in the
/// *before shutdown* phase (the reactor waits for the stop's Deferred).
#[derive(Clone)]
pub struct Application {
    inner: Rc<RefCell<AppState>>,
}

struct AppState {
    service: Box<dyn Service>,
    failure: Option<Failure>,
}

impl Application {
    /// Ties `service` to `reactor`. If it fails to start, the failure is
    /// logged and kept ([`start_failure`](Application::start_failure)) and
    /// the reactor is stopped.
    pub fn new(reactor: &Reactor, service: impl Service + 'static) -> Application {
        let app = Application {
            inner: Rc::new(RefCell::new(AppState { service: Box::new(service), failure: None })),
        };
        let (a, r) = (app.clone(), reactor.clone());
        reactor.call_when_running(move || {
            let started = a.inner.borrow_mut().service.start_service();
            if let Err(f) = started {
                log_failure("starting the application's services", &f);
                a.inner.borrow_mut().failure = Some(f);
                let _ = r.stop();
            }
        });
        app.stop_before_shutdown(reactor);
        app
    }

    fn stop_before_shutdown(&self, reactor: &Reactor) {
        let a = self.clone();
        reactor.add_system_event_trigger(Phase::Before, "shutdown", move || {
            let mut state = a.inner.borrow_mut();
            if state.service.running() {
                state.service.stop_service()
            } else {
                Deferred::succeed(())
            }
        });
    }

    /// Starts `service` now, before the reactor runs (as Twisted's
    /// `privilegedStartService` listens before the loop starts, so a port in
    /// use is an error here rather than later), and stops it in the
    /// reactor's *before shutdown* phase.
    pub fn start(reactor: &Reactor, mut service: impl Service + 'static) -> Result<Application, Failure> {
        service.start_service()?;
        let app = Application {
            inner: Rc::new(RefCell::new(AppState { service: Box::new(service), failure: None })),
        };
        app.stop_before_shutdown(reactor);
        Ok(app)
    }

    /// Why the services did not start, if they did not.
    pub fn start_failure(&self) -> Option<Failure> {
        self.inner.borrow().failure.clone()
    }

    /// Runs `f` with the service tree.
    pub fn with_service<R>(&self, f: impl FnOnce(&mut dyn Service) -> R) -> R {
        f(&mut *self.inner.borrow_mut().service)
    }
}
