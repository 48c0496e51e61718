//! An echo client: connects, sends a line, prints the echo, hangs up, and
//! stops the reactor when the connection ends (or cannot be made).
//!
//! ```sh
//! cargo run -p braid --example echo_server -- 8000 &
//! cargo run -p braid --example echo_client -- 8000
//! ```

use braid::protocol::{ClientFactory, Factory, Protocol};
use braid::{Backend, Connector, Failure, Reactor, Transport};

struct EchoClient {
    transport: Option<Transport>,
}

impl Protocol for EchoClient {
    fn connection_made(&mut self, transport: Transport) {
        transport.write(b"hello, world");
        self.transport = Some(transport);
    }

    fn data_received(&mut self, data: &[u8]) {
        println!("server said: {}", String::from_utf8_lossy(data));
        if let Some(t) = &self.transport {
            t.lose_connection();
        }
    }

    fn connection_lost(&mut self, reason: Failure) {
        println!("connection lost: {reason}");
    }
}

/// Builds the client protocol and stops the reactor when the connection
/// fails or ends.
struct EchoFactory {
    reactor: Reactor,
}

impl Factory for EchoFactory {
    fn build_protocol(&mut self, _addr: &braid::Address) -> Option<Box<dyn Protocol>> {
        Some(Box::new(EchoClient { transport: None }))
    }
}

impl ClientFactory for EchoFactory {
    fn client_connection_failed(&mut self, _connector: &dyn Connector, reason: Failure) {
        println!("connection failed: {reason}");
        let _ = self.reactor.stop();
    }

    fn client_connection_lost(&mut self, _connector: &dyn Connector, _reason: Failure) {
        let _ = self.reactor.stop();
    }
}

fn main() -> Result<(), braid::Error> {
    let port: u16 = std::env::args().nth(1).and_then(|p| p.parse().ok()).unwrap_or(8000);
    let reactor = braid::install(Backend::from_env()?)?;
    let factory = EchoFactory { reactor: reactor.clone() };
    reactor.connect_tcp("127.0.0.1", port, factory, Some(std::time::Duration::from_secs(10)), None);
    reactor.run()
}
