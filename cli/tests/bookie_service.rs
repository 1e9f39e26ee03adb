//! The bookie service as a user meets it: bad input, read-only mode on a full disk, identity
//! checks, health and metrics, clean shutdown.

mod support;

use std::io::{Read, Write};
use std::time::Duration;

use bytes::Bytes;
use std::collections::BTreeMap;

use magnetar_bookie::client::conn::BookieConn;
use magnetar_bookie::client::{LedgerClient, LedgerClientConfig, LedgerError};
use magnetar_common::bookie_proto::{Reply, Request, Status};
use magnetar_common::entry::encode_entry;
use magnetar_common::metadata;
use magnetar_common::testing::{EtcdServer, wait_for};
use support::{BookieProc, DEADLINE, http_get, payload};

const T: Duration = Duration::from_secs(10);

fn status_of(r: Result<Reply, LedgerError>) -> Option<Status> {
    match r {
        Err(LedgerError::Bookie { status, .. }) => Some(status),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_errors_and_only_its_connection_closes() {
    let etcd = EtcdServer::start().expect("etcd");
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut b = BookieProc::start(tmp.path(), "bad-input", &etcd.url("/bad"), "max_entry_bytes = \"64KiB\"\n");
    let good = BookieConn::new("b".into(), b.addr.clone(), T);
    good.call(Request::Add { flags: 0, entry: encode_entry(1, 0, -1, b"ok") }, T).await.expect("add");

    // Oversized entry: refused with TooLarge, connection stays usable.
    let big = encode_entry(1, 1, 0, &vec![7u8; 65 * 1024]);
    assert_eq!(status_of(good.call(Request::Add { flags: 0, entry: big }, T).await), Some(Status::TooLarge));
    // Corrupt entry (digest mismatch): BadRequest.
    let mut bad = encode_entry(1, 1, 0, b"abc").to_vec();
    bad[29] ^= 1;
    assert_eq!(
        status_of(good.call(Request::Add { flags: 0, entry: Bytes::from(bad) }, T).await),
        Some(Status::BadRequest)
    );
    // Missing entry and missing ledger: NotFound.
    assert_eq!(status_of(good.call(Request::Read { ledger_id: 1, entry_id: 99 }, T).await), Some(Status::NotFound));
    assert_eq!(status_of(good.call(Request::ReadLac { ledger_id: 777 }, T).await), Some(Status::NotFound));

    // A malformed frame (unknown kind) on a raw socket: an error frame, then the connection closes.
    let mut raw = std::net::TcpStream::connect(&b.addr).expect("connect");
    raw.set_read_timeout(Some(DEADLINE)).expect("timeout");
    raw.write_all(&[0, 0, 0, 9, 0x55, 0, 0, 0, 0, 0, 0, 0, 1]).expect("write");
    let mut resp = Vec::new();
    raw.read_to_end(&mut resp).expect("read until close");
    assert!(resp.len() > 13, "an error frame came back before the close");
    assert_eq!(u16::from_be_bytes([resp[13], resp[14]]), Status::BadRequest.code());
    // A frame claiming 3 GiB: refused without allocating, connection closed.
    let mut raw = std::net::TcpStream::connect(&b.addr).expect("connect");
    raw.set_read_timeout(Some(DEADLINE)).expect("timeout");
    raw.write_all(&[0xC0, 0, 0, 0, 1]).expect("write");
    let mut resp = Vec::new();
    raw.read_to_end(&mut resp).expect("read until close");
    assert_eq!(u16::from_be_bytes([resp[13], resp[14]]), Status::TooLarge.code());

    // A ledger writer whose entry is refused as too large fails with that error; it does not
    // mistake the refusal for a failed bookie and change the ensemble.
    let store = metadata::connect(&etcd.url("/bad")).await.expect("store");
    let client = LedgerClient::new(store, LedgerClientConfig::default()).await.expect("client");
    wait_for("the bookie registered", DEADLINE, || {
        let n = client.registry().live().len();
        async move { (n == 1).then_some(()) }
    })
    .await;
    let w = client.create(1, 1, 1, BTreeMap::new()).await.expect("create");
    let err = w.append(Bytes::from(vec![1u8; 65 * 1024])).await.expect_err("too large");
    assert!(matches!(&err, LedgerError::Bookie { status: Status::TooLarge, .. }), "{err}");
    assert_eq!(client.metadata(w.ledger_id()).await.expect("md").fragments.len(), 1);

    // The well-behaved connection was not affected.
    match good.call(Request::Read { ledger_id: 1, entry_id: 0 }, T).await {
        Ok(Reply::Read { .. }) => {}
        other => panic!("good connection broken: {other:?}"),
    }
    // Health and metrics.
    let (code, body) = http_get(&b.http, "/health");
    assert_eq!(code, 200);
    assert!(body.contains("\"status\":\"ok\""), "{body}");
    let (_, metrics) = http_get(&b.http, "/metrics");
    assert!(metrics.contains("magnetar_bookie_adds_total 1"), "{metrics}");
    assert!(metrics.contains("magnetar_bookie_journal_fsync_seconds_bucket"), "{metrics}");
    assert!(metrics.contains("magnetar_bookie_add_seconds_count 1\n"), "{metrics}");
    assert!(metrics.contains("magnetar_bookie_journal_record_seconds_count 1\n"), "{metrics}");
    assert!(b.stop().success(), "clean shutdown on SIGTERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_above_threshold_turns_read_only_and_reads_continue() {
    let etcd = EtcdServer::start().expect("etcd");
    let url = etcd.url("/full");
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut b = BookieProc::start(tmp.path(), "full-1", &url, "");
    let conn = BookieConn::new("b".into(), b.addr.clone(), T);
    for e in 0..20u64 {
        conn.call(Request::Add { flags: 0, entry: encode_entry(5, e, e as i64 - 1, &payload(5, e, 4000)) }, T)
            .await
            .expect("add");
    }
    assert!(b.stop().success());
    // Same bookie, now configured so that the disk counts as full.
    let mut b = BookieProc::start(
        tmp.path(),
        "full-1",
        &url,
        "[disk]\nusage_threshold = 0.000001\nusage_low_water_mark = 0.000001\ncheck_interval = \"100ms\"\n",
    );
    let conn = BookieConn::new("b".into(), b.addr.clone(), T);
    let (code, body) = http_get(&b.http, "/health");
    assert_eq!(code, 200);
    assert!(body.contains("\"read_only\":true") && body.contains("threshold"), "{body}");
    let r = conn.call(Request::Add { flags: 0, entry: encode_entry(5, 20, 19, b"more") }, T).await;
    match r {
        Err(LedgerError::Bookie { status: Status::ReadOnly, message, .. }) => {
            assert!(message.contains("read-only"), "{message}")
        }
        other => panic!("expected ReadOnly, got {other:?}"),
    }
    for e in 0..20u64 {
        match conn.call(Request::Read { ledger_id: 5, entry_id: e }, T).await {
            Ok(Reply::Read { entry }) => {
                let en = magnetar_common::entry::Entry::parse(entry).expect("valid");
                assert_eq!(&en.payload()[..], &payload(5, e, 4000)[..]);
            }
            other => panic!("read {e} failed on a read-only bookie: {other:?}"),
        }
    }
    // Writers see it in the registration, and the log says so.
    let store = metadata::connect(&url).await.expect("store");
    wait_for("read-only registration", DEADLINE, || {
        let store = store.clone();
        async move {
            let v = store.get("/bookies/available/full-1").await.ok()??;
            String::from_utf8_lossy(&v.value).contains("\"read_only\":true").then_some(())
        }
    })
    .await;
    assert!(b.log().contains("read-only"), "{}", b.log());
    assert!(b.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_checks_refuse_foreign_or_wiped_disks() {
    let etcd = EtcdServer::start().expect("etcd");
    let url = etcd.url("/ident");
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut b = BookieProc::start(&tmp.path().join("disk-a"), "ident-1", &url, "");
    assert!(b.stop().success());
    // Another bookie id pointed at ident-1's disks.
    let other = std::fs::read_to_string(&b.config).expect("config").replace("ident-1", "ident-2");
    let cfg2 = tmp.path().join("other.toml");
    std::fs::write(&cfg2, other).expect("write");
    let out =
        std::process::Command::new(support::magnetar()).args(["bookie", "--config"]).arg(&cfg2).output().expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("belongs to bookie ident-1"), "{err}");
    // The same bookie id on wiped disks.
    std::fs::remove_dir_all(tmp.path().join("disk-a/journal")).expect("wipe");
    std::fs::remove_dir_all(tmp.path().join("disk-a/ledgers")).expect("wipe");
    let err = b.start_expecting_failure();
    assert!(err.contains("wiped or replaced"), "{err}");
    // A config that makes no sense is refused with the field named.
    let bad = tmp.path().join("bad.toml");
    std::fs::write(&bad, "[disk]\nusage_threshold = 2.0\n").expect("write");
    let out = std::process::Command::new(support::magnetar())
        .args(["bookie", "--check-config"])
        .arg(&bad)
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("disk.usage_threshold"));
    let out = std::process::Command::new(support::magnetar())
        .args(["bookie", "--check-config", concat!(env!("CARGO_MANIFEST_DIR"), "/../config/bookie.toml")])
        .output()
        .expect("run");
    assert!(out.status.success(), "shipped example config is valid: {}", String::from_utf8_lossy(&out.stderr));
}
