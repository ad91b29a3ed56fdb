//! Subscriptions: one task per stream serves any number of conversations from this
//! node's replica.
//!
//! How it stays in order without gaps or repeats: per conversation it keeps `next`, the
//! first seq not yet sent, and only ever reads the store forward from `next`. The store's
//! per-group change feed (sent after each apply) says which conversations grew; such a
//! conversation is marked dirty and read again. The feed is subscribed before a
//! conversation's first read, so an apply that lands during the read is never missed; a
//! receiver that lags (or a snapshot install) marks every conversation of the group dirty.
//!
//! Bounds: the stream's buffer holds `subscribe_buffer_events` events; the store is read a
//! page at a time only when the client has taken events, so nothing grows without bound.
//! If the buffer stays full for `subscribe_stall_timeout_ms` the stream ends with
//! `RESOURCE_EXHAUSTED` carrying each conversation's resume position (the next seq after
//! the last event queued, which the client still receives before the status).

use std::collections::HashMap;
use std::collections::HashSet;
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use futures::StreamExt;
use habar_proto::v1 as pb;
use habar_raft_store::sm::Change;
use habar_raft_store::sm::Direction;
use habar_raft_store::types::GroupId;
use prost::Message;
use tokio::sync::mpsc;
use tokio::sync::oneshot;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamMap;
use tonic::Status;

use crate::convert;
use crate::node::Node;
use crate::shard::shard_of;
use crate::validate;

/// Envelopes read from the store per page.
const PAGE: usize = 256;

pub type EventStream = Pin<Box<dyn Stream<Item = Result<pb::SubscribeEvent, Status>> + Send>>;

/// Control messages after the first, as the service decodes them.
pub type ControlStream = Pin<Box<dyn Stream<Item = Result<pb::SubscribeControl, Status>> + Send>>;

struct ConvSub {
    group: GroupId,
    next: u64,
    caught_up: bool,
}

struct Sub {
    node: Arc<Node>,
    limits: validate::Limits,
    tx: mpsc::Sender<Result<pb::SubscribeEvent, Status>>,
    convs: HashMap<String, ConvSub>,
    dirty: VecDeque<String>,
    dirty_set: HashSet<String>,
    changes: StreamMap<GroupId, BroadcastStream<Change>>,
    stall: Duration,
}

/// Why a subscription task stops.
enum End {
    /// The client went away.
    Gone,
    /// End the stream with this status.
    Status(Status),
}

/// Starts a subscription task for `initial` conversations, changed later by `control`
/// (if any), and returns its event stream.
pub fn start(
    node: Arc<Node>,
    limits: validate::Limits,
    initial: Vec<pb::ConversationFrom>,
    control: Option<ControlStream>,
) -> EventStream {
    let (tx, rx) = mpsc::channel(node.cfg.subscribe_buffer_events);
    let (end_tx, end_rx) = oneshot::channel::<Status>();
    let stall = Duration::from_millis(node.cfg.subscribe_stall_timeout_ms);
    let mut sub = Sub {
        node,
        limits,
        tx,
        convs: HashMap::new(),
        dirty: VecDeque::new(),
        dirty_set: HashSet::new(),
        changes: StreamMap::new(),
        stall,
    };
    tokio::spawn(async move {
        metrics::gauge!("habar_subscriptions").increment(1.0);
        if let End::Status(s) = sub.run(initial, control).await {
            let _ = end_tx.send(s);
        }
        metrics::gauge!("habar_subscriptions").decrement(1.0);
    });
    // The buffered events first, then the status that ended the stream (if any).
    let tail = futures::stream::once(end_rx).filter_map(|r| async move { r.ok().map(Err) });
    Box::pin(ReceiverStream::new(rx).chain(tail))
}

impl Sub {
    async fn run(&mut self, initial: Vec<pb::ConversationFrom>, control: Option<ControlStream>) -> End {
        if let Err(e) = self.add(initial) {
            return End::Status(e);
        }
        let mut control = control.unwrap_or_else(|| Box::pin(futures::stream::pending()));
        let mut signals = BroadcastStream::new(self.node.signals.subscribe());
        let keepalive = Duration::from_millis(self.node.cfg.subscribe_keepalive_ms);
        let mut idle = Box::pin(tokio::time::sleep(keepalive));
        let mut stopping = self.node.stopping.subscribe();
        loop {
            if *stopping.borrow_and_update() {
                return End::Status(Status::unavailable("node is stopping; resume from the next seq on another node"));
            }
            let sent = tokio::select! {
                biased;
                _ = self.tx.closed() => return End::Gone,
                _ = stopping.changed() => continue,
                ctrl = control.next() => match ctrl {
                    None => {
                        // The client closed its half: keep serving what it has.
                        control = Box::pin(futures::stream::pending());
                        false
                    }
                    Some(Err(e)) => return End::Status(e),
                    Some(Ok(c)) => match self.control(c).await {
                        Ok(sent) => sent,
                        Err(e) => return e,
                    },
                },
                Some((group, change)) = self.changes.next() => {
                    self.on_change(group, change);
                    false
                }
                signal = signals.next() => match signal {
                    Some(Ok(s)) => match self.signal(&s) {
                        Ok(sent) => sent,
                        Err(e) => return e,
                    },
                    // A lagging subscriber misses signals: they are best effort.
                    Some(Err(BroadcastStreamRecvError::Lagged(n))) => {
                        metrics::counter!("habar_signals_dropped_total").increment(n);
                        false
                    }
                    None => return End::Status(Status::unavailable("node is stopping; resume from the next seq")),
                },
                _ = std::future::ready(()), if !self.dirty.is_empty() => match self.serve_one().await {
                    Ok(sent) => sent,
                    Err(e) => return e,
                },
                _ = &mut idle => {
                    let ka = pb::subscribe_event::Event::Keepalive(pb::Keepalive { server_time_ms: self.node.now_ms() });
                    if let Err(e) = self.send(ka).await {
                        return e;
                    }
                    true
                }
            };
            if sent {
                idle.as_mut().reset(tokio::time::Instant::now() + keepalive);
            }
        }
    }

    fn add(&mut self, adds: Vec<pb::ConversationFrom>) -> Result<(), Status> {
        for a in adds {
            let group = shard_of(&a.conversation_id, self.node.shards());
            if !self.changes.contains_key(&group) {
                // Subscribed before the conversation's first read: no apply is missed.
                let rx = self.node.store.subscribe_changes(group).map_err(|e| Status::internal(e.to_string()))?;
                self.changes.insert(group, BroadcastStream::new(rx));
            }
            self.convs.insert(a.conversation_id.clone(), ConvSub { group, next: a.from_seq.max(1), caught_up: false });
            self.mark(a.conversation_id);
        }
        Ok(())
    }

    fn mark(&mut self, conv: String) {
        if self.dirty_set.insert(conv.clone()) {
            self.dirty.push_back(conv);
        }
    }

    async fn control(&mut self, c: pb::SubscribeControl) -> Result<bool, End> {
        validate::subscribe_control(&c, self.convs.len(), self.node.cfg.subscribe_max_conversations, &self.limits)
            .map_err(End::Status)?;
        let mut sent = false;
        for d in c.drop {
            if self.convs.remove(&d).is_some() {
                self.dirty_set.remove(&d);
                self.send(pb::subscribe_event::Event::Dropped(pb::Dropped { conversation_id: d })).await?;
                sent = true;
            }
        }
        self.add(c.add).map_err(End::Status)?;
        Ok(sent)
    }

    fn on_change(&mut self, group: GroupId, change: Result<Change, BroadcastStreamRecvError>) {
        match change {
            Ok(Change::Appended(list)) => {
                for (conv, last) in list.iter() {
                    if self.convs.get(conv).is_some_and(|c| c.next <= *last) {
                        self.mark(conv.clone());
                    }
                }
            }
            Ok(Change::All) | Err(BroadcastStreamRecvError::Lagged(_)) => {
                let all: Vec<String> =
                    self.convs.iter().filter(|(_, c)| c.group == group).map(|(k, _)| k.clone()).collect();
                for conv in all {
                    self.mark(conv);
                }
            }
        }
    }

    fn signal(&mut self, s: &pb::StoredEnvelope) -> Result<bool, End> {
        let conv = s.envelope.as_ref().map(|e| e.conversation_id.as_str()).unwrap_or("");
        if !self.convs.contains_key(conv) {
            return Ok(false);
        }
        // Never waits: a full buffer drops the signal (best effort by contract).
        match self.tx.try_send(Ok(pb::SubscribeEvent { event: Some(pb::subscribe_event::Event::Envelope(s.clone())) }))
        {
            Ok(()) => Ok(true),
            Err(mpsc::error::TrySendError::Full(_)) => {
                metrics::counter!("habar_signals_dropped_total").increment(1);
                Ok(false)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(End::Gone),
        }
    }

    /// Reads one page of the first dirty conversation and sends it.
    async fn serve_one(&mut self) -> Result<bool, End> {
        let Some(conv) = self.dirty.pop_front() else { return Ok(false) };
        self.dirty_set.remove(&conv);
        let Some(c) = self.convs.get(&conv) else { return Ok(false) };
        let (group, next) = (c.group, c.next);
        let store = self.node.store.clone();
        let now = self.node.now_ms();
        let name = conv.clone();
        let page =
            tokio::task::spawn_blocking(move || store.read_page(group, &name, Direction::Forward, next, PAGE, now))
                .await
                .map_err(|e| End::Status(Status::internal(format!("subscription read task failed: {e}"))))?
                .map_err(|e| End::Status(Status::internal(format!("subscription read failed: {e}"))))?;
        // Interleave removed ranges and envelopes in seq order.
        let mut removed = page.removed.into_iter().peekable();
        let mut sent = false;
        for e in page.envelopes {
            while let Some(r) = removed.next_if(|r| r.0 < e.seq) {
                self.send_removed(&conv, r).await?;
            }
            let next = e.seq + 1;
            self.send_advancing(pb::subscribe_event::Event::Envelope(convert::stored_to_pb(e)), &conv, next).await?;
            sent = true;
        }
        for r in removed {
            self.send_removed(&conv, r).await?;
            sent = true;
        }
        let Some(c) = self.convs.get_mut(&conv) else { return Ok(sent) };
        c.next = page.next.max(c.next);
        if !page.end {
            self.mark(conv);
        } else if !c.caught_up {
            c.caught_up = true;
            let next_seq = c.next;
            self.send(pb::subscribe_event::Event::CaughtUp(pb::CaughtUp { conversation_id: conv, next_seq })).await?;
            sent = true;
        }
        Ok(sent)
    }

    async fn send_removed(&mut self, conv: &str, (from, to): (u64, u64)) -> Result<(), End> {
        let event = pb::subscribe_event::Event::Removed(pb::Removed {
            conversation_id: conv.to_string(),
            range: Some(pb::SeqRange { from, to }),
        });
        self.send_advancing(event, conv, to + 1).await
    }

    /// Queues an event that moves `conv` on to `next` (an envelope or a removed range),
    /// and records the move once it is queued, so resume positions name exactly what the
    /// client will have received.
    async fn send_advancing(&mut self, event: pb::subscribe_event::Event, conv: &str, next: u64) -> Result<(), End> {
        self.send(event).await?;
        if let Some(c) = self.convs.get_mut(conv) {
            c.next = c.next.max(next);
        }
        Ok(())
    }

    /// Queues one event; waits at most the stall timeout for room.
    async fn send(&mut self, event: pb::subscribe_event::Event) -> Result<(), End> {
        match self.tx.send_timeout(Ok(pb::SubscribeEvent { event: Some(event) }), self.stall).await {
            Ok(()) => Ok(()),
            Err(mpsc::error::SendTimeoutError::Closed(_)) => Err(End::Gone),
            Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
                metrics::counter!("habar_subscriptions_cut_total").increment(1);
                Err(End::Status(self.exhausted()))
            }
        }
    }

    /// `RESOURCE_EXHAUSTED` with every conversation's resume position in its details.
    fn exhausted(&self) -> Status {
        let mut positions: Vec<pb::ConversationFrom> = self
            .convs
            .iter()
            .map(|(k, c)| pb::ConversationFrom { conversation_id: k.clone(), from_seq: c.next })
            .collect();
        positions.sort_by(|a, b| a.conversation_id.cmp(&b.conversation_id));
        let details = pb::ResumePositions { positions, retry_after_ms: crate::error::RETRY_AFTER_MS }.encode_to_vec();
        let status = Status::with_details(
            tonic::Code::ResourceExhausted,
            format!(
                "subscriber did not read for {} ms with {} events buffered (subscribe_stall_timeout_ms, \
                 subscribe_buffer_events); resume from the positions in the details",
                self.stall.as_millis(),
                self.node.cfg.subscribe_buffer_events
            ),
            details.into(),
        );
        crate::error::with_retry_after(status)
    }
}
