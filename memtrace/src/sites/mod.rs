//! Allocation sites: raw kernel sites turned into snapshots and diffs
//! ([`snapshot`]) with stacks symbolized on a thread of their own
//! ([`symbolize`]).
//!
//! Imports: `model::procinfo` (mappings of /proc/PID/smaps).
pub mod snapshot;
pub mod symbolize;
