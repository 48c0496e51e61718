//! Sending a response body that is not written at once: a pull producer
//! on the transport, so the next piece is read only when the last one
//! left, and a slow client costs one piece of memory whatever the size.
//!
//! This is the one place that moves file bytes to the transport: a small
//! file is appended to its response's head by [`append_inline`]; a larger
//! one goes through [`send`], which hands it to the kernel whole
//! (`Transport::write_file`, `sendfile(2)`, no copy) where the transport
//! can, and otherwise (TLS, test doubles) reads and writes it in bounded
//! pieces.

use std::cell::{Cell, RefCell};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::rc::Rc;

use super::response::BodyStream;
use crate::transport::{Producer, Transport};

/// Bytes read from a file per write at most.
pub const CHUNK: usize = 64 * 1024;

/// What a body sender tells the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// A piece was written (the client is reading: restart the send timer).
    Wrote,
    /// The whole body was written; the producer is unregistered.
    Done,
    /// It could not go on (the file shrank, a stream failed): the
    /// connection was aborted, as the client cannot tell a short body.
    Failed,
}

/// A body to send.
pub enum Source {
    /// `len` bytes of the file from `offset`.
    File {
        /// The file.
        file: Rc<File>,
        /// Where to start.
        offset: u64,
        /// How much to send.
        len: u64,
    },
    /// A stream, chunk-encoded when `chunked`.
    Stream {
        /// The stream.
        stream: Box<dyn BodyStream>,
        /// Wrap each piece as an HTTP/1.1 chunk, and end with the last one.
        chunked: bool,
    },
}

/// Whether the kernel was given the whole file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ZeroCopy {
    /// Not asked yet.
    Untried,
    /// Queued with `write_file`: the next pull means it is all sent.
    Queued,
    /// Refused (not a plain socket): pieces are copied.
    Refused,
}

struct Sender {
    source: RefCell<Option<Source>>,
    zero_copy: Cell<ZeroCopy>,
    transport: Transport,
    notify: Box<dyn Fn(Progress)>,
}

impl Sender {
    fn next_piece(source: &mut Source) -> Result<Option<Vec<u8>>, String> {
        match source {
            Source::File { file, offset, len } => {
                if *len == 0 {
                    return Ok(None);
                }
                let want = (*len).min(CHUNK as u64) as usize;
                let mut buf = vec![0u8; want];
                let mut got = 0;
                while got < want {
                    match file.read_at(&mut buf[got..], *offset + got as u64) {
                        Ok(0) => return Err("the file shrank while it was sent".into()),
                        Ok(n) => got += n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(format!("reading the file: {e}")),
                    }
                }
                *offset += want as u64;
                *len -= want as u64;
                Ok(Some(buf))
            }
            Source::Stream { stream, chunked } => match stream.next_chunk() {
                Ok(Some(piece)) if piece.is_empty() => Ok(Some(piece)),
                Ok(Some(piece)) if *chunked => {
                    let mut out = format!("{:x}\r\n", piece.len()).into_bytes();
                    out.extend_from_slice(&piece);
                    out.extend_from_slice(b"\r\n");
                    Ok(Some(out))
                }
                Ok(Some(piece)) => Ok(Some(piece)),
                Ok(None) if *chunked => {
                    *chunked = false;
                    Ok(Some(b"0\r\n\r\n".to_vec()))
                }
                Ok(None) => Ok(None),
                Err(e) => Err(format!("producing the body: {e}")),
            },
        }
    }
}

impl Producer for Sender {
    fn resume_producing(&self) {
        let queued = {
            let mut source = self.source.borrow_mut();
            match (source.as_mut(), self.zero_copy.get()) {
                (Some(Source::File { .. }), ZeroCopy::Queued) => {
                    *source = None;
                    Some(true)
                }
                (Some(Source::File { file, offset, len }), ZeroCopy::Untried) => {
                    if *len > 0 && self.transport.write_file(file, *offset, *len) {
                        self.zero_copy.set(ZeroCopy::Queued);
                        Some(false)
                    } else {
                        self.zero_copy.set(ZeroCopy::Refused);
                        None
                    }
                }
                _ => None,
            }
        };
        match queued {
            Some(true) => {
                self.transport.unregister_producer();
                (self.notify)(Progress::Done);
                return;
            }
            Some(false) => {
                (self.notify)(Progress::Wrote);
                return;
            }
            None => {}
        }
        let piece = {
            let mut source = self.source.borrow_mut();
            let Some(s) = source.as_mut() else { return };
            let piece = Self::next_piece(s);
            // A file's last piece ends it at once, without another round.
            let file_done = matches!(s, Source::File { len: 0, .. });
            match piece {
                Ok(Some(p)) if file_done => {
                    *source = None;
                    Ok((Some(p), true))
                }
                Ok(Some(p)) => Ok((Some(p), false)),
                Ok(None) => {
                    *source = None;
                    Ok((None, true))
                }
                Err(e) => {
                    *source = None;
                    Err(e)
                }
            }
        };
        match piece {
            Ok((piece, done)) => {
                if let Some(p) = piece {
                    if !p.is_empty() {
                        self.transport.write_vec(p);
                    }
                }
                if done {
                    self.transport.unregister_producer();
                    (self.notify)(Progress::Done);
                } else {
                    (self.notify)(Progress::Wrote);
                }
            }
            Err(why) => {
                tracing::warn!(target: "braid", "http: response to {} cut short: {why}", self.transport.peer());
                self.transport.unregister_producer();
                self.transport.abort_connection();
                (self.notify)(Progress::Failed);
            }
        }
    }

    fn stop_producing(&self) {
        self.source.borrow_mut().take();
    }
}

/// `Some(len)` if `source` is small enough to be written with the
/// response head at once (a file of at most [`CHUNK`] bytes), without a
/// producer.
pub fn inline_size(source: &Source) -> Option<u64> {
    match source {
        Source::File { len, .. } if *len <= CHUNK as u64 => Some(*len),
        _ => None,
    }
}

/// Appends a body that [`inline_size`] accepted to `out` (after the head);
/// on a read error `out` is left as it was.
pub fn append_inline(out: &mut Vec<u8>, source: Source) -> std::io::Result<()> {
    let Source::File { file, offset, len } = source else {
        return Err(std::io::Error::other("only a file body is written inline"));
    };
    let at = out.len();
    out.resize(at + len as usize, 0);
    file.read_exact_at(&mut out[at..], offset).inspect_err(|_| out.truncate(at))
}

/// Starts sending `source` through `transport`; `notify` hears about each
/// piece and the end. The first piece is written before this returns.
pub fn send(transport: &Transport, source: Source, notify: Box<dyn Fn(Progress)>) {
    let sender = Rc::new(Sender {
        source: RefCell::new(Some(source)),
        zero_copy: Cell::new(ZeroCopy::Untried),
        transport: transport.clone(),
        notify,
    });
    if transport.register_producer(sender, false).is_err() {
        tracing::warn!(target: "braid", "http: a producer was already registered on {}", transport.peer());
        transport.abort_connection();
    }
}
