//! The multi-process setup: etcd, two `magnetar bookie` processes and a `magnetar broker`
//! process writing with E=2, Qw=2, Qa=2. The command-line tools and the load tool work against
//! it as against standalone.

mod support;

use magnetar_common::testing::EtcdServer;
use support::{BookieProc, BrokerProc};

#[test]
fn produce_consume_and_perf_against_separate_broker_and_bookies() {
    let etcd = EtcdServer::start().expect("start etcd");
    let url = etcd.url("/multi");
    let tmp = tempfile::tempdir().expect("tempdir");
    let _bookies: Vec<BookieProc> = (0..2)
        .map(|i| BookieProc::start(&tmp.path().join(format!("b{i}")), &format!("bookie-{i}"), &url, ""))
        .collect();
    let broker = BrokerProc::start(
        &tmp.path().join("broker"),
        &url,
        "[ledger]\nensemble_size = 2\nwrite_quorum = 2\nack_quorum = 2\n",
    );

    let out = broker
        .client_command(&["produce", "cluster-topic", "-m", "a", "-m", "b", "-n", "3"])
        .output()
        .expect("produce");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 6);
    let out = broker
        .client_command(&[
            "consume",
            "cluster-topic",
            "-s",
            "s",
            "--position",
            "earliest",
            "-n",
            "6",
            "--timeout",
            "60s",
        ])
        .output()
        .expect("consume");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "a\nb\na\nb\na\nb\n");

    let json = tmp.path().join("e2e.json");
    let json_arg = json.to_string_lossy().into_owned();
    let out = broker
        .client_command(&[
            "perf",
            "e2e",
            "cluster-perf",
            "-n",
            "2000",
            "--size",
            "300",
            "--warmup",
            "0",
            "--json",
            &json_arg,
        ])
        .output()
        .expect("perf e2e");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).expect("json")).expect("parse");
    assert_eq!(report["produced"]["ops"], 2000, "{report}");
    assert_eq!(report["check"]["messages"], 2000, "{report}");
    assert_eq!(report["check"]["gaps"], 0);
    assert_eq!(report["check"]["duplicates"], 0);
}
