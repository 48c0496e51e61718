//! `braid echo`: the echo server.

use std::net::{IpAddr, SocketAddr};

use braid::protocols::echo::Echo;
use braid::tcp::DEFAULT_BACKLOG;
use braid::Backend;

/// Arguments of `braid echo`.
#[derive(clap::Args)]
pub struct Args {
    /// TCP port to listen on (0 picks a free one).
    #[arg(long)]
    port: u16,
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0")]
    interface: IpAddr,
}

/// Serves echo until SIGINT or SIGTERM.
pub fn run(backend: Backend, args: Args) -> Result<(), String> {
    let reactor = braid::install(backend).map_err(|e| e.to_string())?;
    let addr = SocketAddr::new(args.interface, args.port);
    let port = reactor.listen_tcp(addr, Echo::new, DEFAULT_BACKLOG).map_err(|e| e.to_string())?;
    tracing::info!("echo listening on {} (reactor: {backend})", port.local_addr());
    super::serve(&reactor)
}
