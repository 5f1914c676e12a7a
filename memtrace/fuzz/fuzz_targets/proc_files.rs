#![no_main]
// The parser and what it must keep: memtrace::fuzz::proc_files.
libfuzzer_sys::fuzz_target!(|data: &[u8]| memtrace::fuzz::proc_files(data));
