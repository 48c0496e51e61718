//! Name resolution: turning a host name into addresses without blocking the
//! loop.
//!
//! The reactor asks its installed [`Resolver`]; the default,
//! [`ThreadedResolver`], runs `getaddrinfo` on the reactor's thread pool and
//! gives up after a timeout (Twisted's 60 s). Install another with
//! [`Reactor::install_resolver`], e.g. to map test names to loopback or to
//! use an asynchronous DNS client.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use crate::defer::{Deferred, Outcome};
use crate::error::{Error, Failure};
use crate::reactor::Reactor;

/// Resolves host names for a reactor (Twisted's `IHostnameResolver`).
pub trait Resolver {
    /// Every address of `host`, with `port` attached, in the order to try
    /// them. Failure: `Error::DnsLookupFailed`.
    fn resolve(&self, reactor: &Reactor, host: &str, port: u16) -> Deferred<Vec<SocketAddr>>;
}

/// A blocking lookup the threaded resolver runs on the pool.
pub type Lookup = dyn Fn(&str, u16) -> std::io::Result<Vec<SocketAddr>> + Send + Sync;

/// Twisted's default total lookup time (the sum of 1, 3, 11 and 45 s).
pub const DEFAULT_RESOLVE_TIMEOUT: Duration = Duration::from_secs(60);

/// The default resolver: the system's `getaddrinfo` on the reactor's thread
/// pool, so a slow DNS server never blocks the loop, bounded by a timeout.
pub struct ThreadedResolver {
    timeout: Duration,
    lookup: Arc<Lookup>,
}

impl Default for ThreadedResolver {
    fn default() -> Self {
        ThreadedResolver::new(DEFAULT_RESOLVE_TIMEOUT)
    }
}

impl ThreadedResolver {
    /// `getaddrinfo`, giving up after `timeout`.
    pub fn new(timeout: Duration) -> Self {
        ThreadedResolver::with_lookup(timeout, |host, port| {
            (host, port).to_socket_addrs().map(|a| a.collect())
        })
    }

    /// Any blocking lookup function in place of `getaddrinfo` (a hosts
    /// table, a test double), with the same thread-pool and timeout
    /// handling.
    pub fn with_lookup(
        timeout: Duration,
        lookup: impl Fn(&str, u16) -> std::io::Result<Vec<SocketAddr>> + Send + Sync + 'static,
    ) -> Self {
        ThreadedResolver { timeout, lookup: Arc::new(lookup) }
    }
}

fn lookup_failed(host: &str, reason: impl std::fmt::Display) -> Failure {
    Failure::new(Error::DnsLookupFailed { host: host.to_string(), reason: reason.to_string() })
}

impl Resolver for ThreadedResolver {
    fn resolve(&self, reactor: &Reactor, host: &str, port: u16) -> Deferred<Vec<SocketAddr>> {
        let lookup = self.lookup.clone();
        let name = host.to_string();
        let d = reactor.defer_to_thread(move || lookup(&name, port));
        // The worker cannot be interrupted; past the deadline its answer is
        // simply dropped.
        d.add_timeout(reactor, self.timeout);
        let host = host.to_string();
        let timeout = self.timeout;
        d.then(move |result| -> Outcome<Vec<SocketAddr>> {
            Outcome::Done(match result {
                Ok(addrs) if addrs.is_empty() => Err(lookup_failed(&host, "no addresses")),
                Ok(addrs) => Ok(addrs),
                Err(f) if matches!(f.braid_error(), Some(Error::TimedOut)) => {
                    Err(lookup_failed(&host, format!("no answer within {timeout:?}")))
                }
                Err(f) => Err(lookup_failed(&host, f)),
            })
        })
    }
}

impl Reactor {
    /// Replaces the reactor's resolver; returns the one it had.
    pub fn install_resolver(&self, resolver: Rc<dyn Resolver>) -> Rc<dyn Resolver> {
        let old = self.resolver();
        *self.extension::<ResolverSlot>().0.borrow_mut() = Some(resolver);
        old
    }

    /// The installed resolver (a [`ThreadedResolver`] unless replaced).
    pub fn resolver(&self) -> Rc<dyn Resolver> {
        let slot = self.extension::<ResolverSlot>();
        let mut current = slot.0.borrow_mut();
        current.get_or_insert_with(|| Rc::new(ThreadedResolver::default())).clone()
    }

    /// Resolves `host` to one IPv4 address, as Twisted's `reactor.resolve`:
    /// `""` is `0.0.0.0`, an IPv4 literal is returned as it is, anything else
    /// goes to the installed resolver and the first IPv4 answer wins.
    pub fn resolve(&self, host: &str) -> Deferred<IpAddr> {
        if host.is_empty() {
            return Deferred::succeed(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        }
        if let Ok(ip) = host.parse::<Ipv4Addr>() {
            return Deferred::succeed(IpAddr::V4(ip));
        }
        let name = host.to_string();
        self.resolver().resolve(self, host, 0).then(move |result| -> Outcome<IpAddr> {
            Outcome::Done(result.and_then(|addrs| {
                addrs
                    .iter()
                    .map(|a| a.ip())
                    .find(IpAddr::is_ipv4)
                    .ok_or_else(|| lookup_failed(&name, "no IPv4 address"))
            }))
        })
    }
}

/// Where a reactor keeps its resolver (per-reactor extension state).
#[derive(Default)]
struct ResolverSlot(std::cell::RefCell<Option<Rc<dyn Resolver>>>);
