//! The nemesis: a seeded schedule of process faults, alternating quiet periods and faults,
//! applied to a [`ChaosCluster`] one at a time.
//!
//! The schedule ([`schedule`]) is a pure function of the seed, the run length, the fault
//! kinds and the [`Timing`]: the same seed gives the same list of
//! [`PlannedFault`]s. Which node a fault hits is resolved when it starts (the leader of the
//! moment), using the plan's `pick` to break ties and choose random targets.
//!
//! # Adding a fault kind (extension point)
//!
//! A fault is a [`FaultKind`] (its name on the command line and in the report) plus two
//! steps: [`inject`] does the damage and returns an [`Undo`], and [`heal_fault`] undoes it
//! after the planned hold time. To add, say, a network partition or `tc netem` delay:
//!
//! 1. add a variant to [`FaultKind`], to [`FaultKind::ALL`] and to its `name`;
//! 2. give it a hold-time range in [`FaultKind::hold_range`];
//! 3. add its arm to [`inject`] (e.g. install iptables rules in the nodes' netns) and a
//!    matching [`Undo`] variant (e.g. `Undo::RemoveRules(..)`) handled by [`heal_fault`].
//!
//! [`ChaosCluster::heal`] runs after the last fault whatever happened; a new kind whose
//! damage is not a stopped or killed process must also be undone there (or in the
//! runner's heal step) so the checker always reads a healed cluster.

use std::time::Duration;
use std::time::Instant;

use rand::rngs::StdRng;
use rand::Rng;
use rand::SeedableRng;
use serde::Serialize;

use super::cluster::ChaosCluster;

/// Mixed into the seed for the schedule's RNG (the workload uses other salts).
const SCHEDULE_SALT: u64 = 0x5EED_0FFA_1750_0000;

/// One kind of fault the nemesis can apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// SIGKILL the node leading the most shards; restart it (same data) after the hold.
    KillLeader,
    /// SIGKILL a node leading the fewest shards; restart it after the hold.
    KillFollower,
    /// SIGKILL a node chosen at random (by the plan's pick); restart it after the hold.
    KillRandom,
    /// SIGKILL every node at once (a coordinated crash); restart them all after the hold.
    KillAll,
    /// SIGSTOP the node leading the most shards for 2-3x the election timeout, then
    /// SIGCONT: it must not acknowledge anything without a quorum meanwhile.
    PauseLeader,
    /// Power cut of one random node: SIGKILL under the WAL's power-loss model, so every
    /// WAL write no completed fsync covered is lost too; restart after the hold.
    PowerLossNode,
    /// Power cut of every node at once (a data-center outage), same model; restart all.
    PowerLossAll,
}

impl FaultKind {
    pub const ALL: [FaultKind; 7] = [
        FaultKind::KillLeader,
        FaultKind::KillFollower,
        FaultKind::KillRandom,
        FaultKind::KillAll,
        FaultKind::PauseLeader,
        FaultKind::PowerLossNode,
        FaultKind::PowerLossAll,
    ];

    /// Whether this kind needs the nodes to run under the WAL's power-loss model
    /// (`--test-lose-unsynced-wal-writes`). With it on, every kill of the run is a power cut.
    pub fn needs_power_loss_model(self) -> bool {
        matches!(self, FaultKind::PowerLossNode | FaultKind::PowerLossAll)
    }

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::KillLeader => "kill-leader",
            FaultKind::KillFollower => "kill-follower",
            FaultKind::KillRandom => "kill-random",
            FaultKind::KillAll => "kill-all",
            FaultKind::PauseLeader => "pause-leader",
            FaultKind::PowerLossNode => "power-loss-node",
            FaultKind::PowerLossAll => "power-loss-all",
        }
    }

    pub fn parse(s: &str) -> anyhow::Result<FaultKind> {
        FaultKind::ALL.into_iter().find(|k| k.name() == s.trim()).ok_or_else(|| {
            anyhow::anyhow!(
                "unknown fault `{s}` (known: {})",
                FaultKind::ALL.iter().map(|k| k.name()).collect::<Vec<_>>().join(", ")
            )
        })
    }

    /// `a,b,c` (or `all`).
    pub fn parse_list(s: &str) -> anyhow::Result<Vec<FaultKind>> {
        if s.trim() == "all" {
            return Ok(FaultKind::ALL.to_vec());
        }
        let kinds =
            s.split(',').filter(|p| !p.trim().is_empty()).map(FaultKind::parse).collect::<anyhow::Result<Vec<_>>>()?;
        anyhow::ensure!(!kinds.is_empty(), "--faults is empty");
        Ok(kinds)
    }

    /// How long the damage lasts, ms (inclusive range).
    pub fn hold_range(self, t: &Timing) -> (u64, u64) {
        match self {
            FaultKind::KillLeader | FaultKind::KillFollower | FaultKind::KillRandom | FaultKind::PowerLossNode => {
                t.down_ms
            }
            FaultKind::KillAll | FaultKind::PowerLossAll => t.all_down_ms,
            FaultKind::PauseLeader => t.pause_ms,
        }
    }
}

/// Durations of the schedule, ms (inclusive ranges).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Timing {
    /// Quiet period before each fault.
    pub quiet_ms: (u64, u64),
    /// How long a killed node stays down.
    pub down_ms: (u64, u64),
    /// How long the whole cluster stays down after kill-all.
    pub all_down_ms: (u64, u64),
    /// How long a paused leader stays stopped.
    pub pause_ms: (u64, u64),
}

impl Timing {
    /// The defaults, with pauses at 2-3x the nodes' largest election timeout.
    pub fn for_election_timeout(election_timeout_max_ms: u64) -> Timing {
        let e = election_timeout_max_ms.max(1);
        Timing { quiet_ms: (3000, 8000), down_ms: (2000, 6000), all_down_ms: (1000, 3000), pause_ms: (2 * e, 3 * e) }
    }
}

/// One fault of the schedule: wait `quiet_ms`, apply `kind` for `hold_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlannedFault {
    pub quiet_ms: u64,
    pub kind: FaultKind,
    pub hold_ms: u64,
    /// Random number used to choose among candidate targets (kill-random, ties).
    pub pick: u64,
}

/// The fault schedule of a run of `duration_ms`: a pure function of its arguments. It
/// stops before a fault would end within the last minimum quiet period of the run.
pub fn schedule(seed: u64, duration_ms: u64, kinds: &[FaultKind], timing: &Timing) -> Vec<PlannedFault> {
    let mut rng = StdRng::seed_from_u64(seed ^ SCHEDULE_SALT);
    let mut out = Vec::new();
    if kinds.is_empty() {
        return out;
    }
    // The first faults cover every kind once, in an order shuffled by the seed (so a short
    // run, as in CI, exercises each class); after that kinds are drawn at random.
    let mut first_round: Vec<FaultKind> = kinds.to_vec();
    first_round.dedup();
    for i in (1..first_round.len()).rev() {
        first_round.swap(i, rng.gen_range(0..=i));
    }
    let mut t = 0u64;
    loop {
        let quiet_ms = rng.gen_range(timing.quiet_ms.0..=timing.quiet_ms.1.max(timing.quiet_ms.0));
        let kind = match first_round.pop() {
            Some(k) => k,
            None => kinds[rng.gen_range(0..kinds.len())],
        };
        let (lo, hi) = kind.hold_range(timing);
        let hold_ms = rng.gen_range(lo..=hi.max(lo));
        let pick = rng.gen::<u64>();
        // Restarting takes time too: keep a quiet tail at the end of the run.
        if t + quiet_ms + hold_ms + timing.quiet_ms.0 > duration_ms {
            return out;
        }
        t += quiet_ms + hold_ms;
        out.push(PlannedFault { quiet_ms, kind, hold_ms, pick });
    }
}

/// A fault as it happened: times in ms since the run started.
#[derive(Debug, Clone, Serialize)]
pub struct FaultRecord {
    pub kind: FaultKind,
    pub targets: Vec<u64>,
    pub start_ms: u64,
    pub end_ms: u64,
    /// Anything worth knowing (shards led by the target, a failed restart...).
    pub note: String,
}

/// What [`heal_fault`] must do to end a fault. New fault kinds add variants here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Undo {
    /// Restart these (killed) nodes with their data.
    Restart(Vec<u64>),
    /// SIGCONT these (stopped) nodes.
    Resume(Vec<u64>),
    /// Nothing to undo (no target was found).
    Nothing,
}

/// The node leading the most shards (ties: the plan's pick), and how many it leads.
async fn most_leading(cluster: &mut ChaosCluster, pick: u64) -> Option<(u64, usize)> {
    let lead = cluster.leadership().await;
    let top = lead.first()?.1;
    let tied: Vec<_> = lead.iter().filter(|(_, n)| *n == top).copied().collect();
    tied.get((pick % tied.len() as u64) as usize).copied()
}

/// Applies `plan`'s fault: returns its targets, a note, and how to undo it.
pub async fn inject(cluster: &mut ChaosCluster, plan: &PlannedFault) -> anyhow::Result<(Vec<u64>, String, Undo)> {
    match plan.kind {
        FaultKind::KillLeader => match most_leading(cluster, plan.pick).await {
            Some((id, led)) => {
                cluster.kill(id)?;
                Ok((vec![id], format!("it led {led} shards"), Undo::Restart(vec![id])))
            }
            None => Ok((vec![], "no node answered Cluster.Status".into(), Undo::Nothing)),
        },
        FaultKind::PauseLeader => match most_leading(cluster, plan.pick).await {
            Some((id, led)) => {
                cluster.pause(id)?;
                Ok((vec![id], format!("it led {led} shards"), Undo::Resume(vec![id])))
            }
            None => Ok((vec![], "no node answered Cluster.Status".into(), Undo::Nothing)),
        },
        FaultKind::KillFollower => {
            let lead = cluster.leadership().await;
            let Some(&(_, fewest)) = lead.last() else {
                return Ok((vec![], "no node answered Cluster.Status".into(), Undo::Nothing));
            };
            let tied: Vec<_> = lead.iter().filter(|(_, n)| *n == fewest).map(|(id, _)| *id).collect();
            let id = tied[(plan.pick % tied.len() as u64) as usize];
            cluster.kill(id)?;
            Ok((vec![id], format!("it led {fewest} shards"), Undo::Restart(vec![id])))
        }
        FaultKind::KillRandom | FaultKind::PowerLossNode => {
            let ids = cluster.ids();
            let id = ids[(plan.pick % ids.len() as u64) as usize];
            cluster.kill(id)?;
            Ok((vec![id], power_note(plan.kind), Undo::Restart(vec![id])))
        }
        FaultKind::KillAll | FaultKind::PowerLossAll => {
            let ids = cluster.ids();
            for id in &ids {
                cluster.kill(*id)?;
            }
            Ok((ids.clone(), power_note(plan.kind), Undo::Restart(ids)))
        }
    }
}

/// Ends a fault.
fn power_note(kind: FaultKind) -> String {
    if kind.needs_power_loss_model() {
        "power cut: WAL writes no fsync covered are lost".into()
    } else {
        String::new()
    }
}

pub fn heal_fault(cluster: &mut ChaosCluster, undo: &Undo) -> anyhow::Result<()> {
    match undo {
        Undo::Restart(ids) => ids.iter().try_for_each(|id| cluster.restart(*id)),
        Undo::Resume(ids) => ids.iter().try_for_each(|id| cluster.resume(*id)),
        Undo::Nothing => Ok(()),
    }
}

/// What the nemesis did over a run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct NemesisLog {
    pub faults: Vec<FaultRecord>,
    /// Node processes that exited without being killed: (ms, node, exit status and log).
    pub node_crashes: Vec<(u64, u64, String)>,
}

/// Runs `plan` against `cluster` until `end`: for each fault, a quiet period, the fault,
/// its hold time, its undo. A fault that would outlast `end` is not started. Nodes that
/// crashed by themselves are recorded and restarted before each fault.
pub async fn run(
    cluster: &mut ChaosCluster,
    plan: &[PlannedFault],
    start: Instant,
    end: Instant,
) -> anyhow::Result<NemesisLog> {
    let ms = |t: Instant| t.saturating_duration_since(start).as_millis() as u64;
    let mut log = NemesisLog::default();
    for p in plan {
        let quiet_until = Instant::now() + Duration::from_millis(p.quiet_ms);
        if quiet_until + Duration::from_millis(p.hold_ms) > end {
            break;
        }
        tokio::time::sleep_until(quiet_until.into()).await;
        for (id, why) in cluster.reap_unexpected_exits() {
            eprintln!("chaos: [{:>6} ms] node {id} exited by itself: {why}; restarting it", ms(Instant::now()));
            log.node_crashes.push((ms(Instant::now()), id, why));
            cluster.restart(id)?;
        }
        let t0 = Instant::now();
        let (targets, note, undo) = inject(cluster, p).await?;
        eprintln!("chaos: [{:>6} ms] {} {:?} {note} (hold {} ms)", ms(t0), p.kind.name(), targets, p.hold_ms);
        tokio::time::sleep(Duration::from_millis(p.hold_ms)).await;
        heal_fault(cluster, &undo)?;
        let t1 = Instant::now();
        eprintln!("chaos: [{:>6} ms] healed {} {:?}", ms(t1), p.kind.name(), targets);
        log.faults.push(FaultRecord { kind: p.kind, targets, start_ms: ms(t0), end_ms: ms(t1), note });
    }
    Ok(log)
}

/// The largest `--election-timeout-max-ms` in `node_args` (`--x=v` or `--x v`), else the
/// node's default (600 ms).
pub fn election_timeout_max_ms(node_args: &[String]) -> u64 {
    const FLAG: &str = "--election-timeout-max-ms";
    let mut v = 600;
    for (i, a) in node_args.iter().enumerate() {
        let val = if let Some(x) = a.strip_prefix(&format!("{FLAG}=")) {
            Some(x.to_string())
        } else if a == FLAG {
            node_args.get(i + 1).cloned()
        } else {
            None
        };
        if let Some(n) = val.and_then(|x| x.parse().ok()) {
            v = n;
        }
    }
    v
}
