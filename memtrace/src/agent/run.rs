//! The agent's life: start (checks, load, first scan), the event loop that
//! drains the ring buffer and keeps the model fresh, and shutdown.
use std::{
    os::fd::OwnedFd,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use tokio::io::{
    Interest,
    unix::{AsyncFd, AsyncFdReadyGuard},
};
use tracing::{info, warn};

use super::{
    backend::AgentBackend,
    drain::EventDrain,
    kubelet::PodWatcher,
    settings::AgentSettings,
    state::{AgentCounters, SharedState, State, lock},
};
use crate::{
    api::{ApiState, app},
    judge::softlimit::Enforcer,
    kernel::{
        features::{FeaturesError, KernelFeatures},
        loader::{LoadError, RequestProbes, Tracer},
        preflight::{self, PreflightError},
        tracefs::{Tracefs, TracefsError},
        uprobes::{UprobeTargetError, check_target},
    },
    model::{selectors::Selectors, workers::Registry},
};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Preflight(#[from] PreflightError),
    #[error(transparent)]
    Tracefs(#[from] TracefsError),
    #[error(transparent)]
    Features(#[from] FeaturesError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("selecting processes by name failed: {0}")]
    Selectors(#[source] aya::maps::MapError),
    #[error(
        "no process selector given: use --process-name, --exe, --cmdline, --pid, --cgroup or --container"
    )]
    NoSelectors,
    #[error(transparent)]
    Uprobe(#[from] UprobeTargetError),
    #[error("cannot listen on {addr} for the API: {source} (change --listen, or --listen off)")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

pub struct Agent {
    state: SharedState,
    events: EventDrain,
    settings: AgentSettings,
    waiting_logged: Option<Instant>,
    api_listener: Option<std::net::TcpListener>,
    _pods: Option<PodWatcher>,
}

impl Agent {
    /// Checks privileges and tracefs, loads and attaches the programs, and
    /// starts tracing every process already running that matches.
    pub fn start(settings: AgentSettings) -> Result<Self, AgentError> {
        if settings.selectors.is_empty() {
            return Err(AgentError::NoSelectors);
        }
        preflight::check_privileges()?;
        let tracefs = Tracefs::ensure(settings.mount_tracefs)?;
        let features = KernelFeatures::probe(&tracefs)?;
        let agent_pid = std::process::id();
        let mut load = settings.load.clone();
        load.report_all_execs = settings.selectors.needs_exec_reports();
        load.cgroup_filter = cgroup_filter(&settings.selectors);
        load.requests = check_request_probes(&load.requests)?;
        let (mut tracer, ring) = Tracer::load(&features, agent_pid, &load)?;
        log_kernel(&features, &tracer);
        load.requests = tracer.requests().clone();
        tracer
            .set_selector_comms(settings.selectors.names.iter().map(String::as_str))
            .map_err(AgentError::Selectors)?;
        info!(
            programs = tracer.attached().len(),
            selectors = %settings.selectors.describe(),
            "eBPF programs attached"
        );
        let state = State {
            tracer,
            registry: Registry::default(),
            selectors: settings.selectors.clone(),
            counters: AgentCounters::default(),
            started: Instant::now(),
            agent_pid,
            request_settings: settings.requests,
            requests_traced: load.requests != RequestProbes::None,
            detector_config: settings.detector.clone(),
            timed_detector_config: settings.timed_detector.clone(),
            leak_sample_interval: settings.leak_sample_interval,
            last_leak_sample: None,
            soft_limit_watch: Vec::new(),
            last_watch_check: None,
            selected_cgroups: Default::default(),
            pods: Arc::new(Mutex::new(None)),
            enforcer: Enforcer::new(settings.soft_limit.clone(), agent_pid),
            python_builds: Default::default(),
            native_frames: settings.native_frames,
            app_code: settings.app_code.clone(),
            descendants: Default::default(),
            log_plan: settings.plan_log_lines,
            soft_limit_children: settings.soft_limit_include_children,
            storms: Default::default(),
            heap_dirty: false,
        };
        let api_listener = match settings.listen {
            Some(addr) => {
                let listener = std::net::TcpListener::bind(addr)
                    .and_then(|l| l.set_nonblocking(true).map(|()| l))
                    .map_err(|source| AgentError::Listen { addr, source })?;
                Some(listener)
            }
            None => None,
        };
        let pods = settings
            .kubelet
            .clone()
            .map(|k| PodWatcher::start(k, state.pods.clone()));
        let state = Arc::new(Mutex::new(state));
        let mut agent = Self {
            events: EventDrain::new(ring, state.clone()),
            state,
            settings,
            waiting_logged: None,
            api_listener,
            _pods: pods,
        };
        agent.lock().select_cgroups();
        // Two passes: a process forked between the listing and the watch of
        // its parent shows up in the second.
        agent.rescan();
        agent.rescan();
        agent.refresh();
        Ok(agent)
    }

    pub fn state(&self) -> SharedState {
        self.state.clone()
    }

    /// A handle that drains the ring into the state, for readers of the
    /// state that must see every event submitted so far.
    pub fn events(&self) -> EventDrain {
        self.events.clone()
    }

    /// Where the API listens (the port is known once bound, even for port 0).
    pub fn api_addr(&self) -> Option<std::net::SocketAddr> {
        self.api_listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Starts serving the API on the runtime; it stops when `stop` fires.
    fn spawn_api(&mut self, stop: tokio::sync::watch::Receiver<bool>) {
        let Some(listener) = self.api_listener.take() else {
            return;
        };
        let addr = listener.local_addr().ok();
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "the API cannot start");
                return;
            }
        };
        let token = self.settings.api_token.clone();
        info!(
            addr = ?addr,
            debug_endpoints = if token.is_some() { "enabled" } else { "disabled: set MEMTRACE_DEBUG_TOKEN" },
            "API listening"
        );
        let backend = Arc::new(AgentBackend::new(self.events.clone()));
        let app = app(ApiState::new(backend, token));
        let mut stop = stop;
        tokio::spawn(async move {
            let shutdown = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
            {
                warn!(error = %e, "the API stopped");
            }
        });
    }

    pub fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Drains the ring buffer; returns how many events were handled.
    pub fn poll_events(&mut self) -> usize {
        self.events.drain()
    }

    /// Reads kernel counters and /proc into the worker model, and notices
    /// processes that died without an exit event.
    pub fn refresh(&mut self) {
        // Pending exit events carry final counters: handle them first.
        self.poll_events();
        lock(&self.state).refresh();
    }

    /// Scans /proc for processes to trace that the kernel did not see start.
    pub fn rescan(&mut self) {
        // Events first: what the kernel saw start is better added from them.
        self.poll_events();
        let found = lock(&self.state).rescan();
        let state = lock(&self.state);
        if state.registry.is_empty() {
            let due = self
                .waiting_logged
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(60));
            if due {
                info!(
                    selectors = %state.selectors.describe(),
                    "no process matches yet; waiting for one to start"
                );
                self.waiting_logged = Some(Instant::now());
            }
        } else if found > 0 {
            self.waiting_logged = None;
        }
    }

    /// Logs one summary line per traced process.
    pub fn log_summary(&self) {
        let mut state = lock(&self.state);
        let counters = state.tracer.counters();
        state.report_drops(&counters);
        for w in state.registry.alive() {
            info!(
                pid = w.pid,
                ppid = w.ppid,
                role = ?state.registry.role(w.pid),
                name = %w.name,
                rss_bytes = w.rss.resident(),
                anon_bytes = w.rss.anon,
                file_bytes = w.rss.file,
                shmem_bytes = w.rss.shmem,
                swap_bytes = w.rss.swap,
                faults = w.stats.faults,
                mmap_bytes = state.tracer.mmap_counted(w.stats.mmap_bytes),
                munmap_bytes = state.tracer.mmap_counted(w.stats.munmap_bytes),
                brk_grow_bytes = state.tracer.mmap_counted(w.stats.brk_grow_bytes),
                brk_shrink_bytes = state.tracer.mmap_counted(w.stats.brk_shrink_bytes),
                requests = w.stats.requests_ended,
                requests_in_flight = w.stats.requests_in_flight(),
                "worker summary"
            );
        }
        info!(
            workers = state.registry.len(),
            events = state.counters.events_received,
            ringbuf_drops = counters.ringbuf_drops,
            "agent summary"
        );
    }

    /// A readiness handle on the ring buffer, for the wake-ups the kernel
    /// sends when a burst fills half of it. Without one (it cannot fail on
    /// a loaded ring, but if it does) the poll timer alone drains it.
    fn ring_waker(&self) -> Option<AsyncFd<OwnedFd>> {
        let registered = self.events.ring_fd().and_then(|fd| {
            // SAFETY: an OwnedFd stays open, and the same descriptor, until
            // the AsyncFd that owns it is dropped.
            unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
                .map_err(std::io::Error::from)
        });
        match registered {
            Ok(fd) => Some(fd),
            Err(error) => {
                warn!(%error, "ring buffer wake-ups off: draining on the poll timer only");
                None
            }
        }
    }

    /// Runs until `shutdown` completes, then drains the last events and
    /// detaches every program (by dropping them).
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) {
        let mut poll = tokio::time::interval(self.settings.poll_interval);
        let mut refresh = tokio::time::interval(self.settings.refresh_interval);
        let mut rescan = tokio::time::interval(self.settings.rescan_interval);
        let summary_every = if self.settings.summary_interval.is_zero() {
            Duration::from_secs(365 * 24 * 3600)
        } else {
            self.settings.summary_interval
        };
        let mut summary =
            tokio::time::interval_at(tokio::time::Instant::now() + summary_every, summary_every);
        for i in [&mut poll, &mut refresh, &mut rescan, &mut summary] {
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
        let (stop_api, api_stopped) = tokio::sync::watch::channel(false);
        self.spawn_api(api_stopped);
        let mut ring_ready = self.ring_waker();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = poll.tick() => { self.poll_events(); }
                ready = ring_readable(ring_ready.as_ref()) => match ready {
                    Some(mut guard) => {
                        // Cleared before draining: an event submitted
                        // meanwhile wakes the next wait, none is lost.
                        guard.clear_ready();
                        self.poll_events();
                    }
                    None => ring_ready = None,
                },
                _ = refresh.tick() => self.refresh(),
                _ = rescan.tick() => self.rescan(),
                _ = summary.tick() => self.log_summary(),
            }
        }
        let _ = stop_api.send(true);
        self.poll_events();
        let programs = self.lock().tracer.attached().len();
        drop(self);
        info!(programs, "programs detached; memtrace stopped");
    }
}

/// Waits until the kernel wakes the ring buffer's readers (half of it
/// unread); with no waker, forever (the poll timer drains it).
async fn ring_readable(fd: Option<&AsyncFd<OwnedFd>>) -> Option<AsyncFdReadyGuard<'_, OwnedFd>> {
    match fd {
        Some(fd) => fd.readable().await.ok(),
        None => std::future::pending().await,
    }
}

/// How the kernel filters execs by cgroup: only where a selector asks for it
/// and the host has a cgroup v2 hierarchy to name cgroups by id.
fn cgroup_filter(selectors: &Selectors) -> u32 {
    use memtrace_common::{CGROUP_FILTER_OFF, CGROUP_FILTER_RESTRICT, CGROUP_FILTER_SELECT_ALL};
    // Where the kernel cannot filter (no cgroup v2, no helper), the loader
    // turns this off and says so.
    if !selectors.restricts_placement() {
        return CGROUP_FILTER_OFF;
    }
    if selectors.selects_processes() {
        CGROUP_FILTER_RESTRICT
    } else {
        CGROUP_FILTER_SELECT_ALL
    }
}

/// Checks uprobe targets (binary and symbol) before anything is attached, and
/// resolves bare library names to paths.
/// One line for the kernel, one WARN line for each feature asked for that
/// it cannot serve (`memtrace check` lists them all).
fn log_kernel(features: &KernelFeatures, tracer: &Tracer) {
    let report = features.report();
    let how = |name: &str| {
        report
            .iter()
            .find(|r| r.feature == name)
            .map_or("", |r| r.how.as_str())
    };
    info!(
        kernel = %features.release,
        exit = %how("process tracking"),
        rss = %how("rss accounting"),
        faults = %how("page fault counts"),
        "kernel features probed"
    );
    if !features.hidden.is_empty() {
        warn!(hidden = %features.hidden.join(","), "kernel capabilities hidden on purpose (MEMTRACE_HIDE_KERNEL_FEATURES)");
    }
    for line in tracer.unavailable() {
        warn!("{line}");
    }
}

fn check_request_probes(probes: &RequestProbes) -> Result<RequestProbes, AgentError> {
    Ok(match probes {
        RequestProbes::Function(t) => RequestProbes::Function(check_target(t)?),
        RequestProbes::BeginEnd { begin, end } => RequestProbes::BeginEnd {
            begin: check_target(begin)?,
            end: check_target(end)?,
        },
        other => other.clone(),
    })
}
