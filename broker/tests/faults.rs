//! Fault tests that run inside `cargo test` (the fault suite's fast part; the long soak
//! with process kills, pauses and power loss is `habar-chaos` / `ops/chaos`).

mod common;

use std::time::Duration;
use std::time::Instant;

use common::*;
use habar_proto::v1 as pb;
use openraft::rt::watch::WatchReceiver;

fn true_now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

/// The clock bound the test configures (`max_clock_skew_ms`): generous, because a debug
/// build on a loaded 2-core machine can take long round trips.
const BOUND_MS: u64 = 2_000;
const SHARDS: u32 = 2;

/// One run: node 1's clock is off by `skew_ms`; it leads every shard (so its clock stamps
/// entries and drives housekeeping). Returns nothing; asserts the expiry bound.
async fn expiry_with_one_skewed_node(skew_ms: i64) {
    let cluster = start_cluster_with(3, SHARDS, |c| {
        c.maintenance_interval_ms = 100;
        c.max_clock_skew_ms = BOUND_MS;
        if c.id == 1 {
            c.test_clock_offset_ms = skew_ms;
        }
    })
    .await;
    // Node 1 leads every shard.
    let start = Instant::now();
    loop {
        let mut all = true;
        for g in 0..SHARDS as usize {
            let leader = cluster.nodes[0].node.rafts[g].metrics().borrow_watched().current_leader;
            if leader != Some(1) {
                all = false;
                if let Some(l) = leader {
                    let _ = cluster.nodes[(l - 1) as usize].node.rafts[g].trigger().transfer_leader(1).await;
                }
            }
        }
        if all {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "node 1 did not take every shard");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Every node's clock calibrated; node 1 corrected by about -skew.
    let start = Instant::now();
    loop {
        let ok = cluster.nodes.iter().all(|n| n.node.clock.calibrated())
            && cluster.nodes[0].node.now_ms().abs_diff(true_now_ms()) < BOUND_MS;
        if ok {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "clocks not calibrated");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let correction = cluster.nodes[0].node.clock.correction_ms();
    assert!(
        (correction + skew_ms).unsigned_abs() < BOUND_MS,
        "node 1 corrected by {correction} for a skew of {skew_ms}"
    );

    // Publish through node 1: per conversation, 20 envelopes, even ones expiring in 6 s.
    let mut c = broker(&cluster.nodes[0].endpoint()).await;
    let convs: Vec<String> = (0..4).map(|i| format!("skew-{skew_ms}-{i}")).collect();
    let expires = true_now_ms() + 6_000;
    for conv in &convs {
        let envs: Vec<pb::Envelope> = (0..20)
            .map(|i| pb::Envelope { expires_at_ms: if i % 2 == 0 { expires } else { 0 }, ..envelope(conv, i) })
            .collect();
        let acks = c.publish(pb::PublishRequest { envelopes: envs, ephemeral: false }).await.unwrap().into_inner();
        let seqs: Vec<u64> = acks.appended.iter().map(|a| a.seq).collect();
        assert_eq!(seqs, (1..=20).collect::<Vec<u64>>(), "{conv}: appended in order");
    }
    let mut clients = Vec::new();
    for n in &cluster.nodes {
        clients.push(broker(&n.endpoint()).await);
    }

    // Property 1: nothing is hidden or deleted more than the bound before it expires.
    while true_now_ms() + BOUND_MS < expires {
        let asked_at = true_now_ms();
        for (i, client) in clients.iter_mut().enumerate() {
            for conv in &convs {
                let got = read_all(client, conv, true).await;
                if true_now_ms() + BOUND_MS < expires {
                    assert_eq!(
                        got.len(),
                        20,
                        "node {} hid or deleted envelopes of {conv} at {asked_at}, {} ms before they expire",
                        i + 1,
                        expires - asked_at
                    );
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Property 2: nothing is served more than the bound after it expired; housekeeping
    // then deletes them on every replica; the others stay, in order.
    while true_now_ms() < expires + BOUND_MS {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (i, client) in clients.iter_mut().enumerate() {
        for conv in &convs {
            let got = read_all(client, conv, true).await;
            let seqs: Vec<u64> = got.iter().map(|e| e.seq).collect();
            assert_eq!(
                seqs,
                (1..=20).filter(|s| s % 2 == 0).collect::<Vec<u64>>(),
                "node {} still serves expired envelopes of {conv} more than {BOUND_MS} ms after expiry",
                i + 1
            );
        }
    }
    let start = Instant::now();
    for conv in &convs {
        let shard = habar_broker::shard::shard_of(conv, SHARDS);
        loop {
            let held: Vec<usize> =
                cluster.nodes.iter().map(|n| n.node.store.read(shard, conv, 1, 1000).unwrap().len()).collect();
            if held.iter().all(|h| *h == 10) {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(20), "{conv}: expired envelopes still held: {held:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Property (clock skew, fault 7): with one node's clock 30 s ahead, and that node leading
/// every shard, no envelope is hidden or deleted more than `max_clock_skew_ms` before its
/// `expires_at_ms`, none is served more than that after it, and order is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_30s_ahead_neither_expires_early_nor_serves_late() {
    expiry_with_one_skewed_node(30_000).await;
}

/// Property (clock skew, fault 7): the same with the leader's clock 30 s behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_30s_behind_neither_expires_early_nor_serves_late() {
    expiry_with_one_skewed_node(-30_000).await;
}

/// Property (disk full, fault 8): a node whose disk is (nearly) full refuses writes with an
/// error naming the node and the setting, hands its leaderships over and takes no
/// replication, while the other two keep a quorum and acknowledge writes; when space
/// returns it catches up and serves again. Nothing acknowledged is lost or reordered.
///
/// "Full" is made by raising the node's `min_free_disk_bytes` above the free space (the
/// guard reads the real free space with statvfs; filling a real file system is the soak's
/// job).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_with_a_full_disk_refuses_writes_and_the_cluster_keeps_going() {
    let cluster = start_cluster_with(3, SHARDS, |_| {}).await;
    let n3 = cluster.nodes[2].node.clone();
    let mut via1 = broker(&cluster.nodes[0].endpoint()).await;
    let mut via3 = broker(&cluster.nodes[2].endpoint()).await;
    let convs: Vec<String> = (0..6).map(|i| format!("disk-{i}")).collect();
    let mut expected: Vec<Vec<u64>> = vec![Vec::new(); convs.len()];
    let mut n = 0u64;
    let mut publish_round = async |client: &mut pb::broker_client::BrokerClient<tonic::transport::Channel>,
                                   expected: &mut Vec<Vec<u64>>| {
        for (i, conv) in convs.iter().enumerate() {
            n += 1;
            let r = client.publish(pb::PublishRequest { envelopes: vec![envelope(conv, n)], ephemeral: false }).await;
            let a = r.expect("publish").into_inner().appended[0].clone();
            assert_eq!(a.seq, expected[i].len() as u64 + 1, "{conv}: dense seqs");
            expected[i].push(n);
        }
    };
    publish_round(&mut via1, &mut expected).await;

    // Node 3's disk "fills".
    n3.disk.set_min_free_bytes(u64::MAX);
    let start = Instant::now();
    while !(n3.disk.is_full() && (0..SHARDS).all(|g| !n3.is_leader(g))) {
        assert!(start.elapsed() < Duration::from_secs(20), "node 3 did not become full and hand over its shards");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let err = via3
        .publish(pb::PublishRequest { envelopes: vec![envelope(&convs[0], 999_999)], ephemeral: false })
        .await
        .expect_err("a full node refuses writes");
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert!(err.message().contains("node 3") && err.message().contains("min_free_disk_bytes"), "{}", err.message());
    // The other two keep acknowledging; node 3 takes none of it.
    for _ in 0..5 {
        publish_round(&mut via1, &mut expected).await;
    }
    let applied_on_3: usize =
        convs.iter().map(|c| n3.store.read(habar_broker::shard::shard_of(c, SHARDS), c, 1, 1000).unwrap().len()).sum();
    assert!(applied_on_3 <= convs.len(), "node 3 took replication while full ({applied_on_3} envelopes)");

    // Space returns: node 3 catches up and takes writes again.
    n3.disk.set_min_free_bytes(1 << 20);
    let start = Instant::now();
    loop {
        let mut all = true;
        for (i, conv) in convs.iter().enumerate() {
            let got = read_all(&mut via3, conv, true).await;
            all &= got.len() == expected[i].len();
        }
        if all {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "node 3 did not catch up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    publish_round(&mut via3, &mut expected).await;
    // Every node holds every acknowledged envelope once, in order.
    for node in &cluster.nodes {
        let mut c = broker(&node.endpoint()).await;
        for (i, conv) in convs.iter().enumerate() {
            let start = Instant::now();
            loop {
                let got = read_all(&mut c, conv, true).await;
                let ids: Vec<Vec<u8>> = got.iter().map(|e| e.envelope.as_ref().unwrap().message_id.to_vec()).collect();
                let want: Vec<Vec<u8>> = expected[i].iter().map(|n| envelope(conv, *n).message_id.to_vec()).collect();
                if ids == want {
                    break;
                }
                assert!(start.elapsed() < Duration::from_secs(20), "node {}: {conv} is {ids:?}", node.id);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
