//! The workload run concurrently with the nemesis: publishers (one envelope at a time,
//! retrying an unknown outcome with the same message id), linearizable readers of whole
//! conversations, and subscribers from seq 1. Everything goes into a [`History`].
//!
//! Randomness comes from the run's seed (one RNG per task), and message ids are
//! `verify::message_id(run_id, counter)` with `counter = publisher << 48 | n`.

use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use habar_client::pb;
use habar_client::Client;
use habar_client::ClientError;
use habar_client::Event;
use habar_proto::v1::broker_client::BrokerClient;
use rand::rngs::StdRng;
use rand::Rng;
use rand::SeedableRng;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tonic::transport::Channel;

use super::history::History;
use super::history::Outcome;
use super::history::PublishOp;
use super::history::FOREIGN;
use crate::verify;

/// Extra attempts of an envelope whose publish had an unknown outcome.
pub const UNKNOWN_RETRIES: u32 = 3;
/// Most pages one read of a conversation follows (1000 envelopes each).
const MAX_PAGES: usize = 10_000;

/// What the workload does.
#[derive(Debug, Clone)]
pub struct WorkloadConfig {
    pub seed: u64,
    pub run_id: u64,
    pub conversations: u32,
    pub publishers: u32,
    pub readers: u32,
    pub subscribers: u32,
}

/// The id of conversation `i` of run `run_id`.
pub fn conversation_name(run_id: u64, i: u32) -> String {
    format!("chaos-{run_id:016x}-{i}")
}

/// The conversation index of a name of this run.
pub fn conversation_index(run_id: u64, name: &str) -> Option<u32> {
    name.strip_prefix(&format!("chaos-{run_id:016x}-"))?.parse().ok()
}

/// A seeded RNG for task `i` of kind `salt`.
fn rng_for(seed: u64, salt: u64, i: u32) -> StdRng {
    StdRng::seed_from_u64(seed ^ salt ^ (u64::from(i) + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// Microseconds since `start`.
pub fn micros(start: Instant) -> u64 {
    start.elapsed().as_micros() as u64
}

/// How a publish attempt ended: INVALID_ARGUMENT is the only definite failure (nothing
/// applied); every other error may hide an applied envelope.
pub fn classify(r: &Result<pb::Appended, ClientError>) -> Outcome {
    match r {
        Ok(a) => Outcome::Ok { seq: a.seq, duplicate: a.duplicate },
        Err(ClientError::InvalidArgument(_)) => Outcome::Failed,
        Err(_) => Outcome::Unknown,
    }
}

/// The running workload.
pub struct Workload {
    pub history: Arc<History>,
    stop_writers: watch::Sender<bool>,
    stop_subscribers: watch::Sender<bool>,
    writers: JoinSet<()>,
    subscribers: JoinSet<()>,
}

impl Workload {
    /// Opens the subscriptions (from seq 1) and starts every task. Times are relative to
    /// `start`.
    pub async fn start(cfg: &WorkloadConfig, client: &Client, start: Instant) -> anyhow::Result<Workload> {
        let history = Arc::new(History::default());
        let (stop_writers, writers_rx) = watch::channel(false);
        let (stop_subscribers, subs_rx) = watch::channel(false);
        let mut subscribers = JoinSet::new();
        for s in 0..cfg.subscribers {
            let convs: Vec<u32> = (0..cfg.conversations).filter(|c| c % cfg.subscribers == s).collect();
            let names = convs.iter().map(|c| (conversation_name(cfg.run_id, *c), 1)).collect();
            {
                let mut log = history.subscribers();
                for c in &convs {
                    log.open(s, *c);
                }
            }
            let sub = client.subscribe(names).await.map_err(|e| anyhow::anyhow!("subscribing: {e}"))?;
            subscribers.spawn(subscriber(s, cfg.run_id, sub, history.clone(), subs_rx.clone()));
        }
        let mut writers = JoinSet::new();
        for p in 0..cfg.publishers {
            writers.spawn(publisher(p, cfg.clone(), client.clone(), history.clone(), start, writers_rx.clone()));
        }
        for r in 0..cfg.readers {
            writers.spawn(reader(r, cfg.clone(), client.clone(), history.clone(), start, writers_rx.clone()));
        }
        Ok(Workload { history, stop_writers, stop_subscribers, writers, subscribers })
    }

    /// Stops publishers and readers (an attempt in flight completes) and waits for them.
    pub async fn stop_writers(&mut self) {
        let _ = self.stop_writers.send(true);
        while self.writers.join_next().await.is_some() {}
    }

    /// Stops the subscribers.
    pub async fn stop_subscribers(&mut self) {
        let _ = self.stop_subscribers.send(true);
        self.subscribers.abort_all();
        while self.subscribers.join_next().await.is_some() {}
    }
}

async fn publisher(
    p: u32,
    cfg: WorkloadConfig,
    client: Client,
    history: Arc<History>,
    start: Instant,
    mut stop: watch::Receiver<bool>,
) {
    let mut rng = rng_for(cfg.seed, 0x9B11_5E00, p);
    let mut n = 0u64;
    while !*stop.borrow() {
        let conv = rng.gen_range(0..cfg.conversations);
        let counter = (u64::from(p) << 48) | n;
        n += 1;
        let mut ciphertext = counter.to_be_bytes().to_vec();
        ciphertext.extend((0..rng.gen_range(8..120)).map(|_| rng.gen::<u8>()));
        let envelope = pb::Envelope {
            conversation_id: conversation_name(cfg.run_id, conv),
            message_id: verify::message_id(cfg.run_id, counter).to_vec().into(),
            sender: String::new(),
            ciphertext: ciphertext.into(),
            expires_at_ms: 0,
        };
        for attempt in 0..=UNKNOWN_RETRIES {
            let invoke_us = micros(start);
            let r = client.publish(envelope.clone()).await;
            let outcome = classify(&r);
            history.publish(PublishOp { counter, conv, invoke_us, complete_us: micros(start), outcome });
            if outcome != Outcome::Unknown || attempt == UNKNOWN_RETRIES || *stop.borrow() {
                break;
            }
            let pause = Duration::from_millis(rng.gen_range(50..250));
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop.changed() => break,
            }
        }
    }
}

async fn reader(
    r: u32,
    cfg: WorkloadConfig,
    client: Client,
    history: Arc<History>,
    start: Instant,
    mut stop: watch::Receiver<bool>,
) {
    let mut rng = rng_for(cfg.seed, 0x4EAD_E400, r);
    while !*stop.borrow() {
        let conv = rng.gen_range(0..cfg.conversations);
        let name = conversation_name(cfg.run_id, conv);
        let invoke_us = micros(start);
        match read_all(&ReadSource::Client(&client), &name, cfg.run_id, false).await {
            Ok((entries, last_seq)) => history.read(conv, invoke_us, micros(start), &entries, last_seq),
            Err(_) => history.read_failed(),
        }
        let pause = Duration::from_millis(rng.gen_range(20..150));
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.changed() => {}
        }
    }
}

async fn subscriber(
    s: u32,
    run_id: u64,
    mut sub: habar_client::Subscription,
    history: Arc<History>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let ev = tokio::select! {
            ev = sub.next() => ev,
            _ = stop.changed() => return,
        };
        let Some(ev) = ev else {
            history.subscribers().ended += 1;
            return;
        };
        match ev {
            Ok(Event::Envelope(e)) => {
                let Some(env) = e.envelope.as_ref() else { continue };
                let conv = conversation_index(run_id, &env.conversation_id).unwrap_or(u32::MAX);
                let counter = verify::counter_of(run_id, &env.message_id).unwrap_or(FOREIGN);
                history.subscribers().deliver(s, conv, e.seq, counter);
            }
            Ok(Event::Removed { conversation_id, from, to }) => {
                let conv = conversation_index(run_id, &conversation_id).unwrap_or(u32::MAX);
                history.subscribers().removed(s, conv, from, to);
            }
            Ok(_) => {}
            Err(_) => history.subscribers().errors += 1,
        }
    }
}

/// Where a read goes: through the client (routed to the leader, retried) or straight to
/// one node (for its local replica with `allow_stale`).
pub enum ReadSource<'a> {
    Client(&'a Client),
    Node(BrokerClient<Channel>),
}

impl ReadSource<'_> {
    async fn read(&self, req: pb::ReadRequest) -> anyhow::Result<pb::ReadResponse> {
        match self {
            ReadSource::Client(c) => c.read(req).await.map_err(|e| anyhow::anyhow!("{e}")),
            ReadSource::Node(n) => {
                let mut n = n.clone();
                let mut r = tonic::Request::new(req);
                r.set_timeout(Duration::from_secs(10));
                Ok(n.read(r).await.map_err(|e| anyhow::anyhow!("{}: {}", e.code(), e.message()))?.into_inner())
            }
        }
    }
}

/// A whole conversation from seq 1, page by page: `(seq, counter)` in the order returned
/// and the last page's `last_seq`.
pub async fn read_all(
    src: &ReadSource<'_>,
    name: &str,
    run_id: u64,
    allow_stale: bool,
) -> anyhow::Result<(Vec<(u64, u64)>, u64)> {
    let mut out = Vec::new();
    let mut from = 1;
    for _ in 0..MAX_PAGES {
        let r = src
            .read(pb::ReadRequest {
                conversation_id: name.to_string(),
                from_seq: from,
                limit: 1000,
                allow_stale,
                ..Default::default()
            })
            .await?;
        for e in &r.envelopes {
            let id = e.envelope.as_ref().map(|x| x.message_id.as_ref()).unwrap_or(&[]);
            out.push((e.seq, verify::counter_of(run_id, id).unwrap_or(FOREIGN)));
        }
        match r.envelopes.last() {
            Some(last) if !r.end && last.seq >= from => from = last.seq + 1,
            _ => return Ok((out, r.last_seq)),
        }
    }
    anyhow::bail!("{name}: more than {MAX_PAGES} pages")
}
