//! Foundation: attach by name, follow workers through fork, death and
//! respawn, and account their memory exactly, against ground truth.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    process::{Command, Stdio},
    time::Duration,
};

use memtrace::model::workers::{Origin, Role};
use memtrace_tests::*;
use nix::sys::signal::Signal;

const PAGES: i64 = 2000;
/// Faults a fresh worker takes besides the pages it touches (stack, data,
/// libc state after fork): measured at about 40 here; generous on purpose.
const STARTUP_FAULTS: i64 = 200;

fn faults_of(agent: &AgentHarness, pid: u32) -> Option<i64> {
    agent.with(|s| s.tracer.proc_stats(pid).map(|p| p.faults as i64))
}

/// Agent RSS of `pid` within 1% of smaps_rollup, at a checkpoint where the
/// process is idle (allowing the refresh interval to pass).
fn assert_rss_matches(agent: &AgentHarness, pid: u32) {
    let mut last = (0, 0);
    let ok = wait_for(Duration::from_secs(5), || {
        let truth = smaps_rss(pid).unwrap_or(0);
        let ours = agent.with(|s| s.registry.get(pid).map_or(0, |w| w.rss.resident()));
        last = (ours, truth);
        truth > 0 && (ours as f64 - truth as f64).abs() <= truth as f64 * 0.01
    });
    assert!(
        ok,
        "pid {pid}: memtrace RSS {} vs smaps_rollup {} (more than 1% apart)",
        last.0, last.1
    );
}

fn assert_faults_cover(agent: &AgentHarness, pid: u32, pages: i64, baseline: i64) {
    let mut seen = 0;
    let ok = wait_for(Duration::from_secs(5), || {
        seen = faults_of(agent, pid).unwrap_or(0) - baseline;
        seen >= pages
    });
    assert!(
        ok,
        "pid {pid}: {seen} faults counted, {pages} pages touched"
    );
    let limit = pages + pages / 50 + STARTUP_FAULTS;
    assert!(
        seen <= limit,
        "pid {pid}: {seen} faults for {pages} pages (limit {limit})"
    );
}

fn assert_no_drops(agent: &AgentHarness) {
    let drops = agent.with(|s| s.tracer.counters().ringbuf_drops);
    assert_eq!(drops, 0, "ring buffer dropped events");
}

fn start_prefork(dir: &std::path::Path, workers: usize) -> (Proc, u32, Vec<u32>) {
    let server = Proc::spawn(
        Command::new(fixtures().bin("prefork_pages"))
            .arg(workers.to_string())
            .arg(PAGES.to_string())
            .arg(dir),
    );
    assert!(
        wait_for(Duration::from_secs(10), || worker_files(dir).len()
            == workers
            && read_pid(&dir.join("master")).is_some()),
        "prefork_pages did not start {workers} workers"
    );
    let master = read_pid(&dir.join("master")).unwrap();
    (server, master, worker_files(dir))
}

#[test]
fn agent_started_before_the_server_follows_master_and_workers() {
    let _serial = serial();
    let agent = AgentHarness::start(test_settings(&["prefork_pages"]));
    let dir = tempfile::tempdir().unwrap();
    let (mut server, master, workers) = start_prefork(dir.path(), 3);

    assert!(
        agent.wait(Duration::from_secs(5), |s| s.registry.contains(master)
            && workers.iter().all(|w| s.registry.contains(*w))),
        "agent did not list master {master} and workers {workers:?}"
    );
    agent.with(|s| {
        assert_eq!(s.registry.role(master), Role::Master);
        assert_eq!(s.registry.get(master).unwrap().origin, Origin::Exec);
        for &w in &workers {
            assert_eq!(s.registry.role(w), Role::Worker);
            assert_eq!(s.registry.get(w).unwrap().origin, Origin::Fork);
            assert_eq!(s.registry.get(w).unwrap().ppid, master);
        }
    });
    for &w in &workers {
        // Followed from its first instant: every fault since fork is counted.
        assert_faults_cover(&agent, w, PAGES, 0);
        assert_rss_matches(&agent, w);
    }
    assert_rss_matches(&agent, master);

    // More pages on demand: the counters keep up.
    let w = workers[0];
    let before = faults_of(&agent, w).unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(w as i32), Signal::SIGUSR1).unwrap();
    assert!(wait_for(Duration::from_secs(5), || read_kv(
        &dir.path().join(format!("worker-{w}"))
    )
    .is_some_and(|kv| kv["pages"] == 2 * PAGES)));
    assert_faults_cover(&agent, w, PAGES, before);
    assert_rss_matches(&agent, w);

    // A worker killed and respawned by the master is followed.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(w as i32), Signal::SIGKILL).unwrap();
    assert!(wait_for(Duration::from_secs(10), || worker_files(
        dir.path()
    )
    .len()
        == 4));
    let new = *worker_files(dir.path())
        .iter()
        .find(|p| !workers.contains(p))
        .unwrap();
    assert!(
        agent.wait(Duration::from_secs(5), |s| s.registry.contains(new)
            && s.registry.find(w).is_some_and(|old| !old.alive())),
        "respawned worker {new} not listed, or {w} not marked exited"
    );
    agent.with(|s| {
        assert_eq!(s.registry.role(new), Role::Worker);
        assert_eq!(s.registry.get(new).unwrap().origin, Origin::Fork);
        let old = s.registry.find(w).unwrap();
        assert!(old.stats.faults as i64 >= 2 * PAGES, "final counters kept");
    });
    assert_faults_cover(&agent, new, PAGES, 0);
    assert_rss_matches(&agent, new);
    assert_no_drops(&agent);

    server.stop(Duration::from_secs(5)).expect("server stops");
    assert!(
        agent.wait(Duration::from_secs(5), |s| s.registry.is_empty()),
        "every process marked exited after the server stopped; still listed: {:?}",
        agent.with(|s| s.registry.pids())
    );
}

#[test]
fn agent_started_after_the_server_finds_every_worker() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let (_server, master, workers) = start_prefork(dir.path(), 4);
    let agent = AgentHarness::start(test_settings(&["prefork_pages"]));
    agent.with(|s| {
        assert!(s.registry.contains(master), "master found in /proc");
        assert_eq!(s.registry.role(master), Role::Master);
        for &w in &workers {
            assert!(s.registry.contains(w), "worker {w} found in /proc");
            assert_eq!(s.registry.role(w), Role::Worker);
            assert_eq!(s.registry.get(w).unwrap().origin, Origin::Scan);
        }
    });
    for &w in &workers {
        assert_rss_matches(&agent, w);
    }
    assert_rss_matches(&agent, master);
    // Faults from now on are counted in full (before the agent started:
    // counted where the kernel's own counters are read, not where a
    // program counts them).
    let before: Vec<i64> = workers
        .iter()
        .map(|&w| faults_of(&agent, w).unwrap())
        .collect();
    for &w in &workers {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(w as i32), Signal::SIGUSR1).unwrap();
    }
    for (&w, &before) in workers.iter().zip(&before) {
        assert_faults_cover(&agent, w, PAGES, before);
        assert_rss_matches(&agent, w);
    }
    assert_no_drops(&agent);
}

#[test]
fn mmap_munmap_mremap_and_brk_totals_equal_the_fixtures_own() {
    let _serial = serial();
    let mut settings = test_settings(&["mapper"]);
    settings.load.mmap_counters = true;
    settings.requests.mmap_counters = true;
    let agent = AgentHarness::start(settings);
    assert!(
        agent.with(|s| s
            .tracer
            .attached()
            .iter()
            .any(|a| a == "mmap_exit@syscalls:sys_exit_mmap")),
        "--mmap-counters attaches the syscall tracepoints"
    );
    let mut mapper = Proc::spawn(
        Command::new(fixtures().bin("mapper"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped()),
    );
    let pid = mapper.pid();
    let mut stdin = mapper.child.stdin.take().unwrap();
    let mut lines = BufReader::new(mapper.child.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "ready");
    assert!(agent.wait(Duration::from_secs(5), |s| s.registry.contains(pid)));
    let before = agent.with(|s| s.tracer.proc_stats(pid)).expect("watched");

    writeln!(stdin).unwrap();
    let done = lines.next().unwrap().unwrap();
    let truth: std::collections::HashMap<&str, u64> = done
        .strip_prefix("done ")
        .expect("done line")
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k, v.parse().unwrap()))
        .collect();
    let after = agent.with(|s| s.tracer.proc_stats(pid)).expect("watched");
    assert_eq!(after.mmap_bytes - before.mmap_bytes, truth["mmap"], "mmap");
    assert_eq!(
        after.munmap_bytes - before.munmap_bytes,
        truth["munmap"],
        "munmap"
    );
    assert_eq!(
        after.brk_grow_bytes - before.brk_grow_bytes,
        truth["brk_grow"],
        "brk growth"
    );
    assert_eq!(
        after.brk_shrink_bytes - before.brk_shrink_bytes,
        truth["brk_shrink"],
        "brk shrink"
    );
    assert_eq!(
        after.mremap_grow_bytes - before.mremap_grow_bytes,
        truth["mremap_grow"],
        "mremap growth"
    );
    assert_eq!(
        after.mremap_shrink_bytes - before.mremap_shrink_bytes,
        truth["mremap_shrink"],
        "mremap shrink"
    );
    writeln!(stdin).unwrap();
    assert!(mapper.child.wait().unwrap().success());

    // The exit event carries the final counters.
    assert!(agent.wait(Duration::from_secs(5), |s| {
        s.registry
            .find(pid)
            .is_some_and(|w| !w.alive() && w.stats.mmap_bytes == after.mmap_bytes)
    }));
    assert_no_drops(&agent);
}

fn gunicorn_tree(agent: &AgentHarness, workers: usize) -> Option<(u32, Vec<u32>)> {
    agent.with(|s| {
        let master = s
            .registry
            .alive()
            .find(|w| s.registry.role(w.pid) == Role::Master)?
            .pid;
        let kids: Vec<u32> = s
            .registry
            .alive()
            .filter(|w| w.ppid == master)
            .map(|w| w.pid)
            .collect();
        (kids.len() == workers).then_some((master, kids))
    })
}

#[test]
fn real_gunicorn_master_and_workers_with_rss_from_the_kernel() {
    let _serial = serial();
    let port = free_port();
    // Agent first: gunicorn is matched at exec and its workers at fork.
    let agent = AgentHarness::start(test_settings(&["gunicorn"]));
    let _server = gunicorn(port, 3, 0);
    assert!(wait_port(port, SERVER_START), "gunicorn listens");
    let mut tree = None;
    assert!(
        wait_for(Duration::from_secs(10), || {
            tree = gunicorn_tree(&agent, 3);
            tree.is_some()
        }),
        "agent lists the gunicorn master and 3 workers"
    );
    let (master, mut workers) = tree.unwrap();
    workers.sort_unstable();
    assert_eq!(workers, children_of(master), "the workers /proc lists");
    for _ in 0..20 {
        http_get(port, "/").expect("gunicorn answers");
    }
    for &pid in workers.iter().chain([&master]) {
        assert_rss_matches(&agent, pid);
    }
    assert_no_drops(&agent);
    drop(agent);

    // Agent after: the running tree is found in /proc.
    let agent = AgentHarness::start(test_settings(&["gunicorn"]));
    let (master2, mut workers2) = gunicorn_tree(&agent, 3).expect("tree found by the scan");
    workers2.sort_unstable();
    assert_eq!((master2, workers2.clone()), (master, workers));
    for &pid in workers2.iter().chain([&master2]) {
        assert_rss_matches(&agent, pid);
    }
}

#[test]
fn a_tiny_ring_buffer_overflows_and_the_drops_are_reported() {
    let _serial = serial();
    let mut settings = test_settings(&["prefork_pages"]);
    // One page of ring buffer, an RSS event per page, drained once a second.
    settings.load.ring_buffer_bytes = 4096;
    settings.load.rss_step_bytes = 4096;
    settings.poll_interval = Duration::from_secs(1);
    let agent = AgentHarness::start(settings);
    let dir = tempfile::tempdir().unwrap();
    let (_server, _master, _workers) = start_prefork(dir.path(), 2);
    assert!(
        agent.wait(Duration::from_secs(5), |s| s.counters.drops_reported > 0),
        "drops counted in the kernel and reported by the agent"
    );
    let drops = agent.with(|s| s.tracer.counters().ringbuf_drops);
    assert!(drops > 0);
}

#[test]
fn stopping_the_agent_detaches_everything() {
    let _serial = serial();
    let before = bpf_fds(std::process::id());
    let agent = AgentHarness::start(test_settings(&["no-such-proc"]));
    let during = bpf_fds(std::process::id());
    let ours: Vec<u32> = during
        .programs
        .iter()
        .copied()
        .filter(|p| !before.programs.contains(p))
        .collect();
    assert!(ours.len() >= 12, "programs loaded: {ours:?}");
    assert!(
        // Four steady-state tracepoints: rss_stat, newtask, exec, exit (and
        // page faults where the kernel's counters cannot be read).
        during.links.len() >= before.links.len() + 4,
        "links: {:?}",
        during.links
    );
    drop(agent);
    assert!(
        wait_for(Duration::from_secs(5), || still_loaded(&ours).is_empty()),
        "left behind: {:?}",
        still_loaded(&ours)
    );
    assert_eq!(bpf_fds(std::process::id()), before, "no BPF fd kept");
}

#[test]
fn the_binary_exits_cleanly_on_sigterm_and_leaves_nothing() {
    let _serial = serial();
    let mut agent = Proc::spawn(
        Command::new(memtrace_bin())
            .args([
                "agent",
                "--process-name",
                "no-such-proc",
                "--log-format",
                "json",
                "--listen",
                "off",
            ])
            .stderr(Stdio::piped()),
    );
    let stderr = agent.child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let attached = lines
        .by_ref()
        .map_while(Result::ok)
        .any(|l| l.contains("eBPF programs attached"));
    assert!(attached, "agent logged that it attached");
    let held = bpf_fds(agent.pid());
    assert!(
        // The four steady-state tracepoints' links at least.
        held.programs.len() >= 12 && held.links.len() >= 4,
        "{held:?}"
    );
    let status = agent
        .stop(Duration::from_secs(10))
        .expect("exits on SIGTERM");
    assert!(status.success(), "exit status {status}");
    assert!(
        wait_for(Duration::from_secs(5), || still_loaded(&held.programs)
            .is_empty()),
        "left behind: {:?}",
        still_loaded(&held.programs)
    );
}

#[test]
fn without_privileges_the_agent_says_so_and_exits_non_zero() {
    let _serial = serial();
    use std::os::unix::process::CommandExt as _;
    let out = Command::new(memtrace_bin())
        .args(["agent", "--process-name", "x"])
        .uid(65534)
        .gid(65534)
        .output()
        .expect("run memtrace as nobody");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("needs root"), "stderr: {stderr}");
}

/// --exe and --cmdline are matched by the agent on every exec the kernel
/// reports; the matched master's workers are then followed by the kernel.
#[test]
fn exe_and_cmdline_selectors_find_servers_as_they_start() {
    let _serial = serial();
    let by_exe = memtrace::model::selectors::Selectors {
        exes: vec![std::fs::canonicalize(fixtures().bin("prefork_pages")).unwrap()],
        ..Default::default()
    };
    let by_cmdline = memtrace::model::selectors::Selectors {
        cmdline: Some(Regex::new(r"prefork_pages 2 \d+ ").unwrap()),
        ..Default::default()
    };
    for (how, selectors) in [("exe", by_exe), ("cmdline", by_cmdline)] {
        let mut settings = test_settings(&[]);
        settings.selectors = selectors;
        let agent = AgentHarness::start(settings);
        let dir = tempfile::tempdir().unwrap();
        let (_server, master, workers) = start_prefork(dir.path(), 2);
        assert!(
            agent.wait(Duration::from_secs(5), |s| s.registry.contains(master)
                && workers.iter().all(|w| s.registry.contains(*w))),
            "selected by {how}: master {master} and workers {workers:?}"
        );
        agent.with(|s| {
            assert_eq!(s.registry.get(master).unwrap().origin, Origin::Exec);
            assert_eq!(s.registry.role(master), Role::Master);
        });
    }
}

/// The steady state attaches no syscall tracepoint (each one puts every task
/// of the node on the syscall slow path); address-space growth shows as
/// VmData, read from /proc, equal to the fixture's own.
#[test]
fn steady_state_has_no_syscall_tracepoint_and_reports_vm_data() {
    let _serial = serial();
    let mut settings = test_settings(&["mapper"]);
    settings.load.requests = memtrace::kernel::loader::RequestProbes::Socket;
    let agent = AgentHarness::start(settings);
    let syscall_programs = |agent: &AgentHarness| -> Vec<String> {
        agent.with(|s| {
            s.tracer
                .attached()
                .iter()
                .filter(|a| a.contains("@syscalls:"))
                .cloned()
                .collect()
        })
    };
    assert_eq!(syscall_programs(&agent), Vec::<String>::new());
    // Nor a program on every page fault where the kernel's BTF says where
    // a task's fault counters are (every kernel memtrace serves has them).
    let per_fault: Vec<String> = agent.with(|s| {
        s.tracer
            .attached()
            .iter()
            .filter(|a| a.contains("page_fault_user"))
            .cloned()
            .collect()
    });
    let btf = memtrace::kernel::features::KernelFeatures::probe(
        &memtrace::kernel::tracefs::Tracefs::ensure(false).unwrap(),
    )
    .unwrap()
    .btf
    .fault_counters
    .is_some();
    assert_eq!(
        per_fault.is_empty(),
        btf,
        "per-fault programs: {per_fault:?}"
    );

    let mut mapper = Proc::spawn(
        Command::new(fixtures().bin("mapper"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped()),
    );
    let pid = mapper.pid();
    let mut stdin = mapper.child.stdin.take().unwrap();
    let mut lines = BufReader::new(mapper.child.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "ready");
    assert!(agent.wait(Duration::from_secs(5), |s| s.registry.contains(pid)));
    writeln!(stdin).unwrap();
    assert!(lines.next().unwrap().unwrap().starts_with("done "));

    // The fixture is idle now: VmData from the agent equals /proc's.
    let truth = || {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("VmData:"))?
            .trim()
            .trim_end_matches(" kB")
            .parse::<u64>()
            .ok()
            .map(|kb| kb * 1024)
    };
    let mut last = (None, None);
    let equal = wait_for(Duration::from_secs(5), || {
        let ours = agent.with(|s| s.registry.get(pid).and_then(|w| w.vm_data));
        last = (ours, truth());
        ours.is_some() && ours == last.1
    });
    assert!(equal, "VmData: agent {:?}, /proc {:?}", last.0, last.1);
    // Without --mmap-counters the counters are absent, not zero.
    let view = agent.with(|s| {
        let w = s.registry.get(pid).expect("traced");
        memtrace::agent::views::worker_status(s, w, false)
    });
    assert_eq!(view.mmap_bytes, None);
    assert_eq!(view.brk_grow_bytes, None);
    assert_eq!(view.data_bytes, last.1);
    writeln!(stdin).unwrap();
    assert!(mapper.child.wait().unwrap().success());
    assert_eq!(syscall_programs(&agent), Vec::<String>::new());
    assert_no_drops(&agent);
}
