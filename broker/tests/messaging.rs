//! What a messenger needs from its log, on real 3-node clusters over gRPC: idempotent
//! publish across failover, chat-style backward paging, cursors (10,000 on a channel),
//! disappearing messages, retention, erasure, multi-conversation subscriptions with
//! bounded buffers, and ephemeral signals that never touch disk.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;
use std::time::Instant;

use common::*;
use habar_proto::v1 as pb;
use habar_proto::v1::admin_client::AdminClient;
use prost::Message;
use tokio_stream::StreamExt;

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

async fn publish(
    c: &mut pb::broker_client::BrokerClient<tonic::transport::Channel>,
    envs: Vec<pb::Envelope>,
) -> Vec<pb::Appended> {
    c.publish(pb::PublishRequest { envelopes: envs, ephemeral: false }).await.unwrap().into_inner().appended
}

/// Every file under `dir` whose bytes contain `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = std::fs::read(&p) {
                if bytes.windows(needle.len()).any(|w| w == needle) {
                    out.push(p.display().to_string());
                }
            }
        }
    }
    out.sort();
    out
}

/// Which node leads the shard of `conv`, as node `endpoint` sees it.
async fn leader_of(endpoint: &str, conv: &str) -> u64 {
    let s = wait_ready(endpoint, Duration::from_secs(60)).await;
    let shard = habar_broker::shard::shard_of(conv, s.shard_count);
    s.shards.iter().find(|x| x.shard == shard).map(|x| x.leader).unwrap()
}

/// Property (idempotent publish): a publish retried after the shard's leader was killed
/// answers the original seq with `duplicate = true` and appends nothing, through the new
/// leader and after the old one restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retried_publish_after_the_leader_is_killed_gets_the_same_seq_and_no_second_copy() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = child_cluster(dir.path(), 3, &["--shards", "2"]);
    for n in nodes.iter_mut() {
        n.start();
    }
    let conv = "idem-chat";
    let leader = leader_of(&nodes[0].endpoint(), conv).await;
    let via = nodes.iter().find(|n| n.id != leader).unwrap().endpoint();
    let mut c = broker(&via).await;
    let mut first = Vec::new();
    for i in 0..5 {
        first.push(publish(&mut c, vec![envelope(conv, i)]).await[0].clone());
    }
    assert!(first.iter().all(|a| !a.duplicate));

    // Kill the leader; the phone retries its last send (same message id) via a survivor.
    nodes.iter_mut().find(|n| n.id == leader).unwrap().kill();
    let retry = publish(&mut c, vec![envelope(conv, 4)]).await;
    assert!(retry[0].duplicate, "the retry is recognised");
    assert_eq!(retry[0].seq, first[4].seq, "the retry answers the original seq");
    assert_eq!(retry[0].committed_at_ms, first[4].committed_at_ms);
    let fresh = publish(&mut c, vec![envelope(conv, 5)]).await;
    assert_eq!(fresh[0].seq, 6, "a new message gets the next seq");

    // The old leader comes back: a retry through it is still a duplicate.
    let old = nodes.iter_mut().find(|n| n.id == leader).unwrap();
    old.start();
    wait_ready(&old.endpoint(), Duration::from_secs(60)).await;
    let mut c2 = broker(&old.endpoint()).await;
    let again = publish(&mut c2, vec![envelope(conv, 0), envelope(conv, 5)]).await;
    assert!(again.iter().all(|a| a.duplicate));
    assert_eq!((again[0].seq, again[1].seq), (1, 6));
    let log = read_all(&mut c2, conv, false).await;
    assert_eq!(log.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5, 6], "one copy of each");
}

/// Property (reading like a chat): backward pages of 50 from the newest return the
/// conversation newest first, with `end` exactly on the last page.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backward_pages_open_a_chat_at_its_newest_and_scroll_up_to_the_start() {
    let cluster = start_cluster(3, 2).await;
    let mut c = broker(&cluster.nodes[1].endpoint()).await;
    let conv = "scroll";
    publish(&mut c, (0..120).map(|i| envelope(conv, i)).collect()).await;
    let mut seen = Vec::new();
    let mut before = 0;
    let mut pages = 0;
    loop {
        let r = c
            .read(pb::ReadRequest {
                conversation_id: conv.into(),
                direction: pb::Direction::Backward as i32,
                before_seq: before,
                limit: 50,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert_eq!(r.last_seq, 120);
        assert_eq!(r.first_seq, 1);
        let seqs: Vec<u64> = r.envelopes.iter().map(|e| e.seq).collect();
        assert!(seqs.windows(2).all(|w| w[0] == w[1] + 1), "newest first, no gaps: {seqs:?}");
        seen.extend(seqs.iter().copied());
        if r.end {
            break;
        }
        before = *seqs.last().unwrap();
    }
    assert_eq!(pages, 3, "120 envelopes in pages of 50");
    assert_eq!(seen, (1..=120).rev().collect::<Vec<_>>());
}

/// Property (cursors, channels): 10,000 readers' cursors on one channel are committed and
/// read back exactly, paged; a cursor never moves backwards; unread counts follow the
/// channel's last seq. Timings are printed (never asserted: shared machines are noisy).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_cursors_on_one_channel_commit_and_read_back() {
    let cluster = start_cluster(3, 2).await;
    let endpoints: Vec<String> = cluster.nodes.iter().map(|n| n.endpoint()).collect();
    let channel = "ministry-broadcast";
    let mut c = broker(&endpoints[0]).await;
    for k in 0..5 {
        publish(&mut c, (0..20).map(|i| envelope(channel, k * 20 + i)).collect()).await;
    }
    const READERS: u64 = 10_000;
    let want = |r: u64| (r * 7919) % 100 + 1;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..64u64 {
        let ep = endpoints[t as usize % 3].clone();
        tasks.push(tokio::spawn(async move {
            let mut c = broker(&ep).await;
            let mut r = t;
            while r < READERS {
                let resp = c
                    .commit_cursor(pb::CommitCursorRequest {
                        conversation_id: channel.into(),
                        reader_id: format!("device-{r:05}"),
                        seq: want(r),
                    })
                    .await
                    .unwrap()
                    .into_inner();
                assert_eq!(resp.cursor.unwrap().seq, want(r));
                r += 64;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let commit_time = start.elapsed();

    // A lower seq is ignored and the stored cursor returned.
    let back = c
        .commit_cursor(pb::CommitCursorRequest {
            conversation_id: channel.into(),
            reader_id: "device-00042".into(),
            seq: 1,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(back.cursor.as_ref().unwrap().seq, want(42), "cursors never move backwards");
    assert_eq!(back.cursor.unwrap().unread, 100 - want(42));

    let t = Instant::now();
    let one = c
        .get_cursors(pb::GetCursorsRequest {
            conversation_id: channel.into(),
            reader_id: "device-09999".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let one_time = t.elapsed();
    assert_eq!(one.cursors.len(), 1);
    assert_eq!(one.cursors[0].seq, want(9999));
    assert_eq!(one.cursors[0].unread, 100 - want(9999));

    let t = Instant::now();
    let mut all = Vec::new();
    let mut after = String::new();
    loop {
        let page = c
            .get_cursors(pb::GetCursorsRequest {
                conversation_id: channel.into(),
                after_reader_id: after.clone(),
                limit: 1000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(page.last_seq, 100);
        after = page.cursors.last().map(|c| c.reader_id.clone()).unwrap_or_default();
        all.extend(page.cursors);
        if page.end {
            break;
        }
    }
    let all_time = t.elapsed();
    assert_eq!(all.len() as u64, READERS, "every reader's cursor, once");
    for (r, cur) in all.iter().enumerate() {
        assert_eq!(cur.reader_id, format!("device-{r:05}"), "in reader order");
        assert_eq!(cur.seq, want(r as u64));
        assert_eq!(cur.unread, 100 - cur.seq);
    }
    println!(
        "10,000 cursors: committed in {commit_time:?} ({:.0}/s, 64 concurrent callers), one GetCursors {one_time:?}, \
         all 10,000 in pages of 1000 {all_time:?}",
        READERS as f64 / commit_time.as_secs_f64()
    );
}

/// Property (disappearing messages): `Read` never returns an envelope past its
/// `expires_at_ms` and reports it as removed; the leader's housekeeping deletes the
/// expired envelopes on every replica, leaving identical state machines.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expiry_removes_the_same_envelopes_on_every_replica_and_reads_never_return_one() {
    let cluster = start_cluster_with(3, 2, |c| c.maintenance_interval_ms = 100).await;
    let mut c = broker(&cluster.nodes[0].endpoint()).await;
    let conv = "disappearing";
    let expires = now_ms() + 1500;
    let envs: Vec<pb::Envelope> = (0..40)
        .map(|i| pb::Envelope { expires_at_ms: if i % 2 == 0 { expires } else { 0 }, ..envelope(conv, i) })
        .collect();
    publish(&mut c, envs).await;

    // Until and after the expiry time, no read returns an expired envelope.
    let deadline = Instant::now() + Duration::from_secs(4);
    let mut saw_all = false;
    while Instant::now() < deadline {
        let asked_at = now_ms();
        let r = c
            .read(pb::ReadRequest { conversation_id: conv.into(), limit: 100, ..Default::default() })
            .await
            .unwrap()
            .into_inner();
        for e in &r.envelopes {
            let x = e.envelope.as_ref().unwrap().expires_at_ms;
            assert!(x == 0 || x > asked_at, "seq {} expired at {x} was returned at {asked_at}", e.seq);
        }
        let covered: u64 = r.envelopes.len() as u64 + r.removed.iter().map(|g| g.to - g.from + 1).sum::<u64>();
        assert_eq!(covered, 40, "envelopes and removed ranges cover the log");
        saw_all |= r.envelopes.len() == 40;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(saw_all, "before expiry every envelope was readable");

    // Housekeeping deleted them everywhere: identical replicas, only the 20 that never expire.
    let shard = habar_broker::shard::shard_of(conv, 2);
    let start = Instant::now();
    loop {
        let held: Vec<usize> =
            cluster.nodes.iter().map(|n| n.node.store.read(shard, conv, 1, 1000).unwrap().len()).collect();
        if held.iter().all(|h| *h == 20) {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "expired envelopes still held: {held:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for n in &cluster.nodes {
        let left = n.node.store.read(shard, conv, 1, 1000).unwrap();
        assert!(left.iter().all(|e| e.envelope.expires_at_ms == 0 && e.seq % 2 == 0));
    }
    let dumps: Vec<_> = cluster.nodes.iter().map(|n| n.node.store.dump_group(shard).unwrap()).collect();
    assert_eq!(dumps[0], dumps[1], "replicas 1 and 2 identical");
    assert_eq!(dumps[0], dumps[2], "replicas 1 and 3 identical");
    let r = c.read(pb::ReadRequest { conversation_id: conv.into(), ..Default::default() }).await.unwrap().into_inner();
    assert_eq!(r.envelopes.len(), 20);
    assert_eq!(r.first_seq, 2);
    assert!(r.removed.iter().all(|g| g.from == g.to && g.from % 2 == 1), "each expired seq reported: {:?}", r.removed);
}

/// Property (retention and erasure): a retention limit removes the oldest envelopes on
/// every replica, in bounded steps (4 envelopes each here) whose counts add up;
/// `DeleteConversation` removes envelopes, cursors and dedupe entries on
/// every replica, in bounded steps (4 keys each here, so 14 steps for 25 envelopes, their
/// 25 dedupe entries and 3 cursors) whose counts add up; seqs continue unless a reset is
/// asked for; an unknown conversation is NOT_FOUND; after the erasure no WAL segment or
/// snapshot file holds the envelopes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retention_and_erasure_apply_on_every_replica_and_leave_no_bytes_in_wal_or_snapshots() {
    let cluster = start_cluster_with(3, 2, |c| c.maintenance_max_removals = 4).await;
    let ep = cluster.nodes[2].endpoint();
    let mut c = broker(&ep).await;
    let mut admin = AdminClient::connect(ep.clone()).await.unwrap();

    // Retention: keep the newest 10 of 30.
    let kept = "kept-short";
    publish(&mut c, (0..30).map(|i| envelope(kept, i)).collect()).await;
    let r = admin
        .set_retention(pb::SetRetentionRequest { conversation_id: kept.into(), max_age_ms: 0, max_count: 10 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.removed_envelopes, 20);
    publish(&mut c, vec![envelope(kept, 30)]).await;
    let page =
        c.read(pb::ReadRequest { conversation_id: kept.into(), ..Default::default() }).await.unwrap().into_inner();
    assert_eq!(page.envelopes.iter().map(|e| e.seq).collect::<Vec<_>>(), (22..=31).collect::<Vec<_>>());
    assert_eq!(page.first_seq, 22);
    assert_eq!(page.removed, vec![pb::SeqRange { from: 1, to: 21 }]);

    // Erasure of a conversation with a recognisable ciphertext.
    let conv = "erase-me";
    let marker = b"ERASURE-MARKER-7f3a9c";
    let envs: Vec<pb::Envelope> = (0..25)
        .map(|i| pb::Envelope {
            ciphertext: [&marker[..], &i.to_string().into_bytes()].concat().into(),
            ..envelope(conv, i)
        })
        .collect();
    publish(&mut c, envs).await;
    for r in 0..3 {
        c.commit_cursor(pb::CommitCursorRequest { conversation_id: conv.into(), reader_id: format!("r{r}"), seq: 10 })
            .await
            .unwrap();
    }
    let del = c
        .delete_conversation(pb::DeleteConversationRequest { conversation_id: conv.into(), reset_seq: false })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((del.removed_envelopes, del.removed_cursors, del.next_seq), (25, 3, 26));

    let shard = habar_broker::shard::shard_of(conv, 2);
    let start = Instant::now();
    loop {
        let held: Vec<(usize, usize)> = cluster
            .nodes
            .iter()
            .map(|n| {
                let envs = n.node.store.read(shard, conv, 1, 1000).unwrap().len();
                let curs = n.node.store.cursors(shard, conv, None, "", 100).unwrap().0.len();
                (envs, curs)
            })
            .collect();
        if held.iter().all(|h| *h == (0, 0)) {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "erased data still held: {held:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Dedupe entries went too: the same message id is a new envelope now, seqs continue.
    let again = publish(&mut c, vec![envelope(conv, 0)]).await;
    assert_eq!((again[0].seq, again[0].duplicate), (26, false));
    let del = c
        .delete_conversation(pb::DeleteConversationRequest { conversation_id: conv.into(), reset_seq: true })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(del.next_seq, 1);
    let reset = publish(&mut c, vec![envelope(conv, 1)]).await;
    assert_eq!(reset[0].seq, 1, "after a reset the conversation starts again at 1");

    let missing = c
        .delete_conversation(pb::DeleteConversationRequest {
            conversation_id: "never-existed".into(),
            reset_seq: false,
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    assert!(missing.message().contains("never-existed"), "{}", missing.message());

    // Compaction after the erasure: the WAL, snapshot and envelope segment files of every
    // node lose the bytes.
    let start = Instant::now();
    loop {
        let mut left = Vec::new();
        for n in &cluster.nodes {
            left.extend(files_containing(&n.node.cfg.data_dir.join("wal"), marker));
            left.extend(files_containing(&n.node.cfg.data_dir.join("sm").join("snapshots"), marker));
            left.extend(files_containing(&n.node.cfg.data_dir.join("sm").join("env"), marker));
        }
        if left.is_empty() {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "erased bytes still in {left:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let sled_left: Vec<String> = cluster
        .nodes
        .iter()
        .flat_map(|n| files_containing(&n.node.cfg.data_dir.join("sm").join("db"), marker))
        .collect();
    println!("after erasure and compaction, sled files still holding erased bytes: {sled_left:?}");
}

type Events = tonic::Streaming<pb::SubscribeEvent>;

async fn open_many(ep: &str, first: pb::SubscribeControl) -> (tokio::sync::mpsc::Sender<pb::SubscribeControl>, Events) {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tx.send(first).await.unwrap();
    let mut c = broker(ep).await;
    let events = c.subscribe_many(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    (tx, events)
}

fn adds(convs: impl IntoIterator<Item = (String, u64)>) -> pb::SubscribeControl {
    pb::SubscribeControl {
        add: convs.into_iter().map(|(c, f)| pb::ConversationFrom { conversation_id: c, from_seq: f }).collect(),
        drop: vec![],
    }
}

/// Property (many conversations on one stream): a SubscribeMany of 1,000 conversations,
/// with conversations added and dropped while it is open and envelopes published
/// throughout, delivers each conversation's envelopes once, in order, without gaps,
/// and says when each caught up with its backlog.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_stream_of_1000_conversations_delivers_every_envelope_once_in_order_while_adding_and_dropping() {
    let cluster = start_cluster(3, 4).await;
    let eps: Vec<String> = cluster.nodes.iter().map(|n| n.endpoint()).collect();
    let conv = |i: usize| format!("group-{i:04}");
    const N: usize = 1000;
    const PER: u64 = 4;
    // A backlog of 2 envelopes in every conversation before the stream opens.
    let mut c = broker(&eps[0]).await;
    for chunk in (0..N).collect::<Vec<_>>().chunks(250) {
        publish(&mut c, chunk.iter().flat_map(|i| (0..2).map(move |k| envelope(&conv(*i), k))).collect()).await;
    }
    // Open with the first 600; add the other 400 later; drop 100 and add them back.
    let (ctl, mut events) = open_many(&eps[1], adds((0..600).map(|i| (conv(i), 1)))).await;
    let publisher = {
        let ep = eps[2].clone();
        tokio::spawn(async move {
            let mut c = broker(&ep).await;
            for k in 2..PER {
                for chunk in (0..N).collect::<Vec<_>>().chunks(200) {
                    publish(&mut c, chunk.iter().map(|i| envelope(&conv(*i), k)).collect()).await;
                }
            }
        })
    };
    let mut got: HashMap<String, Vec<u64>> = HashMap::new();
    let mut caught_up: HashMap<String, u64> = HashMap::new();
    let mut dropped = 0;
    let mut phase = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while got.values().map(|v| v.len() as u64).sum::<u64>() < N as u64 * PER {
        assert!(Instant::now() < deadline, "stream stalled at {} envelopes", got.values().map(Vec::len).sum::<usize>());
        let ev = tokio::time::timeout(Duration::from_secs(20), events.next()).await.unwrap().unwrap().unwrap();
        match ev.event.unwrap() {
            pb::subscribe_event::Event::Envelope(e) => {
                let id = e.envelope.as_ref().unwrap().conversation_id.clone();
                got.entry(id).or_default().push(e.seq);
            }
            pb::subscribe_event::Event::CaughtUp(c) => {
                caught_up.insert(c.conversation_id, c.next_seq);
            }
            pb::subscribe_event::Event::Dropped(d) => {
                dropped += 1;
                // Re-add right away from the next seq this client has not seen.
                let next = got.get(&d.conversation_id).map_or(1, |v| v.last().unwrap() + 1);
                ctl.send(adds([(d.conversation_id, next)])).await.unwrap();
            }
            pb::subscribe_event::Event::Removed(r) => panic!("nothing was removed, got {r:?}"),
            pb::subscribe_event::Event::Keepalive(_) => {}
        }
        let total: usize = got.values().map(Vec::len).sum();
        if phase == 0 && total >= 600 {
            ctl.send(adds((600..N).map(|i| (conv(i), 1)))).await.unwrap();
            phase = 1;
        } else if phase == 1 && total >= 2000 {
            ctl.send(pb::SubscribeControl { add: vec![], drop: (0..100).map(conv).collect() }).await.unwrap();
            phase = 2;
        }
    }
    publisher.await.unwrap();
    // A conversation's CaughtUp follows its last backlog envelope: the last ones may still
    // be on the way when the envelope count is complete.
    let until = Instant::now() + Duration::from_secs(20);
    while caught_up.len() < N && Instant::now() < until {
        let Ok(Some(Ok(ev))) = tokio::time::timeout(Duration::from_secs(5), events.next()).await else { break };
        match ev.event.unwrap() {
            pb::subscribe_event::Event::CaughtUp(c) => {
                caught_up.insert(c.conversation_id, c.next_seq);
            }
            pb::subscribe_event::Event::Keepalive(_) => {}
            other => panic!("after every envelope arrived, only CaughtUp may follow, got {other:?}"),
        }
    }
    assert_eq!(dropped, 100, "every drop is confirmed");
    assert_eq!(got.len(), N);
    for (id, seqs) in &got {
        assert_eq!(seqs, &(1..=PER).collect::<Vec<_>>(), "{id}: every envelope once, in order");
    }
    assert_eq!(caught_up.len(), N, "each conversation reports catching up");
    assert!(caught_up.values().all(|n| *n >= 3), "caught up after the backlog of 2");
}

/// Property (bounded subscriber): a subscriber that stops reading is cut off with
/// RESOURCE_EXHAUSTED and a resume position once its buffer stayed full; resuming from
/// that position loses nothing and repeats nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_subscriber_is_cut_off_with_a_resume_position_and_loses_nothing_when_it_resumes() {
    let cluster = start_cluster_with(3, 2, |c| {
        c.subscribe_buffer_events = 16;
        c.subscribe_stall_timeout_ms = 300;
    })
    .await;
    let ep = cluster.nodes[0].endpoint();
    let conv = "firehose";
    let (_ctl, mut events) = open_many(&ep, adds([(conv.to_string(), 1)])).await;
    // Far more than the buffer plus HTTP/2's flow-control windows, while nobody reads.
    let mut c = broker(&ep).await;
    let total = 3000u64;
    for k in 0..(total / 500) {
        publish(
            &mut c,
            (0..500)
                .map(|i| pb::Envelope { ciphertext: vec![7u8; 1024].into(), ..envelope(conv, k * 500 + i) })
                .collect(),
        )
        .await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut seqs = Vec::new();
    let status = loop {
        match tokio::time::timeout(Duration::from_secs(20), events.next()).await.unwrap() {
            Some(Ok(pb::SubscribeEvent { event: Some(pb::subscribe_event::Event::Envelope(e)) })) => seqs.push(e.seq),
            Some(Ok(_)) => {}
            Some(Err(s)) => break s,
            None => panic!("stream ended without a status"),
        }
    };
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("subscribe_buffer_events"), "{}", status.message());
    assert!(status.metadata().get("retry-after-ms").is_some());
    let resume = pb::ResumePositions::decode(status.details()).unwrap();
    assert_eq!(resume.positions.len(), 1);
    let from = resume.positions[0].from_seq;
    assert!((seqs.len() as u64) < total, "it was cut off before the end");
    assert_eq!(from, seqs.len() as u64 + 1, "resume right after the last delivered envelope");

    let (_ctl, mut events) = open_many(&ep, adds([(conv.to_string(), from)])).await;
    while (seqs.len() as u64) < total {
        let ev = tokio::time::timeout(Duration::from_secs(20), events.next()).await.unwrap().unwrap().unwrap();
        if let Some(pb::subscribe_event::Event::Envelope(e)) = ev.event {
            seqs.push(e.seq);
        }
    }
    assert_eq!(seqs, (1..=total).collect::<Vec<_>>(), "nothing lost, nothing repeated");
}

/// Property (ephemeral signals): an ephemeral publish reaches a live subscriber on
/// another node with seq 0, is never readable, and its bytes are in no file of any node.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ephemeral_signals_reach_live_subscribers_and_never_reach_disk() {
    let cluster = start_cluster(3, 2).await;
    let conv = "typing";
    let (_ctl, mut events) = open_many(&cluster.nodes[1].endpoint(), adds([(conv.to_string(), 1)])).await;
    // Wait for the subscription to be live.
    loop {
        if let Some(pb::subscribe_event::Event::CaughtUp(_)) = events.next().await.unwrap().unwrap().event {
            break;
        }
    }
    let marker = b"EPHEMERAL-TYPING-5b1e";
    let mut c = broker(&cluster.nodes[0].endpoint()).await;
    let r = c
        .publish(pb::PublishRequest {
            envelopes: vec![pb::Envelope { ciphertext: marker.to_vec().into(), ..envelope(conv, 1) }],
            ephemeral: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.appended[0].seq, 0);
    let ev = tokio::time::timeout(Duration::from_secs(10), events.next()).await.unwrap().unwrap().unwrap();
    let Some(pb::subscribe_event::Event::Envelope(e)) = ev.event else { panic!("expected the signal, got {ev:?}") };
    assert!(e.ephemeral);
    assert_eq!(e.seq, 0);
    assert_eq!(e.envelope.unwrap().ciphertext.as_ref(), marker);

    let page =
        c.read(pb::ReadRequest { conversation_id: conv.into(), ..Default::default() }).await.unwrap().into_inner();
    assert_eq!((page.last_seq, page.envelopes.len()), (0, 0), "nothing stored");
    for n in &cluster.nodes {
        n.node.store.flush().unwrap();
        n.node.wal.wait_durable(0).await.ok();
    }
    let hits = files_containing(cluster.dir.path(), marker);
    assert!(hits.is_empty(), "ephemeral bytes found on disk in {hits:?}");
}

/// Property (errors): bad input is INVALID_ARGUMENT naming the field and the limit, and
/// the node keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_messaging_requests_name_the_field_and_the_node_keeps_serving() {
    let cluster = start_cluster(3, 2).await;
    let mut c = broker(&cluster.nodes[0].endpoint()).await;
    let cases: Vec<(tonic::Status, &[&str])> = vec![
        (
            c.commit_cursor(pb::CommitCursorRequest { conversation_id: "c".into(), reader_id: String::new(), seq: 1 })
                .await
                .unwrap_err(),
            &["reader_id is 0 bytes", "1..=256"],
        ),
        (
            c.read(pb::ReadRequest { conversation_id: "c".into(), direction: 1, from_seq: 3, ..Default::default() })
                .await
                .unwrap_err(),
            &["from_seq", "BACKWARD", "before_seq"],
        ),
        (
            c.get_cursors(pb::GetCursorsRequest { conversation_id: "x".repeat(300), ..Default::default() })
                .await
                .unwrap_err(),
            &["conversation_id is 300 bytes", "1..=256"],
        ),
    ];
    for (s, parts) in cases {
        assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
        for p in parts {
            assert!(s.message().contains(p), "`{p}` in `{}`", s.message());
        }
    }
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(adds([("ok".to_string(), 1), (String::new(), 1)])).await.unwrap();
    let s = c.subscribe_many(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap_err();
    assert_eq!(s.code(), tonic::Code::InvalidArgument);
    assert!(s.message().contains("add[1].conversation_id is 0 bytes"), "{}", s.message());
    let ok = publish(&mut c, vec![envelope("still-serving", 1)]).await;
    assert_eq!(ok[0].seq, 1);
}
