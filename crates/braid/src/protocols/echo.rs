//! The echo protocol (RFC 862): sends back everything it receives.
//!
//! It is a well-behaved consumer: it registers its own transport as a
//! streaming producer, so when the peer stops reading and the write buffer
//! passes the high-water mark, it stops reading too, and memory stays
//! bounded. On half-close it finishes sending what it received, then closes.

use crate::protocol::{HalfCloseable, Protocol};
use crate::transport::Transport;

/// Echoes every byte back to the sender.
#[derive(Default)]
pub struct Echo {
    transport: Option<Transport>,
}

impl Echo {
    /// A new, unconnected echo protocol.
    pub fn new() -> Echo {
        Echo::default()
    }
}

impl Protocol for Echo {
    fn connection_made(&mut self, transport: Transport) {
        // A fresh transport has no producer, so this cannot be refused.
        let _ = transport.register_producer(transport.as_producer(), true);
        self.transport = Some(transport);
    }

    fn data_received(&mut self, data: &[u8]) {
        if let Some(t) = &self.transport {
            t.write(data);
        }
    }

    fn as_half_closeable(&mut self) -> Option<&mut dyn HalfCloseable> {
        Some(self)
    }
}

impl HalfCloseable for Echo {
    fn read_connection_lost(&mut self) {
        if let Some(t) = &self.transport {
            t.unregister_producer();
            t.lose_connection();
        }
    }
}

/// The UDP echo protocol (RFC 862): each datagram goes back to its sender
/// as it came, on the port it arrived on.
#[derive(Default)]
pub struct DatagramEcho {
    transport: Option<crate::datagram::DatagramTransport>,
}

impl DatagramEcho {
    /// A new echo protocol, not attached to a port yet.
    pub fn new() -> DatagramEcho {
        DatagramEcho::default()
    }
}

impl crate::datagram::DatagramProtocol for DatagramEcho {
    fn make_connection(&mut self, transport: crate::datagram::DatagramTransport) {
        self.transport = Some(transport);
    }

    fn datagram_received(&mut self, data: &[u8], from: &crate::stream::Address) {
        if let Some(t) = &self.transport {
            // A full send queue drops the echo, as a congested network would;
            // say so rather than lose it silently.
            if let Err(e) = t.write(data, Some(from)) {
                tracing::debug!(target: "braid", "echo to {from} not sent: {e}");
            }
        }
    }
}
