//! Request boundaries: uprobes (in a shared library and in an executable)
//! and accept mode, on the fixture server and real gunicorn. Requests counted
//! against requests sent; per-request RSS growth against the known leak.
use std::{process::Command, time::Duration};

use memtrace::kernel::{loader::RequestProbes, uprobes::ProbeTarget};
use memtrace_tests::*;

const KIB: i64 = 1024;

/// A leaky_server with its workers' pids.
struct Server {
    _inner: LeakyServer,
    port: u16,
    workers: Vec<u32>,
}

fn leaky_server(workers: usize, leak: i64) -> Server {
    let inner = LeakyServer::start(workers, leak as u64, &[]);
    let port = inner.port;
    let workers = inner.workers(workers);
    Server {
        _inner: inner,
        port,
        workers,
    }
}

fn settings(name: &str, requests: RequestProbes) -> memtrace::agent::AgentSettings {
    let mut s = test_settings(&[name]);
    s.load.requests = requests;
    s
}

fn handler_fn() -> RequestProbes {
    RequestProbes::Function(ProbeTarget {
        binary: fixtures().handler_so(),
        symbol: "handle_request".into(),
    })
}

#[test]
fn uprobe_in_a_shared_library_counts_requests_and_their_leaks() {
    let _serial = serial();
    let agent = AgentHarness::start(settings("leaky_server", handler_fn()));
    let server = leaky_server(2, 0);
    let pids = server.workers.clone();

    // Leaks of 64 KiB and more, by path, 150 requests each.
    let mut sent = 0u64;
    for leak in [64 * KIB, 256 * KIB, 1024 * KIB] {
        let n = 150;
        drive(server.port, &format!("/leak/{leak}"), n, 3);
        sent += n as u64;
        assert_counted_exactly(&agent, &pids, sent);
        let d = recent_deltas(&agent, &pids, n);
        assert_eq!(d.len(), n);
        assert_mean_within(&d, leak, 0.05, &format!("leak {leak}"));
    }

    // Nothing leaked: growth averages out.
    let n = 300;
    drive(server.port, "/leak/0", n, 3);
    sent += n as u64;
    assert_counted_exactly(&agent, &pids, sent);
    let d = recent_deltas(&agent, &pids, n);
    let mean_abs = d.iter().map(|x| x.abs()).sum::<i64>() as f64 / d.len() as f64;
    eprintln!(
        "no leak: mean |delta| {mean_abs:.0} bytes over {} requests",
        d.len()
    );
    assert!(
        mean_abs < 4096.0,
        "no leak: mean |delta| {mean_abs:.0} bytes"
    );

    // Requests carry the kernel's per-thread counters too.
    agent.with(|s| {
        let w = s.registry.get(pids[0]).unwrap();
        assert!(
            w.requests
                .recent(1000)
                .all(|r| !r.aborted && r.duration_ms >= 0.0)
        );
        assert_eq!(w.stats.requests_in_flight(), 0);
    });
    assert_eq!(agent.with(|s| s.tracer.counters().ringbuf_drops), 0);
}

/// A burst fills the ring buffer faster than the agent's timer drains it:
/// past half of it, events wake the agent, and no request is lost. Here a
/// 64 KiB ring drained every 2 s: the burst's 3000 request events (over
/// 400 KiB, in well under 2 s) overflow it unless the wake-ups drain it.
#[test]
fn a_burst_wakes_the_agent_before_the_ring_buffer_overflows() {
    let _serial = serial();
    let mut s = settings("leaky_server", handler_fn());
    s.load.ring_buffer_bytes = 64 << 10;
    s.poll_interval = Duration::from_secs(2);
    s.refresh_interval = Duration::from_secs(60);
    s.rescan_interval = Duration::from_secs(60);
    let agent = AgentHarness::start(s);
    let server = leaky_server(2, 0);
    let n = 3000;
    drive(server.port, "/", n, 3);
    assert_counted_exactly(&agent, &server.workers, n as u64);
    assert_eq!(agent.with(|s| s.tracer.counters().ringbuf_drops), 0);
}

#[test]
fn uprobe_in_the_executable_counts_every_request() {
    let _serial = serial();
    let probe = RequestProbes::Function(ProbeTarget {
        binary: fixtures().bin("leaky_server"),
        symbol: "serve_connection".into(),
    });
    let agent = AgentHarness::start(settings("leaky_server", probe));
    let server = leaky_server(3, 128 * KIB);
    drive(server.port, "/", 300, 4);
    assert_counted_exactly(&agent, &server.workers, 300);
    let d = recent_deltas(&agent, &server.workers, 300);
    assert_mean_within(&d, 128 * KIB, 0.05, "leak 128 KiB");
}

#[test]
fn accept_mode_counts_requests_of_a_prefork_server() {
    let _serial = serial();
    let agent = AgentHarness::start(settings("leaky_server", RequestProbes::Accept));
    let server = leaky_server(2, 64 * KIB);
    drive(server.port, "/", 400, 4);
    assert_counted_exactly(&agent, &server.workers, 400);
    let d = recent_deltas(&agent, &server.workers, 400);
    assert_mean_within(&d, 64 * KIB, 0.05, "leak 64 KiB (accept mode)");
}

#[test]
fn a_missing_symbol_is_refused_with_near_matches() {
    let _serial = serial();
    let mut s = test_settings(&["leaky_server"]);
    s.load.requests = RequestProbes::Function(ProbeTarget {
        binary: fixtures().handler_so(),
        symbol: "handle_reqest".into(),
    });
    let err = memtrace::agent::Agent::start(s).err().expect("refused");
    let msg = err.to_string();
    assert!(
        msg.contains("handle_request") && msg.contains("did you mean"),
        "{msg}"
    );
}

/// The master is the process the test started (`gunicorn` runs as itself,
/// whatever title it gives itself later).
fn gunicorn_workers(server: &Proc, n: usize) -> Vec<u32> {
    wait_children(server.pid(), n)
}

#[test]
fn accept_mode_on_real_gunicorn_counts_every_request_and_the_leak() {
    let _serial = serial();
    let agent = AgentHarness::start(settings("gunicorn", RequestProbes::Accept));
    let port = free_port();
    let leak = 256 * KIB;
    let server = gunicorn(port, 3, leak as u64);
    assert!(wait_port(port, SERVER_START), "gunicorn listens");
    let workers = gunicorn_workers(&server, 3);
    let sent = 300;
    drive(port, "/", sent, 3);
    assert_counted_exactly(&agent, &workers, sent as u64);
    let d = recent_deltas(&agent, &workers, sent);
    assert_mean_within(&d, leak, 0.10, "gunicorn leak 256 KiB");
    let per_worker: Vec<u64> = agent.with(|s| {
        workers
            .iter()
            .map(|&p| s.registry.get(p).map_or(0, |w| w.requests.seen))
            .collect()
    });
    assert_eq!(
        per_worker.iter().sum::<u64>(),
        sent as u64,
        "{per_worker:?}"
    );
}

/// Runs `request_loop` at a slow pace for `seconds`; returns the calls it made
/// and its pid.
fn run_request_loop(agent: &AgentHarness, args: &[&str]) -> (u64, u32) {
    use std::io::{BufRead as _, Write as _};
    let mut proc = Proc::spawn(
        Command::new(fixtures().bin("request_loop"))
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped()),
    );
    let pid = proc.pid();
    let mut stdin = proc.child.stdin.take().unwrap();
    let mut lines = std::io::BufReader::new(proc.child.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "ready");
    assert!(agent.wait(Duration::from_secs(5), |s| s.registry.contains(pid)));
    writeln!(stdin).unwrap();
    let done = lines.next().unwrap().unwrap();
    let calls: u64 = done.split_whitespace().nth(1).unwrap().parse().unwrap();
    let ok = agent.wait(Duration::from_secs(10), |s| {
        s.registry
            .get(pid)
            .is_some_and(|w| w.requests.seen >= calls)
    });
    assert!(ok, "not every call was counted");
    writeln!(stdin).unwrap();
    (calls, pid)
}

#[test]
fn a_recursive_request_function_counts_once_per_outer_call() {
    let _serial = serial();
    let probe = RequestProbes::Function(ProbeTarget {
        binary: fixtures().handler_so(),
        symbol: "recurse".into(),
    });
    let agent = AgentHarness::start(settings("request_loop", probe));
    // 200 calls a second for a second, each recursing 5 deep.
    let (calls, pid) = run_request_loop(&agent, &["200", "1", "5"]);
    std::thread::sleep(Duration::from_millis(300));
    agent.with(|s| {
        // It may have exited by now: find() looks in the exited list too.
        let w = s.registry.find(pid).unwrap();
        assert_eq!(w.requests.seen, calls, "one request per outer call");
        assert!(w.requests.recent(1000).all(|r| !r.aborted));
        assert_eq!(w.stats.requests_in_flight(), 0);
    });
}
