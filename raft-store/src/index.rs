//! The state index: the state machine's per-conversation and per-envelope items, in an LSM
//! tree (fjall) beside sled, so that the per-envelope lookups and inserts leave sled
//! (ARCHITECTURE.md, "The state machine on disk"). It holds the kinds [`INDEX_KINDS`] names:
//! - DEDUPE: every `(conversation, message id) -> (seq, committed at)` pair of the dedupe
//!   window;
//! - CONV: each conversation's last seq and limits (one per conversation);
//! - RUN: where each run of a conversation's envelopes lies in an envelope segment.
//!
//! Why not sled: every publish looks up a conversation and a message id (with a million
//! conversations, both almost never in memory), and writes a conversation record, a run and
//! a dedupe pair. In sled a lookup waits behind every checkpoint's batch (sled's batches
//! take a process-wide lock that all reads share), and each item costs a leaf rewrite (a
//! copy of the leaf) at the checkpoint. An LSM tree answers a miss from its memtable and
//! bloom filters without waiting for writers, and takes an insert into a memtable.
//!
//! Crash consistency: the index never holds what sled's durable state does not. A
//! checkpoint writes its index writes into sled's batch as one INDEX_LOG item per group
//! (`encode_log`), flushes sled, and only then applies them here (not fsynced); the log
//! items are deleted by a later checkpoint after [`StateIndex::persist`]. At open, every
//! log item still in sled is applied again (applying one twice is harmless: puts and
//! deletes of whole values). So after any crash the index equals the state at sled's
//! applied id, and replaying the Raft log from there gives the same state.
//!
//! Keys and values are the state machine's keys and values (`keys.rs`), unchanged, in
//! `<sm>/index.v2`, keyspace `state.v2`. fjall keeps a keyspace's options from its
//! creation, so a change to them needs a new keyspace: the open moves the items of an
//! earlier layout ([`LEGACY`]) here ([`StateIndex::copy_from`]) and deletes it. The first
//! (2026-12-04, DEDUPE items only) was `<sm>/dedupe`, keyspace `dedupe.v1`; the second
//! (2026-12-04 to 12-05) `<sm>/index`, keyspace `state.v1`, with fjall's default leveled
//! compaction (L0 threshold 4, 64 MiB tables).

use std::ops::Bound;
use std::ops::RangeBounds;
use std::path::Path;

use sled::IVec;

use crate::keys;
use crate::keys::DecodeError;
use crate::overlay::KvResult;
use crate::StoreError;

/// The memtable's size before fjall writes it out as a table: big enough that the four
/// sealed memtables at which fjall halts writes (64 MiB, over 10 s of writes at full load)
/// take longer to fill than a compaction takes, since one worker flushes and compacts.
const MEMTABLE_BYTES: u64 = 16 << 20;
/// fjall's block cache (data, index and filter blocks).
const CACHE_BYTES: u64 = 8 << 20;
/// fjall's flush and compaction threads: one. With more, fjall 3.1.13's worker 0 sends
/// every compaction request it receives back to the queue (to stay free for flushes) and,
/// while the other worker compacts, receives it again at once: a busy loop for as long as
/// the compaction runs (`perf`: 19% of a node's CPU in fjall's `worker_tick` and flume's
/// `send`). One worker and 16 MiB memtables against two and 8 MiB: +27% closed-loop
/// throughput with a million conversations, +11% with a thousand, no stall over 620 ms in
/// 60 s (docs/BENCHMARKS.md, "2026-12-04, seventh session"). (With 8 MiB memtables and one worker the
/// sixth session saw 1.1-2.8 s write halts, when the index held dedupe pairs only.)
const WORKER_THREADS: usize = 1;

/// Memtables flushed (L0 tables) before fjall merges them into L1: 16, not fjall's 4. Every
/// L0 table overlaps the whole of L1 (dedupe keys are spread over the key range), so each
/// L0 -> L1 merge rewrites all of L1; at the default 4 that was every ~8 s at full load, on
/// every node at once, and each merge halved the closed loop's rate for about a second
/// (docs/BENCHMARKS.md, "2026-12-05, eleventh session"). fjall slows writes at 20 L0
/// tables and halts them at 30: 16 leaves room for the flushes during one merge.
const L0_THRESHOLD: u8 = 16;
/// The size of a compacted table: 16 MiB, not fjall's 64. L1's size is this times
/// [`L0_THRESHOLD`] (256 MiB): with 64 MiB tables it would be 1 GiB, and every merge into a
/// full L1 that much bigger.
const TABLE_TARGET_BYTES: u64 = 16 << 20;

/// The index's directory in the state machine's, and its keyspace.
pub const DIR: &str = "index.v2";
const KEYSPACE: &str = "state.v2";

/// An earlier layout of the index: its directory in the state machine's and its keyspace.
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    pub dir: &'static str,
    keyspace: &'static str,
}

/// Earlier layouts, oldest first: the open moves each one found into the current one.
/// Oldest first, because a crash inside the move from the first to the second left both,
/// the second holding the newer values.
pub const LEGACY: [Layout; 2] =
    [Layout { dir: "dedupe", keyspace: "dedupe.v1" }, Layout { dir: "index", keyspace: "state.v1" }];
/// Items per fjall batch when the open moves an earlier layout's items or a generation's
/// items are deleted.
const MOVE_CHUNK: usize = 4096;

/// Format of an index log item's body.
const LOG_FORMAT_V1: u8 = 1;
/// At most this many writes in one index log item (a checkpoint of one group holds far
/// fewer: the overlay is bounded in bytes).
pub const MAX_LOG_WRITES: usize = 1 << 24;

/// One write: a put (`Some(value)`) or a delete.
pub type Write = (Vec<u8>, Option<Vec<u8>>);
/// One write, borrowed.
pub type WriteRef<'a> = (&'a [u8], Option<&'a [u8]>);

pub struct StateIndex {
    db: fjall::Database,
    ks: fjall::Keyspace,
    /// Views open now ([`StateIndex::views_open`]).
    views: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

fn fj(e: fjall::Error) -> StoreError {
    StoreError::Index(e.to_string())
}

/// One pair of a fjall range, as sled's range reads yield it.
fn guard_pair(g: fjall::Guard) -> KvResult {
    let (k, v) = g.into_inner().map_err(fj_as_sled)?;
    Ok((IVec::from(&*k), IVec::from(&*v)))
}

/// fjall's error where sled's is expected (merged range reads yield sled's results).
fn fj_as_sled(e: fjall::Error) -> sled::Error {
    sled::Error::Io(std::io::Error::other(format!("state index: {e}")))
}

impl StateIndex {
    /// Opens (or creates) the index in `dir`. fjall panics on some damage to its own
    /// metadata: one that unwinds comes back as an error naming the directory; one while
    /// fjall holds its keyspace lock still aborts the process (fjall's drop then panics on
    /// the poisoned lock). Either way the node does not start on a damaged index.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_named(dir, KEYSPACE, true)
    }

    /// Opens (or creates) an index of an earlier layout: to move its items, and for upgrade
    /// tests (one it creates has fjall's default compaction, as those layouts had).
    #[doc(hidden)]
    pub fn open_legacy(dir: &Path, layout: Layout) -> Result<Self, StoreError> {
        Self::open_named(dir, layout.keyspace, false)
    }

    fn open_named(dir: &Path, keyspace: &str, current: bool) -> Result<Self, StoreError> {
        match std::panic::catch_unwind(|| Self::open_inner(dir, keyspace, current)) {
            Ok(r) => r,
            Err(_) => Err(StoreError::Corrupt {
                what: dir.display().to_string(),
                offset: 0,
                reason: "the state index could not be opened (fjall panicked reading its files)".into(),
            }),
        }
    }

    fn open_inner(dir: &Path, keyspace: &str, current: bool) -> Result<Self, StoreError> {
        let db = fjall::Database::builder(dir)
            .manual_journal_persist(true)
            .cache_size(CACHE_BYTES)
            .worker_threads(WORKER_THREADS)
            .open()
            .map_err(fj)?;
        // The options below are stored with the keyspace when it is created and used on every
        // later open: a change to them needs a new keyspace name (and a move of the pairs).
        let ks = db
            .keyspace(keyspace, || {
                let options = fjall::KeyspaceCreateOptions::default()
                    .manual_journal_persist(true)
                    .max_memtable_size(MEMTABLE_BYTES)
                    // Lookups often miss (a new message id, a new conversation): keep the
                    // bloom filters.
                    .expect_point_read_hits(false)
                    // In small partitions at every level: a lookup reads (and checksums) one
                    // partition, not a table's whole filter. Unpartitioned, a compacted
                    // table's filter (~1.2 MiB per million ids) fell out of the cache and was
                    // read whole for every publish: closed-loop throughput fell from ~25,000
                    // to ~7,000 env/s after 30 s (docs/BENCHMARKS.md, "2026-12-04, sixth session").
                    .filter_block_partitioning_policy(fjall::config::PartitioningPolicy::all(true))
                    .index_block_partitioning_policy(fjall::config::PartitioningPolicy::all(true));
                if current {
                    options.compaction_strategy(std::sync::Arc::new(
                        fjall::compaction::Leveled::default()
                            .with_l0_threshold(L0_THRESHOLD)
                            .with_table_target_size(TABLE_TARGET_BYTES),
                    ))
                } else {
                    options
                }
            })
            .map_err(fj)?;
        Ok(StateIndex { db, ks, views: Default::default() })
    }

    /// The value stored under `key`, if any.
    pub fn get(&self, key: &[u8]) -> sled::Result<Option<IVec>> {
        Ok(self.ks.get(key).map_err(fj_as_sled)?.map(|v| IVec::from(&*v)))
    }

    /// Every pair in `range`, in key order or reverse. Not a snapshot: writes that land
    /// during the scan may show (the state machine's merged reads allow for it:
    /// `Inner::after_checkpoint`).
    pub fn range<R: RangeBounds<Vec<u8>>>(&self, range: R, forward: bool) -> Box<dyn Iterator<Item = KvResult> + Send> {
        let iter = self.ks.range::<Vec<u8>, _>((range.start_bound().cloned(), range.end_bound().cloned()));
        if forward {
            Box::new(iter.map(guard_pair))
        } else {
            Box::new(iter.rev().map(guard_pair))
        }
    }

    /// A read-only view of the index as it is now, unchanged by later writes: what a
    /// snapshot build reads after the group's state machine is released. Costly to keep:
    /// until it is dropped fjall keeps every memtable it flushes meanwhile in memory (its
    /// version history, from the view's sequence number on), so drop it as soon as it is read.
    pub fn view(&self) -> IndexView {
        self.views.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        IndexView { snap: self.db.snapshot(), ks: self.ks.clone(), views: self.views.clone() }
    }

    /// How many views ([`StateIndex::view`]) are open now.
    pub fn views_open(&self) -> usize {
        self.views.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Applies `writes` atomically (in memory and fjall's journal buffer: not durable until
    /// [`StateIndex::persist`]).
    pub fn apply<'a>(&self, writes: impl IntoIterator<Item = (&'a [u8], Option<&'a [u8]>)>) -> Result<(), StoreError> {
        let mut batch = self.db.batch();
        for (k, v) in writes {
            match v {
                Some(v) => batch.insert(&self.ks, k, v),
                None => batch.remove(&self.ks, k),
            }
        }
        if batch.is_empty() {
            return Ok(());
        }
        batch.commit().map_err(fj)
    }

    /// Makes everything applied so far durable (fdatasync of fjall's journal).
    pub fn persist(&self) -> Result<(), StoreError> {
        self.db.persist(fjall::PersistMode::SyncAll).map_err(fj)
    }

    /// Copies every item of `from` into this index (in chunks) and persists it; returns how
    /// many. Copying twice is harmless (puts of the same values).
    pub fn copy_from(&self, from: &StateIndex) -> Result<usize, StoreError> {
        let n = from.in_chunks((Bound::Unbounded, Bound::Unbounded), |chunk| {
            self.apply(chunk.iter().map(|(k, v)| (k.as_ref(), Some(v.as_ref()))))
        })?;
        self.persist()?;
        Ok(n)
    }

    /// Deletes every pair in `range` (of a generation no longer active), in chunks; returns
    /// how many.
    pub fn delete_range(&self, range: std::ops::Range<Vec<u8>>) -> Result<usize, StoreError> {
        self.in_chunks((Bound::Included(range.start), Bound::Excluded(range.end)), |chunk| {
            self.apply(chunk.iter().map(|(k, _)| (k.as_ref(), None)))
        })
    }

    /// Hands every pair in `range` to `each`, [`MOVE_CHUNK`] at a time in key order; returns
    /// how many. Each chunk starts after the last key of the one before: a scan from the
    /// range's start would step again over what `each` deleted (fjall's tombstones), which
    /// is quadratic in the range's size.
    fn in_chunks(
        &self,
        (start, end): (Bound<Vec<u8>>, Bound<Vec<u8>>),
        mut each: impl FnMut(&[(IVec, IVec)]) -> Result<(), StoreError>,
    ) -> Result<usize, StoreError> {
        let mut n = 0;
        let mut from = start;
        loop {
            let chunk: Vec<(IVec, IVec)> =
                self.range((from, end.clone()), true).take(MOVE_CHUNK).collect::<Result<_, _>>()?;
            let Some((last, _)) = chunk.last() else { return Ok(n) };
            from = Bound::Excluded(last.to_vec());
            n += chunk.len();
            each(&chunk)?;
        }
    }
}

/// The index at one moment ([`StateIndex::view`]).
pub struct IndexView {
    snap: fjall::Snapshot,
    ks: fjall::Keyspace,
    views: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Drop for IndexView {
    fn drop(&mut self) {
        self.views.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

impl IndexView {
    /// The value `key` had when the view was taken.
    pub fn get(&self, key: &[u8]) -> sled::Result<Option<IVec>> {
        use fjall::Readable;
        Ok(self.snap.get(&self.ks, key).map_err(fj_as_sled)?.map(|v| IVec::from(&*v)))
    }

    /// Every pair in `range` when the view was taken, in key order.
    pub fn range<R: RangeBounds<Vec<u8>>>(&self, range: R) -> impl Iterator<Item = KvResult> + Send + '_ {
        use fjall::Readable;
        let range = (range.start_bound().cloned(), range.end_bound().cloned());
        self.snap.range::<Vec<u8>, _>(&self.ks, range).map(guard_pair)
    }
}

/// The kinds of items the index holds (all others are sled's).
/// Not DEDUPE_TIME (one per entry, not per envelope): the dedupe window's trim reads it as
/// a queue from its oldest end, which in an LSM tree would step over the tombstones of every
/// entry trimmed since the last compaction.
pub const INDEX_KINDS: [u8; 3] = [keys::KIND_CONV, keys::KIND_DEDUPE, keys::KIND_RUN];

fn is_index_kind(kind: u8) -> bool {
    INDEX_KINDS.contains(&kind)
}

/// Whether `k` is a key of one of [`INDEX_KINDS`] (kept in the index, not in sled).
pub fn in_index(k: &[u8]) -> bool {
    k.get(keys::GEN_PREFIX_LEN).is_some_and(|kind| is_index_kind(*kind))
}

/// How much of a key range the index holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Share {
    /// None: sled alone holds the range.
    None,
    /// All (one kind prefix, a kind of [`INDEX_KINDS`]): the index alone holds it.
    All,
    /// Maybe some: the range spans several kinds or generations.
    Some,
}

/// Which store holds a key range: the bounds' first `GEN_PREFIX_LEN + 1` bytes (format,
/// group, generation, kind) say, unless the range spans several generations or kinds.
pub fn index_share<R: RangeBounds<Vec<u8>>>(range: &R) -> Share {
    const K: usize = keys::GEN_PREFIX_LEN + 1;
    let head = |b: Bound<&Vec<u8>>| match b {
        Bound::Included(k) | Bound::Excluded(k) if k.len() >= K => Some(k[..K].to_vec()),
        _ => None,
    };
    let kind = match (head(range.start_bound()), head(range.end_bound()), range.end_bound()) {
        (Some(a), Some(b), _) if a == b => a[K - 1],
        // A whole kind: the end bound is exactly the next kind's prefix.
        (Some(a), _, Bound::Excluded(e))
            if e.len() == K && e[..K - 1] == a[..K - 1] && a[K - 1].checked_add(1) == Some(e[K - 1]) =>
        {
            a[K - 1]
        }
        _ => return Share::Some,
    };
    if is_index_kind(kind) {
        Share::All
    } else {
        Share::None
    }
}

/// An index log item's value: the writes of one group's checkpoint, framed with a format
/// byte and the value CRC of every sled value.
pub fn encode_log(writes: &[WriteRef<'_>]) -> Result<Vec<u8>, StoreError> {
    if writes.len() > MAX_LOG_WRITES {
        return Err(StoreError::Encode(format!(
            "{} index writes in one checkpoint of a group, over the {MAX_LOG_WRITES} a log item holds",
            writes.len()
        )));
    }
    let mut body =
        Vec::with_capacity(5 + writes.iter().map(|(k, v)| 7 + k.len() + v.map_or(0, <[u8]>::len)).sum::<usize>());
    body.push(LOG_FORMAT_V1);
    body.extend_from_slice(&(writes.len() as u32).to_le_bytes());
    for (k, v) in writes {
        let klen = u16::try_from(k.len()).map_err(|_| StoreError::Encode(format!("index key of {} bytes", k.len())))?;
        body.extend_from_slice(&klen.to_le_bytes());
        body.extend_from_slice(k);
        match v {
            Some(v) => {
                let vlen = u32::try_from(v.len())
                    .map_err(|_| StoreError::Encode(format!("index value of {} bytes", v.len())))?;
                body.push(1);
                body.extend_from_slice(&vlen.to_le_bytes());
                body.extend_from_slice(v);
            }
            None => body.push(0),
        }
    }
    Ok(keys::encode_value(&body))
}

/// The writes of an index log item's value (checked: CRC, format, every length, and that
/// each key is a key of the index's kinds).
pub fn decode_log(value: &[u8]) -> Result<Vec<Write>, DecodeError> {
    let body = keys::decode_value(value)?;
    let (&format, mut rest) = body.split_first().ok_or_else(|| DecodeError("empty index log".into()))?;
    if format != LOG_FORMAT_V1 {
        return Err(DecodeError(format!("unknown index log format {format}")));
    }
    let mut take = |n: usize, what: &str| -> Result<&[u8], DecodeError> {
        if rest.len() < n {
            return Err(DecodeError(format!("index log ends inside {what}")));
        }
        let (a, b) = rest.split_at(n);
        rest = b;
        Ok(a)
    };
    let count = u32::from_le_bytes(take(4, "the count")?.try_into().map_err(|_| DecodeError("count".into()))?) as usize;
    if count > MAX_LOG_WRITES {
        return Err(DecodeError(format!("index log of {count} writes, over {MAX_LOG_WRITES}")));
    }
    let mut out = Vec::with_capacity(count.min(1 << 16));
    for _ in 0..count {
        let klen = u16::from_le_bytes(take(2, "a key length")?.try_into().map_err(|_| DecodeError("klen".into()))?);
        let k = take(usize::from(klen), "a key")?.to_vec();
        if !in_index(&k) {
            return Err(DecodeError("index log holds a key of a kind the index does not hold".into()));
        }
        let v = match take(1, "a write's tag")?[0] {
            0 => None,
            1 => {
                let vlen =
                    u32::from_le_bytes(take(4, "a value length")?.try_into().map_err(|_| DecodeError("vlen".into()))?);
                Some(take(vlen as usize, "a value")?.to_vec())
            }
            t => return Err(DecodeError(format!("index log write tag {t}"))),
        };
        out.push((k, v));
    }
    if !rest.is_empty() {
        return Err(DecodeError(format!("{} bytes after the index log's last write", rest.len())));
    }
    Ok(out)
}

/// Merges a sled range and the index's range over the same bounds into one key-ordered
/// stream (`forward`) or reverse. A key in both (a store written before the index existed
/// that was not migrated yet; never otherwise) comes once, the index's.
pub struct MergeBase<'a> {
    a: std::iter::Peekable<Box<dyn Iterator<Item = KvResult> + Send + 'a>>,
    b: std::iter::Peekable<Box<dyn Iterator<Item = KvResult> + Send + 'a>>,
    forward: bool,
}

impl<'a> MergeBase<'a> {
    pub fn new(
        sled: Box<dyn Iterator<Item = KvResult> + Send + 'a>,
        index: Box<dyn Iterator<Item = KvResult> + Send + 'a>,
        forward: bool,
    ) -> Self {
        MergeBase { a: sled.peekable(), b: index.peekable(), forward }
    }
}

impl Iterator for MergeBase<'_> {
    type Item = KvResult;

    fn next(&mut self) -> Option<KvResult> {
        let order = match (self.a.peek(), self.b.peek()) {
            (None, None) => return None,
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            // An error comes out first.
            (Some(Err(_)), _) => std::cmp::Ordering::Less,
            (_, Some(Err(_))) => std::cmp::Ordering::Greater,
            (Some(Ok((ka, _))), Some(Ok((kb, _)))) => {
                let o = ka.cmp(kb);
                if self.forward {
                    o
                } else {
                    o.reverse()
                }
            }
        };
        match order {
            std::cmp::Ordering::Less => self.a.next(),
            std::cmp::Ordering::Greater => self.b.next(),
            std::cmp::Ordering::Equal => {
                self.a.next();
                self.b.next()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dk(conv: &[u8], id: u8) -> Vec<u8> {
        keys::dedupe_key(3, 1, conv, &[id; 16])
    }

    #[test]
    fn a_log_round_trips_and_damage_is_named() {
        let (a, b) = (dk(b"c1", 1), dk(b"c2", 2));
        let writes: Vec<WriteRef<'_>> = vec![(&a, Some(b"v1")), (&b, None)];
        let enc = encode_log(&writes).unwrap();
        let dec = decode_log(&enc).unwrap();
        assert_eq!(dec, vec![(a.clone(), Some(b"v1".to_vec())), (b.clone(), None)]);
        let mut bad = enc.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(decode_log(&bad).unwrap_err().0.contains("crc"));
        let conv = keys::conv_key(3, 1, b"c1");
        let run = keys::run_key(3, 1, b"c1", 7);
        let enc = encode_log(&[(&conv, Some(b"m")), (&run, None)]).unwrap();
        assert_eq!(decode_log(&enc).unwrap().len(), 2, "CONV and RUN keys are the index's too");
        let env = keys::env_key(3, 1, b"c1", 7);
        let enc = encode_log(&[(&env, None)]).unwrap();
        assert!(decode_log(&enc).unwrap_err().0.contains("does not hold"));
    }

    #[test]
    fn which_store_holds_a_range() {
        let conv = keys::conv_prefix(3, 1, keys::KIND_ENV, b"c");
        let mut end = conv.clone();
        end.push(0xff);
        assert_eq!(index_share(&(conv.clone()..end)), Share::None);
        let d = keys::conv_prefix(3, 1, keys::KIND_DEDUPE, b"c");
        let mut dend = d.clone();
        dend.push(0xff);
        assert_eq!(index_share(&(d..dend)), Share::All);
        let all = keys::gen_prefix(3, 1).to_vec();
        assert_eq!(index_share(&(all..keys::gen_prefix(3, 2).to_vec())), Share::Some);
        assert_eq!(index_share(&(conv..)), Share::Some);
        let kind = keys::kind_prefix(3, 1, keys::KIND_RETENTION);
        let next = keys::kind_prefix(3, 1, keys::KIND_RETENTION + 1);
        assert_eq!(index_share(&(kind..next)), Share::None);
        let kind = keys::kind_prefix(3, 1, keys::KIND_DEDUPE);
        let next = keys::kind_prefix(3, 1, keys::KIND_DEDUPE + 1);
        assert_eq!(index_share(&(kind.clone()..next.clone())), Share::All);
        assert_eq!(index_share(&(kind..=next)), Share::Some);
        // A conversation's runs, and one conversation record.
        let runs = keys::conv_prefix(3, 1, keys::KIND_RUN, b"c");
        assert_eq!(index_share(&(keys::run_key(3, 1, b"c", 0)..=keys::run_key(3, 1, b"c", 9))), Share::All);
        assert_eq!(index_share(&crate::overlay::prefix_range(&runs)), Share::All);
        let c = keys::conv_key(3, 1, b"c");
        assert_eq!(index_share(&(c.clone()..=c)), Share::All);
        for kind in [keys::KIND_META, keys::KIND_ENV, keys::KIND_EXPIRY, keys::KIND_CURSOR, keys::KIND_SEGS] {
            let p = keys::kind_prefix(3, 1, kind);
            assert_eq!(index_share(&crate::overlay::prefix_range(&p)), Share::None, "kind {kind} is sled's");
        }
    }

    #[test]
    fn merge_orders_both_ways_and_prefers_the_index() {
        let kv = |k: &[u8], v: &[u8]| -> KvResult { Ok((IVec::from(k), IVec::from(v))) };
        let sled: Vec<KvResult> = vec![kv(b"a", b"s"), kv(b"c", b"s"), kv(b"d", b"s")];
        let index: Vec<KvResult> = vec![kv(b"b", b"i"), kv(b"c", b"i")];
        let got: Vec<(Vec<u8>, Vec<u8>)> =
            MergeBase::new(Box::new(sled.into_iter()), Box::new(index.into_iter()), true)
                .map(|r| r.map(|(k, v)| (k.to_vec(), v.to_vec())).unwrap())
                .collect();
        let want: Vec<(Vec<u8>, Vec<u8>)> = [("a", "s"), ("b", "i"), ("c", "i"), ("d", "s")]
            .iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect();
        assert_eq!(got, want);
        let sled: Vec<KvResult> = vec![kv(b"d", b"s"), kv(b"a", b"s")];
        let index: Vec<KvResult> = vec![kv(b"c", b"i"), kv(b"b", b"i")];
        let got: Vec<Vec<u8>> = MergeBase::new(Box::new(sled.into_iter()), Box::new(index.into_iter()), false)
            .map(|r| r.unwrap().0.to_vec())
            .collect();
        assert_eq!(got, vec![b"d".to_vec(), b"c".to_vec(), b"b".to_vec(), b"a".to_vec()]);
    }

    #[test]
    fn the_index_reopens_with_what_was_persisted() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dk(b"c1", 1), dk(b"c1", 2));
        {
            let idx = StateIndex::open(dir.path()).unwrap();
            idx.apply([(a.as_slice(), Some(b"x".as_slice())), (b.as_slice(), Some(b"y".as_slice()))]).unwrap();
            idx.apply([(b.as_slice(), None)]).unwrap();
            idx.persist().unwrap();
        }
        let idx = StateIndex::open(dir.path()).unwrap();
        assert_eq!(idx.get(&a).unwrap().as_deref(), Some(b"x".as_slice()));
        assert_eq!(idx.get(&b).unwrap(), None);
        assert_eq!(idx.delete_range(keys::gen_prefix(3, 1).to_vec()..keys::gen_prefix(3, 2).to_vec()).unwrap(), 1);
        assert_eq!(idx.get(&a).unwrap(), None);
    }
}
