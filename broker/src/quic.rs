//! The QUIC front-end: the only module that knows quinn. One connection per client; every
//! producer and consumer has its own bidirectional stream, so a slow consumer never stalls
//! another topic. Frames are decoded with `magnetar_common::wire`; requests go to the
//! [`BrokerService`]. A malformed frame closes that connection only.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use futures::FutureExt;
use magnetar_common::wire::{self, ErrorCode, Frame, ProducerRequest, SubscribeRequest};
use quinn::{Connection, Endpoint, RecvStream, SendStream, VarInt};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::config::BrokerConfig;
use crate::service::{BrokerService, ConsumerEvent, ServiceError, SubscribeParams};

/// Application close codes (append-only).
const CLOSE_SHUTDOWN: u32 = 1;
const CLOSE_PROTOCOL_ERROR: u32 = 2;

/// Largest UDP payload MTU discovery may try (the protocol's maximum).
const MAX_UDP_PAYLOAD_BYTES: u16 = 65_527;

/// Bytes of outgoing frames gathered before one write.
const WRITE_COALESCE_BYTES: usize = 256 * 1024;

#[derive(Debug)]
pub struct QuicServer {
    endpoint: Endpoint,
    local_addr: SocketAddr,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl QuicServer {
    pub fn start(
        config: &BrokerConfig,
        tls: Arc<rustls::ServerConfig>,
        service: Arc<BrokerService>,
    ) -> Result<Self, std::io::Error> {
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
            .map_err(|e| std::io::Error::other(format!("TLS configuration unusable for QUIC: {e}")))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        let mut transport = quinn::TransportConfig::default();
        transport
            .max_concurrent_bidi_streams(VarInt::from_u32(config.limits.max_streams_per_connection))
            .max_concurrent_uni_streams(VarInt::from_u32(0))
            .stream_receive_window(VarInt::from_u32(8 * 1024 * 1024))
            .receive_window(VarInt::from_u32(32 * 1024 * 1024))
            .send_window(32 * 1024 * 1024)
            .max_idle_timeout(Some(
                quinn::IdleTimeout::try_from(config.limits.idle_timeout)
                    .map_err(|e| std::io::Error::other(format!("idle_timeout: {e}")))?,
            ));
        // Larger datagrams where the path allows (loopback, jumbo frames) mean far fewer packets
        // and system calls per megabyte; discovery falls back to what the path carries.
        let mut mtu = quinn::MtuDiscoveryConfig::default();
        mtu.upper_bound(MAX_UDP_PAYLOAD_BYTES);
        transport.mtu_discovery_config(Some(mtu));
        server.transport_config(Arc::new(transport));
        let bound = magnetar_common::udp::bind(config.quic_addr, magnetar_common::udp::BUFFER_BYTES)?;
        info!(addr = %config.quic_addr, recv_buffer_bytes = bound.recv_buffer_bytes, "QUIC socket bound (raise net.core.rmem_max for a larger receive buffer)");
        let endpoint =
            Endpoint::new(quinn::EndpointConfig::default(), Some(server), bound.socket, Arc::new(quinn::TokioRuntime))?;
        let local_addr = endpoint.local_addr()?;
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let max_frame = config.max_message_bytes.as_u64() as usize + 64 * 1024;
        let per_connection = config.limits.max_pending_publishes_per_connection;
        let per_producer = config.limits.max_pending_publishes_per_producer;
        let limits = Limits { max_frame, per_connection, per_producer };
        tasks.spawn(accept_loop(endpoint.clone(), service, stop.clone(), tasks.clone(), limits));
        Ok(Self { endpoint, local_addr, stop, tasks })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops reading new requests, lets in-flight publishes answer, then closes connections.
    pub async fn shutdown(&self, drain: Duration) {
        self.stop.cancel();
        self.tasks.close();
        if tokio::time::timeout(drain, self.tasks.wait()).await.is_err() {
            warn!("QUIC streams did not drain in {drain:?}; closing connections");
        }
        self.endpoint.close(VarInt::from_u32(CLOSE_SHUTDOWN), b"broker shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }
}

#[derive(Debug, Clone, Copy)]
struct Limits {
    max_frame: usize,
    per_connection: usize,
    per_producer: usize,
}

async fn accept_loop(
    endpoint: Endpoint,
    service: Arc<BrokerService>,
    stop: CancellationToken,
    tasks: TaskTracker,
    limits: Limits,
) {
    loop {
        let incoming = tokio::select! {
            _ = stop.cancelled() => return,
            i = endpoint.accept() => match i { Some(i) => i, None => return },
        };
        let service = service.clone();
        let stop = stop.clone();
        let t = tasks.clone();
        tasks.spawn(async move {
            match incoming.await {
                Ok(conn) => serve_connection(conn, service, stop, t, limits).await,
                Err(e) => debug!(error = %e, "QUIC handshake failed"),
            }
        });
    }
}

async fn serve_connection(
    conn: Connection,
    service: Arc<BrokerService>,
    stop: CancellationToken,
    tasks: TaskTracker,
    limits: Limits,
) {
    let remote = conn.remote_address();
    debug!(%remote, "client connected");
    service.metrics().connections.inc();
    let publish_slots = Arc::new(Semaphore::new(limits.per_connection));
    loop {
        let (send, recv) = tokio::select! {
            _ = stop.cancelled() => break,
            s = conn.accept_bi() => match s {
                Ok(s) => s,
                Err(e) => {
                    debug!(%remote, reason = %e, "connection ended");
                    break;
                }
            },
        };
        let ctx = StreamCtx {
            service: service.clone(),
            conn: conn.clone(),
            stop: stop.clone(),
            limits,
            publish_slots: publish_slots.clone(),
        };
        tasks.spawn(serve_stream(ctx, send, recv));
    }
    service.metrics().connections.dec();
}

#[derive(Clone)]
struct StreamCtx {
    service: Arc<BrokerService>,
    conn: Connection,
    stop: CancellationToken,
    limits: Limits,
    publish_slots: Arc<Semaphore>,
}

/// Reads frames from one stream.
struct FrameReader {
    recv: RecvStream,
    buf: BytesMut,
    max_frame: usize,
}

enum ReadError {
    /// The peer finished or reset the stream, or the connection ended.
    Closed,
    /// The bytes are not a valid frame.
    Malformed(wire::FrameError),
}

impl FrameReader {
    async fn next(&mut self) -> Result<Frame, ReadError> {
        loop {
            match wire::decode(&mut self.buf, self.max_frame) {
                Ok(Some(f)) => return Ok(f),
                Ok(None) => {}
                Err(e) => return Err(ReadError::Malformed(e)),
            }
            match self.recv.read_chunk(self.max_frame, true).await {
                Ok(Some(chunk)) => self.buf.extend_from_slice(&chunk.bytes),
                Ok(None) | Err(_) => return Err(ReadError::Closed),
            }
        }
    }
}

fn protocol_error(conn: &Connection, e: &wire::FrameError) {
    warn!(remote = %conn.remote_address(), error = %e, "malformed frame; closing the connection");
    conn.close(VarInt::from_u32(CLOSE_PROTOCOL_ERROR), format!("malformed frame: {e}").as_bytes());
}

async fn write_frame(send: &mut SendStream, frame: &Frame) -> bool {
    send.write_all(&frame.to_bytes()).await.is_ok()
}

async fn refuse(mut send: SendStream, e: &ServiceError) {
    let _ = write_frame(&mut send, &Frame::Error { code: e.code(), message: e.to_string() }).await;
    let _ = send.finish();
}

async fn serve_stream(ctx: StreamCtx, send: SendStream, recv: RecvStream) {
    let mut reader = FrameReader { recv, buf: BytesMut::with_capacity(64 * 1024), max_frame: ctx.limits.max_frame };
    let first = tokio::select! {
        _ = ctx.stop.cancelled() => return,
        f = reader.next() => f,
    };
    match first {
        Ok(Frame::Producer(req)) => serve_producer(ctx, req, send, reader).await,
        Ok(Frame::Subscribe(req)) => serve_consumer(ctx, req, send, reader).await,
        Ok(Frame::Lookup { topic }) => serve_lookup(ctx, topic, send).await,
        Ok(other) => {
            let e = ServiceError::BadRequest(format!(
                "a stream must start with Producer, Subscribe or Lookup, not {}",
                other.name()
            ));
            refuse(send, &e).await;
        }
        Err(ReadError::Malformed(e)) => protocol_error(&ctx.conn, &e),
        Err(ReadError::Closed) => {}
    }
}

async fn serve_lookup(ctx: StreamCtx, topic: String, mut send: SendStream) {
    let frame = match ctx.service.lookup(&topic).await {
        Ok((topic, owner)) => {
            Frame::LookupResult { topic: topic.to_string(), broker_url: owner.broker_url, http_url: owner.http_url }
        }
        Err(e) => Frame::Error { code: e.code(), message: e.to_string() },
    };
    let _ = write_frame(&mut send, &frame).await;
    let _ = send.finish();
}

type Receipt = std::pin::Pin<Box<dyn Future<Output = Frame> + Send>>;

async fn serve_producer(ctx: StreamCtx, req: ProducerRequest, mut send: SendStream, mut reader: FrameReader) {
    let producer = match ctx.service.create_producer(&req.topic, &req.producer_name).await {
        Ok(p) => p,
        Err(e) => return refuse(send, &e).await,
    };
    let ready = Frame::ProducerReady {
        producer_name: producer.name().to_string(),
        topic: producer.topic().to_string(),
        max_message_bytes: producer.max_message_bytes(),
    };
    if !write_frame(&mut send, &ready).await {
        return;
    }
    info!(topic = %producer.topic(), producer = producer.name(), "producer attached");
    // The bounded queue is the per-producer limit on publishes in flight: when it is full the
    // reader stops reading, and QUIC flow control slows the client.
    let (tx, mut rx) = mpsc::channel::<Receipt>(ctx.limits.per_producer);
    let writer = tokio::spawn(async move {
        let mut buf = BytesMut::with_capacity(64 * 1024);
        let mut next: Option<Receipt> = None;
        loop {
            let receipt = match next.take() {
                Some(r) => r,
                None => match rx.recv().await {
                    Some(r) => r,
                    None => break,
                },
            };
            receipt.await.encode(&mut buf);
            // Add the receipts that are already resolved, without waiting for the others: a
            // receipt must never be held back behind a later, slower one.
            while buf.len() < WRITE_COALESCE_BYTES {
                let Ok(mut r) = rx.try_recv() else { break };
                match (&mut r).now_or_never() {
                    Some(frame) => frame.encode(&mut buf),
                    None => {
                        next = Some(r);
                        break;
                    }
                }
            }
            if send.write_all(&buf).await.is_err() {
                return;
            }
            buf.clear();
        }
        let _ = send.finish();
    });
    let unloaded = producer.unloaded();
    tokio::pin!(unloaded);
    loop {
        let frame = tokio::select! {
            _ = ctx.stop.cancelled() => break,
            _ = &mut unloaded => {
                // Receipts in flight go out first (the queue is in order), then the stream ends.
                let msg = format!("topic {} unloaded from this broker; look it up again", producer.topic());
                let _ = tx.send(Box::pin(std::future::ready(Frame::Error { code: ErrorCode::NotOwner, message: msg }))).await;
                break;
            }
            f = reader.next() => f,
        };
        match frame {
            Ok(Frame::Send { sequence_id, num_messages, payload }) => {
                let Ok(slot) = ctx.publish_slots.clone().acquire_owned().await else { break };
                let receipt: Receipt = match producer.publish(payload, num_messages).await {
                    // Driven by its own task, so publish memory and the connection's slot are
                    // released when the entry is stored, even if this client reads its receipts
                    // slowly (a slow reader must not hold the broker's publish budget).
                    Ok(done) => {
                        let task = tokio::spawn(async move {
                            let r = done.await;
                            drop(slot);
                            match r {
                                Ok(position) => Frame::SendReceipt { sequence_id, position },
                                Err(e) => Frame::SendError { sequence_id, code: e.code(), message: e.to_string() },
                            }
                        });
                        Box::pin(async move {
                            task.await.unwrap_or_else(|e| Frame::SendError {
                                sequence_id,
                                code: ErrorCode::Internal,
                                message: format!("publish task failed: {e}"),
                            })
                        })
                    }
                    Err(e) => Box::pin(std::future::ready(Frame::SendError {
                        sequence_id,
                        code: e.code(),
                        message: e.to_string(),
                    })),
                };
                if tx.send(receipt).await.is_err() {
                    break;
                }
            }
            Ok(other) => {
                let msg = format!("unexpected {} frame on a producer stream", other.name());
                let _ = tx
                    .send(Box::pin(std::future::ready(Frame::Error { code: ErrorCode::BadRequest, message: msg })))
                    .await;
                break;
            }
            Err(ReadError::Malformed(e)) => {
                protocol_error(&ctx.conn, &e);
                break;
            }
            Err(ReadError::Closed) => break,
        }
    }
    // Answer what is in flight, then end the stream.
    drop(tx);
    let _ = writer.await;
    debug!(topic = %producer.topic(), producer = producer.name(), "producer detached");
}

async fn serve_consumer(ctx: StreamCtx, req: SubscribeRequest, mut send: SendStream, mut reader: FrameReader) {
    let params = SubscribeParams {
        subscription: req.subscription.clone(),
        subscription_type: req.subscription_type,
        initial_position: req.initial_position,
        consumer_name: if req.consumer_name.is_empty() {
            format!("consumer-{:08x}", rand::random::<u32>())
        } else {
            req.consumer_name.clone()
        },
        priority: req.priority,
        durable: req.durable,
        start: req.start,
        ack_timeout: (req.ack_timeout_ms > 0).then(|| Duration::from_millis(u64::from(req.ack_timeout_ms))),
    };
    let (handle, mut events) = match ctx.service.subscribe(&req.topic, params).await {
        Ok(x) => x,
        Err(e) => return refuse(send, &e).await,
    };
    if !write_frame(&mut send, &Frame::SubscribeReady { topic: handle.topic().to_string() }).await {
        handle.close().await;
        return;
    }
    info!(topic = %handle.topic(), subscription = %req.subscription, "consumer attached");
    let (errors_tx, mut errors_rx) = mpsc::unbounded_channel::<Frame>();
    let writer = tokio::spawn(async move {
        // Payloads go to QUIC as they are (shared with the cache), behind small headers.
        let mut out = Outgoing::default();
        loop {
            tokio::select! {
                biased;
                f = errors_rx.recv() => match f {
                    Some(f) => out.frame(&f),
                    None => {
                        let _ = send.finish();
                        return;
                    }
                },
                ev = events.recv() => {
                    let Some(ev) = ev else {
                        // The topic was unloaded (it moves to another broker, or this one stops).
                        let f = Frame::Error { code: ErrorCode::NotOwner, message: "topic unloaded from this broker; look it up again".into() };
                        let _ = write_frame(&mut send, &f).await;
                        let _ = send.finish();
                        return;
                    };
                    out.event(ev);
                    while out.bytes < WRITE_COALESCE_BYTES {
                        match events.try_recv() {
                            Ok(ev) => out.event(ev),
                            Err(_) => break,
                        }
                    }
                }
            }
            if out.write(&mut send).await.is_err() {
                return;
            }
        }
    });
    loop {
        let frame = tokio::select! {
            _ = ctx.stop.cancelled() => break,
            f = reader.next() => f,
        };
        match frame {
            Ok(Frame::Flow { permits }) => handle.flow(permits),
            Ok(Frame::Ack { cumulative, positions }) => {
                if let Err(e) = handle.ack(positions, cumulative) {
                    // An error frame ends the stream (protocol rule).
                    let _ = errors_tx.send(Frame::Error { code: e.code(), message: e.to_string() });
                    break;
                }
            }
            Ok(Frame::Redeliver { positions }) => handle.redeliver(positions),
            Ok(other) => {
                let message = format!("unexpected {} frame on a consumer stream", other.name());
                let _ = errors_tx.send(Frame::Error { code: ErrorCode::BadRequest, message });
                break;
            }
            Err(ReadError::Malformed(e)) => {
                protocol_error(&ctx.conn, &e);
                break;
            }
            Err(ReadError::Closed) => break,
        }
    }
    drop(errors_tx);
    handle.close().await;
    let _ = writer.await;
}

/// Frames waiting for one write: headers encoded together, payloads kept as shared buffers.
#[derive(Default)]
struct Outgoing {
    headers: BytesMut,
    chunks: Vec<bytes::Bytes>,
    bytes: usize,
}

impl Outgoing {
    fn event(&mut self, ev: ConsumerEvent) {
        match ev {
            ConsumerEvent::Message { position, redelivery_count, payload } => {
                wire::encode_message_header(position, redelivery_count, payload.len(), &mut self.headers);
                self.bytes += payload.len() + 25;
                self.chunks.push(self.headers.split().freeze());
                self.chunks.push(payload);
            }
            ConsumerEvent::ActiveChange { active } => self.frame(&Frame::ActiveConsumerChange { active }),
        }
    }

    fn frame(&mut self, f: &Frame) {
        f.encode(&mut self.headers);
        self.bytes += self.headers.len();
        self.chunks.push(self.headers.split().freeze());
    }

    async fn write(&mut self, send: &mut SendStream) -> Result<(), quinn::WriteError> {
        let result = send.write_all_chunks(&mut self.chunks).await;
        self.chunks.clear();
        self.bytes = 0;
        result
    }
}
