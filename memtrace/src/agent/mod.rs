//! The running agent: the state shared by its event loop and its API
//! ([`state`]), what changes that state (kernel `events`, process
//! `tracking`, `judging`), the loop itself ([`run`], and
//! [`background`] for a thread of its own), the ring buffer's drain that
//! the loop and every reader of the state share ([`drain`]), the API's backend over the
//! state ([`backend`]) and the views it builds ([`views`]), and the
//! kubelet's pod list ([`kubelet`]).
//!
//! Imports: every folder below it (`kernel`, `model`, `judge`, `sites`,
//! `api`). The API never imports the agent: it calls [`backend`] through
//! `crate::api::Backend`.
pub mod backend;
pub mod background;
pub mod drain;
mod events;
pub mod heap;
mod judging;
pub mod kubelet;
pub mod run;
pub mod settings;
pub mod state;
mod tracking;
pub mod views;

pub use background::BackgroundAgent;
pub use drain::EventDrain;
pub use run::{Agent, AgentError};
pub use settings::{
    AgentSettings, DEFAULT_POLL_INTERVAL_MS, DEFAULT_TIMED_SLOPE_MB_PER_HOUR,
    DEFAULT_WARMUP_REQUESTS,
};
pub use state::{AgentCounters, SharedState, State};
