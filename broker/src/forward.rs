//! Forwarding of client calls from any node to the shard's leader, over the internal
//! `habar.forward.v1.Forwarder` service and the node's pooled peer channels.
//!
//! The leader executes a forwarded call only locally (it never forwards again), so a call
//! crosses at most one hop per attempt; the forwarding node retries through elections.

use std::sync::Arc;
use std::time::Instant;

use habar_proto::forward::forwarder_client::ForwarderClient;
use habar_proto::forward::forwarder_server::Forwarder;
use habar_proto::forward::forwarder_server::ForwarderServer;
use habar_proto::forward::ForwardMessage;
use habar_raft_store::types::CommandResponse;
use habar_raft_store::types::GroupId;
use habar_raft_store::types::NewEnvelope;
use habar_raft_store::types::NodeId;
use prost::Message;
use serde::Deserialize;
use serde::Serialize;
use tonic::transport::Channel;

use crate::error::BrokerError;
use crate::node::Node;
use crate::node::ReadAnswer;
use crate::node::ReadOp;
use crate::node::WriteOp;

const FORMAT_POSTCARD: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
pub enum ForwardRequest {
    Write(WriteOp),
    Read(ReadOp),
    /// Ephemeral envelopes for this node's live subscribers (best effort, never stored).
    Signal {
        now_ms: u64,
        envelopes: Vec<NewEnvelope>,
    },
    /// The node's raw clock (liveness probe and clock calibration, `clock.rs`).
    Clock,
    /// The node's term, leader and last log index of the shard (a repairing peer asks,
    /// `repair.rs`).
    RaftPosition,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum ForwardResponse {
    Written(CommandResponse),
    /// The prost encoding of the public response (`ReadResponse` or `GetCursorsResponse`,
    /// as the `ReadOp` asked): no second wire format.
    Read(Vec<u8>),
    Delivered,
    Clock {
        local_ms: u64,
    },
    NotLeader {
        leader: Option<NodeId>,
    },
    Unavailable(String),
    Error(String),
    RaftPosition(crate::repair::RaftPosition),
    /// The leader refused the write for its publish budget (`admission.rs`): the caller
    /// gets RESOURCE_EXHAUSTED at once rather than retrying until its deadline. Last, so
    /// the earlier variants keep their postcard tags.
    Overloaded(String),
}

fn encode<T: Serialize>(group: GroupId, v: &T) -> Result<ForwardMessage, BrokerError> {
    let body = postcard::to_allocvec(v).map_err(|e| BrokerError::Internal(format!("encode forward: {e}")))?;
    Ok(ForwardMessage { group_id: group, format: FORMAT_POSTCARD, body: body.into() })
}

fn decode<T: for<'de> Deserialize<'de>>(m: &ForwardMessage) -> Result<T, String> {
    if m.format != FORMAT_POSTCARD {
        return Err(format!("forward message format {} is not supported (expected {FORMAT_POSTCARD})", m.format));
    }
    postcard::from_bytes(&m.body).map_err(|e| format!("forward message body does not decode: {e}"))
}

pub fn decode_read(op: &ReadOp, bytes: &[u8]) -> Result<ReadAnswer, BrokerError> {
    let bad = |e: prost::DecodeError| BrokerError::Internal(format!("forwarded read does not decode: {e}"));
    Ok(match op {
        ReadOp::Page { .. } => ReadAnswer::Page(habar_proto::v1::ReadResponse::decode(bytes).map_err(bad)?),
        ReadOp::Cursors { .. } => ReadAnswer::Cursors(habar_proto::v1::GetCursorsResponse::decode(bytes).map_err(bad)?),
    })
}

/// Sends `req` for `group` to the node behind `channel`.
pub async fn call(
    channel: Channel,
    group: GroupId,
    req: &ForwardRequest,
    deadline: Instant,
) -> Result<ForwardResponse, BrokerError> {
    let remaining = deadline.saturating_duration_since(Instant::now());
    let mut request = tonic::Request::new(encode(group, req)?);
    request.set_timeout(remaining);
    let mut client = ForwarderClient::new(channel)
        .max_decoding_message_size(crate::raft_net::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(crate::raft_net::MAX_MESSAGE_BYTES);
    match client.forward(request).await {
        Ok(resp) => decode(resp.get_ref()).map_err(BrokerError::Internal),
        Err(s) if s.code() == tonic::Code::DeadlineExceeded => Err(BrokerError::DeadlineExceeded(remaining)),
        Err(s) => Err(BrokerError::Unavailable { shard: group, reason: format!("forward: {}", s.message()) }),
    }
}

/// Server side: runs a forwarded call on this node, locally only.
pub struct ForwarderService {
    node: Arc<Node>,
}

impl ForwarderService {
    pub fn new(node: Arc<Node>) -> Self {
        Self { node }
    }

    pub fn into_server(self) -> ForwarderServer<Self> {
        ForwarderServer::new(self)
            .max_decoding_message_size(crate::raft_net::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(crate::raft_net::MAX_MESSAGE_BYTES)
    }

    async fn handle(&self, group: GroupId, req: ForwardRequest, deadline: Instant) -> ForwardResponse {
        let res = match req {
            ForwardRequest::Write(op) => self.node.local_write(group, op, deadline).await.map(ForwardResponse::Written),
            ForwardRequest::Read(op) => self.node.linearizable_local_read(group, op, deadline).await.map(|r| {
                ForwardResponse::Read(match r {
                    ReadAnswer::Page(p) => p.encode_to_vec(),
                    ReadAnswer::Cursors(c) => c.encode_to_vec(),
                })
            }),
            ForwardRequest::Signal { now_ms, envelopes } => {
                self.node.deliver_signals(now_ms, envelopes);
                Ok(ForwardResponse::Delivered)
            }
            ForwardRequest::Clock => Ok(ForwardResponse::Clock { local_ms: self.node.clock.local_ms() }),
            ForwardRequest::RaftPosition => match crate::repair::position(&self.node, group) {
                Some(p) => Ok(ForwardResponse::RaftPosition(p)),
                None => Err(BrokerError::InvalidArgument(format!("shard {group} does not exist on this node"))),
            },
        };
        match res {
            Ok(r) => r,
            Err(BrokerError::NotLeader { leader, .. }) => ForwardResponse::NotLeader { leader },
            Err(BrokerError::Overloaded(m)) => ForwardResponse::Overloaded(m),
            Err(e) if e.is_retryable() => ForwardResponse::Unavailable(e.to_string()),
            Err(e) => ForwardResponse::Error(e.to_string()),
        }
    }
}

#[tonic::async_trait]
impl Forwarder for ForwarderService {
    async fn forward(
        &self,
        request: tonic::Request<ForwardMessage>,
    ) -> Result<tonic::Response<ForwardMessage>, tonic::Status> {
        let deadline = crate::service::deadline_of(&request, &self.node.cfg);
        let msg = request.into_inner();
        let group = msg.group_id;
        let req: ForwardRequest = decode(&msg).map_err(tonic::Status::invalid_argument)?;
        let resp = self.handle(group, req, deadline).await;
        Ok(tonic::Response::new(encode(group, &resp)?))
    }
}
