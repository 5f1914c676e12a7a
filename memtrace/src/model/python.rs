//! CPython in a traced process: which interpreter it runs (a static
//! `python3.X` executable, or `libpython3.X.so` as uWSGI and pyenv builds
//! map it), its exact version from the ELF (`Py_Version`, 3.11+), and
//! whether memtrace can read its frames (3.11 to 3.15, with the
//! `_PyRuntime` symbol; on 3.13+ the `_Py_DebugOffsets` cookie
//! `xdebugpy` at its start, and on 3.14+ its offsets, validated, and the
//! thread-local `_Py_tss_tstate` found through `_PyThreadState_GetCurrent`).
//!
//! Everything here reads files only: the ELF the process mapped, opened
//! through `/proc/PID/root` so that a container's own files are read.
use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use object::{Object as _, ObjectSection as _, ObjectSegment as _, ObjectSymbol as _};
use serde::Serialize;

use super::procinfo::FileMappings;
pub use super::pycode::SUPPORTED;

/// One interpreter build, as found in a process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PythonRuntime {
    /// `3.11.2`, `3.13.0rc1`, or `3.10` when only the file name tells.
    pub version: String,
    /// `PY_VERSION_HEX`, when the build has `Py_Version`.
    pub version_hex: Option<u32>,
    /// The ELF that holds the interpreter, as the process maps it.
    pub binary: PathBuf,
    /// Link-time address of `_PyRuntime` in that ELF.
    pub runtime_symbol: Option<u64>,
    /// Size of `_PyRuntime` (the main interpreter is inside it).
    #[serde(skip)]
    pub runtime_size: u64,
    /// Lowest `PT_LOAD` address, for the load bias.
    #[serde(skip)]
    pub first_load: u64,
    /// 3.13+: `_PyRuntime` starts with `_Py_DebugOffsets` (cookie seen).
    pub debug_offsets: bool,
    /// Link-time address of `PyCode_Type` (code objects' layout is read
    /// from it).
    #[serde(skip)]
    pub code_type_symbol: Option<u64>,
    /// Link-time addresses `PyObject_Malloc` reads RIP-relative: one of
    /// them is the object allocator table, or a pointer to `_PyRuntime`.
    #[serde(skip)]
    pub malloc_refs: Vec<u64>,
    /// Whether memtrace can read this interpreter's frames.
    pub supported: bool,
    /// Why not, in one line.
    pub unsupported_reason: Option<String>,
    /// 3.14+: where a thread's `_Py_tss_tstate` is (read from the code of
    /// `_PyThreadState_GetCurrent`).
    #[serde(skip)]
    pub tstate_tls: Option<TlsRef>,
    /// `sys.prefix` of a plain install, found as CPython's `getpath` finds
    /// it: the nearest directory above the binary holding
    /// `lib/python3.X/os.py`, as the process sees its files. Its standard
    /// library is `PREFIX/lib/python3.X/`.
    pub prefix: Option<PathBuf>,
}

/// How the code reaches a thread-local variable (x86_64).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsRef {
    /// Local-exec (an executable): a constant offset from the fs base.
    FsOffset(i32),
    /// Initial-exec (a shared library): the offset is in a GOT slot at
    /// this link-time address, filled by the dynamic loader.
    GotSlot(u64),
}

/// Finds the thread-local access in a small accessor's code:
/// `mov %fs:DISP32,%rax` (`64 48 8b 04 25 disp32`), or
/// `mov GOT(%rip),%rax; mov %fs:(%rax),%rax` (`48 8b 05 disp32`,
/// `64 48 8b 00`). `addr` is the code's link-time address.
pub fn tls_access(addr: u64, code: &[u8]) -> Option<TlsRef> {
    for at in 0..code.len() {
        let rest = &code[at..];
        if rest.len() >= 9 && rest[..5] == [0x64, 0x48, 0x8b, 0x04, 0x25] {
            let disp = i32::from_le_bytes(rest[5..9].try_into().ok()?);
            return Some(TlsRef::FsOffset(disp));
        }
        if rest.len() >= 11
            && rest[..3] == [0x48, 0x8b, 0x05]
            && rest[7..11] == [0x64, 0x48, 0x8b, 0x00]
        {
            let disp = i32::from_le_bytes(rest[3..7].try_into().ok()?);
            let next = addr.checked_add(at as u64 + 7)?;
            return Some(TlsRef::GotSlot(next.checked_add_signed(i64::from(disp))?));
        }
    }
    None
}

impl PythonRuntime {
    /// `X` of `3.X`.
    pub fn minor(&self) -> Option<u32> {
        match self.version_hex {
            Some(hex) => Some((hex >> 16) & 0xff),
            None => self
                .version
                .strip_prefix("3.")?
                .split('.')
                .next()?
                .parse()
                .ok(),
        }
    }

    /// The standard library's directory, with a trailing slash.
    pub fn stdlib_dir(&self) -> Option<String> {
        let prefix = self.prefix.as_ref()?.to_str()?.trim_end_matches('/');
        Some(format!("{prefix}/lib/python3.{}/", self.minor()?))
    }
}

/// The prefix of the interpreter `binary` (a path as the process sees it,
/// read under `root`, the process's root directory): the nearest ancestor
/// of its directory with `lib/python3.X/os.py`, CPython's landmark.
pub fn find_prefix(root: &Path, binary: &Path, minor: u32) -> Option<PathBuf> {
    let landmark = format!("lib/python3.{minor}/os.py");
    binary.parent()?.ancestors().find_map(|dir| {
        let relative = dir.strip_prefix("/").unwrap_or(dir);
        root.join(relative)
            .join(&landmark)
            .is_file()
            .then(|| dir.to_path_buf())
    })
}

#[derive(Debug, thiserror::Error)]
pub enum PythonError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: crate::bounds::ObjectReadError,
    },
    #[error("{path} is not an ELF object: {message}")]
    NotElf { path: PathBuf, message: String },
}

/// Whether a mapped file's name is a CPython interpreter: `libpython3.X.so*`
/// (also `3.Xd`, `3.Xm`) or a `python3.X` executable. The minor version from
/// the name, if it has one.
pub fn interpreter_file(path: &Path) -> Option<Option<u32>> {
    let name = path.file_name()?.to_str()?;
    let rest = name
        .strip_prefix("libpython3.")
        .filter(|r| r.contains(".so"))
        .or_else(|| name.strip_prefix("python3."))
        .or_else(|| (name == "python3").then_some(""))?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    Some(digits.parse().ok())
}

/// The interpreter ELF a process runs, as it names it: a mapped
/// `libpython3.X.so` first (embedded interpreters, shared builds), else its
/// executable when that is a `python3.X`.
pub fn interpreter_path(pid: u32, maps: &FileMappings) -> Option<PathBuf> {
    let mapped = maps.paths().find(|p| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("libpython3."))
            && interpreter_file(p).is_some()
    });
    if let Some(lib) = mapped {
        return Some(lib.to_path_buf());
    }
    let mut exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    if let Some(root) = super::procinfo::chroot_of(pid) {
        exe = super::procinfo::in_root(&root, &exe);
    }
    interpreter_file(&exe).map(|_| exe)
}

/// Decodes `PY_VERSION_HEX`: `3.11.2`, `3.13.0rc1`.
pub fn version_string(hex: u32) -> String {
    let (major, minor, micro) = (hex >> 24, (hex >> 16) & 0xff, (hex >> 8) & 0xff);
    let (level, serial) = ((hex >> 4) & 0xf, hex & 0xf);
    let tag = match level {
        0xa => format!("a{serial}"),
        0xb => format!("b{serial}"),
        0xc => format!("rc{serial}"),
        _ => String::new(),
    };
    format!("{major}.{minor}.{micro}{tag}")
}

/// A defined symbol's address and size, and its first `len` bytes from the
/// ELF's file image (constant or initialised data: what the process
/// started with; empty for zero-initialised data).
fn symbol_bytes<'a>(
    file: &object::File<'a>,
    name: &str,
    len: usize,
) -> Option<(u64, u64, &'a [u8])> {
    let symbol = file
        .dynamic_symbols()
        .chain(file.symbols())
        .find(|s| s.name() == Ok(name) && s.is_definition())?;
    let (addr, size) = (symbol.address(), symbol.size());
    let section = file.section_by_index(symbol.section_index()?).ok()?;
    let data = section.data().ok()?;
    let start = usize::try_from(addr.checked_sub(section.address())?).ok()?;
    let bytes = data.get(start..start.checked_add(len)?);
    Some((addr, size, bytes.unwrap_or(&[])))
}

/// Inspects an interpreter ELF. `shown` is the path as the process names
/// it; `open` where this agent can read it.
pub fn inspect(shown: &Path, open: &Path) -> Result<PythonRuntime, PythonError> {
    let data = crate::bounds::read_object(open).map_err(|source| PythonError::Read {
        path: open.to_path_buf(),
        source,
    })?;
    inspect_elf(shown, open, &data)
}

/// [`inspect`] of an ELF image already read (`open` names it in errors).
pub fn inspect_elf(shown: &Path, open: &Path, data: &[u8]) -> Result<PythonRuntime, PythonError> {
    let file = object::File::parse(data).map_err(|e| PythonError::NotElf {
        path: open.to_path_buf(),
        message: e.to_string(),
    })?;
    let version_hex = symbol_bytes(&file, "Py_Version", 4)
        .and_then(|(_, _, b)| Some(u32::from_le_bytes(b.get(..4)?.try_into().ok()?)))
        .filter(|&h| h >> 24 == 3);
    let name_minor = interpreter_file(shown).flatten();
    let minor = version_hex.map(|h| (h >> 16) & 0xff).or(name_minor);
    let version = match (version_hex, minor) {
        (Some(h), _) => version_string(h),
        (None, Some(m)) => format!("3.{m}"),
        (None, None) => "3.?".to_string(),
    };
    let runtime = symbol_bytes(&file, "_PyRuntime", 8);
    let code_type_symbol = symbol_bytes(&file, "PyCode_Type", 0).map(|(addr, _, _)| addr);
    let malloc_refs = symbol_bytes(&file, "PyObject_Malloc", 48)
        .map(|(addr, _, code)| rip_targets(addr, code))
        .unwrap_or_default();
    let first_load = file.segments().map(|s| s.address()).min().unwrap_or(0);
    let debug_offsets = runtime.is_some_and(|(_, _, b)| b == b"xdebugpy");
    let tstate_tls = symbol_bytes(&file, "_PyThreadState_GetCurrent", 32)
        .or_else(|| symbol_bytes(&file, "PyThreadState_GetUnchecked", 32))
        .and_then(|(addr, _, code)| tls_access(addr, code));
    // `free_threaded`, the third word of the table (3.13+).
    let free_threaded = symbol_bytes(&file, "_PyRuntime", 24)
        .filter(|_| debug_offsets)
        .and_then(|(_, _, b)| b.get(16..24))
        .is_some_and(|b| b.iter().any(|&x| x != 0));
    let (lo, hi) = SUPPORTED;
    let reason = match (minor, version_hex, runtime) {
        (None, _, _) => Some("the build does not say which version it is".to_string()),
        (Some(m), _, _) if m < lo => Some(format!(
            "CPython {version} is older than 3.{lo}, whose frame layout memtrace reads"
        )),
        (Some(m), _, _) if m > hi => Some(format!(
            "CPython {version} is newer than 3.{hi}, the newest memtrace knows"
        )),
        (_, None, _) => Some("the build has no Py_Version symbol".to_string()),
        (_, _, None) => Some("no _PyRuntime symbol: a stripped build".to_string()),
        (Some(m), _, _) if m >= 13 && !debug_offsets => Some(
            "_PyRuntime does not start with _Py_DebugOffsets (cookie xdebugpy missing)".to_string(),
        ),
        _ if free_threaded => Some(format!(
            "CPython {version} is a free-threaded build (no GIL: mimalloc instead of pymalloc, 32-byte object headers), which memtrace does not read"
        )),
        (Some(m), _, _) if m >= 14 && tstate_tls.is_none() => Some(
            "no thread-local access in _PyThreadState_GetCurrent: the thread state cannot be found"
                .to_string(),
        ),
        _ => None,
    };
    Ok(PythonRuntime {
        version,
        version_hex,
        binary: shown.to_path_buf(),
        runtime_symbol: runtime.map(|(addr, _, _)| addr),
        runtime_size: runtime.map_or(0, |(_, size, _)| size),
        first_load,
        debug_offsets,
        code_type_symbol,
        malloc_refs,
        supported: reason.is_none(),
        unsupported_reason: reason,
        tstate_tls,
        prefix: None,
    })
}

/// Where `_PyRuntime` is in a process: the load bias of the interpreter ELF
/// (from the mapping of its first page) plus the symbol's address.
pub fn runtime_address(maps: &FileMappings, py: &PythonRuntime) -> Option<u64> {
    let symbol = py.runtime_symbol?;
    let start = maps.start_of(&py.binary)?;
    let bias = start.checked_sub(py.first_load & !0xfff)?;
    bias.checked_add(symbol)
}

/// The main interpreter's garbage collector, as `gc.get_threshold()`,
/// `gc.get_count()` and `gc.get_stats()` give it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct GcStats {
    pub enabled: bool,
    pub thresholds: [i32; 3],
    /// Per generation: allocations minus deallocations since the last
    /// collection (generation 0), or collections of the younger one.
    pub counts: [i32; 3],
    pub collections: [i64; 3],
    pub collected: [i64; 3],
    pub uncollectable: [i64; 3],
}

/// `struct gc_generation` (a list head, threshold, count): 24 bytes, and
/// the layout of `struct _gc_runtime_state` around it in default (GIL)
/// builds: `enabled` 12 bytes before the first generation, the three
/// generations, then (3.11 to 3.13) the `generation0` pointer, the
/// permanent generation and `generation_stats[3]` of (collections,
/// collected, uncollectable). 3.14 moved `generation0` to the end; 3.15
/// keeps the statistics behind a pointer, in ring buffers, which memtrace
/// does not read.
const GEN_SIZE: usize = 24;
const ENABLED_BEFORE_GEN0: usize = 12;

/// Where `generation_stats[3]` is from the first generation, per minor
/// version.
pub fn stats_after_gen0(minor: u32) -> Option<usize> {
    match minor {
        11..=13 => Some(3 * GEN_SIZE + 8 + GEN_SIZE),
        14 => Some(3 * GEN_SIZE + GEN_SIZE),
        _ => None,
    }
}

/// Bytes from the first generation to the end of the statistics.
fn gc_span(stats_after: usize) -> usize {
    stats_after + 3 * 24
}

fn i32_at(b: &[u8], at: usize) -> Option<i32> {
    Some(i32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn i64_at(b: &[u8], at: usize) -> Option<i64> {
    Some(i64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Decodes the GC state whose first generation is at `gen0` in `b`, its
/// statistics `stats_after` bytes further.
pub fn gc_stats_at(b: &[u8], gen0: usize, stats_after: usize) -> Option<GcStats> {
    let enabled = i32_at(b, gen0.checked_sub(ENABLED_BEFORE_GEN0)?)?;
    let mut out = GcStats {
        enabled: enabled == 1,
        ..GcStats::default()
    };
    for g in 0..3 {
        out.thresholds[g] = i32_at(b, gen0 + g * GEN_SIZE + 16)?;
        out.counts[g] = i32_at(b, gen0 + g * GEN_SIZE + 20)?;
        let stats = gen0 + stats_after + g * 24;
        out.collections[g] = i64_at(b, stats)?;
        out.collected[g] = i64_at(b, stats + 8)?;
        out.uncollectable[g] = i64_at(b, stats + 16)?;
    }
    Some(out)
}

/// `sizeof(struct gc_stats)` of 3.15 (GIL builds): a young ring of 11
/// `gc_generation_stats` of 64 bytes and its index, two old rings of 3,
/// and `update_seq`. The table gives the size the build has; another one
/// is not read.
const GC_STATS_315: u64 = 1120;
/// Each ring: where its items start, how many, where its `int8_t index` is.
const GC_RINGS_315: [(usize, usize, usize); 3] = [(0, 11, 704), (712, 3, 904), (912, 3, 1104)];

/// 3.15's GC: thresholds and counts in the interpreter's GC state (at the
/// offset `_Py_DebugOffsets` gives), the statistics behind its pointer, in
/// ring buffers whose current item is what `gc.get_stats()` shows.
fn gc_stats_315(pid: u32, py: &PythonRuntime, runtime: u64) -> Option<GcStats> {
    use super::pydebug::{DebugOffsets, table_size};
    let word = |b: &[u8], at: usize| i64_at(b, at).map(|v| v as u64);
    let table = DebugOffsets::parse(
        &read_memory(pid, runtime, table_size(15)?)?,
        py.version_hex?,
    )
    .ok()?;
    if table.get("gc", "generation_stats_size")? != GC_STATS_315 {
        return None;
    }
    let head = table.get("runtime_state", "interpreters_head")?;
    let interp = word(&read_memory(pid, runtime.checked_add(head)?, 8)?, 0)?;
    let gc = interp.checked_add(table.get("interpreter_state", "gc")?)?;
    // `int enabled; int debug;` then the three generations.
    let state = read_memory(pid, gc, 8 + 3 * GEN_SIZE)?;
    let pointer_at = gc.checked_add(table.get("gc", "generation_stats")?)?;
    let stats_at = word(&read_memory(pid, pointer_at, 8)?, 0)?;
    let stats = read_memory(pid, stats_at, GC_STATS_315 as usize)?;
    let mut out = GcStats {
        enabled: i32_at(&state, 0)? == 1,
        ..GcStats::default()
    };
    for (g, &(items, len, index_at)) in GC_RINGS_315.iter().enumerate() {
        out.thresholds[g] = i32_at(&state, 8 + g * GEN_SIZE + 16)?;
        out.counts[g] = i32_at(&state, 8 + g * GEN_SIZE + 20)?;
        let index = usize::try_from(*stats.get(index_at)? as i8)
            .ok()
            .filter(|&i| i < len)?;
        let item = items + index * 64;
        out.collections[g] = i64_at(&stats, item + 16)?;
        out.collected[g] = i64_at(&stats, item + 24)?;
        out.uncollectable[g] = i64_at(&stats, item + 32)?;
    }
    Some(out)
}

/// Finds the GC state in the bytes of `_PyRuntime` (the main interpreter
/// is embedded in it) by its shape: three generations whose list heads are
/// pointers, with the default thresholds of this version (700 or 2000, 10,
/// 10), `enabled` 0 or 1, and sane counters. Searched once per build, in
/// the first process seen (before an application can change thresholds).
pub fn find_gc(runtime: &[u8], minor: u32) -> Option<usize> {
    let young = if minor >= 13 { 2000 } else { 700 };
    let stats_after = stats_after_gen0(minor)?;
    // The generations are 8-aligned (they start with pointers).
    let first = ENABLED_BEFORE_GEN0.next_multiple_of(8);
    (first..runtime.len().saturating_sub(gc_span(stats_after)))
        .step_by(8)
        .find(|&gen0| {
            let Some(gc) = gc_stats_at(runtime, gen0, stats_after) else {
                return false;
            };
            let heads_are_pointers = (0..3).all(|g| {
                i64_at(runtime, gen0 + g * GEN_SIZE).is_some_and(|p| p > 0x1000 && p % 8 == 0)
            });
            gc.thresholds == [young, 10, 10]
                && heads_are_pointers
                && i32_at(runtime, gen0 - ENABLED_BEFORE_GEN0).is_some_and(|e| e == 0 || e == 1)
                && gc.counts.iter().all(|&c| c >= 0)
                && (0..3).all(|g| {
                    gc.collections[g] >= 0 && gc.collected[g] >= 0 && gc.uncollectable[g] >= 0
                })
        })
}

/// Reads `len` bytes of a process's memory.
pub fn read_memory(pid: u32, addr: u64, len: usize) -> Option<Vec<u8>> {
    use std::os::unix::fs::FileExt as _;
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).ok()?;
    let mut buf = vec![0u8; len];
    mem.read_exact_at(&mut buf, addr).ok()?;
    Some(buf)
}

/// Addresses of RIP-relative memory operands in x86_64 code at `addr`:
/// `mov`/`lea` to a 64-bit register (REX.W 8b/8d, ModRM mod 00 rm 101) and
/// `jmp *disp(%rip)` (ff 25). Enough for the few instructions of
/// `PyObject_Malloc`; a false match is weeded out by reading memory.
pub fn rip_targets(addr: u64, code: &[u8]) -> Vec<u64> {
    let disp_at = |i: usize| {
        code.get(i..i + 4)
            .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64)
    };
    let mut out = Vec::new();
    for i in 0..code.len() {
        let (disp, next) = match code[i..] {
            [0x48 | 0x4c, 0x8b | 0x8d, modrm, ..] if modrm & 0xc7 == 0x05 => {
                (disp_at(i + 3), i + 7)
            }
            [0xff, 0x25, ..] => (disp_at(i + 2), i + 6),
            _ => continue,
        };
        if let Some(d) = disp
            && let Some(target) = addr
                .checked_add(next as u64)
                .and_then(|n| n.checked_add_signed(d))
            && !out.contains(&target)
        {
            out.push(target);
        }
    }
    out
}

/// Thread-state and frame offsets of one minor version (x86_64, GIL
/// builds), as CPython's headers lay them out; the tests check them
/// against live interpreters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameLayout {
    /// `_PyRuntime`'s `autoTSSkey`: `{int _is_initialized; pthread_key_t _key}`.
    pub tss: u64,
    pub thread_id: u32,
    pub tstate_frame: u32,
    pub cframe_frame: u32,
    pub code: u32,
    pub previous: u32,
    pub instr: u32,
    pub owner: u32,
    pub owner_cstack: u32,
    /// The object allocator table `{ctx, malloc, calloc, realloc, free}`
    /// inside `_PyRuntime` (3.12+); 3.11 has it as a static of its own.
    pub alloc_table: Option<u64>,
}

pub fn frame_layout(minor: u32) -> Option<FrameLayout> {
    use memtrace_common::{PY_NO_CFRAME, PY_NO_OWNER};
    // FRAME_OWNED_BY_CSTACK: the shim frame at each entry from C (3.12+).
    const CSTACK: u32 = 3;
    Some(match minor {
        11 => FrameLayout {
            tss: 592,
            thread_id: 152,
            tstate_frame: 56,
            cframe_frame: 8,
            code: 32,
            previous: 48,
            instr: 56,
            owner: 69,
            owner_cstack: PY_NO_OWNER,
            alloc_table: None,
        },
        12 => FrameLayout {
            tss: 1544,
            thread_id: 136,
            tstate_frame: 56,
            cframe_frame: 0,
            code: 0,
            previous: 8,
            instr: 56,
            owner: 70,
            owner_cstack: CSTACK,
            alloc_table: Some(0xb0),
        },
        13 => FrameLayout {
            tss: 2160,
            thread_id: 152,
            tstate_frame: 72,
            cframe_frame: PY_NO_CFRAME,
            code: 0,
            previous: 8,
            instr: 56,
            owner: 70,
            owner_cstack: CSTACK,
            alloc_table: Some(0x310),
        },
        _ => return None,
    })
}

/// Frames of 3.14 and later: the entry frames the interpreter pushes are
/// `FRAME_OWNED_BY_INTERPRETER` (3), the thread's base frame (3.15) 4:
/// every owner from 3 on is skipped.
const OWNED_BY_INTERPRETER: u32 = 3;
/// Bytes of a frame the kernel reads (`FRAME_HEADER` in memtrace-ebpf):
/// every field it takes must be inside.
const KERNEL_FRAME_HEADER: u32 = 80;

/// A 3.14+ process's thread-state and frame offsets, from its validated
/// `_Py_DebugOffsets`, and where each thread's `_Py_tss_tstate` is from its
/// fs base. `Ok(None)`: not yet (no interpreter or thread yet).
fn layout_from_table(
    pid: u32,
    py: &PythonRuntime,
    runtime: u64,
    bias: u64,
    minor: u32,
) -> Result<Option<(FrameLayout, i32)>, String> {
    use super::pydebug::{DebugOffsets, table_size};
    let version_hex = py.version_hex.ok_or("the build does not say its version")?;
    let size = table_size(minor).ok_or(format!("no _Py_DebugOffsets layout for 3.{minor}"))?;
    let Some(bytes) = read_memory(pid, runtime, size) else {
        return Ok(None);
    };
    let table = DebugOffsets::parse(&bytes, version_hex)?;
    if table.free_threaded {
        return Err("a free-threaded build, which memtrace does not read".into());
    }
    let off = |section: &str, field: &str| table.offset(section, field);
    let layout = FrameLayout {
        tss: 0,
        thread_id: off("thread_state", "thread_id")?,
        tstate_frame: off("thread_state", "current_frame")?,
        cframe_frame: memtrace_common::PY_NO_CFRAME,
        code: off("interpreter_frame", "executable")?,
        previous: off("interpreter_frame", "previous")?,
        instr: off("interpreter_frame", "instr_ptr")?,
        owner: off("interpreter_frame", "owner")?,
        owner_cstack: OWNED_BY_INTERPRETER,
        alloc_table: None,
    };
    for (name, at) in [
        ("executable", layout.code),
        ("previous", layout.previous),
        ("instr_ptr", layout.instr),
        ("owner", layout.owner),
    ] {
        if at >= KERNEL_FRAME_HEADER {
            return Err(format!(
                "_PyInterpreterFrame.{name} is at {at}, past the {KERNEL_FRAME_HEADER} bytes the kernel reads"
            ));
        }
    }
    // The interpreter exists once its runtime lists one.
    let head = off("runtime_state", "interpreters_head")?;
    match read_memory(pid, runtime + u64::from(head), 8) {
        Some(b) if b.iter().any(|&x| x != 0) => {}
        _ => return Ok(None),
    }
    let tls = match py
        .tstate_tls
        .ok_or("no thread-local access to the thread state")?
    {
        TlsRef::FsOffset(o) => o,
        TlsRef::GotSlot(slot) => {
            let b = read_memory(pid, slot.wrapping_add(bias), 8)
                .ok_or("its TLS GOT slot is unreadable")?;
            let v = i64::from_le_bytes(b.try_into().unwrap_or([0; 8]));
            i32::try_from(v)
                .map_err(|_| format!("its TLS offset {v} is not a static TLS offset"))?
        }
    };
    if tls >= 0 {
        return Err(format!(
            "its thread-state TLS offset {tls} is not below the thread pointer"
        ));
    }
    Ok(Some((layout, tls)))
}

/// The object allocator table's four functions in a process (malloc,
/// calloc, realloc, free), when `at` holds one: each must lie in the
/// interpreter's code. Returned as (runtime address, file offset).
fn alloc_table_at(pid: u32, at: u64, code: &[(u64, u64, u64)]) -> Option<[(u64, u64); 4]> {
    let bytes = read_memory(pid, at, 40)?;
    let mut out = [(0, 0); 4];
    for (i, slot) in out.iter_mut().enumerate() {
        let ptr = u64::from_le_bytes(bytes[8 + 8 * i..16 + 8 * i].try_into().ok()?);
        let &(start, _, offset) = code.iter().find(|&&(s, e, _)| (s..e).contains(&ptr))?;
        *slot = (ptr, ptr - start + offset);
    }
    Some(out)
}

/// How many times x86_64 code takes the address of `target` other than
/// to call or jump there: as a 32-bit immediate (non-PIE) or RIP-relative
/// `lea`. A PGO build that inlined pymalloc into its callers compares the
/// allocator table's pointer with it at every such site (Debian's static
/// python3.11 does so about 200 times); an uninlined build has a handful.
pub fn address_taken(text: &[u8], text_addr: u64, target: u64) -> usize {
    let abs = u32::try_from(target).ok();
    (2..text.len().saturating_sub(4))
        .filter(|&i| {
            let v = u32::from_le_bytes([text[i], text[i + 1], text[i + 2], text[i + 3]]);
            if abs == Some(v) {
                return true;
            }
            let next = text_addr.checked_add(i as u64 + 4);
            text[i - 1] & 0xc7 == 0x05
                && text[i - 2] == 0x8d
                && next.and_then(|n| n.checked_add_signed(v as i32 as i64)) == Some(target)
        })
        .count()
}

/// More address-taken references than this: pymalloc is inlined.
const INLINED_REFS: usize = 16;

/// Whether the ELF's `.text` inlines the allocator function at `target`.
fn inlines(open: &Path, target: u64) -> Option<bool> {
    let data = crate::bounds::read_object(open).ok()?;
    let file = object::File::parse(&*data).ok()?;
    let text = file.section_by_name(".text")?;
    let refs = address_taken(text.data().ok()?, text.address(), target);
    Some(refs > INLINED_REFS)
}

/// What the kernel needs to read one process's Python frames, and where
/// its object allocator's functions are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PythonFrames {
    pub info: memtrace_common::PyProcInfo,
    pub code: super::pycode::CodeLayout,
    /// File offsets of `_PyObject_Malloc`, `_Calloc`, `_Realloc`, `_Free`
    /// in the interpreter ELF; `Err`: why they are not probed.
    pub pymalloc: Result<[u64; 4], String>,
}

/// Interpreter builds already inspected, by (device, inode) of the file,
/// and where their GC state is inside `_PyRuntime`.
#[derive(Debug, Default)]
pub struct PythonBuilds {
    seen: HashMap<(u64, u64), Option<PythonRuntime>>,
    gc_offsets: HashMap<(PathBuf, Option<u32>), usize>,
    /// Whether each build inlines pymalloc, by binary and allocator address.
    inlined: HashMap<(PathBuf, u64), bool>,
}

impl PythonBuilds {
    /// The interpreter `pid` runs, if any (inspected once per file).
    ///
    /// A `python3.X` executable without the interpreter's symbols links a
    /// libpython that the dynamic loader may not have mapped yet (just
    /// after exec): that is no answer until `last_look`, when it is
    /// reported as it is (a stripped build).
    pub fn of_process(
        &mut self,
        pid: u32,
        maps: &FileMappings,
        last_look: bool,
    ) -> Option<PythonRuntime> {
        let shown = interpreter_path(pid, maps)?;
        let relative = shown.strip_prefix("/").unwrap_or(&shown);
        let open = Path::new(&format!("/proc/{pid}/root")).join(relative);
        let meta = std::fs::metadata(&open).ok()?;
        let runtime = self
            .seen
            .entry((meta.dev(), meta.ino()))
            .or_insert_with(|| match inspect(&shown, &open) {
                Ok(mut runtime) => {
                    let root = Path::new(&format!("/proc/{pid}/root")).to_path_buf();
                    runtime.prefix = runtime
                        .minor()
                        .and_then(|minor| find_prefix(&root, &shown, minor));
                    Some(runtime)
                }
                Err(e) => {
                    tracing::warn!(pid, error = %e, "cannot inspect the Python interpreter");
                    None
                }
            })
            .clone()?;
        let is_library = shown
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("libpython"));
        let holds_interpreter = runtime.version_hex.is_some() || runtime.runtime_symbol.is_some();
        (is_library || holds_interpreter || last_look).then_some(runtime)
    }

    /// The main interpreter's GC state in `pid`, at `runtime` (the address
    /// of its `_PyRuntime`). The GC's place is found once per build, in a
    /// process whose interpreter is initialised (just after exec it is not:
    /// then this is `None`, and the caller asks again later).
    pub fn gc_stats(&mut self, pid: u32, py: &PythonRuntime, runtime: u64) -> Option<GcStats> {
        if !py.supported {
            return None;
        }
        let minor = py.version_hex.map(|h| (h >> 16) & 0xff)?;
        if minor == 15 {
            return gc_stats_315(pid, py, runtime);
        }
        let key = (py.binary.clone(), py.version_hex);
        let offset = match self.gc_offsets.get(&key) {
            Some(&known) => known,
            None => {
                let size = usize::try_from(py.runtime_size).ok()?.min(1 << 20);
                let found = read_memory(pid, runtime, size).and_then(|b| find_gc(&b, minor))?;
                self.gc_offsets.insert(key, found);
                found
            }
        };
        let start = offset - ENABLED_BEFORE_GEN0;
        let stats_after = stats_after_gen0(minor)?;
        let bytes = read_memory(
            pid,
            runtime + start as u64,
            gc_span(stats_after) + ENABLED_BEFORE_GEN0,
        )?;
        gc_stats_at(&bytes, ENABLED_BEFORE_GEN0, stats_after)
    }

    /// Where `gc_stats` found the GC's `generation_stats[3]` of this build,
    /// in a process whose `_PyRuntime` is at `runtime` (after a successful
    /// `gc_stats`).
    pub fn gc_stats_address(&self, py: &PythonRuntime, runtime: u64) -> Option<u64> {
        let offset = self.gc_offsets.get(&(py.binary.clone(), py.version_hex))?;
        let minor = (py.version_hex? >> 16) & 0xff;
        runtime.checked_add((offset + stats_after_gen0(minor)?) as u64)
    }

    /// Live asyncio tasks of a 3.14+ process whose `_asyncio` module's
    /// table is `asyncio` (see `pyasyncio`); `None` when not readable.
    pub fn asyncio_tasks(
        &self,
        pid: u32,
        py: &PythonRuntime,
        runtime: u64,
        asyncio: &super::pyasyncio::AsyncioOffsets,
    ) -> Option<u64> {
        use super::pydebug::{DebugOffsets, table_size};
        let minor = py.minor()?;
        let table = DebugOffsets::parse(
            &read_memory(pid, runtime, table_size(minor)?)?,
            py.version_hex?,
        )
        .ok()?;
        let mem = super::pycode::ProcMemory::open(pid).ok()?;
        super::pyasyncio::count_tasks(&mem, &table, runtime, asyncio)
    }

    /// How the kernel reads `pid`'s Python frames. `Ok(None)`: not yet
    /// (the interpreter has not created its thread-state key: just after
    /// exec); `Err`: never, and why.
    pub fn frames(
        &mut self,
        pid: u32,
        maps: &FileMappings,
        py: &PythonRuntime,
        runtime: u64,
    ) -> Result<Option<PythonFrames>, String> {
        use super::pycode::{CodeLayout, ProcMemory};
        let minor = py
            .version_hex
            .map(|h| (h >> 16) & 0xff)
            .ok_or("the build does not say its version")?;
        let bias = runtime.wrapping_sub(py.runtime_symbol.ok_or("no _PyRuntime symbol")?);
        let (layout, key, tls_offset) = if minor >= 14 {
            let Some((layout, tls)) = layout_from_table(pid, py, runtime, bias, minor)? else {
                return Ok(None);
            };
            (layout, 0, Some(tls))
        } else {
            let layout = frame_layout(minor).ok_or(format!("no frame layout for 3.{minor}"))?;
            let Some(tss) = read_memory(pid, runtime + layout.tss, 8) else {
                return Ok(None);
            };
            let initialized = i32::from_le_bytes([tss[0], tss[1], tss[2], tss[3]]);
            let key = u32::from_le_bytes([tss[4], tss[5], tss[6], tss[7]]);
            if initialized != 1 {
                return Ok(None);
            }
            if key >= memtrace_common::GLIBC_KEYS_1STBLOCK {
                return Err(format!(
                    "its thread-state key is {key}, past glibc's first block of 32"
                ));
            }
            (layout, key, None)
        };
        let code_type = py
            .code_type_symbol
            .ok_or("no PyCode_Type symbol")?
            .wrapping_add(bias);
        let mem = ProcMemory::open(pid).map_err(|e| format!("cannot read its memory: {e}"))?;
        let code = CodeLayout::discover(&mem, code_type, minor).map_err(|e| e.to_string())?;
        let to_u32 = |v: u64| u32::try_from(v).map_err(|_| "an offset past 4 GiB".to_string());
        let info = memtrace_common::PyProcInfo {
            tss_key: key,
            tstate_frame: layout.tstate_frame,
            cframe_frame: layout.cframe_frame,
            thread_id: layout.thread_id,
            frame_code: layout.code,
            frame_previous: layout.previous,
            frame_instr: layout.instr,
            frame_owner: layout.owner,
            owner_cstack: layout.owner_cstack,
            code_adaptive: to_u32(code.code_adaptive)?,
            code_firstlineno: to_u32(code.firstlineno)?,
            flags: if tls_offset.is_some() {
                use memtrace_common::{PY_FLAG_OWNER_AT_LEAST, PY_FLAG_TAGGED, PY_FLAG_TLS};
                PY_FLAG_TLS | PY_FLAG_TAGGED | PY_FLAG_OWNER_AT_LEAST
            } else {
                0
            },
            tls_offset: tls_offset.unwrap_or(0) as u32,
            _pad: 0,
        };
        let pymalloc = self.pymalloc(pid, maps, py, runtime, bias, &layout);
        Ok(Some(PythonFrames {
            info,
            code,
            pymalloc,
        }))
    }

    /// File offsets of the object allocator's functions, found through the
    /// allocator table the process uses now.
    fn pymalloc(
        &mut self,
        pid: u32,
        maps: &FileMappings,
        py: &PythonRuntime,
        runtime: u64,
        bias: u64,
        layout: &FrameLayout,
    ) -> Result<[u64; 4], String> {
        let code = maps.code_of(&py.binary);
        let mut candidates: Vec<u64> = layout
            .alloc_table
            .map(|t| runtime + t)
            .into_iter()
            .collect();
        for &r in &py.malloc_refs {
            let at = r.wrapping_add(bias);
            candidates.extend([at, at.wrapping_sub(8)]);
        }
        let table = candidates
            .into_iter()
            .find_map(|at| alloc_table_at(pid, at, &code))
            .ok_or("its object allocator table was not found")?;
        let malloc = table[0].0.wrapping_sub(bias);
        let relative = py.binary.strip_prefix("/").unwrap_or(&py.binary);
        let open = Path::new(&format!("/proc/{pid}/root")).join(relative);
        let inlined = *self
            .inlined
            .entry((py.binary.clone(), malloc))
            .or_insert_with(|| inlines(&open, malloc).unwrap_or(false));
        if inlined {
            return Err("this build inlines its object allocator into the callers (PGO): objects of 512 bytes or less are attributed through page faults".into());
        }
        Ok(table.map(|(_, offset)| offset))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_found_like_getpath_under_the_process_root() {
        let root = std::env::temp_dir().join(format!("memtrace-prefix-{}", std::process::id()));
        let stdlib = root.join("usr/lib/python3.11");
        std::fs::create_dir_all(&stdlib).unwrap();
        std::fs::write(stdlib.join("os.py"), "").unwrap();
        let found = |binary: &str, minor| find_prefix(&root, Path::new(binary), minor);
        assert_eq!(
            found("/usr/bin/python3.11", 11),
            Some(PathBuf::from("/usr"))
        );
        // uWSGI's libpython: two levels below the prefix.
        assert_eq!(
            found("/usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0", 11),
            Some(PathBuf::from("/usr"))
        );
        assert_eq!(found("/usr/bin/python3.12", 12), None, "another version");
        let py = PythonRuntime {
            version: "3.11.2".into(),
            version_hex: None,
            binary: PathBuf::from("/usr/bin/python3.11"),
            runtime_symbol: None,
            runtime_size: 0,
            first_load: 0,
            debug_offsets: false,
            tstate_tls: None,
            code_type_symbol: None,
            malloc_refs: Vec::new(),
            supported: true,
            unsupported_reason: None,
            prefix: Some(PathBuf::from("/usr")),
        };
        assert_eq!(py.stdlib_dir().as_deref(), Some("/usr/lib/python3.11/"));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn interpreter_files_by_name() {
        let minor = |p: &str| interpreter_file(Path::new(p));
        assert_eq!(minor("/usr/bin/python3.11"), Some(Some(11)));
        assert_eq!(
            minor("/usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0"),
            Some(Some(11))
        );
        assert_eq!(minor("/opt/lib/libpython3.13d.so"), Some(Some(13)));
        assert_eq!(minor("/usr/bin/python3"), Some(None));
        assert_eq!(minor("/usr/lib/libpython3.11.a"), None);
        assert_eq!(minor("/usr/bin/uwsgi"), None);
        assert_eq!(minor("/usr/bin/python2.7"), None);
    }

    #[test]
    fn version_hex_decodes() {
        assert_eq!(version_string(0x030B_02F0), "3.11.2");
        assert_eq!(version_string(0x030D_00C1), "3.13.0rc1");
        assert_eq!(version_string(0x030E_00A3), "3.14.0a3");
    }

    #[test]
    fn this_machines_interpreters() {
        // Debian's static python3.11 runs gunicorn here (the tests install it).
        let debian = Path::new("/usr/bin/python3.11");
        if debian.exists() {
            let r = inspect(debian, debian).unwrap();
            assert!(r.version.starts_with("3.11."), "{r:?}");
            assert!(r.supported && r.runtime_symbol.is_some() && !r.debug_offsets);
        }
        // Not an ELF: a clear error, no panic.
        let script = Path::new("/etc/hostname");
        if script.exists() {
            assert!(matches!(
                inspect(script, script),
                Err(PythonError::NotElf { .. })
            ));
        }
    }

    /// A Python child running `code`, which prints `ready` once set up;
    /// killed on drop.
    struct ChildPython(std::process::Child);

    impl ChildPython {
        fn spawn(python: &Path, code: &str) -> Self {
            let mut child = std::process::Command::new(python)
                .args(["-c", code])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("{}: {e}", python.display()));
            let mut line = String::new();
            std::io::BufRead::read_line(
                &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
                &mut line,
            )
            .unwrap();
            assert_eq!(line.trim(), "ready", "{}", python.display());
            Self(child)
        }

        fn pid(&self) -> u32 {
            self.0.id()
        }
    }

    impl Drop for ChildPython {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[test]
    fn reads_the_gc_of_a_child_python() {
        let python = Path::new("/usr/bin/python3.11");
        if !python.exists() {
            return;
        }
        let child = ChildPython::spawn(
            python,
            "import gc, time; gc.collect(); gc.collect(); print('ready', flush=True); time.sleep(30)",
        );
        let pid = child.pid();
        let mut builds = PythonBuilds::default();
        let maps = FileMappings::of(pid);
        let py = builds.of_process(pid, &maps, true).expect("python found");
        let runtime = runtime_address(&maps, &py);
        let gc = runtime.and_then(|r| builds.gc_stats(pid, &py, r));
        drop(child);
        let gc = gc.unwrap_or_else(|| panic!("{py:?} at {runtime:x?}"));
        assert_eq!(gc.thresholds, [700, 10, 10]);
        assert_eq!(gc.collections[2], 2, "{gc:?}");
    }

    #[test]
    fn rip_relative_operands_are_found() {
        // mov 0x10(%rip),%rdi ; jmp *0x8(%rip) ; mov %rdi,%rsi (no operand)
        let code = [
            0x48, 0x8b, 0x3d, 0x10, 0, 0, 0, 0xff, 0x25, 0x08, 0, 0, 0, 0x48, 0x89, 0xfe,
        ];
        assert_eq!(
            rip_targets(0x1000, &code),
            vec![0x1000 + 7 + 0x10, 0x1000 + 13 + 8]
        );
        // A negative displacement.
        let back = [0x4c, 0x8b, 0x05, 0xf0, 0xff, 0xff, 0xff];
        assert_eq!(rip_targets(0x1000, &back), vec![0x1000 + 7 - 0x10]);
    }

    #[test]
    fn address_taken_counts_immediates_and_leas_not_calls() {
        let target: u64 = 0x4f_b450;
        let mut text = vec![0x90u8; 64];
        // cmp $target,%rax (48 3d imm32) at 4, lea target(%rip),%rdx at 20.
        text[4..6].copy_from_slice(&[0x48, 0x3d]);
        text[6..10].copy_from_slice(&(target as u32).to_le_bytes());
        let text_addr = 0x40_0000u64;
        let next = text_addr + 27;
        let disp = (target as i64 - next as i64) as i32;
        text[20..23].copy_from_slice(&[0x48, 0x8d, 0x15]);
        text[23..27].copy_from_slice(&disp.to_le_bytes());
        // call target (e8 rel32) at 40: not an address taken.
        let call_next = text_addr + 45;
        text[40] = 0xe8;
        text[41..45].copy_from_slice(&((target as i64 - call_next as i64) as i32).to_le_bytes());
        assert_eq!(address_taken(&text, text_addr, target), 2);
    }

    /// A live interpreter's frames set-up: the thread-state key, the code
    /// layout, and whether its object allocator can be probed.
    fn frames_of(python: &Path) -> (PythonRuntime, PythonFrames) {
        let child = ChildPython::spawn(
            python,
            "import time; print('ready', flush=True); time.sleep(30)",
        );
        let pid = child.pid();
        let mut builds = PythonBuilds::default();
        let maps = FileMappings::of(pid);
        let py = builds.of_process(pid, &maps, true).expect("python found");
        let runtime = runtime_address(&maps, &py).expect("_PyRuntime mapped");
        let frames = builds.frames(pid, &maps, &py, runtime);
        drop(child);
        (
            py.clone(),
            frames
                .unwrap_or_else(|e| panic!("{py:?}: {e}"))
                .expect("initialised"),
        )
    }

    #[test]
    fn frames_of_this_machines_interpreters() {
        let (_, debian) = frames_of(Path::new("/usr/bin/python3.11"));
        assert_eq!(debian.info.thread_id, 152);
        assert_eq!(debian.code.code_adaptive, 184);
        let why = debian
            .pymalloc
            .expect_err("Debian's PGO build inlines pymalloc");
        assert!(why.contains("inlines"), "{why}");
        for minor in ["3.12", "3.13"] {
            let root = Path::new("/root/.pyenv/versions");
            let dir = std::fs::read_dir(root)
                .expect("pyenv's interpreters")
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.to_string_lossy().contains(&format!("/{minor}.")))
                .max()
                .unwrap_or_else(|| panic!("pyenv has {minor}"));
            let (py, frames) = frames_of(&dir.join("bin").join(format!("python{minor}")));
            let entries = frames
                .pymalloc
                .unwrap_or_else(|e| panic!("{minor} calls pymalloc through its table: {e}"));
            // The four functions are distinct and in libpython's code.
            let mut distinct = entries.to_vec();
            distinct.dedup();
            assert_eq!(distinct.len(), 4, "{entries:x?}");
            assert!(py.binary.to_string_lossy().contains("libpython"));
            assert!(frames.info.tss_key < 32);
        }
    }

    #[test]
    fn thread_state_tls_is_found_in_the_accessors_code() {
        // Debian sid's python3.15: endbr64; mov %fs:-0x20,%rax; ret.
        let le = [
            0xf3, 0x0f, 0x1e, 0xfa, 0x64, 0x48, 0x8b, 0x04, 0x25, 0xe0, 0xff, 0xff, 0xff, 0xc3,
        ];
        assert_eq!(tls_access(0x79f7a0, &le), Some(TlsRef::FsOffset(-0x20)));
        // A shared library: mov 0x1000(%rip),%rax; mov %fs:(%rax),%rax.
        let ie = [
            0x48, 0x8b, 0x05, 0x00, 0x10, 0x00, 0x00, 0x64, 0x48, 0x8b, 0x00, 0xc3,
        ];
        assert_eq!(
            tls_access(0x5000, &ie),
            Some(TlsRef::GotSlot(0x5000 + 7 + 0x1000))
        );
        // Anything else (a call to __tls_get_addr): not found.
        assert_eq!(tls_access(0, &[0xe8, 0, 0, 0, 0, 0xc3]), None);
        assert_eq!(tls_access(0, &le[..8]), None, "cut short");
    }

    #[test]
    fn gc_statistics_follow_each_versions_layout() {
        assert_eq!(stats_after_gen0(13), Some(104));
        // 3.14 moved generation0 after the statistics.
        assert_eq!(stats_after_gen0(14), Some(96));
        // 3.15: behind a pointer, not read.
        assert_eq!(stats_after_gen0(15), None);
    }
}
