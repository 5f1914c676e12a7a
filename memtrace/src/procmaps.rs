//! `/proc/PID/maps` and `/proc/PID/smaps`, parsed by memtrace itself.
//!
//! A traced process chooses the paths of the files it maps (in a container
//! it owns `/`), and procfs-core 0.17 and 0.18 slice such a path without
//! checking its length (`/SYSVa` panics their `MMapPath` parser; found by
//! the `proc_files` fuzz target). So every reader of another process's
//! mappings goes through this parser, which takes any bytes: a line that
//! does not parse is skipped, a path is kept as the bytes it is.
//! Like `bounds`, it imports nothing of memtrace and any folder may use it.
use std::{
    collections::HashMap,
    ffi::OsStr,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

/// What a mapping is of, from its last field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapPath {
    /// A file, as the kernel prints it (a ` (deleted)` suffix included).
    File(PathBuf),
    Heap,
    /// `[stack]` (the main thread's).
    Stack,
    /// `[vdso]` (`[vvar]` and `[vsyscall]` are `Other`).
    Vdso,
    /// No name: anonymous memory.
    Anonymous,
    /// Another `[name]`, or a name that is not a path.
    Other(String),
}

/// One mapping: a line of maps, or a mapping's first line in smaps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    /// `rwxp` / `rwxs`, as printed.
    pub perms: [u8; 4],
    /// File offset of `start`.
    pub offset: u64,
    /// (major << 32) | minor.
    pub dev: u64,
    pub inode: u64,
    pub path: MapPath,
}

impl Mapping {
    pub fn readable(&self) -> bool {
        self.perms[0] == b'r'
    }

    pub fn executable(&self) -> bool {
        self.perms[2] == b'x'
    }

    /// The file's path, when the mapping is of a file.
    pub fn file(&self) -> Option<&Path> {
        match &self.path {
            MapPath::File(p) => Some(p),
            _ => None,
        }
    }
}

fn hex(field: &[u8]) -> Option<u64> {
    u64::from_str_radix(std::str::from_utf8(field).ok()?, 16).ok()
}

/// One line: `start-end perms offset major:minor inode   [path]`. The path
/// may contain spaces: it is everything after the fifth field.
pub fn parse_line(line: &[u8]) -> Option<Mapping> {
    let mut fields = line.splitn(6, |&b| b == b' ');
    let range = fields.next()?;
    let perms: [u8; 4] = fields.next()?.try_into().ok()?;
    let offset = hex(fields.next()?)?;
    let dev = fields.next()?;
    let inode: u64 = std::str::from_utf8(fields.next()?).ok()?.parse().ok()?;
    let name = fields.next().unwrap_or_default().trim_ascii();
    let dash = range.iter().position(|&b| b == b'-')?;
    let (start, end) = (hex(&range[..dash])?, hex(&range[dash + 1..])?);
    let colon = dev.iter().position(|&b| b == b':')?;
    let dev = (hex(&dev[..colon])? << 32) | hex(&dev[colon + 1..])?;
    let path = match name {
        b"" => MapPath::Anonymous,
        b"[heap]" => MapPath::Heap,
        b"[stack]" => MapPath::Stack,
        b"[vdso]" => MapPath::Vdso,
        p if p.starts_with(b"/") => MapPath::File(PathBuf::from(OsStr::from_bytes(p))),
        p => MapPath::Other(String::from_utf8_lossy(p).into_owned()),
    };
    Some(Mapping {
        start,
        end,
        perms,
        offset,
        dev,
        inode,
        path,
    })
}

/// The mappings of a maps text, in its order; lines that do not parse (a
/// truncated last line) are skipped.
pub fn parse(data: &[u8]) -> Vec<Mapping> {
    data.split(|&b| b == b'\n').filter_map(parse_line).collect()
}

/// `/proc/PID/maps`; `None` when it cannot be read (the process is gone).
pub fn read(pid: u32) -> Option<Vec<Mapping>> {
    std::fs::read(format!("/proc/{pid}/maps"))
        .ok()
        .map(|data| parse(&data))
}

/// The mappings of an smaps text with their `Key: N kB` figures, in bytes.
pub fn parse_smaps(data: &[u8]) -> Vec<(Mapping, HashMap<String, u64>)> {
    let mut out: Vec<(Mapping, HashMap<String, u64>)> = Vec::new();
    for line in data.split(|&b| b == b'\n') {
        if let Some(m) = parse_line(line) {
            out.push((m, HashMap::new()));
            continue;
        }
        let Some((_, figures)) = out.last_mut() else {
            continue;
        };
        let Ok(line) = std::str::from_utf8(line) else {
            continue;
        };
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let mut words = value.split_whitespace();
        let (Some(n), Some("kB"), None) = (words.next(), words.next(), words.next()) else {
            continue;
        };
        if let Ok(n) = n.parse::<u64>() {
            figures.insert(key.to_string(), n.saturating_mul(1024));
        }
    }
    out
}

/// `/proc/PID/smaps`; `None` when it cannot be read.
pub fn read_smaps(pid: u32) -> Option<Vec<(Mapping, HashMap<String, u64>)>> {
    std::fs::read(format!("/proc/{pid}/smaps"))
        .ok()
        .map(|data| parse_smaps(&data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_as_the_kernel_prints_them() {
        let m = parse_line(b"7f1c2a000000-7f1c2a028000 r-xp 00001000 fd:01 1312  /usr/lib/x86_64-linux-gnu/libc.so.6").unwrap();
        assert_eq!(
            (m.start, m.end, m.offset, m.inode),
            (0x7f1c2a000000, 0x7f1c2a028000, 0x1000, 1312)
        );
        assert_eq!(m.dev, (0xfd << 32) | 1);
        assert!(m.readable() && m.executable());
        assert_eq!(
            m.file(),
            Some(Path::new("/usr/lib/x86_64-linux-gnu/libc.so.6"))
        );
        let heap = parse_line(
            b"55d0c1a00000-55d0c1a21000 rw-p 00000000 00:00 0                          [heap]",
        )
        .unwrap();
        assert_eq!(heap.path, MapPath::Heap);
        assert_eq!(
            parse_line(b"7ffd1000-7ffd2000 rw-p 00000000 00:00 0 ")
                .unwrap()
                .path,
            MapPath::Anonymous
        );
        let spaced =
            parse_line(b"1000-2000 r--p 00000000 08:01 7 /srv/my app/x (deleted)").unwrap();
        assert_eq!(spaced.file(), Some(Path::new("/srv/my app/x (deleted)")));
    }

    #[test]
    fn paths_a_process_chooses_are_kept_or_skipped_never_a_panic() {
        // procfs-core panics on these (`/SYSV` shorter than 13 bytes).
        for name in [&b"/SYSVa"[..], b"/SYSV", b"/\xff\xfe", b"[stack:", b"["] {
            let mut line = b"1000-2000 rw-s 00000000 00:05 9 ".to_vec();
            line.extend(name);
            let m = parse_line(&line).unwrap();
            assert!(
                matches!(m.path, MapPath::File(_) | MapPath::Other(_)),
                "{m:?}"
            );
        }
        for garbage in [
            &b""[..],
            b"1000-2000",
            b"x-y rwxp 0 0:0 0",
            b"1000-2000 rwxpq 0 0:0 0",
        ] {
            assert_eq!(parse_line(garbage), None);
        }
    }

    #[test]
    fn smaps_figures_are_bytes_per_mapping() {
        let text = b"1000-3000 rw-p 00000000 00:00 0 [heap]\nSize:                  8 kB\nRss:                   4 kB\nVmFlags: rd wr mr mw me ac\n4000-5000 r-xp 00000000 08:01 3 /bin/x\nRss: 2 kB\n";
        let maps = parse_smaps(text);
        assert_eq!(maps.len(), 2);
        assert_eq!(maps[0].1["Rss"], 4096);
        assert_eq!(maps[0].1["Size"], 8192);
        assert!(!maps[0].1.contains_key("VmFlags"));
        assert_eq!(maps[1].1["Rss"], 2048);
    }
}
