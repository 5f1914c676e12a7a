//! Prometheus metrics, in the OpenMetrics text format. Rendered fresh from
//! the status view at each scrape: workers come and go, and their label sets
//! go with them.
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use super::status::StatusView;
use crate::model::workers::Role;

/// Every per-worker series: the process, and where it runs (empty when
/// not in a container or pod), to join with the cluster's own series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkerLabels {
    pid: String,
    name: String,
    role: String,
    container: String,
    pod: String,
    namespace: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TypedLabels {
    #[prometheus(flatten)]
    worker: WorkerLabels,
    r#type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GenerationLabels {
    #[prometheus(flatten)]
    worker: WorkerLabels,
    generation: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    #[prometheus(flatten)]
    worker: WorkerLabels,
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HeapLabels {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RecycleLabels {
    server: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkerRecycleLabels {
    #[prometheus(flatten)]
    worker: WorkerLabels,
    server: String,
    signal: String,
    state: String,
}

type GaugeF = Gauge<f64, std::sync::atomic::AtomicU64>;

const MIB: f64 = 1024.0 * 1024.0;

/// Every series `render` exports (counters with their `_total`), checked
/// against the Grafana dashboard by a test.
pub const METRIC_NAMES: &[&str] = &[
    "memtrace_worker_rss_bytes",
    "memtrace_worker_rss_type_bytes",
    "memtrace_worker_pss_bytes",
    "memtrace_worker_uss_bytes",
    "memtrace_worker_leak_slope_bytes_per_request",
    "memtrace_worker_leak_slope_bytes_per_hour",
    "memtrace_worker_forecast_seconds_to_limit",
    "memtrace_worker_requests_total",
    "memtrace_worker_requests_in_flight",
    "memtrace_worker_page_faults_total",
    "memtrace_worker_data_bytes",
    "memtrace_worker_python_gc_objects",
    "memtrace_worker_python_gc_collections_total",
    "memtrace_worker_python_gc_collected_total",
    "memtrace_worker_python_gc_uncollectable_total",
    "memtrace_worker_mmap_bytes_total",
    "memtrace_worker_brk_grow_bytes_total",
    "memtrace_worker_leak_detections_total",
    "memtrace_worker_children",
    "memtrace_worker_children_rss_bytes",
    "memtrace_worker_children_oldest_age_seconds",
    "memtrace_worker_child_leak_detections_total",
    "memtrace_worker_fd_leak_detections_total",
    "memtrace_worker_open_fds",
    "memtrace_worker_task_leak_detections_total",
    "memtrace_worker_asyncio_tasks",
    "memtrace_orphans",
    "memtrace_worker_soft_limit_fired",
    "memtrace_worker_routes_overflowed_requests_total",
    "memtrace_route_requests_total",
    "memtrace_route_kept_bytes_per_request",
    "memtrace_route_rss_delta_mean_bytes",
    "memtrace_route_grew_ratio",
    "memtrace_soft_limit_actions_total",
    "memtrace_soft_limit_recycles_total",
    "memtrace_worker_soft_limit_action_timestamp_seconds",
    "memtrace_ringbuf_drops_total",
    "memtrace_worker_heap_samples_dropped_total",
    "memtrace_heap_samples_total",
    "memtrace_heap_samples_dropped_total",
    "memtrace_exec_cgroup_rejected_total",
    "memtrace_events_total",
    "memtrace_requests_total",
    "memtrace_requests_unattributed_total",
    "memtrace_workers",
    "memtrace_collection_active",
    "memtrace_agent_resident_bytes",
    "memtrace_agent_heap_bytes",
];

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Master => "master",
        Role::Worker => "worker",
        Role::Process => "process",
    }
}

/// The classic Prometheus text format (0.0.4) of an OpenMetrics exposition:
/// a counter's HELP and TYPE name its `_total` samples, and there are no
/// UNIT lines or `# EOF`.
pub fn to_classic_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let sep = if tail.is_empty() { "" } else { " " };
                if counters.contains(name) {
                    out.push_str(&format!("{prefix}{name}_total{sep}{tail}\n"));
                } else {
                    out.push_str(&format!("{prefix}{name}{sep}{tail}\n"));
                }
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

/// Renders every metric for the workers of `status` (the live ones, with
/// what /proc adds).
pub fn render(status: &StatusView) -> String {
    let mut registry = Registry::default();
    macro_rules! family {
        ($name:literal, $help:literal, $ty:ty) => {{
            let f = Family::<_, $ty>::default();
            registry.register($name, $help, f.clone());
            f
        }};
    }
    let rss = family!(
        "memtrace_worker_rss_bytes",
        "Resident bytes (file + anon + shmem), from the kernel's counters",
        Gauge
    );
    let rss_type: Family<TypedLabels, Gauge> = family!(
        "memtrace_worker_rss_type_bytes",
        "Resident bytes by type (anon, file, shmem; swap)",
        Gauge
    );
    let pss = family!(
        "memtrace_worker_pss_bytes",
        "Proportional set size, from smaps_rollup",
        Gauge
    );
    let uss = family!(
        "memtrace_worker_uss_bytes",
        "Unique set size (private clean + dirty), from smaps_rollup",
        Gauge
    );
    let slope: Family<WorkerLabels, GaugeF> = family!(
        "memtrace_worker_leak_slope_bytes_per_request",
        "Robust leak slope at the last check (bytes per request; bytes per second for workers without request boundaries)",
        GaugeF
    );
    let slope_hour: Family<WorkerLabels, GaugeF> = family!(
        "memtrace_worker_leak_slope_bytes_per_hour",
        "Leak slope in bytes per hour",
        GaugeF
    );
    let forecast: Family<WorkerLabels, GaugeF> = family!(
        "memtrace_worker_forecast_seconds_to_limit",
        "Seconds until the soft limit at the current slope",
        GaugeF
    );
    let requests = family!("memtrace_worker_requests", "Requests ended", Counter);
    let in_flight = family!(
        "memtrace_worker_requests_in_flight",
        "Requests in flight",
        Gauge
    );
    let faults = family!("memtrace_worker_page_faults", "User page faults", Counter);
    let data = family!(
        "memtrace_worker_data_bytes",
        "VmData: private writable mappings (heap, anonymous mmaps, stacks)",
        Gauge
    );
    let gc_objects: Family<GenerationLabels, Gauge> = family!(
        "memtrace_worker_python_gc_objects",
        "CPython GC count per generation (gc.get_count())",
        Gauge
    );
    let gc_collections: Family<GenerationLabels, Counter> = family!(
        "memtrace_worker_python_gc_collections",
        "CPython GC collections per generation",
        Counter
    );
    let gc_collected: Family<GenerationLabels, Counter> = family!(
        "memtrace_worker_python_gc_collected",
        "Objects the CPython GC collected, per generation",
        Counter
    );
    let gc_uncollectable: Family<GenerationLabels, Counter> = family!(
        "memtrace_worker_python_gc_uncollectable",
        "Objects the CPython GC found uncollectable, per generation",
        Counter
    );
    let heap_dropped = family!(
        "memtrace_worker_heap_samples_dropped",
        "Sampled heap allocations not tracked: the worker's live-block cap or the kernel map was full",
        Counter
    );
    let mmap = family!(
        "memtrace_worker_mmap_bytes",
        "Bytes mapped by mmap(2) (with --mmap-counters)",
        Counter
    );
    let brk = family!(
        "memtrace_worker_brk_grow_bytes",
        "Program-break growth",
        Counter
    );
    let detections = family!(
        "memtrace_worker_leak_detections",
        "LEAK_TREND_DETECTED reports",
        Counter
    );
    let children = family!(
        "memtrace_worker_children",
        "Live processes below the worker (what it started and never reaped)",
        Gauge
    );
    let children_rss = family!(
        "memtrace_worker_children_rss_bytes",
        "Resident bytes of the processes below the worker",
        Gauge
    );
    let children_age: Family<WorkerLabels, GaugeF> = family!(
        "memtrace_worker_children_oldest_age_seconds",
        "Age of the oldest process below the worker",
        GaugeF
    );
    let child_detections = family!(
        "memtrace_worker_child_leak_detections",
        "CHILD_LEAK_DETECTED reports",
        Counter
    );
    let fd_detections = family!(
        "memtrace_worker_fd_leak_detections",
        "FD_LEAK_DETECTED reports",
        Counter
    );
    let open_fds: Family<WorkerLabels, Gauge> = family!(
        "memtrace_worker_open_fds",
        "Open descriptors of the worker (/proc/PID/fd)",
        Gauge
    );
    let task_detections = family!(
        "memtrace_worker_task_leak_detections",
        "TASK_LEAK_DETECTED reports",
        Counter
    );
    let asyncio_tasks: Family<WorkerLabels, Gauge> = family!(
        "memtrace_worker_asyncio_tasks",
        "Live asyncio tasks of the worker (CPython 3.14+)",
        Gauge
    );
    let fired = family!(
        "memtrace_worker_soft_limit_fired",
        "1 once the worker crossed its soft limit",
        Gauge
    );
    let overflowed = family!(
        "memtrace_worker_routes_overflowed_requests",
        "Requests counted under the route \"other\" because the worker had --max-routes routes",
        Counter
    );
    // Per route (--metrics-routes): up to --max-routes series per worker.
    let route_requests: Family<RouteLabels, Counter> = family!(
        "memtrace_route_requests",
        "Requests per route (method and path, ids collapsed)",
        Counter
    );
    let route_kept: Family<RouteLabels, GaugeF> = family!(
        "memtrace_route_kept_bytes_per_request",
        "Bytes of RSS a route keeps per request (Theil-Sen slope of its cumulative growth over its last 200 requests)",
        GaugeF
    );
    let route_mean: Family<RouteLabels, GaugeF> = family!(
        "memtrace_route_rss_delta_mean_bytes",
        "Mean RSS change over a route's requests",
        GaugeF
    );
    let route_grew: Family<RouteLabels, GaugeF> = family!(
        "memtrace_route_grew_ratio",
        "Share of a route's requests whose RSS grew",
        GaugeF
    );
    let actions: Family<OutcomeLabels, Counter> = family!(
        "memtrace_soft_limit_actions",
        "Soft-limit restarts, by outcome",
        Counter
    );
    let recycles: Family<RecycleLabels, Counter> = family!(
        "memtrace_soft_limit_recycles",
        "Soft-limit recycles reaching each state (signalled, exited, replaced, timed_out, escalated, logged, skipped), by server",
        Counter
    );
    let recycled: Family<WorkerRecycleLabels, GaugeF> = family!(
        "memtrace_worker_soft_limit_action_timestamp_seconds",
        "When the soft limit acted on this worker (Unix time), with the signal and where the recycle stands",
        GaugeF
    );
    macro_rules! single {
        ($name:literal, $help:literal, $ty:ty) => {{
            let m = <$ty>::default();
            registry.register($name, $help, m.clone());
            m
        }};
    }
    let drops = single!(
        "memtrace_ringbuf_drops",
        "Kernel events dropped: ring buffer full",
        Counter
    );
    let rejected = single!(
        "memtrace_exec_cgroup_rejected",
        "Execs a selector matched outside the selected cgroups, refused in the kernel",
        Counter
    );
    let events = single!("memtrace_events", "Kernel events received", Counter);
    let requests_recorded = single!(
        "memtrace_requests",
        "Requests recorded, every worker's, exited ones included",
        Counter
    );
    let requests_unattributed = single!(
        "memtrace_requests_unattributed",
        "Request events of a process the agent did not trace (any longer)",
        Counter
    );
    let heap_samples = single!(
        "memtrace_heap_samples",
        "Heap allocations sampled while the heap tier collected",
        Counter
    );
    let heap_samples_dropped = single!(
        "memtrace_heap_samples_dropped",
        "Sampled heap allocations not tracked (a worker's cap or the kernel map full), all workers",
        Counter
    );
    let workers = single!("memtrace_workers", "Traced live processes", Gauge);
    let orphans = single!(
        "memtrace_orphans",
        "Live processes left behind by dead workers",
        Gauge
    );
    let collecting = single!(
        "memtrace_collection_active",
        "1 while allocation-site collection is on",
        Gauge
    );
    let resident = single!(
        "memtrace_agent_resident_bytes",
        "The agent's own resident set",
        Gauge
    );
    let heap: Family<HeapLabels, Gauge> = family!(
        "memtrace_agent_heap_bytes",
        "The agent's heap (glibc builds): live blocks (in_use) and freed memory the allocator keeps (free)",
        Gauge
    );

    for w in &status.workers {
        let place = w.placement.clone().unwrap_or_default();
        let labels = WorkerLabels {
            pid: w.pid.to_string(),
            name: w.name.clone(),
            role: role_name(w.role).to_string(),
            // The kubelet's names when known, else the ids the cgroup gives.
            container: place
                .container_name
                .or_else(|| place.container_id.map(|id| id.chars().take(12).collect()))
                .unwrap_or_default(),
            pod: place.pod_name.or(place.pod_uid).unwrap_or_default(),
            namespace: place.pod_namespace.unwrap_or_default(),
        };
        rss.get_or_create(&labels).set(w.rss_bytes as i64);
        for (ty, v) in [
            ("anon", w.rss.anon),
            ("file", w.rss.file),
            ("shmem", w.rss.shmem),
            ("swap", w.rss.swap),
        ] {
            let typed = TypedLabels {
                worker: labels.clone(),
                r#type: ty.to_string(),
            };
            rss_type.get_or_create(&typed).set(v as i64);
        }
        if let (Some(p), Some(u)) = (w.pss_bytes, w.uss_bytes) {
            pss.get_or_create(&labels).set(p as i64);
            uss.get_or_create(&labels).set(u as i64);
        }
        let d = &w.leak_detector;
        // The detector works in MiB; metrics are in base units (bytes).
        if let Some(s) = d.robust_slope {
            slope.get_or_create(&labels).set(s * MIB);
        }
        if let Some(s) = d.slope_mb_per_hour {
            slope_hour.get_or_create(&labels).set(s * MIB);
        }
        if let Some(s) = d.forecast_seconds_to_limit {
            forecast.get_or_create(&labels).set(s);
        }
        requests.get_or_create(&labels).inc_by(w.requests_seen);
        in_flight
            .get_or_create(&labels)
            .set(w.requests_in_flight as i64);
        faults.get_or_create(&labels).inc_by(w.faults);
        heap_dropped
            .get_or_create(&labels)
            .inc_by(w.heap_samples_dropped);
        if let Some(gc) = &w.python_gc {
            for g in 0..3 {
                let gen_labels = GenerationLabels {
                    worker: labels.clone(),
                    generation: g.to_string(),
                };
                let n = |v: i64| u64::try_from(v).unwrap_or(0);
                gc_objects
                    .get_or_create(&gen_labels)
                    .set(i64::from(gc.counts[g]));
                gc_collections
                    .get_or_create(&gen_labels)
                    .inc_by(n(gc.collections[g]));
                gc_collected
                    .get_or_create(&gen_labels)
                    .inc_by(n(gc.collected[g]));
                gc_uncollectable
                    .get_or_create(&gen_labels)
                    .inc_by(n(gc.uncollectable[g]));
            }
        }
        if let Some(v) = w.data_bytes {
            data.get_or_create(&labels).set(v as i64);
        }
        if let Some(v) = w.mmap_bytes {
            mmap.get_or_create(&labels).inc_by(v);
        }
        if let Some(v) = w.brk_grow_bytes {
            brk.get_or_create(&labels).inc_by(v);
        }
        detections.get_or_create(&labels).inc_by(w.leak_detections);
        children
            .get_or_create(&labels)
            .set(i64::try_from(w.children.count).unwrap_or(i64::MAX));
        children_rss
            .get_or_create(&labels)
            .set(i64::try_from(w.children.rss_bytes).unwrap_or(i64::MAX));
        if let Some(age) = w.children.oldest_age_secs {
            children_age.get_or_create(&labels).set(age);
        }
        child_detections
            .get_or_create(&labels)
            .inc_by(w.child_leak_detections);
        fd_detections
            .get_or_create(&labels)
            .inc_by(w.fd_leak_detections);
        task_detections
            .get_or_create(&labels)
            .inc_by(w.task_leak_detections);
        if let Some(tasks) = w.asyncio_tasks {
            asyncio_tasks
                .get_or_create(&labels)
                .set(i64::try_from(tasks).unwrap_or(i64::MAX));
        }
        if let Some(fds) = w.fds {
            open_fds
                .get_or_create(&labels)
                .set(i64::try_from(fds).unwrap_or(i64::MAX));
        }
        overflowed
            .get_or_create(&labels)
            .inc_by(w.routes_overflowed_requests);
        for r in w.route_views.iter().flat_map(|v| &v.routes) {
            let labels = RouteLabels {
                worker: labels.clone(),
                route: r.route.clone(),
            };
            route_requests.get_or_create(&labels).inc_by(r.requests);
            if let Some(k) = r.kept_per_request {
                route_kept.get_or_create(&labels).set(k.bytes);
            }
            route_mean.get_or_create(&labels).set(r.mean_delta_bytes);
            route_grew.get_or_create(&labels).set(r.grew_share);
        }
        fired
            .get_or_create(&labels)
            .set(i64::from(d.soft_limit_fired));
        if let Some(r) = &w.soft_limit {
            recycled
                .get_or_create(&WorkerRecycleLabels {
                    worker: labels.clone(),
                    server: r.server.to_string(),
                    signal: r.signal.clone(),
                    state: r.state.name().to_string(),
                })
                .set(r.acted_unix);
        }
    }
    for c in &status.agent.soft_limit.counts {
        recycles
            .get_or_create(&RecycleLabels {
                server: c.server.to_string(),
                state: c.state.name().to_string(),
            })
            .inc_by(c.count);
    }
    let agent = &status.agent;
    for (outcome, n) in [
        ("taken", agent.soft_limit.actions_taken),
        ("skipped", agent.soft_limit.actions_skipped),
    ] {
        actions
            .get_or_create(&OutcomeLabels {
                outcome: outcome.to_string(),
            })
            .inc_by(n);
    }
    drops.inc_by(agent.kernel.ringbuf_drops);
    rejected.inc_by(agent.kernel.cgroup_rejected);
    heap_samples.inc_by(agent.kernel.heap_samples);
    heap_samples_dropped.inc_by(agent.kernel.live_allocs_dropped);
    events.inc_by(agent.events_received);
    requests_recorded.inc_by(agent.requests_recorded);
    requests_unattributed.inc_by(agent.requests_unattributed);
    workers.set(agent.workers_alive as i64);
    orphans.set(agent.orphans_total as i64);
    collecting.set(i64::from(agent.collection_active));
    resident.set(i64::try_from(agent.memory.resident_bytes).unwrap_or(i64::MAX));
    for (state, bytes) in [
        ("in_use", agent.memory.heap_in_use_bytes),
        ("free", agent.memory.heap_free_bytes),
    ] {
        if let Some(bytes) = bytes {
            heap.get_or_create(&HeapLabels { state })
                .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
    }

    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = encode(&mut out, &registry);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every series the Grafana dashboard queries is one memtrace exports.
    #[test]
    fn the_dashboard_queries_only_exported_series() {
        let dashboard = include_str!("../../../deploy/grafana/memtrace-dashboard.json");
        let re = regex::Regex::new(r"memtrace_[a-z_]+").unwrap();
        let used: std::collections::BTreeSet<&str> =
            re.find_iter(dashboard).map(|m| m.as_str()).collect();
        assert!(used.len() >= 10, "the dashboard uses {used:?}");
        for name in &used {
            let known = METRIC_NAMES.iter().any(|m| name == m);
            assert!(
                known,
                "the dashboard queries {name}, which memtrace does not export"
            );
        }
    }

    /// The classic format names a counter's samples in its HELP and TYPE,
    /// and keeps every sample as it is.
    #[test]
    fn classic_text_names_counters_by_their_samples() {
        let om = "# HELP memtrace_worker_requests Requests ended.\n\
                  # TYPE memtrace_worker_requests counter\n\
                  memtrace_worker_requests_total{pid=\"1\"} 3\n\
                  # HELP memtrace_workers Traced processes.\n\
                  # TYPE memtrace_workers gauge\n\
                  # UNIT memtrace_workers processes\n\
                  memtrace_workers 2\n\
                  # EOF\n";
        assert_eq!(
            to_classic_text(om),
            "# HELP memtrace_worker_requests_total Requests ended.\n\
             # TYPE memtrace_worker_requests_total counter\n\
             memtrace_worker_requests_total{pid=\"1\"} 3\n\
             # HELP memtrace_workers Traced processes.\n\
             # TYPE memtrace_workers gauge\n\
             memtrace_workers 2\n"
        );
    }
}
