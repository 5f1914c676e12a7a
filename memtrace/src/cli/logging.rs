//! Structured logs: `tracing` events with fields, printed as JSON lines or
//! for people, filtered by RUST_LOG-style directives.
use std::io::IsTerminal as _;

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object per line, fields at the top level.
    Json,
    /// Human-readable, coloured when writing to a terminal.
    #[default]
    Pretty,
    /// As `pretty`, with each request as the plan's line: `[ID] | [pid-N] |
    /// GET /path | duration=12ms | memory=100MB->101MB | delta=+1.0MB |
    /// browsers=1 | browser_delta=+1 | SPIKE_DETECTED`.
    Plan,
}

/// Installs the global subscriber. `filter` is a directive such as `info`
/// or `memtrace=debug`; RUST_LOG wins when set.
pub fn init(format: LogFormat, filter: &str) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    let result = match format {
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        LogFormat::Pretty | LogFormat::Plan => registry
            .with(
                fmt::layer()
                    .with_target(false)
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    // A second init (tests, the demo) keeps the first subscriber.
    let _ = result;
}
