//! The API's backend over the running agent: status from the worker model,
//! snapshots and diffs from the kernel's stack maps, metrics.
use std::{
    collections::BTreeMap,
    sync::{Mutex, MutexGuard},
};

use super::{
    state::{SharedState, State, lock},
    views::{agent_status, worker_status},
};
use crate::{
    api::{
        Backend, BackendError, StopView, metrics,
        status::{StatusView, WorkerStatus},
    },
    model::{
        procinfo::{self, MappingUsage},
        requests::RequestRecord,
        routes::RoutesView,
    },
    sites::snapshot::{
        self, DiffView, RawSite, SiteKind, Snapshot, SnapshotView, SymbolizerService,
    },
};

/// What a snapshot keeps for the next diff: everything, unfiltered, so a
/// diff can select its own workers.
struct Baseline {
    raw: Vec<RawSite>,
    mappings: BTreeMap<u32, Vec<MappingUsage>>,
    taken_unix: f64,
}

pub struct AgentBackend {
    state: SharedState,
    baseline: Mutex<Option<Baseline>>,
    symbolizer: SymbolizerService,
}

impl AgentBackend {
    pub fn new(state: SharedState) -> Self {
        Self {
            state,
            baseline: Mutex::new(None),
            symbolizer: SymbolizerService::spawn(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn lock_baseline(&self) -> MutexGuard<'_, Option<Baseline>> {
        self.baseline.lock().unwrap_or_else(|e| e.into_inner())
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

    /// Reads the kernel's sites and stacks under the lock, then symbolizes
    /// and reads /proc without it.
    fn capture(&self, pids: &[u32]) -> (Vec<RawSite>, BTreeMap<u32, Vec<MappingUsage>>) {
        let kernel: Vec<(u32, SiteKind, u64, u64, Vec<u64>)> = {
            let state = self.lock();
            state
                .tracer
                .sites()
                .into_iter()
                .filter(|(key, _)| pids.contains(&key.tgid))
                .filter_map(|(key, count)| {
                    let kind = SiteKind::from_kernel(key.kind)?;
                    let ips = state.tracer.stack(key.stack_id)?;
                    // Heap sites go down on free: their counters wrap.
                    let (bytes, samples) = match kind {
                        SiteKind::Malloc => (
                            (count.bytes as i64).max(0) as u64,
                            (count.samples as i64).max(0) as u64,
                        ),
                        _ => (count.bytes, count.samples),
                    };
                    (bytes > 0).then_some((key.tgid, kind, bytes, samples, ips))
                })
                .collect()
        };
        let raw = kernel
            .into_iter()
            .map(|(pid, kind, bytes, samples, ips)| RawSite {
                pid,
                kind,
                bytes,
                samples,
                frames: self.symbolizer.stack(pid, &ips),
            })
            .collect();
        (raw, snapshot::read_mappings(pids))
    }
}

impl Backend for AgentBackend {
    fn status(&self, pid: Option<u32>) -> Result<StatusView, BackendError> {
        let state = self.lock();
        let workers = match pid {
            Some(p) => {
                let w = state.registry.find(p).ok_or(BackendError::UnknownPid(p))?;
                vec![worker_status(&state, w, true)]
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
        Ok(worker_status(&state, w, true))
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

    fn snapshot(&self, pid: Option<u32>, limit: usize) -> Result<SnapshotView, BackendError> {
        let pids = {
            let mut state = self.lock();
            let pids = Self::select(&state, pid)?;
            let breaks: Vec<(u32, u64)> = pids
                .iter()
                .filter_map(|&p| Some((p, procinfo::heap_end(p)?)))
                .collect();
            state.tracer.seed_breaks(&breaks);
            if let Err(e) = state.tracer.start_collection(&pids) {
                tracing::error!(error = %e, "allocation-site collection could not start");
                return Err(BackendError::Unavailable(
                    "allocation-site collection could not start; see the agent's log".into(),
                ));
            }
            pids
        };
        let (raw, mappings) = self.capture(&pids);
        let snap = Snapshot::build(pids, raw.clone(), mappings.clone());
        *self.lock_baseline() = Some(Baseline {
            raw,
            mappings,
            taken_unix: snap.taken_unix,
        });
        tracing::info!(
            workers = snap.pids.len(),
            sites = snap.sites.len(),
            "allocation-site snapshot taken"
        );
        Ok(snap.view(limit))
    }

    fn diff(&self, pid: Option<u32>, limit: usize) -> Result<DiffView, BackendError> {
        let pids = {
            let state = self.lock();
            if self.lock_baseline().is_none() || !state.tracer.collecting() {
                return Err(BackendError::NoBaseline);
            }
            Self::select(&state, pid)?
        };
        let (raw, mappings) = self.capture(&pids);
        let mut baseline = self.lock_baseline();
        let before = baseline.as_ref().ok_or(BackendError::NoBaseline)?;
        let before_maps = before
            .mappings
            .iter()
            .filter(|(p, _)| pids.contains(p))
            .map(|(p, m)| (*p, m.clone()))
            .collect();
        let mut old = Snapshot::build(pids.clone(), before.raw.clone(), before_maps);
        old.taken_unix = before.taken_unix;
        let new = Snapshot::build(pids, raw.clone(), mappings.clone());
        let view = snapshot::diff(&old, &new, limit);
        *baseline = Some(Baseline {
            raw,
            mappings,
            taken_unix: new.taken_unix,
        });
        Ok(view)
    }

    fn stop(&self) -> Result<StopView, BackendError> {
        let mut state = self.lock();
        let detached = state.tracer.stop_collection();
        *self.lock_baseline() = None;
        for pid in state.registry.pids() {
            self.symbolizer.forget(pid);
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
