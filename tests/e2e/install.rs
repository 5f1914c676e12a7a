//! The release as an SRE installs it (`cargo xtask dist`, which `cargo xtask
//! test` runs first, builds it into target/dist): the .deb installed and
//! removed with dpkg, the OCI image run with podman the way the DaemonSet
//! runs it, and a real Prometheus scraping the agent with the repository's
//! scrape job and answering every Grafana panel's query.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use memtrace_tests::*;
use serde_json::{Value, json};

/// target/dist, as `cargo xtask dist` left it.
fn dist() -> PathBuf {
    let dir = workspace_root().join("target/dist");
    assert!(
        dir.join("BUILD-INFO").is_file(),
        "{} has no release: run `cargo xtask dist` (`cargo xtask test` does)",
        dir.display()
    );
    dir
}

/// The version BUILD-INFO names (`memtrace X.Y.Z`).
fn dist_version() -> String {
    let info = std::fs::read_to_string(dist().join("BUILD-INFO")).unwrap();
    info.lines()
        .next()
        .and_then(|l| l.strip_prefix("memtrace "))
        .expect("BUILD-INFO starts with `memtrace VERSION`")
        .to_string()
}

/// Runs a command and returns its output, whatever its exit status.
fn output(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Runs a command that must succeed; its standard output.
fn ok(cmd: &mut Command) -> String {
    let out = output(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn have(cmd: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file()))
}

/// Processes running `exe` (also after the file was removed: `(deleted)`).
fn processes_running(exe: &str) -> Vec<u32> {
    memtrace::model::procinfo::all_pids()
        .into_iter()
        .filter(|p| {
            std::fs::read_link(format!("/proc/{p}/exe")).is_ok_and(|e| {
                let e = e.to_string_lossy();
                e == exe || e == format!("{exe} (deleted)")
            })
        })
        .collect()
}

/// One GET on the agent's port: status and body as text (0 and the error
/// when it cannot connect: a published port may accept before the agent
/// listens).
fn get(port: u16, path: &str) -> (u16, String) {
    match try_api_get(std::net::SocketAddr::from(([127, 0, 0, 1], port)), path) {
        Ok((code, Value::String(text))) => (code, text),
        Ok((code, json)) => (code, json.to_string()),
        Err(e) => (0, e.to_string()),
    }
}

/// Waits until the agent answers /healthz on the port.
fn wait_healthy(port: u16) -> bool {
    poll_every(SERVER_START, Duration::from_millis(250), || {
        get(port, "/healthz").0 == 200
    })
}

/// Every sample of /metrics text: (name, labels, value).
fn samples(text: &str) -> Vec<(String, BTreeMap<String, String>, f64)> {
    let re = Regex::new(r#"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? ([^ ]+)"#).unwrap();
    let label = Regex::new(r#"([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)""#).unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let c = re.captures(l)?;
            let labels = c
                .get(2)
                .map(|m| {
                    label
                        .captures_iter(m.as_str())
                        .map(|l| (l[1].to_string(), l[2].to_string()))
                        .collect()
                })
                .unwrap_or_default();
            Some((c[1].to_string(), labels, c[3].parse().ok()?))
        })
        .collect()
}

/// The per-worker value of a metric for these pids, summed.
fn sum_for(text: &str, metric: &str, pids: &[u32]) -> f64 {
    samples(text)
        .into_iter()
        .filter(|(n, l, _)| {
            n == metric
                && l.get("pid")
                    .and_then(|p| p.parse::<u32>().ok())
                    .is_some_and(|p| pids.contains(&p))
        })
        .map(|(_, _, v)| v)
        .sum()
}

/// Gunicorn (Debian's, sync workers) on the host and its workers' pids.
fn host_gunicorn(workers: usize, leak_bytes: u64) -> (Proc, u16, Vec<u32>) {
    let port = free_port();
    let server = gunicorn(port, workers, leak_bytes);
    assert!(wait_port(port, SERVER_START), "gunicorn listens");
    let pids = wait_children(server.pid(), workers);
    (server, port, pids)
}

// ---------------------------------------------------------------- .deb

/// Purges the package when the test ends, however it ends.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("dpkg")
            .args(["--purge", "memtrace"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn dpkg_status() -> String {
    let out = output(Command::new("dpkg-query").args(["-W", "-f=${Status}", "memtrace"]));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn deb_installs_runs_and_removes_cleanly() {
    require_root();
    let _serial = serial();
    let version = dist_version();
    let deb = dist().join(format!("memtrace_{version}-1_amd64.deb"));
    assert!(deb.is_file(), "{} is missing", deb.display());
    let before = dpkg_status();
    assert!(
        before.is_empty() || before.ends_with(" not-installed"),
        "a memtrace package is already here ({before}): `dpkg --purge memtrace` first"
    );

    ok(Command::new("dpkg").arg("-i").arg(&deb));
    let _installed = Installed;
    assert_eq!(dpkg_status(), "install ok installed");
    let files: BTreeSet<String> = ok(Command::new("dpkg").args(["-L", "memtrace"]))
        .lines()
        .map(str::to_string)
        .collect();

    // The binary is the release's, byte for byte.
    assert_eq!(
        std::fs::read("/usr/bin/memtrace").unwrap(),
        std::fs::read(dist().join("memtrace")).unwrap(),
        "/usr/bin/memtrace differs from target/dist/memtrace"
    );
    let v = ok(Command::new("/usr/bin/memtrace").arg("--version"));
    eprintln!("installed memtrace --version:\n{v}");
    assert!(
        v.starts_with(&format!("memtrace {version}\ncommit: ")),
        "{v}"
    );
    assert!(v.contains("kernels: Linux 5.10 or later"), "{v}");

    // The unit, pointed at the installed binary, verified by systemd.
    let unit = files
        .iter()
        .find(|f| f.ends_with("/systemd/system/memtrace.service"))
        .unwrap_or_else(|| panic!("no systemd unit in the package: {files:?}"))
        .clone();
    let unit_text = std::fs::read_to_string(&unit).unwrap();
    assert!(
        unit_text
            .lines()
            .any(|l| l == "ExecStart=/usr/bin/memtrace agent"),
        "{unit}: ExecStart is not the installed binary"
    );
    if have("systemd-analyze") {
        let out = output(Command::new("systemd-analyze").args(["verify", &unit]));
        let text = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        // Lines about other units installed here (loaded along) are not ours.
        let ours: Vec<&str> = text.lines().filter(|l| l.contains("memtrace")).collect();
        eprintln!(
            "systemd-analyze verify {unit}: exit {}, {} lines, {} about memtrace",
            out.status,
            text.lines().count(),
            ours.len()
        );
        assert!(
            out.status.success() && ours.is_empty(),
            "systemd-analyze verify {unit}:\n{text}"
        );
    } else {
        eprintln!("SKIP systemd-analyze verify: systemd-analyze is not installed");
    }
    // Stopped before removal when systemd runs it (the package's prerm).
    let prerm = std::fs::read_to_string("/var/lib/dpkg/info/memtrace.prerm").unwrap_or_default();
    assert!(
        prerm.contains("deb-systemd-invoke stop") && prerm.contains("memtrace.service"),
        "the prerm does not stop memtrace.service:\n{prerm}"
    );

    // Man pages and completions.
    let man = "/usr/share/man/man1/memtrace.1.gz";
    assert!(files.contains(man), "no {man}: {files:?}");
    assert!(files.contains("/usr/share/man/man1/memtrace-agent.1.gz"));
    let page = ok(Command::new("zcat").arg(man));
    assert!(
        page.contains(".TH memtrace 1") && page.contains("check"),
        "man page: {page}"
    );
    let bash = ok(Command::new("bash").args([
        "-c",
        "source /usr/share/bash-completion/completions/memtrace && complete -p memtrace",
    ]));
    assert!(
        bash.contains("complete") && bash.contains("memtrace"),
        "{bash}"
    );
    let zsh = std::fs::read_to_string("/usr/share/zsh/vendor-completions/_memtrace").unwrap();
    assert!(zsh.starts_with("#compdef memtrace"), "zsh completion");
    let fish =
        std::fs::read_to_string("/usr/share/fish/vendor_completions.d/memtrace.fish").unwrap();
    assert!(fish.contains("complete -c memtrace"), "fish completion");

    // The settings: a conffile, mode 0600, the shipped example.
    let env_file = "/etc/memtrace/memtrace.env";
    let conffiles = ok(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", "memtrace"]));
    assert!(conffiles.contains(env_file), "conffiles: {conffiles:?}");
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(env_file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::read_to_string(env_file).unwrap(),
        std::fs::read_to_string(workspace_root().join("deploy/memtrace.env.example")).unwrap()
    );

    // `memtrace check` from the installed path.
    let report: Value = serde_json::from_str(&ok(
        Command::new("/usr/bin/memtrace").args(["check", "--format", "json"])
    ))
    .expect("check --format json is JSON");
    let uname = ok(Command::new("uname").arg("-r"));
    assert_eq!(report["kernel"].as_str(), Some(uname.trim()));
    let tracking = report["features"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["feature"] == "process tracking")
        .expect("a process tracking row");
    assert_eq!(tracking["works"], true, "{report:#}");

    // An edit to the settings, as an administrator makes it; then the agent
    // runs as the unit runs it: ExecStart, the env file, SIGTERM to stop.
    let edited =
        std::fs::read_to_string(env_file).unwrap() + "MEMTRACE_PROCESS_NAME=mt-install-none\n";
    std::fs::write(env_file, &edited).unwrap();
    let mut env: Vec<(String, String)> = edited
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let port = free_port();
    env.push(("MEMTRACE_LISTEN".into(), format!("127.0.0.1:{port}")));
    let exec: Vec<&str> = unit_text
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .unwrap()
        .split_whitespace()
        .collect();
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut agent = AgentProcess::start_program(Path::new(exec[0]), &exec[1..], &env_refs, "json");
    assert!(wait_healthy(port), "the installed agent answers /healthz");
    let programs = bpf_fds(agent.proc.pid()).programs;
    assert!(
        !programs.is_empty(),
        "the installed agent holds no BPF program"
    );
    let status = agent
        .proc
        .stop(Duration::from_secs(15))
        .expect("stops within TimeoutStopSec");
    assert!(
        status.success(),
        "the agent exited with {status} after SIGTERM"
    );
    assert_eq!(
        still_loaded(&programs),
        Vec::<u32>::new(),
        "programs left after SIGTERM"
    );

    // Remove: files gone, the edited settings kept, nothing left running.
    ok(Command::new("dpkg").args(["-r", "memtrace"]));
    assert_eq!(dpkg_status(), "deinstall ok config-files");
    for f in ["/usr/bin/memtrace", unit.as_str(), man] {
        assert!(!Path::new(f).exists(), "{f} is left after dpkg -r");
    }
    assert_eq!(
        std::fs::read_to_string(env_file).unwrap(),
        edited,
        "dpkg -r changed the conffile"
    );
    assert_eq!(
        processes_running("/usr/bin/memtrace"),
        Vec::<u32>::new(),
        "memtrace processes after dpkg -r"
    );
    assert_eq!(still_loaded(&programs), Vec::<u32>::new());
    let left = programs_of_removed_binary();
    assert!(
        left.is_empty(),
        "BPF programs held by /usr/bin/memtrace after dpkg -r: {left:?}"
    );

    // Purge: the settings go too.
    ok(Command::new("dpkg").args(["--purge", "memtrace"]));
    assert!(
        !Path::new(env_file).exists(),
        "{env_file} is left after purge"
    );
    assert!(
        !Path::new("/etc/memtrace").exists(),
        "/etc/memtrace is left after purge"
    );
    let after = dpkg_status();
    assert!(
        after.is_empty() || after.ends_with(" not-installed"),
        "after purge: {after}"
    );
}

/// Programs that bpftool says a process running the (removed) installed
/// binary holds; without bpftool, the processes' BPF fds.
fn programs_of_removed_binary() -> Vec<String> {
    let pids = processes_running("/usr/bin/memtrace");
    if !have("bpftool") {
        return pids
            .iter()
            .flat_map(|&p| bpf_fds(p).programs)
            .map(|id| id.to_string())
            .collect();
    }
    let list: Value =
        serde_json::from_str(&ok(Command::new("bpftool").args(["-j", "prog", "show"])))
            .expect("bpftool -j prog show is JSON");
    list.as_array()
        .into_iter()
        .flatten()
        .filter(|p| {
            p["pids"].as_array().into_iter().flatten().any(|o| {
                o["pid"]
                    .as_u64()
                    .is_some_and(|pid| pids.contains(&(pid as u32)))
            })
        })
        .map(|p| format!("{} {}", p["id"], p["name"]))
        .collect()
}

// ---------------------------------------------------------------- image

/// Every document of a YAML file, as JSON values.
fn yaml_documents(path: &Path) -> Vec<Value> {
    use serde::Deserialize as _;
    let text = std::fs::read_to_string(path).unwrap();
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|v| !v.is_null())
        .collect()
}

/// How the DaemonSet runs the agent, read from the manifest.
struct PodSpec {
    image: String,
    args: Vec<String>,
    /// Environment: the ConfigMap (envFrom), then `env` (which wins).
    env: Vec<(String, String)>,
    /// podman options for the mounts, privileges and limits.
    options: Vec<String>,
    port: u16,
    grace_secs: u64,
}

fn daemonset_pod(node_ip: &str) -> PodSpec {
    let docs = yaml_documents(&workspace_root().join("deploy/kubernetes/daemonset.yaml"));
    let by_kind = |k: &str| {
        docs.iter()
            .find(|d| d["kind"] == k)
            .unwrap_or_else(|| panic!("no {k}"))
            .clone()
    };
    let ds = by_kind("DaemonSet");
    let spec = &ds["spec"]["template"]["spec"];
    let c = &spec["containers"][0];
    let mut env = Vec::new();
    for from in c["envFrom"].as_array().into_iter().flatten() {
        let name = from["configMapRef"]["name"]
            .as_str()
            .expect("a ConfigMap reference");
        let cm = docs
            .iter()
            .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no ConfigMap {name}"));
        for (k, v) in cm["data"].as_object().unwrap() {
            env.push((k.clone(), v.as_str().unwrap().to_string()));
        }
    }
    for e in c["env"].as_array().into_iter().flatten() {
        let name = e["name"].as_str().unwrap().to_string();
        let value = if let Some(v) = e["value"].as_str() {
            // Kubernetes expands $(VAR) of variables defined before.
            env.iter().fold(v.to_string(), |v, (k, val)| {
                v.replace(&format!("$({k})"), val)
            })
        } else if e["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP" {
            node_ip.to_string()
        } else if e["valueFrom"]["secretKeyRef"]["optional"] == true {
            // No Secret here: Kubernetes leaves an optional one unset.
            continue;
        } else {
            panic!("env {name}: a source this test does not know: {e}");
        };
        env.retain(|(k, _)| *k != name);
        env.push((name, value));
    }
    let sc = &c["securityContext"];
    let mut options = Vec::new();
    if spec["hostPID"] == true {
        options.push("--pid=host".to_string());
    }
    if sc["privileged"] == true {
        options.push("--privileged".into());
    }
    if sc["readOnlyRootFilesystem"] == true {
        options.push("--read-only".into());
    }
    if let Some(uid) = sc["runAsUser"].as_u64() {
        options.push(format!("--user={uid}"));
    }
    if let Some(mem) = c["resources"]["limits"]["memory"].as_str() {
        let mib = mem.strip_suffix("Mi").expect("a memory limit in Mi");
        options.push(format!("--memory={mib}m"));
    }
    let volumes = spec["volumes"].as_array().unwrap();
    for m in c["volumeMounts"].as_array().unwrap() {
        let v = volumes
            .iter()
            .find(|v| v["name"] == m["name"])
            .expect("the mount's volume");
        let to = m["mountPath"].as_str().unwrap();
        if let Some(host) = v["hostPath"]["path"].as_str() {
            let ro = if m["readOnly"] == true { ":ro" } else { "" };
            options.push(format!("--volume={host}:{to}{ro}"));
        } else if v["emptyDir"]["medium"] == "Memory" {
            let size = v["emptyDir"]["sizeLimit"]
                .as_str()
                .unwrap_or("16Mi")
                .replace("Mi", "m");
            options.push(format!(
                "--mount=type=tmpfs,destination={to},tmpfs-size={size}"
            ));
        } else {
            panic!("volume {v}: a kind this test does not know");
        }
    }
    let port = c["ports"][0]["containerPort"].as_u64().unwrap() as u16;
    PodSpec {
        image: c["image"].as_str().unwrap().to_string(),
        args: c["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_string())
            .collect(),
        env,
        options,
        port,
        grace_secs: spec["terminationGracePeriodSeconds"].as_u64().unwrap(),
    }
}

/// Removes the container and the loaded image when the test ends.
struct Container {
    name: String,
    image: String,
}

impl Drop for Container {
    fn drop(&mut self) {
        for args in [
            vec!["rm", "-f", "-t", "0", &self.name],
            vec!["rmi", "-f", &self.image],
        ] {
            let _ = podman()
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// podman with runc: bookworm's crun refuses hosts with hybrid cgroups.
fn podman() -> Command {
    let mut c = Command::new("podman");
    c.args(["--runtime", "runc"]);
    c
}

/// Limits no higher than this process's: where root lacks CAP_SYS_RESOURCE
/// (inside a container, as on the CI machine) podman's defaults cannot be set.
fn limits() -> Vec<String> {
    let mut nofile = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut nofile) },
        0
    );
    vec![
        "--ulimit".into(),
        format!("nofile={0}:{0}", nofile.rlim_max),
        "--ulimit".into(),
        "nproc=4096:4096".into(),
    ]
}

#[test]
fn image_runs_as_the_daemonset_runs_it_and_traces_gunicorn() {
    require_root();
    let _serial = serial();
    if !have("podman") {
        eprintln!("SKIP the image test: podman is not installed (`cargo xtask setup` installs it)");
        return;
    }
    let version = dist_version();
    let archive = dist().join(format!("memtrace-{version}.oci.tar"));
    assert!(archive.is_file(), "{} is missing", archive.display());
    let pod = daemonset_pod("127.0.0.1");
    let tag = pod.image.rsplit(':').next().unwrap();
    assert_eq!(
        tag, version,
        "the DaemonSet's image tag is not the release's version"
    );

    let loaded = ok(podman().arg("load").arg("-i").arg(&archive));
    let image = loaded
        .lines()
        .find_map(|l| l.strip_prefix("Loaded image: "))
        .unwrap_or_else(|| panic!("podman load: {loaded}"))
        .trim()
        .to_string();
    assert!(image.ends_with(&format!("memtrace:{version}")), "{image}");
    let name = format!("memtrace-install-test-{}", std::process::id());
    let container = Container {
        name: name.clone(),
        image: image.clone(),
    };

    // The image alone: its entrypoint is the binary, the version is the release's.
    let out = output(
        podman()
            .args(["run", "--rm"])
            .args(limits())
            .args([&image, "--version"]),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() && (stderr.contains("OCI") || stderr.contains("runc")) {
        eprintln!(
            "SKIP the image test: podman cannot run a container here: {}",
            stderr.trim()
        );
        return;
    }
    let v = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && v.starts_with(&format!("memtrace {version}\n")),
        "{v}{stderr}"
    );

    let (_server, port, workers) = host_gunicorn(2, 0);
    let host_port = free_port();
    let mut run = podman();
    run.args(["run", "--detach", "--name", &name])
        .args(&pod.options);
    run.args(limits());
    run.arg(format!("--publish=127.0.0.1:{host_port}:{}", pod.port));
    for (k, v) in &pod.env {
        // Two changes, as the ConfigMap's comments tell an operator: its
        // "none" counts no request, so socket mode; and a dry run of the
        // soft limit, since the agent sees every gunicorn on this machine.
        let v = match k.as_str() {
            "MEMTRACE_REQUEST_MODE" => "socket",
            "MEMTRACE_SOFT_LIMIT_ACTION" => "log",
            _ => v.as_str(),
        };
        run.arg(format!("--env={k}={v}"));
    }
    run.arg(&image).args(&pod.args);
    eprintln!("podman {:?}", run.get_args().collect::<Vec<_>>());
    ok(&mut run);
    let _container = container;
    let logs = || {
        let out = output(podman().args(["logs", &name]));
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    };
    assert!(
        wait_healthy(host_port),
        "the agent in the container answers /healthz:\n{}",
        logs()
    );
    let agent_pid: u32 = ok(podman().args(["inspect", "-f", "{{.State.Pid}}", &name]))
        .trim()
        .parse()
        .unwrap();
    assert!(
        std::fs::read_link(format!("/proc/{agent_pid}/exe"))
            .is_ok_and(|e| e.ends_with("usr/bin/memtrace")),
        "the container's pid 1 is not memtrace"
    );

    // Workers found: the master's children, as workers.
    let found = poll_every(Duration::from_secs(60), Duration::from_millis(500), || {
        let (_, m) = get(host_port, "/metrics");
        workers.iter().all(|w| {
            samples(&m).iter().any(|(n, l, _)| {
                n == "memtrace_worker_rss_bytes"
                    && l.get("pid") == Some(&w.to_string())
                    && l.get("role").map(String::as_str) == Some("worker")
                    // comm, as gunicorn's process title sets it.
                    && l.get("name").is_some_and(|n| n.starts_with("gunicorn"))
            })
        })
    });
    assert!(
        found,
        "workers {workers:?} not in /metrics:\n{}\n{}",
        get(host_port, "/metrics").1,
        logs()
    );

    // Requests counted: every one sent, no more.
    let sent = 60;
    drive(port, "/", sent, 2);
    let mut counted = 0.0;
    poll_every(Duration::from_secs(60), Duration::from_millis(250), || {
        counted = sum_for(
            &get(host_port, "/metrics").1,
            "memtrace_worker_requests_total",
            &workers,
        );
        counted >= sent as f64
    });
    std::thread::sleep(Duration::from_millis(500));
    let (code, metrics) = get(host_port, "/metrics");
    counted = sum_for(&metrics, "memtrace_worker_requests_total", &workers);
    assert_eq!(code, 200);
    eprintln!(
        "image {image}: workers {workers:?} found; {counted} requests counted of {sent} sent; /metrics {} bytes",
        metrics.len()
    );
    assert_eq!(
        counted, sent as f64,
        "requests counted by the agent in the container vs sent"
    );
    let rss = sum_for(&metrics, "memtrace_worker_rss_bytes", &workers);
    let truth: u64 = workers.iter().filter_map(|&w| smaps_rss(w)).sum();
    assert!(
        (rss - truth as f64).abs() <= truth as f64 * 0.05,
        "RSS in /metrics {rss} vs smaps_rollup {truth}"
    );

    // Stopped as the kubelet stops it: SIGTERM, then the grace period.
    let programs = bpf_fds(agent_pid).programs;
    assert!(
        !programs.is_empty(),
        "the containerised agent holds no BPF program"
    );
    ok(podman().args(["stop", "-t", &pod.grace_secs.to_string(), &name]));
    let code = ok(podman().args(["inspect", "-f", "{{.State.ExitCode}}", &name]));
    assert_eq!(
        code.trim(),
        "0",
        "the agent's exit code after SIGTERM:\n{}",
        logs()
    );
    assert_eq!(
        still_loaded(&programs),
        Vec::<u32>::new(),
        "programs left after the container stopped"
    );
}

// ---------------------------------------------------------------- Prometheus

/// A Prometheus server on loopback, with its data in a temp dir.
struct Prometheus {
    _proc: Proc,
    port: u16,
}

impl Prometheus {
    fn query(&self, expr: &str) -> Value {
        let q: String = form_urlencoded(expr);
        let (code, v) = api_get(
            std::net::SocketAddr::from(([127, 0, 0, 1], self.port)),
            &format!("/api/v1/query?query={q}"),
        );
        assert_eq!(code, 200, "{expr}: {v}");
        assert_eq!(v["status"], "success", "{expr}: {v}");
        v["data"]["result"].clone()
    }

    fn label_values(&self, label: &str, matcher: &str) -> Vec<String> {
        let (_, v) = api_get(
            std::net::SocketAddr::from(([127, 0, 0, 1], self.port)),
            &format!(
                "/api/v1/label/{label}/values?match[]={}",
                form_urlencoded(matcher)
            ),
        );
        v["data"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(str::to_string))
            .collect()
    }
}

fn form_urlencoded(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Every panel's queries: (panel title, expression), rows' panels included.
fn dashboard_queries() -> Vec<(String, String)> {
    let path = workspace_root().join("deploy/grafana/memtrace-dashboard.json");
    let d: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut panels: Vec<&Value> = d["panels"].as_array().unwrap().iter().collect();
    let nested: Vec<&Value> = panels
        .iter()
        .flat_map(|p| p["panels"].as_array().into_iter().flatten())
        .collect();
    panels.extend(nested);
    panels
        .into_iter()
        .flat_map(|p| {
            p["targets"].as_array().into_iter().flatten().map(move |t| {
                (
                    p["title"].as_str().unwrap().to_string(),
                    t["expr"].as_str().unwrap().to_string(),
                )
            })
        })
        .collect()
}

#[test]
fn prometheus_scrapes_the_agent_and_answers_every_dashboard_panel() {
    require_root();
    let _serial = serial();
    for tool in ["prometheus", "promtool"] {
        assert!(
            have(tool),
            "{tool} is not installed: `cargo xtask setup` installs Debian's prometheus"
        );
    }
    // A leak of 256 KiB a request: slopes, a leak detection, and a soft
    // limit a little above the workers' size, logged (not acted on), so
    // every panel has something to show.
    let leak = 256 * 1024;
    let (server, port, workers) = host_gunicorn(2, leak);
    let biggest = workers.iter().filter_map(|&w| smaps_rss(w)).max().unwrap();
    let soft_limit_mb = (biggest / (1024 * 1024) + 12).to_string();
    let api = free_port();
    let listen = format!("127.0.0.1:{api}");
    let master = server.pid().to_string();
    let agent = AgentProcess::start_program(
        &dist().join("memtrace"),
        &[
            "agent",
            "--pid",
            &master,
            "--request-mode",
            "socket",
            "--listen",
            &listen,
            "--mmap-counters",
            "--soft-limit-mb",
            &soft_limit_mb,
            "--soft-limit-action",
            "log",
            "--leak-warmup-requests",
            "5",
            "--leak-window-size",
            "30",
            "--leak-check-interval",
            "10",
            "--leak-sample-interval-secs",
            "1",
            "--summary-interval-secs",
            "0",
        ],
        &[],
        "json",
    );
    assert!(wait_healthy(api));

    // The repository's `memtrace` job, aimed at this agent, scraped every second.
    let tmp = tempfile::tempdir().unwrap();
    let scrape = yaml_documents(&workspace_root().join("deploy/prometheus/scrape-configs.yml"));
    let mut job = scrape[0]["scrape_configs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["job_name"] == "memtrace")
        .expect("a memtrace job")
        .clone();
    job.as_object_mut().unwrap().remove("file_sd_configs");
    job["static_configs"] = json!([{ "targets": [listen] }]);
    // JSON is YAML: Prometheus reads it as is.
    let config = json!({
        "global": { "scrape_interval": "1s", "evaluation_interval": "1s" },
        "scrape_configs": [job],
    });
    let config_path = tmp.path().join("prometheus.yml");
    std::fs::write(&config_path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
    ok(Command::new("promtool")
        .arg("check")
        .arg("config")
        .arg(&config_path));
    let prom_port = free_port();
    let prometheus = Prometheus {
        _proc: Proc::spawn(
            Command::new("prometheus")
                .arg(format!("--config.file={}", config_path.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    tmp.path().join("tsdb").display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
                .arg("--log.level=warn")
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        ),
        port: prom_port,
    };
    assert!(wait_port(prom_port, SERVER_START), "prometheus listens");
    // It answers 503 until its storage is open.
    assert!(
        poll_every(SERVER_START, Duration::from_millis(250), || get(
            prom_port, "/-/ready"
        )
        .0 == 200),
        "prometheus is not ready"
    );
    // Scraped before the traffic: counters are seen at 0 first, so that
    // increase() and rate() see them rise.
    assert!(
        poll_every(Duration::from_secs(60), Duration::from_millis(250), || {
            prometheus
                .query("up{job=\"memtrace\"} == 1")
                .as_array()
                .is_some_and(|r| r.len() == 1)
        }),
        "Prometheus never scraped the agent"
    );

    let sent = 200;
    drive(port, "/", sent, 2);
    assert!(
        agent
            .wait_log(Duration::from_secs(60), |l| l["message"]
                .as_str()
                .is_some_and(|m| m.contains("LEAK_TREND_DETECTED")))
            .is_some(),
        "no LEAK_TREND_DETECTED for a 256 KiB leak per request"
    );

    // Counted by the agent and stored by Prometheus: every request sent.
    let pids = workers
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join("|");
    let requests =
        format!("sum(memtrace_worker_requests_total{{job=\"memtrace\", pid=~\"{pids}\"}})");
    let mut stored = 0.0;
    poll_every(Duration::from_secs(60), Duration::from_millis(500), || {
        stored = prometheus.query(&requests)[0]["value"][1]
            .as_str()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        stored >= sent as f64
    });
    assert_eq!(stored, sent as f64, "{requests} vs requests sent");

    // The leak slope Prometheus stored is the leak the app makes.
    let slopes = prometheus.query(&format!(
        "memtrace_worker_leak_slope_bytes_per_request{{job=\"memtrace\", pid=~\"{pids}\"}}"
    ));
    for s in slopes.as_array().unwrap() {
        let slope: f64 = s["value"][1].as_str().unwrap().parse().unwrap();
        assert!(
            (slope - leak as f64).abs() <= leak as f64 * 0.10,
            "slope {slope} bytes per request, leak {leak} (±10%): {s}"
        );
    }
    assert!(
        !slopes.as_array().unwrap().is_empty(),
        "no leak slope stored"
    );

    // The dashboard's variables, from Prometheus as Grafana asks them.
    let instances = prometheus.label_values("instance", "memtrace_workers");
    assert_eq!(instances, vec![listen.clone()], "variable instance");
    let names = prometheus.label_values(
        "name",
        &format!(
            "memtrace_worker_rss_bytes{{instance=~\"{}\"}}",
            instances[0]
        ),
    );
    // gunicorn's process titles, in the kernel's 15 bytes.
    assert_eq!(
        names,
        vec!["gunicorn: maste".to_string(), "gunicorn: worke".to_string()],
        "variable name"
    );
    // Every value selected, as Grafana writes a multi-value variable.
    let all_names = format!("({})", names.join("|"));
    let vars = [
        // The whole traffic, so that rates are not zero.
        ("$__rate_interval", "1m"),
        ("$__range", "5m"),
        ("$__interval", "1s"),
        ("$instance", instances[0].as_str()),
        ("$name", all_names.as_str()),
    ];
    // Rates need two scrapes in their window: a few seconds more.
    std::thread::sleep(Duration::from_secs(3));
    let mut empty = Vec::new();
    for (title, expr) in dashboard_queries() {
        let q = vars.iter().fold(expr, |e, (k, v)| e.replace(k, v));
        let mut result = Value::Null;
        poll_every(Duration::from_secs(30), Duration::from_secs(1), || {
            result = prometheus.query(&q);
            result.as_array().is_some_and(|r| !r.is_empty())
        });
        let series: Vec<String> = result
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| {
                let labels: Vec<String> = s["metric"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .filter(|(k, _)| {
                        !["job", "instance", "container", "pod", "namespace"].contains(&k.as_str())
                    })
                    .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                    .collect();
                format!(
                    "{{{}}} {}",
                    labels.join(","),
                    s["value"][1].as_str().unwrap_or("")
                )
            })
            .collect();
        eprintln!(
            "{title}\n  {q}\n  {} series: {}",
            series.len(),
            series.join("; ")
        );
        if series.is_empty() {
            empty.push(title);
        }
    }
    assert!(empty.is_empty(), "dashboard panels without data: {empty:?}");

    // The exposition itself passes Prometheus' own linter.
    let (code, metrics) = get(api, "/metrics");
    assert_eq!(code, 200);
    let mut lint = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    lint.stdin
        .take()
        .unwrap()
        .write_all(metrics.as_bytes())
        .unwrap();
    let out = lint.wait_with_output().unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    eprintln!(
        "promtool check metrics: exit {}, {} bytes checked{}",
        out.status,
        metrics.len(),
        if said.trim().is_empty() {
            ", no findings".to_string()
        } else {
            format!(":\n{said}")
        }
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics:\n{said}"
    );
}
