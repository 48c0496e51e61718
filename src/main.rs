//! `braid`: ready-made servers on the braid reactor, like Twisted's `twist`.
//!
//! ```text
//! braid [--reactor R] [--log-level L] [--log-format text|json] [--grace S] PLUGIN [--listen ENDPOINT]...
//! braid echo --listen tcp:8000 --listen udp:8000 --listen unix:/run/echo.sock
//! braid echo --port 8000 [--udp 8000] [--interface 127.0.0.1] [--unix PATH [--mode 660]] [--systemd]
//! braid discard | chargen | daytime [--listen ENDPOINT]...
//! braid portforward --listen tcp:8080 --connect tcp:example.org:80 [--connect-timeout 30]
//! braid exec --listen tcp:8000 [--max-children N] -- PROGRAM [ARGS...]
//! braid web --path DIR [--listen tcp:8080]... [--index index.html] [--listing on|off] [--access-log FILE|-|off]
//! ```
//! Every plugin logs one line per listener with its real address, runs
//! until SIGINT or SIGTERM, then closes its listeners, gives open
//! connections `--grace` seconds to finish, and exits with status 0. Bad
//! arguments, a bad endpoint, an unknown reactor or a port in use end the
//! command with status 1 (clap's usage errors: 2) and a one-line message.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

mod cmd;

#[derive(Parser)]
#[command(name = "braid", version, about = "Run ready-made servers on the braid reactor")]
struct Cli {
    /// Polling backend: select, poll, epoll or io_uring (default: $BRAID_REACTOR, else epoll on Linux).
    #[arg(long, global = true, value_name = "NAME")]
    reactor: Option<String>,

    /// Least severe log level shown: error, warn, info, debug or trace.
    #[arg(long, global = true, value_name = "LEVEL", default_value = "info")]
    log_level: tracing::Level,

    /// Log line format.
    #[arg(long, global = true, value_name = "FORMAT", default_value = "text")]
    log_format: LogFormat,

    /// Seconds open connections get to finish at shutdown before they are
    /// aborted.
    #[arg(long, global = true, value_name = "SECONDS", default_value_t = 5.0)]
    grace: f64,

    /// Worker threads, each with its own reactor and its own SO_REUSEPORT
    /// listener for every TCP endpoint (shared nothing); 0: one per CPU.
    #[arg(long, global = true, value_name = "N", default_value_t = 1)]
    workers: usize,

    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Clone)]
enum Command {
    /// Echo server (RFC 862): sends back whatever it receives.
    Echo(cmd::echo::Args),
    /// Discard server (RFC 863): reads and drops everything.
    Discard(cmd::discard::Args),
    /// Character generator (RFC 864): an endless stream of lines.
    Chargen(cmd::chargen::Args),
    /// Daytime server (RFC 867): the date and time, then close.
    Daytime(cmd::daytime::Args),
    /// Port forwarder: each connection is relayed to --connect.
    Portforward(cmd::portforward::Args),
    /// inetd-style server: each connection runs PROGRAM on its stdin/stdout.
    Exec(cmd::exec::Args),
    /// Static-file HTTP/1.1 server: the files under --path.
    Web(cmd::web::Args),
}

fn run(common: cmd::Common, command: Command) -> Result<(), String> {
    match command {
        Command::Echo(args) => cmd::echo::run(common, args),
        Command::Discard(args) => cmd::discard::run(common, args),
        Command::Chargen(args) => cmd::chargen::run(common, args),
        Command::Daytime(args) => cmd::daytime::run(common, args),
        Command::Portforward(args) => cmd::portforward::run(common, args),
        Command::Exec(args) => cmd::exec::run(common, args),
        Command::Web(args) => cmd::web::run(common, args),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(cli.log_level)
        .with_target(false);
    match cli.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    let result = (|| {
        let backend = cmd::backend(cli.reactor.as_deref())?;
        let grace = Duration::try_from_secs_f64(cli.grace)
            .map_err(|_| format!("--grace {}: give a number of seconds", cli.grace))?;
        let common = cmd::Common { backend, grace, worker: None };
        let workers = match cli.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        if workers == 1 {
            return run(common, cli.command);
        }
        if matches!(&cli.command, Command::Echo(args) if args.systemd()) {
            return Err("--systemd cannot be shared by --workers (each socket serves one listener)".into());
        }
        // Each worker runs the plugin on a reactor of its own; SIGINT and
        // SIGTERM reach every reactor, so all stop together. Workers start
        // one after another: if one fails (a port in use), the ones
        // running are stopped and the command fails.
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        *cmd::RUNNING.lock().unwrap_or_else(|e| e.into_inner()) = Some(ready_tx);
        let mut running: Vec<braid::Remote> = Vec::new();
        let mut threads = Vec::new();
        let mut first_error = None;
        for i in 0..workers {
            let (command, common) =
                (cli.command.clone(), cmd::Common { worker: Some((i, workers)), ..common });
            let thread = std::thread::Builder::new()
                .name(format!("worker {i}"))
                .spawn(move || run(common, command))
                .map_err(|e| format!("starting the workers: {e}"))?;
            let started = loop {
                match ready_rx.recv_timeout(Duration::from_millis(20)) {
                    Ok(remote) => break Some(remote),
                    Err(_) if thread.is_finished() => break None,
                    Err(_) => continue,
                }
            };
            threads.push(thread);
            match started {
                Some(remote) => running.push(remote),
                None => break,
            }
        }
        if running.len() < workers {
            for remote in &running {
                let _ = remote.call_from_thread(|r| {
                    let _ = r.stop();
                });
            }
        }
        for t in threads {
            let result = t.join().unwrap_or_else(|_| Err("a worker panicked".into()));
            if let (Err(e), None) = (result, &first_error) {
                first_error = Some(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    })();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("braid: {message}");
            ExitCode::FAILURE
        }
    }
}
