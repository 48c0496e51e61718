//! The `braid exec` command (inetd-style), run as a real process with real
//! clients: `cat` echoes, `wc -c` counts an upload once the client
//! half-closes, `--max-children` refuses the connections past it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_braid");

struct Server {
    child: Child,
    port: u16,
    log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(extra: &[&str], program: &[&str]) -> Server {
    let mut child = Command::new(BIN)
        .args(["exec", "--port", "0", "--interface", "127.0.0.1"])
        .args(extra)
        .arg("--")
        .args(program)
        .env_remove("BRAID_REACTOR")
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn braid");
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    let port = line
        .split("exec listening on 127.0.0.1:")
        .nth(1)
        .and_then(|r| r.split_whitespace().next()?.parse().ok());
    let Some(port) = port else {
        let _ = child.kill();
        panic!("first line: {line:?}");
    };
    // Keep draining the log so the server never blocks on a full pipe.
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let sink = log.clone();
    std::thread::spawn(move || {
        let mut line = String::new();
        while stderr.read_line(&mut line).is_ok_and(|n| n > 0) {
            sink.lock().unwrap().push_str(&line);
            line.clear();
        }
    });
    Server { child, port, log }
}

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

#[test]
fn cat_echoes_over_every_reactor() {
    for reactor in ["select", "poll", "epoll", "io_uring"] {
        let server = start(&["--reactor", reactor], &["cat"]);
        let mut s = connect(server.port);
        s.write_all(b"through a child process\n").unwrap();
        let mut back = vec![0u8; 24];
        s.read_exact(&mut back).unwrap();
        assert_eq!(back, b"through a child process\n", "{reactor}");
        // Half-close: cat sees EOF, exits, its stdout closes, and so does
        // the connection.
        s.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "{reactor}");
    }
}

#[test]
fn wc_counts_a_large_upload_after_the_half_close() {
    let server = start(&[], &["wc", "-c"]);
    let mut s = connect(server.port);
    const SIZE: usize = 10 << 20;
    let mut writer = s.try_clone().unwrap();
    let upload = std::thread::spawn(move || {
        let chunk = vec![b'z'; 64 * 1024];
        for _ in 0..SIZE / chunk.len() {
            writer.write_all(&chunk).unwrap();
        }
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    upload.join().unwrap();
    assert_eq!(answer.trim(), SIZE.to_string());
}

#[test]
fn max_children_refuses_the_rest() {
    let server = start(&["--max-children", "1"], &["cat"]);
    let mut first = connect(server.port);
    first.write_all(b"one\n").unwrap();
    let mut back = [0u8; 4];
    first.read_exact(&mut back).unwrap();
    // The first child is running: a second connection is closed at once.
    let mut second = connect(server.port);
    let mut got = Vec::new();
    let n = second.read_to_end(&mut got).unwrap_or(0);
    assert_eq!(n, 0, "a second child was started");
    // Once the first child is gone, connections are served again.
    first.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    first.read_to_end(&mut rest).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut third = connect(server.port);
        third.write_all(b"three\n").unwrap();
        let mut back = [0u8; 6];
        if third.read_exact(&mut back).is_ok() {
            assert_eq!(&back, b"three\n");
            break;
        }
        assert!(Instant::now() < deadline, "never served again after the first child ended");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_missing_program_closes_the_connection_and_keeps_serving() {
    // With --max-children 1, a failed spawn that still counted as running
    // would refuse every later connection.
    let server = start(&["--max-children", "1"], &["braid-no-such-program"]);
    for _ in 0..3 {
        let mut s = connect(server.port);
        let mut got = Vec::new();
        assert_eq!(s.read_to_end(&mut got).unwrap(), 0);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.log.lock().unwrap().matches("cannot run").count() < 3 {
        assert!(Instant::now() < deadline, "log:\n{}", server.log.lock().unwrap());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!server.log.lock().unwrap().contains("refusing"), "{}", server.log.lock().unwrap());
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// A child that writes forever (`yes`) to a client that does not read: the
/// connection's buffer pauses reading from the child, so the server's
/// memory stays bounded; then the client reads and gets the stream.
#[test]
fn a_client_that_does_not_read_pauses_the_child() {
    let server = start(&[], &["yes", "braid"]);
    let mut s = connect(server.port);
    std::thread::sleep(Duration::from_millis(300));
    let first = rss_kib(server.child.id());
    std::thread::sleep(Duration::from_millis(1500));
    let later = rss_kib(server.child.id());
    assert!(later < first + 16 * 1024, "the server grew from {first} KiB to {later} KiB");
    let mut buf = vec![0u8; 1 << 20];
    s.read_exact(&mut buf).unwrap();
    assert!(buf.chunks(6).take(1000).all(|c| c == b"braid\n"), "the stream is not yes's output");
}
