//! `habar-raft-store`: everything Habar keeps on disk.
//!
//! - [`wal`]: one write-ahead log per node, shared by all Raft groups, with group commit.
//! - [`log_store`]: openraft's log storage for one group, on top of the WAL.
//! - the state machine on sled, its key encoding and snapshots (see their modules).
//!
//! This crate knows nothing of gRPC.

pub mod log_store;
pub mod types;
pub mod wal;

pub use log_store::LogStore;
pub use wal::Wal;
pub use wal::WalConfig;
pub use wal::WalError;
