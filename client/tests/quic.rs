//! The client over real QUIC and TLS on 127.0.0.1, against a minimal fake broker: it answers
//! lookups with its own address, stores every batch it is sent, delivers the stored batches to
//! subscribers from their subscription's cursor (within their permits), and reports
//! acknowledgements. It runs on a runtime of its own, so a test can crash it (the runtime is
//! dropped: no close reaches the client, as with `kill -9`) or shut it down cleanly, then start
//! it again on the same port with the same stored log. This checks the transport (TLS trust,
//! server name, ALPN, framing) and reconnection end to end; the real broker's behaviour is
//! tested with the broker.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use magnetar_client::{Client, Error, InitialPosition, MessageId, Position, SubscriptionType};
use magnetar_common::batch;
use magnetar_common::testing::wait_until;
use magnetar_common::wire::{self, Frame};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

const WAIT: Duration = Duration::from_secs(60);

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
}

/// What the fake broker stores; it outlives restarts.
#[derive(Default)]
struct Log {
    entries: Vec<Bytes>,
    /// Messages stored (entries hold batches).
    messages: usize,
    /// Acknowledged entries per subscription: the "persisted cursors".
    acked: HashMap<String, BTreeSet<u64>>,
}

struct State {
    log: Mutex<Log>,
    /// The number of stored entries, for consumers waiting for new ones.
    stored: watch::Sender<usize>,
    acks: mpsc::UnboundedSender<(bool, Vec<Position>)>,
    /// Store batches but answer no receipt: they are in flight when the broker goes.
    hold_receipts: AtomicBool,
    /// `quic://127.0.0.1:PORT`, known once bound.
    url: OnceLock<String>,
    /// The test certificate it serves (`NAME` of `tests/data/NAME-cert.pem`).
    cert: &'static str,
}

struct FakeBroker {
    addr: SocketAddr,
    acks: mpsc::UnboundedReceiver<(bool, Vec<Position>)>,
    state: Arc<State>,
    runtime: Option<(tokio::runtime::Runtime, quinn::Endpoint)>,
}

/// The server side of TLS with the test certificate `NAME-cert.pem` and its key.
fn server_config(name: &str) -> quinn::ServerConfig {
    let cert_pem = std::fs::read(data(&format!("{name}-cert.pem"))).expect("read cert");
    let key_pem = std::fs::read(data(&format!("{name}-key.pem"))).expect("read key");
    let certs = rustls_pemfile::certs(&mut cert_pem.as_slice()).collect::<Result<Vec<_>, _>>().expect("certs");
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice()).expect("key").expect("a key");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("certificate");
    tls.alpn_protocols = vec![magnetar_client::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).expect("QUIC TLS");
    quinn::ServerConfig::with_crypto(Arc::new(crypto))
}

/// Starts serving on `addr` (port 0: any) on a new runtime; retries while the port is still
/// held by the previous run.
async fn serve_on(addr: SocketAddr, state: Arc<State>) -> (tokio::runtime::Runtime, quinn::Endpoint) {
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("broker runtime");
    let deadline = Instant::now() + WAIT;
    let endpoint = loop {
        let bound = {
            let _in_runtime = runtime.enter();
            quinn::Endpoint::server(server_config(state.cert), addr)
        };
        match bound {
            Ok(e) => break e,
            Err(e) if Instant::now() < deadline => {
                eprintln!("bind {addr}: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("bind {addr}: {e}"),
        }
    };
    let url = format!("quic://{}", endpoint.local_addr().expect("local addr"));
    state.url.get_or_init(|| url);
    let server = endpoint.clone();
    runtime.spawn(async move {
        while let Some(incoming) = server.accept().await {
            let state = state.clone();
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                while let Ok((send, recv)) = conn.accept_bi().await {
                    tokio::spawn(serve_stream(send, recv, state.clone()));
                }
            });
        }
    });
    (runtime, endpoint)
}

impl FakeBroker {
    async fn start() -> FakeBroker {
        Self::start_with_cert("broker").await
    }

    async fn start_with_cert(cert: &'static str) -> FakeBroker {
        let (acks_tx, acks) = mpsc::unbounded_channel();
        let state = Arc::new(State {
            log: Mutex::new(Log::default()),
            stored: watch::channel(0).0,
            acks: acks_tx,
            hold_receipts: AtomicBool::new(false),
            url: OnceLock::new(),
            cert,
        });
        let (runtime, endpoint) = serve_on("127.0.0.1:0".parse().expect("addr"), state.clone()).await;
        let addr = endpoint.local_addr().expect("local addr");
        FakeBroker { addr, acks, state, runtime: Some((runtime, endpoint)) }
    }

    fn url(&self) -> String {
        format!("quic://{}", self.addr)
    }

    /// Dies without a word (its runtime is dropped), then starts again on the same port.
    async fn crash_and_restart(&mut self) {
        if let Some((runtime, _endpoint)) = self.runtime.take() {
            stop_runtime(runtime).await;
        }
        self.state.hold_receipts.store(false, Ordering::SeqCst);
        self.runtime = Some(serve_on(self.addr, self.state.clone()).await);
    }

    /// Closes every connection (as a broker shutting down), then starts again on the same port.
    async fn shut_down_and_restart(&mut self) {
        if let Some((runtime, endpoint)) = self.runtime.take() {
            endpoint.close(0u32.into(), b"restarting");
            endpoint.wait_idle().await;
            stop_runtime(runtime).await;
        }
        self.state.hold_receipts.store(false, Ordering::SeqCst);
        self.runtime = Some(serve_on(self.addr, self.state.clone()).await);
    }

    fn stored_messages(&self) -> usize {
        self.state.log.lock().expect("log").messages
    }
}

impl Drop for FakeBroker {
    fn drop(&mut self) {
        if let Some((runtime, _endpoint)) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

async fn stop_runtime(runtime: tokio::runtime::Runtime) {
    tokio::task::spawn_blocking(move || runtime.shutdown_timeout(Duration::from_secs(5))).await.expect("stop runtime");
}

async fn read_frame(recv: &mut quinn::RecvStream, buf: &mut BytesMut) -> Option<Frame> {
    loop {
        if let Some(f) = wire::decode(buf, magnetar_client::MAX_FRAME_BYTES).expect("valid frame") {
            return Some(f);
        }
        let chunk = recv.read_chunk(64 * 1024, true).await.ok()??;
        buf.extend_from_slice(&chunk.bytes);
    }
}

async fn write_frame(send: &mut quinn::SendStream, f: Frame) -> bool {
    send.write_all(&f.to_bytes()).await.is_ok()
}

fn full_name(topic: &str) -> String {
    if topic.contains("://") { topic.to_string() } else { format!("persistent://public/default/{topic}") }
}

async fn serve_stream(mut send: quinn::SendStream, mut recv: quinn::RecvStream, state: Arc<State>) {
    let mut buf = BytesMut::new();
    match read_frame(&mut recv, &mut buf).await {
        Some(Frame::Lookup { topic }) => {
            let answer = Frame::LookupResult {
                topic: full_name(&topic),
                broker_url: state.url.get().cloned().unwrap_or_default(),
                http_url: String::new(),
            };
            write_frame(&mut send, answer).await;
        }
        Some(Frame::Producer(req)) => {
            let producer_name = if req.producer_name.is_empty() { "fake-0".to_string() } else { req.producer_name };
            let ready =
                Frame::ProducerReady { producer_name, topic: full_name(&req.topic), max_message_bytes: 5 << 20 };
            if write_frame(&mut send, ready).await {
                serve_producer(send, recv, buf, state).await;
            }
            return;
        }
        Some(Frame::Subscribe(req)) => {
            let ready = Frame::SubscribeReady { topic: full_name(&req.topic) };
            if write_frame(&mut send, ready).await {
                serve_consumer(send, recv, buf, req.subscription, state).await;
            }
            return;
        }
        Some(other) => panic!("the fake broker does not handle {other:?} first"),
        None => {}
    }
    let _ = send.finish();
}

async fn serve_producer(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    mut buf: BytesMut,
    state: Arc<State>,
) {
    while let Some(frame) = read_frame(&mut recv, &mut buf).await {
        let Frame::Send { sequence_id, num_messages, payload } = frame else {
            panic!("the fake broker does not handle {frame:?} from a producer");
        };
        let entry_id = {
            let mut log = state.log.lock().expect("log");
            log.entries.push(payload);
            log.messages += num_messages as usize;
            log.entries.len() as u64 - 1
        };
        state.stored.send_replace(entry_id as usize + 1);
        if state.hold_receipts.load(Ordering::SeqCst) {
            continue;
        }
        let receipt = Frame::SendReceipt { sequence_id, position: Position::new(1, entry_id) };
        if !write_frame(&mut send, receipt).await {
            return;
        }
    }
    let _ = send.finish();
}

async fn serve_consumer(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    mut buf: BytesMut,
    subscription: String,
    state: Arc<State>,
) {
    let mut stored = state.stored.subscribe();
    let mut permits: i64 = 0;
    // From the subscription's cursor: the first entry not acknowledged.
    let mut next = {
        let log = state.log.lock().expect("log");
        let acked = log.acked.get(&subscription);
        (0..).find(|i| !acked.is_some_and(|a| a.contains(i))).unwrap_or(0)
    };
    loop {
        // Deliver what permits allow, skipping acknowledged entries.
        loop {
            let entry = {
                let log = state.log.lock().expect("log");
                let acked = log.acked.get(&subscription);
                while (next as usize) < log.entries.len() && acked.is_some_and(|a| a.contains(&next)) {
                    next += 1;
                }
                log.entries.get(next as usize).cloned()
            };
            let Some(payload) = entry.filter(|_| permits > 0) else { break };
            permits -= i64::from(batch::read_header(&payload).expect("stored batch").num_messages);
            let message = Frame::Message { position: Position::new(1, next), redelivery_count: 0, payload };
            if !write_frame(&mut send, message).await {
                return;
            }
            next += 1;
        }
        tokio::select! {
            frame = read_frame(&mut recv, &mut buf) => match frame {
                Some(Frame::Flow { permits: p }) => permits += i64::from(p),
                Some(Frame::Ack { cumulative, positions }) => {
                    {
                        let mut log = state.log.lock().expect("log");
                        let acked = log.acked.entry(subscription.clone()).or_default();
                        for p in &positions {
                            if cumulative {
                                acked.extend(0..=p.entry_id);
                            } else {
                                acked.insert(p.entry_id);
                            }
                        }
                    }
                    let _ = state.acks.send((cumulative, positions));
                }
                Some(other) => panic!("the fake broker does not handle {other:?} from a consumer"),
                None => break,
            },
            changed = stored.changed() => if changed.is_err() { break },
        }
    }
    let _ = send.finish();
}

async fn client(broker: &FakeBroker, cert: &str) -> Result<Client, Error> {
    Client::builder(broker.url()).tls_trust_cert(data(cert)).connect_timeout(Duration::from_secs(10)).build().await
}

#[tokio::test]
async fn produce_and_consume_over_quic() {
    let mut broker = FakeBroker::start().await;
    let client = client(&broker, "broker-cert.pem").await.expect("connect");

    let producer = client.producer("t").create().await.expect("producer");
    assert_eq!(producer.name(), "fake-0");
    let mut receipts = Vec::new();
    for i in 0..10 {
        receipts.push(producer.send_async(format!("message {i}")).await.expect("queued"));
    }
    let mut ids = Vec::new();
    for r in receipts {
        ids.push(r.await.expect("stored"));
    }
    let big = producer.send(vec![7u8; 1 << 20]).await.expect("1 MiB message");
    producer.close().await.expect("close producer");
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");

    let consumer = client
        .subscribe("t", "sub")
        .subscription_type(SubscriptionType::Exclusive)
        .initial_position(InitialPosition::Earliest)
        .ack_group_time(Duration::from_secs(3600))
        .subscribe()
        .await
        .expect("consumer");
    assert_eq!(consumer.topic(), "persistent://public/default/t");
    for (i, id) in ids.iter().enumerate() {
        let m = consumer.receive().await.expect("message");
        assert_eq!(&m.id, id);
        assert_eq!(m.payload, Bytes::from(format!("message {i}")));
        assert_eq!(&*m.producer_name, "fake-0");
        consumer.ack(&m.id).expect("ack");
    }
    let m = consumer.receive().await.expect("big message");
    assert_eq!((m.id, m.payload.len()), (big, 1 << 20));
    consumer.ack_cumulative(&m.id).expect("ack");
    consumer.close().await.expect("close consumer");

    // Acknowledgements were grouped until close; they arrived before the stream's end.
    let mut cumulative = None;
    let mut individual: Vec<Position> = Vec::new();
    while cumulative.is_none() {
        let (is_cumulative, positions) = broker.acks.recv().await.expect("acks");
        if is_cumulative {
            cumulative = positions.first().copied();
        } else {
            individual.extend(positions);
        }
    }
    assert_eq!(cumulative, Some(big.position));
    let mut batch_positions: Vec<Position> = ids.iter().map(|id: &MessageId| id.position).collect();
    batch_positions.dedup();
    assert!(individual.iter().all(|p| batch_positions.contains(p)), "{individual:?}");
    client.close().await;
}

#[tokio::test]
async fn an_untrusted_certificate_is_refused_with_a_hint() {
    let broker = FakeBroker::start().await;
    let err = client(&broker, "other-cert.pem").await.expect_err("untrusted");
    let text = err.to_string();
    assert!(matches!(err, Error::Tls(_)), "{err:?}");
    assert!(text.contains("certificate not trusted"), "{text}");
    assert!(text.contains("UnknownIssuer"), "{text}");
    assert!(text.contains("--tls-trust-cert"), "{text}");
}

#[tokio::test]
async fn a_certificate_for_another_name_is_refused() {
    let broker = FakeBroker::start().await;
    let err = Client::builder(format!("quic://{}", broker.addr))
        .tls_trust_cert(data("broker-cert.pem"))
        .server_name("broker.example")
        .build()
        .await
        .expect_err("wrong name");
    assert!(matches!(&err, Error::Tls(m) if m.contains("does not name \"broker.example\"")), "{err:?}");
}

#[tokio::test]
async fn an_ip_address_is_checked_against_the_certificate_as_that_address() {
    // The certificate names localhost only: connecting by 127.0.0.1 must not accept it.
    let broker = FakeBroker::start_with_cert("localhost-only").await;
    let err = client(&broker, "localhost-only-cert.pem").await.expect_err("the address is not named");
    assert!(matches!(&err, Error::Tls(m) if m.contains("does not name \"127.0.0.1\"")), "{err:?}");
    // Naming the server explicitly is the way to use such a certificate by address.
    let client = Client::builder(broker.url())
        .tls_trust_cert(data("localhost-only-cert.pem"))
        .server_name("localhost")
        .build()
        .await
        .expect("connect with the certificate's name");
    client.producer("t").create().await.expect("producer");
    client.close().await;
}

#[tokio::test]
async fn a_silent_address_times_out_with_a_clear_error() {
    // A bound UDP socket that never answers.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let addr = silent.local_addr().expect("addr");
    let err = Client::builder(format!("quic://{addr}"))
        .tls_trust_cert(data("broker-cert.pem"))
        .connect_timeout(Duration::from_millis(300))
        .build()
        .await
        .expect_err("no broker");
    assert!(matches!(&err, Error::Connect(m) if m.contains("no answer from")), "{err:?}");
    assert!(err.is_retryable());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_and_consumer_ride_through_broker_restarts() {
    const N: u32 = 3000;
    let mut broker = FakeBroker::start().await;
    // A second bootstrap broker that never answers: lookups go on without it.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let url = format!("{},{}", broker.url(), silent.local_addr().expect("addr"));
    let client = Client::builder(url)
        .tls_trust_cert(data("broker-cert.pem"))
        .connect_timeout(Duration::from_secs(2))
        .connection_idle_timeout(Duration::from_secs(1))
        .build()
        .await
        .expect("connect");
    let producer = client.producer("t").name("p1").batching_max_messages(20).create().await.expect("producer");
    let consumer = client
        .subscribe("t", "sub")
        .initial_position(InitialPosition::Earliest)
        .receiver_queue_size(100)
        .ack_group_time(Duration::from_millis(5))
        .subscribe()
        .await
        .expect("consumer");

    // The consumer acknowledges every message and records its payload, until it has seen all.
    let consumer = Arc::new(consumer);
    let consume = tokio::spawn({
        let consumer = consumer.clone();
        async move {
            let mut seen = Vec::new();
            let mut distinct = BTreeSet::new();
            while distinct.len() < N as usize {
                let m = consumer.receive().await?;
                let i: u32 = std::str::from_utf8(&m.payload).expect("utf-8").parse().expect("a number");
                consumer.ack(&m.id)?;
                seen.push(i);
                distinct.insert(i);
            }
            Ok::<_, Error>(seen)
        }
    });

    let mut receipts = Vec::new();
    for i in 0..1000 {
        receipts.push(producer.send_async(i.to_string()).await.expect("queued"));
    }
    // Stored but not confirmed when the broker dies: the producer must send them again.
    broker.state.hold_receipts.store(true, Ordering::SeqCst);
    for i in 1000..1500 {
        receipts.push(producer.send_async(i.to_string()).await.expect("queued"));
    }
    wait_until("messages up to 1499 stored", WAIT, || async { broker.stored_messages() >= 1500 }).await;
    broker.crash_and_restart().await;
    // Queued while the producer finds out (after the idle timeout) and reconnects.
    for i in 1500..2000 {
        receipts.push(producer.send_async(i.to_string()).await.expect("queued"));
    }
    wait_until("reconnections after the crash", WAIT, || async {
        producer.reconnects() >= 1 && consumer.reconnects() >= 1
    })
    .await;
    for i in 2000..2200 {
        receipts.push(producer.send_async(i.to_string()).await.expect("queued"));
    }
    broker.shut_down_and_restart().await;
    for i in 2200..N {
        receipts.push(producer.send_async(i.to_string()).await.expect("queued"));
    }
    let ids = tokio::time::timeout(WAIT, futures::future::try_join_all(receipts))
        .await
        .expect("receipts in time")
        .expect("every message acknowledged");
    assert_eq!(ids.len(), N as usize);
    assert!(producer.reconnects() >= 2, "producer reconnects: {}", producer.reconnects());
    producer.close().await.expect("close producer");

    let seen = tokio::time::timeout(WAIT, consume).await.expect("consumed in time").expect("join").expect("consume");
    let consumer = Arc::into_inner(consumer).expect("the task is done");
    assert!(consumer.reconnects() >= 2, "consumer reconnects: {}", consumer.reconnects());
    consumer.close().await.expect("close consumer");
    // Every acknowledged message arrived, in the producer's order; repeats are allowed (at least
    // once), gaps and reordering are not.
    let mut firsts = Vec::new();
    let mut distinct = BTreeSet::new();
    for i in &seen {
        if distinct.insert(*i) {
            firsts.push(*i);
        }
    }
    assert_eq!(firsts, (0..N).collect::<Vec<_>>());
    eprintln!("{} messages received for {N} sent; {} stored", seen.len(), broker.stored_messages());
    client.close().await;
}
