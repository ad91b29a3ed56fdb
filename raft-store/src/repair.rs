//! Damaged files: moving them aside (quarantine) and the repair marker.
//!
//! A node that finds its WAL corrupt (a CRC mismatch anywhere but a torn tail, a segment cut
//! at a record boundary, a missing segment) cannot trust any vote, committed id or entry in
//! it. It keeps the damaged files for the operator under `quarantine/`, starts an empty WAL,
//! and writes the repair marker first, so that a crash at any point of the repair leaves a
//! node that still knows it is repairing. While the marker exists the node neither votes
//! nor campaigns (the broker enforces it); the broker removes the marker once every shard
//! has caught up from a leader (see `ARCHITECTURE.md`, "Repair after corruption").
//!
//! ```text
//! marker file "REPAIRING" = magic "HABARRPR" (8) | version u8 | since_unix_ms u64 LE | reason_len u32 LE | reason (UTF-8) | crc32c u32 LE of everything before
//! ```
//!
//! A marker that is present but does not decode still means "repairing" (fail safe).

use std::fs;
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::path::PathBuf;

use crate::error::io_err;
use crate::error::StoreError;

pub const MARKER_FILE: &str = "REPAIRING";
const MARKER_MAGIC: &[u8; 8] = b"HABARRPR";
const MARKER_VERSION: u8 = 1;
/// Longest reason kept in the marker.
const MAX_REASON_BYTES: usize = 4096;

/// Why and since when a node is repairing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepairMarker {
    pub since_unix_ms: u64,
    pub reason: String,
}

pub fn marker_path(data_dir: &Path) -> PathBuf {
    data_dir.join(MARKER_FILE)
}

fn encode_marker(m: &RepairMarker) -> Vec<u8> {
    let mut reason = m.reason.as_bytes();
    if reason.len() > MAX_REASON_BYTES {
        let mut cut = MAX_REASON_BYTES;
        while !m.reason.is_char_boundary(cut) {
            cut -= 1;
        }
        reason = &reason[..cut];
    }
    let mut out = Vec::with_capacity(25 + reason.len());
    out.extend_from_slice(MARKER_MAGIC);
    out.push(MARKER_VERSION);
    out.extend_from_slice(&m.since_unix_ms.to_le_bytes());
    out.extend_from_slice(&(reason.len() as u32).to_le_bytes());
    out.extend_from_slice(reason);
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

fn decode_marker(b: &[u8]) -> Result<RepairMarker, String> {
    if b.len() < 25 {
        return Err(format!("marker is {} bytes, at least 25 expected", b.len()));
    }
    let (body, crc) = b.split_at(b.len() - 4);
    if crc32c::crc32c(body).to_le_bytes() != crc {
        return Err("marker crc mismatch".into());
    }
    if &body[..8] != MARKER_MAGIC {
        return Err("bad marker magic".into());
    }
    if body[8] != MARKER_VERSION {
        return Err(format!("unsupported marker version {}", body[8]));
    }
    let mut since = [0u8; 8];
    since.copy_from_slice(&body[9..17]);
    let mut len = [0u8; 4];
    len.copy_from_slice(&body[17..21]);
    let len = u32::from_le_bytes(len) as usize;
    if body.len() != 21 + len {
        return Err(format!("marker reason length {len} does not match the file"));
    }
    Ok(RepairMarker {
        since_unix_ms: u64::from_le_bytes(since),
        reason: String::from_utf8_lossy(&body[21..]).into_owned(),
    })
}

/// The marker, if the node is repairing. An unreadable marker still counts.
pub fn read_marker(data_dir: &Path) -> Result<Option<RepairMarker>, StoreError> {
    let path = marker_path(data_dir);
    match fs::read(&path) {
        Ok(b) => Ok(Some(decode_marker(&b).unwrap_or_else(|e| RepairMarker {
            since_unix_ms: 0,
            reason: format!("repair marker {} is damaged ({e}); still repairing", path.display()),
        }))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StoreError::Io { path, source: e }),
    }
}

/// Writes the marker durably (temp file, fsync, rename, fsync of the directory).
pub fn write_marker(data_dir: &Path, marker: &RepairMarker) -> Result<(), StoreError> {
    create_dir_durably(data_dir).map_err(io_err(data_dir))?;
    let path = marker_path(data_dir);
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(&encode_marker(marker)).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, &path).map_err(io_err(&path))?;
    sync_dir(data_dir)
}

/// Removes the marker durably: the node votes again after a restart.
pub fn clear_marker(data_dir: &Path) -> Result<(), StoreError> {
    let path = marker_path(data_dir);
    match fs::remove_file(&path) {
        Ok(()) => sync_dir(data_dir),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StoreError::Io { path, source: e }),
    }
}

/// Moves `path` (a file or a directory) into `quarantine_dir` as `<name>-<unix_ms>`, fsyncing
/// both directories. Returns where it went. The damaged bytes are kept for the operator;
/// nothing reads them again.
pub fn quarantine(quarantine_dir: &Path, path: &Path) -> Result<PathBuf, StoreError> {
    create_dir_durably(quarantine_dir).map_err(io_err(quarantine_dir))?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("damaged");
    let mut dst = quarantine_dir.join(format!("{name}-{}", now_ms()));
    let mut n = 1;
    while dst.exists() {
        dst = quarantine_dir.join(format!("{name}-{}-{n}", now_ms()));
        n += 1;
    }
    fs::rename(path, &dst).map_err(io_err(path))?;
    sync_dir(quarantine_dir)?;
    if let Some(parent) = path.parent() {
        sync_dir(parent)?;
    }
    metrics::counter!("habar_quarantined_files_total").increment(1);
    Ok(dst)
}

/// Milliseconds since the Unix epoch (the marker's `since_unix_ms`, quarantine names).
pub fn now_ms() -> u64 {
    (crate::error::unix_nanos() / 1_000_000) as u64
}

pub(crate) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))
}

/// `create_dir_all`, durable: every directory it creates is fsynced into its parent, so a
/// power loss cannot take a new directory (and the fsynced files in it) away.
pub fn create_dir_durably(dir: &Path) -> std::io::Result<()> {
    let mut created = Vec::new();
    let mut d = Some(dir);
    while let Some(p) = d.filter(|p| !p.as_os_str().is_empty() && !p.exists()) {
        created.push(p);
        d = p.parent();
    }
    fs::create_dir_all(dir)?;
    for p in created {
        // A relative path's top directory has the empty path as parent: the current one.
        let parent = p.parent().filter(|q| !q.as_os_str().is_empty()).unwrap_or(Path::new("."));
        File::open(parent)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Property: the marker round-trips, and any damage to it still reads as "repairing".
    #[test]
    fn marker_round_trips_and_damage_fails_safe() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_marker(dir.path()).unwrap(), None);
        let m = RepairMarker { since_unix_ms: 42, reason: "WAL corrupt at offset 7".into() };
        write_marker(dir.path(), &m).unwrap();
        assert_eq!(read_marker(dir.path()).unwrap(), Some(m));
        let path = marker_path(dir.path());
        let mut b = fs::read(&path).unwrap();
        b[12] ^= 1;
        fs::write(&path, &b).unwrap();
        let got = read_marker(dir.path()).unwrap().expect("a damaged marker still means repairing");
        assert!(got.reason.contains("damaged"), "{}", got.reason);
        clear_marker(dir.path()).unwrap();
        assert_eq!(read_marker(dir.path()).unwrap(), None);
        clear_marker(dir.path()).unwrap();
    }

    /// Property: a quarantined directory is moved aside whole, never deleted.
    #[test]
    fn quarantine_moves_a_directory_aside() {
        let dir = tempfile::tempdir().unwrap();
        let wal = dir.path().join("wal");
        fs::create_dir_all(&wal).unwrap();
        fs::write(wal.join("00000000000000000001.wal"), b"bytes").unwrap();
        let q = dir.path().join("quarantine");
        let moved = quarantine(&q, &wal).unwrap();
        assert!(!wal.exists());
        assert_eq!(fs::read(moved.join("00000000000000000001.wal")).unwrap(), b"bytes");
        let again = {
            fs::create_dir_all(&wal).unwrap();
            quarantine(&q, &wal).unwrap()
        };
        assert_ne!(moved, again, "a second quarantine does not overwrite the first");
    }

    /// Property: `create_dir_durably` makes every missing level (and is a no-op on an existing
    /// directory); whether each was fsynced into its parent only a power cut would show.
    #[test]
    fn durable_create_makes_every_level_and_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("a").join("b").join("c");
        create_dir_durably(&deep).unwrap();
        assert!(deep.is_dir());
        create_dir_durably(&deep).unwrap();
        fs::write(dir.path().join("file"), b"x").unwrap();
        assert!(create_dir_durably(&dir.path().join("file").join("d")).is_err(), "a file in the way is an error");
    }
}
