//! Operator experience end to end: `memtrace demo` proves memtrace works on
//! this machine and exits 0, and `memtrace top`, run under tmux against the
//! demo's workload, shows the workers live and answers its keys.
use std::{
    net::SocketAddr,
    process::{Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use memtrace_tests::{
    Proc, SERVER_START, api_get, free_port, memtrace_bin, poll_every, require_root, serial,
    wait_port,
};

const TOKEN: &str = "operator-test-token";
const DEMO_SERVER_NAME: &str = "mt-demo-server";
/// What the shell around `memtrace top` prints, with the status, when it exits.
const EXITED: &str = "memtrace top exited with status";

/// A pipe read to its end on a thread, its text kept as it arrives.
struct Output {
    text: Arc<Mutex<String>>,
    reader: JoinHandle<()>,
}

impl Output {
    fn collect(mut pipe: impl std::io::Read + Send + 'static) -> Self {
        let text = Arc::new(Mutex::new(String::new()));
        let sink = text.clone();
        let reader = thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = pipe.read(&mut buf) {
                sink.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Self { text, reader }
    }

    fn text(&self) -> String {
        self.text.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits for the writer to close the pipe, then returns everything.
    fn finish(self, timeout: Duration) -> String {
        poll_every(timeout, Duration::from_millis(20), || {
            self.reader.is_finished()
        });
        self.text()
    }
}

fn wait_exit(proc: &mut Proc, timeout: Duration) -> Option<ExitStatus> {
    let mut status = None;
    poll_every(timeout, Duration::from_millis(50), || {
        status = proc.child.try_wait().ok().flatten();
        status.is_some()
    });
    status
}

/// Pids the demo printed for its server: the master and every worker.
fn demo_pids(stdout: &str) -> Vec<u32> {
    let mut pids: Vec<u32> = stdout
        .lines()
        .filter_map(|l| {
            let (_, rest) = l
                .split_once("master pid ")
                .or_else(|| l.split_once("] worker "))?;
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// A process of the demo's server still running under this pid.
fn demo_server_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == DEMO_SERVER_NAME)
        && std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            s.rsplit_once(") ")
                .is_some_and(|(_, rest)| !rest.starts_with('Z'))
        })
}

#[test]
fn demo_exits_zero_after_showing_a_detection_and_a_restart() {
    let _serial = serial();
    require_root();
    let started = Instant::now();
    let mut demo = Proc::spawn(
        Command::new(memtrace_bin())
            .args(["demo", "--listen", "off"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    let stdout = Output::collect(demo.child.stdout.take().expect("piped stdout"));
    let stderr = Output::collect(demo.child.stderr.take().expect("piped stderr"));
    let Some(status) = wait_exit(&mut demo, Duration::from_secs(120)) else {
        // SIGTERM first: the demo's own clean-up stops its server.
        demo.stop(Duration::from_secs(20));
        panic!(
            "memtrace demo did not exit within 120 s\nstdout:\n{}\nstderr:\n{}",
            stdout.text(),
            stderr.text()
        );
    };
    let elapsed = started.elapsed();
    let out = stdout.finish(Duration::from_secs(10));
    let err = stderr.finish(Duration::from_secs(10));
    assert!(
        status.success(),
        "memtrace demo exited with {status}\nstdout:\n{out}\nstderr:\n{err}"
    );
    for needle in [
        "LEAK_TREND_DETECTED",
        "SOFT_LIMIT_EXCEEDED",
        "sent to that worker alone",
        "replaced worker",
        "demo complete",
        "cleaned up",
    ] {
        assert!(
            out.contains(needle),
            "{needle:?} missing from the demo's output:\n{out}"
        );
    }
    // It cleaned up: none of the server's processes outlives the demo.
    let pids = demo_pids(&out);
    assert!(pids.len() >= 3, "master and workers not found in:\n{out}");
    let left: Vec<u32> = pids.into_iter().filter(|&p| demo_server_alive(p)).collect();
    assert!(
        left.is_empty(),
        "demo server processes left behind: {left:?}"
    );
    eprintln!("memtrace demo exited 0 after {elapsed:?}");
}

/// The demo running with its API on a port, stopped with SIGTERM (its own
/// clean-up) when dropped; a plain kill would leave its server behind, as
/// the server runs in a process group of its own.
struct Demo {
    proc: Proc,
    stdout: Output,
    addr: SocketAddr,
    status: Option<ExitStatus>,
}

impl Demo {
    fn start(hold_secs: u64) -> Self {
        let port = free_port();
        let mut proc = Proc::spawn(
            Command::new(memtrace_bin())
                .args(["demo", "--listen", &format!("127.0.0.1:{port}")])
                .args(["--hold-secs", &hold_secs.to_string()])
                .env("MEMTRACE_DEBUG_TOKEN", TOKEN)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null()),
        );
        let stdout = Output::collect(proc.child.stdout.take().expect("piped stdout"));
        Self {
            proc,
            stdout,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            status: None,
        }
    }

    fn stop(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.proc.stop(Duration::from_secs(20));
        }
        self.status
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A tmux server of our own (its own socket in a temporary directory, no
/// user configuration), killed with everything in it when dropped.
struct Tmux {
    /// Holds the server's socket; removed, with it, on drop.
    dir: tempfile::TempDir,
}

impl Tmux {
    fn new() -> Self {
        Self {
            dir: tempfile::Builder::new()
                .prefix("memtrace-test-tmux-")
                .tempdir()
                .expect("create a temporary directory"),
        }
    }

    fn socket(&self) -> std::path::PathBuf {
        self.dir.path().join("socket")
    }

    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .arg("-S")
            .arg(self.socket())
            .args(["-f", "/dev/null"])
            .args(args)
            .output()
            .expect("tmux is installed (cargo xtask setup)");
        assert!(
            out.status.success(),
            "tmux {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts `command` in a detached session of a fixed size, under a
    /// shell that then prints its exit status and stays. The status is read
    /// from the screen: with remain-on-exit, tmux 3.3a here now and then
    /// left the exited process unreaped, and `#{pane_dead_status}` empty.
    fn start(&self, session: &str, command: &str) {
        let script = format!("{command}; echo \"{EXITED} $?\"; sleep 600");
        self.run(&[
            "new-session",
            "-d",
            "-s",
            session,
            "-x",
            "200",
            "-y",
            "50",
            "sh",
            "-c",
            &script,
        ]);
    }

    fn capture(&self, session: &str) -> String {
        self.run(&["capture-pane", "-p", "-t", session])
    }

    fn send(&self, session: &str, key: &str) {
        self.run(&["send-keys", "-t", session, key]);
    }

    /// Captures the pane until `cond` holds on it; returns the last capture.
    fn wait_pane(
        &self,
        session: &str,
        timeout: Duration,
        mut cond: impl FnMut(&str) -> bool,
    ) -> Result<String, String> {
        let mut last = String::new();
        let ok = poll_every(timeout, Duration::from_millis(200), || {
            last = self.capture(session);
            cond(&last)
        });
        if ok { Ok(last) } else { Err(last) }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .arg("-S")
            .arg(self.socket())
            .arg("kill-server")
            .stderr(Stdio::null())
            .status();
    }
}

/// The lines of a capture that show these pids' rows.
fn rows(screen: &str, pids: &[u32]) -> Vec<String> {
    screen
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .take(2)
                .any(|cell| pids.iter().any(|p| cell == p.to_string()))
        })
        .map(str::to_string)
        .collect()
}

/// The "refreshed HH:MM:SS" part of the header.
fn refreshed_at(screen: &str) -> Option<&str> {
    let at = screen.find("refreshed ")?;
    screen.get(at..at + "refreshed 00:00:00".len())
}

#[test]
fn top_under_tmux_shows_the_demo_workers_and_updates() {
    let _serial = serial();
    require_root();
    let started = Instant::now();
    let mut demo = Demo::start(60);
    assert!(
        wait_port(demo.addr.port(), SERVER_START),
        "the demo's API did not listen on {}:\n{}",
        demo.addr,
        demo.stdout.text()
    );
    // After "demo complete" the soft-limit restart is over and the hold's
    // light traffic keeps the workers well under the limit for a while: the
    // pids stay the same during the test.
    assert!(
        poll_every(Duration::from_secs(90), Duration::from_millis(100), || demo
            .stdout
            .text()
            .contains("demo complete")),
        "the demo did not complete:\n{}",
        demo.stdout.text()
    );
    let (code, _) = api_get(demo.addr, "/healthz");
    assert_eq!(code, 200, "/healthz");
    let mut workers = Vec::new();
    assert!(
        poll_every(Duration::from_secs(10), Duration::from_millis(100), || {
            let (code, body) = api_get(demo.addr, &format!("/v1/workers?token={TOKEN}"));
            workers = body["workers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|w| w["role"] == "worker" && w["name"] == DEMO_SERVER_NAME)
                .filter_map(|w| w["pid"].as_u64().map(|p| p as u32))
                .collect();
            code == 200 && workers.len() == 2
        }),
        "the API does not list the demo's 2 workers: {workers:?}"
    );
    eprintln!(
        "demo ready with workers {workers:?} after {:?}",
        started.elapsed()
    );

    let tmux = Tmux::new();
    let session = "top";
    tmux.start(
        session,
        &format!(
            "env MEMTRACE_DEBUG_TOKEN={TOKEN} '{}' top --url http://{} --interval 0.5",
            memtrace_bin().display(),
            demo.addr
        ),
    );
    let shows_workers = |screen: &str| {
        screen.contains(DEMO_SERVER_NAME) && rows(screen, &workers).len() == workers.len()
    };
    let first = tmux
        .wait_pane(session, Duration::from_secs(15), shows_workers)
        .unwrap_or_else(|screen| panic!("top does not show workers {workers:?}:\n{screen}"));
    for needle in ["memtrace top", "RSS MB", "REQ/S", "TO LIMIT", "sort: RSS"] {
        assert!(first.contains(needle), "{needle:?} missing:\n{first}");
    }

    // It updates: the refresh time moves and so do the workers' figures
    // (requests, RSS and its history), with the hold's traffic.
    let before = rows(&first, &workers);
    let second = tmux
        .wait_pane(session, Duration::from_secs(10), |screen| {
            refreshed_at(screen) != refreshed_at(&first) && rows(screen, &workers) != before
        })
        .unwrap_or_else(|screen| {
            panic!("top did not update in 10 s\nfirst:\n{first}\nthen:\n{screen}")
        });
    assert!(shows_workers(&second), "{second}");

    // s changes the sort, and the screen says so.
    tmux.send(session, "s");
    tmux.wait_pane(session, Duration::from_secs(5), |s| {
        s.contains("sort: SLOPE") && !s.contains("sort: RSS")
    })
    .unwrap_or_else(|screen| panic!("no sort indicator change after s:\n{screen}"));

    // Enter opens the selected worker's details: its detector and its last
    // requests, fetched from /v1/workers/PID/requests (ids are PID-SEQ).
    tmux.send(session, "Enter");
    let details = tmux
        .wait_pane(session, Duration::from_secs(5), |s| {
            s.contains("leak detector")
                && s.contains("RSS over the last")
                && workers.iter().any(|p| s.contains(&format!("{p}-")))
        })
        .unwrap_or_else(|screen| panic!("no detail pane after Enter:\n{screen}"));
    assert!(details.contains("last 8 requests"), "{details}");

    // The agent goes away: top stays up and says so in its header.
    let demo_status = demo.stop();
    assert!(
        demo_status.is_some_and(|s| s.success()),
        "the demo did not stop cleanly on SIGTERM: {demo_status:?}\n{}",
        demo.stdout.text()
    );
    let gone = tmux
        .wait_pane(session, Duration::from_secs(10), |s| {
            s.contains("ERROR") && s.contains("cannot reach the agent")
        })
        .unwrap_or_else(|screen| panic!("no error shown once the agent stopped:\n{screen}"));
    assert!(gone.contains("retrying"), "{gone}");
    assert!(
        !gone.contains(EXITED),
        "top exited when the agent stopped:\n{gone}"
    );

    // q quits, with status 0, and the terminal is given back: the screen
    // shows what the shell printed, not top's last frame.
    tmux.send(session, "q");
    let last = tmux
        .wait_pane(session, Duration::from_secs(5), |s| s.contains(EXITED))
        .unwrap_or_else(|screen| panic!("top still running after q:\n{screen}"));
    assert!(
        last.contains(&format!("{EXITED} 0")),
        "top's exit status is not 0:\n{last}"
    );
    assert!(
        !last.contains("RSS MB") && !last.contains(DEMO_SERVER_NAME),
        "the alternate screen was not left:\n{last}"
    );
    eprintln!("top test done in {:?}", started.elapsed());
}
