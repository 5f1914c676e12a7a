//! Builds the API's views (`crate::api::status`) from the agent's state.
use std::time::{SystemTime, UNIX_EPOCH};

use super::state::State;
use crate::{
    api::status::{AgentStatus, PssBreakdown, RecycleCount, SoftLimitStatus, WorkerStatus},
    model::{procinfo, workers::Worker},
};

const MB: f64 = 1024.0 * 1024.0;

/// Recycles the agent status lists (each worker's own is in its status).
const RECENT_RECYCLES: usize = 50;

fn unix_secs(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// One worker, as the API shows it; `with_proc` adds what only /proc knows (PSS, USS,
/// fds, threads), which costs a walk of the process's page tables.
pub fn worker_status(state: &State, w: &Worker, with_proc: bool) -> WorkerStatus {
    let live = w.alive();
    let rollup = (with_proc && live)
        .then(|| procinfo::smaps_rollup(w.pid))
        .flatten();
    let status = (with_proc && live)
        .then(|| procinfo::status_memory(w.pid))
        .flatten();
    let stats = if live {
        state.tracer.proc_stats(w.pid).unwrap_or(w.stats)
    } else {
        w.stats
    };
    WorkerStatus {
        pid: w.pid,
        ppid: w.ppid,
        role: state.registry.role(w.pid),
        name: w.name.clone(),
        exe: w.exe.clone(),
        cmdline: w.cmdline.clone(),
        origin: w.origin,
        reason: w.reason.clone(),
        alive: live,
        start_time_ticks: w.start_time,
        first_seen_unix: unix_secs(w.first_seen),
        exited_unix: w.exited_at.map(unix_secs),
        rss_bytes: w.rss.resident(),
        rss: w.rss,
        pss_bytes: rollup.map(|r| r.pss),
        pss: rollup.map(|r| PssBreakdown {
            anon: r.pss_anon,
            file: r.pss_file,
            shmem: r.pss_shmem,
        }),
        uss_bytes: rollup.map(|r| r.uss),
        memory_mb: w.rss.resident() as f64 / MB,
        pss_mb: rollup.map(|r| r.pss as f64 / MB),
        uss_mb: rollup.map(|r| r.uss as f64 / MB),
        fds: (with_proc && live)
            .then(|| procinfo::fd_count(w.pid))
            .flatten(),
        threads: status.map(|s| s.threads),
        faults: stats.faults,
        data_bytes: status.map(|s| s.vm_data).or(w.vm_data),
        mmap_bytes: state.tracer.mmap_counted(stats.mmap_bytes),
        munmap_bytes: state.tracer.mmap_counted(stats.munmap_bytes),
        mremap_grow_bytes: state.tracer.mmap_counted(stats.mremap_grow_bytes),
        mremap_shrink_bytes: state.tracer.mmap_counted(stats.mremap_shrink_bytes),
        brk_grow_bytes: state.tracer.mmap_counted(stats.brk_grow_bytes),
        brk_shrink_bytes: state.tracer.mmap_counted(stats.brk_shrink_bytes),
        heap_live_blocks: (stats.live_allocs as i64).max(0) as u64,
        heap_samples_dropped: stats.allocs_dropped,
        requests_seen: w.requests.seen,
        requests_aborted: w.requests.aborted,
        requests_in_flight: if live { stats.requests_in_flight() } else { 0 },
        leak_detections: w.leak_detections,
        leak_detector: w.detector.get_state(),
        routes: w.requests.routes.len(),
        routes_overflowed_requests: w.requests.routes.overflowed,
        // Slopes of every route: only worth computing once there is a leak.
        leak_route: (w.leak_detections > 0)
            .then(|| w.requests.routes.leak_route())
            .flatten(),
        route_views: None,
        collecting: stats.flags & memtrace_common::PROC_FLAG_COLLECT != 0,
        soft_limit: state.enforcer.recycle_of(w.pid, w.start_time).cloned(),
        placement: w.placement.clone(),
        python: w.python.clone(),
        python_gc: w.python_gc,
        python_frames: w.python_code.is_some(),
        python_frames_error: w.python_frames_error.clone(),
        pymalloc_probed: w.python_code.is_some() && state.tracer.pymalloc_probed(w.pid),
        children: state.descendants.summary(w.pid, SystemTime::now()),
        child_leak_detections: w.child_leak_detections,
        fd_leak_detections: w.fd_leak_detections,
        asyncio_tasks: w.asyncio_tasks,
        asyncio_error: w.asyncio_error.clone(),
        task_leak_detections: w.task_leak_detections,
    }
}

/// One worker asked for by pid: its descendants' PSS too (a page-table walk
/// each, so not in the list views or /metrics).
pub fn worker_detail(state: &State, w: &Worker) -> WorkerStatus {
    let mut status = worker_status(state, w, true);
    if status.children.count > 0 {
        status.children.pss_bytes = Some(
            state
                .descendants
                .of(w.pid)
                .filter_map(|d| procinfo::smaps_rollup(d.pid).map(|r| r.pss))
                .sum(),
        );
    }
    status
}

/// Orphans listed in the agent's status.
const ORPHANS_LISTED: usize = 100;

/// The agent itself.
pub fn agent_status(state: &State) -> AgentStatus {
    let orphans = state.descendants.orphans(SystemTime::now());
    AgentStatus {
        pid: state.agent_pid,
        version: env!("CARGO_PKG_VERSION"),
        uptime_secs: state.started.elapsed().as_secs_f64(),
        selectors: state.selectors.describe(),
        workers_alive: state.registry.len(),
        workers_exited: state.registry.exited().count(),
        events_received: state.counters.events_received,
        decode_errors: state.counters.decode_errors,
        requests_recorded: state.counters.requests_recorded,
        requests_unattributed: state.counters.requests_unattributed,
        kernel: state.tracer.counters(),
        kernel_release: state.tracer.kernel_release().to_string(),
        kernel_unavailable: state.tracer.unavailable().to_vec(),
        programs_attached: state.tracer.attached().to_vec(),
        collection_active: state.tracer.collecting(),
        collect_tier: state.tracer.collect_tier().name(),
        heap_sample_bytes: state.tracer.heap_sample_bytes(),
        soft_limit: SoftLimitStatus {
            metric: state.enforcer.settings().metric,
            actions_taken: state.enforcer.actions_taken,
            actions_skipped: state.enforcer.actions_skipped,
            pending: state.enforcer.pending().cloned().collect(),
            recycles: state
                .enforcer
                .recycles()
                .skip(
                    state
                        .enforcer
                        .recycles()
                        .count()
                        .saturating_sub(RECENT_RECYCLES),
                )
                .cloned()
                .collect(),
            counts: state
                .enforcer
                .counts()
                .map(|(server, state, count)| RecycleCount {
                    server,
                    state,
                    count,
                })
                .collect(),
        },
        orphans_total: orphans.len(),
        orphans: orphans.into_iter().take(ORPHANS_LISTED).collect(),
        descendants_dropped: state.descendants.dropped,
        memory: super::heap::usage(),
    }
}
