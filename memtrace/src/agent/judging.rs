//! Acting on what the judges say: detections logged, detectors of workers
//! without request boundaries fed on time, soft-limit restarts carried out.
use std::time::Instant;

use tracing::{info, warn};

use super::state::{MB, State};
use crate::{
    judge::{
        detector::Detection,
        servers::{self, ServerKind, ServerProcess},
        softlimit::{OverLimit, Processes, SoftLimitMetric, log_recycle},
    },
    kernel::loader::Tracer,
    model::{procinfo, routes::Kept, workers::Registry},
};

impl State {
    /// Acts on what a worker's detector reported.
    pub(super) fn on_detection(&mut self, pid: u32, detection: Detection) {
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
                // Socket mode with HTTP paths: which endpoint carries it.
                let route = w.requests.routes.leak_route();
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
                            route = route.as_ref().map(|r| r.route.as_str()),
                            route_kept_bytes_per_request =
                                route.as_ref().map(|r| r.kept_per_request.bytes),
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
            } => self.over_soft_limit(pid, rss_mb, soft_limit_mb),
        }
    }

    /// A worker's live descendants (child processes never reaped: browsers
    /// a view never closed) or open descriptors grow per request. Logged
    /// like a leak trend, as CHILD_LEAK_DETECTED or FD_LEAK_DETECTED, with
    /// the route whose requests leave them.
    pub(super) fn on_kept_detection(&mut self, pid: u32, kind: Kept, detection: Detection) {
        let Detection::LeakTrendDetected {
            slope_mb_per_unit,
            lower_bound,
            window,
            ..
        } = detection
        else {
            return;
        };
        let Some(w) = self.registry.get_mut(pid) else {
            return;
        };
        let route = w.requests.routes.kept_route(kind);
        let route_name = route.as_ref().map(|r| r.0.as_str());
        let route_per_request = route.as_ref().map(|r| r.1);
        match kind {
            Kept::Children => {
                w.child_leak_detections += 1;
                let children = self.descendants.summary(pid, std::time::SystemTime::now());
                let first = w.child_leak_detections == 1;
                macro_rules! report {
                    ($level:ident) => {
                        tracing::$level!(
                            pid,
                            name = %w.name,
                            children_per_request = slope_mb_per_unit,
                            slope_lower_bound = lower_bound,
                            window,
                            children = children.count,
                            children_rss_bytes = children.rss_bytes,
                            children_names = ?children.names,
                            detections = w.child_leak_detections,
                            route = route_name,
                            route_children_per_request = route_per_request,
                            "CHILD_LEAK_DETECTED"
                        )
                    };
                }
                if first { report!(warn) } else { report!(debug) }
            }
            Kept::Tasks => {
                w.task_leak_detections += 1;
                let tasks = w.asyncio_tasks;
                let first = w.task_leak_detections == 1;
                macro_rules! report {
                    ($level:ident) => {
                        tracing::$level!(
                            pid,
                            name = %w.name,
                            tasks_per_request = slope_mb_per_unit,
                            slope_lower_bound = lower_bound,
                            window,
                            tasks,
                            detections = w.task_leak_detections,
                            route = route_name,
                            route_tasks_per_request = route_per_request,
                            "TASK_LEAK_DETECTED"
                        )
                    };
                }
                if first { report!(warn) } else { report!(debug) }
            }
            Kept::Fds => {
                w.fd_leak_detections += 1;
                let fds = w.requests.last().and_then(|r| r.fds);
                let first = w.fd_leak_detections == 1;
                macro_rules! report {
                    ($level:ident) => {
                        tracing::$level!(
                            pid,
                            name = %w.name,
                            fds_per_request = slope_mb_per_unit,
                            slope_lower_bound = lower_bound,
                            window,
                            fds,
                            detections = w.fd_leak_detections,
                            route = route_name,
                            route_fds_per_request = route_per_request,
                            "FD_LEAK_DETECTED"
                        )
                    };
                }
                if first { report!(warn) } else { report!(debug) }
            }
        }
    }

    /// A worker's RSS crossed the soft limit: queue its restart when its
    /// size in the limit's metric is over too, else watch it.
    fn over_soft_limit(&mut self, pid: u32, rss_mb: f64, soft_limit_mb: f64) {
        let metric = self.enforcer.settings().metric;
        let Some(start_time) = self.registry.get(pid).map(|w| w.start_time) else {
            return;
        };
        match self.soft_limit_measure(metric, pid, rss_mb) {
            Some(measure_mb) if measure_mb > soft_limit_mb => {
                self.queue_restart(pid, rss_mb, measure_mb, soft_limit_mb);
            }
            measure_mb => {
                // RSS counts pages shared copy-on-write with the master.
                info!(
                    pid,
                    rss_mb,
                    metric = metric.name(),
                    measure_mb,
                    soft_limit_mb,
                    "RSS is over the soft limit but the limit's metric is not: watching"
                );
                if !self.soft_limit_watch.contains(&(pid, start_time)) {
                    self.soft_limit_watch.push((pid, start_time));
                }
            }
        }
    }

    /// Workers whose RSS is over the soft limit but whose PSS or USS was
    /// not: measured again, and queued once they are over too.
    /// At most once per `--leak-sample-interval-secs`: each check walks the
    /// watched workers' page tables (smaps_rollup) under the state's lock.
    pub(super) fn check_soft_limit_watch(&mut self) {
        let now = Instant::now();
        if self.soft_limit_watch.is_empty()
            || self
                .last_watch_check
                .is_some_and(|t| now.duration_since(t) < self.leak_sample_interval)
        {
            return;
        }
        self.last_watch_check = Some(now);
        let metric = self.enforcer.settings().metric;
        let watched = std::mem::take(&mut self.soft_limit_watch);
        for (pid, start_time) in watched {
            let Some(w) = self
                .registry
                .get(pid)
                .filter(|w| w.start_time == start_time)
            else {
                continue;
            };
            let limit = w.detector.get_state().soft_limit_mb;
            let rss_mb = self.footprint_mb(pid);
            match self.soft_limit_measure(metric, pid, rss_mb) {
                Some(measure_mb) if measure_mb > limit => {
                    self.queue_restart(pid, rss_mb, measure_mb, limit);
                }
                Some(_) => self.soft_limit_watch.push((pid, start_time)),
                None => {}
            }
        }
    }

    fn queue_restart(&mut self, pid: u32, rss_mb: f64, measure_mb: f64, soft_limit_mb: f64) {
        let Some(w) = self.registry.get(pid) else {
            return;
        };
        let (ppid, name) = (w.ppid, w.name.clone());
        let server = self.server_of(pid);
        let over = OverLimit {
            worker_pid: pid,
            parent_pid: ppid,
            server,
            measure_mb,
            rss_mb,
            soft_limit_mb,
        };
        let procs = SystemProcesses {
            tracer: &self.tracer,
            registry: &self.registry,
        };
        let metric = self.enforcer.settings().metric.name();
        match self.enforcer.request(&procs, &over, Instant::now()) {
            Ok(plan) => warn!(
                pid,
                name = %name,
                server = %server,
                rss_mb,
                metric,
                measure_mb,
                soft_limit_mb,
                action = ?plan.action,
                target_pid = plan.target_pid(pid, ppid),
                signal = plan.signal.as_str(),
                log_only_because = plan.log_only_because.as_deref(),
                "SOFT_LIMIT_EXCEEDED: graceful restart queued"
            ),
            Err(refused) => warn!(
                pid,
                name = %name,
                server = %server,
                rss_mb,
                soft_limit_mb,
                reason = %refused,
                "SOFT_LIMIT_EXCEEDED: no restart possible"
            ),
        }
    }

    /// The server a worker belongs to, from its process and its master's,
    /// read afresh (servers retitle their processes after fork).
    fn server_of(&self, pid: u32) -> ServerKind {
        // (comm, exe, cmdline) of a live traced process.
        let facts = |pid: u32| {
            let w = self.registry.get(pid).filter(|w| w.alive())?;
            Some(match procinfo::view(pid) {
                Some(v) => (
                    v.comm,
                    v.exe.map(|e| e.display().to_string()),
                    v.cmdline.join(" "),
                ),
                None => (w.name.clone(), w.exe.clone(), w.cmdline.clone()),
            })
        };
        fn as_process(
            (comm, exe, cmdline): &(String, Option<String>, String),
        ) -> ServerProcess<'_> {
            ServerProcess {
                comm,
                exe: exe.as_deref(),
                cmdline,
            }
        }
        let Some(worker) = facts(pid) else {
            return ServerKind::Unknown;
        };
        let master = self.registry.get(pid).and_then(|w| facts(w.ppid));
        servers::detect(
            &as_process(&worker),
            master.as_ref().map(as_process).as_ref(),
        )
    }

    /// Feeds detectors of workers without request boundaries, on time.
    pub(super) fn sample_timed_detectors(&mut self) {
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

    /// Lets the enforcer act on queued restarts and follow signalled workers.
    pub(super) fn enforce(&mut self) {
        let mut procs = SystemProcesses {
            tracer: &self.tracer,
            registry: &self.registry,
        };
        for recycle in self.enforcer.tick(&mut procs, Instant::now()) {
            log_recycle(&recycle);
        }
    }
}

impl State {
    /// The worker's size in the limit's metric: `rss_mb` as given (RSS
    /// from the kernel's counters, with its descendants' when the limit
    /// counts them), PSS or USS from smaps_rollup, its descendants' added
    /// when the limit counts them (None when the worker is gone).
    fn soft_limit_measure(&self, metric: SoftLimitMetric, pid: u32, rss_mb: f64) -> Option<f64> {
        let of = |p: u32| {
            procinfo::smaps_rollup(p).map(|r| match metric {
                SoftLimitMetric::Pss => r.pss,
                _ => r.uss,
            })
        };
        match metric {
            SoftLimitMetric::Rss => Some(rss_mb),
            SoftLimitMetric::Pss | SoftLimitMetric::Uss => {
                let own = of(pid)?;
                let children: u64 = if self.soft_limit_children {
                    self.descendants.of(pid).filter_map(|d| of(d.pid)).sum()
                } else {
                    0
                };
                Some((own + children) as f64 / MB)
            }
        }
    }

    /// A worker's RSS in MB, with its descendants' when the soft limit
    /// counts them (`--soft-limit-include-children`).
    pub(super) fn footprint_mb(&self, pid: u32) -> f64 {
        let own = self.registry.get(pid).map_or(0, |w| w.rss.resident());
        let children: u64 = if self.soft_limit_children {
            self.descendants.of(pid).map(|d| d.rss_bytes).sum()
        } else {
            0
        };
        (own + children) as f64 / MB
    }

    /// `--soft-limit-include-children`: a worker whose RSS with its
    /// descendants' is over the soft limit is judged as one over it, once
    /// per worker (its own RSS alone trips the detector's limit as usual).
    pub(super) fn check_footprints(&mut self) {
        if !self.soft_limit_children {
            return;
        }
        let over: Vec<(u32, f64, f64)> = self
            .registry
            .alive()
            .filter(|w| !w.footprint_fired && !w.detector.soft_limit_fired())
            .filter(|w| self.descendants.of(w.pid).next().is_some())
            .map(|w| {
                (
                    w.pid,
                    self.footprint_mb(w.pid),
                    w.detector.config().soft_limit_mb,
                )
            })
            .filter(|(_, footprint, limit)| footprint > limit)
            .collect();
        for (pid, footprint_mb, limit) in over {
            if let Some(w) = self.registry.get_mut(pid) {
                w.footprint_fired = true;
            }
            let children = self.descendants.summary(pid, std::time::SystemTime::now());
            warn!(
                pid,
                footprint_mb,
                children = children.count,
                children_rss_bytes = children.rss_bytes,
                soft_limit_mb = limit,
                "SOFT_LIMIT_EXCEEDED: the worker and the processes it started"
            );
            self.over_soft_limit(pid, footprint_mb, limit);
        }
    }
}

/// Processes as the enforcer sees them: /proc for identity, the kernel maps
/// for requests in flight, the worker model for children, kill(2) for
/// signals.
struct SystemProcesses<'a> {
    tracer: &'a Tracer,
    registry: &'a Registry,
}

impl Processes for SystemProcesses<'_> {
    fn start_time(&self, pid: u32) -> Option<u64> {
        procinfo::start_time(pid)
    }

    fn in_flight(&self, pid: u32) -> u64 {
        self.tracer
            .kernel_stats(pid)
            .map_or(0, |s| s.requests_in_flight())
    }

    fn children(&self, pid: u32) -> Vec<u32> {
        self.registry
            .alive()
            .filter(|w| w.ppid == pid)
            .map(|w| w.pid)
            .collect()
    }

    fn kill(&mut self, pid: u32, signal: nix::sys::signal::Signal) -> Result<(), String> {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal)
            .map_err(|e| e.to_string())
    }
}
