//! The cluster under test: N `habar serve` child processes on fixed ports, each with its
//! own data directory and log file, which the nemesis kills (SIGKILL), restarts with the
//! same data directory and flags, pauses (SIGSTOP) and resumes (SIGCONT).
//!
//! Children get `PR_SET_PDEATHSIG = SIGKILL`, so they die with the runner even if it is
//! itself SIGKILLed. Linux sends that signal when the *thread* that spawned the child
//! exits: drive a [`ChaosCluster`] from a thread that lives as long as the run (the main
//! future of `#[tokio::main]`, or a test's thread), never from `spawn_blocking`.
//! On drop (normal exit, error, panic unwinding, ctrl-c handled by the caller) every
//! child is resumed (SIGCONT) and killed.
//!
//! With [`NetMode::Netns`] each node runs in its own network namespace on `10.77.<k>.N:7001`
//! (see [`super::netns`]), launched as `ip netns exec <ns> habar serve ...`: ip enters the
//! namespace and execs habar, so the child process *is* habar and kill/pause signal it
//! directly ([`ChaosCluster::wait_ready`] checks `/proc/<pid>/exe`). The namespaces, bridge
//! and rules are removed after the children are killed, on drop.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::path::PathBuf;
use std::process::Child;
use std::process::Command;
use std::process::Stdio;
use std::time::Duration;
use std::time::Instant;

use anyhow::Context;
use habar_proto::v1 as pb;
use habar_proto::v1::cluster_client::ClusterClient;
use tonic::transport::Endpoint;

use super::netns::NetNs;

/// How the nodes are networked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NetMode {
    /// Every node on 127.0.0.1 with its own port (no network faults possible).
    #[default]
    Loopback,
    /// Every node in its own network namespace behind a bridge (network faults possible).
    Netns,
}

impl NetMode {
    pub fn name(self) -> &'static str {
        match self {
            NetMode::Loopback => "loopback",
            NetMode::Netns => "netns",
        }
    }

    pub fn parse(s: &str) -> anyhow::Result<NetMode> {
        match s.trim() {
            "loopback" => Ok(NetMode::Loopback),
            "netns" => Ok(NetMode::Netns),
            other => anyhow::bail!("unknown --net `{other}` (known: loopback, netns)"),
        }
    }
}

/// One node: its fixed address, data directory, log file and (while running) process.
pub struct NodeProc {
    pub id: u64,
    pub addr: String,
    pub data_dir: PathBuf,
    pub log_path: PathBuf,
    child: Option<Child>,
    paused: bool,
    /// Times it was started (1 + restarts).
    pub starts: u32,
}

impl NodeProc {
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// A local cluster whose processes the chaos runner controls.
pub struct ChaosCluster {
    pub nodes: Vec<NodeProc>,
    habar: PathBuf,
    initial: String,
    extra: Vec<String>,
    /// Deleted on drop unless `--keep-data`.
    dir: Option<tempfile::TempDir>,
    pub path: PathBuf,
    /// The nodes' namespaces in [`NetMode::Netns`]; dropped (removed) after the children
    /// are killed (fields drop after `Drop::drop`).
    net: Option<NetNs>,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a pid we spawned and have not reaped yet.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

impl ChaosCluster {
    /// Starts `n` nodes (ids 1..=n) with `extra` flags each, on ports chosen now and kept
    /// across restarts. Does not wait for them: see [`ChaosCluster::wait_ready`].
    pub fn start(n: u64, habar: &Path, extra: &[String], keep_data: bool) -> anyhow::Result<Self> {
        Self::start_with_net(n, habar, extra, keep_data, NetMode::Loopback, 0)
    }

    /// [`ChaosCluster::start`] with a network mode; `run_id` names the namespaces.
    pub fn start_with_net(
        n: u64,
        habar: &Path,
        extra: &[String],
        keep_data: bool,
        mode: NetMode,
        run_id: u64,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!((1..=9).contains(&n), "--nodes {n} is outside 1..=9");
        anyhow::ensure!(habar.exists(), "no habar binary at {} (build it, or pass --habar-bin)", habar.display());
        let net = match mode {
            NetMode::Loopback => None,
            NetMode::Netns => Some(NetNs::setup(run_id, n)?),
        };
        let (dir, path) = crate::spawn::run_dir("habar-chaos-", keep_data)?;
        let (addrs, initial): (Vec<String>, String) = match &net {
            None => {
                let addrs: Vec<String> =
                    (0..n).map(|_| free_port().map(|p| format!("127.0.0.1:{p}"))).collect::<anyhow::Result<_>>()?;
                let initial =
                    addrs.iter().enumerate().map(|(i, a)| format!("{}={a}", i + 1)).collect::<Vec<_>>().join(",");
                (addrs, initial)
            }
            Some(net) => (net.plan.ids().map(|id| net.plan.listen(id)).collect(), net.plan.initial_cluster()),
        };
        let nodes = addrs
            .iter()
            .enumerate()
            .map(|(i, addr)| {
                let id = i as u64 + 1;
                NodeProc {
                    id,
                    addr: addr.clone(),
                    data_dir: path.join(format!("n{id}")),
                    log_path: path.join(format!("n{id}.log")),
                    child: None,
                    paused: false,
                    starts: 0,
                }
            })
            .collect();
        let mut cluster =
            ChaosCluster { nodes, habar: habar.to_path_buf(), initial, extra: extra.to_vec(), dir, path, net };
        for id in cluster.ids() {
            cluster.launch(id)?;
        }
        Ok(cluster)
    }

    pub fn ids(&self) -> Vec<u64> {
        self.nodes.iter().map(|n| n.id).collect()
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.nodes.iter().map(NodeProc::endpoint).collect()
    }

    pub fn node(&self, id: u64) -> anyhow::Result<&NodeProc> {
        self.nodes.iter().find(|n| n.id == id).with_context(|| format!("no node {id}"))
    }

    fn node_mut(&mut self, id: u64) -> anyhow::Result<&mut NodeProc> {
        self.nodes.iter_mut().find(|n| n.id == id).with_context(|| format!("no node {id}"))
    }

    /// Where each node's stderr goes (appended across restarts).
    pub fn log_paths(&self) -> Vec<(u64, PathBuf)> {
        self.nodes.iter().map(|n| (n.id, n.log_path.clone())).collect()
    }

    /// Starts node `id`'s process with its data directory and the cluster's flags.
    fn launch(&mut self, id: u64) -> anyhow::Result<()> {
        let habar = self.habar.clone();
        let initial = self.initial.clone();
        let extra = self.extra.clone();
        let netns_prefix = self.net.as_ref().map(|n| n.exec_prefix(id));
        let node = self.node_mut(id)?;
        anyhow::ensure!(node.child.is_none(), "node {id} is already running");
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log_path)
            .with_context(|| format!("opening {}", node.log_path.display()))?;
        use std::io::Write;
        let _ = writeln!(log, "===== habar-chaos: start #{} of node {id} =====", node.starts + 1);
        let mut cmd = match &netns_prefix {
            None => Command::new(&habar),
            Some(prefix) => {
                let mut c = Command::new("ip");
                c.args(prefix).arg(&habar);
                c
            }
        };
        cmd.arg("serve")
            .args(["--id", &id.to_string(), "--listen", &node.addr, "--initial-cluster", &initial])
            .arg("--data-dir")
            .arg(&node.data_dir)
            .args(&extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().with_context(|| format!("starting {}", habar.display()))?;
        node.child = Some(child);
        node.paused = false;
        node.starts += 1;
        Ok(())
    }

    /// SIGKILL (a crash: nothing is flushed), then reaps the process.
    pub fn kill(&mut self, id: u64) -> anyhow::Result<()> {
        let node = self.node_mut(id)?;
        if let Some(mut child) = node.child.take() {
            signal(child.id(), libc::SIGKILL);
            child.wait().with_context(|| format!("reaping node {id}"))?;
        }
        node.paused = false;
        Ok(())
    }

    /// Restarts a killed node with the same data directory and flags. A node still
    /// running is left alone.
    pub fn restart(&mut self, id: u64) -> anyhow::Result<()> {
        if self.is_running(id) {
            return Ok(());
        }
        // A node that exited by itself left a reapable child behind.
        if let Ok(n) = self.node_mut(id) {
            if let Some(mut c) = n.child.take() {
                let _ = c.wait();
            }
        }
        self.launch(id)
    }

    /// SIGSTOP: the process freezes (no heartbeats, no answers) but keeps its sockets.
    pub fn pause(&mut self, id: u64) -> anyhow::Result<()> {
        let node = self.node_mut(id)?;
        if let Some(c) = &node.child {
            signal(c.id(), libc::SIGSTOP);
            node.paused = true;
        }
        Ok(())
    }

    /// SIGCONT.
    pub fn resume(&mut self, id: u64) -> anyhow::Result<()> {
        let node = self.node_mut(id)?;
        if let Some(c) = &node.child {
            signal(c.id(), libc::SIGCONT);
        }
        node.paused = false;
        Ok(())
    }

    /// The process exists and has not exited (paused or not).
    pub fn is_running(&mut self, id: u64) -> bool {
        match self.node_mut(id) {
            Ok(n) => match &mut n.child {
                Some(c) => matches!(c.try_wait(), Ok(None)),
                None => false,
            },
            Err(_) => false,
        }
    }

    /// Running and not paused.
    pub fn is_alive(&mut self, id: u64) -> bool {
        self.is_running(id) && self.node(id).map(|n| !n.paused).unwrap_or(false)
    }

    /// Nodes that should be running (we did not kill them) but whose process exited:
    /// crashes of the node itself. Each is reaped and reported once, with its exit status.
    pub fn reap_unexpected_exits(&mut self) -> Vec<(u64, String)> {
        let mut out = Vec::new();
        for n in &mut self.nodes {
            if let Some(c) = &mut n.child {
                if let Ok(Some(status)) = c.try_wait() {
                    out.push((n.id, format!("{status} (log: {})", n.log_path.display())));
                    n.child = None;
                    n.paused = false;
                }
            }
        }
        out
    }

    /// The nodes' network namespaces, in [`NetMode::Netns`].
    pub fn net_mut(&mut self) -> Option<&mut NetNs> {
        self.net.as_mut()
    }

    pub fn net_mode(&self) -> NetMode {
        if self.net.is_some() {
            NetMode::Netns
        } else {
            NetMode::Loopback
        }
    }

    /// Heals the network (no cut, no degraded link: every rule and qdisc removed), resumes
    /// every paused node and restarts every node that is down; the ids of restarted or
    /// resumed nodes.
    pub fn heal(&mut self) -> anyhow::Result<Vec<u64>> {
        if let Some(net) = &mut self.net {
            net.heal_all().context("healing the network")?;
        }
        let mut touched = Vec::new();
        for id in self.ids() {
            if self.node(id)?.paused {
                self.resume(id)?;
                touched.push(id);
            }
            if !self.is_running(id) {
                self.restart(id)?;
                touched.push(id);
            }
        }
        Ok(touched)
    }

    /// Node `id`'s `Cluster.Status`, or None if it does not answer within `timeout`.
    pub async fn status(&self, id: u64, timeout: Duration) -> Option<pb::StatusResponse> {
        let endpoint = self.node(id).ok()?.endpoint();
        status_of(&endpoint, timeout).await
    }

    /// How many shards each answering node leads by its own account (`leader == node_id`),
    /// for the nodes that are alive, most first; ties in id order.
    pub async fn leadership(&mut self) -> Vec<(u64, usize)> {
        let mut out = Vec::new();
        for id in self.ids() {
            if !self.is_alive(id) {
                continue;
            }
            if let Some(s) = self.status(id, Duration::from_millis(1000)).await {
                out.push((id, s.shards.iter().filter(|sh| sh.leader == s.node_id).count()));
            }
        }
        out.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        out
    }

    /// Waits until every node answers and every shard has a leader on every node.
    pub async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            let mut ready = true;
            for id in self.ids() {
                match self.status(id, Duration::from_millis(1000)).await {
                    Some(s) if !s.shards.is_empty() && s.shards.iter().all(|sh| sh.leader != 0) => {}
                    _ => ready = false,
                }
            }
            if ready {
                return self.check_pids();
            }
            if start.elapsed() > timeout {
                anyhow::bail!(
                    "the cluster had no leader for every shard on every node within {timeout:?}; node logs: {}",
                    self.log_list()
                );
            }
            if let Some((id, why)) = self.reap_unexpected_exits().into_iter().next() {
                anyhow::bail!("node {id} exited while starting: {why}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// In netns mode, every running child must be the habar process itself (ip execs it),
    /// or kill and pause would hit the wrong process.
    fn check_pids(&self) -> anyhow::Result<()> {
        if self.net.is_none() {
            return Ok(());
        }
        let want = self.habar.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
        for n in &self.nodes {
            let Some(c) = &n.child else { continue };
            let exe = std::fs::read_link(format!("/proc/{}/exe", c.id()))
                .with_context(|| format!("reading /proc/{}/exe of node {}", c.id(), n.id))?;
            let name = exe.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
            anyhow::ensure!(
                name.starts_with(&want),
                "node {}'s child process {} is {} rather than {want}: signals would miss habar",
                n.id,
                c.id(),
                exe.display()
            );
        }
        Ok(())
    }

    /// Waits until, for every shard, some node says it leads it and every node has
    /// applied at least that leader's commit index (so every replica holds every
    /// committed entry). Returns the per-shard commit indexes it waited for.
    pub async fn wait_converged(&mut self, timeout: Duration) -> anyhow::Result<Vec<u64>> {
        let start = Instant::now();
        loop {
            let last_problem = match self.convergence().await {
                Ok(commits) => return Ok(commits),
                Err(p) => p,
            };
            if start.elapsed() > timeout {
                anyhow::bail!(
                    "replicas did not converge within {timeout:?}: {last_problem}; node logs: {}",
                    self.log_list()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn convergence(&self) -> Result<Vec<u64>, String> {
        let mut statuses = Vec::new();
        for id in self.ids() {
            match self.status(id, Duration::from_millis(1000)).await {
                Some(s) => statuses.push(s),
                None => return Err(format!("node {id} does not answer Cluster.Status")),
            }
        }
        let shards = statuses.iter().map(|s| s.shards.len()).max().unwrap_or(0);
        let mut commits = Vec::with_capacity(shards);
        for shard in 0..shards as u32 {
            let leader_view = statuses
                .iter()
                .filter_map(|s| s.shards.iter().find(|sh| sh.shard == shard && sh.leader == s.node_id))
                .max_by_key(|sh| sh.term);
            let Some(leader) = leader_view else { return Err(format!("shard {shard} has no leader")) };
            for s in &statuses {
                let applied = s.shards.iter().find(|sh| sh.shard == shard).map_or(0, |sh| sh.applied_index);
                if applied < leader.commit_index {
                    return Err(format!(
                        "shard {shard}: node {} applied {applied} < leader {}'s commit {}",
                        s.node_id, leader.leader, leader.commit_index
                    ));
                }
            }
            commits.push(leader.commit_index);
        }
        Ok(commits)
    }

    /// `n1: path, n2: path, ...` for error messages.
    pub fn log_list(&self) -> String {
        self.nodes.iter().map(|n| format!("n{}: {}", n.id, n.log_path.display())).collect::<Vec<_>>().join(", ")
    }

    /// Keeps the data directory (and node logs) after the run; returns its path.
    pub fn keep(&mut self) -> PathBuf {
        if let Some(d) = self.dir.take() {
            let _ = d.keep();
        }
        self.path.clone()
    }
}

impl Drop for ChaosCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                signal(c.id(), libc::SIGCONT);
                signal(c.id(), libc::SIGKILL);
                let _ = c.wait();
            }
        }
    }
}

/// `Cluster.Status` of one endpoint, None unless it answers within `timeout`.
pub async fn status_of(endpoint: &str, timeout: Duration) -> Option<pb::StatusResponse> {
    let ep = Endpoint::from_shared(endpoint.to_string()).ok()?.connect_timeout(timeout).timeout(timeout);
    let fut = async {
        let channel = ep.connect().await.ok()?;
        ClusterClient::new(channel).status(pb::StatusRequest {}).await.ok().map(|r| r.into_inner())
    };
    tokio::time::timeout(timeout, fut).await.ok().flatten()
}
