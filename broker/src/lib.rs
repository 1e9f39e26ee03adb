//! Magnetar's serving tier. [`service`] holds topics, managed ledgers, cursors, subscriptions
//! and the entry cache, and knows no wire protocol; [`quic`] is the QUIC front-end (the only
//! module that uses quinn); [`http`] serves `/health` and `/metrics`.

pub mod config;
mod http;
pub mod metrics;
mod quic;
pub mod service;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use magnetar_bookie::client::{AutoRecovery, LedgerClient, LedgerError, LocalBookie};
use magnetar_common::addr::HostPort;
use magnetar_common::metadata::SharedStore;
use tokio::task::JoinHandle;
use tracing::info;

pub use config::BrokerConfig;
use metrics::Metrics;
use service::BrokerService;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("listen for QUIC on {addr}: {source}")]
    Quic { addr: SocketAddr, source: std::io::Error },
    #[error("listen for HTTP on {addr}: {source}")]
    Http { addr: SocketAddr, source: std::io::Error },
    #[error("start the ledger client: {0}")]
    Ledgers(#[from] LedgerError),
    #[error("join the cluster: {0}")]
    Cluster(#[from] service::ServiceError),
}

/// A running broker.
#[derive(Debug)]
pub struct Broker {
    service: Arc<BrokerService>,
    quic: quic::QuicServer,
    http: JoinHandle<()>,
    http_addr: SocketAddr,
    cert: tls::CertFiles,
    autorecovery: Option<AutoRecovery>,
}

impl Broker {
    /// Starts a broker on `store` (the config's `metadata_url` is for the caller to connect).
    pub async fn start(config: BrokerConfig, store: SharedStore) -> Result<Self, StartError> {
        Self::start_with_local_bookies(config, store, Vec::new()).await
    }

    /// Starts a broker that reaches the given bookies of this process without a socket
    /// (`magnetar standalone`); other bookies are reached over TCP as usual.
    pub async fn start_with_local_bookies(
        config: BrokerConfig,
        store: SharedStore,
        local: Vec<LocalBookie>,
    ) -> Result<Self, StartError> {
        let advertised = config.advertised_quic().ok();
        let advertised_host = advertised.and_then(|a| HostPort::parse(&a, None).ok()).map(|a| a.host);
        let cert = tls::cert_files(
            &config.tls_cert_file,
            &config.tls_key_file,
            &config.data_dir.join("tls"),
            advertised_host.as_deref(),
        )?;
        let server_tls = tls::server_config(&cert)?;
        let ledgers = LedgerClient::with_local_bookies(store.clone(), config.ledger_client.clone(), local).await?;
        let metrics = Arc::new(Metrics::new());
        // Re-replicates copies lost with dead bookies; one broker of the cluster at a time audits.
        let autorecovery = config
            .autorecovery
            .enabled
            .then(|| AutoRecovery::start(&ledgers, config.autorecovery.clone(), metrics.autorecovery.clone()));
        let service = BrokerService::new(config.clone(), store, ledgers, metrics)?;
        let quic = quic::QuicServer::start(&config, server_tls, service.clone())
            .map_err(|source| StartError::Quic { addr: config.quic_addr, source })?;
        let listener = tokio::net::TcpListener::bind(config.http_addr)
            .await
            .map_err(|source| StartError::Http { addr: config.http_addr, source })?;
        let http_addr = listener.local_addr().map_err(|source| StartError::Http { addr: config.http_addr, source })?;
        let advertised_quic = match config.advertised_addr.is_empty() {
            true => quic.local_addr().to_string(),
            false => config.advertised_addr.clone(),
        };
        let advertised_http = match config.advertised_http_addr.is_empty() {
            true => http_addr.to_string(),
            false => config.advertised_http_addr.clone(),
        };
        service.join_cluster(&advertised_quic, &advertised_http).await?;
        let router = http::router(service.clone());
        let http = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router).await {
                tracing::error!(error = %e, "HTTP server failed");
            }
        });
        info!(quic = %quic.local_addr(), http = %http_addr, "broker started");
        Ok(Self { service, quic, http, http_addr, cert, autorecovery })
    }

    pub fn quic_addr(&self) -> SocketAddr {
        self.quic.local_addr()
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The certificate clients must trust.
    pub fn cert_file(&self) -> &std::path::Path {
        &self.cert.cert
    }

    pub fn service(&self) -> &Arc<BrokerService> {
        &self.service
    }

    /// Drains: stops taking requests, answers publishes in flight, persists cursors and closes
    /// ledgers, then closes connections.
    pub async fn shutdown(self) {
        if let Some(a) = self.autorecovery {
            a.shutdown().await;
        }
        // Topics first: their clients are told to look them up again, and the lease is revoked
        // so another broker takes them at once; then the connections close.
        self.service.shutdown().await;
        self.quic.shutdown(Duration::from_secs(10)).await;
        self.http.abort();
        info!("broker stopped");
    }
}
