//! Property: whatever sequence of appends, truncations, purges, votes and reopens runs
//! against the WAL (with tiny segments, so rotation and segment deletion happen often),
//! its contents (and the bytes it counts after each index) always equal those of a simple
//! in-memory model.

use std::collections::BTreeMap;

use habar_raft_store::Wal;
use habar_raft_store::WalConfig;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Append {
        group: u32,
        n: u64,
        term: u64,
    },
    /// Truncate at `last - back` (a conflicting suffix).
    Truncate {
        group: u32,
        back: u64,
    },
    /// Purge up to `first + fwd`.
    Purge {
        group: u32,
        fwd: u64,
    },
    Vote {
        group: u32,
        v: u8,
    },
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..3u32, 1..8u64, 1..4u64).prop_map(|(group, n, term)| Op::Append { group, n, term }),
        1 => (0..3u32, 0..5u64).prop_map(|(group, back)| Op::Truncate { group, back }),
        1 => (0..3u32, 0..12u64).prop_map(|(group, fwd)| Op::Purge { group, fwd }),
        1 => (0..3u32, any::<u8>()).prop_map(|(group, v)| Op::Vote { group, v }),
        1 => Just(Op::Reopen),
    ]
}

#[derive(Default, Debug)]
struct Model {
    entries: BTreeMap<u64, (u64, Vec<u8>)>,
    purged: Option<(u64, u64)>,
    vote: Option<Vec<u8>>,
}

impl Model {
    fn last(&self) -> Option<(u64, u64)> {
        self.entries.iter().next_back().map(|(i, (t, _))| (*i, *t)).or(self.purged)
    }
}

fn cfg(dir: &std::path::Path) -> WalConfig {
    let mut c = WalConfig::new(dir);
    c.segment_bytes = 512;
    c
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]
    #[test]
    fn wal_matches_a_simple_model(ops in proptest::collection::vec(op(), 1..60)) {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::open(cfg(dir.path())).unwrap();
        let mut models: BTreeMap<u32, Model> = BTreeMap::new();
        for op in ops {
            match op {
                Op::Append { group, n, term } => {
                    let m = models.entry(group).or_default();
                    let first = m.last().map_or(1, |(i, _)| i + 1);
                    let term = m.last().map_or(term, |(_, t)| t.max(term));
                    let ps: Vec<(u64, Vec<u8>)> = (first..first + n).map(|i| (i, format!("{group}/{i}/{term}").into_bytes())).collect();
                    let lsn = wal.append(group, ps.iter().map(|(i, p)| (*i, term, p.as_slice())), None).unwrap();
                    wal.wait_durable_blocking(lsn).unwrap();
                    for (i, p) in ps { m.entries.insert(i, (term, p)); }
                }
                Op::Truncate { group, back } => {
                    let m = models.entry(group).or_default();
                    let Some((&first, _)) = m.entries.iter().next() else { continue };
                    let Some((last, _)) = m.last() else { continue };
                    let from = last.saturating_sub(back).max(first);
                    let lsn = wal.truncate_from(group, from).unwrap();
                    wal.wait_durable_blocking(lsn).unwrap();
                    m.entries.retain(|i, _| *i < from);
                }
                Op::Purge { group, fwd } => {
                    let m = models.entry(group).or_default();
                    let Some((&first, _)) = m.entries.iter().next() else { continue };
                    let Some((last, _)) = m.last() else { continue };
                    let upto = (first + fwd).min(last);
                    let term = m.entries[&upto].0;
                    let lsn = wal.purge(group, upto, term).unwrap();
                    wal.wait_durable_blocking(lsn).unwrap();
                    wal.delete_obsolete_segments().unwrap();
                    m.entries.retain(|i, _| *i > upto);
                    m.purged = Some((upto, term));
                }
                Op::Vote { group, v } => {
                    let lsn = wal.save_vote(group, &[v]).unwrap();
                    wal.wait_durable_blocking(lsn).unwrap();
                    models.entry(group).or_default().vote = Some(vec![v]);
                }
                Op::Reopen => {
                    drop(wal);
                    wal = Wal::open(cfg(dir.path())).unwrap();
                }
            }
            for (g, m) in &models {
                let got = wal.read(*g, 0, u64::MAX).unwrap();
                let want: Vec<(u64, u64, Vec<u8>)> = m.entries.iter().map(|(i, (t, p))| (*i, *t, p.clone())).collect();
                let got: Vec<(u64, u64, Vec<u8>)> = got.into_iter().map(|e| (e.index, e.term, e.payload)).collect();
                prop_assert_eq!(got, want);
                let st = wal.group_state(*g);
                prop_assert_eq!(st.last, m.last());
                prop_assert_eq!(st.last_purged, m.purged);
                prop_assert_eq!(&st.vote, &m.vote);
                // The log's bytes after each index: each held entry's body (its payload,
                // index, term and the record's kind and group), purged ones not counted.
                let body = |p: &Vec<u8>| (p.len() + habar_raft_store::wal::record::BODY_PREFIX_LEN + 16) as u64;
                let first = m.entries.keys().next().copied().unwrap_or(1);
                for after in first.saturating_sub(2)..=m.last().map_or(0, |(i, _)| i) + 1 {
                    let want: u64 = m.entries.range(after + 1..).map(|(_, (_, p))| body(p)).sum();
                    prop_assert_eq!(wal.bytes_after(*g, after), want, "group {} after {}", g, after);
                }
            }
        }
    }
}

/// Property: `retention` names the group whose oldest held entry is in the oldest segment
/// (the one keeping every later segment on disk) and counts the full segments kept from
/// there (not the active one, which no purge frees); the count falls once the purges let
/// the segments go.
#[test]
fn retention_names_the_group_that_keeps_the_oldest_segment() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(cfg(dir.path())).unwrap();
    assert_eq!(wal.retention(), (0, None), "no entry, no group");
    let payload = [7u8; 100];
    let lsn = wal.append(1, [(1, 1, &payload[..])], None).unwrap();
    wal.wait_durable_blocking(lsn).unwrap();
    for i in 1..=30 {
        let lsn = wal.append(2, [(i, 1, &payload[..])], None).unwrap();
        wal.wait_durable_blocking(lsn).unwrap();
    }
    let (before, oldest) = wal.retention();
    assert_eq!(oldest, Some(1), "group 1's one entry is in the first segment");
    assert!(before >= 3 * 512 && before % 512 == 0, "several full segments: {before} bytes");
    let lsn = wal.purge(1, 1, 1).unwrap();
    wal.wait_durable_blocking(lsn).unwrap();
    wal.delete_obsolete_segments().unwrap();
    let (after, oldest) = wal.retention();
    assert_eq!(oldest, Some(2));
    assert_eq!(after, before, "group 2 still holds the first segment's entries");
    assert_eq!(wal.retention().0, (wal.segments().len() as u64 - 1) * 512);
    let lsn = wal.purge(2, 25, 1).unwrap();
    wal.wait_durable_blocking(lsn).unwrap();
    wal.delete_obsolete_segments().unwrap();
    let (after, _) = wal.retention();
    assert!(after < before, "segments deleted: {after} < {before}");
    let lsn = wal.purge(2, 30, 1).unwrap();
    wal.wait_durable_blocking(lsn).unwrap();
    assert_eq!(wal.retention(), (0, None), "no entry held: nothing kept");
}
