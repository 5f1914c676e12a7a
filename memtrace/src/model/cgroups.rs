//! Where a process runs: its cgroup (v2 path and id), the container and
//! runtime its cgroup path names (containerd, CRI-O, Docker, Podman, systemd
//! units), the Kubernetes pod uid and QoS class of the kubepods path, and its
//! pid inside its own pid namespace.
//!
//! Hosts differ: cgroup v2 alone (`/sys/fs/cgroup`), hybrid (v1 controllers
//! under /sys/fs/cgroup, v2 at /sys/fs/cgroup/unified), or v1 alone. The v2
//! mount is found in /proc/mounts; on a v1-only host the path of the
//! `name=systemd` (or else the `memory`/`pids`) hierarchy stands in for it,
//! without an id.
use std::{
    os::unix::fs::{DirEntryExt as _, MetadataExt as _},
    path::{Path, PathBuf},
    sync::OnceLock,
};

use serde::Serialize;

/// A process's place among cgroups and containers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Placement {
    /// The cgroup v2 path (`/kubepods.slice/...`), or the v1 stand-in.
    pub cgroup: String,
    /// The cgroup v2 id (the directory's inode), as the kernel's
    /// `bpf_get_current_cgroup_id` gives it; None on v1-only hosts.
    pub cgroup_id: Option<u64>,
    pub container_id: Option<String>,
    /// containerd, cri-o, docker, podman, or `cri` when a kubepods path
    /// names a container without its runtime.
    pub runtime: Option<String>,
    /// The systemd unit the cgroup is (a `.service` or `.scope`).
    pub systemd_unit: Option<String>,
    pub pod_uid: Option<String>,
    /// guaranteed, burstable or besteffort.
    pub qos: Option<String>,
    /// The pid as the process sees it in its own pid namespace (the last of
    /// /proc/PID/status NSpid).
    pub ns_pid: Option<u32>,
    /// From the kubelet's pod list, when the agent has one.
    pub pod_name: Option<String>,
    pub pod_namespace: Option<String>,
    pub container_name: Option<String>,
}

/// Where the cgroup v2 hierarchy is mounted, if anywhere (read once).
pub fn v2_mount() -> Option<&'static Path> {
    static MOUNT: OnceLock<Option<PathBuf>> = OnceLock::new();
    MOUNT
        .get_or_init(|| {
            let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
            v2_mount_in(&mounts)
        })
        .as_deref()
}

/// The first `cgroup2` mount point in a /proc/mounts text.
pub fn v2_mount_in(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut f = line.split_whitespace();
        let (_dev, point, kind) = (f.next()?, f.next()?, f.next()?);
        (kind == "cgroup2").then(|| PathBuf::from(unescape_mount(point)))
    })
}

/// /proc/mounts escapes spaces and the like as octal (`\040`).
fn unescape_mount(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let oct: String = chars.clone().take(3).collect();
            if oct.len() == 3
                && let Ok(v) = u8::from_str_radix(&oct, 8)
            {
                out.push(v as char);
                chars.nth(2);
                continue;
            }
        }
        out.push(c);
    }
    out
}

/// The cgroup path of a /proc/PID/cgroup text: the v2 entry (`0::/path`),
/// else the `name=systemd`, `memory` or `pids` v1 hierarchy's.
pub fn cgroup_path_in(text: &str) -> Option<String> {
    let entries: Vec<(&str, &str)> = text
        .lines()
        .filter_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_id, controllers, path) = (f.next()?, f.next()?, f.next()?);
            Some((controllers, path))
        })
        .collect();
    let v2 = entries.iter().find(|(c, _)| c.is_empty());
    let v1 = || {
        ["name=systemd", "memory", "pids"].iter().find_map(|want| {
            entries
                .iter()
                .find(|(c, _)| c.split(',').any(|x| x == *want))
        })
    };
    v2.or_else(v1).map(|(_, p)| p.to_string())
}

/// Container, runtime, unit, pod and QoS named by a cgroup path, as
/// containerd, CRI-O, Docker, Podman and the kubelet's two cgroup drivers
/// (systemd, cgroupfs) name them.
pub fn parse_path(path: &str) -> Placement {
    let mut p = Placement {
        cgroup: path.to_string(),
        ..Placement::default()
    };
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let mut under_kubepods = false;
    for (i, seg) in segments.iter().enumerate() {
        let unit = seg
            .strip_suffix(".scope")
            .or_else(|| seg.strip_suffix(".service"));
        if unit.is_some() || seg.ends_with(".slice") {
            // systemd driver: kubepods.slice/kubepods-burstable.slice/
            // kubepods-burstable-pod<uid>.slice/cri-containerd-<id>.scope
            if let Some(rest) = seg.strip_prefix("kubepods") {
                under_kubepods = true;
                let rest = rest.trim_end_matches(".slice");
                for qos in ["burstable", "besteffort"] {
                    if rest.starts_with(&format!("-{qos}")) {
                        p.qos = Some(qos.into());
                    }
                }
                if let Some(at) = rest.find("-pod") {
                    p.pod_uid = Some(rest[at + 4..].replace('_', "-"));
                    p.qos.get_or_insert_with(|| "guaranteed".into());
                }
            }
        } else if *seg == "kubepods" {
            under_kubepods = true;
        } else if under_kubepods && (*seg == "burstable" || *seg == "besteffort") {
            p.qos = Some(seg.to_string());
        } else if under_kubepods && let Some(uid) = seg.strip_prefix("pod") {
            // cgroupfs driver: kubepods/burstable/pod<uid>/<id>
            p.pod_uid = Some(uid.to_string());
            p.qos.get_or_insert_with(|| "guaranteed".into());
        }
        if unit.is_some() {
            p.systemd_unit = Some(seg.to_string());
        }
        let name = unit.unwrap_or(seg);
        for (prefix, runtime) in [
            ("cri-containerd-", "containerd"),
            ("crio-", "cri-o"),
            ("docker-", "docker"),
            ("libpod-", "podman"),
        ] {
            if let Some(id) = name.strip_prefix(prefix)
                && is_container_id(id)
            {
                p.container_id = Some(id.to_string());
                p.runtime = Some(runtime.into());
            }
        }
        if is_container_id(seg) {
            // cgroupfs layouts: docker/<id>, kubepods/.../pod<uid>/<id>,
            // libpod_parent/libpod-<id> (above).
            p.container_id = Some(seg.to_string());
            p.runtime = Some(
                match i.checked_sub(1).map(|j| segments[j]) {
                    Some("docker") => "docker",
                    _ if under_kubepods => "cri",
                    _ => "unknown",
                }
                .into(),
            );
        }
    }
    p
}

/// Container ids are 64 hex digits (containerd, CRI-O, Docker, Podman).
fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The last NSpid of a /proc/PID/status text: the pid in the process's own
/// namespace.
pub fn ns_pid_in(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .and_then(|rest| rest.split_whitespace().last())
        .and_then(|p| p.parse().ok())
}

/// The cgroup v2 id of a path in the v2 hierarchy: its directory's inode.
pub fn cgroup_id(path: &str) -> Option<u64> {
    let dir = v2_mount()?.join(path.trim_start_matches('/'));
    std::fs::metadata(dir).ok().map(|m| m.ino())
}

/// Where a live process runs; None when it is gone.
pub fn placement(pid: u32) -> Option<Placement> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let path = cgroup_path_in(&text)?;
    let mut p = parse_path(&path);
    // A v2 id only for a v2 path (not a v1 stand-in).
    if text.lines().any(|l| l.starts_with("0::")) {
        p.cgroup_id = cgroup_id(&path);
    }
    p.ns_pid = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .as_deref()
        .and_then(ns_pid_in);
    Some(p)
}

/// Whether `path` is `subtree` or below it.
pub fn in_subtree(path: &str, subtree: &str) -> bool {
    let subtree = subtree.trim_end_matches('/');
    subtree.is_empty()
        || path == subtree
        || path
            .strip_prefix(subtree)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// A `--cgroup` argument as a v2 path: either already one (`/kubepods.slice`)
/// or a directory under the v2 mount (`/sys/fs/cgroup/unified/kubepods.slice`).
pub fn normalize_selector(arg: &str, mount: Option<&Path>) -> String {
    let trimmed = arg.trim_end_matches('/');
    if let Some(m) = mount
        && let Ok(rest) = Path::new(trimmed).strip_prefix(m)
    {
        return format!("/{}", rest.display());
    }
    if trimmed.is_empty() {
        "/".into()
    } else {
        trimmed.to_string()
    }
}

/// Directories of the v2 hierarchy whose name holds a container id, for a
/// `--container` prefix: (v2 path, cgroup id).
pub fn find_container_cgroups(id_prefix: &str) -> Vec<(String, u64)> {
    let Some(root) = v2_mount() else {
        return Vec::new();
    };
    let mut found = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    // Bounded: a node has thousands of cgroups, not millions.
    let mut budget = 100_000;
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            budget -= 1;
            if budget == 0 {
                return found;
            }
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let path = e.path();
            let rel = format!("/{}", path.strip_prefix(root).unwrap_or(&path).display());
            if let Some(id) = parse_path(&rel).container_id
                && id.starts_with(id_prefix)
                && path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.contains(&id))
            {
                // The cgroup id is the directory's inode, no stat needed.
                found.push((rel, e.ino()));
                continue;
            }
            stack.push(path);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn kubelet_systemd_driver_with_containerd() {
        let path = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1f2e3d4c_5b6a_4789_8abc_def012345678.slice/cri-containerd-{ID}.scope"
        );
        let p = parse_path(&path);
        assert_eq!(p.container_id.as_deref(), Some(ID));
        assert_eq!(p.runtime.as_deref(), Some("containerd"));
        assert_eq!(
            p.pod_uid.as_deref(),
            Some("1f2e3d4c-5b6a-4789-8abc-def012345678")
        );
        assert_eq!(p.qos.as_deref(), Some("burstable"));
        assert_eq!(
            p.systemd_unit.as_deref(),
            Some(format!("cri-containerd-{ID}.scope").as_str())
        );
    }

    #[test]
    fn guaranteed_besteffort_crio_and_cgroupfs() {
        let g = parse_path(&format!(
            "/kubepods.slice/kubepods-pod11111111_2222_3333_4444_555555555555.slice/crio-{ID}.scope"
        ));
        assert_eq!(g.qos.as_deref(), Some("guaranteed"));
        assert_eq!(g.runtime.as_deref(), Some("cri-o"));
        assert_eq!(
            g.pod_uid.as_deref(),
            Some("11111111-2222-3333-4444-555555555555")
        );
        let b = parse_path(&format!(
            "/kubepods/besteffort/pod11111111-2222-3333-4444-555555555555/{ID}"
        ));
        assert_eq!(b.qos.as_deref(), Some("besteffort"));
        assert_eq!(b.runtime.as_deref(), Some("cri"));
        assert_eq!(b.container_id.as_deref(), Some(ID));
        assert_eq!(
            b.pod_uid.as_deref(),
            Some("11111111-2222-3333-4444-555555555555")
        );
    }

    #[test]
    fn docker_podman_and_systemd_units() {
        let d = parse_path(&format!("/system.slice/docker-{ID}.scope"));
        assert_eq!(
            (d.runtime.as_deref(), d.container_id.as_deref()),
            (Some("docker"), Some(ID))
        );
        let d = parse_path(&format!("/docker/{ID}"));
        assert_eq!(d.runtime.as_deref(), Some("docker"));
        let pm = parse_path(&format!("/machine.slice/libpod-{ID}.scope/container"));
        assert_eq!(
            (pm.runtime.as_deref(), pm.container_id.as_deref()),
            (Some("podman"), Some(ID))
        );
        assert_eq!(pm.pod_uid, None);
        let s = parse_path("/system.slice/nginx.service");
        assert_eq!(s.systemd_unit.as_deref(), Some("nginx.service"));
        assert_eq!((s.container_id, s.runtime), (None, None));
        let root = parse_path("/");
        assert_eq!(root.container_id, None);
        // Not a container: a 63-digit name, a conmon scope.
        assert_eq!(parse_path(&format!("/x/{}", &ID[1..])).container_id, None);
    }

    #[test]
    fn proc_cgroup_on_v2_hybrid_and_v1_hosts() {
        assert_eq!(
            cgroup_path_in("0::/user.slice/x.scope\n").as_deref(),
            Some("/user.slice/x.scope")
        );
        let hybrid = "12:pids:/a\n11:memory:/a\n1:name=systemd:/sys/a.scope\n0::/sys/a.scope\n";
        assert_eq!(cgroup_path_in(hybrid).as_deref(), Some("/sys/a.scope"));
        let v1 = "12:pids:/p\n5:cpu,cpuacct:/c\n4:memory:/m\n1:name=systemd:/s.scope\n";
        assert_eq!(cgroup_path_in(v1).as_deref(), Some("/s.scope"));
        assert_eq!(cgroup_path_in("4:memory:/m\n").as_deref(), Some("/m"));
        assert_eq!(cgroup_path_in("garbage"), None);
    }

    #[test]
    fn mounts_ns_pids_and_subtrees() {
        let mounts = "sysfs /sys sysfs rw 0 0\ncgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw,nsdelegate 0 0\n";
        assert_eq!(
            v2_mount_in(mounts),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            v2_mount_in("cgroup /sys/fs/cgroup/memory cgroup rw 0 0\n"),
            None
        );
        assert_eq!(
            v2_mount_in("cgroup2 /mnt/my\\040cg cgroup2 rw 0 0\n"),
            Some(PathBuf::from("/mnt/my cg"))
        );
        assert_eq!(ns_pid_in("Name:\tx\nNSpid:\t4242\t17\t1\n"), Some(1));
        assert_eq!(ns_pid_in("Name:\tx\nNSpid:\t4242\n"), Some(4242));
        assert_eq!(ns_pid_in("Name:\tx\n"), None);
        assert!(in_subtree("/a/b/c", "/a/b"));
        assert!(in_subtree("/a/b", "/a/b/"));
        assert!(!in_subtree("/a/bc", "/a/b"));
        assert!(in_subtree("/anything", "/"));
        let m = Path::new("/sys/fs/cgroup/unified");
        assert_eq!(
            normalize_selector("/sys/fs/cgroup/unified/kubepods.slice/", Some(m)),
            "/kubepods.slice"
        );
        assert_eq!(
            normalize_selector("/kubepods.slice", Some(m)),
            "/kubepods.slice"
        );
    }

    #[test]
    fn our_own_placement_reads() {
        let p = placement(std::process::id()).expect("own cgroup");
        assert!(p.cgroup.starts_with('/'), "{p:?}");
        assert!(p.ns_pid.is_some());
        if v2_mount().is_some() {
            assert!(p.cgroup_id.is_some(), "{p:?}");
        }
    }
}
