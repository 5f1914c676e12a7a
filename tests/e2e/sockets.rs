//! Socket request mode on keep-alive, threaded and async servers: requests
//! counted equal requests sent, exactly, and the leaking fixture's MB per
//! request where a thread serves one request at a time.
use std::{
    io::{BufReader, Write as _},
    net::TcpStream,
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use memtrace::kernel::loader::RequestProbes;
use memtrace_tests::*;

const KIB: u64 = 1024;

/// `per_conn` HTTP/1.1 requests on each of `conns` kept-alive connections,
/// the connections in parallel; panics on any failure. Returns the replies'
/// bodies.
fn keep_alive(port: u16, path: &str, conns: usize, per_conn: usize) -> Vec<String> {
    let threads: Vec<_> = (0..conns)
        .map(|_| {
            let path = path.to_string();
            std::thread::spawn(move || {
                let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
                stream
                    .set_read_timeout(Some(Duration::from_secs(20)))
                    .unwrap();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut writer = stream;
                let mut bodies = Vec::new();
                for _ in 0..per_conn {
                    write!(writer, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
                    bodies.push(read_response(&mut reader));
                }
                bodies
            })
        })
        .collect();
    threads
        .into_iter()
        .flat_map(|t| t.join().expect("client thread"))
        .collect()
}

fn settings(names: &[&str]) -> memtrace::agent::AgentSettings {
    let mut s = test_settings(names);
    s.load.requests = RequestProbes::Socket;
    // Small windows: a few hundred requests give a judged slope.
    s.detector.window_size = 60;
    s.detector.check_interval = 20;
    s.detector.warmup_samples = 10;
    s
}

/// Waits until the agent counted `sent` requests for `pids` (not more),
/// and none aborted.
fn assert_counted_exactly(agent: &AgentHarness, pids: &[u32], sent: u64) {
    let mut seen = 0;
    wait_for(Duration::from_secs(10), || {
        seen = agent.with(|s| requests_seen(s, pids));
        seen >= sent
    });
    std::thread::sleep(Duration::from_millis(500));
    let (seen, aborted) = agent.with(|s| {
        (
            requests_seen(s, pids),
            pids.iter()
                .filter_map(|p| s.registry.find(*p))
                .map(|w| w.requests.aborted)
                .sum::<u64>(),
        )
    });
    assert_eq!(
        (seen, aborted),
        (sent, 0),
        "requests counted (and aborted) vs sent ({})",
        counting_report(agent)
    );
}

#[test]
fn keep_alive_fixture_counts_every_request_and_its_leak() {
    let _serial = serial();
    let agent = AgentHarness::start(settings(&["leaky_server"]));
    let leak = 256 * KIB;
    let server = LeakyServer::start(2, leak, &[]);
    let workers = server.workers(2);
    let bodies = keep_alive(server.port, "/", 10, 30);
    assert_eq!(bodies.len(), 300);
    assert_counted_exactly(&agent, &workers, 300);
    assert_slope(&agent, &workers, leak, "leaky_server keep-alive");
    // A worker serves one connection at a time: exact per-request deltas.
    agent.with(|s| {
        for w in workers.iter().filter_map(|p| s.registry.find(*p)) {
            assert!(
                w.requests
                    .recent(1000)
                    .all(|r| !r.interleaved && !r.aborted)
            );
        }
    });
}

#[test]
fn gunicorn_gthread_with_keep_alive_counts_every_request_and_its_leak() {
    let _serial = serial();
    let agent = AgentHarness::start(settings(&["gunicorn"]));
    let port = free_port();
    let leak = 256 * KIB;
    let server = Proc::spawn(
        Command::new("gunicorn")
            .args([
                "--workers",
                "1",
                "--worker-class",
                "gthread",
                "--threads",
                "4",
            ])
            .args(["--keep-alive", "10"])
            .arg("--bind")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--chdir")
            .arg(Fixtures::source(""))
            .arg("wsgi_app:app")
            .env("LEAK_BYTES", leak.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    assert!(wait_port(port, SERVER_START), "gunicorn listens");
    let workers = wait_children(server.pid(), 1);
    let bodies = keep_alive(port, "/", 10, 30);
    assert_eq!(bodies.len(), 300);
    assert_counted_exactly(&agent, &workers, 300);
    assert_slope(&agent, &workers, leak, "gunicorn gthread keep-alive");
}

/// uvicorn from PyPI, in the virtualenv `cargo xtask setup` makes.
fn uvicorn_bin() -> PathBuf {
    let bin = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/uvicorn-venv/bin/uvicorn");
    assert!(
        bin.is_file(),
        "{} is missing: run `cargo xtask setup` (it installs uvicorn from PyPI into a virtualenv)",
        bin.display()
    );
    bin
}

#[test]
fn uvicorn_async_workers_count_every_request() {
    let _serial = serial();
    // uvicorn's --workers are fresh interpreters (multiprocessing spawn):
    // they exec python, so they are selected by their command line.
    let mut s = settings(&["uvicorn"]);
    s.selectors.cmdline = Some(Regex::new("multiprocessing-fork").unwrap());
    let agent = AgentHarness::start(s);
    let port = free_port();
    let server = Proc::spawn(
        Command::new(uvicorn_bin())
            .args(["asgi_app:app", "--workers", "2", "--host", "127.0.0.1"])
            .arg("--port")
            .arg(port.to_string())
            .arg("--app-dir")
            .arg(Fixtures::source(""))
            .args(["--log-level", "warning"])
            .env("LEAK_BYTES", (64 * KIB).to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    assert!(wait_port(port, SERVER_START), "uvicorn listens");
    // Its children: the two workers, and maybe multiprocessing's resource
    // tracker, which is not one.
    let mut workers = Vec::new();
    wait_for(Duration::from_secs(20), || {
        workers = children_of(server.pid())
            .into_iter()
            .filter(|p| {
                memtrace::model::procinfo::view(*p)
                    .is_some_and(|v| v.cmdline.join(" ").contains("multiprocessing-fork"))
            })
            .collect();
        workers.len() == 2
    });
    assert_eq!(workers.len(), 2, "uvicorn's two workers");
    assert!(
        agent.wait(Duration::from_secs(10), |s| workers
            .iter()
            .all(|p| s.registry.contains(*p))),
        "the workers are traced"
    );
    let bodies = keep_alive(port, "/", 10, 30);
    assert_eq!(bodies.len(), 300);
    assert_counted_exactly(&agent, &workers, 300);
    // Requests interleave on each worker's one thread: counted exactly, and
    // those that overlapped say their deltas are shared.
    let interleaved: usize = agent.with(|s| {
        workers
            .iter()
            .filter_map(|p| s.registry.find(*p))
            .map(|w| w.requests.recent(1000).filter(|r| r.interleaved).count())
            .sum()
    });
    eprintln!("uvicorn: {interleaved} of 300 concurrent requests interleaved");
    // One connection at a time: nothing overlaps, nothing is marked.
    let bodies = keep_alive(port, "/", 1, 20);
    assert_counted_exactly(&agent, &workers, 320);
    let served_by: Vec<u32> = bodies.iter().map(|b| pid_in(b)).collect();
    let worker = served_by[0];
    assert!(
        served_by.iter().all(|p| *p == worker),
        "one connection, one worker"
    );
    agent.with(|s| {
        let w = s.registry.find(worker).unwrap();
        let last: Vec<_> = w.requests.recent(20).collect();
        assert!(last.iter().all(|r| !r.interleaved), "{last:?}");
    });
}

#[test]
fn uwsgi_with_threads_and_keep_alive_counts_every_request_and_its_leak() {
    let _serial = serial();
    let agent = AgentHarness::start(settings(&["uwsgi"]));
    let port = free_port();
    let leak = 256 * KIB;
    let server = uwsgi(
        port,
        &["--processes", "1", "--threads", "4", "--http11-socket"],
        leak,
    );
    assert!(wait_port(port, SERVER_START), "uWSGI listens");
    let workers = wait_children(server.pid(), 1);
    let bodies = keep_alive(port, "/", 10, 30);
    assert_eq!(bodies.len(), 300);
    assert_counted_exactly(&agent, &workers, 300);
    assert_slope(&agent, &workers, leak, "uWSGI threads keep-alive");
}

#[test]
fn php_fpm_behind_nginx_with_fastcgi_keep_alive_counts_every_request() {
    let _serial = serial();
    let agent = AgentHarness::start(settings(&["php-fpm8.2"]));
    let dir = tempfile::tempdir().unwrap();
    // A PHP-FPM worker serves one FastCGI connection until nginx closes it:
    // as many workers as requests nginx runs at once (the client's 4).
    let fpm = PhpFpm::start(dir.path(), 4, true);
    let workers = wait_children(fpm.master(), 4);
    let bodies = keep_alive(fpm.port, &format!("/?leak={}", 256 * KIB), 4, 75);
    assert_eq!(bodies.len(), 300);
    assert_counted_exactly(&agent, &workers, 300);
    assert_slope(&agent, &workers, 256 * KIB, "PHP-FPM FastCGI keep-alive");
}
