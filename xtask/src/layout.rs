//! The agent's layout, checked: which module imports which, from the `use`
//! lines (and inline `crate::` paths) of `memtrace/src`, test modules left
//! out. Two rules, as README.md's "Layout" gives them: a folder imports only
//! the folders it may, and no module imports one that imports it back.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::Path,
};

use anyhow::{Context as _, Result, bail};

/// Each top-level folder of `memtrace/src` and the folders it may import.
pub const ALLOWED: &[(&str, &[&str])] = &[
    // Limits on foreign data, and the maps parser: import nothing, imported
    // by any folder.
    ("bounds", &[]),
    ("procmaps", &[]),
    ("kernel", &["bounds", "procmaps"]),
    ("judge", &[]),
    ("model", &["judge", "bounds", "procmaps"]),
    ("sites", &["model", "bounds", "procmaps"]),
    (
        "api",
        &["kernel", "model", "judge", "sites", "bounds", "procmaps"],
    ),
    (
        "agent",
        &[
            "kernel", "model", "judge", "sites", "api", "bounds", "procmaps",
        ],
    ),
    (
        "cli",
        &[
            "kernel", "model", "judge", "sites", "api", "agent", "bounds", "procmaps",
        ],
    ),
    // The fuzz targets' entry points: the parsers wherever they are.
    (
        "fuzz",
        &[
            "kernel", "model", "judge", "api", "cli", "bounds", "procmaps",
        ],
    ),
];

/// Module path (`api::auth`) → the modules it imports.
pub type Graph = BTreeMap<String, BTreeSet<String>>;

/// Reads the import graph of the crate whose sources are under `src`.
pub fn graph(src: &Path) -> Result<Graph> {
    let mut files = Vec::new();
    collect(src, src, &mut files)?;
    let modules: BTreeSet<String> = files.iter().map(|(m, _)| m.clone()).collect();
    let mut graph = Graph::new();
    for (module, text) in &files {
        let parent: Vec<&str> = module.split("::").collect();
        let parent = &parent[..parent.len().saturating_sub(1)];
        let mut deps = BTreeSet::new();
        for path in imported_paths(&code_only(text)) {
            let full: Vec<&str> = match path.first().map(String::as_str) {
                Some("crate") => path[1..].iter().map(String::as_str).collect(),
                Some("super") => parent
                    .iter()
                    .copied()
                    .chain(path[1..].iter().map(String::as_str))
                    .collect(),
                _ => continue,
            };
            if let Some(target) = longest_module(&full, &modules)
                && &target != module
            {
                deps.insert(target);
            }
        }
        graph.insert(module.clone(), deps);
    }
    Ok(graph)
}

/// Every rule broken, as sentences; empty when the layout holds.
pub fn violations(graph: &Graph) -> Vec<String> {
    let mut out = Vec::new();
    for (from, deps) in graph {
        let from_top = top(from);
        let allowed = ALLOWED
            .iter()
            .find(|(folder, _)| *folder == from_top)
            .map(|(_, a)| *a);
        for to in deps {
            let to_top = top(to);
            if to_top == from_top {
                continue;
            }
            match allowed {
                Some(a) if a.contains(&to_top) => {}
                Some(_) => out.push(format!(
                    "{from} imports {to}: `{from_top}/` may not import `{to_top}/`"
                )),
                None => out.push(format!(
                    "{from} is in no known folder: add `{from_top}` to xtask/src/layout.rs and README.md"
                )),
            }
            if graph.get(to).is_some_and(|back| back.contains(from)) && from < to {
                out.push(format!("{from} and {to} import each other"));
            }
        }
    }
    if let Some(cycle) = find_cycle(graph) {
        out.push(format!("import cycle: {}", cycle.join(" → ")));
    }
    out.sort();
    out.dedup();
    out
}

/// Fails with every violation listed.
pub fn check(src: &Path) -> Result<()> {
    let graph = graph(src)?;
    let broken = violations(&graph);
    if !broken.is_empty() {
        bail!("the layout rules are broken:\n  {}", broken.join("\n  "));
    }
    Ok(())
}

fn top(module: &str) -> &str {
    module.split("::").next().unwrap_or(module)
}

/// (module path, source) of every file under `dir`, but the crate roots and
/// files that are test modules.
fn collect(root: &Path, dir: &Path, out: &mut Vec<(String, String)>) -> Result<()> {
    let entries = fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?;
    for entry in entries {
        let path = entry?.path();
        if path.is_dir() {
            collect(root, &path, out)?;
            continue;
        }
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let rel = path.strip_prefix(root).expect("under root");
        let mut parts: Vec<String> = rel
            .iter()
            .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
            .collect();
        match parts.last().map(String::as_str) {
            Some("lib" | "main") if parts.len() == 1 => continue,
            Some("tests") => continue,
            Some("mod") => {
                parts.pop();
            }
            _ => {}
        }
        let text =
            fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        out.push((parts.join("::"), text));
    }
    Ok(())
}

/// The source without comment lines and without its `#[cfg(test)]` module.
fn code_only(text: &str) -> String {
    let mut out = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let t = line.trim_start();
        if t == "#[cfg(test)]"
            && lines
                .peek()
                .is_some_and(|next| next.trim_start().starts_with("mod tests"))
        {
            break;
        }
        if !t.starts_with("//") {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// Paths starting with `crate` or `super`, as segments: every leaf of every
/// `use` tree, and every inline `crate::a::b` path.
fn imported_paths(code: &str) -> Vec<Vec<String>> {
    let mut paths = Vec::new();
    let mut rest = code;
    while let Some(i) = find_word(rest, "use ") {
        let after = &rest[i + 4..];
        let end = after.find(';').unwrap_or(after.len());
        expand(&[], &without_aliases(&after[..end]), &mut paths);
        rest = &after[end..];
    }
    let mut rest = code;
    while let Some(i) = find_word(rest, "crate::") {
        let path: String = rest[i..]
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
            .collect();
        paths.push(
            path.split("::")
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect(),
        );
        rest = &rest[i + 7..];
    }
    // A `use crate::a` is found by both passes.
    paths.sort();
    paths.dedup();
    paths
}

/// A `use` tree without whitespace and without `as` renames.
fn without_aliases(tree: &str) -> String {
    let mut out = String::new();
    let mut words = tree.split_whitespace();
    while let Some(word) = words.next() {
        if word == "as" {
            // Keep what follows the alias: `f,` or `_}`.
            if let Some(alias) = words.next() {
                out.extend(
                    alias
                        .chars()
                        .skip_while(|c| c.is_alphanumeric() || *c == '_'),
                );
            }
        } else {
            out.push_str(word);
        }
    }
    out
}

/// `needle` where it starts a word (not `reuse ` or `my_crate::`).
fn find_word(hay: &str, needle: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = hay[from..].find(needle) {
        let at = from + i;
        let before = hay[..at].chars().next_back();
        if before.is_none_or(|c| !(c.is_alphanumeric() || c == '_')) {
            return Some(at);
        }
        from = at + needle.len();
    }
    None
}

/// Expands a `use` tree without whitespace (`crate::{a::{b,c},d}`).
fn expand(prefix: &[String], tree: &str, out: &mut Vec<Vec<String>>) {
    let tree = tree.trim_start_matches("::");
    if let Some(inner) = tree.strip_prefix('{').and_then(|t| t.strip_suffix('}')) {
        for part in split_top(inner) {
            expand(prefix, part, out);
        }
        return;
    }
    match tree.find("::{") {
        Some(i) if !tree[..i].contains('{') => {
            let mut p = prefix.to_vec();
            p.extend(tree[..i].split("::").map(String::from));
            expand(&p, &tree[i + 2..], out);
        }
        _ => {
            let mut p = prefix.to_vec();
            p.extend(
                tree.split("::")
                    .filter(|s| !s.is_empty() && *s != "self" && *s != "*")
                    .map(String::from),
            );
            if !p.is_empty() {
                out.push(p);
            }
        }
    }
}

/// Splits at commas outside braces.
fn split_top(s: &str) -> Vec<&str> {
    let (mut parts, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts.into_iter().filter(|p| !p.is_empty()).collect()
}

/// The longest prefix of `path` that names a module.
fn longest_module(path: &[&str], modules: &BTreeSet<String>) -> Option<String> {
    (1..=path.len())
        .rev()
        .map(|n| path[..n].join("::"))
        .find(|m| modules.contains(m))
}

/// A cycle of imports, if there is one (depth-first search).
fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    fn visit<'a>(
        node: &'a str,
        graph: &'a Graph,
        done: &mut BTreeSet<&'a str>,
        stack: &mut Vec<&'a str>,
    ) -> Option<Vec<String>> {
        if let Some(i) = stack.iter().position(|n| *n == node) {
            let mut cycle: Vec<String> = stack[i..].iter().map(|s| s.to_string()).collect();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if !done.insert(node) {
            return None;
        }
        stack.push(node);
        for next in graph.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, graph, done, stack) {
                return Some(c);
            }
        }
        stack.pop();
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|n| visit(n, graph, &mut done, &mut Vec::new()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edges(pairs: &[(&str, &str)]) -> Graph {
        let mut g = Graph::new();
        for (a, b) in pairs {
            g.entry(a.to_string()).or_default().insert(b.to_string());
            g.entry(b.to_string()).or_default();
        }
        g
    }

    #[test]
    fn the_agent_keeps_its_layout() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../memtrace/src");
        let graph = graph(&src).expect("memtrace/src is readable");
        // The reader found the modules and their imports, not an empty tree.
        assert!(graph.len() >= 30, "{graph:?}");
        assert!(graph["agent::backend"].contains("api"), "{graph:?}");
        assert!(graph["model::workers"].contains("judge::detector"));
        assert!(graph["api::debug"].contains("api::auth"));
        let broken = violations(&graph);
        assert!(broken.is_empty(), "{broken:#?}");
    }

    #[test]
    fn use_trees_expand_to_every_leaf() {
        let code = "use crate::{\n    a::{b::C, d},\n    e as f,\n};\nuse super::{g::H, *};\nfn x() { crate::k::l(); my_crate::m(); }\n";
        let paths = imported_paths(code);
        let flat: Vec<String> = paths.iter().map(|p| p.join("::")).collect();
        for want in [
            "crate::a::b::C",
            "crate::a::d",
            "crate::e",
            "super::g::H",
            "crate::k::l",
        ] {
            assert!(flat.contains(&want.to_string()), "{want} not in {flat:?}");
        }
        assert!(!flat.iter().any(|p| p.contains("my_crate")), "{flat:?}");
    }

    #[test]
    fn comments_and_test_modules_are_not_imports() {
        let code = "//! see `crate::agent`\nuse crate::a;\n#[cfg(test)]\nmod tests {\n    use crate::b;\n}\n";
        let flat: Vec<String> = imported_paths(&code_only(code))
            .iter()
            .map(|p| p.join("::"))
            .collect();
        assert_eq!(flat, ["crate::a"]);
    }

    #[test]
    fn a_cycle_and_a_forbidden_folder_are_named() {
        let g = edges(&[
            ("api::status", "agent::views"),
            ("agent::views", "api::status"),
        ]);
        let broken = violations(&g);
        assert!(
            broken
                .iter()
                .any(|b| b.contains("`api/` may not import `agent/`")),
            "{broken:?}"
        );
        assert!(
            broken.iter().any(|b| b.contains("import each other")),
            "{broken:?}"
        );
        assert!(
            broken.iter().any(|b| b.starts_with("import cycle")),
            "{broken:?}"
        );
        let ok = edges(&[
            ("agent::views", "api::status"),
            ("api::status", "model::rss"),
        ]);
        assert!(violations(&ok).is_empty(), "{:?}", violations(&ok));
    }

    #[test]
    fn a_longer_cycle_is_found() {
        let g = edges(&[
            ("cli::a", "cli::b"),
            ("cli::b", "cli::c"),
            ("cli::c", "cli::a"),
        ]);
        let broken = violations(&g);
        assert!(
            broken.iter().any(|b| b.starts_with("import cycle")),
            "{broken:?}"
        );
    }
}
