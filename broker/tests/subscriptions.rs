//! Subscription semantics through the broker's service layer, on a real bookie and the embedded
//! metadata store: delivery per subscription type, acknowledgements, redelivery, permits, and
//! positions kept across a broker restart. No wire protocol involved (the CLI tests cover QUIC).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use magnetar_bookie::client::LedgerClient;
use magnetar_bookie::config::{BookieConfig, DiskConfig};
use magnetar_bookie::server::BookieServer;
use magnetar_broker::BrokerConfig;
use magnetar_broker::metrics::Metrics;
use magnetar_broker::service::policies::{NamespacePolicies, RetentionPolicy};
use magnetar_broker::service::{BrokerService, ConsumerEvent, ConsumerHandle, ServiceError, SubscribeParams, Topic};
use magnetar_common::batch::{self, BatchBuilder, Compression, Message};
use magnetar_common::ids::Position;
use magnetar_common::metadata::{
    self, KeyValue, LeaseId, MetadataStore, PutOptions, SharedStore, Version, Versioned, Watch,
};
use magnetar_common::testing::wait_until;
use magnetar_common::wire::{InitialPosition, SubscriptionType};
use tokio::sync::mpsc::UnboundedReceiver;

const WAIT: Duration = Duration::from_secs(20);

struct Env {
    dir: tempfile::TempDir,
    store: SharedStore,
    bookie: Option<BookieServer>,
}

impl Env {
    async fn new() -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("embedded:{}", dir.path().join("meta").display());
        let store = magnetar_common::metadata::connect(&url).await.expect("store");
        let cfg = BookieConfig {
            bookie_id: "b1".into(),
            listen_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            metadata_url: url,
            journal_dir: dir.path().join("journal"),
            ledger_dir: dir.path().join("ledgers"),
            // Not a disk-full test: the host's own disk usage must not make the bookie read-only.
            disk: DiskConfig { usage_threshold: 1.0, ..DiskConfig::default() },
            ..BookieConfig::default()
        };
        let bookie = BookieServer::start_with_store(cfg, store.clone()).await.expect("bookie");
        Env { dir, store, bookie: Some(bookie) }
    }

    async fn broker(&self) -> Arc<BrokerService> {
        self.broker_with(|_| {}).await
    }

    async fn broker_with(&self, tweak: impl FnOnce(&mut BrokerConfig)) -> Arc<BrokerService> {
        self.broker_over(self.store.clone(), tweak).await
    }

    /// A broker (and its ledger client) on `store` instead of the environment's own.
    async fn broker_over(&self, store: SharedStore, tweak: impl FnOnce(&mut BrokerConfig)) -> Arc<BrokerService> {
        let mut cfg = BrokerConfig::default();
        cfg.ledger.ensemble_size = 1;
        cfg.ledger.write_quorum = 1;
        cfg.ledger.ack_quorum = 1;
        cfg.data_dir = self.dir.path().join("broker");
        tweak(&mut cfg);
        let ledgers = LedgerClient::new(store.clone(), cfg.ledger_client.clone()).await.expect("ledger client");
        let svc = BrokerService::new(cfg, store, ledgers, Arc::new(Metrics::new())).expect("service");
        // Every broker of these tests is shut down (releasing its lease) before the next starts.
        svc.join_cluster("127.0.0.1:6650", "127.0.0.1:8080").await.expect("join the cluster");
        svc
    }

    async fn stop(mut self) {
        if let Some(b) = self.bookie.take() {
            b.shutdown().await;
        }
    }
}

fn one(key: Option<&str>, payload: &str) -> Bytes {
    let mut b = BatchBuilder::new();
    b.push(&Message {
        key: key.map(|k| Bytes::copy_from_slice(k.as_bytes())),
        payload: Bytes::copy_from_slice(payload.as_bytes()),
        ..Default::default()
    })
    .expect("push");
    b.finish(Compression::None, "test", 0, 0)
}

async fn produce(svc: &BrokerService, topic: &str, items: &[(Option<&str>, String)]) -> Vec<Position> {
    let p = svc.create_producer(topic, "").await.expect("producer");
    let mut pending = Vec::new();
    for (key, payload) in items {
        pending.push(p.publish(one(*key, payload), 1).await.expect("queue"));
    }
    let mut out = Vec::new();
    for f in pending {
        out.push(f.await.expect("stored"));
    }
    out
}

fn texts(n: usize, prefix: &str) -> Vec<(Option<&'static str>, String)> {
    (0..n).map(|i| (None, format!("{prefix}{i}"))).collect()
}

fn params(sub: &str, t: SubscriptionType, name: &str) -> SubscribeParams {
    SubscribeParams {
        subscription: sub.into(),
        subscription_type: t,
        initial_position: InitialPosition::Earliest,
        consumer_name: name.into(),
        priority: 0,
        durable: true,
        start: None,
        ack_timeout: None,
    }
}

struct Received {
    position: Position,
    redelivery_count: u32,
    payload: String,
    key: Option<String>,
}

async fn next_message(events: &mut UnboundedReceiver<ConsumerEvent>) -> Received {
    loop {
        let ev = tokio::time::timeout(WAIT, events.recv()).await.expect("a message in time").expect("open");
        if let ConsumerEvent::Message { position, redelivery_count, payload } = ev {
            let (h, msgs) = batch::decode(payload).expect("batch");
            return Received {
                position,
                redelivery_count,
                payload: String::from_utf8(msgs[0].payload.to_vec()).expect("utf8"),
                key: h.key.map(|k| String::from_utf8(k.to_vec()).expect("utf8")),
            };
        }
    }
}

async fn next_active_change(events: &mut UnboundedReceiver<ConsumerEvent>) -> bool {
    loop {
        let ev = tokio::time::timeout(WAIT, events.recv()).await.expect("an event in time").expect("open");
        if let ConsumerEvent::ActiveChange { active } = ev {
            return active;
        }
    }
}

async fn subscribe(
    svc: &BrokerService,
    topic: &str,
    p: SubscribeParams,
    permits: u32,
) -> (ConsumerHandle, UnboundedReceiver<ConsumerEvent>) {
    let (h, ev) = svc.subscribe(topic, p).await.expect("subscribe");
    h.flow(permits);
    (h, ev)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exclusive_delivers_in_order_refuses_a_second_consumer_and_keeps_position_across_restart() {
    let env = Env::new().await;
    let svc = env.broker().await;
    let sent = produce(&svc, "excl", &texts(10, "m")).await;
    let (c, mut ev) = subscribe(&svc, "excl", params("s", SubscriptionType::Exclusive, "a"), 100).await;
    match svc.subscribe("excl", params("s", SubscriptionType::Exclusive, "b")).await {
        Err(ServiceError::ConsumerBusy(msg)) => assert!(msg.contains("exclusive"), "{msg}"),
        other => panic!("second exclusive consumer: {:?}", other.map(|_| ())),
    }
    for (i, pos) in sent.iter().enumerate() {
        let m = next_message(&mut ev).await;
        assert_eq!((m.position, m.payload.as_str(), m.redelivery_count), (*pos, format!("m{i}").as_str(), 0));
    }
    // Acknowledge the first five cumulatively and the seventh individually.
    c.ack(vec![sent[4]], true).expect("ack");
    c.ack(vec![sent[6]], false).expect("ack");
    c.close().await;
    svc.shutdown().await;

    let svc = env.broker().await;
    let (_c, mut ev) = subscribe(&svc, "excl", params("s", SubscriptionType::Exclusive, "a"), 100).await;
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(next_message(&mut ev).await.payload);
    }
    assert_eq!(got, ["m5", "m7", "m8", "m9"]);
    svc.shutdown().await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_spreads_messages_and_redelivers_a_departed_consumers_unacked_ones() {
    let env = Env::new().await;
    let svc = env.broker().await;
    let (a, mut ev_a) = subscribe(&svc, "sh", params("s", SubscriptionType::Shared, "a"), 5).await;
    let (b, mut ev_b) = subscribe(&svc, "sh", params("s", SubscriptionType::Shared, "b"), 5).await;
    produce(&svc, "sh", &texts(10, "m")).await;
    let mut seen = std::collections::BTreeSet::new();
    let mut a_got = Vec::new();
    for _ in 0..5 {
        let m = next_message(&mut ev_a).await;
        seen.insert(m.payload.clone());
        a_got.push(m);
    }
    for _ in 0..5 {
        let m = next_message(&mut ev_b).await;
        seen.insert(m.payload.clone());
        b.ack(vec![m.position], false).expect("ack");
    }
    assert_eq!(seen.len(), 10, "every message went to exactly one consumer");
    // a acknowledges two, then leaves: the other three go to b, marked as redelivered.
    a.ack(vec![a_got[0].position, a_got[1].position], false).expect("ack");
    assert!(
        matches!(a.ack(vec![a_got[2].position], true), Err(ServiceError::BadRequest(_))),
        "no cumulative ack on shared"
    );
    a.close().await;
    b.flow(10);
    let mut redelivered = Vec::new();
    for _ in 0..3 {
        let m = next_message(&mut ev_b).await;
        assert_eq!(m.redelivery_count, 1);
        redelivered.push(m.payload);
    }
    let expected: Vec<String> = a_got[2..].iter().map(|m| m.payload.clone()).collect();
    assert_eq!(redelivered, expected);
    svc.shutdown().await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_standby_takes_over_with_the_unacknowledged_messages() {
    let env = Env::new().await;
    let svc = env.broker().await;
    let (a, mut ev_a) = subscribe(&svc, "fo", params("s", SubscriptionType::Failover, "a"), 100).await;
    assert!(next_active_change(&mut ev_a).await, "first consumer is active");
    let (_b, mut ev_b) = subscribe(&svc, "fo", params("s", SubscriptionType::Failover, "b"), 100).await;
    assert!(!next_active_change(&mut ev_b).await, "second consumer stands by");
    let sent = produce(&svc, "fo", &texts(6, "m")).await;
    for i in 0..6 {
        let m = next_message(&mut ev_a).await;
        assert_eq!(m.payload, format!("m{i}"));
    }
    a.ack(vec![sent[2]], true).expect("cumulative ack");
    a.close().await;
    assert!(next_active_change(&mut ev_b).await, "standby becomes active");
    for i in 3..6 {
        let m = next_message(&mut ev_b).await;
        assert_eq!(m.payload, format!("m{i}"), "in order, from the first unacknowledged");
        assert_eq!(m.redelivery_count, 1);
    }
    produce(&svc, "fo", &texts(1, "n")).await;
    assert_eq!(next_message(&mut ev_b).await.payload, "n0");
    svc.shutdown().await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_shared_keeps_each_key_on_one_consumer_in_order() {
    let env = Env::new().await;
    let svc = env.broker().await;
    let (_a, mut ev_a) = subscribe(&svc, "ks", params("s", SubscriptionType::KeyShared, "a"), 1000).await;
    let (_b, mut ev_b) = subscribe(&svc, "ks", params("s", SubscriptionType::KeyShared, "b"), 1000).await;
    let keys = ["k0", "k1", "k2", "k3", "k4", "k5", "k6", "k7"];
    let items: Vec<(Option<&str>, String)> =
        (0..80).map(|i| (Some(keys[i % keys.len()]), format!("{}", i / keys.len()))).collect();
    produce(&svc, "ks", &items).await;
    let mut per_key: std::collections::HashMap<String, (usize, Vec<u32>)> = Default::default();
    let mut total = 0;
    while total < 80 {
        let (who, m) = tokio::select! {
            m = next_message(&mut ev_a) => (0, m),
            m = next_message(&mut ev_b) => (1, m),
        };
        let key = m.key.clone().expect("keyed batch");
        let entry = per_key.entry(key.clone()).or_insert((who, Vec::new()));
        assert_eq!(entry.0, who, "key {key} went to both consumers");
        entry.1.push(m.payload.parse().expect("number"));
        total += 1;
    }
    let consumers: std::collections::HashSet<usize> = per_key.values().map(|(w, _)| *w).collect();
    assert_eq!(consumers.len(), 2, "keys are spread over both consumers");
    for (key, (_, seq)) in per_key {
        assert_eq!(seq, (0..10).collect::<Vec<u32>>(), "order of {key}");
    }
    svc.shutdown().await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_ack_redelivers_with_a_count_and_permits_bound_delivery() {
    let env = Env::new().await;
    let svc = env.broker().await;
    let sent = produce(&svc, "nack", &texts(5, "m")).await;
    let (c, mut ev) = subscribe(&svc, "nack", params("s", SubscriptionType::Shared, "a"), 2).await;
    let first = next_message(&mut ev).await;
    let second = next_message(&mut ev).await;
    assert_eq!((first.payload.as_str(), second.payload.as_str()), ("m0", "m1"));
    c.ack(vec![second.position], false).expect("ack");
    c.redeliver(vec![first.position]);
    c.flow(1);
    let again = next_message(&mut ev).await;
    assert_eq!((again.position, again.redelivery_count), (sent[0], 1), "the nacked one comes back first");
    c.redeliver(vec![again.position]);
    c.flow(1);
    let third = next_message(&mut ev).await;
    assert_eq!((third.position, third.redelivery_count), (sent[0], 2));
    c.ack(vec![third.position], false).expect("ack");
    c.flow(3);
    for i in 2..5 {
        assert_eq!(next_message(&mut ev).await.payload, format!("m{i}"));
    }
    svc.shutdown().await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_starts_after_existing_messages_and_backlog_is_counted() {
    let env = Env::new().await;
    let svc = env.broker().await;
    produce(&svc, "lat", &texts(3, "old")).await;
    let mut p = params("s", SubscriptionType::Exclusive, "a");
    p.initial_position = InitialPosition::Latest;
    let (c, mut ev) = subscribe(&svc, "lat", p, 100).await;
    produce(&svc, "lat", &texts(2, "new")).await;
    let m = next_message(&mut ev).await;
    assert_eq!(m.payload, "new0");
    c.ack(vec![m.position], false).expect("ack");
    let topic = svc.topic("lat").await.expect("topic");
    wait_until("a backlog of 1", WAIT, || async { topic.backlog(&topic.subscription_stats()[0].1) == 1 }).await;
    let metrics = svc.render_metrics();
    assert!(metrics.contains("magnetar_broker_subscription_backlog_entries{topic=\"persistent://public/default/lat\",subscription=\"s\"} 1"), "{metrics}");
    svc.shutdown().await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_malformed_batches_are_refused_by_the_broker() {
    let env = Env::new().await;
    let svc = env.broker().await;
    let p = svc.create_producer("bad", "").await.expect("producer");
    let big = Bytes::from(vec![0u8; 5 * 1024 * 1024 + 1]);
    match p.publish(big, 1).await {
        Err(ServiceError::MessageTooLarge { size, max }) => {
            assert_eq!((size, max), (5 * 1024 * 1024 + 1, 5 * 1024 * 1024))
        }
        other => panic!("oversized: {:?}", other.map(|_| ())),
    }
    match p.publish(Bytes::from_static(b"not a batch"), 1).await {
        Err(ServiceError::BadRequest(msg)) => assert!(msg.contains("batch"), "{msg}"),
        other => panic!("malformed: {:?}", other.map(|_| ())),
    }
    match p.publish(one(None, "x"), 2).await {
        Err(ServiceError::BadRequest(msg)) => assert!(msg.contains("2 messages"), "{msg}"),
        other => panic!("count mismatch: {:?}", other.map(|_| ())),
    }
    assert!(matches!(svc.create_producer("bad topic", "").await, Err(ServiceError::InvalidTopic(_))));
    let stored = p.publish(one(None, "ok"), 1).await.expect("queue").await.expect("stored");
    assert_eq!(stored.entry_id, 0, "refused batches took no entry id");
    svc.shutdown().await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledgers_roll_over_and_reads_cross_them_in_order_across_restarts() {
    let env = Env::new().await;
    let small = |c: &mut BrokerConfig| c.ledger.rollover_max_entries = 4;
    let svc = env.broker_with(small).await;
    let (c, mut ev) = subscribe(&svc, "roll", params("s", SubscriptionType::Exclusive, "a"), 1000).await;
    let sent = produce(&svc, "roll", &texts(10, "m")).await;
    let ledgers: std::collections::BTreeSet<u64> = sent.iter().map(|p| p.ledger_id).collect();
    assert_eq!(ledgers.len(), 3, "10 entries at 4 per ledger: {sent:?}");
    for (i, pos) in sent.iter().enumerate() {
        let m = next_message(&mut ev).await;
        assert_eq!((m.position, m.payload), (*pos, format!("m{i}")));
        if i < 6 {
            c.ack(vec![m.position], false).expect("ack");
        }
    }
    c.close().await;
    svc.shutdown().await;
    // After a restart (a new ledger opens) the cursor resumes inside the second ledger, and a new
    // subscription from the earliest position reads all three ledgers in order.
    let svc = env.broker_with(small).await;
    produce(&svc, "roll", &texts(2, "n")).await;
    let (_c, mut ev) = subscribe(&svc, "roll", params("s", SubscriptionType::Exclusive, "a"), 1000).await;
    let mut got = Vec::new();
    for _ in 0..6 {
        got.push(next_message(&mut ev).await.payload);
    }
    assert_eq!(got, ["m6", "m7", "m8", "m9", "n0", "n1"]);
    let (_e, mut ev) = subscribe(&svc, "roll", params("all", SubscriptionType::Exclusive, "b"), 1000).await;
    let mut got = Vec::new();
    for _ in 0..12 {
        got.push(next_message(&mut ev).await.payload);
    }
    let expected: Vec<String> = (0..10).map(|i| format!("m{i}")).chain(["n0".into(), "n1".into()]).collect();
    assert_eq!(got, expected);
    svc.shutdown().await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledgements_of_undelivered_positions_are_ignored() {
    let env = Env::new().await;
    let svc = env.broker().await;
    let sent = produce(&svc, "fake-ack", &texts(2, "m")).await;
    let (c, mut ev) = subscribe(&svc, "fake-ack", params("s", SubscriptionType::Exclusive, "a"), 100).await;
    assert_eq!(next_message(&mut ev).await.payload, "m0");
    assert_eq!(next_message(&mut ev).await.payload, "m1");
    // Positions nobody received: far ahead in this ledger, in a later ledger, at the very end.
    let ledger = sent[0].ledger_id;
    c.ack(vec![Position::new(ledger, 1_000_000_000)], true).expect("ack");
    c.ack(vec![Position::new(ledger + 7, 0), Position::new(u64::MAX, u64::MAX)], false).expect("ack");
    c.ack(vec![Position::new(ledger, u64::MAX)], true).expect("ack");
    let later = produce(&svc, "fake-ack", &texts(3, "n")).await;
    for (i, pos) in later.iter().enumerate() {
        let m = next_message(&mut ev).await;
        assert_eq!((m.position, m.payload), (*pos, format!("n{i}")), "still delivered");
    }
    svc.shutdown().await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_timeout_redelivers_what_was_not_acknowledged_in_time() {
    let env = Env::new().await;
    let svc = env.broker().await;
    let sent = produce(&svc, "ackto", &texts(2, "m")).await;
    let mut too_short = params("s", SubscriptionType::Exclusive, "a");
    too_short.ack_timeout = Some(Duration::from_millis(500));
    match svc.subscribe("ackto", too_short).await {
        Err(ServiceError::BadRequest(msg)) => assert!(msg.contains("ack_timeout_ms is 500"), "{msg}"),
        other => panic!("ack timeout under a second: {:?}", other.map(|_| ())),
    }
    let mut p = params("s", SubscriptionType::Exclusive, "a");
    p.ack_timeout = Some(Duration::from_secs(1));
    let (c, mut ev) = subscribe(&svc, "ackto", p, 100).await;
    let m0 = next_message(&mut ev).await;
    let m1 = next_message(&mut ev).await;
    assert_eq!((m0.position, m1.position), (sent[0], sent[1]));
    // m0 is acknowledged; m1, delivered after it, is not. Had m0 been redelivered, it would
    // come before m1 (its deadline is earlier).
    c.ack(vec![m0.position], false).expect("ack");
    let again = next_message(&mut ev).await;
    assert_eq!((again.position, again.payload.as_str(), again.redelivery_count), (sent[1], "m1", 1));
    // Not acknowledged again: it comes back again.
    let third = next_message(&mut ev).await;
    assert_eq!((third.position, third.redelivery_count), (sent[1], 2));
    c.ack(vec![third.position], false).expect("ack");
    let later = produce(&svc, "ackto", &texts(1, "n")).await;
    let n = next_message(&mut ev).await;
    assert_eq!(
        (n.position, n.payload.as_str(), n.redelivery_count),
        (later[0], "n0", 0),
        "nothing acknowledged comes back"
    );
    svc.shutdown().await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_timeout_on_shared_hands_the_message_to_another_consumer() {
    let env = Env::new().await;
    let svc = env.broker().await;
    let mut pa = params("s", SubscriptionType::Shared, "a");
    pa.ack_timeout = Some(Duration::from_secs(1));
    let (_a, mut ev_a) = subscribe(&svc, "ackto-sh", pa, 1).await;
    let (b, mut ev_b) = subscribe(&svc, "ackto-sh", params("s", SubscriptionType::Shared, "b"), 0).await;
    let sent = produce(&svc, "ackto-sh", &texts(1, "m")).await;
    let m = next_message(&mut ev_a).await;
    assert_eq!((m.position, m.redelivery_count), (sent[0], 0));
    // a has no permits left and never acknowledges; b can take it once a's timeout passes.
    b.flow(10);
    let m = next_message(&mut ev_b).await;
    assert_eq!((m.position, m.payload.as_str(), m.redelivery_count), (sent[0], "m0", 1));
    b.ack(vec![m.position], false).expect("ack");
    svc.shutdown().await;
    env.stop().await;
}

/// The ids in a topic's ledger list, as stored.
async fn listed_ledgers(store: &SharedStore, topic: &str) -> Vec<u64> {
    let name = magnetar_common::topic::TopicName::parse(topic).expect("topic");
    let v = store.get(&magnetar_broker::service::managed_ledger::key(&name)).await.expect("get").expect("listed");
    let list: serde_json::Value = serde_json::from_slice(&v.value).expect("json");
    list["ledgers"].as_array().expect("ledgers").iter().map(|v| v.as_u64().expect("id")).collect()
}

async fn ledger_exists(store: &SharedStore, id: u64) -> bool {
    store.get(&magnetar_bookie::client::meta::key(id)).await.expect("get").is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_only_ledgers_every_subscription_acknowledged() {
    let env = Env::new().await;
    let small = |c: &mut BrokerConfig| c.ledger.rollover_max_entries = 4;
    let svc = env.broker_with(small).await;
    // Keep nothing acknowledged.
    let keep_nothing = NamespacePolicies {
        retention: RetentionPolicy { time: None, size: Some(bytesize::ByteSize::b(0)) },
        ..Default::default()
    };
    svc.policies().create_namespace("public", "ret", &keep_nothing, svc.config()).await.expect("namespace");
    let topic = "public/ret/t";
    let (a, mut ev_a) = subscribe(&svc, topic, params("a", SubscriptionType::Exclusive, "a"), 1000).await;
    let (b, mut ev_b) = subscribe(&svc, topic, params("b", SubscriptionType::Exclusive, "b"), 1000).await;
    let sent = produce(&svc, topic, &texts(14, "m")).await;
    let ids: Vec<u64> =
        sent.iter().map(|p| p.ledger_id).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
    assert_eq!(ids.len(), 4, "14 entries at 4 per ledger: {sent:?}");
    assert_eq!(listed_ledgers(&env.store, topic).await, ids);
    for _ in 0..14 {
        let m = next_message(&mut ev_a).await;
        a.ack(vec![m.position], false).expect("ack");
    }
    let mut b_got = Vec::new();
    for _ in 0..14 {
        b_got.push(next_message(&mut ev_b).await);
    }
    let t = svc.topic(topic).await.expect("topic");
    // b acknowledged nothing: everything stays, however often retention runs.
    wait_for_mark(&t, "a", t.managed_ledger().end_position()).await;
    for _ in 0..3 {
        assert_eq!(t.apply_retention().await.expect("retention"), Default::default());
    }
    assert_eq!(listed_ledgers(&env.store, topic).await, ids);
    // b acknowledges the first two ledgers (8 entries): they go; the third, which b has not
    // acknowledged, and the current one stay.
    for m in &b_got[..8] {
        b.ack(vec![m.position], false).expect("ack");
    }
    wait_for_mark(&t, "b", sent[8]).await;
    let trimmed = t.apply_retention().await.expect("retention");
    assert_eq!(trimmed.ledgers, ids[..2]);
    assert!(trimmed.bytes > 0 && trimmed.deleting.is_empty(), "{trimmed:?}");
    assert_eq!(listed_ledgers(&env.store, topic).await, ids[2..]);
    assert!(t.managed_ledger().deleting().is_empty());
    for id in &ids[..2] {
        assert!(!ledger_exists(&env.store, *id).await, "ledger {id} deleted from the metadata store");
    }
    for id in &ids[2..] {
        assert!(ledger_exists(&env.store, *id).await, "ledger {id} kept");
    }
    assert_eq!(t.managed_ledger().first_position(), sent[8]);
    let metrics = svc.render_metrics();
    assert!(
        metrics.contains("magnetar_broker_retention_deleted_ledgers_total{topic=\"persistent://public/ret/t\"} 2"),
        "{metrics}"
    );
    // b's consumer leaves and comes back: the rest comes again, in order; a new subscription
    // from the earliest position starts at the first remaining entry.
    b.close().await;
    let (_b, mut ev_b) = subscribe(&svc, topic, params("b", SubscriptionType::Exclusive, "b"), 1000).await;
    for (i, pos) in sent.iter().enumerate().skip(8) {
        let m = next_message(&mut ev_b).await;
        assert_eq!((m.position, m.payload), (*pos, format!("m{i}")));
    }
    let (_c, mut ev_c) = subscribe(&svc, topic, params("c", SubscriptionType::Exclusive, "c"), 1000).await;
    assert_eq!(next_message(&mut ev_c).await.position, sent[8]);
    a.close().await;
    svc.shutdown().await;
    // After a restart the topic loads from the trimmed list and reads the same.
    let svc = env.broker_with(small).await;
    let (_d, mut ev_d) = subscribe(&svc, topic, params("d", SubscriptionType::Exclusive, "d"), 1000).await;
    for (i, pos) in sent.iter().enumerate().skip(8) {
        let m = next_message(&mut ev_d).await;
        assert_eq!((m.position, m.payload), (*pos, format!("m{i}")));
    }
    svc.shutdown().await;
    env.stop().await;
}

/// A load that is followed by no write leaves an empty ledger; the next load takes it off the
/// list and deletes it at once (through the topic's first retention check, even with retention
/// unlimited): nothing is left in the metadata store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_ledgers_dropped_on_load_are_deleted() {
    let env = Env::new().await;
    let topic = "empties";
    let svc = env.broker().await;
    let first = produce(&svc, topic, &texts(1, "m")).await[0].ledger_id;
    svc.shutdown().await;
    // Loaded and closed again without a write: its new ledger stays empty.
    let svc = env.broker().await;
    svc.topic(topic).await.expect("topic");
    let listed = listed_ledgers(&env.store, topic).await;
    let [l1, empty] = listed[..] else { panic!("two ledgers listed: {listed:?}") };
    assert_eq!(l1, first);
    svc.shutdown().await;
    assert!(ledger_exists(&env.store, empty).await);

    let svc = env.broker().await;
    let t = svc.topic(topic).await.expect("topic");
    let listed = listed_ledgers(&env.store, topic).await;
    assert!(listed.len() == 2 && listed[0] == first && !listed.contains(&empty), "{listed:?}");
    wait_until("the empty ledger deleted", WAIT, || async {
        !ledger_exists(&env.store, empty).await && t.managed_ledger().deleting().is_empty()
    })
    .await;
    let name = magnetar_common::topic::TopicName::parse(topic).expect("topic");
    let v = env.store.get(&magnetar_broker::service::managed_ledger::key(&name)).await.expect("get").expect("listed");
    let list: serde_json::Value = serde_json::from_slice(&v.value).expect("json");
    assert!(list.get("deleting").is_none(), "nothing left to delete: {list}");
    svc.shutdown().await;
    env.stop().await;
}

/// The environment's store, except that deletions of ledger metadata wait while the gate is
/// closed: a topic deletion can be held half way.
#[derive(Debug)]
struct GatedStore {
    inner: SharedStore,
    open: tokio::sync::watch::Sender<bool>,
    held: AtomicUsize,
}

impl GatedStore {
    fn new(inner: SharedStore) -> Arc<Self> {
        Arc::new(Self { inner, open: tokio::sync::watch::Sender::new(true), held: AtomicUsize::new(0) })
    }

    fn set_open(&self, open: bool) {
        self.open.send_replace(open);
    }
}

#[async_trait::async_trait]
impl MetadataStore for GatedStore {
    async fn get(&self, key: &str) -> metadata::Result<Option<Versioned>> {
        self.inner.get(key).await
    }
    async fn put(&self, key: &str, value: Bytes, options: PutOptions) -> metadata::Result<Version> {
        self.inner.put(key, value, options).await
    }
    async fn delete(&self, key: &str, expected: Option<Version>) -> metadata::Result<bool> {
        if key.starts_with(magnetar_bookie::client::meta::LEDGERS_PREFIX) {
            let mut open = self.open.subscribe();
            if !*open.borrow_and_update() {
                self.held.fetch_add(1, Ordering::SeqCst);
                open.wait_for(|open| *open).await.expect("gate kept");
            }
        }
        self.inner.delete(key, expected).await
    }
    async fn list(&self, prefix: &str) -> metadata::Result<Vec<KeyValue>> {
        self.inner.list(prefix).await
    }
    async fn watch(&self, prefix: &str) -> metadata::Result<Watch> {
        self.inner.watch(prefix).await
    }
    async fn grant_lease(&self, ttl: Duration) -> metadata::Result<LeaseId> {
        self.inner.grant_lease(ttl).await
    }
    async fn renew_lease(&self, lease: LeaseId) -> metadata::Result<()> {
        self.inner.renew_lease(lease).await
    }
    async fn revoke_lease(&self, lease: LeaseId) -> metadata::Result<()> {
        self.inner.revoke_lease(lease).await
    }
}

/// While a topic's deletion runs, this broker does not load the topic again: a producer that
/// reconnects at once (a forced deletion disconnects it) would otherwise write to a topic whose
/// ledgers are being deleted under it. Once the deletion ends, the topic is created anew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_being_deleted_is_not_loaded_again_until_the_deletion_ends() {
    let env = Env::new().await;
    let gate = GatedStore::new(env.store.clone());
    let svc = env.broker_over(gate.clone(), |_| {}).await;
    let topic = "doomed";
    produce(&svc, topic, &texts(3, "old")).await;

    gate.set_open(false);
    let deletion = tokio::spawn({
        let svc = svc.clone();
        async move { svc.delete_topic(topic, true).await }
    });
    wait_until("the deletion to reach the ledgers", WAIT, || async { gate.held.load(Ordering::SeqCst) > 0 }).await;
    let refused = |r: Result<(), ServiceError>| match r {
        Err(ServiceError::Unavailable(m)) => assert!(m.contains("is being deleted"), "{m}"),
        other => panic!("refused as being deleted, not {other:?}"),
    };
    refused(svc.create_producer(topic, "").await.map(|_| ()));
    refused(svc.subscribe(topic, params("s", SubscriptionType::Exclusive, "c")).await.map(|_| ()));
    refused(svc.topic_stats(topic).await.map(|_| ()));
    assert!(!deletion.is_finished(), "the gate holds the deletion");

    gate.set_open(true);
    deletion.await.expect("join").expect("deleted");
    let (_c, mut events) = subscribe(&svc, topic, params("s", SubscriptionType::Exclusive, "c"), 10).await;
    produce(&svc, topic, &texts(1, "new")).await;
    assert_eq!(next_message(&mut events).await.payload, "new0", "a new, empty topic");
    svc.shutdown().await;
    env.stop().await;
}

/// Waits until a subscription's mark-delete position (plus one) reaches `at`.
async fn wait_for_mark(t: &Topic, sub: &str, at: Position) {
    let mark = || {
        let stats = t.subscription_stats();
        stats.iter().find(|(n, _)| n == sub).map(|(_, s)| s.cursor.lock().expect("lock").0)
    };
    wait_until(&format!("{sub}'s mark-delete position to reach {at}"), WAIT, || async {
        mark().is_some_and(|m| m >= at)
    })
    .await;
}
