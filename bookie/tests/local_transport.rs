//! A ledger client reaching a bookie of its own process without a socket (as
//! `magnetar standalone` does): the bookie advertises an address where nothing listens, so
//! everything that works here went through the local transport, with the same answers, errors
//! and fencing as over TCP.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use magnetar_bookie::client::{LedgerClient, LedgerClientConfig, LedgerError};
use magnetar_bookie::config::BookieConfig;
use magnetar_bookie::server::BookieServer;
use magnetar_common::bookie_proto::Status;
use magnetar_common::metadata::{self, SharedStore};
use magnetar_common::testing::wait_until;

/// Generous deadline for anything a test waits for.
const DEADLINE: Duration = Duration::from_secs(60);

/// A port on which nothing listens: connecting is refused at once.
fn dead_address() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let a = l.local_addr().expect("addr").to_string();
    drop(l);
    a
}

async fn start(dir: &std::path::Path) -> (SharedStore, BookieServer) {
    let store = metadata::connect(&format!("embedded:{}", dir.join("meta").display())).await.expect("store");
    let mut cfg = BookieConfig {
        bookie_id: "local-bookie".into(),
        listen_addr: "127.0.0.1:0".parse().expect("addr"),
        http_addr: "127.0.0.1:0".parse().expect("addr"),
        advertised_addr: dead_address(),
        journal_dir: dir.join("journal"),
        ledger_dir: dir.join("ledgers"),
        max_entry_bytes: bytesize::ByteSize::kib(64),
        ..Default::default()
    };
    cfg.journal.preallocate_bytes = bytesize::ByteSize::mib(1);
    // Not a disk-full test: the host's own disk usage must not turn the bookie read-only.
    cfg.disk.usage_threshold = 1.0;
    let bookie = BookieServer::start_with_store(cfg, store.clone()).await.expect("start bookie");
    (store, bookie)
}

async fn client(store: &SharedStore, local: Vec<magnetar_bookie::client::LocalBookie>) -> LedgerClient {
    let cfg = LedgerClientConfig {
        add_timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(1),
        ..Default::default()
    };
    let client = LedgerClient::with_local_bookies(store.clone(), cfg, local).await.expect("client");
    wait_until("the bookie registered", DEADLINE, || async { !client.registry().live().is_empty() }).await;
    client
}

fn payload(i: u64) -> Bytes {
    Bytes::from(format!("entry {i} ").repeat(1 + (i as usize * 37) % 500))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_reads_fencing_and_errors_go_through_the_local_transport() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, bookie) = start(dir.path()).await;

    // Over TCP the advertised address refuses connections: nothing can be written.
    let tcp = client(&store, Vec::new()).await;
    let w = tcp.create(1, 1, 1, BTreeMap::new()).await.expect("create (metadata only)");
    let err = tokio::time::timeout(DEADLINE, w.append(payload(0))).await.expect("an answer").expect_err("no socket");
    assert!(matches!(err, LedgerError::Unavailable(_) | LedgerError::NotEnoughBookies { .. }), "{err}");

    // Through the local transport: entries are acknowledged in order and read back.
    let local = client(&store, vec![bookie.local()]).await;
    let w = local.create(1, 1, 1, BTreeMap::new()).await.expect("create");
    let acks: Vec<_> = (0..200).map(|i| w.append(payload(i))).collect();
    for (i, ack) in acks.into_iter().enumerate() {
        assert_eq!(ack.await.expect("acknowledged"), i as u64);
    }
    let reader = local.open(w.ledger_id()).await.expect("open");
    let entries = reader.read(0, 199).await.expect("read");
    assert_eq!(entries.len(), 200);
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(e.payload(), payload(i as u64), "entry {i}");
    }

    // The bookie's refusals arrive as they would over TCP: an entry above the bookie's
    // maximum is refused as too large, without an ensemble change.
    let big = local.create(1, 1, 1, BTreeMap::new()).await.expect("create");
    let err = big.append(Bytes::from(vec![1u8; 65 * 1024])).await.expect_err("too large");
    assert!(matches!(&err, LedgerError::Bookie { status: Status::TooLarge, .. }), "{err}");
    assert_eq!(local.metadata(big.ledger_id()).await.expect("md").fragments.len(), 1);

    // Recovery by another client fences the bookie: the first writer can add nothing more,
    // and the recovered ledger ends at the last acknowledged entry.
    let other = client(&store, vec![bookie.local()]).await;
    let recovered = other.open_for_recovery(w.ledger_id()).await.expect("recover");
    assert_eq!(recovered.last_entry(), Some(199));
    let err = w.append(payload(200)).await.expect_err("fenced");
    assert!(matches!(err, LedgerError::Fenced(_) | LedgerError::Bookie { status: Status::Fenced, .. }), "{err}");

    bookie.shutdown().await;
}
