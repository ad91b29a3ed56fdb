//! openraft's `RaftLogStorage` for one Raft group, on top of the node's shared [`Wal`].
//!
//! Durability contract (what is on disk before which callback or return):
//! - `append`: returns once the entries are written to the page cache (readable); the
//!   `IOFlushed` callback fires from the WAL's sync thread after the fdatasync that covers
//!   them. openraft reports an entry as accepted by this node only after that callback.
//! - `save_vote`, `truncate_after`, `purge`: return only after the fdatasync covering their
//!   record (a vote must be on disk before a response grants it).
//! - `save_committed`: written, not waited for; a later fdatasync covers it. Losing it only
//!   means re-applying from the last state the state machine made durable.

use std::fmt::Debug;
use std::io;
use std::ops::Bound;
use std::ops::RangeBounds;

use openraft::storage::IOFlushed;
use openraft::storage::LogState;
use openraft::storage::RaftLogStorage;
use openraft::OptionalSend;
use openraft::RaftLogReader;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::types::Entry;
use crate::types::EntryPayload;
use crate::types::GroupId;
use crate::types::LogId;
use crate::types::TypeConfig;
use crate::types::Vote;
use crate::wal::Wal;
use crate::wal::WalEntry;

/// Version byte in front of every payload, vote and committed id the adapter encodes.
const PAYLOAD_FORMAT_V1: u8 = 1;

pub(crate) fn encode<T: Serialize>(v: &T) -> io::Result<Vec<u8>> {
    let mut out = vec![PAYLOAD_FORMAT_V1];
    postcard::to_io(v, &mut out).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok(out)
}

pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8], what: &str) -> io::Result<T> {
    match bytes.split_first() {
        Some((&PAYLOAD_FORMAT_V1, rest)) => postcard::from_bytes(rest)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{what} does not decode: {e}"))),
        Some((v, _)) => Err(io::Error::new(io::ErrorKind::InvalidData, format!("{what} has unknown format {v}"))),
        None => Err(io::Error::new(io::ErrorKind::InvalidData, format!("{what} is empty"))),
    }
}

fn entry_from_wal(e: WalEntry) -> io::Result<Entry> {
    let payload: EntryPayload = decode(&e.payload, "log entry payload")?;
    Ok(Entry { log_id: LogId::new_term_index(e.term, e.index), payload })
}

/// The log of one Raft group. Cheap to clone: all groups share one [`Wal`].
#[derive(Clone)]
pub struct LogStore {
    wal: Wal,
    group: GroupId,
}

impl LogStore {
    pub fn new(wal: Wal, group: GroupId) -> Self {
        Self { wal, group }
    }

    pub fn group(&self) -> GroupId {
        self.group
    }

    pub fn wal(&self) -> &Wal {
        &self.wal
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let start = match range.start_bound() {
            Bound::Included(x) => *x,
            Bound::Excluded(x) => x.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(x) => x.saturating_add(1),
            Bound::Excluded(x) => *x,
            Bound::Unbounded => u64::MAX,
        };
        // Recent entries come from the page cache; positional reads are short.
        let entries = self.wal.read(self.group, start, end)?;
        entries.into_iter().map(entry_from_wal).collect()
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        match self.wal.group_state(self.group).vote {
            Some(b) => Ok(Some(decode(&b, "vote")?)),
            None => Ok(None),
        }
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let st = self.wal.group_state(self.group);
        Ok(LogState {
            last_purged_log_id: st.last_purged.map(|(i, t)| LogId::new_term_index(t, i)),
            last_log_id: st.last.map(|(i, t)| LogId::new_term_index(t, i)),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        let lsn = self.wal.save_vote(self.group, &encode(vote)?)?;
        self.wal.wait_durable(lsn).await
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        self.wal.save_committed(self.group, &encode(&committed)?)?;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        match self.wal.group_state(self.group).committed {
            Some(b) => decode(&b, "committed log id"),
            None => Ok(None),
        }
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut encoded = Vec::new();
        for e in entries {
            encoded.push((e.log_id.index, e.log_id.leader_id.term, encode(&e.payload)?));
        }
        let done = Box::new(move |r: io::Result<()>| callback.io_completed(r));
        self.wal.append(self.group, encoded.iter().map(|(i, t, p)| (*i, *t, p.as_slice())), Some(done))?;
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let from = last_log_id.map(|l| l.index + 1).unwrap_or(0);
        let lsn = self.wal.truncate_from(self.group, from)?;
        self.wal.wait_durable(lsn).await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        let lsn = self.wal.purge(self.group, log_id.index, log_id.leader_id.term)?;
        self.wal.wait_durable(lsn).await?;
        let wal = self.wal.clone();
        tokio::task::spawn_blocking(move || wal.delete_obsolete_segments()).await.map_err(io::Error::other)??;
        Ok(())
    }
}
