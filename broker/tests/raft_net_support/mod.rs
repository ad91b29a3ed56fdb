//! Fixtures for the Raft transport tests: in-process nodes, each with the real WAL log
//! store, the real sled state machine, and a real tonic server on `127.0.0.1:0`, talking
//! to each other only through `habar_broker::raft_net`.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use bytes::Bytes;
use habar_broker::raft_net::FaultInjector;
use habar_broker::raft_net::GroupRegistry;
use habar_broker::raft_net::NetworkFactory;
use habar_broker::raft_net::PeerPool;
use habar_broker::raft_net::RaftTransportService;
use habar_broker::raft_net::SnapshotSink;
use habar_broker::raft_net::MAX_MESSAGE_BYTES;
use habar_proto::raft::raft_transport_server::RaftTransport;
use habar_proto::raft::raft_transport_server::RaftTransportServer;
use habar_proto::raft::RaftMessage;
use habar_proto::raft::SnapshotChunk;
use habar_raft_store::types::Appended;
use habar_raft_store::types::Command;
use habar_raft_store::types::GroupId;
use habar_raft_store::types::NewEnvelope;
use habar_raft_store::types::NodeAddr;
use habar_raft_store::types::NodeId;
use habar_raft_store::types::Raft;
use habar_raft_store::GroupStateMachine;
use habar_raft_store::LogStore;
use habar_raft_store::StateStore;
use habar_raft_store::Wal;
use habar_raft_store::WalConfig;
use openraft::async_runtime::WatchReceiver;
use openraft::RaftMetrics;
use openraft::ServerState;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_stream::wrappers::TcpListenerStream;

pub type HRaft = Raft<GroupStateMachine>;

/// A copy of the group's current metrics.
pub fn metrics(raft: &HRaft) -> RaftMetrics<habar_raft_store::types::TypeConfig> {
    raft.metrics().borrow_watched().clone()
}

/// Upper bound on any wait in these tests: only to fail instead of hanging, never a
/// timing assertion.
pub const PATIENCE: Duration = Duration::from_secs(60);

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Election settings fast enough for tests, slow enough for a loaded 2-core machine.
pub fn raft_config() -> openraft::Config {
    openraft::Config {
        cluster_name: "habar-test".into(),
        heartbeat_interval: 50,
        election_timeout_min: 400,
        election_timeout_max: 800,
        install_snapshot_timeout: 2000,
        enable_pre_vote: Some(true),
        ..Default::default()
    }
}

/// The real store behind a counter of the snapshots this node received over the wire.
#[derive(Clone)]
pub struct CountingSink {
    pub store: StateStore,
    pub received: Arc<AtomicUsize>,
}

impl SnapshotSink for CountingSink {
    type Writer = habar_raft_store::SnapshotWriter;

    fn snapshot_writer(&self, group: GroupId) -> io::Result<Self::Writer> {
        self.received.fetch_add(1, Ordering::SeqCst);
        self.store.snapshot_writer(group).map_err(io::Error::from)
    }
}

/// What a node's transport received, counted by [`Counted`].
#[derive(Clone, Default)]
pub struct Received {
    /// `AppendStream` calls it took.
    pub streams: Arc<AtomicUsize>,
    /// Unary `AppendEntries` calls.
    pub unary_appends: Arc<AtomicUsize>,
}

/// A node's transport service behind counters; `legacy` answers `AppendStream` with
/// UNIMPLEMENTED, as a node of a version before it does.
pub struct Counted<T> {
    inner: T,
    legacy: bool,
    received: Received,
}

type Req<T> = tonic::Request<T>;
type Reply = Result<tonic::Response<RaftMessage>, tonic::Status>;

#[tonic::async_trait]
impl<T: RaftTransport> RaftTransport for Counted<T> {
    type AppendStreamStream = T::AppendStreamStream;

    async fn append_entries(&self, r: Req<RaftMessage>) -> Reply {
        self.received.unary_appends.fetch_add(1, Ordering::SeqCst);
        self.inner.append_entries(r).await
    }
    async fn append_stream(
        &self,
        r: Req<tonic::Streaming<RaftMessage>>,
    ) -> Result<tonic::Response<Self::AppendStreamStream>, tonic::Status> {
        if self.legacy {
            return Err(tonic::Status::unimplemented("unknown method AppendStream"));
        }
        self.received.streams.fetch_add(1, Ordering::SeqCst);
        self.inner.append_stream(r).await
    }
    async fn vote(&self, r: Req<RaftMessage>) -> Reply {
        self.inner.vote(r).await
    }
    async fn pre_vote(&self, r: Req<RaftMessage>) -> Reply {
        self.inner.pre_vote(r).await
    }
    async fn transfer_leader(&self, r: Req<RaftMessage>) -> Reply {
        self.inner.transfer_leader(r).await
    }
    async fn install_snapshot(&self, r: Req<tonic::Streaming<SnapshotChunk>>) -> Reply {
        self.inner.install_snapshot(r).await
    }
}

/// How [`start_cluster_with`] builds its nodes.
#[derive(Clone)]
pub struct ClusterOpts {
    /// Every node's pool consults the cluster's [`FaultInjector`].
    pub fault_injector: bool,
    /// Nodes whose transport does not know `AppendStream`.
    pub legacy: Vec<NodeId>,
}

impl Default for ClusterOpts {
    fn default() -> Self {
        Self { fault_injector: true, legacy: Vec::new() }
    }
}

pub struct TestNode {
    pub id: NodeId,
    /// What its transport received.
    pub received: Received,
    pub addr: SocketAddr,
    pub wal: Wal,
    pub store: StateStore,
    pub pool: PeerPool,
    pub registry: GroupRegistry<GroupStateMachine>,
    pub rafts: Vec<HRaft>,
    /// Snapshot streams this node started receiving.
    pub snapshots_received: Arc<AtomicUsize>,
    /// Ends the `AppendStream`s this node serves (as the node's own `stopping` does).
    stopping: tokio::sync::watch::Sender<bool>,
    stop: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<Result<(), tonic::transport::Error>>>,
}

impl TestNode {
    pub fn raft(&self, group: GroupId) -> &HRaft {
        &self.rafts[group as usize]
    }

    pub async fn shutdown(&mut self) {
        self.stopping.send_replace(true);
        for r in &self.rafts {
            let _ = r.shutdown().await;
        }
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.server.take() {
            let _ = t.await;
        }
    }
}

pub struct TestCluster {
    pub nodes: Vec<TestNode>,
    pub faults: FaultInjector,
    pub groups: u32,
    pub dir: tempfile::TempDir,
}

/// Starts `n` nodes (ids 1..=n) with `groups` Raft groups each. Every group is
/// initialized on node 1 with all nodes as voters.
pub async fn start_cluster(n: u64, groups: u32, config: openraft::Config, seed: u64) -> TestCluster {
    start_cluster_with(n, groups, config, seed, ClusterOpts::default()).await
}

/// [`start_cluster`] with options.
pub async fn start_cluster_with(
    n: u64,
    groups: u32,
    config: openraft::Config,
    seed: u64,
    opts: ClusterOpts,
) -> TestCluster {
    init_tracing();
    let config = Arc::new(config.validate().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let faults = FaultInjector::new(seed);

    let mut listeners = Vec::new();
    let mut members = BTreeMap::new();
    for id in 1..=n {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        members.insert(id, NodeAddr::new(l.local_addr().unwrap().to_string()));
        listeners.push((id, l));
    }

    let mut nodes = Vec::new();
    for (id, listener) in listeners {
        let addr = listener.local_addr().unwrap();
        let ndir = dir.path().join(format!("n{id}"));
        let wal = Wal::open(WalConfig::new(ndir.join("wal"))).unwrap();
        let store = StateStore::open(&ndir.join("sm"), 8 << 20).unwrap();
        let pool = match opts.fault_injector {
            true => PeerPool::new(id).with_fault_injector(faults.clone()),
            false => PeerPool::new(id),
        };
        let registry = GroupRegistry::new();
        let mut rafts = Vec::new();
        for g in 0..groups {
            let raft = openraft::Raft::new(
                id,
                config.clone(),
                NetworkFactory::new(pool.clone(), g),
                LogStore::new(wal.clone(), g),
                store.group(g).unwrap(),
            )
            .await
            .unwrap();
            registry.insert(g, raft.clone());
            rafts.push(raft);
        }
        let snapshots = Arc::new(AtomicUsize::new(0));
        let sink = CountingSink { store: store.clone(), received: snapshots.clone() };
        let received = Received::default();
        let stopping = tokio::sync::watch::channel(false).0;
        let counted = Counted {
            inner: RaftTransportService::new(registry.clone(), sink).with_stopping(stopping.subscribe()),
            legacy: opts.legacy.contains(&id),
            received: received.clone(),
        };
        let service = RaftTransportServer::new(counted)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let (tx, rx) = oneshot::channel::<()>();
        let server =
            tokio::spawn(tonic::transport::Server::builder().add_service(service).serve_with_incoming_shutdown(
                TcpListenerStream::new(listener),
                async {
                    let _ = rx.await;
                },
            ));
        nodes.push(TestNode {
            id,
            addr,
            wal,
            store,
            pool,
            registry,
            rafts,
            snapshots_received: snapshots,
            received,
            stopping,
            stop: Some(tx),
            server: Some(server),
        });
    }
    for g in 0..groups {
        nodes[0].raft(g).initialize(members.clone()).await.unwrap();
    }
    TestCluster { nodes, faults, groups, dir }
}

impl TestCluster {
    pub fn node(&self, id: NodeId) -> &TestNode {
        self.nodes.iter().find(|n| n.id == id).unwrap()
    }

    pub fn ids(&self) -> Vec<NodeId> {
        self.nodes.iter().map(|n| n.id).collect()
    }

    /// Waits until one of `among` leads `group` and every node of `among` follows it.
    pub async fn wait_leader(&self, group: GroupId, among: &[NodeId]) -> NodeId {
        self.wait_leader_where(group, among, |_| true).await
    }

    /// As [`wait_leader`], for a leader that satisfies `ok`.
    pub async fn wait_leader_where(&self, group: GroupId, among: &[NodeId], ok: impl Fn(NodeId) -> bool) -> NodeId {
        let start = Instant::now();
        loop {
            for &id in among {
                let m = metrics(self.node(id).raft(group));
                if m.state == ServerState::Leader
                    && ok(id)
                    && among.iter().all(|&o| metrics(self.node(o).raft(group)).current_leader == Some(id))
                {
                    return id;
                }
            }
            assert!(start.elapsed() < PATIENCE, "group {group}: no leader among {among:?} that everyone follows");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Appends one envelope to `group` through its leader among `among`, retrying through
    /// elections.
    pub async fn append(&self, group: GroupId, among: &[NodeId], env: NewEnvelope) -> Appended {
        let start = Instant::now();
        loop {
            let leader = self.wait_leader(group, among).await;
            let cmd = Command::Append { now_ms: 1_700_000_000_000, envelopes: vec![env.clone()] };
            match self.node(leader).raft(group).client_write(cmd).await {
                Ok(resp) => match resp.data {
                    habar_raft_store::types::CommandResponse::Appended(a) if a.len() == 1 => return a[0],
                    other => panic!("group {group}: append answered {other:?}"),
                },
                Err(e) => {
                    assert!(start.elapsed() < PATIENCE, "group {group}: append keeps failing: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    /// Waits until node `id` has applied `conversation` up to `seq`.
    pub async fn wait_applied(&self, id: NodeId, group: GroupId, conversation: &str, seq: u64) {
        let start = Instant::now();
        loop {
            if self.node(id).store.last_seq(group, conversation).unwrap() >= seq {
                return;
            }
            assert!(start.elapsed() < PATIENCE, "node {id} group {group}: {conversation} never reached seq {seq}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Every group appends envelopes 1..=`n` to its conversation `conv-<group>`; then every
    /// node has applied them and reads the same `n` envelopes.
    pub async fn replicate_to_all(&self, n: u64) {
        let all = self.ids();
        for g in 0..self.groups {
            let conv = format!("conv-{g}");
            for i in 1..=n {
                let a = self.append(g, &all, envelope(&conv, i, 100)).await;
                assert_eq!(a.seq, i, "group {g}");
            }
            for &id in &all {
                self.wait_applied(id, g, &conv, n).await;
            }
            let reference = self.node(all[0]).store.read(g, &conv, 1, 100).unwrap();
            assert_eq!(reference.len() as u64, n);
            for &id in &all[1..] {
                assert_eq!(self.node(id).store.read(g, &conv, 1, 100).unwrap(), reference, "node {id} group {g}");
            }
        }
    }

    pub async fn shutdown(mut self) {
        for n in &mut self.nodes {
            n.shutdown().await;
        }
    }
}

pub fn envelope(conversation: &str, n: u64, ciphertext_len: usize) -> NewEnvelope {
    let mut message_id = [0u8; 16];
    message_id[..8].copy_from_slice(&n.to_be_bytes());
    message_id[8..12].copy_from_slice(&(conversation.len() as u32).to_be_bytes());
    NewEnvelope {
        conversation_id: conversation.to_string(),
        message_id,
        sender: "tester".into(),
        ciphertext: Bytes::from(vec![(n % 251) as u8; ciphertext_len]),
        expires_at_ms: 0,
    }
}
