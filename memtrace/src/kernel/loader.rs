//! Loading the eBPF object, attaching its programs, and the agent's access to
//! the maps they fill.

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, MapError, PerCpuArray, RingBuf, StackTraceMap},
    programs::{
        FExit, ProgramError, TracePoint, UProbe,
        fexit::FExitLinkId,
        trace_point::TracePointLinkId,
        uprobe::{UProbeAttachLocation, UProbeLinkId, UProbeScope},
    },
};
use memtrace_common::{
    AllocInfo, AllocKey, Config, MmRss, NUM_COUNTERS, PROC_FLAG_COLLECT, PY_MAX_FRAMES, ProcStats,
    PyProcInfo, PyStack, SiteCount, SiteKey, TASK_COMM_LEN, TracepointLayout,
};

use super::{
    features::{ExitTest, KernelFeatures, SocketSource},
    tracefs::TracefsError,
    uprobes::{ProbeTarget, emulated_offset_at, entry_offsets, libc_path},
};

/// The programs, built by build.rs from memtrace-ebpf.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/memtrace"));

/// Always-on programs: (program, tracepoint category, tracepoint name). No
/// syscall tracepoint among them: attaching one puts every task of the node
/// on the kernel's syscall slow path.
/// The exit program is one of three variants ([`ExitTest`]), chosen per
/// kernel.
/// Page faults are counted by [`FAULT_PROGRAM`] only where the kernel's own
/// counters cannot be read.
const STEADY_PROGRAMS: &[(&str, &str, &str)] = &[
    ("rss_stat", "kmem", "rss_stat"),
    ("task_newtask", "task", "task_newtask"),
    ("sched_process_exec", "sched", "sched_process_exec"),
];

/// Counts page faults per process and thread, on every fault: kernels whose
/// BTF does not say where a task's fault counters are.
const FAULT_PROGRAM: (&str, &str, &str) = ("page_fault_user", "exceptions", "page_fault_user");

/// Exact mmap/munmap/mremap/brk byte counters (`--mmap-counters`): syscall
/// tracepoints, so every syscall of every task on the node pays for them.
const MMAP_COUNTER_PROGRAMS: &[(&str, &str, &str)] = &[
    ("mmap_enter", "syscalls", "sys_enter_mmap"),
    ("mmap_exit", "syscalls", "sys_exit_mmap"),
    ("munmap_enter", "syscalls", "sys_enter_munmap"),
    ("munmap_exit", "syscalls", "sys_exit_munmap"),
    ("mremap_enter", "syscalls", "sys_enter_mremap"),
    ("mremap_exit", "syscalls", "sys_exit_mremap"),
    BRK_BREAK_PROGRAM,
];

/// Accept-mode request boundaries.
const ACCEPT_PROGRAMS: &[(&str, &str, &str)] = &[
    ("accept_exit", "syscalls", "sys_exit_accept4"),
    ("accept_exit", "syscalls", "sys_exit_accept"),
    ("close_enter", "syscalls", "sys_enter_close"),
    // shutdown(fd) ends the response as surely as close (Python's
    // socketserver shuts down, then closes when the last reference goes).
    ("close_enter", "syscalls", "sys_enter_shutdown"),
];

/// Socket-mode request boundaries: no syscall tracepoint among them.
const SOCKET_PROGRAMS: &[(&str, &str, &str)] = &[
    ("sock_recv", "sock", "sock_recv_length"),
    ("sock_send", "sock", "sock_send_length"),
    SOCKET_STATE_PROGRAM,
];

/// Connect and close, for socket mode whatever its reads come from.
const SOCKET_STATE_PROGRAM: (&str, &str, &str) = ("sock_state", "sock", "inet_sock_set_state");

/// Socket mode on kernels without sock:sock_{recv,send}_length: fexit
/// programs on the TCP functions behind them (program, kernel function).
/// One of the two `tcp_recvmsg` variants is loaded ([`TcpRecvmsg`]).
const SOCKET_FEXIT_PROGRAMS: &[(&str, &str)] = &[
    ("sock_recv_fexit", "tcp_recvmsg"),
    ("sock_recv_fexit_nonblock", "tcp_recvmsg"),
    ("sock_send_fexit", "tcp_sendmsg"),
];

/// Allocation-site collection, attached only while it is on.
pub const COLLECTION_PROGRAMS: &[(&str, &str, &str)] = &[
    ("page_fault_stacks", "exceptions", "page_fault_user"),
    ("mmap_stacks", "syscalls", "sys_enter_mmap"),
    ("brk_stacks", "syscalls", "sys_enter_brk"),
];

/// Follows each process's program break; attached with the collection
/// programs when the mmap counters (which include it) are off.
const BRK_BREAK_PROGRAM: (&str, &str, &str) = ("brk_exit", "syscalls", "sys_exit_brk");

const UPROBE_PROGRAMS: &[&str] = &["request_begin", "request_end_ret", "request_end"];

/// Programs of the heap tier (the C library's allocator).
const HEAP_PROGRAMS: &[&str] = &[
    "malloc_enter",
    "calloc_enter",
    "realloc_enter",
    "alloc_exit",
    "free_enter",
];

/// Programs of the pymalloc tier, on top of the heap tier's.
const PYMALLOC_PROGRAMS: &[&str] = &[
    "pymalloc_enter",
    "pycalloc_enter",
    "pyrealloc_enter",
    "pyalloc_exit",
    "pyfree_enter",
];

/// Heap-allocation probes on the C library, attached per process while
/// collection is on: (program, symbol).
pub const ALLOC_PROBES: &[(&str, &str)] = &[
    ("malloc_enter", "malloc"),
    ("alloc_exit", "malloc"),
    ("calloc_enter", "calloc"),
    ("alloc_exit", "calloc"),
    ("realloc_enter", "realloc"),
    ("alloc_exit", "realloc"),
    ("free_enter", "free"),
];

/// Probes on CPython's object allocator, in the order of
/// [`PymallocTargets::entries`]: (entry program, has a return probe).
const PYMALLOC_PROBES: [(&str, bool); 4] = [
    ("pymalloc_enter", true),
    ("pycalloc_enter", true),
    ("pyrealloc_enter", true),
    ("pyfree_enter", false),
];

/// Where CPython's object allocator functions are in one process's
/// interpreter ELF (`_PyObject_Malloc`, `_Calloc`, `_Realloc`, `_Free`, as
/// its allocator table points at them): file offsets for the uprobes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PymallocTargets {
    pub binary: std::path::PathBuf,
    pub entries: [u64; 4],
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Tracefs(#[from] TracefsError),
    #[error("loading the eBPF programs failed: {0}")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("the kernel refused program {program}: {source}")]
    Program {
        program: String,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("attaching {program} to {target} failed: {source}")]
    Attach {
        program: String,
        target: String,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("map {0} is missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("--ring-buffer-bytes must be a power of two of at least 4096, not {0}")]
    RingSize(u32),
    #[error("collecting allocation sites ({tier} tier) is off on this kernel: {why}")]
    CollectionUnavailable { tier: &'static str, why: String },
}

/// Where requests begin and end, if memtrace should see them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum RequestProbes {
    #[default]
    None,
    /// A request is one call of the function (entry to return).
    Function(ProbeTarget),
    /// A request runs from the entry of one function to the entry of another.
    BeginEnd {
        begin: ProbeTarget,
        end: ProbeTarget,
    },
    /// A request runs from accept() to close() of the connection.
    Accept,
    /// A request is a read then a write on one TCP connection (keep-alive,
    /// threaded and async servers alike), from socket tracepoints.
    Socket,
}

/// Which allocation sites a snapshot collects, cheapest first.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CollectTier {
    /// Page faults (sampled) and mmap/brk calls: tracepoints only, no uprobe.
    /// Sees any growth, allocator arenas included, not which block leaks.
    Growth,
    /// Growth plus the C library's allocator (malloc, calloc, realloc,
    /// free), sampled by bytes: which call stacks hold live heap blocks.
    #[default]
    Heap,
    /// Heap plus CPython's object allocator in Python workers: objects of
    /// 512 bytes or less as live heap blocks, like tracemalloc, at a trap
    /// per Python allocation and free.
    Pymalloc,
}

impl CollectTier {
    pub fn name(self) -> &'static str {
        match self {
            Self::Growth => "growth",
            Self::Heap => "heap",
            Self::Pymalloc => "pymalloc",
        }
    }

    /// Whether the C library's allocator is probed.
    pub fn probes_heap(self) -> bool {
        self != Self::Growth
    }
}

impl std::str::FromStr for CollectTier {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "growth" => Ok(Self::Growth),
            "heap" => Ok(Self::Heap),
            "pymalloc" => Ok(Self::Pymalloc),
            other => Err(format!(
                "`{other}` is not a collection tier: use growth, heap or pymalloc"
            )),
        }
    }
}

/// Load-time settings.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub ring_buffer_bytes: u32,
    pub rss_step_bytes: u64,
    pub report_all_execs: bool,
    pub fault_sample_period: u32,
    pub requests: RequestProbes,
    /// `memtrace_common::CGROUP_FILTER_*`: execs count only inside the
    /// cgroups given to [`Tracer::select_cgroup`].
    pub cgroup_filter: u32,
    /// Count mmap/munmap/mremap/brk bytes from syscall tracepoints for the
    /// agent's whole life (off: those counters stay zero).
    pub mmap_counters: bool,
    /// Socket mode: keep each HTTP/1.x request's method and path (the
    /// first bytes of the request line; `--no-http-paths` turns it off).
    pub http_paths: bool,
    /// Count each worker's open descriptors at each request's ends
    /// (`--no-fd-counts` turns it off).
    pub fd_counts: bool,
    /// What a snapshot collects.
    pub collect: CollectTier,
    /// Mean bytes between sampled heap allocations (0 or 1: every one).
    pub heap_sample_bytes: u64,
    /// Sampled heap blocks tracked per worker at most (0: the map's size).
    pub max_live_allocs: u32,
    /// Sampled heap blocks tracked over all workers (the map's size).
    pub live_allocs_map_size: u32,
    /// Python frames taken per sample (at most `PY_MAX_FRAMES`; 0: none).
    pub python_frames: u32,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            ring_buffer_bytes: memtrace_common::DEFAULT_RING_BYTES,
            rss_step_bytes: 256 * 1024,
            report_all_execs: false,
            fault_sample_period: 4,
            requests: RequestProbes::None,
            cgroup_filter: memtrace_common::CGROUP_FILTER_OFF,
            mmap_counters: false,
            http_paths: true,
            fd_counts: true,
            collect: CollectTier::default(),
            heap_sample_bytes: memtrace_common::DEFAULT_HEAP_SAMPLE_BYTES,
            max_live_allocs: DEFAULT_MAX_LIVE_ALLOCS,
            live_allocs_map_size: memtrace_common::MAX_ALLOCS,
            python_frames: PY_MAX_FRAMES as u32,
        }
    }
}

/// Sampled live heap blocks tracked per worker by default: at the default
/// sampling interval, 32 GiB of live heap in blocks under 512 KiB.
pub const DEFAULT_MAX_LIVE_ALLOCS: u32 = 65_536;

/// Kernel-side counters summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct KernelCounters {
    pub ringbuf_drops: u64,
    pub events: u64,
    pub procs_map_full: u64,
    pub threads_map_full: u64,
    pub mms_map_full: u64,
    pub stack_errors: u64,
    pub stack_samples: u64,
    pub sites_map_full: u64,
    /// Socket mode: connections that did not fit in the kernel's map.
    pub conns_map_full: u64,
    /// Execs a selector matched outside the selected cgroups, dropped in the
    /// kernel.
    pub cgroup_rejected: u64,
    /// Heap allocations sampled while the heap tier was on.
    pub heap_samples: u64,
    /// Sampled heap blocks not tracked: a worker's cap or the map was full.
    pub live_allocs_dropped: u64,
}

/// The loaded programs and the maps the agent reads and writes.
pub struct Tracer {
    ebpf: Ebpf,
    procs: HashMap<MapData, u32, ProcStats>,
    mm_rss: HashMap<MapData, u32, MmRss>,
    comms: HashMap<MapData, [u8; TASK_COMM_LEN], u32>,
    cgroups: HashMap<MapData, u64, u32>,
    counters: PerCpuArray<MapData, u64>,
    sites: HashMap<MapData, SiteKey, SiteCount>,
    stacks: StackTraceMap<MapData>,
    attached: Vec<String>,
    collection_links: Vec<(&'static str, TracePointLinkId)>,
    alloc_links: std::collections::HashMap<u32, Vec<(&'static str, UProbeLinkId)>>,
    allocs: HashMap<MapData, AllocKey, AllocInfo>,
    py_procs: HashMap<MapData, u32, PyProcInfo>,
    /// Where each Python worker's GC totals are (`PY_GC`).
    py_gc: HashMap<MapData, u32, u64>,
    py_stacks: HashMap<MapData, u64, PyStack>,
    /// CPython allocator probes to attach with the C library's, by process.
    pymalloc: std::collections::HashMap<u32, PymallocTargets>,
    /// Python frames are read (the kernel's BTF gave the fs base offset and
    /// the depth is not 0).
    python_frames: bool,
    uprobe_links: Vec<(&'static str, UProbeLinkId)>,
    fexit_links: Vec<(&'static str, FExitLinkId)>,
    mmap_counters: bool,
    /// Faults are counted by a program on every fault, not read from the
    /// kernel's counters.
    fault_program: bool,
    collect: CollectTier,
    /// Why the collection tier asked for cannot run here, if it cannot.
    collect_unavailable: Option<String>,
    heap_sample_bytes: u64,
    /// Request boundaries as attached: `None` where the mode asked for
    /// cannot run on this kernel.
    requests: RequestProbes,
    /// Features asked for that this kernel cannot serve, one line each.
    unavailable: Vec<String>,
    kernel_release: String,
    pub layout: TracepointLayout,
}

/// What to load on this kernel for the options given, and what of them
/// this kernel cannot serve.
struct Plan {
    /// Programs without which the agent cannot run.
    steady: Vec<&'static str>,
    /// Programs of `--mmap-counters`, of the request mode and of the
    /// collection tier: where the kernel refuses one, that feature is off.
    mmap: Vec<&'static str>,
    request: Vec<&'static str>,
    collection: Vec<&'static str>,
    exit: ExitTest,
    /// Faults are counted by `FAULT_PROGRAM` (the task's counters are not read).
    fault_program: bool,
    socket: Option<SocketSource>,
    requests: RequestProbes,
    mmap_counters: bool,
    http_paths: bool,
    collect_unavailable: Option<String>,
    task_fsbase: u32,
    py_frames: u32,
    cgroup_filter: u32,
    unavailable: Vec<String>,
}

impl Plan {
    fn new(features: &KernelFeatures, options: &LoadOptions) -> Self {
        let mut unavailable = Vec::new();
        let exit = features.exit_test();
        let mut steady: Vec<&'static str> = STEADY_PROGRAMS.iter().map(|p| p.0).collect();
        steady.push(exit.program());
        let fault_program = features.btf.fault_counters.is_none();
        if fault_program {
            steady.push(FAULT_PROGRAM.0);
        }
        let mut mmap = Vec::new();
        let mut request = Vec::new();
        let mut collection = Vec::new();
        let mmap_counters = options.mmap_counters
            && match features.mmap_events() {
                Ok(()) => {
                    mmap.extend(MMAP_COUNTER_PROGRAMS.iter().map(|p| p.0));
                    true
                }
                Err(why) => {
                    unavailable.push(format!("--mmap-counters is off: {why}"));
                    false
                }
            };
        let mut socket = None;
        let requests = match &options.requests {
            RequestProbes::None => Ok(RequestProbes::None),
            RequestProbes::Accept => features.accept_events().map(|()| {
                request.extend(ACCEPT_PROGRAMS.iter().map(|p| p.0));
                RequestProbes::Accept
            }),
            RequestProbes::Socket => features.socket_source().map(|source| {
                socket = Some(source);
                request.extend(socket_programs(features, source));
                RequestProbes::Socket
            }),
            probes @ (RequestProbes::Function(_) | RequestProbes::BeginEnd { .. }) => {
                features.uprobe_mode().map(|()| {
                    request.extend(UPROBE_PROGRAMS);
                    probes.clone()
                })
            }
        };
        let requests = requests.unwrap_or_else(|why| {
            unavailable.push(request_mode_off(features, &options.requests, &why));
            RequestProbes::None
        });
        let http_paths = options.http_paths
            && requests == RequestProbes::Socket
            && match features.http_paths() {
                Ok(()) => true,
                Err(why) => {
                    unavailable.push(format!("HTTP path capture is off: {why}"));
                    false
                }
            };
        let tier = match options.collect {
            CollectTier::Growth => features.growth_tier(),
            CollectTier::Heap | CollectTier::Pymalloc => features.heap_tier(),
        };
        let collect_unavailable = match tier {
            Ok(()) => {
                collection.extend(collection_programs(options.collect, mmap_counters));
                None
            }
            Err(why) => {
                unavailable.push(format!(
                    "allocation-site collection ({} tier) is off: {why}",
                    options.collect.name()
                ));
                Some(why)
            }
        };
        let cgroup_filter = match features.cgroup_filter() {
            Err(why) if options.cgroup_filter != memtrace_common::CGROUP_FILTER_OFF => {
                unavailable.push(format!(
                    "--cgroup and --container are applied by the agent, not in the kernel (processes elsewhere that match a name are still seen by the kernel): {why}"
                ));
                memtrace_common::CGROUP_FILTER_OFF
            }
            _ => options.cgroup_filter,
        };
        let py_frames = options.python_frames.min(PY_MAX_FRAMES as u32);
        let task_fsbase = match (py_frames, features.python_frames()) {
            (0, _) => 0,
            (_, Ok(())) => features.btf.task_fsbase.unwrap_or(0),
            (_, Err(why)) => {
                unavailable.push(format!("Python frames are off: {why}"));
                0
            }
        };
        Self {
            steady,
            mmap,
            request,
            collection,
            exit,
            fault_program,
            socket,
            requests,
            mmap_counters,
            http_paths,
            collect_unavailable,
            task_fsbase,
            py_frames,
            cgroup_filter,
            unavailable,
        }
    }
}

/// Page faults (minor and major) a process's threads have taken since it
/// started, as the kernel counts them (`/proc/PID/stat`); None when it is
/// gone.
fn proc_faults(pid: u32) -> Option<u64> {
    let stat = procfs::process::Process::new(pid as i32)
        .ok()?
        .stat()
        .ok()?;
    Some(stat.minflt + stat.majflt)
}

/// The line for a request mode this kernel cannot serve.
fn request_mode_off(features: &KernelFeatures, mode: &RequestProbes, why: &str) -> String {
    let (name, hint) = match mode {
        RequestProbes::Socket if features.accept_events().is_ok() => {
            ("socket", ": use --request-mode accept")
        }
        RequestProbes::Socket => ("socket", ""),
        RequestProbes::Accept => ("accept", ""),
        _ => ("uprobe", ""),
    };
    format!("request mode {name} is off, requests are not traced: {why}{hint}")
}

/// Loads a feature's programs (one program may serve several events);
/// the first refusal, as one line.
fn load_programs(ebpf: &mut Ebpf, programs: &[&'static str]) -> Result<(), String> {
    for (i, &program) in programs.iter().enumerate() {
        if programs[..i].contains(&program) {
            continue;
        }
        load_program(ebpf, program)
            .map_err(|e| format!("the kernel refused {program}: {}", verifier_summary(&e)))?;
    }
    Ok(())
}

fn socket_programs(features: &KernelFeatures, source: SocketSource) -> Vec<&'static str> {
    match (source, features.btf.fexit) {
        (SocketSource::Fexit, Some(recv)) => {
            vec![recv.program(), "sock_send_fexit", SOCKET_STATE_PROGRAM.0]
        }
        _ => SOCKET_PROGRAMS.iter().map(|p| p.0).collect(),
    }
}

/// The programs a collection tier attaches while it collects.
fn collection_programs(tier: CollectTier, mmap_counters: bool) -> Vec<&'static str> {
    let mut programs: Vec<&'static str> = COLLECTION_PROGRAMS.iter().map(|p| p.0).collect();
    if !mmap_counters {
        programs.push(BRK_BREAK_PROGRAM.0);
    }
    if tier.probes_heap() {
        programs.extend(HEAP_PROGRAMS);
    }
    if tier == CollectTier::Pymalloc {
        programs.extend(PYMALLOC_PROGRAMS);
    }
    programs
}

/// Parses the object with this kernel's settings in its read-only data;
/// no program is loaded yet.
fn load_object(
    features: &KernelFeatures,
    agent_tgid: u32,
    options: &LoadOptions,
    plan: &Plan,
) -> Result<Ebpf, LoadError> {
    // None exactly where the plan counts faults with the program.
    let faults = features.btf.fault_counters.unwrap_or_default();
    // The exit program reads `task_struct.signal` for either.
    let (task_signal, signal_live) = features.btf.signal_live.unwrap_or((faults.task_signal, 0));
    let fds = features
        .btf
        .fd_table
        .filter(|_| options.fd_counts)
        .unwrap_or_default();
    let ring = options.ring_buffer_bytes;
    let config = Config {
        agent_tgid,
        report_all_execs: u32::from(options.report_all_execs),
        rss_step_bytes: options.rss_step_bytes,
        fault_sample_period: options.fault_sample_period.max(1),
        cgroup_filter: plan.cgroup_filter,
        heap_sample_bytes: options.heap_sample_bytes,
        max_live_allocs: options.max_live_allocs,
        http_paths: u32::from(plan.http_paths),
        task_fsbase: plan.task_fsbase,
        py_frames: plan.py_frames,
        ring_wake_bytes: ring / 2,
        task_signal,
        signal_live,
        task_files: fds.task_files,
        files_fdt: fds.files_fdt,
        fdt_max_fds: fds.fdt_max_fds,
        fdt_open_fds: fds.fdt_open_fds,
        sock_socket: fds.sock_socket,
        socket_sk: fds.socket_sk,
        socket_file: fds.socket_file,
        file_count: fds.file_count,
        task_min_flt: faults.task_min_flt,
        task_maj_flt: faults.task_maj_flt,
        signal_min_flt: faults.signal_min_flt,
        signal_maj_flt: faults.signal_maj_flt,
        _pad: 0,
        layout: features.layout,
    };
    EbpfLoader::new()
        .override_global("CONFIG", &config, true)
        .map_max_entries("EVENTS", ring)
        .map_max_entries("ALLOCS", options.live_allocs_map_size.max(1))
        .load(EBPF_OBJECT)
        .map_err(|e| LoadError::Load(Box::new(e)))
}

/// Loads one program of the object into the kernel (the verifier's turn).
fn load_program(ebpf: &mut Ebpf, name: &str) -> Result<(), ProgramError> {
    match ebpf.program_mut(name) {
        Some(aya::programs::Program::TracePoint(p)) => p.load(),
        Some(aya::programs::Program::UProbe(p)) => p.load(),
        Some(aya::programs::Program::FExit(p)) => {
            let function = SOCKET_FEXIT_PROGRAMS
                .iter()
                .find(|(program, _)| *program == name)
                .map(|(_, function)| *function)
                .expect("every fexit program has its function");
            let btf = aya::Btf::from_sys_fs().map_err(ProgramError::Btf)?;
            p.load(function, &btf)
        }
        _ => Ok(()),
    }
}

/// The kernel's word on one program (`memtrace check`).
#[derive(Clone, Debug)]
pub struct Verdict {
    /// The feature of `memtrace check` the program serves.
    pub feature: &'static str,
    pub program: &'static str,
    /// Why the kernel refused it, if it did.
    pub refused: Option<String>,
}

/// The verifier's word on every program this kernel's features say it can
/// run, loaded and not attached (`memtrace check`). A program refused here
/// names its feature off.
pub fn verify(features: &KernelFeatures) -> Result<Vec<Verdict>, LoadError> {
    let options = LoadOptions {
        requests: RequestProbes::Socket,
        collect: CollectTier::Pymalloc,
        ..LoadOptions::default()
    };
    let plan = Plan::new(features, &options);
    let mut ebpf = load_object(features, std::process::id(), &options, &plan)?;
    let mut groups: Vec<(&'static str, Vec<&'static str>)> = vec![(
        "process tracking",
        STEADY_PROGRAMS
            .iter()
            .map(|p| p.0)
            .chain([plan.exit.program(), FAULT_PROGRAM.0])
            .collect(),
    )];
    if features.accept_events().is_ok() {
        groups.push((
            "request mode accept",
            ACCEPT_PROGRAMS.iter().map(|p| p.0).collect(),
        ));
    }
    if let Ok(source) = features.socket_source() {
        groups.push(("request mode socket", socket_programs(features, source)));
    }
    if features.uprobe_mode().is_ok() {
        groups.push(("request mode uprobe", UPROBE_PROGRAMS.to_vec()));
    }
    for tier in [
        CollectTier::Growth,
        CollectTier::Heap,
        CollectTier::Pymalloc,
    ] {
        let ok = match tier {
            CollectTier::Growth => features.growth_tier(),
            _ => features.heap_tier(),
        };
        if ok.is_ok() {
            let name = match tier {
                CollectTier::Growth => "collect growth",
                CollectTier::Heap => "collect heap",
                CollectTier::Pymalloc => "collect pymalloc",
            };
            groups.push((name, collection_programs(tier, false)));
        }
    }
    if features.mmap_events().is_ok() {
        groups.push((
            "mmap counters",
            MMAP_COUNTER_PROGRAMS.iter().map(|p| p.0).collect(),
        ));
    }
    let mut results = Vec::new();
    let mut loaded: std::collections::HashMap<&'static str, Option<String>> = Default::default();
    for (feature, programs) in groups {
        for program in programs {
            let error = loaded
                .entry(program)
                .or_insert_with(|| {
                    load_program(&mut ebpf, program)
                        .err()
                        .map(|e| verifier_summary(&e))
                })
                .clone();
            results.push(Verdict {
                feature,
                program,
                refused: error,
            });
        }
    }
    Ok(results)
}

/// The first lines of a load error, verifier log included, for one line of
/// `memtrace check`.
fn verifier_summary(e: &ProgramError) -> String {
    match e {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            // The verifier ends with its statistics; the reason comes
            // just before them.
            let stats = ["verification time", "stack depth", "processed "];
            let tail: Vec<&str> = log
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !stats.iter().any(|s| l.starts_with(s)))
                .rev()
                .take(2)
                .collect();
            if tail.is_empty() {
                format!("{io_error}")
            } else {
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                format!("{io_error}: {}", tail.join(" / "))
            }
        }
        other => other.to_string(),
    }
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, LoadError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(LoadError::MissingMap(name))?;
    T::try_from(map).map_err(|source| LoadError::Map { name, source })
}

impl Tracer {
    /// Loads the programs this kernel can run for the mode and tier asked
    /// for (the verifier checks them up front), attaches the steady-state
    /// ones plus the request boundaries, and notes what this kernel cannot
    /// serve ([`Tracer::unavailable`]) instead of refusing to start.
    /// Returns the ring buffer separately: the event loop owns it.
    pub fn load(
        features: &KernelFeatures,
        agent_tgid: u32,
        options: &LoadOptions,
    ) -> Result<(Self, RingBuf<MapData>), LoadError> {
        let ring = options.ring_buffer_bytes;
        if ring < 4096 || !ring.is_power_of_two() {
            return Err(LoadError::RingSize(ring));
        }
        let mut plan = Plan::new(features, options);
        let mut ebpf = load_object(features, agent_tgid, options, &plan)?;
        for &program in &plan.steady {
            load_program(&mut ebpf, program).map_err(|source| LoadError::Program {
                program: program.to_string(),
                source: Box::new(source),
            })?;
        }
        if let Err(why) = load_programs(&mut ebpf, &plan.mmap) {
            plan.mmap_counters = false;
            plan.unavailable
                .push(format!("--mmap-counters is off: {why}"));
        }
        if let Err(why) = load_programs(&mut ebpf, &plan.request) {
            plan.unavailable
                .push(request_mode_off(features, &plan.requests, &why));
            plan.requests = RequestProbes::None;
        }
        if let Err(why) = load_programs(&mut ebpf, &plan.collection) {
            plan.unavailable.push(format!(
                "allocation-site collection ({} tier) is off: {why}",
                options.collect.name()
            ));
            plan.collect_unavailable = Some(why);
        }

        let procs = take_map(&mut ebpf, "PROCS")?;
        let mm_rss = take_map(&mut ebpf, "MM_RSS")?;
        let comms = take_map(&mut ebpf, "SELECTOR_COMMS")?;
        let cgroups = take_map(&mut ebpf, "SELECTOR_CGROUPS")?;
        let counters = take_map(&mut ebpf, "COUNTERS")?;
        let sites = take_map(&mut ebpf, "STACK_SITES")?;
        let stacks = take_map(&mut ebpf, "STACKS")?;
        let allocs = take_map(&mut ebpf, "ALLOCS")?;
        let py_procs = take_map(&mut ebpf, "PY_PROCS")?;
        let py_gc = take_map(&mut ebpf, "PY_GC")?;
        let py_stacks = take_map(&mut ebpf, "PY_STACKS")?;
        let events: RingBuf<MapData> = take_map(&mut ebpf, "EVENTS")?;

        let mut tracer = Self {
            ebpf,
            procs,
            mm_rss,
            comms,
            cgroups,
            counters,
            sites,
            stacks,
            attached: Vec::new(),
            collection_links: Vec::new(),
            alloc_links: std::collections::HashMap::new(),
            allocs,
            py_procs,
            py_gc,
            py_stacks,
            pymalloc: std::collections::HashMap::new(),
            python_frames: plan.task_fsbase != 0 && plan.py_frames != 0,
            uprobe_links: Vec::new(),
            fexit_links: Vec::new(),
            mmap_counters: plan.mmap_counters,
            fault_program: plan.fault_program,
            collect: options.collect,
            collect_unavailable: plan.collect_unavailable.clone(),
            heap_sample_bytes: options.heap_sample_bytes,
            requests: plan.requests.clone(),
            unavailable: plan.unavailable.clone(),
            kernel_release: features.release.clone(),
            layout: features.layout,
        };
        for &(program, category, name) in STEADY_PROGRAMS {
            tracer.attach_tracepoint(program, category, name)?;
        }
        if plan.fault_program {
            let (program, category, name) = FAULT_PROGRAM;
            tracer.attach_tracepoint(program, category, name)?;
        }
        tracer.attach_tracepoint(plan.exit.program(), "sched", "sched_process_exit")?;
        if plan.mmap_counters {
            for &(program, category, name) in MMAP_COUNTER_PROGRAMS {
                tracer.attach_tracepoint(program, category, name)?;
            }
        }
        match &plan.requests {
            RequestProbes::None => {}
            RequestProbes::Accept => {
                for &(program, category, name) in ACCEPT_PROGRAMS {
                    tracer.attach_tracepoint(program, category, name)?;
                }
            }
            RequestProbes::Socket => match plan.socket {
                Some(SocketSource::Fexit) => {
                    for &(program, function) in SOCKET_FEXIT_PROGRAMS {
                        if plan.request.contains(&program) {
                            tracer.attach_fexit(program, function)?;
                        }
                    }
                    let (program, category, name) = SOCKET_STATE_PROGRAM;
                    tracer.attach_tracepoint(program, category, name)?;
                }
                _ => {
                    for &(program, category, name) in SOCKET_PROGRAMS {
                        tracer.attach_tracepoint(program, category, name)?;
                    }
                }
            },
            RequestProbes::Function(target) => {
                tracer.attach_uprobe("request_begin", target)?;
                tracer.attach_uprobe("request_end_ret", target)?;
            }
            RequestProbes::BeginEnd { begin, end } => {
                tracer.attach_uprobe("request_begin", begin)?;
                tracer.attach_uprobe("request_end", end)?;
            }
        }
        Ok((tracer, events))
    }

    /// Request boundaries as attached (`None` where the mode asked for
    /// cannot run on this kernel).
    pub fn requests(&self) -> &RequestProbes {
        &self.requests
    }

    /// What was asked for and this kernel cannot serve, one line each.
    pub fn unavailable(&self) -> &[String] {
        &self.unavailable
    }

    /// The running kernel's release.
    pub fn kernel_release(&self) -> &str {
        &self.kernel_release
    }

    fn attach_fexit(&mut self, program: &'static str, function: &str) -> Result<(), LoadError> {
        let p: &mut FExit = self
            .ebpf
            .program_mut(program)
            .unwrap_or_else(|| panic!("program {program} is in the object"))
            .try_into()
            .expect("fexit program");
        let link = p.attach().map_err(|source| LoadError::Attach {
            program: program.to_string(),
            target: format!("fexit {function}"),
            source: Box::new(source),
        })?;
        self.fexit_links.push((program, link));
        self.attached.push(format!("{program}@fexit:{function}"));
        Ok(())
    }

    fn uprobe(&mut self, program: &str) -> &mut UProbe {
        let p = self
            .ebpf
            .program_mut(program)
            .unwrap_or_else(|| panic!("program {program} is in the object"));
        p.try_into().expect("uprobe program")
    }

    fn tracepoint(&mut self, program: &str) -> &mut TracePoint {
        let p = self
            .ebpf
            .program_mut(program)
            .unwrap_or_else(|| panic!("program {program} is in the object"));
        p.try_into().expect("tracepoint program")
    }

    fn attach_tracepoint(
        &mut self,
        program: &'static str,
        category: &str,
        name: &str,
    ) -> Result<TracePointLinkId, LoadError> {
        let link = self
            .tracepoint(program)
            .attach(category, name)
            .map_err(|source| LoadError::Attach {
                program: program.to_string(),
                target: format!("tracepoint {category}:{name}"),
                source: Box::new(source),
            })?;
        self.attached.push(format!("{program}@{category}:{name}"));
        Ok(link)
    }

    fn attach_uprobe(
        &mut self,
        program: &'static str,
        target: &ProbeTarget,
    ) -> Result<(), LoadError> {
        debug_assert!(UPROBE_PROGRAMS.contains(&program));
        let link = self
            .uprobe(program)
            .attach(
                target.symbol.as_str(),
                &target.binary,
                UProbeScope::AllProcesses,
            )
            .map_err(|source| LoadError::Attach {
                program: program.to_string(),
                target: format!("{}:{}", target.binary.display(), target.symbol),
                source: Box::new(source),
            })?;
        self.uprobe_links.push((program, link));
        self.attached.push(format!(
            "{program}@{}:{}",
            target.binary.display(),
            target.symbol
        ));
        Ok(())
    }

    /// Names of the attached programs and where they are attached.
    pub fn attached(&self) -> &[String] {
        &self.attached
    }

    /// Starts watching a process: the kernel counts for it from now on.
    /// `last_brk` seeds the program break of a process found already running.
    pub fn watch(&mut self, tgid: u32, last_brk: u64) -> Result<(), MapError> {
        if self.procs.get(&tgid, 0).is_ok() {
            return Ok(());
        }
        let stats = ProcStats {
            last_brk,
            ..ProcStats::default()
        };
        // BPF_NOEXIST: a fork the kernel already followed keeps its counters.
        match self.procs.insert(tgid, stats, 1) {
            Ok(()) => Ok(()),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    pub fn unwatch(&mut self, tgid: u32) {
        let _ = self.procs.remove(&tgid);
        self.forget_python(tgid);
    }

    /// Stops reading a process's Python frames (it exited, or exec'd a new
    /// program whose interpreter, if any, is set up anew).
    pub fn forget_python(&mut self, tgid: u32) {
        let _ = self.py_procs.remove(&tgid);
        let _ = self.py_gc.remove(&tgid);
        self.pymalloc.remove(&tgid);
    }

    /// Lets a request's ends read a Python process's GC totals: `addr` is
    /// its main interpreter's `generation_stats[3]`.
    pub fn set_python_gc(&mut self, tgid: u32, addr: u64) -> Result<(), MapError> {
        self.py_gc.insert(tgid, addr, 0)
    }

    /// Whether the programs read Python frames at all.
    pub fn python_frames(&self) -> bool {
        self.python_frames
    }

    /// Lets the programs read a Python process's frames and, with the heap
    /// tier, probe its object allocator (`None`: that build inlines it, or
    /// its table could not be found).
    pub fn set_python(
        &mut self,
        tgid: u32,
        info: PyProcInfo,
        pymalloc: Option<PymallocTargets>,
    ) -> Result<(), MapError> {
        self.py_procs.insert(tgid, info, 0)?;
        match pymalloc.filter(|_| self.collect == CollectTier::Pymalloc) {
            Some(targets) => {
                // Collection already on for it: probe the allocator now.
                if let (Some(mut links), Some(pid)) = (
                    self.alloc_links.remove(&tgid),
                    std::num::NonZeroU32::new(tgid),
                ) {
                    self.attach_pymalloc(pid, &targets, &mut links);
                    self.alloc_links.insert(tgid, links);
                }
                self.pymalloc.insert(tgid, targets);
            }
            None => {
                self.pymalloc.remove(&tgid);
            }
        }
        Ok(())
    }

    /// Whether CPython's object allocator of a process is probed while
    /// collecting (the pymalloc tier, a build that does not inline it).
    pub fn pymalloc_probed(&self, tgid: u32) -> bool {
        self.collect == CollectTier::Pymalloc && self.pymalloc.contains_key(&tgid)
    }

    /// The Python frames of a sampled stack, innermost first.
    pub fn py_stack(&self, id: u64) -> Option<Vec<memtrace_common::PyFrame>> {
        let stack = self.py_stacks.get(&id, 0).ok()?;
        let len = (stack.len as usize).min(PY_MAX_FRAMES);
        Some(stack.frames[..len].to_vec())
    }

    /// A watched process's counters as the kernel's map has them: for
    /// whether it is watched, its flags and its request counts. Its `faults`
    /// are counted only by the per-fault program; [`Self::proc_stats`] has
    /// them in every case.
    pub fn kernel_stats(&self, tgid: u32) -> Option<ProcStats> {
        self.procs.get(&tgid, 0).ok()
    }

    /// A watched process's counters, as memtrace reports them. Where no
    /// program counts faults, its faults are the kernel's own counters, from
    /// `/proc` (since the process started, not since memtrace saw it).
    pub fn proc_stats(&self, tgid: u32) -> Option<ProcStats> {
        let mut stats = self.kernel_stats(tgid)?;
        if !self.fault_program
            && let Some(faults) = proc_faults(tgid)
        {
            stats.faults = faults;
        }
        Some(stats)
    }

    /// Every watched tgid the kernel knows.
    pub fn watched_tgids(&self) -> Vec<u32> {
        self.procs.keys().filter_map(Result::ok).collect()
    }

    pub fn mm_rss(&self, mm_id: u32) -> Option<MmRss> {
        if mm_id == 0 {
            return None;
        }
        self.mm_rss.get(&mm_id, 0).ok()
    }

    /// Process names the kernel should start watching at exec.
    pub fn set_selector_comms<'a>(
        &mut self,
        names: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), MapError> {
        for name in names {
            self.comms.insert(comm_key(name), 1, 0)?;
        }
        Ok(())
    }

    /// Lets execs inside this cgroup (a v2 id) or below it be selected.
    pub fn select_cgroup(&mut self, id: u64) -> Result<(), MapError> {
        self.cgroups.insert(id, 1, 0)
    }

    pub fn counters(&self) -> KernelCounters {
        let mut sums = [0u64; NUM_COUNTERS as usize];
        for (i, sum) in sums.iter_mut().enumerate() {
            if let Ok(values) = self.counters.get(&(i as u32), 0) {
                *sum = values.iter().sum();
            }
        }
        KernelCounters {
            ringbuf_drops: sums[memtrace_common::CTR_RINGBUF_DROPS as usize],
            events: sums[memtrace_common::CTR_EVENTS as usize],
            procs_map_full: sums[memtrace_common::CTR_PROCS_FULL as usize],
            threads_map_full: sums[memtrace_common::CTR_THREADS_FULL as usize],
            mms_map_full: sums[memtrace_common::CTR_MMS_FULL as usize],
            stack_errors: sums[memtrace_common::CTR_STACK_ERRORS as usize],
            stack_samples: sums[memtrace_common::CTR_STACK_SAMPLES as usize],
            sites_map_full: sums[memtrace_common::CTR_SITES_FULL as usize],
            cgroup_rejected: sums[memtrace_common::CTR_CGROUP_REJECTED as usize],
            conns_map_full: sums[memtrace_common::CTR_CONNS_FULL as usize],
            heap_samples: sums[memtrace_common::CTR_HEAP_SAMPLES as usize],
            live_allocs_dropped: sums[memtrace_common::CTR_ALLOCS_DROPPED as usize],
        }
    }

    /// What a snapshot collects.
    pub fn collect_tier(&self) -> CollectTier {
        self.collect
    }

    /// Mean bytes between sampled heap allocations (0 or 1: every one).
    pub fn heap_sample_bytes(&self) -> u64 {
        self.heap_sample_bytes
    }

    /// Whether the allocation-site programs are attached.
    pub fn collecting(&self) -> bool {
        !self.collection_links.is_empty()
    }

    /// Processes whose heap allocations are probed.
    pub fn alloc_probed(&self) -> Vec<u32> {
        self.alloc_links.keys().copied().collect()
    }

    /// Program breaks read from /proc, for brk sites: without the mmap
    /// counters nothing followed the break before collection started, so
    /// the values seeded at watch time are stale. Ignored while anything
    /// follows it already.
    pub fn seed_breaks(&mut self, breaks: &[(u32, u64)]) {
        if self.mmap_counters || self.collecting() {
            return;
        }
        for &(tgid, brk) in breaks {
            if let Ok(mut stats) = self.procs.get(&tgid, 0) {
                stats.last_brk = brk;
                let _ = self.procs.insert(tgid, stats, 2 /* BPF_EXIST */);
            }
        }
    }

    /// A mmap/munmap/mremap/brk counter as shown: absent, not 0, when those
    /// are not counted.
    pub fn mmap_counted(&self, value: u64) -> Option<u64> {
        self.mmap_counters.then_some(value)
    }

    /// Turns allocation-site collection on for these processes, attaching the
    /// stack programs if they are not attached yet.
    pub fn start_collection(&mut self, tgids: &[u32]) -> Result<(), LoadError> {
        if let Some(why) = &self.collect_unavailable {
            return Err(LoadError::CollectionUnavailable {
                tier: self.collect.name(),
                why: why.clone(),
            });
        }
        for &tgid in tgids {
            if let Ok(mut stats) = self.procs.get(&tgid, 0)
                && stats.flags & PROC_FLAG_COLLECT == 0
            {
                // Counters may move between get and insert; the flag is
                // only written here, and a lost count is one fault.
                stats.flags |= PROC_FLAG_COLLECT;
                let _ = self.procs.insert(tgid, stats, 2 /* BPF_EXIST */);
            }
        }
        if self.collection_links.is_empty() {
            for &(program, category, name) in COLLECTION_PROGRAMS {
                let link = self.attach_tracepoint(program, category, name)?;
                self.collection_links.push((program, link));
            }
            // brk sites are growth over the last break brk_exit saw.
            if !self.mmap_counters {
                let (program, category, name) = BRK_BREAK_PROGRAM;
                let link = self.attach_tracepoint(program, category, name)?;
                self.collection_links.push((program, link));
            }
        }
        for &tgid in tgids {
            self.attach_alloc_probes(tgid);
        }
        Ok(())
    }

    /// Attaches the malloc/free probes to one process's C library. Without
    /// one (static binaries) only page-fault and mmap/brk sites are seen.
    pub fn attach_alloc_probes(&mut self, tgid: u32) {
        if !self.collect.probes_heap() || self.alloc_links.contains_key(&tgid) {
            return;
        }
        let Some(pid) = std::num::NonZeroU32::new(tgid) else {
            return;
        };
        let Some(libc) = libc_path(tgid) else {
            tracing::info!(
                pid = tgid,
                "no shared C library mapped: heap allocations not tracked, page-fault sites only"
            );
            return;
        };
        let mut links = Vec::new();
        let symbols: Vec<&str> = ALLOC_PROBES.iter().map(|&(_, s)| s).collect();
        let offsets = entry_offsets(&libc, &symbols);
        for (&(program, symbol), &offset) in ALLOC_PROBES.iter().zip(&offsets) {
            // Return probes go on the entry itself; entry probes where the
            // kernel can emulate the instruction.
            let offset = if program == "alloc_exit" { 0 } else { offset };
            match self.uprobe(program).attach(
                UProbeAttachLocation::SymbolOffset(symbol, offset),
                &libc,
                UProbeScope::OneProcess(pid),
            ) {
                Ok(link) => links.push((program, link)),
                Err(e) => {
                    tracing::warn!(pid = tgid, symbol, error = %e, "cannot probe the C library's allocator");
                }
            }
        }
        if let Some(targets) = self.pymalloc.get(&tgid).cloned() {
            self.attach_pymalloc(pid, &targets, &mut links);
        }
        self.alloc_links.insert(tgid, links);
    }

    /// CPython's allocator probes, at file offsets (the functions are
    /// static: no symbol in a stripped build).
    fn attach_pymalloc(
        &mut self,
        pid: std::num::NonZeroU32,
        targets: &PymallocTargets,
        links: &mut Vec<(&'static str, UProbeLinkId)>,
    ) {
        for (&(program, returns), &entry) in PYMALLOC_PROBES.iter().zip(&targets.entries) {
            // The entry probe where the kernel emulates the instruction; the
            // return probe on the entry itself.
            let skip = emulated_offset_at(&targets.binary, entry);
            let probes: &[(&'static str, u64)] = if returns {
                &[(program, entry + skip), ("pyalloc_exit", entry)]
            } else {
                &[(program, entry + skip)]
            };
            for &(program, offset) in probes {
                match self.uprobe(program).attach(
                    UProbeAttachLocation::AbsoluteOffset(offset),
                    &targets.binary,
                    UProbeScope::OneProcess(pid),
                ) {
                    Ok(link) => links.push((program, link)),
                    Err(e) => {
                        tracing::warn!(pid = pid.get(), program, error = %e, "cannot probe CPython's object allocator");
                    }
                }
            }
        }
    }

    /// Detaches one process's malloc/free probes (it exited).
    pub fn detach_alloc_probes(&mut self, tgid: u32) {
        if self.detach_alloc_links(tgid) {
            self.forget_allocs(tgid);
        }
    }

    /// Whether the process had probes to detach.
    fn detach_alloc_links(&mut self, tgid: u32) -> bool {
        let Some(links) = self.alloc_links.remove(&tgid) else {
            return false;
        };
        for (program, link) in links {
            let _ = self.uprobe(program).detach(link);
        }
        true
    }

    /// Forgets the live heap blocks of a process that exited, so that
    /// respawning workers do not fill the map with the dead ones'.
    fn forget_allocs(&mut self, tgid: u32) {
        let dead: Vec<AllocKey> = self
            .allocs
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.tgid == tgid)
            .collect();
        for key in dead {
            let _ = self.allocs.remove(&key);
        }
    }

    /// Detaches the stack programs, clears the flags and forgets the sites.
    /// Returns how many tracepoint programs it detached.
    pub fn stop_collection(&mut self) -> usize {
        let links = std::mem::take(&mut self.collection_links);
        let detached = links.len();
        for (program, link) in links {
            if let Err(e) = self.tracepoint(program).detach(link) {
                tracing::warn!(program, error = %e, "detaching a collection program failed");
            }
            self.attached
                .retain(|a| !a.starts_with(&format!("{program}@")));
        }
        let probed: Vec<u32> = self.alloc_links.keys().copied().collect();
        for tgid in probed {
            // The blocks all go below.
            self.detach_alloc_links(tgid);
        }
        for tgid in self.watched_tgids() {
            if let Ok(mut stats) = self.procs.get(&tgid, 0)
                && stats.flags & PROC_FLAG_COLLECT != 0
            {
                stats.flags &= !PROC_FLAG_COLLECT;
                let _ = self.procs.insert(tgid, stats, 2);
            }
        }
        self.clear_sites();
        detached
    }

    /// Every (site, count) collected so far.
    pub fn sites(&self) -> Vec<(SiteKey, SiteCount)> {
        self.sites.iter().filter_map(Result::ok).collect()
    }

    /// Drops the sites and live heap samples of processes that exited
    /// (`dead`), while collection goes on: their memory is gone, and their
    /// entries would fill the maps over a long collection with recycled
    /// workers. Stacks are shared between processes and stay.
    pub fn forget_sites_of(&mut self, dead: &std::collections::HashSet<u32>) {
        if dead.is_empty() {
            return;
        }
        let keys: Vec<SiteKey> = self
            .sites
            .keys()
            .filter_map(Result::ok)
            .filter(|k| dead.contains(&k.tgid))
            .collect();
        for key in keys {
            let _ = self.sites.remove(&key);
        }
        let blocks: Vec<AllocKey> = self
            .allocs
            .keys()
            .filter_map(Result::ok)
            .filter(|k| dead.contains(&k.tgid))
            .collect();
        for key in blocks {
            let _ = self.allocs.remove(&key);
        }
    }

    fn clear_sites(&mut self) {
        let keys: Vec<SiteKey> = self.sites.keys().filter_map(Result::ok).collect();
        for key in keys {
            let _ = self.sites.remove(&key);
        }
        let blocks: Vec<AllocKey> = self.allocs.keys().filter_map(Result::ok).collect();
        for key in blocks {
            let _ = self.allocs.remove(&key);
        }
        let ids: Vec<u32> = self.stacks.stack_ids().filter_map(Result::ok).collect();
        for id in ids {
            let _ = self.stacks.remove(&id);
        }
        let py: Vec<u64> = self.py_stacks.keys().filter_map(Result::ok).collect();
        for id in py {
            let _ = self.py_stacks.remove(&id);
        }
    }

    /// The user-space return addresses of a sampled stack, innermost first.
    pub fn stack(&self, stack_id: u32) -> Option<Vec<u64>> {
        let trace = self.stacks.get(&stack_id, 0).ok()?;
        Some(trace.frames().iter().map(|f| f.ip).collect())
    }
}

/// A process name as the kernel's comm: at most 15 bytes, NUL-padded.
pub fn comm_key(name: &str) -> [u8; TASK_COMM_LEN] {
    let mut key = [0u8; TASK_COMM_LEN];
    let bytes = name.as_bytes();
    let n = bytes.len().min(TASK_COMM_LEN - 1);
    key[..n].copy_from_slice(&bytes[..n]);
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comm_key_truncates_like_the_kernel() {
        assert_eq!(&comm_key("gunicorn")[..9], b"gunicorn\0");
        let long = comm_key("a-very-long-process-name");
        assert_eq!(&long[..15], b"a-very-long-pro");
        assert_eq!(long[15], 0);
    }
}
