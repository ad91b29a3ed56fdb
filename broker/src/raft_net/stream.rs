//! The sending side of `AppendStream`: a leader's replication to one follower for one group
//! as one pipelined gRPC stream, instead of one unary `AppendEntries` call per batch.
//!
//! openraft 0.10 drives replication through `stream_append`: a stream of requests in, a
//! stream of answers out. Its default sends a request and waits for the answer before the
//! next, so a batch that became ready meanwhile waited a whole round trip and the
//! follower's fsync, and every batch paid for a new HTTP/2 stream (headers both ways and
//! trailers). Here requests go out as openraft produces them, at most
//! [`STREAM_MAX_IN_FLIGHT`] unanswered, on one stream that lives as long as openraft's
//! replication session; the follower answers each once it is on its disk
//! (`Raft::stream_append`), in order.
//!
//! Failure mapping is the unary call's ([`super::client`]): the stream's status maps to
//! openraft's error kinds the same way, and each message keeps the deadline a unary call
//! would have had ([`append_ttl`]): a message unanswered past it ends the stream as a
//! `Timeout` (a follower that stopped, a link that went silent), and openraft starts a new
//! session. A node that does not know `AppendStream` (an older version) answers
//! UNIMPLEMENTED; this connection then uses unary calls from the next session on.
//!
//! Group and target travel as request metadata, so the follower answers the call at once
//! (openraft may not produce a first request until there is something to send).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::Mutex;

use futures::Stream;
use futures::StreamExt;
use habar_proto::raft::raft_transport_client::RaftTransportClient;
use habar_proto::raft::RaftMessage;
use habar_raft_store::types::GroupId;
use habar_raft_store::types::NodeId;
use habar_raft_store::types::TypeConfig;
use openraft::error::Fatal;
use openraft::error::NetworkError;
use openraft::error::RPCError;
use openraft::error::RemoteError;
use openraft::error::Unreachable;
use openraft::raft::AppendEntriesRequest;
use openraft::raft::StreamAppendResult;
use tokio::sync::Notify;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::client::append_ttl;
use super::client::split_to_fit;
use super::client::status_to_rpc_error;
use super::codec;
use super::metric;
use super::RpcKind;
use super::FORMAT_POSTCARD;
use super::MAX_MESSAGE_BYTES;

type RpcErr = RPCError<TypeConfig>;

/// Messages of one stream that may await their answers at once.
pub const STREAM_MAX_IN_FLIGHT: usize = 64;

/// Request metadata naming the group of an `AppendStream`.
pub const GROUP_HEADER: &str = "habar-group";
/// Request metadata naming the node the sender believes it is talking to.
pub const TARGET_HEADER: &str = "habar-target-node";

/// What the two halves of one stream share.
struct Shared {
    /// Deadline of every message sent and not yet answered, oldest first.
    deadlines: Mutex<VecDeque<Instant>>,
    /// Woken when a message is sent (so a reader waiting with no deadline takes one).
    sent: Notify,
    /// Bounds the unanswered messages.
    in_flight: Semaphore,
    /// Why the sending half stopped early (a request that cannot be sent).
    failed: Mutex<Option<RpcErr>>,
}

impl Shared {
    fn lock_deadlines(&self) -> std::sync::MutexGuard<'_, VecDeque<Instant>> {
        self.deadlines.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The answers of one stream, as openraft wants them.
pub type Answers = futures::stream::BoxStream<'static, Result<StreamAppendResult<TypeConfig>, RpcErr>>;

/// Where a stream goes.
pub struct Peer {
    pub channel: tonic::transport::Channel,
    pub group: GroupId,
    pub local: NodeId,
    pub target: NodeId,
}

/// Why [`open`] did not start a stream.
pub enum OpenError {
    /// The target does not know `AppendStream`.
    Unimplemented,
    Rpc(RpcErr),
}

/// Opens the stream and starts sending `input` on it.
pub async fn open<S>(peer: Peer, input: S, soft_ttl: std::time::Duration) -> Result<Answers, OpenError>
where
    S: Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + Unpin + 'static,
{
    let kind = RpcKind::AppendEntries;
    let Peer { channel, group, local, target } = peer;
    let shared = Arc::new(Shared {
        deadlines: Mutex::new(VecDeque::new()),
        sent: Notify::new(),
        in_flight: Semaphore::new(STREAM_MAX_IN_FLIGHT),
        failed: Mutex::new(None),
    });
    // Dropping the answers (openraft ended the session) ends the sending half too, so a
    // finished session never takes requests from openraft's shared replication state.
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel::<()>();
    let tx = shared.clone();
    let outbound = input
        .then(move |rpc| {
            let tx = tx.clone();
            async move {
                let parts = match split_to_fit(rpc) {
                    Ok(parts) => parts,
                    Err(e) => {
                        *tx.failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                        return None;
                    }
                };
                let mut msgs = Vec::with_capacity(parts.len());
                for (part, bytes) in parts {
                    let permit = tx.in_flight.acquire().await.ok()?;
                    permit.forget();
                    let body = match codec::encode(kind.as_str(), &part) {
                        Ok(b) => b,
                        Err(e) => {
                            *tx.failed.lock().unwrap_or_else(|p| p.into_inner()) =
                                Some(RPCError::Unreachable(Unreachable::new(&e)));
                            return None;
                        }
                    };
                    let ttl = append_ttl(soft_ttl, !part.entries.is_empty(), bytes);
                    tx.lock_deadlines().push_back(Instant::now() + ttl);
                    tx.sent.notify_one();
                    metrics::counter!(metric::RPC_SENT, "kind" => kind.as_str()).increment(1);
                    msgs.push(RaftMessage {
                        group_id: group,
                        format: FORMAT_POSTCARD,
                        body,
                        target_node: Some(target),
                    });
                }
                Some(msgs)
            }
        })
        .take_while(|m| std::future::ready(m.is_some()))
        .flat_map(|m| futures::stream::iter(m.unwrap_or_default()))
        .take_until(closed_rx);

    let mut request = tonic::Request::new(outbound);
    let meta = request.metadata_mut();
    meta.insert(GROUP_HEADER, group.into());
    meta.insert(TARGET_HEADER, target.into());
    let mut client = RaftTransportClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let opened = tokio::time::timeout(soft_ttl.max(super::client::APPEND_MIN_TIMEOUT), client.append_stream(request));
    let inbound = match opened.await {
        Err(_) => return Err(OpenError::Rpc(super::client::timeout(kind, local, target, soft_ttl))),
        Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => return Err(OpenError::Unimplemented),
        Ok(Err(status)) => return Err(OpenError::Rpc(status_to_rpc_error(kind, local, target, soft_ttl, status))),
        Ok(Ok(resp)) => resp.into_inner(),
    };

    let answers = futures::stream::unfold(Some((inbound, shared, closed_tx)), move |state| async move {
        let (mut inbound, shared, closed_tx) = state?;
        let fail = |e: RpcErr| {
            metrics::counter!(metric::RPC_FAILED, "kind" => kind.as_str(), "reason" => super::client::failure_reason(&e))
                .increment(1);
            tracing::debug!(group, target, error = %e, "append stream ended");
            Some((Err(e), None))
        };
        let next = loop {
            let due = shared.lock_deadlines().front().copied();
            match due {
                Some(due) => match tokio::time::timeout_at(due, inbound.message()).await {
                    Ok(r) => break r,
                    Err(_) => return fail(super::client::timeout(kind, local, target, soft_ttl)),
                },
                None => {
                    tokio::select! {
                        r = inbound.message() => break r,
                        _ = shared.sent.notified() => continue,
                    }
                }
            }
        };
        match next {
            Ok(Some(msg)) => {
                if shared.lock_deadlines().pop_front().is_none() {
                    let e = NetworkError::from_string("append stream: an answer to nothing sent");
                    return fail(RPCError::Network(e));
                }
                shared.in_flight.add_permits(1);
                let res: Result<StreamAppendResult<TypeConfig>, Fatal<TypeConfig>> =
                    match codec::decode(kind.as_str(), msg.format, &msg.body) {
                        Ok(r) => r,
                        Err(e) => return fail(RPCError::Unreachable(Unreachable::new(&e))),
                    };
                match res {
                    Ok(answer) => Some((Ok(answer), Some((inbound, shared, closed_tx)))),
                    Err(fatal) => {
                        let remote = RemoteError::<TypeConfig, _>::new(target, fatal);
                        fail(RPCError::Unreachable(Unreachable::new(&remote)))
                    }
                }
            }
            Ok(None) => {
                if let Some(e) = shared.failed.lock().unwrap_or_else(|p| p.into_inner()).take() {
                    return fail(e);
                }
                let unanswered = shared.lock_deadlines().len();
                if unanswered > 0 {
                    let e = NetworkError::from_string(format!("append stream closed with {unanswered} unanswered"));
                    return fail(RPCError::Network(e));
                }
                None
            }
            Err(status) => fail(status_to_rpc_error(kind, local, target, soft_ttl, status)),
        }
    });
    Ok(Box::pin(answers))
}
