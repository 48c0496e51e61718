//! The endpoint description grammar: arbitrary text. Properties: parsing
//! never panics; whatever parses, quoting its fields and parsing again
//! gives the same kind and arguments; and the server/client registries
//! turn any parsed description into an endpoint or a clear error, without
//! opening anything (building an endpoint does not listen or connect).
//! Any text as a client's host name: its IDNA form is ASCII and encodes
//! to itself again, and a name without one is kept as given.
#![no_main]

use braid::endpoints::{parse, quote, Host, Registry};
use libfuzzer_sys::fuzz_target;

thread_local! {
    static REACTOR: braid::Reactor = braid::Reactor::new(braid::Backend::Poll).expect("a reactor");
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match Host::encode(text) {
        Host::Name(ascii) => {
            assert!(ascii.is_ascii(), "{text:?} encoded to {ascii:?}");
            assert_eq!(Host::encode(&ascii), Host::Name(ascii.clone()), "{text:?}");
        }
        Host::Ip(ip) => assert_eq!(Host::encode(&ip.to_string()), Host::Ip(ip)),
        Host::Invalid(kept) => {
            assert_eq!(kept, text);
            assert!(Host::Invalid(kept).ascii().is_err());
        }
    }
    let Ok(d) = parse(text) else { return };
    let mut again = quote(&d.kind);
    for a in &d.args {
        again.push(':');
        again.push_str(&quote(a));
    }
    for (k, v) in &d.kwargs {
        again.push(':');
        again.push_str(&quote(k));
        again.push('=');
        again.push_str(&quote(v));
    }
    let d2 = parse(&again).expect("a quoted description parses");
    assert_eq!(d, d2, "quoting changed the description");
    // Building endpoints only checks fields (systemd: is left out: it
    // takes inherited descriptors when it listens, not when it is built).
    if !d.kind.eq_ignore_ascii_case("systemd") {
        REACTOR.with(|r| {
            let registry = Registry::default();
            if let Err(e) = registry.server(r, text) {
                assert!(!e.to_string().is_empty());
            }
            if let Err(e) = registry.client(r, text) {
                assert!(!e.to_string().is_empty());
            }
        });
    }
});
