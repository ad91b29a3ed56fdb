//! Admission of publishes (`admission.rs`): a node with too many publish bytes in progress
//! refuses more at once, with an error naming the setting, and keeps serving.

mod common;

use std::time::Duration;

use common::*;
use habar_proto::v1 as pb;

const KIB: usize = 1024;

fn big(conversation: &str, n: u64, bytes: usize) -> pb::Envelope {
    pb::Envelope { ciphertext: vec![7u8; bytes].into(), ..envelope(conversation, n) }
}

fn publish(envelopes: Vec<pb::Envelope>, timeout: Duration) -> tonic::Request<pb::PublishRequest> {
    let mut r = tonic::Request::new(pb::PublishRequest { envelopes, ..Default::default() });
    r.set_timeout(timeout);
    r
}

/// Property: while publishes that cannot complete (no majority) hold the node's budget, a
/// further publish is refused at once with RESOURCE_EXHAUSTED naming
/// `max_pending_publish_bytes`; other calls are still served; once the held publishes end,
/// the budget is back and publishes are admitted again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_over_its_publish_budget_refuses_with_resource_exhausted_and_keeps_serving() {
    let mut cluster = start_cluster_with(3, 1, |c| {
        c.max_request_bytes = 256 * KIB;
        c.max_ciphertext_bytes = 200 * KIB;
        c.max_pending_publish_bytes = 256 * KIB;
    })
    .await;
    // A publish that goes through first: the budget does not get in the way of normal work.
    let endpoint = cluster.nodes[0].endpoint();
    let mut client = broker(&endpoint).await;
    client.publish(publish(vec![big("c", 1, 150 * KIB)], Duration::from_secs(20))).await.expect("normal publish");

    // No majority any more: node 1's publishes wait until their deadline.
    cluster.nodes[1].stop().await;
    cluster.nodes[2].stop().await;
    let mut holder = broker(&endpoint).await;
    let held =
        tokio::spawn(
            async move { holder.publish(publish(vec![big("c", 2, 150 * KIB)], Duration::from_secs(4))).await },
        );
    // Until the held publish is in progress, a second one may still be admitted (and wait
    // itself); retry until the refusal shows, which it must well before the deadline.
    let refused = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!held.is_finished(), "the held publish ended before any refusal");
        match client.publish(publish(vec![big("c", 3, 150 * KIB)], Duration::from_millis(300))).await {
            Err(s) if s.code() == tonic::Code::ResourceExhausted => break s,
            _ => continue,
        }
    };
    let msg = refused.message();
    assert!(msg.contains("max_pending_publish_bytes") && msg.contains(&(256 * KIB).to_string()), "{msg}");

    // The node still answers other calls.
    cluster_client(&endpoint).await.status(pb::StatusRequest {}).await.expect("status while over budget");

    // The held publish ends without an answer (no majority): its deadline passed on the node
    // (DEADLINE_EXCEEDED, or CANCELLED when tonic's timeout cut the call) or no leader.
    let held = held.await.expect("task");
    let code = held.expect_err("no majority").code();
    let ended = [tonic::Code::DeadlineExceeded, tonic::Code::Cancelled, tonic::Code::Unavailable];
    assert!(ended.contains(&code), "{code:?}");
    // Its share comes back when the node finishes it (the client may give up a moment
    // before the node does): then the next publish is admitted (and waits, for lack of a
    // majority) instead of being refused.
    let start = std::time::Instant::now();
    loop {
        let again = client.publish(publish(vec![big("c", 4, 150 * KIB)], Duration::from_millis(500))).await;
        let code = again.expect_err("still no majority").code();
        if code != tonic::Code::ResourceExhausted {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "the budget never came back after the held publish ended");
    }
}
