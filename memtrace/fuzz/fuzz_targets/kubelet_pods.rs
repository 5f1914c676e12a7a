#![no_main]
// The parser and what it must keep: memtrace::fuzz::kubelet_pods.
libfuzzer_sys::fuzz_target!(|data: &[u8]| memtrace::fuzz::kubelet_pods(data));
