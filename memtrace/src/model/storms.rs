//! Traced processes that fork, exec or map memory faster than any server
//! does: a fork bomb, an exec loop, a tenant's process named like a server
//! to wear the agent down. Each is named in one log line the first time it
//! crosses its limit; from then on what it does is logged at debug level,
//! so that a storm cannot flood the log. The agent keeps following it: the
//! kernel counts for it as for any process, and every other worker is
//! traced as before.
use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

/// How many of something within one window is more than a server does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit {
    pub count: u64,
    pub window: Duration,
}

/// Children of one process within 10 s. A prefork server respawns its
/// workers one at a time, and PHP-FPM spawns at most 32 a second
/// (`pm.max_spawn_rate`'s default) while its pool grows.
pub const FORK_STORM: Limit = Limit {
    count: 500,
    window: Duration::from_secs(10),
};

/// Execs of one process (same pid) within 10 s. A server execs once, and
/// again only on a binary upgrade.
pub const EXEC_STORM: Limit = Limit {
    count: 50,
    window: Duration::from_secs(10),
};

/// mmap calls of one process within 10 s (5,000 a second), checked while
/// its allocation sites are collected: collection walks the stack of every
/// mmap call, so such a process costs more than the rest. Servers map
/// large blocks and arenas, a few hundred a second at most.
pub const MAP_STORM: Limit = Limit {
    count: 50_000,
    window: Duration::from_secs(10),
};

/// Processes whose counts are kept at once, per kind: past it the oldest
/// window not yet flagged is forgotten.
pub const MAX_COUNTED: usize = 4096;

/// Counts of one process within its current window.
#[derive(Clone, Copy, Debug)]
pub struct Burst {
    start: Instant,
    in_window: u64,
    /// Counted since the first, over every window.
    pub total: u64,
    /// Crossed its limit (once flagged, always flagged).
    pub flagged: bool,
}

impl Burst {
    fn new(now: Instant) -> Self {
        Self {
            start: now,
            in_window: 0,
            total: 0,
            flagged: false,
        }
    }

    /// Counts `n` more at `now`; true only the first time more than
    /// `limit.count` fall within one window.
    fn add(&mut self, n: u64, now: Instant, limit: Limit) -> bool {
        if now.duration_since(self.start) > limit.window {
            self.start = now;
            self.in_window = 0;
        }
        self.in_window = self.in_window.saturating_add(n);
        self.total = self.total.saturating_add(n);
        if self.flagged || self.in_window <= limit.count {
            return false;
        }
        self.flagged = true;
        true
    }

    /// Seconds its current window has lasted.
    pub fn window_secs(&self, now: Instant) -> f64 {
        now.duration_since(self.start).as_secs_f64()
    }

    /// Counted within the current window.
    pub fn in_window(&self) -> u64 {
        self.in_window
    }
}

/// One kind of storm, counted per process.
#[derive(Debug)]
pub struct Storms {
    limit: Limit,
    by_pid: HashMap<u32, Burst>,
}

impl Storms {
    pub fn new(limit: Limit) -> Self {
        Self {
            limit,
            by_pid: HashMap::new(),
        }
    }

    /// Counts `n` for `pid` at `now`. Returns its counts the one time it
    /// crosses the limit (to be logged), else None.
    pub fn add(&mut self, pid: u32, n: u64, now: Instant) -> Option<Burst> {
        if !self.by_pid.contains_key(&pid) && self.by_pid.len() >= MAX_COUNTED {
            self.forget_oldest();
        }
        let limit = self.limit;
        let burst = self.by_pid.entry(pid).or_insert_with(|| Burst::new(now));
        burst.add(n, now, limit).then_some(*burst)
    }

    /// Whether `pid` crossed the limit (what it does is then logged at
    /// debug level).
    pub fn flagged(&self, pid: u32) -> bool {
        self.by_pid.get(&pid).is_some_and(|b| b.flagged)
    }

    /// A process that exited: its counts go.
    pub fn exited(&mut self, pid: u32) {
        self.by_pid.remove(&pid);
    }

    pub fn len(&self) -> usize {
        self.by_pid.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_pid.is_empty()
    }

    fn forget_oldest(&mut self) {
        let oldest = self
            .by_pid
            .iter()
            .filter(|(_, b)| !b.flagged)
            .min_by_key(|(_, b)| b.start)
            .or_else(|| self.by_pid.iter().min_by_key(|(_, b)| b.start))
            .map(|(&pid, _)| pid);
        if let Some(pid) = oldest {
            self.by_pid.remove(&pid);
        }
    }
}

/// The three kinds the agent watches for.
#[derive(Debug)]
pub struct StormWatch {
    /// Children forked, by parent.
    pub forks: Storms,
    /// Execs, by pid.
    pub execs: Storms,
    /// mmap calls while collected, by pid.
    pub maps: Storms,
}

impl Default for StormWatch {
    fn default() -> Self {
        Self {
            forks: Storms::new(FORK_STORM),
            execs: Storms::new(EXEC_STORM),
            maps: Storms::new(MAP_STORM),
        }
    }
}

impl StormWatch {
    /// Whether what `pid` (with parent `ppid`) does is logged at debug
    /// level only: it is a storm's child, or execs in a loop.
    pub fn quiet(&self, pid: u32, ppid: u32) -> bool {
        self.forks.flagged(ppid) || self.execs.flagged(pid)
    }

    /// A process that exited: its counts go.
    pub fn exited(&mut self, pid: u32) {
        self.forks.exited(pid);
        self.execs.exited(pid);
        self.maps.exited(pid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Limit = Limit {
        count: 3,
        window: Duration::from_secs(10),
    };

    #[test]
    fn flags_once_when_a_window_holds_more_than_the_limit() {
        let t0 = Instant::now();
        let mut s = Storms::new(LIMIT);
        assert!((0..3).all(|i| s.add(7, 1, t0 + Duration::from_secs(i)).is_none()));
        assert!(!s.flagged(7));
        let burst = s.add(7, 1, t0 + Duration::from_secs(3)).expect("crossed");
        assert_eq!((burst.total, burst.in_window()), (4, 4));
        assert!(s.flagged(7));
        // Once: further counts say nothing, and the flag stays.
        assert!(s.add(7, 100, t0 + Duration::from_secs(4)).is_none());
        assert!(s.flagged(7));
    }

    #[test]
    fn a_slow_steady_rate_never_crosses() {
        let t0 = Instant::now();
        let mut s = Storms::new(LIMIT);
        // Three every 11 s, for ever: each window holds three.
        for w in 0..50u64 {
            for i in 0..3u64 {
                let at = t0 + Duration::from_secs(w * 11) + Duration::from_millis(i);
                assert!(s.add(1, 1, at).is_none());
            }
        }
        assert!(!s.flagged(1));
        assert_eq!(s.by_pid[&1].total, 150);
    }

    #[test]
    fn counts_stay_bounded_and_keep_the_flagged() {
        let t0 = Instant::now();
        let mut s = Storms::new(LIMIT);
        for _ in 0..4 {
            s.add(1, 1, t0);
        }
        assert!(s.flagged(1));
        for pid in 2..(MAX_COUNTED as u32 + 100) {
            s.add(pid, 1, t0 + Duration::from_millis(u64::from(pid)));
        }
        assert_eq!(s.len(), MAX_COUNTED);
        assert!(s.flagged(1), "the flagged process is not forgotten first");
        s.exited(1);
        assert!(!s.flagged(1));
    }

    #[test]
    fn quiet_for_a_storms_children_and_an_exec_loop() {
        let t0 = Instant::now();
        let mut w = StormWatch::default();
        assert!(
            w.forks
                .add(10, FORK_STORM.count + 1, t0)
                .is_some_and(|b| b.flagged)
        );
        assert!(w.quiet(11, 10), "a child of the storming parent");
        assert!(!w.quiet(10, 1), "the parent itself is still logged");
        w.execs.add(20, EXEC_STORM.count + 1, t0);
        assert!(w.quiet(20, 1));
        w.exited(10);
        assert!(!w.quiet(11, 10));
    }
}
