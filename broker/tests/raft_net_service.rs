//! The `RaftTransport` service refuses bad input with the right gRPC code and a message
//! naming what failed, over a real socket, and keeps serving afterwards.

mod raft_net_support;

use bytes::Bytes;
use habar_broker::raft_net::snapshot::SnapshotHeader;
use habar_broker::raft_net::GroupRegistry;
use habar_broker::raft_net::RaftTransportService;
use habar_broker::raft_net::FORMAT_POSTCARD;
use habar_proto::raft::raft_transport_client::RaftTransportClient;
use habar_proto::raft::RaftMessage;
use habar_proto::raft::SnapshotChunk;
use habar_raft_store::types::SnapshotMeta;
use habar_raft_store::types::TypeConfig;
use habar_raft_store::types::Vote;
use habar_raft_store::GroupStateMachine;
use openraft::error::Fatal;
use openraft::raft::VoteRequest;
use openraft::raft::VoteResponse;
use raft_net_support::*;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Channel;
use tonic::Code;

async fn client(addr: std::net::SocketAddr) -> RaftTransportClient<Channel> {
    RaftTransportClient::connect(format!("http://{addr}")).await.unwrap()
}

fn vote_body(term: u64, node: u64) -> Bytes {
    let req = VoteRequest::<TypeConfig>::new(Vote::new(term, node), None);
    Bytes::from(postcard::to_stdvec(&req).unwrap())
}

fn msg(group: u32, format: u32, body: Bytes, target: Option<u64>) -> RaftMessage {
    RaftMessage { group_id: group, format, body, target_node: target }
}

fn header(len: u64) -> Bytes {
    let h = SnapshotHeader { vote: Vote::new(1, 1), meta: SnapshotMeta::default(), len };
    Bytes::from(postcard::to_stdvec(&h).unwrap())
}

fn chunk(group: u32, header: Bytes, data: &[u8], last: bool, crc: Option<u32>) -> SnapshotChunk {
    SnapshotChunk {
        group_id: group,
        format: FORMAT_POSTCARD,
        header,
        data: Bytes::copy_from_slice(data),
        last,
        target_node: None,
        data_crc32c: crc,
    }
}

async fn send_stream(c: &mut RaftTransportClient<Channel>, chunks: Vec<SnapshotChunk>) -> tonic::Status {
    match c.install_snapshot(tokio_stream::iter(chunks)).await {
        Ok(r) => panic!("stream accepted: {:?}", r.into_inner()),
        Err(s) => s,
    }
}

fn assert_status(s: &tonic::Status, code: Code, words: &[&str]) {
    assert_eq!(s.code(), code, "{s:?}");
    for w in words {
        assert!(s.message().contains(w), "{w:?} not in {:?}", s.message());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_rpcs_refuse_bad_messages_with_the_right_code_and_still_serve() {
    let cluster = start_cluster(1, 1, raft_config(), 1).await;
    cluster.wait_leader(0, &[1]).await;
    let mut c = client(cluster.node(1).addr).await;

    let s = c.vote(msg(7, FORMAT_POSTCARD, vote_body(1, 2), None)).await.unwrap_err();
    assert_status(&s, Code::NotFound, &["group 7"]);

    let s = c.vote(msg(0, 2, vote_body(1, 2), None)).await.unwrap_err();
    assert_status(&s, Code::InvalidArgument, &["format 2"]);

    let s = c.append_entries(msg(0, FORMAT_POSTCARD, Bytes::from_static(&[0xff, 0xff, 0xff]), None)).await.unwrap_err();
    assert_status(&s, Code::InvalidArgument, &["append_entries", "decode"]);

    let s = c.pre_vote(msg(0, FORMAT_POSTCARD, Bytes::new(), None)).await.unwrap_err();
    assert_status(&s, Code::InvalidArgument, &["pre_vote"]);

    let s = c.vote(msg(0, FORMAT_POSTCARD, vote_body(1, 2), Some(99))).await.unwrap_err();
    assert_status(&s, Code::FailedPrecondition, &["this is node 1", "not node 99"]);

    // A well-formed vote for an old term is answered (not granted), after all of that.
    let reply = c.vote(msg(0, FORMAT_POSTCARD, vote_body(0, 2), Some(1))).await.unwrap().into_inner();
    let res: Result<VoteResponse<TypeConfig>, Fatal<TypeConfig>> = postcard::from_bytes(&reply.body).unwrap();
    assert!(!res.unwrap().vote_granted);
    assert_eq!(reply.group_id, 0);

    // The group still works.
    let a = cluster.append(0, &[1], envelope("c", 1, 10)).await;
    assert_eq!(a.seq, 1);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_snapshot_streams_are_refused_and_leave_no_file() {
    let cluster = start_cluster(1, 1, raft_config(), 2).await;
    cluster.wait_leader(0, &[1]).await;
    let mut c = client(cluster.node(1).addr).await;
    let data = vec![7u8; 1000];
    let crc = crc32c::crc32c(&data);

    let s = send_stream(&mut c, vec![]).await;
    assert_status(&s, Code::InvalidArgument, &["empty"]);

    let s = send_stream(&mut c, vec![chunk(0, Bytes::new(), &data, true, Some(crc))]).await;
    assert_status(&s, Code::InvalidArgument, &["no header"]);

    let s = send_stream(&mut c, vec![chunk(0, Bytes::from_static(b"\xff\xff"), &data, true, Some(crc))]).await;
    assert_status(&s, Code::InvalidArgument, &["snapshot header"]);

    let s = send_stream(&mut c, vec![chunk(5, header(1000), &data, true, Some(crc))]).await;
    assert_status(&s, Code::NotFound, &["group 5"]);

    let s = send_stream(&mut c, vec![chunk(0, header(1000), &data, true, Some(crc ^ 1))]).await;
    assert_status(&s, Code::DataLoss, &["CRC32C"]);

    let s = send_stream(&mut c, vec![chunk(0, header(1000), &data, true, None)]).await;
    assert_status(&s, Code::InvalidArgument, &["data_crc32c"]);

    let s = send_stream(&mut c, vec![chunk(0, header(999), &data, true, Some(crc))]).await;
    assert_status(&s, Code::InvalidArgument, &["more than", "999"]);

    let s = send_stream(
        &mut c,
        vec![chunk(0, header(2000), &data, false, None), chunk(0, Bytes::new(), &data[..10], true, Some(crc))],
    )
    .await;
    assert_status(&s, Code::InvalidArgument, &["ended at 1010", "2000"]);

    let s = send_stream(&mut c, vec![chunk(0, header(2000), &data, false, None)]).await;
    assert_status(&s, Code::InvalidArgument, &["without its last chunk"]);

    let s = send_stream(
        &mut c,
        vec![chunk(0, header(2000), &data, false, None), chunk(3, Bytes::new(), &data, true, None)],
    )
    .await;
    assert_status(&s, Code::InvalidArgument, &["group 3"]);

    let s = send_stream(
        &mut c,
        vec![chunk(0, header(2000), &data, false, None), chunk(0, header(2000), &data, true, None)],
    )
    .await;
    assert_status(&s, Code::InvalidArgument, &["second header"]);

    // Length and CRC right, but the bytes are not a snapshot file: the store refuses it.
    let s = send_stream(&mut c, vec![chunk(0, header(1000), &data, true, Some(crc))]).await;
    assert_status(&s, Code::DataLoss, &["not valid"]);

    // A node with a small snapshot limit refuses a large announced size up front.
    let node = cluster.node(1);
    let registry: GroupRegistry<GroupStateMachine> = node.registry.clone();
    let small = RaftTransportService::new(registry, node.store.clone()).with_max_snapshot_bytes(500).into_server();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let small_addr = listener.local_addr().unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder().add_service(small).serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let mut c2 = client(small_addr).await;
    let s = send_stream(&mut c2, vec![chunk(0, header(1000), &data, true, Some(crc))]).await;
    assert_status(&s, Code::ResourceExhausted, &["1000 bytes", "500"]);
    server.abort();

    // No partial file survives a refused stream, and nothing was counted as installed.
    let snap_dir = cluster.dir.path().join("n1").join("sm").join("snapshots");
    let leftovers: Vec<_> = std::fs::read_dir(&snap_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("recv"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    let a = cluster.append(0, &[1], envelope("c", 1, 10)).await;
    assert_eq!(a.seq, 1);
    cluster.shutdown().await;
}

/// Opens an `AppendStream` with the given metadata and messages; the call's status if it is
/// refused at once, else the status the stream ends with and how many answers came first.
async fn append_stream(
    c: &mut RaftTransportClient<Channel>,
    group: Option<&str>,
    target: Option<&str>,
    msgs: Vec<RaftMessage>,
) -> (usize, tonic::Status) {
    use habar_broker::raft_net::stream::GROUP_HEADER;
    use habar_broker::raft_net::stream::TARGET_HEADER;
    let mut req = tonic::Request::new(tokio_stream::iter(msgs));
    if let Some(g) = group {
        req.metadata_mut().insert(GROUP_HEADER, g.parse().unwrap());
    }
    if let Some(t) = target {
        req.metadata_mut().insert(TARGET_HEADER, t.parse().unwrap());
    }
    let mut answers = match c.append_stream(req).await {
        Ok(r) => r.into_inner(),
        Err(s) => return (0, s),
    };
    let mut n = 0;
    loop {
        match answers.message().await {
            Ok(Some(_)) => n += 1,
            Ok(None) => panic!("append stream ended without an error after {n} answers"),
            Err(s) => return (n, s),
        }
    }
}

/// Property: an `AppendStream` without its group or target, for an unknown group, for
/// another node, with a body that does not decode or a message of another group is refused
/// with the right code naming what is wrong, and the node goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn append_streams_refuse_bad_input_with_the_right_code_and_still_serve() {
    let cluster = start_cluster(1, 1, raft_config(), 1).await;
    cluster.wait_leader(0, &[1]).await;
    let mut c = client(cluster.node(1).addr).await;
    // A heartbeat-like request from an older term: valid, answered (with a higher vote).
    let old = openraft::raft::AppendEntriesRequest::<TypeConfig> {
        vote: Vote::new(0, 2),
        prev_log_id: None,
        leader_commit: None,
        entries: Vec::new(),
    };
    let good = || msg(0, FORMAT_POSTCARD, Bytes::from(postcard::to_stdvec(&old).unwrap()), Some(1));

    let (_, s) = append_stream(&mut c, None, Some("1"), vec![good()]).await;
    assert_status(&s, Code::InvalidArgument, &["habar-group"]);
    let (_, s) = append_stream(&mut c, Some("0"), None, vec![good()]).await;
    assert_status(&s, Code::InvalidArgument, &["habar-target-node"]);
    let (_, s) = append_stream(&mut c, Some("7"), Some("1"), vec![good()]).await;
    assert_status(&s, Code::NotFound, &["group 7"]);
    let (_, s) = append_stream(&mut c, Some("0"), Some("99"), vec![good()]).await;
    assert_status(&s, Code::FailedPrecondition, &["this is node 1", "not node 99"]);
    let garbage = msg(0, FORMAT_POSTCARD, Bytes::from_static(&[0xff, 0xff, 0xff]), Some(1));
    let (_, s) = append_stream(&mut c, Some("0"), Some("1"), vec![garbage]).await;
    assert_status(&s, Code::InvalidArgument, &["append_entries", "decode"]);
    let mut other = good();
    other.group_id = 3;
    let (answered, s) = append_stream(&mut c, Some("0"), Some("1"), vec![other]).await;
    assert_status(&s, Code::InvalidArgument, &["group 0", "group 3"]);
    assert_eq!(answered, 0);

    // The group still works.
    let a = cluster.append(0, &[1], envelope("c", 1, 10)).await;
    assert_eq!(a.seq, 1);
    cluster.shutdown().await;
}
