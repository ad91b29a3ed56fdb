//! Batching of appends into Raft entries: each shard has one proposer task. Appends for the
//! shard queue up (bounded) while earlier entries are in flight, and the task proposes
//! everything queued as one `Command::Append`, so a Raft entry, its WAL record, its
//! replication message and its state-machine batch carry many requests' envelopes.
//!
//! Entries in flight per shard are bounded (`IN_FLIGHT`): while they are all busy, appends
//! accumulate, so batches grow with the load and stay at one request when idle (no linger).

use std::sync::Arc;
use std::time::Instant;

use habar_raft_store::types::Appended;
use habar_raft_store::types::Command;
use habar_raft_store::types::CommandResponse;
use habar_raft_store::types::GroupId;
use habar_raft_store::types::NewEnvelope;
use habar_raft_store::types::TypeConfig;
use openraft::error::ClientWriteError;
use openraft::error::RaftError;
use tokio::sync::mpsc;
use tokio::sync::oneshot;
use tokio::sync::Semaphore;

use habar_raft_store::slow::SlowLog;

use crate::clock::Clock;
use crate::error::BrokerError;
use crate::node::HRaft;

/// Appends waiting for a shard's proposer.
pub const QUEUE: usize = 4096;
/// Raft entries of one shard proposed and not yet applied, at most.
const IN_FLIGHT: usize = 4;
/// Bounds of one combined entry.
const MAX_ENVELOPES: usize = 8192;
const MAX_BYTES: usize = 8 << 20;

pub struct Pending {
    pub envelopes: Vec<NewEnvelope>,
    pub reply: oneshot::Sender<Result<Vec<Appended>, BrokerError>>,
    /// Its share of the leader's queue budget (`admission.rs`), held until its entry is
    /// answered: the envelopes live that long, whether or not the caller still waits.
    pub admitted: crate::admission::Admitted,
}

/// What `envs` cost in a byte budget or an entry's size bound.
pub fn size(envs: &[NewEnvelope]) -> usize {
    envs.iter().map(|e| e.ciphertext.len() + e.conversation_id.len() + e.sender.len() + 40).sum()
}

/// Maps a failed write to what every waiter of the entry gets.
pub fn write_error(group: GroupId, e: &RaftError<TypeConfig, ClientWriteError<TypeConfig>>) -> BrokerError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
            BrokerError::NotLeader { shard: group, leader: f.leader_id }
        }
        RaftError::APIError(ClientWriteError::LogEntryDiscarded(f)) => BrokerError::Unavailable {
            shard: group,
            reason: format!(
                "leader changed while the entry was in flight; its outcome is unknown (leader now {:?})",
                f.leader_id
            ),
        },
        e => BrokerError::Unavailable { shard: group, reason: e.to_string() },
    }
}

/// Starts the proposer of `group`; it stops when every sender is dropped.
/// `slow` (shared by the node's shards) warns of an entry slower than `slow_warn_ms` from its
/// proposal to its apply.
pub fn spawn(group: GroupId, raft: HRaft, clock: Arc<Clock>, slow: Arc<SlowLog>) -> mpsc::Sender<Pending> {
    let (tx, mut rx) = mpsc::channel::<Pending>(QUEUE);
    tokio::spawn(async move {
        let permits = Arc::new(Semaphore::new(IN_FLIGHT));
        while let Some(first) = rx.recv().await {
            // Wait for room first: what queues meanwhile joins this entry.
            let Ok(permit) = permits.clone().acquire_owned().await else { return };
            let mut n = first.envelopes.len();
            let mut bytes = size(&first.envelopes);
            let mut batch = vec![first];
            while n < MAX_ENVELOPES && bytes < MAX_BYTES {
                match rx.try_recv() {
                    Ok(p) => {
                        n += p.envelopes.len();
                        bytes += size(&p.envelopes);
                        batch.push(p);
                    }
                    Err(_) => break,
                }
            }
            // A caller that gave up (deadline, cancelled) gets no answer: its envelopes are not
            // proposed (it was not acknowledged; a retry carries the same message ids).
            batch.retain(|p| !p.reply.is_closed());
            if batch.is_empty() {
                continue;
            }
            let (raft, clock, slow) = (raft.clone(), clock.clone(), slow.clone());
            tokio::spawn(async move {
                let started = Instant::now();
                let mut lens = Vec::with_capacity(batch.len());
                let mut envelopes = Vec::with_capacity(n);
                let mut replies = Vec::with_capacity(batch.len());
                let mut admitted = Vec::with_capacity(batch.len());
                for p in batch {
                    lens.push(p.envelopes.len());
                    envelopes.extend(p.envelopes);
                    replies.push(p.reply);
                    admitted.push(p.admitted);
                }
                let envelopes_n = envelopes.len();
                metrics::histogram!("habar_entry_envelopes").record(envelopes_n as f64);
                // For the fault suite's diagnosis: which conversation got which seq in which entry.
                let convs: Vec<String> = if tracing::enabled!(tracing::Level::DEBUG) {
                    envelopes.iter().map(|e| e.conversation_id.clone()).collect()
                } else {
                    Vec::new()
                };
                let res = raft.client_write(Command::Append { now_ms: clock.now_ms(), envelopes }).await;
                drop(permit);
                let took = started.elapsed();
                metrics::histogram!("habar_entry_commit_seconds").record(took.as_secs_f64());
                let ok = res.is_ok();
                match res {
                    Ok(resp) => match resp.data {
                        CommandResponse::Appended(all) if all.len() == lens.iter().sum::<usize>() => {
                            tracing::debug!(group, log_id = %resp.log_id, seqs = ?convs.iter().zip(all.iter()).map(|(c, a)| (c.as_str(), a.seq)).collect::<Vec<_>>(), "append committed");
                            let mut all = all.into_iter();
                            for (len, reply) in lens.into_iter().zip(replies) {
                                let _ = reply.send(Ok(all.by_ref().take(len).collect()));
                            }
                        }
                        other => {
                            for reply in replies {
                                let _ = reply.send(Err(BrokerError::Internal(format!(
                                    "shard {group} answered {other:?} to an append"
                                ))));
                            }
                        }
                    },
                    Err(e) => {
                        for reply in replies {
                            let _ = reply.send(Err(write_error(group, &e)));
                        }
                    }
                }
                drop(admitted);
                // After the replies, so a slow log sink never delays them.
                if let Some(left_out) = slow.check(took) {
                    tracing::warn!(
                        group,
                        envelopes = envelopes_n,
                        ms = habar_raft_store::slow::ms(took),
                        ok,
                        left_out,
                        "slow Raft entry (proposal to applied on this leader; see the slow fdatasync/apply warnings of the nodes)"
                    );
                }
            });
        }
    });
    tx
}
