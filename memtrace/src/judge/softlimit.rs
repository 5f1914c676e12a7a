//! Soft-limit enforcement: when a worker crosses the soft limit, retire that
//! one worker the way its server does it, once per worker lifetime, safely.
//!
//! The server is recognised from the worker and its master
//! ([`super::servers`]); its preset says which signal retires one worker
//! gracefully and how long it may take. `--soft-limit-action`, `-target`
//! and `-signal` override the preset; a server memtrace does not know, with
//! no explicit signal, is only logged. Before any signal: the target is
//! confirmed to be the same process (pid and start time), never pid 1 and
//! never the agent; the worker gets a bounded wait to finish the requests in
//! flight; actions across all workers are spaced by a minimum interval plus
//! jitter, the largest worker first. After the signal the worker is
//! followed until it leaves and its replacement appears, with an optional
//! escalation when it does not leave in time.
use std::{
    collections::{BTreeMap, VecDeque},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use nix::sys::signal::Signal;
use serde::Serialize;

// The target is part of a server's preset; it is named here too.
use super::servers::ServerKind;
pub use super::servers::SoftLimitTarget;

/// What to do when a worker crosses its soft limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SoftLimitAction {
    /// Send the signal to the target.
    Signal,
    /// Only log (dry run).
    Log,
}

/// Which memory the limit is on.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize, Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum SoftLimitMetric {
    /// Resident set size, as the plan: counts pages shared copy-on-write
    /// with the master in every worker.
    #[default]
    Rss,
    /// Proportional set size: shared pages divided among their sharers.
    Pss,
    /// Unique set size: pages no other process maps.
    Uss,
}

impl SoftLimitMetric {
    pub fn name(self) -> &'static str {
        match self {
            Self::Rss => "rss",
            Self::Pss => "pss",
            Self::Uss => "uss",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct SoftLimitSettings {
    /// None: from the server's preset (log only for an unknown server).
    pub action: Option<SoftLimitAction>,
    /// None: from the preset.
    pub target: Option<SoftLimitTarget>,
    /// None: from the preset.
    pub signal: Option<Signal>,
    pub metric: SoftLimitMetric,
    /// Least time between two actions, across all workers.
    pub min_interval: Duration,
    /// Up to this much random time is added to each interval.
    pub jitter: Duration,
    /// How long to wait for the worker's requests in flight to finish.
    pub drain_timeout: Duration,
    /// How long a signalled worker may take to leave; None: the preset's.
    pub exit_timeout: Option<Duration>,
    /// Sent when the worker has not left after the exit timeout; None: no
    /// escalation (the default: servers escalate on their own).
    pub escalate_signal: Option<Signal>,
}

impl Default for SoftLimitSettings {
    fn default() -> Self {
        Self {
            action: None,
            target: None,
            signal: None,
            metric: SoftLimitMetric::Rss,
            min_interval: Duration::from_secs(30),
            jitter: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(10),
            exit_timeout: None,
            escalate_signal: None,
        }
    }
}

/// What is done for one worker: its server's preset with the explicit
/// settings over it.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub server: ServerKind,
    pub action: SoftLimitAction,
    pub target: SoftLimitTarget,
    pub signal: Signal,
    pub exit_timeout: Duration,
    pub escalate_signal: Option<Signal>,
    /// Why the plan only logs, when no one asked for that.
    pub log_only_because: Option<String>,
}

impl Plan {
    /// Who receives the signal for this worker.
    pub fn target_pid(&self, worker_pid: u32, parent_pid: u32) -> u32 {
        match self.target {
            SoftLimitTarget::Parent => parent_pid,
            SoftLimitTarget::Worker => worker_pid,
        }
    }
}

impl SoftLimitSettings {
    pub fn plan(&self, server: ServerKind) -> Plan {
        let preset = server.preset();
        let explicit = self.signal.is_some() || self.target.is_some();
        let (action, log_only_because) = match self.action {
            Some(a) => (a, None),
            None if preset.signal.is_some() || explicit => (SoftLimitAction::Signal, None),
            None => (
                SoftLimitAction::Log,
                Some(format!(
                    "{} ({server}): set --soft-limit-signal (and --soft-limit-target) to \
                     act, or --soft-limit-action log to only log",
                    preset
                        .no_signal_because
                        .unwrap_or("no graceful one-worker signal")
                )),
            ),
        };
        Plan {
            server,
            action,
            target: self.target.unwrap_or(preset.target),
            signal: self.signal.or(preset.signal).unwrap_or(Signal::SIGTERM),
            exit_timeout: self.exit_timeout.unwrap_or(preset.exit_timeout),
            escalate_signal: self.escalate_signal,
            log_only_because,
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
    /// Live children of a pid: a retired worker's replacement is a new one.
    fn children(&self, pid: u32) -> Vec<u32>;
    fn kill(&mut self, pid: u32, signal: Signal) -> Result<(), String>;
}

/// A worker over its limit, as the agent reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct OverLimit {
    pub worker_pid: u32,
    pub parent_pid: u32,
    pub server: ServerKind,
    /// The worker's size in the limit's metric.
    pub measure_mb: f64,
    pub rss_mb: f64,
    pub soft_limit_mb: f64,
}

/// A restart asked for and not yet done.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PendingRestart {
    pub worker_pid: u32,
    pub worker_start_time: u64,
    pub target_pid: u32,
    pub target_start_time: u64,
    pub server: ServerKind,
    pub action: SoftLimitAction,
    pub signal: String,
    pub metric: SoftLimitMetric,
    pub measure_mb: f64,
    pub rss_mb: f64,
    pub soft_limit_mb: f64,
    pub requested_unix: f64,
    #[serde(skip)]
    pub requested_at: Instant,
    #[serde(skip)]
    parent_pid: u32,
    #[serde(skip)]
    plan: Plan,
}

/// Where a worker's recycling stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RecycleState {
    /// Log-only: what would have been sent.
    Logged,
    /// Not sent, and why (worker gone, target changed, unsafe, error).
    Skipped,
    /// The signal was sent; waiting for the worker to leave.
    Signalled,
    /// Not gone after the exit timeout, and no escalation configured.
    TimedOut,
    /// Not gone after the exit timeout: the escalation signal was sent.
    Escalated,
    /// The worker left; waiting for its replacement.
    Exited,
    /// The worker left and its master started a replacement.
    Replaced,
}

impl RecycleState {
    pub fn name(self) -> &'static str {
        match self {
            Self::Logged => "logged",
            Self::Skipped => "skipped",
            Self::Signalled => "signalled",
            Self::TimedOut => "timed_out",
            Self::Escalated => "escalated",
            Self::Exited => "exited",
            Self::Replaced => "replaced",
        }
    }
}

/// One worker's recycling: what was done, when, and what came of it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Recycle {
    pub worker_pid: u32,
    pub worker_start_time: u64,
    pub server: ServerKind,
    pub action: SoftLimitAction,
    pub target_pid: u32,
    pub signal: String,
    pub metric: SoftLimitMetric,
    pub measure_mb: f64,
    pub rss_mb: f64,
    pub soft_limit_mb: f64,
    pub requested_unix: f64,
    pub acted_unix: f64,
    pub waited_ms: u64,
    pub in_flight_at_signal: u64,
    pub state: RecycleState,
    pub reason: Option<String>,
    /// Seconds from the signal to the worker's exit.
    pub exit_secs: Option<f64>,
    pub replacement_pid: Option<u32>,
    pub escalated_signal: Option<String>,
    #[serde(skip)]
    acted_at: Instant,
    #[serde(skip)]
    master_pid: u32,
    /// The master's children at the signal: a replacement is not among them.
    #[serde(skip)]
    siblings: Vec<u32>,
    #[serde(skip)]
    exit_timeout: Duration,
    #[serde(skip)]
    escalate_signal: Option<Signal>,
}

impl Recycle {
    /// Still followed: waiting for the exit or the replacement.
    fn open(&self, now: Instant) -> bool {
        match self.state {
            RecycleState::Signalled | RecycleState::TimedOut | RecycleState::Escalated => true,
            // A replacement comes soon or not at all (Apache keeps spares).
            RecycleState::Exited => {
                now.saturating_duration_since(self.acted_at) < 2 * self.exit_timeout
            }
            _ => false,
        }
    }
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

/// Recycles kept for the API, newest last.
const HISTORY: usize = 256;

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Queue of restarts, rate-limited across workers, and the recycles done.
pub struct Enforcer {
    settings: SoftLimitSettings,
    agent_pid: u32,
    queue: Vec<PendingRestart>,
    recycles: VecDeque<Recycle>,
    /// How often each (server, state) was reached, for /metrics.
    counts: BTreeMap<(ServerKind, RecycleState), u64>,
    next_allowed: Option<Instant>,
    rng: u64,
    pub actions_taken: u64,
    pub actions_skipped: u64,
}

impl Enforcer {
    pub fn new(settings: SoftLimitSettings, agent_pid: u32) -> Self {
        // A seed that differs between agents on different nodes, for jitter.
        let seed = (agent_pid as u64) << 32
            ^ SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
            | 1;
        Self {
            settings,
            agent_pid,
            queue: Vec::new(),
            recycles: VecDeque::new(),
            counts: BTreeMap::new(),
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

    /// Recycles done, oldest first (the last few hundred).
    pub fn recycles(&self) -> impl Iterator<Item = &Recycle> {
        self.recycles.iter()
    }

    /// The newest recycle of one worker lifetime.
    pub fn recycle_of(&self, worker_pid: u32, worker_start_time: u64) -> Option<&Recycle> {
        self.recycles
            .iter()
            .rev()
            .find(|r| r.worker_pid == worker_pid && r.worker_start_time == worker_start_time)
    }

    /// How often each state was reached, by server.
    pub fn counts(&self) -> impl Iterator<Item = (ServerKind, RecycleState, u64)> + '_ {
        self.counts.iter().map(|(&(k, s), &n)| (k, s, n))
    }

    /// Queues a restart for a worker that crossed its limit, and says what
    /// will be done. The target's start time is taken now, so a recycled pid
    /// is never signalled later.
    pub fn request(
        &mut self,
        procs: &impl Processes,
        over: &OverLimit,
        now: Instant,
    ) -> Result<Plan, RefusedTarget> {
        let plan = self.settings.plan(over.server);
        let target_pid = plan.target_pid(over.worker_pid, over.parent_pid);
        check_target(target_pid, self.agent_pid)?;
        let target_start_time = procs
            .start_time(target_pid)
            .ok_or(RefusedTarget::Gone(target_pid))?;
        let worker_start_time = procs
            .start_time(over.worker_pid)
            .ok_or(RefusedTarget::Gone(over.worker_pid))?;
        if !self.queue.iter().any(|p| p.worker_pid == over.worker_pid) {
            self.queue.push(PendingRestart {
                worker_pid: over.worker_pid,
                worker_start_time,
                target_pid,
                target_start_time,
                server: over.server,
                action: plan.action,
                signal: plan.signal.as_str().to_string(),
                metric: self.settings.metric,
                measure_mb: over.measure_mb,
                rss_mb: over.rss_mb,
                soft_limit_mb: over.soft_limit_mb,
                requested_unix: unix_now(),
                requested_at: now,
                parent_pid: over.parent_pid,
                plan: plan.clone(),
            });
        }
        Ok(plan)
    }

    /// A traced worker exited (from the kernel's exit event): timed here
    /// rather than at the next tick.
    pub fn worker_exited(&mut self, worker_pid: u32, now: Instant) -> Option<Recycle> {
        let r = self.recycles.iter_mut().rev().find(|r| {
            r.worker_pid == worker_pid
                && matches!(
                    r.state,
                    RecycleState::Signalled | RecycleState::TimedOut | RecycleState::Escalated
                )
        })?;
        mark_exited(r, now);
        let r = r.clone();
        self.count(&r);
        Some(r)
    }

    /// Acts on the queue and follows what was done: at most one new action
    /// per call, when the rate limit allows, the largest worker first.
    /// Returns every recycle whose state changed, for the log.
    pub fn tick(&mut self, procs: &mut impl Processes, now: Instant) -> Vec<Recycle> {
        let mut changed = Vec::new();
        // Drop restarts that are no longer needed (a master restart replaced
        // the worker already).
        let (gone, keep): (Vec<_>, Vec<_>) = self
            .queue
            .drain(..)
            .partition(|p| procs.start_time(p.worker_pid) != Some(p.worker_start_time));
        self.queue = keep;
        for p in gone {
            self.actions_skipped += 1;
            changed.push(self.record(
                &p,
                now,
                RecycleState::Skipped,
                Some("worker exited before its restart was due".into()),
                (0, 0),
                Vec::new(),
            ));
        }
        self.follow(procs, now, &mut changed);
        if self.next_allowed.is_some_and(|t| now < t) {
            return changed;
        }
        // Largest first; among equals, the first asked for.
        let Some(i) = (0..self.queue.len()).max_by(|&a, &b| {
            let (pa, pb) = (&self.queue[a], &self.queue[b]);
            pa.measure_mb
                .total_cmp(&pb.measure_mb)
                .then(pb.requested_at.cmp(&pa.requested_at))
                .then(b.cmp(&a))
        }) else {
            return changed;
        };
        let in_flight = procs.in_flight(self.queue[i].worker_pid);
        let waited = now.saturating_duration_since(self.queue[i].requested_at);
        if in_flight > 0 && waited < self.settings.drain_timeout {
            return changed;
        }
        let p = self.queue.remove(i);
        let r = self.act(procs, &p, now, in_flight, waited);
        if r.state == RecycleState::Skipped {
            self.actions_skipped += 1;
        } else {
            self.actions_taken += 1;
            let jitter = self.jitter();
            self.next_allowed = Some(now + self.settings.min_interval + jitter);
        }
        changed.push(r);
        changed
    }

    fn act(
        &mut self,
        procs: &mut impl Processes,
        p: &PendingRestart,
        now: Instant,
        in_flight: u64,
        waited: Duration,
    ) -> Recycle {
        let waits = (waited.as_millis() as u64, in_flight);
        let skipped = |reason: String| (RecycleState::Skipped, Some(reason), Vec::new());
        let (state, reason, siblings) = if let Err(e) = check_target(p.target_pid, self.agent_pid) {
            skipped(e.to_string())
        } else if procs.start_time(p.target_pid) != Some(p.target_start_time) {
            // Confirmed just before the signal: the same process, not a
            // recycled pid.
            skipped(format!(
                "target pid {} is no longer the process it was (exited or pid reused)",
                p.target_pid
            ))
        } else if p.plan.action == SoftLimitAction::Log {
            (
                RecycleState::Logged,
                p.plan.log_only_because.clone(),
                Vec::new(),
            )
        } else {
            let siblings = procs.children(p.parent_pid);
            match procs.kill(p.target_pid, p.plan.signal) {
                Ok(()) => (RecycleState::Signalled, None, siblings),
                Err(e) => skipped(format!("sending {} failed: {e}", p.signal)),
            }
        };
        self.record(p, now, state, reason, waits, siblings)
    }

    /// Files a recycle in the history and counts its state.
    fn record(
        &mut self,
        p: &PendingRestart,
        now: Instant,
        state: RecycleState,
        reason: Option<String>,
        (waited_ms, in_flight_at_signal): (u64, u64),
        siblings: Vec<u32>,
    ) -> Recycle {
        let r = Recycle {
            worker_pid: p.worker_pid,
            worker_start_time: p.worker_start_time,
            server: p.server,
            action: p.action,
            target_pid: p.target_pid,
            signal: p.signal.clone(),
            metric: p.metric,
            measure_mb: p.measure_mb,
            rss_mb: p.rss_mb,
            soft_limit_mb: p.soft_limit_mb,
            requested_unix: p.requested_unix,
            acted_unix: unix_now(),
            waited_ms,
            in_flight_at_signal,
            state,
            reason,
            exit_secs: None,
            replacement_pid: None,
            escalated_signal: None,
            acted_at: now,
            master_pid: p.parent_pid,
            siblings,
            exit_timeout: p.plan.exit_timeout,
            escalate_signal: p.plan.escalate_signal,
        };
        self.count(&r);
        if self.recycles.len() == HISTORY {
            self.recycles.pop_front();
        }
        self.recycles.push_back(r.clone());
        r
    }

    fn count(&mut self, r: &Recycle) {
        *self.counts.entry((r.server, r.state)).or_default() += 1;
    }

    /// Signalled workers: gone yet, replaced yet, or overdue.
    fn follow(&mut self, procs: &mut impl Processes, now: Instant, changed: &mut Vec<Recycle>) {
        let mut counted = Vec::new();
        for r in self.recycles.iter_mut().filter(|r| r.open(now)) {
            let before = r.state;
            let alive = procs.start_time(r.worker_pid) == Some(r.worker_start_time);
            match r.state {
                RecycleState::Signalled | RecycleState::TimedOut | RecycleState::Escalated
                    if !alive =>
                {
                    mark_exited(r, now);
                }
                RecycleState::Signalled
                    if now.saturating_duration_since(r.acted_at) >= r.exit_timeout =>
                {
                    r.state = RecycleState::TimedOut;
                    if let Some(sig) = r.escalate_signal {
                        match procs.kill(r.worker_pid, sig) {
                            Ok(()) => {
                                r.state = RecycleState::Escalated;
                                r.escalated_signal = Some(sig.as_str().to_string());
                            }
                            Err(e) => r.reason = Some(format!("escalation failed: {e}")),
                        }
                    }
                }
                _ => {}
            }
            if r.state == RecycleState::Exited && r.replacement_pid.is_none() {
                r.replacement_pid = procs
                    .children(r.master_pid)
                    .into_iter()
                    .find(|c| *c != r.worker_pid && !r.siblings.contains(c));
                if r.replacement_pid.is_some() {
                    r.state = RecycleState::Replaced;
                }
            }
            if r.state != before {
                changed.push(r.clone());
                counted.push(r.clone());
            }
        }
        for r in &counted {
            self.count(r);
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

fn mark_exited(r: &mut Recycle, now: Instant) {
    r.state = RecycleState::Exited;
    r.exit_secs = Some(now.saturating_duration_since(r.acted_at).as_secs_f64());
}

/// Logs a recycle's new state as a structured event.
pub fn log_recycle(r: &Recycle) {
    macro_rules! event {
        ($level:ident, $msg:literal) => {
            tracing::$level!(
                pid = r.worker_pid,
                server = %r.server,
                target_pid = r.target_pid,
                signal = %r.signal,
                metric = r.metric.name(),
                measure_mb = r.measure_mb,
                rss_mb = r.rss_mb,
                soft_limit_mb = r.soft_limit_mb,
                waited_ms = r.waited_ms,
                in_flight_at_signal = r.in_flight_at_signal,
                exit_secs = r.exit_secs,
                replacement_pid = r.replacement_pid,
                escalated_signal = r.escalated_signal.as_deref(),
                reason = r.reason.as_deref(),
                $msg
            )
        };
    }
    match r.state {
        RecycleState::Signalled => event!(warn, "SOFT_LIMIT_EXCEEDED: graceful restart requested"),
        RecycleState::Logged => event!(warn, "SOFT_LIMIT_EXCEEDED: log-only mode, no signal sent"),
        RecycleState::Skipped => event!(info, "soft-limit restart skipped"),
        RecycleState::TimedOut => {
            event!(warn, "soft-limit restart: the worker has not left in time")
        }
        RecycleState::Escalated => event!(
            warn,
            "soft-limit restart: the worker has not left in time; escalated"
        ),
        RecycleState::Exited => event!(info, "soft-limit restart: the worker left"),
        RecycleState::Replaced => {
            event!(info, "soft-limit restart: the worker left and was replaced")
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
        parent: HashMap<u32, u32>,
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
        fn children(&self, pid: u32) -> Vec<u32> {
            let mut kids: Vec<u32> = self
                .parent
                .iter()
                .filter(|&(c, p)| *p == pid && self.start.contains_key(c))
                .map(|(c, _)| *c)
                .collect();
            kids.sort_unstable();
            kids
        }
        fn kill(&mut self, pid: u32, signal: Signal) -> Result<(), String> {
            self.sent.push((pid, signal));
            Ok(())
        }
    }

    impl Fake {
        /// The master 100 replaces `old` with `new`.
        fn replace(&mut self, old: u32, new: u32) {
            self.start.remove(&old);
            self.start.insert(new, 50 + u64::from(new));
            self.parent.insert(new, 100);
        }
    }

    /// Master 100 with workers 101..=103.
    fn fake() -> Fake {
        let mut f = Fake::default();
        for (pid, start) in [(100, 1), (101, 2), (102, 3), (103, 4)] {
            f.start.insert(pid, start);
            if pid != 100 {
                f.parent.insert(pid, 100);
            }
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

    fn over(worker_pid: u32, server: ServerKind, measure_mb: f64) -> OverLimit {
        OverLimit {
            worker_pid,
            parent_pid: 100,
            server,
            measure_mb,
            rss_mb: measure_mb,
            soft_limit_mb: 450.0,
        }
    }

    fn states(out: &[Recycle]) -> Vec<(u32, RecycleState)> {
        out.iter().map(|r| (r.worker_pid, r.state)).collect()
    }

    #[test]
    fn each_server_retires_one_worker_with_its_own_signal() {
        // Which signal each server takes is servers.rs's table (and test);
        // here: the enforcer sends exactly that, to the worker.
        use ServerKind::*;
        for server in [Gunicorn, Uwsgi, PhpFpm, Puma, Unicorn, GenericPrefork] {
            let signal = server.preset().signal.expect("a preset signal");
            let mut f = fake();
            let mut e = Enforcer::new(SoftLimitSettings::default(), 999);
            let t0 = Instant::now();
            let plan = e.request(&f, &over(101, server, 460.0), t0).unwrap();
            assert_eq!(plan.target, SoftLimitTarget::Worker, "{server}");
            let out = e.tick(&mut f, t0);
            assert_eq!(states(&out), [(101, RecycleState::Signalled)], "{server}");
            // The worker itself, never the master.
            assert_eq!(f.sent, vec![(101, signal)], "{server}");
        }
    }

    #[test]
    fn an_unknown_server_is_only_logged_with_the_flags_to_set() {
        let mut f = fake();
        let mut e = Enforcer::new(SoftLimitSettings::default(), 999);
        let t0 = Instant::now();
        let plan = e
            .request(&f, &over(101, ServerKind::Unknown, 460.0), t0)
            .unwrap();
        assert_eq!(plan.action, SoftLimitAction::Log);
        let out = e.tick(&mut f, t0);
        assert_eq!(states(&out), [(101, RecycleState::Logged)]);
        let why = out[0].reason.as_deref().unwrap();
        assert!(
            why.contains("not recognised")
                && why.contains("--soft-limit-signal")
                && why.contains("--soft-limit-target"),
            "{why}"
        );
        // Apache: no documented one-child signal, so logged, saying which.
        let mut e = Enforcer::new(SoftLimitSettings::default(), 999);
        e.request(&f, &over(102, ServerKind::ApachePrefork, 460.0), t0)
            .unwrap();
        let out = e.tick(&mut f, t0);
        assert_eq!(states(&out), [(102, RecycleState::Logged)]);
        assert!(out[0].reason.as_deref().unwrap().contains("USR1"));
        assert!(f.sent.is_empty());
        // Told what to send, it acts.
        let mut e = Enforcer::new(
            SoftLimitSettings {
                signal: Some(Signal::SIGUSR2),
                ..settings()
            },
            999,
        );
        e.request(&f, &over(101, ServerKind::Unknown, 460.0), t0)
            .unwrap();
        e.tick(&mut f, t0);
        assert_eq!(f.sent, vec![(101, Signal::SIGUSR2)]);
    }

    #[test]
    fn explicit_flags_override_the_preset() {
        let mut f = fake();
        let mut e = Enforcer::new(
            SoftLimitSettings {
                target: Some(SoftLimitTarget::Parent),
                signal: Some(Signal::SIGHUP),
                ..settings()
            },
            999,
        );
        let t0 = Instant::now();
        e.request(&f, &over(101, ServerKind::Gunicorn, 460.0), t0)
            .unwrap();
        let out = e.tick(&mut f, t0);
        assert_eq!(out[0].target_pid, 100);
        assert_eq!(f.sent, vec![(100, Signal::SIGHUP)]);
        // --soft-limit-action log wins over any preset.
        let mut e = Enforcer::new(
            SoftLimitSettings {
                action: Some(SoftLimitAction::Log),
                ..settings()
            },
            999,
        );
        e.request(&f, &over(102, ServerKind::Gunicorn, 460.0), t0)
            .unwrap();
        assert_eq!(states(&e.tick(&mut f, t0)), [(102, RecycleState::Logged)]);
        assert_eq!(f.sent.len(), 1);
    }

    #[test]
    fn never_init_or_the_agent() {
        let f = fake();
        let parent = SoftLimitSettings {
            target: Some(SoftLimitTarget::Parent),
            ..settings()
        };
        let mut e = Enforcer::new(parent.clone(), 100);
        let t0 = Instant::now();
        let mut o = over(101, ServerKind::Gunicorn, 1.0);
        assert_eq!(e.request(&f, &o, t0), Err(RefusedTarget::Agent(100)));
        let mut e = Enforcer::new(parent, 999);
        o.parent_pid = 1;
        assert_eq!(e.request(&f, &o, t0), Err(RefusedTarget::Init(1)));
        o.parent_pid = 0;
        assert_eq!(e.request(&f, &o, t0), Err(RefusedTarget::Init(0)));
        let mut e = Enforcer::new(settings(), 101);
        assert_eq!(
            e.request(&f, &over(101, ServerKind::Gunicorn, 1.0), t0),
            Err(RefusedTarget::Agent(101))
        );
    }

    #[test]
    fn a_recycled_target_pid_is_not_signalled() {
        let mut f = fake();
        let mut e = Enforcer::new(
            SoftLimitSettings {
                target: Some(SoftLimitTarget::Parent),
                ..settings()
            },
            999,
        );
        let t0 = Instant::now();
        e.request(&f, &over(101, ServerKind::Gunicorn, 460.0), t0)
            .unwrap();
        f.start.insert(100, 77); // the master died and its pid was reused
        let out = e.tick(&mut f, t0);
        assert_eq!(states(&out), [(101, RecycleState::Skipped)]);
        assert!(f.sent.is_empty());
    }

    #[test]
    fn waits_for_requests_in_flight_but_not_forever() {
        let mut f = fake();
        f.in_flight.insert(101, 2);
        let mut e = Enforcer::new(settings(), 999);
        let t0 = Instant::now();
        e.request(&f, &over(101, ServerKind::Gunicorn, 460.0), t0)
            .unwrap();
        assert!(e.tick(&mut f, t0 + Duration::from_secs(1)).is_empty());
        f.in_flight.insert(101, 0);
        let out = e.tick(&mut f, t0 + Duration::from_secs(2));
        assert_eq!(states(&out), [(101, RecycleState::Signalled)]);
        assert_eq!(out[0].waited_ms, 2000);

        // Stuck requests: acted on after the drain timeout.
        let mut f = fake();
        f.in_flight.insert(102, 1);
        let mut e = Enforcer::new(settings(), 999);
        e.request(&f, &over(102, ServerKind::Gunicorn, 460.0), t0)
            .unwrap();
        assert!(e.tick(&mut f, t0 + Duration::from_secs(9)).is_empty());
        let out = e.tick(&mut f, t0 + Duration::from_secs(10));
        assert_eq!(states(&out), [(102, RecycleState::Signalled)]);
        assert_eq!(out[0].in_flight_at_signal, 1);
    }

    #[test]
    fn actions_are_rate_limited_and_the_largest_goes_first() {
        let mut f = fake();
        let mut e = Enforcer::new(settings(), 999);
        let t0 = Instant::now();
        for (w, mb) in [(101, 460.0), (102, 900.0), (103, 600.0)] {
            e.request(&f, &over(w, ServerKind::Gunicorn, mb), t0)
                .unwrap();
        }
        let mut times = Vec::new();
        for s in 0..120 {
            let now = t0 + Duration::from_secs(s);
            for r in e.tick(&mut f, now) {
                if r.state == RecycleState::Signalled {
                    times.push(s);
                }
            }
        }
        assert_eq!(times, vec![0, 30, 60]);
        assert_eq!(
            f.sent,
            vec![
                (102, Signal::SIGTERM),
                (103, Signal::SIGTERM),
                (101, Signal::SIGTERM)
            ]
        );
    }

    #[test]
    fn a_worker_replaced_meanwhile_needs_no_restart() {
        let mut f = fake();
        let mut e = Enforcer::new(settings(), 999);
        let t0 = Instant::now();
        e.request(&f, &over(101, ServerKind::Gunicorn, 460.0), t0)
            .unwrap();
        e.request(&f, &over(102, ServerKind::Gunicorn, 460.0), t0)
            .unwrap();
        assert_eq!(e.tick(&mut f, t0).len(), 1);
        f.start.remove(&102);
        let out = e.tick(&mut f, t0 + Duration::from_secs(60));
        assert!(out.contains(&e.recycle_of(102, 3).unwrap().clone()));
        assert_eq!(e.recycle_of(102, 3).unwrap().state, RecycleState::Skipped);
        assert_eq!(f.sent.len(), 1);
    }

    #[test]
    fn the_exit_and_the_replacement_are_confirmed() {
        let mut f = fake();
        let mut e = Enforcer::new(settings(), 999);
        let t0 = Instant::now();
        e.request(&f, &over(101, ServerKind::Gunicorn, 460.0), t0)
            .unwrap();
        e.tick(&mut f, t0);
        // Still there a second later: nothing new.
        assert!(e.tick(&mut f, t0 + Duration::from_secs(1)).is_empty());
        // The exit event arrives at 2.5 s; the master forks 104 later.
        f.start.remove(&101);
        let r = e
            .worker_exited(101, t0 + Duration::from_millis(2500))
            .unwrap();
        assert_eq!((r.state, r.exit_secs), (RecycleState::Exited, Some(2.5)));
        assert!(e.tick(&mut f, t0 + Duration::from_secs(3)).is_empty());
        f.replace(101, 104);
        let out = e.tick(&mut f, t0 + Duration::from_secs(4));
        assert_eq!(states(&out), [(101, RecycleState::Replaced)]);
        let r = e.recycle_of(101, 2).unwrap();
        assert_eq!((r.replacement_pid, r.exit_secs), (Some(104), Some(2.5)));
        let counts: Vec<_> = e.counts().collect();
        for s in [
            RecycleState::Signalled,
            RecycleState::Exited,
            RecycleState::Replaced,
        ] {
            assert!(counts.contains(&(ServerKind::Gunicorn, s, 1)), "{counts:?}");
        }
    }

    #[test]
    fn a_worker_that_does_not_leave_times_out_or_is_escalated() {
        let t0 = Instant::now();
        // No escalation by default: timed out, still followed.
        let mut f = fake();
        let mut e = Enforcer::new(settings(), 999);
        e.request(&f, &over(101, ServerKind::Gunicorn, 460.0), t0)
            .unwrap();
        e.tick(&mut f, t0);
        assert!(e.tick(&mut f, t0 + Duration::from_secs(34)).is_empty());
        let out = e.tick(&mut f, t0 + Duration::from_secs(35));
        assert_eq!(states(&out), [(101, RecycleState::TimedOut)]);
        assert_eq!(f.sent, vec![(101, Signal::SIGTERM)]);
        f.start.remove(&101);
        let out = e.tick(&mut f, t0 + Duration::from_secs(40));
        assert_eq!(states(&out), [(101, RecycleState::Exited)]);

        // With escalation: KILL after the configured exit timeout.
        let mut f = fake();
        let mut e = Enforcer::new(
            SoftLimitSettings {
                exit_timeout: Some(Duration::from_secs(5)),
                escalate_signal: Some(Signal::SIGKILL),
                ..settings()
            },
            999,
        );
        e.request(&f, &over(101, ServerKind::Uwsgi, 460.0), t0)
            .unwrap();
        e.tick(&mut f, t0);
        let out = e.tick(&mut f, t0 + Duration::from_secs(5));
        assert_eq!(states(&out), [(101, RecycleState::Escalated)]);
        assert_eq!(f.sent, vec![(101, Signal::SIGHUP), (101, Signal::SIGKILL)]);
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
