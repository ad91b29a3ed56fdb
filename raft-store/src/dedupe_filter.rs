//! Which dedupe pairs may exist: per group and generation, bloom filters over the seeded xxh3
//! hashes of every DEDUPE key the applies, a snapshot install or the open put into the state
//! machine. An append's dedupe lookup of a key the filter rules out is skipped: with 1,000
//! busy conversations nearly every envelope's message id is new, and its lookup searched every
//! memtable and table filter of the state index (a fifth of a node's CPU; skipping it gave
//! +28% closed-loop throughput, docs/BENCHMARKS.md, "2026-12-05, tenth session").
//!
//! The one rule: **a key ruled out has no DEDUPE item** in the group's state (overlay or
//! index), so skipping its lookup answers exactly what the lookup would: replicas whose
//! filters differ (different seeds, caps reached at different times, one restarted) still
//! apply alike. Hence:
//! - a key is filed before the batch holding its pair is written (the group's applies are
//!   one at a time, and only they consult the filter);
//! - blooms are never cleared of single keys (an erasure's deletes leave them: a superset is
//!   allowed); a whole bloom goes only when every pair committed at or before its newest time
//!   is known to be removed: `removed_below_ms` is the time before which housekeeping removed
//!   every pair (it walks the dedupe time items in time order), lowered again when a pair is
//!   filed with an earlier time (a leader whose clock is behind the last one's);
//! - pairs the filter does not hold leave the group "uncovered up to" their newest commit
//!   time: until housekeeping has removed everything before a later time, every key "may
//!   exist" and is looked up, as without the filter. A group whose next bloom would pass the
//!   cap ([`MAX_BYTES`], all groups together) drops its blooms (what they held becomes
//!   uncovered) and starts a new chain, covered again once housekeeping passes the dropped
//!   pairs (a window later); a key that finds no room even then (other groups hold the cap)
//!   is not filed and moves the uncovered time itself.
//!
//! Memory: each bloom is sized for 1% false positives (~1.2 bytes a key) and allocated whole;
//! a group's first holds [`FIRST_KEYS`] keys, each next one twice as many up to [`MAX_KEYS`]
//! (~10 MB), so a lookup probes a handful of blooms, and blooms go whole, a window after their
//! newest key. [`MAX_BYTES`] then holds about 45 M live keys: some 500 new message ids a second
//! for the default 24-hour dedupe window, or about 25 minutes of 30,000 a second.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::types::GroupId;

/// The blooms of all groups together hold at most this many bytes: a group whose next bloom
/// would pass it drops its blooms (uncovered up to their newest time) and starts again.
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
        let bytes = Self::bytes_for(capacity);
        let bits = fastbloom::BloomFilter::with_num_bits(bytes * 8).expected_items(capacity.max(1));
        Bloom { bits, keys: 0, capacity, max_ms: 0, bytes }
    }

    /// The bytes of a bloom of `capacity` keys (known before it is allocated: the cap is
    /// checked first).
    fn bytes_for(capacity: usize) -> usize {
        // m = -n ln p / (ln 2)^2 bits for a false-positive rate p, in whole 64-byte lines.
        let n = capacity.max(1) as f64;
        let bits = (-n * FALSE_POSITIVES.ln() / (std::f64::consts::LN_2 * std::f64::consts::LN_2)).ceil() as usize;
        bits.div_ceil(512).max(1) * 64
    }
}

#[derive(Default)]
struct GroupFilter {
    /// Oldest first.
    blooms: Vec<Bloom>,
    /// Pairs committed at or before this time may exist without being in `blooms`.
    uncovered_to_ms: Option<u64>,
    /// Every pair of the group committed before this time is removed.
    removed_below_ms: u64,
}

impl GroupFilter {
    fn covered(&self) -> bool {
        self.uncovered_to_ms.is_none_or(|t| t < self.removed_below_ms)
    }

    fn bytes(&self) -> usize {
        self.blooms.iter().map(|b| b.bytes).sum()
    }

    /// Everything the blooms hold becomes uncovered, and the blooms go: returns their bytes.
    fn drop_blooms(&mut self) -> usize {
        let newest = self.blooms.iter().map(|b| b.max_ms).chain(self.uncovered_to_ms).max();
        self.uncovered_to_ms = newest;
        let freed = self.bytes();
        self.blooms.clear();
        freed
    }
}

struct Filters {
    groups: HashMap<(GroupId, u32), GroupFilter>,
    bytes: usize,
    max_bytes: usize,
    first_keys: usize,
}

impl Filters {
    /// After `bytes` changed: the gauge operators watch for the cap.
    fn report(&self) {
        metrics::gauge!("habar_dedupe_filter_bytes").set(self.bytes as f64);
    }
}

/// Removes every generation of `group` but `keep` from a map of per-generation filters (the
/// dedupe filters and the conversation filter's sets, at an install's switch); returns what
/// `size` says the removed ones held.
pub(crate) fn forget_other_generations<V>(
    map: &mut HashMap<(GroupId, u32), V>,
    group: GroupId,
    keep: u32,
    size: impl Fn(&V) -> usize,
) -> usize {
    let mut freed = 0;
    map.retain(|(g, generation), v| {
        let gone = *g == group && *generation != keep;
        if gone {
            freed += size(v);
        }
        !gone
    });
    freed
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

    /// Forgets every filter (tests: before they are filled again with other limits).
    pub(crate) fn clear(&self) {
        let mut f = self.lock();
        f.groups.clear();
        f.bytes = 0;
        f.report();
    }

    /// How many generations of `group` have a filter.
    pub(crate) fn generations(&self, group: GroupId) -> usize {
        self.lock().groups.keys().filter(|(g, _)| *g == group).count()
    }

    /// Starts the group's filter afresh, holding nothing and covering everything: for a
    /// generation whose DEDUPE items are all about to be [`Self::add`]ed (the open's scan, an
    /// install).
    pub(crate) fn reset(&self, group: GroupId, generation: u32) {
        let mut f = self.lock();
        if let Some(old) = f.groups.insert((group, generation), GroupFilter::default()) {
            f.bytes -= old.bytes();
            f.report();
        }
    }

    /// Forgets every generation of `group` but `keep` (after an install's switch).
    pub(crate) fn retain_only(&self, group: GroupId, keep: u32) {
        let mut f = self.lock();
        let freed = forget_other_generations(&mut f.groups, group, keep, GroupFilter::bytes);
        f.bytes -= freed;
        f.report();
    }

    /// Files `(hash, committed at)` pairs under the group. Without a filter for the group
    /// nothing is filed (its lookups are never ruled out).
    pub(crate) fn add(&self, group: GroupId, generation: u32, pairs: impl IntoIterator<Item = (u64, u64)>) {
        let mut guard = self.lock();
        let f = &mut *guard;
        let Some(g) = f.groups.get_mut(&(group, generation)) else { return };
        let mut changed = false;
        for (hash, at_ms) in pairs {
            // A pair older than what housekeeping is known to have removed (a clock behind
            // the last leader's): the claim holds only below it now.
            g.removed_below_ms = g.removed_below_ms.min(at_ms);
            if g.blooms.last().is_none_or(|b| b.keys >= b.capacity) {
                let mut capacity =
                    g.blooms.last().map_or(f.first_keys, |b| (b.capacity * 2).min(MAX_KEYS.max(f.first_keys)));
                if f.bytes + Bloom::bytes_for(capacity) > f.max_bytes && !g.blooms.is_empty() {
                    // Over the cap: this group's blooms go (what they held is uncovered until
                    // housekeeping passes it) and its chain starts again.
                    let freed = g.drop_blooms();
                    f.bytes -= freed;
                    capacity = f.first_keys;
                    changed = true;
                    metrics::counter!("habar_dedupe_filter_drops_total").increment(1);
                    tracing::info!(
                        group,
                        generation,
                        freed_bytes = freed,
                        max_bytes = f.max_bytes,
                        "more message ids than the dedupe filters hold: this group's blooms were dropped, its dedupe lookups go to the state index until housekeeping has removed the pairs they held"
                    );
                }
                let bytes = Bloom::bytes_for(capacity);
                if f.bytes + bytes > f.max_bytes {
                    // No room even so (other groups hold the cap): not filed, so uncovered.
                    g.uncovered_to_ms = g.uncovered_to_ms.max(Some(at_ms));
                    continue;
                }
                f.bytes += bytes;
                g.blooms.push(Bloom::new(capacity));
                changed = true;
            }
            if let Some(b) = g.blooms.last_mut() {
                b.bits.insert_hash(hash);
                b.keys += 1;
                b.max_ms = b.max_ms.max(at_ms);
            }
        }
        if changed {
            f.report();
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

    /// Housekeeping has removed every pair of the group committed before `below_ms` (the
    /// claim is true now; it stays true until a pair is filed with an earlier time, which
    /// lowers it): blooms whose newest key is older go.
    pub(crate) fn removed_below(&self, group: GroupId, generation: u32, below_ms: u64) {
        let mut guard = self.lock();
        let f = &mut *guard;
        let Some(g) = f.groups.get_mut(&(group, generation)) else { return };
        g.removed_below_ms = g.removed_below_ms.max(below_ms);
        let below = g.removed_below_ms;
        let mut freed = 0;
        g.blooms.retain(|b| {
            let gone = b.max_ms < below;
            if gone {
                freed += b.bytes;
            }
            !gone
        });
        if freed > 0 {
            f.bytes -= freed;
            f.report();
        }
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
        /// Keys (0..64) committed at the current time, as one entry.
        Add(Vec<u8>),
        /// Time moves on.
        Tick(u64),
        /// Time goes back (a new leader whose clock is behind).
        Back(u64),
        /// Housekeeping at the current time: (window, budget of dedupe time items).
        Maintain(u64, usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => proptest::collection::vec(0u8..64, 1..20).prop_map(Op::Add),
            2 => (1u64..20).prop_map(Op::Tick),
            1 => (1u64..30).prop_map(Op::Back),
            2 => (0u64..40, prop_oneof![Just(usize::MAX), 0usize..4]).prop_map(|(w, b)| Op::Maintain(w, b)),
        ]
    }

    /// The store as housekeeping sees it: each key's pair (its newest commit time) and the
    /// dedupe time items (entry time, keys), walked in time order.
    #[derive(Default)]
    struct Model {
        pairs: HashMap<u8, u64>,
        times: Vec<(u64, usize, Vec<u8>)>,
    }

    impl Model {
        /// What `apply_maintain` does: walks the items before the cutoff in (time, entry)
        /// order, at most `budget`, removing each key whose pair is older than the cutoff;
        /// returns the time before which every pair is gone.
        fn maintain(&mut self, now: u64, window: u64, budget: usize) -> u64 {
            let cutoff = now.saturating_sub(window);
            self.times.sort();
            let mut removed_below = cutoff;
            let mut done = 0;
            while let Some((at, _, _)) = self.times.first() {
                if *at >= cutoff {
                    break;
                }
                if done == budget {
                    removed_below = *at;
                    break;
                }
                let (_, _, keys) = self.times.remove(0);
                for k in keys {
                    if self.pairs.get(&k).is_some_and(|t| *t < cutoff) {
                        self.pairs.remove(&k);
                    }
                }
                done += 1;
            }
            removed_below
        }
    }

    proptest! {
        /// The one rule: a key whose pair the store still holds is never ruled out, whatever
        /// the chain of blooms, the drops at housekeeping (cut short by its budget or not),
        /// the cap and clocks going back did.
        #[test]
        fn a_key_whose_pair_exists_is_never_ruled_out(
            ops in proptest::collection::vec(op(), 1..80),
            cap in prop_oneof![Just(usize::MAX), 64usize..1024],
        ) {
            let f = DedupeFilters::with_limits(4, cap);
            f.reset(1, 1);
            let mut now = 100u64;
            let mut model = Model::default();
            for (n, op) in ops.iter().enumerate() {
                match op {
                    Op::Add(ks) => {
                        // Pairs of keys not in the store (a retry of one there is a duplicate).
                        let new: Vec<u8> = ks.iter().copied().filter(|k| !model.pairs.contains_key(k)).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
                        f.add(1, 1, new.iter().map(|k| (f.hash(&[*k]), now)));
                        for k in &new {
                            model.pairs.insert(*k, now);
                        }
                        model.times.push((now, n, new));
                    }
                    Op::Tick(d) => now += d,
                    Op::Back(d) => now = now.saturating_sub(*d),
                    Op::Maintain(window, budget) => {
                        let below = model.maintain(now, *window, *budget);
                        f.removed_below(1, 1, below);
                    }
                }
                let hashes: Vec<u64> = (0..64u8).map(|k| f.hash(&[k])).collect();
                let may = f.may_exist(1, 1, &hashes);
                for k in 0..64u8 {
                    if model.pairs.contains_key(&k) {
                        prop_assert!(may[k as usize], "key {k} has a pair but was ruled out");
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
        // A pair filed with an earlier time (a clock behind) lowers the claim: a later
        // housekeeping with an earlier cutoff does not drop its bloom on the old claim.
        let g = DedupeFilters::with_limits(1, usize::MAX);
        g.reset(1, 1);
        g.add(1, 1, [(g.hash(b"x"), 100)]);
        g.removed_below(1, 1, 50);
        g.add(1, 1, [(g.hash(b"d"), 30)]);
        g.removed_below(1, 1, 20);
        assert_eq!(g.may_exist(1, 1, &[g.hash(b"d")]), vec![true], "d's pair (at 30) exists");
        // Another generation, and forgetting it.
        f.reset(1, 2);
        f.add(1, 2, [(f.hash(b"a"), 5)]);
        f.retain_only(1, 2);
        assert!(!f.has(1, 1));
        assert_eq!(f.may_exist(1, 2, &[f.hash(b"a")]), vec![true]);
    }

    #[test]
    fn past_the_cap_a_group_starts_again_and_is_covered_once_housekeeping_passes_what_it_dropped() {
        let one = super::Bloom::bytes_for(1000);
        let f = DedupeFilters::with_limits(1000, one + one / 2);
        f.reset(1, 1);
        f.add(1, 1, (0..1000u32).map(|i| (f.hash(&i.to_be_bytes()), 50)));
        assert_eq!(f.bytes(), one);
        // The next bloom (2,000 keys) does not fit: the first goes (uncovered up to 50) and a
        // new chain takes the key.
        f.add(1, 1, [(f.hash(b"late"), 60)]);
        assert_eq!(f.bytes(), one);
        assert_eq!(f.may_exist(1, 1, &[f.hash(b"never")]), vec![true], "uncovered: everything may exist");
        f.add(1, 1, [(f.hash(b"later"), 70)]);
        f.removed_below(1, 1, 50);
        assert_eq!(f.may_exist(1, 1, &[f.hash(b"never")]), vec![true], "50 itself is not passed yet");
        f.removed_below(1, 1, 51);
        assert_eq!(f.may_exist(1, 1, &[f.hash(b"late"), f.hash(b"later")]), vec![true, true]);
        let ruled_out = (0..100u32).filter(|i| !f.may_exist(1, 1, &[f.hash(&i.to_be_bytes())])[0]).count();
        assert!(ruled_out > 90, "covered again: only {ruled_out} of 100 new keys ruled out");
        // Another group finds no room at all: its keys are not filed, and it is uncovered.
        f.reset(2, 1);
        f.add(2, 1, [(f.hash(b"g2"), 80)]);
        assert_eq!(f.bytes(), one);
        assert_eq!(f.may_exist(2, 1, &[f.hash(b"never")]), vec![true]);
        f.removed_below(2, 1, 80);
        assert_eq!(f.may_exist(2, 1, &[f.hash(b"g2")]), vec![true], "its unfiled pair (at 80) may exist");
    }
}
