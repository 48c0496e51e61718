//! Child processes (Twisted reference §2.2, §4.4, §4.12): spawning, the
//! order of a ProcessProtocol's calls, pipes and descriptor maps, exit
//! reasons, reaping per child, pseudo-terminals. Each test on every backend.

mod common;

use std::cell::RefCell;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::time::{Duration, Instant};

use braid::process::{ChildFd, Command, ProcessProtocol, ProcessTransport};
use braid::transport::Producer;
use braid::{Error, Failure, Reactor};
use common::capture_logs;

#[derive(Debug, Clone, PartialEq)]
enum Ev {
    Made,
    Data(i32, Vec<u8>),
    Lost(i32),
    Exited(String),
    Ended(String),
}

type Log = Rc<RefCell<Vec<Ev>>>;
type OnMade = Option<Box<dyn FnMut(&ProcessTransport)>>;

/// Records every call; optionally runs a hook when made.
#[derive(Default)]
struct Rec {
    log: Log,
    transport: Option<ProcessTransport>,
    on_made: OnMade,
    panic_on_exit: bool,
}

fn why(f: &Failure) -> String {
    match f.braid_error() {
        Some(Error::ProcessDone) => "done".into(),
        Some(Error::ProcessTerminated { exit_code: Some(c), .. }) => format!("exit {c}"),
        Some(Error::ProcessTerminated { signal: Some(s), .. }) => format!("signal {s}"),
        _ => format!("other: {f}"),
    }
}

impl ProcessProtocol for Rec {
    fn connection_made(&mut self, t: ProcessTransport) {
        self.log.borrow_mut().push(Ev::Made);
        if let Some(f) = self.on_made.as_mut() {
            f(&t);
        }
        self.transport = Some(t);
    }
    fn child_data_received(&mut self, fd: i32, data: &[u8]) {
        let mut log = self.log.borrow_mut();
        // Coalesce consecutive output on one descriptor: how the child's
        // writes are split into reads is not part of the behaviour.
        if let Some(Ev::Data(last, bytes)) = log.last_mut() {
            if *last == fd {
                bytes.extend_from_slice(data);
                return;
            }
        }
        log.push(Ev::Data(fd, data.to_vec()));
    }
    fn child_connection_lost(&mut self, fd: i32) {
        self.log.borrow_mut().push(Ev::Lost(fd));
    }
    fn process_exited(&mut self, reason: Failure) {
        self.log.borrow_mut().push(Ev::Exited(why(&reason)));
        if self.panic_on_exit {
            panic!("process_exited blew up");
        }
    }
    fn process_ended(&mut self, reason: Failure) {
        self.log.borrow_mut().push(Ev::Ended(why(&reason)));
    }
}

fn rec() -> (Rec, Log) {
    let r = Rec::default();
    let log = r.log.clone();
    (r, log)
}

fn ended(log: &Log) -> bool {
    log.borrow().iter().any(|e| matches!(e, Ev::Ended(_)))
}

fn output(log: &Log, fd: i32) -> Vec<u8> {
    log.borrow()
        .iter()
        .filter_map(|e| match e {
            Ev::Data(f, d) if *f == fd => Some(d.clone()),
            _ => None,
        })
        .flatten()
        .collect()
}

fn run_until(r: &Reactor, done: impl Fn() -> bool) {
    let deadline = Instant::now() + common::WATCHDOG;
    while !done() {
        assert!(Instant::now() < deadline, "watchdog: the condition never held");
        r.iterate(Some(Duration::from_millis(5))).expect("iterate");
    }
}

fn sh(script: &str) -> Command {
    Command::new("/bin/sh").args(["-c", script])
}

fn run_to_end(r: &Reactor, command: &Command) -> Log {
    let (p, log) = rec();
    r.spawn_process(p, command).expect("spawn");
    let l = log.clone();
    run_until(r, move || ended(&l));
    log
}

// §2.2 / §4.12 items 11, 12: stdout and stderr apart; each descriptor's
// loss once; processExited, then processEnded last with the exit code.
reactor_test!(
    fn outputs_losses_and_the_exit_code(r) {
        let log = run_to_end(&r, &sh("echo out; echo err >&2; exit 3"));
        assert_eq!(output(&log, 1), b"out\n");
        assert_eq!(output(&log, 2), b"err\n");
        let events = log.borrow().clone();
        assert_eq!(events.first(), Some(&Ev::Made));
        for fd in 0..3 {
            assert_eq!(events.iter().filter(|e| **e == Ev::Lost(fd)).count(), 1, "fd {fd}: {events:?}");
        }
        let exited = events.iter().position(|e| *e == Ev::Exited("exit 3".into())).expect("process_exited");
        assert_eq!(events.last(), Some(&Ev::Ended("exit 3".into())), "{events:?}");
        assert!(exited < events.len() - 1);
    }
);

// §4.12 item 2: write and write_sequence reach stdin; close_stdin is EOF
// after what was written; exit 0 is ProcessDone.
reactor_test!(
    fn stdin_writes_then_eof(r) {
        let (mut p, log) = rec();
        p.on_made = Some(Box::new(|t| {
            t.write(b"hello ");
            t.write_sequence(&[b"from ", b"the ", b"parent"]);
            t.close_stdin();
        }));
        r.spawn_process(p, &Command::new("cat")).unwrap();
        let l = log.clone();
        run_until(&r, move || ended(&l));
        assert_eq!(output(&log, 1), b"hello from the parent");
        assert_eq!(log.borrow().last(), Some(&Ev::Ended("done".into())));
    }
);

// §4.12 item 2: write_to_child reaches another mapped descriptor (an extra
// pipe as fd 3); an unmapped one is an error.
reactor_test!(
    fn an_extra_pipe_and_write_to_child(r) {
        let (mut p, log) = rec();
        p.on_made = Some(Box::new(|t| {
            t.write_to_child(3, b"through fd 3").unwrap();
            t.close_child_fd(3);
            match t.write_to_child(5, b"x") {
                Err(Error::NoSuchChildFd(5)) => {}
                other => panic!("an unmapped fd: {other:?}"),
            }
            match t.write_to_child(1, b"x") {
                Err(Error::NoSuchChildFd(1)) => {}
                other => panic!("a read end: {other:?}"),
            }
        }));
        let cmd = sh("cat <&3").child_fds([(0, ChildFd::ToChild), (1, ChildFd::FromChild), (3, ChildFd::ToChild)]);
        r.spawn_process(p, &cmd).unwrap();
        let l = log.clone();
        run_until(&r, move || ended(&l));
        assert_eq!(output(&log, 1), b"through fd 3");
        assert!(log.borrow().contains(&Ev::Lost(3)));
    }
);

// Backpressure: a child that reads slowly pauses a producer writing MiBs
// to its stdin, the buffer stays bounded, and every byte arrives.
reactor_test!(
    fn stdin_backpressure(r) {
        struct Feed {
            t: RefCell<Option<ProcessTransport>>,
            left: RefCell<usize>,
            paused: RefCell<bool>,
            pauses: RefCell<u32>,
            peak: RefCell<usize>,
        }
        impl Feed {
            fn pump(&self) {
                let t = self.t.borrow().clone().unwrap();
                while !*self.paused.borrow() && *self.left.borrow() > 0 {
                    let n = (*self.left.borrow()).min(64 * 1024);
                    t.write(&vec![b'x'; n]);
                    *self.left.borrow_mut() -= n;
                    let b = t.buffered();
                    let mut peak = self.peak.borrow_mut();
                    *peak = (*peak).max(b);
                }
                if *self.left.borrow() == 0 {
                    t.unregister_producer();
                    t.close_stdin();
                }
            }
        }
        impl Producer for Feed {
            fn pause_producing(&self) {
                *self.paused.borrow_mut() = true;
                *self.pauses.borrow_mut() += 1;
            }
            fn resume_producing(&self) {
                *self.paused.borrow_mut() = false;
                self.pump();
            }
            fn stop_producing(&self) {}
        }
        const TOTAL: usize = 8 << 20;
        let feed = Rc::new(Feed {
            t: RefCell::new(None),
            left: RefCell::new(TOTAL),
            paused: RefCell::new(false),
            pauses: RefCell::new(0),
            peak: RefCell::new(0),
        });
        let (mut p, log) = rec();
        let f = feed.clone();
        p.on_made = Some(Box::new(move |t| {
            *f.t.borrow_mut() = Some(t.clone());
            t.register_producer(f.clone(), true).unwrap();
        }));
        // The feed starts from the loop, not inside connection_made.
        let t = r.spawn_process(p, &sh("sleep 0.3; wc -c")).unwrap();
        let f = feed.clone();
        r.call_later(Duration::ZERO, move || f.pump());
        let l = log.clone();
        run_until(&r, move || ended(&l));
        drop(t);
        assert_eq!(String::from_utf8_lossy(&output(&log, 1)).trim(), TOTAL.to_string());
        assert!(*feed.pauses.borrow() > 0, "the producer was never paused");
        assert!(*feed.peak.borrow() <= 2 << 20, "stdin's buffer grew to {} bytes", feed.peak.borrow());
    }
);

// §4.12 item 4, and signal_process after the exit.
reactor_test!(
    fn a_signal_is_in_the_reason(r) {
        let (p, log) = rec();
        let t = r.spawn_process(p, &Command::new("sleep").arg("30")).unwrap();
        assert!(t.pid().is_some());
        t.signal_process("KILL").unwrap();
        let l = log.clone();
        run_until(&r, move || ended(&l));
        assert!(log.borrow().contains(&Ev::Exited("signal 9".into())), "{:?}", log.borrow());
        match t.signal_process("TERM") {
            Err(Error::ProcessExitedAlready) => {}
            other => panic!("signal after exit: {other:?}"),
        }
        assert_eq!(t.pid(), None, "pid is valid only until process_ended");
        let (p, log) = rec();
        let t = r.spawn_process(p, &Command::new("sleep").arg("30")).unwrap();
        t.signal_process(15).unwrap();
        let l = log.clone();
        run_until(&r, move || ended(&l));
        assert!(log.borrow().contains(&Ev::Exited("signal 15".into())));
        assert!(t.signal_process("NOSUCHSIG").is_err());
    }
);

// §4.12 item 13: process_exited comes at the exit even while a grandchild
// holds stdout; process_ended waits for that pipe.
reactor_test!(
    fn exited_before_a_grandchild_lets_go(r) {
        let log = run_to_end(&r, &sh("(sleep 0.5; echo late) & exit 0"));
        let events = log.borrow().clone();
        let exited = events.iter().position(|e| *e == Ev::Exited("done".into())).unwrap();
        let out_lost = events.iter().position(|e| *e == Ev::Lost(1)).unwrap();
        assert!(exited < out_lost, "exit was held back until stdout closed: {events:?}");
        assert_eq!(output(&log, 1), b"late\n");
        assert_eq!(events.last(), Some(&Ev::Ended("done".into())));
    }
);

// §4.12 item 6: the child sees only its mapped descriptors, even where
// the parent has descriptors without close-on-exec.
reactor_test!(
    fn the_child_gets_only_its_descriptors(r) {
        let leaky = std::fs::File::open("/dev/null").unwrap();
        rustix::io::fcntl_setfd(&leaky, rustix::io::FdFlags::empty()).unwrap();
        let (p, log) = rec();
        let t = r.spawn_process(p, &Command::new("sleep").arg("30")).unwrap();
        let pid = t.pid().unwrap();
        // Right after exec the dynamic loader may hold a library open for a
        // moment; what was inherited stays. Wait (boundedly) for 0, 1, 2.
        let deadline = Instant::now() + Duration::from_secs(5);
        let fds = loop {
            let mut fds: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/fd"))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().parse().unwrap())
                .collect();
            fds.sort();
            if fds == [0, 1, 2] || Instant::now() > deadline {
                break fds;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(fds, vec![0, 1, 2], "the child has other descriptors (fd {} leaked?)", leaky.as_raw_fd());
        t.signal_process("KILL").unwrap();
        let l = log.clone();
        run_until(&r, move || ended(&l));
    }
);

// §4.12 item 18 and `path`: the environment is empty unless given or
// inherited; the working directory is set.
reactor_test!(
    fn environment_and_working_directory(r) {
        let log = run_to_end(&r, &Command::new("/usr/bin/env"));
        assert_eq!(output(&log, 1), b"", "the default environment is empty (Twisted's)");
        let log = run_to_end(&r, &Command::new("/usr/bin/env").env("FOO", "bar").env("EMPTY", ""));
        assert_eq!(output(&log, 1), b"FOO=bar\nEMPTY=\n");
        let log = run_to_end(&r, &Command::new("/usr/bin/env").inherit_env().env("BRAID_EXTRA", "1"));
        let out = String::from_utf8(output(&log, 1)).unwrap();
        assert!(out.contains("PATH="), "the parent's environment was not inherited: {out}");
        assert!(out.lines().any(|l| l == "BRAID_EXTRA=1"));
        let log = run_to_end(&r, &Command::new("/bin/pwd").current_dir("/tmp"));
        assert_eq!(output(&log, 1), b"/tmp\n");
    }
);

// §4.12 item 16: arguments reach the child exactly.
reactor_test!(
    fn arguments_arrive_exactly(r) {
        let args = ["a b", "", "ü", "$HOME", "--x=\"y\"", "\\n"];
        let log = run_to_end(&r, &Command::new("printf").arg("[%s]\n").args(args));
        let want: String = args.iter().map(|a| format!("[{a}]\n")).collect();
        assert_eq!(String::from_utf8(output(&log, 1)).unwrap(), want);
        let log = run_to_end(&r, &sh("echo \"$0\"").arg("my-name"));
        assert_eq!(output(&log, 1), b"my-name\n");
    }
);

// A program that is missing or cannot be executed is an error from the
// call itself, naming it; the protocol hears the same in process_ended,
// its only call (never connected).
reactor_test!(
    fn missing_and_unexecutable_programs(r) {
        let (p, log) = rec();
        match r.spawn_process(p, &Command::new("braid-no-such-program")) {
            Err(Error::SpawnFailed { program, .. }) => assert_eq!(program, "braid-no-such-program"),
            other => panic!("{other:?}"),
        }
        let told = log.borrow().clone();
        assert!(
            matches!(&told[..], [Ev::Ended(w)] if w.contains("cannot run \"braid-no-such-program\"")),
            "{told:?}"
        );
        let (p, _) = rec();
        match r.spawn_process(p, &Command::new("/nonexistent/dir/prog")) {
            Err(e @ Error::SpawnFailed { .. }) => assert!(e.to_string().contains("/nonexistent/dir/prog"), "{e}"),
            other => panic!("{other:?}"),
        }
        let file = std::env::temp_dir().join(format!("braid-noexec-{}-{:?}", std::process::id(), std::thread::current().id()));
        std::fs::write(&file, "#!/bin/sh\necho hi\n").unwrap();
        let (p, log) = rec();
        match r.spawn_process(p, &Command::new(&file)) {
            Err(Error::SpawnFailed { source, .. }) => {
                assert_eq!(source.kind(), std::io::ErrorKind::PermissionDenied, "{source}")
            }
            other => panic!("exec of a non-executable file: {other:?}"),
        }
        assert!(matches!(&log.borrow()[..], [Ev::Ended(w)] if w.contains("ermission denied")), "{:?}", log.borrow());
        // §4.12 item 14: a #! script runs through its interpreter.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o755)).unwrap();
        let log = run_to_end(&r, &Command::new(&file));
        assert_eq!(output(&log, 1), b"hi\n");
        let _ = std::fs::remove_file(&file);
    }
);

// §4.12 item 9: uid and gid (the tests run as root, as in CI).
reactor_test!(
    fn uid_and_gid(r) {
        assert_eq!(rustix::process::geteuid().as_raw(), 0, "this test needs root (CI runs as root)");
        let log = run_to_end(&r, &sh("id -u; id -g; id -G").uid(65534).gid(65534));
        assert_eq!(output(&log, 1), b"65534\n65534\n65534\n");
    }
);

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

// 200 short-lived children in a row: each ends, none is left a zombie,
// and no descriptor leaks.
reactor_test!(
    fn many_short_children_leave_nothing_behind(r) {
        let before = open_fds();
        let mut pids = Vec::new();
        for _ in 0..200 {
            let (p, log) = rec();
            let t = r.spawn_process(p, &Command::new("/bin/true")).unwrap();
            pids.push(t.pid().unwrap());
            let l = log.clone();
            run_until(&r, move || ended(&l));
        }
        for pid in pids {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            assert!(!stat.contains(") Z "), "process {pid} is a zombie: {stat}");
        }
        // Other tests run in this process at the same time and hold a few
        // descriptors each; a leak of even one per child would show as 200.
        assert!(open_fds() < before + 50, "descriptors leaked: {before} before, {} after", open_fds());
    }
);

// A child spawned by other code is never reaped by braid.
reactor_test!(
    fn other_code_keeps_its_children(r) {
        let mut theirs = std::process::Command::new("/bin/sh").args(["-c", "exit 7"]).spawn().unwrap();
        let log = run_to_end(&r, &sh("sleep 0.2"));
        assert_eq!(log.borrow().last(), Some(&Ev::Ended("done".into())));
        let status = theirs.wait().expect("our own child was reaped by braid");
        assert_eq!(status.code(), Some(7));
    }
);

// §4.12 item 3: a child that exits before the reactor runs is still reaped.
reactor_test!(
    fn an_early_exit_is_reaped(r) {
        let (p, log) = rec();
        r.spawn_process(p, &Command::new("/bin/true")).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let l = log.clone();
        run_until(&r, move || ended(&l));
        assert_eq!(log.borrow().last(), Some(&Ev::Ended("done".into())));
    }
);

// §4.12 item 10: a panic in process_exited is logged; the reactor and the
// rest of the protocol's calls go on.
reactor_test!(
    fn a_panic_in_process_exited_is_contained(r) {
        let ((), logs) = capture_logs(|| {
            let (mut p, log) = rec();
            p.panic_on_exit = true;
            r.spawn_process(p, &Command::new("/bin/true")).unwrap();
            let l = log.clone();
            run_until(&r, move || ended(&l));
        });
        assert!(logs.contains("process_exited blew up"), "{logs}");
        assert!(logs.contains("in process_exited for process"), "{logs}");
    }
);

// §4.12 item 15: pausing and resuming the child's output loses nothing.
reactor_test!(
    fn pause_and_resume_lose_nothing(r) {
        let (p, log) = rec();
        let t = r.spawn_process(p, &Command::new("seq").args(["1", "200000"])).unwrap();
        let deadline = Instant::now() + common::WATCHDOG;
        let mut paused = false;
        while !ended(&log) {
            assert!(Instant::now() < deadline);
            if paused {
                t.resume_producing();
            } else {
                t.pause_producing();
            }
            paused = !paused;
            r.iterate(Some(Duration::from_millis(2))).unwrap();
        }
        let want: String = (1..=200_000).map(|i| format!("{i}\n")).collect();
        assert!(output(&log, 1) == want.as_bytes(), "output lost or reordered");
    }
);

// §4.12 items 1-2 for PTYs: the child has a terminal; writes to the master
// reach it; the window size is set.
reactor_test!(
    fn a_pseudo_terminal(r) {
        let (mut p, log) = rec();
        p.on_made = Some(Box::new(|t| {
            t.set_window_size(40, 100).unwrap();
            t.write(b"typed\n");
        }));
        // The window size is set right after the spawn: the child looks at
        // it only after the input, which is written after that.
        let cmd = sh("read x; tty; stty size; echo got:$x").pty(true);
        r.spawn_process(p, &cmd).unwrap();
        let l = log.clone();
        run_until(&r, move || ended(&l));
        let out = String::from_utf8_lossy(&output(&log, 1)).into_owned();
        assert!(out.contains("/dev/pts/"), "tty says: {out}");
        assert!(out.contains("40 100"), "stty size says: {out}");
        assert!(out.contains("got:typed"), "{out}");
        let (p, _) = rec();
        let t = r.spawn_process(p, &Command::new("/bin/true")).unwrap();
        assert!(t.set_window_size(1, 1).is_err(), "a window size for a child without a terminal");
    }
);

// The fallback reaper (no pidfd: SIGCHLD hook plus a poll timer), in a
// child process where BRAID_PIDFD=off.
#[test]
fn the_fallback_reaper_works_without_pidfds() {
    if common::is_child() {
        std::env::set_var("BRAID_PIDFD", "off");
        for backend in braid::Backend::ALL.iter().copied() {
            let r = common::build(backend);
            let mut theirs = std::process::Command::new("/bin/sh").args(["-c", "exit 4"]).spawn().unwrap();
            let log = run_to_end(&r, &sh("exit 5"));
            assert_eq!(log.borrow().last(), Some(&Ev::Ended("exit 5".into())));
            assert_eq!(theirs.wait().unwrap().code(), Some(4));
        }
        return;
    }
    common::in_child("the_fallback_reaper_works_without_pidfds", "1");
}

// A reactor dropped while its child runs leaves the child running (as
// Twisted does); the pipes close, so the child sees EOF on stdin.
reactor_test!(
    fn dropping_the_reactor_leaves_children_running(r) {
        let (p, _log) = rec();
        let t = r.spawn_process(p, &Command::new("sleep").arg("30")).unwrap();
        let pid = t.pid().unwrap();
        drop(t);
        drop(r);
        let alive = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(!alive.is_empty() && !alive.contains(") Z "), "the child did not survive: {alive:?}");
        let pid = rustix::process::Pid::from_raw(pid).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::KILL).unwrap();
        rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::empty()).unwrap();
    }
);

/// Both ways of spawning (posix_spawn and fork+exec) must behave alike
/// (Twisted's item 18 runs its environment tests for both): every other
/// test in this file runs again, in a child test process, with
/// BRAID_SPAWN=fork.
#[test]
fn every_process_test_also_passes_when_forking() {
    if std::env::var_os("BRAID_SPAWN").is_some() {
        // This is the copy inside that child run: the parent checks it.
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(exe)
        .args(["--skip", "every_process_test_also_passes_when_forking", "--test-threads=2"])
        .env("BRAID_SPAWN", "fork")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "with BRAID_SPAWN=fork:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let passed: usize = stdout
        .lines()
        .find_map(|l| l.strip_prefix("test result: ok. ")?.split(' ').next()?.parse().ok())
        .expect("a test summary");
    assert!(passed >= 50, "only {passed} tests ran with BRAID_SPAWN=fork:\n{stdout}");
}

// close_stdout closes our end: the child's next write gets SIGPIPE; the
// other descriptors stay open until they end on their own.
reactor_test!(
    fn close_stdout_and_lose_connection(r) {
        let (mut p, log) = rec();
        p.on_made = Some(Box::new(|t| t.close_stdout()));
        let cmd = sh("sleep 0.2; while true; do echo more; done");
        r.spawn_process(p, &cmd).unwrap();
        let l = log.clone();
        run_until(&r, move || ended(&l));
        let events = log.borrow().clone();
        assert_eq!(events[1], Ev::Lost(1), "{events:?}");
        assert!(events.contains(&Ev::Exited("signal 13".into())), "{events:?}");
        // lose_connection closes all three: `cat` sees EOF and exits 0.
        let (mut p, log) = rec();
        p.on_made = Some(Box::new(|t| t.lose_connection()));
        r.spawn_process(p, &Command::new("cat")).unwrap();
        let l = log.clone();
        run_until(&r, move || ended(&l));
        for fd in 0..3 {
            assert!(log.borrow().contains(&Ev::Lost(fd)), "{:?}", log.borrow());
        }
    }
);
