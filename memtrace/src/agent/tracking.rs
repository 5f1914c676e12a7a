//! Which processes are traced, and their numbers kept fresh: processes found
//! in /proc or by events are attached to the model, kernel counters and /proc
//! read into it, the dead retired, lost events reported.
use std::{
    path::Path,
    time::{Instant, SystemTime},
};

use tracing::{debug, info, warn};

use super::{kubelet::name_pod, state::State};
use crate::{
    judge::detector::{DetectorConfig, LeakDetector},
    kernel::loader::{CollectTier, KernelCounters, PymallocTargets},
    model::{
        cgroups,
        descendants::Descendant,
        procinfo::{self, FileMappings, ProcessView},
        pyasyncio::AsyncioOffsets,
        python::{self, PythonRuntime},
        requests::RequestLog,
        rss::RssBreakdown,
        workers::{Origin, PYTHON_GC_MISSES, Worker},
    },
};

impl State {
    /// Adds a process to the model and logs it.
    pub(super) fn attach(&mut self, mut worker: Worker) {
        let pid = worker.pid;
        worker.requests = RequestLog::with_routes(
            self.request_settings.history,
            self.request_settings.max_routes,
        );
        // A new worker (or a new program image) is judged from scratch.
        worker.detector = LeakDetector::new(if self.requests_traced {
            self.detector_config.clone()
        } else {
            self.timed_detector_config.clone()
        });
        worker.child_detector = LeakDetector::new(child_detector_config(&self.detector_config));
        worker.fd_detector = LeakDetector::new(child_detector_config(&self.detector_config));
        worker.task_detector = LeakDetector::new(child_detector_config(&self.detector_config));
        if let Some(known) = self.registry.get_mut(pid)
            && known.start_time == worker.start_time
        {
            // Found by a /proc scan just before its fork or exec event
            // arrived: the event knows better how the mm started.
            if known.origin == Origin::Scan {
                known.origin = worker.origin;
                known.reason = worker.reason;
            }
            return;
        }
        if worker.origin == Origin::Exec {
            // The old image's interpreter layout means nothing now.
            self.tracer.forget_python(pid);
        }
        if worker.origin != Origin::Fork
            && let Some(status) = procinfo::status_memory(pid)
        {
            worker.apply_seed(RssBreakdown::from_status(&status));
        }
        worker.placement = cgroups::placement(pid);
        if let (Some(p), Some(pods)) = (
            worker.placement.as_mut(),
            self.pods.lock().unwrap_or_else(|e| e.into_inner()).as_ref(),
        ) {
            name_pod(pods, p);
        }
        let (reason, origin, name, ppid) = (
            worker.reason.clone(),
            worker.origin,
            worker.name.clone(),
            worker.ppid,
        );
        let placement = worker.placement.clone().unwrap_or_default();
        self.registry.add(worker);
        self.refresh_one(pid);
        let role = self.registry.role(pid);
        let rss = self.registry.get(pid).map_or(0, |w| w.rss.resident());
        // A storm's children (and an exec loop's images) are logged at
        // debug level: the storm has its one line.
        let quiet = self.storms.quiet(pid, ppid);
        macro_rules! attached { ($level:ident) => { $level!(
            pid,
            ppid,
            role = ?role,
            name = %name,
            origin = ?origin,
            reason = %reason,
            rss_bytes = rss,
            cgroup = %placement.cgroup,
            container_id = placement.container_id.as_deref(),
            runtime = placement.runtime.as_deref(),
            pod_uid = placement.pod_uid.as_deref(),
            pod = placement.pod_name.as_deref(),
            namespace = placement.pod_namespace.as_deref(),
            ns_pid = placement.ns_pid,
            "worker attached"
        ) } }
        if quiet {
            attached!(debug);
        } else {
            attached!(info);
        }
    }

    /// Gives the kernel's exec filter the cgroups that --cgroup and
    /// --container name; containers that started since are found here.
    pub(super) fn select_cgroups(&mut self) {
        let mut wanted: Vec<(String, Option<u64>)> = self
            .selectors
            .cgroups
            .iter()
            .map(|c| (c.clone(), cgroups::cgroup_id(c)))
            .collect();
        for prefix in &self.selectors.containers {
            wanted.extend(
                cgroups::find_container_cgroups(prefix)
                    .into_iter()
                    .map(|(path, id)| (path, Some(id))),
            );
        }
        for (path, id) in wanted {
            let Some(id) = id else {
                debug!(cgroup = %path, "selected cgroup does not exist (yet)");
                continue;
            };
            if self.selected_cgroups.contains(&id) {
                continue;
            }
            match self.tracer.select_cgroup(id) {
                Ok(()) => {
                    info!(cgroup = %path, cgroup_id = id, "cgroup selected in the kernel");
                    self.selected_cgroups.insert(id);
                }
                Err(e) => {
                    warn!(cgroup = %path, error = %e, "cannot select cgroup: kernel map full?")
                }
            }
        }
    }

    /// Reads one process's kernel counters into the model.
    fn refresh_one(&mut self, pid: u32) -> bool {
        let Some(stats) = self.tracer.proc_stats(pid) else {
            return false;
        };
        let mm = self.tracer.mm_rss(stats.mm_id);
        let Some(w) = self.registry.get_mut(pid) else {
            return true;
        };
        let mapped = stats
            .collected_mmap_calls
            .saturating_sub(w.stats.collected_mmap_calls);
        let collected = stats.flags & memtrace_common::PROC_FLAG_COLLECT != 0;
        w.stats = stats;
        let now = Instant::now();
        if collected && let Some(burst) = self.storms.maps.add(pid, mapped, now) {
            warn!(
                pid,
                name = %w.name,
                mmap_calls = burst.in_window(),
                limit = crate::model::storms::MAP_STORM.count,
                secs = burst.window_secs(now),
                "process maps memory faster than any server while its allocation sites are collected: collection walks the stack of each of its mmap calls, and its mmap sites count every byte mapped, live or not"
            );
        }
        if let Some(mm) = mm {
            w.apply_mm(&mm);
        }
        // Read once, if at all, for this refresh's Python set-up.
        let maps = FileMappings::of(pid);
        if w.python.is_none() && w.python_looks < PYTHON_LOOKS {
            w.python_looks += 1;
            w.python = self
                .python_builds
                .of_process(pid, &maps, w.python_looks == PYTHON_LOOKS);
            if let Some(py) = &w.python {
                log_python(pid, py);
                w.python_runtime = python::runtime_address(&maps, py);
            }
        }
        if let (Some(py), Some(runtime)) = (&w.python, w.python_runtime)
            && py.supported
            && w.python_gc_misses < PYTHON_GC_MISSES
        {
            w.python_gc = self.python_builds.gc_stats(pid, py, runtime);
            // Where each request's ends can read the GC's totals (not
            // on 3.15: its statistics are in ring buffers).
            if w.python_gc.is_some() && !w.python_gc_in_kernel {
                // From now on each request's ends read the GC's totals.
                let addr = self.python_builds.gc_stats_address(py, runtime);
                match addr.map(|a| self.tracer.set_python_gc(pid, a)) {
                    Some(Ok(())) => w.python_gc_in_kernel = true,
                    Some(Err(e)) => {
                        debug!(pid, error = %e, "GC totals per request not read (kernel map full?)");
                    }
                    None => {}
                }
            }
            if w.python_gc.is_none() {
                w.python_gc_misses += 1;
                if w.python_gc_misses == PYTHON_GC_MISSES {
                    warn!(pid, python = %py.version, "the garbage collector's state was not found in _PyRuntime: no GC statistics for this worker");
                }
            }
        }
        self.setup_python_frames(pid, &maps);
        self.refresh_asyncio(pid, &maps);
        let Some(w) = self.registry.get_mut(pid) else {
            return true;
        };
        if let Some(status) = procinfo::status_memory(pid) {
            w.vm_data = Some(status.vm_data);
            if w.needs_seed() {
                w.apply_seed(RssBreakdown::from_status(&status));
            }
        }
        true
    }

    /// Lets the kernel read a Python worker's frames (and probe its object
    /// allocator), once its interpreter is initialised; one log line when
    /// that cannot be.
    fn setup_python_frames(&mut self, pid: u32, maps: &FileMappings) {
        if !self.tracer.python_frames() {
            return;
        }
        let Some(w) = self.registry.get_mut(pid) else {
            return;
        };
        let (Some(py), Some(runtime)) = (&w.python, w.python_runtime) else {
            return;
        };
        if !py.supported || w.python_frame_tries == u8::MAX {
            return;
        }
        let found = self.python_builds.frames(pid, maps, py, runtime);
        let failure = match found {
            Ok(Some(frames)) => {
                let pymalloc = match &frames.pymalloc {
                    Ok(entries) => Some(PymallocTargets {
                        binary: Path::new(&format!("/proc/{pid}/root"))
                            .join(py.binary.strip_prefix("/").unwrap_or(&py.binary)),
                        entries: *entries,
                    }),
                    Err(why) => {
                        if self.tracer.collect_tier() == CollectTier::Pymalloc {
                            info!(pid, python = %py.version, reason = %why, "CPython's object allocator not probed");
                        }
                        None
                    }
                };
                match self.tracer.set_python(pid, frames.info, pymalloc) {
                    Ok(()) => {
                        debug!(
                            pid,
                            key = frames.info.tss_key,
                            "Python frames read by the kernel"
                        );
                        w.python_code = Some(frames.code);
                        w.python_frame_tries = u8::MAX;
                        None
                    }
                    Err(e) => Some(format!("kernel map full? {e}")),
                }
            }
            Ok(None) => {
                w.python_frame_tries += 1;
                (w.python_frame_tries >= PYTHON_GC_MISSES)
                    .then(|| "its interpreter never created its thread-state key".to_string())
            }
            Err(why) => Some(why),
        };
        if let Some(reason) = failure {
            w.python_frame_tries = u8::MAX;
            warn!(pid, python = %py.version, reason = %reason, "cannot read this worker's Python frames: native sites only");
            w.python_frames_error = Some(reason);
        }
    }

    /// A 3.14+ worker's live asyncio tasks: its `_asyncio` module's table
    /// once the module is loaded (looked for while it is not), then a count
    /// at every refresh.
    fn refresh_asyncio(&mut self, pid: u32, maps: &FileMappings) {
        let Some(w) = self.registry.get_mut(pid) else {
            return;
        };
        let (Some(py), Some(runtime)) = (&w.python, w.python_runtime) else {
            return;
        };
        if !py.supported || py.minor().is_none_or(|m| m < 14) {
            return;
        }
        if w.asyncio_error.is_some() {
            return;
        }
        if w.asyncio.is_none() {
            match AsyncioOffsets::of_process(pid, maps, &py.binary) {
                Ok(found) => w.asyncio = found,
                Err(why) => {
                    // Once: a table that does not validate stays refused.
                    warn!(pid, reason = %why, "asyncio tasks not counted");
                    w.asyncio_error = Some(why);
                    return;
                }
            }
        }
        if let (Some(asyncio), Some(py)) = (w.asyncio, &w.python) {
            w.asyncio_tasks = self.python_builds.asyncio_tasks(pid, py, runtime, &asyncio);
        }
    }

    pub(super) fn refresh(&mut self) {
        for pid in self.registry.pids() {
            // /proc decides what is alive: an exit event can be lost (ring
            // buffer full), or come before the process was watched.
            let start = self.registry.get(pid).map_or(0, |w| w.start_time);
            if !procinfo::same_process(pid, start) {
                self.tracer.unwatch(pid);
                if let Some(w) = self.registry.retire(pid, None) {
                    info!(pid, name = %w.name, "worker exited (noticed in /proc)");
                    self.heap_dirty = true;
                }
                continue;
            }
            if !self.refresh_one(pid) {
                // Alive but not in the kernel map: watch it again.
                if let Err(e) = self.tracer.watch(pid, procinfo::heap_end(pid).unwrap_or(0)) {
                    warn!(pid, error = %e, "cannot trace process: kernel map full?");
                }
            }
        }
        // Descendants: their RSS, and which are gone (an exit event lost).
        for pid in self.descendants.pids() {
            match procinfo::statm_rss(pid) {
                Some(bytes) => self.descendants.set_rss(pid, bytes),
                None => {
                    self.tracer.unwatch(pid);
                    self.descendants.exit(pid);
                }
            }
        }
        self.check_footprints();
        let counters = self.tracer.counters();
        self.report_drops(&counters);
        self.name_pods();
        self.sample_timed_detectors();
        self.check_soft_limit_watch();
        self.enforce();
        // At most once a refresh, however many workers left since.
        if std::mem::take(&mut self.heap_dirty) {
            super::heap::trim();
        }
    }

    pub(super) fn report_drops(&mut self, counters: &KernelCounters) {
        if counters.ringbuf_drops > self.counters.drops_reported {
            warn!(
                dropped = counters.ringbuf_drops - self.counters.drops_reported,
                total_dropped = counters.ringbuf_drops,
                "ring buffer full: kernel events were dropped (raise --ring-buffer-bytes or lower --poll-interval-ms)"
            );
            self.counters.drops_reported = counters.ringbuf_drops;
        }
    }

    /// Finds processes that match a selector, or descend from a traced one,
    /// and are not traced yet. Returns how many were added.
    pub(super) fn rescan(&mut self) -> usize {
        if self.selectors.restricts_placement() {
            self.select_cgroups();
        }
        // A process the kernel already watches has its fork or exec event on
        // the way, unless events were ever dropped.
        let events_complete = self.tracer.counters().ringbuf_drops == 0;
        let views: Vec<ProcessView> = procinfo::all_pids()
            .into_iter()
            .filter(|&pid| {
                pid != self.agent_pid
                    && !self.registry.contains(pid)
                    && !self.descendants.contains(pid)
            })
            .filter(|&pid| !(events_complete && self.tracer.kernel_stats(pid).is_some()))
            .filter_map(procinfo::view)
            .collect();
        let mut added = 0;
        // Matches first, then their descendants until nothing changes.
        let mut pending: Vec<ProcessView> = Vec::new();
        for view in views {
            if let Some(reason) = self.selectors.matches(&view) {
                if self.watch_found(&view, reason.to_string()) {
                    added += 1;
                }
            } else {
                pending.push(view);
            }
        }
        loop {
            let before = pending.len();
            pending.retain(|view| {
                if let Some(owner) = self.descendant_owner(view.ppid) {
                    self.adopt_found(view, owner);
                    false
                } else if self.registry.contains(view.ppid) {
                    let reason = format!("child of {}", view.ppid);
                    if self.watch_found(view, reason) {
                        added += 1;
                    }
                    false
                } else {
                    true
                }
            });
            if pending.len() == before {
                break;
            }
        }
        added
    }

    /// A process found below a worker: followed as its descendant (the
    /// kernel watches it for its forks, exec and exit). Its fork time is
    /// unknown: no request is said to have started it.
    fn adopt_found(&mut self, view: &ProcessView, owner: u32) {
        if self.tracer.watch(view.pid, 0).is_err() {
            return;
        }
        self.descendants.adopt(Descendant {
            pid: view.pid,
            owner,
            ppid: view.ppid,
            forked_by: 0,
            comm: view.comm.clone(),
            forked_ns: 0,
            started: SystemTime::now(),
            rss_bytes: procinfo::statm_rss(view.pid).unwrap_or(0),
        });
    }

    fn watch_found(&mut self, view: &ProcessView, reason: String) -> bool {
        let heap = procinfo::heap_end(view.pid).unwrap_or(0);
        if let Err(e) = self.tracer.watch(view.pid, heap) {
            warn!(pid = view.pid, error = %e, "cannot trace process: kernel map full?");
            return false;
        }
        // It may have exited between the listing and the watch.
        if !procinfo::same_process(view.pid, view.start_time) {
            self.tracer.unwatch(view.pid);
            debug!(pid = view.pid, "process gone before it could be traced");
            return false;
        }
        self.attach(Worker::new(view, Origin::Scan, reason));
        true
    }
}

/// Live descendants (or open descriptors) a worker may gain per request,
/// sustained, before it is a leak of child processes (or descriptors): one
/// per 50 requests. A request that starts a helper and waits for it, or
/// opens a file and closes it, leaves none behind.
pub const CHILD_SLOPE_PER_REQUEST: f64 = 0.02;

/// The memory detector's window and checks, judging descendants or
/// descriptors per request (no soft limit: that is the memory detector's).
pub fn child_detector_config(memory: &DetectorConfig) -> DetectorConfig {
    DetectorConfig {
        slope_threshold_mb: CHILD_SLOPE_PER_REQUEST,
        soft_limit_mb: f64::MAX,
        ..memory.clone()
    }
}

/// Refreshes at which a new worker is looked at for an interpreter (its
/// dynamic loader maps libpython just after exec).
const PYTHON_LOOKS: u8 = 5;

/// One line per worker: which interpreter, and whether its frames can be read.
fn log_python(pid: u32, py: &PythonRuntime) {
    match &py.unsupported_reason {
        None => info!(
            pid,
            python = %py.version,
            binary = %py.binary.display(),
            "CPython worker"
        ),
        Some(reason) => warn!(
            pid,
            python = %py.version,
            binary = %py.binary.display(),
            reason = %reason,
            "CPython worker memtrace cannot read Python frames of: native sites only"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::judge::detector::Detection;

    /// The render app's pattern: a child left alive every sixth request.
    #[test]
    fn children_left_every_few_requests_are_a_trend() {
        let memory = DetectorConfig::default()
            .with_window_size(20)
            .with_check_interval(10)
            .with_warmup_samples(4)
            .with_min_check_gap_secs(0.25);
        let mut d = LeakDetector::new(child_detector_config(&memory));
        let mut found = None;
        for i in 0..48u32 {
            let children = f64::from(i / 6 + 1);
            if let Some(det) = d.record_at(children, f64::from(i) * 0.05) {
                found = Some((i, det));
                break;
            }
        }
        let Some((
            at,
            Detection::LeakTrendDetected {
                slope_mb_per_unit, ..
            },
        )) = found
        else {
            panic!("no trend: {:?}", d.get_state());
        };
        assert!(
            (0.1..0.3).contains(&slope_mb_per_unit),
            "{slope_mb_per_unit} at {at}"
        );
        // A flat count is not.
        let mut flat = LeakDetector::new(child_detector_config(&memory));
        assert!((0..48u32).all(|i| flat.record_at(3.0, f64::from(i) * 0.05).is_none()));
    }
}
