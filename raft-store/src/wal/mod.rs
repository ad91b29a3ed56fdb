//! One write-ahead log per node, shared by every Raft group.
//!
//! Appends from all groups go into the active segment with one positional write each
//! (page cache only, so the entries are readable as soon as `append` returns). A single
//! sync thread runs `fdatasync` in a loop: everything written while one fdatasync runs is
//! covered by the next one, so one fdatasync acknowledges the appends of many groups and
//! requests (group commit). A callback registered for a write fires only after an
//! fdatasync that started after that write completed.
//!
//! Truncation, purge, votes and committed ids are records in the same log, so their order
//! against entries is the log's order. Every segment after the first starts with a
//! checkpoint record that carries each group's purge point, vote and committed id, so a
//! segment can be deleted as soon as no group has a live entry in it or before it.
//!
//! See `record.rs` for the byte layout and `ARCHITECTURE.md` for the durability contract.

pub mod record;
pub(crate) mod seg_file;

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::collections::VecDeque;
use std::fs;
use std::fs::File;
use std::fs::OpenOptions;
use std::io;
use std::io::Read;
use std::path::Path;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::sync::Condvar;
use std::sync::Mutex;
use std::sync::MutexGuard;
use std::thread::JoinHandle;
use std::time::Instant;

use record::Body;
use record::GroupMeta;
use seg_file::SegFile;

use crate::types::GroupId;

/// Called once the write it was registered for is durable (or failed to become so).
pub type Done = Box<dyn FnOnce(io::Result<()>) + Send + 'static>;

/// A position in this process's stream of WAL writes (bytes written since open).
pub type Lsn = u64;

/// Errors of the WAL. Corruption names the file and the byte offset.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("WAL I/O error on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("WAL corruption in {path} at offset {offset}: {reason}")]
    Corrupt { path: PathBuf, offset: u64, reason: String },
    #[error("WAL record of {len} bytes exceeds the limit of {limit} bytes (wal max_record_bytes)")]
    RecordTooLarge { len: usize, limit: usize },
    #[error("WAL is failed after an earlier I/O error and accepts no writes: {0}")]
    Poisoned(String),
    #[error("WAL log of group {group} would have a hole: appending index {index} after {last}")]
    Hole { group: GroupId, index: u64, last: u64 },
}

impl From<WalError> for io::Error {
    fn from(e: WalError) -> Self {
        let kind = match &e {
            WalError::Io { source, .. } => source.kind(),
            WalError::Corrupt { .. } => io::ErrorKind::InvalidData,
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, e)
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> WalError + '_ {
    move |source| WalError::Io { path: path.to_path_buf(), source }
}

/// WAL settings.
#[derive(Debug, Clone)]
pub struct WalConfig {
    pub dir: PathBuf,
    /// A new segment is started once the active one reaches this size.
    pub segment_bytes: u64,
    /// Largest record accepted on write and on read (a larger length on disk is corruption).
    pub max_record_bytes: usize,
    /// Test only: the power-loss model (`seg_file.rs`). Writes reach the operating system
    /// only when an fsync covers them, so killing the process loses every write no fsync
    /// covered, as a power cut would.
    pub lose_unsynced_writes: bool,
    /// An fdatasync slower than this is logged as a warning (at most once a second); zero:
    /// never.
    pub slow_warn: std::time::Duration,
}

impl WalConfig {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            segment_bytes: 64 << 20,
            max_record_bytes: 64 << 20,
            lose_unsynced_writes: false,
            slow_warn: crate::slow::DEFAULT_SLOW_WARN,
        }
    }
}

/// One entry as read back from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalEntry {
    pub index: u64,
    pub term: u64,
    pub payload: Vec<u8>,
}

/// Where one entry's record lives.
#[derive(Debug, Clone, Copy)]
struct Loc {
    seg: u64,
    /// Offset of the record's frame in its segment.
    offset: u64,
    body_len: u32,
    term: u64,
    /// Bytes of the group's entry bodies from the first this process saw through this one
    /// (set by `GroupLog::push`): the bytes between two entries are a subtraction.
    end: u64,
}

/// A group's log as the WAL indexes it in memory: locations only, never payloads.
#[derive(Debug, Default)]
struct GroupLog {
    /// Index of `locs[0]`; when `locs` is empty, the index the next entry will have.
    first_index: u64,
    locs: VecDeque<Loc>,
    /// `end` of the last entry purged from `locs` (0 before any).
    purged_end: u64,
    last_purged: Option<(u64, u64)>,
    vote: Option<Vec<u8>>,
    committed: Option<Vec<u8>>,
}

impl GroupLog {
    fn last(&self) -> Option<(u64, u64)> {
        match self.locs.back() {
            Some(l) => Some((self.first_index + self.locs.len() as u64 - 1, l.term)),
            None => self.last_purged,
        }
    }

    fn truncate_from(&mut self, from: u64) {
        let keep = from.saturating_sub(self.first_index).min(self.locs.len() as u64);
        self.locs.truncate(keep as usize);
    }

    fn purge(&mut self, index: u64, term: u64) {
        if self.last_purged.is_some_and(|(i, _)| i >= index) {
            return;
        }
        self.last_purged = Some((index, term));
        while !self.locs.is_empty() && self.first_index <= index {
            if let Some(l) = self.locs.pop_front() {
                self.purged_end = l.end;
            }
            self.first_index += 1;
        }
        if self.locs.is_empty() {
            self.first_index = index + 1;
        }
    }

    fn push(&mut self, group: GroupId, index: u64, mut loc: Loc) -> Result<(), WalError> {
        if self.last_purged.is_some_and(|(i, _)| index <= i) {
            // Stale: at or before the purge point (replay of a record purged later).
            return Ok(());
        }
        if self.locs.is_empty() {
            self.first_index = index;
        } else {
            // Re-appending at or below the last index replaces that suffix.
            self.truncate_from(index);
            let next = self.first_index + self.locs.len() as u64;
            if self.locs.is_empty() {
                self.first_index = index;
            } else if index != next {
                return Err(WalError::Hole { group, index, last: next - 1 });
            }
        }
        loc.end = self.locs.back().map_or(self.purged_end, |l| l.end) + u64::from(loc.body_len);
        self.locs.push_back(loc);
        Ok(())
    }

    /// Bytes of the bodies of the entries held after `index` (all held if `index` is
    /// before the first).
    fn bytes_after(&self, index: u64) -> u64 {
        let Some(last) = self.locs.back() else { return 0 };
        if index < self.first_index {
            return last.end - self.purged_end;
        }
        match self.locs.get((index - self.first_index) as usize) {
            Some(l) => last.end - l.end,
            None => 0,
        }
    }

    fn meta(&self, group: GroupId) -> GroupMeta {
        GroupMeta { group, last_purged: self.last_purged, vote: self.vote.clone(), committed: self.committed.clone() }
    }
}

/// What the log-store adapter needs to know of one group.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupState {
    pub last_purged: Option<(u64, u64)>,
    pub last: Option<(u64, u64)>,
    pub vote: Option<Vec<u8>>,
    pub committed: Option<Vec<u8>>,
}

/// Counters the WAL exposes, e.g. to show that group commit groups.
#[derive(Debug, Default)]
pub struct WalStats {
    /// `append` calls that wrote entries.
    pub appends: AtomicU64,
    pub entries: AtomicU64,
    pub fsyncs: AtomicU64,
    pub bytes: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalStatsSnapshot {
    pub appends: u64,
    pub entries: u64,
    pub fsyncs: u64,
    pub bytes: u64,
}

struct Segment {
    file: Arc<SegFile>,
    path: PathBuf,
}

struct State {
    groups: HashMap<GroupId, GroupLog>,
    segments: BTreeMap<u64, Segment>,
    active_seq: u64,
    active_len: u64,
    written: Lsn,
    synced: Lsn,
    /// A segment was created or deleted: the directory needs an fsync.
    dir_dirty: bool,
    /// Callbacks waiting for `synced >= lsn`, in increasing `lsn`.
    waiters: VecDeque<(Lsn, Done)>,
    poisoned: Option<String>,
    shutdown: bool,
    buf: Vec<u8>,
}

impl State {
    fn active(&self) -> Arc<SegFile> {
        // The active segment is always in the map: it is inserted before it becomes active.
        self.segments[&self.active_seq].file.clone()
    }

    /// The segment of the oldest entry any group holds, and that group: no segment before it
    /// is needed, and it cannot go before that group purges.
    fn oldest_held(&self) -> Option<(u64, GroupId)> {
        self.groups.iter().filter_map(|(g, l)| l.locs.front().map(|f| (f.seg, *g))).min()
    }

    fn check_poisoned(&self) -> Result<(), WalError> {
        match &self.poisoned {
            Some(reason) => Err(WalError::Poisoned(reason.clone())),
            None => Ok(()),
        }
    }
}

struct Shared {
    cfg: WalConfig,
    dir: File,
    state: Mutex<State>,
    cv: Condvar,
    stats: WalStats,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves no half-done write we could recover from
        // in memory; the data on disk is still consistent, so carry on with the state.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Handle to the node's WAL. Cheap to clone; the sync thread stops when the last handle
/// is dropped (after completing pending syncs).
#[derive(Clone)]
pub struct Wal {
    inner: Arc<WalInner>,
}

struct WalInner {
    shared: Arc<Shared>,
    syncer: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for WalInner {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.cv.notify_all();
        if let Some(h) = self.syncer.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = h.join();
        }
    }
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:020}.wal"))
}

impl Wal {
    /// Opens (or creates) the WAL in `cfg.dir`, replaying every segment. A torn tail of the
    /// last segment is cut off; corruption anywhere else is an error naming file and offset.
    pub fn open(cfg: WalConfig) -> Result<Wal, WalError> {
        crate::repair::create_dir_durably(&cfg.dir).map_err(io_err(&cfg.dir))?;
        let dir = File::open(&cfg.dir).map_err(io_err(&cfg.dir))?;

        let mut seqs = Vec::new();
        for ent in fs::read_dir(&cfg.dir).map_err(io_err(&cfg.dir))? {
            let ent = ent.map_err(io_err(&cfg.dir))?;
            let name = ent.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(stem) = name.strip_suffix(".wal") {
                if let Ok(seq) = stem.parse::<u64>() {
                    seqs.push(seq);
                }
            }
        }
        seqs.sort_unstable();

        let mut groups: HashMap<GroupId, GroupLog> = HashMap::new();
        let mut segments = BTreeMap::new();
        let mut active_len = 0;
        let mut dir_dirty = false;
        let mut last_sealed = false;
        let last_pos = seqs.len().checked_sub(1);
        for (i, &seq) in seqs.iter().enumerate() {
            let path = segment_path(&cfg.dir, seq);
            let next = seqs.get(i + 1).copied();
            match replay_segment(&path, seq, next, cfg.max_record_bytes, &mut groups)? {
                Some((len, sealed)) => {
                    last_sealed = sealed && Some(i) == last_pos;
                    let file = OpenOptions::new().read(true).write(true).open(&path).map_err(io_err(&path))?;
                    active_len = len;
                    let file = SegFile::new(file, cfg.lose_unsynced_writes);
                    segments.insert(seq, Segment { file: Arc::new(file), path });
                }
                None => {
                    // The last segment's header itself was torn: it never held anything.
                    fs::remove_file(&path).map_err(io_err(&path))?;
                    dir_dirty = true;
                }
            }
        }

        if segments.is_empty() {
            let seq = 1;
            let path = segment_path(&cfg.dir, seq);
            let file = create_segment(&path, seq, cfg.lose_unsynced_writes)?;
            dir.sync_all().map_err(io_err(&cfg.dir))?;
            active_len = record::HEADER_LEN as u64;
            segments.insert(seq, Segment { file: Arc::new(file), path });
        }
        if dir_dirty {
            dir.sync_all().map_err(io_err(&cfg.dir))?;
        }
        let active_seq = *segments.keys().next_back().unwrap_or(&1);

        let shared = Arc::new(Shared {
            cfg,
            dir,
            state: Mutex::new(State {
                groups,
                segments,
                active_seq,
                active_len,
                written: 0,
                synced: 0,
                dir_dirty: false,
                waiters: VecDeque::new(),
                poisoned: None,
                shutdown: false,
                buf: Vec::with_capacity(64 << 10),
            }),
            cv: Condvar::new(),
            stats: WalStats::default(),
        });
        let s2 = shared.clone();
        let syncer = std::thread::Builder::new()
            .name("habar-wal-sync".into())
            .spawn(move || sync_loop(&s2))
            .map_err(io_err(&shared.cfg.dir))?;
        let wal = Wal { inner: Arc::new(WalInner { shared, syncer: Mutex::new(Some(syncer)) }) };
        if last_sealed {
            // A crash between sealing a segment and creating the next: nothing may follow a
            // seal, so start the next segment now.
            wal.roll()?;
        }
        Ok(wal)
    }

    fn shared(&self) -> &Shared {
        &self.inner.shared
    }

    /// Appends entries `(index, term, payload)` of one group, in index order. They are
    /// readable when this returns; `done` is called once they are durable.
    pub fn append<'a>(
        &self,
        group: GroupId,
        entries: impl IntoIterator<Item = (u64, u64, &'a [u8])>,
        done: Option<Done>,
    ) -> Result<Lsn, WalError> {
        let sh = self.shared();
        let mut st = sh.lock();
        st.check_poisoned()?;
        self.maybe_rotate(&mut st, false)?;
        let base = st.active_len;
        let seg = st.active_seq;
        let mut buf = std::mem::take(&mut st.buf);
        buf.clear();
        let mut new_locs = Vec::new();
        for (index, term, payload) in entries {
            let start = buf.len();
            record::push_record(&mut buf, record::KIND_ENTRY, group, |b| {
                b.extend_from_slice(&index.to_le_bytes());
                b.extend_from_slice(&term.to_le_bytes());
                b.extend_from_slice(payload);
            });
            let body_len = buf.len() - start - record::FRAME_LEN;
            if body_len > sh.cfg.max_record_bytes {
                st.buf = buf;
                return Err(WalError::RecordTooLarge { len: body_len, limit: sh.cfg.max_record_bytes });
            }
            new_locs.push((index, Loc { seg, offset: base + start as u64, body_len: body_len as u32, term, end: 0 }));
        }
        let n = new_locs.len() as u64;
        // Index first (checks for holes) on a copy, so a rejected batch changes nothing.
        {
            let glog = st.groups.entry(group).or_default();
            if let (Some(&(first, _)), Some((last, _))) = (new_locs.first(), glog.last()) {
                if first > last + 1 && !glog.locs.is_empty() {
                    st.buf = buf;
                    return Err(WalError::Hole { group, index: first, last });
                }
            }
        }
        let res = self.write_locked(&mut st, &buf);
        st.buf = buf;
        let lsn = res?;
        let glog = st.groups.entry(group).or_default();
        for (index, loc) in new_locs {
            glog.push(group, index, loc)?;
        }
        sh.stats.appends.fetch_add(1, Ordering::Relaxed);
        sh.stats.entries.fetch_add(n, Ordering::Relaxed);
        metrics::counter!("habar_wal_entries_total").increment(n);
        if let Some(done) = done {
            Self::register(sh, &mut st, lsn, done);
        }
        Ok(lsn)
    }

    /// Removes entries with index `>= from` (a conflicting suffix). Returns the LSN to wait
    /// for to make the truncation durable.
    pub fn truncate_from(&self, group: GroupId, from: u64) -> Result<Lsn, WalError> {
        self.write_meta(group, record::KIND_TRUNCATE, &from.to_le_bytes(), |g| g.truncate_from(from))
    }

    /// Removes entries up to and including `index` (behind a snapshot).
    pub fn purge(&self, group: GroupId, index: u64, term: u64) -> Result<Lsn, WalError> {
        let mut body = [0u8; 16];
        body[..8].copy_from_slice(&index.to_le_bytes());
        body[8..].copy_from_slice(&term.to_le_bytes());
        self.write_meta(group, record::KIND_PURGE, &body, |g| g.purge(index, term))
    }

    pub fn save_vote(&self, group: GroupId, vote: &[u8]) -> Result<Lsn, WalError> {
        let v = vote.to_vec();
        self.write_meta(group, record::KIND_VOTE, vote, move |g| g.vote = Some(v))
    }

    pub fn save_committed(&self, group: GroupId, committed: &[u8]) -> Result<Lsn, WalError> {
        let c = committed.to_vec();
        self.write_meta(group, record::KIND_COMMITTED, committed, move |g| g.committed = Some(c))
    }

    fn write_meta(
        &self,
        group: GroupId,
        kind: u8,
        body: &[u8],
        apply: impl FnOnce(&mut GroupLog),
    ) -> Result<Lsn, WalError> {
        let sh = self.shared();
        let mut st = sh.lock();
        st.check_poisoned()?;
        self.maybe_rotate(&mut st, false)?;
        let mut buf = Vec::with_capacity(record::FRAME_LEN + record::BODY_PREFIX_LEN + body.len());
        record::push_record(&mut buf, kind, group, |b| b.extend_from_slice(body));
        let lsn = self.write_locked(&mut st, &buf)?;
        apply(st.groups.entry(group).or_default());
        Ok(lsn)
    }

    /// Calls `done` once everything written up to `lsn` is durable.
    pub fn on_durable(&self, lsn: Lsn, done: Done) {
        let sh = self.shared();
        let mut st = sh.lock();
        Self::register(sh, &mut st, lsn, done);
    }

    /// Waits (without blocking the async runtime) until `lsn` is durable.
    pub async fn wait_durable(&self, lsn: Lsn) -> io::Result<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.on_durable(
            lsn,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        rx.await.map_err(|_| io::Error::other("WAL sync thread stopped"))?
    }

    /// Blocking variant of [`Wal::wait_durable`], for threads outside the runtime.
    pub fn wait_durable_blocking(&self, lsn: Lsn) -> io::Result<()> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.on_durable(
            lsn,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        rx.recv().map_err(|_| io::Error::other("WAL sync thread stopped"))?
    }

    fn register(sh: &Shared, st: &mut State, lsn: Lsn, done: Done) {
        if let Some(reason) = &st.poisoned {
            done(Err(io::Error::other(format!("WAL failed: {reason}"))));
        } else if lsn <= st.synced {
            done(Ok(()));
        } else {
            st.waiters.push_back((lsn, done));
            sh.cv.notify_one();
        }
    }

    /// Writes `buf` at the end of the active segment. On failure the WAL is poisoned: a
    /// partial write may be on disk and only a reopen (which cuts torn tails) is safe.
    fn write_locked(&self, st: &mut State, buf: &[u8]) -> Result<Lsn, WalError> {
        let sh = self.shared();
        let file = st.active();
        if let Err(e) = file.write_all_at(buf, st.active_len) {
            let path = segment_path(&sh.cfg.dir, st.active_seq);
            st.poisoned = Some(format!("write to {} failed: {e}", path.display()));
            return Err(WalError::Io { path, source: e });
        }
        st.active_len += buf.len() as u64;
        st.written += buf.len() as u64;
        sh.stats.bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(st.written)
    }

    /// Starts a new segment once the active one is full. The new segment begins with a
    /// checkpoint of every group's meta, so older segments can later be deleted.
    fn maybe_rotate(&self, st: &mut State, force: bool) -> Result<(), WalError> {
        let sh = self.shared();
        if !force && st.active_len < sh.cfg.segment_bytes {
            return Ok(());
        }
        // The full segment is made durable before the next one exists (one fdatasync per
        // segment, under the lock). So a segment with anything on disk always follows a
        // complete, durable one, and after a crash only the last segment can be torn: a
        // torn record anywhere else is corruption, never a power cut.
        let old = st.active();
        let next_seq = st.active_seq + 1;
        let mut seal = Vec::with_capacity(record::FRAME_LEN + record::BODY_PREFIX_LEN + 16);
        record::push_record(&mut seal, record::KIND_SEAL, 0, |b| {
            b.extend_from_slice(&st.active_len.to_le_bytes());
            b.extend_from_slice(&next_seq.to_le_bytes());
        });
        self.write_locked(st, &seal)?;
        if let Err(e) = old.sync_data() {
            let path = segment_path(&sh.cfg.dir, st.active_seq);
            st.poisoned = Some(format!("fdatasync of full segment {} failed: {e}", path.display()));
            return Err(WalError::Io { path, source: e });
        }
        let seq = next_seq;
        let path = segment_path(&sh.cfg.dir, seq);
        let file = create_segment_unsynced(&path, seq, sh.cfg.lose_unsynced_writes)?;
        let mut metas: Vec<GroupMeta> = st.groups.iter().map(|(g, l)| l.meta(*g)).collect();
        metas.sort_by_key(|m| m.group);
        let payload = postcard::to_allocvec(&metas).map_err(|e| WalError::Io {
            path: path.clone(),
            source: io::Error::other(format!("encoding checkpoint: {e}")),
        })?;
        let mut buf = Vec::with_capacity(payload.len() + 16);
        record::push_record(&mut buf, record::KIND_CHECKPOINT, 0, |b| b.extend_from_slice(&payload));
        if let Err(e) = file.write_all_at(&buf, record::HEADER_LEN as u64) {
            st.poisoned = Some(format!("write to {} failed: {e}", path.display()));
            return Err(WalError::Io { path, source: e });
        }
        st.segments.insert(seq, Segment { file: Arc::new(file), path });
        st.active_seq = seq;
        st.active_len = (record::HEADER_LEN + buf.len()) as u64;
        st.written += st.active_len;
        st.dir_dirty = true;
        metrics::counter!("habar_wal_segments_created_total").increment(1);
        Ok(())
    }

    /// Starts a new segment now, whatever the active one's size: after an erasure, so the
    /// segment that holds the erased bytes can be deleted once every group purged past it.
    pub fn roll(&self) -> Result<(), WalError> {
        let sh = self.shared();
        let mut st = sh.lock();
        if let Some(reason) = &st.poisoned {
            return Err(WalError::Io {
                path: segment_path(&sh.cfg.dir, st.active_seq),
                source: io::Error::other(format!("WAL failed: {reason}")),
            });
        }
        self.maybe_rotate(&mut st, true)
    }

    /// Deletes segments in which, and before which, no group has a live entry. Call after
    /// a purge is durable. Returns how many segments were deleted.
    pub fn delete_obsolete_segments(&self) -> Result<usize, WalError> {
        let sh = self.shared();
        let victims: Vec<(u64, PathBuf)> = {
            let mut st = sh.lock();
            let min_live = st.oldest_held().map_or(st.active_seq, |(seg, _)| seg).min(st.active_seq);
            // The segment `min_live` must start with a durable checkpoint: it does unless it
            // is segment 1, which has nothing before it anyway; and it is durable because
            // it was written before the purge record the caller waited for.
            let seqs: Vec<u64> = st.segments.range(..min_live).map(|(s, _)| *s).collect();
            seqs.into_iter().filter_map(|s| st.segments.remove(&s).map(|seg| (s, seg.path))).collect()
        };
        for (_, path) in &victims {
            fs::remove_file(path).map_err(io_err(path))?;
        }
        if !victims.is_empty() {
            sh.dir.sync_all().map_err(io_err(&sh.cfg.dir))?;
            metrics::counter!("habar_wal_segments_deleted_total").increment(victims.len() as u64);
        }
        Ok(victims.len())
    }

    /// Entries of `group` with index in `[start, end)` that the log holds, in order.
    pub fn read(&self, group: GroupId, start: u64, end: u64) -> Result<Vec<WalEntry>, WalError> {
        let sh = self.shared();
        let wanted: Vec<(u64, Loc, Arc<SegFile>, PathBuf)> = {
            let st = sh.lock();
            let Some(g) = st.groups.get(&group) else { return Ok(Vec::new()) };
            let lo = start.max(g.first_index);
            let hi = end.min(g.first_index + g.locs.len() as u64);
            let mut v = Vec::with_capacity(hi.saturating_sub(lo) as usize);
            for idx in lo..hi {
                let loc = g.locs[(idx - g.first_index) as usize];
                let Some(seg) = st.segments.get(&loc.seg) else {
                    return Err(WalError::Corrupt {
                        path: segment_path(&sh.cfg.dir, loc.seg),
                        offset: loc.offset,
                        reason: format!("segment of group {group} index {idx} is missing"),
                    });
                };
                v.push((idx, loc, seg.file.clone(), seg.path.clone()));
            }
            v
        };
        let mut out = Vec::with_capacity(wanted.len());
        let mut buf = Vec::new();
        for (idx, loc, file, path) in wanted {
            let len = record::FRAME_LEN + loc.body_len as usize;
            buf.resize(len, 0);
            file.read_exact_at(&mut buf, loc.offset).map_err(io_err(&path))?;
            let corrupt = |reason: String| WalError::Corrupt { path: path.clone(), offset: loc.offset, reason };
            let body = match crate::frame::parse(&buf, 0, loc.body_len as usize) {
                Ok((body, end)) if end == len => body,
                _ => return Err(corrupt("record changed on disk since it was written (crc or length)".into())),
            };
            match record::decode_body(body).map_err(corrupt)? {
                Body::Entry { group: g, index, term, payload } if g == group && index == idx => {
                    out.push(WalEntry { index, term, payload: payload.to_vec() })
                }
                other => return Err(corrupt(format!("expected entry {group}/{idx}, found {other:?}"))),
            }
        }
        Ok(out)
    }

    pub fn group_state(&self, group: GroupId) -> GroupState {
        let st = self.shared().lock();
        match st.groups.get(&group) {
            Some(g) => GroupState {
                last_purged: g.last_purged,
                last: g.last(),
                vote: g.vote.clone(),
                committed: g.committed.clone(),
            },
            None => GroupState::default(),
        }
    }

    /// Bytes of the bodies of `group`'s entries after `index` that the log holds (purged
    /// ones not counted; those replayed at open are): how much log a snapshot at `index`
    /// would leave behind.
    pub fn bytes_after(&self, group: GroupId, index: u64) -> u64 {
        self.shared().lock().groups.get(&group).map_or(0, |g| g.bytes_after(index))
    }

    /// The bytes of the full segments that held entries keep on disk (counted at the
    /// segment size: from the one with the oldest held entry to the active one, which no
    /// purge frees), and the group whose oldest held entry lies in the oldest of them (the
    /// first that must purge for any of them to go; `None` if no group holds an entry).
    pub fn retention(&self) -> (u64, Option<GroupId>) {
        let sh = self.shared();
        let st = sh.lock();
        let oldest = st.oldest_held();
        let kept = oldest.map_or(0, |(seg, _)| st.segments.range(seg..st.active_seq).count() as u64);
        (kept * sh.cfg.segment_bytes, oldest.map(|(_, g)| g))
    }

    /// Groups that have anything in the log.
    pub fn groups(&self) -> Vec<GroupId> {
        let mut v: Vec<GroupId> = self.shared().lock().groups.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// Sequence numbers of the segments on disk.
    pub fn segments(&self) -> Vec<u64> {
        self.shared().lock().segments.keys().copied().collect()
    }

    pub fn stats(&self) -> WalStatsSnapshot {
        let s = &self.shared().stats;
        WalStatsSnapshot {
            appends: s.appends.load(Ordering::Relaxed),
            entries: s.entries.load(Ordering::Relaxed),
            fsyncs: s.fsyncs.load(Ordering::Relaxed),
            bytes: s.bytes.load(Ordering::Relaxed),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.shared().cfg.dir
    }
}

fn create_segment_unsynced(path: &Path, seq: u64, lose_unsynced_writes: bool) -> Result<SegFile, WalError> {
    let file = OpenOptions::new().read(true).write(true).create_new(true).open(path).map_err(io_err(path))?;
    let file = SegFile::new(file, lose_unsynced_writes);
    file.write_all_at(&record::encode_header(seq), 0).map_err(io_err(path))?;
    Ok(file)
}

fn create_segment(path: &Path, seq: u64, lose_unsynced_writes: bool) -> Result<SegFile, WalError> {
    let file = create_segment_unsynced(path, seq, lose_unsynced_writes)?;
    file.sync_all().map_err(io_err(path))?;
    Ok(file)
}

/// Replays one segment into `groups`. `next` is the sequence number of the segment after
/// it on disk (`None` for the last one). Returns the length of its valid prefix and whether
/// it ends with a seal, or `None` when the last segment's header is torn (the segment never
/// held a record).
///
/// Only the last segment may end in a torn record, and only one that runs past the end of
/// the file or is followed by nothing but zeros (a write the crash interrupted). A complete
/// record with a bad CRC is corruption wherever it is: a bit flip in the last record must not
/// be cut as if it were torn, or an acknowledged entry would vanish silently.
fn replay_segment(
    path: &Path,
    seq: u64,
    next: Option<u64>,
    max_record: usize,
    groups: &mut HashMap<GroupId, GroupLog>,
) -> Result<Option<(u64, bool)>, WalError> {
    let is_last = next.is_none();
    let mut data = Vec::new();
    File::open(path).and_then(|mut f| f.read_to_end(&mut data)).map_err(io_err(path))?;
    let corrupt =
        |offset: usize, reason: String| WalError::Corrupt { path: path.to_path_buf(), offset: offset as u64, reason };

    let version = match record::decode_header(&data) {
        Ok((s, v)) if s == seq => v,
        Ok((s, _)) => return Err(corrupt(0, format!("header says segment {s}, file name says {seq}"))),
        Err(reason) => {
            let all_zero = data.iter().all(|b| *b == 0);
            if is_last && (data.len() < record::HEADER_LEN || all_zero) {
                tracing::warn!(path = %path.display(), "removing last WAL segment with a torn header");
                return Ok(None);
            }
            return Err(corrupt(0, reason));
        }
    };

    let mut pos = record::HEADER_LEN;
    let len = data.len();
    // Offset of the last record when it is a seal.
    let mut sealed_at = None;
    while pos < len {
        // Decide whether a bad record at `pos` is a torn tail (cut it) or corruption:
        // `complete` says the record's frame fits in the file.
        let torn_ok = |complete: bool| -> bool { is_last && (!complete || data[pos..].iter().all(|b| *b == 0)) };
        let (body, end) = match crate::frame::parse(&data, pos, max_record) {
            Ok(record) => record,
            Err(damage) => {
                // Only a CRC mismatch means the whole record is in the file.
                if torn_ok(damage == crate::frame::Damage::CrcMismatch) {
                    break;
                }
                return Err(corrupt(pos, damage.to_string()));
            }
        };
        let parsed = match record::decode_body(body) {
            Ok(b) => b,
            Err(reason) => {
                if torn_ok(true) {
                    break;
                }
                return Err(corrupt(pos, reason));
            }
        };
        sealed_at = None;
        if let Body::Seal { offset, next: named } = parsed {
            if offset != pos as u64 {
                return Err(corrupt(pos, format!("seal names offset {offset} but sits at {pos}")));
            }
            if next.is_some_and(|n| n != named) {
                return Err(corrupt(
                    pos,
                    format!("seal names segment {named} as the next, but the next on disk is {next:?} (a segment is missing)"),
                ));
            }
            sealed_at = Some(pos);
        }
        apply_replayed(parsed, seq, pos as u64, body.len() as u32, groups).map_err(|e| match e {
            WalError::Hole { group, index, last } => {
                corrupt(pos, format!("group {group}: entry {index} follows {last} (a hole)"))
            }
            other => other,
        })?;
        pos = end;
    }
    if !is_last && version >= 2 && sealed_at.is_none() {
        return Err(corrupt(
            pos,
            "segment does not end with a seal although a later segment exists: records were cut from its end".into(),
        ));
    }
    if pos < len {
        tracing::warn!(path = %path.display(), offset = pos, cut = len - pos, "cutting torn WAL tail");
        let f = OpenOptions::new().write(true).open(path).map_err(io_err(path))?;
        f.set_len(pos as u64).map_err(io_err(path))?;
        f.sync_all().map_err(io_err(path))?;
    }
    Ok(Some((pos as u64, sealed_at.is_some())))
}

fn apply_replayed(
    body: Body<'_>,
    seg: u64,
    offset: u64,
    body_len: u32,
    groups: &mut HashMap<GroupId, GroupLog>,
) -> Result<(), WalError> {
    match body {
        Body::Entry { group, index, term, .. } => {
            groups.entry(group).or_default().push(group, index, Loc { seg, offset, body_len, term, end: 0 })?
        }
        Body::Truncate { group, from } => groups.entry(group).or_default().truncate_from(from),
        Body::Purge { group, index, term } => groups.entry(group).or_default().purge(index, term),
        Body::Vote { group, bytes } => groups.entry(group).or_default().vote = Some(bytes.to_vec()),
        Body::Committed { group, bytes } => groups.entry(group).or_default().committed = Some(bytes.to_vec()),
        Body::Seal { .. } => {}
        Body::Checkpoint { bytes } => {
            let metas: Vec<GroupMeta> = postcard::from_bytes(bytes).map_err(|e| WalError::Corrupt {
                path: PathBuf::new(),
                offset,
                reason: format!("checkpoint does not decode: {e}"),
            })?;
            for m in metas {
                let g = groups.entry(m.group).or_default();
                if let Some((i, t)) = m.last_purged {
                    g.purge(i, t);
                }
                if m.vote.is_some() {
                    g.vote = m.vote;
                }
                if m.committed.is_some() {
                    g.committed = m.committed;
                }
            }
        }
    }
    Ok(())
}

/// The group-commit loop: fdatasync whatever was written, then release every waiter the
/// sync covered. Writes that land while a sync runs wait for the next one.
fn sync_loop(sh: &Shared) {
    let slow = crate::slow::SlowLog::new(sh.cfg.slow_warn);
    loop {
        // Only the active segment can hold unsynced writes: a full one is synced before the
        // next is created (`maybe_rotate`).
        let (target, active, dir_dirty) = {
            let mut st = sh.lock();
            while st.waiters.is_empty() && !st.shutdown {
                st = sh.cv.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            if st.waiters.is_empty() && st.shutdown {
                return;
            }
            let d = std::mem::replace(&mut st.dir_dirty, false);
            (st.written, st.active(), d)
        };

        let t0 = Instant::now();
        let mut result = active.sync_data();
        if result.is_ok() && dir_dirty {
            result = sh.dir.sync_all();
        }
        sh.stats.fsyncs.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("habar_wal_fsyncs_total").increment(1);
        let took = t0.elapsed();
        metrics::histogram!("habar_wal_fsync_seconds").record(took.as_secs_f64());

        let ready: Vec<Done> = {
            let mut st = sh.lock();
            match &result {
                Ok(()) => {
                    st.synced = target;
                    let mut ready = Vec::new();
                    while st.waiters.front().is_some_and(|(lsn, _)| *lsn <= target) {
                        if let Some((_, d)) = st.waiters.pop_front() {
                            ready.push(d);
                        }
                    }
                    ready
                }
                Err(e) => {
                    // After a failed fsync the kernel may have dropped dirty pages: nothing
                    // written since the last good sync can be trusted (fsyncgate). Fail all.
                    tracing::error!(error = %e, "WAL fdatasync failed; the WAL stops accepting writes");
                    st.poisoned = Some(format!("fdatasync failed: {e}"));
                    st.waiters.drain(..).map(|(_, d)| d).collect()
                }
            }
        };
        for d in ready {
            match &result {
                Ok(()) => d(Ok(())),
                Err(e) => d(Err(io::Error::new(e.kind(), format!("WAL fdatasync failed: {e}")))),
            }
        }
        // Logged after the waiters are released, so a slow log sink never delays them.
        if let Some(left_out) = slow.check(took) {
            tracing::warn!(
                dir = %sh.cfg.dir.display(),
                ms = crate::slow::ms(took),
                dir_sync = dir_dirty,
                left_out,
                "slow fdatasync of the WAL (the disk; acknowledgements on this node waited)"
            );
        }
    }
}
