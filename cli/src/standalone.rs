//! `magnetar standalone`: the embedded metadata store, one bookie and one broker in one process,
//! everything under one data directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use magnetar_bookie::config::BookieConfig;
use magnetar_bookie::server::BookieServer;
use magnetar_broker::{Broker, BrokerConfig};
use magnetar_common::config;

#[derive(Debug, Args)]
pub struct StandaloneArgs {
    /// Directory for all data (metadata, journal, ledgers, TLS certificate).
    #[arg(long, default_value = "data")]
    data_dir: PathBuf,
    /// Where clients connect (QUIC over UDP).
    #[arg(long, default_value = "127.0.0.1:6650")]
    quic_addr: SocketAddr,
    /// Where /health and /metrics are served.
    #[arg(long, default_value = "127.0.0.1:8080")]
    http_addr: SocketAddr,
    /// Broker configuration file (TOML); `MAGNETAR_BROKER_*` variables override it. Addresses,
    /// metadata store and quorums are set by standalone.
    #[arg(long)]
    broker_config: Option<PathBuf>,
    /// Bookie configuration file (TOML); `MAGNETAR_BOOKIE_*` variables override it. Directories
    /// and addresses are set by standalone.
    #[arg(long)]
    bookie_config: Option<PathBuf>,
}

pub async fn run(args: StandaloneArgs) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let dir = &args.data_dir;
    std::fs::create_dir_all(dir).with_context(|| format!("create data directory {}", dir.display()))?;
    let metadata_url = format!("embedded:{}", dir.join("metadata").display());
    let store = magnetar_common::metadata::connect(&metadata_url).await.context("open the metadata store")?;

    let mut bookie: BookieConfig = config::load(args.bookie_config.as_deref()).context("load bookie configuration")?;
    bookie.bookie_id = "standalone-bookie".into();
    bookie.listen_addr = SocketAddr::from(([127, 0, 0, 1], 0));
    bookie.http_addr = SocketAddr::from(([127, 0, 0, 1], 0));
    bookie.advertised_addr = String::new();
    bookie.metadata_url = metadata_url.clone();
    bookie.journal_dir = dir.join("bookie/journal");
    bookie.ledger_dir = dir.join("bookie/ledgers");
    let mut broker: BrokerConfig = config::load(args.broker_config.as_deref()).context("load broker configuration")?;
    // Every batch the broker accepts must fit in a bookie entry (28 bytes of header).
    let entry_floor = broker.max_message_bytes.as_u64() + 64 * 1024;
    if bookie.max_entry_bytes.as_u64() < entry_floor {
        bookie.max_entry_bytes = bytesize::ByteSize::b(entry_floor);
    }
    let bookie = BookieServer::start_with_store(bookie, store.clone()).await.context("start the bookie")?;

    broker.quic_addr = args.quic_addr;
    broker.http_addr = args.http_addr;
    broker.metadata_url = metadata_url;
    broker.data_dir = dir.clone();
    broker.ledger.ensemble_size = 1;
    broker.ledger.write_quorum = 1;
    broker.ledger.ack_quorum = 1;
    // The broker reaches its bookie in this process directly, not over loopback TCP.
    let broker = match Broker::start_with_local_bookies(broker, store.clone(), vec![bookie.local()]).await {
        Ok(b) => b,
        Err(e) => {
            bookie.shutdown().await;
            return Err(e).context("start the broker");
        }
    };
    let quic = broker.quic_addr();
    let published = match publish_cert(broker.cert_file(), quic.port()) {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::warn!(error = %e, "could not publish the certificate for local clients");
            None
        }
    };
    println!("Magnetar standalone is ready ({} ms)", started.elapsed().as_millis());
    println!("  clients (QUIC/UDP): quic://{quic}");
    println!("  HTTP (/health, /metrics): http://{}", broker.http_addr());
    println!("  TLS certificate: {}", broker.cert_file().display());
    println!("  data: {}", dir.display());
    if let Some(reason) = bookie.storage().read_only_reason() {
        println!(
            "WARNING: the bookie is read-only ({reason}): producers fail until it accepts writes again \
             (free disk space, or raise [disk] usage_threshold in a --bookie-config file)"
        );
    }
    println!("Try: magnetar consume my-topic -s first-sub -n 10   (then, in another terminal)");
    println!("     magnetar produce my-topic --messages hello -n 10");
    crate::shutdown_signal().await;
    println!("Shutting down: draining clients, persisting cursors, closing ledgers");
    broker.shutdown().await;
    bookie.shutdown().await;
    if let Some(p) = published {
        let _ = std::fs::remove_file(p);
    }
    println!("Stopped");
    Ok(())
}

/// Copies the certificate where local clients look for it (removed again on a clean exit).
fn publish_cert(cert: &Path, port: u16) -> std::io::Result<PathBuf> {
    let target = config::local_standalone_cert_path(port);
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::copy(cert, &target)?;
    Ok(target)
}
