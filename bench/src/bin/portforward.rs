//! Port forwarding benchmark: `braid portforward` (copying, and with
//! `--splice on`) side by side with a tokio `copy_bidirectional` proxy
//! (`proxy_tokio`), each in front of the same `braid echo`, in one run.
//! The figure is the **proxy's** CPU per MiB (bulk) and per message
//! (pipeline, 100 connections × 16 in flight), read exactly from
//! /proc/PID/task/*/schedstat between the load generator's marks. The
//! proxy is pinned to CPU 0; the echo server and the load generator share
//! CPU 1. Prints a markdown section (for `bench-all`).
//!
//! ```text
//! cargo run --release -p braid-bench --bin portforward [-- --reps N --bulk-bytes B --seconds S]
//! ```

use std::io::{BufRead, BufReader};
use std::process::Stdio;

use braid_bench::side::{bin_dir, cpu_ns, median, pinned, start};
use braid_bench::{die, Args};

const PROXIES: [&str; 3] = ["tokio copy_bidirectional", "braid --splice off", "braid --splice on"];

/// Runs one load: returns (proxy CPU ns, operations).
fn load(proxy: u32, addr: &str, args: &[String]) -> (f64, f64) {
    let mut lg = pinned(1, &bin_dir().join("loadgen"))
        .args(args)
        .args(["--addr", addr])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| die(&format!("starting loadgen: {e}")));
    let out = BufReader::new(lg.stdout.take().unwrap());
    let (mut c0, mut c1, mut ops) = (0.0, 0.0, 0.0);
    for line in out.lines().map_while(Result::ok) {
        if line.starts_with("MARK start") {
            c0 = cpu_ns(proxy);
        } else if line.starts_with("MARK end") {
            c1 = cpu_ns(proxy);
        } else if line.starts_with("ERROR") {
            die(&format!("loadgen through the proxy: {line}"));
        } else if let Some(rest) = line.strip_prefix("RESULT ") {
            ops = rest
                .split_whitespace()
                .find_map(|kv| kv.strip_prefix("ops="))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0);
        }
    }
    let _ = lg.wait();
    (c1 - c0, ops)
}

fn main() {
    let args = Args::parse(&[]);
    let reps: usize = args.num("reps", 3).max(1);
    let bulk_bytes: u64 = args.num("bulk-bytes", 1 << 30);
    let seconds: f64 = args.num("seconds", 3.0);
    let bin = bin_dir();
    let mut echo = pinned(1, &bin.join("braid"));
    echo.args(["--reactor", "epoll", "echo", "--listen", "tcp:0:interface=127.0.0.1"]);
    let (mut echo, echo_addr) = start(echo, "braid echo");
    let scenarios: [(&str, Vec<String>); 2] = [
        ("bulk", vec!["bulk".into(), "--bytes".into(), bulk_bytes.to_string()]),
        (
            "pipeline-100",
            vec!["pipeline".into(), "--conns".into(), "100".into(), "--seconds".into(), seconds.to_string()],
        ),
    ];
    // samples[proxy][scenario] = CPU per op (ns), one per repetition.
    let mut samples = vec![vec![Vec::new(); scenarios.len()]; PROXIES.len()];
    for rep in 0..reps {
        for (p, name) in PROXIES.iter().enumerate() {
            let mut cmd = if p == 0 {
                let mut c = pinned(0, &bin.join("proxy_tokio"));
                c.args(["--port", "0", "--to", &echo_addr]);
                c
            } else {
                let mut c = pinned(0, &bin.join("braid"));
                let splice = if p == 1 { "off" } else { "on" };
                c.args([
                    "--reactor",
                    "epoll",
                    "portforward",
                    "--splice",
                    splice,
                    "--listen",
                    "tcp:0:interface=127.0.0.1",
                ]);
                c.args(["--connect", &format!("tcp:{echo_addr}")]);
                c
            };
            cmd.env_remove("BRAID_REACTOR");
            let (mut proxy, addr) = start(cmd, name);
            for (s, (scenario, lg_args)) in scenarios.iter().enumerate() {
                let (cpu, ops) = load(proxy.id(), &addr, lg_args);
                if ops <= 0.0 {
                    die(&format!("{name}: {scenario} counted no operations"));
                }
                samples[p][s].push(cpu / ops);
                eprintln!(
                    "[rep {}/{reps}] {name:28} {scenario:13} proxy CPU {:.1} µs/op",
                    rep + 1,
                    cpu / ops / 1e3
                );
            }
            let _ = proxy.kill();
            let _ = proxy.wait();
        }
    }
    let _ = echo.kill();
    let _ = echo.wait();
    println!("## Port forwarding\n");
    println!(
        "`braid portforward` (epoll) copying and with `--splice on`, and tokio's `copy_bidirectional` proxy, each in \
         front of the same `braid echo`; the proxy on CPU 0, the echo server and the TCP load generator on CPU 1. \
         **Proxy CPU** per MiB (`bulk`, {} MiB through one connection, both directions) and per message \
         (`pipeline-100`, 100 connections × 16 in flight, {seconds} s), read from /proc/PID/task/*/schedstat between \
         the load generator's marks; medians of {reps} repetitions. Targets (DESIGN.md §11): copying ≤ 1.0×, \
         splice ≤ 0.6× the tokio proxy's CPU per MiB.\n",
        bulk_bytes >> 20
    );
    println!(
        "| scenario | figure | tokio | braid copying | braid splice | copying ÷ tokio | splice ÷ tokio |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|");
    for (s, (scenario, _)) in scenarios.iter().enumerate() {
        let m: Vec<f64> = (0..PROXIES.len()).map(|p| median(samples[p][s].clone())).collect();
        let unit = if s == 0 { "µs per MiB" } else { "ns per message" };
        let scale = if s == 0 { 1e3 } else { 1.0 };
        println!(
            "| {scenario} | proxy CPU, {unit} | {:.1} | {:.1} | {:.1} | **{:.2}** | **{:.2}** |",
            m[0] / scale,
            m[1] / scale,
            m[2] / scale,
            m[1] / m[0],
            m[2] / m[0]
        );
    }
    println!("\n<details><summary>Every repetition (proxy CPU per operation, ns)</summary>\n");
    for (p, name) in PROXIES.iter().enumerate() {
        for (s, (scenario, _)) in scenarios.iter().enumerate() {
            let reps: Vec<String> = samples[p][s].iter().map(|v| format!("{v:.0}")).collect();
            println!("- {name}, {scenario}: {}", reps.join(", "));
        }
    }
    println!("\n</details>");
}
