//! Client settings.

use std::time::Duration;

/// Settings of a [`Client`](crate::Client). Build one with [`ClientConfig::new`], which
/// fills in the defaults, then change the fields you need.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Nodes to start from, as `http://host:port` or `host:port`. Any node of the cluster
    /// will do; the others are learned from `Cluster.Status`.
    pub endpoints: Vec<String>,
    /// Time budget of one call, retries included (default 10 s). Each attempt carries the
    /// time left as its `grpc-timeout`.
    pub request_timeout: Duration,
    /// Time allowed to open a connection to a node, and for one `Cluster.Status` call
    /// (default 2 s).
    pub connect_timeout: Duration,
    /// Most envelopes [`Client::publish`](crate::Client::publish) puts in one request
    /// (default 256; keep it at or below the servers' `max_envelopes_per_request`).
    pub max_batch_envelopes: usize,
    /// Most encoded bytes of envelopes in one batched request (default 1 MiB). An
    /// envelope larger than this goes alone.
    pub max_batch_bytes: usize,
    /// Batched requests in flight to one node for one shard at a time (default 4; batches
    /// are per shard so each becomes one Raft entry). Envelopes published while they are
    /// in flight wait in the queue and form the next batch.
    pub max_in_flight_batches: usize,
    /// How long a batch waits for more envelopes once it has one (default zero: batches
    /// form only from what queued up while earlier requests were in flight).
    pub batch_linger: Duration,
    /// A subscription that received nothing at all (not even a keepalive) for this long
    /// reconnects (default 45 s; servers send keepalives every 15 s by default).
    pub keepalive_timeout: Duration,
    /// How often the background task refreshes the cluster's leaders and nodes from
    /// `Cluster.Status` (default 2 s). It also refreshes right after an `UNAVAILABLE`.
    pub status_refresh: Duration,
}

impl ClientConfig {
    /// Settings with every default, for these endpoints.
    pub fn new<I, S>(endpoints: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ClientConfig {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            request_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(2),
            max_batch_envelopes: 256,
            max_batch_bytes: 1 << 20,
            max_in_flight_batches: 4,
            batch_linger: Duration::ZERO,
            keepalive_timeout: Duration::from_secs(45),
            status_refresh: Duration::from_secs(2),
        }
    }

    /// The capacity of each node's publish queue: room for one full batch per request in
    /// flight, plus one more. A publish waits (within its deadline) while the queue is full.
    pub fn publish_queue_capacity(&self) -> usize {
        self.max_batch_envelopes.max(1).saturating_mul(self.max_in_flight_batches.max(1).saturating_add(1))
    }
}

/// `host:port` becomes `http://host:port`; a trailing `/` is removed.
pub(crate) fn normalize_endpoint(endpoint: &str) -> String {
    let e = endpoint.trim().trim_end_matches('/');
    if e.contains("://") {
        e.to_string()
    } else {
        format!("http://{e}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_get_a_scheme() {
        assert_eq!(normalize_endpoint("127.0.0.1:7000"), "http://127.0.0.1:7000");
        assert_eq!(normalize_endpoint("http://a:1/"), "http://a:1");
        assert_eq!(normalize_endpoint("https://a:1"), "https://a:1");
    }

    #[test]
    fn defaults() {
        let c = ClientConfig::new(["a:1"]);
        assert_eq!(c.request_timeout, Duration::from_secs(10));
        assert_eq!(c.max_batch_envelopes, 256);
        assert_eq!(c.publish_queue_capacity(), 256 * 5);
    }
}
