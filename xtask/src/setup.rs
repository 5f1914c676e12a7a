//! `cargo xtask setup`: everything a fresh machine needs to build the eBPF
//! programs and run the tests. Idempotent: each step checks first and does
//! nothing when its result is already there.
use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

/// bpf-linker release known to work with the nightly's LLVM 22.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Debian packages the tests and benchmarks use, by the command (or file) they provide.
const PACKAGES: &[(&str, &str)] = &[
    ("gcc", "gcc"),
    ("gunicorn", "gunicorn"),
    // Production gunicorn sets process titles (`gunicorn: worker [app]`)
    // with it, and the kernel's comm follows the title: tests see that case.
    (
        "/usr/lib/python3/dist-packages/setproctitle/__init__.py",
        "python3-setproctitle",
    ),
    // The application-view tests serve a Django app (Debian's Django 3.2).
    (
        "/usr/lib/python3/dist-packages/django/__init__.py",
        "python3-django",
    ),
    ("wrk", "wrk"),
    // The soft-limit and socket-mode tests run real uWSGI, PHP-FPM and nginx.
    ("uwsgi", "uwsgi"),
    (
        "/usr/lib/uwsgi/plugins/python311_plugin.so",
        "uwsgi-plugin-python3",
    ),
    ("php-fpm8.2", "php-fpm"),
    ("nginx", "nginx"),
    ("tmux", "tmux"),
    ("hyperfine", "hyperfine"),
    ("bpftool", "bpftool"),
    // `go tool pprof` reads the pprof profiles in the profile tests.
    ("go", "golang-go"),
    // `cargo xtask matrix` boots Debian kernels with virtme-ng, which runs
    // QEMU, puts a static busybox in the initramfs and runs depmod on the
    // extracted modules.
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("/bin/busybox", "busybox-static"),
    ("/sbin/depmod", "kmod"),
    // The Python 3.14/3.15 tests run in a Debian sid root it makes.
    ("debootstrap", "debootstrap"),
    // Debian's python3 makes virtualenvs (virtme-ng's, uvicorn's) only with it.
    ("/usr/lib/python3.11/ensurepip/__init__.py", "python3-venv"),
    // The install tests run the image with podman (runc: bookworm's crun
    // refuses hybrid cgroup hosts) and scrape the agent with Prometheus.
    ("podman", "podman"),
    ("runc", "runc"),
    ("prometheus", "prometheus"),
];

/// What `cargo xtask dist` needs besides the eBPF build: ring's C for the
/// static (musl) binary, and buildah for the image.
const DIST_PACKAGES: &[(&str, &str)] = &[("musl-gcc", "musl-tools"), ("buildah", "buildah")];

pub struct SetupOptions {
    /// Install missing Debian packages with apt-get.
    pub apt: bool,
}

pub fn cargo_home() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
}

/// PATH with cargo's bin directory first, so bpf-linker is found by the
/// eBPF build even when the caller's PATH lacks it.
pub fn path_with_cargo_bin() -> std::ffi::OsString {
    let bin = cargo_home().join("bin");
    let mut paths = vec![bin];
    if let Some(old) = env::var_os("PATH") {
        paths.extend(env::split_paths(&old));
    }
    env::join_paths(paths).expect("PATH entries have no ':'")
}

fn run_ok(cmd: &mut Command) -> bool {
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

pub(crate) fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn step(name: &str, f: impl FnOnce() -> Result<bool>) -> Result<()> {
    let t = Instant::now();
    let changed = f().with_context(|| format!("setup step `{name}` failed"))?;
    let what = if changed { "done" } else { "already there" };
    eprintln!("  {name}: {what} ({:.1}s)", t.elapsed().as_secs_f64());
    Ok(())
}

pub fn setup(options: &SetupOptions) -> Result<()> {
    let t = Instant::now();
    eprintln!("memtrace setup:");
    toolchain_steps()?;
    step("Debian packages", || {
        ensure_packages(&[PACKAGES, DIST_PACKAGES].concat(), options.apt)
    })?;
    step("uvicorn virtualenv", ensure_uvicorn)?;
    step(
        "Debian sid root with python3.14 and python3.15",
        ensure_sid_root,
    )?;
    eprintln!("setup complete in {:.1}s", t.elapsed().as_secs_f64());
    Ok(())
}

/// What `cargo xtask dist` needs, and only that: the toolchain pieces,
/// musl-tools and buildah.
pub fn setup_dist(options: &SetupOptions) -> Result<()> {
    eprintln!("memtrace setup for dist:");
    toolchain_steps()?;
    step("Debian packages", || {
        ensure_packages(DIST_PACKAGES, options.apt)
    })
}

/// The eBPF build's nightly, rust-src and bpf-linker; the release's musl
/// target and cargo-deb.
fn toolchain_steps() -> Result<()> {
    step("nightly toolchain", ensure_nightly)?;
    step("rust-src for nightly", ensure_rust_src)?;
    step("bpf-linker", ensure_bpf_linker)?;
    step("musl target (static release binary)", ensure_musl_target)?;
    step("cargo-deb", ensure_cargo_deb)
}

/// Where the socket-mode tests find uvicorn (from PyPI).
pub fn uvicorn_venv() -> PathBuf {
    crate::workspace_root().join("target/uvicorn-venv")
}

/// A virtualenv with uvicorn from PyPI, for the socket-mode tests.
fn ensure_uvicorn() -> Result<bool> {
    let venv = uvicorn_venv();
    if venv.join("bin/uvicorn").is_file() {
        return Ok(false);
    }
    let python = ["python3", "/usr/bin/python3"]
        .into_iter()
        .find(|p| run_ok(Command::new(p).args(["-m", "venv", "--help"])))
        .context("no python3 with the venv module: install python3-venv")?;
    output(Command::new(python).args(["-m", "venv"]).arg(&venv))?;
    output(
        Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "uvicorn==0.54.0"])
            .env("PIP_DISABLE_PIP_VERSION_CHECK", "1"),
    )
    .context("pip could not install uvicorn from PyPI")?;
    Ok(true)
}

/// Where the Python 3.14/3.15 tests find Debian sid's interpreters: a
/// minimal root their apps run in with chroot, like a container.
pub fn sid_root() -> PathBuf {
    crate::workspace_root().join("target/py-sid")
}

/// The Pythons a Debian sid root holds for the tests.
const SID_PYTHONS: &[&str] = &["python3.14", "python3.15"];

/// A Debian sid root with python3.14 and python3.15 (debootstrap from
/// Debian's registry, about two minutes), made once and kept.
fn ensure_sid_root() -> Result<bool> {
    let root = sid_root();
    if SID_PYTHONS
        .iter()
        .all(|p| root.join("usr/bin").join(p).is_file())
    {
        return Ok(false);
    }
    if !crate::is_root() {
        eprintln!("  (debootstrap needs root: the Python 3.14/3.15 tests will say so)");
        return Ok(false);
    }
    let partial = root.with_extension("partial");
    let _ = std::fs::remove_dir_all(&partial);
    output(
        Command::new("debootstrap")
            .args([
                "--variant=minbase",
                &format!("--include={}", SID_PYTHONS.join(",")),
            ])
            .args(["sid"])
            .arg(&partial)
            .arg("http://deb.debian.org/debian"),
    )
    .context("debootstrap could not make a Debian sid root with python3.14 and python3.15")?;
    let _ = std::fs::remove_dir_all(&root);
    std::fs::rename(&partial, &root)?;
    Ok(true)
}

/// Whether the pieces the eBPF build needs are in place (no network, fast).
pub fn build_ready() -> bool {
    nightly_sysroot().is_ok_and(|s| rust_src_dir(&s).is_dir())
        && run_ok(Command::new(cargo_home().join("bin/bpf-linker")).arg("--version"))
}

fn nightly_sysroot() -> Result<PathBuf> {
    let out = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    Ok(PathBuf::from(out.trim()))
}

fn rust_src_dir(sysroot: &Path) -> PathBuf {
    sysroot.join("lib/rustlib/src/rust/library/core")
}

fn ensure_nightly() -> Result<bool> {
    if nightly_sysroot().is_ok() {
        return Ok(false);
    }
    let installed = Command::new("rustup")
        .args(["toolchain", "install", "nightly", "--profile", "minimal"])
        .status()
        .is_ok_and(|s| s.success());
    if !installed || nightly_sysroot().is_err() {
        bail!(
            "no nightly Rust toolchain, and `rustup toolchain install nightly` failed: the eBPF programs need nightly (-Z build-std=core). Install it where rustup's servers are reachable, then run `cargo xtask setup` again"
        );
    }
    Ok(true)
}

fn ensure_rust_src() -> Result<bool> {
    let sysroot = nightly_sysroot()?;
    if rust_src_dir(&sysroot).is_dir() {
        return Ok(false);
    }
    let ok = Command::new("rustup")
        .args(["component", "add", "rust-src", "--toolchain", "nightly"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok || !rust_src_dir(&sysroot).is_dir() {
        bail!(
            "`rustup component add rust-src --toolchain nightly` failed: the eBPF build compiles core from source and needs it"
        );
    }
    Ok(true)
}

/// The nightly's LLVM shared library (file name is its soname) and major version.
fn nightly_llvm() -> Result<(PathBuf, String)> {
    let sysroot = nightly_sysroot()?;
    let lib_dir = sysroot.join("lib");
    let soname = std::fs::read_dir(&lib_dir)
        .with_context(|| format!("cannot list {}", lib_dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so.") && n.contains("rust"))
        })
        .with_context(|| {
            format!(
                "no libLLVM.so.* in {}: the nightly toolchain is incomplete",
                lib_dir.display()
            )
        })?;
    let version = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let major = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .map(str::to_string)
        .context("rustc +nightly -vV does not say its LLVM version")?;
    Ok((soname, major))
}

/// bpf-linker built against the nightly's own LLVM. Its runpath points at
/// `LLVM_PREFIX/lib`, so that directory lives under CARGO_HOME for good.
fn ensure_bpf_linker() -> Result<bool> {
    let linker = cargo_home().join("bin/bpf-linker");
    if run_ok(Command::new(&linker).arg("--version")) {
        return Ok(false);
    }
    let (llvm_lib, major) = nightly_llvm()?;
    let prefix = cargo_home().join("memtrace-llvm");
    let lib = prefix.join("lib");
    std::fs::create_dir_all(&lib).with_context(|| format!("cannot create {}", lib.display()))?;
    let soname = llvm_lib.file_name().expect("a file").to_owned();
    for name in [std::ffi::OsStr::new("libLLVM.so"), soname.as_os_str()] {
        let link = lib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&llvm_lib, &link)
            .with_context(|| format!("cannot link {}", link.display()))?;
    }
    eprintln!(
        "  building bpf-linker {BPF_LINKER_VERSION} against LLVM {major} from {} (about a minute)",
        llvm_lib.display()
    );
    let status = Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
            "--force",
        ])
        .env("LLVM_PREFIX", &prefix)
        .status()
        .context("cannot run cargo install")?;
    if !status.success() || !run_ok(Command::new(&linker).arg("--version")) {
        bail!(
            "building bpf-linker failed: it needs crates.io and a C++ toolchain (g++); see the output above"
        );
    }
    Ok(true)
}

/// cargo-deb release the package metadata in memtrace/Cargo.toml is written for.
const CARGO_DEB_VERSION: &str = "3.8.0";

/// The standard library for `dist::TARGET`, from rustup.
fn ensure_musl_target() -> Result<bool> {
    let sysroot = output(Command::new("rustc").args(["--print", "sysroot"]))?;
    let lib = PathBuf::from(sysroot.trim())
        .join("lib/rustlib")
        .join(crate::dist::TARGET);
    if lib.is_dir() {
        return Ok(false);
    }
    let ok = Command::new("rustup")
        .args(["target", "add", crate::dist::TARGET])
        .status()
        .is_ok_and(|s| s.success());
    if !ok || !lib.is_dir() {
        bail!(
            "`rustup target add {}` failed: `cargo xtask dist` builds a static binary with it",
            crate::dist::TARGET
        );
    }
    Ok(true)
}

/// cargo-deb from crates.io, for the .deb of `cargo xtask dist`.
fn ensure_cargo_deb() -> Result<bool> {
    if run_ok(Command::new(cargo_home().join("bin/cargo-deb")).arg("--version")) {
        return Ok(false);
    }
    eprintln!("  installing cargo-deb {CARGO_DEB_VERSION} from crates.io (about two minutes)");
    let ok = Command::new("cargo")
        .args([
            "install",
            "cargo-deb",
            "--locked",
            "--version",
            CARGO_DEB_VERSION,
        ])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        bail!("`cargo install cargo-deb` failed: it needs crates.io; see the output above");
    }
    Ok(true)
}

/// A command on PATH, or a file when given as an absolute path.
pub(crate) fn have_command(cmd: &str) -> bool {
    if cmd.starts_with('/') {
        return Path::new(cmd).is_file();
    }
    env::var_os("PATH")
        .is_some_and(|paths| env::split_paths(&paths).any(|dir| dir.join(cmd).is_file()))
}

fn ensure_packages(packages: &[(&str, &str)], apt: bool) -> Result<bool> {
    let missing: Vec<&str> = packages
        .iter()
        .filter(|(cmd, _)| !have_command(cmd))
        .map(|&(_, pkg)| pkg)
        .collect();
    if missing.is_empty() {
        return Ok(false);
    }
    if !apt {
        bail!(
            "missing packages: {}; install them with `apt-get install -y {}`",
            missing.join(", "),
            missing.join(" ")
        );
    }
    eprintln!("  installing {}", missing.join(" "));
    let update_ok = Command::new("apt-get")
        .args(["update", "-qq"])
        .status()
        .is_ok_and(|s| s.success());
    let install_ok = Command::new("apt-get")
        .args(["install", "-y", "-qq"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .is_ok_and(|s| s.success());
    if !update_ok || !install_ok {
        bail!(
            "`apt-get install {}` failed (are you root, and can apt reach Debian's mirrors?)",
            missing.join(" ")
        );
    }
    Ok(true)
}
