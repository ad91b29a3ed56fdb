//! The one error type of the client.

use std::time::Duration;

use habar_proto::v1 as pb;
use prost::Message;
use tonic::Code;
use tonic::Status;

/// What went wrong, by what the caller can do about it.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ClientError {
    /// A field breaks a limit (the message names the field and the limit). Nothing of the
    /// request was applied. Do not retry unchanged. For a batched
    /// [`Client::publish`](crate::Client::publish) this fails every envelope of the batch.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The conversation has no state at all (`DeleteConversation`).
    #[error("not found: {0}")]
    NotFound(String),
    /// A bound was hit (a subscriber did not keep up). Retry after `retry_after` if set.
    #[error("resource exhausted: {msg}")]
    ResourceExhausted {
        /// The server's message.
        msg: String,
        /// How long the server asks to wait before retrying.
        retry_after: Option<Duration>,
    },
    /// No leader could be reached before the call's deadline (election, node loss, nodes
    /// stopping). The client already retried until its deadline; retrying later is safe
    /// (a publish keeps its message ids).
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The call's deadline passed. A write may or may not have been applied: retry it
    /// with the same ids.
    #[error("deadline exceeded")]
    DeadlineExceeded,
    /// No node could be connected to (bad address, nothing listening, timeouts).
    #[error("cannot connect: {0}")]
    Connect(String),
    /// A bug or damaged storage on the answering node.
    #[error("internal error: {0}")]
    Internal(String),
    /// The subscription has ended (its last event said why).
    #[error("the subscription has ended")]
    Closed,
    /// Any other gRPC status.
    #[error("{}: {}", .0.code(), .0.message())]
    Other(tonic::Status),
}

impl ClientError {
    /// True for errors that may go away by themselves: retrying the same call later (with
    /// the same message ids) is safe and may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ClientError::Unavailable(_)
                | ClientError::DeadlineExceeded
                | ClientError::Connect(_)
                | ClientError::ResourceExhausted { .. }
        )
    }

    /// The status a call failed with after its retries: a transport failure says
    /// [`ClientError::Connect`], anything else maps by code.
    pub(crate) fn final_from(status: &Status) -> ClientError {
        if is_transport_failure(status) {
            ClientError::Connect(status.message().to_string())
        } else {
            ClientError::from(status.clone())
        }
    }
}

impl From<Status> for ClientError {
    fn from(s: Status) -> Self {
        match s.code() {
            Code::InvalidArgument => ClientError::InvalidArgument(s.message().to_string()),
            Code::NotFound => ClientError::NotFound(s.message().to_string()),
            Code::ResourceExhausted => {
                ClientError::ResourceExhausted { msg: s.message().to_string(), retry_after: retry_after(&s) }
            }
            Code::Unavailable => ClientError::Unavailable(s.message().to_string()),
            Code::DeadlineExceeded => ClientError::DeadlineExceeded,
            Code::Internal => ClientError::Internal(s.message().to_string()),
            _ => ClientError::Other(s),
        }
    }
}

/// The wait a `RESOURCE_EXHAUSTED` asks for: the `retry-after-ms` metadata, else the
/// `ResumePositions` in the details.
pub(crate) fn retry_after(s: &Status) -> Option<Duration> {
    let from_metadata =
        s.metadata().get("retry-after-ms").and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok());
    let ms = from_metadata.or_else(|| {
        if s.details().is_empty() {
            return None;
        }
        pb::ResumePositions::decode(s.details()).ok().map(|p| p.retry_after_ms)
    })?;
    Some(Duration::from_millis(ms))
}

/// A failure of the connection rather than an answer of a server: connection refused or
/// reset, HTTP/2 errors, a stream cut by a node going away.
pub(crate) fn is_transport_failure(s: &Status) -> bool {
    if !matches!(s.code(), Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Internal) {
        return false;
    }
    let m = s.message().to_ascii_lowercase();
    [
        "transport error",
        "tcp connect",
        "error trying to connect",
        "connection refused",
        "connection reset",
        "connection closed",
        "broken pipe",
        "h2 protocol error",
        "operation was canceled",
        "dns error",
    ]
    .iter()
    .any(|p| m.contains(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_map_to_variants() {
        assert!(
            matches!(ClientError::from(Status::invalid_argument("x")), ClientError::InvalidArgument(m) if m == "x")
        );
        assert!(matches!(ClientError::from(Status::not_found("x")), ClientError::NotFound(_)));
        assert!(matches!(ClientError::from(Status::unavailable("x")), ClientError::Unavailable(_)));
        assert!(matches!(ClientError::from(Status::deadline_exceeded("x")), ClientError::DeadlineExceeded));
        assert!(matches!(ClientError::from(Status::internal("x")), ClientError::Internal(_)));
        assert!(matches!(ClientError::from(Status::aborted("x")), ClientError::Other(_)));
        assert!(ClientError::Unavailable(String::new()).is_retryable());
        assert!(!ClientError::InvalidArgument(String::new()).is_retryable());
    }

    #[test]
    fn resource_exhausted_carries_retry_after_from_details() {
        let details = pb::ResumePositions { positions: vec![], retry_after_ms: 250 }.encode_to_vec();
        let s = Status::with_details(Code::ResourceExhausted, "slow", details.into());
        match ClientError::from(s) {
            ClientError::ResourceExhausted { retry_after, .. } => {
                assert_eq!(retry_after, Some(Duration::from_millis(250)))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn transport_failures_are_recognised() {
        assert!(is_transport_failure(&Status::unavailable("tcp connect error: Connection refused (os error 111)")));
        assert!(is_transport_failure(&Status::unknown("transport error")));
        assert!(!is_transport_failure(&Status::unavailable("no leader for shard 3")));
        assert!(!is_transport_failure(&Status::invalid_argument("transport error")));
    }
}
