//! The soak: Debian's gunicorn in socket mode under a steady load with a
//! leaking route, for as long as asked. Allocation sites are snapshotted
//! and diffed every 5 minutes, workers are recycled at a soft limit, and
//! every minute records the agent's RSS and CPU, the kernel events it
//! dropped, and the requests it counted against those the client sent.
use std::{
    fmt::Write as _,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

use super::{Agent, Mode, Paths, Proc, free_port, http_get, listening, proc_kb_field, wait_until};

/// Requests a second the client sends, paced, on two threads.
const RATE: u32 = 200;
/// One request in this many goes to the leaking route.
const LEAK_EVERY: u64 = 20;
/// Bytes the leaking route keeps (`/leak/N` of tests/fixtures/wsgi_app.py).
const LEAK_BYTES: u64 = 64 << 10;
/// A worker over this RSS is recycled (gunicorn: SIGTERM to the worker).
const SOFT_LIMIT_MB: u64 = 60;
const WORKERS: u32 = 4;
/// Minutes between two diffs; the snapshot is taken after the first
/// minute, so that collection's caches have filled before the RSS must be
/// flat.
const DIFF_EVERY_MIN: u64 = 5;
/// Minutes after which the agent's RSS must stay flat.
const WARM_MIN: f64 = 5.0;

/// One minute's reading.
struct Sample {
    minute: f64,
    sent: u64,
    failed: u64,
    counted: u64,
    unattributed: u64,
    drops: u64,
    recycles: u64,
    rss: u64,
    /// The anonymous part of `rss` (the rest is the binary's own pages).
    anon: u64,
    /// The agent's live heap blocks, and the free memory its allocator
    /// keeps (glibc builds; 0 when not reported).
    heap_in_use: u64,
    heap_free: u64,
    cpu_secs: f64,
    /// The diff (or snapshot) taken at this minute: milliseconds, sites.
    diff: Option<(f64, usize)>,
}

/// Requests sent and answered, and those that failed, by the load threads.
#[derive(Default)]
struct Load {
    sent: AtomicU64,
    failed: AtomicU64,
    stop: AtomicBool,
}

impl Load {
    /// Paced requests from `threads` threads until stopped; every
    /// `LEAK_EVERY`th goes to the leaking route.
    fn start(self: &Arc<Self>, port: u16, threads: u32) -> Vec<thread::JoinHandle<()>> {
        let leak = format!("/leak/{LEAK_BYTES}");
        (0..threads)
            .map(|t| {
                let load = self.clone();
                let leak = leak.clone();
                thread::spawn(move || {
                    let period = Duration::from_secs_f64(f64::from(threads) / f64::from(RATE));
                    let mut next = Instant::now();
                    let mut i = u64::from(t);
                    while !load.stop.load(Ordering::Relaxed) {
                        let path = if i % LEAK_EVERY == 0 { &leak } else { "/ok" };
                        match http_get(port, path) {
                            Ok(body) if body.starts_with("leaked=") => {
                                load.sent.fetch_add(1, Ordering::Relaxed);
                            }
                            _ => {
                                load.failed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        i += u64::from(threads);
                        next += period;
                        match next.checked_duration_since(Instant::now()) {
                            Some(wait) => thread::sleep(wait),
                            // Behind (a recycle, a slow diff): catch up
                            // without a burst.
                            None => next = Instant::now(),
                        }
                    }
                })
            })
            .collect()
    }
}

/// Runs the soak for `minutes` and appends its section to `md`.
pub(super) fn soak(paths: &Paths, minutes: u64, md: &mut String) -> Result<()> {
    // The soak runs what users install (`cargo xtask dist`, the package and
    // the image): the static binary, whose allocator is musl's.
    let paths = &Paths {
        memtrace: crate::dist::build_static()?,
        fixtures: paths.fixtures.clone(),
    };
    let port = free_port()?;
    let app_dir = crate::workspace_root().join("tests/fixtures");
    // Debian's gunicorn as `python3 -m gunicorn`, with its process titles
    // off (setproctitle hidden): no process of it is named `gunicorn`, so
    // agents that trace gunicorn by name on this machine (a test run) do
    // not see it, and the soak's agent, selecting it by pid, sees nothing
    // else. memtrace still knows it for gunicorn by its command line.
    let stub = std::env::temp_dir().join("memtrace-soak-no-titles");
    std::fs::create_dir_all(&stub)?;
    std::fs::write(
        stub.join("setproctitle.py"),
        "raise ImportError('process titles off for the soak')\n",
    )?;
    let server = Proc::spawn(
        std::process::Command::new("/usr/bin/python3")
            .args(["-m", "gunicorn"])
            .env("PYTHONPATH", &stub)
            .args(["--workers", &WORKERS.to_string(), "--worker-class", "sync"])
            .args(["--graceful-timeout", "5", "--bind"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("--chdir")
            .arg(&app_dir)
            .arg("wsgi_app:app")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null()),
    )?;
    if !wait_until(Duration::from_secs(60), || listening(port)) {
        bail!("gunicorn did not listen");
    }
    let soft_limit = SOFT_LIMIT_MB.to_string();
    // By the master's pid (and its descendants): other gunicorns on the
    // machine (a test run) are neither counted nor recycled.
    let master = server.pid().to_string();
    let agent = Agent::start_selecting(
        paths,
        &["--pid", &master],
        Mode::Socket,
        &[
            "--soft-limit-mb",
            &soft_limit,
            "--soft-limit-min-interval-secs",
            "20",
        ],
    )?
    .expect("socket mode runs an agent");
    // The workers are traced before the first request is sent.
    thread::sleep(Duration::from_secs(2));
    let load = Arc::new(Load::default());
    let threads = load.start(port, 2);
    let start = Instant::now();
    let metric = |name: &str| agent.metric(name).unwrap_or(0.0) as u64;
    let heap = |state: &str| {
        agent
            .metric_with("memtrace_agent_heap_bytes", &format!("state=\"{state}\""))
            .unwrap_or(0.0) as u64
    };
    let mut samples: Vec<Sample> = Vec::new();
    let mut snapshot_taken = false;
    for minute in 1..=minutes {
        let due = start + Duration::from_secs(minute * 60);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
        let diff = if minute == 1 || minute % DIFF_EVERY_MIN == 0 {
            let t = Instant::now();
            let action = if snapshot_taken { "diff" } else { "snapshot" };
            let body = http_get(
                agent.port,
                &format!("/debug/memory/?action={action}&limit=20"),
            )?;
            let value: serde_json::Value = serde_json::from_str(&body)?;
            let sites = ["top_allocations", "growth", "fault_growth"]
                .iter()
                .filter_map(|k| value[k].as_array())
                .map(Vec::len)
                .sum();
            snapshot_taken = true;
            Some((t.elapsed().as_secs_f64() * 1e3, sites))
        } else {
            None
        };
        let (cpu_secs, rss) = agent.footprint();
        let sample = Sample {
            minute: start.elapsed().as_secs_f64() / 60.0,
            sent: load.sent.load(Ordering::Relaxed),
            failed: load.failed.load(Ordering::Relaxed),
            counted: metric("memtrace_requests_total"),
            unattributed: metric("memtrace_requests_unattributed_total"),
            drops: metric("memtrace_ringbuf_drops_total"),
            recycles: metric("memtrace_soft_limit_recycles_total"),
            rss,
            anon: proc_kb_field(agent.proc.pid(), "status", "RssAnon:"),
            heap_in_use: heap("in_use"),
            heap_free: heap("free"),
            cpu_secs,
            diff,
        };
        eprintln!(
            "  {:.1} min: {} sent ({} failed), {} counted, {} drops, {} recycles, agent RSS {:.1} MB ({:.1} anonymous)",
            sample.minute,
            sample.sent,
            sample.failed,
            sample.counted,
            sample.drops,
            sample.recycles,
            rss as f64 / 1048576.0,
            sample.anon as f64 / 1048576.0,
        );
        samples.push(sample);
    }
    load.stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    // Every answered request's end has reached the agent.
    thread::sleep(Duration::from_secs(2));
    let (sent, failed) = (
        load.sent.load(Ordering::Relaxed),
        load.failed.load(Ordering::Relaxed),
    );
    let counted = metric("memtrace_requests_total");
    let unattributed = metric("memtrace_requests_unattributed_total");
    let drops = metric("memtrace_ringbuf_drops_total");
    let recycles = metric("memtrace_soft_limit_recycles_total");
    let (cpu_total, _) = agent.footprint();
    write_table(md, minutes, &samples);
    let warm: Vec<u64> = samples
        .iter()
        .filter(|s| s.minute > WARM_MIN)
        .map(|s| s.rss)
        .collect();
    let spread = match (warm.iter().min(), warm.iter().max()) {
        (Some(&lo), Some(&hi)) if lo > 0 => (hi - lo) as f64 / lo as f64,
        _ => f64::NAN,
    };
    let secs = start.elapsed().as_secs_f64();
    let _ = writeln!(
        md,
        "\nAt the end: {sent} requests answered and {failed} failed at the client; memtrace counted {counted} \
         ({}), {unattributed} request events of untraced processes, {drops} kernel events dropped, {recycles} workers recycled. \
         Agent RSS after minute {WARM_MIN}: {:.1}–{:.1} MB, a spread of {:.1}% (target: within 5%). \
         Agent CPU: {:.2}% of one core over the run, {:.1} µs per request.",
        if counted == sent {
            "equal".to_string()
        } else {
            format!("{:+}", counted as i64 - sent as i64)
        },
        warm.iter().min().copied().unwrap_or(0) as f64 / 1048576.0,
        warm.iter().max().copied().unwrap_or(0) as f64 / 1048576.0,
        spread * 100.0,
        cpu_total / secs * 100.0,
        cpu_total / sent.max(1) as f64 * 1e6,
    );
    Ok(())
}

fn write_table(md: &mut String, minutes: u64, samples: &[Sample]) {
    let _ = writeln!(
        md,
        "The agent is the release binary (`cargo xtask dist`'s, static, musl's allocator). Debian's gunicorn (`python3 -m gunicorn`), {WORKERS} sync workers, `tests/fixtures/wsgi_app.py`, traced by its master's pid; socket mode; a client paced at {RATE} requests a second \
         (a connection each), one in {LEAK_EVERY} to `/leak/{LEAK_BYTES}` (kept for ever), for {minutes} minutes. \
         Soft limit {SOFT_LIMIT_MB} MB RSS (gunicorn: SIGTERM to the worker, at most one every 20 s). \
         A snapshot after the first minute, then a diff every {DIFF_EVERY_MIN} minutes (collection stays on from the snapshot). \
         Counted: `memtrace_requests_total` (every worker's, recycled ones included).\n"
    );
    let _ = writeln!(
        md,
        "| minute | answered | failed | counted | events dropped | recycles | agent RSS MB | of it anonymous MB | heap in use MB | heap free MB | agent CPU % (last minute) | diff |"
    );
    let _ = writeln!(
        md,
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    );
    let mut last = (0.0, 0.0);
    for s in samples {
        let cpu = (s.cpu_secs - last.1) / ((s.minute - last.0) * 60.0).max(1e-9) * 100.0;
        last = (s.minute, s.cpu_secs);
        let diff = s
            .diff
            .map_or(String::new(), |(ms, n)| format!("{ms:.0} ms, {n} sites"));
        let _ = writeln!(
            md,
            "| {:.1} | {} | {} | {}{} | {} | {} | {:.1} | {:.1} | {} | {} | {cpu:.2} | {diff} |",
            s.minute,
            s.sent,
            s.failed,
            s.counted,
            if s.unattributed > 0 {
                format!(" (+{} unattributed)", s.unattributed)
            } else {
                String::new()
            },
            s.drops,
            s.recycles,
            s.rss as f64 / 1048576.0,
            s.anon as f64 / 1048576.0,
            heap_mb(s.heap_in_use),
            heap_mb(s.heap_free),
        );
    }
}

/// A heap figure in MB; musl's allocator reports none.
fn heap_mb(bytes: u64) -> String {
    if bytes == 0 {
        "—".into()
    } else {
        format!("{:.1}", bytes as f64 / 1048576.0)
    }
}
