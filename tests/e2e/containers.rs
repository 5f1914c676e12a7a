//! Two "pods" made here with real cgroups and pid namespaces, each running
//! the same server (`prefork_pages`): `--cgroup` and `--container` select
//! exactly one, filtered in the kernel (the other's exec is refused there and
//! none of its events arrive), and each traced process carries its cgroup,
//! container, runtime, pod uid, QoS class, in-namespace pid and, from a
//! kubelet-like server, its pod's name and namespace.
use std::{
    io::{Read as _, Write as _},
    net::TcpListener,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use memtrace::model::{cgroups, kubelet::KubeletSettings};
use memtrace_tests::*;

const ID_A: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";
const ID_B: &str = "b0c1d2e3f4a5968778695a4b3c2d1e0fb0c1d2e3f4a5968778695a4b3c2d1e0f";
const UID_A: &str = "5c3a1e9b-7d2f-4a68-9b1c-0e4d2f6a8b3c";
const UID_B: &str = "9e8d7c6b-5a49-4382-a1b0-c9d8e7f6a5b4";

/// A cgroup tree of the test's own under the v2 mount, removed at the end
/// (its processes killed first).
struct Tree {
    root: PathBuf,
}

impl Tree {
    fn new() -> Self {
        let mount = cgroups::v2_mount()
            .expect("this test needs a cgroup v2 hierarchy (cgroup2 in /proc/mounts)");
        let root = mount.join(format!("memtrace-e2e-{}.slice", std::process::id()));
        std::fs::create_dir_all(&root).expect("create a cgroup (root, cgroup v2)");
        Self { root }
    }

    /// Creates `rel` under the tree; returns (its directory, its v2 path).
    fn make(&self, rel: &str) -> (PathBuf, String) {
        let dir = self.root.join(rel);
        std::fs::create_dir_all(&dir).unwrap();
        let mount = cgroups::v2_mount().unwrap();
        let path = format!("/{}", dir.strip_prefix(mount).unwrap().display());
        (dir, path)
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        // Depth first: a cgroup is removed once its children are.
        fn remove(dir: &Path) {
            if let Ok(entries) = std::fs::read_dir(dir) {
                for e in entries.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        remove(&e.path());
                    }
                }
            }
            let _ = std::fs::remove_dir(dir);
        }
        remove(&self.root);
    }
}

/// `prefork_pages` with 2 workers, as pid 1 of a new pid namespace, inside
/// the cgroup `dir`.
fn pod_server(dir: &Path, status: &Path) -> Proc {
    let script = format!(
        "echo 0 > '{}/cgroup.procs' && exec unshare --pid --fork --mount-proc '{}' 2 300 '{}'",
        dir.display(),
        fixtures().bin("prefork_pages").display(),
        status.display()
    );
    Proc::spawn(Command::new("sh").arg("-c").arg(script))
}

/// Host pids of the processes in a cgroup directory.
fn members(dir: &Path) -> Vec<u32> {
    let mut pids: Vec<u32> = std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.parse().ok())
        .collect();
    pids.sort_unstable();
    pids
}

/// The host pids of a pod's prefork_pages (master and 2 workers).
fn server_pids(dir: &Path) -> Vec<u32> {
    let mut pids = Vec::new();
    assert!(
        wait_for(Duration::from_secs(10), || {
            pids = members(dir)
                .into_iter()
                .filter(|&p| {
                    memtrace::model::procinfo::view(p).is_some_and(|v| v.comm == "prefork_pages")
                })
                .collect();
            pids.len() == 3
        }),
        "prefork_pages with 2 workers in {}: {pids:?}",
        dir.display()
    );
    pids
}

/// Answers every request like the kubelet's `/pods` with pod A, once per
/// connection, until the test ends.
fn kubelet_like() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let body = format!(
        r#"{{"kind":"PodList","apiVersion":"v1","metadata":{{}},"items":[{{"metadata":{{"name":"shop-7d9f8c","namespace":"prod","uid":"{UID_A}"}},"spec":{{"containers":[{{"name":"web"}}]}},"status":{{"phase":"Running","qosClass":"Burstable","containerStatuses":[{{"name":"web","containerID":"containerd://{ID_A}","ready":true}}]}}}}]}}"#
    );
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten().take(1000) {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    port
}

#[test]
fn cgroup_and_container_selectors_pick_one_pod_and_label_it() {
    let _serial = serial();
    let tree = Tree::new();
    // Pod A: the kubelet's systemd driver and containerd; pod B: the
    // cgroupfs driver.
    let underscored = UID_A.replace('-', "_");
    let (dir_a, path_a) = tree.make(&format!(
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{underscored}.slice/cri-containerd-{ID_A}.scope"
    ));
    let (dir_b, path_b) = tree.make(&format!("kubepods/besteffort/pod{UID_B}/{ID_B}"));
    let pod_a_slice = path_a.rsplit_once('/').unwrap().0.to_string();

    // The agent first: pod A's server is matched at exec, pod B's refused
    // in the kernel.
    let mut settings = test_settings(&["prefork_pages"]);
    settings.selectors.cgroups = vec![pod_a_slice.clone()];
    settings.kubelet = Some(KubeletSettings {
        url: format!("http://127.0.0.1:{}", kubelet_like()),
        token_file: None,
        insecure_tls: false,
    });
    let agent = AgentHarness::start(settings);
    let (status_a, status_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let _a = pod_server(&dir_a, status_a.path());
    let _b = pod_server(&dir_b, status_b.path());
    let pids_a = server_pids(&dir_a);
    let pids_b = server_pids(&dir_b);

    assert!(
        agent.wait(Duration::from_secs(10), |s| pids_a
            .iter()
            .all(|p| s.registry.get(*p).is_some_and(|w| w.alive()))),
        "pod A's master and workers {pids_a:?} traced"
    );
    // Past a rescan: pod B is never taken, by events or by /proc.
    std::thread::sleep(Duration::from_secs(2));
    let ns_workers: Vec<u32> = worker_files(status_a.path());
    agent.with(|s| {
        let traced: Vec<u32> = s.registry.alive().map(|w| w.pid).collect();
        for p in &pids_b {
            assert!(!traced.contains(p), "pod B's {p} traced: {traced:?}");
            assert!(
                s.tracer.proc_stats(*p).is_none(),
                "pod B's {p} watched in the kernel"
            );
        }
        let counters = s.tracer.counters();
        assert!(
            counters.cgroup_rejected >= 1,
            "pod B's exec refused in the kernel: {counters:?}"
        );
        let mut ns_pids = Vec::new();
        for p in &pids_a {
            let w = s.registry.get(*p).unwrap();
            let pl = w.placement.clone().expect("placement");
            assert_eq!(pl.cgroup, path_a);
            assert_eq!(
                pl.cgroup_id,
                Some(std::fs::metadata(&dir_a).unwrap().ino()),
                "the v2 id is the directory's inode"
            );
            assert_eq!(pl.container_id.as_deref(), Some(ID_A));
            assert_eq!(pl.runtime.as_deref(), Some("containerd"));
            assert_eq!(pl.pod_uid.as_deref(), Some(UID_A));
            assert_eq!(pl.qos.as_deref(), Some("burstable"));
            ns_pids.push((pl.ns_pid.expect("in-namespace pid"), s.registry.role(*p)));
        }
        // The master is pid 1 of its namespace; the workers' pids are the
        // ones they wrote themselves (getpid() inside the namespace).
        ns_pids.sort_unstable_by_key(|(p, _)| *p);
        assert_eq!(ns_pids[0], (1, memtrace::model::workers::Role::Master));
        let workers: Vec<u32> = ns_pids[1..].iter().map(|(p, _)| *p).collect();
        assert_eq!(workers, ns_workers);
    });
    // The kubelet names pod A (read at start, given at the next refresh).
    assert!(
        agent.wait(Duration::from_secs(10), |s| pids_a.iter().all(|p| s
            .registry
            .get(*p)
            .and_then(|w| w.placement.as_ref())
            .is_some_and(|pl| pl.pod_name.as_deref() == Some("shop-7d9f8c")
                && pl.pod_namespace.as_deref() == Some("prod")
                && pl.container_name.as_deref() == Some("web")))),
        "pod name, namespace and container from the kubelet"
    );
    // The labels in the status view and /metrics.
    let status = agent.with(|s| {
        let ws: Vec<_> = s
            .registry
            .alive()
            .map(|w| memtrace::agent::views::worker_status(s, w, true))
            .collect();
        memtrace::api::status::StatusView {
            agent: memtrace::agent::views::agent_status(s),
            workers: ws,
        }
    });
    let metrics = memtrace::api::metrics::render(&status);
    assert!(
        metrics
            .contains("role=\"master\",container=\"web\",pod=\"shop-7d9f8c\",namespace=\"prod\""),
        "{metrics}"
    );
    let master = status
        .workers
        .iter()
        .find(|w| w.role == memtrace::model::workers::Role::Master)
        .expect("the master in the status view");
    let shown = master.placement.as_ref().expect("placement in the status");
    assert_eq!(shown.container_id.as_deref(), Some(ID_A));
    assert_eq!(shown.pod_namespace.as_deref(), Some("prod"));
    drop(agent);

    // --container with an id prefix, agent after the servers: pod B only,
    // found in /proc, its placement from the cgroupfs layout.
    let mut settings = test_settings(&[]);
    settings.selectors.containers = vec![ID_B[..12].to_string()];
    let agent = AgentHarness::start(settings);
    assert!(
        agent.wait(Duration::from_secs(10), |s| pids_b
            .iter()
            .all(|p| s.registry.get(*p).is_some_and(|w| w.alive()))),
        "pod B's server traced by container id"
    );
    agent.with(|s| {
        for p in &pids_a {
            assert!(s.registry.get(*p).is_none(), "pod A's {p} traced");
        }
        let pl = s
            .registry
            .get(pids_b[0])
            .unwrap()
            .placement
            .clone()
            .unwrap();
        assert_eq!(pl.cgroup, path_b);
        assert_eq!(pl.container_id.as_deref(), Some(ID_B));
        assert_eq!(pl.runtime.as_deref(), Some("cri"));
        assert_eq!(pl.pod_uid.as_deref(), Some(UID_B));
        assert_eq!(pl.qos.as_deref(), Some("besteffort"));
        assert_eq!(pl.pod_name, None, "no kubelet configured");
        // The container's cgroup went to the kernel's filter, by its id.
        let ino_b = std::fs::metadata(&dir_b).unwrap().ino();
        assert!(
            s.selected_cgroups.contains(&ino_b),
            "{:?}",
            s.selected_cgroups
        );
        // Everything inside the container is selected (no name given): the
        // `unshare` that started it too.
        assert!(members(&dir_b).iter().all(|p| s.registry.get(*p).is_some()));
    });
}

#[test]
fn an_unreachable_kubelet_is_logged_and_nothing_else_changes() {
    let _serial = serial();
    let closed = free_port();
    let agent = AgentProcess::start(&[
        "agent",
        "--process-name",
        "prefork_pages",
        "--listen",
        "off",
        "--kubelet-url",
        &format!("http://127.0.0.1:{closed}"),
    ]);
    let line = agent.wait_log(Duration::from_secs(15), |l| {
        l["message"]
            .as_str()
            .is_some_and(|m| m.contains("kubelet cannot be reached"))
    });
    let line = line.expect("a clear log line about the kubelet");
    assert!(
        line["url"]
            .as_str()
            .is_some_and(|u| u.contains(&closed.to_string())),
        "{line}"
    );
    let mut agent = agent;
    assert!(
        agent.proc.child.try_wait().unwrap().is_none(),
        "the agent keeps running"
    );
}
