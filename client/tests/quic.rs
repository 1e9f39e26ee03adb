//! The client over real QUIC and TLS on 127.0.0.1, against a minimal fake broker: it stores
//! every batch it is sent, replays them to any subscriber, and reports acknowledgements. This
//! checks the transport (TLS trust, server name, ALPN, framing) end to end; the real broker's
//! behaviour is tested with the broker.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use magnetar_client::{Client, Error, InitialPosition, MessageId, Position, SubscriptionType};
use magnetar_common::wire::{self, Frame};
use tokio::sync::mpsc;

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
}

/// What the fake broker saw: stored batches and acknowledgements.
#[derive(Default)]
struct Log {
    entries: Vec<Bytes>,
}

struct FakeBroker {
    addr: SocketAddr,
    acks: mpsc::UnboundedReceiver<(bool, Vec<Position>)>,
    _endpoint: quinn::Endpoint,
}

fn server_config() -> quinn::ServerConfig {
    let cert_pem = std::fs::read(data("broker-cert.pem")).expect("read cert");
    let key_pem = std::fs::read(data("broker-key.pem")).expect("read key");
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

async fn start_broker() -> FakeBroker {
    let endpoint = quinn::Endpoint::server(server_config(), "127.0.0.1:0".parse().expect("addr")).expect("endpoint");
    let addr = endpoint.local_addr().expect("local addr");
    let (acks_tx, acks) = mpsc::unbounded_channel();
    let log = Arc::new(Mutex::new(Log::default()));
    let server = endpoint.clone();
    tokio::spawn(async move {
        while let Some(incoming) = server.accept().await {
            let (log, acks_tx) = (log.clone(), acks_tx.clone());
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                while let Ok((send, recv)) = conn.accept_bi().await {
                    tokio::spawn(serve_stream(send, recv, log.clone(), acks_tx.clone()));
                }
            });
        }
    });
    FakeBroker { addr, acks, _endpoint: endpoint }
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

async fn write_frame(send: &mut quinn::SendStream, f: Frame) {
    send.write_all(&f.to_bytes()).await.expect("write");
}

async fn serve_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    log: Arc<Mutex<Log>>,
    acks: mpsc::UnboundedSender<(bool, Vec<Position>)>,
) {
    let mut buf = BytesMut::new();
    let mut delivered = 0;
    while let Some(frame) = read_frame(&mut recv, &mut buf).await {
        match frame {
            Frame::Producer(req) => {
                let topic = format!("persistent://public/default/{}", req.topic);
                let ready = Frame::ProducerReady { producer_name: "fake-0".into(), topic, max_message_bytes: 5 << 20 };
                write_frame(&mut send, ready).await;
            }
            Frame::Send { sequence_id, payload, .. } => {
                let entry_id = {
                    let mut log = log.lock().expect("log");
                    log.entries.push(payload);
                    log.entries.len() as u64 - 1
                };
                write_frame(&mut send, Frame::SendReceipt { sequence_id, position: Position::new(1, entry_id) }).await;
            }
            Frame::Subscribe(req) => {
                let topic = format!("persistent://public/default/{}", req.topic);
                write_frame(&mut send, Frame::SubscribeReady { topic }).await;
            }
            Frame::Flow { .. } => {
                let entries: Vec<Bytes> = log.lock().expect("log").entries[delivered..].to_vec();
                for payload in entries {
                    let position = Position::new(1, delivered as u64);
                    write_frame(&mut send, Frame::Message { position, redelivery_count: 0, payload }).await;
                    delivered += 1;
                }
            }
            Frame::Ack { cumulative, positions } => {
                let _ = acks.send((cumulative, positions));
            }
            other => panic!("the fake broker does not handle {other:?}"),
        }
    }
    let _ = send.finish();
}

async fn client(broker: &FakeBroker, cert: &str) -> Result<Client, Error> {
    Client::builder(format!("quic://{}", broker.addr))
        .tls_trust_cert(data(cert))
        .connect_timeout(Duration::from_secs(10))
        .build()
        .await
}

#[tokio::test]
async fn produce_and_consume_over_quic() {
    let mut broker = start_broker().await;
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
    let broker = start_broker().await;
    let err = client(&broker, "other-cert.pem").await.expect_err("untrusted");
    let text = err.to_string();
    assert!(matches!(err, Error::Tls(_)), "{err:?}");
    assert!(text.contains("certificate not trusted"), "{text}");
    assert!(text.contains("UnknownIssuer"), "{text}");
    assert!(text.contains("--tls-trust-cert"), "{text}");
}

#[tokio::test]
async fn a_certificate_for_another_name_is_refused() {
    let broker = start_broker().await;
    let err = Client::builder(format!("quic://{}", broker.addr))
        .tls_trust_cert(data("broker-cert.pem"))
        .server_name("broker.example")
        .build()
        .await
        .expect_err("wrong name");
    assert!(matches!(&err, Error::Tls(m) if m.contains("does not name \"broker.example\"")), "{err:?}");
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
