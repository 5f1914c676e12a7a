//! Processes that lie to the agent, or shape what it reads: it keeps
//! tracing them and everything else.
use std::{
    net::SocketAddr,
    path::Path,
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    time::Duration,
};

use memtrace::{kernel::uprobes, model::procinfo};
use memtrace_tests::*;

/// A file at `/`, removed when dropped.
struct RootFile(String);

impl Drop for RootFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A process in a container owns its `/`, so it can map a file named like
/// the kernel names System V shared memory (`/SYSV` and 8 hex digits) but
/// shorter. procfs-core's maps parser slices such a name to 13 bytes and
/// panics; memtrace's own (`procmaps`) takes it. The interpreter is still
/// found and read, and every reader of the process's mappings answers.
#[test]
fn a_file_mapped_under_a_sysv_like_name_leaves_the_process_readable() {
    let _serial = serial();
    let file = RootFile(format!("/SYSV{}", std::process::id() % 1000));
    std::fs::write(&file.0, vec![7u8; 8192]).unwrap();
    let agent = AgentHarness::start(test_settings(&["python3.11"]));
    let script = format!(
        "import mmap, time\n\
         f = open('{}', 'rb')\n\
         m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)\n\
         print('ready', flush=True)\n\
         time.sleep(120)",
        file.0
    );
    let mut p = Proc::spawn(
        Command::new("/usr/bin/python3.11")
            .args(["-c", &script])
            .stdout(Stdio::piped()),
    );
    let out = p.child.stdout.take().unwrap();
    let line = BufReader::new(out).lines().next().unwrap().unwrap();
    assert_eq!(line, "ready");
    let pid = p.pid();
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    assert!(
        maps.contains(&format!(" {}\n", file.0)),
        "the kernel shows the mapping:\n{maps}"
    );

    let mut python = None;
    agent.wait(Duration::from_secs(15), |s| {
        python = s.registry.get(pid).and_then(|w| w.python.clone());
        python.is_some()
    });
    let python = python.expect("the interpreter is found despite the mapping");
    assert!(python.supported, "{python:?}");

    let mappings = procinfo::mappings(pid).expect("smaps is read");
    let ours = mappings
        .iter()
        .find(|m| m.name == file.0)
        .expect("the file's mapping is listed");
    assert_eq!(ours.size, 8192);
    assert!(
        procinfo::code_mappings(pid)
            .iter()
            .any(|m| m.path == "/usr/bin/python3.11")
    );
    assert!(
        uprobes::libc_path(pid).is_some(),
        "libc is found for the allocator probes"
    );
    assert!(
        agent.with(|s| s.registry.get(pid).is_some()),
        "still traced"
    );
}

const TOKEN: &str = "hostile-token";

fn get(addr: SocketAddr, path: &str) -> serde_json::Value {
    let sep = if path.contains('?') { '&' } else { '?' };
    let (code, body) = api_get(addr, &format!("{path}{sep}token={TOKEN}"));
    assert_eq!(code, 200, "{path}: {body}");
    body
}

/// The fixture `hostile` behind a symlink named `name`, running `storm`
/// with `n`: a process the agent traces by that name.
fn hostile(dir: &Path, name: &str, storm: &str, n: u64) -> Proc {
    let link = dir.join(name);
    if !link.exists() {
        std::os::unix::fs::symlink(fixtures().bin("hostile"), &link).unwrap();
    }
    Proc::spawn(
        Command::new(&link)
            .args([storm, &n.to_string()])
            .stdout(Stdio::piped()),
    )
}

/// Waits for the fixture's `done COUNT` line and returns COUNT.
fn storm_done(p: &mut Proc) -> u64 {
    let out = p.child.stdout.take().expect("piped stdout");
    let line = BufReader::new(out).lines().next().unwrap().unwrap();
    line.strip_prefix("done ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the storm's last line: {line}"))
}

/// A path the route table cannot collapse: letters from g to z (never an
/// id: no digits, not hex), one path per `i`.
fn distinct_path(mut i: usize) -> String {
    let mut word = String::new();
    loop {
        word.push((b'g' + (i % 20) as u8) as char);
        i /= 20;
        if i == 0 {
            break;
        }
    }
    format!("/hostile/{word}")
}

/// GETs `total` distinct paths from `concurrency` threads, a connection
/// each; every one must succeed.
fn drive_distinct(port: u16, total: usize, concurrency: usize) {
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let threads: Vec<_> = (0..concurrency)
        .map(|_| {
            let next = next.clone();
            std::thread::spawn(move || {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= total {
                        break;
                    }
                    let path = distinct_path(i);
                    http_get(port, &path).unwrap_or_else(|e| panic!("GET {path}: {e}"));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("load thread");
    }
}

/// Requests counted by the agent for each of `pids`, from its API.
fn counted(addr: SocketAddr, pids: &[u32]) -> u64 {
    pids.iter()
        .map(|p| get(addr, &format!("/v1/workers/{p}"))["requests_seen"].as_u64().unwrap_or(0))
        .sum()
}

/// The agent's resident set now and at its peak, and its CPU seconds.
fn footprint(pid: u32) -> (u64, u64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    (kb("VmRSS:"), kb("VmHWM:"), ticks / 100.0)
}

/// Log lines whose message starts with `prefix`, and their pids.
fn lines_about(agent: &AgentProcess, prefix: &str) -> Vec<u64> {
    agent
        .logs()
        .iter()
        .filter(|l| l["message"].as_str().is_some_and(|m| m.starts_with(prefix)))
        .filter_map(|l| l["pid"].as_u64())
        .collect()
}

/// What the agent used while a storm ran, against the bounds README states.
struct Bounds {
    pid: u32,
    cpu_before: f64,
}

impl Bounds {
    fn start(agent: &AgentProcess) -> Self {
        let pid = agent.proc.pid();
        Self {
            pid,
            cpu_before: footprint(pid).2,
        }
    }

    /// Asserts the agent's peak resident set, at most `peak_bytes`, and the
    /// CPU it spent since `start`, at most `cpu_secs`.
    fn check(&self, what: &str, peak_bytes: u64, cpu_secs: f64) {
        let (rss, peak, cpu) = footprint(self.pid);
        let spent = cpu - self.cpu_before;
        eprintln!(
            "{what}: agent RSS {} MiB, peak {} MiB, {spent:.2} CPU s",
            rss >> 20,
            peak >> 20
        );
        assert!(
            peak <= peak_bytes,
            "{what}: agent peak RSS {} MiB",
            peak >> 20
        );
        assert!(spent <= cpu_secs, "{what}: agent CPU {spent:.2} s");
    }
}

/// Real gunicorn (2 sync workers) traced in socket mode by the agent,
/// warmed up with 20 requests the agent counted.
fn traced_gunicorn(agent_args: &[&str]) -> (AgentProcess, SocketAddr, Proc, u16, Vec<u32>) {
    let (agent, addr) = judging_agent("gunicorn", "socket", agent_args, TOKEN);
    let port = free_port();
    let server = gunicorn(port, 2, 0);
    assert!(wait_port(port, SERVER_START), "gunicorn listens");
    let workers = wait_children(server.pid(), 2);
    drive(port, "/warm", 20, 2);
    assert_counted(addr, &workers, 20);
    (agent, addr, server, port, workers)
}

/// Waits for the agent to count exactly `sent` requests over `pids`.
fn assert_counted(addr: SocketAddr, pids: &[u32], sent: u64) {
    let mut seen = 0;
    wait_for(Duration::from_secs(60), || {
        seen = counted(addr, pids);
        seen >= sent
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(counted(addr, pids), sent, "requests counted vs sent");
}

/// A process named like the server forks 10,000 children while a client
/// sends 100,000 distinct paths to the real gunicorn: the agent stays
/// within its bounds, counts every request the real workers served, and
/// names the forking process and each flooded worker in one line each;
/// the children are not logged one by one.
#[test]
fn fork_and_path_storms_leave_the_real_workers_counted_exactly() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let (agent, addr, _server, port, workers) = traced_gunicorn(&[]);
    let bounds = Bounds::start(&agent);

    let mut forker = hostile(dir.path(), "gunicorn", "fork", FORKS);
    let paths = std::thread::spawn(move || drive_distinct(port, PATHS, 4));
    assert_eq!(storm_done(&mut forker), FORKS);
    paths.join().expect("the path storm");
    drive(port, "/after", 200, 2);
    assert_counted(addr, &workers, 20 + PATHS as u64 + 200);
    bounds.check("fork and path storms", AGENT_PEAK_BYTES, STORM_CPU_SECS);

    let forker_pid = u64::from(forker.pid());
    assert!(
        agent
            .wait_log(Duration::from_secs(10), |l| l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("process forks faster"))
                && l["pid"].as_u64() == Some(forker_pid))
            .is_some(),
        "the forking process is named"
    );
    assert_eq!(lines_about(&agent, "process forks faster"), [forker_pid]);
    let attached = lines_about(&agent, "worker attached").len() as u64;
    assert!(
        attached <= memtrace::model::storms::FORK_STORM.count + 10,
        "{attached} children logged one by one"
    );
    let mut flooded = lines_about(&agent, "worker's route table is full");
    flooded.sort_unstable();
    let mut expected: Vec<u64> = workers.iter().map(|&p| u64::from(p)).collect();
    expected.sort_unstable();
    assert_eq!(flooded, expected, "each flooded worker is named once");
    for w in &workers {
        let routes = get(addr, &format!("/v1/workers/{w}/routes"));
        assert_eq!(routes["routes"]["max_routes"], 100, "{routes}");
        assert!(
            routes["routes"]["overflowed_requests"].as_u64().unwrap() > 0,
            "{routes}"
        );
    }
}

/// A process named like the server execs itself 1,000 times: one line
/// names it, its images are not logged one by one, and the real gunicorn
/// beside it is counted exactly.
#[test]
fn an_exec_loop_is_named_once_and_the_real_workers_counted() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let (agent, addr, _server, port, workers) = traced_gunicorn(&[]);
    let bounds = Bounds::start(&agent);
    let mut looper = hostile(dir.path(), "gunicorn", "exec", EXECS);
    let load = std::thread::spawn(move || drive(port, "/during", 500, 2));
    assert_eq!(storm_done(&mut looper), 0);
    load.join().expect("load");
    assert_counted(addr, &workers, 20 + 500);
    bounds.check("exec loop", AGENT_PEAK_BYTES, STORM_CPU_SECS);
    let pid = u64::from(looper.pid());
    assert!(
        agent
            .wait_log(Duration::from_secs(10), |l| l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("process execs in a loop")))
            .is_some(),
        "the exec loop is named"
    );
    assert_eq!(lines_about(&agent, "process execs in a loop"), [pid]);
    let followed = lines_about(&agent, "traced process exec'd")
        .into_iter()
        .filter(|&p| p == pid)
        .count() as u64;
    assert!(
        followed <= memtrace::model::storms::EXEC_STORM.count + 1,
        "{followed} execs logged one by one"
    );
    // Still followed: its last image is the one traced.
    assert!(wait_for(Duration::from_secs(10), || {
        get(addr, &format!("/v1/workers/{pid}"))["pid"].as_u64() == Some(pid)
    }));
}

/// A process named like the server maps, touches and unmaps 64 KiB as fast
/// as it can while allocation sites are collected: one line names it, the
/// agent stays within its bounds, the real gunicorn is counted exactly, and
/// the diff still answers.
#[test]
fn a_mapping_storm_while_collecting_is_named_and_bounded() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let (agent, addr, _server, port, workers) = traced_gunicorn(&[]);
    let mut mapper = hostile(dir.path(), "gunicorn", "mmap", MAP_SECS);
    let pid = u64::from(mapper.pid());
    assert!(wait_for(Duration::from_secs(10), || {
        get(addr, &format!("/v1/workers/{pid}"))["pid"].as_u64() == Some(pid)
    }));
    let bounds = Bounds::start(&agent);
    get(addr, "/debug/memory/?action=snapshot");
    let load = std::thread::spawn(move || drive(port, "/during", 500, 2));
    let pairs = storm_done(&mut mapper);
    load.join().expect("load");
    assert_counted(addr, &workers, 20 + 500);
    let diff = get(addr, "/debug/memory/?action=diff&limit=5");
    // Its mmap site, every call counted (its bytes are mapped, not live).
    let site = diff["mapping_call_growth"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["kind"] == "mmap" && s["pids"].as_array().is_some_and(|p| p.contains(&pid.into())))
        .unwrap_or_else(|| panic!("the storm's mmap site: {diff}"))
        .clone();
    let calls = site["objects"].as_u64().unwrap();
    eprintln!("{pairs} map/unmap pairs in {MAP_SECS} s, {calls} counted at its site since the snapshot");
    assert!(calls > 0 && calls <= pairs, "{calls} calls of {pairs}: {site}");
    get(addr, "/debug/memory/?action=stop");
    bounds.check("mapping storm", COLLECTING_PEAK_BYTES, STORM_CPU_SECS);
    assert!(
        agent
            .wait_log(Duration::from_secs(10), |l| l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("process maps memory faster")))
            .is_some(),
        "the mapping storm is named: {pairs} pairs"
    );
    assert_eq!(lines_about(&agent, "process maps memory faster"), [pid]);
}

/// Children the fork storm makes, distinct paths the client sends, execs
/// of the exec loop, seconds of the mapping storm.
const FORKS: u64 = 10_000;
const PATHS: usize = 100_000;
const EXECS: u64 = 1_000;
const MAP_SECS: u64 = 15;
/// The agent's resident set, bounded through every storm (README,
/// Security).
const AGENT_PEAK_BYTES: u64 = 64 << 20;
/// The same while allocation sites are collected: symbolization holds the
/// binaries' line tables.
const COLLECTING_PEAK_BYTES: u64 = 128 << 20;
/// CPU seconds the agent may spend on one storm and the real server's
/// load beside it (the debug build; README states the release's).
const STORM_CPU_SECS: f64 = 20.0;
