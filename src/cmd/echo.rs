//! `braid echo`: the echo server (RFC 862), on TCP, UDP, a UNIX socket,
//! sockets systemd passed, or several of these at once.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use braid::protocol::{Factory, IntoFactory, SharedFactory};
use braid::protocols::echo::{DatagramEcho, Echo};
use braid::tcp::DEFAULT_BACKLOG;
use braid::tls::{ServerConfig, TlsFactory};
use braid::{Backend, Reactor};

/// Arguments of `braid echo`.
#[derive(clap::Args)]
pub struct Args {
    /// TCP port to listen on (0 picks a free one).
    #[arg(long, required_unless_present_any = ["unix", "systemd", "udp"])]
    port: Option<u16>,
    /// UDP port to echo datagrams on (0 picks a free one).
    #[arg(long, value_name = "PORT")]
    udp: Option<u16>,
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0")]
    interface: IpAddr,
    /// UNIX socket to listen on: a path, or an abstract name starting with `@`.
    #[arg(long, value_name = "PATH")]
    unix: Option<PathBuf>,
    /// Serve on the listening sockets systemd passed (socket activation:
    /// LISTEN_PID, LISTEN_FDS).
    #[arg(long)]
    systemd: bool,
    /// Permission bits of the UNIX socket file, in octal (e.g. 660).
    #[arg(long, value_name = "OCTAL", value_parser = parse_mode, requires = "unix")]
    mode: Option<u32>,
    /// Serve TLS on the stream listeners (TCP, UNIX, systemd's): the
    /// certificate chain, leaf first, in PEM.
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert, in PEM.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

/// The echo factory for a stream listener: wrapped in TLS when a
/// certificate was given.
fn stream_echo(reactor: &Reactor, tls: &Option<ServerConfig>) -> SharedFactory<dyn Factory> {
    match tls {
        Some(config) => TlsFactory::new(reactor, Echo::new, config.clone()).into_shared(),
        None => Echo::new.into_shared(),
    }
}

fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| format!("{s:?} is not an octal file mode (say 660)"))
}

/// Serves echo until SIGINT or SIGTERM.
pub fn run(backend: Backend, args: Args) -> Result<(), String> {
    // Before the reactor opens descriptors of its own.
    let inherited =
        if args.systemd { braid::stream::systemd_sockets().map_err(|e| e.to_string())? } else { Vec::new() };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            Some(ServerConfig::from_pem_files(cert, key).map_err(|e| format!("--tls-cert/--tls-key: {e}"))?)
        }
        _ => None,
    };
    let over = if tls.is_some() { " over TLS" } else { "" };
    let reactor = braid::install(backend).map_err(|e| e.to_string())?;
    if let Some(port) = args.port {
        let addr = SocketAddr::new(args.interface, port);
        let port = reactor
            .listen_tcp(addr, stream_echo(&reactor, &tls), DEFAULT_BACKLOG)
            .map_err(|e| e.to_string())?;
        tracing::info!("echo listening on {}{over} (reactor: {backend})", port.local_addr());
    }
    if let Some(port) = args.udp {
        let interface = args.interface.to_string();
        let port = reactor
            .listen_udp(port, DatagramEcho::new(), &interface, braid::udp::DEFAULT_MAX_PACKET_SIZE)
            .map_err(|e| e.to_string())?;
        tracing::info!("echo listening on udp {} (reactor: {backend})", port.local_addr());
    }
    if let Some(path) = &args.unix {
        let port = reactor
            .listen_unix(path, stream_echo(&reactor, &tls), DEFAULT_BACKLOG, args.mode, false)
            .map_err(|e| e.to_string())?;
        tracing::info!("echo listening on {}{over} (reactor: {backend})", port.host());
    }
    if args.systemd {
        let sockets = inherited;
        if sockets.is_empty() {
            return Err(
                "--systemd: no sockets were passed (LISTEN_PID/LISTEN_FDS not set for this process)".into()
            );
        }
        for socket in sockets {
            let datagram =
                rustix::net::sockopt::socket_type(&socket).is_ok_and(|t| t == rustix::net::SocketType::DGRAM);
            let host = if datagram {
                let family = rustix::net::getsockname(&socket)
                    .map(|a| a.address_family())
                    .map_err(|e| format!("--systemd: {e}"))?;
                let max = braid::udp::DEFAULT_MAX_PACKET_SIZE;
                let port = reactor.adopt_datagram_port(socket, family, DatagramEcho::new(), max);
                port.map_err(|e| e.to_string())?.host()
            } else {
                reactor
                    .adopt_stream_port(socket, stream_echo(&reactor, &tls))
                    .map_err(|e| e.to_string())?
                    .host()
            };
            let over = if datagram { "" } else { over };
            tracing::info!("echo listening on {host}{over} (from systemd; reactor: {backend})");
        }
    }
    super::serve(&reactor)
}
