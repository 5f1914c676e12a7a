use which::which;

/// Building this crate needs the `bpf-linker` binary (installed by `cargo xtask setup`).
/// Rebuild when it changes, as aya-template does.
fn main() {
    match which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(_) => panic!(
            "bpf-linker is not on PATH: run `cargo xtask setup` (it builds bpf-linker against the nightly's LLVM)"
        ),
    }
}
