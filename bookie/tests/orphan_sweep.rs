//! The orphan sweep against a real bookie in this process (embedded metadata store): copies of
//! ledgers whose metadata is gone, or says they live in object storage only, are deleted; every
//! other ledger stays readable.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use magnetar_bookie::client::conn::BookieConn;
use magnetar_bookie::client::meta;
use magnetar_bookie::client::{LedgerClient, LedgerClientConfig, LedgerError, LedgerOffload};
use magnetar_bookie::config::BookieConfig;
use magnetar_bookie::server::BookieServer;
use magnetar_common::bookie_proto::{Reply, Request, Status};
use magnetar_common::metadata::{self, SharedStore};
use magnetar_common::testing::wait_until;

/// Generous deadline for anything a test waits for.
const DEADLINE: Duration = Duration::from_secs(60);
const T: Duration = Duration::from_secs(10);

async fn start(dir: &std::path::Path, store: &SharedStore) -> BookieServer {
    let mut cfg = BookieConfig {
        bookie_id: "sweeper".into(),
        listen_addr: "127.0.0.1:0".parse().expect("addr"),
        http_addr: "127.0.0.1:0".parse().expect("addr"),
        journal_dir: dir.join("journal"),
        ledger_dir: dir.join("ledgers"),
        ..Default::default()
    };
    cfg.journal.preallocate_bytes = bytesize::ByteSize::mib(1);
    cfg.storage.flush_interval = Duration::from_millis(100);
    cfg.storage.orphan_sweep_interval = Duration::from_millis(100);
    // Not a disk-full test: the host's own disk usage must not turn the bookie read-only.
    cfg.disk.usage_threshold = 1.0;
    BookieServer::start_with_store(cfg, store.clone()).await.expect("start bookie")
}

/// Writes `n` entries to a new ledger and closes it.
async fn ledger(client: &LedgerClient, n: u64) -> u64 {
    let w = client.create(1, 1, 1, BTreeMap::new()).await.expect("create");
    for i in 0..n {
        w.append(Bytes::from(format!("entry {i}"))).await.expect("append");
    }
    w.close().await.expect("close");
    w.ledger_id()
}

async fn set_offload(client: &LedgerClient, ledger_id: u64, copies_deleted: bool) {
    let (mut md, version) = client.metadata_versioned(ledger_id).await.expect("metadata");
    md.offload = Some(LedgerOffload::Offloaded {
        store: "memory://".into(),
        segments: Vec::new(),
        offloaded_at_ms: 1,
        bookie_copies_deleted_at_ms: copies_deleted.then_some(2),
    });
    client.update_metadata(&md, version).await.expect("update metadata");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_of_deleted_and_offloaded_ledgers_are_swept_and_the_rest_stays() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = metadata::connect(&format!("embedded:{}", dir.path().join("meta").display())).await.expect("store");
    let bookie = start(dir.path(), &store).await;
    let client = LedgerClient::new(store.clone(), LedgerClientConfig::default()).await.expect("client");
    wait_until("the bookie registered", DEADLINE, || async { !client.registry().live().is_empty() }).await;

    let kept = ledger(&client, 10).await;
    let deleted_meta = ledger(&client, 10).await;
    let offloaded_gone = ledger(&client, 10).await;
    let offloaded_kept = ledger(&client, 10).await;
    let storage = bookie.storage().clone();
    wait_until("the ledgers flushed", DEADLINE, || async {
        storage
            .stored_ledgers()
            .is_ok_and(|l| [kept, deleted_meta, offloaded_gone, offloaded_kept].iter().all(|x| l.contains(x)))
    })
    .await;

    // What the bookie would have been told had it been reachable: the metadata of one ledger
    // deleted, another ledger offloaded with its bookie copies deleted, a third offloaded with
    // its copies still wanted.
    store.delete(&meta::key(deleted_meta), None).await.expect("delete metadata");
    set_offload(&client, offloaded_gone, true).await;
    set_offload(&client, offloaded_kept, false).await;

    // A deletion is counted just after the copy is gone: wait for both.
    wait_until("the orphans swept", DEADLINE, || async {
        storage.stored_ledgers().is_ok_and(|l| !l.contains(&deleted_meta) && !l.contains(&offloaded_gone))
            && storage.metrics().orphan_ledgers_deleted.get() >= 2
    })
    .await;
    let conn = BookieConn::new("sweeper".into(), bookie.address.to_string(), T);
    for gone in [deleted_meta, offloaded_gone] {
        match conn.call(Request::Read { ledger_id: gone, entry_id: 0 }, T).await {
            Err(LedgerError::Bookie { status: Status::NotFound, .. }) => {}
            other => panic!("ledger {gone} is still on the bookie: {other:?}"),
        }
    }
    for live in [kept, offloaded_kept] {
        let entries = client.open(live).await.expect("open").read(0, 9).await.expect("read");
        assert_eq!(entries.len(), 10, "ledger {live}");
        assert!(matches!(conn.call(Request::Read { ledger_id: live, entry_id: 9 }, T).await, Ok(Reply::Read { .. })));
    }
    assert_eq!(storage.metrics().orphan_ledgers_deleted.get(), 2);
    assert!(storage.stored_ledgers().expect("list").contains(&kept));
    bookie.shutdown().await;
}
