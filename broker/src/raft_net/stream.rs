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
//! openraft's error kinds the same way, and each message gets the deadline a unary call
//! with entries would have had ([`append_ttl`], at least a second), never earlier than the
//! message ahead of it: a message unanswered past it ends the stream as a `Timeout` (a
//! follower that stopped, a link that went silent), and openraft starts a new session. A
//! node that does not know `AppendStream` (an older version) answers UNIMPLEMENTED; this
//! connection then uses unary calls from the next session on.
//!
//! After each commit openraft sends the new commit index at once in a request without
//! entries. Such a request is held back for [`COMMIT_HOLD`]: if another request comes
//! meanwhile (it carries the same or a newer commit index, and usually entries) the held one
//! is dropped ([`coalesce_commits`]). Measured (docs/BENCHMARKS.md, 2026-12-04): -7% CPU
//! per envelope at 1,000 envelopes/s, nothing measurable with one publisher, whose requests
//! rarely follow each other within the hold. A follower learns of a commit at most
//! `COMMIT_HOLD` later, which delays its apply (stale reads on it), never an
//! acknowledgement: the leader commits and answers on its own. openraft matches answers to what it sent by log id, so a request
//! that never went out is acknowledged by the answer to the next one.
//!
//! A test's [`FaultInjector`] acts on every message: a cut link ends the stream as
//! unreachable, a delay holds the message back, and a lost message or answer stalls the
//! stream until its deadline (an ordered stream cannot skip one).
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
use super::fault;
use super::fault::FaultInjector;
use super::fault::Verdict;
use super::metric;
use super::RpcKind;
use super::FORMAT_POSTCARD;
use super::MAX_MESSAGE_BYTES;

type RpcErr = RPCError<TypeConfig>;

/// Messages of one stream that may await their answers at once. While that many wait,
/// openraft's next request is not taken, so entries gather into a bigger one (as they did
/// behind the unary call's round trip). 2, 4 and 64 measured the same in the closed loop and
/// with one publisher (docs/BENCHMARKS.md); 4 bounds what a stream buffers to
/// 4 x `MAX_MESSAGE_BYTES`.
pub const STREAM_MAX_IN_FLIGHT: usize = 4;

/// How long a request without entries (a commit index update) waits for a request to
/// replace it. See the module docs.
pub const COMMIT_HOLD: std::time::Duration = std::time::Duration::from_millis(2);

/// `input` with every request that carries no entries held back for `hold` and dropped if
/// another request comes meanwhile (the later one carries the same or a newer commit index:
/// openraft reads it when it builds each request). The end of `input` sends what is held.
pub fn coalesce_commits<S>(
    input: S,
    hold: std::time::Duration,
) -> impl Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + Unpin + 'static
where
    S: Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + Unpin + 'static,
{
    /// The request held back, and until when.
    type Held = Option<(AppendEntriesRequest<TypeConfig>, Instant)>;
    Box::pin(futures::stream::unfold(Some((input, Held::None)), move |state| async move {
        let (mut input, mut held) = state?;
        loop {
            let next = match &held {
                None => input.next().await,
                Some((_, until)) => match tokio::time::timeout_at(*until, input.next()).await {
                    Ok(next) => next,
                    // Nothing replaced it in time: send it.
                    Err(_) => return held.take().map(|(req, _)| (req, Some((input, None)))),
                },
            };
            match next {
                // The end: send what is held, then stop.
                None => return held.take().map(|(req, _)| (req, None)),
                Some(req) if req.entries.is_empty() => {
                    // A newer commit-only request replaces a held one, keeping its deadline.
                    let until = held.as_ref().map_or_else(|| Instant::now() + hold, |(_, until)| *until);
                    held = Some((req, until));
                }
                Some(req) => return Some((req, Some((input, None)))),
            }
        }
    }))
}

/// Request metadata naming the group of an `AppendStream`.
pub const GROUP_HEADER: &str = "habar-group";
/// Request metadata naming the node the sender believes it is talking to.
pub const TARGET_HEADER: &str = "habar-target-node";

/// What the two halves of one stream share.
struct Shared {
    /// Deadline of every message sent and not yet answered, oldest first, with the time it
    /// was given (for the timeout error).
    deadlines: Mutex<VecDeque<(Instant, std::time::Duration)>>,
    /// Woken when a message is sent (so a reader waiting with no deadline takes one).
    sent: Notify,
    /// Bounds the unanswered messages.
    in_flight: Semaphore,
    /// Why the sending half stopped early (a request that cannot be sent).
    failed: Mutex<Option<RpcErr>>,
    /// Set by the fault injector's lost answer: answers are ignored from then on, so the
    /// stream ends at the next deadline.
    deaf: std::sync::atomic::AtomicBool,
}

impl Shared {
    fn lock_deadlines(&self) -> std::sync::MutexGuard<'_, VecDeque<(Instant, std::time::Duration)>> {
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
    /// A test's fault injector, consulted for every message (see [`open`]).
    pub faults: Option<FaultInjector>,
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
    let Peer { channel, group, local, target, faults } = peer;
    let shared = Arc::new(Shared {
        deadlines: Mutex::new(VecDeque::new()),
        sent: Notify::new(),
        in_flight: Semaphore::new(STREAM_MAX_IN_FLIGHT),
        failed: Mutex::new(None),
        deaf: std::sync::atomic::AtomicBool::new(false),
    });
    // Dropping the answers (openraft ended the session) ends the sending half too, so a
    // finished session never takes requests from openraft's shared replication state.
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel::<()>();
    let tx = shared.clone();
    // One message per part of a request (almost always the request itself), each taking an
    // in-flight permit just before it goes out: a request split into more parts than there
    // are permits sends its first parts while later ones wait for answers.
    let outbound = coalesce_commits(input, COMMIT_HOLD)
        .flat_map(|rpc| {
            let parts: Vec<Result<_, RpcErr>> = match split_to_fit(rpc) {
                Ok(parts) => parts.into_iter().map(Ok).collect(),
                Err(e) => vec![Err(e)],
            };
            futures::stream::iter(parts)
        })
        .then(move |part| {
            let tx = tx.clone();
            let faults = faults.clone();
            async move {
                let fail = |e: RpcErr| {
                    *tx.failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                    None
                };
                let (part, bytes) = match part {
                    Ok(p) => p,
                    Err(e) => return fail(e),
                };
                let body = match codec::encode(kind.as_str(), &part) {
                    Ok(b) => b,
                    Err(e) => return fail(RPCError::Unreachable(Unreachable::new(&e))),
                };
                let permit = tx.in_flight.acquire().await.ok()?;
                permit.forget();
                // A test's faults, per message. On an ordered stream a lost message cannot be
                // skipped (the follower would see a gap), so a loss stalls the stream until
                // its deadline, as a lost TCP segment would until a retransmission.
                let verdict = fault::consult(faults.as_ref(), local, target, kind);
                match verdict {
                    None => {}
                    Some(Verdict::Cut) => {
                        return fail(RPCError::Unreachable(Unreachable::from_string("link cut by the fault injector")))
                    }
                    Some(Verdict::Deliver { delay }) => tokio::time::sleep(delay).await,
                    Some(Verdict::DropResponse { delay }) => {
                        tokio::time::sleep(delay).await;
                        tx.deaf.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    Some(Verdict::DropRequest) => {}
                }
                // Every message as if it carried entries (at least APPEND_MIN_TIMEOUT): an
                // entry-less one is answered only after everything before it is on the
                // follower's disk, so openraft's heartbeat-length TTL would time out a
                // healthy stream behind one slow fsync. Never before the message ahead.
                let ttl = append_ttl(soft_ttl, true, bytes);
                {
                    let mut deadlines = tx.lock_deadlines();
                    let own = Instant::now() + ttl;
                    let due = deadlines.back().map_or(own, |&(ahead, _)| ahead.max(own));
                    deadlines.push_back((due, ttl));
                }
                tx.sent.notify_one();
                if verdict == Some(Verdict::DropRequest) {
                    // Lost: nothing more goes out; the answers side times out at its deadline.
                    return std::future::pending().await;
                }
                metrics::counter!(metric::RPC_SENT, "kind" => kind.as_str()).increment(1);
                Some(RaftMessage { group_id: group, format: FORMAT_POSTCARD, body, target_node: Some(target) })
            }
        })
        .take_while(|m| std::future::ready(m.is_some()))
        .filter_map(std::future::ready)
        .take_until(closed_rx);

    let mut request = tonic::Request::new(outbound);
    let meta = request.metadata_mut();
    meta.insert(GROUP_HEADER, group.into());
    meta.insert(TARGET_HEADER, target.into());
    let mut client = RaftTransportClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let open_ttl = soft_ttl.max(super::client::APPEND_MIN_TIMEOUT);
    let inbound = match tokio::time::timeout(open_ttl, client.append_stream(request)).await {
        Err(_) => return Err(OpenError::Rpc(super::client::timeout(kind, local, target, open_ttl))),
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
            let r = match due {
                Some((due, ttl)) => match tokio::time::timeout_at(due, inbound.message()).await {
                    Ok(r) => r,
                    Err(_) => return fail(super::client::timeout(kind, local, target, ttl)),
                },
                None => {
                    tokio::select! {
                        r = inbound.message() => r,
                        _ = shared.sent.notified() => continue,
                    }
                }
            };
            // An answer the fault injector lost: keep waiting, until the deadline.
            if matches!(r, Ok(Some(_))) && shared.deaf.load(std::sync::atomic::Ordering::Relaxed) {
                continue;
            }
            break r;
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use habar_raft_store::types::Entry;
    use habar_raft_store::types::EntryPayload;
    use habar_raft_store::types::LogId;
    use habar_raft_store::types::Vote;

    use super::*;

    /// A request after log index `prev`: with an entry at `prev + 1` if `entry`, else a
    /// commit index update to `commit`.
    fn req(prev: u64, entry: bool, commit: u64) -> AppendEntriesRequest<TypeConfig> {
        let entries = if entry {
            vec![Entry { log_id: LogId::new_term_index(1, prev + 1), payload: EntryPayload::Blank }]
        } else {
            Vec::new()
        };
        AppendEntriesRequest {
            vote: Vote::new(1, 1),
            prev_log_id: Some(LogId::new_term_index(1, prev)),
            entries,
            leader_commit: Some(LogId::new_term_index(1, commit)),
        }
    }

    /// What went out: (prev index, has entries, commit index).
    fn summary(r: &AppendEntriesRequest<TypeConfig>) -> (u64, bool, u64) {
        let idx = |l: &Option<LogId>| l.map_or(0, |l| l.index);
        (idx(&r.prev_log_id), !r.entries.is_empty(), idx(&r.leader_commit))
    }

    /// Property: a request with entries goes out at once; a commit-only one is dropped when
    /// another request comes within the hold (the later carries its commit), replaced by a
    /// newer commit-only one, sent when the hold passes, and sent when the input ends. The
    /// commit index a follower has heard of never goes backwards, and no entry is lost.
    #[tokio::test(start_paused = true)]
    async fn commit_only_requests_are_held_and_dropped_when_a_later_request_carries_the_commit() {
        let hold = Duration::from_millis(2);
        let (tx, rx) = tokio::sync::mpsc::channel::<(Duration, AppendEntriesRequest<TypeConfig>)>(16);
        let input = Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx).then(|(wait, r)| async move {
            tokio::time::sleep(wait).await;
            r
        }));
        let plan = vec![
            (Duration::ZERO, req(0, true, 0)),              // entries: at once
            (Duration::from_micros(100), req(1, false, 1)), // commit 1 ...
            (Duration::from_micros(500), req(1, true, 1)),  // ... dropped: this one carries it
            (Duration::from_micros(100), req(2, false, 2)), // commit 2 ...
            (Duration::from_micros(100), req(2, false, 2)), // ... replaced by a newer one, which
            (Duration::from_millis(5), req(2, true, 2)),    // ... goes out when the hold passes
            (Duration::from_micros(10), req(3, false, 3)),  // sent at the end of the input
        ];
        for p in plan {
            tx.send(p).await.unwrap();
        }
        drop(tx);
        let out: Vec<_> = coalesce_commits(input, hold).map(|r| summary(&r)).collect().await;
        assert_eq!(out, vec![(0, true, 0), (1, true, 1), (2, false, 2), (2, true, 2), (3, false, 3)]);
    }
}
