//! Endpoint descriptions (Twisted reference §2.10, §4.13): servers and
//! clients from strings, their errors, the registry. Each test on every
//! backend, with real sockets on loopback.

mod common;
mod tls_support;

use std::cell::RefCell;
use std::io::{Read, Write};
use std::rc::Rc;
use std::time::{Duration, Instant};

use braid::datagram::SharedDatagram;
use braid::endpoints::{
    self, client_from_string, connect_protocol, server_from_string, Description, Registry,
};
use braid::protocol::{Factory, IntoFactory, Protocol};
use braid::protocols::echo::{DatagramEcho, Echo};
use braid::{Address, Deferred, Reactor};
use common::collect;

fn run_until(r: &Reactor, done: impl Fn() -> bool) {
    let deadline = Instant::now() + common::WATCHDOG;
    while !done() {
        assert!(Instant::now() < deadline, "watchdog: the condition never held");
        r.iterate(Some(Duration::from_millis(5))).expect("iterate");
    }
}

fn settle<T: 'static>(r: &Reactor, d: &Deferred<T>) -> Result<T, String> {
    let out = collect(d);
    let o = out.clone();
    run_until(r, move || o.borrow().is_some());
    let v = out.borrow_mut().take();
    v.expect("settled")
}

/// The failure of a result that must have failed.
fn failure<T>(result: Result<T, String>, what: &str) -> String {
    match result {
        Ok(_) => panic!("{what}: it succeeded"),
        Err(e) => e,
    }
}

fn error_of(r: &Reactor, desc: &str) -> String {
    match server_from_string(r, desc) {
        Ok(ep) => panic!("{desc:?} parsed as {}", ep.describe()),
        Err(e) => e.to_string(),
    }
}

/// Echoes through a std client on another thread while the reactor runs.
fn echo_through(r: &Reactor, connect: impl FnOnce() -> std::net::TcpStream + Send + 'static) {
    let client = std::thread::spawn(move || {
        let mut s = connect();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"via an endpoint").unwrap();
        let mut back = [0u8; 15];
        s.read_exact(&mut back).unwrap();
        back
    });
    run_until(r, || client.is_finished());
    assert_eq!(&client.join().unwrap(), b"via an endpoint");
}

// §4.13 items 8 and 24: `tcp:` serves, with interface and backlog.
reactor_test!(
    fn tcp_server_listens_and_serves(r) {
        let ep = server_from_string(&r, "tcp:0:interface=127.0.0.1:backlog=5").unwrap();
        assert_eq!(ep.describe(), "tcp:127.0.0.1:0");
        assert!(!ep.is_datagram());
        let port = settle(&r, &ep.listen(Echo::new.into_shared())).expect("listen");
        let addr = port.local_addr();
        assert!(addr.ip().is_loopback() && addr.port() != 0);
        echo_through(&r, move || std::net::TcpStream::connect(addr).unwrap());
        // §4.13 item 8: a port in use fails the Deferred with CannotListen.
        let busy = server_from_string(&r, &format!("tcp:{}:interface=127.0.0.1", addr.port())).unwrap();
        let err = failure(settle(&r, &busy.listen(Echo::new.into_shared())), "listening twice");
        assert!(err.contains("cannot listen on 127.0.0.1:"), "{err}");
    }
);

reactor_test!(
    fn tcp6_server(r) {
        let ep = server_from_string(&r, r"tcp6:0:interface=\:\:1").unwrap();
        let port = settle(&r, &ep.listen(Echo::new.into_shared())).expect("listen");
        let addr = port.local_addr();
        assert!(addr.is_ipv6());
        echo_through(&r, move || std::net::TcpStream::connect(addr).unwrap());
    }
);

// §4.13 item 24: `unix:` with mode (octal) and lockfile.
reactor_test!(
    fn unix_server_with_mode_and_lockfile(r) {
        use std::os::unix::fs::PermissionsExt;
        let path = std::env::temp_dir().join(format!("braid-ep-{}-{:?}.sock", std::process::id(), std::thread::current().id()));
        let _ = std::fs::remove_file(&path);
        let desc = format!("unix:{}:mode=600:lockfile=1", endpoints::quote(path.to_str().unwrap()));
        let ep = server_from_string(&r, &desc).unwrap();
        let port = settle(&r, &ep.listen(Echo::new.into_shared())).expect("listen");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let lock = format!("{}.lock", path.display());
        assert!(std::path::Path::new(&lock).exists(), "lockfile=1 makes the lock file");
        // A unix: client endpoint reaches it.
        let client = client_from_string(&r, &format!("unix:{}", endpoints::quote(path.to_str().unwrap()))).unwrap();
        let got = Rc::new(RefCell::new(Vec::new()));
        let t = settle(&r, &connect_protocol(&*client, Keep(got.clone()))).expect("connect");
        t.write(b"over unix");
        let g = got.clone();
        run_until(&r, move || g.borrow().len() == 9);
        assert_eq!(&*got.borrow(), b"over unix");
        t.lose_connection();
        settle(&r, &port.stop_listening()).unwrap();
        assert!(!path.exists() && !std::path::Path::new(&lock).exists());
    }
);

/// Keeps what arrives.
struct Keep(Rc<RefCell<Vec<u8>>>);

impl Protocol for Keep {
    fn data_received(&mut self, data: &[u8]) {
        self.0.borrow_mut().extend_from_slice(data);
    }
}

// `udp:` (braid's own) listens for datagrams, and refuses a stream factory.
reactor_test!(
    fn udp_server_endpoint(r) {
        let ep = server_from_string(&r, "udp:0:interface=127.0.0.1:maxPacketSize=2048").unwrap();
        assert!(ep.is_datagram());
        let refused = failure(settle(&r, &ep.listen(Echo::new.into_shared())), "a stream factory on udp:");
        assert!(refused.contains("datagram"), "{refused}");
        let shared = SharedDatagram::new(DatagramEcho::new()).erase();
        let port = settle(&r, &ep.listen_datagram(shared)).expect("listen");
        assert_eq!(port.max_packet_size(), 2048);
        let to = port.local_addr();
        let client = std::thread::spawn(move || {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.send_to(b"datagram endpoint", to).unwrap();
            let mut buf = [0u8; 64];
            let n = s.recv(&mut buf).unwrap();
            buf[..n].to_vec()
        });
        run_until(&r, || client.is_finished());
        assert_eq!(client.join().unwrap(), b"datagram endpoint");
        assert!(server_from_string(&r, "udp:0").unwrap().describe().starts_with("udp:0"));
    }
);

// §4.13 items 7, 27, 30: `tcp:` clients by position or keyword; the
// Deferred fires with the transport after connection_made; refused fails.
reactor_test!(
    fn tcp_client_connects_or_fails(r) {
        let port = r.listen_tcp("127.0.0.1:0", Echo::new, 50).unwrap().local_addr().port();
        for desc in [format!("tcp:127.0.0.1:{port}"), format!("tcp:host=127.0.0.1:port={port}:timeout=5"), format!("tcp:127.0.0.1:port={port}:bindAddress=127.0.0.1")] {
            let ep = client_from_string(&r, &desc).unwrap();
            let got = Rc::new(RefCell::new(Vec::new()));
            let t = settle(&r, &connect_protocol(&*ep, Keep(got.clone()))).unwrap_or_else(|e| panic!("{desc}: {e}"));
            assert_eq!(t.peer(), Address::Ip(([127, 0, 0, 1], port).into()));
            t.write(b"ping");
            let g = got.clone();
            run_until(&r, move || g.borrow().len() == 4);
            t.lose_connection();
        }
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let ep = client_from_string(&r, &format!("tcp:127.0.0.1:{dead}")).unwrap();
        let err = failure(settle(&r, &connect_protocol(&*ep, Keep(Rc::default()))), "refused");
        assert!(err.contains("refused"), "{err}");
        // §4.13 item 2: a factory that builds nothing fails the Deferred.
        struct Nothing;
        impl Factory for Nothing {
            fn build_protocol(&mut self, _: &Address) -> Option<Box<dyn Protocol>> {
                None
            }
        }
        let ep = client_from_string(&r, &format!("tcp:127.0.0.1:{port}")).unwrap();
        let err = failure(settle(&r, &ep.connect(Box::new(Nothing))), "no protocol");
        assert!(err.contains("NoProtocol"), "{err}");
    }
);

// Errors name the field at fault; an unknown type lists the known ones.
reactor_test!(
    fn bad_descriptions_are_clear_errors(r) {
        assert!(error_of(&r, "tpc:80").starts_with("unknown endpoint type 'tpc'"), "{}", error_of(&r, "tpc:80"));
        assert_eq!(error_of(&r, "tcp:x"), "tcp: port 'x' is not a number");
        assert_eq!(error_of(&r, "tcp:99999"), "tcp: port '99999' is not a number");
        assert_eq!(error_of(&r, "tcp:80:interface=nowhere"), "tcp: interface 'nowhere' is not an IP address");
        assert!(error_of(&r, "tcp:80:colour=red").contains("unknown argument 'colour'"));
        assert_eq!(error_of(&r, "tcp"), "tcp: no port given");
        assert!(error_of(&r, "tcp:80:81").contains("unexpected argument '81'"));
        assert_eq!(error_of(&r, "unix:/x:mode=999"), "unix: mode '999' is not an octal file mode");
        assert_eq!(error_of(&r, "unix:/x:lockfile=maybe"), "unix: lockfile 'maybe' is not 0 or 1");
        assert!(error_of(&r, "systemd:domain=INET:index=0:name=x").contains("exactly one of index= and name="));
        assert!(error_of(&r, "systemd:domain=IPX:index=0").contains("domain 'IPX'"));
        assert!(error_of(&r, "tcp:80\\").contains("lone backslash"));
        match client_from_string(&r, "tcp:localhost") {
            Err(e) => assert_eq!(e.to_string(), "tcp: no port given"),
            Ok(_) => panic!("a client without a port"),
        }
        match client_from_string(&r, "tcp:h:1:timeout=soon") {
            Err(e) => assert_eq!(e.to_string(), "tcp: timeout 'soon' is not a number"),
            Ok(_) => panic!("a bad timeout"),
        }
        // Kinds match case-insensitively (Twisted's prefixes do).
        assert!(server_from_string(&r, "TCP:0").is_ok());
    }
);

// A new kind is one registry entry.
reactor_test!(
    fn the_registry_takes_new_kinds(r) {
        fn loopback(reactor: &Reactor, d: &Description) -> Result<Box<dyn endpoints::ServerEndpoint>, endpoints::EndpointError> {
            let port = d.arg_or(0, "port").unwrap_or("0");
            endpoints::Registry::default().server(reactor, &format!("tcp:{port}:interface=127.0.0.1"))
        }
        let mut registry = Registry::default();
        registry.add_server("loopback", loopback);
        let ep = registry.server(&r, "loopback:0").unwrap();
        let port = settle(&r, &ep.listen(Echo::new.into_shared())).expect("listen");
        assert!(port.local_addr().ip().is_loopback());
        assert!(server_from_string(&r, "loopback:0").is_err(), "the default registry is untouched");
    }
);

// The systemd: endpoint, in a child process that is handed a listening
// socket the way systemd hands them (LISTEN_PID, LISTEN_FDS, names).
#[test]
fn systemd_endpoint_takes_a_passed_socket() {
    if common::is_child() {
        // The parent made descriptor 3 a listening TCP socket named "web".
        let r = common::build(braid::Backend::Epoll);
        let wrong = server_from_string(&r, "systemd:domain=INET6:name=web").unwrap();
        let err = failure(settle(&r, &wrong.listen(Echo::new.into_shared())), "an INET socket as INET6");
        assert!(err.contains("another domain"), "{err}");
        let missing = server_from_string(&r, "systemd:domain=INET:index=1").unwrap();
        let err = failure(settle(&r, &missing.listen(Echo::new.into_shared())), "socket 1 was not passed");
        assert!(err.contains("no socket 1 was passed (1 were)"), "{err}");
        let ep = server_from_string(&r, "systemd:domain=INET:name=web").unwrap();
        let port = settle(&r, &ep.listen(Echo::new.into_shared())).expect("the passed socket");
        let addr = port.local_addr();
        echo_through(&r, move || std::net::TcpStream::connect(addr).unwrap());
        let again = server_from_string(&r, "systemd:domain=INET:index=0").unwrap();
        let err = failure(settle(&r, &again.listen(Echo::new.into_shared())), "one socket, one endpoint");
        assert!(err.contains("in use by another endpoint"), "{err}");
        return;
    }
    // Run a child whose descriptor 3 is a listening TCP socket.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let exe = std::env::current_exe().unwrap();
    let script = "import os, sys\nos.dup2(int(sys.argv[1]), 3)\nos.set_inheritable(3, True)\nos.environ['LISTEN_FDS'] = '1'\nos.environ['LISTEN_FDNAMES'] = 'web'\nos.environ['LISTEN_PID'] = str(os.getpid())\nos.execv(sys.argv[2], sys.argv[2:])\n";
    use std::os::fd::AsRawFd;
    let fd = listener.as_raw_fd();
    rustix::io::fcntl_setfd(&listener, rustix::io::FdFlags::empty()).unwrap();
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            script,
            &fd.to_string(),
            exe.to_str().unwrap(),
            "systemd_endpoint_takes_a_passed_socket",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("BRAID_TEST_CHILD", "1")
        .output()
        .expect("python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("1 passed"), "{stdout}");
}

// `ssl:` servers and `tls:` clients: a TLS echo through endpoint strings,
// the server's certificate checked against the host name; bad files are
// errors naming them.
reactor_test!(
    fn ssl_server_and_tls_client(r) {
        // An IP name: connecting by name would need the resolver's threads,
        // which start only when the reactor runs, not under `iterate`.
        let ca = tls_support::Ca::new();
        let files = tls_support::Files::new(&ca, &["127.0.0.1"]);
        let q = |p: &std::path::Path| endpoints::quote(p.to_str().unwrap());
        let desc = format!("ssl:0:interface=127.0.0.1:privateKey={}:certKey={}", q(&files.key), q(&files.cert));
        let ep = server_from_string(&r, &desc).unwrap();
        let port = settle(&r, &ep.listen(Echo::new.into_shared())).expect("listen");
        let p = port.local_addr().port();
        for kind in ["tls", "ssl"] {
            let client = client_from_string(&r, &format!("{kind}:127.0.0.1:{p}:trustRoots={}", q(&files.ca))).unwrap();
            let got = Rc::new(RefCell::new(Vec::new()));
            let t = settle(&r, &connect_protocol(&*client, Keep(got.clone()))).expect("connect");
            t.write(b"over tls");
            let g = got.clone();
            run_until(&r, move || g.borrow().len() == 8);
            assert_eq!(&*got.borrow(), b"over tls", "{kind}");
            assert!(t.tls().is_some(), "{kind}: the transport is a TLS one");
            t.lose_connection();
        }
        // A name the certificate does not carry fails the connection.
        struct Lost(Rc<RefCell<Option<String>>>);
        impl Protocol for Lost {
            fn data_received(&mut self, _: &[u8]) {}
            fn connection_lost(&mut self, reason: braid::Failure) {
                *self.0.borrow_mut() = Some(reason.to_string());
            }
        }
        let other = tls_support::Files::new(&ca, &["localhost"]);
        let desc = format!("ssl:0:interface=127.0.0.1:privateKey={}:certKey={}", q(&other.key), q(&other.cert));
        let ep = server_from_string(&r, &desc).unwrap();
        let misnamed = settle(&r, &ep.listen(Echo::new.into_shared())).expect("listen").local_addr().port();
        let wrong = client_from_string(&r, &format!("tls:127.0.0.1:{misnamed}:trustRoots={}", q(&files.ca))).unwrap();
        let why = Rc::new(RefCell::new(None));
        let _ = settle(&r, &connect_protocol(&*wrong, Lost(why.clone())));
        let w = why.clone();
        run_until(&r, move || w.borrow().is_some());
        let why = why.borrow().clone().unwrap();
        assert!(why.to_lowercase().contains("certificate"), "{why}");
        let no_key = error_of(&r, "ssl:0");
        assert_eq!(no_key, "ssl: no privateKey given");
        let missing = error_of(&r, "ssl:0:privateKey=/nonexistent/key.pem");
        assert!(missing.contains("/nonexistent/key.pem"), "{missing}");
        match client_from_string(&r, "tls:localhost:1:trustRoots=/nonexistent/ca.pem") {
            Err(e) => assert!(e.to_string().contains("/nonexistent/ca.pem"), "{e}"),
            Ok(_) => panic!("a missing CA file"),
        }
    }
);

// §4.13 item 23, `tls:DIR`: the certificate is chosen by the name the
// client asks for (SNI), from NAME.pem files holding chain and key; a
// client verifying a name proves it got that name's certificate. A
// wildcard file serves a name one label below it; a client that sends no
// name gets the default (the first file), which verifies; an unknown name
// gets the default too, so verifying the unknown name fails.
reactor_test!(
    fn tls_server_chooses_the_certificate_by_name(r) {
        let ca = tls_support::Ca::new();
        let dir = std::env::temp_dir().join(format!("braid-sni-{}-{:?}", std::process::id(), std::thread::current().id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for name in ["a.test", "b.test", "*.wild.test"] {
            let (cert, key) = ca.leaf(&[name]);
            std::fs::write(dir.join(format!("{name}.pem")), format!("{cert}{key}")).unwrap();
        }
        let desc = format!("tls:{}:port=0:interface=127.0.0.1", endpoints::quote(dir.to_str().unwrap()));
        let ep = server_from_string(&r, &desc).unwrap();
        let port = settle(&r, &ep.listen(Echo::new.into_shared())).expect("listen").local_addr().port();
        let connect = |name: &str, config: braid::tls::ClientConfig| {
            let got = Rc::new(RefCell::new(Vec::new()));
            let lost = Rc::new(RefCell::new(None::<String>));
            struct Probe(Rc<RefCell<Vec<u8>>>, Rc<RefCell<Option<String>>>);
            impl Protocol for Probe {
                fn connection_made(&mut self, t: braid::Transport) {
                    t.write(b"sni");
                }
                fn data_received(&mut self, d: &[u8]) {
                    self.0.borrow_mut().extend_from_slice(d);
                }
                fn connection_lost(&mut self, why: braid::Failure) {
                    *self.1.borrow_mut() = Some(why.to_string());
                }
            }
            let (g, l) = (got.clone(), lost.clone());
            let mut once = Some(Probe(g, l));
            let factory = move || once.take().expect("one connection");
            let tls = braid::tls::TlsClientFactory::new(&r, factory, config, name).unwrap();
            r.connect_tcp("127.0.0.1", port, tls, None, None);
            let (g, l) = (got.clone(), lost.clone());
            run_until(&r, move || g.borrow().len() == 3 || l.borrow().is_some());
            let echoed = got.borrow().clone();
            let why = lost.borrow().clone();
            (echoed, why)
        };
        assert_eq!(connect("a.test", ca.client()).0, b"sni");
        assert_eq!(connect("b.test", ca.client()).0, b"sni");
        assert_eq!(connect("x.wild.test", ca.client()).0, b"sni", "the wildcard file serves x.wild.test");
        // No SNI at all: the default (a.test, the first non-wildcard file).
        let mut quiet = (*ca.rustls_client()).clone();
        quiet.enable_sni = false;
        let quiet = braid::tls::ClientConfig::from_rustls(std::sync::Arc::new(quiet));
        assert_eq!(connect("a.test", quiet).0, b"sni", "no SNI: the default certificate verifies");
        for unknown in ["c.test", "x.y.wild.test"] {
            let (echoed, lost) = connect(unknown, ca.client());
            assert!(echoed.is_empty(), "{unknown}: a name without a file got a certificate that verified");
            assert!(lost.is_some_and(|w| w.to_lowercase().contains("certificate")));
        }
        assert!(error_of(&r, "tls:/nonexistent/dir").contains("/nonexistent/dir"));
        let empty = dir.join("empty");
        std::fs::create_dir_all(&empty).unwrap();
        let err = error_of(&r, &format!("tls:{}", endpoints::quote(empty.to_str().unwrap())));
        assert!(err.contains("no usable certificate in") && err.contains(empty.to_str().unwrap()), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
);

// §4.13 item 23: in a certificate directory, a key without a certificate
// (and a key that does not match, and a file with no PEM) is a warning
// naming the file; a certificate without a key is ignored, logged only at
// debug; a directory with nothing usable is an error naming it.
#[test]
fn sni_directory_warns_about_files_it_cannot_serve() {
    let ca = tls_support::Ca::new();
    let dir = std::env::temp_dir().join(format!("braid-sni-warn-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = ca.leaf(&["good.test"]);
    let (other_cert, other_key) = ca.leaf(&["other.test"]);
    std::fs::write(dir.join("good.test.pem"), format!("{cert}{key}")).unwrap();
    std::fs::write(dir.join("keyonly.test.pem"), &other_key).unwrap();
    std::fs::write(dir.join("certonly.test.pem"), &other_cert).unwrap();
    std::fs::write(dir.join("mismatch.test.pem"), format!("{other_cert}{key}")).unwrap();
    std::fs::write(dir.join("junk.test.pem"), "not PEM at all\n").unwrap();
    std::fs::write(dir.join("notes.txt"), "not a .pem file: not read").unwrap();
    let (loaded, log) = common::capture_logs(|| endpoints::sni::SniDirectory::load(&dir));
    let sni = loaded.expect("good.test.pem is usable");
    let warnings = sni.warnings().join("\n");
    let path = |f: &str| dir.join(f).display().to_string();
    assert!(
        warnings.contains(&format!("'{}': a private key without a certificate", path("keyonly.test.pem"))),
        "{warnings}"
    );
    assert!(
        warnings.contains(&format!("'{}': the private key does not match", path("mismatch.test.pem"))),
        "{warnings}"
    );
    assert!(warnings.contains(&path("junk.test.pem")), "{warnings}");
    assert_eq!(sni.warnings().len(), 3, "{warnings}");
    assert!(!warnings.contains("certonly"), "a certificate without a key is not a warning: {warnings}");
    let line = |needle: &str| {
        log.lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line for {needle}: {log}"))
            .to_owned()
    };
    assert!(line("keyonly.test.pem").contains("WARN"), "{log}");
    assert!(line("mismatch.test.pem").contains("WARN"), "{log}");
    let ignored = line("certonly.test.pem");
    assert!(ignored.contains("DEBUG") && ignored.contains("a certificate without a private key"), "{log}");
    // What was skipped serves nobody: those names get the default.
    for name in ["keyonly.test", "certonly.test", "mismatch.test", "junk.test"] {
        assert_eq!(sni.chosen_for(Some(name)), "good.test", "{name}");
    }
    // Nothing usable at all: an error naming the directory.
    std::fs::remove_file(dir.join("good.test.pem")).unwrap();
    let r = common::build(braid::Backend::Poll);
    let err = error_of(&r, &format!("tls:{}", endpoints::quote(dir.to_str().unwrap())));
    assert!(err.contains(&format!("no usable certificate in '{}'", dir.display())), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

// §4.13 item 7: cancelling the connect Deferred while the attempt is
// pending stops it and fails the Deferred with Cancelled. The attempt is
// kept pending by a listener whose backlog is full (the kernel then drops
// the SYN and retries).
reactor_test!(
    fn cancelling_a_connect_stops_the_attempt(r) {
        let listener = socket2_free_listener(1);
        let addr = listener.local_addr().unwrap();
        // Fill the backlog: these are never accepted.
        let fillers: Vec<std::net::TcpStream> = (0..4)
            .filter_map(|_| std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok())
            .collect();
        assert!(!fillers.is_empty());
        let ep = client_from_string(&r, &format!("tcp:127.0.0.1:{}:timeout=20", addr.port())).unwrap();
        let made = Rc::new(RefCell::new(false));
        struct Made(Rc<RefCell<bool>>);
        impl Protocol for Made {
            fn connection_made(&mut self, _: braid::Transport) {
                *self.0.borrow_mut() = true;
            }
            fn data_received(&mut self, _: &[u8]) {}
        }
        let d = connect_protocol(&*ep, Made(made.clone()));
        run_for(&r, Duration::from_millis(200));
        let result = collect(&d);
        assert!(result.borrow().is_none(), "the attempt was not pending (backlog not full?)");
        d.cancel();
        let res = result.clone();
        run_until(&r, move || res.borrow().is_some());
        let err = failure(result.borrow_mut().take().unwrap(), "a cancelled connect");
        assert!(err.contains("cancelled"), "{err}");
        // Empty the backlog: a retried SYN from an attempt that was not
        // stopped would now connect (the kernel retries after 1 s).
        listener.set_nonblocking(true).unwrap();
        while listener.accept().is_ok() {}
        drop(fillers);
        run_for(&r, Duration::from_millis(1500));
        while listener.accept().is_ok() {}
        assert!(!*made.borrow(), "the cancelled attempt connected later");
    }
);

/// A listening socket with a small backlog, made without the socket2 crate.
fn socket2_free_listener(backlog: i32) -> std::net::TcpListener {
    use rustix::net::{bind, listen, socket, AddressFamily, SocketType};
    let s = socket(AddressFamily::INET, SocketType::STREAM, None).unwrap();
    bind(&s, &std::net::SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
    listen(&s, backlog).unwrap();
    std::net::TcpListener::from(s)
}

fn run_for(r: &Reactor, how_long: Duration) {
    let end = Instant::now() + how_long;
    while Instant::now() < end {
        r.iterate(Some(Duration::from_millis(5))).expect("iterate");
    }
}

/// Answers every name with one address, and keeps the names it was asked.
struct Recording {
    asked: Rc<RefCell<Vec<String>>>,
    answer: std::net::SocketAddr,
}

impl braid::resolver::Resolver for Recording {
    fn resolve(&self, _: &Reactor, host: &str, port: u16) -> Deferred<Vec<std::net::SocketAddr>> {
        self.asked.borrow_mut().push(host.to_owned());
        let mut answer = self.answer;
        answer.set_port(port);
        Deferred::succeed(vec![answer])
    }
}

// §4.13 items 18 and 19: an international name is resolved and connected
// in its IDNA form, and shown so; a name with no IDNA form parses but
// fails the connect, naming the host. No real DNS: a recording resolver.
reactor_test!(
    fn client_host_names_are_idna_encoded(r) {
        let port = r.listen_tcp("127.0.0.1:0", Echo::new, 50).unwrap().local_addr().port();
        let asked = Rc::new(RefCell::new(Vec::new()));
        r.install_resolver(Rc::new(Recording { asked: asked.clone(), answer: ([127, 0, 0, 1], 0).into() }));
        for kind in ["tcp", "TCP"] {
            let ep = client_from_string(&r, &format!("{kind}:Bu\u{308}cher.example:{port}")).unwrap();
            assert_eq!(ep.describe(), format!("tcp:xn--bcher-kva.example:{port}"));
            let got = Rc::new(RefCell::new(Vec::new()));
            let t = settle(&r, &connect_protocol(&*ep, Keep(got.clone()))).expect("connect");
            t.write(b"idna");
            let g = got.clone();
            run_until(&r, move || g.borrow().len() == 4);
            t.lose_connection();
        }
        assert_eq!(*asked.borrow(), ["xn--bcher-kva.example", "xn--bcher-kva.example"]);
        let direct = endpoints::HostnameEndpoint::new(&r, "bücher.example", port);
        assert_eq!(direct.host(), &endpoints::Host::Name("xn--bcher-kva.example".into()));
        assert_eq!(direct.to_string(), format!("xn--bcher-kva.example:{port}"));
        assert_eq!(client_from_string(&r, r"tcp:\:\:1:80").unwrap().describe(), "tcp:[::1]:80");
        // A bad name: parsed, then the connect fails naming it, unresolved.
        let bad = client_from_string(&r, &format!("tcp:a..b:{port}")).expect("a bad name still parses");
        let err = failure(settle(&r, &connect_protocol(&*bad, Keep(Rc::default()))), "a bad name");
        assert!(err.contains("'a..b'") && err.contains("IDNA"), "{err}");
        assert_eq!(asked.borrow().len(), 2, "a bad name was looked up");
        let bad_tls = client_from_string(&r, &format!("tls:a..b:{port}:trustRoots={}", endpoints::quote(&tls_ca_file())))
            .expect("a bad TLS name still parses");
        let err = failure(settle(&r, &connect_protocol(&*bad_tls, Keep(Rc::default()))), "a bad TLS name");
        assert!(err.contains("'a..b'"), "{err}");
    }
);

/// A CA bundle file for clients that must parse but never connect.
fn tls_ca_file() -> String {
    let ca = tls_support::Ca::new();
    let files = tls_support::Files::new(&ca, &["127.0.0.1"]);
    let path = std::env::temp_dir().join(format!(
        "braid-ep-ca-{}-{:?}.pem",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::copy(&files.ca, &path).unwrap();
    path.to_str().unwrap().to_owned()
}

// §4.13 item 10: the process endpoint keeps its spawn parameters, with
// Twisted's defaults (no arguments, an empty environment, this directory,
// this user and group, no terminal, the usual descriptors, stderr logged).
#[test]
fn process_endpoint_keeps_its_parameters() {
    use braid::process::ChildFd;
    use endpoints::{ClientEndpoint, ProcessEndpoint, StderrPolicy};
    let r = common::build(braid::Backend::Poll);
    let ep = ProcessEndpoint::new(&r, "/bin/cat");
    assert_eq!(ep.program(), "/bin/cat");
    assert!(ep.arguments().is_empty());
    assert!(ep.environment().is_empty());
    assert_eq!(ep.working_dir(), None);
    assert_eq!((ep.user(), ep.group()), (None, None));
    assert!(!ep.uses_pty());
    assert_eq!(ep.descriptor_map(), None);
    assert_eq!(ep.stderr_policy(), StderrPolicy::Log);
    let ep = ProcessEndpoint::new(&r, "sh")
        .args(["-c", "true"])
        .env("A", "1")
        .path("/tmp")
        .uid(1)
        .gid(2)
        .pty(true)
        .child_fds([(0, ChildFd::ToChild), (1, ChildFd::FromChild)])
        .stderr(StderrPolicy::Drop);
    assert_eq!(ep.arguments(), ["-c", "true"]);
    assert_eq!(ep.environment(), [("A".into(), "1".into())]);
    assert_eq!(ep.working_dir(), Some(std::path::Path::new("/tmp")));
    assert_eq!((ep.user(), ep.group()), (Some(1), Some(2)));
    assert!(ep.uses_pty());
    assert_eq!(ep.descriptor_map(), Some(&[(0, ChildFd::ToChild), (1, ChildFd::FromChild)][..]));
    assert_eq!(ep.stderr_policy(), StderrPolicy::Drop);
    assert_eq!(ep.describe(), "process:sh -c true");
}

/// Records what a process endpoint's protocol hears.
#[derive(Default)]
struct Heard {
    log: Rc<RefCell<Vec<String>>>,
    data: Rc<RefCell<Vec<u8>>>,
}

impl Protocol for Heard {
    fn connection_made(&mut self, _: braid::Transport) {
        self.log.borrow_mut().push("made".into());
    }
    fn data_received(&mut self, data: &[u8]) {
        self.data.borrow_mut().extend_from_slice(data);
    }
    fn connection_lost(&mut self, why: braid::Failure) {
        let what = match why.braid_error() {
            Some(braid::Error::ConnectionDone) => "done".to_string(),
            Some(braid::Error::ConnectionLost) => "lost".to_string(),
            _ => format!("other: {why}"),
        };
        self.log.borrow_mut().push(format!("lost: {what}"));
    }
}

fn iterate_for(r: &Reactor, passes: usize) {
    for _ in 0..passes {
        r.iterate(Some(Duration::from_millis(5))).expect("iterate");
    }
}

// §4.13 items 10-12 with /bin/cat: connect spawns it and fires with the
// transport after connection_made; the factory is given the process's
// address; writes reach stdin and stdout comes back as data_received;
// pausing stops reading the child, resuming reads again; the transport is
// a consumer and a producer, and no TCP, UNIX or TLS transport; closing
// stdin ends cat with status 0: connection_lost(ConnectionDone).
reactor_test!(
    fn process_endpoint_talks_to_cat(r) {
        use endpoints::ProcessEndpoint;
        let addrs = Rc::new(RefCell::new(Vec::new()));
        struct Recording(Rc<RefCell<Vec<Address>>>, Heard);
        impl Factory for Recording {
            fn build_protocol(&mut self, addr: &Address) -> Option<Box<dyn Protocol>> {
                self.0.borrow_mut().push(addr.clone());
                Some(Box::new(std::mem::take(&mut self.1)))
            }
        }
        let heard = Heard::default();
        let (log, data) = (heard.log.clone(), heard.data.clone());
        let ep = ProcessEndpoint::new(&r, "/bin/cat");
        let t = settle(&r, &endpoints::ClientEndpoint::connect(&ep, Box::new(Recording(addrs.clone(), heard)))).expect("spawn cat");
        assert_eq!(*log.borrow(), ["made"], "connection_made ran before the Deferred fired");
        let Address::Process { pid, fd: 0 } = t.peer() else { panic!("peer {:?}", t.peer()) };
        assert!(pid > 0);
        assert_eq!(*addrs.borrow(), [t.peer()]);
        assert_eq!(t.host(), Some(t.peer()));
        assert!(t.tcp().is_none() && t.unix().is_none() && t.tls().is_none());
        assert!(t.connected());
        t.write(b"hello");
        t.write_sequence(&[&b", "[..], &b"cat"[..]]);
        let d = data.clone();
        run_until(&r, move || d.borrow().len() == 10);
        assert_eq!(&*data.borrow(), b"hello, cat");
        // Paused: cat's answer waits in its pipe.
        t.pause_producing();
        t.write(b"!");
        iterate_for(&r, 40);
        assert_eq!(data.borrow().len(), 10, "read while paused");
        t.resume_producing();
        let d = data.clone();
        run_until(&r, move || d.borrow().len() == 11);
        // A consumer: a producer registers (and is paused above the mark).
        struct Idle(Rc<RefCell<Vec<&'static str>>>);
        impl braid::Producer for Idle {
            fn pause_producing(&self) {
                self.0.borrow_mut().push("pause");
            }
            fn resume_producing(&self) {
                self.0.borrow_mut().push("resume");
            }
            fn stop_producing(&self) {}
        }
        let marks = Rc::new(RefCell::new(Vec::new()));
        t.set_write_buffer_limits(1024, 0);
        t.pause_producing();
        t.register_producer(Rc::new(Idle(marks.clone())), true).unwrap();
        t.write_vec(vec![b'x'; 1 << 20]);
        iterate_for(&r, 20);
        assert_eq!(*marks.borrow(), ["pause"], "stdin's producer was not paused");
        assert!(t.buffered() > 1024);
        t.resume_producing();
        let m = marks.clone();
        run_until(&r, move || m.borrow().len() == 2);
        t.unregister_producer();
        let d = data.clone();
        run_until(&r, move || d.borrow().len() == 11 + (1 << 20));
        t.lose_write_connection();
        let l = log.clone();
        run_until(&r, move || l.borrow().len() == 2);
        assert_eq!(*log.borrow(), ["made", "lost: done"]);
        assert_eq!(t.host(), None);
        assert!(!t.connected());
    }
);

// §4.13 item 12: any status but 0, or a signal, is ConnectionLost;
// lose_connection closes the pipes (cat exits 0: ConnectionDone); the
// environment and directory given reach the child.
reactor_test!(
    fn process_endpoint_ends(r) {
        use endpoints::ProcessEndpoint;
        // How to end it: 0 waits for the child, 1 loses the connection, 2
        // stops the transport as a producer.
        let run = |ep: ProcessEndpoint, close: u8| {
            let heard = Heard::default();
            let (log, data) = (heard.log.clone(), heard.data.clone());
            let t = settle(&r, &connect_protocol(&ep, heard)).expect("spawn");
            match close {
                1 => t.lose_connection(),
                2 => t.stop_producing(),
                _ => {}
            }
            assert_eq!(t.connected(), close == 0);
            let l = log.clone();
            run_until(&r, move || l.borrow().len() == 2);
            let said = String::from_utf8_lossy(&data.borrow()).into_owned();
            let end = log.borrow()[1].clone();
            (end, said)
        };
        let sh = |script: &str| ProcessEndpoint::new(&r, "/bin/sh").args(["-c", script]);
        assert_eq!(run(sh("exit 3"), 0).0, "lost: lost");
        assert_eq!(run(sh("kill -9 $$"), 0).0, "lost: lost");
        assert_eq!(run(sh("exit 0"), 0).0, "lost: done");
        assert_eq!(run(ProcessEndpoint::new(&r, "/bin/cat"), 1).0, "lost: done");
        assert_eq!(run(ProcessEndpoint::new(&r, "/bin/cat"), 2).0, "lost: done");
        let (end, said) = run(sh("echo \"$GREETING\"; pwd").env("GREETING", "hi").path("/"), 0);
        assert_eq!((end.as_str(), said.as_str()), ("lost: done", "hi\n/\n"));
        // A program that cannot be started fails the connect, naming it.
        let missing = ProcessEndpoint::new(&r, "/nonexistent/braid-program");
        let err = failure(settle(&r, &connect_protocol(&missing, Heard::default())), "a missing program");
        assert!(err.contains("/nonexistent/braid-program"), "{err}");
        // A factory that builds nothing fails it with NoProtocol.
        struct Nothing;
        impl Factory for Nothing {
            fn build_protocol(&mut self, _: &Address) -> Option<Box<dyn Protocol>> {
                None
            }
        }
        let err = failure(settle(&r, &endpoints::ClientEndpoint::connect(&sh("sleep 30"), Box::new(Nothing))), "no protocol");
        assert!(err.contains("NoProtocol"), "{err}");
    }
);

// §4.13 item 12: stderr is logged (a warning naming the process) or
// dropped, by policy; it is never data_received.
reactor_test!(
    fn process_endpoint_stderr_policy(r) {
        use endpoints::{ProcessEndpoint, StderrPolicy};
        for policy in [StderrPolicy::Log, StderrPolicy::Drop] {
            let heard = Heard::default();
            let (log, data) = (heard.log.clone(), heard.data.clone());
            let ep = ProcessEndpoint::new(&r, "/bin/sh").args(["-c", "echo out; echo oops-on-stderr >&2"]).stderr(policy);
            let ((), logged) = common::capture_logs(|| {
                settle(&r, &connect_protocol(&ep, heard)).expect("spawn");
                let l = log.clone();
                run_until(&r, move || l.borrow().len() == 2);
            });
            assert_eq!(&*data.borrow(), b"out\n", "{policy:?}");
            assert_eq!(log.borrow()[1], "lost: done");
            let line = logged.lines().find(|l| l.contains("oops-on-stderr"));
            match policy {
                StderrPolicy::Log => {
                    let line = line.unwrap_or_else(|| panic!("stderr was not logged: {logged}"));
                    assert!(line.contains("WARN") && line.contains("(/bin/sh) stderr"), "{line}");
                }
                StderrPolicy::Drop => assert!(line.is_none(), "stderr was logged: {logged}"),
            }
        }
    }
);
