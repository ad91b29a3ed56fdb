//! Open-loop scheduling without coordinated omission: every send has an intended time
//! fixed by the rate schedule before the run, and its latency is measured from that time,
//! not from when the sender got around to it. If the cluster stalls, the sends that should
//! have happened during the stall are sent late and their lateness is counted.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use tokio::sync::Semaphore;

use crate::scenario::Phase;
use crate::stats::Kind;
use crate::stats::Recorder;

/// How often the dispatcher wakes to send what is due (tokio's timer has ms resolution).
const TICK: Duration = Duration::from_millis(1);

/// The intended send time of every operation: phases of constant rate, one after another.
#[derive(Debug, Clone)]
pub struct Schedule {
    phases: Vec<Phase>,
}

impl Schedule {
    pub fn new(phases: Vec<Phase>) -> Self {
        Schedule { phases }
    }

    pub fn constant(rate: f64, secs: f64) -> Self {
        Schedule { phases: vec![Phase { secs, rate }] }
    }

    /// Offsets from the start, in order.
    pub fn offsets(&self) -> impl Iterator<Item = Duration> + '_ {
        let mut phase_start = 0.0f64;
        self.phases.iter().flat_map(move |p| {
            let start = phase_start;
            phase_start += p.secs;
            let n = (p.secs * p.rate).floor() as u64;
            let step = if p.rate > 0.0 { 1.0 / p.rate } else { 0.0 };
            (0..n).map(move |k| Duration::from_secs_f64(start + k as f64 * step))
        })
    }

    pub fn total(&self) -> Duration {
        Duration::from_secs_f64(self.phases.iter().map(|p| p.secs).sum())
    }
}

/// What an open loop did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpenStats {
    pub intended: u64,
    pub sent: u64,
    /// Not sent because `max_outstanding` sends were already in flight.
    pub overload: u64,
}

/// Runs `send(index)` at each intended time of `schedule` (spawned, at most
/// `max_outstanding` at once) and records, for each that succeeds, the time from its
/// intended send time to its completion, under the kind and for as many operations as it
/// reports. A failed send is counted under its error label.
pub async fn run<F, Fut>(
    schedule: &Schedule,
    start: Instant,
    max_outstanding: usize,
    recorder: Arc<Recorder>,
    send: F,
) -> OpenStats
where
    F: Fn(u64) -> Fut,
    Fut: Future<Output = Result<(Kind, u64), String>> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(max_outstanding));
    let mut stats = OpenStats::default();
    let mut tasks = tokio::task::JoinSet::new();
    let mut next_tick = start;
    for (i, offset) in schedule.offsets().enumerate() {
        let intended = start + offset;
        // Sleep only in whole ticks; everything due by then goes out at once.
        while Instant::now() < intended {
            next_tick += TICK;
            if next_tick > Instant::now() {
                tokio::time::sleep_until(next_tick.into()).await;
            }
        }
        stats.intended += 1;
        let permit = match permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                stats.overload += 1;
                recorder.error("client_overload");
                continue;
            }
        };
        stats.sent += 1;
        // Boxed: tokio moves a task's future into its cell and its output over it, and an
        // operation's future is large (the profile of a 20,000/s run: memmove from tokio's
        // task code was ~6% of the tester's CPU).
        let fut = Box::pin(send(i as u64));
        let rec = recorder.clone();
        tasks.spawn(async move {
            let r = fut.await;
            let done = Instant::now();
            match r {
                Ok((kind, n)) => rec.record_n(kind, done.saturating_duration_since(intended), n, done),
                Err(code) => rec.error(&code),
            }
            drop(permit);
        });
        // Reap finished tasks now and then so the set does not grow with the run.
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    stats
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[test]
    fn phases_give_their_rate_and_an_outage_sends_nothing() {
        let s = Schedule::new(vec![
            Phase { secs: 1.0, rate: 100.0 },
            Phase { secs: 2.0, rate: 0.0 },
            Phase { secs: 1.0, rate: 300.0 },
        ]);
        let offs: Vec<Duration> = s.offsets().collect();
        assert_eq!(offs.len(), 400);
        assert!(offs[99] < Duration::from_secs(1));
        assert!(offs[100] >= Duration::from_secs(3), "nothing during the outage");
        assert!(offs.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(s.total(), Duration::from_secs(4));
    }

    /// Property: a stall of the system under test is counted, not hidden: sends intended
    /// during a 300 ms stall complete after it and are recorded with their full lateness,
    /// and every intended send is recorded.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn open_loop_scheduling_counts_a_stall() {
        let start = Instant::now() + Duration::from_millis(20);
        let stall_from = start + Duration::from_millis(300);
        let stall_to = start + Duration::from_millis(600);
        let rec = Arc::new(Recorder::starting_at(start, Duration::ZERO));
        let sched = Schedule::constant(1000.0, 1.0);
        let served = Arc::new(Mutex::new(0u64));
        let s2 = served.clone();
        let stats = run(&sched, start, 10_000, rec.clone(), move |_| {
            let served = s2.clone();
            async move {
                let now = Instant::now();
                if now >= stall_from && now < stall_to {
                    // The server is stalled: the call completes when it resumes.
                    tokio::time::sleep_until(stall_to.into()).await;
                }
                *served.lock().unwrap() += 1;
                Ok((Kind::Publish, 1))
            }
        })
        .await;
        assert_eq!(stats.intended, 1000);
        assert_eq!(stats.overload, 0);
        let (sums, _, _) = rec.finish(1.0);
        let p = &sums[&Kind::Publish];
        assert_eq!(p.count, 1000, "every intended send is recorded");
        assert!(p.max_ms >= 250.0, "the stall shows in the latencies: max {} ms", p.max_ms);
        // About 30% of the sends were intended during the stall: p90 sees it, p50 does not.
        assert!(p.p90_ms >= 50.0, "p90 {} ms", p.p90_ms);
        assert!(p.p50_ms < 250.0, "p50 {} ms", p.p50_ms);
    }

    /// Property: beyond `max_outstanding` sends are refused and counted, never queued.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn outstanding_sends_are_bounded() {
        let start = Instant::now();
        let rec = Arc::new(Recorder::starting_at(start, Duration::ZERO));
        let sched = Schedule::constant(1000.0, 0.2);
        let stats = run(&sched, start, 10, rec.clone(), |_| async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            Ok((Kind::Publish, 1))
        })
        .await;
        assert_eq!(stats.sent, 10);
        assert_eq!(stats.overload, stats.intended - 10);
        let (_, errors, _) = rec.finish(1.0);
        assert_eq!(errors.get("client_overload").copied(), Some(stats.overload));
    }
}
