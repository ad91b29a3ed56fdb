//! One Habar node: the store, one Raft group per shard, and the logic that routes a call
//! to the shard's leader (locally or by forwarding) and retries through elections until
//! the call's deadline.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use std::time::Instant;

use tokio::sync::broadcast;

use habar_proto::v1 as pb;
use habar_raft_store::sm::Direction;
use habar_raft_store::types::Command;
use habar_raft_store::types::CommandResponse;
use habar_raft_store::types::GroupId;
use habar_raft_store::types::NewEnvelope;
use habar_raft_store::types::NodeId;
use habar_raft_store::types::TypeConfig;
use habar_raft_store::GroupStateMachine;
use habar_raft_store::StateStore;
use habar_raft_store::Wal;
use openraft::error::LinearizableReadError;
use openraft::error::RaftError;
use openraft::rt::watch::WatchReceiver;
use openraft::ReadPolicy;
use serde::Deserialize;
use serde::Serialize;

use crate::clock::Clock;
use crate::config::NodeConfig;
use crate::convert;
use crate::error::BrokerError;
use crate::forward;
use crate::forward::ForwardRequest;
use crate::forward::ForwardResponse;
use crate::proposer;
use crate::raft_net::PeerPool;

pub type HRaft = openraft::Raft<TypeConfig, GroupStateMachine>;

/// Backoff between attempts while a shard has no reachable leader.
const RETRY_MIN: Duration = Duration::from_millis(10);
const RETRY_MAX: Duration = Duration::from_millis(200);
/// How long the compaction after an erasure waits for each shard's snapshot (builds take
/// turns on a node, and each can take seconds to tens of seconds at a lower CPU priority).
const ERASURE_SNAPSHOT_WAIT: Duration = Duration::from_secs(120);
/// How often it triggers a shard's snapshot again meanwhile (a trigger is dropped while a
/// build is under way).
const ERASURE_SNAPSHOT_RETRIGGER: Duration = Duration::from_millis(500);
/// ... doubling up to this.
const ERASURE_SNAPSHOT_RETRIGGER_MAX: Duration = Duration::from_secs(8);

pub struct Node {
    pub id: NodeId,
    pub cfg: NodeConfig,
    pub wal: Wal,
    pub store: StateStore,
    pub rafts: Vec<HRaft>,
    pub pool: PeerPool,
    pub registry: crate::raft_net::GroupRegistry<GroupStateMachine>,
    /// Cluster time (median of the nodes' clocks): what entries are stamped with and
    /// expiry is judged by.
    pub clock: Arc<Clock>,
    /// Free-space guard of the data directory: a full node takes no writes.
    pub disk: Arc<crate::disk::DiskGuard>,
    /// Shards this node is repairing after WAL corruption (it does not vote for them).
    pub repair: Arc<crate::repair::RepairState>,
    /// Last time each peer answered a liveness probe.
    pub last_seen: Mutex<HashMap<NodeId, Instant>>,
    /// Ephemeral signals for this node's subscribers (bounded; a lagging subscriber
    /// misses signals, which are best effort by contract).
    pub signals: broadcast::Sender<Arc<pb::StoredEnvelope>>,
    /// Per shard: the task that combines concurrent appends into one Raft entry.
    pub proposers: Vec<tokio::sync::mpsc::Sender<proposer::Pending>>,
    /// Bytes of publishes in progress on this node as the node that received them,
    /// bounded (`max_pending_publish_bytes`).
    pub admission: crate::admission::Admission,
    /// Bytes of envelopes queued for or in this node's proposers (as a shard's leader, for
    /// publishes received here or forwarded), bounded by the same setting.
    pub queue_admission: crate::admission::Admission,
    /// Set when the node starts shutting down: open subscriptions end with UNAVAILABLE
    /// (a graceful gRPC shutdown waits for open streams).
    pub stopping: tokio::sync::watch::Sender<bool>,
}

/// Signals buffered per node for its subscribers.
pub const SIGNAL_CAPACITY: usize = 4096;
/// Time allowed to hand ephemeral signals to the other nodes.
const SIGNAL_FANOUT_TIMEOUT: Duration = Duration::from_secs(1);

/// A write as a client asks for it; the leader that proposes it adds its clock.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum WriteOp {
    Append(Vec<NewEnvelope>),
    CommitCursor {
        conversation_id: String,
        reader_id: String,
        seq: u64,
    },
    /// One unbounded erasure step: only an older node forwards it (this one proposes
    /// `EraseConversation`); kept so the variants after it keep their postcard tags.
    DeleteConversation {
        conversation_id: String,
        reset_seq: bool,
    },
    /// Unbounded: only an older node forwards it (this one proposes `SetRetentionStep`).
    SetRetention {
        conversation_id: String,
        max_age_ms: u64,
        max_count: u64,
    },
    Maintain {
        dedupe_window_ms: u64,
        max_removals: u32,
    },
    /// One bounded step of an erasure (`Command::EraseConversation`).
    EraseConversation {
        conversation_id: String,
        reset_seq: bool,
        max_removals: u32,
    },
    /// One bounded step of a retention change (`Command::SetRetentionStep`).
    SetRetentionStep {
        conversation_id: String,
        max_age_ms: u64,
        max_count: u64,
        max_removals: u32,
    },
}

impl WriteOp {
    pub fn into_command(self, now_ms: u64) -> Command {
        match self {
            WriteOp::Append(envelopes) => Command::Append { now_ms, envelopes },
            WriteOp::CommitCursor { conversation_id, reader_id, seq } => {
                Command::CommitCursor { now_ms, conversation_id, reader_id, seq }
            }
            WriteOp::DeleteConversation { conversation_id, reset_seq } => {
                Command::DeleteConversation { now_ms, conversation_id, reset_seq }
            }
            WriteOp::SetRetention { conversation_id, max_age_ms, max_count } => {
                Command::SetRetention { now_ms, conversation_id, max_age_ms, max_count }
            }
            WriteOp::Maintain { dedupe_window_ms, max_removals } => {
                Command::Maintain { now_ms, dedupe_window_ms, max_removals }
            }
            WriteOp::EraseConversation { conversation_id, reset_seq, max_removals } => {
                Command::EraseConversation { now_ms, conversation_id, reset_seq, max_removals }
            }
            WriteOp::SetRetentionStep { conversation_id, max_age_ms, max_count, max_removals } => {
                Command::SetRetentionStep { now_ms, conversation_id, max_age_ms, max_count, max_removals }
            }
        }
    }
}

/// A read; served by the leader after a read-index check, or by a replica when stale.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ReadOp {
    Page { conversation_id: String, backward: bool, start: u64, limit: u32 },
    Cursors { conversation_id: String, reader_id: Option<String>, after: String, limit: u32 },
}

/// What a read answers: the public response, so a forwarded read needs no second format.
#[derive(Debug, Clone)]
pub enum ReadAnswer {
    Page(pb::ReadResponse),
    Cursors(pb::GetCursorsResponse),
}

impl ReadOp {
    fn run(self, store: &StateStore, group: GroupId, now_ms: u64) -> Result<ReadAnswer, BrokerError> {
        match self {
            ReadOp::Page { conversation_id, backward, start, limit } => {
                let dir = if backward { Direction::Backward } else { Direction::Forward };
                let p = store.read_page(group, &conversation_id, dir, start, limit as usize, now_ms)?;
                Ok(ReadAnswer::Page(convert::page_to_pb(p)))
            }
            ReadOp::Cursors { conversation_id, reader_id, after, limit } => {
                let (cursors, end, last_seq) =
                    store.cursors(group, &conversation_id, reader_id.as_deref(), &after, limit as usize)?;
                Ok(ReadAnswer::Cursors(pb::GetCursorsResponse {
                    cursors: cursors
                        .into_iter()
                        .map(|c| pb::Cursor {
                            unread: last_seq.saturating_sub(c.seq),
                            reader_id: c.reader_id,
                            seq: c.seq,
                            updated_at_ms: c.updated_at_ms,
                        })
                        .collect(),
                    last_seq,
                    end,
                }))
            }
        }
    }
}

impl Node {
    pub fn shards(&self) -> u32 {
        self.rafts.len() as u32
    }

    pub fn raft(&self, group: GroupId) -> Result<&HRaft, BrokerError> {
        self.rafts
            .get(group as usize)
            .ok_or_else(|| BrokerError::InvalidArgument(format!("shard {group} does not exist on this node")))
    }

    /// Address of `node` as the shard's membership knows it.
    fn addr_of(&self, group: GroupId, node: NodeId) -> Option<String> {
        let raft = self.rafts.get(group as usize)?;
        let m = raft.metrics().borrow_watched().membership_config.clone();
        let addr = m.nodes().find(|(id, _)| **id == node).map(|(_, n)| n.addr.clone());
        addr
    }

    /// Runs a write through the shard's Raft log and returns once it is committed on a
    /// majority and applied. Retries through leader changes until `deadline`.
    pub async fn write(
        self: &Arc<Self>,
        group: GroupId,
        op: WriteOp,
        deadline: Instant,
    ) -> Result<CommandResponse, BrokerError> {
        let mut backoff = RETRY_MIN;
        loop {
            let leader = match self.local_write(group, op.clone(), deadline).await {
                Ok(r) => return Ok(r),
                Err(BrokerError::NotLeader { leader, .. }) => leader,
                Err(e) => return Err(e),
            };
            if let Some(leader) = leader.filter(|l| *l != self.id) {
                let req = ForwardRequest::Write(op.clone());
                match self.forward(group, leader, &req, deadline).await {
                    Ok(ForwardResponse::Written(r)) => return Ok(r),
                    Ok(ForwardResponse::Overloaded(m)) => return Err(BrokerError::Overloaded(m)),
                    Ok(ForwardResponse::NotLeader { .. }) | Ok(ForwardResponse::Unavailable(_)) => {}
                    Ok(ForwardResponse::Error(e)) => return Err(BrokerError::Internal(e)),
                    Ok(other) => return Err(BrokerError::Internal(format!("unexpected forward answer {other:?}"))),
                    Err(e) if e.is_retryable() => {
                        tracing::debug!(group, leader, error = %e, "forward failed; retrying")
                    }
                    Err(e) => return Err(e),
                }
            }
            backoff = self.pause(group, backoff, deadline).await?;
        }
    }

    /// Proposes `op` on this node if it leads the shard; `NotLeader` otherwise. Appends go
    /// through the shard's proposer, which combines concurrent appends into one entry.
    pub async fn local_write(
        &self,
        group: GroupId,
        op: WriteOp,
        deadline: Instant,
    ) -> Result<CommandResponse, BrokerError> {
        if self.disk.is_full() {
            return Err(BrokerError::DiskFull(self.disk.refusal(self.id)));
        }
        let raft = self.raft(group)?;
        let remaining = deadline.saturating_duration_since(Instant::now());
        if let WriteOp::Append(envelopes) = op {
            let proposer = self
                .proposers
                .get(group as usize)
                .ok_or_else(|| BrokerError::InvalidArgument(format!("shard {group} does not exist on this node")))?;
            // Not the leader: say so at once rather than queue behind the leader's work.
            if let Some(leader) = raft.metrics().borrow_watched().current_leader.filter(|l| *l != self.id) {
                return Err(BrokerError::NotLeader { shard: group, leader: Some(leader) });
            }
            let admitted = self.queue_admission.admit(proposer::size(&envelopes))?;
            let (tx, rx) = tokio::sync::oneshot::channel();
            let queued =
                tokio::time::timeout(remaining, proposer.send(proposer::Pending { envelopes, reply: tx, admitted }));
            match queued.await {
                Err(_) => return Err(BrokerError::DeadlineExceeded(remaining)),
                Ok(Err(_)) => {
                    return Err(BrokerError::Unavailable {
                        shard: group,
                        reason: "the shard's proposer stopped".into(),
                    })
                }
                Ok(Ok(())) => {}
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            return match tokio::time::timeout(remaining, rx).await {
                Err(_) => Err(BrokerError::DeadlineExceeded(remaining)),
                Ok(Err(_)) => Err(BrokerError::Unavailable {
                    shard: group,
                    reason: "the shard's proposer dropped the append".into(),
                }),
                Ok(Ok(r)) => r.map(CommandResponse::Appended),
            };
        }
        // The leader's clock goes into the entry: every replica applies the same value.
        let cmd = op.into_command(self.now_ms());
        match tokio::time::timeout(remaining, raft.client_write(cmd)).await {
            Err(_) => Err(BrokerError::DeadlineExceeded(remaining)),
            Ok(Ok(resp)) => Ok(resp.data),
            Ok(Err(e)) => Err(proposer::write_error(group, &e)),
        }
    }

    /// A read. Linearizable unless `stale`: then served by this replica as it stands.
    pub async fn read(
        self: &Arc<Self>,
        group: GroupId,
        op: ReadOp,
        stale: bool,
        deadline: Instant,
    ) -> Result<ReadAnswer, BrokerError> {
        if stale {
            return self.read_local(group, op).await;
        }
        let mut backoff = RETRY_MIN;
        loop {
            let leader = match self.linearizable_local_read(group, op.clone(), deadline).await {
                Ok(r) => return Ok(r),
                Err(BrokerError::NotLeader { leader, .. }) => leader,
                Err(e) if e.is_retryable() => None,
                Err(e) => return Err(e),
            };
            if let Some(leader) = leader.filter(|l| *l != self.id) {
                let req = ForwardRequest::Read(op.clone());
                match self.forward(group, leader, &req, deadline).await {
                    Ok(ForwardResponse::Read(bytes)) => return forward::decode_read(&op, &bytes),
                    Ok(ForwardResponse::NotLeader { .. }) | Ok(ForwardResponse::Unavailable(_)) => {}
                    Ok(ForwardResponse::Error(e)) => return Err(BrokerError::Internal(e)),
                    Ok(other) => return Err(BrokerError::Internal(format!("unexpected forward answer {other:?}"))),
                    Err(e) if e.is_retryable() => {}
                    Err(e) => return Err(e),
                }
            }
            backoff = self.pause(group, backoff, deadline).await?;
        }
    }

    /// Serves a linearizable read if this node leads the shard: a read-index round
    /// confirms leadership with a quorum and waits until the state machine caught up.
    pub async fn linearizable_local_read(
        &self,
        group: GroupId,
        op: ReadOp,
        deadline: Instant,
    ) -> Result<ReadAnswer, BrokerError> {
        let raft = self.raft(group)?;
        let remaining = deadline.saturating_duration_since(Instant::now());
        let read_log_id = match tokio::time::timeout(remaining, raft.ensure_linearizable(ReadPolicy::ReadIndex)).await {
            Err(_) => return Err(BrokerError::DeadlineExceeded(remaining)),
            Ok(Ok(r)) => r,
            Ok(Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(f)))) => {
                return Err(BrokerError::NotLeader { shard: group, leader: f.leader_id })
            }
            Ok(Err(e)) => return Err(BrokerError::Unavailable { shard: group, reason: e.to_string() }),
        };
        let answer = self.read_local(group, op).await?;
        if let (ReadAnswer::Page(p), true) = (&answer, tracing::enabled!(tracing::Level::DEBUG)) {
            let applied = raft.metrics().borrow_watched().last_applied;
            tracing::debug!(
                group,
                %read_log_id,
                ?applied,
                last_seq = p.last_seq,
                returned = p.envelopes.len(),
                conversation = p.envelopes.first().and_then(|e| e.envelope.as_ref()).map(|e| e.conversation_id.as_str()),
                "linearizable read served"
            );
        }
        Ok(answer)
    }

    /// Reads this replica's state machine as it stands (off the async runtime: sled blocks).
    pub async fn read_local(&self, group: GroupId, op: ReadOp) -> Result<ReadAnswer, BrokerError> {
        self.raft(group)?;
        let store = self.store.clone();
        let now = self.now_ms();
        tokio::task::spawn_blocking(move || op.run(&store, group, now))
            .await
            .map_err(|e| BrokerError::Internal(format!("read task failed: {e}")))?
    }

    /// Hands ephemeral envelopes to this node's live subscribers.
    pub fn deliver_signals(&self, now_ms: u64, envelopes: Vec<NewEnvelope>) {
        for e in envelopes {
            let signal = pb::StoredEnvelope {
                envelope: Some(convert::envelope_to_pb(e)),
                seq: 0,
                committed_at_ms: now_ms,
                ephemeral: true,
            };
            // No receiver: nobody subscribes here.
            let _ = self.signals.send(Arc::new(signal));
        }
        metrics::counter!("habar_signals_delivered_total").increment(1);
    }

    /// Ephemeral publish: delivered to live subscribers on this node and on every other
    /// node (best effort, in parallel, bounded by a short timeout). Nothing is stored.
    /// Returns how many other nodes took the signals.
    pub async fn publish_ephemeral(self: &Arc<Self>, envelopes: Vec<NewEnvelope>, deadline: Instant) -> usize {
        let now = self.now_ms();
        self.deliver_signals(now, envelopes.clone());
        let peers: Vec<(NodeId, String)> = match self.rafts.first() {
            Some(r) => r
                .metrics()
                .borrow_watched()
                .membership_config
                .nodes()
                .filter(|(id, _)| **id != self.id)
                .map(|(id, n)| (*id, n.addr.clone()))
                .collect(),
            None => Vec::new(),
        };
        let deadline = deadline.min(Instant::now() + SIGNAL_FANOUT_TIMEOUT);
        let req = ForwardRequest::Signal { now_ms: now, envelopes };
        let calls = peers.into_iter().map(|(id, addr)| {
            let req = &req;
            async move {
                let Ok(channel) = self.pool.channel(id, &addr) else { return false };
                matches!(forward::call(channel, 0, req, deadline).await, Ok(ForwardResponse::Delivered))
            }
        });
        futures::future::join_all(calls).await.into_iter().filter(|ok| *ok).count()
    }

    /// A peer that answered the liveness probe in the last 3 seconds, if any.
    pub fn live_peer(&self) -> Option<NodeId> {
        let seen = self.last_seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.iter().filter(|(_, at)| at.elapsed() < Duration::from_secs(3)).map(|(id, _)| *id).min()
    }

    /// Whether this node currently leads `group`.
    pub fn is_leader(&self, group: GroupId) -> bool {
        self.rafts.get(group as usize).is_some_and(|r| r.metrics().borrow_watched().current_leader == Some(self.id))
    }

    /// One round of housekeeping: for each shard this node leads that has something to
    /// expire, trim or retire, proposes `Maintain` entries (carrying this leader's clock)
    /// until nothing is left or a bound of rounds is reached.
    pub async fn maintain_once(self: &Arc<Self>) {
        const ROUNDS: usize = 16;
        if !self.clock.calibrated() {
            // Deleting by a clock not yet checked against a majority could delete early.
            tracing::debug!("housekeeping waits for the clock to be calibrated against the peers");
            return;
        }
        for g in 0..self.shards() {
            for _ in 0..ROUNDS {
                if !self.is_leader(g) {
                    break;
                }
                let (store, now, window) = (self.store.clone(), self.now_ms(), self.cfg.dedupe_window_ms);
                let needed = tokio::task::spawn_blocking(move || store.needs_maintenance(g, now, window)).await;
                match needed {
                    Ok(Ok(true)) => {}
                    Ok(Ok(false)) => break,
                    Ok(Err(e)) => {
                        tracing::warn!(shard = g, error = %e, "housekeeping check failed");
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(shard = g, error = %e, "housekeeping check task failed");
                        break;
                    }
                }
                let op = WriteOp::Maintain {
                    dedupe_window_ms: self.cfg.dedupe_window_ms,
                    max_removals: self.cfg.maintenance_max_removals,
                };
                let deadline = Instant::now() + Duration::from_millis(self.cfg.request_timeout_ms);
                match self.local_write(g, op, deadline).await {
                    Ok(CommandResponse::Maintained(r)) => {
                        metrics::counter!("habar_expired_envelopes_total").increment(r.expired);
                        metrics::counter!("habar_retention_removed_envelopes_total").increment(r.retention_removed);
                        tracing::debug!(shard = g, ?r, "housekeeping applied");
                        if !r.more {
                            break;
                        }
                    }
                    Ok(other) => {
                        tracing::warn!(shard = g, ?other, "housekeeping answered unexpectedly");
                        break;
                    }
                    Err(e) => {
                        tracing::debug!(shard = g, error = %e, "housekeeping not proposed");
                        break;
                    }
                }
            }
        }
    }

    /// Starts a snapshot build of each shard on this node for which one is due
    /// ([`SnapshotRule::due`]). `tried[g]`: the applied index at which shard `g` was last
    /// triggered and its snapshot's index then, while no other snapshot has appeared
    /// (openraft drops a trigger while a build runs, and a failed build leaves the old
    /// snapshot): not triggered again before `snapshot_logs_since_last` more entries, as
    /// openraft's own policy would; any new snapshot (the build's, or one that was under way)
    /// ends the wait.
    pub async fn trigger_due_snapshots(&self, tried: &mut [Option<(u64, Option<u64>)>]) {
        let rule = SnapshotRule {
            min_entries: self.cfg.snapshot_logs_since_last,
            growth_percent: self.cfg.snapshot_growth_percent,
        };
        // The WAL is shared: the shard with the oldest held entry keeps every later segment
        // on disk, whatever the others purged. When the WAL outgrows `growth_percent` of the
        // node's state (its snapshots), that shard's growth condition is waived.
        let snapshots: Vec<Option<(u64, u64)>> =
            (0..self.rafts.len()).map(|g| self.store.current_snapshot_size(g as GroupId)).collect();
        let state_bytes: u64 = snapshots.iter().flatten().map(|(_, bytes)| bytes).sum();
        let (wal_bytes, oldest) = self.wal.retention();
        let wal_over = rule.wal_over(wal_bytes, state_bytes);
        for (g, raft) in self.rafts.iter().enumerate() {
            let Some(applied) = raft.metrics().borrow_watched().last_applied.map(|l| l.index) else { continue };
            let snapshot = snapshots.get(g).copied().flatten();
            let Some(slot) = tried.get_mut(g) else { continue };
            if slot.is_some_and(|(_, before)| snapshot.map(|(index, _)| index) != before) {
                *slot = None;
            }
            let log_bytes = snapshot.map_or(0, |(index, _)| self.wal.bytes_after(g as GroupId, index));
            let pinning = wal_over && oldest == Some(g as GroupId);
            if !rule.due(applied, snapshot, slot.map(|(at, _)| at), log_bytes, pinning) {
                continue;
            }
            tracing::debug!(shard = g, applied, ?snapshot, log_bytes, pinning, wal_bytes, "snapshot due");
            match raft.trigger().snapshot().await {
                Ok(()) => *slot = Some((applied, snapshot.map(|(index, _)| index))),
                Err(e) => tracing::warn!(shard = g, error = %e, "snapshot not triggered"),
            }
        }
    }

    /// After an erasure: snapshot every shard on this node and purge its log up to the
    /// snapshot, rolling the WAL in between, so that no WAL segment or old snapshot file
    /// still holds the erased envelopes (see SECURITY.md).
    pub async fn compact_after_erasure(&self) {
        // Roll first: the segment that holds the erasure (and everything before it) stops
        // being written, so once every group purged past it, it is deleted.
        // Off the runtime: the roll fdatasyncs the segment it seals.
        let wal = self.wal.clone();
        let rolled = tokio::task::spawn_blocking(move || wal.roll()).await;
        if let Err(e) = rolled.map_err(|e| e.to_string()).and_then(|r| r.map_err(|e| e.to_string())) {
            tracing::warn!(error = %e, "rolling the WAL after an erasure failed");
            return;
        }
        for (g, raft) in self.rafts.iter().enumerate() {
            let applied = raft.metrics().borrow_watched().last_applied.map_or(0, |l| l.index);
            // openraft drops a trigger while a build of the group is under way (one begun
            // before the erasure): triggered again until a snapshot covers the erasure.
            let deadline = tokio::time::Instant::now() + ERASURE_SNAPSHOT_WAIT;
            let mut done = None;
            // Doubling: a build that keeps failing (it returns the current snapshot) is not
            // begun again every half second (each begin holds the shard for a moment).
            let mut pause = ERASURE_SNAPSHOT_RETRIGGER;
            while done.is_none() && tokio::time::Instant::now() < deadline {
                if let Err(e) = raft.trigger().snapshot().await {
                    tracing::warn!(shard = g, error = %e, "snapshot after erasure not triggered");
                    break;
                }
                let wait = pause.min(deadline - tokio::time::Instant::now());
                pause = (pause * 2).min(ERASURE_SNAPSHOT_RETRIGGER_MAX);
                done = raft
                    .wait(Some(wait))
                    .metrics(|m| m.snapshot.is_some_and(|s| s.index >= applied), "snapshot after erasure")
                    .await
                    .ok()
                    .and_then(|m| m.snapshot);
            }
            match done {
                Some(s) => {
                    if let Err(e) = raft.trigger().purge_log(s.index).await {
                        tracing::warn!(shard = g, error = %e, "purge after erasure not triggered");
                    }
                }
                None => tracing::warn!(
                    shard = g,
                    waited_s = ERASURE_SNAPSHOT_WAIT.as_secs(),
                    "snapshot after erasure did not finish"
                ),
            }
        }
        metrics::counter!("habar_erasure_compactions_total").increment(1);
    }

    /// This node's clock in unix ms, as it stamps entries and judges expiry.
    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    async fn forward(
        &self,
        group: GroupId,
        leader: NodeId,
        req: &ForwardRequest,
        deadline: Instant,
    ) -> Result<ForwardResponse, BrokerError> {
        let Some(addr) = self.addr_of(group, leader) else {
            return Err(BrokerError::Unavailable { shard: group, reason: format!("no address for node {leader}") });
        };
        let channel = self.pool.channel(leader, &addr).map_err(|e| BrokerError::Unavailable {
            shard: group,
            reason: format!("no channel to node {leader} at {addr}: {e}"),
        })?;
        forward::call(channel, group, req, deadline).await
    }

    /// Sleeps before the next attempt, doubling the pause up to a cap; fails once the
    /// deadline would pass.
    async fn pause(&self, group: GroupId, backoff: Duration, deadline: Instant) -> Result<Duration, BrokerError> {
        let now = Instant::now();
        if now + backoff >= deadline {
            return Err(BrokerError::Unavailable {
                shard: group,
                reason: "no leader answered before the call's deadline".into(),
            });
        }
        tokio::time::sleep(backoff).await;
        Ok((backoff * 2).min(RETRY_MAX))
    }

    /// `Cluster.Status` as this node sees it.
    pub fn status(&self) -> pb::StatusResponse {
        let mut nodes: BTreeMap<NodeId, String> = BTreeMap::new();
        let mut shards = Vec::with_capacity(self.rafts.len());
        for (g, raft) in self.rafts.iter().enumerate() {
            let m = raft.metrics().borrow_watched().clone();
            for (id, n) in m.membership_config.nodes() {
                nodes.entry(*id).or_insert_with(|| n.addr.clone());
            }
            let replicas = m
                .replication
                .as_ref()
                .map(|r| {
                    r.iter()
                        .map(|(id, l)| pb::ReplicaProgress {
                            node_id: *id,
                            matched_index: l.as_ref().map_or(0, |l| l.index),
                        })
                        .collect()
                })
                .unwrap_or_default();
            shards.push(pb::ShardStatus {
                shard: g as u32,
                leader: m.current_leader.unwrap_or(0),
                term: m.current_term,
                commit_index: m.cluster_committed.as_ref().map_or(0, |l| l.index),
                applied_index: m.last_applied.as_ref().map_or(0, |l| l.index),
                replicas,
                snapshot_index: m.snapshot.as_ref().map_or(0, |l| l.index),
                purged_index: m.purged.as_ref().map_or(0, |l| l.index),
                repairing: self.repair.is_repairing(g as u32),
            });
        }
        let seen = self.last_seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let alive_window = Duration::from_millis(self.cfg.election_timeout_max_ms.max(1000) * 3);
        let nodes = nodes
            .into_iter()
            .map(|(id, addr)| pb::NodeStatus {
                id,
                addr,
                alive: id == self.id || seen.get(&id).is_some_and(|t| t.elapsed() < alive_window),
            })
            .collect();
        pb::StatusResponse { node_id: self.id, nodes, shards, shard_count: self.shards() }
    }
}

/// When a shard builds a snapshot: `snapshot_logs_since_last` entries applied since the
/// last one (or since the last trigger that has not produced one), and, with
/// `snapshot_growth_percent` above 0 and a snapshot to compare with, a log since that
/// snapshot of at least that percentage of its size. A snapshot copies the whole state
/// (every envelope), so on the entry count alone a shard whose state keeps growing copies
/// more and more per entry written (the closed loop on the reference machine: 0.5 GiB per
/// shard after ~3 minutes, another every ~3 minutes, each larger); with the growth rule
/// each build is paid for by as many bytes written, so the copying stays in proportion to
/// the writes (at 100%: at most ~2 bytes copied per byte written), at the cost of keeping
/// about that share of the state as log ([`SnapshotRule::wal_over`] waives the growth
/// condition for the shard that keeps the shared WAL past it; a shard with fewer than
/// `min_entries` entries since its snapshot still keeps it, as before).
#[derive(Debug, Clone, Copy)]
pub struct SnapshotRule {
    pub min_entries: u64,
    pub growth_percent: u64,
}

impl SnapshotRule {
    /// `applied`: the last applied index; `snapshot`: the current snapshot's last index and
    /// size in bytes; `tried`: the applied index of a trigger not followed by a snapshot yet;
    /// `log_bytes`: the bytes of the log's entries after the snapshot's index; `pinning`:
    /// the shard keeps a WAL that outgrew the state on disk ([`SnapshotRule::wal_over`]),
    /// which waives the growth condition.
    pub fn due(
        &self,
        applied: u64,
        snapshot: Option<(u64, u64)>,
        tried: Option<u64>,
        log_bytes: u64,
        pinning: bool,
    ) -> bool {
        // Entries since index `base` (`None`: since the log's start, index 0 included).
        let base = snapshot.map(|(index, _)| index).max(tried);
        let entries = match base {
            Some(b) => applied.saturating_sub(b),
            None => applied + 1,
        };
        if entries < self.min_entries {
            return false;
        }
        match snapshot {
            Some((_, bytes)) if self.growth_percent > 0 && !pinning => {
                u128::from(log_bytes) * 100 >= u128::from(bytes) * u128::from(self.growth_percent)
            }
            _ => true,
        }
    }

    /// Whether a WAL of `wal_bytes` outgrew `growth_percent` of a node state of `state_bytes`
    /// (the sum of its shards' snapshots; never with the growth rule off or no snapshot).
    pub fn wal_over(&self, wal_bytes: u64, state_bytes: u64) -> bool {
        self.growth_percent > 0
            && state_bytes > 0
            && u128::from(wal_bytes) * 100 > u128::from(state_bytes) * u128::from(self.growth_percent)
    }
}

#[cfg(test)]
mod snapshot_rule_tests {
    use super::SnapshotRule;

    const RULE: SnapshotRule = SnapshotRule { min_entries: 100, growth_percent: 50 };

    /// Property: the first snapshot comes after `min_entries` entries (counting index 0),
    /// whatever the bytes.
    #[test]
    fn the_first_snapshot_is_due_on_the_entry_count() {
        assert!(!RULE.due(98, None, None, 0, false));
        assert!(RULE.due(99, None, None, 0, false));
        assert!(RULE.due(99, None, None, u64::MAX, false));
    }

    /// Property: a later one needs both the entries and a log of `growth_percent` of the
    /// snapshot's size; at 0 the entries alone.
    #[test]
    fn a_later_snapshot_needs_the_entries_and_the_growth() {
        let snap = Some((1_000, 10_000));
        assert!(!RULE.due(1_099, snap, None, 1_000_000, false), "too few entries");
        assert!(!RULE.due(1_100, snap, None, 4_999, false), "log below 50% of 10,000 bytes");
        assert!(RULE.due(1_100, snap, None, 5_000, false));
        let entries_only = SnapshotRule { growth_percent: 0, ..RULE };
        assert!(entries_only.due(1_100, snap, None, 0, false));
        assert!(!entries_only.due(1_099, snap, None, 0, false));
        // No overflow at the extremes.
        let big = SnapshotRule { min_entries: 1, growth_percent: 10_000 };
        assert!(!big.due(u64::MAX, Some((0, u64::MAX)), None, u64::MAX, false));
        assert!(big.due(u64::MAX, Some((0, 1)), None, 100, false));
    }

    /// Property: a shard whose oldest entry keeps a WAL that outgrew the state on disk is due
    /// without the growth, still not before `min_entries`; the WAL is "over" only past
    /// `growth_percent` of the state, and never with the rule off or no state.
    #[test]
    fn a_shard_pinning_an_outgrown_wal_is_due_without_the_growth() {
        let snap = Some((1_000, 10_000));
        assert!(!RULE.due(1_100, snap, None, 10, false));
        assert!(RULE.due(1_100, snap, None, 10, true));
        assert!(!RULE.due(1_099, snap, None, 10, true), "the entries still count");
        assert!(!RULE.wal_over(500, 1_000), "50% of the state is not over 50%");
        assert!(RULE.wal_over(501, 1_000));
        assert!(!RULE.wal_over(u64::MAX, 0), "no snapshot, no state to compare with");
        assert!(!SnapshotRule { growth_percent: 0, ..RULE }.wal_over(u64::MAX, 1));
    }

    /// Property: after a trigger that produced no snapshot (a build under way or failed),
    /// the next waits for `min_entries` more entries.
    #[test]
    fn a_trigger_without_a_snapshot_waits_for_more_entries() {
        let snap = Some((1_000, 10_000));
        assert!(!RULE.due(1_150, snap, Some(1_100), 1_000_000, false));
        assert!(RULE.due(1_200, snap, Some(1_100), 1_000_000, false));
    }
}
