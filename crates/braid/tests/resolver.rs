//! Name resolution: the default threaded resolver (Twisted reference §4.6
//! items 1–3), `Reactor::resolve`, and installing a resolver of one's own.
//! §4.6.4 (IDNA for non-ASCII names) is left to the system's getaddrinfo.

mod common;

use std::cell::RefCell;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};

use braid::defer::Deferred;
use braid::protocols::echo::Echo;
use braid::resolver::{Resolver, ThreadedResolver};
use braid::{Error, Failure, Reactor};

/// Runs `flow` as a future on the running reactor (so the thread pool is
/// up) and fails the test if it fails.
fn run_flow<F>(r: &Reactor, flow: F)
where
    F: std::future::Future<Output = Result<(), Failure>> + 'static,
{
    let outcome = Rc::new(RefCell::new(None));
    let (o, rr) = (outcome.clone(), r.clone());
    r.spawn(flow).then(move |res| {
        *o.borrow_mut() = Some(res);
        let _ = rr.stop();
        Ok::<(), Failure>(())
    });
    common::run_reactor(r);
    let res = outcome.borrow_mut().take();
    if let Err(f) = res.expect("the flow finished") {
        panic!("flow failed: {f}");
    }
}

reactor_test! {
    /// §4.6.1: lookups run on the pool; the answer arrives as a Deferred on
    /// the reactor thread.
    fn threaded_lookup_succeeds(r) {
        let rr = r.clone();
        run_flow(&r, async move {
            let addrs = rr.resolver().resolve(&rr, "localhost", 8080).await?;
            assert!(rr.is_in_io_thread());
            assert!(addrs.iter().any(|a| a.ip().is_loopback() && a.port() == 8080), "{addrs:?}");
            Ok(())
        });
    }
}

reactor_test! {
    /// §4.6.2: a lookup that fails is DnsLookupFailed naming the host.
    fn threaded_lookup_failure(r) {
        let rr = r.clone();
        run_flow(&r, async move {
            let resolver = ThreadedResolver::with_lookup(Duration::from_secs(10), |_, _| {
                Err(std::io::Error::other("no such host"))
            });
            let err = resolver.resolve(&rr, "nowhere.test", 80).await.unwrap_err();
            assert!(matches!(err.braid_error(), Some(Error::DnsLookupFailed { host, .. }) if host == "nowhere.test"), "{err}");
            assert!(err.to_string().contains("no such host"), "{err}");
            Ok(())
        });
    }
}

reactor_test! {
    /// §4.6.3: a lookup slower than the timeout fails at the deadline, not
    /// when the lookup eventually returns.
    fn threaded_lookup_timeout(r) {
        let rr = r.clone();
        run_flow(&r, async move {
            let resolver = ThreadedResolver::with_lookup(Duration::from_millis(100), |_, _| {
                std::thread::sleep(Duration::from_secs(4));
                Ok(vec![SocketAddr::from(([127, 0, 0, 1], 1))])
            });
            let start = Instant::now();
            let err = resolver.resolve(&rr, "slow.test", 1).await.unwrap_err();
            // Generous: the deadline is 0.1 s, the lookup's answer comes at 4 s.
            assert!(start.elapsed() < Duration::from_secs(3), "failed at the deadline, not after the lookup");
            assert!(err.to_string().contains("no answer within"), "{err}");
            Ok(())
        });
    }
}

reactor_test! {
    /// Reactor::resolve follows Twisted: "" is 0.0.0.0, an IPv4 literal is
    /// itself, a name gives its first IPv4 address.
    fn reactor_resolve(r) {
        let rr = r.clone();
        run_flow(&r, async move {
            assert_eq!(rr.resolve("").await?, IpAddr::V4(Ipv4Addr::UNSPECIFIED));
            assert_eq!(rr.resolve("10.1.2.3").await?, "10.1.2.3".parse::<IpAddr>().unwrap());
            assert_eq!(rr.resolve("localhost").await?, IpAddr::V4(Ipv4Addr::LOCALHOST));
            Ok(())
        });
    }
}

/// Maps one made-up name to loopback, answers another with nothing, and
/// refuses the rest.
struct Hosts;

impl Resolver for Hosts {
    fn resolve(&self, _reactor: &Reactor, host: &str, port: u16) -> Deferred<Vec<SocketAddr>> {
        if host == "braid.test" {
            Deferred::succeed(vec![SocketAddr::from(([127, 0, 0, 1], port))])
        } else if host == "empty.test" {
            Deferred::succeed(Vec::new())
        } else {
            Deferred::fail(Error::DnsLookupFailed { host: host.into(), reason: "not in the table".into() })
        }
    }
}

/// Sends a line, fires `got` with the echo.
struct Once(Deferred<Vec<u8>>, Option<braid::Transport>);

impl braid::Protocol for Once {
    fn connection_made(&mut self, t: braid::Transport) {
        t.write(b"by table");
        self.1 = Some(t);
    }
    fn data_received(&mut self, data: &[u8]) {
        let _ = self.0.callback(data.to_vec());
        if let Some(t) = &self.1 {
            t.lose_connection();
        }
    }
}

/// Fires `failed` with the reason a connection attempt failed.
struct Fail(Deferred<String>);

impl braid::protocol::Factory for Fail {
    fn build_protocol(&mut self, _a: &braid::Address) -> Option<Box<dyn braid::Protocol>> {
        None
    }
}

impl braid::ClientFactory for Fail {
    fn client_connection_failed(&mut self, _c: &dyn braid::Connector, reason: Failure) {
        let _ = self.0.callback(reason.to_string());
    }
}

reactor_test! {
    /// An installed resolver is what connect_tcp uses; an empty answer is a
    /// clean failure; installing returns the previous resolver.
    fn pluggable_resolver_serves_connect_tcp(r) {
        let rr = r.clone();
        run_flow(&r, async move {
            let old = rr.install_resolver(Rc::new(Hosts));
            assert!(old.resolve(&rr, "localhost", 1).await.is_ok(), "the old one was the threaded default");
            let port = rr.listen_tcp("127.0.0.1:0", Echo::new, 50).unwrap().local_addr().port();
            let got = Deferred::new();
            let g = got.clone();
            rr.connect_tcp("braid.test", port, move || Once(g.clone(), None), None, None);
            assert_eq!(got.await?, b"by table");
            for (name, want) in [("empty.test", "no addresses"), ("other.test", "not in the table")] {
                let failed = Deferred::new();
                rr.connect_tcp(name, port, Fail(failed.clone()), None, None);
                let reason = failed.await?;
                assert!(reason.contains(want), "{name}: {reason}");
            }
            Ok(())
        });
    }
}
