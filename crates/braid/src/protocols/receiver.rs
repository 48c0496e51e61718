//! What every framing receiver shares: the transport, pausing, and the
//! re-entrancy guard.
//!
//! A receiver (lines, netstrings, length prefixes) is a [`Protocol`](crate::Protocol) that
//! owns a pure decoder and the user's handler, kept together in one
//! `Rc<RefCell<..>>` so a [`ReceiverHandle`] can reach them later, from a
//! timer or from another connection (a proxy registering the receiver as
//! its producer), the way Twisted code calls `resumeProducing` on a
//! protocol.
//!
//! Re-entrancy: while the handler runs, the receiver is borrowed. Bytes
//! that arrive through a handle during that time (a synchronous loopback
//! delivering the peer's answer, say) are only appended to a side buffer,
//! and pause/resume/stop asked through a handle are recorded; both are
//! taken up as soon as the callback returns, in order, by the loop that
//! was already delivering. Twisted's `_busyReceiving` flag, made
//! structural.
//!
//! Pausing (Twisted's `_PauseableMixin`): `pause_producing` stops the
//! delivery of messages and pauses the transport; `resume_producing`
//! resumes the transport and delivers what was buffered meanwhile, at
//! once; `stop_producing` stops both for good. Once the transport is
//! closing (after `lose_connection` or an abort), no more messages are
//! delivered and further input is dropped.

use std::cell::{Cell, RefCell};
use std::rc::{Rc, Weak};

use crate::error::Failure;
use crate::transport::{Producer, Transport};

/// Whether a receiver delivers messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    /// Delivering (the initial state, and after `resume_producing`).
    Running,
    /// Buffering without delivering, transport paused.
    Paused,
    /// Stopped for good by `stop_producing`.
    Stopped,
}

/// What a receiver does with bytes: the part that differs between kinds.
pub(crate) trait Engine: 'static {
    /// The transport is set: greet the handler.
    fn connection_made(&mut self, ctl: Ctl<'_>);
    /// Buffers input (not called once the transport is closing).
    fn push(&mut self, data: &[u8]);
    /// Delivers complete messages until none is left or
    /// [`Ctl::may_deliver`] says stop.
    fn pump(&mut self, ctl: Ctl<'_>);
    /// New input while connected: buffers it and delivers (an engine may
    /// parse it in place instead).
    fn receive(&mut self, data: &[u8], ctl: Ctl<'_>) {
        self.push(data);
        self.pump(ctl);
    }
    /// The connection is gone.
    fn connection_lost(&mut self, reason: Failure);
}

/// The receiver seen from a handle, without its engine's type.
trait Driver {
    fn feed(&self, data: &[u8]);
    fn change_flow(&self, to: Flow);
}

/// The part of a receiver's state that contexts reach: borrowed for one
/// callback.
pub(crate) struct Ctl<'a> {
    pub(crate) transport: &'a Transport,
    flow: &'a mut Flow,
    /// A flow change asked for through a handle during a callback.
    wanted: &'a Cell<Option<Flow>>,
    me: &'a Weak<dyn Driver>,
}

impl Ctl<'_> {
    /// A shorter-lived copy, to hand to one callback.
    pub(crate) fn reborrow(&mut self) -> Ctl<'_> {
        Ctl { transport: self.transport, flow: &mut *self.flow, wanted: self.wanted, me: self.me }
    }

    /// True while messages may be delivered: running and not closing.
    /// Takes up a flow change asked for through a handle first, so it
    /// applies from the very next message.
    #[inline]
    pub(crate) fn may_deliver(&mut self) -> bool {
        if let Some(to) = self.wanted.take() {
            apply_flow(self.transport, self.flow, to);
        }
        *self.flow == Flow::Running && self.transport.connected()
    }

    pub(crate) fn flow(&self) -> Flow {
        *self.flow
    }

    pub(crate) fn set_flow(&mut self, to: Flow) {
        apply_flow(self.transport, self.flow, to)
    }

    pub(crate) fn handle(&self) -> ReceiverHandle {
        ReceiverHandle { driver: self.me.clone() }
    }

    /// A handler callback returned an error: Twisted passes such a value on
    /// to the transport, which drops the connection at once.
    pub(crate) fn fail(&self, what: &str, failure: Failure) {
        tracing::warn!(target: "braid", "{what} failed: {failure}; aborting the connection");
        self.transport.abort_connection();
    }
}

fn apply_flow(transport: &Transport, flow: &mut Flow, to: Flow) {
    match (*flow, to) {
        (Flow::Stopped, _) => {}
        (now, to) if now == to => {}
        (_, Flow::Paused) => {
            *flow = Flow::Paused;
            transport.pause_producing();
        }
        (_, Flow::Running) => {
            *flow = Flow::Running;
            transport.resume_producing();
        }
        (_, Flow::Stopped) => {
            *flow = Flow::Stopped;
            transport.stop_producing();
        }
    }
}

/// Generates the methods every receiver context shares, delegating to
/// its `ctl` field.
macro_rules! common_context_methods {
    () => {
        /// The connection's transport, to write to it or close it directly.
        pub fn transport(&self) -> &$crate::transport::Transport {
            self.ctl.transport
        }

        /// Closes the connection once buffered output is sent; no more
        /// messages are delivered after this callback.
        pub fn lose_connection(&self) {
            self.ctl.transport.lose_connection()
        }

        /// Stops delivering messages and pauses the transport's reading
        /// until [`resume_producing`](Self::resume_producing).
        pub fn pause_producing(&mut self) {
            self.ctl.set_flow($crate::protocols::receiver::Flow::Paused)
        }

        /// Resumes the transport and delivers what was buffered while
        /// paused (right after this callback returns).
        pub fn resume_producing(&mut self) {
            self.ctl.set_flow($crate::protocols::receiver::Flow::Running)
        }

        /// Stops delivering for good and stops the transport (which closes
        /// the connection).
        pub fn stop_producing(&mut self) {
            self.ctl.set_flow($crate::protocols::receiver::Flow::Stopped)
        }

        /// Whether messages are being delivered, paused, or stopped.
        pub fn flow(&self) -> $crate::protocols::receiver::Flow {
            self.ctl.flow()
        }

        /// A handle on this receiver, to pause or resume it (or feed it)
        /// later from outside its callbacks.
        pub fn handle(&self) -> $crate::protocols::receiver::ReceiverHandle {
            self.ctl.handle()
        }
    };
}
pub(crate) use common_context_methods;

/// A handle on a receiver that has been handed to a connection: pause,
/// resume or stop its delivery (it is a [`Producer`], so another transport
/// can register it), or feed it bytes. It holds the receiver weakly: once
/// the connection has dropped the receiver, every call does nothing.
#[derive(Clone)]
pub struct ReceiverHandle {
    driver: Weak<dyn Driver>,
}

impl ReceiverHandle {
    /// Hands `data` to the receiver as if it had arrived from the
    /// transport. During one of the receiver's own callbacks it is only
    /// buffered, and parsed once the callback returns.
    pub fn data_received(&self, data: &[u8]) {
        if let Some(d) = self.driver.upgrade() {
            d.feed(data)
        }
    }

    /// True while the receiver still exists.
    pub fn is_alive(&self) -> bool {
        self.driver.strong_count() > 0
    }
}

impl Producer for ReceiverHandle {
    fn pause_producing(&self) {
        if let Some(d) = self.driver.upgrade() {
            d.change_flow(Flow::Paused)
        }
    }
    fn resume_producing(&self) {
        if let Some(d) = self.driver.upgrade() {
            d.change_flow(Flow::Running)
        }
    }
    fn stop_producing(&self) {
        if let Some(d) = self.driver.upgrade() {
            d.change_flow(Flow::Stopped)
        }
    }
}

impl std::fmt::Debug for ReceiverHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReceiverHandle").field("alive", &self.is_alive()).finish()
    }
}

struct Core<E> {
    engine: E,
    transport: Option<Transport>,
    flow: Flow,
    me: Weak<dyn Driver>,
}

struct Shared<E> {
    core: RefCell<Core<E>>,
    /// Bytes that arrived while `core` was borrowed.
    incoming: RefCell<Vec<u8>>,
    /// The last flow change asked for while `core` was borrowed.
    wanted: Cell<Option<Flow>>,
}

/// The protocol half of every receiver, generic over its engine.
pub(crate) struct Receiver<E> {
    shared: Rc<Shared<E>>,
}

impl<E: Engine> Receiver<E> {
    pub(crate) fn new(engine: E) -> Self {
        let shared = Rc::new_cyclic(|weak: &Weak<Shared<E>>| {
            let me: Weak<dyn Driver> = weak.clone();
            Shared {
                core: RefCell::new(Core { engine, transport: None, flow: Flow::Running, me }),
                incoming: RefCell::new(Vec::new()),
                wanted: Cell::new(None),
            }
        });
        Receiver { shared }
    }

    pub(crate) fn handle(&self) -> ReceiverHandle {
        let driver: Weak<dyn Driver> = Rc::downgrade(&self.shared) as Weak<dyn Driver>;
        ReceiverHandle { driver }
    }

    /// Runs `f` on the engine, unless one of its callbacks is running.
    pub(crate) fn with_engine<R>(&self, f: impl FnOnce(&E) -> R) -> Option<R> {
        self.shared.core.try_borrow().ok().map(|core| f(&core.engine))
    }

    /// Runs `f` on the engine mutably, unless one of its callbacks is running.
    pub(crate) fn with_engine_mut<R>(&self, f: impl FnOnce(&mut E) -> R) -> Option<R> {
        self.shared.core.try_borrow_mut().ok().map(|mut core| f(&mut core.engine))
    }

    pub(crate) fn connection_made(&mut self, transport: Transport) {
        let shared = &*self.shared;
        let mut core = shared.core.borrow_mut();
        // A pause or stop asked for before the connection reaches the
        // transport now.
        match core.flow {
            Flow::Running => {}
            Flow::Paused => transport.pause_producing(),
            Flow::Stopped => transport.stop_producing(),
        }
        core.transport = Some(transport);
        {
            let Core { engine, transport, flow, me } = &mut *core;
            if let Some(transport) = transport.as_ref() {
                engine.connection_made(Ctl { transport, flow, wanted: &shared.wanted, me });
            }
        }
        core.run(shared);
    }

    pub(crate) fn data_received(&mut self, data: &[u8]) {
        self.shared.feed(data)
    }

    pub(crate) fn connection_lost(&mut self, reason: Failure) {
        self.shared.core.borrow_mut().engine.connection_lost(reason)
    }
}

impl<E: Engine> Core<E> {
    /// False once the transport is closing: its input will never be parsed.
    fn accepts_input(&self) -> bool {
        self.transport.as_ref().is_none_or(|t| t.connected())
    }

    /// Delivers, then takes up whatever arrived or was asked for during
    /// the callbacks, until nothing is left.
    fn run(&mut self, shared: &Shared<E>) {
        loop {
            {
                let mut incoming = shared.incoming.borrow_mut();
                if !incoming.is_empty() {
                    if self.accepts_input() {
                        self.engine.push(&incoming);
                    }
                    incoming.clear();
                }
            }
            let Core { engine, transport, flow, me } = self;
            let Some(transport) = transport.as_ref() else {
                // Not connected yet: remember the flow for when it is.
                if let Some(to) = shared.wanted.take() {
                    if *flow != Flow::Stopped {
                        *flow = to;
                    }
                }
                break;
            };
            engine.pump(Ctl { transport, flow, wanted: &shared.wanted, me });
            if shared.incoming.borrow().is_empty() && shared.wanted.get().is_none() {
                break;
            }
        }
    }
}

impl<E: Engine> Driver for Shared<E> {
    fn feed(&self, data: &[u8]) {
        match self.core.try_borrow_mut() {
            Ok(mut core) => {
                if !core.accepts_input() {
                    return;
                }
                let Core { engine, transport, flow, me } = &mut *core;
                match transport.as_ref() {
                    Some(transport) => {
                        engine.receive(data, Ctl { transport, flow, wanted: &self.wanted, me })
                    }
                    None => engine.push(data),
                }
                core.run(self);
            }
            Err(_) => self.incoming.borrow_mut().extend_from_slice(data),
        }
    }

    fn change_flow(&self, to: Flow) {
        match self.core.try_borrow_mut() {
            Ok(mut core) => {
                self.wanted.set(Some(to));
                core.run(self);
            }
            Err(_) => self.wanted.set(Some(to)),
        }
    }
}
