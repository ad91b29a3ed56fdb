//! Admission of publishes (`admission.rs`): a node with too many publish bytes in progress,
//! or queued for its shards' Raft logs, refuses more at once, with an error naming the
//! setting, and keeps serving.

mod common;

use std::time::Duration;
use std::time::Instant;

use common::*;
use habar_proto::v1 as pb;
use openraft::rt::watch::WatchReceiver;

const KIB: usize = 1024;

fn big(conversation: &str, n: u64, bytes: usize) -> pb::Envelope {
    pb::Envelope { ciphertext: vec![7u8; bytes].into(), ..envelope(conversation, n) }
}

fn publish(envelopes: Vec<pb::Envelope>, timeout: Duration) -> tonic::Request<pb::PublishRequest> {
    let mut r = tonic::Request::new(pb::PublishRequest { envelopes, ..Default::default() });
    r.set_timeout(timeout);
    r
}

/// Waits (bounded) until `f` holds.
async fn until(what: &str, f: impl Fn() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < Duration::from_secs(10), "{what} did not happen within 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A 3-node, one-shard cluster whose publish budgets hold 256 KiB, and its leader's index.
async fn budgeted_cluster() -> (InProcCluster, usize) {
    let cluster = start_cluster_with(3, 1, |c| {
        c.max_request_bytes = 256 * KIB;
        c.max_ciphertext_bytes = 200 * KIB;
        c.max_pending_publish_bytes = 256 * KIB;
    })
    .await;
    let leader_id = cluster.nodes[0].node.rafts[0].metrics().borrow_watched().current_leader.expect("a leader");
    let li = cluster.nodes.iter().position(|n| n.id == leader_id).expect("leader is a node");
    (cluster, li)
}

/// Property: on a shard's leader that lost its majority, a publish that cannot complete
/// holds both budgets; a further publish is refused at once with RESOURCE_EXHAUSTED naming
/// `max_pending_publish_bytes` (with a retry hint), and other calls are still served. When
/// the held publish's caller gives up, the handler's budget comes back but the queue's does
/// not: its envelopes are still in the leader's Raft entry, so the next publish is refused by
/// the queue budget until that entry is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_over_its_publish_budget_refuses_with_resource_exhausted_and_keeps_serving() {
    let (mut cluster, li) = budgeted_cluster().await;
    let endpoint = cluster.nodes[li].endpoint();
    let mut client = broker(&endpoint).await;
    // A publish that goes through first: the budgets do not get in the way of normal work.
    client.publish(publish(vec![big("c", 1, 150 * KIB)], Duration::from_secs(20))).await.expect("normal publish");
    let leader = cluster.nodes[li].node.clone();
    until("both budgets empty after the normal publish", || {
        leader.admission.in_progress() == 0 && leader.queue_admission.in_progress() == 0
    })
    .await;

    // No majority any more: the leader's entries cannot commit.
    for i in (0..3).filter(|&i| i != li) {
        cluster.nodes[i].stop().await;
    }
    let mut holder = broker(&endpoint).await;
    let held =
        tokio::spawn(
            async move { holder.publish(publish(vec![big("c", 2, 150 * KIB)], Duration::from_secs(3))).await },
        );
    until("the held publish to be in progress", || leader.admission.in_progress() >= 150 * KIB).await;
    let refused = client
        .publish(publish(vec![big("c", 3, 150 * KIB)], Duration::from_secs(3)))
        .await
        .expect_err("over the budget");
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused:?}");
    let msg = refused.message();
    assert!(msg.contains("max_pending_publish_bytes") && msg.contains(&(256 * KIB).to_string()), "{msg}");
    assert!(refused.metadata().get("retry-after-ms").is_some(), "a retry hint: {:?}", refused.metadata());

    // The node still answers other calls.
    cluster_client(&endpoint).await.status(pb::StatusRequest {}).await.expect("status while over budget");

    // The held publish ends without an answer (its deadline passed on the node: DEADLINE_EXCEEDED,
    // or CANCELLED when tonic's timeout cut the call).
    let code = held.await.expect("task").expect_err("no majority").code();
    assert!([tonic::Code::DeadlineExceeded, tonic::Code::Cancelled].contains(&code), "{code:?}");
    until("the handler's budget to come back", || leader.admission.in_progress() == 0).await;
    assert!(
        leader.queue_admission.in_progress() >= 150 * KIB,
        "the stuck entry's envelopes still count: {}",
        leader.queue_admission.in_progress()
    );
    let refused = client
        .publish(publish(vec![big("c", 4, 150 * KIB)], Duration::from_secs(3)))
        .await
        .expect_err("the queue budget is still taken");
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("queued"), "{}", refused.message());
}

/// Property: a publish that reaches a follower, which forwards it to a leader whose queue
/// budget is full, is refused at once with RESOURCE_EXHAUSTED (the leader's words, naming the
/// setting, with a retry hint), not retried by the follower until the caller's deadline
/// (which would end in DEADLINE_EXCEEDED).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_forwarded_to_an_overloaded_leader_is_refused_at_once() {
    let (cluster, li) = budgeted_cluster().await;
    let fi = (li + 1) % 3;
    let mut via_follower = broker(&cluster.nodes[fi].endpoint()).await;
    via_follower.publish(publish(vec![big("c", 1, 1024)], Duration::from_secs(20))).await.expect("forwarded publish");

    // The leader's queue budget taken whole, as by entries that wait for their majority.
    let held = cluster.nodes[li].node.queue_admission.admit(256 * KIB).expect("the budget is free");
    let deadline = Duration::from_secs(10);
    let refused = via_follower
        .publish(publish(vec![big("c", 2, 1024)], deadline))
        .await
        .expect_err("the leader's queue budget is full");
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("max_pending_publish_bytes"), "{}", refused.message());
    assert!(refused.metadata().get("retry-after-ms").is_some(), "a retry hint: {:?}", refused.metadata());

    drop(held);
    via_follower.publish(publish(vec![big("c", 3, 1024)], Duration::from_secs(20))).await.expect("served again");
}
