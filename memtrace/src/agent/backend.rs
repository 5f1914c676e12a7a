//! The API's backend over the running agent: status from the worker model,
//! snapshots and diffs from the kernel's stack maps, metrics.
use std::{
    collections::{BTreeMap, HashMap},
    sync::{Mutex, MutexGuard},
};

use super::{
    drain::EventDrain,
    state::State,
    views::{agent_status, worker_detail, worker_status},
};
use crate::{
    api::{
        Backend, BackendError, StopView, metrics,
        status::{StatusView, WorkerStatus},
    },
    kernel::loader::CollectTier,
    model::{
        procinfo::{self, CodeMapping, MappingUsage},
        pycode::CodeLayout,
        requests::RequestRecord,
        routes::RoutesView,
    },
    sites::{
        pprof::ProfileSource,
        python::{self, PythonSymbolizer},
        render::{self, ProfileFormat, ProfileMeta, RenderError, Rendered},
        snapshot::{
            self, DiffView, GrowthHistory, RawSite, SiteKind, Snapshot, SnapshotView,
            SymbolizerService, scale_heap_sample,
        },
        symbolize::Frame,
        view::{SiteOptions, SiteView, ViewSpec},
    },
};
use memtrace_common::{PyFrame, STACK_LOST, SiteCount};

/// The frame of a site whose native stack the kernel could not keep (its
/// stack map's bucket held another stack): counted in `stack_errors`.
const LOST_STACK: &str = "[native stack not kept: stack map bucket in use]";

/// What a snapshot keeps for the next diff: everything, unfiltered, so a
/// diff can select its own workers.
struct Baseline {
    raw: Vec<RawSite>,
    mappings: BTreeMap<u32, Vec<MappingUsage>>,
    taken_unix: f64,
}

/// Diffs since the snapshot, per worker selection and view: which sites
/// grew in which.
type Histories = HashMap<(Option<u32>, SiteView), GrowthHistory>;

pub struct AgentBackend {
    events: EventDrain,
    baseline: Mutex<Option<Baseline>>,
    history: Mutex<Histories>,
    symbolizer: SymbolizerService,
    python: PythonSymbolizer,
}

impl AgentBackend {
    pub fn new(events: EventDrain) -> Self {
        Self {
            events,
            baseline: Mutex::new(None),
            history: Mutex::new(HashMap::new()),
            symbolizer: SymbolizerService::spawn(),
            python: PythonSymbolizer::default(),
        }
    }

    /// The state, with every event the kernel has submitted handled: an
    /// answer right after a burst of requests includes them.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.events.current()
    }

    fn lock_baseline(&self) -> MutexGuard<'_, Option<Baseline>> {
        self.baseline.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_history(&self) -> MutexGuard<'_, Histories> {
        self.history.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The view a query asks for: the agent's `--app-path`/`--hide`, the
    /// query's, and each worker's standard library from its interpreter.
    fn view_spec(&self, pids: &[u32], options: &SiteOptions) -> Result<ViewSpec, BackendError> {
        let app = {
            let state = self.lock();
            let mut app = state.app_code.clone();
            for &pid in pids {
                let dirs = state
                    .registry
                    .find(pid)
                    .and_then(|w| w.python.as_ref())
                    .and_then(|py| py.stdlib_dir());
                app.stdlib.insert(pid, dirs.into_iter().collect());
            }
            app
        };
        options.spec(app).map_err(BackendError::BadRequest)
    }

    /// The workers a snapshot or diff covers: one (which must be alive), or
    /// every live one.
    fn select(state: &State, pid: Option<u32>) -> Result<Vec<u32>, BackendError> {
        match pid {
            Some(p) if state.registry.contains(p) => Ok(vec![p]),
            Some(p) => Err(BackendError::UnknownPid(p)),
            None => Ok(state.registry.pids()),
        }
    }

    /// Turns collection on for these workers (no-op for those already on).
    fn start(state: &mut State, pids: &[u32]) -> Result<(), BackendError> {
        let breaks: Vec<(u32, u64)> = pids
            .iter()
            .filter_map(|&p| Some((p, procinfo::heap_end(p)?)))
            .collect();
        state.tracer.seed_breaks(&breaks);
        state.tracer.start_collection(pids).map_err(|e| {
            tracing::error!(error = %e, "allocation-site collection could not start");
            BackendError::Unavailable(
                "allocation-site collection could not start; see the agent's log".into(),
            )
        })
    }

    /// Collection on, the current state captured and kept as the baseline.
    fn take_snapshot(&self, pid: Option<u32>) -> Result<Taken, BackendError> {
        let pids = {
            let mut state = self.lock();
            let pids = Self::select(&state, pid)?;
            Self::start(&mut state, &pids)?;
            pids
        };
        let (raw, mappings) = self.capture(&pids);
        let taken_unix = now_unix();
        *self.lock_baseline() = Some(Baseline {
            raw: raw.clone(),
            mappings: mappings.clone(),
            taken_unix,
        });
        // A new baseline: which sites grew is counted from here.
        self.lock_history().clear();
        tracing::info!(
            workers = pids.len(),
            sites = raw.len(),
            "allocation-site snapshot taken"
        );
        Ok(Taken {
            pids,
            raw,
            mappings,
        })
    }

    /// The baseline (for the selected workers) and the current state, which
    /// becomes the baseline.
    fn take_diff(&self, pid: Option<u32>) -> Result<Diffed, BackendError> {
        let pids = {
            let state = self.lock();
            if self.lock_baseline().is_none() || !state.tracer.collecting() {
                return Err(BackendError::NoBaseline);
            }
            Self::select(&state, pid)?
        };
        let (after, mappings) = self.capture(&pids);
        let mut baseline = self.lock_baseline();
        let before = baseline.as_ref().ok_or(BackendError::NoBaseline)?;
        let before_mappings = before
            .mappings
            .iter()
            .filter(|(p, _)| pids.contains(p))
            .map(|(p, m)| (*p, m.clone()))
            .collect();
        let d = Diffed {
            before: before
                .raw
                .iter()
                .filter(|s| pids.contains(&s.pid))
                .cloned()
                .collect(),
            before_mappings,
            since_unix: before.taken_unix,
            pids,
            after: after.clone(),
            mappings: mappings.clone(),
        };
        *baseline = Some(Baseline {
            raw: after,
            mappings,
            taken_unix: now_unix(),
        });
        Ok(d)
    }

    /// Heap blocks in the heap tier, page faults in the growth tier.
    fn profile_source(&self) -> ProfileSource {
        match self.lock().tracer.collect_tier() {
            CollectTier::Heap | CollectTier::Pymalloc => ProfileSource::Heap,
            CollectTier::Growth => ProfileSource::Faults,
        }
    }

    /// Worker names, code mappings and the sampling period for a profile.
    fn profile_meta(&self, pids: &[u32], since_unix: Option<f64>) -> ProfileMeta {
        let (names, period) = {
            let state = self.lock();
            let names = pids
                .iter()
                .filter_map(|&p| state.registry.find(p).map(|w| (p, w.name.clone())))
                .collect();
            (names, state.tracer.heap_sample_bytes())
        };
        let mut mappings = Vec::new();
        for &pid in pids {
            for m in procinfo::code_mappings(pid) {
                if !mappings.iter().any(|k: &CodeMapping| k.path == m.path) {
                    mappings.push(m);
                }
            }
        }
        let now = now_unix();
        ProfileMeta {
            names,
            mappings,
            period,
            time_nanos: (now * 1e9) as i64,
            duration_nanos: since_unix.map_or(0, |s| ((now - s).max(0.0) * 1e9) as i64),
        }
    }

    /// Reads the kernel's sites and stacks under the lock, then symbolizes
    /// and reads /proc without it.
    fn capture(&self, pids: &[u32]) -> (Vec<RawSite>, BTreeMap<u32, Vec<MappingUsage>>) {
        // A site as read under the lock: its pid, values, native return
        // addresses, and Python frames with the layout to read them.
        type Kernel = (u32, RawSite, Vec<u64>, Option<(CodeLayout, Vec<PyFrame>)>);
        let (kernel, keep_native): (Vec<Kernel>, bool) = {
            let mut state = self.lock();
            let all = state.tracer.sites();
            // Workers that exited while collection went on (recycled ones):
            // their sites, samples and symbolization caches go.
            let dead: std::collections::HashSet<u32> = all
                .iter()
                .map(|(key, _)| key.tgid)
                .filter(|&tgid| !state.registry.contains(tgid))
                .collect();
            state.tracer.forget_sites_of(&dead);
            for &pid in &dead {
                self.symbolizer.forget(pid);
                self.python.forget(pid);
            }
            let rate = state.tracer.heap_sample_bytes();
            let sites = all
                .into_iter()
                .filter(|(key, _)| pids.contains(&key.tgid))
                .filter_map(|(key, count)| {
                    let kind = SiteKind::from_kernel(key.kind)?;
                    // A stack the kernel's map could not take: no native
                    // frames (its Python frames, if any, still name it).
                    let ips = if key.stack_id == STACK_LOST {
                        Vec::new()
                    } else {
                        state.tracer.stack(key.stack_id)?
                    };
                    let site = kernel_site(key.tgid, kind, &count, rate);
                    let python = (key.py_stack != 0)
                        .then(|| {
                            let layout = state.registry.get(key.tgid)?.python_code?;
                            Some((layout, state.tracer.py_stack(key.py_stack)?))
                        })
                        .flatten();
                    (site.bytes > 0 || site.alloc_bytes > 0)
                        .then_some((key.tgid, site, ips, python))
                })
                .collect();
            (sites, state.native_frames)
        };
        let raw = kernel
            .into_iter()
            .map(|(pid, site, ips, python)| {
                let native = if ips.is_empty() {
                    vec![Frame {
                        function: Some(LOST_STACK.to_string()),
                        ..Frame::unresolved(0)
                    }]
                } else {
                    self.symbolizer.stack(pid, &ips)
                };
                let python = python.map_or_else(Vec::new, |(layout, stack)| {
                    self.python.frames(pid, &layout, &stack)
                });
                RawSite {
                    frames: python::join(native, python, keep_native),
                    ..site
                }
            })
            .collect();
        (raw, snapshot::read_mappings(pids))
    }
}

/// What a snapshot captured.
struct Taken {
    pids: Vec<u32>,
    raw: Vec<RawSite>,
    mappings: BTreeMap<u32, Vec<MappingUsage>>,
}

/// What a diff compares.
struct Diffed {
    pids: Vec<u32>,
    before: Vec<RawSite>,
    before_mappings: BTreeMap<u32, Vec<MappingUsage>>,
    since_unix: f64,
    after: Vec<RawSite>,
    mappings: BTreeMap<u32, Vec<MappingUsage>>,
}

/// When dropped (declare it first, so that it drops last): releases what
/// the symbolizer parsed for a snapshot, diff or profile (its finished
/// frames stay), and gives back to the system the heap they freed: see
/// `heap::trim`.
struct TrimHeap<'a>(&'a SymbolizerService);

impl Drop for TrimHeap<'_> {
    fn drop(&mut self) {
        self.0.release();
        super::heap::trim();
    }
}

fn now_unix() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn render_failed(e: RenderError) -> BackendError {
    tracing::error!(error = %e, "rendering a profile failed");
    BackendError::Unavailable("the profile could not be rendered; see the agent's log".into())
}

/// A kernel site's values: heap sites scaled from their samples (their live
/// counters go down on free and wrap), the others as counted.
fn kernel_site(pid: u32, kind: SiteKind, count: &SiteCount, rate: u64) -> RawSite {
    match kind {
        SiteKind::Malloc => {
            let live_samples = (count.samples as i64).max(0) as u64;
            let live_bytes = (count.bytes as i64).max(0) as u64;
            let (objects, bytes) = scale_heap_sample(live_samples, live_bytes, rate);
            let (alloc_objects, alloc_bytes) =
                scale_heap_sample(count.alloc_samples, count.alloc_bytes, rate);
            RawSite {
                pid,
                kind,
                bytes,
                objects,
                samples: live_samples,
                alloc_bytes,
                alloc_objects,
                frames: Vec::new(),
            }
        }
        SiteKind::Fault => RawSite {
            pid,
            kind,
            bytes: count.bytes,
            objects: count.bytes / 4096,
            samples: count.samples,
            ..RawSite::default()
        },
        SiteKind::Mmap | SiteKind::Brk => RawSite {
            pid,
            kind,
            bytes: count.bytes,
            objects: count.samples,
            samples: count.samples,
            ..RawSite::default()
        },
    }
}

impl Backend for AgentBackend {
    fn status(&self, pid: Option<u32>) -> Result<StatusView, BackendError> {
        let state = self.lock();
        let workers = match pid {
            Some(p) => {
                let w = state.registry.find(p).ok_or(BackendError::UnknownPid(p))?;
                vec![worker_detail(&state, w)]
            }
            None => state
                .registry
                .alive()
                .map(|w| worker_status(&state, w, true))
                .collect(),
        };
        Ok(StatusView {
            agent: agent_status(&state),
            workers,
        })
    }

    fn workers(&self) -> Vec<WorkerStatus> {
        let state = self.lock();
        state
            .registry
            .alive()
            .map(|w| worker_status(&state, w, true))
            .collect()
    }

    fn worker(&self, pid: u32) -> Result<WorkerStatus, BackendError> {
        let state = self.lock();
        let w = state
            .registry
            .find(pid)
            .ok_or(BackendError::UnknownPid(pid))?;
        Ok(worker_detail(&state, w))
    }

    fn requests(&self, pid: u32, limit: usize) -> Result<Vec<RequestRecord>, BackendError> {
        let state = self.lock();
        let w = state
            .registry
            .find(pid)
            .ok_or(BackendError::UnknownPid(pid))?;
        Ok(w.requests.recent(limit).cloned().collect())
    }

    fn routes(&self, pid: u32) -> Result<RoutesView, BackendError> {
        let state = self.lock();
        let w = state
            .registry
            .find(pid)
            .ok_or(BackendError::UnknownPid(pid))?;
        Ok(w.requests.routes.view())
    }

    fn snapshot(
        &self,
        pid: Option<u32>,
        limit: usize,
        sites: &SiteOptions,
    ) -> Result<SnapshotView, BackendError> {
        let _trim = TrimHeap(&self.symbolizer);
        let taken = self.take_snapshot(pid)?;
        let spec = self.view_spec(&taken.pids, sites)?;
        Ok(Snapshot::build(taken.pids, taken.raw, taken.mappings, &spec).view(limit))
    }

    fn diff(
        &self,
        pid: Option<u32>,
        limit: usize,
        sites: &SiteOptions,
    ) -> Result<DiffView, BackendError> {
        let _trim = TrimHeap(&self.symbolizer);
        let d = self.take_diff(pid)?;
        let spec = self.view_spec(&d.pids, sites)?;
        let mut old = Snapshot::build(d.pids.clone(), d.before, d.before_mappings, &spec);
        old.taken_unix = d.since_unix;
        let new = Snapshot::build(d.pids, d.after, d.mappings, &spec);
        let mut histories = self.lock_history();
        let history = histories.entry((pid, spec.view)).or_default();
        Ok(snapshot::diff(
            &old,
            &new,
            limit,
            history,
            spec.still_growing,
        ))
    }

    fn snapshot_profile(
        &self,
        pid: Option<u32>,
        format: ProfileFormat,
        sites: &SiteOptions,
    ) -> Result<Rendered, BackendError> {
        let _trim = TrimHeap(&self.symbolizer);
        let taken = self.take_snapshot(pid)?;
        let spec = self.view_spec(&taken.pids, sites)?;
        let meta = self.profile_meta(&taken.pids, None);
        render::snapshot(format, self.profile_source(), &taken.raw, &meta, &spec)
            .map_err(render_failed)
    }

    fn diff_profile(
        &self,
        pid: Option<u32>,
        format: ProfileFormat,
        sites: &SiteOptions,
    ) -> Result<Rendered, BackendError> {
        let _trim = TrimHeap(&self.symbolizer);
        let d = self.take_diff(pid)?;
        let spec = self.view_spec(&d.pids, sites)?;
        let meta = self.profile_meta(&d.pids, Some(d.since_unix));
        render::diff(
            format,
            self.profile_source(),
            &d.before,
            &d.after,
            &meta,
            &spec,
        )
        .map_err(render_failed)
    }

    fn heap_profile(&self, pid: Option<u32>) -> Result<Rendered, BackendError> {
        let _trim = TrimHeap(&self.symbolizer);
        let pids = {
            let mut state = self.lock();
            let pids = Self::select(&state, pid)?;
            // Off: on from now. On: workers that appeared since are added.
            Self::start(&mut state, &pids)?;
            pids
        };
        let (raw, _) = self.capture(&pids);
        let meta = self.profile_meta(&pids, None);
        render::snapshot(
            ProfileFormat::Pprof,
            self.profile_source(),
            &raw,
            &meta,
            &ViewSpec::default(),
        )
        .map_err(render_failed)
    }

    fn stop(&self) -> Result<StopView, BackendError> {
        let _trim = TrimHeap(&self.symbolizer);
        let mut state = self.lock();
        let detached = state.tracer.stop_collection();
        *self.lock_baseline() = None;
        self.lock_history().clear();
        for pid in state.registry.pids() {
            self.symbolizer.forget(pid);
            self.python.forget(pid);
        }
        tracing::info!("allocation-site collection stopped");
        Ok(StopView {
            status: "collection stopped",
            collection_active: false,
            programs_detached: detached,
        })
    }

    fn metrics(&self) -> String {
        // Every live worker, with what /proc adds: never an unknown pid.
        let Ok(mut view) = self.status(None) else {
            return String::new();
        };
        let state = self.lock();
        if state.request_settings.metrics_routes {
            for w in &mut view.workers {
                w.route_views = state.registry.find(w.pid).map(|x| x.requests.routes.view());
            }
        }
        drop(state);
        metrics::render(&view)
    }
}
