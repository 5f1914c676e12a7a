//! Request boundaries. A request begins at a uprobe on the request function's
//! entry (or its begin symbol), or when accept returns a connection in a
//! watched worker; it ends at the matching return (or end symbol), at the
//! close of that connection, or at the next accept. The counters at the start
//! are kept per thread, and one summary per request goes to the agent.
use aya_ebpf::{
    macros::{tracepoint, uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext, TracePointContext},
};
use memtrace_common::{
    EVENT_REQUEST, EVENT_REQUEST_SHORT, LINE_NONE, ProcStats, REQUEST_OK, REQUEST_SHORT_BYTES,
    RequestEvent, RequestLine, RequestStart, ThreadState,
};

use crate::{
    maps::{CONFIG, EVENTS, THREADS},
    probes::ends::{
        current_files, fault_counters, open_fds, read_end, read_nothing, read_start, write_end,
    },
    util::{
        atomic_add, copy_words, count, current, field, now_ns, proc_rss, submit_flags,
        thread_state, watched,
    },
};

/// Starts a request on this thread. A begin while one is in flight on the
/// same thread (recursion) only deepens the nesting. `fd`: the connection
/// accepted for it (-1: none), left out of the descriptor count.
#[inline(always)]
fn begin_request(tgid: u32, tid: u32, fd: i64) -> Option<()> {
    let stats = watched(tgid)?;
    let thread = thread_state(tid, tgid)?;
    // SAFETY: pointers from map lookups; only this thread writes its state.
    unsafe {
        let t = &mut *thread;
        if t.depth > 0 {
            t.depth += 1;
            return Some(());
        }
        // Sequence number in start order. Two threads of one process starting
        // at the same instant can read the same value (no fetch-and-add on
        // this ISA level); the agent numbers requests exactly as they end.
        let seq = (*stats).requests_started;
        atomic_add(&raw mut (*stats).requests_started, 1);
        t.depth = 1;
        t.req_fd = fd;
        t.req_known = proc_rss(stats, &raw mut t.req.rss);
        set_start(&raw mut t.req, seq, thread);
        read_start(&mut t.req, tgid, open_fds(current_files(), [fd, -1]));
    }
    Some(())
}

/// Ends the request in flight on this thread, if any, and sends its summary.
/// `unwind` ends it whatever the nesting depth (the thread is exiting).
/// `next_fd`: a connection just accepted for the next request (-1: none);
/// it and the request's own connection are left out of the descriptor
/// count.
#[inline(always)]
pub fn end_request(tgid: u32, tid: u32, status: u32, unwind: bool, next_fd: i64) -> Option<()> {
    let stats = watched(tgid)?;
    let thread = THREADS.get_ptr_mut(tid)?;
    // SAFETY: pointers from map lookups; only this thread writes its state.
    unsafe {
        let t = &mut *thread;
        if t.depth == 0 {
            return Some(());
        }
        t.depth -= 1;
        if t.depth > 0 && !unwind {
            return Some(());
        }
        t.depth = 0;
        if status == REQUEST_OK {
            let fds = open_fds(current_files(), [t.req_fd, next_fd]);
            read_end(&t.req, tgid, fds, true);
        } else {
            read_nothing();
        }
        t.req_fd = -1;
        let counter = if status == REQUEST_OK {
            &raw mut (*stats).requests_ended
        } else {
            &raw mut (*stats).requests_aborted
        };
        atomic_add(counter, 1);

        let summary = Summary {
            tgid,
            tid,
            status,
            known_before: t.req_known,
            start: &t.req,
            deltas: thread_deltas(t, &t.req),
        };
        emit_request(stats, &summary, None);
    }
    Some(())
}

/// What a thread's counters (faults, mmap, munmap, brk grow, brk shrink)
/// grew by since a request started.
/// Fills a request's start from the thread's counters (all but `rss`, which
/// `proc_rss` writes, and the descriptors and GC totals, which `read_start`
/// does). Field by field: a struct assignment here became byte-at-a-time
/// `memset`/`memmove` calls on BPF.
///
/// # Safety
/// Both point into map values (`req` may lie inside `t`).
#[inline(always)]
pub unsafe fn set_start(req: *mut RequestStart, seq: u64, t: *const ThreadState) {
    // SAFETY: the caller's.
    unsafe {
        (*req).start_ns = now_ns();
        (*req).seq = seq;
        (*req).faults = thread_faults(&*t);
        (*req).mmap_bytes = (*t).mmap_bytes;
        (*req).munmap_bytes = (*t).munmap_bytes;
        (*req).brk_grow_bytes = (*t).brk_grow_bytes;
        (*req).brk_shrink_bytes = (*t).brk_shrink_bytes;
    }
}

/// The faults a thread has taken: the kernel's own counters of its task
/// where they are read, else what exceptions:page_fault_user counted.
#[inline(always)]
fn thread_faults(t: &ThreadState) -> u64 {
    let cfg = CONFIG.load();
    if cfg.task_min_flt == 0 || t.task == 0 {
        return t.faults;
    }
    fault_counters(t.task, cfg.task_min_flt, cfg.task_maj_flt)
}

#[inline(always)]
pub fn thread_deltas(t: &ThreadState, start: &RequestStart) -> [u64; 5] {
    [
        thread_faults(t).wrapping_sub(start.faults),
        t.mmap_bytes - start.mmap_bytes,
        t.munmap_bytes - start.munmap_bytes,
        t.brk_grow_bytes - start.brk_grow_bytes,
        t.brk_shrink_bytes - start.brk_shrink_bytes,
    ]
}

/// A request summary without its line: the head of a `RequestEvent`.
#[repr(C, align(8))]
struct ShortRequest([u64; REQUEST_SHORT_BYTES / 8]);

/// What a request's summary says besides its line.
pub struct Summary<'a> {
    pub tgid: u32,
    pub tid: u32,
    pub status: u32,
    pub known_before: u32,
    pub start: &'a RequestStart,
    pub deltas: [u64; 5],
}

/// Sends a request's summary: its start, the process's RSS now, what its
/// end read (`read_end` or `read_nothing` just before), and the
/// deltas of the serving thread's counters (faults, mmap, munmap, brk grow,
/// brk shrink). Without a request line the record stops before the line
/// (`EVENT_REQUEST_SHORT`): less than half the bytes to write.
#[inline(always)]
pub fn emit_request(stats: *mut ProcStats, summary: &Summary, line: Option<&RequestLine>) {
    // Two reservations of constant sizes, each filled on its own path: the
    // verifier knows each pointer's size only along its path.
    match line.filter(|l| l.state != LINE_NONE) {
        Some(line) => {
            let Some(mut entry) = EVENTS.reserve::<RequestEvent>(0) else {
                count(memtrace_common::CTR_RINGBUF_DROPS);
                return;
            };
            let ev = entry.as_mut_ptr();
            // SAFETY: `ev` points to a reserved RequestEvent.
            unsafe {
                write_head(ev, EVENT_REQUEST, stats, summary);
                copy_words(&raw mut (*ev).line, line);
            }
            entry.submit(submit_flags());
        }
        None => {
            let Some(mut entry) = EVENTS.reserve::<ShortRequest>(0) else {
                count(memtrace_common::CTR_RINGBUF_DROPS);
                return;
            };
            // SAFETY: `entry` holds the head of a RequestEvent, up to its line.
            unsafe {
                write_head(
                    entry.as_mut_ptr().cast(),
                    EVENT_REQUEST_SHORT,
                    stats,
                    summary,
                )
            };
            entry.submit(submit_flags());
        }
    }
    count(memtrace_common::CTR_EVENTS);
}

/// Writes every field of a request event before its line, straight into the
/// ring buffer: the event is too large to build on the BPF stack first.
///
/// # Safety
/// `ev` points to reserved ring-buffer memory of at least
/// `REQUEST_SHORT_BYTES`; nothing at or after `line` is touched.
#[inline(always)]
unsafe fn write_head(ev: *mut RequestEvent, kind: u32, stats: *mut ProcStats, s: &Summary) {
    // SAFETY: the caller's.
    unsafe {
        (*ev).kind = kind;
        (*ev).tgid = s.tgid;
        (*ev).tid = s.tid;
        (*ev).status = s.status;
        (*ev).known_before = s.known_before;
        (*ev).known_after = proc_rss(stats, &raw mut (*ev).rss_after);
        (*ev).seq = s.start.seq;
        (*ev).start_ns = s.start.start_ns;
        (*ev).end_ns = now_ns();
        copy_words(&raw mut (*ev).rss_before, &raw const s.start.rss);
        (*ev).faults = s.deltas[0];
        (*ev).mmap_bytes = s.deltas[1];
        (*ev).munmap_bytes = s.deltas[2];
        (*ev).brk_grow_bytes = s.deltas[3];
        (*ev).brk_shrink_bytes = s.deltas[4];
        (*ev).fds_before = s.start.fds;
        (*ev)._pad = 0;
        write_end(ev);
    }
}

#[uprobe]
pub fn request_begin(_ctx: ProbeContext) -> u32 {
    let cur = current();
    let _ = begin_request(cur.tgid, cur.tid, -1);
    0
}

/// Return of the request function (`--request-fn`).
#[uretprobe]
pub fn request_end_ret(_ctx: RetProbeContext) -> u32 {
    let cur = current();
    let _ = end_request(cur.tgid, cur.tid, REQUEST_OK, false, -1);
    0
}

/// Entry of the end function (`--request-end`).
#[uprobe]
pub fn request_end(_ctx: ProbeContext) -> u32 {
    let cur = current();
    let _ = end_request(cur.tgid, cur.tid, REQUEST_OK, false, -1);
    0
}

/// sys_exit_accept4 and sys_exit_accept: a connection accepted by a watched
/// worker ends the previous request on this thread and begins the next.
#[tracepoint]
pub fn accept_exit(ctx: TracePointContext) -> u32 {
    let _ = try_accept_exit(&ctx);
    0
}

fn try_accept_exit(ctx: &TracePointContext) -> Result<(), i64> {
    let cur = current();
    if watched(cur.tgid).is_none() {
        return Ok(());
    }
    let ret: i64 = field(ctx, CONFIG.load().layout.sys_exit_ret)?;
    if ret < 0 {
        return Ok(());
    }
    let _ = end_request(cur.tgid, cur.tid, REQUEST_OK, true, ret);
    let _ = begin_request(cur.tgid, cur.tid, ret);
    Ok(())
}

/// sys_enter_close and sys_enter_shutdown: closing (or shutting down) the
/// connection of the request in flight ends it.
#[tracepoint]
pub fn close_enter(ctx: TracePointContext) -> u32 {
    let _ = try_close_enter(&ctx);
    0
}

fn try_close_enter(ctx: &TracePointContext) -> Result<(), i64> {
    let cur = current();
    // Cheapest test first: most closes on the machine are not ours.
    let Some(thread) = THREADS.get_ptr(cur.tid) else {
        return Ok(());
    };
    let fd: u64 = field(ctx, CONFIG.load().layout.close_fd)?;
    // SAFETY: pointer from a map lookup.
    let (depth, req_fd) = unsafe { ((*thread).depth, (*thread).req_fd) };
    if depth > 0 && req_fd >= 0 && req_fd as u64 == fd {
        let _ = end_request(cur.tgid, cur.tid, REQUEST_OK, true, -1);
    }
    Ok(())
}
