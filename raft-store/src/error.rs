//! The store's error type at the crate boundary.

use std::io;
use std::path::Path;
use std::path::PathBuf;

use crate::wal::WalError;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    #[error("I/O error on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    /// `what` is a file path or a key (hex); `offset` the byte offset in it.
    #[error("corruption in {what} at offset {offset}: {reason}")]
    Corrupt { what: String, offset: u64, reason: String },
    /// The state index (fjall) failed.
    #[error("state index: {0}")]
    Index(String),
    #[error("encoding: {0}")]
    Encode(String),
    /// A read kept racing with snapshot installs; retrying later is fine.
    #[error("busy: {0}")]
    Busy(String),
    #[error(transparent)]
    Wal(#[from] WalError),
    /// A state-machine checkpoint failed; the state machine applies nothing more.
    #[error("{0}")]
    Checkpoint(String),
}

impl From<StoreError> for io::Error {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Io { source, path } => io::Error::new(source.kind(), format!("{}: {source}", path.display())),
            StoreError::Corrupt { .. } => io::Error::new(io::ErrorKind::InvalidData, e),
            other => io::Error::other(other),
        }
    }
}

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Maps an I/O error on `path` to [`StoreError::Io`] naming the path.
pub(crate) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_path_buf(), source }
}

/// Nanoseconds since the Unix epoch: makes temp and snapshot file names unique.
pub(crate) fn unix_nanos() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
}
