//! habar-client: the Rust client for Habar.

pub mod shard;
