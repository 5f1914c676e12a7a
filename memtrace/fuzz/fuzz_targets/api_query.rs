#![no_main]
// The parser and what it must keep: memtrace::fuzz::api_query.
libfuzzer_sys::fuzz_target!(|data: &[u8]| memtrace::fuzz::api_query(data));
