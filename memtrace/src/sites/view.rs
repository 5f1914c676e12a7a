//! Which frame names a Python site. tracemalloc's `lineno` names the
//! innermost line, which in a web app is mostly the standard library's or
//! a framework's (`json/encoder.py:258`); the application view names the
//! innermost frame of the application's own code instead, and shows the
//! innermost one beside it (`via`). `traceback` groups by the whole stack.
//!
//! What is "application" is decided per process from its interpreter's
//! prefix (the standard library under it), `site-packages` and
//! `dist-packages` anywhere, and `<frozen …>` modules; `--app-path`
//! prefixes are application whatever else they match, and `--hide`
//! regexes never are. Sites without Python frames are named as before in
//! every view: by their whole native stack.
use std::{collections::HashMap, fmt, str::FromStr};

use regex::Regex;
use serde::Serialize;

use super::{python::PYTHON_MODULE, symbolize::Frame};

/// How Python sites are grouped and named.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SiteView {
    /// Grouped by the innermost frame of the application's code.
    #[default]
    App,
    /// Grouped by the innermost Python line: tracemalloc's `lineno`.
    Lineno,
    /// Grouped by the whole stack: tracemalloc's `traceback`.
    Traceback,
}

impl SiteView {
    pub const NAMES: &'static [&'static str] = &["app", "lineno", "traceback"];
}

impl FromStr for SiteView {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "app" => Ok(Self::App),
            "lineno" => Ok(Self::Lineno),
            "traceback" => Ok(Self::Traceback),
            other => Err(format!(
                "unknown view `{other}`; valid: {}",
                Self::NAMES.join(", ")
            )),
        }
    }
}

impl fmt::Display for SiteView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::App => "app",
            Self::Lineno => "lineno",
            Self::Traceback => "traceback",
        })
    }
}

/// Longest `--hide` regex accepted, and the compiled size allowed: a
/// pattern comes from the API's query string too.
pub const MAX_HIDE_LEN: usize = 512;
const HIDE_SIZE_LIMIT: usize = 1 << 20;

/// Compiles a `--hide` pattern with bounded size.
pub fn hide_regex(pattern: &str) -> Result<Regex, String> {
    if pattern.len() > MAX_HIDE_LEN {
        return Err(format!(
            "hide pattern of {} bytes is longer than {MAX_HIDE_LEN}",
            pattern.len()
        ));
    }
    regex::RegexBuilder::new(pattern)
        .size_limit(HIDE_SIZE_LIMIT)
        .build()
        .map_err(|e| format!("hide pattern is not a valid regex: {e}"))
}

/// What counts as the application's code, per process.
#[derive(Clone, Debug, Default)]
pub struct AppCode {
    /// Files under these are application code, whatever else they match.
    pub app_paths: Vec<String>,
    /// Frames whose `file:line function` matches one of these are never
    /// application code (and are left out of flame graphs in the app view).
    pub hide: Vec<Regex>,
    /// Each process's standard library directories (`PREFIX/lib/python3.X/`).
    pub stdlib: HashMap<u32, Vec<String>>,
}

impl AppCode {
    fn is_python(f: &Frame) -> bool {
        f.module.as_deref() == Some(PYTHON_MODULE)
    }

    /// A frame as sites show it, which `--hide` patterns are matched to.
    fn shown(f: &Frame) -> String {
        match (&f.file, &f.function) {
            (Some(file), Some(function)) => {
                format!("{file}:{} {function}", f.line.unwrap_or(0))
            }
            _ => f.display(),
        }
    }

    pub fn is_hidden(&self, f: &Frame) -> bool {
        !self.hide.is_empty() && {
            let shown = Self::shown(f);
            self.hide.iter().any(|r| r.is_match(&shown))
        }
    }

    /// Where a library file's own path starts (after its stdlib directory
    /// or `site-packages/`), when it is a library's.
    fn library_start(&self, pid: u32, file: &str) -> Option<usize> {
        if file.starts_with("<frozen ") {
            return Some(0);
        }
        for marker in ["/site-packages/", "/dist-packages/"] {
            if let Some(at) = file.rfind(marker) {
                return Some(at + marker.len());
            }
        }
        match self.stdlib.get(&pid).filter(|d| !d.is_empty()) {
            Some(dirs) => dirs
                .iter()
                .find(|d| file.starts_with(d.as_str()))
                .map(|d| d.len()),
            // Prefix unknown: the layout every CPython install has.
            None => stdlib_pattern(file),
        }
    }

    /// Whether a frame is the application's own Python code.
    pub fn is_app(&self, pid: u32, f: &Frame) -> bool {
        let Some(file) = f.file.as_deref().filter(|_| Self::is_python(f)) else {
            return false;
        };
        if f.unresolved.is_some() || self.is_hidden(f) {
            return false;
        }
        self.app_paths.iter().any(|p| file.starts_with(p.as_str()))
            || self.library_start(pid, file).is_none()
    }

    /// A frame in a few words: `json/encoder.py:258 iterencode` for a
    /// library's (its path below the library root), the full path for the
    /// application's.
    pub fn short(&self, pid: u32, f: &Frame) -> String {
        match (&f.file, &f.function) {
            (Some(file), Some(function)) if Self::is_python(f) => {
                let start = self.library_start(pid, file).unwrap_or(0);
                format!("{}:{} {function}", &file[start..], f.line.unwrap_or(0))
            }
            _ => f.display(),
        }
    }
}

/// `…/lib/python3.X/` in a path: where the standard library's own path
/// starts.
fn stdlib_pattern(file: &str) -> Option<usize> {
    let at = file.find("/lib/python3.")?;
    let rest = &file[at + "/lib/python3.".len()..];
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    (digits > 0 && rest.as_bytes().get(digits) == Some(&b'/'))
        .then_some(at + "/lib/python3.".len() + digits + 1)
}

/// What a snapshot or diff asks of its sites: the API's `view`,
/// `still_growing`, `hide` and `app_path` (added to the agent's own).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SiteOptions {
    pub view: SiteView,
    pub still_growing: bool,
    pub hide: Option<String>,
    pub app_path: Option<String>,
}

impl SiteOptions {
    /// The view these options ask for, over the agent's `app` code (whose
    /// standard library directories the caller filled in).
    pub fn spec(&self, mut app: AppCode) -> Result<ViewSpec, String> {
        if let Some(h) = &self.hide {
            app.hide.push(hide_regex(h)?);
        }
        app.app_paths.extend(self.app_path.clone());
        Ok(ViewSpec {
            view: self.view,
            app,
            still_growing: self.still_growing,
        })
    }
}

/// A view with what it needs.
#[derive(Clone, Debug, Default)]
pub struct ViewSpec {
    pub view: SiteView,
    pub app: AppCode,
    /// Diffs: leave out sites that grew before and not since.
    pub still_growing: bool,
}

/// Which frames of a stack name its site.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Naming {
    /// The frame the site is named after (its function and location).
    pub name: usize,
    /// The innermost Python frame, when the site is named after another.
    pub via: Option<usize>,
    /// Whether the site's identity is the naming frame alone (else the
    /// whole stack).
    pub by_name: bool,
}

impl ViewSpec {
    pub fn naming(&self, pid: u32, frames: &[Frame]) -> Naming {
        let whole = Naming {
            name: 0,
            via: None,
            by_name: false,
        };
        let Some(innermost) = frames.iter().position(AppCode::is_python) else {
            return whole;
        };
        match self.view {
            SiteView::Traceback => Naming {
                name: innermost,
                ..whole
            },
            SiteView::Lineno => Naming {
                name: innermost,
                via: None,
                by_name: true,
            },
            SiteView::App => {
                let app = frames[innermost..]
                    .iter()
                    .position(|f| self.app.is_app(pid, f))
                    .map(|i| innermost + i);
                match app {
                    Some(i) => Naming {
                        name: i,
                        via: (i != innermost).then_some(innermost),
                        by_name: true,
                    },
                    // Only library frames: tracemalloc's line.
                    None => Naming {
                        name: innermost,
                        via: None,
                        by_name: true,
                    },
                }
            }
        }
    }

    /// The frames a flame graph shows in this view: in the app view the
    /// library frames inside the application's innermost frame and every
    /// hidden frame are left out; other views keep them all.
    pub fn flame_frames(&self, pid: u32, frames: &[Frame]) -> Vec<Frame> {
        if self.view != SiteView::App {
            return frames.to_vec();
        }
        let n = self.naming(pid, frames);
        let start = if n.via.is_some() { n.name } else { 0 };
        frames[start..]
            .iter()
            .filter(|f| !self.app.is_hidden(f))
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn py(file: &str, line: u32, function: &str) -> Frame {
        Frame {
            function: Some(function.into()),
            file: Some(file.into()),
            line: Some(line),
            module: Some(PYTHON_MODULE.into()),
            ..Frame::unresolved(0x10)
        }
    }

    fn django_stack() -> Vec<Frame> {
        vec![
            py(
                "/usr/lib/python3.11/json/encoder.py",
                258,
                "JSONEncoder.iterencode",
            ),
            py("/usr/lib/python3.11/json/__init__.py", 231, "dumps"),
            py("/srv/shop/views.py", 42, "quote"),
            py(
                "/usr/lib/python3/dist-packages/django/core/handlers/base.py",
                197,
                "_get_response",
            ),
            py("/srv/shop/wsgi.py", 5, "application"),
        ]
    }

    fn spec(view: SiteView) -> ViewSpec {
        let mut app = AppCode::default();
        app.stdlib.insert(1, vec!["/usr/lib/python3.11/".into()]);
        ViewSpec {
            view,
            app,
            still_growing: false,
        }
    }

    #[test]
    fn the_application_view_names_the_innermost_app_frame_via_the_library() {
        let s = spec(SiteView::App);
        let frames = django_stack();
        let n = s.naming(1, &frames);
        assert_eq!(n.name, 2);
        assert_eq!(n.via, Some(0));
        assert!(n.by_name);
        assert_eq!(
            s.app.short(1, &frames[0]),
            "json/encoder.py:258 JSONEncoder.iterencode"
        );
        assert_eq!(
            s.app.short(1, &frames[3]),
            "django/core/handlers/base.py:197 _get_response"
        );
        assert_eq!(s.app.short(1, &frames[2]), "/srv/shop/views.py:42 quote");
    }

    #[test]
    fn lineno_and_traceback_keep_tracemalloc_groupings() {
        let frames = django_stack();
        let n = spec(SiteView::Lineno).naming(1, &frames);
        assert_eq!((n.name, n.via, n.by_name), (0, None, true));
        let n = spec(SiteView::Traceback).naming(1, &frames);
        assert_eq!((n.name, n.via, n.by_name), (0, None, false));
    }

    #[test]
    fn app_paths_and_hide_override_the_prefixes() {
        let frames = django_stack();
        let mut s = spec(SiteView::App);
        s.app
            .hide
            .push(hide_regex(r"^/srv/shop/views\.py").unwrap());
        assert_eq!(s.naming(1, &frames).name, 4, "views.py hidden: wsgi.py");
        let mut s = spec(SiteView::App);
        s.app.app_paths.push("/usr/lib/python3.11/json/".into());
        let n = s.naming(1, &frames);
        assert_eq!((n.name, n.via), (0, None), "json is the app's here");
    }

    #[test]
    fn frozen_unresolved_and_library_only_stacks() {
        let s = spec(SiteView::App);
        let frames = vec![
            py(
                "<frozen importlib._bootstrap>",
                241,
                "_call_with_frames_removed",
            ),
            Frame {
                module: Some(PYTHON_MODULE.into()),
                unresolved: Some(super::super::symbolize::Unresolved::CodeFreed),
                ..Frame::unresolved(0x24d7_f600)
            },
            py(
                "/usr/lib/python3.11/importlib/__init__.py",
                126,
                "import_module",
            ),
        ];
        let n = s.naming(1, &frames);
        assert_eq!((n.name, n.via), (0, None), "no app frame: the innermost");
        // Native frames first (native frames shown): named by Python ones.
        let mut mixed = vec![Frame {
            function: Some("malloc".into()),
            module: Some("/lib/libc.so.6".into()),
            ..Frame::unresolved(0x20)
        }];
        mixed.extend(django_stack());
        let n = s.naming(1, &mixed);
        assert_eq!((n.name, n.via), (3, Some(1)));
        let flame: Vec<_> = s
            .flame_frames(1, &mixed)
            .into_iter()
            .map(|f| f.line)
            .collect();
        assert_eq!(flame, [Some(42), Some(197), Some(5)]);
    }

    #[test]
    fn unknown_prefixes_fall_back_to_the_stdlib_layout() {
        let app = AppCode::default();
        let f = py("/opt/py/lib/python3.13/json/encoder.py", 258, "iterencode");
        assert!(!app.is_app(7, &f));
        assert_eq!(app.short(7, &f), "json/encoder.py:258 iterencode");
        assert!(app.is_app(7, &py("/opt/app/lib/python3x/views.py", 1, "v")));
    }

    #[test]
    fn hide_patterns_are_bounded() {
        assert!(hide_regex("(").is_err());
        assert!(hide_regex(&"a".repeat(MAX_HIDE_LEN + 1)).is_err());
        assert!(
            "nope"
                .parse::<SiteView>()
                .unwrap_err()
                .contains("app, lineno, traceback")
        );
    }
}
