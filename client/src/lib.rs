//! habar-client: the Rust client for Habar, the Raft-replicated message broker.
//!
//! A [`Client`] connects to a few endpoints of a cluster, learns which node leads each
//! shard from `Cluster.Status` (refreshed every [`ClientConfig::status_refresh`] and
//! right after an `UNAVAILABLE`), and sends each call for a conversation to the leader of
//! its shard ([`shard::shard_of`], the servers' own function). Any node would forward it;
//! going to the leader saves a hop. When the leader is unknown or unreachable, the call
//! goes to any other endpoint.
//!
//! - **Publishing.** [`Client::publish`] sends one envelope; concurrent calls for the
//!   same node are batched into one `PublishRequest` (up to
//!   [`ClientConfig::max_batch_envelopes`] / [`ClientConfig::max_batch_bytes`], with up to
//!   [`ClientConfig::max_in_flight_batches`] requests in flight per node and shard, so each
//!   request is one Raft entry), and each caller
//!   gets its own `Appended`. An envelope without a `message_id` gets 16 random bytes.
//!   Failed attempts that may succeed later (`UNAVAILABLE`, a lost connection, a
//!   server's `DEADLINE_EXCEEDED`) are retried with exponential backoff and jitter, with
//!   the same message ids, within [`ClientConfig::request_timeout`]: publishing is
//!   idempotent on `(conversation_id, message_id)`, so a retry of an applied envelope
//!   answers its original seq with `duplicate = true`. A bad envelope fails its whole
//!   batch (every caller in it gets the `INVALID_ARGUMENT`); [`Client::publish_batch`]
//!   sends exactly the caller's envelopes, for all-or-nothing validation.
//!   [`Client::publish_ephemeral`] sends live signals (one attempt, never stored).
//! - **Reading.** [`Client::read`], [`Client::commit_cursor`], [`Client::get_cursors`],
//!   [`Client::delete_conversation`], [`Client::set_retention`] and [`Client::status`]
//!   are the gRPC calls, routed and retried.
//! - **Subscribing.** [`Client::subscribe`] opens one `SubscribeMany` stream for many
//!   conversations. The [`Subscription`] resumes by itself after a node stops, a lost
//!   connection or falling behind, and never delivers a seq twice or out of order.
//! - **Errors.** One [`ClientError`], by what the caller can do about it.
//!
//! Queues are bounded everywhere: a node's publish queue
//! ([`ClientConfig::publish_queue_capacity`]), a subscription's events and commands.
//!
//! # Example
//!
//! ```no_run
//! use habar_client::{Client, ClientConfig, Event};
//! use habar_client::pb;
//!
//! # async fn example() -> Result<(), habar_client::ClientError> {
//! let client = Client::connect(ClientConfig::new(["127.0.0.1:7000", "127.0.0.1:7001"])).await?;
//!
//! // Publish (message_id left empty: the client picks one and keeps it across retries).
//! let appended = client
//!     .publish(pb::Envelope {
//!         conversation_id: "alice-bob".into(),
//!         ciphertext: b"sealed bytes".to_vec().into(),
//!         ..Default::default()
//!     })
//!     .await?;
//! println!("stored as seq {}", appended.seq);
//!
//! // The newest 20 envelopes, newest first.
//! let page = client
//!     .read(pb::ReadRequest {
//!         conversation_id: "alice-bob".into(),
//!         limit: 20,
//!         direction: pb::Direction::Backward as i32,
//!         ..Default::default()
//!     })
//!     .await?;
//! println!("{} envelopes, last seq {}", page.envelopes.len(), page.last_seq);
//!
//! // Everything from seq 1, then live.
//! let mut sub = client.subscribe(vec![("alice-bob".into(), 1)]).await?;
//! while let Some(event) = sub.next().await {
//!     match event? {
//!         Event::Envelope(e) => println!("seq {}", e.seq),
//!         Event::CaughtUp { conversation_id, next_seq } => println!("{conversation_id} live from {next_seq}"),
//!         other => println!("{other:?}"),
//!     }
//! }
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

mod batch;
mod client;
mod config;
mod error;
#[allow(missing_docs)]
pub mod shard;
mod subscription;

pub use client::new_message_id;
pub use client::Client;
pub use client::ClientStats;
pub use config::ClientConfig;
pub use error::ClientError;
/// The generated message types and stubs of `habar.v1` (`Envelope`, `ReadRequest`, ...).
pub use habar_proto::v1 as pb;
pub use subscription::Event;
pub use subscription::Subscription;
