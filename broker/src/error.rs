//! The node's errors, and the one place they become gRPC statuses.

use std::time::Duration;

use habar_raft_store::types::NodeId;

/// Errors of broker operations. `Unavailable`, `Overloaded` and `DeadlineExceeded` are
/// retryable by the caller; the rest are not.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("shard {shard} has no reachable leader: {reason}")]
    Unavailable { shard: u32, reason: String },
    #[error("deadline of {0:?} exceeded before the shard answered")]
    DeadlineExceeded(Duration),
    #[error("not the leader of shard {shard} (leader: {leader:?})")]
    NotLeader { shard: u32, leader: Option<NodeId> },
    /// This node's disk is (almost) full: it takes no writes (`disk.rs`). Retryable on
    /// another node.
    #[error("{0}")]
    DiskFull(String),
    /// The node has too many publish bytes in progress (`admission.rs`): retry later or
    /// on another node.
    #[error("{0}")]
    Overloaded(String),
    #[error("storage error: {0}")]
    Storage(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl BrokerError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Unavailable { .. } | Self::NotLeader { .. } | Self::DiskFull(_) | Self::Overloaded(_))
    }
}

/// The wait a refused call (an overloaded publish, a cut-off subscriber) is told to leave
/// before retrying.
pub const RETRY_AFTER_MS: u64 = 100;

/// Adds the `retry-after-ms` hint (`RETRY_AFTER_MS`) that the client reads from a refusal.
pub fn with_retry_after(mut status: tonic::Status) -> tonic::Status {
    status.metadata_mut().insert("retry-after-ms", tonic::metadata::MetadataValue::from(RETRY_AFTER_MS));
    status
}

impl From<BrokerError> for tonic::Status {
    fn from(e: BrokerError) -> Self {
        let msg = e.to_string();
        match e {
            BrokerError::InvalidArgument(_) => tonic::Status::invalid_argument(msg),
            BrokerError::Unavailable { .. } | BrokerError::NotLeader { .. } | BrokerError::DiskFull(_) => {
                tonic::Status::unavailable(msg)
            }
            BrokerError::DeadlineExceeded(_) => tonic::Status::deadline_exceeded(msg),
            BrokerError::Overloaded(_) => with_retry_after(tonic::Status::resource_exhausted(msg)),
            BrokerError::Storage(_) | BrokerError::Internal(_) => tonic::Status::internal(msg),
        }
    }
}

impl From<habar_raft_store::StoreError> for BrokerError {
    fn from(e: habar_raft_store::StoreError) -> Self {
        BrokerError::Storage(e.to_string())
    }
}
