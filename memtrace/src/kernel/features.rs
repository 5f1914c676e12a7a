//! What this kernel can run, found once at start: tracepoint fields from
//! tracefs, helpers by loading a probe program (aya's feature probes, as
//! libbpf does), struct offsets and function prototypes from the kernel's
//! BTF. Code asks a capability, never the version string: versions appear
//! only in messages. [`KernelFeatures::report`] is what `memtrace check`
//! prints and what the agent logs at start.
use std::path::Path;

use aya::{
    programs::ProgramType,
    sys::{BpfHelper, is_helper_supported},
};
use memtrace_common::{LAYOUT_ABSENT, TracepointLayout};

use super::{
    btf::{BtfAccess, KernelBtf, VMLINUX_BTF},
    tracefs::{Tracefs, TracefsError},
};

/// Comma-separated capabilities to treat as missing (names in
/// [`Hidden`]): for tests and for trying a fallback on a kernel that does
/// not need it.
pub const HIDE_ENV: &str = "MEMTRACE_HIDE_KERNEL_FEATURES";

/// Capabilities that can be hidden with [`HIDE_ENV`].
const HIDEABLE: &[&str] = &[
    "group_dead",
    "sock_tracepoints",
    "sock_fixed_layout",
    "btf",
    "task_btf_helpers",
    "syscall_tracepoints",
    "task_fault_counters",
];

/// The kernels this build serves and the variants it carries, for
/// `memtrace --version`; which variant runs is chosen per kernel at start
/// ([`KernelFeatures::report`], `memtrace check`).
pub const BUILT_FOR: &str = "\
kernels: Linux 5.10 or later, x86_64, with BTF, BPF ring buffers, tracepoints and uprobes
variants built in (the running kernel picks one; `memtrace check` shows which):
  process exit: group_dead (6.16) | task->signal->live (BTF) | main thread's exit
  request mode socket: sock:sock_*_length (6.3) | fexit on tcp_recvmsg/tcp_sendmsg (BTF)
  request modes none, accept, uprobe; HTTP paths (5.15); cgroup filtering (5.14)
  collect growth, heap, pymalloc; Python frames (BTF mapped 6.16 | copied); mmap counters";

/// How the last thread of an exiting process is told (which variant of the
/// exit program runs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitTest {
    /// sched_process_exit's `group_dead` (6.16+).
    GroupDead,
    /// `task->signal->live`, offsets from BTF.
    SignalLive,
    /// The thread-group leader's exit (no BTF).
    Leader,
}

impl ExitTest {
    pub fn program(self) -> &'static str {
        match self {
            Self::GroupDead => "sched_process_exit",
            Self::SignalLive => "sched_process_exit_live",
            Self::Leader => "sched_process_exit_leader",
        }
    }
}

/// Where socket request mode gets a connection's reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SocketSource {
    /// sock:sock_recv_length and sock:sock_send_length (6.3+).
    Tracepoints,
    /// fexit programs on tcp_recvmsg and tcp_sendmsg (BTF, trampolines).
    Fexit,
}

/// The prototype of `tcp_recvmsg`, which says which fexit program reads
/// it (context reads need fixed slots).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpRecvmsg {
    /// `(sk, msg, len, flags[, addr_len])`: 5.19 and later (`addr_len`
    /// went in 6.11).
    Flags,
    /// `(sk, msg, len, nonblock, flags, addr_len)`: before 5.19.
    Nonblock,
}

impl TcpRecvmsg {
    pub fn program(self) -> &'static str {
        match self {
            Self::Flags => "sock_recv_fexit",
            Self::Nonblock => "sock_recv_fexit_nonblock",
        }
    }
}

/// What the kernel's BTF told.
#[derive(Clone, Debug, Default)]
pub struct BtfFacts {
    pub access: Option<BtfAccess>,
    pub task_fsbase: Option<u32>,
    /// (`task_struct.signal`, `signal_struct.live`).
    pub signal_live: Option<(u32, u32)>,
    /// `task_struct.rss_stat` exists: the mm's counters are cached per
    /// thread and flushed every 64 changes (kernels before 6.2).
    pub rss_per_thread_cache: bool,
    /// `tcp_recvmsg`'s prototype, where `tcp_sendmsg`'s is `(sk, msg, size)`.
    pub fexit: Option<TcpRecvmsg>,
    /// Where a process's descriptor table is: per-request `fd_delta`.
    pub fd_table: Option<FdTable>,
    /// Where the kernel keeps a task's fault counters.
    pub fault_counters: Option<FaultCounters>,
}

/// Offsets of the kernel's own fault counters: a thread's
/// (`task_struct.min_flt`/`maj_flt`) and those its process's exited
/// threads left (`signal_struct.min_flt`/`maj_flt`, through
/// `task_struct.signal`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultCounters {
    pub task_signal: u32,
    pub task_min_flt: u32,
    pub task_maj_flt: u32,
    pub signal_min_flt: u32,
    pub signal_maj_flt: u32,
}

/// Offsets of the members that lead from a task to its open-descriptor
/// bitmap, and from a socket to whether it still has a descriptor.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FdTable {
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdt_max_fds: u32,
    pub fdt_open_fds: u32,
    pub sock_socket: u32,
    pub socket_sk: u32,
    pub socket_file: u32,
    /// `file.f_count`, or `file.f_ref` (Linux 6.13+) with `FILE_REF_NEW`.
    pub file_count: u32,
}

/// The capabilities of the running kernel that memtrace's programs use.
#[derive(Clone, Debug)]
pub struct KernelFeatures {
    pub release: String,
    /// Tracepoint field offsets; groups this kernel lacks are `LAYOUT_ABSENT`.
    pub layout: TracepointLayout,
    pub page_fault_event: bool,
    pub btf: BtfFacts,
    /// Why the kernel's BTF could not be read, if it could not.
    pub btf_error: Option<String>,
    /// `bpf_get_current_task_btf` (5.11) and `bpf_task_pt_regs` (5.15).
    pub task_btf_helpers: bool,
    /// `bpf_get_current_ancestor_cgroup_id` in tracepoint programs (5.14).
    pub ancestor_cgroup_helper: bool,
    pub cgroup_v2: bool,
    /// The perf `uprobe` event source (4.17) or tracefs `uprobe_events`.
    pub uprobes: bool,
    /// Capabilities hidden on purpose ([`HIDE_ENV`]).
    pub hidden: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum FeaturesError {
    #[error(transparent)]
    Tracefs(#[from] TracefsError),
    #[error("{HIDE_ENV}: `{0}` is not a capability that can be hidden (one of: {list})", list = HIDEABLE.join(", "))]
    UnknownHidden(String),
}

impl KernelFeatures {
    /// Probes this kernel, minus what [`HIDE_ENV`] hides.
    pub fn probe(tracefs: &Tracefs) -> Result<Self, FeaturesError> {
        let hidden = hidden_from_env()?;
        Ok(Self::probe_with(tracefs, Path::new(VMLINUX_BTF), hidden)?)
    }

    pub fn probe_with(
        tracefs: &Tracefs,
        btf_path: &Path,
        hidden: Vec<String>,
    ) -> Result<Self, TracefsError> {
        let hide = |name: &str| hidden.iter().any(|h| h == name);
        let mut layout = tracefs.layout()?;
        if hide("group_dead") {
            layout.exit_group_dead = LAYOUT_ABSENT;
        }
        if hide("sock_tracepoints") {
            layout.sock_sk = LAYOUT_ABSENT;
        }
        if hide("sock_fixed_layout") {
            layout.sock_fixed = 0;
        }
        if hide("syscall_tracepoints") {
            layout.sys_exit_ret = LAYOUT_ABSENT;
            layout.close_fd = LAYOUT_ABSENT;
        }
        let (mut btf, btf_error) = if hide("btf") {
            (BtfFacts::default(), Some(format!("hidden by {HIDE_ENV}")))
        } else {
            match read_btf(btf_path) {
                Ok(facts) => (facts, None),
                Err(e) => (BtfFacts::default(), Some(e.to_string())),
            }
        };
        if hide("task_fault_counters") {
            btf.fault_counters = None;
        }
        let helper =
            |h: BpfHelper| is_helper_supported(ProgramType::TracePoint, h).unwrap_or(false);
        let task_btf_helpers = !hide("task_btf_helpers")
            && btf_error.is_none()
            && helper(BpfHelper::BPF_FUNC_get_current_task_btf)
            && helper(BpfHelper::BPF_FUNC_task_pt_regs);
        Ok(Self {
            release: kernel_release(),
            layout,
            page_fault_event: tracefs.has_event("exceptions", "page_fault_user"),
            btf,
            btf_error,
            task_btf_helpers,
            ancestor_cgroup_helper: helper(BpfHelper::BPF_FUNC_get_current_ancestor_cgroup_id),
            cgroup_v2: cgroup2_mounted(),
            uprobes: Path::new("/sys/bus/event_source/devices/uprobe").exists()
                || tracefs.root().join("uprobe_events").exists(),
            hidden,
        })
    }

    /// Which exit program this kernel runs.
    pub fn exit_test(&self) -> ExitTest {
        if self.layout.exit_group_dead != LAYOUT_ABSENT {
            ExitTest::GroupDead
        } else if self.btf.signal_live.is_some() {
            ExitTest::SignalLive
        } else {
            ExitTest::Leader
        }
    }

    /// Where socket mode's reads and writes come from, or why it cannot run.
    pub fn socket_source(&self) -> Result<SocketSource, String> {
        let l = &self.layout;
        if [l.state_skaddr, l.state_newstate, l.state_family].contains(&LAYOUT_ABSENT) {
            return Err("the tracepoint sock:inet_sock_set_state is missing".into());
        }
        if ![l.sock_sk, l.sock_family, l.sock_ret, l.sock_flags].contains(&LAYOUT_ABSENT) {
            return Ok(SocketSource::Tracepoints);
        }
        if self.btf.fexit.is_some() {
            return Ok(SocketSource::Fexit);
        }
        Err(format!(
            "the tracepoints sock:sock_recv_length and sock:sock_send_length need Linux 6.3, and the fexit fallback on tcp_recvmsg/tcp_sendmsg needs the kernel's BTF ({})",
            self.btf_error
                .as_deref()
                .unwrap_or("tcp_recvmsg's prototype is not one memtrace knows")
        ))
    }

    /// Whether socket mode can keep each request's method and path.
    pub fn http_paths(&self) -> Result<(), String> {
        self.socket_source()?;
        if self.task_btf_helpers {
            Ok(())
        } else {
            Err("the helpers bpf_get_current_task_btf and bpf_task_pt_regs need Linux 5.15 and the kernel's BTF".into())
        }
    }

    /// The syscall tracepoints of accept mode.
    pub fn accept_events(&self) -> Result<(), String> {
        if self.layout.sys_exit_ret == LAYOUT_ABSENT || self.layout.close_fd == LAYOUT_ABSENT {
            Err("the syscall tracepoints (syscalls:sys_exit_accept4, sys_enter_close) are missing: the kernel needs CONFIG_FTRACE_SYSCALLS".into())
        } else {
            Ok(())
        }
    }

    /// The syscall tracepoints of mmap/munmap/mremap/brk.
    pub fn mmap_events(&self) -> Result<(), String> {
        if self.layout.sys_exit_ret == LAYOUT_ABSENT || self.layout.mmap_len == LAYOUT_ABSENT {
            Err("the syscall tracepoints syscalls:sys_{enter,exit}_{mmap,munmap,mremap,brk} are missing: the kernel needs CONFIG_FTRACE_SYSCALLS".into())
        } else {
            Ok(())
        }
    }

    /// The growth tier: page-fault and mmap/brk stacks.
    pub fn growth_tier(&self) -> Result<(), String> {
        if !self.page_fault_event {
            return Err(
                "the tracepoint exceptions:page_fault_user is missing (x86_64 only)".into(),
            );
        }
        self.mmap_events()
    }

    /// The heap and pymalloc tiers: growth plus uprobes.
    pub fn heap_tier(&self) -> Result<(), String> {
        self.growth_tier()?;
        self.uprobe_mode()
    }

    pub fn uprobe_mode(&self) -> Result<(), String> {
        if self.uprobes {
            Ok(())
        } else {
            Err("uprobes are missing: the kernel needs CONFIG_UPROBE_EVENTS".into())
        }
    }

    pub fn python_frames(&self) -> Result<(), String> {
        match (self.btf.task_fsbase, &self.btf_error) {
            (Some(_), _) => Ok(()),
            (None, Some(e)) => Err(format!(
                "the thread pointer of a task comes from the kernel's BTF: {e}"
            )),
            (None, None) => Err("the kernel's BTF has no task_struct.thread.fsbase".into()),
        }
    }

    /// Per-request open-descriptor counts (`fd_delta`).
    pub fn fd_counts(&self) -> Result<(), String> {
        match (self.btf.fd_table, &self.btf_error) {
            (Some(_), _) => Ok(()),
            (None, Some(e)) => Err(format!(
                "the descriptor table's place in a task comes from the kernel's BTF: {e}"
            )),
            (None, None) => Err(
                "the kernel's BTF lacks task_struct.files, files_struct.fdt, fdtable.open_fds, socket.sk or file.f_ref/f_count"
                    .into(),
            ),
        }
    }

    pub fn cgroup_filter(&self) -> Result<(), String> {
        if !self.ancestor_cgroup_helper {
            Err(
                "tracepoint programs may call bpf_get_current_ancestor_cgroup_id from Linux 5.14"
                    .into(),
            )
        } else if !self.cgroup_v2 {
            Err("no cgroup v2 hierarchy is mounted (cgroup v1 hosts cannot be filtered in the kernel)".into())
        } else {
            Ok(())
        }
    }

    /// Every feature, for people and scripts.
    pub fn report(&self) -> Vec<FeatureRow> {
        let row = |name: &'static str, result: Result<String, String>| match result {
            Ok(how) => FeatureRow {
                feature: name,
                works: true,
                how,
                why_not: None,
            },
            Err(why) => FeatureRow {
                feature: name,
                works: false,
                how: String::new(),
                why_not: Some(why),
            },
        };
        let exit = match self.exit_test() {
            ExitTest::GroupDead => "process exit from sched_process_exit's group_dead".to_string(),
            ExitTest::SignalLive => {
                "process exit from task->signal->live (BTF; group_dead needs Linux 6.16)".into()
            }
            ExitTest::Leader => format!(
                "approximate: a process ends when its main thread exits (group_dead needs Linux 6.16, task->signal->live the kernel's BTF: {})",
                self.btf_error.as_deref().unwrap_or("absent")
            ),
        };
        let rss = if self.btf.rss_per_thread_cache {
            "approximate: this kernel caches RSS per thread and reports it every 64 page changes (exact from Linux 6.2); slopes over many requests are exact, one request's RSS delta may be off by up to 64 pages per thread".to_string()
        } else if self.btf.access.is_some() {
            "exact: kmem:rss_stat reports the mm's counters".into()
        } else {
            "kmem:rss_stat (without BTF memtrace cannot tell whether this kernel batches it per thread, as kernels before 6.2 do)".into()
        };
        let faults = match self.btf.fault_counters {
            Some(_) => "the kernel's per-task counters, read at each request's ends and at exit (BTF): no program per fault".to_string(),
            None => format!(
                "exceptions:page_fault_user, a program on every fault (the per-task counters' place comes from the kernel's BTF: {})",
                self.btf_error.as_deref().unwrap_or("task_struct.min_flt or signal_struct.min_flt is missing")
            ),
        };
        vec![
            row("process tracking", Ok(exit)),
            row("rss accounting", Ok(rss)),
            row("page fault counts", Ok(faults)),
            row("request mode none", Ok("steady state".into())),
            row(
                "request mode accept",
                self.accept_events().map(|()| "syscall tracepoints".into()),
            ),
            row(
                "request mode socket",
                self.socket_source().map(|s| match s {
                    SocketSource::Tracepoints => "sock:sock_recv_length/sock_send_length".into(),
                    SocketSource::Fexit => {
                        "fexit on tcp_recvmsg/tcp_sendmsg (sock:sock_*_length need Linux 6.3)"
                            .into()
                    }
                }),
            ),
            row(
                "request mode uprobe",
                self.uprobe_mode().map(|()| "uprobes".into()),
            ),
            row(
                "request fd counts",
                self.fd_counts().map(|()| {
                    "open descriptors at each end, from the descriptor table's bitmap (BTF); tables over 4096 descriptors are not counted".into()
                }),
            ),
            row(
                "http path capture",
                self.http_paths()
                    .map(|()| "socket mode's first read".into()),
            ),
            row(
                "collect growth",
                self.growth_tier()
                    .map(|()| "page faults and mmap/brk".into()),
            ),
            row(
                "collect heap",
                self.heap_tier()
                    .map(|()| "C library allocator uprobes".into()),
            ),
            row(
                "collect pymalloc",
                self.heap_tier()
                    .map(|()| "CPython object allocator uprobes".into()),
            ),
            row(
                "python frames",
                self.python_frames().map(|()| match self.btf.access {
                    Some(BtfAccess::Copied) => {
                        "BTF copied to memory (mapping it needs Linux 6.16)".into()
                    }
                    _ => "BTF mapped".into(),
                }),
            ),
            row(
                "cgroup filtering",
                self.cgroup_filter().map(|()| "cgroup v2 ancestors".into()),
            ),
            row(
                "mmap counters",
                self.mmap_events().map(|()| "syscall tracepoints".into()),
            ),
        ]
    }
}

/// One line of `memtrace check`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct FeatureRow {
    pub feature: &'static str,
    pub works: bool,
    /// How it works here (which variant), when it does.
    pub how: String,
    /// What is missing, and from which kernel it works, when it does not.
    pub why_not: Option<String>,
}

fn hidden_from_env() -> Result<Vec<String>, FeaturesError> {
    let Ok(value) = std::env::var(HIDE_ENV) else {
        return Ok(Vec::new());
    };
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|name| {
            if HIDEABLE.contains(&name) {
                Ok(name.to_string())
            } else {
                Err(FeaturesError::UnknownHidden(name.to_string()))
            }
        })
        .collect()
}

/// Whether a cgroup v2 hierarchy is mounted anywhere (unified, or hybrid
/// beside v1 controllers).
fn cgroup2_mounted() -> bool {
    std::fs::read_to_string("/proc/self/mounts").is_ok_and(|m| {
        m.lines()
            .any(|l| l.split_whitespace().nth(2) == Some("cgroup2"))
    })
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// Everything memtrace reads from the kernel's BTF, in one open.
fn read_btf(path: &Path) -> Result<BtfFacts, super::btf::BtfError> {
    let btf = KernelBtf::open(path)?;
    let signal_live = match (
        btf.member_offset("task_struct", "signal"),
        btf.member_offset("signal_struct", "live"),
    ) {
        (Ok(signal), Ok(live)) => Some((signal, live)),
        _ => None,
    };
    let fd_table = (|| {
        Some(FdTable {
            task_files: btf.member_offset("task_struct", "files").ok()?,
            files_fdt: btf.member_offset("files_struct", "fdt").ok()?,
            fdt_max_fds: btf.member_offset("fdtable", "max_fds").ok()?,
            fdt_open_fds: btf.member_offset("fdtable", "open_fds").ok()?,
            sock_socket: btf.member_offset("sock", "sk_socket").ok()?,
            socket_sk: btf.member_offset("socket", "sk").ok()?,
            socket_file: btf.member_offset("socket", "file").ok()?,
            file_count: btf
                .member_offset("file", "f_ref")
                .map(|o| o | memtrace_common::FILE_REF_NEW)
                .or_else(|_| btf.member_offset("file", "f_count"))
                .ok()?,
        })
    })();
    let fault_counters = (|| {
        Some(FaultCounters {
            task_signal: btf.member_offset("task_struct", "signal").ok()?,
            task_min_flt: btf.member_offset("task_struct", "min_flt").ok()?,
            task_maj_flt: btf.member_offset("task_struct", "maj_flt").ok()?,
            signal_min_flt: btf.member_offset("signal_struct", "min_flt").ok()?,
            signal_maj_flt: btf.member_offset("signal_struct", "maj_flt").ok()?,
        })
    })();
    Ok(BtfFacts {
        access: Some(btf.access),
        fd_table,
        fault_counters,
        task_fsbase: btf.member_offset("task_struct", "thread.fsbase").ok(),
        signal_live,
        rss_per_thread_cache: btf.member_offset("task_struct", "rss_stat").is_ok(),
        fexit: fexit_prototypes(
            &btf.function_params("tcp_recvmsg").unwrap_or_default(),
            &btf.function_params("tcp_sendmsg").unwrap_or_default(),
        ),
    })
}

/// Which fexit program reads `tcp_recvmsg`, if both prototypes are ones the
/// programs know: anything else is refused, not guessed.
pub fn fexit_prototypes(recv: &[String], send: &[String]) -> Option<TcpRecvmsg> {
    fn names(list: &[String]) -> Vec<&str> {
        list.iter().map(String::as_str).collect()
    }
    if names(send) != ["sk", "msg", "size"] {
        return None;
    }
    match names(recv).as_slice() {
        ["sk", "msg", "len", "flags"] | ["sk", "msg", "len", "flags", "addr_len"] => {
            Some(TcpRecvmsg::Flags)
        }
        ["sk", "msg", "len", "nonblock", "flags", "addr_len"] => Some(TcpRecvmsg::Nonblock),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn fexit_programs_follow_both_tcp_recvmsg_prototypes() {
        let send = names(&["sk", "msg", "size"]);
        let old = names(&["sk", "msg", "len", "nonblock", "flags", "addr_len"]);
        assert_eq!(fexit_prototypes(&old, &send), Some(TcpRecvmsg::Nonblock));
        let new = names(&["sk", "msg", "len", "flags", "addr_len"]);
        assert_eq!(fexit_prototypes(&new, &send), Some(TcpRecvmsg::Flags));
        let newest = names(&["sk", "msg", "len", "flags"]);
        assert_eq!(fexit_prototypes(&newest, &send), Some(TcpRecvmsg::Flags));
        // Unknown shapes are refused, not guessed.
        assert_eq!(fexit_prototypes(&names(&["msg", "sk"]), &send), None);
        assert_eq!(fexit_prototypes(&new, &names(&["sk", "msg"])), None);
        assert_eq!(fexit_prototypes(&[], &send), None);
    }

    #[test]
    fn this_kernels_btf_answers_every_question() {
        let btf = read_btf(Path::new(VMLINUX_BTF)).expect("this kernel has BTF");
        assert!(btf.task_fsbase.is_some());
        assert!(btf.signal_live.is_some());
        assert!(btf.fexit.is_some(), "tcp_recvmsg's prototype");
    }
}
