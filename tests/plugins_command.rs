//! The `braid` plugins as real processes with real peers: several
//! `--listen` endpoints at once, bad endpoints, SIGTERM with open
//! connections and the grace period, discard, chargen with a client that
//! never reads, daytime, and portforward in front of real servers.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_braid");

/// A running plugin, the addresses it announced, and its log so far.
struct Server {
    child: Child,
    addrs: Vec<String>,
    log: Arc<Mutex<String>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Starts `braid ARGS` and waits for `listeners` "listening on" lines.
fn start(args: &[&str], listeners: usize) -> Server {
    let mut child =
        Command::new(BIN).args(args).env_remove("BRAID_REACTOR").stderr(Stdio::piped()).spawn().unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut addrs = Vec::new();
    let mut seen = String::new();
    while addrs.len() < listeners {
        let mut line = String::new();
        if stderr.read_line(&mut line).unwrap_or(0) == 0 {
            let _ = child.kill();
            panic!("braid {args:?} ended before listening:\n{seen}");
        }
        seen.push_str(&line);
        let announced = ["echo", "discard", "chargen", "daytime", "portforward", "exec"]
            .iter()
            .any(|p| line.contains(&format!(" {p} listening on ")));
        if let Some(rest) = line.split(" listening on ").nth(1).filter(|_| announced) {
            addrs.push(rest.split(" (reactor").next().unwrap().trim().to_string());
        }
    }
    let log = Arc::new(Mutex::new(seen));
    let sink = log.clone();
    std::thread::spawn(move || {
        let mut line = String::new();
        while stderr.read_line(&mut line).is_ok_and(|n| n > 0) {
            sink.lock().unwrap().push_str(&line);
            line.clear();
        }
    });
    Server { child, addrs, log }
}

fn signal(child: &Child, sig: &str) {
    assert!(Command::new("kill").args([sig, &child.id().to_string()]).status().unwrap().success());
}

fn wait_exit(child: &mut Child, within: Duration) -> i32 {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code().unwrap_or(-1);
        }
        assert!(Instant::now() < deadline, "braid did not exit in {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn run_to_end(args: &[&str]) -> (i32, String) {
    let out = Command::new(BIN).args(args).env_remove("BRAID_REACTOR").output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn connect(addr: &str) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

fn temp_sock(what: &str) -> String {
    let p = std::env::temp_dir().join(format!("braid-plugin-{}-{what}.sock", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p.to_string_lossy().into_owned()
}

#[test]
fn echo_on_two_endpoints_at_once() {
    let path = temp_sock("two");
    let unix = format!("unix:{path}");
    let mut server = start(&["echo", "--listen", "tcp:0:interface=127.0.0.1", "--listen", &unix], 2);
    assert!(server.addrs[0].starts_with("127.0.0.1:"), "{:?}", server.addrs);
    assert_eq!(server.addrs[1], format!("unix:{path}"));
    let mut t = connect(&server.addrs[0]);
    t.write_all(b"over tcp").unwrap();
    let mut back = [0u8; 8];
    t.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"over tcp");
    let mut u = std::os::unix::net::UnixStream::connect(&path).unwrap();
    u.write_all(b"over unix").unwrap();
    let mut back = [0u8; 9];
    u.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"over unix");
    drop((t, u));
    signal(&server.child, "-TERM");
    assert_eq!(wait_exit(&mut server.child, Duration::from_secs(20)), 0);
    assert!(!std::path::Path::new(&path).exists());
}

#[test]
fn bad_endpoints_are_one_line_errors() {
    for (args, want) in [
        (vec!["echo", "--listen", "tpc:80"], "--listen tpc:80: unknown endpoint type 'tpc'"),
        (vec!["discard", "--listen", "tcp:x"], "--listen tcp:x: tcp: port 'x' is not a number"),
        (
            vec!["portforward", "--listen", "tcp:0", "--connect", "tcp:nowhere"],
            "--connect tcp:nowhere: tcp: no port given",
        ),
        (
            vec!["portforward", "--listen", "udp:0", "--connect", "tcp:h:1"],
            "portforward serves only datagrams",
        ),
    ] {
        let (code, err) = run_to_end(&args);
        assert_eq!(code, 1, "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(
            err.contains(want)
                || (want.contains("only datagrams") && err.contains("does not serve datagrams")),
            "{args:?}: {err}"
        );
    }
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let (code, err) = run_to_end(&["daytime", "--listen", &format!("tcp:{port}:interface=127.0.0.1")]);
    assert_eq!(code, 1);
    assert!(err.contains(&format!("127.0.0.1:{port}")) && err.trim().lines().count() == 1, "{err}");
    let (code, err) = run_to_end(&["--reactor", "nope", "echo"]);
    assert_eq!(code, 1);
    assert!(err.contains("unknown reactor"), "{err}");
}

/// SIGTERM with an idle connection open: the listener closes first, the
/// connection is closed cleanly, exit 0. With a connection that cannot
/// finish (echo to a client that writes and never reads), the grace
/// period ends it.
#[test]
fn sigterm_closes_listeners_then_connections_within_the_grace() {
    let mut server = start(&["--grace", "0.5", "echo", "--listen", "tcp:0:interface=127.0.0.1"], 1);
    let mut idle = connect(&server.addrs[0]);
    idle.write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    idle.read_exact(&mut b).unwrap();
    signal(&server.child, "-TERM");
    let mut rest = Vec::new();
    idle.read_to_end(&mut rest).expect("a clean close");
    assert_eq!(wait_exit(&mut server.child, Duration::from_secs(20)), 0);
    assert!(
        server.log.lock().unwrap().contains("closing 1 open connection"),
        "{}",
        server.log.lock().unwrap()
    );

    // A client that writes without reading: echo's own buffer fills and
    // cannot drain, so the close cannot finish and the grace period ends it.
    let mut server = start(&["--grace", "0.5", "echo", "--listen", "tcp:0:interface=127.0.0.1"], 1);
    let stuck = connect(&server.addrs[0]);
    let mut writer = stuck.try_clone().unwrap();
    let written = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = written.clone();
    let flood = std::thread::spawn(move || {
        let chunk = vec![0u8; 64 << 10];
        for _ in 0..4096 {
            if writer.write_all(&chunk).is_err() {
                break;
            }
            counter.fetch_add(chunk.len(), std::sync::atomic::Ordering::Relaxed);
        }
    });
    // Stuck means the writes stopped going through: every buffer on the way
    // is full, however long a loaded machine takes to get there.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = (0, Instant::now());
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let now = written.load(std::sync::atomic::Ordering::Relaxed);
        if now != last.0 {
            last = (now, Instant::now());
        } else if now > 0 && last.1.elapsed() > Duration::from_millis(500) {
            break;
        }
        assert!(Instant::now() < deadline, "the echo never stopped taking bytes ({now} written)");
    }
    let t0 = Instant::now();
    signal(&server.child, "-TERM");
    assert_eq!(wait_exit(&mut server.child, Duration::from_secs(20)), 0);
    assert!(
        t0.elapsed() >= Duration::from_millis(400),
        "the grace period was not given ({:?}): {}",
        t0.elapsed(),
        server.log.lock().unwrap()
    );
    assert!(
        server.log.lock().unwrap().contains("grace period over: aborting 1 connection"),
        "{}",
        server.log.lock().unwrap()
    );
    drop(stuck);
    flood.join().unwrap();
}

#[test]
fn discard_drops_everything() {
    let server = start(
        &["discard", "--listen", "tcp:0:interface=127.0.0.1", "--listen", "udp:0:interface=127.0.0.1"],
        2,
    );
    let mut s = connect(&server.addrs[0]);
    s.write_all(&vec![7u8; 1 << 20]).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut back = Vec::new();
    s.read_to_end(&mut back).unwrap();
    assert!(back.is_empty(), "discard answered");
    let udp_addr = server.addrs[1].trim_start_matches("udp ").to_string();
    let u = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    u.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    u.send_to(b"gone", &udp_addr).unwrap();
    assert!(u.recv(&mut [0u8; 16]).is_err(), "discard answered a datagram");
}

#[test]
fn daytime_sends_a_line_and_closes() {
    let server = start(&["daytime", "--listen", "tcp:0:interface=127.0.0.1"], 1);
    let mut s = connect(&server.addrs[0]);
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    assert!(text.ends_with(" +0000\r\n") && text.len() > 25, "{text:?}");
    let year = std::process::Command::new("date").args(["-u", "+%Y"]).output().unwrap();
    assert!(text.contains(String::from_utf8_lossy(&year.stdout).trim()), "{text:?}");
}

/// Chargen to a client that never reads: memory stays flat; once it
/// reads, the lines follow RFC 864's pattern.
#[test]
fn chargen_with_a_client_that_never_reads_stays_bounded() {
    let server = start(&["chargen", "--listen", "tcp:0:interface=127.0.0.1"], 1);
    let mut s = connect(&server.addrs[0]);
    std::thread::sleep(Duration::from_millis(300));
    let first = rss_kib(server.child.id());
    std::thread::sleep(Duration::from_millis(1500));
    let later = rss_kib(server.child.id());
    assert!(later < first + 4096, "chargen grew from {first} KiB to {later} KiB");
    let mut buf = vec![0u8; 74 * 200];
    s.read_exact(&mut buf).unwrap();
    for (i, line) in buf.chunks(74).enumerate() {
        assert_eq!(line.len(), 74);
        assert_eq!(&line[72..], b"\r\n");
        assert_eq!(line[0], b' ' + (i % 95) as u8, "line {i}");
    }
}

/// Runs a Python snippet with a timeout; returns its stdout.
fn python(script: &str, args: &[&str]) -> String {
    let out = Command::new("python3").arg("-c").arg(script).args(args).output().expect("python3");
    assert!(out.status.success(), "python failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// portforward in front of braid echo: 256 MiB each way, sha256 checked
/// on both sides, the client half-closing through the forwarder; copying
/// and spliced. Returns the forwarder's log.
fn carry_256_mib_each_way(splice: &str) -> String {
    let echo = start(&["echo", "--listen", "tcp:0:interface=127.0.0.1"], 1);
    let dest = format!("tcp:{}", echo.addrs[0]);
    let args = [
        "--log-level",
        "debug",
        "portforward",
        "--splice",
        splice,
        "--listen",
        "tcp:0:interface=127.0.0.1",
        "--connect",
        &dest,
    ];
    let fwd = start(&args, 1);
    let script = "import hashlib, socket, sys, threading\n\
        host, port = sys.argv[1].rsplit(':', 1)\n\
        s = socket.create_connection((host, int(port)), timeout=60)\n\
        total = 256 << 20\n\
        chunk = bytes(range(256)) * 4096\n\
        sent = hashlib.sha256()\n\
        def send():\n\
        \x20   n = 0\n\
        \x20   while n < total:\n\
        \x20       piece = chunk[: min(len(chunk), total - n)]\n\
        \x20       s.sendall(piece); sent.update(piece); n += len(piece)\n\
        \x20   s.shutdown(socket.SHUT_WR)\n\
        t = threading.Thread(target=send); t.start()\n\
        got = hashlib.sha256(); n = 0\n\
        while True:\n\
        \x20   data = s.recv(1 << 20)\n\
        \x20   if not data: break\n\
        \x20   got.update(data); n += len(data)\n\
        t.join()\n\
        assert n == total, n\n\
        assert got.hexdigest() == sent.hexdigest()\n\
        print('ok', n)\n";
    assert_eq!(python(script, &[&fwd.addrs[0]]).trim(), format!("ok {}", 256 << 20), "--splice {splice}");
    let log = fwd.log.lock().unwrap().clone();
    log
}

#[test]
fn portforward_carries_256_mib_each_way_copying() {
    let log = carry_256_mib_each_way("off");
    assert!(!log.contains("spliced"), "--splice off spliced:\n{log}");
}

/// With splice, the bytes go socket to pipe to socket in the kernel.
#[test]
fn portforward_carries_256_mib_each_way_spliced() {
    let log = carry_256_mib_each_way("on");
    assert!(log.contains("spliced"), "--splice on did not splice:\n{log}");
}

/// portforward in front of Python's HTTP server, with Python's HTTP client
/// in front: a file comes through whole.
#[test]
fn portforward_in_front_of_an_http_server() {
    let dir = std::env::temp_dir().join(format!("braid-pf-http-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let body: Vec<u8> = (0..(3 << 20)).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(dir.join("file.bin"), &body).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut http = Command::new("python3")
        .args([
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--directory",
            dir.to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the HTTP server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let fwd = start(
        &[
            "portforward",
            "--listen",
            "tcp:0:interface=127.0.0.1",
            "--connect",
            &format!("tcp:127.0.0.1:{port}"),
        ],
        1,
    );
    let script = "import hashlib, sys, urllib.request\n\
        data = urllib.request.urlopen('http://' + sys.argv[1] + '/file.bin', timeout=30).read()\n\
        print(len(data), hashlib.sha256(data).hexdigest())\n";
    let out = python(script, &[&fwd.addrs[0]]);
    let want = python(
        "import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],'rb').read()).hexdigest())",
        &[dir.join("file.bin").to_str().unwrap()],
    );
    assert_eq!(out.trim(), format!("{} {}", body.len(), want.trim()));
    let _ = http.kill();
    let _ = http.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A destination that refuses closes the client, with a log line.
#[test]
fn portforward_to_a_refusing_destination_closes_the_client() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let fwd = start(
        &[
            "portforward",
            "--listen",
            "tcp:0:interface=127.0.0.1",
            "--connect",
            &format!("tcp:127.0.0.1:{dead}"),
        ],
        1,
    );
    let mut s = connect(&fwd.addrs[0]);
    let mut got = Vec::new();
    assert_eq!(s.read_to_end(&mut got).unwrap_or(0), 0);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !fwd.log.lock().unwrap().contains("cannot reach") {
        assert!(Instant::now() < deadline, "{}", fwd.log.lock().unwrap());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Backpressure through the forwarder: chargen behind it, a client that
/// does not read in front; the forwarder's memory stays flat, copying or
/// spliced.
#[test]
fn portforward_backpressure_when_the_client_stalls() {
    backpressure("off");
    backpressure("on");
}

/// The other direction: a destination that accepts and never reads, a
/// client that uploads; the forwarder stops reading the client, so its
/// memory stays flat and the client's writes stall.
#[test]
fn portforward_backpressure_when_the_destination_stalls() {
    for splice in ["off", "on"] {
        let sink = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dest = format!("tcp:{}", sink.local_addr().unwrap());
        let fwd = start(
            &["portforward", "--splice", splice, "--listen", "tcp:0:interface=127.0.0.1", "--connect", &dest],
            1,
        );
        let client = connect(&fwd.addrs[0]);
        let (_held, _) = sink.accept().unwrap();
        let mut writer = client.try_clone().unwrap();
        writer.set_write_timeout(Some(Duration::from_millis(500))).unwrap();
        let first = rss_kib(fwd.child.id());
        let chunk = vec![5u8; 1 << 20];
        let mut written = 0usize;
        while written < (256 << 20) && writer.write_all(&chunk).is_ok() {
            written += chunk.len();
        }
        let later = rss_kib(fwd.child.id());
        assert!(written < (256 << 20), "--splice {splice}: 256 MiB went into a destination that never reads");
        assert!(
            later < first + 8192,
            "--splice {splice}: the forwarder grew from {first} KiB to {later} KiB"
        );
    }
}

fn backpressure(splice: &str) {
    let gen = start(&["chargen", "--listen", "tcp:0:interface=127.0.0.1"], 1);
    let dest = format!("tcp:{}", gen.addrs[0]);
    let fwd = start(
        &["portforward", "--splice", splice, "--listen", "tcp:0:interface=127.0.0.1", "--connect", &dest],
        1,
    );
    let mut s = connect(&fwd.addrs[0]);
    std::thread::sleep(Duration::from_millis(300));
    let first = rss_kib(fwd.child.id());
    std::thread::sleep(Duration::from_millis(1500));
    let later = rss_kib(fwd.child.id());
    assert!(later < first + 4096, "--splice {splice}: the forwarder grew from {first} KiB to {later} KiB");
    let mut buf = vec![0u8; 74 * 100];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(buf[0], b' ');
}

/// `--workers 2`: two reactors, each with its own SO_REUSEPORT listener;
/// connections are served by both; SIGTERM stops both, exit 0.
#[test]
fn two_workers_both_accept() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let listen = format!("tcp:{port}:interface=127.0.0.1");
    let mut server = start(&["--workers", "2", "--log-level", "debug", "echo", "--listen", &listen], 2);
    assert!(
        server.log.lock().unwrap().contains("worker 0") && server.log.lock().unwrap().contains("worker 1")
    );
    for i in 0..64u32 {
        let mut s = connect(&format!("127.0.0.1:{port}"));
        s.write_all(&i.to_be_bytes()).unwrap();
        let mut back = [0u8; 4];
        s.read_exact(&mut back).unwrap();
        assert_eq!(back, i.to_be_bytes());
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = server.log.lock().unwrap().clone();
        let served =
            |w: u32| log.lines().any(|l| l.contains("accepted") && l.ends_with(&format!("on worker {w}")));
        if served(0) && served(1) {
            break;
        }
        assert!(Instant::now() < deadline, "64 connections did not reach both workers:\n{log}");
        std::thread::sleep(Duration::from_millis(20));
    }
    signal(&server.child, "-TERM");
    assert_eq!(wait_exit(&mut server.child, Duration::from_secs(20)), 0);
    // A port someone else holds: a clear error, and no worker left behind.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = format!("tcp:{}:interface=127.0.0.1", taken.local_addr().unwrap().port());
    let (code, err) = run_to_end(&["--workers", "2", "echo", "--listen", &busy]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cannot listen"), "{err}");
    // Port 0 cannot be shared: a clear error.
    let (code, err) = run_to_end(&["--workers", "2", "echo", "--listen", "tcp:0"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--workers needs a fixed port"), "{err}");
}

/// `--log-format json`: one JSON object per line, the listening line among them.
#[test]
fn json_log_lines() {
    let mut child = Command::new(BIN)
        .args(["--log-format", "json", "daytime", "--listen", "tcp:0:interface=127.0.0.1"])
        .env_remove("BRAID_REACTOR")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let script = "import json, sys\nv = json.loads(sys.argv[1])\nprint(v['level'], v['fields']['message'])\n";
    let out = python(script, &[line.trim()]);
    assert!(out.starts_with("INFO daytime listening on 127.0.0.1:"), "{out} from {line}");
}
