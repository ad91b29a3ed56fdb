//! openraft's own storage conformance suite, run against Habar's WAL-backed log store
//! and sled state machine, with real files in a temp dir.

use habar_raft_store::types::TypeConfig;
use habar_raft_store::GroupStateMachine;
use habar_raft_store::LogStore;
use habar_raft_store::StateStore;
use habar_raft_store::Wal;
use habar_raft_store::WalConfig;
use openraft::testing::log::StoreBuilder;
use openraft::testing::log::Suite;
use openraft::type_config::TypeConfigExt;
use openraft::StorageError;

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, GroupStateMachine, tempfile::TempDir> for Builder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, GroupStateMachine), StorageError<TypeConfig>> {
        let dir = tempfile::tempdir().map_err(|e| StorageError::read(TypeConfig::err_from_error(&e)))?;
        let wal = Wal::open(WalConfig::new(dir.path().join("wal")))
            .map_err(|e| StorageError::read(TypeConfig::err_from_error(&e)))?;
        let store = StateStore::open(&dir.path().join("sm"), 8 << 20)
            .map_err(|e| StorageError::read(TypeConfig::err_from_error(&e)))?;
        // A group id other than 0, so nothing works by accident of zeros.
        let sm = store.group(7).map_err(|e| StorageError::read(TypeConfig::err_from_error(&e)))?;
        Ok((dir, LogStore::new(wal, 7), sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passes_openraft_storage_suite() -> Result<(), StorageError<TypeConfig>> {
    Suite::test_all(Builder).await?;
    Ok(())
}
