//! memtrace's eBPF programs. One file per hook family under `probes/`; maps in
//! `maps.rs`; small shared helpers in `util.rs`.
#![no_std]
#![no_main]
#![allow(internal_features)]
#![feature(core_intrinsics)] // atomic_xadd, as aya's own integration programs use

mod maps;
mod probes;
mod util;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// GPL-compatible: bpf_probe_read_kernel and the tracepoint helpers need it.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
