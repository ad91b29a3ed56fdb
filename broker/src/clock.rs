//! The node's clock: its own wall clock, corrected toward the cluster's median clock.
//!
//! Expiry (`expires_at_ms`) is judged by wall-clock time: a node hides an expired envelope
//! from reads and subscriptions, and a leader's housekeeping entry deletes it on every
//! replica at the time the leader stamps. One node with a wrong clock would then hide and
//! delete early (clock ahead) or serve late (clock behind).
//!
//! So each node measures the other nodes' clocks once a second (the liveness probe asks
//! each peer for its raw clock; offset = peer's time - the middle of the round trip,
//! error at most half the round trip) and uses the **median** of all nodes' clocks (its
//! own included) as the time it stamps and judges by. While a majority of clocks is right,
//! one wrong clock moves no node's time, including its own: a node 30 s ahead sees two
//! peers 30 s behind it and corrects itself. With an even number of samples the middle
//! value closer to this node's own clock wins (a node trusts itself on a tie).
//!
//! Bound: a sample whose round trip exceeds `2 * max_clock_skew_ms` is discarded, so the
//! estimate errs by at most `max_clock_skew_ms` beyond the majority's own skew; a node
//! whose correction exceeds that bound logs a warning (its clock is wrong) and reports it
//! as the `habar_clock_correction_ms` gauge. Samples older than [`SAMPLE_TTL`] are
//! ignored, so a node cut off from its peers falls back to its own clock; housekeeping
//! (which deletes) waits until the clock is calibrated against a majority.
//!
//! Tests skew a node with the test-only setting `test_clock_offset_ms`, which shifts the
//! node's *raw* clock, as a wrong system clock would.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use std::time::Instant;
use std::time::SystemTime;
use std::time::UNIX_EPOCH;

use habar_raft_store::types::NodeId;

/// A peer's clock sample is used this long after it was taken.
pub const SAMPLE_TTL: Duration = Duration::from_secs(5);

pub struct Clock {
    /// Test only: added to the system clock (a skewed machine).
    test_offset_ms: i64,
    max_skew_ms: u64,
    /// Nodes in the cluster, this one included (for the majority).
    cluster_size: usize,
    /// Per peer: its clock minus ours (ms), and when measured.
    peers: Mutex<HashMap<NodeId, (i64, Instant)>>,
    /// Whether the last correction was over the bound (to log changes only).
    warned: Mutex<bool>,
}

fn system_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

impl Clock {
    pub fn new(test_offset_ms: i64, max_skew_ms: u64, cluster_size: usize) -> Clock {
        Clock {
            test_offset_ms,
            max_skew_ms,
            cluster_size: cluster_size.max(1),
            peers: Mutex::new(HashMap::new()),
            warned: Mutex::new(false),
        }
    }

    /// This machine's clock, unix ms (what a peer's probe is answered with).
    pub fn local_ms(&self) -> u64 {
        system_ms().saturating_add(self.test_offset_ms).max(0) as u64
    }

    /// Records a probe of `peer`: sent at local `sent_ms`, answered with `peer_ms`,
    /// received at local `received_ms`. Returns false if the sample was discarded.
    pub fn observe(&self, peer: NodeId, sent_ms: u64, peer_ms: u64, received_ms: u64) -> bool {
        let rtt = received_ms.saturating_sub(sent_ms);
        if received_ms < sent_ms || rtt > 2 * self.max_skew_ms {
            return false;
        }
        let mid = sent_ms as i64 + rtt as i64 / 2;
        let offset = peer_ms as i64 - mid;
        self.peers.lock().unwrap_or_else(|p| p.into_inner()).insert(peer, (offset, Instant::now()));
        true
    }

    /// Fresh peer offsets.
    fn fresh(&self) -> Vec<i64> {
        let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers.values().filter(|(_, at)| at.elapsed() < SAMPLE_TTL).map(|(o, _)| *o).collect()
    }

    /// How far this node's clock is moved (ms): the median of all clocks minus its own.
    pub fn correction_ms(&self) -> i64 {
        let mut v = self.fresh();
        v.push(0);
        median_toward_zero(v)
    }

    /// True once fresh samples cover a majority of the cluster (this node included), so
    /// the median cannot be one wrong clock's.
    pub fn calibrated(&self) -> bool {
        self.fresh().len() + 1 > self.cluster_size / 2
    }

    /// Cluster time, unix ms: what this node stamps on entries and judges expiry by.
    pub fn now_ms(&self) -> u64 {
        let c = self.correction_ms();
        (self.local_ms() as i64).saturating_add(c).max(0) as u64
    }

    /// Publishes the correction as a gauge and logs when it crosses the bound.
    pub fn report(&self) {
        let c = self.correction_ms();
        metrics::gauge!("habar_clock_correction_ms").set(c as f64);
        let over = c.unsigned_abs() > self.max_skew_ms;
        let mut warned = self.warned.lock().unwrap_or_else(|p| p.into_inner());
        if over && !*warned {
            tracing::warn!(
                correction_ms = c,
                max_clock_skew_ms = self.max_skew_ms,
                "this node's clock differs from the cluster's median by more than max_clock_skew_ms; \
                 using the cluster's time (fix the clock: NTP)"
            );
        } else if !over && *warned {
            tracing::info!(correction_ms = c, "clock back within max_clock_skew_ms of the cluster's");
        }
        *warned = over;
    }
}

/// The median; of two middle values, the one closer to zero.
fn median_toward_zero(mut v: Vec<i64>) -> i64 {
    v.sort_unstable();
    let n = v.len();
    if n == 0 {
        return 0;
    }
    if n % 2 == 1 {
        return v[n / 2];
    }
    let (a, b) = (v[n / 2 - 1], v[n / 2]);
    if a.unsigned_abs() <= b.unsigned_abs() {
        a
    } else {
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_wrong_clock_of_three_moves_nobody() {
        // A good node: one peer agrees, one is 30 s ahead.
        let good = Clock::new(0, 500, 3);
        let t = good.local_ms();
        assert!(good.observe(2, t, t + 1, t + 2));
        assert!(good.observe(3, t, t + 30_000, t + 2));
        assert!(good.calibrated());
        assert!(good.correction_ms().abs() <= 1, "{}", good.correction_ms());

        // The node 30 s ahead sees both peers 30 s behind: it corrects itself.
        let ahead = Clock::new(30_000, 500, 3);
        let t = ahead.local_ms();
        assert!(ahead.observe(1, t, t - 30_000, t + 2));
        assert!(ahead.observe(2, t, t - 29_999, t + 2));
        let c = ahead.correction_ms();
        assert!((-30_001..=-29_998).contains(&c), "{c}");
        assert!(ahead.now_ms().abs_diff(system_ms() as u64) < 100);
    }

    #[test]
    fn a_tie_trusts_this_node_and_uncalibrated_clocks_are_not() {
        let c = Clock::new(0, 500, 3);
        assert!(!c.calibrated(), "no samples: not calibrated");
        assert_eq!(c.correction_ms(), 0);
        let t = c.local_ms();
        assert!(c.observe(2, t, t + 30_000, t + 1));
        assert!(c.calibrated());
        assert_eq!(c.correction_ms(), 0, "one peer disagreeing cannot move this node");
    }

    #[test]
    fn slow_samples_are_discarded() {
        let c = Clock::new(0, 500, 3);
        let t = c.local_ms();
        assert!(!c.observe(2, t, t + 30_000, t + 1_001), "a round trip over 2 x bound is not a sample");
        assert!(!c.observe(2, t, t, t - 1), "received before sent");
        assert!(!c.calibrated());
    }

    #[test]
    fn median_picks_the_middle() {
        assert_eq!(median_toward_zero(vec![5, -3, 100]), 5);
        assert_eq!(median_toward_zero(vec![0, -40, 30, 10]), 0);
        assert_eq!(median_toward_zero(vec![]), 0);
    }
}
