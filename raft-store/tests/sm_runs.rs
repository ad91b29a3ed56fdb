//! Runs (`runs.rs`): checkpoints move envelopes that do not expire out of sled into the
//! group's envelope segment. What every replica must still see the same, what erasure must
//! leave behind (nothing), and what a crash inside a checkpoint must not lose.

mod common;
use common::apply;
use common::open;
use common::spawn_crashing_child;

use std::path::Path;
use std::path::PathBuf;

use habar_raft_store::keys;
use habar_raft_store::sm::Direction;
use habar_raft_store::types::Command;
use habar_raft_store::types::Entry;
use habar_raft_store::types::EntryPayload;
use habar_raft_store::types::LogId;
use habar_raft_store::types::NewEnvelope;
use habar_raft_store::SnapshotData;
use habar_raft_store::StateStore;
use openraft::storage::RaftStateMachine;
use openraft::RaftSnapshotBuilder;

const GROUP: u32 = 2;
const SECRET: &[u8] = b"SECRET-CIPHERTEXT-MARKER";

/// Envelope `n` of `conv`: every seventh expires (those stay sled items), the others do not;
/// conversation "secret" carries the marker.
fn env(conv: &str, n: u64) -> NewEnvelope {
    let mut message_id = [0u8; 16];
    message_id[..8].copy_from_slice(&n.to_be_bytes());
    let ciphertext = if conv == "secret" {
        [SECRET, &n.to_be_bytes()].concat()
    } else {
        vec![(n % 251) as u8; 20 + (n % 300) as usize]
    };
    NewEnvelope {
        conversation_id: conv.to_string(),
        message_id,
        sender: format!("s{}", n % 3),
        ciphertext: ciphertext.into(),
        expires_at_ms: if n.is_multiple_of(7) { u64::MAX / 2 } else { 0 },
    }
}

/// Entries `first..first + n`, each appending four envelopes over five conversations.
fn appends(first: u64, n: u64) -> Vec<Entry> {
    (first..first + n)
        .map(|i| {
            let envelopes = (0..4)
                .map(|k| {
                    let c = match (i + k) % 5 {
                        0 => "secret".to_string(),
                        x => format!("c\u{0}{x}"),
                    };
                    env(&c, i * 10 + k)
                })
                .collect();
            Entry {
                log_id: LogId::new_term_index(1, i),
                payload: EntryPayload::Normal(Command::Append { now_ms: 1_000 + i, envelopes }),
            }
        })
        .collect()
}

fn erase(index: u64, conv: &str) -> Entry {
    Entry {
        log_id: LogId::new_term_index(1, index),
        payload: EntryPayload::Normal(Command::DeleteConversation {
            now_ms: 5_000,
            conversation_id: conv.to_string(),
            reset_seq: false,
        }),
    }
}

/// `(seq, ciphertext)` of a conversation's envelopes.
type Seqs = Vec<(u64, Vec<u8>)>;

/// A conversation read page by page in one direction, from `start`, `limit` a page.
fn pages(store: &StateStore, c: &str, direction: Direction, mut start: u64, limit: usize) -> Seqs {
    let mut out = Vec::new();
    loop {
        let p = store.read_page(GROUP, c, direction, start, limit, 10_000).unwrap();
        out.extend(p.envelopes.iter().map(|e| (e.seq, e.envelope.ciphertext.to_vec())));
        start = p.next;
        if p.end {
            return out;
        }
    }
}

/// Every conversation read forward in pages of 7 and backward in pages of 5.
fn read_all(store: &StateStore) -> Vec<(String, Seqs)> {
    let mut out = Vec::new();
    for c in ["secret", "c\u{0}1", "c\u{0}2", "c\u{0}3", "c\u{0}4"] {
        let fwd = pages(store, c, Direction::Forward, 1, 7);
        let mut back = pages(store, c, Direction::Backward, 0, 5);
        back.reverse();
        assert_eq!(fwd, back, "{c:?}: backward pages read the same envelopes as forward ones");
        out.push((c.to_string(), fwd));
    }
    out
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return out };
    for e in entries {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// How many times `needle` occurs in `path`.
fn count_in(path: &Path, needle: &[u8]) -> usize {
    std::fs::read(path).unwrap().windows(needle.len()).filter(|w| *w == needle).count()
}

/// Every file under `dir` that contains `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    files_under(dir).into_iter().filter(|p| count_in(p, needle) > 0).collect()
}

/// How many times `needle` occurs in the files under `dir`.
fn occurrences(dir: &Path, needle: &[u8]) -> usize {
    files_under(dir).iter().map(|p| count_in(p, needle)).sum()
}

/// Property: after checkpoints, sled holds no ENV item for an envelope that does not expire
/// (one RUN item per conversation and checkpoint instead), and every read, the replica dump
/// and a snapshot are the same as on a store that never checkpointed; a snapshot built from
/// runs installs on another store to the same state, and its build drops its view of the
/// state index before it copies the runs (leaving no spill file).
#[tokio::test]
async fn runs_read_and_travel_like_items() {
    let (d1, d2, d3) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (with_runs, without) = (open(d1.path()), open(d2.path()));
    let (mut a, mut b) = (with_runs.group(GROUP).unwrap(), without.group(GROUP).unwrap());
    for round in 0..6 {
        let es = appends(1 + round * 30, 30);
        apply(&mut a, es.clone()).await;
        apply(&mut b, es).await;
        with_runs.checkpoint().unwrap();
    }
    let expiring = (1..181u64).flat_map(|i| (0..4).map(move |k| i * 10 + k)).filter(|n| n.is_multiple_of(7)).count();
    assert_eq!(
        with_runs.sled_items_of_kind(GROUP, keys::KIND_ENV).unwrap(),
        expiring,
        "only expiring envelopes stay items"
    );
    let runs = with_runs.stored_items_of_kind(GROUP, keys::KIND_RUN).unwrap();
    assert!(runs > 0 && runs < 720 / 4, "{runs} runs for 720 envelopes");
    assert_eq!(with_runs.sled_items_of_kind(GROUP, keys::KIND_RUN).unwrap(), 0, "runs live in the state index");
    assert_eq!(without.stored_items_of_kind(GROUP, keys::KIND_RUN).unwrap(), 0);

    let reads = read_all(&with_runs);
    assert_eq!(reads, read_all(&without), "reads from runs equal reads from items");
    assert_eq!(reads.iter().map(|(_, e)| e.len()).sum::<usize>(), 720);
    assert_eq!(with_runs.dump_group(GROUP).unwrap(), without.dump_group(GROUP).unwrap(), "replica dumps equal");
    assert_eq!(with_runs.read(GROUP, "c\u{0}2", 40, 3).unwrap(), without.read(GROUP, "c\u{0}2", 40, 3).unwrap());

    // A snapshot built from runs: installed elsewhere, the same state (as items there).
    assert_eq!(with_runs.build_views_at_runs_for_tests(), usize::MAX, "no build yet");
    let snap = a.try_create_snapshot_builder(true).await.unwrap().build_snapshot().await.unwrap();
    // The build read the state index's view (which keeps fjall's flushed memtables in
    // memory) before it copied the runs' envelopes, not throughout.
    assert_eq!(with_runs.build_views_at_runs_for_tests(), 0, "the view is dropped before the runs are copied");
    let left: Vec<_> = std::fs::read_dir(snap.snapshot.path().parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| !n.ends_with(".snap"))
        .collect();
    assert!(left.is_empty(), "no spill or temporary file left: {left:?}");
    let target = open(d3.path());
    install(&target, &snap).await;
    assert_eq!(target.dump_group(GROUP).unwrap(), without.dump_group(GROUP).unwrap(), "installed from runs");
    assert_eq!(read_all(&target), reads);

    // Reopened: the runs are still where their items say.
    drop((a, b));
    drop(with_runs);
    let again = open(d1.path());
    assert_eq!(read_all(&again), reads, "after a reopen");
}

/// Property: a snapshot carries the dedupe times (DEDUPE_TIME, which the dedupe window's
/// trim reads) of its log position, though its build reads them from sled after the group's
/// applies resumed: the items a trim applied after that position deletes are in it, those
/// of entries appended after it are not; installed, the group equals one that applied only
/// the entries up to the position.
#[tokio::test]
async fn a_snapshot_carries_the_dedupe_times_of_its_position_while_trims_and_appends_go_on() {
    const WINDOW: u64 = 1_000_000;
    // Entries 1..=40, committed at 1_001..=1_040 ms; in sled after the checkpoint.
    let Applied { store, mut sm, reference, target, _dirs } = applied_twice(40).await;
    assert_eq!(store.sled_items_of_kind(GROUP, keys::KIND_DEDUPE_TIME).unwrap(), 40);

    // The first half at entry 40; then a trim of the entries before 1_021 ms, 10 more
    // entries, and a checkpoint that deletes the trimmed items from sled, before the
    // second half reads them.
    let mut builder = sm.try_create_snapshot_builder(false).await.unwrap();
    let trim = Command::Maintain { now_ms: 1_021 + WINDOW, dedupe_window_ms: WINDOW, max_removals: 10_000 };
    apply(&mut sm, vec![Entry { log_id: LogId::new_term_index(1, 41), payload: EntryPayload::Normal(trim) }]).await;
    apply(&mut sm, appends(42, 10)).await;
    store.checkpoint().unwrap();
    assert_eq!(store.sled_items_of_kind(GROUP, keys::KIND_DEDUPE_TIME).unwrap(), 40 - 20 + 10, "trimmed and added");
    let snap = builder.build_snapshot().await.unwrap();
    assert_eq!(snap.meta.last_log_id, Some(LogId::new_term_index(1, 40)));

    let target = open(target.path());
    install(&target, &snap).await;
    target.checkpoint().unwrap();
    assert_eq!(target.sled_items_of_kind(GROUP, keys::KIND_DEDUPE_TIME).unwrap(), 40, "the position's dedupe times");
    assert_eq!(target.dump_group(GROUP).unwrap(), reference.dump_group(GROUP).unwrap(), "the state at entry 40");
}

/// A store and a reference store whose group applied entries `1..=n` (the store's
/// checkpointed, so in sled), and an empty directory for a store to install into.
struct Applied {
    store: StateStore,
    sm: habar_raft_store::GroupStateMachine,
    reference: StateStore,
    target: tempfile::TempDir,
    _dirs: [tempfile::TempDir; 2],
}

async fn applied_twice(n: u64) -> Applied {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let (store, reference) = (open(dirs[0].path()), open(dirs[1].path()));
    let (mut sm, mut r) = (store.group(GROUP).unwrap(), reference.group(GROUP).unwrap());
    apply(&mut sm, appends(1, n)).await;
    apply(&mut r, appends(1, n)).await;
    store.checkpoint().unwrap();
    Applied { store, sm, reference, target: tempfile::tempdir().unwrap(), _dirs: dirs }
}

/// Installs `snap` (a file of another store's) into `target`'s group.
async fn install(target: &StateStore, snap: &habar_raft_store::types::Snapshot<SnapshotData>) {
    let len = std::fs::metadata(snap.snapshot.path()).unwrap().len();
    let data = SnapshotData::new(snap.snapshot.path().to_path_buf(), len);
    target.group(GROUP).unwrap().install_snapshot(&snap.meta, data).await.unwrap();
}

/// Checks that the snapshot's file holds each record of `reference`'s group once (no key
/// twice, as many as `reference` holds) and that, installed on a new store in `dir`, the
/// group equals `reference`'s.
async fn holds_each_record_once_and_installs(
    snap: &habar_raft_store::types::Snapshot<SnapshotData>,
    reference: &StateStore,
    dir: &Path,
) {
    let mut reader = habar_raft_store::snapshot::SnapshotReader::open(snap.snapshot.path()).unwrap();
    let mut records = std::collections::HashSet::new();
    while let Some((k, _)) = reader.next_record().unwrap() {
        assert!(records.insert(k.clone()), "record {k:?} is in the file twice");
    }
    let expected = reference.dump_group(GROUP).unwrap();
    assert_eq!(records.len(), expected.len(), "the file holds the position's records, each once");
    let target = open(dir);
    install(&target, snap).await;
    assert_eq!(target.dump_group(GROUP).unwrap(), expected, "the state at the position");
}

/// Property: the same when a trim lands in the middle of the second half's scan of the
/// dedupe times (stopped there by the test), deleting items the scan has read and items it
/// has not reached: each item of the position is in the file exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_carries_each_dedupe_time_once_when_a_trim_lands_mid_scan() {
    const WINDOW: u64 = 1_000_000;
    let chunk = StateStore::DEDUPE_TIMES_CHUNK as u64;
    let n = 3 * chunk;
    let Applied { store, mut sm, reference, target, _dirs } = applied_twice(n).await;

    let (reached, resume) = store.pause_dedupe_scan_for_tests(1);
    let mut builder = sm.try_create_snapshot_builder(false).await.unwrap();
    let build = tokio::spawn(async move { builder.build_snapshot().await.unwrap() });
    // The scan has read the first chunk (entries 1..=chunk, committed at 1_001.. ms); a
    // trim of the entries before chunk + 50 deletes all of them and 50 it has not reached.
    tokio::task::spawn_blocking(move || reached.recv().unwrap()).await.unwrap();
    let trim =
        Command::Maintain { now_ms: 1_001 + chunk + 50 + WINDOW, dedupe_window_ms: WINDOW, max_removals: 10_000 };
    apply(&mut sm, vec![Entry { log_id: LogId::new_term_index(1, n + 1), payload: EntryPayload::Normal(trim) }]).await;
    let s = store.clone();
    tokio::task::spawn_blocking(move || s.checkpoint().unwrap()).await.unwrap();
    let left = store.sled_items_of_kind(GROUP, keys::KIND_DEDUPE_TIME).unwrap() as u64;
    assert_eq!(left, n - chunk - 50, "the trim reached behind and ahead of the scan");
    resume.send(()).unwrap();
    let snap = build.await.unwrap();

    holds_each_record_once_and_installs(&snap, &reference, target.path()).await;
}

/// Property: the same while trims land during the second half's scan of the dedupe times
/// (several chunks of them, trims and checkpoints on another thread, interleaved with the
/// scan as the threads run; the test above fixes one interleaving): every item of the
/// position exactly once in the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_carries_each_dedupe_time_of_its_position_once_while_trims_land_during_its_scan() {
    const WINDOW: u64 = 1_000_000;
    const N: u64 = 2_500;
    let Applied { store, mut sm, reference, target, _dirs } = applied_twice(N).await;

    let mut builder = sm.try_create_snapshot_builder(false).await.unwrap();
    let trims = {
        let (store, mut sm) = (store.clone(), sm.clone());
        tokio::spawn(async move {
            // Each trims the next 100 entries' items (committed at 1_001 + ... ms).
            for i in 0..N / 100 {
                let now_ms = 1_001 + (i + 1) * 100 + WINDOW;
                let trim = Command::Maintain { now_ms, dedupe_window_ms: WINDOW, max_removals: 10_000 };
                let e = Entry { log_id: LogId::new_term_index(1, N + 1 + i), payload: EntryPayload::Normal(trim) };
                apply(&mut sm, vec![e]).await;
                let s = store.clone();
                tokio::task::spawn_blocking(move || s.checkpoint().unwrap()).await.unwrap();
            }
        })
    };
    let snap = builder.build_snapshot().await.unwrap();
    trims.await.unwrap();
    assert_eq!(store.sled_items_of_kind(GROUP, keys::KIND_DEDUPE_TIME).unwrap(), 0, "all trimmed by now");

    holds_each_record_once_and_installs(&snap, &reference, target.path()).await;
}

/// Property: builds waiting for the node's turn to copy their runs do not keep their views
/// of the state index open (fjall keeps its flushed memtables while one is): each reads its
/// view in a turn of its own, apart from the run copies.
#[tokio::test]
async fn builds_waiting_to_copy_their_runs_hold_no_view_of_the_index() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let (mut a, mut b) = (store.group(GROUP).unwrap(), store.group(GROUP + 1).unwrap());
    apply(&mut a, appends(1, 30)).await;
    apply(&mut b, appends(1, 20)).await;
    store.checkpoint().unwrap();
    let turn = store.hold_build_turn_for_tests().await;
    let (mut ba, mut bb) =
        (a.try_create_snapshot_builder(false).await.unwrap(), b.try_create_snapshot_builder(false).await.unwrap());
    assert_eq!(store.index_views_open_for_tests(), 2, "each first half takes a view");
    let builds = [
        tokio::spawn(async move { ba.build_snapshot().await.unwrap() }),
        tokio::spawn(async move { bb.build_snapshot().await.unwrap() }),
    ];
    let start = std::time::Instant::now();
    while store.index_views_open_for_tests() > 0 {
        assert!(start.elapsed() < std::time::Duration::from_secs(20), "views still open while the builds wait");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(builds.iter().all(|b| !b.is_finished()), "both wait for the turn to copy their runs");
    drop(turn);
    for b in builds {
        b.await.unwrap();
    }
    assert_eq!(store.build_views_at_runs_for_tests(), 0);
}

/// Property: an erasure leaves none of the conversation's ciphertext in the envelope
/// segments once the checkpoint after it is written (its runs are zeroed in place), while
/// every other conversation still reads back whole.
#[tokio::test]
async fn erasure_zeroes_the_conversations_runs() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let mut sm = store.group(GROUP).unwrap();
    apply(&mut sm, appends(1, 40)).await;
    store.checkpoint().unwrap();
    apply(&mut sm, appends(41, 40)).await;
    store.checkpoint().unwrap();
    let env_dir = dir.path().join("env");
    assert!(!files_containing(&env_dir, SECRET).is_empty(), "the marker is in a segment before the erasure");
    let before = read_all(&store);

    apply(&mut sm, vec![erase(81, "secret")]).await;
    store.checkpoint().unwrap();
    assert_eq!(files_containing(&env_dir, SECRET), Vec::<PathBuf>::new(), "erased ciphertext left the segments");
    let after = read_all(&store);
    assert_eq!(after[0], ("secret".to_string(), Vec::new()));
    assert_eq!(after[1..], before[1..], "other conversations are untouched");
}

fn command(index: u64, cmd: Command) -> Entry {
    Entry { log_id: LogId::new_term_index(1, index), payload: EntryPayload::Normal(cmd) }
}

/// The envelope segment files of the group's active generation.
fn segment_files(dir: &Path) -> usize {
    segment_paths(dir).len()
}

/// The envelope segment files under the store directory `dir`.
fn segment_paths(dir: &Path) -> Vec<PathBuf> {
    files_under(&dir.join("env")).into_iter().filter(|f| f.extension().is_some_and(|e| e == "env")).collect()
}

/// Property: a segment that no run points into any more (its runs removed by retention or
/// erasure) is deleted, so the files stay bounded under count retention; what is kept reads
/// back whole, also after a reopen (which deletes nothing that is still pointed into).
#[tokio::test]
async fn segments_no_run_points_into_are_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store.set_env_segment_bytes(4096);
    let mut sm = store.group(GROUP).unwrap();
    let mut index = 1;
    let retain = Command::SetRetention { now_ms: 1, conversation_id: "c\u{0}1".into(), max_age_ms: 0, max_count: 30 };
    apply(&mut sm, vec![command(index, retain)]).await;
    let mut most = 0;
    for round in 0..40u64 {
        let es: Vec<Entry> = (0..10)
            .map(|k| {
                index += 1;
                let envelopes = (0..5).map(|j| env("c\u{0}1", 1 + round * 100 + k * 5 + j)).collect();
                command(index, Command::Append { now_ms: 2 + round, envelopes })
            })
            .collect();
        apply(&mut sm, es).await;
        store.checkpoint().unwrap();
        index += 1;
        let housekeeping = Command::Maintain { now_ms: 2 + round, dedupe_window_ms: 1 << 40, max_removals: 10_000 };
        apply(&mut sm, vec![command(index, housekeeping)]).await;
        store.checkpoint().unwrap();
        most = most.max(segment_files(dir.path()));
    }
    // 2,000 envelopes of ~170 bytes went through 4 KiB segments: about 90 of them.
    assert!(most <= 12, "at most {most} segment files at a time under count retention");
    let kept = store.read(GROUP, "c\u{0}1", 0, 100).unwrap();
    assert_eq!(kept.iter().map(|e| e.seq).collect::<Vec<_>>(), (1971..=2000).collect::<Vec<_>>());
    drop(sm);
    drop(store);
    let again = open(dir.path());
    let after = again.read(GROUP, "c\u{0}1", 0, 100).unwrap();
    assert_eq!(after, kept, "after a reopen");

    // An erasure empties every segment but the active one.
    let mut sm = again.group(GROUP).unwrap();
    index += 1;
    apply(&mut sm, vec![erase(index, "c\u{0}1")]).await;
    again.checkpoint().unwrap();
    assert_eq!(segment_files(dir.path()), 1, "only the active segment is left");
    assert!(again.read(GROUP, "c\u{0}1", 0, 100).unwrap().is_empty());
}

/// The last one is the test's own: the child aborts while a snapshot build it began (and
/// whose runs the erasure deleted) is unfinished, its zeroing deferred.
const CRASH_POINTS: [&str; 3] = ["after_segments", "before_zeroing", "inside_a_snapshot_build"];

fn crash_child(dst: &Path, point: &str) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = open(dst);
        let mut sm = store.group(GROUP).unwrap();
        apply(&mut sm, appends(1, 40)).await;
        let mut _building = None;
        if point != "after_segments" {
            store.checkpoint().unwrap();
            if point == "inside_a_snapshot_build" {
                _building = Some(sm.try_create_snapshot_builder(true).await.unwrap());
            }
            apply(&mut sm, vec![erase(41, "secret")]).await;
        }
        store.checkpoint().unwrap();
        if point == "inside_a_snapshot_build" {
            assert!(!files_containing(&dst.join("env"), SECRET).is_empty(), "the build defers the zeroing");
            std::process::abort();
        }
    });
}

/// Property: a crash inside a checkpoint (after its segment write and fdatasync but before
/// its sled batch; after the batch of an erasure is flushed but before the erased runs are
/// zeroed; while a snapshot build defers the zeroing) loses nothing: after the reopen and the re-apply of the log from the durable
/// applied id, reads equal those of a store that never crashed, and no erased ciphertext is
/// left in the segments. The crash is a real `abort()` of a child process.
#[test]
fn a_crash_inside_a_checkpoint_loses_nothing_and_leaves_no_erased_bytes() {
    if let (Ok(dst), Ok(point)) = (std::env::var("HABAR_SM_RUNS_CRASH_DST"), std::env::var("HABAR_TEST_CRASH_AT")) {
        crash_child(Path::new(&dst), &point);
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    for point in CRASH_POINTS {
        let dst = dir.path().join(point);
        spawn_crashing_child(
            "a_crash_inside_a_checkpoint_loses_nothing_and_leaves_no_erased_bytes",
            &[("HABAR_SM_RUNS_CRASH_DST", dst.as_os_str()), ("HABAR_TEST_CRASH_AT", point.as_ref())],
            point,
        );

        let mut log = appends(1, 40);
        if point != "after_segments" {
            log.push(erase(41, "secret"));
        }
        let reference = open(&dir.path().join(format!("{point}-reference")));
        rt.block_on(async {
            apply(&mut reference.group(GROUP).unwrap(), log.clone()).await;
            let store = open(&dst);
            let durable = store.applied(GROUP).unwrap().map_or(0, |l| l.index);
            let mut sm = store.group(GROUP).unwrap();
            apply(&mut sm, log.into_iter().filter(|e| e.log_id.index > durable).collect()).await;
            assert_eq!(read_all(&store), read_all(&reference), "{point}: reads after recovery");
            store.checkpoint().unwrap();
            assert_eq!(read_all(&store), read_all(&reference), "{point}: reads after the next checkpoint");
            assert_eq!(store.dump_group(GROUP).unwrap(), reference.dump_group(GROUP).unwrap(), "{point}: dump");
            // Reads and dumps skip an erased run's item (its records are zeros): count them.
            reference.checkpoint().unwrap();
            assert_eq!(
                store.stored_items_of_kind(GROUP, keys::KIND_RUN).unwrap(),
                reference.stored_items_of_kind(GROUP, keys::KIND_RUN).unwrap(),
                "{point}: the same runs, no erased run's item left"
            );
            assert!(
                files_under(&dst.join("snapshots")).iter().all(|f| f.extension().is_some_and(|e| e == "snap")),
                "{point}: no half-written snapshot is left after the reopen"
            );
            if point != "after_segments" {
                assert_eq!(
                    files_containing(&dst.join("env"), SECRET),
                    Vec::<PathBuf>::new(),
                    "{point}: zeroed at open"
                );
            }
        });
    }
}

/// Property: a read while checkpoints move envelopes from items into runs sees every
/// envelope exactly once: forward reads always return a dense 1..=n, never with a gap (an
/// envelope moved between the read of the items and the read of the runs) or a repeat.
#[test]
fn reads_while_checkpoints_move_envelopes_see_each_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|sc| {
        let (store, done) = (&store, &done);
        sc.spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let mut sm = store.group(GROUP).unwrap();
            for i in 1..=1000u64 {
                let envelopes = (0..5).map(|k| NewEnvelope { expires_at_ms: 0, ..env("c", i * 10 + k) }).collect();
                rt.block_on(apply(&mut sm, vec![command(i, Command::Append { now_ms: i, envelopes })]));
            }
            done.store(true, std::sync::atomic::Ordering::Relaxed);
        });
        sc.spawn(move || {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                store.checkpoint().unwrap();
                std::thread::yield_now();
            }
        });
        let mut reads = 0;
        while !done.load(std::sync::atomic::Ordering::Relaxed) || reads == 0 {
            let got: Vec<u64> = store.read(GROUP, "c", 1, 10_000).unwrap().iter().map(|e| e.seq).collect();
            let dense: Vec<u64> = (1..=got.len() as u64).collect();
            assert_eq!(got, dense, "read {reads}: a gap or a repeat");
            reads += 1;
        }
        assert!(reads > 10, "only {reads} reads overlapped the writes");
    });
    assert_eq!(store.read(GROUP, "c", 1, 10_000).unwrap().len(), 5000);
}

/// Property: runs that retention removes are zeroed as well (a later erasure of the
/// conversation could no longer find them), and a store reopened after an erasure emptied
/// segments opens (nothing it lists to zero is looked for in a deleted segment); an envelope
/// too big for a run stays an item and reads back.
#[tokio::test]
async fn retention_zeroes_its_runs_and_a_reopen_after_an_erasure_works() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store.set_env_segment_bytes(8192);
    let mut sm = store.group(GROUP).unwrap();
    let retain = Command::SetRetention { now_ms: 1, conversation_id: "secret".into(), max_age_ms: 0, max_count: 10 };
    apply(&mut sm, vec![command(1, retain)]).await;
    let mut index = 1;
    for round in 0..20u64 {
        index += 1;
        let envelopes = (0..8).map(|j| NewEnvelope { expires_at_ms: 0, ..env("secret", round * 8 + j) }).collect();
        apply(&mut sm, vec![command(index, Command::Append { now_ms: 2 + round, envelopes })]).await;
        // Another conversation's runs keep the segments alive.
        index += 1;
        let others = (0..8).map(|j| NewEnvelope { expires_at_ms: 0, ..env("c\u{0}1", round * 8 + j) }).collect();
        apply(&mut sm, vec![command(index, Command::Append { now_ms: 2 + round, envelopes: others })]).await;
        store.checkpoint().unwrap();
        index += 1;
        let housekeeping = Command::Maintain { now_ms: 2 + round, dedupe_window_ms: 1 << 40, max_removals: 10_000 };
        apply(&mut sm, vec![command(index, housekeeping)]).await;
        store.checkpoint().unwrap();
    }
    let env_dir = dir.path().join("env");
    let left = occurrences(&env_dir, SECRET);
    assert!(left <= 16, "{left} copies of the marker in the segments, 10 envelopes kept (runs of 8)");
    assert_eq!(store.read(GROUP, "secret", 0, 100).unwrap().len(), 10);

    index += 1;
    apply(&mut sm, vec![erase(index, "secret")]).await;
    store.checkpoint().unwrap();
    assert_eq!(occurrences(&env_dir, SECRET), 0, "erased");
    index += 1;
    let big = NewEnvelope { ciphertext: vec![7u8; 200 << 10].into(), expires_at_ms: 0, ..env("big", 1) };
    apply(&mut sm, vec![command(index, Command::Append { now_ms: 100, envelopes: vec![big.clone()] })]).await;
    store.checkpoint().unwrap();
    let others = store.read(GROUP, "c\u{0}1", 0, 1000).unwrap();
    drop(sm);
    drop(store);
    let again = open(dir.path());
    assert_eq!(again.read(GROUP, "c\u{0}1", 0, 1000).unwrap(), others, "reopened after the erasure");
    let got = again.read(GROUP, "big", 0, 10).unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].envelope.ciphertext, big.ciphertext, "a 200 KiB envelope reads back");
}

/// Property: a snapshot finished while applies go on (openraft holds the state machine only
/// while the build begins) is the state at its log id: appends, an erasure, retention that
/// empties segments, and checkpoints between the build's two halves change nothing in it;
/// the zeroing and segment deletions they call for wait for the build and are done when it
/// finishes, not at the group's next write.
#[tokio::test]
async fn a_snapshot_finished_while_applies_go_on_is_the_state_at_its_log_id() {
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let store = open(d1.path());
    store.set_env_segment_bytes(4096);
    let mut sm = store.group(GROUP).unwrap();
    for round in 0..4 {
        apply(&mut sm, appends(1 + round * 15, 15)).await;
        store.checkpoint().unwrap();
    }
    // A retention mark on a conversation with expiring envelopes (sled items, which the held
    // half writes) before the build begins.
    let keep3 = Command::SetRetention { now_ms: 1, conversation_id: "c\u{0}2".into(), max_age_ms: 0, max_count: 3 };
    apply(&mut sm, vec![command(61, keep3.clone())]).await;
    store.checkpoint().unwrap();
    let segments_at_begin = segment_paths(d1.path());
    let mut builder = sm.try_create_snapshot_builder(true).await.unwrap();
    let (dump_at_begin, reads_at_begin) = (store.dump_group(GROUP).unwrap(), read_all(&store));

    apply(&mut sm, appends(62, 20)).await;
    store.checkpoint().unwrap();
    let retain = Command::SetRetention { now_ms: 1, conversation_id: "c\u{0}1".into(), max_age_ms: 0, max_count: 2 };
    apply(&mut sm, vec![erase(82, "secret"), command(83, retain.clone())]).await;
    store.checkpoint().unwrap();
    store.checkpoint().unwrap();
    let env_dir = d1.path().join("env");
    assert!(!files_containing(&env_dir, SECRET).is_empty(), "the erased runs wait for the build");
    assert!(segments_at_begin.iter().all(|f| f.exists()), "no segment is deleted during the build");

    let snap = builder.build_snapshot().await.unwrap();
    assert_eq!(snap.meta.last_log_id, Some(LogId::new_term_index(1, 61)));
    assert_eq!(files_containing(&env_dir, SECRET), Vec::<PathBuf>::new(), "zeroed when the build finished");
    assert!(!segments_at_begin.iter().all(|f| f.exists()), "emptied segments deleted when the build finished");

    // Installed elsewhere: the state when the build began.
    let target = open(d2.path());
    let len = std::fs::metadata(snap.snapshot.path()).unwrap().len();
    let mut t = target.group(GROUP).unwrap();
    t.install_snapshot(&snap.meta, SnapshotData::new(snap.snapshot.path().to_path_buf(), len)).await.unwrap();
    assert_eq!(target.dump_group(GROUP).unwrap(), dump_at_begin, "the snapshot holds the state at its log id");
    assert_eq!(read_all(&target), reads_at_begin);
    // And the later entries applied to it give this store's state.
    apply(&mut t, appends(62, 20)).await;
    apply(&mut t, vec![erase(82, "secret"), command(83, retain)]).await;
    assert_eq!(target.dump_group(GROUP).unwrap(), store.dump_group(GROUP).unwrap(), "the same state at 83");
}

/// Property: an install of a group waits for a build of the group that is still reading its
/// runs (which the install's switch of generations deletes), and the build, older, does not
/// replace the installed snapshot; openraft's request to build another group's snapshot is
/// never refused meanwhile (openraft would try that group again only after another
/// `snapshot_logs_since_last` entries), but its second half waits for the node's build turn.
#[tokio::test]
async fn an_install_waits_for_the_groups_build_and_builds_take_turns() {
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (store, source) = (open(d1.path()), open(d2.path()));
    let mut sm = store.group(GROUP).unwrap();
    apply(&mut sm, appends(1, 30)).await;
    store.checkpoint().unwrap();
    let mut src = source.group(GROUP).unwrap();
    apply(&mut src, appends(1, 70)).await;
    let newer = src.try_create_snapshot_builder(false).await.unwrap().build_snapshot().await.unwrap();

    let mut builder = sm.try_create_snapshot_builder(false).await.unwrap();
    let mut other = store.group(GROUP + 1).unwrap();
    apply(&mut other, appends(1, 5)).await;
    let mut other_builder = other.try_create_snapshot_builder(false).await.expect("not refused while another builds");

    let len = std::fs::metadata(newer.snapshot.path()).unwrap().len();
    let (meta, data) = (newer.meta.clone(), SnapshotData::new(newer.snapshot.path().to_path_buf(), len));
    let mut installer = sm.clone();
    let install = tokio::spawn(async move { installer.install_snapshot(&meta, data).await });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!install.is_finished(), "the install waits for the build");

    let older = builder.build_snapshot().await.unwrap();
    assert_eq!(older.meta.last_log_id, Some(LogId::new_term_index(1, 30)));
    install.await.unwrap().unwrap();
    assert_eq!(store.dump_group(GROUP).unwrap(), source.dump_group(GROUP).unwrap(), "installed");
    let current = sm.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(current.meta, newer.meta, "the installed snapshot stays the current one");

    let turn = store.hold_build_turn_for_tests().await;
    let waiting = tokio::spawn(async move { other_builder.build_snapshot().await });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "a second half waits for the node's build turn");
    drop(turn);
    let built = waiting.await.unwrap().unwrap();
    assert_eq!(built.meta.last_log_id, Some(LogId::new_term_index(1, 5)));
}

/// Property: a build whose second half fails (here: its runs' segment cut short under it)
/// does not stop the group: the current snapshot is returned in its place, the half-written
/// file is removed, and applies go on; a build that ends after a rebuild at a later log id
/// (the current file was found damaged meanwhile) does not replace that rebuild.
#[tokio::test]
async fn a_failed_or_overtaken_build_keeps_the_current_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let mut sm = store.group(GROUP).unwrap();
    apply(&mut sm, appends(1, 20)).await;
    let first = sm.try_create_snapshot_builder(false).await.unwrap().build_snapshot().await.unwrap();

    // Overtaken: begun at 30, ends after a rebuild at 60.
    apply(&mut sm, appends(21, 10)).await;
    let mut slow = sm.try_create_snapshot_builder(false).await.unwrap();
    apply(&mut sm, appends(31, 30)).await;
    let mut bytes = std::fs::read(first.snapshot.path()).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xFF;
    std::fs::write(first.snapshot.path(), bytes).unwrap();
    let rebuilt = sm.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(rebuilt.meta.last_log_id, Some(LogId::new_term_index(1, 60)), "rebuilt from the state machine");
    let late = slow.build_snapshot().await.unwrap();
    assert_eq!(late.meta, rebuilt.meta, "the later rebuild is answered");
    let current = sm.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(current.meta, rebuilt.meta, "and stays current");
    assert!(current.snapshot.path().exists());

    // Failed: the segment holding the runs is cut short between the halves.
    apply(&mut sm, appends(61, 10)).await;
    store.checkpoint().unwrap();
    let mut failing = sm.try_create_snapshot_builder(false).await.unwrap();
    for f in segment_paths(dir.path()) {
        std::fs::OpenOptions::new().write(true).open(&f).unwrap().set_len(0).unwrap();
    }
    let kept = failing.build_snapshot().await.unwrap();
    assert_eq!(kept.meta, rebuilt.meta, "the current snapshot in place of the failed one");
    let snaps: Vec<PathBuf> = files_under(&dir.path().join("snapshots"));
    assert_eq!(snaps, vec![current.snapshot.path().to_path_buf()], "no half-written file is left");
    apply(&mut sm, appends(71, 1)).await;
    assert_eq!(store.applied(GROUP).unwrap(), Some(LogId::new_term_index(1, 71)), "applies go on");
}

/// Property: zeroing that a build deferred is done once the build is gone even if it never
/// finished (openraft dropped the builder at shutdown) and the node gets no further write:
/// the checkpoint thread takes it up by itself.
#[tokio::test]
async fn zeroing_deferred_by_a_dropped_build_is_done_on_an_idle_node() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let mut sm = store.group(GROUP).unwrap();
    apply(&mut sm, appends(1, 40)).await;
    store.checkpoint().unwrap();
    let builder = sm.try_create_snapshot_builder(false).await.unwrap();
    apply(&mut sm, vec![erase(41, "secret")]).await;
    store.checkpoint().unwrap();
    let env_dir = dir.path().join("env");
    assert!(!files_containing(&env_dir, SECRET).is_empty(), "deferred while the build lives");
    drop(builder);
    // No timing is asserted: the bound only keeps a broken build from hanging the test.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !files_containing(&env_dir, SECRET).is_empty() {
        assert!(std::time::Instant::now() < deadline, "the deferred zeroing was never done");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(files_under(&dir.path().join("snapshots")).len(), 0, "the dropped build's file is not left either");
}
