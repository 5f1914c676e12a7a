//! Kernel struct offsets the programs need but cannot relocate themselves
//! (aya-ebpf programs carry no CO-RE relocations): read from the running
//! kernel's BTF, `/sys/kernel/btf/vmlinux`, as the OpenTelemetry profiler
//! does.
use std::path::Path;

use btfparse::{Offset, Readable, TypeInformation};

/// The running kernel's type information.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot parse the kernel's BTF: {0}")]
    Parse(String),
    #[error("the kernel's BTF has no {0}")]
    Missing(String),
}

/// A BTF blob in memory, for the parser.
struct Bytes(Vec<u8>);

impl Readable for Bytes {
    fn read(&self, offset: u64, buffer: &mut [u8]) -> btfparse::Result<()> {
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let source = start
            .checked_add(buffer.len())
            .and_then(|end| self.0.get(start..end))
            .ok_or_else(|| {
                btfparse::Error::new(btfparse::ErrorKind::EOF, "read past the end of the BTF")
            })?;
        buffer.copy_from_slice(source);
        Ok(())
    }
}

/// Byte offset of a (dotted) member path in a struct, from a BTF file.
pub fn member_offset(btf: &Path, type_name: &str, path: &str) -> Result<u32, BtfError> {
    let data = std::fs::read(btf).map_err(|source| BtfError::Read {
        path: btf.display().to_string(),
        source,
    })?;
    let types =
        TypeInformation::new(&Bytes(data)).map_err(|e| BtfError::Parse(format!("{e:?}")))?;
    let id = types
        .id_of(type_name)
        .ok_or_else(|| BtfError::Missing(format!("struct {type_name}")))?;
    match types.offset_of(id, path) {
        Ok((_, Offset::ByteOffset(offset))) => Ok(offset),
        Ok((_, Offset::BitOffsetAndSize(..))) => Err(BtfError::Missing(format!(
            "{type_name}.{path} as whole bytes"
        ))),
        Err(_) => Err(BtfError::Missing(format!("{type_name}.{path}"))),
    }
}

/// Offset of `thread.fsbase` in `struct task_struct` (x86_64): the thread
/// pointer of a user thread, where glibc keeps its `struct pthread`.
pub fn task_fsbase_offset() -> Result<u32, BtfError> {
    member_offset(Path::new(VMLINUX_BTF), "task_struct", "thread.fsbase")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_fsbase_in_this_kernel() {
        let offset = task_fsbase_offset().expect("this kernel has BTF");
        // task_struct is several KiB; thread comes last on x86_64.
        assert!((1000..20_000).contains(&offset), "{offset}");
        assert_eq!(offset % 8, 0);
    }

    #[test]
    fn a_missing_member_is_a_clear_error() {
        let e = member_offset(Path::new(VMLINUX_BTF), "task_struct", "thread.nonesuch")
            .expect_err("no such member");
        assert!(e.to_string().contains("task_struct.thread.nonesuch"), "{e}");
        let e = member_offset(Path::new("/nonexistent/btf"), "task_struct", "pid")
            .expect_err("no file");
        assert!(e.to_string().contains("/nonexistent/btf"), "{e}");
    }
}
