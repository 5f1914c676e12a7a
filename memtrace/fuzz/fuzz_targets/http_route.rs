#![no_main]
// The parser and what it must keep: memtrace::fuzz::http_route.
libfuzzer_sys::fuzz_target!(|data: &[u8]| memtrace::fuzz::http_route(data));
