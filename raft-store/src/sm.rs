//! The state machine on sled: one `sled::Db` per node, one Raft group per shard.
//!
//! Per group it keeps, under its active generation (see `keys.rs`): each conversation's last
//! `seq`, every envelope under (conversation, seq), and the last applied log id with the
//! membership. One `apply` call writes all of that in one atomic sled batch, so a crash
//! never leaves data and applied state apart.
//!
//! Durability: applies are not flushed one by one (the WAL is the durable record and
//! openraft re-applies from the durable applied state after a restart, up to the saved
//! committed id). sled is flushed before a snapshot is reported built, because openraft
//! purges the log behind a snapshot, and around the generation switch of an install.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::Path;
use std::path::PathBuf;
use std::sync::atomic::AtomicU32;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::sync::Mutex;

use futures::StreamExt;
use openraft::storage::EntryResponder;
use openraft::storage::RaftStateMachine;
use openraft::OptionalSend;
use openraft::RaftSnapshotBuilder;
use tokio::sync::watch;

use crate::error::hex;
use crate::error::io_err;
use crate::error::unix_nanos;
use crate::error::StoreError;
use crate::keys;
use crate::snapshot::SnapshotData;
use crate::snapshot::SnapshotFileWriter;
use crate::snapshot::SnapshotReader;
use crate::snapshot::SnapshotWriter;
use crate::types::Appended;
use crate::types::Command;
use crate::types::CommandResponse;
use crate::types::Entry;
use crate::types::EntryPayload;
use crate::types::GroupId;
use crate::types::LogId;
use crate::types::NewEnvelope;
use crate::types::Snapshot;
use crate::types::SnapshotMeta;
use crate::types::StoredEnvelope;
use crate::types::StoredMembership;
use crate::types::TypeConfig;
use crate::types::MESSAGE_ID_LEN;

/// Default sled page cache. sled's RAM use is several times this.
pub const DEFAULT_CACHE_CAPACITY: u64 = 64 << 20;
/// Bound on the records of one sled batch while installing a snapshot.
const INSTALL_BATCH_RECORDS: usize = 2048;
const INSTALL_BATCH_BYTES: usize = 8 << 20;

struct GroupRt {
    generation: AtomicU32,
    applied: watch::Sender<u64>,
    current: Mutex<Option<(SnapshotMeta, SnapshotData)>>,
}

struct Inner {
    db: sled::Db,
    data: sled::Tree,
    /// group (u32 BE) -> active generation (u32 BE), as a framed value.
    heads: sled::Tree,
    snap_dir: PathBuf,
    groups: Mutex<HashMap<GroupId, Arc<GroupRt>>>,
    /// Newest snapshot file per group found at open, before the group's runtime exists.
    found_snapshots: Mutex<HashMap<GroupId, (SnapshotMeta, SnapshotData)>>,
}

/// The node's state-machine store. Cheap to clone.
#[derive(Clone)]
pub struct StateStore {
    inner: Arc<Inner>,
}

fn corrupt_key(key: &[u8], e: keys::DecodeError) -> StoreError {
    StoreError::Corrupt { what: format!("sled key {}", hex(key)), offset: 0, reason: e.0 }
}

fn decode_u64(key: &[u8], v: &[u8]) -> Result<u64, StoreError> {
    let body = keys::decode_value(v).map_err(|e| corrupt_key(key, e))?;
    let b: [u8; 8] = body.try_into().map_err(|_| corrupt_key(key, keys::DecodeError("expected 8 bytes".into())))?;
    Ok(u64::from_be_bytes(b))
}

fn encode_envelope(e: &NewEnvelope, committed_at_ms: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(36 + e.sender.len() + e.ciphertext.len());
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
    if b.len() < 36 {
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

type AppliedState = (Option<LogId>, StoredMembership);

/// Crash-test hook: when the environment variable `HABAR_TEST_CRASH_IN_INSTALL` names this
/// point of a snapshot install, the process flushes sled (so what was written so far is on
/// disk, the worst case for atomicity) and aborts. Read once; unset in production.
fn crash_point(point: &str, db: &sled::Db) {
    static WANTED: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let wanted = WANTED.get_or_init(|| std::env::var("HABAR_TEST_CRASH_IN_INSTALL").ok());
    if wanted.as_deref() == Some(point) {
        let _ = db.flush();
        std::process::abort();
    }
}

impl StateStore {
    /// Opens (or creates) the store in `dir`. `cache_capacity` is sled's page cache in bytes.
    pub fn open(dir: &Path, cache_capacity: u64) -> Result<Self, StoreError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let db = sled::Config::new().path(dir.join("db")).cache_capacity(cache_capacity).open()?;
        let data = db.open_tree("sm.v1")?;
        let heads = db.open_tree("heads.v1")?;
        let snap_dir = dir.join("snapshots");
        fs::create_dir_all(&snap_dir).map_err(io_err(&snap_dir))?;

        // Newest valid snapshot per group; leftovers of crashed builds or transfers go.
        let mut found: HashMap<GroupId, (SnapshotMeta, SnapshotData)> = HashMap::new();
        for ent in fs::read_dir(&snap_dir).map_err(io_err(&snap_dir))? {
            let path = ent.map_err(io_err(&snap_dir))?.path();
            let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
            if ext != "snap" {
                let _ = fs::remove_file(&path);
                continue;
            }
            match SnapshotReader::open(&path) {
                Ok(r) => {
                    let len = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                    let newer = found.get(&r.group).is_none_or(|(m, _)| m.last_log_id < r.meta.last_log_id);
                    if newer {
                        if let Some((_, old)) = found.insert(r.group, (r.meta, SnapshotData::new(path.clone(), len))) {
                            let _ = fs::remove_file(old.path());
                        }
                    } else {
                        let _ = fs::remove_file(&path);
                    }
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "removing unreadable snapshot file");
                    let _ = fs::remove_file(&path);
                }
            }
        }

        let store = StateStore {
            inner: Arc::new(Inner {
                db,
                data,
                heads,
                snap_dir,
                groups: Mutex::new(HashMap::new()),
                found_snapshots: Mutex::new(found),
            }),
        };
        store.remove_inactive_generations()?;
        Ok(store)
    }

    /// Data of a generation other than a group's active one is what a crashed install (or
    /// a crash before the old generation was deleted) left: remove it.
    fn remove_inactive_generations(&self) -> Result<(), StoreError> {
        for item in self.inner.heads.iter() {
            let (k, v) = item?;
            let group = u32::from_be_bytes(
                k.as_ref()
                    .try_into()
                    .map_err(|_| corrupt_key(&k, keys::DecodeError("head key is not a group id".into())))?,
            );
            let active = decode_u64(&k, &v)? as u32;
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

    fn delete_range(&self, range: std::ops::Range<Vec<u8>>) -> Result<usize, StoreError> {
        let mut n = 0;
        loop {
            let mut batch = sled::Batch::default();
            let mut k = 0;
            for item in self.inner.data.range(range.clone()).take(INSTALL_BATCH_RECORDS) {
                let (key, _) = item?;
                batch.remove(key);
                k += 1;
            }
            if k == 0 {
                return Ok(n);
            }
            self.inner.data.apply_batch(batch)?;
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
        let current = self.inner.found_snapshots.lock().unwrap_or_else(|p| p.into_inner()).remove(&group);
        let rt = Arc::new(GroupRt {
            generation: AtomicU32::new(generation),
            applied: watch::channel(applied).0,
            current: Mutex::new(current),
        });
        groups.insert(group, rt.clone());
        Ok(rt)
    }

    fn applied_state_at(&self, group: GroupId, generation: u32) -> Result<AppliedState, StoreError> {
        let k = keys::meta_key(group, generation);
        match self.inner.data.get(&k)? {
            None => Ok((None, StoredMembership::default())),
            Some(v) => {
                let body = keys::decode_value(&v).map_err(|e| corrupt_key(&k, e))?;
                postcard::from_bytes(body)
                    .map_err(|e| corrupt_key(&k, keys::DecodeError(format!("applied state: {e}"))))
            }
        }
    }

    /// The state machine of one group.
    pub fn group(&self, group: GroupId) -> Result<GroupStateMachine, StoreError> {
        let rt = self.rt(group)?;
        Ok(GroupStateMachine { store: self.clone(), group, rt })
    }

    /// Envelopes of a conversation with `seq >= from_seq`, ascending, at most `limit`.
    pub fn read(
        &self,
        group: GroupId,
        conversation_id: &str,
        from_seq: u64,
        limit: usize,
    ) -> Result<Vec<StoredEnvelope>, StoreError> {
        self.at_stable_generation(group, |generation| {
            let conv = conversation_id.as_bytes();
            let start = keys::env_key(group, generation, conv, from_seq);
            let end = keys::env_key(group, generation, conv, u64::MAX);
            let mut out = Vec::with_capacity(limit.min(1024));
            for item in self.inner.data.range(start..=end).take(limit) {
                let (k, v) = item?;
                let seq = match keys::decode_key(&k).map_err(|e| corrupt_key(&k, e))? {
                    keys::Key::Env { seq, .. } => seq,
                    other => {
                        return Err(corrupt_key(
                            &k,
                            keys::DecodeError(format!("expected an envelope key, got {other:?}")),
                        ))
                    }
                };
                out.push(decode_envelope(&k, &v, conversation_id, seq)?);
            }
            Ok(out)
        })
    }

    /// The conversation's last seq (0 if it has none).
    pub fn last_seq(&self, group: GroupId, conversation_id: &str) -> Result<u64, StoreError> {
        self.at_stable_generation(group, |generation| {
            let k = keys::conv_key(group, generation, conversation_id.as_bytes());
            match self.inner.data.get(&k)? {
                Some(v) => decode_u64(&k, &v),
                None => Ok(0),
            }
        })
    }

    /// The group's last applied log id (durable once sled is flushed).
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

    pub fn flush(&self) -> Result<(), StoreError> {
        self.inner.db.flush()?;
        Ok(())
    }

    /// A writer for a snapshot streamed in from a peer.
    pub fn snapshot_writer(&self, group: GroupId) -> Result<SnapshotWriter, StoreError> {
        SnapshotWriter::create(&self.inner.snap_dir, group)
    }

    /// Raw `(key, value)` pairs of a group's active data, for comparing replicas.
    pub fn dump_group(&self, group: GroupId) -> Result<Vec<crate::snapshot::Record>, StoreError> {
        self.at_stable_generation(group, |generation| {
            let mut out = Vec::new();
            for item in self.inner.data.scan_prefix(keys::gen_prefix(group, generation)) {
                let (k, v) = item?;
                out.push((k[keys::GEN_PREFIX_LEN..].to_vec(), v.to_vec()));
            }
            Ok(out)
        })
    }

    /// Keys of the group in every generation (active or garbage): for tests and checks.
    pub fn raw_key_count(&self, group: GroupId) -> usize {
        self.inner.data.scan_prefix(keys::group_prefix(group)).count()
    }

    /// Applies a batch of entries of one group in one atomic sled batch.
    fn apply_blocking(
        &self,
        group: GroupId,
        generation: u32,
        entries: &[Entry],
    ) -> Result<Vec<CommandResponse>, StoreError> {
        let data = &self.inner.data;
        let (mut applied, mut membership) = self.applied_state_at(group, generation)?;
        let mut last_seqs: HashMap<&str, u64> = HashMap::new();
        let mut batch = sled::Batch::default();
        let mut responses = Vec::with_capacity(entries.len());
        for entry in entries {
            applied = Some(entry.log_id);
            let mut resp = CommandResponse::default();
            match &entry.payload {
                EntryPayload::Blank => {}
                EntryPayload::Membership(m) => membership = StoredMembership::new(Some(entry.log_id), m.clone()),
                EntryPayload::Normal(Command::Append { now_ms, envelopes }) => {
                    resp.appended.reserve(envelopes.len());
                    for e in envelopes {
                        let conv = e.conversation_id.as_str();
                        let last = match last_seqs.get(conv) {
                            Some(s) => *s,
                            None => {
                                let k = keys::conv_key(group, generation, conv.as_bytes());
                                match data.get(&k)? {
                                    Some(v) => decode_u64(&k, &v)?,
                                    None => 0,
                                }
                            }
                        };
                        // Idempotency (a later issue) will look up `message_id` here and answer
                        // `duplicate = true` with the original seq instead of appending.
                        let seq = last + 1;
                        batch.insert(
                            keys::env_key(group, generation, conv.as_bytes(), seq),
                            encode_envelope(e, *now_ms),
                        );
                        last_seqs.insert(conv, seq);
                        resp.appended.push(Appended { seq, committed_at_ms: *now_ms, duplicate: false });
                    }
                }
            }
            responses.push(resp);
        }
        for (conv, seq) in last_seqs {
            batch.insert(keys::conv_key(group, generation, conv.as_bytes()), keys::encode_value(&seq.to_be_bytes()));
        }
        let state = postcard::to_allocvec(&(applied, membership)).map_err(|e| StoreError::Encode(e.to_string()))?;
        batch.insert(keys::meta_key(group, generation), keys::encode_value(&state));
        data.apply_batch(batch)?;
        Ok(responses)
    }

    /// Writes the group's current data to a new snapshot file (sled flushed first).
    fn build_snapshot_blocking(
        &self,
        group: GroupId,
        rt: &GroupRt,
    ) -> Result<(SnapshotMeta, SnapshotData), StoreError> {
        self.inner.db.flush()?;
        let generation = rt.generation.load(Ordering::Acquire);
        let (last_log_id, last_membership) = self.applied_state_at(group, generation)?;
        let meta = SnapshotMeta { last_log_id, last_membership };
        let nanos = unix_nanos();
        let idx = last_log_id.map_or(0, |l| l.index);
        let tmp = self.inner.snap_dir.join(format!("g{group}-{idx:020}-{nanos}.tmp"));
        let mut w = SnapshotFileWriter::create(tmp.clone(), group, &meta)?;
        for item in self.inner.data.scan_prefix(keys::gen_prefix(group, generation)) {
            let (k, v) = item?;
            w.record(&k[keys::GEN_PREFIX_LEN..], &v)?;
        }
        let data = w.finish()?;
        let path = tmp.with_extension("snap");
        self.publish_snapshot(rt, &meta, data.path(), &path, false)?;
        Ok((meta.clone(), SnapshotData::new(path, data.len())))
    }

    /// Makes `src` the group's current snapshot file at `dst` (rename, or copy when it is
    /// not ours to move), fsyncs the directory, and deletes the previous one.
    fn publish_snapshot(
        &self,
        rt: &GroupRt,
        meta: &SnapshotMeta,
        src: &Path,
        dst: &Path,
        copy: bool,
    ) -> Result<(), StoreError> {
        if copy {
            fs::copy(src, dst).map_err(io_err(dst))?;
            fs::File::open(dst).and_then(|f| f.sync_all()).map_err(io_err(dst))?;
        } else {
            fs::rename(src, dst).map_err(io_err(dst))?;
        }
        fs::File::open(&self.inner.snap_dir).and_then(|d| d.sync_all()).map_err(io_err(&self.inner.snap_dir))?;
        let len = fs::metadata(dst).map_err(io_err(dst))?.len();
        let old = rt
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace((meta.clone(), SnapshotData::new(dst.to_path_buf(), len)));
        if let Some((_, old)) = old {
            if old.path() != dst {
                let _ = fs::remove_file(old.path());
            }
        }
        Ok(())
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
        let new = old.checked_add(1).ok_or_else(|| StoreError::Encode("generation counter exhausted".into()))?;
        let new_prefix = keys::gen_prefix(group, new);
        let next_prefix = new.checked_add(1).map(|g| keys::gen_prefix(group, g).to_vec());
        if let Some(end) = next_prefix {
            self.delete_range(new_prefix.to_vec()..end)?;
        }
        let mut batch = sled::Batch::default();
        let (mut n, mut bytes) = (0usize, 0usize);
        let mut batches = 0usize;
        while let Some((k, v)) = reader.next_record()? {
            let mut key = Vec::with_capacity(keys::GEN_PREFIX_LEN + k.len());
            key.extend_from_slice(&new_prefix);
            key.extend_from_slice(&k);
            keys::decode_key(&key).map_err(|e| corrupt_key(&key, e))?;
            bytes += key.len() + v.len();
            n += 1;
            batch.insert(key, v);
            if n >= INSTALL_BATCH_RECORDS || bytes >= INSTALL_BATCH_BYTES {
                self.inner.data.apply_batch(std::mem::take(&mut batch))?;
                n = 0;
                bytes = 0;
                batches += 1;
                if batches == 1 {
                    crash_point("mid_write", &self.inner.db);
                }
            }
        }
        let state = postcard::to_allocvec(&(meta.last_log_id, meta.last_membership.clone()))
            .map_err(|e| StoreError::Encode(e.to_string()))?;
        batch.insert(keys::meta_key(group, new), keys::encode_value(&state));
        self.inner.data.apply_batch(batch)?;
        // The new generation is durable before the switch; the switch is durable before
        // the old data goes.
        self.inner.db.flush()?;
        crash_point("before_switch", &self.inner.db);
        self.inner.heads.insert(group.to_be_bytes(), keys::encode_value(&u64::from(new).to_be_bytes()))?;
        self.inner.db.flush()?;
        crash_point("after_switch", &self.inner.db);
        rt.generation.store(new, Ordering::Release);
        self.delete_range(keys::gen_prefix(group, old).to_vec()..new_prefix.to_vec())?;

        let idx = meta.last_log_id.map_or(0, |l| l.index);
        let nanos = unix_nanos();
        let dst = self.inner.snap_dir.join(format!("g{group}-{idx:020}-{nanos}.snap"));
        let ours = data.path().parent() == Some(self.inner.snap_dir.as_path())
            && data.path().extension().is_some_and(|e| e == "recv");
        self.publish_snapshot(rt, meta, data.path(), &dst, !ours)?;
        Ok(())
    }
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

/// A snapshot built when the builder was created (while no apply could run).
pub struct SnapshotBuilder {
    built: Option<(SnapshotMeta, SnapshotData)>,
    sm: GroupStateMachine,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = SnapshotData;

    async fn build_snapshot(&mut self) -> Result<Snapshot<SnapshotData>, io::Error> {
        let (meta, data) = match self.built.take() {
            Some(b) => b,
            None => self.sm.blocking(|s, g, rt| s.build_snapshot_blocking(g, &rt)).await?,
        };
        Ok(Snapshot { meta, snapshot: data })
    }
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
        let responses =
            self.blocking(move |s, g, rt| s.apply_blocking(g, rt.generation.load(Ordering::Acquire), &batch)).await?;
        for (r, resp) in responders.into_iter().zip(responses) {
            if let Some(r) = r {
                r.send(resp);
            }
        }
        self.rt.applied.send_replace(last);
        Ok(())
    }

    async fn try_create_snapshot_builder(&mut self, _force: bool) -> Option<SnapshotBuilder> {
        // Built here, where openraft holds the state machine exclusively, so the file is a
        // consistent point-in-time copy of the group. Cost: applies of this group wait for
        // the scan of its data (other groups are not blocked).
        match self.blocking(|s, g, rt| s.build_snapshot_blocking(g, &rt)).await {
            Ok(b) => Some(SnapshotBuilder { built: Some(b), sm: self.clone() }),
            Err(e) => {
                tracing::error!(group = self.group, error = %e, "building a snapshot failed");
                None
            }
        }
    }

    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder {
        SnapshotBuilder { built: None, sm: self.clone() }
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta, snapshot: SnapshotData) -> Result<(), io::Error> {
        let m = meta.clone();
        self.blocking(move |s, g, rt| s.install_blocking(g, &rt, &m, &snapshot)).await?;
        self.rt.applied.send_replace(meta.last_log_id.map_or(0, |l| l.index));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<SnapshotData>>, io::Error> {
        let cur = self.rt.current.lock().unwrap_or_else(|p| p.into_inner()).clone();
        Ok(cur.map(|(meta, snapshot)| Snapshot { meta, snapshot }))
    }
}
