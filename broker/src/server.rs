//! Runs one node: opens the store, starts every shard's Raft group, serves gRPC (the
//! public API, the Raft transport, forwarding, health and reflection) on one listener.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use std::time::Instant;

use anyhow::Context;
use habar_proto::v1::admin_server::AdminServer;
use habar_proto::v1::broker_server::BrokerServer;
use habar_proto::v1::cluster_server::ClusterServer;
use habar_raft_store::types::NodeAddr;
use habar_raft_store::types::NodeId;
use habar_raft_store::LogStore;
use habar_raft_store::StateStore;
use habar_raft_store::Wal;
use habar_raft_store::WalConfig;
use habar_raft_store::WalError;
use openraft::SnapshotPolicy;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::StreamExt;

use crate::config::NodeConfig;
use crate::forward::ForwardRequest;
use crate::forward::ForwardResponse;
use crate::forward::ForwarderService;
use crate::node::HRaft;
use crate::node::Node;
use crate::raft_net::GroupRegistry;
use crate::raft_net::NetworkFactory;
use crate::raft_net::PeerPool;
use crate::raft_net::RaftTransportService;
use crate::repair::RepairState;
use crate::service::AdminService;
use crate::service::BrokerService;
use crate::service::ClusterService;

/// The openraft settings of every shard, from the node's configuration.
pub fn raft_config(cfg: &NodeConfig) -> anyhow::Result<Arc<openraft::Config>> {
    let c = openraft::Config {
        cluster_name: "habar".into(),
        heartbeat_interval: cfg.heartbeat_interval_ms,
        election_timeout_min: cfg.election_timeout_min_ms,
        election_timeout_max: cfg.election_timeout_max_ms,
        install_snapshot_timeout: cfg.install_snapshot_timeout_ms,
        max_payload_entries: cfg.max_payload_entries,
        // The node decides when a shard builds a snapshot (`Node::trigger_due_snapshots`:
        // entries and bytes since the last one), openraft does not.
        snapshot_policy: SnapshotPolicy::Never,
        max_in_snapshot_log_to_keep: cfg.max_in_snapshot_log_to_keep,
        enable_pre_vote: Some(true),
        // A restarted leader must win a new election (standard Raft). Restoring leadership
        // without one is unsafe here: the state machine is not flushed per apply and the
        // committed id is not waited for, so a leader back from a power cut could serve a
        // "linearizable" read below entries it had committed and acknowledged (found by
        // habar-chaos with power-loss-all; openraft's `enable_leader_restore` docs).
        enable_leader_restore: Some(false),
        // A node repairing after WAL corruption (`repair.rs`) comes back with a shorter log
        // than its leaders recorded as matching. Without this a leader's replication to it
        // stalls for good in release builds (and asserts in debug builds); with it the
        // leader restarts the search for the matching index, keeping what a quorum already
        // accepted. Election safety against such a node is the repair rule (it does not
        // vote until caught up), not this setting.
        allow_log_reversion: Some(true),
        ..Default::default()
    };
    Ok(Arc::new(c.validate().context("invalid Raft settings")?))
}

/// Opens the node's storage and starts its Raft groups. A node with empty storage
/// initializes each shard with `initial_cluster`; a node with data ignores it.
pub async fn start_node(cfg: NodeConfig) -> anyhow::Result<Arc<Node>> {
    habar_raft_store::repair::create_dir_durably(&cfg.data_dir)
        .with_context(|| format!("creating {}", cfg.data_dir.display()))?;
    let mut wal_cfg = WalConfig::new(cfg.data_dir.join("wal"));
    wal_cfg.segment_bytes = cfg.wal_segment_bytes;
    wal_cfg.lose_unsynced_writes = cfg.test_lose_unsynced_wal_writes;
    wal_cfg.slow_warn = Duration::from_millis(cfg.slow_warn_ms);
    if cfg.test_lose_unsynced_wal_writes {
        tracing::warn!("TEST MODE: WAL writes no fsync covered are held in memory and lost if this process dies");
    }
    if cfg.test_clock_offset_ms != 0 {
        tracing::warn!(offset_ms = cfg.test_clock_offset_ms, "TEST MODE: this node's clock is shifted");
    }
    let disk = Arc::new(crate::disk::DiskGuard::new(cfg.data_dir.clone(), cfg.min_free_disk_bytes));
    let clock =
        Arc::new(crate::clock::Clock::new(cfg.test_clock_offset_ms, cfg.max_clock_skew_ms, cfg.initial_cluster.len()));
    let (wal, repair) = open_wal(&cfg, wal_cfg)?;
    let store = StateStore::open(&cfg.data_dir.join("sm"), cfg.sled_cache_capacity_bytes)
        .context("opening the state machine")?;
    store.set_slow_warn(Duration::from_millis(cfg.slow_warn_ms));

    let raft_cfg = raft_config(&cfg)?;
    let pool = PeerPool::new(cfg.id);
    let registry: GroupRegistry<habar_raft_store::GroupStateMachine> = GroupRegistry::new();
    let mut rafts: Vec<HRaft> = Vec::with_capacity(cfg.shards as usize);
    for g in 0..cfg.shards {
        let log = LogStore::new(wal.clone(), g);
        let sm = store.group(g).with_context(|| format!("opening the state machine of shard {g}"))?;
        let network = NetworkFactory::new(pool.clone(), g);
        let raft = openraft::Raft::new(cfg.id, raft_cfg.clone(), network, log, sm)
            .await
            .with_context(|| format!("starting Raft group {g}"))?;
        if repair.is_repairing(g) {
            // No campaign until caught up (`repair.rs`); votes are refused at the transport.
            raft.runtime_config().elect(false);
        }
        registry.insert(g, raft.clone());
        rafts.push(raft);
    }

    let slow_commit = Arc::new(habar_raft_store::slow::SlowLog::new(Duration::from_millis(cfg.slow_warn_ms)));
    let proposers = rafts
        .iter()
        .enumerate()
        .map(|(g, r)| crate::proposer::spawn(g as u32, r.clone(), clock.clone(), slow_commit.clone()))
        .collect();

    let members: BTreeMap<NodeId, NodeAddr> =
        cfg.initial_cluster.iter().map(|(id, addr)| (*id, NodeAddr::new(addr.clone()))).collect();
    for (g, raft) in rafts.iter().enumerate() {
        // A repairing node lost its log: the cluster exists, a leader will bring it back.
        if repair.is_repairing(g as u32) {
            continue;
        }
        if !raft.is_initialized().await.context("reading Raft state")? {
            tracing::info!(shard = g, ?members, "initializing shard with the initial cluster");
            if let Err(e) = raft.initialize(members.clone()).await {
                // Another node's leader may already have replicated to us: not an error.
                tracing::info!(shard = g, error = %e, "initialize skipped");
            }
        }
    }

    let admission = crate::admission::Admission::new(cfg.max_pending_publish_bytes, "publishes in progress");
    let queue_admission =
        crate::admission::Admission::new(cfg.max_pending_publish_bytes, "envelopes queued for its shards' Raft logs");
    Ok(Arc::new(Node {
        id: cfg.id,
        cfg,
        wal,
        store,
        rafts,
        pool,
        registry,
        clock,
        disk,
        repair,
        last_seen: Mutex::new(HashMap::new()),
        signals: tokio::sync::broadcast::channel(crate::node::SIGNAL_CAPACITY).0,
        proposers,
        admission,
        queue_admission,
        stopping: tokio::sync::watch::channel(false).0,
    }))
}

/// Opens the WAL. A corrupt WAL (anything but a torn tail) is moved to `quarantine/` and
/// replaced by an empty one, after the repair marker is written; a node with the marker
/// starts repairing every shard (`repair.rs`).
fn open_wal(cfg: &NodeConfig, wal_cfg: WalConfig) -> anyhow::Result<(Wal, Arc<RepairState>)> {
    use habar_raft_store::repair;
    let dir = &cfg.data_dir;
    let opened = match Wal::open(wal_cfg.clone()) {
        Ok(wal) => Some(wal),
        Err(e @ WalError::Corrupt { .. }) => {
            let marker = repair::RepairMarker { since_unix_ms: repair::now_ms(), reason: e.to_string() };
            // Marker first: a crash after it, at any point, still restarts as repairing.
            repair::write_marker(dir, &marker).context("writing the repair marker")?;
            let moved = repair::quarantine(&dir.join("quarantine"), &wal_cfg.dir).context("quarantining the WAL")?;
            tracing::error!(error = %e, moved = %moved.display(),
                "WAL is corrupt: moved aside; this node rejoins with an empty log and does not vote until it has caught up");
            None
        }
        Err(e) => return Err(anyhow::Error::new(e).context("opening the WAL")),
    };
    let wal = match opened {
        Some(w) => w,
        None => Wal::open(wal_cfg).context("opening a new WAL after quarantine")?,
    };
    let state = match repair::read_marker(dir).context("reading the repair marker")? {
        Some(m) => {
            tracing::warn!(reason = %m.reason, since_unix_ms = m.since_unix_ms, "this node is repairing: it does not vote until caught up");
            RepairState::repairing(dir.clone(), cfg.shards, &m)
        }
        None => RepairState::none(dir.clone()),
    };
    Ok((wal, Arc::new(state)))
}

/// The leader's housekeeping timer (expiry, retention, dedupe trimming).
fn spawn_maintenance(node: Arc<Node>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(node.cfg.maintenance_interval_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            node.maintain_once().await;
        }
    })
}

/// How often the node checks whether a shard's snapshot is due.
const SNAPSHOT_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Starts the snapshot builds that are due (`Node::trigger_due_snapshots`), once a second.
fn spawn_snapshot_trigger(node: Arc<Node>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(SNAPSHOT_CHECK_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut tried = vec![None; node.rafts.len()];
        loop {
            tick.tick().await;
            node.trigger_due_snapshots(&mut tried).await;
        }
    })
}

/// Compacts this node's WAL and snapshots after each applied erasure.
fn spawn_erasure_compactor(node: Arc<Node>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut erasures = node.store.watch_erasures();
        while erasures.changed().await.is_ok() {
            erasures.borrow_and_update();
            node.compact_after_erasure().await;
        }
    })
}

/// Probes each peer once a second: an answer marks it alive (`Cluster.Status` reports
/// liveness from it) and carries its clock, which calibrates this node's (`clock.rs`).
fn spawn_liveness_probe(node: Arc<Node>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let peers: Vec<(NodeId, String)> = node
                .cfg
                .initial_cluster
                .iter()
                .filter(|(id, _)| **id != node.id)
                .map(|(i, a)| (*i, a.clone()))
                .collect();
            for (id, addr) in peers {
                let Ok(channel) = node.pool.channel(id, &addr) else { continue };
                let sent = node.clock.local_ms();
                let deadline = Instant::now() + Duration::from_millis(800);
                if let Ok(ForwardResponse::Clock { local_ms }) =
                    crate::forward::call(channel, 0, &ForwardRequest::Clock, deadline).await
                {
                    node.clock.observe(id, sent, local_ms, node.clock.local_ms());
                    node.last_seen.lock().unwrap_or_else(|p| p.into_inner()).insert(id, Instant::now());
                }
            }
            node.clock.report();
        }
    })
}

/// Checks free disk space once a second (`disk.rs`); a node that became full hands the
/// leadership of its shards to a live peer.
fn spawn_disk_guard(node: Arc<Node>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let guard = node.disk.clone();
            let became = tokio::task::spawn_blocking(move || guard.check()).await.ok().flatten();
            if !node.disk.is_full() {
                continue;
            }
            if became == Some(true) {
                tracing::warn!(id = node.id, "disk full: handing shard leadership to peers");
            }
            // Every tick while full: a shard it still leads (no live peer last time) moves.
            for g in 0..node.shards() {
                if node.is_leader(g) {
                    if let Some(peer) = node.live_peer() {
                        if let Err(e) = node.rafts[g as usize].trigger().transfer_leader(peer).await {
                            tracing::warn!(shard = g, peer, error = %e, "leadership transfer failed");
                        }
                    }
                }
            }
        }
    })
}

/// Serve one node on `listener` until `shutdown` resolves.
pub async fn serve(
    config: NodeConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let node = start_node(config).await?;
    serve_node(node, listener, shutdown).await
}

/// Serves an already started node (tests use this to keep a handle on the node).
pub async fn serve_node(
    node: Arc<Node>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let addr = listener.local_addr().context("listener address")?;
    let (fatal_tx, mut fatal_rx) = tokio::sync::watch::channel::<Option<String>>(None);
    let fatal_watch = spawn_fatal_watch(&node, fatal_tx.clone());
    let stopping = node.clone();
    let shutdown = async move {
        tokio::select! {
            _ = shutdown => {}
            _ = fatal_rx.wait_for(|f| f.is_some()) => {}
        }
        // Streams first: the server's graceful shutdown waits for them to end.
        stopping.stopping.send_replace(true);
    };
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<BrokerServer<BrokerService>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(habar_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building the reflection service")?;

    let gate_node = node.clone();
    let transport = RaftTransportService::new(node.registry.clone(), node.store.clone())
        .with_write_gate(Arc::new(move || gate_node.disk.is_full().then(|| gate_node.disk.refusal(gate_node.id))));
    let vote_node = node.clone();
    let transport = transport
        .with_vote_gate(Arc::new(move |group| vote_node.repair.vote_refusal(vote_node.id, group)))
        .with_stopping(node.stopping.subscribe());
    let repairer = crate::repair::spawn(node.clone());
    let disk_watch = spawn_disk_guard(node.clone());
    let probe = spawn_liveness_probe(node.clone());
    let maintenance = spawn_maintenance(node.clone());
    let compactor = spawn_erasure_compactor(node.clone());
    let snapshots = spawn_snapshot_trigger(node.clone());
    tracing::info!(%addr, id = node.id, shards = node.shards(), "habar node serving");

    let res = tonic::transport::Server::builder()
        // Dead subscribers' connections are found by HTTP/2 pings, not only by writes.
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(
            BrokerServer::new(BrokerService::new(node.clone()))
                .max_decoding_message_size(node.cfg.max_request_bytes)
                .max_encoding_message_size(crate::raft_net::MAX_MESSAGE_BYTES),
        )
        .add_service(ClusterServer::new(ClusterService::new(node.clone())))
        .add_service(AdminServer::new(AdminService::new(node.clone())))
        .add_service(ForwarderService::new(node.clone()).into_server())
        .add_service(transport.into_server())
        .serve_with_incoming_shutdown(accept_nodelay(listener), shutdown)
        .await;
    for w in fatal_watch {
        w.abort();
    }
    probe.abort();
    repairer.abort();
    disk_watch.abort();
    maintenance.abort();
    compactor.abort();
    snapshots.abort();
    for raft in &node.rafts {
        let _ = raft.shutdown().await;
    }
    let flushed = node.store.flush().context("flushing the state machine at shutdown");
    let fatal = fatal_tx.borrow().clone();
    if let Some(why) = fatal {
        anyhow::bail!(
            "stopped because a Raft group failed ({why}); restart the node: it recovers from its files \
             (after freeing space if the disk was full)"
        );
    }
    flushed?;
    res.context("gRPC server")
}

/// Watches every shard's Raft group; the first that stops on an error (a storage error,
/// e.g. ENOSPC from the state machine, or a panic) is reported on `tx`, and the node then
/// shuts down and `serve` fails. A node whose group died would otherwise stay up looking
/// healthy while refusing all replication for that shard until someone restarts it; exiting
/// lets its supervisor restart it, and recovery from its files is what makes it whole again.
fn spawn_fatal_watch(
    node: &Arc<Node>,
    tx: tokio::sync::watch::Sender<Option<String>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    use openraft::rt::watch::WatchReceiver;
    node.rafts
        .iter()
        .enumerate()
        .map(|(g, raft)| {
            let mut metrics = raft.metrics();
            let tx = tx.clone();
            tokio::spawn(async move {
                loop {
                    let state = metrics.borrow_watched().running_state.clone();
                    match state {
                        Ok(()) | Err(openraft::error::Fatal::Stopped) => {}
                        Err(e) => {
                            tracing::error!(shard = g, error = %e, "Raft group stopped on an error: the node shuts down to restart from its files");
                            metrics::counter!("habar_raft_group_failures_total").increment(1);
                            tx.send_if_modified(|f| {
                                if f.is_none() {
                                    *f = Some(format!("shard {g}: {e}"));
                                    true
                                } else {
                                    false
                                }
                            });
                            return;
                        }
                    }
                    if metrics.changed().await.is_err() {
                        return;
                    }
                }
            })
        })
        .collect()
}

/// The accepted connections, each with `TCP_NODELAY` set. tonic ignores its own
/// `tcp_nodelay` setting for a listener passed in (`serve_with_incoming`), so without this
/// every server socket ran Nagle's algorithm: a response written as several small frames
/// (headers, data, trailers) waited for the peer's delayed ACK, up to 40 ms on Linux. That
/// was the 30-45 ms tail of a single publisher (docs/BENCHMARKS.md).
fn accept_nodelay(listener: TcpListener) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    TcpListenerStream::new(listener).map(|conn| {
        if let Ok(stream) = &conn {
            if let Err(e) = stream.set_nodelay(true) {
                tracing::warn!(error = %e, "could not set TCP_NODELAY on an accepted connection");
            }
        }
        conn
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Property: a restarted leader never resumes leadership without an election (the
    /// stale-read bug habar-chaos found after power-loss-all; see `raft_config`).
    #[test]
    fn a_restarted_leader_must_win_a_new_election() {
        let c = raft_config(&NodeConfig::default()).expect("default config is valid");
        assert_eq!(c.enable_leader_restore, Some(false));
        assert_eq!(c.enable_pre_vote, Some(true));
    }

    /// Property: a leader keeps replicating to a node whose log reverted (a node repairing
    /// after corruption); without it, found by habar-chaos `corrupt-wal`, the repaired node
    /// never caught up on some shards.
    #[test]
    fn leaders_replicate_to_a_repaired_node_whose_log_reverted() {
        let c = raft_config(&NodeConfig::default()).expect("default config is valid");
        assert_eq!(c.allow_log_reversion, Some(true));
    }

    /// Property: every connection the node accepts has Nagle's algorithm off (tonic ignores
    /// its own `tcp_nodelay` for a listener passed in; with Nagle on, one response in ~100
    /// waited up to 40 ms for a delayed ACK).
    #[tokio::test]
    async fn accepted_connections_have_nodelay() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let mut incoming = Box::pin(accept_nodelay(listener));
        for _ in 0..3 {
            let _client = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let accepted = incoming.next().await.expect("a connection").expect("accepted");
            assert!(accepted.nodelay().expect("read TCP_NODELAY"), "an accepted connection runs Nagle's algorithm");
        }
    }
}
