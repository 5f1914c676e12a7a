//! What memtrace knows of each traced process: /proc readers
//! ([`procinfo`]), its cgroup, container and pod ([`cgroups`]), resident
//! memory by type ([`rss`]), the worker registry ([`workers`]), per-request
//! records ([`requests`]), their routes ([`routes`]), the selectors that
//! choose processes ([`selectors`]), the CPython interpreter a process
//! runs ([`python`]), and its code objects: file, function and line of a
//! sampled Python frame ([`pycode`]).
//!
//! What workers start, followed without becoming workers: [`descendants`].
//! Processes that fork, exec or map faster than any server: [`storms`].
//!
//! Imports: `judge::detector` (each worker owns its leak detector); nothing
//! from the kernel loader, the API or the agent.
pub mod cgroups;
pub mod descendants;
pub mod kubelet;
pub mod procinfo;
pub mod pyasyncio;
pub mod pycode;
pub mod pydebug;
pub mod python;
pub mod requests;
pub mod routes;
pub mod rss;
pub mod selectors;
pub mod storms;
pub mod workers;
