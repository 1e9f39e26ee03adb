//! The QUIC front-end with a real client: bad input gets clear errors, and a malformed frame
//! closes only the connection that sent it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use magnetar_bookie::config::{BookieConfig, DiskConfig};
use magnetar_bookie::server::BookieServer;
use magnetar_broker::{Broker, BrokerConfig};
use magnetar_client::{Client, Error, ErrorCode, InitialPosition, OutgoingMessage};

const WAIT: Duration = Duration::from_secs(30);

struct Env {
    _dir: tempfile::TempDir,
    bookie: BookieServer,
    broker: Broker,
}

async fn start() -> Env {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("embedded:{}", dir.path().join("meta").display());
    let store = magnetar_common::metadata::connect(&url).await.expect("store");
    let bookie = BookieServer::start_with_store(
        BookieConfig {
            bookie_id: "b1".into(),
            listen_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            metadata_url: url.clone(),
            journal_dir: dir.path().join("journal"),
            ledger_dir: dir.path().join("ledgers"),
            // Not a disk-full test: the host's own disk usage must not make the bookie read-only.
            disk: DiskConfig { usage_threshold: 1.0, ..DiskConfig::default() },
            ..BookieConfig::default()
        },
        store.clone(),
    )
    .await
    .expect("bookie");
    let mut cfg = BrokerConfig {
        quic_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        http_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        metadata_url: url,
        data_dir: dir.path().join("broker"),
        max_message_bytes: bytesize::ByteSize::kib(64),
        ..BrokerConfig::default()
    };
    cfg.ledger.ensemble_size = 1;
    cfg.ledger.write_quorum = 1;
    cfg.ledger.ack_quorum = 1;
    let broker = Broker::start(cfg, store).await.expect("broker");
    Env { _dir: dir, bookie, broker }
}

async fn client(env: &Env) -> Client {
    Client::builder(format!("quic://{}", env.broker.quic_addr()))
        .tls_trust_cert(env.broker.cert_file())
        .build()
        .await
        .expect("connect")
}

/// A raw QUIC connection trusting the broker's certificate.
async fn raw_connection(env: &Env) -> quinn::Connection {
    let mut roots = rustls::RootCertStore::empty();
    for c in magnetar_broker::tls::load_certs(env.broker.cert_file()).expect("cert") {
        roots.add(c).expect("root");
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![magnetar_broker::tls::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("QUIC TLS");
    let mut endpoint = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0))).expect("endpoint");
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    endpoint.connect(env.broker.quic_addr(), "localhost").expect("connect").await.expect("handshake")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_frame_closes_only_its_connection() {
    let env = start().await;
    let good = client(&env).await;
    let producer = good.producer("t").create().await.expect("producer");
    producer.send("before").await.expect("send");

    let bad = raw_connection(&env).await;
    let (mut send, _recv) = bad.open_bi().await.expect("stream");
    // Length 3, kind 99 (unknown), two bytes of body.
    send.write_all(&[0, 0, 0, 3, 99, 1, 2]).await.expect("write");
    let reason = tokio::time::timeout(WAIT, bad.closed()).await.expect("closed in time");
    match reason {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(c.error_code, quinn::VarInt::from_u32(2));
            let text = String::from_utf8_lossy(&c.reason);
            assert!(text.contains("unknown frame kind 99"), "{text}");
        }
        other => panic!("unexpected close: {other:?}"),
    }
    // The well-behaved client carries on.
    producer.send("after").await.expect("send after the bad connection");
    let consumer = good.subscribe("t", "s").initial_position(InitialPosition::Earliest).subscribe().await.expect("sub");
    for expected in ["before", "after"] {
        let m = tokio::time::timeout(WAIT, consumer.receive()).await.expect("in time").expect("receive");
        assert_eq!(&m.payload[..], expected.as_bytes());
        consumer.ack(&m.id).expect("ack");
    }
    env.broker.shutdown().await;
    env.bookie.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_errors_naming_the_problem() {
    let env = start().await;
    let c = client(&env).await;
    // Invalid topic name: refused by the client before it reaches the broker, naming the rule.
    let err = c.producer("bad topic").create().await.expect_err("invalid topic");
    assert!(err.to_string().contains("invalid topic name"), "{err}");
    // Above the broker's maximum (64 KiB here).
    let p = c.producer("t").create().await.expect("producer");
    match p.send(OutgoingMessage::new(vec![7u8; 70 * 1024])).await {
        Err(Error::MessageTooLarge { size, max }) => assert!(size > max && max == 64 * 1024, "{size} {max}"),
        other => panic!("oversized message: {other:?}"),
    }
    // A second consumer on an exclusive subscription.
    let _first = c.subscribe("t", "excl").subscribe().await.expect("first");
    match c.subscribe("t", "excl").subscribe().await {
        Err(Error::Broker { code, message }) => {
            assert_eq!(code, ErrorCode::ConsumerBusy);
            assert!(message.contains("already has a consumer"), "{message}");
        }
        other => panic!("second exclusive consumer: {:?}", other.map(|_| ())),
    }
    // Cumulative acknowledgement on a shared subscription.
    let shared = c
        .subscribe("t", "sh")
        .subscription_type(magnetar_client::SubscriptionType::Shared)
        .initial_position(InitialPosition::Earliest)
        .subscribe()
        .await
        .expect("shared");
    p.send("m").await.expect("send");
    let m = tokio::time::timeout(WAIT, shared.receive()).await.expect("in time").expect("receive");
    let err = shared.ack_cumulative(&m.id).expect_err("cumulative on shared");
    assert!(err.to_string().contains("shared"), "{err}");
    env.broker.shutdown().await;
    env.bookie.shutdown().await;
}
