//! Which dedupe pairs may exist: per group and generation, bloom filters over the seeded xxh3
//! hashes of every DEDUPE key the applies, a snapshot install or the open put into the state
//! machine. An append's dedupe lookup of a key the filter rules out is skipped: with 1,000
//! busy conversations nearly every envelope's message id is new, and its lookup searched every
//! memtable and table filter of the state index (a fifth of a node's CPU; skipping it gave
//! +30% closed-loop throughput, docs/BENCHMARKS.md, "tenth session").
//!
//! The one rule: **a key ruled out has no DEDUPE item** in the group's state (overlay or
//! index), so skipping its lookup answers exactly what the lookup would: replicas whose
//! filters differ (different seeds, caps reached at different times) still apply alike. Hence:
//! - a key is added before the batch holding its pair is written (the group's applies are
//!   one at a time, and only they consult the filter);
//! - bloom filters are never cleared of single keys (an erasure's deletes leave them: a
//!   superset is allowed); a whole bloom goes only when maintenance has removed every pair
//!   committed at or before the newest time in it (`removed_below_ms`, from the dedupe time
//!   items it walked in time order);
//! - pairs the filter never saw (more than [`MAX_BYTES`] of filters at once, or at open) leave
//!   it "uncovered up to" their newest commit time: until maintenance has passed that time,
//!   every key "may exist" and is looked up, as without the filter.
//!
//! Memory: each bloom is sized for 1% false positives (~1.2 bytes a key); a group's first holds
//! [`FIRST_KEYS`] keys, each next one twice as many up to [`MAX_KEYS`], so a lookup probes a
//! handful of blooms. All groups together hold at most [`MAX_BYTES`].

use std::collections::HashMap;
use std::sync::Mutex;

use crate::types::GroupId;

/// The blooms of all groups together hold at most this many bytes (~55 M keys): a group that
/// would pass it drops its blooms and is uncovered up to their newest time.
pub const MAX_BYTES: usize = 64 << 20;
/// Keys of a group's first bloom.
pub const FIRST_KEYS: usize = 64 << 10;
/// Keys of the largest bloom.
pub const MAX_KEYS: usize = 8 << 20;
/// False-positive rate of each bloom (a false positive costs the lookup the filter saves).
const FALSE_POSITIVES: f64 = 0.01;

struct Bloom {
    bits: fastbloom::BloomFilter,
    keys: usize,
    capacity: usize,
    /// The newest commit time of a key in it.
    max_ms: u64,
    bytes: usize,
}

impl Bloom {
    fn new(capacity: usize) -> Self {
        let bits = fastbloom::BloomFilter::with_false_pos(FALSE_POSITIVES).expected_items(capacity.max(1));
        let bytes = bits.num_bits().div_ceil(8);
        Bloom { bits, keys: 0, capacity, max_ms: 0, bytes }
    }
}

#[derive(Default)]
struct GroupFilter {
    /// Oldest first.
    blooms: Vec<Bloom>,
    /// Pairs committed at or before this time may exist without being in `blooms`.
    uncovered_to_ms: Option<u64>,
    /// Maintenance has removed every pair committed before this time.
    removed_below_ms: u64,
}

impl GroupFilter {
    fn covered(&self) -> bool {
        self.uncovered_to_ms.is_none_or(|t| t < self.removed_below_ms)
    }

    fn bytes(&self) -> usize {
        self.blooms.iter().map(|b| b.bytes).sum()
    }
}

struct Filters {
    groups: HashMap<(GroupId, u32), GroupFilter>,
    bytes: usize,
    max_bytes: usize,
    first_keys: usize,
}

/// The dedupe filters of one state store (all its groups).
pub(crate) struct DedupeFilters {
    seed: u64,
    inner: Mutex<Filters>,
}

impl DedupeFilters {
    pub(crate) fn new() -> Self {
        Self::with_limits(FIRST_KEYS, MAX_BYTES)
    }

    /// With smaller blooms and cap (tests: so that a few keys exercise chains, drops and the
    /// cap).
    pub(crate) fn with_limits(first_keys: usize, max_bytes: usize) -> Self {
        use std::hash::BuildHasher;
        let seed = std::collections::hash_map::RandomState::new().hash_one(1u64);
        DedupeFilters {
            seed,
            inner: Mutex::new(Filters { groups: HashMap::new(), bytes: 0, max_bytes, first_keys: first_keys.max(1) }),
        }
    }

    pub(crate) fn set_limits(&self, first_keys: usize, max_bytes: usize) {
        let mut f = self.lock();
        f.first_keys = first_keys.max(1);
        f.max_bytes = max_bytes;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Filters> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The hash a DEDUPE key is filed under (seeded per process: clients choose message ids).
    pub(crate) fn hash(&self, key: &[u8]) -> u64 {
        xxhash_rust::xxh3::xxh3_64_with_seed(key, self.seed)
    }

    /// Whether the group's filter exists (made by [`Self::reset`]).
    pub(crate) fn has(&self, group: GroupId, generation: u32) -> bool {
        self.lock().groups.contains_key(&(group, generation))
    }

    /// Starts the group's filter afresh, holding nothing and covering everything: for a
    /// generation whose DEDUPE items are all about to be [`Self::add`]ed (the open's scan, an
    /// install).
    pub(crate) fn reset(&self, group: GroupId, generation: u32) {
        let mut f = self.lock();
        if let Some(old) = f.groups.insert((group, generation), GroupFilter::default()) {
            f.bytes -= old.bytes();
        }
    }

    /// Forgets every generation of `group` but `keep` (after an install's switch).
    pub(crate) fn retain_only(&self, group: GroupId, keep: u32) {
        let mut f = self.lock();
        let mut freed = 0;
        f.groups.retain(|(g, generation), filter| {
            let drop = *g == group && *generation != keep;
            if drop {
                freed += filter.bytes();
            }
            !drop
        });
        f.bytes -= freed;
    }

    /// Files `(hash, committed at)` pairs under the group. Without a filter for the group
    /// nothing is filed (its lookups are never ruled out).
    pub(crate) fn add(&self, group: GroupId, generation: u32, pairs: impl IntoIterator<Item = (u64, u64)>) {
        let mut guard = self.lock();
        let f = &mut *guard;
        let Some(g) = f.groups.get_mut(&(group, generation)) else { return };
        for (hash, at_ms) in pairs {
            let full = g.blooms.last().is_none_or(|b| b.keys >= b.capacity);
            if full {
                let capacity =
                    g.blooms.last().map_or(f.first_keys, |b| (b.capacity * 2).min(MAX_KEYS.max(f.first_keys)));
                let bloom = Bloom::new(capacity);
                if f.bytes + bloom.bytes > f.max_bytes {
                    // Over the cap: this group's blooms go; what they held is uncovered.
                    let newest = g.blooms.iter().map(|b| b.max_ms).max().into_iter().chain(g.uncovered_to_ms);
                    g.uncovered_to_ms = newest.chain([at_ms]).max();
                    let freed = g.bytes();
                    f.bytes -= freed;
                    g.blooms.clear();
                    tracing::info!(
                        group,
                        generation,
                        freed_bytes = freed,
                        max_bytes = f.max_bytes,
                        "more message ids than the dedupe filter holds: this group's lookups go to the state index until maintenance passes them"
                    );
                    continue;
                }
                f.bytes += bloom.bytes;
                g.blooms.push(bloom);
            }
            if let Some(b) = g.blooms.last_mut() {
                b.bits.insert_hash(hash);
                b.keys += 1;
                b.max_ms = b.max_ms.max(at_ms);
            }
        }
    }

    /// For each hash: false when the group can hold no DEDUPE item under it (its lookup can
    /// be skipped), true when it may.
    pub(crate) fn may_exist(&self, group: GroupId, generation: u32, hashes: &[u64]) -> Vec<bool> {
        let f = self.lock();
        match f.groups.get(&(group, generation)) {
            Some(g) if g.covered() => {
                hashes.iter().map(|h| g.blooms.iter().any(|b| b.bits.contains_hash(*h))).collect()
            }
            _ => vec![true; hashes.len()],
        }
    }

    /// Maintenance has removed every pair of the group committed before `below_ms`: blooms
    /// whose newest key is older go.
    pub(crate) fn removed_below(&self, group: GroupId, generation: u32, below_ms: u64) {
        let mut guard = self.lock();
        let f = &mut *guard;
        let Some(g) = f.groups.get_mut(&(group, generation)) else { return };
        g.removed_below_ms = g.removed_below_ms.max(below_ms);
        let below = g.removed_below_ms;
        let mut freed = 0;
        g.blooms.retain(|b| {
            // The last bloom stays while it has room (it is where keys go next).
            let gone = b.max_ms < below && b.keys > 0;
            if gone {
                freed += b.bytes;
            }
            !gone
        });
        f.bytes -= freed;
    }

    /// Bytes of all blooms.
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> usize {
        self.lock().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::DedupeFilters;
    use proptest::prelude::*;
    use std::collections::HashMap;

    #[derive(Debug, Clone)]
    enum Op {
        /// Keys (0..64) committed at the current time.
        Add(Vec<u8>),
        /// Time moves on.
        Tick(u64),
        /// Maintenance removes every pair committed before now - window.
        Maintain(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => proptest::collection::vec(0u8..64, 1..20).prop_map(Op::Add),
            2 => (1u64..20).prop_map(Op::Tick),
            2 => (0u64..40).prop_map(Op::Maintain),
        ]
    }

    proptest! {
        /// The one rule: a key whose pair the model still holds is never ruled out, whatever
        /// the chain of blooms, the drops at maintenance and the cap did; and with room
        /// enough, a key never added is ruled out at least sometimes (the filter does work).
        #[test]
        fn a_key_whose_pair_exists_is_never_ruled_out(ops in proptest::collection::vec(op(), 1..80), cap in prop_oneof![Just(usize::MAX), 64usize..2048]) {
            let f = DedupeFilters::with_limits(4, cap);
            f.reset(1, 1);
            let mut now = 0u64;
            // key -> newest commit time (a key can be committed again after an erasure).
            let mut model: HashMap<u8, u64> = HashMap::new();
            for op in &ops {
                match op {
                    Op::Add(ks) => {
                        f.add(1, 1, ks.iter().map(|k| (f.hash(&[*k]), now)));
                        for k in ks {
                            model.insert(*k, now);
                        }
                    }
                    Op::Tick(d) => now += d,
                    Op::Maintain(window) => {
                        let cutoff = now.saturating_sub(*window);
                        model.retain(|_, at| *at >= cutoff);
                        f.removed_below(1, 1, cutoff);
                    }
                }
                let all: Vec<u8> = (0..64).collect();
                let hashes: Vec<u64> = all.iter().map(|k| f.hash(&[*k])).collect();
                let may = f.may_exist(1, 1, &hashes);
                for (k, m) in all.iter().zip(&may) {
                    if model.contains_key(k) {
                        prop_assert!(*m, "key {k} has a pair but was ruled out");
                    }
                }
                prop_assert!(f.bytes() <= cap);
            }
        }
    }

    #[test]
    fn keys_never_added_are_ruled_out_and_blooms_go_once_maintenance_passes_them() {
        let f = DedupeFilters::with_limits(2, usize::MAX);
        assert_eq!(f.may_exist(1, 1, &[f.hash(b"x")]), vec![true], "no filter: everything may exist");
        f.reset(1, 1);
        f.add(1, 1, [(f.hash(b"a"), 10), (f.hash(b"b"), 10), (f.hash(b"c"), 20)]);
        let ruled_out = (0..100u32).filter(|i| !f.may_exist(1, 1, &[f.hash(&i.to_be_bytes())])[0]).count();
        assert!(ruled_out > 90, "only {ruled_out} of 100 new keys ruled out");
        assert_eq!(f.may_exist(1, 1, &[f.hash(b"a"), f.hash(b"c")]), vec![true, true]);
        let before = f.bytes();
        // The first bloom (a, b at 10) goes once everything before 11 is removed, not before.
        f.removed_below(1, 1, 10);
        assert_eq!(f.bytes(), before);
        f.removed_below(1, 1, 11);
        assert!(f.bytes() < before);
        assert_eq!(f.may_exist(1, 1, &[f.hash(b"c")]), vec![true]);
        // Another generation, and forgetting it.
        f.reset(1, 2);
        f.add(1, 2, [(f.hash(b"a"), 5)]);
        f.retain_only(1, 2);
        assert!(!f.has(1, 1));
        assert_eq!(f.may_exist(1, 2, &[f.hash(b"a")]), vec![true]);
    }

    #[test]
    fn past_the_cap_a_group_is_uncovered_until_maintenance_passes_what_it_dropped() {
        let f = DedupeFilters::with_limits(1000, 2000);
        f.reset(1, 1);
        f.add(1, 1, (0..1000u32).map(|i| (f.hash(&i.to_be_bytes()), 50)));
        let one = f.bytes();
        // The next bloom (2,000 keys) does not fit: dropped, uncovered up to 60.
        f.add(1, 1, [(f.hash(b"late"), 60)]);
        assert_eq!(f.bytes(), 0);
        assert!(one > 0);
        assert_eq!(f.may_exist(1, 1, &[f.hash(b"never")]), vec![true], "uncovered: everything may exist");
        f.add(1, 1, [(f.hash(b"later"), 70)]);
        f.removed_below(1, 1, 60);
        assert_eq!(f.may_exist(1, 1, &[f.hash(b"never")]), vec![true], "60 itself is not passed yet");
        f.removed_below(1, 1, 61);
        assert_eq!(f.may_exist(1, 1, &[f.hash(b"later")]), vec![true]);
        let ruled_out = (0..100u32).filter(|i| !f.may_exist(1, 1, &[f.hash(&i.to_be_bytes())])[0]).count();
        assert!(ruled_out > 90, "covered again: only {ruled_out} of 100 new keys ruled out");
    }
}
