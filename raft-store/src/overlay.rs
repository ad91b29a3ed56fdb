//! A write-back overlay over a sled tree: writes collect in memory and reach sled only in a
//! checkpoint, as one atomic batch. The envelope store's step 2 (`docs/ENVELOPE-STORE.md`)
//! puts the state machine's writes here, so that sled always holds the state at one applied
//! log id (the one the checkpoint's batch carries) and never a mix: a crash then re-applies
//! from exactly that id, and the re-applied entries see the same state they saw the first
//! time (same seqs, same dedupe answers).
//!
//! Two layers sit on sled: `active` (every write goes here) and `frozen` (the previous
//! `active`, while a checkpoint writes it to sled). A read looks in `active`, then `frozen`,
//! then sled, and a range read merges the three in key order, so a checkpoint in progress is
//! invisible to readers.
//!
//! sled's iterators are not isolated from a concurrent `apply_batch`: a range read while a
//! batch lands can see part of it, and a reverse range was seen to end early and then resume
//! (a test of the broker caught a page with seqs twice). So a range read holds the read side
//! of `gate` from the moment it copies the overlay's entries until it is dropped, and a
//! checkpoint's batch (and any other bulk write to the tree, through [`Overlay::exclusive`])
//! takes the write side: a merged range is one consistent state. Single-key reads need no
//! gate (sled reads one key atomically).
//!
//! Bounded: the caller checkpoints when [`Overlay::pending_bytes`] passes its limit.

use std::collections::btree_map::Entry;
use std::collections::BTreeMap;
use std::collections::HashMap;
use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::ops::Bound;
use std::ops::RangeBounds;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::MutexGuard;
use std::sync::RwLock;
use std::sync::RwLockReadGuard;

use sled::IVec;

/// Pending writes: `Some(value)` puts, `None` deletes.
pub type Pending = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

/// One pending write.
type PendingEntry = (Vec<u8>, Option<Vec<u8>>);

/// What a sled iterator yields.
pub type KvResult = sled::Result<(IVec, IVec)>;

#[derive(Default)]
struct Layers {
    active: Pending,
    active_bytes: usize,
    /// Keys of `active` whose put replaced a pending delete (see [`Overlay::checkpoint_with`]).
    active_redone: HashSet<Vec<u8>>,
    /// Whether `active` may hold a delete (set by any delete written to it).
    active_deletes: bool,
    frozen: Option<Arc<Pending>>,
    frozen_redone: HashSet<Vec<u8>>,
    /// Whether `frozen` may hold a delete: if not, a write of a key `active` lacks need not
    /// look it up there (one search of the map per write instead of three).
    frozen_deletes: bool,
}

/// The overlay of one tree (or of one group's part of it).
#[derive(Default)]
pub struct Overlay {
    layers: Mutex<Layers>,
    /// Held for a whole checkpoint: one at a time.
    checkpointing: Mutex<()>,
    /// Read side: a range read in progress. Write side: a batch landing in sled.
    gate: RwLock<()>,
    /// sled's files, fsynced after each flush (`None`: a temporary tree, in tests).
    files: Option<SledFiles>,
}

/// What makes a sled flush durable. sled 0.34's flush is not an fsync on Linux: it ends
/// with `sync_file_range`, which neither writes the file's metadata (its size, as sled's log
/// grows) nor flushes the device's volatile write cache (sled issue #1452), and sled writes a
/// page fragment over a quarter of its 512 KiB segment (a "blob") to a file of its own under
/// `blobs/` that it never fsyncs. A power cut could then take a flushed batch away after the
/// store relied on it (deleted segments, gave the state index its writes). So after sled's
/// flush, the overlay's flush fdatasyncs sled's log file (`db`), every file that appeared
/// in sled's directory or `blobs/` since the last one (sled names each blob by its log
/// sequence number and never rewrites it), and each of the two directories whose entries
/// changed.
pub struct SledFiles {
    dir: PathBuf,
    db: File,
    /// Names already fsynced, of sled's directory and of `blobs/`, with the length each
    /// had then (sled writes a blob after creating it, also from a reader's thread, so a
    /// sync can find one half-written: it is synced again once its length changed).
    seen: Mutex<[HashMap<OsString, u64>; 2]>,
}

/// An I/O error that names the path it happened on.
fn named(path: &Path) -> impl FnOnce(io::Error) -> io::Error + '_ {
    move |e| io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

impl SledFiles {
    /// The files of the sled database in `dir` (opened already: sled creates them).
    pub fn open(dir: &Path) -> io::Result<Self> {
        let db = File::open(dir.join("db"))?;
        Ok(SledFiles { dir: dir.to_path_buf(), db, seen: Mutex::new([HashMap::new(), HashMap::new()]) })
    }

    /// Makes durable everything sled wrote (and flushed) so far; see [`SledFiles`].
    pub fn sync(&self) -> io::Result<()> {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let [top, blobs] = &mut *seen;
        sync_new_files(&self.dir.join("blobs"), blobs, None)?;
        sync_new_files(&self.dir, top, Some("db"))?;
        self.db.sync_data().map_err(named(&self.dir.join("db")))
    }
}

/// fdatasyncs each file in `dir` whose name is not in `seen` or whose length changed since
/// (sled's directory holds `blobs/` too: a directory, skipped), and `dir` itself if a name
/// came or went; `seen` becomes what was found. `except` (sled's log file, which the caller
/// syncs every time) is listed but never synced here. Errors name the path.
fn sync_new_files(dir: &Path, seen: &mut HashMap<OsString, u64>, except: Option<&str>) -> io::Result<()> {
    let mut found = HashMap::with_capacity(seen.len());
    let mut changed = false;
    for entry in std::fs::read_dir(dir).map_err(named(dir))? {
        let entry = entry.map_err(named(dir))?;
        let path = entry.path();
        let name = entry.file_name();
        let meta = match entry.metadata() {
            Ok(m) => m,
            // Removed meanwhile (sled deletes a blob once no page points to it).
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(named(&path)(e)),
        };
        changed |= !seen.contains_key(&name);
        if meta.is_file() && seen.get(&name) != Some(&meta.len()) && except.is_none_or(|x| name != x) {
            match File::open(&path) {
                Ok(f) => f.sync_data().map_err(named(&path))?,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(named(&path)(e)),
            }
        }
        found.insert(name, meta.len());
    }
    changed |= seen.keys().any(|n| !found.contains_key(n));
    if changed {
        File::open(dir).and_then(|d| d.sync_all()).map_err(named(dir))?;
    }
    *seen = found;
    Ok(())
}

/// Held by every sled batch and every sled flush made through an overlay: sled 0.34
/// deadlocks when they overlap (a flush holds the read side of sled's process-wide lock
/// while it waits for its log flusher, which wants the read side too, queued behind the
/// batch waiting for the write side). sled's lock is one per process, not per database, so
/// this is one per process too (two stores in one test process deadlocked: one's install
/// batch, the other's checkpoint flush, both log flushers parked for good).
static SLED_IO: Mutex<()> = Mutex::new(());

/// What one pending write costs in memory, roughly: its bytes, the map's share (two `Vec`
/// headers and node slack) and the allocator's headers.
fn entry_bytes(k: &[u8], v: &Option<Vec<u8>>) -> usize {
    k.len() + v.as_ref().map_or(0, Vec::len) + 96
}

impl Overlay {
    /// The overlay of a tree of the sled database whose files are `files`: each flush
    /// makes them durable.
    pub fn durable(files: SledFiles) -> Self {
        Overlay { files: Some(files), ..Overlay::default() }
    }

    fn lock(&self) -> MutexGuard<'_, Layers> {
        self.layers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records writes (later ones win). Visible to every read at once.
    pub fn write(&self, ops: impl IntoIterator<Item = PendingEntry>) {
        let mut guard = self.lock();
        let l = &mut *guard;
        for (k, v) in ops {
            let add = entry_bytes(&k, &v);
            let is_put = v.is_some();
            l.active_deletes |= !is_put;
            // One search of `active` (an entry, not a get and an insert): most writes are of
            // new keys (a profile of one node under load: this function 13.7% of its CPU
            // with three searches, 8.9% with one).
            let removed = match l.active.entry(k) {
                Entry::Occupied(mut o) => {
                    let removed = entry_bytes(o.key(), o.get());
                    if o.get().is_none() && is_put {
                        l.active_redone.insert(o.key().clone());
                    }
                    o.insert(v);
                    removed
                }
                Entry::Vacant(e) => {
                    let was_deleted =
                        l.frozen_deletes && l.frozen.as_ref().is_some_and(|f| matches!(f.get(e.key()), Some(None)));
                    if was_deleted && is_put {
                        l.active_redone.insert(e.key().clone());
                    }
                    e.insert(v);
                    0
                }
            };
            l.active_bytes = l.active_bytes - removed + add;
        }
    }

    /// Approximate bytes of writes in the active layer (what the next checkpoint writes).
    pub fn pending_bytes(&self) -> usize {
        self.lock().active_bytes
    }

    /// Whether anything waits for a checkpoint.
    pub fn is_empty(&self) -> bool {
        let l = self.lock();
        l.active.is_empty() && l.frozen.is_none()
    }

    /// The value of `key`: the overlay's if it has one (a delete is `None`), else sled's.
    pub fn get(&self, tree: &sled::Tree, key: &[u8]) -> sled::Result<Option<IVec>> {
        match self.get_pending(key) {
            Some(v) => Ok(v),
            None => tree.get(key),
        }
    }

    /// The overlay's write of `key`, if it holds one (`Some(None)`: a delete). A key it does
    /// not hold is wherever the checkpoints put it: checkpoints drop their frozen layer only
    /// after everything in it is readable there.
    pub fn get_pending(&self, key: &[u8]) -> Option<Option<IVec>> {
        let l = self.lock();
        let hit = l.active.get(key).or_else(|| l.frozen.as_ref().and_then(|f| f.get(key)));
        hit.map(|v| v.as_deref().map(IVec::from))
    }

    /// The overlay's entries in `range` (`active` over `frozen`), in key order. An empty or
    /// inverted range holds nothing (where `BTreeMap::range` would panic, sled yields nothing).
    fn pending_in<R: RangeBounds<Vec<u8>> + Clone>(&self, range: R) -> Vec<PendingEntry> {
        if is_empty_range(&range) {
            return Vec::new();
        }
        let l = self.lock();
        let mut out: Pending = match &l.frozen {
            Some(f) => f.range(range.clone()).map(|(k, v)| (k.clone(), v.clone())).collect(),
            None => BTreeMap::new(),
        };
        for (k, v) in l.active.range(range) {
            out.insert(k.clone(), v.clone());
        }
        out.into_iter().collect()
    }

    /// Every key in `range` with its current value, in key order (`forward`) or reverse,
    /// merging the overlay over sled.
    ///
    /// Holds the read side of the gate until dropped: do not hold one while starting another
    /// on the same thread (a waiting checkpoint would block the second, and so both).
    pub fn range<R: RangeBounds<Vec<u8>> + Clone>(&self, tree: &sled::Tree, range: R, forward: bool) -> Merged<'_> {
        self.range_over(range, forward, |range, forward| {
            let base = tree.range(range);
            if forward {
                Box::new(base)
            } else {
                Box::new(base.rev())
            }
        })
    }

    /// [`Overlay::range`] over the base `base` builds (in the direction asked) instead of one
    /// sled tree. `base` runs after the overlay's entries are copied, so what the copy
    /// misses (a frozen layer dropped meanwhile) is already in the base.
    pub fn range_over<R: RangeBounds<Vec<u8>> + Clone>(
        &self,
        range: R,
        forward: bool,
        base: impl FnOnce(R, bool) -> Box<dyn Iterator<Item = KvResult> + Send>,
    ) -> Merged<'_> {
        let gate = self.gate.read().unwrap_or_else(|p| p.into_inner());
        let mut pending = self.pending_in(range.clone());
        if !forward {
            pending.reverse();
        }
        Merged {
            _gate: gate,
            pending: pending.into_iter().peekable(),
            base: base(range, forward),
            base_next: None,
            forward,
        }
    }

    /// Every key that starts with `prefix`, in key order.
    pub fn scan_prefix(&self, tree: &sled::Tree, prefix: &[u8]) -> Merged<'_> {
        self.range(tree, prefix_range(prefix), true)
    }

    /// Writes everything pending to sled in one atomic batch, with `extra` added last (the
    /// caller's own records, written with the data they describe), and flushes sled if
    /// `flush`. Reads see the same values throughout. Returns how many writes it carried.
    /// After an error the writes stay pending (frozen) and the next checkpoint carries them
    /// with everything written since.
    pub fn checkpoint(
        &self,
        tree: &sled::Tree,
        extra: impl FnOnce(&mut sled::Batch),
        flush: bool,
    ) -> sled::Result<usize> {
        self.checkpoint_with(
            tree,
            |frozen, _| {
                let mut batch = plain_batch(frozen);
                extra(&mut batch);
                Ok::<_, sled::Error>((batch, ()))
            },
            |()| {},
            |()| Ok(()),
            flush,
        )
        .map(|(writes, ())| writes)
    }

    /// [`Overlay::checkpoint`] with the batch built by `build` from the frozen writes (which
    /// it may write elsewhere first and leave out, as the state machine does with envelope
    /// bodies): what the batch carries must be, read back through the overlay's owner, the
    /// same state the frozen writes describe. An error of `build` leaves the writes pending.
    ///
    /// `build` also gets the keys whose frozen put replaced a delete that never reached sled
    /// (a key deleted and written again between two checkpoints): a builder that leaves such
    /// a put out of the batch must delete the key in it, or sled's older value would stay.
    ///
    /// `landing` runs with what `build` returned under the gate's write side, once the batch
    /// landed (not if it failed): no read under [`Overlay::shared`] sees one without the
    /// other.
    ///
    /// `after` runs once the batch landed (and sled is flushed, if `flush`), still before
    /// any other checkpoint can start and before the frozen layer is dropped, with what
    /// `build` handed it; what it returns comes back with the number of writes. If it fails, the frozen layer stays, but unlike after a failed
    /// batch a retry is not safe for a `build` that moves writes elsewhere (the batch landed;
    /// the state machine's would write its runs and logs twice): the state machine stops
    /// checkpointing after any failure.
    pub fn checkpoint_with<A, R, E: From<sled::Error>>(
        &self,
        tree: &sled::Tree,
        build: impl FnOnce(&Pending, &HashSet<Vec<u8>>) -> Result<(sled::Batch, A), E>,
        landing: impl FnOnce(&A),
        after: impl FnOnce(A) -> Result<R, E>,
        flush: bool,
    ) -> Result<(usize, R), E> {
        let _one = self.checkpointing.lock().unwrap_or_else(|p| p.into_inner());
        let (frozen, redone) = {
            let mut l = self.lock();
            let active = std::mem::take(&mut l.active);
            let active_redone = std::mem::take(&mut l.active_redone);
            l.active_bytes = 0;
            // The frozen layer holds a delete only if one of the two merged here did.
            l.frozen_deletes = std::mem::take(&mut l.active_deletes) || (l.frozen.is_some() && l.frozen_deletes);
            // A frozen layer left by a failed checkpoint goes in the same batch, under what
            // was written since: the batch always carries everything written before the
            // call, so a retry that succeeds leaves nothing older behind in memory.
            let frozen = match l.frozen.take() {
                None => active,
                Some(old) => {
                    let mut all = Arc::unwrap_or_clone(old);
                    all.extend(active);
                    all
                }
            };
            let frozen = Arc::new(frozen);
            l.frozen = Some(frozen.clone());
            l.frozen_redone.extend(active_redone);
            (frozen, l.frozen_redone.clone())
        };
        let (batch, then) = build(&frozen, &redone)?;
        self.exclusive(|| {
            tree.apply_batch(batch)?;
            landing(&then);
            Ok::<_, sled::Error>(())
        })?;
        if flush {
            self.flush(tree)?;
        }
        // `after` may move part of the batch elsewhere (the state machine's dedupe writes):
        // reads keep finding the frozen layer until it returns.
        let done = after(then)?;
        {
            let mut l = self.lock();
            l.frozen = None;
            l.frozen_redone.clear();
            l.frozen_deletes = false;
        }
        Ok((frozen.len(), done))
    }

    /// No checkpoint starts while the guard lives (one in progress finishes first): for a
    /// command that must see every item a checkpoint writes, and none appear meanwhile.
    pub fn hold_checkpoints(&self) -> MutexGuard<'_, ()> {
        self.checkpointing.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `read` (reads of the tree directly, not merged with the overlay) while no batch
    /// of [`Overlay::exclusive`] lands: sled's iterators are not isolated from one (see the
    /// module's doc). Keep it short: checkpoints wait for it.
    pub fn shared<T>(&self, read: impl FnOnce() -> T) -> T {
        let _gate = self.gate.read().unwrap_or_else(|p| p.into_inner());
        read()
    }

    /// Runs `write` (a bulk write to the tree) while no range read is in progress and no
    /// sled flush runs.
    pub fn exclusive<T>(&self, write: impl FnOnce() -> T) -> T {
        let _gate = self.gate.write().unwrap_or_else(|p| p.into_inner());
        let _io = SLED_IO.lock().unwrap_or_else(|p| p.into_inner());
        write()
    }

    /// Flushes sled and fsyncs its files ([`SledFiles`]), never while a batch of
    /// [`Overlay::exclusive`] runs. Every flush of the tree's database must come through
    /// here.
    pub fn flush(&self, tree: &sled::Tree) -> sled::Result<()> {
        let _io = SLED_IO.lock().unwrap_or_else(|p| p.into_inner());
        tree.flush()?;
        if let Some(files) = &self.files {
            files.sync()?;
        }
        Ok(())
    }
}

/// A batch of every frozen write as it is.
pub fn plain_batch(frozen: &Pending) -> sled::Batch {
    let mut batch = sled::Batch::default();
    for (k, v) in frozen.iter() {
        match v {
            Some(v) => batch.insert(k.as_slice(), v.as_slice()),
            None => batch.remove(k.as_slice()),
        }
    }
    batch
}

/// Whether no key can lie in `range`: its start is above its end, or they are equal and one
/// of them excluded.
fn is_empty_range<R: RangeBounds<Vec<u8>>>(range: &R) -> bool {
    use Bound::*;
    match (range.start_bound(), range.end_bound()) {
        (Included(s), Included(e)) => s > e,
        (Included(s), Excluded(e)) | (Excluded(s), Included(e)) | (Excluded(s), Excluded(e)) => s >= e,
        _ => false,
    }
}

/// The range of every key that starts with `prefix`.
pub fn prefix_range(prefix: &[u8]) -> (Bound<Vec<u8>>, Bound<Vec<u8>>) {
    let start = Bound::Included(prefix.to_vec());
    let end = match prefix_end(prefix) {
        Some(e) => Bound::Excluded(e),
        None => Bound::Unbounded,
    };
    (start, end)
}

/// The first key after every key that starts with `prefix` (`None`: no such key).
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// A merged range: the overlay's entries over sled's, in one direction; one consistent
/// state (no checkpoint lands while it lives).
pub struct Merged<'a> {
    _gate: RwLockReadGuard<'a, ()>,
    pending: std::iter::Peekable<std::vec::IntoIter<PendingEntry>>,
    base: Box<dyn Iterator<Item = KvResult> + Send>,
    /// sled's next item, read ahead.
    base_next: Option<(IVec, IVec)>,
    forward: bool,
}

impl Iterator for Merged<'_> {
    type Item = KvResult;

    fn next(&mut self) -> Option<KvResult> {
        loop {
            if self.base_next.is_none() {
                match self.base.next() {
                    Some(Ok(kv)) => self.base_next = Some(kv),
                    Some(Err(e)) => return Some(Err(e)),
                    None => {}
                }
            }
            // Which comes first in this direction: the overlay's next key or sled's.
            let take_pending = match (self.pending.peek(), &self.base_next) {
                (None, None) => return None,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (Some((pk, _)), Some((bk, _))) => {
                    let ord = pk.as_slice().cmp(bk.as_ref());
                    if ord == std::cmp::Ordering::Equal {
                        // The overlay's write replaces sled's value.
                        self.base_next = None;
                        true
                    } else {
                        (ord == std::cmp::Ordering::Less) == self.forward
                    }
                }
            };
            if take_pending {
                let (k, v) = self.pending.next()?;
                match v {
                    Some(v) => return Some(Ok((IVec::from(k), IVec::from(v)))),
                    // A delete hides sled's value; nothing to yield.
                    None => continue,
                }
            }
            return self.base_next.take().map(Ok);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Property: an inverted or empty range reads as nothing, in both directions, like sled,
    /// instead of panicking inside `BTreeMap::range`.
    #[test]
    fn an_inverted_or_empty_range_reads_as_nothing() {
        let db = sled::Config::new().temporary(true).open().expect("sled");
        let tree = db.open_tree("t").expect("tree");
        let o = Overlay::default();
        o.write([(b"b".to_vec(), Some(b"1".to_vec()))]);
        for forward in [true, false] {
            assert_eq!(o.range(&tree, b"c".to_vec()..=b"a".to_vec(), forward).count(), 0);
            assert_eq!(o.range(&tree, b"b".to_vec()..b"b".to_vec(), forward).count(), 0);
            let excl = (Bound::Excluded(b"b".to_vec()), Bound::Excluded(b"b".to_vec()));
            assert_eq!(o.range(&tree, excl, forward).count(), 0);
            assert_eq!(o.range(&tree, b"b".to_vec()..=b"b".to_vec(), forward).count(), 1);
        }
    }

    #[test]
    fn prefix_end_is_the_first_key_after_the_prefix() {
        assert_eq!(prefix_end(&[1, 2]), Some(vec![1, 3]));
        assert_eq!(prefix_end(&[1, 255]), Some(vec![2]));
        assert_eq!(prefix_end(&[255, 255]), None);
    }

    /// Property: `pending_bytes` counts each key once (its latest value), and a checkpoint
    /// writes the caller's extra records in the same batch and empties the count.
    #[test]
    fn pending_bytes_track_the_active_layer_and_extra_records_go_with_the_checkpoint() {
        let db = sled::Config::new().temporary(true).open().expect("sled");
        let tree = db.open_tree("t").expect("tree");
        let o = Overlay::default();
        o.write([(b"a".to_vec(), Some(vec![0; 100]))]);
        let one = o.pending_bytes();
        o.write([(b"a".to_vec(), Some(vec![0; 10]))]);
        assert_eq!(o.pending_bytes(), one - 90);
        o.write([(b"a".to_vec(), None), (b"b".to_vec(), None)]);
        assert_eq!(o.pending_bytes(), 2 * entry_bytes(b"a", &None));
        let n = o.checkpoint(&tree, |b| b.insert(b"meta".as_slice(), b"1".as_slice()), true).expect("checkpoint");
        assert_eq!((n, o.pending_bytes(), o.is_empty()), (2, 0, true));
        assert_eq!(tree.get(b"meta").expect("get").as_deref(), Some(&b"1"[..]));
        assert_eq!(tree.len(), 1);
    }

    /// Property: a checkpoint's builder is told every key whose put replaced a delete that
    /// never reached sled, whether the delete was in the active layer or frozen by a
    /// checkpoint still in progress (or left by failed ones); and only those keys (not a put
    /// over a put, nor over a delete sled has).
    #[test]
    fn checkpoints_learn_each_put_that_replaced_a_pending_delete() {
        let db = sled::Config::new().temporary(true).open().expect("sled");
        let tree = db.open_tree("t").expect("tree");
        let o = Overlay::default();
        let key = |n: u8| vec![b'k', n];
        let put = |n: u8| (key(n), Some(vec![n]));
        let seen = |o: &Overlay| {
            let mut keys = Vec::new();
            o.checkpoint_with(
                &tree,
                |frozen, redone| {
                    keys = redone.iter().cloned().collect::<Vec<_>>();
                    keys.sort();
                    Ok::<_, sled::Error>((plain_batch(frozen), ()))
                },
                |()| {},
                |()| Ok(()),
                false,
            )
            .expect("checkpoint");
            keys
        };
        o.write((0..4).map(put));
        assert!(seen(&o).is_empty());
        // A put over a delete of the same layer.
        o.write([(key(0), None), (key(1), None)]);
        o.write([put(0)]);
        assert_eq!(seen(&o), vec![key(0)]);
        // Puts over a checkpoint in progress while it builds: key 2 over a delete frozen there
        // (the layer's only delete, and of a key the layer held: a put then a delete), key 4
        // over a frozen put, key 1 over a delete that reached sled two checkpoints ago.
        o.write([put(2), put(4)]);
        o.write([(key(2), None)]);
        o.checkpoint_with(
            &tree,
            |frozen, _| {
                o.write([put(2), put(1), put(4)]);
                Ok::<_, sled::Error>((plain_batch(frozen), ()))
            },
            |()| {},
            |()| Ok(()),
            false,
        )
        .expect("checkpoint");
        assert_eq!(seen(&o), vec![key(2)]);
        // Over a frozen layer failed checkpoints left (its deletes still pending): two, the
        // second merging the first's layer with an active layer without deletes.
        o.write([(key(3), None)]);
        for _ in 0..2 {
            let failed = o.checkpoint_with(
                &tree,
                |_, _| Err::<(sled::Batch, ()), _>(sled::Error::Unsupported("fail".into())),
                |()| {},
                |()| Ok(()),
                false,
            );
            assert!(failed.is_err());
        }
        o.write([put(3)]);
        assert_eq!(seen(&o), vec![key(3)]);
        assert_eq!(tree.get(key(3)).expect("get").as_deref(), Some(&[3u8][..]));
    }

    /// Property: a range read while checkpoints land is one consistent state, in order. A
    /// writer moves a window of 64 keys along (each round rewrites it with the round's number
    /// and deletes what fell out, then checkpoints, so sled's leaves split and merge under
    /// the readers); readers in both directions must always see exactly 64 adjacent keys in
    /// strict order, all from one round.
    #[test]
    fn range_reads_while_checkpoints_land_see_one_state_in_order() {
        const WINDOW: u32 = 64;
        const STEP: u32 = 16;
        const ROUNDS: u32 = 150;
        let db = sled::Config::new().temporary(true).open().expect("sled");
        let tree = db.open_tree("t").expect("tree");
        let o = Overlay::default();
        let k = |i: u32| i.to_be_bytes().to_vec();
        let round = |r: u32| {
            let put = (r * STEP..r * STEP + WINDOW).map(|i| (k(i), Some(vec![r as u8; 40])));
            let gone = (r.saturating_sub(1) * STEP..r * STEP).map(|i| (k(i), None));
            gone.chain(put).collect::<Vec<_>>()
        };
        o.write(round(0));
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|sc| {
            for forward in [true, false] {
                let (o, tree, done) = (&o, &tree, &done);
                sc.spawn(move || {
                    let mut reads = 0;
                    while !done.load(std::sync::atomic::Ordering::Relaxed) || reads == 0 {
                        let mut seen: Vec<(u32, u8)> = o
                            .range(tree, .., forward)
                            .map(|r| {
                                let (key, v) = r.expect("read");
                                (u32::from_be_bytes(key.as_ref().try_into().expect("key")), v[0])
                            })
                            .collect();
                        if !forward {
                            seen.reverse();
                        }
                        assert_eq!(seen.len(), WINDOW as usize, "read {reads}: {seen:?}");
                        let first = seen[0].0;
                        for (i, (key, v)) in seen.iter().enumerate() {
                            assert_eq!(*key, first + i as u32, "read {reads}: keys out of order or repeated: {seen:?}");
                            assert_eq!(*v, seen[0].1, "read {reads}: two rounds in one read: {seen:?}");
                        }
                        reads += 1;
                    }
                });
            }
            for r in 1..ROUNDS {
                o.write(round(r));
                o.checkpoint(&tree, |_| {}, false).expect("checkpoint");
            }
            done.store(true, std::sync::atomic::Ordering::Relaxed);
        });
    }

    #[derive(Debug, Clone)]
    enum Op {
        Put(u8, u8),
        Delete(u8),
        /// A checkpoint; `true`: a retry after a failed one (a frozen layer is left, with
        /// writes over it).
        Checkpoint(bool),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0u8..24, any::<u8>()).prop_map(|(k, v)| Op::Put(k, v)),
            3 => (0u8..24).prop_map(Op::Delete),
            2 => any::<bool>().prop_map(Op::Checkpoint),
        ]
    }

    fn key(k: u8) -> Vec<u8> {
        vec![7, k / 8, k]
    }

    fn collect(m: Merged<'_>) -> Vec<(Vec<u8>, Vec<u8>)> {
        m.map(|r| r.map(|(k, v)| (k.to_vec(), v.to_vec()))).collect::<sled::Result<_>>().expect("iterate")
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// Property (against a model, a `BTreeMap` of what was written): gets and range reads
        /// in both directions see exactly the model, before, during (a frozen layer) and
        /// after checkpoints; sled alone holds exactly the model as of the last checkpoint.
        #[test]
        fn reads_see_every_write_and_sled_sees_only_checkpoints(ops in prop::collection::vec(op(), 1..60), lo in 0u8..24, hi in 0u8..24) {
            let db = sled::Config::new().temporary(true).open().expect("sled");
            let tree = db.open_tree("t").expect("tree");
            let o = Overlay::default();
            let mut model: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
            let mut in_sled = model.clone();
            for op in ops {
                match op {
                    Op::Put(k, v) => { o.write([(key(k), Some(vec![v; 1 + v as usize % 5]))]); model.insert(key(k), vec![v; 1 + v as usize % 5]); }
                    Op::Delete(k) => { o.write([(key(k), None)]); model.remove(&key(k)); }
                    Op::Checkpoint(after_failure) => {
                        if after_failure {
                            // What a failed checkpoint leaves: a frozen layer, with writes
                            // landing in `active` over it (a put and a delete of the same
                            // keys as in the frozen layer, to check which wins).
                            {
                                let mut l = o.lock();
                                let active = std::mem::take(&mut l.active);
                                l.active_bytes = 0;
                                l.frozen_deletes = std::mem::take(&mut l.active_deletes);
                                l.frozen = Some(Arc::new(active));
                            }
                            o.write([(key(0), Some(vec![42])), (key(1), None)]);
                            model.insert(key(0), vec![42]);
                            model.remove(&key(1));
                            let all = collect(o.range(&tree, .., true));
                            prop_assert_eq!(all, model.clone().into_iter().collect::<Vec<_>>());
                        }
                        // The retry (or a normal checkpoint) carries every write made before it.
                        o.checkpoint(&tree, |_| {}, false).expect("checkpoint");
                        in_sled = model.clone();
                        prop_assert!(o.is_empty());
                    }
                }
                let sled_now: Vec<(Vec<u8>, Vec<u8>)> = tree.iter().map(|r| r.map(|(k, v)| (k.to_vec(), v.to_vec()))).collect::<sled::Result<_>>().expect("iter");
                prop_assert_eq!(sled_now, in_sled.clone().into_iter().collect::<Vec<_>>(), "sled holds the last checkpoint, nothing newer");
                for k in [lo, hi] {
                    prop_assert_eq!(o.get(&tree, &key(k)).expect("get").map(|v| v.to_vec()), model.get(&key(k)).cloned());
                }
                let (a, b) = (key(lo.min(hi)), key(lo.max(hi)));
                let want: Vec<(Vec<u8>, Vec<u8>)> = model.range(a.clone()..=b.clone()).map(|(k, v)| (k.clone(), v.clone())).collect();
                prop_assert_eq!(collect(o.range(&tree, a.clone()..=b.clone(), true)), want.clone());
                let mut back = want;
                back.reverse();
                prop_assert_eq!(collect(o.range(&tree, a..=b, false)), back);
                let p = vec![7, lo / 8];
                let want: Vec<(Vec<u8>, Vec<u8>)> = model.iter().filter(|(k, _)| k.starts_with(&p)).map(|(k, v)| (k.clone(), v.clone())).collect();
                prop_assert_eq!(collect(o.scan_prefix(&tree, &p)), want);
            }
        }
    }
}
