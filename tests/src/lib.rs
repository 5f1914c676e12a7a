//! Harness for memtrace's end-to-end tests: fixture builds, an agent running
//! in this process, child processes that are cleaned up, and ground truth
//! from /proc.
//!
//! The tests load real eBPF programs, so they need root and run one at a
//! time (`--test-threads=1`; `cargo xtask test` does both).
use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Mutex, MutexGuard, OnceLock},
    thread,
    time::{Duration, Instant},
};

use memtrace::agent::{Agent, AgentSettings, BackgroundAgent, SharedState, State};
/// Regular expressions, for selector settings.
pub use regex::Regex;

/// Fails the test with instructions when not root: an end-to-end test that
/// silently passed without loading anything would prove nothing.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "end-to-end tests load eBPF programs and need root: run `sudo -E cargo xtask test`"
    );
}

/// The repository's root.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the workspace")
        .to_path_buf()
}

/// How long a server (or the agent) may take to start listening: seconds
/// natively, a minute or more in the kernel matrix's emulated VMs on a busy
/// host. The waits end as soon as it listens.
pub const SERVER_START: Duration = Duration::from_secs(120);

/// Compiled fixtures (C, with frame pointers), built once per test binary.
pub struct Fixtures {
    pub dir: PathBuf,
}

impl Fixtures {
    pub fn bin(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn handler_so(&self) -> PathBuf {
        self.dir.join("libmtfixture_handler.so")
    }

    pub fn source(name: &str) -> PathBuf {
        workspace_root().join("tests/fixtures").join(name)
    }
}

pub fn fixtures() -> &'static Fixtures {
    static FIXTURES: OnceLock<Fixtures> = OnceLock::new();
    FIXTURES.get_or_init(|| {
        let dir = workspace_root().join("target/fixtures");
        let script = workspace_root().join("tests/fixtures/build.sh");
        let status = Command::new(&script)
            .arg(&dir)
            .status()
            .expect("run tests/fixtures/build.sh (gcc is installed by cargo xtask setup)");
        assert!(status.success(), "building the fixtures failed");
        Fixtures { dir }
    })
}

/// The memtrace binary (built by `cargo xtask test`, or named by MEMTRACE_BIN).
pub fn memtrace_bin() -> PathBuf {
    std::env::var_os("MEMTRACE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/debug/memtrace"))
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub fn wait_for(timeout: Duration, cond: impl FnMut() -> bool) -> bool {
    poll_every(timeout, Duration::from_millis(20), cond)
}

/// Polls `cond` every `step` until it holds or `timeout` passes.
pub fn poll_every(timeout: Duration, step: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(step);
    }
}

/// A child process killed (with its process group) when dropped.
pub struct Proc {
    pub child: Child,
}

impl Proc {
    pub fn spawn(cmd: &mut Command) -> Self {
        use std::os::unix::process::CommandExt as _;
        cmd.process_group(0);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        Self { child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid() as i32), sig);
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit.
    pub fn stop(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let pgid = nix::unistd::Pid::from_raw(-(self.pid() as i32));
        let _ = nix::sys::signal::kill(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The agent, running in this process on its own thread, as `memtrace agent`
/// runs it. Stopped (programs detached) on drop.
pub struct AgentHarness {
    agent: BackgroundAgent,
}

/// One agent at a time: tests in one binary share the kernel's tracepoints.
static AGENT_LOCK: Mutex<()> = Mutex::new(());

pub fn serial() -> MutexGuard<'static, ()> {
    AGENT_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

impl AgentHarness {
    pub fn start(settings: AgentSettings) -> Self {
        require_root();
        Self {
            agent: BackgroundAgent::start(settings).expect("agent starts"),
        }
    }

    /// Runs an agent already started (to read its API address first).
    pub fn from_agent(agent: Agent) -> Self {
        Self {
            agent: BackgroundAgent::run(agent),
        }
    }

    pub fn state(&self) -> SharedState {
        self.agent.state()
    }

    pub fn api_addr(&self) -> Option<std::net::SocketAddr> {
        self.agent.api_addr()
    }

    pub fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        self.agent.with(f)
    }

    /// Waits until `cond` holds on the agent's state.
    pub fn wait(&self, timeout: Duration, mut cond: impl FnMut(&State) -> bool) -> bool {
        wait_for(timeout, || self.with(|s| cond(s)))
    }

    pub fn stop(self) {
        self.agent.stop();
    }
}

/// Settings for tests: fast refresh, no periodic summaries.
pub fn test_settings(names: &[&str]) -> AgentSettings {
    let mut s = AgentSettings::default();
    s.selectors.names = names.iter().map(|n| n.to_string()).collect();
    s.refresh_interval = Duration::from_millis(100);
    s.rescan_interval = Duration::from_millis(500);
    s.summary_interval = Duration::ZERO;
    s
}

/// Rss from /proc/PID/smaps_rollup, in bytes: the ground truth.
pub fn smaps_rss(pid: u32) -> Option<u64> {
    memtrace::model::procinfo::smaps_rollup(pid).map(|r| r.rss)
}

/// Reads `key=value` pairs from a fixture's status file.
pub fn read_kv(path: &Path) -> Option<std::collections::HashMap<String, i64>> {
    let text = std::fs::read_to_string(path).ok()?;
    Some(
        text.split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
            .collect(),
    )
}

/// Pids of the workers a fixture wrote status files for.
pub fn worker_files(dir: &Path) -> Vec<u32> {
    let mut pids: Vec<u32> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter_map(|e| {
                    e.file_name()
                        .to_str()?
                        .strip_prefix("worker-")?
                        .parse()
                        .ok()
                })
                .collect()
        })
        .unwrap_or_default();
    pids.sort_unstable();
    pids
}

pub fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// A free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

/// One HTTP/1.0 GET; returns the body.
pub fn http_get(port: u16, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    match out.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.") && head.contains(" 200 ") => {
            Ok(body.to_string())
        }
        _ => Err(std::io::Error::other(format!("bad reply: {out:?}"))),
    }
}

/// Waits until a socket listens on the port, without connecting (a
/// connection would be a request to the server under test).
pub fn wait_port(port: u16, timeout: Duration) -> bool {
    let needle = format!(":{port:04X} ");
    wait_for(timeout, || {
        std::fs::read_to_string("/proc/net/tcp").is_ok_and(|table| {
            table.lines().skip(1).any(|line| {
                let cols: Vec<&str> = line.split_whitespace().collect();
                // local_address is column 1, state 0A is LISTEN.
                cols.len() > 3 && format!("{} ", cols[1]).ends_with(&needle) && cols[3] == "0A"
            })
        })
    })
}

/// The `memtrace` binary running as a child, its log lines collected (JSON
/// lines parsed; other lines as `{"message": LINE}`).
pub struct AgentProcess {
    pub proc: Proc,
    lines: std::sync::Arc<Mutex<Vec<serde_json::Value>>>,
}

impl AgentProcess {
    /// Starts `memtrace ARGS --log-format json` and waits until its
    /// programs are attached.
    pub fn start(args: &[&str]) -> Self {
        Self::start_with_env(args, &[])
    }

    /// Like `start`, with extra environment variables.
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_with_format(args, env, "json")
    }

    /// Like `start_with_env`, with another `--log-format` (its lines are
    /// kept whole as messages).
    pub fn start_with_format(args: &[&str], env: &[(&str, &str)], format: &str) -> Self {
        Self::start_program(&memtrace_bin(), args, env, format)
    }

    /// Like `start_with_format`, with another memtrace binary (an installed
    /// one, the release in target/dist).
    pub fn start_program(bin: &Path, args: &[&str], env: &[(&str, &str)], format: &str) -> Self {
        use std::io::BufRead as _;
        require_root();
        let mut proc = Proc::spawn(
            Command::new(bin)
                .args(args)
                .args(["--log-format", format])
                .env("RUST_LOG", "info")
                .envs(env.iter().copied())
                .stderr(std::process::Stdio::piped()),
        );
        let stderr = proc.child.stderr.take().expect("piped stderr");
        let lines = std::sync::Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let value = serde_json::from_str(&line)
                    .unwrap_or_else(|_| serde_json::json!({ "message": line }));
                sink.lock().unwrap_or_else(|e| e.into_inner()).push(value);
            }
        });
        let agent = Self { proc, lines };
        assert!(
            agent
                .wait_log(SERVER_START, |l| l["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("eBPF programs attached")))
                .is_some(),
            "memtrace did not start: {:?}",
            agent.logs()
        );
        agent
    }

    pub fn logs(&self) -> Vec<serde_json::Value> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The first log line matching `pred`, waiting up to `timeout`.
    pub fn wait_log(
        &self,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Option<serde_json::Value> {
        let mut found = None;
        wait_for(timeout, || {
            found = self.logs().into_iter().find(|l| pred(l));
            found.is_some()
        });
        found
    }

    pub fn count_logs(&self, pred: impl Fn(&serde_json::Value) -> bool) -> usize {
        self.logs().iter().filter(|l| pred(l)).count()
    }
}

/// The BPF objects a process holds, from /proc/PID/fdinfo: program ids (of
/// program fds) and (link id, program id) of link fds. Other memtrace agents
/// on the machine (another test run, a demo) do not count.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BpfFds {
    pub programs: Vec<u32>,
    pub links: Vec<(u32, u32)>,
}

pub fn bpf_fds(pid: u32) -> BpfFds {
    let mut out = BpfFds::default();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return out;
    };
    for entry in dir.filter_map(Result::ok) {
        let Ok(info) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<u32>().ok())
        };
        match (field("link_id:"), field("prog_id:"), field("prog_type:")) {
            (Some(link), Some(prog), _) => out.links.push((link, prog)),
            (None, Some(prog), Some(_)) => out.programs.push(prog),
            _ => {}
        }
    }
    out.programs.sort_unstable();
    out.links.sort_unstable();
    out
}

/// Runs the kernel skipped of the programs `pid` holds, because another
/// BPF program was running on that CPU (an interrupt's program inside a
/// task's): fdinfo's `recursion_misses` (5.12+), by program name, where
/// not zero.
pub fn recursion_misses(pid: u32) -> Vec<(String, u64)> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return Vec::new();
    };
    let mut misses: Vec<(u32, u64)> = dir
        .filter_map(Result::ok)
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter(|info| !info.contains("link_id:"))
        .filter_map(|info| {
            let field = |name: &str| {
                info.lines()
                    .find_map(|l| l.strip_prefix(name))
                    .and_then(|v| v.trim().parse::<u64>().ok())
            };
            Some((field("prog_id:")? as u32, field("recursion_misses:")?))
        })
        .filter(|&(_, n)| n > 0)
        .collect();
    misses.sort_unstable();
    misses.dedup();
    let names: std::collections::HashMap<u32, String> = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter_map(|p| Some((p.id(), p.name_as_str()?.to_string())))
        .collect();
    misses
        .into_iter()
        .map(|(id, n)| (names.get(&id).cloned().unwrap_or_else(|| id.to_string()), n))
        .collect()
}

/// What may explain requests an in-process agent did not count: request
/// events of untraced processes, the kernel's counters (ring buffer drops,
/// full maps), and programs the kernel skipped.
pub fn counting_report(agent: &AgentHarness) -> String {
    let (unattributed, kernel) =
        agent.with(|s| (s.counters.requests_unattributed, s.tracer.counters()));
    format!(
        "unattributed request events {unattributed}; kernel {kernel:?}; skipped runs {:?}",
        recursion_misses(std::process::id())
    )
}

/// Which of these program ids the kernel still has loaded.
pub fn still_loaded(ids: &[u32]) -> Vec<u32> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .map(|p| p.id())
        .filter(|id| ids.contains(id))
        .collect()
}

/// Names of the programs `pid` has attached (through link fds it holds).
pub fn attached_program_names(pid: u32) -> Vec<String> {
    let mut linked: Vec<u32> = bpf_fds(pid).links.iter().map(|&(_, prog)| prog).collect();
    linked.extend(perf_attached(pid));
    let mut names: Vec<String> = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| linked.contains(&p.id()))
        .filter_map(|p| p.name_as_str().map(str::to_string))
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Programs a process attached through perf events without a BPF link
/// (tracepoints and uprobes on kernels before 5.15): the kernel's own
/// answer to BPF_TASK_FD_QUERY, as `bpftool perf list` gives it.
fn perf_attached(pid: u32) -> Vec<u32> {
    let Ok(out) = Command::new("bpftool")
        .args(["-j", "perf", "list"])
        .output()
    else {
        return Vec::new();
    };
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    list.as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["pid"].as_u64() == Some(u64::from(pid)))
        .filter_map(|e| e["prog_id"].as_u64().map(|id| id as u32))
        .collect()
}

/// One GET to the agent's API: status code and JSON body (or the text).
pub fn api_get(addr: std::net::SocketAddr, path: &str) -> (u16, serde_json::Value) {
    try_api_get(addr, path).unwrap_or_else(|e| panic!("GET {path} from the API at {addr}: {e}"))
}

/// Like `api_get`, with the error when it cannot connect or read (a port
/// may be published before the agent behind it listens).
pub fn try_api_get(
    addr: std::net::SocketAddr,
    path: &str,
) -> std::io::Result<(u16, serde_json::Value)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    let value = serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body));
    Ok((code, value))
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].trim_start_matches("\r\n");
    }
    out
}

/// Sends `total` GET requests from `concurrency` threads; every one must
/// succeed (the count sent is the ground truth the tests compare with).
pub fn drive(port: u16, path: &str, total: usize, concurrency: usize) {
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let threads: Vec<_> = (0..concurrency)
        .map(|_| {
            let next = next.clone();
            let path = path.to_string();
            thread::spawn(move || {
                while next.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < total {
                    http_get(port, &path).unwrap_or_else(|e| panic!("GET {path}: {e}"));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("load thread");
    }
}
/// Runs of this process's BPF programs the kernel skipped
/// (`recursion_misses`: the program was already running on that CPU).
/// The 7.3 guest under emulation skips a few runs of `accept_exit` and
/// `close_enter` now and then (1 and 3 in one CI run, with 19 of 20
/// requests counted); each skipped run can lose one request's start or
/// end, and nothing memtrace does can bring it back.
pub fn skipped_runs() -> u64 {
    recursion_misses(std::process::id())
        .iter()
        .map(|(_, n)| n)
        .sum()
}

/// Waits for the agent to count exactly `sent` requests over `pids`, and
/// checks no extra one shows up afterwards. A request is missing only if
/// the kernel says it skipped a program run (see [`skipped_runs`]): then
/// the count must be short by no more than the runs skipped.
pub fn assert_counted_exactly(agent: &AgentHarness, pids: &[u32], sent: u64) {
    let mut seen = 0;
    wait_for(Duration::from_secs(60), || {
        seen = agent.with(|s| requests_seen(s, pids));
        seen >= sent.saturating_sub(skipped_runs())
    });
    std::thread::sleep(Duration::from_millis(300));
    seen = agent.with(|s| requests_seen(s, pids));
    let skipped = skipped_runs();
    if seen < sent && sent - seen <= skipped {
        eprintln!(
            "counted {seen} of {sent}: the kernel skipped {skipped} program runs ({})",
            counting_report(agent)
        );
        return;
    }
    assert_eq!(
        seen,
        sent,
        "requests counted by memtrace vs sent ({})",
        counting_report(agent)
    );
}

pub fn mean(values: &[i64]) -> f64 {
    values.iter().map(|&v| v as f64).sum::<f64>() / values.len().max(1) as f64
}

/// Asserts the mean per-request RSS delta is within `tolerance` of `truth`.
pub fn assert_mean_within(deltas: &[i64], truth: i64, tolerance: f64, what: &str) {
    let m = mean(deltas);
    eprintln!(
        "{what}: mean per-request RSS delta {m:.0} bytes over {} requests (truth {truth})",
        deltas.len()
    );
    assert!(
        (m - truth as f64).abs() <= truth as f64 * tolerance,
        "{what}: mean per-request RSS delta {m:.0} bytes over {} requests, leak {truth} (±{:.0}%)",
        deltas.len(),
        tolerance * 100.0
    );
}

/// The robust slope (MB per request) of the worker that served the most.
pub fn slope_mb(agent: &AgentHarness, pids: &[u32]) -> f64 {
    agent.with(|s| {
        let w = pids
            .iter()
            .filter_map(|p| s.registry.find(*p))
            .max_by_key(|w| w.requests.seen)
            .expect("a worker");
        w.detector
            .get_state()
            .robust_slope
            .unwrap_or_else(|| panic!("no slope yet for {}: {:?}", w.pid, w.detector.get_state()))
    })
}

/// Asserts the leak detector's slope is within 10% of `leak` bytes a request.
pub fn assert_slope(agent: &AgentHarness, pids: &[u32], leak: u64, what: &str) {
    let truth = leak as f64 / (1024.0 * 1024.0);
    let slope = slope_mb(agent, pids);
    eprintln!("{what}: slope {slope:.4} MB/request, leak {truth:.4} MB/request");
    assert!(
        (slope - truth).abs() <= truth * 0.10,
        "{what}: slope {slope:.4} MB/request, leak {truth:.4} (±10%)"
    );
}

/// The last `n` requests overall: per worker, the newest ones, split the way
/// the workers actually served them (their request counts since `n` ago).
pub fn recent_deltas(agent: &AgentHarness, pids: &[u32], n: usize) -> Vec<i64> {
    recent_of(agent, pids, n, |r| r.delta_bytes)
}

/// One figure of each of the last `n` requests overall, newest first.
pub fn recent_of<T>(
    agent: &AgentHarness,
    pids: &[u32],
    n: usize,
    pick: impl Fn(&memtrace::model::requests::RequestRecord) -> T,
) -> Vec<T> {
    agent.with(|s| {
        let mut all: Vec<(f64, T)> = pids
            .iter()
            .filter_map(|&p| s.registry.find(p))
            .flat_map(|w| w.requests.recent(n).map(|r| (r.started_unix_ms, pick(r))))
            .collect();
        all.sort_by(|a, b| b.0.total_cmp(&a.0));
        all.truncate(n);
        all.into_iter().map(|(_, d)| d).collect()
    })
}

/// Requests the agent has counted for these processes.
pub fn requests_seen(state: &State, pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|&p| state.registry.find(p))
        .map(|w| w.requests.seen)
        .sum()
}

/// Children of `parent` right now, sorted.
pub fn children_of(parent: u32) -> Vec<u32> {
    let mut kids: Vec<u32> = memtrace::model::procinfo::all_pids()
        .into_iter()
        .filter(|&p| memtrace::model::procinfo::view(p).is_some_and(|v| v.ppid == parent))
        .collect();
    kids.sort_unstable();
    kids
}

/// The children of `parent`, once there are `n` of them.
pub fn wait_children(parent: u32, n: usize) -> Vec<u32> {
    let mut kids = Vec::new();
    let ok = wait_for(Duration::from_secs(60), || {
        kids = children_of(parent);
        kids.len() == n
    });
    assert!(ok, "{parent} has {} children, expected {n}", kids.len());
    kids
}

/// The fixture prefork HTTP server (tests/fixtures/leaky_server.c).
pub struct LeakyServer {
    pub proc: Proc,
    pub port: u16,
    pub master: u32,
    /// Its status files (master pid, SIGHUP count, per-worker counts).
    pub dir: tempfile::TempDir,
}

impl LeakyServer {
    /// Starts `workers` workers leaking `leak_bytes` per request (LEAK_BYTES),
    /// with extra environment, and waits until it listens.
    pub fn start(workers: usize, leak_bytes: u64, env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("a temp dir");
        let port = free_port();
        let proc = Proc::spawn(
            Command::new(fixtures().bin("leaky_server"))
                .arg(port.to_string())
                .arg(workers.to_string())
                .arg(dir.path())
                .env("LEAK_BYTES", leak_bytes.to_string())
                .envs(env.iter().copied()),
        );
        assert!(wait_port(port, SERVER_START), "leaky_server listens");
        // leaky_server writes its pid file before it listens.
        let master = read_pid(&dir.path().join("master")).expect("master pid");
        Self {
            proc,
            port,
            master,
            dir,
        }
    }

    /// Its workers, once all `n` are running.
    pub fn workers(&self, n: usize) -> Vec<u32> {
        wait_children(self.master, n)
    }

    /// SIGHUPs the master has received.
    pub fn hups(&self) -> usize {
        std::fs::read_to_string(self.dir.path().join("hup"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }
}

/// Real gunicorn (Debian's), sync workers, serving tests/fixtures/wsgi_app.py
/// which keeps `leak_bytes` per request.
pub fn gunicorn(port: u16, workers: usize, leak_bytes: u64) -> Proc {
    Proc::spawn(
        Command::new("gunicorn")
            .args(["--workers", &workers.to_string(), "--worker-class", "sync"])
            .args(["--graceful-timeout", "5"])
            .arg("--bind")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--chdir")
            .arg(Fixtures::source(""))
            .arg("wsgi_app:app")
            .env("LEAK_BYTES", leak_bytes.to_string())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null()),
    )
}

/// uWSGI with its Python plugin serving `tests/fixtures/wsgi_app.py` on
/// 127.0.0.1:`port`, with a master; `args` choose workers, threads and the
/// socket option (`--http-socket`, or `--http11-socket` for keep-alive),
/// which must come last (the address follows it).
pub fn uwsgi(port: u16, args: &[&str], leak_bytes: u64) -> Proc {
    uwsgi_app(port, "wsgi_app.py", args, leak_bytes)
}

/// uWSGI serving `app` (a fixture in `tests/fixtures`, callable `app`);
/// `args` end with the socket option whose address follows.
pub fn uwsgi_app(port: u16, app: &str, args: &[&str], leak_bytes: u64) -> Proc {
    Proc::spawn(
        Command::new("uwsgi")
            .args([
                "--plugin",
                "python3",
                "--master",
                "--need-app",
                "--die-on-term",
            ])
            .args(["--worker-reload-mercy", "10"])
            .arg("--chdir")
            .arg(Fixtures::source(""))
            .args(["--wsgi-file", app, "--callable", "app"])
            .args(args)
            .arg(format!("127.0.0.1:{port}"))
            .env("LEAK_BYTES", leak_bytes.to_string())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null()),
    )
}

/// PHP-FPM (a static pool) behind nginx, in `dir`. The script answers with
/// its pid; `?leak=N` mallocs N bytes through FFI and never frees them, so
/// that worker alone grows. `keep_conn`: nginx keeps its FastCGI
/// connections to PHP-FPM open across requests.
pub struct PhpFpm {
    /// nginx, then php-fpm (its master).
    pub procs: Vec<Proc>,
    /// Where nginx listens.
    pub port: u16,
}

impl PhpFpm {
    pub fn start(dir: &Path, workers: usize, keep_conn: bool) -> Self {
        let (port, fpm_port) = (free_port(), free_port());
        std::fs::create_dir_all(dir.join("run")).unwrap();
        std::fs::write(
            dir.join("index.php"),
            r#"<?php
$n = intval($_GET['leak'] ?? 0);
if ($n > 0) {
    $libc = FFI::cdef("void *malloc(size_t n); void *memset(void *p, int c, size_t n);", "libc.so.6");
    $libc->memset($libc->malloc($n), 1, $n);
}
$body = sprintf("pid=%d\n", getmypid());
header('Content-Type: text/plain');
header('Content-Length: ' . strlen($body));
echo $body;
"#,
        )
        .unwrap();
        std::fs::write(
            dir.join("php-fpm.conf"),
            format!(
                "[global]\nerror_log = run/php-fpm.log\ndaemonize = no\n\n[www]\n\
                 listen = 127.0.0.1:{fpm_port}\npm = static\npm.max_children = {workers}\n\
                 php_admin_value[ffi.enable] = 1\n"
            ),
        )
        .unwrap();
        let (upstream, keep) = if keep_conn {
            (
                format!("upstream fpm {{ server 127.0.0.1:{fpm_port}; keepalive 8; }}\n"),
                "fastcgi_keep_conn on;\n  fastcgi_pass fpm;".to_string(),
            )
        } else {
            (String::new(), format!("fastcgi_pass 127.0.0.1:{fpm_port};"))
        };
        std::fs::write(
            dir.join("nginx.conf"),
            format!(
                "worker_processes 1;\npid run/nginx.pid;\nerror_log run/nginx-error.log;\n\
                 events {{ worker_connections 256; }}\nhttp {{\n access_log off;\n\
                 client_body_temp_path run/body;\n fastcgi_temp_path run/fastcgi;\n\
                 proxy_temp_path run/proxy;\n uwsgi_temp_path run/uwsgi;\n scgi_temp_path run/scgi;\n\
                 {upstream}\
                 server {{\n  listen 127.0.0.1:{port};\n  location / {{\n\
                 include /etc/nginx/fastcgi_params;\n\
                 fastcgi_param SCRIPT_FILENAME {}/index.php;\n  {keep}\n  }}\n }}\n}}\n",
                dir.display()
            ),
        )
        .unwrap();
        let fpm = Proc::spawn(
            Command::new("php-fpm8.2")
                .args(["--nodaemonize", "--allow-to-run-as-root", "--fpm-config"])
                .arg(dir.join("php-fpm.conf"))
                .arg("--prefix")
                .arg(dir)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null()),
        );
        assert!(wait_port(fpm_port, SERVER_START), "php-fpm listens");
        let nginx = Proc::spawn(
            Command::new("nginx")
                .arg("-p")
                .arg(format!("{}/", dir.display()))
                .args(["-c", "nginx.conf", "-g", "daemon off;"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null()),
        );
        assert!(wait_port(port, SERVER_START), "nginx listens");
        Self {
            procs: vec![nginx, fpm],
            port,
        }
    }

    /// The php-fpm master's pid.
    pub fn master(&self) -> u32 {
        self.procs[1].pid()
    }
}

/// The pid a fixture's reply names (`pid=1234`).
pub fn pid_in(body: &str) -> u32 {
    let at = body.find("pid=").expect("the reply names its pid") + 4;
    body[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .expect("a pid")
}

/// Reads one HTTP/1.1 response (status line, headers, Content-Length body).
pub fn read_response(reader: &mut BufReader<TcpStream>) -> String {
    let mut status = String::new();
    reader.read_line(&mut status).expect("status line");
    assert!(status.starts_with("HTTP/1.1 200"), "{status:?}");
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse().unwrap();
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).unwrap();
    String::from_utf8_lossy(&body).into_owned()
}

/// `$(pyenv root)/versions/X*/bin/python3.Y`, the newest patch release.
pub fn pyenv_python(minor: &str) -> PathBuf {
    let root = std::env::var_os("PYENV_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root/.pyenv"));
    let mut versions: Vec<PathBuf> = std::fs::read_dir(root.join("versions"))
        .expect("pyenv's interpreters are installed on these machines")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{minor}.")))
        })
        .collect();
    versions.sort();
    let dir = versions
        .pop()
        .unwrap_or_else(|| panic!("pyenv has no {minor}"));
    dir.join("bin").join(format!("python{minor}"))
}

/// The Debian sid root `cargo xtask setup` makes, with python3.14 and
/// python3.15 (part of the test setup: missing, the test fails and says
/// how to make it).
pub fn sid_root() -> PathBuf {
    let root = workspace_root().join("target/py-sid");
    let ready = ["python3.14", "python3.15"]
        .iter()
        .all(|p| root.join("usr/bin").join(p).is_file());
    assert!(
        ready,
        "no Debian sid root with python3.14 and python3.15 at {}: run `cargo xtask setup` (as root)",
        root.display()
    );
    root
}

/// Serves `module:app` of the fixtures with the stdlib's wsgiref, by the
/// interpreter at `python` (a path inside `root`), chrooted into `root`
/// like a container: the fixtures are copied to /srv/memtrace-fixtures
/// there.
pub fn chroot_wsgi_server(root: &Path, python: &str, module: &str, port: u16) -> Proc {
    copy_into_root(root, module);
    let serve = format!(
        "import sys, wsgiref.simple_server as s\n\
         sys.path.insert(0, '/srv/memtrace-fixtures')\n\
         import {module} as a\n\
         class Quiet(s.WSGIRequestHandler):\n    def log_message(self, *args): pass\n\
         s.make_server('127.0.0.1', {port}, a.app, handler_class=Quiet).serve_forever()"
    );
    Proc::spawn(
        Command::new("chroot")
            .arg(root)
            .args([python, "-c", &serve])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
}

/// Copies the fixture `module`.py to /srv/memtrace-fixtures in `root`.
fn copy_into_root(root: &Path, module: &str) {
    let dir = root.join("srv/memtrace-fixtures");
    std::fs::create_dir_all(&dir).expect("the fixtures' folder in the root");
    std::fs::copy(
        Fixtures::source(&format!("{module}.py")),
        dir.join(format!("{module}.py")),
    )
    .expect("the fixture copied into the root");
}

/// Runs the fixture script `module`.py with `args` by the interpreter at
/// `python` (inside `root`), chrooted into `root`.
pub fn chroot_fixture(root: &Path, python: &str, module: &str, args: &[&str]) -> Proc {
    copy_into_root(root, module);
    Proc::spawn(
        Command::new("chroot")
            .arg(root)
            .arg(python)
            .arg(format!("/srv/memtrace-fixtures/{module}.py"))
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
}

/// A copy of the interpreter at `from` (inside `root`) at `to`, with its
/// exported `Py_Version` replaced by `version_hex`: a build that says it is
/// another version than its `_Py_DebugOffsets` (a pre-release whose table
/// does not validate), or a future one.
pub fn python_claiming(root: &Path, from: &str, to: &str, version_hex: u32) {
    use object::{Object as _, ObjectSection as _, ObjectSymbol as _};
    let source = root.join(from.trim_start_matches('/'));
    let mut bytes = std::fs::read(&source).expect("the interpreter");
    let offset = {
        let file = object::File::parse(&*bytes).expect("an ELF");
        let symbol = file
            .dynamic_symbols()
            .find(|s| s.name() == Ok("Py_Version"))
            .expect("Py_Version");
        let section = file
            .section_by_index(symbol.section_index().expect("defined"))
            .expect("its section");
        let (start, _) = section.file_range().expect("in the file");
        (start + symbol.address() - section.address()) as usize
    };
    bytes[offset..offset + 4].copy_from_slice(&version_hex.to_le_bytes());
    let target = root.join(to.trim_start_matches('/'));
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    std::fs::write(&target, bytes).expect("the copy");
    std::fs::set_permissions(&target, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
}

/// The memtrace binary tracing processes named `name` in request mode
/// `mode`, with a detector that judges after a few requests (window 20,
/// checks every 10, 4 of warm-up), `extra` arguments, and its API on a
/// free port behind `token`.
pub fn judging_agent(
    name: &str,
    mode: &str,
    extra: &[&str],
    token: &str,
) -> (AgentProcess, std::net::SocketAddr) {
    let listen = format!("127.0.0.1:{}", free_port());
    let mut args = vec![
        "agent",
        "--process-name",
        name,
        "--request-mode",
        mode,
        "--leak-window-size",
        "20",
        "--leak-check-interval",
        "10",
        "--leak-warmup-requests",
        "4",
        "--listen",
        &listen,
    ];
    args.extend_from_slice(extra);
    let agent = AgentProcess::start_with_env(&args, &[("MEMTRACE_DEBUG_TOKEN", token)]);
    (agent, listen.parse().expect("an address"))
}

/// Debian's gunicorn with one worker of `worker_class` (gthread: 4
/// threads) serving `app` (`module:callable`) of the fixtures, with `env`.
pub fn one_worker_gunicorn(
    port: u16,
    worker_class: &str,
    app: &str,
    env: &[(&str, &std::ffi::OsStr)],
) -> Proc {
    let mut cmd = Command::new("gunicorn");
    cmd.args(["--workers", "1", "--worker-class", worker_class])
        .arg("--bind")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--chdir")
        .arg(Fixtures::source(""))
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if worker_class == "gthread" {
        cmd.args(["--threads", "4"]);
    }
    cmd.arg(app);
    Proc::spawn(&mut cmd)
}
