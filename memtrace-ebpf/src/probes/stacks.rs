//! Allocation-site collection, attached only while someone asked for a
//! snapshot: user stacks of page faults (sampled, one in N per thread,
//! weighted by N pages), of mmap calls and of brk growth, summed per
//! (process, stack). A user stack walk costs ~0.7 µs, hence the sampling.
use aya_ebpf::{
    bindings::BPF_F_USER_STACK,
    macros::tracepoint,
    programs::{TracePointContext, tracing::StackIdContext},
};
use memtrace_common::{
    PROC_FLAG_COLLECT, SITE_BRK, SITE_FAULT, SITE_MALLOC, SITE_MMAP, STACK_LOST, SiteCount, SiteKey,
};

use crate::{
    maps::{CONFIG, STACK_SITES, STACKS},
    probes::python::py_stack,
    util::{atomic_add, count, current, field, page_align, thread_state, watched},
};

const PAGE_SIZE: u64 = 4096;

/// The process's counters if collection is on for it.
#[inline(always)]
pub fn collecting(tgid: u32) -> Option<*mut memtrace_common::ProcStats> {
    let stats = watched(tgid)?;
    // SAFETY: pointer from a map lookup.
    (unsafe { (*stats).flags } & PROC_FLAG_COLLECT != 0).then_some(stats)
}

#[inline(always)]
fn add_site(ctx: &TracePointContext, tgid: u32, kind: u32, bytes: u64) {
    add_to_site(tgid, user_stack(ctx), py_stack(tgid), kind, bytes, 1);
}

/// The current user stack's id, counting failures. A stack the map could
/// not take (its bucket holds another stack, or the map is full) is
/// `STACK_LOST`: the sample still counts, under its Python frames when it
/// has some, and its native frames are missing.
#[inline(always)]
pub fn user_stack<C: StackIdContext>(ctx: &C) -> u32 {
    match ctx.get_stackid(&STACKS, BPF_F_USER_STACK as u64) {
        Ok(id) => {
            count(memtrace_common::CTR_STACK_SAMPLES);
            id as u32
        }
        Err(_) => {
            count(memtrace_common::CTR_STACK_ERRORS);
            STACK_LOST
        }
    }
}

/// Adds (wrapping: frees subtract) to a site's bytes and samples.
#[inline(always)]
pub fn add_to_site(tgid: u32, stack_id: u32, py_stack: u64, kind: u32, bytes: u64, samples: u64) {
    let key = SiteKey {
        tgid,
        stack_id,
        kind,
        _pad: 0,
        py_stack,
    };
    if let Some(site) = STACK_SITES.get_ptr_mut(key) {
        // SAFETY: pointer from a map lookup; other CPUs may add concurrently.
        unsafe {
            atomic_add(&raw mut (*site).bytes, bytes);
            atomic_add(&raw mut (*site).samples, samples);
        }
        return;
    }
    let fresh = SiteCount {
        bytes,
        samples,
        ..SiteCount::default()
    };
    if STACK_SITES.insert(key, fresh, 0).is_err() {
        count(memtrace_common::CTR_SITES_FULL);
    }
}

/// Adds a sampled heap block to its site (`allocated`) or takes a freed one
/// off (wrapping): live bytes and blocks move both ways, allocated ones only up.
#[inline(always)]
pub fn add_heap_site(
    tgid: u32,
    stack_id: u32,
    py_stack: u64,
    bytes: u64,
    samples: u64,
    allocated: bool,
) {
    let key = SiteKey {
        tgid,
        stack_id,
        kind: SITE_MALLOC,
        _pad: 0,
        py_stack,
    };
    if let Some(site) = STACK_SITES.get_ptr_mut(key) {
        // SAFETY: pointer from a map lookup; other CPUs may add concurrently.
        unsafe {
            atomic_add(&raw mut (*site).bytes, bytes);
            atomic_add(&raw mut (*site).samples, samples);
            if allocated {
                atomic_add(&raw mut (*site).alloc_bytes, bytes);
                atomic_add(&raw mut (*site).alloc_samples, samples);
            }
        }
        return;
    }
    let (alloc_bytes, alloc_samples) = if allocated { (bytes, samples) } else { (0, 0) };
    let fresh = SiteCount {
        bytes,
        samples,
        alloc_bytes,
        alloc_samples,
    };
    if STACK_SITES.insert(key, fresh, 0).is_err() {
        count(memtrace_common::CTR_SITES_FULL);
    }
}

#[tracepoint]
pub fn page_fault_stacks(ctx: TracePointContext) -> u32 {
    let _ = try_page_fault_stacks(&ctx);
    0
}

fn try_page_fault_stacks(ctx: &TracePointContext) -> Option<()> {
    let cur = current();
    collecting(cur.tgid)?;
    let thread = thread_state(cur.tid, cur.tgid)?;
    let period = CONFIG.load().fault_sample_period.max(1);
    // SAFETY: pointer from a map lookup; only this thread writes it.
    unsafe {
        if (*thread).sample_countdown > 0 {
            (*thread).sample_countdown -= 1;
            return Some(());
        }
        (*thread).sample_countdown = period - 1;
    }
    add_site(ctx, cur.tgid, SITE_FAULT, PAGE_SIZE * period as u64);
    Some(())
}

#[tracepoint]
pub fn mmap_stacks(ctx: TracePointContext) -> u32 {
    let cur = current();
    if let Some(stats) = collecting(cur.tgid) {
        // SAFETY: pointer from a map lookup.
        unsafe { atomic_add(&raw mut (*stats).collected_mmap_calls, 1) };
        if let Ok(len) = field::<u64>(&ctx, CONFIG.load().layout.mmap_len) {
            add_site(&ctx, cur.tgid, SITE_MMAP, page_align(len));
        }
    }
    0
}

/// At brk entry the argument is the break asked for; growth over the last
/// break the exit probe saw is what this call site allocates.
#[tracepoint]
pub fn brk_stacks(ctx: TracePointContext) -> u32 {
    let cur = current();
    if let Some(stats) = collecting(cur.tgid) {
        if let Ok(wanted) = field::<u64>(&ctx, CONFIG.load().layout.brk_arg) {
            // SAFETY: pointer from a map lookup.
            let last = unsafe { (*stats).last_brk };
            if last != 0 && wanted > last {
                add_site(&ctx, cur.tgid, SITE_BRK, wanted - last);
            }
        }
    }
    0
}
