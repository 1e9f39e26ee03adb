//! `magnetar perf loopback`: the machine's own ceiling for moving bytes between two sockets on
//! 127.0.0.1, over a raw QUIC stream (quinn with TLS 1.3, the transport settings the broker
//! uses) or a raw TCP stream. Broker figures are reported beside these.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use clap::{Args, ValueEnum};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Transport {
    Quic,
    Tcp,
}

#[derive(Debug, Args)]
pub struct LoopbackArgs {
    /// Which transport to measure.
    #[arg(long, value_enum, default_value = "quic")]
    pub transport: Transport,
    /// Seconds to send.
    #[arg(long, default_value_t = 5)]
    pub time: u64,
    /// Write a JSON summary here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
pub struct LoopbackSummary {
    pub transport: String,
    pub seconds: f64,
    pub bytes: u64,
    pub mb_per_sec: f64,
}

const CHUNK_BYTES: usize = 1 << 20;

pub async fn run(args: LoopbackArgs) -> anyhow::Result<()> {
    let duration = Duration::from_secs(args.time.max(1));
    let (name, bytes, secs) = match args.transport {
        Transport::Quic => ("quic", quic(duration).await?, duration.as_secs_f64()),
        Transport::Tcp => ("tcp", tcp(duration).await?, duration.as_secs_f64()),
    };
    let summary =
        LoopbackSummary { transport: name.into(), seconds: secs, bytes, mb_per_sec: bytes as f64 / secs / 1e6 };
    println!("loopback {name}: {:.1} MB/s ({} bytes in {:.1} s)", summary.mb_per_sec, bytes, secs);
    crate::cli::write_json(&args.json, &summary)
}

/// Sends for `duration` and returns the bytes the receiver got in that time.
async fn tcp(duration: Duration) -> anyhow::Result<u64> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let receiver = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await?;
        let mut buf = vec![0u8; CHUNK_BYTES];
        let mut total = 0u64;
        loop {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                return anyhow::Ok(total);
            }
            total += n as u64;
        }
    });
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let chunk = vec![7u8; CHUNK_BYTES];
    let end = Instant::now() + duration;
    while Instant::now() < end {
        s.write_all(&chunk).await?;
    }
    s.shutdown().await?;
    receiver.await.context("receiver")?
}

async fn quic(duration: Duration) -> anyhow::Result<u64> {
    let names = vec!["localhost".to_string()];
    let cert = rcgen::generate_simple_self_signed(names).context("generate a certificate")?;
    let cert_der = rustls::pki_types::CertificateDer::from(cert.cert.der().to_vec());
    let key = rustls::pki_types::PrivateKeyDer::try_from(cert.key_pair.serialize_der())
        .map_err(|e| anyhow::anyhow!("key: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut server_tls = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![cert_der.clone()], key)?;
    server_tls.alpn_protocols = vec![b"loopback".to_vec()];
    let mut server =
        quinn::ServerConfig::with_crypto(Arc::new(quinn::crypto::rustls::QuicServerConfig::try_from(server_tls)?));
    server.transport_config(Arc::new(transport()));
    // Sockets bound as the broker's and the client's are, for a like-for-like baseline.
    let endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server),
        udp_socket()?,
        Arc::new(quinn::TokioRuntime),
    )?;
    let addr = endpoint.local_addr()?;
    let receiver = tokio::spawn(async move {
        let conn = endpoint.accept().await.context("no connection")?.await?;
        let mut recv = conn.accept_uni().await?;
        let mut total = 0u64;
        while let Some(chunk) = recv.read_chunk(usize::MAX, true).await? {
            total += chunk.bytes.len() as u64;
        }
        anyhow::Ok(total)
    });
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert_der)?;
    let mut client_tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    client_tls.alpn_protocols = vec![b"loopback".to_vec()];
    let mut client = quinn::ClientConfig::new(Arc::new(quinn::crypto::rustls::QuicClientConfig::try_from(client_tls)?));
    client.transport_config(Arc::new(transport()));
    let mut endpoint =
        quinn::Endpoint::new(quinn::EndpointConfig::default(), None, udp_socket()?, Arc::new(quinn::TokioRuntime))?;
    endpoint.set_default_client_config(client);
    let conn = endpoint.connect(addr, "localhost")?.await?;
    let mut send = conn.open_uni().await?;
    let chunk = Bytes::from(vec![7u8; CHUNK_BYTES]);
    let end = Instant::now() + duration;
    while Instant::now() < end {
        send.write_all_chunks(&mut [chunk.clone()]).await?;
    }
    send.finish()?;
    let total = receiver.await.context("receiver")??;
    conn.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    Ok(total)
}

/// The broker's transport settings (flow-control windows and datagram sizes).
fn transport() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.stream_receive_window(quinn::VarInt::from_u32(8 * 1024 * 1024))
        .receive_window(quinn::VarInt::from_u32(32 * 1024 * 1024))
        .send_window(32 * 1024 * 1024);
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(65_527);
    t.mtu_discovery_config(Some(mtu));
    t
}

/// A loopback UDP socket with the buffers Magnetar's endpoints ask for.
fn udp_socket() -> std::io::Result<std::net::UdpSocket> {
    let addr = SocketAddr::from(([127, 0, 0, 1], 0));
    Ok(magnetar_common::udp::bind(addr, magnetar_common::udp::BUFFER_BYTES)?.socket)
}
