//! Helpers shared by the probes.
use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_get_current_task, bpf_ktime_get_ns},
    programs::TracePointContext,
};
use memtrace_common::{ProcStats, RSS_MEMBERS, ThreadState};

use crate::maps::{CONFIG, COUNTERS, EVENTS, MM_RSS, PROCS, THREADS};

/// `BPF_RB_NO_WAKEUP`: the agent polls the ring buffer on a timer, so a
/// wake-up per event would only cost time.
const RB_NO_WAKEUP: u64 = 1;
/// `BPF_RB_FORCE_WAKEUP`.
const RB_FORCE_WAKEUP: u64 = 2;
/// `BPF_RB_AVAIL_DATA`: unread bytes, for `bpf_ringbuf_query`.
const RB_AVAIL_DATA: u64 = 0;

/// Flags to submit an event with: no wake-up while the agent's timer keeps
/// up, a wake-up once half the ring is unread, so that a burst faster than
/// the timer does not overflow the ring.
#[inline(always)]
pub fn submit_flags() -> u64 {
    if EVENTS.query(RB_AVAIL_DATA) > u64::from(CONFIG.load().ring_wake_bytes) {
        RB_FORCE_WAKEUP
    } else {
        RB_NO_WAKEUP
    }
}

pub struct Current {
    pub tgid: u32,
    pub tid: u32,
}

#[inline(always)]
pub fn current() -> Current {
    let id = bpf_get_current_pid_tgid();
    Current {
        tgid: (id >> 32) as u32,
        tid: id as u32,
    }
}

#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: helper without preconditions.
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
pub fn count(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it while we run.
        unsafe { *slot += 1 };
    }
}

/// Adds to a counter that other CPUs may update at the same time.
#[inline(always)]
pub fn atomic_add(field: *mut u64, value: u64) {
    // The BPF target has no `AtomicU64::fetch_add`; this intrinsic lowers to
    // BPF's atomic add. Its result must stay unused: fetching it needs ISA v3,
    // and rustc has the linker target `generic`.
    // SAFETY: `field` points into a map value, which lives as long as the
    // program runs and is 8-byte aligned.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(field, value) };
}

#[inline(always)]
pub fn watched(tgid: u32) -> Option<*mut ProcStats> {
    PROCS.get_ptr_mut(tgid)
}

/// The thread's state, created on first use. `tid` is the current thread's.
/// A state left by a thread of another process that had this tid (one no
/// longer watched when it exited) is started afresh.
#[inline(always)]
pub fn thread_state(tid: u32, tgid: u32) -> Option<*mut ThreadState> {
    if let Some(state) = THREADS.get_ptr_mut(tid) {
        // SAFETY: pointer from a map lookup.
        if unsafe { (*state).tgid } == tgid {
            return Some(state);
        }
    }
    let fresh = ThreadState {
        tgid,
        // Callers pass the current thread's tid.
        // SAFETY: helper without preconditions.
        task: unsafe { bpf_get_current_task() },
        req_fd: -1,
        ..ThreadState::default()
    };
    if THREADS.insert(tid, fresh, 0).is_err() {
        count(memtrace_common::CTR_THREADS_FULL);
    }
    THREADS.get_ptr_mut(tid)
}

/// Writes the RSS counters of a watched process's mm to `dst` (zeros if
/// unknown) and returns which are known (a zero mask if none).
#[inline(always)]
pub fn proc_rss(stats: *const ProcStats, dst: *mut [i64; RSS_MEMBERS]) -> u32 {
    // SAFETY: pointer from a map lookup.
    let mm_id = unsafe { (*stats).mm_id };
    let mm = if mm_id == 0 {
        None
    } else {
        MM_RSS.get_ptr(mm_id)
    };
    // SAFETY: `dst` is in map or ring-buffer memory (the caller's); `mm`
    // from a map lookup. Word copies: an array assignment becomes a
    // byte-at-a-time `memmove` call on BPF.
    unsafe {
        match mm {
            Some(mm) => {
                copy_words(dst, &raw const (*mm).bytes);
                (*mm).known
            }
            None => {
                zero_words(dst);
                0
            }
        }
    }
}

/// Copies a `T` a word at a time. An assignment between two places the
/// compiler cannot tell apart becomes a call to `memmove`, and a large
/// zeroing a call to `memset`; compiler_builtins implements both a byte at a
/// time on BPF (5 to 8 instructions a byte). Before this, those loops were
/// about half of `request_end_ret`'s run time.
///
/// # Safety
/// Both point to a `T` in map or ring-buffer memory, 8-byte aligned. Not the
/// stack: the verifier wants stack accesses aligned to their size.
#[inline(always)]
pub unsafe fn copy_words<T>(dst: *mut T, src: *const T) {
    const { assert!(size_of::<T>() % 8 == 0) };
    let (dst, src) = (dst.cast::<u64>(), src.cast::<u64>());
    for i in 0..size_of::<T>() / 8 {
        // SAFETY: the caller's; volatile keeps the words from being merged
        // back into a `memmove` call.
        unsafe { dst.add(i).write_volatile(src.add(i).read_volatile()) };
    }
}

/// Zeroes a `T` a word at a time (see [`copy_words`]).
///
/// # Safety
/// As [`copy_words`], for `dst`.
#[inline(always)]
pub unsafe fn zero_words<T>(dst: *mut T) {
    const { assert!(size_of::<T>() % 8 == 0) };
    let dst = dst.cast::<u64>();
    for i in 0..size_of::<T>() / 8 {
        // SAFETY: the caller's.
        unsafe { dst.add(i).write_volatile(0) };
    }
}

/// Reads a tracepoint field at an offset the agent found in the format file.
#[inline(always)]
pub fn field<T>(ctx: &TracePointContext, offset: u32) -> Result<T, i64> {
    // SAFETY: bpf_probe_read_kernel checks the access; a bad offset reads
    // an error, not memory outside the record.
    unsafe { ctx.read_at::<T>(offset as usize) }.map_err(|e| e as i64)
}

/// A field of a tracepoint's record at a fixed offset, loaded straight from
/// the context: the verifier lets tracepoint programs load from their
/// context at constant, size-aligned offsets, which costs a load where
/// [`field`] costs a helper call. `OFFSET` must be a multiple of the
/// field's size.
#[inline(always)]
pub fn fixed_field<T: Copy, const OFFSET: usize>(ctx: &TracePointContext) -> T {
    // SAFETY: the record is at least as long as the layouts the callers
    // check at load time (the agent sets `sock_fixed` only then); the
    // verifier checks the load.
    unsafe {
        core::ptr::read_volatile(
            aya_ebpf::EbpfContext::as_ptr(ctx)
                .cast::<u8>()
                .add(OFFSET)
                .cast::<T>(),
        )
    }
}

/// Page-aligns a byte count the way mmap/munmap round lengths.
#[inline(always)]
pub fn page_align(len: u64) -> u64 {
    (len + 4095) & !4095
}

/// Whether a syscall return value is an error (-4095..=-1).
#[inline(always)]
pub fn is_err_ret(ret: i64) -> bool {
    (-4095..0).contains(&ret)
}
