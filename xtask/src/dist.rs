//! `cargo xtask dist`: everything a release needs, in `target/dist/`.
//!
//! ```text
//! memtrace                        static binary (musl), eBPF programs inside
//! man/memtrace*.1                 man pages (clap_mangen, from the binary)
//! completions/                    bash, zsh and fish completions (clap_complete)
//! memtrace_<version>-1_amd64.deb  the above, the systemd unit and /etc/memtrace/memtrace.env (conffile)
//! memtrace-<version>.oci.tar      OCI image (FROM scratch + the binary), built with buildah
//! BUILD-INFO                      version, commit, target, linkage
//! SHA256SUMS                      of every file above
//! ```
use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::{cargo, run, setup, workspace_root};

/// The release target: a static binary runs on any distribution's glibc
/// (or none, in a `FROM scratch` image).
pub const TARGET: &str = "x86_64-unknown-linux-musl";

pub struct DistOptions {
    /// Build the OCI image too (needs buildah).
    pub image: bool,
}

/// Builds the release binary (static, musl) and returns its path, not
/// stripped. What users install, and what the soak runs.
pub fn build_static() -> Result<PathBuf> {
    let mut build = cargo();
    build.args(["build", "--release", "-p", "memtrace", "--target", TARGET]);
    // ring's C and assembly for musl.
    if std::env::var_os("CC_x86_64_unknown_linux_musl").is_none() {
        build.env("CC_x86_64_unknown_linux_musl", "musl-gcc");
    }
    run(&mut build)?;
    Ok(workspace_root()
        .join("target")
        .join(TARGET)
        .join("release/memtrace"))
}

/// `target/dist/`.
pub fn dist_dir() -> PathBuf {
    workspace_root().join("target/dist")
}

/// Files the package and the image are made from, outside the dist folder.
fn staging_dir() -> PathBuf {
    workspace_root().join("target/dist-staging")
}

pub fn dist(options: &DistOptions) -> Result<()> {
    let root = workspace_root();
    let dist = dist_dir();
    let staging = staging_dir();
    for dir in [&dist, &staging] {
        if dir.exists() {
            std::fs::remove_dir_all(dir)
                .with_context(|| format!("cannot empty {}", dir.display()))?;
        }
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let version = workspace_version()?;

    // The binary.
    let built = build_static()?;
    let bin = dist.join("memtrace");
    // Symbols of the agent itself are not needed (it symbolizes others).
    run(Command::new("strip").arg("-o").arg(&bin).arg(&built))?;
    let linkage = static_linkage(&bin)?;
    let version_text = setup::output(Command::new(&bin).arg("--version"))?;
    ensure!(
        version_text.starts_with(&format!("memtrace {version}\ncommit: ")),
        "`memtrace --version` does not start with the version and commit: {version_text}"
    );
    let commit = version_text
        .lines()
        .find_map(|l| l.strip_prefix("commit: "))
        .unwrap_or("unknown")
        .to_string();

    // Man pages and completions, from the binary's own command line.
    let man = dist.join("man");
    std::fs::create_dir_all(&man)?;
    run(Command::new(&bin).arg("man-pages").arg(&man))?;
    let man_gz = staging.join("man");
    std::fs::create_dir_all(&man_gz)?;
    let mut pages = Vec::new();
    for entry in std::fs::read_dir(&man)? {
        let page = entry?.path();
        let name = page
            .file_name()
            .expect("a file")
            .to_string_lossy()
            .to_string();
        let gz = std::fs::File::create(man_gz.join(format!("{name}.gz")))?;
        run(Command::new("gzip")
            .args(["-9", "-n", "-c"])
            .arg(&page)
            .stdout(gz))?;
        pages.push(name);
    }
    ensure!(
        pages.iter().any(|p| p == "memtrace.1"),
        "no memtrace.1 among the man pages: {pages:?}"
    );
    let completions = dist.join("completions");
    std::fs::create_dir_all(&completions)?;
    for (shell, file) in [
        ("bash", "memtrace.bash"),
        ("zsh", "_memtrace"),
        ("fish", "memtrace.fish"),
    ] {
        let text = setup::output(Command::new(&bin).args(["completions", shell]))?;
        std::fs::write(completions.join(file), text)?;
    }

    // The unit as the package installs it: the binary is in /usr/bin there.
    let unit = std::fs::read_to_string(root.join("deploy/systemd/memtrace.service"))?;
    ensure!(
        unit.lines()
            .filter(|l| *l == "ExecStart=/usr/local/bin/memtrace agent")
            .count()
            == 1,
        "deploy/systemd/memtrace.service: expected one `ExecStart=/usr/local/bin/memtrace agent` line to point at /usr/bin"
    );
    let systemd = staging.join("systemd");
    std::fs::create_dir_all(&systemd)?;
    std::fs::write(
        systemd.join("memtrace.service"),
        unit.replace("/usr/local/bin/memtrace", "/usr/bin/memtrace"),
    )?;

    // The package.
    // --quiet: the assets outside target/release are meant not to be built.
    run(cargo()
        .args([
            "deb",
            "-p",
            "memtrace",
            "--no-build",
            "--no-strip",
            "--quiet",
            "--output",
        ])
        .arg(&dist))?;
    let deb = dist.join(format!("memtrace_{version}-1_amd64.deb"));
    ensure!(deb.is_file(), "cargo deb did not write {}", deb.display());

    // The image.
    if options.image {
        image(&bin, &version, &commit)?;
    }

    let mut info = String::new();
    writeln!(info, "memtrace {version}")?;
    writeln!(info, "commit: {commit}")?;
    writeln!(info, "target: {TARGET}")?;
    writeln!(info, "linkage: {linkage}")?;
    std::fs::write(dist.join("BUILD-INFO"), info)?;

    let files = files_under(&dist)?;
    let sums = setup::output(Command::new("sha256sum").current_dir(&dist).args(&files))?;
    std::fs::write(dist.join("SHA256SUMS"), sums)?;

    eprintln!("\n{}:", dist.display());
    for f in files
        .iter()
        .chain(std::iter::once(&"SHA256SUMS".to_string()))
    {
        let size = std::fs::metadata(dist.join(f))?.len();
        eprintln!("  {size:>10}  {f}");
    }
    eprintln!("{linkage}");
    Ok(())
}

/// The OCI image, FROM scratch plus the binary, as an oci-archive named
/// `memtrace:<version>` inside.
fn image(bin: &Path, version: &str, commit: &str) -> Result<()> {
    ensure!(
        setup::have_command("buildah"),
        "buildah is not installed: run `cargo xtask setup` (or `cargo xtask dist --no-image`)"
    );
    let context = staging_dir().join("image");
    std::fs::create_dir_all(&context)?;
    std::fs::copy(bin, context.join("memtrace"))?;
    // The commit's time, so the same commit gives the same image.
    let epoch = setup::output(Command::new("git").current_dir(workspace_root()).args([
        "log",
        "-1",
        "--format=%ct",
    ]))
    .map(|s| s.trim().to_string())
    .unwrap_or_else(|_| "0".into());
    let local = format!("localhost/memtrace:{version}");
    run(Command::new("buildah")
        .args(["build", "--quiet", "--timestamp", &epoch])
        .stdout(std::process::Stdio::null())
        .arg("-f")
        .arg(workspace_root().join("deploy/container/Containerfile"))
        .args(["--build-arg", &format!("VERSION={version}")])
        .args(["--build-arg", &format!("REVISION={commit}")])
        .args(["-t", &local])
        .arg(&context))?;
    let archive = dist_dir().join(format!("memtrace-{version}.oci.tar"));
    let pushed = run(Command::new("buildah")
        .args(["push", "--quiet"])
        .arg(&local)
        .arg(format!(
            "oci-archive:{}:memtrace:{version}",
            archive.display()
        )));
    // The archive is the artifact; the local copy is not kept.
    let _ = Command::new("buildah")
        .args(["rmi", &local])
        .stdout(std::process::Stdio::null())
        .status();
    pushed
}

/// Fails unless the binary is static: no interpreter, no shared library.
fn static_linkage(bin: &Path) -> Result<String> {
    use object::{Object as _, ObjectSection as _};
    let data = std::fs::read(bin).with_context(|| format!("cannot read {}", bin.display()))?;
    let file = object::File::parse(&*data).context("the binary is not an object file")?;
    let interp = file.section_by_name(".interp").and_then(|s| s.data().ok());
    let imports = file.imports().context("cannot read the binary's imports")?;
    if interp.is_some() || !imports.is_empty() {
        bail!(
            "{} is not static ({} imported symbols, interpreter {:?}): is the {TARGET} target installed and musl-gcc on PATH?",
            bin.display(),
            imports.len(),
            interp.map(String::from_utf8_lossy)
        );
    }
    Ok(format!(
        "static ({TARGET}): no interpreter, no shared library; runs on any x86_64 Linux, no glibc floor"
    ))
}

/// The workspace's version, from Cargo.toml.
fn workspace_version() -> Result<String> {
    let toml = std::fs::read_to_string(workspace_root().join("Cargo.toml"))?;
    let mut in_package = false;
    for line in toml.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_package = line == "[workspace.package]";
        } else if in_package && let Some(v) = line.strip_prefix("version") {
            let v = v
                .trim_start()
                .trim_start_matches('=')
                .trim()
                .trim_matches('"');
            return Ok(v.to_string());
        }
    }
    bail!("no version in [workspace.package] of Cargo.toml")
}

/// Every file under `dir`, relative, sorted.
fn files_under(dir: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let rel = path.strip_prefix(dir).expect("under dir");
                out.push(rel.to_string_lossy().to_string());
            }
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workspace_version_is_cargo_tomls() {
        let v = workspace_version().unwrap();
        assert!(
            v.split('.').count() == 3 && v.split('.').all(|p| p.parse::<u32>().is_ok()),
            "{v}"
        );
    }

    #[test]
    fn a_dynamic_binary_is_refused() {
        // This test binary is linked against glibc.
        let me = std::env::current_exe().unwrap();
        let err = static_linkage(&me).unwrap_err().to_string();
        assert!(err.contains("is not static"), "{err}");
    }
}
