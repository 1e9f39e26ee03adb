//! Auto-recovery against real bookies in this process (one embedded metadata store): a bookie
//! that dies during writes loses no copy for long, a ledger whose only copies died is reported
//! and left alone, and exactly one auditor runs at a time.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use magnetar_bookie::client::autorecovery::AUDITOR_KEY;
use magnetar_bookie::client::conn::BookieConn;
use magnetar_bookie::client::{
    AutoRecovery, AutoRecoveryConfig, AutoRecoveryMetrics, LedgerClient, LedgerClientConfig, LedgerMetadata,
};
use magnetar_bookie::config::BookieConfig;
use magnetar_bookie::server::BookieServer;
use magnetar_common::bookie_proto::{Reply, Request};
use magnetar_common::entry::Entry;
use magnetar_common::metadata::{self, SharedStore};
use magnetar_common::testing::wait_until;

/// Generous deadline for anything a test waits for.
const DEADLINE: Duration = Duration::from_secs(60);
const T: Duration = Duration::from_secs(10);

/// Bookies in this process, on one embedded metadata store.
struct Cluster {
    _dir: tempfile::TempDir,
    store: SharedStore,
    bookies: HashMap<String, BookieServer>,
    addresses: HashMap<String, String>,
}

impl Cluster {
    async fn start(n: usize) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = metadata::connect(&format!("embedded:{}", dir.path().join("meta").display())).await.expect("store");
        let mut c = Self { _dir: dir, store, bookies: HashMap::new(), addresses: HashMap::new() };
        for i in 0..n {
            let id = format!("bookie-{i}");
            let b = start_bookie(&c.store, &c._dir.path().join(&id), &id).await;
            c.addresses.insert(id.clone(), b.address.to_string());
            c.bookies.insert(id, b);
        }
        c
    }

    async fn client(&self) -> LedgerClient {
        let cfg = LedgerClientConfig { add_timeout: Duration::from_secs(2), ..Default::default() };
        let client = LedgerClient::new(self.store.clone(), cfg).await.expect("client");
        let n = self.bookies.len();
        wait_until("every bookie registered", DEADLINE, || {
            let live = client.registry().live().len();
            async move { live == n }
        })
        .await;
        client
    }

    /// Stops a bookie: it stops serving and its registration goes away.
    async fn kill(&mut self, id: &str) {
        self.bookies.remove(id).expect("running").shutdown().await;
    }

    /// The entry as stored on one bookie.
    async fn read_from(&self, bookie: &str, ledger_id: u64, entry_id: u64) -> Option<Entry> {
        let conn = BookieConn::new(bookie.into(), self.addresses[bookie].clone(), T);
        match conn.call(Request::Read { ledger_id, entry_id }, T).await {
            Ok(Reply::Read { entry }) => Entry::parse(entry).ok(),
            _ => None,
        }
    }
}

async fn start_bookie(store: &SharedStore, dir: &Path, id: &str) -> BookieServer {
    let mut cfg = BookieConfig {
        bookie_id: id.into(),
        listen_addr: "127.0.0.1:0".parse().expect("addr"),
        http_addr: "127.0.0.1:0".parse().expect("addr"),
        journal_dir: dir.join("journal"),
        ledger_dir: dir.join("ledgers"),
        ..Default::default()
    };
    cfg.journal.fsync = false;
    cfg.journal.preallocate_bytes = bytesize::ByteSize::mib(1);
    // These tests are not about a full disk: the host's own disk usage must not turn them read-only.
    cfg.disk.usage_threshold = 1.0;
    BookieServer::start_with_store(cfg, store.clone()).await.expect("start bookie")
}

fn fast_config() -> AutoRecoveryConfig {
    AutoRecoveryConfig {
        scan_interval: Duration::from_millis(200),
        lost_bookie_grace: Duration::from_millis(300),
        auditor_lease_ttl: Duration::from_secs(2),
        ..Default::default()
    }
}

fn payload(ledger: u64, entry: u64) -> Bytes {
    Bytes::from(format!("ledger {ledger} entry {entry} ").repeat(1 + (entry as usize % 7)))
}

fn references(md: &LedgerMetadata, bookie: &str) -> bool {
    md.fragments.iter().any(|f| f.bookies.iter().any(|b| b == bookie))
}

/// Every entry of a closed ledger is on every bookie of its write set, which are all live.
async fn assert_full_write_quorum(cluster: &Cluster, md: &LedgerMetadata) {
    assert!(md.is_closed());
    for f in &md.fragments {
        assert!(f.bookies.len() >= md.write_quorum, "fragment {f:?} of ledger {}", md.ledger_id);
        let mut distinct = f.bookies.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), f.bookies.len(), "fragment {f:?} names a bookie twice");
    }
    for e in 0..=md.last_entry_id as u64 {
        for b in md.write_set_ids(e) {
            assert!(cluster.bookies.contains_key(&b), "entry {e} of ledger {} is assigned to dead {b}", md.ledger_id);
            let got = cluster.read_from(&b, md.ledger_id, e).await;
            let got = got.unwrap_or_else(|| panic!("bookie {b} lacks entry {}:{e}", md.ledger_id));
            assert_eq!(got.payload(), payload(md.ledger_id, e), "entry {}:{e} on {b}", md.ledger_id);
        }
    }
}

/// E=3, Qw=2, Qa=2: a ledger closed before the kill, and one written across it (the writer
/// replaces the dead bookie; its earlier fragment is left to auto-recovery while the ledger is
/// still open). With `n` bookies: 4 leaves a spare to copy to, 3 makes the fragments shrink.
async fn bookie_killed_during_writes(n: usize) {
    let mut cluster = Cluster::start(n).await;
    let client = cluster.client().await;
    let before = client.create(3, 2, 2, BTreeMap::new()).await.expect("create");
    for e in 0..60 {
        assert_eq!(before.append(payload(before.ledger_id(), e)).await.expect("append"), e);
    }
    let before_md = before.close().await.expect("close");
    let during = client.create(3, 2, 2, BTreeMap::new()).await.expect("create");
    let id = during.ledger_id();
    for e in 0..60 {
        during.append(payload(id, e)).await.expect("append");
    }
    // A bookie of both ensembles (two 3-of-n ensembles always share one).
    let victim = client.metadata(id).await.expect("md").fragments[0]
        .bookies
        .iter()
        .find(|b| references(&before_md, b))
        .expect("shared bookie")
        .clone();
    let in_flight: Vec<_> = (60..100).map(|e| during.append(payload(id, e))).collect();
    cluster.kill(&victim).await;
    for (e, f) in (60..).zip(in_flight) {
        assert_eq!(f.await.expect("append across the kill"), e);
    }
    for e in 100..120 {
        during.append(payload(id, e)).await.expect("append after the kill");
    }
    let md = client.metadata(id).await.expect("md");
    assert!(md.fragments.len() >= 2, "the writer changed the ensemble: {md:?}");
    assert!(!md.last_fragment().bookies.contains(&victim), "the writer replaced the dead bookie: {md:?}");

    let recovery = AutoRecovery::start(&client, fast_config(), AutoRecoveryMetrics::default());
    let m = recovery.metrics().clone();
    let before_id = before_md.ledger_id;
    wait_until("both ledgers to stop referencing the dead bookie", DEADLINE, || {
        let (client, victim, m) = (client.clone(), victim.clone(), m.clone());
        async move {
            let a = client.metadata(before_id).await.expect("md");
            let b = client.metadata(id).await.expect("md");
            !references(&a, &victim)
                && !references(&b, &victim)
                && m.under_replicated_ledgers.get() == 0
                && m.entries_rereplicated.get() > 0
        }
    })
    .await;
    assert!(recovery.is_auditor());
    assert_eq!(m.unrecoverable_entries.get(), 0);
    // The writer still closes the ledger whose earlier fragment auto-recovery changed.
    let during_md = during.close().await.expect("close after auto-recovery changed a fragment");
    assert_eq!(during_md.last_entry_id, 119);
    assert_full_write_quorum(&cluster, &client.metadata(before_md.ledger_id).await.expect("md")).await;
    assert_full_write_quorum(&cluster, &client.metadata(id).await.expect("md")).await;
    if n == 3 {
        // No spare: every fragment is down to the two live bookies.
        for md in [client.metadata(before_md.ledger_id).await.expect("md"), during_md] {
            assert!(md.fragments.iter().all(|f| f.bookies.len() == 2), "{md:?}");
        }
    }
    // Reading through the client gives every entry back.
    let entries = client.open(id).await.expect("open").read(0, 119).await.expect("read");
    assert!(entries.iter().enumerate().all(|(e, x)| x.payload() == payload(id, e as u64)));
    recovery.shutdown().await;
    for (_, b) in cluster.bookies.drain() {
        b.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_bookie_is_replaced_by_a_spare_in_every_fragment() {
    bookie_killed_during_writes(4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_spare_fragments_shrink_to_the_live_bookies() {
    bookie_killed_during_writes(3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_whose_only_copies_died_are_reported_not_fixed() {
    let mut cluster = Cluster::start(3).await;
    let client = cluster.client().await;
    let single = client.create(1, 1, 1, BTreeMap::new()).await.expect("create");
    for e in 0..10 {
        single.append(payload(single.ledger_id(), e)).await.expect("append");
    }
    let single_md = single.close().await.expect("close");
    let victim = single_md.fragments[0].bookies[0].clone();
    cluster.kill(&victim).await;

    let recovery = AutoRecovery::start(&client, fast_config(), AutoRecoveryMetrics::default());
    let m = recovery.metrics().clone();
    wait_until("the lost entries to be reported", DEADLINE, || {
        let m = m.clone();
        async move { m.unrecoverable_entries.get() == 10 && m.under_replicated_ledgers.get() == 1 }
    })
    .await;
    // Later scans change nothing: no copy is invented, the fragment still names its lost bookie.
    let scans = m.scans.get();
    wait_until("two more scans", DEADLINE, || {
        let m = m.clone();
        async move { m.scans.get() >= scans + 2 }
    })
    .await;
    assert_eq!(client.metadata(single_md.ledger_id).await.expect("md"), single_md);
    assert_eq!(m.unrecoverable_entries.get(), 10);
    assert_eq!(m.under_replicated_ledgers.get(), 1);
    assert_eq!(m.fragments_rereplicated.get(), 0);
    assert_eq!(m.entries_rereplicated.get(), 0);
    recovery.shutdown().await;
    for (_, b) in cluster.bookies.drain() {
        b.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_auditor_at_a_time_and_another_takes_over() {
    let cluster = Cluster::start(1).await;
    let a = AutoRecovery::start(&cluster.client().await, fast_config(), AutoRecoveryMetrics::default());
    let b = AutoRecovery::start(&cluster.client().await, fast_config(), AutoRecoveryMetrics::default());
    wait_until("an auditor", DEADLINE, || {
        let n = a.is_auditor() as u8 + b.is_auditor() as u8;
        async move { n == 1 }
    })
    .await;
    let (auditor, other) = if a.is_auditor() { (a, b) } else { (b, a) };
    let key = cluster.store.get(AUDITOR_KEY).await.expect("get").expect("auditor key");
    let holder: serde_json::Value = serde_json::from_slice(&key.value).expect("json");
    assert_eq!(holder["holder"], auditor.holder_id());
    assert!(!other.is_auditor());
    auditor.shutdown().await;
    wait_until("the other to take over", DEADLINE, || {
        let yes = other.is_auditor();
        async move { yes }
    })
    .await;
    other.shutdown().await;
    assert!(cluster.store.get(AUDITOR_KEY).await.expect("get").is_none(), "a clean stop releases the key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledgers_deleted_during_recovery_are_neither_failures_nor_losses() {
    let mut cluster = Cluster::start(4).await;
    let client = cluster.client().await;
    let mut ids = Vec::new();
    for _ in 0..12 {
        let w = client.create(3, 2, 2, BTreeMap::new()).await.expect("create");
        let acks: Vec<_> = (0..150).map(|e| w.append(payload(w.ledger_id(), e))).collect();
        for a in acks {
            a.await.expect("append");
        }
        ids.push(w.close().await.expect("close").ledger_id);
    }
    cluster.kill("bookie-0").await;
    let recovery = AutoRecovery::start(&client, fast_config(), AutoRecoveryMetrics::default());
    let m = recovery.metrics().clone();
    // Delete them while the auditor may be copying them (a delete that races with its
    // compare-and-swap is retried, as any caller would).
    for id in ids {
        loop {
            match client.delete(id).await {
                Ok(()) => break,
                Err(magnetar_bookie::client::LedgerError::Invalid(_)) => continue,
                Err(e) => panic!("delete {id}: {e}"),
            }
        }
    }
    let scans = m.scans.get();
    wait_until("a scan after the deletes", DEADLINE, || {
        let m = m.clone();
        async move { m.scans.get() >= scans + 2 }
    })
    .await;
    assert_eq!(m.under_replicated_ledgers.get(), 0);
    assert_eq!(m.unrecoverable_entries.get(), 0);
    assert_eq!(m.failures.get(), 0);
    recovery.shutdown().await;
    for (_, b) in cluster.bookies.drain() {
        b.shutdown().await;
    }
}
