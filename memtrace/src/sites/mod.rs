//! Allocation sites: raw kernel sites turned into snapshots and diffs
//! ([`snapshot`]) with stacks symbolized on a thread of their own
//! ([`symbolize`]), and rendered in the formats other tools read: pprof
//! ([`pprof`]), folded stacks and flame graph SVGs ([`flame`]).
//!
//! Imports: `model::procinfo` (mappings of /proc/PID/smaps).
pub mod flame;
pub mod pprof;
pub mod render;
pub mod snapshot;
pub mod symbolize;
