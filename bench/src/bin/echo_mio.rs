//! A hand-written single-threaded echo loop on mio (edge-triggered epoll), the way a user
//! would write one: a slab of connections, one shared read buffer, and per connection only
//! the bytes the kernel would not take yet.
//!
//! `echo_mio --port N` (0 picks a free port); prints `listening on 127.0.0.1:PORT`.

use std::io::{self, ErrorKind, Read, Write};
use std::net::SocketAddr;

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};

const LISTENER: Token = Token(usize::MAX);

struct Conn {
    socket: TcpStream,
    /// Echoed bytes the socket did not accept yet; while non-empty we stop reading.
    pending: Vec<u8>,
}

fn main() -> io::Result<()> {
    let args = braid_bench::Args::parse(&[]);
    let port: u16 = args.num("port", 0);
    braid_bench::raise_nofile_limit();

    let mut poll = Poll::new()?;
    let mut listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port)))?;
    poll.registry().register(&mut listener, LISTENER, Interest::READABLE)?;
    println!("listening on {}", listener.local_addr()?);

    let mut conns: Vec<Option<Conn>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut events = Events::with_capacity(1024);
    loop {
        if let Err(e) = poll.poll(&mut events, None) {
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        for event in events.iter() {
            if event.token() == LISTENER {
                loop {
                    match listener.accept() {
                        Ok((mut socket, _)) => {
                            let id = free.pop().unwrap_or_else(|| {
                                conns.push(None);
                                conns.len() - 1
                            });
                            poll.registry().register(
                                &mut socket,
                                Token(id),
                                Interest::READABLE | Interest::WRITABLE,
                            )?;
                            conns[id] = Some(Conn { socket, pending: Vec::new() });
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) => {
                            eprintln!("accept: {e}");
                            break;
                        }
                    }
                }
                continue;
            }
            let id = event.token().0;
            let Some(conn) = conns.get_mut(id).and_then(Option::as_mut) else { continue };
            if !drive(conn, &mut buf) {
                // Dropping the socket closes it, which also removes it from epoll.
                conns[id] = None;
                free.push(id);
            }
        }
    }
}

/// Flushes what is pending, then reads and echoes until the socket would block.
/// Returns false when the connection is finished.
fn drive(conn: &mut Conn, buf: &mut [u8]) -> bool {
    loop {
        while !conn.pending.is_empty() {
            match conn.socket.write(&conn.pending) {
                Ok(n) => {
                    conn.pending.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        let n = match conn.socket.read(buf) {
            Ok(0) => return false,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return false,
        };
        let mut written = 0;
        while written < n {
            match conn.socket.write(&buf[written..n]) {
                Ok(m) => written += m,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        conn.pending.extend_from_slice(&buf[written..n]);
    }
}
