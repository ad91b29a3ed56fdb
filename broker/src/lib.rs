//! The Habar node: gRPC broker over a multi-Raft replicated log.
//!
//! `main.rs` is thin; everything lives here so tests can run nodes in-process on port 0.

pub mod cli;
pub mod config;
pub mod dev;
pub mod raft_net;
pub mod server;
pub mod validate;
