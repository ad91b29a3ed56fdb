//! The nemesis: a seeded schedule of process and network faults, alternating quiet periods
//! and faults, applied to a [`ChaosCluster`] one at a time.
//!
//! Process faults (kill, pause, power loss, disk corruption) work in every network mode; network faults
//! (partitions, flapping, slow and lossy links: [`FaultKind::NETWORK`]) need the nodes in
//! network namespaces (`--net netns`, see [`super::netns`]).
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
//! after the planned hold time (a fault that acts during its hold, like `flap`, does so in
//! [`hold`]). To add a kind:
//!
//! 1. add a variant to [`FaultKind`], to [`FaultKind::PROCESS`] or [`FaultKind::NETWORK`]
//!    (and the length of [`FaultKind::ALL`]) and to its `name`;
//! 2. give it a hold-time range in [`FaultKind::hold_range`];
//! 3. add its arm to [`inject`] and a matching [`Undo`] variant handled by [`heal_fault`]
//!    (network kinds: see `Undo::HealCuts`, `Undo::RestoreLink`).
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
use super::cluster::NetMode;
use super::damage;
use super::netns;
use super::netns::LinkFault;

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
    /// Disk corruption (fault 6) of one random node: SIGKILL it, damage its WAL (a flipped
    /// bit in a record or a header, an older segment cut at a record boundary, a missing
    /// segment: `damage.rs`), restart after the hold. The node must find it, move the WAL
    /// aside and rejoin without a vote until caught up. Skipped while a node still repairs
    /// (corruption of a majority is outside the guarantee).
    CorruptWal,
    /// Disk corruption of one random node's snapshot file (a flipped bit or a cut), node
    /// killed first and restarted after the hold; it must quarantine the file and rebuild it.
    /// A node without a snapshot file yet is only killed and restarted (noted).
    CorruptSnapshot,
    /// Network (`--net netns`): cut the node leading the most shards off from every other
    /// node (iptables DROP both ways in the namespaces); the tester still reaches it, so
    /// clients talk to a node that is up but in a minority. Undone by removing the rules.
    PartitionLeader,
    /// Network: cut a random minority (one node of 3, two of 5: `(n-1)/2`) off from the
    /// rest. Undone by removing the rules.
    PartitionRandom,
    /// Network, 5 nodes only (skipped with a note otherwise): two sides of two nodes that
    /// cannot talk to each other, and one node (the bridge) that talks to both. Undone by
    /// removing the rules.
    Bridge,
    /// Network: during the hold, cut and heal one random node's links alternately, every
    /// 200-800 ms (seeded by the plan's pick). Undone by removing the rules.
    Flap,
    /// Network: delay every packet one random node sends by 50 ms ± 20 ms (`tc netem`; a
    /// 1 mbit token bucket on kernels without netem). Undone by deleting the qdisc.
    SlowLink,
    /// Network: lose 10% of the packets one random node sends, plus 5 ms delay (`tc netem`;
    /// an iptables random drop on kernels without netem). Undone by deleting the qdisc or
    /// rule.
    LossyLink,
}

impl FaultKind {
    /// Every kind, process then network.
    pub const ALL: [FaultKind; 15] = concat_kinds(FaultKind::PROCESS, FaultKind::NETWORK);

    /// The kinds that act on processes (valid in every network mode).
    pub const PROCESS: [FaultKind; 9] = [
        FaultKind::KillLeader,
        FaultKind::KillFollower,
        FaultKind::KillRandom,
        FaultKind::KillAll,
        FaultKind::PauseLeader,
        FaultKind::PowerLossNode,
        FaultKind::PowerLossAll,
        FaultKind::CorruptWal,
        FaultKind::CorruptSnapshot,
    ];

    /// The kinds that act on the network between nodes (need `--net netns`).
    pub const NETWORK: [FaultKind; 6] = [
        FaultKind::PartitionLeader,
        FaultKind::PartitionRandom,
        FaultKind::Bridge,
        FaultKind::Flap,
        FaultKind::SlowLink,
        FaultKind::LossyLink,
    ];

    /// Whether this kind needs the nodes in network namespaces (`--net netns`).
    pub fn needs_netns(self) -> bool {
        FaultKind::NETWORK.contains(&self)
    }

    /// The kinds valid in `mode`: what `--faults all` means.
    pub fn valid_for(mode: NetMode) -> Vec<FaultKind> {
        FaultKind::ALL.into_iter().filter(|k| mode == NetMode::Netns || !k.needs_netns()).collect()
    }

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
            FaultKind::CorruptWal => "corrupt-wal",
            FaultKind::CorruptSnapshot => "corrupt-snapshot",
            FaultKind::PartitionLeader => "partition-leader",
            FaultKind::PartitionRandom => "partition-random",
            FaultKind::Bridge => "bridge",
            FaultKind::Flap => "flap",
            FaultKind::SlowLink => "slow-link",
            FaultKind::LossyLink => "lossy-link",
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

    /// `a,b,c` (or `all`) with the nodes on loopback: see [`FaultKind::parse_list_for`].
    pub fn parse_list(s: &str) -> anyhow::Result<Vec<FaultKind>> {
        FaultKind::parse_list_for(s, NetMode::Loopback)
    }

    /// `a,b,c`, or `all`: every kind valid in `mode`. A network kind without
    /// `--net netns` is an error.
    pub fn parse_list_for(s: &str, mode: NetMode) -> anyhow::Result<Vec<FaultKind>> {
        if s.trim() == "all" {
            return Ok(FaultKind::valid_for(mode));
        }
        let kinds =
            s.split(',').filter(|p| !p.trim().is_empty()).map(FaultKind::parse).collect::<anyhow::Result<Vec<_>>>()?;
        anyhow::ensure!(!kinds.is_empty(), "--faults is empty");
        let net: Vec<&str> = kinds.iter().filter(|k| k.needs_netns()).map(|k| k.name()).collect();
        anyhow::ensure!(
            mode == NetMode::Netns || net.is_empty(),
            "fault(s) {} need real links between nodes: add `--net netns` (root, ip, iptables, tc)",
            net.join(", ")
        );
        Ok(kinds)
    }

    /// How long the damage lasts, ms (inclusive range).
    pub fn hold_range(self, t: &Timing) -> (u64, u64) {
        match self {
            FaultKind::KillLeader
            | FaultKind::KillFollower
            | FaultKind::KillRandom
            | FaultKind::PowerLossNode
            | FaultKind::CorruptWal
            | FaultKind::CorruptSnapshot => t.down_ms,
            FaultKind::KillAll | FaultKind::PowerLossAll => t.all_down_ms,
            FaultKind::PauseLeader => t.pause_ms,
            FaultKind::PartitionLeader
            | FaultKind::PartitionRandom
            | FaultKind::Bridge
            | FaultKind::SlowLink
            | FaultKind::LossyLink => t.net_ms,
            FaultKind::Flap => t.flap_ms,
        }
    }
}

/// `a` then `b`: [`FaultKind::ALL`] from the two lists, so a new kind is listed once.
const fn concat_kinds<const A: usize, const B: usize, const N: usize>(
    a: [FaultKind; A],
    b: [FaultKind; B],
) -> [FaultKind; N] {
    assert!(A + B == N, "ALL must be as long as PROCESS and NETWORK together");
    let mut out = [FaultKind::KillLeader; N];
    let mut i = 0;
    while i < A {
        out[i] = a[i];
        i += 1;
    }
    while i < N {
        out[i] = b[i - A];
        i += 1;
    }
    out
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
    /// How long a partition, bridge, slow or lossy link lasts.
    pub net_ms: (u64, u64),
    /// How long a node's links flap.
    pub flap_ms: (u64, u64),
}

impl Timing {
    /// The defaults, with pauses at 2-3x the nodes' largest election timeout.
    pub fn for_election_timeout(election_timeout_max_ms: u64) -> Timing {
        let e = election_timeout_max_ms.max(1);
        Timing {
            quiet_ms: (3000, 8000),
            down_ms: (2000, 6000),
            all_down_ms: (1000, 3000),
            pause_ms: (2 * e, 3 * e),
            net_ms: (2000, 6000),
            flap_ms: (4000, 8000),
        }
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
    /// Remove every cut (iptables rules) between nodes.
    HealCuts,
    /// Cut and heal this node's links during the hold ([`hold`]); then remove every cut.
    Flap(u64),
    /// Remove this node's qdisc (netem) or loss rule.
    RestoreLink(u64),
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
        FaultKind::CorruptWal | FaultKind::CorruptSnapshot => {
            if let Some(why) = repair_in_progress(cluster).await {
                return Ok((
                    vec![],
                    format!("skipped: {why}; corruption beyond a minority is out of scope"),
                    Undo::Nothing,
                ));
            }
            let ids = cluster.ids();
            let id = ids[(plan.pick % ids.len() as u64) as usize];
            cluster.kill(id)?;
            let data = cluster.node(id)?.data_dir.clone();
            let note = if plan.kind == FaultKind::CorruptWal {
                damage::corrupt_wal(&data.join("wal"), plan.pick)?
            } else {
                damage::corrupt_snapshot(&data.join("sm").join("snapshots"), plan.pick)?
                    .unwrap_or_else(|| "no snapshot file yet: only killed".into())
            };
            Ok((vec![id], note, Undo::Restart(vec![id])))
        }
        FaultKind::PartitionLeader => {
            let Some((id, led)) = most_leading(cluster, plan.pick).await else {
                return Ok((vec![], "no node answered Cluster.Status".into(), Undo::Nothing));
            };
            let ids = cluster.ids();
            net(cluster, plan.kind)?.set_cuts(netns::isolate(id, &ids))?;
            Ok((vec![id], format!("it led {led} shards; cut off from {:?}", others(&ids, &[id])), Undo::HealCuts))
        }
        FaultKind::PartitionRandom => {
            let ids = cluster.ids();
            let minority = random_minority(&ids, plan.pick);
            let majority = others(&ids, &minority);
            net(cluster, plan.kind)?.set_cuts(netns::split(&minority, &majority))?;
            Ok((minority, format!("cut off from {majority:?}"), Undo::HealCuts))
        }
        FaultKind::Bridge => {
            let ids = cluster.ids();
            let Some((a, bridge, b)) = bridge_sides(&ids, plan.pick) else {
                return Ok((
                    vec![],
                    format!("skipped: bridge needs 5 nodes, the cluster has {}", ids.len()),
                    Undo::Nothing,
                ));
            };
            net(cluster, plan.kind)?.set_cuts(netns::split(&a, &b))?;
            Ok((vec![bridge], format!("{a:?} and {b:?} cut apart; node {bridge} talks to both"), Undo::HealCuts))
        }
        FaultKind::Flap => {
            let ids = cluster.ids();
            let id = ids[(plan.pick % ids.len() as u64) as usize];
            net(cluster, plan.kind)?.set_cuts(netns::isolate(id, &ids))?;
            Ok((vec![id], "links cut and healed every 200-800 ms".into(), Undo::Flap(id)))
        }
        FaultKind::SlowLink | FaultKind::LossyLink => {
            let ids = cluster.ids();
            let id = ids[(plan.pick % ids.len() as u64) as usize];
            let how = if plan.kind == FaultKind::SlowLink { LinkFault::Slow } else { LinkFault::Lossy };
            let note = net(cluster, plan.kind)?.degrade(id, how)?;
            Ok((vec![id], note, Undo::RestoreLink(id)))
        }
    }
}

/// Why another corruption must wait: a node still repairing (or not answering, so it might
/// be), or `None`.
async fn repair_in_progress(cluster: &mut ChaosCluster) -> Option<String> {
    for id in cluster.ids() {
        match cluster.status(id, Duration::from_millis(1000)).await {
            Some(s) if s.shards.iter().any(|sh| sh.repairing) => return Some(format!("node {id} is still repairing")),
            Some(_) => {}
            None => return Some(format!("node {id} does not answer Cluster.Status")),
        }
    }
    None
}

/// The cluster's namespaces, or an error naming the kind (network kinds need netns).
fn net(cluster: &mut ChaosCluster, kind: FaultKind) -> anyhow::Result<&mut netns::NetNs> {
    cluster.net_mut().ok_or_else(|| anyhow::anyhow!("fault {} needs --net netns", kind.name()))
}

/// `ids` without `except`.
fn others(ids: &[u64], except: &[u64]) -> Vec<u64> {
    ids.iter().copied().filter(|i| !except.contains(i)).collect()
}

/// `pick`'s permutation of `ids` (seeded shuffle).
fn shuffled(ids: &[u64], pick: u64) -> Vec<u64> {
    let mut rng = StdRng::seed_from_u64(pick);
    let mut v = ids.to_vec();
    for i in (1..v.len()).rev() {
        v.swap(i, rng.gen_range(0..=i));
    }
    v
}

/// A random strict minority of `ids` (at least one node): `(n-1)/2` nodes, sorted.
pub fn random_minority(ids: &[u64], pick: u64) -> Vec<u64> {
    let k = ((ids.len().saturating_sub(1)) / 2).max(1).min(ids.len());
    let mut m: Vec<u64> = shuffled(ids, pick).into_iter().take(k).collect();
    m.sort_unstable();
    m
}

/// For 5 nodes: two sides of two nodes and the bridge node between them (None otherwise).
pub fn bridge_sides(ids: &[u64], pick: u64) -> Option<(Vec<u64>, u64, Vec<u64>)> {
    if ids.len() != 5 {
        return None;
    }
    let v = shuffled(ids, pick);
    let (mut a, mut b) = (vec![v[0], v[1]], vec![v[3], v[4]]);
    a.sort_unstable();
    b.sort_unstable();
    Some((a, v[2], b))
}

/// The flap intervals of a fault with this pick and hold: 200-800 ms each, until `hold_ms`
/// is used up (the last one shortened). A pure function of its arguments.
pub fn flap_intervals(pick: u64, hold_ms: u64) -> Vec<u64> {
    let mut rng = StdRng::seed_from_u64(pick ^ 0xF1A9);
    let mut out = Vec::new();
    let mut t = 0;
    while t < hold_ms {
        let d = rng.gen_range(200..=800).min(hold_ms - t);
        out.push(d);
        t += d;
    }
    out
}

/// Waits out a fault's hold time; a flapping fault toggles its node's links meanwhile.
/// Returns an addition to the fault's note.
pub async fn hold(cluster: &mut ChaosCluster, plan: &PlannedFault, undo: &Undo) -> anyhow::Result<String> {
    let Undo::Flap(id) = undo else {
        tokio::time::sleep(Duration::from_millis(plan.hold_ms)).await;
        return Ok(String::new());
    };
    let ids = cluster.ids();
    let mut cut = true; // inject cut it
    let mut cuts = 1;
    // Absolute deadlines: the time iptables takes does not stretch the hold.
    let mut at = tokio::time::Instant::now();
    for d in flap_intervals(plan.pick, plan.hold_ms) {
        at += Duration::from_millis(d);
        tokio::time::sleep_until(at).await;
        cut = !cut;
        let set = if cut { netns::isolate(*id, &ids) } else { netns::Cuts::new() };
        net(cluster, plan.kind)?.set_cuts(set)?;
        cuts += usize::from(cut);
    }
    Ok(format!(" ({cuts} cuts)"))
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
        Undo::HealCuts | Undo::Flap(_) => match cluster.net_mut() {
            Some(net) => net.set_cuts(netns::Cuts::new()),
            None => Ok(()),
        },
        Undo::RestoreLink(id) => match cluster.net_mut() {
            Some(net) => net.restore(*id),
            None => Ok(()),
        },
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
        let (targets, mut note, undo) = inject(cluster, p).await?;
        eprintln!("chaos: [{:>6} ms] {} {:?} {note} (hold {} ms)", ms(t0), p.kind.name(), targets, p.hold_ms);
        note.push_str(&hold(cluster, p, &undo).await?);
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
