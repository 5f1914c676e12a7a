//! Python file:line allocation sites, against tracemalloc in the same app.
//!
//! The fixture (`tests/fixtures/pyleak_app.py`) leaks large strings (over
//! 512 bytes: the C library's malloc) or many 464-byte objects (pymalloc)
//! at known lines, and measures the same leak with tracemalloc on request
//! (`/tracemalloc`, before memtrace collects). memtrace's top Python site
//! after a snapshot and R leaking requests must be tracemalloc's top line,
//! with R times its bytes within 15% — on Debian's gunicorn (static
//! python3.11, whose PGO build inlines pymalloc: small objects show through
//! the pages they touch), uWSGI's embedded libpython3.11, and pyenv's 3.12
//! and 3.13 (shared libpython; stdlib wsgiref server), in the pymalloc
//! tier; in the heap tier small objects show through their pages. A worker
//! whose interpreter memtrace cannot read gets one clear line and native
//! sites.
use std::{
    net::SocketAddr,
    process::{Command, Stdio},
    time::Duration,
};

use memtrace::{
    agent::{Agent, AgentSettings},
    kernel::loader::CollectTier,
};
use memtrace_tests::*;

const TOKEN: &str = "e2e-token";
/// Heap sampling interval of these tests: small enough that the estimates'
/// sampling error stays a few percent at these leak sizes.
const SAMPLE_BYTES: u64 = 16 * 1024;

fn get(addr: SocketAddr, path: &str) -> (u16, serde_json::Value) {
    let sep = if path.contains('?') { '&' } else { '?' };
    api_get(addr, &format!("{path}{sep}token={TOKEN}"))
}

fn start_agent(names: &[&str]) -> (AgentHarness, SocketAddr) {
    start_agent_collecting(names, CollectTier::Pymalloc)
}

fn start_agent_collecting(names: &[&str], tier: CollectTier) -> (AgentHarness, SocketAddr) {
    start_agent_sampling(names, tier, SAMPLE_BYTES)
}

fn start_agent_sampling(
    names: &[&str],
    tier: CollectTier,
    sample_bytes: u64,
) -> (AgentHarness, SocketAddr) {
    let mut settings: AgentSettings = test_settings(names);
    settings.load.collect = tier;
    settings.listen = Some("127.0.0.1:0".parse().unwrap());
    settings.api_token = memtrace::api::Token::new(Some(TOKEN.into()));
    settings.load.heap_sample_bytes = sample_bytes;
    let core = Agent::start(settings).expect("agent starts");
    let addr = core.api_addr().expect("API bound");
    (AgentHarness::from_agent(core), addr)
}

/// tracemalloc's top line for one leak call, measured by the app itself.
#[derive(Debug)]
struct Truth {
    file: String,
    line: u64,
    size: u64,
    count: u64,
}

fn tracemalloc_top(port: u16, query: &str) -> Truth {
    let body = http_get(port, &format!("/tracemalloc?{query}")).expect("fixture answers");
    let json = body.split("\r\n\r\n").nth(1).unwrap_or(&body);
    let top: serde_json::Value = serde_json::from_str(json.trim()).expect("JSON from the app");
    let t = &top[0];
    Truth {
        file: t["file"].as_str().unwrap().to_string(),
        line: t["line"].as_u64().unwrap(),
        size: t["size_diff"].as_i64().unwrap() as u64,
        count: t["count_diff"].as_i64().unwrap() as u64,
    }
}

/// The worker's status once its Python frames are read by the kernel.
fn python_ready(addr: SocketAddr, pid: u32) -> serde_json::Value {
    let mut status = serde_json::Value::Null;
    let ready = wait_for(Duration::from_secs(15), || {
        let (code, body) = get(addr, &format!("/debug/memory/?action=status&pid={pid}"));
        status = body["workers"][0].clone();
        code == 200 && status["python_frames"] == true
    });
    assert!(ready, "Python frames never set up for {pid}: {status}");
    status
}

/// Which diff list holds a leak: heap sites, or first-touched pages for
/// small objects of a build whose pymalloc is not probed.
fn list_for(kind: &str, pymalloc_probed: bool) -> &'static str {
    if kind == "small" && !pymalloc_probed {
        "fault_growth"
    } else {
        "growth"
    }
}

/// Measures `kind` with tracemalloc, then with memtrace over `reqs`
/// requests of the same leak, and compares. Returns the matched site.
fn compare(
    addr: SocketAddr,
    port: u16,
    pid: u32,
    kind: &str,
    query: &str,
    reqs: u64,
) -> serde_json::Value {
    let status = python_ready(addr, pid);
    let probed = status["pymalloc_probed"] == true;
    let truth = tracemalloc_top(port, &format!("kind={kind}&{query}"));
    assert!(
        truth.file.ends_with("pyleak_app.py"),
        "tracemalloc's top line is the fixture's: {truth:?}"
    );
    let (code, _) = get(addr, &format!("/debug/memory/?action=snapshot&pid={pid}"));
    assert_eq!(code, 200);
    for _ in 0..reqs {
        http_get(port, &format!("/{kind}?{query}")).expect("leak request");
    }
    let (code, diff) = get(addr, &format!("/debug/memory/?action=diff&pid={pid}"));
    assert_eq!(code, 200);
    let list = list_for(kind, probed);
    let top = diff[list][0].clone();
    let want_location = format!("{}:{}", truth.file, truth.line);
    assert_eq!(
        top["location"].as_str(),
        Some(want_location.as_str()),
        "{kind} (pymalloc probed: {probed}): memtrace's top {list} site is tracemalloc's top line; diff: {diff}"
    );
    assert_eq!(top["module"].as_str(), Some("[python]"), "{top}");
    let want = truth.size * reqs;
    let got = top["growth_bytes"].as_i64().unwrap() as f64;
    let ratio = got / want as f64;
    eprintln!(
        "{kind} pid {pid} {list}: memtrace {got} B vs tracemalloc {want} B ({ratio:.3}); objects {} vs {}",
        top["growth_objects"],
        truth.count * reqs
    );
    assert!(
        (0.85..=1.15).contains(&ratio),
        "{kind}: memtrace {got} bytes at {want_location}, tracemalloc {want} ({ratio:.3}): {top}"
    );
    // Counts of many objects only: a few sampled tiny blocks at the same
    // line (an int, a frame) scale to hundreds each and swamp a count of
    // 200 large strings, while their bytes do not matter.
    if list == "growth" && kind == "small" {
        let objects = top["growth_objects"].as_i64().unwrap() as f64 / (truth.count * reqs) as f64;
        assert!(
            (0.85..=1.15).contains(&objects),
            "{kind}: count {objects:.3} of tracemalloc's: {top}"
        );
    }
    // The calling Python frames follow, innermost first; no native frame
    // by default.
    let stack: Vec<&str> = top["stack"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f.as_str())
        .collect();
    assert!(
        stack.len() >= 3
            && stack[1].contains("pyleak_app.py:")
            && stack[1].ends_with(" run")
            && stack.iter().all(|f| !f.contains(" [")),
        "Python frames only, callers after the leak: {stack:?}"
    );
    let (code, _) = get(addr, "/debug/memory/?action=stop");
    assert_eq!(code, 200);
    top
}

fn both_fixtures(addr: SocketAddr, port: u16, pid: u32) {
    compare(addr, port, pid, "large", "n=20&size=100000", 10);
    compare(addr, port, pid, "small", "n=20000", 5);
}

/// Debian's gunicorn, one sync worker, serving `app` (`module:callable`)
/// of the fixtures.
fn fixture_gunicorn(port: u16, app: &str) -> Proc {
    Proc::spawn(
        Command::new("gunicorn")
            .args(["--workers", "1", "--worker-class", "sync"])
            .arg("--bind")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--chdir")
            .arg(Fixtures::source(""))
            .arg(app)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
}

#[test]
fn gunicorn_debian_python_311_sites_match_tracemalloc() {
    let _serial = serial();
    let (_agent, addr) = start_agent(&["gunicorn"]);
    let port = free_port();
    let server = fixture_gunicorn(port, "pyleak_app:app");
    assert!(wait_port(port, SERVER_START));
    let worker = wait_children(server.pid(), 1)[0];
    let status = python_ready(addr, worker);
    assert_eq!(
        status["pymalloc_probed"], false,
        "Debian's PGO python3.11 inlines pymalloc: not probed"
    );
    both_fixtures(addr, port, worker);
}

/// uWSGI with one worker serving the fixture: its port and its master.
fn fixture_uwsgi() -> (u16, Proc) {
    let port = free_port();
    let server = uwsgi_app(
        port,
        "pyleak_app.py",
        &["--workers", "1", "--http-socket"],
        0,
    );
    assert!(wait_port(port, SERVER_START));
    (port, server)
}

#[test]
fn heap_tier_finds_small_python_objects_through_their_pages() {
    // The default tier does not trap every Python allocation: small objects
    // are found by the pages they touch, at the same line.
    let _serial = serial();
    let (_agent, addr) = start_agent_collecting(&["uwsgi"], CollectTier::Heap);
    let (port, server) = fixture_uwsgi();
    let worker = wait_children(server.pid(), 1)[0];
    let status = python_ready(addr, worker);
    assert_eq!(status["pymalloc_probed"], false, "heap tier: {status}");
    compare(addr, port, worker, "small", "n=20000", 5);
}

#[test]
fn uwsgi_libpython_311_sites_match_tracemalloc() {
    let _serial = serial();
    let (_agent, addr) = start_agent(&["uwsgi"]);
    let (port, server) = fixture_uwsgi();
    let worker = wait_children(server.pid(), 1)[0];
    let status = python_ready(addr, worker);
    assert_eq!(
        status["pymalloc_probed"], true,
        "libpython3.11.so calls pymalloc through its table"
    );
    both_fixtures(addr, port, worker);
}

/// pyenv's interpreter of `minor` serving the fixture with wsgiref.
fn pyenv_server(minor: &str, port: u16) -> Proc {
    let python = pyenv_python(minor);
    let serve = format!(
        "import wsgiref.simple_server as s, pyleak_app as a\n\
         class Quiet(s.WSGIRequestHandler):\n    def log_message(self, *args): pass\n\
         s.make_server('127.0.0.1', {port}, a.app, handler_class=Quiet).serve_forever()"
    );
    Proc::spawn(
        Command::new(python)
            .args(["-c", &serve])
            .current_dir(Fixtures::source(""))
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
}

#[test]
fn pyenv_312_and_313_sites_match_tracemalloc() {
    let _serial = serial();
    let (_agent, addr) = start_agent(&["python3.12", "python3.13"]);
    for minor in ["3.12", "3.13"] {
        let port = free_port();
        let server = pyenv_server(minor, port);
        assert!(wait_port(port, SERVER_START), "{minor} serves");
        let status = python_ready(addr, server.pid());
        assert_eq!(status["pymalloc_probed"], true, "{minor}: {status}");
        both_fixtures(addr, port, server.pid());
    }
}

#[test]
fn an_unreadable_interpreter_keeps_native_sites() {
    let _serial = serial();
    // pyenv's 3.10: older than the frame layouts memtrace reads.
    let (agent, addr) = start_agent(&["python3.10"]);
    let port = free_port();
    let server = pyenv_server("3.10", port);
    assert!(wait_port(port, SERVER_START));
    let pid = server.pid();
    let known = agent.wait(Duration::from_secs(15), |s| {
        s.registry.get(pid).is_some_and(|w| w.python.is_some())
    });
    assert!(known, "the 3.10 interpreter is found");
    let (_, status) = get(addr, &format!("/debug/memory/?action=status&pid={pid}"));
    let w = &status["workers"][0];
    assert_eq!(w["python"]["supported"], false, "{w}");
    assert_eq!(w["python_frames"], false, "{w}");
    assert_native_sites(addr, port, pid, "3.10");
}

/// A leak of 20 MB of large strings in a worker whose frames are not read:
/// its top heap site is native, and the worker still runs.
fn assert_native_sites(addr: SocketAddr, port: u16, pid: u32, what: &str) {
    let (code, _) = get(addr, &format!("/debug/memory/?action=snapshot&pid={pid}"));
    assert_eq!(code, 200);
    for _ in 0..10 {
        http_get(port, "/large?n=20&size=100000").expect("leak request");
    }
    let (code, diff) = get(addr, &format!("/debug/memory/?action=diff&pid={pid}"));
    assert_eq!(code, 200);
    let top = &diff["growth"][0];
    assert!(
        top["growth_bytes"].as_i64().unwrap_or(0) > 10_000_000,
        "{what}: the 20 MB leak is a native heap site: {diff}"
    );
    assert_ne!(top["module"].as_str(), Some("[python]"), "{what}: {top}");
    assert!(procinfo_alive(pid), "{what}: the worker still runs");
}

fn procinfo_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

// ── The application view, on a Django app ───────────────────────────

/// tracemalloc's figures for one `/quote` of the Django fixture: its
/// innermost line (`lineno`) and the growth grouped by the innermost frame
/// of the app's own file (`traceback`, grouped by that frame).
fn django_truth(port: u16, n: u64) -> serde_json::Value {
    let body = http_get(port, &format!("/tracemalloc?n={n}")).expect("fixture answers");
    let json = body.split("\r\n\r\n").nth(1).unwrap_or(&body);
    serde_json::from_str(json.trim()).expect("JSON from the app")
}

fn location(truth: &serde_json::Value) -> String {
    format!("{}:{}", truth["file"].as_str().unwrap(), truth["line"])
}

/// The top site of a diff's heap growth, with its bytes against `truth`
/// times `reqs` (within 15%).
fn assert_top_matches(
    addr: SocketAddr,
    diff: &serde_json::Value,
    truth: &serde_json::Value,
    reqs: u64,
    what: &str,
) {
    let top = &diff["growth"][0];
    assert_eq!(
        top["location"].as_str(),
        Some(location(truth).as_str()),
        "{what}: the top site is tracemalloc's; diff: {diff}"
    );
    let want = truth["size_diff"].as_i64().unwrap() as f64 * reqs as f64;
    let got = top["growth_bytes"].as_i64().unwrap() as f64;
    eprintln!(
        "{what}: memtrace {got} B vs tracemalloc {want} B ({:.3})",
        got / want
    );
    // The kernel's counters say whether samples were dropped or their
    // stacks not kept.
    let (_, status) = get(addr, "/debug/memory/?action=status");
    assert!(
        (0.85..=1.15).contains(&(got / want)),
        "{what}: memtrace {got} bytes, tracemalloc {want}: {top}; all growth: {}; kernel: {}",
        diff["growth"],
        status["agent"]["kernel"]
    );
}

/// No Python frame stays an address without its reason, in any list.
fn assert_unresolved_say_why(diff: &serde_json::Value) {
    let mut counted = 0;
    for list in ["growth", "fault_growth", "mapping_call_growth"] {
        for site in diff[list].as_array().into_iter().flatten() {
            for frame in site["stack"].as_array().into_iter().flatten() {
                let f = frame.as_str().unwrap_or("");
                if f.starts_with("0x") && f.contains("[python]") {
                    counted += 1;
                    assert!(
                        f.ends_with("before it was read)") || f.ends_with("not readable)"),
                        "an unresolved Python frame says why: {f}"
                    );
                }
            }
        }
    }
    assert!(
        diff["unresolved"]["frames"].as_u64().unwrap_or(0) >= counted,
        "the header counts them: {counted} shown, {}",
        diff["unresolved"]
    );
}

/// Snapshot; N `/quote` and CACHE_SIZE `/warm`; a diff in the app view
/// (the view's line, via json's); the same again with the cache full: the
/// cache's site is marked stopped, and left out with `still_growing`; then
/// `/quote` alone and a `lineno` diff: json/encoder.py's line, as
/// tracemalloc's `lineno`.
fn application_view(addr: SocketAddr, port: u16, pid: u32) {
    python_ready(addr, pid);
    const N: u64 = 1000;
    const REQS: u64 = 10;
    let truth = django_truth(port, N);
    assert!(
        truth["app"]["file"]
            .as_str()
            .unwrap()
            .ends_with("django_app.py"),
        "{truth}"
    );
    let (code, _) = get(addr, &format!("/debug/memory/?action=snapshot&pid={pid}"));
    assert_eq!(code, 200);
    let round = || {
        for i in 0..REQS {
            http_get(port, &format!("/quote?n={N}")).expect("quote");
            if i % 2 == 0 {
                http_get(port, "/warm").expect("warm");
            }
        }
    };
    round();
    let (code, first) = get(addr, &format!("/debug/memory/?action=diff&pid={pid}"));
    assert_eq!(code, 200, "{first}");
    assert_eq!(first["view"], "app");
    assert_top_matches(addr, &first, &truth["app"], REQS, "app view");
    let top = &first["growth"][0];
    assert!(
        top["via"]
            .as_str()
            .is_some_and(|v| v.starts_with("json/encoder.py:")),
        "named via json's line: {top}"
    );
    assert_eq!(top["function"], "keep_quote", "{top}");
    assert_unresolved_say_why(&first);
    let cache = |diff: &serde_json::Value| {
        diff["growth"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["function"] == "warm")
            .cloned()
    };
    let warm = cache(&first).expect("the cache grew in the first diff");
    assert_eq!(warm["stopped"], false, "{warm}");

    round();
    let (_, second) = get(
        addr,
        &format!("/debug/memory/?action=diff&pid={pid}&limit=50"),
    );
    assert_top_matches(addr, &second, &truth["app"], REQS, "app view, second diff");
    let warm = cache(&second).expect("the cache's site is listed, marked");
    assert_eq!(warm["stopped"], true, "the cache stopped growing: {warm}");
    assert!(warm["last_grew_unix"].as_f64().is_some(), "{warm}");
    assert_eq!(second["growth"][0]["stopped"], false);
    assert_unresolved_say_why(&second);

    round();
    let (_, third) = get(
        addr,
        &format!("/debug/memory/?action=diff&pid={pid}&limit=50&still_growing=true"),
    );
    assert!(cache(&third).is_none(), "still_growing hides it: {third}");

    for _ in 0..REQS {
        http_get(port, &format!("/quote?n={N}")).expect("quote");
    }
    let (_, lineno) = get(
        addr,
        &format!("/debug/memory/?action=diff&pid={pid}&view=lineno"),
    );
    assert_eq!(lineno["view"], "lineno");
    assert_top_matches(addr, &lineno, &truth["lineno"], REQS, "lineno view");
    assert!(lineno["growth"][0]["via"].is_null(), "{lineno}");
    let (code, _) = get(addr, "/debug/memory/?action=stop");
    assert_eq!(code, 200);
}

/// The Django tests compare views, not sampling: the heap tier records
/// every allocation (the kept strings are malloc's; at 16 KiB sampling
/// one 94 KB string in 350 is not sampled, a tenth of a 10-request diff).
fn start_django_agent(names: &[&str]) -> (AgentHarness, SocketAddr) {
    start_agent_sampling(names, CollectTier::Heap, 1)
}

#[test]
fn django_on_gunicorn_names_the_application_line() {
    let _serial = serial();
    let (_agent, addr) = start_django_agent(&["gunicorn"]);
    let port = free_port();
    let server = fixture_gunicorn(port, "django_app:application");
    assert!(wait_port(port, SERVER_START));
    let worker = wait_children(server.pid(), 1)[0];
    let status = python_ready(addr, worker);
    assert_eq!(
        status["python"]["prefix"], "/usr",
        "Debian's python3.11 has its prefix at /usr: {status}"
    );
    application_view(addr, port, worker);
}

#[test]
fn django_on_uwsgi_names_the_application_line() {
    let _serial = serial();
    let (_agent, addr) = start_django_agent(&["uwsgi"]);
    let port = free_port();
    let server = uwsgi_app(
        port,
        "django_app.py",
        &["--workers", "1", "--http-socket"],
        0,
    );
    assert!(wait_port(port, SERVER_START));
    let worker = wait_children(server.pid(), 1)[0];
    application_view(addr, port, worker);
}

/// Debian sid's python`minor` serving the fixture `module` (wsgiref),
/// chrooted into `root`; its port.
fn sid_server(root: &std::path::Path, minor: &str, module: &str) -> (u16, Proc) {
    let port = free_port();
    let python = format!("/usr/bin/python{minor}");
    let server = chroot_wsgi_server(root, &python, module, port);
    assert!(wait_port(port, SERVER_START), "{minor} serves");
    (port, server)
}

/// Debian sid's python3.14 and python3.15 (static, as Debian builds them),
/// chrooted into a sid root like a container: frames read through each
/// build's `_Py_DebugOffsets` and its thread-local thread state.
#[test]
fn debian_sid_python_314_and_315_sites_match_tracemalloc() {
    let _serial = serial();
    let root = sid_root();
    let (_agent, addr) = start_agent(&["python3.14", "python3.15"]);
    for minor in ["3.14", "3.15"] {
        let (port, server) = sid_server(&root, minor, "pyleak_app");
        let status = python_ready(addr, server.pid());
        assert_eq!(
            status["python"]["version"]
                .as_str()
                .map(|v| v.starts_with(minor)),
            Some(true),
            "{status}"
        );
        let large = compare(addr, port, server.pid(), "large", "n=20&size=100000", 10);
        assert!(
            large["location"]
                .as_str()
                .is_some_and(|l| l.starts_with("/srv/memtrace-fixtures/")),
            "named as the process sees its files: {large}"
        );
        compare(addr, port, server.pid(), "small", "n=20000", 5);
    }
}

/// Builds memtrace cannot read: a future 3.16 and a 3.15 whose table does
/// not match what it says it is (as a pre-release with another layout).
/// Each gets its reason in the status and the WARN, and native sites.
#[test]
fn unreadable_new_pythons_keep_native_sites() {
    let _serial = serial();
    let root = sid_root();
    python_claiming(
        &root,
        "/usr/bin/python3.15",
        "/opt/future/bin/python3.16",
        0x0310_00a1,
    );
    python_claiming(
        &root,
        "/usr/bin/python3.15",
        "/opt/beta/bin/python3.15",
        0x030f_00b3,
    );
    let (_agent, addr) = start_agent(&["python3.16", "python3.15"]);
    for (python, reason) in [
        ("/opt/future/bin/python3.16", "newer than 3.15"),
        ("/opt/beta/bin/python3.15", "_Py_DebugOffsets says version"),
    ] {
        // Either the build is refused (unsupported, with its reason) or its
        // table is (the frames' error).
        let port = free_port();
        let server = chroot_wsgi_server(&root, python, "pyleak_app", port);
        assert!(wait_port(port, SERVER_START), "{python} serves");
        let pid = server.pid();
        let mut worker = serde_json::Value::Null;
        let said = wait_for(Duration::from_secs(15), || {
            worker = get(addr, &format!("/debug/memory/?action=status&pid={pid}")).1["workers"][0]
                .clone();
            let says = |v: &serde_json::Value| v.as_str().is_some_and(|r| r.contains(reason));
            (worker["python"]["supported"] == false
                && says(&worker["python"]["unsupported_reason"]))
                || says(&worker["python_frames_error"])
        });
        assert!(said, "{python}: {worker}");
        assert_eq!(worker["python_frames"], false, "{python}: {worker}");
        assert_native_sites(addr, port, pid, python);
        let (code, _) = get(addr, "/debug/memory/?action=stop");
        assert_eq!(code, 200);
    }
}

/// The GC of Debian sid's python3.14 and python3.15 (3.15 keeps its
/// statistics in ring buffers behind a pointer) against `gc.get_stats()`
/// in the same process, after garbage of each kind.
#[test]
fn debian_sid_python_314_and_315_gc_matches_gc_get_stats() {
    let _serial = serial();
    let root = sid_root();
    let (_agent, addr) = start_agent(&["python3.14", "python3.15"]);
    for minor in ["3.14", "3.15"] {
        let (port, server) = sid_server(&root, minor, "fd_gc_app");
        let pid = server.pid();
        for _ in 0..3 {
            http_get(port, "/garbage").expect("garbage");
        }
        // The app's own view, then the agent's at its next refresh: equal
        // (nothing allocates in between but the app's answer).
        let mut app = serde_json::Value::Null;
        let mut ours = serde_json::Value::Null;
        let equal = wait_for(Duration::from_secs(15), || {
            app = serde_json::from_str(&http_get(port, "/ok").expect("ok")).expect("JSON");
            std::thread::sleep(Duration::from_millis(1500));
            ours = get(addr, &format!("/debug/memory/?action=status&pid={pid}")).1["workers"][0]
                ["python_gc"]
                .clone();
            let sum = |k: &str| {
                ours[k]
                    .as_array()
                    .map(|a| a.iter().filter_map(|v| v.as_i64()).sum::<i64>())
            };
            ["collections", "collected", "uncollectable"]
                .iter()
                .all(|k| sum(k) == app["gc"][k].as_i64())
        });
        eprintln!(
            "{minor}: memtrace {ours}, gc.get_stats() totals {}",
            app["gc"]
        );
        assert!(equal, "{minor}: memtrace {ours} vs the app's {}", app["gc"]);
        assert_eq!(
            ours["thresholds"],
            serde_json::json!([2000, 10, 10]),
            "{ours}"
        );
        assert!(
            ours["uncollectable"][2].as_i64() >= Some(6),
            "{minor}: 3 × 2 uncollectable: {ours}"
        );
    }
}
