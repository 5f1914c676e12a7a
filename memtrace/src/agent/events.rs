//! Kernel events into the model: a traced process forked, exec'd or exited,
//! its RSS moved, or it ended a request.
use std::time::Instant;

use memtrace_common::ProcessEvent;
use tracing::{info, warn};

use super::state::{MB, State};
use crate::{
    judge::softlimit::log_recycle,
    kernel::events::{KernelEvent, c_str},
    model::{
        procinfo::{self, ProcessView},
        requests::{RequestRecord, WallClock},
        workers::{Origin, Worker},
    },
};

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
        self.tracer.detach_alloc_probes(pid);
        // A worker memtrace retired: its exit is timed here, to the event.
        if let Some(recycle) = self.enforcer.worker_exited(pid, Instant::now()) {
            log_recycle(&recycle);
        }
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
            mmap_bytes = self.tracer.mmap_counted(w.stats.mmap_bytes),
            brk_grow_bytes = self.tracer.mmap_counted(w.stats.brk_grow_bytes),
            requests = w.stats.requests_ended,
            traced_secs = lifetime.as_secs_f64(),
            "worker exited"
        );
    }

    fn on_request(&mut self, ev: &memtrace_common::RequestEvent, clock: &WallClock) {
        let settings = self.request_settings;
        let Some(w) = self.registry.get_mut(ev.tgid) else {
            return;
        };
        let record = RequestRecord::from_event(ev, w.requests.next_seq(), &w.rss, &settings, clock);
        w.apply_kernel_rss(ev.rss_after, ev.known_after);
        record.log();
        let rss_mb = record.rss_after_bytes as f64 / MB;
        w.requests.push(record);
        let detection = w.detector.record_at(rss_mb, ev.end_ns as f64 / 1e9);
        if let Some(d) = detection {
            self.on_detection(ev.tgid, d);
        }
    }
}
