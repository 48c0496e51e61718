//! A UDP echo server (RFC 862): every datagram goes back to its sender.
//!
//! ```sh
//! cargo run -p braid --example udp_echo -- 8000
//! ```
//! Try it with `nc -u 127.0.0.1 8000`. Ctrl-C (SIGINT) stops it cleanly.

use braid::datagram::{DatagramProtocol, DatagramTransport};
use braid::{Address, Backend};

/// Writes each datagram back to where it came from.
#[derive(Default)]
struct Echo {
    transport: Option<DatagramTransport>,
}

impl DatagramProtocol for Echo {
    fn make_connection(&mut self, transport: DatagramTransport) {
        self.transport = Some(transport);
    }

    fn datagram_received(&mut self, data: &[u8], from: &Address) {
        if let Some(t) = &self.transport {
            if let Err(e) = t.write(data, Some(from)) {
                eprintln!("not echoed to {from}: {e}");
            }
        }
    }
}

fn main() -> Result<(), braid::Error> {
    let port: u16 = std::env::args().nth(1).and_then(|p| p.parse().ok()).unwrap_or(8000);
    let reactor = braid::install(Backend::Epoll)?;
    let udp = reactor.listen_udp(port, Echo::default(), "127.0.0.1", braid::udp::DEFAULT_MAX_PACKET_SIZE)?;
    println!("UDP echo on {}", udp.local_addr());
    reactor.run()
}
