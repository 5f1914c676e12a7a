//! Python frames of the sampled thread, for allocation sites (collection
//! on): the thread's `PyThreadState` is what `pthread_getspecific` returns
//! for CPython's TSS key (the same lookup tracemalloc does), found through
//! glibc's thread block at the task's fs base; it is trusted only when its
//! `thread_id` is that same thread. Then the `_PyInterpreterFrame` chain is
//! followed, recording (code object, code unit, first line) per frame. The
//! agent turns them into file:line (it reads the code objects); equal
//! stacks share one id in `PY_STACKS`.
//!
//! Also CPython's object allocator (`_PyObject_Malloc` and family, found by
//! the agent in the interpreter's allocator table), which serves objects of
//! 512 bytes or less from its own arenas where the C library's malloc
//! probes never see them; heap tier only.
use aya_ebpf::{
    helpers::{bpf_get_current_task, bpf_probe_read_kernel, bpf_probe_read_user, generated},
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use memtrace_common::{
    GLIBC_KEYS_1STBLOCK, GLIBC_SPECIFIC_1STBLOCK, PY_FLAG_OWNER_AT_LEAST, PY_FLAG_TAGGED,
    PY_FLAG_TLS, PY_MAX_FRAMES, PY_NO_CFRAME, PyFrame, PyProcInfo,
};

/// The tag bits of a `_PyStackRef` (3.14+).
const PY_TAG_BITS: u64 = 3;

use crate::{
    maps::{CONFIG, PY_PROCS, PY_SCRATCH, PY_STACKS, PY_WALK},
    probes::alloc::{enter, exit, release},
    util::{count, current},
};

/// Bytes of a frame header read at once: every offset used is below.
const FRAME_HEADER: usize = 80;
use crate::maps::HEADER_WORDS;
/// Frames looked at per walk, shims included.
const MAX_WALK: usize = PY_MAX_FRAMES + 4;

#[inline(always)]
fn read_user<T>(addr: u64) -> Option<T> {
    // SAFETY: the helper checks the access and fails on a bad address.
    unsafe { bpf_probe_read_user(addr as *const T) }.ok()
}

/// A field of the frame header, by byte offset (masked in bounds).
#[inline(always)]
fn word(header: &[u64; HEADER_WORDS], offset: u32) -> u64 {
    header[(offset as usize / 8) & (HEADER_WORDS - 1)]
}

/// The first `FRAME_HEADER` bytes of a frame.
#[inline(always)]
fn read_header(frame: u64, header: &mut [u64; HEADER_WORDS]) -> bool {
    // SAFETY: the helper checks the source; the destination holds more
    // than FRAME_HEADER bytes.
    unsafe {
        generated::bpf_probe_read_user(
            header.as_mut_ptr().cast(),
            FRAME_HEADER as u32,
            frame as *const _,
        ) == 0
    }
}

/// The current thread's innermost `_PyInterpreterFrame`, if this process
/// runs Python and the thread has a thread state.
#[inline(always)]
fn top_frame(info: &PyProcInfo) -> Option<u64> {
    let fsbase_off = CONFIG.load().task_fsbase;
    let tls = info.flags & PY_FLAG_TLS != 0;
    if fsbase_off == 0 || (!tls && info.tss_key >= GLIBC_KEYS_1STBLOCK) {
        return None;
    }
    // SAFETY: the helper returns the current task; the read is checked.
    let fsbase: u64 = unsafe {
        let task = bpf_get_current_task() as *const u8;
        bpf_probe_read_kernel(task.add(fsbase_off as usize) as *const u64).ok()?
    };
    let slot = if tls {
        fsbase.wrapping_add(info.tls_offset as i32 as i64 as u64)
    } else {
        fsbase + GLIBC_SPECIFIC_1STBLOCK + 16 * info.tss_key as u64 + 8
    };
    let tstate: u64 = read_user(slot)?;
    if tstate == 0 || read_user::<u64>(tstate + info.thread_id as u64)? != fsbase {
        return None;
    }
    let mut frame: u64 = read_user(tstate + info.tstate_frame as u64)?;
    if info.cframe_frame != PY_NO_CFRAME {
        if frame == 0 {
            return None;
        }
        frame = read_user(frame + info.cframe_frame as u64)?;
    }
    (frame != 0).then_some(frame)
}

/// Mixes one frame into a stack's id (FNV-1a over the words).
#[inline(always)]
fn mix(hash: u64, value: u64) -> u64 {
    (hash ^ value).wrapping_mul(0x0000_0100_0000_01b3)
}

/// The id in `PY_STACKS` of the current thread's Python frames; 0 when the
/// process is not Python, the thread runs none, or they cannot be read.
#[inline(always)]
pub fn py_stack(tgid: u32) -> u64 {
    let depth = CONFIG.load().py_frames as usize;
    if depth == 0 {
        return 0;
    }
    let Some(info) = PY_PROCS.get_ptr(tgid) else {
        return 0;
    };
    // SAFETY: pointer from a map lookup; the agent only replaces it whole.
    let info = unsafe { *info };
    let Some(frame) = top_frame(&info) else {
        return 0;
    };
    let Some(stack) = PY_SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: per-CPU scratch, only this program uses it while it runs.
    let stack = unsafe { &mut *stack };
    let Some(walk) = PY_WALK.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: per-CPU scratch, as above.
    let walk = unsafe { &mut *walk };
    // The walk's state lives in map memory, not registers: the verifier
    // then sees the same state at each turn of the loop whatever path the
    // last one took, and does not explore every combination.
    walk.frame = frame;
    walk.n = 0;
    walk.hash = 0xcbf2_9ce4_8422_2325;
    for _ in 0..MAX_WALK {
        let n = walk.n as usize;
        if walk.frame == 0 || n >= depth || n >= PY_MAX_FRAMES {
            break;
        }
        if !read_header(walk.frame, &mut walk.header) {
            break;
        }
        let header = &walk.header;
        let owner = (word(header, info.frame_owner) >> (8 * (info.frame_owner % 8))) & 0xff;
        let previous = word(header, info.frame_previous);
        let shim = if info.flags & PY_FLAG_OWNER_AT_LEAST != 0 {
            owner as u32 >= info.owner_cstack
        } else {
            owner as u32 == info.owner_cstack
        };
        if !shim {
            let mut code = word(header, info.frame_code);
            if info.flags & PY_FLAG_TAGGED != 0 {
                code &= !PY_TAG_BITS;
            }
            let instr = word(header, info.frame_instr);
            let start = code + info.code_adaptive as u64;
            // A frame not started yet is one unit before its first
            // instruction: -1, as the agent reads it.
            let index = if instr >= start {
                ((instr - start) / 2) as u32
            } else {
                u32::MAX
            };
            let firstlineno = read_user::<u32>(code + info.code_firstlineno as u64).unwrap_or(0);
            stack.frames[n] = PyFrame {
                code,
                index,
                firstlineno,
            };
            walk.hash = mix(
                mix(walk.hash, code),
                ((index as u64) << 32) | firstlineno as u64,
            );
            walk.n += 1;
        }
        walk.frame = previous;
    }
    let n = walk.n;
    if n == 0 {
        return 0;
    }
    stack.len = n as u32;
    let id = walk.hash | 1;
    if PY_STACKS.get_ptr(id).is_none() && PY_STACKS.insert(id, &*stack, 0).is_err() {
        count(memtrace_common::CTR_PY_STACKS_FULL);
        return 0;
    }
    id
}

/// CPython's allocator entry points take the allocator's context first.
#[uprobe]
pub fn pymalloc_enter(ctx: ProbeContext) -> u32 {
    if let Some(size) = ctx.arg::<u64>(1) {
        enter(size, 0, true);
    }
    0
}

#[uprobe]
pub fn pycalloc_enter(ctx: ProbeContext) -> u32 {
    if let (Some(n), Some(size)) = (ctx.arg::<u64>(1), ctx.arg::<u64>(2))
        && n < (1 << 32)
        && size < (1 << 32)
    {
        enter(n * size, 0, true);
    }
    0
}

#[uprobe]
pub fn pyrealloc_enter(ctx: ProbeContext) -> u32 {
    if let (Some(ptr), Some(size)) = (ctx.arg::<u64>(1), ctx.arg::<u64>(2)) {
        enter(size, ptr, true);
    }
    0
}

#[uretprobe]
pub fn pyalloc_exit(ctx: RetProbeContext) -> u32 {
    exit(&ctx, true);
    0
}

#[uprobe]
pub fn pyfree_enter(ctx: ProbeContext) -> u32 {
    if let Some(ptr) = ctx.arg::<u64>(1) {
        release(current().tgid, ptr);
    }
    0
}
