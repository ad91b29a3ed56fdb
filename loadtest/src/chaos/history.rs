//! The history of a run: every publish attempt, every linearizable read and every
//! subscriber delivery, with invoke/complete times in microseconds since the run started.
//!
//! Reads and deliveries are folded as they are recorded so memory stays proportional to
//! the logs, not to the number of reads: per conversation, the counter observed at each
//! seq ([`Observations`]), conflicts between observations, and gaps inside one read;
//! per subscriber stream, the next seq it must deliver ([`SubscriberLog`]).

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::MutexGuard;

use serde::Serialize;

/// The counter of an envelope of another run (or with a malformed message id).
pub const FOREIGN: u64 = u64::MAX;
/// A seq no observation covered yet.
const UNSEEN: u64 = u64::MAX - 1;
/// Examples of each kind of anomaly kept for the report.
pub const MAX_EXAMPLES: usize = 20;

/// How one publish attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Acknowledged at `seq` (`duplicate`: a retry answered the original seq).
    Ok { seq: u64, duplicate: bool },
    /// Definitely not applied (INVALID_ARGUMENT).
    Failed,
    /// May or may not have been applied (deadline, UNAVAILABLE after retries, transport).
    Unknown,
}

/// One publish attempt of envelope `counter` to conversation `conv`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PublishOp {
    pub counter: u64,
    pub conv: u32,
    pub invoke_us: u64,
    pub complete_us: u64,
    pub outcome: Outcome,
}

/// One successful linearizable read of a whole conversation from seq 1: it saw `len`
/// envelopes (seqs 1..=len when it had no gap).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ReadOp {
    pub conv: u32,
    pub invoke_us: u64,
    pub complete_us: u64,
    pub len: u64,
}

/// Two observations of one seq that disagree (reads, or a subscriber and the log).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Conflict {
    pub conv: u32,
    pub seq: u64,
    pub first: u64,
    pub then: u64,
}

/// Per conversation, the counter observed at each seq (by reads, or by subscribers).
#[derive(Debug, Default, Clone)]
pub struct Observations {
    by_conv: HashMap<u32, Vec<u64>>,
    /// Two observations of one seq with different envelopes.
    pub conflicts: u64,
    /// Reads whose seqs were not exactly 1, 2, 3, ... (a hole or a disorder inside one read).
    pub gaps: u64,
    pub examples: Vec<String>,
}

impl Observations {
    fn example(&mut self, s: String) {
        if self.examples.len() < MAX_EXAMPLES {
            self.examples.push(s);
        }
    }

    /// Records one envelope seen at `seq`; false if another was seen there before.
    pub fn observe(&mut self, conv: u32, seq: u64, counter: u64) -> bool {
        if seq == 0 {
            return true;
        }
        let v = self.by_conv.entry(conv).or_default();
        let i = (seq - 1) as usize;
        if v.len() <= i {
            v.resize(i + 1, UNSEEN);
        }
        let prev = v[i];
        if prev == UNSEEN {
            v[i] = counter;
            return true;
        }
        if prev != counter {
            self.conflicts += 1;
            self.example(format!("conv {conv} seq {seq}: observed envelope {prev} then {counter}"));
            return false;
        }
        true
    }

    /// Records a whole read from seq 1 (`entries` in the order returned, `last_seq` the
    /// read's answer); returns the length of log it saw (its highest seq).
    pub fn record_read(&mut self, conv: u32, entries: &[(u64, u64)], last_seq: u64) -> u64 {
        let mut expected = 1;
        let mut gap = false;
        for &(seq, counter) in entries {
            if seq != expected {
                gap = true;
            }
            expected = seq + 1;
            self.observe(conv, seq, counter);
        }
        let len = entries.iter().map(|e| e.0).max().unwrap_or(0);
        if last_seq > len {
            // The read said the log goes up to last_seq but did not return the tail.
            gap = true;
        }
        if gap {
            self.gaps += 1;
            let seqs: Vec<u64> = entries.iter().map(|e| e.0).take(50).collect();
            self.example(format!("conv {conv}: a read returned seqs {seqs:?}... (last_seq {last_seq})"));
        }
        len
    }

    /// Observed seqs whose envelope differs from `final_log` (seq -> counter, seqs from 1),
    /// including seqs beyond the final log's end.
    pub fn mismatches(&self, conv: u32, final_log: &[(u64, u64)]) -> Vec<Conflict> {
        let Some(v) = self.by_conv.get(&conv) else { return Vec::new() };
        let fin: HashMap<u64, u64> = final_log.iter().copied().collect();
        let mut out = Vec::new();
        for (i, &c) in v.iter().enumerate() {
            if c == UNSEEN {
                continue;
            }
            let seq = i as u64 + 1;
            match fin.get(&seq) {
                Some(&f) if f == c => {}
                Some(&f) => out.push(Conflict { conv, seq, first: c, then: f }),
                None => out.push(Conflict { conv, seq, first: c, then: UNSEEN }),
            }
        }
        out
    }

    pub fn conversations(&self) -> impl Iterator<Item = &u32> {
        self.by_conv.keys()
    }
}

/// What one subscriber delivered on one conversation so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct StreamState {
    /// The seq it must deliver next (starts at 1: subscriptions start from seq 1).
    pub next: u64,
    pub delivered: u64,
}

/// Per (subscriber, conversation): deliveries checked as they arrive. A subscriber must
/// deliver seqs 1, 2, 3, ... exactly: anything else is a gap, a repeat or a step back.
#[derive(Debug, Default, Clone)]
pub struct SubscriberLog {
    pub streams: HashMap<(u32, u32), StreamState>,
    pub seen: Observations,
    /// Deliveries not equal to the stream's next seq.
    pub violations: u64,
    /// `Removed` events: nothing is configured to expire or be removed in a chaos run.
    pub removed_events: u64,
    /// Subscription errors (the subscription reconnects by itself) and subscriptions that ended.
    pub errors: u64,
    pub ended: u64,
    pub deliveries: u64,
    pub examples: Vec<String>,
}

impl SubscriberLog {
    /// Declares a stream (so one that never delivers anything is still checked).
    pub fn open(&mut self, sub: u32, conv: u32) {
        self.streams.entry((sub, conv)).or_insert(StreamState { next: 1, delivered: 0 });
    }

    /// One delivered envelope.
    pub fn deliver(&mut self, sub: u32, conv: u32, seq: u64, counter: u64) {
        self.deliveries += 1;
        let st = self.streams.entry((sub, conv)).or_insert(StreamState { next: 1, delivered: 0 });
        if seq != st.next {
            self.violations += 1;
            let what = if seq > st.next {
                "gap"
            } else if seq + 1 == st.next {
                "repeat"
            } else {
                "backwards"
            };
            if self.examples.len() < MAX_EXAMPLES {
                self.examples.push(format!(
                    "subscriber {sub} conv {conv}: delivered seq {seq} when {} was next ({what})",
                    st.next
                ));
            }
        }
        st.next = st.next.max(seq + 1);
        st.delivered += 1;
        self.seen.observe(conv, seq, counter);
    }

    pub fn removed(&mut self, sub: u32, conv: u32, from: u64, to: u64) {
        self.removed_events += 1;
        if self.examples.len() < MAX_EXAMPLES {
            self.examples
                .push(format!("subscriber {sub} conv {conv}: Removed {from}..={to} (nothing should be removed)"));
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The history shared by the workload's tasks.
#[derive(Default)]
pub struct History {
    publishes: Mutex<Vec<PublishOp>>,
    reads: Mutex<Vec<ReadOp>>,
    read_seen: Mutex<Observations>,
    failed_reads: Mutex<u64>,
    subscribers: Mutex<SubscriberLog>,
}

impl History {
    pub fn publish(&self, op: PublishOp) {
        lock(&self.publishes).push(op);
    }

    /// A successful read of `conv` from seq 1 (all its pages).
    pub fn read(&self, conv: u32, invoke_us: u64, complete_us: u64, entries: &[(u64, u64)], last_seq: u64) {
        let len = lock(&self.read_seen).record_read(conv, entries, last_seq);
        lock(&self.reads).push(ReadOp { conv, invoke_us, complete_us, len });
    }

    pub fn read_failed(&self) {
        *lock(&self.failed_reads) += 1;
    }

    pub fn subscribers(&self) -> MutexGuard<'_, SubscriberLog> {
        lock(&self.subscribers)
    }

    /// A copy of everything recorded so far.
    pub fn snapshot(&self) -> HistorySnapshot {
        HistorySnapshot {
            publishes: lock(&self.publishes).clone(),
            reads: lock(&self.reads).clone(),
            read_seen: lock(&self.read_seen).clone(),
            failed_reads: *lock(&self.failed_reads),
            subscribers: lock(&self.subscribers).clone(),
        }
    }
}

/// The history as the checker takes it.
#[derive(Debug, Default, Clone)]
pub struct HistorySnapshot {
    pub publishes: Vec<PublishOp>,
    pub reads: Vec<ReadOp>,
    pub read_seen: Observations,
    pub failed_reads: u64,
    pub subscribers: SubscriberLog,
}
