//! The file under the WAL: a segment file, optionally with a *power-loss model* for tests.
//!
//! In normal operation a [`SegFile`] is a plain file: positional writes go to the page
//! cache, `sync_data` makes them durable.
//!
//! With the power-loss model on (`WalConfig::lose_unsynced_writes`, test-only), a write
//! does not reach the operating system until the next `sync_data`/`sync_all` of that file:
//! it is held in this process's memory (and reads see it, as reads of the page cache
//! would). Killing the process then loses exactly the writes that no completed fsync
//! covered, as a power cut loses the page cache: the model of LazyFS, for the WAL. A node
//! that acknowledged something it had not fsynced would lose it here, and the fault suite's
//! checker would see it.
//!
//! Bounded: the held writes are at most what was written since the last fsync, which the
//! sync thread issues continuously while anything waits for durability.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;

/// Writes not yet covered by an fsync: `(offset, bytes)` in write order.
type Pending = Vec<(u64, Vec<u8>)>;

pub(crate) struct SegFile {
    file: File,
    /// `Some` when the power-loss model is on.
    pending: Option<Mutex<Pending>>,
}

impl SegFile {
    pub(crate) fn new(file: File, lose_unsynced_writes: bool) -> SegFile {
        SegFile { file, pending: lose_unsynced_writes.then(|| Mutex::new(Vec::new())) }
    }

    fn pending(&self) -> Option<std::sync::MutexGuard<'_, Pending>> {
        self.pending.as_ref().map(|m| m.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub(crate) fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        match self.pending() {
            Some(mut p) => {
                p.push((offset, buf.to_vec()));
                Ok(())
            }
            None => self.file.write_all_at(buf, offset),
        }
    }

    /// Reads `buf.len()` bytes at `offset`: from the file, overlaid with held writes.
    pub(crate) fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let Some(p) = self.pending() else { return self.file.read_exact_at(buf, offset) };
        let end = offset + buf.len() as u64;
        // What the file has (it may end inside the range: the rest is held in memory).
        let mut have = 0usize;
        while have < buf.len() {
            match self.file.read_at(&mut buf[have..], offset + have as u64) {
                Ok(0) => break,
                Ok(n) => have += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let mut covered_to = offset + have as u64;
        for (w_off, bytes) in p.iter() {
            let w_end = w_off + bytes.len() as u64;
            let (lo, hi) = ((*w_off).max(offset), w_end.min(end));
            if lo < hi {
                buf[(lo - offset) as usize..(hi - offset) as usize]
                    .copy_from_slice(&bytes[(lo - w_off) as usize..(hi - w_off) as usize]);
                if lo <= covered_to {
                    covered_to = covered_to.max(hi);
                }
            }
        }
        if covered_to < end {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end of the segment"));
        }
        Ok(())
    }

    /// Moves held writes (if any) to the file; the caller then fsyncs.
    fn release(&self) -> io::Result<()> {
        if let Some(mut p) = self.pending() {
            for (off, bytes) in p.drain(..) {
                self.file.write_all_at(&bytes, off)?;
            }
        }
        Ok(())
    }

    pub(crate) fn sync_data(&self) -> io::Result<()> {
        self.release()?;
        self.file.sync_data()
    }

    /// Cuts the file to `len` bytes (held writes are moved to the file first).
    pub(crate) fn set_len(&self, len: u64) -> io::Result<()> {
        self.release()?;
        self.file.set_len(len)
    }

    pub(crate) fn sync_all(&self) -> io::Result<()> {
        self.release()?;
        self.file.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file() -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("seg");
        (dir, path)
    }

    fn open(path: &std::path::Path, lazy: bool) -> SegFile {
        let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path);
        SegFile::new(f.expect("open"), lazy)
    }

    #[test]
    fn unsynced_writes_are_readable_but_lost_without_an_fsync() {
        let (_d, path) = file();
        let f = open(&path, true);
        f.write_all_at(b"hello ", 0).expect("write");
        f.sync_data().expect("sync");
        f.write_all_at(b"world", 6).expect("write");
        f.write_all_at(b"W", 6).expect("overwrite");
        let mut buf = [0u8; 11];
        f.read_exact_at(&mut buf, 0).expect("read");
        assert_eq!(&buf, b"hello World");
        drop(f); // the process "dies": held writes are gone
        assert_eq!(std::fs::read(&path).expect("read file"), b"hello ");
    }

    #[test]
    fn synced_writes_survive_in_order() {
        let (_d, path) = file();
        let f = open(&path, true);
        f.write_all_at(b"abcdef", 0).expect("write");
        f.write_all_at(b"XY", 2).expect("write");
        f.sync_all().expect("sync");
        drop(f);
        assert_eq!(std::fs::read(&path).expect("read file"), b"abXYef");
    }

    #[test]
    fn a_read_past_everything_written_fails() {
        let (_d, path) = file();
        let f = open(&path, true);
        f.write_all_at(b"abc", 0).expect("write");
        let mut buf = [0u8; 4];
        assert_eq!(f.read_exact_at(&mut buf, 0).expect_err("short").kind(), io::ErrorKind::UnexpectedEof);
        let plain = open(&path, false);
        plain.write_all_at(b"abc", 0).expect("write");
        assert_eq!(std::fs::read(&path).expect("read file"), b"abc");
    }
}
