//! The [`Client`]: routing by shard leader, retries, batching and the unary calls.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::RwLock;
use std::sync::Weak;
use std::time::Duration;

use bytes::Bytes;
use habar_proto::v1 as pb;
use habar_proto::v1::admin_client::AdminClient;
use habar_proto::v1::broker_client::BrokerClient;
use habar_proto::v1::cluster_client::ClusterClient;
use prost::Message;
use rand::Rng;
use tokio::sync::mpsc;
use tokio::sync::oneshot;
use tokio::sync::Notify;
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::transport::Endpoint;
use tonic::Code;
use tonic::Request;
use tonic::Status;

use crate::batch;
use crate::config::normalize_endpoint;
use crate::config::ClientConfig;
use crate::error::is_transport_failure;
use crate::error::ClientError;
use crate::shard::shard_of;
use crate::subscription::Subscription;

/// Largest message the client encodes or decodes (a read page of big envelopes).
const MAX_MESSAGE_BYTES: usize = 64 << 20;
/// Least time between two `Cluster.Status` refreshes asked for by failures.
const MIN_REFRESH_GAP: Duration = Duration::from_millis(100);
/// First and largest pause between retries (the pause doubles, with jitter).
const BACKOFF_FIRST: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_millis(500);

/// A `Broker` stub on `channel` with the client's message size limits.
pub(crate) fn broker_client(channel: Channel) -> BrokerClient<Channel> {
    BrokerClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES).max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// A fresh random 16-byte message id, as [`Client::publish`] assigns to envelopes that
/// have none.
pub fn new_message_id() -> Bytes {
    Bytes::copy_from_slice(&rand::random::<[u8; 16]>())
}

fn ensure_message_id(e: &mut pb::Envelope) {
    if e.message_id.is_empty() {
        e.message_id = new_message_id();
    }
}

/// Counters of what a [`Client`] did since it connected (see [`Client::stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// `Publish` requests sent (batched, `publish_batch` parts and ephemeral), retries included.
    pub publish_requests: u64,
    /// Envelopes carried by those requests, retries included.
    pub published_envelopes: u64,
    /// Attempts that failed with a retryable error and were retried.
    pub retries: u64,
    /// Successful `Cluster.Status` refreshes.
    pub status_refreshes: u64,
    /// Times a subscription reconnected.
    pub subscription_reconnects: u64,
}

#[derive(Debug, Default)]
pub(crate) struct StatsCounters {
    publish_requests: AtomicU64,
    published_envelopes: AtomicU64,
    retries: AtomicU64,
    status_refreshes: AtomicU64,
    subscription_reconnects: AtomicU64,
}

impl StatsCounters {
    pub(crate) fn add_publish_request(&self, envelopes: usize) {
        self.publish_requests.fetch_add(1, Ordering::Relaxed);
        self.published_envelopes.fetch_add(envelopes as u64, Ordering::Relaxed);
    }

    pub(crate) fn add_reconnect(&self) {
        self.subscription_reconnects.fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> ClientStats {
        ClientStats {
            publish_requests: self.publish_requests.load(Ordering::Relaxed),
            published_envelopes: self.published_envelopes.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
            status_refreshes: self.status_refreshes.load(Ordering::Relaxed),
            subscription_reconnects: self.subscription_reconnects.load(Ordering::Relaxed),
        }
    }
}

/// What the client knows of the cluster, from the last `Cluster.Status` answer.
#[derive(Debug, Default)]
struct Topology {
    shard_count: u32,
    /// Per shard, its leader's node id (0: unknown).
    leaders: Vec<u64>,
    /// Node id -> normalized endpoint.
    addrs: BTreeMap<u64, String>,
    /// Endpoints of the nodes the answering node saw alive.
    alive: Vec<String>,
}

impl Topology {
    fn from_status(s: pb::StatusResponse) -> Topology {
        let shard_count = if s.shard_count > 0 { s.shard_count } else { s.shards.len() as u32 };
        let mut leaders = vec![0; shard_count as usize];
        for sh in &s.shards {
            if let Some(l) = leaders.get_mut(sh.shard as usize) {
                *l = sh.leader;
            }
        }
        let mut addrs = BTreeMap::new();
        let mut alive = Vec::new();
        for n in s.nodes {
            if n.addr.trim().is_empty() {
                continue;
            }
            let addr = normalize_endpoint(&n.addr);
            if n.alive {
                alive.push(addr.clone());
            }
            addrs.insert(n.id, addr);
        }
        Topology { shard_count, leaders, addrs, alive }
    }

    fn leader_addr(&self, conversation_id: &str) -> Option<&str> {
        if self.shard_count == 0 {
            return None;
        }
        let leader = *self.leaders.get(shard_of(conversation_id, self.shard_count) as usize)?;
        if leader == 0 {
            return None;
        }
        self.addrs.get(&leader).map(String::as_str)
    }
}

/// Where a call should go.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Route<'a> {
    /// The leader of this conversation's shard, else any node.
    Conversation(&'a str),
    /// Any node.
    Any,
}

/// Exponential backoff with jitter: 10 ms doubling to 500 ms, each pause drawn from
/// [d/2, d].
#[derive(Debug)]
pub(crate) struct Backoff {
    next: Duration,
}

impl Backoff {
    pub(crate) fn new() -> Self {
        Backoff { next: BACKOFF_FIRST }
    }

    pub(crate) fn reset(&mut self) {
        self.next = BACKOFF_FIRST;
    }

    pub(crate) fn next_pause(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        let half = d / 2;
        half + rand::thread_rng().gen_range(Duration::ZERO..=half)
    }
}

/// The retry state of one call: its deadline, backoff, the node that failed last and
/// the last retryable error.
pub(crate) struct Retry {
    pub(crate) deadline: Instant,
    backoff: Backoff,
    pub(crate) avoid: Option<String>,
    last: Option<Status>,
}

impl Retry {
    pub(crate) fn new(timeout: Duration) -> Self {
        Retry { deadline: Instant::now() + timeout, backoff: Backoff::new(), avoid: None, last: None }
    }

    /// Time left, if any.
    pub(crate) fn remaining(&self) -> Option<Duration> {
        let now = Instant::now();
        (self.deadline > now).then(|| self.deadline - now)
    }

    /// The error to report once the deadline passed: the last retryable error if there
    /// was one, else `DeadlineExceeded`.
    pub(crate) fn expired(&self) -> ClientError {
        match &self.last {
            Some(s) if s.code() != Code::DeadlineExceeded => ClientError::final_from(s),
            _ => ClientError::DeadlineExceeded,
        }
    }

    /// Records a failed attempt on `addr`: a non-retryable status is returned as the
    /// call's error; a retryable one asks for a topology refresh and waits the backoff
    /// (or gives up if the deadline would pass first).
    pub(crate) async fn failed(&mut self, inner: &Inner, addr: String, status: Status) -> Result<(), ClientError> {
        if !self.retryable(&status) {
            return Err(ClientError::from(status));
        }
        tracing::debug!(node = %addr, code = ?status.code(), message = status.message(), "retrying");
        inner.stats.retries.fetch_add(1, Ordering::Relaxed);
        inner.refresh.notify_one();
        self.avoid = Some(addr);
        self.last = Some(status);
        let pause = self.backoff.next_pause();
        if Instant::now() + pause >= self.deadline {
            return Err(self.expired());
        }
        tokio::time::sleep(pause).await;
        Ok(())
    }

    fn retryable(&self, s: &Status) -> bool {
        match s.code() {
            Code::Unavailable => true,
            // The server's deadline (ours, sent as grpc-timeout) passed, yet we have time.
            Code::DeadlineExceeded => self.deadline.saturating_duration_since(Instant::now()) > BACKOFF_FIRST,
            _ => is_transport_failure(s),
        }
    }
}

/// The shared state behind every clone of a [`Client`].
pub(crate) struct Inner {
    pub(crate) cfg: ClientConfig,
    channels: Mutex<HashMap<String, Channel>>,
    topology: RwLock<Topology>,
    batchers: Mutex<HashMap<String, mpsc::Sender<batch::Item>>>,
    /// Round-robin position over the fallback endpoints.
    rotation: AtomicUsize,
    /// The endpoint that answered the last `Cluster.Status`.
    last_status_from: Mutex<Option<String>>,
    /// Wakes the refresh task early (after an `UNAVAILABLE`).
    pub(crate) refresh: Arc<Notify>,
    pub(crate) stats: Arc<StatsCounters>,
    /// Dropped with the last clone: stops the refresh task.
    _stop_refresh: oneshot::Sender<()>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inner {
    /// A (lazily connecting, cached) channel to `addr`.
    pub(crate) fn channel(&self, addr: &str) -> Result<Channel, ClientError> {
        let mut channels = lock(&self.channels);
        if let Some(c) = channels.get(addr) {
            return Ok(c.clone());
        }
        let endpoint = Endpoint::from_shared(addr.to_string())
            .map_err(|e| ClientError::InvalidArgument(format!("endpoint `{addr}`: {e}")))?
            .connect_timeout(self.cfg.connect_timeout)
            .tcp_nodelay(true);
        let channel = endpoint.connect_lazy();
        channels.insert(addr.to_string(), channel.clone());
        Ok(channel)
    }

    /// Configured endpoints, then the nodes `Cluster.Status` reported alive.
    fn candidates(&self) -> Vec<String> {
        let topo = self.topology.read().unwrap_or_else(|p| p.into_inner());
        let mut out = self.cfg.endpoints.clone();
        for a in &topo.alive {
            if !out.contains(a) {
                out.push(a.clone());
            }
        }
        out
    }

    /// The endpoint for `route`: the shard leader when known (and not `avoid`), else the
    /// next endpoint in rotation other than `avoid`.
    pub(crate) fn pick(&self, route: Route<'_>, avoid: Option<&str>) -> String {
        if let Route::Conversation(c) = route {
            let topo = self.topology.read().unwrap_or_else(|p| p.into_inner());
            if let Some(addr) = topo.leader_addr(c) {
                if avoid != Some(addr) {
                    return addr.to_string();
                }
            }
        }
        let candidates = self.candidates();
        let n = candidates.len().max(1);
        let start = self.rotation.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|i| &candidates[(start + i) % n])
            .find(|c| avoid != Some(c.as_str()))
            .or_else(|| candidates.first())
            .cloned()
            .unwrap_or_default()
    }

    /// The shard of a conversation, when the cluster's shard count is known.
    fn shard_of(&self, conversation_id: &str) -> Option<u32> {
        let topo = self.topology.read().unwrap_or_else(|p| p.into_inner());
        (topo.shard_count > 0).then(|| shard_of(conversation_id, topo.shard_count))
    }

    /// The publish queue of the batcher for `addr` and `shard`, started on first use.
    /// Batches are per shard, so each request becomes one Raft entry on its leader (a
    /// request spanning 16 shards would become 16 small entries).
    fn batcher(&self, addr: &str, shard: Option<u32>) -> Result<mpsc::Sender<batch::Item>, ClientError> {
        let key = match shard {
            Some(s) => format!("{addr}#{s}"),
            None => addr.to_string(),
        };
        let mut batchers = lock(&self.batchers);
        if let Some(tx) = batchers.get(&key) {
            if !tx.is_closed() {
                return Ok(tx.clone());
            }
        }
        let channel = self.channel(addr)?;
        let (tx, rx) = mpsc::channel(self.cfg.publish_queue_capacity());
        let settings = batch::Settings {
            max_envelopes: self.cfg.max_batch_envelopes,
            max_bytes: self.cfg.max_batch_bytes,
            max_in_flight: self.cfg.max_in_flight_batches,
            linger: self.cfg.batch_linger,
        };
        tokio::spawn(batch::run(rx, channel, settings, self.stats.clone()));
        batchers.insert(key, tx.clone());
        Ok(tx)
    }

    /// Asks one node after another (the last one that answered first) for
    /// `Cluster.Status` and keeps the first answer. The error of the last attempt if none
    /// answered.
    async fn refresh_status(&self) -> Result<(), Status> {
        let mut candidates = self.candidates();
        if let Some(last) = lock(&self.last_status_from).clone() {
            candidates.retain(|c| *c != last);
            candidates.insert(0, last);
        }
        let mut last_error = Status::unavailable("no endpoint to ask for Cluster.Status");
        for addr in candidates {
            let channel = match self.channel(&addr) {
                Ok(c) => c,
                Err(e) => {
                    last_error = Status::invalid_argument(e.to_string());
                    continue;
                }
            };
            let mut request = Request::new(pb::StatusRequest {});
            request.set_timeout(self.cfg.connect_timeout);
            let mut cluster = ClusterClient::new(channel);
            let call = cluster.status(request);
            let answer = match tokio::time::timeout(self.cfg.connect_timeout, call).await {
                Ok(Ok(a)) => a.into_inner(),
                Ok(Err(s)) => {
                    last_error = s;
                    continue;
                }
                Err(_) => {
                    last_error = Status::unavailable(format!("{addr}: no Cluster.Status answer in time"));
                    continue;
                }
            };
            *self.topology.write().unwrap_or_else(|p| p.into_inner()) = Topology::from_status(answer);
            *lock(&self.last_status_from) = Some(addr);
            self.stats.status_refreshes.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        Err(last_error)
    }
}

/// Refreshes the topology every `status_refresh` and when woken, until the last
/// `Client` clone is dropped.
async fn refresh_loop(inner: Weak<Inner>, wake: Arc<Notify>, mut stop: oneshot::Receiver<()>, every: Duration) {
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(every) => {}
            _ = wake.notified() => {}
        }
        let Some(inner) = inner.upgrade() else { return };
        if let Err(e) = inner.refresh_status().await {
            tracing::debug!(error = %e, "Cluster.Status refresh failed");
        }
        drop(inner);
        tokio::time::sleep(MIN_REFRESH_GAP).await;
    }
}

/// A connection to a Habar cluster. Cheap to clone (an `Arc` inside); every clone shares
/// the connections, the leader table, the publish batchers and the counters. The
/// background tasks stop when the last clone (and the last [`Subscription`]) is dropped.
///
/// Every call retries `UNAVAILABLE`, connection failures and a server's
/// `DEADLINE_EXCEEDED` with exponential backoff and jitter until
/// [`ClientConfig::request_timeout`] passes; other errors are returned at once.
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("endpoints", &self.inner.cfg.endpoints).finish_non_exhaustive()
    }
}

impl Client {
    /// Connects: asks the endpoints, one after another, for `Cluster.Status` (each within
    /// `connect_timeout`) and starts the background refresh task. Must be called inside
    /// a Tokio runtime.
    ///
    /// Errors: [`ClientError::InvalidArgument`] for no endpoint or a malformed one,
    /// [`ClientError::Connect`] if no endpoint answered.
    pub async fn connect(mut cfg: ClientConfig) -> Result<Client, ClientError> {
        cfg.endpoints = cfg.endpoints.iter().filter(|e| !e.trim().is_empty()).map(|e| normalize_endpoint(e)).collect();
        cfg.endpoints.dedup();
        if cfg.endpoints.is_empty() {
            return Err(ClientError::InvalidArgument("endpoints: at least one is needed".into()));
        }
        let every = cfg.status_refresh.max(MIN_REFRESH_GAP);
        let (Client { inner }, stop_rx) = Client::unconnected(cfg);
        for e in &inner.cfg.endpoints {
            inner.channel(e)?;
        }
        if let Err(s) = inner.refresh_status().await {
            return Err(ClientError::Connect(format!("no endpoint answered Cluster.Status: {}", s.message())));
        }
        tokio::spawn(refresh_loop(Arc::downgrade(&inner), inner.refresh.clone(), stop_rx, every));
        Ok(Client { inner })
    }

    /// The shared state, before any call; the receiver stops the refresh task.
    fn unconnected(cfg: ClientConfig) -> (Client, oneshot::Receiver<()>) {
        let (stop_tx, stop_rx) = oneshot::channel();
        let inner = Arc::new(Inner {
            cfg,
            channels: Mutex::new(HashMap::new()),
            topology: RwLock::new(Topology::default()),
            batchers: Mutex::new(HashMap::new()),
            rotation: AtomicUsize::new(0),
            last_status_from: Mutex::new(None),
            refresh: Arc::new(Notify::new()),
            stats: Arc::new(StatsCounters::default()),
            _stop_refresh: stop_tx,
        });
        (Client { inner }, stop_rx)
    }

    /// What this client did since it connected.
    pub fn stats(&self) -> ClientStats {
        self.inner.stats.snapshot()
    }

    /// The settings in use (endpoints normalized to `http://host:port`).
    pub fn config(&self) -> &ClientConfig {
        &self.inner.cfg
    }

    /// The endpoint of the node the client currently believes leads `conversation_id`'s
    /// shard, if known.
    pub fn leader_of(&self, conversation_id: &str) -> Option<String> {
        let topo = self.inner.topology.read().unwrap_or_else(|p| p.into_inner());
        topo.leader_addr(conversation_id).map(str::to_string)
    }

    /// Runs `f` (one attempt on a channel, with the time left) until it succeeds, fails
    /// with a non-retryable error, or the deadline passes.
    pub(crate) async fn call<T, F, Fut>(&self, route: Route<'_>, mut f: F) -> Result<T, ClientError>
    where
        F: FnMut(Channel, Duration) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let mut retry = Retry::new(self.inner.cfg.request_timeout);
        loop {
            let Some(remaining) = retry.remaining() else { return Err(retry.expired()) };
            let addr = self.inner.pick(route, retry.avoid.as_deref());
            let channel = self.inner.channel(&addr)?;
            let status = match tokio::time::timeout(remaining, f(channel, remaining)).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(s)) => s,
                Err(_) => return Err(ClientError::DeadlineExceeded),
            };
            retry.failed(&self.inner, addr, status).await?;
        }
    }

    /// Publishes one envelope, batched with concurrent `publish` calls to the same node
    /// into one request, sent to its shard's leader. Returns once the envelope is
    /// committed by a majority of its shard and fsynced.
    ///
    /// An empty `message_id` gets a random one. Retries (after `UNAVAILABLE`, a lost
    /// connection, a leader change) reuse the message id, so the server answers the
    /// original seq with `duplicate = true` if an earlier attempt was applied.
    ///
    /// A bad envelope fails its whole batch: every caller whose envelope shared the
    /// request gets the same [`ClientError::InvalidArgument`] (naming the field). Use
    /// [`Client::publish_batch`] for all-or-nothing validation of your own envelopes.
    pub async fn publish(&self, mut envelope: pb::Envelope) -> Result<pb::Appended, ClientError> {
        ensure_message_id(&mut envelope);
        // Field tags and lengths of the repeated field, roughly.
        let size = envelope.encoded_len() + 8;
        let mut retry = Retry::new(self.inner.cfg.request_timeout);
        loop {
            if retry.remaining().is_none() {
                return Err(retry.expired());
            }
            let addr = self.inner.pick(Route::Conversation(&envelope.conversation_id), retry.avoid.as_deref());
            let queue = self.inner.batcher(&addr, self.inner.shard_of(&envelope.conversation_id))?;
            let (reply, answer) = oneshot::channel();
            let item = batch::Item { envelope: envelope.clone(), size, deadline: retry.deadline, reply };
            let status = match tokio::time::timeout_at(retry.deadline, queue.send(item)).await {
                Err(_) => return Err(ClientError::DeadlineExceeded),
                Ok(Err(_)) => Status::unavailable("the node's publish queue closed"),
                Ok(Ok(())) => match tokio::time::timeout_at(retry.deadline, answer).await {
                    Err(_) => return Err(ClientError::DeadlineExceeded),
                    Ok(Err(_)) => Status::unavailable("the batch was dropped without an answer"),
                    Ok(Ok(Ok(appended))) => return Ok(appended),
                    Ok(Ok(Err(s))) => s,
                },
            };
            retry.failed(&self.inner, addr, status).await?;
        }
    }

    /// Publishes exactly these envelopes, unbatched with anything else: one request per
    /// shard leader they go to (one request in all when they share a leader), each
    /// retried as a whole. Answers in the order of `envelopes`.
    ///
    /// Each request is validated as a whole before anything of it is applied, so a batch
    /// whose envelopes share a leader (for instance all of one conversation) is
    /// all-or-nothing on `INVALID_ARGUMENT`. When the envelopes span several leaders and
    /// one part is rejected, the other parts may have been applied; retrying the fixed
    /// batch is safe (same message ids, answered `duplicate = true`).
    pub async fn publish_batch(&self, mut envelopes: Vec<pb::Envelope>) -> Result<Vec<pb::Appended>, ClientError> {
        if envelopes.is_empty() {
            return Ok(Vec::new());
        }
        envelopes.iter_mut().for_each(ensure_message_id);
        // Group by the current leader's endpoint (unknown leader: one fallback group).
        let mut groups: BTreeMap<Option<String>, (Vec<usize>, Vec<pb::Envelope>)> = BTreeMap::new();
        for (i, e) in envelopes.into_iter().enumerate() {
            let g = groups.entry(self.leader_of(&e.conversation_id)).or_default();
            g.0.push(i);
            g.1.push(e);
        }
        let n: usize = groups.values().map(|g| g.0.len()).sum();
        let parts = futures::future::try_join_all(groups.into_values().map(|(idx, envs)| async move {
            let route_conv = envs[0].conversation_id.clone();
            let appended = self.publish_request(Route::Conversation(&route_conv), envs, false).await?;
            Ok::<_, ClientError>((idx, appended))
        }))
        .await?;
        let mut out: Vec<Option<pb::Appended>> = vec![None; n];
        for (idx, appended) in parts {
            for (i, a) in idx.into_iter().zip(appended) {
                out[i] = Some(a);
            }
        }
        Ok(out.into_iter().flatten().collect())
    }

    /// One `Publish` request of exactly `envelopes`, retried as a whole unless
    /// `ephemeral` (one attempt).
    async fn publish_request(
        &self,
        route: Route<'_>,
        envelopes: Vec<pb::Envelope>,
        ephemeral: bool,
    ) -> Result<Vec<pb::Appended>, ClientError> {
        let n = envelopes.len();
        let stats = self.inner.stats.clone();
        let attempt = |channel: Channel, remaining: Duration| {
            let envelopes = envelopes.clone();
            let stats = stats.clone();
            async move {
                stats.add_publish_request(envelopes.len());
                let mut request = Request::new(pb::PublishRequest { envelopes, ephemeral });
                request.set_timeout(remaining);
                let appended = broker_client(channel).publish(request).await?.into_inner().appended;
                if appended.len() != n {
                    return Err(Status::internal(format!(
                        "the server answered {} results for {n} envelopes",
                        appended.len()
                    )));
                }
                Ok(appended)
            }
        };
        if ephemeral {
            let addr = self.inner.pick(route, None);
            let channel = self.inner.channel(&addr)?;
            let timeout = self.inner.cfg.request_timeout;
            return match tokio::time::timeout(timeout, attempt(channel, timeout)).await {
                Ok(Ok(a)) => Ok(a),
                Ok(Err(s)) if is_transport_failure(&s) => Err(ClientError::Connect(s.message().to_string())),
                Ok(Err(s)) => Err(ClientError::from(s)),
                Err(_) => Err(ClientError::DeadlineExceeded),
            };
        }
        self.call(route, attempt).await
    }

    /// Sends live signals (typing, call signalling) to the conversations' current
    /// subscribers: `ephemeral = true`, never stored, best effort, one attempt (no
    /// retries), each `Appended.seq` is 0. Envelopes without a message id get one.
    pub async fn publish_ephemeral(&self, mut envelopes: Vec<pb::Envelope>) -> Result<Vec<pb::Appended>, ClientError> {
        if envelopes.is_empty() {
            return Ok(Vec::new());
        }
        envelopes.iter_mut().for_each(ensure_message_id);
        let conv = envelopes[0].conversation_id.clone();
        self.publish_request(Route::Conversation(&conv), envelopes, true).await
    }

    /// `Broker.Read`: a page of a conversation, forward from `from_seq` or backward below
    /// `before_seq`; sent to the shard leader, retried.
    pub async fn read(&self, request: pb::ReadRequest) -> Result<pb::ReadResponse, ClientError> {
        let conv = request.conversation_id.clone();
        self.call(Route::Conversation(&conv), |channel, remaining| {
            let mut r = Request::new(request.clone());
            r.set_timeout(remaining);
            async move { Ok(broker_client(channel).read(r).await?.into_inner()) }
        })
        .await
    }

    /// `Broker.CommitCursor`: moves a reader's cursor forward (never backwards); retried
    /// (idempotent).
    pub async fn commit_cursor(
        &self,
        request: pb::CommitCursorRequest,
    ) -> Result<pb::CommitCursorResponse, ClientError> {
        let conv = request.conversation_id.clone();
        self.call(Route::Conversation(&conv), |channel, remaining| {
            let mut r = Request::new(request.clone());
            r.set_timeout(remaining);
            async move { Ok(broker_client(channel).commit_cursor(r).await?.into_inner()) }
        })
        .await
    }

    /// `Broker.GetCursors`: a conversation's cursors (or one reader's) with unread counts.
    pub async fn get_cursors(&self, request: pb::GetCursorsRequest) -> Result<pb::GetCursorsResponse, ClientError> {
        let conv = request.conversation_id.clone();
        self.call(Route::Conversation(&conv), |channel, remaining| {
            let mut r = Request::new(request.clone());
            r.set_timeout(remaining);
            async move { Ok(broker_client(channel).get_cursors(r).await?.into_inner()) }
        })
        .await
    }

    /// `Broker.DeleteConversation`: erases a conversation's envelopes, cursors and dedupe
    /// entries. Retried: if an attempt was applied but its answer lost, the retry may
    /// answer [`ClientError::NotFound`].
    pub async fn delete_conversation(
        &self,
        request: pb::DeleteConversationRequest,
    ) -> Result<pb::DeleteConversationResponse, ClientError> {
        let conv = request.conversation_id.clone();
        self.call(Route::Conversation(&conv), |channel, remaining| {
            let mut r = Request::new(request.clone());
            r.set_timeout(remaining);
            async move { Ok(broker_client(channel).delete_conversation(r).await?.into_inner()) }
        })
        .await
    }

    /// `Admin.SetRetention`: sets (replaces) a conversation's retention limits.
    pub async fn set_retention(
        &self,
        request: pb::SetRetentionRequest,
    ) -> Result<pb::SetRetentionResponse, ClientError> {
        let conv = request.conversation_id.clone();
        self.call(Route::Conversation(&conv), |channel, remaining| {
            let mut r = Request::new(request.clone());
            r.set_timeout(remaining);
            async move {
                let mut admin = AdminClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES);
                Ok(admin.set_retention(r).await?.into_inner())
            }
        })
        .await
    }

    /// `Cluster.Status` of whichever node answers first, retried.
    pub async fn status(&self) -> Result<pb::StatusResponse, ClientError> {
        self.call(Route::Any, |channel, remaining| {
            let mut r = Request::new(pb::StatusRequest {});
            r.set_timeout(remaining);
            async move { Ok(ClusterClient::new(channel).status(r).await?.into_inner()) }
        })
        .await
    }

    /// Subscribes to many conversations on one `SubscribeMany` stream, each from its
    /// `from_seq` (0 is read as 1). Returns once a node accepted the stream (retried
    /// within `request_timeout`); see [`Subscription`] for what it delivers and how it
    /// resumes.
    ///
    /// Errors: [`ClientError::InvalidArgument`] (a conversation id, too many
    /// conversations), or the last error if no node accepted the stream in time.
    pub async fn subscribe(&self, conversations: Vec<(String, u64)>) -> Result<Subscription, ClientError> {
        Subscription::open(self.clone(), conversations).await
    }
}

#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;

    /// A client that has not connected (and has no background task).
    pub(crate) fn offline_client() -> Client {
        Client::unconnected(ClientConfig::new(["http://127.0.0.1:1"])).0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_with_jitter() {
        let mut b = Backoff::new();
        let pauses: Vec<Duration> = (0..10).map(|_| b.next_pause()).collect();
        assert!(pauses[0] >= Duration::from_millis(5) && pauses[0] <= Duration::from_millis(10));
        assert!(pauses[1] >= Duration::from_millis(10) && pauses[1] <= Duration::from_millis(20));
        assert!(pauses.iter().all(|p| *p <= BACKOFF_MAX));
        assert!(pauses[9] >= BACKOFF_MAX / 2);
        b.reset();
        assert!(b.next_pause() <= BACKOFF_FIRST);
    }

    #[test]
    fn topology_maps_shards_to_leader_endpoints() {
        let t = Topology::from_status(pb::StatusResponse {
            node_id: 1,
            nodes: vec![
                pb::NodeStatus { id: 1, addr: "127.0.0.1:1".into(), alive: true },
                pb::NodeStatus { id: 2, addr: "127.0.0.1:2".into(), alive: false },
            ],
            shards: vec![
                pb::ShardStatus { shard: 0, leader: 2, ..Default::default() },
                pb::ShardStatus { shard: 1, leader: 0, ..Default::default() },
            ],
            shard_count: 2,
        });
        let conv0 = (0..).map(|i| format!("c{i}")).find(|c| shard_of(c, 2) == 0).unwrap_or_default();
        let conv1 = (0..).map(|i| format!("c{i}")).find(|c| shard_of(c, 2) == 1).unwrap_or_default();
        assert_eq!(t.leader_addr(&conv0), Some("http://127.0.0.1:2"));
        assert_eq!(t.leader_addr(&conv1), None, "no leader known");
        assert_eq!(t.alive, vec!["http://127.0.0.1:1".to_string()]);
    }

    #[test]
    fn message_ids_are_16_random_bytes() {
        let mut e = pb::Envelope::default();
        ensure_message_id(&mut e);
        assert_eq!(e.message_id.len(), 16);
        let kept = e.message_id.clone();
        ensure_message_id(&mut e);
        assert_eq!(e.message_id, kept, "a set id is kept");
        assert_ne!(new_message_id(), new_message_id());
    }
}
