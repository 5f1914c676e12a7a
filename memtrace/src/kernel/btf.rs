//! Kernel struct offsets the programs need but cannot relocate themselves
//! (aya-ebpf programs carry no CO-RE relocations): read from the running
//! kernel's BTF, `/sys/kernel/btf/vmlinux`, as the OpenTelemetry profiler
//! does. The file is mapped and only the types on the way are decoded
//! (btf-rs's mmap backend): parsing all of it first kept some 50 MB in the
//! agent for its whole life. Kernels before 6.16 cannot map it: there it is
//! copied into an anonymous memory file first.
use std::{os::fd::AsRawFd as _, path::Path};

use btf_rs::{Backend, Btf, Type};

/// The running kernel's type information.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Nesting followed through anonymous structs, unions and typedefs.
const MAX_DEPTH: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("cannot read the kernel's BTF at {path}: {message}")]
    Read { path: String, message: String },
    #[error("the kernel's BTF has no {0}")]
    Missing(String),
}

/// The struct or union behind typedefs and qualifiers.
fn composite(btf: &Btf, mut t: Type) -> Option<btf_rs::Struct> {
    for _ in 0..MAX_DEPTH {
        match t {
            Type::Struct(s) | Type::Union(s) => return Some(s),
            Type::Typedef(_) | Type::Const(_) | Type::Volatile(_) | Type::TypeTag(_) => {
                t = btf.resolve_chained_type(t.as_btf_type()?).ok()?;
            }
            _ => return None,
        }
    }
    None
}

/// Bit offset of the member `name` in `s`, looking into anonymous
/// structs and unions as C does, and the member's type.
fn member(btf: &Btf, s: &btf_rs::Struct, name: &str, depth: usize) -> Option<(u32, Type)> {
    if depth > MAX_DEPTH {
        return None;
    }
    for m in &s.members {
        let member_name = btf.resolve_name(m).unwrap_or_default();
        if member_name == name {
            return Some((m.bit_offset(), btf.resolve_chained_type(m).ok()?));
        }
        if member_name.is_empty()
            && let Some(inner) = btf
                .resolve_chained_type(m)
                .ok()
                .and_then(|t| composite(btf, t))
            && let Some((offset, t)) = member(btf, &inner, name, depth + 1)
        {
            return Some((m.bit_offset() + offset, t));
        }
    }
    None
}

/// How the kernel's BTF was read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BtfAccess {
    /// The file itself is mapped (Linux 6.16 and later).
    Mapped,
    /// Older kernels refuse to map it (ENODEV): it is copied into an
    /// anonymous memory file once, mapped from there, and dropped with the
    /// [`KernelBtf`].
    Copied,
}

/// A BTF file open for a few look-ups. Types are decoded on the way, not
/// all up front; drop it once the offsets are read.
pub struct KernelBtf {
    btf: Btf,
    pub access: BtfAccess,
    /// The copy behind a [`BtfAccess::Copied`] mapping.
    _copy: Option<std::fs::File>,
}

impl KernelBtf {
    pub fn open(path: &Path) -> Result<Self, BtfError> {
        let read_error = |message: String| BtfError::Read {
            path: path.display().to_string(),
            message,
        };
        match Btf::from_file_with_backend(path, Backend::Mmap) {
            Ok(btf) => Ok(Self {
                btf,
                access: BtfAccess::Mapped,
                _copy: None,
            }),
            Err(mapped) => {
                let bytes = std::fs::read(path)
                    .map_err(|e| read_error(format!("{e} (mapping it: {mapped})")))?;
                let copy = memfd_with(&bytes).map_err(|e| read_error(e.to_string()))?;
                let btf = Btf::from_file_with_backend(
                    format!("/proc/self/fd/{}", copy.as_raw_fd()),
                    Backend::Mmap,
                )
                .map_err(|e| read_error(e.to_string()))?;
                Ok(Self {
                    btf,
                    access: BtfAccess::Copied,
                    _copy: Some(copy),
                })
            }
        }
    }

    /// Byte offset of a (dotted) member path in a struct.
    pub fn member_offset(&self, type_name: &str, members: &str) -> Result<u32, BtfError> {
        let btf = &self.btf;
        let missing = || BtfError::Missing(format!("{type_name}.{members}"));
        let mut s = btf
            .resolve_types_by_name(type_name)
            .unwrap_or_default()
            .into_iter()
            .find_map(|t| composite(btf, t))
            .ok_or_else(|| BtfError::Missing(format!("struct {type_name}")))?;
        let mut bits = 0;
        let mut parts = members.split('.').peekable();
        while let Some(part) = parts.next() {
            let (offset, t) = member(btf, &s, part, 0).ok_or_else(missing)?;
            bits += offset;
            if parts.peek().is_some() {
                s = composite(btf, t).ok_or_else(missing)?;
            }
        }
        if bits % 8 != 0 {
            return Err(BtfError::Missing(format!(
                "{type_name}.{members} as whole bytes"
            )));
        }
        Ok(bits / 8)
    }

    /// The parameter names of a kernel function, in order.
    pub fn function_params(&self, name: &str) -> Result<Vec<String>, BtfError> {
        let btf = &self.btf;
        let missing = || BtfError::Missing(format!("function {name}"));
        let func = btf
            .resolve_types_by_name(name)
            .unwrap_or_default()
            .into_iter()
            .find_map(|t| match t {
                Type::Func(f) => Some(f),
                _ => None,
            })
            .ok_or_else(missing)?;
        let Ok(Type::FuncProto(proto)) = btf.resolve_chained_type(&func) else {
            return Err(missing());
        };
        Ok(proto
            .parameters
            .iter()
            .map(|p| btf.resolve_name(p).unwrap_or_default())
            .collect())
    }
}

/// An anonymous memory file holding `bytes`.
fn memfd_with(bytes: &[u8]) -> std::io::Result<std::fs::File> {
    use std::io::Write as _;
    let fd = nix::sys::memfd::memfd_create(c"memtrace-btf", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
        .map_err(std::io::Error::from)?;
    let mut file = std::fs::File::from(fd);
    file.write_all(bytes)?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member_offset(path: &Path, type_name: &str, members: &str) -> Result<u32, BtfError> {
        KernelBtf::open(path)?.member_offset(type_name, members)
    }

    #[test]
    fn finds_fsbase_in_this_kernel() {
        let offset = member_offset(Path::new(VMLINUX_BTF), "task_struct", "thread.fsbase")
            .expect("this kernel has BTF");
        // task_struct is several KiB; thread comes last on x86_64.
        assert!((1000..20_000).contains(&offset), "{offset}");
        assert_eq!(offset % 8, 0);
    }

    #[test]
    fn finds_members_inside_anonymous_unions_and_typedefs() {
        let btf = Path::new(VMLINUX_BTF);
        // struct page's `lru` sits in an anonymous union of an anonymous
        // struct; its first member is at offset 8 on x86_64.
        assert_eq!(member_offset(btf, "page", "lru").unwrap(), 8);
        // A path through a named member: list_head.next at 0, prev at 8.
        assert_eq!(member_offset(btf, "page", "lru.prev").unwrap(), 16);
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
