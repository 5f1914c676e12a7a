//! What workers start: every process forked below a worker (a browser a
//! view never closed, a converter, a shell), followed through fork, exec and
//! exit from the kernel's events without becoming a worker itself. Each
//! belongs to the worker it descends from; when that worker dies, its live
//! descendants are reparented away (to init or a subreaper) and kept as
//! orphans until they exit.
//!
//! A process is a descendant, not a worker, when its parent is one, or when
//! its parent is a worker forked by a traced process (a prefork master's
//! worker), or a process that serves requests (a single-process server):
//! what a master forks are its workers; what they fork is theirs.
use std::{
    collections::{BTreeMap, HashMap},
    time::SystemTime,
};

use serde::Serialize;

/// Descendants kept per agent; more are counted but not kept (a fork
/// storm cannot grow the agent).
pub const MAX_DESCENDANTS: usize = 8192;

/// One process below a worker.
#[derive(Clone, Debug, PartialEq)]
pub struct Descendant {
    pub pid: u32,
    /// The worker it descends from.
    pub owner: u32,
    pub ppid: u32,
    /// The thread of its parent that forked it.
    pub forked_by: u32,
    pub comm: String,
    /// CLOCK_MONOTONIC ns of its fork (the kernel's event).
    pub forked_ns: u64,
    pub started: SystemTime,
    /// Resident bytes at the last refresh (/proc/PID/statm).
    pub rss_bytes: u64,
}

/// Every live descendant, by worker and pid, and the orphans of dead
/// workers.
#[derive(Clone, Debug, Default)]
pub struct Descendants {
    live: BTreeMap<(u32, u32), Descendant>,
    /// The worker of each live descendant.
    owners: HashMap<u32, u32>,
    /// Descendants whose worker died before them.
    orphans: HashMap<u32, Descendant>,
    /// Orphans each dead worker left, by its pid.
    orphaned_by: BTreeMap<u32, u64>,
    /// Forks not kept because the table was full.
    pub dropped: u64,
}

/// A worker's descendants, as the API shows them.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ChildrenStatus {
    /// Live processes below the worker.
    pub count: u64,
    /// How many of each name (comm).
    pub names: BTreeMap<String, u64>,
    /// Their resident memory (/proc, at the last refresh).
    pub rss_bytes: u64,
    /// Their PSS (smaps_rollup), when asked for one worker.
    pub pss_bytes: Option<u64>,
    /// Age of the oldest, in seconds.
    pub oldest_age_secs: Option<f64>,
    /// Live descendants it left behind when it died (reparented away).
    pub orphaned: u64,
}

/// An orphan, as the API shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct OrphanStatus {
    pub pid: u32,
    /// The worker it descended from, now dead.
    pub worker: u32,
    pub comm: String,
    pub rss_bytes: u64,
    pub age_secs: f64,
}

fn age_secs(started: SystemTime, now: SystemTime) -> f64 {
    now.duration_since(started).map_or(0.0, |d| d.as_secs_f64())
}

impl Descendants {
    /// The worker a live process descends from, if it is a descendant.
    pub fn owner_of(&self, pid: u32) -> Option<u32> {
        self.owners
            .get(&pid)
            .copied()
            .or_else(|| self.orphans.get(&pid).map(|d| d.owner))
    }

    pub fn contains(&self, pid: u32) -> bool {
        self.owners.contains_key(&pid) || self.orphans.contains_key(&pid)
    }

    /// A descendant's name (comm), live or orphaned.
    pub fn comm_of(&self, pid: u32) -> Option<String> {
        self.live(pid)
            .or_else(|| self.orphans.get(&pid))
            .map(|d| d.comm.clone())
    }

    fn live(&self, pid: u32) -> Option<&Descendant> {
        let owner = *self.owners.get(&pid)?;
        self.live.get(&(owner, pid))
    }

    fn get_mut(&mut self, pid: u32) -> Option<&mut Descendant> {
        match self.owners.get(&pid) {
            Some(&owner) => self.live.get_mut(&(owner, pid)),
            None => self.orphans.get_mut(&pid),
        }
    }

    fn remove_live(&mut self, pid: u32) -> Option<Descendant> {
        let owner = self.owners.remove(&pid)?;
        self.live.remove(&(owner, pid))
    }

    /// Keeps a new descendant; false when the table is full.
    pub fn adopt(&mut self, d: Descendant) -> bool {
        if self.live.len() + self.orphans.len() >= MAX_DESCENDANTS {
            self.dropped += 1;
            return false;
        }
        // A child of an orphan is an orphan too.
        if self.orphans.contains_key(&d.ppid) {
            self.orphans.insert(d.pid, d);
        } else {
            self.owners.insert(d.pid, d.owner);
            self.live.insert((d.owner, d.pid), d);
        }
        true
    }

    /// A descendant exec'd another program: its new name.
    pub fn exec(&mut self, pid: u32, comm: &str) {
        if let Some(d) = self.get_mut(pid) {
            comm.clone_into(&mut d.comm);
        }
    }

    /// A descendant exited (or was found gone).
    pub fn exit(&mut self, pid: u32) -> Option<Descendant> {
        self.remove_live(pid).or_else(|| self.orphans.remove(&pid))
    }

    /// A worker died: its live descendants become orphans. Returns how many.
    pub fn worker_exited(&mut self, worker: u32) -> u64 {
        let pids: Vec<u32> = self.of(worker).map(|d| d.pid).collect();
        for &pid in &pids {
            if let Some(d) = self.remove_live(pid) {
                self.orphans.insert(pid, d);
            }
        }
        let n = pids.len() as u64;
        if n > 0 {
            *self.orphaned_by.entry(worker).or_default() += n;
            // Bounded like the exited-worker list.
            while self.orphaned_by.len() > MAX_DESCENDANTS {
                self.orphaned_by.pop_first();
            }
        }
        n
    }

    /// A worker's live descendants (a range of the table: a request's
    /// look-up walks its own worker's only).
    pub fn of(&self, worker: u32) -> impl Iterator<Item = &Descendant> {
        self.live
            .range((worker, 0)..=(worker, u32::MAX))
            .map(|(_, d)| d)
    }

    /// Every live descendant and orphan, for refreshes.
    pub fn pids(&self) -> Vec<u32> {
        self.owners
            .keys()
            .chain(self.orphans.keys())
            .copied()
            .collect()
    }

    pub fn set_rss(&mut self, pid: u32, bytes: u64) {
        if let Some(d) = self.get_mut(pid) {
            d.rss_bytes = bytes;
        }
    }

    /// What a request left in children: the worker's descendants forked by
    /// `tid` between `start_ns` and `end_ns` and alive now (events arrive
    /// in order, so "now" is the request's end plus what the ring still
    /// holds), and their resident bytes.
    pub fn started_during(&self, worker: u32, tid: u32, start_ns: u64, end_ns: u64) -> Vec<u32> {
        self.of(worker)
            .filter(|d| d.forked_ns >= start_ns && d.forked_ns <= end_ns && self.forked_on(d, tid))
            .map(|d| d.pid)
            .collect()
    }

    /// Whether `d` was forked by thread `tid` of its worker, itself or
    /// through descendants forked on that thread.
    fn forked_on(&self, d: &Descendant, tid: u32) -> bool {
        let mut at = d;
        for _ in 0..64 {
            if at.ppid == at.owner {
                return at.forked_by == tid;
            }
            match self.live(at.ppid) {
                Some(parent) => at = parent,
                None => return false,
            }
        }
        false
    }

    pub fn summary(&self, worker: u32, now: SystemTime) -> ChildrenStatus {
        let mut s = ChildrenStatus {
            orphaned: self.orphaned_by.get(&worker).copied().unwrap_or(0),
            ..ChildrenStatus::default()
        };
        for d in self.of(worker) {
            s.count += 1;
            *s.names.entry(d.comm.clone()).or_default() += 1;
            s.rss_bytes += d.rss_bytes;
            let age = age_secs(d.started, now);
            s.oldest_age_secs = Some(s.oldest_age_secs.map_or(age, |o: f64| o.max(age)));
        }
        s
    }

    pub fn orphans(&self, now: SystemTime) -> Vec<OrphanStatus> {
        let mut v: Vec<OrphanStatus> = self
            .orphans
            .values()
            .map(|d| OrphanStatus {
                pid: d.pid,
                worker: d.owner,
                comm: d.comm.clone(),
                rss_bytes: d.rss_bytes,
                age_secs: age_secs(d.started, now),
            })
            .collect();
        v.sort_by_key(|o| o.pid);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(pid: u32, ppid: u32, owner: u32, tid: u32, ns: u64) -> Descendant {
        Descendant {
            pid,
            owner,
            ppid,
            forked_by: tid,
            comm: format!("c{pid}"),
            forked_ns: ns,
            started: SystemTime::UNIX_EPOCH,
            rss_bytes: 1 << 20,
        }
    }

    #[test]
    fn requests_count_what_their_thread_started_and_left_alive() {
        let mut t = Descendants::default();
        // Worker 10: thread 10 forks 100 during its request (ns 50..60),
        // 100 forks 101 (its own thread id); thread 11 forks 102 then.
        assert!(t.adopt(d(100, 10, 10, 10, 55)));
        assert!(t.adopt(d(101, 100, 10, 100, 56)));
        assert!(t.adopt(d(102, 10, 10, 11, 57)));
        assert!(t.adopt(d(103, 10, 10, 10, 70)));
        let mut got = t.started_during(10, 10, 50, 60);
        got.sort_unstable();
        assert_eq!(got, [100, 101]);
        assert_eq!(t.started_during(10, 11, 50, 60), [102]);
        t.exit(101);
        assert_eq!(t.started_during(10, 10, 50, 60), [100]);
        let s = t.summary(10, SystemTime::UNIX_EPOCH);
        assert_eq!((s.count, s.rss_bytes, s.orphaned), (3, 3 << 20, 0));
        assert_eq!(s.names["c100"], 1);
    }

    #[test]
    fn a_dead_workers_descendants_become_orphans() {
        let mut t = Descendants::default();
        t.adopt(d(100, 10, 10, 10, 1));
        t.adopt(d(200, 20, 20, 20, 1));
        assert_eq!(t.worker_exited(10), 1);
        assert_eq!(t.summary(10, SystemTime::UNIX_EPOCH).orphaned, 1);
        assert_eq!(t.summary(10, SystemTime::UNIX_EPOCH).count, 0);
        assert_eq!(t.owner_of(100), Some(10), "still known, as an orphan");
        // An orphan's child is an orphan.
        t.adopt(d(101, 100, 10, 100, 2));
        assert_eq!(t.orphans(SystemTime::UNIX_EPOCH).len(), 2);
        t.exit(100);
        t.exit(101);
        assert!(t.orphans(SystemTime::UNIX_EPOCH).is_empty());
        assert_eq!(t.pids(), [200], "worker 20's own is left");
    }

    #[test]
    fn the_table_is_bounded() {
        let mut t = Descendants::default();
        for pid in 0..MAX_DESCENDANTS as u32 {
            assert!(t.adopt(d(pid + 1000, 10, 10, 10, 1)));
        }
        assert!(!t.adopt(d(1, 10, 10, 10, 1)));
        assert_eq!(t.dropped, 1);
    }
}
