//! What an exited worker costs the agent, measured by the allocator.
//!
//! A server that recycles its workers (gunicorn's `max_requests`, a soft
//! limit) hands the agent a new worker every few minutes for months, and
//! the agent keeps the last [`EXITED_KEPT`](memtrace::model::workers::EXITED_KEPT) exited ones for the API. Each
//! kept one must be small: in a 1-hour soak with 60 recycles, exited
//! workers that kept 32 request records and their routes' windows (24 KB
//! each with two routes, 170 KB with a hundred) were most of the agent's
//! growing heap.
//!
//! This file is its own test binary with one test, so that the counting
//! allocator sees no other test's allocations.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::atomic::{AtomicI64, Ordering},
};

use memtrace::model::{
    procinfo::ProcessView,
    requests::{RequestLog, RequestRecord, RequestSettings, WallClock},
    rss::RssBreakdown,
    workers::{EXITED_HISTORY, Origin, Registry, Worker},
};
use memtrace_common::RequestEvent;

/// Counts the bytes allocated and not yet freed.
struct Counting;

static LIVE: AtomicI64 = AtomicI64::new(0);

// SAFETY: forwards every call to the system allocator and only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const HISTORY: usize = 1000;

/// A worker of a web app that served `HISTORY` requests over `routes`
/// routes, its detectors' windows full.
fn busy_worker(pid: u32, routes: usize) -> Worker {
    let view = ProcessView {
        pid,
        ppid: 1,
        comm: "gunicorn".into(),
        exe: Some("/usr/bin/python3.11".into()),
        cmdline: [
            "/usr/bin/python3",
            "-m",
            "gunicorn",
            "--workers",
            "4",
            "app:app",
        ]
        .map(String::from)
        .to_vec(),
        start_time: u64::from(pid),
    };
    let mut w = Worker::new(&view, Origin::Fork, "forked by the server".into());
    w.requests = RequestLog::with_routes(HISTORY, routes);
    let settings = RequestSettings::default();
    let clock = WallClock::now();
    for k in 0..HISTORY as u64 {
        let ev = RequestEvent {
            tgid: pid,
            tid: pid,
            start_ns: k * 1000,
            end_ns: k * 1000 + 500,
            ..Default::default()
        };
        let mut r =
            RequestRecord::from_event(&ev, k + 1, &RssBreakdown::default(), &settings, &clock);
        let route = k as usize % routes;
        r.method = Some("GET".into());
        r.path = Some(format!("/api/v1/resource{route}/{k}"));
        r.route = Some(format!("GET /api/v1/resource{route}/:id"));
        r.delta_bytes = (k % 7) as i64 * 4096;
        w.requests.push(r);
        for d in w.detectors_mut() {
            let _ = d.record(k as f64);
        }
    }
    w
}

#[test]
fn an_exited_worker_keeps_a_few_kilobytes() {
    // Two routes (the soak's app), and a hundred (the route table's
    // default cap), with what each exited worker may keep at most.
    for (routes, limit) in [(2, 12 << 10), (100, 40 << 10)] {
        exited_workers(routes, limit);
    }
}

/// Workers retired in each case: enough for an average.
const WORKERS: u32 = 16;

fn exited_workers(routes: usize, limit: i64) {
    let mut registry = Registry::default();
    let empty = LIVE.load(Ordering::Relaxed);
    let mut live = Vec::new();
    for pid in 0..WORKERS {
        let start = LIVE.load(Ordering::Relaxed);
        let w = busy_worker(1000 + pid, routes);
        live.push(LIVE.load(Ordering::Relaxed) - start);
        registry.add(w);
    }
    let before = LIVE.load(Ordering::Relaxed);
    let views: Vec<_> = (0..WORKERS)
        .map(|pid| {
            let w = registry.get(1000 + pid).expect("added");
            (w.requests.routes.view(), w.detector.get_state())
        })
        .collect();
    let views_bytes = LIVE.load(Ordering::Relaxed) - before;
    for pid in 0..WORKERS {
        registry.retire(1000 + pid, None).expect("alive");
    }
    let kept = LIVE.load(Ordering::Relaxed) - empty - views_bytes;
    let per_exited = kept / i64::from(WORKERS);
    let per_live = live.iter().sum::<i64>() / live.len() as i64;
    eprintln!(
        "a worker with {HISTORY} requests over {routes} routes: {per_live} bytes alive, {per_exited} once exited"
    );
    assert!(
        per_exited <= limit,
        "an exited worker keeps {per_exited} bytes (alive: {per_live})"
    );

    // What the API shows of an exited worker is what it showed alive: its
    // routes' figures and its detectors' judgement, without their windows.
    for (i, (routes, detector)) in views.iter().enumerate() {
        let w = registry.find(1000 + i as u32).expect("kept");
        assert!(w.exited_at.is_some());
        assert_eq!(&w.requests.routes.view(), routes);
        let state = w.detector.get_state();
        assert_eq!(state.slope, detector.slope);
        assert_eq!(state.request_count, detector.request_count);
        assert_eq!(w.requests.len(), EXITED_HISTORY);
        let seqs: Vec<u64> = w.requests.recent(usize::MAX).map(|r| r.seq).collect();
        let last = HISTORY as u64;
        assert_eq!(
            seqs,
            (last + 1 - EXITED_HISTORY as u64..=last)
                .rev()
                .collect::<Vec<_>>()
        );
    }
}
