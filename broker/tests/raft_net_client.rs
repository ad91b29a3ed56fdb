//! The client side maps each way an RPC can fail to the openraft error kind that makes
//! openraft react correctly: back off (`Unreachable`), retry (`Network`), or count a
//! timeout (`Timeout`).

mod raft_net_support;

use std::time::Duration;

use habar_broker::raft_net::FaultInjector;
use habar_broker::raft_net::GroupNetwork;
use habar_broker::raft_net::NetworkFactory;
use habar_broker::raft_net::PeerPool;
use habar_raft_store::types::NodeAddr;
use habar_raft_store::types::TypeConfig;
use habar_raft_store::types::Vote;
use openraft::error::RPCError;
use openraft::network::v2::RaftNetworkV2;
use openraft::network::RPCOption;
use openraft::raft::VoteRequest;
use openraft::RaftNetworkFactory;
use raft_net_support::*;
use tokio::net::TcpListener;

/// A connection of group `group` from node 9 to `target` at `addr`.
async fn network(pool: PeerPool, group: u32, target: u64, addr: &str) -> GroupNetwork {
    NetworkFactory::new(pool, group).new_client(target, &NodeAddr::new(addr)).await
}

fn stale_vote() -> VoteRequest<TypeConfig> {
    VoteRequest::new(Vote::new(0, 9), None)
}

fn option() -> RPCOption {
    RPCOption::new(Duration::from_millis(400))
}

fn kind(e: &RPCError<TypeConfig>) -> &'static str {
    match e {
        RPCError::Timeout(_) => "timeout",
        RPCError::Unreachable(_) => "unreachable",
        RPCError::Network(_) => "network",
        RPCError::RemoteError(_) => "remote",
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nobody_listening_is_unreachable() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    drop(l);
    let mut net = network(PeerPool::new(9), 0, 1, &addr).await;
    let e = net.vote(stale_vote(), option()).await.unwrap_err();
    assert_eq!(kind(&e), "unreachable", "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_answers_is_a_timeout() {
    // Accepts connections and holds them open without a byte of HTTP/2.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    let mut net = network(PeerPool::new(9), 0, 1, &addr).await;
    let e = net.vote(stale_vote(), option()).await.unwrap_err();
    assert_eq!(kind(&e), "timeout", "{e}");
    holder.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_and_a_stopped_group_are_unreachable_and_a_good_call_succeeds() {
    let cluster = start_cluster(1, 1, raft_config(), 3).await;
    cluster.wait_leader(0, &[1]).await;
    let addr = cluster.node(1).addr.to_string();
    let pool = PeerPool::new(9);

    let resp = network(pool.clone(), 0, 1, &addr).await.vote(stale_vote(), option()).await.unwrap();
    assert!(!resp.vote_granted);

    // Group not on that node (NOT_FOUND).
    let e = network(pool.clone(), 4, 1, &addr).await.vote(stale_vote(), option()).await.unwrap_err();
    assert_eq!(kind(&e), "unreachable", "{e}");
    assert!(e.to_string().contains("group 4"), "{e}");

    // Another node answers at the address (FAILED_PRECONDITION).
    let e = network(pool.clone(), 0, 2, &addr).await.vote(stale_vote(), option()).await.unwrap_err();
    assert_eq!(kind(&e), "unreachable", "{e}");
    assert!(e.to_string().contains("not node 2"), "{e}");

    // A bad address never panics.
    let e = network(pool.clone(), 0, 1, "no such address").await.vote(stale_vote(), option()).await.unwrap_err();
    assert_eq!(kind(&e), "unreachable", "{e}");

    // The group stopped: its Fatal comes back as the source of an Unreachable.
    cluster.node(1).raft(0).shutdown().await.unwrap();
    let e = network(pool.clone(), 0, 1, &addr).await.vote(stale_vote(), option()).await.unwrap_err();
    assert_eq!(kind(&e), "unreachable", "{e}");
    assert!(e.to_string().to_lowercase().contains("stopped"), "{e}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_cut_is_unreachable_total_loss_is_a_timeout_and_healing_restores() {
    let cluster = start_cluster(1, 1, raft_config(), 4).await;
    cluster.wait_leader(0, &[1]).await;
    let addr = cluster.node(1).addr.to_string();
    let faults = FaultInjector::new(5);
    let pool = PeerPool::new(9).with_fault_injector(faults.clone());
    let mut net = network(pool, 0, 1, &addr).await;

    faults.cut(9, 1);
    let e = net.vote(stale_vote(), option()).await.unwrap_err();
    assert_eq!(kind(&e), "unreachable", "{e}");

    faults.heal(9, 1);
    faults.drop_ratio(9, 1, 1.0);
    for _ in 0..4 {
        let e = net.vote(stale_vote(), option()).await.unwrap_err();
        assert_eq!(kind(&e), "timeout", "{e}");
    }

    // The other direction was never touched, and clearing restores this one.
    assert_eq!(faults.link(1, 9), Default::default());
    faults.heal_all();
    net.vote(stale_vote(), option()).await.unwrap();
    let st = faults.stats();
    assert_eq!((st.cut, st.dropped, st.delivered), (1, 4, 1));
    cluster.shutdown().await;
}
