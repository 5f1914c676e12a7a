//! exceptions:page_fault_user: faults counted per watched process and per
//! thread, in maps. No event per fault.
use aya_ebpf::{macros::tracepoint, programs::TracePointContext};

use crate::util::{atomic_add, current, thread_state, watched};

#[tracepoint]
pub fn page_fault_user(_ctx: TracePointContext) -> u32 {
    let _ = try_page_fault_user();
    0
}

fn try_page_fault_user() -> Option<()> {
    let cur = current();
    let stats = watched(cur.tgid)?;
    // SAFETY: pointers from map lookups.
    unsafe {
        atomic_add(&raw mut (*stats).faults, 1);
        let thread = thread_state(cur.tid, cur.tgid)?;
        (*thread).faults += 1;
    }
    Some(())
}
