//! The client commands fail with one clear line on stderr and a non-zero exit status:
//! local mistakes before any network traffic, connection failures naming the endpoint, and
//! server refusals with their gRPC code.

use std::collections::BTreeMap;
use std::process::Command;

use habar_broker::config::NodeConfig;

const HABAR: &str = env!("CARGO_BIN_EXE_habar");

/// Runs `habar args...`; returns (exit success, stdout, stderr).
fn habar(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(HABAR).args(args).env_remove("HABAR_ENDPOINT").output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

fn assert_one_error_line(ok: bool, stderr: &str, want: &[&str]) {
    assert!(!ok, "must exit non-zero; stderr: {stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    for w in want {
        assert!(stderr.contains(w), "expected `{w}` in `{stderr}`");
    }
}

/// An endpoint where nothing listens (bound, then released).
fn closed_endpoint() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    format!("http://{addr}")
}

#[test]
fn an_unreachable_node_is_an_error_naming_the_endpoint() {
    let ep = closed_endpoint();
    for cmd in [&["status"][..], &["read", "--conversation", "c"], &["publish", "--conversation", "c", "--text", "x"]] {
        let mut args = cmd.to_vec();
        args.extend(["--endpoint", &ep]);
        let (ok, _, err) = habar(&args);
        assert_one_error_line(ok, &err, &[&format!("connecting to {ep}"), "refused"]);
    }
}

#[test]
fn local_mistakes_are_reported_before_connecting() {
    // The endpoint is closed: the error must be about the argument, not the connection.
    let ep = closed_endpoint();
    let (ok, _, err) =
        habar(&["publish", "--endpoint", &ep, "--conversation", "c", "--text", "x", "--message-id", "zz"]);
    assert_one_error_line(ok, &err, &["--message-id must be 32 hex digits", "`zz`"]);
    let (ok, _, err) =
        habar(&["publish", "--endpoint", &ep, "--conversation", "c", "--file", "/nonexistent/ciphertext.bin"]);
    assert_one_error_line(ok, &err, &["opening /nonexistent/ciphertext.bin"]);
    let (ok, _, err) = habar(&["status", "--endpoint", "not a url"]);
    assert_one_error_line(ok, &err, &["--endpoint `not a url` is not a URL"]);
}

#[test]
fn a_refused_request_shows_the_grpc_code_and_the_servers_reason() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    let cfg = NodeConfig::for_test(1, addr, dir.path().to_path_buf(), BTreeMap::from([(1, addr.to_string())]));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = rt.spawn(habar_broker::server::serve(cfg, listener, async move {
        let _ = stop_rx.await;
    }));
    let ep = format!("http://{addr}");

    let (ok, _, err) = habar(&["read", "--endpoint", &ep, "--conversation", ""]);
    assert_one_error_line(ok, &err, &["gRPC InvalidArgument", "conversation_id is 0 bytes", "1..=256"]);
    let long = "c".repeat(300);
    let (ok, _, err) = habar(&["publish", "--endpoint", &ep, "--conversation", &long, "--text", "x"]);
    assert_one_error_line(ok, &err, &["gRPC InvalidArgument", "envelopes[0].conversation_id is 300 bytes"]);

    let _ = stop_tx.send(());
    rt.block_on(server).unwrap().unwrap();
}
