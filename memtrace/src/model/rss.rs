//! Resident memory by type, as the kernel's mm counters and /proc name it.
use memtrace_common::{MM_ANONPAGES, MM_FILEPAGES, MM_SHMEMPAGES, MM_SWAPENTS, RSS_MEMBERS};
use serde::Serialize;

use super::procinfo::StatusMemory;

/// Resident memory by kind, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RssBreakdown {
    pub file: u64,
    pub anon: u64,
    pub shmem: u64,
    pub swap: u64,
}

impl RssBreakdown {
    /// What /proc calls RSS: file + anon + shmem.
    pub fn resident(&self) -> u64 {
        self.file + self.anon + self.shmem
    }

    pub(super) fn from_members(bytes: [i64; RSS_MEMBERS]) -> Self {
        let b = |m: usize| bytes[m].max(0) as u64;
        Self {
            file: b(MM_FILEPAGES),
            anon: b(MM_ANONPAGES),
            shmem: b(MM_SHMEMPAGES),
            swap: b(MM_SWAPENTS),
        }
    }

    pub(super) fn member(&self, m: usize) -> u64 {
        match m {
            MM_FILEPAGES => self.file,
            MM_ANONPAGES => self.anon,
            MM_SHMEMPAGES => self.shmem,
            _ => self.swap,
        }
    }

    pub(super) fn set_member(&mut self, m: usize, v: u64) {
        match m {
            MM_FILEPAGES => self.file = v,
            MM_ANONPAGES => self.anon = v,
            MM_SHMEMPAGES => self.shmem = v,
            _ => self.swap = v,
        }
    }

    pub fn from_status(s: &StatusMemory) -> Self {
        Self {
            file: s.rss_file,
            anon: s.rss_anon,
            shmem: s.rss_shmem,
            swap: s.swap,
        }
    }
}
