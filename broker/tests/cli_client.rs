//! The terminal client against a real one-node cluster (in this process, on a real socket):
//! publish from stdin and from a file, read back, follow with `tail` (backlog, then live)
//! and stop it with Ctrl-C.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::io::BufReader;
use std::io::Write;
use std::process::Command;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

use habar_broker::config::NodeConfig;

const HABAR: &str = env!("CARGO_BIN_EXE_habar");

struct Node {
    rt: tokio::runtime::Runtime,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    endpoint: String,
    _dir: tempfile::TempDir,
}

impl Node {
    fn start() -> Node {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        let cfg = NodeConfig::for_test(1, addr, dir.path().to_path_buf(), BTreeMap::from([(1, addr.to_string())]));
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = rt.spawn(habar_broker::server::serve(cfg, listener, async move {
            let _ = stop_rx.await;
        }));
        Node { rt, stop: Some(stop), server: Some(server), endpoint: format!("http://{addr}"), _dir: dir }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(h) = self.server.take() {
            let _ = self.rt.block_on(h);
        }
    }
}

fn habar(args: &[&str], stdin: &[u8]) -> (bool, String, String) {
    let mut child = Command::new(HABAR)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn publish_from_stdin_and_file_then_read_shows_seq_sender_size_and_preview() {
    let node = Node::start();
    let ep = node.endpoint.as_str();
    let (ok, out, err) =
        habar(&["publish", "--endpoint", ep, "--conversation", "room", "--sender", "alice"], b"hi there");
    assert!(ok && out.starts_with("room seq=1 "), "{out} {err}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ct.bin");
    std::fs::write(&file, [0xde, 0xad, 0xbe, 0xef]).unwrap();
    let (ok, out, err) = habar(
        &[
            "publish",
            "--endpoint",
            ep,
            "--conversation",
            "room",
            "--file",
            file.to_str().unwrap(),
            "--message-id",
            "000102030405060708090a0b0c0d0e0f",
        ],
        b"",
    );
    assert!(ok && out.contains("seq=2 message_id=000102030405060708090a0b0c0d0e0f"), "{out} {err}");

    let (ok, out, err) = habar(&["read", "--endpoint", ep, "--conversation", "room"], b"");
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "two envelopes and a summary: {out}");
    assert!(lines[0].starts_with("seq=1 ") && lines[0].contains("sender=alice") && lines[0].contains("8 bytes"));
    assert!(lines[0].contains("\"hi there\""), "{}", lines[0]);
    assert!(lines[1].starts_with("seq=2 ") && lines[1].contains("id=00010203") && lines[1].contains("0xdeadbeef"));
    assert!(lines[2].contains("2 envelopes") && lines[2].contains("last seq is 2"), "{}", lines[2]);

    let (ok, out, _) = habar(&["read", "--endpoint", ep, "--conversation", "room", "--from", "2", "--stale"], b"");
    assert!(ok && out.lines().count() == 2 && out.starts_with("seq=2 "), "{out}");
}

#[test]
fn tail_prints_the_backlog_then_new_envelopes_and_exits_cleanly_on_ctrl_c() {
    let node = Node::start();
    let ep = node.endpoint.as_str();
    let (ok, _, err) = habar(&["publish", "--endpoint", ep, "--conversation", "t", "--text", "before"], b"");
    assert!(ok, "{err}");

    let mut tail = Command::new(HABAR)
        .args(["tail", "--endpoint", ep, "--conversation", "t"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let out = tail.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let wait = Duration::from_secs(30);
    let first = rx.recv_timeout(wait).expect("the backlog");
    assert!(first.starts_with("seq=1 ") && first.contains("\"before\""), "{first}");

    let (ok, _, err) = habar(&["publish", "--endpoint", ep, "--conversation", "t", "--text", "after"], b"");
    assert!(ok, "{err}");
    let second = rx.recv_timeout(wait).expect("the live envelope");
    assert!(second.starts_with("seq=2 ") && second.contains("\"after\""), "{second}");

    // SAFETY: kill(2) on our own child.
    unsafe {
        libc::kill(tail.id() as i32, libc::SIGINT);
    }
    let status = tail.wait().unwrap();
    assert!(status.success(), "tail exits cleanly on Ctrl-C: {status}");
}
