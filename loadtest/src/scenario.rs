//! Scenario files (`loadtest/scenarios/*.toml`): one typed struct, every field optional in the
//! file with a default here, validated before a run (errors name the field and the limit).

use std::path::Path;

use serde::Deserialize;
use serde::Serialize;

/// How load is offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// `publishers` x `in_flight` envelopes outstanding at all times.
    Closed,
    /// A target rate (or `phases` of rates); latency from each envelope's intended send time.
    Open,
    /// Open loop at rising rates until p99 passes `slo_p99_ms`.
    Ramp,
}

/// Which conversations envelopes go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Popularity {
    Uniform,
    /// Zipf with `zipf_exponent`: a few big groups, many quiet 1:1 chats.
    Zipf,
    /// Every conversation once, in a scattered order, before any twice (then again in the same
    /// order): "a million conversations touched once each" with `count` = `conversations`.
    #[serde(rename = "each-once")]
    EachOnce,
}

/// One open-loop phase: `rate` envelopes/s for `secs` seconds (rate 0 = an outage: nothing
/// is sent).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Phase {
    pub secs: f64,
    pub rate: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Scenario {
    pub name: String,
    pub description: String,
    pub mode: Mode,
    /// Closed loop: concurrent publishers.
    pub publishers: usize,
    /// Closed loop: publishes each publisher keeps in flight.
    pub in_flight: usize,
    /// Open loop: envelopes per second (ignored when `phases` is set).
    pub rate: f64,
    /// Open loop: a schedule of rates instead of one `rate` (e.g. a burst after an outage).
    pub phases: Vec<Phase>,
    /// Open loop: most publishes outstanding at once; beyond it a send counts as an error
    /// (`client_overload`) with its latency still measured from its intended time.
    pub max_outstanding: usize,
    /// Ramp: first rate, step, seconds per step, and the p99 bound in ms.
    pub ramp_start: f64,
    pub ramp_step: f64,
    pub ramp_step_secs: f64,
    pub slo_p99_ms: f64,
    pub conversations: u64,
    pub popularity: Popularity,
    pub zipf_exponent: f64,
    /// Ciphertext size: fixed when min == max, else uniform in [min, max].
    pub ciphertext_min_bytes: usize,
    pub ciphertext_max_bytes: usize,
    /// Envelopes per `Publish` call (1 lets the client batch concurrent calls itself).
    pub envelopes_per_publish: usize,
    /// Share of operations that are reads (of the newest 50 of a conversation), 0..1.
    pub read_share: f64,
    /// Live subscribers; each follows `subscribed_conversations` conversations on one
    /// stream, and end-to-end delivery latency is measured on them.
    pub subscribers: usize,
    pub subscribed_conversations: u64,
    /// Length of the measured run, seconds (open loop with phases: the phases' total).
    pub duration_secs: f64,
    /// Stop after this many envelopes instead (0 = use the duration).
    pub count: u64,
    /// Seconds at the start whose results are excluded from the totals.
    pub warmup_secs: f64,
    /// Seed of the workload's random choices.
    pub seed: u64,
}

impl Default for Scenario {
    fn default() -> Self {
        Self {
            name: "default".into(),
            description: String::new(),
            mode: Mode::Closed,
            publishers: 16,
            in_flight: 16,
            rate: 10_000.0,
            phases: Vec::new(),
            max_outstanding: 50_000,
            ramp_start: 5_000.0,
            ramp_step: 5_000.0,
            ramp_step_secs: 10.0,
            slo_p99_ms: 5.0,
            conversations: 1000,
            popularity: Popularity::Uniform,
            zipf_exponent: 1.1,
            ciphertext_min_bytes: 256,
            ciphertext_max_bytes: 256,
            envelopes_per_publish: 1,
            read_share: 0.0,
            subscribers: 0,
            subscribed_conversations: 100,
            duration_secs: 30.0,
            count: 0,
            warmup_secs: 2.0,
            seed: 1,
        }
    }
}

/// A scenario field out of its bounds.
#[derive(Debug, thiserror::Error)]
#[error("scenario field `{field}`: {reason}")]
pub struct ScenarioError {
    pub field: &'static str,
    pub reason: String,
}

/// `x > 0`, false for NaN.
fn positive(x: f64) -> bool {
    x > 0.0
}

/// `x >= 0`, false for NaN.
fn non_negative(x: f64) -> bool {
    x >= 0.0
}

fn bad(field: &'static str, reason: impl Into<String>) -> ScenarioError {
    ScenarioError { field, reason: reason.into() }
}

impl Scenario {
    pub fn load(path: &Path) -> anyhow::Result<Scenario> {
        let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        let s: Scenario = toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok(s)
    }

    /// Seconds the run lasts, warm-up included.
    pub fn total_secs(&self) -> f64 {
        match self.mode {
            Mode::Open if !self.phases.is_empty() => self.phases.iter().map(|p| p.secs).sum(),
            _ => self.duration_secs,
        }
    }

    pub fn validate(&self) -> Result<(), ScenarioError> {
        if self.conversations == 0 || self.conversations > 100_000_000 {
            return Err(bad("conversations", format!("{} is outside 1..=100000000", self.conversations)));
        }
        if self.mode == Mode::Closed && (self.publishers == 0 || self.publishers > 100_000) {
            return Err(bad("publishers", format!("{} is outside 1..=100000", self.publishers)));
        }
        if self.mode == Mode::Closed && (self.in_flight == 0 || self.in_flight > 10_000) {
            return Err(bad("in_flight", format!("{} is outside 1..=10000", self.in_flight)));
        }
        if self.mode == Mode::Open && self.phases.is_empty() && !(self.rate > 0.0 && self.rate <= 10_000_000.0) {
            return Err(bad("rate", format!("{} is outside (0, 10000000] envelopes/s", self.rate)));
        }
        for p in &self.phases {
            if !positive(p.secs) || !non_negative(p.rate) {
                return Err(bad("phases", format!("{p:?}: secs must be > 0 and rate >= 0")));
            }
        }
        if self.mode == Mode::Ramp && !(self.ramp_start > 0.0 && self.ramp_step > 0.0 && self.ramp_step_secs > 0.0) {
            return Err(bad("ramp_start", "ramp_start, ramp_step and ramp_step_secs must be > 0"));
        }
        if !positive(self.slo_p99_ms) {
            return Err(bad("slo_p99_ms", format!("{} must be > 0", self.slo_p99_ms)));
        }
        if self.popularity == Popularity::Zipf && !positive(self.zipf_exponent) {
            return Err(bad("zipf_exponent", format!("{} must be > 0", self.zipf_exponent)));
        }
        if self.ciphertext_min_bytes < 8 || self.ciphertext_min_bytes > self.ciphertext_max_bytes {
            return Err(bad(
                "ciphertext_min_bytes",
                format!(
                    "{}..={} must satisfy 8 <= min <= max (8 bytes carry the send time)",
                    self.ciphertext_min_bytes, self.ciphertext_max_bytes
                ),
            ));
        }
        if self.ciphertext_max_bytes > 1 << 20 {
            return Err(bad("ciphertext_max_bytes", format!("{} is above 1048576", self.ciphertext_max_bytes)));
        }
        if self.envelopes_per_publish == 0 || self.envelopes_per_publish > 1000 {
            return Err(bad("envelopes_per_publish", format!("{} is outside 1..=1000", self.envelopes_per_publish)));
        }
        if !(0.0..=1.0).contains(&self.read_share) {
            return Err(bad("read_share", format!("{} is outside 0..=1", self.read_share)));
        }
        if self.subscribers > 10_000 {
            return Err(bad("subscribers", format!("{} is above 10000", self.subscribers)));
        }
        if self.subscribers > 0 && (self.subscribed_conversations == 0 || self.subscribed_conversations > 10_000) {
            return Err(bad(
                "subscribed_conversations",
                format!("{} is outside 1..=10000", self.subscribed_conversations),
            ));
        }
        if self.count == 0 && !positive(self.total_secs()) {
            return Err(bad("duration_secs", "the run needs a duration (or a count)"));
        }
        if !non_negative(self.warmup_secs) || (self.count == 0 && self.warmup_secs >= self.total_secs()) {
            return Err(bad("warmup_secs", format!("{} must be >= 0 and shorter than the run", self.warmup_secs)));
        }
        if self.max_outstanding == 0 {
            return Err(bad("max_outstanding", "must be above 0"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shipped_scenario_parses_and_validates() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "toml") {
                let s = Scenario::load(&p).unwrap();
                s.validate().unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                n += 1;
            }
        }
        assert!(n >= 5, "the 1:1, group, channel, burst and ci scenarios are shipped");
    }

    #[test]
    fn errors_name_the_field() {
        let s = Scenario { ciphertext_min_bytes: 4, ..Scenario::default() };
        assert!(s.validate().unwrap_err().to_string().contains("ciphertext_min_bytes"));
        let s = Scenario { read_share: 2.0, ..Scenario::default() };
        assert!(s.validate().unwrap_err().to_string().contains("read_share"));
        assert!(toml::from_str::<Scenario>("publisherz = 3").is_err(), "unknown fields are rejected");
    }
}

/// A duration on the command line (`90s`, `1.5m`, `250ms`, a bare number is seconds), in
/// seconds. Shared by `habar-load` and `habar-chaos`.
pub fn parse_secs(s: &str) -> Result<f64, String> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s, 1.0)
    };
    num.trim().parse::<f64>().map(|v| v * mult).map_err(|_| format!("`{s}` is not a duration like 60s or 2m"))
}

#[cfg(test)]
mod parse_tests {
    use super::parse_secs;

    #[test]
    fn durations_parse_with_their_units() {
        assert_eq!(parse_secs("90s"), Ok(90.0));
        assert_eq!(parse_secs("2m"), Ok(120.0));
        assert_eq!(parse_secs("250ms"), Ok(0.25));
        assert_eq!(parse_secs("7"), Ok(7.0));
        assert!(parse_secs("soon").is_err());
    }
}
