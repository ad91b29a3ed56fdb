//! Three in-process nodes, several Raft groups each, over the real gRPC transport: leader
//! election, replication, a partition made with the fault injector, and a snapshot
//! streamed to a follower that fell behind.

mod raft_net_support;

use std::sync::atomic::Ordering;

use raft_net_support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_elect_replicate_and_reelect_on_the_majority_side_of_a_cut() {
    let cluster = start_cluster(3, 3, raft_config(), 11).await;
    let all = cluster.ids();

    // Every group elects a leader and replicates to every node.
    cluster.replicate_to_all(5).await;

    // Cut group 0's leader off from both others. The links are per node, so every group
    // led by that node loses its leader too.
    let old = cluster.wait_leader(0, &all).await;
    let majority: Vec<_> = all.iter().copied().filter(|&id| id != old).collect();
    cluster.faults.isolate(old, &majority);

    for g in 0..cluster.groups {
        let conv = format!("conv-{g}");
        let new = cluster.wait_leader_where(g, &majority, |id| id != old).await;
        assert_ne!(new, old);
        let a = cluster.append(g, &majority, envelope(&conv, 6, 100)).await;
        assert_eq!(a.seq, 6, "group {g}: the majority side commits");
        for &id in &majority {
            cluster.wait_applied(id, g, &conv, 6).await;
        }
        // Nothing crosses a cut link: the isolated node cannot have it.
        assert_eq!(cluster.node(old).store.last_seq(g, &conv).unwrap(), 5, "group {g}");
    }
    assert!(cluster.faults.stats().cut > 0);

    // Heal: the old leader catches up and the cluster agrees on one leader per group.
    cluster.faults.heal_all();
    for g in 0..cluster.groups {
        let conv = format!("conv-{g}");
        cluster.wait_applied(old, g, &conv, 6).await;
        cluster.wait_leader(g, &all).await;
        let a = cluster.append(g, &all, envelope(&conv, 7, 100)).await;
        assert_eq!(a.seq, 7);
        for &id in &all {
            cluster.wait_applied(id, g, &conv, 7).await;
        }
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_far_behind_gets_the_snapshot_streamed_over_the_wire() {
    let config = openraft::Config {
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(20),
        max_in_snapshot_log_to_keep: 0,
        purge_batch_size: 1,
        // Small chunks, so the ~1 MiB snapshot crosses in many of them.
        snapshot_max_chunk_size: 64 * 1024,
        ..raft_config()
    };
    let cluster = start_cluster(3, 1, config, 12).await;
    let all = cluster.ids();
    let g = 0;
    let conv = "far-behind";

    let leader = cluster.wait_leader(g, &all).await;
    let lagger = *all.iter().find(|&&id| id != leader).unwrap();
    let others: Vec<_> = all.iter().copied().filter(|&id| id != lagger).collect();
    cluster.append(g, &all, envelope(conv, 1, 100)).await;
    cluster.wait_applied(lagger, g, conv, 1).await;

    cluster.faults.isolate(lagger, &others);
    let n = 60;
    for i in 2..=n {
        cluster.append(g, &others, envelope(conv, i, 16 * 1024)).await;
    }

    // Wait until the leader purged logs the lagger does not have: only a snapshot can
    // bring it up to date now.
    let lag_last = metrics(cluster.node(lagger).raft(g)).last_log_index.unwrap_or(0);
    let start = std::time::Instant::now();
    loop {
        let leader = cluster.wait_leader(g, &others).await;
        let purged = metrics(cluster.node(leader).raft(g)).purged.map(|l| l.index).unwrap_or(0);
        if purged > lag_last {
            break;
        }
        assert!(start.elapsed() < PATIENCE, "leader never purged past {lag_last} (purged {purged})");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(cluster.node(lagger).snapshots_received.load(Ordering::SeqCst), 0);

    cluster.faults.heal_all();
    cluster.wait_applied(lagger, g, conv, n).await;
    assert!(cluster.node(lagger).snapshots_received.load(Ordering::SeqCst) >= 1, "caught up without a snapshot?");
    let leader = cluster.wait_leader(g, &all).await;
    let expected = cluster.node(leader).store.read(g, conv, 1, 1000).unwrap();
    assert_eq!(expected.len(), n as usize);
    assert_eq!(cluster.node(lagger).store.read(g, conv, 1, 1000).unwrap(), expected);

    // And it keeps replicating normally afterwards.
    let a = cluster.append(g, &all, envelope(conv, n + 1, 100)).await;
    assert_eq!(a.seq, n + 1);
    cluster.wait_applied(lagger, g, conv, n + 1).await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_converge_over_lossy_delayed_links() {
    let cluster = start_cluster(3, 2, raft_config(), 13).await;
    let all = cluster.ids();
    for g in 0..cluster.groups {
        cluster.wait_leader(g, &all).await;
    }
    // Every link loses 10% of RPCs (half of them after delivery: the sender never hears
    // the answer of an RPC that took effect) and is delayed by 1..4 ms.
    for &a in &all {
        for &b in &all {
            if a != b {
                cluster.faults.drop_ratio(a, b, 0.1);
                cluster.faults.delay(a, b, std::time::Duration::from_millis(1), std::time::Duration::from_millis(3));
            }
        }
    }
    let n = 15;
    for i in 1..=n {
        for g in 0..cluster.groups {
            cluster.append(g, &all, envelope("lossy", i, 200)).await;
        }
    }
    assert!(cluster.faults.stats().dropped > 0, "{:?}", cluster.faults.stats());
    cluster.faults.heal_all();
    for g in 0..cluster.groups {
        let leader = cluster.wait_leader(g, &all).await;
        // `append` retries an append whose outcome it did not learn, which may commit it
        // twice (idempotency is the state machine's business): compare ids as a set.
        let last = cluster.node(leader).store.last_seq(g, "lossy").unwrap();
        assert!(last >= n, "group {g}: {last}");
        for &id in &all {
            cluster.wait_applied(id, g, "lossy", last).await;
        }
        let reference = cluster.node(leader).store.read(g, "lossy", 1, 1000).unwrap();
        for &id in &all {
            assert_eq!(cluster.node(id).store.read(g, "lossy", 1, 1000).unwrap(), reference, "node {id}");
        }
        let ids: std::collections::BTreeSet<_> = reference.iter().map(|e| e.envelope.message_id).collect();
        let expected: std::collections::BTreeSet<_> = (1..=n).map(|i| envelope("lossy", i, 0).message_id).collect();
        assert_eq!(ids, expected, "group {g}");
    }
    cluster.shutdown().await;
}

/// Property: without a fault injector, leaders replicate over `AppendStream`, and a node
/// that does not know it (an older version, answering UNIMPLEMENTED) still gets every
/// entry by unary `AppendEntries`: every group commits and applies the same envelopes on
/// all three nodes. Then the leader's node stops: the others elect a leader and go on
/// over their streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_streams_and_falls_back_to_unary_for_a_node_without_streams() {
    let opts = ClusterOpts { fault_injector: false, legacy: vec![3] };
    let mut cluster = start_cluster_with(3, 2, raft_config(), 12, opts).await;
    let all = cluster.ids();
    cluster.replicate_to_all(20).await;
    let streams = |id: u64| cluster.node(id).received.streams.load(Ordering::SeqCst);
    assert!(streams(1) + streams(2) > 0, "no leader replicated over AppendStream");
    assert_eq!(streams(3), 0, "the legacy node took a stream");
    assert!(cluster.node(3).received.unary_appends.load(Ordering::SeqCst) > 0, "the legacy node got no unary appends");

    // Stop the node leading group 0 (unless it is the legacy one: then node 1); the two
    // left elect a leader in every group and keep committing.
    let leader = cluster.wait_leader(0, &all).await;
    let gone = if leader == 3 { 1 } else { leader };
    let idx = cluster.nodes.iter().position(|n| n.id == gone).unwrap();
    cluster.nodes[idx].shutdown().await;
    let left: Vec<u64> = all.iter().copied().filter(|&id| id != gone).collect();
    for g in 0..cluster.groups {
        let conv = format!("conv-{g}");
        let a = cluster.append(g, &left, envelope(&conv, 21, 100)).await;
        assert_eq!(a.seq, 21, "group {g}");
        for &id in &left {
            cluster.wait_applied(id, g, &conv, 21).await;
        }
    }
    cluster.shutdown().await;
}
