//! Disk-space guard: a node whose data directory's file system runs low on space stops
//! taking writes *before* a write fails.
//!
//! Once a second the node reads the free space of its data directory (`statvfs`). Below
//! `min_free_disk_bytes` the node is *full*:
//! - client writes to it answer UNAVAILABLE naming the node, the free space and the
//!   setting (the client retries on another node);
//! - it refuses Raft replication into its WAL (AppendEntries, snapshots): the other nodes
//!   keep their quorum without it;
//! - it hands the leadership of its shards to a live peer;
//! - `habar_disk_free_bytes` and `habar_disk_full` report it.
//!
//! When space returns above the bound the node takes replication again and catches up
//! from the leaders (entries or a snapshot). Nothing is lost meanwhile: what it refused,
//! it never acknowledged.
//!
//! The bound must cover what can be written between two checks (a second of replication
//! into this node); should a write still hit ENOSPC, the WAL stops (it never acknowledges
//! a failed write) and the node must be restarted once space is back.

use std::io;
use std::path::Path;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;

pub struct DiskGuard {
    path: PathBuf,
    min_free: AtomicU64,
    free: AtomicU64,
    full: AtomicBool,
}

/// Free bytes available to this process on the file system holding `path`.
pub fn free_bytes(path: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: `statvfs` writes into the zeroed struct we own; `c` is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

impl DiskGuard {
    pub fn new(path: PathBuf, min_free_bytes: u64) -> DiskGuard {
        DiskGuard {
            path,
            min_free: AtomicU64::new(min_free_bytes),
            free: AtomicU64::new(u64::MAX),
            full: AtomicBool::new(false),
        }
    }

    pub fn is_full(&self) -> bool {
        self.full.load(Ordering::Acquire)
    }

    pub fn min_free_bytes(&self) -> u64 {
        self.min_free.load(Ordering::Relaxed)
    }

    /// Changes the bound at run time (tests use it to make a node "full" without filling
    /// a disk; the next [`check`](Self::check) applies it).
    pub fn set_min_free_bytes(&self, bytes: u64) {
        self.min_free.store(bytes, Ordering::Relaxed);
    }

    pub fn free_bytes(&self) -> u64 {
        self.free.load(Ordering::Relaxed)
    }

    /// Reads the free space; returns `Some(now_full)` when the state changed.
    pub fn check(&self) -> Option<bool> {
        let free = match free_bytes(&self.path) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot read free disk space");
                return None;
            }
        };
        self.free.store(free, Ordering::Relaxed);
        let min = self.min_free_bytes();
        let full = min > 0 && free < min;
        metrics::gauge!("habar_disk_free_bytes").set(free as f64);
        metrics::gauge!("habar_disk_full").set(if full { 1.0 } else { 0.0 });
        let was = self.full.swap(full, Ordering::AcqRel);
        if was == full {
            return None;
        }
        if full {
            tracing::error!(
                path = %self.path.display(),
                free_bytes = free,
                min_free_disk_bytes = min,
                "disk almost full: this node refuses writes and replication until space returns"
            );
        } else {
            tracing::info!(free_bytes = free, "disk space back: this node takes writes and replication again");
        }
        Some(full)
    }

    /// The error a write to a full node gets.
    pub fn refusal(&self, node: u64) -> String {
        format!(
            "node {node}: disk full: {} bytes free on {}, below min_free_disk_bytes {}; \
             it takes no writes until space returns (retry another node)",
            self.free_bytes(),
            self.path.display(),
            self.min_free_bytes()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_space_is_read_and_the_bound_flips_the_state() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(free_bytes(dir.path()).expect("statvfs") > 0);
        let g = DiskGuard::new(dir.path().to_path_buf(), 1);
        assert_eq!(g.check(), None, "plenty of space: not full, no change");
        g.set_min_free_bytes(u64::MAX);
        assert_eq!(g.check(), Some(true));
        assert!(g.is_full());
        assert!(g.refusal(3).contains("min_free_disk_bytes"), "{}", g.refusal(3));
        g.set_min_free_bytes(0);
        assert_eq!(g.check(), Some(false), "0 turns the guard off");
        assert!(free_bytes(Path::new("/no/such/dir")).is_err());
    }
}
