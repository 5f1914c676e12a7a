//! CPython code objects in another live process: from the address of a
//! `PyCodeObject` (what the eBPF program records per Python frame) to its
//! file, qualified function name and, for an instruction index, its source
//! line. CPython 3.11 to 3.13, x86_64, default (GIL) builds.
//!
//! Nothing here is hard-coded per patch release: where the fields of a code
//! object are is read from the interpreter itself ([`CodeLayout::discover`],
//! from `PyCode_Type`'s member table); only the string headers and the
//! `PyTypeObject` slots, stable across these versions, are constants.
//!
//! The frame's instruction index (code units from `co_code_adaptive`) means
//! slightly different things across versions, and the line table answers
//! all of them alike: 3.11 and 3.12 keep `prev_instr`, which in a calling
//! frame points at the last inline-cache unit of its `CALL`, and one unit
//! before the first instruction in a frame that has not started
//! ([`NOT_STARTED`]); 3.13's `instr_ptr` points at the `CALL` itself. The
//! location table covers cache units with their instruction's location.
use std::{collections::HashMap, fs::File, os::unix::fs::FileExt as _, sync::Arc};

/// The oldest and newest minor versions whose code objects and frames
/// memtrace reads.
pub const SUPPORTED: (u32, u32) = (11, 15);

/// Reads another process's memory (implemented for `/proc/PID/mem`; tests
/// may fake it).
pub trait RemoteMemory {
    /// Fills `buf` from `addr`, or fails: no short reads.
    fn read(&self, addr: u64, buf: &mut [u8]) -> std::io::Result<()>;
}

/// A process's memory through `/proc/PID/mem` (root, or `CAP_SYS_PTRACE`).
#[derive(Debug)]
pub struct ProcMemory {
    file: File,
}

impl ProcMemory {
    /// Opens `/proc/PID/mem`; reads fail once the process has exited.
    pub fn open(pid: u32) -> std::io::Result<Self> {
        let file = File::open(format!("/proc/{pid}/mem"))?;
        Ok(Self { file })
    }
}

impl RemoteMemory for ProcMemory {
    fn read(&self, addr: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.file.read_exact_at(buf, addr)
    }
}

/// `line(NOT_STARTED)`: index -1 as the eBPF program computes it in 32
/// bits. In 3.11 and 3.12 a frame pushed but not yet started has
/// `prev_instr` one unit before the first instruction; CPython's
/// `PyCode_Addr2Line` answers `co_firstlineno` for it, and so does
/// [`CodeInfo::line`].
pub const NOT_STARTED: u32 = u32::MAX;

/// Longest `co_filename` or `co_qualname` read, in characters.
pub const MAX_STR_CHARS: u64 = 4096;
/// Largest `co_linetable` read, in bytes.
pub const MAX_LINETABLE: u64 = 1 << 20;
/// Largest code object read, in code units (2 bytes each).
const MAX_CODE_UNITS: i64 = 1 << 24;

/// `PyTypeObject` on x86_64, 3.11 to 3.13: where the slots read here are.
const TP_NAME: u64 = 24;
const TP_BASICSIZE: u64 = 32;
const TP_ITEMSIZE: u64 = 40;
const TP_MEMBERS: u64 = 240;
/// `PyMemberDef`: name pointer, `int type`, `Py_ssize_t offset`, `int
/// flags`, doc pointer.
const MEMBER_SIZE: u64 = 40;
/// `PyCode_Type` has about 20 members; a table without its NULL terminator
/// within this many is not one.
const MAX_MEMBERS: u64 = 64;
/// `Py_T_INT`, `Py_T_OBJECT` and `Py_T_OBJECT_EX` (structmember.h).
const T_INT: i32 = 1;
const T_OBJECT: i32 = 6;
const T_OBJECT_EX: i32 = 16;
/// `PyVarObject`: `ob_refcnt`, `ob_type`, `ob_size`. For a code object,
/// `ob_size` counts code units.
const OB_TYPE: u64 = 8;
const OB_SIZE: u64 = 16;
/// `PyBytesObject`: `ob_size` at 16, `ob_shash` at 24, then the bytes.
const BYTES_DATA: u64 = 32;
/// `PyASCIIObject`: `length` at 16, `state` (a 32-bit bitfield) at 32.
const STR_LENGTH: u64 = 16;
const STR_STATE: u64 = 32;
/// Addresses below this are NULL or a small integer, never an object.
const LOWEST_ADDRESS: u64 = 0x1000;

/// Where fields are in code objects and strings of one interpreter build,
/// in bytes from the start of the object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CodeLayout {
    /// `co_filename` (`PyUnicodeObject *`).
    pub filename: u64,
    /// `co_qualname` (`PyUnicodeObject *`).
    pub qualname: u64,
    /// `co_name`, read when `co_qualname` is NULL.
    pub name: u64,
    /// `co_linetable` (`PyBytesObject *`).
    pub linetable: u64,
    /// `co_firstlineno` (`int`): the eBPF program reads it too, to tell a
    /// freed and reused address from the code object it sampled.
    pub firstlineno: u64,
    /// `co_code_adaptive`, the first code unit: `PyCode_Type.tp_basicsize`.
    pub code_adaptive: u64,
    /// Characters of a compact ASCII string: after `PyASCIIObject`.
    pub ascii_data: u64,
    /// Characters of another compact string: after
    /// `PyCompactUnicodeObject`; a legacy string's data pointer is here too
    /// (`PyUnicodeObject.data.any`).
    pub compact_data: u64,
}

/// Why a code object, or the layout of code objects, could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PyCodeError {
    #[error(
        "CPython 3.{minor}: memtrace reads code objects of CPython 3.{} to 3.{} only",
        SUPPORTED.0,
        SUPPORTED.1
    )]
    UnsupportedVersion { minor: u32 },
    #[error("cannot read {what} at {addr:#x} in the traced process: {source}{}", read_hint(.source))]
    Read {
        what: &'static str,
        addr: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} is not a valid pointer ({addr:#x})")]
    BadPointer { what: &'static str, addr: u64 },
    #[error(
        "{addr:#x} is not PyCode_Type ({reason}): pass the symbol's address plus the load bias of the interpreter ELF"
    )]
    NotCodeType { addr: u64, reason: String },
    #[error("PyCode_Type at {addr:#x}: member {member} {reason}")]
    Member {
        addr: u64,
        member: &'static str,
        reason: String,
    },
    #[error("{addr:#x} is not a live code object: {reason}")]
    NotCode { addr: u64, reason: String },
    #[error("{what} of code object {code:#x} (at {addr:#x}): {reason}")]
    BadField {
        code: u64,
        what: &'static str,
        addr: u64,
        reason: String,
    },
    #[error(
        "code object {addr:#x} now has co_firstlineno {now}, the sample saw {seen}: the sampled code object was freed and its address reused"
    )]
    Stale { addr: u64, seen: u32, now: u32 },
}

/// What a failed read of `/proc/PID/mem` most likely means.
fn read_hint(e: &std::io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EACCES) | Some(libc::EPERM) => {
            " (reading another process needs root or CAP_SYS_PTRACE)"
        }
        Some(libc::ESRCH) => " (the process has exited)",
        Some(libc::EIO) => " (nothing is mapped there: a stale or wrong pointer)",
        _ => "",
    }
}

/// Reads `buf.len()` bytes at `addr`, refusing NULL-ish addresses and
/// ranges that wrap around.
fn read(
    mem: &impl RemoteMemory,
    what: &'static str,
    addr: u64,
    buf: &mut [u8],
) -> Result<(), PyCodeError> {
    let len = u64::try_from(buf.len()).unwrap_or(u64::MAX);
    if addr < LOWEST_ADDRESS || addr.checked_add(len).is_none() {
        return Err(PyCodeError::BadPointer { what, addr });
    }
    mem.read(addr, buf)
        .map_err(|source| PyCodeError::Read { what, addr, source })
}

fn read_u64(mem: &impl RemoteMemory, what: &'static str, addr: u64) -> Result<u64, PyCodeError> {
    let mut b = [0u8; 8];
    read(mem, what, addr, &mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// A NUL-terminated C string of at most `max` bytes, read in pieces that
/// never cross a page boundary (the page after it may not be mapped).
fn read_c_string(
    mem: &impl RemoteMemory,
    what: &'static str,
    addr: u64,
    max: usize,
) -> Result<Vec<u8>, PyCodeError> {
    const PAGE: u64 = 4096;
    let mut out = Vec::new();
    let mut at = addr;
    while out.len() <= max {
        let to_page_end = PAGE - at % PAGE;
        let want = to_page_end.min(64) as usize;
        let mut chunk = vec![0u8; want];
        read(mem, what, at, &mut chunk)?;
        if let Some(nul) = chunk.iter().position(|&b| b == 0) {
            out.extend_from_slice(&chunk[..nul]);
            return Ok(out);
        }
        out.extend_from_slice(&chunk);
        at += want as u64;
    }
    Err(PyCodeError::BadPointer { what, addr })
}

/// Little-endian integers at an offset of a buffer this module read.
fn u64_at(b: &[u8], at: u64) -> Option<u64> {
    let at = usize::try_from(at).ok()?;
    Some(u64::from_le_bytes(
        b.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
}

fn i64_at(b: &[u8], at: u64) -> Option<i64> {
    u64_at(b, at).map(|v| v as i64)
}

fn i32_at(b: &[u8], at: u64) -> Option<i32> {
    let at = usize::try_from(at).ok()?;
    Some(i32::from_le_bytes(
        b.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

/// One `PyMemberDef` of interest: its type and offset.
#[derive(Clone, Copy, Debug)]
struct Member {
    kind: i32,
    offset: i64,
}

impl CodeLayout {
    /// Discovers the code-object offsets from the running interpreter
    /// itself: `PyCode_Type`'s `tp_members` (the table behind
    /// `code.co_filename` and friends) and `tp_basicsize` (the offset of
    /// `co_code_adaptive`). `pycode_type` is the runtime address of
    /// `PyCode_Type` (the ELF symbol plus the load bias); `minor` the
    /// interpreter's minor version, which fixes the string headers
    /// (`PyASCIIObject` lost `wstr` in 3.12).
    ///
    /// Everything read is checked: the type is named `code` with 2-byte
    /// items, each member is found, has the expected C type, and lies
    /// inside the fixed part of the object.
    pub fn discover(
        mem: &impl RemoteMemory,
        pycode_type: u64,
        minor: u32,
    ) -> Result<Self, PyCodeError> {
        if minor < SUPPORTED.0 || minor > SUPPORTED.1 {
            return Err(PyCodeError::UnsupportedVersion { minor });
        }
        let not_code = |reason: String| PyCodeError::NotCodeType {
            addr: pycode_type,
            reason,
        };
        let mut ty = [0u8; (TP_MEMBERS + 8) as usize];
        read(mem, "PyCode_Type", pycode_type, &mut ty)?;
        let tp_name = u64_at(&ty, TP_NAME).unwrap_or(0);
        let name = read_c_string(mem, "PyCode_Type.tp_name", tp_name, 64)?;
        if name != b"code" {
            return Err(not_code(format!(
                "its tp_name is {:?}, not \"code\"",
                String::from_utf8_lossy(&name)
            )));
        }
        let basicsize = i64_at(&ty, TP_BASICSIZE).unwrap_or(0);
        let itemsize = i64_at(&ty, TP_ITEMSIZE).unwrap_or(0);
        if itemsize != 2 {
            return Err(not_code(format!(
                "tp_itemsize is {itemsize}, not 2 (one code unit)"
            )));
        }
        let basicsize = u64::try_from(basicsize)
            .ok()
            .filter(|&b| (OB_SIZE + 8..=4096).contains(&b) && b % 2 == 0)
            .ok_or_else(|| not_code(format!("tp_basicsize {basicsize} is not a code object's")))?;
        let members_at = u64_at(&ty, TP_MEMBERS).unwrap_or(0);
        let members = read_members(mem, pycode_type, members_at)?;

        let wanted = |member: &'static str, kinds: &[i32], size: u64| {
            let m = members
                .iter()
                .find(|(n, _)| n.as_slice() == member.as_bytes())
                .map(|(_, m)| *m)
                .ok_or_else(|| PyCodeError::Member {
                    addr: pycode_type,
                    member,
                    reason: "is missing from tp_members".to_string(),
                })?;
            let bad = |reason: String| PyCodeError::Member {
                addr: pycode_type,
                member,
                reason,
            };
            if !kinds.contains(&m.kind) {
                return Err(bad(format!(
                    "has type {}, expected one of {kinds:?}",
                    m.kind
                )));
            }
            let offset = u64::try_from(m.offset)
                .ok()
                .filter(|&o| o >= OB_SIZE + 8 && o % size == 0 && o + size <= basicsize)
                .ok_or_else(|| {
                    bad(format!(
                        "is at offset {}, not an aligned field inside the {basicsize}-byte code object",
                        m.offset
                    ))
                })?;
            Ok(offset)
        };
        let objects = [T_OBJECT, T_OBJECT_EX];
        let (ascii_data, compact_data) = if minor == 11 { (48, 72) } else { (40, 56) };
        Ok(Self {
            filename: wanted("co_filename", &objects, 8)?,
            qualname: wanted("co_qualname", &objects, 8)?,
            name: wanted("co_name", &objects, 8)?,
            linetable: wanted("co_linetable", &objects, 8)?,
            firstlineno: wanted("co_firstlineno", &[T_INT], 4)?,
            code_adaptive: basicsize,
            ascii_data,
            compact_data,
        })
    }
}

/// The `PyMemberDef` table at `addr` (of the type at `pycode_type`), up to
/// its NULL-named terminator: the names of the members and where they are.
fn read_members(
    mem: &impl RemoteMemory,
    pycode_type: u64,
    addr: u64,
) -> Result<Vec<(Vec<u8>, Member)>, PyCodeError> {
    let mut out = Vec::new();
    for i in 0..MAX_MEMBERS {
        let mut def = [0u8; MEMBER_SIZE as usize];
        read(
            mem,
            "PyCode_Type.tp_members",
            addr.saturating_add(i * MEMBER_SIZE),
            &mut def,
        )?;
        let name_at = u64_at(&def, 0).unwrap_or(0);
        if name_at == 0 {
            return Ok(out);
        }
        let name = read_c_string(mem, "a PyMemberDef name", name_at, 64)?;
        let member = Member {
            kind: i32_at(&def, 8).unwrap_or(-1),
            offset: i64_at(&def, 16).unwrap_or(-1),
        };
        out.push((name, member));
    }
    Err(PyCodeError::NotCodeType {
        addr: pycode_type,
        reason: format!("tp_members has no end within {MAX_MEMBERS} entries"),
    })
}

/// Code units `[previous end, end)` share one line (`None`: no location).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LineRange {
    end: u32,
    line: Option<u32>,
}

/// A code object as read from the process: where it is defined, and its
/// location table decoded to line ranges.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CodeInfo {
    /// `co_filename`: the path the module was loaded from, as Python has it.
    pub filename: String,
    /// `co_qualname`: `Class.method`, `outer.<locals>.inner`, `<module>`.
    pub qualname: String,
    /// `co_firstlineno`: the `def` line (or the first decorator's).
    pub firstlineno: u32,
    /// Size of the bytecode (`ob_size` of the code object), inline caches
    /// included: valid indices are below it.
    pub code_units: u32,
    lines: Vec<LineRange>,
}

impl CodeInfo {
    /// Reads the code object at `addr`. Fails, without panicking, on
    /// anything that is not a live code object: an unmapped or NULL
    /// pointer, an object whose type is not `code`, strings or tables of
    /// nonsense size or shape.
    /// Bytes this entry holds on the heap and in place.
    pub fn footprint(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.filename.capacity()
            + self.qualname.capacity()
            + self.lines.capacity() * std::mem::size_of::<LineRange>()
    }

    pub fn read(
        mem: &impl RemoteMemory,
        layout: &CodeLayout,
        addr: u64,
    ) -> Result<Self, PyCodeError> {
        let not_code = |reason: String| PyCodeError::NotCode { addr, reason };
        if !addr.is_multiple_of(8) {
            return Err(not_code("the address is not 8-byte aligned".to_string()));
        }
        let header_len = usize::try_from(layout.code_adaptive)
            .ok()
            .filter(|&l| l <= 4096)
            .ok_or_else(|| not_code(format!("layout says {} bytes", layout.code_adaptive)))?;
        let mut header = vec![0u8; header_len];
        read(mem, "code object", addr, &mut header)?;
        let field = |at: u64| u64_at(&header, at).unwrap_or(0);

        // A freed code object's memory may hold anything now: its type
        // must still be named `code`.
        let ob_type = field(OB_TYPE);
        let tp_name = read_u64(
            mem,
            "the code object's type",
            ob_type.saturating_add(TP_NAME),
        )?;
        let type_name = read_c_string(mem, "the code object's type name", tp_name, 64)?;
        if type_name != b"code" {
            return Err(not_code(format!(
                "its type is {:?}",
                String::from_utf8_lossy(&type_name)
            )));
        }
        let units = i64_at(&header, OB_SIZE).unwrap_or(-1);
        let code_units = u32::try_from(units)
            .ok()
            .filter(|&u| u > 0 && i64::from(u) <= MAX_CODE_UNITS)
            .ok_or_else(|| not_code(format!("{units} code units")))?;
        let firstlineno = i32_at(&header, layout.firstlineno).unwrap_or(-1);
        let firstlineno = u32::try_from(firstlineno)
            .map_err(|_| not_code(format!("co_firstlineno is {firstlineno}")))?;

        let filename = read_str(mem, layout, addr, "co_filename", field(layout.filename))?;
        let qualname = match field(layout.qualname) {
            0 => read_str(mem, layout, addr, "co_name", field(layout.name))?,
            at => read_str(mem, layout, addr, "co_qualname", at)?,
        };
        let table = read_bytes(mem, addr, "co_linetable", field(layout.linetable))?;
        let lines =
            decode_locations(&table, firstlineno).map_err(|reason| PyCodeError::BadField {
                code: addr,
                what: "co_linetable",
                addr: field(layout.linetable),
                reason,
            })?;
        Ok(Self {
            filename,
            qualname,
            firstlineno,
            code_units,
            lines,
        })
    }

    /// The source line of the code unit at `index` (counted from
    /// `co_code_adaptive`, inline caches included), as CPython's
    /// `PyCode_Addr2Line` gives it. `None` when that unit has no location
    /// (tracemalloc reports line 0 then) or `index` is past the code.
    /// [`NOT_STARTED`] (-1) is `co_firstlineno`, as CPython answers.
    pub fn line(&self, index: u32) -> Option<u32> {
        if index == NOT_STARTED {
            return Some(self.firstlineno);
        }
        if index >= self.code_units {
            return None;
        }
        let at = self.lines.partition_point(|r| r.end <= index);
        self.lines.get(at)?.line
    }
}

/// Reads a `str` object: its length and state bitfield (interned bits 0-1,
/// kind 2-4, compact 5, ascii 6), then its characters, one, two or four
/// bytes each, where the kind of string keeps them.
fn read_str(
    mem: &impl RemoteMemory,
    layout: &CodeLayout,
    code: u64,
    what: &'static str,
    addr: u64,
) -> Result<String, PyCodeError> {
    let bad = |reason: String| PyCodeError::BadField {
        code,
        what,
        addr,
        reason,
    };
    let mut head = [0u8; (STR_STATE + 4) as usize];
    read(mem, what, addr, &mut head)?;
    let length = i64_at(&head, STR_LENGTH).unwrap_or(-1);
    let state = i32_at(&head, STR_STATE).unwrap_or(0) as u32;
    let (kind, compact, ascii) = (
        (state >> 2) & 7,
        state & (1 << 5) != 0,
        state & (1 << 6) != 0,
    );
    let length = u64::try_from(length)
        .ok()
        .filter(|&l| l <= MAX_STR_CHARS)
        .ok_or_else(|| bad(format!("a str of {length} characters")))?;
    if !matches!(kind, 1 | 2 | 4) || (ascii && kind != 1) {
        return Err(bad(format!("a str of kind {kind} (ascii {ascii})")));
    }
    let data = match (compact, ascii) {
        (true, true) => addr.saturating_add(layout.ascii_data),
        (true, false) => addr.saturating_add(layout.compact_data),
        // A legacy string (a str subclass's): its characters elsewhere.
        (false, _) => read_u64(mem, what, addr.saturating_add(layout.compact_data))?,
    };
    let mut raw = vec![0u8; (length * u64::from(kind)) as usize];
    read(mem, what, data, &mut raw)?;
    if ascii && !raw.is_ascii() {
        return Err(bad("an ASCII str with non-ASCII bytes".to_string()));
    }
    // Python strings may hold lone surrogates (file names decoded with
    // surrogateescape): those become U+FFFD; beyond U+10FFFF is nonsense.
    let char_of = |c: u32| match char::from_u32(c) {
        Some(ch) => Ok(ch),
        None if c <= 0x10ffff => Ok(char::REPLACEMENT_CHARACTER),
        None => Err(bad(format!("character {c:#x} is beyond Unicode"))),
    };
    match kind {
        1 => Ok(raw.iter().map(|&b| char::from(b)).collect()),
        2 => raw
            .chunks_exact(2)
            .map(|c| char_of(u32::from(u16::from_le_bytes([c[0], c[1]]))))
            .collect(),
        _ => raw
            .chunks_exact(4)
            .map(|c| char_of(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
    }
}

/// Reads a `bytes` object's contents (at most [`MAX_LINETABLE`]).
fn read_bytes(
    mem: &impl RemoteMemory,
    code: u64,
    what: &'static str,
    addr: u64,
) -> Result<Vec<u8>, PyCodeError> {
    let size = read_u64(mem, what, addr.saturating_add(OB_SIZE))? as i64;
    let size = u64::try_from(size)
        .ok()
        .filter(|&s| s <= MAX_LINETABLE)
        .ok_or_else(|| PyCodeError::BadField {
            code,
            what,
            addr,
            reason: format!("a bytes object of {size} bytes"),
        })?;
    let mut data = vec![0u8; size as usize];
    read(mem, what, addr.saturating_add(BYTES_DATA), &mut data)?;
    Ok(data)
}

/// Decodes a 3.11+ location table (CPython's `Objects/locations.md`) into
/// line ranges, as CPython walks it for `co_lines()`: each entry starts
/// with a byte with bit 7 set, holding a code (bits 3-6) and the number of
/// code units covered minus one (bits 0-2). The code says how the start
/// line moves from the previous entry's: not at all (0-9, short forms),
/// by `code - 10` (10-12, one-line forms), by a signed varint (13, no
/// columns; 14, long form), or not, with no location (15). The bytes after
/// the line delta (columns, end line) are skipped up to the next entry.
/// Adjacent entries on one line are merged.
pub(crate) fn decode_locations(table: &[u8], firstlineno: u32) -> Result<Vec<LineRange>, String> {
    let mut out: Vec<LineRange> = Vec::new();
    let mut line = i64::from(firstlineno);
    let mut end: u32 = 0;
    let mut at = 0;
    while let Some(&first) = table.get(at) {
        if first & 0x80 == 0 {
            return Err(format!("byte {at} ({first:#04x}) does not start an entry"));
        }
        let code = (first >> 3) & 15;
        let units = u32::from(first & 7) + 1;
        let entry_line = match code {
            15 => None,
            13 | 14 => {
                line += read_signed_varint(table, at + 1)?;
                Some(line)
            }
            10..=12 => {
                line += i64::from(code - 10);
                Some(line)
            }
            _ => Some(line),
        };
        // A line below 0 is no line CPython would print either.
        let entry_line = entry_line.and_then(|l| u32::try_from(l).ok());
        end = end
            .checked_add(units)
            .filter(|&e| i64::from(e) <= MAX_CODE_UNITS)
            .ok_or("the table covers more code than a code object holds")?;
        match out.last_mut() {
            Some(last) if last.line == entry_line => last.end = end,
            _ => out.push(LineRange {
                end,
                line: entry_line,
            }),
        }
        at += 1;
        while table.get(at).is_some_and(|b| b & 0x80 == 0) {
            at += 1;
        }
    }
    Ok(out)
}

/// An unsigned varint at `at`: 6-bit chunks, least significant first, bit
/// 6 set on all but the last.
fn read_varint(table: &[u8], mut at: usize) -> Result<u64, String> {
    let mut value = 0u64;
    for shift in (0..36).step_by(6) {
        let byte = *table
            .get(at)
            .ok_or("a varint runs past the end of the table")?;
        value |= u64::from(byte & 63) << shift;
        if byte & 64 == 0 {
            return Ok(value);
        }
        at += 1;
    }
    Err(format!("a varint at byte {at} is longer than 32 bits"))
}

/// A signed varint: the unsigned value shifted right by one, negated when
/// its lowest bit is set.
fn read_signed_varint(table: &[u8], at: usize) -> Result<i64, String> {
    let raw = read_varint(table, at)?;
    let magnitude = (raw >> 1) as i64;
    Ok(if raw & 1 == 1 { -magnitude } else { magnitude })
}

/// Entries kept per generation: two generations bound the cache at twice
/// this. A code object's entry is a few hundred bytes.
const CACHE_GENERATION: usize = 8192;
/// Bytes kept per generation: a hostile process's code objects may each
/// carry names of 4096 characters and a line table of a million entries.
const CACHE_GENERATION_BYTES: usize = 16 << 20;

/// Code objects already read, per (pid, address), validated by the
/// `co_firstlineno` the kernel saw with the address: a different one means
/// the address was freed and reused, so it is read again.
///
/// Bounded by two generations: new entries go to the recent one; when it
/// is full (entries or bytes) it becomes the older one (the previous older
/// one is dropped),
/// and a hit in the older generation moves back to the recent one. Code
/// objects in use stay; those no longer sampled age out.
#[derive(Debug)]
pub struct CodeCache {
    recent: HashMap<(u32, u64), Arc<CodeInfo>>,
    older: HashMap<(u32, u64), Arc<CodeInfo>>,
    generation: usize,
    /// Bytes of the recent generation's entries, and its budget.
    recent_bytes: usize,
    generation_bytes: usize,
}

impl Default for CodeCache {
    fn default() -> Self {
        Self::new()
    }
}

impl CodeCache {
    /// A cache of at most 16384 code objects and about 32 MiB.
    pub fn new() -> Self {
        Self::with_limits(CACHE_GENERATION, CACHE_GENERATION_BYTES)
    }

    /// A cache of at most `2 * generation` entries.
    pub fn with_generation(generation: usize) -> Self {
        Self::with_limits(generation, CACHE_GENERATION_BYTES)
    }

    /// A cache of at most `2 * generation` entries and about `2 * bytes`
    /// bytes (one entry may go past).
    pub fn with_limits(generation: usize, bytes: usize) -> Self {
        Self {
            recent: HashMap::new(),
            older: HashMap::new(),
            generation: generation.max(1),
            recent_bytes: 0,
            generation_bytes: bytes,
        }
    }

    /// The code object at `addr` in process `pid`, from the cache when the
    /// entry has the `co_firstlineno` the kernel saw, else read again.
    /// When the object read then still has another `co_firstlineno`, the
    /// sampled one is gone: [`PyCodeError::Stale`] (the new object is
    /// cached for the samples that see it).
    pub fn get(
        &mut self,
        pid: u32,
        mem: &impl RemoteMemory,
        layout: &CodeLayout,
        addr: u64,
        firstlineno_seen: u32,
    ) -> Result<Arc<CodeInfo>, PyCodeError> {
        let key = (pid, addr);
        if let Some(info) = self.recent.get(&key)
            && info.firstlineno == firstlineno_seen
        {
            return Ok(Arc::clone(info));
        }
        if let Some(info) = self.older.remove(&key)
            && info.firstlineno == firstlineno_seen
        {
            self.insert(key, Arc::clone(&info));
            return Ok(info);
        }
        let info = Arc::new(CodeInfo::read(mem, layout, addr)?);
        self.insert(key, Arc::clone(&info));
        if info.firstlineno != firstlineno_seen {
            return Err(PyCodeError::Stale {
                addr,
                seen: firstlineno_seen,
                now: info.firstlineno,
            });
        }
        Ok(info)
    }

    fn insert(&mut self, key: (u32, u64), info: Arc<CodeInfo>) {
        let full = self.recent.len() >= self.generation
            || self.recent_bytes + info.footprint() > self.generation_bytes;
        if full && !self.recent.contains_key(&key) && !self.recent.is_empty() {
            self.older = std::mem::take(&mut self.recent);
            self.recent_bytes = 0;
        }
        self.recent_bytes += info.footprint();
        if let Some(old) = self.recent.insert(key, info) {
            self.recent_bytes = self.recent_bytes.saturating_sub(old.footprint());
        }
    }

    /// Drops a process's entries (it exited: its addresses mean nothing).
    pub fn forget(&mut self, pid: u32) {
        self.recent.retain(|&(p, _), _| p != pid);
        self.older.retain(|&(p, _), _| p != pid);
        self.recent_bytes = self.recent.values().map(|i| i.footprint()).sum();
    }

    /// Bytes the entries hold (both generations).
    pub fn bytes(&self) -> usize {
        self.recent
            .values()
            .chain(self.older.values())
            .map(|i| i.footprint())
            .sum()
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.recent.len() + self.older.len()
    }

    /// Whether no entry is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use std::{cell::Cell, collections::BTreeMap, io::BufRead as _, path::PathBuf};

    use super::*;

    // ---- The location table, on hand-made tables ----

    /// One entry of a location table, as CPython's compiler writes them.
    enum Loc {
        /// Codes 0-9: same line, one byte of columns.
        Short(u8),
        /// Codes 10-12: line + delta (0..=2), start and end column bytes.
        OneLine(u8, u8),
        /// Code 13: line + delta, no columns.
        NoColumns(i64, u8),
        /// Code 14: line + delta, then end line delta, column, end column.
        Long(i64, u8),
        /// Code 15: no location.
        Nothing(u8),
    }

    fn varint(out: &mut Vec<u8>, mut v: u64) {
        loop {
            let chunk = (v & 63) as u8;
            v >>= 6;
            if v == 0 {
                out.push(chunk);
                return;
            }
            out.push(chunk | 64);
        }
    }

    fn signed_varint(out: &mut Vec<u8>, v: i64) {
        let raw = if v < 0 {
            (v.unsigned_abs() << 1) | 1
        } else {
            (v as u64) << 1
        };
        varint(out, raw);
    }

    fn encode(entries: &[Loc]) -> Vec<u8> {
        let mut out = Vec::new();
        let first = |code: u8, units: u8| 0x80 | (code << 3) | (units - 1);
        for e in entries {
            match *e {
                Loc::Short(units) => out.extend([first(3, units), 0x25]),
                Loc::OneLine(delta, units) => out.extend([first(10 + delta, units), 4, 17]),
                Loc::NoColumns(delta, units) => {
                    out.push(first(13, units));
                    signed_varint(&mut out, delta);
                }
                Loc::Long(delta, units) => {
                    out.push(first(14, units));
                    signed_varint(&mut out, delta);
                    varint(&mut out, 3);
                    varint(&mut out, 130);
                    varint(&mut out, 7);
                }
                Loc::Nothing(units) => out.push(first(15, units)),
            }
        }
        out
    }

    /// A code object of `units` code units with this table, for `line`.
    fn info(table: &[u8], firstlineno: u32, units: u32) -> CodeInfo {
        CodeInfo {
            filename: "f.py".to_string(),
            qualname: "f".to_string(),
            firstlineno,
            code_units: units,
            lines: decode_locations(table, firstlineno).expect("a valid table"),
        }
    }

    #[test]
    fn varints_as_locations_md_spells_them() {
        assert_eq!(read_varint(&[0x3f], 0), Ok(63));
        assert_eq!(read_varint(&[0x48, 0x03], 0), Ok(200));
        // svarint: 200 -> +100, 201 -> -100.
        assert_eq!(read_signed_varint(&[0x48, 0x03], 0), Ok(100));
        assert_eq!(read_signed_varint(&[0x49, 0x03], 0), Ok(-100));
        let mut out = Vec::new();
        signed_varint(&mut out, -100);
        assert_eq!(out, [0x49, 0x03]);
        assert!(read_varint(&[0x48], 0).is_err(), "runs past the end");
        assert!(read_varint(&[0x7f; 8], 0).is_err(), "longer than 32 bits");
    }

    #[test]
    fn every_entry_kind_moves_the_line_as_cpython_does() {
        let table = encode(&[
            Loc::Short(1),          // unit 0: line 10
            Loc::OneLine(1, 2),     // units 1-2: 11
            Loc::OneLine(2, 8),     // units 3-10: 13
            Loc::OneLine(0, 1),     // unit 11: 13
            Loc::NoColumns(100, 3), // units 12-14: 113 (two-chunk varint)
            Loc::Nothing(2),        // units 15-16: no location
            Loc::Long(-101, 4),     // units 17-20: 12 (a loop's back edge)
            Loc::Short(1),          // unit 21: 12
            Loc::NoColumns(0, 1),   // unit 22: 12
            Loc::Long(7000, 1),     // unit 23: 7012 (three-chunk varint)
        ]);
        let code = info(&table, 10, 24);
        let lines: Vec<Option<u32>> = (0..24).map(|i| code.line(i)).collect();
        let mut expected = vec![Some(10), Some(11), Some(11)];
        expected.extend([Some(13); 9]);
        expected.extend([Some(113); 3]);
        expected.extend([None; 2]);
        expected.extend([Some(12); 6]);
        expected.push(Some(7012));
        assert_eq!(lines, expected);
        // Past the code, and -1 (a 3.11/3.12 frame not yet started).
        assert_eq!(code.line(24), None);
        assert_eq!(code.line(1000), None);
        assert_eq!(code.line(NOT_STARTED), Some(10));
        // Same-line neighbours are one range.
        assert_eq!(code.lines.len(), 7, "{:?}", code.lines);
    }

    #[test]
    fn a_table_shorter_than_the_code_has_no_line_after_it() {
        let code = info(&encode(&[Loc::Short(2)]), 5, 10);
        assert_eq!(code.line(1), Some(5));
        assert_eq!(code.line(2), None);
        let empty = info(&[], 5, 10);
        assert_eq!(empty.line(0), None);
        assert_eq!(empty.line(NOT_STARTED), Some(5));
    }

    #[test]
    fn a_line_below_zero_is_no_line() {
        let code = info(
            &encode(&[Loc::NoColumns(-3, 1), Loc::NoColumns(4, 1)]),
            1,
            2,
        );
        assert_eq!(code.line(0), None);
        assert_eq!(code.line(1), Some(2));
    }

    #[test]
    fn malformed_tables_are_errors() {
        // Starts with a continuation byte.
        assert!(decode_locations(&[0x05], 1).is_err());
        // A no-columns entry whose varint is cut off.
        assert!(decode_locations(&[0x80 | (13 << 3), 0x41], 1).is_err());
        // A long entry whose line varint is missing.
        assert!(decode_locations(&[0x80 | (14 << 3)], 1).is_err());
        // Continuation bytes after an entry are skipped, as CPython does.
        assert!(decode_locations(&[0x80, 0x01, 0x02, 0x80], 1).is_ok());
    }

    // ---- A fake interpreter, for discovery, reads and their errors ----

    /// Memory of a process that is not there: regions of bytes, and EIO
    /// anywhere else (as /proc/PID/mem answers for an unmapped address).
    #[derive(Default)]
    struct FakeMemory {
        regions: BTreeMap<u64, Vec<u8>>,
        reads: Cell<usize>,
    }

    impl FakeMemory {
        fn put(&mut self, addr: u64, bytes: Vec<u8>) {
            self.regions.insert(addr, bytes);
        }

        fn patch(&mut self, addr: u64, bytes: &[u8]) {
            let (&start, region) = self
                .regions
                .range_mut(..=addr)
                .next_back()
                .expect("patching mapped memory");
            let at = (addr - start) as usize;
            region[at..at + bytes.len()].copy_from_slice(bytes);
        }
    }

    impl RemoteMemory for FakeMemory {
        fn read(&self, addr: u64, buf: &mut [u8]) -> std::io::Result<()> {
            self.reads.set(self.reads.get() + 1);
            let unmapped = || std::io::Error::from_raw_os_error(libc::EIO);
            let (&start, region) = self
                .regions
                .range(..=addr)
                .next_back()
                .ok_or_else(unmapped)?;
            let at = (addr - start) as usize;
            let bytes = region.get(at..at + buf.len()).ok_or_else(unmapped)?;
            buf.copy_from_slice(bytes);
            Ok(())
        }
    }

    const TYPE_AT: u64 = 0x10_0000;
    const MEMBERS_AT: u64 = 0x11_0000;
    const NAMES_AT: u64 = 0x12_0000;
    const CODE_AT: u64 = 0x20_0000;
    const FILENAME_AT: u64 = 0x30_0000;
    const QUALNAME_AT: u64 = 0x31_0000;
    const NAME_AT: u64 = 0x32_0000;
    const TABLE_AT: u64 = 0x33_0000;
    const BASICSIZE: u64 = 200;
    /// Offsets of the fake PyCodeObject.
    const FIRSTLINENO: u64 = 68;
    const FILENAME: u64 = 112;
    const NAME: u64 = 120;
    const QUALNAME: u64 = 128;
    const LINETABLE: u64 = 136;

    fn put_u64(b: &mut [u8], at: u64, v: u64) {
        b[at as usize..at as usize + 8].copy_from_slice(&v.to_le_bytes());
    }

    fn put_i32(b: &mut [u8], at: u64, v: i32) {
        b[at as usize..at as usize + 4].copy_from_slice(&v.to_le_bytes());
    }

    /// A compact `str` object for 3.12+ (headers of 40 and 56 bytes).
    fn str_object(s: &str) -> Vec<u8> {
        let max = s.chars().map(u32::from).max().unwrap_or(0);
        let (kind, ascii) = match max {
            0..=0x7f => (1, true),
            0x80..=0xff => (1, false),
            0x100..=0xffff => (2, false),
            _ => (4, false),
        };
        let mut b = vec![0u8; if ascii { 40 } else { 56 }];
        put_u64(&mut b, STR_LENGTH, s.chars().count() as u64);
        let state = (kind << 2) | (1 << 5) | (u32::from(ascii) << 6);
        put_i32(&mut b, STR_STATE, state as i32);
        for c in s.chars() {
            let c = u32::from(c);
            b.extend_from_slice(&c.to_le_bytes()[..kind as usize]);
        }
        b.push(0);
        b
    }

    fn bytes_object(data: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; 32];
        put_u64(&mut b, OB_SIZE, data.len() as u64);
        b.extend_from_slice(data);
        b
    }

    /// A process with `PyCode_Type` (3.12+ layout) and one code object:
    /// `grüße` of `/srv/app/関数_🐍.py`, from line 40, 6 code units.
    fn fake_python() -> FakeMemory {
        let mut mem = FakeMemory::default();
        let mut ty = vec![0u8; 256];
        put_u64(&mut ty, TP_NAME, NAMES_AT);
        put_u64(&mut ty, TP_BASICSIZE, BASICSIZE);
        put_u64(&mut ty, TP_ITEMSIZE, 2);
        put_u64(&mut ty, TP_MEMBERS, MEMBERS_AT);
        mem.put(TYPE_AT, ty);
        let members: [(&str, i32, u64); 6] = [
            ("co_argcount", T_INT, 24),
            ("co_filename", T_OBJECT, FILENAME),
            ("co_name", T_OBJECT, NAME),
            ("co_qualname", T_OBJECT, QUALNAME),
            ("co_linetable", T_OBJECT, LINETABLE),
            ("co_firstlineno", T_INT, FIRSTLINENO),
        ];
        let mut names = b"code\0".to_vec();
        let mut defs = vec![0u8; (members.len() as u64 + 1) as usize * MEMBER_SIZE as usize];
        for (i, (name, kind, offset)) in members.iter().enumerate() {
            let def = i as u64 * MEMBER_SIZE;
            put_u64(&mut defs, def, NAMES_AT + names.len() as u64);
            put_i32(&mut defs, def + 8, *kind);
            put_u64(&mut defs, def + 16, *offset);
            names.extend_from_slice(name.as_bytes());
            names.push(0);
        }
        mem.put(MEMBERS_AT, defs);
        // Room after the last name: C strings are read in 64-byte pieces.
        names.resize(names.len() + 64, 0);
        mem.put(NAMES_AT, names);

        let mut code = vec![0u8; BASICSIZE as usize + 12];
        put_u64(&mut code, OB_TYPE, TYPE_AT);
        put_u64(&mut code, OB_SIZE, 6);
        put_i32(&mut code, FIRSTLINENO, 40);
        put_u64(&mut code, FILENAME, FILENAME_AT);
        put_u64(&mut code, NAME, NAME_AT);
        put_u64(&mut code, QUALNAME, QUALNAME_AT);
        put_u64(&mut code, LINETABLE, TABLE_AT);
        mem.put(CODE_AT, code);
        mem.put(FILENAME_AT, str_object("/srv/app/関数_🐍.py"));
        mem.put(QUALNAME_AT, str_object("Outer.grüße"));
        mem.put(NAME_AT, str_object("grüße"));
        let table = encode(&[Loc::Short(1), Loc::OneLine(1, 3), Loc::Nothing(2)]);
        mem.put(TABLE_AT, bytes_object(&table));
        mem
    }

    fn fake_layout() -> CodeLayout {
        CodeLayout::discover(&fake_python(), TYPE_AT, 12).expect("the fake PyCode_Type")
    }

    #[test]
    fn discovers_the_fake_layout() {
        assert_eq!(
            fake_layout(),
            CodeLayout {
                filename: FILENAME,
                qualname: QUALNAME,
                name: NAME,
                linetable: LINETABLE,
                firstlineno: FIRSTLINENO,
                code_adaptive: BASICSIZE,
                ascii_data: 40,
                compact_data: 56,
            }
        );
        let old = CodeLayout::discover(&fake_python(), TYPE_AT, 11).expect("3.11");
        assert_eq!((old.ascii_data, old.compact_data), (48, 72));
    }

    #[test]
    fn reads_the_fake_code_object() {
        let mem = fake_python();
        let code = CodeInfo::read(&mem, &fake_layout(), CODE_AT).expect("a code object");
        assert_eq!(code.filename, "/srv/app/関数_🐍.py");
        assert_eq!(code.qualname, "Outer.grüße");
        assert_eq!(code.firstlineno, 40);
        assert_eq!(code.code_units, 6);
        let lines: Vec<_> = (0..7).map(|i| code.line(i)).collect();
        assert_eq!(
            lines,
            [Some(40), Some(41), Some(41), Some(41), None, None, None]
        );
    }

    #[test]
    fn a_null_qualname_falls_back_to_the_name() {
        let mut mem = fake_python();
        mem.patch(CODE_AT + QUALNAME, &0u64.to_le_bytes());
        let code = CodeInfo::read(&mem, &fake_layout(), CODE_AT).expect("a code object");
        assert_eq!(code.qualname, "grüße");
    }

    #[test]
    fn legacy_and_ascii_strings_read() {
        let mut mem = fake_python();
        // A legacy (non-compact) latin-1 string whose data is elsewhere.
        let mut legacy = vec![0u8; 64];
        put_u64(&mut legacy, STR_LENGTH, 3);
        put_i32(&mut legacy, STR_STATE, 1 << 2);
        put_u64(&mut legacy, 56, 0x40_0000);
        mem.put(FILENAME_AT, legacy);
        mem.put(0x40_0000, b"\xe9t\xe9\0".to_vec());
        mem.put(QUALNAME_AT, str_object("plain_ascii"));
        let code = CodeInfo::read(&mem, &fake_layout(), CODE_AT).expect("a code object");
        assert_eq!(
            (code.filename.as_str(), code.qualname.as_str()),
            ("été", "plain_ascii")
        );
    }

    /// A change to the fake process's memory.
    type Spoil = fn(&mut FakeMemory);

    /// Reads the fake code object after `spoil` changed its memory.
    fn read_spoiled(spoil: impl FnOnce(&mut FakeMemory)) -> PyCodeError {
        let layout = fake_layout();
        let mut mem = fake_python();
        spoil(&mut mem);
        CodeInfo::read(&mem, &layout, CODE_AT).expect_err("a spoiled code object")
    }

    #[test]
    fn bad_code_objects_are_errors_not_panics() {
        let layout = fake_layout();
        let mem = fake_python();
        for addr in [0, 8, CODE_AT + 4, 0xdead_0000, u64::MAX - 7, u64::MAX - 39] {
            let e = CodeInfo::read(&mem, &layout, addr).expect_err("not a code object");
            assert!(!e.to_string().is_empty());
        }
        let unmapped = CodeInfo::read(&mem, &layout, 0xdead_0000).expect_err("unmapped");
        assert!(
            unmapped.to_string().contains("nothing is mapped there"),
            "{unmapped}"
        );

        // What is spoiled, and what the error says.
        let cases: [(Spoil, &str); 14] = [
            (
                |m| m.patch(CODE_AT + FILENAME, &0u64.to_le_bytes()),
                "co_filename is not a valid pointer (0x0)",
            ),
            (
                |m| m.patch(CODE_AT + LINETABLE, &0x7777_0000u64.to_le_bytes()),
                "cannot read co_linetable at 0x77770010",
            ),
            (|m| m.patch(NAMES_AT, b"dict\0"), "its type is \"dict\""),
            (
                |m| m.patch(CODE_AT + OB_TYPE, &0x5555_0000u64.to_le_bytes()),
                "cannot read the code object's type",
            ),
            (
                |m| m.patch(CODE_AT + OB_SIZE, &(-1i64).to_le_bytes()),
                "-1 code units",
            ),
            (
                |m| m.patch(CODE_AT + FIRSTLINENO, &(-5i32).to_le_bytes()),
                "co_firstlineno is -5",
            ),
            (
                |m| m.patch(FILENAME_AT + STR_LENGTH, &(1u64 << 40).to_le_bytes()),
                "a str of 1099511627776 characters",
            ),
            (
                |m| {
                    m.patch(
                        QUALNAME_AT + STR_STATE,
                        &((3u32 << 2) | (1 << 5)).to_le_bytes(),
                    )
                },
                "a str of kind 3",
            ),
            (
                |m| {
                    m.patch(
                        QUALNAME_AT + STR_STATE,
                        &((2u32 << 2) | (3 << 5)).to_le_bytes(),
                    )
                },
                "a str of kind 2 (ascii true)",
            ),
            (
                |m| m.patch(QUALNAME_AT + STR_LENGTH, &4000u64.to_le_bytes()),
                "nothing is mapped there",
            ),
            (
                |m| {
                    m.put(QUALNAME_AT, str_object("abc"));
                    m.patch(QUALNAME_AT + 40, b"\xff");
                },
                "an ASCII str with non-ASCII bytes",
            ),
            (
                |m| {
                    m.put(QUALNAME_AT, str_object("𠀀"));
                    m.patch(QUALNAME_AT + 56, &0x0011_0000u32.to_le_bytes());
                },
                "character 0x110000 is beyond Unicode",
            ),
            (
                |m| m.patch(TABLE_AT + OB_SIZE, &(MAX_LINETABLE + 1).to_le_bytes()),
                "a bytes object of 1048577 bytes",
            ),
            (
                |m| m.patch(TABLE_AT + BYTES_DATA, &[0x01]),
                "byte 0 (0x01) does not start an entry",
            ),
        ];
        // Pointers that would wrap around the address space.
        for at in [FILENAME, LINETABLE] {
            let mut mem = fake_python();
            mem.patch(CODE_AT + at, &(u64::MAX - 39).to_le_bytes());
            CodeInfo::read(&mem, &layout, CODE_AT).expect_err("no object up there");
        }
        for (spoil, says) in cases {
            let e = read_spoiled(spoil).to_string();
            assert!(e.contains(says), "{e:?} does not say {says:?}");
        }
    }

    #[test]
    fn lone_surrogates_become_replacement_characters() {
        let mut mem = fake_python();
        mem.put(QUALNAME_AT, str_object("ab\u{100}"));
        mem.patch(QUALNAME_AT + 56 + 4, &0xdcffu16.to_le_bytes());
        let code = CodeInfo::read(&mem, &fake_layout(), CODE_AT).expect("a code object");
        assert_eq!(code.qualname, "ab\u{fffd}");
    }

    #[test]
    fn bad_code_types_are_errors_not_panics() {
        let discover = |spoil: &dyn Fn(&mut FakeMemory), addr: u64, minor: u32| {
            let mut mem = fake_python();
            spoil(&mut mem);
            CodeLayout::discover(&mem, addr, minor).expect_err("not a usable PyCode_Type")
        };
        let none = |_: &mut FakeMemory| {};
        let e = discover(&none, TYPE_AT, 10);
        assert!(
            matches!(e, PyCodeError::UnsupportedVersion { minor: 10 }),
            "{e}"
        );
        assert!(matches!(
            discover(&none, TYPE_AT, 16),
            PyCodeError::UnsupportedVersion { .. }
        ));
        assert!(matches!(
            discover(&none, 0, 12),
            PyCodeError::BadPointer { .. }
        ));
        assert!(matches!(
            discover(&none, 0x9999_0000, 12),
            PyCodeError::Read { .. }
        ));
        // The code object is not a type: its "tp_name" is a pointer to a str.
        assert!(!discover(&none, CODE_AT, 12).to_string().is_empty());
        let e = discover(&|m| m.patch(NAMES_AT, b"list\0"), TYPE_AT, 12);
        assert!(e.to_string().contains("\"list\""), "{e}");
        let e = discover(
            &|m| m.patch(TYPE_AT + TP_ITEMSIZE, &8u64.to_le_bytes()),
            TYPE_AT,
            12,
        );
        assert!(e.to_string().contains("tp_itemsize"), "{e}");
        let e = discover(
            &|m| m.patch(TYPE_AT + TP_BASICSIZE, &1u64.to_le_bytes()),
            TYPE_AT,
            12,
        );
        assert!(e.to_string().contains("tp_basicsize"), "{e}");
        // co_qualname renamed away: the member is missing.
        let e = discover(
            &|m| m.patch(NAMES_AT + 5 + 12 + 12 + 8 + 3, b"X"),
            TYPE_AT,
            12,
        );
        assert!(
            matches!(
                e,
                PyCodeError::Member {
                    member: "co_qualname",
                    ..
                }
            ),
            "{e}"
        );
        // co_firstlineno said to be an object; co_filename beyond basicsize.
        let firstlineno_def = MEMBERS_AT + 5 * MEMBER_SIZE;
        let e = discover(
            &|m| m.patch(firstlineno_def + 8, &T_OBJECT.to_le_bytes()),
            TYPE_AT,
            12,
        );
        assert!(
            matches!(
                e,
                PyCodeError::Member {
                    member: "co_firstlineno",
                    ..
                }
            ),
            "{e}"
        );
        let filename_def = MEMBERS_AT + MEMBER_SIZE;
        let e = discover(
            &|m| m.patch(filename_def + 16, &BASICSIZE.to_le_bytes()),
            TYPE_AT,
            12,
        );
        assert!(
            matches!(
                e,
                PyCodeError::Member {
                    member: "co_filename",
                    ..
                }
            ),
            "{e}"
        );
        let e = discover(
            &|m| m.patch(filename_def + 16, &(-8i64).to_le_bytes()),
            TYPE_AT,
            12,
        );
        assert!(
            matches!(
                e,
                PyCodeError::Member {
                    member: "co_filename",
                    ..
                }
            ),
            "{e}"
        );
        // No terminator: every entry names a member.
        let endless = |m: &mut FakeMemory| {
            let mut defs = vec![0u8; (MAX_MEMBERS * MEMBER_SIZE) as usize];
            for i in 0..MAX_MEMBERS {
                put_u64(&mut defs, i * MEMBER_SIZE, NAMES_AT + 5);
            }
            m.put(MEMBERS_AT, defs);
        };
        let e = discover(&endless, TYPE_AT, 12);
        assert!(e.to_string().contains("no end"), "{e}");
        // A member name without a NUL within reach.
        let e = discover(&|m| m.put(NAMES_AT + 5, vec![b'a'; 200]), TYPE_AT, 12);
        assert!(!e.to_string().is_empty());
    }

    // ---- The cache ----

    #[test]
    fn the_cache_rereads_when_co_firstlineno_changes() {
        let layout = fake_layout();
        let first = fake_python();
        let nothing = FakeMemory::default();
        let mut cache = CodeCache::new();

        let a = cache.get(7, &first, &layout, CODE_AT, 40).expect("read");
        assert_eq!(a.qualname, "Outer.grüße");
        // A hit reads nothing: memory that answers no read still serves it.
        let again = cache
            .get(7, &nothing, &layout, CODE_AT, 40)
            .expect("cached");
        assert!(Arc::ptr_eq(&a, &again));
        assert_eq!(nothing.reads.get(), 0);
        // Another process's same address is another code object.
        assert!(cache.get(8, &nothing, &layout, CODE_AT, 40).is_err());

        // The address now holds another code object, from line 90.
        let mut reused = fake_python();
        reused.patch(CODE_AT + FIRSTLINENO, &90i32.to_le_bytes());
        reused.put(QUALNAME_AT, str_object("other"));
        let b = cache
            .get(7, &reused, &layout, CODE_AT, 90)
            .expect("re-read");
        assert_eq!((b.qualname.as_str(), b.firstlineno), ("other", 90));
        assert_eq!(b.line(0), Some(90));
        let reads = reused.reads.get();
        assert!(reads > 0);
        assert!(Arc::ptr_eq(
            &b,
            &cache.get(7, &reused, &layout, CODE_AT, 90).expect("hit")
        ));
        assert_eq!(reused.reads.get(), reads);

        // A sample of the old object, after it is gone: read, and refused.
        let e = cache
            .get(7, &reused, &layout, CODE_AT, 40)
            .expect_err("stale");
        assert!(
            matches!(
                e,
                PyCodeError::Stale {
                    seen: 40,
                    now: 90,
                    ..
                }
            ),
            "{e}"
        );

        cache.forget(7);
        assert!(cache.is_empty());
        assert!(cache.get(7, &nothing, &layout, CODE_AT, 90).is_err());
    }

    #[test]
    fn the_cache_is_bounded_and_keeps_what_is_used() {
        let layout = fake_layout();
        let mem = fake_python();
        let nothing = FakeMemory::default();
        let mut cache = CodeCache::with_generation(2);
        // The same code object seen by many processes: one entry each.
        for pid in 0..10 {
            cache.get(pid, &mem, &layout, CODE_AT, 40).expect("read");
            // Process 0 keeps sampling it.
            cache.get(0, &mem, &layout, CODE_AT, 40).expect("read");
            assert!(cache.len() <= 4, "{}", cache.len());
        }
        assert!(
            cache.get(0, &nothing, &layout, CODE_AT, 40).is_ok(),
            "a hot entry stays"
        );
        assert!(
            cache.get(1, &nothing, &layout, CODE_AT, 40).is_err(),
            "a cold one ages out"
        );
    }

    #[test]
    fn the_cache_is_bounded_in_bytes_too() {
        let layout = fake_layout();
        let mem = fake_python();
        let one = CodeInfo::read(&mem, &layout, CODE_AT)
            .expect("read")
            .footprint();
        // Room for three entries a generation, whatever the entry count.
        let mut cache = CodeCache::with_limits(1000, 3 * one);
        for pid in 0..50 {
            cache.get(pid, &mem, &layout, CODE_AT, 40).expect("read");
            assert!(cache.bytes() <= 6 * one, "{} bytes", cache.bytes());
        }
        assert!(cache.len() <= 6, "{}", cache.len());
        // One entry larger than a generation is still kept (alone).
        let mut tiny = CodeCache::with_limits(1000, 1);
        tiny.get(1, &mem, &layout, CODE_AT, 40).expect("read");
        tiny.get(2, &mem, &layout, CODE_AT, 40).expect("read");
        assert_eq!(tiny.len(), 2, "the new one, and the previous as older");
        tiny.get(3, &mem, &layout, CODE_AT, 40).expect("read");
        assert_eq!(tiny.len(), 2);
    }

    // ---- Real interpreters on this machine ----

    /// The script a real interpreter runs: functions with non-ASCII names
    /// (latin-1, BMP, astral) in a file with an astral character in its
    /// name, nested and method ones, comprehensions, and a long function
    /// with line jumps beyond 63 both ways. It prints every code object it
    /// holds and the line of each of its code units, then waits.
    const SCRIPT_HEAD: &str = r#"import json
import sys


class Outer:
    class Inner:
        def method(self):
            return [x * 2 for x in range(3)]

    def make(self):
        def closure():
            return self
        return closure


def grüße(a):
    return a + 1


def 関数():
    return "ok"


def 𠀀():
    return sum(x for x in range(3))


def long_function(n):
    total = 0
    for i in range(n):
        total += i
"#;
    /// After the first gap: the loop's back edge jumps back over it (3.12+
    /// put the jump on the `for` line); a call's arguments after the
    /// second gap, then the call on its first line (all versions).
    const SCRIPT_MIDDLE: &str = r#"        total -= 1
    total = max(
"#;
    const SCRIPT_TAIL: &str = r#"        total,
        1,
    )
    while total > 10:
        total //= 2
    try:
        total = 1 // (total - total)
    except ZeroDivisionError:
        total = -1
    finally:
        total += 0
    with open(__file__, "rb") as f:
        f.read(1)
    return total


for _ in range(100):
    Outer.Inner().method()
    Outer().make()()
    grüße(1)
    関数()
    𠀀()
    long_function(5)


def describe(co):
    units = len(co.co_code) // 2
    lines = [None] * units
    for start, end, line in co.co_lines():
        for offset in range(start, end, 2):
            lines[offset // 2] = line
    return {
        "addr": id(co),
        "filename": co.co_filename,
        "qualname": co.co_qualname,
        "firstlineno": co.co_firstlineno,
        "units": units,
        "lines": lines,
    }


def walk(co):
    yield co
    for const in co.co_consts:
        if isinstance(const, type(co)):
            yield from walk(const)


module = sys._getframe().f_code
print(json.dumps({
    "minor": sys.version_info.minor,
    "code_type": id(type(module)),
    "basicsize": type(module).__basicsize__,
    "codes": [describe(co) for co in walk(module)],
}), flush=True)
sys.stdin.readline()
"#;

    /// A child interpreter, killed and its files removed when dropped (also
    /// when an assertion fails).
    struct Child {
        process: std::process::Child,
        dir: PathBuf,
    }

    impl Drop for Child {
        fn drop(&mut self) {
            let _ = self.process.kill();
            let _ = self.process.wait();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn check_interpreter(python: &str, minor: u32) {
        assert!(
            std::path::Path::new(python).exists(),
            "{python} is missing: this test reads a live CPython 3.{minor} (Debian's python3.11, pyenv 3.11.7, 3.12.1, 3.13.0)"
        );
        let tag = python.replace('/', "_");
        let dir =
            std::env::temp_dir().join(format!("memtrace-pycode-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let script = dir.join("snake_🐍.py");
        let gap = "        # a gap: the next line is more than 63 lines on\n".repeat(100);
        std::fs::write(
            &script,
            format!("{SCRIPT_HEAD}{gap}{SCRIPT_MIDDLE}{gap}{SCRIPT_TAIL}"),
        )
        .expect("script");
        let process = std::process::Command::new(python)
            .arg(&script)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env("PYTHONUTF8", "1")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn python");
        let mut child = Child { process, dir };
        let mut line = String::new();
        let stdout = child.process.stdout.as_mut().expect("stdout");
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read");
        assert!(
            !line.is_empty(),
            "{python} printed nothing (see its stderr)"
        );
        let report: serde_json::Value = serde_json::from_str(&line).expect("json");
        assert_eq!(report["minor"], minor);
        let pid = child.process.id();
        let mem = ProcMemory::open(pid).expect("open /proc/PID/mem (as root)");
        let code_type = report["code_type"].as_u64().expect("code_type");
        let layout = CodeLayout::discover(&mem, code_type, minor).expect("discover");
        println!("{python} (3.{minor}): PyCode_Type at {code_type:#x}: {layout:?}");
        assert_eq!(Some(layout.code_adaptive), report["basicsize"].as_u64());

        let codes = report["codes"].as_array().expect("codes");
        let (mut units_checked, mut no_location, mut jumps) = (0, 0, (0i64, 0i64));
        let mut cache = CodeCache::new();
        let mut qualnames = Vec::new();
        for expected in codes {
            let addr = expected["addr"].as_u64().expect("addr");
            let code = CodeInfo::read(&mem, &layout, addr)
                .unwrap_or_else(|e| panic!("{}: {e}", expected["qualname"]));
            assert_eq!(
                code.filename,
                expected["filename"].as_str().expect("filename")
            );
            assert_eq!(
                code.qualname,
                expected["qualname"].as_str().expect("qualname")
            );
            assert_eq!(
                Some(u64::from(code.firstlineno)),
                expected["firstlineno"].as_u64()
            );
            assert_eq!(Some(u64::from(code.code_units)), expected["units"].as_u64());
            let lines = expected["lines"].as_array().expect("lines");
            let mut previous = None;
            for (index, want) in lines.iter().enumerate() {
                let got = code.line(index as u32);
                assert_eq!(
                    got.map(u64::from),
                    want.as_u64(),
                    "{} unit {index}: {want}",
                    code.qualname
                );
                units_checked += 1;
                no_location += usize::from(got.is_none());
                if let (Some(p), Some(g)) = (previous, got) {
                    let delta = i64::from(g) - i64::from(p);
                    jumps = (jumps.0.min(delta), jumps.1.max(delta));
                }
                previous = got.or(previous);
            }
            assert_eq!(code.line(code.code_units), None);
            let cached = cache
                .get(pid, &mem, &layout, addr, code.firstlineno)
                .expect("cache");
            assert_eq!(*cached, code);
            assert!(matches!(
                cache.get(pid, &mem, &layout, addr, code.firstlineno + 1),
                Err(PyCodeError::Stale { .. })
            ));
            qualnames.push(code.qualname);
        }
        println!(
            "  {} code objects, {units_checked} code units, {no_location} without a line, line jumps {jumps:?}",
            codes.len()
        );
        for name in [
            "grüße",
            "関数",
            "𠀀",
            "𠀀.<locals>.<genexpr>",
            "Outer.Inner.method",
            "Outer.make.<locals>.closure",
            "long_function",
        ] {
            assert!(
                qualnames.iter().any(|q| q == name),
                "{name} not in {qualnames:?}"
            );
        }
        assert!(
            jumps.0 < -63 && jumps.1 > 63,
            "the script should jump more than 63 lines both ways: {jumps:?}"
        );
    }

    #[test]
    fn reads_debian_python_3_11() {
        check_interpreter("/usr/bin/python3.11", 11);
    }

    #[test]
    fn reads_pyenv_python_3_11() {
        check_interpreter("/root/.pyenv/versions/3.11.7/bin/python3.11", 11);
    }

    #[test]
    fn reads_pyenv_python_3_12() {
        check_interpreter("/root/.pyenv/versions/3.12.1/bin/python3.12", 12);
    }

    #[test]
    fn reads_pyenv_python_3_13() {
        check_interpreter("/root/.pyenv/versions/3.13.0/bin/python3.13", 13);
    }
}
