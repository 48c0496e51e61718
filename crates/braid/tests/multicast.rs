//! Multicast for real (Twisted's `IMulticastTransport`): join, receive,
//! loopback mode, TTL, leave, two ports on one group, IPv4 and IPv6.
//!
//! Multicast over the host's own interfaces depends on its routes (IPv6
//! multicast does not loop back on `lo` at all), so each test re-runs
//! itself in a fresh network namespace (`unshare -n`, as root) holding a
//! veth pair, `v0` (10.77.0.1) and `v1` (10.77.0.2), with duplicate address
//! detection off so IPv6 link-local addresses are usable at once. Without
//! `unshare`, `ip` or the privilege to use them the test fails and says
//! which: it never passes without having run.

mod common;

use std::cell::RefCell;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::Command;
use std::rc::Rc;
use std::time::{Duration, Instant};

use braid::datagram::{DatagramProtocol, DatagramTransport};
use braid::{Address, Error, Reactor};
use common::collect;

const INSIDE: &str = "BRAID_TEST_NETNS";
const GROUP4: Ipv4Addr = Ipv4Addr::new(239, 255, 77, 1);
const GROUP6: Ipv6Addr = Ipv6Addr::new(0xff12, 0, 0, 0, 0, 0, 0, 0x77);
const V0: &str = "10.77.0.1";

/// Runs `body` on a fresh reactor inside a network namespace of its own:
/// re-executes this test under `unshare -n`, which sets the namespace up.
fn in_netns(test: &str, backend: braid::Backend, body: fn(Reactor)) {
    if std::env::var_os(INSIDE).is_some() {
        setup_netns();
        body(common::build(backend));
        return;
    }
    let exe = std::env::current_exe().expect("current_exe");
    let out = Command::new("unshare")
        .arg("-n")
        .arg(exe)
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(INSIDE, "1")
        .output()
        .unwrap_or_else(|e| panic!("cannot run `unshare -n` (util-linux) for a network namespace: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{test} in a network namespace failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(stdout.contains("1 passed"), "{test} did not run in the namespace:\n{stdout}\n{stderr}");
}

fn sh(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `ip` (iproute2) to set up the test namespace: {e}"));
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

fn setup_netns() {
    std::fs::write("/proc/sys/net/ipv6/conf/default/accept_dad", "0")
        .expect("turning DAD off in the namespace");
    sh(&["link", "set", "lo", "up"]);
    sh(&["link", "add", "v0", "type", "veth", "peer", "name", "v1"]);
    sh(&["addr", "add", "10.77.0.1/24", "dev", "v0"]);
    sh(&["addr", "add", "10.77.0.2/24", "dev", "v1"]);
    sh(&["link", "set", "v0", "up"]);
    sh(&["link", "set", "v1", "up"]);
    // The link-local address comes once the link is up, asynchronously:
    // IPv6 multicast needs it.
    let deadline = Instant::now() + common::WATCHDOG;
    loop {
        let out =
            Command::new("ip").args(["-6", "addr", "show", "dev", "v0", "scope", "link"]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        if text.contains("fe80") && !text.contains("tentative") {
            break;
        }
        assert!(Instant::now() < deadline, "v0 never got its IPv6 link-local address:\n{text}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

macro_rules! netns_test {
    (fn $name:ident($r:ident) $body:block) => {
        mod $name {
            use super::*;
            fn body($r: Reactor) $body
            #[test]
            fn select() {
                in_netns(concat!(stringify!($name), "::select"), braid::Backend::Select, body)
            }
            #[test]
            fn poll() {
                in_netns(concat!(stringify!($name), "::poll"), braid::Backend::Poll, body)
            }
            #[test]
            fn epoll() {
                in_netns(concat!(stringify!($name), "::epoll"), braid::Backend::Epoll, body)
            }
            #[test]
            fn io_uring() {
                in_netns(concat!(stringify!($name), "::io_uring"), braid::Backend::IoUring, body)
            }
        }
    };
}

type Got = Rc<RefCell<Vec<Vec<u8>>>>;

/// Keeps every datagram it receives.
struct Keep(Got);

impl DatagramProtocol for Keep {
    fn datagram_received(&mut self, data: &[u8], _from: &Address) {
        self.0.borrow_mut().push(data.to_vec());
    }
}

fn keeper() -> (Keep, Got) {
    let got = Got::default();
    (Keep(got.clone()), got)
}

fn run_until(r: &Reactor, done: impl Fn() -> bool) {
    let deadline = Instant::now() + common::WATCHDOG;
    while !done() {
        assert!(Instant::now() < deadline, "watchdog: the condition never held");
        r.iterate(Some(Duration::from_millis(5))).expect("iterate");
    }
}

/// Iterates for a while, for checks that something does *not* arrive.
fn run_for(r: &Reactor, how_long: Duration) {
    let end = Instant::now() + how_long;
    while Instant::now() < end {
        r.iterate(Some(Duration::from_millis(5))).expect("iterate");
    }
}

/// Runs the reactor until `d` has fired; its result, failures as text.
fn settle<T: 'static>(r: &Reactor, d: &braid::Deferred<T>) -> Result<T, String> {
    let out = collect(d);
    let o = out.clone();
    run_until(r, move || o.borrow().is_some());
    let result = out.borrow_mut().take();
    result.expect("settled")
}

/// Sends `data` to `to` every 50 ms until `done()` holds: a datagram is
/// allowed to be lost, so a test that needs one to arrive tries again.
fn send_until(r: &Reactor, out: &DatagramTransport, data: &[u8], to: &Address, done: impl Fn() -> bool) {
    let deadline = Instant::now() + common::WATCHDOG;
    while !done() {
        assert!(Instant::now() < deadline, "watchdog: {:?} never arrived", String::from_utf8_lossy(data));
        out.write(data, Some(to)).unwrap();
        run_for(r, Duration::from_millis(50));
    }
}

/// True if every datagram in `got` is `data` (resends may repeat it).
fn all_are(got: &Got, data: &[u8]) -> bool {
    !got.borrow().is_empty() && got.borrow().iter().all(|d| d == data)
}

/// A sender whose multicast goes out on v0.
fn sender(r: &Reactor, v6: bool) -> DatagramTransport {
    let (k, _) = keeper();
    let port = r.listen_udp(0, k, if v6 { "::" } else { "" }, 8192).unwrap();
    let m = port.multicast().expect("a UDP port has a multicast side");
    m.set_outgoing_interface(if v6 { "v0" } else { V0 }).unwrap();
    port
}

fn to_group4(port: u16) -> Address {
    Address::Ip(SocketAddr::new(IpAddr::V4(GROUP4), port))
}

netns_test!(
    fn join_receive_leave_ipv4(r) {
        let (k, got) = keeper();
        let member = r.listen_multicast(0, k, "", false).unwrap();
        let port = member.local_addr().port();
        let m = member.multicast().unwrap();
        settle(&r, &m.join_group(IpAddr::V4(GROUP4), V0)).expect("join");
        let out = sender(&r, false);
        assert_eq!(out.multicast().unwrap().outgoing_interface().unwrap(), V0);
        send_until(&r, &out, b"to the group", &to_group4(port), || !got.borrow().is_empty());
        assert!(all_are(&got, b"to the group"), "{:?}", got.borrow());
        settle(&r, &m.leave_group(IpAddr::V4(GROUP4), V0)).expect("leave");
        got.borrow_mut().clear();
        out.write(b"after leaving", Some(&to_group4(port))).unwrap();
        // A unicast marker sent later shows the member still reads.
        let marker = Address::Ip(SocketAddr::new(V0.parse().unwrap(), port));
        run_for(&r, Duration::from_millis(100));
        send_until(&r, &out, b"marker", &marker, || !got.borrow().is_empty());
        assert!(all_are(&got, b"marker"), "a group datagram came after leaving: {:?}", got.borrow());
    }
);

netns_test!(
    fn loopback_mode_decides_local_delivery(r) {
        let (k, got) = keeper();
        let member = r.listen_multicast(0, k, "", false).unwrap();
        let port = member.local_addr().port();
        settle(&r, &member.multicast().unwrap().join_group(IpAddr::V4(GROUP4), V0)).expect("join");
        let out = sender(&r, false);
        let m = out.multicast().unwrap();
        assert!(m.loopback_mode().unwrap(), "loopback is on by default");
        m.set_loopback_mode(false).unwrap();
        assert!(!m.loopback_mode().unwrap());
        out.write(b"not looped back", Some(&to_group4(port))).unwrap();
        run_for(&r, Duration::from_millis(150));
        assert!(got.borrow().is_empty(), "a datagram came back with loopback off");
        m.set_loopback_mode(true).unwrap();
        send_until(&r, &out, b"looped back", &to_group4(port), || !got.borrow().is_empty());
        assert!(all_are(&got, b"looped back"), "{:?}", got.borrow());
    }
);

netns_test!(
    fn ttl_can_be_read_and_set(r) {
        let out = sender(&r, false);
        let m = out.multicast().unwrap();
        assert_eq!(m.ttl().unwrap(), 1, "Linux's default multicast TTL");
        m.set_ttl(5).unwrap();
        assert_eq!(m.ttl().unwrap(), 5);
        match m.set_ttl(300) {
            Err(Error::InvalidAddress(why)) => assert!(why.contains("300"), "{why}"),
            other => panic!("a TTL above 255: {other:?}"),
        }
        let out6 = sender(&r, true);
        let m6 = out6.multicast().unwrap();
        m6.set_ttl(7).unwrap();
        assert_eq!(m6.ttl().unwrap(), 7);
        // The TTL is really used: a member still receives with TTL 5.
        let (k, got) = keeper();
        let member = r.listen_multicast(0, k, "", false).unwrap();
        settle(&r, &member.multicast().unwrap().join_group(IpAddr::V4(GROUP4), V0)).expect("join");
        send_until(&r, &out, b"ttl 5", &to_group4(member.local_addr().port()), || !got.borrow().is_empty());
    }
);

netns_test!(
    fn two_ports_share_a_group(r) {
        let (ka, a) = keeper();
        let first = r.listen_multicast(0, ka, "", true).unwrap();
        let port = first.local_addr().port();
        let (kb, b) = keeper();
        let second = r.listen_multicast(port, kb, "", true).unwrap();
        assert_eq!(second.local_addr().port(), port);
        for p in [&first, &second] {
            settle(&r, &p.multicast().unwrap().join_group(IpAddr::V4(GROUP4), V0)).expect("join");
        }
        let out = sender(&r, false);
        send_until(&r, &out, b"for both", &to_group4(port), || !a.borrow().is_empty() && !b.borrow().is_empty());
        assert!(all_are(&a, b"for both") && all_are(&b, b"for both"));
        // Without listen_multiple the port is taken.
        match r.listen_multicast(port, keeper().0, "", false) {
            Err(Error::CannotListen { .. }) => {}
            Ok(_) => panic!("bound a shared port without SO_REUSEPORT"),
            Err(e) => panic!("{e}"),
        }
    }
);

netns_test!(
    fn join_errors_are_clear(r) {
        let (k, _) = keeper();
        let member = r.listen_multicast(0, k, "", false).unwrap();
        let m = member.multicast().unwrap();
        let not_group = settle(&r, &m.join_group(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), ""));
        assert!(not_group.as_ref().is_err_and(|e| e.contains("not a multicast group")), "{not_group:?}");
        let no_iface = settle(&r, &m.join_group(IpAddr::V4(GROUP4), "nosuch0"));
        assert!(no_iface.as_ref().is_err_and(|e| e.contains("nosuch0")), "{no_iface:?}");
        settle(&r, &m.join_group(IpAddr::V4(GROUP4), V0)).expect("join");
        let twice = settle(&r, &m.join_group(IpAddr::V4(GROUP4), V0));
        assert!(twice.as_ref().is_err_and(|e| e.contains("cannot join multicast group 239.255.77.1")), "{twice:?}");
        settle(&r, &m.leave_group(IpAddr::V4(GROUP4), V0)).expect("leave");
        let not_member = settle(&r, &m.leave_group(IpAddr::V4(GROUP4), V0));
        assert!(not_member.is_err(), "left a group it was not in");
        let wrong_family = settle(&r, &m.join_group(IpAddr::V6(GROUP6), V0));
        assert!(wrong_family.is_err(), "joined an IPv6 group by an IPv4 interface address");
    }
);

netns_test!(
    fn ipv6_group(r) {
        let (k, got) = keeper();
        let member = r.listen_multicast(0, k, "::", false).unwrap();
        let port = member.local_addr().port();
        let m = member.multicast().unwrap();
        settle(&r, &m.join_group(IpAddr::V6(GROUP6), "v0")).expect("join an IPv6 group by interface name");
        let out = sender(&r, true);
        let index = out.multicast().unwrap().outgoing_interface().unwrap();
        assert_ne!(index, "0", "the outgoing interface is v0's index");
        let to = Address::Ip(SocketAddr::new(IpAddr::V6(GROUP6), port));
        send_until(&r, &out, b"ipv6 group", &to, || !got.borrow().is_empty());
        assert!(all_are(&got, b"ipv6 group"), "{:?}", got.borrow());
        // By index, too.
        settle(&r, &m.leave_group(IpAddr::V6(GROUP6), &index)).expect("leave by index");
    }
);
