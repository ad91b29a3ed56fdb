//! Publishes a few envelopes, reads them back newest first, then subscribes and prints
//! what arrives.
//!
//! ```text
//! cargo run -p habar-client --example publish_and_subscribe -- 127.0.0.1:7000 127.0.0.1:7001
//! ```

use std::time::Duration;

use habar_client::pb;
use habar_client::Client;
use habar_client::ClientConfig;
use habar_client::Event;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let endpoints: Vec<String> = std::env::args().skip(1).collect();
    if endpoints.is_empty() {
        anyhow::bail!("usage: publish_and_subscribe HOST:PORT [HOST:PORT ...]");
    }
    let client = Client::connect(ClientConfig::new(endpoints)).await?;
    let conversation = format!("example-{}", std::process::id());

    // Concurrent publishes are batched into few requests.
    let publishes = (0..5).map(|i| {
        let client = client.clone();
        let conversation = conversation.clone();
        async move {
            client
                .publish(pb::Envelope {
                    conversation_id: conversation,
                    sender: "example".into(),
                    ciphertext: format!("message {i}").into_bytes().into(),
                    ..Default::default()
                })
                .await
        }
    });
    for appended in futures::future::try_join_all(publishes).await? {
        println!("published seq {} (duplicate: {})", appended.seq, appended.duplicate);
    }

    // Newest first, as a chat window scrolls up.
    let page = client
        .read(pb::ReadRequest {
            conversation_id: conversation.clone(),
            limit: 10,
            direction: pb::Direction::Backward as i32,
            ..Default::default()
        })
        .await?;
    for e in &page.envelopes {
        let text = e.envelope.as_ref().map(|e| String::from_utf8_lossy(&e.ciphertext).into_owned()).unwrap_or_default();
        println!("read seq {}: {text}", e.seq);
    }

    // From the start, then live; one more envelope arrives while subscribed.
    let mut sub = client.subscribe(vec![(conversation.clone(), 1)]).await?;
    let late = client.clone();
    let conv = conversation.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let envelope =
            pb::Envelope { conversation_id: conv, ciphertext: b"late".to_vec().into(), ..Default::default() };
        if let Err(e) = late.publish(envelope).await {
            eprintln!("late publish failed: {e}");
        }
    });
    let mut envelopes = 0;
    while envelopes < 6 {
        let Ok(next) = tokio::time::timeout(Duration::from_secs(10), sub.next()).await else {
            println!("nothing for 10 s");
            break;
        };
        match next {
            Some(Ok(Event::Envelope(e))) => {
                envelopes += 1;
                let text = e
                    .envelope
                    .as_ref()
                    .map(|e| String::from_utf8_lossy(&e.ciphertext).into_owned())
                    .unwrap_or_default();
                println!("event: seq {} {text}", e.seq);
            }
            Some(Ok(other)) => println!("event: {other:?}"),
            Some(Err(e)) => return Err(e.into()),
            None => break,
        }
    }
    println!("stats: {:?}", client.stats());
    Ok(())
}
