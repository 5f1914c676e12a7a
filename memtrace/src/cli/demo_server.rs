//! The demo's workload, bundled in the memtrace binary (`memtrace
//! demo-server`): a prefork HTTP/1.0 server whose workers leak a known
//! amount per request. Like gunicorn's master, it replaces every worker
//! gracefully on SIGHUP and respawns workers that die.
use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
};

use nix::{
    sys::{
        signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, kill, sigaction},
        wait::{WaitStatus, waitpid},
    },
    unistd::{ForkResult, Pid, fork},
};

/// The process name the demo's server runs under.
pub const DEMO_SERVER_NAME: &str = "mt-demo-server";

static HUPS: AtomicUsize = AtomicUsize::new(0);
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_hup(_: libc::c_int) {
    HUPS.fetch_add(1, Ordering::SeqCst);
}

extern "C" fn on_stop(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn handle(signal: Signal, handler: extern "C" fn(libc::c_int)) -> nix::Result<()> {
    // No SA_RESTART: blocking accept/waitpid return EINTR and see the flag.
    let action = SigAction::new(
        SigHandler::Handler(handler),
        SaFlags::empty(),
        SigSet::empty(),
    );
    // SAFETY: the handlers only touch atomics.
    unsafe { sigaction(signal, &action) }.map(|_| ())
}

/// What each request keeps forever.
static LEAKED: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// One request's work: keep `leak_bytes` (written, so resident). Exported
/// unmangled so a uprobe can name it: `--request-fn $(which memtrace):memtrace_demo_handle_request`.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn memtrace_demo_handle_request(leak_bytes: usize) -> usize {
    let block = vec![0x5a_u8; leak_bytes];
    let mut leaked = LEAKED.lock().unwrap_or_else(|e| e.into_inner());
    leaked.push(block);
    leaked.len()
}

fn serve(mut conn: TcpStream, leak_bytes: usize) {
    let mut buf = [0u8; 2048];
    let mut got = 0;
    while got < buf.len() {
        match conn.read(&mut buf[got..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                got += n;
                if buf[..got].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
        }
    }
    let kept = memtrace_demo_handle_request(leak_bytes);
    let body = format!("leaked {leak_bytes} bytes; {kept} blocks kept\n");
    let _ = write!(
        conn,
        "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

fn worker(listener: &TcpListener, leak_bytes: usize) -> ! {
    let _ = handle(Signal::SIGTERM, on_stop);
    // SAFETY: restoring the default disposition.
    let _ = unsafe { nix::sys::signal::signal(Signal::SIGHUP, SigHandler::SigIgn) };
    while !STOP.load(Ordering::SeqCst) {
        if let Ok((conn, _)) = listener.accept() {
            serve(conn, leak_bytes);
        }
    }
    std::process::exit(0)
}

fn spawn(listener: &TcpListener, leak_bytes: usize) -> nix::Result<Pid> {
    // SAFETY: the demo server is single-threaded when it forks.
    match unsafe { fork() }? {
        ForkResult::Child => worker(listener, leak_bytes),
        ForkResult::Parent { child } => Ok(child),
    }
}

/// Runs the master until SIGTERM or SIGINT.
pub fn run(port: u16, workers: usize, leak_bytes: usize) -> std::io::Result<()> {
    let _ = nix::sys::prctl::set_name(
        &std::ffi::CString::new(DEMO_SERVER_NAME).expect("no NUL in the name"),
    );
    let listener = TcpListener::bind(("127.0.0.1", port))?;
    handle(Signal::SIGHUP, on_hup)?;
    handle(Signal::SIGTERM, on_stop)?;
    handle(Signal::SIGINT, on_stop)?;
    let mut pids = Vec::with_capacity(workers);
    for _ in 0..workers {
        pids.push(spawn(&listener, leak_bytes)?);
    }
    let mut hups_seen = 0;
    while !STOP.load(Ordering::SeqCst) {
        let hups = HUPS.load(Ordering::SeqCst);
        if hups != hups_seen {
            hups_seen = hups;
            eprintln!(
                "{DEMO_SERVER_NAME}: SIGHUP: replacing {} workers",
                pids.len()
            );
            for &p in &pids {
                let _ = kill(p, Signal::SIGTERM);
            }
        }
        match waitpid(None, None) {
            Ok(WaitStatus::Exited(dead, _) | WaitStatus::Signaled(dead, _, _)) => {
                if let Some(slot) = pids.iter_mut().find(|p| **p == dead)
                    && !STOP.load(Ordering::SeqCst)
                {
                    *slot = spawn(&listener, leak_bytes)?;
                }
            }
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(_) => break,
        }
    }
    for &p in &pids {
        let _ = kill(p, Signal::SIGKILL);
    }
    while waitpid(None, None).is_ok() {}
    Ok(())
}
