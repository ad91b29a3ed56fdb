//! The sled state machine: deterministic apply, dense seqs, durable applied state,
//! snapshots that round-trip, reject damage, and install atomically.

use std::io::Read;
use std::path::Path;

use habar_raft_store::types::Command;
use habar_raft_store::types::Entry;
use habar_raft_store::types::EntryPayload;
use habar_raft_store::types::LogId;
use habar_raft_store::types::NewEnvelope;
use habar_raft_store::GroupStateMachine;
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
async fn apply_is_deterministic() {
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

/// Property: seqs are dense from 1 per conversation, and survive reopening the store.
#[tokio::test]
async fn seqs_are_dense_per_conversation_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = open(dir.path());
        let mut sm = s.group(1).unwrap();
        apply(&mut sm, entries(1, 50)).await;
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
    assert_eq!(total, 150);
    assert_eq!(s.applied(1).unwrap(), Some(LogId::new_term_index(1, 50)));
    let mut sm = s.group(1).unwrap();
    assert_eq!(sm.applied_state().await.unwrap().0, Some(LogId::new_term_index(1, 50)));
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

    for damage in ["flip", "truncate"] {
        let mut bad = bytes.clone();
        match damage {
            "flip" => bad[bytes.len() / 2] ^= 0x10,
            _ => bad.truncate(bytes.len() - 9),
        }
        let mut w = s2.snapshot_writer(5).unwrap();
        w.write_chunk(&bad).unwrap();
        match w.finish() {
            Err(StoreError::Corrupt { what, .. }) => {
                assert!(what.contains("recv-g5"), "{damage}: names the file: {what}")
            }
            Err(e) => panic!("{damage}: expected corruption, got {e}"),
            Ok(_) => panic!("{damage}: a damaged snapshot must be rejected"),
        }
    }
}

/// Property: a crash in the middle of installing a snapshot (after the new data is written,
/// before the switch) leaves the old state intact, and the half-written data is removed on
/// the next open. The crash is a real `abort()` of a child process.
#[test]
fn crash_mid_install_leaves_the_old_state() {
    if let Ok(dir) = std::env::var("HABAR_SM_CRASH_CHILD") {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let dir = Path::new(&dir);
            let src = open(&dir.join("src"));
            let mut a = src.group(2).unwrap();
            apply(&mut a, entries(1, 60)).await;
            let snap = a.try_create_snapshot_builder(true).await.unwrap().build_snapshot().await.unwrap();
            let dst = open(&dir.join("dst"));
            let mut b = dst.group(2).unwrap();
            // The child aborts inside install (HABAR_TEST_CRASH_BEFORE_SNAPSHOT_SWITCH).
            b.install_snapshot(&snap.meta, snap.snapshot).await.unwrap();
        });
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let before = {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let dst = open(&dir.path().join("dst"));
            let mut b = dst.group(2).unwrap();
            apply(&mut b, entries(500, 4)).await;
            dst.flush().unwrap();
            dst.dump_group(2).unwrap()
        })
    };
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crash_mid_install_leaves_the_old_state", "--test-threads=1"])
        .env("HABAR_SM_CRASH_CHILD", dir.path())
        .env("HABAR_TEST_CRASH_BEFORE_SNAPSHOT_SWITCH", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(!status.success(), "the child must have crashed mid-install");
    let dst = open(&dir.path().join("dst"));
    assert_eq!(dst.dump_group(2).unwrap(), before, "old state intact after a crash mid-install");
    assert_eq!(dst.applied(2).unwrap(), Some(LogId::new_term_index(1, 503)));
    assert_eq!(dst.raw_key_count(2), before.len(), "the half-installed generation was removed on open");
}
