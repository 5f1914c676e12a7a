//! Socket mode: the method and path of an HTTP/1.x request, from the first
//! bytes the worker read. sock:sock_recv_length fires after the data was
//! copied to the worker's buffer, but it carries no buffer address: the
//! task's saved syscall registers do (x86_64: the syscall number in
//! `orig_ax`, its second argument in `si`). At most `LINE_CAP` bytes are
//! read, into the connection's own slot; everything after the path (query
//! string, headers, body) is zeroed before the slot can leave the kernel.
use aya_ebpf::{
    bindings::pt_regs,
    helpers::{bpf_get_current_task_btf, bpf_task_pt_regs, generated},
};
use memtrace_common::{
    LINE_CAP, LINE_DONE, LINE_METHOD, LINE_NONE, LINE_NOT_HTTP, LINE_PATH, LINE_TRUNCATED,
    RequestLine,
};

use crate::{
    maps::LINE_SCRATCH,
    util::{copy_words, zero_words},
};

// x86_64 syscall numbers of the reads that deliver a request to a server.
const SYS_READ: u64 = 0;
const SYS_READV: u64 = 19;
const SYS_RECVFROM: u64 = 45;
const SYS_RECVMSG: u64 = 47;
/// `struct msghdr`: `msg_iov` follows `msg_name` and `msg_namelen` (padded).
const MSGHDR_IOV: u64 = 16;

/// The longest method token of the known set ("OPTIONS", "CONNECT").
const METHOD_MAX: usize = 7;

const fn token(name: &[u8]) -> u64 {
    let mut word = [0u8; 8];
    let mut i = 0;
    while i < name.len() {
        word[i] = name[i];
        i += 1;
    }
    u64::from_le_bytes(word)
}

const METHODS: [u64; 9] = [
    token(b"GET"),
    token(b"POST"),
    token(b"PUT"),
    token(b"DELETE"),
    token(b"PATCH"),
    token(b"HEAD"),
    token(b"OPTIONS"),
    token(b"CONNECT"),
    token(b"TRACE"),
];

/// The user buffer (address, usable length) of the read in progress, from
/// the saved registers of the syscall it came from; None for reads that do
/// not come from one of the syscalls below (io_uring, recvmmsg, splice).
#[inline(always)]
fn user_buffer() -> Option<(u64, u64)> {
    // SAFETY: the helpers check their pointers; reads of user memory that
    // fault return an error.
    unsafe {
        // A BTF pointer: plain loads, which the verifier checks against the
        // kernel's `struct pt_regs` and turns into fault-safe reads (no
        // helper call per field).
        let regs = bpf_task_pt_regs(bpf_get_current_task_btf()) as *const pt_regs;
        let nr = core::ptr::read_volatile(&raw const (*regs).orig_rax);
        let arg1 = core::ptr::read_volatile(&raw const (*regs).rsi);
        let arg2 = core::ptr::read_volatile(&raw const (*regs).rdx);
        match nr {
            SYS_READ | SYS_RECVFROM => Some((arg1, arg2)),
            SYS_READV => iov0(arg1),
            SYS_RECVMSG => {
                let iov = aya_ebpf::helpers::bpf_probe_read_user((arg1 + MSGHDR_IOV) as *const u64)
                    .ok()?;
                iov0(iov)
            }
            _ => None,
        }
    }
}

/// The first element of a user `struct iovec` array.
#[inline(always)]
unsafe fn iov0(iov: u64) -> Option<(u64, u64)> {
    // SAFETY: a faulting read returns an error.
    let pair = unsafe { aya_ebpf::helpers::bpf_probe_read_user(iov as *const [u64; 2]) }.ok()?;
    Some((pair[0], pair[1]))
}

/// Reads `len` bytes (at most `LINE_CAP`) of user memory into `dst`.
#[inline(always)]
unsafe fn read_user(dst: *mut u8, len: u64, src: u64) -> bool {
    let len = if len > LINE_CAP as u64 {
        LINE_CAP as u32
    } else {
        len as u32
    };
    // SAFETY: the caller gives room for LINE_CAP bytes at `dst`.
    unsafe { generated::bpf_probe_read_user(dst.cast(), len, src as *const _) == 0 }
}

/// Begins the line of a new request from the read of `ret` bytes that just
/// completed.
#[inline(always)]
pub fn begin_line(line: &mut RequestLine, ret: i32) {
    line.state = LINE_NONE;
    line.len = 0;
    // SAFETY: `line` is in a map value, its bytes 8-byte aligned (asserted
    // in common).
    unsafe { zero_words(&raw mut line.bytes) };
    let Some((buf, room)) = user_buffer() else {
        return;
    };
    let len = (ret as u64).min(room);
    // SAFETY: `bytes` has LINE_CAP bytes.
    if len == 0 || !unsafe { read_user(line.bytes.as_mut_ptr(), len, buf) } {
        return;
    }
    line.state = LINE_METHOD;
    scan(line, len.min(LINE_CAP as u64) as usize);
}

/// A further read of a request whose line was split: append, rescan.
#[inline(always)]
pub fn continue_line(line: &mut RequestLine, ret: i32) {
    let have = line.len as usize;
    if have == 0 || have >= LINE_CAP {
        return;
    }
    let Some((buf, room)) = user_buffer() else {
        line.state = LINE_TRUNCATED;
        return;
    };
    let Some(scratch) = LINE_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's scratch slot (2 * LINE_CAP bytes): the kept bytes,
    // then the new ones read right after them; `have` < LINE_CAP and the
    // read is at most LINE_CAP bytes, so the verifier can see it fits.
    unsafe {
        let scratch = &mut *scratch;
        let kept = scratch.as_mut_ptr().cast::<[u8; LINE_CAP]>();
        copy_words(kept, &raw const line.bytes);
        let len = (ret as u64).min(room);
        if len == 0 || !read_user(scratch.as_mut_ptr().add(have), len, buf) {
            zero_words(scratch);
            line.state = LINE_TRUNCATED;
            return;
        }
        copy_words(&raw mut line.bytes, kept);
        // What was read past the line (headers) does not stay behind.
        zero_words(scratch);
        scan(line, (have as u64 + len).min(LINE_CAP as u64) as usize);
    }
}

/// Finds the end of "METHOD /path" in `bytes[..len]`, sets the state, and
/// zeroes everything after what is kept.
#[inline(always)]
fn scan(line: &mut RequestLine, len: usize) {
    let mut in_path = false;
    let mut end = 0usize;
    let mut state = LINE_NONE;
    for i in 0..LINE_CAP {
        if i >= len {
            break;
        }
        let c = line.bytes[i];
        if !in_path {
            if c == b' ' && i > 0 && known_method(&line.bytes, i) {
                in_path = true;
            } else if !c.is_ascii_uppercase() || i >= METHOD_MAX {
                state = LINE_NOT_HTTP;
                break;
            }
        } else if c == b' ' || c == b'?' || c == b'#' || c == b'\r' || c == b'\n' || c == 0 {
            state = LINE_DONE;
            end = i;
            break;
        }
    }
    let (state, keep) = match state {
        LINE_DONE => (LINE_DONE, end),
        LINE_NOT_HTTP => (LINE_NOT_HTTP, 0),
        // No end of the path yet: the cap, or the end of what was read so
        // far (the rest comes in the next read).
        _ if len >= LINE_CAP => (LINE_TRUNCATED, LINE_CAP),
        _ if in_path => (LINE_PATH, len),
        _ => (LINE_METHOD, len),
    };
    line.state = state;
    line.len = keep as u32;
    zero_after(line, keep);
}

/// Whether `bytes[..n]` is one of the known methods.
#[inline(always)]
fn known_method(bytes: &[u8; LINE_CAP], n: usize) -> bool {
    if n > METHOD_MAX {
        return false;
    }
    let word = u64::from_le_bytes([
        bytes[0], bytes[1], bytes[2], bytes[3], bytes[4], bytes[5], bytes[6], bytes[7],
    ]);
    let word = word & ((1u64 << (8 * n)) - 1);
    METHODS.contains(&word)
}

/// Zeroes `bytes[keep..]`, a word at a time.
#[inline(always)]
fn zero_after(line: &mut RequestLine, keep: usize) {
    let words = line.bytes.as_mut_ptr().cast::<u64>();
    for w in 0..LINE_CAP / 8 {
        let start = w * 8;
        // SAFETY: `w` < LINE_CAP / 8 words of the array; the array is
        // 8-byte aligned inside its map value (asserted in common).
        unsafe {
            let p = words.add(w);
            if start >= keep {
                p.write_unaligned(0);
            } else if keep < start + 8 {
                let kept = keep - start;
                let v = p.read_unaligned();
                p.write_unaligned(v & ((1u64 << (8 * kept)) - 1));
            }
        }
    }
}
