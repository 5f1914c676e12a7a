//! What the agent needs to start, with the defaults of every setting.
use std::time::Duration;

use crate::{
    api::Token,
    judge::{detector::DetectorConfig, softlimit::SoftLimitSettings},
    kernel::loader::LoadOptions,
    model::{kubelet::KubeletSettings, requests::RequestSettings, selectors::Selectors},
    sites::view::AppCode,
};

/// What the agent needs to start.
#[derive(Clone, Debug)]
pub struct AgentSettings {
    pub selectors: Selectors,
    pub load: LoadOptions,
    /// Mount tracefs at /sys/kernel/tracing when it is missing.
    pub mount_tracefs: bool,
    /// Python sites keep the native frames under the innermost Python one.
    pub native_frames: bool,
    /// Python sites: `--app-path` and `--hide`.
    pub app_code: AppCode,
    /// Requests are logged as the plan's text lines (`--log-format plan`).
    pub plan_log_lines: bool,
    /// The soft limit counts each worker's descendants in its metric
    /// (`--soft-limit-include-children`).
    pub soft_limit_include_children: bool,
    /// How often the ring buffer is drained.
    pub poll_interval: Duration,
    /// How often kernel maps and /proc are read into the worker model.
    pub refresh_interval: Duration,
    /// How often /proc is scanned for processes the kernel could not see start.
    pub rescan_interval: Duration,
    /// How often a per-worker summary is logged (zero: never).
    pub summary_interval: Duration,
    /// Per-request log thresholds and history.
    pub requests: RequestSettings,
    /// Leak detector of each worker, fed the RSS after each request.
    pub detector: DetectorConfig,
    /// Detector of workers without request boundaries: fed every
    /// `leak_sample_interval` with time as x; its threshold is in MB/s.
    pub timed_detector: DetectorConfig,
    pub leak_sample_interval: Duration,
    pub soft_limit: SoftLimitSettings,
    /// Where the HTTP API listens; None: no API.
    pub listen: Option<std::net::SocketAddr>,
    /// MEMTRACE_DEBUG_TOKEN; without it the protected endpoints answer 403.
    pub api_token: Option<Token>,
    /// The node's kubelet, for pod names and namespaces; None: absent.
    pub kubelet: Option<KubeletSettings>,
}

impl Default for AgentSettings {
    fn default() -> Self {
        Self {
            selectors: Selectors::default(),
            load: LoadOptions::default(),
            mount_tracefs: true,
            native_frames: false,
            app_code: AppCode::default(),
            plan_log_lines: false,
            soft_limit_include_children: false,
            poll_interval: Duration::from_millis(DEFAULT_POLL_INTERVAL_MS),
            refresh_interval: Duration::from_secs(1),
            rescan_interval: Duration::from_secs(5),
            summary_interval: Duration::from_secs(30),
            requests: RequestSettings::default(),
            detector: DetectorConfig::default()
                .with_warmup_samples(DEFAULT_WARMUP_REQUESTS)
                .with_min_check_gap_secs(MIN_CHECK_GAP_SECS),
            timed_detector: DetectorConfig {
                slope_threshold_mb: DEFAULT_TIMED_SLOPE_MB_PER_HOUR / 3600.0,
                window_size: 60,
                check_interval: 6,
                ..DetectorConfig::default()
            },
            leak_sample_interval: Duration::from_secs(10),
            soft_limit: SoftLimitSettings::default(),
            listen: None,
            api_token: None,
            kubelet: None,
        }
    }
}

/// Milliseconds between ring-buffer drains. Bursts do not wait for it (the
/// kernel wakes the agent once half the ring is unread), so it only bounds
/// how stale a quiet worker's requests can be; every drain is a wake-up of
/// the agent, 10 a second at this value.
pub const DEFAULT_POLL_INTERVAL_MS: u64 = 100;

/// Requests a new worker serves before its trend is judged (imports,
/// caches filling): the plan judged from the first request.
pub const DEFAULT_WARMUP_REQUESTS: usize = 20;
/// At most four trend checks per second per worker: at 10k requests/s a
/// check every 50 requests would cost a third of a core and judge windows
/// 20 ms long.
pub const MIN_CHECK_GAP_SECS: f64 = 0.25;
/// Growth that counts as a leak for a worker fed by time rather than
/// requests: 60 MB per hour.
pub const DEFAULT_TIMED_SLOPE_MB_PER_HOUR: f64 = 60.0;
