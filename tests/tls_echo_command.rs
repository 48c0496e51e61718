//! `braid echo --tls-cert PEM --tls-key PEM`, run as a real process, with
//! `openssl` making the certificate and playing the client. A missing
//! `openssl` fails the test.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_braid");

/// Kills the child when dropped, so a failing test leaves nothing behind.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A fresh directory with a self-signed certificate for localhost (made
/// now, never committed); removed when dropped.
struct Cert {
    dir: PathBuf,
}

impl Cert {
    fn new(tag: &str) -> Cert {
        let dir = std::env::temp_dir().join(format!("braid-echo-tls-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
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
            .arg(dir.join("key.pem"))
            .arg("-out")
            .arg(dir.join("cert.pem"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        assert!(
            status.is_ok_and(|s| s.success()),
            "openssl is needed for this test (apt-get install openssl)"
        );
        Cert { dir }
    }

    fn cert(&self) -> PathBuf {
        self.dir.join("cert.pem")
    }

    fn key(&self) -> PathBuf {
        self.dir.join("key.pem")
    }
}

impl Drop for Cert {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start(cert: &Path, key: &Path) -> (Reaped, String) {
    let mut child = Reaped(
        Command::new(BIN)
            .args(["echo", "--port", "0", "--interface", "127.0.0.1", "--tls-cert"])
            .arg(cert)
            .arg("--tls-key")
            .arg(key)
            .env_remove("BRAID_REACTOR")
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn braid"),
    );
    let mut stderr = BufReader::new(child.0.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    std::thread::spawn(move || {
        let mut sink = String::new();
        while stderr.read_line(&mut sink).is_ok_and(|n| n > 0) {}
    });
    (child, line)
}

#[test]
fn echo_serves_tls_to_openssl_s_client() {
    let cert = Cert::new("ok");
    let (_server, line) = start(&cert.cert(), &cert.key());
    assert!(line.contains("echo listening on 127.0.0.1:") && line.contains("over TLS"), "{line:?}");
    let port = line.split("127.0.0.1:").nth(1).unwrap().split_whitespace().next().unwrap();
    let mut client = Reaped(
        Command::new("openssl")
            .args(["s_client", "-connect", &format!("127.0.0.1:{port}"), "-servername", "localhost"])
            .args(["-verify_hostname", "localhost", "-verify_return_error", "-quiet", "-CAfile"])
            .arg(cert.cert())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    client.0.stdin.as_mut().unwrap().write_all(b"echo over tls\n").unwrap();
    let mut out = BufReader::new(client.0.stdout.take().unwrap());
    let mut back = String::new();
    out.read_line(&mut back).unwrap();
    assert_eq!(back, "echo over tls\n");
}

#[test]
fn a_key_file_without_a_key_exits_1_naming_it() {
    let cert = Cert::new("bad");
    let out = Command::new(BIN)
        .args(["echo", "--port", "0", "--interface", "127.0.0.1", "--tls-cert"])
        .arg(cert.cert())
        .arg("--tls-key")
        .arg(cert.cert())
        .env_remove("BRAID_REACTOR")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cert.pem") && err.contains("no PRIVATE KEY"), "{err}");
}

#[test]
fn tls_cert_without_a_key_is_a_usage_error() {
    let out = Command::new(BIN).args(["echo", "--port", "0", "--tls-cert", "x.pem"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tls-key"));
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// A slow reader over TLS: a Python `ssl` client writes 96 MiB and reads
/// nothing for a while. The echo over TLS stops reading once its buffers
/// (plaintext queued and ciphertext below) are full, so the server's
/// memory stays bounded; then the client reads everything back, intact.
///
/// The client drives its socket from one thread, non-blocking: OpenSSL
/// does not allow one connection to be read and written from two threads
/// at once (its "want read / want write" state is shared), and a client
/// doing so stalls now and then by itself.
#[test]
fn a_slow_reader_over_tls_keeps_the_server_bounded() {
    let cert = Cert::new("slow");
    let (server, line) = start(&cert.cert(), &cert.key());
    let port = line.split("127.0.0.1:").nth(1).unwrap().split_whitespace().next().unwrap().to_string();
    let pid = server.0.id();
    let script = r#"
import hashlib, select, socket, ssl, sys, time
ctx = ssl.create_default_context(cafile=sys.argv[2])
raw = socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=30)
s = ctx.wrap_socket(raw, server_hostname='localhost')
s.setblocking(False)
total = 96 << 20
chunk = bytes(range(256)) * 1024
sent_hash, got_hash = hashlib.sha256(), hashlib.sha256()
sent = got = 0
def send_some():
    # True if a chunk went out.
    global sent
    if sent >= total:
        return False
    try:
        s.send(chunk)
    except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
        return False
    sent_hash.update(chunk); sent += len(chunk)
    return True
# Write without reading until the server stops taking bytes for 2 s.
last = time.monotonic()
while time.monotonic() - last < 2.0:
    if send_some():
        last = time.monotonic()
    else:
        select.select([], [s], [], 0.1)
assert sent < total, 'the server took all 96 MiB without being read'
print('stalled', sent, flush=True)
sys.stdin.readline()
deadline = time.monotonic() + 90
while got < total:
    assert time.monotonic() < deadline, ('no progress', sent, got)
    moved = False
    while send_some():
        moved = True
    while True:
        try:
            data = s.recv(1 << 20)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            break
        assert data, ('the server closed early', sent, got)
        got_hash.update(data); got += len(data); moved = True
    if not moved:
        select.select([s], [s] if sent < total else [], [], 0.5)
assert got == total and got_hash.digest() == sent_hash.digest(), got
print('ok', flush=True)
"#;
    let mut client = Reaped(
        Command::new("python3")
            .args(["-c", script, &port])
            .arg(cert.cert())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3"),
    );
    let mut out = BufReader::new(client.0.stdout.take().unwrap());
    let mut said = String::new();
    out.read_line(&mut said).unwrap();
    assert!(said.starts_with("stalled"), "the client said {said:?}");
    let first = rss_kib(pid);
    std::thread::sleep(std::time::Duration::from_millis(1000));
    let later = rss_kib(pid);
    assert!(
        later < first + 8 * 1024,
        "the TLS echo grew from {first} KiB to {later} KiB while the client stalled"
    );
    assert!(later < 64 * 1024, "the TLS echo holds {later} KiB with one stalled client");
    client.0.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    said.clear();
    out.read_line(&mut said).unwrap();
    assert_eq!(said.trim(), "ok");
}
