//! The HTTP server protocol on real sockets, with resources of a user's
//! own mounted next to static files (the Resource API), on every backend.
//! The client is a blocking one on another thread.

#[macro_use]
mod common;

use std::cell::Cell;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::rc::Rc;
use std::time::Duration;

use braid::protocols::http::{
    Body, BodyStream, Config, Request, Resource, Response, Router, Site, StaticFiles,
};
use braid::ReactorTime;
use common::run_reactor;

struct Count(Cell<u64>);

impl Resource for Count {
    fn render(&self, _: &Request<'_>) -> Response {
        self.0.set(self.0.get() + 1);
        Response::text(200, self.0.get().to_string())
    }
    fn allowed_methods(&self) -> &[&'static str] {
        &["GET", "POST"]
    }
}

struct Pieces(u32);

impl BodyStream for Pieces {
    fn next_chunk(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        self.0 += 1;
        Ok((self.0 <= 100).then(|| vec![b'x'; 1000]))
    }
}

/// Reads one response: status and body (Content-Length or chunked).
fn response(r: &mut impl BufRead) -> (u16, String, Vec<u8>) {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        assert!(r.read_line(&mut line).unwrap() > 0, "closed after {head:?}");
        head.push_str(&line);
        if line == "\r\n" {
            break;
        }
    }
    let status = head[9..12].parse().unwrap();
    let lower = head.to_ascii_lowercase();
    let mut body = Vec::new();
    if lower.contains("transfer-encoding: chunked") {
        loop {
            let mut size = String::new();
            r.read_line(&mut size).unwrap();
            let n = usize::from_str_radix(size.trim(), 16).unwrap();
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk).unwrap();
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    } else if let Some(i) = lower.find("content-length: ") {
        let n: usize = lower[i + 16..].split("\r\n").next().unwrap().parse().unwrap();
        body = vec![0; n];
        r.read_exact(&mut body).unwrap();
    }
    (status, head, body)
}

reactor_test! {
    fn resources_next_to_static_files(r) {
        let dir = std::env::temp_dir().join(format!("braid-http-server-{}-{:?}", std::process::id(), std::thread::current().id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("f.txt"), "static").unwrap();
        let router = Router::new()
            .mount("/", StaticFiles::new(&dir, false).unwrap())
            .mount("/count", Count(Cell::new(0)))
            .mount("/greet", |q: &Request<'_>| Response::text(200, format!("hi {}", q.segments().join(","))))
            .mount("/stream", |_: &Request<'_>| Response::new(200).body(Body::Stream(Box::new(Pieces(0)))));
        let clock: Rc<dyn ReactorTime> = Rc::new(r.clone());
        let config = Config { keepalive_timeout: Duration::from_secs(1), ..Config::default() };
        let port = r.listen_tcp("127.0.0.1:0", Site::new(clock, Rc::new(router), config, None), 50).unwrap();
        let port = port.local_addr().port();
        let remote = r.remote();
        let client = std::thread::spawn(move || {
            let result = std::panic::catch_unwind(|| {
                let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                s.write_all(b"GET /count HTTP/1.1\r\nHost: h\r\n\r\nPOST /count HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabcGET /greet/a/b%20c HTTP/1.1\r\nHost: h\r\n\r\nGET /f.txt HTTP/1.1\r\nHost: h\r\n\r\nGET /stream HTTP/1.1\r\nHost: h\r\n\r\nDELETE /count HTTP/1.1\r\nHost: h\r\n\r\n").unwrap();
                let mut rd = BufReader::new(s.try_clone().unwrap());
                let got: Vec<(u16, Vec<u8>)> = (0..6).map(|_| { let (st, _, b) = response(&mut rd); (st, b) }).collect();
                assert_eq!(got[0], (200, b"1".to_vec()));
                assert_eq!(got[1], (200, b"2".to_vec()));
                assert_eq!(got[2], (200, b"hi a,b c".to_vec()));
                assert_eq!(got[3], (200, b"static".to_vec()));
                assert_eq!((got[4].0, got[4].1.len()), (200, 100_000));
                assert_eq!(got[5].0, 405);
                // Kept alive, then closed at the idle timeout.
                let mut rest = Vec::new();
                let _ = rd.read_to_end(&mut rest);
                assert!(rest.is_empty());
            });
            let _ = remote.call_from_thread(|r| { let _ = r.stop(); });
            result
        });
        run_reactor(&r);
        let _ = std::fs::remove_dir_all(&dir);
        if let Err(p) = client.join().unwrap() {
            std::panic::resume_unwind(p);
        }
    }
}
