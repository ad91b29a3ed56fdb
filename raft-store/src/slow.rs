//! Warnings for operations slower than a threshold, like etcd's "slow fdatasync" and "apply
//! request took too long": an operator sees which stage of the write path stalled (the disk,
//! the state machine, or the round trip to the peers) and when, without a profiler.
//!
//! An operation warns when it takes longer than the threshold (`slow_warn_ms`; 0 turns the
//! warnings off). At most one warning per second per kind; the ones left out are counted into
//! the next (one that races with a warning may be counted into that warning instead: the total
//! is never lost).

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;

/// Default threshold (etcd uses the same for a slow apply).
pub const DEFAULT_SLOW_WARN: Duration = Duration::from_millis(100);
/// Shortest gap between two warnings of one kind.
const WARN_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub struct SlowLog {
    threshold_us: AtomicU64,
    epoch: Instant,
    /// Microseconds after `epoch` of the last warning, +1 (0: none yet).
    last_warn_us: AtomicU64,
    left_out: AtomicU64,
}

impl SlowLog {
    pub fn new(threshold: Duration) -> Self {
        SlowLog {
            threshold_us: AtomicU64::new(micros(threshold)),
            epoch: Instant::now(),
            last_warn_us: AtomicU64::new(0),
            left_out: AtomicU64::new(0),
        }
    }

    pub fn set_threshold(&self, threshold: Duration) {
        self.threshold_us.store(micros(threshold), Ordering::Relaxed);
    }

    /// `Some(n)` when an operation that took `took` should be logged now, `n` being the slow
    /// operations left out since the last warning; `None` when it was fast enough, or slow but
    /// within a second of the last warning (then it is counted).
    pub fn check(&self, took: Duration) -> Option<u64> {
        self.check_at(took, self.epoch.elapsed())
    }

    fn check_at(&self, took: Duration, now: Duration) -> Option<u64> {
        let threshold = self.threshold_us.load(Ordering::Relaxed);
        if threshold == 0 || micros(took) <= threshold {
            return None;
        }
        let now_us = micros(now).saturating_add(1);
        let last = self.last_warn_us.load(Ordering::Relaxed);
        if last != 0 && now_us.saturating_sub(last) < micros(WARN_EVERY) {
            self.left_out.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        match self.last_warn_us.compare_exchange(last, now_us, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => Some(self.left_out.swap(0, Ordering::Relaxed)),
            Err(_) => {
                // Another thread warned just now.
                self.left_out.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }
}

impl Default for SlowLog {
    fn default() -> Self {
        SlowLog::new(DEFAULT_SLOW_WARN)
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Milliseconds with a fraction, for log fields.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Fast operations never warn; the first slow one does; slow ones within a second of it
    /// are counted and reported with the next warning.
    #[test]
    fn warns_once_a_second_and_counts_what_it_left_out() {
        let s = SlowLog::new(100 * MS);
        assert_eq!(s.check_at(100 * MS, Duration::ZERO), None, "not slower than the threshold");
        assert_eq!(s.check_at(101 * MS, Duration::ZERO), Some(0), "the first warning, at time zero");
        assert_eq!(s.check_at(300 * MS, 500 * MS), None);
        assert_eq!(s.check_at(150 * MS, 999 * MS), None);
        assert_eq!(s.check_at(50 * MS, 999 * MS), None, "a fast operation is not counted");
        assert_eq!(s.check_at(120 * MS, 1000 * MS), Some(2), "a second after the last warning");
        assert_eq!(s.check_at(120 * MS, 1500 * MS), None);
        assert_eq!(s.check_at(120 * MS, 2100 * MS), Some(1));
    }

    /// A threshold of 0 turns the warnings off; changing it takes effect at once.
    #[test]
    fn zero_turns_it_off() {
        let s = SlowLog::new(Duration::ZERO);
        assert_eq!(s.check_at(Duration::from_secs(30), MS), None);
        s.set_threshold(10 * MS);
        assert_eq!(s.check_at(11 * MS, 2 * MS), Some(0));
        s.set_threshold(Duration::ZERO);
        assert_eq!(s.check_at(Duration::from_secs(30), Duration::from_secs(5)), None);
    }
}
