//! Disk damage for the corruption faults (fault 6): what a failing disk or a stray write
//! does to a stopped node's files. Every choice comes from the fault's `pick`, so a seed
//! repeats the same damage to the same files (given the same files).
//!
//! The WAL's byte layout is read only as far as needed to find record boundaries
//! (`raft-store/src/wal/record.rs`: a 24-byte header, then `len u32 | crc u32 | body`).
//! The damage is always of a kind the node must detect: a flipped byte inside a complete
//! record or a header, an older segment cut at a record boundary, a missing segment. A cut
//! of the *last* segment is left out on purpose: it is indistinguishable from a torn write,
//! which the node repairs by cutting (see `docs/RELIABILITY.md`, "What is not covered").

use std::fs;
use std::path::Path;
use std::path::PathBuf;

use anyhow::Context;
use rand::rngs::StdRng;
use rand::Rng;
use rand::SeedableRng;

const WAL_HEADER: usize = 24;
const FRAME: usize = 8;

fn files_with_ext(dir: &Path, ext: &str) -> anyhow::Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = match fs::read_dir(dir) {
        Ok(rd) => {
            rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|e| e == ext)).collect()
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    v.sort();
    Ok(v)
}

/// Start offsets of the complete records of a segment's bytes.
pub fn record_starts(bytes: &[u8]) -> Vec<usize> {
    let mut out = Vec::new();
    let mut pos = WAL_HEADER;
    while pos + FRAME <= bytes.len() {
        let len = u32::from_le_bytes([bytes[pos], bytes[pos + 1], bytes[pos + 2], bytes[pos + 3]]) as usize;
        let end = pos + FRAME + len;
        if len == 0 || end > bytes.len() {
            break;
        }
        out.push(pos);
        pos = end;
    }
    out
}

/// Damages the WAL in `wal_dir` (the node must be stopped). Returns what was done.
pub fn corrupt_wal(wal_dir: &Path, pick: u64) -> anyhow::Result<String> {
    let segs = files_with_ext(wal_dir, "wal")?;
    anyhow::ensure!(!segs.is_empty(), "no WAL segment in {}", wal_dir.display());
    let mut rng = StdRng::seed_from_u64(pick ^ 0xDA3A_6E00);
    let name = |p: &Path| p.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
    // Among the kinds of damage this WAL allows, uniformly.
    let mut modes = vec![0u8, 3];
    if segs.len() >= 2 {
        modes.push(1);
    }
    if segs.len() >= 3 {
        modes.push(2);
    }
    let mode = modes[rng.gen_range(0..modes.len())];
    match mode {
        // An older segment cut at a record boundary: whole records gone, every CRC left fine.
        1 if segs.len() >= 2 => {
            let seg = &segs[rng.gen_range(0..segs.len() - 1)];
            let bytes = fs::read(seg).with_context(|| format!("reading {}", seg.display()))?;
            let starts = record_starts(&bytes);
            if let Some(&cut) = starts.get(rng.gen_range(0..starts.len().max(1))) {
                fs::write(seg, &bytes[..cut]).with_context(|| format!("cutting {}", seg.display()))?;
                return Ok(format!("cut {} at record boundary {cut} of {}", name(seg), bytes.len()));
            }
        }
        // A segment from the middle is gone.
        2 if segs.len() >= 3 => {
            let seg = &segs[rng.gen_range(1..segs.len() - 1)];
            fs::remove_file(seg).with_context(|| format!("removing {}", seg.display()))?;
            return Ok(format!("removed segment {} of {}", name(seg), segs.len()));
        }
        // A segment's header.
        3 => {
            let seg = &segs[rng.gen_range(0..segs.len())];
            let mut bytes = fs::read(seg).with_context(|| format!("reading {}", seg.display()))?;
            if bytes.len() >= WAL_HEADER {
                let at = rng.gen_range(0..WAL_HEADER);
                bytes[at] ^= 1 << rng.gen_range(0..8);
                fs::write(seg, &bytes).with_context(|| format!("writing {}", seg.display()))?;
                return Ok(format!("flipped a bit of {}'s header at byte {at}", name(seg)));
            }
        }
        _ => {}
    }
    // A bit inside a complete record (any segment, any record, the last one included).
    for _ in 0..segs.len() * 2 {
        let seg = &segs[rng.gen_range(0..segs.len())];
        let mut bytes = fs::read(seg).with_context(|| format!("reading {}", seg.display()))?;
        let starts = record_starts(&bytes);
        if starts.is_empty() {
            continue;
        }
        let start = starts[rng.gen_range(0..starts.len())];
        let len = u32::from_le_bytes([bytes[start], bytes[start + 1], bytes[start + 2], bytes[start + 3]]) as usize;
        // Inside the body: the CRC must catch it.
        let at = start + FRAME + rng.gen_range(0..len);
        bytes[at] ^= 1 << rng.gen_range(0..8);
        fs::write(seg, &bytes).with_context(|| format!("writing {}", seg.display()))?;
        return Ok(format!(
            "flipped a bit of {} at byte {at} (record at {start}, {} records)",
            name(seg),
            starts.len()
        ));
    }
    anyhow::bail!("no complete WAL record to damage in {}", wal_dir.display())
}

/// Damages one snapshot file in `snap_dir` (the node must be stopped): a flipped bit or a
/// cut. `None` when the node has no snapshot file yet.
pub fn corrupt_snapshot(snap_dir: &Path, pick: u64) -> anyhow::Result<Option<String>> {
    let snaps = files_with_ext(snap_dir, "snap")?;
    if snaps.is_empty() {
        return Ok(None);
    }
    let mut rng = StdRng::seed_from_u64(pick ^ 0x5A4B_0000);
    let snap = &snaps[rng.gen_range(0..snaps.len())];
    let mut bytes = fs::read(snap).with_context(|| format!("reading {}", snap.display()))?;
    anyhow::ensure!(!bytes.is_empty(), "snapshot {} is empty", snap.display());
    let name = snap.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
    let at = rng.gen_range(0..bytes.len());
    if rng.gen_bool(0.5) {
        bytes[at] ^= 1 << rng.gen_range(0..8);
        fs::write(snap, &bytes).with_context(|| format!("writing {}", snap.display()))?;
        Ok(Some(format!("flipped a bit of snapshot {name} at byte {at} of {}", bytes.len())))
    } else {
        fs::write(snap, &bytes[..at]).with_context(|| format!("cutting {}", snap.display()))?;
        Ok(Some(format!("cut snapshot {name} to {at} of {} bytes", bytes.len())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_segment(records: &[&[u8]]) -> Vec<u8> {
        let mut b = vec![0u8; WAL_HEADER];
        for r in records {
            b.extend_from_slice(&(r.len() as u32).to_le_bytes());
            b.extend_from_slice(&crc32c_stub(r).to_le_bytes());
            b.extend_from_slice(r);
        }
        b
    }

    fn crc32c_stub(r: &[u8]) -> u32 {
        r.iter().map(|x| *x as u32).sum()
    }

    #[test]
    fn record_starts_walks_the_frames_and_stops_at_a_torn_one() {
        let mut b = fake_segment(&[b"abc", b"defgh", b"i"]);
        assert_eq!(record_starts(&b), vec![24, 24 + 8 + 3, 24 + 8 + 3 + 8 + 5]);
        b.truncate(b.len() - 1);
        assert_eq!(record_starts(&b), vec![24, 24 + 8 + 3]);
    }

    /// Property: every mode changes the WAL directory, and the same pick does the same thing.
    #[test]
    fn wal_damage_is_real_and_repeatable() {
        for pick in 0..40u64 {
            let mut notes = Vec::new();
            let mut after = Vec::new();
            for _ in 0..2 {
                let dir = tempfile::tempdir().unwrap();
                for s in 1..=4u64 {
                    let recs: Vec<Vec<u8>> = (0..5).map(|i| vec![(s * 10 + i) as u8; 20 + i as usize]).collect();
                    let refs: Vec<&[u8]> = recs.iter().map(|r| r.as_slice()).collect();
                    fs::write(dir.path().join(format!("{s:020}.wal")), fake_segment(&refs)).unwrap();
                }
                let before: Vec<Vec<u8>> =
                    files_with_ext(dir.path(), "wal").unwrap().iter().map(|p| fs::read(p).unwrap()).collect();
                notes.push(corrupt_wal(dir.path(), pick).unwrap());
                let now: Vec<Vec<u8>> =
                    files_with_ext(dir.path(), "wal").unwrap().iter().map(|p| fs::read(p).unwrap()).collect();
                assert_ne!(before, now, "pick {pick}: {}", notes.last().unwrap());
                after.push(now);
            }
            assert_eq!(notes[0], notes[1]);
            assert_eq!(after[0], after[1]);
        }
    }

    /// Property: with enough segments every kind of WAL damage is chosen by some pick.
    #[test]
    fn every_kind_of_wal_damage_occurs() {
        let mut seen = std::collections::BTreeSet::new();
        for pick in 0..100u64 {
            let dir = tempfile::tempdir().unwrap();
            for s in 1..=4u64 {
                let recs: Vec<Vec<u8>> = (0..5).map(|i| vec![i + 1; 20]).collect();
                let refs: Vec<&[u8]> = recs.iter().map(|r| r.as_slice()).collect();
                fs::write(dir.path().join(format!("{s:020}.wal")), fake_segment(&refs)).unwrap();
            }
            let note = corrupt_wal(dir.path(), pick).unwrap();
            let kind = if note.contains("header") { "header" } else { note.split_whitespace().next().unwrap_or("") };
            seen.insert(kind.to_string());
        }
        let want: std::collections::BTreeSet<String> =
            ["cut", "flipped", "header", "removed"].iter().map(|s| s.to_string()).collect();
        assert_eq!(seen, want);
    }

    #[test]
    fn snapshot_damage_changes_the_file_or_says_there_is_none() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(corrupt_snapshot(dir.path(), 1).unwrap(), None);
        let p = dir.path().join("g1-00000000000000000042-1.snap");
        fs::write(&p, vec![7u8; 300]).unwrap();
        for pick in 0..10 {
            let before = fs::read(&p).unwrap();
            let note = corrupt_snapshot(dir.path(), pick).unwrap().expect("a file to damage");
            assert_ne!(before, fs::read(&p).unwrap(), "{note}");
            fs::write(&p, vec![7u8; 300]).unwrap();
        }
    }
}
