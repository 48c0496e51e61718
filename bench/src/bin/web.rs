//! Static-file benchmark: `braid web` side by side with nginx (one worker
//! process, `sendfile on`, `access_log off`, the same directory), loaded by
//! wrk with keep-alive and 100 connections. The figure is the **server's**
//! CPU per request (a 4 KiB file, a missing file) and per MiB (a 1 MiB
//! file), read from /proc/PID/task/*/schedstat before and after each wrk
//! run. The server is pinned to CPU 0, wrk to CPU 1. Prints a markdown
//! section (for `bench-all`).
//!
//! ```text
//! cargo run --release -p braid-bench --bin web [-- --reps N --seconds S]
//! ```
//!
//! Needs `nginx` and `wrk` on the PATH (Debian: `apt-get install nginx wrk`).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use braid_bench::side::{bin_dir, cpu_ns, median, pinned, start};
use braid_bench::{die, Args};

const SERVERS: [&str; 2] = ["nginx", "braid web"];

/// (path requested, bytes per response body, what the figure is per)
const SCENARIOS: [(&str, u64, &str); 3] =
    [("/4k.bin", 4096, "request"), ("/1m.bin", 1 << 20, "MiB"), ("/missing", 0, "request")];

/// The nginx configuration used, with `{dir}` and `{port}` filled in.
const NGINX_CONF: &str = "\
worker_processes 1;
master_process off;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events { worker_connections 1024; }
http {
    access_log off;
    sendfile on;
    client_body_temp_path {dir}/tmp;
    proxy_temp_path {dir}/tmp;
    fastcgi_temp_path {dir}/tmp;
    uwsgi_temp_path {dir}/tmp;
    scgi_temp_path {dir}/tmp;
    server {
        listen 127.0.0.1:{port};
        root {dir}/www;
    }
}
";

struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| die(&format!("finding a free port: {e}")))
}

/// Starts nginx on `port` and waits until it accepts connections.
fn start_nginx(dir: &Path, port: u16) -> (Child, String) {
    let conf = NGINX_CONF.replace("{dir}", &dir.display().to_string()).replace("{port}", &port.to_string());
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).unwrap_or_else(|e| die(&format!("writing {}: {e}", path.display())));
    let child = pinned(0, Path::new("nginx"))
        .arg("-c")
        .arg(&path)
        .arg("-p")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| die(&format!("starting nginx (apt-get install nginx): {e}")));
    let addr = format!("127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(&addr).is_err() {
        if Instant::now() > deadline {
            die("nginx did not start listening");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    (child, addr)
}

/// One request with `Connection: close`: the status line and the body.
fn get(addr: &str, path: &str) -> (String, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| die(&format!("connecting to {addr}: {e}")));
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    write!(s, "GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .unwrap_or_else(|e| die(&format!("writing to {addr}: {e}")));
    let mut all = Vec::new();
    let _ = s.read_to_end(&mut all);
    let split = all.windows(4).position(|w| w == b"\r\n\r\n").map_or(all.len(), |i| i + 4);
    let status = String::from_utf8_lossy(&all[..split]).lines().next().unwrap_or("").to_string();
    (status, all[split..].to_vec())
}

/// Runs wrk against `url`: (server CPU ns, requests, non-2xx responses).
fn load(server: u32, url: &str, seconds: f64) -> (f64, f64, f64) {
    let c0 = cpu_ns(server);
    let out = pinned(1, Path::new("wrk"))
        .args(["-t1", "-c100", &format!("-d{seconds}s"), url])
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| die(&format!("running wrk (apt-get install wrk): {e}")));
    let c1 = cpu_ns(server);
    let text = String::from_utf8_lossy(&out.stdout);
    let number = |prefix: &str| -> f64 {
        text.lines()
            .find_map(|l| {
                let l = l.trim();
                if prefix == "requests in" {
                    l.contains("requests in").then(|| l.split_whitespace().next()?.parse().ok()).flatten()
                } else {
                    l.strip_prefix(prefix).and_then(|v| v.trim().parse().ok())
                }
            })
            .unwrap_or(0.0)
    };
    (c1 - c0, number("requests in"), number("Non-2xx or 3xx responses:"))
}

fn main() {
    let args = Args::parse(&[]);
    let reps: usize = args.num("reps", 3).max(1);
    let seconds: f64 = args.num("seconds", 3.0);
    let dir = Dir(std::env::temp_dir().join(format!("braid-bench-web-{}", std::process::id())));
    let www = dir.0.join("www");
    for d in [&www, &dir.0.join("tmp")] {
        std::fs::create_dir_all(d).unwrap_or_else(|e| die(&format!("creating {}: {e}", d.display())));
    }
    let four_k: Vec<u8> = (0..4096u32).map(|i| (i * 31 % 251) as u8).collect();
    let one_m: Vec<u8> = (0..(1u32 << 20)).map(|i| (i * 17 % 253) as u8).collect();
    std::fs::write(www.join("4k.bin"), &four_k).unwrap_or_else(|e| die(&format!("writing a file: {e}")));
    std::fs::write(www.join("1m.bin"), &one_m).unwrap_or_else(|e| die(&format!("writing a file: {e}")));
    let bin = bin_dir();
    // samples[server][scenario] = CPU ns per request or per MiB; rates likewise.
    let mut samples = vec![vec![Vec::new(); SCENARIOS.len()]; SERVERS.len()];
    let mut rates = vec![vec![Vec::new(); SCENARIOS.len()]; SERVERS.len()];
    for rep in 0..reps {
        // Both servers run through the whole repetition (each idle while
        // the other is loaded), so every scenario is measured on both
        // back to back, the order alternating between repetitions and
        // scenarios: a slow spell of the machine falls on both sides of a
        // pair rather than on one server's whole run.
        let mut servers: Vec<(Child, String)> = SERVERS
            .iter()
            .enumerate()
            .map(|(s, name)| {
                let (server, addr) = if s == 0 {
                    start_nginx(&dir.0, free_port())
                } else {
                    let mut c = pinned(0, &bin.join("braid"));
                    c.args(["--reactor", "epoll", "web", "--path"]).arg(&www);
                    c.args(["--listen", "tcp:0:interface=127.0.0.1", "--access-log", "off"]);
                    c.env_remove("BRAID_REACTOR");
                    start(c, name)
                };
                // Both serve the same bytes before either is timed.
                let (status, body) = get(&addr, "/4k.bin");
                if !status.contains(" 200") || body != four_k {
                    die(&format!("{name}: GET /4k.bin gave {status:?} and {} bytes", body.len()));
                }
                let (status, _) = get(&addr, "/missing");
                if !status.contains(" 404") {
                    die(&format!("{name}: GET /missing gave {status:?}"));
                }
                (server, addr)
            })
            .collect();
        for (i, (path, size, per)) in SCENARIOS.iter().enumerate() {
            let order: [usize; 2] = if (rep + i) % 2 == 0 { [0, 1] } else { [1, 0] };
            for s in order {
                let name = SERVERS[s];
                let (server, addr) = &servers[s];
                let (cpu, requests, bad) = load(server.id(), &format!("http://{addr}{path}"), seconds);
                if requests <= 0.0 {
                    die(&format!("{name}: wrk counted no requests for {path}"));
                }
                if (*size > 0 && bad > 0.0) || (*size == 0 && bad < requests) {
                    die(&format!("{name}: {bad} of {requests} responses for {path} had the wrong status"));
                }
                let units =
                    if *per == "MiB" { requests * *size as f64 / (1u64 << 20) as f64 } else { requests };
                samples[s][i].push(cpu / units);
                rates[s][i].push(units / seconds);
                eprintln!(
                    "[rep {}/{reps}] {name:10} {path:9} server CPU {:.1} µs/{per}, {:.0} {per}/s",
                    rep + 1,
                    cpu / units / 1e3,
                    units / seconds
                );
            }
        }
        for (server, _) in &mut servers {
            let _ = server.kill();
            let _ = server.wait();
        }
    }
    println!("## Static files (braid web and nginx)\n");
    println!(
        "`braid web --access-log off` (epoll) and nginx {} with the configuration below, serving the same directory; \
         wrk 4 (`-t1 -c100 -d{seconds}s`, keep-alive) on CPU 1, the servers on CPU 0. **Server CPU** per request or \
         per MiB, read from /proc/PID/task/*/schedstat around each wrk run. Both servers run through a repetition \
         and each file is loaded on one then the other, the order alternating; the figures are medians of {reps} \
         repetitions, and the ratio is the median of the {reps} per-repetition ratios (each pair measured back to \
         back). Target (DESIGN.md §11): braid ≤ 1.0× nginx's server CPU per request and per MiB.\n",
        nginx_version()
    );
    println!("| file | figure | nginx | braid web | braid ÷ nginx |");
    println!("|---|---|---:|---:|---:|");
    for (i, (path, _, per)) in SCENARIOS.iter().enumerate() {
        let m: Vec<f64> = (0..SERVERS.len()).map(|s| median(samples[s][i].clone())).collect();
        let r: Vec<f64> = (0..SERVERS.len()).map(|s| median(rates[s][i].clone())).collect();
        let paired = |v: &[Vec<Vec<f64>>]| median(v[1][i].iter().zip(&v[0][i]).map(|(b, n)| b / n).collect());
        println!(
            "| `{path}` | server CPU, µs per {per} | {:.1} | {:.1} | **{:.2}** |",
            m[0] / 1e3,
            m[1] / 1e3,
            paired(&samples)
        );
        println!("| `{path}` | {per}s per second | {:.0} | {:.0} | {:.2} |", r[0], r[1], paired(&rates));
    }
    println!("\n<details><summary>Every repetition (server CPU, ns per request or MiB), and the nginx configuration</summary>\n");
    for (s, name) in SERVERS.iter().enumerate() {
        for (i, (path, _, _)) in SCENARIOS.iter().enumerate() {
            let reps: Vec<String> = samples[s][i].iter().map(|v| format!("{v:.0}")).collect();
            println!("- {name}, {path}: {}", reps.join(", "));
        }
    }
    println!("\n```nginx\n{}```\n\n</details>", NGINX_CONF);
}

fn nginx_version() -> String {
    Command::new("nginx")
        .arg("-v")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stderr).trim().replace("nginx version: ", ""))
        .unwrap_or_default()
}
