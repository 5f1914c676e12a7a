//! The state the agent shares between its event loop, its refresher and the
//! API's backend: the loaded programs, the worker model, the detectors'
//! settings and the soft-limit enforcer. What changes it lives beside it:
//! kernel events (`events`), tracking (`tracking`), judgement (`judging`).
use std::{
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use crate::{
    judge::{detector::DetectorConfig, softlimit::Enforcer},
    kernel::loader::Tracer,
    model::{
        descendants::Descendants, kubelet::PodIndex, python::PythonBuilds,
        requests::RequestSettings, selectors::Selectors, storms::StormWatch, workers::Registry,
    },
};

pub(super) const MB: f64 = 1024.0 * 1024.0;

/// Agent-side counters.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct AgentCounters {
    pub events_received: u64,
    pub decode_errors: u64,
    /// Requests recorded, every worker's, exited ones included.
    pub requests_recorded: u64,
    /// Request events of a process no longer (or not yet) in the model.
    pub requests_unattributed: u64,
    /// Ring-buffer drops already reported in the log.
    pub drops_reported: u64,
}

/// Everything the event loop, the refresher and the API share.
pub struct State {
    pub tracer: Tracer,
    pub registry: Registry,
    pub selectors: Selectors,
    pub counters: AgentCounters,
    pub started: Instant,
    pub agent_pid: u32,
    pub request_settings: RequestSettings,
    /// Whether request boundaries are traced (else detectors use time).
    pub requests_traced: bool,
    pub detector_config: DetectorConfig,
    pub timed_detector_config: DetectorConfig,
    pub leak_sample_interval: Duration,
    pub(super) last_leak_sample: Option<Instant>,
    /// Workers whose RSS is over the soft limit but whose PSS or USS (the
    /// limit's metric) was not, by (pid, start time).
    pub(super) soft_limit_watch: Vec<(u32, u64)>,
    pub(super) last_watch_check: Option<Instant>,
    /// Cgroup v2 ids given to the kernel's filter, for --cgroup and
    /// --container (containers are looked up again at each rescan).
    pub selected_cgroups: std::collections::BTreeSet<u64>,
    /// The kubelet's pods, refreshed by a thread of the agent (None: no
    /// kubelet configured, or none reached yet).
    pub pods: Arc<Mutex<Option<PodIndex>>>,
    pub enforcer: Enforcer,
    /// CPython builds inspected so far, by file.
    pub python_builds: PythonBuilds,
    /// Python sites keep the native frames under the innermost Python one.
    pub native_frames: bool,
    /// What Python sites count as the application's code (`--app-path`,
    /// `--hide`; the prefixes come from each interpreter).
    pub app_code: crate::sites::view::AppCode,
    /// Processes below the workers, and orphans of dead ones.
    pub descendants: Descendants,
    /// Requests are logged as the plan's text lines.
    pub log_plan: bool,
    /// The soft limit counts each worker's descendants in its metric.
    pub soft_limit_children: bool,
    /// Processes forking, exec'ing or mapping faster than any server.
    pub storms: StormWatch,
    /// A worker was retired since the heap was last trimmed.
    pub(super) heap_dirty: bool,
}

pub type SharedState = Arc<Mutex<State>>;

pub(super) fn lock(state: &SharedState) -> MutexGuard<'_, State> {
    // A panic while holding the lock leaves consistent-enough data behind:
    // every update is a plain field write.
    state.lock().unwrap_or_else(|e| e.into_inner())
}
