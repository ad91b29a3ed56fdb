//! Snapshot files: one group's state machine data at one applied log id, streamed to and
//! from disk in bounded pieces (never a whole shard in memory).
//!
//! ```text
//! header  = magic "HABARSNP" (8) | format version u8 | group u32 LE | meta_len u32 LE | meta (postcard SnapshotMeta) | crc32c u32 LE of everything before
//! record* = key_len u32 LE | value_len u32 LE | crc32c u32 LE of key+value | key | value
//!           (key without its [version][group][generation] prefix)
//! trailer = 0xFFFF_FFFF u32 | record count u64 LE | crc32c u32 LE of all record bytes
//! ```

use std::fs;
use std::fs::File;
use std::fs::OpenOptions;
use std::io;
use std::io::BufReader;
use std::io::BufWriter;
use std::io::Read;
use std::io::Write;
use std::path::Path;
use std::path::PathBuf;

use crate::error::io_err;
use crate::error::unix_nanos;
use crate::error::StoreError;
use crate::types::GroupId;
use crate::types::SnapshotMeta;

/// One `(key, value)` record of a snapshot.
pub type Record = (Vec<u8>, Vec<u8>);

pub const MAGIC: &[u8; 8] = b"HABARSNP";
pub const FORMAT_VERSION: u8 = 1;
const TRAILER_MARK: u32 = u32::MAX;
/// Largest key or value a snapshot record may hold.
pub const MAX_RECORD_PART: u32 = 64 << 20;
/// Largest snapshot file a node accepts from a peer.
pub const MAX_SNAPSHOT_BYTES: u64 = 64 << 30;

/// A snapshot file on disk: the state machine's `SnapshotData`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotData {
    path: PathBuf,
    len: u64,
}

impl SnapshotData {
    pub fn new(path: PathBuf, len: u64) -> Self {
        Self { path, len }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Opens the file for reading from the start, e.g. to stream it to a peer in chunks.
    pub fn open(&self) -> io::Result<File> {
        File::open(&self.path)
    }
}

/// A snapshot being written (built here or received from a leader) is fdatasynced after
/// every this many bytes: a group's snapshot holds its whole state (190 MB after 20,000
/// entries under load), and one fsync of all of it at the end made the disk write it in one
/// burst, during which the WAL's fdatasyncs (every acknowledgement) waited: a 1-2 s stall of
/// the node when three builds ended together (docs/BENCHMARKS.md, "2026-12-05").
pub const SYNC_EVERY_BYTES: u64 = 8 << 20;

/// Counts `n` more bytes written to `out` and, once [`SYNC_EVERY_BYTES`] are unsynced,
/// flushes and fdatasyncs the file.
fn sync_every(out: &mut BufWriter<File>, unsynced: &mut u64, n: u64) -> io::Result<()> {
    *unsynced += n;
    if *unsynced >= SYNC_EVERY_BYTES {
        out.flush()?;
        out.get_ref().sync_data()?;
        *unsynced = 0;
    }
    Ok(())
}

/// Writes a snapshot file record by record, computing the CRCs as it goes.
pub struct SnapshotFileWriter {
    path: PathBuf,
    out: BufWriter<File>,
    crc: u32,
    count: u64,
    len: u64,
    /// Bytes written since the last fdatasync.
    unsynced: u64,
    /// Whether to fdatasync every `SYNC_EVERY_BYTES` (`create_unsynced`: no).
    sync: bool,
}

impl SnapshotFileWriter {
    pub fn create(path: PathBuf, group: GroupId, meta: &SnapshotMeta) -> Result<Self, StoreError> {
        let file = OpenOptions::new().write(true).create(true).truncate(true).open(&path).map_err(io_err(&path))?;
        let meta_bytes = postcard::to_allocvec(meta).map_err(|e| StoreError::Encode(format!("snapshot meta: {e}")))?;
        let mut header = Vec::with_capacity(21 + meta_bytes.len() + 4);
        header.extend_from_slice(MAGIC);
        header.push(FORMAT_VERSION);
        header.extend_from_slice(&group.to_le_bytes());
        header.extend_from_slice(&(meta_bytes.len() as u32).to_le_bytes());
        header.extend_from_slice(&meta_bytes);
        let crc = crc32c::crc32c(&header);
        header.extend_from_slice(&crc.to_le_bytes());
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(&header).map_err(io_err(&path))?;
        Ok(Self { path, out, crc: 0, count: 0, len: header.len() as u64, unsynced: 0, sync: true })
    }

    /// A file in the same format that is never fsynced (not every 8 MiB, not at the end):
    /// for a file read back by the process that writes it and never after a restart (a
    /// snapshot build's spill file), closed with [`SnapshotFileWriter::close`].
    pub fn create_unsynced(path: PathBuf, group: GroupId, meta: &SnapshotMeta) -> Result<Self, StoreError> {
        Self::create(path, group, meta).map(|w| Self { sync: false, ..w })
    }

    pub fn record(&mut self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        let mut head = [0u8; 12];
        head[..4].copy_from_slice(&(key.len() as u32).to_le_bytes());
        head[4..8].copy_from_slice(&(value.len() as u32).to_le_bytes());
        let kv_crc = crc32c::crc32c_append(crc32c::crc32c(key), value);
        head[8..].copy_from_slice(&kv_crc.to_le_bytes());
        for part in [&head[..], key, value] {
            self.out.write_all(part).map_err(io_err(&self.path))?;
            self.crc = crc32c::crc32c_append(self.crc, part);
        }
        self.count += 1;
        self.len += 12 + key.len() as u64 + value.len() as u64;
        if !self.sync {
            return Ok(());
        }
        sync_every(&mut self.out, &mut self.unsynced, 12 + key.len() as u64 + value.len() as u64)
            .map_err(io_err(&self.path))
    }

    /// Records written so far.
    pub fn records(&self) -> u64 {
        self.count
    }

    /// Writes the trailer and fsyncs the file.
    pub fn finish(self) -> Result<SnapshotData, StoreError> {
        let (path, len, file) = self.trailer()?;
        file.sync_all().map_err(io_err(&path))?;
        Ok(SnapshotData { path, len })
    }

    /// Writes the trailer, without an fsync (a file of `create_unsynced`).
    pub fn close(self) -> Result<(), StoreError> {
        self.trailer().map(|_| ())
    }

    /// Writes the trailer and flushes the buffer: the path, the file's length and the file.
    fn trailer(mut self) -> Result<(PathBuf, u64, File), StoreError> {
        let mut t = [0u8; 16];
        t[..4].copy_from_slice(&TRAILER_MARK.to_le_bytes());
        t[4..12].copy_from_slice(&self.count.to_le_bytes());
        t[12..].copy_from_slice(&self.crc.to_le_bytes());
        self.out.write_all(&t).map_err(io_err(&self.path))?;
        let file =
            self.out.into_inner().map_err(|e| StoreError::Io { path: self.path.clone(), source: e.into_error() })?;
        Ok((self.path, self.len + 16, file))
    }
}

/// Reads a snapshot file, checking every CRC; corruption names the file and offset.
pub struct SnapshotReader {
    path: PathBuf,
    input: BufReader<File>,
    pub group: GroupId,
    pub meta: SnapshotMeta,
    offset: u64,
    crc: u32,
    count: u64,
    done: bool,
}

impl SnapshotReader {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let file = File::open(path).map_err(io_err(path))?;
        let mut input = BufReader::with_capacity(1 << 20, file);
        let corrupt = |offset: u64, reason: &str| StoreError::Corrupt {
            what: path.display().to_string(),
            offset,
            reason: reason.to_string(),
        };
        let mut fixed = [0u8; 17];
        input.read_exact(&mut fixed).map_err(|_| corrupt(0, "snapshot header is truncated"))?;
        if &fixed[..8] != MAGIC {
            return Err(corrupt(0, "bad snapshot magic"));
        }
        if fixed[8] != FORMAT_VERSION {
            return Err(corrupt(8, &format!("unsupported snapshot format {}", fixed[8])));
        }
        let group = u32::from_le_bytes([fixed[9], fixed[10], fixed[11], fixed[12]]);
        let meta_len = u32::from_le_bytes([fixed[13], fixed[14], fixed[15], fixed[16]]);
        if meta_len > MAX_RECORD_PART {
            return Err(corrupt(13, &format!("snapshot meta length {meta_len} is over the limit")));
        }
        let mut meta_bytes = vec![0u8; meta_len as usize + 4];
        input.read_exact(&mut meta_bytes).map_err(|_| corrupt(17, "snapshot header is truncated"))?;
        let (meta_bytes, crc) = meta_bytes.split_at(meta_len as usize);
        let want = crc32c::crc32c_append(crc32c::crc32c(&fixed), meta_bytes);
        if want.to_le_bytes() != crc {
            return Err(corrupt(0, "snapshot header crc mismatch"));
        }
        let meta: SnapshotMeta = postcard::from_bytes(meta_bytes)
            .map_err(|e| corrupt(17, &format!("snapshot meta does not decode: {e}")))?;
        Ok(Self {
            path: path.to_path_buf(),
            input,
            group,
            meta,
            offset: 17 + u64::from(meta_len) + 4,
            crc: 0,
            count: 0,
            done: false,
        })
    }

    fn corrupt(&self, offset: u64, reason: impl Into<String>) -> StoreError {
        StoreError::Corrupt { what: self.path.display().to_string(), offset, reason: reason.into() }
    }

    /// The next `(key, value)` record, or `None` after a valid trailer.
    pub fn next_record(&mut self) -> Result<Option<Record>, StoreError> {
        if self.done {
            return Ok(None);
        }
        let at = self.offset;
        let mut head = [0u8; 12];
        self.input.read_exact(&mut head).map_err(|_| self.corrupt(at, "snapshot is truncated (no trailer)"))?;
        let klen = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
        if klen == TRAILER_MARK {
            let mut rest = [0u8; 4];
            self.input.read_exact(&mut rest).map_err(|_| self.corrupt(at, "snapshot trailer is truncated"))?;
            let count = u64::from_le_bytes(head[4..12].try_into().unwrap_or([0; 8]));
            let crc = u32::from_le_bytes(rest);
            if count != self.count {
                return Err(self.corrupt(at, format!("trailer says {count} records, file has {}", self.count)));
            }
            if crc != self.crc {
                return Err(self.corrupt(at, "snapshot records crc mismatch"));
            }
            let mut extra = [0u8; 1];
            if self.input.read(&mut extra).map_err(io_err(&self.path))? != 0 {
                return Err(self.corrupt(at + 16, "bytes after the snapshot trailer"));
            }
            self.done = true;
            return Ok(None);
        }
        let vlen = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        if klen > MAX_RECORD_PART || vlen > MAX_RECORD_PART {
            return Err(self.corrupt(at, format!("record lengths {klen}/{vlen} over the limit")));
        }
        let mut key = vec![0u8; klen as usize];
        let mut value = vec![0u8; vlen as usize];
        self.input.read_exact(&mut key).map_err(|_| self.corrupt(at, "snapshot record is truncated"))?;
        self.input.read_exact(&mut value).map_err(|_| self.corrupt(at, "snapshot record is truncated"))?;
        let kv_crc = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
        if crc32c::crc32c_append(crc32c::crc32c(&key), &value) != kv_crc {
            return Err(self.corrupt(at, "snapshot record crc mismatch"));
        }
        for part in [&head[..], &key[..], &value[..]] {
            self.crc = crc32c::crc32c_append(self.crc, part);
        }
        self.count += 1;
        self.offset += 12 + u64::from(klen) + u64::from(vlen);
        Ok(Some((key, value)))
    }

    /// Reads the whole file once, checking every CRC.
    pub fn validate(path: &Path) -> Result<(GroupId, SnapshotMeta), StoreError> {
        let mut r = Self::open(path)?;
        while r.next_record()?.is_some() {}
        Ok((r.group, r.meta))
    }
}

/// Receives a snapshot streamed from a leader, chunk by chunk, into a temp file.
pub struct SnapshotWriter {
    tmp: PathBuf,
    dir: PathBuf,
    file: Option<BufWriter<File>>,
    written: u64,
    /// Bytes written since the last fdatasync ([`SYNC_EVERY_BYTES`], as a build does).
    unsynced: u64,
    limit: u64,
}

impl SnapshotWriter {
    pub(crate) fn create(dir: &Path, group: GroupId) -> Result<Self, StoreError> {
        let nanos = unix_nanos();
        let tmp = dir.join(format!("recv-g{group}-{nanos}.tmp"));
        let file = OpenOptions::new().write(true).create_new(true).open(&tmp).map_err(io_err(&tmp))?;
        Ok(Self {
            tmp,
            dir: dir.to_path_buf(),
            file: Some(BufWriter::new(file)),
            written: 0,
            unsynced: 0,
            limit: MAX_SNAPSHOT_BYTES,
        })
    }

    pub fn write_chunk(&mut self, data: &[u8]) -> io::Result<()> {
        if self.written + data.len() as u64 > self.limit {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("snapshot larger than the limit of {} bytes", self.limit),
            ));
        }
        let Some(f) = self.file.as_mut() else {
            return Err(io::Error::other("snapshot writer already finished"));
        };
        f.write_all(data)?;
        self.written += data.len() as u64;
        sync_every(f, &mut self.unsynced, data.len() as u64)
    }

    /// Fsyncs the file, checks every CRC, and moves it beside the node's snapshots.
    pub fn finish(mut self) -> Result<SnapshotData, StoreError> {
        let Some(file) = self.file.take() else {
            return Err(StoreError::Encode("snapshot writer already finished".into()));
        };
        let file = file.into_inner().map_err(|e| StoreError::Io { path: self.tmp.clone(), source: e.into_error() })?;
        file.sync_all().map_err(io_err(&self.tmp))?;
        drop(file);
        if let Err(e) = SnapshotReader::validate(&self.tmp) {
            let _ = fs::remove_file(&self.tmp);
            return Err(e);
        }
        let path = self.tmp.with_extension("recv");
        fs::rename(&self.tmp, &path).map_err(io_err(&path))?;
        File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io_err(&self.dir))?;
        Ok(SnapshotData { path, len: self.written })
    }
}

impl Drop for SnapshotWriter {
    fn drop(&mut self) {
        // An abandoned transfer leaves no file behind (after `finish`, `tmp` is renamed).
        let _ = fs::remove_file(&self.tmp);
    }
}
