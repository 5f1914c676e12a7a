//! Socket request mode: a request is a read phase followed by a write phase
//! on one connection (the kernel's `struct sock`), seen through
//! sock:sock_recv_length and sock:sock_send_length, which fire in the
//! worker's own context for recv(2), read(2) and friends on sockets. No
//! syscall tracepoint is attached, so the rest of the node keeps its fast
//! syscall path. A request ends at the next read on its connection
//! (keep-alive), at the connection's close (sock:inet_sock_set_state), or
//! when the thread that read it reads another connection (threaded servers
//! hand connections between threads). A thread that reads a second request
//! while its first is still being read is interleaving (async servers): both
//! are counted, their memory deltas marked as shared. Kernels before 6.3
//! have no such tracepoints: fexit programs on `tcp_recvmsg` and
//! `tcp_sendmsg` take their place, with the same body.
use aya_ebpf::{
    macros::{fexit, tracepoint},
    programs::{FExitContext, TracePointContext},
};
use memtrace_common::{
    CONN_IDLE, CONN_IGNORE, CONN_INTERLEAVED, CONN_READ, CONN_WRITE, ConnState, LINE_METHOD,
    LINE_NONE, LINE_PATH, REQUEST_ABORTED, REQUEST_INTERLEAVED, REQUEST_OK, SOCK_IO_FIXED,
    SOCK_STATE_FIXED,
};

use super::{
    ends::{
        FDS_UNKNOWN, current_files, fds_less, open_fds, read_end, read_nothing, read_start,
        sock_has_fd,
    },
    http::{begin_line, continue_line},
    request::{Summary, emit_request, set_start, thread_deltas},
};
use crate::{
    maps::{CONFIG, CONN_SCRATCH, CONNS, THREADS},
    util::{
        Current, atomic_add, count, current, field, fixed_field, proc_rss, thread_state, watched,
    },
};

/// `end_conn`'s `counted`: count the descriptors there.
const COUNT_HERE: u32 = FDS_UNKNOWN - 1;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const MSG_PEEK: i32 = 2;
const TCP_SYN_SENT: i32 = 2;
const TCP_FIN_WAIT1: i32 = 4;
const TCP_CLOSE: i32 = 7;
const TCP_CLOSE_WAIT: i32 = 8;
const TCP_LAST_ACK: i32 = 9;

const IO_SK: usize = SOCK_IO_FIXED[0] as usize;
const IO_FAMILY: usize = SOCK_IO_FIXED[1] as usize;
const IO_RET: usize = SOCK_IO_FIXED[2] as usize;
const IO_FLAGS: usize = SOCK_IO_FIXED[3] as usize;
const STATE_SKADDR: usize = SOCK_STATE_FIXED[0] as usize;
const STATE_NEWSTATE: usize = SOCK_STATE_FIXED[1] as usize;
const STATE_FAMILY: usize = SOCK_STATE_FIXED[2] as usize;

/// (sock address, bytes, flags) of a TCP read or write, or None. The
/// fields are loaded straight from the record where the kernel lays it out
/// as every kernel so far does, and read by helper calls at the offsets
/// tracefs gave otherwise.
#[inline(always)]
fn tcp_io(ctx: &TracePointContext) -> Result<Option<(u64, i32, i32)>, i64> {
    let layout = CONFIG.load().layout;
    let fixed = layout.sock_fixed != 0;
    let ret: i32 = if fixed {
        fixed_field::<i32, IO_RET>(ctx)
    } else {
        field(ctx, layout.sock_ret)?
    };
    if ret <= 0 {
        return Ok(None);
    }
    let family: u16 = if fixed {
        fixed_field::<u16, IO_FAMILY>(ctx)
    } else {
        field(ctx, layout.sock_family)?
    };
    if family != AF_INET && family != AF_INET6 {
        return Ok(None);
    }
    if fixed {
        return Ok(Some((
            fixed_field::<u64, IO_SK>(ctx),
            ret,
            fixed_field::<i32, IO_FLAGS>(ctx),
        )));
    }
    let sk: u64 = field(ctx, layout.sock_sk)?;
    let flags: i32 = field(ctx, layout.sock_flags)?;
    Ok(Some((sk, ret, flags)))
}

/// (sock address, new state) of an IPv4/IPv6 socket's change to a state
/// the programs act on (connect, the close's states), or None.
#[inline(always)]
fn state_change(ctx: &TracePointContext) -> Result<Option<(u64, i32)>, i64> {
    let layout = CONFIG.load().layout;
    let fixed = layout.sock_fixed != 0;
    let newstate: i32 = if fixed {
        fixed_field::<i32, STATE_NEWSTATE>(ctx)
    } else {
        field(ctx, layout.state_newstate)?
    };
    // Most changes of the node's sockets (established, time-wait, ...)
    // are of no interest: out before anything else is read.
    if !matches!(
        newstate,
        TCP_SYN_SENT | TCP_CLOSE_WAIT | TCP_FIN_WAIT1 | TCP_LAST_ACK | TCP_CLOSE
    ) {
        return Ok(None);
    }
    let family: u16 = if fixed {
        fixed_field::<u16, STATE_FAMILY>(ctx)
    } else {
        field(ctx, layout.state_family)?
    };
    if family != AF_INET && family != AF_INET6 {
        return Ok(None);
    }
    let sk: u64 = if fixed {
        fixed_field::<u64, STATE_SKADDR>(ctx)
    } else {
        field(ctx, layout.state_skaddr)?
    };
    Ok(Some((sk, newstate)))
}

#[tracepoint]
pub fn sock_recv(ctx: TracePointContext) -> u32 {
    // The cheap test first: most sockets of the node are not a worker's.
    if let Some(cur) = watched_current()
        && let Ok(Some((sk, ret, flags))) = tcp_io(&ctx)
    {
        on_recv(&cur, sk, ret, flags);
    }
    0
}

#[tracepoint]
pub fn sock_send(ctx: TracePointContext) -> u32 {
    if let Some(cur) = watched_current()
        && let Ok(Some((sk, _, _))) = tcp_io(&ctx)
    {
        on_send(&cur, sk);
    }
    0
}

/// The same reads on kernels without sock:sock_recv_length (before 6.3):
/// the return of `tcp_recvmsg(sk, msg, len, flags, ...)` (5.19 and later;
/// `addr_len` followed until 6.11, so the return value comes from
/// bpf_get_func_ret, 5.17). Context reads need fixed offsets, so each
/// prototype has its own program; the agent picks by the function's BTF.
#[fexit(function = "tcp_recvmsg")]
pub fn sock_recv_fexit(ctx: FExitContext) -> u32 {
    if let Some(cur) = watched_current()
        && let Ok(ret) = ctx.ret::<i32>()
        && ret > 0
    {
        on_recv(&cur, ctx.arg(0), ret, ctx.arg(3));
    }
    0
}

/// `tcp_recvmsg(sk, msg, len, nonblock, flags, addr_len)`, before 5.19.
#[fexit(function = "tcp_recvmsg")]
pub fn sock_recv_fexit_nonblock(ctx: FExitContext) -> u32 {
    if let Some(cur) = watched_current() {
        let ret: i32 = ctx.arg(6);
        if ret > 0 {
            on_recv(&cur, ctx.arg(0), ret, ctx.arg(4));
        }
    }
    0
}

/// `tcp_sendmsg(sk, msg, size)`.
#[fexit(function = "tcp_sendmsg")]
pub fn sock_send_fexit(ctx: FExitContext) -> u32 {
    if let Some(cur) = watched_current() {
        let ret: i32 = ctx.arg(3);
        if ret > 0 {
            on_send(&cur, ctx.arg(0));
        }
    }
    0
}

/// The current thread, if its process is watched.
#[inline(always)]
fn watched_current() -> Option<Current> {
    let cur = current();
    watched(cur.tgid).map(|_| cur)
}

/// `ret` bytes read from TCP socket `sk` by the current (watched) thread.
#[inline(always)]
fn on_recv(cur: &Current, sk: u64, ret: i32, flags: i32) {
    if flags & MSG_PEEK != 0 {
        return;
    }
    let conn = CONNS.get_ptr_mut(&sk);
    // SAFETY: pointer from a map lookup.
    let phase = conn.map_or(CONN_IDLE, |c| unsafe { (*c).phase });
    match phase {
        CONN_IGNORE => return,
        CONN_READ => {
            // More of the request: the rest of a request line split
            // across reads, if its start was HTTP.
            if let Some(c) = conn
                && CONFIG.load().http_paths != 0
            {
                // SAFETY: pointer from a map lookup; this thread reads the
                // connection.
                let line = unsafe { &mut (*c).line };
                if line.state == LINE_METHOD || line.state == LINE_PATH {
                    continue_line(line, ret);
                }
            }
            return;
        }
        _ => {}
    }
    // The process's open descriptors, counted once for every request this
    // read ends and the one it begins (one copy of the count in the
    // program: old verifiers walk each).
    let files = current_files();
    let fds = open_fds(files, [-1, -1]);
    if phase == CONN_WRITE {
        // The client's next request on a kept-alive connection.
        end_conn(sk, REQUEST_OK, 0, fds);
    }
    begin_conn(sk, cur, ret, conn, (files, fds));
}

/// Bytes written to TCP socket `sk` by the current (watched) thread.
#[inline(always)]
fn on_send(cur: &Current, sk: u64) {
    match CONNS.get_ptr_mut(&sk) {
        // SAFETY: pointer from a map lookup.
        Some(c) => unsafe {
            if (*c).phase == CONN_READ {
                (*c).phase = CONN_WRITE;
            }
        },
        // Writing first: the process is a client here (a database, an
        // upstream), or the connection predates memtrace.
        None => ignore_conn(sk, cur.tgid),
    }
}

/// sock:inet_sock_set_state: connect() marks a client connection; the close
/// (from either side) ends the request in flight.
#[tracepoint]
pub fn sock_state(ctx: TracePointContext) -> u32 {
    let _ = try_sock_state(&ctx);
    0
}

fn try_sock_state(ctx: &TracePointContext) -> Result<(), i64> {
    let Some((sk, newstate)) = state_change(ctx)? else {
        return Ok(());
    };
    match newstate {
        TCP_SYN_SENT => {
            // In connect(), in the caller's context.
            let cur = current();
            if watched(cur.tgid).is_some() {
                ignore_conn(sk, cur.tgid);
            }
        }
        // The client closed after the response: done (before it, the
        // request may still be answered); or the connection closes. One
        // call site: old verifiers walk each copy of the end.
        TCP_CLOSE_WAIT | TCP_FIN_WAIT1 | TCP_LAST_ACK | TCP_CLOSE => {
            let Some(c) = CONNS.get_ptr(&sk) else {
                return Ok(());
            };
            let closing = newstate != TCP_CLOSE_WAIT;
            // SAFETY: pointer from a map lookup.
            if closing || unsafe { (*c).phase } == CONN_WRITE {
                end_conn(sk, REQUEST_OK, 0, COUNT_HERE);
            }
            if closing {
                let _ = CONNS.remove(&sk);
            }
        }
        _ => {}
    }
    Ok(())
}

/// Marks `sk` as not a server connection of `tgid`.
#[inline(always)]
fn ignore_conn(sk: u64, tgid: u32) {
    let Some(conn) = CONN_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's scratch slot; nothing else runs on it meanwhile.
    unsafe {
        let c = &mut *conn;
        c.tgid = tgid;
        c.tid = 0;
        c.phase = CONN_IGNORE;
        c.flags = 0;
        c.known = 0;
        c.line.state = LINE_NONE;
        c.line.len = 0;
        let _ = CONNS.insert(&sk, c, 0);
    }
}

/// Begins a request on `sk`, read by the current thread (`ret` bytes so
/// far). The thread's previous request on another connection ends here if
/// it was answered (the thread moved on), or is marked interleaved if it was
/// still being read. A connection already known (keep-alive) is rewritten in
/// place; a new one is built in this CPU's scratch slot and inserted.
/// `files`: the process's descriptor table, and `fds` its open descriptors
/// counted there.
#[inline(always)]
fn begin_conn(
    sk: u64,
    cur: &Current,
    ret: i32,
    existing: Option<*mut ConnState>,
    (files, fds): (u64, u32),
) -> Option<()> {
    let stats = watched(cur.tgid)?;
    let thread = thread_state(cur.tid, cur.tgid)?;
    let conn = match existing {
        Some(c) => c,
        None => CONN_SCRATCH.get_ptr_mut(0)?,
    };
    // SAFETY: pointers from map lookups; only this thread writes its state,
    // and only this CPU its scratch slot.
    unsafe {
        let t = &mut *thread;
        let mut flags = 0;
        let prev = t.req_fd as u64;
        if prev != 0
            && prev != sk
            && let Some(p) = CONNS.get_ptr_mut(&prev)
        {
            match (*p).phase {
                CONN_WRITE => end_conn(prev, REQUEST_OK, sk, fds),
                CONN_READ => {
                    (*p).flags |= CONN_INTERLEAVED;
                    flags = CONN_INTERLEAVED;
                }
                _ => {}
            }
        }
        let seq = (*stats).requests_started;
        let c = &mut *conn;
        c.tgid = cur.tgid;
        c.tid = cur.tid;
        c.flags = flags;
        c.known = proc_rss(stats, &raw mut c.req.rss);
        set_start(&raw mut c.req, seq, thread);
        // The process's descriptors but this connection's.
        c.files = files;
        let own = u32::from(sock_has_fd(sk));
        read_start(&mut c.req, cur.tgid, fds_less(fds, own));
        if CONFIG.load().http_paths != 0 {
            begin_line(&mut c.line, ret);
        } else {
            c.line.state = LINE_NONE;
            c.line.len = 0;
        }
        c.phase = CONN_READ;
        if existing.is_none() && CONNS.insert(&sk, c, 0).is_err() {
            count(memtrace_common::CTR_CONNS_FULL);
            return None;
        }
        atomic_add(&raw mut (*stats).requests_started, 1);
        t.req_fd = sk as i64;
    }
    Some(())
}

/// Ends the request in flight on `sk`, if any, and sends its summary. It may
/// run in any context (a close seen in softirq): everything comes from maps,
/// and the process's memory (its GC) is read only when it runs in the
/// process. `next`: the connection its thread reads now (0: none); it and
/// `sk`, while they have descriptors, are not counted as open descriptors.
/// `counted`: the process's open descriptors if the caller counted them
/// (`COUNT_HERE`: counted here, from the descriptor table kept at its
/// start; `FDS_UNKNOWN`: not counted).
#[inline(always)]
fn end_conn(sk: u64, status: u32, next: u64, counted: u32) {
    let Some(c) = CONNS.get_ptr_mut(&sk) else {
        return;
    };
    // SAFETY: pointers from map lookups.
    unsafe {
        let c = &mut *c;
        let phase = c.phase;
        if phase != CONN_READ && phase != CONN_WRITE {
            return;
        }
        c.phase = CONN_IDLE;
        let interleaved = c.flags & CONN_INTERLEAVED != 0;
        c.flags = 0;
        let Some(stats) = watched(c.tgid) else {
            return;
        };
        // Closed before any response: not a served request.
        let status = match (phase, status) {
            (CONN_READ, _) => REQUEST_ABORTED,
            (_, REQUEST_OK) if interleaved => REQUEST_INTERLEAVED,
            (_, s) => s,
        };
        let counter = if status == REQUEST_ABORTED {
            &raw mut (*stats).requests_aborted
        } else {
            &raw mut (*stats).requests_ended
        };
        atomic_add(counter, 1);
        // The reading thread's counters, when it served this request alone.
        let start = &c.req;
        let mut deltas = [0u64; 5];
        if let Some(t) = THREADS.get_ptr_mut(c.tid) {
            if (*t).req_fd as u64 == sk {
                (*t).req_fd = 0;
            }
            if !interleaved {
                deltas = thread_deltas(&*t, start);
            }
        }
        if status == REQUEST_ABORTED {
            read_nothing();
        } else {
            let less = u32::from(sock_has_fd(sk))
                + u32::from(next != 0 && next != sk && sock_has_fd(next));
            let fds = if counted == COUNT_HERE {
                open_fds(c.files, [-1, -1])
            } else {
                counted
            };
            read_end(start, c.tgid, fds_less(fds, less), current().tgid == c.tgid);
        }
        let summary = Summary {
            tgid: c.tgid,
            tid: c.tid,
            status,
            known_before: c.known,
            start,
            deltas,
        };
        emit_request(stats, &summary, Some(&c.line));
    }
}
