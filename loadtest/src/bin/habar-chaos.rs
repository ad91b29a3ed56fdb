//! `habar-chaos`: kill, restart and pause the nodes of a local Habar cluster while
//! publishing, reading and subscribing, then check the history (see
//! `habar_loadtest::chaos`). Exit code 0: no violation; 1: a violation; 2: the run
//! itself failed (the cluster did not start or converge, bad flags...).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use habar_loadtest::chaos::cluster::ChaosCluster;
use habar_loadtest::chaos::cluster::NetMode;
use habar_loadtest::chaos::nemesis::FaultKind;
use habar_loadtest::chaos::netns;
use habar_loadtest::chaos::report::ChaosReport;
use habar_loadtest::chaos::runner;
use habar_loadtest::chaos::runner::ChaosOptions;
use habar_loadtest::spawn;

/// Jepsen-style process faults against a local Habar cluster, with a history checker.
#[derive(Parser, Debug)]
#[command(name = "habar-chaos", version)]
struct Args {
    /// Run length in minutes (e.g. 1.5).
    #[arg(long, conflicts_with = "duration")]
    minutes: Option<f64>,
    /// Run length, e.g. `90s`, `2m` (default 60s).
    #[arg(long, value_parser = parse_secs)]
    duration: Option<f64>,
    /// Fault kinds, comma-separated: kill-leader, kill-follower, kill-random, kill-all,
    /// pause-leader, power-loss-node, power-loss-all, corrupt-wal, corrupt-snapshot; with
    /// `--net netns` also
    /// partition-leader, partition-random, bridge (5 nodes), flap, slow-link, lossy-link
    /// (default: all, i.e. every kind valid for the --net mode).
    #[arg(long, default_value = "all")]
    faults: String,
    /// How the nodes are networked: `loopback` (127.0.0.1, process faults only) or `netns`
    /// (one network namespace per node behind a bridge, 10.77.<k>.N:7001; network faults
    /// possible; needs root, ip, iptables, tc).
    #[arg(long, default_value = "loopback")]
    net: String,
    /// Seed of everything random (default: a random one, printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Cluster size.
    #[arg(long, default_value_t = 3)]
    nodes: u64,
    /// The `habar` binary (default: next to habar-chaos).
    #[arg(long)]
    habar_bin: Option<PathBuf>,
    /// Write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Keep the cluster's data directory and node logs (always kept when the run fails).
    #[arg(long)]
    keep_data: bool,
    #[arg(long, default_value_t = 16)]
    conversations: u32,
    #[arg(long, default_value_t = 8)]
    publishers: u32,
    /// Linearizable readers of whole conversations.
    #[arg(long, default_value_t = 2)]
    readers: u32,
    /// Subscriptions (each over a share of the conversations, from seq 1).
    #[arg(long, default_value_t = 2)]
    subscribers: u32,
    /// The client's time budget per call, e.g. `5s`.
    #[arg(long, value_parser = parse_secs, default_value = "5s")]
    request_timeout: f64,
    /// Extra flag for every node (repeat), e.g. --node-arg=--shards=8.
    #[arg(long = "node-arg", allow_hyphen_values = true)]
    node_args: Vec<String>,
}

/// A positive duration (`90s`, `2m`), in seconds.
fn parse_secs(s: &str) -> Result<f64, String> {
    let v = habar_loadtest::scenario::parse_secs(s)?;
    if !(v.is_finite() && v > 0.0) {
        return Err(format!("`{s}` must be positive"));
    }
    Ok(v)
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("habar-chaos: {e}");
            return ExitCode::from(2);
        }
    };
    // block_on polls the main future on this thread, which lives until the end: the
    // nodes it spawns die with it (PR_SET_PDEATHSIG).
    match rt.block_on(main_async(args)) {
        Ok(report) => {
            if report.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("habar-chaos: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn main_async(args: Args) -> anyhow::Result<ChaosReport> {
    let seed = args.seed.unwrap_or_else(rand::random);
    let secs = match (args.minutes, args.duration) {
        (Some(m), _) => m * 60.0,
        (None, Some(d)) => d,
        (None, None) => 60.0,
    };
    anyhow::ensure!(secs.is_finite() && secs > 0.0, "the run length must be positive");
    let net = NetMode::parse(&args.net)?;
    let faults = FaultKind::parse_list_for(&args.faults, net)?;
    if net == NetMode::Netns {
        let missing = netns::missing_requirements();
        anyhow::ensure!(missing.is_empty(), "--net netns needs: {}", missing.join("; "));
    }
    let mut node_args = args.node_args;
    if faults.iter().any(|k| k.needs_power_loss_model()) {
        // Power-loss faults: every node runs under the WAL's power-loss model, so any kill
        // in this run also loses the WAL writes no fsync covered.
        node_args.push("--test-lose-unsynced-wal-writes".into());
        eprintln!("habar-chaos: nodes run under the WAL power-loss model: every kill is a power cut");
    }
    if faults.iter().any(|k| matches!(k, FaultKind::CorruptWal | FaultKind::CorruptSnapshot)) {
        // Corruption faults need something to damage: several WAL segments and snapshot
        // files within a short run (a snapshot every 200 entries, however little the state
        // grew). Flags the caller gave win.
        for (flag, value) in [
            ("--wal-segment-bytes", "1048576"),
            ("--snapshot-logs-since-last", "200"),
            ("--snapshot-growth-percent", "0"),
        ] {
            if !node_args.iter().any(|a| a == flag || a.starts_with(&format!("{flag}="))) {
                node_args.push(format!("{flag}={value}"));
            }
        }
    }
    let opts = ChaosOptions {
        seed,
        duration: Duration::from_secs_f64(secs),
        faults,
        nodes: args.nodes,
        net,
        habar: spawn::habar_binary(args.habar_bin.as_deref())?,
        node_args,
        keep_data: args.keep_data,
        conversations: args.conversations,
        publishers: args.publishers,
        readers: args.readers,
        subscribers: args.subscribers,
        request_timeout: Duration::from_secs_f64(args.request_timeout),
    };
    eprintln!("habar-chaos: seed {seed} (repeat with: {})", opts.rerun());
    // Handlers first: a ctrl-c or SIGTERM while the namespaces are being built is then
    // seen by the select below, and the cluster (namespaces included) is removed on drop.
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut cluster = ChaosCluster::start_with_net(
        opts.nodes,
        &opts.habar,
        &opts.node_args,
        opts.keep_data,
        opts.net,
        opts.run_id(),
    )?;
    eprintln!("habar-chaos: cluster in {} (node logs: {})", cluster.path.display(), cluster.log_list());
    if let Some(n) = cluster.net_mut() {
        eprintln!(
            "habar-chaos: nodes in network namespaces {}-n1..n{} on 10.77.{}.0/24 (bridge {}{})",
            n.plan.prefix,
            opts.nodes,
            n.plan.subnet,
            n.plan.bridge(),
            if n.netem { "" } else { "; no sch_netem in this kernel: slow/lossy links use tbf/iptables" }
        );
    }
    let outcome = tokio::select! {
        r = runner::run(&opts, &mut cluster) => r,
        _ = int.recv() => Err(anyhow::anyhow!("interrupted")),
        _ = term.recv() => Err(anyhow::anyhow!("terminated")),
    };
    let report = match outcome {
        Ok(r) => r,
        Err(e) => {
            let kept = cluster.keep();
            eprintln!("habar-chaos: node logs kept in {}: {}", kept.display(), cluster.log_list());
            return Err(e);
        }
    };
    if !report.ok {
        let kept = cluster.keep();
        eprintln!("habar-chaos: violations found; data and node logs kept in {}", kept.display());
    } else if opts.keep_data {
        cluster.keep();
    }
    print!("{}", report.table());
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("habar-chaos: report written to {}", path.display());
    }
    Ok(report)
    // `cluster` drops here: every node is resumed and killed, then its namespaces removed.
}
