//! Decoding the kernel's ring-buffer records.
use memtrace_common::{
    EVENT_EXEC, EVENT_EXIT, EVENT_FORK, EVENT_REQUEST, EVENT_REQUEST_SHORT, EVENT_RSS,
    ProcessEvent, REQUEST_SHORT_BYTES, RequestEvent, RssEvent,
};

/// A decoded kernel event. Process events (over 400 bytes, and rare) are
/// boxed so that the per-request path moves a small value.
// A request summary stays unboxed: it is the per-request path, and must
// not allocate.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum KernelEvent {
    Fork(Box<ProcessEvent>),
    Exec(Box<ProcessEvent>),
    Exit(Box<ProcessEvent>),
    Rss(RssEvent),
    Request(RequestEvent),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("event of {0} bytes is too short")]
    Short(usize),
    #[error("unknown event kind {0}")]
    UnknownKind(u32),
}

fn read<T: Copy>(bytes: &[u8]) -> Result<T, DecodeError> {
    if bytes.len() < std::mem::size_of::<T>() {
        return Err(DecodeError::Short(bytes.len()));
    }
    // SAFETY: length checked; T is a plain #[repr(C)] integer struct for which
    // any bit pattern is valid; read_unaligned needs no alignment.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

pub fn decode(bytes: &[u8]) -> Result<KernelEvent, DecodeError> {
    let kind: u32 = read(bytes)?;
    Ok(match kind {
        EVENT_FORK => KernelEvent::Fork(Box::new(read(bytes)?)),
        EVENT_EXEC => KernelEvent::Exec(Box::new(read(bytes)?)),
        EVENT_EXIT => KernelEvent::Exit(Box::new(read(bytes)?)),
        EVENT_RSS => KernelEvent::Rss(read(bytes)?),
        EVENT_REQUEST => KernelEvent::Request(read(bytes)?),
        EVENT_REQUEST_SHORT => KernelEvent::Request(read_short_request(bytes)?),
        other => return Err(DecodeError::UnknownKind(other)),
    })
}

/// A request record without its line: the head of a `RequestEvent`, whose
/// line reads as none.
fn read_short_request(bytes: &[u8]) -> Result<RequestEvent, DecodeError> {
    let head = bytes
        .get(..REQUEST_SHORT_BYTES)
        .ok_or(DecodeError::Short(bytes.len()))?;
    let mut ev = RequestEvent::default();
    // SAFETY: RequestEvent is a plain #[repr(C)] integer struct; the head is
    // its first REQUEST_SHORT_BYTES bytes, any bit pattern valid.
    unsafe {
        std::ptr::copy_nonoverlapping(
            head.as_ptr(),
            (&raw mut ev).cast::<u8>(),
            REQUEST_SHORT_BYTES,
        );
    }
    Ok(ev)
}

/// A NUL-terminated kernel string as UTF-8 (lossy).
pub fn c_str(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn as_bytes<T>(v: &T) -> Vec<u8> {
        // SAFETY: test helper over plain data.
        unsafe {
            std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>())
        }
        .to_vec()
    }

    #[test]
    fn decodes_a_request_event() {
        let ev = RequestEvent {
            kind: EVENT_REQUEST,
            tgid: 7,
            seq: 3,
            faults: 16,
            ..Default::default()
        };
        match decode(&as_bytes(&ev)).unwrap() {
            KernelEvent::Request(r) => {
                assert_eq!((r.tgid, r.seq, r.faults), (7, 3, 16));
            }
            other => panic!("decoded {other:?}"),
        }
    }

    #[test]
    fn decodes_a_short_request_event_with_no_line() {
        let ev = RequestEvent {
            kind: EVENT_REQUEST_SHORT,
            tgid: 9,
            seq: 4,
            rss_after: [1, 2, 3, 4],
            brk_shrink_bytes: 4096,
            ..Default::default()
        };
        let mut bytes = as_bytes(&ev);
        // Whatever follows the head in the ring buffer is not read.
        bytes.truncate(REQUEST_SHORT_BYTES);
        bytes.extend_from_slice(&[0xAA; 16]);
        match decode(&bytes).unwrap() {
            KernelEvent::Request(r) => {
                assert_eq!((r.kind, r.tgid, r.seq), (EVENT_REQUEST_SHORT, 9, 4));
                assert_eq!((r.rss_after, r.brk_shrink_bytes), ([1, 2, 3, 4], 4096));
                assert_eq!((r.line.state, r.line.len), (memtrace_common::LINE_NONE, 0));
            }
            other => panic!("decoded {other:?}"),
        }
        assert_eq!(
            decode(&bytes[..REQUEST_SHORT_BYTES - 1]).unwrap_err(),
            DecodeError::Short(REQUEST_SHORT_BYTES - 1)
        );
    }

    #[test]
    fn rejects_short_and_unknown() {
        assert_eq!(decode(&[1, 0]).unwrap_err(), DecodeError::Short(2));
        assert_eq!(decode(&[5, 0, 0, 0]).unwrap_err(), DecodeError::Short(4));
        assert_eq!(
            decode(&[99, 0, 0, 0]).unwrap_err(),
            DecodeError::UnknownKind(99)
        );
    }

    #[test]
    fn c_str_stops_at_nul() {
        assert_eq!(c_str(b"gunicorn\0\0junk"), "gunicorn");
        assert_eq!(c_str(b"full"), "full");
    }
}
