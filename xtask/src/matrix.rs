//! `cargo xtask matrix`: the end-to-end tests on the kernels memtrace's users
//! run, booted one after another in QEMU.
//!
//! Kernels are Debian's generic packages (the cloud flavour has no 9p, which
//! virtme-ng needs for the guest's root), fetched with a private apt
//! configuration under `target/matrix/apt` and extracted with `dpkg-deb -x`;
//! the exact ABI is resolved with `apt-cache search`, the highest wins. Each
//! is booted with virtme-ng (from PyPI, in `target/matrix/venv`): the guest
//! sees this machine's root read-only, the workspace and /root as overlays
//! whose writes stay in the guest, and its run folder read-write. A script in
//! the guest runs the prebuilt test binaries and writes their logs and exit
//! codes there (vng does not pass exit codes back); the host reads them and
//! writes `target/matrix/results.md` and `results.json`.
use std::{
    cmp::Ordering,
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    fs,
    os::unix::{fs::PermissionsExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{self, AtomicBool},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use regex::Regex;
use serde_json::{Value, json};

use crate::{cargo, run, setup, workspace_root};

/// virtme-ng release verified to boot Debian's packages with Debian 12's QEMU 7.2.
const VIRTME_NG_VERSION: &str = "1.42";
/// The apt sources the kernels come from, committed beside this crate.
const APT_SOURCES: &str = "xtask/matrix/apt-sources.list";
/// Apt lists older than this are refreshed before a kernel is chosen.
const APT_LISTS_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// Two vCPUs, as CI runners have.
const VM_CPUS: &str = "2";
const VM_MEMORY: &str = "4G";
/// Debian kernels default to THP=always, under which the fixtures' "one
/// fault per 4 KiB page" does not hold.
const VM_APPEND: &str = "transparent_hugepage=madvise";

/// A Debian kernel the matrix boots.
pub struct KernelSpec {
    /// What `--kernel` names, and the report's row.
    pub label: &'static str,
    /// The suites it comes from, for the report.
    from: &'static str,
    /// The package holding the kernel image is this prefix, then the release.
    package_prefix: &'static str,
    /// `uname -r` of the acceptable releases (a regex); the highest wins.
    release: &'static str,
    /// Since 7.0 the modules are a package of their own,
    /// `linux-modules-<release>`, beside `linux-binary-<release>`.
    split_modules: bool,
}

pub const KERNELS: &[KernelSpec] = &[
    KernelSpec {
        label: "5.10",
        from: "bullseye(-security)",
        package_prefix: "linux-image-",
        release: r"5\.10\.0-[0-9]+-amd64",
        split_modules: false,
    },
    KernelSpec {
        label: "6.1",
        from: "bookworm(-security)",
        package_prefix: "linux-image-",
        release: r"6\.1\.0-[0-9]+-amd64",
        split_modules: false,
    },
    KernelSpec {
        label: "6.12",
        from: "trixie(-security)",
        package_prefix: "linux-image-",
        release: r"6\.12\.[0-9]+\+deb13-amd64",
        split_modules: false,
    },
    KernelSpec {
        label: "7",
        from: "trixie-backports or sid, the newer",
        package_prefix: "linux-binary-",
        release: r"7\.[0-9]+\.[0-9]+\+deb[0-9]+-amd64",
        split_modules: true,
    },
];

/// Which kernels a test runs on, by what the kernel serves: `memtrace
/// check` in the guest says, or (a memtrace without `check`) its tracefs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Needs {
    Any,
    /// Socket request mode: the sock:sock_*_length tracepoints (6.3), or
    /// what the agent falls back on before them.
    SocketMode,
    /// The kernels socket mode cannot serve, where accept mode stands in.
    NoSocketMode,
}

/// One end-to-end test of the subset.
struct Case {
    /// The test binary (`[[test]] name` in tests/Cargo.toml).
    binary: &'static str,
    test: &'static str,
    needs: Needs,
}

/// The tests every kernel runs, chosen to fit the whole matrix (four kernels
/// under TCG, about 16 times slower than native, plus the download) in about
/// 25 minutes. Times are under TCG on 7.3; see the report for new ones.
const SUBSET: &[Case] = &[
    // Requests counted exactly on real gunicorn, and the detector's slope of
    // its leak, in socket mode.
    Case {
        binary: "sockets",
        test: "gunicorn_gthread_with_keep_alive_counts_every_request_and_its_leak",
        needs: Needs::SocketMode,
    },
    // Where socket mode cannot run: requests counted exactly in accept mode...
    Case {
        binary: "requests",
        test: "accept_mode_on_real_gunicorn_counts_every_request_and_the_leak",
        needs: Needs::NoSocketMode,
    },
    // ...and the slope, from the memtrace binary's LEAK_TREND_DETECTED.
    Case {
        binary: "leaks",
        test: "a_1mb_per_request_leak_is_logged_with_its_slope",
        needs: Needs::NoSocketMode,
    },
    // A Python line at the top of a diff (Python frames read through BTF).
    Case {
        binary: "pysites",
        test: "gunicorn_debian_python_311_sites_match_tracemalloc",
        needs: Needs::Any,
    },
    // Descriptors and GC per request, counted by the kernel at each end
    // (descriptor table and socket file through BTF, the GC in the
    // worker's memory), against the app and /proc.
    Case {
        binary: "fds_gc",
        test: "gunicorn_sync_descriptors_and_garbage_per_request",
        needs: Needs::Any,
    },
    // One worker recycled at its soft limit.
    Case {
        binary: "recycle",
        test: "gunicorn_sync_retires_the_worker_over_the_limit_alone",
        needs: Needs::Any,
    },
    // The API's token rules; collection programs attached by snapshot and
    // detached by stop.
    Case {
        binary: "api",
        test: "snapshot_requests_diff_finds_the_leaking_function",
        needs: Needs::Any,
    },
];

/// Test binaries whose every test is in the subset, when they exist.
const WHOLE_BINARIES: &[&str] = &["kernels"];

/// Test binaries left out of `--full`: the install tests install a package
/// and load images, which the guests' read-only share of this machine's
/// root cannot take (they run on the host, in `cargo xtask test`).
const HOST_ONLY_BINARIES: &[&str] = &["install"];

pub struct MatrixOptions {
    /// Labels of `KERNELS` to boot; empty: all.
    pub kernels: Vec<String>,
    /// Every end-to-end test instead of the subset.
    pub full: bool,
    /// Only these tests (exact names, from any binary).
    pub only: Vec<String>,
    /// Only tests whose name contains this (`cargo xtask test FILTER`).
    pub name_contains: Option<String>,
    /// Try KVM instead of TCG.
    pub kvm: bool,
    /// Refresh the apt lists even when they are recent.
    pub refresh: bool,
    /// Seconds each test may take in the guest.
    pub test_timeout: u64,
    /// Minutes each VM may run, boot included.
    pub vm_timeout: Option<u64>,
}

impl Default for MatrixOptions {
    fn default() -> Self {
        Self {
            kernels: Vec::new(),
            full: false,
            only: Vec::new(),
            name_contains: None,
            kvm: false,
            refresh: false,
            test_timeout: 480,
            vm_timeout: None,
        }
    }
}

fn matrix_dir() -> PathBuf {
    workspace_root().join("target/matrix")
}

pub fn matrix(options: &MatrixOptions) -> Result<()> {
    let specs = select_kernels(&options.kernels)?;
    if !crate::is_root() {
        bail!(
            "the kernel matrix boots VMs whose tests load eBPF programs as root (virtme-ng runs the guest as the caller): run `sudo -E cargo xtask matrix`"
        );
    }
    let missing: Vec<&str> = [
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("/bin/busybox", "busybox-static"),
        ("/sbin/depmod", "kmod"),
        ("dpkg-deb", "dpkg"),
        ("apt-get", "apt"),
    ]
    .into_iter()
    .filter(|(cmd, _)| !setup::have_command(cmd))
    .map(|(_, pkg)| pkg)
    .collect();
    if !missing.is_empty() {
        bail!(
            "the kernel matrix needs {}: run `cargo xtask setup`",
            missing.join(", ")
        );
    }
    let dir = matrix_dir();
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let _lock = lock(&dir.join("lock"))?;

    let staged = build_and_stage(&dir)?;
    let plan = plan(&staged, options)?;
    if plan.is_empty() {
        eprintln!("matrix: no test matches; nothing to run");
        return Ok(());
    }
    let has_check = setup::output(Command::new(&staged.memtrace).args(["check", "--help"])).is_ok();
    let vng = ensure_virtme_ng(&dir)?;
    let mut apt = Apt::new(&dir.join("apt"), options.refresh)?;
    let run = RunSettings {
        dir: dir.clone(),
        vng,
        memtrace: staged.memtrace.clone(),
        has_check,
        kvm: options.kvm,
        test_timeout: options.test_timeout,
        vm_timeout: Duration::from_secs(
            60 * options
                .vm_timeout
                .unwrap_or(if options.full { 240 } else { 20 }),
        ),
    };
    let tests: usize = plan.iter().map(|s| s.tests.len()).sum();
    eprintln!(
        "matrix: {} kernel(s), {} test(s) in {} binar{} ({}), {}",
        specs.len(),
        tests,
        plan.len(),
        if plan.len() == 1 { "y" } else { "ies" },
        if options.full { "full" } else { "subset" },
        if options.kvm { "KVM" } else { "TCG" },
    );

    let started = Instant::now();
    let mut reports = Vec::new();
    for spec in specs {
        let t = Instant::now();
        let report = match fetch_kernel(&mut apt, spec, &dir.join("kernels")) {
            Ok(kernel) => {
                eprintln!(
                    "matrix: {} ready in {:.0}s ({}); booting {}",
                    spec.label,
                    t.elapsed().as_secs_f64(),
                    kernel.package,
                    kernel.release
                );
                let first = run_kernel(spec, &kernel, &plan, &run, spec.label)?;
                retry_failed(spec, &kernel, &plan, &run, first)?
            }
            Err(e) => KernelReport::unfetched(spec, format!("{e:#}")),
        };
        eprint!("{}", report.text());
        reports.push(report);
        write_results(&dir, &reports, options, started.elapsed())?;
    }
    let failed: Vec<&str> = reports
        .iter()
        .filter(|r| !r.passed())
        .map(|r| r.label)
        .collect();
    eprintln!(
        "matrix: {} of {} kernel(s) passed in {:.0}s; results in {}",
        reports.len() - failed.len(),
        reports.len(),
        started.elapsed().as_secs_f64(),
        dir.join("results.md").display()
    );
    // The closing line CI's runners read: tests over every kernel.
    let passed: usize = reports.iter().map(|r| r.count(Outcome::Passed)).sum();
    let skipped: usize = reports.iter().map(|r| r.count(Outcome::Skipped)).sum();
    let run: usize = reports.iter().map(|r| r.tests.len()).sum();
    println!(
        "matrix: {passed} passed, {} failed, {skipped} skipped",
        run - passed - skipped
    );
    if !failed.is_empty() {
        bail!("the kernel matrix failed on {}", failed.join(", "));
    }
    Ok(())
}

/// Tests that failed on a kernel run once more, in a fresh guest: under
/// emulation on a shared host a timing-bound test can miss by one (a request
/// counted late). A test that passes the second time passes, and the report
/// keeps its first failure; one that fails again fails the kernel. A guest
/// that stops before its tests finish (TCG guests have, now and then, with
/// nothing in their logs) ran nothing for the rest: they run in a fresh
/// guest too. A retry whose guest stops before running its tests is not a
/// second run: it gets one more guest.
fn retry_failed(
    spec: &'static KernelSpec,
    kernel: &Kernel,
    plan: &[Step],
    run: &RunSettings,
    mut first: KernelReport,
) -> Result<KernelReport> {
    let stopped = first.problem.clone();
    let failed: Vec<(String, String)> = first
        .tests
        .iter()
        .filter(|t| match t.outcome {
            Outcome::Failed | Outcome::TimedOut => true,
            Outcome::NotRun => stopped.is_some(),
            _ => false,
        })
        .map(|t| (t.binary.clone(), t.name.clone()))
        .collect();
    if failed.is_empty() {
        return Ok(first);
    }
    let again: Vec<Step> = plan
        .iter()
        .filter_map(|step| {
            let tests: Vec<(String, Needs)> = step
                .tests
                .iter()
                .filter(|(name, _)| failed.iter().any(|(b, n)| *b == step.binary && n == name))
                .map(|(name, _)| (name.clone(), Needs::Any))
                .collect();
            (!tests.is_empty()).then(|| Step {
                binary: step.binary.clone(),
                path: step.path.clone(),
                tests,
            })
        })
        .collect();
    eprintln!(
        "matrix: {}: {} test(s) failed{}; running them once more",
        spec.label,
        failed.len(),
        if stopped.is_some() {
            " or did not run (the guest stopped early)"
        } else {
            ""
        }
    );
    // A retry guest that stops before its tests finish (it happened once
    // on 7.3 under TCG, 22 s into the test, with nothing in its log) ran
    // nothing: one more guest then, and its end is kept in the report.
    let mut retry = run_kernel(spec, kernel, &again, run, &format!("{}-retry", spec.label))?;
    if let Some(problem) = retry.problem.clone() {
        eprintln!(
            "matrix: {}: the retry's guest ran nothing ({}); one more",
            spec.label,
            problem.lines().next().unwrap_or("")
        );
        for t in &mut first.tests {
            if failed.iter().any(|(b, n)| *b == t.binary && *n == t.name) {
                let note = t.note.take().unwrap_or_default();
                t.note = Some(format!(
                    "{note}\nthe first retry's guest stopped early:\n{problem}"
                ));
            }
        }
        retry = run_kernel(spec, kernel, &again, run, &format!("{}-retry2", spec.label))?;
    }
    Ok(merge_retry(first, &retry, stopped.as_deref()))
}

/// The first run's report with what its retry ran: a test that did not run
/// (its guest stopped early: `stopped`) takes the retry's outcome, one that
/// failed passes if it passed the second time. Once every test has run, the
/// stop no longer fails the kernel (it stays in the tests' notes).
fn merge_retry(
    mut first: KernelReport,
    retry: &KernelReport,
    stopped: Option<&str>,
) -> KernelReport {
    for t in &mut first.tests {
        let Some(second) = retry
            .tests
            .iter()
            .find(|r| r.binary == t.binary && r.name == t.name)
        else {
            continue;
        };
        if t.outcome == Outcome::NotRun {
            // Its only run is the second guest's.
            let why = stopped.unwrap_or_default();
            t.outcome = second.outcome;
            t.seconds = second.seconds;
            t.note = Some(format!(
                "run in a second guest: the first stopped before it ran ({})\n{}",
                why.lines().next().unwrap_or(""),
                second.note.as_deref().unwrap_or("")
            ));
        } else if second.outcome == Outcome::Passed {
            t.note = Some(format!(
                "failed once, passed on retry ({:.1} s); the first failure:\n{}",
                second.seconds.unwrap_or_default(),
                t.note.as_deref().unwrap_or("no message")
            ));
            t.outcome = Outcome::Passed;
        }
    }
    // Every test the stopped guest left has run since: the kernel is
    // judged on the tests (the stop stays in their notes).
    if stopped.is_some() && !first.tests.iter().any(|t| t.outcome == Outcome::NotRun) {
        first.problem = None;
    }
    first
}

/// One matrix at a time: runs share `target/matrix`, and two TCG guests on a
/// small machine slow each other past the tests' time limits.
fn lock(path: &Path) -> Result<fs::File> {
    use std::os::fd::AsRawFd as _;
    let file =
        fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        eprintln!("matrix: another `cargo xtask matrix` is running; waiting for it");
        // SAFETY: as above.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            bail!("cannot lock {}", path.display());
        }
    }
    Ok(file)
}

fn select_kernels(labels: &[String]) -> Result<Vec<&'static KernelSpec>> {
    if labels.is_empty() {
        return Ok(KERNELS.iter().collect());
    }
    labels
        .iter()
        .map(|l| {
            // "7.x" and "7" both name the newest 7.x.
            let l = l.trim_end_matches(".x");
            KERNELS.iter().find(|k| k.label == l).with_context(|| {
                let known: Vec<&str> = KERNELS.iter().map(|k| k.label).collect();
                format!("no kernel {l} in the matrix; known: {}", known.join(", "))
            })
        })
        .collect()
}

/// The binaries under test, hard-linked under `target/matrix/bin` so that a
/// build during the run (cargo replaces files) does not change them.
struct Staged {
    memtrace: PathBuf,
    /// Test binary name → staged path.
    tests: BTreeMap<String, PathBuf>,
}

fn build_and_stage(dir: &Path) -> Result<Staged> {
    run(cargo().args(["build", "-p", "memtrace"]))?;
    let out = cargo()
        .args([
            "test",
            "-p",
            "memtrace-tests",
            "--no-run",
            "--message-format=json",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the end-to-end tests failed");
    }
    let mut built = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let is_test = msg["target"]["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k == "test"));
        let (Some(name), Some(exe)) = (msg["target"]["name"].as_str(), msg["executable"].as_str())
        else {
            continue;
        };
        if msg["reason"] == "compiler-artifact" && is_test {
            built.insert(name.to_string(), PathBuf::from(exe));
        }
    }
    if built.is_empty() {
        bail!("cargo test --no-run named no test binary");
    }
    let bin = dir.join("bin");
    let _ = fs::remove_dir_all(&bin);
    fs::create_dir_all(&bin).with_context(|| format!("cannot create {}", bin.display()))?;
    // The guest finds them fresh and skips gcc, slow under TCG.
    let fixtures = workspace_root().join("tests/fixtures/build.sh");
    run(Command::new(fixtures).arg(workspace_root().join("target/fixtures")))?;
    let memtrace = bin.join("memtrace");
    link_or_copy(&workspace_root().join("target/debug/memtrace"), &memtrace)?;
    let mut tests = BTreeMap::new();
    for (name, exe) in built {
        let staged = bin.join(&name);
        link_or_copy(&exe, &staged)?;
        tests.insert(name, staged);
    }
    Ok(Staged { memtrace, tests })
}

fn link_or_copy(from: &Path, to: &Path) -> Result<()> {
    if fs::hard_link(from, to).is_ok() {
        return Ok(());
    }
    fs::copy(from, to)
        .map(drop)
        .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))
}

/// One test binary run in the guest: these tests, in one process (each
/// process builds the fixtures once, about 40 s under TCG).
struct Step {
    binary: String,
    path: PathBuf,
    tests: Vec<(String, Needs)>,
}

/// The names of a test binary's tests (`--list` needs no root).
fn list_tests(path: &Path) -> Result<Vec<String>> {
    let out = setup::output(Command::new(path).args(["--list", "--format", "terse"]))?;
    Ok(out
        .lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .map(str::to_string)
        .collect())
}

fn plan(staged: &Staged, options: &MatrixOptions) -> Result<Vec<Step>> {
    let mut listed = BTreeMap::new();
    for (binary, path) in &staged.tests {
        listed.insert(binary.as_str(), list_tests(path)?);
    }
    let mut wanted: Vec<(String, String, Needs)> = Vec::new();
    if options.full || !options.only.is_empty() {
        // Asked for by name or all of them: each runs on every kernel.
        for (binary, names) in &listed {
            if options.only.is_empty() && HOST_ONLY_BINARIES.contains(binary) {
                continue;
            }
            for name in names {
                wanted.push((binary.to_string(), name.clone(), Needs::Any));
            }
        }
        if !options.only.is_empty() {
            wanted.retain(|(_, name, _)| options.only.contains(name));
            let found: BTreeSet<&str> = wanted.iter().map(|(_, n, _)| n.as_str()).collect();
            let unknown: Vec<&str> = options
                .only
                .iter()
                .map(String::as_str)
                .filter(|n| !found.contains(n))
                .collect();
            if !unknown.is_empty() {
                bail!("no end-to-end test named {}", unknown.join(", "));
            }
        }
    } else {
        for case in SUBSET {
            let known = listed
                .get(case.binary)
                .is_some_and(|names| names.iter().any(|n| n == case.test));
            if !known {
                bail!(
                    "the matrix subset names {}::{}, which the tests no longer have: update SUBSET in xtask/src/matrix.rs",
                    case.binary,
                    case.test
                );
            }
            wanted.push((case.binary.into(), case.test.into(), case.needs));
        }
        for binary in WHOLE_BINARIES {
            for name in listed.get(binary).into_iter().flatten() {
                wanted.push((binary.to_string(), name.clone(), Needs::Any));
            }
        }
    }
    if let Some(part) = &options.name_contains {
        wanted.retain(|(_, name, _)| name.contains(part.as_str()));
    }
    let mut steps: Vec<Step> = Vec::new();
    for (binary, name, needs) in wanted {
        match steps.iter_mut().find(|s| s.binary == binary) {
            Some(step) => step.tests.push((name, needs)),
            None => steps.push(Step {
                path: staged.tests[&binary].clone(),
                binary,
                tests: vec![(name, needs)],
            }),
        }
    }
    Ok(steps)
}

/// virtme-ng in its own virtualenv; returns the venv's bin folder.
fn ensure_virtme_ng(dir: &Path) -> Result<PathBuf> {
    let venv = dir.join("venv");
    let bin = venv.join("bin");
    let version = setup::output(Command::new(bin.join("vng")).arg("--version"));
    if version.is_ok_and(|v| v.split_whitespace().any(|w| w == VIRTME_NG_VERSION)) {
        return Ok(bin);
    }
    eprintln!("matrix: installing virtme-ng {VIRTME_NG_VERSION} from PyPI");
    let _ = fs::remove_dir_all(&venv);
    // Debian's python first: a pyenv shim may point anywhere.
    let python = ["/usr/bin/python3", "python3"]
        .into_iter()
        .find(|p| setup::output(Command::new(p).args(["-m", "venv", "--help"])).is_ok())
        .context("no python3 with the venv module: install python3-venv")?;
    setup::output(Command::new(python).args(["-m", "venv"]).arg(&venv))?;
    setup::output(
        Command::new(bin.join("pip"))
            .args(["install", "--quiet"])
            .arg(format!("virtme-ng=={VIRTME_NG_VERSION}"))
            .env("PIP_DISABLE_PIP_VERSION_CHECK", "1"),
    )
    .context("pip could not install virtme-ng from PyPI")?;
    Ok(bin)
}

/// apt with its own configuration, lists and cache under `target/matrix/apt`;
/// it reads nothing from /etc/apt and installs nothing.
struct Apt {
    dir: PathBuf,
    conf: PathBuf,
    refresh: bool,
    /// The lists were brought up to date (or found recent) in this run.
    checked: Option<Result<(), String>>,
}

impl Apt {
    fn new(dir: &Path, refresh: bool) -> Result<Self> {
        for sub in ["lists/partial", "cache/archives/partial", "empty.d"] {
            fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("cannot create {}", dir.join(sub).display()))?;
        }
        let status = dir.join("status");
        if !status.exists() {
            fs::write(&status, "")?;
        }
        let d = dir.display();
        let sources = workspace_root().join(APT_SOURCES);
        let conf = dir.join("apt.conf");
        fs::write(
            &conf,
            format!(
                "// Written by `cargo xtask matrix`: nothing is read from /etc/apt.\n\
                 Dir::Etc::Main \"/dev/null\";\n\
                 Dir::Etc::Parts \"{d}/empty.d\";\n\
                 Dir::Etc::SourceList \"{sources}\";\n\
                 Dir::Etc::SourceParts \"{d}/empty.d\";\n\
                 Dir::Etc::Preferences \"/dev/null\";\n\
                 Dir::Etc::PreferencesParts \"{d}/empty.d\";\n\
                 Dir::State::Lists \"{d}/lists\";\n\
                 Dir::State::Status \"{d}/status\";\n\
                 Dir::Cache \"{d}/cache\";\n\
                 APT::Architecture \"amd64\";\n\
                 APT::Architectures {{ \"amd64\"; }};\n\
                 Acquire::Languages \"none\";\n\
                 // The sandbox user _apt cannot write under target/.\n\
                 APT::Sandbox::User \"root\";\n\
                 // A mirror may serve a Release file past its Valid-Until; its\n\
                 // signature (debian-archive-keyring) is still checked.\n\
                 Acquire::Check-Valid-Until \"false\";\n",
                sources = sources.display()
            ),
        )?;
        Ok(Self {
            dir: dir.to_path_buf(),
            conf,
            refresh,
            checked: None,
        })
    }

    fn cmd(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("APT_CONFIG", &self.conf);
        cmd
    }

    /// Refreshes the lists once per run when they are older than a day (or
    /// on `--refresh`); when the archive cannot be reached, older lists serve.
    fn ensure_lists(&mut self) -> Result<()> {
        if self.checked.is_none() {
            self.checked = Some(self.update().map_err(|e| format!("{e:#}")));
        }
        match self.checked.as_ref().expect("set above") {
            Ok(()) => Ok(()),
            Err(e) => bail!("{e}"),
        }
    }

    fn update(&self) -> Result<()> {
        let marker = self.dir.join("lists-updated");
        let age = fs::metadata(&marker)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok());
        if !self.refresh && age.is_some_and(|a| a < APT_LISTS_MAX_AGE) {
            return Ok(());
        }
        eprintln!(
            "matrix: apt-get update (private lists in {})",
            self.dir.display()
        );
        let out = self
            .cmd("apt-get")
            .args(["-q", "update"])
            .output()
            .context("cannot run apt-get")?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() && !stderr.lines().any(|l| l.starts_with("E:")) {
            fs::write(&marker, "")?;
            return Ok(());
        }
        match age {
            Some(age) => {
                eprintln!(
                    "matrix: warning: apt-get update failed, using lists from {:.0} h ago: {}",
                    age.as_secs_f64() / 3600.0,
                    stderr.trim()
                );
                Ok(())
            }
            None => bail!(
                "apt-get update failed (can this machine reach deb.debian.org?): {}",
                stderr.trim()
            ),
        }
    }

    /// The highest release apt knows for `spec`.
    fn newest(&mut self, spec: &KernelSpec) -> Result<Option<String>> {
        self.ensure_lists()?;
        let regex = format!("^{}{}$", regex::escape(spec.package_prefix), spec.release);
        let out = setup::output(
            self.cmd("apt-cache")
                .args(["search", "--names-only", &regex]),
        )?;
        Ok(out
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter_map(|p| p.strip_prefix(spec.package_prefix))
            .max_by(|a, b| natural_cmp(a, b))
            .map(str::to_string))
    }
}

/// Version-like order: runs of digits compare as numbers ("6.12.9" < "6.12.10").
fn natural_cmp(a: &str, b: &str) -> Ordering {
    fn chunks(s: &str) -> Vec<&str> {
        let mut out = Vec::new();
        let mut start = 0;
        let bytes = s.as_bytes();
        for i in 1..=bytes.len() {
            if i == bytes.len() || bytes[i].is_ascii_digit() != bytes[i - 1].is_ascii_digit() {
                out.push(&s[start..i]);
                start = i;
            }
        }
        out
    }
    let (ca, cb) = (chunks(a), chunks(b));
    for (x, y) in ca.iter().zip(&cb) {
        let ord = match (x.parse::<u64>(), y.parse::<u64>()) {
            (Ok(x), Ok(y)) => x.cmp(&y),
            _ => x.cmp(y),
        };
        if ord != Ordering::Equal {
            return ord;
        }
    }
    ca.len().cmp(&cb.len())
}

/// A kernel extracted under `target/matrix/kernels/<release>`.
struct Kernel {
    release: String,
    /// Package names and versions, for the report.
    package: String,
    vmlinuz: PathBuf,
}

fn fetch_kernel(apt: &mut Apt, spec: &KernelSpec, kernels: &Path) -> Result<Kernel> {
    fs::create_dir_all(kernels)?;
    let release_re = Regex::new(&format!("^{}$", spec.release)).expect("a valid regex");
    let cached = || {
        fs::read_dir(kernels)
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .filter(|e| e.path().is_dir())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| release_re.is_match(n))
            .max_by(|a, b| natural_cmp(a, b))
    };
    let release = match apt.newest(spec) {
        Ok(Some(release)) => release,
        Ok(None) => cached().with_context(|| {
            format!(
                "apt knows no package {}<{}> (see {APT_SOURCES})",
                spec.package_prefix, spec.release
            )
        })?,
        Err(e) => {
            let release = cached()
                .with_context(|| format!("{e:#}; and no {} kernel is cached", spec.label))?;
            eprintln!("matrix: {}: {e:#}; using the cached {release}", spec.label);
            release
        }
    };
    let root = kernels.join(&release);
    let about = kernels.join(format!("{release}.package"));
    if !root.is_dir() {
        download(apt, spec, &release, kernels)?;
    }
    let package = fs::read_to_string(&about)
        .unwrap_or_default()
        .trim()
        .to_string();
    let vmlinuz = [
        root.join(format!("boot/vmlinuz-{release}")),
        root.join(format!("usr/lib/modules/{release}/vmlinuz")),
        root.join(format!("lib/modules/{release}/vmlinuz")),
    ]
    .into_iter()
    .find(|p| p.is_file())
    .with_context(|| format!("no vmlinuz in {}", root.display()))?;
    Ok(Kernel {
        release,
        package,
        vmlinuz,
    })
}

fn download(apt: &Apt, spec: &KernelSpec, release: &str, kernels: &Path) -> Result<()> {
    let mut packages = vec![format!("{}{release}", spec.package_prefix)];
    if spec.split_modules {
        packages.push(format!("linux-modules-{release}"));
    }
    let debs = kernels.join("debs");
    let _ = fs::remove_dir_all(&debs);
    fs::create_dir_all(&debs)?;
    eprintln!(
        "matrix: {}: downloading {} from {}",
        spec.label,
        packages.join(" "),
        spec.from
    );
    let t = Instant::now();
    run(apt
        .cmd("apt-get")
        .current_dir(&debs)
        .args(["-q", "download"])
        .args(&packages))?;
    let partial = kernels.join(format!("{release}.partial"));
    let _ = fs::remove_dir_all(&partial);
    fs::create_dir_all(&partial)?;
    let mut about = Vec::new();
    for entry in fs::read_dir(&debs)? {
        let deb = entry?.path();
        if deb.extension().is_none_or(|e| e != "deb") {
            continue;
        }
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&partial))?;
        let fields = setup::output(
            Command::new("dpkg-deb")
                .args(["-f"])
                .arg(&deb)
                .args(["Package", "Version"]),
        )?;
        let field = |k: &str| {
            fields
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .unwrap_or("?")
                .trim()
                .to_string()
        };
        about.push(format!("{} {}", field("Package:"), field("Version:")));
    }
    about.sort();
    fs::write(
        kernels.join(format!("{release}.package")),
        about.join(", ") + "\n",
    )?;
    fs::rename(&partial, kernels.join(release))?;
    fs::remove_dir_all(&debs)?;
    eprintln!(
        "matrix: {}: {} extracted in {:.0}s",
        spec.label,
        release,
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

struct RunSettings {
    dir: PathBuf,
    /// The virtualenv's bin folder (vng runs virtme-run from PATH).
    vng: PathBuf,
    memtrace: PathBuf,
    has_check: bool,
    kvm: bool,
    test_timeout: u64,
    vm_timeout: Duration,
}

/// Set by SIGINT/SIGTERM while a VM runs, so it is killed, not orphaned.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, atomic::Ordering::SeqCst);
}

fn run_kernel(
    spec: &'static KernelSpec,
    kernel: &Kernel,
    plan: &[Step],
    settings: &RunSettings,
    run_name: &str,
) -> Result<KernelReport> {
    let out = settings.dir.join("runs").join(run_name);
    let _ = fs::remove_dir_all(&out);
    fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let script = out.join("run.sh");
    fs::write(&script, guest_script(&out, plan, settings))?;
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755))?;
    let console = out.join("console.log");

    let ws = workspace_root();
    let mut cmd = Command::new(settings.vng.join("vng"));
    cmd.arg("--run").arg(&kernel.vmlinuz);
    if !settings.kvm {
        cmd.arg("--disable-kvm");
    }
    cmd.args([
        "--cpus", VM_CPUS, "--memory", VM_MEMORY, "--append", VM_APPEND,
    ])
    // Writes to the workspace (the fixtures' builds) and /root stay in
    // the guest: a build on the host at the same time is not disturbed.
    .arg("--overlay-rwdir")
    .arg(&ws)
    .args(["--overlay-rwdir", "/root"])
    .arg("--rwdir")
    .arg(&out)
    .arg("--exec")
    .arg(&script)
    .current_dir(&ws)
    .env("PATH", prepend_path(&settings.vng))
    .stdin(Stdio::null())
    .stdout(fs::File::create(&console)?)
    .stderr(fs::File::create(out.join("vng.stderr"))?)
    .process_group(0);

    let t = Instant::now();
    let mut child = cmd.spawn().context("cannot start vng")?;
    // The guest is in a process group of its own, out of the terminal's
    // reach: Ctrl-C is caught here and passed on as SIGKILL to the group.
    INTERRUPTED.store(false, atomic::Ordering::SeqCst);
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        let handler = on_interrupt as extern "C" fn(libc::c_int) as libc::sighandler_t;
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
    let mut timed_out = false;
    loop {
        if child.try_wait().is_ok_and(|s| s.is_some()) {
            break;
        }
        let interrupted = INTERRUPTED.load(atomic::Ordering::SeqCst);
        if interrupted || t.elapsed() > settings.vm_timeout {
            // vng and QEMU share the group started above.
            // SAFETY: kill has no memory preconditions.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
            if interrupted {
                bail!("interrupted: the VM for {} was killed", kernel.release);
            }
            timed_out = true;
            break;
        }
        thread::sleep(Duration::from_millis(250));
    }
    // SAFETY: restoring the default disposition.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_DFL);
        libc::signal(libc::SIGTERM, libc::SIG_DFL);
    }
    let vm_seconds = t.elapsed().as_secs_f64();
    Ok(read_guest_results(
        spec,
        kernel,
        plan,
        &out,
        vm_seconds,
        timed_out.then_some(settings.vm_timeout),
    ))
}

fn prepend_path(dir: &Path) -> std::ffi::OsString {
    let mut paths = vec![dir.to_path_buf()];
    if let Some(old) = std::env::var_os("PATH") {
        paths.extend(std::env::split_paths(&old));
    }
    std::env::join_paths(paths).expect("PATH entries have no ':'")
}

/// `s` quoted for sh.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The script the guest runs: every result lands in `out`, read by the host.
fn guest_script(out: &Path, plan: &[Step], settings: &RunSettings) -> String {
    let q = |p: &Path| sh_quote(&p.display().to_string());
    let host_path = std::env::var("PATH").unwrap_or_default();
    let mut s = format!(
        r#"#!/bin/sh
# Written by `cargo xtask matrix`; runs as root in the guest.
out={out}
read up _ < /proc/uptime; echo "$up" > "$out/started"
uname -r > "$out/uname"
# The kernel's messages as they come: a guest that dies mid-test (an oops,
# a warning before a panic) leaves them here (vng's --exec console has none).
dmesg -w > "$out/dmesg.log" 2>&1 &
# virtme-ng mounts these itself; mount whatever an older init leaves out.
[ -d /sys/kernel/tracing/events ] || mount -t tracefs nodev /sys/kernel/tracing
grep -q ' /sys/fs/bpf ' /proc/mounts || mount -t bpf bpf /sys/fs/bpf
grep -q ' /sys/fs/cgroup cgroup2 ' /proc/mounts || mount -t cgroup2 nodev /sys/fs/cgroup
cat /proc/mounts > "$out/mounts"
cat /sys/kernel/mm/transparent_hugepage/enabled > "$out/thp" 2>&1
# The host's PATH: the tests find gunicorn, uwsgi, go... where they do there.
export PATH={path} MEMTRACE_BIN={memtrace} RUST_BACKTRACE=1 HOME=/root
cd {ws}
# Each line of a test's output with the guest's uptime when it was written.
stamp() {{
    while IFS= read -r line || [ -n "$line" ]; do
        read up _ < /proc/uptime
        printf '%s %s\n' "$up" "$line"
    done
}}
"#,
        out = q(out),
        path = sh_quote(&host_path),
        memtrace = q(&settings.memtrace),
        ws = q(&workspace_root()),
    );
    if settings.has_check {
        s.push_str(
            r#"timeout -k 5 300 "$MEMTRACE_BIN" check --format json > "$out/check.json" 2> "$out/check.err"
echo $? > "$out/check.rc"
# Socket mode as check reports it.
sock=$(/usr/bin/python3 - "$out/check.json" <<'EOF'
import json, sys
try:
    rows = json.load(open(sys.argv[1]))["features"]
    print(int(any(r["feature"] == "request mode socket" and r["works"] for r in rows)))
except Exception:
    pass
EOF
)
"#,
        );
    }
    s.push_str(
        r#"if [ -z "$sock" ]; then
    # No answer from check: the tracepoints socket mode reads since 6.3.
    if [ -d /sys/kernel/tracing/events/sock/sock_recv_length ]; then sock=1; else sock=0; fi
    echo "the sock:sock_recv_length tracepoint" > "$out/socket_mode_from"
else
    echo "memtrace check" > "$out/socket_mode_from"
fi
echo "$sock" > "$out/socket_mode"
"#,
    );
    for (i, step) in plan.iter().enumerate() {
        let _ = writeln!(s, "\n# {}\nset --", step.binary);
        for (name, needs) in &step.tests {
            let guard = match needs {
                Needs::Any => "",
                Needs::SocketMode => "[ \"$sock\" = 1 ] && ",
                Needs::NoSocketMode => "[ \"$sock\" = 0 ] && ",
            };
            let _ = writeln!(s, "{guard}set -- \"$@\" {}", sh_quote(name));
        }
        // The first test of a process also builds the fixtures.
        let timeout = settings.test_timeout * step.tests.len() as u64 + 120;
        let _ = write!(
            s,
            r#"if [ $# -gt 0 ]; then
    read up _ < /proc/uptime; echo "$up" > "$out/step{i}.start"
    {{ timeout -k 10 {timeout} {bin} --exact --test-threads=1 "$@" 2>&1; echo $? > "$out/step{i}.rc"; }} | stamp > "$out/step{i}.log"
fi
"#,
            bin = q(&step.path),
        );
    }
    s.push_str("read up _ < /proc/uptime; echo \"$up\" > \"$out/finished\"\n");
    s
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Passed,
    Failed,
    Skipped,
    TimedOut,
    NotRun,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Self::Passed => "passed",
            Self::Failed => "FAILED",
            Self::Skipped => "skipped",
            Self::TimedOut => "TIMEOUT",
            Self::NotRun => "not run",
        }
    }
}

struct TestReport {
    binary: String,
    name: String,
    outcome: Outcome,
    seconds: Option<f64>,
    /// Why it failed or was skipped: the panic message, a reason.
    note: Option<String>,
}

struct KernelReport {
    label: &'static str,
    from: &'static str,
    package: String,
    /// `uname -r` in the guest (or the release chosen, if it never ran).
    release: String,
    /// Guest uptime when the script started.
    boot_seconds: Option<f64>,
    /// Script start to end, in the guest.
    run_seconds: Option<f64>,
    /// The VM's whole life on the host: initramfs, boot, run, power-off.
    vm_seconds: Option<f64>,
    tests: Vec<TestReport>,
    check: Option<Value>,
    check_note: Option<String>,
    /// Why the kernel failed outside any test.
    problem: Option<String>,
    console: Option<PathBuf>,
}

impl KernelReport {
    fn unfetched(spec: &'static KernelSpec, problem: String) -> Self {
        Self {
            label: spec.label,
            from: spec.from,
            package: String::new(),
            release: String::new(),
            boot_seconds: None,
            run_seconds: None,
            vm_seconds: None,
            tests: Vec::new(),
            check: None,
            check_note: None,
            problem: Some(format!("cannot fetch the kernel: {problem}")),
            console: None,
        }
    }

    fn count(&self, outcome: Outcome) -> usize {
        self.tests.iter().filter(|t| t.outcome == outcome).count()
    }

    fn passed(&self) -> bool {
        self.problem.is_none()
            && self
                .tests
                .iter()
                .all(|t| matches!(t.outcome, Outcome::Passed | Outcome::Skipped))
    }

    /// What the terminal shows.
    fn text(&self) -> String {
        let secs = |s: Option<f64>| s.map_or("?".into(), |s| format!("{s:.0}s"));
        let mut t = format!(
            "\n== {} {}: {} (boot {}, tests {}, VM {}) {}\n",
            self.label,
            self.release,
            if self.passed() { "passed" } else { "FAILED" },
            secs(self.boot_seconds),
            secs(self.run_seconds),
            secs(self.vm_seconds),
            self.package,
        );
        if let Some(p) = &self.problem {
            for line in p.lines() {
                let _ = writeln!(t, "   {line}");
            }
        }
        for test in &self.tests {
            let time = test.seconds.map_or(String::new(), |s| format!("{s:.1}s"));
            let _ = writeln!(
                t,
                "   {:<8}{:>7}  {}::{}",
                test.outcome.as_str(),
                time,
                test.binary,
                test.name
            );
            if let Some(note) = &test.note {
                for line in note.lines() {
                    let _ = writeln!(t, "   {:15}| {line}", "");
                }
            }
        }
        if let Some(check) = &self.check {
            let not: Vec<String> = check["features"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|f| f["works"] == false)
                .map(|f| {
                    format!(
                        "{} ({})",
                        f["feature"].as_str().unwrap_or("?"),
                        f["why_not"].as_str().unwrap_or("?")
                    )
                })
                .collect();
            if not.is_empty() {
                let _ = writeln!(t, "   memtrace check: every feature served");
            } else {
                let _ = writeln!(t, "   memtrace check: not served: {}", not.join("; "));
            }
        } else if let Some(note) = &self.check_note {
            let _ = writeln!(t, "   memtrace check: {note}");
        }
        if let Some(c) = &self.console {
            let _ = writeln!(t, "   logs: {}", c.parent().unwrap_or(c).display());
        }
        t
    }

    fn json(&self) -> Value {
        json!({
            "kernel": self.label,
            "from": self.from,
            "package": self.package,
            "release": self.release,
            "passed": self.passed(),
            "problem": self.problem,
            "boot_seconds": self.boot_seconds,
            "run_seconds": self.run_seconds,
            "vm_seconds": self.vm_seconds,
            "tests_passed": self.count(Outcome::Passed),
            "tests_failed": self.tests.len() - self.count(Outcome::Passed) - self.count(Outcome::Skipped),
            "tests_skipped": self.count(Outcome::Skipped),
            "tests": self.tests.iter().map(|t| json!({
                "binary": t.binary,
                "test": t.name,
                "outcome": t.outcome.as_str().to_lowercase(),
                "seconds": t.seconds,
                "note": t.note,
            })).collect::<Vec<_>>(),
            "check": self.check,
            "check_note": self.check_note,
            "logs": self.console.as_ref().and_then(|c| c.parent()).map(|p| p.display().to_string()),
        })
    }
}

fn read_f64(path: &Path) -> Option<f64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn read_guest_results(
    spec: &'static KernelSpec,
    kernel: &Kernel,
    plan: &[Step],
    out: &Path,
    vm_seconds: f64,
    timed_out: Option<Duration>,
) -> KernelReport {
    let started = read_f64(&out.join("started"));
    let finished = read_f64(&out.join("finished"));
    let release = fs::read_to_string(out.join("uname"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| kernel.release.clone());
    let sock = fs::read_to_string(out.join("socket_mode"))
        .ok()
        .map(|s| s.trim() == "1");
    let sock_from = fs::read_to_string(out.join("socket_mode_from"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let problem = match (timed_out, started, finished) {
        (Some(limit), _, _) => Some(format!(
            "the VM ran past its {} min limit and was killed",
            limit.as_secs() / 60
        )),
        (None, None, _) => Some(format!(
            "the guest never ran the test script; the VM's last words:\n{}",
            last_words(out)
        )),
        (None, Some(_), None) => Some(format!(
            "the guest stopped before the test script finished; the VM's last words:\n{}",
            last_words(out)
        )),
        _ => None,
    };
    let mut tests = Vec::new();
    for (i, step) in plan.iter().enumerate() {
        tests.extend(step_results(
            step,
            out,
            i,
            (sock, &sock_from),
            timed_out.is_some(),
        ));
    }
    let (check, check_note) = match fs::read_to_string(out.join("check.rc")) {
        Err(_) if started.is_some() && fs::metadata(out.join("check.json")).is_err() => {
            (None, Some("this memtrace has no `check` subcommand".into()))
        }
        Err(_) => (None, None),
        Ok(rc) => {
            let stdout = fs::read_to_string(out.join("check.json")).unwrap_or_default();
            match serde_json::from_str::<Value>(&stdout) {
                Ok(v) => (Some(v), None),
                Err(_) => {
                    let stderr = fs::read_to_string(out.join("check.err")).unwrap_or_default();
                    (
                        None,
                        Some(format!(
                            "exit {}: {}",
                            rc.trim(),
                            last_lines(&format!("{stdout}{stderr}"), 5)
                        )),
                    )
                }
            }
        }
    };
    KernelReport {
        label: spec.label,
        from: spec.from,
        package: kernel.package.clone(),
        release,
        boot_seconds: started,
        run_seconds: started.zip(finished).map(|(s, f)| f - s),
        vm_seconds: Some(vm_seconds),
        tests,
        check,
        check_note,
        problem,
        console: Some(out.join("console.log")),
    }
}

/// The end of what vng and QEMU printed (a KVM error, a kernel panic).
fn last_words(out: &Path) -> String {
    let stderr = fs::read_to_string(out.join("vng.stderr")).unwrap_or_default();
    let console = fs::read_to_string(out.join("console.log")).unwrap_or_default();
    let dmesg = fs::read_to_string(out.join("dmesg.log")).unwrap_or_default();
    let text = if stderr.trim().is_empty() {
        console
    } else {
        stderr
    };
    let mut words = last_lines(text.trim_end(), 4);
    if !dmesg.trim().is_empty() {
        words.push_str("\nthe guest kernel's last messages:\n");
        words.push_str(&last_lines(dmesg.trim_end(), 8));
    }
    words
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Each test's outcome and time in one step, from its stamped log.
fn step_results(
    step: &Step,
    out: &Path,
    i: usize,
    (sock, sock_from): (Option<bool>, &str),
    vm_timed_out: bool,
) -> Vec<TestReport> {
    let log = fs::read_to_string(out.join(format!("step{i}.log"))).unwrap_or_default();
    let lines: Vec<(f64, &str)> = log
        .lines()
        .filter_map(|l| {
            let (t, text) = l.split_once(' ').unwrap_or((l, ""));
            Some((t.parse().ok()?, text))
        })
        .collect();
    let start = read_f64(&out.join(format!("step{i}.start")));
    let rc: Option<i32> = fs::read_to_string(out.join(format!("step{i}.rc")))
        .ok()
        .and_then(|s| s.trim().parse().ok());
    // libtest runs a binary's tests in name order; each "test NAME ... ok"
    // line ends one, so a test's time runs from the previous one's end.
    let result_line = Regex::new(r"test (\S+) \.\.\. (ok|FAILED|ignored)").expect("a valid regex");
    let mut ended: BTreeMap<&str, (&str, f64)> = BTreeMap::new();
    let mut previous = start;
    for (t, text) in &lines {
        if let Some(c) = result_line.captures(text) {
            let name = c.get(1).expect("group 1").as_str();
            let status = c.get(2).expect("group 2").as_str();
            ended.insert(name, (status, previous.map_or(0.0, |p| t - p)));
            previous = Some(*t);
        }
    }
    // The "failures:" list at the end names each failed test on a line of its own.
    let listed_failed: BTreeSet<&str> = lines.iter().map(|(_, l)| l.trim()).collect();
    step.tests
        .iter()
        .map(|(name, needs)| {
            let skipped = match (needs, sock) {
                (Needs::SocketMode, Some(false)) => Some(format!(
                    "socket mode is off on this kernel (from {sock_from}): the accept-mode tests stand in"
                )),
                (Needs::NoSocketMode, Some(true)) => Some(format!(
                    "socket mode works on this kernel (from {sock_from}): the socket-mode test stands in"
                )),
                _ => None,
            };
            let mut report = TestReport {
                binary: step.binary.clone(),
                name: name.clone(),
                outcome: Outcome::NotRun,
                seconds: None,
                note: None,
            };
            if let Some(why) = skipped {
                report.outcome = Outcome::Skipped;
                report.note = Some(why);
                return report;
            }
            if let Some((status, secs)) = ended.get(name.as_str()) {
                report.seconds = Some(*secs);
                report.outcome = match *status {
                    "ok" => Outcome::Passed,
                    "ignored" => Outcome::Skipped,
                    _ => Outcome::Failed,
                };
            } else if listed_failed.contains(name.as_str()) {
                report.outcome = Outcome::Failed;
            } else {
                report.outcome = match rc {
                    Some(0) => Outcome::Passed,
                    Some(124 | 137) => Outcome::TimedOut,
                    None if vm_timed_out => Outcome::TimedOut,
                    None => Outcome::NotRun,
                    Some(_) => Outcome::Failed,
                };
            }
            report.note = match report.outcome {
                Outcome::Failed => Some(failure_excerpt(&lines, name).unwrap_or_else(|| {
                    let text: Vec<&str> = lines.iter().map(|(_, l)| *l).collect();
                    format!(
                        "exit {}; last lines:\n{}",
                        rc.map_or("?".into(), |r| r.to_string()),
                        last_lines(&text.join("\n"), 8)
                    )
                })),
                Outcome::TimedOut => {
                    let text: Vec<&str> = lines.iter().map(|(_, l)| *l).collect();
                    Some(format!(
                        "killed by the time limit; last lines:\n{}",
                        last_lines(&text.join("\n"), 5)
                    ))
                }
                Outcome::NotRun => Some("the guest stopped before this test ran".into()),
                _ => None,
            };
            report
        })
        .collect()
}

/// The panic message of a failed test, from libtest's "---- NAME stdout ----"
/// section: what the test says went wrong, without the backtrace.
fn failure_excerpt(lines: &[(f64, &str)], name: &str) -> Option<String> {
    let header = format!("---- {name} stdout ----");
    let from = lines.iter().position(|(_, l)| l.trim() == header)? + 1;
    let mut excerpt = Vec::new();
    let mut in_panic = false;
    for (_, line) in &lines[from..] {
        if line.starts_with("---- ") || line.trim() == "failures:" {
            break;
        }
        if line.contains("panicked at") {
            in_panic = true;
        }
        if line.starts_with("stack backtrace:") || line.starts_with("note: ") {
            in_panic = false;
        }
        if in_panic && excerpt.len() < 15 {
            excerpt.push(*line);
        }
    }
    (!excerpt.is_empty()).then(|| excerpt.join("\n"))
}

fn write_results(
    dir: &Path,
    reports: &[KernelReport],
    options: &MatrixOptions,
    elapsed: Duration,
) -> Result<()> {
    let commit = setup::output(
        Command::new("git")
            .args(["-C"])
            .arg(workspace_root())
            .args(["rev-parse", "--short", "HEAD"]),
    )
    .map(|s| s.trim().to_string())
    .unwrap_or_else(|_| "?".into());
    let dirty = setup::output(Command::new("git").arg("-C").arg(workspace_root()).args([
        "status",
        "--porcelain",
        "--untracked-files=no",
    ]))
    .is_ok_and(|s| !s.trim().is_empty());
    let date = setup::output(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let host_kernel = setup::output(Command::new("uname").arg("-r"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let accel = if options.kvm { "KVM" } else { "TCG" };
    let tests = if options.full { "full" } else { "subset" };
    let commit = format!(
        "{commit}{}",
        if dirty { " (with local changes)" } else { "" }
    );

    let json = json!({
        "date": date,
        "commit": commit,
        "host_kernel": host_kernel,
        "accel": accel,
        "tests": tests,
        "seconds": elapsed.as_secs_f64(),
        "passed": reports.iter().all(KernelReport::passed),
        "kernels": reports.iter().map(KernelReport::json).collect::<Vec<_>>(),
    });
    fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(&json)? + "\n",
    )?;

    let secs = |s: Option<f64>| s.map_or("?".into(), |s| format!("{s:.0} s"));
    let mut md = format!(
        "# Kernel matrix\n\n{date}, commit {commit}, host {host_kernel}, {accel}, {tests}, {:.0} s in all.\n\n\
         | Kernel | Release | Package | Result | Boot | Tests run | VM | Passed | Failed | Skipped |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
        elapsed.as_secs_f64()
    );
    for r in reports {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.label,
            r.release,
            r.package,
            if r.passed() { "passed" } else { "**failed**" },
            secs(r.boot_seconds),
            secs(r.run_seconds),
            secs(r.vm_seconds),
            r.count(Outcome::Passed),
            r.tests.len() - r.count(Outcome::Passed) - r.count(Outcome::Skipped),
            r.count(Outcome::Skipped),
        );
    }
    for r in reports {
        let _ = write!(md, "\n## {} ({}, from {})\n\n", r.label, r.release, r.from);
        if let Some(p) = &r.problem {
            let _ = writeln!(md, "```text\n{p}\n```\n");
        }
        if !r.tests.is_empty() {
            md.push_str("| Test | Result | Time |\n|---|---|---|\n");
            for t in &r.tests {
                let _ = writeln!(
                    md,
                    "| {}::{} | {} | {} |",
                    t.binary,
                    t.name,
                    t.outcome.as_str(),
                    t.seconds.map_or(String::new(), |s| format!("{s:.1} s"))
                );
            }
            md.push('\n');
        }
        for t in r.tests.iter().filter(|t| t.note.is_some()) {
            let _ = write!(
                md,
                "{}::{} ({}):\n\n```text\n{}\n```\n\n",
                t.binary,
                t.name,
                t.outcome.as_str(),
                t.note.as_deref().unwrap_or_default()
            );
        }
        if let Some(check) = &r.check {
            let _ = write!(
                md,
                "`memtrace check --format json`:\n\n```json\n{}\n```\n",
                serde_json::to_string_pretty(check)?
            );
        } else if let Some(note) = &r.check_note {
            let _ = writeln!(md, "`memtrace check`: {note}");
        }
    }
    fs::write(dir.join("results.md"), md)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(tests: &[(&str, Outcome)], problem: Option<&str>) -> KernelReport {
        KernelReport {
            label: "6.12",
            from: "trixie",
            package: "linux-image".into(),
            release: "6.12".into(),
            boot_seconds: None,
            run_seconds: None,
            vm_seconds: None,
            tests: tests
                .iter()
                .map(|&(name, outcome)| TestReport {
                    binary: "kernels".into(),
                    name: name.into(),
                    outcome,
                    seconds: Some(1.0),
                    note: None,
                })
                .collect(),
            check: None,
            check_note: None,
            problem: problem.map(str::to_string),
            console: None,
        }
    }

    #[test]
    fn tests_a_stopped_guest_left_run_in_the_next_and_judge_the_kernel() {
        let stop = "the guest stopped before the test script finished";
        let first = report(
            &[
                ("a", Outcome::Passed),
                ("b", Outcome::NotRun),
                ("c", Outcome::NotRun),
            ],
            Some(stop),
        );
        let retry = report(&[("b", Outcome::Passed), ("c", Outcome::Passed)], None);
        let merged = merge_retry(first, &retry, Some(stop));
        assert!(merged.passed(), "{}", merged.text());
        assert!(merged.tests[1].note.as_deref().unwrap().contains(stop));
        // A test the second guest fails still fails the kernel.
        let first = report(
            &[("a", Outcome::Passed), ("b", Outcome::NotRun)],
            Some(stop),
        );
        let retry = report(&[("b", Outcome::Failed)], None);
        assert!(!merge_retry(first, &retry, Some(stop)).passed());
        // A second guest that stopped too leaves the rest not run.
        let first = report(
            &[("b", Outcome::NotRun), ("c", Outcome::NotRun)],
            Some(stop),
        );
        let retry = report(
            &[("b", Outcome::Passed), ("c", Outcome::NotRun)],
            Some(stop),
        );
        let merged = merge_retry(first, &retry, Some(stop));
        assert!(!merged.passed());
        assert!(merged.tests[1].outcome == Outcome::NotRun);
        // A failure that passes on retry passes; the kernel had no stop.
        let first = report(&[("a", Outcome::Failed)], None);
        let retry = report(&[("a", Outcome::Passed)], None);
        assert!(merge_retry(first, &retry, None).passed());
    }

    #[test]
    fn releases_order_by_their_numbers() {
        assert_eq!(natural_cmp("6.12.9+deb13", "6.12.10+deb13"), Ordering::Less);
        assert_eq!(
            natural_cmp("7.3.4+deb13", "7.2.13+deb14"),
            Ordering::Greater
        );
        assert_eq!(
            natural_cmp("6.1.0-57-amd64", "6.1.0-57-amd64"),
            Ordering::Equal
        );
        assert_eq!(
            natural_cmp("5.10.0-9-amd64", "5.10.0-46-amd64"),
            Ordering::Less
        );
    }

    #[test]
    fn results_come_from_the_stamped_log() {
        let out = std::env::temp_dir().join(format!("matrix-test-{}", std::process::id()));
        fs::create_dir_all(&out).unwrap();
        fs::write(out.join("step0.start"), "10.0\n").unwrap();
        fs::write(out.join("step0.rc"), "101\n").unwrap();
        fs::write(
            out.join("step0.log"),
            "10.5 running 3 tests\n\
             50.0 test a_test ... ok\n\
             62.5 test b_test ... FAILED\n\
             63.0 failures:\n\
             63.0 ---- b_test stdout ----\n\
             63.0 thread 'b_test' panicked at tests/e2e/x.rs:1:1:\n\
             63.0 agent starts: NoGroupDead\n\
             63.0 stack backtrace:\n\
             63.0    0: frame\n\
             63.0 failures:\n\
             63.0     b_test\n",
        )
        .unwrap();
        let step = Step {
            binary: "x".into(),
            path: PathBuf::from("/x"),
            tests: vec![
                ("a_test".into(), Needs::Any),
                ("b_test".into(), Needs::Any),
                ("c_test".into(), Needs::SocketMode),
            ],
        };
        let r = step_results(&step, &out, 0, (Some(false), "memtrace check"), false);
        fs::remove_dir_all(&out).unwrap();
        assert!(r[0].outcome == Outcome::Passed && r[0].seconds == Some(40.0));
        assert!(r[1].outcome == Outcome::Failed && r[1].seconds == Some(12.5));
        assert_eq!(
            r[1].note.as_deref(),
            Some("thread 'b_test' panicked at tests/e2e/x.rs:1:1:\nagent starts: NoGroupDead")
        );
        assert!(r[2].outcome == Outcome::Skipped);
    }
}
