//! Disk corruption on one node (fault 6) with real processes: `habar serve` children, their
//! WAL damaged while they are down, SIGKILL and SIGSTOP for the other faults.

mod common;

use std::path::Path;
use std::path::PathBuf;
use std::time::Duration;
use std::time::Instant;

use common::*;
use habar_proto::v1 as pb;

const SHARDS: u32 = 2;

fn signal(node: &ChildNode, sig: i32) {
    let pid = node.child.as_ref().expect("node is running").id();
    // SAFETY: kill(2) on a child process we started and have not reaped.
    let rc = unsafe { libc::kill(pid as i32, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig})");
}

/// Flips one byte inside the first record of the node's oldest WAL segment (a record with
/// many after it: corruption, never a torn tail).
fn corrupt_wal(data_dir: &Path) -> PathBuf {
    let wal = data_dir.join("wal");
    let mut segs: Vec<PathBuf> = std::fs::read_dir(&wal)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "wal"))
        .collect();
    segs.sort();
    let seg = segs.first().expect("a WAL segment").clone();
    let mut bytes = std::fs::read(&seg).unwrap();
    assert!(bytes.len() > 4096, "the segment holds many records");
    bytes[24 + 8 + 2] ^= 0x20;
    std::fs::write(&seg, &bytes).unwrap();
    seg
}

async fn status(endpoint: &str) -> Option<pb::StatusResponse> {
    let mut c = pb::cluster_client::ClusterClient::connect(endpoint.to_string()).await.ok()?;
    let mut req = tonic::Request::new(pb::StatusRequest {});
    req.set_timeout(Duration::from_secs(2));
    c.status(req).await.ok().map(|r| r.into_inner())
}

/// Publishes `n` envelopes to conversations `corrupt-0..8` through `endpoint`; all must be
/// acknowledged. Returns them with their seqs.
async fn publish(endpoint: &str, from: u64, n: u64) -> Vec<(u64, pb::Envelope)> {
    let mut c = broker(endpoint).await;
    let mut out = Vec::new();
    for k in from..from + n {
        let e = envelope(&format!("corrupt-{}", k % 8), k);
        let mut req = tonic::Request::new(pb::PublishRequest { envelopes: vec![e.clone()], ephemeral: false });
        req.set_timeout(Duration::from_secs(20));
        let seq = c.publish(req).await.expect("publish acknowledged").into_inner().appended[0].seq;
        out.push((seq, e));
    }
    out
}

/// A whole conversation as one node's replica holds it, or `None` if the node failed to
/// answer (it may be starting).
async fn read_replica(
    c: &mut pb::broker_client::BrokerClient<tonic::transport::Channel>,
    conversation: &str,
) -> Option<Vec<pb::StoredEnvelope>> {
    let mut out: Vec<pb::StoredEnvelope> = Vec::new();
    loop {
        let from = out.last().map_or(1, |e| e.seq + 1);
        let req = pb::ReadRequest {
            conversation_id: conversation.into(),
            from_seq: from,
            limit: 1000,
            allow_stale: true,
            ..Default::default()
        };
        let page = c.read(req).await.ok()?.into_inner().envelopes;
        if page.is_empty() {
            return Some(out);
        }
        out.extend(page);
    }
}

/// Waits until every node's replica of every conversation holds exactly `acked`.
async fn all_replicas_hold(nodes: &[ChildNode], acked: &[(u64, pb::Envelope)]) {
    let start = Instant::now();
    'outer: loop {
        assert!(start.elapsed() < Duration::from_secs(60), "replicas did not converge on the acknowledged envelopes");
        for n in nodes {
            // A node just restarted may not listen yet: try again.
            let Ok(mut c) = pb::broker_client::BrokerClient::connect(n.endpoint()).await else {
                tokio::time::sleep(Duration::from_millis(300)).await;
                continue 'outer;
            };
            for conv in 0..8 {
                let conv = format!("corrupt-{conv}");
                let Some(got) = read_replica(&mut c, &conv).await else {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    continue 'outer;
                };
                let want: Vec<&(u64, pb::Envelope)> = acked.iter().filter(|(_, e)| e.conversation_id == conv).collect();
                let same = got.len() == want.len()
                    && got.iter().zip(&want).all(|(g, (seq, e))| {
                        g.seq == *seq && g.envelope.as_ref().is_some_and(|x| x.message_id == e.message_id)
                    });
                if !same {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    continue 'outer;
                }
            }
        }
        return;
    }
}

/// Property (fault 6): a node whose WAL is corrupt detects it at start, keeps the damaged
/// files aside, rejoins with an empty log and **does not vote** until it has caught up, so
/// it cannot help elect a leader that lacks what it had acknowledged; after catching up it
/// votes again, and no acknowledged envelope is lost anywhere.
///
/// Scenario (3 nodes): C paused while envelopes are acknowledged by {leader A, B}; B's WAL is
/// damaged and B restarts repairing; A is killed and C resumed. B and C alone must not elect
/// a leader (C may lack those envelopes and B no longer knows it had them). When A returns,
/// B catches up, repairs, and the cluster survives A's loss again with B's vote.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_with_a_corrupt_wal_rejoins_without_a_vote_until_caught_up() {
    let dir = tempfile::tempdir().unwrap();
    let start_all = Instant::now();
    let shards = SHARDS.to_string();
    let mut nodes = child_cluster(dir.path(), 3, &["--shards", &shards]);
    for n in nodes.iter_mut() {
        n.start();
    }
    let s = wait_ready(&nodes[0].endpoint(), Duration::from_secs(60)).await;
    // Every shard led by one node A: transfer the others' leaderships to it.
    let a_id = s.shards[0].leader;
    let a = (a_id - 1) as usize;
    let start = Instant::now();
    loop {
        let s = status(&nodes[a].endpoint()).await.expect("status");
        if s.shards.iter().all(|sh| sh.leader == a_id) {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "node {a_id} did not take every shard: {s:?}");
        // Pausing the other leaders makes A win their shards' elections.
        for sh in s.shards.iter().filter(|sh| sh.leader != a_id && sh.leader != 0) {
            let other = (sh.leader - 1) as usize;
            signal(&nodes[other], libc::SIGSTOP);
            tokio::time::sleep(Duration::from_millis(1500)).await;
            signal(&nodes[other], libc::SIGCONT);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!("corruption test: leaders on A ({:?})", start_all.elapsed());
    let b = (a + 1) % 3;
    let c = (a + 2) % 3;
    let mut acked = publish(&nodes[a].endpoint(), 0, 200).await;

    // C falls behind; these are acknowledged by A and B alone.
    signal(&nodes[c], libc::SIGSTOP);
    acked.extend(publish(&nodes[a].endpoint(), 200, 60).await);

    eprintln!("corruption test: C paused, 60 more acknowledged ({:?})", start_all.elapsed());
    // B's disk damages its WAL while it is down.
    nodes[b].kill();
    let damaged = corrupt_wal(&nodes[b].data_dir);
    nodes[b].start();
    let start = Instant::now();
    loop {
        if let Some(s) = status(&nodes[b].endpoint()).await {
            assert!(s.shards.iter().all(|sh| sh.repairing), "every shard of B repairs: {s:?}");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "B did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let b_dir = nodes[b].data_dir.clone();
    assert!(b_dir.join("REPAIRING").exists(), "the repair marker is written");
    let quarantined: Vec<PathBuf> =
        std::fs::read_dir(b_dir.join("quarantine")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(quarantined.len(), 1, "the damaged WAL is kept aside");
    assert!(quarantined[0].join(damaged.file_name().unwrap()).exists());

    eprintln!("corruption test: B restarted, repairing ({:?})", start_all.elapsed());
    // A dies; C returns. Only B (repairing) and C are up: no leader may be elected.
    nodes[a].kill();
    signal(&nodes[c], libc::SIGCONT);
    let until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < until {
        for i in [b, c] {
            if let Some(s) = status(&nodes[i].endpoint()).await {
                for sh in &s.shards {
                    assert!(
                        sh.leader != nodes[b].id && sh.leader != nodes[c].id,
                        "shard {} elected node {} while B was repairing and A, the only other holder, was down",
                        sh.shard,
                        sh.leader
                    );
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(b_dir.join("REPAIRING").exists(), "B cannot finish repairing without a majority of the others");

    eprintln!("corruption test: no leader without A ({:?})", start_all.elapsed());
    // A returns: a leader is elected, B catches up and repairs.
    nodes[a].start();
    wait_ready(&nodes[a].endpoint(), Duration::from_secs(60)).await;
    let start = Instant::now();
    while b_dir.join("REPAIRING").exists() {
        assert!(start.elapsed() < Duration::from_secs(60), "B did not finish repairing");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("corruption test: B repaired ({:?})", start_all.elapsed());
    let s = status(&nodes[b].endpoint()).await.expect("status of B");
    assert!(s.shards.iter().all(|sh| !sh.repairing), "{s:?}");
    all_replicas_hold(&nodes, &acked).await;

    eprintln!("corruption test: replicas converged ({:?})", start_all.elapsed());
    // Repaired, B votes again: without A, B and C elect leaders and keep every envelope.
    nodes[a].kill();
    wait_ready(&nodes[c].endpoint(), Duration::from_secs(60)).await;
    acked.extend(publish(&nodes[c].endpoint(), 260, 20).await);
    nodes[a].start();
    all_replicas_hold(&nodes, &acked).await;
}
