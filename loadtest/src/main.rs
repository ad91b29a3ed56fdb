//! `habar-load`: drive load against a Habar cluster (see `--help` and docs/BENCHMARKS.md).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use habar_client::Client;
use habar_client::ClientConfig;
use habar_loadtest::plot;
use habar_loadtest::report;
use habar_loadtest::run;
use habar_loadtest::scenario::parse_secs;
use habar_loadtest::scenario::Mode;
use habar_loadtest::scenario::Popularity;
use habar_loadtest::scenario::Scenario;
use habar_loadtest::spawn;

/// jemalloc, as the nodes have: glibc's malloc and free were ~16% of the tester's CPU in a
/// 20,000/s open loop, CPU the nodes on the same machine then lack (docs/BENCHMARKS.md).
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Load test a Habar cluster: closed loop, open loop (`--rate`) or ramp (`--mode ramp`),
/// with a live progress line, a table of percentiles, `--json`, `--plot` and `--verify`.
#[derive(Parser, Debug)]
#[command(name = "habar-load", version)]
struct Args {
    /// Scenario file (loadtest/scenarios/*.toml); flags below override its fields.
    #[arg(long)]
    scenario: Option<PathBuf>,
    /// Endpoints of a running cluster, comma-separated (`http://host:port`).
    #[arg(long, value_delimiter = ',', conflicts_with = "spawn")]
    endpoints: Vec<String>,
    /// Start a local N-node cluster for the run (and stop it after).
    #[arg(long)]
    spawn: Option<u64>,
    /// The `habar` binary for --spawn (default: next to habar-load).
    #[arg(long)]
    habar_bin: Option<PathBuf>,
    /// Extra flag for every spawned node (repeat), e.g. --node-arg=--shards=8.
    #[arg(long = "node-arg", allow_hyphen_values = true)]
    node_args: Vec<String>,
    /// Keep the spawned cluster's data directory.
    #[arg(long)]
    keep_data: bool,
    #[arg(long, value_enum)]
    mode: Option<Mode>,
    #[arg(long)]
    publishers: Option<usize>,
    #[arg(long)]
    in_flight: Option<usize>,
    /// Open-loop rate, e.g. `20000/s` (implies --mode open unless a mode is given).
    #[arg(long, value_parser = parse_rate)]
    rate: Option<f64>,
    /// Run length, e.g. `60s`, `2m`.
    #[arg(long, value_parser = parse_secs)]
    duration: Option<f64>,
    /// Warm-up excluded from the results, e.g. `5s`.
    #[arg(long, value_parser = parse_secs)]
    warmup: Option<f64>,
    /// Stop after this many envelopes.
    #[arg(long)]
    count: Option<u64>,
    #[arg(long)]
    conversations: Option<u64>,
    #[arg(long, value_enum)]
    popularity: Option<Popularity>,
    #[arg(long)]
    zipf_exponent: Option<f64>,
    /// Ciphertext bytes: `256` or `64..4096`.
    #[arg(long)]
    size: Option<String>,
    #[arg(long)]
    envelopes_per_publish: Option<usize>,
    #[arg(long)]
    read_share: Option<f64>,
    #[arg(long)]
    subscribers: Option<usize>,
    /// Ramp bound, e.g. `5ms`.
    #[arg(long, value_parser = parse_ms)]
    slo_p99: Option<f64>,
    #[arg(long)]
    seed: Option<u64>,
    /// Client: most envelopes per batched request.
    #[arg(long)]
    client_batch: Option<usize>,
    /// Client: batched requests in flight per node.
    #[arg(long)]
    client_in_flight: Option<usize>,
    /// Write the whole report as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write throughput and p99 per second as an SVG.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Read back every acknowledged envelope; exit 1 if any is lost, duplicated or misplaced.
    #[arg(long)]
    verify: bool,
    /// No progress line.
    #[arg(long)]
    quiet: bool,
}

fn parse_rate(s: &str) -> Result<f64, String> {
    let n = s.trim().trim_end_matches("/s");
    n.replace('_', "").parse::<f64>().map_err(|_| format!("`{s}` is not a rate like 20000/s"))
}

fn parse_ms(s: &str) -> Result<f64, String> {
    parse_secs(s).map(|v| v * 1000.0)
}

impl Args {
    fn scenario(&self) -> anyhow::Result<Scenario> {
        let mut s = match &self.scenario {
            Some(p) => Scenario::load(p)?,
            None => Scenario::default(),
        };
        if let Some(m) = self.mode {
            s.mode = m;
        } else if self.rate.is_some() {
            s.mode = Mode::Open;
        }
        macro_rules! set {
            ($($f:ident => $g:ident),*) => { $( if let Some(v) = self.$f.clone() { s.$g = v; } )* };
        }
        set!(publishers => publishers, in_flight => in_flight, rate => rate, duration => duration_secs,
            warmup => warmup_secs, count => count, conversations => conversations, popularity => popularity,
            zipf_exponent => zipf_exponent, envelopes_per_publish => envelopes_per_publish,
            read_share => read_share, subscribers => subscribers, slo_p99 => slo_p99_ms, seed => seed);
        if self.rate.is_some() {
            s.phases.clear();
        }
        if let Some(size) = &self.size {
            let (a, b) = match size.split_once("..") {
                Some((a, b)) => (a, b),
                None => (size.as_str(), size.as_str()),
            };
            s.ciphertext_min_bytes = a.trim().parse().with_context(|| format!("--size {size}"))?;
            s.ciphertext_max_bytes = b.trim().parse().with_context(|| format!("--size {size}"))?;
        }
        s.validate()?;
        Ok(s)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let scenario = args.scenario()?;
    let cluster = match args.spawn {
        Some(n) => {
            let bin = spawn::habar_binary(args.habar_bin.as_deref())?;
            eprintln!("starting a {n}-node cluster with {}", bin.display());
            Some(spawn::SpawnedCluster::start(n, &bin, &args.node_args, args.keep_data).await?)
        }
        None => None,
    };
    let endpoints = match &cluster {
        Some(c) => c.endpoints(),
        None => args.endpoints.clone(),
    };
    anyhow::ensure!(!endpoints.is_empty(), "give --endpoints or --spawn N");
    let mut cfg = ClientConfig::new(endpoints.clone());
    if let Some(b) = args.client_batch {
        cfg.max_batch_envelopes = b;
    }
    if let Some(f) = args.client_in_flight {
        cfg.max_in_flight_batches = f;
    }
    cfg.request_timeout = Duration::from_secs(30);
    let client = Client::connect(cfg).await.map_err(|e| anyhow::anyhow!("connecting to {endpoints:?}: {e}"))?;
    eprintln!(
        "running scenario `{}` ({:?}) for {:.0} s against {}",
        scenario.name,
        scenario.mode,
        scenario.total_secs(),
        endpoints.join(",")
    );
    let mut watch: Vec<(String, u32)> = cluster.as_ref().map(|c| c.pids()).unwrap_or_default();
    watch.push((habar_loadtest::cpu::TESTER.into(), std::process::id()));
    let mut report = run::run(scenario, client, endpoints, args.verify, !args.quiet, watch).await?;
    if let Some(c) = &cluster {
        report.peak_rss = c.peak_rss();
    }
    print!("{}", report::table(&report));
    if let Some(p) = &args.json {
        std::fs::write(p, serde_json::to_vec_pretty(&report)?).with_context(|| format!("writing {}", p.display()))?;
        eprintln!("report written to {}", p.display());
    }
    if let Some(p) = &args.plot {
        let title = format!("habar-load: {}", report.scenario.name);
        std::fs::write(p, plot::svg(&title, &report.points, report.scenario.warmup_secs))
            .with_context(|| format!("writing {}", p.display()))?;
        eprintln!("plot written to {}", p.display());
    }
    drop(cluster);
    if report.verify.as_ref().is_some_and(|v| !v.ok()) {
        eprintln!("verification FAILED");
        std::process::exit(1);
    }
    Ok(())
}
