//! Crash test with a real process: a child appends from several groups and reports each
//! append the WAL acknowledged as durable; the parent SIGKILLs it mid-write, reopens the
//! WAL and checks that every acknowledged entry is there, intact and without holes.
//!
//! The child is this same test binary, re-run with `HABAR_WAL_CRASH_CHILD` set.

use std::io::BufRead;
use std::io::BufReader;
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::process::Stdio;
use std::sync::mpsc;

use habar_raft_store::Wal;
use habar_raft_store::WalConfig;

const GROUPS: u32 = 4;

fn payload(group: u32, index: u64) -> Vec<u8> {
    let mut p = format!("{group}:{index}:").into_bytes();
    p.resize(64 + (index % 300) as usize, (index % 251) as u8);
    p
}

fn wal_cfg(dir: &Path) -> WalConfig {
    let mut c = WalConfig::new(dir);
    // Small segments so crashes also land around rotations.
    c.segment_bytes = 32 << 10;
    c
}

/// The child: append forever; print "g i" for each durable append.
fn child(dir: &Path) {
    let wal = Wal::open(wal_cfg(dir)).expect("open");
    let (tx, rx) = mpsc::channel::<(u32, u64)>();
    let writer = std::thread::spawn(move || {
        let out = std::io::stdout();
        let mut out = out.lock();
        for (g, i) in rx {
            writeln!(out, "{g} {i}").expect("stdout");
            out.flush().expect("stdout");
        }
    });
    let mut next: Vec<u64> = (0..GROUPS).map(|g| wal.group_state(g).last.map_or(1, |(i, _)| i + 1)).collect();
    loop {
        for g in 0..GROUPS {
            let n = 1 + (next[g as usize] % 5);
            let first = next[g as usize];
            let ps: Vec<(u64, Vec<u8>)> = (first..first + n).map(|i| (i, payload(g, i))).collect();
            let tx = tx.clone();
            let last = first + n - 1;
            wal.append(
                g,
                ps.iter().map(|(i, p)| (*i, 1, p.as_slice())),
                Some(Box::new(move |r| {
                    if r.is_ok() {
                        let _ = tx.send((g, last));
                    }
                })),
            )
            .expect("append");
            next[g as usize] = last + 1;
        }
        if next[0] > 1_000_000 {
            break;
        }
    }
    drop(tx);
    let _ = writer.join();
}

#[test]
fn sigkill_mid_write_loses_no_acknowledged_entry() {
    if let Ok(dir) = std::env::var("HABAR_WAL_CRASH_CHILD") {
        child(Path::new(&dir));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    for round in 0..5 {
        let mut ch = Command::new(&exe)
            .args(["--exact", "sigkill_mid_write_loses_no_acknowledged_entry", "--nocapture", "--test-threads=1"])
            .env("HABAR_WAL_CRASH_CHILD", dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = ch.stdout.take().unwrap();
        let mut acked = vec![0u64; GROUPS as usize];
        let mut lines = 0;
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            let mut it = line.split_whitespace();
            let (Some(g), Some(i)) = (it.next(), it.next()) else { continue };
            let (Ok(g), Ok(i)) = (g.parse::<usize>(), i.parse::<u64>()) else { continue };
            acked[g] = acked[g].max(i);
            lines += 1;
            if lines == 300 + round * 97 {
                break;
            }
        }
        // Real SIGKILL while the child keeps appending.
        ch.kill().unwrap();
        ch.wait().unwrap();

        let wal = Wal::open(wal_cfg(dir.path())).expect("reopen after SIGKILL");
        for g in 0..GROUPS {
            let got = wal.read(g, 0, u64::MAX).unwrap();
            let last = got.last().map_or(0, |e| e.index);
            assert!(
                last >= acked[g as usize],
                "round {round} group {g}: acknowledged up to {} but only {last} survived",
                acked[g as usize]
            );
            for (k, e) in got.iter().enumerate() {
                assert_eq!(e.index, k as u64 + 1, "round {round} group {g}: no holes");
                assert_eq!(e.payload, payload(g, e.index), "round {round} group {g} index {}: intact", e.index);
            }
        }
    }
}
