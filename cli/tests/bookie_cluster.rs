//! Three real bookies with the ledger client: ensemble change when a bookie dies mid-stream
//! (E=3, Qw=2, Qa=2), and fencing by a recovery-open from a second client.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesOrdered;
use magnetar_bookie::client::{LedgerClient, LedgerClientConfig, LedgerError};
use magnetar_common::metadata;
use magnetar_common::testing::{EtcdServer, wait_for};
use support::{BookieProc, DEADLINE, payload};

const PAYLOAD: usize = 2000;

struct Cluster {
    _etcd: EtcdServer,
    _tmp: tempfile::TempDir,
    bookies: Vec<BookieProc>,
    url: String,
}

async fn cluster(root: &str) -> Cluster {
    let etcd = EtcdServer::start().expect("start etcd");
    let url = etcd.url(root);
    let tmp = tempfile::tempdir().expect("tempdir");
    let bookies = (0..3)
        .map(|i| BookieProc::start(&tmp.path().join(format!("b{i}")), &format!("bookie-{i}"), &url, ""))
        .collect();
    Cluster { _etcd: etcd, _tmp: tmp, bookies, url }
}

async fn client(url: &str) -> LedgerClient {
    client_with_live(url, 3).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_continue_when_a_bookie_dies_and_every_ack_is_readable() {
    let mut c = cluster("/ensemble").await;
    let client = client(&c.url).await;
    let w = client.create(3, 2, 2, BTreeMap::new()).await.expect("create ledger");
    let ledger = w.ledger_id();
    let victim = client.metadata(ledger).await.expect("md").fragments[0].bookies[1].clone();
    let mut in_flight = FuturesOrdered::new();
    let mut acked = Vec::new();
    let total = 1500u64;
    for i in 0..total {
        in_flight.push_back(w.append(Bytes::from(payload(ledger, i, PAYLOAD))));
        if in_flight.len() >= 64 {
            let id = in_flight.next().await.expect("some").expect("append must succeed despite the dead bookie");
            acked.push(id);
        }
        if i == 400 {
            let b = c.bookies.iter_mut().find(|b| b.id == victim).expect("victim");
            b.kill9();
        }
    }
    while let Some(r) = in_flight.next().await {
        acked.push(r.expect("append must succeed despite the dead bookie"));
    }
    assert_eq!(acked, (0..total).collect::<Vec<_>>(), "acknowledged in order");
    let md = w.close().await.expect("close");
    assert_eq!(md.last_entry_id, total as i64 - 1);
    assert!(md.fragments.len() >= 2, "an ensemble change happened: {:?}", md.fragments);
    assert!(!md.last_fragment().bookies.contains(&victim), "the dead bookie left the ensemble");
    let reader = client.open(ledger).await.expect("open");
    let entries = reader.read(0, total - 1).await.expect("read all");
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(&e.payload()[..], &payload(ledger, i as u64, PAYLOAD)[..], "entry {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_open_fences_the_previous_writer() {
    let c = cluster("/fencing").await;
    let a = client(&c.url).await;
    let b = client(&c.url).await;
    let w = a.create(3, 2, 2, BTreeMap::new()).await.expect("create");
    let ledger = w.ledger_id();
    for i in 0..100u64 {
        w.append(Bytes::from(payload(ledger, i, 500))).await.expect("append");
    }
    // More adds in flight while the second client recovers the ledger.
    let racing: Vec<_> = (100..300u64).map(|i| w.append(Bytes::from(payload(ledger, i, 500)))).collect();
    let recovered = b.open_for_recovery(ledger).await.expect("recovery open");
    let last = recovered.last_entry().expect("closed");
    let mut last_acked = 99i64;
    for r in futures::future::join_all(racing).await {
        match r {
            Ok(id) => last_acked = last_acked.max(id as i64),
            Err(LedgerError::Fenced(_)) => {}
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    assert!(last >= last_acked, "recovered last entry {last} is before the last acknowledged {last_acked}");
    let err = w.append(Bytes::from_static(b"after fence")).await.expect_err("fenced writer must fail");
    assert!(matches!(err, LedgerError::Fenced(_) | LedgerError::Closed(_)), "{err}");
    let md = b.metadata(ledger).await.expect("md");
    assert!(md.is_closed() && md.last_entry_id == last);
    let entries = recovered.read(0, last as u64).await.expect("read recovered");
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(&e.payload()[..], &payload(ledger, i as u64, 500)[..], "entry {i}");
    }
    // Every entry of the recovered ledger is on its full write quorum.
    for e in 0..=last as u64 {
        for bookie in md.write_set_ids(e) {
            let conn = magnetar_bookie::client::conn::BookieConn::new(
                bookie.clone(),
                c.bookies.iter().find(|p| p.id == bookie).expect("bookie").addr.clone(),
                Duration::from_secs(5),
            );
            let r = conn
                .call(
                    magnetar_common::bookie_proto::Request::Read { ledger_id: ledger, entry_id: e },
                    Duration::from_secs(10),
                )
                .await;
            assert!(r.is_ok(), "entry {e} missing on {bookie}: {r:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_rewrites_around_a_dead_bookie_and_reads_fall_back_to_replicas() {
    let mut c = cluster("/recovery-dead").await;
    let a = client(&c.url).await;
    let w = a.create(3, 2, 2, BTreeMap::new()).await.expect("create");
    let ledger = w.ledger_id();
    let total = 200u64;
    for i in 0..total {
        w.append(Bytes::from(payload(ledger, i, 700))).await.expect("append");
    }
    // The last entry's LAC is only known to the bookies through a later entry, so recovery
    // must rewrite entry 199, whose write set starts at index 199 % 3 = 1: kill that bookie.
    let md = a.metadata(ledger).await.expect("md");
    let victim = md.fragments[0].bookies[1].clone();
    c.bookies.iter_mut().find(|b| b.id == victim).expect("victim").kill9();
    let b = client_with_live(&c.url, 2).await;
    let recovered = b.open_for_recovery(ledger).await.expect("recovery despite a dead bookie");
    assert_eq!(recovered.last_entry(), Some(total as i64 - 1), "every acknowledged entry kept");
    let md = b.metadata(ledger).await.expect("md");
    assert!(md.is_closed());
    assert!(
        md.fragments.len() == 2 && !md.last_fragment().bookies.contains(&victim),
        "the rewrite moved off the dead bookie: {:?}",
        md.fragments
    );
    let entries = recovered.read(0, total - 1).await.expect("read with replica fallback");
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(&e.payload()[..], &payload(ledger, i as u64, 700)[..], "entry {i}");
    }
    let err = w.append(Bytes::from_static(b"late")).await.expect_err("old writer fenced");
    assert!(matches!(err, LedgerError::Fenced(_) | LedgerError::Closed(_)), "{err}");
}

/// A client that waits until exactly `n` bookies are registered (a killed one's registration
/// expires with its lease).
async fn client_with_live(url: &str, n: usize) -> LedgerClient {
    let store = metadata::connect(url).await.expect("metadata store");
    let config = LedgerClientConfig { add_timeout: Duration::from_secs(3), ..LedgerClientConfig::default() };
    let c = LedgerClient::new(store, config).await.expect("ledger client");
    wait_for("registrations to settle", DEADLINE, || {
        let live = c.registry().live().len();
        async move { (live == n).then_some(()) }
    })
    .await;
    c
}
