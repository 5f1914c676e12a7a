//! The agent: loads the programs, finds the processes to trace, turns kernel
//! events into the worker model, and keeps it fresh.
use std::{
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use memtrace_common::ProcessEvent;
use tracing::{debug, info, warn};

use crate::{
    detector::{Detection, DetectorConfig, LeakDetector},
    events::{KernelEvent, c_str, decode},
    loader::{KernelCounters, LoadError, LoadOptions, Tracer},
    preflight::{self, PreflightError},
    procinfo::{self, ProcessView},
    requests::{RequestLog, RequestRecord, RequestSettings},
    selectors::Selectors,
    softlimit::{Enforcer, Processes, SoftLimitSettings, log_outcome},
    tracefs::{Tracefs, TracefsError},
    workers::{Origin, Registry, RssBreakdown, Worker},
};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Preflight(#[from] PreflightError),
    #[error(transparent)]
    Tracefs(#[from] TracefsError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("selecting processes by name failed: {0}")]
    Selectors(#[source] aya::maps::MapError),
    #[error("no process selector given: use --process-name, --exe, --cmdline or --pid")]
    NoSelectors,
    #[error(transparent)]
    Uprobe(#[from] crate::uprobes::UprobeTargetError),
    #[error("cannot listen on {addr} for the API: {source} (change --listen, or --listen off)")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// What the agent needs to start.
#[derive(Clone, Debug)]
pub struct AgentSettings {
    pub selectors: Selectors,
    pub load: LoadOptions,
    /// Mount tracefs at /sys/kernel/tracing when it is missing.
    pub mount_tracefs: bool,
    /// How often the ring buffer is drained.
    pub poll_interval: Duration,
    /// How often kernel maps and /proc are read into the worker model.
    pub refresh_interval: Duration,
    /// How often /proc is scanned for processes the kernel could not see start.
    pub rescan_interval: Duration,
    /// How often a per-worker summary is logged (zero: never).
    pub summary_interval: Duration,
    /// Per-request log thresholds and history.
    pub requests: RequestSettings,
    /// Leak detector of each worker, fed the RSS after each request.
    pub detector: DetectorConfig,
    /// Detector of workers without request boundaries: fed every
    /// `leak_sample_interval` with time as x; its threshold is in MB/s.
    pub timed_detector: DetectorConfig,
    pub leak_sample_interval: Duration,
    pub soft_limit: SoftLimitSettings,
    /// Where the HTTP API listens; None: no API.
    pub listen: Option<std::net::SocketAddr>,
    /// MEMTRACE_DEBUG_TOKEN; without it the protected endpoints answer 403.
    pub api_token: Option<crate::api::Token>,
}

impl Default for AgentSettings {
    fn default() -> Self {
        Self {
            selectors: Selectors::default(),
            load: LoadOptions::default(),
            mount_tracefs: true,
            poll_interval: Duration::from_millis(10),
            refresh_interval: Duration::from_secs(1),
            rescan_interval: Duration::from_secs(5),
            summary_interval: Duration::from_secs(30),
            requests: RequestSettings::default(),
            detector: DetectorConfig::default().with_warmup_samples(DEFAULT_WARMUP_REQUESTS),
            timed_detector: DetectorConfig {
                slope_threshold_mb: DEFAULT_TIMED_SLOPE_MB_PER_HOUR / 3600.0,
                window_size: 60,
                check_interval: 6,
                ..DetectorConfig::default()
            },
            leak_sample_interval: Duration::from_secs(10),
            soft_limit: SoftLimitSettings::default(),
            listen: None,
            api_token: None,
        }
    }
}

/// Requests a new worker serves before its trend is judged (imports,
/// caches filling): the plan judged from the first request.
pub const DEFAULT_WARMUP_REQUESTS: usize = 20;
/// Growth that counts as a leak for a worker fed by time rather than
/// requests: 60 MB per hour.
pub const DEFAULT_TIMED_SLOPE_MB_PER_HOUR: f64 = 60.0;

/// Agent-side counters.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct AgentCounters {
    pub events_received: u64,
    pub decode_errors: u64,
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
    last_leak_sample: Option<Instant>,
    pub enforcer: Enforcer,
}

pub type SharedState = Arc<Mutex<State>>;

pub struct Agent {
    state: SharedState,
    ring: RingBuf<MapData>,
    settings: AgentSettings,
    waiting_logged: Option<Instant>,
    api_listener: Option<std::net::TcpListener>,
}

impl Agent {
    /// Checks privileges and tracefs, loads and attaches the programs, and
    /// starts tracing every process already running that matches.
    pub fn start(settings: AgentSettings) -> Result<Self, AgentError> {
        if settings.selectors.is_empty() {
            return Err(AgentError::NoSelectors);
        }
        preflight::check_privileges()?;
        preflight::warn_if_no_btf();
        let tracefs = Tracefs::ensure(settings.mount_tracefs)?;
        let agent_pid = std::process::id();
        let mut load = settings.load.clone();
        load.report_all_execs = settings.selectors.needs_exec_reports();
        load.requests = check_request_probes(&load.requests)?;
        let (mut tracer, ring) = Tracer::load(&tracefs, agent_pid, &load)?;
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
            requests_traced: load.requests != crate::loader::RequestProbes::None,
            detector_config: settings.detector.clone(),
            timed_detector_config: settings.timed_detector.clone(),
            leak_sample_interval: settings.leak_sample_interval,
            last_leak_sample: None,
            enforcer: Enforcer::new(settings.soft_limit.clone(), agent_pid),
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
        let mut agent = Self {
            state: Arc::new(Mutex::new(state)),
            ring,
            settings,
            waiting_logged: None,
            api_listener,
        };
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
        let backend = Arc::new(crate::backend::AgentBackend::new(self.state.clone()));
        let app = crate::api::app(crate::api::ApiState::new(backend, token));
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
        let mut decoded = Vec::new();
        let mut errors = 0u64;
        while let Some(item) = self.ring.next() {
            match decode(&item) {
                Ok(ev) => decoded.push(ev),
                Err(_) => errors += 1,
            }
        }
        if decoded.is_empty() && errors == 0 {
            return 0;
        }
        let n = decoded.len();
        let mut state = lock(&self.state);
        state.counters.events_received += n as u64;
        state.counters.decode_errors += errors;
        for ev in decoded {
            state.handle(ev);
        }
        n
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
                mmap_bytes = w.stats.mmap_bytes,
                munmap_bytes = w.stats.munmap_bytes,
                brk_grow_bytes = w.stats.brk_grow_bytes,
                brk_shrink_bytes = w.stats.brk_shrink_bytes,
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
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = poll.tick() => { self.poll_events(); }
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

fn lock(state: &SharedState) -> MutexGuard<'_, State> {
    // A panic while holding the lock leaves consistent-enough data behind:
    // every update is a plain field write.
    state.lock().unwrap_or_else(|e| e.into_inner())
}

impl State {
    fn handle(&mut self, ev: KernelEvent) {
        match ev {
            KernelEvent::Fork(ev) => self.on_fork(&ev),
            KernelEvent::Exec(ev) => self.on_exec(&ev),
            KernelEvent::Exit(ev) => self.on_exit(&ev),
            KernelEvent::Rss(ev) => {
                if let Some(w) = self.registry.get_mut(ev.tgid) {
                    w.apply_kernel_rss(ev.bytes, ev.known);
                }
            }
            KernelEvent::Request(ev) => self.on_request(&ev),
        }
    }

    fn on_fork(&mut self, ev: &ProcessEvent) {
        if self.registry.contains(ev.tgid) {
            return;
        }
        let view = procinfo::view(ev.tgid).unwrap_or_else(|| ProcessView {
            pid: ev.tgid,
            ppid: ev.ppid,
            comm: c_str(&ev.comm),
            ..ProcessView::default()
        });
        let worker = Worker::new(&view, Origin::Fork, format!("child of {}", ev.ppid));
        self.attach(worker);
        // Forked while allocation sites are collected: the kernel already
        // collects its faults; its heap needs probes of its own.
        let collected = self
            .tracer
            .proc_stats(ev.tgid)
            .is_some_and(|s| s.flags & memtrace_common::PROC_FLAG_COLLECT != 0);
        if collected {
            self.tracer.attach_alloc_probes(ev.tgid);
        }
    }

    fn on_exec(&mut self, ev: &ProcessEvent) {
        let pid = ev.tgid;
        let filename = c_str(&ev.filename);
        let view = procinfo::view(pid).unwrap_or_else(|| ProcessView {
            pid,
            comm: c_str(&ev.comm),
            exe: Some(filename.clone().into()),
            ..ProcessView::default()
        });
        let reason = self.selectors.matches(&view);
        match (ev.watched, reason) {
            // Traced before, and still selected: a new program image.
            (1, Some(reason)) => {
                self.registry.forget(pid);
                let worker = Worker::new(&view, Origin::Exec, reason.to_string());
                info!(pid, name = %view.comm, filename = %filename, "traced process exec'd; following the new program");
                self.attach(worker);
            }
            // A traced child became something no selector asks for.
            (1, None) => {
                self.tracer.unwatch(pid);
                if self.registry.forget(pid).is_some() {
                    info!(pid, name = %view.comm, filename = %filename, "traced process exec'd a program no selector matches; no longer traced");
                }
            }
            // Matched by name in the kernel at exec.
            (2, reason) => {
                let reason = reason.map_or_else(|| "name".to_string(), |r| r.to_string());
                self.attach(Worker::new(&view, Origin::Exec, reason));
            }
            // Reported for the agent to match (--exe, --cmdline).
            (_, Some(reason)) => {
                if let Err(e) = self.tracer.watch(pid, 0) {
                    warn!(pid, error = %e, "cannot trace process: kernel map full?");
                    return;
                }
                self.attach(Worker::new(&view, Origin::Exec, reason.to_string()));
            }
            (_, None) => {}
        }
    }

    fn on_exit(&mut self, ev: &ProcessEvent) {
        let pid = ev.tgid;
        self.tracer.detach_alloc_probes(pid);
        let role = self.registry.role(pid);
        let Some(w) = self.registry.retire(pid, Some((ev.stats, ev.rss))) else {
            return;
        };
        let lifetime = w
            .exited_at
            .and_then(|t| t.duration_since(w.first_seen).ok())
            .unwrap_or_default();
        info!(
            pid,
            ppid = w.ppid,
            role = ?role,
            name = %w.name,
            rss_bytes = w.rss.resident(),
            faults = w.stats.faults,
            mmap_bytes = w.stats.mmap_bytes,
            brk_grow_bytes = w.stats.brk_grow_bytes,
            requests = w.stats.requests_ended,
            traced_secs = lifetime.as_secs_f64(),
            "worker exited"
        );
    }

    fn on_request(&mut self, ev: &memtrace_common::RequestEvent) {
        let settings = self.request_settings;
        let Some(w) = self.registry.get_mut(ev.tgid) else {
            return;
        };
        let record = RequestRecord::from_event(ev, w.requests.next_seq(), &w.rss, &settings);
        w.apply_kernel_rss(ev.rss_after, ev.known_after);
        record.log();
        let rss_mb = record.rss_after_bytes as f64 / MB;
        w.requests.push(record);
        let detection = w.detector.record_at(rss_mb, ev.end_ns as f64 / 1e9);
        if let Some(d) = detection {
            self.on_detection(ev.tgid, d);
        }
    }

    /// Acts on what a worker's detector reported.
    fn on_detection(&mut self, pid: u32, detection: Detection) {
        let Some(w) = self.registry.get_mut(pid) else {
            return;
        };
        match detection {
            Detection::LeakTrendDetected {
                slope_mb_per_unit,
                lower_bound,
                window,
                high_water_mark_mb,
                slope_mb_per_hour,
                axis,
                ..
            } => {
                w.leak_detections += 1;
                let state = w.detector.get_state();
                // The detector reports at every check while the trend lasts;
                // the first report of a worker's life is the news.
                macro_rules! report {
                    ($level:ident) => {
                        tracing::$level!(
                            pid,
                            name = %w.name,
                            slope_mb_per_unit,
                            slope_unit = axis.slope_unit(),
                            slope_lower_bound = lower_bound,
                            slope_mb_per_hour,
                            window,
                            high_water_mark_mb,
                            rss_mb = state.last_rss_mb,
                            forecast_requests_to_limit = state.forecast_requests_to_limit,
                            forecast_seconds_to_limit = state.forecast_seconds_to_limit,
                            detections = w.leak_detections,
                            "LEAK_TREND_DETECTED"
                        )
                    };
                }
                if w.leak_detections == 1 {
                    report!(warn);
                } else {
                    report!(debug);
                }
            }
            Detection::SoftLimitExceeded {
                rss_mb,
                soft_limit_mb,
            } => {
                let (ppid, name) = (w.ppid, w.name.clone());
                let procs = SystemProcesses {
                    tracer: &self.tracer,
                };
                match self.enforcer.request(
                    &procs,
                    pid,
                    ppid,
                    rss_mb,
                    soft_limit_mb,
                    Instant::now(),
                ) {
                    Ok(()) => warn!(
                        pid,
                        name = %name,
                        rss_mb,
                        soft_limit_mb,
                        target_pid = self.enforcer.target_of(pid, ppid),
                        "SOFT_LIMIT_EXCEEDED: graceful restart queued"
                    ),
                    Err(refused) => warn!(
                        pid,
                        name = %name,
                        rss_mb,
                        soft_limit_mb,
                        reason = %refused,
                        "SOFT_LIMIT_EXCEEDED: no restart possible"
                    ),
                }
            }
        }
    }

    /// Feeds detectors of workers without request boundaries, on time.
    fn sample_timed_detectors(&mut self) {
        if self.requests_traced {
            return;
        }
        let now = Instant::now();
        if self
            .last_leak_sample
            .is_some_and(|t| now.duration_since(t) < self.leak_sample_interval)
        {
            return;
        }
        self.last_leak_sample = Some(now);
        let secs = self.started.elapsed().as_secs_f64();
        let mut detections = Vec::new();
        for w in self.registry.alive_mut() {
            let rss_mb = w.rss.resident() as f64 / MB;
            if let Some(d) = w.detector.record_timed(rss_mb, secs) {
                detections.push((w.pid, d));
            }
        }
        for (pid, d) in detections {
            self.on_detection(pid, d);
        }
    }

    /// Lets the enforcer act on queued restarts.
    fn enforce(&mut self) {
        let mut procs = SystemProcesses {
            tracer: &self.tracer,
        };
        for outcome in self.enforcer.tick(&mut procs, Instant::now()) {
            log_outcome(&outcome);
        }
    }

    /// Adds a process to the model and logs it.
    fn attach(&mut self, mut worker: Worker) {
        let pid = worker.pid;
        worker.requests = RequestLog::new(self.request_settings.history);
        // A new worker (or a new program image) is judged from scratch.
        worker.detector = LeakDetector::new(if self.requests_traced {
            self.detector_config.clone()
        } else {
            self.timed_detector_config.clone()
        });
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
        if worker.origin != Origin::Fork
            && let Some(status) = procinfo::status_memory(pid)
        {
            worker.apply_seed(RssBreakdown::from_status(&status));
        }
        let (reason, origin, name, ppid) = (
            worker.reason.clone(),
            worker.origin,
            worker.name.clone(),
            worker.ppid,
        );
        self.registry.add(worker);
        self.refresh_one(pid);
        let role = self.registry.role(pid);
        let rss = self.registry.get(pid).map_or(0, |w| w.rss.resident());
        info!(pid, ppid, role = ?role, name = %name, origin = ?origin, reason = %reason, rss_bytes = rss, "worker attached");
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
        w.stats = stats;
        if let Some(mm) = mm {
            w.apply_mm(&mm);
        }
        if w.needs_seed()
            && let Some(status) = procinfo::status_memory(pid)
        {
            w.apply_seed(RssBreakdown::from_status(&status));
        }
        true
    }

    fn refresh(&mut self) {
        for pid in self.registry.pids() {
            // /proc decides what is alive: an exit event can be lost (ring
            // buffer full), or come before the process was watched.
            let start = self.registry.get(pid).map_or(0, |w| w.start_time);
            if !procinfo::same_process(pid, start) {
                self.tracer.unwatch(pid);
                if let Some(w) = self.registry.retire(pid, None) {
                    info!(pid, name = %w.name, "worker exited (noticed in /proc)");
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
        let counters = self.tracer.counters();
        self.report_drops(&counters);
        self.sample_timed_detectors();
        self.enforce();
    }

    fn report_drops(&mut self, counters: &KernelCounters) {
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
    fn rescan(&mut self) -> usize {
        // A process the kernel already watches has its fork or exec event on
        // the way, unless events were ever dropped.
        let events_complete = self.tracer.counters().ringbuf_drops == 0;
        let views: Vec<ProcessView> = procinfo::all_pids()
            .into_iter()
            .filter(|&pid| pid != self.agent_pid && !self.registry.contains(pid))
            .filter(|&pid| !(events_complete && self.tracer.proc_stats(pid).is_some()))
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
                if self.registry.contains(view.ppid) {
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

/// Checks uprobe targets (binary and symbol) before anything is attached, and
/// resolves bare library names to paths.
fn check_request_probes(
    probes: &crate::loader::RequestProbes,
) -> Result<crate::loader::RequestProbes, AgentError> {
    use crate::{loader::RequestProbes, uprobes::check_target};
    Ok(match probes {
        RequestProbes::Function(t) => RequestProbes::Function(check_target(t)?),
        RequestProbes::BeginEnd { begin, end } => RequestProbes::BeginEnd {
            begin: check_target(begin)?,
            end: check_target(end)?,
        },
        other => other.clone(),
    })
}

const MB: f64 = 1024.0 * 1024.0;

/// Processes as the enforcer sees them: /proc for identity, the kernel maps
/// for requests in flight, kill(2) for signals.
struct SystemProcesses<'a> {
    tracer: &'a Tracer,
}

impl Processes for SystemProcesses<'_> {
    fn start_time(&self, pid: u32) -> Option<u64> {
        procinfo::start_time(pid)
    }

    fn in_flight(&self, pid: u32) -> u64 {
        self.tracer
            .proc_stats(pid)
            .map_or(0, |s| s.requests_in_flight())
    }

    fn kill(&mut self, pid: u32, signal: nix::sys::signal::Signal) -> Result<(), String> {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal)
            .map_err(|e| e.to_string())
    }
}

/// An agent running on a thread of its own, with its own runtime: for the
/// demo and the end-to-end tests, which drive a workload meanwhile.
pub struct BackgroundAgent {
    state: SharedState,
    api_addr: Option<std::net::SocketAddr>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BackgroundAgent {
    pub fn start(settings: AgentSettings) -> Result<Self, AgentError> {
        Ok(Self::run(Agent::start(settings)?))
    }

    /// Runs an agent already started.
    pub fn run(agent: Agent) -> Self {
        let state = agent.state();
        let api_addr = agent.api_addr();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("memtrace-agent".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a current-thread runtime");
                runtime.block_on(agent.run(async move {
                    let _ = stopped.await;
                }));
            })
            .expect("spawn the agent thread");
        Self {
            state,
            api_addr,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    pub fn state(&self) -> SharedState {
        self.state.clone()
    }

    pub fn api_addr(&self) -> Option<std::net::SocketAddr> {
        self.api_addr
    }

    /// Runs `f` on the agent's state.
    pub fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        f(&mut lock(&self.state))
    }

    /// Stops the agent and waits until every program is detached.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for BackgroundAgent {
    fn drop(&mut self) {
        self.shutdown();
    }
}
