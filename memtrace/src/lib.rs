//! memtrace: a kernel-level memory tracer for multi-worker servers.
//!
//! The folders follow the data, from the kernel to what a person reads, and
//! each may import only the folders listed as its inputs:
//!
//! | folder    | holds                                                        | imports            |
//! |-----------|--------------------------------------------------------------|--------------------|
//! | `kernel/` | loading and attaching the eBPF programs, tracefs, decoding events, uprobe targets, preflight checks | — |
//! | `judge/`  | the leak detector and the soft-limit enforcer: pure logic     | —                  |
//! | `model/`  | what is known of each traced process: /proc readers, workers, requests, selectors | `judge` (a worker owns its detector) |
//! | `sites/`  | allocation sites: snapshots, diffs, symbolization            | `model`            |
//! | `api/`    | the HTTP API, its views and `/metrics`, over a `Backend` trait | `kernel`, `model`, `judge`, `sites` |
//! | `agent/`  | the running agent: shared state, event handling, the API's backend | all of the above |
//! | `cli/`    | the agent's settings, client commands, `memtrace top`, the demo | all of the above |
//!
//! `bounds` (limits on data memtrace does not control), `procmaps` (the
//! maps and smaps parser) and `fuzz` (an entry point per parser of such
//! data, for `cargo xtask fuzz`) sit beside them; `bounds` and `procmaps`
//! import nothing of memtrace.
//!
//! Inside a folder, files import each other one way only: no two modules
//! import each other.
pub mod agent;
pub mod api;
pub mod bounds;
pub mod cli;
pub mod fuzz;
pub mod judge;
pub mod kernel;
pub mod model;
pub mod procmaps;
pub mod sites;
