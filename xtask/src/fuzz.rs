//! `cargo xtask fuzz`: runs each fuzz target under `memtrace/fuzz` (cargo-fuzz
//! and libFuzzer, on the nightly toolchain the eBPF build uses already) for a
//! while, and reports executions and coverage per target.
//!
//! Each run starts from the committed seeds (`memtrace/fuzz/corpus/NAME`) and
//! what earlier runs found (`target/fuzz/corpus/NAME`, where new inputs go:
//! the repository is not written). An input that crashes, times out or runs
//! out of memory stops its target; it is left in `target/fuzz/artifacts/NAME/`
//! to be copied to `memtrace/fuzz/regressions/NAME/` once fixed, where every
//! `cargo test` replays it.
use std::{
    fmt::Write as _,
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

/// Seconds per target in `cargo xtask test` (CI): a short, fixed budget.
pub const CI_SECONDS: u64 = 15;
/// cargo-fuzz, installed from crates.io when missing.
const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// Seconds one input may take before libFuzzer calls it a hang.
const INPUT_TIMEOUT_SECS: u64 = 10;
/// Memory a target may use before libFuzzer calls it a leak of bounds.
const RSS_LIMIT_MB: u64 = 2048;

pub struct FuzzOptions {
    /// Seconds per target.
    pub seconds: u64,
    /// Only these targets (all when empty).
    pub targets: Vec<String>,
}

/// What one target's run did.
#[derive(Debug)]
pub struct Outcome {
    pub target: String,
    pub runs: u64,
    pub coverage: u64,
    pub features: u64,
    pub corpus: u64,
    /// The input that broke the target, when one did.
    pub failure: Option<String>,
}

fn fuzz_dir() -> PathBuf {
    crate::workspace_root().join("memtrace/fuzz")
}

fn out_dir() -> PathBuf {
    crate::workspace_root().join("target/fuzz")
}

/// `cargo +nightly fuzz ARGS` with the fuzz crate and its build dir.
fn cargo_fuzz(sub: &str) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(crate::workspace_root())
        .env("PATH", crate::setup::path_with_cargo_bin())
        .env_remove("CARGO")
        .env_remove("RUSTUP_TOOLCHAIN")
        .args(["+nightly", "fuzz", sub, "--fuzz-dir"])
        .arg(fuzz_dir());
    if sub != "list" {
        // Release code with debug assertions: overflow checks on, fast.
        cmd.args(["--release", "--debug-assertions", "--target-dir"])
            .arg(out_dir().join("build"));
    }
    cmd
}

fn ensure_cargo_fuzz() -> Result<()> {
    let installed = Command::new("cargo")
        .env("PATH", crate::setup::path_with_cargo_bin())
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if installed {
        return Ok(());
    }
    eprintln!("installing cargo-fuzz {CARGO_FUZZ_VERSION} from crates.io");
    crate::run(
        Command::new("cargo")
            .env("PATH", crate::setup::path_with_cargo_bin())
            .args([
                "install",
                "cargo-fuzz",
                "--locked",
                "--version",
                CARGO_FUZZ_VERSION,
            ]),
    )
    .context("cargo-fuzz could not be installed (it needs crates.io)")
}

/// The targets the fuzz crate defines.
fn all_targets() -> Result<Vec<String>> {
    let out = cargo_fuzz("list")
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run cargo fuzz list")?;
    if !out.status.success() {
        bail!("cargo fuzz list failed ({})", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect())
}

/// Runs the targets and writes target/fuzz/report.md; fails when one broke.
pub fn fuzz(opts: &FuzzOptions) -> Result<Vec<Outcome>> {
    ensure_cargo_fuzz()?;
    let known = all_targets()?;
    let targets = if opts.targets.is_empty() {
        known
    } else {
        for t in &opts.targets {
            if !known.contains(t) {
                bail!("no fuzz target {t}: the targets are {}", known.join(", "));
            }
        }
        opts.targets.clone()
    };
    crate::run(&mut cargo_fuzz("build")).context("building the fuzz targets")?;
    let mut outcomes = Vec::new();
    for target in &targets {
        let outcome = run_target(target, opts.seconds)?;
        eprintln!(
            "fuzz {target}: {} runs, cov {}, ft {}, corpus {}{}",
            outcome.runs,
            outcome.coverage,
            outcome.features,
            outcome.corpus,
            outcome
                .failure
                .as_deref()
                .map(|f| format!(", FAILED: {f}"))
                .unwrap_or_default()
        );
        outcomes.push(outcome);
    }
    let report = report(&outcomes, opts.seconds);
    std::fs::write(out_dir().join("report.md"), &report)?;
    println!("{report}");
    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| o.failure.is_some()).collect();
    if !failed.is_empty() {
        bail!(
            "{} fuzz target(s) broke: {}. Fix the parser, then copy the input to memtrace/fuzz/regressions/TARGET/ (cargo test replays it)",
            failed.len(),
            failed
                .iter()
                .map(|o| format!("{} ({})", o.target, o.failure.as_deref().unwrap_or("")))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(outcomes)
}

fn run_target(target: &str, seconds: u64) -> Result<Outcome> {
    let corpus = out_dir().join("corpus").join(target);
    let artifacts = out_dir().join("artifacts").join(target);
    std::fs::create_dir_all(&corpus)?;
    std::fs::create_dir_all(&artifacts)?;
    let out = cargo_fuzz("run")
        .arg(target)
        .arg(&corpus)
        .arg(fuzz_dir().join("corpus").join(target))
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-timeout={INPUT_TIMEOUT_SECS}"))
        .arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"))
        .arg("-print_final_stats=1")
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .stdout(Stdio::null())
        .output()
        .with_context(|| format!("cannot run cargo fuzz run {target}"))?;
    let log = String::from_utf8_lossy(&out.stderr);
    let mut outcome = parse_log(target, &log);
    outcome.corpus = std::fs::read_dir(&corpus).map_or(0, |d| d.count() as u64);
    if !out.status.success() {
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        eprintln!("--- {target}: the end of libFuzzer's output ---");
        for line in tail.iter().rev() {
            eprintln!("{line}");
        }
        outcome.failure = Some(artifact_of(&log).unwrap_or_else(|| format!("exit {}", out.status)));
    }
    Ok(outcome)
}

/// Executions and coverage from libFuzzer's log: its final statistics and
/// its last status line (`#N ... cov: C ft: F ...`).
fn parse_log(target: &str, log: &str) -> Outcome {
    let stat = |name: &str| {
        log.lines()
            .find_map(|l| l.strip_prefix(&format!("stat::{name}:")))
            .and_then(|v| v.trim().parse().ok())
    };
    let field = |line: &str, name: &str| {
        let mut words = line.split_whitespace();
        words.find(|w| *w == name)?;
        words.next()?.parse().ok()
    };
    let last = log
        .lines()
        .rev()
        .find(|l| l.starts_with('#') && l.contains(" cov: "))
        .unwrap_or("");
    Outcome {
        target: target.to_string(),
        runs: stat("number_of_executed_units").unwrap_or(0),
        coverage: field(last, "cov:").unwrap_or(0),
        features: field(last, "ft:").unwrap_or(0),
        corpus: 0,
        failure: None,
    }
}

/// The input libFuzzer saved for a failure.
fn artifact_of(log: &str) -> Option<String> {
    log.lines()
        .find_map(|l| l.split("Test unit written to ").nth(1))
        .map(|p| p.trim().to_string())
}

fn report(outcomes: &[Outcome], seconds: u64) -> String {
    let mut out = String::from(
        "| target | seconds | executions | coverage (edges) | features | corpus | result |\n|---|---:|---:|---:|---:|---:|---|\n",
    );
    for o in outcomes {
        let _ = writeln!(
            out,
            "| {} | {seconds} | {} | {} | {} | {} | {} |",
            o.target,
            o.runs,
            o.coverage,
            o.features,
            o.corpus,
            o.failure
                .as_deref()
                .map_or("ok".to_string(), |f| format!("**failed**: {f}"))
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libfuzzer_logs_give_runs_coverage_and_the_failing_input() {
        let log = "INFO: Seed: 1\n#2\tINITED cov: 10 ft: 12 corp: 3/40b exec/s: 0 rss: 30Mb\n#4096\tpulse  cov: 55 ft: 90 corp: 9/1Kb exec/s: 2048 rss: 40Mb\n#9000\tDONE   cov: 61 ft: 101 corp: 11/2Kb exec/s: 3000 rss: 41Mb\nDone 9000 runs in 3 second(s)\nstat::number_of_executed_units: 9000\nstat::average_exec_per_sec:     3000\n";
        let o = parse_log("t", log);
        assert_eq!((o.runs, o.coverage, o.features), (9000, 61, 101));
        let crash = "==1==ERROR: ...\nartifact_prefix='a/'; Test unit written to a/crash-0123\nBase64: AA==\n";
        assert_eq!(artifact_of(crash).as_deref(), Some("a/crash-0123"));
        assert_eq!(artifact_of(log), None);
    }
}
