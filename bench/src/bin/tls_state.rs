//! rustls's own memory per idle server connection, with no networking or event loop: the
//! floor any TLS server on rustls pays, which braid's idle TLS connection is compared with.
//!
//! `tls_state --tls-cert PEM --tls-key PEM --ca PEM [--conns N (10000)] [--workers N (32)]`
//!
//! For each connection a rustls client and server make a full handshake in memory and one
//! 64-byte round trip, as `tls_loadgen idle` does over sockets, `--workers` pairs at a time with
//! their steps interleaved (so the allocator sees the same mix of short- and long-lived blocks
//! as a server handling that many handshakes at once); then the clients are dropped and the
//! servers kept. Prints `RESULT conns=N rss_per_conn=B`: the growth of this process's VmRSS
//! divided by the connections.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;

use braid_bench::{die, Args};
use rustls::pki_types::ServerName;
use rustls::{ClientConnection, ServerConnection};

fn main() {
    let args = Args::parse(&[]);
    let (Some(cert), Some(key), Some(ca)) = (args.get("tls-cert"), args.get("tls-key"), args.get("ca"))
    else {
        die("--tls-cert PEM, --tls-key PEM and --ca PEM are required")
    };
    let conns: usize = args.num("conns", 10_000usize).max(1);
    let workers: usize = args.num("workers", 32usize).clamp(1, 4096);
    let server = braid_bench::tls::server_config(Path::new(cert), Path::new(key)).unwrap_or_else(|e| die(&e));
    let client = braid_bench::tls::client_config(Path::new(ca), false).unwrap_or_else(|e| die(&e));
    let mut kept = Vec::with_capacity(conns);
    // Warm-up: the allocator's first pools, the session cache's growth.
    drop(batch(&client, &server, 300, workers).unwrap_or_else(|e| die(&e)));
    let before = rss().unwrap_or_else(|e| die(&e));
    while kept.len() < conns {
        let n = (conns - kept.len()).min(workers);
        kept.extend(batch(&client, &server, n, workers).unwrap_or_else(|e| die(&e)));
    }
    let after = rss().unwrap_or_else(|e| die(&e));
    // The sizes of the values themselves (in the vector here), for reading a server's figure.
    println!(
        "RESULT conns={conns} rss_per_conn={:.1} server_connection_bytes={} connection_enum_bytes={}",
        (after - before) / conns as f64,
        std::mem::size_of::<ServerConnection>(),
        std::mem::size_of::<rustls::Connection>()
    );
    drop(kept);
}

/// `n` server connections, each after a full handshake and one 64-byte echo, made `workers`
/// at a time in interleaved steps.
fn batch(
    client: &Arc<rustls::ClientConfig>,
    server: &Arc<rustls::ServerConfig>,
    n: usize,
    workers: usize,
) -> Result<Vec<ServerConnection>, String> {
    let mut done = Vec::with_capacity(n);
    while done.len() < n {
        let mut pairs = Vec::new();
        for _ in 0..(n - done.len()).min(workers) {
            let name = ServerName::try_from("localhost").map_err(|e| e.to_string())?;
            let mut c = ClientConnection::new(client.clone(), name).map_err(|e| e.to_string())?;
            let s = ServerConnection::new(server.clone()).map_err(|e| e.to_string())?;
            c.writer().write_all(&PROBE).map_err(|e| e.to_string())?;
            pairs.push(Some((c, s, Vec::new())));
        }
        for _ in 0..32 {
            for slot in pairs.iter_mut() {
                let Some((c, s, got)) = slot.as_mut() else { continue };
                if step(c, s, got)? {
                    let (_, s, _) = slot.take().expect("slot");
                    done.push(s);
                }
            }
        }
        if pairs.iter().any(Option::is_some) {
            return Err("handshake and echo did not finish in memory".into());
        }
    }
    Ok(done)
}

const PROBE: [u8; 64] = [0x5a; 64];

/// One flight each way, the server echoing what it read; whether the handshake is over and
/// the probe came back.
fn step(c: &mut ClientConnection, s: &mut ServerConnection, got: &mut Vec<u8>) -> Result<bool, String> {
    let mut wire = Vec::new();
    while c.wants_write() {
        c.write_tls(&mut wire).map_err(|e| e.to_string())?;
    }
    let mut rd = &wire[..];
    while !rd.is_empty() {
        s.read_tls(&mut rd).map_err(|e| e.to_string())?;
        s.process_new_packets().map_err(|e| format!("server: {e}"))?;
    }
    let mut buf = [0u8; 256];
    let n = match s.reader().read(&mut buf) {
        Ok(n) => n,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
        Err(e) => return Err(e.to_string()),
    };
    s.writer().write_all(&buf[..n]).map_err(|e| e.to_string())?;
    wire.clear();
    while s.wants_write() {
        s.write_tls(&mut wire).map_err(|e| e.to_string())?;
    }
    let mut rd = &wire[..];
    while !rd.is_empty() {
        c.read_tls(&mut rd).map_err(|e| e.to_string())?;
        c.process_new_packets().map_err(|e| format!("client: {e}"))?;
    }
    match c.reader().read(&mut buf) {
        Ok(n) => got.extend_from_slice(&buf[..n]),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        Err(e) => return Err(e.to_string()),
    }
    if got.len() == PROBE.len() && !s.is_handshaking() {
        return if got[..] == PROBE { Ok(true) } else { Err("the echo came back wrong".into()) };
    }
    Ok(false)
}

/// This process's VmRSS in bytes.
fn rss() -> Result<f64, String> {
    let status =
        std::fs::read_to_string("/proc/self/status").map_err(|e| format!("/proc/self/status: {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map(|kb| kb * 1024.0)
        .ok_or_else(|| "no VmRSS in /proc/self/status".to_string())
}
