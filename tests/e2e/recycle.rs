//! The soft limit on real servers, under load: the one worker over the
//! limit is retired the way its server does it (gunicorn TERM, uWSGI HUP,
//! PHP-FPM QUIT to the worker), every other worker and the master stay, no
//! request fails, and the replacement is followed with a fresh detector.
use std::{
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::Duration,
};

use memtrace::judge::{
    servers::ServerKind,
    softlimit::{RecycleState, SoftLimitMetric, SoftLimitSettings},
};
use memtrace_tests::*;

const MIB: u64 = 1024 * 1024;
/// What the victim leaks in one request: well over the limit's headroom.
const LEAK: u64 = 48 * MIB;
/// The limit is this far above the largest worker at the start.
const HEADROOM_MB: f64 = 24.0;

/// Requests in a loop on a few connections until stopped; every failure
/// (connection error, non-200) is kept.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Load {
    fn start(port: u16, path: &str, concurrency: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..concurrency)
            .map(|_| {
                let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
                let path = path.to_string();
                thread::spawn(move || {
                    // Bounded: at most 10 minutes of requests.
                    for _ in 0..1_000_000 {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        match http_get(port, &path) {
                            Ok(_) => ok.fetch_add(1, Ordering::SeqCst),
                            Err(e) => {
                                failures.lock().unwrap().push(e.to_string());
                                0
                            }
                        };
                    }
                })
            })
            .collect();
        Self {
            stop,
            ok,
            failures,
            threads,
        }
    }

    /// Stops the load; returns (requests that succeeded, failures).
    fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            t.join().expect("load thread");
        }
        let failures = self.failures.lock().unwrap().clone();
        (self.ok.load(Ordering::SeqCst), failures)
    }
}

/// A server under test: its processes (dropped: killed), the pid of its
/// master, and how to make the worker that serves a request leak.
struct Server {
    _procs: Vec<Proc>,
    port: u16,
    master: u32,
    workers: usize,
    leak_path: String,
}

/// Starts `server` traced by `names`, pushes one worker over the limit
/// while load runs, and checks that it alone was retired with `signal`.
fn one_worker_is_recycled(names: &[&str], server: Server, kind: ServerKind, signal: &str) {
    let _serial = serial();
    assert!(wait_port(server.port, SERVER_START), "{kind} listens");
    let workers = wait_children(server.master, server.workers);
    let largest_mb = workers
        .iter()
        .filter_map(|&p| smaps_rss(p))
        .max()
        .expect("workers' RSS") as f64
        / MIB as f64;
    let limit = largest_mb + HEADROOM_MB;

    let mut settings = test_settings(names);
    settings.detector.soft_limit_mb = limit;
    settings.timed_detector.soft_limit_mb = limit;
    settings.leak_sample_interval = Duration::from_millis(200);
    settings.soft_limit = SoftLimitSettings {
        min_interval: Duration::from_secs(1),
        jitter: Duration::ZERO,
        ..SoftLimitSettings::default()
    };
    let agent = AgentHarness::start(settings);
    assert!(
        agent.wait(Duration::from_secs(10), |s| workers
            .iter()
            .chain([&server.master])
            .all(|p| s.registry.get(*p).is_some_and(|w| w.alive()))),
        "the agent follows the master {} and workers {workers:?}",
        server.master
    );

    let load = Load::start(server.port, "/", 4);
    thread::sleep(Duration::from_millis(500));
    let body = http_get(server.port, &server.leak_path).expect("the leaking request");
    let victim = pid_in(&body);
    assert!(workers.contains(&victim), "{victim} is one of {workers:?}");

    let mut replacement = None;
    assert!(
        agent.wait(Duration::from_secs(40), |s| {
            let r = s
                .enforcer
                .recycles()
                .find(|r| r.worker_pid == victim && r.state == RecycleState::Replaced);
            replacement = r.and_then(|r| r.replacement_pid);
            replacement.is_some()
        }),
        "{victim} recycled and replaced: {:?}",
        agent.with(|s| s.enforcer.recycles().cloned().collect::<Vec<_>>())
    );
    let replacement = replacement.unwrap();
    // Requests keep flowing to the new worker too.
    thread::sleep(Duration::from_secs(1));
    let (ok, failures) = load.finish();
    assert!(
        failures.is_empty(),
        "{} requests failed: {failures:?}",
        failures.len()
    );
    assert!(ok > 50, "the load ran: {ok} requests");

    // The victim alone: the master and every other worker unchanged.
    let now = children_of(server.master);
    for w in workers.iter().filter(|&&w| w != victim) {
        assert!(now.contains(w), "worker {w} was replaced too: {now:?}");
    }
    assert!(now.contains(&replacement) && !workers.contains(&replacement));
    assert!(!now.contains(&victim));
    agent.with(|s| {
        assert!(s.registry.get(server.master).is_some_and(|w| w.alive()));
        let r = s
            .enforcer
            .recycle_of(victim, s.registry.find(victim).unwrap().start_time);
        let r = r.expect("the victim's recycle");
        assert_eq!((r.server, r.signal.as_str()), (kind, signal));
        assert_eq!(r.target_pid, victim, "the worker itself, never the master");
        assert!(r.measure_mb > limit, "{} MB over {limit} MB", r.measure_mb);
        let exit = r.exit_secs.expect("time to exit");
        assert!(exit < 30.0, "left in {exit} s");
        eprintln!(
            "{kind}: worker {victim} ({:.1} MB > {limit:.1} MB) got {signal}, left in {exit:.3} s, \
             replaced by {replacement}; {ok} requests under load, none failed",
            r.measure_mb
        );
        assert_eq!(s.enforcer.actions_taken, 1, "one action only");
        // The replacement is followed, with a detector of its own.
        let w = s.registry.get(replacement).expect("replacement followed");
        assert!(w.alive() && !w.detector.soft_limit_fired());
        assert_eq!(w.ppid, server.master);
    });
    // The API shows it per worker.
    let status = agent.with(|s| {
        memtrace::agent::views::worker_status(s, s.registry.find(victim).unwrap(), false)
    });
    let shown = status.soft_limit.expect("status shows the recycle");
    assert_eq!(shown.state, RecycleState::Replaced);
    assert_eq!(shown.replacement_pid, Some(replacement));
}

fn gunicorn_server(worker_class: &[&str]) -> Server {
    let port = free_port();
    let proc = Proc::spawn(
        Command::new("gunicorn")
            .args(["--workers", "3"])
            .args(worker_class)
            .args(["--graceful-timeout", "10"])
            .arg("--bind")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--chdir")
            .arg(Fixtures::source(""))
            .arg("wsgi_app:app")
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    Server {
        master: proc.pid(),
        _procs: vec![proc],
        port,
        workers: 3,
        leak_path: format!("/leak/{LEAK}"),
    }
}

#[test]
fn gunicorn_sync_retires_the_worker_over_the_limit_alone() {
    one_worker_is_recycled(
        &["gunicorn"],
        gunicorn_server(&["--worker-class", "sync"]),
        ServerKind::Gunicorn,
        "SIGTERM",
    );
}

#[test]
fn gunicorn_gthread_retires_the_worker_over_the_limit_alone() {
    one_worker_is_recycled(
        &["gunicorn"],
        gunicorn_server(&["--worker-class", "gthread", "--threads", "4"]),
        ServerKind::Gunicorn,
        "SIGTERM",
    );
}

#[test]
fn uwsgi_retires_the_worker_over_the_limit_alone() {
    let port = free_port();
    let proc = uwsgi(port, &["--processes", "3", "--http-socket"], 0);
    let server = Server {
        master: proc.pid(),
        _procs: vec![proc],
        port,
        workers: 3,
        leak_path: format!("/leak/{LEAK}"),
    };
    one_worker_is_recycled(&["uwsgi"], server, ServerKind::Uwsgi, "SIGHUP");
}

#[test]
fn php_fpm_retires_the_worker_over_the_limit_alone() {
    let dir = tempfile::tempdir().unwrap();
    let fpm = PhpFpm::start(dir.path(), 3, false);
    let server = Server {
        master: fpm.master(),
        port: fpm.port,
        _procs: fpm.procs,
        workers: 3,
        leak_path: format!("/?leak={LEAK}"),
    };
    one_worker_is_recycled(&["php-fpm8.2"], server, ServerKind::PhpFpm, "SIGQUIT");
}

/// A master that shares a large copy-on-write region with its workers
/// (tests/fixtures/cow_master.c): every worker's RSS is over the limit, its
/// USS is not.
#[test]
fn uss_limit_ignores_pages_shared_with_the_master() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // 64 MiB touched by the master before it forks 2 workers.
    let server = Proc::spawn(
        Command::new(fixtures().bin("cow_master"))
            .args([port.to_string(), "2".into(), "64".into()])
            .arg(dir.path()),
    );
    assert!(wait_port(port, SERVER_START), "cow_master listens");
    let workers = wait_children(server.pid(), 2);
    for &w in &workers {
        let rss = smaps_rss(w).unwrap();
        assert!(rss > 64 * MIB, "worker {w} maps the shared region: {rss} B");
    }
    let mut settings = test_settings(&["cow_master"]);
    settings.detector.soft_limit_mb = 40.0;
    settings.timed_detector.soft_limit_mb = 40.0;
    settings.leak_sample_interval = Duration::from_millis(200);
    settings.soft_limit = SoftLimitSettings {
        metric: SoftLimitMetric::Uss,
        min_interval: Duration::from_millis(200),
        jitter: Duration::ZERO,
        ..SoftLimitSettings::default()
    };
    let agent = AgentHarness::start(settings);
    // RSS is over the limit: the detectors fire, and the agent measures USS.
    assert!(
        agent.wait(Duration::from_secs(10), |s| workers.iter().all(|w| s
            .registry
            .get(*w)
            .is_some_and(|w| w.detector.soft_limit_fired()))),
        "RSS over the limit seen"
    );
    thread::sleep(Duration::from_secs(2));
    agent.with(|s| {
        assert_eq!(s.enforcer.pending().count(), 0, "nothing queued");
        assert_eq!(s.enforcer.recycles().count(), 0, "nothing done");
        assert_eq!(s.enforcer.actions_taken, 0);
    });
    assert_eq!(
        children_of(server.pid()),
        workers,
        "the workers are untouched"
    );

    // Once a worker's own memory crosses the limit (it writes 48 MiB of the
    // shared region: private copies, USS up, RSS unchanged), it is retired.
    let body = http_get(port, "/touch/48").expect("touch request");
    let victim = pid_in(&body);
    assert!(
        agent.wait(Duration::from_secs(15), |s| {
            s.enforcer
                .recycles()
                .any(|r| r.worker_pid == victim && r.metric == SoftLimitMetric::Uss)
        }),
        "retired once its USS crossed"
    );
}
