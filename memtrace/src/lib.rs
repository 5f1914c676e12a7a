//! memtrace: a kernel-level memory tracer for multi-worker servers.
//!
//! The agent loads eBPF programs ([`loader`]) that count page faults, RSS,
//! mmap/brk and request boundaries per process in the kernel, follows the
//! processes chosen by [`selectors`] through fork, exec and exit ([`agent`]),
//! and keeps a model of every worker ([`workers`]).
pub mod agent;
pub mod api;
pub mod backend;
pub mod cli;
pub mod client;
pub mod demo;
pub mod demo_server;
pub mod detector;
pub mod events;
pub mod interrupt;
pub mod loader;
pub mod logging;
pub mod metrics;
pub mod preflight;
pub mod procinfo;
pub mod requests;
pub mod selectors;
pub mod snapshot;
pub mod softlimit;
pub mod status;
pub mod symbolize;
pub mod top;
pub mod tracefs;
pub mod uprobes;
pub mod workers;
