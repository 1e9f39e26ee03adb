//! Bundle ownership between brokers sharing one metadata store: lookups assign bundles to the
//! least-loaded live broker, every broker answers a lookup alike, a broker refuses topics it does
//! not own (naming the owner), and a clean shutdown hands the bundles over at once.

use std::collections::HashMap;
use std::sync::Arc;

use magnetar_bookie::client::LedgerClient;
use magnetar_broker::BrokerConfig;
use magnetar_broker::metrics::Metrics;
use magnetar_broker::service::policies::NamespacePolicies;
use magnetar_broker::service::{BrokerService, ServiceError};
use magnetar_common::metadata::SharedStore;

async fn broker(store: &SharedStore, port: u16) -> Arc<BrokerService> {
    let cfg = BrokerConfig::default();
    let ledgers = LedgerClient::new(store.clone(), cfg.ledger_client.clone()).await.expect("ledger client");
    let svc = BrokerService::new(cfg, store.clone(), ledgers, Arc::new(Metrics::new())).expect("service");
    svc.join_cluster(&format!("127.0.0.1:{port}"), &format!("127.0.0.1:{}", port + 1000)).await.expect("join");
    svc
}

async fn owners(svc: &BrokerService, topics: &[String]) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for t in topics {
        let (_, owner) = svc.lookup(t).await.expect("lookup");
        out.insert(t.clone(), owner.broker_url);
    }
    out
}

#[tokio::test]
async fn bundles_spread_over_brokers_and_move_on_clean_shutdown() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("embedded:{}", dir.path().join("meta").display());
    let store = magnetar_common::metadata::connect(&url).await.expect("store");
    let a = broker(&store, 7001).await;
    let b = broker(&store, 7002).await;

    // Eight bundles for public/default, set before any topic exists.
    let (_, version) = a.policies().namespace("public", "default").await.expect("default namespace exists");
    let policies = NamespacePolicies { bundles: Some(8), ..Default::default() };
    a.policies().set_policies("public", "default", &policies, version, a.config()).await.expect("set policies");

    let topics: Vec<String> = (0..64).map(|i| format!("topic-{i}")).collect();
    let seen_by_a = owners(&a, &topics).await;
    assert_eq!(seen_by_a, owners(&b, &topics).await, "every broker answers a lookup alike");
    let bundles = a.ownership().bundle_owners("public/default/").await.expect("owners");
    assert_eq!(bundles.len(), 8, "every bundle got an owner");
    let on_a = bundles.iter().filter(|(_, o)| o.broker_url == "quic://127.0.0.1:7001").count();
    assert_eq!(on_a, 4, "the least-loaded broker takes each new bundle: {bundles:?}");

    // A broker refuses a topic it does not own, naming the owner.
    let foreign = topics.iter().find(|t| seen_by_a[*t] == "quic://127.0.0.1:7001").expect("a topic of a");
    match b.create_producer(foreign, "").await {
        Err(ServiceError::NotOwner { owner, .. }) => assert_eq!(owner.as_deref(), Some("quic://127.0.0.1:7001")),
        other => panic!("expected NotOwner, got {other:?}"),
    }

    // A clean shutdown releases a's bundles at once: b takes all of them.
    a.shutdown().await;
    let after = owners(&b, &topics).await;
    assert!(after.values().all(|o| o == "quic://127.0.0.1:7002"), "{after:?}");
    assert_eq!(b.ownership().brokers().await.expect("brokers").len(), 1);
    b.shutdown().await;
}

#[tokio::test]
async fn unknown_namespaces_and_bad_policies_are_refused_without_leaving_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("embedded:{}", dir.path().join("meta").display());
    let store = magnetar_common::metadata::connect(&url).await.expect("store");
    let svc = broker(&store, 7003).await;

    let err = svc.lookup("acme/orders/t").await.expect_err("unknown namespace");
    assert!(err.to_string().contains("namespace acme/orders does not exist"), "{err}");
    let err = svc.create_producer("acme/orders/t", "").await.expect_err("unknown namespace");
    assert!(err.to_string().contains("acme/orders"), "{err}");
    assert!(store.list("/bundles/acme/").await.expect("list").is_empty(), "no bundle assigned");
    assert!(store.list("/managed-ledgers/acme/").await.expect("list").is_empty(), "no topic created");

    let p = svc.policies();
    let err = p.create_namespace("acme", "orders", &NamespacePolicies::default(), svc.config()).await;
    assert!(err.expect_err("no tenant").to_string().contains("tenant acme"));
    p.create_tenant("acme").await.expect("tenant");
    let bad = NamespacePolicies { ack_quorum: Some(5), ..Default::default() };
    let err = p.create_namespace("acme", "orders", &bad, svc.config()).await.expect_err("bad quorums");
    assert!(err.to_string().contains("ack_quorum"), "{err}");
    assert!(p.namespaces("acme").await.expect("list").is_empty(), "nothing half-created");
    p.create_namespace("acme", "orders", &NamespacePolicies::default(), svc.config()).await.expect("namespace");
    let err = p.delete_tenant("acme").await.expect_err("tenant has namespaces");
    assert!(err.to_string().contains("still has namespaces"), "{err}");
    svc.lookup("acme/orders/t").await.expect("lookup in the new namespace");
    svc.shutdown().await;
}
