//! io_uring: the completion backend (Linux), Twisted's IOCP reactor in
//! spirit.
//!
//! A ring is a pair of queues shared with the kernel: the reactor writes
//! requests into the submission queue and one `io_uring_enter` both hands
//! them over and waits for completions, which the kernel writes into the
//! completion queue. This folder holds all of it:
//!
//! * [`probe`] (this file) builds the ring with the best setup the kernel
//!   accepts and checks, once, that every opcode and feature braid uses is
//!   there. Anything missing is an error that names it, never a silent
//!   fallback: `Reactor::new(Backend::IoUring)` fails with
//!   `Error::BackendUnavailable`, and the default backend stays epoll.
//! * [`poller`] watches descriptors with poll requests on the ring, which is
//!   how the reactor's FD set (`add_reader`, `add_writer`) and every
//!   readiness-driven transport run on this backend; it also carries the
//!   stream requests below and routes their completions by key.
//! * [`recv`]: multishot receives (and accepts) into one shared ring of
//!   provided buffers, lent to the reader for one call.
//! * [`send`]: stream sends, one per socket in the kernel, whose memory the
//!   poller holds until the completion.
//!
//! # Kernel requirements
//!
//! * **Linux 5.11** at least: poll requests (5.1), `IORING_FEAT_NODROP`
//!   (5.5: a full completion queue is never lost), and extended-argument
//!   waits (`IORING_FEAT_EXT_ARG`, 5.11), which give the wait a nanosecond
//!   timeout, so timers need no timeout request on the ring.
//! * **Linux 5.19**: `IORING_SETUP_COOP_TASKRUN`, so the kernel does not
//!   interrupt the reactor's thread to post completions; they are posted
//!   when it next enters the kernel, which it does to wait anyway.
//! * **Linux 6.0**: stream sockets by completion: multishot accept (5.19),
//!   provided-buffer rings (5.19) and multishot `recv`/`recvmsg` (6.0).
//!   On an older kernel streams use the poll requests above, which work
//!   everywhere the probe passes.
//! * **Linux 6.1**: `IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN`:
//!   the kernel's completion work runs only inside the reactor's own wait,
//!   batched, instead of at arbitrary points. The reactor is bound to one
//!   thread (it is `!Send`), so the single-issuer promise always holds.
//! * **Linux 6.15**: `IORING_ENTER_NO_IOWAIT`. Without it, a task waiting on
//!   a ring with requests in flight is counted as waiting for I/O, so an
//!   idle server (its receives and accept are always in flight) shows its
//!   CPU as 100% iowait, not idle, and the CPU governors treat it as busy.
//!   Where the kernel has the flag every wait passes it; before 6.15 the
//!   idle time of the reactor's CPU is reported as iowait, and nothing in
//!   user space can change that.
//!
//! The newest setup the kernel takes is used; [`Probe::setup`] says which.
//! A seccomp filter that refuses `io_uring_setup` (Docker's default profile
//! does) shows up as the first failure and is reported as such.

use std::fmt;
use std::io;

use io_uring::{opcode, IoUring, Probe as OpProbe};

pub(crate) mod poller;
pub(crate) mod recv;
pub(crate) mod send;

/// Submission queue entries. The completion queue is sized separately
/// (see [`CQ_ENTRIES`]); a full submission queue is simply submitted early.
const SQ_ENTRIES: u32 = 256;

/// Completion queue entries: one per ready descriptor per wait, so this
/// bounds the events one wait hands out; more wait in the kernel's overflow
/// list (`IORING_FEAT_NODROP`) for the next wait.
const CQ_ENTRIES: u32 = 4096;

/// The ring setups braid tries, best first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Setup {
    /// `SINGLE_ISSUER | DEFER_TASKRUN` (Linux 6.1+).
    DeferTaskrun,
    /// `COOP_TASKRUN` (Linux 5.19+).
    CoopTaskrun,
    /// No setup flags beyond the completion queue size.
    Plain,
}

impl Setup {
    const ALL: [Setup; 3] = [Setup::DeferTaskrun, Setup::CoopTaskrun, Setup::Plain];

    fn build(self) -> io::Result<IoUring> {
        let mut b = IoUring::builder();
        b.setup_cqsize(CQ_ENTRIES);
        match self {
            Setup::DeferTaskrun => {
                b.setup_single_issuer().setup_defer_taskrun();
            }
            Setup::CoopTaskrun => {
                b.setup_coop_taskrun();
            }
            Setup::Plain => {}
        }
        b.build(SQ_ENTRIES)
    }

    /// True if completions wait for an enter with `GETEVENTS`.
    pub(crate) fn defers_work(self) -> bool {
        self == Setup::DeferTaskrun
    }
}

/// Why a ring cannot be used here.
#[derive(Debug)]
pub(crate) struct Refused(String);

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A ring that passed the probe, and what it was built with.
pub(crate) struct Probe {
    pub ring: IoUring,
    pub setup: Setup,
}

/// The opcodes the poller sends, with the names used in error messages.
const NEEDED_OPS: &[(u8, &str)] =
    &[(opcode::PollAdd::CODE, "IORING_OP_POLL_ADD"), (opcode::PollRemove::CODE, "IORING_OP_POLL_REMOVE")];

/// Builds a ring with the best setup the kernel takes and checks that it
/// has what braid needs.
pub(crate) fn probe() -> Result<Probe, Refused> {
    let mut first_err = None;
    let mut built = None;
    for setup in Setup::ALL {
        match setup.build() {
            Ok(ring) => {
                built = Some((ring, setup));
                break;
            }
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    let Some((ring, setup)) = built else {
        let e = first_err.unwrap_or_else(|| io::Error::from(io::ErrorKind::Unsupported));
        return Err(Refused(match e.raw_os_error() {
            Some(libc::ENOSYS) => {
                "io_uring_setup is not implemented by this kernel (Linux 5.11+ needed)".into()
            }
            Some(libc::EPERM) => format!(
                "io_uring_setup was refused ({e}): a seccomp filter, or kernel.io_uring_disabled, \
                 forbids io_uring here"
            ),
            _ => format!("io_uring_setup failed: {e}"),
        }));
    };
    let params = ring.params();
    let mut missing = Vec::new();
    if !params.is_feature_nodrop() {
        missing.push("IORING_FEAT_NODROP (Linux 5.5)");
    }
    if !params.is_feature_ext_arg() {
        missing.push("IORING_FEAT_EXT_ARG (Linux 5.11)");
    }
    let mut ops = OpProbe::new();
    match ring.submitter().register_probe(&mut ops) {
        Ok(()) => {
            for &(code, name) in NEEDED_OPS {
                if !ops.is_supported(code) {
                    missing.push(name);
                }
            }
        }
        Err(e) => {
            return Err(Refused(format!("the kernel refused IORING_REGISTER_PROBE ({e}; Linux 5.6+ needed)")))
        }
    }
    if !missing.is_empty() {
        return Err(Refused(format!("this kernel's io_uring lacks {}", missing.join(", "))));
    }
    Ok(Probe { ring, setup })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The machines braid runs its suite on have a modern kernel: the probe
    /// must succeed there, or every io_uring test would be meaningless. A
    /// refusal fails here, loudly, with the reason.
    #[test]
    fn the_probe_succeeds_and_uses_the_best_setup_this_kernel_takes() {
        let probe = probe().unwrap_or_else(|e| panic!("io_uring is not usable on this machine: {e}"));
        for better in Setup::ALL.iter().take_while(|s| **s != probe.setup) {
            assert!(better.build().is_err(), "{better:?} builds, but the probe chose {:?}", probe.setup);
        }
    }
}
