//! Connections to brokers and the framed streams on them. This is the only module that
//! imports quinn or rustls: the rest of the crate sees a [`Connector`] that makes a
//! [`Connection`] to a broker URL, which opens [`FrameWriter`]/[`FrameReader`] pairs (one per
//! lookup, producer or consumer), plus a writer task ([`spawn_writer`]) that coalesces
//! outgoing frames into few large writes.
//!
//! Under `cfg(test)` connections can also be in-memory: each stream opened to a broker address
//! is handed to a test that plays that broker, so lookup, producer and consumer logic is tested
//! without sockets.
//!
//! Must never: interpret frames (that is the producer's and consumer's job), or let a frame
//! larger than [`MAX_FRAME_BYTES`] allocate a buffer.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use magnetar_common::wire::{self, Frame};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::debug;

use crate::Error;
use crate::url::BrokerUrl;

/// ALPN protocol id of the client protocol, version 1.
pub const ALPN: &[u8] = b"magnetar/1";
/// Largest frame accepted from a broker: a maximal message batch plus room for the frame header.
pub const MAX_FRAME_BYTES: usize = 8 * 1024 * 1024 + 64 * 1024;
/// A writer task gathers queued frames up to about this many bytes into one write.
const COALESCE_BYTES: usize = 1024 * 1024;
/// A connection is declared dead after hearing nothing from its broker this long (default of
/// `ClientBuilder::connection_idle_timeout`); keep-alives go out at a third of it, so a live
/// but quiet connection never gets there.
pub(crate) const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3);
/// Per-stream receive window: how much a broker may send on one stream before we read it.
const STREAM_RECEIVE_WINDOW_BYTES: u32 = 4 * 1024 * 1024;
/// Bytes read from a stream at a time.
const READ_CHUNK_BYTES: usize = 256 * 1024;
/// A batch at least this large is written without being copied into the frame buffer; smaller
/// ones cost less to copy than to pass as a chunk of their own.
const ZERO_COPY_MIN_BYTES: usize = 4 * 1024;

/// Makes connections to brokers: the TLS settings (read once) and the timeouts.
#[derive(Debug, Clone)]
pub(crate) enum Connector {
    Quic {
        config: quinn::ClientConfig,
        /// Overrides the name each broker's certificate must carry.
        server_name: Option<String>,
        connect_timeout: Duration,
    },
    /// Connections go to brokers played by a test.
    #[cfg(test)]
    Memory(MemoryNet),
}

impl Connector {
    /// A connector trusting only the certificates in the PEM file `trust_cert`.
    pub fn quic(
        trust_cert: &Path,
        server_name: Option<String>,
        connect_timeout: Duration,
        idle_timeout: Duration,
    ) -> Result<Self, Error> {
        let tls = client_tls_config(trust_cert)?;
        let quic_tls = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
            .map_err(|e| Error::Tls(format!("TLS configuration unusable for QUIC: {e}")))?;
        let mut config = quinn::ClientConfig::new(Arc::new(quic_tls));
        let mut transport = quinn::TransportConfig::default();
        let idle = quinn::IdleTimeout::try_from(idle_timeout)
            .map_err(|_| Error::InvalidArgument(format!("connection_idle_timeout {idle_timeout:?} is too large")))?;
        transport.max_idle_timeout(Some(idle));
        transport.keep_alive_interval(Some(idle_timeout / 3));
        // Larger datagrams where the path allows (loopback, jumbo frames): fewer packets and system
        // calls per megabyte. Discovery settles on what the path carries.
        let mut mtu = quinn::MtuDiscoveryConfig::default();
        mtu.upper_bound(65_527);
        transport.mtu_discovery_config(Some(mtu));
        transport.stream_receive_window(quinn::VarInt::from_u32(STREAM_RECEIVE_WINDOW_BYTES));
        config.transport_config(Arc::new(transport));
        Ok(Connector::Quic { config, server_name, connect_timeout })
    }

    /// Connects to the broker at `url`, checking its certificate against the client's server
    /// name or else `name`, within the connect timeout or `limit` if shorter.
    pub async fn connect(&self, url: &BrokerUrl, name: &str, limit: Duration) -> Result<Connection, Error> {
        match self {
            Connector::Quic { config, server_name, connect_timeout } => {
                let server_name = server_name.as_deref().unwrap_or(name);
                connect(config.clone(), url, server_name, limit.min(*connect_timeout)).await
            }
            #[cfg(test)]
            Connector::Memory(net) => net.connect(url),
        }
    }
}

/// One connection to a broker; shared by the lookups, producers and consumers that use it.
#[derive(Debug)]
pub(crate) enum Connection {
    Quic {
        endpoint: quinn::Endpoint,
        conn: quinn::Connection,
    },
    /// Streams go to a test playing the broker.
    #[cfg(test)]
    Memory(mpsc::UnboundedSender<(FrameWriter, FrameReader)>),
}

impl Connection {
    /// Opens a bidirectional stream for one lookup, producer or consumer.
    pub async fn open_stream(&self) -> Result<(FrameWriter, FrameReader), Error> {
        match self {
            Connection::Quic { conn, .. } => {
                let (send, recv) = conn.open_bi().await.map_err(|e| connection_lost(&e))?;
                Ok((FrameWriter::new(SendHalf::Quic(send)), FrameReader::new(RecvHalf::Quic(recv))))
            }
            #[cfg(test)]
            Connection::Memory(broker) => {
                let (client, server) = memory_stream_pair();
                broker.send(server).map_err(|_| Error::ConnectionLost("the test broker is gone".into()))?;
                Ok(client)
            }
        }
    }

    /// False once the connection is closed, timed out or lost.
    pub fn is_alive(&self) -> bool {
        match self {
            Connection::Quic { conn, .. } => conn.close_reason().is_none(),
            #[cfg(test)]
            Connection::Memory(broker) => !broker.is_closed(),
        }
    }

    /// Closes the connection at once (unsent stream data is dropped) and waits briefly for the
    /// close to reach the broker.
    pub async fn close(&self) {
        match self {
            Connection::Quic { endpoint, conn } => {
                conn.close(0u32.into(), b"client closed");
                endpoint.wait_idle().await;
            }
            #[cfg(test)]
            Connection::Memory(_) => {}
        }
    }
}

/// Connects to the broker at `url` within `connect_timeout`.
async fn connect(
    config: quinn::ClientConfig,
    url: &BrokerUrl,
    server_name: &str,
    connect_timeout: Duration,
) -> Result<Connection, Error> {
    let addr = resolve(url).await?;
    let bind: SocketAddr = if addr.is_ipv6() {
        SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0))
    } else {
        SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, 0))
    };
    let endpoint = magnetar_common::udp::bind(bind, magnetar_common::udp::BUFFER_BYTES)
        .and_then(|b| {
            quinn::Endpoint::new(quinn::EndpointConfig::default(), None, b.socket, Arc::new(quinn::TokioRuntime))
        })
        .map_err(|e| Error::Connect(format!("open a UDP socket: {e}")))?;
    let connecting = endpoint.connect_with(config, addr, server_name).map_err(|e| match e {
        quinn::ConnectError::InvalidServerName(name) => {
            Error::InvalidArgument(format!("TLS server name {name:?} is not a valid DNS name or IP address"))
        }
        e => Error::Connect(format!("connect to {addr}: {e}")),
    })?;
    let conn = match tokio::time::timeout(connect_timeout, connecting).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => return Err(handshake_error(&e, addr, server_name)),
        Err(_) => {
            return Err(Error::Connect(format!(
                "no answer from {addr} within {connect_timeout:?}: is a broker listening there (QUIC over UDP)?"
            )));
        }
    };
    debug!(%url, %addr, server_name, "connected to broker");
    Ok(Connection::Quic { endpoint, conn })
}

/// Resolves the URL's host, preferring IPv4 (brokers commonly listen on 0.0.0.0).
async fn resolve(url: &BrokerUrl) -> Result<SocketAddr, Error> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((url.host.as_str(), url.port))
        .await
        .map_err(|e| Error::Connect(format!("resolve {}: {e}", url.host)))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| Error::Connect(format!("resolve {}: no addresses", url.host)))
}

/// A rustls client configuration that trusts only the certificates in `path`.
fn client_tls_config(path: &Path) -> Result<rustls::ClientConfig, Error> {
    let pem = std::fs::read(path)
        .map_err(|e| Error::Tls(format!("read the trusted certificate file {}: {e}", path.display())))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        let cert =
            cert.map_err(|e| Error::Tls(format!("read the trusted certificate file {}: {e}", path.display())))?;
        roots.add(cert).map_err(|e| Error::Tls(format!("unusable certificate in {}: {e}", path.display())))?;
    }
    if roots.is_empty() {
        return Err(Error::Tls(format!(
            "no certificate in {}: expected a PEM file with a -----BEGIN CERTIFICATE----- block",
            path.display()
        )));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Tls(format!("TLS configuration: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    Ok(tls)
}

/// The error for a failed QUIC handshake.
fn handshake_error(e: &quinn::ConnectionError, addr: SocketAddr, server_name: &str) -> Error {
    let crypto = |code: u64| (0x100..0x200).contains(&code);
    match e {
        quinn::ConnectionError::TransportError(te) if crypto(te.code.into()) => {
            tls_failure(u64::from(te.code) as u8, &te.reason, server_name, false)
        }
        quinn::ConnectionError::ConnectionClosed(close) if crypto(close.error_code.into()) => {
            tls_failure(u64::from(close.error_code) as u8, &String::from_utf8_lossy(&close.reason), server_name, true)
        }
        quinn::ConnectionError::TimedOut => {
            Error::Connect(format!("no answer from {addr}: is a broker listening there (QUIC over UDP)?"))
        }
        e => Error::Connect(format!("connect to {addr}: {e}")),
    }
}

/// Describes a TLS failure: `alert` is the TLS alert, `reason` rustls' text, `by_broker` whether
/// the broker (rather than this client) aborted the handshake.
fn tls_failure(alert: u8, reason: &str, server_name: &str, by_broker: bool) -> Error {
    const NO_APPLICATION_PROTOCOL: u8 = 120;
    let hint = "pass the broker's certificate with --tls-trust-cert";
    let text = if reason.contains("UnknownIssuer") || reason.contains("BadSignature") {
        format!("TLS handshake failed: certificate not trusted ({reason}); {hint}")
    } else if reason.contains("NotValidForName") || reason.contains("not valid for name") {
        format!(
            "TLS handshake failed: the broker's certificate does not name {server_name:?} ({reason}); \
             connect by a name the certificate lists or set the TLS server name"
        )
    } else if reason.contains("Expired") || reason.contains("NotValidYet") {
        format!("TLS handshake failed: the broker's certificate is outside its validity period ({reason})")
    } else if alert == NO_APPLICATION_PROTOCOL {
        format!(
            "TLS handshake failed: the broker does not speak {} (ALPN); is it a Magnetar broker of a compatible version?",
            String::from_utf8_lossy(ALPN)
        )
    } else if by_broker {
        format!("TLS handshake failed: the broker aborted it (TLS alert {alert}: {reason})")
    } else if reason.contains("invalid peer certificate") {
        format!("TLS handshake failed: certificate not accepted ({reason}); {hint}")
    } else {
        format!("TLS handshake failed (TLS alert {alert}): {reason}")
    };
    Error::Tls(text)
}

fn connection_lost(e: &quinn::ConnectionError) -> Error {
    match e {
        quinn::ConnectionError::LocallyClosed => Error::Closed("the client closed the connection".into()),
        e => Error::ConnectionLost(format!("connection to the broker lost: {e}")),
    }
}

#[derive(Debug)]
enum SendHalf {
    Quic(quinn::SendStream),
    #[cfg(test)]
    Memory(tokio::io::DuplexStream),
}

#[derive(Debug)]
enum RecvHalf {
    Quic(quinn::RecvStream),
    #[cfg(test)]
    Memory(tokio::io::DuplexStream),
}

/// The sending side of a stream: encodes frames and writes them.
#[derive(Debug)]
pub(crate) struct FrameWriter {
    half: SendHalf,
    /// Encoded frame headers and small frames.
    buf: BytesMut,
    /// What one write hands to the stream: slices of `buf` and batches as they are.
    chunks: Vec<Bytes>,
}

impl FrameWriter {
    fn new(half: SendHalf) -> Self {
        FrameWriter { half, buf: BytesMut::new(), chunks: Vec::new() }
    }

    /// Writes `frames` with one write. Frame headers and small frames are encoded together;
    /// a batch of at least [`ZERO_COPY_MIN_BYTES`] is handed to QUIC as the shared buffer it
    /// already is, not copied. Not cancel-safe: run it in one task.
    pub async fn write_frames(&mut self, frames: &[Frame]) -> Result<(), Error> {
        self.buf.clear();
        self.chunks.clear();
        for f in frames {
            match f {
                Frame::Send { sequence_id, num_messages, payload } if payload.len() >= ZERO_COPY_MIN_BYTES => {
                    wire::encode_send_header(*sequence_id, *num_messages, payload.len(), &mut self.buf);
                    self.chunks.push(self.buf.split().freeze());
                    self.chunks.push(payload.clone());
                }
                f => f.encode(&mut self.buf),
            }
        }
        if !self.buf.is_empty() {
            self.chunks.push(self.buf.split().freeze());
        }
        let result = match &mut self.half {
            SendHalf::Quic(s) => s.write_all_chunks(&mut self.chunks).await.map_err(|e| match e {
                quinn::WriteError::Stopped(code) => {
                    Error::ConnectionLost(format!("the broker stopped reading the stream (code {code})"))
                }
                quinn::WriteError::ConnectionLost(e) => connection_lost(&e),
                e => Error::ConnectionLost(format!("write to the broker: {e}")),
            }),
            #[cfg(test)]
            SendHalf::Memory(s) => {
                use tokio::io::AsyncWriteExt;
                let mut result = Ok(());
                for c in &self.chunks {
                    if let Err(e) = s.write_all(c).await {
                        result = Err(Error::ConnectionLost(format!("write to the broker: {e}")));
                        break;
                    }
                }
                result
            }
        };
        self.chunks.clear();
        // Keep a modest buffer around, not the largest batch ever written.
        if self.buf.capacity() > 2 * COALESCE_BYTES {
            self.buf = BytesMut::new();
        }
        result
    }

    /// Finishes the stream (the broker closes this producer or consumer) and waits up to
    /// `timeout` until the broker has received everything written.
    pub async fn finish(&mut self, timeout: Duration) -> Result<(), Error> {
        match &mut self.half {
            SendHalf::Quic(s) => {
                // Fails only if already finished, which is what we want anyway.
                let _ = s.finish();
                match tokio::time::timeout(timeout, s.stopped()).await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(quinn::StoppedError::ConnectionLost(e))) => Err(connection_lost(&e)),
                    Ok(Err(e)) => Err(Error::Closed(format!("finish the stream: {e}"))),
                    Err(_) => Err(Error::Timeout("wait for the broker to receive the end of the stream")),
                }
            }
            #[cfg(test)]
            SendHalf::Memory(s) => {
                use tokio::io::AsyncWriteExt;
                s.shutdown().await.map_err(|e| Error::Closed(format!("finish the stream: {e}")))
            }
        }
    }
}

/// The receiving side of a stream: reads and decodes frames.
#[derive(Debug)]
pub(crate) struct FrameReader {
    half: RecvHalf,
    buf: BytesMut,
}

impl FrameReader {
    fn new(half: RecvHalf) -> Self {
        FrameReader { half, buf: BytesMut::new() }
    }

    /// The next frame; `Ok(None)` when the broker finished the stream cleanly. Cancel-safe.
    /// After an error the stream is unusable.
    pub async fn next(&mut self) -> Result<Option<Frame>, Error> {
        loop {
            match wire::decode(&mut self.buf, MAX_FRAME_BYTES) {
                Ok(Some(frame)) => return Ok(Some(frame)),
                Ok(None) => {}
                Err(e) => return Err(Error::Protocol(format!("bad frame from the broker: {e}"))),
            }
            if !self.read_more().await? {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(Error::Protocol("the broker's stream ended in the middle of a frame".into()))
                };
            }
        }
    }

    /// Appends what the stream has to the buffer; false at the end of the stream.
    async fn read_more(&mut self) -> Result<bool, Error> {
        match &mut self.half {
            RecvHalf::Quic(s) => match s.read_chunk(READ_CHUNK_BYTES, true).await {
                Ok(Some(chunk)) => {
                    self.buf.extend_from_slice(&chunk.bytes);
                    Ok(true)
                }
                Ok(None) => Ok(false),
                Err(quinn::ReadError::ConnectionLost(e)) => Err(connection_lost(&e)),
                Err(quinn::ReadError::Reset(code)) => {
                    Err(Error::ConnectionLost(format!("the broker reset the stream (code {code})")))
                }
                Err(e) => Err(Error::ConnectionLost(format!("read from the broker: {e}"))),
            },
            #[cfg(test)]
            RecvHalf::Memory(s) => {
                use tokio::io::AsyncReadExt;
                self.buf.reserve(READ_CHUNK_BYTES);
                let n = s.read_buf(&mut self.buf).await.map_err(|e| Error::ConnectionLost(format!("read: {e}")))?;
                Ok(n > 0)
            }
        }
    }

    /// Puts `frame` back in front of what is buffered, as if it had not been read yet.
    #[cfg(test)]
    pub fn unread(&mut self, frame: &Frame) {
        let mut buf = BytesMut::new();
        frame.encode(&mut buf);
        buf.extend_from_slice(&self.buf);
        self.buf = buf;
    }
}

/// What a writer task is asked to do.
#[derive(Debug)]
enum Outgoing {
    Frame(Frame),
    /// Write everything queued before, finish the stream, and report.
    Finish(oneshot::Sender<Result<(), Error>>),
}

/// The queue of a writer task. Sending never blocks: what is queued is bounded by the
/// producer's pending-message limit and the consumer's acknowledgement grouping.
#[derive(Debug, Clone)]
pub(crate) struct Outbox(mpsc::UnboundedSender<Outgoing>);

impl Outbox {
    /// Queues frames; false if the writer task has stopped (its error is in its join handle).
    pub fn send_all(&self, frames: impl IntoIterator<Item = Frame>) -> bool {
        frames.into_iter().all(|f| self.0.send(Outgoing::Frame(f)).is_ok())
    }

    /// Asks the writer task to finish the stream after what is queued, without waiting.
    pub fn finish_later(&self) {
        let (tx, _) = oneshot::channel();
        let _ = self.0.send(Outgoing::Finish(tx));
    }

    /// Writes what is queued, finishes the stream and waits for the broker to receive it.
    pub async fn finish(&self) -> Result<(), Error> {
        let (tx, rx) = oneshot::channel();
        if self.0.send(Outgoing::Finish(tx)).is_err() {
            return Err(Error::Closed("the stream's writer has stopped".into()));
        }
        rx.await.unwrap_or_else(|_| Err(Error::Closed("the stream's writer has stopped".into())))
    }
}

/// Starts the task that writes a stream's frames, coalescing what is queued into one write.
/// It ends after a finish request, when every [`Outbox`] is dropped (finishing the stream), or
/// at the first write error, which its join handle returns.
pub(crate) fn spawn_writer(
    mut writer: FrameWriter,
    finish_timeout: Duration,
) -> (Outbox, JoinHandle<Result<(), Error>>) {
    let (tx, mut rx) = mpsc::unbounded_channel::<Outgoing>();
    let task = tokio::spawn(async move {
        let mut frames = Vec::new();
        loop {
            let Some(first) = rx.recv().await else {
                return writer.finish(finish_timeout).await;
            };
            let mut finish = None;
            let mut bytes = 0;
            let mut next = Some(first);
            while let Some(out) = next.take() {
                match out {
                    Outgoing::Frame(f) => {
                        bytes += frame_size_hint(&f);
                        frames.push(f);
                    }
                    Outgoing::Finish(reply) => {
                        finish = Some(reply);
                        break;
                    }
                }
                if bytes < COALESCE_BYTES {
                    next = rx.try_recv().ok();
                }
            }
            if !frames.is_empty() {
                let written = writer.write_frames(&frames).await;
                frames.clear();
                if let Err(e) = written {
                    if let Some(reply) = finish {
                        let _ = reply.send(Err(e.clone()));
                    }
                    return Err(e);
                }
            }
            if let Some(reply) = finish {
                let result = writer.finish(finish_timeout).await;
                let _ = reply.send(result.clone());
                return result;
            }
        }
    });
    (Outbox(tx), task)
}

fn frame_size_hint(f: &Frame) -> usize {
    match f {
        Frame::Send { payload, .. } | Frame::Message { payload, .. } => 32 + payload.len(),
        Frame::Ack { positions, .. } | Frame::Redeliver { positions } => 16 + 16 * positions.len(),
        _ => 64,
    }
}

/// Brokers played by a test: the streams opened to each address go to its receiver.
#[cfg(test)]
#[derive(Debug, Clone, Default)]
pub(crate) struct MemoryNet {
    brokers: Arc<std::sync::Mutex<std::collections::HashMap<BrokerUrl, MemoryBroker>>>,
}

/// Where the streams opened to an in-memory broker go.
#[cfg(test)]
type MemoryBroker = mpsc::UnboundedSender<(FrameWriter, FrameReader)>;

#[cfg(test)]
pub(crate) type MemoryStreams = mpsc::UnboundedReceiver<(FrameWriter, FrameReader)>;

#[cfg(test)]
impl MemoryNet {
    /// Starts a broker at `url` (`quic://host:port`); its streams arrive on the receiver.
    pub fn add(&self, url: &str) -> MemoryStreams {
        let url = BrokerUrl::parse(url).expect("a test broker URL");
        let (tx, rx) = mpsc::unbounded_channel();
        self.brokers.lock().unwrap_or_else(|p| p.into_inner()).insert(url, tx);
        rx
    }

    fn connect(&self, url: &BrokerUrl) -> Result<Connection, Error> {
        match self.brokers.lock().unwrap_or_else(|p| p.into_inner()).get(url) {
            Some(tx) if !tx.is_closed() => Ok(Connection::Memory(tx.clone())),
            _ => Err(Error::Connect(format!("no answer from {url}: no test broker there"))),
        }
    }
}

/// Two in-memory streams: (client side, broker side).
#[cfg(test)]
pub(crate) fn memory_stream_pair() -> ((FrameWriter, FrameReader), (FrameWriter, FrameReader)) {
    let (client_out, broker_in) = tokio::io::duplex(64 * 1024);
    let (broker_out, client_in) = tokio::io::duplex(64 * 1024);
    (
        (FrameWriter::new(SendHalf::Memory(client_out)), FrameReader::new(RecvHalf::Memory(client_in))),
        (FrameWriter::new(SendHalf::Memory(broker_out)), FrameReader::new(RecvHalf::Memory(broker_in))),
    )
}

#[cfg(test)]
mod tests {
    use bytes::{BufMut, Bytes};
    use magnetar_common::ids::Position;

    use super::*;

    #[tokio::test]
    async fn frames_cross_a_stream_and_the_end_is_seen() {
        let ((client_w, _client_r), (_broker_w, mut broker_r)) = memory_stream_pair();
        let (outbox, writer) = spawn_writer(client_w, Duration::from_secs(1));
        // Batches on both sides of the size written without a copy, between other frames.
        let frames: Vec<Frame> = (0..100u64)
            .map(|i| match i as usize % 5 {
                4 => Frame::Flow { permits: i as u32 },
                k => {
                    let len = [100, ZERO_COPY_MIN_BYTES - 1, ZERO_COPY_MIN_BYTES, 70_000][k];
                    Frame::Send { sequence_id: i, num_messages: 1, payload: Bytes::from(vec![i as u8; len]) }
                }
            })
            .collect();
        assert!(outbox.send_all(frames.clone()));
        let finish = tokio::spawn({
            let outbox = outbox.clone();
            async move { outbox.finish().await }
        });
        for expected in &frames {
            assert_eq!(broker_r.next().await.expect("read").as_ref(), Some(expected));
        }
        assert_eq!(broker_r.next().await.expect("end"), None);
        finish.await.expect("join").expect("finish");
        writer.await.expect("join").expect("writer");
    }

    #[tokio::test]
    async fn oversized_and_truncated_frames_are_protocol_errors() {
        let ((_cw, mut client_r), (broker_w, _br)) = memory_stream_pair();
        let SendHalf::Memory(mut raw) = broker_w.half else { panic!("memory stream") };
        let mut b = BytesMut::new();
        b.put_u32((MAX_FRAME_BYTES + 1) as u32);
        tokio::io::AsyncWriteExt::write_all(&mut raw, &b).await.expect("write");
        let err = client_r.next().await.expect_err("too large");
        assert!(matches!(&err, Error::Protocol(m) if m.contains("exceeds the maximum")), "{err:?}");

        let ((_cw, mut client_r), (broker_w, _br)) = memory_stream_pair();
        let SendHalf::Memory(mut raw) = broker_w.half else { panic!("memory stream") };
        let frame = Frame::SendReceipt { sequence_id: 1, position: Position::new(1, 2) }.to_bytes();
        tokio::io::AsyncWriteExt::write_all(&mut raw, &frame[..frame.len() - 1]).await.expect("write");
        drop(raw);
        let err = client_r.next().await.expect_err("truncated");
        assert!(matches!(&err, Error::Protocol(m) if m.contains("middle of a frame")), "{err:?}");
    }

    #[test]
    fn untrusted_certificates_get_a_hint() {
        let e = tls_failure(42, "invalid peer certificate: UnknownIssuer", "localhost", false);
        let text = e.to_string();
        assert!(matches!(e, Error::Tls(_)));
        assert!(text.contains("certificate not trusted (invalid peer certificate: UnknownIssuer)"), "{text}");
        assert!(text.contains("--tls-trust-cert"), "{text}");

        let text = tls_failure(42, "invalid peer certificate: NotValidForName", "broker-1", false).to_string();
        assert!(text.contains("does not name \"broker-1\""), "{text}");

        let text = tls_failure(120, "peer doesn't support any known protocol", "localhost", true).to_string();
        assert!(text.contains("ALPN"), "{text}");
    }

    #[test]
    fn a_missing_or_empty_trust_file_is_a_clear_error() {
        let err = client_tls_config(Path::new("/nonexistent/cert.pem")).expect_err("missing");
        assert!(err.to_string().contains("/nonexistent/cert.pem"), "{err}");
        let dir = std::env::temp_dir().join(format!("magnetar-client-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, b"not a certificate\n").expect("write");
        let err = client_tls_config(&empty).expect_err("empty");
        assert!(err.to_string().contains("no certificate in"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
