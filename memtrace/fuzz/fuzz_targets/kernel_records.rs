#![no_main]
// The parser and what it must keep: memtrace::fuzz::kernel_records.
libfuzzer_sys::fuzz_target!(|data: &[u8]| memtrace::fuzz::kernel_records(data));
