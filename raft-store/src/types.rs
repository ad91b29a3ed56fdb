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
/// this value, never its own clock, so apply is deterministic. Variants are only ever
/// added at the end (postcard encodes the variant's position).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Append envelopes (of conversations of this group) in order. An envelope whose
    /// (conversation, message_id) is in the dedupe state is answered with its original
    /// seq and not appended.
    Append { now_ms: u64, envelopes: Vec<NewEnvelope> },
    /// Moves a reader's cursor forward (never backwards; clamped to the last seq).
    CommitCursor { now_ms: u64, conversation_id: String, reader_id: String, seq: u64 },
    /// Housekeeping the leader proposes on a timer: deletes envelopes past `expires_at_ms
    /// <= now_ms`, envelopes beyond their conversation's retention, and dedupe entries
    /// older than `now_ms - dedupe_window_ms`; at most `max_removals` keys per command.
    Maintain { now_ms: u64, dedupe_window_ms: u64, max_removals: u32 },
    /// Erasure in one step: removes the conversation's envelopes, cursors and dedupe
    /// entries, however many. `reset_seq`: the next envelope of this id gets seq 1; else
    /// seqs continue. No longer proposed (one step of a big conversation was one sled batch
    /// of millions of keys); applied as before when an older log holds it.
    DeleteConversation { now_ms: u64, conversation_id: String, reset_seq: bool },
    /// Replaces a conversation's retention (0 = no limit) and enforces it at once, however
    /// many envelopes that removes. No longer proposed (`SetRetentionStep` is); applied as
    /// before when an older log holds it.
    SetRetention { now_ms: u64, conversation_id: String, max_age_ms: u64, max_count: u64 },
    /// One bounded step of an erasure: removes at most `max_removals` keys of the
    /// conversation, its envelopes first (lowest seqs first, each with its expiry entry),
    /// then its dedupe entries, then its cursors. The step that finds nothing left within
    /// its budget finishes the erasure (with `reset_seq`, the conversation's record goes
    /// too, so the next envelope gets seq 1) and answers `more: false`; the node proposes
    /// steps until then. Between steps a reader sees the oldest envelopes gone, as with
    /// retention.
    EraseConversation { now_ms: u64, conversation_id: String, reset_seq: bool, max_removals: u32 },
    /// Replaces a conversation's retention (0 = no limit) and removes at most
    /// `max_removals` of the envelopes it no longer allows, oldest first; answers
    /// `more: true` if it stopped with some left (the node proposes it again, and
    /// housekeeping removes them too).
    SetRetentionStep { now_ms: u64, conversation_id: String, max_age_ms: u64, max_count: u64, max_removals: u32 },
}

impl Command {
    /// The leader time the command carries.
    pub fn now_ms(&self) -> u64 {
        match self {
            Command::Append { now_ms, .. }
            | Command::CommitCursor { now_ms, .. }
            | Command::Maintain { now_ms, .. }
            | Command::DeleteConversation { now_ms, .. }
            | Command::SetRetention { now_ms, .. }
            | Command::EraseConversation { now_ms, .. }
            | Command::SetRetentionStep { now_ms, .. } => *now_ms,
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Append { now_ms, envelopes } => write!(f, "Append(now_ms={now_ms}, n={})", envelopes.len()),
            Command::CommitCursor { now_ms, seq, .. } => write!(f, "CommitCursor(now_ms={now_ms}, seq={seq})"),
            Command::Maintain { now_ms, .. } => write!(f, "Maintain(now_ms={now_ms})"),
            Command::DeleteConversation { now_ms, reset_seq, .. } => {
                write!(f, "DeleteConversation(now_ms={now_ms}, reset_seq={reset_seq})")
            }
            Command::SetRetention { now_ms, max_age_ms, max_count, .. } => {
                write!(f, "SetRetention(now_ms={now_ms}, max_age_ms={max_age_ms}, max_count={max_count})")
            }
            Command::EraseConversation { now_ms, reset_seq, max_removals, .. } => {
                write!(f, "EraseConversation(now_ms={now_ms}, reset_seq={reset_seq}, max_removals={max_removals})")
            }
            Command::SetRetentionStep { now_ms, max_age_ms, max_count, max_removals, .. } => write!(
                f,
                "SetRetentionStep(now_ms={now_ms}, max_age_ms={max_age_ms}, max_count={max_count}, \
                 max_removals={max_removals})"
            ),
        }
    }
}

/// What applying one [`Command`] produced. Blank and membership entries answer `Empty`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResponse {
    #[default]
    Empty,
    /// One per envelope of an `Append`, in the command's order.
    Appended(Vec<Appended>),
    /// The stored cursor after a `CommitCursor`.
    Cursor {
        seq: u64,
        updated_at_ms: u64,
        last_seq: u64,
    },
    Maintained(MaintainReport),
    Deleted {
        existed: bool,
        envelopes: u64,
        cursors: u64,
        next_seq: u64,
    },
    RetentionSet {
        removed: u64,
    },
    /// One step of an erasure (`EraseConversation`): what it removed; `existed`: the
    /// conversation had a record, envelopes or cursors when the step began; `more`: it
    /// stopped at its budget with keys left, so the erasure is not finished.
    Erased {
        existed: bool,
        envelopes: u64,
        cursors: u64,
        next_seq: u64,
        more: bool,
    },
    /// One `SetRetentionStep`: envelopes removed; `more`: it stopped at its budget.
    RetentionStep {
        removed: u64,
        more: bool,
    },
}

/// What one `Maintain` removed; `more`: it stopped at `max_removals` with work left.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaintainReport {
    pub expired: u64,
    pub retention_removed: u64,
    pub dedupe_trimmed: u64,
    pub more: bool,
}

/// The outcome of one envelope of an `Append`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Appended {
    pub seq: u64,
    pub committed_at_ms: u64,
    pub duplicate: bool,
}

/// A reader's position in a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CursorRecord {
    pub reader_id: String,
    pub seq: u64,
    pub updated_at_ms: u64,
}
