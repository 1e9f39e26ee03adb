//! Acceptance: a bookie killed during writes (E=3, Qw=2, Qa=2). etcd, three `magnetar bookie`
//! processes and a `magnetar broker` process; a producer streams; one bookie gets `kill -9`.
//! Writes continue, auto-recovery re-replicates the lost copies, every ledger fragment ends up on
//! write-quorum live bookies that hold its entries, and every acknowledged message is consumed.

mod support;

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use magnetar_bookie::client::conn::BookieConn;
use magnetar_bookie::client::{LedgerClient, LedgerClientConfig, LedgerMetadata, meta};
use magnetar_bookie::server::Registration;
use magnetar_common::bookie_proto::{Reply, Request};
use magnetar_common::metadata;
use magnetar_common::testing::EtcdServer;
use magnetar_common::testing::wait_for;
use support::{BookieProc, BrokerProc, DEADLINE, http_get};

const TOPIC: &str = "autorecovery-topic";

/// Streams numbered messages and keeps those the broker acknowledged, in order.
struct StreamingProducer {
    acked: Arc<Mutex<Vec<String>>>,
    failed: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl StreamingProducer {
    async fn start(broker: &BrokerProc) -> Self {
        let client =
            magnetar_client::Client::builder(&broker.url).tls_trust_cert(&broker.cert).build().await.expect("connect");
        let producer = client.producer(TOPIC).create().await.expect("producer");
        let (acked, failed) = (Arc::new(Mutex::new(Vec::new())), Arc::new(Mutex::new(Vec::new())));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, f, s) = (acked.clone(), failed.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let _client = client;
            let mut window = VecDeque::new();
            let record = |text: String, r: Result<magnetar_client::MessageId, magnetar_client::Error>| match r {
                Ok(_) => a.lock().expect("lock").push(text),
                Err(e) => f.lock().expect("lock").push(format!("{text}: {e}")),
            };
            for i in 0u64.. {
                if s.load(Ordering::Relaxed) {
                    break;
                }
                let text = format!("m-{i:08}");
                match producer.send_async(text.clone()).await {
                    Ok(receipt) => window.push_back((text, receipt)),
                    Err(e) => {
                        f.lock().expect("lock").push(format!("{text}: {e}"));
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                // A few messages in flight, and a steady trickle rather than a flood.
                while window.len() > 16 {
                    let (text, receipt) = window.pop_front().expect("non-empty");
                    record(text, receipt.await);
                }
                if i % 16 == 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            for (text, receipt) in window {
                record(text, receipt.await);
            }
        });
        Self { acked, failed, stop, task }
    }

    fn acked(&self) -> usize {
        self.acked.lock().expect("lock").len()
    }

    async fn finish(self) -> (Vec<String>, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        tokio::time::timeout(DEADLINE, self.task).await.expect("producer drains in time").expect("producer task");
        let acked = self.acked.lock().expect("lock").clone();
        let failed = self.failed.lock().expect("lock").clone();
        (acked, failed)
    }
}

/// The value of an unlabelled metric on the broker's `/metrics`.
fn metric(broker: &BrokerProc, name: &str) -> Option<f64> {
    let (_, body) = tokio::task::block_in_place(|| http_get(&broker.http, "/metrics"));
    body.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

async fn ledgers(store: &metadata::SharedStore) -> Vec<LedgerMetadata> {
    let mut out = Vec::new();
    for kv in store.list(meta::LEDGERS_PREFIX).await.expect("list ledgers") {
        let id: u64 = kv.key.strip_prefix(meta::LEDGERS_PREFIX).and_then(|s| s.parse().ok()).expect("ledger key");
        out.push(meta::decode(id, &kv.value).expect("ledger metadata"));
    }
    out
}

async fn live_bookies(store: &metadata::SharedStore) -> Vec<Registration> {
    let kvs = store.list("/bookies/available/").await.expect("list bookies");
    kvs.iter().map(|kv| serde_json::from_slice(&kv.value).expect("registration")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bookie_killed_during_writes_is_re_replicated_and_nothing_acknowledged_is_lost() {
    let etcd = EtcdServer::start().expect("start etcd");
    let url = etcd.url("/autorecovery");
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut bookies: Vec<BookieProc> = (0..3)
        .map(|i| BookieProc::start(&tmp.path().join(format!("b{i}")), &format!("bookie-{i}"), &url, ""))
        .collect();
    let broker = BrokerProc::start(
        &tmp.path().join("broker"),
        &url,
        "[ledger]\nensemble_size = 3\nwrite_quorum = 2\nack_quorum = 2\n\
         [ledger_client]\nadd_timeout = \"2s\"\n\
         [autorecovery]\nscan_interval = \"1s\"\nlost_bookie_grace = \"1s\"\nauditor_lease_ttl = \"2s\"\n",
    );
    let store = metadata::connect(&url).await.expect("metadata store");

    let producer = StreamingProducer::start(&broker).await;
    wait_for("messages acknowledged before the kill", DEADLINE, || {
        let n = producer.acked();
        async move { (n >= 300).then_some(()) }
    })
    .await;
    // With E=3 on three bookies, every bookie is in the topic's ledger.
    let victim = bookies.remove(1);
    let mut victim = victim;
    victim.kill9();
    let killed_at = Instant::now();
    let acked_at_kill = producer.acked();
    wait_for("writes to continue after the kill", DEADLINE, || {
        let n = producer.acked();
        async move { (n >= acked_at_kill + 500).then_some(()) }
    })
    .await;
    println!("{} messages acknowledged after the kill", producer.acked() - acked_at_kill);

    wait_for("auto-recovery to re-replicate the lost copies", DEADLINE, || {
        let repaired = metric(&broker, "magnetar_broker_autorecovery_fragments_rereplicated_total").unwrap_or(0.0);
        let under = metric(&broker, "magnetar_broker_under_replicated_ledgers");
        async move { (repaired >= 1.0 && under == Some(0.0)).then_some(()) }
    })
    .await;
    println!("lost copies re-replicated {:?} after the kill", killed_at.elapsed());
    assert_eq!(metric(&broker, "magnetar_broker_autorecovery_auditor"), Some(1.0));
    assert_eq!(metric(&broker, "magnetar_broker_autorecovery_unrecoverable_entries"), Some(0.0));
    let (acked, failed) = producer.finish().await;
    assert!(failed.is_empty(), "{} sends failed, first: {:?}", failed.len(), failed.first());

    // Every fragment of every ledger: write-quorum distinct live bookies, none of them the dead
    // one, and each of them holds the entries of its write sets.
    let live: HashSet<String> = live_bookies(&store).await.into_iter().map(|r| r.bookie_id).collect();
    assert!(!live.contains(&victim.id));
    let client = LedgerClient::new(store.clone(), LedgerClientConfig::default()).await.expect("ledger client");
    let all = ledgers(&store).await;
    assert!(!all.is_empty());
    for md in &all {
        for f in &md.fragments {
            let distinct: HashSet<&String> = f.bookies.iter().collect();
            assert_eq!(distinct.len(), f.bookies.len(), "ledger {}: {f:?}", md.ledger_id);
            assert!(f.bookies.len() >= md.write_quorum, "ledger {}: {f:?}", md.ledger_id);
            assert!(
                f.bookies.iter().all(|b| live.contains(b)),
                "ledger {} still on a dead bookie: {f:?}",
                md.ledger_id
            );
        }
        let last = match md.is_closed() {
            true => md.last_entry_id,
            false => client.open(md.ledger_id).await.expect("open").read_lac().await.expect("lac"),
        };
        for e in 0..=last.max(-1) {
            let e = e as u64;
            for b in md.write_set_ids(e) {
                let address = client.registry().address(&b).expect("address of a live bookie");
                let conn = BookieConn::new(b.clone(), address, Duration::from_secs(10));
                let r =
                    conn.call(Request::Read { ledger_id: md.ledger_id, entry_id: e }, Duration::from_secs(10)).await;
                assert!(matches!(r, Ok(Reply::Read { .. })), "entry {}:{e} missing on {b}: {r:?}", md.ledger_id);
            }
        }
    }

    // Every acknowledged message comes back.
    let consumer_client =
        magnetar_client::Client::builder(&broker.url).tls_trust_cert(&broker.cert).build().await.expect("connect");
    let consumer = consumer_client
        .subscribe(TOPIC, "verify")
        .initial_position(magnetar_client::InitialPosition::Earliest)
        .subscribe()
        .await
        .expect("subscribe");
    let mut missing: HashSet<String> = acked.iter().cloned().collect();
    while !missing.is_empty() {
        let m = tokio::time::timeout(DEADLINE, consumer.receive())
            .await
            .unwrap_or_else(|_| {
                panic!("{} acknowledged messages never came, e.g. {:?}", missing.len(), missing.iter().next())
            })
            .expect("receive");
        consumer.ack(&m.id).expect("ack");
        missing.remove(&String::from_utf8_lossy(&m.payload).into_owned());
    }
    println!("{} acknowledged messages consumed", acked.len());
}
