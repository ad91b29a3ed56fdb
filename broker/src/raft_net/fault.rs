//! Network fault injection for tests: per directed link (from, to) between nodes, cut it,
//! delay its RPCs (fixed + jitter), or drop a share of them.
//!
//! Off unless a test builds its [`PeerPool`](super::PeerPool) with
//! [`with_fault_injector`](super::PeerPool::with_fault_injector); the client consults it
//! before each Raft RPC. One injector is usually shared by all nodes of an in-process
//! cluster, so a test can cut any link.
//!
//! Randomness (jitter, drops) comes from one RNG per link, seeded from the injector's seed
//! and the link, so the n-th RPC on a link gets the same verdict in every run with the
//! same seed. (Which RPC is the n-th still depends on task scheduling; a cut is fully
//! deterministic.)

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use habar_raft_store::types::NodeId;
use rand::rngs::StdRng;
use rand::Rng;
use rand::SeedableRng;

/// The verdict of a test's injector (`None` in production) on one RPC or stream message of
/// `kind` from `from` to `to`, counted in [`FAULTS_INJECTED`](super::metric::FAULTS_INJECTED).
pub(crate) fn consult(
    faults: Option<&FaultInjector>,
    from: NodeId,
    to: NodeId,
    kind: super::RpcKind,
) -> Option<Verdict> {
    let verdict = faults.map(|f| f.decide(from, to));
    if verdict.is_some() {
        metrics::counter!(super::metric::FAULTS_INJECTED, "kind" => kind.as_str()).increment(1);
    }
    verdict
}

/// The faults of one directed link.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LinkFaults {
    /// Every RPC fails at once as unreachable (like a refused connection).
    pub cut: bool,
    /// Added before each RPC is sent.
    pub delay: Duration,
    /// Up to this much more delay, uniformly random.
    pub jitter: Duration,
    /// Share of RPCs lost, in `0.0..=1.0`. A lost RPC fails as a timeout once the RPC's
    /// deadline passes; half of the losses (by the RNG) lose the request, the other half
    /// deliver it and lose the response.
    pub drop_ratio: f64,
}

impl LinkFaults {
    fn is_clear(&self) -> bool {
        !self.cut && self.delay.is_zero() && self.jitter.is_zero() && self.drop_ratio <= 0.0
    }
}

/// What to do with one RPC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Send it after `delay`.
    Deliver { delay: Duration },
    /// Fail it now as unreachable.
    Cut,
    /// Never send it; fail it as a timeout at its deadline.
    DropRequest,
    /// Send it after `delay`, then discard the response and fail as a timeout at the
    /// deadline.
    DropResponse { delay: Duration },
}

/// How many RPCs got each kind of verdict (a test can check its faults took effect).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultStats {
    pub delivered: u64,
    pub delayed: u64,
    pub cut: u64,
    pub dropped: u64,
}

struct Link {
    faults: LinkFaults,
    rng: StdRng,
}

struct State {
    seed: u64,
    links: HashMap<(NodeId, NodeId), Link>,
    stats: FaultStats,
}

/// Shared, cheap-to-clone fault configuration. See the module docs.
#[derive(Clone)]
pub struct FaultInjector {
    state: Arc<Mutex<State>>,
}

impl FaultInjector {
    /// An injector with no faults; `seed` drives all its randomness.
    pub fn new(seed: u64) -> Self {
        Self { state: Arc::new(Mutex::new(State { seed, links: HashMap::new(), stats: FaultStats::default() })) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn with_link<R>(&self, from: NodeId, to: NodeId, f: impl FnOnce(&mut LinkFaults) -> R) -> R {
        let mut st = self.lock();
        let seed = st.seed;
        let link = st.links.entry((from, to)).or_insert_with(|| Link {
            faults: LinkFaults::default(),
            rng: StdRng::seed_from_u64(link_seed(seed, from, to)),
        });
        f(&mut link.faults)
    }

    /// Replaces the faults of link `from → to`.
    pub fn set_link(&self, from: NodeId, to: NodeId, faults: LinkFaults) {
        self.with_link(from, to, |f| *f = faults);
    }

    /// The faults of link `from → to`.
    pub fn link(&self, from: NodeId, to: NodeId) -> LinkFaults {
        self.lock().links.get(&(from, to)).map(|l| l.faults.clone()).unwrap_or_default()
    }

    /// Cuts `from → to` (one direction).
    pub fn cut(&self, from: NodeId, to: NodeId) {
        self.with_link(from, to, |f| f.cut = true);
    }

    /// Cuts both directions between `a` and `b`.
    pub fn cut_both(&self, a: NodeId, b: NodeId) {
        self.cut(a, b);
        self.cut(b, a);
    }

    /// Cuts every link between a node of `side_a` and a node of `side_b`, both ways.
    pub fn partition(&self, side_a: &[NodeId], side_b: &[NodeId]) {
        for &a in side_a {
            for &b in side_b {
                self.cut_both(a, b);
            }
        }
    }

    /// Cuts `node` off from each of `others`, both ways.
    pub fn isolate(&self, node: NodeId, others: &[NodeId]) {
        self.partition(&[node], others);
    }

    /// Restores `from → to` (clears the cut; delay and drops stay).
    pub fn heal(&self, from: NodeId, to: NodeId) {
        self.with_link(from, to, |f| f.cut = false);
    }

    /// Clears every fault of every link.
    pub fn heal_all(&self) {
        for link in self.lock().links.values_mut() {
            link.faults = LinkFaults::default();
        }
    }

    /// Delays each RPC on `from → to` by `fixed` plus up to `jitter`.
    pub fn delay(&self, from: NodeId, to: NodeId, fixed: Duration, jitter: Duration) {
        self.with_link(from, to, |f| {
            f.delay = fixed;
            f.jitter = jitter;
        });
    }

    /// Loses a share (`0.0..=1.0`) of the RPCs on `from → to`.
    pub fn drop_ratio(&self, from: NodeId, to: NodeId, ratio: f64) {
        self.with_link(from, to, |f| f.drop_ratio = ratio.clamp(0.0, 1.0));
    }

    /// The verdict for the next RPC on `from → to`. Consumes the link's randomness only
    /// when it has jitter or drops.
    pub fn decide(&self, from: NodeId, to: NodeId) -> Verdict {
        let mut st = self.lock();
        let verdict = match st.links.get_mut(&(from, to)) {
            None => Verdict::Deliver { delay: Duration::ZERO },
            Some(link) if link.faults.is_clear() => Verdict::Deliver { delay: Duration::ZERO },
            Some(link) if link.faults.cut => Verdict::Cut,
            Some(link) => {
                let mut delay = link.faults.delay;
                if !link.faults.jitter.is_zero() {
                    let max = u64::try_from(link.faults.jitter.as_micros()).unwrap_or(u64::MAX);
                    delay += Duration::from_micros(link.rng.gen_range(0..=max));
                }
                if link.faults.drop_ratio > 0.0 && link.rng.gen_bool(link.faults.drop_ratio.min(1.0)) {
                    if link.rng.gen_bool(0.5) {
                        Verdict::DropRequest
                    } else {
                        Verdict::DropResponse { delay }
                    }
                } else {
                    Verdict::Deliver { delay }
                }
            }
        };
        match verdict {
            Verdict::Deliver { delay } if delay.is_zero() => st.stats.delivered += 1,
            Verdict::Deliver { .. } => {
                st.stats.delivered += 1;
                st.stats.delayed += 1;
            }
            Verdict::Cut => st.stats.cut += 1,
            Verdict::DropRequest | Verdict::DropResponse { .. } => st.stats.dropped += 1,
        }
        verdict
    }

    /// Counts of verdicts so far.
    pub fn stats(&self) -> FaultStats {
        self.lock().stats
    }
}

impl std::fmt::Debug for FaultInjector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.lock();
        let mut faulty: Vec<_> =
            st.links.iter().filter(|(_, l)| !l.faults.is_clear()).map(|(k, l)| (*k, l.faults.clone())).collect();
        faulty.sort_by_key(|(k, _)| *k);
        f.debug_struct("FaultInjector").field("seed", &st.seed).field("links", &faulty).finish()
    }
}

/// A per-link seed: splitmix64 of the injector's seed mixed with the link.
fn link_seed(seed: u64, from: NodeId, to: NodeId) -> u64 {
    let mut z = seed ^ from.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ to.rotate_left(32);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_faults_delivers_at_once() {
        let f = FaultInjector::new(1);
        assert_eq!(f.decide(1, 2), Verdict::Deliver { delay: Duration::ZERO });
        assert_eq!(f.stats(), FaultStats { delivered: 1, ..Default::default() });
    }

    #[test]
    fn cut_is_directional_and_heals() {
        let f = FaultInjector::new(1);
        f.cut(1, 2);
        assert_eq!(f.decide(1, 2), Verdict::Cut);
        assert_eq!(f.decide(2, 1), Verdict::Deliver { delay: Duration::ZERO });
        f.heal(1, 2);
        assert_eq!(f.decide(1, 2), Verdict::Deliver { delay: Duration::ZERO });
    }

    #[test]
    fn partition_cuts_every_cross_link_both_ways_and_nothing_else() {
        let f = FaultInjector::new(1);
        f.partition(&[1], &[2, 3]);
        for (a, b) in [(1, 2), (2, 1), (1, 3), (3, 1)] {
            assert_eq!(f.decide(a, b), Verdict::Cut, "{a}->{b}");
        }
        assert_eq!(f.decide(2, 3), Verdict::Deliver { delay: Duration::ZERO });
        f.heal_all();
        assert_eq!(f.decide(3, 1), Verdict::Deliver { delay: Duration::ZERO });
    }

    #[test]
    fn delay_stays_within_fixed_plus_jitter() {
        let f = FaultInjector::new(9);
        f.delay(1, 2, Duration::from_millis(5), Duration::from_millis(3));
        for _ in 0..200 {
            match f.decide(1, 2) {
                Verdict::Deliver { delay } => {
                    assert!(delay >= Duration::from_millis(5) && delay <= Duration::from_millis(8), "{delay:?}")
                }
                v => panic!("unexpected {v:?}"),
            }
        }
    }

    #[test]
    fn same_seed_gives_the_same_verdict_sequence_per_link() {
        let run = |seed| {
            let f = FaultInjector::new(seed);
            f.drop_ratio(1, 2, 0.3);
            f.delay(1, 2, Duration::ZERO, Duration::from_millis(10));
            // Traffic on another link must not disturb this link's sequence.
            f.drop_ratio(2, 1, 0.5);
            (0..100)
                .map(|i| {
                    if i % 3 == 0 {
                        f.decide(2, 1);
                    }
                    f.decide(1, 2)
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
    }

    #[test]
    fn drop_ratio_drops_about_that_share() {
        let f = FaultInjector::new(7);
        f.drop_ratio(1, 2, 0.25);
        let n = 4000;
        let dropped =
            (0..n).filter(|_| matches!(f.decide(1, 2), Verdict::DropRequest | Verdict::DropResponse { .. })).count();
        // Binomial(4000, 0.25): mean 1000, sd ~27; a wide margin.
        assert!((850..1150).contains(&dropped), "{dropped}");
        assert_eq!(f.stats().dropped, dropped as u64);
    }
}
