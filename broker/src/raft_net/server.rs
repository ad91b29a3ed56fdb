//! The receiving side: the `habar.raft.v1.RaftTransport` service, dispatching each message
//! to its group's `Raft` through a [`GroupRegistry`].
//!
//! Refusals (never a panic on network input): unknown group → `NOT_FOUND`; a message meant
//! for another node id → `FAILED_PRECONDITION`; a body that does not decode, or a
//! malformed snapshot stream → `INVALID_ARGUMENT` naming what failed; too many snapshot
//! streams at once or a snapshot over the size limit → `RESOURCE_EXHAUSTED`.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::RwLock;

use habar_proto::raft::raft_transport_server::RaftTransport;
use habar_proto::raft::raft_transport_server::RaftTransportServer;
use habar_proto::raft::RaftMessage;
use habar_proto::raft::SnapshotChunk;
use habar_raft_store::types::GroupId;
use habar_raft_store::types::NodeId;
use habar_raft_store::types::Raft;
use habar_raft_store::types::TypeConfig;
use openraft::error::Fatal;
use openraft::error::RaftError;
use openraft::raft::AppendEntriesRequest;
use openraft::raft::TransferLeaderRequest;
use openraft::raft::VoteRequest;
use openraft::storage::RaftStateMachine;
use openraft::Snapshot;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::Semaphore;
use tonic::Request;
use tonic::Response;
use tonic::Status;
use tracing::Instrument;

use super::codec;
use super::metric;
use super::snapshot;
use super::snapshot::SnapshotChunkWriter;
use super::snapshot::SnapshotSink;
use super::RpcKind;
use super::DEFAULT_MAX_SNAPSHOT_BYTES;
use super::FORMAT_POSTCARD;
use super::MAX_CONCURRENT_SNAPSHOT_RECEIVES;
use super::MAX_MESSAGE_BYTES;

/// The Raft groups of this node, by group id. Cheap to clone; clones share the map.
pub struct GroupRegistry<SM: RaftStateMachine<TypeConfig>> {
    groups: Arc<RwLock<HashMap<GroupId, Raft<SM>>>>,
}

impl<SM: RaftStateMachine<TypeConfig>> Clone for GroupRegistry<SM> {
    fn clone(&self) -> Self {
        Self { groups: self.groups.clone() }
    }
}

impl<SM: RaftStateMachine<TypeConfig>> Default for GroupRegistry<SM> {
    fn default() -> Self {
        Self::new()
    }
}

impl<SM: RaftStateMachine<TypeConfig>> GroupRegistry<SM> {
    pub fn new() -> Self {
        Self { groups: Arc::new(RwLock::new(HashMap::new())) }
    }

    /// Registers `raft` as group `group`; returns the one it replaces.
    pub fn insert(&self, group: GroupId, raft: Raft<SM>) -> Option<Raft<SM>> {
        self.groups.write().unwrap_or_else(|p| p.into_inner()).insert(group, raft)
    }

    pub fn get(&self, group: GroupId) -> Option<Raft<SM>> {
        self.groups.read().unwrap_or_else(|p| p.into_inner()).get(&group).cloned()
    }

    pub fn remove(&self, group: GroupId) -> Option<Raft<SM>> {
        self.groups.write().unwrap_or_else(|p| p.into_inner()).remove(&group)
    }

    /// Registered group ids, ascending.
    pub fn groups(&self) -> Vec<GroupId> {
        let mut v: Vec<_> = self.groups.read().unwrap_or_else(|p| p.into_inner()).keys().copied().collect();
        v.sort_unstable();
        v
    }

    pub fn len(&self) -> usize {
        self.groups.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The `RaftTransport` gRPC service of one node.
///
/// `S` creates the writers received snapshots go to (the node's `StateStore`); its
/// writers must produce the state machine's snapshot data.
pub struct RaftTransportService<SM: RaftStateMachine<TypeConfig>, S> {
    registry: GroupRegistry<SM>,
    sink: Arc<S>,
    max_snapshot_bytes: u64,
    receiving: Arc<Semaphore>,
    refuse_writes: Option<WriteGate>,
    refuse_votes: Option<VoteGate>,
    stopping: Option<tokio::sync::watch::Receiver<bool>>,
}

/// Says why this node takes no replicated writes now (e.g. its disk is full), or `None`.
pub type WriteGate = Arc<dyn Fn() -> Option<String> + Send + Sync>;

/// Says why this node must not vote in a group now (it is repairing its log), or `None`.
pub type VoteGate = Arc<dyn Fn(GroupId) -> Option<String> + Send + Sync>;

impl<SM, S> RaftTransportService<SM, S>
where
    SM: RaftStateMachine<TypeConfig>,
    S: SnapshotSink,
    S::Writer: SnapshotChunkWriter<Data = SM::SnapshotData>,
{
    pub fn new(registry: GroupRegistry<SM>, sink: S) -> Self {
        Self {
            registry,
            sink: Arc::new(sink),
            max_snapshot_bytes: DEFAULT_MAX_SNAPSHOT_BYTES,
            receiving: Arc::new(Semaphore::new(MAX_CONCURRENT_SNAPSHOT_RECEIVES)),
            refuse_writes: None,
            refuse_votes: None,
            stopping: None,
        }
    }

    /// End every `AppendStream` once `stopping` turns true: a leader keeps its stream open
    /// as long as it leads, and the server's graceful shutdown waits for open streams.
    pub fn with_stopping(mut self, stopping: tokio::sync::watch::Receiver<bool>) -> Self {
        self.stopping = Some(stopping);
        self
    }

    /// Refuse AppendEntries and snapshots (UNAVAILABLE) while `gate` says why: the
    /// leaders keep their quorum without this node and retry it later.
    pub fn with_write_gate(mut self, gate: WriteGate) -> Self {
        self.refuse_writes = Some(gate);
        self
    }

    /// Refuse Vote, PreVote and TransferLeader (UNAVAILABLE) for a group while `gate` says
    /// why: a candidate counts the refusal as no vote.
    pub fn with_vote_gate(mut self, gate: VoteGate) -> Self {
        self.refuse_votes = Some(gate);
        self
    }

    fn check_votes(&self, kind: RpcKind, request: &Request<RaftMessage>) -> Result<(), Status> {
        match self.refuse_votes.as_ref().and_then(|g| g(request.get_ref().group_id)) {
            Some(why) => Err(reject(kind, "votes_refused", Status::unavailable(why))),
            None => Ok(()),
        }
    }

    fn check_writes(&self, kind: RpcKind) -> Result<(), Status> {
        match self.refuse_writes.as_ref().and_then(|g| g()) {
            Some(why) => Err(reject(kind, "writes_refused", Status::unavailable(why))),
            None => Ok(()),
        }
    }

    /// Refuse snapshots larger than `bytes` (default [`DEFAULT_MAX_SNAPSHOT_BYTES`]).
    pub fn with_max_snapshot_bytes(mut self, bytes: u64) -> Self {
        self.max_snapshot_bytes = bytes;
        self
    }

    /// The tonic service, with message limits raised to [`MAX_MESSAGE_BYTES`].
    pub fn into_server(self) -> RaftTransportServer<Self> {
        RaftTransportServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// The group's Raft, after checking the message is meant for this node.
    fn resolve(&self, kind: RpcKind, group: GroupId, target: Option<NodeId>) -> Result<Raft<SM>, Status> {
        let raft = self.registry.get(group).ok_or_else(|| {
            reject(kind, "unknown_group", Status::not_found(format!("raft group {group} is not on this node")))
        })?;
        if let Some(t) = target {
            let me = *raft.node_id();
            if t != me {
                return Err(reject(
                    kind,
                    "wrong_node",
                    Status::failed_precondition(format!("this is node {me}, not node {t}")),
                ));
            }
        }
        Ok(raft)
    }

    /// Decodes a request, hands it to the group's Raft with `f`, encodes the outcome.
    async fn unary<Req, Resp, F, Fut>(
        &self,
        kind: RpcKind,
        request: Request<RaftMessage>,
        f: F,
    ) -> Result<Response<RaftMessage>, Status>
    where
        Req: DeserializeOwned,
        Resp: Serialize,
        F: FnOnce(Raft<SM>, Req) -> Fut,
        Fut: Future<Output = Result<Resp, Fatal<TypeConfig>>>,
    {
        metrics::counter!(metric::RPC_RECEIVED, "kind" => kind.as_str()).increment(1);
        let msg = request.into_inner();
        let raft = self.resolve(kind, msg.group_id, msg.target_node)?;
        let req: Req = codec::decode(kind.as_str(), msg.format, &msg.body)
            .map_err(|e| reject(kind, "bad_body", Status::invalid_argument(e.to_string())))?;
        let res = f(raft, req).await;
        if let Err(fatal) = &res {
            tracing::warn!(group = msg.group_id, %kind, error = %fatal, "raft group refused an rpc: fatal");
        }
        let body = codec::encode(kind.as_str(), &res).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(RaftMessage { group_id: msg.group_id, format: FORMAT_POSTCARD, body, target_node: None }))
    }
}

fn reject(kind: RpcKind, why: &'static str, status: Status) -> Status {
    metrics::counter!(metric::RPC_REJECTED, "kind" => kind.as_str(), "why" => why).increment(1);
    tracing::debug!(%kind, why, message = status.message(), "raft rpc refused");
    status
}

/// `RaftError<C>` (with no API error) carries only a `Fatal`.
fn fatal_of(e: RaftError<TypeConfig>) -> Fatal<TypeConfig> {
    match e {
        RaftError::APIError(never) => match never {},
        RaftError::Fatal(f) => f,
    }
}

/// The answers of an `AppendStream`, in the order of its requests.
pub type AppendStreamOut = std::pin::Pin<Box<dyn futures::Stream<Item = Result<RaftMessage, Status>> + Send>>;

#[tonic::async_trait]
impl<SM, S> RaftTransport for RaftTransportService<SM, S>
where
    SM: RaftStateMachine<TypeConfig>,
    S: SnapshotSink,
    S::Writer: SnapshotChunkWriter<Data = SM::SnapshotData>,
{
    type AppendStreamStream = AppendStreamOut;

    /// A leader's pipelined replication stream (see the proto): each request goes to the
    /// group's `Raft::stream_append`, which answers them in order once each is on disk. A
    /// message that does not decode, names another group, or arrives while this node
    /// refuses writes ends the stream after the answers before it, with the refusal as its
    /// status; the leader then starts a new stream.
    async fn append_stream(
        &self,
        request: Request<tonic::Streaming<RaftMessage>>,
    ) -> Result<Response<AppendStreamOut>, Status> {
        use futures::StreamExt;
        let kind = RpcKind::AppendEntries;
        self.check_writes(kind)?;
        let header = |name: &str| -> Result<u64, Status> {
            let v = request.metadata().get(name).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
            v.ok_or_else(|| {
                reject(kind, "bad_body", Status::invalid_argument(format!("append stream without a numeric `{name}`")))
            })
        };
        let group = GroupId::try_from(header(super::stream::GROUP_HEADER)?)
            .map_err(|_| reject(kind, "bad_body", Status::invalid_argument("append stream group is over u32")))?;
        let raft = self.resolve(kind, group, Some(header(super::stream::TARGET_HEADER)?))?;
        let inbound = request.into_inner();
        let refused: Arc<std::sync::Mutex<Option<Status>>> = Arc::default();
        let gate = self.refuse_writes.clone();
        let stop = refused.clone();
        let requests = inbound.scan((), move |_, msg| {
            metrics::counter!(metric::RPC_RECEIVED, "kind" => kind.as_str()).increment(1);
            let checked = msg.and_then(|msg| {
                if msg.group_id != group {
                    let why = format!("append stream of group {group} carried a message of group {}", msg.group_id);
                    return Err(reject(kind, "bad_body", Status::invalid_argument(why)));
                }
                if let Some(why) = gate.as_ref().and_then(|g| g()) {
                    return Err(reject(kind, "writes_refused", Status::unavailable(why)));
                }
                codec::decode::<AppendEntriesRequest<TypeConfig>>(kind.as_str(), msg.format, &msg.body)
                    .map_err(|e| reject(kind, "bad_body", Status::invalid_argument(e.to_string())))
            });
            std::future::ready(match checked {
                Ok(req) => Some(req),
                Err(status) => {
                    *stop.lock().unwrap_or_else(|p| p.into_inner()) = Some(status);
                    None
                }
            })
        });
        let answers = raft.stream_append(requests).map(move |res| {
            if let Err(fatal) = &res {
                tracing::warn!(group, %kind, error = %fatal, "raft group refused an append stream: fatal");
            }
            let body = codec::encode(kind.as_str(), &res).map_err(|e| Status::internal(e.to_string()))?;
            Ok(RaftMessage { group_id: group, format: FORMAT_POSTCARD, body, target_node: None })
        });
        let ending = futures::stream::once(async move { refused.lock().unwrap_or_else(|p| p.into_inner()).take() })
            .filter_map(|status| async move { status.map(Err) });
        let mut stopping = self.stopping.clone();
        let stopped = async move {
            match stopping.as_mut() {
                Some(rx) => {
                    let _ = rx.wait_for(|s| *s).await;
                }
                None => std::future::pending().await,
            }
        };
        let after = self.stopping.clone();
        let ended_by_shutdown = futures::stream::once(async move {
            after.is_some_and(|rx| *rx.borrow()).then(|| Status::unavailable("this node is shutting down"))
        })
        .filter_map(|status| async move { status.map(Err) });
        Ok(Response::new(Box::pin(answers.chain(ending).take_until(stopped).chain(ended_by_shutdown))))
    }

    async fn append_entries(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        self.check_writes(RpcKind::AppendEntries)?;
        self.unary(RpcKind::AppendEntries, request, |raft, rpc: AppendEntriesRequest<TypeConfig>| async move {
            raft.append_entries(rpc).await.map_err(fatal_of)
        })
        .await
    }

    async fn vote(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        self.check_votes(RpcKind::Vote, &request)?;
        self.unary(RpcKind::Vote, request, |raft, rpc: VoteRequest<TypeConfig>| async move {
            raft.vote(rpc).await.map_err(fatal_of)
        })
        .await
    }

    async fn pre_vote(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        self.check_votes(RpcKind::PreVote, &request)?;
        self.unary(RpcKind::PreVote, request, |raft, rpc: VoteRequest<TypeConfig>| async move {
            raft.pre_vote(rpc).await.map_err(fatal_of)
        })
        .await
    }

    async fn transfer_leader(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        self.check_votes(RpcKind::TransferLeader, &request)?;
        self.unary(RpcKind::TransferLeader, request, |raft, req: TransferLeaderRequest<TypeConfig>| async move {
            raft.handle_transfer_leader(req).await
        })
        .await
    }

    async fn install_snapshot(
        &self,
        request: Request<tonic::Streaming<SnapshotChunk>>,
    ) -> Result<Response<RaftMessage>, Status> {
        let kind = RpcKind::InstallSnapshot;
        metrics::counter!(metric::RPC_RECEIVED, "kind" => kind.as_str()).increment(1);
        self.check_writes(kind)?;
        let _permit = self.receiving.clone().try_acquire_owned().map_err(|_| {
            reject(
                kind,
                "busy",
                Status::resource_exhausted(format!(
                    "this node is already receiving {MAX_CONCURRENT_SNAPSHOT_RECEIVES} snapshots"
                )),
            )
        })?;
        let mut stream = request.into_inner();
        let (first, header) = snapshot::receive_first(&mut stream).await.map_err(|s| reject(kind, "bad_stream", s))?;
        let group = first.group_id;
        let raft = self.resolve(kind, group, first.target_node)?;
        let span =
            tracing::info_span!("receive_snapshot", group, snapshot = ?header.meta.last_log_id, bytes = header.len);
        let limits = snapshot::ReceiveLimits { max_snapshot_bytes: self.max_snapshot_bytes };
        let received = snapshot::receive_rest(&self.sink, limits, first, header, &mut stream)
            .instrument(span.clone())
            .await
            .map_err(|s| reject(kind, "bad_stream", s))?;
        let snapshot::Received { group, header, data } = received;
        let res = raft
            .install_full_snapshot(header.vote, Snapshot { meta: header.meta, snapshot: data })
            .instrument(span.clone())
            .await;
        match &res {
            Ok(r) => {
                tracing::info!(parent: &span, vote = %r.vote, "snapshot received and installed")
            }
            Err(e) => {
                tracing::warn!(parent: &span, error = %e, "snapshot received, install failed")
            }
        }
        Ok(Response::new(snapshot::reply(group, &res)?))
    }
}
