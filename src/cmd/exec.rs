//! `braid exec`: an inetd-style server (Twisted's inetd plugin). Each
//! connection runs the program with its stdin and stdout wired to the
//! connection and its stderr logged; bytes flow with backpressure both
//! ways (each side is the other's producer). The client half-closing is
//! the child's end of input; the child closing its stdout closes the
//! connection. Past `--max-children`, new connections are refused (closed
//! at once, with a log line) rather than queued: a waiting client would
//! hold a descriptor and learn nothing.

use std::cell::Cell;
use std::net::IpAddr;
use std::rc::Rc;

use braid::process::{Command, ProcessProtocol, ProcessTransport};
use braid::protocol::{Factory, HalfCloseable, Protocol, SharedFactory};
use braid::{Address, Failure, Reactor, Transport};

use super::{Common, Serve};

/// Arguments of `braid exec`.
#[derive(clap::Args, Clone)]
pub struct Args {
    /// Where to listen, as an endpoint; repeatable.
    #[arg(long, value_name = "ENDPOINT")]
    listen: Vec<String>,
    /// TCP port to listen on (0 picks a free one): `--listen tcp:PORT`.
    #[arg(long)]
    port: Option<u16>,
    /// Address for --port.
    #[arg(long, default_value = "0.0.0.0")]
    interface: IpAddr,
    /// At most this many children at once; further connections are refused.
    #[arg(long, value_name = "N")]
    max_children: Option<usize>,
    /// The program and its arguments (after `--`).
    #[arg(required = true, last = true, value_name = "PROGRAM")]
    command: Vec<String>,
}

/// One connection: spawns the child when made.
struct Connection {
    reactor: Reactor,
    command: Rc<Command>,
    running: Rc<Cell<usize>>,
    peer: Address,
    process: Option<ProcessTransport>,
}

/// The child's side: its output goes to the connection.
struct Child {
    conn: Transport,
    running: Rc<Cell<usize>>,
    peer: Address,
    pid: i32,
}

impl ProcessProtocol for Child {
    fn connection_made(&mut self, t: ProcessTransport) {
        self.pid = t.pid().unwrap_or(0);
        // Each side pauses the other when its own buffer is full.
        let _ = self.conn.register_producer(t.as_producer(), true);
        let _ = t.register_producer(self.conn.as_producer(), true);
    }

    fn out_received(&mut self, data: &[u8]) {
        self.conn.write(data);
    }

    fn err_received(&mut self, data: &[u8]) {
        for line in String::from_utf8_lossy(data).lines() {
            tracing::info!("[{} pid {}] {line}", self.peer, self.pid);
        }
    }

    fn out_connection_lost(&mut self) {
        self.conn.unregister_producer();
        self.conn.lose_connection();
    }

    fn process_ended(&mut self, reason: Failure) {
        self.running.set(self.running.get().saturating_sub(1));
        tracing::info!("[{} pid {}] {reason}", self.peer, self.pid);
    }
}

impl Protocol for Connection {
    fn connection_made(&mut self, transport: Transport) {
        let child =
            Child { conn: transport.clone(), running: self.running.clone(), peer: self.peer.clone(), pid: 0 };
        // Counted down in the child's process_ended, which a failed spawn
        // calls too.
        self.running.set(self.running.get() + 1);
        match self.reactor.spawn_process(child, &self.command) {
            Ok(p) => self.process = Some(p),
            Err(e) => {
                tracing::error!("[{}] {e}", self.peer);
                transport.lose_connection();
            }
        }
    }

    fn data_received(&mut self, data: &[u8]) {
        if let Some(p) = &self.process {
            p.write(data);
        }
    }

    fn connection_lost(&mut self, _reason: Failure) {
        if let Some(p) = self.process.take() {
            p.unregister_producer();
            p.lose_connection();
        }
    }

    fn as_half_closeable(&mut self) -> Option<&mut dyn HalfCloseable> {
        Some(self)
    }
}

impl HalfCloseable for Connection {
    fn read_connection_lost(&mut self) {
        if let Some(p) = &self.process {
            p.unregister_producer();
            p.close_stdin();
        }
    }
}

struct ExecFactory {
    reactor: Reactor,
    command: Rc<Command>,
    running: Rc<Cell<usize>>,
    max: Option<usize>,
}

impl Factory for ExecFactory {
    fn build_protocol(&mut self, addr: &Address) -> Option<Box<dyn Protocol>> {
        if self.max.is_some_and(|max| self.running.get() >= max) {
            tracing::warn!("refusing {addr}: {} children running (--max-children)", self.running.get());
            return None;
        }
        Some(Box::new(Connection {
            reactor: self.reactor.clone(),
            command: self.command.clone(),
            running: self.running.clone(),
            peer: addr.clone(),
            process: None,
        }))
    }
}

/// Serves until SIGINT or SIGTERM.
pub fn run(common: Common, args: Args) -> Result<(), String> {
    let reactor = braid::install(common.backend).map_err(|e| e.to_string())?;
    let (program, rest) = args.command.split_first().ok_or("exec: no program given")?;
    let command = Rc::new(Command::new(program).args(rest).inherit_env());
    let factory =
        ExecFactory { reactor: reactor.clone(), command, running: Rc::default(), max: args.max_children };
    let mut listens = args.listen.clone();
    if let Some(port) = args.port {
        listens
            .push(format!("tcp:{port}:interface={}", braid::endpoints::quote(&args.interface.to_string())));
    }
    let what =
        Serve { name: "exec", streams: Some(SharedFactory::new(factory).erase()), datagrams: None, over: "" };
    super::serve_on(&reactor, common, &listens, what, Vec::new())
}
