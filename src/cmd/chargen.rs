//! `braid chargen`: the character generator (RFC 864): an endless stream
//! of lines of 72 printable characters, each starting one character later
//! than the one before. It is a pull producer: the transport asks for the
//! next chunk only when its buffer has drained, so a client that reads
//! slowly (or never) costs one chunk of memory, not an ever-growing buffer.
//! A datagram gets one datagram of lines back.

use std::rc::Rc;

use braid::datagram::{DatagramProtocol, DatagramTransport, SharedDatagram};
use braid::protocol::{IntoFactory, Protocol};
use braid::transport::Producer;
use braid::{Address, Failure, Transport};

use super::{Common, Serve};

/// Arguments of `braid chargen`.
#[derive(clap::Args, Clone)]
pub struct Args {
    /// Where to listen, as an endpoint; repeatable (default tcp:19).
    #[arg(long, value_name = "ENDPOINT", default_value = "tcp:19")]
    listen: Vec<String>,
}

const LINE: usize = 72;
/// The 95 printable ASCII characters, twice, so any line is one slice.
const RING: &[u8; 190] = b" !\"#$%&'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_`abcdefghijklmnopqrstuvwxyz{|}~ !\"#$%&'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_`abcdefghijklmnopqrstuvwxyz{|}~";

/// Appends lines `first..first + count` (line `n` starts at character
/// `n % 95`) to `out`.
pub fn lines(first: usize, count: usize, out: &mut Vec<u8>) {
    for n in first..first + count {
        let start = n % 95;
        out.extend_from_slice(&RING[start..start + LINE]);
        out.extend_from_slice(b"\r\n");
    }
}

/// Lines per chunk the transport pulls.
const CHUNK_LINES: usize = 256;

/// Writes the next chunk whenever the transport asks.
struct Pull {
    transport: Transport,
    next: std::cell::Cell<usize>,
}

impl Producer for Pull {
    fn resume_producing(&self) {
        let mut chunk = Vec::with_capacity(CHUNK_LINES * (LINE + 2));
        lines(self.next.get(), CHUNK_LINES, &mut chunk);
        self.next.set(self.next.get() + CHUNK_LINES);
        self.transport.write_vec(chunk);
    }
    fn stop_producing(&self) {}
}

struct Chargen {
    transport: Option<DatagramTransport>,
}

impl Protocol for Chargen {
    fn connection_made(&mut self, t: Transport) {
        let pull = Rc::new(Pull { transport: t.clone(), next: std::cell::Cell::new(0) });
        // A fresh transport has no producer, so this cannot be refused.
        let _ = t.register_producer(pull, false);
    }
    fn data_received(&mut self, _data: &[u8]) {}
    fn connection_lost(&mut self, _reason: Failure) {}
}

impl DatagramProtocol for Chargen {
    fn make_connection(&mut self, t: DatagramTransport) {
        self.transport = Some(t);
    }
    fn datagram_received(&mut self, _data: &[u8], from: &Address) {
        if let Some(t) = &self.transport {
            let mut out = Vec::new();
            lines(0, 7, &mut out);
            let _ = t.write(&out, Some(from));
        }
    }
}

/// Serves chargen until SIGINT or SIGTERM.
pub fn run(common: Common, args: Args) -> Result<(), String> {
    let what = Serve {
        name: "chargen",
        streams: Some((|| Chargen { transport: None }).into_shared()),
        datagrams: Some(SharedDatagram::new(Chargen { transport: None }).erase()),
        over: "",
    };
    super::serve(common, &args.listen, what)
}

#[cfg(test)]
mod tests {
    #[test]
    fn lines_rotate() {
        let mut out = Vec::new();
        super::lines(0, 96, &mut out);
        let lines: Vec<&[u8]> = out.split(|&b| b == b'\n').filter(|l| !l.is_empty()).collect();
        assert_eq!(lines.len(), 96);
        assert!(lines.iter().all(|l| l.len() == 73 && l.ends_with(b"\r")));
        assert_eq!(&lines[0][..3], b" !\"");
        assert_eq!(&lines[1][..3], b"!\"#");
        assert_eq!(lines[95], lines[0], "the pattern repeats every 95 lines");
    }
}
