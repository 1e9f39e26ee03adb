//! Cluster failover with real processes: etcd, three `magnetar bookie` and two `magnetar broker`
//! processes (E=3, Qw=2, Qa=2). A producer and a consumer stream through the topic's owner while
//! the owner is killed (`kill -9`), shut down cleanly (SIGINT), or cut off from etcd (SIGSTOP
//! longer than the lease). Each run checks that every acknowledged message is consumed, at the
//! very position its receipt named, with the producer's order kept, and prints how long the
//! topic was unavailable.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use magnetar_client::{Client, InitialPosition, MessageId};
use magnetar_common::testing::EtcdServer;
use support::{BookieProc, BrokerProc, DEADLINE, http_get, wait_child};

const TOPIC: &str = "persistent://public/default/failover";
const LEDGER: &str = "[ledger]\nensemble_size = 3\nwrite_quorum = 2\nack_quorum = 2\n";

struct Cluster {
    etcd: EtcdServer,
    _bookies: Vec<BookieProc>,
    brokers: Vec<BrokerProc>,
    _tmp: tempfile::TempDir,
}

impl Cluster {
    fn start(root: &str) -> Cluster {
        let etcd = EtcdServer::start().expect("start etcd");
        let url = etcd.url(root);
        let tmp = tempfile::tempdir().expect("tempdir");
        let bookies = (0..3)
            .map(|i| BookieProc::start(&tmp.path().join(format!("bookie{i}")), &format!("bookie-{i}"), &url, ""))
            .collect();
        let first = BrokerProc::start(&tmp.path().join("broker0"), &url, LEDGER);
        // Both brokers present the same certificate, so a client trusts one file.
        let tls = format!(
            "tls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n{LEDGER}",
            first.cert.display(),
            first.dir.join("tls/key.pem").display()
        );
        let second = BrokerProc::start(&tmp.path().join("broker1"), &url, &tls);
        Cluster { etcd, _bookies: bookies, brokers: vec![first, second], _tmp: tmp }
    }

    /// `quic://b0,b1`: the client may bootstrap from either broker.
    fn service_url(&self) -> String {
        let hosts: Vec<&str> = self.brokers.iter().map(|b| b.url.trim_start_matches("quic://")).collect();
        format!("quic://{}", hosts.join(","))
    }

    /// Index of the broker owning the topic, asked through a live broker's admin API.
    fn owner(&self) -> Option<usize> {
        let live = self.brokers.iter().find(|b| b.is_running())?;
        let (status, body) = http_get(&live.http, "/admin/v1/topics/public/default/failover/lookup");
        if status != 200 {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        let url = v["broker_url"].as_str()?;
        self.brokers.iter().position(|b| b.url == url)
    }

    fn logs(&self) -> String {
        self.brokers.iter().enumerate().map(|(i, b)| format!("--- broker {i} ---\n{}\n", b.log())).collect()
    }
}

/// What the producer and the consumer saw.
#[derive(Default)]
struct Seen {
    /// (sequence, id, when the receipt arrived), in receipt order.
    acked: Vec<(u64, MessageId, Instant)>,
    /// (sequence, id, when it arrived), in delivery order.
    received: Vec<(u64, MessageId, Instant)>,
}

fn seq_of(payload: &[u8]) -> u64 {
    std::str::from_utf8(payload).ok().and_then(|s| s.strip_prefix("m-")).and_then(|s| s.parse().ok()).expect("payload")
}

struct Traffic {
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
    producer: tokio::task::JoinHandle<()>,
    consumer: tokio::task::JoinHandle<()>,
}

impl Traffic {
    async fn start(cluster: &Cluster) -> Traffic {
        let client = Client::builder(cluster.service_url())
            .tls_trust_cert(&cluster.brokers[0].cert)
            .operation_timeout(Duration::from_secs(120))
            .build()
            .await
            .expect("client");
        let consumer = client
            .subscribe(TOPIC, "sub")
            .initial_position(InitialPosition::Earliest)
            .subscribe()
            .await
            .expect("subscribe");
        let producer = client
            .producer(TOPIC)
            .name("p1")
            .batching_max_delay(Duration::from_millis(1))
            .create()
            .await
            .expect("producer");
        let seen = Arc::new(Mutex::new(Seen::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (seen.clone(), stop.clone());
        let producer = tokio::spawn(async move {
            let mut receipts = tokio::task::JoinSet::new();
            let mut tick = tokio::time::interval(Duration::from_millis(2));
            let mut seq = 0u64;
            while !st.load(Ordering::Relaxed) {
                tick.tick().await;
                let receipt = producer.send_async(format!("m-{seq:010}")).await.expect("queue a message");
                let s = s.clone();
                let n = seq;
                receipts.spawn(async move {
                    let id = receipt.await.expect("every message is stored in the end");
                    s.lock().expect("lock").acked.push((n, id, Instant::now()));
                });
                seq += 1;
            }
            producer.flush().await.expect("flush");
            while receipts.join_next().await.is_some() {}
            producer.close().await.expect("close producer");
        });
        let s = seen.clone();
        let consumer = tokio::spawn(async move {
            loop {
                let m = match consumer.receive().await {
                    Ok(m) => m,
                    Err(e) => panic!("receive: {e}"),
                };
                s.lock().expect("lock").received.push((seq_of(&m.payload), m.id, Instant::now()));
                consumer.ack(&m.id).expect("ack");
            }
        });
        Traffic { seen, stop, producer, consumer }
    }

    fn acked(&self) -> usize {
        self.seen.lock().expect("lock").acked.len()
    }

    async fn wait_acked(&self, n: usize, cluster: &Cluster) {
        let deadline = Instant::now() + DEADLINE * 2;
        while self.acked() < n {
            assert!(
                Instant::now() < deadline,
                "only {} of {n} messages acknowledged; logs:\n{}",
                self.acked(),
                cluster.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops producing, waits until every acknowledged message is consumed, and checks them.
    async fn finish(self, cluster: &Cluster) -> Seen {
        self.stop.store(true, Ordering::Relaxed);
        tokio::time::timeout(DEADLINE * 2, self.producer).await.expect("producer finishes").expect("producer task");
        let deadline = Instant::now() + DEADLINE * 2;
        loop {
            let missing = {
                let seen = self.seen.lock().expect("lock");
                let got: std::collections::HashSet<u64> = seen.received.iter().map(|r| r.0).collect();
                seen.acked.iter().filter(|a| !got.contains(&a.0)).count()
            };
            if missing == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{missing} acknowledged messages never consumed; logs:\n{}",
                cluster.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.consumer.abort();
        let seen = std::mem::take(&mut *self.seen.lock().expect("lock"));
        check(&seen);
        seen
    }
}

/// Every acknowledged message was consumed at the id its receipt named (so no two owners
/// acknowledged different messages at one position), and first deliveries follow the producer's
/// order.
fn check(seen: &Seen) {
    let mut at: HashMap<MessageId, u64> = HashMap::new();
    for (seq, id, _) in &seen.received {
        if let Some(other) = at.insert(*id, *seq) {
            assert_eq!(other, *seq, "position {id} delivered as two different messages");
        }
    }
    let mut ids: HashMap<MessageId, u64> = HashMap::new();
    for (seq, id, _) in &seen.acked {
        assert_eq!(at.get(id), Some(seq), "message {seq} acknowledged at {id} but consumed elsewhere");
        if let Some(other) = ids.insert(*id, *seq) {
            panic!("messages {other} and {seq} were both acknowledged at {id}");
        }
    }
    let mut last = None;
    let mut first_seen = std::collections::HashSet::new();
    for (seq, _, _) in &seen.received {
        if first_seen.insert(*seq) {
            assert!(last < Some(*seq), "message {seq} first delivered after message {last:?}");
            last = Some(*seq);
        }
    }
}

/// Time from `at` to the first message acknowledged, and the first delivered, from a ledger
/// opened after `at` (by the new owner: in-flight receipts of the old one do not count).
fn gaps(seen: &Seen, at: Instant) -> (Duration, Duration) {
    let old = seen.acked.iter().filter(|a| a.2 <= at).map(|a| a.1.position.ledger_id).max().unwrap_or(0);
    let first = |v: &[(u64, MessageId, Instant)]| {
        v.iter().filter(|r| r.1.position.ledger_id > old).map(|r| r.2).min().expect("a message from a new ledger")
    };
    (first(&seen.acked) - at, first(&seen.received) - at)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_owner_hands_its_topic_to_the_other_broker_without_loss() {
    let mut cluster = Cluster::start("/failover-kill");
    let traffic = Traffic::start(&cluster).await;
    traffic.wait_acked(300, &cluster).await;
    let owner = cluster.owner().expect("the topic has an owner");
    let killed_at = Instant::now();
    cluster.brokers[owner].kill9();
    let before = traffic.acked();
    traffic.wait_acked(before + 300, &cluster).await;
    assert_eq!(cluster.owner(), Some(1 - owner), "the surviving broker owns the topic");
    let seen = traffic.finish(&cluster).await;
    let (published, delivered) = gaps(&seen, killed_at);
    println!(
        "failover after kill -9 of the owner: first publish acknowledged by the new owner {:.2}s after the kill, \
         first new message delivered {:.2}s after ({} messages acknowledged, {} deliveries)",
        published.as_secs_f64(),
        delivered.as_secs_f64(),
        seen.acked.len(),
        seen.received.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_shutdown_hands_over_without_waiting_for_the_lease() {
    let mut cluster = Cluster::start("/failover-clean");
    let traffic = Traffic::start(&cluster).await;
    traffic.wait_acked(300, &cluster).await;
    let owner = cluster.owner().expect("the topic has an owner");
    let stopped_at = Instant::now();
    let child = cluster.brokers[owner].interrupt_nowait();
    let before = traffic.acked();
    traffic.wait_acked(before + 300, &cluster).await;
    assert!(wait_child(child).success(), "the broker exits cleanly");
    assert_eq!(cluster.owner(), Some(1 - owner), "the surviving broker owns the topic");
    let seen = traffic.finish(&cluster).await;
    let (published, delivered) = gaps(&seen, stopped_at);
    println!(
        "hand-over on clean shutdown: first publish acknowledged by the new owner {:.2}s after SIGINT, \
         first new message delivered {:.2}s after ({} messages acknowledged)",
        published.as_secs_f64(),
        delivered.as_secs_f64(),
        seen.acked.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pausing_etcd_longer_than_the_lease_never_lets_two_owners_acknowledge() {
    let cluster = Cluster::start("/failover-etcd");
    let traffic = Traffic::start(&cluster).await;
    traffic.wait_acked(300, &cluster).await;
    cluster.etcd.pause().expect("SIGSTOP etcd");
    let paused_at = Instant::now();
    // Both brokers notice they cannot renew and stop serving...
    let deadline = Instant::now() + DEADLINE;
    for b in &cluster.brokers {
        loop {
            let (status, body) = http_get(&b.http, "/health");
            if status == 503 && body.contains("suspended") {
                break;
            }
            assert!(Instant::now() < deadline, "broker {} never stopped serving: {status} {body}", b.url);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // ...and etcd stays away for longer than the lease (3 s by default), so it may expire them.
    tokio::time::sleep(Duration::from_secs(4)).await;
    cluster.etcd.resume().expect("SIGCONT etcd");
    let paused_for = paused_at.elapsed();
    let before = traffic.acked();
    traffic.wait_acked(before + 300, &cluster).await;
    let seen = traffic.finish(&cluster).await;
    let (published, _) = gaps(&seen, paused_at);
    println!(
        "etcd paused {:.1}s: first publish acknowledged in a new ledger {:.2}s after the pause began \
         ({} messages acknowledged)",
        paused_for.as_secs_f64(),
        published.as_secs_f64(),
        seen.acked.len()
    );
}
