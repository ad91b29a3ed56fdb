//! One run: offers a scenario's load through `habar-client`, measures it, and (with
//! `--verify`) reads back every acknowledged envelope.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use futures::StreamExt;
use habar_client::pb;
use habar_client::Client;
use habar_client::ClientError;
use habar_client::Event;
use rand::rngs::SmallRng;
use rand::Rng;
use rand::SeedableRng;
use serde::Serialize;

use crate::openloop;
use crate::openloop::Schedule;
pub use crate::ramp::RampReport;
pub use crate::ramp::RampStep;
use crate::scenario::Mode;
use crate::scenario::Phase;
use crate::scenario::Scenario;
use crate::stats::Kind;
use crate::stats::Point;
use crate::stats::Recorder;
use crate::stats::Summary;
use crate::verify;
use crate::verify::Ledger;
use crate::verify::VerifyReport;
use crate::workload::unix_nanos;
use crate::workload::Workload;

/// One conversation's log as read back: (index, [(seq, counter)]).
type ConvLog = (u32, Vec<(u64, u64)>);

/// Conversations verified in parallel.
const VERIFY_PARALLEL: usize = 32;

/// Everything a run measured: printed as a table, written with `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: Scenario,
    pub machine: Machine,
    pub endpoints: Vec<String>,
    pub measured_secs: f64,
    pub publish: Summary,
    pub read: Summary,
    pub end_to_end: Summary,
    /// Failed operations by gRPC code (or `client_overload` in open loop).
    pub errors: BTreeMap<String, u64>,
    pub points: Vec<Point>,
    pub ramp: Option<RampReport>,
    pub verify: Option<VerifyReport>,
    /// Peak RSS per spawned node (id, bytes).
    pub peak_rss: Vec<(u64, u64)>,
    /// Publish requests the client sent after the warm-up (batching: envelopes / requests).
    pub client_publish_requests: u64,
    /// CPU of the watched processes (spawned nodes, the tester) in the measured window.
    pub cpu: Vec<crate::cpu::ProcessCpu>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    /// Share of all CPU time the hypervisor gave to others from the start of the run (warm-up
    /// included) to the end of its load (steal, from `/proc/stat`), in percent; `None` where
    /// the kernel does not say.
    pub cpu_steal_pct: Option<f64>,
    /// The kernel reclaims pages on its own (DAMON with a `pageout` scheme, or the
    /// `damon_reclaim` module): on the reference VM it stalled single applies 20-63 ms
    /// (BENCHMARKS.md), so a reader of the figures should know. `None`: could not tell (the
    /// DAMON files are readable by root only).
    pub damon_pageout: Option<bool>,
}

impl Machine {
    /// This machine; `cpu` is [`cpu_ticks`] when the run started and when its load ended.
    pub fn here(cpu: (Option<CpuTicks>, Option<CpuTicks>)) -> Self {
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| s.lines().find(|l| l.starts_with("model name")).map(|l| l.to_string()))
            .and_then(|l| l.split_once(':').map(|(_, m)| m.trim().to_string()))
            .unwrap_or_else(|| "unknown".into());
        Machine {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model,
            cpu_steal_pct: cpu.0.zip(cpu.1).and_then(|(a, b)| steal_pct(a, b)),
            damon_pageout: damon_pageout_on(
                Path::new("/sys/kernel/mm/damon/admin/kdamonds"),
                Path::new("/sys/module/damon_reclaim/parameters/enabled"),
            ),
        }
    }
}

/// Aggregate CPU time so far: (steal, all), in clock ticks.
pub type CpuTicks = (u64, u64);

pub fn cpu_ticks() -> Option<CpuTicks> {
    parse_cpu_ticks(&std::fs::read_to_string("/proc/stat").ok()?)
}

/// The first line of `/proc/stat`: `cpu user nice system idle iowait irq softirq steal guest
/// guest_nice`; guest time is already inside user, so the total is the first eight.
fn parse_cpu_ticks(stat: &str) -> Option<CpuTicks> {
    let mut fields = stat.lines().next()?.split_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    let v: Vec<u64> = fields.take(8).map(|f| f.parse().ok()).collect::<Option<_>>()?;
    let steal = *v.get(7)?;
    Some((steal, v.iter().sum()))
}

fn steal_pct(before: CpuTicks, after: CpuTicks) -> Option<f64> {
    let all = after.1.checked_sub(before.1).filter(|&t| t > 0)?;
    let steal = after.0.checked_sub(before.0)?;
    Some(100.0 * steal as f64 / all as f64)
}

/// Whether the kernel reclaims pages with DAMON: the `damon_reclaim` module is enabled, or a
/// running DAMON context (`kdamonds/<n>/state` is `on`) has a `pageout` scheme. `None` when a
/// file that would tell could not be read (they are root's only); absent files mean no.
fn damon_pageout_on(kdamonds: &Path, reclaim_module: &Path) -> Option<bool> {
    let read = |p: &Path| match std::fs::read_to_string(p) {
        Ok(s) => Ok(Some(s.trim().to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(_) => Err(()),
    };
    let dirs = |p: &Path| -> Result<Vec<std::path::PathBuf>, ()> {
        match std::fs::read_dir(p) {
            Ok(d) => Ok(d.flatten().map(|e| e.path()).collect()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(_) => Err(()),
        }
    };
    let found = || -> Result<bool, ()> {
        if read(reclaim_module)?.is_some_and(|v| v == "Y" || v == "1") {
            return Ok(true);
        }
        for d in dirs(kdamonds)? {
            if read(&d.join("state"))?.as_deref() != Some("on") {
                continue;
            }
            for c in dirs(&d.join("contexts"))? {
                for s in dirs(&c.join("schemes"))? {
                    if read(&s.join("action"))?.as_deref() == Some("pageout") {
                        return Ok(true);
                    }
                }
            }
        }
        Ok(false)
    };
    found().ok()
}

/// What the operations share.
struct Ctx {
    client: Client,
    workload: Workload,
    scenario: Scenario,
    recorder: Arc<Recorder>,
    ledger: Option<Ledger>,
    counter: AtomicU64,
    /// Envelopes handed out (for `count`).
    issued: AtomicU64,
}

fn code_of(e: &ClientError) -> String {
    match e {
        ClientError::InvalidArgument(_) => "INVALID_ARGUMENT".into(),
        ClientError::NotFound(_) => "NOT_FOUND".into(),
        ClientError::ResourceExhausted { .. } => "RESOURCE_EXHAUSTED".into(),
        ClientError::Unavailable(_) => "UNAVAILABLE".into(),
        ClientError::DeadlineExceeded => "DEADLINE_EXCEEDED".into(),
        ClientError::Connect(_) => "CONNECT".into(),
        ClientError::Internal(_) => "INTERNAL".into(),
        ClientError::Closed => "CLOSED".into(),
        ClientError::Other(s) => format!("{:?}", s.code()).to_uppercase(),
    }
}

impl Ctx {
    /// One operation: a publish of `envelopes_per_publish` envelopes, or a read. Returns
    /// how many operations it was (envelopes for a publish) and its kind, or an error code.
    /// Operation `seed` as the open loop and the ramp send it: its kind and count, or its
    /// error label.
    async fn send(self: Arc<Self>, seed: u64) -> Result<(Kind, u64), String> {
        let (kind, r) = self.op(seed).await;
        r.map(|n| (kind, n))
    }

    async fn op(self: &Arc<Self>, seed: u64) -> (Kind, Result<u64, String>) {
        // SmallRng: seeding ChaCha (StdRng) per operation was ~4% of the tester's CPU.
        let mut rng = SmallRng::seed_from_u64(self.scenario.seed ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        if self.scenario.read_share > 0.0 && rng.gen_bool(self.scenario.read_share) {
            let conv = self.workload.conversation_to_read(&mut rng);
            let req = pb::ReadRequest {
                conversation_id: self.workload.name(conv),
                direction: pb::Direction::Backward as i32,
                limit: 50,
                ..Default::default()
            };
            return (Kind::Read, self.client.read(req).await.map(|_| 1).map_err(|e| code_of(&e)));
        }
        let k = self.scenario.envelopes_per_publish;
        self.issued.fetch_add(k as u64, Ordering::Relaxed);
        let mut envs = Vec::with_capacity(k);
        let mut meta = Vec::with_capacity(k);
        for _ in 0..k {
            let conv = self.workload.conversation(&mut rng);
            let counter = self.counter.fetch_add(1, Ordering::Relaxed);
            envs.push(pb::Envelope {
                conversation_id: self.workload.name(conv),
                message_id: verify::message_id(self.workload.run_id, counter).to_vec().into(),
                sender: String::new(),
                ciphertext: self.workload.ciphertext(&mut rng),
                expires_at_ms: 0,
            });
            meta.push((conv, counter));
        }
        let res = if k == 1 {
            match envs.pop() {
                Some(e) => self.client.publish(e).await.map(|a| vec![a]),
                None => Ok(Vec::new()),
            }
        } else {
            self.client.publish_batch(envs).await
        };
        match res {
            Ok(acks) => {
                if let Some(l) = &self.ledger {
                    for ((conv, counter), a) in meta.iter().zip(&acks) {
                        l.ack(*conv, a.seq, *counter);
                    }
                }
                (Kind::Publish, Ok(acks.len() as u64))
            }
            Err(e) => (Kind::Publish, Err(code_of(&e))),
        }
    }

    fn done_by_count(&self) -> bool {
        self.scenario.count > 0 && self.issued.load(Ordering::Relaxed) >= self.scenario.count
    }
}

/// Runs `scenario` against `client`. `progress` prints a line a second to stderr. The CPU
/// time of each `(name, pid)` in `watch` is measured over the window after the warm-up.
pub async fn run(
    scenario: Scenario,
    client: Client,
    endpoints: Vec<String>,
    verify_after: bool,
    progress: bool,
    watch: Vec<(String, u32)>,
) -> anyhow::Result<Report> {
    let run_id: u64 = rand::thread_rng().gen();
    let workload = Workload::new(&scenario, run_id)?;
    let start = Instant::now();
    let cpu_at_start = cpu_ticks();
    let recorder = Arc::new(Recorder::starting_at(start, Duration::from_secs_f64(scenario.warmup_secs)));
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        workload,
        scenario: scenario.clone(),
        recorder: recorder.clone(),
        ledger: verify_after.then(Ledger::default),
        counter: AtomicU64::new(0),
        issued: AtomicU64::new(0),
    });
    // Publish requests are counted from the end of the warm-up, like the envelopes, so that
    // "envelopes per request" compares the same window.
    let requests_before = Arc::new(AtomicU64::new(client.stats().publish_requests));
    let cpu_start: Arc<std::sync::Mutex<Option<crate::cpu::Start>>> = Arc::default();
    let warmup_mark = {
        let (client, mark, cpu_start) = (client.clone(), requests_before.clone(), cpu_start.clone());
        let warmup = Duration::from_secs_f64(scenario.warmup_secs);
        tokio::spawn(async move {
            tokio::time::sleep_until((start + warmup).into()).await;
            mark.store(client.stats().publish_requests, Ordering::Relaxed);
            let sample = crate::cpu::start(&watch);
            *cpu_start.lock().unwrap_or_else(|p| p.into_inner()) = Some(sample);
        })
    };

    let stop = Arc::new(AtomicBool::new(false));
    let subscribers = start_subscribers(&ctx, stop.clone()).await?;

    let ticker = progress.then(|| {
        let rec = recorder.clone();
        tokio::spawn(async move {
            let mut t = tokio::time::interval(Duration::from_secs(1));
            t.tick().await;
            loop {
                t.tick().await;
                eprintln!("{}", rec.progress());
            }
        })
    });

    let total = Duration::from_secs_f64(scenario.total_secs());
    let mut ramp = None;
    match scenario.mode {
        Mode::Closed => closed_loop(&ctx, start, total).await,
        Mode::Open => {
            let phases = if scenario.phases.is_empty() {
                vec![Phase { secs: scenario.duration_secs, rate: scenario.rate }]
            } else {
                scenario.phases.clone()
            };
            open_loop(&ctx, &Schedule::new(phases), start).await;
        }
        Mode::Ramp => ramp = Some(ramp_up(&ctx, start).await),
    }
    let measured_secs = (start.elapsed().as_secs_f64() - scenario.warmup_secs).max(0.001);
    let cpu_at_end = cpu_ticks();
    warmup_mark.abort();
    let cpu = cpu_start.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(crate::cpu::since).unwrap_or_default();
    let client_publish_requests =
        client.stats().publish_requests.saturating_sub(requests_before.load(Ordering::Relaxed));
    // Let subscribers receive what was acknowledged last.
    tokio::time::sleep(Duration::from_millis(if scenario.subscribers > 0 { 500 } else { 0 })).await;
    stop.store(true, Ordering::Relaxed);
    for s in subscribers {
        s.abort();
    }
    if let Some(t) = ticker {
        t.abort();
    }
    let (sums, errors, points) = recorder.finish(measured_secs);
    let verify = match &ctx.ledger {
        Some(l) => Some(verify_run(&ctx, l.take()).await?),
        None => None,
    };
    Ok(Report {
        scenario,
        machine: Machine::here((cpu_at_start, cpu_at_end)),
        endpoints,
        measured_secs,
        publish: sums.get(&Kind::Publish).cloned().unwrap_or_default(),
        read: sums.get(&Kind::Read).cloned().unwrap_or_default(),
        end_to_end: sums.get(&Kind::EndToEnd).cloned().unwrap_or_default(),
        errors,
        points,
        ramp,
        verify,
        peak_rss: Vec::new(),
        client_publish_requests,
        cpu,
    })
}

async fn closed_loop(ctx: &Arc<Ctx>, start: Instant, total: Duration) {
    let s = &ctx.scenario;
    let mut workers = tokio::task::JoinSet::new();
    let seeds = Arc::new(AtomicU64::new(0));
    for _ in 0..s.publishers * s.in_flight {
        let ctx = ctx.clone();
        let seeds = seeds.clone();
        workers.spawn(async move {
            while start.elapsed() < total && !ctx.done_by_count() {
                let t = Instant::now();
                let (kind, r) = ctx.op(seeds.fetch_add(1, Ordering::Relaxed)).await;
                let done = Instant::now();
                match r {
                    Ok(n) => ctx.recorder.record_n(kind, done - t, n, done),
                    Err(code) => {
                        ctx.recorder.error(&code);
                        // Do not spin on a cluster that refuses everything.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        });
    }
    while workers.join_next().await.is_some() {}
}

async fn open_loop(ctx: &Arc<Ctx>, schedule: &Schedule, start: Instant) -> openloop::OpenStats {
    let c = ctx.clone();
    openloop::run(schedule, start, ctx.scenario.max_outstanding, ctx.recorder.clone(), move |i| c.clone().send(i)).await
}

async fn ramp_up(ctx: &Arc<Ctx>, start: Instant) -> RampReport {
    let s = &ctx.scenario;
    let plan = crate::ramp::RampPlan {
        start_rate: s.ramp_start,
        step_rate: s.ramp_step,
        step_secs: s.ramp_step_secs,
        slo_p99_ms: s.slo_p99_ms,
        warmup_secs: s.warmup_secs,
        duration_secs: s.duration_secs,
        max_outstanding: s.max_outstanding,
    };
    let c = ctx.clone();
    crate::ramp::run(&plan, start, ctx.recorder.clone(), move |i| c.clone().send(i)).await
}

/// Starts the live subscribers; returns once each has caught up with its conversations.
async fn start_subscribers(ctx: &Arc<Ctx>, stop: Arc<AtomicBool>) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let s = &ctx.scenario;
    let mut handles = Vec::new();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(s.subscribers.max(1));
    for j in 0..s.subscribers as u64 {
        let k = s.subscribed_conversations.min(s.conversations);
        let convs: Vec<(String, u64)> =
            (0..k).map(|i| (ctx.workload.name(((j * k + i) % s.conversations) as u32), 1)).collect();
        let mut sub = ctx.client.subscribe(convs).await.map_err(|e| anyhow::anyhow!("subscribing: {e}"))?;
        let ctx = ctx.clone();
        let stop = stop.clone();
        let ready = ready_tx.clone();
        handles.push(tokio::spawn(async move {
            let mut caught_up = 0u64;
            while let Some(ev) = sub.next().await {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                match ev {
                    Ok(Event::Envelope(e)) => {
                        if let Some(t) = e.envelope.as_ref().and_then(|x| Workload::sent_at(&x.ciphertext)) {
                            let lat = Duration::from_nanos(unix_nanos().saturating_sub(t));
                            ctx.recorder.record(Kind::EndToEnd, lat);
                        }
                    }
                    Ok(Event::CaughtUp { .. }) => {
                        caught_up += 1;
                        if caught_up == k {
                            let _ = ready.send(()).await;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => ctx.recorder.error(&format!("subscribe_{}", code_of(&e))),
                }
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    for _ in 0..s.subscribers {
        let left = deadline.saturating_duration_since(Instant::now());
        anyhow::ensure!(
            tokio::time::timeout(left, ready_rx.recv()).await.is_ok(),
            "subscribers did not catch up within 60 s"
        );
    }
    Ok(handles)
}

/// Reads back every conversation that has an acknowledged envelope and verifies.
async fn verify_run(ctx: &Arc<Ctx>, acked: Vec<(u32, u64, u64)>) -> anyhow::Result<VerifyReport> {
    let mut convs: Vec<u32> = acked.iter().map(|a| a.0).collect();
    convs.sort_unstable();
    convs.dedup();
    eprintln!("verifying {} acknowledged envelopes in {} conversations", acked.len(), convs.len());
    let results: Vec<anyhow::Result<ConvLog>> = futures::stream::iter(convs)
        .map(|conv| {
            let ctx = ctx.clone();
            async move {
                let name = ctx.workload.name(conv);
                let mut log = Vec::new();
                let mut from = 1;
                loop {
                    let r = ctx
                        .client
                        .read(pb::ReadRequest {
                            conversation_id: name.clone(),
                            from_seq: from,
                            limit: 1000,
                            ..Default::default()
                        })
                        .await
                        .map_err(|e| anyhow::anyhow!("reading {name} back: {e}"))?;
                    for e in &r.envelopes {
                        let id = e.envelope.as_ref().map(|x| x.message_id.as_ref()).unwrap_or(&[]);
                        log.push((e.seq, verify::counter_of(ctx.workload.run_id, id).unwrap_or(u64::MAX)));
                    }
                    match r.envelopes.last() {
                        Some(last) if !r.end => from = last.seq + 1,
                        _ => break,
                    }
                }
                Ok((conv, log))
            }
        })
        .buffer_unordered(VERIFY_PARALLEL)
        .collect()
        .await;
    let mut logs = HashMap::new();
    for r in results {
        let (conv, log) = r?;
        logs.insert(conv, log);
    }
    Ok(verify::verify(&acked, &logs))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Steal is the eighth number of `/proc/stat`'s `cpu` line, and its share is taken of the
    /// first eight (guest time is already counted in user).
    #[test]
    fn steal_share_comes_from_the_cpu_line() {
        let before = parse_cpu_ticks("cpu  100 0 50 800 10 0 5 35 0 0\ncpu0 1 2 3\n").unwrap();
        assert_eq!(before, (35, 1000));
        let after = parse_cpu_ticks("cpu  200 0 100 1500 20 0 10 70 99 0\n").unwrap();
        assert_eq!(after, (70, 1900));
        let pct = steal_pct(before, after).unwrap();
        assert!((pct - 100.0 * 35.0 / 900.0).abs() < 1e-9, "{pct}");
        assert_eq!(steal_pct(after, after), None, "no time passed");
        assert_eq!(parse_cpu_ticks("intr 1 2 3\n"), None);
    }

    /// The DAMON note appears for a running context with a pageout scheme or the enabled
    /// reclaim module, not otherwise; no DAMON files at all means no.
    #[test]
    fn damon_pageout_is_seen_only_when_on_with_a_pageout_scheme() {
        let dir = tempfile::tempdir().unwrap();
        let kd = dir.path().join("kdamonds");
        let module = dir.path().join("enabled");
        let scheme = kd.join("0/contexts/0/schemes/0");
        std::fs::create_dir_all(&scheme).unwrap();
        std::fs::write(scheme.join("action"), "pageout\n").unwrap();
        std::fs::write(kd.join("0/state"), "off\n").unwrap();
        assert_eq!(damon_pageout_on(&kd, &module), Some(false));
        std::fs::write(kd.join("0/state"), "on\n").unwrap();
        assert_eq!(damon_pageout_on(&kd, &module), Some(true));
        std::fs::write(scheme.join("action"), "stat\n").unwrap();
        assert_eq!(damon_pageout_on(&kd, &module), Some(false));
        std::fs::write(&module, "Y\n").unwrap();
        assert_eq!(damon_pageout_on(&kd, &module), Some(true), "the reclaim module");
        let absent = dir.path().join("absent");
        assert_eq!(damon_pageout_on(&absent, &absent), Some(false));
    }
}
