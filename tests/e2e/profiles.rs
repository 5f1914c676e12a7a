//! Sampled heap sites and the profile formats end to end: the fixture leaks a
//! known number of bytes through malloc; at the default sampling interval
//! the top site's estimate is within 15% of it, and over 40 diffs the mean
//! within 5%. `go tool pprof` (Debian's golang-go) reads /debug/pprof/heap and
//! a `memtrace diff --format pprof` file and names the leaking function first;
//! the SVG flame graph names it as the widest frame. A live-block map that
//! fills is counted and the agent keeps working; the growth tier attaches no
//! uprobe.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    process::Command,
    time::Duration,
};

use memtrace::{agent::Agent, kernel::loader::CollectTier};
use memtrace_tests::*;

const TOKEN: &str = "e2e-token";
const MIB: u64 = 1024 * 1024;
const ALLOC_PROBES: &[&str] = &["malloc_enter", "alloc_exit", "free_enter", "calloc_enter"];

fn get(addr: SocketAddr, path: &str) -> (u16, serde_json::Value) {
    let sep = if path.contains('?') { '&' } else { '?' };
    api_get(addr, &format!("{path}{sep}token={TOKEN}"))
}

/// One GET with the token header: status and the raw body (profiles are binary).
fn get_bytes(addr: SocketAddr, path: &str) -> (u16, Vec<u8>) {
    let mut s = TcpStream::connect(addr).expect("connect to the API");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nX-Debug-Token: {TOKEN}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).expect("read the reply");
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("an HTTP head");
    let head = String::from_utf8_lossy(&out[..split]).to_ascii_lowercase();
    assert!(
        !head.contains("transfer-encoding: chunked"),
        "profiles are sent with a length: {head}"
    );
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, out[split + 4..].to_vec())
}

fn start_agent(settings: memtrace::agent::AgentSettings) -> (AgentHarness, SocketAddr) {
    let mut settings = settings;
    settings.listen = Some("127.0.0.1:0".parse().unwrap());
    settings.api_token = memtrace::api::Token::new(Some(TOKEN.into()));
    let core = Agent::start(settings).expect("agent starts");
    let addr = core.api_addr().expect("API bound");
    (AgentHarness::from_agent(core), addr)
}

/// Runs the memtrace binary as a client of the agent.
fn memtrace_cli(addr: SocketAddr, args: &[&str]) -> std::process::Output {
    Command::new(memtrace_bin())
        .args(args)
        .args(["--url", &format!("http://{addr}")])
        .env("MEMTRACE_DEBUG_TOKEN", TOKEN)
        .output()
        .expect("run memtrace")
}

/// `go tool pprof -top` of a profile: its rows, largest flat first.
fn pprof_top(args: &[&str]) -> Vec<String> {
    let out = Command::new("go")
        .args(["tool", "pprof", "-top"])
        .args(args)
        .env("HOME", std::env::temp_dir())
        .output()
        .unwrap_or_else(|e| panic!("go tool pprof (install golang-go: cargo xtask setup): {e}"));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "go tool pprof failed: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Rows follow the `flat  flat%   sum%  cum   cum%` header.
    text.lines()
        .skip_while(|l| !l.trim_start().starts_with("flat"))
        .skip(1)
        .map(str::to_string)
        .collect()
}

/// The function a `-top` row names (the last column).
fn row_function(row: &str) -> &str {
    row.split_whitespace().nth(5).unwrap_or("")
}

/// The leak_memory site's bytes in a diff's growth list.
fn leak_growth(diff: &serde_json::Value) -> f64 {
    diff["growth"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["function"] == "leak_memory")
        .map(|g| g["growth_bytes"].as_i64().unwrap())
        .sum::<i64>() as f64
}

fn leaking_worker(server: &LeakyServer) -> u32 {
    server.workers(1)[0]
}

#[test]
fn default_sampling_estimates_the_leak_and_pprof_and_svg_name_it() {
    let _serial = serial();
    let (agent, addr) = start_agent(test_settings(&["leaky_server"]));
    let server = LeakyServer::start(1, 0, &[]);
    let worker = leaking_worker(&server);
    assert!(agent.wait(Duration::from_secs(10), |s| s.registry.contains(worker)));

    let (code, snap) = get(addr, "/debug/memory/?action=snapshot");
    assert_eq!(code, 200, "{snap}");
    let (_, status) = get(addr, "/debug/memory/?action=status");
    assert_eq!(status["agent"]["collect_tier"], "heap");
    assert_eq!(status["agent"]["heap_sample_bytes"], 512 * 1024);

    // 80 MiB leaked in 1 MiB blocks, 400 requests of 16 KiB scratch (freed).
    let (n, size) = (80u64, MIB);
    drive(server.port, &format!("/leak/{size}"), n as usize, 2);
    drive(server.port, "/leak/0", 400, 2);
    let truth = (n * size) as f64;

    let (code, diff) = get(addr, "/debug/memory/?action=diff&limit=10");
    assert_eq!(code, 200, "{diff}");
    let top = &diff["growth"][0];
    assert_eq!(top["function"], "leak_memory", "{diff:#}");
    let estimate = top["growth_bytes"].as_i64().unwrap() as f64;
    println!(
        "leak estimate at the default sampling: {estimate} bytes for {truth} leaked ({:+.1}%), {} samples",
        (estimate / truth - 1.0) * 100.0,
        top["samples"]
    );
    assert!(
        (estimate - truth).abs() <= 0.15 * truth,
        "estimate {estimate} for {truth} leaked"
    );
    assert!(
        top["samples"].as_u64().unwrap() < n,
        "sampled, not every block: {top}"
    );
    let (_, status) = get(addr, "/debug/memory/?action=status");
    assert!(status["agent"]["kernel"]["heap_samples"].as_u64().unwrap() > 0);
    assert_eq!(status["agent"]["kernel"]["live_allocs_dropped"], 0);

    // /debug/pprof/heap: the token rules, then a profile go tool pprof reads.
    assert_eq!(api_get(addr, "/debug/pprof/heap").0, 403);
    let (code, heap) = get_bytes(addr, "/debug/pprof/heap");
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&heap));
    assert_eq!(&heap[..2], &[0x1f, 0x8b], "gzipped");
    let dir = tempfile::tempdir().unwrap();
    let heap_file = dir.path().join("heap.pb.gz");
    std::fs::write(&heap_file, &heap).unwrap();
    let rows = pprof_top(&[heap_file.to_str().unwrap()]);
    assert_eq!(row_function(&rows[0]), "leak_memory", "{rows:#?}");
    // Sample types, labels and file:line as pprof sees them.
    let raw = pprof_top(&[
        "-sample_index=inuse_space",
        "-tagfocus=worker=leaky_server",
        "-lines",
        heap_file.to_str().unwrap(),
    ]);
    assert!(
        raw[0].contains("leak_memory") && raw[0].contains("handler.c:"),
        "{raw:#?}"
    );
    let alloc = pprof_top(&["-sample_index=alloc_space", heap_file.to_str().unwrap()]);
    assert!(
        alloc.iter().any(|r| row_function(r) == "scratch_buffer"),
        "scratch blocks were allocated and freed: {alloc:#?}"
    );

    // A diff as pprof (via the CLI), read by go tool pprof, alone and as
    // the base of the heap profile.
    drive(server.port, &format!("/leak/{size}"), 16, 2);
    let diff_file = dir.path().join("diff.pb.gz");
    let out = memtrace_cli(
        addr,
        &[
            "diff",
            "--format",
            "pprof",
            "-o",
            diff_file.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let rows = pprof_top(&[diff_file.to_str().unwrap()]);
    assert_eq!(row_function(&rows[0]), "leak_memory", "{rows:#?}");
    let based = pprof_top(&[
        &format!("-diff_base={}", diff_file.display()),
        heap_file.to_str().unwrap(),
    ]);
    assert!(!based.is_empty(), "-diff_base reads the diff");

    // Flame graphs: folded text and an SVG whose widest function frame is
    // the leak.
    drive(server.port, &format!("/leak/{size}"), 8, 2);
    let out = memtrace_cli(addr, &["snapshot", "--format", "folded"]);
    assert!(out.status.success(), "{out:?}");
    let folded = String::from_utf8(out.stdout).unwrap();
    let leak_line = folded
        .lines()
        .find(|l| l.contains(";leak_memory "))
        .unwrap_or_else(|| panic!("no leak_memory stack in\n{folded}"));
    assert!(
        leak_line.contains("handle_request;leak_memory"),
        "{leak_line}"
    );
    let svg_file = dir.path().join("heap.svg");
    let out = memtrace_cli(
        addr,
        &[
            "snapshot",
            "--format",
            "svg",
            "-o",
            svg_file.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let svg = std::fs::read_to_string(&svg_file).unwrap();
    let (name, share) = widest_leaf_frame(&svg);
    assert_eq!(name, "leak_memory", "widest frame {name} ({share}%)");
    assert!(share > 90.0, "leak_memory holds {share}% of the live heap");
    let diff_svg = dir.path().join("diff.svg");
    drive(server.port, &format!("/leak/{size}"), 4, 1);
    let out = memtrace_cli(
        addr,
        &["diff", "--format", "svg", "-o", diff_svg.to_str().unwrap()],
    );
    assert!(out.status.success(), "{out:?}");
    assert!(
        std::fs::read_to_string(&diff_svg)
            .unwrap()
            .contains("leak_memory")
    );

    // Bad input: a clear error, no crash.
    let out = memtrace_cli(addr, &["snapshot", "--format", "png"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("pprof"),
        "{out:?}"
    );
    let out = memtrace_cli(
        addr,
        &[
            "snapshot",
            "--format",
            "pprof",
            "-o",
            "/no/such/dir/x.pb.gz",
        ],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot write /no/such/dir/x.pb.gz"),
        "{out:?}"
    );
}

/// The frames of an inferno SVG: (name, percent of all, y of its box) from
/// each `<title>` and the `<rect>` after it.
fn svg_frames(svg: &str) -> Vec<(String, f64, f64)> {
    svg.split("<title>")
        .skip(1)
        .filter_map(|t| {
            let (title, after) = t.split_once("</title>")?;
            // "leak_memory (83,886,080 bytes, 98.52%)"
            let (name, rest) = title.rsplit_once(" (")?;
            let pct = rest
                .rsplit(", ")
                .next()?
                .trim_end_matches(')')
                .trim_end_matches('%');
            let rect = after.split_once("<rect")?.1;
            let y = rect.split_once("y=\"")?.1.split('"').next()?;
            Some((name.to_string(), pct.parse().ok()?, y.parse().ok()?))
        })
        .collect()
}

/// The top frame of the stack holding most of the bytes: of the frames over
/// half the width (the chain from the root up), the highest in the picture.
fn widest_leaf_frame(svg: &str) -> (String, f64) {
    let frames = svg_frames(svg);
    assert!(!frames.is_empty(), "no frames parsed from the SVG");
    frames
        .into_iter()
        .filter(|f| f.1 > 50.0)
        .min_by(|a, b| a.2.total_cmp(&b.2))
        .map(|(name, pct, _)| (name, pct))
        .expect("a frame over half the width")
}

#[test]
fn forty_sampled_diffs_average_to_the_leak() {
    let _serial = serial();
    let (_agent, addr) = start_agent(test_settings(&["leaky_server"]));
    let server = LeakyServer::start(1, 0, &[]);
    let _ = leaking_worker(&server);
    std::thread::sleep(Duration::from_millis(500));
    let (code, snap) = get(addr, "/debug/memory/?action=snapshot");
    assert_eq!(code, 200, "{snap}");
    // 40 rounds: the mean's sampling error is then about 1.3%, so the 5%
    // bound is some 4 standard errors (20 rounds failed it once in CI, 0.942).
    let (rounds, per_round, size) = (40, 24u64, MIB);
    let truth = (per_round * size) as f64;
    let mut ratios = Vec::new();
    for _ in 0..rounds {
        drive(server.port, &format!("/leak/{size}"), per_round as usize, 2);
        drive(server.port, "/leak/0", 50, 2);
        let (code, diff) = get(addr, "/debug/memory/?action=diff&limit=10");
        assert_eq!(code, 200, "{diff}");
        ratios.push(leak_growth(&diff) / truth);
    }
    let mean = ratios.iter().sum::<f64>() / ratios.len() as f64;
    println!(
        "estimate / truth over {rounds} diffs of {truth} bytes: mean {mean:.4}, runs {ratios:.3?}"
    );
    assert!((mean - 1.0).abs() <= 0.05, "mean {mean} over {ratios:?}");
}

#[test]
fn a_full_live_block_map_is_counted_and_the_agent_keeps_working() {
    let _serial = serial();
    // Every allocation sampled; the kernel map holds 8 blocks in all.
    let mut settings = test_settings(&["leaky_server"]);
    settings.load.heap_sample_bytes = 1;
    settings.load.max_live_allocs = 0;
    settings.load.live_allocs_map_size = 8;
    let (agent, addr) = start_agent(settings);
    let server = LeakyServer::start(1, 0, &[]);
    let worker = leaking_worker(&server);
    assert!(agent.wait(Duration::from_secs(10), |s| s.registry.contains(worker)));
    assert_eq!(get(addr, "/debug/memory/?action=snapshot").0, 200);
    drive(server.port, "/leak/4096", 50, 1);
    let (_, status) = get(addr, &format!("/debug/memory/?action=status&pid={worker}"));
    let dropped = status["agent"]["kernel"]["live_allocs_dropped"]
        .as_u64()
        .unwrap();
    assert!(dropped >= 40, "{status:#}");
    let w = &status["workers"][0];
    assert!(w["heap_samples_dropped"].as_u64().unwrap() >= 40, "{w:#}");
    assert!(w["heap_live_blocks"].as_u64().unwrap() <= 8, "{w:#}");
    let (code, metrics) = api_get(addr, "/metrics");
    assert_eq!(code, 200);
    let text = metrics.as_str().unwrap_or_default();
    let total = text
        .lines()
        .find(|l| l.starts_with("memtrace_heap_samples_dropped_total "))
        .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no dropped counter in\n{text}"));
    assert!(total >= 40, "{total}");
    assert!(
        text.lines().any(
            |l| l.starts_with("memtrace_worker_heap_samples_dropped_total{")
                && l.contains(&format!("pid=\"{worker}\""))
        ),
        "{text}"
    );
    // Still working: requests served and seen, diffs answered.
    drive(server.port, "/leak/0", 20, 1);
    let (code, diff) = get(addr, "/debug/memory/?action=diff");
    assert_eq!(code, 200, "{diff}");
    assert!(agent.wait(Duration::from_secs(5), |s| s.registry.contains(worker)));
    // A worker that dies gives its blocks back: its replacement is tracked.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(worker as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let mut next = None;
    assert!(wait_for(Duration::from_secs(10), || {
        next = children_of(server.master)
            .into_iter()
            .find(|&p| p != worker);
        next.is_some()
    }));
    let next = next.unwrap();
    assert!(agent.wait(Duration::from_secs(10), |s| s.registry.contains(next)));
    std::thread::sleep(Duration::from_millis(300));
    drive(server.port, "/leak/4096", 4, 1);
    let (_, status) = get(addr, &format!("/debug/memory/?action=status&pid={next}"));
    let w = &status["workers"][0];
    assert!(
        w["heap_live_blocks"].as_u64().unwrap() >= 4,
        "the replacement's blocks are tracked: {w:#}"
    );

    // The per-worker cap: 4 blocks per worker, the map has room.
    drop(agent);
    let mut settings = test_settings(&["leaky_server"]);
    settings.load.heap_sample_bytes = 1;
    settings.load.max_live_allocs = 4;
    let (_agent, addr) = start_agent(settings);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(get(addr, "/debug/memory/?action=snapshot").0, 200);
    drive(server.port, "/leak/4096", 30, 1);
    let (_, status) = get(addr, &format!("/debug/memory/?action=status&pid={next}"));
    let w = &status["workers"][0];
    assert_eq!(w["heap_live_blocks"], 4, "{w:#}");
    assert!(w["heap_samples_dropped"].as_u64().unwrap() >= 26, "{w:#}");
}

#[test]
fn the_growth_tier_attaches_no_uprobe_and_profiles_page_faults() {
    let _serial = serial();
    let mut settings = test_settings(&["leaky_server"]);
    settings.load.collect = CollectTier::Growth;
    let (agent, addr) = start_agent(settings);
    let server = LeakyServer::start(1, 0, &[]);
    let worker = leaking_worker(&server);
    assert!(agent.wait(Duration::from_secs(10), |s| s.registry.contains(worker)));
    assert_eq!(get(addr, "/debug/memory/?action=snapshot").0, 200);
    let attached = attached_program_names(std::process::id());
    assert!(
        attached.iter().any(|p| p == "page_fault_stac"),
        "{attached:?}"
    );
    for p in ALLOC_PROBES {
        assert!(
            !attached.iter().any(|a| a == p),
            "{p} attached in the growth tier"
        );
    }
    drive(server.port, &format!("/leak/{}", 4 * MIB), 10, 1);
    let (code, heap) = get_bytes(addr, "/debug/pprof/heap");
    assert_eq!(code, 200);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("growth.pb.gz");
    std::fs::write(&file, &heap).unwrap();
    let rows = pprof_top(&[file.to_str().unwrap()]);
    assert!(!rows.is_empty(), "page-fault samples in the growth profile");
    let (_, status) = get(addr, "/debug/memory/?action=status");
    assert_eq!(status["agent"]["collect_tier"], "growth");
}
