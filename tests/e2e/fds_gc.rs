//! What requests leave behind besides memory: open descriptors (`fd_delta`,
//! `fds`, FD_LEAK_DETECTED) and CPython's GC (`gc_*_delta`), read by the
//! kernel at each request's ends, against what the app measures in its own
//! process and /proc read by the test.
//!
//! The fixture (`tests/fixtures/fd_gc_app.py`): `/socket` keeps a UDP
//! socket per request, `/file` opens and closes a file, `/ok` does nothing,
//! `/garbage` makes a cycle of objects with legacy finalizers and collects
//! it (uncollectable: gc.garbage grows by 2). Each answers the GC totals it
//! measured around its own work. Real gunicorn, sync and gthread, in socket
//! mode (routes) and accept mode, through the memtrace binary and its API.
use std::{net::SocketAddr, time::Duration};

use memtrace_tests::*;

const TOKEN: &str = "fds-gc-token";
const ROUNDS: usize = 12;
const ROUTES: [&str; 4] = ["/socket", "/file", "/ok", "/garbage"];

fn get(addr: SocketAddr, path: &str) -> serde_json::Value {
    let sep = if path.contains('?') { '&' } else { '?' };
    let (code, body) = api_get(addr, &format!("{path}{sep}token={TOKEN}"));
    assert_eq!(code, 200, "{path}: {body}");
    body
}

fn agent_for(name: &str, mode: &str) -> (AgentProcess, SocketAddr) {
    judging_agent(name, mode, &[], TOKEN)
}

fn app_gunicorn(port: u16, worker_class: &str) -> Proc {
    one_worker_gunicorn(port, worker_class, "fd_gc_app:app", &[])
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn leaks_descriptors_and_garbage(worker_class: &str, mode: &str) {
    let _serial = serial();
    let (agent, addr) = agent_for("gunicorn", mode);
    let port = free_port();
    let server = app_gunicorn(port, worker_class);
    assert!(wait_port(port, SERVER_START));
    let worker = wait_children(server.pid(), 1)[0];
    // The agent locates the worker's GC before the requests that count.
    assert!(
        wait_for(Duration::from_secs(15), || {
            get(addr, &format!("/v1/workers/{worker}"))["python_gc"].is_object()
        }),
        "the worker's GC was not located: {}",
        get(addr, &format!("/v1/workers/{worker}"))
    );

    // Sequential rounds: each request's ends see only its own work.
    let mut answers = Vec::new();
    for _ in 0..ROUNDS {
        for path in ROUTES {
            answers.push((path, json(&http_get(port, path).expect(path))));
        }
    }
    let total = ROUNDS * ROUTES.len();
    let mut records = Vec::new();
    assert!(
        wait_for(Duration::from_secs(10), || {
            records = get(
                addr,
                &format!("/v1/workers/{worker}/requests?limit={total}"),
            )["requests"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            records.len() == total
        }),
        "{} records of {total}; the agent said: {:#?}",
        records.len(),
        agent
            .logs()
            .iter()
            .filter(|l| l["level"] != "DEBUG")
            .collect::<Vec<_>>()
    );
    // Newest first in the API; the answers are oldest first.
    records.reverse();
    let mut uncollectable_seen = 0;
    // Kernels without path capture (before 5.15): the
    // records are matched by order (the requests were sequential).
    let paths = records.iter().any(|r| r["path"].is_string());
    if !paths {
        eprintln!(
            "{worker_class}: no request paths (accept mode, or a kernel without path capture): records matched by order"
        );
    }
    for ((path, answer), r) in answers.iter().zip(&records) {
        if paths {
            assert_eq!(r["path"].as_str(), Some(*path), "{r}");
        }
        let fd_delta = r["fd_delta"].as_i64();
        let want = i64::from(*path == "/socket");
        assert_eq!(fd_delta, Some(want), "{worker_class} {path}: {r}");
        let in_app = &answer["gc_delta"];
        let uncollectable = r["gc_uncollectable_delta"].as_i64();
        assert_eq!(
            uncollectable,
            in_app["uncollectable"].as_i64(),
            "{worker_class} {path}: the app measured {in_app}: {r}"
        );
        uncollectable_seen += uncollectable.unwrap_or(0);
        let collections = r["gc_collections_delta"].as_i64().unwrap_or(-1);
        assert!(
            collections >= in_app["collections"].as_i64().unwrap(),
            "{worker_class} {path}: the app measured {in_app}: {r}"
        );
        assert!(r["uss_delta_bytes"].is_null(), "{r}");
        assert!(
            r["unavailable"]["uss_delta"].as_str().is_some(),
            "a null field says why: {r}"
        );
    }
    assert_eq!(uncollectable_seen, 2 * ROUNDS as i64);

    // The last request's descriptor count against /proc, now that the
    // worker is idle (its connection closed).
    let last_fds = records.last().and_then(|r| r["fds"].as_u64());
    let proc_fds = open_fds(worker);
    eprintln!("{worker_class}: fds at the last end {last_fds:?}, /proc/{worker}/fd {proc_fds}");
    assert_eq!(last_fds, Some(proc_fds as u64));
    // In the app's own view: /state counts its descriptors with the
    // connection it answers on, which the kernel's count leaves out.
    let state = json(&http_get(port, "/state").expect("state"));
    assert_eq!(state["fds"].as_u64(), Some(proc_fds as u64 + 1), "{state}");

    // The detector's slope over descriptors names the route.
    let line = agent
        .wait_log(Duration::from_secs(10), |l| {
            l["message"] == "FD_LEAK_DETECTED"
        })
        .unwrap_or_else(|| panic!("no FD_LEAK_DETECTED in {:#?}", agent.logs()));
    assert_eq!(line["pid"].as_u64(), Some(u64::from(worker)), "{line}");
    if paths {
        assert_eq!(line["route"], "GET /socket", "{line}");
        let per_request = line["route_fds_per_request"].as_f64().unwrap_or(0.0);
        assert!((per_request - 1.0).abs() < 1e-9, "{line}");
    }
    assert_eq!(
        agent.count_logs(|l| l["message"] == "CHILD_LEAK_DETECTED"),
        0
    );
    let status = get(addr, &format!("/v1/workers/{worker}"));
    assert!(status["fd_leak_detections"].as_u64() >= Some(1), "{status}");
    let metrics = http_get(addr.port(), "/metrics").expect("metrics");
    assert!(
        metrics.lines().any(
            |l| l.starts_with("memtrace_worker_fd_leak_detections_total{")
                && l.contains(&format!("pid=\"{worker}\""))
        ),
        "{metrics}"
    );
}

#[test]
fn gunicorn_sync_descriptors_and_garbage_per_request() {
    leaks_descriptors_and_garbage("sync", "socket");
}

/// Accept mode: the request's connection is known by its descriptor.
#[test]
fn gunicorn_sync_accept_mode_descriptors_and_garbage_per_request() {
    leaks_descriptors_and_garbage("sync", "accept");
}

#[test]
fn gunicorn_gthread_descriptors_and_garbage_per_request() {
    leaks_descriptors_and_garbage("gthread", "socket");
}

/// asyncio tasks (CPython 3.14+, read through the `_asyncio` module's
/// debug offsets): Debian sid's python3.14 and python3.15 serve an asyncio
/// app chrooted into a sid root; `/leak` leaves a task behind per request.
/// The worker's count against `len(asyncio.all_tasks())` in the app,
/// `task_delta` +1 on `/leak` and 0 elsewhere, TASK_LEAK_DETECTED naming
/// the route. Requests are a quarter second apart: the count is read when
/// the agent records a request, within its drain interval.
#[test]
fn asyncio_tasks_of_python_314_and_315_per_request() {
    let _serial = serial();
    let root = sid_root();
    for minor in ["3.14", "3.15"] {
        let name = format!("python{minor}");
        let (agent, addr) = agent_for(&name, "socket");
        let port = free_port();
        let port_arg = port.to_string();
        let server = chroot_fixture(
            &root,
            &format!("/usr/bin/{name}"),
            "asyncio_app",
            &[&port_arg],
        );
        assert!(wait_port(port, SERVER_START), "{minor} serves");
        let pid = server.pid();
        let status = |addr| get(addr, &format!("/v1/workers/{pid}"));
        assert!(
            wait_for(Duration::from_secs(15), || status(addr)["asyncio_tasks"]
                .is_u64()),
            "{minor}: tasks never counted: {}",
            status(addr)
        );
        const PATTERN: [&str; 3] = ["/leak", "/ok", "/ok"];
        const ROUNDS: usize = 10;
        // The first request's count is what task_delta starts from.
        http_get(port, "/ok").expect("ok");
        std::thread::sleep(Duration::from_millis(250));
        for _ in 0..ROUNDS {
            for path in PATTERN {
                http_get(port, path).expect(path);
                std::thread::sleep(Duration::from_millis(250));
            }
        }
        let total = ROUNDS * PATTERN.len();
        let mut records = Vec::new();
        assert!(wait_for(Duration::from_secs(10), || {
            records = get(
                addr,
                &format!("/v1/workers/{pid}/requests?limit={}", total + 1),
            )["requests"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            records.len() == total + 1
        }));
        records.reverse();
        let first = records.remove(0);
        assert!(
            first["task_delta"].is_null(),
            "nothing to measure from: {first}"
        );
        assert!(first["unavailable"]["tasks"].is_string(), "{first}");
        for (i, r) in records.iter().enumerate() {
            let path = PATTERN[i % PATTERN.len()];
            assert_eq!(r["path"].as_str(), Some(path), "{r}");
            let want = i64::from(path == "/leak");
            assert_eq!(r["task_delta"].as_i64(), Some(want), "{minor} {path}: {r}");
        }
        // The count against the app's own, its /count handler left out.
        let mut app = 0;
        let mut ours = None;
        let equal = wait_for(Duration::from_secs(10), || {
            let body: serde_json::Value =
                serde_json::from_str(&http_get(port, "/count").expect("count")).expect("JSON");
            app = body["tasks"].as_u64().unwrap_or(0);
            std::thread::sleep(Duration::from_millis(1500));
            ours = status(addr)["asyncio_tasks"].as_u64();
            ours == Some(app - 1)
        });
        eprintln!(
            "{minor}: memtrace counts {ours:?}, asyncio.all_tasks() {app} with its own handler"
        );
        assert!(equal, "{minor}: {ours:?} vs {app} - 1");
        assert_eq!(
            ours,
            Some(ROUNDS as u64 + 1),
            "the leaked tasks and the main task"
        );
        let line = agent
            .wait_log(Duration::from_secs(10), |l| {
                l["message"] == "TASK_LEAK_DETECTED"
            })
            .unwrap_or_else(|| panic!("no TASK_LEAK_DETECTED in {:#?}", agent.logs()));
        assert_eq!(line["route"], "GET /leak", "{line}");
        assert_eq!(line["pid"].as_u64(), Some(u64::from(pid)), "{line}");
        let metrics = http_get(addr.port(), "/metrics").expect("metrics");
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("memtrace_worker_asyncio_tasks{")
                    && l.contains(&format!("pid=\"{pid}\""))),
            "{metrics}"
        );
    }
}
