//! Replays the fuzz targets' committed inputs on every `cargo test` (stable,
//! no libFuzzer): the seed corpus (`memtrace/fuzz/corpus/NAME/`) and the
//! inputs that once crashed a target (`memtrace/fuzz/regressions/NAME/`,
//! each fixed since). A target that panics on one fails here with its file.
use std::path::{Path, PathBuf};

use memtrace::fuzz::TARGETS;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    out.sort();
    out
}

fn replay(kind: &str) -> usize {
    let mut replayed = 0;
    for (name, target) in TARGETS {
        for file in files(&fuzz_dir().join(kind).join(name)) {
            let data = std::fs::read(&file).unwrap();
            let outcome = std::panic::catch_unwind(|| target(&data));
            assert!(outcome.is_ok(), "{name} panics on {}", file.display());
            replayed += 1;
        }
    }
    replayed
}

#[test]
fn every_target_has_a_seed_corpus_and_takes_it() {
    for (name, _) in TARGETS {
        let seeds = files(&fuzz_dir().join("corpus").join(name));
        assert!(
            !seeds.is_empty(),
            "memtrace/fuzz/corpus/{name} holds no seed"
        );
    }
    assert!(replay("corpus") >= TARGETS.len());
}

#[test]
fn inputs_that_once_crashed_a_target_no_longer_do() {
    // Each directory is a target's: a misnamed one would never be replayed.
    let dirs = std::fs::read_dir(fuzz_dir().join("regressions"))
        .map(|d| {
            d.map(|e| e.unwrap().path())
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_else(|_| Vec::new());
    for dir in dirs {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            TARGETS.iter().any(|(t, _)| *t == name),
            "memtrace/fuzz/regressions/{name} is no target's"
        );
    }
    eprintln!("{} regression inputs replayed", replay("regressions"));
}

#[test]
fn the_fuzz_crate_builds_every_target() {
    let manifest = std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).unwrap();
    for (name, _) in TARGETS {
        assert!(
            manifest.contains(&format!("name = \"{name}\"")),
            "memtrace/fuzz/Cargo.toml has no [[bin]] {name}"
        );
        let source = std::fs::read_to_string(fuzz_dir().join(format!("fuzz_targets/{name}.rs")))
            .unwrap_or_else(|e| panic!("fuzz_targets/{name}.rs: {e}"));
        assert!(
            source.contains(&format!("memtrace::fuzz::{name}(")),
            "{name}.rs calls another entry point"
        );
    }
}
