//! tracefs: making sure it is mounted, and reading tracepoint formats so the
//! programs use the field offsets of the running kernel, not a table.
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use memtrace_common::TracepointLayout;

/// Where tracefs lives on current kernels, and where older setups reach it.
pub const TRACEFS_DIRS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

#[derive(Debug, thiserror::Error)]
pub enum TracefsError {
    #[error(
        "tracefs is not mounted and mounting it failed ({source}): run `mount -t tracefs nodev /sys/kernel/tracing` as root"
    )]
    MountFailed {
        #[source]
        source: nix::Error,
    },
    #[error(
        "tracefs is not mounted: run `mount -t tracefs nodev /sys/kernel/tracing` as root (or drop --no-mount-tracefs)"
    )]
    NotMounted,
    #[error(
        "tracepoint {event} is not available in this kernel ({path}): memtrace needs it; check that the kernel has CONFIG_TRACEPOINTS and the event's subsystem"
    )]
    MissingEvent { event: String, path: PathBuf },
    #[error("tracepoint {event} has no field `{field}` in this kernel")]
    MissingField { event: String, field: String },
    #[error("tracepoint {event}: field `{field}` is {size} bytes, memtrace reads {expected}")]
    FieldSize {
        event: String,
        field: String,
        size: u32,
        expected: u32,
    },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One field of a tracepoint record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field {
    pub offset: u32,
    pub size: u32,
    pub signed: bool,
}

/// The parsed `format` file of one tracepoint: fields by name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EventFormat {
    pub fields: HashMap<String, Field>,
}

/// Parses a tracepoint `format` file. Lines that are not field descriptions
/// (name, ID, print fmt) are ignored; malformed field lines are skipped.
pub fn parse_format(text: &str) -> EventFormat {
    let mut fields = HashMap::new();
    for line in text.lines() {
        let line = line.trim();
        let Some(rest) = line.strip_prefix("field:") else {
            continue;
        };
        let mut decl = None;
        let mut offset = None;
        let mut size = None;
        let mut signed = false;
        for (i, part) in rest.split(';').enumerate() {
            let part = part.trim();
            if i == 0 {
                decl = Some(part);
            } else if let Some(v) = part.strip_prefix("offset:") {
                offset = v.trim().parse::<u32>().ok();
            } else if let Some(v) = part.strip_prefix("size:") {
                size = v.trim().parse::<u32>().ok();
            } else if let Some(v) = part.strip_prefix("signed:") {
                signed = v.trim() == "1";
            }
        }
        let (Some(decl), Some(offset), Some(size)) = (decl, offset, size) else {
            continue;
        };
        if let Some(name) = field_name(decl) {
            fields.insert(
                name.to_string(),
                Field {
                    offset,
                    size,
                    signed,
                },
            );
        }
    }
    EventFormat { fields }
}

/// The name in a C declaration such as `unsigned long len`, `char comm[16]`
/// or `__data_loc char[] filename`.
fn field_name(decl: &str) -> Option<&str> {
    // A type and a name at least: `int ` alone declares nothing.
    let mut words = decl.split_whitespace();
    words.next()?;
    let last = words.last()?;
    let name = last.split('[').next()?;
    let name = name.trim_start_matches('*');
    (!name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        .then_some(name)
}

/// A mounted tracefs.
#[derive(Clone, Debug)]
pub struct Tracefs {
    root: PathBuf,
}

impl Tracefs {
    /// Finds tracefs, mounting it at /sys/kernel/tracing when allowed.
    pub fn ensure(mount_if_missing: bool) -> Result<Self, TracefsError> {
        if let Some(root) = Self::find() {
            return Ok(Self { root });
        }
        if !mount_if_missing {
            return Err(TracefsError::NotMounted);
        }
        nix::mount::mount(
            Some("nodev"),
            TRACEFS_DIRS[0],
            Some("tracefs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|source| TracefsError::MountFailed { source })?;
        tracing::info!(path = TRACEFS_DIRS[0], "mounted tracefs");
        Self::find()
            .map(|root| Self { root })
            .ok_or(TracefsError::NotMounted)
    }

    fn find() -> Option<PathBuf> {
        TRACEFS_DIRS
            .iter()
            .map(PathBuf::from)
            .find(|dir| dir.join("events").is_dir())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn has_event(&self, category: &str, name: &str) -> bool {
        self.root.join("events").join(category).join(name).is_dir()
    }

    pub fn format(&self, category: &str, name: &str) -> Result<EventFormat, TracefsError> {
        let path = self
            .root
            .join("events")
            .join(category)
            .join(name)
            .join("format");
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(parse_format(&text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(TracefsError::MissingEvent {
                event: format!("{category}:{name}"),
                path,
            }),
            Err(source) => Err(TracefsError::Io { path, source }),
        }
    }

    /// Reads the offsets of every field the programs use. The steady-state
    /// events are required; a group of optional ones that this kernel lacks
    /// (`group_dead`, the syscall events, the socket events) is left
    /// `LAYOUT_ABSENT`, and the loader does not load the programs that read
    /// it.
    pub fn layout(&self) -> Result<TracepointLayout, TracefsError> {
        let rss = Lookup::new(self, "kmem", "rss_stat")?;
        let newtask = Lookup::new(self, "task", "task_newtask")?;
        let exec = Lookup::new(self, "sched", "sched_process_exec")?;
        let exit = Lookup::new(self, "sched", "sched_process_exit")?;
        let absent = memtrace_common::LAYOUT_ABSENT;
        let mut layout = TracepointLayout {
            rss_mm_id: rss.get("mm_id", 4)?,
            rss_curr: rss.get("curr", 4)?,
            rss_member: rss.get("member", 4)?,
            rss_size: rss.get("size", 8)?,
            newtask_pid: newtask.get("pid", 4)?,
            newtask_clone_flags: newtask.get("clone_flags", 8)?,
            exec_filename: exec.get("filename", 4)?,
            exec_pid: exec.get("pid", 4)?,
            exec_old_pid: exec.get("old_pid", 4)?,
            exit_pid: exit.get("pid", 4)?,
            // Linux 6.16 and later; before, another exit program variant.
            exit_group_dead: exit.get("group_dead", 1).unwrap_or(absent),
            ..self.socket_layout()
        };
        if self.syscall_layout(&mut layout).is_err() {
            for field in [
                &mut layout.mmap_len,
                &mut layout.munmap_len,
                &mut layout.brk_arg,
                &mut layout.mremap_old_len,
                &mut layout.mremap_new_len,
                &mut layout.sys_exit_ret,
                &mut layout.close_fd,
            ] {
                *field = absent;
            }
        }
        Ok(layout)
    }

    /// Offsets of the syscall events (mmap, munmap, brk, mremap, the exits'
    /// `ret`, close's `fd`), written into `layout`; an error where this
    /// kernel has no syscall tracepoints (CONFIG_FTRACE_SYSCALLS) or lays
    /// them out otherwise.
    fn syscall_layout(&self, layout: &mut TracepointLayout) -> Result<(), TracefsError> {
        let mmap = Lookup::new(self, "syscalls", "sys_enter_mmap")?;
        let mremap = Lookup::new(self, "syscalls", "sys_enter_mremap")?;
        layout.mmap_len = mmap.get("len", 8)?;
        layout.munmap_len = Lookup::new(self, "syscalls", "sys_enter_munmap")?.get("len", 8)?;
        layout.brk_arg = Lookup::new(self, "syscalls", "sys_enter_brk")?.get("brk", 8)?;
        layout.mremap_old_len = mremap.get("old_len", 8)?;
        layout.mremap_new_len = mremap.get("new_len", 8)?;
        layout.sys_exit_ret = Lookup::new(self, "syscalls", "sys_exit_mmap")?.get("ret", 8)?;
        layout.close_fd = Lookup::new(self, "syscalls", "sys_enter_close")?.get("fd", 8)?;
        // Every sys_exit_* record has the same layout; the programs read `ret`
        // at one offset for mmap, munmap, mremap, brk and accept.
        for name in [
            "sys_exit_munmap",
            "sys_exit_mremap",
            "sys_exit_brk",
            "sys_exit_accept4",
            "sys_exit_accept",
        ] {
            let offset = Lookup::new(self, "syscalls", name)?.get("ret", 8)?;
            if offset != layout.sys_exit_ret {
                return Err(TracefsError::MissingField {
                    event: format!("syscalls:{name}"),
                    field: format!("ret at offset {}", layout.sys_exit_ret),
                });
            }
        }
        // close_enter also serves sys_enter_shutdown: same `fd` offset.
        let shutdown = Lookup::new(self, "syscalls", "sys_enter_shutdown")?;
        if shutdown.get("fd", 8)? != layout.close_fd {
            return Err(TracefsError::MissingField {
                event: "syscalls:sys_enter_shutdown".into(),
                field: format!("fd at offset {}", layout.close_fd),
            });
        }
        Ok(())
    }
}

impl Tracefs {
    /// Offsets of the socket events (socket request mode), or
    /// `LAYOUT_ABSENT` where this kernel lacks them or lays them out
    /// otherwise (then socket mode is refused, naming the event).
    fn socket_layout(&self) -> TracepointLayout {
        let absent = memtrace_common::LAYOUT_ABSENT;
        let io = || -> Result<[u32; 4], TracefsError> {
            let recv = Lookup::new(self, "sock", "sock_recv_length")?;
            let send = Lookup::new(self, "sock", "sock_send_length")?;
            let fields = [
                recv.get("sk", 8)?,
                recv.get("family", 2)?,
                recv.get("ret", 4)?,
                recv.get("flags", 4)?,
            ];
            // One program layout serves both events.
            let same = fields
                == [
                    send.get("sk", 8)?,
                    send.get("family", 2)?,
                    send.get("ret", 4)?,
                    send.get("flags", 4)?,
                ];
            Ok(if same { fields } else { [absent; 4] })
        };
        let state = || -> Result<[u32; 3], TracefsError> {
            let s = Lookup::new(self, "sock", "inet_sock_set_state")?;
            Ok([
                s.get("skaddr", 8)?,
                s.get("newstate", 4)?,
                s.get("family", 2)?,
            ])
        };
        let io = io().unwrap_or([absent; 4]);
        let state = state().unwrap_or([absent; 3]);
        let [sock_sk, sock_family, sock_ret, sock_flags] = io;
        let [state_skaddr, state_newstate, state_family] = state;
        // Kernels before 6.3 read with fexit programs: only the state
        // event's layout matters there.
        let io_fixed = io == memtrace_common::SOCK_IO_FIXED || io == [absent; 4];
        TracepointLayout {
            sock_fixed: u32::from(io_fixed && state == memtrace_common::SOCK_STATE_FIXED),
            sock_sk,
            sock_family,
            sock_ret,
            sock_flags,
            state_skaddr,
            state_newstate,
            state_family,
            ..TracepointLayout::default()
        }
    }
}

struct Lookup {
    event: String,
    format: EventFormat,
}

impl Lookup {
    fn new(tracefs: &Tracefs, category: &str, name: &str) -> Result<Self, TracefsError> {
        Ok(Self {
            event: format!("{category}:{name}"),
            format: tracefs.format(category, name)?,
        })
    }

    fn get(&self, field: &str, expected_size: u32) -> Result<u32, TracefsError> {
        let f = self
            .format
            .fields
            .get(field)
            .ok_or_else(|| TracefsError::MissingField {
                event: self.event.clone(),
                field: field.to_string(),
            })?;
        if f.size != expected_size {
            return Err(TracefsError::FieldSize {
                event: self.event.clone(),
                field: field.to_string(),
                size: f.size,
                expected: expected_size,
            });
        }
        Ok(f.offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RSS_STAT: &str = "name: rss_stat
ID: 520
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned int mm_id;\toffset:8;\tsize:4;\tsigned:0;
\tfield:unsigned int curr;\toffset:12;\tsize:4;\tsigned:0;
\tfield:int member;\toffset:16;\tsize:4;\tsigned:1;
\tfield:long size;\toffset:24;\tsize:8;\tsigned:1;

print fmt: \"mm_id=%u curr=%d type=%s size=%ldB\", REC->mm_id, REC->curr
";

    #[test]
    fn parses_rss_stat_fields() {
        let f = parse_format(RSS_STAT);
        assert_eq!(
            f.fields["mm_id"],
            Field {
                offset: 8,
                size: 4,
                signed: false
            }
        );
        assert_eq!(f.fields["member"].offset, 16);
        assert!(f.fields["size"].signed);
        assert_eq!(f.fields["size"].offset, 24);
        assert_eq!(f.fields.len(), 6);
    }

    #[test]
    fn parses_arrays_and_data_loc() {
        let f = parse_format(
            "\tfield:char comm[16];\toffset:8;\tsize:16;\tsigned:0;\n\
             \tfield:__data_loc char[] filename;\toffset:8;\tsize:4;\tsigned:0;\n\
             \tfield:const char * name;\toffset:24;\tsize:8;\tsigned:0;",
        );
        assert_eq!(f.fields["comm"].size, 16);
        assert_eq!(f.fields["filename"].size, 4);
        assert_eq!(f.fields["name"].offset, 24);
    }

    #[test]
    fn skips_garbage_lines() {
        let f = parse_format(
            "field:\nfield:int x;offset:abc;size:4;\nfield:int ;offset:1;size:4;\nhello",
        );
        assert!(f.fields.is_empty());
    }

    /// A tracefs with the three socket events, `family` of the read and
    /// write events at `io_family`.
    fn fake_socket_events(io_family: u32) -> (std::path::PathBuf, Tracefs) {
        let root = std::env::temp_dir().join(format!(
            "memtrace-tracefs-{}-{io_family}",
            std::process::id()
        ));
        let io = format!(
            "format:\n\tfield:void * sk;\toffset:8;\tsize:8;\tsigned:0;\n\
             \tfield:__u16 family;\toffset:{io_family};\tsize:2;\tsigned:0;\n\
             \tfield:int ret;\toffset:20;\tsize:4;\tsigned:1;\n\
             \tfield:int flags;\toffset:24;\tsize:4;\tsigned:1;\n"
        );
        let state = "format:\n\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;\n\
             \tfield:int oldstate;\toffset:16;\tsize:4;\tsigned:1;\n\
             \tfield:int newstate;\toffset:20;\tsize:4;\tsigned:1;\n\
             \tfield:__u16 family;\toffset:28;\tsize:2;\tsigned:0;\n";
        for (name, text) in [
            ("sock_recv_length", io.as_str()),
            ("sock_send_length", io.as_str()),
            ("inet_sock_set_state", state),
        ] {
            let dir = root.join("events/sock").join(name);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("format"), text).unwrap();
        }
        (root.clone(), Tracefs { root })
    }

    #[test]
    fn socket_fields_load_straight_only_at_the_layout_every_kernel_has() {
        let (dir, fixed) = fake_socket_events(16);
        let l = fixed.socket_layout();
        assert_eq!(
            [l.sock_sk, l.sock_family, l.sock_ret, l.sock_flags],
            memtrace_common::SOCK_IO_FIXED
        );
        assert_eq!(
            [l.state_skaddr, l.state_newstate, l.state_family],
            memtrace_common::SOCK_STATE_FIXED
        );
        assert_eq!(l.sock_fixed, 1);
        std::fs::remove_dir_all(dir).unwrap();
        // A kernel that moved a field: the programs read at tracefs's
        // offsets, with helper calls.
        let (dir, moved) = fake_socket_events(18);
        let l = moved.socket_layout();
        assert_eq!((l.sock_family, l.sock_fixed), (18, 0));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
