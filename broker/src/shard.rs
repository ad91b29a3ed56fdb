//! Which shard (Raft group) a conversation lives in: defined once, in `habar-client`, so
//! that clients route exactly as the nodes do.

pub use habar_client::shard::fnv1a64;
pub use habar_client::shard::shard_of;
