//! SIGINT/SIGTERM as a flag, for the interactive commands (`demo`, `top`)
//! that must clean up after themselves (a child server in its own process
//! group, a terminal in raw mode) instead of dying on the spot.
use std::sync::atomic::{AtomicBool, Ordering};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// From now on SIGINT and SIGTERM only set the flag.
pub fn catch_stop_signals() {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    let action = SigAction::new(
        SigHandler::Handler(on_stop),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        let _ = unsafe { sigaction(sig, &action) };
    }
}

/// Whether SIGINT or SIGTERM arrived since `catch_stop_signals`.
pub fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst)
}
