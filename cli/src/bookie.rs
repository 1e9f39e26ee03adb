//! `magnetar bookie`: runs one bookie from a config file.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use magnetar_bookie::config::BookieConfig;
use magnetar_bookie::server::BookieServer;
use magnetar_common::config;

#[derive(Debug, Args)]
pub struct BookieArgs {
    /// Configuration file (TOML); `MAGNETAR_BOOKIE_*` variables override it.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Validate this configuration file and exit.
    #[arg(long, value_name = "FILE", conflicts_with = "config")]
    check_config: Option<PathBuf>,
}

pub async fn run(args: BookieArgs) -> anyhow::Result<()> {
    if let Some(path) = args.check_config {
        let cfg: BookieConfig = config::load(Some(&path)).with_context(|| format!("check {}", path.display()))?;
        // The form of the URL (etcd endpoints as host:port), which the config struct leaves to
        // connecting; nothing is contacted.
        magnetar_common::metadata::parse_url(&cfg.metadata_url)
            .with_context(|| format!("check {}: metadata_url", path.display()))?;
        println!(
            "{}: valid bookie configuration (metadata {}, journal {}, ledgers {})",
            path.display(),
            cfg.metadata_url,
            cfg.journal_dir.display(),
            cfg.ledger_dir.display()
        );
        return Ok(());
    }
    let cfg: BookieConfig = config::load(args.config.as_deref()).context("load bookie configuration")?;
    let server = BookieServer::start(cfg).await.context("start bookie")?;
    println!("bookie {} listening on {} (http {})", server.bookie_id, server.address, server.http_address);
    crate::shutdown_signal().await;
    tracing::info!("shutting down");
    server.shutdown().await;
    Ok(())
}
