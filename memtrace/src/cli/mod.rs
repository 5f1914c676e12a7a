//! What a person runs: the command line ([`args`]), the kernel check
//! ([`check`]), the agent's settings
//! from flags, environment and TOML ([`settings`]), the API client and its
//! tables ([`client`]), the live view ([`top`]), the demo and its bundled
//! server ([`demo`], [`demo_server`]), logging set-up and signal handling
//! for the interactive commands.
//!
//! Imports: the agent and everything below it; nothing imports `cli`.
pub mod args;
pub mod check;
pub mod client;
pub mod demo;
pub mod demo_server;
pub mod interrupt;
pub mod logging;
pub mod settings;
pub mod top;
