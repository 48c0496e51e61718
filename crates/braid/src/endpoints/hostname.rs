//! The host-name client endpoint (Twisted's `HostnameEndpoint`) and the
//! IDNA encoding of its host.
//!
//! A host name is kept in the form DNS and certificates use: an IP address
//! literal as it is, any other name mapped and encoded by UTS 46
//! (NFC-normalised, lower-cased, each non-ASCII label in punycode), so
//! `bücher.example` is resolved, connected to and shown as
//! `xn--bcher-kva.example`. A name that does not encode (a forbidden
//! character, an empty or overlong label, a bad `xn--` label) is not
//! refused when the endpoint is built: `connect` fails, naming it, as in
//! Twisted, so a description can be parsed before its host is checked.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use idna::uts46::{AsciiDenyList, DnsLength, Hyphens, Uts46};

use super::{cancellable, ClientEndpoint, Wrapping};
use crate::defer::Deferred;
use crate::error::{Error, Failure};
use crate::protocol::Factory;
use crate::reactor::Reactor;
use crate::transport::Transport;

/// A host as a client endpoint keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Host {
    /// An IP address literal.
    Ip(IpAddr),
    /// A name in its ASCII (IDNA) form.
    Name(String),
    /// A name that has no IDNA form: connecting to it fails.
    Invalid(String),
}

impl Host {
    /// Encodes `text`: an IP literal stays one, a name is mapped and
    /// punycode-encoded by UTS 46 (with the URL standard's forbidden
    /// characters and DNS's length limits; a trailing root dot is kept).
    pub fn encode(text: &str) -> Host {
        if let Ok(ip) = text.parse::<IpAddr>() {
            return Host::Ip(ip);
        }
        match Uts46::new().to_ascii(
            text.as_bytes(),
            AsciiDenyList::URL,
            Hyphens::Allow,
            DnsLength::VerifyAllowRootDot,
        ) {
            Ok(ascii) => Host::Name(ascii.into_owned()),
            Err(_) => Host::Invalid(text.to_owned()),
        }
    }

    /// The form to resolve and connect to, or why there is none.
    pub fn ascii(&self) -> Result<String, Error> {
        match self {
            Host::Ip(ip) => Ok(ip.to_string()),
            Host::Name(name) => Ok(name.clone()),
            Host::Invalid(text) => Err(Error::InvalidAddress(format!(
                "host name '{}' is not a valid international domain name (IDNA)",
                text.escape_debug()
            ))),
        }
    }
}

/// The host alone: IPv6 in brackets (so a port can follow), a bad name
/// with its control characters escaped.
impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
            Host::Ip(ip) => write!(f, "{ip}"),
            Host::Name(name) => f.write_str(name),
            Host::Invalid(text) => write!(f, "{}", text.escape_debug()),
        }
    }
}

/// Connects to a host name and port over TCP, trying every address it
/// resolves to, staggered (Twisted's `HostnameEndpoint`; the `tcp:HOST:PORT`
/// client description builds one).
pub struct HostnameEndpoint {
    reactor: Reactor,
    host: Host,
    port: u16,
    timeout: Duration,
    bind: Option<SocketAddr>,
}

impl HostnameEndpoint {
    /// An endpoint for `host` (a name, in any script, or an IP literal) and
    /// `port`, with the default timeout and no bind address.
    pub fn new(reactor: &Reactor, host: &str, port: u16) -> HostnameEndpoint {
        HostnameEndpoint {
            reactor: reactor.clone(),
            host: Host::encode(host),
            port,
            timeout: crate::tcp::DEFAULT_CONNECT_TIMEOUT,
            bind: None,
        }
    }

    /// Gives up on an attempt after `timeout`.
    pub fn with_timeout(mut self, timeout: Duration) -> HostnameEndpoint {
        self.timeout = timeout;
        self
    }

    /// Binds the local end to this address first (port 0: any).
    pub fn with_bind_address(mut self, bind: Option<SocketAddr>) -> HostnameEndpoint {
        self.bind = bind;
        self
    }

    /// The host as kept (encoded).
    pub fn host(&self) -> &Host {
        &self.host
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The connect timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The bind address, if any.
    pub fn bind_address(&self) -> Option<SocketAddr> {
        self.bind
    }

    /// Starts the attempt with `factory` (already wrapped for the
    /// endpoint); the name's error if it has no ASCII form.
    pub(super) fn dial(
        &self,
        factory: impl crate::protocol::ClientFactory + 'static,
    ) -> Result<crate::stream::StreamConnector, Error> {
        let host = self.host.ascii()?;
        Ok(self.reactor.connect_tcp(&host, self.port, factory, Some(self.timeout), self.bind))
    }

    pub(super) fn reactor(&self) -> &Reactor {
        &self.reactor
    }
}

/// `host:port`, the host in its punycode form, IPv6 in brackets.
impl fmt::Display for HostnameEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

impl fmt::Debug for HostnameEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HostnameEndpoint({self})")
    }
}

impl ClientEndpoint for HostnameEndpoint {
    fn connect(&self, factory: Box<dyn Factory>) -> Deferred<Transport> {
        let (done, slot) = cancellable();
        let wrapping = Wrapping { factory, done: done.clone() };
        match self.dial(wrapping) {
            Ok(connector) => *slot.borrow_mut() = Some(connector),
            Err(e) => {
                let _ = done.errback(Failure::new(e));
            }
        }
        done
    }

    fn describe(&self) -> String {
        format!("tcp:{self}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn name(host: &str) -> Host {
        Host::Name(host.to_owned())
    }

    // §4.13 item 18: names are kept IDNA-encoded and NFC-normalised; IP
    // literals as they are; bad names kept as given, to fail at connect.
    #[test]
    fn hosts_are_kept_in_their_ascii_form() {
        let table: &[(&str, Host)] = &[
            ("bücher.example", name("xn--bcher-kva.example")),
            // Decomposed (u + combining diaeresis): NFC first, the same name.
            ("bu\u{308}cher.example", name("xn--bcher-kva.example")),
            ("BÜCHER.Example", name("xn--bcher-kva.example")),
            ("xn--bcher-kva.example", name("xn--bcher-kva.example")),
            ("例え.テスト", name("xn--r8jz45g.xn--zckzah")),
            ("localhost", name("localhost")),
            ("under_score.example", name("under_score.example")),
            ("example.com.", name("example.com.")),
            ("127.0.0.1", Host::Ip([127, 0, 0, 1].into())),
            ("::1", Host::Ip(std::net::Ipv6Addr::LOCALHOST.into())),
        ];
        for (text, want) in table {
            assert_eq!(Host::encode(text), *want, "{text:?}");
        }
        for bad in ["bad host", "a..b", "x/y", "", "xn--a.example", "a\u{0}b", &"a".repeat(64)] {
            let host = Host::encode(bad);
            assert_eq!(host, Host::Invalid(bad.to_owned()), "{bad:?}");
            let why = host.ascii().unwrap_err().to_string();
            assert!(why.contains(&format!("'{}'", bad.escape_debug())), "{bad:?}: {why}");
            assert!(why.contains("IDNA"), "{why}");
        }
    }

    // §4.13 item 19: the text form is host:port, punycode, [v6]:port,
    // escapes for what cannot be shown.
    #[test]
    fn the_text_form_shows_the_encoded_host_and_port() {
        let r = Reactor::new(crate::Backend::Poll).unwrap();
        let show = |h: &str| HostnameEndpoint::new(&r, h, 80).to_string();
        assert_eq!(show("bücher.example"), "xn--bcher-kva.example:80");
        assert_eq!(show("::1"), "[::1]:80");
        assert_eq!(show("fe80::1"), "[fe80::1]:80");
        assert_eq!(show("127.0.0.1"), "127.0.0.1:80");
        assert_eq!(show("bad\u{7}host"), "bad\\u{7}host:80");
        assert_eq!(
            HostnameEndpoint::new(&r, "bücher.example", 443).describe(),
            "tcp:xn--bcher-kva.example:443"
        );
    }

    proptest! {
        // Encoding never panics; what encodes is ASCII, encodes to itself
        // again, and names the same host as its NFC form does.
        #[test]
        fn encoding_is_ascii_stable_and_normalised(text in "\\PC{0,40}") {
            match Host::encode(&text) {
                Host::Name(ascii) => {
                    prop_assert!(ascii.is_ascii());
                    prop_assert_eq!(Host::encode(&ascii), Host::Name(ascii.clone()));
                    let nfc: String = idna::uts46::Uts46::new()
                        .to_unicode(text.as_bytes(), AsciiDenyList::URL, Hyphens::Allow)
                        .0
                        .into_owned();
                    prop_assert_eq!(Host::encode(&nfc), Host::Name(ascii));
                }
                Host::Ip(ip) => prop_assert_eq!(Host::encode(&ip.to_string()), Host::Ip(ip)),
                Host::Invalid(t) => {
                    prop_assert_eq!(&t, &text);
                    prop_assert!(Host::Invalid(t).ascii().is_err());
                }
            }
        }
    }
}
