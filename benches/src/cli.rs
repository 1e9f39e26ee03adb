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
    }
}
