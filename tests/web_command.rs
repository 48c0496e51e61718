//! The `braid web` command, run as a real process and driven by curl,
//! Python's `http.client`, headless Chromium and a small raw client here
//! (for what the others hide: pipelining, slow clients, bad bytes).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_braid");

/// A fresh directory tree for one test, removed when dropped. `root` is
/// served; `outside` (its sibling) holds a secret no request may read.
struct Tree {
    base: PathBuf,
}

const SECRET: &str = "the-secret-outside-the-root-7f3a";

impl Tree {
    fn new() -> Tree {
        static N: AtomicUsize = AtomicUsize::new(0);
        let base = std::env::temp_dir().join(format!(
            "braid-web-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&base);
        let root = base.join("root");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::create_dir_all(root.join("list")).unwrap();
        std::fs::create_dir_all(base.join("outside")).unwrap();
        std::fs::write(base.join("outside/secret.txt"), SECRET).unwrap();
        std::fs::write(base.join("secret.txt"), SECRET).unwrap();
        std::fs::write(root.join("a.txt"), "hello\n").unwrap();
        std::fs::write(root.join("page.html"), "<p>page</p>").unwrap();
        std::fs::write(root.join("noext"), "plain").unwrap();
        std::fs::write(root.join("sub/index.html"), "<h1>index</h1>").unwrap();
        std::fs::write(root.join("list/<b>&amp;.txt"), "x").unwrap();
        std::fs::write(root.join("list/a b.txt"), "yy").unwrap();
        std::fs::create_dir_all(root.join("list/inner dir")).unwrap();
        std::fs::write(root.join("list/.hidden"), "h").unwrap();
        let digits: Vec<u8> = (0..10_000u32).map(|i| b'0' + (i % 10) as u8).collect();
        std::fs::write(root.join("digits.txt"), digits).unwrap();
        std::os::unix::fs::symlink(base.join("outside/secret.txt"), root.join("leak")).unwrap();
        std::os::unix::fs::symlink(base.join("outside"), root.join("leakdir")).unwrap();
        std::os::unix::fs::symlink("a.txt", root.join("alias.txt")).unwrap();
        Tree { base }
    }

    fn root(&self) -> PathBuf {
        self.base.join("root")
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

/// A running `braid web`, the port it announced, and its stderr lines
/// (drained by a thread so the access log never blocks it).
struct Server {
    child: Child,
    port: u16,
    lines: Arc<Mutex<Vec<String>>>,
}

fn start(root: &Path, extra: &[&str]) -> Server {
    start_on(root, "tcp:0:interface=127.0.0.1", extra)
}

fn start_on(root: &Path, listen: &str, extra: &[&str]) -> Server {
    let mut child = Command::new(BIN)
        .args(["web", "--path"])
        .arg(root)
        .args(["--listen", listen])
        .args(extra)
        .env_remove("BRAID_REACTOR")
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn braid");
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    if !line.contains("web listening on 127.0.0.1:") {
        let _ = child.kill();
        let _ = child.wait();
        panic!("first line: {line:?}");
    }
    let port = line.split("127.0.0.1:").nth(1).unwrap().split_whitespace().next().unwrap().parse().unwrap();
    let lines = Arc::new(Mutex::new(Vec::new()));
    let l = lines.clone();
    std::thread::spawn(move || {
        for line in stderr.lines() {
            match line {
                Ok(line) => l.lock().unwrap().push(line),
                Err(_) => return,
            }
        }
    });
    Server { child, port, lines }
}

impl Server {
    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        s
    }

    fn log_text(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Waits (boundedly) until a stderr line contains `what`.
    fn wait_log(&self, what: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.log_text().contains(what) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One parsed response.
#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Reads one response from `r`; `head_only` for answers to HEAD.
fn read_response(r: &mut impl BufRead, head_only: bool) -> Option<Resp> {
    let mut status_line = String::new();
    if r.read_line(&mut status_line).ok()? == 0 {
        return None;
    }
    let status: u16 = status_line.split_whitespace().nth(1)?.parse().ok()?;
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        r.read_line(&mut line).ok()?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (n, v) = line.split_once(':')?;
        headers.push((n.trim().to_string(), v.trim().to_string()));
    }
    let mut resp = Resp { status, headers, body: Vec::new() };
    if head_only || status == 304 || status == 100 {
        return Some(resp);
    }
    if resp.header("Transfer-Encoding") == Some("chunked") {
        loop {
            let mut size = String::new();
            r.read_line(&mut size).ok()?;
            let n = usize::from_str_radix(size.trim(), 16).ok()?;
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk).ok()?;
            if n == 0 {
                break;
            }
            resp.body.extend_from_slice(&chunk[..n]);
        }
    } else if let Some(n) = resp.header("Content-Length") {
        let mut body = vec![0; n.parse().ok()?];
        r.read_exact(&mut body).ok()?;
        resp.body = body;
    } else {
        r.read_to_end(&mut resp.body).ok()?;
    }
    Some(resp)
}

/// Sends `request` on a fresh connection and reads one response.
fn send(server: &Server, request: &str) -> Resp {
    let mut s = server.connect();
    s.write_all(request.as_bytes()).unwrap();
    let mut r = BufReader::new(s);
    read_response(&mut r, request.starts_with("HEAD")).unwrap_or_else(|| panic!("no response to {request:?}"))
}

fn get(server: &Server, target: &str) -> Resp {
    send(server, &format!("GET {target} HTTP/1.1\r\nHost: t\r\n\r\n"))
}

/// True if the server closes `s` (EOF or reset) within `within`; the bytes
/// read meanwhile are returned too.
fn closed_within(s: &mut TcpStream, within: Duration) -> (bool, Vec<u8>) {
    s.set_read_timeout(Some(within)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + within;
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (true, got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return (true, got),
            Err(_) => return (false, got),
        }
        if Instant::now() > deadline {
            return (false, got);
        }
    }
}

fn curl(args: &[&str]) -> String {
    let out = Command::new("curl").args(["-s", "--max-time", "30"]).args(args).output();
    let out = out.expect("curl is needed for this test (apt-get install curl)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

// Part 1: files, MIME types, index, listing, redirect.
#[test]
fn serves_files_index_listing_and_redirects() {
    let tree = Tree::new();
    let server = start(&tree.root(), &[]);
    let a = get(&server, "/a.txt");
    assert_eq!((a.status, a.text().as_str()), (200, "hello\n"));
    assert_eq!(a.header("Content-Type"), Some("text/plain"));
    assert_eq!(get(&server, "/page.html").header("Content-Type"), Some("text/html"));
    assert_eq!(get(&server, "/noext").header("Content-Type"), Some("text/plain; charset=utf-8"));
    assert_eq!(get(&server, "/alias.txt").text(), "hello\n", "a symlink inside the root is served");
    let redirect = get(&server, "/sub?x=1");
    assert_eq!((redirect.status, redirect.header("Location")), (301, Some("/sub/?x=1")));
    assert_eq!(get(&server, "/sub/").text(), "<h1>index</h1>");
    assert_eq!(get(&server, "/a.txt/").status, 404);
    assert_eq!(get(&server, "/missing").status, 404);
    let list = get(&server, "/list/");
    assert_eq!(list.status, 200);
    assert_eq!(list.header("Content-Type"), Some("text/html; charset=utf-8"));
    let html = list.text();
    assert!(html.contains("<title>Index of /list/</title>"), "{html}");
    assert!(html.contains("<a href=\"../\">../</a>"), "parent link: {html}");
    assert!(html.contains("<a href=\"./%3Cb%3E&amp;amp;.txt\">&lt;b&gt;&amp;amp;.txt</a>"), "{html}");
    assert!(html.contains("<a href=\"./a%20b.txt\">a b.txt</a>"), "{html}");
    assert!(html.contains("<a href=\"./inner%20dir/\">inner dir/</a>"), "{html}");
    // Directories first, then files, each by name.
    let order: Vec<usize> =
        ["inner%20dir/", "%3Cb%3E", "a%20b.txt"].iter().map(|n| html.find(n).unwrap()).collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{html}");
    assert!(html.contains("title=\"2 bytes\""), "sizes: {html}");
    assert!(!html.contains(".hidden"), "a hidden file is listed: {html}");
    assert_eq!(get(&server, "/list/.hidden").text(), "h", "but served by name");
    // Through curl as well, following the redirect.
    assert_eq!(curl(&["-L", &server.url("/sub")]), "<h1>index</h1>");

    let off = start(&tree.root(), &["--listing", "off", "--index", ""]);
    assert_eq!(get(&off, "/list/").status, 403);
    assert_eq!(get(&off, "/sub/").status, 403, "no index file with --index ''");
}

// Part 2: keep-alive, pipelining in order, HEAD, the validators.
#[test]
fn keep_alive_pipelining_and_head() {
    let tree = Tree::new();
    let server = start(&tree.root(), &[]);
    let mut s = server.connect();
    s.write_all(
        b"GET /a.txt HTTP/1.1\r\nHost: t\r\n\r\nHEAD /digits.txt HTTP/1.1\r\nHost: t\r\n\r\nGET /noext HTTP/1.1\r\nHost: t\r\n\r\nGET /missing HTTP/1.1\r\nHost: t\r\n\r\nGET /page.html HTTP/1.1\r\nHost: t\r\n\r\n",
    )
    .unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let first = read_response(&mut r, false).unwrap();
    assert_eq!(first.text(), "hello\n");
    for h in ["Date", "Content-Length", "Last-Modified", "ETag"] {
        assert!(first.header(h).is_some(), "{h} missing: {first:?}");
    }
    let head = read_response(&mut r, true).unwrap();
    assert_eq!((head.status, head.header("Content-Length")), (200, Some("10000")));
    assert_eq!(read_response(&mut r, false).unwrap().text(), "plain");
    assert_eq!(read_response(&mut r, false).unwrap().status, 404);
    assert_eq!(read_response(&mut r, false).unwrap().text(), "<p>page</p>");
    // The same connection serves more later.
    s.write_all(b"GET /a.txt HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut r, false).unwrap().text(), "hello\n");

    // HTTP/1.0: closed after the response unless it asks to keep alive.
    let mut s10 = server.connect();
    s10.write_all(b"GET /a.txt HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").unwrap();
    let mut r10 = BufReader::new(s10.try_clone().unwrap());
    let resp = read_response(&mut r10, false).unwrap();
    assert_eq!(resp.header("Connection"), Some("keep-alive"));
    s10.write_all(b"GET /noext HTTP/1.0\r\n\r\n").unwrap();
    let resp = read_response(&mut r10, false).unwrap();
    assert_eq!((resp.text().as_str(), resp.header("Connection")), ("plain", Some("close")));
    let mut rest = Vec::new();
    r10.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());

    // Python's http.client over one kept-alive connection.
    let script = format!(
        "import http.client\nc = http.client.HTTPConnection('127.0.0.1', {})\n\
         for p in ['/a.txt', '/noext', '/a.txt']:\n    c.request('GET', p)\n    r = c.getresponse()\n    print(r.status, r.read().decode().strip())\n\
         c.request('HEAD', '/digits.txt')\nr = c.getresponse()\nprint(r.status, r.getheader('Content-Length'), len(r.read()))\n",
        server.port
    );
    let out =
        Command::new("python3").args(["-c", &script]).output().expect("python3 is needed for this test");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200 hello\n200 plain\n200 hello\n200 10000 0\n");
    // curl reuses the connection for several URLs.
    let verbose = Command::new("curl")
        .args(["-sv", "--max-time", "20", &server.url("/a.txt"), &server.url("/noext")])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&verbose.stderr);
    assert!(err.contains("Re-using existing connection"), "{err}");
}

// Part 2: conditional requests.
#[test]
fn conditional_requests_answer_304() {
    let tree = Tree::new();
    let server = start(&tree.root(), &[]);
    let first = get(&server, "/a.txt");
    let etag = first.header("ETag").unwrap().to_string();
    let modified = first.header("Last-Modified").unwrap().to_string();
    let req = |h: &str| send(&server, &format!("GET /a.txt HTTP/1.1\r\nHost: t\r\n{h}\r\n\r\n"));
    let r = req(&format!("If-None-Match: {etag}"));
    assert_eq!((r.status, r.header("ETag")), (304, Some(etag.as_str())));
    assert!(r.header("Content-Length").is_none());
    assert_eq!(req(&format!("If-None-Match: \"other\", W/{etag}")).status, 304);
    assert_eq!(req("If-None-Match: *").status, 304);
    assert_eq!(req("If-None-Match: \"other\"").status, 200);
    assert_eq!(req(&format!("If-Modified-Since: {modified}")).status, 304);
    assert_eq!(req("If-Modified-Since: Thu, 01 Jan 1970 00:00:00 GMT").status, 200);
    assert_eq!(req("If-Modified-Since: not a date").status, 200);
    // If-None-Match wins over If-Modified-Since.
    assert_eq!(req(&format!("If-None-Match: \"other\"\r\nIf-Modified-Since: {modified}")).status, 200);
    let code = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-H",
        &format!("If-None-Match: {etag}"),
        &server.url("/a.txt"),
    ]);
    assert_eq!(code, "304");
}

// Part 2: single ranges (206), unsatisfiable ones (416), several (200).
#[test]
fn range_requests() {
    let tree = Tree::new();
    let server = start(&tree.root(), &[]);
    let req = |h: &str| send(&server, &format!("GET /digits.txt HTTP/1.1\r\nHost: t\r\n{h}\r\n\r\n"));
    let r = req("Range: bytes=10-14");
    assert_eq!((r.status, r.text().as_str()), (206, "01234"));
    assert_eq!(r.header("Content-Range"), Some("bytes 10-14/10000"));
    let r = req("Range: bytes=-3");
    assert_eq!(
        (r.status, r.text().as_str(), r.header("Content-Range")),
        (206, "789", Some("bytes 9997-9999/10000"))
    );
    let r = req("Range: bytes=9998-");
    assert_eq!(r.text(), "89");
    let r = req("Range: bytes=10000-");
    assert_eq!((r.status, r.header("Content-Range")), (416, Some("bytes */10000")));
    let r = req("Range: bytes=0-1,5-6");
    assert_eq!((r.status, r.body.len()), (200, 10_000), "several ranges: the whole file");
    let r = req("Range: bytes=5-1");
    assert_eq!(r.status, 200, "a bad range is ignored");
    let etag = get(&server, "/digits.txt").header("ETag").unwrap().to_string();
    assert_eq!(req(&format!("Range: bytes=0-0\r\nIf-Range: {etag}")).status, 206);
    assert_eq!(req("Range: bytes=0-0\r\nIf-Range: \"stale\"").status, 200);
    assert_eq!(curl(&["-r", "3-5", &server.url("/digits.txt")]), "345");
}

// Part 2: methods other than GET and HEAD, Expect: 100-continue, and a
// body on GET read and dropped.
#[test]
fn methods_expect_and_request_bodies() {
    let tree = Tree::new();
    let server = start(&tree.root(), &["--max-body", "1000"]);
    let star = send(&server, "OPTIONS * HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!((star.status, star.header("Allow")), (405, Some("GET, HEAD")));
    for m in ["OPTIONS", "POST", "PUT", "DELETE", "PATCH", "FOO"] {
        let r = send(&server, &format!("{m} /a.txt HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n"));
        assert_eq!((r.status, r.header("Allow")), (405, Some("GET, HEAD")), "{m}");
    }
    let mut s = server.connect();
    s.write_all(b"GET /a.txt HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
        .unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let cont = read_response(&mut r, false).unwrap();
    assert_eq!(cont.status, 100);
    s.write_all(
        b"12345GET /noext HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    )
    .unwrap();
    assert_eq!(read_response(&mut r, false).unwrap().text(), "hello\n");
    assert_eq!(read_response(&mut r, false).unwrap().text(), "plain", "the chunked body was dropped too");
    let big = send(&server, "GET /a.txt HTTP/1.1\r\nHost: t\r\nContent-Length: 1001\r\n\r\n");
    assert_eq!(big.status, 413);
    // curl sends Expect: 100-continue for a large upload and gets the 405.
    let code = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-H",
        "Expect: 100-continue",
        "--data-binary",
        "@/etc/hostname",
        &server.url("/a.txt"),
    ]);
    assert_eq!(code, "405");
}

// Part 4: the size limits, and malformed requests: 4xx, then closed.
#[test]
fn size_limits_and_malformed_requests() {
    let tree = Tree::new();
    let mut server = start(&tree.root(), &["--max-headers", "5"]);
    let long_target = format!("/{}", "a".repeat(9000));
    let r = send(&server, &format!("GET {long_target} HTTP/1.1\r\nHost: t\r\n\r\n"));
    assert_eq!(r.status, 414);
    let r = send(&server, &format!("GET / HTTP/1.1\r\nHost: t\r\nCookie: {}\r\n\r\n", "c".repeat(9000)));
    assert_eq!(r.status, 431);
    let many: String = (0..6).map(|i| format!("X-{i}: v\r\n")).collect();
    let r = send(&server, &format!("GET / HTTP/1.1\r\nHost: t\r\n{many}\r\n"));
    assert_eq!(r.status, 431);
    let bad: &[&[u8]] = &[
        b"GET / HTTP/1.1\r\n\r\n",
        b"GARBAGE\r\n\r\n",
        b"GET /\x00 HTTP/1.1\r\nHost: t\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: t\r\nNo Colon\r\n\r\n",
        b"\xff\xfe\xfd\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nnothex\r\n",
    ];
    for req in bad {
        let mut s = server.connect();
        s.write_all(req).unwrap();
        let (closed, got) = closed_within(&mut s, Duration::from_secs(10));
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 400 "), "{:?} got {text:?}", String::from_utf8_lossy(req));
        assert!(text.contains("Connection: close") && closed, "{text:?}");
    }
    assert!(server.alive(), "the server survived every bad request");
    assert_eq!(get(&server, "/a.txt").status, 200);
}

/// A target, and the statuses it may get: never the file outside.
const TRAVERSALS: &[(&str, &[u16])] = &[
    ("/../secret.txt", &[400]),
    ("/../../../../etc/passwd", &[400]),
    ("/sub/../../secret.txt", &[400]),
    ("/%2e%2e/secret.txt", &[400]),
    ("/%2E%2E/%2e%2e/etc/passwd", &[400]),
    ("/.%2e/secret.txt", &[400]),
    ("/..%2fsecret.txt", &[400]),
    ("/sub%2f..%2f..%2fsecret.txt", &[400]),
    ("/..\\secret.txt", &[400]),
    ("/%5c..%5csecret.txt", &[400]),
    ("/a.txt%00.html", &[400]),
    ("/%c0%ae%c0%ae/secret.txt", &[400]),
    ("/%e0%80%ae%e0%80%ae/secret.txt", &[400]),
    ("/%c0%af..%c0%afsecret.txt", &[400]),
    ("/leak", &[403]),
    ("/leakdir/secret.txt", &[403]),
    ("/leakdir/", &[403]),
    ("/sub/../leak", &[403]),
    ("http://t/../secret.txt", &[400]),
    ("//..//secret.txt", &[400]),
    ("/outside/secret.txt", &[404]),
];

// Part 4: every traversal attempt in a table, through the raw client.
#[test]
fn path_traversal_is_refused() {
    let tree = Tree::new();
    let server = start(&tree.root(), &[]);
    for (target, statuses) in TRAVERSALS {
        let r = get(&server, target);
        assert!(statuses.contains(&r.status), "{target}: {} (wanted {statuses:?})", r.status);
        assert!(!r.text().contains(SECRET), "{target} leaked the secret");
    }
    // Through curl, which would normalize dots unless told not to.
    for (target, _) in TRAVERSALS.iter().filter(|(t, _)| t.starts_with('/')) {
        let body = curl(&["--path-as-is", &server.url(target)]);
        assert!(!body.contains(SECRET), "{target} leaked the secret to curl");
    }
    // --follow-symlinks lets the links out, on purpose.
    let open = start(&tree.root(), &["--follow-symlinks"]);
    assert_eq!(get(&open, "/leak").text(), SECRET);
    assert_eq!(get(&open, "/../secret.txt").status, 400);
}

// Part 4: slowloris (a header byte a second) is cut off at the header
// timeout with 408.
#[test]
fn header_timeout_cuts_off_a_slow_client() {
    let tree = Tree::new();
    let server = start(&tree.root(), &["--header-timeout", "2", "--keepalive-timeout", "30"]);
    let mut s = server.connect();
    // A first request on the connection goes through; the slow one is the
    // second, so its deadline runs from its own first byte.
    s.write_all(b"GET /a.txt HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    let mut first = BufReader::new(s.try_clone().unwrap());
    assert_eq!(read_response(&mut first, false).unwrap().status, 200);
    std::thread::sleep(Duration::from_millis(2500));
    let started = Instant::now();
    let mut cut = false;
    for b in b"GET /a.txt HTTP/1.1\r\nHost: t\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n" {
        if s.write_all(&[*b]).is_err() {
            cut = true;
            break;
        }
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let mut buf = [0u8; 512];
        match s.read(&mut buf) {
            Ok(n) => {
                let text = String::from_utf8_lossy(&buf[..n]);
                assert!(n == 0 || text.starts_with("HTTP/1.1 408 "), "{text}");
                cut = true;
                break;
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {
            }
            Err(_) => {
                cut = true;
                break;
            }
        }
        assert!(started.elapsed() < Duration::from_secs(8), "still open after {:?}", started.elapsed());
    }
    let took = started.elapsed();
    assert!(cut, "the whole request went through byte by byte");
    assert!(took >= Duration::from_millis(1900) && took < Duration::from_secs(6), "cut off after {took:?}");
    // The header timeout also runs from the connection's start.
    let mut idle = server.connect();
    let t = Instant::now();
    let (closed, _) = closed_within(&mut idle, Duration::from_secs(8));
    assert!(closed && t.elapsed() >= Duration::from_millis(1900), "{:?}", t.elapsed());
}

// Part 4: the keep-alive idle timeout and requests per connection.
#[test]
fn keepalive_timeout_and_max_requests() {
    let tree = Tree::new();
    let server = start(&tree.root(), &["--keepalive-timeout", "1", "--max-requests", "3"]);
    let mut s = server.connect();
    s.write_all(b"GET /a.txt HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    assert_eq!(read_response(&mut r, false).unwrap().status, 200);
    let t = Instant::now();
    let (closed, _) = closed_within(&mut s, Duration::from_secs(6));
    assert!(closed, "an idle kept-alive connection stays open");
    assert!(t.elapsed() >= Duration::from_millis(900), "closed after only {:?}", t.elapsed());

    let mut s = server.connect();
    s.write_all(&b"GET /a.txt HTTP/1.1\r\nHost: t\r\n\r\n".repeat(4)).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let conn: Vec<Option<String>> = (0..3)
        .map(|_| read_response(&mut r, false).unwrap().header("Connection").map(String::from))
        .collect();
    assert_eq!(conn, [None, None, Some("close".into())]);
    assert!(read_response(&mut r, false).is_none(), "the fourth request was not answered");
}

// Part 4: the cap on open connections, with its log line.
#[test]
fn connection_cap_refuses_with_a_log_line() {
    let tree = Tree::new();
    let server = start(&tree.root(), &["--max-connections", "2"]);
    let a = server.connect();
    let b = server.connect();
    // Both are accepted before the third arrives.
    for s in [&a, &b] {
        let mut s = s.try_clone().unwrap();
        s.write_all(b"GET /a.txt HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
        let mut r = BufReader::new(s);
        assert_eq!(read_response(&mut r, false).unwrap().status, 200);
    }
    let mut c = server.connect();
    let _ = c.write_all(b"GET /a.txt HTTP/1.1\r\nHost: t\r\n\r\n");
    let (closed, got) = closed_within(&mut c, Duration::from_secs(5));
    assert!(closed && got.is_empty(), "the third connection was served: {:?}", String::from_utf8_lossy(&got));
    assert!(server.wait_log("connection limit (2) reached"), "{}", server.log_text());
    drop((a, b));
    // Below the cap again: served.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut s = server.connect();
        let _ = s.write_all(b"GET /a.txt HTTP/1.1\r\nHost: t\r\n\r\n");
        let mut r = BufReader::new(s);
        if read_response(&mut r, false).is_some_and(|r| r.status == 200) {
            break;
        }
        assert!(Instant::now() < deadline, "never served again after the others closed");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Writes `size` bytes of a repeatable pattern to `path`.
fn write_pattern(path: &Path, size: usize) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut block = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        for b in block.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        let n = left.min(block.len());
        f.write_all(&block[..n]).unwrap();
        left -= n;
    }
}

fn sha256(cmd: &str) -> String {
    let out = Command::new("sh").args(["-c", cmd]).output().unwrap();
    assert!(out.status.success(), "{cmd}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or("").to_string()
}

/// File read calls the process made (`pread` and `sendfile` count; socket
/// reads do not).
fn read_calls(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap();
    io.lines().find_map(|l| l.strip_prefix("syscr: ")).unwrap().trim().parse().unwrap()
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

// Part 3: a 256 MiB file arrives whole (sent by sendfile on plain TCP),
// and a client that stops reading costs no memory and is cut off at the
// send timeout.
#[test]
fn big_file_whole_and_a_stalled_reader() {
    let tree = Tree::new();
    let big = tree.root().join("big.bin");
    write_pattern(&big, 256 << 20);
    let server = start(&tree.root(), &["--send-timeout", "2", "--access-log", "off"]);
    let want = sha256(&format!("sha256sum {}", big.display()));
    let reads_before = read_calls(server.child.id());
    let got = sha256(&format!("curl -s --max-time 120 {} | sha256sum", server.url("/big.bin")));
    assert_eq!(got, want);
    // Zero-copy: the kernel moved the file in large sendfile calls, not
    // read in 64 KiB pieces to be copied (4,096 reads and more).
    let reads = read_calls(server.child.id()) - reads_before;
    assert!(reads < 2048, "{reads} read calls for 256 MiB: the file was copied");

    let before = rss_kib(server.child.id());
    let mut s = server.connect();
    // A small receive buffer: the kernel holds little for us.
    s.write_all(b"GET /big.bin HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    let mut first = [0u8; 1024];
    let _ = s.read(&mut first).unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    let during = rss_kib(server.child.id());
    assert!(during < before + 16 * 1024, "RSS grew from {before} KiB to {during} KiB with a stalled reader");
    // Cut off (at most two send timeouts after the kernel last took some
    // of a file queued whole): reading now ends well short of it.
    std::thread::sleep(Duration::from_secs(6));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut total = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => total += n,
        }
    }
    assert!(total < 128 << 20, "{total} bytes arrived after the send timeout");
}

// Part 6: the access log, to a file or off.
#[test]
fn access_log_in_combined_format() {
    let tree = Tree::new();
    let log = tree.base.join("access.log");
    let server = start(&tree.root(), &["--access-log", log.to_str().unwrap()]);
    let r = send(
        &server,
        "GET /a.txt?q=\"x\" HTTP/1.1\r\nHost: t\r\nReferer: http://r/\r\nUser-Agent: tester/1\r\n\r\n",
    );
    assert_eq!(r.status, 200);
    assert_eq!(get(&server, "/missing").status, 404);
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.lines().count() >= 2 || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(lines[0].starts_with("127.0.0.1 - - ["), "{}", lines[0]);
    assert!(
        lines[0].ends_with("] \"GET /a.txt?q=\\\"x\\\" HTTP/1.1\" 200 6 \"http://r/\" \"tester/1\""),
        "{}",
        lines[0]
    );
    assert!(lines[1].contains("\"GET /missing HTTP/1.1\" 404 "), "{}", lines[1]);
    assert!(!server.log_text().contains("GET /a.txt"), "logged to stderr too");

    let quiet = start(&tree.root(), &["--access-log", "off"]);
    assert_eq!(get(&quiet, "/a.txt").status, 200);
    std::thread::sleep(Duration::from_millis(200));
    assert!(!quiet.log_text().contains("GET /a.txt"), "{}", quiet.log_text());
    let stderr = start(&tree.root(), &[]);
    assert_eq!(get(&stderr, "/a.txt").status, 200);
    assert!(stderr.wait_log("\"GET /a.txt HTTP/1.1\" 200 6"), "{}", stderr.log_text());
}

// SIGTERM: a clean exit; a bad --path: a one-line error and status 1.
#[test]
fn exits_cleanly_and_refuses_a_bad_path() {
    let tree = Tree::new();
    let mut server = start(&tree.root(), &[]);
    assert_eq!(get(&server, "/a.txt").status, 200);
    // A kept-alive connection left open does not hold the exit up.
    let mut idle = server.connect();
    idle.write_all(b"GET /a.txt HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut BufReader::new(idle.try_clone().unwrap()), false).unwrap().status, 200);
    let started = Instant::now();
    let status = Command::new("kill").args(["-TERM", &server.child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let code = loop {
        if let Some(s) = server.child.try_wait().unwrap() {
            break s.code();
        }
        assert!(Instant::now() < deadline, "did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(code, Some(0));
    assert!(started.elapsed() < Duration::from_secs(4), "the exit waited {:?}", started.elapsed());
    let (closed, _) = closed_within(&mut idle, Duration::from_secs(5));
    assert!(closed);
    let out = Command::new(BIN)
        .args(["web", "--path", "/nonexistent/braid-web", "--listen", "tcp:0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--path /nonexistent/braid-web"), "{err}");
}

// The listing page in a real browser: headless Chromium renders it, takes
// a screenshot, and its text lists the files.
#[test]
fn listing_page_in_headless_chromium() {
    let tree = Tree::new();
    let server = start(&tree.root(), &[]);
    let chromium = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|c| Command::new(c).arg("--version").output().is_ok_and(|o| o.status.success()))
        .expect("headless Chromium is needed for this test (apt-get install chromium)");
    let shot = tree.base.join("listing.png");
    let profile = tree.base.join("profile");
    let flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-dev-shm-usage",
    ];
    let run = |extra: &[String]| {
        let mut child = Command::new(chromium)
            .args(flags)
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut out = String::new();
        let mut stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let _ = stdout.read_to_string(&mut out);
            out
        });
        let deadline = Instant::now() + Duration::from_secs(90);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("chromium did not finish in time");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        reader.join().unwrap()
    };
    let url = server.url("/list/");
    run(&[format!("--screenshot={}", shot.display()), "--window-size=800,600".into(), url.clone()]);
    let png = std::fs::read(&shot).expect("chromium wrote no screenshot");
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 2000,
        "not a screenshot: {} bytes",
        png.len()
    );
    // The text the browser made of the page (the DOM after parsing).
    let dom = run(&["--dump-dom".into(), url]);
    // PNG's IHDR: the width and height asked for.
    assert_eq!((&png[16..20], &png[20..24]), (&800u32.to_be_bytes()[..], &600u32.to_be_bytes()[..]));
    assert!(dom.contains("<h1>Index of /list/</h1>"), "{dom}");
    for name in [">&lt;b&gt;&amp;amp;.txt</a>", ">a b.txt</a>", ">inner dir/</a>", ">../</a>"] {
        assert!(dom.contains(name), "{name} is not on the page: {dom}");
    }
    assert!(server.wait_log("\"GET /list/ HTTP/1.1\" 200"), "{}", server.log_text());
}

// Part 3 over TLS: an `ssl:` endpoint, bodies copied through the TLS
// wrapper by the same pull producer; curl checks the bytes.
#[test]
fn serves_over_tls() {
    let tree = Tree::new();
    let (key, cert) = (tree.base.join("key.pem"), tree.base.join("cert.pem"));
    let status = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "1",
        ])
        .args(["-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    assert!(status.is_ok_and(|s| s.success()), "openssl is needed for this test (apt-get install openssl)");
    let big = tree.root().join("big.bin");
    write_pattern(&big, 5 << 20);
    let listen = format!("ssl:0:interface=127.0.0.1:privateKey={}:certKey={}", key.display(), cert.display());
    let server = start_on(&tree.root(), &listen, &[]);
    let url = |p: &str| format!("https://localhost:{}{p}", server.port);
    let resolve = format!("localhost:{}:127.0.0.1", server.port);
    let tls = |args: &[&str]| {
        let mut all = vec!["--cacert", cert.to_str().unwrap(), "--resolve", &resolve];
        all.extend_from_slice(args);
        curl(&all)
    };
    assert_eq!(tls(&[&url("/a.txt")]), "hello\n");
    assert_eq!(tls(&["-r", "2-4", &url("/digits.txt")]), "234");
    let want = sha256(&format!("sha256sum {}", big.display()));
    let got = sha256(&format!(
        "curl -s --max-time 60 --cacert {} --resolve {resolve} {} | sha256sum",
        cert.display(),
        url("/big.bin")
    ));
    assert_eq!(got, want);
}

// Many clients at once, each with a kept-alive connection: every
// response whole and in order (bounded: 16 clients × 100 requests).
#[test]
fn many_kept_alive_clients_at_once() {
    let tree = Tree::new();
    let server = start(&tree.root(), &["--access-log", "off"]);
    let port = server.port;
    let clients: Vec<_> = (0..16)
        .map(|i| {
            std::thread::spawn(move || {
                let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
                let mut w = s.try_clone().unwrap();
                let mut r = BufReader::new(s);
                for n in 0..100 {
                    let (target, want): (&str, &[u8]) =
                        if (i + n) % 2 == 0 { ("/a.txt", b"hello\n") } else { ("/noext", b"plain") };
                    w.write_all(format!("GET {target} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes()).unwrap();
                    let resp = read_response(&mut r, false).expect("a response");
                    assert_eq!((resp.status, resp.body.as_slice()), (200, want), "client {i} request {n}");
                }
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
}

// The send timeout is about a client that takes nothing: one that reads
// slowly but steadily gets the whole file, however long it takes (here
// several send timeouts, with the file queued whole for sendfile).
#[test]
fn a_slow_steady_reader_gets_the_whole_file() {
    let tree = Tree::new();
    let file = tree.root().join("medium.bin");
    write_pattern(&file, 16 << 20);
    let server = start(&tree.root(), &["--send-timeout", "1", "--access-log", "off"]);
    let mut s = server.connect();
    s.write_all(b"GET /medium.bin HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    let started = Instant::now();
    let mut r = BufReader::with_capacity(64 * 1024, s);
    let mut head = String::new();
    while !head.ends_with("\r\n\r\n") {
        let mut line = String::new();
        assert!(r.read_line(&mut line).unwrap() > 0, "closed in the head");
        head.push_str(&line);
    }
    let mut got = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    while got < 16 << 20 {
        match r.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
        // About 4 MiB/s: four seconds for the file.
        std::thread::sleep(Duration::from_millis(15));
        assert!(started.elapsed() < Duration::from_secs(60), "too slow to be a test");
    }
    assert_eq!(got, 16 << 20, "cut off after {:?}", started.elapsed());
    assert!(started.elapsed() > Duration::from_secs(2), "read too fast to test the timeout");
}
