//! `--verify`: every acknowledged envelope must be in its conversation's log exactly once,
//! at the seq it was acknowledged with, and each log's seqs must be dense from 1.
//!
//! Envelopes are identified by a counter in their message id (`[run id 8][counter 8]`), so the
//! ledger of acknowledgements stays small: (conversation, seq, counter) per envelope.

use std::collections::HashMap;
use std::sync::Mutex;

use serde::Serialize;

/// A message id of this run: the run id, then the envelope's counter (big-endian).
pub fn message_id(run_id: u64, counter: u64) -> [u8; 16] {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&run_id.to_be_bytes());
    id[8..].copy_from_slice(&counter.to_be_bytes());
    id
}

/// The counter of a message id of run `run_id`, or None for another run's id.
pub fn counter_of(run_id: u64, id: &[u8]) -> Option<u64> {
    if id.len() != 16 || id[..8] != run_id.to_be_bytes() {
        return None;
    }
    let mut c = [0u8; 8];
    c.copy_from_slice(&id[8..]);
    Some(u64::from_be_bytes(c))
}

/// One acknowledgement: (conversation index, seq, counter).
pub type Ack = (u32, u64, u64);
/// Logs as read back: per conversation index, `(seq, counter)` in log order.
pub type Logs = HashMap<u32, Vec<(u64, u64)>>;

/// What was acknowledged: (conversation index, seq, counter).
#[derive(Default)]
pub struct Ledger {
    acked: Mutex<Vec<(u32, u64, u64)>>,
}

impl Ledger {
    pub fn ack(&self, conversation: u32, seq: u64, counter: u64) {
        self.acked.lock().unwrap_or_else(|p| p.into_inner()).push((conversation, seq, counter));
    }

    pub fn len(&self) -> usize {
        self.acked.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn take(&self) -> Vec<(u32, u64, u64)> {
        std::mem::take(&mut *self.acked.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    pub acknowledged: u64,
    pub conversations: u64,
    /// Acknowledged envelopes found nowhere in their conversation.
    pub lost: u64,
    /// Extra copies of an envelope (same message id more than once in a log).
    pub duplicated: u64,
    /// Acknowledged envelopes found at another seq than acknowledged, or two
    /// acknowledgements of one seq.
    pub out_of_order: u64,
    /// Missing seqs inside a log (seqs must be dense from 1).
    pub gaps: u64,
    /// Envelopes in the logs whose publish was not acknowledged (timeouts, errors): allowed.
    pub unacknowledged_present: u64,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.lost == 0 && self.duplicated == 0 && self.out_of_order == 0 && self.gaps == 0
    }
}

/// Checks `acked` against `logs` (per conversation index: `(seq, counter)` in log order;
/// a counter of `u64::MAX` marks an envelope of another run).
pub fn verify(acked: &[Ack], logs: &Logs) -> VerifyReport {
    let mut r =
        VerifyReport { acknowledged: acked.len() as u64, conversations: logs.len() as u64, ..Default::default() };
    // Per conversation: seq -> counter, and counter -> seqs.
    let mut at: HashMap<(u32, u64), u64> = HashMap::new();
    let mut where_: HashMap<(u32, u64), Vec<u64>> = HashMap::new();
    for (conv, log) in logs {
        let mut expected = 1u64;
        for (seq, counter) in log {
            if *seq > expected {
                r.gaps += seq - expected;
            } else if *seq < expected {
                // Not ascending: a reordering in the log itself.
                r.out_of_order += 1;
            }
            expected = seq + 1;
            at.insert((*conv, *seq), *counter);
            where_.entry((*conv, *counter)).or_default().push(*seq);
        }
    }
    for seqs in where_.values() {
        r.duplicated += seqs.len() as u64 - 1;
    }
    let mut acked_seqs: HashMap<(u32, u64), u64> = HashMap::new();
    let mut acked_counters: std::collections::HashSet<(u32, u64)> = std::collections::HashSet::new();
    for (conv, seq, counter) in acked {
        acked_counters.insert((*conv, *counter));
        if let Some(other) = acked_seqs.insert((*conv, *seq), *counter) {
            if other != *counter {
                r.out_of_order += 1;
                continue;
            }
        }
        match at.get(&(*conv, *seq)) {
            Some(c) if c == counter => {}
            _ => match where_.get(&(*conv, *counter)) {
                Some(_) => r.out_of_order += 1,
                None => r.lost += 1,
            },
        }
    }
    r.unacknowledged_present = where_.keys().filter(|k| !acked_counters.contains(k)).count() as u64;
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clean() -> (Vec<Ack>, Logs) {
        let mut acked = Vec::new();
        let mut logs: HashMap<u32, Vec<(u64, u64)>> = HashMap::new();
        let mut counter = 0;
        for conv in 0..3u32 {
            for seq in 1..=10u64 {
                acked.push((conv, seq, counter));
                logs.entry(conv).or_default().push((seq, counter));
                counter += 1;
            }
        }
        (acked, logs)
    }

    #[test]
    fn a_clean_run_verifies() {
        let (acked, logs) = clean();
        let r = verify(&acked, &logs);
        assert!(r.ok(), "{r:?}");
        assert_eq!(r.acknowledged, 30);
    }

    #[test]
    fn the_verifier_catches_a_planted_loss() {
        let (acked, mut logs) = clean();
        // The last envelope of conversation 1 is gone (a lost tail: no gap visible).
        logs.get_mut(&1).unwrap().pop();
        let r = verify(&acked, &logs);
        assert_eq!((r.lost, r.duplicated, r.out_of_order, r.gaps), (1, 0, 0, 0), "{r:?}");
        // A lost envelope in the middle also leaves a gap.
        let (acked, mut logs) = clean();
        logs.get_mut(&2).unwrap().remove(4);
        let r = verify(&acked, &logs);
        assert_eq!((r.lost, r.gaps), (1, 1), "{r:?}");
        assert!(!r.ok());
    }

    #[test]
    fn the_verifier_catches_a_planted_duplicate() {
        let (acked, mut logs) = clean();
        // The envelope acknowledged at seq 3 appended again at seq 11.
        let c = logs[&0][2].1;
        logs.get_mut(&0).unwrap().push((11, c));
        let r = verify(&acked, &logs);
        assert_eq!((r.lost, r.duplicated, r.out_of_order, r.gaps), (0, 1, 0, 0), "{r:?}");
    }

    #[test]
    fn the_verifier_catches_a_planted_reordering() {
        let (acked, mut logs) = clean();
        // Two envelopes swapped: each sits at the other's acknowledged seq.
        let log = logs.get_mut(&1).unwrap();
        let (a, b) = (log[3].1, log[4].1);
        log[3].1 = b;
        log[4].1 = a;
        let r = verify(&acked, &logs);
        assert_eq!((r.lost, r.duplicated, r.out_of_order, r.gaps), (0, 0, 2, 0), "{r:?}");
    }

    #[test]
    fn unacknowledged_envelopes_in_the_log_are_allowed() {
        let (mut acked, logs) = clean();
        acked.retain(|(c, s, _)| !(*c == 0 && *s == 10)); // its acknowledgement was lost
        let r = verify(&acked, &logs);
        assert!(r.ok(), "{r:?}");
        assert_eq!(r.unacknowledged_present, 1);
    }

    #[test]
    fn message_ids_carry_the_run_and_counter() {
        let id = message_id(7, 42);
        assert_eq!(counter_of(7, &id), Some(42));
        assert_eq!(counter_of(8, &id), None);
        assert_eq!(counter_of(7, &id[..15]), None);
    }
}
