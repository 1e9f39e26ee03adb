//! `magnetar perf`: the load-test tool's command line.

use std::path::PathBuf;

use clap::{Args, Subcommand};

#[derive(Debug, Args)]
pub struct PerfArgs {
    #[command(subcommand)]
    pub command: PerfCommand,
}

#[derive(Debug, Subcommand)]
pub enum PerfCommand {
    /// Add entries straight to one bookie over its protocol (storage-tier benchmark).
    Bookie(crate::bookie_perf::BookiePerfArgs),
    /// Publish messages to a broker and measure acknowledged throughput and publish latency.
    Produce(crate::client_perf::ProducePerfArgs),
    /// Consume (and acknowledge) messages from a broker; checks per-producer order.
    Consume(crate::client_perf::ConsumePerfArgs),
    /// Produce and consume at once; measures end-to-end latency and checks what arrived.
    E2e(crate::client_perf::E2ePerfArgs),
    /// The machine's loopback ceiling: a raw QUIC or TCP stream on 127.0.0.1 (a baseline).
    Loopback(crate::loopback::LoopbackArgs),
    /// Raw PUT and GET throughput of the `[offload]` object store (the offload benchmark's baseline).
    ObjectStore(crate::object_store_perf::ObjectStorePerfArgs),
}

/// Writes a JSON summary when asked to.
pub fn write_json(path: &Option<PathBuf>, value: &impl serde::Serialize) -> anyhow::Result<()> {
    if let Some(p) = path {
        let body = serde_json::to_vec_pretty(value)?;
        std::fs::write(p, body).map_err(|e| anyhow::anyhow!("write {}: {e}", p.display()))?;
    }
    Ok(())
}

pub async fn run(args: PerfArgs) -> anyhow::Result<()> {
    match args.command {
        PerfCommand::Bookie(a) => crate::bookie_perf::run(a).await,
        PerfCommand::Produce(a) => crate::client_perf::produce(a).await,
        PerfCommand::Consume(a) => crate::client_perf::consume(a).await,
        PerfCommand::E2e(a) => crate::client_perf::e2e(a).await,
        PerfCommand::Loopback(a) => crate::loopback::run(a).await,
        PerfCommand::ObjectStore(a) => crate::object_store_perf::run(a).await,
    }
}
