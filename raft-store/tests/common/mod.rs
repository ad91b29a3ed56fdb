//! Helpers shared by the state-machine tests.

use std::path::Path;

use habar_raft_store::types::Entry;
use habar_raft_store::GroupStateMachine;
use habar_raft_store::StateStore;
use openraft::storage::RaftStateMachine;

/// Applies `es` in one call, as openraft would, without responders.
#[allow(dead_code)] // test binaries with their own variant include this module too
pub async fn apply(sm: &mut GroupStateMachine, es: Vec<Entry>) {
    let stream = futures::stream::iter(es.into_iter().map(|e| Ok((e, None))));
    sm.apply(stream).await.unwrap();
}

/// A store whose checkpoints happen only when the test asks.
#[allow(dead_code)] // as above
pub fn open(dir: &Path) -> StateStore {
    let s = StateStore::open(dir, 8 << 20).unwrap();
    s.set_checkpoint_interval(std::time::Duration::from_secs(3600));
    s
}

/// Runs the test `test` of this test binary again in a child process with `env` set; the
/// child must crash (abort at its `HABAR_TEST_CRASH_AT` point). `what` names the case.
#[allow(dead_code)] // not every test binary that includes this module crashes a child
pub fn spawn_crashing_child(test: &str, env: &[(&str, &std::ffi::OsStr)], what: &str) {
    let mut child = std::process::Command::new(std::env::current_exe().unwrap());
    child.args(["--exact", test, "--test-threads=1"]);
    for (k, v) in env {
        child.env(k, v);
    }
    let status = child.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).status().unwrap();
    // Aborted at the crash point (SIGABRT), not failed some other way.
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(6), "{what}: the child must have aborted at the crash point ({status})");
}
