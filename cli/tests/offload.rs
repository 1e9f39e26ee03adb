//! The object-storage tier against a real `magnetar standalone` and an S3-compatible server
//! (moto, installed by `scripts/s3-server.sh`): a GiB offloaded and read back byte for byte, a
//! `kill -9` in the middle of an upload, the S3 server frozen while producing and reading, and
//! retention deleting objects.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesOrdered;
use magnetar_client::{Client, InitialPosition, MessageId, Producer};
use magnetar_common::testing::{S3Server, wait_until};
use serde_json::Value;
use support::{DEADLINE, StandaloneProc, http_get, magnetar};

/// The standalone's broker configuration with an `[offload]` section pointing at `s3`.
fn broker_config(s3: &S3Server, ledger: &str, offload: &str, policy: &str) -> String {
    format!(
        r#"
[ledger]
{ledger}

[offload]
url = "s3://{bucket}/offload"
endpoint = "{endpoint}"
region = "us-east-1"
path_style = true
allow_http = true
access_key_id = "test"
secret_access_key = "test"
{offload}

[offload_policy]
check_interval = "500ms"
retry_initial_backoff = "200ms"
retry_max_backoff = "1s"
{policy}
"#,
        bucket = S3Server::BUCKET,
        endpoint = s3.endpoint(),
    )
}

/// Bookie configuration reclaiming deleted ledgers' space quickly.
const BOOKIE: &str = "[storage]\ngc_interval = \"1s\"\nflush_interval = \"1s\"\nentry_log_max_bytes = \"64MiB\"\n";

/// Deterministic, incompressible payload of message `i`.
fn payload(i: u64, size: usize) -> Vec<u8> {
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(size + 8);
    out.extend_from_slice(&i.to_be_bytes());
    while out.len() < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(size);
    out
}

/// Publishes messages `range` of `size` bytes, many in flight; returns their ids in order.
async fn produce(producer: &Producer, range: std::ops::Range<u64>, size: usize) -> Vec<MessageId> {
    let mut ids = Vec::with_capacity((range.end - range.start) as usize);
    let mut receipts = FuturesOrdered::new();
    for i in range {
        let receipt = producer.send_async(payload(i, size)).await.expect("queue message");
        receipts.push_back(receipt);
        if receipts.len() >= 64 {
            ids.push(receipts.next().await.expect("receipt").expect("message stored"));
        }
    }
    while let Some(r) = receipts.next().await {
        ids.push(r.expect("message stored"));
    }
    ids
}

/// Reads `count` messages from the earliest one on a new subscription and checks each is
/// `payload(first + n, size)`, in order.
async fn consume_and_verify(client: &Client, topic: &str, sub: &str, first: u64, count: u64, size: usize) {
    let consumer =
        client.subscribe(topic, sub).initial_position(InitialPosition::Earliest).subscribe().await.expect("subscribe");
    for n in 0..count {
        let m = tokio::time::timeout(DEADLINE, consumer.receive())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for message {n} of {count}"))
            .expect("receive");
        let i = first + n;
        assert!(m.payload.len() == size && m.payload[..] == payload(i, size)[..], "message {n} (payload {i}) differs");
        consumer.ack(&m.id).expect("ack");
    }
    consumer.close().await.expect("close consumer");
}

fn run_admin(sa: &StandaloneProc, args: &[&str]) -> std::process::Output {
    Command::new(magnetar())
        .arg("admin")
        .arg("--url")
        .arg(format!("http://{}", sa.http))
        .args(args)
        .output()
        .expect("run magnetar admin")
}

fn admin(sa: &StandaloneProc, args: &[&str]) -> String {
    let out = run_admin(sa, args);
    assert!(
        out.status.success(),
        "magnetar admin {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn offload_status(sa: &StandaloneProc, topic: &str) -> Value {
    let (status, body) = http_get(&sa.http, &format!("/admin/v1/topics/public/default/{topic}/offload"));
    assert_eq!(status, 200, "offload status: {body}");
    serde_json::from_str(&body).expect("offload status json")
}

/// The value of a metric line starting with `prefix` (labels included), if present.
fn metric(sa: &StandaloneProc, prefix: &str) -> Option<f64> {
    let (_, body) = http_get(&sa.http, "/metrics");
    body.lines().find(|l| l.starts_with(prefix)).and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            // Allocated blocks, not the apparent size: preallocated files count as they are.
            Ok(m) => std::os::unix::fs::MetadataExt::blocks(&m) * 512,
            Err(_) => 0,
        })
        .sum()
}

/// Segment objects in the store under the test's prefix.
fn segments(s3: &S3Server) -> Vec<String> {
    let keys = s3.object_keys("offload/ledgers/").expect("list objects");
    keys.into_iter().filter(|k| k.ends_with(".seg")).collect()
}

const MIB: u64 = 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gib_offloaded_to_s3_is_read_back_identically_and_leaves_the_bookie() {
    let s3 = S3Server::start().expect("start the S3 server");
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let config = broker_config(&s3, "rollover_max_bytes = \"64MiB\"", "", "deletion_lag = \"0s\"");
    let sa = StandaloneProc::start_configured(&data, &config, BOOKIE);
    let client = Client::builder(&sa.url).tls_trust_cert(&sa.cert).build().await.expect("connect");
    let topic = "history";
    let size = 256 * 1024;
    let count = 4200; // 1.03 GiB
    let producer = client.producer(topic).create().await.expect("producer");
    let ids = produce(&producer, 0..count, size).await;
    assert_eq!(ids.len() as u64, count);
    producer.close().await.expect("close producer");
    let ledger_dir = data.join("bookie/ledgers");
    let before = dir_bytes(&ledger_dir);
    let status = offload_status(&sa, topic);
    assert_eq!(status["offloaded_ledgers"], 0, "{status}");
    assert!(status["bookie_bytes"].as_u64().expect("bookie_bytes") >= count * size as u64, "{status}");

    let out = admin(&sa, &["topics", "offload", topic, "--wait", "--timeout", "10min"]);
    assert!(out.contains("offloaded persistent://public/default/history"), "{out}");
    let status = offload_status(&sa, topic);
    let offloaded = status["offloaded_ledgers"].as_u64().expect("offloaded_ledgers");
    assert!(offloaded >= 15, "a GiB in 64 MiB ledgers is at least 15 closed ledgers: {status}");
    assert!(status["offloaded_bytes"].as_u64().expect("offloaded_bytes") >= 960 * MIB, "{status}");
    assert!(
        status["bookie_bytes"].as_u64().expect("bookie_bytes") <= 70 * MIB,
        "only the current ledger stays: {status}"
    );
    assert_eq!(segments(&s3).len() as u64, offloaded, "one object per offloaded ledger");
    assert!(metric(&sa, "magnetar_broker_offload_store_requests_total{op=\"multipart_part\"}").unwrap_or(0.0) > 0.0);
    // The bookie reclaims the deleted ledgers' entry logs.
    wait_until("the bookie's disk usage to fall", DEADLINE * 4, || async { dir_bytes(&ledger_dir) < before / 4 }).await;

    consume_and_verify(&client, topic, "replay", 0, count, size).await;
    let stats = admin(&sa, &["topics", "stats", topic]);
    assert!(stats.contains("in object storage"), "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_in_the_middle_of_an_upload_then_the_ledger_is_offloaded_exactly_once() {
    let s3 = S3Server::start().expect("start the S3 server");
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    // A 20 MiB ledger uploads in 5 MiB parts, one at a time, at 4 MiB/s: the kill lands mid-way.
    let slow = broker_config(
        &s3,
        "rollover_max_bytes = \"20MiB\"",
        "part_bytes = \"5MiB\"\nupload_concurrency = 1",
        "deletion_lag = \"0s\"\nmax_upload_rate = \"4MiB\"",
    );
    let mut sa = StandaloneProc::start_configured(&data, &slow, BOOKIE);
    let topic = "crash";
    let size = 64 * 1024;
    let count = 400; // 25 MiB: one closed ledger and part of the next
    {
        let client = Client::builder(&sa.url).tls_trust_cert(&sa.cert).build().await.expect("connect");
        let producer = client.producer(topic).create().await.expect("producer");
        produce(&producer, 0..count, size).await;
        producer.close().await.expect("close producer");
    }
    admin(&sa, &["topics", "offload", topic]);
    let part = "magnetar_broker_offload_store_requests_total{op=\"multipart_part\"}";
    wait_until("a part uploaded", DEADLINE, || async { metric(&sa, part).unwrap_or(0.0) >= 1.0 }).await;
    sa.kill9();
    assert!(s3.incomplete_multipart_uploads().expect("list uploads") >= 1, "the kill interrupted an upload");
    assert!(segments(&s3).is_empty(), "nothing half-written is visible: {:?}", segments(&s3));

    sa.restart();
    let out = admin(&sa, &["topics", "offload", topic, "--wait", "--timeout", "5min"]);
    assert!(out.contains("offloaded"), "{out}");
    // The restart closed the ledger being written too: two closed ledgers, one object each.
    let status = offload_status(&sa, topic);
    assert_eq!(status["offloaded_ledgers"], 2, "{status}");
    let objects = segments(&s3);
    let mut ledgers: Vec<&str> = objects.iter().filter_map(|k| k.split('/').nth(2)).collect();
    ledgers.dedup();
    assert_eq!((objects.len(), ledgers.len()), (2, 2), "exactly one object per ledger: {objects:?}");
    assert!(sa.log().contains("taking over an offload that did not finish"), "the restart took the claim over");

    let client = Client::builder(&sa.url).tls_trust_cert(&sa.cert).build().await.expect("connect");
    consume_and_verify(&client, topic, "after-crash", 0, count, size).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_s3_server_never_stops_producing_and_reads_resume_when_it_returns() {
    let s3 = S3Server::start().expect("start the S3 server");
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    // Everything closed is offloaded at once; requests to a frozen server fail after 1 s.
    let config = format!(
        "max_message_bytes = \"1MiB\"\n{}",
        broker_config(
            &s3,
            "rollover_max_bytes = \"1MiB\"",
            "request_timeout = \"1s\"\nconnect_timeout = \"1s\"\nmax_retries = 0\nretry_timeout = \"1s\"",
            "threshold = \"0B\"\ndeletion_lag = \"0s\"",
        )
    );
    let mut sa = StandaloneProc::start_configured(&data, &config, BOOKIE);
    let client = Client::builder(&sa.url).tls_trust_cert(&sa.cert).build().await.expect("connect");
    let topic = "outage";
    let size = 32 * 1024;
    let producer = client.producer(topic).create().await.expect("producer");
    produce(&producer, 0..160, size).await; // 5 MiB, 4+ closed ledgers
    wait_until("the closed ledgers offloaded", DEADLINE, || async {
        let s = offload_status(&sa, topic);
        s["offloaded_ledgers"].as_u64() >= Some(4) && s["pending_ledgers"] == 0
    })
    .await;
    let before = offload_status(&sa, topic)["offloaded_ledgers"].as_u64().expect("offloaded_ledgers");

    s3.pause().expect("freeze the S3 server");
    // Producing goes on: every message is acknowledged while the store is down.
    let ids = produce(&producer, 160..320, size).await;
    assert_eq!(ids.len(), 160);
    wait_until("the offload failure and backlog to show", DEADLINE, || async {
        let s = offload_status(&sa, topic);
        s["last_error"].is_string() && s["pending_bytes"].as_u64() > Some(0)
    })
    .await;
    assert!(
        metric(&sa, "magnetar_broker_offload_backlog_bytes{topic=\"persistent://public/default/outage\"}") > Some(0.0)
    );
    producer.close().await.expect("close producer");
    // A restart empties the broker's entry cache: a catch-up reader must go to object storage.
    assert!(sa.interrupt().success(), "clean shutdown while the store is down");
    sa.restart();
    let client = Client::builder(&sa.url).tls_trust_cert(&sa.cert).build().await.expect("reconnect");
    // Reading offloaded entries fails clearly (and is retried) while the store is down.
    let reader = tokio::spawn({
        let client = client.clone();
        async move { consume_and_verify(&client, topic, "catch-up", 0, 320, size).await }
    });
    let mut last = Value::Null;
    let shown = tokio::time::timeout(DEADLINE, async {
        loop {
            last = offload_status(&sa, topic);
            if last["read_error"].as_str().is_some_and(|e| e.contains("object store unavailable")) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(shown.is_ok(), "no read error shown: {last}\n{}", sa.log());
    let status = admin(&sa, &["topics", "offload-status", topic]);
    assert!(status.contains("read error") && status.contains("retrying"), "{status}");
    assert!(!reader.is_finished(), "nothing offloaded can be read while the store is down");

    s3.resume().expect("thaw the S3 server");
    tokio::time::timeout(DEADLINE * 2, reader).await.expect("catch-up read finishes").expect("catch-up read");
    wait_until("offloading to catch up", DEADLINE, || async {
        let s = offload_status(&sa, topic);
        s["pending_ledgers"] == 0 && s["last_error"].is_null() && s["offloaded_ledgers"].as_u64() > Some(before)
    })
    .await;
    assert!(offload_status(&sa, topic)["read_error"].is_null());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_and_topic_deletion_delete_offloaded_objects() {
    let s3 = S3Server::start().expect("start the S3 server");
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let config = broker_config(&s3, "rollover_max_entries = 20", "", "deletion_lag = \"0s\"");
    let sa = StandaloneProc::start_configured(&data, &config, BOOKIE);
    let client = Client::builder(&sa.url).tls_trust_cert(&sa.cert).build().await.expect("connect");
    let topic = "short-lived";
    let size = 1024;
    let producer = client.producer(topic).batching(false).create().await.expect("producer");
    produce(&producer, 0..100, size).await;
    admin(&sa, &["topics", "offload", topic, "--wait", "--timeout", "2min"]);
    let offloaded = offload_status(&sa, topic)["offloaded_ledgers"].as_u64().expect("offloaded_ledgers");
    assert!(offloaded >= 4, "{offloaded}");
    assert_eq!(segments(&s3).len() as u64, offloaded);
    consume_and_verify(&client, topic, "all", 0, 100, size).await;

    admin(&sa, &["namespaces", "set-policies", "public/default", "--retention-size", "0B"]);
    let out = admin(&sa, &["topics", "apply-retention", topic]);
    assert!(out.contains("deleted"), "{out}");
    assert!(segments(&s3).is_empty(), "retention deleted the objects: {:?}", segments(&s3));
    assert_eq!(offload_status(&sa, topic)["offloaded_ledgers"], 0);

    // Deleting a topic deletes its objects too.
    let doomed = "doomed";
    let producer = client.producer(doomed).batching(false).create().await.expect("producer");
    produce(&producer, 0..50, size).await;
    producer.close().await.expect("close producer");
    admin(&sa, &["topics", "offload", doomed, "--wait", "--timeout", "2min"]);
    assert!(!segments(&s3).is_empty());
    admin(&sa, &["topics", "delete", doomed, "--force"]);
    assert!(segments(&s3).is_empty(), "topic deletion deleted the objects: {:?}", segments(&s3));
}

/// `magnetar admin` expected to fail: its standard error.
fn admin_fails(sa: &StandaloneProc, args: &[&str]) -> String {
    let out = run_admin(sa, args);
    assert!(!out.status.success(), "magnetar admin {args:?} succeeded: {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn topic_stats(sa: &StandaloneProc, topic: &str) -> Value {
    let (status, body) = http_get(&sa.http, &format!("/admin/v1/topics/public/default/{topic}/stats"));
    assert_eq!(status, 200, "stats: {body}");
    serde_json::from_str(&body).expect("stats json")
}

/// Deletions the object store refuses (it is down) are not forgotten: retention records them in
/// the topic's ledger list and a topic deletion keeps the list and fails. After a `kill -9` and
/// the store's return, the restarted broker finishes retention's deletions by itself when the
/// topic loads, and deleting the topic again finishes it: no object is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletions_refused_by_a_down_object_store_finish_after_a_crash_once_it_returns() {
    let s3 = S3Server::start().expect("start the S3 server");
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    // No periodic retention check within the test: only the one a load with deletions to
    // finish runs at once.
    let config = broker_config(
        &s3,
        "rollover_max_entries = 20\nretention_check_interval = \"1h\"",
        "request_timeout = \"1s\"\nconnect_timeout = \"1s\"\nmax_retries = 0\nretry_timeout = \"1s\"",
        "deletion_lag = \"0s\"",
    );
    let mut sa = StandaloneProc::start_configured(&data, &config, BOOKIE);
    let client = Client::builder(&sa.url).tls_trust_cert(&sa.cert).build().await.expect("connect");
    let (kept, doomed) = ("kept", "doomed");
    for topic in [kept, doomed] {
        let producer = client.producer(topic).batching(false).create().await.expect("producer");
        produce(&producer, 0..100, 1024).await; // 4 closed ledgers of 20, the 5th being written
        producer.close().await.expect("close producer");
        admin(&sa, &["topics", "offload", topic, "--wait", "--timeout", "2min"]);
    }
    let before = segments(&s3);
    assert!(before.len() >= 8, "{before:?}");

    s3.pause().expect("freeze the S3 server");
    admin(&sa, &["namespaces", "set-policies", "public/default", "--retention-size", "0B"]);
    let out = admin(&sa, &["topics", "apply-retention", kept]);
    assert!(out.contains("deleted 4 ledgers") && out.contains("the deletion of 4 ledgers did not finish"), "{out}");
    let pending = topic_stats(&sa, kept)["deleting_ledgers"].clone();
    assert_eq!(pending.as_array().map(Vec::len), Some(4), "{pending}");
    assert_eq!(
        metric(&sa, "magnetar_broker_retention_deleting_ledgers{topic=\"persistent://public/default/kept\"}"),
        Some(4.0)
    );
    let stats = admin(&sa, &["topics", "stats", kept]);
    assert!(stats.contains("4 ledgers off the list still to delete"), "{stats}");
    let err = admin_fails(&sa, &["topics", "delete", doomed, "--force"]);
    assert!(
        err.contains("could not be deleted (")
            && err.contains("5 of its 5 ledgers are left")
            && err.contains("delete the topic again"),
        "{err}"
    );

    sa.kill9();
    sa.restart();
    s3.resume().expect("thaw the S3 server");
    // Loading the topic (stats do) runs a retention check at once: the deletions finish.
    wait_until("the retention deletions to finish", DEADLINE, || async {
        topic_stats(&sa, kept)["deleting_ledgers"].as_array().is_some_and(Vec::is_empty)
    })
    .await;
    let (status, list) = http_get(&sa.http, "/admin/v1/topics/public/default");
    assert!(status == 200 && list.contains("doomed"), "the failed deletion kept the topic: {list}");
    admin(&sa, &["topics", "delete", doomed]);
    let (_, list) = http_get(&sa.http, "/admin/v1/topics/public/default");
    assert!(!list.contains("doomed"), "{list}");
    assert!(segments(&s3).is_empty(), "objects left: {:?}", segments(&s3));

    // The metadata store knows no ledger but those `kept` lists: nothing was left behind.
    assert!(sa.interrupt().success(), "clean shutdown");
    let store = magnetar_common::metadata::connect(&format!("embedded:{}", data.join("metadata").display()))
        .await
        .expect("open the standalone's metadata store");
    let list = store.get("/managed-ledgers/public/default/kept").await.expect("get").expect("kept's list");
    let list: Value = serde_json::from_slice(&list.value).expect("list json");
    assert!(list.get("deleting").is_none(), "{list}");
    let listed: Vec<u64> = list["ledgers"].as_array().expect("ledgers").iter().filter_map(Value::as_u64).collect();
    let prefix = magnetar_bookie::client::meta::LEDGERS_PREFIX;
    let mut known: Vec<u64> = store
        .list(prefix)
        .await
        .expect("list ledgers")
        .iter()
        .filter_map(|kv| kv.key.strip_prefix(prefix)?.parse().ok())
        .collect();
    known.sort();
    assert_eq!(known, listed, "ledgers in the metadata store vs listed by the only topic left");
}

/// `magnetar perf object-store` (the offload benchmark's baseline) measures a local directory:
/// every phase reports a rate, and it leaves no object behind.
#[test]
fn perf_object_store_measures_a_store_and_cleans_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    std::fs::create_dir_all(&store).expect("store dir");
    let config = dir.path().join("broker.toml");
    std::fs::write(&config, format!("[offload]\nurl = \"file://{}\"\n", store.display())).expect("config");
    let json = dir.path().join("raw.json");
    let out = Command::new(magnetar())
        .args(["perf", "object-store", "--mib", "16", "--object-mib", "8", "--config"])
        .arg(&config)
        .arg("--json")
        .arg(&json)
        .output()
        .expect("run perf object-store");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&std::fs::read(&json).expect("json")).expect("parse");
    assert_eq!(report["objects"], 2, "{report}");
    for key in [
        "put_mb_per_sec",
        "get_mb_per_sec",
        "range_get_mb_per_sec",
        "segment_write_mb_per_sec",
        "segment_read_mb_per_sec",
    ] {
        assert!(report[key].as_f64().is_some_and(|v| v > 0.0), "{key}: {report}");
    }
    let left: Vec<_> = walk(&store).into_iter().filter(|p| p.is_file()).collect();
    assert!(left.is_empty(), "objects left behind: {left:?}");
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        }
        out.push(path);
    }
    out
}
