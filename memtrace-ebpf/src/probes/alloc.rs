//! Heap allocations while the heap tier of allocation-site collection is on:
//! uprobes on the C library's malloc, calloc, realloc and free, attached to
//! the selected processes only (so none of them checks which process runs).
//!
//! Sampled by bytes, as Go, tcmalloc and jemalloc do: each thread counts down
//! an exponential number of bytes (mean `Config::heap_sample_bytes`) and the
//! allocation that crosses zero is sampled, so one of size S is sampled with
//! probability 1 - exp(-S/R); the agent scales by the inverse. The decision
//! is taken at entry, before any stack walk; the return probe (still trapped
//! on every call: the kernel installs it at entry) returns at once for the
//! rest. A sampled live block remembers its size and stack, so a site's
//! bytes are what it allocated and has not freed.
use aya_ebpf::{
    helpers::bpf_get_prandom_u32,
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use memtrace_common::{
    AllocInfo, AllocKey, CTR_ALLOCS_DROPPED, CTR_HEAP_SAMPLES, ThreadState, heap_sample_interval,
};

use crate::{
    maps::{ALLOCS, CONFIG, PROCS, THREADS},
    probes::{
        python::py_stack,
        stacks::{add_heap_site, user_stack},
    },
    util::{atomic_add, count, current, thread_state},
};

/// Whether this thread's next `size` heap bytes cross a sample point.
#[inline(always)]
fn sampled(t: *mut ThreadState, size: u64) -> bool {
    if size == 0 {
        return false;
    }
    let rate = CONFIG.load().heap_sample_bytes;
    if rate <= 1 {
        return true;
    }
    // SAFETY: pointer from a map lookup; only this thread writes it.
    unsafe {
        let mut left = (*t).heap_countdown;
        if left == 0 {
            left = heap_sample_interval(bpf_get_prandom_u32(), rate);
        }
        if left > size {
            (*t).heap_countdown = left - size;
            return false;
        }
        // The exponential is memoryless: a fresh draw from here on is as
        // good as the remainder past this block.
        (*t).heap_countdown = heap_sample_interval(bpf_get_prandom_u32(), rate);
    }
    true
}

/// Decides at entry; saves what the return probe needs, nothing when it has
/// nothing to do. `python`: CPython's object allocator, whose fallback to
/// the C library's malloc (blocks over 512 bytes) is then not seen again.
#[inline(always)]
pub fn enter(size: u64, old_ptr: u64, python: bool) {
    let cur = current();
    let Some(t) = thread_state(cur.tid, cur.tgid) else {
        return;
    };
    // SAFETY: pointer from a map lookup; only this thread writes it.
    unsafe {
        if python {
            (*t).in_pymalloc = 1;
        } else if (*t).in_pymalloc != 0 {
            return;
        }
    }
    let size = if sampled(t, size) { size } else { 0 };
    // realloc moves or frees the old block: the return forgets it, if tracked.
    let old = if old_ptr != 0
        && ALLOCS
            .get_ptr(AllocKey {
                tgid: cur.tgid,
                _pad: 0,
                ptr: old_ptr,
            })
            .is_some()
    {
        old_ptr
    } else {
        0
    };
    // SAFETY: pointer from a map lookup; only this thread writes it.
    unsafe {
        (*t).alloc_size = size;
        (*t).alloc_old_ptr = old;
    }
}

#[uprobe]
pub fn malloc_enter(ctx: ProbeContext) -> u32 {
    if let Some(size) = ctx.arg::<u64>(0) {
        enter(size, 0, false);
    }
    0
}

#[uprobe]
pub fn calloc_enter(ctx: ProbeContext) -> u32 {
    if let (Some(n), Some(size)) = (ctx.arg::<u64>(0), ctx.arg::<u64>(1)) {
        // No 128-bit multiply on BPF: bound both factors instead. calloc
        // fails anyway for products past the address space.
        if n < (1 << 32) && size < (1 << 32) {
            enter(n * size, 0, false);
        }
    }
    0
}

#[uprobe]
pub fn realloc_enter(ctx: ProbeContext) -> u32 {
    if let (Some(ptr), Some(size)) = (ctx.arg::<u64>(0), ctx.arg::<u64>(1)) {
        enter(size, ptr, false);
    }
    0
}

/// Forgets a tracked block and takes its bytes off its site. Untracked
/// (unsampled) blocks cost this one lookup.
#[inline(always)]
pub fn release(tgid: u32, ptr: u64) {
    if ptr == 0 {
        return;
    }
    let key = AllocKey { tgid, _pad: 0, ptr };
    // SAFETY: pointer from a map lookup.
    let Some(info) = ALLOCS.get_ptr(key).map(|p| unsafe { *p }) else {
        return;
    };
    if ALLOCS.remove(key).is_err() {
        // Another thread freed it first (a double free): counted once.
        return;
    }
    if let Some(stats) = PROCS.get_ptr_mut(tgid) {
        // SAFETY: pointer from a map lookup; other CPUs add concurrently.
        unsafe { atomic_add(&raw mut (*stats).live_allocs, u64::MAX) };
    }
    add_heap_site(
        tgid,
        info.stack_id,
        info.py_stack,
        info.size.wrapping_neg(),
        u64::MAX,
        false,
    );
}

/// Return of malloc, calloc and realloc.
#[uretprobe]
pub fn alloc_exit(ctx: RetProbeContext) -> u32 {
    exit(&ctx, false);
    0
}

/// Return of an allocator; `python` as for [`enter`].
#[inline(always)]
pub fn exit(ctx: &RetProbeContext, python: bool) {
    let cur = current();
    let Some(t) = thread_of(cur.tid) else {
        return;
    };
    // SAFETY: pointer from a map lookup; only this thread writes it.
    unsafe {
        if python {
            (*t).in_pymalloc = 0;
        } else if (*t).in_pymalloc != 0 {
            return;
        }
    }
    // SAFETY: as above.
    let (size, old) = unsafe { ((*t).alloc_size, (*t).alloc_old_ptr) };
    if size == 0 && old == 0 {
        // Not sampled, nothing tracked: the common case.
        return;
    }
    // SAFETY: as above.
    unsafe {
        (*t).alloc_size = 0;
        (*t).alloc_old_ptr = 0;
    }
    let ptr: u64 = ctx.ret();
    if ptr == 0 {
        // Failed: a failed realloc leaves the old block in place.
        return;
    }
    release(cur.tgid, old);
    if size == 0 {
        return;
    }
    count(CTR_HEAP_SAMPLES);
    let Some(stats) = PROCS.get_ptr_mut(cur.tgid) else {
        return;
    };
    let cap = CONFIG.load().max_live_allocs as i64;
    // SAFETY: pointer from a map lookup.
    if cap > 0 && unsafe { (*stats).live_allocs } as i64 >= cap {
        drop_sample(stats);
        return;
    }
    let stack_id = user_stack(ctx);
    let py_stack = py_stack(cur.tgid);
    let key = AllocKey {
        tgid: cur.tgid,
        _pad: 0,
        ptr,
    };
    let info = AllocInfo {
        size,
        stack_id,
        _pad: 0,
        py_stack,
    };
    if ALLOCS.insert(key, info, 0).is_err() {
        drop_sample(stats);
        return;
    }
    // SAFETY: pointer from a map lookup; other CPUs add concurrently.
    unsafe { atomic_add(&raw mut (*stats).live_allocs, 1) };
    add_heap_site(cur.tgid, stack_id, py_stack, size, 1, true);
}

/// A sampled block that could not be tracked: counted per worker and in all.
#[inline(always)]
fn drop_sample(stats: *mut memtrace_common::ProcStats) {
    count(CTR_ALLOCS_DROPPED);
    // SAFETY: pointer from a map lookup; other CPUs add concurrently.
    unsafe { atomic_add(&raw mut (*stats).allocs_dropped, 1) };
}

/// The thread's state if it has one (the entry probe created it).
#[inline(always)]
fn thread_of(tid: u32) -> Option<*mut ThreadState> {
    THREADS.get_ptr_mut(tid)
}

#[uprobe]
pub fn free_enter(ctx: ProbeContext) -> u32 {
    if let Some(ptr) = ctx.arg::<u64>(0) {
        release(current().tgid, ptr);
    }
    0
}
