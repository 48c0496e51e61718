//! A TLS client for tests that drive a plain socket: a thread terminates
//! TLS (rustls) and relays plaintext over a socket pair, so a test reads,
//! writes, half-closes and clones its end exactly as it would a TCP
//! socket. Its buffers are bounded (it reads from one side only when the
//! other has taken what it had), so backpressure reaches the test end to
//! end.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags};

/// A socket the proxy can drive: TCP or UNIX.
pub trait Net: Read + Write + AsFd + Send + 'static {
    fn set_nonblocking(&self, on: bool) -> std::io::Result<()>;
    fn shutdown_write(&self) -> std::io::Result<()>;
}

impl Net for std::net::TcpStream {
    fn set_nonblocking(&self, on: bool) -> std::io::Result<()> {
        std::net::TcpStream::set_nonblocking(self, on)
    }
    fn shutdown_write(&self) -> std::io::Result<()> {
        self.shutdown(std::net::Shutdown::Write)
    }
}

impl Net for UnixStream {
    fn set_nonblocking(&self, on: bool) -> std::io::Result<()> {
        UnixStream::set_nonblocking(self, on)
    }
    fn shutdown_write(&self) -> std::io::Result<()> {
        self.shutdown(std::net::Shutdown::Write)
    }
}

/// Starts TLS over `net` to `name` and returns the plaintext end.
pub fn connect(net: impl Net, config: Arc<rustls::ClientConfig>, name: &str) -> UnixStream {
    let name = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
    let mut conn = rustls::ClientConnection::new(config, name).unwrap();
    // Bounded by the relay itself (it reads only what it can pass on).
    conn.set_buffer_limit(None);
    let (test_end, mine) = UnixStream::pair().unwrap();
    std::thread::spawn(move || relay(conn, net, mine));
    test_end
}

/// How long a proxy lives at most: longer than any test's watchdog.
const LIFETIME: Duration = Duration::from_secs(60);
const BOUND: usize = 64 * 1024;

fn relay(mut conn: rustls::ClientConnection, mut net: impl Net, mut app: UnixStream) {
    net.set_nonblocking(true).unwrap();
    app.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + LIFETIME;
    let mut to_app: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; BOUND];
    // The test ended its side.
    let mut app_eof = false;
    // close_notify queued (only once the handshake is done: before, it
    // would cut off what the test wrote).
    let mut notified = false;
    // close_notify and everything before it sent, our write side shut.
    let mut net_shut = false;
    // The server ended its side (close_notify or end of stream).
    let mut net_done = false;
    // The test was told (its read side got end of stream).
    let mut app_shut = false;
    while Instant::now() < deadline {
        while conn.wants_write() {
            match conn.write_tls(&mut net) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                // Reset or broken: drop both ends.
                Err(_) => return,
            }
        }
        if app_eof && !notified && !conn.is_handshaking() {
            conn.send_close_notify();
            notified = true;
            continue;
        }
        if notified && !net_shut && !conn.wants_write() {
            let _ = net.shutdown_write();
            net_shut = true;
        }
        if !to_app.is_empty() {
            match app.write(&to_app) {
                Ok(n) => drop(to_app.drain(..n)),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
        if net_done && to_app.is_empty() && !app_shut {
            let _ = app.shutdown(std::net::Shutdown::Write);
            app_shut = true;
        }
        if app_shut && net_shut {
            return;
        }
        let mut read_app = !app_eof && !conn.wants_write();
        if read_app {
            match app.read(&mut buf) {
                Ok(0) => app_eof = true,
                Ok(n) => conn.writer().write_all(&buf[..n]).unwrap(),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
            read_app = !app_eof && !conn.wants_write();
        }
        let mut read_net = !net_done && to_app.len() < BOUND;
        if read_net {
            match conn.read_tls(&mut net) {
                Ok(0) => net_done = true,
                Ok(_) => match conn.process_new_packets() {
                    Ok(state) => {
                        let n = state.plaintext_bytes_to_read();
                        let at = to_app.len();
                        to_app.resize(at + n, 0);
                        conn.reader().read_exact(&mut to_app[at..]).unwrap();
                        if state.peer_has_closed() {
                            net_done = true;
                        }
                    }
                    // A TLS error: the test sees its stream end.
                    Err(_) => return,
                },
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
            read_net = !net_done && to_app.len() < BOUND;
        }
        let mut net_flags = PollFlags::empty();
        if read_net {
            net_flags |= PollFlags::IN;
        }
        if conn.wants_write() {
            net_flags |= PollFlags::OUT;
        }
        let mut app_flags = PollFlags::empty();
        if read_app {
            app_flags |= PollFlags::IN;
        }
        if !to_app.is_empty() {
            app_flags |= PollFlags::OUT;
        }
        let mut fds = [PollFd::new(&net, net_flags), PollFd::new(&app, app_flags)];
        let timeout = rustix::time::Timespec { tv_sec: 0, tv_nsec: 50_000_000 };
        let _ = poll(&mut fds, Some(&timeout));
    }
}
