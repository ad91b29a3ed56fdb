//! One Habar node: the store, one Raft group per shard, and the logic that routes a call
//! to the shard's leader (locally or by forwarding) and retries through elections until
//! the call's deadline.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use std::time::Instant;
use std::time::SystemTime;
use std::time::UNIX_EPOCH;

use habar_proto::v1 as pb;
use habar_raft_store::types::Command;
use habar_raft_store::types::CommandResponse;
use habar_raft_store::types::GroupId;
use habar_raft_store::types::NewEnvelope;
use habar_raft_store::types::NodeId;
use habar_raft_store::types::StoredEnvelope;
use habar_raft_store::types::TypeConfig;
use habar_raft_store::GroupStateMachine;
use habar_raft_store::StateStore;
use habar_raft_store::Wal;
use openraft::error::ClientWriteError;
use openraft::error::LinearizableReadError;
use openraft::error::RaftError;
use openraft::rt::watch::WatchReceiver;
use openraft::ReadPolicy;

use crate::config::NodeConfig;
use crate::error::BrokerError;
use crate::forward;
use crate::forward::ForwardRequest;
use crate::forward::ForwardResponse;
use crate::raft_net::PeerPool;

pub type HRaft = openraft::Raft<TypeConfig, GroupStateMachine>;

/// Backoff between attempts while a shard has no reachable leader.
const RETRY_MIN: Duration = Duration::from_millis(10);
const RETRY_MAX: Duration = Duration::from_millis(200);

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

pub struct Node {
    pub id: NodeId,
    pub cfg: NodeConfig,
    pub wal: Wal,
    pub store: StateStore,
    pub rafts: Vec<HRaft>,
    pub pool: PeerPool,
    pub registry: crate::raft_net::GroupRegistry<GroupStateMachine>,
    /// Last time each peer answered a liveness probe.
    pub last_seen: Mutex<HashMap<NodeId, Instant>>,
}

/// What a local read returns.
pub struct ReadResult {
    pub envelopes: Vec<StoredEnvelope>,
    pub last_seq: u64,
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

    /// Appends `envelopes` (all of shard `group`) through Raft and returns once they are
    /// committed on a majority and applied. Retries through leader changes until `deadline`.
    pub async fn append(
        self: &Arc<Self>,
        group: GroupId,
        envelopes: Vec<NewEnvelope>,
        deadline: Instant,
    ) -> Result<CommandResponse, BrokerError> {
        let mut backoff = RETRY_MIN;
        loop {
            let leader = match self.local_append(group, envelopes.clone(), deadline).await {
                Ok(r) => return Ok(r),
                Err(BrokerError::NotLeader { leader, .. }) => leader,
                Err(e) => return Err(e),
            };
            if let Some(leader) = leader.filter(|l| *l != self.id) {
                let req = ForwardRequest::Append { envelopes: envelopes.clone() };
                match self.forward(group, leader, &req, deadline).await {
                    Ok(ForwardResponse::Appended(r)) => return Ok(r),
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

    /// Appends on this node if it leads the shard; `NotLeader` otherwise.
    pub async fn local_append(
        &self,
        group: GroupId,
        envelopes: Vec<NewEnvelope>,
        deadline: Instant,
    ) -> Result<CommandResponse, BrokerError> {
        let raft = self.raft(group)?;
        // The leader's clock goes into the entry: every replica applies the same value.
        let cmd = Command::Append { now_ms: now_ms(), envelopes };
        let remaining = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(remaining, raft.client_write(cmd)).await {
            Err(_) => Err(BrokerError::DeadlineExceeded(remaining)),
            Ok(Ok(resp)) => Ok(resp.data),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                Err(BrokerError::NotLeader { shard: group, leader: f.leader_id })
            }
            Ok(Err(RaftError::APIError(ClientWriteError::LogEntryDiscarded(f)))) => Err(BrokerError::Unavailable {
                shard: group,
                reason: format!(
                    "leader changed while the entry was in flight; its outcome is unknown (leader now {:?})",
                    f.leader_id
                ),
            }),
            Ok(Err(e)) => Err(BrokerError::Unavailable { shard: group, reason: e.to_string() }),
        }
    }

    /// A read of one conversation. Linearizable unless `stale`: then served by this replica.
    pub async fn read(
        self: &Arc<Self>,
        group: GroupId,
        conversation_id: String,
        from_seq: u64,
        limit: u32,
        stale: bool,
        deadline: Instant,
    ) -> Result<ReadResult, BrokerError> {
        if stale {
            return self.read_local(group, conversation_id, from_seq, limit).await;
        }
        let mut backoff = RETRY_MIN;
        loop {
            let leader =
                match self.linearizable_local_read(group, conversation_id.clone(), from_seq, limit, deadline).await {
                    Ok(r) => return Ok(r),
                    Err(BrokerError::NotLeader { leader, .. }) => leader,
                    Err(e) if e.is_retryable() => None,
                    Err(e) => return Err(e),
                };
            if let Some(leader) = leader.filter(|l| *l != self.id) {
                let req = ForwardRequest::Read { conversation_id: conversation_id.clone(), from_seq, limit };
                match self.forward(group, leader, &req, deadline).await {
                    Ok(ForwardResponse::Read(bytes)) => return forward::decode_read(&bytes),
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
        conversation_id: String,
        from_seq: u64,
        limit: u32,
        deadline: Instant,
    ) -> Result<ReadResult, BrokerError> {
        let raft = self.raft(group)?;
        let remaining = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(remaining, raft.ensure_linearizable(ReadPolicy::ReadIndex)).await {
            Err(_) => return Err(BrokerError::DeadlineExceeded(remaining)),
            Ok(Ok(_)) => {}
            Ok(Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(f)))) => {
                return Err(BrokerError::NotLeader { shard: group, leader: f.leader_id })
            }
            Ok(Err(e)) => return Err(BrokerError::Unavailable { shard: group, reason: e.to_string() }),
        }
        self.read_local(group, conversation_id, from_seq, limit).await
    }

    /// Reads this replica's state machine as it stands (off the async runtime: sled blocks).
    pub async fn read_local(
        &self,
        group: GroupId,
        conversation_id: String,
        from_seq: u64,
        limit: u32,
    ) -> Result<ReadResult, BrokerError> {
        self.raft(group)?;
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            let last_seq = store.last_seq(group, &conversation_id)?;
            let envelopes = store.read(group, &conversation_id, from_seq.max(1), limit as usize)?;
            Ok(ReadResult { envelopes, last_seq })
        })
        .await
        .map_err(|e| BrokerError::Internal(format!("read task failed: {e}")))?
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
