//! Judgement over the model's numbers: the per-worker leak detector
//! ([`detector`]), the soft-limit enforcer ([`softlimit`]) and the server
//! presets it acts by ([`servers`]), and the bytes each route keeps per
//! request ([`routes`]).
//!
//! Pure logic: imports nothing else of memtrace. The enforcer reaches
//! processes only through its [`softlimit::Processes`] trait, so both are
//! tested without a kernel.
pub mod detector;
pub mod routes;
pub mod servers;
pub mod softlimit;
