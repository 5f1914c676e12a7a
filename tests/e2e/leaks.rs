//! Leak detection and soft-limit enforcement end to end: the fixture's known
//! leak gives the slope; the fixture master counts the signals it gets; real
//! gunicorn replaces its workers and memtrace follows the new ones.
use std::{
    process::Command,
    time::{Duration, Instant},
};

use memtrace::{
    judge::{
        servers::ServerKind,
        softlimit::{SoftLimitSettings, SoftLimitTarget},
    },
    kernel::{loader::RequestProbes, uprobes::ProbeTarget},
};
use memtrace_tests::*;
use nix::sys::signal::Signal;

const MIB: u64 = 1024 * 1024;

#[test]
fn a_1mb_per_request_leak_is_logged_with_its_slope() {
    let _serial = serial();
    let so = fixtures().handler_so();
    let request_fn = format!("{}:handle_request", so.display());
    let agent = AgentProcess::start(&[
        "agent",
        "--process-name",
        "leaky_server",
        "--request-fn",
        &request_fn,
        "--soft-limit-mb",
        "100000",
    ]);
    let server = LeakyServer::start(1, MIB, &[]);
    let port = server.port;
    // Warm-up 20, then the window needs 50 samples at a check (every 50).
    drive(port, "/", 150, 1);
    let line = agent
        .wait_log(Duration::from_secs(10), |l| {
            l["message"] == "LEAK_TREND_DETECTED"
        })
        .unwrap_or_else(|| panic!("no LEAK_TREND_DETECTED in {:#?}", agent.logs()));
    let slope = line["slope_mb_per_unit"].as_f64().expect("slope field");
    assert!(
        (slope - 1.0).abs() <= 0.1,
        "slope {slope} MB/request for a 1 MiB/request leak"
    );
    assert_eq!(line["slope_unit"], "MB/request");
    assert!(line["pid"].as_u64().is_some());
}

#[test]
fn no_leak_no_alarm() {
    let _serial = serial();
    let mut settings = test_settings(&["leaky_server"]);
    settings.load.requests = RequestProbes::Function(ProbeTarget {
        binary: fixtures().handler_so(),
        symbol: "handle_request".into(),
    });
    let agent = AgentHarness::start(settings);
    let server = LeakyServer::start(2, 0, &[]);
    drive(server.port, "/", 400, 2);
    let master = server.master;
    assert!(agent.wait(Duration::from_secs(10), |s| {
        s.registry
            .alive()
            .filter(|w| w.ppid == master)
            .map(|w| w.requests.seen)
            .sum::<u64>()
            == 400
    }));
    agent.with(|s| {
        for w in s.registry.alive() {
            assert_eq!(w.leak_detections, 0, "pid {} alarmed without a leak", w.pid);
            assert!(!w.detector.soft_limit_fired());
        }
    });
}

/// Times at which the fixture master's SIGHUP count went up.
fn hup_times(dir: &std::path::Path, want: usize, timeout: Duration) -> Vec<Instant> {
    let mut times = Vec::new();
    let mut last = 0;
    wait_for(timeout, || {
        let n = std::fs::read_to_string(dir.join("hup"))
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .unwrap_or(0);
        while last < n {
            times.push(Instant::now());
            last += 1;
        }
        times.len() >= want
    });
    times
}

fn hups(dir: &std::path::Path) -> usize {
    std::fs::read_to_string(dir.join("hup"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn one_sighup_per_worker_lifetime_rate_limited_across_workers() {
    let _serial = serial();
    // prefork_pages' master counts SIGHUPs and does not restart workers, so
    // workers stay above the limit: a second signal would show.
    let mut settings = test_settings(&["prefork_pages"]);
    settings.detector.soft_limit_mb = 6.0;
    settings.timed_detector.soft_limit_mb = 6.0;
    settings.leak_sample_interval = Duration::from_millis(200);
    // Explicitly SIGHUP to the master, over the generic prefork preset.
    settings.soft_limit = SoftLimitSettings {
        target: Some(SoftLimitTarget::Parent),
        signal: Some(Signal::SIGHUP),
        min_interval: Duration::from_secs(2),
        jitter: Duration::ZERO,
        ..SoftLimitSettings::default()
    };
    let agent = AgentHarness::start(settings);
    let dir = tempfile::tempdir().unwrap();
    // 3 workers of ~9 MB each (2000 pages + the binary): all over 6 MB at once.
    let _server = Proc::spawn(
        Command::new(fixtures().bin("prefork_pages"))
            .args(["3", "2000"])
            .arg(dir.path()),
    );
    let times = hup_times(dir.path(), 3, Duration::from_secs(20));
    assert_eq!(times.len(), 3, "one SIGHUP per worker: got {}", times.len());
    for pair in times.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= Duration::from_millis(1800),
            "restarts {gap:?} apart, rate limit is 2s"
        );
    }
    // Workers stay above the limit: no more signals in their lifetime.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(hups(dir.path()), 3, "a worker was signalled twice");
    agent.with(|s| {
        assert_eq!(s.enforcer.actions_taken, 3);
        let master = read_pid(&dir.path().join("master")).unwrap();
        // The master is over the limit? It is small (no pages touched).
        assert!(!s.registry.get(master).unwrap().detector.soft_limit_fired());
    });

    // A new worker lifetime gets its own signal.
    let victim = worker_files(dir.path())[0];
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let times = hup_times(dir.path(), 4, Duration::from_secs(10));
    assert_eq!(
        times.len(),
        4,
        "the respawned worker's crossing is signalled once"
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(hups(dir.path()), 4);
}

#[test]
fn the_fixture_retires_its_leaking_worker_alone_and_replaces_it() {
    let _serial = serial();
    let mut settings = test_settings(&["leaky_server"]);
    settings.load.requests = RequestProbes::Function(ProbeTarget {
        binary: fixtures().handler_so(),
        symbol: "handle_request".into(),
    });
    settings.detector.soft_limit_mb = 40.0;
    settings.soft_limit.jitter = Duration::ZERO;
    settings.soft_limit.min_interval = Duration::from_millis(500);
    let agent = AgentHarness::start(settings);
    let server = LeakyServer::start(1, MIB, &[]);
    let (port, master) = (server.port, server.master);
    let first = server.workers(1)[0];
    // ~40 requests of 1 MiB cross 40 MB; the generic prefork preset sends
    // TERM to the worker, which finishes and exits; the master respawns it.
    for _ in 0..60 {
        http_get(port, "/").unwrap();
        if agent.with(|s| s.enforcer.actions_taken > 0) {
            break;
        }
    }
    assert!(
        agent.wait(Duration::from_secs(10), |s| s
            .registry
            .find(first)
            .is_some_and(|w| !w.alive())
            && s.registry.alive().any(|w| w.ppid == master)),
        "old worker exited and a new one is followed"
    );
    let second = agent.with(|s| s.registry.alive().find(|w| w.ppid == master).unwrap().pid);
    assert!(
        agent.wait(Duration::from_secs(10), |s| {
            s.enforcer
                .recycles()
                .any(|r| r.worker_pid == first && r.replacement_pid == Some(second))
        }),
        "the recycle names the replacement"
    );
    agent.with(|s| {
        let r = s
            .enforcer
            .recycles()
            .find(|r| r.worker_pid == first)
            .unwrap();
        assert_eq!(
            (r.server, r.signal.as_str()),
            (ServerKind::GenericPrefork, "SIGTERM")
        );
        assert_eq!(r.target_pid, first);
        assert_eq!(
            s.enforcer.actions_taken, 1,
            "once for that worker's lifetime"
        );
        let w = s.registry.get(second).unwrap();
        assert!(!w.detector.soft_limit_fired(), "fresh detector");
        assert!(w.detector.request_count() < 5);
    });
    assert_eq!(server.hups(), 0, "the master was not signalled");
}

#[test]
fn real_gunicorn_is_restarted_by_sighup_and_its_new_workers_followed() {
    let _serial = serial();
    let mut settings = test_settings(&["gunicorn"]);
    settings.load.requests = RequestProbes::Accept;
    settings.detector.soft_limit_mb = 60.0;
    settings.soft_limit.jitter = Duration::ZERO;
    settings.soft_limit.min_interval = Duration::from_secs(60);
    settings.soft_limit.target = Some(SoftLimitTarget::Parent);
    settings.soft_limit.signal = Some(Signal::SIGHUP);
    let agent = AgentHarness::start(settings);
    let port = free_port();
    let _server = gunicorn(port, 2, MIB);
    assert!(wait_port(port, SERVER_START));
    let mut tree = None;
    assert!(wait_for(Duration::from_secs(10), || {
        tree = agent.with(|s| {
            let master = s
                .registry
                .alive()
                .find(|w| s.registry.role(w.pid) == memtrace::model::workers::Role::Master)?;
            let kids: Vec<u32> = s
                .registry
                .alive()
                .filter(|w| w.ppid == master.pid)
                .map(|w| w.pid)
                .collect();
            (kids.len() == 2).then_some((master.pid, kids))
        });
        tree.is_some()
    }));
    let (master, old) = tree.unwrap();
    // Each worker starts around 20 MB: ~40 leaked MiB each crosses 60 MB.
    for _ in 0..200 {
        let _ = http_get(port, "/");
        let restarted = agent.with(|s| s.enforcer.actions_taken > 0);
        if restarted {
            break;
        }
    }
    // The enforcer acts on the agent's next refresh.
    assert!(
        agent.wait(Duration::from_secs(10), |s| s.enforcer.actions_taken >= 1),
        "a restart was asked for"
    );
    // gunicorn replaces every worker on SIGHUP; memtrace follows the new ones.
    assert!(
        agent.wait(Duration::from_secs(30), |s| {
            let alive: Vec<u32> = s
                .registry
                .alive()
                .filter(|w| w.ppid == master)
                .map(|w| w.pid)
                .collect();
            alive.len() == 2
                && alive.iter().all(|p| !old.contains(p))
                && old
                    .iter()
                    .all(|p| s.registry.find(*p).is_some_and(|w| !w.alive()))
        }),
        "old workers {old:?} replaced by new ones"
    );
    // The new workers serve, with fresh detectors.
    drive(port, "/leak/0", 10, 1);
    agent.with(|s| {
        for w in s.registry.alive().filter(|w| w.ppid == master) {
            assert!(!w.detector.soft_limit_fired());
            assert!(
                w.detector.request_count() <= 12,
                "fresh detector for {}",
                w.pid
            );
        }
        assert!(s.registry.contains(master), "the master is still followed");
    });
}
