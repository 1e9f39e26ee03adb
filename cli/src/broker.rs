//! `magnetar broker`: runs one broker from a config file against a shared metadata store.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use magnetar_broker::{Broker, BrokerConfig};
use magnetar_common::config;

#[derive(Debug, Args)]
pub struct BrokerArgs {
    /// Configuration file (TOML); `MAGNETAR_BROKER_*` variables override it.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Validate this configuration file and exit.
    #[arg(long, value_name = "FILE", conflicts_with = "config")]
    check_config: Option<PathBuf>,
}

pub async fn run(args: BrokerArgs) -> anyhow::Result<()> {
    if let Some(path) = args.check_config {
        let cfg: BrokerConfig = config::load(Some(&path)).with_context(|| format!("check {}", path.display()))?;
        // The form of the URL (etcd endpoints as host:port), which the config struct leaves to
        // connecting; nothing is contacted.
        magnetar_common::metadata::parse_url(&cfg.metadata_url)
            .with_context(|| format!("check {}: metadata_url", path.display()))?;
        println!(
            "{}: valid broker configuration (metadata {}, QUIC {}, HTTP {})",
            path.display(),
            cfg.metadata_url,
            cfg.quic_addr,
            cfg.http_addr
        );
        return Ok(());
    }
    let cfg: BrokerConfig = config::load(args.config.as_deref()).context("load broker configuration")?;
    let store = magnetar_common::metadata::connect(&cfg.metadata_url).await.context("connect to the metadata store")?;
    let broker = Broker::start(cfg, store).await.context("start broker")?;
    println!("broker listening on quic://{} (http {})", broker.quic_addr(), broker.http_addr());
    crate::shutdown_signal().await;
    tracing::info!("shutting down");
    broker.shutdown().await;
    Ok(())
}
