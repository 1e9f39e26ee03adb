//! Crash test with a real `magnetar bookie`: a writer streams adds, the bookie is killed with
//! `kill -9` mid-stream at several points, restarted, and every acknowledged entry must read back
//! byte for byte. The write cache and journal files are small, so kills land during flushes,
//! checkpoints, journal rotations and trims too.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use magnetar_bookie::client::conn::BookieConn;
use magnetar_common::bookie_proto::{Reply, Request};
use magnetar_common::entry::{Entry, encode_entry};
use magnetar_common::testing::EtcdServer;
use magnetar_common::testing::wait_for;
use support::{BookieProc, DEADLINE, payload};

const EXTRA: &str = "max_entry_bytes = \"1MiB\"\n\
[storage]\nwrite_cache_bytes = \"4MiB\"\nflush_interval = \"200ms\"\nentry_log_max_bytes = \"8MiB\"\n\
[journal]\nmax_file_bytes = \"4MiB\"\npreallocate_bytes = \"1MiB\"\n";

fn size_of(entry: u64) -> usize {
    (entry as usize * 7919) % 40_000 + 1
}

/// Every stored entry of `ledger` up to `max_entry`. Adds were in flight concurrently, so the
/// journal order is not entry order and a kill can leave holes (entries never acknowledged):
/// a range read stops at a hole, and reading resumes after it.
async fn read_all(conn: &BookieConn, ledger: u64, max_entry: u64) -> HashMap<u64, Entry> {
    let mut out = HashMap::new();
    let mut next = 0u64;
    while next <= max_entry {
        let req = Request::ReadRange { ledger_id: ledger, first: next, last: max_entry, max_bytes: 4 << 20 };
        match conn.call(req, Duration::from_secs(30)).await {
            Ok(Reply::ReadRange { entries }) if !entries.is_empty() => {
                for raw in entries {
                    let e = Entry::parse(raw).expect("bookie returned a valid entry");
                    assert_eq!(e.entry_id, next, "a range read is contiguous");
                    next += 1;
                    out.insert(e.entry_id, e);
                }
            }
            Err(magnetar_bookie::client::LedgerError::Bookie {
                status: magnetar_common::bookie_proto::Status::NotFound,
                ..
            }) => next += 1,
            other => panic!("read {ledger} from {next}: {other:?}"),
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_entries_survive_kill_9_at_any_point() {
    let etcd = EtcdServer::start().expect("start etcd");
    let guard = tempfile::tempdir().expect("tempdir");
    let tmp = guard.path().to_path_buf();
    // MAGNETAR_TEST_KEEP=1 keeps the bookie's directories for inspection.
    let _guard = if std::env::var_os("MAGNETAR_TEST_KEEP").is_some() {
        eprintln!("keeping {}", tmp.display());
        std::mem::forget(guard);
        None
    } else {
        Some(guard)
    };
    let mut bookie = BookieProc::start(&tmp.join("b"), "crash-1", &etcd.url("/crash"), EXTRA);
    let mut acked_all: Vec<(u64, Vec<u64>)> = Vec::new();
    for (round, kill_after) in [5usize, 250, 1200, 3000].into_iter().enumerate() {
        let ledger = 10 + round as u64;
        let conn = Arc::new(BookieConn::new("b".into(), bookie.addr.clone(), Duration::from_secs(5)));
        let acked = Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (conn, acked, stop) = (conn.clone(), acked.clone(), stop.clone());
            tokio::spawn(async move {
                let mut set = tokio::task::JoinSet::new();
                let mut entry = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    while set.len() >= 32 {
                        set.join_next().await;
                    }
                    let raw = encode_entry(ledger, entry, entry as i64 - 1, &payload(ledger, entry, size_of(entry)));
                    let (conn, acked) = (conn.clone(), acked.clone());
                    let e = entry;
                    set.spawn(async move {
                        if let Ok(Reply::Add { entry_id, .. }) =
                            conn.call(Request::Add { flags: 0, entry: raw }, Duration::from_secs(10)).await
                        {
                            assert_eq!(entry_id, e);
                            acked.lock().expect("lock").push(e);
                        }
                    });
                    entry += 1;
                    tokio::task::yield_now().await;
                }
                while set.join_next().await.is_some() {}
            })
        };
        wait_for("acknowledged adds", DEADLINE, || {
            let n = acked.lock().expect("lock").len();
            async move { (n >= kill_after).then_some(()) }
        })
        .await;
        bookie.kill9();
        stop.store(true, Ordering::Relaxed);
        writer.await.expect("writer");
        let acked_round = std::mem::take(&mut *acked.lock().expect("lock"));
        assert!(acked_round.len() >= kill_after);
        acked_all.push((ledger, acked_round));
        bookie.restart();
        let reader = BookieConn::new("b".into(), bookie.addr.clone(), Duration::from_secs(5));
        for (ledger, entries) in &acked_all {
            let max = entries.iter().copied().max().unwrap_or(0);
            let stored = read_all(&reader, *ledger, max).await;
            for e in entries {
                let got = stored.get(e).unwrap_or_else(|| {
                    panic!("acknowledged entry {ledger}:{e} lost after kill -9 (round {round}); log:\n{}", bookie.log())
                });
                assert_eq!(&got.payload()[..], &payload(*ledger, *e, size_of(*e))[..], "entry {ledger}:{e} differs");
            }
        }
        eprintln!("round {round}: killed after {} acks; all {} rounds verified", kill_after, acked_all.len());
    }
}
