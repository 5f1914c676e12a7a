//! kmem:rss_stat: the kernel's per-mm RSS counters, by member.
//!
//! `size` is the absolute counter in bytes, so every event is a full
//! correction of its member. `curr=1` means the mm is the current task's: that
//! is how a thread group is tied to its mm_id (a hashed pointer, reused as soon
//! as an mm is freed). Events with `curr=0` come from fork filling a child's
//! mm, exec and exit teardown, reclaim, and unrelated processes.
use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use memtrace_common::{EVENT_RSS, MmRss, RSS_MEMBERS, RssEvent};

use crate::{
    maps::{CONFIG, EVENTS, MM_RSS},
    util::{count, current, field, now_ns, submit_flags, watched},
};

#[tracepoint]
pub fn rss_stat(ctx: TracePointContext) -> u32 {
    let _ = try_rss_stat(&ctx);
    0
}

fn try_rss_stat(ctx: &TracePointContext) -> Result<(), i64> {
    let config = CONFIG.load();
    let layout = &config.layout;
    let mm_id: u32 = field(ctx, layout.rss_mm_id)?;
    let member: i32 = field(ctx, layout.rss_member)?;
    if member < 0 || member as usize >= RSS_MEMBERS {
        return Ok(());
    }
    let cur = current();
    let stats = watched(cur.tgid);

    let mm = match MM_RSS.get_ptr_mut(mm_id) {
        Some(mm) => mm,
        None => {
            // Only start tracking an mm when a watched task touches it: its
            // own (curr=1), or a child's being filled by fork, or the new mm
            // being built by exec. Everything else on the machine stops here.
            if stats.is_none() {
                return Ok(());
            }
            if MM_RSS.insert(mm_id, MmRss::default(), 0).is_err() {
                count(memtrace_common::CTR_MMS_FULL);
                return Ok(());
            }
            MM_RSS.get_ptr_mut(mm_id).ok_or(0)?
        }
    };
    let size: i64 = field(ctx, layout.rss_size)?;
    let curr: u32 = field(ctx, layout.rss_curr)?;

    // SAFETY: pointers from map lookups.
    unsafe {
        let mm = &mut *mm;
        // Constant indices: with a variable one LLVM stores through a register
        // whose bound the verifier has not seen, and the load is refused.
        match member {
            0 => mm.bytes[0] = size,
            1 => mm.bytes[1] = size,
            2 => mm.bytes[2] = size,
            _ => mm.bytes[3] = size,
        }
        mm.known |= 1 << member;
        if curr == 1 {
            if let Some(stats) = stats {
                (*stats).mm_id = mm_id;
                mm.owner_tgid = cur.tgid;
            }
        }
        if mm.owner_tgid == 0 {
            return Ok(());
        }
        let total = mm.resident();
        let moved = (total - mm.emitted_total).unsigned_abs();
        if moved < config.rss_step_bytes {
            return Ok(());
        }
        match EVENTS.reserve::<RssEvent>(0) {
            Some(mut entry) => {
                entry.write(RssEvent {
                    kind: EVENT_RSS,
                    tgid: mm.owner_tgid,
                    mm_id,
                    known: mm.known,
                    ts_ns: now_ns(),
                    bytes: mm.bytes,
                });
                entry.submit(submit_flags());
                mm.emitted_total = total;
                count(memtrace_common::CTR_EVENTS);
            }
            None => count(memtrace_common::CTR_RINGBUF_DROPS),
        }
    }
    Ok(())
}
