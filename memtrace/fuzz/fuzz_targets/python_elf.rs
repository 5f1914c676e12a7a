#![no_main]
// The parser and what it must keep: memtrace::fuzz::python_elf.
libfuzzer_sys::fuzz_target!(|data: &[u8]| memtrace::fuzz::python_elf(data));
