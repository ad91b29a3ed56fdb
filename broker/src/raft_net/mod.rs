//! The Raft transport between Habar nodes, over the internal gRPC service
//! `habar.raft.v1.RaftTransport` (`proto/habar/v1/raft.proto`).
//!
//! Every node runs one openraft group per shard. All groups of a node share one HTTP/2
//! channel per peer node ([`PeerPool`]); every message names its group, and the receiving
//! node dispatches it to that group's [`openraft::Raft`] through a [`GroupRegistry`].
//!
//! - [`pool`]: [`PeerPool`], the cached channel per peer.
//! - [`client`]: [`NetworkFactory`] (openraft's `RaftNetworkFactory`, one per group) and the
//!   per-target [`GroupNetwork`], with the mapping of transport failures to openraft's
//!   `RPCError` kinds.
//! - [`server`]: [`RaftTransportService`] and [`GroupRegistry`].
//! - [`stream`]: `AppendStream`, a leader's pipelined replication stream to one follower.
//! - [`snapshot`]: streamed snapshot transfer (client-streaming `InstallSnapshot`), and the
//!   traits the storage implements for it.
//! - [`fault`]: [`FaultInjector`], deterministic network faults for tests.
//! - [`codec`]: the body encoding (postcard of openraft's own types, `format = 1`).
//!
//! Why not `openraft-multi`: its `GroupNetworkAdapter` binds a (target, group) pair to a
//! shared router but drops the target's address that openraft hands to `new_client`, so
//! the router would need its own id → address table kept in sync with every group's
//! membership. Binding (pool, group, target, address) directly here is less code.
//!
//! Message size: a Raft batch or snapshot chunk is far larger than tonic's 4 MiB default
//! limit, so clients and the server raise their limits to [`MAX_MESSAGE_BYTES`], and the
//! client cuts an AppendEntries batch that would exceed it (see [`client`]).

pub mod client;
pub mod codec;
pub mod fault;
pub mod pool;
pub mod server;
pub mod snapshot;
pub mod stream;

pub use client::append_ttl;
pub use client::GroupNetwork;
pub use client::NetworkFactory;
pub use codec::CodecError;
pub use codec::FORMAT_POSTCARD;
pub use fault::FaultInjector;
pub use fault::FaultStats;
pub use fault::LinkFaults;
pub use fault::Verdict;
pub use pool::PeerError;
pub use pool::PeerPool;
pub use server::GroupRegistry;
pub use server::RaftTransportService;
pub use snapshot::SnapshotChunkWriter;
pub use snapshot::SnapshotFile;
pub use snapshot::SnapshotHeader;
pub use snapshot::SnapshotSink;

/// Largest gRPC message a node sends or accepts on its internal services (Raft transport,
/// forwarding). An AppendEntries batch is cut to fit (see [`client`]); a single log entry
/// larger than this cannot be replicated, so the broker must keep one request's payload
/// well below it.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Room left in a message for everything but the encoded entries (protobuf framing, group
/// id, vote, log ids).
pub const MESSAGE_OVERHEAD_BYTES: usize = 64 * 1024;

/// Data bytes per streamed snapshot chunk unless openraft's `snapshot_max_chunk_size` says
/// otherwise.
pub const SNAPSHOT_CHUNK_BYTES: usize = 1024 * 1024;

/// Largest snapshot chunk a node sends or accepts.
pub const MAX_SNAPSHOT_CHUNK_BYTES: usize = 8 * 1024 * 1024;

/// Largest snapshot a node accepts unless configured otherwise
/// ([`RaftTransportService::with_max_snapshot_bytes`]).
pub const DEFAULT_MAX_SNAPSHOT_BYTES: u64 = 64 * 1024 * 1024 * 1024;

/// How many snapshots a node receives at once (all groups together); more are refused
/// with `RESOURCE_EXHAUSTED`, which the sender treats as unreachable and retries later.
pub const MAX_CONCURRENT_SNAPSHOT_RECEIVES: usize = 4;

/// The kinds of RPC, as metric labels and in logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RpcKind {
    AppendEntries,
    Vote,
    PreVote,
    TransferLeader,
    InstallSnapshot,
}

impl RpcKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RpcKind::AppendEntries => "append_entries",
            RpcKind::Vote => "vote",
            RpcKind::PreVote => "pre_vote",
            RpcKind::TransferLeader => "transfer_leader",
            RpcKind::InstallSnapshot => "install_snapshot",
        }
    }

    /// openraft's name for the RPC, used in its `Timeout` error.
    pub(crate) fn openraft_type(self) -> openraft::network::RPCTypes {
        use openraft::network::RPCTypes;
        match self {
            RpcKind::AppendEntries => RPCTypes::AppendEntries,
            RpcKind::Vote | RpcKind::PreVote => RPCTypes::Vote,
            RpcKind::TransferLeader => RPCTypes::TransferLeader,
            RpcKind::InstallSnapshot => RPCTypes::InstallSnapshot,
        }
    }
}

impl std::fmt::Display for RpcKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Metric names (counters), labelled by `kind` (an [`RpcKind`]) and, for failures, by
/// `reason` (`unreachable`, `timeout`, `network`, `remote`, `local`).
pub mod metric {
    /// RPCs a node sent (attempted), per kind.
    pub const RPC_SENT: &str = "habar_raft_rpc_sent_total";
    /// RPCs that failed, per kind and reason.
    pub const RPC_FAILED: &str = "habar_raft_rpc_failed_total";
    /// RPCs a node received, per kind.
    pub const RPC_RECEIVED: &str = "habar_raft_rpc_received_total";
    /// Received RPCs refused before reaching Raft (bad body, unknown group, wrong node).
    pub const RPC_REJECTED: &str = "habar_raft_rpc_rejected_total";
    /// Snapshot data bytes streamed out and in.
    pub const SNAPSHOT_BYTES_SENT: &str = "habar_raft_snapshot_bytes_sent_total";
    pub const SNAPSHOT_BYTES_RECEIVED: &str = "habar_raft_snapshot_bytes_received_total";
    /// AppendEntries batches cut to fit the message size limit.
    pub const APPEND_BATCHES_CUT: &str = "habar_raft_append_batches_cut_total";
    /// RPCs a [`FaultInjector`](super::FaultInjector) cut, dropped or delayed.
    pub const FAULTS_INJECTED: &str = "habar_raft_faults_injected_total";
}
