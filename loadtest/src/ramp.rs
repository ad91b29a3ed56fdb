//! Ramp mode: open loop at rising rates until p99 passes a bound; the capacity is the highest
//! rate whose step held it. The warm-up runs first, at the first rate, and is not a step: a
//! cold cluster's first seconds (connections, caches, elections settling) are not its
//! capacity.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use serde::Serialize;

use crate::openloop;
use crate::openloop::Schedule;
use crate::stats::Kind;
use crate::stats::Recorder;

/// One ramp step: its rate and the p99 it measured.
#[derive(Debug, Clone, Serialize)]
pub struct RampStep {
    pub rate: f64,
    pub acknowledged: u64,
    pub p99_ms: f64,
    pub errors: u64,
    pub held: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct RampReport {
    pub slo_p99_ms: f64,
    pub steps: Vec<RampStep>,
    /// The highest rate whose step held the p99 bound without errors (the capacity).
    pub capacity: f64,
}

/// What a ramp does (from the scenario).
#[derive(Debug, Clone)]
pub struct RampPlan {
    pub start_rate: f64,
    pub step_rate: f64,
    pub step_secs: f64,
    pub slo_p99_ms: f64,
    /// Run at `start_rate` first, not measured as a step.
    pub warmup_secs: f64,
    /// The whole ramp, warm-up included.
    pub duration_secs: f64,
    pub max_outstanding: usize,
}

/// Runs the ramp from `start` (the recorder's start too), sending with `send` as
/// [`openloop::run`] does, and prints each step's outcome to stderr.
pub async fn run<F, Fut>(plan: &RampPlan, start: Instant, recorder: Arc<Recorder>, send: F) -> RampReport
where
    F: Fn(u64) -> Fut,
    Fut: Future<Output = Result<(Kind, u64), String>> + Send + 'static,
{
    if plan.warmup_secs > 0.0 {
        let warmup = Schedule::constant(plan.start_rate, plan.warmup_secs);
        openloop::run(&warmup, Instant::now(), plan.max_outstanding, recorder.clone(), &send).await;
    }
    let mut steps = Vec::new();
    let mut capacity = 0.0;
    let mut rate = plan.start_rate;
    let deadline = start + Duration::from_secs_f64(plan.duration_secs.max(plan.warmup_secs + plan.step_secs));
    while Instant::now() + Duration::from_secs_f64(plan.step_secs) <= deadline + Duration::from_secs(1) {
        let step_start = Instant::now();
        let from = step_start.duration_since(start).as_secs() as usize + 1; // skip the partial second
        let errors_before = recorder.error_count();
        let schedule = Schedule::constant(rate, plan.step_secs);
        let stats = openloop::run(&schedule, step_start, plan.max_outstanding, recorder.clone(), &send).await;
        let to = start.elapsed().as_secs() as usize;
        let (n, p99) = recorder.p99_between(Kind::Publish, from, to.max(from + 1));
        let errors = recorder.error_count() - errors_before;
        let held = n > 0 && p99 <= plan.slo_p99_ms && errors == 0 && stats.overload == 0;
        steps.push(RampStep { rate, acknowledged: n, p99_ms: p99, errors, held });
        eprintln!("ramp: {rate:.0}/s -> p99 {p99:.2} ms, {errors} errors: {}", if held { "held" } else { "missed" });
        if !held {
            break;
        }
        capacity = rate;
        rate += plan.step_rate;
    }
    RampReport { slo_p99_ms: plan.slo_p99_ms, steps, capacity }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ramp of one 2 s step at 200/s with a p99 bound of 100 ms (loose: test machines are
    /// busy), against a "cluster" whose calls take 300 ms during its first 1.8 s and nothing
    /// after.
    async fn ramp_over_a_cold_start(warmup_secs: f64) -> RampReport {
        let start = Instant::now();
        let cold_until = start + Duration::from_millis(1800);
        let recorder = Arc::new(Recorder::starting_at(start, Duration::from_secs_f64(warmup_secs)));
        let plan = RampPlan {
            start_rate: 200.0,
            step_rate: 100.0,
            step_secs: 2.0,
            slo_p99_ms: 100.0,
            warmup_secs,
            duration_secs: warmup_secs + 2.0,
            max_outstanding: 10_000,
        };
        run(&plan, start, recorder, move |_| async move {
            if Instant::now() < cold_until {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Ok((Kind::Publish, 1))
        })
        .await
    }

    /// Property: the warm-up is not a ramp step, so a cold start does not cost the capacity
    /// figure its first step; and the test can tell (without the warm-up the step misses).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cold_start_inside_the_warmup_does_not_fail_the_first_step() {
        let warm = ramp_over_a_cold_start(2.0).await;
        assert_eq!(warm.steps.len(), 1, "{warm:?}");
        assert!(warm.steps[0].held, "the first step after the warm-up held: {warm:?}");
        assert_eq!(warm.capacity, 200.0);

        let cold = ramp_over_a_cold_start(0.0).await;
        assert!(!cold.steps[0].held, "without a warm-up the cold start fails the first step: {cold:?}");
        assert_eq!(cold.capacity, 0.0);
    }
}
