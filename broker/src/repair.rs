//! Repair after corruption: a node whose WAL was damaged rejoins without a vote.
//!
//! When the WAL does not open because of corruption (not a torn tail), the node moves it
//! to `quarantine/`, writes the repair marker (`habar_raft_store::repair`) and starts with an
//! empty log. It has lost its votes, its committed ids and entries it may have acknowledged,
//! so until it has caught up it must not help elect anyone: with its vote, a candidate that
//! lacks an entry this node had acknowledged could win, and the entry would be lost.
//!
//! While a shard repairs, this node (1) refuses Vote, PreVote and TransferLeader for it at the
//! Raft transport (UNAVAILABLE, naming the reason) and (2) never campaigns for it (openraft's
//! runtime `elect(false)`). It still accepts AppendEntries and snapshots, which is how it
//! catches up. A shard is repaired once all of these hold:
//!
//! - at least twice the maximum election timeout has passed since the node started (a
//!   candidacy this node voted for before the damage has ended, won or lost);
//! - a majority of the shard's voters, **not counting this node**, told it their Raft
//!   position; `M` is the highest term among them. Any term in which this node voted before
//!   the damage had a winner or candidate that persisted it, and an election needs a
//!   majority, so some answer of a majority of the others carries a term at least that high
//!   (for one damaged node);
//! - one of them is the leader in term `M`, with last log index `X` at the time it answered
//!   (found once per shard and kept: under load the leader's last index moves on faster
//!   than a query round, so a fresh target each round might never be reached);
//! - this node follows a leader (that one or a later one) in a term `>= M`, and its own log
//!   reaches `X`.
//!
//! Entries this node acknowledged before the damage were appended by leaders of terms `<= M`;
//! the ones that were committed are in the log of the leader of `M` (leader completeness:
//! a majority without this node elected it), at an index `<= X`. Once the node holds them,
//! its vote is as good as any other. Then the shard's vote refusal ends and it may campaign;
//! when every shard is repaired the marker is removed (fsynced), so a restart mid-repair
//! resumes repairing. The cost is availability: with one of the other nodes down, the shard
//! has no majority of others to ask and stays without this node's vote, exactly as if this
//! node were down too.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;
use std::time::Instant;

use habar_raft_store::repair::RepairMarker;
use habar_raft_store::types::GroupId;
use habar_raft_store::types::NodeId;
use openraft::rt::watch::WatchReceiver;
use serde::Deserialize;
use serde::Serialize;

use crate::forward::ForwardRequest;
use crate::forward::ForwardResponse;
use crate::node::Node;

/// How often a repairing node asks its peers for their Raft positions.
const CHECK_INTERVAL: Duration = Duration::from_millis(250);
/// Time allowed for one position query.
const QUERY_TIMEOUT: Duration = Duration::from_millis(800);

/// A node's view of one shard, as a repairing peer asks for it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RaftPosition {
    pub node: NodeId,
    pub term: u64,
    pub leader: Option<NodeId>,
    pub last_log_index: Option<u64>,
    /// The answering node is itself repairing this shard.
    pub repairing: bool,
}

/// Which shards of this node are still repairing.
pub struct RepairState {
    pending: Mutex<BTreeSet<GroupId>>,
    reason: Option<String>,
    started: Instant,
    data_dir: PathBuf,
}

impl RepairState {
    /// A node that is not repairing.
    pub fn none(data_dir: PathBuf) -> Self {
        Self { pending: Mutex::new(BTreeSet::new()), reason: None, started: Instant::now(), data_dir }
    }

    /// A node repairing every shard in `0..shards` for `marker`'s reason.
    pub fn repairing(data_dir: PathBuf, shards: u32, marker: &RepairMarker) -> Self {
        metrics::gauge!("habar_repairing_shards").set(f64::from(shards));
        Self {
            pending: Mutex::new((0..shards).collect()),
            reason: Some(marker.reason.clone()),
            started: Instant::now(),
            data_dir,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<GroupId>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_repairing(&self, group: GroupId) -> bool {
        self.lock().contains(&group)
    }

    pub fn any(&self) -> bool {
        !self.lock().is_empty()
    }

    /// Why this node refuses to vote for `group`, or `None` when it may vote.
    pub fn vote_refusal(&self, node: NodeId, group: GroupId) -> Option<String> {
        self.is_repairing(group).then(|| {
            format!(
                "node {node} is repairing shard {group} after storage corruption ({}); it votes again once caught up",
                self.reason.as_deref().unwrap_or("unknown reason")
            )
        })
    }

    fn done(&self, group: GroupId) -> bool {
        let mut p = self.lock();
        p.remove(&group);
        metrics::gauge!("habar_repairing_shards").set(p.len() as f64);
        p.is_empty()
    }
}

/// This node's position in `group`, for a repairing peer.
pub fn position(node: &Node, group: GroupId) -> Option<RaftPosition> {
    let raft = node.rafts.get(group as usize)?;
    let m = raft.metrics().borrow_watched().clone();
    Some(RaftPosition {
        node: node.id,
        term: m.current_term,
        leader: m.current_leader,
        last_log_index: m.last_log_index,
        repairing: node.repair.is_repairing(group),
    })
}

/// Voters of `group` as this node knows them (the initial cluster while it knows nothing).
fn voters(node: &Node, group: GroupId) -> Vec<(NodeId, String)> {
    let Some(raft) = node.rafts.get(group as usize) else { return Vec::new() };
    let m = raft.metrics().borrow_watched().membership_config.clone();
    let voters: BTreeSet<NodeId> = m.membership().voter_ids().collect();
    let known: Vec<(NodeId, String)> =
        m.nodes().filter(|(id, _)| voters.contains(id)).map(|(id, n)| (*id, n.addr.clone())).collect();
    if known.is_empty() {
        node.cfg.initial_cluster.iter().map(|(id, a)| (*id, a.clone())).collect()
    } else {
        known
    }
}

/// Decides from the peers' answers whether `group` may leave repair: returns the leader and
/// the index this node must reach, or why not yet.
pub fn target(voter_count: usize, answers: &[RaftPosition]) -> Result<(NodeId, u64, u64), String> {
    let majority = voter_count / 2 + 1;
    if answers.len() < majority {
        return Err(format!("{} of the other voters answered, {majority} needed", answers.len()));
    }
    let max_term = answers.iter().map(|a| a.term).max().unwrap_or(0);
    let leader = answers
        .iter()
        .find(|a| a.term == max_term && a.leader == Some(a.node) && !a.repairing)
        .ok_or_else(|| format!("no answering node leads in term {max_term}"))?;
    Ok((leader.node, max_term, leader.last_log_index.unwrap_or(0)))
}

/// Checks each repairing shard until all are repaired, then removes the marker.
pub fn spawn(node: std::sync::Arc<Node>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if !node.repair.any() {
            return;
        }
        let min_wait = Duration::from_millis(2 * node.cfg.election_timeout_max_ms);
        let mut tick = tokio::time::interval(CHECK_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_reason: Vec<Option<String>> = vec![None; node.shards() as usize];
        // Per shard, once found: (leader, term M, index X) to reach. Kept, not asked again:
        // under load the leader's last index moves on faster than one query round, so a
        // fresh target each round would never be reached.
        let mut targets: Vec<Option<(NodeId, u64, u64)>> = vec![None; node.shards() as usize];
        loop {
            tick.tick().await;
            if node.repair.started.elapsed() < min_wait {
                continue;
            }
            for g in 0..node.shards() {
                if !node.repair.is_repairing(g) {
                    continue;
                }
                match check_group(&node, g, &mut targets[g as usize]).await {
                    Ok((leader, term, index)) => {
                        tracing::warn!(
                            shard = g,
                            leader,
                            term,
                            index,
                            "shard repaired: caught up from the leader; this node votes and campaigns again"
                        );
                        node.rafts[g as usize].runtime_config().elect(true);
                        if node.repair.done(g) {
                            let dir = node.repair.data_dir.clone();
                            match tokio::task::spawn_blocking(move || habar_raft_store::repair::clear_marker(&dir))
                                .await
                            {
                                Ok(Ok(())) => tracing::warn!(id = node.id, "repair complete: marker removed"),
                                Ok(Err(e)) => {
                                    tracing::error!(error = %e, "removing the repair marker failed; a restart repairs again")
                                }
                                Err(e) => tracing::error!(error = %e, "removing the repair marker panicked"),
                            }
                            return;
                        }
                    }
                    Err(why) => {
                        if last_reason[g as usize].as_deref() != Some(why.as_str()) {
                            tracing::info!(shard = g, why = %why, "shard still repairing");
                            last_reason[g as usize] = Some(why);
                        }
                    }
                }
            }
        }
    })
}

/// One round for shard `g`: finds its target if it has none yet, then checks this node's
/// log against it. The target stays valid across leader changes: entries this node may have
/// acknowledged and that were committed sit at indexes `<= X` in every later leader's log
/// too, so following any leader of a term `>= M` with the log at `X` or beyond suffices.
async fn check_group(
    node: &std::sync::Arc<Node>,
    g: GroupId,
    found: &mut Option<(NodeId, u64, u64)>,
) -> Result<(NodeId, u64, u64), String> {
    let (leader, term, index) = match *found {
        Some(t) => t,
        None => {
            let voters = voters(node, g);
            let mut answers = Vec::new();
            for (id, addr) in voters.iter().filter(|(id, _)| *id != node.id) {
                let Ok(channel) = node.pool.channel(*id, addr) else { continue };
                let deadline = Instant::now() + QUERY_TIMEOUT;
                if let Ok(ForwardResponse::RaftPosition(p)) =
                    crate::forward::call(channel, g, &ForwardRequest::RaftPosition, deadline).await
                {
                    if p.node == *id {
                        answers.push(p);
                    }
                }
            }
            let t = target(voters.len(), &answers)?;
            *found = Some(t);
            t
        }
    };
    let mine = node.rafts[g as usize].metrics().borrow_watched().clone();
    if mine.current_term < term || mine.current_leader.is_none() {
        return Err(format!(
            "following {:?} in term {}; must follow a leader of term {term} or later",
            mine.current_leader, mine.current_term
        ));
    }
    let have = mine.last_log_index.unwrap_or(0);
    if have < index {
        return Err(format!("log reaches {have}, leader {leader} had reached {index} in term {term}"));
    }
    Ok((leader, term, index))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(node: NodeId, term: u64, leader: Option<NodeId>, last: u64) -> RaftPosition {
        RaftPosition { node, term, leader, last_log_index: Some(last), repairing: false }
    }

    /// Property: the repair target needs a majority of the voters among the *other* nodes,
    /// takes the highest term they know, and only a leader of that term.
    #[test]
    fn target_needs_a_majority_of_others_and_the_newest_leader() {
        // 3 voters: both others must answer.
        assert!(target(3, &[p(1, 5, Some(1), 100)]).is_err());
        assert_eq!(target(3, &[p(1, 5, Some(1), 100), p(3, 5, Some(1), 90)]), Ok((1, 5, 100)));
        // A stale leader (lower term than another answer) is not a target.
        assert!(target(3, &[p(1, 5, Some(1), 100), p(3, 6, None, 90)]).is_err());
        assert_eq!(target(3, &[p(1, 5, Some(1), 100), p(3, 6, Some(3), 90)]), Ok((3, 6, 90)));
        // A repairing node is never the target, even if it claims to lead.
        let mut r = p(3, 6, Some(3), 90);
        r.repairing = true;
        assert!(target(3, &[p(1, 5, Some(1), 100), r]).is_err());
        // 5 voters: three others.
        assert!(target(5, &[p(1, 7, Some(1), 10), p(2, 7, Some(1), 9)]).is_err());
        assert_eq!(target(5, &[p(1, 7, Some(1), 10), p(2, 7, Some(1), 9), p(4, 7, Some(1), 8)]), Ok((1, 7, 10)));
    }
}
