//! Sending a file (any [`Read`]) through a transport as a pull producer
//! (Twisted's `FileSender`): the transport asks for the next chunk only
//! when its buffer has drained, so a file of any size costs one chunk of
//! memory, whatever the reader's speed.

use std::cell::{Cell, RefCell};
use std::io::Read;
use std::rc::Rc;

use crate::defer::Deferred;
use crate::error::{Error, Failure};
use crate::transport::{Producer, Transport};

/// Bytes read and written per chunk at most (Twisted's `CHUNK_SIZE`).
pub const CHUNK_SIZE: usize = 16 * 1024;

/// A function applied to each chunk before it is written.
pub type Transform = Box<dyn FnMut(&[u8]) -> Vec<u8>>;

struct Sender {
    source: RefCell<Option<Box<dyn Read>>>,
    transport: Transport,
    transform: RefCell<Option<Transform>>,
    last: Cell<Option<u8>>,
    done: Deferred<Option<u8>>,
}

impl Sender {
    fn finish(&self, result: Result<(), Failure>) {
        if self.source.borrow_mut().take().is_none() {
            return;
        }
        self.transport.unregister_producer();
        let _ = match result {
            Ok(()) => self.done.callback(self.last.get()),
            Err(f) => self.done.errback(f),
        };
    }
}

impl Producer for Sender {
    fn resume_producing(&self) {
        let mut chunk = vec![0u8; CHUNK_SIZE];
        let read = {
            let mut source = self.source.borrow_mut();
            let Some(source) = source.as_mut() else { return };
            loop {
                match source.read(&mut chunk) {
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    other => break other,
                }
            }
        };
        match read {
            Ok(0) => self.finish(Ok(())),
            Ok(n) => {
                chunk.truncate(n);
                let out = match self.transform.borrow_mut().as_mut() {
                    Some(t) => t(&chunk),
                    None => chunk,
                };
                if let Some(&b) = out.last() {
                    self.last.set(Some(b));
                }
                self.transport.write_vec(out);
            }
            Err(e) => self.finish(Err(Failure::new(Error::io("reading the file to send", e)))),
        }
    }

    fn stop_producing(&self) {
        self.finish(Err(Failure::msg("the consumer asked the file sender to stop")));
    }
}

/// Sends everything `source` holds through `transport`, in chunks of at
/// most [`CHUNK_SIZE`], each passed through `transform` if given (Twisted's
/// `FileSender.beginFileTransfer`). The Deferred fires with the last byte
/// sent (`None` for an empty file) once all is written to the transport,
/// and fails if reading fails or the transport stops the producer (closes).
/// Refused if the transport has a producer already.
pub fn send_file(
    transport: &Transport,
    source: impl Read + 'static,
    transform: Option<Transform>,
) -> Result<Deferred<Option<u8>>, Error> {
    let sender = Rc::new(Sender {
        source: RefCell::new(Some(Box::new(source))),
        transport: transport.clone(),
        transform: RefCell::new(transform),
        last: Cell::new(None),
        done: Deferred::new(),
    });
    let done = sender.done.clone();
    transport.register_producer(sender, false)?;
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::StringTransport;

    /// Runs the transport's pull producer until it stops asking.
    fn pump(st: &StringTransport) {
        for _ in 0..1000 {
            match st.producer() {
                Some(p) => p.resume_producing(),
                None => return,
            }
        }
        panic!("the sender never finished");
    }

    fn result<T: Clone + 'static>(d: &Deferred<T>) -> Rc<RefCell<Option<Result<T, String>>>> {
        let out = Rc::new(RefCell::new(None));
        let o = out.clone();
        let _sink: Deferred<()> = d.then(move |r| {
            *o.borrow_mut() = Some(r.map_err(|f| f.to_string()));
            Ok(())
        });
        out
    }

    // §4.16 item 10: a pull producer (registered non-streaming); the whole
    // file in chunks of at most CHUNK_SIZE; the Deferred fires with the last
    // byte sent.
    #[test]
    fn sends_the_whole_file_in_chunks() {
        let st = StringTransport::new();
        let data: Vec<u8> = (0..(CHUNK_SIZE * 3 + 17)).map(|i| (i % 251) as u8).collect();
        let d = send_file(&st.transport(), std::io::Cursor::new(data.clone()), None).unwrap();
        assert!(!st.streaming(), "registered as a pull producer");
        let out = result(&d);
        let mut writes = 0;
        while let Some(p) = st.producer() {
            let before = st.value().len();
            p.resume_producing();
            let grew = st.value().len() - before;
            assert!(grew <= CHUNK_SIZE, "a chunk of {grew} bytes");
            writes += 1;
            assert!(writes < 100);
        }
        assert_eq!(st.value(), data);
        assert_eq!(*out.borrow(), Some(Ok(Some(*data.last().unwrap()))));
    }

    #[test]
    fn transforms_each_chunk_and_an_empty_file_fires_none() {
        let st = StringTransport::new();
        let upper: Transform = Box::new(|c| c.to_ascii_uppercase());
        let d = send_file(&st.transport(), std::io::Cursor::new(b"abc".to_vec()), Some(upper)).unwrap();
        pump(&st);
        assert_eq!(st.value(), b"ABC");
        assert_eq!(*result(&d).borrow(), Some(Ok(Some(b'C'))));
        let st = StringTransport::new();
        let d = send_file(&st.transport(), std::io::empty(), None).unwrap();
        pump(&st);
        assert_eq!(*result(&d).borrow(), Some(Ok(None)));
    }

    // stop_producing mid-transfer fails the Deferred.
    #[test]
    fn stop_producing_fails_the_deferred() {
        let st = StringTransport::new();
        let d = send_file(&st.transport(), std::io::Cursor::new(vec![1u8; CHUNK_SIZE * 4]), None).unwrap();
        let out = result(&d);
        st.producer().unwrap().resume_producing();
        st.producer().unwrap().stop_producing();
        assert!(out.borrow().as_ref().is_some_and(|r| r.is_err()));
        assert!(st.producer().is_none(), "unregistered");
        assert!(send_file(&st.transport(), std::io::empty(), None).is_ok(), "the transport is free again");
    }
}
