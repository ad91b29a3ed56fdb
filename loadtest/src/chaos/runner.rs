//! One chaos run: start the workload and the nemesis together, stop the workload, heal
//! the cluster, wait until every replica applied every commit, read the final logs and
//! every replica, check, report.

use std::path::PathBuf;
use std::time::Duration;
use std::time::Instant;

use anyhow::Context;
use habar_client::Client;
use habar_client::ClientConfig;
use habar_proto::v1::broker_client::BrokerClient;
use tonic::transport::Endpoint;

use super::checker;
use super::cluster::ChaosCluster;
use super::cluster::NetMode;
use super::history::HistorySnapshot;
use super::nemesis;
use super::nemesis::FaultKind;
use super::nemesis::Timing;
use super::report::ChaosReport;
use super::workload::conversation_name;
use super::workload::micros;
use super::workload::read_all;
use super::workload::ReadSource;
use super::workload::Workload;
use super::workload::WorkloadConfig;
use crate::verify::Logs;

/// How long the cluster may take to elect leaders, converge, and subscribers to catch up.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(90);
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(30);

/// The settings of a run.
#[derive(Debug, Clone)]
pub struct ChaosOptions {
    pub seed: u64,
    pub duration: Duration,
    pub faults: Vec<FaultKind>,
    pub nodes: u64,
    /// How the nodes are networked (`--net`).
    pub net: NetMode,
    pub habar: PathBuf,
    pub node_args: Vec<String>,
    pub keep_data: bool,
    pub conversations: u32,
    pub publishers: u32,
    pub readers: u32,
    pub subscribers: u32,
    /// The client's time budget per call: a fault yields an unknown outcome, not a hang.
    pub request_timeout: Duration,
}

impl ChaosOptions {
    /// The run id (the first half of every message id): a function of the seed.
    pub fn run_id(&self) -> u64 {
        splitmix(self.seed)
    }

    pub fn timing(&self) -> Timing {
        Timing::for_election_timeout(nemesis::election_timeout_max_ms(&self.node_args))
    }

    /// A command line repeating this run.
    pub fn rerun(&self) -> String {
        let mut s = format!(
            "ops/chaos --seed {} --duration {}s --nodes {} --faults {} --conversations {} --publishers {}",
            self.seed,
            self.duration.as_secs_f64(),
            self.nodes,
            self.faults.iter().map(|k| k.name()).collect::<Vec<_>>().join(","),
            self.conversations,
            self.publishers
        );
        if self.net != NetMode::Loopback {
            s.push_str(&format!(" --net {}", self.net.name()));
        }
        for a in &self.node_args {
            s.push_str(&format!(" --node-arg={a}"));
        }
        s
    }
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Runs the workload and the nemesis against `cluster` (already started), then checks.
pub async fn run(opts: &ChaosOptions, cluster: &mut ChaosCluster) -> anyhow::Result<ChaosReport> {
    anyhow::ensure!(opts.conversations > 0 && opts.publishers > 0, "--conversations and --publishers must be > 0");
    let run_id = opts.run_id();
    let timing = opts.timing();
    let plan = nemesis::schedule(opts.seed, opts.duration.as_millis() as u64, &opts.faults, &timing);
    eprintln!(
        "chaos: seed {} run id {run_id:016x}, {} faults planned over {:.0} s: {}",
        opts.seed,
        plan.len(),
        opts.duration.as_secs_f64(),
        plan.iter().map(|p| format!("{}({}ms)", p.kind.name(), p.hold_ms)).collect::<Vec<_>>().join(" ")
    );
    cluster.wait_ready(READY_TIMEOUT).await?;
    let mut cfg = ClientConfig::new(cluster.endpoints());
    cfg.request_timeout = opts.request_timeout;
    cfg.connect_timeout = Duration::from_millis(1000);
    cfg.status_refresh = Duration::from_millis(500);
    cfg.keepalive_timeout = Duration::from_secs(20);
    let client = Client::connect(cfg).await.map_err(|e| anyhow::anyhow!("connecting: {e}"))?;
    let wl = WorkloadConfig {
        seed: opts.seed,
        run_id,
        conversations: opts.conversations,
        publishers: opts.publishers,
        readers: opts.readers,
        subscribers: opts.subscribers.min(opts.conversations),
    };

    let start = Instant::now();
    let end = start + opts.duration;
    let mut workload = Workload::start(&wl, &client, start).await?;
    // The nemesis runs on this task (not spawned): see ChaosCluster on PR_SET_PDEATHSIG.
    let nemesis_log = nemesis::run(cluster, &plan, start, end).await;
    let mut nemesis_log = match nemesis_log {
        Ok(l) => l,
        Err(e) => {
            workload.stop_writers().await;
            workload.stop_subscribers().await;
            return Err(e.context("nemesis"));
        }
    };
    tokio::time::sleep_until(end.into()).await;
    let run_us = micros(start);
    eprintln!("chaos: workload stopping at {} ms", run_us / 1000);
    workload.stop_writers().await;
    let stopped = Instant::now();

    // Heal, and let every request the cluster may still hold run out before reading.
    for (id, why) in cluster.reap_unexpected_exits() {
        eprintln!("chaos: node {id} exited by itself: {why}");
        nemesis_log.node_crashes.push((micros(start) / 1000, id, why));
    }
    let healed = cluster.heal()?;
    eprintln!("chaos: healed nodes {healed:?}; waiting for every replica to apply every commit");
    cluster.wait_converged(CONVERGE_TIMEOUT).await?;
    tokio::time::sleep_until((stopped + opts.request_timeout + Duration::from_secs(1)).into()).await;
    cluster.wait_converged(CONVERGE_TIMEOUT).await?;
    let converge_ms = stopped.elapsed().as_millis() as u64;

    let final_logs = read_logs(&ReadSource::Client(&client), &wl, false).await.context("reading the final logs")?;
    wait_for_subscribers(&workload, &final_logs).await;
    workload.stop_subscribers().await;
    let mut replicas = Vec::new();
    for n in &cluster.nodes {
        let channel = Endpoint::from_shared(n.endpoint())?
            .connect_timeout(Duration::from_secs(2))
            .connect()
            .await
            .with_context(|| format!("connecting to node {}", n.id))?;
        let src = ReadSource::Node(BrokerClient::new(channel).max_decoding_message_size(64 << 20));
        let logs = read_logs(&src, &wl, true).await.with_context(|| format!("reading node {}'s replica", n.id))?;
        replicas.push((n.id, logs));
    }
    for (id, why) in cluster.reap_unexpected_exits() {
        nemesis_log.node_crashes.push((micros(start) / 1000, id, why));
    }
    let history: HistorySnapshot = workload.history.snapshot();
    let findings = checker::check(&history, &final_logs, &replicas, run_us);
    let violations = findings.violations() + nemesis_log.node_crashes.len() as u64;
    let data_dir = opts.keep_data.then(|| cluster.path.display().to_string());
    Ok(ChaosReport {
        seed: opts.seed,
        run_id: format!("{run_id:016x}"),
        rerun: opts.rerun(),
        duration_s: run_us as f64 / 1e6,
        nodes: opts.nodes,
        net: opts.net.name().to_string(),
        node_args: opts.node_args.clone(),
        fault_kinds: opts.faults.clone(),
        timing,
        conversations: wl.conversations,
        publishers: wl.publishers,
        readers: wl.readers,
        subscribers: wl.subscribers,
        planned: plan,
        faults: nemesis_log.faults,
        node_crashes: nemesis_log.node_crashes,
        converge_ms,
        findings,
        violations,
        ok: violations == 0,
        node_logs: cluster.log_paths().into_iter().map(|(id, p)| (id, p.display().to_string())).collect(),
        data_dir,
    })
}

/// Every conversation of the run, read whole from `src` (retried for up to 30 s each).
async fn read_logs(src: &ReadSource<'_>, wl: &WorkloadConfig, allow_stale: bool) -> anyhow::Result<Logs> {
    let mut logs = Logs::new();
    for conv in 0..wl.conversations {
        let name = conversation_name(wl.run_id, conv);
        let deadline = Instant::now() + Duration::from_secs(30);
        let log = loop {
            match read_all(src, &name, wl.run_id, allow_stale).await {
                Ok((log, _)) => break log,
                Err(e) if Instant::now() > deadline => return Err(e.context(format!("reading {name}"))),
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        };
        logs.insert(conv, log);
    }
    Ok(logs)
}

/// Waits (up to [`CATCH_UP_TIMEOUT`]) until every subscriber delivered its
/// conversations up to the end of the final logs.
async fn wait_for_subscribers(workload: &Workload, final_logs: &Logs) {
    let deadline = Instant::now() + CATCH_UP_TIMEOUT;
    loop {
        let behind = {
            let s = workload.history.subscribers();
            s.streams
                .iter()
                .filter(|((_, conv), st)| {
                    let len = final_logs.get(conv).and_then(|l| l.iter().map(|e| e.0).max()).unwrap_or(0);
                    st.next.saturating_sub(1) < len
                })
                .count()
        };
        if behind == 0 || Instant::now() > deadline {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
