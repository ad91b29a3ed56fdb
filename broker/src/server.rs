//! Runs one node: opens the store, starts every shard's Raft group, serves gRPC.
//! (in progress: owned by the node work; `serve` is the entry point the CLI calls.)

use std::future::Future;

use tokio::net::TcpListener;

use crate::config::NodeConfig;

/// Serve one node on `listener` until `shutdown` resolves.
pub async fn serve(
    config: NodeConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let _ = (config, listener);
    shutdown.await;
    Ok(())
}
