//! A real chaos run: `habar-chaos` against a local 3-node cluster of real `habar serve`
//! processes, with every fault kind, must pass the checker.
//!
//! Ignored by default: it needs a built `habar` binary and takes about a minute (a
//! 20-second run, plus starting, healing, converging and reading back). Run it with
//!
//! ```text
//! cargo build --release --bin habar
//! HABAR_BIN=target/release/habar cargo test --release -p habar-loadtest --test chaos_e2e -- --ignored
//! ```
//!
//! Without `HABAR_BIN` it looks for `habar` next to `habar-chaos`.

use std::path::PathBuf;
use std::process::Command;

#[test]
#[ignore = "needs a built habar binary and about a minute; see the module docs"]
fn a_short_chaos_run_passes() {
    let chaos = PathBuf::from(env!("CARGO_BIN_EXE_habar-chaos"));
    let habar = std::env::var_os("HABAR_BIN").map(PathBuf::from).unwrap_or_else(|| chaos.with_file_name("habar"));
    assert!(habar.exists(), "no habar binary at {} (build it or set HABAR_BIN)", habar.display());
    let json = tempfile::NamedTempFile::new().expect("temp file");
    let status = Command::new(&chaos)
        .args(["--duration", "20s", "--seed", "1", "--faults", "all", "--habar-bin"])
        .arg(&habar)
        .arg("--json")
        .arg(json.path())
        .status()
        .expect("running habar-chaos");
    assert!(status.success(), "habar-chaos failed: {status}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(json.path()).expect("report")).expect("report JSON");
    assert_eq!(report["ok"], serde_json::Value::Bool(true));
    assert!(report["findings"]["acknowledged"].as_u64().unwrap_or(0) > 0, "nothing was acknowledged");
}
