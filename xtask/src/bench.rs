//! `cargo xtask bench`: memtrace's cost and limits, measured on this
//! machine and written to BENCHMARKS.md with the machine, kernel and date.
//!
//! Every comparison is a ratio of runs made in the same invocation,
//! interleaved (off, on, off, on, ...) and summarised by the median of the
//! per-round ratios: these machines are shared and noisy, absolute numbers
//! drift between runs and within one.
use std::{
    fmt::Write as _,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::TcpStream,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{cargo, run, workspace_root};

mod cost;
mod soak;

const TOKEN: &str = "bench-token";
/// Rounds at least of the comparisons with few modes (nginx, uprobe mode
/// against bare uprobes): cheap, and their medians must resolve a few
/// percent on a machine whose runs spread by ±8%.
const FEW_MODES_ROUNDS: usize = 11;
/// Workers (and wrk connections) of the fixture server.
const FIXTURE_WORKERS: u32 = 8;

#[derive(Clone, Copy)]
pub struct BenchOptions {
    /// Interleaved rounds per comparison.
    pub rounds: usize,
    /// Seconds per load run.
    pub seconds: u64,
    /// Minutes of the soak run (0: none).
    pub soak_minutes: u64,
    /// Only the path-capture comparison (`paths_bench`).
    pub paths_only: bool,
    /// Only the steady state and the request modes (`modes_bench`).
    pub modes_only: bool,
    /// Only the Python comparison (`python_bench`).
    pub python_only: bool,
    /// Only uprobe mode against bare kernel uprobes (`uprobe_floor`).
    pub uprobe_only: bool,
    /// Only getppid of an untraced process (`untraced_syscalls`).
    pub untraced_only: bool,
    /// Only first-touch faults of a traced process (`fault_costs`).
    pub faults_only: bool,
    /// Only the soak (`soak_minutes` of it).
    pub soak_only: bool,
    /// Only the cost tables (`cost`).
    pub cost_only: bool,
    /// Only the socket programs' kernel statistics of the cost tables.
    pub programs_only: bool,
}

/// A child process (and its process group), killed on drop.
struct Proc(Child);

impl Proc {
    fn spawn(cmd: &mut Command) -> Result<Self> {
        cmd.process_group(0);
        Ok(Self(
            cmd.spawn()
                .with_context(|| format!("cannot start {cmd:?}"))?,
        ))
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's process group.
        unsafe { libc::kill(-(self.0.id() as i32), libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        // SAFETY: as above.
        unsafe { libc::kill(-(self.0.id() as i32), libc::SIGKILL) };
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        thread::sleep(Duration::from_millis(50));
    }
    false
}

/// A LISTEN socket on the port (no connection: it would be a request).
fn listening(port: u16) -> bool {
    let needle = format!(":{port:04X}");
    std::fs::read_to_string("/proc/net/tcp").is_ok_and(|t| {
        t.lines().skip(1).any(|l| {
            let c: Vec<&str> = l.split_whitespace().collect();
            c.len() > 3 && c[1].ends_with(&needle) && c[3] == "0A"
        })
    })
}

fn http_get(port: u16, path: &str) -> Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: localhost\r\nX-Debug-Token: {TOKEN}\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default())
}

struct Paths {
    memtrace: PathBuf,
    fixtures: PathBuf,
}

impl Paths {
    fn handler(&self) -> PathBuf {
        self.fixtures.join("libmtfixture_handler.so")
    }
}

/// How memtrace runs during a measurement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Off,
    /// Agent on, no request boundaries: faults, RSS, mmap/brk, lifecycle.
    Steady,
    /// Steady, with faults counted by a program on every fault (what a
    /// kernel without BTF runs) instead of read from the task's counters.
    SteadyFaultProgram,
    Accept,
    /// Socket request mode: socket tracepoints, no syscall tracepoint;
    /// HTTP method and path captured (the default).
    Socket,
    /// Socket mode with `--no-http-paths`: no request bytes read.
    SocketNoPaths,
    /// Socket mode with `--no-fd-counts`: no descriptor table read at the
    /// requests' ends (the GC is read only for Python workers).
    SocketNoFds,
    Uprobe,
    /// No agent: the kernel's own uprobe and return probe on the request
    /// function (tracefs, nothing recorded), the floor under uprobe mode.
    BareUprobes,
    /// Uprobe mode plus allocation-site collection (after `snapshot`).
    Collect,
    /// Accept mode plus collection.
    AcceptCollect,
    /// No request boundaries, collection on in the growth tier (page
    /// faults and mmap/brk: tracepoints only).
    Growth,
    /// No request boundaries, collection on in the heap tier at the
    /// default sampling interval (512 KiB).
    Heap,
    /// The heap tier sampling every allocation (what collection cost
    /// before sampling).
    HeapEvery,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Off => "memtrace off",
            Mode::Steady => "on, no request boundaries",
            Mode::SteadyFaultProgram => "on, a program on every fault (task_fault_counters hidden)",
            Mode::Accept => "on, accept mode",
            Mode::Socket => "on, socket mode (HTTP paths captured)",
            Mode::SocketNoPaths => "on, socket mode, --no-http-paths",
            Mode::SocketNoFds => "on, socket mode, --no-fd-counts",
            Mode::Uprobe => "on, uprobe on handle_request",
            Mode::BareUprobes => "off, bare kernel uprobe + return probe (no BPF)",
            Mode::Collect => "on, uprobe + snapshot collection",
            Mode::AcceptCollect => "on, accept + snapshot collection",
            Mode::Growth => "on, collecting: growth tier",
            Mode::Heap => "on, collecting: heap tier, 512 KiB sampling",
            Mode::HeapEvery => "on, collecting: heap tier, every allocation",
        }
    }

    /// Whether the mode takes a snapshot (collection on) before the load.
    fn collects(self) -> bool {
        matches!(
            self,
            Mode::Collect | Mode::AcceptCollect | Mode::Growth | Mode::Heap | Mode::HeapEvery
        )
    }
}

struct Agent {
    proc: Proc,
    port: u16,
}

impl Agent {
    fn start(paths: &Paths, name: &str, mode: Mode, extra: &[&str]) -> Result<Option<Self>> {
        Self::start_selecting(paths, &["--process-name", name], mode, extra)
    }

    /// Like `start`, choosing processes with `selector` (`--pid N`, ...).
    fn start_selecting(
        paths: &Paths,
        selector: &[&str],
        mode: Mode,
        extra: &[&str],
    ) -> Result<Option<Self>> {
        if matches!(mode, Mode::Off | Mode::BareUprobes) {
            return Ok(None);
        }
        let port = free_port()?;
        let mut cmd = Command::new(&paths.memtrace);
        cmd.arg("agent")
            .args(selector)
            .args(["--log-format", "json", "--summary-interval-secs", "0"])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(extra)
            .env("MEMTRACE_DEBUG_TOKEN", TOKEN)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let handler = format!("{}:handle_request", paths.handler().display());
        match mode {
            Mode::Accept | Mode::AcceptCollect => {
                cmd.args(["--request-mode", "accept"]);
            }
            Mode::Socket => {
                cmd.args(["--request-mode", "socket"]);
            }
            Mode::SocketNoPaths => {
                cmd.args(["--request-mode", "socket", "--no-http-paths"]);
            }
            Mode::SocketNoFds => {
                cmd.args(["--request-mode", "socket", "--no-fd-counts"]);
            }
            Mode::Uprobe | Mode::Collect => {
                cmd.args(["--request-fn", &handler]);
            }
            Mode::Growth => {
                cmd.args(["--collect", "growth"]);
            }
            Mode::Heap => {
                cmd.args(["--collect", "heap"]);
            }
            Mode::HeapEvery => {
                cmd.args(["--collect", "heap", "--heap-sample-bytes", "1"]);
            }
            Mode::SteadyFaultProgram => {
                cmd.env("MEMTRACE_HIDE_KERNEL_FEATURES", "task_fault_counters");
            }
            Mode::Off | Mode::Steady | Mode::BareUprobes => {}
        }
        let agent = Self {
            proc: Proc::spawn(&mut cmd)?,
            port,
        };
        if !wait_until(Duration::from_secs(30), || listening(port)) {
            bail!("the agent did not start (its API never listened)");
        }
        Ok(Some(agent))
    }

    fn snapshot(&self) -> Result<()> {
        let body = http_get(self.port, "/debug/memory/?action=snapshot")?;
        if !body.contains("top_allocations") {
            bail!("snapshot failed: {body}");
        }
        Ok(())
    }

    fn metric(&self, name: &str) -> Option<f64> {
        self.metric_with(name, "")
    }

    /// The first sample of `name` whose labels contain `labels` (e.g.
    /// `state="free"`).
    fn metric_with(&self, name: &str, labels: &str) -> Option<f64> {
        let text = http_get(self.port, "/metrics").ok()?;
        text.lines()
            .find(|l| {
                l.strip_prefix(name).is_some_and(|rest| {
                    rest.starts_with([' ', '{'])
                        && rest
                            .split_once(' ')
                            .is_some_and(|(l, _)| l.contains(labels))
                })
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    fn worker(&self, pid: u32) -> Option<serde_json::Value> {
        let body = http_get(self.port, &format!("/v1/workers/{pid}")).ok()?;
        serde_json::from_str(&body).ok()
    }

    /// CPU seconds (user + system) and RSS bytes of the agent process.
    fn footprint(&self) -> (f64, u64) {
        process_footprint(self.proc.pid())
    }
}

fn process_footprint(pid: u32) -> (f64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime is the
    // 14th field, stime the 15th.
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    // SAFETY: sysconf has no preconditions.
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let cpu = f.get(11).zip(f.get(12)).map_or(0.0, |(u, s)| {
        (u.parse::<f64>().unwrap_or(0.0) + s.parse::<f64>().unwrap_or(0.0)) / tick
    });
    (cpu, proc_kb_field(pid, "smaps_rollup", "Rss:"))
}

/// A `KEY:  N kB` line of `/proc/PID/FILE`, in bytes (0 if absent or gone).
fn proc_kb_field(pid: u32, file: &str, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// A command pinned to one CPU (when there are two or more): the load
/// generator on one, the server on the other. Unpinned, the scheduler's
/// placement of client and server threads swung throughput by ±30% from one
/// run to the next on these 2-core machines; pinned, by a few percent.
fn pinned(cpu: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
    if thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        return Command::new(program);
    }
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", &cpu.to_string()]).arg(program);
    cmd
}

const CLIENT_CPU: usize = 0;
const SERVER_CPU: usize = 1;

fn wrk(url: &str, seconds: u64, threads: u32, conns: u32) -> Result<f64> {
    let out = pinned(CLIENT_CPU, "wrk")
        .args([
            format!("-t{threads}"),
            format!("-c{conns}"),
            format!("-d{seconds}s"),
            url.to_string(),
        ])
        .output()
        .context("wrk is installed by cargo xtask setup")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no Requests/sec in wrk's output: {text}"))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

/// The median of per-round ratios `on[i] / off[i]`. A round's runs are
/// seconds apart, while the machine's speed drifts over minutes (runs of
/// "off" spread by half within one invocation): pairing cancels the drift,
/// where a ratio of medians would set a fast round against a slow one.
fn paired_ratio(on: &[f64], off: &[f64]) -> f64 {
    let mut ratios: Vec<f64> = on
        .iter()
        .zip(off)
        .filter(|(_, off)| **off > 0.0)
        .map(|(on, off)| on / off)
        .collect();
    median(&mut ratios)
}

/// One configuration's requests per second, in round order.
struct ModeRuns {
    mode: Mode,
    rps: Vec<f64>,
}

impl ModeRuns {
    /// Its paired ratio to the first configuration of `all` (off).
    fn ratio(all: &[ModeRuns], mode: Mode) -> f64 {
        all.iter()
            .find(|r| r.mode == mode)
            .map_or(0.0, |r| paired_ratio(&r.rps, &all[0].rps))
    }
}

/// One server under test: how to start it and load it.
struct Target<'a> {
    name: &'static str,
    process_name: &'static str,
    start: &'a dyn Fn(u16) -> Result<Proc>,
    threads: u32,
    conns: u32,
    /// The path wrk asks for.
    path: &'static str,
}

impl<'a> Target<'a> {
    /// The fixture server, started by `start` (usually [`leaky_server`]).
    /// One keep-alive connection per worker: a prefork worker serves one
    /// connection until it closes, so more connections would only queue.
    fn fixture(start: &'a dyn Fn(u16) -> Result<Proc>) -> Self {
        Self {
            name: "leaky_server",
            process_name: "leaky_server",
            start,
            threads: 1,
            conns: FIXTURE_WORKERS,
            path: "/",
        }
    }

    /// A Python server started by `start`, loaded by one wrk thread over
    /// `conns` connections.
    fn python(
        name: &'static str,
        process_name: &'static str,
        start: &'a dyn Fn(u16) -> Result<Proc>,
        conns: u32,
    ) -> Self {
        Self {
            name,
            process_name,
            start,
            threads: 1,
            conns,
            path: "/",
        }
    }

    fn with_path(self, path: &'static str) -> Self {
        Self { path, ..self }
    }
}

/// Interleaved rounds of every mode; medians of requests per second.
/// The kernel's own uprobe and return probe on a function, through tracefs,
/// with tracing off so that nothing is recorded: what the traps cost without
/// any BPF program or agent. Removed on drop.
struct BareUprobes {
    tracefs: PathBuf,
    tracing_on: String,
}

impl BareUprobes {
    const GROUP: &str = "memtrace_bench";

    fn enable(binary: &Path, symbol: &str) -> Result<Self> {
        let tracefs = PathBuf::from("/sys/kernel/tracing");
        if !tracefs.join("uprobe_events").exists() {
            run(Command::new("mount")
                .args(["-t", "tracefs", "nodev"])
                .arg(&tracefs))?;
        }
        let offset = file_offset(binary, symbol)?;
        let tracing_on = std::fs::read_to_string(tracefs.join("tracing_on"))?;
        let bare = Self {
            tracefs,
            tracing_on,
        };
        let at = format!("{}:{offset:#x}", binary.display());
        let mut events = std::fs::OpenOptions::new()
            .append(true)
            .open(bare.tracefs.join("uprobe_events"))?;
        // One write per definition: tracefs parses each write on its own.
        for def in [
            format!("p:{}/entry {at}\n", Self::GROUP),
            format!("r:{}/ret {at}\n", Self::GROUP),
        ] {
            events
                .write_all(def.as_bytes())
                .with_context(|| format!("define a tracefs uprobe: {}", def.trim()))?;
        }
        std::fs::write(bare.tracefs.join("tracing_on"), "0")?;
        std::fs::write(
            bare.tracefs.join("events").join(Self::GROUP).join("enable"),
            "1",
        )?;
        Ok(bare)
    }
}

impl Drop for BareUprobes {
    fn drop(&mut self) {
        let _ = std::fs::write(
            self.tracefs.join("events").join(Self::GROUP).join("enable"),
            "0",
        );
        if let Ok(mut events) = std::fs::OpenOptions::new()
            .append(true)
            .open(self.tracefs.join("uprobe_events"))
        {
            for name in ["entry", "ret"] {
                let _ = events.write_all(format!("-:{}/{name}\n", Self::GROUP).as_bytes());
            }
        }
        let _ = std::fs::write(self.tracefs.join("tracing_on"), self.tracing_on.trim());
    }
}

/// The file offset of a function's first byte in an ELF file.
fn file_offset(binary: &Path, symbol: &str) -> Result<u64> {
    use object::{Object as _, ObjectSegment as _, ObjectSymbol as _};
    let data = std::fs::read(binary).with_context(|| format!("read {}", binary.display()))?;
    let file = object::File::parse(&*data)?;
    let address = file
        .dynamic_symbols()
        .chain(file.symbols())
        .find(|s| s.name() == Ok(symbol))
        .map(|s| s.address())
        .with_context(|| format!("no symbol {symbol} in {}", binary.display()))?;
    file.segments()
        .find(|s| (s.address()..s.address() + s.size()).contains(&address))
        .map(|s| address - s.address() + s.file_range().0)
        .with_context(|| format!("{symbol} is in no segment of {}", binary.display()))
}

fn throughput(
    paths: &Paths,
    t: &Target,
    modes: &[Mode],
    opts: &BenchOptions,
) -> Result<Vec<ModeRuns>> {
    let mut runs: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    for round in 0..opts.rounds {
        for (i, &mode) in modes.iter().enumerate() {
            let port = free_port()?;
            let server = (t.start)(port)?;
            if !wait_until(Duration::from_secs(30), || listening(port)) {
                bail!("{} did not listen on {port}", t.name);
            }
            let agent = Agent::start(paths, t.process_name, mode, &[])?;
            let bare = (mode == Mode::BareUprobes)
                .then(|| BareUprobes::enable(&paths.handler(), "handle_request"))
                .transpose()?;
            if let Some(a) = &agent {
                // Let the agent find every worker before the load.
                thread::sleep(Duration::from_secs(1));
                if mode.collects() {
                    a.snapshot()?;
                }
            }
            let rps = wrk(
                &format!("http://127.0.0.1:{port}{}", t.path),
                opts.seconds,
                t.threads,
                t.conns,
            )?;
            eprintln!(
                "  {} round {}: {:<36} {rps:>10.0} req/s",
                t.name,
                round + 1,
                mode.label()
            );
            runs[i].push(rps);
            drop(bare);
            drop(agent);
            drop(server);
        }
    }
    Ok(modes
        .iter()
        .zip(runs)
        .map(|(&mode, rps)| ModeRuns { mode, rps })
        .collect())
}

fn throughput_table(out: &mut String, results: &[ModeRuns]) {
    let rows: Vec<(&str, &[f64])> = results
        .iter()
        .map(|r| (r.mode.label(), r.rps.as_slice()))
        .collect();
    runs_table(out, &rows);
}

/// One row per configuration, the first being off: its median req/s, its
/// runs in round order, and the median of its per-round ratios to off.
fn runs_table(out: &mut String, rows: &[(&str, &[f64])]) {
    let _ = writeln!(
        out,
        "| configuration | median req/s | runs, in round order | ratio to off (median of rounds) |"
    );
    let _ = writeln!(out, "|---|---:|---|---:|");
    let Some(&(_, off)) = rows.first() else {
        return;
    };
    for &(label, rps) in rows {
        runs_row(out, label, rps, 0, paired_ratio(rps, off));
    }
}

/// One row of a runs table: the label, the median and the runs in round
/// order with `decimals` digits, and the row's ratio to off.
fn runs_row(out: &mut String, label: &str, runs: &[f64], decimals: usize, ratio: f64) {
    let listed: Vec<String> = runs.iter().map(|v| format!("{v:.decimals$}")).collect();
    let _ = writeln!(
        out,
        "| {label} | {:.decimals$} | {} | {ratio:.3} |",
        median(&mut runs.to_vec()),
        listed.join(", "),
    );
}

/// The fixture server on `port`, pinned, with `FIXTURE_WORKERS` workers.
fn leaky_server(fixtures: &Path, port: u16) -> Result<Proc> {
    let dir = std::env::temp_dir().join(format!("memtrace-bench-{port}"));
    std::fs::create_dir_all(&dir)?;
    Proc::spawn(
        pinned(SERVER_CPU, fixtures.join("leaky_server"))
            .args([port.to_string(), FIXTURE_WORKERS.to_string()])
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
}

/// 1b. Uprobe mode on the fixture against the kernel's own uprobes with no
/// BPF program: what memtrace adds over the traps it cannot avoid. More
/// rounds than table 1 (three modes only), as for nginx.
fn uprobe_floor(paths: &Paths, opts: &BenchOptions, md: &mut String) -> Result<Vec<ModeRuns>> {
    eprintln!("uprobe mode against bare uprobes:");
    let fx = paths.fixtures.clone();
    let leaky = move |port: u16| leaky_server(&fx, port);
    let fixture = Target::fixture(&leaky);
    let rounds = BenchOptions {
        rounds: opts.rounds.max(FEW_MODES_ROUNDS),
        ..*opts
    };
    let results = throughput(
        paths,
        &fixture,
        &[Mode::Off, Mode::BareUprobes, Mode::Uprobe],
        &rounds,
    )?;
    let _ = writeln!(md, "\n## 1b. Uprobe mode against bare kernel uprobes\n");
    let _ = writeln!(
        md,
        "The fixture as in 1, {} interleaved rounds: memtrace off; off with the kernel's own uprobe and return probe on \
         `handle_request` (tracefs `p:`/`r:` events, tracing off so nothing is recorded, no BPF program, no agent): the \
         traps every uprobe-based tracer pays; and memtrace's uprobe mode (two programs, one event per request, the agent).\n",
        rounds.rounds
    );
    throughput_table(md, &results);
    Ok(results)
}

/// The socket programs, as the kernel times them.
const SOCKET_PROGRAMS: [&str; 3] = ["sock_recv", "sock_send", "sock_state"];

/// (program name, runs, mean ns per run) of each program that ran.
type ProgramCosts = Vec<(String, u64, f64)>;

/// Per-program cost from the kernel's BPF statistics during a load run.
fn program_costs(
    paths: &Paths,
    t: &Target,
    mode: Mode,
    opts: &BenchOptions,
) -> Result<ProgramCosts> {
    program_costs_run(paths, t, mode, opts).map(|(costs, _)| costs)
}

/// [`program_costs`], and the requests the load run made.
fn program_costs_run(
    paths: &Paths,
    t: &Target,
    mode: Mode,
    opts: &BenchOptions,
) -> Result<(ProgramCosts, f64)> {
    let stats = Path::new("/proc/sys/kernel/bpf_stats_enabled");
    let before = std::fs::read_to_string(stats).unwrap_or_else(|_| "0".into());
    std::fs::write(stats, "1").context("enable kernel.bpf_stats_enabled (root)")?;
    let result = (|| {
        let port = free_port()?;
        let _server = (t.start)(port)?;
        if !wait_until(Duration::from_secs(60), || listening(port)) {
            bail!("{} did not listen on {port}", t.name);
        }
        let agent = Agent::start(paths, t.process_name, mode, &[])?.expect("on");
        thread::sleep(Duration::from_secs(1));
        if mode == Mode::Collect {
            agent.snapshot()?;
        }
        let rps = wrk(
            &format!("http://127.0.0.1:{port}{}", t.path),
            opts.seconds,
            t.threads,
            t.conns,
        )?;
        let ids = held_programs(agent.proc.pid());
        let names = program_names()?;
        let mut costs: ProgramCosts = ids
            .into_iter()
            .filter_map(|(id, run_ns, runs)| {
                let name = names.iter().find(|(i, _)| *i == id)?.1.clone();
                (runs > 0).then(|| (name, runs, run_ns as f64 / runs as f64))
            })
            .collect();
        costs.sort_by_key(|c| std::cmp::Reverse(c.1));
        Ok((costs, rps * opts.seconds as f64))
    })();
    let _ = std::fs::write(stats, before.trim());
    result
}

/// (program id, run_time_ns, run_cnt) of every program fd a process holds.
fn held_programs(pid: u32) -> Vec<(u32, u64, u64)> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter(|info| info.contains("prog_type:"))
        .filter_map(|info| {
            let get = |k: &str| {
                info.lines()
                    .find_map(|l| l.strip_prefix(k))
                    .and_then(|v| v.trim().parse::<u64>().ok())
            };
            Some((
                get("prog_id:")? as u32,
                get("run_time_ns:")?,
                get("run_cnt:")?,
            ))
        })
        .collect()
}

fn program_names() -> Result<Vec<(u32, String)>> {
    let out = Command::new("bpftool")
        .args(["prog", "show", "--json"])
        .output()
        .context("bpftool is installed by cargo xtask setup")?;
    let progs: serde_json::Value = serde_json::from_slice(&out.stdout).context("bpftool's JSON")?;
    Ok(progs
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| Some((p["id"].as_u64()? as u32, p["name"].as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default())
}

/// One rate of the zero-drop run.
struct RateRun {
    asked: u64,
    achieved: u64,
    /// Calls the agent did not count.
    missing: u64,
    dropped: u64,
    agent_cpu_pct: f64,
}

/// Request-event rates the pipeline carries without a drop.
fn zero_drop_rate(paths: &Paths, rates: &[u64], seconds: u64) -> Result<Vec<RateRun>> {
    let mut out = Vec::new();
    for &rate in rates {
        let agent = Agent::start(paths, "request_loop", Mode::Uprobe, &[])?.expect("on");
        let mut child = Command::new(paths.fixtures.join("request_loop"))
            .args([rate.to_string(), seconds.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let pid = child.id();
        let mut stdin = child.stdin.take().expect("piped");
        let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
        let _ready = lines.next();
        wait_until(Duration::from_secs(10), || agent.worker(pid).is_some());
        let drops_before = agent.metric("memtrace_ringbuf_drops_total").unwrap_or(0.0);
        let (cpu0, _) = agent.footprint();
        writeln!(stdin)?;
        let done = lines.next().transpose()?.unwrap_or_default();
        let mut parts = done.split_whitespace().skip(1);
        let calls: u64 = parts.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        let took: f64 = parts
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(seconds as f64);
        let mut seen = 0;
        wait_until(Duration::from_secs(10), || {
            seen = agent
                .worker(pid)
                .and_then(|w| w["requests_seen"].as_u64())
                .unwrap_or(0);
            seen >= calls
        });
        let (cpu1, _) = agent.footprint();
        let drops =
            (agent.metric("memtrace_ringbuf_drops_total").unwrap_or(0.0) - drops_before) as u64;
        writeln!(stdin)?;
        let _ = child.wait();
        let achieved = (calls as f64 / took) as u64;
        let cpu_pct = (cpu1 - cpu0) / took * 100.0;
        eprintln!(
            "  {rate:>7}/s asked, {achieved:>7}/s achieved: {seen} counted of {calls}, {drops} dropped, agent {cpu_pct:.1}% CPU"
        );
        out.push(RateRun {
            asked: rate,
            achieved,
            missing: calls.saturating_sub(seen),
            dropped: drops,
            agent_cpu_pct: cpu_pct,
        });
        drop(agent);
    }
    Ok(out)
}

/// Sends HTTP/1.0 requests at a steady rate for `seconds`.
fn paced_load(port: u16, rate: u32, seconds: u64) {
    let period = Duration::from_secs_f64(1.0 / f64::from(rate));
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut next = Instant::now();
    while Instant::now() < end {
        let _ = http_get(port, "/");
        next += period;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines().next().map(|l| {
                l.split_whitespace()
                    .nth(1)
                    .unwrap_or("0")
                    .parse::<u64>()
                    .unwrap_or(0)
            })
        })
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cpu}, {cores} cores, {:.0} GiB RAM; Linux {}",
        mem as f64 / 1048576.0,
        kernel.trim()
    )
}

fn now_utc() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn git_commit() -> String {
    Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(workspace_root())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

pub fn bench(opts: &BenchOptions) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("benchmarks load eBPF programs: run `sudo -E cargo xtask bench`");
    }
    run(cargo().args(["build", "--release", "-p", "memtrace"]))?;
    let root = workspace_root();
    let fixtures = root.join("target/fixtures");
    run(Command::new(root.join("tests/fixtures/build.sh")).arg(&fixtures))?;
    let paths = Paths {
        memtrace: root.join("target/release/memtrace"),
        fixtures,
    };
    if opts.paths_only {
        return paths_bench(&paths, opts);
    }
    if opts.cost_only || opts.programs_only {
        let mut md = format!(
            "# {} ({} rounds of {} s; machine {}; commit {}, {})\n\n",
            if opts.programs_only {
                "Socket programs per run and per request"
            } else {
                "Cost per request, paired on one server instance"
            },
            opts.rounds,
            opts.seconds,
            machine(),
            git_commit(),
            now_utc()
        );
        cost::cost(&paths, opts, &mut md, opts.programs_only)?;
        print!("{md}");
        return Ok(());
    }
    if opts.soak_only {
        let mut md = format!(
            "# Soak only ({} minutes; machine {}; commit {}, {})\n\n",
            opts.soak_minutes,
            machine(),
            git_commit(),
            now_utc()
        );
        soak::soak(&paths, opts.soak_minutes, &mut md)?;
        print!("{md}");
        return Ok(());
    }
    if opts.modes_only {
        return modes_bench(&paths, opts);
    }
    if opts.uprobe_only {
        let mut md = format!("# Uprobe mode only (commit {})\n", git_commit());
        uprobe_floor(&paths, opts, &mut md)?;
        print!("{md}");
        return Ok(());
    }
    if opts.untraced_only {
        let rounds = opts.rounds.max(FEW_MODES_ROUNDS);
        let mut md = format!(
            "# getppid of an untraced process only ({rounds} rounds; commit {}, {})\n\n",
            git_commit(),
            now_utc()
        );
        untraced_table(&mut md, &untraced_syscalls(&paths, rounds)?);
        print!("{md}");
        return Ok(());
    }
    if opts.faults_only {
        let rounds = opts.rounds.max(FEW_MODES_ROUNDS);
        let mut md = format!(
            "# First-touch faults of a traced process only ({rounds} rounds; commit {}, {})\n\n",
            git_commit(),
            now_utc()
        );
        faults_table(&mut md, &fault_costs(&paths, rounds)?);
        print!("{md}");
        return Ok(());
    }
    if opts.python_only {
        let mut md = format!(
            "# Python sites against tracemalloc only ({} rounds of {} s; commit {})\n",
            opts.rounds,
            opts.seconds,
            git_commit()
        );
        python_bench(&paths, opts, &mut md)?;
        print!("{md}");
        return Ok(());
    }
    let started = Instant::now();
    let mut md = String::new();
    let _ = writeln!(md, "# memtrace benchmarks\n");
    let _ = writeln!(
        md,
        "Machine: {}. Date: {}. memtrace commit {}.\n",
        machine(),
        now_utc(),
        git_commit()
    );
    let _ = writeln!(
        md,
        "Reproduce with `sudo -E cargo xtask bench` (it writes its tables to BENCHMARKS.tmp.md; `--rounds`, `--seconds` and `--soak-minutes` change the run). \
         Ratios compare runs of the same invocation, interleaved off/on in {} rounds of {} s: each ratio is the median over rounds \
         of a run against the off run of its own round, so that the machine's drift over minutes cancels; the machine is shared and noisy, \
         so absolute numbers move between runs and ratios within about ±3%.\n",
        opts.rounds, opts.seconds
    );

    // 1. The fixture server at full speed.
    eprintln!("fixture throughput:");
    let fx = paths.fixtures.clone();
    let leaky = move |port: u16| leaky_server(&fx, port);
    let fixture = Target::fixture(&leaky);
    let modes = [
        Mode::Off,
        Mode::Steady,
        Mode::Accept,
        Mode::Socket,
        Mode::SocketNoPaths,
        Mode::Uprobe,
        Mode::Collect,
        Mode::Growth,
        Mode::Heap,
        Mode::HeapEvery,
    ];
    let fixture_results = throughput(&paths, &fixture, &modes, opts)?;
    let _ = writeln!(md, "## 1. Throughput, fixture server\n");
    let _ = writeln!(
        md,
        "`tests/fixtures/leaky_server` with {FIXTURE_WORKERS} workers, HTTP/1.1 keep-alive, each request writes a 16 KiB scratch buffer (no leak); \
         `wrk -t1 -c{FIXTURE_WORKERS} -d{}s` on loopback; wrk pinned to CPU 0, the server to CPU 1, the agent free.\n",
        opts.seconds
    );
    throughput_table(&mut md, &fixture_results);
    let uprobe_results = uprobe_floor(&paths, opts, &mut md)?;

    // 2. gunicorn.
    eprintln!("gunicorn throughput:");
    let app_dir = root.join("tests/fixtures");
    let gunicorn = move |port: u16| -> Result<Proc> {
        Proc::spawn(
            pinned(SERVER_CPU, "gunicorn")
                .args(["--workers", "4", "--worker-class", "sync", "--bind"])
                .arg(format!("127.0.0.1:{port}"))
                .arg("--chdir")
                .arg(&app_dir)
                .arg("wsgi_app:app")
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
    };
    let gunicorn_target = Target::python("gunicorn", "gunicorn", &gunicorn, 4);
    let gmodes = [
        Mode::Off,
        Mode::Steady,
        Mode::Accept,
        Mode::Socket,
        Mode::SocketNoPaths,
        Mode::AcceptCollect,
        Mode::Growth,
        Mode::Heap,
        Mode::HeapEvery,
    ];
    let gunicorn_results = throughput(&paths, &gunicorn_target, &gmodes, opts)?;
    let _ = writeln!(md, "\n## 2. Throughput, gunicorn\n");
    let _ = writeln!(
        md,
        "Debian's gunicorn, 4 sync workers, `tests/fixtures/wsgi_app.py` (no leak); sync workers close every connection; `wrk -t1 -c4 -d{}s`, pinned as above.\n",
        opts.seconds
    );
    throughput_table(&mut md, &gunicorn_results);

    // 2a. nginx, traced by name without request boundaries.
    eprintln!("nginx throughput:");
    let nginx_start = |port: u16| -> Result<Proc> {
        nginx(
            &std::env::temp_dir().join(format!("memtrace-bench-nginx-{port}")),
            port,
        )
    };
    let nginx_target = Target::python("nginx", "nginx", &nginx_start, 8);
    // Runs of nginx spread by ±8% here (one process of the node among
    // others): more rounds of its two modes, whose medians then resolve a
    // few percent.
    let nginx_opts = BenchOptions {
        rounds: opts.rounds.max(FEW_MODES_ROUNDS),
        ..*opts
    };
    let nginx_results = throughput(
        &paths,
        &nginx_target,
        &[Mode::Off, Mode::Steady],
        &nginx_opts,
    )?;
    let _ = writeln!(md, "\n## 2a. Throughput, nginx\n");
    let _ = writeln!(
        md,
        "Debian's nginx, 2 workers, a 1 KiB static file, keep-alive, traced by name without request boundaries \
         (faults, RSS, lifecycle: the steady state); `wrk -t1 -c8 -d{}s`, pinned as above; medians of {} interleaved rounds.\n",
        opts.seconds, nginx_opts.rounds
    );
    throughput_table(&mut md, &nginx_results);

    // 2b. Per-operation costs.
    eprintln!("per-operation costs:");
    let untraced = untraced_syscalls(&paths, opts.rounds.max(FEW_MODES_ROUNDS))?;
    let micro = micro_costs(&paths, opts.rounds)?;
    let faults = fault_costs(&paths, opts.rounds.max(FEW_MODES_ROUNDS))?;
    python_bench(&paths, opts, &mut md)?;

    let _ = writeln!(md, "\n## 2b. Per-operation cost\n");
    let _ = writeln!(
        md,
        "`tests/fixtures/micro`, in-process timing, interleaved rounds, medians. `syscalls`: ns per getppid(2) — while any \
         syscall tracepoint is attached every syscall of every process takes the kernel's tracing slow path. `faults`: ns per \
         first-touch write fault over 512 MiB of fresh anonymous memory, the process traced by name.\n"
    );
    let _ = writeln!(
        md,
        "| operation | off | on | on + collection | on / off | collection / off |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|");
    for (op, off, on, collect) in &micro {
        let _ = writeln!(
            md,
            "| {op} | {off:.1} ns | {on:.1} ns | {collect:.1} ns | {:.3} | {:.3} |",
            on / off,
            collect / off
        );
    }

    let _ = writeln!(
        md,
        "\nA process memtrace does **not** trace (the neighbours on the node), same fixture, interleaved rounds: the agent \
         in socket mode (the steady state: no syscall tracepoint) and with `--mmap-counters` (syscall tracepoints); {} rounds.\n",
        untraced[0].len()
    );
    untraced_table(&mut md, &untraced);
    let _ = writeln!(
        md,
        "\nFirst-touch faults of the traced fixture with its faults counted from the kernel's per-task counters (read at \
         requests' ends and at exit; what `on` above runs where the kernel's BTF has them) and by a program on every fault \
         (`MEMTRACE_HIDE_KERNEL_FEATURES=task_fault_counters`, what a kernel without BTF runs); {} rounds.\n",
        faults[0].len()
    );
    faults_table(&mut md, &faults);

    // 2c. The heap tier's probes, per malloc/free.
    eprintln!("heap probe cost:");
    let heap_costs = heap_probe_costs(&paths, opts.rounds)?;
    let _ = writeln!(md, "\n## 2c. Heap-tier probe cost per malloc/free\n");
    let _ = writeln!(
        md,
        "`tests/fixtures/micro malloc`: ns per `malloc(64)` + `free` pair, collection on for the process, interleaved rounds, medians. \
         The heap tier traps on every call (a uprobe on malloc's entry, a return probe, a uprobe on free) whatever it samples; \
         the difference between the sampled and the growth tier is what the traps and the entry-side decision cost.\n"
    );
    let _ = writeln!(
        md,
        "| configuration | ns per malloc + free | added to off |"
    );
    let _ = writeln!(md, "|---|---:|---:|");
    let heap_off = heap_costs.first().map_or(0.0, |c| c.1);
    for (mode, ns) in &heap_costs {
        let _ = writeln!(
            md,
            "| {} | {ns:.1} | {:+.1} ns |",
            mode.label(),
            ns - heap_off
        );
    }

    // 3. Kernel-side cost per program.
    eprintln!("per-program cost:");
    let costs = program_costs(&paths, &fixture, Mode::Collect, opts)?;
    let _ = writeln!(md, "\n## 3. Kernel-side cost per program\n");
    let _ = writeln!(
        md,
        "From the kernel's BPF statistics (`kernel.bpf_stats_enabled=1`, run_time_ns / run_cnt per program) during a fixture load run \
         in uprobe mode with snapshot collection on, so every program runs. Collection programs (`page_fault_stac`, `mmap_stacks`, \
         `brk_stacks`, malloc probes) only run between `snapshot` and `stop`.\n"
    );
    let _ = writeln!(md, "| program | runs | mean ns per run |");
    let _ = writeln!(md, "|---|---:|---:|");
    for (name, runs, ns) in &costs {
        let _ = writeln!(md, "| {name} | {runs} | {ns:.0} |");
    }

    // 3b. What path capture adds to the socket programs.
    eprintln!("socket programs with and without path capture:");
    socket_program_table(&mut md, &paths, &fixture, opts, Mode::SocketNoPaths)?;
    socket_program_table(&mut md, &paths, &fixture, opts, Mode::SocketNoFds)?;

    // 4. Highest rate without drops.
    eprintln!("zero-drop rate:");
    let rates = [25_000, 50_000, 100_000, 200_000, 400_000];
    let drops = zero_drop_rate(&paths, &rates, opts.seconds.min(5))?;
    let _ = writeln!(md, "\n## 4. Request events without drops\n");
    let _ = writeln!(
        md,
        "`tests/fixtures/request_loop RATE 5` calls `handle_request` (uprobe + uretprobe, one summary event each) at a paced rate, \
         no network; default ring buffer (4 MiB) and poll interval (100 ms).\n"
    );
    let _ = writeln!(
        md,
        "| asked /s | achieved /s | not counted | ring-buffer drops | agent CPU % of one core | agent µs per event |"
    );
    let _ = writeln!(md, "|---:|---:|---:|---:|---:|---:|");
    for r in &drops {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {:.1} | {:.2} |",
            r.asked,
            r.achieved,
            r.missing,
            r.dropped,
            r.agent_cpu_pct,
            r.agent_cpu_pct * 1e4 / r.achieved.max(1) as f64
        );
    }
    let best = drops
        .iter()
        .filter(|r| r.missing == 0 && r.dropped == 0)
        .map(|r| r.achieved)
        .max()
        .unwrap_or(0);
    let _ = writeln!(
        md,
        "\nHighest achieved rate with every event counted and none dropped: **{best}/s**."
    );

    // 5. The agent itself with 16 workers.
    eprintln!("agent footprint with 16 workers:");
    let fx = paths.fixtures.clone();
    let port = free_port()?;
    let dir = std::env::temp_dir().join("memtrace-bench-16");
    std::fs::create_dir_all(&dir)?;
    let _server = Proc::spawn(
        Command::new(fx.join("leaky_server"))
            .args([port.to_string(), "16".into()])
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )?;
    wait_until(Duration::from_secs(30), || listening(port));
    let agent = Agent::start(&paths, "leaky_server", Mode::Accept, &[])?.expect("on");
    thread::sleep(Duration::from_secs(2));
    let workers = agent.metric("memtrace_workers").unwrap_or(0.0);
    let idle_secs = opts.seconds.max(10) * 2;
    let (c0, _) = agent.footprint();
    paced_load(port, 200, idle_secs);
    let (c1, rss_moderate) = agent.footprint();
    let moderate_cpu = (c1 - c0) / idle_secs as f64 * 100.0;
    let (c2, _) = agent.footprint();
    let t = Instant::now();
    let full_rps = wrk(&format!("http://127.0.0.1:{port}/"), opts.seconds, 1, 16)?;
    let full_secs = t.elapsed().as_secs_f64();
    let (c3, rss_full) = agent.footprint();
    let full_cpu = (c3 - c2) / full_secs * 100.0;
    drop(agent);
    let _ = writeln!(md, "\n## 5. The agent tracing 16 workers\n");
    let _ = writeln!(
        md,
        "`leaky_server` with 16 workers ({workers:.0} processes traced with the master), accept mode. CPU from /proc/PID/stat \
         (user + system) over the run; RSS from smaps_rollup at its end.\n"
    );
    let _ = writeln!(md, "| load | agent CPU % of one core | agent RSS MB |");
    let _ = writeln!(md, "|---|---:|---:|");
    let _ = writeln!(
        md,
        "| 200 req/s for {idle_secs} s (HTTP/1.0, a connection each) | {moderate_cpu:.2} | {:.1} |",
        rss_moderate as f64 / 1048576.0
    );
    let _ = writeln!(
        md,
        "| wrk at full speed ({full_rps:.0} req/s, keep-alive) | {full_cpu:.2} | {:.1} |",
        rss_full as f64 / 1048576.0
    );

    // 6. Soak.
    if opts.soak_minutes > 0 {
        eprintln!("soak ({} min):", opts.soak_minutes);
        let _ = writeln!(md, "\n## 6. Soak\n");
        soak::soak(&paths, opts.soak_minutes, &mut md)?;
    }

    let _ = writeln!(md, "\n## Targets\n");
    let ratio = ModeRuns::ratio;
    let _ = writeln!(
        md,
        "- Steady-state throughput ratio ≥ 0.98 at ≥ 10k req/s: fixture {:.3} (no request boundaries), {:.3} (accept), {:.3} (socket), {:.3} (uprobe); gunicorn {:.3} / {:.3} / {:.3}.",
        ratio(&fixture_results, Mode::Steady),
        ratio(&fixture_results, Mode::Accept),
        ratio(&fixture_results, Mode::Socket),
        ratio(&fixture_results, Mode::Uprobe),
        ratio(&gunicorn_results, Mode::Steady),
        ratio(&gunicorn_results, Mode::Accept),
        ratio(&gunicorn_results, Mode::Socket)
    );
    let _ = writeln!(
        md,
        "- No cost to the node: getppid of an untraced process at {:.3} of its speed with memtrace on (target ≥ 0.98); \
         nginx traced without request boundaries {:.3} (target ≥ 0.98); uprobe mode on the fixture {:.3} (target ≥ 0.8; table 1b, \
         where bare kernel uprobes alone give {:.3}).",
        paired_ratio(&untraced[0], &untraced[1]),
        ratio(&nginx_results, Mode::Steady),
        ratio(&uprobe_results, Mode::Uprobe),
        ratio(&uprobe_results, Mode::BareUprobes)
    );
    let per_event = |rate: u64| {
        drops
            .iter()
            .find(|r| r.asked == rate)
            .map_or(f64::NAN, |r| {
                r.agent_cpu_pct * 1e4 / r.achieved.max(1) as f64
            })
    };
    let _ = writeln!(
        md,
        "- Agent CPU per request summary ≤ 0.5 µs at 100k events/s: {:.2} µs at 100k/s, {:.2} µs at 400k/s asked.",
        per_event(100_000),
        per_event(400_000)
    );
    let _ = writeln!(
        md,
        "- HTTP path capture (socket mode with paths / with --no-http-paths): fixture {:.3}, gunicorn {:.3}.",
        ratio(&fixture_results, Mode::Socket) / ratio(&fixture_results, Mode::SocketNoPaths),
        ratio(&gunicorn_results, Mode::Socket) / ratio(&gunicorn_results, Mode::SocketNoPaths)
    );
    let _ = writeln!(
        md,
        "- Zero drops at 50k req/s: highest clean rate measured {best}/s."
    );
    let _ = writeln!(
        md,
        "- Agent ≤ 2% of one core and ≤ 40 MB with 16 workers: {moderate_cpu:.2}% at 200 req/s, {full_cpu:.1}% at {full_rps:.0} req/s; RSS {:.1} MB.",
        rss_full.max(rss_moderate) as f64 / 1048576.0
    );
    let _ = writeln!(md, "\n(Run took {:.0} s.)", started.elapsed().as_secs_f64());
    std::fs::write(root.join("BENCHMARKS.tmp.md"), &md)?;
    eprintln!("\nresults written to BENCHMARKS.tmp.md (merge the analysis into BENCHMARKS.md)");
    print!("{md}");
    Ok(())
}

/// One run of the micro fixture: ns per operation. `extra` are more agent
/// flags; `traced`: the agent selects the fixture (else it selects nothing).
fn micro_once(
    paths: &Paths,
    op: &str,
    arg: &str,
    mode: Mode,
    traced: bool,
    extra: &[&str],
) -> Result<f64> {
    let mut child = Command::new(paths.fixtures.join("micro"))
        .args([op, arg])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let pid = child.id();
    let mut stdin = child.stdin.take().expect("piped");
    let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
    let _ready = lines.next();
    let name = if traced { "micro" } else { "no-such-process" };
    let agent = Agent::start(paths, name, mode, extra)?;
    if let Some(a) = &agent {
        if traced && !wait_until(Duration::from_secs(10), || a.worker(pid).is_some()) {
            bail!("the agent did not find the micro fixture");
        }
        if mode.collects() {
            a.snapshot()?;
        }
    }
    writeln!(stdin)?;
    let out = lines.next().transpose()?.unwrap_or_default();
    let _ = child.wait();
    drop(agent);
    out.trim()
        .parse()
        .with_context(|| format!("micro printed {out:?}"))
}

/// ns per malloc + free, median, for each collection tier.
fn heap_probe_costs(paths: &Paths, rounds: usize) -> Result<Vec<(Mode, f64)>> {
    let modes = [Mode::Off, Mode::Growth, Mode::Heap, Mode::HeapEvery];
    let mut v: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    for _ in 0..rounds {
        for (i, &mode) in modes.iter().enumerate() {
            v[i].push(micro_once(paths, "malloc", "2000000", mode, true, &[])?);
        }
    }
    Ok(modes
        .iter()
        .zip(v)
        .map(|(&m, mut runs)| {
            let ns = median(&mut runs);
            eprintln!("  malloc + free, {}: {ns:.1} ns", m.label());
            (m, ns)
        })
        .collect())
}

/// (operation, off, on, on + collection) medians in ns.
fn micro_costs(paths: &Paths, rounds: usize) -> Result<Vec<(&'static str, f64, f64, f64)>> {
    let mut out = Vec::new();
    for (op, arg, label) in [
        ("syscalls", "5000000", "getppid syscall"),
        ("faults", "512", "first-touch page fault"),
    ] {
        let mut v = [Vec::new(), Vec::new(), Vec::new()];
        for _ in 0..rounds {
            // Steady mode for "on"; Collect adds the stack programs.
            for (i, mode) in [Mode::Off, Mode::Steady, Mode::Collect]
                .into_iter()
                .enumerate()
            {
                v[i].push(micro_once(paths, op, arg, mode, true, &[])?);
            }
        }
        let [mut off, mut on, mut collect] = v;
        let row = (
            label,
            median(&mut off),
            median(&mut on),
            median(&mut collect),
        );
        eprintln!(
            "  {}: off {:.1} ns, on {:.1} ns, collecting {:.1} ns",
            row.0, row.1, row.2, row.3
        );
        out.push(row);
    }
    Ok(out)
}

/// ns per operation of the micro fixture (`op`, `arg`; `traced`: the agent
/// selects it) under three configurations (mode, more agent flags), in
/// round order: `rounds` interleaved rounds.
fn micro_rounds(
    paths: &Paths,
    (op, arg, traced): (&str, &str, bool),
    configs: [(Mode, &[&str]); 3],
    rounds: usize,
) -> Result<[Vec<f64>; 3]> {
    let mut v = [Vec::new(), Vec::new(), Vec::new()];
    for _ in 0..rounds {
        for (runs, (mode, extra)) in v.iter_mut().zip(&configs) {
            runs.push(micro_once(paths, op, arg, *mode, traced, extra)?);
        }
    }
    Ok(v)
}

/// ns per getppid(2) of a process memtrace does not trace: memtrace off,
/// on in socket mode (the steady state), and on with `--mmap-counters`
/// (syscall tracepoints). Medians of interleaved rounds.
/// ns per getppid of a process memtrace does not trace, in round order:
/// memtrace off, on in socket mode, on with `--mmap-counters`.
fn untraced_syscalls(paths: &Paths, rounds: usize) -> Result<[Vec<f64>; 3]> {
    let v = micro_rounds(
        paths,
        ("syscalls", "5000000", false),
        [
            (Mode::Off, &[]),
            (Mode::Socket, &[]),
            (Mode::Socket, &["--mmap-counters"]),
        ],
        rounds,
    )?;
    eprintln!(
        "  untraced getppid: speed ratio to off {:.3} on, {:.3} with --mmap-counters",
        paired_ratio(&v[0], &v[1]),
        paired_ratio(&v[0], &v[2])
    );
    Ok(v)
}

/// The untraced-getppid table: ns medians, the runs, and each
/// configuration's speed against the off run of its own round (off ns / on
/// ns), median over rounds.
fn untraced_table(out: &mut String, ns: &[Vec<f64>; 3]) {
    paired_table(
        out,
        "getppid, untraced process",
        [
            "memtrace off",
            "on, socket mode",
            "on, socket mode + --mmap-counters",
        ],
        ns,
    );
}

/// ns per first-touch page fault of a traced process, in round order:
/// memtrace off, on (no request boundaries), and on with a program on every
/// fault.
fn fault_costs(paths: &Paths, rounds: usize) -> Result<[Vec<f64>; 3]> {
    let v = micro_rounds(
        paths,
        ("faults", "512", true),
        [
            (Mode::Off, &[]),
            (Mode::Steady, &[]),
            (Mode::SteadyFaultProgram, &[]),
        ],
        rounds,
    )?;
    eprintln!(
        "  first-touch fault: speed ratio to off {:.3} on, {:.3} with a program on every fault",
        paired_ratio(&v[0], &v[1]),
        paired_ratio(&v[0], &v[2])
    );
    Ok(v)
}

fn faults_table(out: &mut String, ns: &[Vec<f64>; 3]) {
    paired_table(
        out,
        "first-touch fault, traced process",
        [
            Mode::Off.label(),
            "on, the kernel's fault counters read",
            Mode::SteadyFaultProgram.label(),
        ],
        ns,
    );
}

/// ns medians, the runs, and each configuration's speed against the off
/// run of its own round (off ns / its ns), median over rounds.
fn paired_table(out: &mut String, what: &str, labels: [&str; 3], ns: &[Vec<f64>; 3]) {
    let _ = writeln!(
        out,
        "| {what} | median ns | runs, in round order | ratio of speed to off (median of rounds) |"
    );
    let _ = writeln!(out, "|---|---:|---|---:|");
    for (label, runs) in labels.iter().zip(ns) {
        runs_row(out, label, runs, 1, paired_ratio(&ns[0], runs));
    }
}

/// nginx with 2 workers serving a static file, its config in `dir`.
fn nginx(dir: &Path, port: u16) -> Result<Proc> {
    std::fs::create_dir_all(dir.join("html"))?;
    std::fs::write(dir.join("html/index.html"), "x".repeat(1024))?;
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "worker_processes 2;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 1024; }}\n\
             http {{ access_log off; client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d}; uwsgi_temp_path {d}; scgi_temp_path {d};\n\
             server {{ listen 127.0.0.1:{port}; root {d}/html; }} }}\n",
            d = dir.display()
        ),
    )?;
    Proc::spawn(
        pinned(SERVER_CPU, "/usr/sbin/nginx")
            .arg("-c")
            .arg(&conf)
            .arg("-p")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
}

/// Mean ns per run of the socket programs in socket mode and in `variant`
/// (socket mode without path capture, or without descriptor counts),
/// interleaved rounds, medians: what the difference costs per run.
fn socket_program_table(
    md: &mut String,
    paths: &Paths,
    fixture: &Target,
    opts: &BenchOptions,
    variant: Mode,
) -> Result<()> {
    let modes = [Mode::Socket, variant];
    // ns per run by mode, program.
    let mut ns = vec![vec![Vec::new(); SOCKET_PROGRAMS.len()]; modes.len()];
    for _ in 0..opts.rounds {
        for (m, &mode) in modes.iter().enumerate() {
            let costs = program_costs(paths, fixture, mode, opts)?;
            for (p, name) in SOCKET_PROGRAMS.iter().enumerate() {
                if let Some((_, _, v)) = costs.iter().find(|c| c.0 == *name) {
                    ns[m][p].push(*v);
                }
            }
        }
    }
    let (title, what, column) = match variant {
        Mode::SocketNoFds => (
            "3c. Socket programs with and without descriptor counts",
            "With counts, each request's two ends also read the worker's descriptor table (a pointer chase and one copy of its open-descriptor bitmap) and test whether the connection's socket still has a descriptor.",
            "--no-fd-counts",
        ),
        _ => (
            "3b. Socket programs with and without HTTP path capture",
            "With capture, the first read of each request also reads the buffer address from the task's saved syscall registers and copies and scans up to 128 bytes of the request line.",
            "--no-http-paths",
        ),
    };
    let _ = writeln!(md, "\n## {title}\n");
    let _ = writeln!(
        md,
        "Kernel BPF statistics as in 3, `leaky_server` under wrk (keep-alive, `GET / HTTP/1.1`), socket mode; {} interleaved rounds, \
         medians. {what}\n",
        opts.rounds
    );
    let _ = writeln!(
        md,
        "| program | socket mode, ns per run | {column}, ns per run | difference |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|");
    for (p, name) in SOCKET_PROGRAMS.iter().enumerate() {
        let on = median(&mut ns[0][p].clone());
        let off = median(&mut ns[1][p].clone());
        let _ = writeln!(md, "| {name} | {on:.0} | {off:.0} | {:+.0} |", on - off);
    }
    Ok(())
}

/// Socket mode with and without HTTP path capture on the fixture, and the
/// socket programs' kernel cost (`--paths-only`).
fn paths_bench(paths: &Paths, opts: &BenchOptions) -> Result<()> {
    fixture_bench(
        paths,
        opts,
        "HTTP path capture only",
        &[Mode::Off, Mode::Socket, Mode::SocketNoPaths],
    )
}

/// The steady state and each request mode on the fixture, and the socket
/// programs' kernel cost: what a change to the programs' variants could move
/// (`--modes-only`).
fn modes_bench(paths: &Paths, opts: &BenchOptions) -> Result<()> {
    fixture_bench(
        paths,
        opts,
        "Steady state and request modes only",
        &[
            Mode::Off,
            Mode::Steady,
            Mode::Accept,
            Mode::Socket,
            Mode::SocketNoFds,
            Mode::Uprobe,
        ],
    )
}

/// The fixture's throughput in `modes` and the socket programs' table.
fn fixture_bench(paths: &Paths, opts: &BenchOptions, what: &str, modes: &[Mode]) -> Result<()> {
    let fx = paths.fixtures.clone();
    let leaky = move |port: u16| leaky_server(&fx, port);
    let fixture = Target::fixture(&leaky);
    let mut md = format!(
        "# {what} ({} rounds of {} s; commit {}, {})\n\n",
        opts.rounds,
        opts.seconds,
        git_commit(),
        now_utc()
    );
    let results = throughput(paths, &fixture, modes, opts)?;
    throughput_table(&mut md, &results);
    for &variant in modes
        .iter()
        .filter(|m| matches!(m, Mode::SocketNoPaths | Mode::SocketNoFds))
    {
        socket_program_table(&mut md, paths, &fixture, opts, variant)?;
    }
    print!("{md}");
    Ok(())
}

/// One configuration of the Python comparison: the server's environment
/// (tracemalloc through `PYTHONTRACEMALLOC`), and memtrace's arguments
/// when it runs (collecting from a snapshot on).
struct PyConfig {
    label: &'static str,
    tracemalloc: Option<&'static str>,
    memtrace: Option<&'static [&'static str]>,
}

const PY_CONFIGS: &[PyConfig] = &[
    PyConfig {
        label: "off",
        tracemalloc: None,
        memtrace: None,
    },
    PyConfig {
        label: "memtrace on, steady state (no snapshot)",
        tracemalloc: None,
        memtrace: Some(&[]),
    },
    PyConfig {
        label: "memtrace collecting, growth tier, 25 Python frames",
        tracemalloc: None,
        memtrace: Some(&["--collect", "growth"]),
    },
    PyConfig {
        label: "memtrace collecting, heap tier, native frames only",
        tracemalloc: None,
        memtrace: Some(&["--collect", "heap", "--python-frames", "0"]),
    },
    PyConfig {
        label: "memtrace collecting, heap tier, 25 Python frames",
        tracemalloc: None,
        memtrace: Some(&["--collect", "heap"]),
    },
    PyConfig {
        label: "memtrace collecting, pymalloc tier, 25 Python frames",
        tracemalloc: None,
        memtrace: Some(&["--collect", "pymalloc"]),
    },
    PyConfig {
        label: "tracemalloc, 1 frame (PYTHONTRACEMALLOC=1)",
        tracemalloc: Some("1"),
        memtrace: None,
    },
    PyConfig {
        label: "tracemalloc, 25 frames (PYTHONTRACEMALLOC=25)",
        tracemalloc: Some("25"),
        memtrace: None,
    },
];

/// A Python server of the comparison: (name for the table, process name,
/// how to start it on a port with an environment).
type PyServer<'a> = (
    &'static str,
    &'static str,
    &'a dyn Fn(u16, &[(&str, &str)]) -> Result<Proc>,
);

/// Python allocation sites against tracemalloc: the same app, the same
/// load, interleaved rounds; medians of requests per second.
fn python_bench(paths: &Paths, opts: &BenchOptions, md: &mut String) -> Result<()> {
    let app_dir = workspace_root().join("tests/fixtures");
    let gunicorn = |port: u16, env: &[(&str, &str)]| -> Result<Proc> {
        Proc::spawn(
            pinned(SERVER_CPU, "gunicorn")
                .args(["--workers", "2", "--worker-class", "sync", "--bind"])
                .arg(format!("127.0.0.1:{port}"))
                .arg("--chdir")
                .arg(&app_dir)
                .arg("pyleak_app:app")
                .envs(env.iter().copied())
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
    };
    let uwsgi = |port: u16, env: &[(&str, &str)]| -> Result<Proc> {
        Proc::spawn(
            pinned(SERVER_CPU, "uwsgi")
                .args(["--plugin", "python3", "--master", "--need-app"])
                .args(["--die-on-term", "--disable-logging", "--workers", "2"])
                .arg("--chdir")
                .arg(&app_dir)
                .args(["--wsgi-file", "pyleak_app.py", "--callable", "app"])
                .arg("--http-socket")
                .arg(format!("127.0.0.1:{port}"))
                .envs(env.iter().copied())
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
    };
    // Debian sid's python3.14 (the root `cargo xtask setup` makes), the
    // fixture served by the standard library's wsgiref in a chroot: one
    // process, so the same load and a different server than the rows above.
    let sid = crate::setup::sid_root();
    let sid_app = sid.join("srv/memtrace-fixtures");
    std::fs::create_dir_all(&sid_app)?;
    std::fs::copy(app_dir.join("pyleak_app.py"), sid_app.join("pyleak_app.py"))?;
    let python314 = |port: u16, env: &[(&str, &str)]| -> Result<Proc> {
        let serve = format!(
            "import sys, wsgiref.simple_server as s\n\
             sys.path.insert(0, '/srv/memtrace-fixtures')\n\
             import pyleak_app as a\n\
             class Quiet(s.WSGIRequestHandler):\n    def log_message(self, *args): pass\n\
             s.make_server('127.0.0.1', {port}, a.app, handler_class=Quiet).serve_forever()"
        );
        Proc::spawn(
            pinned(SERVER_CPU, "chroot")
                .arg(&sid)
                .args(["/usr/bin/python3.14", "-c", &serve])
                .envs(env.iter().copied())
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
    };
    let servers: [PyServer; 3] = [
        (
            "gunicorn (Debian python3.11: pymalloc inlined, not probed)",
            "gunicorn",
            &gunicorn,
        ),
        ("uWSGI (libpython3.11: pymalloc probed)", "uwsgi", &uwsgi),
        (
            "wsgiref on Debian sid's python3.14.10, chrooted (frames through _Py_DebugOffsets; pymalloc inlined, not probed)",
            "python3.14",
            &python314,
        ),
    ];
    let _ = writeln!(md, "\n## 2d. Python allocation sites against tracemalloc\n");
    let _ = writeln!(
        md,
        "`tests/fixtures/pyleak_app.py`, `/work?n=100` (builds 100 small dicts and serialises them, keeps nothing), 2 sync workers; \
         `wrk -t1 -c2 -d{}s`, pinned as above, medians of {} interleaved rounds. tracemalloc runs in the same app without memtrace, started by `PYTHONTRACEMALLOC` at interpreter start; \
         memtrace collects from a snapshot taken before the load (heap and pymalloc tiers at the default 512 KiB sampling; \
         the pymalloc tier probes CPython's object allocator where the build calls it through its table, uWSGI's libpython here, and is the heap tier on Debian's python3.11, which inlines it).\n",
        opts.seconds,
        opts.rounds.min(3)
    );
    // 16 configurations a round: at most 3 rounds keep the section near
    // ten minutes.
    let rounds = opts.rounds.min(3);
    for (name, process_name, start) in servers {
        eprintln!("{name}:");
        let mut runs: Vec<Vec<f64>> = vec![Vec::new(); PY_CONFIGS.len()];
        for round in 0..rounds {
            for (i, config) in PY_CONFIGS.iter().enumerate() {
                let port = free_port()?;
                let env: Vec<(&str, &str)> = config
                    .tracemalloc
                    .map(|n| ("PYTHONTRACEMALLOC", n))
                    .into_iter()
                    .collect();
                let server = start(port, &env)?;
                if !wait_until(Duration::from_secs(30), || listening(port)) {
                    bail!("{name} did not listen on {port}");
                }
                let agent = match config.memtrace {
                    Some(args) => Agent::start(paths, process_name, Mode::Steady, args)?,
                    None => None,
                };
                if let Some(a) = &agent {
                    // Let the agent find every worker and read its
                    // interpreter before the load.
                    thread::sleep(Duration::from_secs(3));
                    if config.memtrace.is_some_and(|args| !args.is_empty()) {
                        a.snapshot()?;
                    }
                }
                let rps = wrk(
                    &format!("http://127.0.0.1:{port}/work?n=100"),
                    opts.seconds,
                    1,
                    2,
                )?;
                eprintln!(
                    "  round {}: {:<52} {rps:>8.0} req/s",
                    round + 1,
                    config.label
                );
                runs[i].push(rps);
                drop(agent);
                drop(server);
            }
        }
        let _ = writeln!(md, "{name}:\n");
        let rows: Vec<(&str, &[f64])> = PY_CONFIGS
            .iter()
            .zip(&runs)
            .map(|(config, v)| (config.label, v.as_slice()))
            .collect();
        runs_table(md, &rows);
        let _ = writeln!(md);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{paired_ratio, runs_table, untraced_table};

    #[test]
    fn paired_ratio_cancels_the_machines_drift() {
        // Every "on" run is 10% slower than the "off" run of its round; the
        // machine halves its speed from round 3 on ("off" of round 3 just
        // before it does). The ratio of medians would say 0.45.
        let off = [100.0, 100.0, 100.0, 50.0, 50.0];
        let on = [90.0, 90.0, 45.0, 45.0, 45.0];
        assert!((paired_ratio(&on, &off) - 0.9).abs() < 1e-9);
    }

    #[test]
    fn untraced_table_pairs_speed_ratios_by_round() {
        // "on" costs 2% more ns than off in every round; the machine slows
        // by half from round 2, which a ratio of medians would take for a
        // 0.67 on the 3 rounds.
        let off = vec![100.0, 200.0, 200.0];
        let on = vec![102.0, 204.0, 204.0];
        let counters = vec![150.0, 300.0, 300.0];
        let mut out = String::new();
        untraced_table(&mut out, &[off, on, counters]);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 5, "{out}");
        assert_eq!(
            lines[2],
            "| memtrace off | 200.0 | 100.0, 200.0, 200.0 | 1.000 |"
        );
        assert_eq!(
            lines[3],
            "| on, socket mode | 204.0 | 102.0, 204.0, 204.0 | 0.980 |"
        );
        assert_eq!(
            lines[4],
            "| on, socket mode + --mmap-counters | 300.0 | 150.0, 300.0, 300.0 | 0.667 |"
        );
    }

    #[test]
    fn runs_table_rows_give_the_median_runs_and_paired_ratio() {
        let mut out = String::new();
        let off = [100.0, 50.0, 80.0];
        let on = [90.0, 45.0, 72.0];
        runs_table(&mut out, &[("off", &off), ("on", &on)]);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 4, "{out}");
        assert_eq!(lines[2], "| off | 80 | 100, 50, 80 | 1.000 |");
        assert_eq!(lines[3], "| on | 72 | 90, 45, 72 | 0.900 |");
    }

    #[test]
    fn paired_ratio_skips_failed_off_runs() {
        assert!((paired_ratio(&[80.0, 5.0, 80.0], &[100.0, 0.0, 100.0]) - 0.8).abs() < 1e-9);
        assert_eq!(paired_ratio(&[], &[]), 0.0);
    }
}
