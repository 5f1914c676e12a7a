//! The agent's settings. Every one can come from a flag, a `MEMTRACE_*`
//! environment variable or the TOML file given by `--config`, in that order
//! of precedence; settings left unset take the defaults shown in `--help`.
//! [`AgentArgs::resolve`] checks them and gives the agent's `AgentSettings`.
use std::{path::PathBuf, time::Duration};

use clap::Args;
use serde::Deserialize;

use super::logging::LogFormat;
use crate::{
    agent::{AgentSettings, DEFAULT_POLL_INTERVAL_MS, DEFAULT_TIMED_SLOPE_MB_PER_HOUR},
    judge::{
        detector::DetectorConfig,
        softlimit::{
            SoftLimitAction, SoftLimitMetric, SoftLimitSettings, SoftLimitTarget, parse_signal,
        },
    },
    kernel::{
        loader::{CollectTier, DEFAULT_MAX_LIVE_ALLOCS, LoadOptions, RequestProbes},
        uprobes::ProbeTarget,
    },
    model::{
        cgroups,
        kubelet::{self, KubeletSettings},
        requests::RequestSettings,
        routes::DEFAULT_MAX_ROUTES,
        selectors::Selectors,
    },
    sites::view::{AppCode, hide_regex},
};

/// How requests are delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RequestMode {
    /// No request boundaries: memory per worker only.
    None,
    /// uprobes on functions (--request-fn or --request-begin/--request-end).
    Uprobe,
    /// accept() to close() of the connection (prefork/sync servers).
    Accept,
    /// A read then a write on one TCP connection: keep-alive, threaded and
    /// async servers, no handler symbol and no syscall tracepoint.
    Socket,
}

/// What a snapshot collects (`kernel::loader::CollectTier`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CollectArg {
    /// Page faults and mmap/brk calls only: tracepoints, no uprobe.
    Growth,
    /// Growth plus malloc/calloc/realloc/free uprobes, sampled by bytes.
    Heap,
    /// Heap plus CPython's object allocator: Python objects of 512 bytes or
    /// less as heap sites, at a trap per Python allocation and free.
    Pymalloc,
}

/// Agent settings. All are optional here so that a flag, the environment and
/// the config file can be told apart; `resolve` applies the defaults.
#[derive(Clone, Debug, Default, Args, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct AgentArgs {
    /// TOML file with agent settings (keys as the long flags, e.g. `process-name = ["gunicorn"]`).
    #[arg(long, env = "MEMTRACE_CONFIG", value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// Trace processes with this name (comm, or executable file name). Repeatable.
    #[arg(
        short = 'n',
        long = "process-name",
        env = "MEMTRACE_PROCESS_NAME",
        value_delimiter = ',',
        value_name = "NAME",
        help_heading = "Selection"
    )]
    pub process_name: Vec<String>,

    /// Trace processes running this executable. Repeatable.
    #[arg(
        long,
        env = "MEMTRACE_EXE",
        value_delimiter = ',',
        value_name = "PATH",
        help_heading = "Selection"
    )]
    pub exe: Vec<PathBuf>,

    /// Trace processes whose command line (arguments joined by spaces) matches this regex.
    #[arg(
        long,
        env = "MEMTRACE_CMDLINE",
        value_name = "REGEX",
        help_heading = "Selection"
    )]
    pub cmdline: Option<String>,

    /// Trace this process (and its descendants). Repeatable.
    #[arg(
        short = 'p',
        long,
        env = "MEMTRACE_PID",
        value_delimiter = ',',
        value_name = "PID",
        help_heading = "Selection"
    )]
    pub pid: Vec<u32>,

    /// Only processes inside this cgroup v2 subtree (a path in the v2
    /// hierarchy, `/kubepods.slice/...`, or the directory under its mount);
    /// with no other selector, every process inside it. Filtered in the
    /// kernel. Repeatable.
    #[arg(
        long,
        env = "MEMTRACE_CGROUP",
        value_delimiter = ',',
        value_name = "PATH",
        help_heading = "Selection"
    )]
    pub cgroup: Vec<String>,

    /// Only processes of this container (its id, or a prefix of at least 6
    /// hex digits); with no other selector, every process in it. Filtered in
    /// the kernel. Repeatable.
    #[arg(
        long,
        env = "MEMTRACE_CONTAINER",
        value_delimiter = ',',
        value_name = "ID",
        help_heading = "Selection"
    )]
    pub container: Vec<String>,

    /// Where requests begin and end: none, uprobe (needs --request-fn or
    /// --request-begin/--request-end; implied by them), or accept (accept() to
    /// close() of the connection, for prefork and sync servers) [default: none].
    #[arg(
        long,
        env = "MEMTRACE_REQUEST_MODE",
        value_enum,
        help_heading = "Requests"
    )]
    pub request_mode: Option<RequestMode>,

    /// A request is one call of this function: BINARY:SYMBOL (executable or shared library).
    #[arg(
        long,
        env = "MEMTRACE_REQUEST_FN",
        value_name = "BINARY:SYMBOL",
        help_heading = "Requests"
    )]
    pub request_fn: Option<String>,

    /// A request begins at the entry of this function (with --request-end).
    #[arg(
        long,
        env = "MEMTRACE_REQUEST_BEGIN",
        value_name = "BINARY:SYMBOL",
        help_heading = "Requests"
    )]
    pub request_begin: Option<String>,

    /// A request ends at the entry of this function (with --request-begin).
    #[arg(
        long,
        env = "MEMTRACE_REQUEST_END",
        value_name = "BINARY:SYMBOL",
        help_heading = "Requests"
    )]
    pub request_end: Option<String>,

    /// Socket mode: do not read HTTP request lines (no method, no path, no
    /// routes); for sites whose paths carry secrets. No byte of any request
    /// is read then.
    #[arg(long, env = "MEMTRACE_NO_HTTP_PATHS", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL", help_heading = "Requests")]
    pub no_http_paths: Option<bool>,

    /// Do not count the worker's open descriptors at each request's ends
    /// (`fds` and `fd_delta` are then null, and FD_LEAK_DETECTED off).
    #[arg(long, env = "MEMTRACE_NO_FD_COUNTS", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL", help_heading = "Requests")]
    pub no_fd_counts: Option<bool>,

    /// Routes (method and path with ids collapsed) kept per worker; the
    /// rest are counted under "other" [default: 100].
    #[arg(
        long,
        env = "MEMTRACE_MAX_ROUTES",
        value_name = "N",
        help_heading = "Requests"
    )]
    pub max_routes: Option<usize>,

    /// Per-route series on /metrics (a label per route and worker: up to
    /// --max-routes times the workers' series).
    #[arg(long, env = "MEMTRACE_METRICS_ROUTES", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL", help_heading = "Requests")]
    pub metrics_routes: Option<bool>,

    /// Log a request at INFO (HIGH_MEMORY_USAGE) when its RSS grew more than this [default: 5].
    #[arg(
        long,
        env = "MEMTRACE_HIGH_MEMORY_MB",
        value_name = "MB",
        help_heading = "Requests"
    )]
    pub high_memory_mb: Option<f64>,

    /// Log a request at WARN (SPIKE_DETECTED) when its RSS grew more than this [default: 10].
    #[arg(
        long,
        env = "MEMTRACE_SPIKE_MB",
        value_name = "MB",
        help_heading = "Requests"
    )]
    pub spike_mb: Option<f64>,

    /// Requests kept per worker for the API [default: 1000].
    #[arg(
        long,
        env = "MEMTRACE_REQUEST_HISTORY",
        value_name = "N",
        help_heading = "Requests"
    )]
    pub request_history: Option<usize>,

    /// Requests in the leak detector's sliding window [default: 200].
    #[arg(
        long,
        env = "MEMTRACE_LEAK_WINDOW_SIZE",
        value_name = "N",
        help_heading = "Leak detection"
    )]
    pub leak_window_size: Option<usize>,

    /// Judge the trend every N requests [default: 50].
    #[arg(
        long,
        env = "MEMTRACE_LEAK_CHECK_INTERVAL",
        value_name = "N",
        help_heading = "Leak detection"
    )]
    pub leak_check_interval: Option<usize>,

    /// A sustained slope above this many MB per request is a leak [default: 0.1].
    #[arg(
        long,
        env = "MEMTRACE_LEAK_SLOPE_THRESHOLD",
        value_name = "MB",
        help_heading = "Leak detection"
    )]
    pub leak_slope_threshold: Option<f64>,

    /// Requests a new worker serves before its trend is judged [default: 20].
    #[arg(
        long,
        env = "MEMTRACE_LEAK_WARMUP_REQUESTS",
        value_name = "N",
        help_heading = "Leak detection"
    )]
    pub leak_warmup_requests: Option<usize>,

    /// Without request boundaries: seconds between RSS samples fed to the detector [default: 10].
    #[arg(
        long,
        env = "MEMTRACE_LEAK_SAMPLE_INTERVAL_SECS",
        value_name = "SECS",
        help_heading = "Leak detection"
    )]
    pub leak_sample_interval_secs: Option<u64>,

    /// Without request boundaries: growth above this many MB per hour is a leak [default: 60].
    #[arg(
        long,
        env = "MEMTRACE_LEAK_TIME_SLOPE_MB_PER_HOUR",
        value_name = "MB",
        help_heading = "Leak detection"
    )]
    pub leak_time_slope_mb_per_hour: Option<f64>,

    /// Retire a worker gracefully when its memory (--soft-limit-metric) exceeds this [default: 450].
    #[arg(
        long,
        env = "MEMTRACE_SOFT_LIMIT_MB",
        value_name = "MB",
        help_heading = "Soft limit"
    )]
    pub soft_limit_mb: Option<f64>,

    /// signal, or log (dry run) [default: the server's preset; log for a
    /// server memtrace does not recognise].
    #[arg(
        long,
        env = "MEMTRACE_SOFT_LIMIT_ACTION",
        value_enum,
        help_heading = "Soft limit"
    )]
    pub soft_limit_action: Option<SoftLimitAction>,

    /// Who gets the signal: worker, or parent (the master: on most servers
    /// that restarts every worker) [default: the server's preset, worker].
    #[arg(
        long,
        env = "MEMTRACE_SOFT_LIMIT_TARGET",
        value_enum,
        help_heading = "Soft limit"
    )]
    pub soft_limit_target: Option<SoftLimitTarget>,

    /// Signal to send, by name or number [default: the server's preset:
    /// gunicorn TERM, uWSGI HUP, PHP-FPM QUIT, Apache USR1, Puma TERM,
    /// Unicorn QUIT, other prefork servers TERM].
    #[arg(
        long,
        env = "MEMTRACE_SOFT_LIMIT_SIGNAL",
        value_name = "SIGNAL",
        help_heading = "Soft limit"
    )]
    pub soft_limit_signal: Option<String>,

    /// Least seconds between two restarts, across all workers [default: 30].
    #[arg(
        long,
        env = "MEMTRACE_SOFT_LIMIT_MIN_INTERVAL_SECS",
        value_name = "SECS",
        help_heading = "Soft limit"
    )]
    pub soft_limit_min_interval_secs: Option<f64>,

    /// Up to this many random seconds added to each interval [default: 5].
    #[arg(
        long,
        env = "MEMTRACE_SOFT_LIMIT_JITTER_SECS",
        value_name = "SECS",
        help_heading = "Soft limit"
    )]
    pub soft_limit_jitter_secs: Option<f64>,

    /// Seconds to wait for the worker's requests in flight before acting [default: 10].
    #[arg(
        long,
        env = "MEMTRACE_SOFT_LIMIT_DRAIN_TIMEOUT_SECS",
        value_name = "SECS",
        help_heading = "Soft limit"
    )]
    pub soft_limit_drain_timeout_secs: Option<f64>,

    /// The memory the limit is on: rss, pss or uss (uss and pss do not count
    /// pages shared copy-on-write with the master) [default: rss].
    #[arg(
        long,
        env = "MEMTRACE_SOFT_LIMIT_METRIC",
        value_enum,
        help_heading = "Soft limit"
    )]
    pub soft_limit_metric: Option<SoftLimitMetric>,

    /// Seconds a signalled worker may take to leave [default: the server's
    /// grace period and a margin, e.g. 35 for gunicorn].
    #[arg(
        long,
        env = "MEMTRACE_SOFT_LIMIT_EXIT_TIMEOUT_SECS",
        value_name = "SECS",
        help_heading = "Soft limit"
    )]
    pub soft_limit_exit_timeout_secs: Option<f64>,

    /// Signal sent to a worker that has not left after the exit timeout, e.g.
    /// KILL [default: none; servers escalate on their own].
    #[arg(
        long,
        env = "MEMTRACE_SOFT_LIMIT_ESCALATE_SIGNAL",
        value_name = "SIGNAL",
        help_heading = "Soft limit"
    )]
    pub soft_limit_escalate_signal: Option<String>,

    /// Address of the HTTP API (status, snapshots, metrics), or `off` [default: 127.0.0.1:9464].
    /// Its protected endpoints need MEMTRACE_DEBUG_TOKEN (environment only, so it never shows in `ps`).
    #[arg(
        long,
        env = "MEMTRACE_LISTEN",
        value_name = "ADDR",
        help_heading = "API"
    )]
    pub listen: Option<String>,

    /// Log format [default: pretty].
    #[arg(
        long,
        env = "MEMTRACE_LOG_FORMAT",
        value_enum,
        help_heading = "Logging"
    )]
    pub log_format: Option<LogFormat>,

    /// Log filter, e.g. `info` or `memtrace=debug` (RUST_LOG wins) [default: info].
    #[arg(
        long,
        env = "MEMTRACE_LOG_LEVEL",
        value_name = "FILTER",
        help_heading = "Logging"
    )]
    pub log_level: Option<String>,

    /// Seconds between per-worker summary lines; 0 turns them off [default: 30].
    #[arg(
        long,
        env = "MEMTRACE_SUMMARY_INTERVAL_SECS",
        value_name = "SECS",
        help_heading = "Logging"
    )]
    pub summary_interval_secs: Option<u64>,

    /// Ring-buffer size in bytes, a power of two >= 4096 [default: 4194304].
    #[arg(
        long,
        env = "MEMTRACE_RING_BUFFER_BYTES",
        value_name = "BYTES",
        help_heading = "Kernel"
    )]
    pub ring_buffer_bytes: Option<u32>,

    /// Milliseconds between ring-buffer drains (1..=1000) [default: 100].
    #[arg(long, env = "MEMTRACE_POLL_INTERVAL_MS", value_name = "MS", value_parser = clap::value_parser!(u64).range(1..=1000), help_heading = "Kernel")]
    pub poll_interval_ms: Option<u64>,

    /// The kernel reports a worker's RSS when it moved by this many bytes [default: 262144].
    #[arg(
        long,
        env = "MEMTRACE_RSS_STEP_BYTES",
        value_name = "BYTES",
        help_heading = "Kernel"
    )]
    pub rss_step_bytes: Option<u64>,

    /// Milliseconds between reads of kernel maps and /proc into the worker model [default: 1000].
    #[arg(long, env = "MEMTRACE_REFRESH_INTERVAL_MS", value_name = "MS", value_parser = clap::value_parser!(u64).range(10..=60_000), help_heading = "Kernel")]
    pub refresh_interval_ms: Option<u64>,

    /// Seconds between /proc scans for matching processes [default: 5].
    #[arg(long, env = "MEMTRACE_RESCAN_INTERVAL_SECS", value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=3600), help_heading = "Kernel")]
    pub rescan_interval_secs: Option<u64>,

    /// While allocation sites are collected, one user stack every N page faults per thread [default: 4].
    #[arg(
        long,
        env = "MEMTRACE_FAULT_SAMPLE_PERIOD",
        value_name = "N",
        help_heading = "Kernel"
    )]
    pub fault_sample_period: Option<u32>,

    /// Count mmap/munmap/mremap/brk bytes per worker and per request, exactly,
    /// from syscall tracepoints. Off by default: while any syscall tracepoint
    /// is attached, every syscall of every process on the node takes the
    /// kernel's slow path (+14% or more per syscall); RSS by type, page faults
    /// and VmData are counted either way.
    #[arg(long, env = "MEMTRACE_MMAP_COUNTERS", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL", help_heading = "Kernel")]
    pub mmap_counters: Option<bool>,

    /// What a snapshot collects: `growth` (page faults and mmap/brk calls,
    /// tracepoints only, cheapest), `heap` (adds the C library's
    /// allocator, sampled by bytes) or `pymalloc` (adds CPython's object
    /// allocator in Python workers: every Python allocation traps, several
    /// times slower while collecting) [default: heap].
    #[arg(
        long,
        env = "MEMTRACE_COLLECT",
        value_enum,
        value_name = "TIER",
        help_heading = "Kernel"
    )]
    pub collect: Option<CollectArg>,

    /// Heap tier: mean bytes between sampled allocations, per thread; 0 or 1
    /// samples every allocation [default: 524288].
    #[arg(
        long,
        env = "MEMTRACE_HEAP_SAMPLE_BYTES",
        value_name = "BYTES",
        help_heading = "Kernel"
    )]
    pub heap_sample_bytes: Option<u64>,

    /// Heap tier: sampled live blocks tracked per worker at most; more are
    /// counted as dropped [default: 65536].
    #[arg(
        long,
        env = "MEMTRACE_HEAP_MAX_LIVE",
        value_name = "N",
        help_heading = "Kernel"
    )]
    pub heap_max_live: Option<u32>,

    /// Python workers: frames of Python code taken per sample, innermost
    /// first (tracemalloc's nframe); 0 turns Python frames off [default: 25,
    /// at most 25].
    #[arg(
        long,
        env = "MEMTRACE_PYTHON_FRAMES",
        value_name = "N",
        help_heading = "Kernel"
    )]
    pub python_frames: Option<u32>,

    /// Python workers: show the native frames under the innermost Python
    /// frame (the interpreter's C functions down to malloc) in sites;
    /// hidden by default.
    #[arg(long, env = "MEMTRACE_NATIVE_FRAMES", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL", help_heading = "Kernel")]
    pub native_frames: Option<bool>,

    /// Python sites: files under this prefix are the application's code in
    /// the application view, even in site-packages or the standard library.
    /// Repeatable.
    #[arg(
        long,
        env = "MEMTRACE_APP_PATH",
        value_delimiter = ',',
        value_name = "PREFIX",
        help_heading = "Kernel"
    )]
    pub app_path: Vec<String>,

    /// Python sites: frames whose `file:line function` matches this regex are
    /// never the application's (nor drawn in its flame graphs). Repeatable.
    #[arg(
        long,
        env = "MEMTRACE_HIDE",
        value_name = "REGEX",
        help_heading = "Kernel"
    )]
    pub hide: Vec<String>,

    /// Count the processes each worker started (its descendants) in its
    /// soft-limit metric, as the OOM killer counts the whole cgroup.
    #[arg(long, env = "MEMTRACE_SOFT_LIMIT_INCLUDE_CHILDREN", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL", help_heading = "Soft limit")]
    pub soft_limit_include_children: Option<bool>,

    /// Do not mount tracefs when it is missing; fail with instructions instead.
    #[arg(long, env = "MEMTRACE_NO_MOUNT_TRACEFS", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL", help_heading = "Kernel")]
    pub no_mount_tracefs: Option<bool>,

    /// The node's kubelet (e.g. https://NODE_IP:10250), for pod names and
    /// namespaces from its `/pods` list; unset: pods are named by uid only.
    #[arg(
        long,
        env = "MEMTRACE_KUBELET_URL",
        value_name = "URL",
        help_heading = "Containers"
    )]
    pub kubelet_url: Option<String>,

    /// File with the bearer token for the kubelet (the pod's service-account
    /// token; read again at each fetch).
    #[arg(
        long,
        env = "MEMTRACE_KUBELET_TOKEN_FILE",
        value_name = "FILE",
        help_heading = "Containers"
    )]
    pub kubelet_token_file: Option<PathBuf>,

    /// Accept the kubelet's self-signed serving certificate.
    #[arg(long, env = "MEMTRACE_KUBELET_INSECURE_TLS", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL", help_heading = "Containers")]
    pub kubelet_insecure_tls: Option<bool>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {}", clip(&source.to_string(), 400))]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("{setting}: {message}")]
    Invalid {
        setting: &'static str,
        message: String,
    },
}

pub(super) fn invalid(setting: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        setting,
        message: clip(&message.into(), 400),
    }
}

/// Messages that echo user input stay short whatever the input was.
fn clip(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// Parses `BINARY:SYMBOL`. The binary must exist; the symbol is checked
/// when the probe is attached.
pub fn parse_probe_target(s: &str) -> Result<ProbeTarget, String> {
    let (binary, symbol) = s.rsplit_once(':').ok_or_else(|| {
        format!("`{s}` is not BINARY:SYMBOL (e.g. /usr/lib/libapp.so:handle_request)")
    })?;
    if binary.is_empty() || symbol.is_empty() {
        return Err(format!("`{s}` is not BINARY:SYMBOL: both parts are needed"));
    }
    Ok(ProbeTarget {
        binary: binary.into(),
        symbol: symbol.to_string(),
    })
}

/// The environment variable holding the API's debug token.
pub const DEBUG_TOKEN_ENV: &str = "MEMTRACE_DEBUG_TOKEN";
/// Where the API listens unless told otherwise.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9464";

pub(super) fn parse_listen(
    value: Option<&str>,
) -> Result<Option<std::net::SocketAddr>, ConfigError> {
    match value.unwrap_or(DEFAULT_LISTEN) {
        "off" | "none" | "" => Ok(None),
        v => v.parse().map(Some).map_err(|_| {
            invalid(
                "--listen",
                format!("`{v}` is not an address like 127.0.0.1:9464, or `off`"),
            )
        }),
    }
}

/// Turns the request flags into probes, refusing combinations that make no sense.
fn request_probes(
    mode: Option<RequestMode>,
    function: Option<&str>,
    begin: Option<&str>,
    end: Option<&str>,
) -> Result<RequestProbes, ConfigError> {
    let target =
        |setting: &'static str, s: &str| parse_probe_target(s).map_err(|m| invalid(setting, m));
    let uprobes = match (function, begin, end) {
        (None, None, None) => None,
        (Some(f), None, None) => Some(RequestProbes::Function(target("--request-fn", f)?)),
        (None, Some(b), Some(e)) => Some(RequestProbes::BeginEnd {
            begin: target("--request-begin", b)?,
            end: target("--request-end", e)?,
        }),
        (Some(_), _, _) => {
            return Err(invalid(
                "--request-fn",
                "use either --request-fn or --request-begin with --request-end, not both",
            ));
        }
        (None, Some(_), None) => return Err(invalid("--request-begin", "needs --request-end")),
        (None, None, Some(_)) => return Err(invalid("--request-end", "needs --request-begin")),
    };
    match (mode, uprobes) {
        (None | Some(RequestMode::Uprobe), Some(p)) => Ok(p),
        (Some(RequestMode::Uprobe), None) => Err(invalid(
            "--request-mode",
            "uprobe mode needs --request-fn BINARY:SYMBOL or --request-begin/--request-end",
        )),
        (Some(m), Some(_)) => Err(invalid(
            "--request-mode",
            format!("{m:?} mode takes no --request-fn/--request-begin/--request-end")
                .to_lowercase(),
        )),
        (Some(RequestMode::Accept), None) => Ok(RequestProbes::Accept),
        (Some(RequestMode::Socket), None) => Ok(RequestProbes::Socket),
        (None | Some(RequestMode::None), None) => Ok(RequestProbes::None),
    }
}

/// Everything `memtrace agent` needs, resolved.
#[derive(Clone, Debug)]
pub struct ResolvedAgent {
    pub settings: AgentSettings,
    pub log_format: LogFormat,
    pub log_level: String,
}

macro_rules! merge_options {
    ($cli:ident, $file:ident; $($field:ident),* $(,)?) => {
        $( if $cli.$field.is_none() { $cli.$field = $file.$field; } )*
    };
}

macro_rules! merge_lists {
    ($cli:ident, $file:ident; $($field:ident),* $(,)?) => {
        $( if $cli.$field.is_empty() { $cli.$field = $file.$field; } )*
    };
}

impl AgentArgs {
    /// Reads the config file, if any, under the command line.
    pub fn with_config_file(mut self) -> Result<Self, ConfigError> {
        let Some(path) = self.config.clone() else {
            return Ok(self);
        };
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        let file: AgentArgs =
            toml::from_str(&text).map_err(|source| ConfigError::Parse { path, source })?;
        self.merge_under(file);
        Ok(self)
    }

    /// Fills settings this one leaves unset from `file`.
    pub fn merge_under(&mut self, file: AgentArgs) {
        let cli = self;
        merge_lists!(cli, file; process_name, exe, pid, cgroup, container, app_path, hide);
        merge_options!(cli, file;
            cmdline, request_mode, request_fn, request_begin, request_end, no_http_paths, no_fd_counts,
            max_routes, metrics_routes, high_memory_mb,
            spike_mb, request_history, leak_window_size, leak_check_interval,
            leak_slope_threshold, leak_warmup_requests, leak_sample_interval_secs,
            leak_time_slope_mb_per_hour, soft_limit_mb, soft_limit_action, soft_limit_target,
            soft_limit_signal, soft_limit_min_interval_secs, soft_limit_jitter_secs,
            soft_limit_drain_timeout_secs, soft_limit_metric, soft_limit_exit_timeout_secs,
            soft_limit_escalate_signal, fault_sample_period, mmap_counters, collect, heap_sample_bytes,
            heap_max_live, python_frames, native_frames, listen, log_format, log_level, summary_interval_secs, ring_buffer_bytes,
            poll_interval_ms, rss_step_bytes, refresh_interval_ms, rescan_interval_secs,
            no_mount_tracefs, kubelet_url, kubelet_token_file, kubelet_insecure_tls,
            soft_limit_include_children,
        );
    }

    /// Applies defaults and checks every value.
    pub fn resolve(self) -> Result<ResolvedAgent, ConfigError> {
        let cmdline = self
            .cmdline
            .as_deref()
            .map(regex::Regex::new)
            .transpose()
            .map_err(|e| invalid("--cmdline", e.to_string()))?;
        for name in &self.process_name {
            if name.is_empty() || name.contains('/') {
                return Err(invalid(
                    "--process-name",
                    format!("`{name}` is not a process name (use --exe for paths)"),
                ));
            }
        }
        if self.pid.contains(&0) {
            return Err(invalid("--pid", "0 is not a process id"));
        }
        for path in &self.cgroup {
            if !path.starts_with('/') {
                return Err(invalid(
                    "--cgroup",
                    format!(
                        "`{path}` is not a cgroup path: give it from the hierarchy's root, e.g. /kubepods.slice"
                    ),
                ));
            }
        }
        for id in &self.container {
            let id = kubelet::bare_container_id(id);
            if id.len() < 6 || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(invalid(
                    "--container",
                    format!("`{id}` is not a container id (6 to 64 hex digits)"),
                ));
            }
        }
        let mount = cgroups::v2_mount();
        let selectors = Selectors {
            names: self.process_name,
            exes: self.exe,
            cmdline,
            pids: self.pid,
            cgroups: self
                .cgroup
                .iter()
                .map(|c| cgroups::normalize_selector(c, mount))
                .collect(),
            containers: self
                .container
                .iter()
                .map(|c| kubelet::bare_container_id(c).to_ascii_lowercase())
                .collect(),
        }
        .canonicalize();

        let ring_buffer_bytes = self
            .ring_buffer_bytes
            .unwrap_or(memtrace_common::DEFAULT_RING_BYTES);
        if ring_buffer_bytes < 4096 || !ring_buffer_bytes.is_power_of_two() {
            return Err(invalid(
                "--ring-buffer-bytes",
                format!("{ring_buffer_bytes} is not a power of two of at least 4096"),
            ));
        }
        let poll_ms = self.poll_interval_ms.unwrap_or(DEFAULT_POLL_INTERVAL_MS);
        if !(1..=1000).contains(&poll_ms) {
            return Err(invalid("--poll-interval-ms", "must be 1..=1000"));
        }
        let refresh_ms = self.refresh_interval_ms.unwrap_or(1000);
        if !(10..=60_000).contains(&refresh_ms) {
            return Err(invalid("--refresh-interval-ms", "must be 10..=60000"));
        }
        let rescan_secs = self.rescan_interval_secs.unwrap_or(5);
        if !(1..=3600).contains(&rescan_secs) {
            return Err(invalid("--rescan-interval-secs", "must be 1..=3600"));
        }
        let rss_step_bytes = self.rss_step_bytes.unwrap_or(256 * 1024);
        if rss_step_bytes == 0 {
            return Err(invalid("--rss-step-bytes", "must be at least 1"));
        }
        let load = LoadOptions {
            ring_buffer_bytes,
            rss_step_bytes,
            // Derived from the selectors when the agent starts.
            report_all_execs: false,
            cgroup_filter: memtrace_common::CGROUP_FILTER_OFF,
            fault_sample_period: match self.fault_sample_period.unwrap_or(4) {
                0 => return Err(invalid("--fault-sample-period", "must be at least 1")),
                n => n,
            },
            mmap_counters: self.mmap_counters.unwrap_or(false),
            collect: match self.collect {
                Some(CollectArg::Growth) => CollectTier::Growth,
                Some(CollectArg::Heap) | None => CollectTier::Heap,
                Some(CollectArg::Pymalloc) => CollectTier::Pymalloc,
            },
            heap_sample_bytes: match self
                .heap_sample_bytes
                .unwrap_or(memtrace_common::DEFAULT_HEAP_SAMPLE_BYTES)
            {
                n if n > memtrace_common::MAX_HEAP_SAMPLE_BYTES => {
                    return Err(invalid("--heap-sample-bytes", "must be at most 2^40"));
                }
                n => n,
            },
            max_live_allocs: match self.heap_max_live.unwrap_or(DEFAULT_MAX_LIVE_ALLOCS) {
                0 => return Err(invalid("--heap-max-live", "must be at least 1")),
                n if n > memtrace_common::MAX_ALLOCS => {
                    return Err(invalid(
                        "--heap-max-live",
                        format!("must be at most {}", memtrace_common::MAX_ALLOCS),
                    ));
                }
                n => n,
            },
            live_allocs_map_size: memtrace_common::MAX_ALLOCS,
            python_frames: match self
                .python_frames
                .unwrap_or(memtrace_common::PY_MAX_FRAMES as u32)
            {
                n if n > memtrace_common::PY_MAX_FRAMES as u32 => {
                    return Err(invalid(
                        "--python-frames",
                        format!("must be at most {}", memtrace_common::PY_MAX_FRAMES),
                    ));
                }
                n => n,
            },
            requests: request_probes(
                self.request_mode,
                self.request_fn.as_deref(),
                self.request_begin.as_deref(),
                self.request_end.as_deref(),
            )?,
            http_paths: !self.no_http_paths.unwrap_or(false),
            fd_counts: !self.no_fd_counts.unwrap_or(false),
        };
        let mb =
            |setting: &'static str, v: Option<f64>, default: f64| -> Result<u64, ConfigError> {
                let v = v.unwrap_or(default);
                if !v.is_finite() || v < 0.0 {
                    return Err(invalid(setting, format!("{v} is not a size in MB")));
                }
                Ok((v * 1024.0 * 1024.0) as u64)
            };
        let requests = RequestSettings {
            high_memory_bytes: mb("--high-memory-mb", self.high_memory_mb, 5.0)?,
            spike_bytes: mb("--spike-mb", self.spike_mb, 10.0)?,
            history: match self.request_history.unwrap_or(1000) {
                0 => return Err(invalid("--request-history", "must be at least 1")),
                n => n,
            },
            mmap_counters: load.mmap_counters,
            max_routes: match self.max_routes.unwrap_or(DEFAULT_MAX_ROUTES) {
                0 => return Err(invalid("--max-routes", "must be at least 1")),
                n if n > 10_000 => return Err(invalid("--max-routes", "at most 10000")),
                n => n,
            },
            metrics_routes: self.metrics_routes.unwrap_or(false),
        };
        let defaults = AgentSettings::default();
        let detector = DetectorConfig {
            window_size: self
                .leak_window_size
                .unwrap_or(defaults.detector.window_size),
            check_interval: self
                .leak_check_interval
                .unwrap_or(defaults.detector.check_interval),
            slope_threshold_mb: self
                .leak_slope_threshold
                .unwrap_or(defaults.detector.slope_threshold_mb),
            soft_limit_mb: self
                .soft_limit_mb
                .unwrap_or(defaults.detector.soft_limit_mb),
            warmup_samples: self
                .leak_warmup_requests
                .unwrap_or(defaults.detector.warmup_samples),
            min_check_gap_secs: defaults.detector.min_check_gap_secs,
        };
        detector
            .validate()
            .map_err(|m| invalid("leak detector", m))?;
        let per_hour = self
            .leak_time_slope_mb_per_hour
            .unwrap_or(DEFAULT_TIMED_SLOPE_MB_PER_HOUR);
        let timed_detector = DetectorConfig {
            slope_threshold_mb: per_hour / 3600.0,
            soft_limit_mb: detector.soft_limit_mb,
            ..defaults.timed_detector.clone()
        };
        timed_detector
            .validate()
            .map_err(|m| invalid("--leak-time-slope-mb-per-hour", m))?;
        let leak_sample_interval = match self.leak_sample_interval_secs.unwrap_or(10) {
            0 => return Err(invalid("--leak-sample-interval-secs", "must be at least 1")),
            n => Duration::from_secs(n),
        };
        let secs = |setting: &'static str,
                    v: Option<f64>,
                    default: Duration|
         -> Result<Duration, ConfigError> {
            match v {
                None => Ok(default),
                Some(v) if (0.0..1e9).contains(&v) => Ok(Duration::from_secs_f64(v)),
                Some(v) => Err(invalid(setting, format!("{v} is not a number of seconds"))),
            }
        };
        let soft = defaults.soft_limit.clone();
        let signal = |setting: &'static str, value: &Option<String>| {
            value
                .as_deref()
                .map(|s| parse_signal(s).map_err(|m| invalid(setting, m)))
                .transpose()
        };
        let soft_limit = SoftLimitSettings {
            action: self.soft_limit_action,
            target: self.soft_limit_target,
            signal: signal("--soft-limit-signal", &self.soft_limit_signal)?,
            metric: self.soft_limit_metric.unwrap_or(soft.metric),
            exit_timeout: self
                .soft_limit_exit_timeout_secs
                .map(|v| secs("--soft-limit-exit-timeout-secs", Some(v), Duration::ZERO))
                .transpose()?,
            escalate_signal: signal(
                "--soft-limit-escalate-signal",
                &self.soft_limit_escalate_signal,
            )?,
            min_interval: secs(
                "--soft-limit-min-interval-secs",
                self.soft_limit_min_interval_secs,
                soft.min_interval,
            )?,
            jitter: secs(
                "--soft-limit-jitter-secs",
                self.soft_limit_jitter_secs,
                soft.jitter,
            )?,
            drain_timeout: secs(
                "--soft-limit-drain-timeout-secs",
                self.soft_limit_drain_timeout_secs,
                soft.drain_timeout,
            )?,
        };
        let settings = AgentSettings {
            selectors,
            load,
            mount_tracefs: !self.no_mount_tracefs.unwrap_or(false),
            native_frames: self.native_frames.unwrap_or(false),
            app_code: AppCode {
                app_paths: self.app_path,
                hide: self
                    .hide
                    .iter()
                    .map(|h| hide_regex(h))
                    .collect::<Result<_, _>>()
                    .map_err(|e| invalid("--hide", e))?,
                ..AppCode::default()
            },
            kubelet: match self.kubelet_url {
                Some(url) => {
                    kubelet::check_url(&url)
                        .map_err(|e| invalid("--kubelet-url", e.to_string()))?;
                    Some(KubeletSettings {
                        url,
                        token_file: self.kubelet_token_file,
                        insecure_tls: self.kubelet_insecure_tls.unwrap_or(false),
                    })
                }
                None => None,
            },
            poll_interval: Duration::from_millis(poll_ms),
            refresh_interval: Duration::from_millis(refresh_ms),
            rescan_interval: Duration::from_secs(rescan_secs),
            summary_interval: Duration::from_secs(self.summary_interval_secs.unwrap_or(30)),
            requests,
            detector,
            timed_detector,
            leak_sample_interval,
            soft_limit,
            listen: parse_listen(self.listen.as_deref())?,
            api_token: crate::api::Token::new(std::env::var(DEBUG_TOKEN_ENV).ok()),
            plan_log_lines: self.log_format == Some(LogFormat::Plan),
            soft_limit_include_children: self.soft_limit_include_children.unwrap_or(false),
        };
        Ok(ResolvedAgent {
            settings,
            log_format: self.log_format.unwrap_or_default(),
            log_level: self.log_level.unwrap_or_else(|| "info".into()),
        })
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::cli::args::{Cli, Command};

    fn parse(args: &[&str]) -> AgentArgs {
        let mut full = vec!["memtrace", "agent"];
        full.extend_from_slice(args);
        match Cli::try_parse_from(full).expect("parses").command {
            Command::Agent(a) => *a,
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn flags_beat_the_file_and_the_file_beats_defaults() {
        let mut cli = parse(&["--process-name", "gunicorn", "--poll-interval-ms", "20"]);
        let file: AgentArgs = toml::from_str(
            "process-name = [\"uwsgi\"]\npoll-interval-ms = 50\nrss-step-bytes = 65536\n",
        )
        .unwrap();
        cli.merge_under(file);
        let r = cli.resolve().unwrap();
        assert_eq!(r.settings.selectors.names, vec!["gunicorn"]);
        assert_eq!(r.settings.poll_interval, Duration::from_millis(20));
        assert_eq!(r.settings.load.rss_step_bytes, 65536);
        assert_eq!(r.settings.refresh_interval, Duration::from_secs(1));
    }

    #[test]
    fn bad_values_are_clear_errors() {
        assert!(Cli::try_parse_from(["memtrace", "agent", "--poll-interval-ms", "0"]).is_err());
        let e = parse(&["--ring-buffer-bytes", "5000", "-n", "x"])
            .resolve()
            .unwrap_err();
        assert!(e.to_string().contains("power of two"), "{e}");
        let e = parse(&["--cmdline", "(", "-n", "x"]).resolve().unwrap_err();
        assert!(e.to_string().starts_with("--cmdline"), "{e}");
        let e = parse(&["-n", "/usr/bin/x"]).resolve().unwrap_err();
        assert!(e.to_string().contains("--exe"), "{e}");
        let file: Result<AgentArgs, _> = toml::from_str("no-such-setting = 1");
        assert!(file.is_err());
        // The kubelet client's own URL check, at parse time.
        for bad in ["ftp://node:10250", "https://", "10.0.0.7:10250"] {
            let e = parse(&["-n", "x", "--kubelet-url", bad])
                .resolve()
                .unwrap_err();
            assert!(e.to_string().starts_with("--kubelet-url"), "{e}");
        }
        let ok = parse(&["-n", "x", "--kubelet-url", "HTTPS://node:10250"]).resolve();
        assert!(ok.is_ok_and(|r| r.settings.kubelet.is_some()));
        // Container ids may carry their runtime's prefix.
        let r = parse(&["--container", "cri-o://0123456789AB"])
            .resolve()
            .unwrap();
        assert_eq!(r.settings.selectors.containers, ["0123456789ab"]);
    }

    #[test]
    fn route_settings_from_flags_and_file() {
        let r = parse(&["-n", "x"]).resolve().unwrap();
        assert!(r.settings.load.http_paths);
        assert_eq!(r.settings.requests.max_routes, 100);
        assert!(!r.settings.requests.metrics_routes);
        let r = parse(&[
            "-n",
            "x",
            "--no-http-paths",
            "--max-routes",
            "7",
            "--metrics-routes",
        ])
        .resolve()
        .unwrap();
        assert!(!r.settings.load.http_paths);
        assert_eq!(r.settings.requests.max_routes, 7);
        assert!(r.settings.requests.metrics_routes);
        let e = parse(&["-n", "x", "--max-routes", "0"])
            .resolve()
            .unwrap_err();
        assert!(e.to_string().starts_with("--max-routes"), "{e}");
        let file: AgentArgs = toml::from_str("no-http-paths = true\nmax-routes = 3").unwrap();
        let mut cli = parse(&["-n", "x"]);
        cli.merge_under(file);
        let r = cli.resolve().unwrap();
        assert!(!r.settings.load.http_paths);
        assert_eq!(r.settings.requests.max_routes, 3);
    }

    #[test]
    fn repeatable_and_comma_separated_selectors() {
        let a = parse(&["-n", "a,b", "-n", "c", "-p", "1,2"]);
        assert_eq!(a.process_name, vec!["a", "b", "c"]);
        assert_eq!(a.pid, vec![1, 2]);
    }

    #[test]
    fn request_flags() {
        let r = |args: &[&str]| parse(args).resolve().map(|r| r.settings.load.requests);
        assert_eq!(r(&["-n", "x"]).unwrap(), RequestProbes::None);
        assert_eq!(
            r(&["-n", "x", "--request-mode", "accept"]).unwrap(),
            RequestProbes::Accept
        );
        assert!(matches!(
            r(&["-n", "x", "--request-fn", "/bin/srv:handle"]).unwrap(),
            RequestProbes::Function(_)
        ));
        assert!(matches!(
            r(&[
                "-n",
                "x",
                "--request-begin",
                "/bin/a:b",
                "--request-end",
                "/bin/a:c"
            ])
            .unwrap(),
            RequestProbes::BeginEnd { .. }
        ));
        for bad in [
            &["-n", "x", "--request-mode", "uprobe"][..],
            &[
                "-n",
                "x",
                "--request-mode",
                "accept",
                "--request-fn",
                "/b:f",
            ],
            &["-n", "x", "--request-begin", "/b:f"],
            &["-n", "x", "--request-fn", "/b:f", "--request-end", "/b:g"],
            &["-n", "x", "--request-fn", "nocolon"],
            &["-n", "x", "--spike-mb=-1"],
            &["-n", "x", "--request-history", "0"],
        ] {
            assert!(r(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn detector_and_soft_limit_settings() {
        let r = parse(&[
            "-n",
            "x",
            "--leak-window-size",
            "100",
            "--leak-check-interval",
            "25",
            "--leak-slope-threshold",
            "0.5",
            "--soft-limit-mb",
            "300",
            "--soft-limit-signal",
            "TERM",
            "--soft-limit-target",
            "worker",
            "--soft-limit-action",
            "log",
        ])
        .resolve()
        .unwrap();
        let d = &r.settings.detector;
        assert_eq!((d.window_size, d.check_interval), (100, 25));
        assert_eq!((d.slope_threshold_mb, d.soft_limit_mb), (0.5, 300.0));
        assert_eq!(d.warmup_samples, crate::agent::DEFAULT_WARMUP_REQUESTS);
        assert_eq!(r.settings.timed_detector.soft_limit_mb, 300.0);
        let s = &r.settings.soft_limit;
        assert_eq!(s.signal, Some(nix::sys::signal::Signal::SIGTERM));
        assert_eq!(s.target, Some(SoftLimitTarget::Worker));
        assert_eq!(s.action, Some(SoftLimitAction::Log));

        let defaults = parse(&["-n", "x"]).resolve().unwrap().settings;
        assert_eq!(defaults.detector.window_size, 200);
        assert_eq!(defaults.detector.check_interval, 50);
        assert_eq!(defaults.detector.slope_threshold_mb, 0.1);
        assert_eq!(defaults.detector.soft_limit_mb, 450.0);
        // Action, target and signal come from each server's preset.
        let soft = &defaults.soft_limit;
        assert_eq!((soft.action, soft.target, soft.signal), (None, None, None));
        assert_eq!(soft.metric, SoftLimitMetric::Rss);
        assert_eq!((soft.exit_timeout, soft.escalate_signal), (None, None));
        let r = parse(&[
            "-n",
            "x",
            "--soft-limit-metric",
            "uss",
            "--soft-limit-exit-timeout-secs",
            "20",
            "--soft-limit-escalate-signal",
            "KILL",
        ])
        .resolve()
        .unwrap();
        let s = &r.settings.soft_limit;
        assert_eq!(s.metric, SoftLimitMetric::Uss);
        assert_eq!(s.exit_timeout, Some(Duration::from_secs(20)));
        assert_eq!(s.escalate_signal, Some(nix::sys::signal::Signal::SIGKILL));

        for bad in [
            &["-n", "x", "--leak-window-size", "1"][..],
            &["-n", "x", "--leak-check-interval", "500"],
            &["-n", "x", "--soft-limit-mb", "0"],
            &["-n", "x", "--soft-limit-signal", "NOPE"],
            &["-n", "x", "--soft-limit-escalate-signal", "NOPE"],
            &["-n", "x", "--soft-limit-exit-timeout-secs", "1e10"],
            &["-n", "x", "--soft-limit-min-interval-secs=-3"],
            &["-n", "x", "--fault-sample-period", "0"],
        ] {
            assert!(parse(bad).resolve().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn listen_addresses() {
        let l = |args: &[&str]| parse(args).resolve().map(|r| r.settings.listen);
        assert_eq!(
            l(&["-n", "x"]).unwrap(),
            Some(DEFAULT_LISTEN.parse().unwrap())
        );
        assert_eq!(l(&["-n", "x", "--listen", "off"]).unwrap(), None);
        assert_eq!(
            l(&["-n", "x", "--listen", "0.0.0.0:1"]).unwrap(),
            Some("0.0.0.0:1".parse().unwrap())
        );
        assert!(l(&["-n", "x", "--listen", "localhost"]).is_err());
    }

    #[test]
    fn no_mount_tracefs_is_a_flag_or_a_value() {
        let v = |args: &[&str]| parse(args).no_mount_tracefs;
        assert_eq!(v(&["--no-mount-tracefs"]), Some(true));
        assert_eq!(v(&["--no-mount-tracefs=false"]), Some(false));
        assert_eq!(v(&[]), None);
    }

    #[test]
    fn mmap_counters_are_off_unless_asked_for() {
        let load = |args: &[&str]| parse(args).resolve().unwrap().settings.load.mmap_counters;
        assert!(!load(&["-n", "x"]));
        assert!(load(&["-n", "x", "--mmap-counters"]));
        assert!(!load(&["-n", "x", "--mmap-counters", "false"]));
        let s = parse(&["-n", "x", "--mmap-counters"]).resolve().unwrap();
        assert!(
            s.settings.requests.mmap_counters,
            "request records carry them too"
        );
    }

    #[test]
    fn long_bad_values_give_short_errors() {
        let huge = "x".repeat(10_000);
        let e = parse(&["-n", "x", "--soft-limit-signal", &huge])
            .resolve()
            .unwrap_err();
        assert!(e.to_string().len() < 500, "{} bytes", e.to_string().len());
    }

    #[test]
    fn probe_targets() {
        let t = parse_probe_target("/usr/lib/libx.so:handle").unwrap();
        assert_eq!(t.symbol, "handle");
        assert!(parse_probe_target("nocolon").is_err());
        assert!(parse_probe_target(":sym").is_err());
        assert!(parse_probe_target("/bin/x:").is_err());
    }
}
