//! CPython's `_Py_DebugOffsets` (3.14 and 3.15): the table of struct
//! offsets at the start of `_PyRuntime` that out-of-process readers use.
//! Its layout changes every minor version and has no layout version of its
//! own, so the field list is chosen by the interpreter's version and the
//! table is checked as untrusted input before anything is taken from it,
//! as CPython's own remote reader does: every section size non-zero and
//! bounded, every field used inside its section and aligned.
use std::collections::HashMap;

/// `"xdebugpy"`: the table's cookie.
pub const COOKIE: &[u8; 8] = b"xdebugpy";

/// A section and its fields, in the table's order; each is one `u64`.
type Section = (&'static str, &'static [&'static str]);

const RUNTIME: Section = (
    "runtime_state",
    &["size", "finalizing", "interpreters_head"],
);
const INTERP_314: Section = (
    "interpreter_state",
    &[
        "size",
        "id",
        "next",
        "threads_head",
        "threads_main",
        "gc",
        "imports_modules",
        "sysdict",
        "builtins",
        "ceval_gil",
        "gil_runtime_state",
        "gil_runtime_state_enabled",
        "gil_runtime_state_locked",
        "gil_runtime_state_holder",
        "code_object_generation",
        "tlbc_generation",
    ],
);
const THREAD_314: Section = (
    "thread_state",
    &[
        "size",
        "prev",
        "next",
        "interp",
        "current_frame",
        "thread_id",
        "native_thread_id",
        "datastack_chunk",
        "status",
    ],
);
const THREAD_315: Section = (
    "thread_state",
    &[
        "size",
        "prev",
        "next",
        "interp",
        "current_frame",
        "base_frame",
        "last_profiled_frame",
        "last_profiled_frame_seq",
        "thread_id",
        "native_thread_id",
        "datastack_chunk",
        "status",
        "holds_gil",
        "gil_requested",
        "current_exception",
        "exc_state",
    ],
);
const ERR_STACKITEM: Section = ("err_stackitem", &["exc_value"]);
const FRAME: Section = (
    "interpreter_frame",
    &[
        "size",
        "previous",
        "executable",
        "instr_ptr",
        "localsplus",
        "owner",
        "stackpointer",
        "tlbc_index",
    ],
);
const CODE: Section = (
    "code_object",
    &[
        "size",
        "filename",
        "name",
        "qualname",
        "linetable",
        "firstlineno",
        "argcount",
        "localsplusnames",
        "localspluskinds",
        "co_code_adaptive",
        "co_tlbc",
    ],
);
const PYOBJECT: Section = ("pyobject", &["size", "ob_type"]);
const TYPE_314: Section = ("type_object", &["size", "tp_name", "tp_repr", "tp_flags"]);
const TYPE_315: Section = (
    "type_object",
    &[
        "size",
        "tp_name",
        "tp_repr",
        "tp_flags",
        "tp_basicsize",
        "tp_dictoffset",
    ],
);
const HEAP_TYPE: Section = ("heap_type_object", &["size", "ht_cached_keys"]);
const TUPLE: Section = ("tuple_object", &["size", "ob_item", "ob_size"]);
const LIST: Section = ("list_object", &["size", "ob_item", "ob_size"]);
const SET: Section = ("set_object", &["size", "used", "table", "mask"]);
const DICT: Section = ("dict_object", &["size", "ma_keys", "ma_values"]);
const FLOAT: Section = ("float_object", &["size", "ob_fval"]);
const LONG: Section = ("long_object", &["size", "lv_tag", "ob_digit"]);
const BYTES: Section = ("bytes_object", &["size", "ob_size", "ob_sval"]);
const UNICODE_314: Section = (
    "unicode_object",
    &["size", "state", "length", "asciiobject_size"],
);
const UNICODE_315: Section = (
    "unicode_object",
    &[
        "size",
        "state",
        "length",
        "asciiobject_size",
        "compactunicodeobject_size",
    ],
);
const GC_314: Section = ("gc", &["size", "collecting"]);
const GC_315: Section = (
    "gc",
    &[
        "size",
        "collecting",
        "frame",
        "generation_stats_size",
        "generation_stats",
    ],
);
const GEN: Section = (
    "gen_object",
    &["size", "gi_name", "gi_iframe", "gi_frame_state"],
);
const LLIST: Section = ("llist_node", &["next", "prev"]);
const DEBUGGER: Section = (
    "debugger_support",
    &[
        "eval_breaker",
        "remote_debugger_support",
        "remote_debugging_enabled",
        "debugger_pending_call",
        "debugger_script_path",
        "debugger_script_path_size",
    ],
);

/// The sections of each minor version's table, in order (3.15 as released:
/// the layout from 3.15.0b4 on).
fn layout(minor: u32) -> Option<&'static [Section]> {
    // In the order of CPython's struct.
    #[rustfmt::skip]
    const V314: &[Section] = &[
        RUNTIME, INTERP_314, THREAD_314, FRAME, CODE, PYOBJECT, TYPE_314, TUPLE, LIST, SET, DICT,
        FLOAT, LONG, BYTES, UNICODE_314, GC_314, GEN, LLIST, DEBUGGER,
    ];
    #[rustfmt::skip]
    const V315: &[Section] = &[
        RUNTIME, INTERP_314, THREAD_315, ERR_STACKITEM, FRAME, CODE, PYOBJECT, TYPE_315, HEAP_TYPE,
        TUPLE, LIST, SET, DICT, FLOAT, LONG, BYTES, UNICODE_315, GC_315, GEN, LLIST, DEBUGGER,
    ];
    match minor {
        14 => Some(V314),
        15 => Some(V315),
        _ => None,
    }
}

/// Bytes of the table of a minor version: cookie, version, free_threaded,
/// then one `u64` per field.
pub fn table_size(minor: u32) -> Option<usize> {
    let fields: usize = layout(minor)?.iter().map(|(_, f)| f.len()).sum();
    Some(24 + 8 * fields)
}

/// Largest struct a section may describe: a table claiming more is not
/// believed.
const MAX_SECTION: u64 = 1 << 24;

/// A validated table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DebugOffsets {
    pub version_hex: u32,
    pub free_threaded: bool,
    fields: HashMap<(&'static str, &'static str), u64>,
}

/// What a reader takes from the table: (section, field, width in bytes).
/// Each must lie inside its section's struct and be aligned to its width.
const USED: &[(&str, &str, u64)] = &[
    ("runtime_state", "interpreters_head", 8),
    ("interpreter_state", "threads_head", 8),
    ("thread_state", "next", 8),
    ("thread_state", "current_frame", 8),
    ("thread_state", "thread_id", 8),
    ("interpreter_frame", "previous", 8),
    ("interpreter_frame", "executable", 8),
    ("interpreter_frame", "instr_ptr", 8),
    ("interpreter_frame", "owner", 1),
    ("code_object", "firstlineno", 4),
    ("pyobject", "ob_type", 8),
];

impl DebugOffsets {
    /// Parses and checks the table at the start of `_PyRuntime`'s bytes;
    /// `version_hex` is the build's `Py_Version`.
    pub fn parse(bytes: &[u8], version_hex: u32) -> Result<Self, String> {
        let minor = (version_hex >> 16) & 0xff;
        let sections = layout(minor).ok_or_else(|| {
            format!(
                "no _Py_DebugOffsets layout for CPython 3.{minor} (memtrace knows 3.14 and 3.15)"
            )
        })?;
        let size = table_size(minor).unwrap_or(0);
        if bytes.len() < size {
            return Err(format!(
                "_Py_DebugOffsets: {} bytes read, the 3.{minor} table has {size}",
                bytes.len()
            ));
        }
        if &bytes[..8] != COOKIE {
            return Err(
                "_PyRuntime does not start with _Py_DebugOffsets (cookie xdebugpy missing)".into(),
            );
        }
        let word = |i: usize| u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().unwrap());
        let table_version = word(1);
        if table_version != u64::from(version_hex) {
            return Err(format!(
                "_Py_DebugOffsets says version {table_version:#x}, the build {version_hex:#x}"
            ));
        }
        let mut fields = HashMap::new();
        let mut i = 3;
        for (section, names) in sections {
            for name in *names {
                fields.insert((*section, *name), word(i));
                i += 1;
            }
        }
        let table = Self {
            version_hex,
            free_threaded: word(2) != 0,
            fields,
        };
        table.check()?;
        Ok(table)
    }

    fn check(&self) -> Result<(), String> {
        for (section, names) in layout((self.version_hex >> 16) & 0xff).unwrap_or(&[]) {
            if names.first() != Some(&"size") {
                continue;
            }
            let size = self.fields[&(*section, "size")];
            if size == 0 || size > MAX_SECTION {
                return Err(format!(
                    "_Py_DebugOffsets: section {section} has size {size}: not a CPython 3.14/3.15 table (a pre-release with another layout?)"
                ));
            }
        }
        for &(section, field, width) in USED {
            let size = self.fields[&(section, "size")];
            let at = self.fields[&(section, field)];
            if !at.is_multiple_of(width) || at.checked_add(width).is_none_or(|end| end > size) {
                return Err(format!(
                    "_Py_DebugOffsets: {section}.{field} is at {at}, not an aligned {width}-byte field of the {size}-byte struct (a pre-release with another layout?)"
                ));
            }
        }
        Ok(())
    }

    /// A field's value (an offset, or a size for `size` fields).
    pub fn get(&self, section: &str, field: &str) -> Option<u64> {
        self.fields
            .iter()
            .find(|((s, f), _)| *s == section && *f == field)
            .map(|(_, &v)| v)
    }

    /// A field the reader uses (`USED`), as a `u32` offset.
    pub fn offset(&self, section: &str, field: &str) -> Result<u32, String> {
        self.get(section, field)
            .and_then(|v| u32::try_from(v).ok())
            .ok_or_else(|| format!("_Py_DebugOffsets has no {section}.{field}"))
    }
}

/// A table laid out as a 3.`minor` build lays it out (every section 4096
/// bytes, every field at 8), with the given overrides: for tests and the
/// fuzz targets.
pub(crate) fn synthetic_table(minor: u32, version_hex: u32, set: &[(&str, &str, u64)]) -> Vec<u8> {
    let mut out = COOKIE.to_vec();
    out.extend(u64::from(version_hex).to_le_bytes());
    out.extend(0u64.to_le_bytes());
    for (section, names) in layout(minor).unwrap() {
        for name in *names {
            let v = set
                .iter()
                .find(|(s, f, _)| s == section && f == name)
                .map(|&(_, _, v)| v)
                .unwrap_or(if *name == "size" { 4096 } else { 8 });
            out.extend(v.to_le_bytes());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    use synthetic_table as table;

    #[test]
    fn sizes_are_cpythons() {
        // CPython asserts sizeof(_Py_DebugOffsets) == 888 for 3.15; 760
        // for 3.14 (92 fields).
        assert_eq!(table_size(14), Some(760));
        assert_eq!(table_size(15), Some(888));
        assert_eq!(table_size(16), None);
    }

    #[test]
    fn fields_are_read_in_their_versions_order() {
        let t = table(14, 0x030e_0af0, &[("thread_state", "current_frame", 72)]);
        let d = DebugOffsets::parse(&t, 0x030e_0af0).unwrap();
        assert_eq!(d.offset("thread_state", "current_frame"), Ok(72));
        let t = table(15, 0x030f_02f0, &[("interpreter_frame", "owner", 74)]);
        let d = DebugOffsets::parse(&t, 0x030f_02f0).unwrap();
        assert_eq!(d.offset("interpreter_frame", "owner"), Ok(74));
        // In 3.15 the frame section starts 17 words later than in 3.14.
        assert_eq!(&t[312..320], &4096u64.to_le_bytes());
    }

    #[test]
    fn hostile_or_foreign_tables_are_refused() {
        let v = 0x030e_0af0;
        let refused = |t: &[u8], version: u32, why: &str| {
            let e = DebugOffsets::parse(t, version).unwrap_err();
            assert!(e.contains(why), "{e} (expected {why})");
        };
        let ok = table(14, v, &[]);
        assert!(DebugOffsets::parse(&ok, v).is_ok());
        let mut bad_cookie = ok.clone();
        bad_cookie[0] = b'y';
        refused(&bad_cookie, v, "cookie");
        // Another version's table.
        refused(&ok, 0x030e_0bf0, "version");
        // Short.
        assert!(DebugOffsets::parse(&ok[..500], v).is_err());
        // A zero or huge section size.
        for size in [0, 1 << 40] {
            refused(
                &table(14, v, &[("code_object", "size", size)]),
                v,
                "code_object",
            );
        }
        // A field outside its struct, or misaligned.
        refused(
            &table(14, v, &[("interpreter_frame", "previous", 5000)]),
            v,
            "previous",
        );
        refused(
            &table(14, v, &[("thread_state", "current_frame", 13)]),
            v,
            "current_frame",
        );
        // Unknown versions.
        refused(&ok, 0x0310_00a1, "3.16");
    }
}
