//! The agent's own heap: how glibc's allocator is set up for a process that
//! runs for months, what it holds, and giving back what it freed.
//!
//! Left to its defaults, glibc keeps an arena per thread (up to eight per
//! core) and raises its mmap threshold each time a large block is freed,
//! so that the next object file read whole (several MB, each time a new
//! Python binary or library is inspected) or the next diff's buffers come
//! from an arena instead of their own mapping, and stay there, fragmented,
//! after they are freed. A 1-hour soak showed it as an RSS that drifted up
//! by a few MB and jumped for a minute at worker recycles. musl (the static
//! release) maps large blocks itself and returns memory on free: none of
//! this applies there, and [`usage`] says nothing.

use crate::{api::status::AgentMemory, model::procinfo};

/// Arenas glibc may create: the agent has a handful of threads that
/// allocate (the event loop, the API, the symbolizer), not a pool that
/// contends.
#[cfg(target_env = "gnu")]
const ARENAS: libc::c_int = 2;
/// Blocks from this size on get a mapping of their own, returned to the
/// system when freed. Setting it fixes it: glibc no longer raises it.
#[cfg(target_env = "gnu")]
const MMAP_THRESHOLD: libc::c_int = 256 << 10;
/// Free memory at the top of an arena given back at once past this.
#[cfg(target_env = "gnu")]
const TRIM_THRESHOLD: libc::c_int = 1 << 20;

/// Sets the allocator up for a long-lived agent; call once, first thing,
/// before other threads exist.
pub fn tune() {
    #[cfg(target_env = "gnu")]
    for (param, value) in [
        (libc::M_ARENA_MAX, ARENAS),
        (libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        (libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD),
    ] {
        // SAFETY: mallopt only changes the allocator's parameters; it
        // returns 0 (and changes nothing) for a value it refuses.
        if unsafe { libc::mallopt(param, value) } == 0 {
            tracing::debug!(param, value, "the allocator refused a setting");
        }
    }
}

/// Gives the allocator's free memory back to the system. glibc keeps what
/// was freed in its arenas: a server that recycles its workers (each one's
/// request history and detectors freed, a new one allocated) or a diff
/// that symbolized thousands of stacks left the agent a few MB larger
/// each time, with nothing live in them.
pub fn trim() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free memory of the allocator's own
    // arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// What the agent holds now.
pub fn usage() -> AgentMemory {
    let resident_bytes = procinfo::statm_rss(std::process::id()).unwrap_or(0);
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: mallinfo2 only reads the allocator's counters.
        let info = unsafe { libc::mallinfo2() };
        AgentMemory {
            resident_bytes,
            heap_in_use_bytes: Some((info.uordblks + info.hblkhd) as u64),
            heap_free_bytes: Some(info.fordblks as u64),
        }
    }
    #[cfg(not(target_env = "gnu"))]
    AgentMemory {
        resident_bytes,
        ..AgentMemory::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_counts_a_large_block_while_it_lives() {
        tune();
        let before = usage();
        assert!(before.resident_bytes > 0);
        // Past the mmap threshold: a mapping of its own, counted and
        // resident while it lives (other tests' threads allocate too, far
        // less than this).
        let block = std::hint::black_box(vec![1u8; 64 << 20]);
        let during = usage();
        assert!(during.resident_bytes >= before.resident_bytes + (48 << 20));
        if cfg!(target_env = "gnu") {
            let grew = i128::from(during.heap_in_use_bytes.unwrap())
                - i128::from(before.heap_in_use_bytes.unwrap());
            assert!(grew >= 48 << 20, "{grew}");
        } else {
            assert_eq!(during.heap_in_use_bytes, None);
        }
        drop(block);
        trim();
    }
}
