//! Python frames of allocation sites: the kernel's (code object, code unit)
//! pairs read into file:line and qualified name from the live process, and
//! joined with the native stack the way tracemalloc shows it (Python
//! frames only, innermost first) or, asked for, under the native frames
//! that allocated.
use std::sync::Mutex;

use memtrace_common::PyFrame;

use super::symbolize::Frame;
use crate::model::pycode::{CodeCache, CodeLayout, ProcMemory};

/// The module shown for Python frames.
pub const PYTHON_MODULE: &str = "[python]";

/// Native functions that run Python frames: where the Python frames go
/// when native frames are shown.
const EVAL_FUNCTIONS: &[&str] = &["_PyEval_EvalFrameDefault", "_PyEval_EvalFrame"];

/// Code objects read so far, shared by snapshots and diffs.
#[derive(Debug, Default)]
pub struct PythonSymbolizer {
    cache: Mutex<CodeCache>,
}

impl PythonSymbolizer {
    /// One process's sampled Python frames, innermost first. A frame whose
    /// code object is gone (freed since the sample) or unreadable keeps its
    /// address only.
    pub fn frames(&self, pid: u32, layout: &CodeLayout, stack: &[PyFrame]) -> Vec<Frame> {
        let unresolved =
            |f: &PyFrame| Frame::unresolved_in(f.code, Some(PYTHON_MODULE.to_string()));
        let Ok(mem) = ProcMemory::open(pid) else {
            return stack.iter().map(unresolved).collect();
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
                    },
                    Err(_) => unresolved(f),
                }
            })
            .collect()
    }

    /// Drops a process's code objects (it exited, or collection stopped).
    pub fn forget(&self, pid: u32) {
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .forget(pid);
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
    fn python_frames_print_like_tracemalloc_lines() {
        assert_eq!(
            py("View.get", 42).to_string(),
            "View.get (app.py:42) [python]"
        );
    }
}
