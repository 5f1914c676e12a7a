//! Maps shared by the programs. Sizes come from memtrace-common so that the
//! agent and the kernel agree on them.
use aya_ebpf::{
    Global,
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuArray, RingBuf, StackTrace},
};
use memtrace_common::{
    AllocInfo, AllocKey, Config, ConnState, DEFAULT_RING_BYTES, FDS_WORDS_MAX, LINE_CAP,
    MAX_ALLOCS, MAX_CONNS, MAX_MMS, MAX_PROCS, MAX_PY_PROCS, MAX_PY_STACKS, MAX_SELECTOR_CGROUPS,
    MAX_SELECTOR_COMMS, MAX_STACK_SITES, MAX_STACKS, MAX_THREADS, MmRss, NUM_COUNTERS, ProcStats,
    PyProcInfo, PyStack, SiteCount, SiteKey, TASK_COMM_LEN, ThreadState,
};

/// Watched processes by tgid; presence means watched.
#[map]
pub static PROCS: HashMap<u32, ProcStats> = HashMap::with_max_entries(MAX_PROCS, 0);

/// Per-thread state of watched processes, by tid.
#[map]
pub static THREADS: HashMap<u32, ThreadState> = HashMap::with_max_entries(MAX_THREADS, 0);

/// RSS counters by mm_id. An LRU: ids of dead mms are never deleted
/// explicitly (a vfork child shares its parent's id), they age out.
#[map]
pub static MM_RSS: LruHashMap<u32, MmRss> = LruHashMap::with_max_entries(MAX_MMS, 0);

/// Process names (comm, NUL-padded) to start watching at exec.
#[map]
pub static SELECTOR_COMMS: HashMap<[u8; TASK_COMM_LEN], u32> =
    HashMap::with_max_entries(MAX_SELECTOR_COMMS, 0);

/// Socket mode: server connections of watched processes, by `struct sock`
/// address. An LRU: a connection whose close was never seen ages out.
#[map]
pub static CONNS: LruHashMap<u64, ConnState> = LruHashMap::with_max_entries(MAX_CONNS, 0);

/// Socket mode: a connection's state built here before it goes into
/// `CONNS` (with its request line it is too large for the BPF stack).
#[map]
pub static CONN_SCRATCH: PerCpuArray<ConnState> = PerCpuArray::with_max_entries(1, 0);

/// Socket mode: a request line split across reads, put together.
#[map]
pub static LINE_SCRATCH: PerCpuArray<[u8; 2 * LINE_CAP]> = PerCpuArray::with_max_entries(1, 0);

/// Cgroup v2 ids a cgroup or container selector names (the value is unused):
/// a process inside one of them, or below, may be selected.
#[map]
pub static SELECTOR_CGROUPS: HashMap<u64, u32> = HashMap::with_max_entries(MAX_SELECTOR_CGROUPS, 0);

/// Events to the agent: process lifecycle, RSS steps, request summaries.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(DEFAULT_RING_BYTES, 0);

/// Counters indexed by `CTR_*` (failed reserves, full maps, ...).
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(NUM_COUNTERS, 0);

/// User stacks sampled while allocation-site collection is on.
#[map]
pub static STACKS: StackTrace = StackTrace::with_max_entries(MAX_STACKS, 0);

/// Bytes per (process, stack, kind) while collection is on.
#[map]
pub static STACK_SITES: HashMap<SiteKey, SiteCount> = HashMap::with_max_entries(MAX_STACK_SITES, 0);

/// Live heap blocks of collected processes (malloc probes).
#[map]
pub static ALLOCS: HashMap<AllocKey, AllocInfo> = HashMap::with_max_entries(MAX_ALLOCS, 0);

/// Python processes whose frames are read, by tgid (offsets of their
/// interpreter build and its TSS key).
#[map]
pub static PY_PROCS: HashMap<u32, PyProcInfo> = HashMap::with_max_entries(MAX_PY_PROCS, 0);

/// Python processes whose GC totals a request's ends read, by tgid: the
/// address of the main interpreter's `generation_stats[3]` (collections,
/// collected, uncollectable per generation), filled by the agent.
#[map]
pub static PY_GC: HashMap<u32, u64> = HashMap::with_max_entries(MAX_PY_PROCS, 0);

/// A request end's descriptor bitmap and count, and GC statistics (see
/// `probes::ends`).
#[map]
pub static FD_SCRATCH: PerCpuArray<FdScratch> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU room for counting a descriptor table.
#[repr(C)]
pub struct FdScratch {
    pub words: [u64; FDS_WORDS_MAX as usize],
    pub open: u64,
    /// CPython's `generation_stats[3]`, as read, and their totals
    /// (collections, collected, uncollectable).
    pub gc: [u64; 9],
    pub gc_sum: [u64; 3],
    /// What the request end being sent read (`REQ_*_KNOWN` in
    /// `end_known`), kept here rather than on the BPF stack: 5.10 allows
    /// 512 bytes for a program and the functions it calls together.
    pub end_fds: u32,
    pub end_known: u32,
    pub end_gc: [u64; 3],
}

/// Python stacks sampled while collection is on, by id (a hash of the
/// frames; `SiteKey::py_stack` and `AllocInfo::py_stack` refer to them).
#[map]
pub static PY_STACKS: HashMap<u64, PyStack> = HashMap::with_max_entries(MAX_PY_STACKS, 0);

/// A Python stack being built (too large for the BPF stack).
#[map]
pub static PY_SCRATCH: PerCpuArray<PyStack> = PerCpuArray::with_max_entries(1, 0);

/// Words of a frame header's buffer: a power of two, so that an index
/// masked with `HEADER_WORDS - 1` is in bounds for the verifier.
pub const HEADER_WORDS: usize = 16;

/// A Python frame walk in progress: the frame, the stack's id so far, the
/// frames kept, and the frame header being read (indexable by a masked
/// offset in map memory).
#[repr(C)]
pub struct PyWalk {
    pub frame: u64,
    pub hash: u64,
    pub n: u64,
    pub header: [u64; HEADER_WORDS],
}

#[map]
pub static PY_WALK: PerCpuArray<PyWalk> = PerCpuArray::with_max_entries(1, 0);

/// Written by the agent at load time (tracepoint offsets, agent pid, steps).
#[unsafe(no_mangle)]
pub static CONFIG: Global<Config> = Global::new(
    // SAFETY: Config is plain integers; all-zero is a valid value.
    unsafe { core::mem::zeroed() },
);
