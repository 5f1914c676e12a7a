//! One entry point per parser of data memtrace does not control, for the
//! fuzz targets under `memtrace/fuzz/` (`cargo xtask fuzz`) and for the
//! regression test that replays their corpus on every `cargo test`.
//!
//! Each takes arbitrary bytes and must return: a parser may refuse its
//! input, never panic, loop without bound or allocate without bound. The
//! targets also check what a parser promises (a route's length, a string's
//! cap, a task count's saturation), so a result that breaks a bound is a
//! crash too.
use std::path::Path;

use crate::{
    api::query,
    cli::settings::{AgentArgs, parse_probe_target},
    judge::softlimit::parse_signal,
    kernel::{events, tracefs},
    model::{
        cgroups, kubelet,
        pyasyncio::{self, AsyncioOffsets},
        pycode::{self, CodeInfo, CodeLayout, RemoteMemory},
        pydebug::{self, DebugOffsets},
        python,
        routes::{HttpLine, normalise_path},
    },
    procmaps,
};

/// A fuzz target: any bytes in, nothing out; a broken promise panics.
pub type Target = fn(&[u8]);

/// The fuzz targets by name, as `cargo xtask fuzz` and the corpus
/// directories (`memtrace/fuzz/corpus/NAME`) name them.
pub const TARGETS: &[(&str, Target)] = &[
    ("http_route", http_route),
    ("python_code", python_code),
    ("python_tables", python_tables),
    ("python_elf", python_elf),
    ("proc_files", proc_files),
    ("kubelet_pods", kubelet_pods),
    ("api_query", api_query),
    ("settings_toml", settings_toml),
    ("kernel_records", kernel_records),
];

/// A request line as the kernel captured it (its first byte says whether
/// the capture was cut) to a route.
pub fn http_route(data: &[u8]) {
    let Some((&flag, line)) = data.split_first() else {
        return;
    };
    let truncated = flag & 1 != 0;
    if let Some(http) = HttpLine::parse(line, truncated) {
        let route = http.route();
        assert!(
            route.len() <= http.method.len() + 1 + bound(&http.path),
            "{route:?}"
        );
    }
    let path = String::from_utf8_lossy(line);
    let normalised = normalise_path(&path, truncated);
    assert!(normalised.len() <= bound(&path), "{normalised:?}");
}

/// The longest a normalised path may be: each segment becomes itself or
/// `:id` (3 bytes for at least one, after its `/`), then a truncation mark
/// (`/…`); garbage is `/:invalid`.
fn bound(path: &str) -> usize {
    3 * path.len() + "/:invalid".len() + "/…".len()
}

/// Where the fake process's memory starts: above the lowest address the
/// readers accept.
const IMAGE_BASE: u64 = 0x1000;

/// A traced process's memory, faked: the input's bytes at [`IMAGE_BASE`],
/// nothing mapped elsewhere.
struct Image<'a>(&'a [u8]);

impl RemoteMemory for Image<'_> {
    fn read(&self, addr: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let unmapped = || std::io::Error::from_raw_os_error(libc::EIO);
        let start = usize::try_from(addr.checked_sub(IMAGE_BASE).ok_or_else(unmapped)?)
            .map_err(|_| unmapped())?;
        let bytes = start
            .checked_add(buf.len())
            .and_then(|end| self.0.get(start..end))
            .ok_or_else(unmapped)?;
        buf.copy_from_slice(bytes);
        Ok(())
    }
}

/// Code objects, their strings and line tables, read out of a fake
/// process image: the first byte picks the minor version and where the
/// code object is; the rest is the memory. The layout is discovered from
/// the image when it holds a `PyCode_Type`, else [`SEED_LAYOUT`] (the one
/// the seeds' code objects are laid out in) is used.
pub fn python_code(data: &[u8]) {
    let Some((&pick, image)) = data.split_first() else {
        return;
    };
    if let Ok(code) = code_in_image(pick, image) {
        assert!(code.filename.chars().count() as u64 <= pycode::MAX_STR_CHARS);
        assert!(code.qualname.chars().count() as u64 <= pycode::MAX_STR_CHARS);
        for index in [
            0,
            1,
            code.code_units / 2,
            code.code_units.saturating_sub(1),
            code.code_units,
            pycode::NOT_STARTED,
        ] {
            let _ = code.line(index);
        }
    }
    // The line table alone, as `co_linetable`'s bytes.
    if let Ok(lines) = pycode::decode_locations(image, u32::from(pick)) {
        assert!(lines.len() <= image.len());
    }
}

/// The code object `python_code` reads: `pick`'s low 3 bits choose the
/// minor version, the rest where in `image` the object starts (8-byte
/// steps from [`IMAGE_BASE`]).
fn code_in_image(pick: u8, image: &[u8]) -> Result<CodeInfo, pycode::PyCodeError> {
    let minor = pycode::SUPPORTED.0 + u32::from(pick & 7) % 5;
    let mem = Image(image);
    let layout = CodeLayout::discover(&mem, IMAGE_BASE, minor).unwrap_or(SEED_LAYOUT);
    CodeInfo::read(&mem, &layout, IMAGE_BASE + u64::from(pick >> 3) * 8)
}

/// Where the fields of a code object are when the image holds no
/// `PyCode_Type` to discover them from: a plausible layout, not any one
/// version's, that the seed corpus is written in.
const SEED_LAYOUT: CodeLayout = CodeLayout {
    filename: 112,
    qualname: 120,
    name: 104,
    linetable: 128,
    firstlineno: 68,
    code_adaptive: 200,
    ascii_data: 40,
    compact_data: 56,
};

/// The task lists' heads when the input is no `.AsyncioDebug` table.
const SEED_ASYNCIO: AsyncioOffsets = AsyncioOffsets {
    interp_tasks_head: 16,
    thread_tasks_head: 16,
};

/// A 3.14 `_Py_DebugOffsets` with every field at 8 (`synthetic_table`),
/// parsed once: the task-list walk's offsets.
fn synthetic_314() -> &'static DebugOffsets {
    static TABLE: std::sync::OnceLock<DebugOffsets> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let hex = 0x030e_0af0;
        DebugOffsets::parse(&pydebug::synthetic_table(14, hex, &[]), hex)
            .expect("the synthetic table validates")
    })
}

/// CPython's tables read out of `_PyRuntime` and the `_asyncio` module:
/// `_Py_DebugOffsets`, `_Py_AsyncioModuleDebugOffsets`, the GC state, and
/// the task lists walked through a fake image (which may be cyclic).
pub fn python_tables(data: &[u8]) {
    for hex in [0x030e_0af0, 0x030f_02f0] {
        let _ = DebugOffsets::parse(data, hex);
    }
    let asyncio = AsyncioOffsets::parse(data);
    for minor in 11..=15 {
        if let Some(after) = python::stats_after_gen0(minor) {
            let _ = python::find_gc(data, minor);
            for gen0 in [0, 12, 16, data.len() / 2] {
                let _ = python::gc_stats_at(data, gen0, after);
            }
        }
    }
    let asyncio = asyncio.unwrap_or(SEED_ASYNCIO);
    if let Some(count) = pyasyncio::count_tasks(&Image(data), synthetic_314(), IMAGE_BASE, &asyncio)
    {
        assert!(count <= pyasyncio::MAX_TASKS, "{count} tasks");
    }
}

/// An ELF that claims to be a Python interpreter, as the agent inspects it
/// (version, symbols, the thread-local access, the allocator's code), and
/// the machine-code scanners on raw bytes.
pub fn python_elf(data: &[u8]) {
    let _ = python::inspect_elf(
        Path::new("/usr/bin/python3.14"),
        Path::new("/proc/1/root/usr/bin/python3.14"),
        data,
    );
    let addr = data
        .get(..8)
        .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap()));
    let _ = python::tls_access(addr, data);
    let targets = python::rip_targets(addr, data);
    assert!(targets.len() <= data.len());
    let _ = python::address_taken(data, addr, addr.rotate_left(17));
}

/// `/proc` as a hostile process can shape it. The kernel writes these
/// files; what a process controls in them is its name (`comm`, 15 bytes,
/// any but NUL), the paths of the files it maps, and (with a delegated
/// cgroup or its own mount namespace) cgroup paths and mount points. So
/// procfs's stat and status parsers get the kernel's layout with the name
/// from the input; memtrace's own parsers (maps and smaps, mounts, cgroup,
/// NSpid) get the input whole, and maps also with each input line as a
/// mapped file's path.
pub fn proc_files(data: &[u8]) {
    use procfs::FromRead as _;
    use procfs::process::{Stat, Status};
    let comm: Vec<u8> = data.iter().copied().filter(|&b| b != 0).take(15).collect();
    let mut stat = b"4242 (".to_vec();
    stat.extend(&comm);
    stat.extend(b") S 1 4242 4242 0 -1 4194560 120 0 0 0 1 0 0 0 20 0 1 0 985147 3133440 413 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0 0 0 0 0 0 0 0 0\n");
    if let Ok(parsed) = Stat::from_read(&stat[..]) {
        assert_eq!(parsed.pid, 4242);
        assert_eq!(parsed.ppid, 1);
    }
    // status escapes the name as seq_escape does: `\` and `\n`.
    let mut status = b"Name:\t".to_vec();
    for &b in &comm {
        match b {
            b'\\' => status.extend(b"\\\\"),
            b'\n' => status.extend(b"\\n"),
            _ => status.push(b),
        }
    }
    status.extend(b"\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t4242\nNgid:\t0\nPid:\t4242\nPPid:\t1\nTracerPid:\t0\nUid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nFDSize:\t64\nGroups:\t\nNSpid:\t4242\t7\nVmRSS:\t 1000 kB\nRssAnon:\t 500 kB\nThreads:\t1\n");
    let _ = Status::from_read(&status[..]);
    // maps and smaps: memtrace's own parser takes any bytes. Each input
    // line also becomes a mapping's path (seq_path escapes `\n`).
    let _ = procmaps::parse(data);
    let _ = procmaps::parse_smaps(data);
    let mut maps = Vec::new();
    for (i, path) in data.split(|&b| b == b'\n').take(64).enumerate() {
        let start = 0x1000 * (i as u64 + 1);
        maps.extend(format!("{start:x}-{:x} r-xp 00000000 08:01 {i} ", start + 0x1000).as_bytes());
        maps.push(b'/');
        maps.extend(path.iter().filter(|&&b| b != 0));
        maps.push(b'\n');
    }
    let parsed = procmaps::parse(&maps);
    assert_eq!(parsed.len(), data.split(|&b| b == b'\n').take(64).count());
    let text = String::from_utf8_lossy(data);
    let _ = cgroups::v2_mount_in(&text);
    if let Some(path) = cgroups::cgroup_path_in(&text) {
        let placement = cgroups::parse_path(&path);
        assert_eq!(placement.cgroup, path);
    }
    let _ = cgroups::parse_path(&text);
    let _ = cgroups::ns_pid_in(&text);
    let _ = cgroups::normalize_selector(&text, Some(Path::new("/sys/fs/cgroup")));
}

/// The kubelet's `/pods` answer, and lookups in what it gave.
pub fn kubelet_pods(data: &[u8]) {
    let Ok(index) = kubelet::PodIndex::from_json(data) else {
        return;
    };
    let text = String::from_utf8_lossy(data);
    for word in text.split(['"', ' ']).take(64) {
        let _ = index.pod(word);
        let _ = index.container(word);
        assert!(kubelet::bare_container_id(word).len() <= word.len());
    }
}

/// The debug API's query strings, and the values settings and queries
/// take (signals, probe targets).
pub fn api_query(data: &[u8]) {
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    let _ = query::parse_debug(raw);
    let _ = query::parse_pprof(raw);
    let _ = query::parse_list(raw);
    let _ = query::parse_token_only(raw);
    let _ = query::lenient_token(raw);
    if let Ok(limit) = query::parse_limit(Some(raw)) {
        assert!((1..=query::MAX_LIMIT).contains(&limit), "{limit}");
    }
    let _ = query::parse_pid(raw);
    let _ = parse_signal(raw);
    let _ = parse_probe_target(raw);
}

/// A settings file, merged under empty flags and resolved as the agent
/// starts.
pub fn settings_toml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(file) = toml::from_str::<AgentArgs>(text) else {
        return;
    };
    let mut args = AgentArgs::default();
    args.merge_under(file);
    let _ = args.resolve();
}

/// Ring-buffer records (their first bytes say the kind) and tracefs
/// `format` files.
pub fn kernel_records(data: &[u8]) {
    let _ = events::decode(data);
    let _ = events::c_str(data);
    let format = tracefs::parse_format(&String::from_utf8_lossy(data));
    assert!(format.fields.len() <= data.len());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_target_takes_empty_and_small_inputs() {
        for (name, target) in TARGETS {
            for input in [&b""[..], b"\0", b"GET /", &[0xff; 64]] {
                eprintln!("{name} {input:?}");
                target(input);
            }
        }
    }

    #[test]
    fn the_code_object_seeds_hold_code_objects() {
        let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/python_code");
        let read = |name: &str| {
            let data = std::fs::read(seeds.join(name)).unwrap();
            code_in_image(data[0], &data[1..]).unwrap()
        };
        let code = read("code_object_314");
        assert_eq!(
            (code.filename.as_str(), code.qualname.as_str()),
            ("/srv/app/views.py", "Orders.get")
        );
        assert_eq!(code.line(pycode::NOT_STARTED), Some(40));
        assert_eq!(read("code_object_ucs2").qualname, "ÄÖÜß");
    }

    #[test]
    fn a_task_list_that_never_returns_to_its_head_saturates() {
        let seed = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/corpus/python_tables/cyclic_task_list");
        let data = std::fs::read(seed).unwrap();
        let count =
            pyasyncio::count_tasks(&Image(&data), synthetic_314(), IMAGE_BASE, &SEED_ASYNCIO);
        assert_eq!(count, Some(pyasyncio::MAX_TASKS));
    }

    #[test]
    fn the_fake_image_reads_only_what_it_holds() {
        let mem = Image(&[1, 2, 3, 4]);
        let mut b = [0u8; 2];
        mem.read(IMAGE_BASE + 2, &mut b).unwrap();
        assert_eq!(b, [3, 4]);
        assert!(mem.read(IMAGE_BASE + 3, &mut b).is_err());
        assert!(mem.read(IMAGE_BASE - 1, &mut b).is_err());
        assert!(mem.read(u64::MAX, &mut b).is_err());
    }
}
