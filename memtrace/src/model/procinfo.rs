//! What /proc says about a process: identity (for matching and for telling a
//! recycled pid from the process we know), and memory figures the kernel
//! programs do not give (PSS, USS, per-mapping sizes, fds, threads).
use std::path::PathBuf;

use procfs::process::Process;
use serde::Serialize;

use crate::procmaps::MapPath;

/// Identity of a process, read once when it is found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcessView {
    pub pid: u32,
    pub ppid: u32,
    pub comm: String,
    pub exe: Option<PathBuf>,
    pub cmdline: Vec<String>,
    /// Start time in clock ticks after boot: with the pid, it names one process.
    pub start_time: u64,
}

pub fn page_size() -> u64 {
    procfs::page_size()
}

/// Reads a process's identity; None when it is gone, a zombie, or a kernel
/// thread.
pub fn view(pid: u32) -> Option<ProcessView> {
    let process = Process::new(pid as i32).ok()?;
    let stat = process.stat().ok()?;
    if is_dead_state(stat.state) || stat.flags & PF_KTHREAD != 0 {
        return None;
    }
    Some(ProcessView {
        pid,
        ppid: stat.ppid as u32,
        comm: stat.comm.clone(),
        exe: process.exe().ok(),
        cmdline: process.cmdline().unwrap_or_default(),
        start_time: stat.starttime,
    })
}

/// `PF_KTHREAD` in /proc/PID/stat's flags.
const PF_KTHREAD: u32 = 0x0020_0000;

/// Zombie or dead: exited, only the /proc entry is left.
fn is_dead_state(state: char) -> bool {
    matches!(state, 'Z' | 'X' | 'x')
}

/// Start time of a live pid now, to check it is still the process we know.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = Process::new(pid as i32).ok()?.stat().ok()?;
    (!is_dead_state(stat.state)).then_some(stat.starttime)
}

/// Every process on the machine (kernel threads included; they never match).
pub fn all_pids() -> Vec<u32> {
    let Ok(iter) = procfs::process::all_processes() else {
        return Vec::new();
    };
    iter.filter_map(Result::ok)
        .map(|p| p.pid() as u32)
        .collect()
}

/// RSS by member from /proc/PID/status (the kernel's counters, read
/// approximately: per-CPU deltas may be missing, up to ~190 kB here).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct StatusMemory {
    pub rss_file: u64,
    pub rss_anon: u64,
    pub rss_shmem: u64,
    pub swap: u64,
    pub threads: u64,
    /// VmData: private writable mappings (heap, anonymous mmaps, stacks).
    pub vm_data: u64,
}

pub fn status_memory(pid: u32) -> Option<StatusMemory> {
    let status = Process::new(pid as i32).ok()?.status().ok()?;
    Some(StatusMemory {
        rss_file: status.rssfile.unwrap_or(0) * 1024,
        rss_anon: status.rssanon.unwrap_or(0) * 1024,
        rss_shmem: status.rssshmem.unwrap_or(0) * 1024,
        swap: status.vmswap.unwrap_or(0) * 1024,
        threads: status.threads,
        vm_data: status.vmdata.unwrap_or(0) * 1024,
    })
}

/// Totals from /proc/PID/smaps_rollup, in bytes: the ground truth for RSS,
/// and the only source of PSS and USS.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Rollup {
    pub rss: u64,
    pub pss: u64,
    pub pss_anon: u64,
    pub pss_file: u64,
    pub pss_shmem: u64,
    /// Private_Clean + Private_Dirty: what exiting would free.
    pub uss: u64,
    pub anonymous: u64,
    pub swap: u64,
}

pub fn smaps_rollup(pid: u32) -> Option<Rollup> {
    let rollup = Process::new(pid as i32).ok()?.smaps_rollup().ok()?;
    let map = rollup.memory_map_rollup.0.first()?;
    let get = |k: &str| map.extension.map.get(k).copied().unwrap_or(0);
    Some(Rollup {
        rss: get("Rss"),
        pss: get("Pss"),
        pss_anon: get("Pss_Anon"),
        pss_file: get("Pss_File"),
        pss_shmem: get("Pss_Shmem"),
        uss: get("Private_Clean") + get("Private_Dirty"),
        anonymous: get("Anonymous"),
        swap: get("Swap"),
    })
}

/// Resident bytes from /proc/PID/statm (the kernel's RSS counters, one
/// small read): for processes memtrace does not count itself.
pub fn statm_rss(pid: u32) -> Option<u64> {
    let statm = Process::new(pid as i32).ok()?.statm().ok()?;
    Some(statm.resident * procfs::page_size())
}

pub fn fd_count(pid: u32) -> Option<usize> {
    Process::new(pid as i32).ok()?.fd_count().ok()
}

/// End of the `[heap]` mapping: the program break, page-aligned (glibc moves
/// it in whole pages). None when the process has no heap yet.
pub fn heap_end(pid: u32) -> Option<u64> {
    crate::procmaps::read(pid)?
        .iter()
        .find_map(|m| (m.path == MapPath::Heap).then_some(m.end))
}

/// A process's file mappings, read from `/proc/PID/maps` on the first
/// question and kept for the next ones: setting up a new worker asks
/// several (which interpreter, where it is loaded, its code ranges).
/// A process that is gone or unreadable has no mappings.
pub struct FileMappings {
    pid: u32,
    maps: std::cell::OnceCell<Vec<crate::procmaps::Mapping>>,
}

/// The root directory of a chrooted process, as this agent sees it (`None`
/// for `/`). /proc shows a process's files from the reader's root, so a
/// chrooted process's paths start with it.
pub fn chroot_of(pid: u32) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/root"))
        .ok()
        .filter(|r| r != std::path::Path::new("/"))
}

/// `path` (as /proc shows it to this agent) as the process sees it, under
/// its root `root`: what to open through /proc/PID/root, and how the
/// process names its own files (code objects' file names).
pub fn in_root(root: &std::path::Path, path: &std::path::Path) -> PathBuf {
    match path.strip_prefix(root) {
        Ok(inside) => std::path::Path::new("/").join(inside),
        Err(_) => path.to_path_buf(),
    }
}

impl FileMappings {
    pub fn of(pid: u32) -> Self {
        Self {
            pid,
            maps: Default::default(),
        }
    }

    /// (start, end, file offset, executable, path) of every mapping of a file.
    fn files(&self) -> impl Iterator<Item = (u64, u64, u64, bool, &std::path::Path)> {
        self.maps
            .get_or_init(|| {
                let mut maps = crate::procmaps::read(self.pid).unwrap_or_default();
                if let Some(root) = chroot_of(self.pid) {
                    for m in &mut maps {
                        if let MapPath::File(p) = &mut m.path {
                            *p = in_root(&root, p);
                        }
                    }
                }
                maps
            })
            .iter()
            .filter_map(|m| Some((m.start, m.end, m.offset, m.executable(), m.file()?)))
    }

    /// The paths of the mapped files, in address order, with repeats.
    pub fn paths(&self) -> impl Iterator<Item = &std::path::Path> {
        self.files().map(|(.., path)| path)
    }

    /// Where the first page of `file` (offset 0) is mapped.
    pub fn start_of(&self, file: &std::path::Path) -> Option<u64> {
        self.files()
            .find(|&(_, _, offset, _, path)| offset == 0 && path == file)
            .map(|(start, ..)| start)
    }

    /// The executable mappings of `file`: (start, end, file offset).
    pub fn code_of(&self, file: &std::path::Path) -> Vec<(u64, u64, u64)> {
        self.files()
            .filter(|&(.., exec, path)| exec && path == file)
            .map(|(start, end, offset, ..)| (start, end, offset))
            .collect()
    }
}

/// Resident and anonymous bytes of one group of mappings in /proc/PID/smaps.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MappingUsage {
    /// `[heap]`, `[stack]`, `[anon]` (all anonymous regions together), or a file path.
    pub name: String,
    pub rss: u64,
    pub anonymous: u64,
    pub size: u64,
    pub regions: u64,
}

/// An executable file mapping of a process, for profiles (pprof's Mapping).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CodeMapping {
    pub start: u64,
    pub limit: u64,
    pub file_offset: u64,
    /// The path as the process sees it.
    pub path: String,
    /// The GNU build id, hex, when the object has one.
    pub build_id: Option<String>,
}

/// The executable file mappings of a process, with build ids read from the
/// objects (through /proc/PID/root, so a container's own files are read).
pub fn code_mappings(pid: u32) -> Vec<CodeMapping> {
    let Some(maps) = crate::procmaps::read(pid) else {
        return Vec::new();
    };
    let mut build_ids: std::collections::HashMap<PathBuf, Option<String>> = Default::default();
    maps.iter()
        .filter(|m| m.executable())
        .filter_map(|m| {
            let p = m.file()?;
            let build_id = build_ids
                .entry(p.to_path_buf())
                .or_insert_with(|| {
                    let relative = p.strip_prefix("/").unwrap_or(p);
                    build_id(&PathBuf::from(format!("/proc/{pid}/root")).join(relative))
                })
                .clone();
            Some(CodeMapping {
                start: m.start,
                limit: m.end,
                file_offset: m.offset,
                path: p.display().to_string(),
                build_id,
            })
        })
        .collect()
}

/// The GNU build id of an ELF object, in hex.
pub fn build_id(path: &std::path::Path) -> Option<String> {
    use object::Object as _;
    let data = crate::bounds::read_object(path).ok()?;
    let file = object::File::parse(&*data).ok()?;
    let id = file.build_id().ok()??;
    Some(id.iter().map(|b| format!("{b:02x}")).collect())
}

/// Per-mapping sizes, anonymous regions grouped together, largest RSS first.
pub fn mappings(pid: u32) -> Option<Vec<MappingUsage>> {
    let maps = crate::procmaps::read_smaps(pid)?;
    let mut groups: std::collections::BTreeMap<String, MappingUsage> = Default::default();
    for (m, figures) in maps {
        let name = match &m.path {
            MapPath::File(p) => p.display().to_string(),
            MapPath::Heap => "[heap]".into(),
            MapPath::Stack => "[stack]".into(),
            MapPath::Vdso => "[vdso]".into(),
            MapPath::Anonymous => "[anon]".into(),
            MapPath::Other(o) => o.clone(),
        };
        let get = |k: &str| figures.get(k).copied().unwrap_or(0);
        let entry = groups.entry(name.clone()).or_insert_with(|| MappingUsage {
            name,
            ..Default::default()
        });
        entry.rss += get("Rss");
        entry.anonymous += get("Anonymous");
        entry.size += m.end.saturating_sub(m.start);
        entry.regions += 1;
    }
    let mut list: Vec<MappingUsage> = groups.into_values().collect();
    list.sort_by(|a, b| b.rss.cmp(&a.rss).then_with(|| a.name.cmp(&b.name)));
    Some(list)
}

/// Whether `pid` still names the live process that started at `known_start`.
pub fn same_process(pid: u32, known_start: u64) -> bool {
    start_time_matches(start_time(pid), known_start)
}

fn start_time_matches(now: Option<u64>, known: u64) -> bool {
    now == Some(known)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_mappings_find_own_code() {
        let me = std::process::id();
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let maps = FileMappings::of(me);
        assert!(maps.paths().any(|p| p == exe));
        let start = maps.start_of(&exe).expect("first page mapped");
        let code = maps.code_of(&exe);
        // This function's own address lies in one of the executable ranges.
        let here = file_mappings_find_own_code as *const () as usize as u64;
        assert!(
            code.iter().any(|&(lo, hi, _)| (lo..hi).contains(&here)),
            "{here:x} not in {code:x?}"
        );
        assert!(code.iter().all(|&(lo, _, _)| lo >= start));
        // A process that is not there has no mappings, and reading fails soft.
        let gone = FileMappings::of(u32::MAX >> 1);
        assert_eq!(gone.paths().count(), 0);
        assert!(gone.code_of(&exe).is_empty());
    }

    #[test]
    fn reads_own_process() {
        let me = std::process::id();
        let v = view(me).expect("own /proc entry");
        assert_eq!(v.pid, me);
        assert!(v.start_time > 0);
        assert!(same_process(me, v.start_time));
        assert!(!same_process(me, v.start_time + 1));
        let rollup = smaps_rollup(me).expect("own smaps_rollup");
        assert!(rollup.rss > 0 && rollup.pss > 0 && rollup.uss <= rollup.rss);
        let status = status_memory(me).expect("own status");
        assert!(status.rss_anon > 0 && status.threads >= 1);
    }

    #[test]
    fn recycled_pid_is_not_the_same_process() {
        assert!(!start_time_matches(None, 5));
        assert!(!start_time_matches(Some(6), 5));
        assert!(start_time_matches(Some(5), 5));
    }

    #[test]
    fn groups_mappings() {
        let maps = mappings(std::process::id()).expect("own smaps");
        assert!(maps.iter().any(|m| m.name == "[stack]"));
        assert!(maps.windows(2).all(|w| w[0].rss >= w[1].rss));
    }
}
