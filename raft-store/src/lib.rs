//! `habar-raft-store`: everything Habar keeps on disk.
//!
//! - [`wal`]: one write-ahead log per node, shared by all Raft groups, with group commit.
//! - [`log_store`]: openraft's log storage for one group, on top of the WAL.
//! - [`repair`]: quarantine of damaged files and the repair marker.
//! - [`envseg`]: append-only envelope segments (the envelope store's files); [`runs`]: how the
//!   state machine's checkpoints put a conversation's envelopes into them.
//! - [`overlay`]: the write-back layer over sled that [`sm`] writes into; its writes reach
//!   sled only in checkpoints.
//! - [`frame`]: the record frame both kinds of segment files use.
//! - [`index`]: the state index (an LSM tree beside sled) that [`sm`] keeps its
//!   per-conversation and per-envelope items in (conversation records, runs, dedupe pairs).
//! - [`ilog`]: the two files a checkpoint keeps its writes to the state index in until the
//!   index persisted them.
//! - [`sm`]: the state machine on sled; [`keys`]: its byte layout; [`snapshot`]: snapshot files.
//!
//! This crate knows nothing of gRPC.

pub(crate) mod dedupe_filter;
pub mod envseg;
pub mod error;
pub mod frame;
pub mod ilog;
pub mod index;
pub mod keys;
pub mod log_store;
pub mod overlay;
pub mod repair;
pub mod runs;
pub mod slow;
pub mod sm;
pub mod snapshot;
pub mod types;
pub mod wal;

pub use error::StoreError;
pub use log_store::LogStore;
pub use sm::GroupStateMachine;
pub use sm::StateStore;
pub use snapshot::SnapshotData;
pub use snapshot::SnapshotWriter;
pub use wal::Wal;
pub use wal::WalConfig;
pub use wal::WalError;
