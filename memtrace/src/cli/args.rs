//! The command line: the agent, the client subcommands that call its API,
//! `top`, the demo and shell completions. The agent's own settings are in
//! [`super::settings`].
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use super::{
    client::DEFAULT_URL,
    demo::DemoOptions,
    settings::{AgentArgs, ConfigError, invalid, parse_listen},
};

/// `memtrace -V`: the version and the commit it was built from.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("MEMTRACE_GIT_COMMIT"),
    ")"
);

/// `memtrace --version`: the version, the commit, the target and the
/// kernels this build serves.
pub fn long_version() -> &'static str {
    static TEXT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TEXT.get_or_init(|| {
        format!(
            "{}\ncommit: {}\ntarget: {}\n{}",
            env!("CARGO_PKG_VERSION"),
            env!("MEMTRACE_GIT_COMMIT"),
            env!("MEMTRACE_BUILD_TARGET"),
            crate::kernel::features::BUILT_FOR
        )
    })
}

#[derive(Debug, Parser)]
#[command(name = "memtrace", version = VERSION, long_version = long_version(), about = "Kernel-level memory tracer for multi-worker servers", long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Trace servers: attach to processes by name, follow their workers,
    /// account memory per worker and per request.
    Agent(Box<AgentArgs>),
    /// Workers of a running agent: RSS, PSS, USS, requests, leak slope.
    Status {
        #[command(flatten)]
        client: ClientArgs,
        /// Only this worker.
        #[arg(long)]
        pid: Option<u32>,
    },
    /// Start collecting allocation sites (if off) and print the top ones;
    /// the snapshot becomes the baseline for `diff`.
    Snapshot {
        #[command(flatten)]
        client: ClientArgs,
        /// Only this worker (default: all).
        #[arg(long)]
        pid: Option<u32>,
        /// Rows per list.
        #[arg(long, default_value_t = 10)]
        limit: usize,
        #[command(flatten)]
        sites: SiteArgs,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Growth since the last snapshot or diff, by allocating stack and by mapping.
    Diff {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        pid: Option<u32>,
        #[arg(long, default_value_t = 10)]
        limit: usize,
        #[command(flatten)]
        sites: SiteArgs,
        /// Leave out sites that grew in an earlier diff and not in this one.
        #[arg(long)]
        still_growing: bool,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Stop collecting allocation sites (back to the steady-state cost).
    Stop {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// A worker's recent requests, newest first.
    Requests {
        #[command(flatten)]
        client: ClientArgs,
        pid: u32,
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// A worker's routes (method and path, ids collapsed; socket mode,
    /// HTTP/1.x): requests, RSS change, bytes kept per request.
    Routes {
        #[command(flatten)]
        client: ClientArgs,
        pid: u32,
    },
    /// Live view of the workers (q quits, s changes the sort, arrows select).
    Top {
        #[command(flatten)]
        client: ClientArgs,
        /// Seconds between refreshes (0.1 to 3600).
        #[arg(long, default_value_t = 1.0, value_parser = parse_interval)]
        interval: f64,
    },
    /// Start a bundled leaky server, attach, and show a leak detected and a
    /// soft-limit restart within a minute; then clean up.
    Demo(DemoArgs),
    /// The demo's workload (started by `memtrace demo`).
    #[command(hide = true)]
    DemoServer {
        #[arg(long)]
        port: u16,
        #[arg(long, default_value_t = 2)]
        workers: usize,
        #[arg(long, default_value_t = 1024)]
        leak_kb: usize,
    },
    /// What this kernel can serve: each request mode, collection tier,
    /// Python frames, path capture, cgroup filtering and the mmap counters,
    /// whether it works and why not (root: the programs are loaded, not
    /// attached).
    Check {
        /// `table` for people, `json` for scripts.
        #[arg(long, value_enum, default_value_t = CheckFormat::Table)]
        format: CheckFormat,
    },
    /// Shell completions: `memtrace completions bash > /etc/bash_completion.d/memtrace`.
    Completions { shell: clap_complete::Shell },
    /// Man pages (memtrace.1 and one per subcommand) into DIR, for packages
    /// (`cargo xtask dist`).
    #[command(hide = true)]
    ManPages { dir: std::path::PathBuf },
}

fn parse_interval(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.1..=3600.0).contains(&v) => Ok(v),
        _ => Err(format!(
            "`{s}` is not a number of seconds between 0.1 and 3600"
        )),
    }
}

/// How the client commands reach the agent.
#[derive(Clone, Debug, Args)]
pub struct ClientArgs {
    /// The agent's API (its --listen address). The token comes from MEMTRACE_DEBUG_TOKEN.
    #[arg(long, env = "MEMTRACE_URL", default_value = DEFAULT_URL)]
    pub url: String,
    /// Print the agent's JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// What `check` prints.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum CheckFormat {
    #[default]
    Table,
    Json,
}

/// What `snapshot` and `diff` print.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// Tables for people.
    #[default]
    Table,
    /// The agent's JSON (as --json).
    Json,
    /// Gzipped pprof profile.proto (`go tool pprof`, Pyroscope, Parca);
    /// a diff is a profile of growth, usable as `-diff_base`.
    Pprof,
    /// Folded stacks (`root;...;leaf bytes`; a diff: `stack before after`).
    Folded,
    /// A flame graph SVG (a diff: a differential flame graph).
    Svg,
}

impl OutputFormat {
    /// The API's `format` parameter, for the formats the agent renders.
    pub fn api_name(self) -> Option<&'static str> {
        match self {
            Self::Table | Self::Json => None,
            Self::Pprof => Some("pprof"),
            Self::Folded => Some("folded"),
            Self::Svg => Some("svg"),
        }
    }
}

/// How Python sites are grouped and named.
#[derive(Clone, Debug, Args)]
pub struct SiteArgs {
    /// `app`: by the innermost frame of the application's code, with the
    /// innermost frame beside it; `lineno`: by the innermost line
    /// (tracemalloc's `lineno`); `traceback`: by the whole stack.
    #[arg(long, value_parser = ["app", "lineno", "traceback"], default_value = "app")]
    pub view: String,
    /// Frames whose `file:line function` matches this regex are not the
    /// application's (added to the agent's `--hide`).
    #[arg(long, value_name = "REGEX")]
    pub hide: Option<String>,
    /// Files under this prefix are the application's (added to the
    /// agent's `--app-path`).
    #[arg(long, value_name = "PREFIX")]
    pub app_path: Option<String>,
}

impl SiteArgs {
    /// The API's query parameters for these options, `&`-prefixed.
    pub fn query(&self, still_growing: bool) -> String {
        let mut q = form_urlencoded::Serializer::new(String::new());
        q.append_pair("view", &self.view);
        if still_growing {
            q.append_pair("still_growing", "true");
        }
        if let Some(h) = &self.hide {
            q.append_pair("hide", h);
        }
        if let Some(p) = &self.app_path {
            q.append_pair("app_path", p);
        }
        format!("&{}", q.finish())
    }
}

#[derive(Clone, Debug, Args)]
pub struct OutputArgs {
    /// Output format [default: table].
    #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
    pub format: OutputFormat,
    /// Write to this file instead of standard output (pprof needs one when
    /// standard output is a terminal).
    #[arg(short = 'o', long, value_name = "FILE")]
    pub output: Option<std::path::PathBuf>,
}

#[derive(Clone, Debug, Args)]
pub struct DemoArgs {
    /// Workers of the demo server.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub workers: u16,
    /// KiB each request leaks.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(64..=16384))]
    pub leak_kb: u32,
    /// The demo's soft limit, in MB.
    #[arg(long, default_value_t = 80.0)]
    pub soft_limit_mb: f64,
    /// Where the agent's API listens during the demo, or `off`.
    #[arg(long, default_value = "127.0.0.1:9464")]
    pub listen: String,
    /// Keep the server and agent running this many seconds after the demo (for `memtrace top`).
    #[arg(long, default_value_t = 0)]
    pub hold_secs: u64,
}

impl DemoArgs {
    pub fn options(&self) -> Result<DemoOptions, ConfigError> {
        if !(self.soft_limit_mb.is_finite() && self.soft_limit_mb > 10.0) {
            return Err(invalid("--soft-limit-mb", "must be more than 10"));
        }
        Ok(DemoOptions {
            workers: usize::from(self.workers),
            leak_kb: self.leak_kb as usize,
            soft_limit_mb: self.soft_limit_mb,
            listen: parse_listen(Some(&self.listen))?,
            hold: Duration::from_secs(self.hold_secs),
            ..DemoOptions::default()
        })
    }
}
