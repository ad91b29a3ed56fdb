//! WAL recovery: torn tails are cut, corruption is reported, and what was durable stays.

use std::fs;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;

use habar_raft_store::wal::WalEntry;
use habar_raft_store::Wal;
use habar_raft_store::WalConfig;
use habar_raft_store::WalError;

fn cfg(dir: &Path) -> WalConfig {
    WalConfig::new(dir)
}

fn payload(group: u32, index: u64) -> Vec<u8> {
    format!("g{group}-i{index}-{}", "x".repeat((index % 7) as usize * 10)).into_bytes()
}

fn append_sync(wal: &Wal, group: u32, range: std::ops::Range<u64>, term: u64) {
    let ps: Vec<(u64, Vec<u8>)> = range.map(|i| (i, payload(group, i))).collect();
    let lsn = wal.append(group, ps.iter().map(|(i, p)| (*i, term, p.as_slice())), None).unwrap();
    wal.wait_durable_blocking(lsn).unwrap();
}

/// The newest segment (the only one in tests with default-sized segments).
fn only_segment(dir: &Path) -> PathBuf {
    segments_of(dir).pop().unwrap()
}

/// Opens the WAL expecting corruption; returns the file, offset and reason it names.
/// `what` says what damage must not open silently.
fn open_corrupt(c: WalConfig, what: &str) -> (PathBuf, u64, String) {
    match Wal::open(c) {
        Err(WalError::Corrupt { path, offset, reason }) => (path, offset, reason),
        Err(e) => panic!("{what}: expected corruption, got {e}"),
        Ok(_) => panic!("{what} must not open silently"),
    }
}

fn all(wal: &Wal, group: u32) -> Vec<WalEntry> {
    wal.read(group, 0, u64::MAX).unwrap()
}

#[test]
fn torn_last_record_is_cut_at_every_byte_offset() {
    let dir = tempfile::tempdir().unwrap();
    let (full_len, last_start) = {
        let wal = Wal::open(cfg(dir.path())).unwrap();
        append_sync(&wal, 1, 1..10, 1);
        let before = fs::metadata(only_segment(dir.path())).unwrap().len();
        append_sync(&wal, 1, 10..11, 1);
        (fs::metadata(only_segment(dir.path())).unwrap().len(), before)
    };
    let seg = only_segment(dir.path());
    let pristine = fs::read(&seg).unwrap();
    for cut in last_start..full_len {
        fs::write(&seg, &pristine[..cut as usize]).unwrap();
        let wal = Wal::open(cfg(dir.path())).unwrap();
        let got = all(&wal, 1);
        assert_eq!(got.len(), 9, "cut at {cut}: everything before the torn record survives, nothing after");
        assert_eq!(got.last().unwrap().index, 9);
        assert_eq!(got[8].payload, payload(1, 9));
        drop(wal);
        assert_eq!(fs::metadata(&seg).unwrap().len(), last_start, "cut at {cut}: torn tail removed from the file");
        // The log accepts appends after the cut and they survive a reopen.
        let wal = Wal::open(cfg(dir.path())).unwrap();
        append_sync(&wal, 1, 10..11, 2);
        drop(wal);
        let wal = Wal::open(cfg(dir.path())).unwrap();
        let got = all(&wal, 1);
        assert_eq!(got.len(), 10);
        assert_eq!(got[9].term, 2);
    }
}

#[test]
fn torn_tail_of_zeros_is_cut() {
    let dir = tempfile::tempdir().unwrap();
    {
        let wal = Wal::open(cfg(dir.path())).unwrap();
        append_sync(&wal, 3, 1..5, 1);
    }
    let seg = only_segment(dir.path());
    let len = fs::metadata(&seg).unwrap().len();
    // A crash after the file grew but before its data reached the disk leaves zeros.
    OpenOptions::new().write(true).open(&seg).unwrap().write_all_at(&[0u8; 4096], len).unwrap();
    let wal = Wal::open(cfg(dir.path())).unwrap();
    assert_eq!(all(&wal, 3).len(), 4);
}

#[test]
fn flipped_byte_in_the_middle_is_reported_with_file_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let mid = {
        let wal = Wal::open(cfg(dir.path())).unwrap();
        append_sync(&wal, 1, 1..5, 1);
        let mid = fs::metadata(only_segment(dir.path())).unwrap().len();
        append_sync(&wal, 1, 5..20, 1);
        mid
    };
    let seg = only_segment(dir.path());
    let mut bytes = fs::read(&seg).unwrap();
    // Flip a byte inside the payload of the record that starts at `mid`.
    bytes[mid as usize + 30] ^= 0x40;
    fs::write(&seg, &bytes).unwrap();
    let (path, offset, reason) = open_corrupt(cfg(dir.path()), "a corrupt record in the middle");
    assert_eq!(path, seg);
    assert_eq!(offset, mid, "offset of the damaged record");
    assert!(reason.contains("crc"), "{reason}");
}

#[test]
fn corrupt_non_last_segment_is_an_error_even_at_its_end() {
    let dir = tempfile::tempdir().unwrap();
    let c = small_segments(dir.path());
    let first = segments_of(dir.path()).remove(0);
    let len = fs::metadata(&first).unwrap().len();
    // Truncating an older segment loses acknowledged data: never a silent cut.
    OpenOptions::new().write(true).open(&first).unwrap().set_len(len - 3).unwrap();
    open_corrupt(c, "an older segment cut inside a record");
}

#[test]
fn vote_truncate_purge_and_committed_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let wal = Wal::open(cfg(dir.path())).unwrap();
        append_sync(&wal, 7, 1..11, 1);
        let l = wal.save_vote(7, b"vote-a").unwrap();
        wal.wait_durable_blocking(l).unwrap();
        let l = wal.truncate_from(7, 8).unwrap();
        wal.wait_durable_blocking(l).unwrap();
        append_sync(&wal, 7, 8..9, 2);
        let l = wal.purge(7, 3, 1).unwrap();
        wal.wait_durable_blocking(l).unwrap();
        let l = wal.save_committed(7, b"c-5").unwrap();
        wal.wait_durable_blocking(l).unwrap();
    }
    let wal = Wal::open(cfg(dir.path())).unwrap();
    let st = wal.group_state(7);
    assert_eq!(st.vote.as_deref(), Some(&b"vote-a"[..]));
    assert_eq!(st.committed.as_deref(), Some(&b"c-5"[..]));
    assert_eq!(st.last_purged, Some((3, 1)));
    assert_eq!(st.last, Some((8, 2)));
    let got = all(&wal, 7);
    assert_eq!(got.iter().map(|e| e.index).collect::<Vec<_>>(), vec![4, 5, 6, 7, 8]);
    assert_eq!(got[4].term, 2);
}

#[test]
fn segments_are_deleted_once_every_group_purged_past_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(dir.path());
    c.segment_bytes = 4096;
    let wal = Wal::open(c.clone()).unwrap();
    for i in 1..300u64 {
        append_sync(&wal, 1, i..i + 1, 1);
        append_sync(&wal, 2, i..i + 1, 1);
    }
    let before = wal.segments().len();
    assert!(before > 5);
    // Group 1 purges nearly all; group 2 nothing: no segment may go.
    let l = wal.purge(1, 290, 1).unwrap();
    wal.wait_durable_blocking(l).unwrap();
    assert_eq!(wal.delete_obsolete_segments().unwrap(), 0);
    // Now group 2 purges too: old segments go, the rest stays readable.
    let l = wal.purge(2, 280, 1).unwrap();
    wal.wait_durable_blocking(l).unwrap();
    let deleted = wal.delete_obsolete_segments().unwrap();
    assert!(deleted > 0);
    assert_eq!(wal.segments().len(), before - deleted);
    let l = wal.save_vote(2, b"v").unwrap();
    wal.wait_durable_blocking(l).unwrap();
    drop(wal);
    let wal = Wal::open(c).unwrap();
    assert_eq!(all(&wal, 1).first().unwrap().index, 291);
    assert_eq!(all(&wal, 2).first().unwrap().index, 281);
    assert_eq!(all(&wal, 2).last().unwrap().index, 299);
    assert_eq!(wal.group_state(1).last_purged, Some((290, 1)));
    assert_eq!(wal.group_state(2).vote.as_deref(), Some(&b"v"[..]));
}

#[test]
fn group_commit_shares_fdatasyncs_between_groups() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Arc::new(Wal::open(cfg(dir.path())).unwrap());
    let groups = 16u32;
    let per_group = 200u64;
    let threads: Vec<_> = (0..groups)
        .map(|g| {
            let wal = wal.clone();
            std::thread::spawn(move || {
                let (tx, rx) = std::sync::mpsc::channel();
                // Each thread keeps several appends in flight, as openraft does.
                for i in 1..=per_group {
                    let p = payload(g, i);
                    let tx = tx.clone();
                    wal.append(g, [(i, 1, p.as_slice())], Some(Box::new(move |r| tx.send(r).unwrap()))).unwrap();
                }
                for _ in 0..per_group {
                    rx.recv().unwrap().unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let s = wal.stats();
    assert_eq!(s.appends, groups as u64 * per_group);
    assert!(
        s.fsyncs * 4 < s.appends,
        "{} fdatasyncs for {} appends: group commit must share syncs",
        s.fsyncs,
        s.appends
    );
}

/// Segments of a WAL with small segments, oldest first.
fn segments_of(dir: &Path) -> Vec<PathBuf> {
    let mut segs: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "wal"))
        .collect();
    segs.sort();
    segs
}

fn small_segments(dir: &Path) -> WalConfig {
    let mut c = cfg(dir);
    c.segment_bytes = 2048;
    {
        let wal = Wal::open(c.clone()).unwrap();
        for i in 1..200 {
            append_sync(&wal, 1, i..i + 1, 1);
        }
        assert!(wal.segments().len() > 3);
    }
    c
}

/// Property (fault 6): an older segment cut at a record boundary (whole records gone, every
/// remaining CRC fine) is corruption, not a clean log: its seal is missing.
#[test]
fn older_segment_cut_at_a_record_boundary_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let c = small_segments(dir.path());
    let segs = segments_of(dir.path());
    let victim = &segs[1];
    let bytes = fs::read(victim).unwrap();
    // Walk the records and cut right before the last one (the seal): a clean boundary.
    let mut pos = 24;
    let mut starts = Vec::new();
    while pos < bytes.len() {
        starts.push(pos);
        let len = u32::from_le_bytes(bytes[pos..pos + 4].try_into().unwrap()) as usize;
        pos += 8 + len;
    }
    assert_eq!(pos, bytes.len());
    for cut in [starts[starts.len() - 1], starts[starts.len() - 2]] {
        fs::write(victim, &bytes[..cut]).unwrap();
        let (path, _, reason) = open_corrupt(c.clone(), &format!("a segment cut at a record boundary (at {cut})"));
        assert_eq!(&path, victim);
        assert!(reason.contains("seal"), "{reason}");
    }
}

/// Property (fault 6): a segment missing from the middle of the WAL is corruption.
#[test]
fn missing_middle_segment_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let c = small_segments(dir.path());
    let segs = segments_of(dir.path());
    fs::remove_file(&segs[2]).unwrap();
    let (_, _, reason) = open_corrupt(c, "a missing segment");
    assert!(reason.contains("missing") || reason.contains("hole"), "{reason}");
}

/// Property (fault 6): a bit flip in the last, complete record of the last segment is
/// corruption, not a torn write: cutting it would silently drop an acknowledged entry.
#[test]
fn flipped_bit_in_the_last_complete_record_is_corruption() {
    let dir = tempfile::tempdir().unwrap();
    {
        let wal = Wal::open(cfg(dir.path())).unwrap();
        append_sync(&wal, 1, 1..10, 1);
    }
    let seg = only_segment(dir.path());
    let mut bytes = fs::read(&seg).unwrap();
    let n = bytes.len();
    bytes[n - 2] ^= 0x01;
    fs::write(&seg, &bytes).unwrap();
    let (path, _, reason) = open_corrupt(cfg(dir.path()), "a flipped bit in the last record (not a torn write)");
    assert_eq!(path, seg);
    assert!(reason.contains("crc"), "{reason}");
}

/// Property: a crash right after a segment was sealed (before the next one exists) opens
/// cleanly, keeps everything, and appends go to a new segment, never after the seal.
#[test]
fn crash_between_seal_and_next_segment_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let c = small_segments(dir.path());
    let segs = segments_of(dir.path());
    // Drop the newest segment: the one before it ends with its seal and is now the last.
    fs::remove_file(segs.last().unwrap()).unwrap();
    let kept = {
        let wal = Wal::open(c.clone()).unwrap();
        let kept = all(&wal, 1).len();
        assert!(kept > 100);
        assert_eq!(wal.segments().len(), segs.len(), "a new segment replaces the removed one");
        append_sync(&wal, 1, kept as u64 + 1..kept as u64 + 2, 1);
        kept
    };
    let wal = Wal::open(c).unwrap();
    assert_eq!(all(&wal, 1).len(), kept + 1);
}
