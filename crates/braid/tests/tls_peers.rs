//! TLS against outside peers users have: `openssl s_client` and `curl
//! --cacert` talking to a braid server, and a braid client talking to
//! `openssl s_server`, on every backend. The certificates are made by the
//! test and written to a temporary directory. A missing `openssl` or
//! `curl` fails the test (it never passes silently).

mod common;
mod tls_support;

use std::cell::Cell;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use braid::protocols::echo::Echo;
use braid::tls::{ClientConfig, Identity, Roots, ServerConfig};
use braid::Reactor;
use common::run_reactor;
use tls_support::{Ca, Events, Files, Rec};

fn local() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn tool(name: &str) -> Command {
    let found = Command::new(name).arg("version").stdout(Stdio::null()).stderr(Stdio::null()).status();
    assert!(found.is_ok(), "{name} is needed for this test (apt-get install {name})");
    Command::new(name)
}

/// Kills the child when dropped, so a failing test leaves no peer behind.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

thread_local! {
    /// Events the reactor on this (test) thread still waits for.
    static LEFT: Cell<u32> = const { Cell::new(1) };
}

/// The reactor should stop after `n` calls of [`one_done`] (the peer
/// finishing counts as one).
fn expect(n: u32) {
    LEFT.with(|l| l.set(n));
}

fn one_done(r: &Reactor) {
    LEFT.with(|l| {
        l.set(l.get().saturating_sub(1));
        if l.get() == 0 {
            let _ = r.stop();
        }
    });
}

/// Runs `f` on a thread while the reactor runs here, until `f` is done
/// and whatever else [`expect`] counted happened; returns `f`'s result.
fn beside<T: Send + 'static>(r: &Reactor, f: impl FnOnce() -> T + Send + 'static) -> T {
    let remote = r.remote();
    let h = std::thread::spawn(move || {
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        let _ = remote.call_from_thread(one_done);
        out
    });
    run_reactor(r);
    match h.join().unwrap() {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e),
    }
}

reactor_test! {
    /// `openssl s_client` verifies braid's certificate (from PEM files)
    /// against the CA and gets its line echoed.
    fn openssl_s_client_talks_to_a_braid_server(r) {
        let ca = Ca::new();
        let files = Files::new(&ca, &["localhost"]);
        let config = ServerConfig::from_pem_files(&files.cert, &files.key).unwrap();
        let port = r.listen_ssl(local(), Echo::new, config, 50).unwrap().local_addr().port();
        let mut cmd = tool("openssl");
        cmd.args(["s_client", "-connect", &format!("127.0.0.1:{port}"), "-servername", "localhost"])
            .args(["-verify_hostname", "localhost", "-verify_return_error", "-quiet", "-CAfile"])
            .arg(&files.ca)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let got = beside(&r, move || {
            let mut child = Reaped(cmd.spawn().unwrap());
            child.0.stdin.as_mut().unwrap().write_all(b"hello braid\n").unwrap();
            let mut out = BufReader::new(child.0.stdout.take().unwrap());
            let mut line = String::new();
            let _ = out.read_line(&mut line);
            drop(child);
            line
        });
        assert_eq!(got, "hello braid\n");
    }
}

/// Answers one HTTP request with a fixed body, then closes; counts its
/// loss with [`one_done`].
fn http_server(r: &Reactor, log: Events) -> Rec {
    let r = r.clone();
    Rec {
        log,
        on_lost: Some(Box::new(move |_| one_done(&r))),
        on_data: Some(Box::new(|t, _| {
            t.write(b"HTTP/1.1 200 OK\r\nContent-Length: 14\r\nConnection: close\r\n\r\nhello over TLS");
            t.lose_connection();
        })),
        ..Default::default()
    }
}

reactor_test! {
    /// `curl --cacert` fetches a page from braid over TLS with ALPN
    /// http/1.1 and sees a clean close; braid's side sees one too.
    fn curl_fetches_over_tls(r) {
        let ca = Ca::new();
        let files = Files::new(&ca, &["localhost"]);
        let config = ServerConfig::builder(Identity::from_pem_files(&files.cert, &files.key).unwrap())
            .alpn(["http/1.1"])
            .build()
            .unwrap();
        let log: Events = Default::default();
        let l = log.clone();
        let rr = r.clone();
        let port = r.listen_ssl(local(), move || http_server(&rr, l.clone()), config, 50).unwrap().local_addr().port();
        expect(2);
        let mut cmd = tool("curl");
        cmd.args(["-sS", "--max-time", "20", "--resolve", &format!("localhost:{port}:127.0.0.1"), "--cacert"])
            .arg(&files.ca)
            .arg(format!("https://localhost:{port}/"));
        let out = beside(&r, move || cmd.output().unwrap());
        assert!(out.status.success(), "curl failed: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(out.stdout, b"hello over TLS");
        assert_eq!(*log.borrow(), ["made", "lost: connection was closed cleanly"]);
    }
}

reactor_test! {
    /// curl refuses braid's certificate when it does not trust the CA:
    /// the client end fails and braid's connection ends with a TLS error.
    fn curl_refuses_an_untrusted_certificate(r) {
        let ca = Ca::new();
        let other = Ca::new();
        let files = Files::new(&ca, &["localhost"]);
        let wrong = Files::new(&other, &["localhost"]);
        let config = ServerConfig::from_pem_files(&files.cert, &files.key).unwrap();
        let log: Events = Default::default();
        let l = log.clone();
        let rr = r.clone();
        let port = r.listen_ssl(local(), move || http_server(&rr, l.clone()), config, 50).unwrap().local_addr().port();
        expect(2);
        let mut cmd = tool("curl");
        cmd.args(["-sS", "--max-time", "20", "--resolve", &format!("localhost:{port}:127.0.0.1"), "--cacert"])
            .arg(&wrong.ca)
            .arg(format!("https://localhost:{port}/"));
        let out = beside(&r, move || cmd.output().unwrap());
        assert!(!out.status.success(), "curl accepted an untrusted certificate");
        let log = log.borrow();
        assert_eq!(log.len(), 2, "{log:?}");
        assert!(log[1].starts_with("lost: TLS handshake failed"), "{log:?}");
    }
}

/// Starts `openssl s_server` on a free port, echoing each line reversed;
/// returns it once it accepts connections.
fn s_server(files: &Files, extra: &[&str]) -> (Reaped, u16) {
    // A port that was free a moment ago; s_server cannot report the one
    // the kernel chose.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut cmd = tool("openssl");
    cmd.args(["s_server", "-accept", &format!("127.0.0.1:{port}"), "-rev", "-naccept", "1", "-cert"])
        .arg(&files.cert)
        .arg("-key")
        .arg(&files.key)
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = Reaped(cmd.spawn().unwrap());
    let mut out = BufReader::new(child.0.stdout.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        let n = out.read_line(&mut line).unwrap();
        assert!(n > 0, "s_server ended before accepting");
        if line.starts_with("ACCEPT") {
            break;
        }
    }
    // Keep draining its output so it never blocks on a full pipe.
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = out.read_to_end(&mut sink);
    });
    (child, port)
}

/// A braid client that sends one line, closes once an answer line came
/// back, and stops the reactor when the connection is lost.
fn line_client(r: &Reactor, got: std::rc::Rc<std::cell::RefCell<Vec<u8>>>, log: Events) -> impl Fn() -> Rec {
    let r = r.clone();
    move || {
        let r = r.clone();
        Rec {
            log: log.clone(),
            data: got.clone(),
            on_made: Some(Box::new(|t| t.write(b"hello\n"))),
            on_data: Some(Box::new(|t, d| {
                if d.ends_with(b"\n") {
                    t.lose_connection();
                }
            })),
            on_lost: Some(Box::new(move |_| {
                let _ = r.stop();
            })),
            ..Default::default()
        }
    }
}

reactor_test! {
    /// A braid client (`connect_ssl`, CA bundle from a file) talks to
    /// `openssl s_server` and gets its line back reversed.
    fn braid_client_talks_to_openssl_s_server(r) {
        let ca = Ca::new();
        let files = Files::new(&ca, &["localhost"]);
        let (_server, port) = s_server(&files, &[]);
        let config = ClientConfig::new(Roots::from_pem_file(&files.ca).unwrap()).unwrap();
        let (got, log): (std::rc::Rc<std::cell::RefCell<Vec<u8>>>, Events) = Default::default();
        r.connect_ssl("localhost", port, line_client(&r, got.clone(), log.clone()), config, None, None).unwrap();
        run_reactor(&r);
        assert_eq!(*got.borrow(), b"olleh\n");
        assert_eq!(log.borrow()[0], "made");
    }
}

reactor_test! {
    /// `openssl s_server -Verify` demands a client certificate; a braid
    /// client presenting one signed by the CA gets through.
    fn braid_client_certificate_satisfies_openssl_s_server(r) {
        let ca = Ca::new();
        let files = Files::new(&ca, &["localhost"]);
        let ca_path = files.ca.to_str().unwrap().to_string();
        let (_server, port) = s_server(&files, &["-Verify", "1", "-verify_return_error", "-CAfile", &ca_path]);
        let config = ClientConfig::builder(Roots::from_pem_file(&files.ca).unwrap())
            .identity(ca.identity(&["client.example"]))
            .build()
            .unwrap();
        let (got, log): (std::rc::Rc<std::cell::RefCell<Vec<u8>>>, Events) = Default::default();
        r.connect_ssl("localhost", port, line_client(&r, got.clone(), log.clone()), config, None, None).unwrap();
        run_reactor(&r);
        assert_eq!(*got.borrow(), b"olleh\n", "{:?}", log.borrow());
    }
}

reactor_test! {
    /// `openssl s_client -tls1_2` asks to renegotiate (its `R` command):
    /// braid refuses (rustls answers no_renegotiation), the client gives
    /// up, and braid's connection ends with a TLS error naming the alert;
    /// before that, data flowed.
    fn renegotiation_is_refused_with_a_tls_error(r) {
        let ca = Ca::new();
        let files = Files::new(&ca, &["localhost"]);
        let config = ServerConfig::from_pem_files(&files.cert, &files.key).unwrap();
        let log: Events = Default::default();
        let (l, rr) = (log.clone(), r.clone());
        let server = move || {
            let rr = rr.clone();
            Rec {
                log: l.clone(),
                on_data: Some(Box::new(|t, d| t.write(d))),
                on_lost: Some(Box::new(move |_| one_done(&rr))),
                ..Default::default()
            }
        };
        let port = r.listen_ssl(local(), server, config, 50).unwrap().local_addr().port();
        expect(2);
        let mut cmd = tool("openssl");
        cmd.args(["s_client", "-tls1_2", "-connect", &format!("127.0.0.1:{port}"), "-servername", "localhost"])
            .arg("-CAfile")
            .arg(&files.ca)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let echoed = beside(&r, move || {
            let mut child = Reaped(cmd.spawn().unwrap());
            let mut stdin = child.0.stdin.take().unwrap();
            stdin.write_all(b"hi\n").unwrap();
            let mut out = BufReader::new(child.0.stdout.take().unwrap());
            let mut line = String::new();
            let mut echoed = false;
            while out.read_line(&mut line).is_ok_and(|n| n > 0) {
                if line == "hi\n" {
                    echoed = true;
                    break;
                }
                line.clear();
            }
            stdin.write_all(b"R\n").unwrap();
            // It gives up on its own once refused; the rest of its output
            // ends when it exits.
            let mut rest = Vec::new();
            let _ = out.read_to_end(&mut rest);
            echoed
        });
        assert!(echoed, "the line was echoed before the renegotiation");
        let log = log.borrow();
        assert_eq!(log.len(), 2, "{log:?}");
        assert!(log[1].starts_with("lost: TLS error") && log[1].contains("alert"), "{log:?}");
    }
}
