//! The kernel side as the agent sees it: checks before loading
//! ([`preflight`]), what this kernel can run ([`features`]), struct offsets from the kernel's BTF ([`btf`]), tracefs and tracepoint layouts ([`tracefs`]), loading and
//! attaching the eBPF programs and reading their maps ([`loader`]), uprobe
//! targets ([`uprobes`]), and decoding ring-buffer events ([`events`]).
//!
//! Imports: `memtrace_common` and nothing else of memtrace. Everything above
//! the kernel reads it through [`loader::Tracer`] and [`events::KernelEvent`].
pub mod btf;
pub mod events;
pub mod features;
pub mod loader;
pub mod preflight;
pub mod tracefs;
pub mod uprobes;
