//! Resumable subscriptions over `Broker.SubscribeMany`.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::task::Context;
use std::task::Poll;
use std::time::Duration;

use habar_proto::v1 as pb;
use habar_proto::v1::subscribe_event::Event as PbEvent;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::Status;

use crate::client::broker_client;
use crate::client::Backoff;
use crate::client::Client;
use crate::client::Route;
use crate::error::retry_after;
use crate::error::ClientError;

/// Events buffered between the connection task and [`Subscription::next`].
const EVENT_BUFFER: usize = 1024;
/// `add` / `drop_conversation` commands waiting for the connection task.
const COMMAND_BUFFER: usize = 64;
/// `SubscribeControl` messages waiting to go out on the open request stream.
const CONTROL_BUFFER: usize = 64;
/// Pause before reconnecting after `RESOURCE_EXHAUSTED` without a `retry_after`.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_millis(100);

/// What a [`Subscription`] delivers.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A stored envelope (`seq > 0`). Per conversation: in seq order, never twice.
    Envelope(pb::StoredEnvelope),
    /// A live signal (`ephemeral`, seq 0): best effort, not replayed after a reconnect.
    Ephemeral(pb::StoredEnvelope),
    /// The conversation's backlog up to `next_seq - 1` was delivered; live from here.
    /// Sent again for each conversation after a reconnect.
    CaughtUp {
        /// The conversation.
        conversation_id: String,
        /// The seq the next envelope will have.
        next_seq: u64,
    },
    /// Seqs `from..=to` were removed on purpose (expired, retention, erasure) and will
    /// never be delivered: not a loss.
    Removed {
        /// The conversation.
        conversation_id: String,
        /// First removed seq.
        from: u64,
        /// Last removed seq.
        to: u64,
    },
    /// The conversation left the subscription (after
    /// [`Subscription::drop_conversation`], or dropped by the server).
    Dropped(String),
}

enum Command {
    Add(String, u64),
    Drop(String),
}

/// A live subscription to many conversations on one `SubscribeMany` stream.
///
/// It tracks, per conversation, the next seq it expects (after an envelope: its seq + 1;
/// after `Removed`: the range's end + 1). When the stream breaks (`UNAVAILABLE`, a lost
/// connection, `RESOURCE_EXHAUSTED` because this subscriber fell behind, or nothing at
/// all, not even a keepalive, for `keepalive_timeout`), it reconnects to another node
/// with backoff, forever, and re-adds every conversation from its next seq. Envelopes
/// below the next seq are dropped, so the caller never sees a seq twice or out of order.
/// Keepalives are consumed internally. `INVALID_ARGUMENT` (or another error that retrying
/// cannot fix) ends the subscription: [`Subscription::next`] returns that error, then
/// `None`.
///
/// Events wait in a bounded buffer; a caller that stops reading makes the server end the
/// stream with `RESOURCE_EXHAUSTED` after its own buffer fills, and the subscription
/// resumes from where the caller is once it reads again.
///
/// It holds a [`Client`] clone (and so the client's background tasks); dropping it
/// closes the stream.
pub struct Subscription {
    events: mpsc::Receiver<Result<Event, ClientError>>,
    commands: mpsc::Sender<Command>,
    connected: Arc<Mutex<Option<String>>>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription").field("connected_to", &self.connected_to()).finish_non_exhaustive()
    }
}

impl Subscription {
    pub(crate) async fn open(client: Client, conversations: Vec<(String, u64)>) -> Result<Subscription, ClientError> {
        let (commands_tx, commands_rx) = mpsc::channel(COMMAND_BUFFER);
        let (events_tx, events_rx) = mpsc::channel(EVENT_BUFFER);
        let connected = Arc::new(Mutex::new(None));
        let mut task = Task {
            client,
            positions: HashMap::new(),
            pending_drops: HashMap::new(),
            commands: commands_rx,
            events: events_tx,
            connected: connected.clone(),
            backoff: Backoff::new(),
        };
        for (c, from) in conversations {
            task.positions.insert(c, from.max(1));
        }
        let deadline = Instant::now() + task.client.inner.cfg.request_timeout;
        let conn = task.connect(Some(deadline), None).await?;
        let handle = tokio::spawn(task.run(conn));
        Ok(Subscription { events: events_rx, commands: commands_tx, connected, task: handle })
    }

    /// The next event; `None` once the subscription has ended (after the error that
    /// ended it).
    pub async fn next(&mut self) -> Option<Result<Event, ClientError>> {
        self.events.recv().await
    }

    /// Adds a conversation from `from_seq` (0 is read as 1) while the stream is open.
    /// Adding one already subscribed restarts it from `from_seq`.
    pub async fn add(&self, conversation_id: impl Into<String>, from_seq: u64) -> Result<(), ClientError> {
        self.commands.send(Command::Add(conversation_id.into(), from_seq)).await.map_err(|_| ClientError::Closed)
    }

    /// Removes a conversation; an [`Event::Dropped`] follows its last event.
    pub async fn drop_conversation(&self, conversation_id: impl Into<String>) -> Result<(), ClientError> {
        self.commands.send(Command::Drop(conversation_id.into())).await.map_err(|_| ClientError::Closed)
    }

    /// The endpoint of the node the stream is open on now (`None` while reconnecting).
    pub fn connected_to(&self) -> Option<String> {
        self.connected.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl futures::Stream for Subscription {
    type Item = Result<Event, ClientError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.events.poll_recv(cx)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An open `SubscribeMany` stream.
struct Conn {
    addr: String,
    stream: tonic::Streaming<pb::SubscribeEvent>,
    control: mpsc::Sender<pb::SubscribeControl>,
}

/// How serving one stream ended.
enum End {
    /// The caller dropped the subscription.
    Closed,
    /// Retrying cannot help.
    Fatal(ClientError),
    /// Reconnect after this pause.
    Reconnect(Duration),
}

/// Errors that end a subscription rather than reconnect it.
fn is_fatal(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::InvalidArgument
            | Code::NotFound
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::Unimplemented
            | Code::FailedPrecondition
            | Code::OutOfRange
            | Code::AlreadyExists
    )
}

struct Task {
    client: Client,
    /// Per subscribed conversation, the next seq to deliver.
    positions: HashMap<String, u64>,
    /// Drops sent on the current stream whose `Dropped` has not arrived: until it does,
    /// the conversation's envelopes belong to the dropped subscription.
    pending_drops: HashMap<String, u32>,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<Result<Event, ClientError>>,
    connected: Arc<Mutex<Option<String>>>,
    backoff: Backoff,
}

impl Task {
    /// Opens a stream on some node with every conversation from its position, retrying
    /// (avoiding `avoid` first) until `deadline`, or forever.
    async fn connect(&mut self, deadline: Option<Instant>, mut avoid: Option<String>) -> Result<Conn, ClientError> {
        let mut backoff = Backoff::new();
        loop {
            let addr = self.client.inner.pick(Route::Any, avoid.as_deref());
            let status = match self.try_open(&addr, deadline).await {
                Ok(conn) => return Ok(conn),
                Err(s) => s,
            };
            if is_fatal(&status) {
                return Err(ClientError::from(status));
            }
            tracing::debug!(node = %addr, code = ?status.code(), message = status.message(), "subscribe failed");
            self.client.inner.refresh.notify_one();
            let pause = match status.code() {
                Code::ResourceExhausted => retry_after(&status).unwrap_or(DEFAULT_RETRY_AFTER),
                _ => backoff.next_pause(),
            };
            if let Some(d) = deadline {
                if Instant::now() + pause >= d {
                    return Err(match status.code() {
                        Code::DeadlineExceeded => ClientError::DeadlineExceeded,
                        _ => ClientError::final_from(&status),
                    });
                }
            }
            avoid = Some(addr);
            tokio::time::sleep(pause).await;
        }
    }

    async fn try_open(&self, addr: &str, deadline: Option<Instant>) -> Result<Conn, Status> {
        let channel = self.client.inner.channel(addr).map_err(|e| Status::unavailable(e.to_string()))?;
        let (control, rx) = mpsc::channel(CONTROL_BUFFER);
        let add = self
            .positions
            .iter()
            .map(|(c, from)| pb::ConversationFrom { conversation_id: c.clone(), from_seq: *from })
            .collect();
        control
            .try_send(pb::SubscribeControl { add, drop: vec![] })
            .map_err(|_| Status::internal("the control buffer is full"))?;
        let cfg = &self.client.inner.cfg;
        let mut limit = cfg.request_timeout.max(cfg.connect_timeout);
        if let Some(d) = deadline {
            limit = limit.min(d.saturating_duration_since(Instant::now()));
        }
        let mut broker = broker_client(channel);
        let open = broker.subscribe_many(ReceiverStream::new(rx));
        match tokio::time::timeout(limit, open).await {
            Ok(Ok(response)) => Ok(Conn { addr: addr.to_string(), stream: response.into_inner(), control }),
            Ok(Err(s)) => Err(s),
            Err(_) => Err(Status::deadline_exceeded(format!("{addr}: SubscribeMany not accepted in time"))),
        }
    }

    async fn run(mut self, mut conn: Conn) {
        loop {
            self.set_connected(Some(conn.addr.clone()));
            let end = self.serve(&mut conn).await;
            self.set_connected(None);
            match end {
                End::Closed => return,
                End::Fatal(e) => {
                    let _ = self.events.send(Err(e)).await;
                    return;
                }
                End::Reconnect(pause) => {
                    self.client.inner.stats.add_reconnect();
                    self.client.inner.refresh.notify_one();
                    tokio::time::sleep(pause).await;
                    // The new stream carries only what is subscribed now.
                    self.pending_drops.clear();
                    let failed = conn.addr.clone();
                    conn = match self.connect(None, Some(failed)).await {
                        Ok(c) => c,
                        Err(e) => {
                            let _ = self.events.send(Err(e)).await;
                            return;
                        }
                    };
                }
            }
        }
    }

    fn set_connected(&self, addr: Option<String>) {
        *self.connected.lock().unwrap_or_else(|p| p.into_inner()) = addr;
    }

    async fn serve(&mut self, conn: &mut Conn) -> End {
        let keepalive = self.client.inner.cfg.keepalive_timeout;
        let idle = tokio::time::sleep(keepalive);
        tokio::pin!(idle);
        let mut received = false;
        loop {
            tokio::select! {
                command = self.commands.recv() => {
                    let Some(command) = command else { return End::Closed };
                    if let Some(control) = self.apply(command) {
                        if conn.control.send(control).await.is_err() {
                            // The request stream is gone: the response stream ends too.
                            return End::Reconnect(self.backoff.next_pause());
                        }
                    }
                }
                _ = &mut idle => {
                    tracing::debug!(node = %conn.addr, "no event within keepalive_timeout; reconnecting");
                    return End::Reconnect(Duration::ZERO);
                }
                message = conn.stream.message() => match message {
                    Ok(Some(event)) => {
                        idle.as_mut().reset(Instant::now() + keepalive);
                        if !received {
                            received = true;
                            self.backoff.reset();
                        }
                        if let Some(event) = self.track(event) {
                            if self.events.send(Ok(event)).await.is_err() {
                                return End::Closed;
                            }
                        }
                    }
                    Ok(None) => return End::Reconnect(self.backoff.next_pause()),
                    Err(s) if is_fatal(&s) => return End::Fatal(ClientError::from(s)),
                    Err(s) if s.code() == Code::ResourceExhausted => {
                        tracing::debug!(node = %conn.addr, message = s.message(), "subscriber fell behind; resuming");
                        return End::Reconnect(retry_after(&s).unwrap_or(DEFAULT_RETRY_AFTER));
                    }
                    Err(s) => {
                        tracing::debug!(node = %conn.addr, code = ?s.code(), message = s.message(), "stream ended");
                        return End::Reconnect(self.backoff.next_pause());
                    }
                }
            }
        }
    }

    /// Updates the tracked set for a caller's command; the control message to send.
    fn apply(&mut self, command: Command) -> Option<pb::SubscribeControl> {
        match command {
            Command::Add(c, from) => {
                let from = from.max(1);
                self.positions.insert(c.clone(), from);
                Some(pb::SubscribeControl {
                    add: vec![pb::ConversationFrom { conversation_id: c, from_seq: from }],
                    drop: vec![],
                })
            }
            Command::Drop(c) => {
                self.positions.remove(&c)?;
                *self.pending_drops.entry(c.clone()).or_default() += 1;
                Some(pb::SubscribeControl { add: vec![], drop: vec![c] })
            }
        }
    }

    /// Updates positions for a server event; the event to deliver, if any.
    fn track(&mut self, event: pb::SubscribeEvent) -> Option<Event> {
        match event.event? {
            PbEvent::Keepalive(_) => None,
            PbEvent::Envelope(stored) => {
                let conv = stored.envelope.as_ref()?.conversation_id.as_str();
                if self.pending_drops.contains_key(conv) {
                    return None;
                }
                let next = self.positions.get_mut(conv)?;
                if stored.ephemeral || stored.seq == 0 {
                    return Some(Event::Ephemeral(stored));
                }
                if stored.seq < *next {
                    return None;
                }
                *next = stored.seq + 1;
                Some(Event::Envelope(stored))
            }
            PbEvent::CaughtUp(c) => {
                if self.pending_drops.contains_key(&c.conversation_id)
                    || !self.positions.contains_key(&c.conversation_id)
                {
                    return None;
                }
                Some(Event::CaughtUp { conversation_id: c.conversation_id, next_seq: c.next_seq })
            }
            PbEvent::Removed(r) => {
                if self.pending_drops.contains_key(&r.conversation_id) {
                    return None;
                }
                let range = r.range?;
                let next = self.positions.get_mut(&r.conversation_id)?;
                if range.to < *next {
                    return None;
                }
                let from = range.from.max(*next);
                *next = range.to + 1;
                Some(Event::Removed { conversation_id: r.conversation_id, from, to: range.to })
            }
            PbEvent::Dropped(d) => {
                let c = d.conversation_id;
                match self.pending_drops.get_mut(&c) {
                    Some(n) => {
                        *n -= 1;
                        if *n == 0 {
                            self.pending_drops.remove(&c);
                        }
                    }
                    None => {
                        self.positions.remove(&c);
                    }
                }
                Some(Event::Dropped(c))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(conv: &str, seq: u64) -> pb::SubscribeEvent {
        pb::SubscribeEvent {
            event: Some(PbEvent::Envelope(pb::StoredEnvelope {
                envelope: Some(pb::Envelope { conversation_id: conv.into(), ..Default::default() }),
                seq,
                committed_at_ms: 0,
                ephemeral: false,
            })),
        }
    }

    async fn task() -> Task {
        let (_tx, commands) = mpsc::channel(1);
        let (events, _rx) = mpsc::channel(1);
        // A client that never connects: only `track`/`apply` are exercised.
        Task {
            client: crate::client::tests_support::offline_client(),
            positions: HashMap::new(),
            pending_drops: HashMap::new(),
            commands,
            events,
            connected: Arc::new(Mutex::new(None)),
            backoff: Backoff::new(),
        }
    }

    #[tokio::test]
    async fn repeats_are_dropped_and_positions_advance() {
        let mut t = task().await;
        t.positions.insert("a".into(), 3);
        assert!(t.track(stored("a", 2)).is_none(), "below the position");
        assert!(matches!(t.track(stored("a", 3)), Some(Event::Envelope(e)) if e.seq == 3));
        assert!(t.track(stored("a", 3)).is_none(), "a repeat");
        assert!(t.track(stored("b", 1)).is_none(), "not subscribed");
        let removed = pb::SubscribeEvent {
            event: Some(PbEvent::Removed(pb::Removed {
                conversation_id: "a".into(),
                range: Some(pb::SeqRange { from: 4, to: 9 }),
            })),
        };
        assert!(matches!(t.track(removed.clone()), Some(Event::Removed { from: 4, to: 9, .. })));
        assert_eq!(t.positions["a"], 10);
        assert!(t.track(removed).is_none(), "a repeated range");
        assert!(t.track(stored("a", 9)).is_none());
        assert!(t.track(stored("a", 10)).is_some());
    }

    #[tokio::test]
    async fn a_dropped_conversation_is_silent_until_its_dropped_event() {
        let mut t = task().await;
        t.positions.insert("a".into(), 1);
        let ctl = t.apply(Command::Drop("a".into())).unwrap_or_default();
        assert_eq!(ctl.drop, vec!["a".to_string()]);
        assert!(t.apply(Command::Drop("a".into())).is_none(), "not subscribed any more");
        t.apply(Command::Add("a".into(), 1));
        assert!(t.track(stored("a", 5)).is_none(), "from the dropped subscription");
        let dropped = pb::SubscribeEvent { event: Some(PbEvent::Dropped(pb::Dropped { conversation_id: "a".into() })) };
        assert_eq!(t.track(dropped), Some(Event::Dropped("a".into())));
        assert!(matches!(t.track(stored("a", 1)), Some(Event::Envelope(_))), "re-added from 1");
    }
}
