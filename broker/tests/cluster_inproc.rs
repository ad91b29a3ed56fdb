//! A 3-node cluster in this process, over real gRPC on loopback.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use habar_proto::v1 as pb;
use openraft::rt::watch::WatchReceiver;
use tokio_stream::StreamExt;

/// Property: concurrent publishers through different nodes yield, on every node, the same
/// per-conversation log with seqs dense from 1, and each acknowledged seq holds the
/// envelope it was acknowledged for.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_publishes_give_identical_dense_logs_on_every_node() {
    let cluster = start_cluster(3, 4).await;
    let endpoints: Vec<String> = cluster.nodes.iter().map(|n| n.endpoint()).collect();
    let mut tasks = Vec::new();
    for t in 0..20u64 {
        let ep = endpoints[t as usize % 3].clone();
        tasks.push(tokio::spawn(async move {
            let mut c = broker(&ep).await;
            let mut acked = Vec::new();
            for k in 0..10u64 {
                // Each request carries envelopes of several conversations (several shards).
                let envs: Vec<pb::Envelope> = (0..4)
                    .map(|j| envelope(&format!("conv-{}", (t * 10 + k * 4 + j) % 200), t * 1000 + k * 10 + j))
                    .collect();
                let r = c
                    .publish(pb::PublishRequest { envelopes: envs.clone(), ephemeral: false })
                    .await
                    .unwrap()
                    .into_inner();
                assert_eq!(r.appended.len(), envs.len(), "one result per envelope");
                for (e, a) in envs.into_iter().zip(r.appended) {
                    assert_eq!(a.conversation_id, e.conversation_id, "results in request order");
                    acked.push((e, a.seq));
                }
            }
            acked
        }));
    }
    let mut acked = Vec::new();
    for t in tasks {
        acked.extend(t.await.unwrap());
    }
    assert_eq!(acked.len(), 20 * 10 * 4);

    // Every node applies everything (linearizable read through node 1 first, then wait
    // for each replica to catch up and compare replicas byte for byte).
    let mut by_conv: BTreeMap<String, Vec<(pb::Envelope, u64)>> = BTreeMap::new();
    for (e, s) in acked {
        by_conv.entry(e.conversation_id.clone()).or_default().push((e, s));
    }
    let mut c1 = broker(&endpoints[0]).await;
    for (conv, mut want) in by_conv {
        want.sort_by_key(|(_, s)| *s);
        let log = read_all(&mut c1, &conv, false).await;
        assert_eq!(log.len(), want.len(), "{conv}: every acknowledged envelope, once");
        for (i, (stored, (e, seq))) in log.iter().zip(&want).enumerate() {
            assert_eq!(stored.seq, i as u64 + 1, "{conv}: dense seqs from 1");
            assert_eq!(stored.seq, *seq, "{conv}: at its acknowledged seq");
            assert_eq!(stored.envelope.as_ref().unwrap(), e, "{conv}: the acknowledged envelope");
        }
        for ep in &endpoints[1..] {
            let mut c = broker(ep).await;
            let mut replica = Vec::new();
            for _ in 0..100 {
                replica = read_all(&mut c, &conv, true).await;
                if replica.len() == log.len() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert_eq!(replica, log, "{conv}: replica {ep} identical to node 1");
        }
    }
}

/// Property: a subscription delivers every envelope published during the test in order,
/// once, across a leader change.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn subscribe_delivers_everything_in_order_across_a_leader_change() {
    let mut cluster = start_cluster(3, 2).await;
    let conv = "subscribed-conversation";
    let group = habar_broker::shard::shard_of(conv, 2);
    let leader = cluster.nodes[0].node.rafts[group as usize].metrics().borrow_watched().current_leader.unwrap();
    // Subscribe and publish through a node that is not the leader, then stop the leader.
    let other = cluster.nodes.iter().position(|n| n.id != leader).unwrap();
    let ep = cluster.nodes[other].endpoint();
    let mut sub = broker(&ep)
        .await
        .subscribe(pb::SubscribeRequest { conversation_id: conv.into(), from_seq: 1 })
        .await
        .unwrap()
        .into_inner();
    let mut pubc = broker(&ep).await;
    for i in 0..30 {
        pubc.publish(pb::PublishRequest { envelopes: vec![envelope(conv, i)], ephemeral: false }).await.unwrap();
    }
    let leader_pos = cluster.nodes.iter().position(|n| n.id == leader).unwrap();
    cluster.nodes[leader_pos].stop().await;
    for i in 30..60 {
        let r = pubc
            .publish(pb::PublishRequest { envelopes: vec![envelope(conv, i)], ephemeral: false })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.appended[0].seq, i + 1);
    }
    for i in 0..60u64 {
        let got = tokio::time::timeout(Duration::from_secs(20), sub.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(got.seq, i + 1, "in order, no gaps, no repeats");
        assert_eq!(got.envelope.unwrap(), envelope(conv, i));
    }
    let new_leader = cluster.nodes[other].node.rafts[group as usize].metrics().borrow_watched().current_leader;
    assert!(new_leader.is_some() && new_leader != Some(leader), "the shard changed leader");
}

/// Property: every bad-input case is `INVALID_ARGUMENT` naming the field, and appends
/// nothing, and the node keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_is_rejected_naming_the_field_and_appends_nothing() {
    let cluster = start_cluster(3, 2).await;
    let mut c = broker(&cluster.nodes[1].endpoint()).await;
    let good = envelope("bad-input", 1);
    let cases: Vec<(&str, Vec<pb::Envelope>)> = vec![
        ("envelopes", vec![]),
        ("conversation_id", vec![pb::Envelope { conversation_id: String::new(), ..good.clone() }]),
        ("conversation_id", vec![good.clone(), pb::Envelope { conversation_id: "x".repeat(257), ..good.clone() }]),
        ("message_id", vec![good.clone(), pb::Envelope { message_id: vec![1u8; 15].into(), ..good.clone() }]),
        ("message_id", vec![pb::Envelope { message_id: vec![1u8; 17].into(), ..good.clone() }]),
        (
            "ciphertext",
            vec![good.clone(), pb::Envelope { ciphertext: vec![0u8; (1 << 20) + 1].into(), ..good.clone() }],
        ),
        ("envelopes", (0..1001).map(|i| envelope("bad-input", i)).collect()),
    ];
    for (field, envs) in cases {
        let err = c.publish(pb::PublishRequest { envelopes: envs, ephemeral: false }).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{field}: {}", err.message());
        assert!(err.message().contains(field), "message names `{field}`: {}", err.message());
    }
    for (field, req) in [
        ("conversation_id", pb::ReadRequest { conversation_id: String::new(), ..Default::default() }),
        ("conversation_id", pb::ReadRequest { conversation_id: "y".repeat(300), ..Default::default() }),
    ] {
        let err = c.read(req).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains(field), "{}", err.message());
    }
    let r = c
        .read(pb::ReadRequest {
            conversation_id: "bad-input".into(),
            from_seq: 1,
            limit: 10,
            allow_stale: false,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.last_seq, 0, "nothing appended from rejected requests");
    // Still serving.
    let ok = c.publish(pb::PublishRequest { envelopes: vec![good], ephemeral: false }).await.unwrap().into_inner();
    assert_eq!(ok.appended[0].seq, 1);
}

/// Property: a shard's first snapshot comes on the entry count (`snapshot_logs_since_last`);
/// the next not while the log since holds less than `snapshot_growth_percent` of that
/// snapshot's bytes (however many entries), and then it comes. (Without the growth rule
/// each build copies the whole state again after a fixed number of entries.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_snapshots_again_only_once_its_log_grew_by_the_set_share() {
    let cluster = start_cluster_with(1, 1, |cfg| {
        cfg.snapshot_logs_since_last = 10;
        cfg.snapshot_growth_percent = 100;
    })
    .await;
    let node = cluster.nodes[0].node.clone();
    let mut c = broker(&cluster.nodes[0].endpoint()).await;
    let mut n = 0u64;
    // One request at a time (one entry each): four envelopes of `size` bytes.
    let mut publish = async |size: usize| {
        let envs: Vec<pb::Envelope> = (0..4)
            .map(|_| {
                n += 1;
                let mut e = envelope(&format!("conv-{}", n % 7), n);
                e.ciphertext = vec![n as u8; size].into();
                e
            })
            .collect();
        c.publish(pb::PublishRequest { envelopes: envs, ephemeral: false }).await.unwrap();
    };
    let snapshot = || node.store.current_snapshot_size(0);
    let wait_for = async |past: Option<u64>| {
        let start = std::time::Instant::now();
        loop {
            if let Some(s) = snapshot().filter(|(i, _)| past.is_none_or(|p| *i > p)) {
                return s;
            }
            assert!(start.elapsed() < Duration::from_secs(60), "no snapshot after {past:?} within 60 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    for _ in 0..12 {
        publish(1024).await;
    }
    let (first, bytes) = wait_for(None).await;
    // Entries well past the count, in small requests: a log far below the snapshot's bytes.
    for _ in 0..30 {
        publish(16).await;
    }
    assert!(node.wal.bytes_after(0, first) < bytes / 2, "the small requests outgrew half the snapshot");
    // Three of the node's checks (one a second): none starts a build.
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    assert_eq!(snapshot(), Some((first, bytes)), "no snapshot before the log holds 100% of the last one's bytes");
    while node.wal.bytes_after(0, first) < bytes {
        publish(1024).await;
    }
    let (second, _) = wait_for(Some(first)).await;
    assert!(second > first);
}
