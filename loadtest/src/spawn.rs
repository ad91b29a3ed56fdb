//! `--spawn N`: a local N-node cluster of `habar serve` child processes in a temporary
//! directory, stopped (SIGTERM, then SIGKILL) when the run ends.

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

pub struct SpawnedNode {
    pub id: u64,
    pub addr: String,
    child: Child,
}

pub struct SpawnedCluster {
    pub nodes: Vec<SpawnedNode>,
    /// Kept for the cluster's lifetime; deleted on drop unless `--keep-data`.
    pub dir: Option<tempfile::TempDir>,
    pub path: PathBuf,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A fresh directory for a cluster's data and logs: deleted when the returned guard drops, or
/// kept (no guard) with `keep`. Dropping a `TempDir` deletes it, so a kept one is released with
/// `keep()` rather than dropped: dropping it while the nodes ran deleted their files under them.
pub fn run_dir(prefix: &str, keep: bool) -> anyhow::Result<(Option<tempfile::TempDir>, PathBuf)> {
    let dir = tempfile::Builder::new().prefix(prefix).tempdir().context("temp dir")?;
    if keep {
        Ok((None, dir.keep()))
    } else {
        let path = dir.path().to_path_buf();
        Ok((Some(dir), path))
    }
}

/// The `habar` binary: `explicit`, else next to this executable.
pub fn habar_binary(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    let me = std::env::current_exe().context("locating habar-load")?;
    let p = me.with_file_name("habar");
    anyhow::ensure!(p.exists(), "no `habar` binary next to {} (build it, or pass --habar-bin)", me.display());
    Ok(p)
}

impl SpawnedCluster {
    /// Starts `n` nodes with `extra` flags each and waits until every shard has a leader.
    pub async fn start(n: u64, habar: &Path, extra: &[String], keep_data: bool) -> anyhow::Result<Self> {
        anyhow::ensure!((1..=9).contains(&n), "--spawn {n} is outside 1..=9");
        let (dir, path) = run_dir("habar-load-", keep_data)?;
        let addrs: Vec<String> =
            (0..n).map(|_| free_port().map(|p| format!("127.0.0.1:{p}"))).collect::<anyhow::Result<_>>()?;
        let initial = addrs.iter().enumerate().map(|(i, a)| format!("{}={a}", i + 1)).collect::<Vec<_>>().join(",");
        let mut nodes = Vec::new();
        for (i, addr) in addrs.iter().enumerate() {
            let id = i as u64 + 1;
            let data = path.join(format!("n{id}"));
            let log = std::fs::File::create(path.join(format!("n{id}.log"))).context("node log")?;
            let mut cmd = Command::new(habar);
            // The nodes share this machine: one runtime thread each (the node's setting
            // `worker_threads`), unless HABAR_WORKER_THREADS or `--node-arg=--worker-threads=N`
            // says otherwise (a config file's `worker_threads` does not: the environment wins).
            if std::env::var_os("HABAR_WORKER_THREADS").is_none() {
                cmd.env("HABAR_WORKER_THREADS", "1");
            }
            let child = cmd
                .arg("serve")
                .args(["--id", &id.to_string(), "--listen", addr, "--initial-cluster", &initial])
                .arg("--data-dir")
                .arg(&data)
                .args(extra)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .with_context(|| format!("starting {}", habar.display()))?;
            nodes.push(SpawnedNode { id, addr: addr.clone(), child });
        }
        let cluster = SpawnedCluster { nodes, dir, path };
        if keep_data {
            eprintln!("cluster data kept in {}", cluster.path.display());
        }
        for node in &cluster.nodes {
            wait_ready(&format!("http://{}", node.addr), Duration::from_secs(60)).await?;
        }
        Ok(cluster)
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.nodes.iter().map(|n| format!("http://{}", n.addr)).collect()
    }

    /// Each node's name (`n<id>`) and process id.
    pub fn pids(&self) -> Vec<(String, u32)> {
        self.nodes.iter().map(|n| (format!("n{}", n.id), n.child.id())).collect()
    }

    /// Peak resident memory of each node so far (VmHWM), in bytes.
    pub fn peak_rss(&self) -> Vec<(u64, u64)> {
        self.nodes.iter().map(|n| (n.id, peak_rss_of(n.child.id()).unwrap_or(0))).collect()
    }
}

impl Drop for SpawnedCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            // SIGTERM first so nodes flush; then make sure.
            unsafe {
                libc::kill(n.child.id() as i32, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for n in &mut self.nodes {
            while Instant::now() < deadline {
                if let Ok(Some(_)) = n.child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = n.child.kill();
            let _ = n.child.wait();
        }
    }
}

/// VmHWM of a process, bytes.
pub fn peak_rss_of(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

async fn wait_ready(endpoint: &str, timeout: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        if let Ok(mut c) = ClusterClient::connect(endpoint.to_string()).await {
            if let Ok(s) = c.status(pb::StatusRequest {}).await {
                let s = s.into_inner();
                if !s.shards.is_empty() && s.shards.iter().all(|sh| sh.leader != 0) {
                    return Ok(());
                }
            }
        }
        anyhow::ensure!(start.elapsed() < timeout, "{endpoint} had no leader for every shard within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--keep-data` keeps the cluster's directory after the run, and without it the
    /// directory goes when the cluster does. (A kept directory used to be deleted as soon as
    /// the cluster had started, under the running nodes.)
    #[test]
    fn keep_data_keeps_the_directory_and_the_default_deletes_it() {
        let (guard, kept) = run_dir("habar-keep-test-", true).unwrap();
        assert!(guard.is_none());
        std::fs::write(kept.join("n1.log"), b"x").unwrap();
        drop(guard);
        assert!(kept.join("n1.log").exists(), "a kept directory was deleted");
        std::fs::remove_dir_all(&kept).unwrap();

        let (guard, temp) = run_dir("habar-keep-test-", false).unwrap();
        assert!(temp.exists());
        drop(guard);
        assert!(!temp.exists(), "a directory that is not kept outlived its guard");
    }
}
