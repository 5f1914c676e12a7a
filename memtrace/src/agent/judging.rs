//! Acting on what the judges say: detections logged, detectors of workers
//! without request boundaries fed on time, soft-limit restarts carried out.
use std::time::Instant;

use tracing::warn;

use super::state::{MB, State};
use crate::{
    judge::{
        detector::Detection,
        softlimit::{Processes, log_outcome},
    },
    kernel::loader::Tracer,
    model::procinfo,
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

    /// Lets the enforcer act on queued restarts.
    pub(super) fn enforce(&mut self) {
        let mut procs = SystemProcesses {
            tracer: &self.tracer,
        };
        for outcome in self.enforcer.tick(&mut procs, Instant::now()) {
            log_outcome(&outcome);
        }
    }
}

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
