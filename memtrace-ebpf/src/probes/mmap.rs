//! mmap, munmap, mremap and brk: bytes mapped and unmapped and program-break
//! growth per process and per thread. Arguments are saved at sys_enter and
//! counted at sys_exit, only when the call succeeded.
use aya_ebpf::{macros::tracepoint, programs::TracePointContext};

use crate::{
    maps::CONFIG,
    util::{atomic_add, current, field, is_err_ret, page_align, thread_state, watched},
};

/// Saves up to two syscall arguments in the thread's state.
#[inline(always)]
fn save_args(arg0: u64, arg1: u64) -> Option<()> {
    let cur = current();
    watched(cur.tgid)?;
    let thread = thread_state(cur.tid, cur.tgid)?;
    // SAFETY: pointer from a map lookup; only this thread writes it.
    unsafe {
        (*thread).pending_arg0 = arg0;
        (*thread).pending_arg1 = arg1;
    }
    Some(())
}

#[tracepoint]
pub fn mmap_enter(ctx: TracePointContext) -> u32 {
    if let Ok(len) = field::<u64>(&ctx, CONFIG.load().layout.mmap_len) {
        let _ = save_args(page_align(len), 0);
    }
    0
}

#[tracepoint]
pub fn mmap_exit(ctx: TracePointContext) -> u32 {
    let _ = try_mmap_exit(&ctx);
    0
}

fn try_mmap_exit(ctx: &TracePointContext) -> Option<()> {
    let ret: i64 = field(ctx, CONFIG.load().layout.sys_exit_ret).ok()?;
    let cur = current();
    let stats = watched(cur.tgid)?;
    let thread = thread_state(cur.tid, cur.tgid)?;
    // SAFETY: pointers from map lookups.
    unsafe {
        let len = (*thread).pending_arg0;
        (*thread).pending_arg0 = 0;
        if is_err_ret(ret) {
            return Some(());
        }
        atomic_add(&raw mut (*stats).mmap_bytes, len);
        (*thread).mmap_bytes += len;
    }
    Some(())
}

#[tracepoint]
pub fn munmap_enter(ctx: TracePointContext) -> u32 {
    if let Ok(len) = field::<u64>(&ctx, CONFIG.load().layout.munmap_len) {
        let _ = save_args(page_align(len), 0);
    }
    0
}

#[tracepoint]
pub fn munmap_exit(ctx: TracePointContext) -> u32 {
    let _ = try_munmap_exit(&ctx);
    0
}

fn try_munmap_exit(ctx: &TracePointContext) -> Option<()> {
    let ret: i64 = field(ctx, CONFIG.load().layout.sys_exit_ret).ok()?;
    let cur = current();
    let stats = watched(cur.tgid)?;
    let thread = thread_state(cur.tid, cur.tgid)?;
    // SAFETY: pointers from map lookups.
    unsafe {
        let len = (*thread).pending_arg0;
        (*thread).pending_arg0 = 0;
        if ret != 0 {
            return Some(());
        }
        atomic_add(&raw mut (*stats).munmap_bytes, len);
        (*thread).munmap_bytes += len;
    }
    Some(())
}

#[tracepoint]
pub fn mremap_enter(ctx: TracePointContext) -> u32 {
    let layout = CONFIG.load().layout;
    if let (Ok(old_len), Ok(new_len)) = (
        field::<u64>(&ctx, layout.mremap_old_len),
        field::<u64>(&ctx, layout.mremap_new_len),
    ) {
        let _ = save_args(page_align(old_len), page_align(new_len));
    }
    0
}

#[tracepoint]
pub fn mremap_exit(ctx: TracePointContext) -> u32 {
    let _ = try_mremap_exit(&ctx);
    0
}

fn try_mremap_exit(ctx: &TracePointContext) -> Option<()> {
    let ret: i64 = field(ctx, CONFIG.load().layout.sys_exit_ret).ok()?;
    let cur = current();
    let stats = watched(cur.tgid)?;
    let thread = thread_state(cur.tid, cur.tgid)?;
    // SAFETY: pointers from map lookups.
    unsafe {
        let (old_len, new_len) = ((*thread).pending_arg0, (*thread).pending_arg1);
        (*thread).pending_arg0 = 0;
        (*thread).pending_arg1 = 0;
        if is_err_ret(ret) {
            return Some(());
        }
        if new_len > old_len {
            atomic_add(&raw mut (*stats).mremap_grow_bytes, new_len - old_len);
        } else {
            atomic_add(&raw mut (*stats).mremap_shrink_bytes, old_len - new_len);
        }
    }
    Some(())
}

/// brk(2) returns the new break (the old one on failure), so the change is
/// the difference from the last value seen. The first call seen only sets the
/// baseline; the agent seeds it for processes found already running.
#[tracepoint]
pub fn brk_exit(ctx: TracePointContext) -> u32 {
    let _ = try_brk_exit(&ctx);
    0
}

fn try_brk_exit(ctx: &TracePointContext) -> Option<()> {
    let ret: i64 = field(ctx, CONFIG.load().layout.sys_exit_ret).ok()?;
    let cur = current();
    let stats = watched(cur.tgid)?;
    if ret <= 0 {
        return Some(());
    }
    let new_brk = ret as u64;
    let thread = thread_state(cur.tid, cur.tgid)?;
    // SAFETY: pointers from map lookups. malloc serialises brk calls, and a
    // lost race only misplaces a delta between grow and shrink.
    unsafe {
        let last = (*stats).last_brk;
        (*stats).last_brk = new_brk;
        if last == 0 || new_brk == last {
            return Some(());
        }
        if new_brk > last {
            atomic_add(&raw mut (*stats).brk_grow_bytes, new_brk - last);
            (*thread).brk_grow_bytes += new_brk - last;
        } else {
            atomic_add(&raw mut (*stats).brk_shrink_bytes, last - new_brk);
            (*thread).brk_shrink_bytes += last - new_brk;
        }
    }
    Some(())
}
