//! What memtrace costs a server, measured so that a noisy machine cannot
//! hide it: beside throughput, the server's CPU time per request (user and
//! system of all its processes, which includes the BPF programs that run
//! in their context) and the agent's, with the machine's steal time during
//! each run. Each configuration is paired with a run with memtrace off on
//! the same server instance (the agent started and stopped between them),
//! and a pair in which either run saw more than `MAX_STEAL` of the CPU
//! stolen by the hypervisor is dropped and run again.
use std::{fmt::Write as _, path::Path, process::Command, thread, time::Duration};

use anyhow::{Result, bail};

use super::{
    Agent, BenchOptions, Mode, Paths, Proc, SERVER_CPU, SOCKET_PROGRAMS, Target, free_port,
    listening, median, pinned, program_costs_run, wait_until, wrk,
};

/// A run whose CPUs lost more than this share to steal is not kept.
const MAX_STEAL: f64 = 0.10;
/// Tries of one pair before it is kept as it is (and marked).
const PAIR_TRIES: usize = 4;

/// The machine's CPU time so far, in ticks: (steal, all).
fn cpu_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|v| v.parse().ok())
        .collect();
    (fields.get(7).copied().unwrap_or(0), fields.iter().sum())
}

/// CPU seconds (user + system) of every process in process group `pgid`
/// (a server and the workers it forked).
fn group_cpu(pgid: u32) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let mut ticks = 0.0;
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<&str> = after.split_whitespace().collect();
        // After the command: state, ppid, pgrp, ... utime (12th), stime.
        if f.get(2).and_then(|g| g.parse::<u32>().ok()) != Some(pgid) {
            continue;
        }
        ticks += f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
            + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    }
    ticks / tick
}

/// One load run's readings.
#[derive(Clone, Copy, Debug, Default)]
struct Run {
    rps: f64,
    /// Server CPU microseconds per request.
    server_us: f64,
    /// Agent CPU microseconds per request (0 when off).
    agent_us: f64,
    /// Share of the machine's CPU time stolen during the run.
    steal: f64,
}

/// Loads `server` (process group `pgid`) for `seconds` with `agent` (or
/// none) attached.
fn load(t: &Target, port: u16, pgid: u32, agent: Option<&Agent>, seconds: u64) -> Result<Run> {
    let (steal0, all0) = cpu_ticks();
    let server0 = group_cpu(pgid);
    let agent0 = agent.map_or(0.0, |a| a.footprint().0);
    let rps = wrk(
        &format!("http://127.0.0.1:{port}{}", t.path),
        seconds,
        t.threads,
        t.conns,
    )?;
    let agent_cpu = agent.map_or(0.0, |a| a.footprint().0) - agent0;
    let server_cpu = group_cpu(pgid) - server0;
    let (steal1, all1) = cpu_ticks();
    let requests = (rps * seconds as f64).max(1.0);
    Ok(Run {
        rps,
        server_us: server_cpu / requests * 1e6,
        agent_us: agent_cpu / requests * 1e6,
        steal: (steal1 - steal0) as f64 / (all1 - all0).max(1) as f64,
    })
}

/// Paired runs of one configuration against off, per round.
struct Pairs {
    mode: Mode,
    off: Vec<Run>,
    on: Vec<Run>,
    /// Pairs run again because of steal.
    dropped: usize,
    /// Pairs kept over the steal limit after `PAIR_TRIES`.
    kept_noisy: usize,
}

impl Pairs {
    fn ratio(&self, f: impl Fn(&Run) -> f64) -> f64 {
        let mut r: Vec<f64> = self
            .on
            .iter()
            .zip(&self.off)
            .filter(|(_, off)| f(off) > 0.0)
            .map(|(on, off)| f(on) / f(off))
            .collect();
        median(&mut r)
    }

    fn median_of(runs: &[Run], f: impl Fn(&Run) -> f64) -> f64 {
        median(&mut runs.iter().map(f).collect::<Vec<_>>())
    }
}

/// One server instance for every run of `t`: `rounds` rounds, each pairing
/// every configuration of `modes` with an off run just before it.
fn measure(paths: &Paths, t: &Target, modes: &[Mode], opts: &BenchOptions) -> Result<Vec<Pairs>> {
    let port = free_port()?;
    let server = (t.start)(port)?;
    if !wait_until(Duration::from_secs(60), || listening(port)) {
        bail!("{} did not listen on {port}", t.name);
    }
    let pgid = server.pid();
    // Warm: the interpreter's caches, the workers' arenas.
    wrk(
        &format!("http://127.0.0.1:{port}{}", t.path),
        2,
        t.threads,
        t.conns,
    )?;
    let mut all: Vec<Pairs> = modes
        .iter()
        .map(|&mode| Pairs {
            mode,
            off: Vec::new(),
            on: Vec::new(),
            dropped: 0,
            kept_noisy: 0,
        })
        .collect();
    for round in 0..opts.rounds {
        for pairs in &mut all {
            for attempt in 1..=PAIR_TRIES {
                let off = load(t, port, pgid, None, opts.seconds)?;
                let agent = Agent::start(paths, t.process_name, pairs.mode, &[])?;
                let agent = agent.expect("an on configuration");
                // Let the agent find every worker before the load.
                thread::sleep(Duration::from_secs(1));
                if pairs.mode.collects() {
                    agent.snapshot()?;
                }
                let on = load(t, port, pgid, Some(&agent), opts.seconds)?;
                drop(agent);
                let noisy = off.steal > MAX_STEAL || on.steal > MAX_STEAL;
                eprintln!(
                    "  {} round {}: {:<44} off {:>8.0} req/s {:>6.1} µs, on {:>8.0} req/s {:>6.1} µs + agent {:>5.1} µs, steal {:.0}%/{:.0}%{}",
                    t.name,
                    round + 1,
                    pairs.mode.label(),
                    off.rps,
                    off.server_us,
                    on.rps,
                    on.server_us,
                    on.agent_us,
                    off.steal * 100.0,
                    on.steal * 100.0,
                    if noisy { " (noisy)" } else { "" }
                );
                if noisy && attempt < PAIR_TRIES {
                    pairs.dropped += 1;
                    continue;
                }
                pairs.kept_noisy += usize::from(noisy);
                pairs.off.push(off);
                pairs.on.push(on);
                break;
            }
        }
    }
    drop(server);
    Ok(all)
}

fn table(md: &mut String, t: &Target, what: &str, all: &[Pairs]) {
    let _ = writeln!(md, "\n### {}\n\n{what}\n", t.name);
    let _ = writeln!(
        md,
        "| configuration | req/s off → on (medians) | throughput ratio | server µs/request off → on | server CPU ratio | agent µs/request | steal, highest kept run | pairs rerun for steal |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|");
    for p in all {
        let steal = p
            .off
            .iter()
            .chain(&p.on)
            .map(|r| r.steal)
            .fold(0.0, f64::max);
        let _ = writeln!(
            md,
            "| {} | {:.0} → {:.0} | {:.3} | {:.1} → {:.1} | {:.3} | {:.1} | {:.1}% | {}{} |",
            p.mode.label(),
            Pairs::median_of(&p.off, |r| r.rps),
            Pairs::median_of(&p.on, |r| r.rps),
            p.ratio(|r| r.rps),
            Pairs::median_of(&p.off, |r| r.server_us),
            Pairs::median_of(&p.on, |r| r.server_us),
            p.ratio(|r| r.server_us),
            Pairs::median_of(&p.on, |r| r.agent_us),
            steal * 100.0,
            p.dropped,
            if p.kept_noisy > 0 {
                format!(" ({} kept over {:.0}%)", p.kept_noisy, MAX_STEAL * 100.0)
            } else {
                String::new()
            }
        );
    }
}

/// The kernel's statistics of the socket programs in socket mode: `rounds`
/// load runs of their own (the statistics cost two clock reads a run, so
/// they stay off in the paired runs), medians of ns per run and of runs per
/// request.
fn socket_programs(md: &mut String, paths: &Paths, t: &Target, opts: &BenchOptions) -> Result<()> {
    let mut ns = vec![Vec::new(); SOCKET_PROGRAMS.len()];
    let mut per_request = vec![Vec::new(); SOCKET_PROGRAMS.len()];
    for round in 0..opts.rounds {
        let (costs, requests) = program_costs_run(paths, t, Mode::Socket, opts)?;
        for (p, name) in SOCKET_PROGRAMS.iter().enumerate() {
            if let Some(&(_, runs, mean)) = costs.iter().find(|c| c.0 == *name) {
                ns[p].push(mean);
                per_request[p].push(runs as f64 / requests.max(1.0));
            }
        }
        eprintln!(
            "  {} programs round {}: {}",
            t.name,
            round + 1,
            costs
                .iter()
                .filter(|c| SOCKET_PROGRAMS.contains(&c.0.as_str()))
                .map(|(n, runs, mean)| format!("{n} {mean:.0} ns × {runs}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let _ = writeln!(
        md,
        "\nSocket programs ({} runs with `kernel.bpf_stats_enabled=1`, medians):\n",
        opts.rounds
    );
    let _ = writeln!(
        md,
        "| program | ns per run | runs per request | ns per request |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|");
    for (p, name) in SOCKET_PROGRAMS.iter().enumerate() {
        let run = median(&mut ns[p]);
        let runs = median(&mut per_request[p]);
        let _ = writeln!(md, "| {name} | {run:.0} | {runs:.2} | {:.0} |", run * runs);
    }
    Ok(())
}

/// A Python server command pinned to the server CPU, quiet.
fn python_server(program: &Path, args: &[&str], app_dir: &Path) -> Command {
    let mut cmd = pinned(SERVER_CPU, program);
    cmd.args(args)
        .current_dir(app_dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    cmd
}

/// The cost tables (`--cost-only`): the fixture, gunicorn sync and gthread,
/// uvicorn, and an app that allocates and drops 64 MiB per request, each
/// with its socket programs' kernel statistics. `programs_only`: only
/// those statistics, for the servers socket mode serves.
pub(super) fn cost(
    paths: &Paths,
    opts: &BenchOptions,
    md: &mut String,
    programs_only: bool,
) -> Result<()> {
    let root = crate::workspace_root();
    let app_dir = root.join("tests/fixtures");
    let uvicorn = crate::setup::uvicorn_venv().join("bin/uvicorn");
    let fx = paths.fixtures.clone();
    let fixture_start = move |port: u16| super::leaky_server(&fx, port);
    let gunicorn = |class: &'static str, app: &'static str| {
        let app_dir = app_dir.clone();
        move |port: u16| -> Result<Proc> {
            let bind = format!("127.0.0.1:{port}");
            let mut args = vec!["--workers", "4", "--worker-class", class, "--bind", &bind];
            if class == "gthread" {
                args.extend(["--threads", "4"]);
            }
            args.push(app);
            Proc::spawn(&mut python_server(Path::new("gunicorn"), &args, &app_dir))
        }
    };
    let sync = gunicorn("sync", "wsgi_app:app");
    let gthread = gunicorn("gthread", "wsgi_app:app");
    let arrays = gunicorn("sync", "array_app:app");
    let uvicorn_start = |port: u16| -> Result<Proc> {
        let port = port.to_string();
        Proc::spawn(&mut python_server(
            &uvicorn,
            &[
                "asgi_app:app",
                "--host",
                "127.0.0.1",
                "--port",
                &port,
                "--log-level",
                "warning",
            ],
            &app_dir,
        ))
    };
    let modes = [Mode::Steady, Mode::Socket, Mode::Growth, Mode::Heap];
    let targets: [(Target, &str); 5] = [
        (
            Target::fixture(&fixture_start),
            "`leaky_server`, 8 workers, wrk keep-alive (one connection per worker).",
        ),
        (
            Target::python("gunicorn sync", "gunicorn", &sync, 4),
            "Debian's gunicorn, 4 sync workers, `wsgi_app.py`; a connection per request.",
        ),
        (
            Target::python("gunicorn gthread", "gunicorn", &gthread, 16),
            "Debian's gunicorn, 4 gthread workers of 4 threads, `wsgi_app.py`; wrk keep-alive, 16 connections.",
        ),
        (
            Target::python("uvicorn", "uvicorn", &uvicorn_start, 16),
            "uvicorn (PyPI) in one process, `asgi_app.py`; wrk keep-alive, 16 connections.",
        ),
        (
            Target::python("64 MiB per request", "gunicorn", &arrays, 4).with_path("/"),
            "Debian's gunicorn, 4 sync workers, `array_app.py`: each request fills and drops a 64 MiB bytearray (16,384 first-touch page faults).",
        ),
    ];
    if programs_only {
        for (t, what) in targets.iter().take(4) {
            eprintln!("socket programs: {}", t.name);
            let _ = writeln!(md, "\n### {}\n\n{what}", t.name);
            socket_programs(md, paths, t, opts)?;
        }
        return Ok(());
    }
    let _ = writeln!(
        md,
        "Each configuration is paired with a run with memtrace off on the same server instance (the agent started and stopped between them), {} rounds of {} s; \
         a pair in which either run had more than {:.0}% of the CPU stolen is run again (up to {PAIR_TRIES} times). Ratios are medians of the per-pair ratios. \
         Server CPU is user + system time of all the server's processes (it includes the BPF programs run in their context) per request; agent CPU likewise. \
         Load generator on CPU 0, server on CPU 1.",
        opts.rounds,
        opts.seconds,
        MAX_STEAL * 100.0
    );
    for (t, what) in &targets {
        eprintln!("cost: {}", t.name);
        let all = measure(paths, t, &modes, opts)?;
        table(md, t, what, &all);
        socket_programs(md, paths, t, opts)?;
    }
    Ok(())
}
