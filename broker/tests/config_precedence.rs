//! The node's settings as the `habar` binary resolves them, through
//! `habar serve --print-config` (which prints the effective settings and exits without
//! binding or touching the data dir): defaults < file < `HABAR_*` environment < flags.
//! Each run gets its own environment, so nothing here changes the test process's.

use std::process::Command;

use habar_broker::config::ConfigLayer;
use habar_broker::config::NodeConfig;

const HABAR: &str = env!("CARGO_BIN_EXE_habar");

/// `habar serve --print-config` with `args` and exactly the `HABAR_*` variables in `env`.
fn print_config(args: &[&str], env: &[(&str, &str)]) -> Result<NodeConfig, String> {
    let mut cmd = Command::new(HABAR);
    cmd.arg("serve").arg("--print-config").args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("HABAR_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied());
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    if !out.status.success() {
        return Err(stderr);
    }
    toml::from_str(&String::from_utf8_lossy(&out.stdout)).map_err(|e| format!("printed config does not parse: {e}"))
}

#[test]
fn file_then_environment_then_flags_each_override_the_one_before() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("node.toml");
    std::fs::write(
        &file,
        "id = 2\n\
         initial_cluster = \"1=127.0.0.1:7001,2=127.0.0.1:7002\"\n\
         shards = 8\n\
         heartbeat_interval_ms = 70\n\
         election_timeout_min_ms = 700\n\
         election_timeout_max_ms = 2000\n\
         read_max_limit = 500\n\
         worker_threads = 4\n",
    )
    .unwrap();
    let f = file.to_str().unwrap();
    let cfg = print_config(
        &["--config", f, "--election-timeout-min-ms", "900"],
        &[
            ("HABAR_ELECTION_TIMEOUT_MIN_MS", "800"),
            ("HABAR_HEARTBEAT_INTERVAL_MS", "80"),
            ("HABAR_SHARDS", "4"),
            // What habar-load --spawn sets for its nodes.
            ("HABAR_WORKER_THREADS", "1"),
        ],
    )
    .unwrap();
    assert_eq!(cfg.worker_threads, 1, "environment over file");
    assert_eq!(cfg.id, 2, "file over default");
    assert_eq!(cfg.read_max_limit, 500, "file over default");
    assert_eq!(cfg.shards, 4, "environment over file");
    assert_eq!(cfg.heartbeat_interval_ms, 80, "environment over file");
    assert_eq!(cfg.election_timeout_min_ms, 900, "flag over environment over file");
    assert_eq!(cfg.election_timeout_max_ms, 2000, "file over default");
    assert_eq!(cfg.wal_segment_bytes, NodeConfig::default().wal_segment_bytes, "default");
    assert_eq!(cfg.listen, NodeConfig::default().listen, "default");
}

#[test]
fn the_config_file_can_come_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("node.toml");
    std::fs::write(&file, "initial_cluster = \"1=127.0.0.1:7001\"\nshards = 3\n").unwrap();
    let cfg = print_config(&[], &[("HABAR_CONFIG", file.to_str().unwrap())]).unwrap();
    assert_eq!(cfg.shards, 3);
}

#[test]
fn printed_settings_are_a_config_file_that_loads_to_the_same_settings() {
    let cfg = print_config(
        &["--id", "3", "--initial-cluster", "1=a:1,2=b:2,3=c:3", "--listen", "0.0.0.0:7003", "--advertise", "c:3"],
        &[("HABAR_LOG", "debug")],
    )
    .unwrap();
    assert_eq!((cfg.id, cfg.advertise.as_deref(), cfg.log.as_str()), (3, Some("c:3"), "debug"));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("printed.toml");
    std::fs::write(&file, toml::to_string(&cfg).unwrap()).unwrap();
    assert_eq!(NodeConfig::load(Some(&file), ConfigLayer::default()).unwrap(), cfg);
}

/// Flags, environment variables, and the text the error must contain.
type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);

#[test]
fn invalid_settings_fail_the_start_with_one_line_naming_the_setting_and_the_limit() {
    let cases: &[Case] = &[
        (&["--initial-cluster", "1=a:1", "--shards", "2000"], &[], "setting `shards`: 2000 is outside 1..=1024"),
        (
            &["--initial-cluster", "1=a:1"],
            &[("HABAR_ELECTION_TIMEOUT_MIN_MS", "700"), ("HABAR_ELECTION_TIMEOUT_MAX_MS", "600")],
            "setting `election_timeout_max_ms`: 600 must be above election_timeout_min_ms (700)",
        ),
        (&["--id", "4", "--initial-cluster", "1=a:1,2=b:2"], &[], "does not contain this node's id 4"),
        (&["--initial-cluster", "1=a:1,two=b:2"], &[], "`two` in `two=b:2` is not a node id"),
        (&[], &[], "setting `initial_cluster`: is empty"),
        (
            &["--initial-cluster", "1=a:1"],
            &[("HABAR_SLOW_WARN_MS", "700000")],
            "setting `slow_warn_ms`: 700000 is above 600000 (use 0 to turn the warnings off)",
        ),
    ];
    for (args, env, want) in cases {
        let err = print_config(args, env).unwrap_err();
        assert!(err.contains(want), "expected `{want}` in `{err}`");
        assert_eq!(err.trim_end().lines().count(), 1, "one line: `{err}`");
        assert!(err.starts_with("error: "), "{err}");
    }
    // A malformed value is refused by the flag parser, naming the flag or variable.
    let err = print_config(&["--initial-cluster", "1=a:1"], &[("HABAR_LISTEN", "not-an-address")]).unwrap_err();
    assert!(err.contains("--listen") && err.contains("not-an-address"), "{err}");
}
