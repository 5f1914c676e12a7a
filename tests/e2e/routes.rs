//! Which endpoint leaks: socket mode's method and path per request, routes
//! with ids collapsed, and the bytes each route keeps per request, on real
//! gunicorn (sync, gthread) and uvicorn serving tests/fixtures, whose
//! `/leak/N` keeps N bytes per request and whose other paths keep nothing.
//! Raw-socket clients send split request lines, pipelined requests and
//! garbage.
use std::{
    collections::BTreeMap,
    io::{BufReader, Read as _, Write as _},
    net::TcpStream,
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use memtrace::{
    kernel::loader::RequestProbes,
    model::routes::{OTHER_ROUTE, RoutesView},
};
use memtrace_tests::*;

/// What the leaking route keeps per request (the fixture writes every byte).
const LEAK: u64 = 48 * 1024;

/// One round of mixed traffic: (path sent, route the agent must name).
fn round(i: usize) -> Vec<(String, &'static str)> {
    vec![
        (format!("/leak/{LEAK}"), "GET /leak/:id"),
        ("/health".to_string(), "GET /health"),
        (
            format!("/orders/{}?secret=s{i}", 1000 + i),
            "GET /orders/:id",
        ),
        (
            format!("/users/{:08x}-9a4d-4c1b-8e2f-0a1b2c3d4e5f/profile", i),
            "GET /users/:id/profile",
        ),
        ("/".to_string(), "GET /"),
    ]
}

fn connect(port: u16) -> (BufReader<TcpStream>, TcpStream) {
    let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    (BufReader::new(stream.try_clone().unwrap()), stream)
}

/// Sends `rounds` rounds of mixed traffic, one request at a time (so each
/// request's RSS delta is its own), on one kept-alive connection or a
/// connection per request. Returns the requests sent per route.
fn mixed_traffic(port: u16, rounds: usize, keep_alive: bool) -> BTreeMap<String, u64> {
    let mut sent = BTreeMap::new();
    let mut conn = keep_alive.then(|| connect(port));
    for i in 0..rounds {
        for (path, route) in round(i) {
            match conn.as_mut() {
                Some((reader, writer)) => {
                    write!(writer, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
                    read_response(reader);
                }
                None => {
                    http_get(port, &path).unwrap_or_else(|e| panic!("GET {path}: {e}"));
                }
            }
            *sent.entry(route.to_string()).or_insert(0) += 1;
        }
    }
    sent
}

fn settings(names: &[&str]) -> memtrace::agent::AgentSettings {
    let mut s = test_settings(names);
    s.load.requests = RequestProbes::Socket;
    s
}

fn routes_of(agent: &AgentHarness, pid: u32) -> RoutesView {
    agent.with(|s| {
        s.registry
            .find(pid)
            .expect("a traced worker")
            .requests
            .routes
            .view()
    })
}

/// Waits until the agent counted `total` requests of `pid`.
fn wait_counted(agent: &AgentHarness, pid: u32, total: u64) {
    let mut seen = 0;
    wait_for(Duration::from_secs(10), || {
        seen = agent.with(|s| requests_seen(s, &[pid]));
        seen >= total
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        agent.with(|s| requests_seen(s, &[pid])),
        total,
        "requests counted"
    );
}

/// Route counts equal requests sent, exactly; the leaking route keeps LEAK
/// bytes per request within 15%; the others within noise of zero.
fn assert_routes(what: &str, view: &RoutesView, sent: &BTreeMap<String, u64>) {
    let counted: BTreeMap<String, u64> = view
        .routes
        .iter()
        .map(|r| (r.route.clone(), r.requests))
        .collect();
    assert_eq!(&counted, sent, "{what}: requests per route");
    assert_eq!(view.overflowed_requests, 0);
    for r in &view.routes {
        let kept = r.kept_per_request.expect("a slope").bytes;
        eprintln!(
            "{what}: {:<28} requests {:>4} kept {:>9.0} B/request (mean {:>9.0}, median {:>7.0}, grew {:>3.0}%)",
            r.route,
            r.requests,
            kept,
            r.mean_delta_bytes,
            r.median_delta_bytes,
            r.grew_share * 100.0
        );
        if r.route == "GET /leak/:id" {
            let truth = LEAK as f64;
            assert!(
                (kept - truth).abs() <= 0.15 * truth,
                "{what}: {} keeps {kept:.0} B/request, truth {truth:.0} (±15%)",
                r.route
            );
        } else {
            // Noise: a page now and then, far below the leak.
            assert!(
                kept.abs() <= 4096.0,
                "{what}: {} keeps {kept:.0} B/request, expected about 0",
                r.route
            );
        }
    }
}

/// The LEAK_TREND_DETECTED-style naming: the route carrying the slope.
fn assert_carrier(agent: &AgentHarness, pid: u32) {
    let carrier = agent.with(|s| {
        s.registry
            .find(pid)
            .unwrap()
            .requests
            .routes
            .carrier()
            .map(|(route, _)| route)
    });
    assert_eq!(carrier.as_deref(), Some("GET /leak/:id"));
}

#[test]
fn gunicorn_sync_names_the_leaking_route() {
    let _serial = serial();
    let mut s = settings(&["gunicorn"]);
    // The worker grows LEAK / 5 per request: a trend these windows judge.
    s.detector.window_size = 60;
    s.detector.check_interval = 20;
    s.detector.warmup_samples = 10;
    s.detector.slope_threshold_mb = 0.001;
    let agent = AgentHarness::start(s);
    let port = free_port();
    let server = gunicorn(port, 1, 0);
    assert!(wait_port(port, SERVER_START), "gunicorn listens");
    let worker = wait_children(server.pid(), 1)[0];
    // Sync workers close after each response: a connection per request.
    let sent = mixed_traffic(port, 60, false);
    wait_counted(&agent, worker, 300);
    assert_routes("gunicorn sync", &routes_of(&agent, worker), &sent);
    assert_carrier(&agent, worker);
    // The leak alarm (and the worker's status) names the route.
    let leak_route = agent.with(|s| {
        let w = s.registry.find(worker).unwrap();
        assert!(w.leak_detections > 0, "LEAK_TREND_DETECTED");
        memtrace::agent::views::worker_status(s, w, false).leak_route
    });
    let leak_route = leak_route.expect("a leak route");
    assert_eq!(leak_route.route, "GET /leak/:id");
    let kept = leak_route.kept_per_request.bytes;
    assert!((kept - LEAK as f64).abs() <= 0.15 * LEAK as f64, "{kept}");
    // The query string never reaches user space.
    agent.with(|s| {
        let w = s.registry.find(worker).unwrap();
        assert!(w.requests.recent(1000).all(|r| {
            r.path
                .as_deref()
                .is_some_and(|p| !p.contains('?') && !p.contains("secret"))
        }));
    });
}

fn gthread(port: u16) -> Proc {
    Proc::spawn(
        Command::new("gunicorn")
            .args(["--workers", "1", "--worker-class", "gthread"])
            .args(["--threads", "4", "--keep-alive", "10"])
            .arg("--bind")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--chdir")
            .arg(Fixtures::source(""))
            .arg("wsgi_app:app")
            .env("LEAK_BYTES", "0")
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
}

#[test]
fn gunicorn_gthread_names_the_leaking_route_and_caps_routes() {
    let _serial = serial();
    let mut s = settings(&["gunicorn"]);
    s.requests.max_routes = 8;
    let agent = AgentHarness::start(s);
    let port = free_port();
    let server = gthread(port);
    assert!(wait_port(port, SERVER_START), "gunicorn listens");
    let worker = wait_children(server.pid(), 1)[0];
    let sent = mixed_traffic(port, 60, true);
    wait_counted(&agent, worker, 300);
    assert_routes("gunicorn gthread", &routes_of(&agent, worker), &sent);
    assert_carrier(&agent, worker);

    // A flood of distinct paths: 3 more routes fit, the other 27 requests
    // are counted under "other".
    let (mut reader, mut writer) = connect(port);
    for i in 0..30 {
        let name: String = (0..3)
            .map(|k| (b'a' + ((i / 5usize.pow(k)) % 5) as u8) as char)
            .collect();
        write!(
            writer,
            "GET /flood/page-{name} HTTP/1.1\r\nHost: localhost\r\n\r\n"
        )
        .unwrap();
        read_response(&mut reader);
    }
    // The last request ends when its connection closes.
    drop((reader, writer));
    wait_counted(&agent, worker, 330);
    let view = routes_of(&agent, worker);
    assert_eq!(view.routes.len(), 9, "8 routes and other");
    assert_eq!(view.overflowed_requests, 27);
    let other = view.routes.iter().find(|r| r.route == OTHER_ROUTE).unwrap();
    assert_eq!(other.requests, 27);
    assert_eq!(view.routes.iter().map(|r| r.requests).sum::<u64>(), 330);
}

/// uvicorn from PyPI, in the virtualenv `cargo xtask setup` makes.
fn uvicorn(port: u16) -> Proc {
    let bin = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/uvicorn-venv/bin/uvicorn");
    assert!(
        bin.is_file(),
        "{} is missing: run `cargo xtask setup` (it installs uvicorn from PyPI into a virtualenv)",
        bin.display()
    );
    // One process (no --workers): its comm is "uvicorn".
    let server = Proc::spawn(
        Command::new(bin)
            .args(["asgi_app:app", "--host", "127.0.0.1"])
            .arg("--port")
            .arg(port.to_string())
            .arg("--app-dir")
            .arg(Fixtures::source(""))
            .args(["--log-level", "warning"])
            .env("LEAK_BYTES", "0")
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    assert!(wait_port(port, SERVER_START), "uvicorn listens");
    server
}

#[test]
fn uvicorn_names_the_leaking_route() {
    let _serial = serial();
    let agent = AgentHarness::start(settings(&["uvicorn"]));
    let port = free_port();
    let server = uvicorn(port);
    let pid = server.pid();
    assert!(
        agent.wait(Duration::from_secs(10), |s| s.registry.contains(pid)),
        "uvicorn is traced"
    );
    let sent = mixed_traffic(port, 60, true);
    wait_counted(&agent, pid, 300);
    assert_routes("uvicorn", &routes_of(&agent, pid), &sent);
    assert_carrier(&agent, pid);
}

/// Split request lines, pipelined requests and garbage, from a raw socket.
#[test]
fn split_pipelined_and_garbage_requests() {
    let _serial = serial();
    let agent = AgentHarness::start(settings(&["uvicorn"]));
    let port = free_port();
    let server = uvicorn(port);
    let pid = server.pid();
    assert!(
        agent.wait(Duration::from_secs(10), |s| s.registry.contains(pid)),
        "uvicorn is traced"
    );
    let pause = || std::thread::sleep(Duration::from_millis(200));
    let (mut reader, mut writer) = connect(port);
    // Split inside the path: the kernel completes the line from the next read.
    writer.write_all(b"GET /split/pa").unwrap();
    pause();
    writer
        .write_all(b"th/42?token=secret HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    read_response(&mut reader);
    // Split inside the method.
    writer.write_all(b"GE").unwrap();
    pause();
    writer
        .write_all(b"T /method-split HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    read_response(&mut reader);
    // A path longer than the kernel keeps: cut, its partial segment dropped.
    write!(
        writer,
        "GET /long/{} HTTP/1.1\r\nHost: x\r\n\r\n",
        "a".repeat(200)
    )
    .unwrap();
    read_response(&mut reader);
    // Pipelined: two requests in one write, read at once: one read phase
    // and one write phase, so socket mode counts one request, named by the
    // first line (documented in the README).
    writer
        .write_all(b"GET /pipe/first HTTP/1.1\r\nHost: x\r\n\r\nGET /pipe/second HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    read_response(&mut reader);
    read_response(&mut reader);
    drop((reader, writer));
    wait_counted(&agent, pid, 4);
    // Garbage (a TLS ClientHello's first bytes) and a line with a
    // non-HTTP method: no path, no route.
    for bytes in [
        &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n"[..],
        &b"BREW /pot HTTP/1.1\r\nHost: x\r\n\r\n"[..],
    ] {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(bytes).unwrap();
        // uvicorn answers 400 (or closes): either way, the connection ends.
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
    }
    std::thread::sleep(Duration::from_millis(500));
    let (view, paths) = agent.with(|s| {
        let w = s.registry.find(pid).unwrap();
        let paths: Vec<Option<String>> = w.requests.recent(100).map(|r| r.path.clone()).collect();
        (w.requests.routes.view(), paths)
    });
    eprintln!("routes: {view:#?}\npaths: {paths:?}");
    let counted: BTreeMap<String, u64> = view
        .routes
        .iter()
        .map(|r| (r.route.clone(), r.requests))
        .collect();
    let expected: BTreeMap<String, u64> = [
        ("GET /split/path/:id", 1),
        ("GET /method-split", 1),
        ("GET /long/…", 1),
        ("GET /pipe/first", 1),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(counted, expected);
    // uvicorn answers both with a 400: requests, without a path.
    assert_eq!(view.requests_without_path, 2);
    assert!(
        paths
            .iter()
            .flatten()
            .all(|p| !p.contains("secret") && !p.contains("BREW")),
        "{paths:?}"
    );
}

/// `--no-http-paths`: requests still counted, no method, no path, no route.
#[test]
fn no_http_paths_keeps_no_path() {
    let _serial = serial();
    let mut s = settings(&["gunicorn"]);
    s.load.http_paths = false;
    let agent = AgentHarness::start(s);
    let port = free_port();
    let server = gthread(port);
    assert!(wait_port(port, SERVER_START), "gunicorn listens");
    let worker = wait_children(server.pid(), 1)[0];
    mixed_traffic(port, 4, true);
    wait_counted(&agent, worker, 20);
    let view = routes_of(&agent, worker);
    assert!(view.routes.is_empty(), "{view:?}");
    assert_eq!(view.requests_without_path, 20);
    agent.with(|s| {
        let w = s.registry.find(worker).unwrap();
        assert!(
            w.requests
                .recent(100)
                .all(|r| r.method.is_none() && r.path.is_none() && r.route.is_none())
        );
    });
}

/// Mixed traffic on four connections at once (gthread's four threads):
/// route counts stay exact. (Per-route bytes are not asserted here: where
/// requests overlap, each one's delta includes the others' growth.)
#[test]
fn concurrent_mixed_traffic_counts_routes_exactly() {
    let _serial = serial();
    let agent = AgentHarness::start(settings(&["gunicorn"]));
    let port = free_port();
    let server = gthread(port);
    assert!(wait_port(port, SERVER_START), "gunicorn listens");
    let worker = wait_children(server.pid(), 1)[0];
    let clients: Vec<_> = (0..4)
        .map(|_| std::thread::spawn(move || mixed_traffic(port, 25, true)))
        .collect();
    let mut sent: BTreeMap<String, u64> = BTreeMap::new();
    for c in clients {
        for (route, n) in c.join().expect("client") {
            *sent.entry(route).or_insert(0) += n;
        }
    }
    wait_counted(&agent, worker, 500);
    let counted: BTreeMap<String, u64> = routes_of(&agent, worker)
        .routes
        .iter()
        .map(|r| (r.route.clone(), r.requests))
        .collect();
    assert_eq!(counted, sent);
}
