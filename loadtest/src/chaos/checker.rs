//! The checker: pure functions from a run's [`HistorySnapshot`], the final logs (read
//! linearizably after healing) and each replica's logs (read with `allow_stale`) to
//! [`Findings`]. The properties, each a counter in the findings:
//!
//! - **(a) acknowledged envelopes** ([`crate::verify::verify`]): every envelope with an
//!   `ok(seq)` attempt is in its conversation's final log exactly once, at that seq
//!   (`lost`, `duplicated`, `reordered`); each log's seqs are dense from 1 (`gaps`).
//!   Envelopes whose every attempt failed definitely must be absent (`failed_present`);
//!   envelopes nobody published must not appear (`phantom`).
//! - **(b) unknown outcomes**: an envelope whose every attempt was unknown is present once
//!   (`unknown_present`) or absent (`unknown_absent`); more copies count in `duplicated`.
//! - **(c) reads**: no read saw an envelope at a seq other than the final log's
//!   (`read_mismatches`, which includes two reads seeing different envelopes at one seq),
//!   no read had a hole inside it (`read_gaps`), and the log length is linearizable: a read
//!   that started after another read of the conversation completed sees a log at least as
//!   long (`stale_reads_backwards`), and a read sees every envelope acknowledged before it
//!   started (`stale_reads_missed_ack`). `stale_reads` is their sum.
//! - **(d) subscribers**: per (subscriber, conversation), seqs 1, 2, 3, ... in order
//!   without gap, repeat or step back; each envelope the final log's at that seq; no
//!   `Removed` (nothing expires); and, after healing, caught up with the final log
//!   (`subscriber_incomplete`). `subscriber_violations` is their sum.
//! - **(e) replicas**: every node's copy of every conversation equals the final log
//!   (`diverged_conversations` (node, conversation) pairs, on `diverged_nodes`).
//!
//! And two figures that are not violations: `availability`, the share of 100 ms windows
//! of the run in which at least one publish was acknowledged, and `longest_unavailable_ms`,
//! the longest time between two acknowledgements (run start and end count as bounds).

use std::collections::BTreeSet;
use std::collections::HashMap;
use std::collections::HashSet;

use serde::Serialize;

use super::history::HistorySnapshot;
use super::history::Outcome;
use super::history::ReadOp;
use super::history::FOREIGN;
use super::history::MAX_EXAMPLES;
use crate::verify;
use crate::verify::Logs;

/// Width of an availability window.
pub const WINDOW_US: u64 = 100_000;

/// Everything the checker found. Every field but the operation counts, the unknown
/// outcomes and the availability figures is a violation count.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Findings {
    pub publish_ops: u64,
    pub publish_ok: u64,
    pub publish_failed: u64,
    pub publish_unknown: u64,
    /// Acknowledgements answered `duplicate = true` (a retry of an envelope already applied).
    pub publish_duplicate: u64,
    /// Distinct envelopes published (an envelope is retried with the same id).
    pub envelopes: u64,
    pub acknowledged: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub reordered: u64,
    pub gaps: u64,
    pub failed_present: u64,
    pub phantom: u64,
    pub unknown: u64,
    pub unknown_present: u64,
    pub unknown_absent: u64,
    pub reads: u64,
    pub reads_failed: u64,
    pub read_mismatches: u64,
    pub read_gaps: u64,
    pub stale_reads_backwards: u64,
    pub stale_reads_missed_ack: u64,
    pub stale_reads: u64,
    pub subscriber_deliveries: u64,
    pub subscriber_order: u64,
    pub subscriber_mismatches: u64,
    pub subscriber_removed: u64,
    pub subscriber_incomplete: u64,
    pub subscriber_violations: u64,
    pub diverged_conversations: u64,
    pub diverged_nodes: Vec<u64>,
    pub availability: f64,
    pub longest_unavailable_ms: f64,
    /// A few of each anomaly, for reproduction.
    pub examples: Vec<String>,
}

impl Findings {
    /// The number of violations of any property.
    pub fn violations(&self) -> u64 {
        self.lost
            + self.duplicated
            + self.reordered
            + self.gaps
            + self.failed_present
            + self.phantom
            + self.read_mismatches
            + self.read_gaps
            + self.stale_reads
            + self.subscriber_violations
            + self.diverged_conversations
    }

    fn example(&mut self, s: String) {
        if self.examples.len() < 4 * MAX_EXAMPLES {
            self.examples.push(s);
        }
    }
}

/// Runs every check. `run_us` is the length of the workload (for availability).
pub fn check(h: &HistorySnapshot, final_logs: &Logs, replicas: &[(u64, Logs)], run_us: u64) -> Findings {
    let mut f = Findings::default();
    check_envelopes(h, final_logs, &mut f);
    check_reads(h, final_logs, &mut f);
    check_subscribers(h, final_logs, &mut f);
    check_replicas(final_logs, replicas, &mut f);
    availability(h, run_us, &mut f);
    f
}

/// (a) and (b).
pub fn check_envelopes(h: &HistorySnapshot, final_logs: &Logs, f: &mut Findings) {
    // Per envelope: its conversation and outcomes.
    let mut by_counter: HashMap<u64, (u32, Vec<Outcome>)> = HashMap::new();
    for op in &h.publishes {
        f.publish_ops += 1;
        match op.outcome {
            Outcome::Ok { duplicate, .. } => {
                f.publish_ok += 1;
                f.publish_duplicate += u64::from(duplicate);
            }
            Outcome::Failed => f.publish_failed += 1,
            Outcome::Unknown => f.publish_unknown += 1,
        }
        by_counter.entry(op.counter).or_insert_with(|| (op.conv, Vec::new())).1.push(op.outcome);
    }
    f.envelopes = by_counter.len() as u64;
    let mut acked = Vec::new();
    for op in &h.publishes {
        if let Outcome::Ok { seq, .. } = op.outcome {
            acked.push((op.conv, seq, op.counter));
        }
    }
    let v = verify::verify(&acked, final_logs);
    f.acknowledged =
        by_counter.values().filter(|(_, o)| o.iter().any(|x| matches!(x, Outcome::Ok { .. }))).count() as u64;
    f.lost = v.lost;
    f.duplicated = v.duplicated;
    f.reordered = v.out_of_order;
    f.gaps = v.gaps;
    if v.lost + v.duplicated + v.out_of_order + v.gaps > 0 {
        f.example(format!(
            "log check: {} lost, {} duplicated, {} reordered, {} gaps",
            v.lost, v.duplicated, v.out_of_order, v.gaps
        ));
        for (conv, seq, counter) in &acked {
            let log = final_logs.get(conv).map(Vec::as_slice).unwrap_or(&[]);
            let here = log.iter().find(|e| e.0 == *seq).map(|e| e.1);
            if here != Some(*counter) {
                let at: Vec<u64> = log.iter().filter(|e| e.1 == *counter).map(|e| e.0).collect();
                f.example(format!(
                    "envelope {counter} acknowledged at conv {conv} seq {seq}: the final log has {here:?} there, and the envelope at seqs {at:?}"
                ));
            }
        }
    }
    // Presence in the final logs, per (conversation, counter).
    let mut present: HashMap<(u32, u64), u64> = HashMap::new();
    for (conv, log) in final_logs {
        for (seq, counter) in log {
            if *counter == FOREIGN || by_counter.get(counter).is_none_or(|(c, _)| c != conv) {
                f.phantom += 1;
                f.example(format!("conv {conv} seq {seq}: envelope {counter:#x} was never published to it"));
            }
            *present.entry((*conv, *counter)).or_default() += 1;
        }
    }
    for (counter, (conv, outcomes)) in &by_counter {
        if outcomes.iter().any(|o| matches!(o, Outcome::Ok { .. })) {
            continue;
        }
        let n = present.get(&(*conv, *counter)).copied().unwrap_or(0);
        if outcomes.iter().all(|o| *o == Outcome::Failed) {
            if n > 0 {
                f.failed_present += 1;
                f.example(format!("envelope {counter} (conv {conv}) failed definitely, yet it is in the log"));
            }
            continue;
        }
        f.unknown += 1;
        if n == 0 {
            f.unknown_absent += 1;
        } else {
            f.unknown_present += 1;
        }
    }
}

/// (c).
pub fn check_reads(h: &HistorySnapshot, final_logs: &Logs, f: &mut Findings) {
    f.reads = h.reads.len() as u64;
    f.reads_failed = h.failed_reads;
    f.read_gaps = h.read_seen.gaps;
    f.read_mismatches = h.read_seen.conflicts;
    for e in &h.read_seen.examples {
        f.example(format!("read: {e}"));
    }
    let empty = Vec::new();
    let convs: BTreeSet<u32> = h.read_seen.conversations().copied().collect();
    for conv in convs {
        let mism = h.read_seen.mismatches(conv, final_logs.get(&conv).unwrap_or(&empty));
        f.read_mismatches += mism.len() as u64;
        for m in mism.iter().take(MAX_EXAMPLES) {
            f.example(format!(
                "read: conv {conv} seq {}: a read saw envelope {} but the final log has {}",
                m.seq,
                m.first,
                if m.then == u64::MAX - 1 { "nothing".to_string() } else { m.then.to_string() }
            ));
        }
    }
    // Linearizability of the log length, per conversation.
    let mut reads: HashMap<u32, Vec<ReadOp>> = HashMap::new();
    for r in &h.reads {
        reads.entry(r.conv).or_default().push(*r);
    }
    let mut acks: HashMap<u32, Vec<(u64, u64)>> = HashMap::new();
    for op in &h.publishes {
        if let Outcome::Ok { seq, .. } = op.outcome {
            acks.entry(op.conv).or_default().push((op.complete_us, seq));
        }
    }
    for (conv, rs) in &reads {
        let by_complete = prefix_max(rs.iter().map(|r| (r.complete_us, r.len)).collect());
        let acked = prefix_max(acks.get(conv).cloned().unwrap_or_default());
        for r in rs {
            if let Some((t, len)) = max_before(&by_complete, r.invoke_us) {
                if r.len < len {
                    f.stale_reads_backwards += 1;
                    f.example(format!(
                        "stale read: conv {conv}: a read invoked at {} us saw {} envelopes, but a read completed at {t} us had seen {len}",
                        r.invoke_us, r.len
                    ));
                }
            }
            if let Some((t, seq)) = max_before(&acked, r.invoke_us) {
                if r.len < seq {
                    f.stale_reads_missed_ack += 1;
                    f.example(format!(
                        "stale read: conv {conv}: a read invoked at {} us saw {} envelopes, but seq {seq} was acknowledged at {t} us",
                        r.invoke_us, r.len
                    ));
                }
            }
        }
    }
    f.stale_reads = f.stale_reads_backwards + f.stale_reads_missed_ack;
}

/// Sorted by time, each value replaced by the running maximum (and the time it was set).
fn prefix_max(mut v: Vec<(u64, u64)>) -> Vec<(u64, u64, u64)> {
    v.sort_unstable();
    let mut best = (0, 0);
    v.into_iter()
        .map(|(t, x)| {
            if x >= best.1 {
                best = (t, x);
            }
            (t, best.1, best.0)
        })
        .collect()
}

/// The largest value among events strictly before `t`, with the time it was reached.
fn max_before(v: &[(u64, u64, u64)], t: u64) -> Option<(u64, u64)> {
    let n = v.partition_point(|e| e.0 < t);
    (n > 0).then(|| (v[n - 1].2, v[n - 1].1))
}

/// (d).
pub fn check_subscribers(h: &HistorySnapshot, final_logs: &Logs, f: &mut Findings) {
    let s = &h.subscribers;
    f.subscriber_deliveries = s.deliveries;
    f.subscriber_order = s.violations;
    f.subscriber_removed = s.removed_events;
    for e in &s.examples {
        f.example(e.clone());
    }
    let empty = Vec::new();
    let convs: BTreeSet<u32> = s.seen.conversations().copied().collect();
    for conv in convs {
        let mism = s.seen.mismatches(conv, final_logs.get(&conv).unwrap_or(&empty));
        f.subscriber_mismatches += mism.len() as u64;
        for m in mism.iter().take(MAX_EXAMPLES) {
            f.example(format!(
                "subscriber: conv {conv} seq {}: delivered envelope {}, the final log has another",
                m.seq, m.first
            ));
        }
    }
    // Two subscribers delivering different envelopes at one seq.
    f.subscriber_mismatches += s.seen.conflicts;
    let mut streams: Vec<_> = s.streams.iter().collect();
    streams.sort_by_key(|(k, _)| **k);
    for ((sub, conv), st) in streams {
        let final_len = final_logs.get(conv).and_then(|l| l.iter().map(|e| e.0).max()).unwrap_or(0);
        if st.next.saturating_sub(1) < final_len {
            f.subscriber_incomplete += 1;
            f.example(format!(
                "subscriber {sub} conv {conv}: delivered up to seq {} after healing, the log ends at {final_len}",
                st.next.saturating_sub(1)
            ));
        }
    }
    f.subscriber_violations =
        f.subscriber_order + f.subscriber_mismatches + f.subscriber_removed + f.subscriber_incomplete;
}

/// (e).
pub fn check_replicas(final_logs: &Logs, replicas: &[(u64, Logs)], f: &mut Findings) {
    let mut nodes = BTreeSet::new();
    let empty = Vec::new();
    for (node, logs) in replicas {
        let convs: HashSet<&u32> = final_logs.keys().chain(logs.keys()).collect();
        let mut convs: Vec<_> = convs.into_iter().collect();
        convs.sort();
        for conv in convs {
            let want = final_logs.get(conv).unwrap_or(&empty);
            let have = logs.get(conv).unwrap_or(&empty);
            if want != have {
                f.diverged_conversations += 1;
                nodes.insert(*node);
                let first = want.iter().zip(have).position(|(a, b)| a != b).unwrap_or(want.len().min(have.len()));
                f.example(format!(
                    "replica: node {node} conv {conv}: {} envelopes vs the leader's {}, first difference at position {first}",
                    have.len(),
                    want.len()
                ));
            }
        }
    }
    f.diverged_nodes = nodes.into_iter().collect();
}

/// Availability figures from the acknowledgement times.
pub fn availability(h: &HistorySnapshot, run_us: u64, f: &mut Findings) {
    let mut oks: Vec<u64> = h
        .publishes
        .iter()
        .filter(|o| matches!(o.outcome, Outcome::Ok { .. }))
        .map(|o| o.complete_us.min(run_us))
        .collect();
    oks.sort_unstable();
    let windows = run_us.div_ceil(WINDOW_US).max(1);
    let mut hit = vec![false; windows as usize];
    for t in &oks {
        if let Some(w) = hit.get_mut((t / WINDOW_US) as usize) {
            *w = true;
        }
    }
    f.availability = hit.iter().filter(|x| **x).count() as f64 / windows as f64;
    let mut prev = 0;
    let mut longest = 0;
    for t in oks.iter().copied().chain(std::iter::once(run_us)) {
        longest = longest.max(t.saturating_sub(prev));
        prev = t;
    }
    f.longest_unavailable_ms = longest as f64 / 1000.0;
}
