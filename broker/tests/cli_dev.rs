//! `habar dev` end to end, as a new user runs it: start, publish and read with the CLI,
//! Ctrl-C, and no node left running.

use std::io::BufRead;
use std::io::BufReader;
use std::process::Command;
use std::process::Stdio;
use std::time::Duration;
use std::time::Instant;

const HABAR: &str = env!("CARGO_BIN_EXE_habar");

/// Three consecutive free loopback ports.
fn free_base_port() -> u16 {
    for _ in 0..200 {
        let base = 20_000 + (rand::random::<u16>() % 30_000);
        let ok = (0..3).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok());
        if ok {
            return base;
        }
    }
    panic!("no three consecutive free ports");
}

fn alive(pid: u32) -> bool {
    // A zombie still has a /proc entry; check its state too.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.split_whitespace().nth(2).is_some_and(|st| st == "Z"))
        .unwrap_or(false)
}

/// Property: `habar dev` starts a working cluster (a publish through one node is readable
/// through another), and Ctrl-C stops every node it started.
#[test]
fn habar_dev_starts_a_cluster_serves_the_cli_and_stops_on_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    let base = free_base_port();
    let mut dev = Command::new(HABAR)
        .args(["dev", "--data-dir", dir.path().to_str().unwrap(), "--base-port", &base.to_string(), "--shards", "4"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(dev.stdout.take().unwrap()).lines();
    let mut pids = Vec::new();
    let start = Instant::now();
    let mut ready = false;
    for line in lines.by_ref() {
        let line = line.unwrap();
        if line.contains("ready") {
            ready = true;
        }
        if let Some(pid) = line.split("pid ").nth(1).and_then(|s| s.split_whitespace().next()) {
            pids.push(pid.parse::<u32>().unwrap());
        }
        if line.contains("Ctrl-C stops") {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "habar dev not ready in time");
    }
    assert!(ready, "habar dev printed a ready line");
    assert_eq!(pids.len(), 3, "three nodes with their pids");

    let ep = |i: u16| format!("http://127.0.0.1:{}", base + i);
    let out = Command::new(HABAR)
        .args(["publish", "--endpoint", &ep(0), "--conversation", "demo", "--text", "hello from the test"])
        .output()
        .unwrap();
    assert!(out.status.success(), "publish: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("seq=1"), "{}", String::from_utf8_lossy(&out.stdout));
    let out = Command::new(HABAR).args(["read", "--endpoint", &ep(2), "--conversation", "demo"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("hello from the test"), "read: {text}");
    let out = Command::new(HABAR).args(["status", "--endpoint", &ep(1)]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("4 shards"));

    // Ctrl-C.
    unsafe {
        libc::kill(dev.id() as i32, libc::SIGINT);
    }
    let status = dev.wait().unwrap();
    assert!(status.success(), "habar dev exits cleanly on Ctrl-C");
    for pid in pids {
        assert!(!alive(pid), "node process {pid} still running after Ctrl-C");
    }
}
