//! `braid discard`: the discard service (RFC 863): reads and drops
//! everything, on streams and datagrams.

use braid::datagram::{DatagramProtocol, SharedDatagram};
use braid::protocol::{IntoFactory, Protocol};
use braid::Address;

use super::{Common, Serve};

/// Arguments of `braid discard`.
#[derive(clap::Args, Clone)]
pub struct Args {
    /// Where to listen, as an endpoint; repeatable (default tcp:9).
    #[arg(long, value_name = "ENDPOINT", default_value = "tcp:9")]
    listen: Vec<String>,
}

/// Drops what it reads.
struct Discard;

impl Protocol for Discard {
    fn data_received(&mut self, _data: &[u8]) {}
}

impl DatagramProtocol for Discard {
    fn datagram_received(&mut self, _data: &[u8], _from: &Address) {}
}

/// Serves discard until SIGINT or SIGTERM.
pub fn run(common: Common, args: Args) -> Result<(), String> {
    let what = Serve {
        name: "discard",
        streams: Some((|| Discard).into_shared()),
        datagrams: Some(SharedDatagram::new(Discard).erase()),
        over: "",
    };
    super::serve(common, &args.listen, what)
}
