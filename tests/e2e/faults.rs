//! What real servers do to a tracer: workers killed mid-request, pids
//! recycled, the agent restarted or killed while the server runs.
use std::{io::Write as _, net::TcpStream, process::Command, time::Duration};

use memtrace::{
    kernel::{loader::RequestProbes, uprobes::ProbeTarget},
    model::workers::Role,
};
use memtrace_tests::*;
use nix::sys::signal::Signal;

fn kill(pid: u32, sig: Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
}

#[test]
fn a_worker_killed_mid_request_gives_an_aborted_summary() {
    let _serial = serial();
    let mut settings = test_settings(&["leaky_server"]);
    settings.load.requests = RequestProbes::Function(ProbeTarget {
        binary: fixtures().bin("leaky_server"),
        symbol: "serve_connection".into(),
    });
    let agent = AgentHarness::start(settings);
    let server = LeakyServer::start(1, 0, &[]);
    let (port, master) = (server.port, server.master);
    http_get(port, "/").unwrap();
    let worker = agent
        .with(|s| s.registry.alive().find(|w| w.ppid == master).map(|w| w.pid))
        .expect("worker traced");

    // Half a request: the worker waits in read() inside serve_connection.
    let mut stalled = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stalled.write_all(b"GET / HTTP/1.0\r\n").unwrap();
    assert!(
        agent.wait(Duration::from_secs(5), |s| s
            .tracer
            .proc_stats(worker)
            .is_some_and(|p| p.requests_in_flight() == 1)),
        "the request is in flight"
    );
    kill(worker, Signal::SIGKILL);
    assert!(
        agent.wait(Duration::from_secs(5), |s| s
            .registry
            .find(worker)
            .is_some_and(|w| !w.alive())),
        "worker marked exited"
    );
    agent.with(|s| {
        let w = s.registry.find(worker).unwrap();
        assert_eq!(w.requests.seen, 2, "one request completed, one aborted");
        assert_eq!(w.requests.aborted, 1);
        let last = w.requests.last().unwrap();
        assert!(last.aborted, "the last summary is the aborted one");
        assert_eq!(w.stats.requests_aborted, 1, "final kernel counters");
        assert_eq!(w.stats.requests_in_flight(), 0, "no state leaked");
    });
    drop(stalled);
}

/// Spawns a copy of `sleep` named `name` whose pid is `pid`, by setting the
/// kernel's last pid just before the fork (root only). Retries when another
/// process takes the pid first.
fn impostor_with_pid(pid: u32, name: &str, dir: &std::path::Path) -> Proc {
    let exe = dir.join(name);
    std::fs::copy("/bin/sleep", &exe).unwrap();
    for _ in 0..50 {
        std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string()).unwrap();
        let p = Proc::spawn(Command::new(&exe).arg("60"));
        if p.pid() == pid {
            return p;
        }
        drop(p);
    }
    panic!("could not get pid {pid} back");
}

fn recycled_pid_case(lose_events: bool) {
    let mut settings = test_settings(&["prefork_pages"]);
    if lose_events {
        // A one-page ring buffer and an RSS event per page: events are lost.
        settings.load.ring_buffer_bytes = 4096;
        settings.load.rss_step_bytes = 4096;
    }
    let agent = AgentHarness::start(settings);
    let dir = tempfile::tempdir().unwrap();
    let _server = Proc::spawn(
        Command::new(fixtures().bin("prefork_pages"))
            .args(["1", "200"])
            .arg(dir.path()),
    );
    assert!(wait_for(Duration::from_secs(10), || worker_files(
        dir.path()
    )
    .len()
        == 1));
    let old = worker_files(dir.path())[0];
    assert!(agent.wait(Duration::from_secs(5), |s| s.registry.contains(old)));
    let old_start = agent.with(|s| s.registry.get(old).unwrap().start_time);

    // Hold the agent's state while the pid is recycled: events queue up in
    // the kernel (and, with the tiny buffer, overflow).
    let tools = tempfile::tempdir().unwrap();
    let (impostor, storm) = agent.with(|_| {
        kill(old, Signal::SIGKILL);
        assert!(wait_for(Duration::from_secs(10), || worker_files(
            dir.path()
        )
        .len()
            == 2));
        let impostor = impostor_with_pid(old, "prefork_pages", tools.path());
        // Overflow: the respawned worker touches pages on SIGUSR1.
        let storm = worker_files(dir.path()).into_iter().find(|&p| p != old);
        if lose_events {
            kill(storm.unwrap(), Signal::SIGUSR1);
            std::thread::sleep(Duration::from_millis(500));
        }
        (impostor, storm)
    });
    let new_start = memtrace::model::procinfo::start_time(old).expect("impostor alive");
    assert_ne!(new_start, old_start);
    assert!(
        agent.wait(Duration::from_secs(10), |s| s
            .registry
            .get(old)
            .is_some_and(|w| w.start_time == new_start)),
        "the recycled pid is a new process in the model"
    );
    agent.with(|s| {
        let w = s.registry.get(old).unwrap();
        assert_eq!(
            w.ppid,
            std::process::id(),
            "the impostor's parent is the test"
        );
        assert_eq!(
            s.registry.role(old),
            Role::Process,
            "not a worker of the master"
        );
        assert!(
            s.registry
                .exited()
                .any(|e| e.pid == old && e.start_time == old_start),
            "the old worker is in the exited list"
        );
        if let Some(respawned) = storm {
            assert!(
                s.registry.contains(respawned),
                "the respawned worker is followed"
            );
        }
        if lose_events {
            assert!(
                s.tracer.counters().ringbuf_drops > 0,
                "events were really lost"
            );
        }
    });
    drop(impostor);
}

#[test]
fn a_recycled_pid_is_not_taken_for_the_old_worker() {
    let _serial = serial();
    recycled_pid_case(false);
}

#[test]
fn a_recycled_pid_is_noticed_even_when_its_events_are_lost() {
    let _serial = serial();
    recycled_pid_case(true);
}

fn start_server(dir: &std::path::Path, workers: usize) -> (Proc, u32, Vec<u32>) {
    let server = Proc::spawn(
        Command::new(fixtures().bin("prefork_pages"))
            .arg(workers.to_string())
            .arg("500")
            .arg(dir),
    );
    assert!(wait_for(Duration::from_secs(10), || worker_files(dir)
        .len()
        == workers
        && read_pid(&dir.join("master")).is_some()));
    let master = read_pid(&dir.join("master")).unwrap();
    (server, master, worker_files(dir))
}

fn listed(agent: &AgentProcess, port: u16, token: &str) -> Vec<u64> {
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let (code, body) = api_get(addr, &format!("/v1/workers?token={token}"));
    assert_eq!(code, 200, "{body} {:?}", agent.logs().last());
    let mut pids: Vec<u64> = body["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|w| w["pid"].as_u64())
        .collect();
    pids.sort_unstable();
    pids
}

#[test]
fn an_agent_restarted_while_the_server_runs_picks_up_every_worker() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let (_server, master, workers) = start_server(dir.path(), 3);
    let mut expected: Vec<u64> = workers.iter().map(|&p| u64::from(p)).collect();
    expected.push(u64::from(master));
    expected.sort_unstable();
    let token = "restart-token";
    for round in 0..2 {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let mut agent = AgentProcess::start_with_env(
            &[
                "agent",
                "--process-name",
                "prefork_pages",
                "--listen",
                &listen,
            ],
            &[("MEMTRACE_DEBUG_TOKEN", token)],
        );
        assert_eq!(listed(&agent, port, token), expected, "round {round}");
        let held = bpf_fds(agent.proc.pid()).programs;
        let status = agent
            .proc
            .stop(Duration::from_secs(10))
            .expect("agent stops");
        assert!(status.success());
        assert!(
            wait_for(Duration::from_secs(5), || still_loaded(&held).is_empty()),
            "programs left after round {round}: {:?}",
            still_loaded(&held)
        );
    }
}

#[test]
fn an_agent_killed_with_sigkill_leaves_nothing_attached() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let (_server, _master, _workers) = start_server(dir.path(), 1);
    let handler = format!("{}:handle_request", fixtures().handler_so().display());
    let agent = AgentProcess::start(&[
        "agent",
        "--process-name",
        "prefork_pages",
        "--request-fn",
        &handler,
        "--listen",
        "off",
    ]);
    let held = bpf_fds(agent.proc.pid());
    assert!(
        attached_program_names(agent.proc.pid()).contains(&"request_begin".to_string()),
        "{held:?}"
    );
    agent.proc.signal(Signal::SIGKILL);
    assert!(
        wait_for(Duration::from_secs(10), || still_loaded(&held.programs)
            .is_empty()),
        "left behind: {:?}",
        still_loaded(&held.programs)
    );
    let uprobe_events =
        std::fs::read_to_string("/sys/kernel/tracing/uprobe_events").unwrap_or_default();
    assert!(
        !uprobe_events.contains("handle_request"),
        "a uprobe event stayed in tracefs: {uprobe_events}"
    );
}
