//! Start-up checks whose failure a user can fix: privileges. (What the
//! kernel lacks is not a failure: see [`super::features`].)

/// Capability numbers from linux/capability.h.
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error(
        "memtrace needs root, or the capabilities CAP_BPF and CAP_PERFMON (plus CAP_SYS_PTRACE to read other users' /proc and CAP_KILL for soft-limit restarts): run it with sudo, or grant them with `setcap cap_bpf,cap_perfmon,cap_sys_ptrace,cap_kill+ep $(which memtrace)`"
    )]
    NotPrivileged,
}

/// Effective capabilities of this process, from /proc/self/status.
fn effective_caps() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .unwrap_or(0)
}

/// Checks that this process may load and attach BPF programs.
pub fn check_privileges() -> Result<(), PreflightError> {
    let caps = effective_caps();
    let has = |cap: u32| caps & (1u64 << cap) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        Ok(())
    } else {
        Err(PreflightError::NotPrivileged)
    }
}
