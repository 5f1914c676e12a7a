//! Processes that lie to the agent, or shape what it reads: it keeps
//! tracing them and everything else.
use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    time::Duration,
};

use memtrace::{kernel::uprobes, model::procinfo};
use memtrace_tests::*;

/// A file at `/`, removed when dropped.
struct RootFile(String);

impl Drop for RootFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A process in a container owns its `/`, so it can map a file named like
/// the kernel names System V shared memory (`/SYSV` and 8 hex digits) but
/// shorter. procfs-core's maps parser slices such a name to 13 bytes and
/// panics; memtrace's own (`procmaps`) takes it. The interpreter is still
/// found and read, and every reader of the process's mappings answers.
#[test]
fn a_file_mapped_under_a_sysv_like_name_leaves_the_process_readable() {
    let _serial = serial();
    let file = RootFile(format!("/SYSV{}", std::process::id() % 1000));
    std::fs::write(&file.0, vec![7u8; 8192]).unwrap();
    let agent = AgentHarness::start(test_settings(&["python3.11"]));
    let script = format!(
        "import mmap, time\n\
         f = open('{}', 'rb')\n\
         m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)\n\
         print('ready', flush=True)\n\
         time.sleep(120)",
        file.0
    );
    let mut p = Proc::spawn(
        Command::new("/usr/bin/python3.11")
            .args(["-c", &script])
            .stdout(Stdio::piped()),
    );
    let out = p.child.stdout.take().unwrap();
    let line = BufReader::new(out).lines().next().unwrap().unwrap();
    assert_eq!(line, "ready");
    let pid = p.pid();
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    assert!(
        maps.contains(&format!(" {}\n", file.0)),
        "the kernel shows the mapping:\n{maps}"
    );

    let mut python = None;
    agent.wait(Duration::from_secs(15), |s| {
        python = s.registry.get(pid).and_then(|w| w.python.clone());
        python.is_some()
    });
    let python = python.expect("the interpreter is found despite the mapping");
    assert!(python.supported, "{python:?}");

    let mappings = procinfo::mappings(pid).expect("smaps is read");
    let ours = mappings
        .iter()
        .find(|m| m.name == file.0)
        .expect("the file's mapping is listed");
    assert_eq!(ours.size, 8192);
    assert!(
        procinfo::code_mappings(pid)
            .iter()
            .any(|m| m.path == "/usr/bin/python3.11")
    );
    assert!(
        uprobes::libc_path(pid).is_some(),
        "libc is found for the allocator probes"
    );
    assert!(
        agent.with(|s| s.registry.get(pid).is_some()),
        "still traced"
    );
}
