//! memtrace developer commands.
//!
//! ```text
//! cargo xtask setup          install what the build and tests need (idempotent)
//! cargo xtask test           unit tests, the end-to-end tests, then the kernel matrix (root)
//! cargo xtask matrix         end-to-end tests on Debian's 5.10, 6.1, 6.12 and 7.x kernels in QEMU
//! cargo xtask run -- ARGS    build in release and run `memtrace ARGS`
//! cargo xtask dist           static binary, .deb, OCI image, man pages, completions in target/dist
//! cargo xtask bench          benchmarks, written to BENCHMARKS.md
//! cargo xtask fuzz           each parser of foreign data under libFuzzer for a while
//! ```
mod bench;
mod dist;
mod fuzz;
mod layout;
mod matrix;
mod setup;

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "memtrace developer commands")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the nightly's rust-src, bpf-linker (built against the nightly's
    /// LLVM) and the Debian packages the tests use. Safe to run again.
    Setup {
        /// Do not install Debian packages; only report missing ones.
        #[arg(long)]
        no_apt: bool,
    },
    /// Build the agent (with its eBPF programs) in release mode.
    Build,
    /// Run the unit tests, then the end-to-end tests against this kernel
    /// (root), then a subset of them on other kernels (`cargo xtask matrix`).
    Test {
        /// Only the unit tests (no root needed).
        #[arg(long)]
        unit: bool,
        /// Skip the kernel matrix.
        #[arg(long)]
        no_matrix: bool,
        /// Only tests whose name contains this (in the matrix too).
        filter: Option<String>,
    },
    /// Boot Debian's kernels (5.10, 6.1, 6.12, newest 7.x) one after another
    /// in QEMU with virtme-ng and run end-to-end tests in each (root); writes
    /// target/matrix/results.md and results.json.
    Matrix {
        /// Only these kernels (5.10, 6.1, 6.12, 7); repeat or separate with commas.
        #[arg(long = "kernel", value_delimiter = ',')]
        kernels: Vec<String>,
        /// Every end-to-end test, not the subset (hours under TCG).
        #[arg(long)]
        full: bool,
        /// Only this test (exact name, any test binary); may be repeated.
        #[arg(long)]
        only: Vec<String>,
        /// Use KVM instead of QEMU's emulation (TCG); fails on nested
        /// hypervisors that cannot run these guests.
        #[arg(long)]
        kvm: bool,
        /// Refresh the apt lists even when less than a day old.
        #[arg(long)]
        refresh: bool,
        /// Seconds each test may take in the guest.
        #[arg(long, default_value_t = matrix::MatrixOptions::default().test_timeout)]
        test_timeout: u64,
        /// Minutes each VM may run before it is killed [default: 20, 240 with --full].
        #[arg(long)]
        vm_timeout: Option<u64>,
    },
    /// Measure memtrace's cost and limits on this machine (root); prints a
    /// report and writes it to BENCHMARKS.tmp.md.
    Bench {
        /// Interleaved rounds per comparison.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Seconds per load run.
        #[arg(long, default_value_t = 8)]
        seconds: u64,
        /// Minutes of the soak run (0 skips it): gunicorn in socket mode
        /// with a leaking route, diffs every 5 minutes, workers recycled at
        /// a soft limit.
        #[arg(long, default_value_t = 0)]
        soak_minutes: u64,
        /// Only the soak (with --soak-minutes, default 60).
        #[arg(long)]
        soak_only: bool,
        /// Only the cost per request: server and agent CPU per request and
        /// throughput, paired with memtrace off on one server instance,
        /// with steal time (the fixture, gunicorn sync and gthread,
        /// uvicorn, a 64 MiB-per-request app).
        #[arg(long)]
        cost_only: bool,
        /// Only the socket programs' kernel statistics (ns per run, runs
        /// per request) on the fixture, gunicorn sync and gthread, and
        /// uvicorn, a few minutes.
        #[arg(long)]
        programs_only: bool,
        /// Only the cost of HTTP path capture: socket mode with and without
        /// it (fixture throughput and per-program cost), a few minutes.
        #[arg(long)]
        paths_only: bool,
        /// Only the steady state and each request mode on the fixture
        /// (table 1's rows without collection) and the socket programs'
        /// kernel cost, a few minutes.
        #[arg(long)]
        modes_only: bool,
        /// Only Python allocation sites against tracemalloc (gunicorn and
        /// uWSGI), a few minutes.
        #[arg(long)]
        python_only: bool,
        /// Only uprobe mode against bare kernel uprobes on the fixture, a
        /// few minutes.
        #[arg(long)]
        uprobe_only: bool,
        /// Only getppid of a process memtrace does not trace, with memtrace
        /// off and on, a few minutes.
        #[arg(long)]
        untraced_only: bool,
        /// Only first-touch page faults of a traced process: memtrace off,
        /// on (the kernel's fault counters read), and on with a program on
        /// every fault, a few minutes.
        #[arg(long)]
        faults_only: bool,
    },
    /// Build a release into target/dist: the static binary, man pages,
    /// completions, a .deb (cargo-deb), an OCI image (buildah) and SHA-256 sums.
    Dist {
        /// Skip the OCI image (no buildah needed).
        #[arg(long)]
        no_image: bool,
    },
    /// Fuzz every parser of data memtrace does not control (cargo-fuzz and
    /// libFuzzer on the nightly toolchain; cargo-fuzz is installed from
    /// crates.io when missing). Writes target/fuzz/report.md.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Only these targets (see memtrace/fuzz/fuzz_targets).
        targets: Vec<String>,
    },
    /// Build in release mode and run memtrace with these arguments.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// A cargo command in the workspace with bpf-linker on PATH.
fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root())
        .env("PATH", setup::path_with_cargo_bin());
    cmd
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

fn ensure_setup() -> Result<()> {
    if !setup::build_ready() {
        setup::setup(&setup::SetupOptions { apt: true })?;
    }
    Ok(())
}

pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Setup { no_apt } => setup::setup(&setup::SetupOptions { apt: !no_apt }),
        Cmd::Build => {
            ensure_setup()?;
            run(cargo().args(["build", "--release", "-p", "memtrace"]))
        }
        Cmd::Dist { no_image } => {
            setup::setup_dist(&setup::SetupOptions { apt: true })?;
            dist::dist(&dist::DistOptions { image: !no_image })
        }
        Cmd::Bench {
            rounds,
            seconds,
            soak_minutes,
            paths_only,
            modes_only,
            python_only,
            uprobe_only,
            untraced_only,
            faults_only,
            soak_only,
            cost_only,
            programs_only,
        } => {
            ensure_setup()?;
            let soak_minutes = match (soak_only, soak_minutes) {
                (true, 0) => 60,
                (_, m) => m,
            };
            bench::bench(&bench::BenchOptions {
                rounds,
                seconds,
                soak_minutes,
                paths_only,
                modes_only,
                python_only,
                uprobe_only,
                untraced_only,
                faults_only,
                soak_only,
                cost_only,
                programs_only,
            })
        }
        Cmd::Fuzz { seconds, targets } => {
            ensure_setup()?;
            fuzz::fuzz(&fuzz::FuzzOptions { seconds, targets }).map(drop)
        }
        Cmd::Run { args } => {
            ensure_setup()?;
            run(cargo().args(["build", "--release", "-p", "memtrace"]))?;
            let bin = workspace_root().join("target/release/memtrace");
            run(Command::new(bin).args(args))
        }
        Cmd::Matrix {
            kernels,
            full,
            only,
            kvm,
            refresh,
            test_timeout,
            vm_timeout,
        } => {
            ensure_setup()?;
            matrix::matrix(&matrix::MatrixOptions {
                kernels,
                full,
                only,
                name_contains: None,
                kvm,
                refresh,
                test_timeout,
                vm_timeout,
            })
        }
        Cmd::Test {
            unit,
            no_matrix,
            filter,
        } => {
            // The agent's folders import only what they may, and nothing
            // imports back (README.md, "Layout").
            layout::check(&workspace_root().join("memtrace/src"))?;
            // Packages needed by the end-to-end tests are installed too.
            setup::setup(&setup::SetupOptions { apt: true })?;
            run(cargo().args([
                "test",
                "--workspace",
                "--exclude",
                "memtrace-ebpf",
                "--exclude",
                "memtrace-tests",
            ]))?;
            if unit {
                return Ok(());
            }
            // Every fuzz target for a short, fixed budget.
            fuzz::fuzz(&fuzz::FuzzOptions {
                seconds: fuzz::CI_SECONDS,
                targets: Vec::new(),
            })?;
            if !is_root() {
                bail!(
                    "the end-to-end tests load eBPF programs and need root: run `sudo -E cargo xtask test` (or `cargo xtask test --unit` for the unit tests alone)"
                );
            }
            // The install tests (tests/e2e/install.rs) take the package,
            // the image and the binary from target/dist.
            dist::dist(&dist::DistOptions { image: true })?;
            run(cargo().args(["build", "-p", "memtrace"]))?;
            let mut cmd = cargo();
            cmd.args(["test", "-p", "memtrace-tests", "--", "--test-threads=1"]);
            if let Some(f) = &filter {
                cmd.arg(f);
            }
            cmd.env(
                "MEMTRACE_BIN",
                workspace_root().join("target/debug/memtrace"),
            );
            run(&mut cmd)?;
            if no_matrix {
                return Ok(());
            }
            matrix::matrix(&matrix::MatrixOptions {
                name_contains: filter,
                ..Default::default()
            })
        }
    }
}
