//! The few types every part of Habar shares with the store: ids, the Raft type
//! configuration, and the commands that travel through the Raft log.
//!
//! openraft's own types stay behind the aliases in this module, so that moving to the
//! next openraft alpha touches this file and the two adapters (`log_store`, `sm`).

use std::fmt;

use bytes::Bytes;
use serde::Deserialize;
use serde::Serialize;

/// A Raft group. Conversations are hashed into shards; each shard is one group.
pub type GroupId = u32;

/// A node of the cluster.
pub type NodeId = u64;

/// Length of a `message_id`: the sender-chosen idempotency key.
pub const MESSAGE_ID_LEN: usize = 16;

/// What a node is known by in a membership: its gRPC address (`host:port`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAddr {
    pub addr: String,
}

impl NodeAddr {
    pub fn new(addr: impl Into<String>) -> Self {
        Self { addr: addr.into() }
    }
}

impl fmt::Display for NodeAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.addr)
    }
}

openraft::declare_raft_types!(
    /// Habar's Raft type configuration. One leader per term (`leader_id_std`), so a log
    /// id is exactly `(term, index)`, which is what the WAL frames on disk.
    pub TypeConfig:
        D = Command,
        R = CommandResponse,
        NodeId = NodeId,
        Node = NodeAddr,
        Term = u64,
        LeaderId = openraft::impls::leader_id_std::LeaderId<u64, NodeId>,
);

/// Thin aliases over openraft's generic types.
pub type Raft<SM> = openraft::Raft<TypeConfig, SM>;
pub type LogId = openraft::alias::LogIdOf<TypeConfig>;
pub type Vote = openraft::alias::VoteOf<TypeConfig>;
pub type Entry = openraft::alias::EntryOf<TypeConfig>;
pub type EntryPayload = openraft::EntryPayload<Command, NodeId, NodeAddr>;
pub type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;
pub type Membership = openraft::Membership<NodeId, NodeAddr>;
pub type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;
pub type Snapshot<SD> = openraft::alias::SnapshotOf<TypeConfig, SD>;

/// One envelope as a publisher handed it in. The ciphertext is opaque bytes that Habar
/// never parses, decrypts or logs.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewEnvelope {
    pub conversation_id: String,
    pub message_id: [u8; MESSAGE_ID_LEN],
    pub sender: String,
    pub ciphertext: Bytes,
    pub expires_at_ms: u64,
}

impl fmt::Debug for NewEnvelope {
    // Never print the ciphertext or the sender: only their sizes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewEnvelope")
            .field("conversation_id", &self.conversation_id)
            .field("sender_len", &self.sender.len())
            .field("ciphertext_len", &self.ciphertext.len())
            .field("expires_at_ms", &self.expires_at_ms)
            .finish()
    }
}

/// An envelope as the state machine holds it: with the `seq` it was given at apply time
/// and the leader's time of the log entry that carried it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEnvelope {
    pub envelope: NewEnvelope,
    pub seq: u64,
    pub committed_at_ms: u64,
}

/// The application command carried by one Raft log entry.
///
/// `now_ms` is the proposing leader's clock when it built the entry: every replica uses
/// this value, never its own clock, so apply is deterministic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Append envelopes (of conversations of this group) in order.
    Append { now_ms: u64, envelopes: Vec<NewEnvelope> },
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Append { now_ms, envelopes } => {
                write!(f, "Append(now_ms={now_ms}, n={})", envelopes.len())
            }
        }
    }
}

/// What applying one [`Command`] produced, in the command's order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandResponse {
    pub appended: Vec<Appended>,
}

/// The outcome of one envelope of an `Append`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Appended {
    pub seq: u64,
    pub committed_at_ms: u64,
    pub duplicate: bool,
}
