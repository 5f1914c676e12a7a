//! The HTTP API: the plan's `/debug/memory/?action=status|snapshot|diff|stop`,
//! a JSON REST API beside it, `/healthz`, `/metrics` and `/openapi.json`.
//!
//! Handlers talk to a [`Backend`], so the router is tested with a fake one,
//! with no socket and no root; the agent's real backend is
//! `crate::agent::backend`. The views the API serves ([`status`]) and the
//! Prometheus rendering of them ([`metrics`]) are here too.
//!
//! Imports: `kernel`, `model`, `judge` and `sites` for the types it shows;
//! never the agent, which it reaches only through [`Backend`].
mod auth;
mod backend;
mod debug;
mod error;
pub mod metrics;
pub mod query;
mod rest;
mod router;
pub mod status;

pub use auth::{ApiState, Token};
pub use backend::{Backend, BackendError, StopView};
pub use error::ApiError;
pub use router::{OPENAPI, app};

#[cfg(test)]
mod tests;
