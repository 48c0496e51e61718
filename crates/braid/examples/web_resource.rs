//! Dynamic pages next to static files on one HTTP server (Twisted's
//! `Resource.render_GET`): `/hello/NAME` greets, `/count` counts its
//! visits, `/countdown` streams its body piece by piece, and everything
//! else comes from a directory.
//!
//! ```sh
//! cargo run -p braid --example web_resource -- 8080 /var/www
//! curl http://127.0.0.1:8080/hello/world
//! ```
//! Every request gets the server's limits, timeouts and keep-alive
//! handling, whichever resource answers it.

use std::cell::Cell;
use std::rc::Rc;

use braid::protocols::http::{
    Body, BodyStream, Config, Request, Resource, Response, Router, Site, StaticFiles,
};
use braid::{Backend, ReactorTime};

/// A resource with state of its own.
struct Count(Cell<u64>);

impl Resource for Count {
    fn render(&self, _request: &Request<'_>) -> Response {
        self.0.set(self.0.get() + 1);
        Response::text(200, format!("{} visits\n", self.0.get()))
    }
}

/// A body made piece by piece, pulled only as fast as the client reads.
struct Countdown(u32);

impl BodyStream for Countdown {
    fn next_chunk(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        if self.0 == 0 {
            return Ok(None);
        }
        self.0 -= 1;
        Ok(Some(format!("{}\n", self.0).into_bytes()))
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let port: u16 = args.next().and_then(|p| p.parse().ok()).unwrap_or(8080);
    let dir = args.next().unwrap_or_else(|| ".".into());
    let reactor = braid::install(Backend::from_env()?)?;
    let router = Router::new()
        .mount("/", StaticFiles::new(dir.as_ref(), false)?)
        .mount("/hello", |r: &Request<'_>| {
            Response::text(200, format!("hello, {}\n", r.segments().join("/")))
        })
        .mount("/count", Count(Cell::new(0)))
        .mount("/countdown", |_: &Request<'_>| {
            Response::new(200).body(Body::Stream(Box::new(Countdown(10))))
        });
    let clock: Rc<dyn ReactorTime> = Rc::new(reactor.clone());
    let site = Site::new(clock, Rc::new(router), Config::default(), None);
    let listening = reactor.listen_tcp(("127.0.0.1".parse::<std::net::IpAddr>().unwrap(), port), site, 50)?;
    println!("serving on http://{}", listening.local_addr());
    reactor.run()?;
    Ok(())
}
