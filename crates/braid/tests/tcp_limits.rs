//! TCP at the descriptor limits, each case in a child process because it
//! changes process-wide state: more than FD_SETSIZE connections, and a
//! server that runs out of descriptors.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use braid::protocols::echo::Echo;
use braid::{Backend, Reactor};
use common::{capture_logs, in_child, is_child};

fn child_backend() -> Backend {
    std::env::var(common::CHILD_ENV).unwrap().parse().unwrap()
}

const MANY: usize = 1_100;

/// Opens MANY client connections to an echo server on the reactor (on
/// poll and epoll every one is echoed; select reports the descriptors it
/// cannot watch and closes those connections instead of misbehaving).
#[test]
fn more_connections_than_fd_setsize() {
    if !is_child() {
        for backend in ["select", "poll", "epoll", "io_uring"] {
            let out = in_child("more_connections_than_fd_setsize", backend);
            let want =
                if backend == "select" { "select refused the excess cleanly" } else { "all 1100 echoed" };
            assert!(out.contains(want), "{backend}: {out}");
        }
        return;
    }
    let backend = child_backend();
    assert!(common::set_fd_limit(u64::MAX) >= 2 * MANY as u64 + 100, "descriptor limit too low");
    let r = Reactor::new(backend).unwrap();
    let port = r.listen_tcp("127.0.0.1:0", Echo::new, 1024).unwrap();
    let addr = port.local_addr();
    // Clients live on another thread with blocking sockets.
    let (tx, rx) = std::sync::mpsc::channel();
    let clients = std::thread::spawn(move || {
        let mut socks = Vec::new();
        for _ in 0..MANY {
            socks.push(TcpStream::connect(addr).unwrap());
        }
        let mut echoed = 0;
        let mut closed = 0;
        for (i, s) in socks.iter_mut().enumerate() {
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let msg = format!("client {i}");
            let _ = s.write_all(msg.as_bytes());
            let mut buf = vec![0u8; msg.len()];
            match s.read_exact(&mut buf) {
                Ok(()) if buf == msg.as_bytes() => echoed += 1,
                _ => closed += 1,
            }
        }
        tx.send((echoed, closed)).unwrap();
    });
    let remote = r.remote();
    std::thread::spawn(move || {
        let result = rx.recv().unwrap();
        remote.call_from_thread(move |r| {
            println!("echoed={} closed={}", result.0, result.1);
            let _ = r.stop();
        })
    });
    let ((), logs) = capture_logs(|| common::run_reactor(&r));
    clients.join().unwrap();
    let line = logs.lines().find(|l| l.contains("too large for the select reactor"));
    match backend {
        Backend::Select => {
            assert!(line.is_some(), "select logged why it dropped connections:\n{logs}");
            println!("select refused the excess cleanly");
        }
        _ => {
            assert!(line.is_none(), "{logs}");
            println!("all {MANY} echoed");
        }
    }
}

fn cpu_time() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// Stops the reactor when stdin reaches EOF (the parent closed it).
struct StdinStop(Reactor);

impl braid::FileDescriptor for StdinStop {
    fn fileno(&self) -> std::os::fd::RawFd {
        0
    }
    fn do_read(&self) -> Result<(), braid::Failure> {
        let mut buf = [0u8; 64];
        match std::io::Read::read(&mut std::io::stdin().lock(), &mut buf) {
            Ok(0) | Err(_) => Err(braid::Failure::new(braid::Error::ConnectionDone)),
            Ok(_) => Ok(()),
        }
    }
    fn connection_lost(&self, _reason: braid::Failure) {
        let _ = self.0.stop();
    }
}

/// A server limited to a few dozen descriptors (a child process) is
/// flooded with 200 connections by the parent. It must shed what it
/// cannot hold (peers see their connections closed; none hangs), must not
/// spin the CPU, and must serve again once descriptors are free.
#[test]
fn descriptor_exhaustion_does_not_spin() {
    if is_child() {
        return exhausted_server();
    }
    use std::io::BufRead;
    for backend in ["select", "poll", "epoll", "io_uring"] {
        let exe = std::env::current_exe().unwrap();
        let mut child = std::process::Command::new(exe)
            .args(["descriptor_exhaustion_does_not_spin", "--exact", "--nocapture", "--test-threads=1"])
            .env(common::CHILD_ENV, backend)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        // libtest may print "test name ... " on the same line first.
        while !line.contains("port=") {
            line.clear();
            assert!(out.read_line(&mut line).unwrap() > 0, "child ended before listening");
        }
        let port: u16 = line.split("port=").nth(1).unwrap().trim().parse().unwrap();
        let mut socks = Vec::new();
        for _ in 0..200 {
            socks.push(TcpStream::connect(("127.0.0.1", port)).unwrap());
        }
        let (mut served, mut shed) = (0, Vec::new());
        for s in socks.iter_mut() {
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            // May fail if the server already closed it; the read tells.
            let _ = s.write_all(b"?");
            let mut b = [0u8; 1];
            match s.read(&mut b) {
                Ok(1) => served += 1,
                // Closed by the server: EOF, or a reset if our byte arrived
                // after the close.
                Ok(0) => shed.push(s.local_addr().unwrap()),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    shed.push(s.local_addr().unwrap())
                }
                other => panic!(
                    "{backend}: a peer was neither served nor closed (hung in the backlog?): {other:?}"
                ),
            }
        }
        drop(socks);
        std::thread::sleep(Duration::from_millis(300));
        let mut late = TcpStream::connect(("127.0.0.1", port)).unwrap();
        late.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        late.write_all(b"!").unwrap();
        let mut b = [0u8; 1];
        late.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"!", "{backend}: served again after the exhaustion");
        drop(late);
        drop(child.stdin.take());
        let mut rest = String::new();
        out.read_to_string(&mut rest).unwrap();
        let status = child.wait().unwrap();
        assert!(status.success(), "{backend}: child failed:\n{rest}");
        assert!(rest.contains("server done"), "{backend}: {rest}");
        assert!(served > 0 && !shed.is_empty(), "{backend}: served={served} shed={}", shed.len());
        // Every shed peer was closed by the EMFILE recovery (the reserve
        // descriptor freed to accept and close it), not by some other path.
        let recovered: Vec<&str> =
            rest.lines().filter(|l| l.contains("EMFILE recovery: closed connection from")).collect();
        for addr in &shed {
            let needle = format!("closed connection from {addr}");
            assert!(
                recovered.iter().any(|l| l.trim_end().ends_with(&needle)),
                "{backend}: {addr} was closed, but not by the EMFILE recovery:\n{rest}"
            );
        }
    }
}

fn exhausted_server() {
    let backend = child_backend();
    let r = Reactor::new(backend).unwrap();
    let spares_before = dev_null_fds();
    let port = r.listen_tcp("127.0.0.1:0", Echo::new, 1024).unwrap();
    assert_eq!(dev_null_fds(), spares_before + 1, "the first port opened the spare descriptor");
    r.add_reader(std::rc::Rc::new(StdinStop(r.clone()))).unwrap();
    let open_now = std::fs::read_dir("/proc/self/fd").unwrap().count() as u64;
    common::set_fd_limit(open_now + 30);
    println!("port={}", port.local_addr().port());
    let cpu_before = cpu_time();
    let started = Instant::now();
    let ((), logs) = capture_logs(|| common::run_reactor(&r));
    let (wall, cpu) = (started.elapsed(), cpu_time() - cpu_before);
    println!("wall={wall:?} cpu={cpu:?} iterations={}", r.iterations());
    // With the reserve descriptor in place, EMFILE is handled by shedding
    // connections, never by the back-off meant for ENFILE and friends.
    assert!(logs.contains("EMFILE recovery"), "{logs}");
    assert!(!logs.contains("pausing accepts"), "EMFILE took the back-off path:\n{logs}");
    for line in logs.lines().filter(|l| l.contains("EMFILE recovery")) {
        println!("{line}");
    }
    // A spinning loop burns a whole core for the whole run.
    assert!(cpu < wall.mul_f64(0.5) + Duration::from_millis(200), "cpu {cpu:?} over {wall:?}: the loop spun");
    assert!(r.iterations() < 20_000, "{} iterations: the loop spun", r.iterations());
    common::set_fd_limit(u64::MAX);
    // §4.8.44: the recovery closed the spare and opened it again.
    assert_eq!(dev_null_fds(), spares_before + 1, "the spare descriptor is back after the EMFILE recovery");
    println!("server done");
}

/// How many of this process's descriptors are open on /dev/null (the
/// listener's spare descriptor is one).
fn dev_null_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|p| p == std::path::Path::new("/dev/null"))
        .count()
}

/// §4.8.44: the spare descriptor for EMFILE recovery is opened once per
/// process, however many ports start.
#[test]
fn spare_descriptor_is_opened_once() {
    if !is_child() {
        for backend in ["select", "poll", "epoll", "io_uring"] {
            let out = in_child("spare_descriptor_is_opened_once", backend);
            assert!(out.contains("one spare for 5 ports"), "{backend}: {out}");
        }
        return;
    }
    let r = Reactor::new(child_backend()).unwrap();
    let before = dev_null_fds();
    let ports: Vec<_> = (0..5).map(|_| r.listen_tcp("127.0.0.1:0", Echo::new, 50).unwrap()).collect();
    assert_eq!(dev_null_fds(), before + 1, "one spare descriptor for all ports");
    drop(ports);
    println!("one spare for 5 ports");
}

/// §4.8.1: if the listening socket cannot even be created (here: no
/// descriptor left), listen_tcp fails with CannotListen naming the address
/// and the cause, and works again once descriptors are free.
#[test]
fn listen_socket_creation_failure_is_cannot_listen() {
    if !is_child() {
        for backend in ["select", "poll", "epoll", "io_uring"] {
            let out = in_child("listen_socket_creation_failure_is_cannot_listen", backend);
            assert!(out.contains("cannot listen checked"), "{backend}: {out}");
        }
        return;
    }
    use std::os::fd::AsRawFd;
    let r = Reactor::new(child_backend()).unwrap();
    // Every descriptor below the lowest free one is taken: a limit there
    // makes the next socket() fail with EMFILE.
    let lowest = {
        let probe =
            rustix::fs::open("/dev/null", rustix::fs::OFlags::RDONLY, rustix::fs::Mode::empty()).unwrap();
        probe.as_raw_fd() as u64
    };
    assert_eq!(common::set_fd_limit(lowest), lowest, "could not lower the descriptor limit");
    let result = r.listen_tcp("127.0.0.1:0", Echo::new, 50);
    common::set_fd_limit(u64::MAX);
    let err = result.err().expect("listen_tcp succeeded without a free descriptor");
    let text = err.to_string();
    assert!(matches!(err, braid::Error::CannotListen { .. }), "{err:?}");
    assert!(text.contains("127.0.0.1:0") && text.contains("Too many open files"), "{text}");
    r.listen_tcp("127.0.0.1:0", Echo::new, 50).expect("listening once descriptors are free");
    println!("cannot listen checked");
}
