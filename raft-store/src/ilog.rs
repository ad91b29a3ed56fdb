//! Index log files: where a checkpoint keeps its writes to the state index until the index
//! has persisted them (ARCHITECTURE.md, "Checkpoints", steps 2 and 8). The checkpoint's sled
//! batch carries one small INDEX_LOG item per group that points here, so the writes become
//! part of sled's state atomically with the rest of the batch; the open applies again every
//! log an item points to.
//!
//! ```text
//! file <sm>/index-log.<slot>, slot 0 or 1, rewritten from offset 0 by every other checkpoint
//! that has index writes: one section per group, each the frame of frame.rs around
//!     format u8 (= 1) | group u32 BE | generation u32 BE | number u64 BE | index::encode_log value
//! INDEX_LOG item value (keys::encode_value around)
//!     = format u8 (= 2) | slot u8 | offset u64 BE | bytes u32 BE
//! ```
//!
//! (Format 1 of the item is the log itself, inline: what stores written before these files
//! hold; the open still reads it.)
//!
//! Why two files are enough: checkpoint `c` with logs writes slot `s`; the next checkpoint
//! persists the index and its batch deletes `c`'s items; the checkpoint with logs after `c`
//! writes the other slot, and its batch is flushed (steps 7 and 8) before anything later
//! runs, which makes that deletion durable; only the one after that writes slot `s` again,
//! when no durable item points into it any more. A checkpoint that fails stops every later
//! one of the process (`sm.rs`, `checkpoint_failed`), so no retry takes a slot turn out of
//! this order. The open replays every item of each group's active generation and deletes
//! them (flushed) before the first checkpoint. Items of an inactive generation (deleted
//! with it, unflushed, so a crash can bring some back) are never read: the open replays
//! active generations only, and a generation never becomes active again.
//!
//! Numbers restart at 0 in every process, so a section's `(group, generation, number)`
//! cannot tell a stale section of an earlier process from the item's own; by the above, no
//! item read at open can be stale.
//!
//! Before these files the logs were sled items: 100-400 KB each, over sled's blob threshold,
//! so sled wrote each to a file of its own and deleted it later (8.7% of a node's CPU with a
//! million conversations; hundreds of blob files at a time), without fsyncing it.

use std::fs::File;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering;

use crate::error::io_err;
use crate::frame;
use crate::index;
use crate::keys;
use crate::types::GroupId;
use crate::StoreError;

/// Format byte of a section's body.
const SECTION_FORMAT: u8 = 1;
/// Format byte of an INDEX_LOG item's body that points into a file (1: the log inline).
pub const POINTER_FORMAT: u8 = 2;
/// An INDEX_LOG item's body: `format | slot | offset | bytes`.
const POINTER_LEN: usize = 1 + 1 + 8 + 4;
/// `format | group | generation | number`.
const SECTION_HEAD: usize = 1 + 4 + 4 + 8;
/// A section holds at most this many bytes (a checkpoint's writes are bounded by the
/// overlay's size long before).
const MAX_SECTION_BYTES: usize = 1 << 30;

/// One group's log of one checkpoint, to write.
pub struct Section<'a> {
    pub group: GroupId,
    pub generation: u32,
    pub number: u64,
    /// `index::encode_log`'s value.
    pub log: &'a [u8],
}

/// The two index log files of a store.
pub struct IndexLogFiles {
    paths: [PathBuf; 2],
    files: [File; 2],
    /// The slot the next write uses.
    next: AtomicUsize,
}

impl IndexLogFiles {
    /// Opens (creating, durably) `<dir>/index-log.0` and `.1`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let paths = [dir.join("index-log.0"), dir.join("index-log.1")];
        let open = |path: &Path| -> Result<File, StoreError> {
            OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).map_err(io_err(path))
        };
        let files = [open(&paths[0])?, open(&paths[1])?];
        // Every time, not only when created: a crash right after a creation leaves files
        // whose directory entries may not be durable yet.
        for (f, p) in files.iter().zip(&paths) {
            f.sync_all().map_err(io_err(p))?;
        }
        crate::repair::sync_dir(dir)?;
        Ok(IndexLogFiles { paths, files, next: AtomicUsize::new(0) })
    }

    /// Writes the sections into the next slot's file from its start and fdatasyncs it;
    /// returns the INDEX_LOG item value of each section, in order. Called by one checkpoint
    /// at a time.
    pub fn write(&self, sections: &[Section<'_>]) -> Result<Vec<Vec<u8>>, StoreError> {
        let slot = self.next.load(Ordering::Relaxed) & 1;
        let mut buf = Vec::with_capacity(sections.iter().map(|s| frame::FRAME_LEN + SECTION_HEAD + s.log.len()).sum());
        let mut items = Vec::with_capacity(sections.len());
        for s in sections {
            if SECTION_HEAD + s.log.len() > MAX_SECTION_BYTES {
                return Err(StoreError::Encode(format!(
                    "an index log of {} bytes, over the {MAX_SECTION_BYTES} a section holds",
                    s.log.len()
                )));
            }
            let offset = buf.len() as u64;
            frame::push(&mut buf, |b| {
                b.push(SECTION_FORMAT);
                b.extend_from_slice(&s.group.to_be_bytes());
                b.extend_from_slice(&s.generation.to_be_bytes());
                b.extend_from_slice(&s.number.to_be_bytes());
                b.extend_from_slice(s.log);
            });
            let bytes = (buf.len() as u64 - offset) as u32;
            let mut v = [0u8; POINTER_LEN];
            v[0] = POINTER_FORMAT;
            v[1] = slot as u8;
            v[2..10].copy_from_slice(&offset.to_be_bytes());
            v[10..14].copy_from_slice(&bytes.to_be_bytes());
            items.push(keys::encode_value(&v));
        }
        let (file, path) = (&self.files[slot], &self.paths[slot]);
        file.write_all_at(&buf, 0).map_err(io_err(path))?;
        file.sync_data().map_err(io_err(path))?;
        // The turn passes only now: a slot is never skipped (a failed write stops every
        // later checkpoint anyway).
        self.next.store(slot ^ 1, Ordering::Relaxed);
        Ok(items)
    }

    /// The writes of the log an INDEX_LOG item of `group`'s `generation` numbered `number`
    /// points to (its value's body, format [`POINTER_FORMAT`]), checked: the frame's CRC, the
    /// section's format, that it is this item's section, the log itself.
    pub fn read(
        &self,
        group: GroupId,
        generation: u32,
        number: u64,
        body: &[u8],
    ) -> Result<Vec<index::Write>, StoreError> {
        let bad_item = |reason: String| StoreError::Corrupt {
            what: format!("the index log item of group {group} generation {generation} number {number}"),
            offset: 0,
            reason,
        };
        if body.len() != POINTER_LEN || body[0] != POINTER_FORMAT || body[1] > 1 {
            return Err(bad_item(format!("not a pointer into an index log file ({} bytes)", body.len())));
        }
        let slot = usize::from(body[1]);
        let offset = u64::from_be_bytes(body[2..10].try_into().unwrap_or_default());
        let bytes = u32::from_be_bytes(body[10..14].try_into().unwrap_or_default()) as usize;
        let path = &self.paths[slot];
        let corrupt = |reason: String| StoreError::Corrupt { what: path.display().to_string(), offset, reason };
        if bytes > frame::FRAME_LEN + MAX_SECTION_BYTES {
            return Err(corrupt(format!("an index log item names a section of {bytes} bytes")));
        }
        let mut buf = vec![0u8; bytes];
        self.files[slot].read_exact_at(&mut buf, offset).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => {
                corrupt(format!("the file ends inside the {bytes}-byte section an item names"))
            }
            _ => io_err(path)(e),
        })?;
        let (section, end) = frame::parse(&buf, 0, MAX_SECTION_BYTES).map_err(|d| corrupt(d.to_string()))?;
        if end != bytes || section.len() < SECTION_HEAD || section[0] != SECTION_FORMAT {
            return Err(corrupt(format!(
                "not an index log section (format {:?}, {} bytes)",
                section.first(),
                section.len()
            )));
        }
        let (g, n, num) = (
            u32::from_be_bytes(section[1..5].try_into().unwrap_or_default()),
            u32::from_be_bytes(section[5..9].try_into().unwrap_or_default()),
            u64::from_be_bytes(section[9..17].try_into().unwrap_or_default()),
        );
        if (g, n, num) != (group, generation, number) {
            return Err(corrupt(format!(
                "the section is group {g} generation {n} log {num}, the item wants group {group} generation {generation} log {number}"
            )));
        }
        index::decode_log(&section[SECTION_HEAD..]).map_err(|e| corrupt(e.0))
    }
}
