//! The state machine on sled: one `sled::Db` per node, one Raft group per shard.
//!
//! Per group it keeps, under its active generation (see `keys.rs`): each conversation's last
//! `seq`, every envelope under (conversation, seq), and the last applied log id with the
//! membership. Applies write into an in-memory overlay (`overlay.rs`); a checkpoint (at
//! least every 300 ms, on the `habar-sm-checkpoint` thread) moves it to sled in one atomic
//! batch that carries the applied log ids with the data, so sled is always the state at the
//! applied id it stores, and a crash never leaves data and applied state apart.
//!
//! Durability: applies are not flushed one by one (the WAL is the durable record and
//! openraft re-applies from the durable applied state after a restart, up to the saved
//! committed id). A checkpoint is written and sled flushed before a snapshot is reported
//! built, because openraft purges the log behind a snapshot, and before and around the
//! generation switch of an install.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::collections::HashSet;
use std::fs;
use std::io;
use std::ops::Bound;
use std::path::Path;
use std::path::PathBuf;
use std::sync::atomic::AtomicU32;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use std::time::Instant;

use futures::StreamExt;
use openraft::storage::EntryResponder;
use openraft::storage::RaftStateMachine;
use openraft::OptionalSend;
use openraft::RaftSnapshotBuilder;
use tokio::sync::broadcast;
use tokio::sync::watch;

use crate::envseg::SegConfig;
use crate::envseg::Segments;
use crate::error::hex;
use crate::error::io_err;
use crate::error::unix_nanos;
use crate::error::StoreError;
use crate::ilog;
use crate::index;
use crate::index::StateIndex;
use crate::keys;
use crate::overlay::KvResult;
use crate::overlay::Merged;
use crate::overlay::Overlay;
use crate::overlay::Pending;
use crate::runs;
use crate::runs::RunRef;
use crate::snapshot::SnapshotData;
use crate::snapshot::SnapshotFileWriter;
use crate::snapshot::SnapshotReader;
use crate::snapshot::SnapshotWriter;
use crate::types::Appended;
use crate::types::Command;
use crate::types::CommandResponse;
use crate::types::CursorRecord;
use crate::types::Entry;
use crate::types::EntryPayload;
use crate::types::GroupId;
use crate::types::LogId;
use crate::types::MaintainReport;
use crate::types::NewEnvelope;
use crate::types::Snapshot;
use crate::types::SnapshotMeta;
use crate::types::StoredEnvelope;
use crate::types::StoredMembership;
use crate::types::TypeConfig;
use crate::types::MESSAGE_ID_LEN;

/// Default sled page cache. sled's RAM use is several times this, and more so the smaller its
/// items: since envelope bodies moved into runs (step 2b), sled holds mostly small items and
/// 96 MiB grew the one-to-one run's peak RSS to ~370 MiB; 48 MiB: 263-268 MiB and no
/// closed-loop throughput lost (docs/BENCHMARKS.md, "Runs").
pub const DEFAULT_CACHE_CAPACITY: u64 = 48 << 20;
/// Bound on the records of one sled batch while installing a snapshot.
const INSTALL_BATCH_RECORDS: usize = 2048;
/// Dedupe time items a snapshot build reads from sled at a time, under the overlay's gate
/// (`StateStore::write_dedupe_times`): checkpoints wait for one chunk at most (and, since
/// a waiting writer blocks new readers, merged reads too), read on the build's thread at a
/// low priority; small enough that this stays a few milliseconds with sled's pages cold.
const DEDUPE_TIMES_CHUNK: usize = 128;
/// Where damaged snapshot files go, beside `snapshots/` (never read again).
pub const QUARANTINE_DIR: &str = "quarantine";
const INSTALL_BATCH_BYTES: usize = 8 << 20;

/// Capacity of a group's change feed; a receiver that lags further re-reads everything.
const CHANGE_FEED_CAPACITY: usize = 1024;
/// Envelopes read at a time by the commands that walk a conversation (retention, erasure).
const READ_CHUNK: usize = 256;
/// Records a read may skip (removed or expired) beyond its limit before it stops early.
const READ_SKIP_BUDGET: usize = 4096;

/// What a group's apply changed, for subscriptions on this node.
#[derive(Debug, Clone)]
pub enum Change {
    /// These conversations have new envelopes, up to the given last seq.
    Appended(Arc<Vec<(String, u64)>>),
    /// A snapshot was installed: anything may have changed.
    All,
}

struct GroupRt {
    generation: AtomicU32,
    applied: watch::Sender<u64>,
    changes: broadcast::Sender<Change>,
    current: Mutex<Option<(SnapshotMeta, SnapshotData)>>,
    /// `current`'s file as it was when every CRC of it was last read and checked (at open, or
    /// by `current_snapshot_checked`; a file just built or received is read once more on its
    /// first use).
    checked: Mutex<Option<Checked>>,
}

impl GroupRt {
    /// The group's current snapshot (meta and file), if it has one.
    fn current_snapshot(&self) -> Option<(SnapshotMeta, SnapshotData)> {
        self.current.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// A snapshot file whose every CRC was checked: its path, length and modification time then,
/// and when.
type Checked = (PathBuf, u64, std::time::SystemTime, Instant);

/// `path`'s length and modification time, as a check records them.
fn checked_now(path: &Path) -> Option<Checked> {
    let m = fs::metadata(path).ok()?;
    Some((path.to_path_buf(), m.len(), m.modified().ok()?, Instant::now()))
}

/// A snapshot file checked this recently, and not rewritten since (same length and
/// modification time), is not read again before use. openraft asks for the current snapshot
/// twice at start, right after the open checked every file; damage that leaves the file's
/// metadata alone is caught at the next check after this (and by the receiver, which checks
/// every CRC).
const SNAPSHOT_RECHECK: Duration = Duration::from_secs(60);

/// A conversation's own record: its last seq, retention limits (0 = none), and the seq below
/// which every envelope is removed (retention or erasure; 0 = none).
///
/// `removed_below` is what removes envelopes that live in runs (`runs.rs`), which have no
/// item of their own to delete; it applies to every envelope, in a run or an ENV item, so
/// that what a read returns never depends on which of the two a replica holds an envelope in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct ConvMeta {
    last_seq: u64,
    max_age_ms: u64,
    max_count: u64,
    removed_below: u64,
}

impl ConvMeta {
    /// 24 bytes while nothing was removed (the layout before `removed_below`), else 32.
    fn encode(&self) -> Vec<u8> {
        let mut b = [0u8; 32];
        b[0..8].copy_from_slice(&self.last_seq.to_be_bytes());
        b[8..16].copy_from_slice(&self.max_age_ms.to_be_bytes());
        b[16..24].copy_from_slice(&self.max_count.to_be_bytes());
        b[24..32].copy_from_slice(&self.removed_below.to_be_bytes());
        keys::encode_value(if self.removed_below == 0 { &b[..24] } else { &b })
    }

    /// 8-byte bodies are the first layout (last seq only), 24 the second (with limits).
    fn decode(key: &[u8], v: &[u8]) -> Result<ConvMeta, StoreError> {
        let body = keys::decode_value(v).map_err(|e| corrupt_key(key, e))?;
        let u = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&body[i..i + 8]);
            u64::from_be_bytes(a)
        };
        match body.len() {
            8 => Ok(ConvMeta { last_seq: u(0), ..ConvMeta::default() }),
            24 => Ok(ConvMeta { last_seq: u(0), max_age_ms: u(8), max_count: u(16), removed_below: 0 }),
            32 => Ok(ConvMeta { last_seq: u(0), max_age_ms: u(8), max_count: u(16), removed_below: u(24) }),
            n => Err(corrupt_key(key, keys::DecodeError(format!("conversation record of {n} bytes")))),
        }
    }

    /// The lowest seq a read can still find.
    fn first_kept(&self) -> u64 {
        self.removed_below.max(1)
    }

    fn has_retention(&self) -> bool {
        self.max_age_ms > 0 || self.max_count > 0
    }

    /// Whether retention removes the envelope `seq` committed at `committed_at_ms`.
    fn retention_removes(&self, seq: u64, committed_at_ms: u64, now_ms: u64) -> bool {
        (self.max_count > 0 && seq.saturating_add(self.max_count) <= self.last_seq)
            || (self.max_age_ms > 0 && committed_at_ms.saturating_add(self.max_age_ms) <= now_ms)
    }
}

/// Two u64s (seq and a time) as a framed value: dedupe entries and cursors.
fn encode_pair(a: u64, b: u64) -> Vec<u8> {
    let mut v = [0u8; 16];
    v[0..8].copy_from_slice(&a.to_be_bytes());
    v[8..16].copy_from_slice(&b.to_be_bytes());
    keys::encode_value(&v)
}

fn decode_pair(key: &[u8], v: &[u8]) -> Result<(u64, u64), StoreError> {
    let body = keys::decode_value(v).map_err(|e| corrupt_key(key, e))?;
    if body.len() != 16 {
        return Err(corrupt_key(key, keys::DecodeError(format!("expected 16 bytes, got {}", body.len()))));
    }
    let mut a = [0u8; 8];
    let mut b = [0u8; 8];
    a.copy_from_slice(&body[0..8]);
    b.copy_from_slice(&body[8..16]);
    Ok((u64::from_be_bytes(a), u64::from_be_bytes(b)))
}

/// Direction of a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Forward,
    Backward,
}

/// One page of a conversation, as `read_page` returns it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadPage {
    /// In the read's direction.
    pub envelopes: Vec<StoredEnvelope>,
    pub last_seq: u64,
    /// Lowest seq still held (0: none).
    pub first_seq: u64,
    /// Seqs removed on purpose (expired, retention, erasure) in the span read, as
    /// `(from, to)` inclusive with `from <= to`, in the read's direction.
    pub removed: Vec<(u64, u64)>,
    /// Nothing further in this direction as of this read.
    pub end: bool,
    /// The first seq the next page in this direction starts at (forward: next from_seq;
    /// backward: next before_seq).
    pub next: u64,
}

/// Whether an envelope must no longer be delivered at `now_ms`.
pub fn is_expired(e: &NewEnvelope, now_ms: u64) -> bool {
    e.expires_at_ms != 0 && e.expires_at_ms <= now_ms
}

fn push_range(out: &mut Vec<(u64, u64)>, from: u64, to: u64, forward: bool) {
    if from > to {
        return;
    }
    if let Some(last) = out.last_mut() {
        if forward && last.1 + 1 == from {
            last.1 = to;
            return;
        }
        if !forward && to + 1 == last.0 {
            last.0 = from;
            return;
        }
    }
    out.push((from, to));
}

struct Inner {
    /// The sled database (its trees below; flushes go through `overlay.flush`, which
    /// keeps them apart from batches).
    _db: sled::Db,
    data: sled::Tree,
    /// group (u32 BE) -> active generation (u64 BE holding a u32), as a framed value.
    heads: sled::Tree,
    snap_dir: PathBuf,
    groups: Mutex<HashMap<GroupId, Arc<GroupRt>>>,
    /// Counts applied `DeleteConversation`s, so the node compacts after each.
    erasures: watch::Sender<u64>,
    /// Newest snapshot file per group found at open, before the group's runtime exists.
    found_snapshots: Mutex<HashMap<GroupId, (SnapshotMeta, SnapshotData)>>,
    /// Warns of an apply call slower than `slow_warn_ms`.
    slow_apply: crate::slow::SlowLog,
    /// One `checkpoint` call at a time, from its failure check to its failure's record.
    checkpoint_serial: Mutex<()>,
    /// Warns of a checkpoint slower than `slow_warn_ms`, with the time of each stage.
    slow_checkpoint: crate::slow::SlowLog,
    /// Every state-machine write since the last checkpoint (ARCHITECTURE.md, "Checkpoints"):
    /// sled only ever holds what a checkpoint wrote, so it is always the state at the
    /// applied log id stored with it.
    overlay: Overlay,
    /// When the last checkpoint finished.
    last_checkpoint: Mutex<Instant>,
    /// [`CHECKPOINT_INTERVAL`] unless a test or a benchmark set another
    /// ([`StateStore::set_checkpoint_interval`]), in ms.
    checkpoint_interval_ms: AtomicU64,
    /// Set when a checkpoint failed: applies fail from then on (the node stops, as after a
    /// failed WAL fsync), since what the overlay holds could no longer be made durable.
    checkpoint_failed: Mutex<Option<String>>,
    /// `<dir>/env`: one directory of envelope segments per group and generation.
    env_dir: PathBuf,
    /// Each group's (and generation's) envelope segments, opened on first use.
    segs: Mutex<HashMap<(GroupId, u32), Arc<Segments>>>,
    seg_cfg: SegConfig,
    /// Segments roll at this size (default `SegConfig`'s; tests set it small).
    env_segment_bytes: AtomicU64,
    /// Erased runs `(segment, offset, bytes)` per group and generation, to be zeroed once a
    /// checkpoint that deleted their items (and lists them in its SEGS item) is flushed.
    to_zero: Mutex<ZeroLists>,
    /// Per group and generation: segment -> RUN items pointing into it, as the last
    /// checkpoint wrote it (its SEGS item); loaded when the segments are opened.
    live: Mutex<HashMap<(GroupId, u32), BTreeMap<u64, u64>>>,
    /// Segments of RUN items that applies deleted since the last checkpoint froze.
    dropped: Mutex<HashMap<(GroupId, u32), Vec<u64>>>,
    /// `<dir>/index.v2`: the items of the index's kinds (conversations, runs, dedupe pairs),
    /// out of sled (`index.rs`).
    index: StateIndex,
    /// Which conversation records may exist (lookups of the others skip the state index).
    convs: ConvFilter,
    /// Which dedupe pairs may exist, per group and generation (`dedupe_filter.rs`).
    dedupe: crate::dedupe_filter::DedupeFilters,
    /// The number of the next checkpoint's index log items.
    index_log_next: AtomicU64,
    /// `<dir>/index-log.{0,1}`: where those items point (`ilog.rs`).
    index_logs: ilog::IndexLogFiles,
    /// Index log items whose writes the index holds but has not persisted: the next
    /// checkpoint persists the index and deletes them.
    index_logs_applied: Mutex<Vec<Vec<u8>>>,
    /// Snapshot builds under way, per group and generation (`BuildPin`). A build writes the
    /// bulk of its file after openraft released the group's state machine, from a view of
    /// the state index and the runs it points to: meanwhile checkpoints leave the zeroing
    /// and deletions in those segments for later (`revisit`), and an install of the group
    /// waits for `build_done`.
    building: Mutex<HashMap<(GroupId, u32), usize>>,
    build_done: std::sync::Condvar,
    /// Groups whose zeroing or segment deletions a checkpoint left for after a build: the
    /// next checkpoint takes them up even if it carries none of their writes.
    revisit: Mutex<HashSet<(GroupId, u32)>>,
    /// One permit: the run copies of snapshot builds (`write_runs`, the second phase of a
    /// second half: every envelope read and written again, the fsync, the publish) run one
    /// at a time on a node. Builds of every group come due together under uniform load (the
    /// same log index on every group), and each reads and writes the group's whole state.
    build_turn: tokio::sync::Semaphore,
    /// One permit: the first phases of those second halves (`read_view`: the view of the
    /// state index and the dedupe times) run one at a time on a node, apart from the run
    /// copies, so that a build's view is not kept open while other builds copy their runs.
    view_turn: tokio::sync::Semaphore,
    /// Index views open when the last snapshot build began copying its runs (for tests: its
    /// own view is dropped by then). `usize::MAX` before the first.
    build_views_at_runs: AtomicUsize,
    /// Snapshot builds that have yet to read their group's dedupe times (`KeptDeletes`): a
    /// checkpoint keeps for them the items of that kind it deletes from sled.
    keeping: Mutex<Vec<((GroupId, u32), KeptItems)>>,
    /// For tests: where a build's scan of the dedupe times stops for the test
    /// (`StateStore::pause_dedupe_scan_for_tests`).
    scan_pause: Mutex<Option<ScanPause>>,
}

/// A stop of a build's dedupe time scan after `after_chunks` chunks: it tells `reached` and
/// waits for `resume`.
struct ScanPause {
    after_chunks: usize,
    reached: std::sync::mpsc::Sender<()>,
    resume: std::sync::mpsc::Receiver<()>,
}

/// Dedupe time items (DEDUPE_TIME) a checkpoint deleted from sled, with their values.
type KeptItems = Arc<Mutex<Vec<(Vec<u8>, sled::IVec)>>>;

impl Inner {
    /// A key's value as the state machine sees it (the overlay over sled, or over the
    /// state index for the index's kinds).
    fn get(&self, key: &[u8]) -> sled::Result<Option<sled::IVec>> {
        if index::in_index(key) {
            // Never sled's: a lookup of a new conversation or message id must not wait for
            // sled's batches.
            return match self.overlay.get_pending(key) {
                Some(v) => Ok(v),
                None => self.index.get(key),
            };
        }
        self.overlay.get(&self.data, key)
    }

    fn range<R: std::ops::RangeBounds<Vec<u8>> + Clone>(&self, range: R) -> Merged<'_> {
        self.overlay.range_over(range, true, |r, forward| self.base(r, forward))
    }

    fn range_rev<R: std::ops::RangeBounds<Vec<u8>> + Clone>(&self, range: R) -> Merged<'_> {
        self.overlay.range_over(range, false, |r, forward| self.base(r, forward))
    }

    fn scan_prefix(&self, prefix: impl AsRef<[u8]>) -> Merged<'_> {
        self.range(crate::overlay::prefix_range(prefix.as_ref()))
    }

    /// What checkpoints wrote in `range` (without the overlay): sled's items merged with
    /// the state index's where the range can hold keys of its kinds.
    fn base<R: std::ops::RangeBounds<Vec<u8>>>(
        &self,
        range: R,
        forward: bool,
    ) -> Box<dyn Iterator<Item = KvResult> + Send> {
        let bounds = (range.start_bound().cloned(), range.end_bound().cloned());
        let share = index::index_share(&bounds);
        if share == index::Share::All {
            return self.index.range(bounds, forward);
        }
        let items = self.data.range(bounds.clone());
        let items: Box<dyn Iterator<Item = KvResult> + Send> =
            if forward { Box::new(items) } else { Box::new(items.rev()) };
        match share {
            index::Share::None => items,
            _ => Box::new(index::MergeBase::new(items, self.index.range(bounds, forward), forward)),
        }
    }

    /// Writes everything in the overlay to sled in one batch (and flushes sled if `flush`).
    fn checkpoint(&self, flush: bool) -> Result<(), StoreError> {
        // Held from the failure check to the failure's record: a caller that waited for a
        // checkpoint that failed must not run another (its batch may have landed, and a
        // second build would write its runs and dedupe logs again).
        let _serial = self.checkpoint_serial.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = self.checkpoint_failed.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return Err(StoreError::Checkpoint(e));
        }
        let started = Instant::now();
        // The zeroing and deletions after the batch run before the next checkpoint can
        // start: it must not list (or delete) what this one is still working on.
        let done = self.overlay.checkpoint_with(
            &self.data,
            |frozen, redone| self.checkpoint_batch(frozen, redone),
            // As the batch lands (and not before or after, for `write_dedupe_times`).
            |after| {
                for (kept, k, v) in &after.kept {
                    kept.lock().unwrap_or_else(|p| p.into_inner()).push((k.clone(), v.clone()));
                }
            },
            |after| self.after_checkpoint(after),
            flush,
        );
        let took = started.elapsed();
        match done {
            Ok((writes, st)) => {
                *self.last_checkpoint.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
                if let Some(left_out) = self.slow_checkpoint.check(took) {
                    let ms = |d: Duration| d.as_secs_f64() * 1e3;
                    tracing::warn!(
                        ms = ms(took),
                        writes,
                        index_persist_ms = ms(st.index_persist),
                        segments_ms = ms(st.segments),
                        index_log_ms = ms(st.index_log),
                        sled_flush_ms = ms(st.flush),
                        index_apply_ms = ms(st.index_apply),
                        left_out,
                        "slow state-machine checkpoint (applies wait for it once the overlay is full; the rest of `ms` is building and writing sled's batch, and sled's flush when one was asked)"
                    );
                }
                metrics::counter!("habar_sm_checkpoints_total").increment(1);
                metrics::histogram!("habar_sm_checkpoint_seconds").record(took.as_secs_f64());
                metrics::histogram!("habar_sm_checkpoint_writes").record(writes as f64);
                Ok(())
            }
            Err(e) => {
                let msg = format!("state-machine checkpoint failed: {e}");
                tracing::error!(error = %e, "state-machine checkpoint failed; this node stops applying");
                *self.checkpoint_failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(msg);
                Err(e)
            }
        }
    }

    /// The envelope segments of `group` under `generation`, opened on first use as the last
    /// checkpoint left them (cut back to the mark it stored in sled).
    fn segments(&self, group: GroupId, generation: u32) -> Result<Arc<Segments>, StoreError> {
        let mut segs = self.segs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = segs.get(&(group, generation)) {
            return Ok(s.clone());
        }
        let k = keys::segs_key(group, generation);
        // sled's, not the overlay's: only checkpoints write this item, straight into sled.
        let state = match self.data.get(&k)? {
            Some(v) => runs::decode_segs(&v).map_err(|e| corrupt_key(&k, e))?,
            None => runs::SegsState::default(),
        };
        let dir = self.env_dir.join(format!("g{group}-gen{generation}"));
        let cfg = SegConfig { segment_bytes: self.env_segment_bytes.load(Ordering::Relaxed), ..self.seg_cfg.clone() };
        let s = Arc::new(Segments::open(&dir, group, generation, state.mark, cfg)?);
        // Erased runs the last checkpoint listed may not have been zeroed before a crash.
        s.zero_all(&state.to_zero)?;
        // Every segment a RUN item points into must be here; one none points into goes (a
        // crash after the checkpoint that emptied it, before the deletion).
        let on_disk = s.segments();
        if let Some(missing) = state.live.keys().find(|seg| !on_disk.contains(seg)) {
            return Err(StoreError::Corrupt {
                what: dir.join(format!("{missing:020}.env")).display().to_string(),
                offset: 0,
                reason: "runs point into this envelope segment but it is missing".into(),
            });
        }
        for seg in on_disk {
            if seg != s.active() && !state.live.contains_key(&seg) {
                s.remove(seg)?;
            }
        }
        self.live.lock().unwrap_or_else(|p| p.into_inner()).insert((group, generation), state.live);
        segs.insert((group, generation), s.clone());
        Ok(s)
    }

    /// After a checkpoint's batch landed (its frozen layer still readable): forgets the
    /// index logs the batch deleted; if it carried index logs or emptied segments, flushes
    /// sled (so no crash loses a log the index then gets, or a run's deletion), applies the
    /// logs' writes to the state index, zeroes erased runs' records and deletes the empty
    /// segments. Returns the checkpoint's stage times.
    fn after_checkpoint(&self, after: After) -> Result<Stages, StoreError> {
        let mut stages = after.stages;
        // The batch deleted every log the list held (checkpoints run one at a time, and only
        // they touch the list).
        self.index_logs_applied.lock().unwrap_or_else(|p| p.into_inner()).clear();
        if after.zero.is_empty() && after.delete.is_empty() && after.index.is_empty() {
            return Ok(stages);
        }
        let t = Instant::now();
        self.overlay.flush(&self.data)?;
        stages.flush = t.elapsed();
        if !after.index.is_empty() {
            // sled holds the logs durably now: the index may have the writes (never before,
            // or a crash could leave it ahead of sled's applied id).
            crash_point("before_index_apply", || {});
            let t = Instant::now();
            // Not under the overlay's gate (as sled's batch is): a merged range read that sees
            // the index change under it (fjall's ranges are not snapshots) copied the frozen
            // layer, which holds these writes and wins over the index, except the new runs'
            // RUN items: for those it holds the ENV items whose bodies they point to, and a
            // read that finds an envelope both ways merges it (`gather`, `dump_group`). A read
            // that began before this checkpoint froze held the gate, so this batch (and this
            // apply) waited for it.
            // `dumps_while_checkpoints_move_items_into_the_index_see_each_once`.
            self.index
                .apply(after.index.iter().flat_map(|(_, w)| w.iter().map(|(k, v)| (k.as_slice(), v.as_deref()))))?;
            stages.index_apply = t.elapsed();
            crash_point("after_index_apply", || {
                let _ = self.index.persist();
            });
            // This checkpoint's logs wait for the next one to delete them.
            self.index_logs_applied
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(after.index.into_iter().map(|(k, _)| k));
        }
        if after.zero.is_empty() && after.delete.is_empty() {
            return Ok(stages);
        }
        crash_point("before_zeroing", || {});
        for ((group, generation), stretches) in &after.zero {
            self.segments(*group, *generation)?.zero_all(stretches)?;
        }
        {
            // Every stretch the batch's groups had to zero is zeroed now, or lay in a segment
            // deleted below; none was added meanwhile (an apply that adds some holds
            // checkpoints off, and this runs inside one).
            let mut to_zero = self.to_zero.lock().unwrap_or_else(|p| p.into_inner());
            for at in &after.zeroed_groups {
                to_zero.remove(at);
            }
        }
        for ((group, generation), empty) in after.delete {
            let segs = self.segments(group, generation)?;
            for seg in empty {
                segs.remove(seg)?;
                metrics::counter!("habar_sm_env_segments_deleted_total").increment(1);
            }
        }
        Ok(stages)
    }

    /// A dedupe time item this checkpoint deletes: its value (in sled until the batch
    /// lands), for every build of its group that has yet to read that kind (`KeptDeletes`).
    fn keep_deleted(
        &self,
        keeping: &[((GroupId, u32), KeptItems)],
        k: &[u8],
        after: &mut After,
    ) -> Result<(), StoreError> {
        let at = keys::group_and_generation(k);
        let mut builds = keeping.iter().filter(|(b, _)| Some(*b) == at).peekable();
        if builds.peek().is_none() {
            return Ok(());
        }
        let Some(v) = self.data.get(k)? else { return Ok(()) };
        for (_, kept) in builds {
            after.kept.push((kept.clone(), k.to_vec(), v.clone()));
        }
        Ok(())
    }

    /// The batch of a checkpoint: the frozen writes, except that the bodies of envelopes
    /// that do not expire move to their group's envelope segment, a run per conversation
    /// (`runs.rs`), written and fdatasynced before the batch; the batch carries one RUN item
    /// per run and each group's new segment mark (SEGS) in their place.
    fn checkpoint_batch(
        &self,
        frozen: &Pending,
        redone: &HashSet<Vec<u8>>,
    ) -> Result<(sled::Batch, After), StoreError> {
        let mut after = After::default();
        let mut batch = sled::Batch::default();
        // The logs of earlier checkpoints whose writes the index holds: durable there now,
        // so they go.
        // (Taken out of the list only once the batch landed: `after_checkpoint`.)
        let applied = self.index_logs_applied.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if !applied.is_empty() {
            let t = Instant::now();
            self.index.persist()?;
            after.stages.index_persist = t.elapsed();
            for k in &applied {
                batch.remove(k.as_slice());
            }
        }
        // Writes of the index's kinds go to the index, through one log item per group and
        // generation: the frozen ones first, then the RUN items of the runs written below
        // (a run's item replaces a frozen delete of the same key: a conversation erased and
        // published again from the same seq since the last checkpoint).
        let mut index_writes: BTreeMap<(GroupId, u32), IndexWrites> = BTreeMap::new();
        // Envelopes to move, in key order: by group, generation, conversation, seq.
        let mut moving: Vec<(&[u8], u64, &[u8])> = Vec::new();
        let mut synced: Vec<(GroupId, u32, crate::envseg::Durable)> = Vec::new();
        let mut added_runs: HashMap<(GroupId, u32), Vec<u64>> = HashMap::new();
        // Builds that have yet to read their group's dedupe times from sled (registered
        // before any write after their log position was applied, so before it froze).
        let keeping = self.keeping.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for (k, v) in frozen.iter() {
            if index::in_index(k) {
                let at = keys::group_and_generation(k)
                    .ok_or_else(|| corrupt_key(k, keys::DecodeError("not a state-machine key".into())))?;
                index_writes.entry(at).or_default().insert(k.clone(), v.clone());
                continue;
            }
            match v {
                Some(v) => match moves_to_a_run(k, v) {
                    Some(seq) => {
                        if redone.contains(k) {
                            // Its seq was used before (a conversation erased and reset since
                            // the last checkpoint): sled may still hold the old envelope.
                            batch.remove(k.as_slice());
                        }
                        moving.push((k, seq, v))
                    }
                    None => batch.insert(k.as_slice(), v.as_slice()),
                },
                None => {
                    if !keeping.is_empty() && k.get(keys::GEN_PREFIX_LEN) == Some(&keys::KIND_DEDUPE_TIME) {
                        self.keep_deleted(&keeping, k, &mut after)?;
                    }
                    batch.remove(k.as_slice())
                }
            }
        }
        let segments_started = Instant::now();
        let mut i = 0;
        while i < moving.len() {
            // One group and generation: the 9-byte prefix of their keys.
            let prefix = &moving[i].0[..keys::GEN_PREFIX_LEN];
            let end = moving[i..]
                .iter()
                .position(|(k, _, _)| &k[..keys::GEN_PREFIX_LEN] != prefix)
                .map_or(moving.len(), |n| i + n);
            let (group, generation) = match keys::decode_key(moving[i].0) {
                Ok(keys::Key::Env { group, generation, .. }) => (group, generation),
                _ => return Err(corrupt_key(moving[i].0, keys::DecodeError("not an envelope key".into()))),
            };
            // Runs: a conversation's consecutive seqs, split at MAX_RUN_BYTES.
            let mut buf =
                Vec::with_capacity(moving[i..end].iter().map(|(_, _, v)| v.len() + runs::RECORD_OVERHEAD).sum());
            let mut planned: Vec<(Vec<u8>, std::ops::Range<usize>, u32)> = Vec::new();
            let mut open: Option<(&[u8], u64, usize, u32)> = None; // (key without seq, next seq, start, count)
            for &(k, seq, v) in &moving[i..end] {
                let conv_part = &k[..k.len() - 8];
                let extends = open.is_some_and(|(c, next, start, _)| {
                    c == conv_part
                        && next == seq
                        && buf.len() - start + v.len() + runs::RECORD_OVERHEAD <= runs::MAX_RUN_BYTES
                });
                if !extends {
                    if let Some((c, next, start, count)) = open.take() {
                        planned.push((
                            keys::run_key_from_env_prefix(c, next - u64::from(count)),
                            start..buf.len(),
                            count,
                        ));
                    }
                    open = Some((conv_part, seq, buf.len(), 0));
                }
                runs::push_record(&mut buf, seq, v);
                if let Some(o) = open.as_mut() {
                    o.1 = seq + 1;
                    o.3 += 1;
                }
            }
            if let Some((c, next, start, count)) = open.take() {
                planned.push((keys::run_key_from_env_prefix(c, next - u64::from(count)), start..buf.len(), count));
            }
            let segs = self.segments(group, generation)?;
            let blobs: Vec<&[u8]> = planned.iter().map(|(_, r, _)| &buf[r.clone()]).collect();
            let at = segs.append_blobs(&blobs)?;
            let added = added_runs.entry((group, generation)).or_default();
            metrics::counter!("habar_sm_runs_written_total").increment(planned.len() as u64);
            let run_items = index_writes.entry((group, generation)).or_default();
            for ((key, range, count), (segment, offset)) in planned.into_iter().zip(at) {
                let r = RunRef { segment, offset, bytes: range.len() as u32, count };
                run_items.insert(key, Some(r.encode()));
                added.push(segment);
            }
            synced.push((group, generation, segs.sync()?));
            crash_point("after_segments", || {});
            i = end;
        }
        after.stages.segments = segments_started.elapsed();
        if !index_writes.is_empty() {
            // Each group's log into the next index log file (fdatasynced), a small item
            // pointing at it into the batch (`ilog.rs`).
            let t = Instant::now();
            let mut logs = Vec::with_capacity(index_writes.len());
            for (&(group, generation), writes) in &index_writes {
                let (number, log) = self.next_index_log(writes.iter())?;
                logs.push((group, generation, number, log));
            }
            let sections: Vec<ilog::Section<'_>> = logs
                .iter()
                .map(|(group, generation, number, log)| ilog::Section {
                    group: *group,
                    generation: *generation,
                    number: *number,
                    log,
                })
                .collect();
            let items = self.index_logs.write(&sections)?;
            crash_point("after_index_log", || {});
            for ((writes, (group, generation, number, _)), item) in index_writes.into_values().zip(&logs).zip(items) {
                let key = keys::index_log_key(*group, *generation, *number);
                batch.insert(key.as_slice(), item);
                after.index.push((key, writes.into_iter().collect()));
            }
            after.stages.index_log = t.elapsed();
        }
        // Erasures and retention applied before this checkpoint froze (they hold off
        // checkpoints while they run, so their RUN deletes are in `frozen`): the segments of
        // the deleted runs count one less; erased runs are listed in SEGS now and zeroed once
        // this batch is flushed.
        let dropped = std::mem::take(&mut *self.dropped.lock().unwrap_or_else(|p| p.into_inner()));
        let to_zero = self.to_zero.lock().unwrap_or_else(|p| p.into_inner());
        // Groups a snapshot build reads runs of: what they have to zero or delete waits
        // (listed in SEGS all the same, so a crash meanwhile loses none of it).
        let building: HashSet<(GroupId, u32)> =
            self.building.lock().unwrap_or_else(|p| p.into_inner()).keys().copied().collect();
        let revisit = std::mem::take(&mut *self.revisit.lock().unwrap_or_else(|p| p.into_inner()));
        after.zeroed_groups = to_zero.keys().filter(|at| !building.contains(at)).copied().collect();
        for &(group, generation) in to_zero.keys().chain(dropped.keys()).chain(revisit.iter()) {
            if !synced.iter().any(|(g, n, _)| (*g, *n) == (group, generation)) {
                synced.push((group, generation, self.segments(group, generation)?.sync()?));
            }
        }
        for (group, generation, mark) in synced {
            let at = (group, generation);
            let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner()).get(&at).cloned().unwrap_or_default();
            for seg in added_runs.get(&at).into_iter().flatten() {
                *live.entry(*seg).or_insert(0) += 1;
            }
            for seg in dropped.get(&at).into_iter().flatten() {
                let n = live.get_mut(seg).ok_or_else(|| StoreError::Corrupt {
                    what: format!("envelope segment {seg} of group {group} generation {generation}"),
                    offset: 0,
                    reason: "a run in it was deleted but the segment counts no runs".into(),
                })?;
                *n -= 1;
                if *n == 0 {
                    live.remove(seg);
                }
            }
            // Every sealed segment no run points into (also one that emptied while it was
            // still the active one).
            let emptied: Vec<u64> = self
                .segments(group, generation)?
                .segments()
                .into_iter()
                .filter(|seg| *seg < mark.segment && !live.contains_key(seg))
                .collect();
            // Every erased run still to zero, but those in segments this checkpoint deletes.
            let listed: Vec<runs::Stretch> = to_zero
                .get(&at)
                .map(|z| z.iter().filter(|(seg, _, _)| !emptied.contains(seg)).copied().collect())
                .unwrap_or_default();
            if listed.len() > runs::MAX_TO_ZERO {
                return Err(StoreError::Encode(format!(
                    "{} erased runs to zero in group {group} at once, over the {} one checkpoint can list",
                    listed.len(),
                    runs::MAX_TO_ZERO
                )));
            }
            let state = runs::SegsState { mark: Some(mark), to_zero: listed.clone(), live: live.clone() };
            batch.insert(keys::segs_key(group, generation), runs::encode_segs(&state));
            if building.contains(&at) && !(listed.is_empty() && emptied.is_empty()) {
                self.revisit.lock().unwrap_or_else(|p| p.into_inner()).insert(at);
            } else {
                if !listed.is_empty() {
                    after.zero.push((at, listed));
                }
                if !emptied.is_empty() {
                    after.delete.push((at, emptied));
                }
            }
            // Recorded now, under the checkpoint's lock, so the next checkpoint counts from
            // here (if this batch fails, no checkpoint follows: the node stops applying).
            self.live.lock().unwrap_or_else(|p| p.into_inner()).insert(at, live);
        }
        Ok((batch, after))
    }

    /// The next index log of a checkpoint: its number (checkpoint order) and
    /// `index::encode_log`'s value of `writes`.
    fn next_index_log<'a>(
        &self,
        writes: impl Iterator<Item = (&'a Vec<u8>, &'a Option<Vec<u8>>)>,
    ) -> Result<(u64, Vec<u8>), StoreError> {
        let refs: Vec<index::WriteRef<'_>> = writes.map(|(k, v)| (k.as_slice(), v.as_deref())).collect();
        let log = index::encode_log(&refs)?;
        Ok((self.index_log_next.fetch_add(1, Ordering::Relaxed), log))
    }

    /// A checkpoint is due: the overlay holds [`CHECKPOINT_BYTES`], or anything at all and
    /// the last checkpoint is [`CHECKPOINT_INTERVAL`] old.
    fn checkpoint_due(&self) -> bool {
        let bytes = self.overlay.pending_bytes();
        bytes >= CHECKPOINT_BYTES
            || (bytes > 0
                && self.last_checkpoint.lock().unwrap_or_else(|p| p.into_inner()).elapsed()
                    >= Duration::from_millis(self.checkpoint_interval_ms.load(Ordering::Relaxed)))
            || self.revisit_due()
    }

    /// Whether zeroing or deletions that a snapshot build deferred can be done now (its
    /// pin is gone): also on an idle node, and after a build that failed or was dropped.
    fn revisit_due(&self) -> bool {
        let revisit: Vec<(GroupId, u32)> =
            self.revisit.lock().unwrap_or_else(|p| p.into_inner()).iter().copied().collect();
        if revisit.is_empty() {
            return false;
        }
        let building = self.building.lock().unwrap_or_else(|p| p.into_inner());
        revisit.iter().any(|at| !building.contains_key(at))
    }
}

/// A checkpoint is written at least this often while anything is pending. Not long, because
/// sled's `apply_batch` holds a process-wide lock that every sled read waits for: the longer
/// the interval, the longer those stalls (closed-loop p99 ~100 ms at 100 ms, ~140 at 300,
/// ~200 at 500, ~300 at 1 s) and the more memory (peak RSS ~250 MiB at 300 ms, ~365 at 1 s).
/// Not short either: a checkpoint writes each conversation it touched once (its CONV item
/// and its run), so longer intervals write fewer items per envelope: 300 ms / 4 MiB gave
/// +24-42% closed-loop throughput over 100 ms / 1 MiB with runs (docs/BENCHMARKS.md, "Runs").
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(300);
/// ... or as soon as the overlay holds this many bytes.
pub const CHECKPOINT_BYTES: usize = 4 << 20;
/// An apply that finds the overlay this full writes a checkpoint itself before it goes on
/// (back-pressure when sled falls behind: the overlay's memory stays bounded).
const OVERLAY_MAX_BYTES: usize = 2 * CHECKPOINT_BYTES;
/// How often the checkpoint thread looks whether a checkpoint is due.
const CHECKPOINT_TICK: Duration = Duration::from_millis(20);

/// The store's checkpoint thread: writes the overlay to sled when a checkpoint is due, and
/// ends when the store is dropped.
fn checkpoint_loop(inner: std::sync::Weak<Inner>, stop: Arc<std::sync::atomic::AtomicBool>) {
    loop {
        std::thread::sleep(CHECKPOINT_TICK);
        if stop.load(Ordering::Acquire) {
            return;
        }
        let Some(inner) = inner.upgrade() else { return };
        if inner.checkpoint_failed.lock().unwrap_or_else(|p| p.into_inner()).is_some() {
            return;
        }
        if inner.checkpoint_due() {
            // A failure is recorded in `checkpoint_failed` and logged; applies report it.
            let _ = inner.checkpoint(false);
        }
    }
}

impl Drop for Inner {
    /// sled flushes each tree when its last handle drops, holding the read side of its
    /// process-wide lock while it waits for the write: that flush deadlocked with another
    /// store's batch in one test process (overlay.rs, `SLED_IO`). Flushing here, through the
    /// overlay, first leaves the implicit flushes nothing to wait for.
    fn drop(&mut self) {
        let _ = self.overlay.flush(&self.data);
    }
}

/// How long the stages of a checkpoint took (besides sled's batch).
#[derive(Debug, Default, Clone, Copy)]
struct Stages {
    index_persist: Duration,
    segments: Duration,
    index_log: Duration,
    flush: Duration,
    index_apply: Duration,
}

/// One group's writes to the state index in a checkpoint, by key: a later write of a key
/// replaces an earlier one, so the log and the index's batch carry each key once (fjall gives
/// a batch's writes one seqno; which of two writes of one key would win is not specified).
type IndexWrites = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

/// What a checkpoint does after its batch landed (`Inner::after_checkpoint`).
#[derive(Default)]
struct After {
    /// Stages timed so far (the batch's side).
    stages: Stages,
    /// Each group's index log item (its key) and the writes it holds, to apply to the
    /// state index once the batch is flushed.
    index: Vec<(Vec<u8>, Vec<index::Write>)>,
    /// Erased runs to zero.
    zero: Vec<ZeroList>,
    /// Segments no run points into any more, to delete.
    delete: Vec<((GroupId, u32), Vec<u64>)>,
    /// The groups whose runs to zero the batch took up (listed, or in a deleted segment).
    zeroed_groups: Vec<(GroupId, u32)>,
    /// Dedupe time items the batch deletes, with their values, for the builds that keep
    /// them (`KeptDeletes`): handed over as the batch lands.
    kept: Vec<(KeptItems, Vec<u8>, sled::IVec)>,
}

/// The seq of an envelope a checkpoint moves into a run: an ENV item whose envelope does
/// not expire (expiring ones stay items: expiry removes them one by one, anywhere in a
/// conversation, which a run cannot express).
fn moves_to_a_run(key: &[u8], value: &[u8]) -> Option<u64> {
    if key.get(keys::GEN_PREFIX_LEN) != Some(&keys::KIND_ENV) {
        return None;
    }
    // One too big for a run stays an item too (a run is read whole; runs::MAX_RUN_BYTES).
    if value.len() + runs::RECORD_OVERHEAD > runs::MAX_RUN_BYTES {
        return None;
    }
    if env_value_expires_at(value)? != 0 {
        return None;
    }
    keys::env_key_seq(key)
}

/// The node's state-machine store. Cheap to clone.
#[derive(Clone)]
pub struct StateStore {
    /// Declared first, so dropped first: the last handle's drop stops and joins the
    /// checkpoint thread before `inner` goes, so the store is never dropped on that thread
    /// (sled's flush on drop there hung in a test process beside another store's batch).
    checkpointer: Arc<Checkpointer>,
    inner: Arc<Inner>,
}

/// The checkpoint thread of one store: stopped and joined when the last handle drops.
struct Checkpointer {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }
}

fn corrupt_key(key: &[u8], e: keys::DecodeError) -> StoreError {
    StoreError::Corrupt { what: format!("sled key {}", hex(key)), offset: 0, reason: e.0 }
}

fn decode_u64(key: &[u8], v: &[u8]) -> Result<u64, StoreError> {
    let body = keys::decode_value(v).map_err(|e| corrupt_key(key, e))?;
    let b: [u8; 8] = body.try_into().map_err(|_| corrupt_key(key, keys::DecodeError("expected 8 bytes".into())))?;
    Ok(u64::from_be_bytes(b))
}

/// An ENV value's body: committed_at_ms u64 | expires_at_ms u64 | message_id [16] |
/// sender_len u32 | sender | ciphertext; this much before the sender.
const ENV_BODY_FIXED: usize = 8 + 8 + MESSAGE_ID_LEN + 4;

/// An ENV value's `expires_at_ms`, read in place without checking the CRC (the value came
/// from this process's overlay; a read checks it on the way out); `None` if it is too short.
fn env_value_expires_at(v: &[u8]) -> Option<u64> {
    let at = keys::VALUE_HEADER_LEN + 8;
    if v.len() < keys::VALUE_HEADER_LEN + ENV_BODY_FIXED {
        return None;
    }
    Some(u64::from_be_bytes(v[at..at + 8].try_into().ok()?))
}

fn encode_envelope(e: &NewEnvelope, committed_at_ms: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(ENV_BODY_FIXED + e.sender.len() + e.ciphertext.len());
    b.extend_from_slice(&committed_at_ms.to_be_bytes());
    b.extend_from_slice(&e.expires_at_ms.to_be_bytes());
    b.extend_from_slice(&e.message_id);
    b.extend_from_slice(&(e.sender.len() as u32).to_be_bytes());
    b.extend_from_slice(e.sender.as_bytes());
    b.extend_from_slice(&e.ciphertext);
    keys::encode_value(&b)
}

fn decode_envelope(key: &[u8], v: &[u8], conversation_id: &str, seq: u64) -> Result<StoredEnvelope, StoreError> {
    let bad = |r: &str| corrupt_key(key, keys::DecodeError(r.into()));
    let b = keys::decode_value(v).map_err(|e| corrupt_key(key, e))?;
    if b.len() < ENV_BODY_FIXED {
        return Err(bad("envelope value too short"));
    }
    let committed_at_ms = u64::from_be_bytes(b[0..8].try_into().map_err(|_| bad("committed_at"))?);
    let expires_at_ms = u64::from_be_bytes(b[8..16].try_into().map_err(|_| bad("expires_at"))?);
    let message_id: [u8; MESSAGE_ID_LEN] = b[16..32].try_into().map_err(|_| bad("message_id"))?;
    let slen = u32::from_be_bytes(b[32..36].try_into().map_err(|_| bad("sender length"))?) as usize;
    if b.len() < 36 + slen {
        return Err(bad("sender runs past the value"));
    }
    let sender = String::from_utf8(b[36..36 + slen].to_vec()).map_err(|_| bad("sender is not UTF-8"))?;
    Ok(StoredEnvelope {
        envelope: NewEnvelope {
            conversation_id: conversation_id.to_string(),
            message_id,
            sender,
            ciphertext: bytes::Bytes::copy_from_slice(&b[36 + slen..]),
            expires_at_ms,
        },
        seq,
        committed_at_ms,
    })
}

/// The seq of an envelope key.
fn env_seq(k: &[u8]) -> Result<u64, StoreError> {
    match keys::decode_key(k).map_err(|e| corrupt_key(k, e))? {
        keys::Key::Env { seq, .. } => Ok(seq),
        other => Err(corrupt_key(k, keys::DecodeError(format!("expected an envelope key, got {other:?}")))),
    }
}

/// Erased runs of each group and generation, to be zeroed.
type ZeroLists = HashMap<(GroupId, u32), Vec<runs::Stretch>>;
/// Erased runs of one group and generation.
type ZeroList = ((GroupId, u32), Vec<runs::Stretch>);

/// One envelope as a read found it: in an ENV item (`item`) or in a run.
struct Rec {
    seq: u64,
    env: StoredEnvelope,
    item: bool,
}

/// The first seq of a run key.
fn run_first_seq(k: &[u8]) -> Result<u64, StoreError> {
    keys::env_key_seq(k).ok_or_else(|| corrupt_key(k, keys::DecodeError("run key without a seq".into())))
}

/// Two lists in one direction's seq order merged into one, the first `n`; a seq in both (an
/// envelope a checkpoint moved while it was read) once, from `items`.
fn merge_recs(items: Vec<Rec>, runs: Vec<Rec>, forward: bool, n: usize) -> Vec<Rec> {
    let mut out = Vec::with_capacity((items.len() + runs.len()).min(n));
    let (mut a, mut b) = (items.into_iter().peekable(), runs.into_iter().peekable());
    while out.len() < n {
        let pick_a = match (a.peek(), b.peek()) {
            (None, None) => break,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (Some(x), Some(y)) => {
                if x.seq == y.seq {
                    b.next();
                    true
                } else {
                    (x.seq < y.seq) == forward
                }
            }
        };
        let next = if pick_a { a.next() } else { b.next() };
        out.extend(next);
    }
    out
}

/// How long `open` waits for sled's lock on its directory to be released.
const SLED_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Opens sled, waiting up to [`SLED_LOCK_WAIT`] for its directory lock: after the previous
/// `Db` of the same directory is dropped, sled's IO threads can still hold it for a moment
/// (a store reopened at once, as tests and in-process restarts do, then failed with
/// "could not acquire lock"). Another live process holding the lock is still an error,
/// only later.
fn open_sled(path: &Path, cache_capacity: u64) -> Result<sled::Db, StoreError> {
    let deadline = std::time::Instant::now() + SLED_LOCK_WAIT;
    loop {
        match sled::Config::new().path(path).cache_capacity(cache_capacity).flush_every_ms(None).open() {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock") && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return Ok(other?),
        }
    }
}

/// At most this many CONV key hashes in [`ConvFilter`] (of every group's generation: the
/// active one, and during an install the new one too; erased conversations' included; 10-21
/// bytes each, ~72 MiB at the cap and up to ~108 MiB while a set grows past its last
/// doubling): past it the filter is dropped and every lookup goes to the state index, as
/// without it, until the next open.
const MAX_CONV_FILTER: usize = 4 << 20;

/// Which conversation records may exist: per group and generation, the 64-bit hashes (xxh3,
/// seeded per process, so that clients cannot choose ids that collide in a set) of every CONV
/// key put into the overlay, installed from a snapshot or found in the state index at open. A
/// lookup of a key whose hash is not there returns "no record" without asking the index,
/// where a new conversation's lookup searched every memtable and every table's filter (23%
/// of a node's CPU with a million conversations, docs/BENCHMARKS.md, "ninth session"). A
/// superset: a key is added before its record can be read, and never removed (an erased
/// conversation's lookups go to the index, as do those of a hash collision); a generation's
/// set goes when an install switches the group to the next ([`ConvFilter::retain_only`]).
struct ConvFilter {
    sets: Mutex<ConvSets>,
    seed: u64,
    /// [`MAX_CONV_FILTER`], but in tests.
    limit: usize,
}

type KeyHashSet = HashSet<u64, std::hash::BuildHasherDefault<KeyHashHasher>>;

#[derive(Default)]
struct ConvSets {
    /// A set exists for a generation once a key of it was added or an install reset it; a
    /// generation without one has no records (the open adds every group's, an install resets
    /// its new one before it adds).
    groups: HashMap<(GroupId, u32), KeyHashSet>,
    /// Hashes in all sets.
    total: usize,
    /// Past the limit: every key may exist.
    dropped: bool,
}

/// The set's hasher: its values are seeded xxh3 hashes already, so it takes them as they are.
#[derive(Default)]
struct KeyHashHasher(u64);

impl std::hash::Hasher for KeyHashHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only u64s are hashed (`write_u64`); anything else folds in, byte by byte.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

impl ConvFilter {
    fn new(limit: usize) -> Self {
        use std::hash::BuildHasher;
        let seed = std::collections::hash_map::RandomState::new().hash_one(0u64);
        ConvFilter { sets: Mutex::new(ConvSets::default()), seed, limit }
    }

    fn hash(&self, key: &[u8]) -> u64 {
        xxhash_rust::xxh3::xxh3_64_with_seed(key, self.seed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ConvSets> {
        self.sets.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds the CONV keys among `keys` (other kinds are skipped); false once the filter is
    /// dropped.
    fn add<'a>(&self, keys: impl IntoIterator<Item = &'a [u8]>) -> bool {
        // Hashed before the lock is taken.
        let new: Vec<((GroupId, u32), u64)> = keys
            .into_iter()
            .filter(|k| k.get(keys::GEN_PREFIX_LEN) == Some(&keys::KIND_CONV))
            .filter_map(|k| Some((keys::group_and_generation(k)?, self.hash(k))))
            .collect();
        let mut guard = self.lock();
        let sets = &mut *guard;
        if sets.dropped {
            return false;
        }
        for (at, h) in new {
            if sets.groups.entry(at).or_default().insert(h) {
                sets.total += 1;
            }
        }
        if sets.total > self.limit {
            tracing::info!(
                records = sets.total,
                limit = self.limit,
                "more conversation records than the lookup filter holds: dropped, lookups go to the state index"
            );
            *sets = ConvSets { dropped: true, ..ConvSets::default() };
            metrics::gauge!("habar_conv_filter_dropped").set(1.0);
            metrics::gauge!("habar_conv_filter_keys").set(0.0);
            return false;
        }
        metrics::gauge!("habar_conv_filter_keys").set(sets.total as f64);
        true
    }

    /// Starts the generation's set afresh (an install, before it adds the snapshot's keys).
    fn reset(&self, group: GroupId, generation: u32) {
        let mut sets = self.lock();
        if let Some(old) = sets.groups.insert((group, generation), KeyHashSet::default()) {
            sets.total -= old.len();
        }
    }

    /// Forgets every generation of `group` but `keep` (after an install's switch).
    fn retain_only(&self, group: GroupId, keep: u32) {
        let mut sets = self.lock();
        let freed = crate::dedupe_filter::forget_other_generations(&mut sets.groups, group, keep, KeyHashSet::len);
        sets.total -= freed;
        metrics::gauge!("habar_conv_filter_keys").set(sets.total as f64);
    }

    /// Whether a record under `key` (a CONV key) may exist.
    fn may_exist(&self, key: &[u8]) -> bool {
        let h = self.hash(key);
        let Some(at) = keys::group_and_generation(key) else { return true };
        let sets = self.lock();
        if sets.dropped {
            return true;
        }
        // No set: no record of that generation was ever added.
        sets.groups.get(&at).is_some_and(|set| set.contains(&h))
    }
}

type AppliedState = (Option<LogId>, StoredMembership);

/// What one apply call produced: responses, conversations extended (with their new last
/// seq), and how many erasures it applied.
type Applied = (Vec<CommandResponse>, Vec<(String, u64)>, u64);

/// Opens the state index in `<dir>/index.v2` ([`index::DIR`]), first moving the items of
/// each index of an earlier layout found ([`index::LEGACY`], oldest first; fjall fixed their
/// options when it created them) into it: copied and persisted, then that directory is
/// renamed (atomic; the parent fsynced) and deleted. A crash leaves either the old directory
/// whole (the next open copies again: harmless, nothing was applied meanwhile; the index
/// log is applied after every move) or the renamed one, which the next open deletes.
fn open_index(dir: &Path) -> Result<StateIndex, StoreError> {
    // Its directory entry durable before an old index can go.
    let path = dir.join(index::DIR);
    crate::repair::create_dir_durably(&path).map_err(io_err(&path))?;
    let index = StateIndex::open(&path)?;
    for layout in index::LEGACY {
        let legacy = dir.join(layout.dir);
        let moved = dir.join(format!("{}.moved", layout.dir));
        let remove_moved = || -> Result<(), StoreError> {
            if moved.exists() {
                std::fs::remove_dir_all(&moved).map_err(io_err(&moved))?;
            }
            Ok(())
        };
        // One a crash left (also before a rename over it would fail on a non-empty directory).
        remove_moved()?;
        if legacy.exists() {
            let old = StateIndex::open_legacy(&legacy, layout)?;
            let n = index.copy_from(&old)?;
            drop(old);
            crash_point("legacy_index_copied", || {});
            std::fs::rename(&legacy, &moved).map_err(io_err(&legacy))?;
            crate::repair::sync_dir(dir)?;
            crash_point("legacy_index_renamed", || {});
            remove_moved()?;
            tracing::info!(items = n, from = %legacy.display(), "moved an earlier layout's state index");
        }
    }
    Ok(index)
}

/// Crash-test hook: when the environment variable `HABAR_TEST_CRASH_AT` names this point
/// (of a snapshot install, a checkpoint or an open; `point#n`: its `n`th time, counting
/// from 1), the process aborts, after running `first`: what the point's worst case has on
/// disk beyond what the code made durable (an install's points flush sled, so what was
/// written so far is on disk, the worst case for atomicity; the state index's point
/// persists the index, as if the OS had written out its buffers). Read once; unset in
/// production.
fn crash_point(point: &str, first: impl FnOnce()) {
    static WANTED: std::sync::OnceLock<Option<(String, u64)>> = std::sync::OnceLock::new();
    static SEEN: AtomicU64 = AtomicU64::new(0);
    let wanted = WANTED.get_or_init(|| {
        let v = std::env::var("HABAR_TEST_CRASH_AT").ok()?;
        Some(match v.split_once('#') {
            Some((p, n)) => (p.to_string(), n.parse().unwrap_or(1)),
            None => (v, 1),
        })
    });
    if let Some((p, n)) = wanted {
        if p == point && SEEN.fetch_add(1, Ordering::SeqCst) + 1 == *n {
            first();
            std::process::abort();
        }
    }
}

impl StateStore {
    /// Opens (or creates) the store in `dir`. `cache_capacity` is sled's page cache in bytes.
    pub fn open(dir: &Path, cache_capacity: u64) -> Result<Self, StoreError> {
        crate::repair::create_dir_durably(dir).map_err(io_err(dir))?;
        let db = open_sled(&dir.join("db"), cache_capacity)?;
        let sled_files = crate::overlay::SledFiles::open(&dir.join("db")).map_err(io_err(&dir.join("db")))?;
        // What sled wrote before (its files, created now or by a process that crashed)
        // is durable before anything relies on it.
        sled_files.sync().map_err(io_err(&dir.join("db")))?;
        crate::repair::sync_dir(dir)?;
        let data = db.open_tree("sm.v1")?;
        let heads = db.open_tree("heads.v1")?;
        let snap_dir = dir.join("snapshots");
        crate::repair::create_dir_durably(&snap_dir).map_err(io_err(&snap_dir))?;

        // Newest valid snapshot per group; leftovers of crashed builds or transfers go.
        let mut found: HashMap<GroupId, (SnapshotMeta, SnapshotData)> = HashMap::new();
        for ent in fs::read_dir(&snap_dir).map_err(io_err(&snap_dir))? {
            let path = ent.map_err(io_err(&snap_dir))?.path();
            let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
            if ext != "snap" {
                let _ = fs::remove_file(&path);
                continue;
            }
            // Every CRC is checked now: a damaged file must not be offered to a peer later.
            match SnapshotReader::validate(&path) {
                Ok((group, meta)) => {
                    let len = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                    let newer = found.get(&group).is_none_or(|(m, _)| m.last_log_id < meta.last_log_id);
                    if newer {
                        if let Some((_, old)) = found.insert(group, (meta, SnapshotData::new(path.clone(), len))) {
                            let _ = fs::remove_file(old.path());
                        }
                    } else {
                        let _ = fs::remove_file(&path);
                    }
                }
                Err(e @ StoreError::Corrupt { .. }) => {
                    // The state machine (sled) holds the same data; openraft rebuilds a
                    // snapshot from it at start when the log behind it was purged.
                    let moved = crate::repair::quarantine(&dir.join(QUARANTINE_DIR), &path)?;
                    tracing::error!(path = %path.display(), moved = %moved.display(), error = %e,
                        "snapshot file is corrupt: moved aside; a new one is built from the state machine");
                }
                Err(e) => return Err(e),
            }
        }

        let store = StateStore {
            checkpointer: Arc::new(Checkpointer {
                stop: Arc::new(std::sync::atomic::AtomicBool::new(false)),
                thread: Mutex::new(None),
            }),
            inner: Arc::new(Inner {
                _db: db,
                data,
                heads,
                snap_dir,
                groups: Mutex::new(HashMap::new()),
                erasures: watch::channel(0).0,
                found_snapshots: Mutex::new(found),
                slow_apply: crate::slow::SlowLog::default(),
                slow_checkpoint: crate::slow::SlowLog::default(),
                checkpoint_serial: Mutex::new(()),
                overlay: Overlay::durable(sled_files),
                last_checkpoint: Mutex::new(Instant::now()),
                checkpoint_interval_ms: AtomicU64::new(CHECKPOINT_INTERVAL.as_millis() as u64),
                checkpoint_failed: Mutex::new(None),
                env_dir: dir.join("env"),
                segs: Mutex::new(HashMap::new()),
                seg_cfg: SegConfig::default(),
                env_segment_bytes: AtomicU64::new(SegConfig::default().segment_bytes),
                to_zero: Mutex::new(HashMap::new()),
                live: Mutex::new(HashMap::new()),
                dropped: Mutex::new(HashMap::new()),
                index: open_index(dir)?,
                convs: ConvFilter::new(MAX_CONV_FILTER),
                dedupe: crate::dedupe_filter::DedupeFilters::new(),
                index_log_next: AtomicU64::new(0),
                index_logs: ilog::IndexLogFiles::open(dir)?,
                index_logs_applied: Mutex::new(Vec::new()),
                building: Mutex::new(HashMap::new()),
                build_done: std::sync::Condvar::new(),
                revisit: Mutex::new(HashSet::new()),
                build_turn: tokio::sync::Semaphore::new(1),
                view_turn: tokio::sync::Semaphore::new(1),
                build_views_at_runs: AtomicUsize::new(usize::MAX),
                keeping: Mutex::new(Vec::new()),
                scan_pause: Mutex::new(None),
            }),
        };
        store.remove_inactive_generations()?;
        store.recover_index()?;
        // Every conversation record there is (the index holds them all once recovered).
        for (group, generation) in store.heads()? {
            let prefix = keys::kind_prefix(group, generation, keys::KIND_CONV);
            let mut chunk: Vec<sled::IVec> = Vec::with_capacity(4096);
            let mut items = store.inner.index.range(crate::overlay::prefix_range(&prefix), true).peekable();
            while items.peek().is_some() {
                chunk.clear();
                for item in items.by_ref().take(4096) {
                    chunk.push(item?.0);
                }
                if !store.inner.convs.add(chunk.iter().map(|k| k.as_ref())) {
                    break; // dropped: lookups go to the index
                }
            }
            // Here, not at the group's first use: that holds the lock every group's first
            // use takes.
            store.fill_dedupe_filter(group, generation)?;
        }
        let weak = Arc::downgrade(&store.inner);
        let stop = store.checkpointer.stop.clone();
        let thread = std::thread::Builder::new()
            .name("habar-sm-checkpoint".into())
            .spawn(move || checkpoint_loop(weak, stop))
            .map_err(io_err(dir))?;
        *store.checkpointer.thread.lock().unwrap_or_else(|p| p.into_inner()) = Some(thread);
        Ok(store)
    }

    /// Data of a generation other than a group's active one is what a crashed install (or
    /// a crash before the old generation was deleted) left: remove it.
    fn remove_inactive_generations(&self) -> Result<(), StoreError> {
        for (group, active) in self.heads()? {
            self.remove_segments(group, |g| g != active)?;
            let below = keys::gen_prefix(group, 0).to_vec()..keys::gen_prefix(group, active).to_vec();
            self.delete_range(below)?;
            if active < u32::MAX {
                let from = keys::gen_prefix(group, active + 1).to_vec();
                let end = match group.checked_add(1) {
                    Some(g) => keys::group_prefix(g).to_vec(),
                    None => vec![keys::KEY_FORMAT_V1 + 1],
                };
                self.delete_range(from..end)?;
            }
        }
        Ok(())
    }

    /// Every group with data and its active generation.
    fn heads(&self) -> Result<Vec<(GroupId, u32)>, StoreError> {
        let mut out = Vec::new();
        for item in self.inner.heads.iter() {
            let (k, v) = item?;
            let group = u32::from_be_bytes(
                k.as_ref()
                    .try_into()
                    .map_err(|_| corrupt_key(&k, keys::DecodeError("head key is not a group id".into())))?,
            );
            out.push((group, decode_u64(&k, &v)? as u32));
        }
        Ok(out)
    }

    /// At open: brings the state index up to sled's state. Moves the items of the index's
    /// kinds that a store of an older layout kept in sled into the index (all of them before
    /// 2026-12-04; CONV and RUN before 2026-12-05), then applies again every
    /// index log a checkpoint left in sled (its writes may not have reached the index, or
    /// not durably); persists the index, then deletes both from sled.
    fn recover_index(&self) -> Result<(), StoreError> {
        let inner = &self.inner;
        let mut logs = Vec::new();
        for (group, generation) in self.heads()? {
            // Older layouts: in chunks (index first, durably; then sled's copies go). Before
            // the logs: a log is newer than any item an older layout left.
            for kind in index::INDEX_KINDS {
                loop {
                    let chunk: Vec<(sled::IVec, sled::IVec)> = inner
                        .data
                        .scan_prefix(keys::kind_prefix(group, generation, kind))
                        .take(INSTALL_BATCH_RECORDS)
                        .collect::<Result<_, _>>()?;
                    if chunk.is_empty() {
                        break;
                    }
                    inner.index.apply(chunk.iter().map(|(k, v)| (k.as_ref(), Some(v.as_ref()))))?;
                    inner.index.persist()?;
                    let mut batch = sled::Batch::default();
                    for (k, _) in &chunk {
                        batch.remove(k);
                    }
                    crash_point("index_moved", || {});
                    inner.overlay.exclusive(|| inner.data.apply_batch(batch))?;
                    inner.overlay.flush(&inner.data)?;
                    tracing::info!(group, kind, moved = chunk.len(), "moved items out of sled into the state index");
                }
            }
            for item in inner.data.scan_prefix(keys::kind_prefix(group, generation, keys::KIND_INDEX_LOG)) {
                let (k, v) = item?;
                let body = keys::decode_value(&v).map_err(|e| corrupt_key(&k, e))?;
                let writes = if body.first() == Some(&ilog::POINTER_FORMAT) {
                    let Ok(keys::Key::IndexLog { number }) = keys::decode_key(&k) else {
                        return Err(corrupt_key(&k, keys::DecodeError("not an index log key".into())));
                    };
                    inner.index_logs.read(group, generation, number, body)?
                } else {
                    // A store written before the index log files: the log inline.
                    index::decode_log(&v).map_err(|e| corrupt_key(&k, e))?
                };
                if writes.iter().any(|(w, _)| w[..keys::GEN_PREFIX_LEN] != k[..keys::GEN_PREFIX_LEN]) {
                    return Err(corrupt_key(&k, keys::DecodeError("index log holds another group's key".into())));
                }
                inner.index.apply(writes.iter().map(|(k, v)| (k.as_slice(), v.as_deref())))?;
                logs.push(k);
            }
        }
        if logs.is_empty() {
            return Ok(());
        }
        inner.index.persist()?;
        crash_point("index_recovered", || {});
        let mut batch = sled::Batch::default();
        for k in &logs {
            batch.remove(k);
        }
        inner.overlay.exclusive(|| inner.data.apply_batch(batch))?;
        inner.overlay.flush(&inner.data)?;
        Ok(())
    }

    /// Deletes the envelope segments of `group`'s generations that `which` names (after
    /// the generation's sled items are gone, or with them: nothing reads them any more).
    fn remove_segments(&self, group: GroupId, which: impl Fn(u32) -> bool) -> Result<(), StoreError> {
        let dir = &self.inner.env_dir;
        let entries = match fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err(dir)(e)),
        };
        let prefix = format!("g{group}-gen");
        let mut removed = false;
        for ent in entries {
            let path = ent.map_err(io_err(dir))?.path();
            let generation = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix(&prefix))
                .and_then(|g| g.parse::<u32>().ok());
            let Some(generation) = generation else { continue };
            if which(generation) {
                let at = (group, generation);
                self.inner.segs.lock().unwrap_or_else(|p| p.into_inner()).remove(&at);
                self.inner.live.lock().unwrap_or_else(|p| p.into_inner()).remove(&at);
                self.inner.to_zero.lock().unwrap_or_else(|p| p.into_inner()).remove(&at);
                self.inner.dropped.lock().unwrap_or_else(|p| p.into_inner()).remove(&at);
                self.inner.revisit.lock().unwrap_or_else(|p| p.into_inner()).remove(&at);
                fs::remove_dir_all(&path).map_err(io_err(&path))?;
                removed = true;
            }
        }
        if removed {
            crate::repair::sync_dir(dir)?;
        }
        Ok(())
    }

    fn delete_range(&self, range: std::ops::Range<Vec<u8>>) -> Result<usize, StoreError> {
        // Only ever a generation no longer (or not yet) active: nothing replays into it.
        let mut n = self.inner.index.delete_range(range.clone())?;
        loop {
            // Under the overlay's gate: no merged read is in progress while sled changes.
            let k = self.inner.overlay.exclusive(|| -> Result<usize, StoreError> {
                let mut batch = sled::Batch::default();
                let mut k = 0;
                for item in self.inner.data.range(range.clone()).take(INSTALL_BATCH_RECORDS) {
                    let (key, _) = item?;
                    batch.remove(key);
                    k += 1;
                }
                self.inner.data.apply_batch(batch)?;
                Ok(k)
            })?;
            if k == 0 {
                return Ok(n);
            }
            n += k;
        }
    }

    fn rt(&self, group: GroupId) -> Result<Arc<GroupRt>, StoreError> {
        let mut groups = self.inner.groups.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(rt) = groups.get(&group) {
            return Ok(rt.clone());
        }
        let hk = group.to_be_bytes();
        let generation = match self.inner.heads.get(hk)? {
            Some(v) => decode_u64(&hk, &v)? as u32,
            None => {
                self.inner.heads.insert(hk, keys::encode_value(&1u64.to_be_bytes()))?;
                1
            }
        };
        let applied = self.applied_state_at(group, generation)?.0.map_or(0, |l| l.index);
        if !self.inner.dedupe.has(group, generation) {
            // A group created just now (the open filled every other).
            self.fill_dedupe_filter(group, generation)?;
        }
        let current = self.inner.found_snapshots.lock().unwrap_or_else(|p| p.into_inner()).remove(&group);
        // Found at open, which checked every CRC of it.
        let checked = current.as_ref().and_then(|(_, d)| checked_now(d.path()));
        let rt = Arc::new(GroupRt {
            generation: AtomicU32::new(generation),
            applied: watch::channel(applied).0,
            changes: broadcast::channel(CHANGE_FEED_CAPACITY).0,
            current: Mutex::new(current),
            checked: Mutex::new(checked),
        });
        groups.insert(group, rt.clone());
        Ok(rt)
    }

    /// Files every DEDUPE item of the group's generation in the state index (all of them
    /// there: the overlay holds none of a group before its first apply) under a fresh filter:
    /// at open, for each group there is, and at the first use of a group created since.
    fn fill_dedupe_filter(&self, group: GroupId, generation: u32) -> Result<(), StoreError> {
        let dedupe = &self.inner.dedupe;
        dedupe.reset(group, generation);
        let prefix = keys::kind_prefix(group, generation, keys::KIND_DEDUPE);
        let mut chunk: Vec<(u64, u64)> = Vec::with_capacity(4096);
        let mut items = self.inner.index.range(crate::overlay::prefix_range(&prefix), true).peekable();
        while items.peek().is_some() {
            chunk.clear();
            for item in items.by_ref().take(4096) {
                let (k, v) = item?;
                chunk.push((dedupe.hash(&k), decode_pair(&k, &v)?.1));
            }
            dedupe.add(group, generation, chunk.iter().copied());
        }
        Ok(())
    }

    /// What the lookup filters hold (tests): conversation key hashes of all groups, and the
    /// generations of `group` that have a dedupe filter.
    #[doc(hidden)]
    pub fn lookup_filters_held(&self, group: GroupId) -> (usize, usize) {
        (self.inner.convs.lock().total, self.inner.dedupe.generations(group))
    }

    /// Smaller dedupe filters (tests: a few message ids then exercise their chains of blooms,
    /// drops and cap), filled again from the index with them. Before any apply.
    #[doc(hidden)]
    pub fn set_dedupe_filter_limits(&self, first_keys: usize, max_bytes: usize) -> Result<(), StoreError> {
        self.inner.dedupe.set_limits(first_keys, max_bytes);
        self.inner.dedupe.clear();
        for (group, generation) in self.heads()? {
            self.fill_dedupe_filter(group, generation)?;
        }
        Ok(())
    }

    fn applied_state_at(&self, group: GroupId, generation: u32) -> Result<AppliedState, StoreError> {
        let k = keys::meta_key(group, generation);
        Self::decode_applied_state(&k, self.inner.get(&k)?)
    }

    fn decode_applied_state(k: &[u8], v: Option<sled::IVec>) -> Result<AppliedState, StoreError> {
        match v {
            None => Ok((None, StoredMembership::default())),
            Some(v) => {
                let body = keys::decode_value(&v).map_err(|e| corrupt_key(k, e))?;
                postcard::from_bytes(body).map_err(|e| corrupt_key(k, keys::DecodeError(format!("applied state: {e}"))))
            }
        }
    }

    /// A conversation's record under `generation`, if it has one.
    fn conv_meta_at(&self, group: GroupId, generation: u32, conv: &[u8]) -> Result<Option<ConvMeta>, StoreError> {
        let k = keys::conv_key(group, generation, conv);
        if !self.inner.convs.may_exist(&k) {
            return Ok(None);
        }
        match self.inner.get(&k)? {
            Some(v) => Ok(Some(ConvMeta::decode(&k, &v)?)),
            None => Ok(None),
        }
    }

    /// A conversation's last seq under `generation` (0 if it has none).
    fn last_seq_at(&self, group: GroupId, generation: u32, conv: &[u8]) -> Result<u64, StoreError> {
        Ok(self.conv_meta_at(group, generation, conv)?.map_or(0, |m| m.last_seq))
    }

    /// Up to `n` envelopes of a conversation that a read can find (seq at least
    /// `meta.removed_below`), from `from` on in the read's direction (`from` included),
    /// merged from ENV items (sled and the overlay) and runs, in seq order.
    ///
    /// The ENV items are read first and the runs after: a checkpoint that lands between
    /// the two moves envelopes from the first into the second, so this order finds them
    /// (twice, merged), where the other could miss them.
    fn gather(
        &self,
        (group, generation): (GroupId, u32),
        conversation_id: &str,
        meta: &ConvMeta,
        from: u64,
        forward: bool,
        n: usize,
    ) -> Result<Vec<Rec>, StoreError> {
        let conv = conversation_id.as_bytes();
        let lo = meta.first_kept();
        if n == 0 || (forward && from == u64::MAX) || (!forward && from < lo) {
            return Ok(Vec::new());
        }
        let data = &*self.inner;
        let (start, end) = if forward { (from.max(lo), u64::MAX) } else { (lo, from) };
        let items: Vec<Rec> = {
            let range = keys::env_key(group, generation, conv, start)..=keys::env_key(group, generation, conv, end);
            let iter = if forward { data.range(range) } else { data.range_rev(range) };
            let mut out = Vec::new();
            for item in iter.take(n) {
                let (k, v) = item?;
                let seq = env_seq(&k)?;
                out.push(Rec { seq, env: decode_envelope(&k, &v, conversation_id, seq)?, item: true });
            }
            out
        };
        // Past this seq (in the read's direction) a run cannot contribute to the first `n`.
        let bound = if items.len() >= n { items.last().map(|r| r.seq) } else { None };
        let beyond = |seq: u64| bound.is_some_and(|b| if forward { seq > b } else { seq < b });
        let mut in_runs: Vec<Rec> = Vec::new();
        let take_run = |k: &[u8], v: &[u8], first: u64, in_runs: &mut Vec<Rec>| -> Result<bool, StoreError> {
            let r = RunRef::decode(v).map_err(|e| corrupt_key(k, e))?;
            let last = r.last_seq(first);
            if forward && last < start || !forward && first > end {
                return Ok(true);
            }
            if forward && beyond(first) || !forward && (beyond(last) || last < lo) {
                return Ok(false);
            }
            let recs = self.read_run(group, generation, k, first, &r)?;
            let keep = recs.into_iter().filter(|(seq, _)| *seq >= start && *seq <= end);
            let mut keep: Vec<(u64, Vec<u8>)> = keep.collect();
            if !forward {
                keep.reverse();
            }
            for (seq, v) in keep {
                if in_runs.len() >= n {
                    return Ok(false);
                }
                in_runs.push(Rec { seq, env: decode_envelope(k, &v, conversation_id, seq)?, item: false });
            }
            Ok(in_runs.len() < n)
        };
        let run_start = keys::run_key(group, generation, conv, 0);
        if forward {
            // The run that starts at or before `start` may hold it.
            // Its run is read while the range (and so the gate) lives: a checkpoint that
            // deletes the run's item, then zeroes it, cannot land in between.
            let mut before = data.range_rev(run_start.clone()..=keys::run_key(group, generation, conv, start));
            let mut more = true;
            if let Some(item) = before.next() {
                let (k, v) = item?;
                more = take_run(&k, &v, run_first_seq(&k)?, &mut in_runs)?;
            }
            drop(before);
            if more && start < u64::MAX {
                let after = keys::run_key(group, generation, conv, start + 1)
                    ..=keys::run_key(group, generation, conv, u64::MAX);
                for item in data.range(after) {
                    let (k, v) = item?;
                    if !take_run(&k, &v, run_first_seq(&k)?, &mut in_runs)? {
                        break;
                    }
                }
            }
        } else {
            for item in data.range_rev(run_start..=keys::run_key(group, generation, conv, end)) {
                let (k, v) = item?;
                if !take_run(&k, &v, run_first_seq(&k)?, &mut in_runs)? {
                    break;
                }
            }
        }
        Ok(merge_recs(items, in_runs, forward, n))
    }

    /// The lowest seq a read can find (0: none), from the items' and runs' keys alone (a
    /// run's seqs are dense: its first one at or above `removed_below` is readable).
    fn first_seq(&self, (group, generation): (GroupId, u32), conv: &[u8], meta: &ConvMeta) -> Result<u64, StoreError> {
        let lo = meta.first_kept();
        let data = &*self.inner;
        let end = keys::env_key(group, generation, conv, u64::MAX);
        let item = match data.range(keys::env_key(group, generation, conv, lo)..=end).next() {
            Some(kv) => Some(env_seq(&kv?.0)?),
            None => None,
        };
        // The last run that starts at or below `lo` may still hold it; else the next one.
        let mut in_runs = None;
        let below = data
            .range_rev(keys::run_key(group, generation, conv, 0)..=keys::run_key(group, generation, conv, lo))
            .next();
        if let Some(kv) = below {
            let (k, v) = kv?;
            let r = RunRef::decode(&v).map_err(|e| corrupt_key(&k, e))?;
            if r.last_seq(run_first_seq(&k)?) >= lo {
                in_runs = Some(lo);
            }
        }
        if in_runs.is_none() && lo < u64::MAX {
            let after =
                keys::run_key(group, generation, conv, lo + 1)..=keys::run_key(group, generation, conv, u64::MAX);
            if let Some(kv) = data.range(after).next() {
                in_runs = Some(run_first_seq(&kv?.0)?);
            }
        }
        Ok(match (item, in_runs) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b).unwrap_or(0),
        })
    }

    /// A run's records as `(seq, ENV value)`, checked; none if the run was erased.
    fn read_run(
        &self,
        group: GroupId,
        generation: u32,
        key: &[u8],
        first: u64,
        r: &RunRef,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let segs = self.inner.segments(group, generation)?;
        let bytes = segs.read_bytes(r.segment, r.offset, r.bytes as usize)?;
        let corrupt = |reason: String| StoreError::Corrupt {
            what: format!("{} (run {} of segment {})", segs.dir().display(), hex(key), r.segment),
            offset: r.offset,
            reason,
        };
        match runs::parse_run(&bytes, first, r.count, self.inner.seg_cfg.max_record_bytes).map_err(corrupt)? {
            Some(recs) => Ok(recs.into_iter().map(|(seq, v)| (seq, v.to_vec())).collect()),
            None => Ok(Vec::new()),
        }
    }

    /// The state machine of one group.
    pub fn group(&self, group: GroupId) -> Result<GroupStateMachine, StoreError> {
        let rt = self.rt(group)?;
        Ok(GroupStateMachine { store: self.clone(), group, rt })
    }

    /// Envelopes of a conversation with `seq >= from_seq`, ascending, at most `limit`,
    /// as stored (expired ones included): for checks and tools. Clients use `read_page`.
    pub fn read(
        &self,
        group: GroupId,
        conversation_id: &str,
        from_seq: u64,
        limit: usize,
    ) -> Result<Vec<StoredEnvelope>, StoreError> {
        self.at_stable_generation(group, |generation| {
            let meta = self.conv_meta_at(group, generation, conversation_id.as_bytes())?.unwrap_or_default();
            let recs = self.gather((group, generation), conversation_id, &meta, from_seq, true, limit)?;
            Ok(recs.into_iter().map(|r| r.env).collect())
        })
    }

    /// One page of a conversation as a client sees it at `now_ms`: never an expired
    /// envelope; the seqs it skips (removed or expired) reported as ranges, so that
    /// envelopes and ranges cover the span read without holes.
    /// Forward reads start at `start` (0 = 1); backward reads take seqs below `start`
    /// (0 = from the newest), newest first.
    pub fn read_page(
        &self,
        group: GroupId,
        conversation_id: &str,
        direction: Direction,
        start: u64,
        limit: usize,
        now_ms: u64,
    ) -> Result<ReadPage, StoreError> {
        self.at_stable_generation(group, |generation| {
            let meta = self.conv_meta_at(group, generation, conversation_id.as_bytes())?.unwrap_or_default();
            let last_seq = meta.last_seq;
            let first_seq = self.first_seq((group, generation), conversation_id.as_bytes(), &meta)?;
            let mut page = ReadPage { last_seq, first_seq, ..ReadPage::default() };
            let forward = direction == Direction::Forward;
            // `expected`: the next seq this read accounts for, in its direction.
            let mut expected = if forward {
                start.max(1)
            } else {
                let below = if start == 0 || start > last_seq { last_seq.saturating_add(1) } else { start };
                if below <= 1 {
                    page.end = true;
                    page.next = below;
                    return Ok(page);
                }
                below - 1
            };
            // Read in chunks: a page stops at `limit` envelopes or READ_SKIP_BUDGET skipped.
            let chunk = limit.saturating_add(1).clamp(1, 1024);
            let mut skipped = 0usize;
            let mut exhausted = true;
            let mut cursor = expected;
            'read: loop {
                let recs = self.gather((group, generation), conversation_id, &meta, cursor, forward, chunk)?;
                let got = recs.len();
                for r in recs {
                    if page.envelopes.len() >= limit || skipped >= READ_SKIP_BUDGET {
                        exhausted = false;
                        break 'read;
                    }
                    let seq = r.seq;
                    if forward {
                        if seq > last_seq {
                            break 'read;
                        }
                        push_range(&mut page.removed, expected, seq - 1, true);
                    } else {
                        push_range(&mut page.removed, seq + 1, expected, false);
                    }
                    if is_expired(&r.env.envelope, now_ms) {
                        push_range(&mut page.removed, seq, seq, forward);
                        skipped += 1;
                    } else {
                        page.envelopes.push(r.env);
                    }
                    expected = if forward { seq + 1 } else { seq - 1 };
                }
                if got < chunk {
                    break;
                }
                if !forward && expected == 0 {
                    break;
                }
                cursor = expected;
            }
            if exhausted {
                // Nothing more is held in this direction: the rest of the span was removed.
                if forward {
                    push_range(&mut page.removed, expected, last_seq, true);
                    expected = expected.max(last_seq + 1);
                } else {
                    push_range(&mut page.removed, 1, expected, false);
                    expected = 0;
                }
            }
            if forward {
                page.end = expected > last_seq;
                page.next = expected;
            } else {
                page.end = expected == 0;
                page.next = expected + 1;
            }
            Ok(page)
        })
    }

    /// The last log index and the size in bytes of the group's current snapshot, if it has
    /// one (a group not opened yet has none here).
    pub fn current_snapshot_size(&self, group: GroupId) -> Option<(u64, u64)> {
        let rt = self.inner.groups.lock().unwrap_or_else(|p| p.into_inner()).get(&group).cloned()?;
        let (meta, data) = rt.current_snapshot()?;
        Some((meta.last_log_id.map_or(0, |l| l.index), data.len()))
    }

    /// The conversation's last seq (0 if it has none).
    pub fn last_seq(&self, group: GroupId, conversation_id: &str) -> Result<u64, StoreError> {
        self.at_stable_generation(group, |generation| self.last_seq_at(group, generation, conversation_id.as_bytes()))
    }

    /// A conversation's cursors in reader order after `after` (all readers, or only
    /// `reader`), at most `limit`; `true` when no reader follows; and its last seq.
    pub fn cursors(
        &self,
        group: GroupId,
        conversation_id: &str,
        reader: Option<&str>,
        after: &str,
        limit: usize,
    ) -> Result<(Vec<CursorRecord>, bool, u64), StoreError> {
        self.at_stable_generation(group, |generation| {
            let conv = conversation_id.as_bytes();
            let data = &*self.inner;
            let last_seq = self.last_seq_at(group, generation, conv)?;
            if let Some(r) = reader {
                let k = keys::cursor_key(group, generation, conv, r.as_bytes());
                let (seq, updated_at_ms) = match data.get(&k)? {
                    Some(v) => decode_pair(&k, &v)?,
                    None => (0, 0),
                };
                return Ok((vec![CursorRecord { reader_id: r.to_string(), seq, updated_at_ms }], true, last_seq));
            }
            let prefix = keys::conv_prefix(group, generation, keys::KIND_CURSOR, conv);
            let mut out = Vec::with_capacity(limit.min(1024));
            let mut end = true;
            for item in data.scan_prefix(&prefix) {
                let (k, v) = item?;
                let reader_id = match keys::decode_key(&k) {
                    Ok(keys::Key::Cursor { reader, .. }) => reader,
                    Ok(other) => return Err(corrupt_key(&k, keys::DecodeError(format!("not a cursor: {other:?}")))),
                    Err(e) => return Err(corrupt_key(&k, e)),
                };
                if !after.is_empty() && reader_id.as_slice() <= after.as_bytes() {
                    continue;
                }
                if out.len() >= limit {
                    end = false;
                    break;
                }
                let (seq, updated_at_ms) = decode_pair(&k, &v)?;
                let reader_id = String::from_utf8(reader_id)
                    .map_err(|_| corrupt_key(&k, keys::DecodeError("reader id is not UTF-8".into())))?;
                out.push(CursorRecord { reader_id, seq, updated_at_ms });
            }
            Ok((out, end, last_seq))
        })
    }

    /// Whether a `Maintain` at `now_ms` would remove anything (the leader asks before it
    /// proposes one, so an idle cluster writes no housekeeping entries).
    pub fn needs_maintenance(&self, group: GroupId, now_ms: u64, dedupe_window_ms: u64) -> Result<bool, StoreError> {
        self.at_stable_generation(group, |generation| {
            let data = &*self.inner;
            let first_time = |kind: u8| -> Result<Option<u64>, StoreError> {
                let prefix = keys::kind_prefix(group, generation, kind);
                match data.scan_prefix(&prefix).next() {
                    Some(item) => {
                        let (k, _) = item?;
                        match keys::decode_key(&k) {
                            Ok(keys::Key::Expiry { at_ms, .. }) | Ok(keys::Key::DedupeTime { at_ms, .. }) => {
                                Ok(Some(at_ms))
                            }
                            Ok(other) => Err(corrupt_key(&k, keys::DecodeError(format!("unexpected key {other:?}")))),
                            Err(e) => Err(corrupt_key(&k, e)),
                        }
                    }
                    None => Ok(None),
                }
            };
            if first_time(keys::KIND_EXPIRY)?.is_some_and(|t| t <= now_ms) {
                return Ok(true);
            }
            if first_time(keys::KIND_DEDUPE_TIME)?.is_some_and(|t| t.saturating_add(dedupe_window_ms) < now_ms) {
                return Ok(true);
            }
            // Collected first: a merged read must end before the next one starts.
            let mut retained = Vec::new();
            for item in data.scan_prefix(keys::kind_prefix(group, generation, keys::KIND_RETENTION)) {
                let (k, _) = item?;
                match keys::decode_key(&k) {
                    Ok(keys::Key::Retention { conversation }) => retained.push(conversation),
                    _ => return Err(corrupt_key(&k, keys::DecodeError("bad retention key".into()))),
                }
            }
            for conv in retained {
                let Some(meta) = self.conv_meta_at(group, generation, &conv)? else { continue };
                // Something a count retention at append left below `removed_below` (a run
                // wholly below it, or an item) is housekeeping to do as well.
                let below = |kind: u8| -> Result<bool, StoreError> {
                    match data.scan_prefix(keys::conv_prefix(group, generation, kind, &conv)).next() {
                        Some(item) => {
                            let (k, v) = item?;
                            let first = run_first_seq(&k)?;
                            let last = match kind {
                                keys::KIND_RUN => RunRef::decode(&v).map_err(|e| corrupt_key(&k, e))?.last_seq(first),
                                _ => first,
                            };
                            Ok(last < meta.removed_below)
                        }
                        None => Ok(false),
                    }
                };
                if below(keys::KIND_RUN)? || below(keys::KIND_ENV)? {
                    return Ok(true);
                }
                let conv = String::from_utf8_lossy(&conv);
                if let Some(r) = self.gather((group, generation), &conv, &meta, meta.first_kept(), true, 1)?.first() {
                    if meta.retention_removes(r.seq, r.env.committed_at_ms, now_ms) {
                        return Ok(true);
                    }
                }
            }
            Ok(false)
        })
    }

    /// The group's last applied log id (durable once a checkpoint has written it and sled is
    /// flushed).
    pub fn applied(&self, group: GroupId) -> Result<Option<LogId>, StoreError> {
        self.at_stable_generation(group, |generation| Ok(self.applied_state_at(group, generation)?.0))
    }

    /// Runs a read against the group's active generation, again if a snapshot install
    /// switched generations meanwhile: the old generation is deleted right after the
    /// switch, so a read that overlapped the deletion could miss keys (a gap in a log).
    /// Installs are rare, so a bounded number of retries is plenty.
    fn at_stable_generation<T>(
        &self,
        group: GroupId,
        read: impl Fn(u32) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        const TRIES: usize = 8;
        let rt = self.rt(group)?;
        let mut generation = rt.generation.load(Ordering::Acquire);
        for _ in 0..TRIES {
            let out = read(generation);
            let now = rt.generation.load(Ordering::Acquire);
            if now == generation {
                return out;
            }
            generation = now;
        }
        Err(StoreError::Busy(format!("group {group} switched snapshot generations {TRIES} times during one read")))
    }

    /// Moves to the group's applied log index after each apply and snapshot install.
    pub fn watch_applied(&self, group: GroupId) -> Result<watch::Receiver<u64>, StoreError> {
        Ok(self.rt(group)?.applied.subscribe())
    }

    /// The group's change feed: which conversations each apply extended.
    pub fn subscribe_changes(&self, group: GroupId) -> Result<broadcast::Receiver<Change>, StoreError> {
        Ok(self.rt(group)?.changes.subscribe())
    }

    /// Moves each time a `DeleteConversation` was applied on this node (any group).
    pub fn watch_erasures(&self) -> watch::Receiver<u64> {
        self.inner.erasures.subscribe()
    }

    /// An apply call slower than this is logged as a warning (at most once a second); zero:
    /// never. Default `slow::DEFAULT_SLOW_WARN`.
    pub fn set_slow_warn(&self, threshold: Duration) {
        self.inner.slow_apply.set_threshold(threshold);
        self.inner.slow_checkpoint.set_threshold(threshold);
    }

    /// How old the last checkpoint may get while anything is pending (default
    /// [`CHECKPOINT_INTERVAL`]); the size trigger and the back-pressure stay. Tests set it
    /// long to decide themselves where checkpoints fall.
    pub fn set_checkpoint_interval(&self, interval: Duration) {
        let ms = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX);
        self.inner.checkpoint_interval_ms.store(ms, Ordering::Relaxed);
    }

    /// The size at which envelope segments opened from now on roll (default 64 MiB): tests
    /// set it small to see segments come and go.
    pub fn set_env_segment_bytes(&self, bytes: u64) {
        self.inner.env_segment_bytes.store(bytes, Ordering::Relaxed);
    }

    /// Writes a checkpoint now (everything applied so far goes to sled, not fsynced).
    pub fn checkpoint(&self) -> Result<(), StoreError> {
        self.inner.checkpoint(false)
    }

    /// Writes a checkpoint (everything applied so far) and flushes sled: what was applied is
    /// durable in the state machine when this returns.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.inner.checkpoint(true)?;
        self.inner.overlay.flush(&self.inner.data)?;
        Ok(())
    }

    /// For tests: holds the node's turn to copy a snapshot build's runs (the second phase
    /// of its second half), so that a build started meanwhile waits for it.
    #[doc(hidden)]
    pub async fn hold_build_turn_for_tests(&self) -> tokio::sync::SemaphorePermit<'_> {
        self.inner.build_turn.acquire().await.expect("the build turn semaphore is never closed")
    }

    /// For tests: how many views of the state index were open when the last snapshot build
    /// began copying its runs' envelopes (`usize::MAX`: no build yet).
    #[doc(hidden)]
    pub fn build_views_at_runs_for_tests(&self) -> usize {
        self.inner.build_views_at_runs.load(Ordering::Acquire)
    }

    /// For tests: the next snapshot build's scan of its dedupe times stops after `chunks`
    /// chunks (of `DEDUPE_TIMES_CHUNK` items; outside the overlay's gate), says so on the
    /// first channel, and goes on once the second one gets a message (or is dropped).
    #[doc(hidden)]
    pub fn pause_dedupe_scan_for_tests(
        &self,
        chunks: usize,
    ) -> (std::sync::mpsc::Receiver<()>, std::sync::mpsc::Sender<()>) {
        let (reached, reached_rx) = std::sync::mpsc::channel();
        let (resume_tx, resume) = std::sync::mpsc::channel();
        *self.inner.scan_pause.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(ScanPause { after_chunks: chunks, reached, resume });
        (reached_rx, resume_tx)
    }

    /// How many views of the state index are open now: for tests.
    #[doc(hidden)]
    pub fn index_views_open_for_tests(&self) -> usize {
        self.inner.index.views_open()
    }

    /// Items a build's scan of its dedupe times reads from sled at a time: for tests.
    #[doc(hidden)]
    pub const DEDUPE_TIMES_CHUNK: usize = DEDUPE_TIMES_CHUNK;

    /// A writer for a snapshot streamed in from a peer.
    pub fn snapshot_writer(&self, group: GroupId) -> Result<SnapshotWriter, StoreError> {
        SnapshotWriter::create(&self.inner.snap_dir, group)
    }

    /// Raw `(key, value)` pairs of a group's active data, for comparing replicas.
    pub fn dump_group(&self, group: GroupId) -> Result<Vec<crate::snapshot::Record>, StoreError> {
        self.at_stable_generation(group, |generation| {
            let mut out = Vec::new();
            let items = self.inner.scan_prefix(keys::gen_prefix(group, generation));
            self.export(group, generation, items, |k, v| {
                out.push((k.to_vec(), v.to_vec()));
                Ok(())
            })?;
            // Runs come out where their items are; a replica that holds an envelope as an
            // item must compare equal.
            out.sort();
            // A checkpoint that lands during the scan can show an envelope twice: as an item
            // of its frozen layer and in the run it moved to (the same key and value; keys
            // are otherwise unique).
            out.dedup();
            Ok(out)
        })
    }

    /// A group's state as every replica holds it, record by record (key without the
    /// generation prefix, value), from `items` (the generation's sled items, merged with the
    /// overlay or not): this node's own items (runs, segment marks) are left out, each run
    /// comes out as ENV records (out of key order: where its item was), and what a read can no longer find (below a
    /// conversation's `removed_below`) is left out. What snapshots carry and replicas are
    /// compared by.
    fn export(
        &self,
        group: GroupId,
        generation: u32,
        items: impl Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>,
        mut emit: impl FnMut(&[u8], &[u8]) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut ex = Exporter::new(self, group, generation, None);
        for item in items {
            let (k, v) = item?;
            ex.item(&k, &v, &mut emit)?;
        }
        Ok(())
    }

    /// How many items of `kind` (`keys::KIND_*`) sled holds for the group's active
    /// generation (what checkpoints wrote; the overlay not included): for tests and checks.
    pub fn sled_items_of_kind(&self, group: GroupId, kind: u8) -> Result<usize, StoreError> {
        let generation = self.rt(group)?.generation.load(Ordering::Acquire);
        Ok(self.inner.data.scan_prefix(keys::kind_prefix(group, generation, kind)).count())
    }

    /// How many items of `kind` checkpoints wrote for the group's active generation, in sled
    /// or the state index, whichever holds the kind (the overlay not included): for tests
    /// and checks.
    pub fn stored_items_of_kind(&self, group: GroupId, kind: u8) -> Result<usize, StoreError> {
        let generation = self.rt(group)?.generation.load(Ordering::Acquire);
        Ok(self.inner.base(crate::overlay::prefix_range(&keys::kind_prefix(group, generation, kind)), true).count())
    }

    /// For upgrade tests: moves every item of the state index of the kinds `kinds` into
    /// sled, where an older layout kept them (flushed). Not for production use.
    #[doc(hidden)]
    pub fn move_index_into_sled_for_tests(&self, kinds: &[u8]) -> Result<usize, StoreError> {
        self.flush()?;
        let all = keys::KEY_FORMAT_V1;
        let pairs: Vec<(sled::IVec, sled::IVec)> = self
            .inner
            .index
            .range(vec![all]..vec![all + 1], true)
            .filter(|kv| {
                kv.as_ref().map_or(true, |(k, _)| k.get(keys::GEN_PREFIX_LEN).is_some_and(|x| kinds.contains(x)))
            })
            .collect::<Result<_, _>>()?;
        let mut batch = sled::Batch::default();
        for (k, v) in &pairs {
            batch.insert(k, v);
        }
        self.inner.overlay.exclusive(|| self.inner.data.apply_batch(batch))?;
        self.inner.overlay.flush(&self.inner.data)?;
        self.inner.index.apply(pairs.iter().map(|(k, _)| (k.as_ref(), None)))?;
        self.inner.index.persist()?;
        // And no index log is left (an older store had none): the open must find the items
        // only where the older layout kept them.
        let mut batch = sled::Batch::default();
        for (group, generation) in self.heads()? {
            for item in self.inner.data.scan_prefix(keys::kind_prefix(group, generation, keys::KIND_INDEX_LOG)) {
                batch.remove(item?.0);
            }
        }
        self.inner.overlay.exclusive(|| self.inner.data.apply_batch(batch))?;
        self.inner.overlay.flush(&self.inner.data)?;
        self.inner.index_logs_applied.lock().unwrap_or_else(|p| p.into_inner()).clear();
        Ok(pairs.len())
    }

    /// For upgrade tests: writes an index log item of `writes` into sled (flushed) without
    /// applying them to the index, as a checkpoint that crashed before its index apply
    /// leaves one. Not for production use.
    #[doc(hidden)]
    pub fn write_index_log_for_tests(&self, group: GroupId, writes: &[index::Write]) -> Result<(), StoreError> {
        let generation = self.rt(group)?.generation.load(Ordering::Acquire);
        // The inline form of stores written before the index log files (`ilog.rs`).
        let (number, log) = self.inner.next_index_log(writes.iter().map(|(k, v)| (k, v)))?;
        let key = keys::index_log_key(group, generation, number);
        let mut batch = sled::Batch::default();
        batch.insert(key, log);
        self.inner.overlay.exclusive(|| self.inner.data.apply_batch(batch))?;
        self.inner.overlay.flush(&self.inner.data)?;
        Ok(())
    }

    /// Keys of the group in every generation (active or garbage): for tests and checks.
    pub fn raw_key_count(&self, group: GroupId) -> usize {
        self.inner.data.scan_prefix(keys::group_prefix(group)).count()
            + self.inner.index.range(crate::overlay::prefix_range(&keys::group_prefix(group)), true).count()
    }

    /// Applies a batch of entries of one group. Appends and cursor commits go into one
    /// atomic sled batch together with the applied log id; the rarer commands that scan
    /// (maintenance, erasure, retention) are each applied in a batch of their own, after
    /// what precedes them is written, so every read they do sees the entries before them.
    fn apply_blocking(&self, group: GroupId, generation: u32, entries: &[Entry]) -> Result<Applied, StoreError> {
        if self.inner.overlay.pending_bytes() >= OVERLAY_MAX_BYTES {
            // sled fell behind the applies: wait for it here rather than grow the overlay.
            self.inner.checkpoint(false)?;
        } else if let Some(e) = self.inner.checkpoint_failed.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return Err(StoreError::Checkpoint(e));
        }
        let (applied, membership) = self.applied_state_at(group, generation)?;
        // Sized for the appends up front: growing these one push at a time was ~3% of all
        // CPU under load (reallocs of a batch of thousands of writes).
        let envelopes: usize = entries
            .iter()
            .map(|e| match &e.payload {
                EntryPayload::Normal(Command::Append { envelopes, .. }) => envelopes.len(),
                _ => 0,
            })
            .sum();
        let mut run = Run {
            group,
            generation,
            applied,
            membership,
            batch: Ops(Vec::with_capacity(3 * envelopes + entries.len() + 1)),
            convs: HashMap::with_capacity(envelopes),
            dedupe: HashMap::with_capacity(envelopes),
            ..Run::default()
        };
        let mut changed: HashMap<String, u64> = HashMap::new();
        let mut erasures = 0u64;
        let mut responses = Vec::with_capacity(entries.len());
        for entry in entries {
            let resp = match &entry.payload {
                EntryPayload::Blank => CommandResponse::Empty,
                EntryPayload::Membership(m) => {
                    run.membership = StoredMembership::new(Some(entry.log_id), m.clone());
                    CommandResponse::Empty
                }
                EntryPayload::Normal(Command::Append { now_ms, envelopes }) => {
                    self.apply_append(&mut run, entry.log_id.index, *now_ms, envelopes)?
                }
                EntryPayload::Normal(Command::CommitCursor { now_ms, conversation_id, reader_id, seq }) => {
                    self.apply_cursor(&mut run, *now_ms, conversation_id, reader_id, *seq)?
                }
                EntryPayload::Normal(cmd) => {
                    self.write_run(&mut run, &mut changed)?;
                    // No checkpoint moves envelopes into runs while these remove envelopes:
                    // an erasure must find (and zero) every run of its conversation.
                    let _hold = self.inner.overlay.hold_checkpoints();
                    let resp = match cmd {
                        Command::Maintain { now_ms, dedupe_window_ms, max_removals } => {
                            self.apply_maintain(&mut run, *now_ms, *dedupe_window_ms, *max_removals)?
                        }
                        Command::DeleteConversation { conversation_id, reset_seq, .. } => {
                            erasures += 1;
                            match self.apply_erase(&mut run, conversation_id, *reset_seq, u64::MAX)? {
                                CommandResponse::Erased { existed, envelopes, cursors, next_seq, .. } => {
                                    CommandResponse::Deleted { existed, envelopes, cursors, next_seq }
                                }
                                other => other,
                            }
                        }
                        Command::SetRetention { now_ms, conversation_id, max_age_ms, max_count } => {
                            let limits = (*max_age_ms, *max_count);
                            let (removed, _) =
                                self.apply_retention(&mut run, *now_ms, conversation_id, limits, u64::MAX)?;
                            CommandResponse::RetentionSet { removed }
                        }
                        Command::SetRetentionStep { now_ms, conversation_id, max_age_ms, max_count, max_removals } => {
                            let (limits, budget) = ((*max_age_ms, *max_count), u64::from(*max_removals));
                            let (removed, more) =
                                self.apply_retention(&mut run, *now_ms, conversation_id, limits, budget)?;
                            CommandResponse::RetentionStep { removed, more }
                        }
                        Command::EraseConversation { conversation_id, reset_seq, max_removals, .. } => {
                            let budget = u64::from(*max_removals);
                            let resp = self.apply_erase(&mut run, conversation_id, *reset_seq, budget)?;
                            // Compaction follows the finished erasure, not each step.
                            if matches!(resp, CommandResponse::Erased { more: false, .. }) {
                                erasures += 1;
                            }
                            resp
                        }
                        Command::Append { .. } | Command::CommitCursor { .. } => CommandResponse::Empty,
                    };
                    run.applied = Some(entry.log_id);
                    self.write_run(&mut run, &mut changed)?;
                    responses.push(resp);
                    continue;
                }
            };
            run.applied = Some(entry.log_id);
            responses.push(resp);
        }
        self.write_run(&mut run, &mut changed)?;
        Ok((responses, changed.into_iter().collect(), erasures))
    }

    /// The conversation's record as this run sees it (loaded once).
    fn run_conv<'r>(&self, run: &'r mut Run, conv: &str) -> Result<&'r mut (ConvMeta, bool), StoreError> {
        if !run.convs.contains_key(conv) {
            let meta = self.conv_meta_at(run.group, run.generation, conv.as_bytes())?.unwrap_or_default();
            run.convs.insert(conv.to_string(), (meta, false));
        }
        run.convs.get_mut(conv).ok_or_else(|| StoreError::Encode("conversation cache".into()))
    }

    fn apply_append(
        &self,
        run: &mut Run,
        index: u64,
        now_ms: u64,
        envelopes: &[NewEnvelope],
    ) -> Result<CommandResponse, StoreError> {
        let (group, generation) = (run.group, run.generation);
        let mut appended = Vec::with_capacity(envelopes.len());
        let mut added: Vec<(&str, [u8; MESSAGE_ID_LEN])> = Vec::new();
        let dedupe_keys: Vec<Vec<u8>> = envelopes
            .iter()
            .map(|e| keys::dedupe_key(group, generation, e.conversation_id.as_bytes(), &e.message_id))
            .collect();
        let hashes: Vec<u64> = dedupe_keys.iter().map(|k| self.inner.dedupe.hash(k)).collect();
        // One lock for the entry: which pairs may exist before this entry.
        let may_exist = self.inner.dedupe.may_exist(group, generation, &hashes);
        let mut filed: Vec<(u64, u64)> = Vec::with_capacity(envelopes.len());
        for (i, (e, dedupe_key)) in envelopes.iter().zip(dedupe_keys).enumerate() {
            let conv = e.conversation_id.as_str();
            let seen = match run.dedupe.get(&dedupe_key).copied() {
                Some(p) => Some(p),
                // A conversation that has had no envelope since it began (or since an erasure
                // reset it, which removes its DEDUPE items before its record) has no DEDUPE
                // item: skip the lookup, which always misses there. Its record is loaded
                // anyway to assign the seq; with a million conversations, nearly every
                // envelope is such a conversation's first.
                None if self.run_conv(run, conv)?.0.last_seq == 0 => None,
                // The filter rules it out: no pair under it (an earlier entry of this run has
                // its pair in `run.dedupe`, above).
                None if !may_exist[i] => None,
                None => match self.inner.get(&dedupe_key)? {
                    Some(v) => Some(decode_pair(&dedupe_key, &v)?),
                    None => None,
                },
            };
            if let Some((seq, committed_at_ms)) = seen {
                appended.push(Appended { seq, committed_at_ms, duplicate: true });
                continue;
            }
            let entry = self.run_conv(run, conv)?;
            entry.0.last_seq += 1;
            entry.1 = true;
            let m = &mut entry.0;
            if m.max_count > 0 && m.last_seq > m.max_count {
                // Count retention at append: everything max_count below goes (envelopes in
                // runs have no item to delete; a read skips what lies below this).
                m.removed_below = m.removed_below.max(m.last_seq - m.max_count + 1);
            }
            let meta = entry.0;
            let seq = meta.last_seq;
            run.batch.insert(keys::env_key(group, generation, conv.as_bytes(), seq), encode_envelope(e, now_ms));
            run.batch.insert(dedupe_key.clone(), encode_pair(seq, now_ms));
            run.dedupe.insert(dedupe_key, (seq, now_ms));
            filed.push((hashes[i], now_ms));
            if e.expires_at_ms != 0 {
                run.batch.insert(
                    keys::expiry_key(group, generation, e.expires_at_ms, conv.as_bytes(), seq),
                    keys::encode_value(&[]),
                );
            }
            if meta.max_count > 0 && seq > meta.max_count {
                // Its item, if it has one (a key that is already gone is a no-op; its expiry
                // entry is checked when it fires).
                run.batch.remove(keys::env_key(group, generation, conv.as_bytes(), seq - meta.max_count));
            }
            added.push((conv, e.message_id));
            appended.push(Appended { seq, committed_at_ms: now_ms, duplicate: false });
        }
        if !added.is_empty() {
            let body = postcard::to_allocvec(&added).map_err(|e| StoreError::Encode(e.to_string()))?;
            run.batch.insert(keys::dedupe_time_key(group, generation, now_ms, index), keys::encode_value(&body));
        }
        // Filed before the run's batch (with the pairs) is written.
        self.inner.dedupe.add(group, generation, filed);
        Ok(CommandResponse::Appended(appended))
    }

    fn apply_cursor(
        &self,
        run: &mut Run,
        now_ms: u64,
        conv: &str,
        reader: &str,
        seq: u64,
    ) -> Result<CommandResponse, StoreError> {
        let last_seq = self.run_conv(run, conv)?.0.last_seq;
        let key = keys::cursor_key(run.group, run.generation, conv.as_bytes(), reader.as_bytes());
        let (cur, cur_at) = match run.cursors.get(&key) {
            Some(c) => *c,
            None => match self.inner.get(&key)? {
                Some(v) => decode_pair(&key, &v)?,
                None => (0, 0),
            },
        };
        let want = seq.min(last_seq);
        if want > cur {
            run.batch.insert(key.clone(), encode_pair(want, now_ms));
            run.cursors.insert(key, (want, now_ms));
            return Ok(CommandResponse::Cursor { seq: want, updated_at_ms: now_ms, last_seq });
        }
        Ok(CommandResponse::Cursor { seq: cur, updated_at_ms: cur_at, last_seq })
    }

    /// Removes one envelope (by its key and decoded value) and its expiry entry.
    fn remove_envelope(batch: &mut Ops, group: GroupId, generation: u32, conv: &[u8], e: &StoredEnvelope) {
        batch.remove(keys::env_key(group, generation, conv, e.seq));
        if e.envelope.expires_at_ms != 0 {
            batch.remove(keys::expiry_key(group, generation, e.envelope.expires_at_ms, conv, e.seq));
        }
    }

    fn apply_maintain(
        &self,
        run: &mut Run,
        now_ms: u64,
        dedupe_window_ms: u64,
        max_removals: u32,
    ) -> Result<CommandResponse, StoreError> {
        let (group, generation) = (run.group, run.generation);
        let data = &*self.inner;
        let mut budget = max_removals.max(1) as u64;
        let mut report = MaintainReport::default();

        // 1. Expiry: every envelope with expires_at_ms <= now_ms.
        let mut end = keys::kind_prefix(group, generation, keys::KIND_EXPIRY);
        end.extend_from_slice(&now_ms.saturating_add(1).to_be_bytes());
        for item in data.range(keys::kind_prefix(group, generation, keys::KIND_EXPIRY)..end) {
            if budget == 0 {
                report.more = true;
                break;
            }
            let (k, _) = item?;
            let keys::Key::Expiry { at_ms, conversation, seq } =
                keys::decode_key(&k).map_err(|e| corrupt_key(&k, e))?
            else {
                return Err(corrupt_key(&k, keys::DecodeError("not an expiry key".into())));
            };
            run.batch.remove(k.clone());
            let ek = keys::env_key(group, generation, &conversation, seq);
            if let Some(v) = data.get(&ek)? {
                // Only the envelope this entry was written for (a reset conversation can
                // reuse the seq).
                if decode_envelope(&ek, &v, "", seq)?.envelope.expires_at_ms == at_ms {
                    run.batch.remove(ek);
                    report.expired += 1;
                }
            }
            budget -= 1;
        }

        // 2. Retention of the conversations that have any.
        let mut retention_keys = Vec::new();
        for item in data.scan_prefix(keys::kind_prefix(group, generation, keys::KIND_RETENTION)) {
            let (k, _) = item?;
            match keys::decode_key(&k).map_err(|e| corrupt_key(&k, e))? {
                keys::Key::Retention { conversation } => retention_keys.push(conversation),
                other => return Err(corrupt_key(&k, keys::DecodeError(format!("not a retention key: {other:?}")))),
            }
        }
        for conv in retention_keys {
            if budget == 0 {
                report.more = true;
                break;
            }
            let Some(meta) = self.conv_meta_at(group, generation, &conv)? else { continue };
            let conv = String::from_utf8(conv).map_err(|e| {
                let k = keys::retention_key(group, generation, e.as_bytes());
                corrupt_key(&k, keys::DecodeError("conversation id is not UTF-8".into()))
            })?;
            let (n, more) = self.enforce_retention(run, &conv, &meta, now_ms, budget)?;
            report.retention_removed += n;
            budget -= n.min(budget);
            report.more |= more;
        }

        // 3. Dedupe entries older than the window.
        let cutoff = now_ms.saturating_sub(dedupe_window_ms);
        let mut end = keys::kind_prefix(group, generation, keys::KIND_DEDUPE_TIME);
        end.extend_from_slice(&cutoff.to_be_bytes());
        // Every pair committed before this is gone once the loop ends: the cutoff, or the time
        // of the first dedupe time item the budget left.
        let mut removed_below = cutoff;
        for item in data.range(keys::kind_prefix(group, generation, keys::KIND_DEDUPE_TIME)..end) {
            let (k, v) = item?;
            if budget == 0 {
                report.more = true;
                match keys::decode_key(&k).map_err(|e| corrupt_key(&k, e))? {
                    keys::Key::DedupeTime { at_ms, .. } => removed_below = at_ms,
                    _ => return Err(corrupt_key(&k, keys::DecodeError("not a dedupe time key".into()))),
                }
                break;
            }
            let body = keys::decode_value(&v).map_err(|e| corrupt_key(&k, e))?;
            let added: Vec<(String, [u8; MESSAGE_ID_LEN])> = postcard::from_bytes(body)
                .map_err(|e| corrupt_key(&k, keys::DecodeError(format!("dedupe time entry: {e}"))))?;
            for (conv, id) in added {
                let dk = keys::dedupe_key(group, generation, conv.as_bytes(), &id);
                if let Some(dv) = data.get(&dk)? {
                    // Only if it is this old entry (an erased and reset conversation can
                    // have a newer one under the same key).
                    if decode_pair(&dk, &dv)?.1 < cutoff {
                        run.batch.remove(dk);
                        report.dedupe_trimmed += 1;
                    }
                }
            }
            run.batch.remove(k);
            budget = budget.saturating_sub(1);
        }
        // The removes are in the run's batch, written before the group's next apply looks a
        // pair up.
        self.inner.dedupe.removed_below(group, generation, removed_below);
        Ok(CommandResponse::Maintained(report))
    }

    /// Removes the conversation's oldest envelopes that its retention no longer allows,
    /// at most `budget`; returns how many and whether it stopped at the budget. Writes the
    /// conversation's record when its `removed_below` moves, and drops what lies below it
    /// (runs wholly below, and ENV items a count retention at append left there).
    fn enforce_retention(
        &self,
        run: &mut Run,
        conversation_id: &str,
        meta: &ConvMeta,
        now_ms: u64,
        budget: u64,
    ) -> Result<(u64, bool), StoreError> {
        let (group, generation) = (run.group, run.generation);
        let conv = conversation_id.as_bytes();
        let (n, removed_below, more) = self.remove_oldest(run, conversation_id, meta, budget, |r| {
            meta.retention_removes(r.seq, r.env.committed_at_ms, now_ms)
        })?;
        if removed_below > meta.removed_below {
            let m = ConvMeta { removed_below, ..*meta };
            run.batch.insert(keys::conv_key(group, generation, conv), m.encode());
        }
        // Zeroed like an erasure's: a later erasure of the conversation could not find them.
        self.drop_below(run, conv, removed_below, true)?;
        Ok((n, more))
    }

    /// Removes the conversation's oldest envelopes while `removes` says so, at most `budget`:
    /// deletes those that are items; returns how many, the `removed_below` that hides them
    /// (in runs or not), and whether it stopped at the budget with more to remove.
    fn remove_oldest(
        &self,
        run: &mut Run,
        conversation_id: &str,
        meta: &ConvMeta,
        budget: u64,
        removes: impl Fn(&Rec) -> bool,
    ) -> Result<(u64, u64, bool), StoreError> {
        let (group, generation) = (run.group, run.generation);
        let conv = conversation_id.as_bytes();
        let (mut n, mut removed_below, mut cursor) = (0u64, meta.removed_below, meta.first_kept());
        loop {
            let recs = self.gather((group, generation), conversation_id, meta, cursor, true, READ_CHUNK)?;
            let got = recs.len();
            for r in recs {
                if !removes(&r) {
                    return Ok((n, removed_below, false));
                }
                if n >= budget {
                    return Ok((n, removed_below, true));
                }
                if r.item {
                    Self::remove_envelope(&mut run.batch, group, generation, conv, &r.env);
                }
                removed_below = r.seq + 1;
                cursor = r.seq + 1;
                n += 1;
            }
            if got < READ_CHUNK {
                return Ok((n, removed_below, false));
            }
        }
    }

    /// Deletes what a read can no longer find below `removed_below`: the conversation's
    /// runs that lie wholly below it (zeroing their records if `zero`: an erasure) and ENV
    /// items below it. Neither changes what any read returns, so replicas that hold the same
    /// envelopes differently (in runs or items) stay the same to every reader.
    fn drop_below(&self, run: &mut Run, conv: &[u8], removed_below: u64, zero: bool) -> Result<(), StoreError> {
        let (group, generation) = (run.group, run.generation);
        if removed_below <= 1 {
            return Ok(());
        }
        let mut gone = Vec::new();
        for item in self.inner.scan_prefix(keys::conv_prefix(group, generation, keys::KIND_RUN, conv)) {
            let (k, v) = item?;
            let r = RunRef::decode(&v).map_err(|e| corrupt_key(&k, e))?;
            if r.last_seq(run_first_seq(&k)?) >= removed_below {
                break;
            }
            gone.push((k, r));
        }
        if zero {
            run.zero.extend(gone.iter().map(|(_, r)| (r.segment, r.offset, r.bytes)));
        }
        run.dropped.extend(gone.iter().map(|(_, r)| r.segment));
        for (k, _) in gone {
            run.batch.remove(k);
        }
        let mut below = Vec::new();
        let range = keys::env_key(group, generation, conv, 0)..keys::env_key(group, generation, conv, removed_below);
        for item in self.inner.range(range) {
            let (k, v) = item?;
            let seq = env_seq(&k)?;
            below.push(decode_envelope(&k, &v, "", seq)?);
        }
        for e in below {
            Self::remove_envelope(&mut run.batch, group, generation, conv, &e);
        }
        Ok(())
    }

    /// One step of an erasure (`Command::EraseConversation`): at most `max_removals` keys,
    /// envelopes first (lowest seqs, each with its expiry entry), then dedupe entries, then
    /// cursors. The step that finds nothing left within its budget finishes it.
    /// The one-step `DeleteConversation` of older logs is this with `budget` `u64::MAX`.
    fn apply_erase(
        &self,
        run: &mut Run,
        conversation_id: &str,
        reset_seq: bool,
        budget: u64,
    ) -> Result<CommandResponse, StoreError> {
        let (group, generation) = (run.group, run.generation);
        let data = &*self.inner;
        let conv = conversation_id.as_bytes();
        let meta = self.conv_meta_at(group, generation, conv)?;
        let m = meta.unwrap_or_default();
        let mut budget = budget.max(1);
        let (envelopes, mut removed_below, mut more) =
            self.remove_oldest(run, conversation_id, &m, budget, |_| true)?;
        budget -= envelopes;
        let mut cursors = 0u64;
        if !more {
            // Everything is gone: nothing below the last seq can be read any more.
            removed_below = removed_below.max(m.last_seq + 1);
        }
        // Runs wholly erased are zeroed in their segment now, and their items deleted.
        self.drop_below(run, conv, removed_below, true)?;
        for kind in [keys::KIND_DEDUPE, keys::KIND_CURSOR] {
            if more {
                break;
            }
            for item in data.scan_prefix(keys::conv_prefix(group, generation, kind, conv)) {
                if budget == 0 {
                    more = true;
                    break;
                }
                run.batch.remove(item?.0);
                budget -= 1;
                if kind == keys::KIND_CURSOR {
                    cursors += 1;
                }
            }
        }
        let existed = meta.is_some() || envelopes > 0 || cursors > 0;
        let next_seq = if reset_seq && !more {
            run.batch.remove(keys::conv_key(group, generation, conv));
            run.batch.remove(keys::retention_key(group, generation, conv));
            1
        } else {
            if meta.is_some() && removed_below > m.removed_below {
                run.batch.insert(keys::conv_key(group, generation, conv), ConvMeta { removed_below, ..m }.encode());
            }
            m.last_seq + 1
        };
        Ok(CommandResponse::Erased { existed, envelopes, cursors, next_seq, more })
    }

    /// Replaces the conversation's retention limits `(max_age_ms, max_count)` and removes at
    /// most `budget` (at least 1) of the envelopes they no longer allow (oldest first);
    /// returns how many and whether it stopped at the budget with more to remove.
    fn apply_retention(
        &self,
        run: &mut Run,
        now_ms: u64,
        conversation_id: &str,
        (max_age_ms, max_count): (u64, u64),
        budget: u64,
    ) -> Result<(u64, bool), StoreError> {
        let (group, generation) = (run.group, run.generation);
        let conv = conversation_id.as_bytes();
        let mut meta = self.conv_meta_at(group, generation, conv)?.unwrap_or_default();
        meta.max_age_ms = max_age_ms;
        meta.max_count = max_count;
        run.batch.insert(keys::conv_key(group, generation, conv), meta.encode());
        let rk = keys::retention_key(group, generation, conv);
        if meta.has_retention() {
            run.batch.insert(rk, keys::encode_value(&[]));
        } else {
            run.batch.remove(rk);
        }
        self.enforce_retention(run, conversation_id, &meta, now_ms, budget.max(1))
    }

    /// Writes what the run holds (data, conversation records, applied state) in one
    /// atomic sled batch, and starts a fresh one.
    fn write_run(&self, run: &mut Run, changed: &mut HashMap<String, u64>) -> Result<(), StoreError> {
        let (group, generation) = (run.group, run.generation);
        for (conv, (meta, dirty)) in run.convs.drain() {
            if dirty {
                run.batch.insert(keys::conv_key(group, generation, conv.as_bytes()), meta.encode());
                changed.insert(conv, meta.last_seq);
            }
        }
        let state =
            postcard::to_allocvec(&(run.applied, &run.membership)).map_err(|e| StoreError::Encode(e.to_string()))?;
        run.batch.insert(keys::meta_key(group, generation), keys::encode_value(&state));
        let batch = std::mem::take(&mut run.batch).0;
        // Before the overlay has them: a record must never be readable while the filter
        // would say it does not exist.
        self.inner.convs.add(batch.iter().filter(|(_, v)| v.is_some()).map(|(k, _)| k.as_slice()));
        self.inner.overlay.write(batch);
        if !run.zero.is_empty() {
            // With the deletes of their items, never before (a checkpoint zeroes them).
            let mut to_zero = self.inner.to_zero.lock().unwrap_or_else(|p| p.into_inner());
            to_zero.entry((group, generation)).or_default().append(&mut run.zero);
        }
        if !run.dropped.is_empty() {
            let mut dropped = self.inner.dropped.lock().unwrap_or_else(|p| p.into_inner());
            dropped.entry((group, generation)).or_default().append(&mut run.dropped);
        }
        run.dedupe.clear();
        run.cursors.clear();
        Ok(())
    }

    /// Writes the group's current data to a new snapshot file, both halves of the build in
    /// one call (where nothing of the group is applied meanwhile).
    fn build_snapshot_blocking(
        &self,
        group: GroupId,
        rt: &GroupRt,
    ) -> Result<(SnapshotMeta, SnapshotData), StoreError> {
        let build = self.begin_snapshot(group)?;
        let built = self.finish_snapshot(rt, build);
        self.after_build();
        built
    }

    /// After a build's pin is gone: what checkpoints left undone for it (zeroing erased runs,
    /// deleting emptied segments) is done at once, not within the checkpoint thread's next
    /// tick (`Inner::revisit_due`). At the node's own priority, never on the build's thread.
    /// A failure is logged, not returned: the snapshot is fine, and a failed checkpoint stops
    /// the node's applies by itself.
    fn after_build(&self) {
        if let Err(e) = self.inner.checkpoint(false) {
            tracing::error!(error = %e, "the checkpoint after a snapshot build failed");
        }
    }

    /// The first half of a snapshot build, where openraft holds the group's state machine
    /// (nothing of it is applied meanwhile): makes sled and the state index hold the group's
    /// whole state, takes a view of the index, pins the group's envelope segments, has
    /// checkpoints keep the dedupe time items they delete, and writes sled's part of the
    /// state but its dedupe times to the file (sled has no views). The rest, the bulk
    /// (conversations, dedupe pairs, dedupe times and every envelope in runs), is written
    /// by [`StateStore::read_view`] and [`StateStore::write_runs`] from the view, sled and
    /// the pinned segments while applies go on.
    fn begin_snapshot(&self, group: GroupId) -> Result<SnapshotBuild, StoreError> {
        let started = Instant::now();
        let rt = self.rt(group)?;
        // After this checkpoint sled and the state index alone hold the group's state (and the
        // log can be purged behind the snapshot: recovery no longer needs it). And a second
        // one: the first left this group's index log items in sled, which the next checkpoint
        // deletes, and the scan below (without the overlay's gate) must not overlap a batch
        // in this group's range.
        self.inner.checkpoint(true)?;
        self.inner.checkpoint(false)?;
        let generation = rt.generation.load(Ordering::Acquire);
        // Pinned before anything of the group is applied again: from here on, checkpoints
        // neither zero nor delete what the view's runs point to.
        let pin = BuildPin::new(&self.inner, (group, generation));
        // And from here on, checkpoints keep the dedupe time items they delete for this build.
        let kept = KeptDeletes::new(&self.inner, (group, generation));
        let view = self.inner.index.view();
        // The applied state from sled, like the data: the file's meta and its records come
        // from one state.
        let meta_key = keys::meta_key(group, generation);
        let (last_log_id, last_membership) = Self::decode_applied_state(&meta_key, self.inner.data.get(&meta_key)?)?;
        let meta = SnapshotMeta { last_log_id, last_membership };
        let idx = last_log_id.map_or(0, |l| l.index);
        let tmp = self.inner.snap_dir.join(format!("g{group}-{idx:020}-{}.tmp", unix_nanos()));
        let mut file = SnapshotFileWriter::create(tmp.clone(), group, &meta)?;
        let _tmp = TmpFile(tmp);
        // sled directly, without the overlay's gate: after those checkpoints the overlay holds
        // nothing of this group and nothing of it is applied meanwhile, so no batch lands in
        // this range during the scan, and other groups' checkpoints need not wait for it.
        // Not the dedupe times (one item per entry of the dedupe window, most of sled's part):
        // the second half reads those (`write_dedupe_times`).
        let mut ex = Exporter::new(self, group, generation, Some(&view));
        let (start, end) = crate::overlay::prefix_range(&keys::gen_prefix(group, generation));
        let times = keys::kind_prefix(group, generation, keys::KIND_DEDUPE_TIME);
        let after_times = keys::kind_prefix(group, generation, keys::KIND_DEDUPE_TIME + 1);
        let before = self.inner.data.range((start, Bound::Excluded(times)));
        let after = self.inner.data.range((Bound::Included(after_times), end));
        for item in before.chain(after) {
            let (k, v) = item?;
            if !index::in_index(&k) {
                ex.item(&k, &v, &mut |k, v| file.record(k, v))?;
            }
        }
        let sled_records = file.records();
        let held = started.elapsed();
        Ok(SnapshotBuild { group, generation, meta, file, view, sled_records, held, kept, _pin: pin, _tmp })
    }

    /// The second half of a snapshot build (`begin_snapshot`), without the state machine:
    /// its two phases in one call ([`StateStore::read_view`], [`StateStore::write_runs`]);
    /// a failure is handled by [`StateStore::or_current`].
    fn finish_snapshot(&self, rt: &GroupRt, build: SnapshotBuild) -> Result<(SnapshotMeta, SnapshotData), StoreError> {
        let (group, index) = (build.group, build.meta.last_log_id.map_or(0, |l| l.index));
        let built = self.read_view(build).and_then(|read| self.write_runs(rt, read));
        self.or_current(rt, group, index, built)
    }

    /// A second half that failed (a full disk, a damaged segment): the error is logged and
    /// the current snapshot, if the group has one, is returned in its place (openraft keeps
    /// its newer one, and the node triggers again after `snapshot_logs_since_last` more
    /// entries): the node keeps serving. (With none, the error reaches openraft, which stops
    /// the node.)
    fn or_current(
        &self,
        rt: &GroupRt,
        group: GroupId,
        index: u64,
        built: Result<(SnapshotMeta, SnapshotData), StoreError>,
    ) -> Result<(SnapshotMeta, SnapshotData), StoreError> {
        match built {
            Ok(built) => Ok(built),
            Err(e) => {
                let current = rt.current_snapshot();
                tracing::error!(group, index, error = %e, kept_current = current.is_some(),
                    "building a snapshot failed; the group keeps its current one");
                current.ok_or(e)
            }
        }
    }

    /// The second half's first phase: the records of the view (all but the runs' envelopes)
    /// and the dedupe times. Split from the second phase ([`StateStore::write_runs`]) so that
    /// the view is dropped before the bulk of the work, copying the runs' envelopes out of
    /// the segments, and not kept while other groups' builds do theirs (the phases take
    /// separate turns: `Inner::view_turn`, `Inner::build_turn`): while it is open fjall keeps
    /// every memtable it flushes meanwhile (`StateIndex::view`; with the view open for the
    /// whole build, a node's memtables held 100+ MiB during builds: docs/BENCHMARKS.md,
    /// "2026-12-05, thirteenth session"). The view's RUN items (where a run lies, ~50 bytes
    /// each) go to a spill file in the snapshot file's format, for the second phase.
    fn read_view(&self, build: SnapshotBuild) -> Result<ViewRead, StoreError> {
        let started = Instant::now();
        let SnapshotBuild { group, generation, meta, mut file, view, sled_records, held, kept, _pin, _tmp } = build;
        let mut ex = Exporter::new(self, group, generation, None);
        let spill_path = self.inner.snap_dir.join(format!("g{group}-{generation}-{}.runs.tmp", unix_nanos()));
        let spill_tmp = TmpFile(spill_path.clone());
        let mut spill = SnapshotFileWriter::create_unsynced(spill_path.clone(), group, &meta)?;
        for item in view.range(crate::overlay::prefix_range(&keys::gen_prefix(group, generation))) {
            let (k, v) = item?;
            if k.get(keys::GEN_PREFIX_LEN) == Some(&keys::KIND_RUN) {
                spill.record(&k, &v)?;
            } else {
                ex.item(&k, &v, &mut |k, v| file.record(k, v))?;
            }
        }
        drop(view);
        let view_held = started.elapsed();
        let dedupe_times = self.write_dedupe_times(group, generation, &meta, kept, &mut file)?;
        let runs = spill.records();
        spill.close()?;
        Ok(ViewRead {
            group,
            generation,
            meta,
            file,
            removed: ex.removed,
            spill: spill_tmp,
            runs,
            dedupe_times,
            sled_records,
            held,
            view_held,
            took: started.elapsed(),
            _pin,
            _tmp,
        })
    }

    /// The second half's second phase: every run's envelopes (from the spill file's RUN
    /// items and the pinned segments); then the file is fsynced and becomes the group's
    /// current snapshot; unpins.
    fn write_runs(&self, rt: &GroupRt, read: ViewRead) -> Result<(SnapshotMeta, SnapshotData), StoreError> {
        let started = Instant::now();
        let ViewRead {
            group,
            generation,
            meta,
            mut file,
            removed,
            spill,
            runs,
            dedupe_times,
            sled_records,
            held,
            view_held,
            took,
            _pin,
            _tmp,
        } = read;
        self.inner.build_views_at_runs.store(self.inner.index.views_open(), Ordering::Release);
        let mut ex = Exporter { removed, ..Exporter::new(self, group, generation, None) };
        let mut spilled = SnapshotReader::open(&spill.0)?;
        while let Some((k, v)) = spilled.next_record()? {
            ex.item(&k, &v, &mut |k, v| file.record(k, v))?;
        }
        drop((spilled, spill));
        let records = file.records();
        let data = file.finish()?;
        let path = data.path().with_extension("snap");
        // Still pinned: an install of the group waits for the pin, so it publishes its
        // (newer) snapshot after this one. A rebuild of a damaged current snapshot (at a later
        // log id, while this build ran) is not replaced.
        let published = self.publish_snapshot(rt, &meta, data.path(), &path, false)?;
        drop(_pin);
        tracing::info!(
            group,
            index = meta.last_log_id.map_or(0, |l| l.index),
            records,
            sled_records,
            bytes = data.len(),
            runs,
            dedupe_times,
            held_ms = crate::slow::ms(held),
            view_ms = crate::slow::ms(view_held),
            ms = crate::slow::ms(took + started.elapsed()),
            "snapshot built (`held_ms`: the first half, which held the group's state machine; `ms`: the second half, which did not, its waits for its turns left out; `view_ms`: of the second half, how long the state index's view was read)"
        );
        if published {
            return Ok((meta, SnapshotData::new(path, data.len())));
        }
        let current = rt.current_snapshot();
        current.ok_or_else(|| StoreError::Encode("a newer snapshot replaced this build's and is gone".into()))
    }

    /// A snapshot build's dedupe time items (DEDUPE_TIME: which message ids each entry
    /// added, for the dedupe window's trim), read from sled after the first half released
    /// the group's state machine. There are as many as entries in the dedupe window (a
    /// day's by default); read in the first half they made it, which the group's applies
    /// wait for, grow with the window (1.8-2.6 s at 50,000 entries: docs/BENCHMARKS.md).
    /// The file gets the items of the build's log position: those in sled whose entry is at
    /// or before it (later ones were added after it), and those the trims of entries
    /// applied since deleted (`kept`). Read in chunks, each under the overlay's gate, with
    /// the items deleted by the batches landed before it (handed to `kept` as each lands,
    /// under the gate's other side): an item deleted before the scan reached its place is
    /// taken from `kept`, one deleted after was read from sled. Returns how many.
    fn write_dedupe_times(
        &self,
        group: GroupId,
        generation: u32,
        meta: &SnapshotMeta,
        kept: KeptDeletes,
        file: &mut SnapshotFileWriter,
    ) -> Result<u64, StoreError> {
        const P: usize = keys::GEN_PREFIX_LEN;
        let last = meta.last_log_id.map_or(0, |l| l.index);
        let at_or_before = |k: &[u8]| -> Result<bool, StoreError> {
            match keys::decode_key(k).map_err(|e| corrupt_key(k, e))? {
                keys::Key::DedupeTime { index, .. } => Ok(index <= last),
                _ => Err(corrupt_key(k, keys::DecodeError("not a dedupe time item".into()))),
            }
        };
        let prefix = keys::kind_prefix(group, generation, keys::KIND_DEDUPE_TIME);
        let (mut from, end) = crate::overlay::prefix_range(&prefix);
        let (mut n, mut chunks) = (0u64, 0usize);
        loop {
            let (chunk, deleted) = self.inner.overlay.shared(|| {
                let chunk = self
                    .inner
                    .data
                    .range((from.clone(), end.clone()))
                    .take(DEDUPE_TIMES_CHUNK)
                    .collect::<Result<Vec<_>, _>>();
                (chunk, kept.take())
            });
            // Deleted before this read: from sled's part not yet read, so not read.
            for (k, v) in deleted {
                let passed = matches!(&from, Bound::Excluded(read) if k.as_slice() <= read.as_slice());
                if !passed && at_or_before(&k)? {
                    file.record(&k[P..], &v)?;
                    n += 1;
                }
            }
            let chunk = chunk?;
            let Some((last_key, _)) = chunk.last() else { break };
            from = Bound::Excluded(last_key.to_vec());
            for (k, v) in &chunk {
                if at_or_before(k)? {
                    file.record(&k[P..], v)?;
                    n += 1;
                }
            }
            chunks += 1;
            let pause = {
                let mut p = self.inner.scan_pause.lock().unwrap_or_else(|p| p.into_inner());
                p.take_if(|p| p.after_chunks == chunks)
            };
            if let Some(p) = pause {
                let _ = p.reached.send(());
                let _ = p.resume.recv();
            }
        }
        Ok(n)
    }

    /// The group's current snapshot after checking every CRC of its file. A damaged file is
    /// moved to quarantine and a new snapshot is built from the state machine in its place.
    fn current_snapshot_checked(
        &self,
        group: GroupId,
        rt: &GroupRt,
    ) -> Result<Option<(SnapshotMeta, SnapshotData)>, StoreError> {
        let cur = rt.current_snapshot();
        let Some((meta, data)) = cur else { return Ok(None) };
        let unchanged = {
            let checked = rt.checked.lock().unwrap_or_else(|p| p.into_inner());
            match (checked.as_ref(), fs::metadata(data.path())) {
                (Some((p, len, mtime, at)), Ok(m)) => {
                    p == data.path()
                        && *len == m.len()
                        && m.modified().is_ok_and(|t| t == *mtime)
                        && at.elapsed() < SNAPSHOT_RECHECK
                }
                _ => false,
            }
        };
        if unchanged {
            return Ok(Some((meta, data)));
        }
        match SnapshotReader::validate(data.path()) {
            Ok(_) => {
                *rt.checked.lock().unwrap_or_else(|p| p.into_inner()) = checked_now(data.path());
                Ok(Some((meta, data)))
            }
            Err(e @ StoreError::Corrupt { .. }) => {
                {
                    let mut cur = rt.current.lock().unwrap_or_else(|p| p.into_inner());
                    if cur.as_ref().is_some_and(|(_, d)| d.path() == data.path()) {
                        *cur = None;
                    }
                }
                let qdir = self.inner.snap_dir.with_file_name(QUARANTINE_DIR);
                let moved = crate::repair::quarantine(&qdir, data.path())?;
                tracing::error!(group, path = %data.path().display(), moved = %moved.display(), error = %e,
                    "current snapshot file is corrupt: moved aside, building a new one from the state machine");
                self.build_snapshot_blocking(group, rt).map(Some)
            }
            Err(e) => Err(e),
        }
    }

    /// Makes `src` the group's current snapshot file at `dst` (rename, or copy when it is
    /// not ours to move), fsyncs the directory, and deletes the previous one; unless the
    /// current one is at this log id or later (a damaged current file rebuilt while a build
    /// ran; it may be being sent to a peer): then the new file goes and this returns false.
    fn publish_snapshot(
        &self,
        rt: &GroupRt,
        meta: &SnapshotMeta,
        src: &Path,
        dst: &Path,
        copy: bool,
    ) -> Result<bool, StoreError> {
        if copy {
            fs::copy(src, dst).map_err(io_err(dst))?;
            fs::File::open(dst).and_then(|f| f.sync_all()).map_err(io_err(dst))?;
        } else {
            fs::rename(src, dst).map_err(io_err(dst))?;
        }
        fs::File::open(&self.inner.snap_dir).and_then(|d| d.sync_all()).map_err(io_err(&self.inner.snap_dir))?;
        let len = fs::metadata(dst).map_err(io_err(dst))?.len();
        let old = {
            let mut current = rt.current.lock().unwrap_or_else(|p| p.into_inner());
            if current.as_ref().is_some_and(|(m, _)| m.last_log_id >= meta.last_log_id) {
                drop(current);
                let _ = fs::remove_file(dst);
                return Ok(false);
            }
            current.replace((meta.clone(), SnapshotData::new(dst.to_path_buf(), len)))
        };
        if let Some((_, old)) = old {
            if old.path() != dst {
                let _ = fs::remove_file(old.path());
            }
        }
        Ok(true)
    }

    /// Installs a snapshot atomically: its records go under a new generation in bounded
    /// batches; one single-key write then switches the group to it; the old generation is
    /// deleted after. A crash before the switch leaves the old state (and garbage that the
    /// next open removes); a crash after it leaves the new state.
    fn install_blocking(
        &self,
        group: GroupId,
        rt: &GroupRt,
        meta: &SnapshotMeta,
        data: &SnapshotData,
    ) -> Result<(), StoreError> {
        let mut reader = SnapshotReader::open(data.path())?;
        if reader.group != group {
            return Err(StoreError::Corrupt {
                what: data.path().display().to_string(),
                offset: 9,
                reason: format!("snapshot of group {} offered to group {group}", reader.group),
            });
        }
        let old = rt.generation.load(Ordering::Acquire);
        {
            // A build of this group still reading the old generation's runs finishes first
            // (it never waits for anything an install holds).
            let mut b = self.inner.building.lock().unwrap_or_else(|p| p.into_inner());
            let waiting = Instant::now();
            while b.contains_key(&(group, old)) {
                let (next, timed_out) =
                    self.inner.build_done.wait_timeout(b, Duration::from_secs(10)).unwrap_or_else(|p| p.into_inner());
                b = next;
                if timed_out.timed_out() {
                    tracing::warn!(
                        group,
                        waited_s = waiting.elapsed().as_secs(),
                        "snapshot install waits for a build of the group to end"
                    );
                }
            }
        }
        // What the overlay holds goes to sled first, so that the install's direct writes and
        // generation switch are not overtaken by a later checkpoint of older writes.
        self.inner.checkpoint(true)?;
        let new = old.checked_add(1).ok_or_else(|| StoreError::Encode("generation counter exhausted".into()))?;
        let new_prefix = keys::gen_prefix(group, new);
        // Every CONV and DEDUPE record of the snapshot is filed below.
        self.inner.convs.reset(group, new);
        self.inner.dedupe.reset(group, new);
        let next_prefix = new.checked_add(1).map(|g| keys::gen_prefix(group, g).to_vec());
        if let Some(end) = next_prefix {
            self.delete_range(new_prefix.to_vec()..end)?;
        }
        let mut batch = sled::Batch::default();
        let (mut n, mut bytes) = (0usize, 0usize);
        let mut batches = 0usize;
        // Records of the index's kinds go to the state index (durable before the switch,
        // like the rest).
        let mut index_batch: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut index_bytes = 0usize;
        while let Some((k, v)) = reader.next_record()? {
            let mut key = Vec::with_capacity(keys::GEN_PREFIX_LEN + k.len());
            key.extend_from_slice(&new_prefix);
            key.extend_from_slice(&k);
            match keys::decode_key(&key).map_err(|e| corrupt_key(&key, e))? {
                keys::Key::Run { .. } | keys::Key::Segs | keys::Key::IndexLog { .. } => {
                    return Err(StoreError::Corrupt {
                        what: data.path().display().to_string(),
                        offset: 0,
                        reason: format!(
                            "snapshot carries a node's own item {} (runs, segment marks and index logs never travel)",
                            hex(&key)
                        ),
                    })
                }
                decoded if index::in_index(&key) => {
                    if matches!(decoded, keys::Key::Dedupe { .. }) {
                        let at_ms = decode_pair(&key, &v)?.1;
                        self.inner.dedupe.add(group, new, [(self.inner.dedupe.hash(&key), at_ms)]);
                    } else {
                        self.inner.convs.add([key.as_slice()]);
                    }
                    index_bytes += key.len() + v.len();
                    index_batch.push((key, v));
                    if index_batch.len() >= INSTALL_BATCH_RECORDS || index_bytes >= INSTALL_BATCH_BYTES {
                        self.inner.index.apply(index_batch.iter().map(|(k, v)| (k.as_slice(), Some(v.as_slice()))))?;
                        index_batch.clear();
                        index_bytes = 0;
                    }
                    continue;
                }
                _ => {}
            }
            bytes += key.len() + v.len();
            n += 1;
            batch.insert(key, v);
            if n >= INSTALL_BATCH_RECORDS || bytes >= INSTALL_BATCH_BYTES {
                let b = std::mem::take(&mut batch);
                self.inner.overlay.exclusive(|| self.inner.data.apply_batch(b))?;
                n = 0;
                bytes = 0;
                batches += 1;
                if batches == 1 {
                    crash_point("mid_write", || {
                        let _ = self.inner.overlay.flush(&self.inner.data);
                    });
                }
            }
        }
        let state = postcard::to_allocvec(&(meta.last_log_id, meta.last_membership.clone()))
            .map_err(|e| StoreError::Encode(e.to_string()))?;
        batch.insert(keys::meta_key(group, new), keys::encode_value(&state));
        self.inner.overlay.exclusive(|| self.inner.data.apply_batch(batch))?;
        self.inner.index.apply(index_batch.iter().map(|(k, v)| (k.as_slice(), Some(v.as_slice()))))?;
        self.inner.index.persist()?;
        // The new generation is durable before the switch; the switch is durable before
        // the old data goes.
        self.inner.overlay.flush(&self.inner.data)?;
        crash_point("before_switch", || {
            let _ = self.inner.overlay.flush(&self.inner.data);
        });
        self.inner.heads.insert(group.to_be_bytes(), keys::encode_value(&u64::from(new).to_be_bytes()))?;
        self.inner.overlay.flush(&self.inner.data)?;
        crash_point("after_switch", || {
            let _ = self.inner.overlay.flush(&self.inner.data);
        });
        rt.generation.store(new, Ordering::Release);
        self.inner.convs.retain_only(group, new);
        self.inner.dedupe.retain_only(group, new);
        self.delete_range(keys::gen_prefix(group, old).to_vec()..new_prefix.to_vec())?;
        self.remove_segments(group, |g| g != new)?;

        let idx = meta.last_log_id.map_or(0, |l| l.index);
        let nanos = unix_nanos();
        let dst = self.inner.snap_dir.join(format!("g{group}-{idx:020}-{nanos}.snap"));
        let ours = data.path().parent() == Some(self.inner.snap_dir.as_path())
            && data.path().extension().is_some_and(|e| e == "recv");
        self.publish_snapshot(rt, meta, data.path(), &dst, !ours)?;
        Ok(())
    }
}

/// Turns a group's stored items into the records a snapshot carries and replicas are
/// compared by (`StateStore::export`), one item at a time.
struct Exporter<'a> {
    store: &'a StateStore,
    group: GroupId,
    generation: u32,
    /// Escaped conversation id -> removed_below, for the conversations seen so far that have
    /// one (CONV items come before ENV and RUN items in key order), and every one looked up
    /// in `convs`.
    removed: HashMap<Vec<u8>, u64>,
    /// Where to look up the record of a conversation whose ENV item comes without it (sled's
    /// items alone, in a snapshot build).
    convs: Option<&'a index::IndexView>,
}

impl<'a> Exporter<'a> {
    fn new(store: &'a StateStore, group: GroupId, generation: u32, convs: Option<&'a index::IndexView>) -> Self {
        Exporter { store, group, generation, removed: HashMap::new(), convs }
    }

    /// The conversation's `removed_below` (0: none), `conv` its escaped id.
    fn removed_below(&mut self, conv: &[u8]) -> Result<u64, StoreError> {
        if let Some(rb) = self.removed.get(conv) {
            return Ok(*rb);
        }
        let Some(view) = self.convs else { return Ok(0) };
        let mut k = keys::kind_prefix(self.group, self.generation, keys::KIND_CONV);
        k.extend_from_slice(conv);
        let rb = match view.get(&k)? {
            Some(v) => ConvMeta::decode(&k, &v)?.removed_below,
            None => 0,
        };
        self.removed.insert(conv.to_vec(), rb);
        Ok(rb)
    }

    fn item(
        &mut self,
        k: &[u8],
        v: &[u8],
        emit: &mut impl FnMut(&[u8], &[u8]) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        const P: usize = keys::GEN_PREFIX_LEN;
        match k.get(P).copied() {
            Some(keys::KIND_CONV) => {
                // Only those with a mark: a million conversations need not all be kept.
                let m = ConvMeta::decode(k, v)?;
                if m.removed_below > 0 {
                    self.removed.insert(k[P + 1..].to_vec(), m.removed_below);
                }
            }
            Some(keys::KIND_ENV) | Some(keys::KIND_RUN) if k.len() < P + 1 + 2 + 8 => {
                return Err(corrupt_key(k, keys::DecodeError("key too short for its kind".into())));
            }
            Some(keys::KIND_ENV) => {
                let rb = self.removed_below(&k[P + 1..k.len() - 8])?;
                if rb > 0 && env_seq(k).is_ok_and(|s| s < rb) {
                    return Ok(());
                }
            }
            Some(keys::KIND_RUN) => {
                let r = RunRef::decode(v).map_err(|e| corrupt_key(k, e))?;
                let conv_part = &k[..k.len() - 8];
                let rb = self.removed_below(&conv_part[P + 1..])?;
                for (seq, value) in self.store.read_run(self.group, self.generation, k, run_first_seq(k)?, &r)? {
                    if seq < rb {
                        continue;
                    }
                    let mut ek = conv_part.to_vec();
                    ek[P] = keys::KIND_ENV;
                    ek.extend_from_slice(&seq.to_be_bytes());
                    emit(&ek[P..], &value)?;
                }
                return Ok(());
            }
            Some(keys::KIND_SEGS) | Some(keys::KIND_INDEX_LOG) => return Ok(()),
            _ => {}
        }
        emit(&k[P..], v)
    }
}

/// Writes collected for the overlay: `Some` puts, `None` deletes, later ones win.
#[derive(Default)]
struct Ops(Vec<(Vec<u8>, Option<Vec<u8>>)>);

impl Ops {
    fn insert(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.0.push((key, Some(value)));
    }

    fn remove(&mut self, key: impl AsRef<[u8]>) {
        self.0.push((key.as_ref().to_vec(), None));
    }
}

/// What one apply call has read and written but not yet handed to the overlay.
#[derive(Default)]
struct Run {
    group: GroupId,
    generation: u32,
    applied: Option<LogId>,
    membership: StoredMembership,
    /// Writes of this run, in order, for the overlay.
    batch: Ops,
    /// Conversation records read or changed (dirty: changed).
    convs: HashMap<String, (ConvMeta, bool)>,
    /// Dedupe entries added in this run (sled does not see the batch until it is written).
    dedupe: HashMap<Vec<u8>, (u64, u64)>,
    cursors: HashMap<Vec<u8>, (u64, u64)>,
    /// Erased runs `(segment, offset, bytes)` whose items this run deletes.
    zero: Vec<runs::Stretch>,
    /// Segments of the runs whose items this run deletes.
    dropped: Vec<u64>,
}

/// One group's state machine: what openraft drives. Cheap to clone.
#[derive(Clone)]
pub struct GroupStateMachine {
    store: StateStore,
    group: GroupId,
    rt: Arc<GroupRt>,
}

impl GroupStateMachine {
    pub fn group(&self) -> GroupId {
        self.group
    }

    pub fn store(&self) -> &StateStore {
        &self.store
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(StateStore, GroupId, Arc<GroupRt>) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, io::Error> {
        let (s, g, rt) = (self.store.clone(), self.group, self.rt.clone());
        tokio::task::spawn_blocking(move || f(s, g, rt)).await.map_err(io::Error::other)?.map_err(io::Error::from)
    }
}

/// The nice value of the thread that writes the bulk of a snapshot (0 is the node's own).
const SNAPSHOT_NICE: i32 = 10;

/// Lowers the calling thread's CPU priority to `nice` (on Linux `who = 0` names the calling
/// thread: the kernel keeps a nice value per thread). A thread cannot raise it again
/// unprivileged, and threads it starts inherit it: only for a thread that ends after its work
/// and starts none (the build's thread touches no sled, whose I/O pool grows from the thread
/// that submits work). Elsewhere a no-op.
fn lower_thread_priority(nice: i32) {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: setpriority takes no pointers and only reads its arguments.
        let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
        if rc != 0 {
            tracing::warn!(nice, error = %io::Error::last_os_error(), "could not lower the snapshot thread's priority");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = nice;
}

/// A snapshot build between its halves (`StateStore::begin_snapshot`, `read_view`).
struct SnapshotBuild {
    group: GroupId,
    generation: u32,
    meta: SnapshotMeta,
    file: SnapshotFileWriter,
    /// The dedupe time items checkpoints deleted since the first half.
    kept: KeptDeletes,
    /// The state index when the first half ran.
    view: index::IndexView,
    /// Records the first half wrote (sled's).
    sled_records: u64,
    /// How long the first half held the state machine.
    held: Duration,
    _pin: BuildPin,
    /// Removes the file unless it was published (a build dropped unfinished, or failed).
    _tmp: TmpFile,
}

/// A snapshot build between the phases of its second half (`StateStore::read_view`,
/// `write_runs`): the view is gone; the runs are to copy.
struct ViewRead {
    group: GroupId,
    generation: u32,
    meta: SnapshotMeta,
    file: SnapshotFileWriter,
    /// The conversations' `removed_below` marks read from the view (`Exporter::removed`).
    removed: HashMap<Vec<u8>, u64>,
    /// The spill file of the view's RUN items (removed when dropped).
    spill: TmpFile,
    runs: u64,
    dedupe_times: u64,
    sled_records: u64,
    held: Duration,
    view_held: Duration,
    /// How long the first phase took.
    took: Duration,
    _pin: BuildPin,
    _tmp: TmpFile,
}

/// Deletes its path when dropped (nothing if the file was renamed away meanwhile).
struct TmpFile(PathBuf);

impl Drop for TmpFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// Keeps checkpoints from zeroing or deleting a group's envelope segments, and installs of
/// the group from starting, while a snapshot build reads them (`Inner::building`).
struct BuildPin {
    inner: Arc<Inner>,
    at: (GroupId, u32),
}

impl BuildPin {
    fn new(inner: &Arc<Inner>, at: (GroupId, u32)) -> Self {
        *inner.building.lock().unwrap_or_else(|p| p.into_inner()).entry(at).or_insert(0) += 1;
        BuildPin { inner: inner.clone(), at }
    }
}

impl Drop for BuildPin {
    fn drop(&mut self) {
        let mut b = self.inner.building.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = b.get_mut(&self.at) {
            *n -= 1;
            if *n == 0 {
                b.remove(&self.at);
            }
        }
        drop(b);
        self.inner.build_done.notify_all();
    }
}

/// Has checkpoints keep, for one snapshot build, the dedupe time items of its group they
/// delete from sled (`Inner::keeping`), from its first half until it has read that kind
/// (`StateStore::write_dedupe_times`), or it is dropped.
struct KeptDeletes {
    inner: Arc<Inner>,
    kept: KeptItems,
}

impl KeptDeletes {
    fn new(inner: &Arc<Inner>, at: (GroupId, u32)) -> Self {
        let kept = KeptItems::default();
        inner.keeping.lock().unwrap_or_else(|p| p.into_inner()).push((at, kept.clone()));
        KeptDeletes { inner: inner.clone(), kept }
    }

    /// What was kept since the last call.
    fn take(&self) -> Vec<(Vec<u8>, sled::IVec)> {
        std::mem::take(&mut *self.kept.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl Drop for KeptDeletes {
    fn drop(&mut self) {
        self.inner.keeping.lock().unwrap_or_else(|p| p.into_inner()).retain(|(_, k)| !Arc::ptr_eq(k, &self.kept));
    }
}

/// A snapshot build begun when the builder was created (while no apply could run), finished
/// by `build_snapshot` while applies go on.
pub struct SnapshotBuilder {
    begun: Option<SnapshotBuild>,
    sm: GroupStateMachine,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = SnapshotData;

    async fn build_snapshot(&mut self) -> Result<Snapshot<SnapshotData>, io::Error> {
        let (meta, data) = match self.begun.take() {
            // Its two phases each one at a time on a node (separate turns: `Inner::view_turn`,
            // `build_turn`), on a thread of its own at a lower priority: the node's applies,
            // WAL writes and RPCs get the CPU first, and the build takes what they leave.
            Some(b) => {
                let inner = self.sm.store.inner.clone();
                let (store, rt) = (self.sm.store.clone(), self.sm.rt.clone());
                let (group, index) = (b.group, b.meta.last_log_id.map_or(0, |l| l.index));
                let read = {
                    let _turn = inner.view_turn.acquire().await.map_err(io::Error::other)?;
                    let store = store.clone();
                    on_build_thread(move || store.read_view(b)).await?
                };
                let built = match read {
                    Ok(read) => {
                        let _turn = inner.build_turn.acquire().await.map_err(io::Error::other)?;
                        let (store, rt) = (store.clone(), rt.clone());
                        on_build_thread(move || store.write_runs(&rt, read)).await?
                    }
                    Err(e) => Err(e),
                };
                let built = store.or_current(&rt, group, index, built);
                self.sm
                    .blocking(|s, _, _| {
                        s.after_build();
                        Ok(())
                    })
                    .await?;
                built.map_err(io::Error::from)?
            }
            None => self.sm.blocking(|s, g, rt| s.build_snapshot_blocking(g, &rt)).await?,
        };
        Ok(Snapshot { meta, snapshot: data })
    }
}

/// Runs `work` on a thread of its own at a lower priority (`SNAPSHOT_NICE`): a snapshot
/// build's, so that the node's applies, WAL writes and RPCs get the CPU first.
async fn on_build_thread<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> io::Result<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("habar-snapshot".into())
        .spawn(move || {
            lower_thread_priority(SNAPSHOT_NICE);
            let _ = tx.send(work());
        })
        .map_err(io::Error::other)?;
    rx.await.map_err(io::Error::other)
}

impl RaftStateMachine<TypeConfig> for GroupStateMachine {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        self.blocking(|s, g, rt| s.applied_state_at(g, rt.generation.load(Ordering::Acquire))).await
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: futures::Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        let mut batch = Vec::new();
        let mut responders = Vec::new();
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            batch.push(entry);
            responders.push(responder);
        }
        if batch.is_empty() {
            return Ok(());
        }
        let last = batch.last().map_or(0, |e| e.log_id.index);
        let entries = batch.len();
        let started = Instant::now();
        let (responses, changed, erasures) =
            self.blocking(move |s, g, rt| s.apply_blocking(g, rt.generation.load(Ordering::Acquire), &batch)).await?;
        let took = started.elapsed();
        for (r, resp) in responders.into_iter().zip(responses) {
            if let Some(r) = r {
                r.send(resp);
            }
        }
        // After the responses, so a slow log sink never delays them.
        if let Some(left_out) = self.store.inner.slow_apply.check(took) {
            tracing::warn!(
                group = self.group,
                entries,
                ms = crate::slow::ms(took),
                left_out,
                "slow apply to the state machine (responses of this shard waited)"
            );
        }
        self.rt.applied.send_replace(last);
        if !changed.is_empty() {
            // No receiver is fine: nobody subscribes on this node.
            let _ = self.rt.changes.send(Change::Appended(Arc::new(changed)));
        }
        if erasures > 0 {
            self.store.inner.erasures.send_modify(|n| *n += erasures);
        }
        Ok(())
    }

    async fn try_create_snapshot_builder(&mut self, _force: bool) -> Option<SnapshotBuilder> {
        // Never refused (not even while another group builds): the node counts the next try
        // from this one (`Node::trigger_due_snapshots`), so a refused group would wait
        // another `snapshot_logs_since_last` entries, and under uniform load could lose every
        // time. The second halves take turns instead (`Inner::build_turn`).
        // Begun here, where openraft holds the state machine exclusively, so the file is a
        // consistent point-in-time copy of the group; applies of this group wait only for
        // the first half (checkpoints and sled's part), not for the runs.
        match self.blocking(|s, g, _| s.begin_snapshot(g)).await {
            Ok(b) => Some(SnapshotBuilder { begun: Some(b), sm: self.clone() }),
            Err(e) => {
                tracing::error!(group = self.group, error = %e, "building a snapshot failed");
                None
            }
        }
    }

    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder {
        SnapshotBuilder { begun: None, sm: self.clone() }
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta, snapshot: SnapshotData) -> Result<(), io::Error> {
        let m = meta.clone();
        self.blocking(move |s, g, rt| s.install_blocking(g, &rt, &m, &snapshot)).await?;
        self.rt.applied.send_replace(meta.last_log_id.map_or(0, |l| l.index));
        let _ = self.rt.changes.send(Change::All);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<SnapshotData>>, io::Error> {
        // Checked on every call (at start and before each send to a peer): a file damaged
        // on disk since it was written is replaced, never streamed.
        let cur = self.blocking(|s, g, rt| s.current_snapshot_checked(g, &rt)).await?;
        Ok(cur.map(|(meta, snapshot)| Snapshot { meta, snapshot }))
    }
}

#[cfg(test)]
mod conv_filter_tests {
    use super::ConvFilter;
    use crate::keys;

    /// Property: the filter says "may exist" for every CONV key added (and ignores keys of
    /// other kinds), "does not" for others, and once it passes its limit it is dropped and
    /// says "may exist" for everything (lookups go to the index, as without it).
    #[test]
    fn the_conversation_filter_is_a_superset_and_gives_up_past_its_limit() {
        let f = ConvFilter::new(3);
        let conv = |c: &str| keys::conv_key(1, 1, c.as_bytes());
        let env = keys::env_key(1, 1, b"x", 1);
        f.add([conv("a").as_slice(), conv("b").as_slice(), env.as_slice()]);
        assert!(f.may_exist(&conv("a")) && f.may_exist(&conv("b")));
        assert!(!f.may_exist(&conv("x")), "an ENV key does not add its conversation");
        assert!(!f.may_exist(&conv("c")));
        assert!(!f.may_exist(&keys::conv_key(1, 2, b"a")), "another generation's set is its own");
        f.add([conv("c").as_slice()]);
        assert!(f.may_exist(&conv("c")) && !f.may_exist(&conv("d")));
        f.add([conv("d").as_slice()]);
        assert!(f.may_exist(&conv("never added")), "dropped past the limit");
    }

    /// Property: an install's new generation starts from the snapshot's keys, and the switch
    /// frees the old generation's set, so installs do not fill the filter to its limit.
    #[test]
    fn an_install_frees_the_old_generations_set() {
        let f = ConvFilter::new(4);
        let conv = |generation: u32, c: &str| keys::conv_key(1, generation, c.as_bytes());
        f.add([conv(1, "a").as_slice(), conv(1, "b").as_slice()]);
        f.add([keys::conv_key(2, 1, b"other group").as_slice()]);
        f.reset(1, 2);
        f.add([conv(2, "a").as_slice()]);
        assert!(f.may_exist(&conv(2, "a")) && !f.may_exist(&conv(2, "b")));
        f.retain_only(1, 2);
        assert!(!f.may_exist(&conv(1, "a")), "the old generation's set is gone");
        assert!(f.may_exist(&keys::conv_key(2, 1, b"other group")), "other groups keep theirs");
        // 2 hashes held now (the other group's and 2/a): two more fit in the limit of 4 (had
        // the old set stayed, the first of them would pass it).
        assert!(f.add([conv(2, "c").as_slice()]) && f.add([conv(2, "d").as_slice()]));
        assert!(!f.may_exist(&conv(2, "never")));
    }
}
