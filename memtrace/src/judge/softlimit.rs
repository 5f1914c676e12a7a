//! Soft-limit enforcement: when a worker's RSS crosses the soft limit, ask
//! for a graceful restart, once per worker lifetime, safely.
//!
//! The default is the plan's: SIGHUP to the worker's parent (a gunicorn
//! master replaces its workers on SIGHUP). Before any signal: the target is
//! confirmed to be the same process (pid and start time), never pid 1 and
//! never the agent; the worker gets a bounded wait to finish the requests in
//! flight; and actions across all workers are spaced by a minimum interval
//! plus jitter, so a fleet-wide leak cannot start a restart storm.
use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;
use serde::Serialize;

/// What to do when a worker crosses its soft limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SoftLimitAction {
    /// Send the signal to the target.
    Signal,
    /// Only log (dry run).
    Log,
}

/// Who receives the signal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SoftLimitTarget {
    /// The worker's parent (the master), as the plan did.
    Parent,
    /// The worker itself (servers whose workers exit gracefully on a signal).
    Worker,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SoftLimitSettings {
    pub action: SoftLimitAction,
    pub target: SoftLimitTarget,
    pub signal: Signal,
    /// Least time between two actions, across all workers.
    pub min_interval: Duration,
    /// Up to this much random time is added to each interval.
    pub jitter: Duration,
    /// How long to wait for the worker's requests in flight to finish.
    pub drain_timeout: Duration,
}

impl Default for SoftLimitSettings {
    fn default() -> Self {
        Self {
            action: SoftLimitAction::Signal,
            target: SoftLimitTarget::Parent,
            signal: Signal::SIGHUP,
            min_interval: Duration::from_secs(30),
            jitter: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(10),
        }
    }
}

/// Parses a signal name (`HUP`, `SIGHUP`, `hup`) or number.
pub fn parse_signal(s: &str) -> Result<Signal, String> {
    let t = s.trim();
    if let Ok(n) = t.parse::<i32>() {
        return Signal::try_from(n).map_err(|_| format!("{n} is not a signal number"));
    }
    let upper = t.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    name.parse::<Signal>()
        .map_err(|_| format!("`{s}` is not a signal name (e.g. HUP, TERM, USR1)"))
}

/// What the enforcer needs to know about processes, and how it signals them.
/// The agent implements it over /proc and the kernel maps; tests fake it.
pub trait Processes {
    /// Start time (clock ticks after boot) of a live pid, None if gone.
    fn start_time(&self, pid: u32) -> Option<u64>;
    /// Requests the worker has in flight now.
    fn in_flight(&self, pid: u32) -> u64;
    fn kill(&mut self, pid: u32, signal: Signal) -> Result<(), String>;
}

/// A restart asked for and not yet done.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PendingRestart {
    pub worker_pid: u32,
    pub worker_start_time: u64,
    pub target_pid: u32,
    pub target_start_time: u64,
    pub rss_mb: f64,
    pub soft_limit_mb: f64,
    #[serde(skip)]
    pub requested_at: Instant,
}

/// What happened to a pending restart, for the log and the metrics.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// The signal was sent.
    Signalled {
        worker_pid: u32,
        target_pid: u32,
        signal: String,
        rss_mb: f64,
        soft_limit_mb: f64,
        waited_ms: u64,
        in_flight_at_signal: u64,
    },
    /// Log-only mode: what would have been sent.
    Logged {
        worker_pid: u32,
        target_pid: u32,
        signal: String,
        rss_mb: f64,
        soft_limit_mb: f64,
    },
    /// Not sent, and why (worker gone, target changed, unsafe target, error).
    Skipped {
        worker_pid: u32,
        target_pid: u32,
        reason: String,
    },
}

/// Why a restart cannot even be queued.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RefusedTarget {
    #[error("target pid {0} is init or the kernel")]
    Init(u32),
    #[error("target pid {0} is memtrace itself")]
    Agent(u32),
    #[error("target pid {0} is gone")]
    Gone(u32),
}

/// Queue of restarts, rate-limited across workers.
pub struct Enforcer {
    settings: SoftLimitSettings,
    agent_pid: u32,
    queue: VecDeque<PendingRestart>,
    next_allowed: Option<Instant>,
    rng: u64,
    pub actions_taken: u64,
    pub actions_skipped: u64,
}

impl Enforcer {
    pub fn new(settings: SoftLimitSettings, agent_pid: u32) -> Self {
        // A seed that differs between agents on different nodes, for jitter.
        let seed = (agent_pid as u64) << 32
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
            | 1;
        Self {
            settings,
            agent_pid,
            queue: VecDeque::new(),
            next_allowed: None,
            rng: seed,
            actions_taken: 0,
            actions_skipped: 0,
        }
    }

    pub fn settings(&self) -> &SoftLimitSettings {
        &self.settings
    }

    pub fn pending(&self) -> impl Iterator<Item = &PendingRestart> {
        self.queue.iter()
    }

    /// Which pid a worker's restart goes to.
    pub fn target_of(&self, worker_pid: u32, parent_pid: u32) -> u32 {
        match self.settings.target {
            SoftLimitTarget::Parent => parent_pid,
            SoftLimitTarget::Worker => worker_pid,
        }
    }

    /// Queues a restart for a worker that crossed its limit. The target's
    /// start time is taken now, so a recycled pid is never signalled later.
    pub fn request(
        &mut self,
        procs: &impl Processes,
        worker_pid: u32,
        parent_pid: u32,
        rss_mb: f64,
        soft_limit_mb: f64,
        now: Instant,
    ) -> Result<(), RefusedTarget> {
        let target_pid = self.target_of(worker_pid, parent_pid);
        check_target(target_pid, self.agent_pid)?;
        let target_start_time = procs
            .start_time(target_pid)
            .ok_or(RefusedTarget::Gone(target_pid))?;
        let worker_start_time = procs
            .start_time(worker_pid)
            .ok_or(RefusedTarget::Gone(worker_pid))?;
        if self.queue.iter().any(|p| p.worker_pid == worker_pid) {
            return Ok(());
        }
        self.queue.push_back(PendingRestart {
            worker_pid,
            worker_start_time,
            target_pid,
            target_start_time,
            rss_mb,
            soft_limit_mb,
            requested_at: now,
        });
        Ok(())
    }

    /// Acts on the queue: at most one action per call, and only when the
    /// rate limit allows it. Pending restarts whose worker is gone are
    /// dropped (a master restart replaced it already).
    pub fn tick(&mut self, procs: &mut impl Processes, now: Instant) -> Vec<Outcome> {
        let mut out = Vec::new();
        // Drop restarts that are no longer needed or no longer safe.
        self.queue.retain(|p| {
            if procs.start_time(p.worker_pid) != Some(p.worker_start_time) {
                out.push(Outcome::Skipped {
                    worker_pid: p.worker_pid,
                    target_pid: p.target_pid,
                    reason: "worker exited before its restart was due".into(),
                });
                return false;
            }
            true
        });
        self.actions_skipped += out.len() as u64;
        if self.next_allowed.is_some_and(|t| now < t) {
            return out;
        }
        let Some(head) = self.queue.front() else {
            return out;
        };
        let in_flight = procs.in_flight(head.worker_pid);
        let waited = now.saturating_duration_since(head.requested_at);
        if in_flight > 0 && waited < self.settings.drain_timeout {
            return out;
        }
        let p = self.queue.pop_front().expect("front exists");
        let outcome = self.act(procs, &p, in_flight, waited);
        match outcome {
            Outcome::Skipped { .. } => self.actions_skipped += 1,
            _ => {
                self.actions_taken += 1;
                let jitter = self.jitter();
                self.next_allowed = Some(now + self.settings.min_interval + jitter);
            }
        }
        out.push(outcome);
        out
    }

    fn act(
        &self,
        procs: &mut impl Processes,
        p: &PendingRestart,
        in_flight: u64,
        waited: Duration,
    ) -> Outcome {
        let skipped = |reason: String| Outcome::Skipped {
            worker_pid: p.worker_pid,
            target_pid: p.target_pid,
            reason,
        };
        if let Err(e) = check_target(p.target_pid, self.agent_pid) {
            return skipped(e.to_string());
        }
        // Confirmed just before the signal: the same process, not a recycled pid.
        if procs.start_time(p.target_pid) != Some(p.target_start_time) {
            return skipped(format!(
                "target pid {} is no longer the process it was (exited or pid reused)",
                p.target_pid
            ));
        }
        let signal = self.settings.signal.as_str().to_string();
        match self.settings.action {
            SoftLimitAction::Log => Outcome::Logged {
                worker_pid: p.worker_pid,
                target_pid: p.target_pid,
                signal,
                rss_mb: p.rss_mb,
                soft_limit_mb: p.soft_limit_mb,
            },
            SoftLimitAction::Signal => match procs.kill(p.target_pid, self.settings.signal) {
                Ok(()) => Outcome::Signalled {
                    worker_pid: p.worker_pid,
                    target_pid: p.target_pid,
                    signal,
                    rss_mb: p.rss_mb,
                    soft_limit_mb: p.soft_limit_mb,
                    waited_ms: waited.as_millis() as u64,
                    in_flight_at_signal: in_flight,
                },
                Err(e) => skipped(format!("sending {signal} failed: {e}")),
            },
        }
    }

    /// Uniform in [0, jitter], from xorshift64.
    fn jitter(&mut self) -> Duration {
        let max = self.settings.jitter.as_millis() as u64;
        if max == 0 {
            return Duration::ZERO;
        }
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        Duration::from_millis(self.rng % (max + 1))
    }
}

fn check_target(pid: u32, agent_pid: u32) -> Result<(), RefusedTarget> {
    if pid <= 1 {
        return Err(RefusedTarget::Init(pid));
    }
    if pid == agent_pid {
        return Err(RefusedTarget::Agent(pid));
    }
    Ok(())
}

/// Logs an outcome as a structured event.
pub fn log_outcome(outcome: &Outcome) {
    match outcome {
        Outcome::Signalled {
            worker_pid,
            target_pid,
            signal,
            rss_mb,
            soft_limit_mb,
            waited_ms,
            in_flight_at_signal,
        } => tracing::warn!(
            pid = worker_pid,
            target_pid,
            signal = %signal,
            rss_mb,
            soft_limit_mb,
            waited_ms,
            in_flight_at_signal,
            "SOFT_LIMIT_EXCEEDED: graceful restart requested"
        ),
        Outcome::Logged {
            worker_pid,
            target_pid,
            signal,
            rss_mb,
            soft_limit_mb,
        } => tracing::warn!(
            pid = worker_pid,
            target_pid,
            signal = %signal,
            rss_mb,
            soft_limit_mb,
            "SOFT_LIMIT_EXCEEDED: log-only mode, no signal sent"
        ),
        Outcome::Skipped {
            worker_pid,
            target_pid,
            reason,
        } => {
            tracing::info!(pid = worker_pid, target_pid, reason = %reason, "soft-limit restart skipped")
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[derive(Default)]
    struct Fake {
        start: HashMap<u32, u64>,
        in_flight: HashMap<u32, u64>,
        sent: Vec<(u32, Signal)>,
    }

    impl Processes for Fake {
        fn start_time(&self, pid: u32) -> Option<u64> {
            self.start.get(&pid).copied()
        }
        fn in_flight(&self, pid: u32) -> u64 {
            self.in_flight.get(&pid).copied().unwrap_or(0)
        }
        fn kill(&mut self, pid: u32, signal: Signal) -> Result<(), String> {
            self.sent.push((pid, signal));
            Ok(())
        }
    }

    fn fake() -> Fake {
        let mut f = Fake::default();
        for (pid, start) in [(100, 1), (101, 2), (102, 3), (103, 4)] {
            f.start.insert(pid, start);
        }
        f
    }

    fn settings() -> SoftLimitSettings {
        SoftLimitSettings {
            jitter: Duration::ZERO,
            min_interval: Duration::from_secs(30),
            ..Default::default()
        }
    }

    #[test]
    fn sighup_to_the_parent_by_default() {
        let mut f = fake();
        let mut e = Enforcer::new(SoftLimitSettings::default(), 999);
        let t0 = Instant::now();
        e.request(&f, 101, 100, 460.0, 450.0, t0).unwrap();
        let out = e.tick(&mut f, t0);
        assert!(
            matches!(
                out[..],
                [Outcome::Signalled {
                    target_pid: 100,
                    ..
                }]
            ),
            "{out:?}"
        );
        assert_eq!(f.sent, vec![(100, Signal::SIGHUP)]);
    }

    #[test]
    fn never_init_or_the_agent() {
        let f = fake();
        let mut e = Enforcer::new(settings(), 100);
        let t0 = Instant::now();
        assert_eq!(
            e.request(&f, 101, 1, 1.0, 0.5, t0),
            Err(RefusedTarget::Init(1))
        );
        assert_eq!(
            e.request(&f, 101, 0, 1.0, 0.5, t0),
            Err(RefusedTarget::Init(0))
        );
        assert_eq!(
            e.request(&f, 101, 100, 1.0, 0.5, t0),
            Err(RefusedTarget::Agent(100))
        );
    }

    #[test]
    fn a_recycled_target_pid_is_not_signalled() {
        let mut f = fake();
        let mut e = Enforcer::new(settings(), 999);
        let t0 = Instant::now();
        e.request(&f, 101, 100, 460.0, 450.0, t0).unwrap();
        f.start.insert(100, 77); // the master died and its pid was reused
        let out = e.tick(&mut f, t0);
        assert!(matches!(out[..], [Outcome::Skipped { .. }]), "{out:?}");
        assert!(f.sent.is_empty());
    }

    #[test]
    fn waits_for_requests_in_flight_but_not_forever() {
        let mut f = fake();
        f.in_flight.insert(101, 2);
        let mut e = Enforcer::new(settings(), 999);
        let t0 = Instant::now();
        e.request(&f, 101, 100, 460.0, 450.0, t0).unwrap();
        assert!(e.tick(&mut f, t0 + Duration::from_secs(1)).is_empty());
        f.in_flight.insert(101, 0);
        let out = e.tick(&mut f, t0 + Duration::from_secs(2));
        assert!(
            matches!(
                out[..],
                [Outcome::Signalled {
                    waited_ms: 2000,
                    ..
                }]
            ),
            "{out:?}"
        );

        // Stuck requests: acted on after the drain timeout.
        let mut f = fake();
        f.in_flight.insert(102, 1);
        let mut e = Enforcer::new(settings(), 999);
        e.request(&f, 102, 100, 460.0, 450.0, t0).unwrap();
        assert!(e.tick(&mut f, t0 + Duration::from_secs(9)).is_empty());
        let out = e.tick(&mut f, t0 + Duration::from_secs(10));
        assert!(matches!(
            out[..],
            [Outcome::Signalled {
                in_flight_at_signal: 1,
                ..
            }]
        ));
    }

    #[test]
    fn actions_across_workers_are_rate_limited() {
        let mut f = fake();
        let mut e = Enforcer::new(
            SoftLimitSettings {
                target: SoftLimitTarget::Worker,
                signal: Signal::SIGTERM,
                ..settings()
            },
            999,
        );
        let t0 = Instant::now();
        for w in [101, 102, 103] {
            e.request(&f, w, 100, 460.0, 450.0, t0).unwrap();
        }
        let mut times = Vec::new();
        for s in 0..120 {
            let now = t0 + Duration::from_secs(s);
            for o in e.tick(&mut f, now) {
                if matches!(o, Outcome::Signalled { .. }) {
                    times.push(s);
                }
            }
        }
        assert_eq!(times, vec![0, 30, 60]);
        assert_eq!(
            f.sent,
            vec![
                (101, Signal::SIGTERM),
                (102, Signal::SIGTERM),
                (103, Signal::SIGTERM)
            ]
        );
    }

    #[test]
    fn a_worker_replaced_meanwhile_needs_no_restart() {
        let mut f = fake();
        let mut e = Enforcer::new(settings(), 999);
        let t0 = Instant::now();
        e.request(&f, 101, 100, 460.0, 450.0, t0).unwrap();
        e.request(&f, 102, 100, 460.0, 450.0, t0).unwrap();
        assert_eq!(e.tick(&mut f, t0).len(), 1);
        // The master's restart replaced every worker.
        f.start.remove(&102);
        let out = e.tick(&mut f, t0 + Duration::from_secs(60));
        assert!(
            matches!(
                out[..],
                [Outcome::Skipped {
                    worker_pid: 102,
                    ..
                }]
            ),
            "{out:?}"
        );
        assert_eq!(f.sent.len(), 1);
    }

    #[test]
    fn log_mode_sends_nothing() {
        let mut f = fake();
        let mut e = Enforcer::new(
            SoftLimitSettings {
                action: SoftLimitAction::Log,
                ..settings()
            },
            999,
        );
        let t0 = Instant::now();
        e.request(&f, 101, 100, 460.0, 450.0, t0).unwrap();
        assert!(matches!(e.tick(&mut f, t0)[..], [Outcome::Logged { .. }]));
        assert!(f.sent.is_empty());
    }

    #[test]
    fn jitter_stays_within_bounds() {
        let mut e = Enforcer::new(
            SoftLimitSettings {
                jitter: Duration::from_secs(5),
                ..settings()
            },
            999,
        );
        for _ in 0..1000 {
            assert!(e.jitter() <= Duration::from_secs(5));
        }
    }

    #[test]
    fn signal_names() {
        assert_eq!(parse_signal("HUP"), Ok(Signal::SIGHUP));
        assert_eq!(parse_signal("sigterm"), Ok(Signal::SIGTERM));
        assert_eq!(parse_signal("10"), Ok(Signal::SIGUSR1));
        assert!(parse_signal("NOPE").is_err());
        assert!(parse_signal("999").is_err());
    }
}
