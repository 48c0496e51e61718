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
