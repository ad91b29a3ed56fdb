//! The chaos checker on small synthetic histories: a clean history passes, and each
//! property catches a planted violation. Each test names the property it checks.

use habar_loadtest::chaos::checker;
use habar_loadtest::chaos::checker::Findings;
use habar_loadtest::chaos::history::History;
use habar_loadtest::chaos::history::HistorySnapshot;
use habar_loadtest::chaos::history::Outcome;
use habar_loadtest::chaos::history::PublishOp;
use habar_loadtest::chaos::nemesis;
use habar_loadtest::chaos::nemesis::FaultKind;
use habar_loadtest::chaos::nemesis::Timing;
use habar_loadtest::verify::Logs;

/// Conversation 0 gets envelopes 0..5 at seqs 1..=5, each acknowledged at 10 ms
/// intervals (invoked 1 ms earlier); conversation 1 gets envelope 100 at seq 1.
fn clean() -> (History, Logs) {
    let h = History::default();
    let mut logs = Logs::new();
    for i in 0..5u64 {
        h.publish(PublishOp {
            counter: i,
            conv: 0,
            invoke_us: i * 10_000,
            complete_us: i * 10_000 + 1_000,
            outcome: Outcome::Ok { seq: i + 1, duplicate: false },
        });
        logs.entry(0).or_default().push((i + 1, i));
    }
    h.publish(PublishOp {
        counter: 100,
        conv: 1,
        invoke_us: 0,
        complete_us: 500,
        outcome: Outcome::Ok { seq: 1, duplicate: false },
    });
    logs.entry(1).or_default().push((1, 100));
    (h, logs)
}

fn check(h: &HistorySnapshot, logs: &Logs, replicas: &[(u64, Logs)]) -> Findings {
    checker::check(h, logs, replicas, 100_000)
}

#[test]
fn a_clean_history_passes() {
    let (h, logs) = clean();
    // A read after everything, subscribers that saw everything, identical replicas.
    h.read(0, 60_000, 61_000, &logs[&0], 5);
    {
        let mut s = h.subscribers();
        s.open(0, 0);
        for &(seq, c) in &logs[&0] {
            s.deliver(0, 0, seq, c);
        }
    }
    let replicas = vec![(1, logs.clone()), (2, logs.clone())];
    let f = check(&h.snapshot(), &logs, &replicas);
    assert_eq!(f.violations(), 0, "{f:#?}");
    assert_eq!((f.acknowledged, f.reads, f.subscriber_deliveries), (6, 1, 5));
}

#[test]
fn property_a_a_lost_acknowledged_envelope_is_caught() {
    let (h, mut logs) = clean();
    logs.get_mut(&0).map(Vec::pop);
    let f = check(&h.snapshot(), &logs, &[]);
    assert_eq!(f.lost, 1, "{f:#?}");
    assert!(f.violations() > 0);
}

#[test]
fn property_a_an_envelope_that_failed_definitely_must_be_absent() {
    let (h, mut logs) = clean();
    h.publish(PublishOp { counter: 7, conv: 1, invoke_us: 1, complete_us: 2, outcome: Outcome::Failed });
    logs.entry(1).or_default().push((2, 7));
    let f = check(&h.snapshot(), &logs, &[]);
    assert_eq!(f.failed_present, 1, "{f:#?}");
}

#[test]
fn property_a_a_phantom_envelope_is_caught() {
    let (h, mut logs) = clean();
    logs.entry(1).or_default().push((2, 999));
    let f = check(&h.snapshot(), &logs, &[]);
    assert_eq!(f.phantom, 1, "{f:#?}");
}

#[test]
fn property_b_unknown_outcomes_present_once_or_absent_are_allowed() {
    let (h, mut logs) = clean();
    for (c, t) in [(8u64, 1u64), (9, 2)] {
        for _ in 0..2 {
            h.publish(PublishOp { counter: c, conv: 1, invoke_us: t, complete_us: t + 1, outcome: Outcome::Unknown });
        }
    }
    logs.entry(1).or_default().push((2, 8)); // 8 present once, 9 absent
    let f = check(&h.snapshot(), &logs, &[]);
    assert_eq!((f.unknown, f.unknown_present, f.unknown_absent), (2, 1, 1), "{f:#?}");
    assert_eq!(f.violations(), 0, "{f:#?}");
}

#[test]
fn property_b_an_unknown_envelope_applied_twice_is_a_duplicate() {
    let (h, mut logs) = clean();
    h.publish(PublishOp { counter: 8, conv: 1, invoke_us: 1, complete_us: 2, outcome: Outcome::Unknown });
    h.publish(PublishOp { counter: 8, conv: 1, invoke_us: 3, complete_us: 4, outcome: Outcome::Unknown });
    logs.entry(1).or_default().extend([(2, 8), (3, 8)]);
    let f = check(&h.snapshot(), &logs, &[]);
    assert_eq!(f.duplicated, 1, "{f:#?}");
    assert!(f.violations() > 0);
}

#[test]
fn property_b_a_retry_answering_another_seq_is_caught() {
    // The first attempt was acknowledged at seq 5; a retry of the same id answered
    // duplicate with seq 6: the two acknowledgements disagree.
    let (h, logs) = clean();
    h.publish(PublishOp {
        counter: 4,
        conv: 0,
        invoke_us: 50_000,
        complete_us: 50_001,
        outcome: Outcome::Ok { seq: 6, duplicate: true },
    });
    let f = check(&h.snapshot(), &logs, &[]);
    assert_eq!(f.reordered, 1, "{f:#?}");
}

#[test]
fn property_c_a_read_seeing_another_envelope_at_a_seq_is_caught() {
    let (h, logs) = clean();
    let mut seen = logs[&0].clone();
    seen[2].1 = 4; // seq 3 holds envelope 2 in the log; this read saw envelope 4 there
    h.read(0, 60_000, 61_000, &seen, 5);
    let f = check(&h.snapshot(), &logs, &[]);
    assert_eq!(f.read_mismatches, 1, "{f:#?}");
}

#[test]
fn property_c_two_reads_disagreeing_on_a_seq_are_caught() {
    let (h, logs) = clean();
    h.read(1, 1_000, 2_000, &[(1, 100)], 1);
    h.read(1, 3_000, 4_000, &[(1, 55)], 1);
    let f = check(&h.snapshot(), &logs, &[]);
    // The second read conflicts with the first (whose envelope is the log's): one mismatch.
    assert_eq!(f.read_mismatches, 1, "{f:#?}");
    // And when the first read was the wrong one, it also differs from the final log.
    let (h, logs) = clean();
    h.read(1, 1_000, 2_000, &[(1, 55)], 1);
    h.read(1, 3_000, 4_000, &[(1, 100)], 1);
    let f = check(&h.snapshot(), &logs, &[]);
    assert_eq!(f.read_mismatches, 2, "{f:#?}");
}

#[test]
fn property_c_a_gap_inside_a_read_is_caught() {
    let (h, logs) = clean();
    let seen: Vec<_> = logs[&0].iter().copied().filter(|e| e.0 != 3).collect();
    h.read(0, 60_000, 61_000, &seen, 5);
    let f = check(&h.snapshot(), &logs, &[]);
    assert_eq!(f.read_gaps, 1, "{f:#?}");
}

#[test]
fn property_c_a_read_going_backwards_is_stale() {
    let (h, logs) = clean();
    // Read A completes at 61 ms having seen 5 envelopes; read B starts at 62 ms and sees 3.
    h.read(0, 60_000, 61_000, &logs[&0], 5);
    h.read(0, 62_000, 63_000, &logs[&0][..3], 3);
    let f = check(&h.snapshot(), &logs, &[]);
    assert_eq!(f.stale_reads_backwards, 1, "{f:#?}");
    assert!(f.stale_reads > 0);
    // Overlapping reads may see different lengths.
    let (h, logs) = clean();
    h.read(0, 60_000, 63_000, &logs[&0], 5);
    h.read(0, 62_000, 64_000, &logs[&0][..3], 3);
    let f = check(&h.snapshot(), &logs, &[]);
    assert_eq!(f.stale_reads_backwards, 0, "{f:#?}");
}

#[test]
fn property_c_a_read_missing_an_earlier_acknowledgement_is_stale() {
    let (h, logs) = clean();
    // Seq 5 was acknowledged at 41 ms; a read invoked at 45 ms saw only 4 envelopes.
    h.read(0, 45_000, 46_000, &logs[&0][..4], 4);
    let f = check(&h.snapshot(), &logs, &[]);
    assert_eq!(f.stale_reads_missed_ack, 1, "{f:#?}");
    // A read invoked before that acknowledgement completed may miss it.
    let (h, logs) = clean();
    h.read(0, 40_500, 46_000, &logs[&0][..4], 4);
    let f = check(&h.snapshot(), &logs, &[]);
    assert_eq!(f.stale_reads, 0, "{f:#?}");
}

#[test]
fn property_d_a_subscriber_gap_repeat_or_step_back_is_caught() {
    for (seqs, what) in [(vec![1, 2, 4, 5], "gap"), (vec![1, 2, 2, 3, 4, 5], "repeat"), (vec![1, 3, 2, 4, 5], "order")]
    {
        let (h, logs) = clean();
        {
            let mut s = h.subscribers();
            s.open(0, 0);
            for seq in &seqs {
                s.deliver(0, 0, *seq, seq - 1);
            }
        }
        let f = check(&h.snapshot(), &logs, &[]);
        assert!(f.subscriber_order > 0 && f.subscriber_violations > 0, "{what}: {f:#?}");
    }
}

#[test]
fn property_d_a_subscriber_delivering_another_envelope_is_caught() {
    let (h, logs) = clean();
    {
        let mut s = h.subscribers();
        for &(seq, c) in &logs[&0] {
            s.deliver(0, 0, seq, if seq == 2 { 77 } else { c });
        }
    }
    let f = check(&h.snapshot(), &logs, &[]);
    assert_eq!((f.subscriber_order, f.subscriber_mismatches), (0, 1), "{f:#?}");
}

#[test]
fn property_d_a_subscriber_left_behind_is_caught() {
    let (h, logs) = clean();
    {
        let mut s = h.subscribers();
        s.open(0, 1); // never delivered conversation 1's envelope
    }
    let f = check(&h.snapshot(), &logs, &[]);
    assert_eq!(f.subscriber_incomplete, 1, "{f:#?}");
}

#[test]
fn property_e_a_diverged_replica_is_caught() {
    let (h, logs) = clean();
    let mut other = logs.clone();
    if let Some(l) = other.get_mut(&0) {
        l[4].1 = 3;
    }
    let mut short = logs.clone();
    short.get_mut(&1).map(Vec::pop);
    let replicas = vec![(1, logs.clone()), (2, other), (3, short)];
    let f = check(&h.snapshot(), &logs, &replicas);
    assert_eq!((f.diverged_conversations, f.diverged_nodes.clone()), (2, vec![2, 3]), "{f:#?}");
}

#[test]
fn availability_counts_windows_with_an_acknowledgement() {
    let (h, logs) = clean();
    // Acks at 0.5, 1, 11, 21, 31, 41 ms of a 100 ms run: one 100 ms window.
    let f = check(&h.snapshot(), &logs, &[]);
    assert!((f.availability - 1.0).abs() < 1e-9, "{f:#?}");
    assert!((f.longest_unavailable_ms - 59.0).abs() < 1e-9, "{f:#?}");
    let f = checker::check(&h.snapshot(), &logs, &[], 1_000_000);
    assert!((f.availability - 0.1).abs() < 1e-9, "{f:#?}");
}

#[test]
fn the_schedule_is_reproducible_from_its_seed() {
    let t = Timing::for_election_timeout(600);
    let a = nemesis::schedule(1, 120_000, &FaultKind::ALL, &t);
    let b = nemesis::schedule(1, 120_000, &FaultKind::ALL, &t);
    assert!(!a.is_empty());
    assert_eq!(a, b, "same seed, same faults");
    assert_ne!(a, nemesis::schedule(2, 120_000, &FaultKind::ALL, &t), "another seed, other faults");
    // Only the kinds asked for, within their time ranges, and inside the run.
    let only = nemesis::schedule(3, 120_000, &[FaultKind::PauseLeader], &t);
    assert!(only.iter().all(|p| p.kind == FaultKind::PauseLeader && (1200..=1800).contains(&p.hold_ms)));
    let total: u64 = a.iter().map(|p| p.quiet_ms + p.hold_ms).sum();
    assert!(total <= 120_000);
}

/// Property: a run long enough for one round covers every fault kind asked for, first
/// (so the short CI run exercises each class), in an order that depends on the seed.
#[test]
fn the_first_faults_of_a_schedule_cover_every_kind() {
    let t = Timing::for_election_timeout(600);
    for seed in 0..20 {
        let s = nemesis::schedule(seed, 300_000, &FaultKind::ALL, &t);
        let mut first: Vec<&str> = s.iter().take(FaultKind::ALL.len()).map(|p| p.kind.name()).collect();
        first.sort_unstable();
        let mut all: Vec<&str> = FaultKind::ALL.iter().map(|k| k.name()).collect();
        all.sort_unstable();
        assert_eq!(first, all, "seed {seed}");
    }
    let order = |seed| nemesis::schedule(seed, 120_000, &FaultKind::ALL, &t)[0].kind;
    assert!((0..20).any(|seed| order(seed) != order(0)), "the order depends on the seed");
}

#[test]
fn fault_lists_parse() {
    assert_eq!(FaultKind::parse_list("all").unwrap(), FaultKind::PROCESS.to_vec());
    assert_eq!(
        FaultKind::parse_list("kill-leader,pause-leader").unwrap(),
        vec![FaultKind::KillLeader, FaultKind::PauseLeader]
    );
    assert!(FaultKind::parse_list("kill-leader,partition").is_err());
    assert_eq!(nemesis::election_timeout_max_ms(&["--election-timeout-max-ms=900".into()]), 900);
    assert_eq!(nemesis::election_timeout_max_ms(&["--election-timeout-max-ms".into(), "800".into()]), 800);
    assert_eq!(nemesis::election_timeout_max_ms(&[]), 600);
}

#[test]
fn network_faults_need_netns() {
    use habar_loadtest::chaos::cluster::NetMode;
    // `all` is every kind valid for the mode.
    assert_eq!(FaultKind::parse_list_for("all", NetMode::Loopback).unwrap(), FaultKind::PROCESS.to_vec());
    assert_eq!(FaultKind::parse_list_for("all", NetMode::Netns).unwrap(), FaultKind::ALL.to_vec());
    for k in FaultKind::NETWORK {
        let e = FaultKind::parse_list_for(&format!("kill-leader,{}", k.name()), NetMode::Loopback).unwrap_err();
        assert!(e.to_string().contains("--net netns"), "{e}");
        assert_eq!(FaultKind::parse_list_for(k.name(), NetMode::Netns).unwrap(), vec![k]);
        assert!(k.needs_netns());
    }
    assert!(FaultKind::PROCESS.iter().all(|k| !k.needs_netns()));
    assert_eq!(
        FaultKind::parse_list_for(
            "partition-leader,partition-random,flap,slow-link,lossy-link,kill-leader",
            NetMode::Netns
        )
        .unwrap()
        .len(),
        6
    );
    assert_eq!(NetMode::parse("netns").unwrap(), NetMode::Netns);
    assert!(NetMode::parse("docker").is_err());
}

#[test]
fn network_fault_targets_are_pure_functions_of_the_pick() {
    let ids = [1, 2, 3, 4, 5];
    for pick in 0..50u64 {
        // A strict minority: 2 of 5, 1 of 3.
        let m = nemesis::random_minority(&ids, pick);
        assert_eq!(m.len(), 2);
        assert_eq!(m, nemesis::random_minority(&ids, pick));
        assert_eq!(nemesis::random_minority(&[1, 2, 3], pick).len(), 1);
        // A bridge: two disjoint pairs and a fifth node.
        let (a, b, c) = nemesis::bridge_sides(&ids, pick).unwrap();
        let mut all: Vec<u64> = a.iter().chain(c.iter()).copied().chain([b]).collect();
        all.sort_unstable();
        assert_eq!(all, ids.to_vec());
        assert_eq!((a.len(), c.len()), (2, 2));
    }
    assert!((0..50).any(|p| nemesis::random_minority(&ids, p) != nemesis::random_minority(&ids, 0)));
    assert_eq!(nemesis::bridge_sides(&[1, 2, 3], 7), None);
    // Flap intervals: 200-800 ms each, summing to the hold.
    let f = nemesis::flap_intervals(9, 6000);
    assert_eq!(f, nemesis::flap_intervals(9, 6000));
    assert_eq!(f.iter().sum::<u64>(), 6000);
    assert!(f[..f.len() - 1].iter().all(|d| (200..=800).contains(d)));
}

#[test]
fn network_faults_hold_a_few_seconds() {
    let t = Timing::for_election_timeout(600);
    let s = nemesis::schedule(5, 600_000, &FaultKind::NETWORK, &t);
    assert!(!s.is_empty());
    for p in &s {
        let (lo, hi) = if p.kind == FaultKind::Flap { (4000, 8000) } else { (2000, 6000) };
        assert!((lo..=hi).contains(&p.hold_ms), "{p:?}");
    }
}
