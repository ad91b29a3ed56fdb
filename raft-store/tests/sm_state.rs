//! The sled state machine: deterministic apply, dense seqs, durable applied state,
//! snapshots that round-trip, reject damage, and install atomically.

mod common;

use std::io::Read;
use std::path::Path;

use habar_raft_store::snapshot::SnapshotReader;
use habar_raft_store::types::Command;
use habar_raft_store::types::Entry;
use habar_raft_store::types::EntryPayload;
use habar_raft_store::types::LogId;
use habar_raft_store::types::Membership;
use habar_raft_store::types::NewEnvelope;
use habar_raft_store::types::NodeAddr;
use habar_raft_store::GroupStateMachine;
use habar_raft_store::SnapshotData;
use habar_raft_store::StateStore;
use habar_raft_store::StoreError;
use openraft::storage::RaftStateMachine;
use openraft::RaftSnapshotBuilder;

fn env(conv: &str, n: u64) -> NewEnvelope {
    let mut message_id = [0u8; 16];
    message_id[..8].copy_from_slice(&n.to_be_bytes());
    NewEnvelope {
        conversation_id: conv.to_string(),
        message_id,
        sender: format!("s{}", n % 5),
        ciphertext: vec![(n % 251) as u8; 40 + (n % 90) as usize].into(),
        expires_at_ms: n * 3,
    }
}

fn entries(first_index: u64, n: u64) -> Vec<Entry> {
    (first_index..first_index + n)
        .map(|i| Entry {
            log_id: LogId::new_term_index(1, i),
            payload: EntryPayload::Normal(Command::Append {
                now_ms: 1_700_000_000_000 + i,
                // Several conversations per entry, including ids with 0x00 bytes.
                envelopes: (0..3).map(|k| env(&format!("c{}\u{0}{}", (i + k) % 7, k % 2), i * 10 + k)).collect(),
            }),
        })
        .collect()
}

async fn apply(sm: &mut GroupStateMachine, es: Vec<Entry>) {
    let stream = futures::stream::iter(es.into_iter().map(|e| Ok((e, None))));
    sm.apply(stream).await.unwrap();
}

fn open(dir: &Path) -> StateStore {
    StateStore::open(dir, 8 << 20).unwrap()
}

/// Property: the same entries applied on two stores give byte-identical group data.
#[tokio::test]
async fn sm_apply_is_deterministic() {
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (s1, s2) = (open(d1.path()), open(d2.path()));
    let (mut a, mut b) = (s1.group(3).unwrap(), s2.group(3).unwrap());
    // Different batching on each side: results must not depend on it.
    apply(&mut a, entries(1, 40)).await;
    for i in 0..8 {
        apply(&mut b, entries(1 + i * 5, 5)).await;
    }
    let (x, y) = (s1.dump_group(3).unwrap(), s2.dump_group(3).unwrap());
    assert!(!x.is_empty());
    assert_eq!(x, y);
}

fn membership() -> Membership {
    let nodes = (1..=3u64).map(|n| (n, NodeAddr::new(format!("10.0.0.{n}:7000"))));
    Membership::new(vec![(1..=3u64).collect()], nodes.collect::<std::collections::BTreeMap<_, _>>()).unwrap()
}

/// Property: seqs are dense from 1 per conversation; they, the applied log id and the
/// membership survive reopening the store; reads honour from_seq and limit.
#[tokio::test]
async fn seqs_are_dense_per_conversation_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = open(dir.path());
        let mut sm = s.group(1).unwrap();
        // A blank and a membership entry first: they move the applied state too.
        let mut es = vec![
            Entry { log_id: LogId::new_term_index(1, 1), payload: EntryPayload::Blank },
            Entry { log_id: LogId::new_term_index(1, 2), payload: EntryPayload::Membership(membership()) },
        ];
        es.extend(entries(3, 48));
        apply(&mut sm, es).await;
        s.flush().unwrap();
    }
    let s = open(dir.path());
    let mut total = 0;
    for c in 0..7 {
        for k in 0..2 {
            let conv = format!("c{c}\u{0}{k}");
            let all = s.read(1, &conv, 1, 10_000).unwrap();
            assert_eq!(s.last_seq(1, &conv).unwrap(), all.len() as u64);
            for (i, e) in all.iter().enumerate() {
                assert_eq!(e.seq, i as u64 + 1, "{conv:?}");
                assert_eq!(e.envelope.conversation_id, conv);
            }
            // from_seq and limit are honoured.
            let page = s.read(1, &conv, 3, 2).unwrap();
            assert!(page.iter().map(|e| e.seq).eq(3..3 + page.len() as u64));
            assert!(page.len() <= 2);
            total += all.len();
        }
    }
    assert_eq!(total, 144);
    assert_eq!(s.applied(1).unwrap(), Some(LogId::new_term_index(1, 50)));
    let mut sm = s.group(1).unwrap();
    let (applied, m) = sm.applied_state().await.unwrap();
    assert_eq!(applied, Some(LogId::new_term_index(1, 50)));
    assert_eq!(m.log_id(), &Some(LogId::new_term_index(1, 2)));
    assert_eq!(m.membership(), &membership());
    assert_eq!(*s.watch_applied(1).unwrap().borrow(), 50, "the watch starts at the durable applied index");
}

/// Property: a snapshot built on one store and streamed in chunks into another gives an
/// identical state; a damaged or truncated file is rejected naming the file.
#[tokio::test]
async fn snapshot_round_trip_and_damage_detection() {
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (s1, s2) = (open(d1.path()), open(d2.path()));
    let mut a = s1.group(5).unwrap();
    apply(&mut a, entries(1, 30)).await;
    let snap = a.try_create_snapshot_builder(true).await.unwrap().build_snapshot().await.unwrap();
    assert_eq!(snap.meta.last_log_id, Some(LogId::new_term_index(1, 30)));

    let mut bytes = Vec::new();
    snap.snapshot.open().unwrap().read_to_end(&mut bytes).unwrap();
    let mut w = s2.snapshot_writer(5).unwrap();
    for chunk in bytes.chunks(777) {
        w.write_chunk(chunk).unwrap();
    }
    let data = w.finish().unwrap();
    let mut b = s2.group(5).unwrap();
    // Existing data on the receiver is replaced, not merged.
    apply(&mut b, entries(100, 3)).await;
    b.install_snapshot(&snap.meta, data).await.unwrap();
    assert_eq!(s1.dump_group(5).unwrap(), s2.dump_group(5).unwrap());
    assert_eq!(b.applied_state().await.unwrap().0, snap.meta.last_log_id);
    assert_eq!(b.get_current_snapshot().await.unwrap().unwrap().meta, snap.meta);
    // Appends after the install continue each conversation's seqs exactly as on the source
    // (the receiver's lookups see the installed generation, not its old data).
    apply(&mut a, entries(31, 5)).await;
    apply(&mut b, entries(31, 5)).await;
    assert_eq!(s1.dump_group(5).unwrap(), s2.dump_group(5).unwrap(), "the same state after appends");

    for damage in ["flip", "truncate"] {
        let mut bad = bytes.clone();
        // Where the damage is: the reported offset is that of the record holding it (or
        // of the missing trailer), so at most this and not far before it.
        let at = match damage {
            "flip" => {
                bad[bytes.len() / 2] ^= 0x10;
                bytes.len() / 2
            }
            _ => {
                bad.truncate(bytes.len() - 9);
                bad.len()
            }
        } as u64;
        let mut w = s2.snapshot_writer(5).unwrap();
        w.write_chunk(&bad).unwrap();
        match w.finish() {
            Err(StoreError::Corrupt { what, offset, .. }) => {
                assert!(what.contains("recv-g5"), "{damage}: names the file: {what}");
                assert!(offset <= at && at - offset < 600, "{damage}: offset {offset} for damage at {at}");
            }
            Err(e) => panic!("{damage}: expected corruption, got {e}"),
            Ok(_) => panic!("{damage}: a damaged snapshot must be rejected"),
        }
    }
}

/// Property (fault 6): a snapshot file damaged on disk is never offered to a peer. Damaged
/// while the node runs, it is moved to quarantine and rebuilt from the state machine when
/// asked for; damaged while the node is down, it is quarantined at open.
#[tokio::test]
async fn damaged_snapshot_file_is_quarantined_and_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let quarantined = |d: &Path| -> usize { std::fs::read_dir(d.join("quarantine")).map(|r| r.count()).unwrap_or(0) };
    {
        let s = open(dir.path());
        let mut a = s.group(3).unwrap();
        apply(&mut a, entries(1, 20)).await;
        let snap = a.try_create_snapshot_builder(true).await.unwrap().build_snapshot().await.unwrap();
        let path = snap.snapshot.path().to_path_buf();
        let mut bytes = std::fs::read(&path).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x04;
        std::fs::write(&path, &bytes).unwrap();
        apply(&mut a, entries(21, 5)).await;
        let cur = a.get_current_snapshot().await.unwrap().expect("a snapshot is rebuilt");
        assert_eq!(cur.meta.last_log_id, Some(LogId::new_term_index(1, 25)), "rebuilt at the applied index");
        SnapshotReader::validate(cur.snapshot.path()).expect("the rebuilt file is sound");
        assert_eq!(quarantined(dir.path()), 1, "the damaged file is kept aside");
        // Damage the rebuilt one too, then restart.
        let mut bytes = std::fs::read(cur.snapshot.path()).unwrap();
        let n = bytes.len();
        bytes.truncate(n - 5);
        std::fs::write(cur.snapshot.path(), &bytes).unwrap();
        s.flush().unwrap();
    }
    let s = open(dir.path());
    assert_eq!(quarantined(dir.path()), 2, "quarantined at open");
    let mut a = s.group(3).unwrap();
    assert!(a.get_current_snapshot().await.unwrap().is_none(), "no damaged snapshot survives the open");
    assert_eq!(a.applied_state().await.unwrap().0, Some(LogId::new_term_index(1, 25)), "the state machine is intact");
}

/// The points of an install at which the child process aborts (see `crash_point` in sm.rs).
const CRASH_POINTS: [&str; 3] = ["mid_write", "before_switch", "after_switch"];

/// Child half of `crash_mid_install_leaves_old_or_new_state_never_mixed`: installs the
/// snapshot file into the store at `dst`, and aborts at the point named by the env.
fn crash_child(snapshot: &Path, dst: &Path) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let meta = SnapshotReader::open(snapshot).unwrap().meta;
        let len = std::fs::metadata(snapshot).unwrap().len();
        let store = open(dst);
        let mut sm = store.group(2).unwrap();
        sm.install_snapshot(&meta, SnapshotData::new(snapshot.to_path_buf(), len)).await.unwrap();
    });
}

/// Property: a crash at any point of a snapshot install (new generation half written,
/// fully written but not switched to, switched to but the old one not yet deleted) leaves
/// either the whole old state or the whole new state, never a mix, and the next open
/// removes the other generation. The crash is a real `abort()` of a child process.
#[test]
fn crash_mid_install_leaves_old_or_new_state_never_mixed() {
    if let (Ok(snap), Ok(dst)) = (std::env::var("HABAR_SM_CRASH_SNAPSHOT"), std::env::var("HABAR_SM_CRASH_DST")) {
        crash_child(Path::new(&snap), Path::new(&dst));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    // The new state: big enough that the install writes several bounded batches.
    let (new_state, snap) = rt.block_on(async {
        let src = open(&dir.path().join("src"));
        let mut a = src.group(2).unwrap();
        apply(&mut a, entries(1, 800)).await;
        let snap = a.try_create_snapshot_builder(true).await.unwrap().build_snapshot().await.unwrap();
        (src.dump_group(2).unwrap(), snap)
    });
    assert!(new_state.len() > 2048, "the install must span more than one bounded batch");
    for point in CRASH_POINTS {
        let dst = dir.path().join(format!("dst-{point}"));
        let old_state = rt.block_on(async {
            let store = open(&dst);
            let mut b = store.group(2).unwrap();
            apply(&mut b, entries(5000, 4)).await;
            store.flush().unwrap();
            store.dump_group(2).unwrap()
        });
        common::spawn_crashing_child(
            "crash_mid_install_leaves_old_or_new_state_never_mixed",
            &[
                ("HABAR_SM_CRASH_SNAPSHOT", snap.snapshot.path().as_os_str()),
                ("HABAR_SM_CRASH_DST", dst.as_os_str()),
                ("HABAR_TEST_CRASH_AT", point.as_ref()),
            ],
            &format!("{point} (mid-install)"),
        );

        let store = open(&dst);
        let (state, applied) = (store.dump_group(2).unwrap(), store.applied(2).unwrap());
        if point == "after_switch" {
            assert_eq!(state, new_state, "{point}: the switched-to state is whole");
            assert_eq!(applied, snap.meta.last_log_id);
        } else {
            assert_eq!(state, old_state, "{point}: the old state is intact");
            assert_eq!(applied, Some(LogId::new_term_index(1, 5003)));
        }
        assert_eq!(store.raw_key_count(2), state.len(), "{point}: the other generation was removed on open");

        // The recovered store installs the snapshot normally afterwards.
        rt.block_on(async {
            let mut sm = store.group(2).unwrap();
            sm.install_snapshot(&snap.meta, snap.snapshot.clone()).await.unwrap();
        });
        assert_eq!(store.dump_group(2).unwrap(), new_state, "{point}: reinstall after recovery");
        assert_eq!(store.raw_key_count(2), new_state.len());
    }
}

/// `n` entries from `first_index`, each appending three envelopes to the one conversation `conv`.
fn one_conversation(conv: &str, first_index: u64, n: u64) -> Vec<Entry> {
    (first_index..first_index + n)
        .map(|i| Entry {
            log_id: LogId::new_term_index(1, i),
            payload: EntryPayload::Normal(Command::Append {
                now_ms: i,
                envelopes: (0..3).map(|k| env(conv, i * 3 + k)).collect(),
            }),
        })
        .collect()
}

/// Property: reads that run while snapshots are installed see the whole old log or the
/// whole new log of a conversation, dense from seq 1, never a log with a gap (the old
/// generation is deleted right after the switch, under the readers' feet).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_during_installs_see_whole_logs() {
    let dir = tempfile::tempdir().unwrap();
    let mut snaps = Vec::new();
    for (name, n) in [("a", 1000u64), ("b", 500)] {
        let s = open(&dir.path().join(name));
        let mut sm = s.group(4).unwrap();
        apply(&mut sm, one_conversation("x", 1, n)).await;
        snaps.push(sm.try_create_snapshot_builder(true).await.unwrap().build_snapshot().await.unwrap());
    }
    let target = open(&dir.path().join("target"));
    let mut sm = target.group(4).unwrap();
    sm.install_snapshot(&snaps[0].meta, snaps[0].snapshot.clone()).await.unwrap();

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (store, stop) = (target.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut reads = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || reads == 0 {
                let log = store.read(4, "x", 1, usize::MAX).unwrap();
                assert!(log.len() == 3000 || log.len() == 1500, "a whole log, not {} envelopes", log.len());
                assert!(log.iter().map(|e| e.seq).eq(1..=log.len() as u64), "dense from 1");
                reads += 1;
            }
            reads
        })
    };
    for i in 0..8 {
        let s = &snaps[(i + 1) % 2];
        sm.install_snapshot(&s.meta, s.snapshot.clone()).await.unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(reader.join().unwrap() > 0);
    assert_eq!(target.read(4, "x", 1, usize::MAX).unwrap().len(), 3000);
    assert_eq!(target.raw_key_count(4), target.dump_group(4).unwrap().len(), "old generations are gone");
}

/// Property: a state-machine directory held by a live store is refused (after the short
/// wait for a lock that a dropped store's IO threads may still hold), never shared; once
/// the holder is dropped it opens.
#[test]
fn a_directory_held_by_a_live_store_is_refused_and_opens_after_it_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let first = open(dir.path());
    let err = StateStore::open(dir.path(), 8 << 20).err().expect("a second open must fail");
    assert!(err.to_string().contains("could not acquire lock"), "{err}");
    drop(first);
    for _ in 0..5 {
        drop(open(dir.path()));
    }
}

/// Property: sled holds only checkpoints, so a crash between two loses nothing for good:
/// the store comes back at the last checkpoint's applied id, and re-applying the log from
/// there gives the same answers (seqs, duplicates, erasure) and the same data as before the
/// crash. The entries after the checkpoint include an erasure with `reset_seq`, whose effect
/// must not be in sled when the appends before it are re-applied (else their seqs restart
/// at 1), and a retry of an earlier message id (a duplicate the first time and again).
#[tokio::test]
async fn a_crash_between_checkpoints_replays_to_the_same_answers() {
    let dir = tempfile::tempdir().unwrap();
    let append = |index: u64, envelopes: Vec<NewEnvelope>| Entry {
        log_id: LogId::new_term_index(1, index),
        payload: EntryPayload::Normal(Command::Append { now_ms: 1_700_000_000_000 + index, envelopes }),
    };
    let after_checkpoint = vec![
        append(3, vec![env("a", 3), env("a", 1)]),
        Entry {
            log_id: LogId::new_term_index(1, 4),
            payload: EntryPayload::Normal(Command::DeleteConversation {
                now_ms: 1_700_000_000_004,
                conversation_id: "a".into(),
                reset_seq: true,
            }),
        },
        append(5, vec![env("a", 5), env("b", 6)]),
    ];
    let (before, before_reads) = {
        let s = open(dir.path());
        // No timed checkpoint: the one below is the last before the "crash".
        s.set_checkpoint_interval(std::time::Duration::from_secs(3600));
        let mut sm = s.group(6).unwrap();
        apply(&mut sm, vec![append(1, vec![env("a", 1), env("a", 2)]), append(2, vec![env("b", 2)])]).await;
        s.flush().unwrap();
        apply(&mut sm, after_checkpoint.clone()).await;
        let reads = (s.read(6, "a", 1, 100).unwrap(), s.read(6, "b", 1, 100).unwrap(), s.last_seq(6, "a").unwrap());
        (s.dump_group(6).unwrap(), reads)
        // Dropped without a flush or checkpoint: a crash as far as the state machine goes.
    };
    let s = open(dir.path());
    assert_eq!(s.applied(6).unwrap().map(|l| l.index), Some(2), "back at the checkpoint, not later");
    let mut sm = s.group(6).unwrap();
    apply(&mut sm, after_checkpoint).await;
    let reads = (s.read(6, "a", 1, 100).unwrap(), s.read(6, "b", 1, 100).unwrap(), s.last_seq(6, "a").unwrap());
    assert_eq!(reads, before_reads, "the replay reads the same envelopes at the same seqs");
    assert_eq!(before_reads.2, 1, "after the reset erasure, conversation a starts again at seq 1");
    assert_eq!(s.dump_group(6).unwrap(), before, "and the data is byte-identical");
}

/// Property: a conversation that arrives by a snapshot install continues its seqs on the
/// receiver, although the receiver's applies never saw it before (nothing the apply keeps
/// in memory about the old generation's conversations survives the install).
#[tokio::test]
async fn appends_after_an_install_continue_the_installed_conversations() {
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (s1, s2) = (open(d1.path()), open(d2.path()));
    let mut a = s1.group(3).unwrap();
    apply(&mut a, one_conversation("x", 1, 10)).await;
    let snap = a.try_create_snapshot_builder(true).await.unwrap().build_snapshot().await.unwrap();
    let mut b = s2.group(3).unwrap();
    // The receiver's applies have seen only "y" when the snapshot arrives.
    apply(&mut b, one_conversation("y", 1, 2)).await;
    b.install_snapshot(&snap.meta, snap.snapshot.clone()).await.unwrap();
    apply(&mut a, one_conversation("x", 11, 2)).await;
    apply(&mut b, one_conversation("x", 11, 2)).await;
    let seqs: Vec<u64> = s2.read(3, "x", 1, usize::MAX).unwrap().iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=36).collect::<Vec<_>>(), "x continues at 31 on the receiver");
    assert_eq!(s1.dump_group(3).unwrap(), s2.dump_group(3).unwrap());
}

/// Property: after a reopen, each of ten thousand conversations continues its seqs (its
/// record comes back from sled, not from anything the apply kept in memory).
#[tokio::test]
async fn seqs_continue_after_reopen_for_ten_thousand_conversations() {
    let dir = tempfile::tempdir().unwrap();
    let batch = |first_index: u64, round: u64| -> Vec<Entry> {
        (0..100u64)
            .map(|i| Entry {
                log_id: LogId::new_term_index(1, first_index + i),
                payload: EntryPayload::Normal(Command::Append {
                    now_ms: first_index + i,
                    envelopes: (0..100)
                        .map(|k| env(&format!("conv-{}", i * 100 + k), round * 100_000 + i * 100 + k))
                        .collect(),
                }),
            })
            .collect()
    };
    {
        let s = open(dir.path());
        let mut sm = s.group(2).unwrap();
        apply(&mut sm, batch(1, 0)).await;
        s.checkpoint().unwrap();
        s.flush().unwrap();
    }
    let s = open(dir.path());
    let mut sm = s.group(2).unwrap();
    apply(&mut sm, batch(101, 1)).await;
    for c in (0..10_000).step_by(37) {
        let seqs: Vec<u64> = s.read(2, &format!("conv-{c}"), 1, usize::MAX).unwrap().iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [1, 2], "conv-{c}");
    }
}
