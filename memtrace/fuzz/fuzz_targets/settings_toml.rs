#![no_main]
// The parser and what it must keep: memtrace::fuzz::settings_toml.
libfuzzer_sys::fuzz_target!(|data: &[u8]| memtrace::fuzz::settings_toml(data));
