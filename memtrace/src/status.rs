//! What the agent reports about itself and its workers: the views the API
//! serves, the CLI prints and the metrics export.
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::{
    agent::State,
    detector::DetectorState,
    loader::KernelCounters,
    procinfo,
    softlimit::PendingRestart,
    workers::{Origin, Role, RssBreakdown, Worker},
};

const MB: f64 = 1024.0 * 1024.0;

fn unix_secs(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// PSS by type, from smaps_rollup.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PssBreakdown {
    pub anon: u64,
    pub file: u64,
    pub shmem: u64,
}

/// One worker, as the API shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WorkerStatus {
    pub pid: u32,
    pub ppid: u32,
    pub role: Role,
    pub name: String,
    pub exe: Option<String>,
    pub cmdline: String,
    pub origin: Origin,
    pub reason: String,
    pub alive: bool,
    /// Clock ticks after boot (/proc/PID/stat field 22).
    pub start_time_ticks: u64,
    pub first_seen_unix: f64,
    pub exited_unix: Option<f64>,
    /// Resident bytes (file + anon + shmem) from the kernel's counters.
    pub rss_bytes: u64,
    pub rss: RssBreakdown,
    /// From smaps_rollup, for live processes.
    pub pss_bytes: Option<u64>,
    pub pss: Option<PssBreakdown>,
    pub uss_bytes: Option<u64>,
    /// The plan's figures, in MiB.
    pub memory_mb: f64,
    pub pss_mb: Option<f64>,
    pub uss_mb: Option<f64>,
    pub fds: Option<usize>,
    pub threads: Option<u64>,
    pub faults: u64,
    pub mmap_bytes: u64,
    pub munmap_bytes: u64,
    pub mremap_grow_bytes: u64,
    pub mremap_shrink_bytes: u64,
    pub brk_grow_bytes: u64,
    pub brk_shrink_bytes: u64,
    pub requests_seen: u64,
    pub requests_aborted: u64,
    pub requests_in_flight: u64,
    pub leak_detections: u64,
    /// The plan's `leak_detector` state, with memtrace's additions.
    pub leak_detector: DetectorState,
    /// Allocation-site collection is on for this worker.
    pub collecting: bool,
}

impl WorkerStatus {
    /// Builds the view; `with_proc` adds what only /proc knows (PSS, USS,
    /// fds, threads), which costs a walk of the process's page tables.
    pub fn build(state: &State, w: &Worker, with_proc: bool) -> Self {
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
        Self {
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
            mmap_bytes: stats.mmap_bytes,
            munmap_bytes: stats.munmap_bytes,
            mremap_grow_bytes: stats.mremap_grow_bytes,
            mremap_shrink_bytes: stats.mremap_shrink_bytes,
            brk_grow_bytes: stats.brk_grow_bytes,
            brk_shrink_bytes: stats.brk_shrink_bytes,
            requests_seen: w.requests.seen,
            requests_aborted: w.requests.aborted,
            requests_in_flight: if live { stats.requests_in_flight() } else { 0 },
            leak_detections: w.leak_detections,
            leak_detector: w.detector.get_state(),
            collecting: stats.flags & memtrace_common::PROC_FLAG_COLLECT != 0,
        }
    }
}

/// Soft-limit enforcement, as the API shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SoftLimitStatus {
    pub actions_taken: u64,
    pub actions_skipped: u64,
    pub pending: Vec<PendingRestart>,
}

/// The agent itself.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AgentStatus {
    pub pid: u32,
    pub version: &'static str,
    pub uptime_secs: f64,
    pub selectors: String,
    pub workers_alive: usize,
    pub workers_exited: usize,
    pub events_received: u64,
    pub decode_errors: u64,
    pub kernel: KernelCounters,
    pub programs_attached: Vec<String>,
    pub collection_active: bool,
    pub soft_limit: SoftLimitStatus,
}

impl AgentStatus {
    pub fn build(state: &State) -> Self {
        Self {
            pid: state.agent_pid,
            version: env!("CARGO_PKG_VERSION"),
            uptime_secs: state.started.elapsed().as_secs_f64(),
            selectors: state.selectors.describe(),
            workers_alive: state.registry.len(),
            workers_exited: state.registry.exited().count(),
            events_received: state.counters.events_received,
            decode_errors: state.counters.decode_errors,
            kernel: state.tracer.counters(),
            programs_attached: state.tracer.attached().to_vec(),
            collection_active: state.tracer.collecting(),
            soft_limit: SoftLimitStatus {
                actions_taken: state.enforcer.actions_taken,
                actions_skipped: state.enforcer.actions_skipped,
                pending: state.enforcer.pending().cloned().collect(),
            },
        }
    }
}

/// `?action=status`: the agent and its workers (or one of them).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StatusView {
    pub agent: AgentStatus,
    pub workers: Vec<WorkerStatus>,
}
