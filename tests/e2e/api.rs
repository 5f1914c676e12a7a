//! The debug API end to end: a fixture with two allocation paths, one
//! leaking; snapshot, requests, diff: the leaking function is the top growth
//! site and [heap]/[anon] grew by the bytes leaked. Stack programs are
//! attached only between snapshot and stop.
use std::{net::SocketAddr, time::Duration};

use memtrace::kernel::{loader::RequestProbes, uprobes::ProbeTarget};
use memtrace_tests::*;

const TOKEN: &str = "e2e-token";
const STACK_PROGRAMS: &[&str] = &[
    "page_fault_stac",
    "mmap_stacks",
    "brk_stacks",
    "malloc_enter",
    "alloc_exit",
    "free_enter",
];

fn get(addr: SocketAddr, path: &str) -> (u16, serde_json::Value) {
    let sep = if path.contains('?') { '&' } else { '?' };
    api_get(addr, &format!("{path}{sep}token={TOKEN}"))
}

/// Stack programs this test process (the agent runs in it) has attached.
fn stack_programs_attached() -> Vec<String> {
    attached_program_names(std::process::id())
        .into_iter()
        .filter(|p| STACK_PROGRAMS.contains(&p.as_str()))
        .collect()
}

#[test]
fn snapshot_requests_diff_finds_the_leaking_function() {
    let _serial = serial();
    let mut settings = test_settings(&["leaky_server"]);
    settings.load.requests = RequestProbes::Function(ProbeTarget {
        binary: fixtures().handler_so(),
        symbol: "handle_request".into(),
    });
    settings.listen = Some("127.0.0.1:0".parse().unwrap());
    settings.api_token = memtrace::api::Token::new(Some(TOKEN.into()));
    // Every allocation, so the leak's bytes are exact (sampling has its own test).
    settings.load.heap_sample_bytes = 1;
    let agent_core = memtrace::agent::Agent::start(settings).expect("agent starts");
    let addr = agent_core.api_addr().expect("API bound");
    let agent = AgentHarness::from_agent(agent_core);

    // Every request uses and frees 48 KiB (scratch_buffer); /leak/N also
    // keeps N bytes (leak_memory).
    let server = LeakyServer::start(2, 0, &[("SCRATCH_BYTES", "49152")]);
    let port = server.port;
    drive(port, "/leak/0", 50, 2);

    // Without a token: 403. Status lists both workers with PSS and USS.
    assert_eq!(api_get(addr, "/debug/memory/?action=status").0, 403);
    let (code, status) = get(addr, "/debug/memory/?action=status");
    assert_eq!(code, 200, "{status}");
    let workers = status["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 3, "master and two workers: {status}");
    for w in workers {
        assert!(
            w["pss_bytes"].as_u64().unwrap() > 0 && w["uss_bytes"].as_u64().unwrap() > 0,
            "{w}"
        );
    }
    assert_eq!(status["agent"]["collection_active"], false);
    assert!(
        stack_programs_attached().is_empty(),
        "stack programs attached before snapshot: {:?}",
        stack_programs_attached()
    );

    // Snapshot: collection on.
    let (code, snap) = get(addr, "/debug/memory/?action=snapshot");
    assert_eq!(code, 200, "{snap}");
    let attached = stack_programs_attached();
    for p in STACK_PROGRAMS {
        assert!(
            attached.contains(&p.to_string()),
            "{p} not attached after snapshot: {attached:?}"
        );
    }
    let (_, status) = get(addr, "/debug/memory/?action=status");
    assert_eq!(status["agent"]["collection_active"], true);

    // Traffic: 200 requests leaking 64 KiB each, 200 that only use scratch.
    let leak = 64 * 1024u64;
    let n = 200u64;
    drive(port, &format!("/leak/{leak}"), n as usize, 2);
    drive(port, "/leak/0", n as usize, 2);

    let (code, diff) = get(addr, "/debug/memory/?action=diff&limit=10");
    assert_eq!(code, 200, "{diff}");
    let growth = diff["growth"].as_array().unwrap();
    assert!(!growth.is_empty(), "no heap growth: {diff:#}");
    let top = &growth[0];
    assert_eq!(
        top["function"], "leak_memory",
        "top growth site: {top:#}\nall: {diff:#}"
    );
    let grown = top["growth_bytes"].as_i64().unwrap() as f64;
    let leaked = (leak * n) as f64;
    assert!(
        (grown - leaked).abs() <= leaked * 0.1,
        "site grew {grown}, leaked {leaked}"
    );
    // scratch_buffer frees what it allocates: no growth to speak of.
    assert!(
        growth
            .iter()
            .filter(|g| g["function"] == "scratch_buffer")
            .all(|g| g["growth_bytes"].as_i64().unwrap() < leaked as i64 / 20)
    );
    // Mappings: [heap] and anonymous regions grew by what leaked.
    let mappings = diff["mappings"].as_array().unwrap();
    let grew: i64 = mappings
        .iter()
        .filter(|m| m["name"] == "[heap]" || m["name"] == "[anon]")
        .map(|m| m["growth_bytes"].as_i64().unwrap())
        .sum();
    assert!(
        (grew as f64 - leaked).abs() <= leaked * 0.1,
        "[heap]+[anon] grew {grew}, leaked {leaked}: {mappings:#?}"
    );

    // A second diff: the baseline moved, nothing leaked since.
    drive(port, "/leak/0", 50, 2);
    let (_, diff2) = get(addr, "/debug/memory/?action=diff");
    let again: i64 = diff2["growth"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["function"] == "leak_memory")
        .map(|g| g["growth_bytes"].as_i64().unwrap())
        .sum();
    assert_eq!(again, 0, "{diff2:#}");

    // Stop: programs detached, baseline gone.
    let (code, stop) = get(addr, "/debug/memory/?action=stop");
    assert_eq!(code, 200, "{stop}");
    assert_eq!(stop["collection_active"], false);
    assert!(
        wait_for(Duration::from_secs(5), || stack_programs_attached()
            .is_empty()),
        "still attached after stop: {:?}",
        stack_programs_attached()
    );
    let (code, body) = get(addr, "/debug/memory/?action=diff");
    assert_eq!(code, 400, "{body}");

    // REST and metrics.
    let pid = workers.iter().find(|w| w["role"] == "worker").unwrap()["pid"]
        .as_u64()
        .unwrap();
    let (code, reqs) = get(addr, &format!("/v1/workers/{pid}/requests?limit=5"));
    assert_eq!(code, 200);
    assert_eq!(reqs["requests"].as_array().unwrap().len(), 5);
    let (code, metrics) = api_get(addr, "/metrics");
    assert_eq!(code, 200);
    let text = metrics.as_str().unwrap_or_default().to_string();
    assert!(
        text.contains(&format!("memtrace_worker_rss_bytes{{pid=\"{pid}\"")),
        "{text}"
    );
    assert!(text.contains("memtrace_ringbuf_drops_total 0"), "{text}");
    drop(agent);
}
