//! The tiny RFC services of Twisted's `twisted.protocols.wire`: discard
//! (RFC 863), quote of the day (RFC 865) and active users (RFC 866). Echo
//! is in [`echo`](super::echo); `braid discard`, `chargen` and `daytime`
//! serve the rest.

use crate::protocol::Protocol;
use crate::transport::Transport;

/// Reads and drops everything (RFC 863).
#[derive(Default)]
pub struct Discard;

impl Protocol for Discard {
    fn data_received(&mut self, _data: &[u8]) {}
}

/// Sends one quote and closes (RFC 865).
pub struct Qotd {
    quote: String,
}

impl Qotd {
    /// Serves `quote` (a line end is added).
    pub fn new(quote: impl Into<String>) -> Qotd {
        Qotd { quote: quote.into() }
    }
}

impl Protocol for Qotd {
    fn connection_made(&mut self, t: Transport) {
        t.write(self.quote.trim_end().as_bytes());
        t.write(b"\r\n");
        t.lose_connection();
    }

    fn data_received(&mut self, _data: &[u8]) {}
}

/// Sends the list of active users, one per line, and closes (RFC 866).
/// Like Twisted's, it reports one user, `root`: the real list is the
/// host's business, not the network's.
#[derive(Default)]
pub struct Who;

impl Protocol for Who {
    fn connection_made(&mut self, t: Transport) {
        t.write(b"root\r\n");
        t.lose_connection();
    }

    fn data_received(&mut self, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocols::echo::Echo;
    use crate::testing::StringTransport;

    // §4.16 item 1: Echo echoes; Who, QOTD and Discard behave per their RFCs.
    #[test]
    fn wire_protocols() {
        let st = StringTransport::new();
        let mut echo = Echo::new();
        st.connect(&mut echo);
        st.feed(&mut echo, b"hello");
        assert_eq!(st.value(), b"hello");

        let st = StringTransport::new();
        let mut who = Who;
        st.connect(&mut who);
        assert_eq!(st.value(), b"root\r\n");
        assert!(st.disconnecting());

        let st = StringTransport::new();
        let mut qotd = Qotd::new("An apple a day keeps the doctor away.");
        st.connect(&mut qotd);
        assert_eq!(st.value(), b"An apple a day keeps the doctor away.\r\n");
        assert!(st.disconnecting());

        let st = StringTransport::new();
        let mut discard = Discard;
        st.connect(&mut discard);
        st.feed(&mut discard, b"gone");
        assert!(st.value().is_empty());
        assert!(!st.disconnecting());
    }
}
