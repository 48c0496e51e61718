//! The `braid echo` command, run as a real process.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_braid");

/// A running `braid echo` and the port it announced.
struct Server {
    child: Child,
    port: u16,
    stderr: BufReader<std::process::ChildStderr>,
}

fn start(extra: &[&str]) -> Server {
    let mut child = Command::new(BIN)
        .args(["echo", "--port", "0", "--interface", "127.0.0.1"])
        .args(extra)
        .env_remove("BRAID_REACTOR")
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn braid");
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    if !line.contains("echo listening on 127.0.0.1:") {
        // Never leave the server running behind a failed test: it would
        // hold the test's output open.
        let _ = child.kill();
        let _ = child.wait();
        panic!("first line: {line:?}");
    }
    let port = line.split("127.0.0.1:").nth(1).unwrap().split_whitespace().next().unwrap().parse().unwrap();
    Server { child, port, stderr }
}

/// A test that fails half-way still stops its server.
impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn signal(child: &Child, sig: &str) {
    let status = Command::new("kill").args([sig, &child.id().to_string()]).status().unwrap();
    assert!(status.success());
}

/// Waits (boundedly) for the process to exit and returns its status code.
fn wait_exit(child: &mut Child) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code().unwrap_or(-1);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("braid echo did not exit after the signal");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn echo_once(port: u16, msg: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(msg).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut back = Vec::new();
    s.read_to_end(&mut back).unwrap();
    back
}

#[test]
fn echoes_and_exits_zero_on_sigterm_for_every_reactor() {
    for reactor in ["select", "poll", "epoll", "io_uring"] {
        let mut server = start(&["--reactor", reactor]);
        assert_eq!(echo_once(server.port, b"hello braid"), b"hello braid");
        signal(&server.child, "-TERM");
        assert_eq!(wait_exit(&mut server.child), 0, "{reactor}");
        let mut rest = String::new();
        server.stderr.read_to_string(&mut rest).unwrap();
        assert!(rest.contains("SIGTERM"), "{rest}");
    }
}

#[test]
fn exits_zero_on_sigint() {
    let mut server = start(&[]);
    assert_eq!(echo_once(server.port, b"x"), b"x");
    signal(&server.child, "-INT");
    assert_eq!(wait_exit(&mut server.child), 0);
}

#[test]
fn half_close_gets_everything_back() {
    let mut server = start(&[]);
    let payload: Vec<u8> = (0..2_000_000u32).map(|i| (i % 251) as u8).collect();
    // Write from a thread while reading here, then half-close.
    let mut s = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut w = s.try_clone().unwrap();
    let p = payload.clone();
    let writer = std::thread::spawn(move || {
        w.write_all(&p).unwrap();
        w.shutdown(Shutdown::Write).unwrap();
    });
    let mut back = Vec::new();
    s.read_to_end(&mut back).unwrap();
    writer.join().unwrap();
    assert!(back == payload, "got {} of {} bytes back", back.len(), payload.len());
    signal(&server.child, "-TERM");
    assert_eq!(wait_exit(&mut server.child), 0);
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn memory_stays_bounded_when_the_client_does_not_read() {
    let mut server = start(&[]);
    let before = rss_kib(server.child.id());
    let mut s = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    s.set_write_timeout(Some(Duration::from_millis(500))).unwrap();
    let chunk = vec![9u8; 64 * 1024];
    let mut sent = 0usize;
    // At most 256 MiB; the server must stop reading long before that.
    while sent < 256 * 1024 * 1024 {
        match s.write(&chunk) {
            Ok(n) => sent += n,
            Err(_) => break,
        }
    }
    let after = rss_kib(server.child.id());
    assert!(
        sent < 256 * 1024 * 1024,
        "the server kept reading ({sent} bytes) from a client that never reads"
    );
    assert!(after < before + 16 * 1024, "server RSS grew from {before} KiB to {after} KiB");
    drop(s);
    signal(&server.child, "-TERM");
    assert_eq!(wait_exit(&mut server.child), 0);
}

fn run_to_end(args: &[&str], env: Option<(&str, &str)>) -> (i32, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env_remove("BRAID_REACTOR");
    if let Some((k, v)) = env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn port_in_use_is_a_one_line_error_naming_the_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let (code, err) = run_to_end(&["echo", "--port", &port, "--interface", "127.0.0.1"], None);
    assert_ne!(code, 0);
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("braid:")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].contains(&format!("127.0.0.1:{port}")) && lines[0].contains("in use"), "{err}");
}

#[test]
fn unknown_reactor_lists_the_valid_names() {
    for (args, env) in [
        (vec!["echo", "--port", "0", "--reactor", "kqueue"], None),
        (vec!["echo", "--port", "0"], Some(("BRAID_REACTOR", "iocp"))),
    ] {
        let (code, err) = run_to_end(&args, env);
        assert_ne!(code, 0);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("valid names: select, poll, epoll, io_uring"), "{err}");
    }
}

/// Python's `socket` module (an outside peer, as users have it) talks to
/// `braid echo --unix` on every reactor; the socket file has the mode
/// asked for and is gone after SIGTERM.
#[test]
fn echoes_over_a_unix_socket_to_python_for_every_reactor() {
    for reactor in ["select", "poll", "epoll", "io_uring"] {
        let path = std::env::temp_dir().join(format!("braid-cli-{}-{reactor}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let mut child = Command::new(BIN)
            .args(["echo", "--unix", path.to_str().unwrap(), "--mode", "600", "--reactor", reactor])
            .env_remove("BRAID_REACTOR")
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn braid");
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let mut server = Server { child, port: 0, stderr };
        let mut line = String::new();
        server.stderr.read_line(&mut line).unwrap();
        assert!(line.contains(&format!("echo listening on unix:{}", path.display())), "first line: {line:?}");
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{reactor}");
        }
        let script = "import socket, sys\n\
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n\
            s.settimeout(10)\n\
            s.connect(sys.argv[1])\n\
            s.sendall(b'hello from python')\n\
            s.shutdown(socket.SHUT_WR)\n\
            data = b''\n\
            while True:\n\
            \x20   chunk = s.recv(4096)\n\
            \x20   if not chunk: break\n\
            \x20   data += chunk\n\
            sys.stdout.write(data.decode())\n";
        let out =
            Command::new("python3").args(["-c", script, path.to_str().unwrap()]).output().expect("python3");
        assert!(out.status.success(), "{reactor}: python failed: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8_lossy(&out.stdout), "hello from python", "{reactor}");
        signal(&server.child, "-TERM");
        assert_eq!(wait_exit(&mut server.child), 0, "{reactor}");
        assert!(!path.exists(), "{reactor}: the socket file was left behind");
        let mut rest = String::new();
        server.stderr.read_to_string(&mut rest).unwrap();
        assert!(rest.contains("SIGTERM"), "{rest}");
    }
}

#[test]
fn a_mode_without_a_unix_socket_is_refused() {
    let (code, err) = run_to_end(&["echo", "--port", "0", "--mode", "600"], None);
    assert_ne!(code, 0);
    assert!(err.contains("--unix"), "{err}");
}

/// Runs `braid echo --systemd` with one socket handed over the way systemd
/// does (descriptor 3, LISTEN_FDS=1, LISTEN_PID naming it): Python makes
/// the socket (`make` is its Python expression) and then becomes braid
/// (exec keeps the pid). Returns the server and the socket's port, once
/// braid has announced it.
fn socket_activated(make: &str) -> (Server, u16) {
    let launcher = format!(
        "import os, socket, sys\n\
        s = {make}\n\
        sys.stdout.write(str(s.getsockname()[1]) + '\\n')\n\
        sys.stdout.flush()\n\
        if s.fileno() != 3: os.dup2(s.fileno(), 3)\n\
        os.set_inheritable(3, True)\n\
        os.environ['LISTEN_FDS'] = '1'\n\
        os.environ['LISTEN_PID'] = str(os.getpid())\n\
        os.execv(sys.argv[1], [sys.argv[1], 'echo', '--systemd'])\n"
    );
    let mut child = Command::new("python3")
        .args(["-c", &launcher, BIN])
        .env_remove("BRAID_REACTOR")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let mut server = Server { child, port: 0, stderr };
    let mut port = String::new();
    stdout.read_line(&mut port).unwrap();
    let port: u16 = port.trim().parse().expect("the launcher's port");
    let mut line = String::new();
    server.stderr.read_line(&mut line).unwrap();
    assert!(
        line.contains(&format!("echo listening on 127.0.0.1:{port} (from systemd")),
        "first line: {line:?}"
    );
    (server, port)
}

/// `braid echo --systemd` serves on a listening socket systemd passed.
#[test]
fn serves_a_socket_activated_listener() {
    let (mut server, port) = socket_activated("socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(16)");
    assert_eq!(echo_once(port, b"activated"), b"activated");
    signal(&server.child, "-TERM");
    assert_eq!(wait_exit(&mut server.child), 0);
}

#[test]
fn systemd_without_sockets_is_a_clear_error() {
    let (code, err) = run_to_end(&["echo", "--systemd"], None);
    assert_ne!(code, 0);
    assert!(err.contains("no sockets were passed"), "{err}");
}

/// Starts `braid echo --udp 0` on `reactor`; returns it with its UDP port.
fn start_udp(reactor: &str) -> Server {
    let mut child = Command::new(BIN)
        .args(["echo", "--udp", "0", "--interface", "127.0.0.1", "--reactor", reactor])
        .env_remove("BRAID_REACTOR")
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn braid");
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    let port = line
        .split("echo listening on udp 127.0.0.1:")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next().and_then(|p| p.parse().ok()));
    let Some(port) = port else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("first line: {line:?}");
    };
    Server { child, port, stderr }
}

/// Python's `socket` module against `braid echo --udp` (RFC 862) on every
/// reactor: datagrams of every size up to the packet limit come back whole
/// and to the sender, an empty one too; one over the limit is dropped (and
/// logged) without disturbing the next; SIGTERM exits 0.
#[test]
fn echoes_udp_datagrams_to_python_for_every_reactor() {
    let script = "import socket, sys\n\
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
        s.settimeout(10)\n\
        to = ('127.0.0.1', int(sys.argv[1]))\n\
        sizes = [0, 1, 2, 63, 64, 65, 512, 1200, 1472, 4096, 8191, 8192] * 20\n\
        sent = []\n\
        for i, n in enumerate(sizes):\n\
        \x20   msg = bytes((i + k) % 251 for k in range(n))\n\
        \x20   sent.append(msg)\n\
        \x20   s.sendto(msg, to)\n\
        \x20   if i % 16 == 15:\n\
        \x20       for _ in range(16): back, peer = s.recvfrom(65536); assert peer == to, peer; sent.remove(back)\n\
        assert not sent, len(sent)\n\
        s.sendto(b'x' * 9000, to)\n\
        s.sendto(b'after the big one', to)\n\
        back, _ = s.recvfrom(65536)\n\
        assert back == b'after the big one', back[:40]\n\
        sys.stdout.write('ok')\n";
    for reactor in ["select", "poll", "epoll", "io_uring"] {
        let mut server = start_udp(reactor);
        let out =
            Command::new("python3").args(["-c", script, &server.port.to_string()]).output().expect("python3");
        assert!(out.status.success(), "{reactor}: python failed: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8_lossy(&out.stdout), "ok", "{reactor}");
        signal(&server.child, "-TERM");
        assert_eq!(wait_exit(&mut server.child), 0, "{reactor}");
        let mut rest = String::new();
        server.stderr.read_to_string(&mut rest).unwrap();
        assert!(
            rest.contains("dropped a 9000-byte datagram"),
            "{reactor}: the oversize datagram was not logged:\n{rest}"
        );
        assert!(rest.contains("SIGTERM"), "{rest}");
    }
}

#[test]
fn a_udp_port_in_use_is_a_one_line_error_naming_the_address() {
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let (code, err) = run_to_end(&["echo", "--udp", &port, "--interface", "127.0.0.1"], None);
    assert_eq!(code, 1);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains(&format!("udp:127.0.0.1:{port}")), "{err}");
}

/// A datagram socket handed over the systemd way is served as a UDP echo.
#[test]
fn serves_a_socket_activated_datagram_socket() {
    let (mut server, port) =
        socket_activated("socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('127.0.0.1', 0))");
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.send_to(b"activated datagram", ("127.0.0.1", port)).unwrap();
    let mut buf = [0u8; 100];
    let (n, _) = s.recv_from(&mut buf).expect("an echo");
    assert_eq!(&buf[..n], b"activated datagram");
    signal(&server.child, "-TERM");
    assert_eq!(wait_exit(&mut server.child), 0);
}
