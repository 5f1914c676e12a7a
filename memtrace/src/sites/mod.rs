//! Allocation sites: raw kernel sites turned into snapshots and diffs
//! ([`snapshot`]) with stacks symbolized on a thread of their own
//! ([`symbolize`]), Python frames read from the process ([`python`]), and
//! rendered in the formats other tools read: pprof
//! ([`pprof`]), folded stacks and flame graph SVGs ([`flame`]).
//!
//! Imports: `model::procinfo` (mappings of /proc/PID/smaps) and
//! `model::pycode` (code objects).
pub mod flame;
pub mod pprof;
pub mod python;
pub mod render;
pub mod snapshot;
pub mod symbolize;
pub mod view;
