//! The HTTP request decoder (`protocols::http::request`), and the whole
//! connection (`HttpChannel`) fed the same bytes. Properties: no panic,
//! no endless loop; a head is only returned within the limits; a body
//! never goes past its limit; an error ends the stream; fragmentation
//! changes nothing; the connection answers only with HTTP responses.
//! Input: a configuration byte (the limits) and chunks (a length byte,
//! then that many bytes).
#![no_main]

use std::rc::Rc;

use braid::protocols::http::request::{Event, Limits, RequestDecoder};
use braid::protocols::http::{Config, Response, Router, Site};
use braid::testing::{Clock, StringTransport};
use braid::ReactorTime;
use libfuzzer_sys::fuzz_target;

#[derive(Debug, PartialEq)]
enum Seen {
    Head(String, String, bool),
    Body(u64),
    End,
    Refused(u16),
}

fn limits(config: u8) -> Limits {
    Limits {
        max_request_line: 16 + usize::from(config & 0x0f) * 8,
        max_header_bytes: 32 + usize::from(config >> 4) * 16,
        max_headers: 1 + usize::from(config % 7),
        max_body: u64::from(config),
    }
}

/// Feeds `chunks` one by one, draining events after each.
fn decode(config: u8, chunks: &[&[u8]]) -> Vec<Seen> {
    let limits = limits(config);
    let mut d = RequestDecoder::new(limits.clone());
    let mut seen = Vec::new();
    let mut body = 0u64;
    'outer: for chunk in chunks {
        d.feed(chunk);
        for _ in 0..100_000 {
            match d.next_event() {
                Ok(None) => {
                    // Waiting for more of a head: never more than the limit kept.
                    if matches!(seen.last(), None | Some(Seen::End)) {
                        assert!(d.buffered() <= limits.max_header_bytes.max(limits.max_request_line) + chunk.len());
                    }
                    continue 'outer;
                }
                Ok(Some(Event::Head(h))) => {
                    assert!(!h.method().is_empty() && !h.target().is_empty());
                    body = 0;
                    seen.push(Seen::Head(h.method().to_string(), h.target().to_string(), h.keep_alive));
                }
                Ok(Some(Event::Body(n))) => {
                    assert!(n > 0);
                    body += n as u64;
                    assert!(body <= limits.max_body, "a body past its limit");
                    // Body pieces are merged: only the total counts.
                    if let Some(Seen::Body(t)) = seen.last_mut() {
                        *t += n as u64;
                    } else {
                        seen.push(Seen::Body(n as u64));
                    }
                }
                Ok(Some(Event::End)) => seen.push(Seen::End),
                Err(e) => {
                    assert!(matches!(e.status, 400 | 413 | 414 | 417 | 431 | 501 | 505), "{e:?}");
                    // An error sticks.
                    assert_eq!(d.next_event().err(), Some(e));
                    seen.push(Seen::Refused(e.status));
                    break 'outer;
                }
            }
        }
        panic!("the decoder never asked for more");
    }
    seen
}

fn channel(config: u8, chunks: &[&[u8]]) {
    let clock = Rc::new(Clock::new());
    let router = Router::new().mount("/", |r: &braid::protocols::http::Request<'_>| {
        Response::text(200, format!("{}", r.segments().len()))
    });
    let cfg = Config { limits: limits(config), ..Config::default() };
    let time: Rc<dyn ReactorTime> = clock.clone();
    let site = Site::new(time, Rc::new(router), cfg, None);
    let st = StringTransport::new();
    let Some(mut p) = site.channel(&st.transport().peer()) else { return };
    st.connect(&mut p);
    for chunk in chunks {
        st.feed(&mut p, chunk);
    }
    clock.advance(std::time::Duration::from_secs(3600));
    let out = st.value();
    assert!(out.is_empty() || out.starts_with(b"HTTP/1."), "{:?}", String::from_utf8_lossy(&out));
}

fuzz_target!(|data: &[u8]| {
    let Some((&config, mut rest)) = data.split_first() else { return };
    let mut chunks: Vec<&[u8]> = Vec::new();
    while let Some((&n, tail)) = rest.split_first() {
        let n = usize::from(n).min(tail.len());
        chunks.push(&tail[..n]);
        rest = &tail[n..];
    }
    let pieces = decode(config, &chunks);
    let whole: Vec<u8> = chunks.concat();
    assert_eq!(decode(config, &[&whole]), pieces, "fragmentation changed the events");
    channel(config, &chunks);
});
