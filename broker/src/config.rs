//! The node's settings: one typed struct, from (in increasing precedence) defaults, a
//! commented TOML file (`--config`), `HABAR_*` environment variables and command-line
//! flags; validated at start with errors naming the setting and the limit.
//!
//! `ops/habar.example.toml` documents every setting with its unit.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::path::PathBuf;

use serde::Deserialize;
use serde::Serialize;

/// A setting that is missing, malformed or out of its bounds.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("setting `{setting}`: {reason}")]
    Invalid { setting: &'static str, reason: String },
    #[error("reading config file {path}: {reason}")]
    File { path: PathBuf, reason: String },
}

fn invalid(setting: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { setting, reason: reason.into() }
}

/// Parses `1=127.0.0.1:7001,2=127.0.0.1:7002`.
pub fn parse_initial_cluster(s: &str) -> Result<BTreeMap<u64, String>, ConfigError> {
    let mut out = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part
            .split_once('=')
            .ok_or_else(|| invalid("initial_cluster", format!("`{part}` is not `<id>=<host:port>`")))?;
        let id: u64 = id.trim().parse().map_err(|_| {
            invalid("initial_cluster", format!("`{id}` in `{part}` is not a node id (a positive integer)"))
        })?;
        if id == 0 {
            return Err(invalid("initial_cluster", format!("node id 0 in `{part}` is reserved; ids start at 1")));
        }
        let addr = addr.trim();
        if addr.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok()).is_none() {
            return Err(invalid("initial_cluster", format!("`{addr}` in `{part}` is not `host:port`")));
        }
        if out.insert(id, addr.to_string()).is_some() {
            return Err(invalid("initial_cluster", format!("node id {id} appears twice")));
        }
    }
    Ok(out)
}

/// Every setting of a node. Units are in the names.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeConfig {
    pub id: u64,
    /// The one gRPC address for clients and peers.
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Used only when the node's storage is empty.
    pub initial_cluster: BTreeMap<u64, String>,
    /// Fixed at cluster creation.
    pub shards: u32,
    pub heartbeat_interval_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    pub install_snapshot_timeout_ms: u64,
    pub snapshot_logs_since_last: u64,
    pub max_in_snapshot_log_to_keep: u64,
    pub max_payload_entries: u64,
    pub sled_cache_capacity_bytes: u64,
    pub wal_segment_bytes: u64,
    pub max_ciphertext_bytes: usize,
    pub max_envelopes_per_request: usize,
    pub max_sender_bytes: usize,
    /// Largest encoded request a client may send (one Publish becomes at most one Raft
    /// entry per shard, which must fit a Raft message).
    pub max_request_bytes: usize,
    pub read_default_limit: u32,
    pub read_max_limit: u32,
    /// Deadline of a call whose client set none.
    pub request_timeout_ms: u64,
    /// `tracing` filter, e.g. `info` or `habar_broker=debug,openraft=warn`.
    pub log: String,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            id: 1,
            listen: SocketAddr::from(([127, 0, 0, 1], 7001)),
            data_dir: PathBuf::from("./habar-data"),
            initial_cluster: BTreeMap::new(),
            shards: 16,
            heartbeat_interval_ms: 50,
            election_timeout_min_ms: 300,
            election_timeout_max_ms: 600,
            install_snapshot_timeout_ms: 10_000,
            snapshot_logs_since_last: 20_000,
            max_in_snapshot_log_to_keep: 1_000,
            max_payload_entries: 300,
            sled_cache_capacity_bytes: 64 << 20,
            wal_segment_bytes: 64 << 20,
            max_ciphertext_bytes: 1 << 20,
            max_envelopes_per_request: 1000,
            max_sender_bytes: 1024,
            max_request_bytes: 16 << 20,
            read_default_limit: 100,
            read_max_limit: 1000,
            request_timeout_ms: 10_000,
            log: "info,openraft=warn".into(),
        }
    }
}

/// The same settings, each optional: one layer (file, or environment + flags).
#[derive(Debug, Clone, Default, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct ConfigLayer {
    /// This node's id (a positive integer, unique in the cluster).
    #[arg(long, env = "HABAR_ID")]
    pub id: Option<u64>,
    /// gRPC listen address (clients and peers), e.g. 127.0.0.1:7001.
    #[arg(long, env = "HABAR_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Directory of this node's WAL, state machine and snapshots.
    #[arg(long, env = "HABAR_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// `1=host:port,2=host:port,...`; used only when the storage is empty.
    #[arg(long, env = "HABAR_INITIAL_CLUSTER")]
    pub initial_cluster: Option<String>,
    /// Number of shards (Raft groups); fixed at cluster creation.
    #[arg(long, env = "HABAR_SHARDS")]
    pub shards: Option<u32>,
    #[arg(long, env = "HABAR_HEARTBEAT_INTERVAL_MS")]
    pub heartbeat_interval_ms: Option<u64>,
    #[arg(long, env = "HABAR_ELECTION_TIMEOUT_MIN_MS")]
    pub election_timeout_min_ms: Option<u64>,
    #[arg(long, env = "HABAR_ELECTION_TIMEOUT_MAX_MS")]
    pub election_timeout_max_ms: Option<u64>,
    #[arg(long, env = "HABAR_INSTALL_SNAPSHOT_TIMEOUT_MS")]
    pub install_snapshot_timeout_ms: Option<u64>,
    /// Build a snapshot after this many applied entries since the last one.
    #[arg(long, env = "HABAR_SNAPSHOT_LOGS_SINCE_LAST")]
    pub snapshot_logs_since_last: Option<u64>,
    /// Entries kept in the log behind a snapshot (for slow followers).
    #[arg(long, env = "HABAR_MAX_IN_SNAPSHOT_LOG_TO_KEEP")]
    pub max_in_snapshot_log_to_keep: Option<u64>,
    #[arg(long, env = "HABAR_MAX_PAYLOAD_ENTRIES")]
    pub max_payload_entries: Option<u64>,
    #[arg(long, env = "HABAR_SLED_CACHE_CAPACITY_BYTES")]
    pub sled_cache_capacity_bytes: Option<u64>,
    #[arg(long, env = "HABAR_WAL_SEGMENT_BYTES")]
    pub wal_segment_bytes: Option<u64>,
    #[arg(long, env = "HABAR_MAX_CIPHERTEXT_BYTES")]
    pub max_ciphertext_bytes: Option<usize>,
    #[arg(long, env = "HABAR_MAX_ENVELOPES_PER_REQUEST")]
    pub max_envelopes_per_request: Option<usize>,
    #[arg(long, env = "HABAR_MAX_SENDER_BYTES")]
    pub max_sender_bytes: Option<usize>,
    #[arg(long, env = "HABAR_MAX_REQUEST_BYTES")]
    pub max_request_bytes: Option<usize>,
    #[arg(long, env = "HABAR_READ_DEFAULT_LIMIT")]
    pub read_default_limit: Option<u32>,
    #[arg(long, env = "HABAR_READ_MAX_LIMIT")]
    pub read_max_limit: Option<u32>,
    #[arg(long, env = "HABAR_REQUEST_TIMEOUT_MS")]
    pub request_timeout_ms: Option<u64>,
    /// tracing filter (e.g. `info`, `habar_broker=debug`).
    #[arg(long, env = "HABAR_LOG")]
    pub log: Option<String>,
}

macro_rules! merge_fields {
    ($cfg:expr, $layer:expr; $($f:ident),*) => {
        $( if let Some(v) = $layer.$f { $cfg.$f = v; } )*
    };
}

impl NodeConfig {
    /// Applies one layer over this configuration.
    pub fn merge(&mut self, layer: ConfigLayer) -> Result<(), ConfigError> {
        if let Some(s) = &layer.initial_cluster {
            self.initial_cluster = parse_initial_cluster(s)?;
        }
        merge_fields!(self, layer; id, listen, data_dir, shards, heartbeat_interval_ms,
            election_timeout_min_ms, election_timeout_max_ms, install_snapshot_timeout_ms,
            snapshot_logs_since_last, max_in_snapshot_log_to_keep, max_payload_entries,
            sled_cache_capacity_bytes, wal_segment_bytes, max_ciphertext_bytes,
            max_envelopes_per_request, max_sender_bytes, max_request_bytes, read_default_limit, read_max_limit,
            request_timeout_ms, log);
        Ok(())
    }

    /// Defaults, then the TOML file if any, then `cli` (which clap filled from `HABAR_*`
    /// variables and flags, flags winning); then validation.
    pub fn load(file: Option<&Path>, cli: ConfigLayer) -> Result<Self, ConfigError> {
        let mut cfg = NodeConfig::default();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| ConfigError::File { path: path.to_path_buf(), reason: e.to_string() })?;
            let layer: ConfigLayer = toml::from_str(&text)
                .map_err(|e| ConfigError::File { path: path.to_path_buf(), reason: e.to_string() })?;
            cfg.merge(layer)?;
        }
        cfg.merge(cli)?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.id == 0 {
            return Err(invalid("id", "must be a positive integer"));
        }
        if !(1..=1024).contains(&self.shards) {
            return Err(invalid("shards", format!("{} is outside 1..=1024", self.shards)));
        }
        if self.heartbeat_interval_ms == 0 {
            return Err(invalid("heartbeat_interval_ms", "must be above 0"));
        }
        if self.election_timeout_min_ms <= self.heartbeat_interval_ms {
            return Err(invalid(
                "election_timeout_min_ms",
                format!(
                    "{} must be above heartbeat_interval_ms ({})",
                    self.election_timeout_min_ms, self.heartbeat_interval_ms
                ),
            ));
        }
        if self.election_timeout_max_ms <= self.election_timeout_min_ms {
            return Err(invalid(
                "election_timeout_max_ms",
                format!(
                    "{} must be above election_timeout_min_ms ({})",
                    self.election_timeout_max_ms, self.election_timeout_min_ms
                ),
            ));
        }
        if self.initial_cluster.is_empty() {
            return Err(invalid("initial_cluster", "is empty; give at least this node, e.g. `1=127.0.0.1:7001`"));
        }
        if !self.initial_cluster.contains_key(&self.id) {
            return Err(invalid("initial_cluster", format!("does not contain this node's id {}", self.id)));
        }
        if self.max_ciphertext_bytes == 0 || self.max_ciphertext_bytes > 32 << 20 {
            return Err(invalid(
                "max_ciphertext_bytes",
                format!("{} is outside 1..=33554432", self.max_ciphertext_bytes),
            ));
        }
        if self.max_envelopes_per_request == 0 || self.max_envelopes_per_request > 100_000 {
            return Err(invalid(
                "max_envelopes_per_request",
                format!("{} is outside 1..=100000", self.max_envelopes_per_request),
            ));
        }
        let cap = crate::raft_net::MAX_MESSAGE_BYTES / 2;
        if self.max_request_bytes < 1024 || self.max_request_bytes > cap {
            return Err(invalid("max_request_bytes", format!("{} is outside 1024..={cap}", self.max_request_bytes)));
        }
        if self.read_default_limit == 0 || self.read_default_limit > self.read_max_limit {
            return Err(invalid(
                "read_default_limit",
                format!("{} must be in 1..=read_max_limit ({})", self.read_default_limit, self.read_max_limit),
            ));
        }
        if self.wal_segment_bytes < 1 << 20 {
            return Err(invalid("wal_segment_bytes", format!("{} is below 1048576", self.wal_segment_bytes)));
        }
        if self.snapshot_logs_since_last == 0 {
            return Err(invalid("snapshot_logs_since_last", "must be above 0"));
        }
        if self.request_timeout_ms == 0 {
            return Err(invalid("request_timeout_ms", "must be above 0"));
        }
        Ok(())
    }

    /// Small, fast settings for in-process tests.
    pub fn for_test(id: u64, listen: SocketAddr, data_dir: PathBuf, initial_cluster: BTreeMap<u64, String>) -> Self {
        Self {
            id,
            listen,
            data_dir,
            initial_cluster,
            shards: 4,
            heartbeat_interval_ms: 50,
            election_timeout_min_ms: 300,
            election_timeout_max_ms: 600,
            sled_cache_capacity_bytes: 8 << 20,
            wal_segment_bytes: 4 << 20,
            request_timeout_ms: 15_000,
            ..Self::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(initial: &str) -> ConfigLayer {
        ConfigLayer { initial_cluster: Some(initial.into()), ..Default::default() }
    }

    #[test]
    fn file_then_environment_and_flags_take_precedence() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(
            &path,
            "id = 2\nshards = 8\nheartbeat_interval_ms = 70\ninitial_cluster = \"1=127.0.0.1:7001,2=127.0.0.1:7002\"\n",
        )
        .unwrap();
        let cli = ConfigLayer { shards: Some(4), ..Default::default() };
        let cfg = NodeConfig::load(Some(&path), cli).unwrap();
        assert_eq!(cfg.id, 2, "from the file");
        assert_eq!(cfg.heartbeat_interval_ms, 70, "from the file");
        assert_eq!(cfg.shards, 4, "the flag wins over the file");
        assert_eq!(cfg.election_timeout_min_ms, 300, "default");
        assert_eq!(cfg.initial_cluster.len(), 2);
    }

    /// The documented example must stay loadable and equal to the defaults it shows.
    #[test]
    fn the_example_file_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/habar.example.toml");
        let cfg = NodeConfig::load(Some(&path), ConfigLayer::default()).unwrap();
        let d = NodeConfig::default();
        assert_eq!(
            (cfg.shards, cfg.heartbeat_interval_ms, cfg.max_ciphertext_bytes),
            (d.shards, d.heartbeat_interval_ms, d.max_ciphertext_bytes)
        );
        assert_eq!(cfg.initial_cluster.len(), 3);
    }

    #[test]
    fn unknown_settings_in_the_file_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(&path, "heartbeat_ms = 5\n").unwrap();
        let err = NodeConfig::load(Some(&path), layer("1=127.0.0.1:1")).unwrap_err().to_string();
        assert!(err.contains("heartbeat_ms"), "{err}");
    }

    #[test]
    fn validation_names_the_setting_and_the_limit() {
        let cases: Vec<(ConfigLayer, &str)> = vec![
            (ConfigLayer { shards: Some(0), ..layer("1=a:1") }, "shards"),
            (ConfigLayer { shards: Some(5000), ..layer("1=a:1") }, "1..=1024"),
            (ConfigLayer { election_timeout_min_ms: Some(40), ..layer("1=a:1") }, "election_timeout_min_ms"),
            (
                ConfigLayer {
                    election_timeout_min_ms: Some(500),
                    election_timeout_max_ms: Some(400),
                    ..layer("1=a:1")
                },
                "election_timeout_max_ms",
            ),
            (layer("2=a:1"), "does not contain this node's id 1"),
            (layer("1=a"), "host:port"),
            (layer("x=a:1"), "not a node id"),
            (layer("1=a:1,1=b:2"), "twice"),
            (ConfigLayer { max_ciphertext_bytes: Some(0), ..layer("1=a:1") }, "max_ciphertext_bytes"),
        ];
        for (l, want) in cases {
            let err = NodeConfig::load(None, l).unwrap_err().to_string();
            assert!(err.contains(want), "expected `{want}` in `{err}`");
        }
    }
}
