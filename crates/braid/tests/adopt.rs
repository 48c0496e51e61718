//! Socket adoption (Twisted's `IReactorSocket`, reference §4.10): listening
//! and connected TCP and UNIX sockets made elsewhere, on every backend.

mod common;

use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};

use braid::protocols::echo::Echo;
use braid::Error;
use common::{echo_via, WATCHDOG};

reactor_test! {
    /// A std `TcpListener` (blocking, as std makes it) serves braid
    /// connections once adopted; the port reports its address.
    fn adopted_tcp_listener_serves(r) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let port = r.adopt_stream_port(listener, Echo::new).unwrap();
        assert_eq!(port.local_addr(), addr);
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(WATCHDOG)).unwrap();
        assert_eq!(echo_via(&r, move || s, b"adopted tcp"), b"adopted tcp");
    }
}

reactor_test! {
    /// A std `UnixListener` is adopted the same way; its socket file stays
    /// when the port stops (it belongs to whoever bound it).
    fn adopted_unix_listener_serves_and_keeps_its_file(r) {
        let path = std::env::temp_dir().join(format!("braid-adopt-{}-{}.sock", std::process::id(), r.backend()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let port = r.adopt_stream_port(listener, Echo::new).unwrap();
        assert_eq!(port.host().unix_path(), Some(path.as_path()));
        let s = UnixStream::connect(&path).unwrap();
        s.set_read_timeout(Some(WATCHDOG)).unwrap();
        assert_eq!(echo_via(&r, move || s, b"adopted unix"), b"adopted unix");
        drop(port.stop_listening());
        assert!(path.exists(), "the adopted socket's file was removed");
        let _ = std::fs::remove_file(&path);
    }
}

reactor_test! {
    /// Connected sockets: an accepted TCP stream and one end of a UNIX
    /// socketpair each get a protocol from the factory and echo.
    fn adopted_connections_echo(r) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        r.adopt_stream_connection(accepted, Echo::new).unwrap();
        client.set_read_timeout(Some(WATCHDOG)).unwrap();
        assert_eq!(echo_via(&r, move || client, b"tcp stream"), b"tcp stream");

        let r = common::build(r.backend());
        let (ours, theirs) = UnixStream::pair().unwrap();
        r.adopt_stream_connection(ours, Echo::new).unwrap();
        theirs.set_read_timeout(Some(WATCHDOG)).unwrap();
        assert_eq!(echo_via(&r, move || theirs, b"socketpair"), b"socketpair");
    }
}

reactor_test! {
    /// What cannot be adopted is a clear error, not a broken port: a pipe,
    /// a listener offered as a connection, a connection offered as a port.
    fn unadoptable_descriptors_are_errors(r) {
        let (read_end, _write_end) = rustix::pipe::pipe().unwrap();
        assert!(matches!(r.adopt_stream_port(read_end, Echo::new), Err(Error::Io { .. })));
        let other = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = other.local_addr().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        match r.adopt_stream_connection(listener, Echo::new) {
            Err(e) => assert!(e.to_string().contains("listener"), "{e}"),
            Ok(()) => panic!("a listener was adopted as a connection"),
        }
        let stream = TcpStream::connect(addr).unwrap();
        match r.adopt_stream_port(stream, Echo::new) {
            Err(e) => assert!(e.to_string().contains("not listening"), "{e}"),
            Ok(_) => panic!("a connection was adopted as a port"),
        }
    }
}
