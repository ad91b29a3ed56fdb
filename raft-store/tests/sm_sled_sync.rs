//! sled's flush is not an fsync (it ends with `sync_file_range` and never fsyncs its blob
//! files; `overlay.rs`, `SledFiles`): the state machine must make sled's files durable itself
//! before it acts on a checkpoint having landed. Checked on the system calls a real child
//! process makes, traced by `strace` (skipped where strace is missing or may not trace).

mod common;
use common::apply;
use common::open;

use std::collections::HashMap;
use std::collections::HashSet;
use std::path::Path;
use std::process::Command as Process;

use habar_raft_store::types::Command;
use habar_raft_store::types::Entry;
use habar_raft_store::types::EntryPayload;
use habar_raft_store::types::LogId;
use habar_raft_store::types::NewEnvelope;

const GROUP: u32 = 1;
const TEST: &str = "no_checkpoint_relies_on_sled_writes_before_they_are_fsynced";

fn command(index: u64, cmd: Command) -> Entry {
    Entry { log_id: LogId::new_term_index(1, index), payload: EntryPayload::Normal(cmd) }
}

/// The child: rounds of 4,000 new conversations and an envelope of 200 KiB (too big for a
/// run: a sled item, whose leaf sled writes as a blob file of its own), an erasure of a conversation whose run it then zeroes, and
/// retention that empties whole segments, which it then deletes; a checkpoint after each.
fn child(dst: &Path) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = open(dst);
        store.set_env_segment_bytes(64 << 10);
        let mut sm = store.group(GROUP).unwrap();
        let mut index = 0;
        let mut next = |cmd| {
            index += 1;
            command(index, cmd)
        };
        for round in 0..3u64 {
            let now_ms = 1_000 + round;
            let entries: Vec<Entry> = (0..40u64)
                .map(|e| {
                    let envelopes = (0..100u64)
                        .map(|k| NewEnvelope {
                            conversation_id: format!("r{round}-c{}", e * 100 + k),
                            message_id: {
                                let mut id = [0u8; 16];
                                id[..8].copy_from_slice(&(e * 100 + k).to_be_bytes());
                                id[8] = round as u8;
                                id
                            },
                            sender: "s".into(),
                            ciphertext: vec![7u8; 200].into(),
                            expires_at_ms: 0,
                        })
                        .collect();
                    next(Command::Append { now_ms, envelopes })
                })
                .collect();
            apply(&mut sm, entries).await;
            // An envelope too big for a run stays a sled item: its leaf is a blob.
            let big = NewEnvelope {
                conversation_id: format!("big{round}"),
                message_id: [round as u8 + 1; 16],
                sender: "s".into(),
                ciphertext: vec![9u8; 200 << 10].into(),
                expires_at_ms: 0,
            };
            apply(&mut sm, vec![next(Command::Append { now_ms, envelopes: vec![big] })]).await;
            store.checkpoint().unwrap();
            let erase = Command::EraseConversation {
                now_ms,
                conversation_id: format!("r{round}-c7"),
                reset_seq: false,
                max_removals: 1_000,
            };
            apply(&mut sm, vec![next(erase)]).await;
            store.checkpoint().unwrap();
            let retain: Vec<Entry> = (0..4_000u64)
                .map(|c| {
                    next(Command::SetRetentionStep {
                        now_ms: now_ms + 1_000,
                        conversation_id: format!("r{round}-c{c}"),
                        max_age_ms: 1,
                        max_count: 0,
                        max_removals: 10,
                    })
                })
                .collect();
            apply(&mut sm, retain).await;
            store.checkpoint().unwrap();
        }
    });
}

/// Whether strace can trace a child here (installed, and ptrace allowed).
fn strace_works() -> bool {
    Process::new("strace").args(["-f", "-o", "/dev/null", "true"]).status().is_ok_and(|s| s.success())
}

/// The path strace shows for a descriptor argument (`-y`): `5</a/b>` gives `/a/b`.
fn fd_path(args: &str) -> Option<&str> {
    let start = args.find('<')? + 1;
    let end = start + args[start..].find('>')?;
    Some(&args[start..end])
}

/// The first quoted string of a call's arguments (a path argument).
fn quoted(args: &str) -> Option<&str> {
    let start = args.find('"')? + 1;
    let end = start + args[start..].find('"')?;
    Some(&args[start..end])
}

/// Property: a checkpoint's index log file (which its sled batch points into) is fdatasynced
/// before sled is flushed; and what the state machine does because a checkpoint's sled
/// batch landed (it deletes segments no run points into any more, gives the state index the
/// checkpoint's writes) happens only once sled's writes are fsynced: its log file, each
/// blob file sled created before, and the blob directory if blobs came or went. Otherwise a
/// power cut could leave sled older than what the segments and the index already assume
/// (runs pointing into deleted segments, an index ahead of sled's applied id).
///
/// What the trace cannot show, so this does not check: that the log file's fdatasync comes
/// before sled's batch (the batch lands in sled's memory, written out later by its own
/// threads); the zeroing of erased runs (its `pwrite`s look like appends); checkpoints
/// without index writes (the model knows a batch is coming from its log file write, and
/// every checkpoint of this child has some).
#[test]
fn no_checkpoint_relies_on_sled_writes_before_they_are_fsynced() {
    if let Ok(dst) = std::env::var("HABAR_SLED_SYNC_DST") {
        child(Path::new(&dst));
        return;
    }
    if !strace_works() {
        eprintln!("skipped: strace is missing or may not trace here (apt-get install strace)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // strace shows resolved paths (a symlinked TMPDIR would not match).
    let dst = dir.path().canonicalize().unwrap().join("store");
    let trace = dir.path().join("trace.txt");
    let status = Process::new("strace")
        .args(["-f", "-y", "-qq", "-s", "0", "-o"])
        .arg(&trace)
        .args([
            "-e",
            "trace=openat,write,pwrite64,pwritev,pwritev2,fsync,fdatasync,unlink,unlinkat,rename,renameat,renameat2",
        ])
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", TEST, "--test-threads=1"])
        .env("HABAR_SLED_SYNC_DST", &dst)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "the traced child failed: {status}");
    let text = std::fs::read_to_string(&trace).unwrap();

    let db_file = dst.join("db").join("db");
    let db_file = db_file.to_str().unwrap();
    let blobs_dir = dst.join("db").join("blobs");
    let blobs_dir = blobs_dir.to_str().unwrap();
    let index_dir = dst.join(habar_raft_store::index::DIR);
    let index_dir = index_dir.to_str().unwrap();
    let index_logs = dst.join("index-log.");
    let index_logs = index_logs.to_str().unwrap();
    // sled writes its log from its own IO threads, and its readers write too (a node merge
    // during a read, in the applying thread), so writes are not attributed to a thread.
    // Instead, per thread that checkpoints (T): its index log file write announces a batch;
    // the batch is durable once T completed an fsync of sled's log file after it; blob files
    // and blob directory entries that appeared before that fsync began must be synced too
    // (later ones belong to a later state, which sled's recovery treats as a prefix of its
    // log).
    let mut batch_unsynced: HashSet<String> = HashSet::new(); // threads whose batch is not fsynced yet
                                                              // thread -> line where its last sync of sled's files began: its listing of the blob
                                                              // directory, else its fsync of sled's log
    let mut db_sync_began: HashMap<String, usize> = HashMap::new();
    let mut blobs_listed: HashMap<String, usize> = HashMap::new();
    let mut sled_extra: HashMap<String, usize> = HashMap::new(); // blob file -> line it was dirtied first
                                                                 // Blob names created (true) or removed (false) since the blob directory's last fsync,
                                                                 // with the line: the directory needs one only for a net change (a blob created and
                                                                 // removed in between needs none, and the store rightly skips it).
    let mut dir_changes: HashMap<String, (usize, bool)> = HashMap::new();
    let mut logs_unsynced: HashMap<String, HashSet<String>> = HashMap::new(); // index log file -> threads that wrote it
    let (mut blobs, mut reliances, mut db_syncs, mut log_writes) = (0, [0usize; 2], 0, 0);
    let mut violations = Vec::new();
    // A call interrupted by another thread's line continues in a "resumed" line: what it
    // did counts when it began (writes, deletions: conservative) or ended (fsyncs).
    let mut pending: HashMap<String, (usize, String)> = HashMap::new();
    let lines: Vec<&str> = text.lines().collect();
    let mut first_violation = None;
    for (n, line) in lines.iter().enumerate() {
        if !violations.is_empty() && first_violation.is_none() {
            first_violation = Some(n - 1);
        }
        let Some((pid, rest)) = line.trim_start().split_once(char::is_whitespace) else { continue };
        let rest = rest.trim_start();
        let (began, call, done) = if let Some(r) = rest.strip_prefix("<... ") {
            let Some((began, call)) = pending.remove(pid) else { continue };
            if !(r.starts_with("fsync") || r.starts_with("fdatasync")) {
                continue; // counted when it began
            }
            (began, call, r.contains("= 0"))
        } else if rest.ends_with("<unfinished ...>") {
            pending.insert(pid.to_string(), (n, rest.to_string()));
            let name = rest.split('(').next().unwrap_or("");
            if name.starts_with("fsync") || name.starts_with("fdatasync") {
                continue; // counts once it ends
            }
            (n, rest.to_string(), false)
        } else {
            (n, rest.to_string(), rest.ends_with("= 0") || !rest.contains("= -1"))
        };
        let Some((name, args)) = call.split_once('(') else { continue };
        // Whether T (this thread) may rely on its last batch being durable now.
        let durable_for = |pid: &str,
                           batch_unsynced: &HashSet<String>,
                           sled_extra: &HashMap<String, usize>,
                           dir_changes: &HashMap<String, (usize, bool)>| {
            let synced_at = db_sync_began.get(pid).copied().unwrap_or(0);
            !batch_unsynced.contains(pid)
                && !sled_extra.values().any(|&at| at < synced_at)
                && !dir_changes.values().any(|&(at, _)| at < synced_at)
        };
        match name {
            "write" | "pwrite64" | "pwritev" | "pwritev2" => {
                let Some(path) = fd_path(args) else { continue };
                if path.starts_with(index_logs) {
                    logs_unsynced.entry(path.to_string()).or_default().insert(pid.to_string());
                    batch_unsynced.insert(pid.to_string());
                    log_writes += 1;
                } else if path.starts_with(blobs_dir) {
                    sled_extra.entry(path.to_string()).or_insert(n);
                } else if path.starts_with(index_dir) && path.ends_with(".jnl") {
                    reliances[1] += 1;
                    if !durable_for(pid, &batch_unsynced, &sled_extra, &dir_changes) {
                        violations.push(format!("{line}: the index written while sled is not synced"));
                    }
                }
            }
            "openat" if quoted(args) == Some(blobs_dir) && args.contains("O_DIRECTORY") => {
                blobs_listed.insert(pid.to_string(), began);
            }
            "openat" if quoted(args).is_some_and(|p| p.starts_with(blobs_dir)) && args.contains("O_CREAT") => {
                blobs += 1;
                let blob = quoted(args).unwrap_or("").to_string();
                if dir_changes.get(&blob).is_some_and(|&(_, created)| !created) {
                    dir_changes.remove(&blob);
                } else {
                    dir_changes.insert(blob, (n, true));
                }
            }
            "unlink" | "unlinkat" => {
                let path = quoted(args).unwrap_or("");
                if path.starts_with(blobs_dir) {
                    sled_extra.remove(path);
                    if dir_changes.get(path).is_some_and(|&(_, created)| created) {
                        dir_changes.remove(path);
                    } else {
                        dir_changes.insert(path.to_string(), (n, false));
                    }
                } else if path.ends_with(".env") {
                    reliances[0] += 1;
                    if !durable_for(pid, &batch_unsynced, &sled_extra, &dir_changes) {
                        violations.push(format!("{line}: a segment deleted while sled is not synced"));
                    }
                }
            }
            "fsync" | "fdatasync" if done => {
                let Some(path) = fd_path(args) else { continue };
                if path == db_file {
                    db_syncs += 1;
                    if logs_unsynced.values().any(|by| by.contains(pid)) {
                        violations.push(format!("{line}: sled flushed while its index log file is not synced"));
                    }
                    batch_unsynced.remove(pid);
                    db_sync_began.insert(pid.to_string(), blobs_listed.remove(pid).unwrap_or(began));
                } else if path == blobs_dir {
                    dir_changes.clear();
                } else {
                    logs_unsynced.remove(path);
                    sled_extra.remove(path);
                }
            }
            _ => {}
        }
    }
    eprintln!(
        "{blobs} blob files, {db_syncs} fsyncs of sled's log, {log_writes} index log file writes, {} segment deletions, {} index journal writes",
        reliances[0], reliances[1]
    );
    // The child did what the property is about (or the trace was not read right).
    assert!(blobs >= 3, "sled wrote blob files ({blobs})");
    assert!(log_writes >= 3, "checkpoints wrote index log files ({log_writes})");
    assert!(reliances[0] >= 3, "segments were deleted ({})", reliances[0]);
    assert!(reliances[1] >= 3, "the index got checkpoints' writes ({})", reliances[1]);
    if let Some(n) = first_violation.or((!violations.is_empty()).then_some(lines.len() - 1)) {
        eprintln!("the trace up to the first violation:\n{}", lines[n.saturating_sub(30)..=n].join("\n"));
    }
    assert_eq!(violations, Vec::<String>::new(), "{} violations", violations.len());
}
