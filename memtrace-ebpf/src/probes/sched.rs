//! Process lifecycle: new processes forked by watched ones are watched at
//! once (task:task_newtask, which also says whether the child is a thread),
//! execs are reported (and matched against selector names), and the exit of a
//! whole process is reported with its final counters.
use aya_ebpf::{
    EbpfContext as _,
    bindings::BPF_NOEXIST,
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_comm, bpf_get_current_task,
        bpf_probe_read_kernel, bpf_probe_read_kernel_str_bytes,
    },
    macros::tracepoint,
    programs::TracePointContext,
};
use memtrace_common::{
    CGROUP_FILTER_OFF, CGROUP_FILTER_SELECT_ALL, CTR_CGROUP_REJECTED, EVENT_EXEC, EVENT_EXIT,
    EVENT_FORK, MAX_CGROUP_LEVELS, PROC_FLAG_COLLECT, ProcStats, ProcessEvent, REQUEST_ABORTED,
    TASK_COMM_LEN,
};

use crate::{
    maps::{CONFIG, EVENTS, PROCS, SELECTOR_CGROUPS, SELECTOR_COMMS, THREADS},
    probes::{ends::exiting_group_faults, request::end_request},
    util::{Current, count, current, field, now_ns, proc_rss, submit_flags, watched, zero_words},
};

const CLONE_THREAD: u64 = 0x0001_0000;

/// Where a process event's extra data comes from.
enum Extra {
    None,
    /// Offset of a `__data_loc char[]` field holding the exec'd path.
    Filename(u32),
    /// The final counters of an exiting process.
    Final(ProcStats),
}

#[inline(always)]
fn emit_process(
    ctx: &TracePointContext,
    kind: u32,
    tgid: u32,
    ppid: u32,
    watched_how: u32,
    comm: [u8; TASK_COMM_LEN],
    extra: Extra,
) {
    let Some(mut entry) = EVENTS.reserve::<ProcessEvent>(0) else {
        count(memtrace_common::CTR_RINGBUF_DROPS);
        return;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` points at reserved ring-buffer memory of the right size;
    // every field is written before submit.
    unsafe {
        (*ev).kind = kind;
        (*ev).tgid = tgid;
        (*ev).ppid = ppid;
        (*ev).watched = watched_how;
        (*ev).ptid = current().tid;
        (*ev).ts_ns = now_ns();
        (*ev).comm = comm;
        (*ev).filename[0] = 0;
        (*ev).stats = ProcStats::default();
        zero_words(&raw mut (*ev).rss);
        match extra {
            Extra::None => {}
            Extra::Filename(offset) => {
                if let Ok(loc) = field::<u32>(ctx, offset) {
                    let src = (ctx.as_ptr() as *const u8).add((loc & 0xffff) as usize);
                    if bpf_probe_read_kernel_str_bytes(src, &mut (*ev).filename).is_err() {
                        (*ev).filename[0] = 0;
                    }
                }
            }
            Extra::Final(stats) => {
                (*ev).stats = stats;
                proc_rss(&stats, &raw mut (*ev).rss);
            }
        }
    }
    entry.submit(submit_flags());
    count(memtrace_common::CTR_EVENTS);
}

#[tracepoint]
pub fn task_newtask(ctx: TracePointContext) -> u32 {
    let _ = try_task_newtask(&ctx);
    0
}

fn try_task_newtask(ctx: &TracePointContext) -> Result<(), i64> {
    let parent = current();
    let Some(parent_stats) = watched(parent.tgid) else {
        return Ok(());
    };
    let layout = CONFIG.load().layout;
    let clone_flags: u64 = field(ctx, layout.newtask_clone_flags)?;
    if clone_flags & CLONE_THREAD != 0 {
        // A new thread: its state is created on its first event.
        return Ok(());
    }
    let child: i32 = field(ctx, layout.newtask_pid)?;
    let child = child as u32;
    if child == CONFIG.load().agent_tgid {
        return Ok(());
    }
    // Watched from this instant: the child's first fault is already counted.
    // A worker forked while allocation sites are collected is collected too.
    // SAFETY: pointer from a map lookup.
    let flags = unsafe { (*parent_stats).flags } & PROC_FLAG_COLLECT;
    let stats = ProcStats {
        flags,
        ..ProcStats::default()
    };
    if PROCS.insert(child, stats, BPF_NOEXIST as u64).is_err() {
        count(memtrace_common::CTR_PROCS_FULL);
        return Ok(());
    }
    // The child is still a copy of the parent: same name.
    let comm = bpf_get_current_comm().map_err(|e| e as i64)?;
    emit_process(ctx, EVENT_FORK, child, parent.tgid, 1, comm, Extra::None);
    Ok(())
}

#[tracepoint]
pub fn sched_process_exec(ctx: TracePointContext) -> u32 {
    let _ = try_sched_process_exec(&ctx);
    0
}

fn try_sched_process_exec(ctx: &TracePointContext) -> Result<(), i64> {
    let config = CONFIG.load();
    let cur = current();
    if cur.tgid == config.agent_tgid {
        return Ok(());
    }
    let comm = bpf_get_current_comm().map_err(|e| e as i64)?;
    let watched_how = match watched(cur.tgid) {
        Some(stats) => {
            // A new program image: a new mm, a new break, fresh counters.
            // exec has already killed every other thread, so no race here.
            // SAFETY: pointer from a map lookup.
            unsafe {
                let flags = (*stats).flags;
                *stats = ProcStats {
                    flags,
                    ..ProcStats::default()
                };
            }
            1
        }
        None if SELECTOR_COMMS.get_ptr(comm).is_some()
            || config.cgroup_filter == CGROUP_FILTER_SELECT_ALL =>
        {
            if !in_selected_cgroup(config.cgroup_filter) {
                if config.cgroup_filter != CGROUP_FILTER_SELECT_ALL {
                    count(CTR_CGROUP_REJECTED);
                }
                return Ok(());
            }
            if PROCS
                .insert(cur.tgid, ProcStats::default(), BPF_NOEXIST as u64)
                .is_err()
            {
                count(memtrace_common::CTR_PROCS_FULL);
                return Ok(());
            }
            2
        }
        None if config.report_all_execs != 0 => {
            if !in_selected_cgroup(config.cgroup_filter) {
                count(CTR_CGROUP_REJECTED);
                return Ok(());
            }
            0
        }
        None => return Ok(()),
    };
    let old_pid: i32 = field(ctx, config.layout.exec_old_pid)?;
    emit_process(
        ctx,
        EVENT_EXEC,
        cur.tgid,
        old_pid as u32,
        watched_how,
        comm,
        Extra::Filename(config.layout.exec_filename),
    );
    Ok(())
}

/// Whether the current task runs inside a selected cgroup or below one: its
/// cgroup v2 ancestors, root first, looked up in `SELECTOR_CGROUPS`.
#[inline(always)]
fn in_selected_cgroup(filter: u32) -> bool {
    if filter == CGROUP_FILTER_OFF {
        return true;
    }
    for level in 0..MAX_CGROUP_LEVELS {
        // SAFETY: helper without preconditions; 0 past the task's own level.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
        if id == 0 {
            return false;
        }
        // SAFETY: a plain lookup; the value is not read.
        if unsafe { SELECTOR_CGROUPS.get(&id) }.is_some() {
            return true;
        }
    }
    false
}

/// How a kernel tells that an exiting thread is the last of its process:
/// sched_process_exit fires once per thread. One program variant each; the
/// agent loads the one this kernel can serve.
#[derive(Clone, Copy)]
enum LastThread {
    /// The tracepoint's own `group_dead` field (Linux 6.16 and later).
    GroupDead,
    /// `task->signal->live` has dropped to 0: do_exit decrements it before
    /// the tracepoint fires (offsets from the kernel's BTF).
    SignalLive,
    /// No BTF either: the thread-group leader's exit. A process whose main
    /// thread exits before the others is seen gone early.
    Leader,
}

#[tracepoint]
pub fn sched_process_exit(ctx: TracePointContext) -> u32 {
    let _ = try_sched_process_exit(&ctx, LastThread::GroupDead);
    0
}

#[tracepoint]
pub fn sched_process_exit_live(ctx: TracePointContext) -> u32 {
    let _ = try_sched_process_exit(&ctx, LastThread::SignalLive);
    0
}

#[tracepoint]
pub fn sched_process_exit_leader(ctx: TracePointContext) -> u32 {
    let _ = try_sched_process_exit(&ctx, LastThread::Leader);
    0
}

#[inline(always)]
fn is_last_thread(ctx: &TracePointContext, how: LastThread, cur: &Current) -> Result<bool, i64> {
    let config = CONFIG.load();
    Ok(match how {
        LastThread::GroupDead => field::<u8>(ctx, config.layout.exit_group_dead)? != 0,
        LastThread::SignalLive => {
            // SAFETY: fault-safe reads of the current task and its signal
            // struct, at offsets from this kernel's BTF.
            let live: i32 = unsafe {
                let task = bpf_get_current_task() as *const u8;
                let signal: u64 =
                    bpf_probe_read_kernel(task.add(config.task_signal as usize) as *const u64)?;
                bpf_probe_read_kernel((signal + u64::from(config.signal_live)) as *const i32)?
            };
            live == 0
        }
        LastThread::Leader => cur.tid == cur.tgid,
    })
}

#[inline(always)]
fn try_sched_process_exit(ctx: &TracePointContext, how: LastThread) -> Result<(), i64> {
    let cur = current();
    let Some(stats) = watched(cur.tgid) else {
        return Ok(());
    };
    // A thread leaving mid-request produces an aborted summary, and its
    // state is dropped either way.
    if THREADS.get_ptr(cur.tid).is_some() {
        end_request(cur.tgid, cur.tid, REQUEST_ABORTED, true, -1);
        let _ = THREADS.remove(cur.tid);
    }
    if !is_last_thread(ctx, how, &cur)? {
        return Ok(());
    }
    // SAFETY: pointer from a map lookup; copied before the entry is removed.
    let mut final_stats = unsafe { *stats };
    if let Some(faults) = exiting_group_faults() {
        final_stats.faults = faults;
    }
    // Whoever removes the entry reports the exit: with `signal->live`, two
    // threads exiting at once can both read 0.
    if PROCS.remove(cur.tgid).is_err() {
        return Ok(());
    }
    let comm = bpf_get_current_comm().map_err(|e| e as i64)?;
    emit_process(
        ctx,
        EVENT_EXIT,
        cur.tgid,
        0,
        1,
        comm,
        Extra::Final(final_stats),
    );
    Ok(())
}
