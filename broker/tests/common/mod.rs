//! Shared fixtures for cluster tests: in-process nodes on port 0 over real gRPC, and
//! real `habar serve` child processes.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::path::PathBuf;
use std::process::Child;
use std::process::Command;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use habar_broker::config::NodeConfig;
use habar_broker::node::Node;
use habar_proto::v1 as pb;
use habar_proto::v1::broker_client::BrokerClient;
use habar_proto::v1::cluster_client::ClusterClient;
use openraft::rt::watch::WatchReceiver;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::Channel;

pub struct InProcNode {
    pub id: u64,
    pub addr: SocketAddr,
    pub node: Arc<Node>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl InProcNode {
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops serving and shuts the node's Raft groups down.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

pub struct InProcCluster {
    pub nodes: Vec<InProcNode>,
    pub dir: tempfile::TempDir,
}

/// Starts `n` nodes in this process, each on its own loopback port, and waits until
/// every shard has a leader.
pub async fn start_cluster(n: u64, shards: u32) -> InProcCluster {
    start_cluster_with(n, shards, |_| {}).await
}

/// Like [`start_cluster`], with `tweak` applied to every node's configuration.
pub async fn start_cluster_with(n: u64, shards: u32, tweak: impl Fn(&mut NodeConfig)) -> InProcCluster {
    let dir = tempfile::tempdir().unwrap();
    let mut listeners = Vec::new();
    let mut initial = BTreeMap::new();
    for id in 1..=n {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        initial.insert(id, l.local_addr().unwrap().to_string());
        listeners.push((id, l));
    }
    let mut nodes = Vec::new();
    for (id, listener) in listeners {
        let addr = listener.local_addr().unwrap();
        let mut cfg = NodeConfig::for_test(id, addr, dir.path().join(format!("n{id}")), initial.clone());
        cfg.shards = shards;
        tweak(&mut cfg);
        let node = habar_broker::server::start_node(cfg).await.unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(habar_broker::server::serve_node(node.clone(), listener, async move {
            let _ = rx.await;
        }));
        nodes.push(InProcNode { id, addr, node, stop: Some(tx), task: Some(task) });
    }
    let c = InProcCluster { nodes, dir };
    c.wait_for_leaders(Duration::from_secs(30)).await;
    c
}

impl InProcCluster {
    pub async fn wait_for_leaders(&self, timeout: Duration) {
        let start = Instant::now();
        loop {
            let mut ok = true;
            for n in &self.nodes {
                if n.stop.is_none() {
                    continue;
                }
                for r in &n.node.rafts {
                    if r.metrics().borrow_watched().current_leader.is_none() {
                        ok = false;
                    }
                }
            }
            if ok {
                return;
            }
            assert!(start.elapsed() < timeout, "shards still without a leader after {timeout:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

pub async fn broker(endpoint: &str) -> BrokerClient<Channel> {
    BrokerClient::connect(endpoint.to_string()).await.unwrap()
}

pub async fn cluster_client(endpoint: &str) -> ClusterClient<Channel> {
    ClusterClient::connect(endpoint.to_string()).await.unwrap()
}

pub fn envelope(conversation: &str, n: u64) -> pb::Envelope {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&n.to_be_bytes());
    id[8..].copy_from_slice(&habar_broker::shard::fnv1a64(conversation.as_bytes()).to_be_bytes());
    pb::Envelope {
        conversation_id: conversation.to_string(),
        message_id: id.to_vec().into(),
        sender: format!("sender-{}", n % 3),
        ciphertext: format!("ciphertext {conversation} #{n}").into_bytes().into(),
        expires_at_ms: 0,
    }
}

/// Reads a whole conversation from one node (its replica, as it stands).
pub async fn read_all(client: &mut BrokerClient<Channel>, conversation: &str, stale: bool) -> Vec<pb::StoredEnvelope> {
    let mut out = Vec::new();
    let mut from = 1;
    loop {
        let req = pb::ReadRequest {
            conversation_id: conversation.into(),
            from_seq: from,
            limit: 1000,
            allow_stale: stale,
            ..Default::default()
        };
        let r = read_retrying(client, req).await;
        if r.envelopes.is_empty() {
            return out;
        }
        from = r.envelopes.last().unwrap().seq + 1;
        out.extend(r.envelopes);
    }
}

/// One read, tried again while the answer is transient (`Unavailable`: a leader change or a
/// node still starting; `DeadlineExceeded`) for up to 30 s; any other error, or a transient
/// one past that, fails the test with its status. Tests that kill and restart nodes read
/// through such changes; what they check is the content, not that no read met an election.
pub async fn read_retrying(client: &mut BrokerClient<Channel>, req: pb::ReadRequest) -> pb::ReadResponse {
    let start = Instant::now();
    loop {
        match client.read(req.clone()).await {
            Ok(r) => return r.into_inner(),
            Err(s)
                if matches!(s.code(), tonic::Code::Unavailable | tonic::Code::DeadlineExceeded)
                    && start.elapsed() < Duration::from_secs(30) =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(s) => panic!("read of {:?} from seq {}: {s}", req.conversation_id, req.from_seq),
        }
    }
}

/// A `habar serve` child process.
pub struct ChildNode {
    pub id: u64,
    pub addr: String,
    pub data_dir: PathBuf,
    pub args: Vec<String>,
    pub child: Option<Child>,
}

impl ChildNode {
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn start(&mut self) {
        let log = std::fs::File::create(self.data_dir.with_extension("log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_habar"))
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// SIGKILL: no shutdown path runs.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }
}

impl Drop for ChildNode {
    /// Kills the node; when a test fails (panics), first prints whether the node had exited
    /// and the tail of its log, which goes with the test's temporary directory (a CI failure
    /// of a node that died is otherwise unexplained).
    fn drop(&mut self) {
        if std::thread::panicking() {
            let state = match self.child.as_mut().map(|c| c.try_wait()) {
                Some(Ok(Some(status))) => format!("had exited ({status})"),
                Some(Ok(None)) => "was running".to_string(),
                Some(Err(e)) => format!("state unknown ({e})"),
                None => "was not running (killed by the test)".to_string(),
            };
            let log = std::fs::read_to_string(self.data_dir.with_extension("log")).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!("--- node {} ({}) {state}; the last lines of its log:", self.id, self.addr);
            for line in &lines[lines.len().saturating_sub(40)..] {
                eprintln!("{line}");
            }
        }
        if let Some(mut c) = self.child.take() {
            // Not unwrapped: a second panic while the test's unwinds would abort the report.
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Child-process cluster; `extra` flags go to every node.
pub fn child_cluster(dir: &Path, n: u64, extra: &[&str]) -> Vec<ChildNode> {
    let addrs: Vec<String> = (0..n).map(|_| format!("127.0.0.1:{}", free_port())).collect();
    let initial = addrs.iter().enumerate().map(|(i, a)| format!("{}={a}", i + 1)).collect::<Vec<_>>().join(",");
    (1..=n)
        .map(|id| {
            let data_dir = dir.join(format!("n{id}"));
            let mut args: Vec<String> = vec![
                "serve".into(),
                "--id".into(),
                id.to_string(),
                "--listen".into(),
                addrs[id as usize - 1].clone(),
                "--data-dir".into(),
                data_dir.display().to_string(),
                "--initial-cluster".into(),
                initial.clone(),
            ];
            args.extend(extra.iter().map(|s| s.to_string()));
            ChildNode { id, addr: addrs[id as usize - 1].clone(), data_dir, args, child: None }
        })
        .collect()
}

/// Waits until `Cluster.Status` on `endpoint` shows a leader for every shard.
pub async fn wait_ready(endpoint: &str, timeout: Duration) -> pb::StatusResponse {
    let start = Instant::now();
    loop {
        if let Ok(mut c) = ClusterClient::connect(endpoint.to_string()).await {
            if let Ok(s) = c.status(pb::StatusRequest {}).await {
                let s = s.into_inner();
                if !s.shards.is_empty() && s.shards.iter().all(|sh| sh.leader != 0) {
                    return s;
                }
            }
        }
        assert!(start.elapsed() < timeout, "{endpoint} not ready after {timeout:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
