//! The `habar-client` library against a real 3-node cluster in this process.

mod common;

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::time::Duration;

use common::*;
use habar_client::pb;
use habar_client::Client;
use habar_client::ClientConfig;
use habar_client::ClientError;
use habar_client::Event;
use habar_client::Subscription;

fn config(cluster: &InProcCluster) -> ClientConfig {
    ClientConfig::new(cluster.nodes.iter().map(|n| n.endpoint()))
}

fn envelope_without_id(conversation: &str, n: u64) -> pb::Envelope {
    pb::Envelope { message_id: Default::default(), ..envelope(conversation, n) }
}

/// Property: concurrent `publish` calls from many tasks are each acknowledged with their
/// own result, seqs are dense per conversation, the log holds exactly what was
/// acknowledged, and the client sent fewer requests than envelopes (batching).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_publishes_are_batched_and_each_acknowledged() {
    let cluster = start_cluster(3, 4).await;
    let client = Client::connect(config(&cluster)).await.unwrap();
    let mut tasks = Vec::new();
    for t in 0..50u64 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for k in 0..10u64 {
                let e = envelope_without_id(&format!("load-{}", (t + k) % 10), t * 100 + k);
                let a = client.publish(e.clone()).await.unwrap();
                assert_eq!(a.conversation_id, e.conversation_id, "each caller gets its own result");
                assert!(!a.duplicate);
                acked.push((e, a.seq));
            }
            acked
        }));
    }
    let mut by_conv: BTreeMap<String, Vec<(pb::Envelope, u64)>> = BTreeMap::new();
    for t in tasks {
        for (e, seq) in t.await.unwrap() {
            by_conv.entry(e.conversation_id.clone()).or_default().push((e, seq));
        }
    }
    let total: usize = by_conv.values().map(Vec::len).sum();
    assert_eq!(total, 500);
    let mut reader = broker(&cluster.nodes[0].endpoint()).await;
    for (conv, mut acked) in by_conv {
        acked.sort_by_key(|(_, s)| *s);
        let seqs: Vec<u64> = acked.iter().map(|(_, s)| *s).collect();
        assert_eq!(seqs, (1..=acked.len() as u64).collect::<Vec<_>>(), "{conv}: dense seqs from 1, none twice");
        let log = read_all(&mut reader, &conv, false).await;
        assert_eq!(log.len(), acked.len(), "{conv}: each envelope stored once");
        for (stored, (e, seq)) in log.iter().zip(&acked) {
            assert_eq!(stored.seq, *seq);
            let got = stored.envelope.as_ref().unwrap();
            assert_eq!(
                (&got.ciphertext, got.message_id.len()),
                (&e.ciphertext, 16),
                "{conv}: the acknowledged envelope"
            );
        }
    }
    let stats = client.stats();
    assert!(
        stats.publish_requests < 500,
        "concurrent publishes share requests: {} requests for 500 envelopes",
        stats.publish_requests
    );
    assert_eq!(stats.published_envelopes, 500, "no retries were needed: {stats:?}");
}

/// Property: a publish sent while its shard leader (still the leader in the client's
/// table) is stopped is retried elsewhere and succeeds; publishing a message id again, after
/// the failover, answers the original seq with `duplicate = true` (also through
/// `publish_batch`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn publish_retries_across_a_stopped_leader_and_is_idempotent() {
    let mut cluster = start_cluster(3, 2).await;
    let mut cfg = config(&cluster);
    // A stale leader table on purpose: the first attempt goes to the stopped leader.
    cfg.status_refresh = Duration::from_secs(3600);
    cfg.request_timeout = Duration::from_secs(20);
    let client = Client::connect(cfg).await.unwrap();
    let conv = "retried-conversation";
    let first = envelope(conv, 1);
    let a1 = client.publish(first.clone()).await.unwrap();
    assert_eq!((a1.seq, a1.duplicate), (1, false));

    let leader = client.leader_of(conv).expect("the client knows the shard leader");
    let pos = cluster.nodes.iter().position(|n| n.endpoint() == leader).expect("the leader is a cluster node");
    cluster.nodes[pos].stop().await;

    let a2 = client.publish(envelope(conv, 2)).await.unwrap();
    assert_eq!((a2.seq, a2.duplicate), (2, false));
    assert!(client.stats().retries >= 1, "the first attempt went to the stopped leader: {:?}", client.stats());

    // The same message id again: the original seq, nothing appended.
    let again = client.publish(first.clone()).await.unwrap();
    assert_eq!((again.seq, again.duplicate), (1, true), "a republished message id is a duplicate");
    let batch = client.publish_batch(vec![envelope(conv, 2), envelope(conv, 3)]).await.unwrap();
    assert_eq!(batch.iter().map(|a| (a.seq, a.duplicate)).collect::<Vec<_>>(), vec![(2, true), (3, false)]);
    let page = client
        .read(pb::ReadRequest { conversation_id: conv.into(), from_seq: 1, limit: 100, ..Default::default() })
        .await
        .unwrap();
    assert_eq!(page.envelopes.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert_eq!(page.envelopes[0].envelope.as_ref().unwrap(), &first);
}

/// Property: a subscription resumes on another node after the node it is connected to
/// stops, and delivers every seq of every conversation once, in order, without gaps.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn subscription_resumes_after_its_node_stops_without_repeats_or_gaps() {
    let mut cluster = start_cluster(3, 2).await;
    let mut cfg = config(&cluster);
    cfg.request_timeout = Duration::from_secs(20);
    let client = Client::connect(cfg).await.unwrap();
    let convs = ["sub-a", "sub-b", "sub-c"];
    let mut sub = client.subscribe(convs.iter().map(|c| (c.to_string(), 1)).collect()).await.unwrap();

    let publish_round = |from: u64, to: u64| {
        let client = client.clone();
        async move {
            for n in from..to {
                for c in convs {
                    client.publish(envelope(c, n)).await.unwrap();
                }
            }
        }
    };
    let mut got: HashMap<String, Vec<u64>> = HashMap::new();
    publish_round(0, 20).await;
    collect(&mut sub, &convs, &mut got, 20).await;
    let connected = sub.connected_to().expect("connected");
    let pos = cluster.nodes.iter().position(|n| n.endpoint() == connected).expect("connected to a cluster node");
    // A stopping node must end its subscription streams (UNAVAILABLE, "node is
    // stopping"); a graceful shutdown that waits for them never finishes.
    tokio::time::timeout(Duration::from_secs(15), cluster.nodes[pos].stop())
        .await
        .expect("the node stopped within 15 s although a SubscribeMany stream was open on it");
    publish_round(20, 40).await;
    collect(&mut sub, &convs, &mut got, 40).await;

    for c in convs {
        assert_eq!(got[c], (1..=40).collect::<Vec<u64>>(), "{c}: every seq once, in order");
    }
    assert_ne!(sub.connected_to(), Some(connected), "moved to another node");
    assert!(client.stats().subscription_reconnects >= 1);
}

/// Reads `sub` until each of `convs` has `want` envelopes in `got` (checking each is the
/// envelope its seq was published with).
async fn collect(sub: &mut Subscription, convs: &[&str], got: &mut HashMap<String, Vec<u64>>, want: usize) {
    while convs.iter().any(|c| got.get(*c).map_or(0, Vec::len) < want) {
        let event = tokio::time::timeout(Duration::from_secs(30), sub.next())
            .await
            .expect("an event within 30 s")
            .expect("the subscription goes on")
            .expect("no error");
        if let Event::Envelope(e) = event {
            let env = e.envelope.unwrap();
            assert_eq!(env, envelope(&env.conversation_id, e.seq - 1), "the envelope of its seq");
            got.entry(env.conversation_id).or_default().push(e.seq);
        }
    }
}

/// Property: with real `habar serve` processes, SIGKILL of the node a subscription is
/// connected to: the subscription resumes on another node and every seq of every
/// conversation arrives once, in order; publishing goes on through the survivors.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn subscription_resumes_after_its_node_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = child_cluster(dir.path(), 3, &["--shards", "2"]);
    for n in nodes.iter_mut() {
        n.start();
    }
    for n in &nodes {
        wait_ready(&n.endpoint(), Duration::from_secs(60)).await;
    }
    let mut cfg = ClientConfig::new(nodes.iter().map(|n| n.endpoint()));
    cfg.request_timeout = Duration::from_secs(30);
    let client = Client::connect(cfg).await.unwrap();
    let convs = ["killed-a", "killed-b", "killed-c"];
    let mut sub = client.subscribe(convs.iter().map(|c| (c.to_string(), 1)).collect()).await.unwrap();
    let mut got: HashMap<String, Vec<u64>> = HashMap::new();
    for n in 0..20 {
        for c in convs {
            client.publish(envelope(c, n)).await.unwrap();
        }
    }
    collect(&mut sub, &convs, &mut got, 20).await;
    let connected = sub.connected_to().expect("connected");
    let victim = nodes.iter().position(|n| n.endpoint() == connected).expect("connected to a cluster node");
    nodes[victim].kill();
    for n in 20..40 {
        for c in convs {
            client.publish(envelope(c, n)).await.unwrap();
        }
    }
    collect(&mut sub, &convs, &mut got, 40).await;
    for c in convs {
        assert_eq!(got[c], (1..=40).collect::<Vec<u64>>(), "{c}: every seq once, in order");
    }
    assert_ne!(sub.connected_to(), Some(connected), "moved to another node");
    assert!(client.stats().subscription_reconnects >= 1);
}

/// Property: a subscription that hears nothing (not even a keepalive) for
/// `keepalive_timeout` reconnects, rotating over the nodes, and re-adds each conversation
/// from its next seq: across many reconnects every seq arrives once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn subscription_reconnects_when_silent_and_resumes_exactly() {
    let cluster = start_cluster(3, 2).await;
    let mut cfg = config(&cluster);
    // Servers send keepalives every 15 s: each quiet moment below forces a reconnect.
    cfg.keepalive_timeout = Duration::from_millis(300);
    let client = Client::connect(cfg).await.unwrap();
    let convs = ["quiet-a", "quiet-b"];
    let mut sub = client.subscribe(convs.iter().map(|c| (c.to_string(), 1)).collect()).await.unwrap();
    let mut got: HashMap<String, Vec<u64>> = HashMap::new();
    let mut nodes_seen = std::collections::BTreeSet::new();
    for round in 0..5u64 {
        for n in round * 10..round * 10 + 10 {
            for c in convs {
                client.publish(envelope(c, n)).await.unwrap();
            }
        }
        collect(&mut sub, &convs, &mut got, (round as usize + 1) * 10).await;
        nodes_seen.extend(sub.connected_to());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for c in convs {
        assert_eq!(got[c], (1..=50).collect::<Vec<u64>>(), "{c}: every seq once, in order");
    }
    assert!(client.stats().subscription_reconnects >= 4, "{:?}", client.stats());
    assert!(nodes_seen.len() >= 2, "reconnects rotate over the nodes: {nodes_seen:?}");
}

/// Property: the thin wrappers route and answer like the gRPC calls; a bad envelope fails
/// its whole batch with `InvalidArgument`; ephemeral signals reach a subscriber.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wrappers_errors_and_ephemeral_signals() {
    assert!(matches!(Client::connect(ClientConfig::new(["127.0.0.1:1"])).await, Err(ClientError::Connect(_))));
    assert!(matches!(
        Client::connect(ClientConfig::new(Vec::<String>::new())).await,
        Err(ClientError::InvalidArgument(_))
    ));

    let cluster = start_cluster(3, 2).await;
    // One endpoint given: the others are learned from Cluster.Status.
    let client = Client::connect(ClientConfig::new([cluster.nodes[1].addr.to_string()])).await.unwrap();
    let status = client.status().await.unwrap();
    assert_eq!(status.shard_count, 2);
    assert_eq!(status.nodes.len(), 3);

    let conv = "wrapped";
    let appended = client.publish_batch((0..5).map(|n| envelope_without_id(conv, n)).collect()).await.unwrap();
    assert_eq!(appended.iter().map(|a| a.seq).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5]);

    let page = client
        .read(pb::ReadRequest {
            conversation_id: conv.into(),
            limit: 3,
            direction: pb::Direction::Backward as i32,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page.envelopes.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![5, 4, 3], "newest first");

    let cursor = client
        .commit_cursor(pb::CommitCursorRequest { conversation_id: conv.into(), reader_id: "phone".into(), seq: 3 })
        .await
        .unwrap();
    assert_eq!(cursor.cursor.map(|c| (c.seq, c.unread)), Some((3, 2)));
    let cursors =
        client.get_cursors(pb::GetCursorsRequest { conversation_id: conv.into(), ..Default::default() }).await.unwrap();
    assert_eq!(cursors.cursors.iter().map(|c| c.reader_id.as_str()).collect::<Vec<_>>(), vec!["phone"]);

    let retention = client
        .set_retention(pb::SetRetentionRequest { conversation_id: conv.into(), max_age_ms: 0, max_count: 2 })
        .await
        .unwrap();
    assert_eq!(retention.removed_envelopes, 3);

    // A bad envelope: INVALID_ARGUMENT naming the field, not retried.
    let bad = pb::Envelope { message_id: vec![1u8; 5].into(), ..envelope(conv, 9) };
    match client.publish(bad.clone()).await {
        Err(ClientError::InvalidArgument(m)) => assert!(m.contains("message_id"), "{m}"),
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
    match client.publish_batch(vec![envelope(conv, 10), bad]).await {
        Err(ClientError::InvalidArgument(_)) => {}
        other => panic!("expected InvalidArgument, got {other:?}"),
    }

    // Ephemeral: to live subscribers only, seq 0.
    let mut sub = client.subscribe(vec![("live".into(), 1)]).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(10), sub.next()).await.unwrap().unwrap().unwrap() {
        Event::CaughtUp { conversation_id, next_seq } => {
            assert_eq!((conversation_id.as_str(), next_seq), ("live", 1))
        }
        other => panic!("unexpected {other:?}"),
    }
    let signal = envelope_without_id("live", 1);
    let answers = client.publish_ephemeral(vec![signal.clone()]).await.unwrap();
    assert_eq!(answers[0].seq, 0);
    match tokio::time::timeout(Duration::from_secs(10), sub.next()).await.unwrap().unwrap().unwrap() {
        Event::Ephemeral(e) => {
            assert_eq!(e.seq, 0);
            assert_eq!(e.envelope.map(|e| e.ciphertext), Some(signal.ciphertext));
        }
        other => panic!("unexpected {other:?}"),
    }
    sub.drop_conversation("live").await.unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), sub.next()).await.unwrap().unwrap().unwrap() {
            Event::Dropped(c) => {
                assert_eq!(c, "live");
                break;
            }
            Event::Ephemeral(_) | Event::CaughtUp { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }

    let deleted = client
        .delete_conversation(pb::DeleteConversationRequest { conversation_id: conv.into(), reset_seq: false })
        .await
        .unwrap();
    assert_eq!(deleted.next_seq, 6);
    assert!(matches!(
        client
            .delete_conversation(pb::DeleteConversationRequest {
                conversation_id: "never-written".into(),
                reset_seq: false
            })
            .await,
        Err(ClientError::NotFound(_))
    ));
}
