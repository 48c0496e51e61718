//! `braid web`: a static-file HTTP/1.1 server (Twisted's `twist web
//! --path`). Serves the files under `--path` on every `--listen` endpoint
//! (`ssl:` endpoints included), with nginx's limits and timeouts by
//! default, each one a flag.

use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

use braid::protocol::SharedFactory;
use braid::protocols::http::log::AccessLog;
use braid::protocols::http::{Config, Limits, Site, StaticFiles};
use braid::reactor::ReactorTime;

use super::{Common, Serve};

/// `--listing`.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnOff {
    /// Enabled.
    On,
    /// Disabled.
    Off,
}

/// Arguments of `braid web`.
#[derive(clap::Args, Clone)]
pub struct Args {
    /// The directory whose files are served.
    #[arg(long, value_name = "DIR")]
    path: PathBuf,
    /// Where to listen, as an endpoint (tcp:8080, ssl:8443:certKey=...,
    /// unix:/run/web.sock); repeatable. Default: tcp:8080.
    #[arg(long, value_name = "ENDPOINT")]
    listen: Vec<String>,
    /// The file served for a directory; empty for none.
    #[arg(long, value_name = "NAME", default_value = "index.html")]
    index: String,
    /// List a directory that has no index file (off: 403).
    #[arg(long, value_name = "on|off", default_value = "on")]
    listing: OnOff,
    /// Let symlinks lead outside --path (else such a link gives 403).
    #[arg(long)]
    follow_symlinks: bool,
    /// Where the access log goes (combined log format): `-` for stderr, a
    /// file (appended to), or `off`.
    #[arg(long, value_name = "FILE|-|off", default_value = "-")]
    access_log: String,
    /// Seconds a client has to send a whole request head (slowloris).
    #[arg(long, value_name = "SECONDS", default_value_t = 60.0)]
    header_timeout: f64,
    /// Seconds an idle kept-alive connection stays open.
    #[arg(long, value_name = "SECONDS", default_value_t = 75.0)]
    keepalive_timeout: f64,
    /// Seconds between two pieces of a request body at most.
    #[arg(long, value_name = "SECONDS", default_value_t = 60.0)]
    body_timeout: f64,
    /// Seconds a client may take none of a response before it is cut off.
    #[arg(long, value_name = "SECONDS", default_value_t = 60.0)]
    send_timeout: f64,
    /// Seconds the client's bytes are read and dropped after the last
    /// response, before closing.
    #[arg(long, value_name = "SECONDS", default_value_t = 5.0)]
    lingering_timeout: f64,
    /// Requests served on one connection before it is closed.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    max_requests: usize,
    /// Connections open at once at most (per worker); more are closed.
    #[arg(long, value_name = "N", default_value_t = 512)]
    max_connections: usize,
    /// Longest request line in bytes (longer: 414).
    #[arg(long, value_name = "BYTES", default_value_t = 8192)]
    max_request_line: usize,
    /// Longest request head in bytes (longer: 431).
    #[arg(long, value_name = "BYTES", default_value_t = 8192)]
    max_header_bytes: usize,
    /// Most header fields in a request (more: 431).
    #[arg(long, value_name = "N", default_value_t = 100)]
    max_headers: usize,
    /// Largest request body read and discarded, in bytes (larger: 413).
    #[arg(long, value_name = "BYTES", default_value_t = 1024 * 1024)]
    max_body: u64,
}

fn seconds(flag: &str, s: f64) -> Result<Duration, String> {
    Duration::try_from_secs_f64(s).map_err(|_| format!("--{flag} {s}: give a number of seconds"))
}

impl Args {
    fn config(&self) -> Result<Config, String> {
        if self.max_connections == 0 || self.max_requests == 0 || self.max_headers == 0 {
            return Err("--max-connections, --max-requests and --max-headers must be at least 1".into());
        }
        Ok(Config {
            limits: Limits {
                max_request_line: self.max_request_line,
                max_header_bytes: self.max_header_bytes,
                max_headers: self.max_headers,
                max_body: self.max_body,
            },
            header_timeout: seconds("header-timeout", self.header_timeout)?,
            keepalive_timeout: seconds("keepalive-timeout", self.keepalive_timeout)?,
            body_timeout: seconds("body-timeout", self.body_timeout)?,
            send_timeout: seconds("send-timeout", self.send_timeout)?,
            lingering_timeout: seconds("lingering-timeout", self.lingering_timeout)?,
            max_requests: self.max_requests,
            max_connections: self.max_connections,
        })
    }

    fn access_log(&self) -> Result<Option<AccessLog>, String> {
        match self.access_log.as_str() {
            "off" => Ok(None),
            "-" => Ok(Some(AccessLog::new(Box::new(std::io::stderr())))),
            file => {
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(file)
                    .map_err(|e| format!("--access-log {file}: {e}"))?;
                Ok(Some(AccessLog::new(Box::new(f))))
            }
        }
    }
}

/// Serves the files until SIGINT or SIGTERM.
pub fn run(common: Common, args: Args) -> Result<(), String> {
    let config = args.config()?;
    let files = StaticFiles::new(&args.path, args.follow_symlinks)
        .map_err(|e| format!("--path {}: {e}", args.path.display()))?
        .index(Some(&args.index))
        .listing(args.listing == OnOff::On);
    let log = args.access_log()?;
    let listens = if args.listen.is_empty() { vec!["tcp:8080".to_string()] } else { args.listen.clone() };
    let reactor = braid::install(common.backend).map_err(|e| e.to_string())?;
    let clock: Rc<dyn ReactorTime> = Rc::new(reactor.clone());
    let site = Site::new(clock, Rc::new(files), config, log);
    let what =
        Serve { name: "web", streams: Some(SharedFactory::new(site).erase()), datagrams: None, over: "" };
    super::serve_on(&reactor, common, &listens, what, Vec::new())
}
