//! Benchmarks of the store (not timed tests): WAL appends with fdatasync, and apply into
//! the sled state machine. Run with `cargo bench -p habar-raft-store`; figures go into
//! `docs/BENCHMARKS.md` with the machine they ran on.

use std::sync::mpsc;
use std::time::Duration;
use std::time::Instant;

use criterion::criterion_group;
use criterion::criterion_main;
use criterion::BenchmarkId;
use criterion::Criterion;
use criterion::Throughput;
use habar_raft_store::Wal;
use habar_raft_store::WalConfig;

/// Appends `batch` 256-byte entries to each of `groups` groups, keeping `depth` rounds in
/// flight (as openraft's cores do: submit, move on, hear of the flush later), and waits
/// until every append is durable.
fn wal_append(c: &mut Criterion) {
    let mut g = c.benchmark_group("wal_append_256B_fdatasync");
    g.measurement_time(Duration::from_secs(8));
    g.sample_size(10);
    let payload = vec![0xA5u8; 256];
    for &groups in &[1u32, 16] {
        for &batch in &[1usize, 16, 256] {
            g.throughput(Throughput::Elements(groups as u64 * batch as u64));
            g.bench_with_input(
                BenchmarkId::new(format!("groups={groups}"), format!("batch={batch}")),
                &batch,
                |b, &batch| {
                    let dir = tempfile::tempdir().expect("tempdir");
                    let wal = Wal::open(WalConfig::new(dir.path())).expect("open");
                    let mut next = vec![1u64; groups as usize];
                    b.iter_custom(|iters| {
                        let (tx, rx) = mpsc::channel();
                        let start = Instant::now();
                        for _ in 0..iters {
                            for grp in 0..groups {
                                let first = next[grp as usize];
                                let tx = tx.clone();
                                wal.append(
                                    grp,
                                    (first..first + batch as u64).map(|i| (i, 1, payload.as_slice())),
                                    Some(Box::new(move |r| tx.send(r).expect("send"))),
                                )
                                .expect("append");
                                next[grp as usize] += batch as u64;
                            }
                        }
                        for _ in 0..iters * groups as u64 {
                            rx.recv().expect("recv").expect("durable");
                        }
                        start.elapsed()
                    });
                },
            );
        }
    }
    g.finish();
}

/// One append of one 256-byte entry at a time, waiting for its fdatasync: the latency
/// floor of a single publisher with one envelope in flight.
fn wal_append_one_at_a_time(c: &mut Criterion) {
    let mut g = c.benchmark_group("wal_append_256B_wait_each");
    g.measurement_time(Duration::from_secs(5));
    g.sample_size(10);
    g.throughput(Throughput::Elements(1));
    let payload = vec![0xA5u8; 256];
    g.bench_function("groups=1/batch=1", |b| {
        let dir = tempfile::tempdir().expect("tempdir");
        let wal = Wal::open(WalConfig::new(dir.path())).expect("open");
        let mut next = 1u64;
        b.iter(|| {
            let lsn = wal.append(0, [(next, 1, payload.as_slice())], None).expect("append");
            wal.wait_durable_blocking(lsn).expect("durable");
            next += 1;
        });
    });
    g.finish();
}

/// Apply of 256-byte envelopes into sled through the openraft state machine: 256 entries of
/// `per_entry` envelopes per apply call, spread over 1,000 conversations.
fn sm_apply(c: &mut Criterion) {
    use habar_raft_store::types::Command;
    use habar_raft_store::types::Entry;
    use habar_raft_store::types::EntryPayload;
    use habar_raft_store::types::LogId;
    use habar_raft_store::types::NewEnvelope;
    use habar_raft_store::StateStore;
    use openraft::storage::RaftStateMachine;

    let mut g = c.benchmark_group("sm_apply_256B");
    g.measurement_time(Duration::from_secs(8));
    g.sample_size(10);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    for &per_entry in &[1u64, 16] {
        g.throughput(Throughput::Elements(256 * per_entry));
        g.bench_function(BenchmarkId::new("envelopes_per_entry", per_entry), |b| {
            let dir = tempfile::tempdir().expect("tempdir");
            let store = StateStore::open(dir.path(), 64 << 20).expect("open");
            let mut sm = store.group(0).expect("group");
            let mut index = 1u64;
            let mut n = 0u64;
            b.iter(|| {
                let entries: Vec<Entry> = (0..256)
                    .map(|_| {
                        let envelopes = (0..per_entry)
                            .map(|_| {
                                n += 1;
                                NewEnvelope {
                                    conversation_id: format!("conversation-{}", n % 1000),
                                    message_id: {
                                        // Unique per envelope: a repeated id would be a dedupe hit.
                                        let mut id = [0u8; 16];
                                        id[..8].copy_from_slice(&n.to_be_bytes());
                                        id
                                    },
                                    sender: String::new(),
                                    ciphertext: vec![0x5A; 256].into(),
                                    expires_at_ms: 0,
                                }
                            })
                            .collect();
                        let e = Entry {
                            log_id: LogId::new_term_index(1, index),
                            payload: EntryPayload::Normal(Command::Append { now_ms: index, envelopes }),
                        };
                        index += 1;
                        e
                    })
                    .collect();
                rt.block_on(sm.apply(futures::stream::iter(entries.into_iter().map(|e| Ok((e, None))))))
                    .expect("apply");
                // The sled work happens in the checkpoint: count it in every iteration.
                store.checkpoint().expect("checkpoint");
            });
        });
    }
    g.finish();
}

criterion_group!(benches, wal_append, wal_append_one_at_a_time, sm_apply);
criterion_main!(benches);
