//! Measurements: HDR histograms of latency (µs) per operation kind, for the whole run
//! (warm-up excluded) and per one-second window (for the progress line and the plot), and
//! errors counted by gRPC code.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;
use std::time::Instant;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Highest latency a histogram records (longer ones are clamped to it).
const MAX_MICROS: u64 = 120_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Publish,
    Read,
    /// Publish to delivery on a subscriber.
    EndToEnd,
}

pub const KINDS: [Kind; 3] = [Kind::Publish, Kind::Read, Kind::EndToEnd];

fn hist() -> Histogram<u64> {
    // 1 µs .. 120 s at 3 significant digits; `new_with_bounds` only fails on bad bounds.
    Histogram::new_with_bounds(1, MAX_MICROS, 3).unwrap_or_else(|_| Histogram::new(3).expect("3 sigfig"))
}

#[derive(Clone)]
struct Window {
    hists: BTreeMap<Kind, Histogram<u64>>,
    errors: u64,
}

impl Window {
    fn new() -> Self {
        Window { hists: KINDS.iter().map(|k| (*k, hist())).collect(), errors: 0 }
    }
}

struct Inner {
    totals: BTreeMap<Kind, Histogram<u64>>,
    windows: Vec<Window>,
    errors: BTreeMap<String, u64>,
    warmup_errors: u64,
}

/// Shared by every task of a run.
pub struct Recorder {
    start: Instant,
    warmup: Duration,
    inner: Mutex<Inner>,
}

/// Percentiles of one histogram, in ms.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub count: u64,
    pub per_sec: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

fn summarize(h: &Histogram<u64>, secs: f64) -> Summary {
    let ms = |v: u64| v as f64 / 1000.0;
    if h.is_empty() {
        return Summary::default();
    }
    Summary {
        count: h.len(),
        per_sec: if secs > 0.0 { h.len() as f64 / secs } else { 0.0 },
        p50_ms: ms(h.value_at_quantile(0.50)),
        p90_ms: ms(h.value_at_quantile(0.90)),
        p99_ms: ms(h.value_at_quantile(0.99)),
        p999_ms: ms(h.value_at_quantile(0.999)),
        max_ms: ms(h.max()),
    }
}

/// One second of the run.
#[derive(Debug, Clone, Serialize)]
pub struct Point {
    pub second: usize,
    pub publish_per_sec: f64,
    pub publish_p50_ms: f64,
    pub publish_p99_ms: f64,
    pub e2e_p99_ms: f64,
    pub errors: u64,
}

impl Recorder {
    pub fn new(warmup: Duration) -> Self {
        Self::starting_at(Instant::now(), warmup)
    }

    pub fn starting_at(start: Instant, warmup: Duration) -> Self {
        Recorder {
            start,
            warmup,
            inner: Mutex::new(Inner {
                totals: KINDS.iter().map(|k| (*k, hist())).collect(),
                windows: Vec::new(),
                errors: BTreeMap::new(),
                warmup_errors: 0,
            }),
        }
    }

    pub fn start(&self) -> Instant {
        self.start
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn window(inner: &mut Inner, second: usize) -> &mut Window {
        while inner.windows.len() <= second {
            inner.windows.push(Window::new());
        }
        &mut inner.windows[second]
    }

    /// Records `n` operations of `kind` that completed at `done` with `latency` each.
    pub fn record_n(&self, kind: Kind, latency: Duration, n: u64, done: Instant) {
        let us = (latency.as_micros() as u64).clamp(1, MAX_MICROS);
        let since = done.saturating_duration_since(self.start);
        let mut inner = self.lock();
        let w = Self::window(&mut inner, since.as_secs() as usize);
        if let Some(h) = w.hists.get_mut(&kind) {
            let _ = h.record_n(us, n);
        }
        if since >= self.warmup {
            if let Some(h) = inner.totals.get_mut(&kind) {
                let _ = h.record_n(us, n);
            }
        }
    }

    pub fn record(&self, kind: Kind, latency: Duration) {
        self.record_n(kind, latency, 1, Instant::now());
    }

    /// Counts a failed operation under its gRPC code name (or another label).
    pub fn error(&self, code: &str) {
        let since = self.start.elapsed();
        let mut inner = self.lock();
        Self::window(&mut inner, since.as_secs() as usize).errors += 1;
        if since >= self.warmup {
            *inner.errors.entry(code.to_string()).or_default() += 1;
        } else {
            inner.warmup_errors += 1;
        }
    }

    /// Failed operations so far, warm-up included.
    pub fn error_count(&self) -> u64 {
        self.lock().windows.iter().map(|w| w.errors).sum()
    }

    /// The progress line for the window that just ended, and the run so far.
    pub fn progress(&self) -> String {
        let inner = self.lock();
        let now = self.start.elapsed().as_secs() as usize;
        let last = now.checked_sub(1).and_then(|s| inner.windows.get(s));
        let total_errors: u64 = inner.errors.values().sum::<u64>() + inner.warmup_errors;
        let pubs = &inner.totals[&Kind::Publish];
        let (rate, w99) = match last.map(|w| &w.hists[&Kind::Publish]) {
            Some(h) if !h.is_empty() => (h.len(), h.value_at_quantile(0.99) as f64 / 1000.0),
            _ => (0, 0.0),
        };
        let warm = if self.start.elapsed() < self.warmup { " (warm-up)" } else { "" };
        format!(
            "[{now:>4}s]{warm} publish {rate:>7}/s p99 {w99:>7.2} ms | run p50 {:.2} ms p99 {:.2} ms | reads {} | e2e p99 {:.2} ms | errors {total_errors}",
            pubs.value_at_quantile(0.5) as f64 / 1000.0,
            pubs.value_at_quantile(0.99) as f64 / 1000.0,
            inner.totals[&Kind::Read].len(),
            inner.totals[&Kind::EndToEnd].value_at_quantile(0.99) as f64 / 1000.0,
        )
    }

    /// Summaries over `measured_secs` (warm-up excluded), errors by code, per-second points.
    pub fn finish(&self, measured_secs: f64) -> (BTreeMap<Kind, Summary>, BTreeMap<String, u64>, Vec<Point>) {
        let inner = self.lock();
        let sums = inner.totals.iter().map(|(k, h)| (*k, summarize(h, measured_secs))).collect();
        let points = inner
            .windows
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let p = &w.hists[&Kind::Publish];
                let e = &w.hists[&Kind::EndToEnd];
                Point {
                    second: i,
                    publish_per_sec: p.len() as f64,
                    publish_p50_ms: if p.is_empty() { 0.0 } else { p.value_at_quantile(0.5) as f64 / 1000.0 },
                    publish_p99_ms: if p.is_empty() { 0.0 } else { p.value_at_quantile(0.99) as f64 / 1000.0 },
                    e2e_p99_ms: if e.is_empty() { 0.0 } else { e.value_at_quantile(0.99) as f64 / 1000.0 },
                    errors: w.errors,
                }
            })
            .collect();
        (sums, inner.errors.clone(), points)
    }

    /// p99 of `kind` over windows `[from, to)` (seconds), in ms: for ramp steps.
    pub fn p99_between(&self, kind: Kind, from: usize, to: usize) -> (u64, f64) {
        let inner = self.lock();
        let mut h = hist();
        for w in inner.windows.iter().take(to).skip(from) {
            let _ = h.add(&w.hists[&kind]);
        }
        (h.len(), if h.is_empty() { 0.0 } else { h.value_at_quantile(0.99) as f64 / 1000.0 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_is_excluded_from_totals_but_kept_in_windows() {
        let start = Instant::now() - Duration::from_secs(3);
        let r = Recorder::starting_at(start, Duration::from_secs(2));
        r.record_n(Kind::Publish, Duration::from_millis(100), 10, start + Duration::from_millis(500));
        r.record_n(Kind::Publish, Duration::from_millis(1), 5, start + Duration::from_millis(2500));
        let (sums, _, points) = r.finish(1.0);
        assert_eq!(sums[&Kind::Publish].count, 5);
        assert!(sums[&Kind::Publish].max_ms < 2.0);
        assert_eq!(points[0].publish_per_sec, 10.0);
        assert_eq!(points[2].publish_per_sec, 5.0);
    }
}
