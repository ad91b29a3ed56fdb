//! `habar dev`: a local cluster of `habar serve` child processes on loopback, for a new
//! user's first minutes and for trying failures by hand.
//!
//! The layout (node count, ports, shards) is saved in `<data-dir>/habar-dev.toml`, so
//! running `habar dev` again on the same directory restarts the same cluster.
//!
//! Children never outlive the supervisor: it stops them on Ctrl-C/SIGTERM, on any error and
//! when it unwinds (a drop guard); on Linux they also get SIGTERM from the kernel if the
//! supervisor dies without cleaning up (`PR_SET_PDEATHSIG`).

use std::io::Write;
use std::path::Path;
use std::path::PathBuf;
use std::process::Child;
use std::process::Command;
use std::process::Stdio;
use std::time::Duration;
use std::time::Instant;
use std::time::SystemTime;
use std::time::UNIX_EPOCH;

use anyhow::Context;
use habar_proto::v1 as pb;
use habar_proto::v1::cluster_client::ClusterClient;
use serde::Deserialize;
use serde::Serialize;

const DEFAULT_NODES: u64 = 3;
const DEFAULT_BASE_PORT: u16 = 7001;
const DEFAULT_SHARDS: u32 = 16;
const MAX_NODES: u64 = 9;
/// How long a child gets to stop after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Bounds on one readiness probe, so a hung node cannot stall the start-up wait.
const PROBE_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
const LAYOUT_FILE: &str = "habar-dev.toml";

#[derive(Debug, Clone, clap::Args)]
pub struct DevArgs {
    /// Where the nodes keep their data (`n1/`, `n2/`, ...) and logs (`n1.log`, ...).
    #[arg(long, default_value = "./habar-dev")]
    pub data_dir: PathBuf,
    /// Number of nodes (1..=9) of a new cluster [default: 3, or the saved layout].
    #[arg(long)]
    pub nodes: Option<u64>,
    /// Node i listens on 127.0.0.1:(base_port + i - 1) [default: 7001, or the saved layout].
    #[arg(long)]
    pub base_port: Option<u16>,
    /// Shards of a new cluster [default: 16, or the saved layout].
    #[arg(long)]
    pub shards: Option<u32>,
    /// How long to wait for every shard of every node to know a leader, seconds.
    #[arg(long, default_value_t = 60)]
    pub ready_timeout_s: u64,
}

/// What `habar dev` created in a data dir; reused when it runs there again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevLayout {
    pub nodes: u64,
    pub base_port: u16,
    pub shards: u32,
}

impl DevLayout {
    /// The saved layout of `dir` if any, else one from the arguments and defaults. An
    /// argument that contradicts the saved layout is an error (the nodes' storage already
    /// holds a cluster of that shape).
    pub fn resolve(dir: &Path, args: &DevArgs) -> anyhow::Result<(Self, bool)> {
        let path = dir.join(LAYOUT_FILE);
        let saved = match std::fs::read_to_string(&path) {
            Ok(text) => Some(
                toml::from_str::<DevLayout>(&text)
                    .with_context(|| format!("reading {} (delete the data dir to start afresh)", path.display()))?,
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let layout = match saved {
            Some(s) => {
                let given = [
                    ("--nodes", args.nodes.map(|v| v.to_string()), s.nodes.to_string()),
                    ("--base-port", args.base_port.map(|v| v.to_string()), s.base_port.to_string()),
                    ("--shards", args.shards.map(|v| v.to_string()), s.shards.to_string()),
                ];
                for (flag, arg, have) in given {
                    if let Some(arg) = arg {
                        if arg != have {
                            anyhow::bail!(
                                "{flag} {arg}: {} holds a cluster with {flag} {have}; drop the flag to restart it, \
                                 or use another --data-dir for a new cluster",
                                dir.display()
                            );
                        }
                    }
                }
                s
            }
            None => DevLayout {
                nodes: args.nodes.unwrap_or(DEFAULT_NODES),
                base_port: args.base_port.unwrap_or(DEFAULT_BASE_PORT),
                shards: args.shards.unwrap_or(DEFAULT_SHARDS),
            },
        };
        layout.validate()?;
        Ok((layout, saved.is_some()))
    }

    fn validate(&self) -> anyhow::Result<()> {
        if !(1..=MAX_NODES).contains(&self.nodes) {
            anyhow::bail!("--nodes {} is outside 1..={MAX_NODES}", self.nodes);
        }
        if self.base_port == 0 || u64::from(self.base_port) + self.nodes - 1 > u64::from(u16::MAX) {
            anyhow::bail!(
                "--base-port {}: {} nodes need ports {}..={}, which do not fit in 1..=65535",
                self.base_port,
                self.nodes,
                self.base_port,
                u64::from(self.base_port) + self.nodes - 1
            );
        }
        if !(1..=1024).contains(&self.shards) {
            anyhow::bail!("--shards {} is outside 1..=1024", self.shards);
        }
        Ok(())
    }

    fn save(&self, dir: &Path) -> anyhow::Result<()> {
        let text = format!(
            "# Written by `habar dev`: the shape of the cluster in this directory.\n{}",
            toml::to_string(self).context("writing the dev layout")?
        );
        // Write then rename, so a crash never leaves a half-written layout behind.
        let tmp = dir.join(format!("{LAYOUT_FILE}.tmp"));
        std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, dir.join(LAYOUT_FILE)).with_context(|| format!("renaming {}", tmp.display()))?;
        Ok(())
    }

    pub fn addr(&self, id: u64) -> String {
        format!("127.0.0.1:{}", u64::from(self.base_port) + id - 1)
    }
}

/// Prints a line; a closed stdout (e.g. piped into `head`) must not kill the supervisor
/// before it has stopped its children, so write errors are ignored.
macro_rules! say {
    ($($arg:tt)*) => {{
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, $($arg)*);
        let _ = out.flush();
    }};
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
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
        writeln!(log, "=== habar dev: starting node {} at unix ms {now_ms}: habar {}", self.id, self.args.join(" "))
            .with_context(|| format!("writing {}", self.log.display()))?;
        let mut cmd = Command::new(exe);
        cmd.args(&self.args).stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        #[cfg(unix)]
        {
            use std::os::unix::process::CommandExt;
            // Its own process group: a Ctrl-C at the terminal reaches only the supervisor,
            // which then stops the nodes in order (SIGTERM, then SIGKILL).
            cmd.process_group(0);
            #[cfg(target_os = "linux")]
            {
                // SAFETY: getpid is async-signal-safe.
                let supervisor = unsafe { libc::getpid() };
                // SAFETY: runs in the forked child before exec and only calls the
                // async-signal-safe prctl and getppid. The death signal fires when the thread
                // that forked exits; children are spawned from the thread running
                // `dev::run` (the main thread under `block_on`), which lives until the end.
                unsafe {
                    cmd.pre_exec(move || {
                        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        // The supervisor may have died before prctl took effect.
                        if libc::getppid() != supervisor {
                            return Err(std::io::Error::other("habar dev exited while starting this node"));
                        }
                        Ok(())
                    });
                }
            }
        }
        let child = cmd.spawn().with_context(|| format!("starting node {}", self.id))?;
        self.child = Some(child);
        Ok(())
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Reaps the child if it has exited, returning how it ended.
    fn exited(&mut self) -> Option<String> {
        let st = match self.child.as_mut()?.try_wait() {
            Ok(Some(st)) => st.to_string(),
            Ok(None) => return None,
            Err(e) => format!("cannot be waited for ({e})"),
        };
        self.child = None;
        Some(st)
    }
}

/// All children; dropping it stops them.
struct Cluster {
    nodes: Vec<DevNode>,
}

impl Cluster {
    /// Stops every child still running: SIGTERM, then SIGKILL after a grace period.
    fn stop_all(&mut self) {
        for n in self.nodes.iter_mut() {
            // Reap first: a pid is only signalled while it is certainly still our child.
            if n.exited().is_none() {
                if let Some(pid) = n.pid().and_then(|p| i32::try_from(p).ok()) {
                    // SAFETY: kill(2) on the pid of our own unreaped child; no memory is touched.
                    unsafe {
                        libc::kill(pid, libc::SIGTERM);
                    }
                }
            }
        }
        let deadline = Instant::now() + STOP_GRACE;
        for n in self.nodes.iter_mut() {
            while n.child.is_some() {
                if n.exited().is_some() {
                    break;
                }
                if Instant::now() >= deadline {
                    if let Some(mut c) = n.child.take() {
                        say!("habar dev: node {} did not stop in {STOP_GRACE:?}; killing it", n.id);
                        let _ = c.kill();
                        let _ = c.wait();
                    }
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// Why `addr` is not ready yet (`None` = it knows a leader for each of its shards).
async fn not_ready(addr: &str, shards: u32) -> Option<String> {
    let endpoint = match tonic::transport::Endpoint::from_shared(format!("http://{addr}")) {
        Ok(e) => e.connect_timeout(PROBE_CONNECT_TIMEOUT).timeout(PROBE_TIMEOUT),
        Err(e) => return Some(format!("bad address ({e})")),
    };
    let channel = match endpoint.connect().await {
        Ok(c) => c,
        Err(e) => return Some(format!("not reachable yet ({})", crate::cli::error_chain(&e))),
    };
    let s = match ClusterClient::new(channel).status(pb::StatusRequest {}).await {
        Ok(s) => s.into_inner(),
        Err(e) => return Some(format!("Status failed: {:?}: {}", e.code(), e.message())),
    };
    if s.shard_count != shards {
        return Some(format!("reports {} shards, expected {shards}", s.shard_count));
    }
    for g in 0..shards {
        match s.shards.iter().find(|sh| sh.shard == g) {
            None => return Some(format!("shard {g} is missing from its status")),
            Some(sh) if sh.leader == 0 => return Some(format!("shard {g} has no leader yet")),
            Some(_) => {}
        }
    }
    None
}

pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    // Listen for Ctrl-C/SIGTERM from the start, so a stop during start-up is orderly too.
    let stop = crate::cli::shutdown_signal();
    tokio::pin!(stop);

    let dir = &args.data_dir;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let (layout, existing) = DevLayout::resolve(dir, &args)?;
    layout.save(dir)?;
    let initial = (1..=layout.nodes).map(|id| format!("{id}={}", layout.addr(id))).collect::<Vec<_>>().join(",");
    let mut cluster = Cluster {
        nodes: (1..=layout.nodes)
            .map(|id| {
                // `HABAR_WORKER_THREADS` if set, else 1.
                let worker_threads = std::env::var("HABAR_WORKER_THREADS").unwrap_or_else(|_| "1".into());
                let addr = layout.addr(id);
                let node_dir = dir.join(format!("n{id}"));
                DevNode {
                    id,
                    args: vec![
                        "serve".into(),
                        "--id".into(),
                        id.to_string(),
                        "--listen".into(),
                        addr.clone(),
                        "--data-dir".into(),
                        node_dir.display().to_string(),
                        "--initial-cluster".into(),
                        initial.clone(),
                        "--shards".into(),
                        layout.shards.to_string(),
                        // The nodes share this machine: one runtime thread each. A flag, so
                        // the log header and the restart hint show it.
                        "--worker-threads".into(),
                        worker_threads.clone(),
                    ],
                    addr,
                    log: dir.join(format!("n{id}.log")),
                    child: None,
                }
            })
            .collect(),
    };

    say!(
        "habar dev: {} {} nodes with {} shards in {}; each node's output goes to {}",
        if existing { "restarting" } else { "starting" },
        layout.nodes,
        layout.shards,
        dir.display(),
        dir.join("n<i>.log").display()
    );
    for n in cluster.nodes.iter_mut() {
        n.spawn()?; // on error, dropping `cluster` stops the ones already started
    }

    let deadline = Instant::now() + Duration::from_secs(args.ready_timeout_s);
    loop {
        for n in cluster.nodes.iter_mut() {
            if let Some(st) = n.exited() {
                anyhow::bail!("node {} exited during start-up ({st}); see {}", n.id, n.log.display());
            }
        }
        let mut missing = None;
        for n in &cluster.nodes {
            if let Some(why) = not_ready(&n.addr, layout.shards).await {
                missing = Some(format!("node {} ({}): {why}; its log is {}", n.id, n.addr, n.log.display()));
                break;
            }
        }
        let Some(why) = missing else { break };
        if Instant::now() > deadline {
            anyhow::bail!("cluster not ready after {}s: {why}", args.ready_timeout_s);
        }
        tokio::select! {
            _ = &mut stop => {
                say!("habar dev: stopping all nodes");
                cluster.stop_all();
                return Ok(());
            }
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }

    say!("habar dev: ready: every shard has a leader.");
    for n in &cluster.nodes {
        say!("  node {}  http://{}  pid {}  log {}", n.id, n.addr, n.pid().unwrap_or(0), n.log.display());
    }
    let first = &cluster.nodes[0].addr;
    let last = &cluster.nodes[cluster.nodes.len() - 1].addr;
    say!("try, in another terminal:");
    say!("  habar publish --endpoint http://{first} --conversation demo --text hello");
    say!("  habar read    --endpoint http://{last} --conversation demo");
    say!("  habar tail    --endpoint http://{last} --conversation demo");
    say!("  habar status  --endpoint http://{first}");
    say!("  kill -9 <a node's pid>   # the others keep serving; nothing acknowledged is lost");
    say!("Ctrl-C stops all nodes.");

    let exe = std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_else(|_| "habar".into());
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tick.tick() => {
                for n in cluster.nodes.iter_mut() {
                    if let Some(st) = n.exited() {
                        say!("habar dev: node {} exited ({st}); the others keep serving. Its log: {}", n.id, n.log.display());
                        say!("  restart it (outside habar dev) with: {exe} {}", n.args.join(" "));
                        say!("  or stop habar dev and run it again to restart the whole cluster");
                    }
                }
            }
        }
    }
    say!("habar dev: stopping all nodes");
    cluster.stop_all();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(dir: &Path) -> DevArgs {
        DevArgs { data_dir: dir.to_path_buf(), nodes: None, base_port: None, shards: None, ready_timeout_s: 60 }
    }

    #[test]
    fn a_new_dir_takes_the_arguments_and_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let (l, existing) = DevLayout::resolve(dir.path(), &DevArgs { shards: Some(4), ..args(dir.path()) }).unwrap();
        assert!(!existing);
        assert_eq!(l, DevLayout { nodes: 3, base_port: 7001, shards: 4 });
        assert_eq!(l.addr(3), "127.0.0.1:7003");
    }

    #[test]
    fn a_rerun_reuses_the_saved_layout_and_refuses_a_different_one() {
        let dir = tempfile::tempdir().unwrap();
        let first = DevArgs { nodes: Some(5), base_port: Some(9000), shards: Some(2), ..args(dir.path()) };
        let (l, _) = DevLayout::resolve(dir.path(), &first).unwrap();
        l.save(dir.path()).unwrap();
        let (again, existing) = DevLayout::resolve(dir.path(), &args(dir.path())).unwrap();
        assert!(existing);
        assert_eq!(again, l, "no flags: the saved layout");
        assert!(DevLayout::resolve(dir.path(), &DevArgs { base_port: Some(9000), ..args(dir.path()) }).is_ok());
        let err = DevLayout::resolve(dir.path(), &DevArgs { shards: Some(16), ..args(dir.path()) }).unwrap_err();
        assert!(err.to_string().contains("--shards 16") && err.to_string().contains("--shards 2"), "{err}");
    }

    #[test]
    fn impossible_layouts_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for bad in [
            DevArgs { nodes: Some(0), ..args(dir.path()) },
            DevArgs { nodes: Some(10), ..args(dir.path()) },
            DevArgs { base_port: Some(65534), ..args(dir.path()) },
            DevArgs { shards: Some(0), ..args(dir.path()) },
        ] {
            assert!(DevLayout::resolve(dir.path(), &bad).is_err(), "{bad:?}");
        }
    }
}
