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

/// `host:port` with a non-empty host and a port in 1..=65535 (`[::1]:7001` too).
fn is_host_port(s: &str) -> bool {
    s.rsplit_once(':').is_some_and(|(host, port)| {
        !host.is_empty() && !host.contains(char::is_whitespace) && port.parse::<u16>().is_ok_and(|p| p != 0)
    })
}

/// Parses `1=127.0.0.1:7001,2=127.0.0.1:7002`; errors name the bad part.
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
        if !is_host_port(addr) {
            return Err(invalid("initial_cluster", format!("`{addr}` in `{part}` is not `host:port`")));
        }
        if out.insert(id, addr.to_string()).is_some() {
            return Err(invalid("initial_cluster", format!("node id {id} appears twice")));
        }
    }
    Ok(out)
}

/// Formats a cluster map the way [`parse_initial_cluster`] reads it.
pub fn format_initial_cluster(m: &BTreeMap<u64, String>) -> String {
    m.iter().map(|(id, addr)| format!("{id}={addr}")).collect::<Vec<_>>().join(",")
}

/// `initial_cluster` is written as one `1=host:port,...` string in files, the environment
/// and flags alike (TOML has no integer keys).
mod cluster_string {
    use std::collections::BTreeMap;

    use serde::Deserialize;
    use serde::Deserializer;
    use serde::Serializer;

    pub fn serialize<S: Serializer>(m: &BTreeMap<u64, String>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_initial_cluster(m))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<u64, String>, D::Error> {
        let s = String::deserialize(d)?;
        super::parse_initial_cluster(&s).map_err(serde::de::Error::custom)
    }
}

/// A TOML error on one line: `line N: `<the line>`: <what is wrong>`.
fn toml_error(text: &str, e: &toml::de::Error) -> String {
    match e.span() {
        Some(span) => {
            let start = span.start.min(text.len());
            // Bytes, not a str slice: the span need not fall on a character boundary.
            let line_no = text.as_bytes()[..start].iter().filter(|&&b| b == b'\n').count() + 1;
            let line = text.lines().nth(line_no - 1).unwrap_or("").trim();
            format!("line {line_no}: `{line}`: {}", e.message())
        }
        None => e.message().to_string(),
    }
}

/// Every setting of a node. Units are in the names.
///
/// Serialized (e.g. by `habar serve --print-config`) it is a valid config file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub id: u64,
    /// The one gRPC address for clients and peers.
    pub listen: SocketAddr,
    /// The address peers and clients use to reach this node, when it differs from `listen`
    /// (e.g. listening on 0.0.0.0). See [`NodeConfig::advertise_addr`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise: Option<String>,
    /// Where to serve Prometheus metrics over HTTP (`GET /metrics`); none when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<SocketAddr>,
    pub data_dir: PathBuf,
    /// Used only when the node's storage is empty.
    #[serde(with = "cluster_string")]
    pub initial_cluster: BTreeMap<u64, String>,
    /// Fixed at cluster creation.
    pub shards: u32,
    pub heartbeat_interval_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    pub install_snapshot_timeout_ms: u64,
    pub snapshot_logs_since_last: u64,
    pub snapshot_growth_percent: u64,
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
    /// Bytes of publishes a node holds in progress (received, not yet answered), and again
    /// queued for its shards' Raft logs as a leader, before it refuses more with
    /// RESOURCE_EXHAUSTED (`admission.rs`).
    pub max_pending_publish_bytes: usize,
    pub read_default_limit: u32,
    pub read_max_limit: u32,
    /// Deadline of a call whose client set none.
    pub request_timeout_ms: u64,
    /// How long a (conversation_id, message_id) is remembered for idempotent publish, by
    /// the time in the log entries.
    pub dedupe_window_ms: u64,
    /// Period of the leader's housekeeping (expiry, retention, dedupe trimming).
    pub maintenance_interval_ms: u64,
    /// Most keys one housekeeping entry, erasure step or retention step removes (more
    /// follow at once if needed): smaller means shorter stalls of the node's other work and
    /// slower erasures (docs/BENCHMARKS.md).
    pub maintenance_max_removals: u32,
    /// Events a subscription stream buffers for its client.
    pub subscribe_buffer_events: usize,
    /// A subscription whose buffer stayed full this long ends with RESOURCE_EXHAUSTED.
    pub subscribe_stall_timeout_ms: u64,
    /// A subscription sends a keepalive event after this long without events.
    pub subscribe_keepalive_ms: u64,
    /// Most conversations on one SubscribeMany stream.
    pub subscribe_max_conversations: usize,
    /// Largest clock error the node tolerates in its estimate of the cluster's time
    /// (`clock.rs`): the bound on expiring early or late.
    pub max_clock_skew_ms: u64,
    /// Below this many free bytes in the data directory's file system the node takes no
    /// writes (`disk.rs`); 0 turns the guard off.
    pub min_free_disk_bytes: u64,
    /// A WAL fdatasync, a state-machine apply or a Raft entry's commit slower than this is
    /// logged as a warning (at most once a second per kind); 0 turns the warnings off.
    pub slow_warn_ms: u64,
    /// Threads that run the node's async work (gRPC, Raft); 0 = one per CPU core (or tokio's
    /// `TOKIO_WORKER_THREADS`). 1 runs it all on one thread (a current-thread runtime: no
    /// hand-over between workers), the choice when several nodes share a machine (`habar dev`
    /// and `habar-load --spawn` set it). Applies, checkpoints, snapshots and the WAL's group
    /// fdatasyncs have their own threads either way; the fdatasync that seals a full WAL
    /// segment (every `wal_segment_bytes`) runs in the appending task.
    pub worker_threads: usize,
    /// `tracing` filter, e.g. `info` or `habar_broker=debug,openraft=warn`.
    pub log: String,
    /// Test only: shifts this node's raw clock (a machine with a wrong clock).
    pub test_clock_offset_ms: i64,
    /// Test only: the WAL's power-loss model (writes no fsync covered are lost when the
    /// process dies, as in a power cut). Never in production: it holds writes in memory.
    pub test_lose_unsynced_wal_writes: bool,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            id: 1,
            listen: SocketAddr::from(([127, 0, 0, 1], 7001)),
            advertise: None,
            metrics_listen: None,
            data_dir: PathBuf::from("./habar-data"),
            initial_cluster: BTreeMap::new(),
            shards: 16,
            heartbeat_interval_ms: 50,
            election_timeout_min_ms: 300,
            election_timeout_max_ms: 600,
            install_snapshot_timeout_ms: 10_000,
            snapshot_logs_since_last: 20_000,
            snapshot_growth_percent: 100,
            max_in_snapshot_log_to_keep: 1_000,
            max_payload_entries: 300,
            sled_cache_capacity_bytes: habar_raft_store::sm::DEFAULT_CACHE_CAPACITY,
            wal_segment_bytes: 64 << 20,
            max_ciphertext_bytes: 1 << 20,
            max_envelopes_per_request: 1000,
            max_sender_bytes: 1024,
            max_request_bytes: 16 << 20,
            max_pending_publish_bytes: 32 << 20,
            read_default_limit: 100,
            read_max_limit: 1000,
            request_timeout_ms: 10_000,
            dedupe_window_ms: 24 * 3600 * 1000,
            maintenance_interval_ms: 1000,
            maintenance_max_removals: 10_000,
            subscribe_buffer_events: 1024,
            subscribe_stall_timeout_ms: 10_000,
            subscribe_keepalive_ms: 15_000,
            subscribe_max_conversations: 10_000,
            max_clock_skew_ms: 500,
            min_free_disk_bytes: 128 << 20,
            slow_warn_ms: 100,
            worker_threads: 0,
            log: "info,openraft=warn".into(),
            test_clock_offset_ms: 0,
            test_lose_unsynced_wal_writes: false,
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
    /// host:port peers and clients use to reach this node (default: its initial_cluster
    /// entry, else listen).
    #[arg(long, env = "HABAR_ADVERTISE")]
    pub advertise: Option<String>,
    /// HTTP address for Prometheus metrics (`GET /metrics`), e.g. 127.0.0.1:9101; off when unset.
    #[arg(long, env = "HABAR_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Directory of this node's WAL, state machine and snapshots.
    #[arg(long, env = "HABAR_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// `1=host:port,2=host:port,...`; used only when the storage is empty.
    #[arg(long, env = "HABAR_INITIAL_CLUSTER")]
    pub initial_cluster: Option<String>,
    /// Number of shards (Raft groups); fixed at cluster creation.
    #[arg(long, env = "HABAR_SHARDS")]
    pub shards: Option<u32>,
    /// Leader heartbeat period, ms (LAN 50; WAN ~2-3 x RTT).
    #[arg(long, env = "HABAR_HEARTBEAT_INTERVAL_MS")]
    pub heartbeat_interval_ms: Option<u64>,
    /// Lower bound of the randomized election timeout, ms; above the heartbeat.
    #[arg(long, env = "HABAR_ELECTION_TIMEOUT_MIN_MS")]
    pub election_timeout_min_ms: Option<u64>,
    /// Upper bound of the randomized election timeout, ms; above the minimum.
    #[arg(long, env = "HABAR_ELECTION_TIMEOUT_MAX_MS")]
    pub election_timeout_max_ms: Option<u64>,
    /// Time allowed for one snapshot transfer message, ms.
    #[arg(long, env = "HABAR_INSTALL_SNAPSHOT_TIMEOUT_MS")]
    pub install_snapshot_timeout_ms: Option<u64>,
    /// Build a snapshot after this many applied entries since the last one (at least).
    #[arg(long, env = "HABAR_SNAPSHOT_LOGS_SINCE_LAST")]
    pub snapshot_logs_since_last: Option<u64>,
    /// And only once the log since the last snapshot holds this percentage of that
    /// snapshot's size in bytes (0: on the entry count alone).
    #[arg(long, env = "HABAR_SNAPSHOT_GROWTH_PERCENT")]
    pub snapshot_growth_percent: Option<u64>,
    /// Entries kept in the log behind a snapshot (for slow followers).
    #[arg(long, env = "HABAR_MAX_IN_SNAPSHOT_LOG_TO_KEEP")]
    pub max_in_snapshot_log_to_keep: Option<u64>,
    /// Most log entries in one AppendEntries message.
    #[arg(long, env = "HABAR_MAX_PAYLOAD_ENTRIES")]
    pub max_payload_entries: Option<u64>,
    /// sled's page cache, bytes.
    #[arg(long, env = "HABAR_SLED_CACHE_CAPACITY_BYTES")]
    pub sled_cache_capacity_bytes: Option<u64>,
    /// Size at which a new WAL segment starts, bytes.
    #[arg(long, env = "HABAR_WAL_SEGMENT_BYTES")]
    pub wal_segment_bytes: Option<u64>,
    /// Largest ciphertext of one envelope, bytes.
    #[arg(long, env = "HABAR_MAX_CIPHERTEXT_BYTES")]
    pub max_ciphertext_bytes: Option<usize>,
    /// Most envelopes in one Publish.
    #[arg(long, env = "HABAR_MAX_ENVELOPES_PER_REQUEST")]
    pub max_envelopes_per_request: Option<usize>,
    /// Largest sender field of one envelope, bytes.
    #[arg(long, env = "HABAR_MAX_SENDER_BYTES")]
    pub max_sender_bytes: Option<usize>,
    /// Largest encoded client request, bytes.
    #[arg(long, env = "HABAR_MAX_REQUEST_BYTES")]
    pub max_request_bytes: Option<usize>,
    /// Bytes of publishes in progress on a node before it refuses more (RESOURCE_EXHAUSTED).
    #[arg(long, env = "HABAR_MAX_PENDING_PUBLISH_BYTES")]
    pub max_pending_publish_bytes: Option<usize>,
    /// Envelopes returned by a Read that asks for limit 0.
    #[arg(long, env = "HABAR_READ_DEFAULT_LIMIT")]
    pub read_default_limit: Option<u32>,
    /// Most envelopes returned by one Read (larger limits are capped).
    #[arg(long, env = "HABAR_READ_MAX_LIMIT")]
    pub read_max_limit: Option<u32>,
    /// Deadline of a call whose client set none, ms.
    #[arg(long, env = "HABAR_REQUEST_TIMEOUT_MS")]
    pub request_timeout_ms: Option<u64>,
    /// How long publish remembers a message_id (idempotency), ms of log time.
    #[arg(long, env = "HABAR_DEDUPE_WINDOW_MS")]
    pub dedupe_window_ms: Option<u64>,
    /// Period of the leader's housekeeping (expiry, retention, dedupe), ms.
    #[arg(long, env = "HABAR_MAINTENANCE_INTERVAL_MS")]
    pub maintenance_interval_ms: Option<u64>,
    /// Most keys one housekeeping entry, erasure step or retention step removes.
    #[arg(long, env = "HABAR_MAINTENANCE_MAX_REMOVALS")]
    pub maintenance_max_removals: Option<u32>,
    /// Events a subscription stream buffers for its client.
    #[arg(long, env = "HABAR_SUBSCRIBE_BUFFER_EVENTS")]
    pub subscribe_buffer_events: Option<usize>,
    /// A subscription whose buffer stays full this long ends (RESOURCE_EXHAUSTED), ms.
    #[arg(long, env = "HABAR_SUBSCRIBE_STALL_TIMEOUT_MS")]
    pub subscribe_stall_timeout_ms: Option<u64>,
    /// Keepalive event after this long without events on a subscription, ms.
    #[arg(long, env = "HABAR_SUBSCRIBE_KEEPALIVE_MS")]
    pub subscribe_keepalive_ms: Option<u64>,
    /// Most conversations on one SubscribeMany stream.
    #[arg(long, env = "HABAR_SUBSCRIBE_MAX_CONVERSATIONS")]
    pub subscribe_max_conversations: Option<usize>,
    /// Bound on the node's clock error against the cluster's median clock, ms.
    #[arg(long, env = "HABAR_MAX_CLOCK_SKEW_MS")]
    pub max_clock_skew_ms: Option<u64>,
    /// Free bytes below which the node takes no writes (0: off).
    #[arg(long, env = "HABAR_MIN_FREE_DISK_BYTES")]
    pub min_free_disk_bytes: Option<u64>,
    /// Warn of an fdatasync, apply or commit slower than this, ms (0: off).
    #[arg(long, env = "HABAR_SLOW_WARN_MS")]
    pub slow_warn_ms: Option<u64>,
    /// Threads for the node's async work (0: one per core; 1: one thread for all, best when
    /// several nodes share a machine).
    #[arg(long, env = "HABAR_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
    /// tracing filter (e.g. `info`, `habar_broker=debug`).
    #[arg(long, env = "HABAR_LOG")]
    pub log: Option<String>,
    /// TEST ONLY: shift this node's clock by this many ms (fault tests).
    #[arg(long, env = "HABAR_TEST_CLOCK_OFFSET_MS", hide = true, allow_hyphen_values = true)]
    pub test_clock_offset_ms: Option<i64>,
    /// TEST ONLY: lose WAL writes no fsync covered when the process dies (power-loss model).
    #[arg(long, env = "HABAR_TEST_LOSE_UNSYNCED_WAL_WRITES", hide = true, num_args = 0..=1, default_missing_value = "true")]
    pub test_lose_unsynced_wal_writes: Option<bool>,
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
        if let Some(a) = layer.advertise {
            self.advertise = Some(a);
        }
        if let Some(m) = layer.metrics_listen {
            self.metrics_listen = Some(m);
        }
        merge_fields!(self, layer; id, listen, data_dir, shards, heartbeat_interval_ms,
            election_timeout_min_ms, election_timeout_max_ms, install_snapshot_timeout_ms,
            snapshot_logs_since_last, snapshot_growth_percent, max_in_snapshot_log_to_keep, max_payload_entries,
            sled_cache_capacity_bytes, wal_segment_bytes, max_ciphertext_bytes,
            max_envelopes_per_request, max_sender_bytes, max_request_bytes, max_pending_publish_bytes, read_default_limit,
            read_max_limit, request_timeout_ms, dedupe_window_ms, maintenance_interval_ms, maintenance_max_removals,
            subscribe_buffer_events, subscribe_stall_timeout_ms, subscribe_keepalive_ms,
            subscribe_max_conversations, max_clock_skew_ms, min_free_disk_bytes, slow_warn_ms, worker_threads, log, test_clock_offset_ms,
            test_lose_unsynced_wal_writes);
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
                .map_err(|e| ConfigError::File { path: path.to_path_buf(), reason: toml_error(&text, &e) })?;
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
        let Some(own) = self.initial_cluster.get(&self.id) else {
            return Err(invalid(
                "initial_cluster",
                format!(
                    "`{}` does not contain this node's id {}",
                    format_initial_cluster(&self.initial_cluster),
                    self.id
                ),
            ));
        };
        if self.metrics_listen.is_some_and(|m| m == self.listen) {
            return Err(invalid(
                "metrics_listen",
                format!("{} is the gRPC listen address; use another port", self.listen),
            ));
        }
        if let Some(a) = &self.advertise {
            if !is_host_port(a) {
                return Err(invalid("advertise", format!("`{a}` is not `host:port`")));
            }
            // Peers dial the initial_cluster entry; a different advertised address would
            // mean clients and peers disagree on where this node is.
            if a != own {
                return Err(invalid(
                    "advertise",
                    format!("`{a}` differs from this node's initial_cluster entry `{}={own}`", self.id),
                ));
            }
        }
        if self.worker_threads > 1024 {
            return Err(invalid("worker_threads", format!("{} is outside 0..=1024", self.worker_threads)));
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
        if self.max_pending_publish_bytes < self.max_request_bytes || self.max_pending_publish_bytes > u32::MAX as usize
        {
            return Err(invalid(
                "max_pending_publish_bytes",
                format!(
                    "{} is outside max_request_bytes ({})..={}: the node must be able to take one request",
                    self.max_pending_publish_bytes,
                    self.max_request_bytes,
                    u32::MAX
                ),
            ));
        }
        if self.max_ciphertext_bytes >= self.max_request_bytes {
            return Err(invalid(
                "max_ciphertext_bytes",
                format!(
                    "{} must be below max_request_bytes ({}), or no envelope that large could be sent",
                    self.max_ciphertext_bytes, self.max_request_bytes
                ),
            ));
        }
        if self.max_sender_bytes == 0 || self.max_sender_bytes > 64 << 10 {
            return Err(invalid("max_sender_bytes", format!("{} is outside 1..=65536", self.max_sender_bytes)));
        }
        if self.dedupe_window_ms < 1000 {
            return Err(invalid("dedupe_window_ms", format!("{} is below 1000", self.dedupe_window_ms)));
        }
        if !(10..=3_600_000).contains(&self.maintenance_interval_ms) {
            return Err(invalid(
                "maintenance_interval_ms",
                format!("{} is outside 10..=3600000", self.maintenance_interval_ms),
            ));
        }
        if self.slow_warn_ms > 600_000 {
            return Err(invalid(
                "slow_warn_ms",
                format!("{} is above 600000 (use 0 to turn the warnings off)", self.slow_warn_ms),
            ));
        }
        if !(1..=1_000_000).contains(&self.maintenance_max_removals) {
            return Err(invalid(
                "maintenance_max_removals",
                format!("{} is outside 1..=1000000", self.maintenance_max_removals),
            ));
        }
        if !(1..=1_000_000).contains(&self.subscribe_buffer_events) {
            return Err(invalid(
                "subscribe_buffer_events",
                format!("{} is outside 1..=1000000", self.subscribe_buffer_events),
            ));
        }
        if self.subscribe_stall_timeout_ms == 0 {
            return Err(invalid("subscribe_stall_timeout_ms", "must be above 0"));
        }
        if self.subscribe_keepalive_ms < 100 {
            return Err(invalid("subscribe_keepalive_ms", format!("{} is below 100", self.subscribe_keepalive_ms)));
        }
        if !(10..=60_000).contains(&self.max_clock_skew_ms) {
            return Err(invalid("max_clock_skew_ms", format!("{} is outside 10..=60000", self.max_clock_skew_ms)));
        }
        if self.test_clock_offset_ms.unsigned_abs() > 24 * 3600 * 1000 {
            return Err(invalid("test_clock_offset_ms", "is over a day either way"));
        }
        if !(1..=1_000_000).contains(&self.subscribe_max_conversations) {
            return Err(invalid(
                "subscribe_max_conversations",
                format!("{} is outside 1..=1000000", self.subscribe_max_conversations),
            ));
        }
        if self.read_max_limit == 0 || self.read_max_limit > 100_000 {
            return Err(invalid("read_max_limit", format!("{} is outside 1..=100000", self.read_max_limit)));
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
        if self.sled_cache_capacity_bytes < 1 << 20 {
            return Err(invalid(
                "sled_cache_capacity_bytes",
                format!("{} is below 1048576", self.sled_cache_capacity_bytes),
            ));
        }
        if self.max_payload_entries == 0 {
            return Err(invalid("max_payload_entries", "must be above 0"));
        }
        if self.install_snapshot_timeout_ms == 0 {
            return Err(invalid("install_snapshot_timeout_ms", "must be above 0"));
        }
        if self.snapshot_logs_since_last == 0 {
            return Err(invalid("snapshot_logs_since_last", "must be above 0"));
        }
        if self.snapshot_growth_percent > 10_000 {
            return Err(invalid(
                "snapshot_growth_percent",
                format!("{} is outside 0..=10000", self.snapshot_growth_percent),
            ));
        }
        if self.request_timeout_ms == 0 {
            return Err(invalid("request_timeout_ms", "must be above 0"));
        }
        Ok(())
    }

    /// The address peers and clients use to reach this node: `advertise`, else this node's
    /// `initial_cluster` entry, else `listen`.
    pub fn advertise_addr(&self) -> String {
        self.advertise
            .clone()
            .or_else(|| self.initial_cluster.get(&self.id).cloned())
            .unwrap_or_else(|| self.listen.to_string())
    }

    /// The configuration as a TOML config file (what `habar serve --print-config` shows).
    pub fn to_toml(&self) -> Result<String, ConfigError> {
        toml::to_string(self).map_err(|e| invalid("(all)", format!("cannot be written as TOML: {e}")))
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
            min_free_disk_bytes: 1 << 20,
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

    /// (Environment variables are tested through the binary in `tests/config_precedence.rs`,
    /// which does not have to change this process's environment.)
    #[test]
    fn flags_take_precedence_over_the_file_which_takes_precedence_over_defaults() {
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
    fn the_example_file_loads_and_shows_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/habar.example.toml");
        let cfg = NodeConfig::load(Some(&path), ConfigLayer::default()).unwrap();
        let want = NodeConfig {
            initial_cluster: parse_initial_cluster("1=127.0.0.1:7001,2=127.0.0.1:7002,3=127.0.0.1:7003").unwrap(),
            ..NodeConfig::default()
        };
        assert_eq!(cfg, want);
    }

    #[test]
    fn printed_config_loads_back_to_the_same_config() {
        let mut cfg = NodeConfig::for_test(
            3,
            "0.0.0.0:7003".parse().unwrap(),
            PathBuf::from("/var/lib/habar"),
            parse_initial_cluster("1=a:7001,2=b:7002,3=c:7003").unwrap(),
        );
        cfg.advertise = Some("c:7003".into());
        cfg.log = "debug".into();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("printed.toml");
        std::fs::write(&path, cfg.to_toml().unwrap()).unwrap();
        assert_eq!(NodeConfig::load(Some(&path), ConfigLayer::default()).unwrap(), cfg);
        // NodeConfig also reads its own output directly.
        let direct: NodeConfig = toml::from_str(&cfg.to_toml().unwrap()).unwrap();
        assert_eq!(direct, cfg);
    }

    #[test]
    fn unknown_settings_in_the_file_are_errors_naming_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(&path, "heartbeat_ms = 5\n").unwrap();
        let err = NodeConfig::load(Some(&path), layer("1=127.0.0.1:1")).unwrap_err().to_string();
        assert!(err.contains("heartbeat_ms") && err.contains("node.toml"), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }

    #[test]
    fn a_malformed_value_in_the_file_is_an_error_naming_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(&path, "id = 1\n# a comment\nlisten = \"nope\"\n").unwrap();
        let err = NodeConfig::load(Some(&path), layer("1=127.0.0.1:1")).unwrap_err().to_string();
        assert!(err.contains("line 3: `listen = \"nope\"`: invalid socket address"), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }

    #[test]
    fn a_missing_config_file_is_an_error_naming_the_path() {
        let err = NodeConfig::load(Some(Path::new("/nonexistent/habar.toml")), layer("1=a:1")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/habar.toml"), "{err}");
    }

    #[test]
    fn validation_names_the_setting_and_the_limit() {
        let cases: Vec<(ConfigLayer, &str)> = vec![
            (ConfigLayer { id: Some(0), ..layer("1=a:1") }, "setting `id`"),
            (ConfigLayer { shards: Some(0), ..layer("1=a:1") }, "setting `shards`: 0 is outside 1..=1024"),
            (ConfigLayer { shards: Some(5000), ..layer("1=a:1") }, "5000 is outside 1..=1024"),
            (
                ConfigLayer { election_timeout_min_ms: Some(40), ..layer("1=a:1") },
                "setting `election_timeout_min_ms`: 40 must be above heartbeat_interval_ms (50)",
            ),
            (
                ConfigLayer {
                    election_timeout_min_ms: Some(500),
                    election_timeout_max_ms: Some(400),
                    ..layer("1=a:1")
                },
                "setting `election_timeout_max_ms`: 400 must be above election_timeout_min_ms (500)",
            ),
            (ConfigLayer { heartbeat_interval_ms: Some(0), ..layer("1=a:1") }, "heartbeat_interval_ms"),
            (
                ConfigLayer { worker_threads: Some(2000), ..layer("1=a:1") },
                "setting `worker_threads`: 2000 is outside 0..=1024",
            ),
            (layer(""), "setting `initial_cluster`: is empty"),
            (layer("2=a:1"), "`2=a:1` does not contain this node's id 1"),
            (layer("1=a"), "`a` in `1=a` is not `host:port`"),
            (layer("1=a:0"), "is not `host:port`"),
            (layer("1=:7001"), "is not `host:port`"),
            (layer("1=a:1,2"), "`2` is not `<id>=<host:port>`"),
            (layer("x=a:1"), "`x` in `x=a:1` is not a node id"),
            (layer("0=a:1"), "node id 0"),
            (layer("1=a:1,1=b:2"), "node id 1 appears twice"),
            (ConfigLayer { advertise: Some("b:2".into()), ..layer("1=a:1") }, "setting `advertise`: `b:2` differs"),
            (ConfigLayer { advertise: Some("nope".into()), ..layer("1=a:1") }, "`nope` is not `host:port`"),
            (ConfigLayer { max_ciphertext_bytes: Some(0), ..layer("1=a:1") }, "setting `max_ciphertext_bytes`"),
            (
                ConfigLayer { max_ciphertext_bytes: Some(20 << 20), ..layer("1=a:1") },
                "must be below max_request_bytes (16777216)",
            ),
            (ConfigLayer { max_envelopes_per_request: Some(0), ..layer("1=a:1") }, "max_envelopes_per_request"),
            (ConfigLayer { max_request_bytes: Some(10), ..layer("1=a:1") }, "setting `max_request_bytes`"),
            (
                ConfigLayer { max_pending_publish_bytes: Some(1 << 20), ..layer("1=a:1") },
                "setting `max_pending_publish_bytes`: 1048576 is outside max_request_bytes (16777216)",
            ),
            (ConfigLayer { max_sender_bytes: Some(0), ..layer("1=a:1") }, "setting `max_sender_bytes`"),
            (ConfigLayer { read_max_limit: Some(0), ..layer("1=a:1") }, "setting `read_max_limit`"),
            (
                ConfigLayer { read_default_limit: Some(2000), ..layer("1=a:1") },
                "setting `read_default_limit`: 2000 must be in 1..=read_max_limit (1000)",
            ),
            (ConfigLayer { wal_segment_bytes: Some(4096), ..layer("1=a:1") }, "setting `wal_segment_bytes`"),
            (ConfigLayer { sled_cache_capacity_bytes: Some(1), ..layer("1=a:1") }, "sled_cache_capacity_bytes"),
            (ConfigLayer { max_payload_entries: Some(0), ..layer("1=a:1") }, "max_payload_entries"),
            (ConfigLayer { install_snapshot_timeout_ms: Some(0), ..layer("1=a:1") }, "install_snapshot_timeout_ms"),
            (ConfigLayer { snapshot_logs_since_last: Some(0), ..layer("1=a:1") }, "snapshot_logs_since_last"),
            (
                ConfigLayer { snapshot_growth_percent: Some(10_001), ..layer("1=a:1") },
                "setting `snapshot_growth_percent`: 10001 is outside 0..=10000",
            ),
            (ConfigLayer { request_timeout_ms: Some(0), ..layer("1=a:1") }, "request_timeout_ms"),
        ];
        for (l, want) in cases {
            let err = NodeConfig::load(None, l).unwrap_err().to_string();
            assert!(err.contains(want), "expected `{want}` in `{err}`");
        }
    }

    #[test]
    fn a_cluster_spec_parses_with_spaces_and_ipv6() {
        let m = parse_initial_cluster(" 1=127.0.0.1:7001 , 2=[::1]:7002,3=node-3.example:7003,").unwrap();
        assert_eq!(m.get(&2).map(String::as_str), Some("[::1]:7002"));
        assert_eq!(m.len(), 3);
        assert_eq!(format_initial_cluster(&m), "1=127.0.0.1:7001,2=[::1]:7002,3=node-3.example:7003");
    }

    #[test]
    fn advertised_address_defaults_to_the_cluster_entry_then_listen() {
        let mut cfg = NodeConfig::for_test(
            2,
            "0.0.0.0:7002".parse().unwrap(),
            PathBuf::from("d"),
            parse_initial_cluster("1=h1:7001,2=h2:7002").unwrap(),
        );
        assert_eq!(cfg.advertise_addr(), "h2:7002");
        cfg.initial_cluster.clear();
        assert_eq!(cfg.advertise_addr(), "0.0.0.0:7002");
        cfg.advertise = Some("h2:7002".into());
        assert_eq!(cfg.advertise_addr(), "h2:7002");
    }

    #[test]
    fn the_test_settings_are_valid() {
        let cfg = NodeConfig::for_test(
            1,
            "127.0.0.1:0".parse().unwrap(),
            PathBuf::from("d"),
            parse_initial_cluster("1=127.0.0.1:1").unwrap(),
        );
        cfg.validate().unwrap();
        NodeConfig { initial_cluster: cfg.initial_cluster.clone(), ..NodeConfig::default() }.validate().unwrap();
    }
}
