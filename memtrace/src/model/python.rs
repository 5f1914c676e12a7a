//! CPython in a traced process: which interpreter it runs (a static
//! `python3.X` executable, or `libpython3.X.so` as uWSGI and pyenv builds
//! map it), its exact version from the ELF (`Py_Version`, 3.11+), and
//! whether memtrace can read its frames (3.11, 3.12 and 3.13, with the
//! `_PyRuntime` symbol; on 3.13+ the `_Py_DebugOffsets` cookie
//! `xdebugpy` at its start).
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

/// The oldest and newest minor versions whose frames memtrace reads.
pub const SUPPORTED: (u32, u32) = (11, 13);

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
    /// Whether memtrace can read this interpreter's frames.
    pub supported: bool,
    /// Why not, in one line.
    pub unsupported_reason: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum PythonError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
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
pub fn interpreter_path(pid: u32) -> Option<PathBuf> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    let mapped = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .map(Path::new)
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libpython3."))
                && interpreter_file(p).is_some()
        });
    if let Some(lib) = mapped {
        return Some(lib.to_path_buf());
    }
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
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
    let data = std::fs::read(open).map_err(|source| PythonError::Read {
        path: open.to_path_buf(),
        source,
    })?;
    let file = object::File::parse(&*data).map_err(|e| PythonError::NotElf {
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
    let first_load = file.segments().map(|s| s.address()).min().unwrap_or(0);
    let debug_offsets = runtime.is_some_and(|(_, _, b)| b == b"xdebugpy");
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
        supported: reason.is_none(),
        unsupported_reason: reason,
    })
}

/// Where `_PyRuntime` is in a process: the load bias of the interpreter ELF
/// (from the mapping of its first page) plus the symbol's address.
pub fn runtime_address(pid: u32, py: &PythonRuntime) -> Option<u64> {
    let symbol = py.runtime_symbol?;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    let start = maps.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let range = f.next()?;
        let offset = f.nth(1)?;
        let path = f.nth(2)?;
        (Path::new(path) == py.binary && u64::from_str_radix(offset, 16).ok()? == 0)
            .then(|| u64::from_str_radix(range.split('-').next()?, 16).ok())
            .flatten()
    })?;
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
/// the layout of `struct _gc_runtime_state` around it, the same in 3.11,
/// 3.12 and 3.13 (default builds): `enabled` 12 bytes before the first
/// generation, the three generations, `generation0`, the permanent
/// generation, then `generation_stats[3]` of (collections, collected,
/// uncollectable).
const GEN_SIZE: usize = 24;
const ENABLED_BEFORE_GEN0: usize = 12;
const STATS_AFTER_GEN0: usize = 3 * GEN_SIZE + 8 + GEN_SIZE;
const GC_SPAN: usize = STATS_AFTER_GEN0 + 3 * 24;

fn i32_at(b: &[u8], at: usize) -> Option<i32> {
    Some(i32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn i64_at(b: &[u8], at: usize) -> Option<i64> {
    Some(i64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Decodes the GC state whose first generation is at `gen0` in `b`.
pub fn gc_stats_at(b: &[u8], gen0: usize) -> Option<GcStats> {
    let enabled = i32_at(b, gen0.checked_sub(ENABLED_BEFORE_GEN0)?)?;
    let mut out = GcStats {
        enabled: enabled == 1,
        ..GcStats::default()
    };
    for g in 0..3 {
        out.thresholds[g] = i32_at(b, gen0 + g * GEN_SIZE + 16)?;
        out.counts[g] = i32_at(b, gen0 + g * GEN_SIZE + 20)?;
        let stats = gen0 + STATS_AFTER_GEN0 + g * 24;
        out.collections[g] = i64_at(b, stats)?;
        out.collected[g] = i64_at(b, stats + 8)?;
        out.uncollectable[g] = i64_at(b, stats + 16)?;
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
    // The generations are 8-aligned (they start with pointers).
    let first = ENABLED_BEFORE_GEN0.next_multiple_of(8);
    (first..runtime.len().saturating_sub(GC_SPAN))
        .step_by(8)
        .find(|&gen0| {
            let Some(gc) = gc_stats_at(runtime, gen0) else {
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

/// Interpreter builds already inspected, by (device, inode) of the file,
/// and where their GC state is inside `_PyRuntime`.
#[derive(Debug, Default)]
pub struct PythonBuilds {
    seen: HashMap<(u64, u64), Option<PythonRuntime>>,
    gc_offsets: HashMap<(PathBuf, Option<u32>), usize>,
}

impl PythonBuilds {
    /// The interpreter `pid` runs, if any (inspected once per file).
    ///
    /// A `python3.X` executable without the interpreter's symbols links a
    /// libpython that the dynamic loader may not have mapped yet (just
    /// after exec): that is no answer until `last_look`, when it is
    /// reported as it is (a stripped build).
    pub fn of_process(&mut self, pid: u32, last_look: bool) -> Option<PythonRuntime> {
        let shown = interpreter_path(pid)?;
        let relative = shown.strip_prefix("/").unwrap_or(&shown);
        let open = Path::new(&format!("/proc/{pid}/root")).join(relative);
        let meta = std::fs::metadata(&open).ok()?;
        let runtime = self
            .seen
            .entry((meta.dev(), meta.ino()))
            .or_insert_with(|| match inspect(&shown, &open) {
                Ok(runtime) => Some(runtime),
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
        let bytes = read_memory(pid, runtime + start as u64, GC_SPAN + ENABLED_BEFORE_GEN0)?;
        gc_stats_at(&bytes, ENABLED_BEFORE_GEN0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn reads_the_gc_of_a_child_python() {
        let python = Path::new("/usr/bin/python3.11");
        if !python.exists() {
            return;
        }
        let mut child = std::process::Command::new(python)
            .args(["-c", "import gc, time; gc.collect(); gc.collect(); print('ready', flush=True); time.sleep(30)"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
            &mut line,
        )
        .unwrap();
        let pid = child.id();
        let mut builds = PythonBuilds::default();
        let py = builds.of_process(pid, true).expect("python found");
        let runtime = runtime_address(pid, &py);
        let gc = runtime.and_then(|r| builds.gc_stats(pid, &py, r));
        let _ = child.kill();
        let _ = child.wait();
        let gc = gc.unwrap_or_else(|| panic!("{py:?} at {runtime:x?}"));
        assert_eq!(gc.thresholds, [700, 10, 10]);
        assert_eq!(gc.collections[2], 2, "{gc:?}");
    }
}
