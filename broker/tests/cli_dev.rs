//! `habar dev` end to end, as a new user runs it: start, publish and read with the CLI,
//! Ctrl-C, no node left running; then again on the same directory, and the cluster (with
//! its data) is back.

use std::io::BufRead;
use std::io::BufReader;
use std::path::Path;
use std::process::Child;
use std::process::Command;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

const HABAR: &str = env!("CARGO_BIN_EXE_habar");
/// Generous: three debug-build nodes electing 4 shards on a shared 2-core machine.
const READY_WITHIN: Duration = Duration::from_secs(120);

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
        .map(|s| s.split_whitespace().nth(2).is_none_or(|st| st != "Z"))
        .unwrap_or(false)
}

/// A running `habar dev`. Dropping it (e.g. when an assertion fails) SIGTERMs it, and it
/// stops its nodes, so a failed test leaves nothing running.
struct Dev {
    child: Child,
    lines: mpsc::Receiver<String>,
    /// Everything it printed so far, for failure messages.
    seen: Vec<String>,
}

impl Dev {
    fn start(dir: &Path, extra: &[&str]) -> Dev {
        let mut child = Command::new(HABAR)
            .args(["dev", "--data-dir", dir.to_str().unwrap(), "--shards", "4"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Dev { child, lines, seen: Vec::new() }
    }

    /// Waits for the ready banner; returns the nodes' pids.
    fn wait_ready(&mut self) -> Vec<u32> {
        let mut pids = Vec::new();
        let mut ready = false;
        loop {
            let line = self
                .lines
                .recv_timeout(READY_WITHIN)
                .unwrap_or_else(|e| panic!("habar dev: no ready banner ({e}); it printed: {:#?}", self.seen));
            self.seen.push(line.clone());
            ready |= line.starts_with("habar dev: ready");
            // "  node 1  http://127.0.0.1:7001  pid 1234  log ..."
            if line.starts_with("  node ") {
                let pid = line.split("  pid ").nth(1).and_then(|s| s.split_whitespace().next());
                pids.push(pid.and_then(|p| p.parse().ok()).unwrap_or_else(|| panic!("no pid in `{line}`")));
            }
            if line.starts_with("Ctrl-C stops") {
                break;
            }
        }
        assert!(ready, "habar dev printed a ready line: {:#?}", self.seen);
        pids
    }

    /// Ctrl-C; returns once it has exited, asserting it exited cleanly.
    fn interrupt(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGINT);
        }
        let status = self.child.wait().unwrap();
        assert!(status.success(), "habar dev exits cleanly on Ctrl-C: {status}; it printed: {:#?}", self.seen);
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on our own unreaped child.
            unsafe {
                libc::kill(self.child.id() as i32, libc::SIGTERM);
            }
            let _ = self.child.wait();
        }
    }
}

fn habar(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(HABAR).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// Property: `habar dev` starts a working cluster (a publish through one node is readable
/// through another), Ctrl-C stops every node it started, and running it again on the same
/// data dir brings back the same cluster with its data.
#[test]
fn habar_dev_serves_the_cli_stops_every_node_on_ctrl_c_and_restarts_the_same_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let base = free_base_port();
    let ep = |i: u16| format!("http://127.0.0.1:{}", base + i);

    let mut dev = Dev::start(dir.path(), &["--base-port", &base.to_string()]);
    let pids = dev.wait_ready();
    assert_eq!(pids.len(), 3, "three nodes with their pids: {:#?}", dev.seen);

    let (ok, out, err) =
        habar(&["publish", "--endpoint", &ep(0), "--conversation", "demo", "--text", "hello from the test"]);
    assert!(ok && out.contains("demo seq=1 "), "publish: {out} {err}");
    let (ok, out, err) = habar(&["read", "--endpoint", &ep(2), "--conversation", "demo"]);
    assert!(ok && out.contains("seq=1") && out.contains("hello from the test"), "read: {out} {err}");
    let (ok, out, err) = habar(&["status", "--endpoint", &ep(1)]);
    assert!(ok && out.contains("3 nodes and 4 shards"), "status: {out} {err}");

    dev.interrupt();
    for pid in &pids {
        assert!(!alive(*pid), "node process {pid} still running after Ctrl-C");
    }
    assert!(dir.path().join("n1.log").metadata().unwrap().len() > 0, "node output goes to n1.log");

    // Again, without --base-port: the saved layout is reused, and the data is still there.
    let mut dev = Dev::start(dir.path(), &[]);
    let pids = dev.wait_ready();
    assert_eq!(pids.len(), 3);
    assert!(dev.seen.iter().any(|l| l.contains("restarting 3 nodes")), "{:#?}", dev.seen);
    let (ok, out, err) = habar(&["publish", "--endpoint", &ep(1), "--conversation", "demo", "--text", "second"]);
    assert!(ok && out.contains("demo seq=2 "), "the conversation continues after a restart: {out} {err}");
    let (ok, out, err) = habar(&["read", "--endpoint", &ep(0), "--conversation", "demo"]);
    assert!(ok && out.contains("hello from the test") && out.contains("\"second\""), "read: {out} {err}");
    dev.interrupt();
    for pid in &pids {
        assert!(!alive(*pid), "node process {pid} still running after Ctrl-C");
    }
}
