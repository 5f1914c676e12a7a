//! Requests as the agent keeps them: one record per kernel summary, a
//! bounded history per worker, and the plan's per-request log line.
use std::{
    collections::VecDeque,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use memtrace_common::{
    MM_ANONPAGES, MM_FILEPAGES, MM_SHMEMPAGES, REQ_FDS_KNOWN, REQ_GC_KNOWN, REQUEST_ABORTED,
    REQUEST_INTERLEAVED, RSS_MEMBERS, RequestEvent,
};
use serde::Serialize;

use super::{
    routes::{DEFAULT_MAX_ROUTES, HttpLine, Kept, RouteTable},
    rss::RssBreakdown,
};

const MB: f64 = 1024.0 * 1024.0;

/// Target of the plan's request lines (`--log-format plan`), which the
/// logger prints as they are.
pub const PLAN_TARGET: &str = "memtrace::request";

/// Per-request log thresholds, as the plan's middleware had them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RequestSettings {
    /// Above this RSS growth a request is logged at INFO as HIGH_MEMORY_USAGE.
    pub high_memory_bytes: u64,
    /// Above this it is logged at WARN as SPIKE_DETECTED.
    pub spike_bytes: u64,
    /// Requests kept per worker.
    pub history: usize,
    /// The kernel counts mmap/munmap/brk bytes (`--mmap-counters`); without,
    /// a record's mmap and brk fields are absent, not zero.
    pub mmap_counters: bool,
    /// Routes kept per worker (the rest count as "other").
    pub max_routes: usize,
    /// Per-route series on /metrics.
    pub metrics_routes: bool,
}

impl Default for RequestSettings {
    fn default() -> Self {
        Self {
            high_memory_bytes: 5 * 1024 * 1024,
            spike_bytes: 10 * 1024 * 1024,
            history: 1000,
            mmap_counters: false,
            max_routes: DEFAULT_MAX_ROUTES,
            metrics_routes: false,
        }
    }
}

/// How a request's memory growth is classified in the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestLevel {
    Normal,
    HighMemoryUsage,
    SpikeDetected,
}

impl RequestLevel {
    pub fn classify(delta_bytes: i64, settings: &RequestSettings) -> Self {
        if delta_bytes > settings.spike_bytes as i64 {
            Self::SpikeDetected
        } else if delta_bytes > settings.high_memory_bytes as i64 {
            Self::HighMemoryUsage
        } else {
            Self::Normal
        }
    }
}

/// One request of one worker.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RequestRecord {
    /// `PID-SEQ`: unique per agent run, for correlating log lines.
    pub request_id: RequestId,
    /// 1-based number of the request in its worker, in the order they ended.
    pub seq: u64,
    /// The kernel's start-order number (0-based).
    pub kernel_seq: u64,
    pub pid: u32,
    pub tid: u32,
    /// Socket mode, HTTP/1.x: the method and path (no query string).
    pub method: Option<String>,
    pub path: Option<String>,
    /// The path was cut at the kernel's cap or its end never came.
    pub path_truncated: bool,
    /// The path with ids collapsed: "GET /orders/:id".
    pub route: Option<String>,
    /// Milliseconds since the Unix epoch.
    pub started_unix_ms: f64,
    pub duration_ms: f64,
    pub rss_before_bytes: u64,
    pub rss_after_bytes: u64,
    /// RSS growth over the request (after - before), by the members the
    /// kernel saw at both ends.
    pub delta_bytes: i64,
    pub anon_delta_bytes: i64,
    pub file_delta_bytes: i64,
    pub shmem_delta_bytes: i64,
    /// Page faults this thread took during the request.
    pub faults: u64,
    /// mmap/munmap/brk bytes of the thread during the request: only with
    /// `--mmap-counters`.
    pub mmap_bytes: Option<u64>,
    pub munmap_bytes: Option<u64>,
    pub brk_grow_bytes: Option<u64>,
    pub brk_shrink_bytes: Option<u64>,
    /// The thread exited mid-request.
    pub aborted: bool,
    /// Socket mode: other requests were read on its thread meanwhile (an
    /// async server), so its memory deltas are shared with them.
    pub interleaved: bool,
    pub level: RequestLevel,
    /// Live processes below the worker when the request was recorded.
    pub children: u64,
    /// Processes its thread started during the request and still alive at
    /// its end (the plan's `browser_delta`), from the kernel's fork and
    /// exit events.
    pub children_delta: i64,
    /// Their resident bytes (/proc/PID/statm) when the request is recorded.
    pub children_rss_delta_bytes: i64,
    /// Open descriptors of the worker at the request's end and their change
    /// since its start, the request's own connection not counted: read by
    /// the kernel from the worker's descriptor table at both ends.
    pub fds: Option<u64>,
    pub fd_delta: Option<i64>,
    /// CPython's GC during the request (over its three generations): read
    /// by the kernel from the worker's memory at both ends.
    pub gc_collections_delta: Option<i64>,
    pub gc_collected_delta: Option<i64>,
    pub gc_uncollectable_delta: Option<i64>,
    /// USS change: not measured per request (see `unavailable`).
    pub uss_delta_bytes: Option<i64>,
    /// Live asyncio tasks of the worker when the agent recorded the
    /// request, and their change since its previous count (CPython 3.14+).
    pub tasks: Option<u64>,
    pub task_delta: Option<i64>,
    /// Why each null field above is null.
    pub unavailable: Unavailable,
}

/// Why a request's optional field is null: never 0 for "unknown".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Unavailable {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fd_delta: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gc: Option<&'static str>,
    pub uss_delta: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tasks: Option<&'static str>,
}

/// Why a request has no `tasks`.
pub const TASKS_NONE: &str =
    "no asyncio tasks read: not CPython 3.14+, or its _asyncio module is not loaded";
pub const TASKS_FIRST: &str =
    "task_delta: the worker's first request with a count, nothing to measure it from";
pub const TASKS_UNREAD: &str = "its asyncio task lists could not be read, or hold more than 10000 tasks (counted at refresh only)";

/// Why a request has no `uss_delta`.
pub const USS_PER_REQUEST: &str = "USS needs a walk of the worker's page tables (smaps_rollup): it is measured at refresh for the soft limit, not at each request's ends";
/// Why a request has no `fd_delta`.
pub const FDS_ABORTED: &str =
    "the request was aborted (its thread exited or its client left before an answer)";
pub const FDS_UNREAD: &str = "the kernel did not count the worker's descriptors (--no-fd-counts, no descriptor-table offsets in its BTF, or a table over 4096 descriptors)";
/// Why a request has no GC deltas.
pub const GC_NOT_PYTHON: &str = "not a CPython worker whose GC state memtrace located";
pub const GC_UNREAD: &str = "the request ended outside the worker (its connection closed in the network stack), where the worker's memory cannot be read, or began before its GC's state was located";

impl Unavailable {
    /// What the kernel left unknown in `ev`; `gc_located`: the worker's GC
    /// totals are read by the kernel.
    pub fn of(ev: &RequestEvent, gc_located: bool) -> Self {
        let aborted = ev.status == REQUEST_ABORTED;
        Self {
            fd_delta: (ev.known & REQ_FDS_KNOWN == 0).then_some(if aborted {
                FDS_ABORTED
            } else {
                FDS_UNREAD
            }),
            gc: (ev.known & REQ_GC_KNOWN == 0).then_some(match (gc_located, aborted) {
                (false, _) => GC_NOT_PYTHON,
                (true, true) => FDS_ABORTED,
                (true, false) => GC_UNREAD,
            }),
            uss_delta: USS_PER_REQUEST,
            tasks: Some(TASKS_NONE),
        }
    }
}

/// `PID-SEQ`, written out only when shown: a request costs no allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestId {
    pub pid: u32,
    pub seq: u64,
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.pid, self.seq)
    }
}

impl Serialize for RequestId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Converts CLOCK_MONOTONIC nanoseconds (bpf_ktime_get_ns) to wall time,
/// with both clocks read once (per batch of events, not per event).
#[derive(Clone, Copy, Debug)]
pub struct WallClock {
    wall: SystemTime,
    mono_ns: u64,
}

impl WallClock {
    pub fn now() -> Self {
        let wall = SystemTime::now();
        let mono_ns = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
            .map_or(0, |t| Duration::from(t).as_nanos() as u64);
        Self { wall, mono_ns }
    }

    pub fn wall(&self, mono_ns: u64) -> SystemTime {
        if mono_ns <= self.mono_ns {
            self.wall
                .checked_sub(Duration::from_nanos(self.mono_ns - mono_ns))
                .unwrap_or(self.wall)
        } else {
            self.wall + Duration::from_nanos(mono_ns - self.mono_ns)
        }
    }
}

impl RequestRecord {
    /// Builds the record for a kernel summary. `current` fills in members
    /// the kernel had not seen at one of the ends (their growth counts 0).
    pub fn from_event(
        ev: &RequestEvent,
        seq: u64,
        current: &RssBreakdown,
        settings: &RequestSettings,
        clock: &WallClock,
    ) -> Self {
        let fallback = |m: usize| -> i64 {
            let bytes = match m {
                MM_FILEPAGES => current.file,
                MM_ANONPAGES => current.anon,
                MM_SHMEMPAGES => current.shmem,
                _ => current.swap,
            };
            bytes as i64
        };
        let mut before = [0i64; RSS_MEMBERS];
        let mut after = [0i64; RSS_MEMBERS];
        for m in 0..RSS_MEMBERS {
            let bit = 1 << m;
            (before[m], after[m]) = match (ev.known_before & bit != 0, ev.known_after & bit != 0) {
                (true, true) => (ev.rss_before[m], ev.rss_after[m]),
                (false, true) => (ev.rss_after[m], ev.rss_after[m]),
                _ => (fallback(m), fallback(m)),
            };
        }
        let resident = |r: &[i64; RSS_MEMBERS]| {
            (r[MM_FILEPAGES] + r[MM_ANONPAGES] + r[MM_SHMEMPAGES]).max(0) as u64
        };
        let delta = |m: usize| after[m] - before[m];
        let delta_bytes = delta(MM_FILEPAGES) + delta(MM_ANONPAGES) + delta(MM_SHMEMPAGES);
        let started = clock.wall(ev.start_ns);
        let counted = |v: u64| settings.mmap_counters.then_some(v);
        let line = HttpLine::from_kernel(&ev.line);
        let gc = |i: usize| (ev.known & REQ_GC_KNOWN != 0).then_some(ev.gc_delta[i] as i64);
        Self {
            request_id: RequestId { pid: ev.tgid, seq },
            seq,
            kernel_seq: ev.seq,
            pid: ev.tgid,
            tid: ev.tid,
            route: line.as_ref().map(HttpLine::route),
            path_truncated: line.as_ref().is_some_and(|l| l.truncated),
            method: line.as_ref().map(|l| l.method.clone()),
            path: line.map(|l| l.path),
            started_unix_ms: started
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64() * 1000.0),
            duration_ms: ev.end_ns.saturating_sub(ev.start_ns) as f64 / 1e6,
            rss_before_bytes: resident(&before),
            rss_after_bytes: resident(&after),
            delta_bytes,
            anon_delta_bytes: delta(MM_ANONPAGES),
            file_delta_bytes: delta(MM_FILEPAGES),
            shmem_delta_bytes: delta(MM_SHMEMPAGES),
            faults: ev.faults,
            mmap_bytes: counted(ev.mmap_bytes),
            munmap_bytes: counted(ev.munmap_bytes),
            brk_grow_bytes: counted(ev.brk_grow_bytes),
            brk_shrink_bytes: counted(ev.brk_shrink_bytes),
            aborted: ev.status == REQUEST_ABORTED,
            interleaved: ev.status == REQUEST_INTERLEAVED,
            level: RequestLevel::classify(delta_bytes, settings),
            children: 0,
            children_delta: 0,
            children_rss_delta_bytes: 0,
            fds: (ev.known & REQ_FDS_KNOWN != 0).then_some(u64::from(ev.fds_after)),
            fd_delta: (ev.known & REQ_FDS_KNOWN != 0)
                .then(|| i64::from(ev.fds_after) - i64::from(ev.fds_before)),
            gc_collections_delta: gc(0),
            gc_collected_delta: gc(1),
            gc_uncollectable_delta: gc(2),
            uss_delta_bytes: None,
            tasks: None,
            task_delta: None,
            unavailable: Unavailable::of(ev, false),
        }
    }

    /// The plan's log line: `[ID] | [pid-N] | GET /path | duration=12ms |
    /// memory=100MB->101MB | delta=+1.0MB | browsers=1 | browser_delta=+1`,
    /// fields it leaves out when 0 left out as it did, and the level's word
    /// last (`SPIKE_DETECTED`, `HIGH_MEMORY_USAGE`).
    pub fn plan_line(&self) -> String {
        let mut parts = vec![
            format!("[{}]", self.request_id),
            format!("[pid-{}]", self.pid),
            format!(
                "{} {}",
                self.method.as_deref().unwrap_or("-"),
                self.path.as_deref().unwrap_or("-")
            ),
            format!("duration={:.0}ms", self.duration_ms),
            format!(
                "memory={:.0}MB->{:.0}MB",
                self.rss_before_bytes as f64 / MB,
                self.rss_after_bytes as f64 / MB
            ),
            format!("delta={:+.1}MB", self.delta_bytes as f64 / MB),
        ];
        if let Some(uss) = self.uss_delta_bytes {
            parts.push(format!("uss_delta={:+.1}MB", uss as f64 / MB));
        }
        if let Some(tasks) = self.tasks {
            parts.push(format!("tasks={tasks}"));
        }
        if let Some(delta) = self.task_delta.filter(|&d| d != 0) {
            parts.push(format!("task_delta={delta:+}"));
        }
        if self.children > 0 {
            parts.push(format!("browsers={}", self.children));
        }
        if self.children_delta != 0 {
            parts.push(format!("browser_delta={:+}", self.children_delta));
            parts.push(format!(
                "children_rss_delta={:+.1}MB",
                self.children_rss_delta_bytes as f64 / MB
            ));
        }
        if let Some(fds) = self.fd_delta.filter(|&d| d != 0) {
            parts.push(format!("fd_delta={fds:+}"));
        }
        if let Some(gc) = self.gc_uncollectable_delta.filter(|&d| d != 0) {
            parts.push(format!("gc_uncollectable_delta={gc:+}"));
        }
        if let Some(gc) = self.gc_collections_delta.filter(|&d| d != 0) {
            parts.push(format!("gc_collections_delta={gc:+}"));
        }
        match self.level {
            RequestLevel::SpikeDetected => parts.push("SPIKE_DETECTED".into()),
            RequestLevel::HighMemoryUsage => parts.push("HIGH_MEMORY_USAGE".into()),
            RequestLevel::Normal => {}
        }
        parts.join(" | ")
    }

    /// The plan's middleware log line, as a structured event; with `plan`,
    /// as the plan's own text line.
    pub fn log(&self, plan: bool) {
        if plan {
            let line = self.plan_line();
            match self.level {
                RequestLevel::SpikeDetected => tracing::warn!(target: PLAN_TARGET, "{line}"),
                RequestLevel::HighMemoryUsage => tracing::info!(target: PLAN_TARGET, "{line}"),
                RequestLevel::Normal => tracing::debug!(target: PLAN_TARGET, "{line}"),
            }
            return;
        }
        macro_rules! emit {
            ($level:ident, $msg:literal) => {
                tracing::$level!(
                    request_id = %self.request_id,
                    method = self.method.as_deref(),
                    path = self.path.as_deref(),
                    route = self.route.as_deref(),
                    pid = self.pid,
                    tid = self.tid,
                    duration_ms = self.duration_ms,
                    rss_before_mb = self.rss_before_bytes as f64 / MB,
                    rss_after_mb = self.rss_after_bytes as f64 / MB,
                    delta_mb = self.delta_bytes as f64 / MB,
                    faults = self.faults,
                    mmap_bytes = self.mmap_bytes,
                    munmap_bytes = self.munmap_bytes,
                    brk_grow_bytes = self.brk_grow_bytes,
                    aborted = self.aborted,
                    interleaved = self.interleaved,
                    children = self.children,
                    children_delta = self.children_delta,
                    children_rss_delta_bytes = self.children_rss_delta_bytes,
                    fds = self.fds,
                    fd_delta = self.fd_delta,
                    gc_collections_delta = self.gc_collections_delta,
                    gc_collected_delta = self.gc_collected_delta,
                    gc_uncollectable_delta = self.gc_uncollectable_delta,
                    tasks = self.tasks,
                    task_delta = self.task_delta,
                    $msg
                )
            };
        }
        match self.level {
            RequestLevel::SpikeDetected => emit!(warn, "SPIKE_DETECTED"),
            RequestLevel::HighMemoryUsage => emit!(info, "HIGH_MEMORY_USAGE"),
            RequestLevel::Normal => emit!(debug, "request"),
        }
    }
}

/// A worker's recent requests and its totals.
#[derive(Clone, Debug)]
pub struct RequestLog {
    records: VecDeque<RequestRecord>,
    capacity: usize,
    /// Requests and memory per route.
    pub routes: RouteTable,
    /// Requests ended (normally or aborted) since the worker was found.
    pub seen: u64,
    pub aborted: u64,
}

impl RequestLog {
    pub fn new(capacity: usize) -> Self {
        Self::with_routes(capacity, DEFAULT_MAX_ROUTES)
    }

    pub fn with_routes(capacity: usize, max_routes: usize) -> Self {
        Self {
            records: VecDeque::with_capacity(capacity.min(1024)),
            capacity: capacity.max(1),
            routes: RouteTable::new(max_routes),
            seen: 0,
            aborted: 0,
        }
    }

    /// The number the next request gets.
    pub fn next_seq(&self) -> u64 {
        self.seen + 1
    }

    /// For a worker that exited (its history is for a post-mortem): keeps
    /// only the last `n` records and its routes' counts and figures (see
    /// [`RouteTable::freeze`]), and gives back the room of the rest.
    pub fn keep_last(&mut self, n: usize) {
        let extra = self.records.len().saturating_sub(n);
        self.records.drain(..extra);
        self.records.shrink_to_fit();
        self.capacity = self.capacity.min(n).max(1);
        self.routes.freeze();
    }

    pub fn push(&mut self, record: RequestRecord) {
        self.seen += 1;
        if record.aborted {
            self.aborted += 1;
        } else {
            self.routes.record(
                record.route.as_deref(),
                record.delta_bytes,
                record.interleaved,
            );
            let route = record.route.as_deref();
            self.routes
                .record_kept(route, Kept::Children, record.children_delta);
            self.routes
                .record_kept(route, Kept::Fds, record.fd_delta.unwrap_or(0));
            self.routes
                .record_kept(route, Kept::Tasks, record.task_delta.unwrap_or(0));
        }
        if self.records.len() == self.capacity {
            self.records.pop_front();
        }
        self.records.push_back(record);
    }

    /// Newest first.
    pub fn recent(&self, limit: usize) -> impl Iterator<Item = &RequestRecord> {
        self.records.iter().rev().take(limit)
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    pub fn last(&self) -> Option<&RequestRecord> {
        self.records.back()
    }
}

impl Default for RequestLog {
    fn default() -> Self {
        Self::new(RequestSettings::default().history)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(before: [i64; 4], after: [i64; 4], kb: u32, ka: u32) -> RequestEvent {
        RequestEvent {
            tgid: 9,
            tid: 9,
            start_ns: 1_000_000,
            end_ns: 3_500_000,
            rss_before: before,
            rss_after: after,
            known_before: kb,
            known_after: ka,
            faults: 16,
            ..Default::default()
        }
    }

    #[test]
    fn delta_counts_members_known_at_both_ends() {
        let current = RssBreakdown {
            file: 1000,
            anon: 0,
            shmem: 50,
            swap: 0,
        };
        // file (bit 0) and anon (bit 1) known at both ends, shmem never.
        let ev = event([4096, 8192, 0, 0], [4096, 73728, 0, 0], 0b11, 0b11);
        let r = RequestRecord::from_event(
            &ev,
            1,
            &current,
            &RequestSettings::default(),
            &WallClock::now(),
        );
        assert_eq!(r.delta_bytes, 65536);
        assert_eq!(r.anon_delta_bytes, 65536);
        assert_eq!(r.shmem_delta_bytes, 0);
        assert_eq!(r.rss_before_bytes, 4096 + 8192 + 50);
        assert_eq!(r.duration_ms, 2.5);
        assert_eq!(r.request_id.to_string(), "9-1");
        assert_eq!(r.level, RequestLevel::Normal);
    }

    #[test]
    fn member_first_seen_mid_request_counts_no_growth() {
        let ev = event([0, 8192, 0, 0], [500, 9000, 0, 0], 0b10, 0b11);
        let r = RequestRecord::from_event(
            &ev,
            1,
            &RssBreakdown::default(),
            &RequestSettings::default(),
            &WallClock::now(),
        );
        assert_eq!(r.file_delta_bytes, 0);
        assert_eq!(r.anon_delta_bytes, 808);
    }

    #[test]
    fn levels_follow_the_plans_thresholds() {
        let s = RequestSettings::default();
        assert_eq!(
            RequestLevel::classify(5 * 1024 * 1024, &s),
            RequestLevel::Normal
        );
        assert_eq!(
            RequestLevel::classify(6 * 1024 * 1024, &s),
            RequestLevel::HighMemoryUsage
        );
        assert_eq!(
            RequestLevel::classify(11 * 1024 * 1024, &s),
            RequestLevel::SpikeDetected
        );
        assert_eq!(
            RequestLevel::classify(-50 * 1024 * 1024, &s),
            RequestLevel::Normal
        );
    }

    #[test]
    fn history_is_bounded_and_counts_everything() {
        let mut log = RequestLog::new(3);
        for i in 1..=5u64 {
            let mut ev = event([0; 4], [0; 4], 0, 0);
            ev.status = if i == 2 { REQUEST_ABORTED } else { 0 };
            let r = RequestRecord::from_event(
                &ev,
                log.next_seq(),
                &RssBreakdown::default(),
                &RequestSettings::default(),
                &WallClock::now(),
            );
            log.push(r);
        }
        assert_eq!(log.seen, 5);
        assert_eq!(log.aborted, 1);
        assert_eq!(log.len(), 3);
        assert_eq!(
            log.recent(10).map(|r| r.seq).collect::<Vec<_>>(),
            vec![5, 4, 3]
        );
        // An exited worker's log keeps its last records and its counts.
        log.keep_last(2);
        assert_eq!(log.len(), 2);
        assert_eq!((log.seen, log.aborted), (5, 1));
        assert_eq!(
            log.recent(10).map(|r| r.seq).collect::<Vec<_>>(),
            vec![5, 4]
        );
    }

    #[test]
    fn descriptors_and_gc_are_null_with_a_reason_when_unread() {
        let clock = WallClock::now();
        let settings = RequestSettings::default();
        let mut ev = event([0; 4], [0; 4], 0, 0);
        ev.fds_before = 10;
        ev.fds_after = 11;
        ev.gc_delta = [1, 5, 2];
        ev.known = REQ_FDS_KNOWN | REQ_GC_KNOWN;
        let r = RequestRecord::from_event(&ev, 1, &RssBreakdown::default(), &settings, &clock);
        assert_eq!((r.fds, r.fd_delta), (Some(11), Some(1)));
        assert_eq!(
            (
                r.gc_collections_delta,
                r.gc_collected_delta,
                r.gc_uncollectable_delta
            ),
            (Some(1), Some(5), Some(2))
        );
        assert!(r.uss_delta_bytes.is_none());
        let line = r.plan_line();
        assert!(
            line.contains(" | fd_delta=+1 | gc_uncollectable_delta=+2 | gc_collections_delta=+1"),
            "{line}"
        );

        // Nothing read: null, never 0, and why.
        ev.known = 0;
        let r = RequestRecord::from_event(&ev, 2, &RssBreakdown::default(), &settings, &clock);
        assert_eq!(
            (r.fds, r.fd_delta, r.gc_uncollectable_delta),
            (None, None, None)
        );
        let why = Unavailable::of(&ev, true);
        assert_eq!(why.fd_delta, Some(FDS_UNREAD));
        assert_eq!(why.gc, Some(GC_UNREAD));
        assert_eq!(Unavailable::of(&ev, false).gc, Some(GC_NOT_PYTHON));
        ev.status = REQUEST_ABORTED;
        assert_eq!(Unavailable::of(&ev, true).fd_delta, Some(FDS_ABORTED));
        assert!(!r.plan_line().contains("fd_delta"));
    }

    #[test]
    fn the_route_that_keeps_descriptors_is_named() {
        let mut log = RequestLog::new(10);
        for (path, fds) in [("/a", 0), ("/leak", 1), ("/a", 0), ("/leak", 1), ("/b", -1)] {
            let ev = event([0; 4], [0; 4], 0, 0);
            let mut r = RequestRecord::from_event(
                &ev,
                log.next_seq(),
                &RssBreakdown::default(),
                &RequestSettings::default(),
                &WallClock::now(),
            );
            r.route = Some(format!("GET {path}"));
            r.fd_delta = Some(fds);
            log.push(r);
        }
        assert_eq!(
            log.routes.kept_route(Kept::Fds),
            Some(("GET /leak".to_string(), 1.0))
        );
        assert_eq!(log.routes.kept_route(Kept::Children), None);
    }
}
