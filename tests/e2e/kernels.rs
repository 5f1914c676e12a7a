//! What the kernel matrix (`cargo xtask matrix`) runs on every kernel, and
//! what runs here too: `memtrace check` against the kernel's own tracefs and
//! BTF, the agent started in every request mode and collection tier the
//! kernel can serve, real gunicorn's requests and leak in the best request
//! mode it has, process exits seen by each exit-program variant, and a
//! piece missing on purpose named in one line while the rest works.
use std::{path::Path, process::Command, time::Duration};

use memtrace::kernel::{
    features::HIDE_ENV,
    loader::{CollectTier, RequestProbes},
    uprobes::ProbeTarget,
};
use memtrace_tests::*;

const KIB: i64 = 1024;
const TOKEN: &str = "kernels-token";

/// `memtrace check --format json`, with extra environment.
fn check(env: &[(&str, &str)]) -> serde_json::Value {
    require_root();
    let out = Command::new(memtrace_bin())
        .args(["check", "--format", "json"])
        .envs(env.iter().copied())
        .output()
        .expect("memtrace check runs");
    assert!(
        out.status.success(),
        "memtrace check failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("check prints JSON")
}

fn row<'a>(report: &'a serde_json::Value, feature: &str) -> &'a serde_json::Value {
    report["features"]
        .as_array()
        .expect("features")
        .iter()
        .find(|r| r["feature"] == feature)
        .unwrap_or_else(|| panic!("no row {feature} in {report}"))
}

fn works(report: &serde_json::Value, feature: &str) -> bool {
    row(report, feature)["works"] == true
}

fn tracefs_event(category: &str, name: &str) -> Option<String> {
    ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .iter()
        .find_map(|root| {
            std::fs::read_to_string(
                Path::new(root)
                    .join("events")
                    .join(category)
                    .join(name)
                    .join("format"),
            )
            .ok()
        })
}

#[test]
fn check_agrees_with_this_kernels_tracefs_and_btf() {
    let report = check(&[]);
    eprintln!("{}", serde_json::to_string_pretty(&report).unwrap());
    for r in report["features"].as_array().unwrap() {
        if r["works"] == true {
            assert!(r["how"].as_str().is_some_and(|h| !h.is_empty()), "{r}");
        } else {
            // What is off says why, and no row is off without a reason.
            assert!(r["why_not"].as_str().is_some_and(|w| w.len() > 20), "{r}");
        }
    }
    // Ground truth from the kernel's own tracefs and BTF, read here.
    let exit = tracefs_event("sched", "sched_process_exit").expect("sched_process_exit");
    let how = row(&report, "process tracking")["how"]
        .as_str()
        .unwrap()
        .to_string();
    let btf = Path::new("/sys/kernel/btf/vmlinux").exists();
    if exit.contains(" group_dead;") {
        assert!(how.contains("group_dead"), "{how}");
    } else if btf {
        assert!(how.contains("signal->live"), "{how}");
    } else {
        assert!(how.contains("main thread"), "{how}");
    }
    let socket = row(&report, "request mode socket");
    if tracefs_event("sock", "sock_recv_length").is_some() {
        assert!(
            socket["how"]
                .as_str()
                .unwrap()
                .contains("sock:sock_recv_length"),
            "{socket}"
        );
    } else if socket["works"] == true {
        assert!(
            socket["how"].as_str().unwrap().contains("fexit"),
            "{socket}"
        );
    } else {
        assert!(
            socket["why_not"].as_str().unwrap().contains("6.3"),
            "{socket}"
        );
    }
    assert_eq!(
        works(&report, "python frames"),
        btf,
        "Python frames need BTF"
    );
    assert!(works(&report, "request mode none"));
}

/// The leaky fixture's workers with the agent in `mode` collecting `tier`:
/// requests counted (where the mode sees them) and collection started. The
/// only pieces named off are those `check` says this kernel lacks
/// (`allowed_off`: the starts of their lines).
fn smoke(mode: RequestProbes, tier: CollectTier, allowed_off: &[&str]) {
    let _serial = serial();
    let mut settings = test_settings(&["leaky_server"]);
    settings.load.requests = mode.clone();
    settings.load.collect = tier;
    let agent = AgentHarness::start(settings);
    let attached = agent.with(|s| s.tracer.attached().to_vec());
    eprintln!("{mode:?} {tier:?}: {attached:?}");
    let off = agent.with(|s| s.tracer.unavailable().to_vec());
    assert!(
        off.iter()
            .all(|line| allowed_off.iter().any(|a| line.starts_with(a))),
        "{mode:?} {tier:?}: {off:?}"
    );
    let server = LeakyServer::start(2, 64 * KIB as u64, &[]);
    let workers = server.workers(2);
    assert!(agent.wait(Duration::from_secs(20), |s| {
        workers.iter().all(|&p| s.registry.contains(p))
    }));
    let sent = 20;
    drive(server.port, "/", sent, 2);
    if mode != RequestProbes::None {
        assert_counted_exactly(&agent, &workers, sent as u64);
    }
    agent
        .with(|s| s.tracer.start_collection(&workers))
        .unwrap_or_else(|e| panic!("{tier:?}: {e}"));
    drive(server.port, "/", sent, 2);
    let detached = agent.with(|s| s.tracer.stop_collection());
    assert!(detached >= 3, "{tier:?}: {detached} collection programs");
    agent.stop();
}

#[test]
fn the_agent_starts_in_every_mode_and_tier_this_kernel_serves() {
    let report = check(&[]);
    let handler = RequestProbes::Function(ProbeTarget {
        binary: fixtures().handler_so(),
        symbol: "handle_request".into(),
    });
    // Each mode once, each tier once, in four starts.
    let runs = [
        (
            "request mode none",
            RequestProbes::None,
            "collect growth",
            CollectTier::Growth,
        ),
        (
            "request mode accept",
            RequestProbes::Accept,
            "collect heap",
            CollectTier::Heap,
        ),
        (
            "request mode socket",
            RequestProbes::Socket,
            "collect pymalloc",
            CollectTier::Pymalloc,
        ),
        (
            "request mode uprobe",
            handler,
            "collect heap",
            CollectTier::Heap,
        ),
    ];
    // Asked for by default, and off where the kernel lacks them.
    let allowed_off: Vec<&str> = [
        ("http path capture", "HTTP path capture is off"),
        ("python frames", "Python frames are off"),
    ]
    .into_iter()
    .filter(|(row, _)| !works(&report, row))
    .map(|(_, line)| line)
    .collect();
    let mut ran = 0;
    for (mode_row, mode, tier_row, tier) in runs {
        if works(&report, mode_row) && works(&report, tier_row) {
            smoke(mode, tier, &allowed_off);
            ran += 1;
        } else {
            eprintln!("skipped {mode_row} with {tier_row}: off on this kernel");
        }
    }
    // Every kernel memtrace supports has at least the steady state and
    // accept mode (syscall tracepoints).
    assert!(ran >= 2, "only {ran} of 4 runs could start");
}

/// Gunicorn's workers, 60 requests counted of 60 sent, and a 256 KiB leak
/// per request (per-request deltas and the detector's slope), in socket mode
/// where this kernel has it and accept mode otherwise. In socket mode, once
/// with the socket events' fields loaded straight from their records (the
/// layout every kernel so far has) and once read by helper calls at the
/// offsets tracefs gives (what a kernel with another layout runs).
#[test]
fn real_gunicorn_counts_60_of_60_and_the_256k_leak_in_the_best_mode() {
    let report = check(&[]);
    let mode = if works(&report, "request mode socket") {
        RequestProbes::Socket
    } else {
        RequestProbes::Accept
    };
    eprintln!("request mode: {mode:?}");
    // The second run also counts faults with a program on every fault, as
    // a kernel without BTF does.
    let layouts: &[&str] = if mode == RequestProbes::Socket {
        &["", "sock_fixed_layout,task_fault_counters"]
    } else {
        &["", "task_fault_counters"]
    };
    for hidden in layouts {
        let _serial = serial();
        hide(hidden);
        gunicorn_counts_and_leak(mode.clone());
        hide("");
    }
}

fn gunicorn_counts_and_leak(mode: RequestProbes) {
    let mut settings = test_settings(&["gunicorn"]);
    settings.load.requests = mode;
    // Small windows: a few hundred requests give a judged slope.
    settings.detector.window_size = 60;
    settings.detector.check_interval = 20;
    settings.detector.warmup_samples = 10;
    let agent = AgentHarness::start(settings);
    let port = free_port();
    let leak = 256 * KIB;
    let server = gunicorn(port, 2, leak as u64);
    assert!(wait_port(port, SERVER_START), "gunicorn listens");
    let workers = wait_children(server.pid(), 2);
    assert!(agent.wait(Duration::from_secs(20), |s| {
        workers.iter().all(|&p| s.registry.contains(p))
    }));
    let sent = 60;
    drive(port, "/", sent, 2);
    assert_counted_exactly(&agent, &workers, sent as u64);
    // The leak over 300 requests: before 6.2 the kernel reports RSS from
    // per-thread caches flushed every 64 faults, so one request's delta is
    // approximate there and only a long run's mean is exact (README,
    // Kernels).
    let more = 240;
    drive(port, "/", more, 2);
    assert_counted_exactly(&agent, &workers, (sent + more) as u64);
    let deltas = recent_deltas(&agent, &workers, sent + more);
    assert_mean_within(&deltas, leak, 0.10, "gunicorn leak 256 KiB");
    // Each request faults the leak's fresh pages in, and a few more.
    let faults = recent_of(&agent, &workers, sent + more, |r| r.faults);
    let mean = faults.iter().sum::<u64>() as f64 / faults.len().max(1) as f64;
    let pages = leak as f64 / 4096.0;
    eprintln!("faults per request: mean {mean:.1}, leak {pages} pages");
    assert!(
        mean >= pages * 0.95 && mean <= pages * 1.5 + 64.0,
        "faults per request: mean {mean:.1} for a leak of {pages} pages"
    );
    // The leak detector's slope finds it too.
    assert_slope(&agent, &workers, leak as u64, "gunicorn leak 256 KiB");
}

/// Sets the capabilities hidden from the agent in this process (the tests
/// of this binary run one at a time, under `serial()`).
fn hide(list: &str) {
    // SAFETY: no other thread reads the environment meanwhile: the tests of
    // this binary run with --test-threads=1 and hold the serial lock.
    unsafe { std::env::set_var(HIDE_ENV, list) };
}

/// A worker killed is gone from the agent's model through the kernel's exit
/// event alone (no /proc refresh runs meanwhile), whichever exit program this
/// kernel, or the hidden capabilities, choose.
#[test]
fn each_exit_variant_reports_a_killed_worker() {
    for hidden in ["", "group_dead", "group_dead,btf"] {
        let _serial = serial();
        hide(hidden);
        let mut settings = test_settings(&["leaky_server"]);
        // Nothing but the exit event can retire the worker in time.
        settings.refresh_interval = Duration::from_secs(600);
        settings.rescan_interval = Duration::from_secs(600);
        let agent = AgentHarness::start(settings);
        let server = LeakyServer::start(2, 0, &[]);
        let workers = server.workers(2);
        assert!(agent.wait(Duration::from_secs(20), |s| {
            workers.iter().all(|&p| s.registry.contains(p))
        }));
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(workers[0] as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        let gone = agent.wait(Duration::from_secs(20), |s| {
            !s.registry.contains(workers[0])
        });
        let alive = agent.with(|s| s.registry.contains(workers[1]));
        agent.stop();
        hide("");
        assert!(gone, "hidden={hidden}: the killed worker is still traced");
        assert!(alive, "hidden={hidden}: the other worker was dropped");
    }
}

/// Pieces missing on purpose: each is named once in the log, `memtrace
/// check` says the same, and the agent still follows the workers and their
/// memory.
#[test]
fn a_missing_piece_is_named_once_and_the_rest_works() {
    let hidden = "sock_tracepoints,btf";
    let report = check(&[(HIDE_ENV, hidden)]);
    assert!(!works(&report, "request mode socket"));
    assert!(!works(&report, "python frames"));
    assert!(works(&report, "process tracking"));
    let port = free_port();
    let agent = AgentProcess::start_with_env(
        &[
            "agent",
            "--process-name",
            "leaky_server",
            "--request-mode",
            "socket",
            "--listen",
            &format!("127.0.0.1:{port}"),
        ],
        &[(HIDE_ENV, hidden), ("MEMTRACE_DEBUG_TOKEN", TOKEN)],
    );
    let socket_off = |l: &serde_json::Value| {
        l["level"] == "WARN"
            && l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("request mode socket is off"))
    };
    let frames_off = |l: &serde_json::Value| {
        l["level"] == "WARN"
            && l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("Python frames are off"))
    };
    assert_eq!(agent.count_logs(socket_off), 1, "{:?}", agent.logs());
    assert_eq!(agent.count_logs(frames_off), 1, "{:?}", agent.logs());
    // The rest works: workers found, their RSS from the kernel.
    let server = LeakyServer::start(2, 128 * KIB as u64, &[]);
    let workers = server.workers(2);
    let api: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert!(wait_port(port, SERVER_START));
    let mut listed = serde_json::Value::Null;
    let found = wait_for(Duration::from_secs(20), || {
        listed = api_get(api, &format!("/v1/workers?token={TOKEN}")).1;
        workers
            .iter()
            .all(|p| listed.to_string().contains(&format!("\"pid\":{p}")))
    });
    assert!(found, "workers not listed: {listed}");
    drive(server.port, "/", 20, 2);
    for &pid in &workers {
        let truth = smaps_rss(pid).expect("smaps_rss");
        let (_, w) = api_get(api, &format!("/v1/workers/{pid}?token={TOKEN}"));
        let rss = w["rss_bytes"].as_u64().unwrap_or_else(|| panic!("{w}"));
        let diff = rss.abs_diff(truth);
        assert!(
            diff <= truth / 10 + 1024 * 1024,
            "pid {pid}: rss {rss} vs smaps {truth}"
        );
    }
    // Still one line each, after the workers came.
    assert_eq!(agent.count_logs(socket_off), 1);
    assert_eq!(agent.count_logs(frames_off), 1);
}
