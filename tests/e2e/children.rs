//! What workers start: a worker's descendants (count, names, memory, age,
//! orphans), per request `children_delta` and `children_rss_delta`, and
//! CHILD_LEAK_DETECTED, against /proc read at the same moment.
//!
//! The fixture (`tests/fixtures/render_app.py`) is the plan's service in
//! small: `/render` starts a browser stand-in (`standin`, another program
//! holding 20 MiB) and never closes it; `/ok` starts nothing; `/helper`
//! runs a child to completion. Real gunicorn, sync and gthread, in socket
//! mode (routes), through the memtrace binary and its API.
use std::{net::SocketAddr, time::Duration};

use memtrace_tests::*;

const TOKEN: &str = "children-token";
const STANDIN_MIB: u64 = 20;
const RENDERS: usize = 8;
/// `/ok` requests between two renders (and one `/helper`).
const OKS_PER_RENDER: usize = 1;

fn get(addr: SocketAddr, path: &str) -> serde_json::Value {
    let sep = if path.contains('?') { '&' } else { '?' };
    let (code, body) = api_get(addr, &format!("{path}{sep}token={TOKEN}"));
    assert_eq!(code, 200, "{path}: {body}");
    body
}

/// The agent in socket mode (routes), with a detector that judges after
/// a few requests; its API on a free port.
fn agent(extra: &[&str]) -> (AgentProcess, SocketAddr) {
    judging_agent("gunicorn", "socket", extra, TOKEN)
}

fn render_gunicorn(port: u16, worker_class: &str) -> Proc {
    let standin = fixtures().bin("standin");
    let mib = STANDIN_MIB.to_string();
    one_worker_gunicorn(
        port,
        worker_class,
        "render_app:app",
        &[
            ("STANDIN", standin.as_os_str()),
            ("STANDIN_MIB", mib.as_ref()),
        ],
    )
}

/// Every process below `pid`, from /proc.
fn descendants_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        for c in children_of(p) {
            out.push(c);
            todo.push(c);
        }
    }
    out.sort_unstable();
    out
}

/// Kills the stand-ins a test left running (they outlive their worker).
struct Reaper(Vec<u32>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for &pid in &self.0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// RENDERS rounds of a /render, OKS_PER_RENDER requests that start
/// nothing and one /helper whose child is gone by its end; with
/// `concurrent` (gthread), the others of a round run beside its render, on
/// other threads of the worker.
fn drive_renders(port: u16, concurrent: bool) {
    let others = move || {
        for _ in 0..OKS_PER_RENDER {
            http_get(port, "/ok").expect("ok");
        }
        http_get(port, "/helper").expect("helper");
    };
    for _ in 0..RENDERS {
        if concurrent {
            let t = std::thread::spawn(others);
            http_get(port, "/render").expect("render");
            t.join().unwrap();
        } else {
            http_get(port, "/render").expect("render");
            others();
        }
    }
}

fn leaked_browsers(worker_class: &str) {
    let _serial = serial();
    let (agent, addr) = agent(&[]);
    let port = free_port();
    let server = render_gunicorn(port, worker_class);
    assert!(wait_port(port, SERVER_START));
    let worker = wait_children(server.pid(), 1)[0];
    let mut reaper = Reaper(Vec::new());
    drive_renders(port, worker_class == "gthread");
    let total = RENDERS * (2 + OKS_PER_RENDER);
    reaper.0 = descendants_of(worker);

    // The worker's descendants against /proc: count, names, memory.
    let mut status = serde_json::Value::Null;
    let mut truth_rss = 0;
    let settled = wait_for(Duration::from_secs(15), || {
        status = get(addr, &format!("/v1/workers/{worker}"));
        let live = descendants_of(worker);
        truth_rss = live.iter().filter_map(|&p| smaps_rss(p)).sum::<u64>();
        let c = &status["children"];
        let rss = c["rss_bytes"].as_u64().unwrap_or(0) as f64;
        c["count"].as_u64() == Some(live.len() as u64)
            && live.len() == RENDERS
            && (rss / truth_rss as f64 - 1.0).abs() <= 0.10
            && status["requests_seen"].as_u64() == Some(total as u64)
    });
    let c = &status["children"];
    eprintln!(
        "{worker_class}: children {} ({:?}), {} B vs smaps {truth_rss} B, PSS {}, oldest {}s",
        c["count"], c["names"], c["rss_bytes"], c["pss_bytes"], c["oldest_age_secs"]
    );
    assert!(
        settled,
        "{worker_class}: children {c} vs /proc {:?} ({truth_rss} B); requests {} of {total}",
        descendants_of(worker),
        status["requests_seen"]
    );
    assert_eq!(c["names"]["standin"].as_u64(), Some(RENDERS as u64), "{c}");
    assert!(
        c["oldest_age_secs"].as_f64().is_some_and(|a| a > 0.0),
        "{c}"
    );
    assert!(c["pss_bytes"].as_u64().is_some_and(|p| p > 0), "{c}");
    // The worker list holds the master and its worker only.
    let workers = get(addr, "/v1/workers");
    assert_eq!(
        workers["workers"].as_array().map(Vec::len),
        Some(2),
        "descendants are not workers: {workers}"
    );

    // Per request: +1 on /render, 0 elsewhere; the stand-in's memory.
    let records = get(
        addr,
        &format!("/v1/workers/{worker}/requests?limit={total}"),
    );
    let records = records["requests"].as_array().expect("records");
    assert_eq!(records.len(), total);
    for r in records {
        let path = r["path"].as_str().unwrap_or("?");
        let delta = r["children_delta"].as_i64();
        let rss = r["children_rss_delta_bytes"].as_i64().unwrap_or(-1);
        if path == "/render" {
            assert_eq!(delta, Some(1), "{r}");
            let mib = rss as f64 / (1 << 20) as f64;
            assert!(
                (STANDIN_MIB as f64..STANDIN_MIB as f64 * 1.5).contains(&mib),
                "the stand-in's memory: {r}"
            );
        } else {
            assert_eq!(delta, Some(0), "{r}");
            assert_eq!(rss, 0, "{r}");
        }
    }

    // The detector's slope over descendants names the route.
    let line = agent
        .wait_log(Duration::from_secs(10), |l| {
            l["message"] == "CHILD_LEAK_DETECTED"
        })
        .unwrap_or_else(|| panic!("no CHILD_LEAK_DETECTED in {:#?}", agent.logs()));
    assert_eq!(line["route"], "GET /render", "{line}");
    assert_eq!(line["pid"].as_u64(), Some(u64::from(worker)), "{line}");
    let per_request = line["children_per_request"].as_f64().unwrap_or(0.0);
    assert!(per_request > 0.05, "{line}");
    assert_eq!(
        agent.count_logs(|l| l["message"] == "LEAK_TREND_DETECTED"),
        0,
        "the worker's own memory is flat"
    );

    // The worker dies: its stand-ins are orphans, named in its exit line.
    let stand_ins = descendants_of(worker);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(worker as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let exit = agent
        .wait_log(Duration::from_secs(10), |l| {
            l["message"] == "worker exited" && l["pid"].as_u64() == Some(u64::from(worker))
        })
        .expect("the worker's exit is logged");
    assert_eq!(
        exit["orphans"].as_u64(),
        Some(stand_ins.len() as u64),
        "{exit}"
    );
    let agent_status = get(addr, "/debug/memory/?action=status");
    assert_eq!(
        agent_status["agent"]["orphans_total"].as_u64(),
        Some(stand_ins.len() as u64),
        "{}",
        agent_status["agent"]
    );
    let metrics = http_get(addr.port(), "/metrics").expect("metrics");
    assert!(
        metrics.contains(&format!("memtrace_orphans {}", stand_ins.len())),
        "{metrics}"
    );
    drop(reaper);
}

#[test]
fn gunicorn_sync_render_leaks_browsers_the_agent_counts() {
    leaked_browsers("sync");
}

#[test]
fn gunicorn_gthread_render_leaks_browsers_the_agent_counts() {
    leaked_browsers("gthread");
}

/// `--log-format plan`: each request as the plan's line, parsed back field
/// by field against the request records.
#[test]
fn the_plans_log_line_parses_back() {
    let _serial = serial();
    let port = free_port();
    let api = free_port();
    let listen = format!("127.0.0.1:{api}");
    let agent = AgentProcess::start_with_format(
        &[
            "agent",
            "--process-name",
            "gunicorn",
            "--request-mode",
            "socket",
            "--listen",
            &listen,
        ],
        &[
            ("RUST_LOG", "info,memtrace::request=debug"),
            ("MEMTRACE_DEBUG_TOKEN", TOKEN),
        ],
        "plan",
    );
    let server = render_gunicorn(port, "sync");
    assert!(wait_port(port, SERVER_START));
    let worker = wait_children(server.pid(), 1)[0];
    http_get(port, "/ok").expect("ok");
    http_get(port, "/render").expect("render");
    let reaper = Reaper(descendants_of(worker));
    http_get(port, "/ok").expect("ok");
    let addr: SocketAddr = listen.parse().unwrap();
    let plan_lines = || -> Vec<String> {
        agent
            .logs()
            .iter()
            .filter_map(|l| l["message"].as_str())
            .filter(|l| l.contains(&format!("| [pid-{worker}] |")))
            .map(str::to_string)
            .collect()
    };
    assert!(
        wait_for(Duration::from_secs(10), || plan_lines().len() == 3),
        "three plan lines: {:#?}",
        agent.logs()
    );
    let records = get(addr, &format!("/v1/workers/{worker}/requests?limit=3"))["requests"].clone();
    for line in plan_lines() {
        // `TIMESTAMP LEVEL [ID] | [pid-N] | GET /path | duration=…ms | …`
        let (head, rest) = line.split_once(" | ").expect("fields joined by ' | '");
        let id = head
            .rsplit_once('[')
            .and_then(|(_, id)| id.strip_suffix(']'))
            .expect("the request id");
        let record = records
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["request_id"] == id)
            .unwrap_or_else(|| panic!("{id} in {records}"));
        let fields: Vec<&str> = rest.split(" | ").collect();
        assert_eq!(fields[0], format!("[pid-{worker}]"));
        assert_eq!(
            fields[1],
            format!("GET {}", record["path"].as_str().unwrap())
        );
        let value = |name: &str| {
            fields
                .iter()
                .find_map(|f| f.strip_prefix(&format!("{name}=")))
                .map(str::to_string)
        };
        let ms = value("duration").unwrap();
        let ms: f64 = ms.strip_suffix("ms").unwrap().parse().unwrap();
        assert!(
            (ms - record["duration_ms"].as_f64().unwrap()).abs() <= 0.5,
            "{line}"
        );
        let memory = value("memory").unwrap();
        let (before, after) = memory.split_once("->").unwrap();
        let mb = |s: &str| s.strip_suffix("MB").unwrap().parse::<f64>().unwrap();
        let mib = |v: &serde_json::Value| v.as_f64().unwrap() / (1 << 20) as f64;
        assert!((mb(before) - mib(&record["rss_before_bytes"])).abs() <= 0.5);
        assert!((mb(after) - mib(&record["rss_after_bytes"])).abs() <= 0.5);
        let delta = value("delta").unwrap();
        assert!(delta.starts_with('+') || delta.starts_with('-'), "{line}");
        assert!((mb(&delta) - mib(&record["delta_bytes"])).abs() <= 0.05);
        let browsers = value("browsers").map(|b| b.parse::<u64>().unwrap());
        let children = record["children"].as_u64().unwrap();
        assert_eq!(browsers.unwrap_or(0), children, "{line}");
        let browser_delta = value("browser_delta").map(|b| b.parse::<i64>().unwrap());
        assert_eq!(
            browser_delta.unwrap_or(0),
            record["children_delta"].as_i64().unwrap(),
            "{line}"
        );
        // The stand-in's stdout pipe stays open in the worker: one more
        // descriptor per render.
        let fd_delta = value("fd_delta").map(|f| f.parse::<i64>().unwrap());
        assert_eq!(
            fd_delta.unwrap_or(0),
            record["fd_delta"].as_i64().unwrap(),
            "{line}"
        );
        if record["path"] == "/render" {
            assert_eq!(browser_delta, Some(1), "{line}");
            assert_eq!(fd_delta, Some(1), "{line}");
        }
    }
    drop(reaper);
}

/// `--soft-limit-include-children`: the worker's own RSS stays far below
/// the limit, its stand-ins take it over; the worker is retired as its
/// server does it (gunicorn: TERM), and its stand-ins are reported as
/// orphans.
#[test]
fn the_soft_limit_can_count_what_a_worker_started() {
    let _serial = serial();
    let (agent, _addr) = agent(&[
        "--soft-limit-mb",
        "90",
        "--soft-limit-include-children",
        "--soft-limit-min-interval-secs",
        "0",
        "--soft-limit-jitter-secs",
        "0",
    ]);
    let port = free_port();
    let server = render_gunicorn(port, "sync");
    assert!(wait_port(port, SERVER_START));
    let worker = wait_children(server.pid(), 1)[0];
    let mut reaper = Reaper(Vec::new());
    // About 25 MB of its own, and 21 MB per stand-in: over 90 MB after 4.
    for _ in 0..5 {
        http_get(port, "/render").expect("render");
        http_get(port, "/ok").expect("ok");
    }
    reaper.0 = descendants_of(worker);
    let own_mb = smaps_rss(worker).unwrap_or(0) as f64 / (1 << 20) as f64;
    assert!(
        own_mb < 60.0,
        "the worker alone is under the limit: {own_mb} MB"
    );
    let exceeded = agent
        .wait_log(Duration::from_secs(20), |l| {
            l["pid"].as_u64() == Some(u64::from(worker))
                && l["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("SOFT_LIMIT_EXCEEDED"))
        })
        .unwrap_or_else(|| panic!("no SOFT_LIMIT_EXCEEDED in {:#?}", agent.logs()));
    assert!(
        exceeded["footprint_mb"].as_f64().is_some_and(|f| f > 90.0),
        "{exceeded}"
    );
    assert_eq!(exceeded["children"].as_u64(), Some(reaper.0.len() as u64));
    let exit = agent
        .wait_log(Duration::from_secs(45), |l| {
            l["message"] == "worker exited" && l["pid"].as_u64() == Some(u64::from(worker))
        })
        .unwrap_or_else(|| panic!("the worker was not retired: {:#?}", agent.logs()));
    assert_eq!(
        exit["orphans"].as_u64(),
        Some(reaper.0.len() as u64),
        "{exit}"
    );
    // The master replaces it.
    assert!(
        wait_for(Duration::from_secs(30), || children_of(server.pid())
            .iter()
            .any(|&p| p != worker && !reaper.0.contains(&p))),
        "gunicorn started a new worker"
    );
}
