//! Types shared by memtrace's eBPF programs and its agent.
//!
//! Everything here crosses the kernel/user boundary through a map or the ring
//! buffer, so every type is `#[repr(C)]`, `Copy`, and built from u32/u64/i64
//! fields laid out without implicit padding.
#![no_std]

/// Indices of the kernel's per-mm RSS counters, as `kmem:rss_stat`'s `member`
/// field numbers them.
pub const MM_FILEPAGES: usize = 0;
pub const MM_ANONPAGES: usize = 1;
pub const MM_SWAPENTS: usize = 2;
pub const MM_SHMEMPAGES: usize = 3;
pub const RSS_MEMBERS: usize = 4;

/// Watched processes (thread-group ids) the kernel keeps counters for.
pub const MAX_PROCS: u32 = 16_384;
/// Threads of watched processes with per-thread state.
pub const MAX_THREADS: u32 = 65_536;
/// mm ids with known RSS counters (an LRU: stale ids age out).
pub const MAX_MMS: u32 = 32_768;
/// Process names the kernel matches at exec time.
pub const MAX_SELECTOR_COMMS: u32 = 64;
/// Cgroups (v2 ids) a `--cgroup` or `--container` selector names.
pub const MAX_SELECTOR_CGROUPS: u32 = 256;
/// Ancestor levels checked against them (kubepods paths are 4 to 6 deep).
pub const MAX_CGROUP_LEVELS: u32 = 16;
/// No cgroup selector: execs anywhere may match.
pub const CGROUP_FILTER_OFF: u32 = 0;
/// Names (or other selectors) match only inside the selected cgroups.
pub const CGROUP_FILTER_RESTRICT: u32 = 1;
/// No other selector: every exec inside the selected cgroups is watched.
pub const CGROUP_FILTER_SELECT_ALL: u32 = 2;
/// Default ring-buffer size in bytes (a power of two, a multiple of the page size).
pub const DEFAULT_RING_BYTES: u32 = 4 << 20;
/// Stack traces kept while allocation-site collection is on.
pub const MAX_STACKS: u32 = 16_384;
/// A site's stack id when the kernel's stack map could not take its stack
/// (the bucket holds another stack, or the map is full): the sample counts,
/// without native frames.
pub const STACK_LOST: u32 = u32::MAX;
/// (process, stack, kind) aggregation slots while collection is on.
pub const MAX_STACK_SITES: u32 = 65_536;
/// Live heap allocations tracked while collection is on (malloc probes), over
/// all workers; `Config::max_live_allocs` caps each worker's share.
pub const MAX_ALLOCS: u32 = 262_144;
/// Default mean bytes between sampled heap allocations (Go's and jemalloc's).
pub const DEFAULT_HEAP_SAMPLE_BYTES: u64 = 512 * 1024;
/// Frames per user stack (the kernel's PERF_MAX_STACK_DEPTH).
pub const STACK_DEPTH: usize = 127;

pub const TASK_COMM_LEN: usize = 16;
pub const FILENAME_LEN: usize = 256;

/// `ProcStats::flags`: allocation-site collection is on for this process.
pub const PROC_FLAG_COLLECT: u32 = 1;

/// Per watched process (keyed by tgid in `PROCS`). Presence in the map is what
/// "watched" means to the kernel. Threads of one process update it from several
/// CPUs, so the counters are only ever changed with atomic adds.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcStats {
    /// User page faults taken by any thread: counted by
    /// exceptions:page_fault_user where the kernel's fault counters cannot
    /// be read (`Config::task_min_flt` 0); otherwise written only at exit,
    /// from those counters, and read from `/proc` while the process lives.
    pub faults: u64,
    /// Bytes successfully mapped by mmap(2).
    pub mmap_bytes: u64,
    /// mmap(2) calls whose stacks were walked while collection was on.
    pub collected_mmap_calls: u64,
    /// Bytes unmapped by successful munmap(2) calls.
    pub munmap_bytes: u64,
    /// Program-break growth and shrink, from brk(2) return values.
    pub brk_grow_bytes: u64,
    pub brk_shrink_bytes: u64,
    /// Size changes of successful mremap(2) calls.
    pub mremap_grow_bytes: u64,
    pub mremap_shrink_bytes: u64,
    /// Last program break brk(2) returned; 0 until the first call is seen.
    pub last_brk: u64,
    /// Requests begun, ended normally, and aborted (thread exit mid-request).
    pub requests_started: u64,
    pub requests_ended: u64,
    pub requests_aborted: u64,
    /// Sampled heap blocks tracked now in `ALLOCS` (wraps: read as i64).
    pub live_allocs: u64,
    /// Sampled heap allocations not tracked: the worker's cap or the map was full.
    pub allocs_dropped: u64,
    /// Hash of the process's mm, learnt from `curr=1` rss_stat events; 0 = unknown.
    pub mm_id: u32,
    /// `PROC_FLAG_*`.
    pub flags: u32,
}

impl ProcStats {
    /// Requests begun and not yet ended or aborted.
    pub fn requests_in_flight(&self) -> u64 {
        self.requests_started
            .saturating_sub(self.requests_ended)
            .saturating_sub(self.requests_aborted)
    }
}

/// RSS counters of one mm (keyed by mm_id in `MM_RSS`). `kmem:rss_stat`'s
/// `size` is absolute, so each member is simply the last value seen.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MmRss {
    /// Bytes, indexed by `MM_*`.
    pub bytes: [i64; RSS_MEMBERS],
    /// Resident total (file + anon + shmem) when the last RSS event was emitted.
    pub emitted_total: i64,
    /// Bit `1 << member` is set once the kernel has seen that member's value.
    pub known: u32,
    /// Last thread group seen running on this mm (`curr=1`); 0 = none yet.
    pub owner_tgid: u32,
}

impl MmRss {
    /// Resident bytes as /proc and smaps_rollup count them: file + anon + shmem.
    pub fn resident(&self) -> i64 {
        self.bytes[MM_FILEPAGES] + self.bytes[MM_ANONPAGES] + self.bytes[MM_SHMEMPAGES]
    }
}

/// What a thread is doing when a request ends: the counters at its start.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequestStart {
    pub start_ns: u64,
    pub seq: u64,
    pub rss: [i64; RSS_MEMBERS],
    pub faults: u64,
    pub mmap_bytes: u64,
    pub munmap_bytes: u64,
    pub brk_grow_bytes: u64,
    pub brk_shrink_bytes: u64,
    /// Open descriptors of the process, the request's own connection not
    /// counted (`REQ_FDS_KNOWN` in `known`).
    pub fds: u32,
    /// `REQ_*_KNOWN`: which of `fds` and `gc` were read.
    pub known: u32,
    /// CPython's GC totals over its generations (`REQ_GC_KNOWN`):
    /// collections, collected, uncollectable.
    pub gc: [u64; 3],
}

/// `RequestStart::known`, `RequestEvent::known`: the descriptor count was
/// read from the process's descriptor table.
pub const REQ_FDS_KNOWN: u32 = 1;
/// CPython's GC statistics were read from the process (its `PY_GC` entry,
/// at a request end that ran in the process).
pub const REQ_GC_KNOWN: u32 = 2;
/// `Config::file_count` flag: the count is a `file_ref_t` (Linux 6.13+),
/// one less than the references, negative once released.
pub const FILE_REF_NEW: u32 = 1 << 31;
/// Descriptor tables up to this many 64-bit words (4096 descriptors) are
/// counted; a larger one is not.
pub const FDS_WORDS_MAX: u32 = 64;

/// Per thread of a watched process (keyed by tid in `THREADS`). Only the thread
/// itself writes its entry, so plain stores are enough.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreadState {
    pub tgid: u32,
    /// Request nesting depth: a recursive begin counts once.
    pub depth: u32,
    /// Faults counted by exceptions:page_fault_user (only where the task's
    /// own counters are not read: `Config::task_min_flt` 0).
    pub faults: u64,
    /// The thread's `task_struct`, whose fault counters a request's ends
    /// read (also from another thread's context: a socket closed in
    /// softirq). Valid while this entry exists: it is removed at the
    /// thread's exit.
    pub task: u64,
    pub mmap_bytes: u64,
    pub munmap_bytes: u64,
    pub brk_grow_bytes: u64,
    pub brk_shrink_bytes: u64,
    /// Syscall arguments saved at sys_enter for the matching sys_exit.
    pub pending_arg0: u64,
    pub pending_arg1: u64,
    /// Accept mode: the connection fd of the request in flight, or -1.
    pub req_fd: i64,
    /// Faults left before the next sampled stack (collection on).
    pub sample_countdown: u32,
    /// `MmRss::known` of the process's mm when the request began.
    pub req_known: u32,
    pub req: RequestStart,
    /// malloc/calloc/realloc: the size asked for, saved at entry for the return probe.
    pub alloc_size: u64,
    /// realloc: the block being resized, when it is tracked.
    pub alloc_old_ptr: u64,
    /// Heap bytes left before the next sampled allocation; 0: not drawn yet.
    pub heap_countdown: u64,
    /// 1 between entry and return of CPython's object allocator: the C
    /// library's malloc it falls back to for large blocks is not counted
    /// twice.
    pub in_pymalloc: u64,
}

/// Socket mode: a server connection of a watched process, keyed by its
/// `struct sock` address in `CONNS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ConnState {
    pub tgid: u32,
    /// The thread that read the request in flight.
    pub tid: u32,
    /// `CONN_*`.
    pub phase: u32,
    /// `CONN_INTERLEAVED`.
    pub flags: u32,
    /// `MmRss::known` of the process's mm when the request began.
    pub known: u32,
    pub _pad: u32,
    /// The process's `struct files_struct` (its descriptor table), read
    /// where the request began: its end may run in another context.
    pub files: u64,
    /// The process's RSS and the reading thread's counters at the start.
    pub req: RequestStart,
    /// Method and path of the request in flight (`--no-http-paths`: empty).
    pub line: RequestLine,
}

/// Bytes of a request line kept: method, one space, path (no query).
pub const LINE_CAP: usize = 128;

/// `RequestLine::state`: nothing captured (another request mode, capture
/// off, or a read the kernel could not locate: io_uring, recvmmsg).
pub const LINE_NONE: u32 = 0;
/// Reading the method token; the bytes so far are kept (a split line).
pub const LINE_METHOD: u32 = 1;
/// Reading the path; the bytes so far are kept (a split line).
pub const LINE_PATH: u32 = 2;
/// `bytes[..len]` is "METHOD /path", complete.
pub const LINE_DONE: u32 = 3;
/// The path went past `LINE_CAP`: `bytes` holds its first part.
pub const LINE_TRUNCATED: u32 = 4;
/// The first bytes were not an HTTP/1.x request line (TLS, HTTP/2,
/// FastCGI, any other protocol): nothing kept.
pub const LINE_NOT_HTTP: u32 = 5;

/// The request line of an HTTP/1.x request, as far as the kernel kept it.
/// Only `bytes[..len]` is ever non-zero: the query string, headers and body
/// are never copied out of the kernel's scratch space.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RequestLine {
    /// `LINE_*`.
    pub state: u32,
    pub len: u32,
    pub bytes: [u8; LINE_CAP],
}

impl Default for RequestLine {
    fn default() -> Self {
        Self {
            state: LINE_NONE,
            len: 0,
            bytes: [0; LINE_CAP],
        }
    }
}

/// No request in flight: the next read begins one.
pub const CONN_IDLE: u32 = 0;
/// Reading a request.
pub const CONN_READ: u32 = 1;
/// Writing its response: the next read (or the close) ends it.
pub const CONN_WRITE: u32 = 2;
/// Not a server connection (the process connected, or wrote first).
pub const CONN_IGNORE: u32 = 3;
/// Other requests were read on the same thread while this one was.
pub const CONN_INTERLEAVED: u32 = 1;
/// Connections tracked at once (an LRU: the longest idle are forgotten).
pub const MAX_CONNS: u32 = 16384;

/// Ring-buffer event kinds (the first u32 of every event).
pub const EVENT_FORK: u32 = 1;
pub const EVENT_EXEC: u32 = 2;
pub const EVENT_EXIT: u32 = 3;
pub const EVENT_RSS: u32 = 4;
pub const EVENT_REQUEST: u32 = 5;
/// A request summary without a request line (uprobe and accept mode, socket
/// mode without a path): the first [`REQUEST_SHORT_BYTES`] of a
/// [`RequestEvent`]. Less than half the bytes to write per request.
pub const EVENT_REQUEST_SHORT: u32 = 6;
/// Bytes of an `EVENT_REQUEST_SHORT` record: `RequestEvent` up to its line.
pub const REQUEST_SHORT_BYTES: usize = core::mem::offset_of!(RequestEvent, line);

/// Fork, exec or exit of a process.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ProcessEvent {
    pub kind: u32,
    pub tgid: u32,
    /// Fork: the parent tgid. Exec: the pid before exec (differs when a
    /// non-leader thread execs). Exit: 0.
    pub ppid: u32,
    /// Exec: 1 when the process was already watched, 2 when the kernel matched
    /// its name against a selector, 0 when reported for the agent to match.
    pub watched: u32,
    /// Fork: the thread that forked (which request started the child).
    /// Exec, exit: the thread that exec'd or exited last.
    pub ptid: u32,
    pub ts_ns: u64,
    pub comm: [u8; TASK_COMM_LEN],
    /// Exec: the path passed to execve; empty otherwise.
    pub filename: [u8; FILENAME_LEN],
    /// Exit: the final counters (the kernel forgets the process right after).
    pub stats: ProcStats,
    /// Exit: last known RSS by member.
    pub rss: [i64; RSS_MEMBERS],
}

/// A watched process's resident memory moved by at least the configured step.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RssEvent {
    pub kind: u32,
    pub tgid: u32,
    pub mm_id: u32,
    pub known: u32,
    pub ts_ns: u64,
    pub bytes: [i64; RSS_MEMBERS],
}

/// `RequestEvent::status`.
pub const REQUEST_OK: u32 = 0;
/// The thread exited while the request was in flight (or, in socket mode,
/// the connection closed before a response).
pub const REQUEST_ABORTED: u32 = 1;
/// Socket mode: ended, but its thread read other requests meanwhile (an
/// async server): the memory deltas are the process's over the request's
/// time, shared with the requests that overlapped it.
pub const REQUEST_INTERLEAVED: u32 = 2;

/// One request, summarised in the kernel when it ends.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RequestEvent {
    pub kind: u32,
    pub tgid: u32,
    pub tid: u32,
    pub status: u32,
    /// `MmRss::known` masks at the start and at the end: a member whose bit is
    /// clear was not yet seen by the kernel, and its value is 0.
    pub known_before: u32,
    pub known_after: u32,
    /// Start order of the request in its worker (0-based, counted in the
    /// kernel; two threads starting at once may share a number).
    pub seq: u64,
    pub start_ns: u64,
    pub end_ns: u64,
    pub rss_before: [i64; RSS_MEMBERS],
    pub rss_after: [i64; RSS_MEMBERS],
    /// Page faults this thread took during the request.
    pub faults: u64,
    pub mmap_bytes: u64,
    pub munmap_bytes: u64,
    pub brk_grow_bytes: u64,
    pub brk_shrink_bytes: u64,
    /// Open descriptors at the start and the end, the request's own
    /// connection not counted (valid when `known` has `REQ_FDS_KNOWN`).
    pub fds_before: u32,
    pub fds_after: u32,
    /// `REQ_*_KNOWN` of both ends.
    pub known: u32,
    pub _pad: u32,
    /// GC collections, collected and uncollectable objects during the
    /// request (`REQ_GC_KNOWN`).
    pub gc_delta: [u64; 3],
    /// Socket mode: the request's method and path. Last: an
    /// `EVENT_REQUEST_SHORT` record stops before it.
    pub line: RequestLine,
}

/// Indices into the `COUNTERS` per-CPU array.
pub const CTR_RINGBUF_DROPS: u32 = 0;
pub const CTR_EVENTS: u32 = 1;
pub const CTR_PROCS_FULL: u32 = 2;
pub const CTR_THREADS_FULL: u32 = 3;
pub const CTR_MMS_FULL: u32 = 4;
pub const CTR_STACK_ERRORS: u32 = 5;
pub const CTR_STACK_SAMPLES: u32 = 6;
pub const CTR_SITES_FULL: u32 = 7;
/// An exec a selector matched, refused because it ran outside the selected
/// cgroups: its events never reach the ring buffer.
pub const CTR_CGROUP_REJECTED: u32 = 8;
/// Socket mode: a connection that did not fit in `CONNS`.
pub const CTR_CONNS_FULL: u32 = 9;
/// A sampled heap allocation not tracked (worker cap or `ALLOCS` full).
pub const CTR_ALLOCS_DROPPED: u32 = 10;
/// Heap allocations sampled (tracked or not).
pub const CTR_HEAP_SAMPLES: u32 = 11;
/// A Python stack that did not fit in `PY_STACKS` (sampled without it).
pub const CTR_PY_STACKS_FULL: u32 = 12;
pub const NUM_COUNTERS: u32 = 13;

/// Allocation-site kinds in `STACK_SITES`.
pub const SITE_FAULT: u32 = 0;
pub const SITE_MMAP: u32 = 1;
pub const SITE_BRK: u32 = 2;
/// Live bytes of heap blocks allocated here (malloc/calloc/realloc minus
/// free). `SiteCount::bytes` and `samples` wrap: read them as i64.
pub const SITE_MALLOC: u32 = 3;

/// A live heap block (malloc probes), by process and address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AllocKey {
    pub tgid: u32,
    pub _pad: u32,
    pub ptr: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllocInfo {
    pub size: u64,
    pub stack_id: u32,
    pub _pad: u32,
    /// Id in `PY_STACKS` of the Python frames that allocated it; 0: none.
    pub py_stack: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SiteKey {
    pub tgid: u32,
    /// Id in the `STACKS` map.
    pub stack_id: u32,
    pub kind: u32,
    pub _pad: u32,
    /// Id in `PY_STACKS` of the Python frames at the sample; 0: none (not
    /// a Python process, or its frames could not be read).
    pub py_stack: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SiteCount {
    /// Bytes attributed to the site (sampled faults are weighted by the
    /// period; heap sites hold the sizes of the sampled blocks still live,
    /// unscaled).
    pub bytes: u64,
    /// Samples taken at the site (heap: sampled blocks still live).
    pub samples: u64,
    /// Heap sites: sizes and number of every sampled block, freed or not.
    pub alloc_bytes: u64,
    pub alloc_samples: u64,
}

/// Byte offsets of the tracepoint fields the programs read. The agent fills
/// them from `/sys/kernel/tracing/events/*/*/format` at load time, so a kernel
/// that moves a field does not silently break the programs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TracepointLayout {
    pub rss_mm_id: u32,
    pub rss_curr: u32,
    pub rss_member: u32,
    pub rss_size: u32,
    pub newtask_pid: u32,
    pub newtask_clone_flags: u32,
    pub exec_filename: u32,
    pub exec_pid: u32,
    pub exec_old_pid: u32,
    pub exit_pid: u32,
    pub exit_group_dead: u32,
    pub mmap_len: u32,
    pub munmap_len: u32,
    pub brk_arg: u32,
    pub mremap_old_len: u32,
    pub mremap_new_len: u32,
    pub sys_exit_ret: u32,
    pub close_fd: u32,
    /// sock:sock_recv_length and sock:sock_send_length (one layout); the
    /// kernel may lack them (`LAYOUT_ABSENT`), only socket mode needs them.
    pub sock_sk: u32,
    pub sock_family: u32,
    pub sock_ret: u32,
    pub sock_flags: u32,
    /// sock:inet_sock_set_state.
    pub state_skaddr: u32,
    pub state_newstate: u32,
    pub state_family: u32,
    /// Nonzero when the socket events are laid out as [`SOCK_IO_FIXED`] and
    /// [`SOCK_STATE_FIXED`] say: the programs then load their fields
    /// straight from the record instead of one helper call each.
    pub sock_fixed: u32,
}

/// sock:sock_recv_length and sock:sock_send_length as every kernel that has
/// them lays them out (6.3 to 7.x): `sk`, `family`, `ret`, `flags`.
pub const SOCK_IO_FIXED: [u32; 4] = [8, 16, 20, 24];
/// sock:inet_sock_set_state as every kernel memtrace serves lays it out
/// (5.10 to 7.x): `skaddr`, `newstate`, `family`.
pub const SOCK_STATE_FIXED: [u32; 3] = [8, 20, 28];

/// A field offset of an event this kernel does not have.
pub const LAYOUT_ABSENT: u32 = u32::MAX;

/// Settings the agent writes into the programs' read-only data at load time.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// The agent's own tgid: never watched.
    pub agent_tgid: u32,
    /// 1: report every exec so the agent can match --exe/--cmdline selectors.
    pub report_all_execs: u32,
    /// Emit an RSS event when a process's resident total moved this much.
    pub rss_step_bytes: u64,
    /// Take one user stack every this many faults per thread (collection on).
    pub fault_sample_period: u32,
    /// `CGROUP_FILTER_*`: whether execs must run inside a cgroup of
    /// `SELECTOR_CGROUPS` (or a descendant) to be watched or reported.
    pub cgroup_filter: u32,
    /// Mean bytes between sampled heap allocations; 0 or 1: every one.
    pub heap_sample_bytes: u64,
    /// Sampled heap blocks tracked per worker at most; 0: only the map's size.
    pub max_live_allocs: u32,
    /// 1: socket mode keeps each HTTP/1.x request's method and path.
    pub http_paths: u32,
    /// Offset of `thread.fsbase` in `struct task_struct` (from the kernel's
    /// BTF); 0: unknown, no Python frames.
    pub task_fsbase: u32,
    /// Python frames taken per sample, at most `PY_MAX_FRAMES`; 0: none.
    pub py_frames: u32,
    /// Unread bytes in the ring buffer past which an event wakes the agent
    /// (half the ring). Below it events are submitted without a wake-up and
    /// the agent drains on its timer.
    pub ring_wake_bytes: u32,
    /// Offsets of `task_struct.signal` and `signal_struct.live` (from the
    /// kernel's BTF): how `sched_process_exit_live` tells the last thread of
    /// a process on kernels whose sched_process_exit has no `group_dead`.
    pub task_signal: u32,
    pub signal_live: u32,
    /// Offsets for counting open descriptors (from the kernel's BTF):
    /// `task_struct.files`, `files_struct.fdt`, `fdtable.max_fds` and
    /// `fdtable.open_fds`; `task_files` 0: not counted.
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdt_max_fds: u32,
    pub fdt_open_fds: u32,
    /// `sock.sk_socket`, `socket.sk`, `socket.file` and the file's
    /// reference count (`file.f_count`, or `file.f_ref` with
    /// `FILE_REF_NEW` set): whether a socket still has a descriptor (its
    /// file is not being released).
    pub sock_socket: u32,
    pub socket_sk: u32,
    pub socket_file: u32,
    pub file_count: u32,
    /// Offsets of `task_struct.min_flt`/`maj_flt` and
    /// `signal_struct.min_flt`/`maj_flt` (from the kernel's BTF): the
    /// kernel's own fault counters, read at a request's two ends and at a
    /// process's exit instead of a program on every fault. `task_min_flt`
    /// 0: not read (exceptions:page_fault_user counts).
    pub task_min_flt: u32,
    pub task_maj_flt: u32,
    pub signal_min_flt: u32,
    pub signal_maj_flt: u32,
    pub _pad: u32,
    pub layout: TracepointLayout,
}

/// Python frames kept per stack (tracemalloc's `PYTHONTRACEMALLOC=25`).
pub const PY_MAX_FRAMES: usize = 25;
/// Python processes whose frames the kernel reads.
pub const MAX_PY_PROCS: u32 = 4096;
/// Distinct Python stacks kept while collection is on.
pub const MAX_PY_STACKS: u32 = 32_768;
/// `PyProcInfo::owner_cstack` when the version has no C-stack shim frames.
pub const PY_NO_OWNER: u32 = u32::MAX;
/// `PyProcInfo::cframe_frame` when the thread state points at the frame
/// directly (3.13+).
pub const PY_NO_CFRAME: u32 = u32::MAX;
/// Offset of `specific_1stblock` in glibc's `struct pthread` (x86_64,
/// glibc 2.27 to 2.38), whose entries are `{seq, data}` pairs: what
/// `pthread_getspecific(key)` reads for keys below 32.
pub const GLIBC_SPECIFIC_1STBLOCK: u64 = 0x310;
/// Keys past the first block live in a second-level table: not followed.
pub const GLIBC_KEYS_1STBLOCK: u32 = 32;

/// How to find and walk one Python process's frames (by tgid in
/// `PY_PROCS`); byte offsets of one interpreter build, filled by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PyProcInfo {
    /// The pthread key under which CPython keeps each thread's
    /// `PyThreadState` (`_PyRuntime`'s `autoTSSkey`), below 32.
    pub tss_key: u32,
    /// `PyThreadState.cframe` (3.11, 3.12) or `.current_frame` (3.13+).
    pub tstate_frame: u32,
    /// `_PyCFrame.current_frame`, or `PY_NO_CFRAME`.
    pub cframe_frame: u32,
    /// `PyThreadState.thread_id`: the pthread (= fs base) that owns it.
    pub thread_id: u32,
    /// `_PyInterpreterFrame.f_code` / `f_executable`, `.previous`,
    /// `.prev_instr` / `instr_ptr` and the `owner` byte; all below 80.
    pub frame_code: u32,
    pub frame_previous: u32,
    pub frame_instr: u32,
    pub frame_owner: u32,
    /// `owner` of the C-stack shim frames to skip, or `PY_NO_OWNER`.
    pub owner_cstack: u32,
    /// Offset of `co_code_adaptive` (`PyCode_Type.tp_basicsize`) and of
    /// `co_firstlineno` in code objects.
    pub code_adaptive: u32,
    pub code_firstlineno: u32,
    /// `PY_FLAG_*`.
    pub flags: u32,
    /// `PY_FLAG_TLS`: where the thread's attached `PyThreadState *` is
    /// (`_Py_tss_tstate`), relative to its fs base (negative, as i32).
    pub tls_offset: u32,
    pub _pad: u32,
}

/// `PyProcInfo::flags`: the thread state is the thread-local
/// `_Py_tss_tstate` at `tls_offset` from the fs base (3.14+), not a pthread
/// key's slot.
pub const PY_FLAG_TLS: u32 = 1;
/// `f_executable` is a tagged `_PyStackRef` (3.14+): mask its low bits.
pub const PY_FLAG_TAGGED: u32 = 2;
/// Frames whose `owner` is `owner_cstack` or above are not Python frames
/// (3.14+: the interpreter's entry frames and the thread's base frame).
pub const PY_FLAG_OWNER_AT_LEAST: u32 = 4;

/// One Python frame as sampled: the code object, the code unit it was at
/// (counted from `co_code_adaptive`) and the code's first line, which tells
/// a reused code address from the one sampled.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PyFrame {
    pub code: u64,
    pub index: u32,
    pub firstlineno: u32,
}

/// Python frames of one sample, innermost first.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PyStack {
    pub len: u32,
    pub _pad: u32,
    pub frames: [PyFrame; PY_MAX_FRAMES],
}

/// log2(1 + i/32) in units of 2^-16, i = 0..=32: the fractional part of a
/// logarithm by linear interpolation (error below 2e-4), as Go's `fastlog2`.
const LOG2_FRAC_Q16: [u32; 33] = [
    0, 2909, 5732, 8473, 11136, 13727, 16248, 18704, 21098, 23433, 25711, 27936, 30109, 32234,
    34312, 36346, 38336, 40286, 42196, 44068, 45904, 47705, 49472, 51207, 52911, 54584, 56229,
    57845, 59434, 60997, 62534, 64047, 65536,
];

/// ln 2 in units of 2^-16.
const LN2_Q16: u64 = 45426;

/// -ln(u) in units of 2^-16 for u = (r + 1) / 2^32, uniform in (0, 1] when
/// `r` is: an exponential variate of mean 1 in integers only (no floating
/// point or division in eBPF).
#[inline(always)]
pub fn neg_ln_q16(r: u32) -> u64 {
    let x = r as u64 + 1;
    // e = floor(log2 x), by halving search (no count-leading-zeros in BPF).
    let mut e = 0u64;
    let mut v = x;
    if v >= 1 << 32 {
        v >>= 32;
        e += 32;
    }
    if v >= 1 << 16 {
        v >>= 16;
        e += 16;
    }
    if v >= 1 << 8 {
        v >>= 8;
        e += 8;
    }
    if v >= 1 << 4 {
        v >>= 4;
        e += 4;
    }
    if v >= 1 << 2 {
        v >>= 2;
        e += 2;
    }
    if v >= 1 << 1 {
        e += 1;
    }
    // The mantissa's fraction in units of 2^-32: x / 2^e - 1.
    let frac = (x << (32 - e)) - (1 << 32);
    let i = ((frac >> 27) & 31) as usize;
    let rest = frac & ((1 << 27) - 1);
    let lo = LOG2_FRAC_Q16[i] as u64;
    let hi = LOG2_FRAC_Q16[i + 1] as u64;
    let log2_x = (e << 16) + lo + (((hi - lo) * rest) >> 27);
    // -log2(u) = 32 - log2(x); -ln(u) = -log2(u) * ln 2.
    (((32 << 16) - log2_x) * LN2_Q16) >> 16
}

/// Heap bytes until the next sampled allocation: exponential with mean
/// `mean_bytes`, at least 1. `r` is a uniform random u32.
#[inline(always)]
pub fn heap_sample_interval(r: u32, mean_bytes: u64) -> u64 {
    ((neg_ln_q16(r) * mean_bytes) >> 16) + 1
}

/// Largest `Config::heap_sample_bytes` (products stay within 64 bits).
pub const MAX_HEAP_SAMPLE_BYTES: u64 = 1 << 40;

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY: all of these are #[repr(C)] plain data with no padding and no
    // invalid bit patterns.
    unsafe impl aya::Pod for ProcStats {}
    unsafe impl aya::Pod for MmRss {}
    unsafe impl aya::Pod for ThreadState {}
    unsafe impl aya::Pod for ConnState {}
    unsafe impl aya::Pod for RequestLine {}
    unsafe impl aya::Pod for SiteKey {}
    unsafe impl aya::Pod for SiteCount {}
    unsafe impl aya::Pod for AllocKey {}
    unsafe impl aya::Pod for AllocInfo {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for TracepointLayout {}
    unsafe impl aya::Pod for PyProcInfo {}
    unsafe impl aya::Pod for PyStack {}
}

/// Compile-time checks that the shared layouts have no hidden padding: the
/// sizes below are the sums of the fields.
const _: () = {
    assert!(core::mem::size_of::<ProcStats>() == 14 * 8 + 8);
    assert!(core::mem::size_of::<MmRss>() == 4 * 8 + 8 + 8);
    assert!(core::mem::size_of::<RequestStart>() == 2 * 8 + 4 * 8 + 5 * 8 + 8 + 24);
    assert!(core::mem::size_of::<ThreadState>() == 8 + 6 * 8 + 3 * 8 + 8 + 120 + 32);
    assert!(core::mem::size_of::<AllocKey>() == 16);
    assert!(core::mem::size_of::<AllocInfo>() == 24);
    assert!(core::mem::size_of::<SiteKey>() == 24);
    assert!(core::mem::size_of::<PyProcInfo>() == 14 * 4);
    assert!(core::mem::size_of::<PyStack>() == 8 + 16 * PY_MAX_FRAMES);
    assert!(core::mem::size_of::<ProcessEvent>() == 32 + 16 + 256 + 120 + 32);
    assert!(core::mem::size_of::<RssEvent>() == 24 + 32);
    assert!(core::mem::size_of::<RequestLine>() == 8 + LINE_CAP);
    assert!(core::mem::size_of::<RequestEvent>() == 24 + 24 + 64 + 40 + 16 + 24 + 8 + LINE_CAP);
    assert!(core::mem::size_of::<Config>() == 24 + 20 + 43 * 4);
    assert!(core::mem::size_of::<SiteCount>() == 32);
    assert!(core::mem::size_of::<ConnState>() == 6 * 4 + 8 + 120 + 8 + LINE_CAP);
    // The line's bytes are zeroed and read as u64 words.
    assert!(core::mem::offset_of!(ConnState, line) % 8 == 0);
    // Copied into the event a word at a time, and a short record is a whole
    // number of words.
    assert!(core::mem::offset_of!(RequestEvent, line) % 8 == 0);
    assert!(core::mem::offset_of!(RequestEvent, rss_before) % 8 == 0);
    assert!(REQUEST_SHORT_BYTES == 24 + 24 + 64 + 40 + 16 + 24);
    assert!(core::mem::offset_of!(RequestStart, rss) % 8 == 0);
};
