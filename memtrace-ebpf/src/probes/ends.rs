//! What a request's two ends read besides memory: the process's open
//! descriptors (from its descriptor table) and CPython's GC totals (from the
//! process's memory, only where the end runs in the process).
use aya_ebpf::helpers::{bpf_get_current_task, bpf_probe_read_kernel, generated};
use memtrace_common::{
    FDS_WORDS_MAX, FILE_REF_NEW, REQ_FDS_KNOWN, REQ_GC_KNOWN, RequestEvent, RequestStart,
};

use crate::{
    maps::{CONFIG, FD_SCRATCH, FdScratch, PY_GC},
    util::{copy_words, zero_words},
};

#[inline(always)]
fn read_kernel<T>(addr: u64) -> Option<T> {
    // SAFETY: the helper checks the access and fails on a bad address.
    unsafe { bpf_probe_read_kernel(addr as *const T) }.ok()
}

/// Faults (minor plus major) a task took, from the kernel's own counters
/// at `min_off`/`maj_off` of `obj` (a `task_struct` or a `signal_struct`);
/// 0 if they cannot be read.
#[inline(always)]
pub fn fault_counters(obj: u64, min_off: u32, maj_off: u32) -> u64 {
    let min: u64 = read_kernel(obj + u64::from(min_off)).unwrap_or(0);
    let maj: u64 = read_kernel(obj + u64::from(maj_off)).unwrap_or(0);
    min.wrapping_add(maj)
}

/// Faults of the whole thread group, for the last thread's exit: its own
/// counters plus those its exited threads left in `signal_struct`. A thread
/// that left at the same moment and is not yet folded in is missed.
#[inline(always)]
pub fn exiting_group_faults() -> Option<u64> {
    let cfg = CONFIG.load();
    if cfg.task_min_flt == 0 {
        return None;
    }
    // SAFETY: the helper returns the current task; reads are checked.
    let task = unsafe { bpf_get_current_task() };
    let signal: u64 = read_kernel(task + u64::from(cfg.task_signal)).filter(|&s| s != 0)?;
    Some(
        fault_counters(task, cfg.task_min_flt, cfg.task_maj_flt).wrapping_add(fault_counters(
            signal,
            cfg.signal_min_flt,
            cfg.signal_maj_flt,
        )),
    )
}

/// The current task's `struct files_struct`, if descriptors are counted.
#[inline(always)]
pub fn current_files() -> u64 {
    let offset = CONFIG.load().task_files;
    if offset == 0 {
        return 0;
    }
    // SAFETY: the helper returns the current task; the read is checked.
    let task = unsafe { bpf_get_current_task() };
    read_kernel(task + u64::from(offset)).unwrap_or(0)
}

/// A descriptor count that was not taken. Counts travel as plain `u32`s,
/// not `Option`s: kernels before 5.19 refuse to read a stack slot that one
/// path left unwritten (an `Option`'s payload on its `None` path).
pub const FDS_UNKNOWN: u32 = u32::MAX;

/// `count` less `less`, unless it is unknown.
#[inline(always)]
pub fn fds_less(count: u32, less: u32) -> u32 {
    if count == FDS_UNKNOWN {
        FDS_UNKNOWN
    } else {
        count.saturating_sub(less)
    }
}

/// Open descriptors in `files`, leaving out `skip` (descriptor numbers; -1:
/// none) when they are open. `FDS_UNKNOWN`: not counted (no table, or a
/// table over `FDS_WORDS_MAX` words).
///
/// The bitmap is read in one helper call into per-CPU scratch, and the
/// count kept there too: each turn of the loop then has one branch (its
/// end), and every way out of it leaves the verifier the same registers,
/// so old kernels' verifiers (5.10) do not walk each exit to the end of the
/// program.
#[inline(always)]
pub fn open_fds(files: u64, skip: [i64; 2]) -> u32 {
    count_fds(files, skip).unwrap_or(FDS_UNKNOWN)
}

#[inline(always)]
fn count_fds(files: u64, skip: [i64; 2]) -> Option<u32> {
    if files == 0 {
        return None;
    }
    let cfg = CONFIG.load();
    let fdt: u64 = read_kernel(files + u64::from(cfg.files_fdt))?;
    let max_fds: u32 = read_kernel(fdt + u64::from(cfg.fdt_max_fds))?;
    let bits: u64 = read_kernel(fdt + u64::from(cfg.fdt_open_fds))?;
    let words = max_fds / 64;
    if words == 0 || words > FDS_WORDS_MAX {
        return None;
    }
    let scratch = FD_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's scratch slot, only this program uses it while it
    // runs; the read is checked by the helper and fits the buffer.
    unsafe {
        let s = &mut *scratch;
        let len = (words * 8) & (FDS_WORDS_MAX * 8 * 2 - 1);
        if len == 0 || len > FDS_WORDS_MAX * 8 {
            return None;
        }
        if generated::bpf_probe_read_kernel(
            s.words.as_mut_ptr().cast(),
            len,
            bits as *const core::ffi::c_void,
        ) != 0
        {
            return None;
        }
        s.open = 0;
        for i in 0..FDS_WORDS_MAX as usize {
            if i >= words as usize {
                break;
            }
            s.open += u64::from(s.words[i].count_ones());
        }
        for fd in skip {
            if fd >= 0 && (fd as u64) < u64::from(max_fds) {
                let word = s.words[(fd as usize / 64) & (FDS_WORDS_MAX as usize - 1)];
                s.open -= (word >> (fd as u64 % 64)) & 1;
            }
        }
        Some(s.open as u32)
    }
}

/// Whether socket `sk` still has a descriptor: its socket's file is not
/// being released (the close of its last descriptor runs the TCP close
/// inside the file's release, with its reference count gone).
#[inline(always)]
pub fn sock_has_fd(sk: u64) -> bool {
    let cfg = CONFIG.load();
    if sk == 0 || cfg.task_files == 0 {
        return false;
    }
    let Some(socket) = read_kernel::<u64>(sk + u64::from(cfg.sock_socket)).filter(|&s| s != 0)
    else {
        return false;
    };
    if read_kernel::<u64>(socket + u64::from(cfg.socket_sk)) != Some(sk) {
        return false;
    }
    let Some(file) = read_kernel::<u64>(socket + u64::from(cfg.socket_file)).filter(|&f| f != 0)
    else {
        return false;
    };
    let Some(count) = read_kernel::<u64>(file + u64::from(cfg.file_count & !FILE_REF_NEW)) else {
        return false;
    };
    if cfg.file_count & FILE_REF_NEW != 0 {
        (count as i64) >= 0
    } else {
        count >= 1
    }
}

/// Reads the process's GC totals (collections, collected, uncollectable
/// over the three generations) into this CPU's scratch (`gc_sum`), from
/// the current process: call only where the current task belongs to
/// `tgid`. False: not read.
#[inline(always)]
fn gc_totals(tgid: u32, s: &mut FdScratch) -> bool {
    // SAFETY: a value read out of the map.
    let Some(addr) = (unsafe { PY_GC.get(&tgid) }).copied() else {
        return false;
    };
    // SAFETY: the helper checks the source and the destination holds the
    // 72 bytes.
    if unsafe {
        generated::bpf_probe_read_user(
            s.gc.as_mut_ptr().cast(),
            core::mem::size_of::<[u64; 9]>() as u32,
            addr as *const core::ffi::c_void,
        )
    } != 0
    {
        return false;
    }
    // Element by element: an array assignment becomes a byte-at-a-time
    // `memmove` call on BPF.
    for i in 0..3 {
        s.gc_sum[i] = s.gc[i] + s.gc[3 + i] + s.gc[6 + i];
    }
    true
}

/// This CPU's scratch slot: only the running program uses it.
#[inline(always)]
fn scratch() -> Option<&'static mut FdScratch> {
    // SAFETY: a per-CPU map value; nothing else runs on this CPU while the
    // program does.
    FD_SCRATCH.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// Fills the descriptor count (`fds`: already without the request's own
/// connection; `FDS_UNKNOWN`: not counted) and GC totals of a request's
/// start.
#[inline(always)]
pub fn read_start(req: &mut RequestStart, tgid: u32, fds: u32) {
    req.known = 0;
    req.fds = fds;
    if fds != FDS_UNKNOWN {
        req.known |= REQ_FDS_KNOWN;
    }
    if let Some(s) = scratch()
        && gc_totals(tgid, s)
    {
        // SAFETY: `req` and the scratch slot are map values, 8-byte aligned.
        unsafe { copy_words(&raw mut req.gc, &raw const s.gc_sum) };
        req.known |= REQ_GC_KNOWN;
    } else {
        // SAFETY: as above.
        unsafe { zero_words(&raw mut req.gc) };
    }
}

/// Reads a request's end into this CPU's scratch, for `emit_request`:
/// `fds` as for the start. `in_process`: the current task belongs to the
/// request's process (else its memory is not read).
#[inline(always)]
pub fn read_end(start: &RequestStart, tgid: u32, fds: u32, in_process: bool) {
    let Some(s) = scratch() else {
        return;
    };
    s.end_fds = fds;
    s.end_known = 0;
    if start.known & REQ_FDS_KNOWN != 0 && fds != FDS_UNKNOWN {
        s.end_known |= REQ_FDS_KNOWN;
    }
    if in_process && start.known & REQ_GC_KNOWN != 0 && gc_totals(tgid, s) {
        for i in 0..3 {
            s.end_gc[i] = s.gc_sum[i].wrapping_sub(start.gc[i]);
        }
        s.end_known |= REQ_GC_KNOWN;
    }
}

/// A request end that read nothing (aborted).
#[inline(always)]
pub fn read_nothing() {
    if let Some(s) = scratch() {
        s.end_known = 0;
        s.end_fds = 0;
    }
}

/// Writes what `read_end` (or `read_nothing`) kept into a request event.
///
/// # Safety
/// `ev` points to reserved ring-buffer memory holding a `RequestEvent` up
/// to its line.
#[inline(always)]
pub unsafe fn write_end(ev: *mut RequestEvent) {
    // SAFETY: the caller's.
    unsafe {
        match scratch() {
            Some(s) => {
                (*ev).fds_after = s.end_fds;
                (*ev).known = s.end_known;
                copy_words(&raw mut (*ev).gc_delta, &raw const s.end_gc);
            }
            None => {
                (*ev).fds_after = 0;
                (*ev).known = 0;
                zero_words(&raw mut (*ev).gc_delta);
            }
        }
    }
}
