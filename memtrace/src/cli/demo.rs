//! `memtrace demo`: proves memtrace works on this machine before it is
//! pointed at production. It starts the bundled leaky prefork server,
//! attaches to it, drives requests, and shows the leak being detected and
//! the soft-limit restart, then cleans up. Exit 0 once both were seen.
use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    os::unix::process::CommandExt as _,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use super::{interrupt, settings::DEBUG_TOKEN_ENV};
use crate::{
    agent::{AgentError, AgentSettings, BackgroundAgent, State},
    api::Token,
    judge::{detector::DetectorConfig, softlimit::SoftLimitSettings},
    kernel::loader::RequestProbes,
    model::workers::Role,
};

/// Demo settings (`memtrace demo --help`).
#[derive(Clone, Debug)]
pub struct DemoOptions {
    pub workers: usize,
    pub leak_kb: usize,
    pub soft_limit_mb: f64,
    pub requests_per_sec: u32,
    pub listen: Option<std::net::SocketAddr>,
    /// Keep the workload and the agent running this long after the demo
    /// showed its result (to look around with `memtrace top`).
    pub hold: Duration,
    pub timeout: Duration,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            workers: 2,
            leak_kb: 1024,
            soft_limit_mb: 80.0,
            requests_per_sec: 30,
            listen: "127.0.0.1:9464".parse().ok(),
            hold: Duration::ZERO,
            timeout: Duration::from_secs(90),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot start the demo server: {0}")]
    Server(#[source] std::io::Error),
    #[error("the demo server did not start listening on 127.0.0.1:{0}")]
    NotListening(u16),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error("the demo did not see {missing} within {secs} s; see the lines above")]
    Incomplete { missing: &'static str, secs: u64 },
    #[error("interrupted; cleaned up")]
    Interrupted,
}

/// The bundled server, killed with its workers when dropped.
struct Server {
    child: Child,
    port: u16,
}

impl Server {
    fn start(opts: &DemoOptions) -> Result<Self, DemoError> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(DemoError::Server)?
            .port();
        let exe = std::env::current_exe().map_err(DemoError::Server)?;
        let child = Command::new(exe)
            .arg("demo-server")
            .args(["--port", &port.to_string()])
            .args(["--workers", &opts.workers.to_string()])
            .args(["--leak-kb", &opts.leak_kb.to_string()])
            .stdin(Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(DemoError::Server)?;
        let server = Self { child, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !listening(port) {
            if Instant::now() > deadline {
                return Err(DemoError::NotListening(port));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(server)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let group = nix::unistd::Pid::from_raw(-(self.child.id() as i32));
        let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
        // The workers die on their own time (a large address space takes a
        // while to tear down): "cleaned up" waits for the whole group, up
        // to a few seconds.
        let until = std::time::Instant::now() + Duration::from_secs(5);
        while nix::sys::signal::kill(group, None).is_ok() && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A LISTEN socket on the port, from /proc/net/tcp (connecting would
/// already be a request).
fn listening(port: u16) -> bool {
    let needle = format!(":{port:04X}");
    std::fs::read_to_string("/proc/net/tcp").is_ok_and(|t| {
        t.lines().skip(1).any(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            cols.len() > 3 && cols[1].ends_with(&needle) && cols[3] == "0A"
        })
    })
}

fn request(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if s.write_all(b"GET / HTTP/1.0\r\n\r\n").is_err() {
        return false;
    }
    let mut out = Vec::new();
    s.read_to_end(&mut out).is_ok() && out.starts_with(b"HTTP/1.0 200")
}

/// What the demo watches for, read from the agent's state.
#[derive(Clone, Debug, Default, PartialEq)]
struct Progress {
    master: Option<u32>,
    workers: Vec<(u32, f64, u64, Option<f64>)>,
    detections: u64,
    /// Workers with at least one leak report.
    detected: Vec<u32>,
    restarts: u64,
    /// The newest recycle: (worker, signal, server, replacement).
    recycle: Option<(u32, String, String, Option<u32>)>,
}

fn progress(state: &State) -> Progress {
    let master = state
        .registry
        .alive()
        .find(|w| state.registry.role(w.pid) == Role::Master)
        .map(|w| w.pid);
    let workers = state
        .registry
        .alive()
        .filter(|w| Some(w.ppid) == master)
        .map(|w| {
            (
                w.pid,
                w.rss.resident() as f64 / (1024.0 * 1024.0),
                w.requests.seen,
                w.detector.get_state().robust_slope,
            )
        })
        .collect();
    let all = || state.registry.alive().chain(state.registry.exited());
    Progress {
        master,
        workers,
        detections: all().map(|w| w.leak_detections).sum(),
        detected: all()
            .filter(|w| w.leak_detections > 0)
            .map(|w| w.pid)
            .collect(),
        restarts: state.enforcer.actions_taken,
        recycle: state.enforcer.recycles().last().map(|r| {
            (
                r.worker_pid,
                r.signal.clone(),
                r.server.to_string(),
                r.replacement_pid,
            )
        }),
    }
}

fn say(start: Instant, line: impl std::fmt::Display) {
    println!("[{:5.1}s] {line}", start.elapsed().as_secs_f64());
}

/// Runs the demo; returns once the detection and the restart were shown.
pub fn run(opts: &DemoOptions) -> Result<(), DemoError> {
    let start = Instant::now();
    interrupt::catch_stop_signals();
    println!(
        "memtrace demo: a prefork server with {} workers, each request leaking {} KiB; soft limit {} MB\n",
        opts.workers, opts.leak_kb, opts.soft_limit_mb
    );
    let server = Server::start(opts)?;
    say(
        start,
        format_args!(
            "demo server: master pid {}, port {}",
            server.pid(),
            server.port
        ),
    );

    let token = Token::new(std::env::var(DEBUG_TOKEN_ENV).ok())
        .or_else(|| Token::new(Some(format!("demo-{}", std::process::id()))));
    let mut settings = AgentSettings::default();
    settings.selectors.pids = vec![server.pid()];
    settings.load.requests = RequestProbes::Accept;
    settings.summary_interval = Duration::ZERO;
    settings.refresh_interval = Duration::from_millis(250);
    settings.detector = DetectorConfig {
        window_size: 60,
        check_interval: 10,
        warmup_samples: 5,
        soft_limit_mb: opts.soft_limit_mb,
        ..DetectorConfig::default()
    };
    settings.soft_limit = SoftLimitSettings {
        min_interval: Duration::from_secs(5),
        jitter: Duration::ZERO,
        drain_timeout: Duration::from_secs(2),
        ..SoftLimitSettings::default()
    };
    settings.listen = opts.listen;
    settings.api_token = token.clone();
    let agent = BackgroundAgent::start(settings)?;
    say(
        start,
        "memtrace attached (accept mode: a request runs from accept() to close())",
    );
    if let (Some(addr), Some(t)) = (agent.api_addr(), &token) {
        say(
            start,
            format_args!(
                "API on http://{addr}: in another terminal, `{DEBUG_TOKEN_ENV}={} memtrace top --url http://{addr}`",
                t.expose()
            ),
        );
    }

    let period = Duration::from_secs_f64(1.0 / f64::from(opts.requests_per_sec.max(1)));
    let mut last_report = Instant::now();
    let mut seen = Progress::default();
    let mut replaced_at = None;
    let mut sent = 0u64;
    loop {
        if interrupt::stop_requested() {
            return Err(DemoError::Interrupted);
        }
        if start.elapsed() > opts.timeout {
            let missing = if seen.detections == 0 {
                "a leak detection"
            } else {
                "a soft-limit restart"
            };
            return Err(DemoError::Incomplete {
                missing,
                secs: opts.timeout.as_secs(),
            });
        }
        if request(server.port) {
            sent += 1;
        }
        std::thread::sleep(period);
        let now = agent.with(|s| progress(s));
        for pid in now.detected.iter().filter(|p| !seen.detected.contains(p)) {
            let slope = now
                .workers
                .iter()
                .find(|w| w.0 == *pid)
                .and_then(|w| w.3)
                .map_or_else(String::new, |s| format!(": {s:.2} MB/request"));
            say(
                start,
                format_args!(
                    "LEAK_TREND_DETECTED for worker {pid}{slope} (details in the log line above)"
                ),
            );
        }
        if now.restarts > seen.restarts
            && let Some((worker, signal, server, _)) = &now.recycle
        {
            say(
                start,
                format_args!(
                    "SOFT_LIMIT_EXCEEDED: worker {worker} crossed {} MB; {signal} sent to that worker alone ({server} preset)",
                    opts.soft_limit_mb,
                ),
            );
        }
        if replaced_at.is_none()
            && let Some((worker, _, _, Some(new))) = &now.recycle
        {
            replaced_at = Some(Instant::now());
            say(
                start,
                format_args!(
                    "the master {} replaced worker {worker} by {new}; the other workers stay; memtrace follows {new} with a fresh detector",
                    now.master.unwrap_or(0)
                ),
            );
        }
        if last_report.elapsed() >= Duration::from_secs(1) {
            last_report = Instant::now();
            for (pid, rss, reqs, slope) in &now.workers {
                let slope = slope.map_or_else(
                    || "judging...".to_string(),
                    |s| format!("{s:.2} MB/request"),
                );
                say(
                    start,
                    format_args!(
                        "worker {pid}: {reqs:4} requests, RSS {rss:6.1} MB, slope {slope}"
                    ),
                );
            }
        }
        seen = now;
        if let Some(t) = replaced_at
            && seen.detections > 0
            && t.elapsed() >= Duration::from_secs(2)
        {
            break;
        }
    }
    println!();
    say(
        start,
        format_args!(
            "demo complete: {sent} requests sent, leaks detected in {} worker(s), {} soft-limit restart(s)",
            seen.detected.len(),
            seen.restarts
        ),
    );
    if !opts.hold.is_zero() {
        say(
            start,
            format_args!("holding for {} s (Ctrl-C to stop)...", opts.hold.as_secs()),
        );
        let until = Instant::now() + opts.hold;
        while Instant::now() < until && !interrupt::stop_requested() {
            request(server.port);
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    agent.stop();
    drop(server);
    say(start, "cleaned up: demo server stopped, programs detached");
    Ok(())
}
