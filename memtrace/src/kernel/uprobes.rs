//! Checking uprobe targets before attaching: the binary exists, and the
//! symbol is a function in it. When it is not, the error lists the nearest
//! names, because a typo in `--request-fn` is the common case. Also where
//! each process's own C library is, for the allocator probes.
use std::path::{Path, PathBuf};

use object::{Object as _, ObjectSymbol as _, SymbolKind};

/// Where a bare library or program name is looked for.
const SEARCH_DIRS: &[&str] = &[
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib64",
    "/usr/lib64",
    "/lib",
    "/usr/lib",
    "/usr/local/lib",
];

/// A function in a binary or shared library, for uprobes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeTarget {
    pub binary: PathBuf,
    pub symbol: String,
}

/// The C library a process has mapped, as a path memtrace can open (through
/// /proc/PID/root, so containers' own libraries are found).
pub fn libc_path(pid: u32) -> Option<PathBuf> {
    let maps = crate::procmaps::read(pid)?;
    // /proc shows a chrooted process's files from this agent's root: the
    // part under the process's root is its own path.
    let root = std::fs::read_link(format!("/proc/{pid}/root")).ok();
    maps.iter().filter_map(|m| m.file()).find_map(|p| {
        let name = p.file_name()?.to_str()?;
        (name.starts_with("libc.so") || name.starts_with("libc-")).then(|| {
            let own = root.as_deref().and_then(|r| p.strip_prefix(r).ok());
            let relative = own.unwrap_or_else(|| p.strip_prefix("/").unwrap_or(p));
            PathBuf::from(format!("/proc/{pid}/root")).join(relative)
        })
    })
}

/// Where to put a uprobe meant for a function's entry: its first
/// instruction, or the one after when that is `test %rdi,%rdi` followed by a
/// conditional jump (glibc's `free`). x86 uprobes step an instruction like
/// `test` out of line, a second trap per hit (about 5 µs here,
/// BENCHMARKS.md), while they emulate pushes and jumps; `test` changes no
/// register, so the arguments are the same one instruction later.
/// Offsets for several functions of one binary, read once.
pub fn entry_offsets(binary: &Path, symbols: &[&str]) -> Vec<u64> {
    let Ok(data) = crate::bounds::read_object(binary) else {
        return vec![0; symbols.len()];
    };
    let Ok(file) = object::File::parse(&*data) else {
        return vec![0; symbols.len()];
    };
    symbols
        .iter()
        .map(|s| function_code(&file, s, 5).map_or(0, |c| emulated_offset(&c)))
        .collect()
}

/// As [`entry_offsets`], for one function.
pub fn entry_offset(binary: &Path, symbol: &str) -> u64 {
    entry_offsets(binary, &[symbol])[0]
}

/// How far to move an entry probe past instructions the kernel would
/// single-step, when they change no argument register and fall through:
/// `test %rdi,%rdi` or `test %rsi,%rsi` before a conditional jump (glibc's
/// `free`, CPython's `_PyObject_Free(ctx, ptr)`), and `lea disp8(%rsi),%rax`
/// (3.11's `_PyObject_Malloc` computes `size - 1` first). Once past, the
/// arguments are as they were at entry.
fn emulated_offset(code: &[u8]) -> u64 {
    const TESTS: [[u8; 3]; 2] = [[0x48, 0x85, 0xff], [0x48, 0x85, 0xf6]];
    const LEA_RSI_RAX: [u8; 3] = [0x48, 0x8d, 0x46];
    if code.len() < 5 {
        return 0;
    }
    let jcc_follows =
        matches!(code[3], 0x70..=0x7f) || (code[3] == 0x0f && matches!(code[4], 0x80..=0x8f));
    if TESTS.iter().any(|t| code[..3] == *t) && jcc_follows {
        3
    } else if code[..3] == LEA_RSI_RAX {
        4
    } else {
        0
    }
}

/// [`emulated_offset`] for a function at a file offset of `binary` (a
/// static function: no symbol to look up).
pub fn emulated_offset_at(binary: &Path, file_offset: u64) -> u64 {
    use std::os::unix::fs::FileExt as _;
    let mut code = [0u8; 5];
    std::fs::File::open(binary)
        .and_then(|f| f.read_exact_at(&mut code, file_offset))
        .map_or(0, |()| emulated_offset(&code))
}

/// The first `n` bytes of a function's code, from the object file.
#[cfg(test)]
fn function_bytes(binary: &Path, symbol: &str, n: u64) -> Option<Vec<u8>> {
    let data = std::fs::read(binary).ok()?;
    let file = object::File::parse(&*data).ok()?;
    function_code(&file, symbol, n)
}

fn function_code(file: &object::File<'_>, symbol: &str, n: u64) -> Option<Vec<u8>> {
    use object::ObjectSection as _;
    let address = file
        .dynamic_symbols()
        .chain(file.symbols())
        .find(|s| {
            s.kind() == SymbolKind::Text
                && s.is_definition()
                && s.name()
                    .is_ok_and(|name| name.split('@').next() == Some(symbol))
        })?
        .address();
    file.sections()
        .find(|s| (s.address()..s.address() + s.size()).contains(&address))?
        .data_range(address, n)
        .ok()
        .flatten()
        .map(<[u8]>::to_vec)
}

#[derive(Debug, thiserror::Error)]
pub enum UprobeTargetError {
    #[error("uprobe binary `{0}` not found: give a full path to the executable or shared library")]
    BinaryNotFound(String),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: crate::bounds::ObjectReadError,
    },
    #[error("{path} is not an ELF object memtrace can read: {message}")]
    NotElf { path: PathBuf, message: String },
    #[error("function `{symbol}` is not in {path}{}", near_list(.near))]
    SymbolNotFound {
        symbol: String,
        path: PathBuf,
        near: Vec<String>,
    },
}

fn near_list(near: &[String]) -> String {
    if near.is_empty() {
        "; it has no function with a similar name (is it stripped? `nm -D` lists what is left)"
            .to_string()
    } else {
        format!("; did you mean: {}?", near.join(", "))
    }
}

/// Finds the binary: a path as given, or a bare name in the library
/// directories and in PATH.
pub fn resolve_binary(binary: &Path) -> Result<PathBuf, UprobeTargetError> {
    if binary.components().count() > 1 || binary.is_absolute() {
        return if binary.is_file() {
            Ok(std::fs::canonicalize(binary).unwrap_or_else(|_| binary.to_path_buf()))
        } else {
            Err(UprobeTargetError::BinaryNotFound(
                binary.display().to_string(),
            ))
        };
    }
    let path_dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    SEARCH_DIRS
        .iter()
        .map(PathBuf::from)
        .chain(path_dirs)
        .map(|dir| dir.join(binary))
        .find(|candidate| candidate.is_file())
        .map(|p| std::fs::canonicalize(&p).unwrap_or(p))
        .ok_or_else(|| UprobeTargetError::BinaryNotFound(binary.display().to_string()))
}

/// Names of the functions an ELF object defines (symtab and dynsym).
pub fn function_names(path: &Path) -> Result<Vec<String>, UprobeTargetError> {
    let data = crate::bounds::read_object(path).map_err(|source| UprobeTargetError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let file = object::File::parse(&*data).map_err(|e| UprobeTargetError::NotElf {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let mut names: Vec<String> = file
        .symbols()
        .chain(file.dynamic_symbols())
        .filter(|s| s.kind() == SymbolKind::Text && s.is_definition())
        .filter_map(|s| s.name().ok().map(str::to_string))
        .filter(|n| !n.is_empty())
        .collect();
    names.sort_unstable();
    names.dedup();
    Ok(names)
}

/// Checks a target and returns it with the binary's resolved path.
pub fn check_target(target: &ProbeTarget) -> Result<ProbeTarget, UprobeTargetError> {
    let path = resolve_binary(&target.binary)?;
    let names = function_names(&path)?;
    // glibc-style versioned names (`malloc@@GLIBC_2.2.5`) match their base.
    let found = names
        .iter()
        .any(|n| n == &target.symbol || n.split('@').next() == Some(target.symbol.as_str()));
    if !found {
        return Err(UprobeTargetError::SymbolNotFound {
            symbol: target.symbol.clone(),
            path,
            near: nearest(&target.symbol, &names, 5),
        });
    }
    Ok(ProbeTarget {
        binary: path,
        symbol: target.symbol.clone(),
    })
}

/// Up to `n` names closest to `wanted`: an exact match first, then one that
/// differs in case, then those containing it (or contained in it), then by
/// edit distance, only when reasonably close.
pub fn nearest(wanted: &str, names: &[String], n: usize) -> Vec<String> {
    let lower = wanted.to_ascii_lowercase();
    // Scores: 0 exact, 1 differs only in case, 2 contains or is contained,
    // then 2 + edit distance.
    let mut scored: Vec<(usize, &String)> = names
        .iter()
        .filter_map(|name| {
            if name == wanted {
                return Some((0, name));
            }
            let l = name.to_ascii_lowercase();
            if l == lower {
                return Some((1, name));
            }
            if l.contains(&lower) || (l.len() >= 4 && lower.contains(&l)) {
                return Some((2, name));
            }
            let d = edit_distance(&lower, &l);
            (d <= (wanted.len() / 3).max(2)).then_some((2 + d, name))
        })
        .collect();
    scored.sort_by(|a, b| {
        a.0.cmp(&b.0)
            .then_with(|| a.1.len().cmp(&b.1.len()))
            .then_with(|| a.1.cmp(b.1))
    });
    scored.into_iter().take(n).map(|(_, s)| s.clone()).collect()
}

/// Levenshtein distance over bytes.
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, &ca) in a.iter().enumerate() {
        cur[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let cost = usize::from(ca != cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distances() {
        assert_eq!(edit_distance("handle_request", "handle_request"), 0);
        assert_eq!(edit_distance("handle_reqest", "handle_request"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
    }

    #[test]
    fn nearest_names_put_substrings_first() {
        let names: Vec<String> = ["handle_request", "handle_response", "main", "request_end"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(nearest("handle_reqest", &names, 5)[0], "handle_request");
        assert_eq!(
            nearest("request", &names, 2),
            vec!["request_end", "handle_request"]
        );
        assert!(nearest("zzzzzzzz", &names, 5).is_empty());
    }

    #[test]
    fn finds_libc_functions_and_suggests_for_typos() {
        let ok = check_target(&ProbeTarget {
            binary: "libc.so.6".into(),
            symbol: "malloc".into(),
        })
        .expect("libc.so.6 has malloc");
        assert!(ok.binary.is_absolute());
        let err = check_target(&ProbeTarget {
            binary: "libc.so.6".into(),
            symbol: "mallok".into(),
        })
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("did you mean") && msg.contains("malloc"),
            "{msg}"
        );
    }

    #[test]
    fn missing_binary_is_a_clear_error() {
        let err = resolve_binary(Path::new("/no/such/binary")).unwrap_err();
        assert!(err.to_string().contains("full path"), "{err}");
    }

    #[test]
    fn entry_offsets_skip_a_leading_test_only() {
        let libc = resolve_binary(Path::new("libc.so.6")).unwrap();
        for symbol in ["malloc", "calloc", "realloc", "free"] {
            let off = entry_offset(&libc, symbol);
            let code = function_bytes(&libc, symbol, 5).expect("libc has the function");
            if code[..3] == [0x48, 0x85, 0xff] {
                assert_eq!(off, 3, "{symbol}: {code:x?}");
            } else {
                assert_eq!(off, 0, "{symbol}: {code:x?}");
            }
        }
        assert_eq!(entry_offset(&libc, "no_such_function"), 0);
    }

    #[test]
    fn cpython_allocator_entries_move_past_single_stepped_instructions() {
        // _PyObject_Free(ctx, ptr): test %rsi,%rsi; je.
        assert_eq!(emulated_offset(&[0x48, 0x85, 0xf6, 0x74, 0x7a]), 3);
        // 3.11's _PyObject_Malloc: lea -0x1(%rsi),%rax; push %rbx.
        assert_eq!(emulated_offset(&[0x48, 0x8d, 0x46, 0xff, 0x53]), 4);
        // push %rbp: emulated already.
        assert_eq!(emulated_offset(&[0x55, 0x53, 0x48, 0x89, 0xf3]), 0);
        // test %rsi,%rsi not followed by a jump: left alone.
        assert_eq!(emulated_offset(&[0x48, 0x85, 0xf6, 0x48, 0x89]), 0);
    }

    #[test]
    fn finds_our_c_library() {
        let path = libc_path(std::process::id()).expect("tests link libc dynamically");
        assert!(path.to_str().unwrap().contains("libc"), "{path:?}");
        assert!(path.is_file());
    }
}
