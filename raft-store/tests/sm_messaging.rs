//! The messaging semantics of the state machine, checked against a simple in-memory model:
//! idempotent appends (dedupe by message id, bounded by a window of log time), cursors
//! that never move backwards, expiry, retention by count and age, erasure with or without
//! a seq reset, and reads (forward and backward pages) that report every removed seq.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::path::Path;

use habar_raft_store::sm::Direction;
use habar_raft_store::types::Command;
use habar_raft_store::types::Entry;
use habar_raft_store::types::EntryPayload;
use habar_raft_store::types::LogId;
use habar_raft_store::types::NewEnvelope;
use habar_raft_store::GroupStateMachine;
use habar_raft_store::StateStore;
use openraft::storage::RaftStateMachine;
use proptest::prelude::*;

const GROUP: u32 = 5;
const WINDOW: u64 = 300;

#[derive(Debug, Clone)]
enum Op {
    Append(Vec<(u8, u8, u64)>), // (conversation, message id, expires in ms (0 = never))
    // Times move in steps of 50 ms, so expiry, retention and the
    // dedupe window often fall exactly on a boundary.
    Cursor(u8, u8, u64), // (conversation, reader, seq)
    Maintain,
    Delete(u8, bool),
    /// One bounded step of an erasure: (conversation, reset, at most this many keys).
    Erase(u8, bool, u32),
    Retention(u8, u64, u64),
    /// One bounded step of a retention change: (conversation, max age, max count, at most
    /// this many envelopes removed).
    RetentionStep(u8, u64, u64, u32),
    Tick(u64),
    /// A clean restart: the store is flushed (as the node does at shutdown) and reopened.
    Reopen,
    /// A crash: the store is dropped without a flush, so everything applied since its last
    /// checkpoint is gone from it; the entries after its durable applied id are applied
    /// again, as openraft does from the log at start.
    Crash,
    /// A checkpoint (not flushed): the only place one falls, since the store's timer is set
    /// long, so a later `Crash` goes back to exactly here (or to the last `Reopen`).
    Checkpoint,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => proptest::collection::vec((0u8..3, 0u8..12, prop_oneof![3 => Just(0u64), 1 => (1u64..8).prop_map(|x| x * 50)]), 1..5).prop_map(Op::Append),
        2 => (0u8..3, 0u8..3, 0u64..30).prop_map(|(c, r, s)| Op::Cursor(c, r, s)),
        2 => Just(Op::Maintain),
        1 => (0u8..3, any::<bool>()).prop_map(|(c, r)| Op::Delete(c, r)),
        2 => (0u8..3, any::<bool>(), 1u32..5).prop_map(|(c, r, n)| Op::Erase(c, r, n)),
        1 => (0u8..3, prop_oneof![Just(0u64), (1u64..10).prop_map(|x| x * 50)], prop_oneof![Just(0u64), 1u64..6]).prop_map(|(c, a, n)| Op::Retention(c, a, n)),
        1 => (0u8..3, prop_oneof![Just(0u64), (1u64..10).prop_map(|x| x * 50)], prop_oneof![Just(0u64), 1u64..6], 1u32..4)
            .prop_map(|(c, a, n, b)| Op::RetentionStep(c, a, n, b)),
        3 => (1u64..4).prop_map(|x| Op::Tick(x * 50)),
        1 => Just(Op::Reopen),
        1 => Just(Op::Crash),
        1 => Just(Op::Checkpoint),
    ]
}

fn conv(c: u8) -> String {
    // One id with a zero byte, to exercise key escaping.
    format!("conv\u{0}{c}")
}

fn mid(m: u8) -> [u8; 16] {
    [m; 16]
}

#[derive(Debug, Default, Clone)]
struct MConv {
    last_seq: u64,
    max_age: u64,
    max_count: u64,
    /// seq -> (message id, committed_at, expires_at)
    envs: BTreeMap<u64, (u8, u64, u64)>,
    dedupe: HashMap<u8, (u64, u64)>,
    cursors: BTreeMap<String, u64>,
}

impl MConv {
    fn retain(&mut self, now: u64) {
        let (last, age, count) = (self.last_seq, self.max_age, self.max_count);
        self.envs.retain(|seq, (_, at, _)| !((count > 0 && seq + count <= last) || (age > 0 && *at + age <= now)));
    }
}

#[derive(Default)]
struct Model {
    convs: BTreeMap<String, MConv>,
}

impl Model {
    fn apply(&mut self, now: u64, op: &Op) {
        match op {
            Op::Append(es) => {
                for (c, m, exp) in es {
                    let mc = self.convs.entry(conv(*c)).or_default();
                    if mc.dedupe.contains_key(m) {
                        continue;
                    }
                    mc.last_seq += 1;
                    let seq = mc.last_seq;
                    let expires = if *exp == 0 { 0 } else { now + exp };
                    mc.envs.insert(seq, (*m, now, expires));
                    mc.dedupe.insert(*m, (seq, now));
                    if mc.max_count > 0 && seq > mc.max_count {
                        // Only the newest max_count stay.
                        mc.envs.retain(|s, _| *s > seq - mc.max_count);
                    }
                }
            }
            Op::Cursor(c, r, s) => {
                if let Some(mc) = self.convs.get_mut(&conv(*c)) {
                    let want = (*s).min(mc.last_seq);
                    let cur = mc.cursors.entry(format!("reader-{r}")).or_insert(0);
                    *cur = (*cur).max(want);
                    if *cur == 0 {
                        mc.cursors.remove(&format!("reader-{r}"));
                    }
                }
            }
            Op::Maintain => {
                let cutoff = now.saturating_sub(WINDOW);
                for mc in self.convs.values_mut() {
                    mc.envs.retain(|_, (_, _, exp)| *exp == 0 || *exp > now);
                    mc.retain(now);
                    mc.dedupe.retain(|_, (_, at)| *at >= cutoff);
                }
            }
            Op::Delete(c, reset) => {
                if *reset {
                    self.convs.remove(&conv(*c));
                } else if let Some(mc) = self.convs.get_mut(&conv(*c)) {
                    mc.envs.clear();
                    mc.dedupe.clear();
                    mc.cursors.clear();
                }
            }
            Op::Erase(c, reset, budget) => {
                // Envelopes by seq, then dedupe entries by message id, then cursors by
                // reader: the store's key order.
                let Some(mc) = self.convs.get_mut(&conv(*c)) else { return };
                let mut budget = *budget as usize;
                let n = budget.min(mc.envs.len());
                let gone: Vec<u64> = mc.envs.keys().take(n).copied().collect();
                for seq in gone {
                    mc.envs.remove(&seq);
                }
                budget -= n;
                let mut ids: Vec<u8> = mc.dedupe.keys().copied().collect();
                ids.sort();
                let n = budget.min(ids.len());
                for m in &ids[..n] {
                    mc.dedupe.remove(m);
                }
                budget -= n;
                let n = budget.min(mc.cursors.len());
                let readers: Vec<String> = mc.cursors.keys().take(n).cloned().collect();
                for r in readers {
                    mc.cursors.remove(&r);
                }
                let done = mc.envs.is_empty() && mc.dedupe.is_empty() && mc.cursors.is_empty();
                if *reset && done {
                    self.convs.remove(&conv(*c));
                }
            }
            Op::Retention(c, age, count) => {
                let mc = self.convs.entry(conv(*c)).or_default();
                mc.max_age = *age;
                mc.max_count = *count;
                mc.retain(now);
            }
            Op::RetentionStep(c, age, count, budget) => {
                let mc = self.convs.entry(conv(*c)).or_default();
                mc.max_age = *age;
                mc.max_count = *count;
                let mut all = mc.clone();
                all.retain(now);
                // The oldest `budget` of those the limits remove.
                let gone: Vec<u64> =
                    mc.envs.keys().filter(|s| !all.envs.contains_key(s)).take(*budget as usize).copied().collect();
                for seq in gone {
                    mc.envs.remove(&seq);
                }
            }
            Op::Tick(_) | Op::Reopen | Op::Crash | Op::Checkpoint => {}
        }
    }
}

fn command(now: u64, op: &Op) -> Option<Command> {
    Some(match op {
        Op::Append(es) => Command::Append {
            now_ms: now,
            envelopes: es
                .iter()
                .map(|(c, m, exp)| NewEnvelope {
                    conversation_id: conv(*c),
                    message_id: mid(*m),
                    sender: String::new(),
                    ciphertext: vec![*m; 8].into(),
                    expires_at_ms: if *exp == 0 { 0 } else { now + exp },
                })
                .collect(),
        },
        Op::Cursor(c, r, s) => {
            Command::CommitCursor { now_ms: now, conversation_id: conv(*c), reader_id: format!("reader-{r}"), seq: *s }
        }
        Op::Maintain => Command::Maintain { now_ms: now, dedupe_window_ms: WINDOW, max_removals: 1_000_000 },
        Op::Delete(c, reset) => {
            Command::DeleteConversation { now_ms: now, conversation_id: conv(*c), reset_seq: *reset }
        }
        Op::Erase(c, reset, budget) => Command::EraseConversation {
            now_ms: now,
            conversation_id: conv(*c),
            reset_seq: *reset,
            max_removals: *budget,
        },
        Op::Retention(c, age, count) => {
            Command::SetRetention { now_ms: now, conversation_id: conv(*c), max_age_ms: *age, max_count: *count }
        }
        Op::RetentionStep(c, age, count, budget) => Command::SetRetentionStep {
            now_ms: now,
            conversation_id: conv(*c),
            max_age_ms: *age,
            max_count: *count,
            max_removals: *budget,
        },
        Op::Tick(_) | Op::Reopen | Op::Crash | Op::Checkpoint => return None,
    })
}

async fn apply(sm: &mut GroupStateMachine, es: Vec<Entry>) {
    let stream = futures::stream::iter(es.into_iter().map(|e| Ok((e, None))));
    sm.apply(stream).await.unwrap();
}

/// `filter`: the dedupe filter's (first bloom's keys, cap in bytes), small enough that a few
/// message ids exercise its chains of blooms, drops and cap; `None`: as a node has it.
fn open(dir: &Path, filter: Option<(usize, usize)>) -> (StateStore, GroupStateMachine) {
    let store = StateStore::open(dir, 8 << 20).unwrap();
    store.set_checkpoint_interval(std::time::Duration::from_secs(3600));
    if let Some((first, cap)) = filter {
        store.set_dedupe_filter_limits(first, cap).unwrap();
    }
    let sm = store.group(GROUP).unwrap();
    (store, sm)
}

/// Checks every conversation of the store against the model, as a reader at `now` sees it.
fn check(store: &StateStore, model: &Model, now: u64) {
    for c in 0..3u8 {
        let id = conv(c);
        let empty = MConv::default();
        let mc = model.convs.get(&id).unwrap_or(&empty);
        let live: Vec<(u64, u8)> =
            mc.envs.iter().filter(|(_, (_, _, exp))| *exp == 0 || *exp > now).map(|(s, (m, _, _))| (*s, *m)).collect();

        // Forward pages of 2: envelopes and removed ranges tile 1..=last_seq exactly.
        let mut got = Vec::new();
        let mut covered = 0u64;
        let mut from = 1;
        for _ in 0..1000 {
            let p = store.read_page(GROUP, &id, Direction::Forward, from, 2, now).unwrap();
            assert_eq!(p.last_seq, mc.last_seq, "{id:?}: last_seq");
            let held = mc.envs.keys().next().copied().unwrap_or(0);
            assert_eq!(p.first_seq, held, "{id:?}: first_seq is the lowest seq still held (expired or not)");
            for e in &p.envelopes {
                got.push((e.seq, e.envelope.message_id[0]));
            }
            covered += p.envelopes.len() as u64 + p.removed.iter().map(|(a, b)| b - a + 1).sum::<u64>();
            for (a, b) in &p.removed {
                assert!(a <= b && *b <= mc.last_seq, "{id:?}: removed range {a}..={b} within 1..={}", mc.last_seq);
                assert!(!live.iter().any(|(s, _)| s >= a && s <= b), "{id:?}: a live seq reported removed");
            }
            from = p.next;
            if p.end {
                break;
            }
        }
        assert_eq!(got, live, "{id:?}: forward reads return exactly the live envelopes");
        assert_eq!(covered, mc.last_seq, "{id:?}: envelopes and removed ranges cover every seq once");

        // Backward pages of 3 from the newest: the same envelopes, newest first.
        let mut back = Vec::new();
        let mut before = 0;
        for _ in 0..1000 {
            let p = store.read_page(GROUP, &id, Direction::Backward, before, 3, now).unwrap();
            back.extend(p.envelopes.iter().map(|e| (e.seq, e.envelope.message_id[0])));
            before = p.next;
            if p.end {
                break;
            }
        }
        back.reverse();
        assert_eq!(back, live, "{id:?}: backward paging returns the same envelopes");

        // Cursors.
        let (cursors, end, last) = store.cursors(GROUP, &id, None, "", 100).unwrap();
        assert!(end);
        assert_eq!(last, mc.last_seq);
        let got: BTreeMap<String, u64> = cursors.into_iter().map(|c| (c.reader_id, c.seq)).collect();
        assert_eq!(got, mc.cursors, "{id:?}: cursors");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Property: after any sequence of appends (with repeated message ids), cursor
    /// commits, housekeeping, erasures, retention changes, clock ticks, reopens and crashes
    /// (with the entries after the durable applied id applied again), applied in arbitrary
    /// batches, reads and cursors equal the model's: replay after a crash assigns the same
    /// seqs and dedupe answers as the first apply did. With dedupe filters as a node has
    /// them or small ones (many blooms, dropped by housekeeping or at the cap): a lookup the
    /// filter skips answers what the lookup would have.
    #[test]
    fn messaging_state_matches_the_model(
        ops in proptest::collection::vec(op(), 1..60),
        cuts in proptest::collection::vec(any::<bool>(), 60),
        filter in prop_oneof![Just(None), (1usize..4, prop_oneof![Just(usize::MAX), 64usize..400]).prop_map(Some)],
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let (mut store, mut sm) = open(dir.path(), filter);
            let mut model = Model::default();
            let mut now = 1_000_000u64;
            let mut index = 0u64;
            let mut pending = Vec::new();
            // Every entry, as the Raft log holds them.
            let mut log: Vec<Entry> = Vec::new();
            for (i, op) in ops.iter().enumerate() {
                match op {
                    Op::Tick(ms) => now += ms,
                    Op::Reopen => {
                        apply(&mut sm, std::mem::take(&mut pending)).await;
                        store.flush().unwrap();
                        drop(sm);
                        drop(store);
                        (store, sm) = open(dir.path(), filter);
                    }
                    Op::Checkpoint => {
                        apply(&mut sm, std::mem::take(&mut pending)).await;
                        store.checkpoint().unwrap();
                    }
                    Op::Crash => {
                        apply(&mut sm, std::mem::take(&mut pending)).await;
                        drop(sm);
                        drop(store);
                        (store, sm) = open(dir.path(), filter);
                        let durable = store.applied(GROUP).unwrap().map_or(0, |l| l.index);
                        let replay: Vec<Entry> = log.iter().filter(|e| e.log_id.index > durable).cloned().collect();
                        apply(&mut sm, replay).await;
                    }
                    _ => {}
                }
                if let Some(cmd) = command(now, op) {
                    index += 1;
                    let entry = Entry { log_id: LogId::new_term_index(1, index), payload: EntryPayload::Normal(cmd) };
                    log.push(entry.clone());
                    pending.push(entry);
                }
                model.apply(now, op);
                if cuts[i] {
                    apply(&mut sm, std::mem::take(&mut pending)).await;
                    check(&store, &model, now);
                }
            }
            apply(&mut sm, pending).await;
            check(&store, &model, now);
        });
    }
}

/// Housekeeping that stops at its budget keeps the dedupe answers of the message
/// ids it did not reach, with a dedupe filter of one id per bloom (whose blooms go as
/// housekeeping passes them): only the ids it removed are new again.
#[test]
fn housekeeping_cut_short_by_its_budget_keeps_the_ids_it_did_not_reach() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let (store, mut sm) = open(dir.path(), Some((1, usize::MAX)));
        let append = |now: u64, ids: &[u8]| Command::Append {
            now_ms: now,
            envelopes: ids
                .iter()
                .map(|m| NewEnvelope {
                    conversation_id: conv(0),
                    message_id: mid(*m),
                    sender: String::new(),
                    ciphertext: vec![*m; 8].into(),
                    expires_at_ms: 0,
                })
                .collect(),
        };
        let cmds = [
            append(100, &[1]),
            append(200, &[2]),
            append(300, &[3]),
            // Everything before 900 is out of the window, but the budget reaches 100's only.
            Command::Maintain { now_ms: 1000, dedupe_window_ms: 100, max_removals: 1 },
            append(1001, &[1, 2, 3]),
        ];
        let entries = cmds
            .into_iter()
            .enumerate()
            .map(|(i, c)| Entry { log_id: LogId::new_term_index(1, i as u64 + 1), payload: EntryPayload::Normal(c) })
            .collect();
        apply(&mut sm, entries).await;
        let got: Vec<(u64, u8)> = store
            .read(GROUP, &conv(0), 1, 100)
            .unwrap()
            .into_iter()
            .map(|e| (e.seq, e.envelope.message_id[0]))
            .collect();
        assert_eq!(got, vec![(1, 1), (2, 2), (3, 3), (4, 1)], "only id 1 left the dedupe window");
    });
}
