//! The rustls session behind one TLS connection, on rustls's unbuffered
//! API: rustls reads ciphertext from buffers we own and writes what it
//! sends into buffers we own, so an idle connection keeps no read or
//! write buffer inside rustls (the buffered API keeps a 4 KiB read buffer
//! per connection for good). Everything that names rustls's connection
//! types is in this file; `protocol.rs` sees bytes in and bytes out.

use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncryptError, UnbufferedConnectionCommon, UnbufferedStatus,
};

use super::protocol::Side;

/// A rustls session in either role.
pub(crate) struct Session {
    role: Role,
    /// The name the client asked for, seen by the certificate lookup.
    sni: Option<Box<str>>,
    /// Ciphertext of a record (or handshake message) not yet complete:
    /// rustls's view of the input starts here, so every call into it is
    /// given these bytes. Empty, holding no memory, between whole records.
    pending: Vec<u8>,
}

/// The most ciphertext kept between reads for an incomplete record: a
/// handshake message rustls joins across records may reach 64 KiB, one
/// record 16 KiB and its header.
const MAX_PENDING: usize = 64 * 1024 + 16 * 1024 + 512;

enum Role {
    Server(UnbufferedServerConnection),
    Client(UnbufferedClientConnection),
}

/// What one pass over received ciphertext did.
pub(crate) struct Received {
    /// The peer's close_notify came (reported once).
    pub peer_closed: bool,
    /// rustls refused the input (an alert about it comes out of the next
    /// [`Session::flush`]), or an incomplete record grew too large.
    pub error: Option<rustls::Error>,
    /// Where this pass's plaintext starts in `plain` (see [`place_plain`]).
    pub plain_from: usize,
}

struct Pass {
    consumed: usize,
    peer_closed: bool,
    error: Option<rustls::Error>,
}

/// How far apart, modulo a page, the copy of a record's plaintext puts
/// its destination from its source.
const COPY_SKEW: usize = 2048;

/// Pads the empty `plain` so the record at `src` is copied to an address
/// `COPY_SKEW` bytes off its own within a page; returns the padding.
///
/// rustls hands each record's plaintext out of an allocation of its own,
/// and the allocator tends to give that the same offset within a page as
/// our reused buffer. A copy whose destination sits a few bytes past its
/// source modulo 4 KiB makes the processor treat each load as possibly
/// depending on the store just before it (4K aliasing), which slows the
/// copy several times over; half a page apart, it runs at full speed.
fn place_plain(plain: &mut Vec<u8>, src: &[u8]) -> usize {
    const PAGE: usize = 4096;
    plain.reserve(src.len() + PAGE);
    let base = plain.as_ptr() as usize;
    let pad = (src.as_ptr() as usize).wrapping_add(COPY_SKEW).wrapping_sub(base) % PAGE;
    plain.resize(pad, 0);
    pad
}

/// Runs `$body` with `$c` bound to the role's common connection and
/// `$process` to its `process_tls_records`, which rustls defines per role.
macro_rules! with_role {
    ($session:expr, |$c:ident, $process:ident| $body:expr) => {
        match &mut $session.role {
            Role::Server(s) => {
                let $c: &mut UnbufferedConnectionCommon<ServerConnectionData> = s;
                let $process = UnbufferedConnectionCommon::<ServerConnectionData>::process_tls_records;
                $body
            }
            Role::Client(s) => {
                let $c: &mut UnbufferedConnectionCommon<ClientConnectionData> = s;
                let $process = UnbufferedConnectionCommon::<ClientConnectionData>::process_tls_records;
                $body
            }
        }
    };
}

impl Session {
    pub fn new(side: Side) -> Result<Session, rustls::Error> {
        let role = match side {
            Side::Server(c) => Role::Server(UnbufferedServerConnection::new(c.rustls)?),
            Side::Client(c, name) => Role::Client(UnbufferedClientConnection::new(c.rustls, name)?),
        };
        Ok(Session { role, sni: None, pending: Vec::new() })
    }

    /// Reads the records in `data`, after what is pending from earlier
    /// reads: plaintext goes into `plain`, which must come empty, from
    /// [`Received::plain_from`] on, and what the handshake answers to
    /// `out`.
    ///
    /// rustls decrypts where the ciphertext lies, so whole records are
    /// read in `data` itself (which is left scrambled) and only a record
    /// cut by the end of a read is copied: its start is kept in `pending`,
    /// and the next read completes it from its front before going on in
    /// place. Bytes rustls keeps across records (a handshake message it
    /// joins) make the rest go through `pending` too.
    pub fn read(&mut self, data: &mut [u8], out: &mut OutBuf, plain: &mut Vec<u8>) -> Received {
        let server = matches!(self.role, Role::Server(_));
        if server && self.sni.is_none() {
            let _ = super::config::take_sni();
        }
        let mut plain_from = 0;
        let mut rest = data;
        let mut pass = Pass { consumed: 0, peer_closed: false, error: None };
        if !self.pending.is_empty() {
            let take = completing(&self.pending, rest);
            let mut pending = std::mem::take(&mut self.pending);
            pending.extend_from_slice(&rest[..take]);
            rest = &mut rest[take..];
            pass = with_role!(self, |c, process| read(c, process, &mut pending, out, plain, &mut plain_from));
            let left = pass.consumed.min(pending.len());
            if pass.error.is_some() || pass.peer_closed {
                return self.finish(server, pass, plain_from);
            }
            if left < pending.len() {
                // rustls keeps some of it: all the rest goes after it.
                pending.drain(..left);
                pending.extend_from_slice(rest);
                pass = with_role!(self, |c, process| read(
                    c,
                    process,
                    &mut pending,
                    out,
                    plain,
                    &mut plain_from
                ));
                let left = pass.consumed.min(pending.len());
                pending.drain(..left);
                self.pending = pending;
                return self.finish(server, pass, plain_from);
            }
        }
        if !rest.is_empty() {
            pass = with_role!(self, |c, process| read(c, process, rest, out, plain, &mut plain_from));
            let left = pass.consumed.min(rest.len());
            if pass.error.is_none() && !pass.peer_closed && left < rest.len() {
                self.pending.extend_from_slice(&rest[left..]);
            }
        }
        self.finish(server, pass, plain_from)
    }

    /// The end of [`Session::read`]: notes the name the client asked for,
    /// and refuses an incomplete record or message grown too large.
    fn finish(&mut self, server: bool, pass: Pass, plain_from: usize) -> Received {
        if server && self.sni.is_none() {
            self.sni = super::config::take_sni().map(String::into_boxed_str);
        }
        let mut error = pass.error;
        if error.is_none() && !pass.peer_closed && self.pending.len() > MAX_PENDING {
            error = Some(rustls::Error::General(format!(
                "more than {MAX_PENDING} bytes of an incomplete TLS record or handshake message"
            )));
        }
        if error.is_some() || pass.peer_closed {
            // Nothing more is read after these.
            self.pending = Vec::new();
        }
        Received { peer_closed: pass.peer_closed, error, plain_from }
    }

    /// Appends to `out` whatever rustls has to send now: a client's hello,
    /// handshake records, an alert after an error.
    pub fn flush(&mut self, out: &mut OutBuf) {
        let pending = &mut self.pending;
        // Only while rustls has records queued: a call past them would
        // read the input again, which after an error it must not.
        with_role!(self, |c, process| {
            while c.wants_write() {
                let UnbufferedStatus { discard, state } = process(c, pending);
                let more = match state {
                    Ok(ConnectionState::EncodeTlsData(mut e)) => encode(out, |buf| e.encode(buf)).is_ok(),
                    Ok(ConnectionState::TransmitTlsData(t)) => {
                        t.done();
                        true
                    }
                    _ => false,
                };
                pending.drain(..discard.min(pending.len()));
                if !more {
                    return;
                }
            }
        })
    }

    /// Encrypts `data` into `out` (once the handshake is done).
    pub fn encrypt(&mut self, data: &[u8], out: &mut OutBuf) -> Result<(), rustls::Error> {
        self.with_write_traffic(out, |w, out| {
            let mut w = w;
            encrypt(out, data.len(), |buf| w.encrypt(data, buf))
        })
    }

    /// Appends a close_notify alert to `out` (once the handshake is done;
    /// before, there is nothing to close and nothing is sent).
    pub fn close_notify(&mut self, out: &mut OutBuf) {
        let _ = self.with_write_traffic(out, |w, out| {
            let mut w = w;
            encrypt(out, 0, |buf| w.queue_close_notify(buf))
        });
    }

    /// Runs `f` in rustls's write-traffic state, first sending whatever
    /// rustls has queued ahead of it (a key update, session tickets).
    fn with_write_traffic<R>(
        &mut self,
        out: &mut OutBuf,
        f: impl FnOnce(WriteTraffic<'_>, &mut OutBuf) -> Result<R, rustls::Error>,
    ) -> Result<R, rustls::Error> {
        let mut f = Some(f);
        let pending = &mut self.pending;
        with_role!(self, |c, process| {
            loop {
                let UnbufferedStatus { discard, state } = process(c, pending);
                let result = match state {
                    Ok(ConnectionState::EncodeTlsData(mut e)) => {
                        encode(out, |buf| e.encode(buf)).map(|()| None)
                    }
                    Ok(ConnectionState::TransmitTlsData(t)) => {
                        t.done();
                        Ok(None)
                    }
                    Ok(ConnectionState::WriteTraffic(w)) => {
                        let f = f.take().expect("runs once");
                        f(WriteTraffic::from(w), out).map(Some)
                    }
                    Ok(_) => Err(rustls::Error::General("the TLS session cannot send now".into())),
                    Err(e) => Err(e),
                };
                pending.drain(..discard.min(pending.len()));
                match result {
                    Ok(Some(r)) => return Ok(r),
                    Ok(None) => {}
                    Err(e) => return Err(e),
                }
            }
        })
    }

    pub fn is_handshaking(&self) -> bool {
        self.common().is_handshaking()
    }

    pub fn common(&self) -> &rustls::CommonState {
        match &self.role {
            Role::Server(s) => s,
            Role::Client(s) => s,
        }
    }

    /// The name the client asked for (a server's view).
    pub fn server_name(&self) -> Option<&str> {
        self.sni.as_deref()
    }
}

/// rustls's write-traffic state for either role, behind one type.
pub(crate) enum WriteTraffic<'c> {
    Server(rustls::unbuffered::WriteTraffic<'c, ServerConnectionData>),
    Client(rustls::unbuffered::WriteTraffic<'c, ClientConnectionData>),
}

impl<'c> From<rustls::unbuffered::WriteTraffic<'c, ServerConnectionData>> for WriteTraffic<'c> {
    fn from(w: rustls::unbuffered::WriteTraffic<'c, ServerConnectionData>) -> Self {
        WriteTraffic::Server(w)
    }
}

impl<'c> From<rustls::unbuffered::WriteTraffic<'c, ClientConnectionData>> for WriteTraffic<'c> {
    fn from(w: rustls::unbuffered::WriteTraffic<'c, ClientConnectionData>) -> Self {
        WriteTraffic::Client(w)
    }
}

impl WriteTraffic<'_> {
    fn encrypt(&mut self, data: &[u8], out: &mut [u8]) -> Result<usize, EncryptError> {
        match self {
            WriteTraffic::Server(w) => w.encrypt(data, out),
            WriteTraffic::Client(w) => w.encrypt(data, out),
        }
    }

    fn queue_close_notify(&mut self, out: &mut [u8]) -> Result<usize, EncryptError> {
        match self {
            WriteTraffic::Server(w) => w.queue_close_notify(out),
            WriteTraffic::Client(w) => w.queue_close_notify(out),
        }
    }
}

type Process<D> =
    for<'c, 'i> fn(&'c mut UnbufferedConnectionCommon<D>, &'i mut [u8]) -> UnbufferedStatus<'c, 'i, D>;

fn read<D>(
    c: &mut UnbufferedConnectionCommon<D>,
    process: Process<D>,
    incoming: &mut [u8],
    out: &mut OutBuf,
    plain: &mut Vec<u8>,
    plain_from: &mut usize,
) -> Pass {
    let mut start = 0;
    let mut peer_closed = false;
    loop {
        let UnbufferedStatus { discard, state } = process(c, &mut incoming[start..]);
        let state = match state {
            Ok(state) => state,
            Err(e) => {
                return Pass { consumed: start + discard, peer_closed, error: Some(e) };
            }
        };
        let mut extra = 0;
        let mut more = true;
        match state {
            ConnectionState::ReadTraffic(mut r) => {
                while let Some(record) = r.next_record() {
                    match record {
                        Ok(record) => {
                            if plain.is_empty() {
                                *plain_from = place_plain(plain, record.payload);
                            }
                            plain.extend_from_slice(record.payload);
                            extra += record.discard;
                        }
                        Err(e) => {
                            return Pass { consumed: start + discard + extra, peer_closed, error: Some(e) };
                        }
                    }
                }
            }
            ConnectionState::EncodeTlsData(mut e) => {
                if let Err(e) = encode(out, |buf| e.encode(buf)) {
                    return Pass { consumed: start + discard, peer_closed, error: Some(e) };
                }
            }
            ConnectionState::TransmitTlsData(t) => t.done(),
            ConnectionState::PeerClosed => peer_closed = true,
            // Waiting for more input, done with it, or closed: this pass is over.
            _ => more = false,
        }
        start += discard + extra;
        if !more {
            return Pass { consumed: start, peer_closed, error: None };
        }
    }
}

/// rustls's "the buffer is too small" answer, from either kind of call.
trait TooSmall: std::fmt::Display {
    /// The size needed, if that is what went wrong.
    fn required(&self) -> Option<usize>;
}

impl TooSmall for EncodeError {
    fn required(&self) -> Option<usize> {
        match self {
            EncodeError::InsufficientSize(s) => Some(s.required_size),
            _ => None,
        }
    }
}

impl TooSmall for EncryptError {
    fn required(&self) -> Option<usize> {
        match self {
            EncryptError::InsufficientSize(s) => Some(s.required_size),
            _ => None,
        }
    }
}

/// Appends what `f` writes to `out`, growing `out` to the size rustls asks for.
fn encode<E: TooSmall>(
    out: &mut OutBuf,
    f: impl FnMut(&mut [u8]) -> Result<usize, E>,
) -> Result<(), rustls::Error> {
    append(out, 512, f)
}

/// The same for encryption: `plain` bytes need at most one record's
/// overhead per 16 KiB.
fn encrypt<E: TooSmall>(
    out: &mut OutBuf,
    plain: usize,
    f: impl FnMut(&mut [u8]) -> Result<usize, E>,
) -> Result<(), rustls::Error> {
    append(out, plain + (plain / 16384 + 1) * 64, f)
}

fn append<E: TooSmall>(
    out: &mut OutBuf,
    mut room: usize,
    mut f: impl FnMut(&mut [u8]) -> Result<usize, E>,
) -> Result<(), rustls::Error> {
    loop {
        match f(out.room(room)) {
            Ok(n) => {
                out.len += n;
                return Ok(());
            }
            Err(e) => match e.required() {
                Some(need) if need > room => room = need,
                _ => return Err(rustls::Error::General(e.to_string())),
            },
        }
    }
}

/// How many bytes from the front of `data` complete the records begun in
/// `pending` (all of `data` if it ends first): `pending` then ends where a
/// record does, and what follows can be read where it lies.
fn completing(pending: &[u8], data: &[u8]) -> usize {
    let byte = |i: usize| if i < pending.len() { pending.get(i) } else { data.get(i - pending.len()) };
    let mut at = 0;
    while at < pending.len() {
        let (Some(&hi), Some(&lo)) = (byte(at + 3), byte(at + 4)) else { return data.len() };
        at += 5 + usize::from(u16::from_be_bytes([hi, lo]));
    }
    (at - pending.len()).min(data.len())
}

/// Ciphertext on its way out: `bytes[..len]`. The rest of `bytes` is room
/// already initialized, kept across uses, so encrypting into it costs no
/// zeroing first (a `Vec` resized before and truncated after each record
/// would be cleared again every time).
#[derive(Default)]
pub(crate) struct OutBuf {
    bytes: Vec<u8>,
    len: usize,
}

impl OutBuf {
    /// The ciphertext.
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// The memory held, for a caller that keeps only small buffers.
    pub fn footprint(&self) -> usize {
        self.bytes.capacity()
    }

    /// At least `room` bytes after the ciphertext, to write more into.
    fn room(&mut self, room: usize) -> &mut [u8] {
        let end = self.len + room;
        if self.bytes.len() < end {
            self.bytes.resize(end, 0);
        }
        &mut self.bytes[self.len..]
    }
}

#[cfg(test)]
mod tests {
    use super::{completing, place_plain, COPY_SKEW};

    /// A record of `body` bytes: header (application data, TLS 1.2
    /// version, length) and body.
    fn record(body: usize, fill: u8) -> Vec<u8> {
        let mut r = vec![23, 3, 3];
        r.extend_from_slice(&(body as u16).to_be_bytes());
        r.resize(5 + body, fill);
        r
    }

    /// What completes the records begun in the pending bytes is exactly
    /// the rest of the last one, wherever the earlier read cut it (even
    /// inside its header), so the next records are read where they lie.
    #[test]
    fn completing_takes_the_rest_of_the_cut_record_and_no_more() {
        let stream: Vec<u8> = [record(16_384, 1), record(300, 2), record(16_384, 3)].concat();
        let second = 5 + 16_384;
        let third = second + 5 + 300;
        for cut in [1, 3, 4, 5, 6, 100, second - 1, second + 2, third - 1, third + 4] {
            let (pending, data) = stream.split_at(cut);
            let end = if cut < second {
                second
            } else if cut < third {
                third
            } else {
                stream.len()
            };
            assert_eq!(completing(pending, data), end - cut, "cut at {cut}");
        }
        // Records that end where the read ends leave nothing to complete.
        assert_eq!(completing(&stream[..second], &stream[second..]), 0);
        // A read too short to complete the record, or even its header, is
        // taken whole.
        assert_eq!(completing(&stream[..10], &stream[10..20]), 10);
        assert_eq!(completing(&stream[..2], &stream[2..4]), 2);
    }

    #[test]
    fn plaintext_is_placed_half_a_page_off_its_source() {
        let source = vec![5u8; 24_576];
        for offset in [0, 1, 16, 2047, 2048, 4095] {
            let src = &source[offset..offset + 16_384];
            let mut plain = Vec::new();
            let pad = place_plain(&mut plain, src);
            assert!(pad < 4096);
            assert_eq!(plain.len(), pad);
            plain.extend_from_slice(src);
            let dst = plain[pad..].as_ptr() as usize;
            assert_eq!(dst.wrapping_sub(src.as_ptr() as usize) % 4096, COPY_SKEW, "offset {offset}");
            assert_eq!(&plain[pad..], src);
        }
    }
}
