//! The public gRPC services: `habar.v1.Broker` and `habar.v1.Cluster`.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use futures::Stream;
use habar_proto::v1 as pb;
use habar_proto::v1::broker_server::Broker;
use habar_proto::v1::cluster_server::Cluster;
use habar_raft_store::types::GroupId;
use habar_raft_store::types::NewEnvelope;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Request;
use tonic::Response;
use tonic::Status;

use crate::config::NodeConfig;
use crate::convert;
use crate::error::BrokerError;
use crate::node::Node;
use crate::shard::shard_of;
use crate::validate;

/// Envelopes a subscription stream buffers before it waits for the client.
const SUBSCRIBE_BUFFER: usize = 256;
/// Envelopes read from the store per page while a subscription catches up.
const SUBSCRIBE_PAGE: u32 = 256;

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

#[tonic::async_trait]
impl Broker for BrokerService {
    async fn publish(&self, request: Request<pb::PublishRequest>) -> Result<Response<pb::PublishResponse>, Status> {
        let deadline = deadline_of(&request, &self.node.cfg);
        let envelopes = validate::publish_request(request.into_inner(), &self.limits)?;
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
            by_shard.into_iter().map(|(g, (idx, envs))| async move { (g, idx, node.append(g, envs, deadline).await) }),
        )
        .await;

        let mut appended: Vec<Option<pb::Appended>> = vec![None; n];
        for (g, idx, res) in results {
            let resp = res?;
            if resp.appended.len() != idx.len() {
                return Err(BrokerError::Internal(format!(
                    "shard {g} answered {} results for {} envelopes",
                    resp.appended.len(),
                    idx.len()
                ))
                .into());
            }
            for (i, a) in idx.into_iter().zip(resp.appended) {
                appended[i] = Some(pb::Appended {
                    conversation_id: conversation_ids[i].clone(),
                    seq: a.seq,
                    duplicate: a.duplicate,
                    committed_at_ms: a.committed_at_ms,
                });
            }
        }
        let appended = appended.into_iter().flatten().collect::<Vec<_>>();
        metrics::counter!("habar_published_envelopes_total").increment(appended.len() as u64);
        Ok(Response::new(pb::PublishResponse { appended }))
    }

    async fn read(&self, request: Request<pb::ReadRequest>) -> Result<Response<pb::ReadResponse>, Status> {
        let deadline = deadline_of(&request, &self.node.cfg);
        let req = request.into_inner();
        let limit = validate::read_request(&req, &self.limits)?;
        let group = shard_of(&req.conversation_id, self.node.shards());
        let r = self.node.read(group, req.conversation_id, req.from_seq, limit, req.allow_stale, deadline).await?;
        Ok(Response::new(pb::ReadResponse {
            envelopes: r.envelopes.into_iter().map(convert::stored_to_pb).collect(),
            last_seq: r.last_seq,
            ..Default::default()
        }))
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
        let group = shard_of(&req.conversation_id, self.node.shards());
        let node = self.node.clone();
        let (tx, rx) = mpsc::channel(SUBSCRIBE_BUFFER);
        tokio::spawn(async move {
            let mut next = req.from_seq.max(1);
            let mut applied = match node.store.watch_applied(group) {
                Ok(w) => w,
                Err(e) => {
                    let _ = tx.send(Err(Status::from(BrokerError::from(e)))).await;
                    return;
                }
            };
            loop {
                // Mark the current applied index seen *before* reading, so an apply that
                // lands after the read wakes the wait below.
                applied.borrow_and_update();
                let page = match node.read_local(group, req.conversation_id.clone(), next, SUBSCRIBE_PAGE).await {
                    Ok(p) => p.envelopes,
                    Err(e) => {
                        let _ = tx.send(Err(Status::from(e))).await;
                        return;
                    }
                };
                let caught_up = page.len() < SUBSCRIBE_PAGE as usize;
                for e in page {
                    if e.seq != next {
                        let _ = tx
                            .send(Err(Status::internal(format!(
                                "subscription expected seq {next}, the store returned {}",
                                e.seq
                            ))))
                            .await;
                        return;
                    }
                    next = e.seq + 1;
                    if tx.send(Ok(convert::stored_to_pb(e))).await.is_err() {
                        return; // the client went away
                    }
                }
                if caught_up {
                    tokio::select! {
                        changed = applied.changed() => {
                            if changed.is_err() {
                                let _ = tx.send(Err(Status::unavailable("node is shutting down; resume from the next seq"))).await;
                                return;
                            }
                        }
                        _ = tx.closed() => return,
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type SubscribeManyStream = Pin<Box<dyn Stream<Item = Result<pb::SubscribeEvent, Status>> + Send>>;

    async fn subscribe_many(
        &self,
        _request: Request<tonic::Streaming<pb::SubscribeControl>>,
    ) -> Result<Response<Self::SubscribeManyStream>, Status> {
        Err(Status::unimplemented("work in progress"))
    }

    async fn commit_cursor(
        &self,
        _request: Request<pb::CommitCursorRequest>,
    ) -> Result<Response<pb::CommitCursorResponse>, Status> {
        Err(Status::unimplemented("work in progress"))
    }

    async fn get_cursors(
        &self,
        _request: Request<pb::GetCursorsRequest>,
    ) -> Result<Response<pb::GetCursorsResponse>, Status> {
        Err(Status::unimplemented("work in progress"))
    }

    async fn delete_conversation(
        &self,
        _request: Request<pb::DeleteConversationRequest>,
    ) -> Result<Response<pb::DeleteConversationResponse>, Status> {
        Err(Status::unimplemented("work in progress"))
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
