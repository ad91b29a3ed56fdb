//! The state index (`index.rs`): conversation records, runs and the `(conversation, message
//! id)` pairs live in an LSM tree beside sled. What must hold whatever the crash: the index
//! never holds what sled's durable state does not (a replay would then call a message a
//! duplicate of itself, or give it a seq already used), and never misses what sled's state
//! says was published (a retry would be appended twice, a run's envelopes could not be read).

mod common;
use common::apply;
use common::open;
use common::spawn_crashing_child;

use std::path::Path;

use habar_raft_store::index;
use habar_raft_store::index::StateIndex;
use habar_raft_store::keys;
use habar_raft_store::types::Command;
use habar_raft_store::types::Entry;
use habar_raft_store::types::EntryPayload;
use habar_raft_store::types::LogId;
use habar_raft_store::types::NewEnvelope;
use habar_raft_store::StateStore;
use openraft::storage::RaftStateMachine;
use openraft::RaftSnapshotBuilder;

const GROUP: u32 = 5;
/// The crash test runs the log on two groups (their logs share one numbering).
const GROUPS: [u32; 2] = [5, 6];
const CONVS: [&str; 4] = ["a", "b", "c", "d"];

/// Message `id` of `conv` (the same id in another conversation is another message).
fn env(conv: &str, id: u64) -> NewEnvelope {
    let mut message_id = [0u8; 16];
    message_id[..8].copy_from_slice(&id.to_be_bytes());
    NewEnvelope {
        conversation_id: conv.to_string(),
        message_id,
        sender: "s".into(),
        ciphertext: id.to_be_bytes().to_vec().into(),
        expires_at_ms: 0,
    }
}

fn entry(index: u64, cmd: Command) -> Entry {
    Entry { log_id: LogId::new_term_index(1, index), payload: EntryPayload::Normal(cmd) }
}

/// The log: entries 1..=20 publish ids 1..=60 over four conversations; 21..=30 publish ids
/// 61..=90 and retry every third id published before (duplicates); 31 erases "c" (its ids
/// may be published again as new messages); 32 erases "d" with `reset_seq` and 33
/// publishes d's ids up to 30 again (new messages from seq 1: their keys were deleted and
/// written again between two checkpoints); 34..=42 retry every id 1..=90 once more.
fn log() -> Vec<Entry> {
    let mut out = Vec::new();
    let publish = |i: u64, ids: Vec<u64>| {
        let envelopes = ids.into_iter().map(|id| env(CONVS[(id % 4) as usize], id)).collect();
        entry(i, Command::Append { now_ms: 1_000 + i, envelopes })
    };
    for i in 1..=20 {
        out.push(publish(i, (3 * i - 2..=3 * i).collect()));
    }
    for i in 21..=30 {
        let new = 3 * i - 2..=3 * i;
        let retries = (1..3 * i - 2).filter(|id| id % 3 == i % 3);
        out.push(publish(i, new.chain(retries).collect()));
    }
    out.push(entry(31, Command::DeleteConversation { now_ms: 2_000, conversation_id: "c".into(), reset_seq: false }));
    out.push(entry(32, Command::DeleteConversation { now_ms: 2_001, conversation_id: "d".into(), reset_seq: true }));
    out.push(publish(33, (1..=30).filter(|id| id % 4 == 3).collect()));
    for i in 34..=42 {
        out.push(publish(i, (1..=90).filter(|id| id % 9 == i % 9).collect()));
    }
    out
}

/// Every conversation's `(seq, ciphertext)`s and last seq.
type Reads = Vec<(Vec<(u64, Vec<u8>)>, u64)>;

fn reads_of(store: &StateStore, group: u32) -> Reads {
    CONVS
        .iter()
        .map(|c| {
            let envs = store.read(group, c, 1, usize::MAX).unwrap();
            (envs.iter().map(|e| (e.seq, e.envelope.ciphertext.to_vec())).collect(), store.last_seq(group, c).unwrap())
        })
        .collect()
}

fn reads(store: &StateStore) -> Reads {
    reads_of(store, GROUP)
}

/// What the child does before the crash, on each group: entries 1..=20, a checkpoint (its
/// index logs reach the index), entries 21..=33, a checkpoint (the one most crash points
/// abort in), then entry 34 and a third checkpoint, whose logs go into the first one's
/// index log file again while the second's items still point into the other.
fn crash_child(dst: &Path) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = open(dst);
        for (skip, take) in [(0, 20), (20, 13), (33, 1)] {
            for g in GROUPS {
                apply(&mut store.group(g).unwrap(), log().into_iter().skip(skip).take(take).collect()).await;
            }
            store.checkpoint().unwrap();
        }
    });
}

/// `after_index_log`: the second checkpoint wrote its logs to an index log file (the other
/// one than the first checkpoint's), but its sled batch, which points into it, never
/// landed. `after_index_log#3`: the third wrote its logs over the first's (whose items the
/// second's batch deleted), while the second's items are durable, and its batch never landed.
const CRASH_POINTS: [&str; 5] =
    ["after_index_log", "after_index_log#3", "before_index_apply", "after_index_apply", "index_recovered"];

fn run_child(dst: &Path, point: &str) {
    // The second checkpoint's (the first one's log must have reached the index).
    let at = if point == "index_recovered" || point.contains('#') { point.to_string() } else { format!("{point}#2") };
    spawn_crashing_child(
        "a_crash_around_the_state_index_keeps_every_answer",
        &[("HABAR_SM_INDEX_CRASH_DST", dst.as_os_str()), ("HABAR_TEST_CRASH_AT", at.as_ref())],
        point,
    );
}

/// Property: a crash inside a checkpoint around the state index (after its index log file
/// is written but before the sled batch that points into it, before its writes reach
/// the index, after they did and the index persisted them, and inside the open that
/// replays the logs) loses no answer: after the reopen and the re-apply of the log from
/// sled's durable applied id, every retry is a duplicate exactly when it is on a store that
/// never crashed, every envelope reads back from its run at its seq, and last seqs and the
/// replica dump (conversation records included) are equal, including retries of ids of an
/// erased conversation (new messages again). The crash is a real `abort()`.
#[test]
fn a_crash_around_the_state_index_keeps_every_answer() {
    if let (Ok(dst), Ok(point)) = (std::env::var("HABAR_SM_INDEX_CRASH_DST"), std::env::var("HABAR_TEST_CRASH_AT")) {
        if point.starts_with("index_recovered") {
            // The open replays the logs a crash left, and aborts after persisting the index,
            // before the logs leave sled.
            drop(open(Path::new(&dst)));
        } else {
            crash_child(Path::new(&dst));
        }
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let reference = open(&dir.path().join("reference"));
    rt.block_on(apply(&mut reference.group(GROUP).unwrap(), log()));
    let want = reads(&reference);
    // The log's retries were recognised: one envelope per message id of a, b; c's 23 ids
    // erased and published again (seqs continue); d reset, its 7 ids up to 30 published
    // again from seq 1, then its 15 others as new.
    assert_eq!((want[0].0.len(), want[1].0.len()), (22, 23), "a and b: one envelope per message");
    assert_eq!((want[2].0.len(), want[2].1), (23, 46), "c's seqs continue after the erasure");
    assert_eq!((want[3].0.len(), want[3].1), (22, 22), "d starts again at 1 after the reset");
    for point in CRASH_POINTS {
        let dst = dir.path().join(point.replace('#', "-"));
        if point == "index_recovered" {
            run_child(&dst, "before_index_apply");
        }
        run_child(&dst, point);
        rt.block_on(async {
            let store = open(&dst);
            for g in GROUPS {
                let durable = store.applied(g).unwrap().map_or(0, |l| l.index);
                let want_durable = if point == "after_index_log" { 20 } else { 33 };
                assert_eq!(
                    durable, want_durable,
                    "{point}: the second checkpoint is durable unless its batch never landed"
                );
                let mut sm = store.group(g).unwrap();
                apply(&mut sm, log().into_iter().filter(|e| e.log_id.index > durable).collect()).await;
                assert_eq!(reads_of(&store, g), want, "{point}: reads of group {g} after recovery");
            }
            let want_dump = reference.dump_group(GROUP).unwrap();
            for g in GROUPS {
                assert_eq!(store.dump_group(g).unwrap(), want_dump, "{point}: dump of group {g}");
            }
            store.checkpoint().unwrap();
            drop(store);
            let store = open(&dst);
            for g in GROUPS {
                assert_eq!(reads_of(&store, g), want, "{point}: group {g} after another checkpoint and a reopen");
            }
            assert_eq!(store.dump_group(GROUP).unwrap(), want_dump, "{point}: dump");
        });
    }
}

/// Property: an index log that sled points to but that is damaged on disk (a bit flipped in
/// its file, or the file cut short) is never applied to the index: the open fails with an
/// error naming the file, and does not start from a state that would miss what sled says
/// was published.
#[test]
fn a_damaged_index_log_file_stops_the_open_and_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    for damage in ["flip", "cut"] {
        let dst = dir.path().join(damage);
        // Dies after the second checkpoint's batch (pointing into index-log.1) is flushed,
        // before the index got its writes.
        run_child(&dst, "before_index_apply");
        let file = dst.join("index-log.1");
        let mut bytes = std::fs::read(&file).unwrap();
        assert!(bytes.len() > 64, "the second checkpoint's logs are in index-log.1");
        match damage {
            "flip" => bytes[40] ^= 0x10,
            _ => bytes.truncate(20),
        }
        std::fs::write(&file, &bytes).unwrap();
        match StateStore::open(&dst, 8 << 20) {
            Ok(_) => panic!("{damage}: a store whose index log is damaged opened"),
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.contains("index-log.1"), "{damage}: the error names the file: {msg}");
            }
        }
    }
}

/// Property: items of the index's kinds (CONV, DEDUPE, RUN) never reach sled
/// (the checkpoint sends them to the index through a log item that the next checkpoint
/// deletes), snapshots carry them all the same (runs as envelopes), and a store that
/// installs such a snapshot (twice) answers retries as duplicates, its lookup filters holding
/// the installed generation's keys only.
#[tokio::test]
async fn index_items_live_in_the_index_and_travel_in_snapshots() {
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (s1, s2) = (open(d1.path()), open(d2.path()));
    let mut a = s1.group(GROUP).unwrap();
    let mut log = log();
    let tail = log.split_off(30);
    assert!(matches!(tail[0].payload, EntryPayload::Normal(Command::DeleteConversation { .. })));
    apply(&mut a, log).await;
    s1.checkpoint().unwrap();
    s1.checkpoint().unwrap();
    for kind in index::INDEX_KINDS {
        assert_eq!(s1.sled_items_of_kind(GROUP, kind).unwrap(), 0, "no item of kind {kind} in sled");
    }
    assert_eq!(s1.stored_items_of_kind(GROUP, keys::KIND_CONV).unwrap(), 4, "the index has the conversations");
    assert_eq!(s1.sled_items_of_kind(GROUP, keys::KIND_DEDUPE_TIME).unwrap(), 30, "sled has an entry time per entry");
    assert!(s1.stored_items_of_kind(GROUP, keys::KIND_RUN).unwrap() > 0, "and the runs");
    assert_eq!(s1.sled_items_of_kind(GROUP, keys::KIND_INDEX_LOG).unwrap(), 0, "logs gone once the index holds them");
    let dump = s1.dump_group(GROUP).unwrap();
    let pairs = dump.iter().filter(|(k, _)| k.first() == Some(&keys::KIND_DEDUPE)).count();
    assert_eq!(pairs, 90, "the dump has every message's pair");
    let snap = a.try_create_snapshot_builder(true).await.unwrap().build_snapshot().await.unwrap();
    let mut b = s2.group(GROUP).unwrap();
    b.install_snapshot(&snap.meta, snap.snapshot.clone()).await.unwrap();
    // Twice: each install starts a generation; the lookup filters keep only the new one's.
    b.install_snapshot(&snap.meta, snap.snapshot.clone()).await.unwrap();
    assert_eq!(s2.lookup_filters_held(GROUP), (4, 1), "the filters hold the installed generation's keys only");
    assert_eq!(s2.dump_group(GROUP).unwrap(), dump, "the installed state is the same");
    assert_eq!(s2.raw_key_count(GROUP), dump.len(), "nothing but the installed generation is left");
    apply(&mut a, tail.clone()).await;
    apply(&mut b, tail).await;
    assert_eq!(reads(&s2), reads(&s1), "retries after the install are duplicates on both");
    assert_eq!(s2.dump_group(GROUP).unwrap(), s1.dump_group(GROUP).unwrap());
}

/// An older layout to upgrade from: which kinds of the index it kept in sled, which earlier
/// index directories (of [`index::LEGACY`], oldest first) hold the rest, and where the
/// upgrading open is aborted.
struct Layout {
    name: &'static str,
    in_sled: &'static [u8],
    old_dirs: &'static [&'static str],
    crash: Option<&'static str>,
}

const CONV_RUN: &[u8] = &[keys::KIND_CONV, keys::KIND_RUN];

const LAYOUTS: [Layout; 11] = [
    // Before 2026-12-04: everything in sled. Crash inside the move of the runs (the third
    // kind moved: CONV, DEDUPE, RUN).
    Layout { name: "all-in-sled", in_sled: &index::INDEX_KINDS, old_dirs: &[], crash: None },
    Layout { name: "all-in-sled-crash", in_sled: &index::INDEX_KINDS, old_dirs: &[], crash: Some("index_moved#3") },
    // 2026-12-04 (ac52f0d): dedupe pairs in `<sm>/dedupe`, conversations and runs in sled.
    Layout { name: "dedupe-dir", in_sled: CONV_RUN, old_dirs: &["dedupe"], crash: None },
    Layout {
        name: "dedupe-dir-crash-after-copy",
        in_sled: CONV_RUN,
        old_dirs: &["dedupe"],
        crash: Some("legacy_index_copied"),
    },
    Layout {
        name: "dedupe-dir-crash-after-rename",
        in_sled: CONV_RUN,
        old_dirs: &["dedupe"],
        crash: Some("legacy_index_renamed"),
    },
    Layout { name: "dedupe-dir-crash-in-runs", in_sled: CONV_RUN, old_dirs: &["dedupe"], crash: Some("index_moved#2") },
    // 2026-12-04 to 12-05: everything in `<sm>/index`, keyspace `state.v1` (fjall's default
    // compaction).
    Layout { name: "index-v1", in_sled: &[], old_dirs: &["index"], crash: None },
    Layout {
        name: "index-v1-crash-after-copy",
        in_sled: &[],
        old_dirs: &["index"],
        crash: Some("legacy_index_copied"),
    },
    Layout {
        name: "index-v1-crash-after-rename",
        in_sled: &[],
        old_dirs: &["index"],
        crash: Some("legacy_index_renamed"),
    },
    // A node of 2026-12-04 that crashed inside its move from the first layout to the
    // second (both directories, conversations and runs still in sled), upgraded; aborted
    // again after the second copy, or after the first directory went. The first
    // directory holds an older value than the second (no index log covers it): the newer
    // must win, so the oldest is moved first.
    Layout {
        name: "dedupe-and-index-v1",
        in_sled: CONV_RUN,
        old_dirs: &["dedupe", "index"],
        crash: Some("legacy_index_copied#2"),
    },
    Layout {
        name: "dedupe-and-index-v1-renamed",
        in_sled: CONV_RUN,
        old_dirs: &["dedupe", "index"],
        crash: Some("legacy_index_renamed#1"),
    },
];

/// The earlier layout kept in directory `dir`.
fn legacy(dir: &str) -> index::Layout {
    *index::LEGACY.iter().find(|l| l.dir == dir).unwrap()
}

/// The dedupe pair of message 1 (conversation "b", which the log never erases).
fn stale_pair() -> Vec<u8> {
    keys::dedupe_key(GROUP, 1, b"b", &env("b", 1).message_id)
}

/// Turns `<dst>/index.v2` into indexes of earlier layouts: a copy in each directory
/// `old_dirs` names (with that layout's keyspace), and the current one deleted.
fn to_old_dirs(dst: &Path, old_dirs: &[&str]) {
    let new = StateIndex::open(&dst.join(index::DIR)).unwrap();
    for dir in old_dirs {
        let layout = legacy(dir);
        let old = StateIndex::open_legacy(&dst.join(layout.dir), layout).unwrap();
        assert!(old.copy_from(&new).unwrap() > 0);
    }
    drop(new);
    std::fs::remove_dir_all(dst.join(index::DIR)).unwrap();
}

/// Property: a store of an older layout (items of the index's kinds in sled; the rest in
/// an earlier layout's index directory, or two) opens with everything moved into the
/// index, also when the open is aborted inside the move (after a chunk reached the index,
/// before sled's copies went; after an old directory was copied, before it went; after it
/// was renamed): retries stay duplicates, envelopes read back from their runs, and the
/// state is the same as a store that never had the older layout.
#[test]
fn a_store_of_an_older_layout_moves_its_items_into_the_index() {
    if let Ok(dst) = std::env::var("HABAR_SM_INDEX_UPGRADE_DST") {
        // The open moves the items and aborts at the crash point.
        drop(open(Path::new(&dst)));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let reference = open(&dir.path().join("reference"));
    rt.block_on(apply(&mut reference.group(GROUP).unwrap(), log()));
    for layout in LAYOUTS {
        let name = layout.name;
        let dst = dir.path().join(name);
        {
            let store = open(&dst);
            rt.block_on(apply(&mut store.group(GROUP).unwrap(), log().into_iter().take(30).collect()));
            let moved = store.move_index_into_sled_for_tests(layout.in_sled).unwrap();
            let in_sled = |kind| store.sled_items_of_kind(GROUP, kind).unwrap();
            let of_layout = |kind| layout.in_sled.contains(&kind);
            assert_eq!(
                in_sled(keys::KIND_CONV),
                if of_layout(keys::KIND_CONV) { 4 } else { 0 },
                "{name}: the older layout"
            );
            assert_eq!(in_sled(keys::KIND_RUN) > 0, of_layout(keys::KIND_RUN), "{name}: the older layout");
            assert_eq!(
                in_sled(keys::KIND_DEDUPE),
                if of_layout(keys::KIND_DEDUPE) { 90 } else { 0 },
                "{name}: the older layout"
            );
            assert_eq!(moved, layout.in_sled.iter().map(|k| in_sled(*k)).sum::<usize>(), "{name}: every item moved");
            assert_eq!(in_sled(keys::KIND_INDEX_LOG), 0, "{name}: and no index log");
            if layout.old_dirs.len() == 1 {
                // A layout with an index directory had the last checkpoint's dedupe log in
                // sled, its writes maybe not in the index: one for a pair whose value the old
                // index has wrong below. The open must apply it after the copy. (With two
                // directories the second has the right value instead.)
                let (k, v) = store
                    .dump_group(GROUP)
                    .unwrap()
                    .into_iter()
                    .find(|(k, _)| k.starts_with(&stale_pair()[keys::GEN_PREFIX_LEN..]))
                    .unwrap();
                assert_eq!(k.len() + keys::GEN_PREFIX_LEN, stale_pair().len());
                store.write_index_log_for_tests(GROUP, &[(stale_pair(), Some(v))]).unwrap();
            }
        }
        if let Some(oldest) = layout.old_dirs.first() {
            to_old_dirs(&dst, layout.old_dirs);
            let oldest = legacy(oldest);
            let old = StateIndex::open_legacy(&dst.join(oldest.dir), oldest).unwrap();
            old.apply([(stale_pair().as_slice(), Some(keys::encode_value(&[0u8; 16]).as_slice()))]).unwrap();
            old.persist().unwrap();
        }
        if let Some(point) = layout.crash {
            spawn_crashing_child(
                "a_store_of_an_older_layout_moves_its_items_into_the_index",
                &[("HABAR_SM_INDEX_UPGRADE_DST", dst.as_os_str()), ("HABAR_TEST_CRASH_AT", point.as_ref())],
                point,
            );
        }
        let store = open(&dst);
        for kind in index::INDEX_KINDS {
            assert_eq!(store.sled_items_of_kind(GROUP, kind).unwrap(), 0, "{name}: kind {kind} moved out of sled");
        }
        for layout in index::LEGACY {
            for gone in [layout.dir.to_string(), format!("{}.moved", layout.dir)] {
                assert!(!dst.join(&gone).exists(), "{name}: {gone} deleted");
            }
        }
        rt.block_on(apply(&mut store.group(GROUP).unwrap(), log().into_iter().skip(30).collect()));
        assert_eq!(reads(&store), reads(&reference), "{name}: retries are duplicates, runs read back");
        assert_eq!(store.dump_group(GROUP).unwrap(), reference.dump_group(GROUP).unwrap(), "{name}: dump");
    }
}

/// Property: a replica dump (a merged range over the overlay, sled and the index) taken while
/// applies and checkpoints run shows one state: each conversation's DEDUPE pairs and its
/// envelopes number exactly its last seq (none missing while a checkpoint moves them into
/// the index and a run; a pair never twice; an envelope seen both as a frozen item and in
/// its new run is one record, as `dump_group` promises), in every one of many dumps.
#[test]
fn dumps_while_checkpoints_move_items_into_the_index_see_each_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(open(dir.path()));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let dumper = {
        let (store, stop) = (store.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut dumps = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || dumps == 0 {
                let dump = store.dump_group(GROUP).unwrap();
                for c in CONVS {
                    let conv = keys::conv_key(GROUP, 1, c.as_bytes());
                    let conv_rest = &conv[keys::GEN_PREFIX_LEN..];
                    let last = dump.iter().find(|(k, _)| k.as_slice() == conv_rest).map(|(_, v)| {
                        let body = keys::decode_value(v).unwrap();
                        u64::from_be_bytes(body[..8].try_into().unwrap())
                    });
                    let mut prefix = keys::conv_prefix(GROUP, 1, keys::KIND_DEDUPE, c.as_bytes());
                    prefix.drain(..keys::GEN_PREFIX_LEN);
                    let pairs = dump.iter().filter(|(k, _)| k.starts_with(&prefix)).count() as u64;
                    assert_eq!(pairs, last.unwrap_or(0), "{c}: pairs against last seq in dump {dumps}");
                    let mut prefix = keys::conv_prefix(GROUP, 1, keys::KIND_ENV, c.as_bytes());
                    prefix.drain(..keys::GEN_PREFIX_LEN);
                    let envs = dump.iter().filter(|(k, _)| k.starts_with(&prefix)).count() as u64;
                    assert_eq!(envs, last.unwrap_or(0), "{c}: envelopes against last seq in dump {dumps}");
                }
                dumps += 1;
            }
            dumps
        })
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut sm = store.group(GROUP).unwrap();
    for round in 0..40u64 {
        let es: Vec<Entry> = (0..5)
            .map(|k| {
                let i = round * 5 + k + 1;
                entry(
                    i,
                    Command::Append {
                        now_ms: i,
                        envelopes: (0..8).map(|n| env(CONVS[(n % 4) as usize], i * 8 + n)).collect(),
                    },
                )
            })
            .collect();
        rt.block_on(apply(&mut sm, es));
        store.checkpoint().unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let dumps = dumper.join().unwrap();
    assert!(dumps > 0);
    assert_eq!(store.last_seq(GROUP, "a").unwrap(), 400);
}

/// Property: a state index whose journal ends in a torn entry (a write cut short by a full
/// disk or a crash: the entry's header there, the rest zeros) opens, with every batch
/// persisted before the torn one. (fjall's journal reader cuts such a tail; its debug
/// assertions, on in test builds unless the workspace's profile turns them off for fjall,
/// panicked on it instead: a node restarted after ENOSPC did not start in
/// `disk_full_tmpfs`.)
#[test]
fn a_state_index_whose_journal_ends_in_a_torn_entry_opens_with_what_was_persisted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(index::DIR);
    let key = |i: u32| [&keys::gen_prefix(1, 1)[..], &[keys::KIND_CONV], &i.to_be_bytes()[..]].concat();
    let journal = path.join("0.jnl");
    // fjall preallocates its journal (zeros): the data ends at the last byte that is not.
    let data_end = |bytes: &[u8]| bytes.iter().rposition(|b| *b != 0).map_or(0, |p| p + 1);
    let persisted = {
        let idx = StateIndex::open(&path).unwrap();
        for i in 0..50u32 {
            idx.apply([(key(i).as_slice(), Some(&b"persisted-value-of-29-bytes.."[..]))]).unwrap();
        }
        idx.persist().unwrap();
        let persisted = data_end(&std::fs::read(&journal).unwrap());
        idx.apply([(key(1000).as_slice(), Some(&b"the-torn-one-29-bytes-long..."[..]))]).unwrap();
        idx.persist().unwrap();
        persisted
    };
    // The torn batch keeps its start (13 bytes) and its item's header up to the value's
    // length (17 bytes); from the on-disk length on, zeros (the journal is sparse: only the
    // torn batch's bytes are written).
    let bytes = std::fs::read(&journal).unwrap();
    let end = data_end(&bytes);
    assert!(end > persisted + 40, "the second batch is in the journal");
    assert_eq!((bytes[persisted], bytes[persisted + 13]), (1, 2), "fjall's journal layout: a batch start, an item");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&journal).unwrap();
        f.write_all_at(&vec![0u8; end - (persisted + 13 + 17)], (persisted + 13 + 17) as u64).unwrap();
    }
    let idx = StateIndex::open(&path).unwrap();
    for i in 0..50u32 {
        assert!(idx.get(&key(i)).unwrap().is_some(), "persisted key {i} is there");
    }
    assert_eq!(idx.get(&key(1000)).unwrap(), None, "the torn batch is not");
    // And it takes writes again, durably (what the restarted node needs).
    idx.apply([(key(2000).as_slice(), Some(&b"after"[..]))]).unwrap();
    idx.persist().unwrap();
    drop(idx);
    let idx = StateIndex::open(&path).unwrap();
    assert!(idx.get(&key(2000)).unwrap().is_some() && idx.get(&key(49)).unwrap().is_some(), "written after the cut");
}
