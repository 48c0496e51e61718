//! `braid echo`: the echo server (RFC 862) on every `--listen` endpoint,
//! streams and datagrams alike. The older flags still work and name
//! endpoints: `--port N [--interface IP]` is `tcp:N:interface=IP`,
//! `--udp N` is `udp:N:interface=IP`, `--unix PATH [--mode M]` is
//! `unix:PATH:mode=M:lockfile=0`, and `--systemd` serves every socket the
//! service manager passed.

use std::net::IpAddr;
use std::path::PathBuf;

use braid::app::Service;
use braid::datagram::SharedDatagram;
use braid::endpoints::quote;
use braid::protocol::{Factory, IntoFactory, SharedFactory};
use braid::protocols::echo::{DatagramEcho, Echo};
use braid::tls::{ServerConfig, TlsFactory};
use braid::{Deferred, Failure, Reactor};

use super::{Common, Serve};

/// Arguments of `braid echo`.
#[derive(clap::Args, Clone)]
pub struct Args {
    /// Where to listen, as an endpoint (tcp:8000, tcp6:8000, udp:8000,
    /// unix:/run/echo.sock, systemd:domain=INET:index=0); repeatable.
    #[arg(long, value_name = "ENDPOINT")]
    listen: Vec<String>,
    /// TCP port to listen on (0 picks a free one): `--listen tcp:PORT`.
    #[arg(long)]
    port: Option<u16>,
    /// Address for --port and --udp.
    #[arg(long, default_value = "0.0.0.0")]
    interface: IpAddr,
    /// UDP port to echo datagrams on (0 picks a free one).
    #[arg(long, value_name = "PORT")]
    udp: Option<u16>,
    /// UNIX socket to listen on: a path, or an abstract name starting with `@`.
    #[arg(long, value_name = "PATH")]
    unix: Option<PathBuf>,
    /// Serve on the sockets systemd passed (socket activation:
    /// LISTEN_PID, LISTEN_FDS), stream or datagram.
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

impl Args {
    /// Whether `--systemd` was given.
    pub fn systemd(&self) -> bool {
        self.systemd
    }
}

/// Serves echo until SIGINT or SIGTERM.
pub fn run(common: Common, args: Args) -> Result<(), String> {
    // Before the reactor opens descriptors of its own.
    let inherited =
        if args.systemd { braid::stream::systemd_sockets().map_err(|e| e.to_string())? } else { Vec::new() };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            Some(ServerConfig::from_pem_files(cert, key).map_err(|e| format!("--tls-cert/--tls-key: {e}"))?)
        }
        _ => None,
    };
    if args.systemd && inherited.is_empty() {
        return Err(
            "--systemd: no sockets were passed (LISTEN_PID/LISTEN_FDS not set for this process)".into()
        );
    }
    let interface = quote(&args.interface.to_string());
    let mut listens = Vec::new();
    if let Some(port) = args.port {
        listens.push(format!("tcp:{port}:interface={interface}"));
    }
    if let Some(port) = args.udp {
        listens.push(format!("udp:{port}:interface={interface}"));
    }
    if let Some(path) = &args.unix {
        let mut desc = format!("unix:{}:lockfile=0", quote(&path.to_string_lossy()));
        if let Some(mode) = args.mode {
            desc.push_str(&format!(":mode={mode:o}"));
        }
        listens.push(desc);
    }
    listens.extend(args.listen.iter().cloned());
    if listens.is_empty() && !args.systemd {
        listens.push("tcp:8000".into());
    }
    let reactor = braid::install(common.backend).map_err(|e| e.to_string())?;
    let over = if tls.is_some() { " over TLS" } else { "" };
    let extra: Vec<Box<dyn Service>> = vec![Box::new(Adopted {
        reactor: reactor.clone(),
        sockets: inherited,
        backend: common.backend,
        ports: Vec::new(),
        streams: stream_echo(&reactor, &tls),
        over,
    })];
    let what = Serve {
        name: "echo",
        streams: Some(stream_echo(&reactor, &tls)),
        datagrams: Some(SharedDatagram::new(DatagramEcho::new()).erase()),
        over,
    };
    super::serve_on(&reactor, common, &listens, what, extra)
}

/// Serves echo on the sockets systemd passed (`--systemd`).
struct Adopted {
    reactor: Reactor,
    sockets: Vec<std::os::fd::OwnedFd>,
    backend: braid::Backend,
    ports: Vec<Box<dyn FnMut() -> Deferred<()>>>,
    streams: SharedFactory<dyn Factory>,
    over: &'static str,
}

impl Service for Adopted {
    fn start_service(&mut self) -> Result<(), Failure> {
        for socket in std::mem::take(&mut self.sockets) {
            let datagram =
                rustix::net::sockopt::socket_type(&socket).is_ok_and(|t| t == rustix::net::SocketType::DGRAM);
            if datagram {
                let family =
                    rustix::net::getsockname(&socket).map(|a| a.address_family()).map_err(Failure::new)?;
                let max = braid::udp::DEFAULT_MAX_PACKET_SIZE;
                let port = self.reactor.adopt_datagram_port(socket, family, DatagramEcho::new(), max)?;
                tracing::info!("echo listening on {} (from systemd; reactor: {})", port.host(), self.backend);
                self.ports.push(Box::new(move || port.stop_listening()));
            } else {
                let port = self.reactor.adopt_stream_port(socket, self.streams.clone())?;
                let over = self.over;
                tracing::info!(
                    "echo listening on {}{over} (from systemd; reactor: {})",
                    port.host(),
                    self.backend
                );
                self.ports.push(Box::new(move || port.stop_listening()));
            }
        }
        Ok(())
    }

    fn stop_service(&mut self) -> Deferred<()> {
        let stops: Vec<Deferred<()>> = self.ports.iter_mut().map(|stop| stop()).collect();
        self.ports.clear();
        braid::defer::gather_results(stops).then(|r| r.map(|_| ()))
    }

    fn running(&self) -> bool {
        !self.ports.is_empty()
    }
}
