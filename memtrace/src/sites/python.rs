//! Python frames of allocation sites: the kernel's (code object, code unit)
//! pairs read into file:line and qualified name from the live process, and
//! joined with the native stack the way tracemalloc shows it (Python
//! frames only, innermost first) or, asked for, under the native frames
//! that allocated.
use std::sync::Mutex;

use memtrace_common::PyFrame;

use super::symbolize::{Frame, Unresolved};
use crate::model::pycode::{CodeCache, CodeLayout, ProcMemory, PyCodeError};

/// The module shown for Python frames.
pub const PYTHON_MODULE: &str = "[python]";

/// Native functions that run Python frames: where the Python frames go
/// when native frames are shown.
const EVAL_FUNCTIONS: &[&str] = &["_PyEval_EvalFrameDefault", "_PyEval_EvalFrame"];

/// Code objects of `code` type whose fields do not validate, per process,
/// before the process is named in a warning. A freed code object's memory
/// holds another object (not a code object, or another first line); a
/// live one with a name of 2^40 characters is a process that lies.
const BAD_FIELDS_WARN: u32 = 16;
/// Processes whose bad code objects are counted at once.
const BAD_FIELDS_PROCESSES: usize = 4096;

/// Code objects read so far, shared by snapshots and diffs.
#[derive(Debug, Default)]
pub struct PythonSymbolizer {
    cache: Mutex<CodeCache>,
    /// Code objects with fields that do not validate, per process (at most
    /// `u32::MAX` once warned).
    bad_fields: Mutex<std::collections::HashMap<u32, u32>>,
}

impl PythonSymbolizer {
    /// One process's sampled Python frames, innermost first. A frame whose
    /// code object is gone (freed since the sample) or unreadable keeps its
    /// address only.
    pub fn frames(&self, pid: u32, layout: &CodeLayout, stack: &[PyFrame]) -> Vec<Frame> {
        let unresolved = |f: &PyFrame, why: Unresolved| Frame {
            unresolved: Some(why),
            ..Frame::unresolved_in(f.code, Some(PYTHON_MODULE.to_string()))
        };
        let Ok(mem) = ProcMemory::open(pid) else {
            let why = if std::path::Path::new(&format!("/proc/{pid}")).exists() {
                Unresolved::Unreadable
            } else {
                Unresolved::ProcessGone
            };
            return stack.iter().map(|f| unresolved(f, why)).collect();
        };
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        stack
            .iter()
            .map(|f| {
                match cache.get(pid, &mem, layout, f.code, f.firstlineno) {
                    Ok(code) => Frame {
                        addr: f.code,
                        function: Some(code.qualname.clone()),
                        offset: None,
                        file: Some(code.filename.clone()),
                        // tracemalloc says 0 for "no line".
                        line: Some(code.line(f.index).unwrap_or(0)),
                        module: Some(PYTHON_MODULE.to_string()),
                        unresolved: None,
                    },
                    Err(e) => {
                        tracing::debug!(pid, code = f.code, error = %e, "Python frame unresolved");
                        if matches!(e, PyCodeError::BadField { .. }) {
                            self.bad_field(pid, &e);
                        }
                        unresolved(f, why_unresolved(&e))
                    }
                }
            })
            .collect()
    }

    /// Counts a code object of `pid` whose fields do not validate; names
    /// the process in one warning when there are many.
    fn bad_field(&self, pid: u32, e: &PyCodeError) {
        let mut bad = self.bad_fields.lock().unwrap_or_else(|e| e.into_inner());
        if !bad.contains_key(&pid) && bad.len() >= BAD_FIELDS_PROCESSES {
            return;
        }
        let n = bad.entry(pid).or_insert(0);
        if *n == u32::MAX {
            return;
        }
        *n += 1;
        if *n >= BAD_FIELDS_WARN {
            *n = u32::MAX;
            tracing::warn!(
                pid,
                bad = BAD_FIELDS_WARN,
                example = %e,
                "this process's Python code objects do not validate (it lies, or is not CPython): their frames show as addresses"
            );
        }
    }

    /// Drops a process's code objects (it exited, or collection stopped).
    pub fn forget(&self, pid: u32) {
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .forget(pid);
        self.bad_fields
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&pid);
    }
}

/// Why a sampled code object could not be read. The kernel saw a live
/// code object at that address, so memory that is unmapped there now, or
/// holds something else (another type, another first line, a string that
/// is not one), was freed since; only a process that is gone, or memory
/// this agent may not read, is another reason.
fn why_unresolved(e: &PyCodeError) -> Unresolved {
    let PyCodeError::Read { source, .. } = e else {
        return Unresolved::CodeFreed;
    };
    match source.raw_os_error() {
        // The mm is gone: reads return nothing.
        Some(libc::ESRCH) => Unresolved::ProcessGone,
        _ if source.kind() == std::io::ErrorKind::UnexpectedEof => Unresolved::ProcessGone,
        Some(libc::EACCES) | Some(libc::EPERM) => Unresolved::Unreadable,
        _ => Unresolved::CodeFreed,
    }
}

/// A sample's stack: its Python frames alone (the default), or the native
/// frames down to the interpreter's eval loop followed by the Python ones.
/// Without Python frames, the native stack as it is.
pub fn join(native: Vec<Frame>, python: Vec<Frame>, keep_native: bool) -> Vec<Frame> {
    if python.is_empty() {
        return native;
    }
    if !keep_native {
        return python;
    }
    let mut out: Vec<Frame> = native
        .into_iter()
        .take_while(|f| {
            !f.function
                .as_deref()
                .is_some_and(|name| EVAL_FUNCTIONS.contains(&name))
        })
        .collect();
    out.extend(python);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn native(name: &str) -> Frame {
        Frame {
            function: Some(name.to_string()),
            ..Frame::unresolved(1)
        }
    }

    fn py(name: &str, line: u32) -> Frame {
        Frame {
            function: Some(name.to_string()),
            file: Some("/srv/app.py".to_string()),
            line: Some(line),
            module: Some(PYTHON_MODULE.to_string()),
            ..Frame::unresolved(2)
        }
    }

    #[test]
    fn python_frames_replace_native_ones_unless_asked() {
        let natives = vec![
            native("malloc"),
            native("PyUnicode_New"),
            native("_PyEval_EvalFrameDefault"),
            native("main"),
        ];
        let pys = vec![py("leak", 42), py("handler", 10)];
        assert_eq!(join(natives.clone(), pys.clone(), false), pys);
        let joined = join(natives.clone(), pys.clone(), true);
        let names: Vec<_> = joined.iter().map(|f| f.function.clone().unwrap()).collect();
        assert_eq!(names, ["malloc", "PyUnicode_New", "leak", "handler"]);
        assert_eq!(join(natives.clone(), Vec::new(), false), natives);
    }

    #[test]
    fn failed_reads_say_why() {
        let read = |errno| PyCodeError::Read {
            what: "the code object's type",
            addr: 0x10,
            source: std::io::Error::from_raw_os_error(errno),
        };
        assert_eq!(why_unresolved(&read(libc::EIO)), Unresolved::CodeFreed);
        assert_eq!(why_unresolved(&read(libc::EINVAL)), Unresolved::CodeFreed);
        assert_eq!(why_unresolved(&read(libc::EPERM)), Unresolved::Unreadable);
        assert_eq!(why_unresolved(&read(libc::ESRCH)), Unresolved::ProcessGone);
        let stale = PyCodeError::Stale {
            addr: 0x10,
            seen: 1,
            now: 42,
        };
        assert_eq!(why_unresolved(&stale), Unresolved::CodeFreed);
    }

    #[test]
    fn a_process_whose_code_objects_do_not_validate_is_counted_once() {
        let s = PythonSymbolizer::default();
        let e = PyCodeError::BadField {
            code: 0x10,
            what: "co_qualname",
            addr: 0x20,
            reason: "a str of 1099511627776 characters".into(),
        };
        for _ in 0..BAD_FIELDS_WARN - 1 {
            s.bad_field(7, &e);
        }
        assert_eq!(s.bad_fields.lock().unwrap()[&7], BAD_FIELDS_WARN - 1);
        s.bad_field(7, &e);
        assert_eq!(s.bad_fields.lock().unwrap()[&7], u32::MAX, "warned");
        s.bad_field(7, &e);
        assert_eq!(s.bad_fields.lock().unwrap()[&7], u32::MAX, "once");
        s.forget(7);
        assert!(s.bad_fields.lock().unwrap().is_empty());
    }

    #[test]
    fn python_frames_print_like_tracemalloc_lines() {
        assert_eq!(
            py("View.get", 42).to_string(),
            "View.get (app.py:42) [python]"
        );
    }
}
