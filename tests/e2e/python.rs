//! CPython workers: memtrace finds the interpreter each traced process runs
//! (Debian's static python3.11 under gunicorn, libpython3.11 embedded by
//! uWSGI, pyenv's shared 3.12 and 3.13), its exact version from the ELF, and
//! says once, clearly, when it cannot read a build's frames (pyenv's 3.10).
use std::{
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use memtrace::model::python::PythonRuntime;
use memtrace_tests::*;

fn python_of(agent: &AgentHarness, pid: u32) -> Option<PythonRuntime> {
    let mut found = None;
    agent.wait(Duration::from_secs(10), |s| {
        found = s.registry.get(pid).and_then(|w| w.python.clone());
        found.is_some()
    });
    found
}

/// A Python process that prints "ready" and sleeps.
fn sleeper(python: &PathBuf) -> Proc {
    let mut p = Proc::spawn(
        Command::new(python)
            .args([
                "-c",
                "import time; print('ready', flush=True); time.sleep(120)",
            ])
            .stdout(Stdio::piped()),
    );
    let out = p.child.stdout.take().unwrap();
    let line = BufReader::new(out).lines().next().unwrap().unwrap();
    assert_eq!(line, "ready");
    p
}

#[test]
fn gunicorn_workers_run_debians_static_python_311() {
    let _serial = serial();
    let agent = AgentHarness::start(test_settings(&["gunicorn"]));
    let port = free_port();
    let server = gunicorn(port, 2, 0);
    assert!(wait_port(port, SERVER_START));
    let workers = wait_children(server.pid(), 2);
    let version = String::from_utf8(
        Command::new("/usr/bin/python3.11")
            .args(["-c", "import platform; print(platform.python_version())"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    for pid in std::iter::once(server.pid()).chain(workers) {
        let py = python_of(&agent, pid).unwrap_or_else(|| panic!("no interpreter for {pid}"));
        assert_eq!(py.version, version.trim(), "{py:?}");
        assert_eq!(py.binary, PathBuf::from("/usr/bin/python3.11"));
        assert!(py.supported && py.runtime_symbol.is_some(), "{py:?}");
    }
}

#[test]
fn uwsgi_embeds_libpython_311() {
    let _serial = serial();
    let agent = AgentHarness::start(test_settings(&["uwsgi"]));
    let port = free_port();
    let server = uwsgi(port, &["--workers", "2", "--http-socket"], 0);
    assert!(wait_port(port, SERVER_START));
    let workers = wait_children(server.pid(), 2);
    for pid in workers {
        let py = python_of(&agent, pid).unwrap_or_else(|| panic!("no interpreter for {pid}"));
        let lib = py.binary.file_name().unwrap().to_str().unwrap().to_string();
        assert!(lib.starts_with("libpython3.11.so"), "{py:?}");
        assert!(py.version.starts_with("3.11."), "{py:?}");
        assert!(py.supported, "{py:?}");
    }
}

#[test]
fn pyenv_312_and_313_are_read_from_their_shared_libpython() {
    let _serial = serial();
    let agent = AgentHarness::start(test_settings(&["python3.12", "python3.13"]));
    for (minor, cookie) in [("3.12", false), ("3.13", true)] {
        let exe = pyenv_python(minor);
        let p = sleeper(&exe);
        let py = python_of(&agent, p.pid()).unwrap_or_else(|| panic!("no interpreter for {minor}"));
        let truth = exe
            .parent()
            .and_then(|b| b.parent())
            .and_then(|v| v.file_name())
            .unwrap()
            .to_string_lossy()
            .to_string();
        assert_eq!(py.version, truth, "{py:?}");
        assert!(
            py.binary
                .to_string_lossy()
                .contains(&format!("libpython{minor}.so")),
            "{py:?}"
        );
        assert_eq!(
            py.debug_offsets, cookie,
            "_Py_DebugOffsets on 3.13+: {py:?}"
        );
        assert!(py.supported, "{py:?}");
    }
}

#[test]
fn an_unsupported_interpreter_is_named_once_and_the_worker_still_traced() {
    let _serial = serial();
    let agent = AgentProcess::start(&["agent", "--process-name", "python3.10", "--listen", "off"]);
    let exe = pyenv_python("3.10");
    let p = sleeper(&exe);
    let pid = p.pid();
    let about_python = |l: &serde_json::Value| {
        l["pid"] == pid
            && l["message"]
                .as_str()
                .is_some_and(|m| m.contains("cannot read Python frames"))
    };
    let line = agent
        .wait_log(Duration::from_secs(10), about_python)
        .unwrap_or_else(|| panic!("no line about {pid}: {:?}", agent.logs()));
    assert_eq!(line["level"], "WARN", "{line}");
    let reason = line["reason"].as_str().unwrap();
    assert!(reason.contains("older than 3.11"), "{line}");
    assert!(
        line["message"]
            .as_str()
            .unwrap_or_default()
            .contains("native sites only"),
        "{line}"
    );
    // Still traced (RSS from the kernel), and said once.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(agent.count_logs(about_python), 1);
    assert!(agent.count_logs(|l| l["message"] == "worker attached" && l["pid"] == pid) == 1);
}

/// Makes reference cycles and collects them, then prints what the `gc`
/// module says and sleeps: the ground truth for memtrace's reading of the
/// interpreter's GC state from outside.
const GC_SCRIPT: &str = r#"
import gc, json, sys, time
class Node:
    pass
for round in range(5):
    nodes = [Node() for _ in range(1000)]
    for a, b in zip(nodes, nodes[1:] + nodes[:1]):
        a.next = b
    del nodes, a, b
    gc.collect(round % 3)
truth = json.dumps({
    "thresholds": gc.get_threshold(),
    "counts": gc.get_count(),
    "stats": gc.get_stats(),
    "enabled": gc.isenabled(),
})
sys.stdout.write(truth + "\n")
sys.stdout.flush()
time.sleep(120)
"#;

fn gc_truth(python: &std::path::Path) -> (Proc, serde_json::Value) {
    let mut p = Proc::spawn(
        Command::new(python)
            .args(["-c", GC_SCRIPT])
            .stdout(Stdio::piped()),
    );
    let out = p.child.stdout.take().unwrap();
    let line = BufReader::new(out).lines().next().unwrap().unwrap();
    (p, serde_json::from_str(&line).unwrap())
}

#[test]
fn gc_statistics_equal_what_the_gc_module_says() {
    let _serial = serial();
    let agent = AgentHarness::start(test_settings(&["python3.11", "python3.12", "python3.13"]));
    for python in [
        PathBuf::from("/usr/bin/python3.11"),
        pyenv_python("3.12"),
        pyenv_python("3.13"),
    ] {
        let (p, truth) = gc_truth(&python);
        let pid = p.pid();
        let col = |key: &str| -> Vec<i64> {
            truth["stats"]
                .as_array()
                .unwrap()
                .iter()
                .map(|g| g[key].as_i64().unwrap())
                .collect()
        };
        // Read at each refresh: wait for one made after the script's
        // collections (the script is idle from then on).
        let mut gc = None;
        agent.wait(Duration::from_secs(10), |s| {
            gc = s.registry.get(pid).and_then(|w| w.python_gc);
            gc.is_some_and(|g| g.collections.to_vec() == col("collections"))
        });
        let gc = gc.unwrap_or_else(|| panic!("no GC statistics for {}", python.display()));
        let what = python.display();
        assert_eq!(gc.collections.to_vec(), col("collections"), "{what}");
        assert_eq!(gc.collected.to_vec(), col("collected"), "{what}");
        assert_eq!(gc.uncollectable.to_vec(), col("uncollectable"), "{what}");
        // Every round collected its 1000-node cycle (and each its __dict__).
        assert!(gc.collected.iter().sum::<i64>() >= 5000, "{what}: {gc:?}");
        let thresholds: Vec<i32> = serde_json::from_value(truth["thresholds"].clone()).unwrap();
        assert_eq!(gc.thresholds.to_vec(), thresholds, "{what}");
        let counts: Vec<i32> = serde_json::from_value(truth["counts"].clone()).unwrap();
        // Writing the line allocated a few objects after gc.get_count().
        assert_eq!(gc.counts[1..], counts[1..], "{what}");
        assert!(
            (gc.counts[0] - counts[0]).abs() <= 50,
            "{what}: {gc:?} vs {counts:?}"
        );
        assert_eq!(gc.enabled, truth["enabled"].as_bool().unwrap(), "{what}");
    }
}
