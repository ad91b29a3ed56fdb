//! What erasing a big conversation does to the rest of a cluster (ARCHITECTURE.md, "Erasure"):
//! publishes N envelopes of 256 bytes into conversation `big`, then erases it while another
//! task publishes one envelope every 5 ms to other conversations and times each; prints how
//! long the erasure took and those publishes' p50 / p99 / max.
//!
//! Against `habar dev` (nodes on 127.0.0.1:7001-7003):
//! `cargo run --release -p habar-client --example erase_probe -- 200000`; watch each node's
//! RSS meanwhile (`grep VmRSS /proc/<pid>/status`).
use habar_client::{Client, ClientConfig};
use habar_proto::v1 as pb;
use std::time::{Duration, Instant};

fn env(conv: &str, n: u64) -> pb::Envelope {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&n.to_be_bytes());
    id[8..].copy_from_slice(&(conv.len() as u64 * 7919 + conv.as_bytes()[conv.len() - 1] as u64).to_be_bytes());
    pb::Envelope {
        conversation_id: conv.into(),
        message_id: id.to_vec().into(),
        sender: "s".into(),
        ciphertext: vec![7u8; 256].into(),
        expires_at_ms: 0,
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let n: u64 = args.get(1).map(|a| a.parse()).transpose()?.unwrap_or(200_000);
    let c = Client::connect(ClientConfig::new(["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"])).await?;
    let t = Instant::now();
    let mut k = 0;
    while k < n {
        let batch: Vec<_> = (k..(k + 500).min(n)).map(|i| env("big", i)).collect();
        k += batch.len() as u64;
        c.publish_batch(batch).await?;
    }
    println!("published {n} into big in {:?}", t.elapsed());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let c2 = c.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s2 = stop.clone();
    let probe = tokio::spawn(async move {
        let mut lat = Vec::new();
        let mut i = 0u64;
        while !s2.load(std::sync::atomic::Ordering::Relaxed) {
            let t = Instant::now();
            let r = c2.publish(env(&format!("other-{}", i % 50), 1_000_000 + i)).await;
            if let Err(e) = r {
                println!("probe error after {:?}: {e}", t.elapsed());
            }
            lat.push(t.elapsed());
            i += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        lat
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    println!("deleting at {:?}", std::time::SystemTime::now());
    let t = Instant::now();
    let r =
        c.delete_conversation(pb::DeleteConversationRequest { conversation_id: "big".into(), reset_seq: false }).await;
    println!("delete took {:?}: {:?}", t.elapsed(), r.map(|r| r.removed_envelopes));
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut lat = probe.await?;
    lat.sort();
    println!(
        "probe publishes: {} p50 {:?} p99 {:?} max {:?}",
        lat.len(),
        lat[lat.len() / 2],
        lat[lat.len() * 99 / 100],
        lat[lat.len() - 1]
    );
    Ok(())
}
