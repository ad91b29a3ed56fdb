//! The Habar node: gRPC broker over a multi-Raft replicated log.
//!
//! `main.rs` is thin; everything lives here so tests can run nodes in-process on port 0.
//!
//! - [`server`]: starts a node (store, one Raft group per shard) and serves gRPC.
//! - [`node`]: routing of calls to shard leaders, forwarding, retries through elections.
//! - [`service`]: the public `Broker` and `Cluster` services.
//! - [`forward`]: the internal forwarding protocol.
//! - [`raft_net`]: the Raft transport between nodes.
//! - [`repair`]: a node whose WAL was corrupt rejoins without a vote until caught up.
//! - [`config`], [`cli`], [`dev`], [`validate`]: settings, the `habar` binary, limits.

pub mod admission;
pub mod cli;
pub mod clock;
pub mod config;
pub mod convert;
pub mod dev;
pub mod disk;
pub mod error;
pub mod forward;
pub mod node;
pub mod proposer;
pub mod raft_net;
pub mod repair;
pub mod server;
pub mod service;
pub mod shard;
pub mod subscribe;
pub mod validate;
