//! The byte layout of WAL segments and records: the only place that knows it.
//!
//! ```text
//! segment file  = header record* [SEAL]
//! header (24 B) = magic "HABARWAL" (8) | format version u8 | reserved [u8; 3] | segment seq u64 LE | crc32c u32 LE of the 20 bytes before
//! record        = body_len u32 LE | crc32c u32 LE of body | body
//! body          = kind u8 | group u32 LE | kind-specific fields
//!   ENTRY       = index u64 LE | term u64 LE | payload (the rest)
//!   TRUNCATE    = first removed index u64 LE          (entries >= it are gone)
//!   PURGE       = index u64 LE | term u64 LE           (entries <= index are gone; log id of the last purged)
//!   VOTE        = opaque vote bytes (postcard, written by the log-store adapter)
//!   COMMITTED   = opaque committed-log-id bytes
//!   CHECKPOINT  = group meta of every group (first record of every segment after the first)
//!   SEAL        = offset of this record u64 LE | next segment seq u64 LE
//!                 (version 2: the last record of every segment that is not the last one)
//! ```
//!
//! Version 1 segments have no SEAL; they are still read. A version 2 segment that is not the
//! last must end with a SEAL naming its own offset, so a non-last segment cut at a record
//! boundary (whole records lost, every remaining CRC fine) is detected as corruption.

use crate::types::GroupId;

pub const MAGIC: &[u8; 8] = b"HABARWAL";
/// On-disk format version of segments and records written now. Bump it when either changes.
pub const FORMAT_VERSION: u8 = 2;
/// Oldest segment version still read (version 1: no SEAL records).
pub const MIN_FORMAT_VERSION: u8 = 1;
pub const HEADER_LEN: usize = 24;
pub use crate::frame::FRAME_LEN;
/// `kind` + `group`.
pub const BODY_PREFIX_LEN: usize = 5;

pub const KIND_ENTRY: u8 = 1;
pub const KIND_TRUNCATE: u8 = 2;
pub const KIND_PURGE: u8 = 3;
pub const KIND_VOTE: u8 = 4;
pub const KIND_COMMITTED: u8 = 5;
pub const KIND_CHECKPOINT: u8 = 6;
pub const KIND_SEAL: u8 = 7;

pub fn encode_header(seq: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(MAGIC);
    h[8] = FORMAT_VERSION;
    h[12..20].copy_from_slice(&seq.to_le_bytes());
    let crc = crc32c::crc32c(&h[..20]);
    h[20..24].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Checks a segment header; returns its sequence number and format version, or a
/// description of what is wrong.
pub fn decode_header(h: &[u8]) -> Result<(u64, u8), String> {
    if h.len() < HEADER_LEN {
        return Err(format!("header is {} bytes, expected {HEADER_LEN}", h.len()));
    }
    if &h[..8] != MAGIC {
        return Err("bad magic".into());
    }
    let crc = u32::from_le_bytes([h[20], h[21], h[22], h[23]]);
    if crc32c::crc32c(&h[..20]) != crc {
        return Err("header crc mismatch".into());
    }
    if !(MIN_FORMAT_VERSION..=FORMAT_VERSION).contains(&h[8]) {
        return Err(format!(
            "unsupported format version {} (this build reads {MIN_FORMAT_VERSION} to {FORMAT_VERSION})",
            h[8]
        ));
    }
    Ok((le_u64(&h[12..20]), h[8]))
}

/// Appends one framed record of `kind` and `group` to `buf`; `body` writes the
/// kind-specific fields.
pub fn push_record(buf: &mut Vec<u8>, kind: u8, group: GroupId, body: impl FnOnce(&mut Vec<u8>)) {
    crate::frame::push(buf, |b| {
        b.push(kind);
        b.extend_from_slice(&group.to_le_bytes());
        body(b);
    });
}

pub fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

pub fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

/// A record body after its frame was checked.
#[derive(Debug)]
pub enum Body<'a> {
    Entry { group: GroupId, index: u64, term: u64, payload: &'a [u8] },
    Truncate { group: GroupId, from: u64 },
    Purge { group: GroupId, index: u64, term: u64 },
    Vote { group: GroupId, bytes: &'a [u8] },
    Committed { group: GroupId, bytes: &'a [u8] },
    Checkpoint { bytes: &'a [u8] },
    Seal { offset: u64, next: u64 },
}

/// Parses a body whose CRC already matched. A body that is well framed but malformed
/// is corruption (or a bug), reported as a description.
pub fn decode_body(b: &[u8]) -> Result<Body<'_>, String> {
    if b.len() < BODY_PREFIX_LEN {
        return Err(format!("record body of {} bytes is too short", b.len()));
    }
    let kind = b[0];
    let group = le_u32(&b[1..5]);
    let rest = &b[BODY_PREFIX_LEN..];
    let need = |n: usize| -> Result<(), String> {
        if rest.len() < n {
            Err(format!("record of kind {kind} has {} bytes after its prefix, needs {n}", rest.len()))
        } else {
            Ok(())
        }
    };
    Ok(match kind {
        KIND_ENTRY => {
            need(16)?;
            Body::Entry { group, index: le_u64(&rest[..8]), term: le_u64(&rest[8..16]), payload: &rest[16..] }
        }
        KIND_TRUNCATE => {
            need(8)?;
            Body::Truncate { group, from: le_u64(&rest[..8]) }
        }
        KIND_PURGE => {
            need(16)?;
            Body::Purge { group, index: le_u64(&rest[..8]), term: le_u64(&rest[8..16]) }
        }
        KIND_VOTE => Body::Vote { group, bytes: rest },
        KIND_COMMITTED => Body::Committed { group, bytes: rest },
        KIND_CHECKPOINT => Body::Checkpoint { bytes: rest },
        KIND_SEAL => {
            need(16)?;
            Body::Seal { offset: le_u64(&rest[..8]), next: le_u64(&rest[8..16]) }
        }
        other => return Err(format!("unknown record kind {other}")),
    })
}

/// Checkpoint payload: per group, the state that records in deleted segments carried.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GroupMeta {
    pub group: GroupId,
    /// `(index, term)` of the last purged entry.
    pub last_purged: Option<(u64, u64)>,
    pub vote: Option<Vec<u8>>,
    pub committed: Option<Vec<u8>>,
}
