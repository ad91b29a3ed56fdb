//! The `habar` binary: `serve`, `dev`, and a small client for people at a terminal.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use std::time::SystemTime;
use std::time::UNIX_EPOCH;

use clap::Parser;
use clap::Subcommand;
use habar_proto::v1 as pb;
use habar_proto::v1::broker_client::BrokerClient;
use habar_proto::v1::cluster_client::ClusterClient;
use tokio_stream::StreamExt;

use crate::config::ConfigLayer;
use crate::config::NodeConfig;

#[derive(Debug, Parser)]
#[command(name = "habar", version, about = "Habar: a replicated message broker for end-to-end-encrypted envelopes")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Run one node.
    Serve {
        /// A TOML file of settings (see ops/habar.example.toml).
        #[arg(long, env = "HABAR_CONFIG")]
        config: Option<PathBuf>,
        #[command(flatten)]
        settings: Box<ConfigLayer>,
    },
    /// Start a local cluster of child processes (3 nodes on loopback) and stop it on Ctrl-C.
    Dev(crate::dev::DevArgs),
    /// Publish one envelope; prints the seq it got.
    Publish {
        #[arg(long, default_value = "http://127.0.0.1:7001")]
        endpoint: String,
        #[arg(long)]
        conversation: String,
        /// 32 hex digits; a random id when absent.
        #[arg(long)]
        message_id: Option<String>,
        #[arg(long, default_value = "")]
        sender: String,
        /// The ciphertext as text (for trying things out); else --file, else stdin.
        #[arg(long)]
        text: Option<String>,
        #[arg(long)]
        file: Option<PathBuf>,
        /// Unix ms after which the envelope must not be delivered (0 = never).
        #[arg(long, default_value_t = 0)]
        expires_at_ms: u64,
    },
    /// Read a conversation.
    Read {
        #[arg(long, default_value = "http://127.0.0.1:7001")]
        endpoint: String,
        #[arg(long)]
        conversation: String,
        #[arg(long, default_value_t = 1)]
        from: u64,
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Serve from the connected node's replica without a read-index check.
        #[arg(long)]
        stale: bool,
    },
    /// Follow a conversation: its backlog, then each new envelope as it commits.
    Tail {
        #[arg(long, default_value = "http://127.0.0.1:7001")]
        endpoint: String,
        #[arg(long)]
        conversation: String,
        #[arg(long, default_value_t = 1)]
        from: u64,
    },
    /// Show the cluster as one node sees it.
    Status {
        #[arg(long, default_value = "http://127.0.0.1:7001")]
        endpoint: String,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on Ctrl-C (SIGINT) or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

fn status_err(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Cmd::Serve { config, settings } => {
            let cfg = NodeConfig::load(config.as_deref(), *settings)?;
            let filter =
                tracing_subscriber::EnvFilter::try_new(&cfg.log).map_err(|e| anyhow::anyhow!("setting `log`: {e}"))?;
            tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
            let listener = tokio::net::TcpListener::bind(cfg.listen)
                .await
                .map_err(|e| anyhow::anyhow!("setting `listen`: cannot bind {}: {e}", cfg.listen))?;
            crate::server::serve(cfg, listener, shutdown_signal()).await
        }
        Cmd::Dev(args) => crate::dev::run(args).await,
        Cmd::Publish { endpoint, conversation, message_id, sender, text, file, expires_at_ms } => {
            let ciphertext = match (text, file) {
                (Some(t), _) => t.into_bytes(),
                (None, Some(f)) => std::fs::read(&f).map_err(|e| anyhow::anyhow!("reading {}: {e}", f.display()))?,
                (None, None) => {
                    let mut b = Vec::new();
                    std::io::Read::read_to_end(&mut std::io::stdin(), &mut b)?;
                    b
                }
            };
            let message_id = match message_id {
                Some(h) => parse_hex16(&h)?,
                None => rand::random::<[u8; 16]>(),
            };
            let mut c =
                BrokerClient::connect(endpoint.clone()).await.map_err(|e| anyhow::anyhow!("{endpoint}: {e}"))?;
            let r = c
                .publish(pb::PublishRequest {
                    envelopes: vec![pb::Envelope {
                        conversation_id: conversation,
                        message_id: message_id.to_vec().into(),
                        sender,
                        ciphertext: ciphertext.into(),
                        expires_at_ms,
                    }],
                })
                .await
                .map_err(status_err)?
                .into_inner();
            for a in r.appended {
                println!(
                    "{} seq={} committed_at_ms={}{}",
                    a.conversation_id,
                    a.seq,
                    a.committed_at_ms,
                    if a.duplicate { " (duplicate)" } else { "" }
                );
            }
            Ok(())
        }
        Cmd::Read { endpoint, conversation, from, limit, stale } => {
            let mut c =
                BrokerClient::connect(endpoint.clone()).await.map_err(|e| anyhow::anyhow!("{endpoint}: {e}"))?;
            let r = c
                .read(pb::ReadRequest { conversation_id: conversation, from_seq: from, limit, allow_stale: stale })
                .await
                .map_err(status_err)?
                .into_inner();
            for e in &r.envelopes {
                print_envelope(e);
            }
            println!("({} envelopes; last seq {})", r.envelopes.len(), r.last_seq);
            Ok(())
        }
        Cmd::Tail { endpoint, conversation, from } => {
            let mut c =
                BrokerClient::connect(endpoint.clone()).await.map_err(|e| anyhow::anyhow!("{endpoint}: {e}"))?;
            let mut s = c
                .subscribe(pb::SubscribeRequest { conversation_id: conversation, from_seq: from })
                .await
                .map_err(status_err)?
                .into_inner();
            let stop = shutdown_signal();
            tokio::pin!(stop);
            loop {
                tokio::select! {
                    _ = &mut stop => return Ok(()),
                    item = s.next() => match item {
                        Some(Ok(e)) => print_envelope(&e),
                        Some(Err(st)) => return Err(status_err(st)),
                        None => return Ok(()),
                    }
                }
            }
        }
        Cmd::Status { endpoint } => {
            let mut c =
                ClusterClient::connect(endpoint.clone()).await.map_err(|e| anyhow::anyhow!("{endpoint}: {e}"))?;
            let s = c.status(pb::StatusRequest {}).await.map_err(status_err)?.into_inner();
            print!("{}", format_status(&s));
            Ok(())
        }
    }
}

fn parse_hex16(h: &str) -> anyhow::Result<[u8; 16]> {
    let h = h.trim();
    if h.len() != 32 || !h.chars().all(|c| c.is_ascii_hexdigit()) {
        anyhow::bail!("--message-id must be 32 hex digits (16 bytes), got {} characters", h.len());
    }
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&h[2 * i..2 * i + 2], 16)?;
    }
    Ok(out)
}

fn print_envelope(s: &pb::StoredEnvelope) {
    let Some(e) = &s.envelope else { return };
    let preview: String = String::from_utf8_lossy(&e.ciphertext[..e.ciphertext.len().min(48)])
        .chars()
        .map(|c| if c.is_control() { '.' } else { c })
        .collect();
    let ago = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
        .saturating_sub(s.committed_at_ms);
    println!(
        "seq={:<6} {:>8} ago  sender={:<12} {} bytes  {preview}",
        s.seq,
        format!("{:?}", Duration::from_millis(ago - ago % 1000)),
        if e.sender.is_empty() { "-" } else { &e.sender },
        e.ciphertext.len()
    );
}

pub fn format_status(s: &pb::StatusResponse) -> String {
    let mut out = format!("node {} sees {} nodes and {} shards\n", s.node_id, s.nodes.len(), s.shard_count);
    for n in &s.nodes {
        out.push_str(&format!("  node {:<3} {:<22} {}\n", n.id, n.addr, if n.alive { "alive" } else { "DOWN" }));
    }
    out.push_str("  shard  leader  term   commit  applied  snapshot  replicas (node:matched)\n");
    for sh in &s.shards {
        let reps: Vec<String> = sh.replicas.iter().map(|r| format!("{}:{}", r.node_id, r.matched_index)).collect();
        out.push_str(&format!(
            "  {:<6} {:<7} {:<6} {:<7} {:<8} {:<9} {}\n",
            sh.shard,
            if sh.leader == 0 { "-".to_string() } else { sh.leader.to_string() },
            sh.term,
            sh.commit_index,
            sh.applied_index,
            sh.snapshot_index,
            reps.join(" ")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serve_flags_parse_into_settings() {
        let cli = Cli::try_parse_from([
            "habar",
            "serve",
            "--id",
            "2",
            "--listen",
            "127.0.0.1:7002",
            "--initial-cluster",
            "1=127.0.0.1:7001,2=127.0.0.1:7002",
            "--shards",
            "8",
        ])
        .unwrap();
        let Cmd::Serve { settings, .. } = cli.command else { panic!("serve") };
        let cfg = NodeConfig::load(None, *settings).unwrap();
        assert_eq!((cfg.id, cfg.shards, cfg.initial_cluster.len()), (2, 8, 2));
    }

    #[test]
    fn message_id_must_be_32_hex_digits() {
        assert!(parse_hex16("00112233445566778899aabbccddeeff").is_ok());
        assert!(parse_hex16("0011").is_err());
        assert!(parse_hex16("zz112233445566778899aabbccddeeff").is_err());
    }
}
