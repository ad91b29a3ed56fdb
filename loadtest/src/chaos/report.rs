//! The report of a chaos run: printed as a table, written with `--json`.

use std::fmt::Write as _;

use serde::Serialize;

use super::checker::Findings;
use super::nemesis::FaultKind;
use super::nemesis::FaultRecord;
use super::nemesis::PlannedFault;
use super::nemesis::Timing;

#[derive(Debug, Clone, Serialize)]
pub struct ChaosReport {
    pub seed: u64,
    pub run_id: String,
    /// The command line that repeats this run's schedule and workload.
    pub rerun: String,
    pub duration_s: f64,
    pub nodes: u64,
    /// `loopback` or `netns`.
    pub net: String,
    pub node_args: Vec<String>,
    pub fault_kinds: Vec<FaultKind>,
    pub timing: Timing,
    pub conversations: u32,
    pub publishers: u32,
    pub readers: u32,
    pub subscribers: u32,
    /// The seeded schedule (what was planned; `faults` is what happened).
    pub planned: Vec<PlannedFault>,
    pub faults: Vec<FaultRecord>,
    /// Node processes that exited without being killed: (ms, node, status and log).
    pub node_crashes: Vec<(u64, u64, String)>,
    /// Time from the end of the workload until every replica applied every commit, ms.
    pub converge_ms: u64,
    pub findings: Findings,
    /// Violations of any property, node crashes included.
    pub violations: u64,
    pub ok: bool,
    pub node_logs: Vec<(u64, String)>,
    pub data_dir: Option<String>,
}

impl ChaosReport {
    pub fn table(&self) -> String {
        let f = &self.findings;
        let mut s = String::new();
        let _ = writeln!(s, "\n== habar-chaos: seed {} ({}) ==", self.seed, self.rerun);
        let _ = writeln!(
            s,
            "duration {:.1} s, {} nodes ({} network), {} conversations, {} publishers, {} readers, {} subscribers",
            self.duration_s, self.nodes, self.net, self.conversations, self.publishers, self.readers, self.subscribers
        );
        let _ = writeln!(s, "faults applied: {}", self.faults.len());
        for x in &self.faults {
            let _ = writeln!(
                s,
                "  {:>7} .. {:>7} ms  {:<13} nodes {:?} {}",
                x.start_ms,
                x.end_ms,
                x.kind.name(),
                x.targets,
                x.note
            );
        }
        for (t, id, why) in &self.node_crashes {
            let _ = writeln!(s, "  NODE CRASH at {t} ms: node {id} exited by itself: {why}");
        }
        let row = |s: &mut String, k: &str, v: String, bad: bool| {
            let _ = writeln!(s, "  {k:<32} {v:>12}{}", if bad { "   <-- VIOLATION" } else { "" });
        };
        let _ = writeln!(s, "operations:");
        row(&mut s, "publish attempts", f.publish_ops.to_string(), false);
        row(
            &mut s,
            "  ok / failed / unknown",
            format!("{}/{}/{}", f.publish_ok, f.publish_failed, f.publish_unknown),
            false,
        );
        row(&mut s, "  acks answered duplicate=true", f.publish_duplicate.to_string(), false);
        row(&mut s, "reads (linearizable) ok / failed", format!("{}/{}", f.reads, f.reads_failed), false);
        row(&mut s, "subscriber deliveries", f.subscriber_deliveries.to_string(), false);
        let _ = writeln!(s, "envelopes:");
        row(&mut s, "published", f.envelopes.to_string(), false);
        row(&mut s, "acknowledged", f.acknowledged.to_string(), false);
        row(&mut s, "lost", f.lost.to_string(), f.lost > 0);
        row(&mut s, "duplicated", f.duplicated.to_string(), f.duplicated > 0);
        row(&mut s, "reordered (misplaced)", f.reordered.to_string(), f.reordered > 0);
        row(&mut s, "gaps", f.gaps.to_string(), f.gaps > 0);
        row(&mut s, "failed yet present", f.failed_present.to_string(), f.failed_present > 0);
        row(&mut s, "phantom (never published)", f.phantom.to_string(), f.phantom > 0);
        row(&mut s, "unknown: present / absent", format!("{}/{}", f.unknown_present, f.unknown_absent), false);
        let _ = writeln!(s, "reads:");
        row(&mut s, "mismatches (seq -> envelope)", f.read_mismatches.to_string(), f.read_mismatches > 0);
        row(&mut s, "gaps inside a read", f.read_gaps.to_string(), f.read_gaps > 0);
        row(
            &mut s,
            "stale (backwards / missed ack)",
            format!("{}/{}", f.stale_reads_backwards, f.stale_reads_missed_ack),
            f.stale_reads > 0,
        );
        let _ = writeln!(s, "subscribers:");
        row(
            &mut s,
            "order / mismatch / removed / behind",
            format!(
                "{}/{}/{}/{}",
                f.subscriber_order, f.subscriber_mismatches, f.subscriber_removed, f.subscriber_incomplete
            ),
            f.subscriber_violations > 0,
        );
        let _ = writeln!(s, "replicas:");
        row(
            &mut s,
            "diverged (node, conversation)",
            format!("{} {:?}", f.diverged_conversations, f.diverged_nodes),
            f.diverged_conversations > 0,
        );
        let _ = writeln!(s, "availability:");
        row(&mut s, "100 ms windows with an ack", format!("{:.1}%", 100.0 * f.availability), false);
        row(&mut s, "longest without an ack", format!("{:.0} ms", f.longest_unavailable_ms), false);
        row(&mut s, "converged after the run in", format!("{} ms", self.converge_ms), false);
        if !f.examples.is_empty() {
            let _ = writeln!(s, "examples:");
            for e in &f.examples {
                let _ = writeln!(s, "  {e}");
            }
        }
        if let Some(d) = &self.data_dir {
            let _ = writeln!(s, "data and node logs kept in {d}");
        }
        let _ = writeln!(s, "RESULT: {} ({} violations)", if self.ok { "PASS" } else { "FAIL" }, self.violations);
        s
    }
}
