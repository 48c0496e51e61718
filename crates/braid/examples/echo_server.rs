//! An echo server: every connection gets back what it sends.
//!
//! ```sh
//! cargo run -p braid --example echo_server -- 8000
//! ```
//! Stop it with Ctrl-C (SIGINT): the reactor shuts down cleanly.

use braid::protocol::Protocol;
use braid::{Backend, Transport};

/// One connection: write back whatever arrives.
#[derive(Default)]
struct Echo {
    transport: Option<Transport>,
}

impl Protocol for Echo {
    fn connection_made(&mut self, transport: Transport) {
        self.transport = Some(transport);
    }

    fn data_received(&mut self, data: &[u8]) {
        if let Some(t) = &self.transport {
            t.write(data);
        }
    }
}

fn main() -> Result<(), braid::Error> {
    let port: u16 = std::env::args().nth(1).and_then(|p| p.parse().ok()).unwrap_or(8000);
    let reactor = braid::install(Backend::from_env()?)?;
    // A closure is a factory: one protocol per connection.
    let listening =
        reactor.listen_tcp(("127.0.0.1".parse::<std::net::IpAddr>().unwrap(), port), Echo::default, 50)?;
    println!("echo server on {}", listening.local_addr());
    reactor.run()
}
