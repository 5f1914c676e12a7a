use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

/// Builds the eBPF programs (memtrace-ebpf, for bpfel-unknown-none with the
/// nightly toolchain) into OUT_DIR, as aya-template does, and records what
/// `memtrace --version` tells: the git commit and the target.
fn main() -> anyhow::Result<()> {
    build_info();
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("MetadataCommand::exec")?;
    let ebpf_package = packages
        .into_iter()
        .find(|package| package.name.as_str() == "memtrace-ebpf")
        .ok_or_else(|| anyhow!("memtrace-ebpf package not found"))?;
    let root_dir = ebpf_package
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", ebpf_package.manifest_path))?;
    let package = aya_build::Package {
        name: ebpf_package.name.as_str(),
        root_dir: root_dir.as_str(),
        ..Default::default()
    };
    aya_build::build_ebpf([package], Toolchain::default())
}

/// `MEMTRACE_GIT_COMMIT` (from git, or from the environment for a build
/// outside a checkout, else `unknown`) and `MEMTRACE_BUILD_TARGET`.
fn build_info() {
    println!("cargo:rerun-if-env-changed=MEMTRACE_GIT_COMMIT");
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let commit = std::env::var("MEMTRACE_GIT_COMMIT")
        .ok()
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".into());
    // A new commit or a checkout moves HEAD, or the branch it names (a
    // loose ref or packed-refs). Files that do not exist are not watched:
    // cargo would rerun this script on every build.
    let head = git(&["symbolic-ref", "-q", "HEAD"]);
    for name in ["HEAD", "packed-refs"].into_iter().chain(head.as_deref()) {
        if let Some(p) = git(&["rev-parse", "--git-path", name])
            && std::path::Path::new(&p).exists()
        {
            println!("cargo:rerun-if-changed={p}");
        }
    }
    println!("cargo:rustc-env=MEMTRACE_GIT_COMMIT={commit}");
    let target = std::env::var("TARGET").unwrap_or_default();
    println!("cargo:rustc-env=MEMTRACE_BUILD_TARGET={target}");
}
