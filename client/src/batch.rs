//! Per-node batching of [`Client::publish`](crate::Client::publish) calls.
//!
//! Each target node has one batcher task reading a bounded queue. It takes a permit (at
//! most `max_in_flight_batches` requests in flight), then everything queued up to the
//! envelope and byte bounds, and sends it as one `PublishRequest`; while requests are in
//! flight, new envelopes queue up and form the next batch. Each caller gets back its own
//! `Appended` (the answer is in request order) or the batch's error; retrying is the
//! caller's business (it routes again by the current leader).

use std::sync::Arc;
use std::time::Duration;

use habar_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio::sync::oneshot;
use tokio::sync::OwnedSemaphorePermit;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::Request;
use tonic::Status;

use crate::client::broker_client;
use crate::client::StatsCounters;

/// Slack over a request's own deadline before the batcher gives up on an answer.
const ANSWER_GRACE: Duration = Duration::from_millis(100);

/// One caller's envelope waiting for a batch.
pub(crate) struct Item {
    pub envelope: pb::Envelope,
    /// Encoded size, counted against `max_batch_bytes`.
    pub size: usize,
    pub deadline: Instant,
    pub reply: oneshot::Sender<Result<pb::Appended, Status>>,
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct Settings {
    pub max_envelopes: usize,
    pub max_bytes: usize,
    pub max_in_flight: usize,
    pub linger: Duration,
}

/// Runs until every sender of `queue` is gone (the last `Client` clone dropped).
pub(crate) async fn run(mut queue: mpsc::Receiver<Item>, channel: Channel, s: Settings, stats: Arc<StatsCounters>) {
    let permits = Arc::new(Semaphore::new(s.max_in_flight.max(1)));
    let max_envelopes = s.max_envelopes.max(1);
    // An item that did not fit the previous batch's byte bound opens the next one.
    let mut carry: Option<Item> = None;
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else { return };
        let first = match carry.take() {
            Some(i) => i,
            None => match queue.recv().await {
                Some(i) => i,
                None => return,
            },
        };
        let mut bytes = first.size;
        let mut batch = vec![first];
        let linger_until = (!s.linger.is_zero()).then(|| Instant::now() + s.linger);
        while batch.len() < max_envelopes {
            let next = match queue.try_recv() {
                Ok(i) => Some(i),
                Err(mpsc::error::TryRecvError::Empty) => match linger_until {
                    Some(t) => tokio::time::timeout_at(t, queue.recv()).await.ok().flatten(),
                    None => None,
                },
                Err(mpsc::error::TryRecvError::Disconnected) => None,
            };
            let Some(item) = next else { break };
            if bytes.saturating_add(item.size) > s.max_bytes {
                carry = Some(item);
                break;
            }
            bytes += item.size;
            batch.push(item);
        }
        // Callers that gave up (deadline, cancelled) are not sent.
        batch.retain(|i| !i.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        tokio::spawn(send(batch, channel.clone(), stats.clone(), permit));
    }
}

async fn send(batch: Vec<Item>, channel: Channel, stats: Arc<StatsCounters>, _permit: OwnedSemaphorePermit) {
    let now = Instant::now();
    let deadline = batch.iter().map(|i| i.deadline).max().unwrap_or(now);
    let (envelopes, replies): (Vec<pb::Envelope>, Vec<_>) = batch.into_iter().map(|i| (i.envelope, i.reply)).unzip();
    if deadline <= now {
        for r in replies {
            let _ = r.send(Err(Status::deadline_exceeded("the deadline passed before the batch was sent")));
        }
        return;
    }
    let remaining = deadline - now;
    let n = envelopes.len();
    stats.add_publish_request(n);
    let mut request = Request::new(pb::PublishRequest { envelopes, ephemeral: false });
    request.set_timeout(remaining);
    let mut client = broker_client(channel);
    let result = match tokio::time::timeout(remaining + ANSWER_GRACE, client.publish(request)).await {
        Ok(Ok(answer)) => {
            let appended = answer.into_inner().appended;
            if appended.len() == n {
                Ok(appended)
            } else {
                Err(Status::internal(format!("the server answered {} results for {n} envelopes", appended.len())))
            }
        }
        Ok(Err(status)) => Err(status),
        Err(_) => Err(Status::deadline_exceeded("no answer to the batch within its deadline")),
    };
    match result {
        Ok(appended) => {
            for (reply, a) in replies.into_iter().zip(appended) {
                let _ = reply.send(Ok(a));
            }
        }
        Err(status) => {
            for reply in replies {
                let _ = reply.send(Err(status.clone()));
            }
        }
    }
}
