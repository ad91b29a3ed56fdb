//! `habar dev`: a local cluster of `habar serve` child processes on loopback, for a new
//! user's first minutes and for trying failures by hand.

use std::path::PathBuf;
use std::process::Child;
use std::process::Command;
use std::process::Stdio;
use std::time::Duration;
use std::time::Instant;

use anyhow::Context;
use habar_proto::v1 as pb;
use habar_proto::v1::cluster_client::ClusterClient;

#[derive(Debug, Clone, clap::Args)]
pub struct DevArgs {
    /// Where the nodes keep their data (`n1/`, `n2/`, ...) and logs (`n1.log`, ...).
    #[arg(long, default_value = "./habar-dev")]
    pub data_dir: PathBuf,
    #[arg(long, default_value_t = 3)]
    pub nodes: u64,
    /// Node i listens on 127.0.0.1:(base_port + i - 1).
    #[arg(long, default_value_t = 7001)]
    pub base_port: u16,
    /// Shards of a new cluster (ignored when the data dir already holds one).
    #[arg(long, default_value_t = 16)]
    pub shards: u32,
    /// How long to wait for every shard to elect a leader.
    #[arg(long, default_value_t = 60)]
    pub ready_timeout_s: u64,
}

struct DevNode {
    id: u64,
    addr: String,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
}

impl DevNode {
    fn spawn(&mut self) -> anyhow::Result<()> {
        let exe = std::env::current_exe().context("locating the habar binary")?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let child = Command::new(exe)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting node {}", self.id))?;
        self.child = Some(child);
        Ok(())
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) with a pid of a child this process started; no memory is touched.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

/// Stops every child: SIGTERM, then SIGKILL after a grace period.
fn stop_all(nodes: &mut [DevNode]) {
    for n in nodes.iter() {
        if let Some(pid) = n.pid() {
            signal(pid, libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    for n in nodes.iter_mut() {
        if let Some(mut c) = n.child.take() {
            loop {
                match c.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                    _ => {
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                }
            }
        }
    }
}

async fn shard_without_leader(addr: &str) -> Option<String> {
    let mut c = match ClusterClient::connect(format!("http://{addr}")).await {
        Ok(c) => c,
        Err(e) => return Some(format!("not reachable yet ({e})")),
    };
    match c.status(pb::StatusRequest {}).await {
        Ok(s) => {
            let s = s.into_inner();
            s.shards.iter().find(|sh| sh.leader == 0).map(|sh| format!("shard {} has no leader", sh.shard))
        }
        Err(e) => Some(format!("status failed: {}", e.message())),
    }
}

pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.data_dir).with_context(|| format!("creating {}", args.data_dir.display()))?;
    let addrs: Vec<String> = (0..args.nodes).map(|i| format!("127.0.0.1:{}", u64::from(args.base_port) + i)).collect();
    let initial = addrs.iter().enumerate().map(|(i, a)| format!("{}={a}", i + 1)).collect::<Vec<_>>().join(",");
    let mut nodes: Vec<DevNode> = (1..=args.nodes)
        .map(|id| {
            let addr = addrs[id as usize - 1].clone();
            let dir = args.data_dir.join(format!("n{id}"));
            DevNode {
                id,
                args: vec![
                    "serve".into(),
                    "--id".into(),
                    id.to_string(),
                    "--listen".into(),
                    addr.clone(),
                    "--data-dir".into(),
                    dir.display().to_string(),
                    "--initial-cluster".into(),
                    initial.clone(),
                    "--shards".into(),
                    args.shards.to_string(),
                ],
                addr,
                log: args.data_dir.join(format!("n{id}.log")),
                child: None,
            }
        })
        .collect();
    for n in nodes.iter_mut() {
        if let Err(e) = n.spawn() {
            stop_all(&mut nodes);
            return Err(e);
        }
    }

    println!("habar dev: starting {} nodes, data in {}", args.nodes, args.data_dir.display());
    let deadline = Instant::now() + Duration::from_secs(args.ready_timeout_s);
    loop {
        let mut missing = None;
        for n in &nodes {
            if let Some(why) = shard_without_leader(&n.addr).await {
                missing = Some(format!("node {} ({}): {why}; see {}", n.id, n.addr, n.log.display()));
                break;
            }
        }
        let Some(why) = missing else { break };
        let mut exited = None;
        for n in nodes.iter_mut() {
            if let Some(Ok(Some(st))) = n.child.as_mut().map(Child::try_wait) {
                exited = Some(format!("node {} exited during start-up ({st}); see {}", n.id, n.log.display()));
                break;
            }
        }
        if let Some(msg) = exited {
            stop_all(&mut nodes);
            anyhow::bail!(msg);
        }
        if Instant::now() > deadline {
            stop_all(&mut nodes);
            anyhow::bail!("cluster not ready after {}s: {why}", args.ready_timeout_s);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    println!("habar dev: ready. every shard has a leader.");
    for n in &nodes {
        println!("  node {}  http://{}  pid {}  log {}", n.id, n.addr, n.pid().unwrap_or(0), n.log.display());
    }
    let first = &nodes[0].addr;
    let second = nodes.get(1).map_or(first, |n| &n.addr);
    println!("try, in another terminal:");
    println!("  habar publish --endpoint http://{first} --conversation demo --text hello");
    println!("  habar read    --endpoint http://{second} --conversation demo");
    println!("  habar status  --endpoint http://{first}");
    println!("  kill -9 <pid of a node>   # the others keep serving; nothing acknowledged is lost");
    println!("Ctrl-C stops all nodes.");

    let stop = crate::cli::shutdown_signal();
    tokio::pin!(stop);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tick.tick() => {
                for n in nodes.iter_mut() {
                    if let Some(Ok(Some(st))) = n.child.as_mut().map(Child::try_wait) {
                        n.child = None;
                        let exe = std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_else(|_| "habar".into());
                        println!("habar dev: node {} exited ({st}); the others keep serving.", n.id);
                        println!("  restart it with: {exe} {}", n.args.join(" "));
                    }
                }
            }
        }
    }
    println!("habar dev: stopping all nodes");
    stop_all(&mut nodes);
    Ok(())
}
