//! Helpers shared by the state-machine tests.

use std::path::Path;

use habar_raft_store::types::Entry;
use habar_raft_store::GroupStateMachine;
use habar_raft_store::StateStore;
use openraft::storage::RaftStateMachine;

/// Applies `es` in one call, as openraft would, without responders.
pub async fn apply(sm: &mut GroupStateMachine, es: Vec<Entry>) {
    let stream = futures::stream::iter(es.into_iter().map(|e| Ok((e, None))));
    sm.apply(stream).await.unwrap();
}

/// A store whose checkpoints happen only when the test asks.
pub fn open(dir: &Path) -> StateStore {
    let s = StateStore::open(dir, 8 << 20).unwrap();
    s.set_checkpoint_interval(std::time::Duration::from_secs(3600));
    s
}
