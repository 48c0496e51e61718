//! `braid`: ready-made servers on the braid reactor, like Twisted's `twist`.
//!
//! ```text
//! braid echo --port 8000 [--udp 8000] [--interface 127.0.0.1] [--unix PATH [--mode 660]] [--reactor epoll]
//! braid exec --port 8000 [--interface 127.0.0.1] [--max-children N] -- PROGRAM [ARGS...]
//! ```
//! A server runs until SIGINT or SIGTERM, then shuts down cleanly and exits
//! with status 0. Bad arguments, an unknown reactor or a port in use end
//! the command with status 1 and a one-line message on stderr.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cmd;

#[derive(Parser)]
#[command(name = "braid", version, about = "Run ready-made servers on the braid reactor")]
struct Cli {
    /// Polling backend: select, poll or epoll (default: $BRAID_REACTOR, else epoll on Linux).
    #[arg(long, global = true, value_name = "NAME")]
    reactor: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Echo server (RFC 862): sends back whatever it receives.
    Echo(cmd::echo::Args),
    /// inetd-style server: each connection runs PROGRAM on its stdin/stdout.
    Exec(cmd::exec::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(tracing::Level::INFO)
        .with_target(false)
        .init();
    let result = cmd::backend(cli.reactor.as_deref()).and_then(|backend| match cli.command {
        Command::Echo(args) => cmd::echo::run(backend, args),
        Command::Exec(args) => cmd::exec::run(backend, args),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("braid: {message}");
            ExitCode::FAILURE
        }
    }
}
