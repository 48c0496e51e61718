//! rustls's own memory per idle server connection, with no networking or event loop: the
//! floor any TLS server on rustls pays, which braid's idle TLS connection is compared with.
//!
//! `tls_state --tls-cert PEM --tls-key PEM --ca PEM [--conns N (10000)]`
//!
//! For each connection a rustls client and server make a full handshake in memory and one
//! 64-byte round trip, as `tls_loadgen idle` does over sockets; the client is dropped and the
//! server kept. Prints `RESULT conns=N rss_per_conn=B`: the growth of this process's VmRSS
//! divided by the connections. The clients come and go one at a time, so the allocator hands
//! each one the memory its predecessor freed and the growth is the servers'.

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
    let server = braid_bench::tls::server_config(Path::new(cert), Path::new(key)).unwrap_or_else(|e| die(&e));
    let client = braid_bench::tls::client_config(Path::new(ca), false).unwrap_or_else(|e| die(&e));
    let mut kept = Vec::with_capacity(conns);
    // Warm-up: the allocator's first pools, the session cache's growth.
    for _ in 0..300 {
        drop(one(&client, &server).unwrap_or_else(|e| die(&e)));
    }
    let before = rss().unwrap_or_else(|e| die(&e));
    for _ in 0..conns {
        kept.push(one(&client, &server).unwrap_or_else(|e| die(&e)));
    }
    let after = rss().unwrap_or_else(|e| die(&e));
    println!("RESULT conns={conns} rss_per_conn={:.1}", (after - before) / conns as f64);
    drop(kept);
}

/// A server connection after a full handshake and one 64-byte echo.
fn one(
    client: &Arc<rustls::ClientConfig>,
    server: &Arc<rustls::ServerConfig>,
) -> Result<ServerConnection, String> {
    let name = ServerName::try_from("localhost").map_err(|e| e.to_string())?;
    let mut c = ClientConnection::new(client.clone(), name).map_err(|e| e.to_string())?;
    let mut s = ServerConnection::new(server.clone()).map_err(|e| e.to_string())?;
    let probe = [0x5au8; 64];
    c.writer().write_all(&probe).map_err(|e| e.to_string())?;
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    for _ in 0..32 {
        shuttle(&mut c, &mut s)?;
        let n = match s.reader().read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(e.to_string()),
        };
        s.writer().write_all(&buf[..n]).map_err(|e| e.to_string())?;
        shuttle(&mut c, &mut s)?;
        match c.reader().read(&mut buf) {
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e.to_string()),
        }
        if got.len() == probe.len() && !s.is_handshaking() {
            return if got == probe { Ok(s) } else { Err("the echo came back wrong".into()) };
        }
    }
    Err("handshake and echo did not finish in memory".into())
}

/// Moves every pending record each way until neither side has anything to send.
fn shuttle(c: &mut ClientConnection, s: &mut ServerConnection) -> Result<(), String> {
    let mut wire = Vec::new();
    while c.wants_write() || s.wants_write() {
        wire.clear();
        while c.wants_write() {
            c.write_tls(&mut wire).map_err(|e| e.to_string())?;
        }
        let mut rd = &wire[..];
        while !rd.is_empty() {
            s.read_tls(&mut rd).map_err(|e| e.to_string())?;
            s.process_new_packets().map_err(|e| format!("server: {e}"))?;
        }
        wire.clear();
        while s.wants_write() {
            s.write_tls(&mut wire).map_err(|e| e.to_string())?;
        }
        let mut rd = &wire[..];
        while !rd.is_empty() {
            c.read_tls(&mut rd).map_err(|e| e.to_string())?;
            c.process_new_packets().map_err(|e| format!("client: {e}"))?;
        }
    }
    Ok(())
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
