//! What each operation touches: which conversation (uniform, Zipf or each once), how big
//! its ciphertext is, and the send time carried in the ciphertext's first 8 bytes so that
//! subscribers can measure publish-to-delivery latency.

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::SystemTime;
use std::time::UNIX_EPOCH;

use bytes::Bytes;
use rand::Rng;
use rand_distr::Distribution;
use rand_distr::Zipf;

use crate::scenario::Popularity;
use crate::scenario::Scenario;

/// How conversations are drawn (the scenario's `popularity`).
enum Draw {
    Uniform,
    Zipf(Zipf<f64>),
    /// Draws so far (all publishers), and the step through the conversations (coprime with
    /// their number, so `conversations` draws visit each exactly once).
    EachOnce {
        drawn: AtomicU64,
        step: u64,
    },
}

pub struct Workload {
    conversations: u64,
    draw: Draw,
    min: usize,
    max: usize,
    /// Conversation names are `<prefix>-<index>`: unique per run, so verification reads
    /// only this run's envelopes.
    pub prefix: String,
    pub run_id: u64,
}

pub fn unix_nanos() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

/// A step near 0.618 n that shares no factor with `n`: `k * step mod n` for k in 0..n is then a
/// permutation of 0..n that scatters neighbours (names, shards) apart.
fn coprime_step(n: u64) -> u64 {
    fn gcd(a: u64, b: u64) -> u64 {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }
    let mut step = ((n as f64 * 0.618_033_988_75) as u64).max(1);
    while gcd(step, n) != 1 {
        step += 1;
    }
    step
}

impl Workload {
    pub fn new(s: &Scenario, run_id: u64) -> anyhow::Result<Self> {
        let draw = match s.popularity {
            Popularity::Uniform => Draw::Uniform,
            Popularity::Zipf => Draw::Zipf(
                Zipf::new(s.conversations, s.zipf_exponent)
                    .map_err(|e| anyhow::anyhow!("scenario field `zipf_exponent`: {e}"))?,
            ),
            Popularity::EachOnce => Draw::EachOnce { drawn: AtomicU64::new(0), step: coprime_step(s.conversations) },
        };
        Ok(Workload {
            conversations: s.conversations,
            draw,
            min: s.ciphertext_min_bytes,
            max: s.ciphertext_max_bytes,
            prefix: format!("load-{run_id:016x}"),
            run_id,
        })
    }

    /// A conversation index in `0..conversations`.
    pub fn conversation(&self, rng: &mut impl Rng) -> u32 {
        let i = match &self.draw {
            // Zipf samples 1..=n, the most popular first.
            Draw::Zipf(z) => (z.sample(rng) as u64).saturating_sub(1),
            Draw::EachOnce { drawn, step } => {
                let k = drawn.fetch_add(1, Ordering::Relaxed) % self.conversations;
                ((k as u128 * *step as u128) % self.conversations as u128) as u64
            }
            Draw::Uniform => rng.gen_range(0..self.conversations),
        };
        i.min(self.conversations - 1) as u32
    }

    /// A conversation to read: as [`Workload::conversation`], but each-once draws uniformly
    /// (reads must not use up the publishes' single pass).
    pub fn conversation_to_read(&self, rng: &mut impl Rng) -> u32 {
        match self.draw {
            Draw::EachOnce { .. } => rng.gen_range(0..self.conversations) as u32,
            _ => self.conversation(rng),
        }
    }

    pub fn name(&self, index: u32) -> String {
        format!("{}-{index}", self.prefix)
    }

    /// The index of one of this run's conversation names.
    pub fn index_of(&self, name: &str) -> Option<u32> {
        name.strip_prefix(&self.prefix)?.strip_prefix('-')?.parse().ok()
    }

    /// A ciphertext of the scenario's size whose first 8 bytes are the send time.
    pub fn ciphertext(&self, rng: &mut impl Rng) -> Bytes {
        let len = if self.min == self.max { self.min } else { rng.gen_range(self.min..=self.max) };
        let mut b = vec![0xA5u8; len];
        b[..8].copy_from_slice(&unix_nanos().to_be_bytes());
        Bytes::from(b)
    }

    /// The send time carried by a ciphertext of this tool, in unix ns.
    pub fn sent_at(ciphertext: &[u8]) -> Option<u64> {
        let b: [u8; 8] = ciphertext.get(..8)?.try_into().ok()?;
        Some(u64::from_be_bytes(b))
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn zipf_concentrates_on_few_conversations_and_uniform_spreads() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let s =
            Scenario { popularity: Popularity::Zipf, conversations: 1000, zipf_exponent: 1.2, ..Scenario::default() };
        let w = Workload::new(&s, 9).unwrap();
        let mut counts = vec![0u32; 1000];
        for _ in 0..100_000 {
            counts[w.conversation(&mut rng) as usize] += 1;
        }
        assert!(counts[0] > counts[10] && counts[10] > counts[500], "popularity falls with rank");
        let top10: u32 = counts[..10].iter().sum();
        assert!(top10 > 40_000, "the 10 biggest groups take a large share: {top10}");
        let u = Workload::new(&Scenario { conversations: 1000, ..Scenario::default() }, 9).unwrap();
        let mut counts = vec![0u32; 1000];
        for _ in 0..100_000 {
            counts[u.conversation(&mut rng) as usize] += 1;
        }
        assert!(counts.iter().all(|c| *c > 40 && *c < 200));
    }

    #[test]
    fn each_once_visits_every_conversation_once_before_any_twice() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for n in [1u64, 2, 10, 1000, 1024, 999_983] {
            let s = Scenario { popularity: Popularity::EachOnce, conversations: n, ..Scenario::default() };
            let w = Workload::new(&s, 9).unwrap();
            let mut seen = vec![false; n as usize];
            let first: Vec<u32> = (0..n)
                .map(|_| {
                    // Reads in between draw elsewhere: they do not use up the pass.
                    assert!(u64::from(w.conversation_to_read(&mut rng)) < n);
                    w.conversation(&mut rng)
                })
                .collect();
            for &c in &first {
                assert!(!seen[c as usize], "conversation {c} of {n} drawn twice in the first pass");
                seen[c as usize] = true;
            }
            let again: Vec<u32> = (0..n.min(100)).map(|_| w.conversation(&mut rng)).collect();
            assert_eq!(again[..], first[..again.len()], "the second pass repeats the first's order");
            if n >= 1000 {
                let adjacent = first.windows(2).filter(|p| p[0].abs_diff(p[1]) == 1).count();
                assert!(adjacent < (n / 100) as usize, "neighbouring names are scattered: {adjacent}");
            }
        }
    }

    #[test]
    fn names_round_trip_and_ciphertexts_carry_the_send_time() {
        let w = Workload::new(&Scenario::default(), 0xabc).unwrap();
        assert_eq!(w.index_of(&w.name(42)), Some(42));
        assert_eq!(w.index_of("other-42"), None);
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let before = unix_nanos();
        let c = w.ciphertext(&mut rng);
        assert_eq!(c.len(), 256);
        let t = Workload::sent_at(&c).unwrap();
        assert!(t >= before && t <= unix_nanos());
    }
}
