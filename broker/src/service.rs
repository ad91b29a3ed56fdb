//! The public gRPC services: `habar.v1.Broker` and `habar.v1.Cluster`.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use futures::Stream;
use futures::StreamExt;
use habar_proto::v1 as pb;
use habar_proto::v1::admin_server::Admin;
use habar_proto::v1::broker_server::Broker;
use habar_proto::v1::cluster_server::Cluster;
use habar_raft_store::types::CommandResponse;
use habar_raft_store::types::GroupId;
use habar_raft_store::types::NewEnvelope;
use tonic::Request;
use tonic::Response;
use tonic::Status;

use crate::config::NodeConfig;
use crate::error::BrokerError;
use crate::node::Node;
use crate::node::ReadAnswer;
use crate::node::ReadOp;
use crate::node::WriteOp;
use crate::shard::shard_of;
use crate::subscribe;
use crate::validate;

/// The call's deadline: the client's `grpc-timeout` if it sent one, else the node's
/// default request timeout.
pub fn deadline_of<T>(req: &Request<T>, cfg: &NodeConfig) -> Instant {
    let default = Duration::from_millis(cfg.request_timeout_ms);
    let t = req
        .metadata()
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout)
        .unwrap_or(default);
    Instant::now() + t
}

/// Parses the `grpc-timeout` header: up to 8 digits and a unit (H, M, S, m, u, n).
pub fn parse_grpc_timeout(s: &str) -> Option<Duration> {
    if s.len() < 2 || s.len() > 9 {
        return None;
    }
    let (num, unit) = s.split_at(s.len() - 1);
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

pub struct BrokerService {
    node: Arc<Node>,
    limits: validate::Limits,
}

impl BrokerService {
    pub fn new(node: Arc<Node>) -> Self {
        let limits = validate::Limits::from_config(&node.cfg);
        Self { node, limits }
    }
}

type SubscribeStream = Pin<Box<dyn Stream<Item = Result<pb::StoredEnvelope, Status>> + Send>>;

impl BrokerService {
    /// Publishes validated envelopes: grouped by shard, one Raft entry per shard part, all
    /// shard parts in parallel; results in request order.
    async fn publish_stored(
        &self,
        envelopes: Vec<NewEnvelope>,
        deadline: Instant,
    ) -> Result<Vec<pb::Appended>, Status> {
        let n = envelopes.len();
        let shards = self.node.shards();
        let conversation_ids: Vec<String> = envelopes.iter().map(|e| e.conversation_id.clone()).collect();

        // Group by shard, keeping each envelope's position in the request.
        let mut by_shard: BTreeMap<GroupId, (Vec<usize>, Vec<NewEnvelope>)> = BTreeMap::new();
        for (i, e) in envelopes.into_iter().enumerate() {
            let s = by_shard.entry(shard_of(&e.conversation_id, shards)).or_default();
            s.0.push(i);
            s.1.push(e);
        }
        let node = &self.node;
        let results = futures::future::join_all(
            by_shard
                .into_iter()
                .map(|(g, (idx, envs))| async move { (g, idx, node.write(g, WriteOp::Append(envs), deadline).await) }),
        )
        .await;

        let mut appended: Vec<Option<pb::Appended>> = vec![None; n];
        for (g, idx, res) in results {
            let results = match res? {
                CommandResponse::Appended(a) if a.len() == idx.len() => a,
                other => {
                    return Err(BrokerError::Internal(format!(
                        "shard {g} answered {other:?} for {} envelopes",
                        idx.len()
                    ))
                    .into())
                }
            };
            for (i, a) in idx.into_iter().zip(results) {
                appended[i] = Some(pb::Appended {
                    conversation_id: conversation_ids[i].clone(),
                    seq: a.seq,
                    duplicate: a.duplicate,
                    committed_at_ms: a.committed_at_ms,
                });
            }
        }
        let appended = appended.into_iter().flatten().collect::<Vec<_>>();
        let dups = appended.iter().filter(|a| a.duplicate).count() as u64;
        metrics::counter!("habar_published_envelopes_total").increment(appended.len() as u64 - dups);
        metrics::counter!("habar_duplicate_envelopes_total").increment(dups);
        Ok(appended)
    }

    async fn write_one(
        &self,
        conversation_id: &str,
        op: WriteOp,
        deadline: Instant,
    ) -> Result<CommandResponse, Status> {
        let group = shard_of(conversation_id, self.node.shards());
        Ok(self.node.write(group, op, deadline).await?)
    }
}

/// The error of a write done in bounded steps (erasure, retention) that failed after some
/// of them applied: `st`'s code and metadata (a retry-after) with `done`, what the applied
/// steps already did, in front of its message.
fn stopped_after_steps(st: Status, done: String) -> Status {
    Status::with_metadata(st.code(), format!("{done}: {}", st.message()), st.metadata().clone())
}

fn unexpected(call: &str, r: CommandResponse) -> Status {
    BrokerError::Internal(format!("{call} answered {r:?}")).into()
}

#[tonic::async_trait]
impl Broker for BrokerService {
    async fn publish(&self, request: Request<pb::PublishRequest>) -> Result<Response<pb::PublishResponse>, Status> {
        let deadline = deadline_of(&request, &self.node.cfg);
        let req = request.into_inner();
        let ephemeral = req.ephemeral;
        let envelopes = validate::publish_request(req, &self.limits)?;
        // Ephemeral ones too: they are held while handed to the other nodes.
        let _admitted = self.node.admission.admit(crate::proposer::size(&envelopes))?;
        if ephemeral {
            let now = self.node.now_ms();
            let appended = envelopes
                .iter()
                .map(|e| pb::Appended {
                    conversation_id: e.conversation_id.clone(),
                    seq: 0,
                    duplicate: false,
                    committed_at_ms: now,
                })
                .collect();
            self.node.publish_ephemeral(envelopes, deadline).await;
            return Ok(Response::new(pb::PublishResponse { appended }));
        }
        let appended = self.publish_stored(envelopes, deadline).await?;
        Ok(Response::new(pb::PublishResponse { appended }))
    }

    async fn read(&self, request: Request<pb::ReadRequest>) -> Result<Response<pb::ReadResponse>, Status> {
        let deadline = deadline_of(&request, &self.node.cfg);
        let req = request.into_inner();
        let (backward, limit) = validate::read_request(&req, &self.limits)?;
        let group = shard_of(&req.conversation_id, self.node.shards());
        let start = if backward { req.before_seq } else { req.from_seq };
        let op = ReadOp::Page { conversation_id: req.conversation_id, backward, start, limit };
        match self.node.read(group, op, req.allow_stale, deadline).await? {
            ReadAnswer::Page(p) => Ok(Response::new(p)),
            other => Err(BrokerError::Internal(format!("read answered {other:?}")).into()),
        }
    }

    type SubscribeStream = SubscribeStream;

    /// Served by this node's replica as it applies: in order, without gaps or repeats,
    /// whatever happens to leadership. If this node stops, the stream ends with
    /// `UNAVAILABLE` and the client resumes from the seq after the last one it received.
    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let req = request.into_inner();
        validate::subscribe_request(&req, &self.limits)?;
        let initial = vec![pb::ConversationFrom { conversation_id: req.conversation_id, from_seq: req.from_seq }];
        let events = subscribe::start(self.node.clone(), self.limits.clone(), initial, None);
        // One conversation: only its envelopes (stored and ephemeral) go out.
        let stream = events.filter_map(|ev| async move {
            match ev {
                Ok(pb::SubscribeEvent { event: Some(pb::subscribe_event::Event::Envelope(e)) }) => Some(Ok(e)),
                Ok(_) => None,
                Err(s) => Some(Err(s)),
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    type SubscribeManyStream = subscribe::EventStream;

    async fn subscribe_many(
        &self,
        request: Request<tonic::Streaming<pb::SubscribeControl>>,
    ) -> Result<Response<Self::SubscribeManyStream>, Status> {
        let mut control = request.into_inner();
        let first = match control.next().await {
            Some(Ok(c)) => c,
            Some(Err(e)) => return Err(e),
            None => return Err(Status::invalid_argument("the stream closed before its first SubscribeControl")),
        };
        validate::subscribe_control(&first, 0, self.node.cfg.subscribe_max_conversations, &self.limits)?;
        let rest: subscribe::ControlStream = Box::pin(control);
        Ok(Response::new(subscribe::start(self.node.clone(), self.limits.clone(), first.add, Some(rest))))
    }

    async fn commit_cursor(
        &self,
        request: Request<pb::CommitCursorRequest>,
    ) -> Result<Response<pb::CommitCursorResponse>, Status> {
        let deadline = deadline_of(&request, &self.node.cfg);
        let req = request.into_inner();
        validate::commit_cursor_request(&req, &self.limits)?;
        let conv = req.conversation_id.clone();
        let op = WriteOp::CommitCursor {
            conversation_id: req.conversation_id,
            reader_id: req.reader_id.clone(),
            seq: req.seq,
        };
        match self.write_one(&conv, op, deadline).await? {
            CommandResponse::Cursor { seq, updated_at_ms, last_seq } => Ok(Response::new(pb::CommitCursorResponse {
                cursor: Some(pb::Cursor {
                    reader_id: req.reader_id,
                    seq,
                    unread: last_seq.saturating_sub(seq),
                    updated_at_ms,
                }),
                last_seq,
            })),
            other => Err(unexpected("CommitCursor", other)),
        }
    }

    async fn get_cursors(
        &self,
        request: Request<pb::GetCursorsRequest>,
    ) -> Result<Response<pb::GetCursorsResponse>, Status> {
        let deadline = deadline_of(&request, &self.node.cfg);
        let req = request.into_inner();
        let limit = validate::get_cursors_request(&req, &self.limits)?;
        let group = shard_of(&req.conversation_id, self.node.shards());
        let reader_id = (!req.reader_id.is_empty()).then_some(req.reader_id);
        let op = ReadOp::Cursors { conversation_id: req.conversation_id, reader_id, after: req.after_reader_id, limit };
        match self.node.read(group, op, req.allow_stale, deadline).await? {
            ReadAnswer::Cursors(c) => Ok(Response::new(c)),
            other => Err(BrokerError::Internal(format!("GetCursors answered {other:?}")).into()),
        }
    }

    async fn delete_conversation(
        &self,
        request: Request<pb::DeleteConversationRequest>,
    ) -> Result<Response<pb::DeleteConversationResponse>, Status> {
        let deadline = deadline_of(&request, &self.node.cfg);
        let req = request.into_inner();
        validate::delete_conversation_request(&req, &self.limits)?;
        let conv = req.conversation_id;
        // Bounded steps, each one Raft entry of at most `maintenance_max_removals` keys: one
        // step for a big conversation was one sled batch of millions of keys (node-wide
        // stalls of seconds and GiBs of memory). The last step answers `more: false`.
        let op = WriteOp::EraseConversation {
            conversation_id: conv.clone(),
            reset_seq: req.reset_seq,
            max_removals: self.node.cfg.maintenance_max_removals,
        };
        let (mut existed, mut envelopes, mut cursors, mut steps) = (false, 0u64, 0u64, 0u64);
        loop {
            let step = match self.write_one(&conv, op.clone(), deadline).await {
                Ok(r) => r,
                Err(st) if steps > 0 => {
                    // The envelopes removed so far are gone for good.
                    return Err(stopped_after_steps(
                        st,
                        format!(
                            "erasure of conversation_id `{conv}` stopped after {steps} steps ({envelopes} envelopes \
                             and {cursors} cursors removed so far; DeleteConversation again finishes it)"
                        ),
                    ));
                }
                Err(st) => return Err(st),
            };
            let CommandResponse::Erased { existed: e, envelopes: n, cursors: c, next_seq, more } = step else {
                return Err(unexpected("DeleteConversation", step));
            };
            steps += 1;
            existed |= e;
            envelopes += n;
            cursors += c;
            if more {
                continue;
            }
            if !existed {
                return Err(Status::not_found(format!("conversation_id `{conv}` has no envelopes, cursors or state")));
            }
            metrics::counter!("habar_erasures_total").increment(1);
            return Ok(Response::new(pb::DeleteConversationResponse {
                removed_envelopes: envelopes,
                removed_cursors: cursors,
                next_seq,
            }));
        }
    }
}

/// `habar.v1.Admin`: operators' calls.
pub struct AdminService {
    node: Arc<Node>,
    limits: validate::Limits,
}

impl AdminService {
    pub fn new(node: Arc<Node>) -> Self {
        let limits = validate::Limits::from_config(&node.cfg);
        Self { node, limits }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn set_retention(
        &self,
        request: Request<pb::SetRetentionRequest>,
    ) -> Result<Response<pb::SetRetentionResponse>, Status> {
        let deadline = deadline_of(&request, &self.node.cfg);
        let req = request.into_inner();
        validate::set_retention_request(&req, &self.limits)?;
        let group = shard_of(&req.conversation_id, self.node.shards());
        let conv = req.conversation_id;
        // Bounded steps like an erasure's (`delete_conversation`): the limits are set by the
        // first step, and each step removes at most `maintenance_max_removals` envelopes.
        let op = WriteOp::SetRetentionStep {
            conversation_id: conv.clone(),
            max_age_ms: req.max_age_ms,
            max_count: req.max_count,
            max_removals: self.node.cfg.maintenance_max_removals,
        };
        let (mut removed, mut steps) = (0u64, 0u64);
        loop {
            let step = match self.node.write(group, op.clone(), deadline).await {
                Ok(r) => r,
                Err(e) if steps > 0 => {
                    return Err(stopped_after_steps(
                        e.into(),
                        format!(
                            "the retention of conversation_id `{conv}` is set; removing what it no longer allows \
                             stopped after {steps} steps ({removed} envelopes removed so far; housekeeping removes \
                             the rest)"
                        ),
                    ));
                }
                Err(e) => return Err(e.into()),
            };
            let CommandResponse::RetentionStep { removed: n, more } = step else {
                return Err(unexpected("SetRetention", step));
            };
            steps += 1;
            removed += n;
            if !more {
                return Ok(Response::new(pb::SetRetentionResponse { removed_envelopes: removed }));
            }
        }
    }
}

pub struct ClusterService {
    node: Arc<Node>,
}

impl ClusterService {
    pub fn new(node: Arc<Node>) -> Self {
        Self { node }
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn status(&self, _request: Request<pb::StatusRequest>) -> Result<Response<pb::StatusResponse>, Status> {
        Ok(Response::new(self.node.status()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_header_parses() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("5x"), None);
        assert_eq!(parse_grpc_timeout("m"), None);
        assert_eq!(parse_grpc_timeout("123456789m"), None);
    }
}
