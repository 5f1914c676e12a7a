//! What the agent reports about itself and its workers: the views the API
//! serves, the CLI prints and the metrics export. The agent builds them
//! (`crate::agent::views`).
use serde::{Deserialize, Serialize};

use crate::{
    judge::{
        detector::DetectorState,
        servers::ServerKind,
        softlimit::{PendingRestart, Recycle, RecycleState, SoftLimitMetric},
    },
    kernel::loader::KernelCounters,
    model::{
        cgroups::Placement,
        descendants::{ChildrenStatus, OrphanStatus},
        python::{GcStats, PythonRuntime},
        routes::{LeakRoute, RoutesView},
        rss::RssBreakdown,
        workers::{Origin, Role},
    },
};

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
    /// VmData (/proc, at the last refresh): private writable mappings.
    pub data_bytes: Option<u64>,
    /// mmap/munmap/mremap/brk bytes: null unless the agent runs with
    /// `--mmap-counters`.
    pub mmap_bytes: Option<u64>,
    pub munmap_bytes: Option<u64>,
    pub mremap_grow_bytes: Option<u64>,
    pub mremap_shrink_bytes: Option<u64>,
    pub brk_grow_bytes: Option<u64>,
    pub brk_shrink_bytes: Option<u64>,
    /// Heap tier: sampled live heap blocks tracked for this worker now.
    pub heap_live_blocks: u64,
    /// Heap tier: sampled allocations not tracked because the worker's
    /// cap (`--heap-max-live`) or the kernel map was full.
    pub heap_samples_dropped: u64,
    pub requests_seen: u64,
    pub requests_aborted: u64,
    pub requests_in_flight: u64,
    pub leak_detections: u64,
    /// The plan's `leak_detector` state, with memtrace's additions.
    pub leak_detector: DetectorState,
    /// Socket mode, HTTP/1.x: routes counted, and requests counted under
    /// "other" because the worker had --max-routes routes already.
    pub routes: usize,
    pub routes_overflowed_requests: u64,
    /// Once a leak trend was detected: the route that carries it, with the
    /// bytes it keeps per request.
    pub leak_route: Option<LeakRoute>,
    /// Every route's figures: only for /metrics with --metrics-routes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route_views: Option<RoutesView>,
    /// Allocation-site collection is on for this worker.
    pub collecting: bool,
    /// What the soft limit did to this worker, if anything: action, signal,
    /// outcome, time to exit, replacement pid.
    pub soft_limit: Option<Recycle>,
    /// Its cgroup, container, pod and in-namespace pid.
    pub placement: Option<Placement>,
    /// The CPython interpreter it runs: version, binary, whether memtrace
    /// can read its frames (and why not).
    pub python: Option<PythonRuntime>,
    /// Its interpreter's garbage collector (the plan's `gc_counts` and
    /// `gc_uncollectable`, and more), read at the last refresh.
    pub python_gc: Option<GcStats>,
    /// Whether the kernel reads its Python frames (allocation sites name
    /// Python file:line), and whether it probes CPython's object allocator
    /// (heap tier: objects of 512 bytes or less as heap sites; without it
    /// they show through the pages they touch).
    pub python_frames: bool,
    /// Why not, when the interpreter was found but its frames cannot be
    /// read (its build or its `_Py_DebugOffsets`).
    pub python_frames_error: Option<String>,
    pub pymalloc_probed: bool,
    /// The processes below it: how many, their names, memory and age, and
    /// how many it left behind as orphans.
    pub children: ChildrenStatus,
    /// CHILD_LEAK_DETECTED reports so far.
    pub child_leak_detections: u64,
    /// FD_LEAK_DETECTED reports so far.
    pub fd_leak_detections: u64,
    /// Live asyncio tasks (CPython 3.14+, once `_asyncio` is loaded), at
    /// the last count; and why they are not counted when they cannot be.
    pub asyncio_tasks: Option<u64>,
    pub asyncio_error: Option<String>,
    /// TASK_LEAK_DETECTED reports so far.
    pub task_leak_detections: u64,
}

/// Soft-limit enforcement, as the API shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SoftLimitStatus {
    pub metric: SoftLimitMetric,
    pub actions_taken: u64,
    pub actions_skipped: u64,
    pub pending: Vec<PendingRestart>,
    /// The latest recycles, oldest first.
    pub recycles: Vec<Recycle>,
    /// How often each state was reached, by server.
    pub counts: Vec<RecycleCount>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RecycleCount {
    pub server: ServerKind,
    pub state: RecycleState,
    pub count: u64,
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
    /// Requests recorded, every worker's, exited ones included.
    pub requests_recorded: u64,
    /// Request events of a process the agent did not trace (any longer).
    pub requests_unattributed: u64,
    pub kernel: KernelCounters,
    /// The running kernel's release.
    pub kernel_release: String,
    /// Features asked for that this kernel cannot serve, one line each
    /// (`memtrace check` lists every feature).
    pub kernel_unavailable: Vec<String>,
    pub programs_attached: Vec<String>,
    pub collection_active: bool,
    /// What a snapshot collects: `growth` or `heap`.
    pub collect_tier: &'static str,
    /// Heap tier: mean bytes between sampled allocations.
    pub heap_sample_bytes: u64,
    pub soft_limit: SoftLimitStatus,
    /// Processes below dead workers, still alive (at most 100 listed).
    pub orphans: Vec<OrphanStatus>,
    pub orphans_total: usize,
    /// Processes below the workers not followed: the table was full.
    pub descendants_dropped: u64,
    /// The agent's own memory.
    pub memory: AgentMemory,
}

/// The agent's memory: resident, and what its heap holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct AgentMemory {
    /// The agent's resident set (`/proc/self/statm`).
    pub resident_bytes: u64,
    /// Bytes of live heap blocks (glibc: arenas and large mappings); null
    /// where the allocator does not say (the static musl release).
    pub heap_in_use_bytes: Option<u64>,
    /// Free memory the allocator keeps in its arenas, not given back.
    pub heap_free_bytes: Option<u64>,
}

/// `?action=status`: the agent and its workers (or one of them).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StatusView {
    pub agent: AgentStatus,
    pub workers: Vec<WorkerStatus>,
}
