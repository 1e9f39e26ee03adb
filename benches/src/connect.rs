//! How load tools and CLI commands reach a broker: `--url` and the certificate to trust.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use magnetar_client::Client;

/// How to reach the broker.
#[derive(Debug, Clone, Args)]
pub struct ConnectArgs {
    /// Broker URL.
    #[arg(long, default_value = "quic://127.0.0.1:6650", env = "MAGNETAR_URL")]
    pub url: String,
    /// PEM certificate to trust for the broker's TLS. For a local standalone it is found
    /// without this flag.
    #[arg(long, value_name = "FILE", env = "MAGNETAR_TLS_TRUST_CERT")]
    pub tls_trust_cert: Option<PathBuf>,
    /// Name to check the broker's certificate against instead of the URL's host: for a
    /// certificate that names the broker's DNS name while you connect by address.
    #[arg(long, value_name = "NAME", env = "MAGNETAR_TLS_SERVER_NAME")]
    pub tls_server_name: Option<String>,
}

impl ConnectArgs {
    pub async fn connect(&self) -> anyhow::Result<Client> {
        let cert = match &self.tls_trust_cert {
            Some(c) => c.clone(),
            None => find_local_cert(&self.url)
                .with_context(|| format!("no certificate to trust for {}: pass --tls-trust-cert FILE", self.url))?,
        };
        let mut builder = Client::builder(&self.url).tls_trust_cert(cert);
        if let Some(name) = &self.tls_server_name {
            builder = builder.server_name(name);
        }
        builder.build().await.with_context(|| format!("connect to {}", self.url))
    }
}

/// For a broker on this machine: the certificate a local standalone published, or the one in
/// `./data/tls` (standalone's default data directory).
fn find_local_cert(url: &str) -> Option<PathBuf> {
    let rest = url.strip_prefix("quic://")?;
    let broker = magnetar_common::addr::HostPort::parse(rest.trim_end_matches('/'), Some(6650)).ok()?;
    if !broker.is_loopback() {
        return None;
    }
    [magnetar_common::config::local_standalone_cert_path(broker.port), PathBuf::from("data/tls/cert.pem")]
        .into_iter()
        .find(|p| p.is_file())
}
