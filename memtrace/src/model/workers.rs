//! The worker model: every traced process (master and workers), its identity,
//! its memory as the kernel counts it, and what happened to it.
use std::{
    collections::{BTreeMap, VecDeque},
    time::SystemTime,
};

use memtrace_common::{MmRss, ProcStats, RSS_MEMBERS};
use serde::Serialize;

use super::{
    cgroups::Placement,
    procinfo::ProcessView,
    pyasyncio::AsyncioOffsets,
    pycode::CodeLayout,
    python::{GcStats, PythonRuntime},
    requests::RequestLog,
    rss::RssBreakdown,
};
use crate::judge::detector::{DetectorConfig, LeakDetector};

/// How memtrace found a process. It decides what an RSS member the kernel
/// has not reported yet is worth: a forked child's mm started empty and every
/// change to it was seen, so an unseen member is 0; a process found running,
/// or matched at exec, has history the kernel did not see, so /proc fills in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// Found in /proc (running before memtrace, or found by a rescan).
    Scan,
    /// Forked by a traced process; followed by the kernel from its first instant.
    Fork,
    /// Matched a selector when it called exec.
    Exec,
}

/// A process's place in the traced tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Has traced children (a prefork master).
    Master,
    /// Its parent is traced.
    Worker,
    /// Neither: a single-process server.
    Process,
}

/// Refreshes without a readable GC state before a Python worker's GC is no
/// longer looked for.
pub const PYTHON_GC_MISSES: u8 = 10;

/// One traced process.
#[derive(Clone, Debug)]
pub struct Worker {
    pub pid: u32,
    pub ppid: u32,
    pub name: String,
    pub exe: Option<String>,
    pub cmdline: String,
    /// Clock ticks after boot (/proc/PID/stat); with the pid it names one process.
    pub start_time: u64,
    pub first_seen: SystemTime,
    pub origin: Origin,
    /// Which selector matched, or "child of PID".
    pub reason: String,
    pub exited_at: Option<SystemTime>,
    /// Resident memory: kernel counters where the kernel has seen a member.
    pub rss: RssBreakdown,
    /// `MmRss::known` of the last kernel reading.
    pub rss_known: u32,
    /// /proc/PID/status reading that fills members the kernel has not seen.
    pub seed: RssBreakdown,
    /// Kernel counters (faults, mmap, brk, requests), last read or final.
    pub stats: ProcStats,
    /// Recent requests and totals.
    pub requests: RequestLog,
    /// Leak trend and soft limit of this worker's lifetime.
    pub detector: LeakDetector,
    /// LEAK_TREND_DETECTED reports so far.
    pub leak_detections: u64,
    /// The same robust slope over its live descendants after each request.
    pub child_detector: LeakDetector,
    /// CHILD_LEAK_DETECTED reports so far.
    pub child_leak_detections: u64,
    /// The same robust slope over its open descriptors after each request.
    pub fd_detector: LeakDetector,
    /// FD_LEAK_DETECTED reports so far.
    pub fd_leak_detections: u64,
    /// The same robust slope over its live asyncio tasks after each request.
    pub task_detector: LeakDetector,
    /// TASK_LEAK_DETECTED reports so far.
    pub task_leak_detections: u64,
    /// Where its `_asyncio` module keeps the task lists (CPython 3.14+,
    /// once the module is loaded).
    pub asyncio: Option<AsyncioOffsets>,
    /// Live asyncio tasks at the last count (a refresh or a request's end).
    pub asyncio_tasks: Option<u64>,
    /// The count taken when its previous request was recorded: what the
    /// next request's `task_delta` is measured from (a refresh's count can
    /// fall between a request's end and its record).
    pub asyncio_request_tasks: Option<u64>,
    /// Why its tasks are not counted (a table that does not validate).
    pub asyncio_error: Option<String>,

    /// Its RSS with its descendants' crossed the soft limit
    /// (`--soft-limit-include-children`), once.
    pub footprint_fired: bool,
    /// Its cgroup, container and pod, read when it was attached.
    pub placement: Option<Placement>,
    /// VmData from /proc at the last refresh: the net of what mmap, munmap,
    /// mremap and brk did to private writable memory.
    pub vm_data: Option<u64>,
    /// The CPython interpreter it runs, once found.
    pub python: Option<PythonRuntime>,
    /// Where its `_PyRuntime` is, once its interpreter is found.
    pub python_runtime: Option<u64>,
    /// Its interpreter's GC, read at the last refresh.
    pub python_gc: Option<GcStats>,
    /// Refreshes at which its GC state could not be read (given up at
    /// [`PYTHON_GC_MISSES`], with one log line).
    pub python_gc_misses: u8,
    /// The kernel reads its GC totals at each request's ends (`PY_GC`).
    pub python_gc_in_kernel: bool,
    /// Looks for an interpreter so far (libpython is mapped after exec, so
    /// a fresh process is looked at again for its first refreshes).
    pub python_looks: u8,
    /// Its code objects' layout, once the kernel reads its Python frames.
    pub python_code: Option<CodeLayout>,
    /// Refreshes at which its frames could not be set up yet (given up at
    /// [`PYTHON_GC_MISSES`] too); `u8::MAX`: done, or given up for good.
    pub python_frame_tries: u8,
    /// Why the kernel does not read its Python frames, once given up.
    pub python_frames_error: Option<String>,
}

impl Worker {
    /// Its four detectors: memory, child processes, descriptors, tasks.
    pub fn detectors_mut(&mut self) -> [&mut LeakDetector; 4] {
        [
            &mut self.detector,
            &mut self.child_detector,
            &mut self.fd_detector,
            &mut self.task_detector,
        ]
    }

    pub fn new(view: &ProcessView, origin: Origin, reason: String) -> Self {
        Self {
            pid: view.pid,
            ppid: view.ppid,
            name: view.comm.clone(),
            exe: view.exe.as_ref().map(|p| p.display().to_string()),
            cmdline: view.cmdline.join(" "),
            start_time: view.start_time,
            first_seen: SystemTime::now(),
            origin,
            reason,
            exited_at: None,
            rss: RssBreakdown::default(),
            rss_known: 0,
            seed: RssBreakdown::default(),
            stats: ProcStats::default(),
            requests: RequestLog::default(),
            detector: LeakDetector::new(DetectorConfig::default()),
            leak_detections: 0,
            child_detector: LeakDetector::new(DetectorConfig::default()),
            child_leak_detections: 0,
            fd_detector: LeakDetector::new(DetectorConfig::default()),
            fd_leak_detections: 0,
            task_detector: LeakDetector::new(DetectorConfig::default()),
            task_leak_detections: 0,
            asyncio: None,
            asyncio_tasks: None,
            asyncio_request_tasks: None,
            asyncio_error: None,

            footprint_fired: false,
            placement: None,
            vm_data: None,
            python: None,
            python_runtime: None,
            python_gc: None,
            python_gc_misses: 0,
            python_gc_in_kernel: false,
            python_looks: 0,
            python_code: None,
            python_frame_tries: 0,
            python_frames_error: None,
        }
    }

    pub fn alive(&self) -> bool {
        self.exited_at.is_none()
    }

    /// Whether some member still needs /proc to fill it in.
    pub fn needs_seed(&self) -> bool {
        self.origin != Origin::Fork && self.rss_known & 0b1011 != 0b1011
    }

    /// Merges kernel RSS counters with the /proc seed.
    pub fn apply_kernel_rss(&mut self, bytes: [i64; RSS_MEMBERS], known: u32) {
        let kernel = RssBreakdown::from_members(bytes);
        let mut merged = RssBreakdown::default();
        for m in 0..RSS_MEMBERS {
            let v = if known & (1 << m) != 0 {
                kernel.member(m)
            } else if self.origin == Origin::Fork {
                0
            } else {
                self.seed.member(m)
            };
            merged.set_member(m, v);
        }
        self.rss = merged;
        self.rss_known = known;
    }

    pub fn apply_mm(&mut self, mm: &MmRss) {
        self.apply_kernel_rss(mm.bytes, mm.known);
    }

    /// Takes a /proc reading for the members the kernel has not reported.
    pub fn apply_seed(&mut self, seed: RssBreakdown) {
        self.seed = seed;
        let (bytes, known) = (self.kernel_members(), self.rss_known);
        self.apply_kernel_rss(bytes, known);
    }

    fn kernel_members(&self) -> [i64; RSS_MEMBERS] {
        let mut out = [0i64; RSS_MEMBERS];
        for (m, v) in out.iter_mut().enumerate() {
            *v = self.rss.member(m) as i64;
        }
        out
    }
}

/// Every traced process, alive and recently exited.
#[derive(Debug)]
pub struct Registry {
    alive: BTreeMap<u32, Worker>,
    exited: VecDeque<Worker>,
    max_exited: usize,
}

/// Exited workers kept for the API, the newest.
pub const EXITED_KEPT: usize = 64;
/// Request records an exited worker keeps (its routes and counters stay
/// whole, its detectors' judgements too, without their sample windows): a
/// server that recycles its workers must not make the agent grow by a
/// worker's whole history each time.
pub const EXITED_HISTORY: usize = 8;

impl Default for Registry {
    fn default() -> Self {
        Self::new(EXITED_KEPT)
    }
}

impl Registry {
    pub fn new(max_exited: usize) -> Self {
        Self {
            alive: BTreeMap::new(),
            exited: VecDeque::new(),
            max_exited,
        }
    }

    /// Adds a process. A pid already known as alive with another start time
    /// was recycled: the old entry is retired first.
    pub fn add(&mut self, worker: Worker) -> &mut Worker {
        if let Some(old) = self.alive.get(&worker.pid)
            && old.start_time != worker.start_time
        {
            self.retire(worker.pid, None);
        }
        let pid = worker.pid;
        self.alive.entry(pid).or_insert(worker)
    }

    pub fn contains(&self, pid: u32) -> bool {
        self.alive.contains_key(&pid)
    }

    pub fn get(&self, pid: u32) -> Option<&Worker> {
        self.alive.get(&pid)
    }

    pub fn get_mut(&mut self, pid: u32) -> Option<&mut Worker> {
        self.alive.get_mut(&pid)
    }

    /// A process by pid, alive or recently exited (the newest first).
    pub fn find(&self, pid: u32) -> Option<&Worker> {
        self.alive
            .get(&pid)
            .or_else(|| self.exited.iter().rev().find(|w| w.pid == pid))
    }

    pub fn alive(&self) -> impl Iterator<Item = &Worker> {
        self.alive.values()
    }

    pub fn alive_mut(&mut self) -> impl Iterator<Item = &mut Worker> {
        self.alive.values_mut()
    }

    pub fn exited(&self) -> impl Iterator<Item = &Worker> {
        self.exited.iter()
    }

    pub fn pids(&self) -> Vec<u32> {
        self.alive.keys().copied().collect()
    }

    pub fn len(&self) -> usize {
        self.alive.len()
    }

    pub fn is_empty(&self) -> bool {
        self.alive.is_empty()
    }

    pub fn role(&self, pid: u32) -> Role {
        let Some(w) = self.alive.get(&pid).or_else(|| self.find(pid)) else {
            return Role::Process;
        };
        if self.alive.contains_key(&w.ppid) {
            Role::Worker
        } else if self.alive.values().any(|c| c.ppid == pid) {
            Role::Master
        } else {
            Role::Process
        }
    }

    /// Moves a process to the exited list, with its final counters if known.
    pub fn retire(
        &mut self,
        pid: u32,
        final_stats: Option<(ProcStats, [i64; RSS_MEMBERS])>,
    ) -> Option<&Worker> {
        let mut w = self.alive.remove(&pid)?;
        w.exited_at = Some(SystemTime::now());
        w.requests.keep_last(EXITED_HISTORY);
        for detector in w.detectors_mut() {
            detector.release_window();
        }
        if let Some((stats, rss)) = final_stats {
            w.stats = stats;
            if rss.iter().any(|&v| v != 0) {
                let known = w.rss_known;
                w.apply_kernel_rss(rss, known);
            }
        }
        self.exited.push_back(w);
        while self.exited.len() > self.max_exited {
            self.exited.pop_front();
        }
        self.exited.back()
    }

    /// Forgets a process entirely (it exec'd into something not selected).
    pub fn forget(&mut self, pid: u32) -> Option<Worker> {
        self.alive.remove(&pid)
    }
}

#[cfg(test)]
mod tests {
    use memtrace_common::MM_ANONPAGES;

    use super::*;

    fn view(pid: u32, ppid: u32, start: u64) -> ProcessView {
        ProcessView {
            pid,
            ppid,
            comm: "srv".into(),
            exe: None,
            cmdline: vec![],
            start_time: start,
        }
    }

    #[test]
    fn roles_follow_the_tree() {
        let mut r = Registry::default();
        r.add(Worker::new(&view(10, 1, 5), Origin::Scan, "name".into()));
        r.add(Worker::new(&view(11, 10, 6), Origin::Fork, "child".into()));
        r.add(Worker::new(&view(20, 1, 7), Origin::Scan, "name".into()));
        assert_eq!(r.role(10), Role::Master);
        assert_eq!(r.role(11), Role::Worker);
        assert_eq!(r.role(20), Role::Process);
    }

    #[test]
    fn recycled_pid_retires_the_old_process() {
        let mut r = Registry::default();
        r.add(Worker::new(&view(10, 1, 5), Origin::Scan, "a".into()));
        r.add(Worker::new(&view(10, 1, 99), Origin::Scan, "b".into()));
        assert_eq!(r.get(10).unwrap().start_time, 99);
        assert_eq!(r.exited().count(), 1);
        assert_eq!(r.exited().next().unwrap().start_time, 5);
    }

    #[test]
    fn unseen_members_of_a_fork_are_zero_of_a_scan_are_seeded() {
        let seed = RssBreakdown {
            file: 100,
            anon: 200,
            shmem: 300,
            swap: 0,
        };
        let mut forked = Worker::new(&view(1, 0, 1), Origin::Fork, String::new());
        forked.apply_seed(seed);
        forked.apply_kernel_rss([0, 4096, 0, 0], 1 << MM_ANONPAGES);
        assert_eq!(forked.rss.resident(), 4096);

        let mut scanned = Worker::new(&view(2, 0, 1), Origin::Scan, String::new());
        scanned.apply_seed(seed);
        scanned.apply_kernel_rss([0, 4096, 0, 0], 1 << MM_ANONPAGES);
        assert_eq!(scanned.rss.anon, 4096);
        assert_eq!(scanned.rss.file, 100);
        assert_eq!(scanned.rss.shmem, 300);
        assert!(scanned.needs_seed());
        scanned.apply_kernel_rss([10, 20, 0, 30], 0b1011);
        assert!(!scanned.needs_seed());
        assert_eq!(scanned.rss.resident(), 60);
    }

    #[test]
    fn exited_list_is_bounded() {
        let mut r = Registry::new(2);
        for pid in 1..=5 {
            r.add(Worker::new(&view(pid, 0, 1), Origin::Scan, String::new()));
            r.retire(pid, None);
        }
        assert_eq!(r.exited().map(|w| w.pid).collect::<Vec<_>>(), vec![4, 5]);
        assert!(r.find(5).is_some());
        assert!(r.find(1).is_none());
    }

    #[test]
    fn an_exited_worker_keeps_its_judgement_not_its_windows() {
        let mut r = Registry::default();
        let mut w = Worker::new(&view(10, 1, 5), Origin::Fork, "w".into());
        for k in 0..400 {
            // 1 MB a request: a leak every check judges.
            let _ = w.detector.record(f64::from(k));
        }
        let alive = w.detector.get_state();
        assert_eq!(alive.window_size, 200);
        assert!(alive.slope.is_some_and(|s| (s - 1.0).abs() < 1e-9));
        r.add(w);
        let exited = r.retire(10, None).unwrap().detector.get_state();
        assert_eq!(exited.window_size, 0);
        assert_eq!(exited.slope, alive.slope);
        assert_eq!(exited.robust_slope, alive.robust_slope);
        assert_eq!(exited.request_count, 400);
        assert_eq!(exited.high_water_mark, 399.0);
    }
}
