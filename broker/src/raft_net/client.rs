//! The sending side: openraft's network factory for one group, and the connection to one
//! target node it creates.
//!
//! Failure mapping (openraft reacts to the kind, not the message):
//! - no connection, peer down, group not (yet) on the peer, another node at the address,
//!   a body the peer cannot read, the peer's group stopped (a remote `Fatal`):
//!   `Unreachable`, so openraft backs off before retrying;
//! - the RPC's deadline passed (soft TTL of `RPCOption`): `Timeout`;
//! - a broken stream or connection mid-call (`UNKNOWN`, `INTERNAL`, `CANCELLED`,
//!   `ABORTED`): `Network`, retried at once.
//!
//! openraft's `RPCError` for these RPCs cannot carry a typed remote error (its remote
//! error type is `Infallible`), so a remote `Fatal` travels as the source of the
//! `Unreachable`, wrapped in `RemoteError` naming the target.

use std::future::Future;
use std::marker::PhantomData;
use std::time::Duration;

use habar_proto::raft::raft_transport_client::RaftTransportClient;
use habar_proto::raft::RaftMessage;
use habar_raft_store::types::GroupId;
use habar_raft_store::types::LogId;
use habar_raft_store::types::NodeAddr;
use habar_raft_store::types::NodeId;
use habar_raft_store::types::Snapshot;
use habar_raft_store::types::TypeConfig;
use habar_raft_store::types::Vote;
use openraft::error::Fatal;
use openraft::error::NetworkError;
use openraft::error::RPCError;
use openraft::error::RemoteError;
use openraft::error::ReplicationClosed;
use openraft::error::StreamingError;
use openraft::error::Timeout;
use openraft::error::Unreachable;
use openraft::network::v2::RaftNetworkV2;
use openraft::network::RPCOption;
use openraft::raft::AppendEntriesRequest;
use openraft::raft::AppendEntriesResponse;
use openraft::raft::SnapshotResponse;
use openraft::raft::StreamAppendResult;
use openraft::raft::TransferLeaderRequest;
use openraft::raft::TransferLeaderResponse;
use openraft::raft::VoteRequest;
use openraft::raft::VoteResponse;
use openraft::RaftNetworkFactory;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tracing::Instrument;

use super::codec;
use super::fault;
use super::fault::Verdict;
use super::metric;
use super::pool::PeerPool;
use super::snapshot;
use super::snapshot::SnapshotFile;
use super::stream;
use super::RpcKind;
use super::FORMAT_POSTCARD;
use super::MAX_MESSAGE_BYTES;
use super::MESSAGE_OVERHEAD_BYTES;

type RpcErr = RPCError<TypeConfig>;

/// openraft's network factory for one Raft group: every connection it makes shares the
/// pool's channel to the target node and tags its messages with `group`.
///
/// `SD` is the state machine's snapshot data type; `Raft::new` infers it, and it is the
/// store's [`SnapshotData`](habar_raft_store::SnapshotData) unless a test says otherwise.
pub struct NetworkFactory<SD = habar_raft_store::SnapshotData> {
    pool: PeerPool,
    group: GroupId,
    _snapshot: PhantomData<fn() -> SD>,
}

impl<SD> NetworkFactory<SD> {
    pub fn new(pool: PeerPool, group: GroupId) -> Self {
        Self { pool, group, _snapshot: PhantomData }
    }

    pub fn group(&self) -> GroupId {
        self.group
    }
}

impl<SD> Clone for NetworkFactory<SD> {
    fn clone(&self) -> Self {
        Self::new(self.pool.clone(), self.group)
    }
}

impl<SD: SnapshotFile> RaftNetworkFactory<TypeConfig> for NetworkFactory<SD> {
    type Network = GroupNetwork<SD>;

    async fn new_client(&mut self, target: NodeId, node: &NodeAddr) -> Self::Network {
        GroupNetwork {
            pool: self.pool.clone(),
            group: self.group,
            target,
            addr: node.addr.clone(),
            streaming: true,
            _snapshot: PhantomData,
        }
    }
}

/// The connection of one group to one target node (openraft's `RaftNetworkV2`).
pub struct GroupNetwork<SD = habar_raft_store::SnapshotData> {
    pool: PeerPool,
    group: GroupId,
    target: NodeId,
    addr: String,
    /// Replicate over `AppendStream` ([`super::stream`]); false once the target answered
    /// that it does not know it.
    streaming: bool,
    _snapshot: PhantomData<fn() -> SD>,
}

/// Maps a gRPC status to openraft's error kinds (see the module docs).
pub(crate) fn status_to_rpc_error(
    kind: RpcKind,
    local: NodeId,
    target: NodeId,
    ttl: Duration,
    status: tonic::Status,
) -> RpcErr {
    use tonic::Code;
    match status.code() {
        Code::DeadlineExceeded => timeout(kind, local, target, ttl),
        // tonic's own deadline timer (the request's `grpc-timeout`) reports `CANCELLED`
        // with a `TimeoutExpired` source.
        Code::Cancelled if caused_by_timeout(&status) => timeout(kind, local, target, ttl),
        Code::Unknown | Code::Internal | Code::Cancelled | Code::Aborted => {
            RPCError::Network(NetworkError::new(&status))
        }
        _ => RPCError::Unreachable(Unreachable::new(&status)),
    }
}

pub(crate) fn timeout(kind: RpcKind, local: NodeId, target: NodeId, ttl: Duration) -> RpcErr {
    RPCError::Timeout(Timeout { action: kind.openraft_type(), id: local, target, timeout: ttl })
}

fn caused_by_timeout(status: &tonic::Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        if e.is::<tonic::TimeoutExpired>() {
            return true;
        }
        source = e.source();
    }
    false
}

pub(crate) fn failure_reason(e: &RpcErr) -> &'static str {
    match e {
        RPCError::Timeout(_) => "timeout",
        RPCError::Unreachable(_) => "unreachable",
        RPCError::Network(_) => "network",
        RPCError::RemoteError(_) => "remote",
    }
}

impl<SD> GroupNetwork<SD> {
    fn timeout(&self, kind: RpcKind, ttl: Duration) -> RpcErr {
        timeout(kind, self.pool.local_id(), self.target, ttl)
    }

    /// One unary RPC: encode, consult the fault injector, send within `ttl`, decode
    /// `Result<Resp, Fatal>`. Counts it in the metrics.
    async fn unary<Req, Resp>(&self, kind: RpcKind, req: &Req, ttl: Duration) -> Result<Resp, RpcErr>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
    {
        metrics::counter!(metric::RPC_SENT, "kind" => kind.as_str()).increment(1);
        let res = self.unary_inner(kind, req, ttl).await;
        if let Err(e) = &res {
            let reason = failure_reason(e);
            metrics::counter!(metric::RPC_FAILED, "kind" => kind.as_str(), "reason" => reason).increment(1);
            tracing::debug!(group = self.group, target = self.target, %kind, reason, error = %e, "raft rpc failed");
        }
        res
    }

    async fn unary_inner<Req, Resp>(&self, kind: RpcKind, req: &Req, ttl: Duration) -> Result<Resp, RpcErr>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
    {
        let body = codec::encode(kind.as_str(), req).map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
        let channel =
            self.pool.channel(self.target, &self.addr).map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
        let verdict = fault::consult(self.pool.fault_injector(), self.pool.local_id(), self.target, kind);
        let msg = RaftMessage { group_id: self.group, format: FORMAT_POSTCARD, body, target_node: Some(self.target) };
        let (local, target) = (self.pool.local_id(), self.target);

        let call = async move {
            match verdict {
                None => {}
                Some(Verdict::Cut) => {
                    return Err(RPCError::Unreachable(Unreachable::from_string("link cut by the fault injector")))
                }
                // A lost request: the caller hears nothing until its deadline.
                Some(Verdict::DropRequest) => std::future::pending::<()>().await,
                Some(Verdict::Deliver { delay } | Verdict::DropResponse { delay }) => tokio::time::sleep(delay).await,
            }
            let mut request = tonic::Request::new(msg);
            request.set_timeout(ttl);
            let mut client = RaftTransportClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES);
            let resp = match kind {
                RpcKind::AppendEntries => client.append_entries(request).await,
                RpcKind::Vote => client.vote(request).await,
                RpcKind::PreVote => client.pre_vote(request).await,
                RpcKind::TransferLeader => client.transfer_leader(request).await,
                RpcKind::InstallSnapshot => {
                    return Err(RPCError::Unreachable(Unreachable::from_string("install snapshot is not unary")))
                }
            }
            .map_err(|s| status_to_rpc_error(kind, local, target, ttl, s))?;
            if let Some(Verdict::DropResponse { .. }) = verdict {
                // Delivered and handled, but the answer is lost.
                std::future::pending::<()>().await;
            }
            Ok(resp.into_inner())
        };
        let reply = match tokio::time::timeout(ttl, call).await {
            Ok(r) => r?,
            Err(_) => return Err(self.timeout(kind, ttl)),
        };

        let res: Result<Resp, Fatal<TypeConfig>> = codec::decode(kind.as_str(), reply.format, &reply.body)
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
        res.map_err(|fatal| RPCError::Unreachable(Unreachable::new(&RemoteError::<TypeConfig, _>::new(target, fatal))))
    }
}

/// Deadline of an AppendEntries RPC that carries entries.
///
/// openraft gives every RPC of its replication stream a TTL of 3/4 of the heartbeat
/// interval (tens of milliseconds on a LAN). That cannot cover moving a large batch and
/// the follower's fdatasync: a batch that always times out would be resent forever. So a
/// batch gets at least [`APPEND_MIN_TIMEOUT`], plus time for its bytes at
/// [`APPEND_ASSUMED_BYTES_PER_SEC`]. Heartbeats (no entries) keep openraft's TTL. A longer
/// deadline on one follower's stream does not delay commits: each follower has its own.
pub fn append_ttl(soft_ttl: Duration, has_entries: bool, bytes: usize) -> Duration {
    if !has_entries {
        return soft_ttl;
    }
    let transfer_ms = (bytes as u64).saturating_mul(1000) / APPEND_ASSUMED_BYTES_PER_SEC;
    soft_ttl.max(APPEND_MIN_TIMEOUT) + Duration::from_millis(transfer_ms)
}

/// See [`append_ttl`].
pub const APPEND_MIN_TIMEOUT: Duration = Duration::from_secs(1);
/// See [`append_ttl`].
pub const APPEND_ASSUMED_BYTES_PER_SEC: u64 = 16 * 1024 * 1024;

/// Cuts `rpc` to the longest prefix of its entries whose encoding fits in one message.
/// Returns the log id of the last entry kept if it cut anything, and the encoded size of
/// what is left (an upper bound).
fn fit_to_message(rpc: &mut AppendEntriesRequest<TypeConfig>) -> Result<(Option<LogId>, usize), RpcErr> {
    let entries = rpc.entries.len();
    let mut parts =
        split_to_fit(AppendEntriesRequest { entries: std::mem::take(&mut rpc.entries), ..*rpc })?.into_iter();
    let Some((first, bytes)) = parts.next() else {
        return Err(RPCError::Unreachable(Unreachable::from_string("append entries split into nothing")));
    };
    *rpc = first;
    let cut_after = if rpc.entries.len() < entries { rpc.entries.last().map(|e| e.log_id) } else { None };
    Ok((cut_after, bytes))
}

/// Splits `rpc` into consecutive requests (each one's `prev_log_id` the last entry of the
/// one before) whose encodings each fit in one message, with the encoded size of each (an
/// upper bound). Almost always `rpc` itself. An entry too large for any message ends the
/// split before it (openraft sends it again first, next time); as the first entry it is an
/// error naming it.
pub(crate) fn split_to_fit(
    mut rpc: AppendEntriesRequest<TypeConfig>,
) -> Result<Vec<(AppendEntriesRequest<TypeConfig>, usize)>, RpcErr> {
    let unreachable = |e: codec::CodecError| RPCError::Unreachable(Unreachable::new(&e));
    let budget = MAX_MESSAGE_BYTES - MESSAGE_OVERHEAD_BYTES;
    let size = codec::encoded_len("append entries", &rpc).map_err(unreachable)?;
    if size <= budget {
        return Ok(vec![(rpc, size)]);
    }
    let empty = |prev: Option<LogId>| AppendEntriesRequest::<TypeConfig> {
        vote: rpc.vote,
        prev_log_id: prev,
        entries: Vec::new(),
        leader_commit: rpc.leader_commit,
    };
    // The entry count is a varint of at most 10 bytes.
    let base = codec::encoded_len("append entries", &empty(rpc.prev_log_id)).map_err(unreachable)? + 10;
    let mut parts = Vec::new();
    let mut part = empty(rpc.prev_log_id);
    let mut total = base;
    for e in std::mem::take(&mut rpc.entries) {
        let n = codec::encoded_len("log entry", &e).map_err(unreachable)?;
        if base + n > budget && !(parts.is_empty() && part.entries.is_empty()) {
            break;
        }
        if base + n > budget {
            tracing::error!(log_id = %e.log_id, bytes = n, limit = budget, "log entry is too large to replicate");
            return Err(RPCError::Unreachable(Unreachable::from_string(format!(
                "log entry {} encodes to {n} bytes, over the {budget}-byte message limit: it cannot be replicated",
                e.log_id
            ))));
        }
        if total + n > budget {
            let prev = part.entries.last().map(|e: &habar_raft_store::types::Entry| e.log_id);
            parts.push((std::mem::replace(&mut part, empty(prev)), total));
            total = base;
        }
        total += n;
        part.entries.push(e);
    }
    parts.push((part, total));
    metrics::counter!(metric::APPEND_BATCHES_CUT).increment(1);
    Ok(parts)
}

impl<SD: SnapshotFile> RaftNetworkV2<TypeConfig> for GroupNetwork<SD> {
    type SnapshotData = SD;

    /// Replication over one pipelined `AppendStream` ([`super::stream`]), or openraft's
    /// sequential unary calls where that is off (see `streaming`).
    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        option: RPCOption,
    ) -> openraft::base::BoxFuture<
        's,
        Result<openraft::base::BoxStream<'s, Result<StreamAppendResult<TypeConfig>, RpcErr>>, RpcErr>,
    >
    where
        S: futures::Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + Unpin + 'static,
    {
        if !self.streaming {
            return openraft::network::stream_append_sequential(self, input, option);
        }
        Box::pin(async move {
            let channel =
                self.pool.channel(self.target, &self.addr).map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
            let peer = stream::Peer {
                channel,
                group: self.group,
                local: self.pool.local_id(),
                target: self.target,
                faults: self.pool.fault_injector().cloned(),
            };
            match stream::open(peer, input, option.soft_ttl()).await {
                Ok(answers) => Ok(answers as openraft::base::BoxStream<'s, _>),
                Err(stream::OpenError::Rpc(e)) => Err(e),
                Err(stream::OpenError::Unimplemented) => {
                    tracing::info!(
                        group = self.group,
                        target = self.target,
                        "peer does not know AppendStream: unary AppendEntries from now on"
                    );
                    self.streaming = false;
                    Err(RPCError::Unreachable(Unreachable::from_string(
                        "peer does not know AppendStream; retrying with AppendEntries",
                    )))
                }
            }
        })
    }

    async fn append_entries(
        &mut self,
        mut rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RpcErr> {
        let (cut_after, bytes) = fit_to_message(&mut rpc)?;
        let ttl = append_ttl(option.soft_ttl(), !rpc.entries.is_empty(), bytes);
        let resp: AppendEntriesResponse<TypeConfig> = self.unary(RpcKind::AppendEntries, &rpc, ttl).await?;
        // The target accepted the prefix it was sent; openraft sends the rest next.
        Ok(match (resp, cut_after) {
            (AppendEntriesResponse::Success, Some(last)) => AppendEntriesResponse::PartialSuccess(Some(last)),
            (resp, _) => resp,
        })
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RpcErr> {
        self.unary(RpcKind::Vote, &rpc, option.soft_ttl()).await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RpcErr> {
        self.unary(RpcKind::PreVote, &rpc, option.soft_ttl()).await
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RpcErr> {
        self.unary(RpcKind::TransferLeader, &req, option.soft_ttl()).await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot<SD>,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let kind = RpcKind::InstallSnapshot;
        metrics::counter!(metric::RPC_SENT, "kind" => kind.as_str()).increment(1);
        let span = tracing::info_span!("send_snapshot", group = self.group, target = self.target, snapshot = ?snapshot.meta.last_log_id, bytes = snapshot.snapshot.len());
        let res = async {
            let channel = self
                .pool
                .channel(self.target, &self.addr)
                .map_err(|e| StreamingError::Unreachable(Unreachable::new(&e)))?;
            let verdict = self.pool.fault_injector().map(|f| f.decide(self.pool.local_id(), self.target));
            let ctx = snapshot::SendCtx {
                channel,
                group: self.group,
                local: self.pool.local_id(),
                target: self.target,
                verdict,
            };
            snapshot::send(ctx, vote, snapshot, cancel, option).await
        }
        .instrument(span.clone())
        .await;
        match &res {
            Ok(_) => tracing::info!(parent: &span, "snapshot sent"),
            Err(e) => {
                let reason = match e {
                    StreamingError::Closed(_) => "closed",
                    StreamingError::StorageError(_) => "local",
                    StreamingError::Timeout(_) => "timeout",
                    StreamingError::Unreachable(_) => "unreachable",
                    StreamingError::Network(_) => "network",
                };
                metrics::counter!(metric::RPC_FAILED, "kind" => kind.as_str(), "reason" => reason).increment(1);
                tracing::warn!(parent: &span, reason, error = %e, "snapshot not sent");
            }
        }
        res
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use habar_raft_store::types::Command;
    use habar_raft_store::types::Entry;
    use habar_raft_store::types::EntryPayload;
    use habar_raft_store::types::NewEnvelope;

    use super::*;

    fn entry(index: u64, ciphertext: &Bytes) -> Entry {
        let env = NewEnvelope {
            conversation_id: "c".into(),
            message_id: [0; 16],
            sender: "s".into(),
            ciphertext: ciphertext.clone(),
            expires_at_ms: 0,
        };
        Entry {
            log_id: LogId::new_term_index(1, index),
            payload: EntryPayload::Normal(Command::Append { now_ms: 0, envelopes: vec![env] }),
        }
    }

    fn request(entries: Vec<Entry>) -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest { vote: Vote::new(1, 1), prev_log_id: None, entries, leader_commit: None }
    }

    #[test]
    fn batch_that_fits_is_left_alone() {
        let small = Bytes::from(vec![1u8; 1000]);
        let mut rpc = request((1..=10).map(|i| entry(i, &small)).collect());
        let size = codec::encoded_len("t", &rpc).unwrap();
        assert_eq!(fit_to_message(&mut rpc).unwrap(), (None, size));
        assert_eq!(rpc.entries.len(), 10);
    }

    #[test]
    fn oversized_batch_is_cut_to_the_longest_prefix_that_fits() {
        // Shared buffer: five 20 MiB entries without allocating 100 MiB.
        let big = Bytes::from(vec![0u8; 20 * 1024 * 1024]);
        let mut rpc = request((1..=5).map(|i| entry(i, &big)).collect());
        let (last, bound) = fit_to_message(&mut rpc).unwrap();
        assert_eq!(rpc.entries.len(), 3);
        assert_eq!(last, Some(LogId::new_term_index(1, 3)));
        let size = codec::encoded_len("t", &rpc).unwrap();
        assert!(size <= bound && bound <= MAX_MESSAGE_BYTES - MESSAGE_OVERHEAD_BYTES);
    }

    /// Property: a split carries every entry once, in order, each part fits, and each
    /// part's `prev_log_id` is the last entry of the part before (so a follower can take
    /// them one after another on a stream).
    #[test]
    fn oversized_batch_splits_into_consecutive_parts_that_fit() {
        let big = Bytes::from(vec![0u8; 20 * 1024 * 1024]);
        let mut rpc = request((1..=7).map(|i| entry(i, &big)).collect());
        rpc.prev_log_id = Some(LogId::new_term_index(1, 0));
        let parts = split_to_fit(rpc).unwrap();
        assert_eq!(parts.len(), 3);
        let mut prev = Some(LogId::new_term_index(1, 0));
        let mut next_index = 1;
        for (part, bound) in &parts {
            assert_eq!(part.prev_log_id, prev);
            for e in &part.entries {
                assert_eq!(e.log_id.index, next_index);
                next_index += 1;
            }
            let size = codec::encoded_len("t", part).unwrap();
            assert!(size <= *bound && *bound <= MAX_MESSAGE_BYTES - MESSAGE_OVERHEAD_BYTES);
            prev = part.entries.last().map(|e| e.log_id);
        }
        assert_eq!(next_index, 8);
    }

    #[test]
    fn single_entry_over_the_limit_is_an_error_naming_it() {
        let huge = Bytes::from(vec![0u8; MAX_MESSAGE_BYTES]);
        let mut rpc = request(vec![entry(7, &huge)]);
        let err = fit_to_message(&mut rpc).unwrap_err();
        assert!(matches!(err, RPCError::Unreachable(_)));
        assert!(err.to_string().contains("cannot be replicated"), "{err}");

        // Behind an entry that fits, it is cut off: the entries before it go first.
        let small = Bytes::from(vec![1u8; 1000]);
        let mut rpc = request(vec![entry(6, &small), entry(7, &huge), entry(8, &small)]);
        let (last, _) = fit_to_message(&mut rpc).unwrap();
        assert_eq!((last, rpc.entries.len()), (Some(LogId::new_term_index(1, 6)), 1));
    }

    #[test]
    fn status_codes_map_to_the_openraft_error_kind() {
        let map =
            |s: tonic::Status| failure_reason(&status_to_rpc_error(RpcKind::Vote, 1, 2, Duration::from_millis(5), s));
        assert_eq!(map(tonic::Status::unavailable("tcp connect error")), "unreachable");
        assert_eq!(map(tonic::Status::not_found("raft group 3 is not on this node")), "unreachable");
        assert_eq!(map(tonic::Status::failed_precondition("this is node 4")), "unreachable");
        assert_eq!(map(tonic::Status::invalid_argument("vote: body does not decode")), "unreachable");
        assert_eq!(map(tonic::Status::resource_exhausted("busy")), "unreachable");
        assert_eq!(map(tonic::Status::deadline_exceeded("late")), "timeout");
        assert_eq!(map(tonic::Status::cancelled("stream reset")), "network");
        assert_eq!(map(tonic::Status::internal("h2 protocol error")), "network");
        assert_eq!(map(tonic::Status::unknown("transport error")), "network");
        let timer = tonic::Status::from_error(Box::new(tonic::TimeoutExpired(())));
        assert_eq!(timer.code(), tonic::Code::Cancelled);
        assert_eq!(map(timer), "timeout");
    }

    #[test]
    fn heartbeats_keep_openraft_ttl_and_batches_get_time_for_their_bytes() {
        let soft = Duration::from_millis(37);
        assert_eq!(append_ttl(soft, false, 0), soft);
        assert_eq!(append_ttl(soft, true, 100), APPEND_MIN_TIMEOUT);
        let big = append_ttl(soft, true, 64 * 1024 * 1024);
        assert_eq!(big, APPEND_MIN_TIMEOUT + Duration::from_secs(4));
        assert_eq!(append_ttl(Duration::from_secs(3), true, 0), Duration::from_secs(3));
    }
}
