//! Envelope segments (`raft-store/src/envseg.rs`): what is appended reads back, a crash keeps
//! exactly what the last sync covered, and damage is reported, never returned as data.

use std::path::Path;

use bytes::Bytes;
use habar_raft_store::envseg::Durable;
use habar_raft_store::envseg::Loc;
use habar_raft_store::envseg::RecordRef;
use habar_raft_store::envseg::SegConfig;
use habar_raft_store::envseg::Segments;
use habar_raft_store::envseg::HEADER_LEN;
use habar_raft_store::types::NewEnvelope;
use habar_raft_store::StoreError;
use proptest::prelude::*;

fn envelope(conv: &str, n: u64, size: usize) -> NewEnvelope {
    let mut message_id = [0u8; 16];
    message_id[..8].copy_from_slice(&n.to_be_bytes());
    NewEnvelope {
        conversation_id: conv.to_string(),
        message_id,
        sender: if n.is_multiple_of(2) { String::new() } else { format!("device-{n}") },
        ciphertext: Bytes::from(vec![(n % 251) as u8; size]),
        expires_at_ms: n * 7,
    }
}

fn cfg(segment_bytes: u64, lose_unsynced_writes: bool) -> SegConfig {
    SegConfig { segment_bytes, max_record_bytes: 4096, lose_unsynced_writes }
}

fn open(dir: &Path, durable: Option<Durable>, cfg: SegConfig) -> Segments {
    Segments::open(dir, 3, 1, durable, cfg).expect("open segments")
}

/// Appends `envs` as records with index = seq = position + `first`.
fn append(s: &Segments, envs: &[NewEnvelope], first: u64) -> Vec<Loc> {
    let records: Vec<RecordRef<'_>> = envs
        .iter()
        .enumerate()
        .map(|(i, e)| RecordRef {
            index: first + i as u64,
            seq: first + i as u64,
            committed_at_ms: 1000 + i as u64,
            envelope: e,
        })
        .collect();
    s.append(&records).expect("append")
}

fn expect_corrupt(r: Result<impl std::fmt::Debug, StoreError>, needle: &str) -> String {
    match r {
        Err(e @ StoreError::Corrupt { .. }) => {
            let text = e.to_string();
            assert!(text.contains(needle), "{text:?} should mention {needle:?}");
            text
        }
        other => panic!("expected a corruption error mentioning {needle:?}, got {other:?}"),
    }
}

/// Property: every record reads back as written, across segment rolls, and a reopen at the
/// last sync's mark keeps them all.
#[test]
fn appended_records_read_back_across_rolls_and_a_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = open(dir.path(), None, cfg(1024, false));
    let envs: Vec<NewEnvelope> = (0..40).map(|n| envelope(&format!("c{}", n % 3), n, 100 + n as usize)).collect();
    let mut locs = append(&s, &envs[..25], 0);
    locs.extend(append(&s, &envs[25..], 25));
    assert!(s.segments().len() > 3, "1 KiB segments roll: {:?}", s.segments());
    for (i, (loc, e)) in locs.iter().zip(&envs).enumerate() {
        let r = s.read(*loc).expect("read");
        assert_eq!((r.index, r.envelope.seq, r.envelope.committed_at_ms), (i as u64, i as u64, 1000 + (i as u64 % 25)));
        assert_eq!(&r.envelope.envelope, e);
    }
    let mark = s.sync().expect("sync");
    drop(s);
    let s = open(dir.path(), Some(mark), cfg(1024, false));
    for (loc, e) in locs.iter().zip(&envs) {
        assert_eq!(&s.read(*loc).expect("read after reopen").envelope.envelope, e);
    }
    // Appends continue where the mark ends.
    let more = append(&s, &envs[..1], 40);
    assert!(more[0].segment > locs[39].segment || more[0].offset > locs[39].offset);
}

/// Property: reopening at an older mark cuts the active segment back to it and deletes later
/// segments, so the files hold exactly what the checkpoint covers.
#[test]
fn reopening_at_an_older_mark_forgets_everything_after_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = open(dir.path(), None, cfg(2048, false));
    let envs: Vec<NewEnvelope> = (0..30).map(|n| envelope("c", n, 200)).collect();
    let first = append(&s, &envs[..5], 0);
    let mark = s.sync().expect("sync");
    let later = append(&s, &envs[5..], 5);
    s.sync().expect("sync");
    assert!(later.last().expect("records").segment > mark.segment, "the later records rolled into new segments");
    drop(s);
    let s = open(dir.path(), Some(mark), cfg(2048, false));
    assert_eq!(s.segments(), vec![mark.segment]);
    let len = std::fs::metadata(dir.path().join(format!("{:020}.env", mark.segment))).expect("metadata").len();
    assert_eq!(len, mark.end);
    for (loc, e) in first.iter().zip(&envs) {
        assert_eq!(&s.read(*loc).expect("read").envelope.envelope, e);
    }
    expect_corrupt(s.read(*later.last().expect("records")), "does not exist");
    // The next append lands right after the mark, where the first later record was.
    assert_eq!(append(&s, &envs[5..6], 5)[0], later[0]);
}

/// Property: no damage reads as data. A flipped byte in a record, a damaged header, a mark
/// past the end of the file or naming a missing segment are corruption errors naming the file.
#[test]
fn damage_is_reported_with_the_file_and_offset() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = open(dir.path(), None, cfg(1024, false));
    let envs: Vec<NewEnvelope> = (0..12).map(|n| envelope("c", n, 150)).collect();
    let locs = append(&s, &envs, 0);
    let mark = s.sync().expect("sync");
    drop(s);
    let seg0 = dir.path().join(format!("{:020}.env", locs[0].segment));
    let mut bytes = std::fs::read(&seg0).expect("read segment");
    bytes[locs[1].offset as usize + 40] ^= 0x10;
    std::fs::write(&seg0, &bytes).expect("write");
    let s = open(dir.path(), Some(mark), cfg(1024, false));
    let text = expect_corrupt(s.read(locs[1]), "crc");
    assert!(
        text.contains(&seg0.display().to_string()) && text.contains(&format!("offset {}", locs[1].offset)),
        "{text}"
    );
    assert_eq!(&s.read(locs[0]).expect("the record before is intact").envelope.envelope, &envs[0]);
    // A location whose length does not match the record.
    expect_corrupt(s.read(Loc { len: locs[0].len + 8, ..locs[0] }), "");
    drop(s);

    // A damaged header of a sealed segment is found when it is first read.
    bytes[20] ^= 1;
    std::fs::write(&seg0, &bytes).expect("write");
    let s = open(dir.path(), Some(mark), cfg(1024, false));
    expect_corrupt(s.read(locs[0]), "header");
    drop(s);

    // A mark past the end of its segment, or naming a segment that is not there.
    let r = Segments::open(dir.path(), 3, 1, Some(Durable { end: mark.end + 1, ..mark }), cfg(1024, false));
    expect_corrupt(r.map(|_| ()), "checkpoint covers");
    let r = Segments::open(
        dir.path(),
        3,
        1,
        Some(Durable { segment: mark.segment + 5, end: HEADER_LEN as u64 }),
        cfg(1024, false),
    );
    expect_corrupt(r.map(|_| ()), "missing");
    // Another group's segments are not taken for this group's.
    let r = Segments::open(dir.path(), 4, 1, Some(mark), cfg(1024, false));
    expect_corrupt(r.map(|_| ()), "not group 4");
}

/// Property: a mark that does not fit the files (another group's) is refused before anything
/// is deleted: the segments after it are still there for the right mark; a sealed segment
/// missing before the mark (deleted by its owner) is no error until a read names it.
#[test]
fn a_mark_that_does_not_fit_deletes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = open(dir.path(), None, cfg(1024, false));
    let envs: Vec<NewEnvelope> = (0..30).map(|n| envelope("c", n, 150)).collect();
    let locs = append(&s, &envs[..20], 0);
    let mark = s.sync().expect("sync");
    append(&s, &envs[20..], 20);
    s.sync().expect("sync");
    drop(s);
    let segments = |d: &Path| std::fs::read_dir(d).expect("ls").count();
    let before = segments(dir.path());
    // The mark is not the last segment: a refused open that deleted what follows it would show.
    assert!(mark.segment >= 3 && before as u64 > mark.segment, "{mark:?}, {before} files");
    // An older mark of another group: refused, and the later segments stay.
    let older = Durable { segment: 2, end: HEADER_LEN as u64 };
    let r = Segments::open(dir.path(), 4, 1, Some(older), cfg(1024, false));
    expect_corrupt(r.map(|_| ()), "not group 4");
    assert_eq!(segments(dir.path()), before, "nothing deleted on a refused mark");
    // A sealed segment missing in the middle (its owner deleted it): the others open, and a
    // read of the missing one names it.
    let middle = dir.path().join(format!("{:020}.env", 2));
    std::fs::remove_file(&middle).expect("rm");
    let s = open(dir.path(), Some(mark), cfg(1024, false));
    let in_middle = locs.iter().copied().find(|l| l.segment == 2).expect("a record in segment 2");
    let text = expect_corrupt(s.read(in_middle), "does not exist");
    assert!(text.contains(&middle.display().to_string()), "{text}");
    let last = locs.last().copied().expect("records");
    assert_eq!(s.read(last).expect("last record").envelope.envelope, envs[19]);
}

/// Property: a record over the limit is refused before anything is written, with the limit
/// named; the store keeps working.
#[test]
fn an_oversized_record_is_refused_and_names_the_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = open(dir.path(), None, cfg(1 << 20, false));
    let big = envelope("c", 1, 5000);
    let e = s.append(&[RecordRef { index: 1, seq: 1, committed_at_ms: 0, envelope: &big }]).expect_err("too big");
    assert!(e.to_string().contains("max_record_bytes (4096)"), "{e}");
    let small = envelope("c", 2, 10);
    let loc = append(&s, std::slice::from_ref(&small), 1)[0];
    assert_eq!(loc.offset, HEADER_LEN as u64, "nothing of the refused record was written");
    assert_eq!(s.read(loc).expect("read").envelope.envelope, small);
}

#[derive(Debug, Clone)]
enum Op {
    /// Append this many records with ciphertexts of these sizes.
    Append(Vec<usize>),
    Sync,
    /// The process dies (unsynced writes are lost, as in a power cut) and reopens at the
    /// last sync's mark.
    Crash,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => prop::collection::vec(0usize..600, 1..8).prop_map(Op::Append),
        2 => Just(Op::Sync),
        1 => Just(Op::Crash),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Property (against a model, a `Vec` of records): after any sequence of appends, syncs
    /// and power cuts, the records the last sync covered read back exactly, and a reopen
    /// leaves nothing of what it did not cover.
    #[test]
    fn a_power_cut_keeps_exactly_what_the_last_sync_covered(ops in prop::collection::vec(op(), 1..40)) {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = cfg(2048, true);
        let mut s = open(dir.path(), None, c.clone());
        // The model: records with their location, and how many of them the last sync covered.
        let mut model: Vec<(Loc, NewEnvelope)> = Vec::new();
        let mut durable: Option<(Durable, usize)> = None;
        let mut n = 0u64;
        for op in ops {
            match op {
                Op::Append(sizes) => {
                    let envs: Vec<NewEnvelope> = sizes.iter().map(|size| { n += 1; envelope("c", n, *size) }).collect();
                    let locs = append(&s, &envs, model.len() as u64);
                    model.extend(locs.into_iter().zip(envs));
                }
                Op::Sync => durable = Some((s.sync().expect("sync"), model.len())),
                Op::Crash => {
                    drop(s);
                    s = open(dir.path(), durable.map(|d| d.0), c.clone());
                    model.truncate(durable.map_or(0, |d| d.1));
                    let files: u64 = std::fs::read_dir(dir.path()).expect("read dir")
                        .map(|e| e.expect("entry").metadata().expect("metadata").len()).sum();
                    let expected: u64 = s.segments().len() as u64 * HEADER_LEN as u64
                        + model.iter().map(|(l, _)| l.len as u64).sum::<u64>();
                    prop_assert_eq!(files, expected, "the files hold exactly the covered records");
                }
            }
            for (i, (loc, e)) in model.iter().enumerate() {
                let r = s.read(*loc).expect("read");
                prop_assert_eq!(r.index, i as u64);
                prop_assert_eq!(&r.envelope.envelope, e);
            }
        }
    }
}

/// Crash test with a real process: the child is this test binary re-run with
/// `HABAR_ENVSEG_CRASH_CHILD` set (and `HABAR_ENVSEG_CRASH_LAZY` for the power-loss model).
/// It appends batches (small segments, so kills also land around rolls), prints
/// `w <record> <segment> <offset> <len>` for each record written and, after each sync,
/// `m <segment> <end> <records covered>`. The parent SIGKILLs it mid-write, reopens at the
/// last mark and checks that every covered record reads back intact.
mod crash {
    use std::io::BufRead;
    use std::io::BufReader;
    use std::io::Write;
    use std::path::Path;
    use std::process::Command;
    use std::process::Stdio;

    use super::*;

    fn env_of(i: u64) -> NewEnvelope {
        envelope(&format!("c{}", i % 7), i, (i % 500) as usize)
    }

    fn child(dir: &Path, lazy: bool) {
        let s = open(dir, None, cfg(16 << 10, lazy));
        let out = std::io::stdout();
        let mut out = out.lock();
        let mut next = 0u64;
        loop {
            let envs: Vec<NewEnvelope> = (next..next + 1 + next % 9).map(env_of).collect();
            let locs = append(&s, &envs, next);
            for loc in locs {
                writeln!(out, "w {next} {} {} {}", loc.segment, loc.offset, loc.len).expect("stdout");
                next += 1;
            }
            if next.is_multiple_of(4) {
                let m = s.sync().expect("sync");
                writeln!(out, "m {} {} {next}", m.segment, m.end).expect("stdout");
            }
            out.flush().expect("stdout");
        }
    }

    fn as_child() -> bool {
        match std::env::var("HABAR_ENVSEG_CRASH_CHILD") {
            Ok(dir) => {
                child(Path::new(&dir), std::env::var_os("HABAR_ENVSEG_CRASH_LAZY").is_some());
                true
            }
            Err(_) => false,
        }
    }

    fn rounds(test_name: &str, lazy: bool) {
        for round in 0..4u64 {
            let dir = tempfile::tempdir().expect("tempdir");
            let exe = std::env::current_exe().expect("current exe");
            let mut cmd = Command::new(&exe);
            cmd.args(["--exact", test_name, "--nocapture", "--test-threads=1"])
                .env("HABAR_ENVSEG_CRASH_CHILD", dir.path());
            if lazy {
                cmd.env("HABAR_ENVSEG_CRASH_LAZY", "1");
            }
            let mut ch = cmd.stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("spawn child");
            let stdout = ch.stdout.take().expect("child stdout");
            let mut locs: Vec<Loc> = Vec::new();
            let mut mark: Option<(Durable, usize)> = None;
            let mut marks = 0;
            let read = |line: String, locs: &mut Vec<Loc>, mark: &mut Option<(Durable, usize)>| -> bool {
                let f: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
                match (line.chars().next(), f.as_slice()) {
                    (Some('w'), [i, segment, offset, len]) if *i as usize == locs.len() => {
                        locs.push(Loc { segment: *segment, offset: *offset, len: *len as u32 })
                    }
                    (Some('m'), [segment, end, n]) => {
                        *mark = Some((Durable { segment: *segment, end: *end }, *n as usize));
                        return true;
                    }
                    _ => {}
                }
                false
            };
            let mut lines = BufReader::new(stdout).lines();
            for line in lines.by_ref() {
                if read(line.expect("line"), &mut locs, &mut mark) {
                    marks += 1;
                    if marks == 200 + round * 131 {
                        break;
                    }
                }
            }
            ch.kill().expect("SIGKILL");
            ch.wait().expect("wait");
            for line in lines {
                read(line.expect("line"), &mut locs, &mut mark);
            }
            let (durable, covered) = mark.expect("the child synced");
            let s = open(dir.path(), Some(durable), cfg(16 << 10, false));
            for (i, loc) in locs.iter().enumerate().take(covered) {
                let r = s.read(*loc).unwrap_or_else(|e| panic!("round {round}: record {i} covered by the mark: {e}"));
                assert_eq!(r.envelope.envelope, env_of(i as u64), "round {round}: record {i} intact");
            }
            let last = s.segments().last().copied();
            assert_eq!(last, Some(durable.segment), "round {round}: nothing after the mark's segment is left");
        }
    }

    /// Property: a SIGKILL at any point of appends, rolls and syncs leaves every record the
    /// last sync covered readable and intact after a reopen at that mark.
    #[test]
    fn sigkill_mid_append_keeps_what_the_last_sync_covered() {
        if as_child() {
            return;
        }
        rounds("crash::sigkill_mid_append_keeps_what_the_last_sync_covered", false);
    }

    /// The same under the power-loss model: the kill also drops every write no fsync covered.
    #[test]
    fn power_loss_mid_append_keeps_what_the_last_sync_covered() {
        if as_child() {
            return;
        }
        rounds("crash::power_loss_mid_append_keeps_what_the_last_sync_covered", true);
    }
}
