//! Symbolization of sampled user stacks into allocation sites.
//!
//! The eBPF programs record user stacks as lists of absolute instruction
//! addresses (`bpf_get_stackid` with `BPF_F_USER_STACK`, innermost first).
//! Those addresses only mean something together with the memory map of the
//! process they were taken in, so they must be symbolized while that process
//! is still alive: after it exits or execs, `/proc/PID/maps` (and with it the
//! binary the address fell into) is gone. [`Symbolizer`] turns them into
//! [`Frame`]s: function, source file and line when DWARF is available, and the
//! module (binary or shared library) the address belongs to.
//!
//! # How it works
//!
//! Resolution is delegated to [`blazesym`], which reads `/proc/PID/maps`,
//! opens the mapped object through `/proc/PID/map_files/` (so that deleted or
//! replaced binaries and binaries in other mount namespaces still resolve),
//! follows debug links and build ids into `/usr/lib/debug`, reads DWARF for
//! file and line, and demangles Rust and C++ names. blazesym keeps every
//! parsed ELF/DWARF file in memory keyed by the file's identity (device,
//! inode, size, mtime), so all processes running the same binary share one
//! parsed copy, until [`Symbolizer::release_parsed`] drops it (the agent
//! does after each snapshot, diff or profile).
//!
//! On top of that, [`Symbolizer::symbolize_cached`] keeps its own cache of
//! finished frames keyed by *(object, file offset)*, where the object is the
//! mapped file's device, inode and path, rather than by (pid, address). The
//! reasons:
//!
//! * memtrace traces multi-worker servers, whose workers are usually forked
//!   from one master and run the same binaries: one worker's resolved sites
//!   serve all of them, including workers started later.
//! * The key stays correct when a process execs or re-maps a library
//!   (`dlclose`/`dlopen` at another address), which a (pid, address) key
//!   would silently get wrong.
//!
//! Every call reads `/proc/PID/maps` once (a few kilobytes) to translate
//! addresses into that key; only addresses not yet cached go to blazesym.
//! Addresses in mappings without a file (JIT code described by a perf map,
//! the vDSO) are cached per (pid, address) instead. An object's entries are
//! dropped when the last process that used it is [forgotten](Symbolizer::forget),
//! which bounds memory and protects against inode reuse.
//!
//! # What callers should know
//!
//! * Addresses are symbolized exactly as given. In a sampled stack every frame
//!   but the innermost is a *return* address, which points just after the
//!   `call`; the reported line can then be the line after the call. Pass
//!   `addr - 1` for those frames if exact lines matter.
//! * When code was inlined, the frame names the function the code was inlined
//!   *into*, and the file and line are those of the inlined call in that
//!   function. For allocation sites this is the line of user code that
//!   called e.g. `Vec::with_capacity`, rather than a line deep in the
//!   standard library.
//! * Call [`Symbolizer::forget`] when a process exits or execs; otherwise its
//!   bookkeeping (and blazesym's per-mapping path entries) stays around.
//! * blazesym's symbolizer is neither `Send` nor `Sync`, so neither is
//!   [`Symbolizer`]: keep it on one thread (for example a dedicated thread fed
//!   through a channel) rather than in a multi-threaded async task.

use std::collections::hash_map::Entry as MapEntry;
use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fmt;
use std::io;
use std::os::unix::ffi::OsStrExt as _;
use std::path::PathBuf;

use crate::procmaps::MapPath;

use blazesym::symbolize::evict::{self, Evict};
use blazesym::symbolize::source::{Process, Source};
use blazesym::symbolize::{Input, Symbolized};
use blazesym::{ErrorKind as BlazeErrorKind, Pid};

/// Name of the vDSO's pseudo-path in `/proc/PID/maps`, reported as its module.
const VDSO: &str = "[vdso]";

/// One symbolized address of a user stack.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub struct Frame {
    /// The absolute address as given.
    pub addr: u64,
    /// Demangled (Rust and C++) symbol name; `None` when unresolved.
    pub function: Option<String>,
    /// `addr` minus the start of `function`.
    pub offset: Option<u64>,
    /// Source file, as full a path as the debug info records.
    pub file: Option<String>,
    /// Source line; needs DWARF for the object.
    pub line: Option<u32>,
    /// Path of the ELF object the address falls in (`[vdso]` for the vDSO).
    pub module: Option<String>,
    /// Why a frame the symbolizer should know (a Python code object) stays
    /// an address: [`Unresolved`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unresolved: Option<Unresolved>,
}

/// Why a Python frame has only its code object's address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Unresolved {
    /// Not a live code object any more when it was read: freed (a module's
    /// body after its import, a function defined per call) before the
    /// first read, its memory reused.
    CodeFreed,
    /// The process's memory could not be read there (unmapped, or
    /// permissions).
    Unreadable,
    /// The process exited before its frames were read.
    ProcessGone,
}

impl Unresolved {
    pub fn describe(self) -> &'static str {
        match self {
            Self::CodeFreed => "code object freed before it was read",
            Self::Unreadable => "memory not readable",
            Self::ProcessGone => "process exited before it was read",
        }
    }
}

impl Frame {
    /// A frame about which nothing but the address (and maybe its module) is
    /// known.
    pub fn unresolved_in(addr: u64, module: Option<String>) -> Self {
        Self {
            addr,
            function: None,
            offset: None,
            file: None,
            line: None,
            module,
            unresolved: None,
        }
    }

    /// A frame with only its address (the process was gone, say).
    pub fn unresolved(addr: u64) -> Self {
        Self::unresolved_in(addr, None)
    }

    /// A short human-readable form for reports and logs, e.g.
    /// `leak_memory (handler.c:24) [libfoo.so]`, `malloc+0x1a [libc.so.6]`,
    /// `0x7f12... [libc.so.6]` or `0x10 [?]`.
    ///
    /// Only the last component of the file and module paths is shown to keep
    /// lines short; the full paths are in the fields (and in JSON output).
    pub fn display(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.function, &self.file) {
            (Some(function), Some(file)) => {
                write!(f, "{function} ({}", file_name(file))?;
                if let Some(line) = self.line {
                    write!(f, ":{line}")?;
                }
                f.write_str(")")?;
            }
            // Without a line, the offset is what distinguishes call sites
            // within one function.
            (Some(function), None) => match self.offset {
                Some(offset) if offset != 0 => write!(f, "{function}+{offset:#x}")?,
                _ => f.write_str(function)?,
            },
            (None, _) => write!(f, "{:#x}", self.addr)?,
        }
        match self.module.as_deref().map(file_name) {
            // Pseudo-modules such as `[vdso]` bring their own brackets.
            Some(module) if module.starts_with('[') && module.ends_with(']') => {
                write!(f, " {module}")?
            }
            Some(module) => write!(f, " [{module}]")?,
            None => f.write_str(" [?]")?,
        }
        match self.unresolved {
            Some(why) => write!(f, " ({})", why.describe()),
            None => Ok(()),
        }
    }
}

/// The last component of a path, or the whole string if it has none (as for
/// `[vdso]`).
fn file_name(path: &str) -> &str {
    path.rsplit('/')
        .find(|part| !part.is_empty())
        .unwrap_or(path)
}

/// Why a process's addresses could not be symbolized at all.
///
/// Problems with individual addresses (unmapped, stripped binary, unreadable
/// debug info) are not errors: they give frames without a function.
#[derive(Debug, thiserror::Error)]
pub enum SymbolizeError {
    /// Pid 0 is not a user process (and blazesym would take it to mean the
    /// calling process).
    #[error("pid 0 does not name a user process")]
    InvalidPid,
    /// The process does not exist, has exited (possibly still a zombie) or
    /// has no user address space, so its addresses cannot be resolved any
    /// more.
    #[error("process {pid} is gone or has no user address space")]
    ProcessGone {
        /// The process asked about.
        pid: u32,
    },
    /// `/proc/PID/maps` exists but could not be read, typically for lack of
    /// privileges (ptrace access to the process is required).
    #[error("cannot read the memory map of process {pid}")]
    Maps {
        /// The process asked about.
        pid: u32,
        /// The error reading `/proc/PID/maps`.
        #[source]
        source: io::Error,
    },
}

/// Counters and sizes of the symbolizer's cache, for tests and self-metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CacheStats {
    /// Addresses answered from the cache by [`Symbolizer::symbolize_cached`].
    pub hits: u64,
    /// Addresses handed to blazesym, by either symbolize method (after
    /// de-duplication within one call).
    pub misses: u64,
    /// Frames currently cached, for all objects and processes.
    pub cached_frames: usize,
    /// Distinct mapped files with cached frames.
    pub cached_objects: usize,
    /// Processes with state that [`Symbolizer::forget`] would release.
    pub tracked_processes: usize,
}

/// What blazesym found for one address, without the parts that depend on
/// where the object is mapped (the address itself and the module path).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Resolved {
    function: Option<String>,
    offset: Option<u64>,
    file: Option<String>,
    line: Option<u32>,
    /// The module as blazesym names it. Only used for addresses whose mapping
    /// has no path of its own (perf-map JIT code), because for files the path
    /// in this process's maps is the accurate one.
    module: Option<String>,
}

impl Resolved {
    fn from_symbolized(symbolized: Symbolized<'_>) -> Self {
        match symbolized {
            Symbolized::Sym(sym) => {
                let (file, line) = match sym.code_info.as_deref() {
                    Some(code) => (
                        Some(code.to_path().to_string_lossy().into_owned()),
                        code.line,
                    ),
                    None => (None, None),
                };
                Self {
                    function: Some(sym.name.into_owned()).filter(|name| !name.is_empty()),
                    offset: Some(sym.offset as u64),
                    file,
                    line,
                    module: sym
                        .module
                        .map(|module| module.to_string_lossy().into_owned()),
                }
            }
            Symbolized::Unknown(reason) => {
                tracing::trace!(%reason, "address not symbolized");
                Self::default()
            }
        }
    }

    fn frame(&self, addr: u64, entry: &MapsEntry) -> Frame {
        Frame {
            addr,
            function: self.function.clone(),
            offset: self.offset,
            file: self.file.clone(),
            line: self.line,
            module: entry.module().or_else(|| self.module.clone()),
            unresolved: None,
        }
    }
}

/// Identity of a mapped file: what the cache of finished frames is keyed by.
///
/// Device and inode identify the file; the path is included so that an inode
/// number reused by a different file (after the old one was deleted and
/// unmapped) only collides if it also reappears under the same name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct ObjectKey {
    dev: u64,
    inode: u64,
    path: PathBuf,
}

/// What backs a mapping in `/proc/PID/maps`.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Backing {
    /// A file; its path has any ` (deleted)` suffix removed.
    File(ObjectKey),
    /// The vDSO.
    Vdso,
    /// Anonymous memory (possibly JIT code), heap, stack and other pseudo
    /// entries.
    Other,
}

/// One line of `/proc/PID/maps`, reduced to what symbolization needs.
#[derive(Clone, Debug, PartialEq, Eq)]
struct MapsEntry {
    start: u64,
    end: u64,
    /// File offset at which the mapping starts.
    offset: u64,
    /// Readable or executable: the entries blazesym considers at all. Other
    /// entries (guard pages) cannot hold code.
    relevant: bool,
    backing: Backing,
}

impl MapsEntry {
    fn module(&self) -> Option<String> {
        match &self.backing {
            Backing::File(key) => Some(key.path.to_string_lossy().into_owned()),
            Backing::Vdso => Some(VDSO.to_owned()),
            Backing::Other => None,
        }
    }

    /// The key under which the frame for `addr` (which must lie in this
    /// entry) is cached.
    fn cache_key(&self, addr: u64) -> CacheKey<'_> {
        match &self.backing {
            // Inode 0 means the file has no stable identity to share frames
            // by; treat it like memory without a file.
            Backing::File(key) if key.inode != 0 => {
                CacheKey::Object(key, addr - self.start + self.offset)
            }
            _ => CacheKey::Process(addr),
        }
    }
}

/// Where a cached frame lives.
enum CacheKey<'m> {
    /// In the shared per-object cache, by file offset.
    Object(&'m ObjectKey, u64),
    /// In the per-process cache, by absolute address.
    Process(u64),
}

/// Parses the contents of `/proc/PID/maps` (`procmaps`: lines that do not
/// parse are skipped), reduced to what symbolization needs, in address
/// order.
fn parse_maps(data: &[u8]) -> Vec<MapsEntry> {
    let mut entries: Vec<MapsEntry> = crate::procmaps::parse(data)
        .into_iter()
        .map(|m| {
            let relevant = m.readable() || m.executable();
            let backing = match m.path {
                MapPath::File(path) => {
                    let bytes = path.as_os_str().as_bytes();
                    let bytes = bytes.strip_suffix(b" (deleted)").unwrap_or(bytes);
                    Backing::File(ObjectKey {
                        dev: m.dev,
                        inode: m.inode,
                        path: PathBuf::from(OsStr::from_bytes(bytes)),
                    })
                }
                MapPath::Vdso => Backing::Vdso,
                _ => Backing::Other,
            };
            MapsEntry {
                start: m.start,
                end: m.end,
                offset: m.offset,
                relevant,
                backing,
            }
        })
        .collect();
    // The kernel lists mappings in address order; lookups rely on it.
    entries.sort_by_key(|entry| entry.start);
    entries
}

/// The entry containing `addr`, if any.
fn find_entry(maps: &[MapsEntry], addr: u64) -> Option<&MapsEntry> {
    let after = maps.partition_point(|entry| entry.start <= addr);
    maps[..after].last().filter(|entry| addr < entry.end)
}

/// Whether an error reading a `/proc/PID/` file means the process is gone.
fn is_gone(err: &io::Error) -> bool {
    err.kind() == io::ErrorKind::NotFound || err.raw_os_error() == Some(libc::ESRCH)
}

/// Reads and parses `/proc/PID/maps`. An empty map means the process has
/// exited but not been reaped yet (or is a kernel thread): either way there
/// is nothing to symbolize against.
fn read_maps(pid: u32) -> Result<Vec<MapsEntry>, SymbolizeError> {
    match std::fs::read(format!("/proc/{pid}/maps")) {
        Ok(data) => {
            let maps = parse_maps(&data);
            if maps.is_empty() {
                Err(SymbolizeError::ProcessGone { pid })
            } else {
                Ok(maps)
            }
        }
        Err(err) if is_gone(&err) => Err(SymbolizeError::ProcessGone { pid }),
        Err(source) => Err(SymbolizeError::Maps { pid, source }),
    }
}

/// Whether the process still has a user address space. Errors other than
/// "gone" (e.g. permissions) count as alive: they say nothing about exit.
fn process_alive(pid: u32) -> bool {
    !matches!(read_maps(pid), Err(SymbolizeError::ProcessGone { .. }))
}

/// Frames cached for one mapped file.
#[derive(Debug, Default)]
struct ObjectCache {
    /// Resolution by file offset.
    frames: HashMap<u64, Resolved>,
    /// Number of tracked processes that use this object.
    users: usize,
}

/// Per-process state, released by [`Symbolizer::forget`].
#[derive(Debug, Default)]
struct ProcessState {
    /// Objects this process has used through the cache (each counted once in
    /// [`ObjectCache::users`]).
    objects: HashSet<ObjectKey>,
    /// Frames for addresses outside files (JIT code, vDSO), by address.
    frames: HashMap<u64, Resolved>,
    /// `/proc/PID/map_files/...` paths blazesym opened for this process; each
    /// holds a reference in blazesym's file cache until evicted.
    blazesym_paths: HashSet<PathBuf>,
}

/// Symbolizes user-space addresses of live processes, caching per binary.
///
/// See the [module documentation](self) for how caching works.
#[derive(Debug)]
pub struct Symbolizer {
    /// blazesym's symbolizer: caches parsed ELF/DWARF per file.
    inner: blazesym::symbolize::Symbolizer,
    /// Whether blazesym opens objects through `/proc/PID/map_files/`. That
    /// needs `CAP_SYS_ADMIN` (or `CAP_CHECKPOINT_RESTORE`); without it we
    /// fall back to the paths named in the maps, which only work in our own
    /// mount namespace and for files not deleted since.
    map_files: bool,
    /// Finished frames of file-backed code, shared by all processes.
    objects: HashMap<ObjectKey, ObjectCache>,
    processes: HashMap<u32, ProcessState>,
    hits: u64,
    misses: u64,
}

impl Default for Symbolizer {
    fn default() -> Self {
        Self::new()
    }
}

impl Symbolizer {
    /// Creates a symbolizer with empty caches.
    pub fn new() -> Self {
        Self {
            inner: Self::blazesym(),
            map_files: true,
            objects: HashMap::new(),
            processes: HashMap::new(),
            hits: 0,
            misses: 0,
        }
    }

    fn blazesym() -> blazesym::symbolize::Symbolizer {
        blazesym::symbolize::Symbolizer::builder()
            .enable_code_info(true)
            // Needed even though frames do not list inlined functions: only
            // with it does blazesym attribute the line to the function the
            // symbol names (the inlined call site) instead of to the
            // innermost inlined function.
            .enable_inlined_fns(true)
            .enable_demangling(true)
            .build()
    }

    /// Drops what blazesym parsed (symbol tables, DWARF line programs and
    /// units, open files) and keeps the finished frames: addresses seen
    /// before still resolve from the frame cache, and only new ones make
    /// blazesym parse their objects again. A long-lived agent asked for a
    /// diff every few minutes would otherwise hold the parsed debug
    /// information of every binary it ever symbolized (several MB for a
    /// CPython with debug info), growing a little with each diff.
    pub fn release_parsed(&mut self) {
        self.inner = Self::blazesym();
        for state in self.processes.values_mut() {
            state.blazesym_paths.clear();
        }
    }

    /// Symbolizes addresses of one live process, without consulting or
    /// filling the frame cache (blazesym's own cache of parsed files is still
    /// used).
    ///
    /// Returns one frame per address, in the same order. Addresses that
    /// cannot be resolved give a frame with only `addr`, and `module` when the
    /// address lies in a mapped file. An empty `addrs` gives an empty result
    /// without looking at the process.
    ///
    /// # Errors
    ///
    /// [`SymbolizeError::ProcessGone`] if the process does not exist or has
    /// exited (also when it exits during the call), [`SymbolizeError::Maps`]
    /// if its memory map cannot be read, [`SymbolizeError::InvalidPid`] for
    /// pid 0.
    pub fn symbolize(&mut self, pid: u32, addrs: &[u64]) -> Result<Vec<Frame>, SymbolizeError> {
        self.symbolize_impl(pid, addrs, false)
    }

    /// Like [`symbolize`](Self::symbolize), but answers from and fills the
    /// frame cache, so that addresses seen before (in this process or in any
    /// other process mapping the same file) are not resolved again.
    ///
    /// Cached entries live until [`forget`](Self::forget) has been called for
    /// every process that used them.
    ///
    /// # Errors
    ///
    /// As for [`symbolize`](Self::symbolize).
    pub fn symbolize_cached(
        &mut self,
        pid: u32,
        addrs: &[u64],
    ) -> Result<Vec<Frame>, SymbolizeError> {
        self.symbolize_impl(pid, addrs, true)
    }

    /// Releases everything kept for `pid`: its per-process frames, its share
    /// of the per-object caches (objects no other tracked process uses are
    /// dropped), and blazesym's references to its mappings. Call it when the
    /// process exits or execs. Unknown pids are ignored.
    pub fn forget(&mut self, pid: u32) {
        if pid == 0 {
            return;
        }
        if let Some(state) = self.processes.remove(&pid) {
            for key in state.objects {
                if let MapEntry::Occupied(mut object) = self.objects.entry(key) {
                    let users = &mut object.get_mut().users;
                    *users = users.saturating_sub(1);
                    if *users == 0 {
                        object.remove();
                    }
                }
            }
            // blazesym reference-counts parsed files by the paths they were
            // opened through, so this only drops a parsed binary once no
            // other process's mapping refers to it.
            for path in state.blazesym_paths {
                if let Err(err) = self.inner.evict(&Evict::Elf(evict::Elf::new(path))) {
                    tracing::debug!(pid, error = %err, "evicting symbolization data failed");
                }
            }
        }
        if let Err(err) = self
            .inner
            .evict(&Evict::Process(evict::Process::new(Pid::from(pid))))
        {
            tracing::debug!(pid, error = %err, "evicting process symbolization data failed");
        }
    }

    /// Counters and cache sizes.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits,
            misses: self.misses,
            cached_frames: self.objects.values().map(|o| o.frames.len()).sum::<usize>()
                + self
                    .processes
                    .values()
                    .map(|p| p.frames.len())
                    .sum::<usize>(),
            cached_objects: self.objects.len(),
            tracked_processes: self.processes.len(),
        }
    }

    fn symbolize_impl(
        &mut self,
        pid: u32,
        addrs: &[u64],
        use_cache: bool,
    ) -> Result<Vec<Frame>, SymbolizeError> {
        if pid == 0 {
            return Err(SymbolizeError::InvalidPid);
        }
        if addrs.is_empty() {
            return Ok(Vec::new());
        }
        let maps = read_maps(pid)?;
        let entries: Vec<Option<&MapsEntry>> = addrs
            .iter()
            .map(|&addr| find_entry(&maps, addr).filter(|entry| entry.relevant))
            .collect();

        // Addresses blazesym has to resolve, each once.
        let mut wanted: Vec<(u64, &MapsEntry)> = Vec::new();
        let mut seen = HashSet::new();
        for (&addr, entry) in addrs.iter().zip(&entries) {
            let Some(entry) = entry else { continue };
            if use_cache && self.cached(pid, entry, addr).is_some() {
                self.hits += 1;
            } else if seen.insert(addr) {
                wanted.push((addr, entry));
            }
        }

        let resolved = self.resolve(pid, &wanted)?;
        if use_cache {
            self.remember(pid, &entries, &wanted, &resolved);
        }

        let frames = addrs
            .iter()
            .zip(&entries)
            .map(|(&addr, entry)| match entry {
                Some(entry) => match resolved
                    .get(&addr)
                    .or_else(|| use_cache.then(|| self.cached(pid, entry, addr)).flatten())
                {
                    Some(found) => found.frame(addr, entry),
                    None => Frame::unresolved_in(addr, entry.module()),
                },
                // Outside any mapping that could hold code; the module is
                // still worth knowing if the address is inside a file.
                None => {
                    Frame::unresolved_in(addr, find_entry(&maps, addr).and_then(MapsEntry::module))
                }
            })
            .collect();
        Ok(frames)
    }

    /// The cached resolution of `addr`, which lies in `entry` of `pid`.
    fn cached(&self, pid: u32, entry: &MapsEntry, addr: u64) -> Option<&Resolved> {
        match entry.cache_key(addr) {
            CacheKey::Object(key, offset) => self.objects.get(key)?.frames.get(&offset),
            CacheKey::Process(addr) => self.processes.get(&pid)?.frames.get(&addr),
        }
    }

    /// Stores freshly resolved frames and registers `pid` as a user of every
    /// object it touched (hits included, so that entries another process put
    /// there survive that process being forgotten).
    fn remember(
        &mut self,
        pid: u32,
        entries: &[Option<&MapsEntry>],
        wanted: &[(u64, &MapsEntry)],
        resolved: &HashMap<u64, Resolved>,
    ) {
        let state = self.processes.entry(pid).or_default();
        for entry in entries.iter().flatten() {
            let Backing::File(key) = &entry.backing else {
                continue;
            };
            if key.inode != 0 && !state.objects.contains(key) {
                state.objects.insert(key.clone());
                self.objects.entry(key.clone()).or_default().users += 1;
            }
        }
        for &(addr, entry) in wanted {
            // Missing only if blazesym returned fewer results than asked for.
            let Some(found) = resolved.get(&addr) else {
                continue;
            };
            match entry.cache_key(addr) {
                CacheKey::Object(key, offset) => {
                    if let Some(object) = self.objects.get_mut(key) {
                        object.frames.insert(offset, found.clone());
                    }
                }
                CacheKey::Process(addr) => {
                    state.frames.insert(addr, found.clone());
                }
            }
        }
    }

    /// Resolves the given addresses through blazesym and records which
    /// mappings it opened on the process's behalf.
    fn resolve(
        &mut self,
        pid: u32,
        wanted: &[(u64, &MapsEntry)],
    ) -> Result<HashMap<u64, Resolved>, SymbolizeError> {
        if wanted.is_empty() {
            return Ok(HashMap::new());
        }
        let addrs: Vec<u64> = wanted.iter().map(|&(addr, _)| addr).collect();
        self.misses += addrs.len() as u64;
        let results = self.lookup(pid, &addrs)?;

        if self.map_files {
            let paths = wanted.iter().filter_map(|(_, entry)| match entry.backing {
                Backing::File(_) => Some(PathBuf::from(format!(
                    "/proc/{pid}/map_files/{:x}-{:x}",
                    entry.start, entry.end
                ))),
                _ => None,
            });
            let state = self.processes.entry(pid).or_default();
            state.blazesym_paths.extend(paths);
        }
        Ok(addrs.into_iter().zip(results).collect())
    }

    /// Runs blazesym on `addrs`, one result per address.
    ///
    /// blazesym fails a whole batch if any one mapped object cannot be opened
    /// or parsed; then each address is retried alone so that one bad object
    /// only costs its own frames. Results are only returned while the process
    /// is alive, so that frames lost to its exit are not cached as
    /// unresolvable.
    fn lookup(&mut self, pid: u32, addrs: &[u64]) -> Result<Vec<Resolved>, SymbolizeError> {
        let err = match self.batch(pid, addrs, self.map_files) {
            Ok(results) => return Ok(results),
            Err(err) => err,
        };
        let err = if self.map_files && err.kind() == BlazeErrorKind::PermissionDenied {
            match self.batch(pid, addrs, false) {
                Ok(results) => {
                    tracing::warn!(
                        error = %err,
                        "cannot open /proc/PID/map_files (needs CAP_SYS_ADMIN); \
                         symbolizing through the paths in /proc/PID/maps from now on, \
                         which fails for deleted binaries and other mount namespaces"
                    );
                    self.map_files = false;
                    return Ok(results);
                }
                Err(err) => err,
            }
        } else {
            err
        };

        if !process_alive(pid) {
            return Err(SymbolizeError::ProcessGone { pid });
        }
        tracing::debug!(pid, error = %err, "batch symbolization failed; retrying address by address");
        let src = Source::Process(self.source(pid, self.map_files));
        let results = addrs
            .iter()
            .map(|&addr| match self.inner.symbolize_single(&src, Input::AbsAddr(addr)) {
                Ok(symbolized) => Resolved::from_symbolized(symbolized),
                Err(err) => {
                    tracing::debug!(pid, addr = format_args!("{addr:#x}"), error = %err, "cannot symbolize address");
                    Resolved::default()
                }
            })
            .collect();
        if !process_alive(pid) {
            return Err(SymbolizeError::ProcessGone { pid });
        }
        Ok(results)
    }

    fn batch(
        &self,
        pid: u32,
        addrs: &[u64],
        map_files: bool,
    ) -> Result<Vec<Resolved>, blazesym::Error> {
        let src = Source::Process(self.source(pid, map_files));
        let symbolized = self.inner.symbolize(&src, Input::AbsAddr(addrs))?;
        Ok(symbolized
            .into_iter()
            .map(Resolved::from_symbolized)
            .collect())
    }

    /// The blazesym source for `pid`: debug info, perf maps (JIT code) and
    /// the vDSO all enabled.
    fn source(&self, pid: u32, map_files: bool) -> Process {
        let mut process = Process::new(Pid::from(pid));
        process.debug_syms = true;
        process.perf_map = true;
        process.vdso = true;
        process.map_files = map_files;
        process
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hint::black_box;
    use std::process::{Child, Command};
    use std::time::{Duration, Instant};

    /// A C-ABI function with a stable, unmangled name to look up.
    #[inline(never)]
    #[unsafe(no_mangle)]
    pub extern "C" fn memtrace_symbolize_test_target(n: u64) -> u64 {
        let mut acc = 0u64;
        for i in 0..black_box(n) {
            acc = acc.wrapping_mul(31).wrapping_add(black_box(i));
        }
        acc
    }

    /// A plain Rust function, whose symbol is mangled.
    #[inline(never)]
    fn rust_test_target(values: &mut Vec<u64>) {
        values.push(black_box(7));
        values.push(black_box(values.len() as u64));
    }

    fn c_target_addr() -> u64 {
        black_box(memtrace_symbolize_test_target(3));
        memtrace_symbolize_test_target as *const () as usize as u64
    }

    fn rust_target_addr() -> u64 {
        rust_test_target(&mut Vec::new());
        rust_test_target as fn(&mut Vec<u64>) as usize as u64
    }

    fn malloc_addr() -> u64 {
        libc::malloc as *const () as usize as u64
    }

    fn own_pid() -> u32 {
        std::process::id()
    }

    fn current_exe() -> String {
        let exe = std::env::current_exe().expect("current_exe");
        let exe = exe.canonicalize().expect("canonicalize current_exe");
        exe.to_string_lossy().into_owned()
    }

    #[test]
    fn own_function_has_name_module_and_line() {
        let mut symbolizer = Symbolizer::new();
        let addr = c_target_addr();
        let frames = symbolizer
            .symbolize(own_pid(), &[addr, addr + 4])
            .expect("symbolize own process");
        assert_eq!(frames.len(), 2);
        for (frame, delta) in frames.iter().zip([0, 4]) {
            assert_eq!(frame.addr, addr + delta);
            let function = frame.function.as_deref().expect("function resolved");
            assert!(
                function.contains("memtrace_symbolize_test_target"),
                "{frame:?}"
            );
            assert_eq!(frame.offset, Some(delta), "{frame:?}");
            assert_eq!(frame.module.as_deref(), Some(current_exe().as_str()));
            assert!(frame.line.is_some(), "no line: {frame:?}");
            let file = frame.file.as_deref().expect("file resolved");
            assert!(file.ends_with("symbolize.rs"), "{frame:?}");
        }
        let shown = frames[0].display();
        assert!(
            shown.starts_with("memtrace_symbolize_test_target (symbolize.rs:"),
            "{shown}"
        );
    }

    #[test]
    fn rust_function_is_demangled() {
        let mut symbolizer = Symbolizer::new();
        let frames = symbolizer
            .symbolize(own_pid(), &[rust_target_addr()])
            .expect("symbolize own process");
        let function = frames[0].function.as_deref().expect("function resolved");
        assert!(function.contains("rust_test_target"), "{function}");
        assert!(function.contains("::"), "{function}");
        assert!(
            !function.starts_with("_ZN") && !function.starts_with("_R"),
            "{function}"
        );
        // The demangled name carries no trailing hash.
        assert!(!function.contains("::h"), "{function}");
    }

    #[test]
    fn libc_address_names_libc_module() {
        let mut symbolizer = Symbolizer::new();
        let frames = symbolizer
            .symbolize(own_pid(), &[malloc_addr()])
            .expect("symbolize own process");
        let frame = &frames[0];
        let module = frame.module.as_deref().expect("module known");
        assert!(module.contains("libc"), "{frame:?}");
        let function = frame.function.as_deref().expect("function resolved");
        assert!(function.contains("malloc"), "{frame:?}");
    }

    #[test]
    fn unmapped_address_is_unresolved_not_an_error() {
        let mut symbolizer = Symbolizer::new();
        let frames = symbolizer
            .symbolize(own_pid(), &[0x10])
            .expect("symbolize own process");
        assert_eq!(frames, vec![Frame::unresolved_in(0x10, None)]);
        assert_eq!(frames[0].display(), "0x10 [?]");
        // Nothing was asked of blazesym for it.
        assert_eq!(symbolizer.stats().misses, 0);
    }

    #[test]
    fn output_follows_input_order_with_duplicates() {
        let mut symbolizer = Symbolizer::new();
        let addrs = [c_target_addr(), 0x10, malloc_addr(), c_target_addr()];
        for cached in [false, true] {
            let frames = if cached {
                symbolizer.symbolize_cached(own_pid(), &addrs)
            } else {
                symbolizer.symbolize(own_pid(), &addrs)
            }
            .expect("symbolize own process");
            let got: Vec<u64> = frames.iter().map(|frame| frame.addr).collect();
            assert_eq!(got, addrs);
            assert_eq!(frames[0], frames[3]);
        }
    }

    #[test]
    fn missing_process_is_an_error() {
        let mut symbolizer = Symbolizer::new();
        // Above PID_MAX_LIMIT (4 Mi), so never a live pid.
        let pid = 4_194_304 + 12_345;
        for cached in [false, true] {
            let result = if cached {
                symbolizer.symbolize_cached(pid, &[0x1000])
            } else {
                symbolizer.symbolize(pid, &[0x1000])
            };
            assert!(
                matches!(result, Err(SymbolizeError::ProcessGone { pid: p }) if p == pid),
                "{result:?}"
            );
        }
        assert!(matches!(
            symbolizer.symbolize(0, &[0x1000]),
            Err(SymbolizeError::InvalidPid)
        ));
        // Empty input does not look at the process.
        assert!(symbolizer.symbolize(pid, &[]).expect("empty").is_empty());
        symbolizer.forget(pid);
    }

    #[test]
    fn released_parse_keeps_the_frames_and_new_addresses_still_resolve() {
        let mut symbolizer = Symbolizer::new();
        let seen = [c_target_addr(), malloc_addr()];
        let first = symbolizer.symbolize_cached(own_pid(), &seen).unwrap();
        let misses = symbolizer.stats().misses;
        symbolizer.release_parsed();
        // Seen before: from the frame cache, blazesym not asked.
        assert_eq!(
            symbolizer.symbolize_cached(own_pid(), &seen).unwrap(),
            first
        );
        assert_eq!(symbolizer.stats().misses, misses);
        assert_eq!(symbolizer.stats().cached_frames, 2);
        // New: blazesym parses again, and resolves it.
        let new = symbolizer
            .symbolize_cached(own_pid(), &[rust_target_addr()])
            .unwrap();
        assert_eq!(symbolizer.stats().misses, misses + 1);
        assert!(
            new[0]
                .function
                .as_deref()
                .is_some_and(|f| f.contains("rust_test_target")),
            "{new:?}"
        );
        symbolizer.forget(own_pid());
        assert_eq!(symbolizer.stats().cached_objects, 0);
    }

    #[test]
    fn cached_frames_match_and_skip_blazesym() {
        let mut symbolizer = Symbolizer::new();
        let addrs = [
            c_target_addr(),
            c_target_addr() + 4,
            malloc_addr(),
            0x10,
            c_target_addr(),
        ];
        let uncached = symbolizer.symbolize(own_pid(), &addrs).expect("uncached");
        let before = symbolizer.stats();
        // The duplicate is resolved once; the unmapped address never.
        assert_eq!(before.misses, 3);
        assert_eq!(before.cached_frames, 0);

        let first = symbolizer
            .symbolize_cached(own_pid(), &addrs)
            .expect("first");
        assert_eq!(first, uncached);
        let after_first = symbolizer.stats();
        assert_eq!(after_first.misses, before.misses + 3);
        assert_eq!(after_first.hits, 0);
        assert_eq!(after_first.cached_frames, 3);

        let second = symbolizer
            .symbolize_cached(own_pid(), &addrs)
            .expect("second");
        assert_eq!(second, uncached);
        let after_second = symbolizer.stats();
        assert_eq!(
            after_second.misses, after_first.misses,
            "blazesym called again"
        );
        assert_eq!(after_second.hits, 4);

        symbolizer.forget(own_pid());
        let forgotten = symbolizer.stats();
        assert_eq!(forgotten.cached_frames, 0);
        assert_eq!(forgotten.cached_objects, 0);
        assert_eq!(forgotten.tracked_processes, 0);

        let again = symbolizer
            .symbolize_cached(own_pid(), &addrs)
            .expect("again");
        assert_eq!(again, uncached);
        assert_eq!(symbolizer.stats().misses, after_second.misses + 3);
    }

    #[test]
    fn vdso_addresses_do_not_fail() {
        let maps = read_maps(own_pid()).expect("own maps");
        let Some(vdso) = maps.iter().find(|entry| entry.backing == Backing::Vdso) else {
            return; // No vDSO on this system.
        };
        let addr = vdso.start + (vdso.end - vdso.start) / 2;
        let mut symbolizer = Symbolizer::new();
        let frames = symbolizer
            .symbolize_cached(own_pid(), &[addr])
            .expect("vdso");
        assert_eq!(frames[0].module.as_deref(), Some(VDSO));
    }

    /// Kills and reaps the child when dropped, also when a test fails.
    struct ChildGuard(Child);

    impl Drop for ChildGuard {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// The maps entry of our own process that holds `addr` and is a file.
    fn own_file_entry(addr: u64) -> (MapsEntry, ObjectKey) {
        let maps = read_maps(own_pid()).expect("own maps");
        let entry = find_entry(&maps, addr).expect("address mapped").clone();
        let Backing::File(key) = entry.backing.clone() else {
            panic!("not file-backed: {entry:?}")
        };
        (entry, key)
    }

    /// Where the file offset of `addr` in our process is mapped in `pid`.
    fn translate(addr: u64, pid: u32) -> Option<u64> {
        let (entry, key) = own_file_entry(addr);
        let file_offset = addr - entry.start + entry.offset;
        let maps = read_maps(pid).ok()?;
        maps.iter().find_map(|other| match &other.backing {
            Backing::File(other_key)
                if other_key.dev == key.dev
                    && other_key.inode == key.inode
                    && (other.offset..other.offset + (other.end - other.start))
                        .contains(&file_offset) =>
            {
                Some(other.start + file_offset - other.offset)
            }
            _ => None,
        })
    }

    #[test]
    fn frames_are_shared_between_processes_mapping_the_same_file() {
        let child = Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let child = ChildGuard(child);
        let child_pid = child.0.id();

        // Wait for the child to have exec'd and loaded libc.
        let deadline = Instant::now() + Duration::from_secs(10);
        let child_malloc = loop {
            if let Some(addr) = translate(malloc_addr(), child_pid) {
                break addr;
            }
            if Instant::now() > deadline {
                eprintln!("sleep does not map our libc; skipping");
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        };

        let mut symbolizer = Symbolizer::new();
        let own = symbolizer
            .symbolize_cached(own_pid(), &[malloc_addr()])
            .expect("own");
        let misses = symbolizer.stats().misses;
        let other = symbolizer
            .symbolize_cached(child_pid, &[child_malloc])
            .expect("child");
        assert_eq!(symbolizer.stats().misses, misses, "shared entry not used");
        assert_eq!(other[0].addr, child_malloc);
        assert_eq!(other[0].function, own[0].function);
        assert_eq!(other[0].offset, own[0].offset);
        assert_eq!(other[0].module, own[0].module);
        // The uncached path agrees.
        assert_eq!(
            symbolizer
                .symbolize(child_pid, &[child_malloc])
                .expect("uncached"),
            other
        );

        // The entry survives as long as one user is left.
        symbolizer.forget(own_pid());
        assert_eq!(symbolizer.stats().cached_objects, 1);
        symbolizer.forget(child_pid);
        assert_eq!(symbolizer.stats().cached_objects, 0);

        // A stripped binary (the system's `sleep`) still yields its module
        // and no error; the function depends on which symbols it exports.
        let maps = read_maps(child_pid).expect("child maps");
        let text = maps
            .iter()
            .find(|entry| {
                entry.relevant
                    && matches!(&entry.backing, Backing::File(key) if key.path.ends_with("sleep"))
                    && entry.offset > 0
            })
            .map(|entry| entry.start + 0x10);
        if let Some(addr) = text {
            let frames = symbolizer.symbolize(child_pid, &[addr]).expect("stripped");
            assert!(
                frames[0]
                    .module
                    .as_deref()
                    .is_some_and(|m| m.ends_with("sleep")),
                "{:?}",
                frames[0]
            );
        }

        drop(child);
        // Reaped: the pid is gone (unless already reused, which is unlikely).
        assert!(matches!(
            symbolizer.symbolize(child_pid, &[child_malloc]),
            Err(SymbolizeError::ProcessGone { .. })
        ));
    }

    #[test]
    fn maps_lines_parse() {
        let data = b"\
55d3195b7000-55d3195b9000 r--p 00000000 fd:01 2015701                    /usr/bin/cat
55d3195b9000-55d3195be000 r-xp 00002000 fd:01 2015701                    /usr/bin/cat
55d31b4dc000-55d31b4fd000 rw-p 00000000 00:00 0                          [heap]
7fd5b9c3d000-7fd5b9c5f000 r-xp 00000000 00:00 0 
7fd5b9c60000-7fd5b9c61000 ---p 00001000 103:05 42                        /opt/my app/lib x.so (deleted)
7ffc4a5e0000-7ffc4a5e2000 r-xp 00000000 00:00 0                          [vdso]
";
        let maps = parse_maps(data);
        assert_eq!(maps.len(), 6);
        assert_eq!(maps[1].start, 0x55d3195b9000);
        assert_eq!(maps[1].end, 0x55d3195be000);
        assert_eq!(maps[1].offset, 0x2000);
        assert!(maps[1].relevant);
        assert_eq!(
            maps[1].backing,
            Backing::File(ObjectKey {
                dev: (0xfd << 32) | 1,
                inode: 2015701,
                path: PathBuf::from("/usr/bin/cat"),
            })
        );
        assert_eq!(maps[2].backing, Backing::Other);
        assert_eq!(maps[3].backing, Backing::Other);
        assert!(!maps[4].relevant);
        assert_eq!(maps[4].module().as_deref(), Some("/opt/my app/lib x.so"));
        assert_eq!(maps[5].backing, Backing::Vdso);

        assert_eq!(
            find_entry(&maps, 0x55d3195b9000 + 5).map(|e| e.offset),
            Some(0x2000)
        );
        assert!(find_entry(&maps, 0x55d3195be000).is_none());
        assert!(find_entry(&maps, 0x10).is_none());
        // File offsets key the cache: the same offset through either mapping.
        match maps[1].cache_key(0x55d3195b9010) {
            CacheKey::Object(key, offset) => {
                assert_eq!(key.inode, 2015701);
                assert_eq!(offset, 0x2010);
            }
            CacheKey::Process(_) => panic!("file-backed entry keyed per process"),
        }
    }

    #[test]
    fn display_forms() {
        let mut frame = Frame {
            addr: 0x7f00_1234,
            function: Some("leak_memory".into()),
            offset: Some(0x1a),
            file: Some("/src/app/handler.c".into()),
            line: Some(24),
            module: Some("/usr/lib/libfoo.so".into()),
            unresolved: None,
        };
        assert_eq!(frame.display(), "leak_memory (handler.c:24) [libfoo.so]");
        frame.line = None;
        assert_eq!(frame.display(), "leak_memory (handler.c) [libfoo.so]");
        frame.file = None;
        assert_eq!(frame.display(), "leak_memory+0x1a [libfoo.so]");
        frame.offset = Some(0);
        assert_eq!(frame.display(), "leak_memory [libfoo.so]");
        let unresolved = Frame::unresolved_in(0x7f00_1234, Some("/lib/libc.so.6".into()));
        assert_eq!(unresolved.display(), "0x7f001234 [libc.so.6]");
        let vdso = Frame::unresolved_in(0x1000, Some(VDSO.into()));
        assert_eq!(vdso.display(), "0x1000 [vdso]");
        let freed = Frame {
            unresolved: Some(Unresolved::CodeFreed),
            ..Frame::unresolved_in(0x24d7_f600, Some("[python]".into()))
        };
        assert_eq!(
            freed.display(),
            "0x24d7f600 [python] (code object freed before it was read)"
        );
    }
}
