//! The `habar` binary: `serve`, `dev`, and a small client for people at a terminal
//! (`publish`, `read`, `tail`, `status`) that talks to any node through `habar-client` (leader
//! routing, retries with the same message id, subscriptions that resume by themselves).
//!
//! Every failure ends the process with one line on stderr (`error: ...`, with the gRPC
//! code when the server answered) and a non-zero exit status.

use std::future::Future;
use std::io::Read as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use clap::Subcommand;
use habar_proto::v1 as pb;
use habar_proto::v1::cluster_client::ClusterClient;
use tonic::transport::Channel;
use tonic::transport::Endpoint;

use crate::config::ConfigLayer;
use crate::config::NodeConfig;

/// The largest ciphertext `publish` reads from a file or stdin: the largest any node can be
/// configured to accept (see `max_ciphertext_bytes`).
pub const MAX_PUBLISH_INPUT_BYTES: u64 = 32 << 20;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes of ciphertext shown by `read` and `tail`.
const PREVIEW_BYTES: usize = 24;

#[derive(Debug, Parser)]
#[command(name = "habar", version, about = "Habar: a replicated message broker for end-to-end-encrypted envelopes")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Cmd,
}

/// Where and how long the client commands talk to a node.
#[derive(Debug, Clone, clap::Args)]
pub struct ClientArgs {
    /// Any node of the cluster; calls are forwarded to the right shard leader.
    #[arg(long, env = "HABAR_ENDPOINT", default_value = "http://127.0.0.1:7001")]
    pub endpoint: String,
    /// Deadline of the call, seconds (sent to the server as grpc-timeout).
    #[arg(long, default_value_t = 30)]
    pub timeout_s: u64,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Run one node.
    Serve {
        /// A TOML file of settings (see ops/habar.example.toml).
        #[arg(long, env = "HABAR_CONFIG")]
        config: Option<PathBuf>,
        /// Print the settings this node would use (defaults < file < HABAR_* < flags) as
        /// TOML and exit, without binding or touching the data dir.
        #[arg(long)]
        print_config: bool,
        #[command(flatten)]
        settings: Box<ConfigLayer>,
    },
    /// Start a local cluster of child processes (3 nodes on loopback) and stop it on Ctrl-C.
    Dev(crate::dev::DevArgs),
    /// Publish one envelope; prints the seq it got.
    Publish {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        conversation: String,
        /// 32 hex digits (the idempotency key); random when absent.
        #[arg(long)]
        message_id: Option<String>,
        #[arg(long, default_value = "")]
        sender: String,
        /// The ciphertext as text (for trying things out).
        #[arg(long, conflicts_with = "file")]
        text: Option<String>,
        /// Read the ciphertext from this file. Without --text and --file, from stdin.
        #[arg(long)]
        file: Option<PathBuf>,
        /// Unix ms after which the envelope must not be delivered (0 = never).
        #[arg(long, default_value_t = 0)]
        expires_at_ms: u64,
    },
    /// Read a conversation: envelopes from a seq on, up to a limit.
    Read {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        conversation: String,
        #[arg(long, default_value_t = 1)]
        from: u64,
        /// 0 = the server's default; the server caps it at its maximum.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Serve from the connected node's replica without a read-index check.
        #[arg(long)]
        stale: bool,
        /// Newest first (a chat opening at its last envelopes); page up with --before.
        #[arg(long)]
        backward: bool,
        /// With --backward: only seqs below this one (0 = from the newest).
        #[arg(long, default_value_t = 0)]
        before: u64,
    },
    /// Follow a conversation: its backlog, then each new envelope as it commits. Ctrl-C ends it.
    Tail {
        /// Any node of the cluster.
        #[arg(long, env = "HABAR_ENDPOINT", default_value = "http://127.0.0.1:7001")]
        endpoint: String,
        #[arg(long)]
        conversation: String,
        #[arg(long, default_value_t = 1)]
        from: u64,
    },
    /// Show the cluster as one node sees it: nodes and their liveness, each shard's leader
    /// and progress.
    Status {
        #[command(flatten)]
        client: ClientArgs,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        // A node's runtime follows its settings (`worker_threads`): they are loaded first.
        Cmd::Serve { config, print_config, settings } => NodeConfig::load(config.as_deref(), *settings)
            .map_err(anyhow::Error::from)
            .and_then(|cfg| runtime(cfg.worker_threads)?.block_on(serve(cfg, print_config))),
        command => runtime(0).and_then(|rt| rt.block_on(run(Cli { command }))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` joins the context chain into one line; keep it one line even if a
            // message carries a newline.
            eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

/// The tokio runtime: `worker_threads` threads (0: one per CPU core), or with 1 a
/// current-thread runtime, which runs every task on the calling thread (no hand-over
/// between workers: the fewest thread switches per request).
fn runtime(worker_threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut b = match worker_threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        0 => tokio::runtime::Builder::new_multi_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
    };
    b.enable_all().build().map_err(|e| anyhow::anyhow!("starting the runtime: {e}"))
}

/// Resolves on Ctrl-C (SIGINT) or SIGTERM. The handlers are installed when this is called
/// (not when first polled), so a signal that arrives before the first poll is not lost and
/// does not kill the process. Call it inside the runtime.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::signal;
        use tokio::signal::unix::SignalKind;
        let int = signal(SignalKind::interrupt());
        let term = signal(SignalKind::terminate());
        async move {
            match (int, term) {
                (Ok(mut int), Ok(mut term)) => {
                    tokio::select! {
                        _ = int.recv() => {}
                        _ = term.recv() => {}
                    }
                }
                // Could not install the handlers: fall back to Ctrl-C alone.
                _ => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// An error and its sources on one line (`transport error: tcp connect error: ...`).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let s_text = s.to_string();
        // Some layers repeat their source's text; print it once.
        if !out.ends_with(&s_text) {
            out.push_str(": ");
            out.push_str(&s_text);
        }
        src = s.source();
    }
    out
}

/// A gRPC error as one line with its code.
fn status_err(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("gRPC {:?}: {}", s.code(), s.message())
}

async fn connect(endpoint: &str, timeout: Option<Duration>) -> anyhow::Result<Channel> {
    let mut ep = Endpoint::from_shared(endpoint.to_string())
        .map_err(|e| anyhow::anyhow!("--endpoint `{endpoint}` is not a URL like http://127.0.0.1:7001 ({e})"))?
        .connect_timeout(CONNECT_TIMEOUT);
    if let Some(t) = timeout {
        ep = ep.timeout(t);
    }
    ep.connect().await.map_err(|e| anyhow::anyhow!("connecting to {endpoint}: {}", error_chain(&e)))
}

/// Reads at most [`MAX_PUBLISH_INPUT_BYTES`] from `r`; more is an error naming `what`.
fn read_bounded(r: impl std::io::Read, what: &str) -> anyhow::Result<Vec<u8>> {
    let mut buf = Vec::new();
    r.take(MAX_PUBLISH_INPUT_BYTES + 1).read_to_end(&mut buf).with_context(|| format!("reading {what}"))?;
    if buf.len() as u64 > MAX_PUBLISH_INPUT_BYTES {
        anyhow::bail!("{what} is over {MAX_PUBLISH_INPUT_BYTES} bytes, more than any node accepts");
    }
    Ok(buf)
}

/// `habar serve`: prints the settings, or runs the node until SIGINT or SIGTERM.
async fn serve(cfg: NodeConfig, print_config: bool) -> anyhow::Result<()> {
    if print_config {
        print!("{}", cfg.to_toml()?);
        return Ok(());
    }
    let filter = tracing_subscriber::EnvFilter::try_new(&cfg.log).map_err(|e| anyhow::anyhow!("setting `log`: {e}"))?;
    // Colours only on a terminal, not in log files (`habar dev` writes n<i>.log).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).init();
    if let Some(addr) = cfg.metrics_listen {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .map_err(|e| anyhow::anyhow!("setting `metrics_listen`: cannot serve metrics on {addr}: {e}"))?;
        tracing::info!(%addr, "serving Prometheus metrics at /metrics");
    }
    let shutdown = shutdown_signal();
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| anyhow::anyhow!("setting `listen`: cannot bind {}: {e}", cfg.listen))?;
    tracing::info!(id = cfg.id, listen = %cfg.listen, advertise = %cfg.advertise_addr(), "starting node");
    crate::server::serve(cfg, listener, shutdown).await
}

/// Runs a subcommand on the caller's runtime. `main` runs `serve` itself, on the runtime its
/// `worker_threads` asks for; here `serve` uses whatever runtime calls it.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Cmd::Serve { config, print_config, settings } => {
            serve(NodeConfig::load(config.as_deref(), *settings)?, print_config).await
        }
        Cmd::Dev(args) => crate::dev::run(args).await,
        Cmd::Publish { client, conversation, message_id, sender, text, file, expires_at_ms } => {
            // Parse everything local before touching the network.
            let message_id = match message_id {
                Some(h) => parse_hex16(&h)?,
                None => rand::random::<[u8; 16]>(),
            };
            let ciphertext = match (text, file) {
                (Some(t), _) => t.into_bytes(),
                (None, Some(f)) => {
                    let what = f.display().to_string();
                    read_bounded(std::fs::File::open(&f).with_context(|| format!("opening {what}"))?, &what)?
                }
                (None, None) => read_bounded(std::io::stdin().lock(), "stdin")?,
            };
            let c = habar_client(&client).await?;
            // One request with exactly this envelope (retried with the same message id).
            let appended = c
                .publish_batch(vec![pb::Envelope {
                    conversation_id: conversation,
                    message_id: message_id.to_vec().into(),
                    sender,
                    ciphertext: ciphertext.into(),
                    expires_at_ms,
                }])
                .await
                .map_err(client_err)?;
            for a in appended {
                println!(
                    "{} seq={} message_id={} committed_at={}{}",
                    a.conversation_id,
                    a.seq,
                    hex(&message_id),
                    format_time_ms(a.committed_at_ms),
                    if a.duplicate { " (duplicate: already published, same seq)" } else { "" }
                );
            }
            Ok(())
        }
        Cmd::Read { client, conversation, from, limit, stale, backward, before } => {
            let c = habar_client(&client).await?;
            let direction = if backward { pb::Direction::Backward } else { pb::Direction::Forward };
            let r = c
                .read(pb::ReadRequest {
                    conversation_id: conversation,
                    from_seq: if backward { 0 } else { from },
                    before_seq: if backward { before } else { 0 },
                    direction: direction as i32,
                    limit,
                    allow_stale: stale,
                })
                .await
                .map_err(client_err)?;
            for e in &r.envelopes {
                println!("{}", format_envelope(e));
            }
            for g in &r.removed {
                println!("(seqs {}..={} expired or removed)", g.from, g.to);
            }
            println!(
                "({} envelopes; the conversation's last seq is {}{})",
                r.envelopes.len(),
                r.last_seq,
                if r.end { "; no more in this direction" } else { "" }
            );
            Ok(())
        }
        Cmd::Tail { endpoint, conversation, from } => {
            let stop = shutdown_signal();
            // No deadline: a subscription lasts until Ctrl-C; it resumes by itself from the
            // next seq if its node goes away.
            let c = habar_client(&ClientArgs { endpoint: endpoint.clone(), timeout_s: 30 }).await?;
            let mut sub = c.subscribe(vec![(conversation, from)]).await.map_err(client_err)?;
            tokio::pin!(stop);
            loop {
                tokio::select! {
                    _ = &mut stop => return Ok(()),
                    item = sub.next() => match item {
                        Some(Ok(habar_client::Event::Envelope(e))) | Some(Ok(habar_client::Event::Ephemeral(e))) => {
                            println!("{}", format_envelope(&e))
                        }
                        Some(Ok(habar_client::Event::Removed { from, to, .. })) => {
                            println!("(seqs {from}..={to} expired or removed)")
                        }
                        Some(Ok(_)) => {}
                        Some(Err(e)) => return Err(client_err(e)),
                        None => anyhow::bail!("{endpoint} ended the subscription"),
                    }
                }
            }
        }
        Cmd::Status { client } => {
            // From the node asked, not from whichever node the client library picks.
            let channel = connect(&client.endpoint, Some(Duration::from_secs(client.timeout_s))).await?;
            let s = ClusterClient::new(channel).status(pb::StatusRequest {}).await.map_err(status_err)?.into_inner();
            print!("{}", format_status(&s));
            Ok(())
        }
    }
}

/// A `habar-client` for the client commands: checks the endpoint is reachable first, so a
/// down node is reported as such.
async fn habar_client(args: &ClientArgs) -> anyhow::Result<habar_client::Client> {
    connect(&args.endpoint, Some(Duration::from_secs(args.timeout_s))).await?;
    let mut cfg = habar_client::ClientConfig::new([args.endpoint.clone()]);
    cfg.request_timeout = Duration::from_secs(args.timeout_s);
    cfg.connect_timeout = CONNECT_TIMEOUT;
    habar_client::Client::connect(cfg).await.map_err(|e| anyhow::anyhow!("connecting to {}: {e}", args.endpoint))
}

/// A client error as one line, with the gRPC code when the server answered.
fn client_err(e: habar_client::ClientError) -> anyhow::Error {
    use habar_client::ClientError as E;
    match e {
        E::InvalidArgument(m) => anyhow::anyhow!("gRPC InvalidArgument: {m}"),
        E::NotFound(m) => anyhow::anyhow!("gRPC NotFound: {m}"),
        E::Unavailable(m) => anyhow::anyhow!("gRPC Unavailable: {m}"),
        E::DeadlineExceeded => anyhow::anyhow!("gRPC DeadlineExceeded: no answer within --timeout-s"),
        E::Other(s) => status_err(s),
        other => anyhow::anyhow!("{other}"),
    }
}

pub fn parse_hex16(h: &str) -> anyhow::Result<[u8; 16]> {
    let h = h.trim();
    if h.len() != 32 || !h.bytes().all(|c| c.is_ascii_hexdigit()) {
        anyhow::bail!("--message-id must be 32 hex digits (16 bytes), got `{h}`");
    }
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&h[2 * i..2 * i + 2], 16)?;
    }
    Ok(out)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Unix ms as `YYYY-MM-DDTHH:MM:SS.mmmZ` (UTC).
pub fn format_time_ms(ms: u64) -> String {
    let days = (ms / 86_400_000) as i64;
    let rem = ms % 86_400_000;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1000 % 60,
        rem % 1000
    )
}

/// The first bytes of a ciphertext: as text when they are printable UTF-8 (test data),
/// else as hex (real ciphertext).
pub fn preview(ct: &[u8]) -> String {
    let head = &ct[..ct.len().min(PREVIEW_BYTES)];
    let more = if ct.len() > head.len() { "…" } else { "" };
    // A cut in the middle of a character is fine: only the valid prefix is shown.
    let text = match std::str::from_utf8(head) {
        Ok(t) => Some(t),
        // `error_len() == None`: the input ended inside a character.
        Err(e) if e.error_len().is_none() => std::str::from_utf8(&head[..e.valid_up_to()]).ok(),
        Err(_) => None,
    };
    match text {
        Some(t) if !t.is_empty() && t.chars().all(|c| !c.is_control() || c == ' ') => format!("{t:?}{more}"),
        _ if head.is_empty() => "(empty)".into(),
        _ => format!("0x{}{more}", hex(head)),
    }
}

pub fn format_envelope(s: &pb::StoredEnvelope) -> String {
    let Some(e) = &s.envelope else {
        return format!("seq={} (no envelope)", s.seq);
    };
    let id = hex(&e.message_id);
    format!(
        "seq={:<6} {}  id={}…  sender={}  {} bytes  {}{}",
        s.seq,
        format_time_ms(s.committed_at_ms),
        &id[..id.len().min(8)],
        if e.sender.is_empty() { "-" } else { &e.sender },
        e.ciphertext.len(),
        preview(&e.ciphertext),
        if e.expires_at_ms != 0 { format!("  expires {}", format_time_ms(e.expires_at_ms)) } else { String::new() }
    )
}

pub fn format_status(s: &pb::StatusResponse) -> String {
    let mut out = format!("node {} sees {} nodes and {} shards\n", s.node_id, s.nodes.len(), s.shard_count);
    out.push_str("  node  address                 state\n");
    for n in &s.nodes {
        out.push_str(&format!("  {:<5} {:<23} {}\n", n.id, n.addr, if n.alive { "alive" } else { "DOWN" }));
    }
    out.push_str("  shard  leader  term    commit   applied  snapshot  replicas (node:matched index)\n");
    for sh in &s.shards {
        let reps: Vec<String> = sh.replicas.iter().map(|r| format!("{}:{}", r.node_id, r.matched_index)).collect();
        out.push_str(&format!(
            "  {:<6} {:<7} {:<7} {:<8} {:<8} {:<9} {}\n",
            sh.shard,
            if sh.leader == 0 { "none".to_string() } else { sh.leader.to_string() },
            sh.term,
            sh.commit_index,
            sh.applied_index,
            sh.snapshot_index,
            if reps.is_empty() { "(known to the leader only)".to_string() } else { reps.join(" ") }
        ));
    }
    let leaderless = s.shards.iter().filter(|sh| sh.leader == 0).count();
    if leaderless > 0 {
        out.push_str(&format!("  {leaderless} shard(s) without a leader: writes to them wait for an election\n"));
    }
    let repairing = s.shards.iter().filter(|sh| sh.repairing).count();
    if repairing > 0 {
        out.push_str(&format!(
            "  this node is REPAIRING {repairing} shard(s) after WAL corruption: it does not vote until caught up\n"
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cmd {
        Cli::try_parse_from(std::iter::once("habar").chain(args.iter().copied())).unwrap().command
    }

    #[test]
    fn serve_flags_parse_into_settings() {
        let Cmd::Serve { settings, print_config, config } = parse(&[
            "serve",
            "--id",
            "2",
            "--listen",
            "127.0.0.1:7002",
            "--initial-cluster",
            "1=127.0.0.1:7001,2=127.0.0.1:7002",
            "--shards",
            "8",
            "--election-timeout-min-ms",
            "900",
            "--election-timeout-max-ms",
            "1800",
            "--print-config",
        ]) else {
            panic!("serve")
        };
        assert!(print_config && config.is_none());
        let cfg = NodeConfig::load(None, *settings).unwrap();
        assert_eq!((cfg.id, cfg.shards, cfg.initial_cluster.len()), (2, 8, 2));
        assert_eq!((cfg.election_timeout_min_ms, cfg.election_timeout_max_ms), (900, 1800));
    }

    #[test]
    fn a_malformed_listen_flag_is_a_parse_error_naming_the_flag() {
        let err = Cli::try_parse_from(["habar", "serve", "--listen", "localhost"]).unwrap_err().to_string();
        assert!(err.contains("--listen"), "{err}");
    }

    #[test]
    fn client_commands_default_to_the_first_dev_node() {
        let Cmd::Read { client, conversation, from, limit, stale, backward, before } =
            parse(&["read", "--conversation", "c"])
        else {
            panic!("read")
        };
        assert_eq!(
            (client.endpoint.as_str(), conversation.as_str(), from, limit, stale, backward, before),
            ("http://127.0.0.1:7001", "c", 1, 100, false, false, 0)
        );
        let Cmd::Tail { endpoint, from, .. } = parse(&["tail", "--conversation", "c", "--from", "7"]) else {
            panic!("tail")
        };
        assert_eq!((endpoint.as_str(), from), ("http://127.0.0.1:7001", 7));
        assert!(
            matches!(parse(&["status", "--endpoint", "http://h:1"]), Cmd::Status { client } if client.endpoint == "http://h:1")
        );
    }

    #[test]
    fn publish_takes_text_or_file_but_not_both() {
        let Cmd::Publish { text, file, message_id, .. } =
            parse(&["publish", "--conversation", "c", "--text", "hi", "--message-id", "00"])
        else {
            panic!("publish")
        };
        assert_eq!((text.as_deref(), file, message_id.as_deref()), (Some("hi"), None, Some("00")));
        assert!(Cli::try_parse_from(["habar", "publish", "--conversation", "c", "--text", "a", "--file", "f"]).is_err());
        assert!(Cli::try_parse_from(["habar", "publish", "--text", "a"]).is_err(), "--conversation is required");
    }

    #[test]
    fn dev_flags_are_optional_so_a_saved_layout_can_fill_them() {
        let Cmd::Dev(d) = parse(&["dev"]) else { panic!("dev") };
        assert_eq!((d.nodes, d.base_port, d.shards), (None, None, None));
        assert_eq!(d.data_dir, PathBuf::from("./habar-dev"));
        let Cmd::Dev(d) = parse(&["dev", "--nodes", "5", "--base-port", "9000", "--data-dir", "/x"]) else {
            panic!("dev")
        };
        assert_eq!((d.nodes, d.base_port, d.data_dir), (Some(5), Some(9000), PathBuf::from("/x")));
    }

    #[test]
    fn message_id_must_be_32_hex_digits() {
        assert_eq!(parse_hex16("00112233445566778899aabbccddeeff").unwrap()[15], 0xff);
        assert!(parse_hex16("0011").is_err());
        assert!(parse_hex16("zz112233445566778899aabbccddeeff").is_err());
        assert!(parse_hex16("€0112233445566778899aabbccddee").is_err(), "non-ASCII must not panic on slicing");
    }

    #[test]
    fn times_are_formatted_as_utc() {
        assert_eq!(format_time_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_time_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(format_time_ms(1_795_424_018_123), "2026-11-23T08:53:38.123Z");
    }

    #[test]
    fn previews_show_text_as_text_and_binary_as_hex() {
        assert_eq!(preview(b"hello"), "\"hello\"");
        assert_eq!(preview(&[0u8, 1, 0xff]), "0x0001ff");
        assert_eq!(preview(b""), "(empty)");
        let long = preview(&[0xabu8; 100]);
        assert!(long.starts_with("0xabab") && long.ends_with('…') && long.len() < 60, "{long}");
        // A multi-byte character cut at the preview's end still shows as text.
        let s = "é".repeat(20);
        assert!(preview(s.as_bytes()).starts_with("\"éé"), "{}", preview(s.as_bytes()));
    }

    #[test]
    fn status_table_shows_liveness_leaders_and_progress() {
        let s = pb::StatusResponse {
            node_id: 1,
            nodes: vec![
                pb::NodeStatus { id: 1, addr: "127.0.0.1:7001".into(), alive: true },
                pb::NodeStatus { id: 2, addr: "127.0.0.1:7002".into(), alive: false },
            ],
            shards: vec![
                pb::ShardStatus {
                    shard: 0,
                    leader: 1,
                    term: 3,
                    commit_index: 40,
                    applied_index: 39,
                    replicas: vec![pb::ReplicaProgress { node_id: 2, matched_index: 38 }],
                    snapshot_index: 0,
                    purged_index: 0,
                    repairing: false,
                },
                pb::ShardStatus { shard: 1, repairing: true, ..Default::default() },
            ],
            shard_count: 2,
        };
        let t = format_status(&s);
        assert!(t.contains("127.0.0.1:7002") && t.contains("DOWN") && t.contains("alive"), "{t}");
        assert!(t.contains("REPAIRING 1 shard(s)"), "a repairing node says so: {t}");
        assert!(t.contains("2:38") && t.contains("none"), "{t}");
        assert!(t.contains("1 shard(s) without a leader"), "{t}");
    }

    #[test]
    fn oversized_input_is_refused_before_sending() {
        let big = std::io::repeat(0).take(MAX_PUBLISH_INPUT_BYTES + 10);
        let err = read_bounded(big, "stdin").unwrap_err().to_string();
        assert!(err.contains("stdin is over"), "{err}");
        assert_eq!(read_bounded(&b"abc"[..], "x").unwrap(), b"abc");
    }
}
