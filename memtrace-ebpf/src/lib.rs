#![no_std]
// The programs live in the `memtrace` binary target (src/main.rs); this library
// target only exists so that the agent can name this crate as a build-dependency.
