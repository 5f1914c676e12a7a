//! Kernel events into the model: a traced process forked, exec'd or exited,
//! its RSS moved, or it ended a request.
use std::time::{Instant, SystemTime};

use memtrace_common::ProcessEvent;
use tracing::{debug, info, warn};

use super::state::{MB, State};
use crate::{
    judge::softlimit::log_recycle,
    kernel::events::{KernelEvent, c_str},
    model::{
        descendants::{Descendant, MAX_DESCENDANTS},
        procinfo::{self, ProcessView},
        requests::{RequestRecord, TASKS_FIRST, TASKS_UNREAD, Unavailable, WallClock},
        routes::Kept,
        storms,
        workers::{Origin, Worker},
    },
};

/// Live asyncio tasks past which a worker's tasks are counted at refresh
/// only, not again for every request (the count walks their list).
const TASKS_PER_REQUEST_MAX: u64 = 10_000;

impl State {
    pub(super) fn handle(&mut self, ev: KernelEvent, clock: &WallClock) {
        match ev {
            KernelEvent::Fork(ev) => self.on_fork(&ev),
            KernelEvent::Exec(ev) => self.on_exec(&ev),
            KernelEvent::Exit(ev) => self.on_exit(&ev),
            KernelEvent::Rss(ev) => {
                if let Some(w) = self.registry.get_mut(ev.tgid) {
                    w.apply_kernel_rss(ev.bytes, ev.known);
                }
            }
            KernelEvent::Request(ev) => self.on_request(&ev, clock),
        }
    }

    /// The worker a new process belongs to as a descendant, if it is one:
    /// its parent is a descendant, or a worker that is a fork of a traced
    /// process (a prefork master's worker: forked while traced, or running
    /// its traced parent's program), or a process that has served requests.
    /// A traced process that exec'd its own program (a server started by a
    /// traced shell) is a root: what it forks are its workers.
    pub(super) fn descendant_owner(&self, ppid: u32) -> Option<u32> {
        if let Some(owner) = self.descendants.owner_of(ppid) {
            return Some(owner);
        }
        let parent = self.registry.get(ppid)?;
        let fork_of_traced = parent.origin == Origin::Fork
            || self
                .registry
                .get(parent.ppid)
                .is_some_and(|gp| parent.exe.is_some() && gp.exe == parent.exe);
        let serves = parent.requests.seen > 0
            || self
                .tracer
                .kernel_stats(ppid)
                .is_some_and(|s| s.requests_started > 0);
        (fork_of_traced || serves).then_some(ppid)
    }

    fn on_fork(&mut self, ev: &ProcessEvent) {
        if self.registry.contains(ev.tgid) || self.descendants.contains(ev.tgid) {
            return;
        }
        self.count_fork(ev.ppid);
        if let Some(owner) = self.descendant_owner(ev.ppid) {
            // Watched by the kernel (its own forks, exec and exit come as
            // events), not a worker.
            let kept = self.descendants.adopt(Descendant {
                pid: ev.tgid,
                owner,
                ppid: ev.ppid,
                forked_by: ev.ptid,
                comm: c_str(&ev.comm),
                forked_ns: ev.ts_ns,
                started: SystemTime::now(),
                rss_bytes: 0,
            });
            if !kept {
                self.tracer.unwatch(ev.tgid);
                if self.descendants.dropped.is_power_of_two() {
                    warn!(
                        dropped = self.descendants.dropped,
                        max = MAX_DESCENDANTS,
                        "too many processes below the workers: new ones are not followed"
                    );
                }
            }
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
            .kernel_stats(ev.tgid)
            .is_some_and(|s| s.flags & memtrace_common::PROC_FLAG_COLLECT != 0);
        if collected {
            self.tracer.attach_alloc_probes(ev.tgid);
        }
    }

    /// Names, once, a process that forks faster than any server.
    fn count_fork(&mut self, ppid: u32) {
        let now = Instant::now();
        let Some(burst) = self.storms.forks.add(ppid, 1, now) else {
            return;
        };
        let name = self.registry.get(ppid).map_or_else(
            || self.descendants.comm_of(ppid).unwrap_or_default(),
            |w| w.name.clone(),
        );
        warn!(
            pid = ppid,
            name = %name,
            children = burst.in_window(),
            secs = burst.window_secs(now),
            limit = storms::FORK_STORM.count,
            "process forks faster than any server: still followed, its children are logged at debug level from now on"
        );
    }

    /// Names, once, a process that execs in a loop.
    fn count_exec(&mut self, pid: u32, name: &str) {
        let now = Instant::now();
        if let Some(burst) = self.storms.execs.add(pid, 1, now) {
            warn!(
                pid,
                name = %name,
                execs = burst.in_window(),
                secs = burst.window_secs(now),
                limit = storms::EXEC_STORM.count,
                "process execs in a loop: still followed, its new programs are logged at debug level from now on"
            );
        }
    }

    fn on_exec(&mut self, ev: &ProcessEvent) {
        let pid = ev.tgid;
        let filename = c_str(&ev.filename);
        self.count_exec(pid, &c_str(&ev.comm));
        if self.descendants.contains(pid) {
            // Still its worker's, under its new name (a browser, a shell).
            self.descendants.exec(pid, &c_str(&ev.comm));
            return;
        }
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
                if self.storms.execs.flagged(pid) {
                    debug!(pid, name = %view.comm, filename = %filename, "traced process exec'd; following the new program");
                } else {
                    info!(pid, name = %view.comm, filename = %filename, "traced process exec'd; following the new program");
                }
                self.attach(worker);
            }
            // A traced child became something no selector asks for.
            (1, None) => {
                self.tracer.unwatch(pid);
                if self.registry.forget(pid).is_some() {
                    info!(pid, name = %view.comm, filename = %filename, "traced process exec'd a program no selector matches; no longer traced");
                }
            }
            // Matched by name (or cgroup) in the kernel at exec, but not by
            // the agent's cgroup or container check (no kernel filter here).
            (2, None) if self.selectors.restricts_placement() => {
                self.tracer.unwatch(pid);
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
        // Exit events carry no parent: the model knows it.
        let ppid = self.registry.get(pid).map_or(0, |w| w.ppid);
        let quiet = self.storms.quiet(pid, ppid);
        self.storms.exited(pid);
        if self.descendants.exit(pid).is_some() {
            return;
        }
        self.tracer.detach_alloc_probes(pid);
        // A worker memtrace retired: its exit is timed here, to the event.
        if let Some(recycle) = self.enforcer.worker_exited(pid, Instant::now()) {
            log_recycle(&recycle);
        }
        let role = self.registry.role(pid);
        let Some(w) = self.registry.retire(pid, Some((ev.stats, ev.rss))) else {
            return;
        };
        self.heap_dirty = true;
        // Its live descendants are reparented away: orphans.
        let orphans = self.descendants.worker_exited(pid);
        let lifetime = w
            .exited_at
            .and_then(|t| t.duration_since(w.first_seen).ok())
            .unwrap_or_default();
        macro_rules! exited { ($level:ident) => { $level!(
            pid,
            ppid = w.ppid,
            role = ?role,
            name = %w.name,
            rss_bytes = w.rss.resident(),
            faults = w.stats.faults,
            mmap_bytes = self.tracer.mmap_counted(w.stats.mmap_bytes),
            brk_grow_bytes = self.tracer.mmap_counted(w.stats.brk_grow_bytes),
            requests = w.stats.requests_ended,
            traced_secs = lifetime.as_secs_f64(),
            orphans,
            "worker exited"
        ) } }
        if quiet {
            exited!(debug);
        } else {
            exited!(info);
        }
    }

    fn on_request(&mut self, ev: &memtrace_common::RequestEvent, clock: &WallClock) {
        let settings = self.request_settings;
        let Some(w) = self.registry.get_mut(ev.tgid) else {
            self.counters.requests_unattributed += 1;
            return;
        };
        self.counters.requests_recorded += 1;
        let mut record =
            RequestRecord::from_event(ev, w.requests.next_seq(), &w.rss, &settings, clock);
        w.apply_kernel_rss(ev.rss_after, ev.known_after);
        // What it left in child processes: started by its thread while it
        // ran, alive at its end.
        let started = self
            .descendants
            .started_during(ev.tgid, ev.tid, ev.start_ns, ev.end_ns);
        record.children = self.descendants.of(ev.tgid).count() as u64;
        record.children_delta = started.len() as i64;
        for &child in &started {
            let rss = procinfo::statm_rss(child).unwrap_or(0);
            self.descendants.set_rss(child, rss);
            record.children_rss_delta_bytes += rss as i64;
        }
        record.unavailable = Unavailable::of(ev, w.python_gc_in_kernel);
        // Live asyncio tasks now, and since the last count (3.14+): read
        // when the agent records the request, not in the kernel.
        if let (Some(asyncio), Some(py), Some(runtime)) = (w.asyncio, &w.python, w.python_runtime) {
            let before = w.asyncio_request_tasks;
            let now = w
                .asyncio_tasks
                .is_none_or(|n| n <= TASKS_PER_REQUEST_MAX)
                .then(|| {
                    self.python_builds
                        .asyncio_tasks(ev.tgid, py, runtime, &asyncio)
                })
                .flatten();
            record.tasks = now;
            record.task_delta = now.zip(before).map(|(n, b)| n as i64 - b as i64);
            record.unavailable.tasks = match (now, before) {
                (None, _) => Some(TASKS_UNREAD),
                (Some(_), None) => Some(TASKS_FIRST),
                _ => None,
            };
            w.asyncio_request_tasks = now;
            if now.is_some() {
                w.asyncio_tasks = now;
            }
        }
        record.log(self.log_plan);
        let rss_mb = record.rss_after_bytes as f64 / MB;
        let children = record.children as f64;
        let fds = record.fds;
        let tasks = record.tasks;
        let at = ev.end_ns as f64 / 1e9;
        let overflowed = w.requests.routes.overflowed;
        w.requests.push(record);
        if overflowed == 0 && w.requests.routes.overflowed > 0 {
            // Once per worker: paths no id collapses (a scanner, a client
            // probing the agent, ids of an unusual shape).
            warn!(
                pid = ev.tgid,
                name = %w.name,
                max_routes = w.requests.routes.max_routes(),
                "worker's route table is full: requests of further routes are counted under \"other\" (raise --max-routes if its routes are real)"
            );
        }
        let detection = w.detector.record_at(rss_mb, at);
        let child_detection = w.child_detector.record_at(children, at);
        let fd_detection = fds.and_then(|n| w.fd_detector.record_at(n as f64, at));
        let task_detection = tasks.and_then(|n| w.task_detector.record_at(n as f64, at));
        if let Some(d) = detection {
            self.on_detection(ev.tgid, d);
        }
        if let Some(d) = child_detection {
            self.on_kept_detection(ev.tgid, Kept::Children, d);
        }
        if let Some(d) = fd_detection {
            self.on_kept_detection(ev.tgid, Kept::Fds, d);
        }
        if let Some(d) = task_detection {
            self.on_kept_detection(ev.tgid, Kept::Tasks, d);
        }
    }
}
