//! Processes that lie to the agent, or shape what it reads: it keeps
//! tracing them and everything else.
use std::{
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    path::Path,
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

/// Whether the agent's API knows `pid` (a 404 until it is attached).
fn traced(addr: SocketAddr, pid: u64) -> bool {
    let (code, body) = api_get(addr, &format!("/v1/workers/{pid}?token={TOKEN}"));
    code == 200 && body["pid"].as_u64() == Some(pid)
}

/// Requests counted by the agent for each of `pids`, from its API.
fn counted(addr: SocketAddr, pids: &[u32]) -> u64 {
    pids.iter()
        .map(|p| {
            get(addr, &format!("/v1/workers/{p}"))["requests_seen"]
                .as_u64()
                .unwrap_or(0)
        })
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
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
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

/// Waits for the line starting with `prefix`, and checks that it is the
/// only one and names `pid`.
fn assert_named_once(agent: &AgentProcess, prefix: &str, pid: u64) {
    let named = agent.wait_log(Duration::from_secs(10), |l| {
        l["message"].as_str().is_some_and(|m| m.starts_with(prefix))
    });
    assert!(named.is_some(), "no line `{prefix}…`: {:#?}", agent.logs());
    assert_eq!(lines_about(agent, prefix), [pid], "{prefix}");
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

    assert_named_once(&agent, "process forks faster", u64::from(forker.pid()));
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
    assert_named_once(&agent, "process execs in a loop", pid);
    let followed = lines_about(&agent, "traced process exec'd")
        .into_iter()
        .filter(|&p| p == pid)
        .count() as u64;
    assert!(
        followed <= memtrace::model::storms::EXEC_STORM.count + 1,
        "{followed} execs logged one by one"
    );
    // Still followed: its last image is the one traced.
    assert!(
        wait_for(Duration::from_secs(10), || traced(addr, pid)),
        "{pid} is traced"
    );
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
    assert!(
        wait_for(Duration::from_secs(10), || traced(addr, pid)),
        "{pid} is traced"
    );
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
        .find(|s| {
            s["kind"] == "mmap"
                && s["pids"]
                    .as_array()
                    .is_some_and(|p| p.contains(&pid.into()))
        })
        .unwrap_or_else(|| panic!("the storm's mmap site: {diff}"))
        .clone();
    let calls = site["objects"].as_u64().unwrap();
    eprintln!(
        "{pairs} map/unmap pairs in {MAP_SECS} s, {calls} counted at its site since the snapshot"
    );
    assert!(
        calls > 0 && calls <= pairs,
        "{calls} calls of {pairs}: {site}"
    );
    get(addr, "/debug/memory/?action=stop");
    bounds.check("mapping storm", COLLECTING_PEAK_BYTES, STORM_CPU_SECS);
    assert_named_once(&agent, "process maps memory faster", pid);
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

/// Seconds the fake CPython allocates for: longer than the test needs.
const FAKE_SECS: u64 = 40;
/// `MAX_STR_CHARS` of the code-object reader: the longest `co_qualname` or
/// `co_filename` it reads.
const MAX_NAME: usize = memtrace::model::pycode::MAX_STR_CHARS as usize;
/// CPU seconds the agent may spend tracing the fake and collecting its
/// sites for the test's 15 s (the debug build spends about 0.6).
const FAKE_CPU_SECS: f64 = 2.0;

/// The frames of a site's stack as the JSON shows them: a Python frame
/// read is `FILE:LINE NAME`, one not read `0xADDR [python] (reason)`.
fn stack_of(site: &serde_json::Value) -> Vec<String> {
    site["stack"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f.as_str())
        .map(str::to_string)
        .collect()
}

/// Frames of each stack of a folded diff (`root;...;leaf before after`),
/// which has every frame where the JSON shows the first 16.
fn folded_depths(folded: &str) -> Vec<usize> {
    folded
        .lines()
        .filter_map(|l| l.rsplitn(3, ' ').nth(2))
        .map(|stack| stack.split(';').count())
        .collect()
}

/// Every site of a diff (heap, faults, mapping calls) that names `pid`.
fn sites_of(diff: &serde_json::Value, pid: u32) -> Vec<serde_json::Value> {
    ["growth", "fault_growth", "mapping_call_growth"]
        .iter()
        .flat_map(|list| diff[list].as_array().cloned().unwrap_or_default())
        .filter(|s| {
            s["pids"]
                .as_array()
                .is_some_and(|p| p.contains(&pid.into()))
        })
        .collect()
}

/// A process named like the server maps a fake `libpython3.11.so.1.0`
/// (tests/fixtures/fake_libpython.c) whose frames and code objects lie: a
/// frame chain that cycles, a frame that is its own previous, a code
/// object name and a line table of 2^40 bytes, an "ASCII" file name of
/// bytes that are not, a file name and a code object in unmapped memory,
/// and a name of exactly the reader's bound. The agent detects it as
/// CPython 3.11, the kernel walks its frames and probes its object
/// allocator, and the agent reads its code objects while allocation sites
/// are collected: it stays within its bounds, every stack has at most
/// `PY_MAX_FRAMES` Python frames, no name is longer than the bound, what it
/// cannot read says why, and its log names the fake in a few lines.
#[test]
fn fake_cpython_whose_memory_lies_is_read_within_bounds() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let (agent, addr) = judging_agent("uwsgi", "socket", &["--collect", "pymalloc"], TOKEN);
    let bounds = Bounds::start(&agent);
    let link = dir.path().join("uwsgi");
    std::os::unix::fs::symlink(fixtures().bin("fake_python"), &link).unwrap();
    let mut fake = Proc::spawn(
        Command::new(&link)
            .arg(FAKE_SECS.to_string())
            .stdout(Stdio::piped()),
    );
    let out = fake.child.stdout.take().unwrap();
    let mut lines = BufReader::new(out).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "ready");
    let pid = fake.pid();
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    assert!(
        maps.contains("/libpython3.11.so.1.0\n"),
        "the fake interpreter is mapped:\n{maps}"
    );

    // Detected as CPython 3.11.4 and readable: the kernel reads its frames
    // and probes its allocator table's functions.
    let mut status = serde_json::Value::Null;
    let ready = wait_for(Duration::from_secs(30), || {
        let (code, body) = api_get(addr, &format!("/v1/workers/{pid}?token={TOKEN}"));
        status = body;
        code == 200 && status["python_frames"] == true
    });
    assert!(ready, "the fake's frames are never read: {status}");
    let python = &status["python"];
    assert_eq!(python["version"], "3.11.4", "{status}");
    assert_eq!(python["supported"], true, "{status}");
    assert!(
        python["binary"]
            .as_str()
            .is_some_and(|b| b.ends_with("/libpython3.11.so.1.0")),
        "{status}"
    );
    assert_eq!(status["python_frames_error"], serde_json::Value::Null);
    // Its GC state, found by shape in the fake `_PyRuntime`.
    let gc = &status["python_gc"]["thresholds"];
    assert_eq!(*gc, serde_json::json!([700, 10, 10]), "{status}");

    get(addr, &format!("/debug/memory/?action=snapshot&pid={pid}"));
    let started = std::time::Instant::now();
    let mut diffs = Vec::new();
    for wait in [6, 4] {
        std::thread::sleep(Duration::from_secs(wait));
        diffs.push(get(
            addr,
            &format!("/debug/memory/?action=diff&pid={pid}&view=traceback&limit=100"),
        ));
    }
    // Every frame of each stack, where the JSON shows 16.
    std::thread::sleep(Duration::from_secs(2));
    let folded = get(
        addr,
        &format!("/debug/memory/?action=diff&pid={pid}&view=traceback&format=folded"),
    );
    let collected = started.elapsed();
    let probed = get(addr, &format!("/v1/workers/{pid}"))["pymalloc_probed"].clone();
    get(addr, "/debug/memory/?action=stop");
    bounds.check("fake CPython", COLLECTING_PEAK_BYTES, FAKE_CPU_SECS);
    assert_eq!(probed, true, "its PyObject_Malloc table is probed");

    let sites: Vec<serde_json::Value> = diffs.iter().flat_map(|d| sites_of(d, pid)).collect();
    assert!(!sites.is_empty(), "sites of the fake: {:?}", diffs.last());
    let frames: Vec<String> = sites.iter().flat_map(stack_of).collect();
    let unresolved: Vec<&String> = frames.iter().filter(|f| f.contains(" [python]")).collect();
    let longest = frames.iter().map(|f| f.chars().count()).max().unwrap_or(0);
    let depths = folded_depths(folded.as_str().unwrap_or_default());
    let deepest = depths.iter().copied().max().unwrap_or(0);
    eprintln!(
        "fake CPython: {} sites in {:.1} s, {} frames shown ({} unresolved: {}), {} folded stacks, deepest {deepest}, longest frame {longest} chars",
        sites.len(),
        collected.as_secs_f64(),
        frames.len(),
        unresolved.len(),
        diffs[0]["unresolved"],
        depths.len(),
    );
    // The kernel walked its frames and the agent read its code objects:
    // the good one by name and line, the longest name whole.
    assert!(
        frames.iter().any(|f| f == "/srv/fake/app.py:52 handler"),
        "the fake's good code object, read: {frames:?}"
    );
    let long_name = format!("/srv/fake/app.py:62 {}", "n".repeat(MAX_NAME));
    assert!(
        frames.contains(&long_name),
        "a name of exactly {MAX_NAME} characters, read whole"
    );
    // Cycles end at PY_MAX_FRAMES: the two-frame cycle and the frame that
    // is its own previous fill a stack, no more.
    assert_eq!(deepest, memtrace_common::PY_MAX_FRAMES, "{folded}");
    // No name beyond the bound: a function and a file name of at most
    // MAX_NAME characters each, and the frame's few other characters.
    assert!(
        longest <= 2 * MAX_NAME + 64,
        "a frame of {longest} characters"
    );
    // The names of 2^40 characters, the line table of 2^40 bytes, the file
    // names that are not ASCII or not mapped and the unmapped code object
    // are addresses with a reason; no byte of the bad names shows.
    assert!(!unresolved.is_empty(), "{frames:?}");
    for f in &frames {
        assert!(f.is_ascii(), "garbage read as a name: {f}");
    }
    for f in &unresolved {
        assert!(
            f.ends_with(')'),
            "an unresolved frame without its reason: {f}"
        );
    }
    let counted: u64 = diffs
        .iter()
        .map(|d| d["unresolved"]["frames"].as_u64().unwrap_or(0))
        .sum();
    assert!(
        counted > 0,
        "unresolved frames counted: {:?}",
        diffs[0]["unresolved"]
    );

    // Still answering, and the fake named in one line for its code
    // objects, and a few warnings at most in all.
    assert_eq!(
        get(addr, &format!("/v1/workers/{pid}"))["pid"].as_u64(),
        Some(u64::from(pid))
    );
    let warned: Vec<serde_json::Value> = agent
        .logs()
        .into_iter()
        .filter(|l| l["pid"].as_u64() == Some(u64::from(pid)) && l["level"] == "WARN")
        .collect();
    eprintln!("{} warnings name the fake: {warned:?}", warned.len());
    assert!(warned.len() <= 3, "{warned:#?}");
    let named = warned
        .iter()
        .filter(|l| {
            l["message"].as_str().is_some_and(|m| {
                m.starts_with("this process's Python code objects do not validate")
            })
        })
        .count();
    assert_eq!(named, 1, "{warned:#?}");
}
