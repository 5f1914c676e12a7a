//! Heap allocations while allocation-site collection is on: uprobes on the
//! C library's malloc, calloc, realloc and free, attached to the selected
//! processes only. Each live block remembers its size and the stack that
//! allocated it, so a site's bytes are what it allocated and has not freed:
//! what is leaking, as tracemalloc reports it. The stack is taken at the
//! return, where it starts in the caller of malloc.
use aya_ebpf::{
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use memtrace_common::{AllocInfo, AllocKey, SITE_MALLOC};

use crate::{
    maps::ALLOCS,
    probes::stacks::{add_to_site, collecting, user_stack},
    util::{count, current, thread_state},
};

/// Saves what the return probe needs.
#[inline(always)]
fn save(size: u64, old_ptr: u64) {
    let cur = current();
    if collecting(cur.tgid).is_none() {
        return;
    }
    if let Some(t) = thread_state(cur.tid, cur.tgid) {
        // SAFETY: pointer from a map lookup; only this thread writes it.
        unsafe {
            (*t).alloc_size = size;
            (*t).alloc_old_ptr = old_ptr;
        }
    }
}

#[uprobe]
pub fn malloc_enter(ctx: ProbeContext) -> u32 {
    if let Some(size) = ctx.arg::<u64>(0) {
        save(size, 0);
    }
    0
}

#[uprobe]
pub fn calloc_enter(ctx: ProbeContext) -> u32 {
    if let (Some(n), Some(size)) = (ctx.arg::<u64>(0), ctx.arg::<u64>(1)) {
        // No 128-bit multiply on BPF: bound both factors instead. calloc
        // fails anyway for products past the address space.
        if n < (1 << 32) && size < (1 << 32) {
            save(n * size, 0);
        }
    }
    0
}

#[uprobe]
pub fn realloc_enter(ctx: ProbeContext) -> u32 {
    if let (Some(ptr), Some(size)) = (ctx.arg::<u64>(0), ctx.arg::<u64>(1)) {
        save(size, ptr);
    }
    0
}

/// Forgets a block and takes its bytes off its site.
#[inline(always)]
fn release(tgid: u32, ptr: u64) {
    if ptr == 0 {
        return;
    }
    let key = AllocKey { tgid, _pad: 0, ptr };
    // SAFETY: pointer from a map lookup.
    let Some(info) = ALLOCS.get_ptr(key).map(|p| unsafe { *p }) else {
        return;
    };
    let _ = ALLOCS.remove(key);
    add_to_site(
        tgid,
        info.stack_id,
        SITE_MALLOC,
        info.size.wrapping_neg(),
        u64::MAX,
    );
}

/// Return of malloc, calloc and realloc.
#[uretprobe]
pub fn alloc_exit(ctx: RetProbeContext) -> u32 {
    let cur = current();
    if collecting(cur.tgid).is_none() {
        return 0;
    }
    let Some(t) = thread_state(cur.tid, cur.tgid) else {
        return 0;
    };
    // SAFETY: pointer from a map lookup; only this thread writes it.
    let (size, old) = unsafe {
        let saved = ((*t).alloc_size, (*t).alloc_old_ptr);
        (*t).alloc_size = 0;
        (*t).alloc_old_ptr = 0;
        saved
    };
    let ptr: u64 = ctx.ret();
    if ptr == 0 {
        // Failed: a failed realloc leaves the old block in place.
        return 0;
    }
    release(cur.tgid, old);
    if size == 0 {
        return 0;
    }
    let Some(stack_id) = user_stack(&ctx) else {
        return 0;
    };
    let key = AllocKey {
        tgid: cur.tgid,
        _pad: 0,
        ptr,
    };
    let info = AllocInfo {
        size,
        stack_id,
        _pad: 0,
    };
    if ALLOCS.insert(key, info, 0).is_err() {
        count(memtrace_common::CTR_SITES_FULL);
        return 0;
    }
    add_to_site(cur.tgid, stack_id, SITE_MALLOC, size, 1);
    0
}

#[uprobe]
pub fn free_enter(ctx: ProbeContext) -> u32 {
    let cur = current();
    if collecting(cur.tgid).is_none() {
        return 0;
    }
    if let Some(ptr) = ctx.arg::<u64>(0) {
        release(cur.tgid, ptr);
    }
    0
}
