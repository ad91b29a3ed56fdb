//! The store's error type at the crate boundary.

use std::io;
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
    #[error("encoding: {0}")]
    Encode(String),
    /// A read kept racing with snapshot installs; retrying later is fine.
    #[error("busy: {0}")]
    Busy(String),
    #[error(transparent)]
    Wal(#[from] WalError),
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
