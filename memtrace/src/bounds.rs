//! Limits on data memtrace does not control, in one place.
//!
//! The agent runs as root and reads what other people write: the ELF files
//! of traced binaries, the memory of traced processes, `/proc`, the
//! network's request lines, the kubelet's JSON, the API's query strings and
//! configuration files. Every loop over such data has a bound; the bounds
//! that are not next to the one loop they limit are here, and README's
//! Security section lists them all.
use std::{io::Read as _, path::Path};

/// Largest object file (a traced binary or library) read whole, to find
/// symbols, sections and build ids: 256 MiB. The largest real interpreter
/// seen (a static CPython with debug info) is about 40 MiB; a file that
/// only claims to be one must not make the agent allocate gigabytes.
pub const MAX_OBJECT_BYTES: u64 = 256 << 20;

/// Why an object file was not read.
#[derive(Debug, thiserror::Error)]
pub enum ObjectReadError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{bytes} bytes, more than the {max} memtrace reads of an object file", max = MAX_OBJECT_BYTES)]
    TooLarge { bytes: u64 },
}

/// Reads an object file whole, refusing one larger than
/// [`MAX_OBJECT_BYTES`] before allocating for it (and stopping at the limit
/// should it grow while read).
pub fn read_object(path: &Path) -> Result<Vec<u8>, ObjectReadError> {
    let file = std::fs::File::open(path)?;
    let bytes = file.metadata()?.len();
    if bytes > MAX_OBJECT_BYTES {
        return Err(ObjectReadError::TooLarge { bytes });
    }
    let mut data = Vec::with_capacity(bytes as usize);
    file.take(MAX_OBJECT_BYTES + 1).read_to_end(&mut data)?;
    if data.len() as u64 > MAX_OBJECT_BYTES {
        return Err(ObjectReadError::TooLarge {
            bytes: data.len() as u64,
        });
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_files_past_the_limit_are_refused_without_reading_them() {
        let dir = std::env::temp_dir().join(format!("memtrace-bounds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let small = dir.join("small");
        std::fs::write(&small, b"\x7fELF").unwrap();
        assert_eq!(read_object(&small).unwrap(), b"\x7fELF");
        // Sparse: the size without the disk.
        let big = dir.join("big");
        std::fs::File::create(&big)
            .unwrap()
            .set_len(MAX_OBJECT_BYTES + 1)
            .unwrap();
        let e = read_object(&big).unwrap_err();
        assert!(
            matches!(e, ObjectReadError::TooLarge { bytes } if bytes == MAX_OBJECT_BYTES + 1),
            "{e}"
        );
        assert!(read_object(&dir.join("missing")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
