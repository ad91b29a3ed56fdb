//! One cached gRPC channel per peer node, shared by every Raft group and every internal
//! call (Raft transport, forwarding, health probes) of this node.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::RwLock;
use std::time::Duration;

use habar_raft_store::types::NodeId;
use tonic::transport::Channel;
use tonic::transport::Endpoint;

use super::fault::FaultInjector;

/// How long a TCP connect to a peer may take before the call fails as unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// HTTP/2 keep-alive: a peer that stops answering pings is detected even while a long
/// call (a snapshot install) is waiting on it.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// HTTP/2 flow-control windows: large enough that a snapshot stream does not stall small
/// Raft messages of other groups that share the connection for a round trip each.
const STREAM_WINDOW_BYTES: u32 = 4 * 1024 * 1024;
const CONNECTION_WINDOW_BYTES: u32 = 16 * 1024 * 1024;

/// A peer address that cannot become a gRPC endpoint.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("node {node}: address {addr:?} is not a valid host:port: {source}")]
    BadAddress {
        node: NodeId,
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
}

struct Entry {
    addr: String,
    channel: Channel,
}

/// One lazily connected [`Channel`] per peer node, keyed by node id. Cheap to clone; all
/// clones share the channels.
///
/// A channel connects on first use and reconnects by itself after a failure; calls made
/// while the peer is down fail fast with `UNAVAILABLE`. When a membership gives a node a
/// new address, the next call replaces its channel.
#[derive(Clone)]
pub struct PeerPool {
    local: NodeId,
    channels: Arc<RwLock<HashMap<NodeId, Entry>>>,
    faults: Option<FaultInjector>,
}

impl PeerPool {
    /// A pool for node `local` (the sender of every call made through it).
    pub fn new(local: NodeId) -> Self {
        Self { local, channels: Arc::new(RwLock::new(HashMap::new())), faults: None }
    }

    /// A pool whose Raft RPCs consult `faults` first (tests only: partitions, delays,
    /// drops). Without it the check costs one `Option` test per RPC.
    pub fn with_fault_injector(mut self, faults: FaultInjector) -> Self {
        self.faults = Some(faults);
        self
    }

    pub fn local_id(&self) -> NodeId {
        self.local
    }

    pub fn fault_injector(&self) -> Option<&FaultInjector> {
        self.faults.as_ref()
    }

    /// The channel to `node` at `addr` (`host:port`, or a full `http://` URI). Connects
    /// lazily, so this never waits on the network; it must be called within a Tokio
    /// runtime (the channel spawns its connection task).
    pub fn channel(&self, node: NodeId, addr: &str) -> Result<Channel, PeerError> {
        {
            let map = self.channels.read().unwrap_or_else(|p| p.into_inner());
            if let Some(e) = map.get(&node) {
                if e.addr == addr {
                    return Ok(e.channel.clone());
                }
            }
        }
        // Built outside the lock; if two callers race, both channels work and the last
        // one inserted is kept.
        let channel = Self::connect_lazy(node, addr)?;
        let mut map = self.channels.write().unwrap_or_else(|p| p.into_inner());
        match map.get(&node) {
            Some(e) if e.addr == addr => Ok(e.channel.clone()),
            _ => {
                if let Some(old) = map.get(&node) {
                    tracing::info!(node, old = %old.addr, new = %addr, "peer address changed; replacing its channel");
                }
                map.insert(node, Entry { addr: addr.to_string(), channel: channel.clone() });
                Ok(channel)
            }
        }
    }

    /// Drops the cached channel of `node` (e.g. the node left the cluster).
    pub fn forget(&self, node: NodeId) {
        self.channels.write().unwrap_or_else(|p| p.into_inner()).remove(&node);
    }

    /// Nodes with a cached channel, and their addresses.
    pub fn peers(&self) -> Vec<(NodeId, String)> {
        let map = self.channels.read().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = map.iter().map(|(id, e)| (*id, e.addr.clone())).collect();
        v.sort();
        v
    }

    fn connect_lazy(node: NodeId, addr: &str) -> Result<Channel, PeerError> {
        let uri = if addr.starts_with("http://") || addr.starts_with("https://") {
            addr.to_string()
        } else {
            format!("http://{addr}")
        };
        let endpoint = Endpoint::from_shared(uri)
            .map_err(|source| PeerError::BadAddress { node, addr: addr.to_string(), source })?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .initial_stream_window_size(STREAM_WINDOW_BYTES)
            .initial_connection_window_size(CONNECTION_WINDOW_BYTES);
        Ok(endpoint.connect_lazy())
    }
}

impl std::fmt::Debug for PeerPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerPool")
            .field("local", &self.local)
            .field("peers", &self.peers())
            .field("faults", &self.faults.is_some())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn channel_is_cached_per_node_and_replaced_when_the_address_changes() {
        let pool = PeerPool::new(1);
        pool.channel(2, "127.0.0.1:7002").unwrap();
        pool.channel(2, "127.0.0.1:7002").unwrap();
        pool.channel(3, "127.0.0.1:7003").unwrap();
        assert_eq!(pool.peers(), vec![(2, "127.0.0.1:7002".into()), (3, "127.0.0.1:7003".into())]);
        let clone = pool.clone();
        clone.channel(2, "127.0.0.1:9999").unwrap();
        assert_eq!(pool.peers()[0], (2, "127.0.0.1:9999".into()), "clones share the cache");
        pool.forget(3);
        assert_eq!(pool.peers().len(), 1);
    }

    #[tokio::test]
    async fn bad_address_is_an_error_naming_node_and_address() {
        let pool = PeerPool::new(1);
        let err = pool.channel(4, "not a host:port").unwrap_err().to_string();
        assert!(err.contains("node 4") && err.contains("not a host:port"), "{err}");
        assert!(pool.peers().is_empty());
    }
}
