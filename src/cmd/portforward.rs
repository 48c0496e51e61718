//! `braid portforward`: a TCP (or UNIX) port forwarder (Twisted's
//! portforward plugin). Each connection accepted on a `--listen` endpoint
//! opens one to the `--connect` endpoint; bytes flow both ways, each side
//! the other's producer, so a stalled reader on either side stops reading
//! on the other (memory stays bounded). A half-close passes through. A
//! destination that refuses or cannot be reached closes the client, with a
//! log line naming both.
//!
//! The client side is not read until the destination is connected: what
//! it sends meanwhile waits in the kernel, not here. With `--splice` (on
//! by default where both sides are TCP) the pair is handed to the kernel
//! (`braid::stream::splice_streams`): the bytes go socket to pipe to
//! socket without being copied into this process, with the same
//! backpressure and half-close.

use std::cell::RefCell;
use std::rc::Rc;

use braid::endpoints::{client_from_string, ClientEndpoint};
use braid::protocol::{Factory, HalfCloseable, Protocol, SharedFactory};
use braid::{Address, Failure, Reactor, Transport};

use super::{Common, Serve};

/// Arguments of `braid portforward`.
#[derive(clap::Args, Clone)]
pub struct Args {
    /// Where to listen, as an endpoint; repeatable.
    #[arg(long, value_name = "ENDPOINT", required = true)]
    listen: Vec<String>,
    /// Where to forward each connection, as a client endpoint
    /// (tcp:HOST:PORT, unix:PATH).
    #[arg(long, value_name = "ENDPOINT")]
    connect: String,
    /// Seconds to wait for the destination before giving up.
    #[arg(long, value_name = "SECONDS", default_value_t = 30.0)]
    connect_timeout: f64,
    /// Relay TCP to TCP inside the kernel with splice(2) (`on`), copy
    /// through user space (`off`), or splice where possible and copy
    /// otherwise (`auto`).
    #[arg(long, value_name = "MODE", default_value = "auto")]
    splice: Splice,
}

/// `--splice`.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Splice {
    /// Always splice; a pair that cannot be spliced is closed.
    On,
    /// Never splice.
    Off,
    /// Splice where possible.
    Auto,
}

/// The two ends of one forwarded connection.
#[derive(Default)]
struct Pair {
    front: Option<Transport>,
    back: Option<Transport>,
    /// The kernel relays the pair (splice): neither side reads itself.
    spliced: bool,
}

type Shared = Rc<RefCell<Pair>>;

/// The connection from the client.
struct Front {
    pair: Shared,
    endpoint: Rc<dyn ClientEndpoint>,
    peer: Address,
    splice: Splice,
    reactor: Reactor,
}

/// The connection to the destination.
struct Back {
    pair: Shared,
    splice: Splice,
    reactor: Reactor,
}

impl Protocol for Front {
    fn connection_made(&mut self, t: Transport) {
        t.pause_producing();
        self.pair.borrow_mut().front = Some(t.clone());
        let back = Back { pair: self.pair.clone(), splice: self.splice, reactor: self.reactor.clone() };
        let d = braid::endpoints::connect_protocol(&*self.endpoint, back);
        let (front, peer, dest, pair) = (t, self.peer.clone(), self.endpoint.describe(), self.pair.clone());
        let _sink: braid::Deferred<()> = d.then(move |result| {
            match result {
                Ok(_) if pair.borrow().spliced => {}
                Ok(_) => front.resume_producing(),
                Err(why) => {
                    tracing::warn!("portforward: {peer} closed: cannot reach {dest}: {why}");
                    front.lose_connection();
                }
            }
            Ok(())
        });
    }

    fn data_received(&mut self, data: &[u8]) {
        if let Some(back) = &self.pair.borrow().back {
            back.write(data);
        }
    }

    fn connection_lost(&mut self, _reason: Failure) {
        let back = self.pair.borrow_mut().back.take();
        if let Some(back) = back {
            back.unregister_producer();
            back.lose_connection();
        }
        self.pair.borrow_mut().front = None;
    }

    fn as_half_closeable(&mut self) -> Option<&mut dyn HalfCloseable> {
        Some(self)
    }
}

impl HalfCloseable for Front {
    fn read_connection_lost(&mut self) {
        if let Some(back) = &self.pair.borrow().back {
            back.unregister_producer();
            back.lose_write_connection();
        }
    }
}

impl Protocol for Back {
    fn connection_made(&mut self, t: Transport) {
        let front = self.pair.borrow().front.clone();
        if let Some(front) = front {
            if self.splice != Splice::Off {
                match braid::stream::splice_streams(&self.reactor, &front, &t) {
                    Ok(_) => {
                        tracing::debug!("portforward: {} and {} spliced", front.peer(), t.peer());
                        self.pair.borrow_mut().spliced = true;
                        self.pair.borrow_mut().back = Some(t);
                        return;
                    }
                    Err(e) if self.splice == Splice::On => {
                        tracing::warn!("portforward: --splice on, but {e}; closing");
                        front.lose_connection();
                        t.lose_connection();
                        return;
                    }
                    Err(e) => tracing::debug!("portforward: copying, not splicing: {e}"),
                }
            }
            // Each side pauses the other's reading when its own buffer is full.
            let _ = front.register_producer(t.as_producer(), true);
            let _ = t.register_producer(front.as_producer(), true);
        } else {
            // The client left while we were connecting.
            t.lose_connection();
        }
        self.pair.borrow_mut().back = Some(t);
    }

    fn data_received(&mut self, data: &[u8]) {
        if let Some(front) = &self.pair.borrow().front {
            front.write(data);
        }
    }

    fn connection_lost(&mut self, _reason: Failure) {
        let front = self.pair.borrow_mut().front.take();
        if let Some(front) = front {
            front.unregister_producer();
            front.lose_connection();
        }
        self.pair.borrow_mut().back = None;
    }

    fn as_half_closeable(&mut self) -> Option<&mut dyn HalfCloseable> {
        Some(self)
    }
}

impl HalfCloseable for Back {
    fn read_connection_lost(&mut self) {
        if let Some(front) = &self.pair.borrow().front {
            front.unregister_producer();
            front.lose_write_connection();
        }
    }
}

struct Forwarder {
    endpoint: Rc<dyn ClientEndpoint>,
    splice: Splice,
    reactor: Reactor,
}

impl Factory for Forwarder {
    fn build_protocol(&mut self, addr: &Address) -> Option<Box<dyn Protocol>> {
        Some(Box::new(Front {
            pair: Shared::default(),
            endpoint: self.endpoint.clone(),
            peer: addr.clone(),
            splice: self.splice,
            reactor: self.reactor.clone(),
        }))
    }
}

/// Forwards until SIGINT or SIGTERM.
pub fn run(common: Common, args: Args) -> Result<(), String> {
    if !(args.connect_timeout.is_finite() && args.connect_timeout > 0.0) {
        return Err(format!("--connect-timeout {}: give a positive number of seconds", args.connect_timeout));
    }
    let reactor: Reactor = braid::install(common.backend).map_err(|e| e.to_string())?;
    let desc = if args.connect.contains(":timeout=") {
        args.connect.clone()
    } else {
        format!("{}:timeout={}", args.connect, args.connect_timeout)
    };
    let endpoint: Rc<dyn ClientEndpoint> = Rc::from(
        client_from_string(&reactor, &desc).map_err(|e| format!("--connect {}: {e}", args.connect))?,
    );
    tracing::debug!("portforward to {}", endpoint.describe());
    let factory: SharedFactory<dyn Factory> =
        SharedFactory::new(Forwarder { endpoint, splice: args.splice, reactor: reactor.clone() }).erase();
    let what = Serve { name: "portforward", streams: Some(factory), datagrams: None, over: "" };
    super::serve_on(&reactor, common, &args.listen, what, Vec::new())
}
