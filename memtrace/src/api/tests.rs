//! The router against a fake backend: no socket, no root. The plan's
//! endpoint tests are ported here, with every bad input it mishandled.
use std::sync::{Arc, Mutex};

use axum::{
    Router,
    body::Body,
    http::{Request, StatusCode},
};
use http_body_util::BodyExt as _;
use serde_json::Value;
use tower::ServiceExt as _;

use super::{
    status::{AgentStatus, SoftLimitStatus, StatusView, WorkerStatus},
    *,
};
use crate::{
    judge::{
        detector::{DetectorConfig, LeakDetector},
        servers::ServerKind,
        softlimit::{
            Enforcer, OverLimit, Processes, RecycleState, SoftLimitMetric, SoftLimitSettings,
        },
    },
    kernel::loader::KernelCounters,
    model::descendants::ChildrenStatus,
    model::{
        requests::RequestRecord,
        routes::{RouteTable, RoutesView},
        rss::RssBreakdown,
        workers::{Origin, Role},
    },
    sites::render::{ProfileFormat, Rendered},
    sites::snapshot::{DiffView, SnapshotView},
    sites::view::SiteOptions,
};

const TOKEN: &str = "secret123";

#[derive(Default)]
struct Calls {
    collecting: bool,
    baseline: bool,
    last_limit: Option<usize>,
    last_pid: Option<u32>,
    last_sites: Option<SiteOptions>,
}

struct Fake {
    calls: Mutex<Calls>,
}

fn worker(pid: u32) -> WorkerStatus {
    WorkerStatus {
        pid,
        ppid: 1,
        role: Role::Worker,
        name: "srv".into(),
        exe: None,
        cmdline: "srv".into(),
        origin: Origin::Fork,
        reason: "child of 1".into(),
        alive: true,
        start_time_ticks: 5,
        first_seen_unix: 1.0,
        exited_unix: None,
        rss_bytes: 3 << 20,
        rss: RssBreakdown {
            file: 1 << 20,
            anon: 2 << 20,
            shmem: 0,
            swap: 0,
        },
        pss_bytes: Some(2 << 20),
        pss: None,
        uss_bytes: Some(1 << 20),
        memory_mb: 3.0,
        pss_mb: Some(2.0),
        uss_mb: Some(1.0),
        fds: Some(4),
        threads: Some(1),
        faults: 10,
        data_bytes: Some(8 << 20),
        mmap_bytes: Some(0),
        munmap_bytes: Some(0),
        mremap_grow_bytes: Some(0),
        mremap_shrink_bytes: Some(0),
        brk_grow_bytes: Some(0),
        brk_shrink_bytes: Some(0),
        heap_live_blocks: 0,
        heap_samples_dropped: 0,
        requests_seen: 0,
        requests_aborted: 0,
        requests_in_flight: 0,
        leak_detections: 0,
        soft_limit: None,
        placement: None,
        python: None,
        python_gc: None,
        python_frames: false,
        python_frames_error: None,
        pymalloc_probed: false,
        leak_detector: LeakDetector::new(DetectorConfig::default()).get_state(),
        routes: 0,
        routes_overflowed_requests: 0,
        leak_route: None,
        route_views: None,
        collecting: false,
        children: ChildrenStatus {
            count: 2,
            names: [("chrome".to_string(), 2)].into(),
            rss_bytes: 40 << 20,
            pss_bytes: None,
            oldest_age_secs: Some(30.0),
            orphaned: 0,
        },
        child_leak_detections: 1,
        fd_leak_detections: 2,
        asyncio_tasks: Some(7),
        asyncio_error: None,
        task_leak_detections: 3,
    }
}

impl Backend for Fake {
    fn status(&self, pid: Option<u32>) -> Result<StatusView, BackendError> {
        let calls = self.calls.lock().unwrap();
        if let Some(p) = pid.filter(|&p| p != 42) {
            return Err(BackendError::UnknownPid(p));
        }
        Ok(StatusView {
            agent: AgentStatus {
                pid: 7,
                version: "test",
                uptime_secs: 1.0,
                selectors: "name=srv".into(),
                workers_alive: 1,
                workers_exited: 0,
                events_received: 0,
                decode_errors: 0,
                requests_recorded: 0,
                requests_unattributed: 0,
                kernel: KernelCounters::default(),
                kernel_release: "6.1.0-test".into(),
                kernel_unavailable: vec!["HTTP path capture is off: test".into()],
                programs_attached: vec![],
                collection_active: calls.collecting,
                collect_tier: "heap",
                heap_sample_bytes: 524_288,
                soft_limit: SoftLimitStatus {
                    metric: SoftLimitMetric::Rss,
                    actions_taken: 0,
                    actions_skipped: 0,
                    pending: vec![],
                    recycles: vec![],
                    counts: vec![],
                },
                orphans: vec![],
                orphans_total: 3,
                descendants_dropped: 0,
                memory: crate::api::status::AgentMemory::default(),
            },
            workers: vec![worker(42)],
        })
    }

    fn workers(&self) -> Vec<WorkerStatus> {
        vec![worker(42)]
    }

    fn worker(&self, pid: u32) -> Result<WorkerStatus, BackendError> {
        if pid == 42 {
            Ok(worker(42))
        } else {
            Err(BackendError::UnknownPid(pid))
        }
    }

    fn requests(&self, pid: u32, limit: usize) -> Result<Vec<RequestRecord>, BackendError> {
        self.calls.lock().unwrap().last_limit = Some(limit);
        if pid == 42 {
            Ok(vec![])
        } else {
            Err(BackendError::UnknownPid(pid))
        }
    }

    fn routes(&self, pid: u32) -> Result<RoutesView, BackendError> {
        if pid == 42 {
            let mut table = RouteTable::new(10);
            table.record(Some("GET /quote"), 4096, false);
            Ok(table.view())
        } else {
            Err(BackendError::UnknownPid(pid))
        }
    }

    fn snapshot(
        &self,
        pid: Option<u32>,
        limit: usize,
        sites: &SiteOptions,
    ) -> Result<SnapshotView, BackendError> {
        let mut calls = self.calls.lock().unwrap();
        calls.last_sites = Some(sites.clone());
        if let Some(p) = pid.filter(|&p| p != 42) {
            return Err(BackendError::UnknownPid(p));
        }
        calls.collecting = true;
        calls.baseline = true;
        calls.last_limit = Some(limit);
        calls.last_pid = pid;
        Ok(SnapshotView {
            taken_unix: 1.0,
            view: sites.view,
            unresolved: Default::default(),
            pids: vec![42],
            top_allocations: vec![],
            top_page_faults: vec![],
            top_mapping_calls: vec![],
            mappings: vec![],
        })
    }

    fn diff(
        &self,
        _pid: Option<u32>,
        limit: usize,
        sites: &SiteOptions,
    ) -> Result<DiffView, BackendError> {
        let mut calls = self.calls.lock().unwrap();
        calls.last_sites = Some(sites.clone());
        if !calls.baseline {
            return Err(BackendError::NoBaseline);
        }
        calls.last_limit = Some(limit);
        Ok(DiffView {
            since_unix: 1.0,
            taken_unix: 2.0,
            view: sites.view,
            unresolved: Default::default(),
            still_growing: sites.still_growing,
            pids: vec![42],
            growth: vec![],
            fault_growth: vec![],
            mapping_call_growth: vec![],
            mappings: vec![],
        })
    }

    fn snapshot_profile(
        &self,
        pid: Option<u32>,
        format: ProfileFormat,
        sites: &SiteOptions,
    ) -> Result<Rendered, BackendError> {
        self.snapshot(pid, 1, sites)?;
        Ok(Rendered {
            content_type: format.content_type(),
            body: format!("snapshot {format:?}").into_bytes(),
        })
    }

    fn diff_profile(
        &self,
        pid: Option<u32>,
        format: ProfileFormat,
        sites: &SiteOptions,
    ) -> Result<Rendered, BackendError> {
        self.diff(pid, 1, sites)?;
        Ok(Rendered {
            content_type: format.content_type(),
            body: format!("diff {format:?}").into_bytes(),
        })
    }

    fn heap_profile(&self, pid: Option<u32>) -> Result<Rendered, BackendError> {
        if let Some(p) = pid.filter(|&p| p != 42) {
            return Err(BackendError::UnknownPid(p));
        }
        self.calls.lock().unwrap().collecting = true;
        Ok(Rendered {
            content_type: ProfileFormat::Pprof.content_type(),
            body: b"heap pprof".to_vec(),
        })
    }

    fn stop(&self) -> Result<StopView, BackendError> {
        let mut calls = self.calls.lock().unwrap();
        calls.collecting = false;
        calls.baseline = false;
        Ok(StopView {
            status: "collection stopped",
            collection_active: false,
            programs_detached: 3,
        })
    }

    fn metrics(&self) -> String {
        "# HELP memtrace_events Events.\n# TYPE memtrace_events counter\nmemtrace_events_total 1\n# EOF\n"
            .into()
    }
}

struct Harness {
    fake: Arc<Fake>,
    router: Router,
}

fn harness(token: Option<&str>) -> Harness {
    let fake = Arc::new(Fake {
        calls: Mutex::new(Calls::default()),
    });
    let state = ApiState::new(fake.clone(), Token::new(token.map(str::to_string)));
    Harness {
        fake,
        router: app(state),
    }
}

impl Harness {
    async fn get(&self, uri: &str) -> (StatusCode, Value) {
        self.get_with(uri, &[]).await
    }

    async fn get_with(&self, uri: &str, headers: &[(&str, &str)]) -> (StatusCode, Value) {
        let mut req = Request::builder().uri(uri);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        self.send(req.body(Body::empty()).unwrap()).await
    }

    async fn send(&self, req: Request<Body>) -> (StatusCode, Value) {
        let resp = self.router.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        (status, body)
    }
}

fn with_token(path_and_query: &str) -> String {
    let sep = if path_and_query.contains('?') {
        '&'
    } else {
        '?'
    };
    format!("{path_and_query}{sep}token={TOKEN}")
}

// ── The plan's endpoint tests ──────────────────────────────────────

#[tokio::test]
async fn pprof_heap_follows_the_token_rules() {
    let h = harness(Some(TOKEN));
    assert_eq!(h.get("/debug/pprof/heap").await.0, StatusCode::FORBIDDEN);
    assert_eq!(
        h.get("/debug/pprof/heap?token=wrong").await.0,
        StatusCode::FORBIDDEN
    );
    let (status, body) = h
        .get_with("/debug/pprof/heap", &[("x-debug-token", TOKEN)])
        .await;
    assert_eq!((status, body), (StatusCode::OK, Value::from("heap pprof")));
    assert!(h.fake.calls.lock().unwrap().collecting);
    assert_eq!(
        h.get(&with_token("/debug/pprof/heap?pid=7")).await.0,
        StatusCode::NOT_FOUND
    );
    let (status, body) = h.get(&with_token("/debug/pprof/heap?seconds=x")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    for configured in [Some(""), None] {
        let off = harness(configured);
        assert_eq!(
            off.get("/debug/pprof/heap?token=x").await.0,
            StatusCode::FORBIDDEN
        );
    }
}

#[tokio::test]
async fn snapshot_and_diff_render_other_formats() {
    let h = harness(Some(TOKEN));
    let (status, body) = h
        .get(&with_token("/debug/memory/?action=snapshot&format=svg"))
        .await;
    assert_eq!(
        (status, body),
        (StatusCode::OK, Value::from("snapshot Svg"))
    );
    let (status, body) = h
        .get(&with_token("/debug/memory/?action=diff&format=folded"))
        .await;
    assert_eq!((status, body), (StatusCode::OK, Value::from("diff Folded")));
    let (status, body) = h
        .get(&with_token("/debug/memory/?action=snapshot&format=json"))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["pids"][0], 42);
    let (status, body) = h
        .get(&with_token("/debug/memory/?action=snapshot&format=png"))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("pprof, folded, svg"),
        "{body}"
    );
    let (status, _) = h
        .get(&with_token("/debug/memory/?action=status&format=pprof"))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn missing_token_returns_403() {
    let h = harness(Some(TOKEN));
    let (status, body) = h.get("/debug/memory/").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(body["error"], "Forbidden");
}

#[tokio::test]
async fn wrong_token_returns_403() {
    let h = harness(Some(TOKEN));
    assert_eq!(
        h.get("/debug/memory/?token=wrong").await.0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        h.get_with("/debug/memory/", &[("x-debug-token", "wrong")])
            .await
            .0,
        StatusCode::FORBIDDEN
    );
}

#[tokio::test]
async fn correct_token_returns_200() {
    let h = harness(Some(TOKEN));
    assert_eq!(
        h.get(&with_token("/debug/memory/?action=status")).await.0,
        StatusCode::OK
    );
    assert_eq!(
        h.get_with("/debug/memory/?action=status", &[("x-debug-token", TOKEN)])
            .await
            .0,
        StatusCode::OK
    );
    let bearer = format!("Bearer {TOKEN}");
    assert_eq!(
        h.get_with("/debug/memory/", &[("authorization", &bearer)])
            .await
            .0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn empty_token_config_disables_endpoint() {
    for configured in [Some(""), None] {
        let h = harness(configured);
        let (status, _) = h.get("/debug/memory/?token=anything&action=status").await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        let (status, _) = h.get("/debug/memory/?token=&action=status").await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert_eq!(h.get("/v1/workers?token=").await.0, StatusCode::FORBIDDEN);
    }
}

#[tokio::test]
async fn status_action_returns_memory_and_detector_state() {
    let h = harness(Some(TOKEN));
    let (status, body) = h.get(&with_token("/debug/memory/?action=status")).await;
    assert_eq!(status, StatusCode::OK);
    let w = &body["workers"][0];
    for field in [
        "memory_mb",
        "uss_mb",
        "pss_mb",
        "rss_bytes",
        "rss",
        "faults",
        "leak_detector",
    ] {
        assert!(!w[field].is_null(), "worker field {field} missing: {w}");
    }
    for field in [
        "slope",
        "high_water_mark",
        "request_count",
        "window_size",
        "soft_limit_fired",
    ] {
        assert!(
            w["leak_detector"].get(field).is_some(),
            "detector field {field}"
        );
    }
    assert!(body["agent"]["collection_active"].is_boolean());
    // The plan's default action is status.
    let (status, body) = h.get(&with_token("/debug/memory/")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body["workers"].is_array());
}

#[tokio::test]
async fn snapshot_action_starts_collection() {
    let h = harness(Some(TOKEN));
    let (status, body) = h.get(&with_token("/debug/memory/?action=snapshot")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body["top_allocations"].is_array());
    assert!(h.fake.calls.lock().unwrap().collecting);
    let (_, status_body) = h.get(&with_token("/debug/memory/?action=status")).await;
    assert_eq!(status_body["agent"]["collection_active"], true);
}

#[tokio::test]
async fn stop_action_stops_collection() {
    let h = harness(Some(TOKEN));
    h.get(&with_token("/debug/memory/?action=snapshot")).await;
    let (status, body) = h.get(&with_token("/debug/memory/?action=stop")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["collection_active"], false);
    assert!(!h.fake.calls.lock().unwrap().collecting);
}

// ── Diff and the bad inputs the plan's endpoint crashed on ────────

#[tokio::test]
async fn diff_without_snapshot_says_to_take_one() {
    let h = harness(Some(TOKEN));
    let (status, body) = h.get(&with_token("/debug/memory/?action=diff")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["error"].as_str().unwrap().contains("action=snapshot"),
        "{body}"
    );
    h.get(&with_token("/debug/memory/?action=snapshot")).await;
    assert_eq!(
        h.get(&with_token("/debug/memory/?action=diff")).await.0,
        StatusCode::OK
    );
    h.get(&with_token("/debug/memory/?action=stop")).await;
    assert_eq!(
        h.get(&with_token("/debug/memory/?action=diff")).await.0,
        StatusCode::BAD_REQUEST,
        "stop drops the baseline"
    );
}

#[tokio::test]
async fn views_reach_the_backend_and_bad_ones_are_refused() {
    let h = harness(Some(TOKEN));
    h.get(&with_token("/debug/memory/?action=snapshot&view=traceback"))
        .await;
    let (status, body) = h
        .get(&with_token(
            "/debug/memory/?action=diff&view=lineno&still_growing=true&hide=json",
        ))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["view"], "lineno");
    assert_eq!(body["still_growing"], true);
    let sites = h.fake.calls.lock().unwrap().last_sites.clone().unwrap();
    assert_eq!(sites.hide.as_deref(), Some("json"));
    for bad in ["view=everything", "still_growing=2", "hide=%28"] {
        let (status, body) = h
            .get(&with_token(&format!("/debug/memory/?action=diff&{bad}")))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
        assert!(body["error"].as_str().is_some(), "{body}");
    }
}

#[tokio::test]
async fn unknown_action_is_400_naming_the_valid_ones() {
    let h = harness(Some(TOKEN));
    let (status, body) = h.get(&with_token("/debug/memory/?action=explode")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let msg = body["error"].as_str().unwrap();
    assert!(msg.contains("status, snapshot, diff, stop"), "{msg}");
}

#[tokio::test]
async fn bad_limits_are_400_and_large_ones_capped() {
    let h = harness(Some(TOKEN));
    for bad in ["abc", "-1", "0", "1.5", "", "%00"] {
        let (status, body) = h
            .get(&with_token(&format!(
                "/debug/memory/?action=snapshot&limit={bad}"
            )))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "limit={bad}");
        assert!(body["error"].as_str().unwrap().contains("limit"), "{body}");
    }
    let (status, _) = h
        .get(&with_token(
            "/debug/memory/?action=snapshot&limit=1000000000",
        ))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        h.fake.calls.lock().unwrap().last_limit,
        Some(query::MAX_LIMIT)
    );
}

#[tokio::test]
async fn pids_unknown_or_malformed() {
    let h = harness(Some(TOKEN));
    let (status, body) = h
        .get(&with_token("/debug/memory/?action=status&pid=999"))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["error"].as_str().unwrap().contains("999"));
    assert_eq!(
        h.get(&with_token("/debug/memory/?action=snapshot&pid=999"))
            .await
            .0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        h.get(&with_token("/debug/memory/?action=status&pid=abc"))
            .await
            .0,
        StatusCode::BAD_REQUEST
    );
    let (status, _) = h
        .get(&with_token("/debug/memory/?action=snapshot&pid=42"))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(h.fake.calls.lock().unwrap().last_pid, Some(42));
}

#[tokio::test]
async fn long_queries_and_repeated_parameters() {
    let h = harness(Some(TOKEN));
    let long = with_token(&format!(
        "/debug/memory/?action=status&pad={}",
        "x".repeat(10_000)
    ));
    let (status, body) = h.get(&long).await;
    assert_eq!(status, StatusCode::URI_TOO_LONG);
    assert!(body["error"].is_string());
    let (status, body) = h
        .get(&with_token("/debug/memory/?action=status&action=stop"))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["error"].as_str().unwrap().contains("more than once"));
    // Two tokens: no token.
    let (status, _) = h
        .get(&format!("/debug/memory/?token={TOKEN}&token={TOKEN}"))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = h.get(&with_token("/debug/memory/?nonsense=1")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn strangers_learn_nothing_about_their_query() {
    let h = harness(Some(TOKEN));
    let (status, body) = h.get("/debug/memory/?action=explode&limit=abc").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(body["error"], "Forbidden");
}

// ── REST, health, metrics, OpenAPI ────────────────────────────────

#[tokio::test]
async fn rest_endpoints() {
    let h = harness(Some(TOKEN));
    assert_eq!(h.get("/v1/workers").await.0, StatusCode::FORBIDDEN);
    let (status, body) = h.get(&with_token("/v1/workers")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["workers"][0]["pid"], 42);
    let (status, body) = h.get(&with_token("/v1/workers/42")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["pid"], 42);
    assert_eq!(
        h.get(&with_token("/v1/workers/999")).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        h.get(&with_token("/v1/workers/abc")).await.0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        h.get(&with_token("/v1/workers/-1")).await.0,
        StatusCode::BAD_REQUEST
    );
    let (status, body) = h.get(&with_token("/v1/workers/42/requests?limit=5")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body["requests"].is_array());
    assert_eq!(h.fake.calls.lock().unwrap().last_limit, Some(5));
    assert_eq!(
        h.get(&with_token("/v1/workers/42/requests?limit=abc"))
            .await
            .0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        h.get(&with_token("/v1/workers/42/requests?limit=1&limit=2"))
            .await
            .0,
        StatusCode::BAD_REQUEST
    );
    let (status, body) = h.get(&with_token("/v1/workers/42/routes")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["routes"]["routes"][0]["route"], "GET /quote");
    assert_eq!(body["routes"]["routes"][0]["requests"], 1);
    assert_eq!(body["routes"]["overflowed_requests"], 0);
    assert_eq!(
        h.get(&with_token("/v1/workers/999/routes")).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        h.get("/v1/workers/42/routes").await.0,
        StatusCode::FORBIDDEN
    );
}

#[tokio::test]
async fn health_metrics_and_openapi_need_no_token() {
    let h = harness(Some(TOKEN));
    let (status, body) = h.get("/healthz").await;
    assert_eq!(
        (status, body["status"].as_str()),
        (StatusCode::OK, Some("ok"))
    );
    assert_eq!(h.get("/metrics").await.0, StatusCode::OK);
    let (status, doc) = h.get("/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(doc["openapi"], "3.0.3");
    for path in [
        "/debug/memory/",
        "/v1/workers",
        "/v1/workers/{pid}",
        "/v1/workers/{pid}/requests",
        "/v1/workers/{pid}/routes",
        "/healthz",
        "/metrics",
    ] {
        assert!(doc["paths"].get(path).is_some(), "{path} documented");
    }
}

#[tokio::test]
async fn unknown_routes_and_methods_are_json_4xx() {
    let h = harness(Some(TOKEN));
    let (status, body) = h.get("/nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["error"].is_string());
    let req = Request::builder()
        .method("POST")
        .uri(with_token("/debug/memory/"))
        .body(Body::empty())
        .unwrap();
    let (status, body) = h.send(req).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(body["error"].is_string());
}

#[tokio::test]
async fn odd_inputs_never_give_a_server_error() {
    let h = harness(Some(TOKEN));
    let queries = [
        "action=",
        "action=%ff%fe",
        "limit=%2B5",
        "limit=5%00",
        "pid=4294967296",
        "pid=%20",
        "=",
        "&&&",
        "token",
        "action=status&limit=",
        "a%5Bb%5D=1",
        "limit=00000000000000000001",
        "action=SNAPSHOT",
        "action=status%20",
    ];
    for q in queries {
        for path in [
            "/debug/memory/",
            "/v1/workers",
            "/v1/workers/42/requests",
            "/v1/workers/42/routes",
        ] {
            let (status, body) = h.get(&with_token(&format!("{path}?{q}"))).await;
            assert!(status.as_u16() < 500, "{path}?{q} gave {status}");
            if !status.is_success() {
                assert!(body["error"].is_string(), "{path}?{q}: {body}");
            }
        }
    }
}

#[test]
fn the_token_never_prints() {
    let t = Token::new(Some(TOKEN.into())).unwrap();
    assert!(!format!("{t:?}").contains(TOKEN));
    assert!(Token::new(Some(String::new())).is_none());
}

/// A worker the soft limit retired shows in /metrics with its signal and
/// state, and the recycles are counted by server and state.
#[test]
fn metrics_render_the_status_with_soft_limit_recycles() {
    struct One;
    impl Processes for One {
        fn start_time(&self, pid: u32) -> Option<u64> {
            (pid == 42 || pid == 1000).then_some(7)
        }
        fn in_flight(&self, _: u32) -> u64 {
            0
        }
        fn children(&self, _: u32) -> Vec<u32> {
            vec![42]
        }
        fn kill(&mut self, _: u32, _: nix::sys::signal::Signal) -> Result<(), String> {
            Ok(())
        }
    }
    let mut enforcer = Enforcer::new(SoftLimitSettings::default(), 1);
    let now = std::time::Instant::now();
    let over = OverLimit {
        worker_pid: 42,
        parent_pid: 1000,
        server: ServerKind::Gunicorn,
        measure_mb: 500.0,
        rss_mb: 500.0,
        soft_limit_mb: 450.0,
    };
    enforcer.request(&One, &over, now).unwrap();
    let done = enforcer.tick(&mut One, now);
    assert_eq!(done[0].state, RecycleState::Signalled);
    let mut w = worker(42);
    w.soft_limit = Some(done[0].clone());
    let fake = Fake {
        calls: Mutex::new(Calls::default()),
    };
    let mut status = fake.status(None).unwrap();
    status.workers = vec![w];
    status.agent.soft_limit.counts = enforcer
        .counts()
        .map(|(server, state, count)| status::RecycleCount {
            server,
            state,
            count,
        })
        .collect();
    let text = metrics::render(&status);
    assert!(
        text.contains("memtrace_worker_rss_bytes{pid=\"42\""),
        "{text}"
    );
    assert!(
        text.contains("memtrace_worker_soft_limit_action_timestamp_seconds{pid=\"42\"")
            && text.contains("server=\"gunicorn\",signal=\"SIGTERM\",state=\"signalled\""),
        "{text}"
    );
    assert!(
        text.contains(
            "memtrace_soft_limit_recycles_total{server=\"gunicorn\",state=\"signalled\"} 1"
        ),
        "{text}"
    );
    // Descendants: count, memory, age, detections; orphans agent-wide.
    for series in [
        "memtrace_worker_children{pid=\"42\",name=\"srv\",role=\"worker\",container=\"\",pod=\"\",namespace=\"\"} 2",
        "memtrace_worker_children_rss_bytes{pid=\"42\",name=\"srv\",role=\"worker\",container=\"\",pod=\"\",namespace=\"\"} 41943040",
        "memtrace_worker_children_oldest_age_seconds{pid=\"42\",name=\"srv\",role=\"worker\",container=\"\",pod=\"\",namespace=\"\"} 30.0",
        "memtrace_worker_child_leak_detections_total{pid=\"42\",name=\"srv\",role=\"worker\",container=\"\",pod=\"\",namespace=\"\"} 1",
        "memtrace_worker_fd_leak_detections_total{pid=\"42\",name=\"srv\",role=\"worker\",container=\"\",pod=\"\",namespace=\"\"} 2",
        "memtrace_worker_task_leak_detections_total{pid=\"42\",name=\"srv\",role=\"worker\",container=\"\",pod=\"\",namespace=\"\"} 3",
        "memtrace_worker_asyncio_tasks{pid=\"42\",name=\"srv\",role=\"worker\",container=\"\",pod=\"\",namespace=\"\"} 7",
        "memtrace_orphans 3",
    ] {
        assert!(text.contains(series), "{series}: {text}");
    }
}

/// Per-route series appear only with the routes filled in (--metrics-routes).
#[test]
fn metrics_have_route_series_only_when_asked() {
    let fake = Fake {
        calls: Mutex::new(Calls::default()),
    };
    let mut view = fake.status(None).unwrap();
    let text = metrics::render(&view);
    assert!(!text.contains("memtrace_route_requests_total{"), "{text}");
    assert!(text.contains("memtrace_worker_routes_overflowed_requests_total{"));
    let mut table = RouteTable::new(10);
    for _ in 0..10 {
        table.record(Some("GET /quote"), 32768, false);
    }
    view.workers[0].route_views = Some(table.view());
    let text = metrics::render(&view);
    let line = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("{name}{{")))
            .unwrap_or_else(|| panic!("{name} missing in\n{text}"))
            .to_string()
    };
    assert!(line("memtrace_route_requests_total").contains(r#"route="GET /quote""#));
    assert!(line("memtrace_route_requests_total").ends_with(" 10"));
    let kept: f64 = line("memtrace_route_kept_bytes_per_request")
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!((kept - 32768.0).abs() < 1e-6, "{kept}");
    assert!(line("memtrace_route_grew_ratio").ends_with(" 1.0"));
}

/// Prometheus asks for OpenMetrics and gets it; curl and promtool get the
/// classic text format.
#[tokio::test]
async fn metrics_negotiate_openmetrics_or_the_classic_format() {
    let h = harness(None);
    let (code, body) = h
        .get_with(
            "/metrics",
            &[(
                "accept",
                "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
            )],
        )
        .await;
    assert_eq!(code, StatusCode::OK);
    let body = body.as_str().unwrap().to_string();
    assert!(
        body.ends_with("# EOF\n") && body.contains("# TYPE memtrace_events counter"),
        "{body}"
    );
    let (_, body) = h.get("/metrics").await;
    let body = body.as_str().unwrap().to_string();
    assert!(
        !body.contains("# EOF") && body.contains("# TYPE memtrace_events_total counter"),
        "{body}"
    );
}
