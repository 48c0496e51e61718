//! Benchmark peers and load generators for braid. Not part of the library.
//!
//! The binaries in `src/bin/`:
//! - `echo_tokio`, `echo_mio`: the peers braid is measured against;
//! - `loadgen`: the single-threaded load generator (pingpong, pipeline, bulk, accept, idle,
//!   short-idle);
//! - `tls_echo_tokio`, `tls_loadgen`, `tls_state`: the TLS echo peer on tokio-rustls, the
//!   rustls client that loads TLS echo servers, and the in-memory measure of rustls's own
//!   per-connection state;
//! - `bench-all`: runs every scenario against every server and writes BENCHMARKS.md.
//!
//! This file holds the few helpers they share: argument parsing, the descriptor limit,
//! the byte pattern the load generator sends and checks, and the TLS configurations.

use std::time::Duration;

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and returns the new soft limit.
/// Children spawned afterwards inherit it.
pub fn raise_nofile_limit() -> Option<u64> {
    let lim = getrlimit(Resource::Nofile);
    if lim.current == lim.maximum {
        return lim.current;
    }
    let new = Rlimit { current: lim.maximum, maximum: lim.maximum };
    match setrlimit(Resource::Nofile, new) {
        Ok(()) => lim.maximum,
        Err(_) => lim.current,
    }
}

/// Minimal `--name value` argument list: flags without values are `--name` alone.
pub struct Args {
    positional: Vec<String>,
    named: Vec<(String, Option<String>)>,
}

impl Args {
    /// Parses the process arguments. `flags` names the options that take no value.
    pub fn parse(flags: &[&str]) -> Args {
        Args::from_iter(std::env::args().skip(1), flags)
    }

    /// Parses the given arguments. `flags` names the options that take no value.
    pub fn from_iter(args: impl IntoIterator<Item = String>, flags: &[&str]) -> Args {
        let mut positional = Vec::new();
        let mut named = Vec::new();
        let mut it = args.into_iter();
        while let Some(a) = it.next() {
            if let Some(name) = a.strip_prefix("--") {
                if let Some((k, v)) = name.split_once('=') {
                    named.push((k.to_string(), Some(v.to_string())));
                } else if flags.contains(&name) {
                    named.push((name.to_string(), None));
                } else {
                    let v = it.next().unwrap_or_else(|| die(&format!("--{name} needs a value")));
                    named.push((name.to_string(), Some(v)));
                }
            } else {
                positional.push(a);
            }
        }
        Args { positional, named }
    }

    /// The positional arguments, in order.
    pub fn positional(&self) -> &[String] {
        &self.positional
    }

    /// Whether the flag `--name` was given.
    pub fn flag(&self, name: &str) -> bool {
        self.named.iter().any(|(k, _)| k == name)
    }

    /// The value of `--name`, the last one if repeated.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.named.iter().rev().find(|(k, _)| k == name).and_then(|(_, v)| v.as_deref())
    }

    /// The value of `--name` parsed as `T`, or `default`; a bad value ends the process.
    pub fn num<T: std::str::FromStr>(&self, name: &str, default: T) -> T {
        match self.get(name) {
            None => default,
            Some(v) => v.parse().unwrap_or_else(|_| die(&format!("bad value for --{name}: {v}"))),
        }
    }

    /// `--name` in seconds (fractions allowed).
    pub fn seconds(&self, name: &str, default: f64) -> Duration {
        let s: f64 = self.num(name, default);
        if !(s.is_finite() && s >= 0.0) {
            die(&format!("bad value for --{name}: {s}"));
        }
        Duration::from_secs_f64(s)
    }
}

/// Prints `message` to stderr and exits with status 1.
pub fn die(message: &str) -> ! {
    eprintln!("{}: {message}", program_name());
    std::process::exit(1)
}

fn program_name() -> String {
    std::env::args()
        .next()
        .and_then(|p| p.rsplit('/').next().map(str::to_string))
        .unwrap_or_else(|| "bench".into())
}

/// The longest slice [`Pattern::at`] hands out.
pub const PATTERN_MAX_SLICE: usize = 256 * 1024;
const PATTERN_PERIOD: usize = 65_521; // prime, so streams of different offsets differ

/// A fixed pseudo-random byte stream of period [`PATTERN_PERIOD`]: byte `i` of a
/// connection's stream is `pattern[(base + i) % period]`. Sending and checking are a
/// slice copy and a `memcmp`, so the load generator spends its time on I/O.
pub struct Pattern {
    bytes: Vec<u8>,
}

impl Default for Pattern {
    fn default() -> Self {
        Pattern::new()
    }
}

impl Pattern {
    /// Builds the pattern (deterministic).
    pub fn new() -> Pattern {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut period = Vec::with_capacity(PATTERN_PERIOD);
        for _ in 0..PATTERN_PERIOD {
            // xorshift64*
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            period.push((x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8);
        }
        let mut bytes = Vec::with_capacity(PATTERN_PERIOD + PATTERN_MAX_SLICE);
        while bytes.len() < PATTERN_PERIOD + PATTERN_MAX_SLICE {
            let take = (PATTERN_PERIOD + PATTERN_MAX_SLICE - bytes.len()).min(PATTERN_PERIOD);
            bytes.extend_from_slice(&period[..take]);
        }
        Pattern { bytes }
    }

    /// The `len` bytes of the stream starting at `offset` (`len` ≤ [`PATTERN_MAX_SLICE`]).
    pub fn at(&self, offset: u64, len: usize) -> &[u8] {
        assert!(len <= PATTERN_MAX_SLICE);
        let start = (offset % PATTERN_PERIOD as u64) as usize;
        &self.bytes[start..start + len]
    }

    /// The stream base of connection `id`, so connections carry different bytes.
    pub fn base(id: u64) -> u64 {
        id.wrapping_mul(7_919) % PATTERN_PERIOD as u64
    }
}

/// The TLS settings every TLS peer and client here uses, so they differ from braid's own in
/// nothing that costs CPU: rustls with the `ring` provider, TLS 1.2 and 1.3, resumption as
/// rustls has it by default.
pub mod tls {
    use std::path::Path;
    use std::sync::Arc;

    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    /// The `ring` provider, named rather than taken from the process default (as braid does).
    pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    /// Where [`write_identity`] put a test CA, a leaf it signed for `localhost` and 127.0.0.1,
    /// and the leaf's key.
    pub struct Files {
        /// The CA certificate, which clients trust.
        pub ca: std::path::PathBuf,
        /// The server's certificate (leaf only).
        pub cert: std::path::PathBuf,
        /// The server's private key (PKCS#8).
        pub key: std::path::PathBuf,
    }

    /// Makes a fresh CA and a leaf certificate (ECDSA P-256, rcgen's default) into `dir`:
    /// test keys are made at run time, never kept.
    pub fn write_identity(dir: &Path) -> Result<Files, String> {
        let err = |e: rcgen::Error| format!("making the test certificate: {e}");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(err)?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(rcgen::DnType::CommonName, "braid bench CA");
        let ca_key = rcgen::KeyPair::generate().map_err(err)?;
        let ca_cert = ca_params.self_signed(&ca_key).map_err(err)?;
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let leaf_params =
            rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .map_err(err)?;
        let leaf_key = rcgen::KeyPair::generate().map_err(err)?;
        let leaf = leaf_params.signed_by(&leaf_key, &issuer).map_err(err)?;
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let files = Files { ca: dir.join("ca.pem"), cert: dir.join("cert.pem"), key: dir.join("key.pem") };
        for (path, text) in
            [(&files.ca, ca_cert.pem()), (&files.cert, leaf.pem()), (&files.key, leaf_key.serialize_pem())]
        {
            std::fs::write(path, text).map_err(|e| format!("writing {}: {e}", path.display()))?;
        }
        Ok(files)
    }

    /// The certificates in the PEM file at `path`.
    pub fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
        let certs: Result<Vec<_>, _> =
            CertificateDer::pem_file_iter(path).map_err(|e| format!("{}: {e}", path.display()))?.collect();
        let certs = certs.map_err(|e| format!("{}: {e}", path.display()))?;
        if certs.is_empty() {
            return Err(format!("{}: no certificate in it", path.display()));
        }
        Ok(certs)
    }

    /// A server configuration for the certificate and key in these PEM files, built as braid's
    /// `ServerConfig::build` builds it (versions, provider, resumption defaults).
    pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, String> {
        let chain = certs(cert)?;
        let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| e.to_string())?;
        Ok(Arc::new(config))
    }

    /// A client trusting the CA in the PEM file `ca`. With `resume` it keeps session tickets in
    /// memory and offers them on later connections (rustls's default); without, it never
    /// resumes, so every handshake is a full one.
    pub fn client_config(ca: &Path, resume: bool) -> Result<Arc<rustls::ClientConfig>, String> {
        let mut roots = rustls::RootCertStore::empty();
        for c in certs(ca)? {
            roots.add(c).map_err(|e| format!("{}: {e}", ca.display()))?;
        }
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        if !resume {
            config.resumption = rustls::client::Resumption::disabled();
        }
        Ok(Arc::new(config))
    }
}

/// Holding a server to a share of one CPU with a cgroup CPU quota, so that the server and not
/// the load generator sets the pace. A rustls client does about as much work per handshake as a
/// rustls server, so on two CPUs a one-thread load generator cannot keep a whole-CPU server busy;
/// with the server held to part of its CPU, its handshakes/s measure the server.
///
/// It needs write access to the cgroup file system (root). On cgroup v2 it enables the `cpu`
/// controller for the root group's children if it is not already (systemd usually has), and that
/// setting outlives the run; the group it makes is removed at the end.
pub mod quota {
    use std::path::{Path, PathBuf};

    /// The scheduling period the quota is spread over. Short, so a throttled server stalls for
    /// a few milliseconds at a time rather than for most of a default 100 ms period.
    pub const PERIOD_US: u64 = 10_000;

    /// A cgroup of its own with a CPU quota; removed when dropped (its processes must have
    /// exited by then).
    pub struct CpuQuota {
        dir: PathBuf,
    }

    /// The quota in µs per [`PERIOD_US`] for `share` of one CPU (at least the kernel's 1 ms).
    pub fn quota_us(share: f64) -> u64 {
        ((share * PERIOD_US as f64).round() as u64).clamp(1_000, PERIOD_US)
    }

    impl CpuQuota {
        /// A new cgroup named `name` that lets its processes use `share` (0–1] of one CPU:
        /// `cpu.max` on cgroup v2, `cpu.cfs_quota_us` under the v1 `cpu` controller. Errors say
        /// which file refused, so a run can say why it could not hold the server.
        pub fn create(name: &str, share: f64) -> Result<CpuQuota, String> {
            let root = Path::new("/sys/fs/cgroup");
            let quota = quota_us(share);
            let v2 = root.join("cgroup.controllers");
            let v1 = root.join("cpu");
            let dir = if std::fs::read_to_string(&v2).is_ok_and(|c| c.split_whitespace().any(|x| x == "cpu"))
            {
                let _ = std::fs::write(root.join("cgroup.subtree_control"), "+cpu");
                let dir = root.join(name);
                make_dir(&dir)?;
                write(&dir.join("cpu.max"), &format!("{quota} {PERIOD_US}"))?;
                dir
            } else if v1.join("cpu.cfs_quota_us").exists() {
                let dir = v1.join(name);
                make_dir(&dir)?;
                write(&dir.join("cpu.cfs_period_us"), &PERIOD_US.to_string())?;
                write(&dir.join("cpu.cfs_quota_us"), &quota.to_string())?;
                dir
            } else {
                return Err("no cgroup CPU controller under /sys/fs/cgroup (v2 cpu.max or v1 cpu/)".into());
            };
            Ok(CpuQuota { dir })
        }

        /// Moves process `pid` (all its threads, and the children it makes later) into the group.
        pub fn add(&self, pid: u32) -> Result<(), String> {
            write(&self.dir.join("cgroup.procs"), &pid.to_string())
        }
    }

    impl Drop for CpuQuota {
        fn drop(&mut self) {
            // The kernel removes an empty group on rmdir; a process that outlived the run
            // keeps it, and it is harmless.
            let _ = std::fs::remove_dir(&self.dir);
        }
    }

    fn make_dir(dir: &Path) -> Result<(), String> {
        match std::fs::create_dir(dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(format!("creating {}: {e}", dir.display())),
        }
    }

    fn write(path: &Path, text: &str) -> Result<(), String> {
        std::fs::write(path, text).map_err(|e| format!("writing {text:?} to {}: {e}", path.display()))
    }
}

/// What the side benchmarks (`portforward`, `web`) share: finding the
/// other binaries, pinning, starting a server and reading its CPU time.
pub mod side {
    use std::io::{BufRead, BufReader};
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    use super::die;

    /// The directory the running binary is in (the other benches are too).
    pub fn bin_dir() -> PathBuf {
        std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
            .unwrap_or_else(|| "target/release".into())
    }

    /// `exe` under `taskset`, on CPU `cpu` only.
    pub fn pinned(cpu: u32, exe: &Path) -> Command {
        let mut c = Command::new("taskset");
        c.arg("-c").arg(cpu.to_string()).arg(exe);
        c
    }

    /// Starts `cmd` and waits for its "listening on ADDR" line.
    pub fn start(mut cmd: Command, what: &str) -> (Child, String) {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| die(&format!("starting {what}: {e}")));
        let (tx, rx) = std::sync::mpsc::channel();
        for r in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(r).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(line) = rx.recv_timeout(Duration::from_millis(50)) {
                if let Some(rest) = line.split("listening on ").nth(1) {
                    let addr = rest.split_whitespace().next().unwrap_or("").to_string();
                    // Keep draining so the process never blocks on its output.
                    std::thread::spawn(move || while rx.recv().is_ok() {});
                    return (child, addr);
                }
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        die(&format!("{what} did not say where it listens"))
    }

    /// The run time of every thread of `pid` so far, in ns (schedstat).
    pub fn cpu_ns(pid: u32) -> f64 {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0.0 };
        tasks
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
            .filter_map(|s| s.split_whitespace().next()?.parse::<f64>().ok())
            .sum()
    }

    /// The middle value (the upper one of an even count).
    pub fn median(mut v: Vec<f64>) -> f64 {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_periodic_and_slices_agree() {
        let p = Pattern::new();
        let a = p.at(10, 1000).to_vec();
        let b = p.at(10 + PATTERN_PERIOD as u64, 1000);
        assert_eq!(&a[..], b);
        assert_eq!(p.at(PATTERN_PERIOD as u64 - 5, 10)[5..], p.at(0, 5)[..]);
        assert_ne!(p.at(0, 64), p.at(Pattern::base(1), 64));
    }

    #[test]
    fn args_parse() {
        let a = Args::from_iter(
            ["pipeline", "--addr", "x:1", "--quick", "--seconds=2"].map(String::from),
            &["quick"],
        );
        assert_eq!(a.positional(), ["pipeline"]);
        assert_eq!(a.get("addr"), Some("x:1"));
        assert!(a.flag("quick"));
        assert_eq!(a.num("seconds", 0.0), 2.0);
        assert_eq!(a.num("conns", 7u32), 7);
    }

    #[test]
    fn a_quota_is_its_share_of_the_period_and_never_below_the_kernels_minimum() {
        assert_eq!(quota::quota_us(0.4), 4_000);
        assert_eq!(quota::quota_us(1.0), quota::PERIOD_US);
        assert_eq!(quota::quota_us(0.01), 1_000);
        assert_eq!(quota::quota_us(3.0), quota::PERIOD_US);
    }
}
