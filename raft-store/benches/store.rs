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
            g.bench_with_input(BenchmarkId::new(format!("groups={groups}"), format!("batch={batch}")), &batch, |b, &batch| {
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
            });
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

criterion_group!(benches, wal_append, wal_append_one_at_a_time);
criterion_main!(benches);
