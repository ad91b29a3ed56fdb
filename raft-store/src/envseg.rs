//! Envelope segments: append-only files that hold one Raft group's envelopes, one record per
//! envelope, so that storing an envelope costs a few hundred bytes of a `write` instead of a
//! B-tree item (design: `docs/ENVELOPE-STORE.md`; this module is its step 1, the files).
//!
//! ```text
//! <dir>/<segment seq:020>.env
//! segment file  = header record*
//! header (32 B) = magic "HABARENV" (8) | format version u8 | reserved [u8; 3] | group u32 LE
//!                 | generation u32 LE | segment seq u64 LE | crc32c u32 LE of the 28 bytes before
//! record        = the frame of `frame.rs` (body_len u32 LE | crc32c u32 LE | body)
//! body          = record format u8 | log index u64 LE | seq u64 LE | committed_at_ms u64 LE
//!                 | expires_at_ms u64 LE | message_id [16] | conv_len u16 LE | conversation id
//!                 | sender_len u32 LE | sender | ciphertext_len u32 LE | ciphertext
//! ```
//!
//! **Durability.** Appends are not fsynced: the Raft WAL is the durable record, and whatever
//! the segments lose in a crash is written again when the log is re-applied. [`Segments::sync`]
//! fdatasyncs what was appended and returns a [`Durable`] mark, which the caller stores in
//! its checkpoint together with the applied log id the records cover. [`Segments::open`]
//! takes that mark back: it truncates the mark's segment to the mark's end and deletes every
//! later segment, so the files hold exactly what the checkpoint covers. A full segment is
//! fdatasynced before the next one is created, and the directory is fsynced before a
//! [`Durable`] can name a new segment, so every segment before the mark's is complete.
//!
//! Records are checked where they enter (a record over `max_record_bytes` is refused) and
//! where they leave the disk (frame, CRC, every length, and the location the caller expected).

use std::collections::BTreeMap;
use std::collections::VecDeque;
use std::fs;
use std::fs::OpenOptions;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::MutexGuard;

use bytes::Bytes;

use crate::error::io_err;
use crate::error::StoreError;
use crate::frame;
use crate::types::GroupId;
use crate::types::NewEnvelope;
use crate::types::StoredEnvelope;
use crate::types::MESSAGE_ID_LEN;
use crate::wal::seg_file::SegFile;

pub const MAGIC: &[u8; 8] = b"HABARENV";
/// Format version of segment headers written now. Bump it when the header or record changes.
pub const FORMAT_VERSION: u8 = 1;
/// Format byte at the start of every record body.
pub const RECORD_FORMAT: u8 = 1;
pub const HEADER_LEN: usize = 32;
/// The fixed part of a body: format, index, seq, committed, expires, message id, and the
/// three length fields.
const BODY_FIXED_LEN: usize = 1 + 8 * 4 + MESSAGE_ID_LEN + 2 + 4 + 4;
const SUFFIX: &str = "env";

/// Settings of one group's segments.
#[derive(Debug, Clone)]
pub struct SegConfig {
    /// A segment holding at least this many bytes gets no more records.
    pub segment_bytes: u64,
    /// The largest record body accepted (and read back).
    pub max_record_bytes: usize,
    /// Test-only power-loss model (see `wal/seg_file.rs`): writes reach the file only when an
    /// fsync covers them.
    pub lose_unsynced_writes: bool,
}

impl Default for SegConfig {
    fn default() -> Self {
        SegConfig { segment_bytes: 64 << 20, max_record_bytes: 8 << 20, lose_unsynced_writes: false }
    }
}

/// Where one record lies: its segment, the offset of its frame, and its length with the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Loc {
    pub segment: u64,
    pub offset: u64,
    pub len: u32,
}

/// What a [`Segments::sync`] made durable: every segment before `segment` whole, and
/// `segment` up to `end`. Stored in the caller's checkpoint and handed back to
/// [`Segments::open`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Durable {
    pub segment: u64,
    pub end: u64,
}

/// One envelope to append: the log index of the entry that carried it and what apply gave it.
#[derive(Debug, Clone, Copy)]
pub struct RecordRef<'a> {
    pub index: u64,
    pub seq: u64,
    pub committed_at_ms: u64,
    pub envelope: &'a NewEnvelope,
}

/// An envelope read back, with the log index of the entry that carried it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub index: u64,
    pub envelope: StoredEnvelope,
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:020}.{SUFFIX}"))
}

fn encode_header(group: GroupId, generation: u32, seq: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(MAGIC);
    h[8] = FORMAT_VERSION;
    h[12..16].copy_from_slice(&group.to_le_bytes());
    h[16..20].copy_from_slice(&generation.to_le_bytes());
    h[20..28].copy_from_slice(&seq.to_le_bytes());
    let crc = crc32c::crc32c(&h[..28]);
    h[28..32].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Checks a header against the segment it should belong to.
fn check_header(h: &[u8], group: GroupId, generation: u32, seq: u64) -> Result<(), String> {
    if h.len() < HEADER_LEN {
        return Err(format!("header is {} bytes, expected {HEADER_LEN}", h.len()));
    }
    if &h[..8] != MAGIC {
        return Err("bad magic".into());
    }
    if crc32c::crc32c(&h[..28]) != u32::from_le_bytes([h[28], h[29], h[30], h[31]]) {
        return Err("header crc mismatch".into());
    }
    if h[8] != FORMAT_VERSION {
        return Err(format!("unsupported format version {} (this build reads {FORMAT_VERSION})", h[8]));
    }
    let want = encode_header(group, generation, seq);
    if h[12..28] != want[12..28] {
        return Err(format!("header is not group {group} generation {generation} segment {seq}"));
    }
    Ok(())
}

fn push_body(buf: &mut Vec<u8>, r: &RecordRef<'_>) {
    let e = r.envelope;
    buf.push(RECORD_FORMAT);
    buf.extend_from_slice(&r.index.to_le_bytes());
    buf.extend_from_slice(&r.seq.to_le_bytes());
    buf.extend_from_slice(&r.committed_at_ms.to_le_bytes());
    buf.extend_from_slice(&e.expires_at_ms.to_le_bytes());
    buf.extend_from_slice(&e.message_id);
    buf.extend_from_slice(&(e.conversation_id.len() as u16).to_le_bytes());
    buf.extend_from_slice(e.conversation_id.as_bytes());
    buf.extend_from_slice(&(e.sender.len() as u32).to_le_bytes());
    buf.extend_from_slice(e.sender.as_bytes());
    buf.extend_from_slice(&(e.ciphertext.len() as u32).to_le_bytes());
    buf.extend_from_slice(&e.ciphertext);
}

/// Reads a body field by field; every length is checked against what is left.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err(format!("{what} needs {n} bytes, {} left in the record", self.0.len()));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u64(&mut self, what: &str) -> Result<u64, String> {
        let b = self.take(8, what)?;
        Ok(u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
    }
    fn u32(&mut self, what: &str) -> Result<u32, String> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn text(&mut self, len: usize, what: &str) -> Result<String, String> {
        let b = self.take(len, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| format!("{what} is not UTF-8"))
    }
}

fn decode_body(body: &[u8]) -> Result<Record, String> {
    let mut f = Fields(body);
    let format = f.take(1, "format")?[0];
    if format != RECORD_FORMAT {
        return Err(format!("unsupported record format {format} (this build reads {RECORD_FORMAT})"));
    }
    let index = f.u64("log index")?;
    let seq = f.u64("seq")?;
    let committed_at_ms = f.u64("committed_at_ms")?;
    let expires_at_ms = f.u64("expires_at_ms")?;
    let mut message_id = [0u8; MESSAGE_ID_LEN];
    message_id.copy_from_slice(f.take(MESSAGE_ID_LEN, "message_id")?);
    let conv_len = f.take(2, "conversation id length").map(|b| u16::from_le_bytes([b[0], b[1]]))?;
    let conversation_id = f.text(conv_len as usize, "conversation id")?;
    let sender_len = f.u32("sender length")?;
    let sender = f.text(sender_len as usize, "sender")?;
    let ciphertext_len = f.u32("ciphertext length")?;
    let ciphertext = Bytes::copy_from_slice(f.take(ciphertext_len as usize, "ciphertext")?);
    if !f.0.is_empty() {
        return Err(format!("{} bytes after the ciphertext", f.0.len()));
    }
    Ok(Record {
        index,
        envelope: StoredEnvelope {
            envelope: NewEnvelope { conversation_id, message_id, sender, ciphertext, expires_at_ms },
            seq,
            committed_at_ms,
        },
    })
}

struct Active {
    seq: u64,
    file: Arc<SegFile>,
    len: u64,
}

struct State {
    active: Active,
    /// Segments before the active one that are on disk, opened on first read.
    sealed: BTreeMap<u64, Option<Arc<SegFile>>>,
    /// Appended since the last sync.
    dirty: bool,
    /// A segment was created since the last sync: the directory needs an fsync.
    dir_dirty: bool,
    /// An fsync failed: every later append and sync fails.
    poisoned: bool,
    /// Sealed segments with an open file, oldest opened first (at most `MAX_OPEN_SEALED`).
    opened: VecDeque<u64>,
}

/// How many sealed segments of one group keep an open file for reads.
const MAX_OPEN_SEALED: usize = 16;

/// One group's (and generation's) envelope segments. Appends and syncs come from the group's
/// apply and checkpoint; reads from any thread (they hold the lock only to find the file).
pub struct Segments {
    dir: PathBuf,
    group: GroupId,
    generation: u32,
    cfg: SegConfig,
    state: Mutex<State>,
    /// Held through a whole `sync`: a second one must not return its mark while the first
    /// is still making the directory durable.
    syncing: Mutex<()>,
}

impl Segments {
    /// Opens the segments in `dir` as the checkpoint left them: with `durable`, the mark's
    /// segment is truncated to its end and later segments are deleted; without one (nothing
    /// checkpointed), every segment is deleted. Errors name the file when a segment the mark
    /// covers is missing, shorter than the mark, or has a damaged header.
    pub fn open(
        dir: &Path,
        group: GroupId,
        generation: u32,
        durable: Option<Durable>,
        cfg: SegConfig,
    ) -> Result<Segments, StoreError> {
        crate::repair::create_dir_durably(dir).map_err(io_err(dir))?;
        let mut on_disk = Vec::new();
        for item in fs::read_dir(dir).map_err(io_err(dir))? {
            let path = item.map_err(io_err(dir))?.path();
            let seq = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(&format!(".{SUFFIX}")))
                .and_then(|n| n.parse::<u64>().ok());
            match seq {
                Some(seq) => on_disk.push(seq),
                // A stray file is left alone (and named), not deleted: it is not ours.
                None => tracing::warn!(path = %path.display(), "ignoring a file that is not an envelope segment"),
            }
        }
        on_disk.sort_unstable();
        let corrupt = |seq: u64, offset: u64, reason: String| StoreError::Corrupt {
            what: segment_path(dir, seq).display().to_string(),
            offset,
            reason,
        };
        let keep_to = durable.map_or(0, |d| d.segment);
        let mut sealed = BTreeMap::new();
        for &seq in on_disk.iter().filter(|s| **s < keep_to) {
            sealed.insert(seq, None);
        }
        // Sealed segments may have gaps: the owner deletes a segment once nothing it keeps
        // points into it ([`Segments::remove`]), and checks itself that those it still
        // points into exist ([`Segments::segments`]).
        let open_rw = |path: &Path| OpenOptions::new().read(true).write(true).open(path).map_err(io_err(path));
        let active = match durable {
            Some(d) => {
                let path = segment_path(dir, d.segment);
                if !on_disk.contains(&d.segment) {
                    return Err(corrupt(d.segment, 0, "the checkpoint names this segment but it is missing".into()));
                }
                let file = open_rw(&path)?;
                let size = file.metadata().map_err(io_err(&path))?.len();
                if size < d.end || d.end < HEADER_LEN as u64 {
                    return Err(corrupt(
                        d.segment,
                        size,
                        format!("segment is {size} bytes but the checkpoint covers {} bytes of it", d.end),
                    ));
                }
                let seg = SegFile::new(file, cfg.lose_unsynced_writes);
                let mut h = [0u8; HEADER_LEN];
                seg.read_exact_at(&mut h, 0).map_err(io_err(&path))?;
                check_header(&h, group, generation, d.segment).map_err(|r| corrupt(d.segment, 0, r))?;
                if size > d.end {
                    tracing::info!(path = %path.display(), from = size, to = d.end, "cutting envelope segment back to its checkpoint");
                    seg.set_len(d.end).map_err(io_err(&path))?;
                    seg.sync_data().map_err(io_err(&path))?;
                }
                Some(Active { seq: d.segment, file: Arc::new(seg), len: d.end })
            }
            None => None,
        };
        // Only now that the mark is known to fit these files: what it does not cover goes
        // (without a mark, nothing was checkpointed: every segment is re-created by the
        // re-apply).
        let mut removed = false;
        for &seq in on_disk.iter().filter(|s| **s > keep_to) {
            let path = segment_path(dir, seq);
            tracing::info!(path = %path.display(), "deleting an envelope segment no checkpoint covers");
            fs::remove_file(&path).map_err(io_err(&path))?;
            removed = true;
        }
        let active = match active {
            Some(a) => a,
            None => Self::create(dir, group, generation, 1, &cfg)?,
        };
        let dir_dirty = removed || durable.is_none();
        let s = Segments {
            dir: dir.to_path_buf(),
            group,
            generation,
            cfg,
            syncing: Mutex::new(()),
            state: Mutex::new(State {
                active,
                sealed,
                dirty: false,
                dir_dirty,
                poisoned: false,
                opened: VecDeque::new(),
            }),
        };
        if dir_dirty {
            crate::repair::sync_dir(dir)?;
            s.lock().dir_dirty = false;
        }
        Ok(s)
    }

    /// Creates segment `seq` with its header, fsynced (the directory is not).
    fn create(dir: &Path, group: GroupId, generation: u32, seq: u64, cfg: &SegConfig) -> Result<Active, StoreError> {
        let path = segment_path(dir, seq);
        let file = OpenOptions::new().read(true).write(true).create_new(true).open(&path).map_err(io_err(&path))?;
        let file = SegFile::new(file, cfg.lose_unsynced_writes);
        file.write_all_at(&encode_header(group, generation, seq), 0).map_err(io_err(&path))?;
        file.sync_all().map_err(io_err(&path))?;
        Ok(Active { seq, file: Arc::new(file), len: HEADER_LEN as u64 })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends `records` in order, with one `write` per segment they land in, and returns
    /// where each went. Not durable until a [`Segments::sync`].
    pub fn append(&self, records: &[RecordRef<'_>]) -> Result<Vec<Loc>, StoreError> {
        let mut st = self.lock();
        self.check_poisoned(&st)?;
        let mut locs = Vec::with_capacity(records.len());
        let mut buf = Vec::with_capacity(
            records.iter().map(|r| frame::FRAME_LEN + BODY_FIXED_LEN + r.envelope.ciphertext.len()).sum(),
        );
        for r in records {
            let e = r.envelope;
            if e.conversation_id.len() > u16::MAX as usize {
                return Err(StoreError::Encode(format!(
                    "conversation id of {} bytes does not fit an envelope record ({} at most)",
                    e.conversation_id.len(),
                    u16::MAX
                )));
            }
            let body_len = BODY_FIXED_LEN + e.conversation_id.len() + e.sender.len() + e.ciphertext.len();
            if body_len > self.cfg.max_record_bytes {
                return Err(StoreError::Encode(format!(
                    "envelope record of {body_len} bytes is over max_record_bytes ({})",
                    self.cfg.max_record_bytes
                )));
            }
            let len = (frame::FRAME_LEN + body_len) as u64;
            if st.active.len + buf.len() as u64 > HEADER_LEN as u64
                && st.active.len + buf.len() as u64 + len > self.cfg.segment_bytes
            {
                self.write(&mut st, &mut buf)?;
                self.roll(&mut st)?;
            }
            locs.push(Loc { segment: st.active.seq, offset: st.active.len + buf.len() as u64, len: len as u32 });
            frame::push(&mut buf, |b| push_body(b, r));
        }
        self.write(&mut st, &mut buf)?;
        Ok(locs)
    }

    /// Appends `blobs` in order, each a whole number of records the caller framed (the
    /// state machine's runs, `runs.rs`), each kept within one segment: a blob that does not
    /// fit what is left of the active segment starts the next one. One `write` per segment.
    /// Returns `(segment, offset)` of each blob. Not durable until a [`Segments::sync`].
    pub fn append_blobs(&self, blobs: &[&[u8]]) -> Result<Vec<(u64, u64)>, StoreError> {
        let mut st = self.lock();
        self.check_poisoned(&st)?;
        let mut at = Vec::with_capacity(blobs.len());
        let mut buf = Vec::with_capacity(blobs.iter().map(|b| b.len()).sum());
        for blob in blobs {
            let end = st.active.len + buf.len() as u64;
            if end > HEADER_LEN as u64 && end + blob.len() as u64 > self.cfg.segment_bytes {
                self.write(&mut st, &mut buf)?;
                self.roll(&mut st)?;
            }
            at.push((st.active.seq, st.active.len + buf.len() as u64));
            buf.extend_from_slice(blob);
        }
        self.write(&mut st, &mut buf)?;
        Ok(at)
    }

    /// Reads `len` bytes at `offset` of segment `segment`, as they are (the caller checks
    /// the records in them).
    pub fn read_bytes(&self, segment: u64, offset: u64, len: usize) -> Result<Vec<u8>, StoreError> {
        let path = segment_path(&self.dir, segment);
        let file = self.file(segment).ok_or_else(|| StoreError::Corrupt {
            what: path.display().to_string(),
            offset,
            reason: "the envelope index names a segment that does not exist".into(),
        })??;
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, offset).map_err(io_err(&path))?;
        Ok(buf)
    }

    /// Overwrites each stretch `(segment, offset, bytes)` with zeros, one fdatasync per
    /// segment: an erasure's envelopes leave the file (SECURITY.md). Offsets of other records
    /// do not move. A stretch in a segment that is gone (deleted since) has nothing to zero.
    pub fn zero_all(&self, stretches: &[(u64, u64, u32)]) -> Result<(), StoreError> {
        let mut by_segment: BTreeMap<u64, Vec<(u64, u32)>> = BTreeMap::new();
        for &(segment, offset, bytes) in stretches {
            by_segment.entry(segment).or_default().push((offset, bytes));
        }
        for (segment, parts) in by_segment {
            let path = segment_path(&self.dir, segment);
            let known = {
                let st = self.lock();
                st.active.seq == segment || st.sealed.contains_key(&segment)
            };
            if !known {
                continue;
            }
            let file = OpenOptions::new().write(true).open(&path).map_err(io_err(&path))?;
            for (offset, bytes) in parts {
                if offset < HEADER_LEN as u64 {
                    return Err(StoreError::Corrupt {
                        what: path.display().to_string(),
                        offset,
                        reason: "refusing to zero a segment header".into(),
                    });
                }
                let zeros = vec![0u8; bytes as usize];
                std::os::unix::fs::FileExt::write_all_at(&file, &zeros, offset).map_err(io_err(&path))?;
            }
            file.sync_data().map_err(io_err(&path))?;
        }
        Ok(())
    }

    /// Writes `buf` at the end of the active segment and empties it.
    fn write(&self, st: &mut State, buf: &mut Vec<u8>) -> Result<(), StoreError> {
        if buf.is_empty() {
            return Ok(());
        }
        let path = segment_path(&self.dir, st.active.seq);
        st.active.file.write_all_at(buf, st.active.len).map_err(io_err(&path))?;
        st.active.len += buf.len() as u64;
        st.dirty = true;
        buf.clear();
        Ok(())
    }

    /// Seals the active segment (fdatasync: a segment before a checkpoint's mark must be
    /// whole) and starts the next.
    fn roll(&self, st: &mut State) -> Result<(), StoreError> {
        let old = &st.active;
        let next = old
            .file
            .sync_data()
            .map_err(io_err(&segment_path(&self.dir, old.seq)))
            .and_then(|()| Self::create(&self.dir, self.group, self.generation, old.seq + 1, &self.cfg));
        let next = match next {
            Ok(next) => next,
            Err(e) => {
                // As after a failed `sync`: the sealed segment may have lost pages (and a
                // half-made next one may exist), so nothing goes on until a reopen cuts back
                // to the last mark.
                st.poisoned = true;
                return Err(e);
            }
        };
        let old = std::mem::replace(&mut st.active, next);
        st.sealed.insert(old.seq, None);
        st.dir_dirty = true;
        Ok(())
    }

    /// Makes everything appended so far durable (fdatasync of the active segment, fsync of
    /// the directory if a segment was created) and returns the mark for the checkpoint.
    /// Appends may continue meanwhile; the mark covers those before the call.
    pub fn sync(&self) -> Result<Durable, StoreError> {
        let _one = self.syncing.lock().unwrap_or_else(|p| p.into_inner());
        let (mark, file, dirty, dir_dirty) = {
            let mut st = self.lock();
            self.check_poisoned(&st)?;
            let mark = Durable { segment: st.active.seq, end: st.active.len };
            let out = (mark, st.active.file.clone(), st.dirty, st.dir_dirty);
            st.dirty = false;
            st.dir_dirty = false;
            out
        };
        let synced =
            if dirty { file.sync_data().map_err(io_err(&segment_path(&self.dir, mark.segment))) } else { Ok(()) };
        let synced = synced.and_then(|()| if dir_dirty { crate::repair::sync_dir(&self.dir) } else { Ok(()) });
        if synced.is_err() {
            // After a failed fsync the kernel may have dropped dirty pages: nothing written
            // since the last good sync can be trusted, so no later sync may succeed.
            self.lock().poisoned = true;
        }
        synced.map(|()| mark)
    }

    fn check_poisoned(&self, st: &State) -> Result<(), StoreError> {
        if st.poisoned {
            return Err(StoreError::Io {
                path: self.dir.clone(),
                source: std::io::Error::other("an earlier fsync of the envelope segments failed; reopen the store"),
            });
        }
        Ok(())
    }

    /// Reads the record at `loc` and checks it: frame, CRC, length and body.
    pub fn read(&self, loc: Loc) -> Result<Record, StoreError> {
        let path = segment_path(&self.dir, loc.segment);
        let corrupt =
            |reason: String| StoreError::Corrupt { what: path.display().to_string(), offset: loc.offset, reason };
        let len = loc.len as usize;
        if len < frame::FRAME_LEN + BODY_FIXED_LEN || len > frame::FRAME_LEN + self.cfg.max_record_bytes {
            return Err(corrupt(format!("the envelope index gives a record length of {len} bytes")));
        }
        let buf = self.read_bytes(loc.segment, loc.offset, len)?;
        let body = match frame::parse(&buf, 0, len - frame::FRAME_LEN) {
            Ok((body, end)) if end == len => body,
            Ok((_, end)) => return Err(corrupt(format!("record is {end} bytes, the envelope index says {len}"))),
            Err(damage) => return Err(corrupt(damage.to_string())),
        };
        decode_body(body).map_err(corrupt)
    }

    /// The file of segment `seq`, opened on first use; `None` if there is no such segment.
    fn file(&self, seq: u64) -> Option<Result<Arc<SegFile>, StoreError>> {
        let mut st = self.lock();
        if seq == st.active.seq {
            return Some(Ok(st.active.file.clone()));
        }
        let slot = st.sealed.get_mut(&seq)?;
        if let Some(f) = slot {
            return Some(Ok(f.clone()));
        }
        let path = segment_path(&self.dir, seq);
        let opened = OpenOptions::new().read(true).open(&path).map_err(io_err(&path)).and_then(|file| {
            let seg = SegFile::new(file, false);
            let mut h = [0u8; HEADER_LEN];
            seg.read_exact_at(&mut h, 0).map_err(io_err(&path))?;
            check_header(&h, self.group, self.generation, seq).map_err(|reason| StoreError::Corrupt {
                what: path.display().to_string(),
                offset: 0,
                reason,
            })?;
            Ok(Arc::new(seg))
        });
        if let Ok(f) = &opened {
            *slot = Some(f.clone());
            st.opened.push_back(seq);
            if st.opened.len() > MAX_OPEN_SEALED {
                if let Some(old) = st.opened.pop_front() {
                    if let Some(slot) = st.sealed.get_mut(&old) {
                        *slot = None;
                    }
                }
            }
        }
        Some(opened)
    }

    /// Deletes sealed segment `seq` (the caller knows nothing points into it any more, and
    /// that this is durable) and fsyncs the directory. The active segment is never deleted.
    pub fn remove(&self, seq: u64) -> Result<(), StoreError> {
        let path = segment_path(&self.dir, seq);
        {
            let mut st = self.lock();
            if seq == st.active.seq {
                return Err(StoreError::Corrupt {
                    what: path.display().to_string(),
                    offset: 0,
                    reason: "refusing to delete the active envelope segment".into(),
                });
            }
            if st.sealed.remove(&seq).is_none() {
                return Ok(());
            }
            st.opened.retain(|s| *s != seq);
        }
        fs::remove_file(&path).map_err(io_err(&path))?;
        crate::repair::sync_dir(&self.dir)
    }

    /// The active segment's seq.
    pub fn active(&self) -> u64 {
        self.lock().active.seq
    }

    /// The segments on disk, oldest first (the active one last).
    pub fn segments(&self) -> Vec<u64> {
        let st = self.lock();
        st.sealed.keys().copied().chain(std::iter::once(st.active.seq)).collect()
    }
}
