//! Reading requests: the head (tokenized by `httparse`, every limit
//! checked here) and the framing of the body that may follow it, as a
//! decoder that does no I/O: push bytes with [`RequestDecoder::feed`],
//! pull [`Event`]s with [`RequestDecoder::next_event`].

use std::mem::MaybeUninit;
use std::ops::Range;

/// Limits on what a client may send, with nginx-like defaults.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Longest request line (method, target, version); longer: 414.
    pub max_request_line: usize,
    /// Longest head (request line and headers); longer: 431.
    pub max_header_bytes: usize,
    /// Most header fields; more: 431.
    pub max_headers: usize,
    /// Largest request body read (and discarded); larger: 413.
    pub max_body: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_request_line: 8 * 1024,
            max_header_bytes: 8 * 1024,
            max_headers: 100,
            max_body: 1024 * 1024,
        }
    }
}

/// The protocol version of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// HTTP/1.0: closes after each response unless it asks to keep alive.
    Http10,
    /// HTTP/1.1: keeps alive unless it asks to close.
    Http11,
}

impl Version {
    /// `HTTP/1.0` or `HTTP/1.1`.
    pub fn as_str(self) -> &'static str {
        match self {
            Version::Http10 => "HTTP/1.0",
            Version::Http11 => "HTTP/1.1",
        }
    }
}

/// A request's head. The bytes are kept as received; names and values are
/// ranges into them.
#[derive(Debug, Clone)]
pub struct RequestHead {
    raw: Vec<u8>,
    method: Range<usize>,
    target: Range<usize>,
    /// The protocol version.
    pub version: Version,
    headers: Vec<(Range<usize>, Range<usize>)>,
    /// How the body is framed.
    pub body: BodyFraming,
    /// `Expect: 100-continue` was sent.
    pub expect_continue: bool,
    /// The client wants the connection kept open after the response.
    pub keep_alive: bool,
}

/// How a request's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    /// No body.
    None,
    /// `Content-Length` bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

impl RequestHead {
    /// The method, as sent (methods are case-sensitive).
    pub fn method(&self) -> &str {
        std::str::from_utf8(&self.raw[self.method.clone()]).unwrap_or("")
    }

    /// The request target, as sent.
    pub fn target(&self) -> &str {
        std::str::from_utf8(&self.raw[self.target.clone()]).unwrap_or("")
    }

    /// Every header field, in order: (name, value).
    pub fn headers(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.headers
            .iter()
            .map(|(n, v)| (std::str::from_utf8(&self.raw[n.clone()]).unwrap_or(""), &self.raw[v.clone()]))
    }

    /// The first value of header `name` (any case), if it is valid UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    /// The request line as the access log shows it.
    pub fn request_line(&self) -> String {
        format!("{} {} {}", self.method(), self.target(), self.version.as_str())
    }
}

/// A request the decoder refused: answer `status` and close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    /// 400, 413, 414, 431, 501 or 505.
    pub status: u16,
    /// What was wrong, for the log.
    pub why: &'static str,
}

fn refuse(status: u16, why: &'static str) -> Refused {
    Refused { status, why }
}

/// What the decoder found next.
#[derive(Debug)]
pub enum Event {
    /// A request's head; its body (if any) follows as `Body` events.
    Head(Box<RequestHead>),
    /// Some bytes of the body (discarded; only counted).
    Body(usize),
    /// The request (head and body) is complete.
    End,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Reading a chunk-size line (hex digits, maybe extensions).
    Size,
    /// Inside a chunk's data.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// Reading trailer lines until an empty one.
    Trailer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Head,
    Length(u64),
    Chunked(Chunk),
    /// The body ended; `End` is due.
    Done,
    /// A request was refused; nothing more is read.
    Failed(Refused),
}

/// Header slots kept on the stack while a head is parsed.
const STACK_HEADERS: usize = 128;

/// Longest chunk-size or trailer line accepted.
const MAX_CHUNK_LINE: usize = 4096;

/// Decodes a stream of requests (pipelined ones included), one event at a
/// time, within [`Limits`].
#[derive(Debug)]
pub struct RequestDecoder {
    limits: Limits,
    buf: Vec<u8>,
    start: usize,
    state: State,
    body_read: u64,
}

impl RequestDecoder {
    /// A decoder enforcing `limits`.
    pub fn new(limits: Limits) -> Self {
        RequestDecoder { limits, buf: Vec::new(), start: 0, state: State::Head, body_read: 0 }
    }

    /// Adds received bytes.
    pub fn feed(&mut self, data: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > 4096 && self.start * 2 > self.buf.len() {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// Bytes received and not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// True while between requests with nothing of the next one received
    /// (empty lines before a request do not count as one).
    pub fn idle(&self) -> bool {
        self.state == State::Head && self.buf[self.start..].iter().all(|&b| b == b'\r' || b == b'\n')
    }

    /// The next event, `Ok(None)` if more bytes are needed, or the reason
    /// the request is refused (after which the decoder only refuses).
    pub fn next_event(&mut self) -> Result<Option<Event>, Refused> {
        let r = self.step();
        if let Err(e) = r {
            self.state = State::Failed(e);
        }
        r
    }

    fn step(&mut self) -> Result<Option<Event>, Refused> {
        loop {
            match self.state {
                State::Failed(e) => return Err(e),
                State::Done => {
                    self.state = State::Head;
                    return Ok(Some(Event::End));
                }
                State::Head => return self.head(),
                State::Length(0) => self.state = State::Done,
                State::Length(left) => {
                    let avail = self.buffered();
                    if avail == 0 {
                        return Ok(None);
                    }
                    let n = avail.min(usize::try_from(left).unwrap_or(usize::MAX));
                    self.start += n;
                    self.state = State::Length(left - n as u64);
                    return Ok(Some(Event::Body(n)));
                }
                State::Chunked(c) => {
                    let before = self.start;
                    match self.chunked(c)? {
                        Some(ev) => return Ok(Some(ev)),
                        None if self.start == before && self.state == State::Chunked(c) => return Ok(None),
                        None => {}
                    }
                }
            }
        }
    }

    /// One line of the chunked framing (without its CRLF), if complete.
    fn line(&mut self) -> Result<Option<Vec<u8>>, Refused> {
        let rest = &self.buf[self.start..];
        match rest.iter().position(|&b| b == b'\n') {
            Some(i) if i > MAX_CHUNK_LINE => Err(refuse(400, "chunk line too long")),
            Some(i) => {
                let line = rest[..i].strip_suffix(b"\r").unwrap_or(&rest[..i]).to_vec();
                self.start += i + 1;
                Ok(Some(line))
            }
            None if rest.len() > MAX_CHUNK_LINE => Err(refuse(400, "chunk line too long")),
            None => Ok(None),
        }
    }

    fn chunked(&mut self, c: Chunk) -> Result<Option<Event>, Refused> {
        match c {
            Chunk::Size => {
                let Some(line) = self.line()? else { return Ok(None) };
                let digits = line.split(|&b| b == b';').next().unwrap_or(&[]);
                let digits = digits.strip_suffix(b" ").unwrap_or(digits);
                if digits.is_empty() || digits.len() > 15 || !digits.iter().all(|b| b.is_ascii_hexdigit()) {
                    return Err(refuse(400, "bad chunk size"));
                }
                let size = u64::from_str_radix(std::str::from_utf8(digits).unwrap_or("x"), 16)
                    .map_err(|_| refuse(400, "bad chunk size"))?;
                if self.body_read.saturating_add(size) > self.limits.max_body {
                    return Err(refuse(413, "request body too large"));
                }
                self.body_read += size;
                self.state = State::Chunked(if size == 0 { Chunk::Trailer } else { Chunk::Data(size) });
                Ok(None)
            }
            Chunk::Data(left) => {
                let avail = self.buffered();
                if avail == 0 {
                    return Ok(None);
                }
                let n = avail.min(usize::try_from(left).unwrap_or(usize::MAX));
                self.start += n;
                let left = left - n as u64;
                self.state = State::Chunked(if left == 0 { Chunk::DataEnd } else { Chunk::Data(left) });
                Ok(Some(Event::Body(n)))
            }
            Chunk::DataEnd => {
                let Some(line) = self.line()? else { return Ok(None) };
                if !line.is_empty() {
                    return Err(refuse(400, "chunk data longer than its size"));
                }
                self.state = State::Chunked(Chunk::Size);
                Ok(None)
            }
            Chunk::Trailer => {
                let Some(line) = self.line()? else { return Ok(None) };
                if line.is_empty() {
                    self.state = State::Done;
                }
                Ok(None)
            }
        }
    }

    fn head(&mut self) -> Result<Option<Event>, Refused> {
        // RFC 9112 §2.2: empty lines before a request line are ignored.
        while self.start < self.buf.len() && matches!(self.buf[self.start], b'\r' | b'\n') {
            self.start += 1;
        }
        let rest = &self.buf[self.start..];
        if rest.is_empty() {
            return Ok(None);
        }
        // Only a window of the limit's size (plus one byte) is parsed, so
        // what is refused, and why, does not depend on how the bytes were
        // split: the request line's window while it has no end, the head's
        // after.
        let (max_line, max_head) = (self.limits.max_request_line, self.limits.max_header_bytes);
        let line_open = !rest[..rest.len().min(max_line + 1)].contains(&b'\n');
        let limit = if line_open { max_line.min(max_head) } else { max_head };
        let window = &rest[..rest.len().min(limit + 1)];
        // Room for the headers on the stack (uninitialized: nothing to fill
        // per request), on the heap only for a limit above it.
        let mut stack = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; STACK_HEADERS];
        let mut heap = Vec::new();
        let slots: &mut [MaybeUninit<httparse::Header<'_>>] = if self.limits.max_headers <= STACK_HEADERS {
            &mut stack[..self.limits.max_headers]
        } else {
            heap.resize_with(self.limits.max_headers, MaybeUninit::uninit);
            &mut heap
        };
        let mut req = httparse::Request::new(&mut []);
        let status = req.parse_with_uninit_headers(window, slots);
        let consumed = match status {
            Ok(httparse::Status::Partial) if window.len() > limit => {
                return Err(if line_open && window.len() > max_line {
                    refuse(414, "request line too long")
                } else {
                    refuse(431, "request header block too large")
                });
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Ok(httparse::Status::Complete(n)) => n,
            Err(httparse::Error::TooManyHeaders) => return Err(refuse(431, "too many header fields")),
            Err(httparse::Error::Version) => {
                // `HTTP/2.0` is a version we do not speak (505); `HTTP/1.x`
                // or `FOO` is no version (400). The major digit decides, and
                // the tokenizer stops at it, so what follows does not count.
                let mut spaces = window.iter().enumerate().filter(|(_, &b)| b == b' ').map(|(i, _)| i);
                let version = spaces.nth(1).map_or(&[][..], |i| &window[i + 1..]);
                let versioned = version.len() >= 6
                    && version.starts_with(b"HTTP/")
                    && version[5].is_ascii_digit()
                    && version[5] != b'1';
                return Err(if versioned {
                    refuse(505, "unsupported HTTP version")
                } else {
                    refuse(400, "malformed request line")
                });
            }
            Err(_) => return Err(refuse(400, "malformed request head")),
        };
        if consumed > self.limits.max_header_bytes {
            return Err(refuse(431, "request header block too large"));
        }
        let base = rest.as_ptr() as usize;
        let span = |s: &[u8]| {
            let from = s.as_ptr() as usize - base;
            from..from + s.len()
        };
        let method = span(req.method.unwrap_or("").as_bytes());
        let target = span(req.path.unwrap_or("").as_bytes());
        let version = if req.version == Some(0) { Version::Http10 } else { Version::Http11 };
        let fields: Vec<(Range<usize>, Range<usize>)> =
            req.headers.iter().map(|h| (span(h.name.as_bytes()), span(h.value))).collect();
        let raw = rest[..consumed].to_vec();
        self.start += consumed;
        let mut head = RequestHead {
            raw,
            method,
            target,
            version,
            headers: fields,
            body: BodyFraming::None,
            expect_continue: false,
            keep_alive: version == Version::Http11,
        };
        self.interpret(&mut head)?;
        self.body_read = 0;
        self.state = match head.body {
            BodyFraming::None => State::Done,
            BodyFraming::Length(n) => State::Length(n),
            BodyFraming::Chunked => State::Chunked(Chunk::Size),
        };
        Ok(Some(Event::Head(Box::new(head))))
    }

    /// The headers that frame the request or the connection.
    fn interpret(&self, head: &mut RequestHead) -> Result<(), Refused> {
        let mut length: Option<u64> = None;
        let mut chunked = false;
        let mut hosts = 0;
        let mut keep_alive = head.keep_alive;
        let mut expect_continue = false;
        for (name, value) in head.headers() {
            let value = std::str::from_utf8(value).map_err(|_| refuse(400, "header value not UTF-8"))?;
            if name.eq_ignore_ascii_case("content-length") {
                for part in value.split(',') {
                    let part = part.trim();
                    if part.is_empty() || part.len() > 19 || !part.bytes().all(|b| b.is_ascii_digit()) {
                        return Err(refuse(400, "bad Content-Length"));
                    }
                    let n: u64 = part.parse().map_err(|_| refuse(400, "bad Content-Length"))?;
                    if length.is_some_and(|l| l != n) {
                        return Err(refuse(400, "conflicting Content-Length"));
                    }
                    length = Some(n);
                }
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                // Only `chunked`, alone and last, is understood.
                let codings: Vec<&str> = value.split(',').map(str::trim).filter(|c| !c.is_empty()).collect();
                if chunked || codings.len() != 1 || !codings[0].eq_ignore_ascii_case("chunked") {
                    return Err(refuse(501, "unsupported Transfer-Encoding"));
                }
                chunked = true;
            } else if name.eq_ignore_ascii_case("connection") {
                for token in value.split(',').map(str::trim) {
                    if token.eq_ignore_ascii_case("close") {
                        keep_alive = false;
                    } else if token.eq_ignore_ascii_case("keep-alive") && head.version == Version::Http10 {
                        keep_alive = true;
                    }
                }
            } else if name.eq_ignore_ascii_case("expect") {
                if !value.trim().eq_ignore_ascii_case("100-continue") {
                    return Err(refuse(417, "unsupported Expect"));
                }
                expect_continue = head.version == Version::Http11;
            } else if name.eq_ignore_ascii_case("host") {
                hosts += 1;
            }
        }
        head.keep_alive = keep_alive;
        head.expect_continue = expect_continue;
        if head.version == Version::Http11 && hosts != 1 {
            return Err(refuse(400, "HTTP/1.1 request without exactly one Host"));
        }
        if hosts > 1 {
            return Err(refuse(400, "more than one Host"));
        }
        if head.target().is_empty() {
            return Err(refuse(400, "empty request target"));
        }
        // A request with both is how smuggling starts: refused (RFC 9112 §6.3).
        head.body = match (chunked, length) {
            (true, Some(_)) => return Err(refuse(400, "both Transfer-Encoding and Content-Length")),
            (true, None) => BodyFraming::Chunked,
            (false, Some(0)) | (false, None) => BodyFraming::None,
            (false, Some(n)) if n > self.limits.max_body => {
                return Err(refuse(413, "request body too large"))
            }
            (false, Some(n)) => BodyFraming::Length(n),
        };
        if head.body == BodyFraming::None {
            head.expect_continue = false;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn events(input: &[u8], limits: Limits) -> Vec<Result<String, u16>> {
        let mut d = RequestDecoder::new(limits);
        d.feed(input);
        let mut out = Vec::new();
        for _ in 0..1000 {
            match d.next_event() {
                Ok(None) => break,
                Ok(Some(Event::Head(h))) => out.push(Ok(format!("{} {}", h.method(), h.target()))),
                Ok(Some(Event::Body(n))) => out.push(Ok(format!("body {n}"))),
                Ok(Some(Event::End)) => out.push(Ok("end".into())),
                Err(e) => {
                    out.push(Err(e.status));
                    break;
                }
            }
        }
        out
    }

    fn ok(v: &[&str]) -> Vec<Result<String, u16>> {
        v.iter().map(|s| Ok(s.to_string())).collect()
    }

    #[test]
    fn pipelined_requests_with_bodies() {
        let input = b"\r\nGET /a HTTP/1.1\r\nHost: x\r\n\r\nPOST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabcGET /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2;ext=1\r\nhi\r\n0\r\nTrailer: t\r\n\r\n";
        assert_eq!(
            events(input, Limits::default()),
            ok(&["GET /a", "end", "POST /b", "body 3", "end", "GET /c", "body 2", "end"])
        );
    }

    #[test]
    fn limits_and_malformed_heads() {
        let small = Limits { max_request_line: 32, max_header_bytes: 64, max_headers: 2, max_body: 10 };
        let long_line = format!("GET /{} HTTP/1.1\r\n", "a".repeat(40));
        assert_eq!(events(long_line.as_bytes(), small.clone()), vec![Err(414)]);
        assert_eq!(events(format!("GET /{}", "a".repeat(40)).as_bytes(), small.clone()), vec![Err(414)]);
        let big_head = format!("GET / HTTP/1.1\r\nHost: x\r\nX: {}\r\n", "b".repeat(60));
        assert_eq!(events(big_head.as_bytes(), small.clone()), vec![Err(431)]);
        let many = b"GET / HTTP/1.1\r\nHost: x\r\nA: 1\r\nB: 2\r\n\r\n";
        assert_eq!(events(many, small.clone()), vec![Err(431)]);
        let body = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\n";
        assert_eq!(events(body, small.clone()), vec![Err(413)]);
        let chunks = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nb\r\n";
        assert_eq!(events(chunks, small), vec![Ok("POST /".into()), Err(413)]);
        for bad in [
            &b"GET / HTTP/1.1\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            b"GET\x00/ HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1, 2\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nab\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n",
            b"NOT HTTP AT ALL\r\n\r\n",
        ] {
            let got = events(bad, Limits::default());
            assert_eq!(got.last(), Some(&Err(400)), "{:?}: {got:?}", String::from_utf8_lossy(bad));
        }
        assert_eq!(events(b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", Limits::default()), vec![Err(505)]);
        assert_eq!(
            events(b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", Limits::default()),
            vec![Err(501)]
        );
        assert_eq!(
            events(b"GET / HTTP/1.1\r\nHost: x\r\nExpect: magic\r\n\r\n", Limits::default()),
            vec![Err(417)]
        );
    }

    // Found by the fuzzer: a version refused as soon as its eight bytes
    // are in, whatever follows them.
    #[test]
    fn the_version_refusal_does_not_depend_on_what_follows() {
        for input in
            [&b"GET / HTTP/2.0X\r\n\r\n"[..], b"GET / HTTP/2.0\r\n\r\n", b"GET / HTTP/2.", b"GET / HTTP/3"]
        {
            assert_eq!(
                events(input, Limits::default()),
                vec![Err(505)],
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
        assert_eq!(events(b"GET / XTTP/1.1\r\n\r\n", Limits::default()), vec![Err(400)]);
        assert_eq!(events(b"GET / HTTP/1.x\r\n\r\n", Limits::default()), vec![Err(400)]);
    }

    // Found by the fuzzer: a head limit below the request-line limit, and
    // a bad version past the head limit, refused alike however split.
    #[test]
    fn a_long_bad_line_is_refused_alike_however_split() {
        // A bad version at byte 42: past the head limit, before the line's end.
        let input = b"T` O,,,,,,,,)ggglgggggggggggggggggggPPM T` Expect: 100continue\r\n  ";
        let limits = Limits { max_request_line: 96, max_header_bytes: 32, max_headers: 4, max_body: 10 };
        let whole = events(input, limits.clone());
        assert_eq!(whole, vec![Err(431)]);
        for cut in [10, 32, 55] {
            let mut d = RequestDecoder::new(limits.clone());
            d.feed(&input[..cut]);
            let first = d.next_event();
            let refused = match first {
                Err(e) => e,
                Ok(_) => {
                    d.feed(&input[cut..]);
                    d.next_event().unwrap_err()
                }
            };
            assert_eq!(vec![Err(refused.status)], whole, "cut {cut}");
        }
    }

    // Past the stack's header slots the limit still holds, on the heap.
    #[test]
    fn a_header_limit_above_the_stack_slots() {
        let limits = Limits { max_headers: 200, max_header_bytes: 64 * 1024, ..Limits::default() };
        let head = |n: usize| {
            let fields: String = (0..n).map(|i| format!("X-{i}: v\r\n")).collect();
            format!("GET / HTTP/1.1\r\nHost: h\r\n{fields}\r\n")
        };
        assert_eq!(events(head(150).as_bytes(), limits.clone()), ok(&["GET /", "end"]));
        assert_eq!(events(head(200).as_bytes(), limits), vec![Err(431)]);
    }

    #[test]
    fn connection_and_expect() {
        let mut d = RequestDecoder::new(Limits::default());
        d.feed(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\nGET / HTTP/1.0\r\n\r\nPUT / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n");
        let mut heads = Vec::new();
        while let Some(ev) = d.next_event().unwrap() {
            if let Event::Head(h) = ev {
                heads.push((h.keep_alive, h.expect_continue));
            }
        }
        assert_eq!(heads, [(true, false), (false, false), (false, true)]);
    }

    proptest! {
        // Any split of the same bytes gives the same events.
        #[test]
        fn splits_do_not_matter(cut in 0usize..200, body in proptest::collection::vec(any::<u8>(), 1..50)) {
            let mut input = format!("POST /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n", body.len()).into_bytes();
            input.extend_from_slice(&body);
            input.extend_from_slice(b"\r\n0\r\n\r\nGET /y HTTP/1.1\r\nHost: h\r\n\r\n");
            let whole = events(&input, Limits::default());
            let cut = cut.min(input.len());
            let mut d = RequestDecoder::new(Limits::default());
            let mut got: Vec<String> = Vec::new();
            let mut total = 0;
            for part in [&input[..cut], &input[cut..]] {
                d.feed(part);
                while let Some(ev) = d.next_event().unwrap() {
                    match ev {
                        Event::Head(h) => got.push(format!("{} {}", h.method(), h.target())),
                        Event::Body(n) => total += n,
                        Event::End => got.push("end".into()),
                    }
                }
            }
            prop_assert_eq!(total, body.len());
            let heads: Vec<String> = whole.into_iter().filter_map(|e| e.ok()).filter(|e| !e.starts_with("body")).collect();
            prop_assert_eq!(got, heads);
        }

        // Whatever the bytes, the same refusal (or none) for any split:
        // limits are checked on windows, not on what happened to arrive.
        #[test]
        fn refusals_do_not_depend_on_splits(
            input in proptest::collection::vec(prop_oneof![Just(b'\r'), Just(b'\n'), Just(b' '), Just(b'G'), Just(b'/'), Just(b':'), any::<u8>()], 0..120),
            cut in 0usize..120,
            head_limit in prop_oneof![Just(8usize), Just(16), Just(40)],
        ) {
            let limits = Limits { max_request_line: 16, max_header_bytes: head_limit, max_headers: 2, max_body: 8 };
            let whole = events(&input, limits.clone());
            let cut = cut.min(input.len());
            let mut d = RequestDecoder::new(limits);
            let mut split = Vec::new();
            'feed: for part in [&input[..cut], &input[cut..]] {
                d.feed(part);
                loop {
                    match d.next_event() {
                        Ok(None) => break,
                        Ok(Some(Event::Head(h))) => split.push(Ok(format!("{} {}", h.method(), h.target()))),
                        Ok(Some(Event::Body(_))) => {}
                        Ok(Some(Event::End)) => split.push(Ok("end".into())),
                        Err(e) => {
                            split.push(Err(e.status));
                            break 'feed;
                        }
                    }
                }
            }
            let whole: Vec<_> = whole.into_iter().filter(|e| !matches!(e, Ok(s) if s.starts_with("body"))).collect();
            prop_assert_eq!(split, whole);
        }

        // Arbitrary bytes: never a panic, never an endless loop.
        #[test]
        fn arbitrary_input_is_refused_or_decoded(input in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = events(&input, Limits::default());
        }
    }
}
