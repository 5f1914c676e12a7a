//! Allocation sites as folded stacks (`root;...;leaf bytes`, the input of
//! flamegraph.pl and inferno) and as flame graph SVGs drawn by inferno. A
//! diff is folded as `stack before after`, inferno's differential form:
//! red where a stack grew, blue where it shrank.
use std::collections::BTreeMap;

use super::{pprof::frame_name, snapshot::RawSite, symbolize::Frame};

#[derive(Debug, thiserror::Error)]
#[error("drawing the flame graph failed: {0}")]
pub struct FlameError(#[from] std::io::Error);

/// A stack as one folded line's left side: outermost first, `;`-separated
/// (a `;` inside a name would split the frame, so it becomes `:`).
fn folded_stack(frames: &[Frame]) -> String {
    frames
        .iter()
        .rev()
        .map(|f| frame_name(f).replace(';', ":"))
        .collect::<Vec<_>>()
        .join(";")
}

/// Folded lines of one snapshot: bytes per stack, summed over workers,
/// sorted by stack (the order flame graph tools expect).
pub fn folded(sites: &[&RawSite]) -> String {
    let mut by_stack: BTreeMap<String, u64> = BTreeMap::new();
    for s in sites {
        *by_stack.entry(folded_stack(&s.frames)).or_default() += s.bytes;
    }
    by_stack
        .into_iter()
        .filter(|(_, v)| *v > 0)
        .map(|(stack, v)| format!("{stack} {v}\n"))
        .collect()
}

/// Differential folded lines: `stack before after` in bytes.
pub fn folded_diff(before: &[&RawSite], after: &[&RawSite]) -> String {
    let mut by_stack: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for s in before {
        by_stack.entry(folded_stack(&s.frames)).or_default().0 += s.bytes;
    }
    for s in after {
        by_stack.entry(folded_stack(&s.frames)).or_default().1 += s.bytes;
    }
    by_stack
        .into_iter()
        .filter(|(_, (b, a))| *b > 0 || *a > 0)
        .map(|(stack, (b, a))| format!("{stack} {b} {a}\n"))
        .collect()
}

/// An SVG flame graph of folded lines (one or two counts each).
pub fn svg(folded: &str, title: &str) -> Result<Vec<u8>, FlameError> {
    let mut options = inferno::flamegraph::Options::default();
    title.clone_into(&mut options.title);
    "bytes".clone_into(&mut options.count_name);
    options.deterministic = true;
    let mut out = Vec::new();
    if folded.trim().is_empty() {
        // inferno refuses empty input; an empty profile is still an answer,
        // drawn as one placeholder frame of 1 byte.
        options.subtitle = Some("no samples yet".into());
        inferno::flamegraph::from_lines(&mut options, ["[no samples yet] 1"], &mut out)?;
        return Ok(out);
    }
    inferno::flamegraph::from_lines(&mut options, folded.lines(), &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sites::snapshot::SiteKind;

    fn site(bytes: u64, names: &[&str]) -> RawSite {
        RawSite {
            pid: 1,
            kind: SiteKind::Malloc,
            bytes,
            frames: names
                .iter()
                .map(|n| Frame {
                    addr: 0x10,
                    function: Some((*n).into()),
                    offset: None,
                    file: None,
                    line: None,
                    module: None,
                    unresolved: None,
                })
                .collect(),
            ..RawSite::default()
        }
    }

    #[test]
    fn folds_outermost_first_and_sums_workers() {
        let a = site(100, &["leak_memory", "handle_request", "main"]);
        let mut b = site(50, &["leak_memory", "handle_request", "main"]);
        b.pid = 2;
        let c = site(7, &["scratch;x", "main"]);
        let text = folded(&[&a, &b, &c]);
        assert_eq!(
            text,
            "main;handle_request;leak_memory 150\nmain;scratch:x 7\n"
        );
    }

    #[test]
    fn diff_folds_before_and_after() {
        let before = site(100, &["leak", "main"]);
        let after = site(300, &["leak", "main"]);
        let new = site(5, &["new", "main"]);
        assert_eq!(
            folded_diff(&[&before], &[&after, &new]),
            "main;leak 100 300\nmain;new 0 5\n"
        );
    }

    #[test]
    fn svg_names_the_frames() {
        let a = site(100, &["leak_memory", "main"]);
        let drawn = String::from_utf8(svg(&folded(&[&a]), "heap").unwrap()).unwrap();
        assert!(drawn.starts_with("<?xml"), "{}", &drawn[..100]);
        assert!(drawn.contains("leak_memory"));
        let empty = String::from_utf8(svg("", "heap").unwrap()).unwrap();
        assert!(empty.contains("</svg>"));
        let diff = folded_diff(&[&site(10, &["a"])], &[&site(30, &["a"])]);
        assert!(
            String::from_utf8(svg(&diff, "growth").unwrap())
                .unwrap()
                .contains("</svg>")
        );
    }
}
